"""The run driver above sid.py: command line, run folders, ticks, FID, snapshots, resume, tools.

sid.py's loop yields after every iteration; this file logs and saves (smalldiffusion's pattern): the
command line and its one-line errors, the options from presets and resume, the run folder, status
lines and stats.jsonl, FID, snapshots and training states, the toys' reports, and the `generate`,
`project` and `evaluate` commands. `python sid.py ...` hands over to `main` here.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import socket
import sys
import textwrap
import time

try:
    import fcntl  # flock: run folders are locked on Unix
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import data
import draw
import edm_nets
import fid
import fileio
import latents
import metrics
import releases
import sid
import toy

#----------------------------------------------------------------------------
# The driver's own state (the loop's is sid.State): declared once, one comment per field.

@dataclasses.dataclass
class Run:
    cfg: sid.Config        # the run's options (also s.cfg)
    log: object            # print on rank 0, silent on the other ranks
    world: object = None   # the toy world (toy.WORLDS) of a toy dataset; None for real datasets
    written: list = dataclasses.field(default_factory=list)  # files written, for the last line
    frames: list = dataclasses.field(default_factory=list)   # toy: (title, G_ema's samples) so far
    fid: list = dataclasses.field(default_factory=list)      # (Mimg, FID) history (in the state)
    fid_tools: tuple = None  # (reference mu, reference sigma, Inception detector) with FID on
    vae: object = None       # EDM2 latents: the VAE that decodes them to pixels (grids, FID)
    sign_start: dict = None  # SIGN on a toy: IGN's errors before training (None when resumed)
    start_time: float = 0.0  # when training started (time.time())
    tick_index: int = 0      # the number of the next status line
    tick_nimg: int = 0       # images seen at the last status line
    tick_time: float = 0.0   # the time of the last status line
    tick_iters: int = 0      # iterations since the last status line
    tick_sums: torch.Tensor = None  # their summed logged losses (fake, G, extra), float64
    lock: int = None         # rank 0: the file descriptor of the folder's lock (lock_folder)
    made: list = dataclasses.field(default_factory=list)  # folders made by the start (see start)
    state_nimg: int = None   # images seen at the last training state written or read (None: none)
    tick_last: torch.Tensor = None  # the last iteration's last micro-batch terms (official print)

#----------------------------------------------------------------------------
# Options: defaults <- presets <- command line, or a resumed run's saved options <- what may change.
# What a resume may change is each Config field's `resume` metadata (sid.opt): one policy for the
# code, --help (resume_policy_text) and the README.

def resolve_config(overrides):
    """The run's Config: sid.make_config of the command line's options (None: not given), or, with
    --resume, of the saved ones with the changes the policy allows; all of it checked (types,
    ranges, combinations, a named teacher's shape, a random teacher's size) before anything is
    fetched or built. Without --outdir, the start makes a new numbered folder (new_run_dir)."""
    over = {k: v for k, v in overrides.items() if v is not None}
    if over.get('resume'):
        over = resumed_options(over)
    cfg = sid.make_config(over)
    net_overrides(cfg)  # a bad JSON or too large a network fails here, before anything is loaded
    return cfg

def resume_fixed(name, method):
    """Whether a resumed run of `method` must keep option `name` (its field's `resume` policy)."""
    field = sid.Config.__dataclass_fields__.get(name)
    rule = field.metadata['resume'] if field else 'the folder'
    return rule == 'fixed' or (rule == 'fixed for sida' and method == 'sida')

def flag(name):
    return '--' + name.replace('_', '-')

def resumed_options(over):
    """The saved options of the run being resumed (its config.json, checked as a command line is)
    with the command line's changes its policy allows. Refused in one line: --outdir elsewhere, a
    changed fixed option, and a fixed option the file does not record (its value is unknown)."""
    folder = resume_folder(over['resume'])
    if over.get('outdir') and not same_path(over['outdir'], folder):
        raise ValueError(f"--resume continues a run in its own folder {folder}, not in --outdir "
                         f"{over['outdir']} (to branch a run, copy its folder and resume the copy)")
    path = os.path.join(folder, 'config.json')
    saved = read_json(path, '--resume')
    try:
        saved = {k: sid.check_option(k, v) for k, v in saved.items()}
    except ValueError as e:
        raise ValueError(f'--resume: {path}: {e}') from None
    method = saved.get('method', sid.Config.method)
    given = {k: v for k, v in over.items() if resume_fixed(k, method)}
    if method == 'sida' and 'batch_gpu' in given and given['batch_gpu'] != saved.get('batch_gpu'):
        raise ValueError(f"--resume: SiDA's losses are means over each micro-batch, so --batch-gpu "
                         f"must stay {saved.get('batch_gpu')}")
    changed = sorted(flag(k) for k, v in given.items() if k in saved and v != saved[k])
    if changed:
        raise ValueError(f'--resume: the run used other values of {", ".join(changed)}; a resumed '
                         'run keeps its maths (start a new run)')
    unknown = sorted(flag(k) for k in given if k not in saved)
    if unknown:
        raise ValueError(f'--resume: {path} does not record {", ".join(unknown)}, so the run\'s '
                         'value is unknown and cannot be changed (start a new run)')
    missing = [flag(f.name) for f in dataclasses.fields(sid.Config)
               if resume_fixed(f.name, method) and f.name not in saved]
    if missing:
        note(f'{path} does not record {", ".join(missing)} (another version wrote it?): the '
             'resumed run takes their defaults')
    return {**saved, **over, 'resume': over['resume'], 'outdir': folder}

def resume_policy_text():
    """The resume policy in words, from the fields' metadata (--help's epilog; the README says the
    same, and a test holds them together)."""
    may = [flag(f.name) for f in dataclasses.fields(sid.Config)
           if f.metadata['resume'] == 'may change']
    sida = [flag(f.name) for f in dataclasses.fields(sid.Config)
            if f.metadata['resume'] == 'fixed for sida']
    return (f"--resume RUN continues RUN in its own folder (--outdir, if given, must be RUN) with "
            f"its saved options. It may change "
            f"{', '.join(may)}, and except for SiDA {', '.join(sida)}: these leave the maths as "
            f"it is. Every other option is fixed: refused if it differs from the run's config.json "
            f"or the file does not record it.")

def note(text):
    """A one-line note on the console of rank 0."""
    if int(os.environ.get('RANK', 0)) == 0:
        print(f'note: {text}')

def net_overrides(cfg):
    """--net-overrides as network arguments, checked; with --teacher random, the network's size is
    checked as a file's would be; a teacher named by preset has its shape checked (no download)."""
    name = sid.PRESETS[cfg.dataset].get('teacher')
    over = checkpoints.parse_net_overrides(cfg.net_overrides, name)
    if cfg.teacher == 'random' and name in edm_nets.PRESETS:
        check_network_size(dict(edm_nets.PRESETS[name]['kwargs'], **over), '--teacher random')
    if cfg.teacher in edm_nets.PRESETS:
        check_teacher_shape(cfg, over, edm_nets.PRESETS[cfg.teacher]['kwargs'])
    return over

def check_network_size(kwargs, source):
    """A network built from `kwargs` stays within the limit the checkpoint reader sets for files
    (counted on the meta device: nothing allocated)."""
    checkpoints.meta_net(kwargs, source)

SHAPE = ('img_resolution', 'img_channels', 'label_dim')

def check_teacher_shape(cfg, over, kwargs):
    """The teacher (its network arguments) must make the dataset preset's images: the resolution,
    channels and classes of the preset's teacher, unless --net-overrides states others on purpose.
    A 2-D toy network is no image teacher."""
    preset_teacher = sid.PRESETS[cfg.dataset].get('teacher')
    if preset_teacher not in edm_nets.PRESETS:
        return
    source = f"--teacher {cfg.teacher or preset_teacher}"
    if kwargs.get('model_type') == 'ToyMLP' or not kwargs.get('img_resolution'):
        raise ValueError(f'{source} is a 2-D toy network, not an image teacher (the toy has its '
                         'exact teacher: --dataset toy)')
    want = {k: over.get(k, edm_nets.PRESETS[preset_teacher]['kwargs'][k]) for k in SHAPE}
    got = {k: kwargs.get(k, 0) for k in SHAPE}
    if got != want:
        state = json.dumps({k: v for k, v in got.items() if v != want[k]})
        raise ValueError(f"{source} makes {shape_text(got)} images, --dataset {cfg.dataset} "
                         f"{shape_text(want)} ones; to distil it with {cfg.dataset}'s "
                         f"hyper-parameters anyway, state its shape: --net-overrides '{state}'")

def shape_text(kw):
    classes = f"{kw['label_dim']}-class" if kw['label_dim'] else 'unconditional'
    return f"{kw['img_resolution']}x{kw['img_resolution']} {kw['img_channels']}-channel {classes}"

#----------------------------------------------------------------------------
# A run's files: config.json, stats.jsonl, snapshots (G_ema with its network arguments, read back
# by checkpoints.load_checkpoint) and the training state. Every file is written atomically.

def new_run_dir(parent, desc, made=None):
    """EDM's convention: parent/NNNNN-desc, one more than the largest number there, created at once:
    os.mkdir fails if another run took that name in the meantime, and the next number is tried.
    made: a list that gets the folders created (parent too), for a failed start to remove."""
    made = [] if made is None else made
    make_folders(parent, made)
    for _ in range(1000):
        names = os.listdir(parent)
        nums = [int(m.group(1)) for d in names if (m := re.match(r'(\d+)-', d))]
        path = os.path.join(parent, f'{max(nums, default=-1) + 1:05d}-{desc}')
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        made.append(path)
        return path
    raise OSError(f'no new run folder could be made in {parent}')

def make_folders(path, made):
    """os.makedirs, recording in `made` the folders it creates (outermost first)."""
    missing, p = [], os.path.abspath(path)
    while not os.path.isdir(p) and os.path.dirname(p) != p:
        missing.insert(0, p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    made.extend(missing)

def resume_folder(path):
    """--resume RUN or RUN/training-state.pt -> RUN, the folder the resumed run writes to."""
    return path if os.path.isdir(path) else os.path.dirname(path) or '.'

def same_path(a, b):
    return os.path.realpath(a) == os.path.realpath(b)

LOCK = 'run.lock'

def claim_folder(cfg, log):
    """Rank 0 takes the run's folder before anything is loaded: a resume its own folder only, a new
    run --outdir (or a new numbered folder), locked for the run's life (lock_folder); a folder that
    holds a run is refused, one that holds only the config.json of a start that never trained is
    taken with a note. -> (the lock, the folders made)."""
    made = []
    if cfg.resume:
        folder = resume_folder(cfg.resume)
        if not os.path.isdir(cfg.resume) and not os.path.isfile(cfg.resume):
            raise FileNotFoundError(f'--resume: no training state at {cfg.resume}')
        if cfg.outdir and not same_path(cfg.outdir, folder):
            raise ValueError(f'--resume continues a run in its own folder {folder}, not in '
                             f'--outdir {cfg.outdir} (to branch a run, copy its folder and resume '
                             'the copy)')
        cfg.outdir = folder
    elif cfg.outdir:
        make_folders(cfg.outdir, made)
    else:
        cfg.outdir = new_run_dir('runs', f'{cfg.dataset}-{cfg.method}', made)
    try:
        lock = lock_folder(cfg.outdir)
    except BaseException:
        remove_folders(made)
        raise
    try:
        if not cfg.resume:
            check_new_folder(cfg.outdir, log)
    except BaseException:
        unlock(cfg.outdir, lock)
        remove_folders(made)
        raise
    return lock, made

def check_new_folder(outdir, log):
    """A new run never goes into another run's folder. A folder whose config.json has no training
    state beside it is a start that died: with nothing else of it there (an empty start), the new
    run takes it; with more (ticks, snapshots), --resume restarts it from 0 kimg."""
    names = {n for n in os.listdir(outdir) if n != LOCK and not n.endswith('.tmp')}
    if 'config.json' not in names:
        return
    if 'training-state.pt' in names:
        raise ValueError(f'--outdir {outdir} holds a run: continue it with --resume {outdir}, or '
                         'choose another')
    if names != {'config.json'}:
        raise ValueError(f'--outdir {outdir} holds a run that ended before its first training '
                         f'state: restart it with --resume {outdir} (from 0 kimg), or choose '
                         'another')
    log(f'note: {outdir} holds only the config.json of a start that never trained: this run '
        'takes the folder')

def lock_folder(folder):
    """An exclusive lock (flock) on FOLDER/run.lock, held until the run ends: the OS drops it when
    the process ends, however it ends, so no lock outlives its run. The holder (pid, host, start
    time) is written in the file; a folder held by another run is refused in one line naming it.
    -> the lock's file descriptor (None where flock does not exist: Windows)."""
    if fcntl is None:
        return None
    path = os.path.join(folder, LOCK)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_CLOEXEC', 0)
    for _ in range(100):
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise OSError(f'{folder}: cannot create the lock file {LOCK} ({e.strerror})') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors='replace').strip() or 'a run starting up'
            os.close(fd)
            raise ValueError(f'{folder} is in use by another run ({holder}): wait for it to end, '
                             'or choose another folder') from None
        if same_file(fd, path):
            break
        os.close(fd)  # its holder removed it between our open and lock: take the new file
    else:
        raise OSError(f'{folder}: cannot lock {LOCK}')
    os.ftruncate(fd, 0)
    since = time.strftime('%Y-%m-%d %H:%M:%S')
    os.write(fd, f'pid {os.getpid()} on {socket.gethostname()} since {since}\n'.encode())
    return fd

def same_file(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)

def unlock(folder, fd):
    """Give the folder back: the lock file is removed while still locked, then closed (a process
    that opened it meanwhile finds it gone after locking, and opens the new one)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.remove(os.path.join(folder, LOCK))
    os.close(fd)

def remove_folders(made):
    """After a failed start: the folders it made, innermost first, each only if empty."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(path)

def release_folder(run, failed=False):
    """The end of a run's hold on its folder (once; every rank may call it). After a failed start,
    a folder it made goes again, with the config.json it wrote: nothing is left behind."""
    lock, run.lock = run.lock, None
    if lock is not None:
        unlock(run.cfg.outdir, lock)
    if failed and run.made:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(run.cfg.outdir, 'config.json'))
        remove_folders(run.made)

