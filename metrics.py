"""The papers' metrics besides FID, and the evaluation of a generator in memory: Inception Score,
precision/recall, trials of N images generated in batches and scored without writing them.

Inception Score (Salimans et al. 2016) as the SiD and SiDA tables report it: the class probabilities
of NVIDIA's TorchScript Inception (the FID detector, its output layer without bias), N images in 10
splits, the mean and the (population) std over the splits of exp(E_x KL(p(y|x) || p(y))), as in
StyleGAN2-ADA's metrics/inception_score.py (github.com/NVlabs/stylegan2-ada-pytorch), which SiD's
metrics/sid_inception_score.py (github.com/mingyuanzhou/SiD) keeps.

Precision and recall (Kynkaanniemi et al. 2019, k = 3): a sample counts when it lies inside the
other set's manifold, the union of balls around each of its points with the radius of that point's
k-th nearest neighbour. Features: SiD's metrics/sid_precision_recall.py replaced StyleGAN2-ADA's
VGG16 (vgg16.pt) by the Inception pool features, to agree with OpenAI's guided-diffusion evaluator,
and compares against the images of OpenAI's VIRTUAL_imagenet64_labeled.npz (the SiD README); so
the Inception features are the default here and VGG16 is an option.
"""
import re
import zipfile

import numpy as np
import torch

import fid
import fileio

VGG16_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt'
PR_REF_PRESETS = {'imagenet-64x64': ('https://openaipublic.blob.core.windows.net/diffusion/'
                                     'jul-2021/ref_batches/imagenet/64/'
                                     'VIRTUAL_imagenet64_labeled.npz')}
METRICS = ('fid', 'is', 'pr')
MAX_REAL = 200_000  # real images for precision/recall: the first 200k (StyleGAN2-ADA's pr50k3_full)

#----------------------------------------------------------------------------
# Inception Score (Salimans et al. 2016, Sec. 4): IS = exp(E_x KL(p(y|x) || p(y))) per split.

def class_probabilities(detector, images, device):
    """uint8 NCHW images -> float64 [N, C] class probabilities of NVIDIA's Inception, called as
    StyleGAN2-ADA calls it for IS (no_output_bias=True: the TF original's softmax had no bias)."""
    with torch.no_grad():
        probs = detector(fid.detector_input(images, device), no_output_bias=True)
    return probs.to(torch.float64)


