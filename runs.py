"""The run driver above sid.py: command line, run folders, ticks, FID, snapshots, resume, generate.

sid.py's loop yields after every iteration; this file logs and saves (smalldiffusion's pattern): the
command line and its one-line errors, the options from presets and resume, the run folder, status
lines and stats.jsonl, FID, snapshots and training states, the toys' reports, and the `generate`
and `project` commands. `python sid.py ...` hands over to `main` here.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import data
import draw
import edm_nets
import fid
import fileio
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
    sign_start: dict = None  # SIGN on a toy: IGN's errors before training (None when resumed)
    start_time: float = 0.0  # when training started (time.time())
    tick_index: int = 0      # the number of the next status line
    tick_nimg: int = 0       # images seen at the last status line
    tick_time: float = 0.0   # the time of the last status line
    tick_iters: int = 0      # iterations since the last status line
    tick_sums: torch.Tensor = None  # their summed logged losses (fake, G, extra), float64

#----------------------------------------------------------------------------
# Options: defaults <- presets <- command line, or a resumed run's saved options <- what may change.

# What a resumed run may change; anything else would change its maths. (--fast would change the
# precision, and SiDA's losses depend on --batch-gpu: see resumed_options.)
RESUMABLE = {'resume', 'outdir', 'data', 'duration_mimg', 'tick_kimg', 'snap_kimg',
             'fid_every_kimg', 'fid_num', 'fid_ref', 'device', 'batch_gpu', 'compile',
             'checkpointing', 'channels_last', 'fused_adam'}

def resolve_config(overrides):
    """The run's Config: sid.make_config of the command line's options (None: not given), or, with
    --resume, of the saved ones with the allowed changes; a new numbered folder without --outdir."""
    over = {k: v for k, v in overrides.items() if v is not None}
    if over.get('resume'):
        over = resumed_options(over)
    cfg = sid.make_config(over)
    cfg.outdir = cfg.outdir or new_run_dir('runs', f'{cfg.dataset}-{cfg.method}')
    net_overrides(cfg)  # a bad JSON fails here, before anything is loaded
    return cfg

def resumed_options(over):
    """The saved options of the run being resumed, with the command line's changes of RESUMABLE
    fields; any other change is refused in one line."""
    folder = over['resume'] if os.path.isdir(over['resume']) else os.path.dirname(over['resume'])
    saved = read_json(os.path.join(folder, 'config.json'), '--resume')
    saved = {k: v for k, v in saved.items() if k in sid.Config.__dataclass_fields__}
    changed = sorted('--' + k.replace('_', '-') for k, v in over.items()
                     if k not in RESUMABLE and k in saved and v != saved[k])
    if changed:
        raise ValueError(f'--resume: the run used other values of {", ".join(changed)}; a resumed '
                         'run keeps its maths (start a new run)')
    batch_gpu = saved.get('batch_gpu')
    if saved.get('method') == 'sida' and over.get('batch_gpu', batch_gpu) != batch_gpu:
        raise ValueError(f"--resume: SiDA's losses are means over each micro-batch, so --batch-gpu "
                         f'must stay {batch_gpu}')
    return {**saved, **over, 'outdir': over.get('outdir') or folder}

def net_overrides(cfg):
    """--net-overrides as network arguments, checked."""
    return checkpoints.parse_net_overrides(cfg.net_overrides, sid.PRESETS[cfg.dataset].get('teacher'))

#----------------------------------------------------------------------------
# A run's files: config.json, stats.jsonl, snapshots (G_ema with its network arguments, read back
# by checkpoints.load_checkpoint) and the training state. Every file is written atomically.

def new_run_dir(parent, desc):
    """EDM's convention: parent/NNNNN-desc, one more than the largest number there."""
    names = os.listdir(parent) if os.path.isdir(parent) else []
    nums = [int(m.group(1)) for d in names if (m := re.match(r'(\d+)-', d))]
    return os.path.join(parent, f'{max(nums, default=-1) + 1:05d}-{desc}')

def check_outdir(cfg):
    """A new run never goes into another run's folder (checked before anything heavy)."""
    if not cfg.resume and os.path.exists(os.path.join(cfg.outdir, 'config.json')):
        raise ValueError(f'--outdir {cfg.outdir} holds a run: continue it with --resume '
                         f'{cfg.outdir}, or choose another')

