"""Using a trained one-step generator: images per seed as EDM's generate.py, and SIGN's multi-step sampling and
projection of corrupted images (imports sid for the maths).

    python generate.py --ckpt RUN --seeds 0-49999 --outdir out/c10           # one PNG per seed (then fid.py calc)
    python generate.py --ckpt RUN --seeds 0-63 --grid --outdir out/grid       # one grid.png
    python generate.py --ckpt RUN --steps 3 --sigmas 0.8,0.2 --outdir out/3   # SIGN: 3 steps, re-noised between
    python generate.py project --ckpt RUN --input noisy/ --sigma 0.2 --outdir out/proj   # SIGN: f(y + sigma eps)
"""
import argparse, math, os, sys
import numpy as np
import torch
import torch.nn.functional as F

import edm_nets, fid, sid, toy

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
    G, info = edm_nets.load_checkpoint(sid.snapshot_path(a.ckpt))
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
        x = sid.sample_images(G, seeds, sigma_init, device, None, sigmas).cpu()
        with edm_nets.atomic_write(os.path.join(a.outdir, 'samples.npy')) as f:
            np.save(f, x.numpy())
        toy.toy_picture([(f'{len(seeds)} samples', x)], toy.ToyMixture(), os.path.join(a.outdir, 'samples.png'))
        return print(f'wrote {len(seeds)} points to {a.outdir}/samples.npy and samples.png')
    grid = []
    for i in range(0, len(seeds), a.batch):
        # oneDNN's CPU convolutions round differently per batch size; the native ones make a seed's image
        # independent of the batch split (on CPU; GPU kernels give no such promise).
        mkldnn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, device.type != 'cpu'
        try:
            x = fid.to_uint8(sid.sample_images(G, seeds[i:i + a.batch], sigma_init, device, a.class_idx, sigmas)).cpu()
        finally:
            torch.backends.mkldnn.enabled = mkldnn
        grid += [x] if a.grid else []
        for s, im in zip(seeds[i:i + a.batch], x if not a.grid else []):
            edm_nets.save_png(os.path.join(a.outdir, f'{s:06d}.png'), im)
    if a.grid:
        edm_nets.save_png(os.path.join(a.outdir, 'grid.png'), torch.cat(grid))
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
        x = sid.project(lambda v: sid.generate(G, v, None, sigma_init), torch.from_numpy(y).float().to(device), a.sigma, gen, a.repeat)
        os.makedirs(a.outdir, exist_ok=True)
        with edm_nets.atomic_write(os.path.join(a.outdir, 'projected.npy')) as f:
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
        y = edm_nets.read_image(path, path)
        if list(y.shape) != G.img_shape:
            raise ValueError(f'{path}: image of shape {list(y.shape)} (C,H,W), the generator makes {G.img_shape}')
        images.append(torch.from_numpy(y.copy()).float() / 127.5 - 1)
    os.makedirs(a.outdir, exist_ok=True)
    for path, y in zip(files, images):
        x = sid.project(lambda v: sid.generate(G, v, c, sigma_init), y[None].to(device), a.sigma, gen, a.repeat)
        edm_nets.save_png(os.path.join(a.outdir, os.path.basename(path).rsplit('.', 1)[0] + '.png'), fid.to_uint8(x)[0].cpu())
    print(f'wrote {len(files)} projected image(s) to {a.outdir}')

def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(v) for v in argv]
    cmd = argv.pop(0) if argv[:1] == ['project'] else 'generate'
    p = argparse.ArgumentParser(prog=f'generate.py{" project" if cmd == "project" else ""}', description=__doc__.split('\n\n')[0],
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
    try:
        (cmd_project if cmd == 'project' else cmd_generate)(p.parse_args(argv))
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if os.environ.get('SID_DEBUG'):
            raise
        msg = str(e).strip().splitlines()
        sys.exit(print(f'error: {msg[0] if msg else type(e).__name__}', file=sys.stderr) or 2)

if __name__ == '__main__':
    main()
