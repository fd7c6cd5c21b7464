"""A run's life and products, around sid.py's maths: the SiD generator call, samples per seed as EDM's generate.py,
SIGN's multi-step sampling and projection, the FID of a generator; the run's folder, status lines, snapshots,
training state and resume; and the `generate` and `project` commands.

    python sid.py generate --ckpt RUN --seeds 0-49999 --outdir out/c10           # one PNG per seed (then fid.py calc)
    python sid.py generate --ckpt RUN --seeds 0-63 --grid --outdir out/grid       # one grid.png
    python sid.py generate --ckpt RUN --steps 3 --sigmas 0.8,0.2 --outdir out/3   # SIGN: 3 steps, re-noised between
    python sid.py project --ckpt RUN --input noisy/ --sigma 0.2 --outdir out/proj  # SIGN: f(y + sigma eps)
"""
import argparse, dataclasses, json, math, os, re, sys, time, types
import numpy as np
import torch
import torch.nn.functional as F

import checkpoints, fid, fileio, toy

#----------------------------------------------------------------------------
# The SiD generator (SiD §4): EDM's denoiser at sigma_init applied to z = sigma_init * eps.

def generate(G, z, labels, sigma_init):
    """One-step generation x_g = G(z; sigma_init) with z = sigma_init * eps (SiD §4): EDM's denoiser at sigma_init."""
    # contiguous: a channels_last net returns NHWC memory, and randn_like(x_g) would draw other numbers
    return G(z, z.new_full([z.shape[0]] + [1] * (z.dim() - 1), sigma_init), labels).contiguous()

#----------------------------------------------------------------------------
# SIGN's uses of an idempotent generator f (Zaman et al. 2025; IGN, Shocher et al. 2024): multi-step sampling,
# projection (editing) of corrupted inputs, and IGN's two diagnostics.

@torch.no_grad()
def multistep_sample(f, z, sigmas=(), noises=None):
    """x_1 = f(z), x_{k+1} = f(x_k + sigmas[k-1] * noises[k-1]): K = len(sigmas) + 1 calls (IGN's re-application
    with fresh noise, as in consistency models). noises=None draws torch.randn. Returns [x_1, ..., x_K]."""
    xs = [f(z)]
    for k, s in enumerate(sigmas):
        xs.append(f(xs[-1] + s * (torch.randn_like(xs[-1]) if noises is None else noises[k])))
    return xs

@torch.no_grad()
def project(f, y, sigma=0.0, noise=None, repeat=1):
    """Projection / zero-shot editing: y <- f(y + sigma * eps_k), `repeat` times (sigma = 0: plain projection f(y)).
    noise: a list of `repeat` tensors, a torch.Generator on y's device, or None."""
    for k in range(repeat):
        if sigma > 0:
            eps = noise[k] if isinstance(noise, (list, tuple)) else torch.randn(y.shape, generator=noise, device=y.device)
            y = y + sigma * eps
        y = f(y)
    return y

@torch.no_grad()
def sign_evaluation(f, z, x_data, sigmas, noises, noise_proj, sigma_proj=0.2, corrupted=None):
    """IGN's two properties and SIGN's uses: idempotence error E|f(f(z)) - f(z)|, fixed-point error E|f(x) - x| on
    data, multi-step samples, the projection of data + sigma_proj * eps, and of other corruptions of the data
    (corrupted: name -> inputs; returned as name -> (inputs, projections))."""
    xs, y = multistep_sample(f, z, sigmas, noises), x_data + sigma_proj * noise_proj
    err = lambda a, b: float((a - b).flatten(1).norm(dim=1).mean())
    return dict(idem=err(f(xs[0]), xs[0]), fix=err(f(x_data), x_data), steps=xs, data=x_data, noisy=y, projected=project(f, y),
                corrupted={k: (v, project(f, v)) for k, v in (corrupted or {}).items()})

#----------------------------------------------------------------------------
# Samples from seeds, as EDM's generate.py: one random generator per seed for its latent, label and any re-noising,
# so an image depends on its seed only (sid.py's sample grids and FID use them too).

