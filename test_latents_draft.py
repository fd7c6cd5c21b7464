"""Tests of latents_draft.py: EDM2's latent scale/bias and raw <-> final conversion against the
formulas, and decoding through a tiny randomly initialised AutoencoderKL (no download; skipped if
diffusers, an optional dependency, is not installed)."""
import importlib.util
import math
import pickle
import sys

import numpy as np
import pytest
import torch

import latents_draft as lat

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec('diffusers') is None,
                                     reason='diffusers not installed (optional: pip install '
                                            'diffusers)')

# A tiny AutoencoderKL: 2 levels (one 2x upsampling), 4 latent channels like the SD VAE.
TINY = dict(in_channels=3, out_channels=3, down_block_types=['DownEncoderBlock2D'] * 2,
            up_block_types=['UpDecoderBlock2D'] * 2, block_out_channels=[8, 16],
            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)


def tiny_vae():
    torch.manual_seed(0)
    return lat.vae_from_config(TINY)

#----------------------------------------------------------------------------
# Scale and bias: final = raw * scale + bias, scale = final_std / raw_std,
# bias = final_mean - raw_mean * scale.

def test_scale_bias_equal_the_formula_and_edm2s_values():
    raw_mean = [5.81, 3.25, 0.12, -2.15]
    raw_std = [4.17, 4.62, 3.71, 3.28]
    for c in range(4):
        assert math.isclose(lat.SCALE[c], 0.5 / raw_std[c], rel_tol=1e-6)
        assert math.isclose(lat.BIAS[c], -raw_mean[c] * 0.5 / raw_std[c], rel_tol=1e-6)
    np.testing.assert_allclose(lat.SCALE, [0.11990407, 0.10822511, 0.13477089, 0.15243903],
                               rtol=1e-6)
    np.testing.assert_allclose(lat.BIAS, [-0.69664264, -0.35173160, -0.01617251, 0.32774392],
                               rtol=1e-6)
    assert lat.SCALE.dtype == np.float32 and lat.BIAS.dtype == np.float32
    scale, bias = lat.latent_scale_bias(raw_mean=[1.0], raw_std=[2.0], final_mean=3.0,
                                        final_std=4.0)
    assert scale.tolist() == [2.0] and bias.tolist() == [1.0]


def test_encode_latents_samples_the_posterior_and_whitens():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 5, generator=g) * 4
    std = torch.rand(3, 4, 5, 5, generator=g) + 0.1
    raw = torch.cat([mean, std], 1)
    x = lat.encode_latents(raw, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(7))
    scale = torch.tensor(lat.SCALE).reshape(1, 4, 1, 1)
    bias = torch.tensor(lat.BIAS).reshape(1, 4, 1, 1)
    torch.testing.assert_close(x, (mean + eps * std) * scale + bias)
    torch.testing.assert_close(lat.final_to_raw(x), mean + eps * std, rtol=1e-5, atol=1e-5)
    # the round trip without sampling: std = 0 gives the whitened mean, which final_to_raw undoes
    x0 = lat.encode_latents(torch.cat([mean, torch.zeros_like(std)], 1))
    torch.testing.assert_close(lat.final_to_raw(x0), mean, rtol=1e-5, atol=1e-5)


def test_latents_with_edm2s_raw_statistics_come_out_with_mean_0_and_std_half():
    g = torch.Generator().manual_seed(1)
    n = 4096
    m = torch.tensor(lat.RAW_MEAN).reshape(1, 4, 1, 1)
    s = torch.tensor(lat.RAW_STD).reshape(1, 4, 1, 1)
    raw = torch.cat([m + s * torch.randn(n, 4, 1, 1, generator=g), torch.zeros(n, 4, 1, 1)], 1)
    x = lat.encode_latents(raw).reshape(n, 4)
    tol = 5 * 0.5 / math.sqrt(n)  # 5 standard errors of a mean of n draws with std 0.5
    assert (x.mean(0).abs() < tol).all()
    assert ((x.std(0) - 0.5).abs() < 5 * 0.5 / math.sqrt(2 * n)).all()


@pytest.mark.parametrize('fn, shape', [(lat.encode_latents, [2, 4, 8, 8]),
                                       (lat.final_to_raw, [2, 8, 8, 8]),
                                       (lat.final_to_raw, [4, 8, 8])])
