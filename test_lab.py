"""Tests of the lab (lab.py, lab_solutions.py, lab_exercises.py, lab.ipynb): every exercise's
check passes on the answers and fails on the common wrong answers planted below; the stubs; the
DMD-style objective; the mechanism picture; the seeds command; the saved notebook's structure.

    python -m pytest -q test_lab.py                                   # the reference answers
    LAB_ANSWERS=lab_exercises python -m pytest -q test_lab.py -k exercise   # your answers

The notebook itself is executed by CI (`python lab.py execute`), not here: it takes minutes.
"""
import importlib
import importlib.util
import inspect
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

import lab
import lab_exercises
import lab_solutions as ref
import sid
import toy
from conftest import HERE

#----------------------------------------------------------------------------
# The exercises: the chosen answers pass (the reference by default).

def answers():
    """The module LAB_ANSWERS names (a module name or a .py path; default lab_solutions)."""
    name = os.environ.get('LAB_ANSWERS', 'lab_solutions')
    if name.endswith('.py'):
        spec = importlib.util.spec_from_file_location('lab_answers', name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(name)


@pytest.mark.parametrize('name', list(lab.CHECKS))
def test_exercise(name):
    assert lab.check(name, answers()) == f'{name}: ok'

#----------------------------------------------------------------------------
# Planted wrong answers: each check must fail on every one of them.

def with_(**changes):
    """The reference answers with some replaced."""
    return types.SimpleNamespace(**{**{k: getattr(ref, k) for k in dir(ref)}, **changes})


def sid_loss_variant(w_of, form='code'):
    def loss(y_phi, y_psi, x_g, alpha):
        w = w_of(y_phi, y_psi, x_g)
        diff = y_phi - y_psi
        if form == 'one_minus':  # (1 - alpha) where the code form has alpha
            return (diff * ((y_phi - x_g) - (1 - alpha) * diff)).sum(1) / w
        return (diff * ((y_phi - x_g) - alpha * diff)).sum(1) / w
    return loss


def grad_x_g_variant(detach_phi, detach_psi):
    def grad(f_phi, f_psi, x_g, sigma, noise, alpha):
        x_g = x_g.detach().requires_grad_(True)
        x_t = x_g + sigma * noise
        y_phi = f_phi(x_t.detach() if detach_phi else x_t, sigma)
        y_psi = f_psi(x_t.detach() if detach_psi else x_t, sigma)
        loss = ref.sid_generator_loss(y_phi, y_psi, x_g, alpha).sum()
        return torch.autograd.grad(loss, x_g)[0]
    return grad


def posterior_mean(scale, power=2):
    def minimiser(points, x, sigma):
        return (-torch.cdist(x, points) ** power / (scale * sigma ** 2)).softmax(1) @ points
    return minimiser


def gan_variant(per_sample=False, clamp=True, w_mean=False, value_only=False):
    def loss(logits, w, chw):
        lg = logits.clamp(-10, 10) if clamp else logits
        bce = F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg), reduction='none')
        own = bce.flatten(1).mean(1)
        if value_only:  # the micro-batch mean's value, each sample's own gradient
            bce = own + (bce.mean() - own).detach()
        else:
            bce = own if per_sample else bce.mean()
        return chw * bce / (w.mean() if w_mean else w)
    return loss


def idem_variant(kind):
    def loss(f, f_bar, z):
        x = f(z)
        if kind == 'both':        # f(f(z)): theta also through the outer call
            y = f(x)
        elif kind == 'target':    # the inner call detached: only the target f(z) moves
            y = f_bar(x.detach())
        else:                     # 'outer': the frozen copy inside, f outside
            x = f_bar(z)
            y = f(x)
        return (y - x).square().flatten(1).mean(1)
    return loss


def no_detach_w(y_phi, y_psi, x_g):
    return (x_g - y_phi).abs().mean(1)