class InceptionScore:
    """IS of `num` probability rows in `splits` splits, streamed: split s takes rows s*num//splits
    .. (s+1)*num//splits - 1 in arrival order (the official slicing). Per split it keeps only
    sum_x p(y|x) and sum_x sum_y p log p, since
        E_x KL(p(y|x) || p(y)) = mean_x sum_y p(y|x) log p(y|x) - sum_y p(y) log p(y),
    p(y) = the split's mean row: memory O(splits * classes) for any num. 0 log 0 = 0 (the official
    numpy code would give NaN for a probability that underflows to 0)."""
    def __init__(self, num, splits=10):
        if splits < 1 or num < splits:
            raise ValueError(f'the Inception Score needs at least one image per split: '
                             f'{num} images, {splits} splits')
        self.num, self.splits, self.seen = num, splits, 0
        self.bounds = torch.tensor([s * num // splits for s in range(splits + 1)])
        self.sum_p, self.sum_plogp = None, torch.zeros(splits, dtype=torch.float64)

    def update(self, probs):
        p = torch.as_tensor(probs).to(torch.float64).cpu()
        if p.ndim != 2 or self.seen + len(p) > self.num:
            raise ValueError(f'expected probabilities [N, C] for {self.num - self.seen} more '
                             f'images, got {tuple(p.shape)}')
        if self.sum_p is None:
            self.sum_p = torch.zeros(self.splits, p.shape[1], dtype=torch.float64)
        rows = torch.arange(self.seen, self.seen + len(p))
        # the split s with bounds[s] <= row < bounds[s + 1]
        split = torch.bucketize(rows, self.bounds[1:-1], right=True)
        self.sum_p.index_add_(0, split, p)
        self.sum_plogp.index_add_(0, split, torch.special.xlogy(p, p).sum(1))
        self.seen += len(p)
        return self

    def result(self):
        """(mean, std) over the splits; std divides by the number of splits (numpy's np.std)."""
        if self.seen != self.num:
            raise ValueError(f'the Inception Score got {self.seen} of {self.num} images')
        n = (self.bounds[1:] - self.bounds[:-1]).to(torch.float64)
        p_y = self.sum_p / n[:, None]
        kl = self.sum_plogp / n - torch.special.xlogy(p_y, p_y).sum(1)
        scores = kl.exp()
        return float(scores.mean()), float(scores.std(correction=0))


def inception_score(probs, splits=10):
    """(mean, std) of the IS of all rows of `probs` [N, C]."""
    return InceptionScore(len(probs), splits).update(probs).result()

#----------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019, Sec. 2): precision = the fraction of generated
# samples inside the real manifold, recall = the fraction of real samples inside the generated one.
# Distances in blocks of rows (at most `block` distances at a time); features are float16 in the
# official code and here when they come from `evaluate` (memory), distances at least float32.

def kth_neighbour_radii(manifold, k, rows):
    """Distance from each point to its k-th nearest other point: the (k+1)-th smallest distance
    to the set, the point itself being the first (the official kthvalue(k + 1))."""
    return torch.cat([torch.cdist(part, manifold).kthvalue(k + 1, dim=1).values
                      for part in manifold.split(rows)])


def fraction_inside(probes, manifold, radii, rows):
    """Fraction of probes within radii[j] of some manifold point j (a point on a ball's edge is
    inside, as the official `<=`)."""
    inside = [(torch.cdist(part, manifold) <= radii).any(dim=1) for part in probes.split(rows)]
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(real, gen, k=3, block=1 << 26):
    """(precision, recall) of features gen [N, D] against real [M, D]."""
    dtype = torch.promote_types(torch.as_tensor(real).dtype, torch.float32)
    real, gen = torch.as_tensor(real).to(dtype), torch.as_tensor(gen).to(real.device, dtype)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f'precision/recall needs features [M, D] and [N, D], '
                         f'got {tuple(real.shape)} and {tuple(gen.shape)}')
    if min(len(real), len(gen)) <= k:
        raise ValueError(f'precision/recall with k={k} needs more than {k} real and generated '
                         f'images, got {len(real)} and {len(gen)}')
    rows = max(1, block // max(len(real), len(gen)))
    precision = fraction_inside(gen, real, kth_neighbour_radii(real, k, rows), rows)
    recall = fraction_inside(real, gen, kth_neighbour_radii(gen, k, rows), rows)
    return precision, recall

#----------------------------------------------------------------------------
# Real images for precision/recall: OpenAI's reference batches (.npz, arr_0 = uint8 [N, H, W, C]),
# read a slice at a time with every size checked against the archive first, or anything fid.py's
# `ref` reads (a PNG folder, a dataset zip, the CIFAR-10 archive).

def _npz_images(path, batch, max_images):
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n in ('arr_0.npy', 'arr_0')]
        if not names:
            raise ValueError(f'{path}: no arr_0 (an OpenAI reference batch of images) in the .npz')
        info = zf.getinfo(names[0])
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f'{path}: unsupported .npy version {version}')
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            ok = (dtype == np.uint8 and not fortran and len(shape) == 4 and shape[3] in (1, 3)
                  and 0 < shape[1] * shape[2] <= fileio.MAX_IMAGE_PIXELS)
            if not ok:
                raise ValueError(f'{path}: arr_0 is {dtype} {shape}, expected uint8 images '
                                 f'[N, H, W, 1 or 3]')
            image_bytes = shape[1] * shape[2] * shape[3]
            if info.file_size != f.tell() + shape[0] * image_bytes:
                raise ValueError(f'{path}: arr_0 declares {shape[0]} images but holds '
                                 f'{info.file_size - f.tell()} bytes (truncated?)')
            count = min(shape[0], max_images)
            step = max(1, min(batch, (1 << 28) // image_bytes))
            for i in range(0, count, step):
                n = min(step, count - i)
                data = f.read(n * image_bytes)
                if len(data) != n * image_bytes:
                    raise ValueError(f'{path}: arr_0 ends after {i} images')
                array = np.frombuffer(data, np.uint8).reshape(n, *shape[1:])
                yield torch.from_numpy(array.copy()).permute(0, 3, 1, 2)


def real_image_batches(path, batch, max_images=MAX_REAL):
    """uint8 NCHW batches of at most `max_images` real images (the first ones, as the official
    max_real)."""
    if path.endswith('.npz'):
        return _npz_images(path, batch, max_images)
    count, batches = fid.dataset_batches(path, batch)

    def first(batches, left):
        for images in batches:
            if left <= 0:
                return
            yield images[:left]
            left -= len(images)

    return first(batches, min(count, max_images))


def real_features(detector, path, batch, device, resolution, max_images=MAX_REAL):
    """float16 features [M, D] of the real images at `path` (a PR_REF_PRESETS name, URL, .npz,
    dataset or folder), refused unless they are `resolution` pixels square."""
    path = fileio.download(PR_REF_PRESETS.get(path, path))
    features = []
    for images in real_image_batches(path, batch, max_images):
        if images.shape[2:] != (resolution, resolution):
            raise ValueError(f'{path}: real images of {images.shape[3]}x{images.shape[2]}, '
                             f'the generator makes {resolution}x{resolution}')
        features.append(fid.extract_features(detector, images, device).to(torch.float16))
    if not features:
        raise ValueError(f'{path}: no real images')
    return torch.cat(features)

#----------------------------------------------------------------------------
# The evaluation (EDM's protocol, Karras et al. 2022, and SiD's sid_metrics.py): per trial, N images
# from N seeds, generated in batches and quantised in memory (no PNG round trip), scored against the
# reference of the generator's dataset. Memory: FID keeps sums (D^2 floats), IS two sums per split,
# precision/recall the float16 features of the N images and of the real ones (bounded by N and
# MAX_REAL), plus one block of distances.

def check_reference(ref, resolution, expected=None):
    """Refuse a preset reference (fid.REF_PRESETS) of another resolution, or of another dataset
    than `expected` (the preset the generator matches), before anything is downloaded or
    generated. Paths and URLs pass: their statistics say nothing of either (the feature dimension
    is checked when they are loaded)."""
    if ref is None:
        raise ValueError('no reference statistics: name a preset '
                         f'({", ".join(fid.REF_PRESETS)}) or an .npz with mu and sigma')
    if ref in fid.REF_PRESETS:
        size = int(re.search(r'(\d+)$', ref).group(1))  # cifar10-32x32 -> 32, img512 -> 512
        if size != resolution:
            raise ValueError(f'reference {ref} is of {size}x{size} images, the generator makes '
                             f'{resolution}x{resolution}')
        if expected is not None and ref != expected:
            raise ValueError(f'reference {ref} is of another dataset than the generator\'s '
                             f'({expected})')


def check_options(metrics, num, trials, batch, splits=10, k=3, image_shape=(3, 1, 1)):
    """One line on the first option `evaluate` cannot run with."""
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise ValueError(f'unknown metric(s) {unknown or "(none)"}: '
                         f'choose from {", ".join(METRICS)}')
    if num < 2 or trials < 1 or batch < 1:
        raise ValueError(f'need at least 2 images, 1 trial and batches of 1 or more, got {num}, '
                         f'{trials} and {batch}')
    if 'is' in metrics and num < splits:
        raise ValueError(f'the Inception Score needs at least {splits} images (one per split)')
    if 'pr' in metrics and num <= k:
        raise ValueError(f'precision/recall with k={k} needs more than {k} images')
    if len(image_shape) != 3 or image_shape[0] not in (1, 3):
        raise ValueError(f'the detectors take images [1 or 3, H, W], the generator makes '
                         f'{list(image_shape)}')


def _summary(per_trial):
    """Mean and sample std (n - 1) of each score over the trials; std None for one trial."""
    mean, std = {}, {}
    for key in per_trial[0]:
        values = np.array([t[key] for t in per_trial], np.float64)
        mean[key] = float(values.mean())
        std[key] = float(values.std(ddof=1)) if len(values) > 1 else None
    return mean, std


def _score_trial(sample, seeds, image_shape, metrics, tools, batch, device, splits, k, progress):
    """The scores of the images of `seeds`, generated and scored `batch` at a time; progress(n)
    after each batch with the number of images done."""
    detector, pr_detector = tools['detector'], tools['pr_detector']
    stats, gen = fid.FeatureStats(), []
    score = InceptionScore(len(seeds), splits) if 'is' in metrics else None
    for i in range(0, len(seeds), batch):
        part = seeds[i:i + batch]
        with torch.no_grad():
            images = sample(part)
        if images.dtype != torch.uint8:  # EDM2's decoded latents come as uint8 already
            images = fid.to_uint8(images)
        if list(images.shape) != [len(part), *image_shape]:
            raise ValueError(f'sample() gave {list(images.shape)} for {len(part)} seeds, '
                             f'expected {[len(part), *image_shape]}')
        features = None
        if 'fid' in metrics:
            features = fid.extract_features(detector, images, device)
            stats.update(features)
        if 'is' in metrics:
            score.update(class_probabilities(detector, images, device))
        if 'pr' in metrics:
            if features is None or pr_detector is not detector:
                features = fid.extract_features(pr_detector, images, device)
            gen.append(features.to(torch.float16))
        if progress is not None:
            progress(i + len(part))
    result = {}
    if 'fid' in metrics:
        mu, sigma = stats.mean_cov()
        result['fid'] = fid.frechet_distance(mu, sigma, *tools['ref'])
    if 'is' in metrics:
        result['is'], result['is_std'] = score.result()
    if 'pr' in metrics:
        result['precision'], result['recall'] = precision_recall(tools['real'], torch.cat(gen), k)
    return result


def evaluate(sample, image_shape, num, metrics=('fid',), trials=1, ref=None, expected_ref=None,
             detector=None, pr_ref=None, pr_detector=None, batch=64, device='cpu', splits=10, k=3,
             progress=None, trusted=False):
    """Scores of `trials` sets of `num` images. Trial t draws seeds t*num .. (t+1)*num - 1 (fresh
    images per trial, as the official 10 trials, but reproducible); sample(seeds) must return
    float images in [-1, 1] or uint8 images [B, *image_shape] (the seeds-to-latents rule of
    `generate`).
    ref: FID statistics (preset, path, URL; default expected_ref); pr_ref: real images for
    precision/recall (default: PR_REF_PRESETS of the reference); detector: NVIDIA's Inception, a
    loaded module or a path/URL (default: $SID_DETECTOR or NVIDIA's URL); pr_detector: the
    precision/recall features, likewise (default: the Inception, as SiD; VGG16_URL as
    StyleGAN2-ADA); trusted: run TorchScript files other than NVIDIA's. Every reference is
    loaded and checked before the first image is generated.
    progress(trial, images) after each batch (trial from 1). Returns dict(trials=[{score:
    value}], mean={...}, std={...}) with scores fid, is, is_std (over the splits), precision,
    recall."""
    metrics, image_shape = list(dict.fromkeys(metrics)), list(image_shape)
    check_options(metrics, num, trials, batch, splits, k, image_shape)
    resolution = image_shape[-1]
    ref = ref if ref is not None else expected_ref
    if 'fid' in metrics:
        check_reference(ref, resolution, expected_ref)
    pr_ref = pr_ref if pr_ref is not None else PR_REF_PRESETS.get(ref)
    if 'pr' in metrics and pr_ref is None:
        raise ValueError('precision/recall needs real images: a dataset, folder or OpenAI .npz '
                         'reference batch')
    inception = 'fid' in metrics or 'is' in metrics or pr_detector is None
    if inception and (detector is None or isinstance(detector, str)):
        detector = fid.load_detector(device, detector, trusted)
    if isinstance(pr_detector, str) and 'pr' in metrics:
        pr_detector = fid.load_detector(device, pr_detector, trusted)
    tools = dict(detector=detector, pr_detector=pr_detector or detector)
    if 'fid' in metrics:
        tools['ref'] = fid.load_ref(ref)
        probe = torch.zeros([1, *image_shape], dtype=torch.uint8)
        dim = fid.extract_features(detector, probe, device).shape[1]
        if tools['ref'][0].shape[0] != dim:
            raise ValueError(f'reference {ref} has {tools["ref"][0].shape[0]} features, the '
                             f'detector gives {dim}')
    if 'pr' in metrics:
        tools['real'] = real_features(tools['pr_detector'], pr_ref, batch, device, resolution)
    per_trial = []
    for t in range(trials):
        def done(n):
            progress(t + 1, n)

        seeds = list(range(t * num, (t + 1) * num))
        per_trial.append(_score_trial(sample, seeds, image_shape, metrics, tools, batch, device,
                                      splits, k, done if progress is not None else None))
    mean, std = _summary(per_trial)
    return dict(trials=per_trial, mean=mean, std=std)


def summary_lines(results):
    """One line per score: mean, std over the trials, and every trial's value."""
    lines = []
    for key, mean in results['mean'].items():
        values = ', '.join(f'{t[key]:.4g}' for t in results['trials'])
        std = results['std'][key]
        spread = f' ± {std:.4g}' if std is not None else ''
        lines.append(f'{key:<9} {mean:.4f}{spread}  ({len(results["trials"])} trial(s): {values})')
    return lines
