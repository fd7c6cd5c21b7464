# EDM2's latent space: raw <-> final latents, the SD VAE (decode, encode), real latents for SiDA.
#
# EDM2 (Karras et al. 2024, github.com/NVlabs/edm2, training/encoders.py) trains on ImageNet-512 in
# the latent space of Stability AI's VAE sd-vae-ft-mse, run through diffusers' AutoencoderKL. Its
# dataset stores "raw latents": the VAE posterior's mean and std, 8 x 64 x 64 per image, encoded
# from pixels in [0, 1] (not [-1, 1]). The networks see "final latents": one posterior sample,
# whitened per channel with fixed statistics,
#   x = scale * (mean + std * eps) + bias,  scale = final_std / raw_std,
#   bias = final_mean - raw_mean * scale,   (final_mean, final_std) = (0, 0.5),
# in place of Stable Diffusion's scaling_factor 0.18215. Decoding inverts the affine map, runs the
# VAE decoder and reads its output as pixels in [0, 1]. diffusers is an optional dependency,
# imported only when a VAE is built; missing software or weights give one ValueError line saying
# what to do.
#
#     python latents.py encode --source img512.zip --dest img512-sd.zip  # EDM2's dataset_tool

import argparse
import io
import json
import os
import sys
import warnings
import zipfile

import numpy as np
import torch

VAE_NAME = 'stabilityai/sd-vae-ft-mse'
VAE_FILES = 'config.json and diffusion_pytorch_model.safetensors'

#----------------------------------------------------------------------------
# EDM2's latent statistics (StabilityVAEEncoder defaults): scale and bias per channel, in float32.

RAW_MEAN = [5.81, 3.25, 0.12, -2.15]  # assumed mean of the raw latents, per channel
RAW_STD = [4.17, 4.62, 3.71, 3.28]    # assumed std of the raw latents
FINAL_MEAN = 0.0                      # the final latents' mean ...
FINAL_STD = 0.5                       # ... and std (= EDM2's sigma_data)


def latent_scale_bias(raw_mean=RAW_MEAN, raw_std=RAW_STD, final_mean=FINAL_MEAN,
                      final_std=FINAL_STD):
    """Per-channel float32 (scale, bias) with final = raw * scale + bias."""
    scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
    bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale
    return scale, bias


SCALE, BIAS = latent_scale_bias()


def is_latent(net):
    """Whether a network works in this latent space: an EDM2 network with 4 channels (EDM2's
    ImageNet-512 ones; its 3-channel ImageNet-64 ones work on pixels in [-1, 1], as EDM's)."""
    kwargs = getattr(net, 'init_kwargs', {})
    return kwargs.get('model_type') == 'EDM2UNet' and kwargs.get('img_channels') == 4


def pixel_resolution(latent_resolution):
    """The side of the images that latents of this side decode to: the SD VAE's decoder upsamples
    8x (three 2x stages; EDM2's 64x64 latents are 512x512 images)."""
    return 8 * latent_resolution


def _per_channel(values, like):
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(1, -1, 1, 1)


def _check_latents(x, channels, what):
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'{what} must have shape (N, {channels}, H, W), got {shape}')

#----------------------------------------------------------------------------
# Raw latents (posterior mean and std) -> final latents, and final -> raw (VAE) latents.

def encode_latents(raw, generator=None):
    """(N, 8, h, w) posterior mean and std -> (N, 4, h, w) final latents: one posterior sample,
    whitened. EDM2 draws a fresh sample every time a real latent is used. `generator` (on raw's
    device) makes the draw reproducible."""
    _check_latents(raw, 8, 'raw latents (posterior mean and std)')
    mean, std = raw.to(torch.float32).chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    x = mean + eps * std
    return x * _per_channel(SCALE, x) + _per_channel(BIAS, x)


def final_to_raw(x):
    """(N, 4, h, w) final latents -> the VAE's latents: (x - bias) / scale."""
    _check_latents(x, 4, 'final latents')
    x = x.to(torch.float32)
    return (x - _per_channel(BIAS, x)) / _per_channel(SCALE, x)

#----------------------------------------------------------------------------
# The VAE: diffusers' AutoencoderKL, from a local folder or the Hugging Face cache/hub, or randomly
# initialised from a config dict (tests; checking a setup without the weights). Only safetensors
# weights are read: a .bin file is a pickle, which could run code.