WRONG = {
    'gaussian_denoiser': {
        'noise share kept': with_(gaussian_denoiser=lambda x, sigma, mu, s:
                                  mu + sigma ** 2 / (s ** 2 + sigma ** 2) * (x - mu)),
        'mu forgotten': with_(gaussian_denoiser=lambda x, sigma, mu, s:
                              s ** 2 / (s ** 2 + sigma ** 2) * x),
        'std for variance': with_(gaussian_denoiser=lambda x, sigma, mu, s:
                                  mu + s / (s + sigma) * (x - mu)),
    },
    'score_from_denoiser': {
        'sign': with_(score_from_denoiser=lambda D, x, sigma: (x - D(x, sigma)) / sigma ** 2),
        'sigma not squared': with_(score_from_denoiser=lambda D, x, sigma:
                                   (D(x, sigma) - x) / sigma),
    },
    'sid_generator_loss': {
        'w not detached': with_(sid_generator_loss=sid_loss_variant(no_detach_w)),
        "w from f_psi": with_(sid_generator_loss=sid_loss_variant(
            lambda y_phi, y_psi, x_g: (x_g - y_psi).abs().mean(1).detach())),
        'no w': with_(sid_generator_loss=sid_loss_variant(lambda *a: 1.0)),
        '(1 - alpha) in the code form': with_(sid_generator_loss=sid_loss_variant(
            lambda y_phi, y_psi, x_g: (x_g - y_phi).abs().mean(1).detach(), 'one_minus')),
    },
    'sid_grad_x_g': {
        'x_t detached (DMD)': with_(sid_grad_x_g=grad_x_g_variant(True, True)),
        "f_psi's input detached": with_(sid_grad_x_g=grad_x_g_variant(False, True)),
        "f_phi's input detached": with_(sid_grad_x_g=grad_x_g_variant(True, False)),
    },
    'fake_score_minimiser': {
        'no 1/2': with_(fake_score_minimiser=posterior_mean(1.0)),
        'distances not squared': with_(fake_score_minimiser=posterior_mean(2.0, power=1)),
        'the nearest point': with_(fake_score_minimiser=lambda points, x, sigma:
                                   points[torch.cdist(x, points).argmin(1)]),
        "the points' mean": with_(fake_score_minimiser=lambda points, x, sigma:
                                  points.mean(0).expand_as(x)),
    },
    'alpha': {
        'noise variance forgotten': with_(fisher_1d=lambda s, sigma: (
            1 / (1 + sigma ** 2) - s ** 2 / (s ** 2 + sigma ** 2)) ** 2 * s ** 2),
        "score units (not denoiser units)": with_(fisher_1d=lambda s, sigma:
                                                  ref.fisher_1d(s, sigma) / sigma ** 4),
        "the paper's alpha 1.2": with_(ALPHA_EXACT=1.2),
        'alpha 1': with_(ALPHA_EXACT=1.0),
        'alpha 0': with_(ALPHA_EXACT=0.0),
    },
    'sida_gan_loss': {
        'per-sample BCE (no coupling)': with_(sida_gan_loss=gan_variant(per_sample=True)),
        'no clamp': with_(sida_gan_loss=gan_variant(clamp=False)),
        'the mean w': with_(sida_gan_loss=gan_variant(w_mean=True)),
        'coupled in value only': with_(sida_gan_loss=gan_variant(value_only=True)),
    },
    'idem_loss': {
        'through both calls': with_(idem_loss=idem_variant('both')),
        'inner call detached': with_(idem_loss=idem_variant('target')),
        'frozen inner, trained outer': with_(idem_loss=idem_variant('outer')),
    },
}


def test_every_exercise_has_planted_wrong_answers():
    assert set(WRONG) == set(lab.CHECKS)
    assert all(len(v) >= 2 for v in WRONG.values())


@pytest.mark.parametrize('name,wrong', [(n, w) for n in WRONG for w in WRONG[n]])
def test_check_fails_on_a_planted_wrong_answer(name, wrong):
    with pytest.raises(AssertionError):
        lab.check(name, WRONG[name][wrong])

#----------------------------------------------------------------------------
# The questions: one stub per answer, the same signatures, each raising NotImplementedError (the
# notebook then checks the reference answer and says so).

def test_stubs_match_the_answers_and_are_not_answers():
    names = [n for n, v in vars(ref).items()
             if inspect.isfunction(v) and v.__module__ == ref.__name__]
    assert sorted(names) == sorted(n for n, v in vars(lab_exercises).items()
                                   if inspect.isfunction(v))
    for n in names:
        assert inspect.signature(getattr(ref, n)) == inspect.signature(getattr(lab_exercises, n))
    assert lab_exercises.ALPHA_EXACT is None and ref.ALPHA_EXACT is not None
    for name in lab.CHECKS:
        with pytest.raises(NotImplementedError):
            lab.check(name, lab_exercises)


def test_attempt_falls_back_to_the_reference(capsys):
    lab.attempt('gaussian_denoiser')
    assert 'the reference answer' in capsys.readouterr().out

#----------------------------------------------------------------------------
# The DMD-style variant of G's step: with x_t detached the gradient is -(f_phi - f_psi) / w per
# sample (times lsg / n), whatever alpha.

