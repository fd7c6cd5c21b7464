"""Tests of fid: the Frechet distance (closed forms, scipy), streaming statistics, a TorchScript
detector stand-in, EDM's reference files, the command line, the detector's trust rule and the
reference statistics' checks."""
import os
import pickle
from typing import Tuple

import numpy as np
import PIL.Image
import pytest
import torch

import fid
import fileio
import metrics
from conftest import (Evil, FidStandIn, detector_file, edm_files, flip_member_byte, write_bytes,
                      write_dataset, write_pngs)


def random_cov(rng, d, rank=None, scale=1.0):
    a = rng.standard_normal((d, rank or d)) * scale
    return a @ a.T / (rank or d)


def test_frechet_closed_forms_and_scipy():
    rng, d = np.random.default_rng(1), 128
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenbasis: commuting covariances
    a, b = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)

    def closed(a, b):
        return np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)

    fd = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert fd == pytest.approx(closed(a, b), rel=1e-10)
    a[:10] = 0  # singular directions: eigenvalues ~1e-16 have square roots ~1e-8
    fd = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert fd == pytest.approx(closed(a, b), abs=1e-5)
    s1, s2, low = random_cov(rng, 32), random_cov(rng, 32), random_cov(rng, 64, rank=20)
    m1, m2 = mu1[:32], mu2[:32]
    fd = fid.frechet_distance(m1, s1, m2, s2)
    assert fid.frechet_distance(m2, s2, m1, s1) == pytest.approx(fd, rel=1e-10)
    assert fid.frechet_distance(3 * m1, 9 * s1, 3 * m2, 9 * s2) == pytest.approx(9 * fd, rel=1e-10)
    assert abs(fid.frechet_distance(mu1[:64], low, mu1[:64], low)) < 1e-6 * np.trace(low)
    # EDM's way, scipy.linalg.sqrtm of the product; without scipy the eigenvalues of the
    # (non-symmetric) product
    try:
        from scipy.linalg import sqrtm

        def tr_sqrt(m):
            return np.trace(sqrtm(m).real)
    except ImportError:
        def tr_sqrt(m):
            return np.sqrt(np.clip(np.linalg.eigvals(m).real, 0, None)).sum()
    for d, rank in ((64, None), (128, 40), (200, 199)):
        m1, m2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
        c1, c2 = random_cov(rng, d, rank), random_cov(rng, d, rank, 1.3)
        expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2) - 2 * tr_sqrt(c1 @ c2)
        assert fid.frechet_distance(m1, c1, m2, c2) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match='do not match'):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(5), np.eye(5))


def test_feature_stats_any_split_and_all_reduce():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((101, 12)) * rng.uniform(0.1, 5, 12) + rng.standard_normal(12) * 3
    for sizes in ([101], [1, 50, 50], [7] * 14 + [3]):
        perm, stats = rng.permutation(len(f)), fid.FeatureStats()
        for n, s in zip(sizes, np.cumsum(sizes)):
            stats.update(torch.from_numpy(f[perm[s - n:s]]))
        mu, cov = stats.mean_cov()
        np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cov, np.cov(f, rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)
    a, b = fid.FeatureStats(), fid.FeatureStats()
    a.update(torch.from_numpy(f[:40]))
    b.update(torch.from_numpy(f[40:]))
    # a fake 2-rank all_reduce
    other = iter([torch.tensor(float(b.n), dtype=torch.float64), b.sum, b.sum_outer])
    a.all_reduce(lambda t: t.add_(next(other)))
    np.testing.assert_allclose(a.mean_cov()[1], np.cov(f, rowvar=False, ddof=1), rtol=1e-10,
                               atol=1e-12)
    one = fid.FeatureStats()
    one.update(torch.from_numpy(f[:1]))
    with pytest.raises(ValueError):
        one.mean_cov()