def prepare_outdir(outdir):
    """A killed run's leftovers removed (rank 0, holding the lock: no other run's temporaries)."""
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise ValueError(f'--outdir {outdir}: not writable')
    fileio.remove_stale_temporaries(outdir)

@contextlib.contextmanager
def writing(path):
    """A failed write (disk full, a file-size limit, no permission) as one line naming the file, the
    reason and the free space there; torch's writer reports a short write as '[enforce fail at
    inline_container.cc...] unexpected pos', which says neither."""
    try:
        yield
    except OSError as e:
        raise RuntimeError(write_failure(path, e.strerror or str(e))) from None
    except RuntimeError as e:
        if 'inline_container' not in str(e) and 'PytorchStreamWriter' not in str(e):
            raise
        raise RuntimeError(write_failure(path, 'the file stopped short')) from None

def write_failure(path, why):
    try:
        free = shutil.disk_usage(os.path.dirname(path) or '.').free
        free = f'{free / 2 ** 20:.1f} MiB free there'
    except OSError:
        free = 'free space unknown'
    return f'could not write {path}: {why} ({free})'

@contextlib.contextmanager
def out_of_memory(where):
    """An allocation failure as one line saying where (where(): text) and how much was asked; the
    CPU allocator's own message starts '[enforce fail at alloc_cpu.cpp...]'."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        text = str(e)
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and 'allocate' not in text:
            raise
        asked = re.search(r'allocate (\d+) bytes', text)
        cuda = re.search(r'Tried to allocate [\d.]+ [KMGT]?i?B', text)
        if asked:
            detail = f'{int(asked.group(1)) / 2 ** 30:.3g} GiB asked'
        else:
            detail = cuda.group(0) if cuda else type(e).__name__
        raise RuntimeError(f'out of memory {where()}: {detail}') from None
MAX_JSON_BYTES, MAX_STATS_BYTES = 1 << 20, 1 << 30  # config.json; stats.jsonl

def read_json(path, what):
    """A JSON object from a regular file of at most 1 MiB (a FIFO or device is refused)."""
    try:
        obj = json.loads(fileio.read_regular(path, MAX_JSON_BYTES))
    except (OSError, ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        where = os.path.dirname(path) or '.'
        raise ValueError(f'{what}: no readable {os.path.basename(path)} in {where}')
    return obj

def write_json(path, obj):
    write_file(path, json.dumps(obj, indent=2).encode())

def write_file(path, content):
    with fileio.atomic_write(path) as f:
        f.write(content)

def append_stats(outdir, entry):
    """One line appended to stats.jsonl, never through a link or into a special file."""
    fileio.append_line(os.path.join(outdir, 'stats.jsonl'), json.dumps(entry))

def truncate_stats(path, kimg):
    """Drop the lines written after `kimg`: a resumed run continues from its training state, not
    from its last tick; a half line (the process was killed mid-append) goes too."""
    def kept(line):
        try:
            return json.loads(line).get('kimg', 0) <= kimg + 1e-9 and line.endswith('\n')
        except ValueError:
            return False
    if os.path.lexists(path):
        lines = fileio.read_regular(path, MAX_STATS_BYTES).decode(errors='replace')
        keep = [line for line in lines.splitlines(keepends=True) if kept(line)]
        write_file(path, ''.join(keep).encode())

def save_snapshot(path, G_ema, cur_nimg, cfg, fid_value=None):
    snapshot = dict(G_ema=G_ema.state_dict(), net_kwargs=dict(G_ema.init_kwargs, dropout=0.0),
                    kimg=cur_nimg / 1e3, fid=fid_value, config=dataclasses.asdict(cfg))
    with fileio.atomic_write(path) as f:
        torch.save(snapshot, f)

def write_training_state(path, run, s):
    frames = run.world.frames_to_save(run.frames) if run.world is not None else []
    state = dict(G=s.G.state_dict(), G_ema=s.G_ema.state_dict(), f_psi=s.f_psi.state_dict(),
                 opt_G=s.opt_G.state_dict(), opt_psi=s.opt_psi.state_dict(), cur_nimg=s.cur_nimg,
                 data_images=s.data_batches * s.batch_gpu * s.world_size, fid=run.fid,
                 frames=frames)
    with fileio.atomic_write(path) as f:
        torch.save(state, f)

MAX_COUNT = 2 ** 53  # images seen, data position: exact in a float64 too
MAX_FRAMES, MAX_FRAME_NUMEL, MAX_FID_ENTRIES = 1000, 1 << 22, 10 ** 6

def read_training_state(path, objects, device):
    """Load a training state into `objects` (name -> module or optimiser) -> dict(cur_nimg,
    data_images, fid, frames). The file is scanned within bounds first (sizes, CRCs, the bounded
    unpickler: checkpoints.scan_torch_zip); every number is type- and range-checked. A missing,
    foreign, corrupt or implausible file gives one line naming it."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f'--resume: no training state at {path}')
    try:
        with fileio.open_regular(path, checkpoints.MAX_FILE_BYTES) as f:
            checkpoints.scan_torch_zip(f, path)
            st = torch.load(f, map_location=device, weights_only=True)
        for key, obj in objects.items():
            obj.load_state_dict(st[key])
        return checked_progress(st)
    except Exception as e:  # torch.load and load_state_dict raise many types for foreign files
        msg = str(e).strip().splitlines()
        first = msg[0][:200] if msg else ''
        raise ValueError(f'--resume: {path} is not a training state of this run '
                         f'({type(e).__name__}: {first})') from None

