"""Tests of the toy worlds (toy.py): the quality figures, the exact image teacher and its
references, the student's fit, the latents the figures are taken on, and whole toy runs that must
get most of the way from their start to the exact samples (measured against the world's own exact
samples and sampling noise, not against one seed's numbers).
"""
import contextlib
import copy
import io
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch

import checkpoints
import edm_nets
import runs
import sid
import toy
from conftest import SLOW, slow, run_quiet, cli, load_state, read_stats

#----------------------------------------------------------------------------
# The 2-D toy's figures.

def test_toy_figures_tell_clusters_from_rings_and_single_modes():
    T, gen = toy.ToyMixture(), torch.Generator().manual_seed(1)

    def on_ring(r):  # radii r, random angles
        a = torch.rand(len(r), generator=gen, dtype=torch.float64) * 2 * math.pi
        return torch.stack([r * a.cos(), r * a.sin()], 1).float()

    def within(x):
        return float((torch.cdist(x.double(), T.mu).min(1).values < 2 * T.s).double().mean())

    x = T.sample(20000, gen)
    shuffled = on_ring(x.double().norm(dim=1))  # Monte Carlo of ring_chance's closed form
    assert abs(toy.ring_chance(x, T) - within(shuffled)) < 4 * 0.5 / math.sqrt(20000)
    exact = toy.toy_figures(T.sample(4000, gen), T)
    assert exact['within'] == pytest.approx(1 - math.exp(-2), abs=0.02)  # a 2-D Gaussian in 2 std
    assert abs(exact['within'] - toy.EXACT['within']) < 0.02
    assert abs(exact['clustering'] - toy.EXACT['clustering']) < 0.02
    assert exact['balance'] > 0.9 and exact['covered'] == 8
    for r in (torch.full((4000,), float(T.mu[0].norm()), dtype=torch.float64),
              T.sample(4000, gen).double().norm(dim=1)):
        q = toy.toy_figures(on_ring(r), T)  # thin and thick rings: within passes, clustering not
        assert q['within'] > 0.6 and q['covered'] == 8 and abs(q['clustering']) < 0.03
    one = toy.toy_figures(T.mu[2].float() + T.s * torch.randn(4000, 2, generator=gen), T)
    assert one['within'] > 0.8 and one['balance'] < 0.01 and one['covered'] == 1
    x = T.sample(8000, gen)
    half = toy.toy_figures(x[torch.cdist(x.double(), T.mu).argmin(1) < 4], T)
    assert abs(half['balance'] - (1 - 0.5 / (1 - 1 / 8))) < 0.03  # 4 of 8 modes: TV 0.5
    zeros = toy.toy_figures(torch.zeros(10, 2), T)
    assert zeros['balance'] == 0 == zeros['clustering']
    y = T.sample(500, torch.Generator().manual_seed(1234))  # energy: the V-statistic, closed form
    x = T.sample(500, gen)
    ed = 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()
    assert toy.energy_distance(x, T) == pytest.approx(float(ed), rel=1e-6)


def test_toy_worlds_stream_and_observe_on_sigma_init_latents():
    """The real-data stream resumes at its position; G_ema is observed on z = sigma_init * eps (the
    run's own latent law) with the world's fixed labels."""
    w = toy.Toy2D()
    b1, b2 = w.batches(16, 3), w.batches(16, 3, start=2)
    assert torch.equal([next(b1) for _ in range(3)][-1][0], next(b2)[0])

    def identity(x, sigma, labels=None):
        return x

    for sigma_init in (0.5, 2.5):
        assert torch.equal(w.observe(identity, sigma_init), sigma_init * w.eps)
        assert torch.equal(w.sign_inputs(sigma_init)[0], sigma_init * w.eps)
    image = toy.ImageToy(per_class=2, fit_steps=0, n_eval=8)
    seen = []

    def recorder(x, sigma, labels=None):
        seen.append((sigma, labels))
        return x

    assert torch.equal(image.observe(recorder, 1.3), 1.3 * image.eps)
    assert (seen[0][0] == 1.3).all() and torch.equal(seen[0][1], image.eval_labels)
    assert torch.equal(image.sign_inputs(1.3)[0], 1.3 * image.eps)


def test_toy_latents_follow_sigma_init_through_a_run(tmp_path):
    """Defect 1 of the redesign, through the command line: with --sigma-init 1.0 the observations
    (frames, the end figures) and SIGN's evaluation are G_ema on 1.0 * eps, not 2.5 * eps."""
    out = tmp_path / 'run'
    r = cli('--dataset', 'toy', '--method', 'sign', '--sigma-init', '1.0', '--duration-mimg', 0.002,
            '--batch', 256, '--batch-gpu', 256, '--tick-kimg', 1, '--snap-kimg', 2, '--outdir', out)
    assert r.returncode == 0, r.stderr
    G, info = checkpoints.load_checkpoint(runs.snapshot_path(str(out)))
    eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x = G(1.0 * eps, torch.full([2000, 1], 1.0))
    frames = load_state(out)['frames']
    assert torch.equal(frames[-1][1], x)  # the last observation is the saved G_ema's
    q = toy.toy_figures(x, toy.ToyMixture())
    line = next(line for line in r.stdout.splitlines() if line.startswith('sign: 1 step(s)'))
    assert f"energy distance {q['energy']:.4f}" in line
    assert f"within 2 std {q['within']:.3f}" in line

#----------------------------------------------------------------------------
# The image toy: the exact empirical denoiser, its references and figures, the student's fit.

@pytest.fixture(scope='module')
def image_world():
    return toy.ImageToy(per_class=4, fit_steps=0)


def brute_force(X, x, sigma, allowed=None):
    """D(x; sigma) one sample at a time in numpy float64 with an explicit log-sum-exp."""
    out = []
    for k, v in enumerate(x.reshape(len(x), -1).double().numpy()):
        logw = -((v[None] - X) ** 2).sum(1) / (2 * float(sigma[k]) ** 2)
        if allowed is not None:
            logw = np.where(allowed[k], logw, -np.inf)
        w = np.exp(logw - logw.max())
        out.append((w / w.sum()) @ X)
    return np.stack(out).reshape(x.shape)


def test_denoiser_matches_brute_force(image_world):
    X, g = image_world.teacher.X.numpy(), torch.Generator().manual_seed(0)
    x0, c = image_world.sample(6, g)
    x = x0 + 0.7 * torch.randn(x0.shape, generator=g)
    chunked = toy.EmpiricalDenoiser(image_world.images, image_world.labels,
                                    chunk_elems=2 * len(X))  # 2 rows per chunk
    allowed = (c.numpy() @ image_world.labels.numpy().T) > 0.5
    for sigma in (0.3, 1.0, 4.0, torch.tensor([0.2, 0.5, 1, 2, 5, 30.0]).reshape(-1, 1, 1, 1)):
        s = np.broadcast_to(np.asarray(sigma).reshape(-1), 6)
        for net in (image_world.teacher, chunked):
            np.testing.assert_allclose(net(x, sigma).double().numpy(), brute_force(X, x, s),
                                       atol=2e-6)
        np.testing.assert_allclose(image_world.teacher(x, sigma, c).double().numpy(),
                                   brute_force(X, x, s, allowed), atol=2e-6)


def test_denoiser_limits_and_classes(image_world):
    X, x0 = image_world.teacher.X, image_world.images.float() / 127.5 - 1
    x = x0 + 0.02 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    assert (image_world.teacher(x, 1e-3) - x0).abs().max() < 1e-6  # sigma -> 0: nearest image
    mean = X.mean(0).reshape(x0.shape[1:]).float()
    assert (image_world.teacher(x, 1e5) - mean).abs().max() < 1e-5  # -> inf: the mean
    other = image_world.labels.roll(1, dims=1)  # another class's label: that class's nearest image
    d = image_world.teacher(x, 1e-3, other).flatten(1).double()
    assert torch.equal(image_world.labels[torch.cdist(d, X).argmin(1)], other)
    cls_mean = (other @ image_world.labels.T / other.sum(0)[0]).double() @ X
    assert (image_world.teacher(x, 1e5, other).flatten(1).double() - cls_mean).abs().max() < 1e-5