def test_to_uint8_detector_and_generator_fid(tmp_path, monkeypatch):
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 5.0, 100.9 / 127.5 - 128 / 127.5, 0.999 / 127.5,
                      1 / 127.5, -125 / 127.5])
    # EDM: +128 and truncation (round(x*127.5+127.5) would give 128, 2)
    assert fid.to_uint8(x).tolist() == [0, 128, 255, 0, 255, 100, 128, 129, 3]
    path = detector_file(tmp_path / 'standin.pt')
    det = fid.load_detector('cpu', path, trusted=True)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    features = fid.extract_features(det, images, 'cpu')
    assert features.dtype == torch.float64
    assert torch.equal(features, FidStandIn()(images, True).double())
    gray = images[:, :1]
    assert torch.equal(fid.extract_features(det, gray, 'cpu'),
                       fid.extract_features(det, gray.repeat(1, 3, 1, 1), 'cpu'))
    with pytest.raises(ValueError):
        fid.extract_features(det, images.float(), 'cpu')
    monkeypatch.setenv('SID_DETECTOR', path)
    monkeypatch.setenv('SID_TRUST_DETECTOR', '1')
    assert torch.equal(fid.extract_features(fid.load_detector('cpu'), images, 'cpu'), features)

    def make(seeds):
        return torch.stack([torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) * 2 - 1
                            for s in seeds])

    batches = [fid.to_uint8(make(range(13))), fid.to_uint8(make(range(13, 40)))]
    mu, sigma = fid.compute_stats_from_images(batches, det, 'cpu')
    same = fid.fid_of_generator(make, 40, mu, sigma, det, 'cpu', batch=7)
    assert same == pytest.approx(0, abs=1e-9)
    with pytest.raises(RuntimeError, match='needs an initialised torch.distributed'):
        fid.fid_of_generator(make, 40, mu, sigma, det, 'cpu', rank=1, world_size=2)


def test_fid_files_and_cli(tmp_path, capsys):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(6), random_cov(rng, 6)
    fid.save_ref(str(tmp_path / 'ref6.npz'), mu, sigma)
    with np.load(tmp_path / 'ref6.npz') as npz:  # EDM's keys and dtype, no temporary left
        assert os.listdir(tmp_path) == ['ref6.npz'] and set(npz.files) == {'mu', 'sigma'}
        assert npz['sigma'].dtype == np.float64
    loaded = fid.load_ref(str(tmp_path / 'ref6.npz'))
    assert all(np.array_equal(a, b) for a, b in zip(loaded, (mu, sigma)))
    write_bytes(tmp_path / 'bad.npz', b'not a zip')
    np.savez(str(tmp_path / 'keys.npz'), mean=mu)
    for bad in ('bad.npz', 'keys.npz'):
        with pytest.raises(ValueError):
            fid.load_ref(str(tmp_path / bad))
    all_b = fid.list_images(write_pngs(tmp_path / 'b', 12))
    # EDM's subset rule
    assert fid.list_images(str(tmp_path / 'b'), num=4, seed=0) == [all_b[i] for i in (4, 6, 10, 11)]
    folder, ref = write_pngs(tmp_path / 'imgs', 24), str(tmp_path / 'ref.npz')
    det = ['--detector', detector_file(tmp_path / 'det.pt'), '--trust-detector']
    fid.main(['ref', '--data', folder, '--dest', ref, *det, '--batch', '5'])
    fid.main(['calc', '--images', folder, '--ref', ref, '--num', '24', *det])
    assert abs(float(capsys.readouterr().out.split()[-1])) < 1e-6  # the reference's own images
    files, chw, _ = edm_files(n=24, size=8)  # a dataset zip goes through data.load_dataset
    zipped = write_dataset(tmp_path / 'd.zip', files, None, 'zip')
    fid.main(['ref', '--data', zipped, '--dest', str(tmp_path / 'z.npz'), *det])
    expected = FidStandIn()(torch.from_numpy(chw), True).double().mean(0).numpy()
    assert np.allclose(fid.load_ref(str(tmp_path / 'z.npz'))[0], expected)
    write_pngs(tmp_path / 'mixed', 3)
    write_pngs(tmp_path / 'mixed' / 'big', 1, size=16)
    os.makedirs(tmp_path / 'empty')
    dest = str(tmp_path / 'x.npz')
    bad_args = [['ref', '--data', str(tmp_path / d), '--dest', dest, *det]
                for d in ('missing', 'mixed', 'empty')]
    bad_args += [
        ['ref', '--data', folder, '--dest', dest, '--detector', ref, '--trust-detector'],
        # the detector gives 16 features, ref6 has 6
        ['calc', '--images', folder, '--ref', str(tmp_path / 'ref6.npz'), '--num', '4', *det],
        ['calc', '--images', folder, '--ref', ref, '--num', '99', *det]]
    for args in bad_args:
        with pytest.raises(SystemExit) as e:
            fid.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error: '), (args, err)
        assert len(err.splitlines()) == 1, (args, err)
    assert not os.path.exists(dest)

#----------------------------------------------------------------------------
# What a file may do: a TorchScript detector is code (it runs when loaded), so only NVIDIA's (by
# its SHA-256) runs unless the user trusts another; reference statistics are checked numbers.

class WritesAtLoad(torch.nn.Module):
    """A TorchScript 'detector' whose loading creates a file (torch.from_file, shared)."""
    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.touched = 0.0

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool, float]:
        return (self.marker, self.training, self.touched)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool, float]) -> None:
        self.marker, self.training = state[0], state[1]
        self.touched = float(torch.from_file(self.marker, True, 8).sum())

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return img.float().flatten(1)[:, :16] + self.touched