def checked_progress(st):
    """A training state's progress fields, checked: images seen and data position plain ints in
    [0, 2^53], the FID history (Mimg, FID) finite number pairs, the toy frames (title, tensor)
    few and small."""
    def count(v, name):
        if type(v) is not int or not 0 <= v <= MAX_COUNT:
            raise ValueError(f'{name} must be an int in [0, 2^53], got {type(v).__name__} '
                             f'{str(v)[:40]}')
        return v

    def number(v):
        return type(v) in (int, float) and math.isfinite(v)

    fid_list, frames = st.get('fid', []), st.get('frames', [])
    pairs = isinstance(fid_list, (list, tuple)) and len(fid_list) <= MAX_FID_ENTRIES and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(map(number, p)) for p in fid_list)
    if not pairs:
        raise ValueError('fid must be a list of (Mimg, FID) number pairs')
    plausible = isinstance(frames, (list, tuple)) and len(frames) <= MAX_FRAMES and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
        and len(p[0]) <= 200 and isinstance(p[1], torch.Tensor) and p[1].is_floating_point()
        and p[1].numel() <= MAX_FRAME_NUMEL for p in frames)
    if not plausible:
        raise ValueError(f'frames must be at most {MAX_FRAMES} (title, float tensor of at most '
                         f'{MAX_FRAME_NUMEL} numbers) pairs')
    return dict(cur_nimg=count(st['cur_nimg'], 'cur_nimg'),
                data_images=count(st['data_images'], 'data_images'),
                fid=[(float(m), float(v)) for m, v in fid_list],
                frames=[(t, x.float()) for t, x in frames])

def snapshot_path(path):
    """A run folder -> its best snapshot, else its latest (most images seen); a file -> itself."""
    if not os.path.isdir(path):
        return path
    if os.path.exists(os.path.join(path, 'network-snapshot-best.pt')):
        return os.path.join(path, 'network-snapshot-best.pt')
    snaps = [(int(m.group(1)), f) for f in os.listdir(path)
             if (m := re.fullmatch(r'network-snapshot-(\d+)\.pt', f))]
    if not snaps:
        raise FileNotFoundError(f'no network-snapshot-*.pt in {path}')
    return os.path.join(path, max(snaps)[1])  # by the number: names grow a digit past 10^9 images

#----------------------------------------------------------------------------
# Samples from seeds, as EDM's generate.py: one random generator per seed for its latent, label and
# any re-noising, so an image depends on its seed only (sample grids and FID use them too).

def sample_images(G, seeds, sigma_init, device, class_idx=None, sigmas=()):
    """G(z) for the seeds; with SIGN's `sigmas`, x_{k+1} = f(x_k + sigma_k eps_k) after step 1."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    z = torch.stack([torch.randn(G.img_shape, generator=g) for g in gens]).to(device) * sigma_init
    c = None
    if G.label_dim:
        if class_idx is not None:
            idx = [class_idx] * len(gens)
        else:
            idx = [int(torch.randint(G.label_dim, (), generator=g)) for g in gens]
        c = F.one_hot(torch.tensor(idx), G.label_dim).float().to(device)
    noises = [torch.stack([torch.randn(G.img_shape, generator=g) for g in gens]).to(device)
              for _ in sigmas]

    def f(v):
        return sid.generate(G, v, c, sigma_init)

    return sid.multistep_sample(f, z, sigmas, noises)[-1]

def generator_fid(G, num, sigma_init, tools, device, rank=0, world_size=1, vae=None):
    """FID of G on `num` images from seeds 0.. (own generators: the training stream is untouched);
    tools = (reference mu, reference sigma, detector); vae: EDM2's, for latents."""
    def make(seeds):
        return to_pixels(sample_images(G, seeds, sigma_init, device), vae)
    return fid.fid_of_generator(make, num, *tools, device, batch=64, rank=rank,
                                world_size=world_size)

def to_pixels(x, vae=None):
    """G's outputs -> uint8 images on the CPU: pixels in [-1, 1] by EDM's rule, or EDM2 latents
    through the VAE, a few at a time (latents.decode)."""
    if vae is None:
        return fid.to_uint8(x).cpu()
    return latents.decode(vae, x)

#----------------------------------------------------------------------------
# Start: options checked, inputs loaded (teacher, SiD²A generator, data, FID reference), the
# loop's State built and resumed; only then the run folder and its config.json (a failed start
# leaves nothing behind).

def start(cfg, nets=None):
    """-> (run, s), the driver's and the loop's state. First rank 0 takes the run's folder
    (claim_folder: locked until the run ends); then the inputs are loaded and checked and the
    loop's State built and resumed; only then is config.json written. A failed start gives the
    folder back as it found it. nets: (f_phi, G, f_psi) instead of the teacher's (tests); a toy
    dataset still gets its world (data, figures)."""
    procs = sid.init_processes(cfg)
    run = Run(cfg=cfg, log=print if procs['rank'] == 0 else silent)
    micro_batch(run, procs)
    if procs['rank'] == 0:
        run.lock, run.made = claim_folder(cfg, run.log)
    try:
        s = open_run(run, procs, nets)
    except BaseException:
        release_folder(run, failed=True)
        raise
    return run, s

def micro_batch(run, procs):
    """The micro-batch is at most batch / GPUs (as officially): said when it shrinks, recorded in
    config.json. SiDA's losses are means over each micro-batch, so a resumed SiDA run that would
    shrink it (on more GPUs) is refused."""
    cfg, n = run.cfg, procs['batch_gpu']
    if n < cfg.batch_gpu and cfg.method == 'sida' and cfg.resume:
        raise ValueError(f"--resume: SiDA's losses are means over each micro-batch of "
                         f"{cfg.batch_gpu}; on {procs['world_size']} GPUs --batch {cfg.batch} "
                         f"gives micro-batches of {n}: resume on at most "
                         f"{cfg.batch // cfg.batch_gpu}")
    if n < cfg.batch_gpu:
        run.log(f"--batch-gpu {cfg.batch_gpu} > --batch {cfg.batch} / {procs['world_size']} GPUs: "
                f"using micro-batches of {n}")
        cfg.batch_gpu = n

