# EDM2's latent space (draft): raw <-> final latents and the Stable Diffusion VAE decoder to pixels.
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

import os
import warnings

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