def sample_images(G, seeds, sigma_init, device, class_idx=None, sigmas=()):
    """G(z) for the seeds; with SIGN's `sigmas`, x_{k+1} = f(x_k + sigma_k eps_k) after the first step."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    z = torch.stack([torch.randn(G.img_shape, generator=g) for g in gens]).to(device) * sigma_init
    c = None
    if G.label_dim:
        idx = [class_idx if class_idx is not None else int(torch.randint(G.label_dim, (), generator=g)) for g in gens]
        c = F.one_hot(torch.tensor(idx), G.label_dim).float().to(device)
    noises = [torch.stack([torch.randn(G.img_shape, generator=g) for g in gens]).to(device) for _ in sigmas]
    return multistep_sample(lambda v: generate(G, v, c, sigma_init), z, sigmas, noises)[-1]

def generator_fid(G, num, sigma_init, tools, device, rank=0, world_size=1):
    """FID of G on `num` images from seeds 0.. (own generators: a training run's random stream is untouched);
    tools = (reference mu, reference sigma, detector)."""
    return fid.fid_of_generator(lambda seeds: sample_images(G, seeds, sigma_init, device), num, *tools, device,
                                batch=64, rank=rank, world_size=world_size)

def snapshot_path(path):
    """A run folder -> its best snapshot, else its latest; a file -> itself."""
    if not os.path.isdir(path):
        return path
    snaps = sorted(f for f in os.listdir(path) if re.fullmatch(r'network-snapshot-\d+\.pt', f))
    if os.path.exists(os.path.join(path, 'network-snapshot-best.pt')):
        return os.path.join(path, 'network-snapshot-best.pt')
    if not snaps:
        raise FileNotFoundError(f'no network-snapshot-*.pt in {path}')
    return os.path.join(path, snaps[-1])

#----------------------------------------------------------------------------
# A run's files: config.json, stats.jsonl, snapshots (G_ema with its network arguments, read back by
# checkpoints.load_checkpoint) and the training state. Every file is written atomically (fileio.atomic_write).

def new_run_dir(parent, desc):
    """EDM's convention: a fresh numbered folder parent/NNNNN-desc, one more than the largest number there."""
    nums = [int(m.group(1)) for d in (os.listdir(parent) if os.path.isdir(parent) else []) if (m := re.match(r'(\d+)-', d))]
    return os.path.join(parent, f'{max(nums, default=-1) + 1:05d}-{desc}')

def read_json(path, what):
    try:
        with open(path) as f:
            obj = json.load(f)
        assert isinstance(obj, dict)
        return obj
    except (OSError, ValueError, AssertionError):
        raise ValueError(f'{what}: no readable {os.path.basename(path)} in {os.path.dirname(path) or "."}') from None

def write_json(path, obj):
    with fileio.atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2).encode())

def append_stats(outdir, entry):
    with open(os.path.join(outdir, 'stats.jsonl'), 'a') as f:
        f.write(json.dumps(entry) + '\n')

def truncate_stats(path, kimg):
    """Drop the lines written after `kimg`: a resumed run continues from its training state, not from its last tick."""
    def kept(line):  # a half line (the process was killed mid-append) goes too
        try:
            return json.loads(line).get('kimg', 0) <= kimg + 1e-9 and line.endswith('\n')
        except ValueError:
            return False
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if kept(line)]
        with fileio.atomic_write(path) as f:
            f.write(''.join(keep).encode())

def save_snapshot(path, G_ema, cur_nimg, cfg, fid_value=None):
    with fileio.atomic_write(path) as f:
        torch.save(dict(G_ema=G_ema.state_dict(), net_kwargs=dict(G_ema.init_kwargs, dropout=0.0), kimg=cur_nimg / 1e3,
                        fid=fid_value, config=dataclasses.asdict(cfg)), f)

def write_training_state(path, run):
    with fileio.atomic_write(path) as f:
        torch.save(dict(G=run.G.state_dict(), G_ema=run.G_ema.state_dict(), f_psi=run.f_psi.state_dict(),
                        opt_G=run.opt_G.state_dict(), opt_psi=run.opt_psi.state_dict(), cur_nimg=run.cur_nimg,
                        data_images=run.data_batches * run.batch_gpu * run.world_size, fid=run.stats_fid,
                        frames=run.toy.frames if run.toy is not None else []), f)

def read_training_state(path, objects, device):
    """Load a training state into `objects` (name -> module or optimiser) -> dict(cur_nimg, data_images, fid, frames).
    A missing, foreign or corrupt file gives one line naming it."""
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
        raise ValueError(f'--resume: {path} is not a training state of this run ({type(e).__name__}: '
                         f'{msg[0][:200] if msg else ""})') from None

#----------------------------------------------------------------------------
# A run's life on disk, for sid.py's loop (`run` is its namespace): the folder, status lines, FID and snapshots
# during training, and resume.