def open_run(run, procs, nets):
    """The inputs (teacher, SiD²A generator, data, FID reference), the loop's State, the resumed
    training state, then config.json and the start line -> s."""
    cfg = run.cfg
    if cfg.dataset in toy.WORLDS:
        run.world = toy.WORLDS[cfg.dataset]()
    with out_of_memory(lambda: f"while building the networks on {procs['device']}"):
        if nets is None:
            nets = load_networks(cfg, run.world, procs['device'])
        s = sid.setup(cfg, nets, procs)
    if cfg.resume:
        resume(run, s)
    s.data = open_data(run, s)
    if cfg.fid_every_kimg > 0:  # reference and detector now: a bad --fid-ref fails before training
        ref = cfg.fid_ref or sid.PRESETS[cfg.dataset]['fid_ref']
        run.fid_tools = (*fid.load_ref(ref), fid.load_detector(s.device))
    if latents.is_latent(s.G):  # EDM2: the VAE for grids and FID (a missing one fails here)
        run.vae = latents.open_vae(cfg.vae, s.device)
    if s.rank == 0:
        prepare_outdir(cfg.outdir)
        if cfg.resume:
            stats = os.path.join(cfg.outdir, 'stats.jsonl')
            with writing(stats):
                truncate_stats(stats, s.cur_nimg / 1e3)
        save(run, 'config.json', write_json, dataclasses.asdict(cfg))
    if run.world is not None and run.state_nimg is None:
        x = run.world.observe(s.G_ema, cfg.sigma_init)
        run.frames.append(('0 kimg', x))
        run.log(f'toy start: {run.world.quality_line(x)}')
    start_line(run, s)
    if run.world is not None and cfg.method == 'sign' and s.cur_nimg == 0 and s.rank == 0:
        run.sign_start = toy_sign_evaluation(run, s)  # for the end-of-run report
    run.start_time = run.tick_time = time.time()
    run.tick_nimg = s.cur_nimg
    run.tick_index = round(s.cur_nimg / max(cfg.tick_kimg * 1e3, 1))
    run.tick_sums = torch.zeros(3, dtype=torch.float64, device=s.device)
    return s

def silent(*args, **kwargs):
    pass

def load_networks(cfg, world, device):
    """The teacher (a toy world's, EDM's checkpoint, or 'random': an untrained net of the preset's
    architecture) and for SiD²A the SiD generator's weights -> sid.build_networks."""
    if world is not None:
        return sid.build_networks(cfg, world, device)
    preset_name = sid.PRESETS[cfg.dataset]['teacher']
    over = net_overrides(cfg)
    if (cfg.teacher or preset_name) == 'random':
        torch.manual_seed(0)
        teacher = edm_nets.build_preset(preset_name, **over)
    else:
        teacher = checkpoints.load_checkpoint(cfg.teacher or preset_name)[0]
        check_teacher_shape(cfg, over, teacher.init_kwargs)
        if over:  # G and f_psi are rebuilt with them: sized before they are built
            check_network_size(dict(teacher.init_kwargs, **over), '--net-overrides')
    G_state = None
    release = releases.RELEASES.get(cfg.init_generator)
    if release is not None and release.preset != preset_name:
        raise ValueError(f'--init-generator {release.name} was distilled from {release.preset}, '
                         f'this run\'s teacher is {preset_name}')
    if cfg.init_generator:
        G_state = checkpoints.load_checkpoint(snapshot_path(cfg.init_generator))[0].state_dict()
    return sid.build_networks(cfg, teacher, device, over, G_state)

def resume(run, s):
    """Weights, optimisers, images seen, data position, FID history and the toy's frames from the
    training state; the random draws follow from (seed, images seen)."""
    cfg = s.cfg
    path = cfg.resume
    if os.path.isdir(path):
        path = os.path.join(path, 'training-state.pt')
        if not os.path.lexists(path):  # a start that died before its first state: start it again
            run.log(f'note: {cfg.resume} holds no training state (its start ended before the '
                    'first one): starting it from 0 kimg with its saved options')
            return
    objects = dict(G=s.G, G_ema=s.G_ema, f_psi=s.f_psi, opt_G=s.opt_G, opt_psi=s.opt_psi)
    st = read_training_state(path, objects, s.device)
    if st['cur_nimg'] >= s.end_nimg:
        raise ValueError(f"--resume: the run already reached {st['cur_nimg'] / 1e6:g} Mimg; pass a "
                         f"longer --duration-mimg")
    s.cur_nimg = st['cur_nimg']
    s.data_batches = st['data_images'] // (s.batch_gpu * s.world_size)
    run.fid = st['fid']
    run.state_nimg = s.cur_nimg
    if run.world is not None and st['frames']:
        run.frames = st['frames']
    run.log(f'resumed from {path} at {s.cur_nimg / 1e3:.1f} kimg')

def open_data(run, s):
    """Real images for SiDA and SIGN, and labels for conditional nets: a toy's exact samples, else
    --data (labels from the dataset; without --data, uniform labels); from the saved position."""
    cfg = s.cfg
    if cfg.method == 'sign' and not cfg.data and run.world is None:
        run.log('SIGN without --data: no reconstruction term L_rec (only real images are made '
                'fixed points)')
    if run.world is not None and cfg.method in ('sida', 'sign'):
        seed = cfg.seed * s.world_size + s.rank
        return run.world.batches(s.batch_gpu, seed, start=s.data_batches)
    if cfg.method == 'sida' and not cfg.data:
        raise ValueError(f'--method {cfg.method} needs real images: pass --data PATH')
    if not cfg.data:
        return None
    if cfg.data.endswith('.json'):
        return open_labels(run, s)
    if latents.is_latent(s.f_phi):
        return open_latents(run, s)
    images, labels = data.load_dataset(cfg.data)
    labels = data.check_dataset_matches(images, labels, s.f_phi)
    return data.infinite_batches(images, labels, s.batch_gpu, cfg.seed, s.rank, s.world_size,
                                     start=s.data_batches, pin=s.device.type == 'cuda')

def open_labels(run, s):
    """--data dataset.json alone (as the official data-free SiD on EDM2): no images, classes drawn
    in the labels' frequencies (without --data: uniform)."""
    cfg = s.cfg
    if cfg.method != 'sid':
        raise ValueError(f'--data {cfg.data}: a labels file holds no images; --method '
                         f'{cfg.method} needs real ones')
    labels = data.read_labels_file(cfg.data)
    return data.label_batches(labels, s.G.label_dim, s.batch_gpu, cfg.seed, s.rank, s.world_size,
                              start=s.data_batches, path=cfg.data)

def open_latents(run, s):
    """EDM2's real latents (its dataset_tool.py encode layout, e.g. img512-sd.zip), read a batch at
    a time, with a fresh posterior sample per use."""
    cfg = s.cfg
    dataset = data.LatentDataset(cfg.data)
    net = s.f_phi
    want = (2 * net.img_channels, net.img_resolution, net.img_resolution)
    if dataset.shape != want:
        raise ValueError(f'{cfg.data}: latents {list(dataset.shape)} (posterior mean and std), but '
                         f'the teacher needs {list(want)}')
    raw = data.latent_batches(dataset, net.label_dim, s.batch_gpu, cfg.seed, s.rank, s.world_size,
                              start=s.data_batches)
    return latents.posterior_samples(raw, cfg.seed, s.rank, start=s.data_batches)

def start_line(run, s):
    """The options that differ from the preset, processes, micro-batches, G's size, the folder."""
    cfg = s.cfg
    ref = sid.Config(**sid.preset(cfg.dataset, cfg.method, cfg.init_generator, cfg.fast))
    diff = ', '.join(f'{k}={v}' for k, v in dataclasses.asdict(cfg).items()
                     if v != getattr(ref, k) and k != 'outdir')
    params = sum(p.numel() for p in s.G.parameters()) / 1e6
    run.log(f'{cfg.method} on {cfg.dataset}{" with " + diff if diff else ""}; {s.world_size} '
            f'process(es) on {s.device}, {s.rounds} round(s) of {s.batch_gpu} per step; G '
            f'{params:.2f}M parameters; writing to {cfg.outdir}')

#----------------------------------------------------------------------------
# Training: the loop yields, the driver logs and saves. Once per tick a status line and a
# stats.jsonl entry; FID, snapshots and the toy's observations at their intervals; the end.

def train(cfg, nets=None):
    """Run (or resume) a distillation to its end -> (run, s), the driver's and the loop's state.
    Ctrl-C ends it with one line saying where it can resume from; the folder's lock goes with it."""
    run, s = start(cfg, nets)
    try:
        with out_of_memory(lambda: f'at {s.cur_nimg / 1e3:.1f} kimg ({s.batch_gpu} images per '
                           f'micro-batch on {s.device})'):
            for it in sid.iterate(s):
                maintain(run, s, it)
        finish(run, s)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_text(run, s)) from None
    finally:
        release_folder(run)
    return run, s

