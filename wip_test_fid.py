# Tests for fid.py (offline: a small TorchScript stand-in replaces the Inception detector).
import os, subprocess, sys
import numpy as np
import pytest
import torch
from PIL import Image

import fid

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(fid.__file__))

#----------------------------------------------------------------------------
# Helpers: random covariances and a detector stand-in with the NVIDIA call signature.

def random_cov(rng, d, rank=None, scale=1.0):
    a = rng.standard_normal((d, rank or d)) * scale
    return a @ a.T / (rank or d)

def sqrtm_reference(mu1, s1, mu2, s2):
    linalg = pytest.importorskip('scipy.linalg')
    root = linalg.sqrtm(s1 @ s2).real  # EDM's formula
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))

class StandInDetector(torch.nn.Module):
    """forward(img uint8, return_features) like NVIDIA's .pt: float cast, fixed resize, (x-128)/128, features."""
    def __init__(self, dim=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, dim, generator=g), requires_grad=False)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = (img.to(torch.float32) - 128) / 128
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (N, 48)
        features = torch.tanh(x @ self.proj)  # (N, dim)
        return features if return_features else features.sum(1, keepdim=True)

@pytest.fixture
def detector_path(tmp_path):
    path = str(tmp_path / 'standin.pt')
    torch.jit.save(torch.jit.script(StandInDetector()), path)
    return path

def write_pngs(folder, n, size=8, seed=0, mode='RGB'):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size, 3) if mode == 'RGB' else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(f'{folder}/{i:05d}.png')

def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=HERE)
    return subprocess.run([sys.executable, os.path.join(HERE, 'fid.py'), *args], capture_output=True,
                          text=True, env=env, timeout=120)

#----------------------------------------------------------------------------
# Frechet distance: closed forms, invariants, and scipy.linalg.sqrtm (EDM's way).

def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(64), random_cov(rng, 64)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    s_low = random_cov(rng, 64, rank=20)  # rank-deficient, as with fewer images than features
    assert abs(fid.frechet_distance(mu, s_low, mu, s_low)) < 1e-6 * np.trace(s_low)

def test_frechet_closed_form_commuting():
    rng = np.random.default_rng(1)
    d = 128
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenbasis -> commuting covariances
    a, b = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    closed_form = lambda a, b: np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(closed_form(a, b), rel=1e-10)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed_form(a, b), rel=1e-12)
    a[:10] = 0  # singular directions: eigenvalues ~1e-16 have square roots ~1e-8, so only ~1e-7 absolute
    got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(closed_form(a, b), abs=1e-5)

def test_frechet_symmetric_and_scaling():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.standard_normal(32), rng.standard_normal(32), random_cov(rng, 32), random_cov(rng, 32)
    fd = fid.frechet_distance(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-10)
    assert fid.frechet_distance(3 * mu1, 9 * s1, 3 * mu2, 9 * s2) == pytest.approx(9 * fd, rel=1e-10)
    assert fid.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)

@pytest.mark.parametrize('d,rank', [(64, None), (256, None), (128, 40), (200, 199)])
def test_frechet_matches_scipy_sqrtm(d, rank):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    s1, s2 = random_cov(rng, d, rank), random_cov(rng, d, rank, scale=1.3)
    expected = sqrtm_reference(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)

def test_frechet_dimension_mismatch():
    with pytest.raises(ValueError, match='do not match'):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(5), np.eye(5))
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(4), np.eye(3), np.zeros(4), np.eye(4))

#----------------------------------------------------------------------------
# Streaming statistics.

def test_feature_stats_match_numpy_any_split():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((101, 12)) * rng.uniform(0.1, 5, 12) + rng.standard_normal(12) * 3
    for sizes in ([101], [1, 50, 50], [7] * 14 + [3]):
        perm = rng.permutation(len(f))
        stats, start = fid.FeatureStats(), 0
        for size in sizes:
            stats.update(torch.from_numpy(f[perm[start:start + size]]))
            start += size
        mu, sigma = stats.mean_cov()
        assert stats.n == 101 and mu.dtype == np.float64 and sigma.dtype == np.float64
        np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(f, rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)

