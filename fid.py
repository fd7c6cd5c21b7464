"""FID for sid: NVIDIA's TorchScript Inception, float64 statistics, EDM-compatible reference files.

    python fid.py ref  --data cifar-10-python.tar.gz --dest cifar10-32x32.npz
    python fid.py calc --images out/samples --ref cifar10-32x32 [--num 50000] [--batch 64]

The protocol follows EDM's fid.py (Karras et al. 2022, github.com/NVlabs/edm): uint8 images go
straight into the detector, which resizes them to 299x299 itself (TF1 bilinear); features are the
2048-d pool3 vector; the covariance is unbiased (N-1); reference files are .npz with `mu` and
`sigma` (EDM2's img512.pkl, a pickle holding the same under 'fid', is read too; EDM2's images
come from the VAE, see latents.py). Only the matrix square root differs (symmetric eigen form
instead of scipy.linalg.sqrtm; equal to round-off, faster, no scipy).
"""

import argparse
import os
import sys
import zipfile

import numpy as np
import torch

import data  # dataset archives (the training data loader)
import fileio  # downloads, atomic writes, the image reader
import unpickle  # EDM2's pickled reference statistics

DETECTOR_URL = ('https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/'
                'inception-2015-12-05.pt')
REF_PRESETS = {name: f'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/{name}.npz'  # EDM's fid-refs
               for name in ['cifar10-32x32', 'imagenet-64x64', 'ffhq-64x64', 'afhqv2-64x64']}
# EDM2's ImageNet-512 reference (a pickle: {'fid': {'mu', 'sigma'}, 'fd_dinov2': ...})
REF_PRESETS['img512'] = 'https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl'
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')

def _fetch(url_or_path):
    return fileio.download(url_or_path)  # local paths pass through; URLs are cached atomically

#----------------------------------------------------------------------------
# Detector: NVIDIA's TorchScript port of TF Inception-v3 (StyleGAN2-ADA metrics, as used by SiD).

DETECTOR_SHA256 = fileio.KNOWN_FILES[DETECTOR_URL]['sha256']  # NVIDIA's file (pinned)
MAX_DETECTOR_BYTES = 1 << 30


def load_detector(device, path=None, trusted=False):
    """Load the Inception detector from `path`, $SID_DETECTOR, or the NVIDIA URL (downloaded and
    cached, its SHA-256 checked). TorchScript is code, run when loaded and when called: a file
    other than NVIDIA's detector (by its SHA-256) is refused unless trusted (--trust-detector or
    $SID_TRUST_DETECTOR=1). NVIDIA's other detectors the project names (VGG16 for
    precision/recall) count as trusted: their bytes are checked against KNOWN_FILES."""
    src = path or os.environ.get('SID_DETECTOR') or DETECTOR_URL
    path = _fetch(src)
    trusted = trusted or src in fileio.KNOWN_FILES or os.environ.get('SID_TRUST_DETECTOR') == '1'
    digest = fileio.sha256_of(path)
    if digest != DETECTOR_SHA256 and not trusted:
        raise ValueError(f"{path}: not NVIDIA's Inception detector (sha256 {digest[:16]}...); a "
                         f'TorchScript file is code: pass --trust-detector or set '
                         f'SID_TRUST_DETECTOR=1 only if you trust it')
    with fileio.open_regular(path, MAX_DETECTOR_BYTES) as f:
        fileio.check_zip(f, path)
        try:
            return torch.jit.load(f, map_location=device).eval()
        except Exception as e:  # torch raises several types for a bad archive
            raise ValueError(f'cannot load TorchScript detector {path}: '
                             f'{str(e).splitlines()[0]}') from None

def to_uint8(x):
    """Float images in [-1, 1] -> uint8 in [0, 255], EDM's rule: +128 then truncation (not
    rounding)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)

def detector_input(images, device):
    """Checked uint8 NCHW RGB on `device`: what NVIDIA's detectors take (grayscale repeated, as
    EDM); the networks resize (Inception: 299x299) and normalise inside their own graphs."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'detector expects uint8 NCHW images with 1 or 3 channels, '
                         f'got {images.dtype} {tuple(images.shape)}')
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.to(device)