def prepare_outdir(outdir, resume, rank):
    """Rank 0: a writable folder that holds no other run; leftovers of a killed run removed."""
    if rank == 0:
        if not resume and os.path.exists(os.path.join(outdir, 'config.json')):
            raise ValueError(f'--outdir {outdir} holds a run: continue it with --resume {outdir}, or choose another')
        os.makedirs(outdir, exist_ok=True)
        if not os.access(outdir, os.W_OK | os.X_OK):
            raise ValueError(f'--outdir {outdir}: not writable')
        fileio.remove_stale_temporaries(outdir)

def start(run, ref):
    """The start-up line (options that differ from the preset `ref`, processes, micro-batches, size, folder), the
    tick clock of the status lines, and for SIGN on a toy the baseline of its end-of-run report."""
    cfg = run.cfg
    diff = ', '.join(f'{k}={v}' for k, v in dataclasses.asdict(cfg).items() if v != getattr(ref, k) and k != 'outdir')
    run.log(f'{cfg.method} on {cfg.dataset}{" with " + diff if diff else ""}; {run.world_size} process(es) on {run.device}, '
            f'{run.rounds} round(s) of {run.batch_gpu} per step; G {sum(p.numel() for p in run.G.parameters()) / 1e6:.2f}M '
            f'parameters; writing to {cfg.outdir}')
    run.tick = types.SimpleNamespace(nimg=run.cur_nimg, time=time.time(), start=time.time(), iters=0,
                                     index=round(run.cur_nimg / max(cfg.tick_kimg * 1e3, 1)),
                                     sums=torch.zeros(3, dtype=torch.float64, device=run.device))
    # SIGN on a toy: IGN's two errors before training too, for the report (unknown when resumed)
    fresh = run.toy is not None and cfg.method == 'sign' and run.cur_nimg == 0 and run.rank == 0
    run.sign_start = toy_sign_evaluation(run) if fresh else None

def toy_sign_evaluation(run):
    """sign_evaluation of G_ema on the toy world's fixed draws (no random numbers used: the run's stream is untouched)."""
    c = run.toy.sign_labels  # labels of the fixed draws (None: an unconditional world)
    return sign_evaluation(lambda v: generate(run.G_ema, v, c, run.cfg.sigma_init), *run.toy.sign_inputs())

def finish(run):
    """The end of a run: a toy's report (SIGN: IGN's properties, multi-step sampling and projection on fixed draws),
    the process group closed, one line listing what was written. -> the last namespace of sid.iterate."""
    cfg = run.cfg
    if run.toy is not None and run.rank == 0:
        sign = dict(toy_sign_evaluation(run), start=run.sign_start) if cfg.method == 'sign' else None
        run.written += [os.path.basename(p) for p in run.toy.report(cfg.outdir, run.log, sign)]
    if run.own_group:
        torch.distributed.destroy_process_group()
    run.log(f"wrote {cfg.outdir}: {', '.join(run.written)}")
    return types.SimpleNamespace(cur_nimg=run.cur_nimg, G=run.G, G_ema=run.G_ema, f_psi=run.f_psi)

def save(run, name, writer, *args):
    writer(os.path.join(run.cfg.outdir, name), *args)
    run.written += [] if name in run.written else [name]

def save_checkpoint(run):
    """Snapshot and training state, named by the images seen (names never collide), and for images a sample grid."""
    save(run, f'network-snapshot-{run.cur_nimg:09d}.pt', save_snapshot, run.G_ema, run.cur_nimg, run.cfg)
    save(run, 'training-state.pt', write_training_state, run)
    if run.G.img_resolution:
        images = fid.to_uint8(sample_images(run.G_ema, range(64), run.cfg.sigma_init, run.device)).cpu()
        save(run, f'samples-{run.cur_nimg:09d}.png', fileio.save_png, images)

def fid_step(run):
    """FID of G_ema (all ranks share the work), logged and plotted; the best snapshot kept."""
    cfg = run.cfg
    value = generator_fid(run.G_ema, cfg.fid_num, cfg.sigma_init, run.fid_tools, run.device, run.rank, run.world_size)
    run.stats_fid.append((run.cur_nimg / 1e6, value))
    run.log(f'FID {value:.3f} at {run.cur_nimg / 1e3:.1f} kimg')
    if run.rank == 0:
        append_stats(cfg.outdir, dict(kimg=run.cur_nimg / 1e3, fid=value))
        fid.plot_curve(run.stats_fid, os.path.join(cfg.outdir, 'fid.png'))
        if value <= min(v for _, v in run.stats_fid):
            save(run, 'network-snapshot-best.pt', save_snapshot, run.G_ema, run.cur_nimg, cfg, value)

