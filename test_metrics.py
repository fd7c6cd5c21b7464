"""Tests of metrics: the Inception Score and precision/recall against closed forms and independent
computations, OpenAI's .npz reference batches, the in-memory evaluation end to end with a
TorchScript detector stand-in on a tiny generator, and the refusals before any image is made."""
import os
import zipfile

import numpy as np
import pytest
import torch

import fid
import metrics
import runs
from conftest import FidStandIn, detector_file, tiny_net

#----------------------------------------------------------------------------
# Inception Score.

def official_is(probs, splits):
    """StyleGAN2-ADA's formula, written out: per slice i*N//S .. (i+1)*N//S, exp of the mean KL
    between each row and the slice's mean row; mean and population std over the slices."""
    n, scores = len(probs), []
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part) - np.log(marginal))).sum(1).mean()
        scores.append(np.exp(kl))
    return np.mean(scores), np.std(scores)


def test_inception_score_closed_forms():
    classes, n = 10, 60
    uniform = np.full((n, classes), 1 / classes)  # p(y|x) = p(y): KL = 0
    assert metrics.inception_score(uniform, splits=3) == pytest.approx((1, 0), abs=1e-12)
    one_class = np.eye(classes)[np.zeros(n, int)]
    assert metrics.inception_score(one_class, splits=3) == pytest.approx((1, 0), abs=1e-12)
    for k in (2, 5, classes):  # one-hot, k classes equally often in every split: IS = k
        spread = np.eye(classes)[np.arange(n) % k]
        assert metrics.inception_score(spread, splits=3) == pytest.approx((k, 0), abs=1e-9)
    # splits with different k: the mean and the population std of the per-split scores
    mixed = np.eye(classes)[np.concatenate([np.arange(20) % 2, np.arange(20) % 4])]
    assert metrics.inception_score(mixed, splits=2) == pytest.approx((3, 1), abs=1e-9)


def test_inception_score_streamed_equals_the_official_formula():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((103, 7)) * 3  # 103 rows: splits of 10 and 11
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = official_is(probs, 10)
    assert metrics.inception_score(probs) == pytest.approx(expected, rel=1e-12)
    score = metrics.InceptionScore(len(probs))
    for a, b in ((0, 1), (1, 38), (38, 103)):  # batches across split borders
        score.update(torch.from_numpy(probs[a:b]))
    assert score.result() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match='got 38 of 103'):
        metrics.InceptionScore(len(probs)).update(probs[:38]).result()
    with pytest.raises(ValueError, match='one image per split'):
        metrics.InceptionScore(9)

#----------------------------------------------------------------------------
# Precision and recall.

def brute_force_pr(real, gen, k):
    """Full distance matrices in float64; radius = the k-th nearest other point by sorting."""
    def inside(probes, manifold):
        radii = np.sort(np.linalg.norm(manifold[:, None] - manifold[None], axis=2), axis=1)[:, k]
        d = np.linalg.norm(probes[:, None] - manifold[None], axis=2)
        return (d <= radii[None]).any(1).mean()

    return inside(gen, real), inside(real, gen)


def test_precision_recall_closed_forms_and_brute_force():
    rng = np.random.default_rng(1)
    real = torch.from_numpy(rng.standard_normal((40, 6)))
    assert metrics.precision_recall(real, real.clone()) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100) == (0.0, 0.0)
    # on a line, k = 1: real radii are all 1 (4.0 is on the edge of 3.0's ball: inside); gen radii
    # 1.7, 6, 3.5, 1.7
    line_real = torch.tensor([[0.0], [1], [2], [3]])
    line_gen = torch.tensor([[0.5], [10], [4.0], [-1.2]])
    assert metrics.precision_recall(line_real, line_gen, k=1) == (0.5, 1.0)
    for n_gen, k, block in ((40, 3, 1 << 26), (57, 3, 100), (33, 5, 1)):
        gen = torch.from_numpy(rng.standard_normal((n_gen, 6)) * 1.3 + 0.4)
        expected = brute_force_pr(real.numpy(), gen.numpy(), k)
        assert metrics.precision_recall(real, gen, k, block) == pytest.approx(expected, abs=0)
    with pytest.raises(ValueError, match='more than 3'):
        metrics.precision_recall(real, real[:3])
    with pytest.raises(ValueError, match='features'):
        metrics.precision_recall(real, real[:, :5])

#----------------------------------------------------------------------------
# OpenAI's reference batches: arr_0 = uint8 [N, H, W, 3], read a slice at a time.

def write_npz(path, images, compressed=False):
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images)
    return str(path)