def extract_features(detector, images, device):
    """uint8 NCHW images (1 or 3 channels, any size) -> float64 features [N, D] (D = 2048 for
    Inception)."""
    with torch.no_grad():
        features = detector(detector_input(images, device), return_features=True)  # (N, D)
    return features.to(torch.float64)

#----------------------------------------------------------------------------
# Streaming feature statistics in float64 (EDM fid.py): sums only, so batch split, order and ranks
# don't matter.

class FeatureStats:
    """Running n, sum f and sum f f^T. Raw tensors are public so DDP ranks can all_reduce them."""
    def __init__(self):
        self.n, self.sum, self.sum_outer = 0, None, None

    def _init(self, dim, device):
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features):  # features: (N, D)
        f = torch.as_tensor(features).to(torch.float64)
        if self.sum is None:
            self._init(f.shape[1], f.device)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f  # float64 matters: FID is a small difference of traces ~1e3
        return self

    def all_reduce(self, all_reduce):
        """Sum n, sum, sum_outer across ranks with a callable like torch.distributed.all_reduce
        (in place)."""
        n = torch.tensor(float(self.n), dtype=torch.float64, device=self.sum.device)
        for t in (n, self.sum, self.sum_outer):
            all_reduce(t)
        self.n = int(n.item())
        return self

    def mean_cov(self):
        """-> (mu [D], sigma [D, D]) as float64 numpy; sigma divides by N-1 (unbiased, as EDM)."""
        if self.n < 2:
            raise ValueError(f'need at least 2 images for a covariance, got {self.n}')
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()

#----------------------------------------------------------------------------
# Frechet distance (Heusel et al. 2017): |mu1-mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2).
# S1 S2 is similar to the PSD matrix sqrt(S1) S2 sqrt(S1), so the trace term is the sum of square
# roots of its eigenvalues: two symmetric eigensolves in float64, real arithmetic, robust when S is
# rank-deficient.

def frechet_distance(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if d < 0 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f'statistics do not match: mu {mu1.shape} / {mu2.shape}, '
                         f'sigma {sigma1.shape} / {sigma2.shape} (features of another dimension?)')
    lam, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(lam, 0, None))) @ v.T  # sqrt(S1); clip round-off negatives
    m = root1 @ sigma2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)

#----------------------------------------------------------------------------
# Reference statistics: .npz with keys mu (D,) and sigma (D, D), float64, same as EDM's fid-refs.

MAX_FEATURES = 4096  # Inception's pool3: 2048


def load_ref(path_or_preset):
    """(mu, sigma) float64 from an .npz (a path, URL or preset), checked by check_ref; the arrays'
    headers are checked before anything is allocated."""
    path = _fetch(REF_PRESETS.get(path_or_preset, path_or_preset))
    if zipfile.is_zipfile(path):
        arrays = fileio.read_npz(path, ['mu', 'sigma'], MAX_FEATURES ** 2)
        mu, sigma = arrays['mu'].astype(np.float64), arrays['sigma'].astype(np.float64)
    else:  # not an .npz: EDM2's pickled reference
        mu, sigma = _load_pickled_ref(path)
    check_ref(mu, sigma, path)
    return mu, sigma

def _load_pickled_ref(path):
    """EDM2's reference statistics (calculate_metrics.py ref: a plain pickle of numpy arrays),
    through the bounded unpickler with numpy's globals only -> its Inception (mu, sigma)."""
    with fileio.open_regular(path, 4 * 8 * MAX_FEATURES ** 2) as f:  # fid's and fd_dinov2's
        ref = unpickle.bounded_unpickle(f, unpickle.CIFAR_GLOBALS, path)
    stats = ref.get('fid') if isinstance(ref, dict) else None
    if not isinstance(stats, dict):
        stats = {}
    mu, sigma = stats.get('mu'), stats.get('sigma')
    if not (isinstance(mu, np.ndarray) and isinstance(sigma, np.ndarray)):
        raise ValueError(f'{path}: not reference statistics (.npz with mu, sigma, or EDM2\'s '
                         'pickle with fid: {mu, sigma})')
    return mu.astype(np.float64), sigma.astype(np.float64)