def report_tick(run, extra_name=None):
    """The status line and stats.jsonl entry: mean losses of the tick's iterations, time, ETA, memory."""
    t = run.tick
    if run.world_size > 1:  # each rank summed its share (loss / n): the mean over ranks is the whole batch's loss
        check_ranks_agree((run.G, run.f_psi), f' at {run.cur_nimg / 1e3:.1f} kimg')
        torch.distributed.all_reduce(t.sums)
        t.sums /= run.world_size
    now, (loss_fake, loss_G, extra) = time.time(), (t.sums / t.iters).tolist()
    sec_per_kimg = (now - t.time) / max((run.cur_nimg - t.nimg) / 1e3, 1e-9)
    e = dict(tick=t.index, kimg=run.cur_nimg / 1e3, time=now - t.start, sec_per_kimg=sec_per_kimg, loss_fake=loss_fake,
             loss_G=loss_G, **({extra_name: extra} if extra_name else {}),
             **({'mem_gb': torch.cuda.max_memory_allocated(run.device) / 2 ** 30} if run.device.type == 'cuda' else {}))
    run.log(f"tick {t.index:<4d} kimg {e['kimg']:<9.1f} time {fmt_time(e['time']):<7s} sec/kimg {sec_per_kimg:<7.3g} "
            f"eta {fmt_time(sec_per_kimg * (run.end_nimg - run.cur_nimg) / 1e3):<7s} loss_fake {loss_fake:<9.4g} "
            f"loss_G {loss_G:<+9.4g}" + ''.join(f' {k} {e[k]:.4g}' for k in ('loss_gan', 'loss_ign', 'mem_gb') if k in e))
    if run.rank == 0:
        append_stats(run.cfg.outdir, e)
        run.written += [] if 'stats.jsonl' in run.written else ['stats.jsonl']
    t.nimg, t.time, t.iters, t.index = run.cur_nimg, now, 0, t.index + 1
    t.sums.zero_()

def fmt_time(s):
    s = int(round(s))
    return (f'{s}s' if s < 60 else f'{s // 60}m{s % 60:02d}s' if s < 3600 else f'{s // 3600}h{s // 60 % 60:02d}m'
            if s < 86400 else f'{s // 86400}d{s // 3600 % 24:02d}h')

@torch.no_grad()
def check_ranks_agree(nets, what=''):
    """Raise unless every rank holds bit-identical parameters (per-tensor float64 sums, all-gathered): DDP keeps
    replicas equal only if each steps on the same all-reduced gradients, and a desync would otherwise go unseen."""
    s = torch.stack([p.double().sum() for net in nets for p in net.parameters()])
    out = [torch.empty_like(s) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, s)
    if any(not torch.equal(o, out[0]) for o in out):
        raise RuntimeError(f'DDP replicas diverged{what}: rank(s) {[r for r, o in enumerate(out) if not torch.equal(o, out[0])]}')

def resume(run):
    """Weights, optimisers, images seen, data position, history (stats.jsonl is cut back to the state's point, the
    toy keeps its frames); the random draws follow from (seed, images seen)."""
    path = os.path.join(run.cfg.resume, 'training-state.pt') if os.path.isdir(run.cfg.resume) else run.cfg.resume
    st = read_training_state(path, dict(G=run.G, G_ema=run.G_ema, f_psi=run.f_psi, opt_G=run.opt_G, opt_psi=run.opt_psi),
                             run.device)
    if st['cur_nimg'] >= run.end_nimg:
        raise ValueError(f"--resume: the run already reached {st['cur_nimg'] / 1e6:g} Mimg; pass a longer --duration-mimg")
    run.cur_nimg, run.stats_fid = st['cur_nimg'], st['fid']
    run.data_batches = st['data_images'] // (run.batch_gpu * run.world_size)
    if run.toy is not None and st['frames']:
        run.toy.frames = st['frames']
    if run.rank == 0:
        truncate_stats(os.path.join(run.cfg.outdir, 'stats.jsonl'), run.cur_nimg / 1e3)
    run.log(f'resumed from {path} at {run.cur_nimg / 1e3:.1f} kimg')

#----------------------------------------------------------------------------
# The commands.

MAX_SEEDS = 10_000_000