def brute_force_energy(x, X):
    """Energy distance to the set X in RMS units, one pair at a time, estimated without bias from
    samples x: 2 E|x - y| - E|x - x'| - E|y - y'|, E|x - y| the mean over all (sample, set image)
    pairs, E|x - x'| over pairs of DISTINCT samples, and E|y - y'| exact: the set is p_data, so
    over all N^2 pairs, its zero diagonal included."""
    a, b = x.double().flatten(1).numpy(), X.double().numpy()

    def d(u, v):
        return math.sqrt(((u - v) ** 2).mean())

    n, N = len(a), len(b)
    cross = sum(d(u, v) for u in a for v in b) / (n * N)
    e_xx = sum(d(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    e_yy = sum(d(u, v) for u in b for v in b) / N ** 2
    return 2 * cross - e_xx - e_yy


def test_image_references_and_figures(image_world):
    """The exact reference samples are set images of their labels' classes; the energy distance is
    the brute-force one, and unbiased: 0 averaged over every pair of exact samples (the whole law
    of 2 draws from the set); the set itself scores its closed form; exact samples score far better
    than noise or blur."""
    w = image_world
    xe, qe = w.exact()
    nearest = toy.rms_distances(xe.double().flatten(1), w.teacher.X).min(1)
    assert (nearest.values < 1e-6).all()  # set images
    assert torch.equal(w.labels[nearest.indices].argmax(1), w.eval_labels.argmax(1))
    assert qe['class_acc'] == 1 and qe['fidelity'] < 1e-6
    X = w.teacher.X
    D = toy.rms_distances(X, X)
    N = len(X)
    S = float(D.sum())
    q = toy.image_quality(X, w.teacher.set_labels, X.float().reshape(w.images.shape))
    assert q['energy'] == pytest.approx(S / N ** 2 - S / (N * (N - 1)), rel=1e-6)  # no repeats
    assert q['coverage'] == 1
    pairs = [toy.image_quality(X, w.teacher.set_labels, X[[i, j]].float())['energy']
             for i in range(N) for j in range(N)]
    assert abs(sum(pairs) / N ** 2) < 1e-6 * S / N ** 2  # exact samples: 0 on average
    x, c = w.sample(64, torch.Generator().manual_seed(2))
    q = toy.image_quality(X, w.teacher.set_labels, x, c)
    spread = np.std([toy.image_quality(X, w.teacher.set_labels,
                                       w.sample(64, torch.Generator().manual_seed(10 + k))[0])
                     ['energy'] for k in range(20)])  # exact samples' own sampling noise
    assert q['fidelity'] < 1e-6 and q['class_acc'] == 1 and abs(q['energy']) < 4 * spread
    y = x[:7] + 0.3 * torch.randn(x[:7].shape, generator=torch.Generator().manual_seed(4))
    assert toy.image_quality(X, w.teacher.set_labels, y)['energy'] == pytest.approx(
        brute_force_energy(y, X), rel=1e-6)  # samples that are not the set: every term counts
    noise = toy.image_quality(X, w.teacher.set_labels, 0.5 * torch.randn(x.shape), c)
    blur = toy.image_quality(X, w.teacher.set_labels, w.teacher(x, 1e5, c), c)  # class means
    assert noise['energy'] > 10 * spread and blur['energy'] > 10 * spread
    assert blur['coverage'] <= 4 / N and blur['sharpness'] < q['sharpness']  # 4 class means
    assert noise['class_acc'] < 0.25 + 4 * math.sqrt(0.25 * 0.75 / 64)  # chance: 1 in 4 classes


def test_student_is_fitted_to_the_denoiser_of_its_own_labels(image_world):
    """fit_student queries the teacher with the labels of the images it noised."""
    drawn, asked = [], []

    def sampler(n, gen):
        x, c = image_world.sample(n, gen)
        drawn.append(c)
        return x, c

    def teacher(x, sigma, c):
        asked.append(c)
        return image_world.teacher(x, sigma, c)

    net = image_world.student()
    fed = []
    net.register_forward_pre_hook(lambda m, args: fed.append(args[2]))
    toy.fit_student(net, teacher, sampler, steps=2, batch=8)
    assert len(asked) == 2 and all(a is d for a, d in zip(asked, drawn))
    assert len(fed) == 2 and all(f is d for f, d in zip(fed, drawn))  # the student gets them too


def test_sign_evaluation_data_are_of_the_observations_classes(image_world):
    """SIGN's fixed evaluation draws on the image toy: the clean data are set images of the
    observation labels' classes (their projections f(y) are made with those labels), and the
    masked inputs are those images with one 8x8 square blanked."""
    w = image_world
    z, x_data, sigmas, noises, noise_proj, sigma_proj, corrupted = w.sign_inputs(1.0)
    nearest = toy.rms_distances(x_data.double().flatten(1), w.teacher.X).min(1)
    assert (nearest.values < 1e-6).all()
    assert torch.equal(w.labels[nearest.indices].argmax(1), w.eval_labels.argmax(1))
    masked = corrupted['masked']
    changed = (masked != x_data).any(1)  # [n, H, W]: the pixels the mask set to 0 (mid grey)
    assert (masked.permute(1, 0, 2, 3)[:, changed] == 0).all() and changed.any()
    assert changed.flatten(1).sum(1).max() <= 64  # within one 8x8 square per image

#----------------------------------------------------------------------------
# Whole toy runs: each must get most of the way from its start to the world's exact samples.

_PRETRAINED = []


def toy_nets_pretrained():
    """The toy's real start (teacher, pretrained G, f_psi copy); pretrained once per session."""
    if not _PRETRAINED:
        w = toy.Toy2D()
        _PRETRAINED.append((w.teacher, w.student(0.0)))
    teacher, G = _PRETRAINED[0]
    return teacher, copy.deepcopy(G), copy.deepcopy(G)


def test_toy_run_gets_most_of_the_way_to_the_exact_samples(tmp_path):
    """50 kimg of SiD from the pretrained start: all 8 modes as the exact samples, more than half
    of the way from the start to the exact samples in within-2-std, 90 % of the way in energy
    distance; the report's lines and pictures."""
    cfg = sid.make_config({'duration_mimg': 0.05, 'tick_kimg': 10, 'snap_kimg': 50,
                           'outdir': str(tmp_path)})
    run, s, out = run_quiet(cfg, toy_nets_pretrained())
    T = toy.ToyMixture()
    start, end = (toy.toy_figures(run.frames[i][1], T) for i in (0, -1))
    exact = toy.toy_figures(T.sample(2000, torch.Generator().manual_seed(3)), T)
    assert start['covered'] <= 2 and end['covered'] == exact['covered'] == 8
    assert end['within'] - start['within'] > 0.5 * (exact['within'] - start['within'])
    assert start['energy'] - end['energy'] > 0.9 * (start['energy'] - exact['energy'])
    kimg = [round(e['kimg'] * 1e3) for e in read_stats(tmp_path)]
    assert kimg == [10240, 20480, 30208, 40448, 50176]  # batch 512
    assert 'toy start:' in out and 'toy end:' in out and 'toy.png, toy.gif, toy_quality.png' in out
    with PIL.Image.open(tmp_path / 'toy.png') as png, PIL.Image.open(tmp_path / 'toy.gif') as gif:
        assert png.size[0] == 3 * gif.size[0] and gif.n_frames == 41  # start + 40 observations
    assert os.path.getsize(tmp_path / 'toy_quality.png') > 1000
    assert not [p for p in os.listdir(tmp_path) if 'tmp' in p]


def paired_gain(world, x0, x1, per_sample):
    """Mean per-sample change from x0 to x1 (the same latents) and its standard error."""
    d = per_sample(world, x1) - per_sample(world, x0)
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def nearest_rms(world, x):
    return toy.rms_distances(x.double().flatten(1), world.teacher.X).min(1).values


def sharpness(world, x):
    x = x.double()
    return (((x[..., 1:, :] - x[..., :-1, :]) ** 2).flatten(1).mean(1)
            + ((x[..., 1:] - x[..., :-1]) ** 2).flatten(1).mean(1)) / 2


def image_run(tmp_path, monkeypatch, method, world_kw=None, **kw):
    """A run on the image toy -> (world, first observation, last observation)."""
    worlds = []

    def make():
        worlds.append(toy.ImageToy(**(world_kw or {})))
        return worlds[-1]

    monkeypatch.setitem(toy.WORLDS, 'toy-images', make)
    cfg = sid.make_config(dict(dataset='toy-images', method=method, outdir=str(tmp_path / method),
                               **kw))
    with contextlib.redirect_stdout(io.StringIO()):
        run, _ = runs.train(cfg)
    return worlds[0], run.frames[0][1], run.frames[-1][1]


def class_kept(world, x):
    """[n] bool: the sample's nearest set image is of its label's class."""
    nearest = toy.rms_distances(x.double().flatten(1), world.teacher.X).argmin(1)
    return world.labels[nearest].argmax(1) == world.eval_labels[:len(x)].argmax(1)


def assert_learns(world, x0, x1):
    """On the same latents, samples move significantly (3 standard errors of the paired change)
    towards set images and become sharper; and they keep their classes: the samples that lose
    theirs outnumber those that gain one by less than 3 standard deviations (McNemar's test)."""
    fid_gain, fid_se = paired_gain(world, x0, x1, nearest_rms)
    sharp_gain, sharp_se = paired_gain(world, x0, x1, sharpness)
    assert fid_gain < -3 * fid_se and sharp_gain > 3 * sharp_se, (fid_gain, fid_se, sharp_gain,
                                                                   sharp_se)
    c0, c1 = class_kept(world, x0), class_kept(world, x1)
    lost, gained = int((c0 & ~c1).sum()), int((~c0 & c1).sum())
    assert lost - gained <= 3 * math.sqrt(lost + gained), (lost, gained)


def test_image_loop_learns_in_a_minute(tmp_path, monkeypatch):
    """16 images, a 100-step student fit (blurry), 2 kimg of SiD."""
    world, x0, x1 = image_run(tmp_path, monkeypatch, 'sid',
                              dict(per_class=4, fit_steps=100, n_eval=64), duration_mimg=0.002,
                              tick_kimg=0.5, psi_warmup_kimg=0.1, glr=1e-4)
    assert_learns(world, x0, x1)
    assert (tmp_path / 'sid' / 'toy-images.png').stat().st_size > 3000


@pytest.mark.skipif(not SLOW, reason='the preset run on the image toy takes ~3 min (SID_SLOW=1)')
@pytest.mark.parametrize('method', ['sid', 'sida', 'sign'])
def test_preset_learns_the_image_toy(tmp_path, monkeypatch, method):
    world, x0, x1 = image_run(tmp_path, monkeypatch, method)
    assert_learns(world, x0, x1)
    q0, q1 = world.quality(x0), world.quality(x1)
    assert q1['coverage'] > q0['coverage']


@slow
def test_sign_toy_idempotence_modes_multistep_projection(tmp_path):
    """SIGN trained on the toy (~250 iterations) against its initial generator, each figure a
    fraction of the way to its ideal (as the SiD run's test): idempotence error half of the way to
    0, fixed-point error on data 90 % of the way; samples with all modes, half of the way to the
    exact samples' within-2-std and 90 % of the way to their energy; the projection of noisy data
    half of the way from the noisy points to the clean data's distance to the modes."""
    T, G_init = toy_nets_pretrained()[0], toy_nets_pretrained()[1].eval()
    cfg = sid.make_config({'method': 'sign', 'duration_mimg': 0.13, 'outdir': str(tmp_path)})
    _, s, out = run_quiet(cfg, toy_nets_pretrained())
    w = toy.Toy2D()
    evs = []
    for G in (G_init, s.G_ema.eval()):
        def f(v, G=G):
            return sid.generate(G, v, None, 2.5)
        evs.append(sid.sign_evaluation(f, *w.sign_inputs(2.5)))
    ev0, ev = evs
    assert ev['idem'] < 0.5 * ev0['idem'] and ev['fix'] < 0.1 * ev0['fix']
    exact = toy.toy_figures(T.sample(2000, torch.Generator().manual_seed(3)), T)
    q0, q = (toy.toy_figures(e['steps'][0], T) for e in (ev0, ev))
    assert q['covered'] == 8
    assert q['within'] - q0['within'] > 0.5 * (exact['within'] - q0['within'])
    assert q0['energy'] - q['energy'] > 0.9 * (q0['energy'] - exact['energy'])
    d_noisy, d_data = w.nearest_mode(ev['noisy']), w.nearest_mode(ev['data'])
    d_proj, d_proj0 = w.nearest_mode(ev['projected']), w.nearest_mode(ev0['projected'])
    assert d_noisy - d_proj > 0.5 * (d_noisy - d_data) and d_proj < d_proj0, (d_noisy, d_proj,
                                                                              d_data, d_proj0)
    assert 'sign: idempotence error' in out and os.path.exists(tmp_path / 'toy.gif')

#----------------------------------------------------------------------------
# Bounded evaluation: the energy distance (O(n^2)) sees at most toy.ENERGY_N samples, however many
# a command makes; the other figures see them all; the picture's line says so.

def energy_sizes(monkeypatch):
    """Record the number of samples of every energy distance computed."""
    seen, real = [], toy.energy_distance

    def recording(x, teacher):
        seen.append(len(x))
        return real(x, teacher)

    monkeypatch.setattr(toy, 'energy_distance', recording)
    return seen


def test_toy_figures_bound_the_energy_distance_and_say_so(monkeypatch):
    T, gen = toy.ToyMixture(), torch.Generator().manual_seed(0)
    x = T.sample(50000, gen)
    seen = energy_sizes(monkeypatch)
    q = toy.toy_figures(x, T)
    assert seen == [toy.ENERGY_N] == [2000] and (q['energy_n'], q['n']) == (2000, 50000)
    assert q['energy'] == toy.toy_figures(x[:2000], T)['energy']
    near = torch.cdist(x.double(), T.mu).min(1).values < 2 * T.s
    assert q['within'] == float(near.double().mean())  # all 50000
    assert toy.figure_lines(q)[-1].endswith('(first 2000 of 50000 samples)')
    assert toy.figure_lines(toy.toy_figures(x[:300], T))[-1].endswith(
        f"{toy.toy_figures(x[:300], T)['energy']:.4f}")


def test_generate_on_a_toy_generator_bounds_its_figures(tmp_path, monkeypatch):
    """The README's `generate --steps 3` on a toy run with more seeds than toy.ENERGY_N: every
    point written, the picture's energy distance on 2000 of them (at 50000 seeds it once took
    10 GB and 150 s)."""
    torch.manual_seed(0)
    G = edm_nets.EDMPrecond(img_resolution=0, img_channels=2, model_type='ToyMLP')
    runs.save_snapshot(str(tmp_path / 'g.pt'), G.eval(), 0, sid.Config())
    seen = energy_sizes(monkeypatch)
    r = cli('generate', '--ckpt', tmp_path / 'g.pt', '--seeds', '0-4999', '--steps', 3,
            '--sigmas', '0.1,0.05', '--outdir', tmp_path / 'out')
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / 'out' / 'samples.npy').shape == (5000, 2)
    assert seen and max(seen) <= toy.ENERGY_N
    assert (tmp_path / 'out' / 'samples.png').stat().st_size > 1000