def check_ref(mu, sigma, name):
    """Statistics a Frechet distance can use: mu [D], sigma [D, D], D <= MAX_FEATURES, finite, sigma
    symmetric and positive semi-definite up to float64 round-off (relative 1e-6)."""
    d = mu.shape[0] if mu.ndim == 1 else -1
    if not 1 <= d <= MAX_FEATURES or sigma.shape != (d, d):
        raise ValueError(f'bad reference statistics in {name}: mu {mu.shape}, sigma {sigma.shape}')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'bad reference statistics in {name}: NaN or infinite values')
    scale = np.abs(sigma).max()
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f'bad reference statistics in {name}: sigma is not symmetric')
    lowest = np.linalg.eigvalsh(sigma).min()
    if lowest < -1e-6 * scale:
        raise ValueError(f'bad reference statistics in {name}: sigma is not positive '
                         f'semi-definite (eigenvalue {lowest:.3g})')

def save_ref(path, mu, sigma):
    with fileio.atomic_write(path) as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))

#----------------------------------------------------------------------------
# Statistics of an image stream and FID of a generator (used by the training loop, optionally
# under DDP).

def compute_stats_from_images(batches, detector, device):
    """Iterable of uint8 NCHW batches -> (mu, sigma) float64 numpy."""
    stats = FeatureStats()
    for images in batches:
        stats.update(extract_features(detector, images, device))
    return stats.mean_cov()

def fid_of_generator(make_batch, num_images, ref_mu, ref_sigma, detector, device, batch=64, rank=0,
                     world_size=1):
    """FID of images make_batch(seeds) (uint8, or float in [-1, 1]) for seeds 0..num_images-1.
    Rank r takes seeds r, r+W, r+2W, ...; the raw sums are then added across ranks, so every rank
    returns the same FID."""
    if num_images < max(2, world_size):
        raise ValueError(f'num_images={num_images} too small for world_size={world_size}')
    seeds = list(range(num_images))[rank::world_size]
    stats = FeatureStats()
    for i in range(0, len(seeds), batch):
        with torch.no_grad():  # quantised in memory, no PNG round trip
            images = make_batch(seeds[i:i + batch])
        if images.dtype != torch.uint8:
            images = to_uint8(images)
        stats.update(extract_features(detector, images, device))
    if world_size > 1:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError('world_size > 1 needs an initialised torch.distributed')
        stats.all_reduce(torch.distributed.all_reduce)
    mu, sigma = stats.mean_cov()
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)

#----------------------------------------------------------------------------
# Image folders (the output of a sampler): sorted recursive file list, streamed in batches; and
# any image set fid.py reads (folder or dataset archive) as batches.