def test_only_nvidias_detector_runs_unless_trusted(tmp_path, monkeypatch, capsys):
    marker, evil = tmp_path / 'marker', str(tmp_path / 'evil.pt')
    torch.jit.save(torch.jit.script(WritesAtLoad(str(marker))), evil)
    folder, ref = write_pngs(tmp_path / 'imgs', 4), str(tmp_path / 'ref.npz')
    fid.save_ref(ref, np.zeros(16), np.eye(16))
    for env in ({}, {'SID_DETECTOR': evil}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            fid.main(['calc', '--images', folder, '--ref', ref, '--num', '4']
                     + ([] if env else ['--detector', evil]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1
        assert "not NVIDIA's Inception detector" in err and 'TorchScript file is code' in err
    assert not marker.exists()  # refused before it ran
    fid.load_detector('cpu', evil, trusted=True)  # trusted: it runs, and writes
    assert marker.exists()
    standin = detector_file(tmp_path / 'standin.pt')
    monkeypatch.setattr(fid, 'DETECTOR_SHA256', fileio.sha256_of(standin))  # "NVIDIA's" now
    assert fid.load_detector('cpu', standin) is not None
    corrupt = write_bytes(tmp_path / 'corrupt.pt', flip_member_byte(standin, '/data/0'))
    with pytest.raises(ValueError, match='corrupt.pt: corrupt or unreadable zip.*CRC'):
        fid.load_detector('cpu', corrupt, trusted=True)
    # NVIDIA's VGG16, named by the project: its bytes are checked against KNOWN_FILES (here the
    # hash recorded when it was cached), so it runs without --trust-detector; a local copy does not
    monkeypatch.setenv('SID_CACHE', str(tmp_path / 'cache'))
    cached = fileio.cache_path(metrics.VGG16_URL)
    os.makedirs(os.path.dirname(cached))
    write_bytes(cached, open(standin, 'rb').read())
    monkeypatch.setattr(fid, 'DETECTOR_SHA256', '0' * 64)
    assert fid.load_detector('cpu', metrics.VGG16_URL) is not None
    with pytest.raises(ValueError, match="not NVIDIA's Inception detector"):
        fid.load_detector('cpu', cached)


def bad_refs(d):
    """(file, message): reference statistics a Frechet distance must not use."""
    eye, mu = np.eye(4), np.zeros(4)
    asym = eye.copy()
    asym[0, 1] = 0.5
    cases = [('nan', dict(mu=np.array([np.nan, 0, 0, 0]), sigma=eye), 'NaN or infinite'),
             ('asym', dict(mu=mu, sigma=asym), 'not symmetric'),
             ('negdef', dict(mu=mu, sigma=-eye), r'not positive semi-definite \(eigenvalue -1'),
             ('complex', dict(mu=mu, sigma=eye.astype(np.complex128)), 'plain numbers only'),
             ('shape', dict(mu=mu, sigma=np.eye(3)), r'mu \(4,\), sigma \(3, 3\)'),
             ('keys', dict(mean=mu), 'not an .npz file with mu, sigma')]
    out = []
    for name, arrays, msg in cases:
        np.savez(str(d / f'{name}.npz'), **arrays)
        out.append((str(d / f'{name}.npz'), msg))
    return out


def test_reference_statistics_are_checked(tmp_path, capsys):
    for path, msg in bad_refs(tmp_path):
        with pytest.raises(ValueError, match=msg):
            fid.load_ref(path)
    # the CLI refuses before it reads an image: one line, exit code 2
    with pytest.raises(SystemExit) as e:
        fid.main(['calc', '--images', write_pngs(tmp_path / 'imgs', 2), '--ref',
                  str(tmp_path / 'nan.npz'), '--num', '2'])
    assert e.value.code == 2 and 'NaN or infinite' in capsys.readouterr().err
    mu, sigma = np.zeros(4), np.diag([1.0, 2.0, 0.0, 3.0])  # semi-definite, as EDM's may be
    fid.save_ref(str(tmp_path / 'ok.npz'), mu, sigma)
    assert np.array_equal(fid.load_ref(str(tmp_path / 'ok.npz'))[1], sigma)

def test_edm2_reference_pickle_and_uint8_generators(tmp_path):
    """EDM2's img512.pkl layout (a plain pickle: num_images, fid {mu, sigma}, fd_dinov2 {...}) reads
    as an .npz does, through the bounded unpickler; a generator may hand over uint8 images (EDM2's
    decoded latents) as well as floats in [-1, 1]."""
    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=16), rng.normal(size=(16, 16))
    ref = dict(num_images=50, fid=dict(mu=mu, sigma=a @ a.T),
               fd_dinov2=dict(mu=np.zeros(4), sigma=np.eye(4)))
    path = write_bytes(tmp_path / 'img512.pkl', pickle.dumps(ref, protocol=4))
    got_mu, got_sigma = fid.load_ref(path)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, a @ a.T)
    assert fid.REF_PRESETS['img512'].endswith('/edm2/dataset-refs/img512.pkl')
    for bad, match in ((dict(fid=dict(mu=mu)), 'not reference statistics'), ([1], 'not reference'),
                       (dict(fid=dict(mu=mu, sigma=Evil(os.system, 'true'))),
                        'refusing to load global')):
        with pytest.raises(ValueError, match=match):
            fid.load_ref(write_bytes(tmp_path / 'bad.pkl', pickle.dumps(bad, protocol=2)))
    det = fid.load_detector('cpu', detector_file(tmp_path / 'standin.pt'), trusted=True)

    def floats(seeds):
        return torch.stack([torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) * 2 - 1
                            for s in seeds])

    mu, sigma = fid.compute_stats_from_images([fid.to_uint8(floats(range(20)))], det, 'cpu')
    as_uint8 = fid.fid_of_generator(lambda s: fid.to_uint8(floats(s)), 20, mu, sigma, det, 'cpu',
                                    batch=6)
    assert as_uint8 == pytest.approx(0, abs=1e-9)