def parse_seeds(text):
    """'0-49999' or '1,5,10-19' -> list of ints (the count is checked before the list is made)."""
    try:
        ranges = [(int(a), int(b or a)) for a, _, b in (part.partition('-') for part in text.split(','))]
    except ValueError:
        ranges = [(1, 0)]
    if any(lo < 0 or hi < lo for lo, hi in ranges):
        raise ValueError(f"bad --seeds '{text}': use e.g. 0-49999 or 1,5,10-19 (non-negative, increasing)")
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
        raise ValueError(f'--steps {steps} needs {steps - 1} noise levels in --sigmas, got {len(sigmas)}')
    return sigmas

def open_generator(a):
    """(G on its device, sigma_init, class label check) for --ckpt, after the cheap argument checks."""
    if a.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {a.device}: CUDA is not available here')
    if os.path.isdir(a.outdir) and os.listdir(a.outdir):
        raise ValueError(f'--outdir {a.outdir} is not empty: choose a new folder (nothing is overwritten)')
    G, info = checkpoints.load_checkpoint(snapshot_path(a.ckpt))
    if a.class_idx is not None and not 0 <= a.class_idx < G.label_dim:
        raise ValueError(f'--class-idx {a.class_idx}: ' + (f'this generator has classes 0..{G.label_dim - 1}' if G.label_dim
                                                          else 'this generator is unconditional'))
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
        T = toy.ToyMixture()
        toy.toy_picture([(f'{len(seeds)} samples', x, toy.figure_lines(toy.toy_figures(x, T)))], T, os.path.join(a.outdir, 'samples.png'))
        return print(f'wrote {len(seeds)} points to {a.outdir}/samples.npy and samples.png')
    grid = []
    for i in range(0, len(seeds), a.batch):
        # oneDNN's CPU convolutions round differently per batch size; the native ones make a seed's image
        # independent of the batch split (on CPU; GPU kernels give no such promise).
        mkldnn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, device.type != 'cpu'
        try:
            x = fid.to_uint8(sample_images(G, seeds[i:i + a.batch], sigma_init, device, a.class_idx, sigmas)).cpu()
        finally:
            torch.backends.mkldnn.enabled = mkldnn
        grid += [x] if a.grid else []
        for s, im in zip(seeds[i:i + a.batch], x if not a.grid else []):
            fileio.save_png(os.path.join(a.outdir, f'{s:06d}.png'), im)
    if a.grid:
        fileio.save_png(os.path.join(a.outdir, 'grid.png'), torch.cat(grid))
    print(f"wrote {len(seeds)} images to {a.outdir}{'/grid.png' if a.grid else ''}")

def cmd_project(a):
    """SIGN projection / editing: f(y + sigma*eps), `repeat` times, for each input image (or the toy's .npy points)."""
    if not (math.isfinite(a.sigma) and a.sigma >= 0) or a.repeat < 1:
        raise ValueError(f'need a finite --sigma >= 0 and --repeat >= 1, got {a.sigma} and {a.repeat}')
    if not os.path.exists(a.input):
        raise FileNotFoundError(f'--input not found: {a.input}')
    G, sigma_init, device = open_generator(a)
    gen = torch.Generator(device).manual_seed(a.seed)
    if a.input.endswith('.npy'):  # toy points [N, 2]
        y = np.load(a.input, allow_pickle=False)
        if y.ndim != 2 or y.shape[1] != G.img_channels or G.img_resolution:
            raise ValueError(f'{a.input}: expected points [N, {G.img_channels}] for a 2-D toy generator, got {list(y.shape)}')
        x = project(lambda v: generate(G, v, None, sigma_init), torch.from_numpy(y).float().to(device), a.sigma, gen, a.repeat)
        os.makedirs(a.outdir, exist_ok=True)
        with fileio.atomic_write(os.path.join(a.outdir, 'projected.npy')) as f:
            np.save(f, x.cpu().numpy())
        return print(f'wrote {len(x)} projected points to {a.outdir}/projected.npy')
    files = [a.input] if os.path.isfile(a.input) else sorted(
        os.path.join(a.input, f) for f in os.listdir(a.input) if f.lower().endswith(('.png', '.jpg', '.jpeg')))
    if not files:
        raise ValueError(f'--input {a.input}: no .png/.jpg images')
    if G.label_dim and a.class_idx is None:
        raise ValueError(f'this generator is class-conditional: pass --class-idx in [0, {G.label_dim})')
    c = F.one_hot(torch.tensor([a.class_idx]), G.label_dim).float().to(device) if G.label_dim else None
    images = []  # read (and check) every input before writing anything
    for path in files:
        y = fileio.read_image(path, path)
        if list(y.shape) != G.img_shape:
            raise ValueError(f'{path}: image of shape {list(y.shape)} (C,H,W), the generator makes {G.img_shape}')
        images.append(torch.from_numpy(y.copy()).float() / 127.5 - 1)
    os.makedirs(a.outdir, exist_ok=True)
    for path, y in zip(files, images):
        x = project(lambda v: generate(G, v, c, sigma_init), y[None].to(device), a.sigma, gen, a.repeat)
        fileio.save_png(os.path.join(a.outdir, os.path.basename(path).rsplit('.', 1)[0] + '.png'), fid.to_uint8(x)[0].cpu())
    print(f'wrote {len(files)} projected image(s) to {a.outdir}')