def test_npz_reference_batches(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    for compressed in (False, True):
        path = write_npz(tmp_path / f'ref{compressed}.npz', images, compressed)
        got = torch.cat(list(metrics.real_image_batches(path, 4)))
        assert torch.equal(got, torch.from_numpy(images).permute(0, 3, 1, 2))
        assert len(torch.cat(list(metrics.real_image_batches(path, 4, max_images=6)))) == 6
    bad = {'float.npz': images.astype(np.float32), 'flat.npz': images.reshape(11, -1)}
    for name, array in bad.items():
        write_npz(tmp_path / name, array)
    with zipfile.ZipFile(tmp_path / 'short.npz', 'w') as zf:  # declares 11 images, holds 10
        with zf.open('arr_0.npy', 'w') as f:
            np.lib.format.write_array_header_1_0(
                f, dict(descr='|u1', fortran_order=False, shape=(11, 8, 8, 3)))
            f.write(images[:10].tobytes())
    np.savez(tmp_path / 'keys.npz', images=images)
    for name, msg in (('float.npz', 'expected uint8'), ('flat.npz', 'expected uint8'),
                      ('short.npz', 'truncated'), ('keys.npz', 'no arr_0')):
        with pytest.raises(ValueError, match=msg):
            list(metrics.real_image_batches(str(tmp_path / name), 4))

#----------------------------------------------------------------------------
# The evaluation end to end: a tiny class-conditional generator, the stand-in detector.

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('eval')
    G = tiny_net('cifar10-32x32-cond-vp')
    rng = np.random.default_rng(3)
    a = rng.standard_normal((16, 16))
    fid.save_ref(str(tmp / 'ref.npz'), rng.standard_normal(16) * 0.1, a @ a.T / 16)
    real = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    return dict(G=G, ref=str(tmp / 'ref.npz'), real=write_npz(tmp / 'real.npz', real),
                real_images=torch.from_numpy(real).permute(0, 3, 1, 2),
                det=torch.jit.load(detector_file(tmp / 'det.pt')), tmp=tmp)


def independent_scores(G, seeds, ref, real_images, sigmas=()):
    """The same images through the project's sampler in one batch, scored by hand."""
    images = fid.to_uint8(runs.sample_images(G, seeds, 2.5, 'cpu', None, sigmas))
    det = FidStandIn()
    with torch.no_grad():
        features = det(images, True).double().numpy()
        probs = det(images, no_output_bias=True).double().numpy()
        real = det(real_images, True).half().double().numpy()
    mu, sigma = fid.load_ref(ref)
    fd = fid.frechet_distance(features.mean(0), np.cov(features, rowvar=False), mu, sigma)
    gen = torch.from_numpy(features).half().double().numpy()
    return dict(fid=fd, **dict(zip(('is', 'is_std'), official_is(probs, 10))),
                **dict(zip(('precision', 'recall'), brute_force_pr(real, gen, 3))))


@pytest.mark.parametrize('sigmas', [(), (0.6,)])  # one step, and SIGN's two steps
def test_evaluate_end_to_end(setup, sigmas):
    G, num, calls = setup['G'], 20, []

    def sample(seeds):
        return runs.sample_images(G, seeds, 2.5, 'cpu', None, sigmas)

    def progress(trial, images):
        calls.append((trial, images))

    results = metrics.evaluate(sample, G.img_shape, num, ('fid', 'is', 'pr'), trials=2,
                               ref=setup['ref'], detector=setup['det'], pr_ref=setup['real'],
                               batch=7, progress=progress)
    assert calls == [(1, 7), (1, 14), (1, 20), (2, 7), (2, 14), (2, 20)]
    for t, result in enumerate(results['trials']):  # trial t: seeds t*num .. (t+1)*num - 1
        expected = independent_scores(G, range(t * num, (t + 1) * num), setup['ref'],
                                      setup['real_images'], sigmas)
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    fids = [t['fid'] for t in results['trials']]
    assert fids[0] != fids[1]  # fresh images per trial
    assert results['mean']['fid'] == pytest.approx(np.mean(fids))
    assert results['std']['fid'] == pytest.approx(np.std(fids, ddof=1))
    assert metrics.summary_lines(results)[0].startswith(f'fid       {np.mean(fids):.4f} ± ')
    if not sigmas:  # uint8 images (EDM2's decoded latents) are scored as they are

        def sample_uint8(seeds):
            return fid.to_uint8(sample(seeds))

        again = metrics.evaluate(sample_uint8, G.img_shape, num, ('fid', 'is', 'pr'), trials=2,
                                 ref=setup['ref'], detector=setup['det'], pr_ref=setup['real'],
                                 batch=7)
        assert again['trials'] == results['trials']


def test_evaluate_refuses_before_generating(setup, tmp_path, monkeypatch):
    monkeypatch.setenv('SID_CACHE', str(tmp_path / 'cache'))  # a download attempt would show here

    def sample(seeds):
        raise AssertionError('an image was generated')

    rng = np.random.default_rng(4)
    fid.save_ref(str(tmp_path / 'ref6.npz'), rng.standard_normal(6), np.eye(6))
    small = write_npz(tmp_path / 'small.npz', np.zeros((8, 16, 16, 3), np.uint8))
    shape32, shape64, det = [3, 32, 32], [3, 64, 64], setup['det']
    cases = [  # (image shape, keyword arguments, message)
        (shape32, dict(ref='imagenet-64x64'), 'of 64x64 images, the generator makes 32x32'),
        (shape64, dict(ref='ffhq-64x64', expected_ref='afhqv2-64x64'), 'another dataset'),
        (shape64, dict(ref='img512'), 'img512 is of 512x512 images, the generator makes 64x64'),
        (shape32, dict(ref=str(tmp_path / 'ref6.npz')), 'has 6 features, the detector gives 16'),
        (shape32, dict(ref=setup['ref'], metrics=('pr',), pr_ref=small), 'real images of 16x16'),
        (shape32, dict(ref=setup['ref'], metrics=('pr',)), 'needs real images'),
        (shape32, dict(ref=setup['ref'], metrics=('fid', 'kid')), "unknown metric(s) ['kid']"),
        (shape32, dict(ref=None), 'no reference statistics'),
        ([4, 32, 32], dict(ref=setup['ref']), 'the detectors take images'),
    ]
    for shape, kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')
                           .replace('[', r'\[').replace(']', r'\]')):
            metrics.evaluate(sample, shape, 20, detector=det, **kwargs)
    metrics.check_reference('img512', 512, 'img512')  # EDM2's decoded latents: no error
    with pytest.raises(ValueError, match='one per split'):
        metrics.evaluate(sample, shape32, 9, ('is',), detector=det)
    assert not os.path.exists(tmp_path / 'cache')