class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with the one line that says where the run can resume from."""

def interrupted_text(run, s):
    where = f'interrupted at {s.cur_nimg / 1e3:g} kimg'
    folder = run.cfg.outdir
    if run.state_nimg is None:
        return (f'{where}, before the first training state: --resume {folder} starts it again '
                'from 0 kimg')
    return (f'{where}: --resume {folder} continues from its training state at '
            f'{run.state_nimg / 1e3:g} kimg')

def maintain(run, s, it):
    """After an iteration: each task whose interval this iteration crossed (or the run's end)."""
    cfg = s.cfg
    run.tick_sums += torch.stack([it.loss_fake, it.loss_G, it.loss_extra])
    run.tick_last = it.last
    run.tick_iters += 1
    done = s.cur_nimg >= s.end_nimg

    def crossed(kimg):
        every = max(round(kimg * 1e3), 1)
        return kimg > 0 and (done or s.cur_nimg // every > (s.cur_nimg - cfg.batch) // every)

    if run.world is not None and crossed(cfg.duration_mimg * 1e3 / 40):  # 40 frames for the GIF
        run.frames.append((f'{s.cur_nimg / 1e3:.4g} kimg', run.world.observe(s.G_ema,
                                                                             cfg.sigma_init)))
    if crossed(cfg.tick_kimg):
        with writing(os.path.join(cfg.outdir, 'stats.jsonl')):
            report_tick(run, s)
    if crossed(cfg.fid_every_kimg):
        fid_step(run, s)
    if crossed(cfg.snap_kimg) and s.rank == 0:
        save_checkpoint(run, s)

# Two conventions for the logged losses, both in every status line and stats.jsonl entry. Ours:
# an iteration's whole loss (the sum over its micro-batches: the batch's per-GPU mean), averaged
# over the tick's iterations and the GPUs. The official loops print the scaled loss of the last
# micro-batch of the tick's last iteration on rank 0 (about ours / micro-batches per GPU).
LOSS_CONVENTION = 'iteration: sum of its micro-batches; mean over the tick and GPUs'

def last_micro_batch(method, last):
    """The last micro-batch's terms under the official status line's names: SiD loss_fake_score,
    loss_G; SiDA f_psi's loss split into loss_fake_score (DSM) and loss_D, then loss_G and
    loss_G_gan; SIGN (no official code) loss_fake_score, loss_G, loss_ign."""
    fake, d, G, extra = last.tolist()
    out = dict(loss_fake_score=fake)
    if method == 'sida':
        out['loss_D'] = d
    out['loss_G'] = G
    extra_name = dict(loss_gan='loss_G_gan', loss_ign='loss_ign').get(sid.METHODS[method].extra)
    if extra_name:
        out[extra_name] = extra
    return out

def report_tick(run, s):
    """The status line and stats.jsonl entry: mean losses of the tick's iterations (and the
    official convention's numbers), time, memory."""
    extra_name = sid.METHODS[s.cfg.method].extra
    if s.world_size > 1:  # each rank summed its share (loss / n): the ranks' mean is the batch's
        check_ranks_agree((s.G, s.f_psi), f' at {s.cur_nimg / 1e3:.1f} kimg')
        torch.distributed.all_reduce(run.tick_sums)
        run.tick_sums /= s.world_size
    now = time.time()
    loss_fake, loss_G, extra = (run.tick_sums / run.tick_iters).tolist()
    sec_per_kimg = (now - run.tick_time) / max((s.cur_nimg - run.tick_nimg) / 1e3, 1e-9)
    e = dict(tick=run.tick_index, kimg=s.cur_nimg / 1e3, time=now - run.start_time,
             sec_per_kimg=sec_per_kimg, loss_fake=loss_fake, loss_G=loss_G)
    if extra_name:
        e[extra_name] = extra
    e['loss_convention'] = LOSS_CONVENTION
    e['last_micro_batch'] = last_micro_batch(s.cfg.method, run.tick_last)
    if s.device.type == 'cuda':
        e['mem_gb'] = torch.cuda.max_memory_allocated(s.device) / 2 ** 30
    eta = fmt_time(sec_per_kimg * (s.end_nimg - s.cur_nimg) / 1e3)
    run.log(f"tick {run.tick_index:<4d} kimg {e['kimg']:<9.1f} time {fmt_time(e['time']):<7s} "
            f"sec/kimg {sec_per_kimg:<7.3g} eta {eta:<7s} batch: loss_fake {loss_fake:<9.4g} "
            f"loss_G {loss_G:<+9.4g}"
            + ''.join(f' {k} {e[k]:.4g}' for k in ('loss_gan', 'loss_ign', 'mem_gb') if k in e)
            + ' | last micro-batch:'
            + ''.join(f' {k} {v:.4g}' for k, v in e['last_micro_batch'].items()))
    if s.rank == 0:
        append_stats(s.cfg.outdir, e)
        if 'stats.jsonl' not in run.written:
            run.written.append('stats.jsonl')
    run.tick_nimg, run.tick_time, run.tick_iters = s.cur_nimg, now, 0
    run.tick_index += 1
    run.tick_sums.zero_()

def fmt_time(s):
    s = int(round(s))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m{s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h{s // 60 % 60:02d}m'
    return f'{s // 86400}d{s // 3600 % 24:02d}h'

@torch.no_grad()
def check_ranks_agree(nets, what=''):
    """Raise unless every rank holds bit-identical parameters (per-tensor float64 sums, gathered):
    DDP keeps replicas equal only if each steps on the same all-reduced gradients."""
    sums = torch.stack([p.double().sum() for net in nets for p in net.parameters()])
    out = [torch.empty_like(sums) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, sums)
    bad = [r for r, o in enumerate(out) if not torch.equal(o, out[0])]
    if bad:
        raise RuntimeError(f'DDP replicas diverged{what}: rank(s) {bad}')

def save(run, name, writer, *args):
    path = os.path.join(run.cfg.outdir, name)
    with writing(path):
        writer(path, *args)
    if name not in run.written:
        run.written.append(name)

def save_checkpoint(run, s):
    """Snapshot and training state, named by the images seen (names never collide), and for images
    a grid of 64 samples (EDM2: 16, decoded at 512x512, as officially)."""
    cfg = s.cfg
    save(run, f'network-snapshot-{s.cur_nimg:09d}.pt', save_snapshot, s.G_ema, s.cur_nimg, cfg)
    save(run, 'training-state.pt', write_training_state, run, s)
    run.state_nimg = s.cur_nimg
    if s.G.img_resolution:
        n = 64 if run.vae is None else 16
        images = to_pixels(sample_images(s.G_ema, range(n), cfg.sigma_init, s.device), run.vae)
        save(run, f'samples-{s.cur_nimg:09d}.png', fileio.save_png, images)

def fid_step(run, s):
    """FID of G_ema (all ranks share the work), logged and plotted; the best snapshot kept (over
    the whole history: a resumed run restores it)."""
    cfg = s.cfg
    value = generator_fid(s.G_ema, cfg.fid_num, cfg.sigma_init, run.fid_tools, s.device, s.rank,
                          s.world_size, run.vae)
    run.fid.append((s.cur_nimg / 1e6, value))
    run.log(f'FID {value:.3f} at {s.cur_nimg / 1e3:.1f} kimg')
    if s.rank == 0:
        with writing(os.path.join(cfg.outdir, 'stats.jsonl')):
            append_stats(cfg.outdir, dict(kimg=s.cur_nimg / 1e3, fid=value))
        save(run, 'fid.png', write_file, draw.curve(run.fid))
        if value <= min(v for _, v in run.fid):
            save(run, 'network-snapshot-best.pt', save_snapshot, s.G_ema, s.cur_nimg, cfg, value)

def toy_sign_evaluation(run, s):
    """sid.sign_evaluation of G_ema on the toy world's fixed draws (the run's stream untouched)."""
    c, sigma_init = run.world.eval_labels, s.cfg.sigma_init

    def f(v):
        return sid.generate(s.G_ema, v, c, sigma_init)

    return sid.sign_evaluation(f, *run.world.sign_inputs(sigma_init))

def finish(run, s):
    """The end: a toy's report (its lines, and pictures), the process group closed, one line
    listing what was written."""
    cfg = s.cfg
    if run.world is not None and s.rank == 0:
        sign = None
        if cfg.method == 'sign':
            sign = dict(toy_sign_evaluation(run, s), start=run.sign_start)
        for line in run.world.report_lines(run.frames, sign):
            run.log(line)
        if run.world.name == 'toy':
            pictures = draw.toy_pictures(run.world, run.frames, cfg.method, cfg.sigma_init)
        else:
            pictures = draw.image_toy_pictures(run.world, run.frames, sign)
        for name, content in pictures.items():
            save(run, name, write_file, content)
    if s.own_group:
        torch.distributed.destroy_process_group()
    run.log(f"wrote {cfg.outdir}: {', '.join(run.written)}")
    release_folder(run)

#----------------------------------------------------------------------------
# The commands `python sid.py generate|project` (a trained generator) and their arguments.

# Bounds: a request past them is refused in one line, not left to run out of memory or time.
MAX_SEEDS = 10_000_000    # images per `generate`
MAX_BATCH_VALUES = 2 ** 24  # latent values per forward pass (64 MiB; 5461 CIFAR-10 images)
MAX_REPEAT = 1000         # projections in a row (SIGN's are idempotent after a few)
POINTS_PER_PASS = 2 ** 16  # a 2-D toy's points per forward pass
MAX_PICTURE_POINTS = 4096  # toy points drawn in generate's samples.png (one dot each)

def parse_seeds(text):
    """'0-49999' or '1,5,10-19' -> [(first, last)] in the given order, checked on the ranges (no
    list of seeds is made): seeds in [0, 2^63), at most MAX_SEEDS, none twice (one image each)."""
    parts = [re.fullmatch(r'(\d{1,19})(?:-(\d{1,19}))?', p) for p in text.split(',')]
    ranges = [(int(m.group(1)), int(m.group(2) or m.group(1))) for m in parts if m]
    if len(ranges) < len(parts) or any(hi < lo or hi >= 2 ** 63 for lo, hi in ranges):
        raise ValueError(f"bad --seeds {sid.shown(text)}: use e.g. 0-49999 or 1,5,10-19 "
                         "(non-negative, increasing)")
    if sum(hi - lo + 1 for lo, hi in ranges) > MAX_SEEDS:
        raise ValueError(f'--seeds {sid.shown(text)}: more than {MAX_SEEDS} images')
    ordered = sorted(ranges)
    for (_, last), (first, _) in zip(ordered, ordered[1:]):
        if first <= last:
            raise ValueError(f'--seeds {sid.shown(text)}: seed {first} is given twice (a seed is '
                             'one image)')
    return ranges

def seed_batches(ranges, batch):
    """The seeds of `ranges`, in order, as lists of at most `batch`."""
    part = []
    for lo, hi in ranges:
        for seed in range(lo, hi + 1):
            part.append(seed)
            if len(part) == batch:
                yield part
                part = []
    if part:
        yield part

def parse_sigmas(text, steps):
    """SIGN's re-noising levels between steps: steps - 1 finite, non-negative numbers."""
    try:
        sigmas = [float(s) for s in text.split(',')] if text else []
    except ValueError:
        sigmas = [float('nan')]
    if not all(math.isfinite(s) and s >= 0 for s in sigmas):
        raise ValueError(f"bad --sigmas '{text}': finite noise levels >= 0, e.g. 0.8,0.2")
    if steps and len(sigmas) != steps - 1:
        raise ValueError(f'--steps {steps} needs {steps - 1} noise levels in --sigmas, got '
                         f'{len(sigmas)}')
    return sigmas

def open_generator(ckpt, device, outdir=None, class_idx=None):
    """(G on its device, its sigma_init, device, load_checkpoint's info) for --ckpt, after the cheap
    checks. sigma_init: the run's; SiD's 2.5 for the official files."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {device}: CUDA is not available here')
    if outdir is not None and os.path.isdir(outdir) and os.listdir(outdir):
        raise ValueError(f'--outdir {outdir} is not empty: choose a new folder (nothing is '
                         'overwritten)')
    G, info = checkpoints.load_checkpoint(snapshot_path(ckpt))
    if class_idx is not None and not 0 <= class_idx < G.label_dim:
        if G.label_dim:
            raise ValueError(f'--class-idx {class_idx}: this generator has classes 0..'
                             f'{G.label_dim - 1}')
        raise ValueError(f'--class-idx {class_idx}: this generator is unconditional')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    sigma_init = info.get('config', {}).get('sigma_init', releases.SIGMA_INIT)
    return G.to(device), sigma_init, device, info

def cmd_generate(a):
    ranges, sigmas = parse_seeds(a.seeds), parse_sigmas(a.sigmas, a.steps)
    count = sum(hi - lo + 1 for lo, hi in ranges)
    if a.batch < 1:
        raise ValueError(f'--batch must be >= 1, got {a.batch}')
    G, sigma_init, device, _ = open_generator(a.ckpt, a.device, a.outdir, a.class_idx)
    per_image = math.prod(G.img_shape)
    if a.batch * per_image > MAX_BATCH_VALUES:
        raise ValueError(f'--batch {a.batch}: at most {MAX_BATCH_VALUES // per_image} images of '
                         f'{G.img_shape} per forward pass')
    vae = latents.open_vae(a.vae, device) if latents.is_latent(G) else None
    if not G.img_resolution:  # the 2-D toy: points and a picture
        if a.grid:
            raise ValueError('--grid: a 2-D toy generator writes its points (samples.npy) and '
                             'their picture (samples.png), not a grid of images')
        parts = [sample_images(G, part, sigma_init, device, None, sigmas).cpu()
                 for part in seed_batches(ranges, a.batch)]
        x = torch.cat(parts)
        os.makedirs(a.outdir, exist_ok=True)
        with fileio.atomic_write(os.path.join(a.outdir, 'samples.npy')) as f:
            np.save(f, x.numpy())
        # the picture draws a dot per point (its figures bound themselves: toy.ENERGY_N)
        picture = draw.samples_picture(x[:MAX_PICTURE_POINTS], toy.ToyMixture())
        write_file(os.path.join(a.outdir, 'samples.png'), picture)
        shown = f' (the first {MAX_PICTURE_POINTS})' if len(x) > MAX_PICTURE_POINTS else ''
        print(f'wrote {len(x)} points to {a.outdir}/samples.npy and samples.png{shown}')
        return
    pixels = count * G.img_resolution ** 2
    if a.grid and pixels > fileio.MAX_IMAGE_PIXELS:
        raise ValueError(f'--grid of {count} images: {pixels} pixels, more than one PNG may hold '
                         f'({fileio.MAX_IMAGE_PIXELS}); leave out --grid for one PNG per seed')
    os.makedirs(a.outdir, exist_ok=True)
    grid, written = [], 0
    for part in seed_batches(ranges, a.batch):
        # oneDNN's CPU convolutions round differently per batch size; the native ones differ less
        # (a seed's image may still move by one grey level between batch splits)
        mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = device.type != 'cpu'
        try:
            x = sample_images(G, part, sigma_init, device, a.class_idx, sigmas)
        finally:
            torch.backends.mkldnn.enabled = mkldnn
        x = to_pixels(x, vae)
        if a.grid:
            grid.append(x)
            continue
        for seed, im in zip(part, x):
            fileio.save_png(os.path.join(a.outdir, f'{seed:06d}.png'), im)
            written += 1
    if a.grid:
        fileio.save_png(os.path.join(a.outdir, 'grid.png'), torch.cat(grid))
        print(f'wrote {a.outdir}/grid.png: {count} images')
        return
    print(f'wrote {written} images to {a.outdir}')

def cmd_project(a):
    """SIGN projection / editing: f(y + sigma*eps), `repeat` times, for each input image (or the
    toy's .npy points); one image in memory at a time, each input's name kept (as .png)."""
    if not (math.isfinite(a.sigma) and a.sigma >= 0) or not 1 <= a.repeat <= MAX_REPEAT:
        raise ValueError(f'need a finite --sigma >= 0 and --repeat in [1, {MAX_REPEAT}], got '
                         f'{a.sigma} and {a.repeat}')
    if not os.path.exists(a.input):
        raise FileNotFoundError(f'--input not found: {a.input}')
    G, sigma_init, device, _ = open_generator(a.ckpt, a.device, a.outdir, a.class_idx)
    if latents.is_latent(G):
        raise ValueError('project works on pixels: EDM2 latent generators are not supported')
    gen = torch.Generator(device).manual_seed(a.seed)
    if a.input.endswith('.npy'):  # toy points [N, 2]
        project_points(a, G, sigma_init, device, gen)
        return
    if os.path.isfile(a.input):
        files = [a.input]
    else:
        files = sorted(os.path.join(a.input, f) for f in os.listdir(a.input)
                       if f.lower().endswith(('.png', '.jpg', '.jpeg')))
    if not files:
        raise ValueError(f'--input {a.input}: no .png/.jpg images')
    outputs = {}  # output name -> input: a.png and a.jpg would both be a.png
    for path in files:
        name = os.path.basename(path).rsplit('.', 1)[0] + '.png'
        if name in outputs:
            raise ValueError(f'--input {a.input}: {os.path.basename(outputs[name])} and '
                             f'{os.path.basename(path)} would both be written as {name} (rename '
                             'one)')
        outputs[name] = path
    if G.label_dim and a.class_idx is None:
        raise ValueError(f'this generator is class-conditional: pass --class-idx in [0, '
                         f'{G.label_dim})')
    c = None
    if G.label_dim:
        c = F.one_hot(torch.tensor([a.class_idx]), G.label_dim).float().to(device)
    for path in files:  # every input checked before anything is written
        project_input(path, G, a.input)
    os.makedirs(a.outdir, exist_ok=True)

    def f(v):
        return sid.generate(G, v, c, sigma_init)

    written = 0
    for name, path in outputs.items():
        y = project_input(path, G, a.input)
        x = sid.project(f, y[None].to(device), a.sigma, gen, a.repeat)
        fileio.save_png(os.path.join(a.outdir, name), fid.to_uint8(x)[0].cpu())
        written += 1
    print(f'wrote {written} projected image(s) to {a.outdir}')

def project_input(path, G, folder):
    """An input image in G's range [-1, 1], of G's shape (inside --input when it is a folder)."""
    y = fileio.read_image(path, path, root=None if folder == path else folder)
    if list(y.shape) != G.img_shape:
        raise ValueError(f'{path}: image of shape {list(y.shape)} (C,H,W), the generator makes '
                         f'{G.img_shape}')
    return torch.from_numpy(y.copy()).float() / 127.5 - 1

MAX_POINTS = 10_000_000  # 2-D points in a project --input .npy


def project_points(a, G, sigma_init, device, gen):
    y = fileio.read_npy(a.input, 2 * MAX_POINTS)  # header and size checked before reading
    if y.ndim != 2 or y.shape[1] != G.img_channels or G.img_resolution:
        raise ValueError(f'{a.input}: expected points [N, {G.img_channels}] for a 2-D toy '
                         f'generator, got {list(y.shape)}')

    def f(v):
        return sid.generate(G, v, None, sigma_init)

    parts = []  # in passes of POINTS_PER_PASS; the noise continues from pass to pass
    for i in range(0, len(y), POINTS_PER_PASS):
        part = torch.from_numpy(y[i:i + POINTS_PER_PASS]).float().to(device)
        parts.append(sid.project(f, part, a.sigma, gen, a.repeat).cpu())
    x = torch.cat(parts) if parts else torch.zeros(0, G.img_channels)
    os.makedirs(a.outdir, exist_ok=True)
    with fileio.atomic_write(os.path.join(a.outdir, 'projected.npy')) as fh:
        np.save(fh, x.numpy())
    print(f'wrote {len(x)} projected points to {a.outdir}/projected.npy')

#----------------------------------------------------------------------------
# `python sid.py evaluate`: the papers' metrics of a generator, its images made and scored in memory
# (metrics.evaluate); `python sid.py --list`: the released generators (releases.RELEASES).

def generator_reference(info):
    """The FID reference preset a generator belongs to: a release's, else its run's --fid-ref or
    its dataset's; None when unknown (an EDM .pkl, a run with a reference file of its own)."""
    if info.get('release'):
        return releases.RELEASES[info['release']].ref
    cfg = info.get('config') or {}
    ref = cfg.get('fid_ref') or sid.PRESETS.get(cfg.get('dataset'), {}).get('fid_ref')
    return ref if ref in fid.REF_PRESETS else None

def cmd_evaluate(a):
    names = [m.strip() for m in a.metrics.split(',') if m.strip()]
    metrics.check_options(names, a.num, a.trials, a.batch)  # before anything is downloaded
    sigmas = parse_sigmas(a.sigmas, a.steps)
    if a.out and os.path.exists(a.out):
        raise ValueError(f'--out {a.out} exists: choose a new file (nothing is overwritten)')
    release = releases.RELEASES.get(a.ckpt)
    if release is not None and 'fid' in names:  # before downloading
        size = edm_nets.PRESETS[release.preset]['kwargs']['img_resolution']
        size = latents.pixel_resolution(size) if release.network == 'edm2' else size
        metrics.check_reference(a.ref or release.ref, size, release.ref)
    G, sigma_init, device, info = open_generator(a.ckpt, a.device)
    if not G.img_resolution:
        raise ValueError(f'--ckpt {a.ckpt}: a 2-D toy generator; evaluate scores images')
    vae = latents.open_vae(a.vae, device) if latents.is_latent(G) else None
    image_shape = G.img_shape
    if vae is not None:  # EDM2: scored on the VAE's images, as the official metrics
        side = latents.pixel_resolution(G.img_resolution)
        image_shape = [3, side, side]
    expected = generator_reference(info)
    pr_detector = {'inception': None, 'vgg16': metrics.VGG16_URL}.get(a.pr_detector, a.pr_detector)
    start = time.time()

    def progress(trial, images):
        done = (trial - 1) * a.num + images
        rate = done / max(time.time() - start, 1e-9)
        eta = (a.trials * a.num - done) / rate
        print(f'\rtrial {trial}/{a.trials}: {images}/{a.num} images  {rate:.0f} img/s  '
              f'eta {fmt_time(eta)}   ', end='', file=sys.stderr, flush=True)

    def sample(seeds):
        x = sample_images(G, seeds, sigma_init, device, None, sigmas)
        return x if vae is None else to_pixels(x, vae)

    results = metrics.evaluate(sample, image_shape, a.num, names, a.trials, a.ref, expected,
                               a.detector, a.pr_ref, pr_detector, a.batch, device,
                               progress=progress, trusted=a.trust_detector)
    print(file=sys.stderr)
    first, last = 0, a.trials * a.num - 1
    print(f'{a.ckpt}: {a.trials} trial(s) of {a.num} images (seeds {first}-{last}), '
          f'reference {a.ref or expected}, {fmt_time(time.time() - start)}')
    for line in metrics.summary_lines(results):
        print(line)
    if release is not None and release.fid is not None:
        print(f"the authors' FID of this file: {release.fid:.3f} (SiD README)")
    elif release is not None and release.method != 'SiD':
        print(f"the authors' best FID on {release.dataset} (SiDA README, whichever file): "
              f'{release.best_fid:.3f}')
    if a.out:
        report = dict(ckpt=a.ckpt, num=a.num, metrics=names, ref=a.ref or expected,
                      sigmas=sigmas, authors_fid=release and release.fid, **results)
        with fileio.atomic_write(a.out) as f:
            f.write(json.dumps(report, indent=2).encode())

#----------------------------------------------------------------------------
# The command line: `python sid.py [options]` trains; `python sid.py generate|project|evaluate` use
# a trained generator. Training options come from sid.Config, grouped, with the chosen preset's
# defaults.

EXAMPLES = """examples:
  python sid.py --dataset toy                                  # 2-D toy, exact teacher, CPU, ~15 s
  python sid.py --dataset toy --method sign --dry-run          # print the resolved options and stop
  torchrun --nproc_per_node=4 sid.py --dataset cifar10 --fast  # SiD on EDM's CIFAR-10 teacher, GPU
  python sid.py --dataset cifar10 --method sida --init-generator runs/00001-cifar10-sid   # SiD²A
  python sid.py --dataset cifar10 --method sida --init-generator sid-cifar10-uncond-a1.2  # SiD²A
  python sid.py --resume runs/00001-cifar10-sid --duration-mimg 600         # continue, for longer
  python sid.py generate --help ; python sid.py evaluate --help             # a trained generator
  python sid.py --list                         # the released SiD/SiDA/SiD²A generators, by name"""

TOOLS = {  # `sid.py generate|project|evaluate --help`: what the command does, and examples
    'generate': ("""Sample a trained one-step generator: x = G(sigma_init * eps; sigma_init) for
each seed, one PNG per seed (each seed has its own random generator for its latent and label, as
EDM's generate.py) or one grid.png. With --steps K, SIGN's multi-step sampling: K calls of G with
re-noising at --sigmas between them. For a 2-D toy generator: samples.npy (the points) and
samples.png (the points over the true density, with the toy's figures; the energy distance is
taken on the first 2000 points, so any --seeds stays cheap).""", """examples:
  python sid.py generate --ckpt RUN --seeds 0-49999 --outdir out/c10         # one PNG per seed
  python sid.py generate --ckpt RUN --seeds 0-63 --grid --outdir out/grid     # one grid.png
  python sid.py generate --ckpt RUN --seeds 0-99 --class-idx 3 --outdir out/c3  # one class
  python sid.py generate --ckpt RUN --steps 3 --sigmas 0.8,0.2 --outdir out/3   # SIGN: 3 steps
  python sid.py generate --ckpt sid-cifar10-uncond-a1.2 --seeds 0-63 --grid --outdir out/g"""),
    'project': ("""SIGN's projection (zero-shot editing): apply the trained generator f to given
images (or a 2-D toy's points) y: y <- f(y + sigma * eps), --repeat times. An idempotent f maps
its input into the set it generates, so a corrupted image comes back as an image f makes
(ideally a close one). Writes one PNG per input image (projected.npy for points).""", """examples:
  python sid.py project --ckpt RUN --input noisy/ --sigma 0.2 --outdir out/p    # f(y + sigma eps)
  python sid.py project --ckpt RUN --input img.png --repeat 2 --outdir out/p2   # f(f(y))
  python sid.py project --ckpt RUN --input pts.npy --sigma 0.1 --outdir out/pp  # toy points"""),
    'evaluate': ("""Score a generator in memory, as the papers do: FID, the Inception Score and
precision/recall over --trials sets of --num images (trial t: seeds t*num .. (t+1)*num - 1), with
the authors' FID beside ours for a released generator (python sid.py --list).""", """examples:
  python sid.py evaluate --ckpt sid-cifar10-uncond-a1.2 --metrics fid,is --trials 10
  python sid.py evaluate --ckpt sid-imagenet64-a1.2 --metrics fid,pr        # PR: OpenAI's batch
  python sid.py evaluate --ckpt RUN --steps 2 --sigmas 0.5                 # SIGN: 2 steps"""),
}

METAVARS = dict(dataset='NAME', method='NAME', teacher='PKL', data='PATH', init_generator='RUN',
                net_overrides='JSON', precision='PREC', device='DEV', outdir='DIR', resume='RUN',
                fid_ref='NPZ', batch='IMAGES', batch_gpu='IMAGES', vae='VAE', P_mean='MEAN',
                P_std='STD')

def options_parser(defaults, prog, epilog, description):
    """sid.Config's options: one per field, grouped by its metadata, with its help, a metavar
    saying what the value is (units MIMG/KIMG from the name), switches as --flag/--no-flag, and the
    chosen preset's default. Every default is None, so resolve_config sees only what is given."""
    p = argparse.ArgumentParser(prog=prog, epilog=epilog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry-run', action='store_true', help='print the resolved options and exit')
    groups = {g: p.add_argument_group(g) for g in ('method', 'data', 'training', 'speed', 'output')}
    for f in dataclasses.fields(defaults):
        if f.name.endswith('_mimg'):
            unit = 'MIMG'
        elif f.name.endswith('_kimg'):
            unit = 'KIMG'
        else:
            unit = METAVARS.get(f.name, f.type.__name__.upper())
        if f.type is bool:
            kw = dict(action=argparse.BooleanOptionalAction)
        else:
            kw = dict(type=f.type, metavar=unit)
        help = f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})"
        groups[f.metadata['group']].add_argument('--' + f.name.replace('_', '-'), default=None,
                                                 help=help, **kw)
    return p

def one_line_errors(fn):
    """Run a command: bad input (and any error raised on purpose) is one line on stderr and exit
    code 2; Ctrl-C is one line and exit code 130 (128 + SIGINT, the shell's code for an interrupted
    command, so a calling script stops and does not take it for bad input); SID_DEBUG=1 shows the
    traceback."""
    try:
        return fn()
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError, MemoryError) as e:
        if os.environ.get('SID_DEBUG'):
            raise
        msg = str(e).strip().splitlines()
        print(f'error: {msg[0] if msg else type(e).__name__}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if os.environ.get('SID_DEBUG'):
            raise
        print(str(e) or 'interrupted', file=sys.stderr)
        sys.exit(130)

def train_command(argv):
    pre = argparse.ArgumentParser(add_help=False)  # the preset decides the defaults --help shows
    for k in ('dataset', 'method', 'init_generator'):
        pre.add_argument('--' + k.replace('_', '-'), default=getattr(sid.Config, k))
    pre.add_argument('--fast', action='store_true')
    try:
        defaults = sid.Config(**sid.preset(**vars(pre.parse_known_args(argv)[0])))
    except ValueError:
        defaults = sid.Config()
    description = ('SiD / SiDA / SIGN distillation of an EDM or EDM2 teacher into a one-step '
                   f'generator (defaults for --dataset {defaults.dataset} --method '
                   f'{defaults.method}).')
    policy = textwrap.fill(resume_policy_text(), 100, initial_indent='  ', subsequent_indent='  ',
                           break_on_hyphens=False)
    epilog = f'{EXAMPLES}\n\nresume:\n{policy}'
    args = vars(options_parser(defaults, 'sid.py', epilog, description).parse_args(argv))
    dry = args.pop('dry_run')
    cfg = resolve_config(args)
    if dry:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    if cfg.dataset in toy.WORLDS and 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(1)  # tiny networks: a second thread only spins
    train(cfg)

def tools_parser(cmd):
    head, examples = TOOLS[cmd]
    p = argparse.ArgumentParser(prog=f'sid.py {cmd}', description=head, epilog=examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True,
                   help='run folder (best, else latest snapshot), network-snapshot-*.pt, EDM/SiD '
                   '.pkl, or a released generator (python sid.py --list)')
    p.add_argument('--device', default='', help="cuda | cpu ('': cuda if available)")
    if cmd in ('generate', 'project'):
        p.add_argument('--outdir', required=True, help='new or empty output folder')
        p.add_argument('--class-idx', type=int, default=None,
                       help='class of a conditional generator (generate: else random per seed)')
    if cmd in ('generate', 'evaluate'):
        p.add_argument('--steps', type=int, default=0,
                       help='SIGN: number of steps, with steps-1 --sigmas (default: 1)')
        p.add_argument('--sigmas', default='',
                       help='SIGN: noise levels between the steps, e.g. 0.8,0.2')
        p.add_argument('--batch', type=int, default=64,
                       help='images per forward pass (default: 64)')
        p.add_argument('--vae', default='',
                       help="EDM2 latents: the VAE ('': stabilityai/sd-vae-ft-mse; a folder, a "
                       "Hugging Face name, or 'random' for checks)")
    if cmd == 'generate':
        p.add_argument('--seeds', default='0-63',
                       help='seeds, e.g. 0-49999 or 1,5,10-19 (default: 0-63)')
        p.add_argument('--grid', action='store_true',
                       help='one grid.png instead of one PNG per seed')
    elif cmd == 'project':
        p.add_argument('--input', required=True,
                       help='an image, a folder of images, or a 2-D toy .npy of points [N, 2]')
        p.add_argument('--sigma', type=float, default=0.0,
                       help='noise added before each projection (default: 0, plain f(y))')
        p.add_argument('--repeat', type=int, default=1,
                       help=f'projections in a row, at most {MAX_REPEAT} (default: 1)')
        p.add_argument('--seed', type=int, default=0, help='seed of the added noise (default: 0)')
    else:
        p.add_argument('--metrics', default='fid',
                       help='comma-separated: fid, is (Inception Score, 10 splits), pr '
                       '(precision/recall, k=3) (default: fid)')
        p.add_argument('--num', type=int, default=50000,
                       help='images per trial; trial t uses seeds t*num .. (t+1)*num-1 '
                       '(default: 50000)')
        p.add_argument('--trials', type=int, default=1,
                       help='trials of fresh images, reported as mean and std (official: 10; '
                       'default: 1)')
        p.add_argument('--ref', default=None,
                       help="FID reference: preset or .npz (default: the generator's dataset's)")
        p.add_argument('--pr-ref', default=None,
                       help="real images for pr: OpenAI .npz batch, dataset or folder "
                       "(default: OpenAI's batch for ImageNet 64)")
        p.add_argument('--pr-detector', default='inception',
                       help='features for pr: inception (as SiD), vgg16 (as StyleGAN2-ADA) or a '
                       'TorchScript file (default: inception)')
        p.add_argument('--detector', default=None,
                       help='local Inception .pt (default: $SID_DETECTOR or NVIDIA\'s URL)')
        p.add_argument('--trust-detector', action='store_true',
                       help="run TorchScript detectors other than NVIDIA's (TorchScript is code; "
                       'also $SID_TRUST_DETECTOR=1)')
        p.add_argument('--out', default=None, help='also write the results to this new .json')
    return p

def main(argv=None):
    """`python sid.py [options]` trains; `python sid.py generate|project|evaluate ...` use a
    generator; `python sid.py --list` lists the released generators."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv == ['--list']:
        print('\n'.join(releases.table()))
        return
    if argv[:1] in (['generate'], ['project'], ['evaluate']):
        cmd = argv.pop(0)
        args = tools_parser(cmd).parse_args(argv)
        command = dict(generate=cmd_generate, project=cmd_project, evaluate=cmd_evaluate)[cmd]
        one_line_errors(lambda: command(args))
        return
    one_line_errors(lambda: train_command(argv))

if __name__ == '__main__':
    main()