def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ValueError('EDM2 latents need the Stable Diffusion VAE from diffusers: '
                         'pip install diffusers') from None
    return diffusers


def _first_line(e):
    lines = str(e).strip().splitlines()
    return f'{type(e).__name__}: {lines[0] if lines else ""}'[:200]


def vae_from_config(config):
    """A randomly initialised AutoencoderKL (eval, frozen) from a config dict."""
    diffusers = _diffusers()
    if not isinstance(config, dict):
        raise ValueError(f'a VAE config must be a dict, got {type(config).__name__}')
    try:
        vae = diffusers.AutoencoderKL.from_config(config)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f'cannot build a VAE from this config ({_first_line(e)})') from None
    return vae.eval().requires_grad_(False)


# 'random': a tiny untrained VAE of the SD VAE's layout (4 latent channels, 8x down/upsampling), to
# check a setup without the weights. Its images mean nothing.
RANDOM_VAE = dict(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 4,
                  up_block_types=['UpDecoderBlock2D'] * 4, block_out_channels=[8, 8, 16, 16],
                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)


def open_vae(name='', device='cpu'):
    """A run's VAE: '' -> sd-vae-ft-mse; a folder or a Hugging Face name (load_vae); 'random' ->
    RANDOM_VAE, the same weights every time (seed 0; the caller's random state is untouched)."""
    if name == 'random':
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = vae_from_config(RANDOM_VAE)
        return vae.to(device)
    return load_vae(name or VAE_NAME, device)


def load_vae(name_or_path=VAE_NAME, device='cpu', allow_download=True):
    """sd-vae-ft-mse (eval, frozen, float32 on `device`) from a local folder holding config.json and
    diffusion_pytorch_model.safetensors, or from a Hugging Face repository name: the local cache
    (HF_HOME) first, then a download if allowed."""
    diffusers = _diffusers()
    local = os.path.exists(name_or_path)
    # low_cpu_mem_usage=False: the default asks for the `accelerate` package and logs a paragraph
    # when it is missing; the VAE is small (84M parameters) either way.
    kwargs = dict(use_safetensors=True, low_cpu_mem_usage=False)
    # diffusers/huggingface_hub raise many exception types (OSError, ValueError, HTTP errors ...):
    # at this boundary any of them means "no usable VAE here", reported as one line. Their
    # deprecation warnings about their own internals are silenced.
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=UserWarning, module='huggingface_hub')
        warnings.filterwarnings('ignore', category=FutureWarning)
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(name_or_path, local_files_only=True,
                                                          **kwargs)
        except Exception as e:
            if local or not allow_download:
                raise ValueError(_vae_help(name_or_path, e)) from None
            try:
                vae = diffusers.AutoencoderKL.from_pretrained(name_or_path, **kwargs)
            except Exception as e2:
                raise ValueError(_vae_help(name_or_path, e2)) from None
    return vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def _vae_help(name_or_path, e):
    return (f'cannot load the VAE "{name_or_path}" ({_first_line(e)}); put {VAE_FILES} from '
            f'https://huggingface.co/{VAE_NAME} in a folder and pass that folder, or run once '
            f'online to fill the Hugging Face cache (HF_HOME)')

#----------------------------------------------------------------------------
# Final latents -> pixels, batch by batch: only `batch_size` latents are on the VAE's device at a
# time (EDM2 decodes 8 at a time: the SD decoder's activations at 512 x 512 take GBs per image).
# The result stays in host memory as uint8 (786 KB per 512 x 512 image): decode each generated
# batch, not 50k images at once.

@torch.no_grad()
def decode(vae, x, batch_size=8):
    """(N, 4, h, w) final latents -> (N, 3, 8h, 8w) uint8 RGB on the CPU, as EDM2: undo the
    whitening, decode, clamp to [0, 1], scale by 255 and truncate."""
    _check_latents(x, 4, 'final latents')
    if len(x) == 0:
        raise ValueError('no latents to decode')
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size}')
    device = next(vae.parameters()).device
    images = []
    for chunk in x.split(batch_size):
        z = final_to_raw(chunk.to(device))
        y = vae.decode(z).sample
        images.append(y.clamp(0, 1).mul(255).to(torch.uint8).cpu())
    return torch.cat(images)