def test_calc_seed_chooses_the_subset(tmp_path, capsys):
    """`fid.py calc --num 4 --seed S` scores the 4 images that EDM's rule picks with seed S (a
    numpy RandomState(S) shuffle of the sorted files, the first 4 indices in order): its FID is
    computed here from those files, and seed 0 gives another value."""
    folder, ref = write_pngs(tmp_path / 'imgs', 24), str(tmp_path / 'ref.npz')
    det = ['--detector', detector_file(tmp_path / 'det.pt'), '--trust-detector']
    fid.main(['ref', '--data', folder, '--dest', ref, *det])
    mu_ref, sig_ref = fid.load_ref(ref)
    names = sorted(os.listdir(folder))

    def expected(seed):
        idx = np.arange(len(names))
        np.random.RandomState(seed).shuffle(idx)
        arrays = []
        for i in sorted(idx[:4]):
            with PIL.Image.open(os.path.join(folder, names[i])) as im:
                arrays.append(np.asarray(im).transpose(2, 0, 1))
        f = FidStandIn()(torch.from_numpy(np.stack(arrays)), True).double().numpy()
        return fid.frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu_ref, sig_ref)

    capsys.readouterr()
    got = {}
    for seed in (1, 0):
        fid.main(['calc', '--images', folder, '--ref', ref, '--num', '4', '--seed', str(seed),
                  *det])
        got[seed] = float(capsys.readouterr().out.split()[-1])
        assert got[seed] == pytest.approx(expected(seed), rel=1e-5)
    assert got[0] != pytest.approx(got[1], rel=1e-3)


def test_generator_fid_over_ranks_scores_each_seed_once(tmp_path, monkeypatch):
    """Two ranks (run one after the other, torch.distributed's all_reduce played by hand): rank r
    scores seeds r, r+2, ...; together every seed once, and rank 0's FID from the summed statistics
    is the one-process FID."""
    det = fid.load_detector('cpu', detector_file(tmp_path / 'det.pt'), trusted=True)
    seen = {0: [], 1: []}

    def images(seeds):
        return torch.stack([torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) * 2 - 1
                            for s in seeds])

    def maker(rank):
        def make(seeds):
            seen[rank].extend(seeds)
            return images(seeds)
        return make

    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16) * 0.1, random_cov(rng, 16)
    one = fid.fid_of_generator(images, 40, mu, sigma, det, 'cpu', batch=7)
    monkeypatch.setattr(torch.distributed, 'is_available', lambda: True)
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    sent = []

    def send(t):  # rank 1: its sums go out, the others' (rank 0's) are not needed for this test
        sent.append(t.clone())

    monkeypatch.setattr(torch.distributed, 'all_reduce', send)
    fid.fid_of_generator(maker(1), 40, mu, sigma, det, 'cpu', batch=7, rank=1, world_size=2)
    received = iter(sent)

    def add(t):
        t.add_(next(received))

    monkeypatch.setattr(torch.distributed, 'all_reduce', add)
    two = fid.fid_of_generator(maker(0), 40, mu, sigma, det, 'cpu', batch=7, rank=0, world_size=2)
    assert sorted(seen[0] + seen[1]) == list(range(40)) and seen[1] == list(range(1, 40, 2))
    assert two == pytest.approx(one, rel=1e-9)