def prepare_outdir(outdir):
    """A writable folder, a killed run's leftovers removed (rank 0, once the inputs are checked)."""
    os.makedirs(outdir, exist_ok=True)
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise ValueError(f'--outdir {outdir}: not writable')
    fileio.remove_stale_temporaries(outdir)

def read_json(path, what):
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
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
    with open(os.path.join(outdir, 'stats.jsonl'), 'a') as f:
        f.write(json.dumps(entry) + '\n')

def truncate_stats(path, kimg):
    """Drop the lines written after `kimg`: a resumed run continues from its training state, not
    from its last tick; a half line (the process was killed mid-append) goes too."""
    def kept(line):
        try:
            return json.loads(line).get('kimg', 0) <= kimg + 1e-9 and line.endswith('\n')
        except ValueError:
            return False
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if kept(line)]
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

def read_training_state(path, objects, device):
    """Load a training state into `objects` (name -> module or optimiser) -> dict(cur_nimg,
    data_images, fid, frames). A missing, foreign or corrupt file gives one line naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--resume: no training state at {path}')
    try:
        st = torch.load(path, map_location=device, weights_only=True)
        for key, obj in objects.items():
            obj.load_state_dict(st[key])
        return dict(cur_nimg=int(st['cur_nimg']), data_images=int(st['data_images']),
                    fid=[(float(m), float(v)) for m, v in st.get('fid', [])],
                    frames=[(str(t), torch.as_tensor(x).float()) for t, x in st.get('frames', [])])
    except Exception as e:  # torch.load and load_state_dict raise many types for foreign files
        msg = str(e).strip().splitlines()
        first = msg[0][:200] if msg else ''
        raise ValueError(f'--resume: {path} is not a training state of this run '
                         f'({type(e).__name__}: {first})') from None

def snapshot_path(path):
    """A run folder -> its best snapshot, else its latest; a file -> itself."""
    if not os.path.isdir(path):
        return path
    if os.path.exists(os.path.join(path, 'network-snapshot-best.pt')):
        return os.path.join(path, 'network-snapshot-best.pt')
    snaps = sorted(f for f in os.listdir(path) if re.fullmatch(r'network-snapshot-\d+\.pt', f))
    if not snaps:
        raise FileNotFoundError(f'no network-snapshot-*.pt in {path}')
    return os.path.join(path, snaps[-1])

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

def generator_fid(G, num, sigma_init, tools, device, rank=0, world_size=1):
    """FID of G on `num` images from seeds 0.. (own generators: the training stream is untouched);
    tools = (reference mu, reference sigma, detector)."""
    def make(seeds):
        return sample_images(G, seeds, sigma_init, device)
    return fid.fid_of_generator(make, num, *tools, device, batch=64, rank=rank,
                                world_size=world_size)

#----------------------------------------------------------------------------
# Start: options checked, inputs loaded (teacher, SiD²A generator, data, FID reference), the
# loop's State built and resumed; only then the run folder and its config.json (a failed start
# leaves nothing behind).

def start(cfg, nets=None):
    """-> (run, s), the driver's and the loop's state. nets: (f_phi, G, f_psi) instead of the
    teacher's (tests); a toy dataset still gets its world (data, figures)."""
    procs = sid.init_processes(cfg)
    run = Run(cfg=cfg, log=print if procs['rank'] == 0 else silent)
    if procs['batch_gpu'] < cfg.batch_gpu:
        run.log(f"--batch-gpu {cfg.batch_gpu} > --batch {cfg.batch} / {procs['world_size']} GPUs: "
                f"using micro-batches of {procs['batch_gpu']}")
    if procs['rank'] == 0:
        check_outdir(cfg)
    if cfg.dataset in toy.WORLDS:
        run.world = toy.WORLDS[cfg.dataset]()
    if nets is None:
        nets = load_networks(cfg, run.world, procs['device'])
    s = sid.setup(cfg, nets, procs)
    if cfg.resume:
        resume(run, s)
    s.data = open_data(run, s)
    if cfg.fid_every_kimg > 0:  # reference and detector now: a bad --fid-ref fails before training
        ref = cfg.fid_ref or sid.PRESETS[cfg.dataset]['fid_ref']
        run.fid_tools = (*fid.load_ref(ref), fid.load_detector(s.device))
    if s.rank == 0:
        prepare_outdir(cfg.outdir)
        if cfg.resume:
            truncate_stats(os.path.join(cfg.outdir, 'stats.jsonl'), s.cur_nimg / 1e3)
        write_json(os.path.join(cfg.outdir, 'config.json'), dataclasses.asdict(cfg))
    run.written = ['config.json']
    if run.world is not None and not cfg.resume:
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
    return run, s

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
    G_state = None
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
    objects = dict(G=s.G, G_ema=s.G_ema, f_psi=s.f_psi, opt_G=s.opt_G, opt_psi=s.opt_psi)
    st = read_training_state(path, objects, s.device)
    if st['cur_nimg'] >= s.end_nimg:
        raise ValueError(f"--resume: the run already reached {st['cur_nimg'] / 1e6:g} Mimg; pass a "
                         f"longer --duration-mimg")
    s.cur_nimg = st['cur_nimg']
    s.data_batches = st['data_images'] // (s.batch_gpu * s.world_size)
    run.fid = st['fid']
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
    images, labels = data.load_dataset(cfg.data)
    labels = data.check_dataset_matches(images, labels, s.f_phi)
    return data.infinite_batches(images, labels, s.batch_gpu, cfg.seed, s.rank, s.world_size,
                                     start=s.data_batches, pin=s.device.type == 'cuda')

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
    """Run (or resume) a distillation to its end -> (run, s), the driver's and the loop's state."""
    run, s = start(cfg, nets)
    for it in sid.iterate(s):
        maintain(run, s, it)
    finish(run, s)
    return run, s