def list_images(folder, num=None, seed=0):
    """Sorted image files under `folder`; with more than `num`, a seeded random subset (EDM's
    rule)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'no such folder: {folder}')
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_EXTS))
    if num is not None and len(files) < num:
        raise ValueError(f'found {len(files)} images in {folder}, need {num} (--num)')
    if num is not None and len(files) > num:
        idx = np.arange(len(files))
        np.random.RandomState(seed).shuffle(idx)
        files = [files[i] for i in np.sort(idx[:num])]
    if not files:
        raise ValueError(f'no images ({"/".join(IMAGE_EXTS)}) in {folder}')
    return files

def iterate_image_files(files, batch, root=None):
    """Yield uint8 [B, 3, H, W] batches; grayscale becomes RGB (channel repeated); sizes must
    agree. Regular files only (inside `root`, the folder listed, when given)."""
    size = None
    for i in range(0, len(files), batch):
        arrays = []
        for path in files[i:i + batch]:
            # bounded: decompression bombs, broken and special files are refused
            a = fileio.read_image(path, root=root)
            a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a
            size = size or a.shape[1:]
            if a.shape[1:] != size:
                raise ValueError(f'images of mixed sizes: {path} is {a.shape[2]}x{a.shape[1]}, '
                                 f'expected {size[1]}x{size[0]}')
            arrays.append(a)
        yield torch.from_numpy(np.stack(arrays))

def dataset_batches(path, batch):
    """(count, uint8 batches) of a PNG folder (streamed) or an archive (the training data
    loader)."""
    if os.path.isdir(path):
        files = list_images(path)
        return len(files), iterate_image_files(files, batch, root=path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'no such file or folder: {path}')
    images, _ = data.load_dataset(path)  # uint8 [N, C, H, W]
    return len(images), (images[i:i + batch] for i in range(0, len(images), batch))

#----------------------------------------------------------------------------
# Command line: `ref` writes reference statistics for a dataset, `calc` prints the FID of an image
# folder.

def _check_writable(path):
    """Fail before hours of feature extraction if the destination cannot be written (or is a
    folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f'cannot write --dest {path} '
                         f'(missing or read-only folder, or a folder of that name)')

def main(argv=None):
    parser = argparse.ArgumentParser(
        description='FID with NVIDIA Inception features (EDM protocol).')
    sub = parser.add_subparsers(dest='cmd', required=True)
    ref = sub.add_parser('ref', help='compute reference statistics of a dataset')
    ref.add_argument('--data', required=True,
                     help='PNG folder, dataset zip, or CIFAR-10 python archive')
    ref.add_argument('--dest', required=True, help='output .npz (keys mu, sigma)')
    calc = sub.add_parser('calc', help='FID of an image folder against reference statistics')
    calc.add_argument('--images', required=True, help='folder of generated images (recursive)')
    calc.add_argument('--ref', required=True,
                      help=f'.npz path, URL, or preset: {", ".join(REF_PRESETS)}')
    calc.add_argument('--num', type=int, default=50000,
                      help='number of images used (default: 50000)')
    calc.add_argument('--seed', type=int, default=0,
                      help='picks the subset if there are more (default: 0)')
    for p in (ref, calc):
        p.add_argument('--batch', type=int, default=64,
                       help='images per detector call (default: 64)')
        p.add_argument('--detector', default=None,
                       help="local Inception .pt (default: $SID_DETECTOR or NVIDIA's URL)")
        p.add_argument('--trust-detector', action='store_true',
                       help="run a TorchScript detector other than NVIDIA's (TorchScript is code; "
                       'also $SID_TRUST_DETECTOR=1)')
        p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    try:
        if args.batch < 1:
            raise ValueError('--batch must be >= 1')
        if args.cmd == 'ref':
            _check_writable(args.dest)
            num, batches = dataset_batches(args.data, args.batch)
            print(f'computing reference statistics of {num} images from {args.data}')
            detector = load_detector(args.device, args.detector, args.trust_detector)
            mu, sigma = compute_stats_from_images(batches, detector, args.device)
            save_ref(args.dest, mu, sigma)
            print(f'saved {args.dest}')
        else:
            if args.num < 2:
                raise ValueError(f'--num must be >= 2 (a covariance needs two images), '
                                 f'got {args.num}')
            files = list_images(args.images, args.num, args.seed)
            # before the detector runs: fail early on a bad reference
            ref_mu, ref_sigma = load_ref(args.ref)
            detector = load_detector(args.device, args.detector, args.trust_detector)
            batches = iterate_image_files(files, args.batch, root=args.images)
            mu, sigma = compute_stats_from_images(batches, detector, args.device)
            print(f'{frechet_distance(mu, sigma, ref_mu, ref_sigma):g}')
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # OSError: FileNotFoundError too
        print(f'error: {str(e).splitlines()[0] if str(e) else type(e).__name__}', file=sys.stderr)
        sys.exit(2)

if __name__ == '__main__':
    main()