METAVARS = dict(dataset='NAME', method='NAME', teacher='PKL', data='PATH', init_generator='RUN', net_overrides='JSON',
                precision='PREC', device='DEV', outdir='DIR', resume='RUN', fid_ref='NPZ', batch='IMAGES', batch_gpu='IMAGES')

def options_parser(defaults, prog, epilog, description):
    """sid.py's options from its Config dataclass: one per field, grouped by the field's metadata, with its help, a
    metavar saying what the value is (units MIMG/KIMG from the name), switches as --flag/--no-flag, and the default
    of the chosen preset. Every default is None, so make_config sees only what the command line gives."""
    p = argparse.ArgumentParser(prog=prog, epilog=epilog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry-run', action='store_true', help='print the resolved options and exit')
    groups = {g: p.add_argument_group(g) for g in ('method', 'data', 'training', 'speed', 'output')}
    for f in dataclasses.fields(defaults):
        unit = 'MIMG' if f.name.endswith('_mimg') else 'KIMG' if f.name.endswith('_kimg') else METAVARS.get(f.name, f.type.__name__.upper())
        kw = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type, metavar=unit)
        groups[f.metadata['group']].add_argument('--' + f.name.replace('_', '-'), default=None, **kw,
                                                 help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)!r})")
    return p

def one_line_errors(fn):
    """Run a command: bad input (and any error the code raises on purpose) is one line on stderr and exit code 2;
    SID_DEBUG=1 shows the traceback."""
    try:
        return fn()
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as e:
        if os.environ.get('SID_DEBUG'):
            raise
        msg = str(e).strip().splitlines()
        sys.exit(print(f'error: {msg[0] if msg else type(e).__name__}', file=sys.stderr) or 2)

def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(v) for v in argv]
    cmd = argv.pop(0) if argv[:1] in (['generate'], ['project']) else 'generate'  # `sid.py generate|project ...`
    p = argparse.ArgumentParser(prog=f'sid.py {cmd}', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n')[1])
    p.add_argument('--ckpt', required=True, help='run folder (best, else latest snapshot), network-snapshot-*.pt or EDM/SiD .pkl')
    p.add_argument('--outdir', required=True, help='new or empty output folder')
    p.add_argument('--class-idx', type=int, default=None, help='class of a conditional generator (generate: else random per seed)')
    p.add_argument('--device', default='', help="cuda | cpu ('': cuda if available)")
    if cmd == 'generate':
        p.add_argument('--seeds', default='0-63', help='seeds, e.g. 0-49999 or 1,5,10-19 (default: 0-63)')
        p.add_argument('--grid', action='store_true', help='one grid.png instead of one PNG per seed')
        p.add_argument('--steps', type=int, default=0, help='SIGN: number of steps, with steps-1 --sigmas (default: 1)')
        p.add_argument('--sigmas', default='', help='SIGN: noise levels between the steps, e.g. 0.8,0.2')
        p.add_argument('--batch', type=int, default=64, help='images per forward pass (default: 64)')
    else:
        p.add_argument('--input', required=True, help='an image, a folder of images, or a 2-D toy .npy of points [N, 2]')
        p.add_argument('--sigma', type=float, default=0.0, help='noise added before each projection (default: 0, plain f(y))')
        p.add_argument('--repeat', type=int, default=1, help='projections in a row (default: 1)')
        p.add_argument('--seed', type=int, default=0, help='seed of the added noise (default: 0)')
    one_line_errors(lambda: (cmd_project if cmd == 'project' else cmd_generate)(p.parse_args(argv)))

if __name__ == '__main__':
    main()