def test_detached_x_t_is_the_score_difference_and_ignores_alpha():
    from conftest import affine, objective_state
    x_g = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for alpha in (0.5, 1.2):
        f_phi = affine(0.8, b=0.1, c=0.1).requires_grad_(False)
        f_psi = affine(0.6, c=-0.2).requires_grad_(False)
        s = objective_state(sid.Config(alpha=alpha, lsg=3.0), n=2, f_phi=f_phi, f_psi=f_psi)
        x = x_g.clone().requires_grad_(True)
        torch.manual_seed(1)
        loss, _ = lab.G_sid_detached(s, x, None, None)
        grad, = torch.autograd.grad(loss, x)
        torch.manual_seed(1)
        sigma = sid.draw_sigma_generator(x_g, 800)
        x_t = x_g + sigma * torch.randn_like(x_g)
        y_phi, y_psi = f_phi(x_t, sigma), f_psi(x_t, sigma)
        w = sid.sid_normaliser(x_g, y_phi)[:, None]
        assert torch.allclose(grad, -(y_phi - y_psi) / w * 3.0 / 2, rtol=1e-6)
        grads.append(grad)
        assert not f_phi.calls[0]['x_graph'] and not f_psi.calls[0]['x_graph']
    assert torch.allclose(grads[0], grads[1], rtol=1e-6)
    with lab.detached_x_t():
        assert sid.METHODS['sid'].G_loss is lab.G_sid_detached
    assert sid.METHODS['sid'].G_loss is sid.G_sid

#----------------------------------------------------------------------------
# The mechanism picture: the panel's points are the networks' outputs, the arrows the mean of
# -d loss / d x_g; and the command writes a PNG.

def test_mechanism_panel_and_picture(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, 'toy_pretrain', lambda net, teacher: net)  # its mechanics only
    panels, world = lab.mechanism(at_kimg=(0.5,), shown=4, draws=8)
    (p,) = panels
    T = world.teacher
    assert p['samples'].shape == (2000, 2) and p['x_g'].shape == (4, 2)
    level = torch.full([4, 1], lab.MECHANISM_SIGMA)
    assert torch.allclose(p['y_phi'], T(p['x_t'], level))
    assert torch.allclose(p['x_g'], p['samples'][:4])
    assert p['direction'].shape == (4, 2) and p['direction'].abs().sum() > 0
    png = lab.draw.mechanism_picture(panels, T)
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    asked = []

    def mechanism(seed, at_kimg):  # the command's own work is tested above
        asked.append((seed, at_kimg))
        return panels, world

    monkeypatch.setattr(lab, 'mechanism', mechanism)
    lab.main(['mechanism', '--seed', '3', '--kimg', '0.5,2', '--out', str(tmp_path / 'm.png')])
    assert asked == [(3, [0.5, 2.0])] and (tmp_path / 'm.png').stat().st_size > 10000


def test_commands_reject_bad_input_in_one_line(capsys):
    for argv in (['bogus'], ['seeds'], ['seeds', 'x', '--dataset', 'toy'],
                 ['seeds', '0-2', '--dataset', 'cifar10'], ['mechanism', '--kimg', '0,400']):
        with pytest.raises(SystemExit) as e:
            lab.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1, argv


def test_seeds_command_runs_each_seed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(toy, 'toy_pretrain', lambda net, teacher: net)  # its mechanics only
    table = lab.seeds_command(['0,1', '--dataset', 'toy', '--duration-mimg', '0.001', '--batch',
                               '256', '--batch-gpu', '256', '--tick-kimg', '1', '--snap-kimg', '1',
                               '--outdir', str(tmp_path)])
    out = capsys.readouterr().out
    assert len(table) == 2 and table[0] != table[1]
    assert 'seed 0: toy end:' in out and 'seed 1: toy end:' in out
    assert (tmp_path / 'seed0' / 'toy.png').exists() and (tmp_path / 'seed1' / 'toy.png').exists()
    q = toy.toy_figures(torch.zeros(3, 2), toy.ToyMixture())
    assert set(table[0]) == {'energy', 'covered', 'within', 'clustering', 'balance'} <= set(q)

#----------------------------------------------------------------------------
# The saved notebook: executed top to bottom by the current code, without errors.

def test_notebook_is_executed_and_current():
    with open(os.path.join(HERE, 'lab.ipynb')) as f:
        nb = json.load(f)
    assert nb['nbformat'] == 4
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert [c['execution_count'] for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c['outputs']]
    assert not [o for o in outputs if o['output_type'] == 'error']
    assert sum('image/png' in o.get('data', {}) for o in outputs) >= 5
    assert nb['metadata']['lab']['code_sha256'] == lab.code_hash(nb), \
        'the code cells changed since the outputs were saved: run `python lab.py execute`'
    sources = ''.join(''.join(c['source']) for c in code)
    for name in lab.CHECKS:
        assert f"lab.attempt('{name}')" in sources