def test_wrong_shapes_are_one_line_errors(fn, shape):
    with pytest.raises(ValueError, match=r'must have shape \(N, [48], H, W\)'):
        fn(torch.zeros(shape))

#----------------------------------------------------------------------------
# Decoding through a tiny random VAE.

@needs_diffusers
def test_decode_gives_edm2s_pixels():
    vae = tiny_vae()
    x = torch.randn(5, 4, 8, 8) * 0.5
    images = lat.decode(vae, x, batch_size=8)
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    scale = torch.tensor(lat.SCALE).reshape(1, 4, 1, 1)
    bias = torch.tensor(lat.BIAS).reshape(1, 4, 1, 1)
    with torch.no_grad():
        y = vae.decode((x - bias) / scale).sample
    assert ((y > 0) & (y < 1)).any() and (y < 0).any() and (y > 1).any()  # all three cases occur
    expected = (y.clamp(0, 1) * 255).floor().to(torch.uint8)  # [0, 1] -> 0..255, truncated
    assert (images.int() - expected.int()).abs().max() <= 1
    assert (images == expected).float().mean() > 0.99


@needs_diffusers
def test_decode_in_batches_equals_one_batch_and_bounds_the_batch():
    vae = tiny_vae()
    x = torch.randn(5, 4, 8, 8) * 0.5
    seen = []
    decode = vae.decode
    vae.decode = lambda z: seen.append(len(z)) or decode(z)
    small = lat.decode(vae, x, batch_size=2)
    assert seen == [2, 2, 1]
    whole = lat.decode(vae, x, batch_size=5)
    # float results may differ in the last bits with the batch size; truncation can then move a
    # pixel by one level
    assert (small.int() - whole.int()).abs().max() <= 1
    assert (small == whole).float().mean() > 0.99
    with pytest.raises(ValueError, match='batch_size'):
        lat.decode(vae, x, batch_size=0)
    with pytest.raises(ValueError, match='no latents'):
        lat.decode(vae, x[:0])

#----------------------------------------------------------------------------
# Loading: one line naming what to install or where to put the weights; never a pickle.

def one_line(excinfo):
    msg = str(excinfo.value)
    assert '\n' not in msg
    return msg


def test_missing_diffusers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, 'diffusers', None)  # makes `import diffusers` fail
    with pytest.raises(ValueError) as e:
        lat.vae_from_config(TINY)
    assert 'pip install diffusers' in one_line(e)
    with pytest.raises(ValueError) as e:
        lat.load_vae()
    assert 'pip install diffusers' in one_line(e)


@needs_diffusers
def test_vae_from_a_local_folder(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path, safe_serialization=True)
    loaded = lat.load_vae(str(tmp_path))
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(lat.decode(loaded, x), lat.decode(vae, x))


@needs_diffusers
def test_missing_weights_are_one_line(tmp_path):
    with pytest.raises(ValueError) as e:
        lat.load_vae(str(tmp_path / 'nowhere'), allow_download=False)
    msg = one_line(e)
    assert 'diffusion_pytorch_model.safetensors' in msg and lat.VAE_NAME in msg
    with pytest.raises(ValueError) as e:
        lat.load_vae(str(tmp_path))  # an empty folder
    assert 'HF_HOME' in one_line(e)
    with pytest.raises(ValueError, match='config'):
        lat.vae_from_config(['not', 'a', 'dict'])


class Planted:
    """Unpickling this creates a file: the proof that a pickle ran."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


@needs_diffusers
def test_pickled_weights_are_never_read(tmp_path):
    tiny_vae().save_pretrained(tmp_path, safe_serialization=False)  # a valid .bin (a pickle)
    assert not (tmp_path / 'diffusion_pytorch_model.safetensors').exists()
    with pytest.raises(ValueError) as e:
        lat.load_vae(str(tmp_path))  # refused although it would load: only safetensors are read
    one_line(e)
    planted = tmp_path / 'planted'
    with open(tmp_path / 'diffusion_pytorch_model.bin', 'wb') as f:
        pickle.dump(Planted(str(planted)), f)
    with pytest.raises(ValueError) as e:
        lat.load_vae(str(tmp_path))
    one_line(e)
    assert not planted.exists()