def test_feature_stats_merge_and_all_reduce():
    rng = np.random.default_rng(4)
    f = torch.from_numpy(rng.standard_normal((30, 5)))
    one, a, b = fid.FeatureStats(), fid.FeatureStats(), fid.FeatureStats()
    one.update(f); a.update(f[:11]); b.update(f[11:])
    merged = fid.FeatureStats().merge(a).merge(b)
    for x, y in zip(merged.mean_cov(), one.mean_cov()):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
    # Fake 2-rank all_reduce: each tensor is summed with the other rank's copy.
    other = {0: torch.tensor(float(b.n), dtype=torch.float64), 1: b.sum, 2: b.sum_outer}
    calls = []
    def all_reduce(t):
        t += other[len(calls)]
        calls.append(t)
    a.all_reduce(all_reduce)
    assert a.n == 30 and len(calls) == 3
    np.testing.assert_allclose(a.mean_cov()[1], one.mean_cov()[1], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        s = fid.FeatureStats(); s.update(f[:1]); s.mean_cov()

#----------------------------------------------------------------------------
# Images, detector and reference files.

def test_to_uint8_edm_rule():
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 5.0, 100.9 / 127.5 - 128 / 127.5, 0.999 / 127.5])
    assert fid.to_uint8(x).tolist() == [0, 128, 255, 0, 255, 100, 128]  # truncation, not rounding
    assert fid.to_uint8(x).dtype == torch.uint8

def test_detector_load_and_features(detector_path, monkeypatch):
    det = fid.load_detector('cpu', detector_path)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    features = fid.extract_features(det, images, 'cpu')
    assert features.shape == (5, 16) and features.dtype == torch.float64
    assert torch.equal(features, StandInDetector()(images, True).double())
    gray = images[:, :1]  # 1 channel is repeated to 3
    assert torch.equal(fid.extract_features(det, gray, 'cpu'),
                       fid.extract_features(det, gray.repeat(1, 3, 1, 1), 'cpu'))
    with pytest.raises(ValueError):
        fid.extract_features(det, images.float(), 'cpu')
    monkeypatch.setenv('SID_DETECTOR', detector_path)  # the environment variable is honoured
    assert torch.equal(fid.extract_features(fid.load_detector('cpu'), images, 'cpu'), features)
    with pytest.raises(FileNotFoundError):
        fid.load_detector('cpu', detector_path + '.missing')

def test_compute_stats_and_generator_fid(detector_path):
    det = fid.load_detector('cpu', detector_path)
    def make_batch(seeds):  # deterministic per seed, float in [-1, 1]
        return torch.stack([torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) * 2 - 1
                            for s in seeds])
    images = fid.to_uint8(make_batch(range(40)))
    mu, sigma = fid.compute_stats_from_images([images[:13], images[13:]], det, 'cpu')
    assert fid.fid_of_generator(make_batch, 40, mu, sigma, det, 'cpu', batch=7) == pytest.approx(0, abs=1e-9)
    # Two simulated ranks: each rank's sums, added, give the one-process statistics.
    ranks = [fid.FeatureStats().update(fid.extract_features(det, images[r::2], 'cpu')) for r in range(2)]
    for r in range(2):
        other = ranks[1 - r]
        tensors = iter([torch.tensor(float(other.n), dtype=torch.float64), other.sum, other.sum_outer])
        def all_reduce(t):
            t += next(tensors)
        value = fid.fid_of_generator(make_batch, 40, mu, sigma, det, 'cpu', batch=6, rank=r, world_size=2,
                                     all_reduce=all_reduce)
        assert value == pytest.approx(0, abs=1e-9)