@torch.no_grad()
def encode_pixels(vae, images, batch_size=8):
    """uint8 RGB (N, 3, H, W) -> raw latents (N, 8, H/8, W/8) float32 on the CPU, as EDM2's encoder:
    the VAE posterior's mean and std of the pixels divided by 255 (in [0, 1])."""
    device = next(vae.parameters()).device
    raw = []
    for chunk in images.split(batch_size):
        d = vae.encode(chunk.to(device).float() / 255).latent_dist
        raw.append(torch.cat([d.mean, d.std], dim=1).float().cpu())
    return torch.cat(raw)

#----------------------------------------------------------------------------
# Real latents for SiDA: a fresh posterior sample every time a real latent is used (EDM2's loop
# re-draws per batch), each batch from its own generator, (seed, rank, batch index), so that a
# resumed run draws the same samples as an uninterrupted one.

def posterior_samples(batches, seed, rank=0, start=0):
    """(final latents, labels) for each (raw latents, labels) of `batches`; start: the index of its
    first batch (resume)."""
    for i, (raw, c) in enumerate(batches, start):
        key = np.random.SeedSequence(seed, spawn_key=(rank, i)).generate_state(1, np.uint64)[0]
        yield encode_latents(raw, torch.Generator().manual_seed(int(key))), c

#----------------------------------------------------------------------------
# `python latents.py encode`: EDM2's dataset_tool.py encode. An EDM-layout zip or folder of images
# of one size (e.g. img512.zip from dataset_tool.py convert) -> a zip of raw latents,
# {idx:08d}[:5]/img-mean-std-{idx:08d}.npy float32 [8, H/8, W/8], with dataset.json labels (null
# without). Images are read and encoded a batch at a time; the zip is written atomically.

def encode_dataset(source, dest, vae, batch_size=8, max_images=None, log=print):
    import data  # images and labels in EDM's layout (data.py does not import this module)
    import fileio
    if os.path.exists(dest):
        raise ValueError(f'--dest {dest} exists: choose a new name (nothing is overwritten)')
    files, ys, read = data.image_members(source)
    files = files[:max_images]
    log(f'encoding {len(files)} images of {source} into {dest}')
    labels = []
    with fileio.atomic_write(dest) as f, zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as zf:
        shape = None
        for i in range(0, len(files), batch_size):
            images = []
            for name in files[i:i + batch_size]:
                a = fileio.read_image(read(name), f'{source}:{name}')
                a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a
                shape = shape or a.shape
                if a.shape != shape:
                    raise ValueError(f'{source}:{name} is {a.shape} (C,H,W) but {files[0]} is '
                                     f'{shape}')
                images.append(torch.from_numpy(a))
            raw = encode_pixels(vae, torch.stack(images), batch_size)
            for j, r in enumerate(raw, i):
                member = f'{j:08d}'[:5] + f'/img-mean-std-{j:08d}.npy'
                buf = io.BytesIO()
                np.save(buf, r.numpy())
                zf.writestr(member, buf.getvalue())
                if ys is not None:
                    labels.append([member, ys[j]])
        meta = dict(labels=labels if ys is not None else None)
        zf.writestr('dataset.json', json.dumps(meta))
    log(f'wrote {dest}: {len(files)} latents of shape {list(raw.shape[1:])}')


def main(argv=None):
    p = argparse.ArgumentParser(prog='latents.py', description="EDM2's latent datasets.")
    sub = p.add_subparsers(dest='cmd', required=True)
    e = sub.add_parser('encode', help="images -> raw latents (EDM2's dataset_tool.py encode)")
    e.add_argument('--source', required=True,
                   help='EDM-layout zip or folder of images of one size, optional dataset.json')
    e.add_argument('--dest', required=True, help='the new latent .zip')
    e.add_argument('--vae', default='', help="folder, Hugging Face name or 'random' (default: "
                   f'{VAE_NAME})')
    e.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    e.add_argument('--batch', type=int, default=8, help='images per VAE call (default: 8)')
    e.add_argument('--max-images', type=int, default=None, help='the first N images only')
    a = p.parse_args(argv)
    try:
        if a.batch < 1 or (a.max_images is not None and a.max_images < 1):
            raise ValueError('--batch and --max-images must be >= 1')
        vae = open_vae(a.vae, a.device)
        encode_dataset(a.source, a.dest, vae, a.batch, a.max_images)
    except (ValueError, OSError, RuntimeError) as e:
        print(f'error: {str(e).splitlines()[0] if str(e) else type(e).__name__}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
