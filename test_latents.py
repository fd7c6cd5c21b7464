"""Tests of latents.py: EDM2's latent scale/bias and raw <-> final conversion against the
formulas, decoding and encoding through a tiny randomly initialised AutoencoderKL (no download;
skipped if diffusers, an optional dependency, is not installed), posterior samples, and the encode
command."""
import json
import math
import pickle
import sys
import zipfile

import numpy as np
import pytest
import torch

import latents as lat
from conftest import needs_diffusers


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

#----------------------------------------------------------------------------
# The run's VAE, real latents for SiDA (a posterior sample per use, reproducible per batch), and
# `python latents.py encode` (EDM2's dataset_tool.py encode) read back by data.LatentDataset.

def test_is_latent_and_the_random_vae():
    import edm_nets
    assert lat.is_latent(edm_nets.build_preset('edm2-img512-xs', model_channels=8,
                                               channel_mult=[1], attn_resolutions=[]))
    img64 = dict(img_resolution=8, img_channels=3, model_type='EDM2UNet', model_channels=8,
                 channel_mult=[1], attn_resolutions=[])
    assert not lat.is_latent(edm_nets.EDM2Precond(**img64))  # EDM2's pixel nets
    assert not lat.is_latent(edm_nets.build_preset('cifar10-32x32-uncond-vp', model_channels=8))


@needs_diffusers
def test_random_vae_is_fixed_and_leaves_the_random_state_alone():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = lat.open_vae('random')
    assert torch.equal(torch.random.get_rng_state(), before)
    b = lat.open_vae('random')
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x = lat.decode(a, torch.randn(2, 4, 4, 4))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8  # the SD VAE's 8x, 3 channels


def test_posterior_samples_are_fresh_per_batch_and_reproducible():
    raw = torch.cat([torch.randn(3, 4, 2, 2), torch.rand(3, 4, 2, 2) + 0.5], 1)
    stream = [(raw, 'c')] * 4
    xs = [x for x, c in lat.posterior_samples(stream, seed=1)]
    assert not torch.equal(xs[0], xs[1])  # a fresh sample every time a latent is used
    resumed = [x for x, _ in lat.posterior_samples(stream[2:], seed=1, start=2)]
    assert all(torch.equal(a, b) for a, b in zip(xs[2:], resumed))
    other_rank = next(lat.posterior_samples(stream, seed=1, rank=1))[0]
    assert not torch.equal(xs[0], other_rank)
    key = np.random.SeedSequence(1, spawn_key=(0, 3)).generate_state(1, np.uint64)[0]
    want = lat.encode_latents(raw, torch.Generator().manual_seed(int(key)))
    assert torch.equal(xs[3], want)


@needs_diffusers
def test_encode_pixels_is_the_posterior_of_pixels_in_0_1():
    vae = tiny_vae()
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    raw = lat.encode_pixels(vae, images, batch_size=2)
    with torch.no_grad():
        d = vae.encode(images.float() / 255).latent_dist
    assert raw.shape == (3, 8, 8, 8)
    torch.testing.assert_close(raw, torch.cat([d.mean, d.std], 1), rtol=1e-5, atol=1e-6)


@needs_diffusers
def test_encode_command_writes_edm2s_layout(tmp_path, capsys):
    import data
    from conftest import edm_files, write_dataset
    files, arrs, ys = edm_files(n=3, size=32)
    src = write_dataset(tmp_path / 'img.zip', files, {'labels': [[n, y] for n, y in
                                                                 zip(files, ys)]}, 'zip')
    dest = tmp_path / 'img-sd.zip'
    lat.main(['encode', '--source', src, '--dest', str(dest), '--vae', 'random', '--device', 'cpu',
              '--batch', '2'])
    with zipfile.ZipFile(dest) as zf:
        names = sorted(zf.namelist())
        meta = json.loads(zf.read('dataset.json'))
    npys = ['00000/img-mean-std-00000000.npy', '00000/img-mean-std-00000001.npy',
            '00000/img-mean-std-00000002.npy']
    assert names == npys + ['dataset.json']
    assert meta == {'labels': [[n, y] for n, y in zip(npys, ys)]}
    ds = data.LatentDataset(dest)
    raw = lat.encode_pixels(lat.open_vae('random'), torch.from_numpy(arrs), batch_size=2)
    assert ds.shape == (8, 4, 4)
    torch.testing.assert_close(ds.batch(range(3)), raw, rtol=1e-5, atol=1e-5)  # oneDNN rounding
    for args, msg in (([], 'exists'), (['--max-images', '0'], '>= 1')):
        with pytest.raises(SystemExit) as e:
            lat.main(['encode', '--source', src, '--dest', str(dest), '--vae', 'random', *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error:') and msg in err
        assert err.count('\n') == 1