def maintain(run, s, it):
    """After an iteration: each task whose interval this iteration crossed (or the run's end)."""
    cfg = s.cfg
    run.tick_sums += torch.stack([it.loss_fake, it.loss_G, it.loss_extra])
    run.tick_iters += 1
    done = s.cur_nimg >= s.end_nimg

    def crossed(kimg):
        every = max(round(kimg * 1e3), 1)
        return kimg > 0 and (done or s.cur_nimg // every > (s.cur_nimg - cfg.batch) // every)

    if run.world is not None and crossed(cfg.duration_mimg * 1e3 / 40):  # 40 frames for the GIF
        run.frames.append((f'{s.cur_nimg / 1e3:.4g} kimg', run.world.observe(s.G_ema,
                                                                             cfg.sigma_init)))
    if crossed(cfg.tick_kimg):
        report_tick(run, s)
    if crossed(cfg.fid_every_kimg):
        fid_step(run, s)
    if crossed(cfg.snap_kimg) and s.rank == 0:
        save_checkpoint(run, s)

def report_tick(run, s):
    """The status line and stats.jsonl entry: mean losses of the tick's iterations, time, memory."""
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
    if s.device.type == 'cuda':
        e['mem_gb'] = torch.cuda.max_memory_allocated(s.device) / 2 ** 30
    eta = fmt_time(sec_per_kimg * (s.end_nimg - s.cur_nimg) / 1e3)
    run.log(f"tick {run.tick_index:<4d} kimg {e['kimg']:<9.1f} time {fmt_time(e['time']):<7s} "
            f"sec/kimg {sec_per_kimg:<7.3g} eta {eta:<7s} loss_fake {loss_fake:<9.4g} "
            f"loss_G {loss_G:<+9.4g}"
            + ''.join(f' {k} {e[k]:.4g}' for k in ('loss_gan', 'loss_ign', 'mem_gb') if k in e))
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
    writer(os.path.join(run.cfg.outdir, name), *args)
    if name not in run.written:
        run.written.append(name)

def save_checkpoint(run, s):
    """Snapshot and training state, named by the images seen (names never collide), and for images
    a grid of 64 samples."""
    cfg = s.cfg
    save(run, f'network-snapshot-{s.cur_nimg:09d}.pt', save_snapshot, s.G_ema, s.cur_nimg, cfg)
    save(run, 'training-state.pt', write_training_state, run, s)
    if s.G.img_resolution:
        images = fid.to_uint8(sample_images(s.G_ema, range(64), cfg.sigma_init, s.device)).cpu()
        save(run, f'samples-{s.cur_nimg:09d}.png', fileio.save_png, images)

def fid_step(run, s):
    """FID of G_ema (all ranks share the work), logged and plotted; the best snapshot kept (over
    the whole history: a resumed run restores it)."""
    cfg = s.cfg
    value = generator_fid(s.G_ema, cfg.fid_num, cfg.sigma_init, run.fid_tools, s.device, s.rank,
                          s.world_size)
    run.fid.append((s.cur_nimg / 1e6, value))
    run.log(f'FID {value:.3f} at {s.cur_nimg / 1e3:.1f} kimg')
    if s.rank == 0:
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

#----------------------------------------------------------------------------
# The commands `python sid.py generate|project` (a trained generator) and their arguments.

MAX_SEEDS = 10_000_000

def parse_seeds(text):
    """'0-49999' or '1,5,10-19' -> list of ints (the count is checked before the list is made)."""
    try:
        ranges = [(int(a), int(b or a)) for a, _, b in (p.partition('-') for p in text.split(','))]
    except ValueError:
        ranges = [(1, 0)]
    if any(lo < 0 or hi < lo for lo, hi in ranges):
        raise ValueError(f"bad --seeds '{text}': use e.g. 0-49999 or 1,5,10-19 (non-negative, "
                         "increasing)")
    if sum(hi - lo + 1 for lo, hi in ranges) > MAX_SEEDS:
        raise ValueError(f'--seeds {text}: more than {MAX_SEEDS} images')
    return [s for lo, hi in ranges for s in range(lo, hi + 1)]

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

def open_generator(a):
    """(G on its device, the run's sigma_init, device) for --ckpt, after the cheap checks."""
    if a.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {a.device}: CUDA is not available here')
    if os.path.isdir(a.outdir) and os.listdir(a.outdir):
        raise ValueError(f'--outdir {a.outdir} is not empty: choose a new folder (nothing is '
                         'overwritten)')
    G, info = checkpoints.load_checkpoint(snapshot_path(a.ckpt))
    if a.class_idx is not None and not 0 <= a.class_idx < G.label_dim:
        if G.label_dim:
            raise ValueError(f'--class-idx {a.class_idx}: this generator has classes 0..'
                             f'{G.label_dim - 1}')
        raise ValueError(f'--class-idx {a.class_idx}: this generator is unconditional')
    device = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    return G.to(device), info.get('config', {}).get('sigma_init', 2.5), device

def cmd_generate(a):
    seeds, sigmas = parse_seeds(a.seeds), parse_sigmas(a.sigmas, a.steps)
    if a.batch < 1:
        raise ValueError(f'--batch must be >= 1, got {a.batch}')
    G, sigma_init, device = open_generator(a)
    os.makedirs(a.outdir, exist_ok=True)
    if not G.img_resolution:  # the 2-D toy: points and a picture
        x = sample_images(G, seeds, sigma_init, device, None, sigmas).cpu()
        with fileio.atomic_write(os.path.join(a.outdir, 'samples.npy')) as f:
            np.save(f, x.numpy())
        picture = draw.samples_picture(x, toy.ToyMixture())
        write_file(os.path.join(a.outdir, 'samples.png'), picture)
        print(f'wrote {len(seeds)} points to {a.outdir}/samples.npy and samples.png')
        return
    grid = []
    for i in range(0, len(seeds), a.batch):
        part = seeds[i:i + a.batch]
        # oneDNN's CPU convolutions round differently per batch size; the native ones differ less
        # (a seed's image may still move by one grey level between batch splits)
        mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = device.type != 'cpu'
        try:
            x = sample_images(G, part, sigma_init, device, a.class_idx, sigmas)
        finally:
            torch.backends.mkldnn.enabled = mkldnn
        x = fid.to_uint8(x).cpu()
        if a.grid:
            grid.append(x)
            continue
        for seed, im in zip(part, x):
            fileio.save_png(os.path.join(a.outdir, f'{seed:06d}.png'), im)
    if a.grid:
        fileio.save_png(os.path.join(a.outdir, 'grid.png'), torch.cat(grid))
    print(f"wrote {len(seeds)} images to {a.outdir}{'/grid.png' if a.grid else ''}")

def cmd_project(a):
    """SIGN projection / editing: f(y + sigma*eps), `repeat` times, for each input image (or the
    toy's .npy points)."""
    if not (math.isfinite(a.sigma) and a.sigma >= 0) or a.repeat < 1:
        raise ValueError(f'need a finite --sigma >= 0 and --repeat >= 1, got {a.sigma} and '
                         f'{a.repeat}')
    if not os.path.exists(a.input):
        raise FileNotFoundError(f'--input not found: {a.input}')
    G, sigma_init, device = open_generator(a)
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
    if G.label_dim and a.class_idx is None:
        raise ValueError(f'this generator is class-conditional: pass --class-idx in [0, '
                         f'{G.label_dim})')
    c = None
    if G.label_dim:
        c = F.one_hot(torch.tensor([a.class_idx]), G.label_dim).float().to(device)
    images = []  # read (and check) every input before writing anything
    for path in files:
        y = fileio.read_image(path, path)
        if list(y.shape) != G.img_shape:
            raise ValueError(f'{path}: image of shape {list(y.shape)} (C,H,W), the generator makes '
                             f'{G.img_shape}')
        images.append(torch.from_numpy(y.copy()).float() / 127.5 - 1)  # [-1, 1], as G's range
    os.makedirs(a.outdir, exist_ok=True)

    def f(v):
        return sid.generate(G, v, c, sigma_init)

    for path, y in zip(files, images):
        x = sid.project(f, y[None].to(device), a.sigma, gen, a.repeat)
        name = os.path.basename(path).rsplit('.', 1)[0] + '.png'
        fileio.save_png(os.path.join(a.outdir, name), fid.to_uint8(x)[0].cpu())
    print(f'wrote {len(files)} projected image(s) to {a.outdir}')

def project_points(a, G, sigma_init, device, gen):
    y = np.load(a.input, allow_pickle=False)
    if y.ndim != 2 or y.shape[1] != G.img_channels or G.img_resolution:
        raise ValueError(f'{a.input}: expected points [N, {G.img_channels}] for a 2-D toy '
                         f'generator, got {list(y.shape)}')

    def f(v):
        return sid.generate(G, v, None, sigma_init)

    x = sid.project(f, torch.from_numpy(y).float().to(device), a.sigma, gen, a.repeat)
    os.makedirs(a.outdir, exist_ok=True)
    with fileio.atomic_write(os.path.join(a.outdir, 'projected.npy')) as fh:
        np.save(fh, x.cpu().numpy())
    print(f'wrote {len(x)} projected points to {a.outdir}/projected.npy')

#----------------------------------------------------------------------------
# The command line: `python sid.py [options]` trains; `python sid.py generate|project` use a trained
# generator. Training options come from sid.Config, grouped, with the chosen preset's defaults.

EXAMPLES = """examples:
  python sid.py --dataset toy                                  # 2-D toy, exact teacher, CPU, ~15 s
  python sid.py --dataset toy --method sign --dry-run          # print the resolved options and stop
  torchrun --nproc_per_node=4 sid.py --dataset cifar10 --fast  # SiD on EDM's CIFAR-10 teacher, GPU
  python sid.py --dataset cifar10 --method sida --init-generator runs/00001-cifar10-sid   # SiD²A
  python sid.py --resume runs/00001-cifar10-sid --duration-mimg 600         # continue, for longer
  python sid.py generate --help ; python sid.py project --help              # a trained generator"""

TOOLS = {  # `sid.py generate|project --help`: what the command does, and examples
    'generate': ("""Sample a trained one-step generator: x = G(sigma_init * eps; sigma_init) for
each seed, one PNG per seed (each seed has its own random generator for its latent and label, as
EDM's generate.py) or one grid.png. With --steps K, SIGN's multi-step sampling: K calls of G with
re-noising at --sigmas between them. For a 2-D toy generator: samples.npy (the points) and
samples.png (the points over the true density, with the toy's figures; the energy distance is
taken on the first 2000 points, so any --seeds stays cheap).""", """examples:
  python sid.py generate --ckpt RUN --seeds 0-49999 --outdir out/c10         # one PNG per seed
  python sid.py generate --ckpt RUN --seeds 0-63 --grid --outdir out/grid     # one grid.png
  python sid.py generate --ckpt RUN --seeds 0-99 --class-idx 3 --outdir out/c3  # one class
  python sid.py generate --ckpt RUN --steps 3 --sigmas 0.8,0.2 --outdir out/3   # SIGN: 3 steps"""),
    'project': ("""SIGN's projection (zero-shot editing): apply the trained generator f to given
images (or a 2-D toy's points) y: y <- f(y + sigma * eps), --repeat times. An idempotent f maps
its input into the set it generates, so a corrupted image comes back as an image f makes
(ideally a close one). Writes one PNG per input image (projected.npy for points).""", """examples:
  python sid.py project --ckpt RUN --input noisy/ --sigma 0.2 --outdir out/p    # f(y + sigma eps)
  python sid.py project --ckpt RUN --input img.png --repeat 2 --outdir out/p2   # f(f(y))
  python sid.py project --ckpt RUN --input pts.npy --sigma 0.1 --outdir out/pp  # toy points"""),
}

METAVARS = dict(dataset='NAME', method='NAME', teacher='PKL', data='PATH', init_generator='RUN',
                net_overrides='JSON', precision='PREC', device='DEV', outdir='DIR', resume='RUN',
                fid_ref='NPZ', batch='IMAGES', batch_gpu='IMAGES')

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
    code 2; SID_DEBUG=1 shows the traceback."""
    try:
        return fn()
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as e:
        if os.environ.get('SID_DEBUG'):
            raise
        msg = str(e).strip().splitlines()
        print(f'error: {msg[0] if msg else type(e).__name__}', file=sys.stderr)
        sys.exit(2)

def train_command(argv):
    pre = argparse.ArgumentParser(add_help=False)  # the preset decides the defaults --help shows
    for k in ('dataset', 'method', 'init_generator'):
        pre.add_argument('--' + k.replace('_', '-'), default=getattr(sid.Config, k))
    pre.add_argument('--fast', action='store_true')
    try:
        defaults = sid.Config(**sid.preset(**vars(pre.parse_known_args(argv)[0])))
    except ValueError:
        defaults = sid.Config()
    description = ('SiD / SiDA / SIGN distillation of an EDM teacher into a one-step generator '
                   f'(defaults for --dataset {defaults.dataset} --method {defaults.method}).')
    args = vars(options_parser(defaults, 'sid.py', EXAMPLES, description).parse_args(argv))
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
                   help='run folder (best, else latest snapshot), network-snapshot-*.pt or EDM/SiD '
                   '.pkl')
    p.add_argument('--outdir', required=True, help='new or empty output folder')
    p.add_argument('--class-idx', type=int, default=None,
                   help='class of a conditional generator (generate: else random per seed)')
    p.add_argument('--device', default='', help="cuda | cpu ('': cuda if available)")
    if cmd == 'generate':
        p.add_argument('--seeds', default='0-63',
                       help='seeds, e.g. 0-49999 or 1,5,10-19 (default: 0-63)')
        p.add_argument('--grid', action='store_true',
                       help='one grid.png instead of one PNG per seed')
        p.add_argument('--steps', type=int, default=0,
                       help='SIGN: number of steps, with steps-1 --sigmas (default: 1)')
        p.add_argument('--sigmas', default='',
                       help='SIGN: noise levels between the steps, e.g. 0.8,0.2')
        p.add_argument('--batch', type=int, default=64,
                       help='images per forward pass (default: 64)')
    else:
        p.add_argument('--input', required=True,
                       help='an image, a folder of images, or a 2-D toy .npy of points [N, 2]')
        p.add_argument('--sigma', type=float, default=0.0,
                       help='noise added before each projection (default: 0, plain f(y))')
        p.add_argument('--repeat', type=int, default=1, help='projections in a row (default: 1)')
        p.add_argument('--seed', type=int, default=0, help='seed of the added noise (default: 0)')
    return p

def main(argv=None):
    """`python sid.py [options]` trains; `python sid.py generate|project ...` use a generator."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] in (['generate'], ['project']):
        cmd = argv.pop(0)
        args = tools_parser(cmd).parse_args(argv)
        command = cmd_project if cmd == 'project' else cmd_generate
        one_line_errors(lambda: command(args))
        return
    one_line_errors(lambda: train_command(argv))

if __name__ == '__main__':
    main()