def test_ref_npz_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(6), random_cov(rng, 6)
    path = str(tmp_path / 'ref.npz')
    fid.save_ref(path, mu, sigma)
    assert sorted(os.listdir(tmp_path)) == ['ref.npz']  # no temporary file left behind
    with np.load(path) as data:  # EDM's keys and dtype
        assert set(data.files) == {'mu', 'sigma'} and data['sigma'].dtype == np.float64
    mu2, sigma2 = fid.load_ref(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    (tmp_path / 'bad.npz').write_bytes(b'not a zip')
    with pytest.raises(ValueError):
        fid.load_ref(str(tmp_path / 'bad.npz'))
    np.savez(str(tmp_path / 'keys.npz'), mean=mu)
    with pytest.raises(ValueError):
        fid.load_ref(str(tmp_path / 'keys.npz'))
    assert set(fid.REF_PRESETS) == {'cifar10-32x32', 'imagenet-64x64', 'ffhq-64x64', 'afhqv2-64x64'}

def test_image_folder_reader(tmp_path):
    write_pngs(str(tmp_path / 'a' / 'sub'), 3)
    write_pngs(str(tmp_path / 'a'), 2, mode='L', seed=1)  # grayscale -> RGB by repetition
    files = fid.list_images(str(tmp_path / 'a'))
    assert len(files) == 5 and files == sorted(files)
    batches = list(fid.iterate_image_files(files, 2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    gray = np.asarray(Image.open(files[0]))
    assert np.array_equal(batches[0][0].numpy(), np.stack([gray] * 3))
    subset = fid.list_images(str(tmp_path / 'a'), num=3, seed=0)
    assert len(subset) == 3 and set(subset) <= set(files) and subset == sorted(subset)
    write_pngs(str(tmp_path / 'b'), 12)
    subsets = [fid.list_images(str(tmp_path / 'b'), num=4, seed=seed) for seed in (0, 1)]
    assert subsets[0] != subsets[1] and fid.list_images(str(tmp_path / 'b'), num=4, seed=0) == subsets[0]
    all_b = fid.list_images(str(tmp_path / 'b'))
    assert subsets[0] == [all_b[i] for i in (4, 6, 10, 11)]  # EDM's rule: RandomState(0).shuffle, sort first 4

#----------------------------------------------------------------------------
# Command line and plot.

def test_cli_ref_then_calc(tmp_path, detector_path, capsys):
    folder, ref = str(tmp_path / 'imgs'), str(tmp_path / 'ref.npz')
    write_pngs(folder, 24)
    fid.main(['ref', '--data', folder, '--dest', ref, '--detector', detector_path, '--batch', '5'])
    assert fid.load_ref(ref)[0].shape == (16,)
    out = run_cli('calc', '--images', folder, '--ref', ref, '--num', '24', '--detector', detector_path)
    assert out.returncode == 0, out.stderr
    assert abs(float(out.stdout.split()[-1])) < 1e-6  # same images as the reference
    write_pngs(str(tmp_path / 'other'), 24, seed=1)  # in-process: a subprocess costs ~2 s
    fid.main(['calc', '--images', str(tmp_path / 'other'), '--ref', ref, '--num', '24',
              '--detector', detector_path])
    assert float(capsys.readouterr().out.split()[-1]) > 1e-3

def test_cli_bad_inputs(tmp_path, detector_path, capsys):
    fid.save_ref(str(tmp_path / 'ref8.npz'), np.zeros(8), np.eye(8))  # the detector gives 16 features
    out = run_cli('calc', '--images', str(tmp_path / 'missing'), '--ref', str(tmp_path / 'ref8.npz'))
    assert out.returncode == 2 and out.stderr.startswith('error: ') and len(out.stderr.splitlines()) == 1
    write_pngs(str(tmp_path / 'mixed'), 3)
    write_pngs(str(tmp_path / 'mixed' / 'big'), 1, size=16)
    os.makedirs(tmp_path / 'empty')
    (tmp_path / 'bad.npz').write_bytes(b'garbage')
    write_pngs(str(tmp_path / 'ok'), 4)
    det, dest = ['--detector', detector_path], str(tmp_path / 'x.npz')
    cases = [['ref', '--data', str(tmp_path / 'missing'), '--dest', dest, *det],
             ['ref', '--data', str(tmp_path / 'mixed'), '--dest', dest, *det],
             ['ref', '--data', str(tmp_path / 'empty'), '--dest', dest, *det],
             ['ref', '--data', str(tmp_path / 'ok'), '--dest', dest, '--detector', str(tmp_path / 'bad.npz')],
             ['calc', '--images', str(tmp_path / 'ok'), '--ref', str(tmp_path / 'bad.npz'), '--num', '4', *det],
             ['calc', '--images', str(tmp_path / 'ok'), '--ref', str(tmp_path / 'ref8.npz'), '--num', '4', *det],
             ['calc', '--images', str(tmp_path / 'ok'), '--ref', str(tmp_path / 'ref8.npz'), '--num', '9', *det]]
    for args in cases:
        with pytest.raises(SystemExit) as exit_info:
            fid.main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, err)
        assert err.startswith('error: ') and len(err.splitlines()) == 1, (args, err)
    assert not os.path.exists(dest)

def test_plot_curve(tmp_path):
    path = str(tmp_path / 'fid.png')
    fid.plot_curve([(0, 80.5), (0.5, 20.1), (1.0, 9.3), (2.0, 4.2)], path)
    with Image.open(path) as img:
        img.load()
        assert img.format == 'PNG' and img.size == (560, 360)
        assert len(img.getcolors(1 << 16)) > 3  # more than a blank canvas
    fid.plot_curve([(1, 3.0)], path)  # one point, flat range
    assert os.listdir(tmp_path) == ['fid.png']
    assert fid._nice_ticks(0, 2) == pytest.approx([0, 0.5, 1, 1.5, 2])
