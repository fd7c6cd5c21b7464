"""Tests for sid: the maths on closed-form Gaussians, equivalence checks, short end-to-end runs.

    python -m pytest -q                 # the default, CPU, a few minutes
    SID_SLOW=1 python -m pytest -q      # also the slow tests
"""
import json, math, os, subprocess, sys
import numpy as np
import pytest
import torch
import torch.nn as nn

import sid

HERE = os.path.dirname(os.path.abspath(__file__))
slow = pytest.mark.skipif(not os.environ.get('SID_SLOW'), reason='set SID_SLOW=1')
torch.set_num_threads(1)

def run_cli(*args, timeout=300):
    """python sid.py ARGS in a subprocess -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(HERE, 'sid.py'), *map(str, args)], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)

#----------------------------------------------------------------------------
# Identities and noise levels.

@pytest.mark.parametrize('modes,s', [(1, 0.5), (8, 0.1)])
def test_tweedie_exact_for_gaussians(modes, s):
    """The analytic denoiser equals x + sigma^2 grad log p_sigma(x) (autograd of the closed-form density)."""
    T = sid.ToyMixture(modes=modes, s=s)
    if modes == 1:
        T.mu.zero_()  # a single Gaussian N(0, s^2 I)
    x = (torch.randn(64, 2, dtype=torch.float64) * 1.5).requires_grad_(True)
    for sig in (0.01, 0.3, 2.5, 40.0):
        sigma = torch.full((64, 1), sig, dtype=torch.float64)
        grad, = torch.autograd.grad(T.log_prob(x, sigma).sum(), x)
        D = T(x.detach(), sigma)
        assert torch.allclose(D, x.detach() + sig ** 2 * grad, atol=1e-9 * max(1, sig ** 2), rtol=1e-7)
        assert torch.allclose(sid.score_from_denoiser(D, x.detach(), sigma), grad, rtol=1e-6, atol=1e-9)
    if modes == 1:  # and the textbook form for one Gaussian: D = s^2 x / (s^2 + sigma^2)
        assert torch.allclose(T(x.detach(), torch.full((64, 1), 0.7, dtype=torch.float64)), s ** 2 * x.detach() / (s ** 2 + 0.49))

def test_sigma_schedule_values():
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    got = sid.sigma_from_t(t)
    assert got[0].item() == pytest.approx(0.002, rel=1e-9) and got[-1].item() == pytest.approx(80.0, rel=1e-9)
    assert got[1:4].tolist() == pytest.approx([0.085, 2.515, 24.41], abs=2e-3)
    x = torch.zeros(200000, 3, 4, 4)
    s = sid.draw_sigma_generator(x, 800, torch.Generator().manual_seed(0))
    assert s.shape == (200000, 1, 1, 1) and s.min() >= 0.002 and s.max() <= 24.42
    assert s.median().item() == pytest.approx(sid.sigma_from_t(torch.tensor(0.4)).item(), rel=0.02)
    s = sid.draw_sigma_fake(x, gen=torch.Generator().manual_seed(0)).log()
    assert s.mean().item() == pytest.approx(-1.2, abs=0.01) and s.std().item() == pytest.approx(1.2, abs=0.01)
    assert sid.edm_weight(torch.tensor(2.0)).item() == pytest.approx((4 + 0.25) / (2 * 0.5) ** 2)

#----------------------------------------------------------------------------
# The SiD generator loss: algebraic forms, what is detached, the 1-D Gaussian closed form.

class Affine(nn.Module):
    """D(x) = a*x + b*sigma (per pixel), a stand-in network with the EDMPrecond call signature."""
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a, dtype=torch.float64)), nn.Parameter(torch.tensor(b, dtype=torch.float64))
        self.sigma_data = 0.5
    def forward(self, x, sigma, labels=None, augment_labels=None):
        return self.a * x + self.b * sigma

def _draws(B=6, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, *shape, generator=g, dtype=torch.float64), torch.rand(B, 1, 1, 1, generator=g, dtype=torch.float64) * 3 + 0.1,
            torch.randn(B, *shape, generator=g, dtype=torch.float64))

@pytest.mark.parametrize('alpha', [0.5, 1.0, 1.2])
def test_sid_loss_equals_both_paper_forms(alpha):
    x_g, sigma, noise = _draws()
    f_phi, f_psi = Affine(0.8, 0.1).double(), Affine(0.6, -0.2).double()
    got = sid.sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, None, alpha)
    x_t = x_g + sigma * noise
    y_phi, y_psi = 0.8 * x_t + 0.1 * sigma, 0.6 * x_t - 0.2 * sigma
    w = (x_g - y_phi).abs().flatten(1).mean(1)
    code = ((y_phi - y_psi) * ((y_phi - x_g) - alpha * (y_phi - y_psi))).flatten(1).sum(1) / w
    paper = ((y_phi - y_psi) * (y_psi - x_g) + (1 - alpha) * (y_phi - y_psi) ** 2).flatten(1).sum(1) / w
    assert torch.allclose(got, code, rtol=1e-6) and torch.allclose(got, paper, rtol=1e-6)  # w is float32, as official

def test_sid_loss_gradient_flows_through_both_networks():
    """Only w is detached: d loss / d x_g equals the hand-derived gradient, and differs if f_phi or f_psi is detached."""
    x_g, sigma, noise = _draws(seed=1)
    a, c, alpha = 0.8, 0.6, 1.2
    f_phi, f_psi = Affine(a, 0.1).double().requires_grad_(False), Affine(c, -0.2).double().requires_grad_(False)

    def grad_of(phi, psi):
        x = x_g.clone().requires_grad_(True)
        sid.sid_generator_loss(phi, psi, x, sigma, noise, None, alpha).sum().backward()
        return x.grad
    g = grad_of(f_phi, f_psi)
    x_t = x_g + sigma * noise
    u = (a - c) * x_t + 0.3 * sigma                                # f_phi - f_psi
    v = (a * x_t + 0.1 * sigma - x_g) - alpha * u                  # (f_phi - x_g) - alpha (f_phi - f_psi)
    w = (x_g - a * x_t - 0.1 * sigma).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(g, ((a - c) * v + u * (a - 1 - alpha * (a - c))) / w, rtol=1e-6)
    detached = lambda net: (lambda x, s, l=None, aug=None: net(x, s).detach())
    assert not torch.allclose(grad_of(detached(f_phi), f_psi), g, rtol=1e-3)
    assert not torch.allclose(grad_of(f_phi, detached(f_psi)), g, rtol=1e-3)

def test_sid_1d_gaussian_closed_form():
    """SiD §3's 1-D example: p_data = N(0,1), x_g = theta + eps0, analytic teacher x_t/(1+sigma^2), f_psi at its
    optimum (x_t + psi sigma^2)/(1+sigma^2) with psi = theta. Without w the per-sample gradient w.r.t. theta is
    (sigma^2/(1+sigma^2))^2 theta for every alpha; with w it still points to theta = 0 and vanishes there."""
    B = 4000
    g = torch.Generator().manual_seed(0)
    eps0, noise = torch.randn(B, 1, generator=g, dtype=torch.float64), torch.randn(B, 1, generator=g, dtype=torch.float64)
    sigma = sid.draw_sigma_generator(eps0, 800, g).double()
    k = sigma ** 2 / (1 + sigma ** 2)
    for theta0 in (1.5, -0.7, 0.0):
        psi = theta0
        f_phi = lambda x, s, l=None, a=None: x / (1 + s ** 2)
        f_psi = lambda x, s, l=None, a=None: (x + psi * s ** 2) / (1 + s ** 2)
        for alpha in (0.5, 1.0, 1.2):
            theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
            x_g = theta + eps0
            per = sid.sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, None, alpha)
            w = (x_g - f_phi(x_g + sigma * noise, sigma)).abs().detach().squeeze(1).clamp_min(1e-5)
            grads = torch.stack([torch.autograd.grad(p, theta, retain_graph=True)[0] for p in (per * w)[:50]])
            # (w is float32 as in the official code, so per * w undoes it only to ~1e-7)
            assert torch.allclose(grads, (k[:50, 0] ** 2) * theta0, rtol=1e-6, atol=1e-12)  # per sample, without w
            gbar, = torch.autograd.grad((per * w).mean(), theta, retain_graph=True)
            assert gbar.item() == pytest.approx((k ** 2).mean().item() * theta0, rel=1e-6, abs=1e-12)
            gw, = torch.autograd.grad(per.mean(), theta)                                # with w
            assert gw.item() * theta0 > 0 if theta0 else abs(gw.item()) < 1e-12
    # and the Monte-Carlo E[k^2] agrees with its integral over the t-schedule (t ~ U(0, 0.8))
    t = torch.linspace(0, 0.8, 200001, dtype=torch.float64)
    s2 = sid.sigma_from_t(t) ** 2
    assert (k ** 2).mean().item() == pytest.approx((s2 / (1 + s2)).pow(2).mean().item(), abs=0.02)

def test_sid_loss_drops_nan_samples():
    x_g, sigma, noise = _draws()
    x_g[2, 0, 0, 0] = float('nan')
    out = sid.sid_generator_loss(Affine(0.8, 0.1).double(), Affine(0.6, -0.2).double(), x_g, sigma, noise, None, 1.2)
    keep = [0, 1, 3, 4, 5]
    ref = sid.sid_generator_loss(Affine(0.8, 0.1).double(), Affine(0.6, -0.2).double(), x_g[keep], sigma[keep], noise[keep], None, 1.2)
    assert out.shape == (5,) and torch.allclose(out, ref)

#----------------------------------------------------------------------------
# The fake-score loss: minimised by the generator distribution's true denoiser.

def test_fake_score_loss_minimised_by_true_denoiser():
    """x_g ~ N(theta, 1) per pixel: the true denoiser is (x + theta sigma^2)/(1 + sigma^2) and the loss at it is
    lambda(sigma) * D * sigma^2/(1 + sigma^2) (the posterior variance); any perturbation raises it."""
    theta, D, B = 0.7, 4, 100000
    g = torch.Generator().manual_seed(0)
    x_g = theta + torch.randn(B, D, generator=g, dtype=torch.float64)
    noise = torch.randn(B, D, generator=g, dtype=torch.float64)
    sigma = torch.full((B, 1), 0.8, dtype=torch.float64)
    best = lambda x, s, l=None, a=None: (x + theta * s ** 2) / (1 + s ** 2)
    L = sid.fake_score_loss(best, x_g, sigma, noise, None)
    lam = sid.edm_weight(torch.tensor(0.8, dtype=torch.float64)).item()
    assert L.mean().item() == pytest.approx(lam * D * 0.64 / 1.64, rel=0.01)
    for da, db in ((0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)):
        worse = lambda x, s, l=None, a=None: (1 / (1 + s ** 2) + da) * x + (theta * s ** 2 / (1 + s ** 2) + db)
        assert sid.fake_score_loss(worse, x_g, sigma, noise, None).mean() > L.mean()
    x = x_g.clone().requires_grad_(True)  # x_g is detached inside: no gradient can reach the generator
    assert not sid.fake_score_loss(best, x, sigma, noise, None).requires_grad

#----------------------------------------------------------------------------
# The toy: the exact teacher, the demo run, configuration errors.

def test_toy_run_improves_quality(tmp_path):
    cfg = sid.make_config({'duration_mimg': 0.05, 'tick_kimg': 10, 'snap_kimg': 50, 'outdir': str(tmp_path)})
    G, G_ema, _ = sid.train(cfg)
    T = sid.ToyMixture()
    z = 2.5 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    G0 = sid.toy_pretrain(sid.ToyDenoiser(), T)                  # the common starting point of G and f_psi
    with torch.no_grad():
        q_end = sid.toy_quality(sid.generate(G_ema, z, None, 2.5), T)
        q_start = sid.toy_quality(sid.generate(G0, z, None, 2.5), T)
    assert q_start[1] <= 2 and q_end[1] >= 7                     # modes covered
    assert q_end[0] < 0.1 * q_start[0]                          # energy distance
    assert q_end[2] > q_start[2] + 0.3                          # mass near the modes
    assert (tmp_path / 'toy.png').stat().st_size > 1000 and (tmp_path / 'toy.gif').stat().st_size > 1000
    lines = [json.loads(l) for l in open(tmp_path / 'stats.jsonl')]
    assert len(lines) == 5 and lines[-1]['kimg'] == pytest.approx(50.176)  # 196 iterations of 256

@pytest.mark.parametrize('args,msg', [
    (['--dataset', 'mnist'], "unknown --dataset 'mnist'"),
    (['--batch', '0'], '--batch must be positive'),
    (['--alpha', '3'], '--alpha must lie in'),
    (['--sigma-init', '0'], '--sigma-init must lie in'),
    (['--method', 'dmd'], "unknown --method 'dmd'"),
    (['--batch', '100', '--batch-gpu', '64'], 'must be a multiple of --batch-gpu'),
])
def test_bad_config_is_one_line_exit_2(args, msg, tmp_path):
    r = run_cli(*args, '--outdir', tmp_path)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr
