"""Tests of sid's maths: identities, SiD, SiDA and SIGN against closed forms and independent
computations, gradient paths, and what each method's objective minimises and logs.

    python -m pytest -q                 # the default, CPU, a few minutes on 2 cores
    SID_SLOW=1 python -m pytest -q      # also the slow tests

The loop is tested in test_loop.py, the run driver in test_runs.py, the toys in test_toy.py.
"""
import collections, contextlib, copy, dataclasses, io, json, math, os, pickle, re, struct
import subprocess, sys, tarfile, time, types, zipfile, zlib
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edm_nets, fid, runs, sid, toy

from conftest import (HERE, SLOW, slow, Stub, affine, gaussian, linear, perturb_copy,
                      assert_one_line_error, states_equal, write_bytes, draws, softplus, sigmoid,
                      objective_state)

#----------------------------------------------------------------------------
# Identities and SiD's losses (SiD §3-4, Eq. 22/23): Tweedie, the schedules, both paper forms, what
# is detached, the 1-D Gaussian closed form, the fake-score minimiser, NaN samples.

@pytest.mark.parametrize('modes,s', [(1, 0.5), (8, 0.1)])
def test_tweedie_exact_on_the_toy_mixture(modes, s):
    """The toy's exact denoiser equals x + sigma^2 grad log p_sigma(x) (autograd of log_prob)."""
    T = toy.ToyMixture(modes=modes, s=s)
    T.mu.mul_(modes > 1)  # one mode: N(0, s^2 I)
    x = (torch.randn(64, 2, dtype=torch.float64) * 1.5).requires_grad_(True)
    for sig in (0.01, 0.3, 2.5, 40.0):
        sigma = torch.full((64, 1), sig, dtype=torch.float64)
        grad, = torch.autograd.grad(T.log_prob(x, sigma).sum(), x)
        tweedie = x.detach() + sig ** 2 * grad
        atol = 1e-9 * max(1, sig ** 2)
        assert torch.allclose(T(x.detach(), sigma), tweedie, atol=atol, rtol=1e-7)
    if modes == 1:  # the textbook form: D = s^2 x / (s^2 + sigma^2)
        D = T(x.detach(), torch.full((64, 1), 0.7, dtype=torch.float64))
        assert torch.allclose(D, s ** 2 * x.detach() / (s ** 2 + 0.49))


def test_sigma_schedules_and_draws():
    got = sid.sigma_from_t(torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64))
    assert got[0].item() == pytest.approx(0.002) and got[-1].item() == pytest.approx(80.0)
    assert got[1:4].tolist() == pytest.approx([0.085, 2.515, 24.41], abs=2e-3)
    x = torch.zeros(200000, 3, 4, 4)
    torch.manual_seed(0)
    s = sid.draw_sigma_generator(x, 800)
    assert s.shape == (200000, 1, 1, 1) and s.min() >= 0.002 and s.max() <= 24.42
    assert s.median().item() == pytest.approx(sid.sigma_from_t(torch.tensor(0.4)).item(), rel=0.02)
    s = sid.draw_sigma_generator(x, 400)  # tmax bounds t: sigma <= sigma_from_t(0.4) = 0.97
    assert s.max() <= sid.sigma_from_t(torch.tensor(0.4)) * (1 + 1e-6)
    assert s.median().item() == pytest.approx(sid.sigma_from_t(torch.tensor(0.2)).item(), rel=0.02)
    s = sid.draw_sigma_fake(x).log()
    assert s.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert s.std().item() == pytest.approx(1.2, abs=0.01)
    assert sid.edm_weight(torch.tensor(2.0)).item() == pytest.approx((4 + 0.25) / (2 * 0.5) ** 2)
    # SIGN's flow levels: t ~ U(dt, tmax/1000), sigma' = sigma_from_t(t - dt), from one uniform draw
    torch.manual_seed(1)
    s1, s2 = sid.draw_sigma_flow(x, 800)
    torch.manual_seed(1)
    t = sid.SIGN_DT + (0.8 - sid.SIGN_DT) * torch.rand(200000, 1, 1, 1)
    assert torch.equal(s1, sid.sigma_from_t(t))
    assert torch.equal(s2, sid.sigma_from_t(t - sid.SIGN_DT))
    assert s1.min() >= sid.sigma_from_t(torch.tensor(sid.SIGN_DT)) and s1.max() <= 24.42
    t = torch.tensor([0.02, 0.3, 0.8])
    s1, s2 = sid.flow_sigmas(t)
    assert torch.allclose(s1, sid.sigma_from_t(t)) and s2[0].item() == pytest.approx(0.002)


@pytest.mark.parametrize('alpha', [0.5, 1.0, 1.2])
def test_sid_loss_equals_both_paper_forms(alpha):
    x_g, _, y_phi, _ = draws()
    y_psi = y_phi + 0.3 * draws(seed=3)[0]
    got = sid.sid_generator_loss(y_phi, y_psi, x_g, alpha)
    w = (x_g - y_phi).abs().flatten(1).mean(1)  # the TEACHER's error normalises
    code = ((y_phi - y_psi) * ((y_phi - x_g) - alpha * (y_phi - y_psi))).flatten(1).sum(1) / w
    paper = ((y_phi - y_psi) * (y_psi - x_g) + (1 - alpha) * (y_phi - y_psi) ** 2).flatten(1).sum(1)
    assert got.shape == (6,) and torch.allclose(got, code, rtol=1e-6)
    assert torch.allclose(got, paper / w, rtol=1e-6)
    assert not torch.allclose(got, code * w / (x_g - y_psi).abs().flatten(1).mean(1), rtol=1e-3)


def G_sid_grad(f_phi, f_psi, x_g, alpha=1.2, seed=5):
    """d(G_sid's loss)/d x_g with the stand-ins, and the objective's draws (sigma, noise)."""
    s = objective_state(sid.Config(alpha=alpha, lsg=1.0), n=1, f_phi=f_phi, f_psi=f_psi)
    x = x_g.clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss, _ = sid.G_sid(s, x, None, None)
    loss.backward()
    torch.manual_seed(seed)
    sigma = sid.draw_sigma_generator(x_g, 800)
    return x.grad, sigma, torch.randn_like(x_g)


def test_G_sid_gradient_flows_through_both_networks():
    """Only w is detached: G_sid's d loss / d x_g equals the hand-derived gradient through x_t into
    BOTH frozen networks, and another one when either network's output is detached."""
    x_g, _, _, _ = draws(seed=1)
    a, c, alpha = 0.8, 0.6, 1.2
    f_phi = affine(a, c=0.1).requires_grad_(False)
    f_psi = affine(c, c=-0.2).requires_grad_(False)
    g, sigma, noise = G_sid_grad(f_phi, f_psi, x_g, alpha)
    x_t = x_g + sigma * noise
    u = (a - c) * x_t + 0.3 * sigma
    v = (a * x_t + 0.1 * sigma - x_g) - alpha * ((a - c) * x_t + 0.3 * sigma)
    w = (x_g - a * x_t - 0.1 * sigma).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(g, ((a - c) * v + u * (a - 1 - alpha * (a - c))) / w, rtol=1e-6)
    assert all(call['x_graph'] for call in f_phi.calls + f_psi.calls)  # x_t keeps its graph

    def detached(net):
        return Stub(lambda m, x, s: net(x, s).detach())

    assert not torch.allclose(G_sid_grad(detached(f_phi), f_psi, x_g, alpha)[0], g, rtol=1e-3)
    assert not torch.allclose(G_sid_grad(f_phi, detached(f_psi), x_g, alpha)[0], g, rtol=1e-3)


def test_sid_1d_gaussian_closed_form():
    """SiD §3: p_data = N(0,1), x_g = theta + eps0, exact f_phi and f_psi. Without w the per-sample
    gradient w.r.t. theta is (sigma^2/(1+sigma^2))^2 theta for every alpha; with w it still points
    to theta = 0 and vanishes there."""
    B, g = 4000, torch.Generator().manual_seed(0)
    eps0 = torch.randn(B, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(B, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    sigma = sid.draw_sigma_generator(eps0, 800).double()
    k = sigma ** 2 / (1 + sigma ** 2)
    for theta0 in (1.5, -0.7, 0.0):
        f_phi, f_psi = gaussian(0.0, 1.0), gaussian(theta0, 1.0)
        for alpha in (0.5, 1.0, 1.2):
            theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
            x_g = theta + eps0
            x_t = x_g + sigma * noise
            per = sid.sid_generator_loss(f_phi(x_t, sigma), f_psi(x_t, sigma), x_g, alpha)
            w = (x_g - f_phi(x_t, sigma)).abs().detach().squeeze(1).clamp_min(1e-5)
            grads = torch.stack([torch.autograd.grad(p, theta, retain_graph=True)[0]
                                 for p in (per * w)[:50]])
            assert torch.allclose(grads, (k[:50, 0] ** 2) * theta0, rtol=1e-6, atol=1e-12)
            gw, = torch.autograd.grad(per.mean(), theta)
            if theta0:
                assert gw.item() * theta0 > 0
            else:
                assert abs(gw.item()) < 1e-12
    s2 = sid.sigma_from_t(torch.linspace(0, 0.8, 200001, dtype=torch.float64)) ** 2
    assert (k ** 2).mean().item() == pytest.approx((s2 / (1 + s2)).pow(2).mean().item(), abs=0.02)


def test_dsm_loss_minimised_by_true_denoiser():
    """x ~ N(theta, 1): at the true denoiser the loss is lambda * D * posterior variance, any other
    is worse."""
    theta, D, B, g = 0.7, 4, 100000, torch.Generator().manual_seed(0)
    x = theta + torch.randn(B, D, generator=g, dtype=torch.float64)
    noise = torch.randn(B, D, generator=g, dtype=torch.float64)
    sigma = torch.full((B, 1), 0.8, dtype=torch.float64)
    L = sid.dsm_loss(gaussian(theta, 1.0)(x + sigma * noise, sigma), x, sigma)
    assert L.shape == (B,)
    assert L.mean().item() == pytest.approx(sid.edm_weight(0.8) * D * 0.64 / 1.64, rel=0.01)
    for da, db in ((0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)):
        def worse(x, s):
            return (1 / (1 + s ** 2) + da) * x + (theta * s ** 2 / (1 + s ** 2) + db)
        assert sid.dsm_loss(worse(x + sigma * noise, sigma), x, sigma).mean() > L.mean()


@pytest.mark.parametrize('name', ['sid', 'dsm', 'sida_gan'])
def test_nan_samples_get_zero_loss(name):
    """A NaN sample gets a ZERO loss (shape [B] kept); the others' losses are those computed without
    it (SiDA's adversarial term: the BCE mean over the kept samples only)."""
    def outputs(x, s, n, o):
        x_t = x + s * n
        return 0.8 * x_t, 0.6 * x_t + 0.05 * x_t ** 2, x_t[:, :1] + o

    def fn(x, s, n, o):
        y_phi, y_psi, logits = outputs(x, s, n, o)
        if name == 'sid':
            return sid.sid_generator_loss(y_phi, y_psi, x, 1.2)
        if name == 'dsm':
            return sid.dsm_loss(y_psi, x, s)
        return sid.sida_generator_gan_loss(logits, x, y_phi, y_psi)

    (x_g, sigma, noise, off), keep = draws(B=4, shape=(3, 8, 8)), [0, 1, 3]
    ref = fn(x_g[keep], sigma[keep], noise[keep], off[keep])
    x_g[2, 1, 3, 3] = float('nan')
    got = fn(x_g, sigma, noise, off)
    assert got.shape == (4,) and got[2] == 0 and torch.isfinite(got).all()
    assert torch.allclose(got[keep], ref, rtol=1e-6)

#----------------------------------------------------------------------------
# SiDA (ICLR 2025 §3): the discriminator term, the adversarial generator term, the micro-batch
# coupling, the objectives' reductions (official sida_loss.py), the schedule.

def test_fake_sida_routing_values_and_coupling():
    """One full f_psi forward with logits on augmented x_g, one encoder-only forward on x_r, SHARED
    sigma and noise; loss = (sum_b dsm_b * ls + sum_b d_b * lsd) / n with the BCE means computed
    here; each logit's gradient carries the micro-batch SUM of lambda."""
    x_g, _, _, off = draws(B=4, shape=(3, 8, 8))
    x_r = torch.randn_like(x_g) + 0.3
    off_f, off_r = off.clone().requires_grad_(), (-off).clone().requires_grad_()
    net = affine(0.7, 0.1, off=off_f, off_enc=off_r)
    c = torch.eye(4)
    s = objective_state(sid.Config(ls=2.0, lsd=3.0), n=8, psi_ddp=net,
                        zero_aug=torch.zeros(4, 9))
    torch.manual_seed(3)
    loss, logs = sid.fake_sida(s, x_g, x_r, c)
    torch.manual_seed(3)  # the draws in the objective's order: sigma, augmentation (off), noise
    sigma = sid.draw_sigma_fake(x_g)
    noise = torch.randn_like(x_g)
    fake, real = net.calls
    assert fake['return_logits'] and not fake['encoder_only'] and real['encoder_only']
    assert fake['labels'] is c and real['labels'] is c and fake['aug'] is s.zero_aug
    assert torch.equal(fake['sigma'], sigma) and torch.equal(real['sigma'], sigma)
    assert torch.allclose(fake['x'], x_g + sigma * noise)
    assert torch.allclose(real['x'], x_r + sigma * noise)
    lam = [(v * v + 0.25) / (v * 0.5) ** 2 for v in sigma.flatten().tolist()]
    x_t = x_g + sigma * noise
    lf, lr, D = x_t[:, :1] + off, (x_r + sigma * noise)[:, :1] - off, 0.7 * x_t + 0.1 * x_t ** 2
    bce_f = sum(softplus(v) for v in lf.flatten().tolist()) / lf.numel()
    bce_r = sum(softplus(-v) for v in lr.flatten().tolist()) / lr.numel()
    dsm = [lam[b] * ((D[b] - x_g[b]) ** 2).sum().item() for b in range(4)]
    ref = (2.0 * sum(dsm) + 3.0 * sum(lam) * (bce_r + bce_f) / 2) / 8
    assert math.isclose(loss.item(), ref, rel_tol=1e-12) and logs.tolist() == [loss.item(), 0]
    loss.backward()
    for i in [(0, 0, 0, 0), (3, 0, 7, 2)]:
        expect_f = 3.0 / 8 * sum(lam) / 2 * sigmoid(lf[i].item()) / 256
        expect_r = -3.0 / 8 * sum(lam) / 2 * (1 - sigmoid(lr[i].item())) / 256
        assert math.isclose(off_f.grad[i].item(), expect_f, rel_tol=1e-10)
        assert math.isclose(off_r.grad[i].item(), expect_r, rel_tol=1e-10)


def test_sida_generator_gan_loss_values_clamp_and_coupling():
    x_g, sigma, noise, off = draws(B=4, shape=(3, 8, 8))
    off[0, 0, 1, 1], off[2, 0, 3, 4] = 40.0, -40.0  # beyond the +-10 clamp whatever x_t adds
    off.requires_grad_()
    x_t = x_g + sigma * noise
    y_phi, y_psi, logits = 0.8 * x_t, 0.6 * x_t + 0.05 * x_t ** 2, x_t[:, :1] + off
    w = [max((x_g[b] - y_phi[b]).abs().float().mean().item(), 1e-5) for b in range(4)]
    bce = sum(softplus(-min(max(v, -10), 10)) for v in logits.flatten().tolist()) / logits.numel()
    gan = sid.sida_generator_gan_loss(logits, x_g, y_phi, y_psi)
    for b in range(4):
        assert math.isclose(gan[b].item(), 192 * bce / w[b], rel_tol=1e-6)
    gan.sum().backward()  # d gan.sum() / d logit = 192 sum_b(1/w_b) (sigmoid(l) - 1) / (B*64)
    for i in [(0, 0, 0, 0), (1, 0, 5, 6), (3, 0, 7, 7)]:
        expect = 192 * sum(1 / v for v in w) * (sigmoid(logits[i].item()) - 1) / 256
        assert math.isclose(off.grad[i].item(), expect, rel_tol=1e-6)
    assert off.grad[0, 0, 1, 1] == 0 and off.grad[2, 0, 3, 4] == 0


@pytest.mark.parametrize('cur_nimg,mix', [(199_999, False), (200_000, False), (200_001, True),
                                          (10 ** 6, True)])
def test_G_sida_one_forward_logs_and_mixes_after_sida_mix_kimg(cur_nimg, mix):
    """f_psi's ONE forward gives its denoiser and logits; logged [lsg sum(sid)/n, lsg_gan
    sum(gan)/n]; pure SiD up to 200 kimg (the default), then the gradient of their 0.5/0.5 mix."""
    x_g, _, _, off = draws(B=4, shape=(3, 8, 8))
    f_phi, f_psi = affine(0.8), affine(0.6, 0.05, off=off)
    s = objective_state(sid.Config(method='sida', lsg=100.0, lsg_gan=0.01), cur_nimg=cur_nimg,
                        f_phi=f_phi, f_psi=f_psi)
    x_g.requires_grad_()
    torch.manual_seed(5)
    loss, logs = sid.G_sida(s, x_g, None, None)
    assert len(f_psi.calls) == 1 and f_psi.calls[0]['return_logits']
    g, = torch.autograd.grad(loss, x_g)
    torch.manual_seed(5)  # the same draws, in the objective's order
    sigma = sid.draw_sigma_generator(x_g, 800)
    x_t = x_g + sigma * torch.randn_like(x_g)
    y_phi, (y_psi, logits) = f_phi(x_t, sigma), f_psi(x_t, sigma, return_logits=True)
    L = sid.sid_generator_loss(y_phi, y_psi, x_g, 1.2).sum() * 100 / 4
    L_gan = sid.sida_generator_gan_loss(logits, x_g, y_phi, y_psi).sum() * 0.01 / 4
    gL, gG = (torch.autograd.grad(v, x_g, retain_graph=True)[0] for v in (L, L_gan))
    assert torch.allclose(logs, torch.stack([L, L_gan]).detach())
    assert torch.allclose(g, 0.5 * gL + 0.5 * gG if mix else gL, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(gL, gG, rtol=0.1)  # the two gradients differ: the weights show


def test_sida_phases_and_method_table():
    phases = [sid.sida_phase(n) for n in (0, 100_000, 100_001, 200_000, 200_001)]
    assert phases == ['frozen', 'frozen', 'sid', 'sid', 'mix']
    for ds in ('cifar10', 'imagenet64', 'ffhq64'):  # the schedule of every image preset
        c = sid.make_config(dict(dataset=ds, method='sida', outdir='x'))
        assert (c.sida_warmup_kimg, c.sida_mix_kimg, c.alpha) == (100, 200, 1.0)
    m = sid.METHODS
    assert m['sida'].psi_clip == 1 and m['sid'].psi_clip is None and m['sign'].psi_clip is None
    assert (m['sid'].extra, m['sida'].extra, m['sign'].extra) == (None, 'loss_gan', 'loss_ign')
    assert [m['sida'].G_trains(sid.Config(method='sida'), n) for n in (100_000, 100_001)] == [
        False, True]
    cfg = sid.Config(psi_warmup_kimg=0.5)
    assert [m['sid'].G_trains(cfg, n) for n in (499, 500)] == [False, True]
    p, q = torch.zeros(4, requires_grad=True), torch.zeros(1, requires_grad=True)
    p.grad = torch.tensor([3.0, -0.5, float('nan'), -float('inf')])
    sid.sanitize_grads_([p, q], 1.0)
    assert p.grad.tolist() == [1.0, -0.5, 0.0, -1.0] and q.grad is None  # element-wise clip
    p.grad = torch.tensor([float('inf'), 2.0, float('nan'), 0.25])
    sid.sanitize_grads_([p])
    assert p.grad.tolist() == [1e5, 2.0, 0.0, 0.25]

#----------------------------------------------------------------------------
# SIGN (our reconstruction on IGN's frame): the frozen copy, gradient paths, closed forms of the
# terms, the objective's routing and reductions, and the data-free rule.

def test_frozen_copy_is_the_same_function_and_gets_no_gradient():
    """IGN's f_theta': no parameter gradient (a stale .grad of G is not copied), refreshed to G's
    parameters, buffers and train/eval mode, so it draws the same dropout masks."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 4))
    G.register_buffer('count', torch.zeros(1))
    G[0].weight.grad = torch.ones_like(G[0].weight)
    G_bar, x = sid.frozen_copy(G.eval()), torch.randn(8, 4)
    assert all(p.grad is None and not p.requires_grad for p in G_bar.parameters())
    G.train()
    with torch.no_grad():
        G[2].weight.add_(1.0)
        G.count += 1
    assert not states_equal(G, G_bar)
    sid.refresh_frozen_(G_bar, G)
    assert states_equal(G, G_bar) and G_bar.training
    assert not any(p.requires_grad for p in G_bar.parameters())
    assert not torch.equal(G(x), G(x))                          # dropout is on ...
    torch.manual_seed(3)
    a = G(x)
    torch.manual_seed(3)
    b = G_bar(x)
    assert torch.equal(a, b)                                    # ... with the same masks
    sid.refresh_frozen_(G_bar, G.eval())
    assert not G_bar.training and torch.equal(G_bar(x), G(x))
    sid.idem_loss(G_bar, G(x).requires_grad_()).sum().backward()
    assert all(p.grad is None for p in G_bar.parameters())


def test_idem_and_rec_gradient_paths():
    """f(x) = A x: L_idem's gradient takes the inner path alone (both paths would teach f the
    identity); L_rec's is the plain reconstruction gradient."""
    torch.manual_seed(0)
    B, n = 5, 4
    A0 = (torch.eye(n) + 0.3 * torch.randn(n, n)).double()
    G = linear(A0)
    G_bar = sid.frozen_copy(G)

    def f(v):
        return sid.generate(G, v, None, 2.5)

    Z, I = torch.randn(B, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    sid.idem_loss(lambda v: sid.generate(G_bar, v, None, 2.5), f(Z)).mean().backward()
    X = Z @ A0.T
    R = X @ (A0 - I).T                                  # f(f(z)) - f(z)
    inner, outer = 2 / (B * n) * (A0 - I).T @ R.T @ Z, 2 / (B * n) * R.T @ X
    assert torch.allclose(G.A.grad, inner, atol=1e-12)
    assert not torch.allclose(G.A.grad, inner + outer, atol=1e-3)
    G.A.grad = None
    sid.rec_loss(f, Z).mean().backward()
    assert torch.allclose(G.A.grad, 2 / (B * n) * (X - Z).T @ Z, atol=1e-12)


def test_euler_step_and_flow_loss_closed_forms():
    mu, s = 0.3, 0.5
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    sigma = torch.tensor(1.5, dtype=torch.float64)

    def exact(sn):  # the PF-ODE of N(mu, s^2)
        return mu + (x - mu) * ((s ** 2 + sn ** 2) / (s ** 2 + sigma ** 2)).sqrt()

    errs = []
    for h in (0.2, 0.1, 0.05):
        x1 = sid.euler_step(gaussian(mu, s), x, sigma, sigma - h)
        assert torch.allclose(x1, x - h * sigma * (x - mu) / (s ** 2 + sigma ** 2), atol=1e-12)
        errs.append((x1 - exact(sigma - h)).abs().max().item())
    assert all(3.5 < e1 / e2 < 4.5 for e1, e2 in zip(errs, errs[1:]))  # local error O(h^2)
    B, n = 5, 3
    G = linear(torch.eye(n, dtype=torch.float64) + 0.2 * torch.randn(n, n, dtype=torch.float64))
    G_bar, A0 = sid.frozen_copy(G), G.A.detach().clone()
    x, noise = torch.randn(B, n, dtype=torch.float64), torch.randn(B, n, dtype=torch.float64)
    sg = torch.full((B, 1), 2.0, dtype=torch.float64)
    sn = torch.full((B, 1), 1.6, dtype=torch.float64)
    L = sid.flow_loss(lambda v: sid.generate(G, v, None, 2.5),
                      lambda v: sid.generate(G_bar, v, None, 2.5), gaussian(0.1, 0.5), x, sg, sn,
                      noise)
    L.mean().backward()
    xs = x + sg * noise
    R = xs @ A0.T - (xs + (sn - sg) * sg * (xs - 0.1) / (0.25 + sg ** 2)) @ A0.T
    assert torch.allclose(L, R.square().mean(1), atol=1e-12)
    assert torch.allclose(G.A.grad, 2 / (B * n) * R.T @ xs, atol=1e-12)  # target: stop-grad
    assert G_bar.A.grad is None


def sign_state(G, lambdas=(3.0, 5.0, 7.0), **kw):
    cfg = sid.Config(method='sign', lsg=100.0, lambda_idem=lambdas[0], lambda_rec=lambdas[1],
                     lambda_flow=lambdas[2])
    f_phi, f_psi = affine(0.9, c=0.05).requires_grad_(False), affine(0.7).requires_grad_(False)
    return objective_state(cfg, n=8, G=G, G_ddp=G, G_bar=sid.frozen_copy(G), f_phi=f_phi,
                           f_psi=f_psi, **kw)


def test_G_sign_terms_routing_and_reductions():
    """G_sign = lsg sum(SiD)/n + sum_k lambda_k sum_b D d_k / n, each IGN term computed here from
    IGN's formulas with the objective's draws; G_bar refreshed to G and without gradients; a zero
    lambda or no real data skips its term (data-free: no L_rec, L_flow from sg x_g)."""
    torch.manual_seed(0)
    B, d = 8, 3
    G = linear(torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, dtype=torch.float64))
    x_r = torch.randn(B, d, dtype=torch.float64)
    for data in (x_r, None):
        s = sign_state(G)
        with torch.no_grad():
            G.A.add_(0.01)  # G moved since the copy: G_sign must refresh f_theta'
        z = torch.randn(B, d, dtype=torch.float64)
        x_g = sid.generate(G, z, None, 2.5)
        torch.manual_seed(7)
        loss, logs = sid.G_sign(s, x_g, data, None)
        assert states_equal(s.G_bar, G)
        G.A.grad = None
        loss.backward()
        assert s.G_bar.A.grad is None and G.A.grad.abs().sum() > 0
        torch.manual_seed(7)  # the objective's draws: sigma, noise, flow levels, flow noise
        sigma = sid.draw_sigma_generator(x_g, 800)
        noise = torch.randn_like(x_g)
        sf, sf_next = sid.draw_sigma_flow(x_g, 800)
        noise_f = torch.randn_like(x_g)
        with torch.no_grad():
            A = G.A
            x_t = x_g + sigma * noise
            dm = sid.sid_generator_loss(s.f_phi(x_t, sigma), s.f_psi(x_t, sigma), x_g, 1.2)
            idem = ((x_g @ A.T - x_g) ** 2).mean(1)
            start = x_g if data is None else data
            xs = start + sf * noise_f
            step = xs + (sf_next - sf) * (xs - s.f_phi(xs, sf)) / sf
            flow = ((xs @ A.T - step @ A.T) ** 2).mean(1)
            rec = ((data @ A.T - data) ** 2).mean(1) if data is not None else torch.zeros(B)
            ign = (3.0 * d * idem.sum() + 5.0 * d * rec.sum() + 7.0 * d * flow.sum()) / 8
        assert math.isclose(logs[0].item(), 100 * dm.sum().item() / 8, rel_tol=1e-9)
        assert math.isclose(logs[1].item(), ign.item(), rel_tol=1e-9)
        assert math.isclose(loss.item(), logs.sum().item(), rel_tol=1e-12)
    s = sign_state(G, lambdas=(0.0, 0.0, 0.0))
    torch.manual_seed(7)
    _, logs = sid.G_sign(s, sid.generate(G, z, None, 2.5), x_r, None)
    assert logs[1] == 0


def train_data_free(x_rec_flawed, steps=300):
    """G_sign's idempotence and reconstruction terms on f(x) = A x, data-free; -> (A0, A),
    A0 = 0.8 I + noise. x_rec_flawed: pass x = sg f(z) as if it were data, what the data-free L_rec
    used to do."""
    g = torch.Generator().manual_seed(1)
    A0 = 0.8 * torch.eye(4, dtype=torch.float64) + 0.05 * torch.randn(4, 4, generator=g)
    G = linear(A0)
    s = sign_state(G, lambdas=(1.0, 1.0, 0.0))
    s.cfg.lsg = 0.0
    opt = torch.optim.Adam(G.parameters(), lr=1e-2)
    for _ in range(steps):
        x_g = sid.generate(G, torch.randn(64, 4, generator=g, dtype=torch.float64), None, 2.5)
        loss, _ = sid.G_sign(s, x_g, x_g.detach() if x_rec_flawed else None, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return A0, G.A.detach()


def fixed_dim(A):
    """Dimension of f's fixed-point set {x: A x = x}, numerically (singular values of A - I)."""
    return int((torch.linalg.svdvals(A - torch.eye(len(A), dtype=A.dtype)) < 0.05).sum())


def test_data_free_sign_does_not_grow_the_fixed_points_towards_the_identity():
    A0, A = train_data_free(False)
    assert fixed_dim(A0) == 0 and fixed_dim(A) == 0
    I = torch.eye(4, dtype=torch.float64)
    assert (A - I).norm() > (A0 - I).norm()
    _, A_flawed = train_data_free(True)  # control: L_rec = d(f(sg f(z)), sg f(z)) drives A to I
    assert fixed_dim(A_flawed) == 4 and (A_flawed - I).abs().max() < 0.01


def test_multistep_project_and_sign_evaluation():
    A = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def f(v):
        return v @ A.T

    z, e1, e2 = torch.randn(3, 4, 3).unbind(0)
    assert [x.tolist() for x in sid.multistep_sample(f, z)] == [f(z).tolist()]
    xs = sid.multistep_sample(f, z, [0.8, 0.2], [e1, e2])
    assert len(xs) == 3 and torch.allclose(xs[1], f(f(z) + 0.8 * e1))
    assert torch.allclose(xs[2], f(xs[1] + 0.2 * e2))
    U = torch.linalg.qr(torch.randn(4, 2))[0]

    def P(v):
        return v @ (U @ U.T).T

    y, n1, n2 = torch.randn(3, 5, 4).unbind(0)
    assert torch.allclose(sid.project(P, y), P(y), atol=1e-6)
    assert torch.allclose(sid.project(P, y, 0.5, [n1, n2], repeat=2), P(P(y + 0.5 * n1) + 0.5 * n2),
                          atol=1e-6)
    a, b = (sid.project(P, y, 0.5, torch.Generator().manual_seed(3), repeat=3) for _ in range(2))
    assert torch.equal(a, b) and not torch.allclose(a, P(y))

    def double(v):  # |f(f(z)) - f(z)| = 2|z|, |f(x) - x| = |x|
        return 2 * v

    ev = sid.sign_evaluation(double, z, y, [0.5], [torch.zeros_like(z)], torch.ones_like(y),
                             sigma_proj=0.1)
    assert ev['idem'] == pytest.approx(2 * z.norm(dim=1).mean().item(), rel=1e-5)
    assert ev['fix'] == pytest.approx(y.norm(dim=1).mean().item(), rel=1e-5)
    assert torch.allclose(ev['noisy'], y + 0.1) and torch.allclose(ev['projected'], 2 * (y + 0.1))
    assert len(ev['steps']) == 2

#----------------------------------------------------------------------------
# edm_nets: network structure vs the official EDM configs, preconditioning, SiDA logits, precision paths.

NCSNPP = dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1])
TINY = {name: dict(model_channels=16, num_blocks=1) for name in edm_nets.PRESETS}
TINY['imagenet-64x64-cond-adm'] = dict(model_channels=64, num_blocks=1, img_resolution=32)  # >= 64 ch: 1 attention head

def tiny_net(name, seed=0, randomize=True, **overrides):
    torch.manual_seed(seed)  # EDM zero-inits output layers; random weights make every parameter matter
    net = edm_nets.build_preset(name, **{**TINY[name], **overrides}).eval()
    return perturb_copy(net, seed) if randomize else net

def net_inputs(net, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, *net.img_shape], generator=g)
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [batch], generator=g)] if net.label_dim else None
    aug = torch.randn([batch, 9], generator=g) if net.model.map_augment is not None else None
    return x, torch.exp(torch.randn([batch, 1, 1, 1], generator=g)), labels, aug

@pytest.mark.parametrize('name,overrides,n_params,n_keys', [
    ('cifar10-32x32-cond-vp', {}, 55_735_299, 427), ('cifar10-32x32-uncond-vp', {}, 55_733_891, 425),
    ('ffhq-64x64-uncond-vp', {}, 61_805_571, 553), ('afhqv2-64x64-uncond-vp', {}, 61_805_571, 553),
    ('imagenet-64x64-cond-adm', {}, 295_899_267, 553), ('cifar10-32x32-cond-vp', NCSNPP, 56_400_643, 434),
    ('ffhq-64x64-uncond-vp', NCSNPP, 62_761_091, 563)])
def test_official_config_sizes(monkeypatch, name, overrides, n_params, n_keys):
    monkeypatch.setattr(edm_nets, 'weight_init', lambda shape, **kw: torch.empty(*shape))
    with torch.device('meta'):  # shapes only: full-size SiDA logits are 8x8 for every official teacher
        net, B = edm_nets.build_preset(name, **overrides), 2
        x, sigma, aug, labels = torch.empty(B, *net.img_shape), torch.empty(B, 1, 1, 1), torch.empty(B, 9), torch.empty(B, net.label_dim)
        D, logits = net(x, sigma, labels, aug, return_logits=True)
        assert D.shape == x.shape and logits.shape == net(x, sigma, labels, aug, encoder_only=True).shape == (B, 1, 8, 8)
    sd = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == n_params and len(sd) == n_keys
    shapes = {'model.map_label.weight': (128, 10), 'model.map_augment.weight': (128, 9), 'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
              'model.dec.32x32_aux_conv.weight': (3, 256, 3, 3)} if name == 'cifar10-32x32-cond-vp' and not overrides else {}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes and ('model.map_noise.freqs' in sd) == bool(overrides)  # NCSN++: Fourier
    if name.startswith('imagenet'):
        assert sd['model.map_label.weight'].shape == (768, 1000) and 'model.map_label.bias' not in sd
        heads = {k: m.num_heads for k, m in net.model.enc.items() if getattr(m, 'num_heads', 0)}
        assert heads['32x32_block0'] == 6 and heads['16x16_block0'] == 9 and heads['8x8_block0'] == 12
    with pytest.raises(ValueError, match='unknown preset'): edm_nets.build_preset('cifar10-32x32-uncond-ve')

@pytest.mark.parametrize('sigma,c_skip,c_out,c_in,c_noise', [(2.5, 0.038462, 0.490290, 0.392232, 0.229073),
                         (0.5, 0.5, 0.5 / math.sqrt(2), 1 / (0.5 * math.sqrt(2)), math.log(0.5) / 4)])
def test_precond_coefficients(sigma, c_skip, c_out, c_in, c_noise):
    """EDM Table 1 at SiD's sigma_init = 2.5 and at sigma_data; the toy's EDMPrecond(ToyMLP) shares them."""
    for net, x in ((tiny_net('cifar10-32x32-uncond-vp', randomize=False), torch.randn(3, 3, 32, 32)),
                   (edm_nets.EDMPrecond(img_resolution=0, img_channels=2, model_type='ToyMLP'), torch.randn(3, 2))):
        body = net.model = Stub(lambda m, x, s: torch.full_like(x, m.value))  # the body F: a constant, its inputs recorded
        close, body.value = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5), 0.0
        D0 = net(x, torch.tensor(sigma))  # scalar sigma broadcasts
        close(D0, c_skip * x), close(body.calls[0]['x'], c_in * x), close(body.calls[0]['sigma'], torch.tensor([c_noise]))
        body.value = 1.0
        close(net(x, sigma) - D0, torch.full_like(x, c_out))

@pytest.mark.parametrize('name,overrides', [(n, {}) for n in edm_nets.PRESETS] + [('cifar10-32x32-cond-vp', NCSNPP)])
def test_logits_and_encoder_only(name, overrides):
    net = tiny_net(name, **overrides)
    x, sigma, labels, aug = net_inputs(net)
    D, logits = net(x, sigma, labels, aug, return_logits=True)
    r = net.img_resolution >> (len(net.init_kwargs['channel_mult']) - 1)
    assert D.shape == x.shape and logits.shape == (2, 1, r, r) and logits.dtype == D.dtype == torch.float32
    assert torch.equal(D, net(x, sigma, labels, aug)) and torch.equal(logits, net(x, sigma, labels, aug, encoder_only=True))
    feats = []  # the logits are the channel mean of the last encoder feature map
    handle = list(net.model.enc.values())[-1].register_forward_hook(lambda m, i, o: feats.append(o))
    net(x, sigma, labels, aug, encoder_only=True)
    handle.remove()
    torch.testing.assert_close(logits, feats[0].mean(dim=1, keepdim=True))
    net.requires_grad_(True)
    net(x, sigma, labels, aug, encoder_only=True).square().sum().backward()  # gradients reach the encoder only
    for k, p in net.named_parameters():
        assert (p.grad is None) == k.startswith(('model.dec.', 'model.out_')) or not k.startswith(('model.dec.', 'model.enc.')), k
    if net.label_dim:  # labels None = zeros; labels and augmentation are used
        torch.testing.assert_close(net(x, sigma), net(x, sigma, torch.zeros(2, net.label_dim), aug * 0 if aug is not None else None))
        assert not torch.allclose(net(x, sigma, labels, aug), net(x, sigma, None, aug))

def test_attention_uses_interleaved_qkv_layout():
    torch.manual_seed(0)
    block = perturb_copy(edm_nets.UNetBlock(64, 64, emb_channels=8, attention=True, num_heads=2).eval(), 0, 0.3)
    x, emb, seen = torch.randn(2, 64, 4, 4), torch.randn(2, 8), {}
    block.norm2.register_forward_hook(lambda m, i, o: seen.update(h=i[0], n=o))
    y = block(x, emb)
    qkv = block.qkv(seen['n']).flatten(2)  # channel (head*C_head + c)*3 + j holds q/k/v (j = 0/1/2)
    q, k, v = (qkv[:, j::3].reshape(2, 2, 32, 16) for j in range(3))
    w = torch.softmax(torch.einsum('bhcq,bhck->bhqk', q, k) / math.sqrt(32), dim=-1)
    a = torch.einsum('bhqk,bhck->bhcq', w, v).reshape(2, 64, 4, 4)
    torch.testing.assert_close(y, block.proj(a) + seen['h'], atol=1e-5, rtol=1e-5)

def test_fp16_body_close_to_fp32():
    # fp16 has 11 mantissa bits (0.02 % per op), ~0.1 % observed: 1 % leaves 10x; an unused fp16 body has the wrong dtype
    torch.manual_seed(0)  # fp16 convolutions are slow on CPU: a 16x16 two-level ADM with attention
    net = perturb_copy(edm_nets.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, use_fp16=True, model_type='DhariwalUNet',
                                           model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]).eval(), 0, 0.05)
    with torch.no_grad():
        x, sigma, labels, _ = net_inputs(net)
        ref, out = (net.model(v, sigma.log().flatten() / 4, labels) for v in (x, x.half()))
    assert out.dtype == torch.float16 and all(p.dtype == torch.float32 for p in net.parameters()) and ((out.float() - ref).norm() / ref.norm()) < 0.01
    torch.testing.assert_close(net(x, sigma, labels), net(x, sigma, labels, force_fp32=True), rtol=0, atol=0)  # CPU: fp32 as EDM

def test_edm_sampler_heun_matches_ode_solution():
    """For data N(mu, s^2) the probability-flow ODE maps x_T to mu + (x_T - mu) sqrt(s^2 + t^2)/sqrt(s^2 + T^2)."""
    mu, s = 0.7, 0.3
    den, z = gaussian(mu, s), torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    assert edm_nets.edm_sampler(den, z).dtype == torch.float64 and len(den.calls) == 35  # 18 steps, the last plain Euler
    sigmas = [float(c['sigma']) for c in den.calls]
    np.testing.assert_allclose(sorted(set(sigmas), reverse=True)[:4] + [min(sigmas)], [80, 57.586, 40.786, 28.375, 0.002], rtol=1e-4)
    exact = mu + (80 * z.double() - mu) * s / math.sqrt(s ** 2 + 80 ** 2)
    err18, err50, err200 = ((edm_nets.edm_sampler(den, z, num_steps=n) - exact).abs().max() for n in (18, 50, 200))
    assert err18 < 0.1 and err50 < err18 / 6 and err200 < err50 / 12, (err18, err50, err200)  # second order
    g, den = torch.Generator().manual_seed(1), gaussian(-0.4, 0.5)  # churn (EDM's ImageNet setting) keeps the distribution
    x = edm_nets.edm_sampler(den, torch.randn(20000, 1, 1, 1, generator=g), num_steps=256, S_churn=40, S_min=0.05, S_max=50,
                             S_noise=1.003, randn_like=lambda t: torch.randn(t.shape, dtype=t.dtype, generator=g))
    assert len(den.calls) == 511 and abs(x.mean() + 0.4) < 0.02 and abs(x.std() / 0.5 - 1) < 0.02

#----------------------------------------------------------------------------
# AugmentPipe: EDM's label layout, exact flips, and labels that describe the geometric warp applied.

SID_AUG = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

def test_augment_p0_flips_layout_and_reproducible():
    _, x = torch.manual_seed(0), torch.randn(8, 3, 32, 32)
    y, labels = edm_nets.AugmentPipe(p=0, **SID_AUG)(x)  # the identity warp still resamples: round-off ~1e-5 on |x| ~ 3
    assert torch.allclose(y, x, atol=1e-4) and labels.shape == (8, 9) and not labels.any()
    y, labels = edm_nets.AugmentPipe(p=0.12, **SID_AUG)(torch.randn(4000, 1, 2, 2))  # xflip=1e8: a fair coin whatever p
    assert abs(labels[:, 0].mean() - 0.5) < 0.04 and abs((labels[:, 2] != 0).float().mean() - 0.12) < 0.02
    x = torch.randn(64, 3, 8, 8)
    y, labels = edm_nets.AugmentPipe(p=1, xflip=1, yflip=1)(x)
    flip = lambda v, a, b: (lambda w: w.flip(1) if b else w)(v.flip(2) if a else v)
    assert all(torch.equal(y[i], flip(x[i], labels[i, 0], labels[i, 1])) for i in range(64)) and 0 < labels[:, 0].sum() < 64 and 0 < labels[:, 1].sum() < 64
    x = torch.randn(2, 3, 16, 16)  # an integer translation is a reflect-padded shift
    pad, y = F.pad(x, [8, 8, 8, 8], mode='reflect'), edm_nets.warp_images(x, edm_nets._translate(torch.tensor([-3.0, 2.0]), torch.tensor([1.0, -4.0])))
    torch.testing.assert_close(y, torch.stack([pad[0, :, 9:25, 5:21], pad[1, :, 4:20, 10:26]]), atol=1e-5, rtol=0)
    x = torch.randn(256, 3, 8, 8)
    (y1, l1), (y2, l2) = [(torch.manual_seed(0), edm_nets.AugmentPipe(p=1, **SID_AUG)(x))[1] for _ in range(2)]
    assert torch.equal(l1, l2) and torch.allclose(y1, y2, atol=1e-5) and (l1[:, 2:] != 0).all(dim=0)[[0, 1, 2, 5, 6]].all()  # seeded

def test_augment_sync_free_identity_rows_exact_rows_independent():
    y, labels = edm_nets.AugmentPipe(p=0.5, **SID_AUG)(torch.empty(8, 3, 16, 16, device='meta'))  # no host values:
    assert y.shape == (8, 3, 16, 16) and labels.shape == (8, 9)  # any .item()/.tolist() (a GPU sync) would raise here
    x = torch.randn(512, 3, 8, 8)
    torch.manual_seed(0)
    y, labels = edm_nets.AugmentPipe(p=0.3, **SID_AUG)(x)
    ident = (labels[:, 2:] == 0).all(dim=1)
    flipped = torch.where(labels[:, 0, None, None, None] == 1, x.flip(3), x)
    flipped = torch.where(labels[:, 1, None, None, None] == 1, flipped.flip(2), flipped)
    assert 50 < ident.sum() < 400 and torch.equal(y[ident], flipped[ident])  # untouched by the resampler
    x2 = torch.where(torch.arange(512)[:, None, None, None] % 2 == 0, x, torch.randn_like(x))
    torch.manual_seed(0)  # other images in the batch (same draws) leave a row's output as it was
    y2, labels2 = edm_nets.AugmentPipe(p=0.3, **SID_AUG)(x2)
    assert torch.equal(labels2, labels) and torch.allclose(y2[::2], y[::2], atol=1e-6, rtol=0)

#----------------------------------------------------------------------------
# edm_nets' checkpoint reader on fixtures in EDM's persistence format, written without EDM's code: a fake
# torch_utils.persistence exists only while pickling; our modules reduce to (_reconstruct_persistent_obj, (meta,)).

@contextlib.contextmanager
def fake_edm_modules():
    def _reconstruct_persistent_obj(meta): raise AssertionError('only used as a pickle reference')
    _reconstruct_persistent_obj.__module__, _reconstruct_persistent_obj.__qualname__ = 'torch_utils.persistence', '_reconstruct_persistent_obj'
    EasyDict = type('EasyDict', (dict,), dict(__module__='dnnlib.util'))
    fakes = {k: types.ModuleType(k) for k in ('torch_utils', 'torch_utils.persistence', 'dnnlib', 'dnnlib.util')}
    fakes['torch_utils.persistence']._reconstruct_persistent_obj, fakes['dnnlib.util'].EasyDict = _reconstruct_persistent_obj, EasyDict
    saved = {k: sys.modules.get(k) for k in fakes}
    sys.modules.update(fakes)
    try:
        yield _reconstruct_persistent_obj, EasyDict
    finally:
        [sys.modules.pop(k, None) if v is None else sys.modules.__setitem__(k, v) for k, v in saved.items()]

def write_edm_pickle(path, ema, module_src='# networks.py source would be here\n', protocol=4, extra=None):
    """EDM's .pkl layout: our modules reduce to (_reconstruct_persistent_obj, (meta,)) with the class name and state."""
    with fake_edm_modules() as (reconstruct, EasyDict):
        def reduce(obj):
            if not (isinstance(obj, nn.Module) and type(obj).__module__ == 'edm_nets'): return NotImplemented
            state = {**obj.__dict__, '_init_args': (), '_init_kwargs': obj.__dict__.get('init_kwargs', {})}
            state.pop('init_kwargs', None)
            if 'skip_scale' in state:  # EDM stores np.float64 here, exercising the numpy globals
                state['skip_scale'] = np.float64(state['skip_scale'])
            return reconstruct, (dict(type='class', version=6, module_src=module_src, class_name=type(obj).__name__, state=state),)
        buf, data = io.BytesIO(), {**dict(ema=ema, augment_pipe=None, dataset_kwargs=EasyDict(path='x.zip', arr=np.arange(3.0))), **(extra or {})}
        type('P', (pickle.Pickler,), dict(reducer_override=lambda self, obj: reduce(obj)))(buf, protocol=protocol).dump(data)
    write_bytes(path, buf.getvalue())
    return buf.getvalue()

def assert_same_net(a, b):
    assert a.init_kwargs == b.init_kwargs and list(a.state_dict()) == list(b.state_dict()) and states_equal(a, b)
    x, sigma, labels, aug = net_inputs(a)
    assert torch.equal(a(x, sigma, labels, aug), b(x, sigma, labels, aug))

@pytest.mark.parametrize('name,overrides,spelling', [('cifar10-32x32-cond-vp', {}, ''), ('ffhq-64x64-uncond-vp', NCSNPP, ''),
                         ('imagenet-64x64-cond-adm', {}, ''), ('cifar10-32x32-uncond-vp', {}, 'numpy.core.multiarray'),
                         ('cifar10-32x32-uncond-vp', {}, 'numpy._core.multiarray')])
def test_loader_roundtrip_edm_pickle(tmp_path, name, overrides, spelling):
    net = tiny_net(name, **overrides)
    raw = write_edm_pickle(tmp_path / 'net.pkl', net, protocol=3 if spelling else 4)  # protocol 3: globals as text lines
    if spelling:  # numpy 1 and 2 spell the array module differently
        found = [m for m in (b'numpy._core.multiarray', b'numpy.core.multiarray') if b'c' + m + b'\nscalar\n' in raw][0]
        raw = raw.replace(b'c' + found + b'\n', b'c' + spelling.encode() + b'\n')
        assert raw.count(b'c' + spelling.encode() + b'\n') >= 2  # scalar and _reconstruct
        write_bytes(tmp_path / 'net.pkl', raw)
    loaded, info = edm_nets.load_checkpoint(str(tmp_path / 'net.pkl'))
    assert isinstance(loaded, edm_nets.EDMPrecond) and not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert_same_net(net, loaded)

class Evil:  # unpickles as fn(*args)
    def __init__(self, fn, *args): self.reduced = fn, args
    def __reduce__(self): return self.reduced

@pytest.mark.parametrize('make,global_name', [
    (lambda m: Evil(os.system, f'touch {m}'), f'{os.system.__module__}.system'), (lambda m: Evil(eval, f'open({str(m)!r}, "w")'), 'builtins.eval'),
    (lambda m: Evil(getattr, 'text', 'upper'), 'builtins.getattr'), (lambda m: Evil(subprocess.Popen, ['touch', str(m)]), 'subprocess.Popen'),
    (lambda m: Evil(torch.save, {}, str(m)), 'torch.serialization.save'), (lambda m: Evil(np.save, str(m), np.zeros(1)), 'numpy.save')])
def test_loader_refuses_unsafe_globals_and_never_runs_module_src(tmp_path, make, global_name):
    marker, net = tmp_path / 'marker', tiny_net('cifar10-32x32-uncond-vp')
    for extra in (dict(evil=make(marker)), dict(ema=dict(state=dict(_modules=dict(x=make(marker)))))):
        write_edm_pickle(tmp_path / 'evil.pkl', net, extra=extra)
        with pytest.raises(ValueError, match=f'evil.pkl: unsafe .*refusing to load global {global_name}'):
            edm_nets.load_checkpoint(str(tmp_path / 'evil.pkl'))
        assert not marker.exists()
    write_edm_pickle(tmp_path / 'src.pkl', net, module_src=f'open({str(marker)!r}, "w").write("ran")\nraise SystemExit("ran")\n')
    edm_nets.load_checkpoint(str(tmp_path / 'src.pkl'))
    assert not marker.exists()

def test_loader_strict_errors_and_own_checkpoints(tmp_path):
    net = tiny_net('cifar10-32x32-cond-vp')
    del net.model.map_layer1._parameters['bias']  # a weight missing from the checkpoint
    write_edm_pickle(tmp_path / 'a.pkl', net)
    net = tiny_net('cifar10-32x32-cond-vp')
    net.init_kwargs['label_dim'] = 0  # kwargs that do not match the weights
    write_edm_pickle(tmp_path / 'b.pkl', net)
    with fake_edm_modules(): write_bytes(tmp_path / 'c.pkl', pickle.dumps(dict(loss_fn=None)))
    for name, err, msg in (('a.pkl', ValueError, 'a.pkl: weights do not match.*missing keys.*map_layer1.bias'), ('c.pkl', ValueError, 'c.pkl: no "ema"'),
                           ('b.pkl', ValueError, 'b.pkl: weights do not match.*unexpected keys.*map_label'), ('missing.pkl', FileNotFoundError, 'missing.pkl')):
        with pytest.raises(err, match=msg): edm_nets.load_checkpoint(str(tmp_path / name))
    net = tiny_net('cifar10-32x32-cond-vp')
    for key in ('G_ema', 'ema'):
        torch.save({key: net.state_dict(), 'net_kwargs': net.init_kwargs, 'kimg': 3}, tmp_path / f'{key}.pt')
        assert_same_net(net, edm_nets.load_checkpoint(str(tmp_path / f'{key}.pt'))[0])
    runs.save_snapshot(str(tmp_path / 's.pt'), net, 12, sid.Config(sigma_init=1.5))
    loaded, info = edm_nets.load_checkpoint(str(tmp_path / 's.pt'))
    assert states_equal(net, loaded) and info['kimg'] == 0.012 and info['config']['sigma_init'] == 1.5

@slow
def test_official_cifar_teacher_loads_and_samples():  # needs the real checkpoint (~225 MB in $SID_CACHE)
    net, _ = edm_nets.load_checkpoint('cifar10-32x32-uncond-vp')
    x = edm_nets.edm_sampler(net, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(x).all() and -1.5 < x.min() and x.max() < 1.5 and 0.2 < x.std() < 0.8

def test_download_local_path_and_cache_keyed_on_url(tmp_path):
    a, b, cache = tmp_path / 'a' / 'edm.pkl', tmp_path / 'b' / 'edm.pkl', str(tmp_path / 'cache')
    for p, blob in ((a, b'first'), (b, b'second')):
        os.makedirs(p.parent), write_bytes(p, blob)
    assert edm_nets.download(str(a)) == str(a)
    with pytest.raises(FileNotFoundError): edm_nets.download(str(tmp_path / 'nope.pkl'))
    pa, pb = (edm_nets.download(p.as_uri(), cache) for p in (a, b))  # the same file name at two URLs: two entries
    assert pa != pb and open(pa, 'rb').read() == b'first' and open(pb, 'rb').read() == b'second'
    a.unlink()  # cached now: no second fetch
    assert edm_nets.download(a.as_uri(), cache) == pa and open(pa, 'rb').read() == b'first'
    with pytest.raises(RuntimeError, match=r'sha256 mismatch.*fetch it by hand to .*c2/[0-9a-f]{16}-edm\.pkl$'):
        edm_nets.download(b.as_uri(), str(tmp_path / 'c2'), sha256='0' * 64)
    assert os.listdir(tmp_path / 'c2') == []  # no partial or temporary file left

#----------------------------------------------------------------------------
# Real-data loaders: a fake cifar-10-python.tar.gz in the official layout, EDM zips and folders.

def cifar_tar(path, per_batch=3, payload=None):
    """Five data_batch_i pickles (bytes keys, protocol 2) plus test_batch; -> (data, labels)."""
    rng = np.random.default_rng(0)
    data, labels = rng.integers(0, 256, (5 * per_batch, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, 5 * per_batch)]
    with tarfile.open(path, 'w:gz') as tar:
        for i in range(6):
            s = slice(i * per_batch, (i + 1) * per_batch) if i < 5 else slice(0, 1)
            blob = pickle.dumps({b'labels': labels[s], b'data': data[s], **({b'x': payload} if payload and i == 2 else {})}, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{f"data_batch_{i + 1}" if i < 5 else "test_batch"}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return data.reshape(-1, 3, 32, 32), labels

def png_bytes(arr):
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()

def edm_files(n=5, size=8, rgb=True):
    """{name: png bytes} in a subfolder as EDM's dataset_tool writes them, the arrays (C,H,W) and int labels."""
    rng = np.random.default_rng(1)
    arrs = [rng.integers(0, 256, (size, size, 3) if rgb else (size, size), dtype=np.uint8) for _ in range(n)]
    return ({f'00000/img{i:08d}.png': png_bytes(a) for i, a in enumerate(arrs)},
            np.stack([a.transpose(2, 0, 1) if rgb else a[None] for a in arrs]), [i % 3 for i in range(n)])

def write_dataset(path, files, meta=None, kind='folder'):
    files = {**files, **({'dataset.json': json.dumps(meta).encode()} if meta is not None else {})}
    if kind == 'zip':
        with zipfile.ZipFile(path, 'w') as zf:
            [zf.writestr(name, files[name]) for name in reversed(list(files))]  # stored out of order: the loader must sort
    for name, blob in files.items() if kind != 'zip' else ():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        write_bytes(os.path.join(path, name), blob)
    return str(path)

def test_cifar_archive_truncation_and_allow_list(tmp_path):
    data, labels = cifar_tar(tmp_path / 'c.tar.gz')
    images, onehot = edm_nets.load_dataset(tmp_path / 'c.tar.gz')
    assert images.dtype == torch.uint8 and torch.equal(images, torch.from_numpy(data))  # batches 1..5 in order
    assert onehot.dtype == torch.float32 and onehot.shape == (15, 10) and onehot.argmax(1).tolist() == labels
    cifar_tar(tmp_path / 'big.tar.gz', per_batch=50)
    write_bytes(tmp_path / 't.tar.gz', (tmp_path / 'big.tar.gz').read_bytes()[:20000])
    with pytest.raises(ValueError, match='not a readable CIFAR-10'): edm_nets.load_dataset(tmp_path / 't.tar.gz')
    # only numpy's array reconstruction and the bytes codec are allowed: any other global (numpy's too) is refused
    for payload, name in [(Evil(os.system, 'true'), 'system'), (Evil(np.load, 'x.npy'), 'numpy.load'), (Evil(np.frombuffer, b'\0' * 8), 'numpy.frombuffer')]:
        cifar_tar(tmp_path / 'e.tar.gz', payload=payload)
        with pytest.raises(ValueError, match=f'e.tar.gz: not a readable CIFAR.*refusing to load global .*{name}'): edm_nets.load_dataset(tmp_path / 'e.tar.gz')

@pytest.mark.parametrize('kind', ['zip', 'folder'])
def test_edm_dataset_zip_folder_grayscale_and_errors(tmp_path, kind):
    ext = '.zip' if kind == 'zip' else ''
    files, chw, ys = edm_files()
    images, onehot = edm_nets.load_dataset(write_dataset(tmp_path / f'd{ext}', files, {'labels': [[n, y] for n, y in zip(files, ys)]}, kind))
    assert torch.equal(images, torch.from_numpy(chw)) and onehot.shape == (5, 3) and onehot.argmax(1).tolist() == ys
    gfiles, chw, _ = edm_files(n=3, rgb=False)
    images, labels = edm_nets.load_dataset(write_dataset(tmp_path / f'g{ext}', gfiles, None, kind))
    assert torch.equal(images, torch.from_numpy(chw)) and images.shape == (3, 1, 8, 8) and labels.shape == (3, 0)
    for i, (fs, meta, msg) in enumerate([(files, {'labels': [[n, 0] for n in files] + [['00000/gone.png', 1]]}, 'not in the dataset, e.g. 00000/gone.png'),
                                         (files, {'labels': [[n, 0] for n in list(files)[:2]]}, 'no label for 3 image.*img00000002'),
                                         ({**files, '00000/img00000009.png': png_bytes(np.zeros((16, 16, 3), np.uint8))}, None, r'img00000009.png is \(3, 16, 16\)')]):
        with pytest.raises(ValueError, match=msg): edm_nets.load_dataset(write_dataset(tmp_path / f'e{i}{ext}', fs, meta, kind))
    if kind == 'zip':
        write_bytes(tmp_path / 'trunc.zip', (tmp_path / 'd.zip').read_bytes()[:-40])
        with pytest.raises(ValueError, match='unreadable dataset'): edm_nets.load_dataset(tmp_path / 'trunc.zip')
    with pytest.raises(FileNotFoundError): edm_nets.load_dataset(tmp_path / f'nope{ext or "/"}')

def test_batches_sharding_epochs_and_teacher_match():
    n = 11
    images, labels, shards = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(), torch.eye(n), []
    stream = lambda rank, start=0: edm_nets.infinite_batches(images, labels, batch=3, seed=7, rank=rank, world_size=2, start=start)
    for rank in range(2):
        it = stream(rank)
        x, y = (torch.cat(t) for t in zip(*[next(it) for _ in range(4)]))
        assert torch.equal(x, images[y.argmax(1)].float() / 127.5 - 1)  # labels travel with their images, in [-1, 1]
        shards.append(y.argmax(1)[:6 - rank].tolist())  # the first epoch's shard
    assert sorted(shards[0] + shards[1]) == list(range(n))  # disjoint and complete
    resumed, it = stream(1, start=2), stream(1)
    [next(it) for _ in range(2)]
    assert all(torch.equal(next(it)[1], next(resumed)[1]) for _ in range(3))  # `start` resumes the stream
    take = lambda seed: [next(it)[1].argmax(1).tolist() for it in [edm_nets.infinite_batches(images[:8], torch.eye(8), 8, seed)] for _ in range(3)]
    a = take(3)
    assert a == take(3) and a != take(4) and all(sorted(e) == list(range(8)) for e in a) and a[0] != a[1]
    net = types.SimpleNamespace(img_resolution=32, img_channels=3, label_dim=10)
    img, lab = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 10)
    assert edm_nets.check_dataset_matches(img, lab, net) is lab
    for bad, msg in [((torch.zeros(2, 3, 64, 64), lab), 'resolution 64x64 .* resolution 32'), ((torch.zeros(2, 1, 32, 32), lab), '1 channels'),
                     ((img, lab[:, :0]), 'label_dim 0 .* label_dim 10')]:
        with pytest.raises(ValueError, match=msg): edm_nets.check_dataset_matches(*bad, net)
    net.label_dim = 0  # an unconditional teacher drops the labels
    assert edm_nets.check_dataset_matches(img, lab, net).shape == (2, 0)

#----------------------------------------------------------------------------
# Hostile files (a few bytes to ~1 MB each), all read in ONE subprocess under RLIMIT_AS = 1.5 GB and a 20 s alarm
# per file: each is refused with one line naming the file, in seconds, without exhausting memory.

class TensorView:  # a view of 250M floats on a storage of 1000: set_() would grow the storage to 1 GB
    def __reduce__(self):
        storage = torch.storage.TypedStorage(wrap_storage=torch.zeros(1000).untyped_storage(), dtype=torch.float32, _internal=True)
        return torch._utils._rebuild_tensor_v2, (storage, 0, (250_000_000,), (1,), False, collections.OrderedDict())

def zip_bomb(path):
    """A hand-written ~1 MB zip whose one member inflates to 1 GiB of zeros (one deflate block, repeated)."""
    c, chunk = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 << 20)
    first, again = (c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) for _ in range(2))  # after a full flush: identical
    data, crc, n = first + again * 1023 + c.flush(), 0, b'a.png'
    for _ in range(1024): crc = zlib.crc32(chunk, crc)
    local = struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 0, 8, 0, 0, crc, len(data), 1 << 30, len(n), 0) + n + data
    central = struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, 8, 0, 0, crc, len(data), 1 << 30, len(n), 0, 0, 0, 0, 0, 0) + n
    return write_bytes(path, local + central + struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, 1, 1, len(central), len(local), 0))

def png_header(path, w, h):  # a valid PNG header claiming w x h pixels, one tiny IDAT
    chunk = lambda kind, data: struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return write_bytes(path, b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) +
                       chunk(b'IDAT', zlib.compress(bytes(100))) + chunk(b'IEND', b''))

labels_zip = lambda d, name, labels: write_dataset(d / f'{name}.zip', {f'{i}.png': png_bytes(np.full((8, 8, 3), i, np.uint8)) for i in range(3)},
                                                   {'labels': labels}, 'zip')
HUGE = lambda ch: dict(img_resolution=64, img_channels=3, label_dim=0, model_type='DhariwalUNet', model_channels=ch)
FID = lambda *a: '|'.join(['fid', *map(str, a)])  # fid.py's command line
HOSTILE = [  # (id, reader, build(folder) -> argument, message)
    ('object-array', 'ckpt', lambda d: write_bytes(d / 'obj.pkl', b'\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ' +
                                                   struct.pack('<i', 600_000_000) + b'\x85U\x01O\x87R.'), r'obj.pkl: .*refusing numpy _reconstruct'),
    ('hash-bomb', 'ckpt', lambda d: write_bytes(d / 'hash.pkl', b'\x80\x04})\x940' + b''.join(  # t_{k+1} = (t_k, t_k): 2^64 leaves
        bytes([0x68, k, 0x68, k, 0x86, 0x94]) + (b'0' if k < 63 else b'') for k in range(64)) + b'K\x01s.'), r'refusing a tuple as a dict key'),
    ('read-claim', 'ckpt', lambda d: write_bytes(d / 'claim.pkl', b'\x80\x04\x8e' + struct.pack('<Q', 1 << 40) + b'xyz.'), r'claims 1099511627776 bytes'),
    ('tensor-view', 'ckpt', lambda d: write_bytes(d / 'view.pkl', pickle.dumps({'ema': TensorView()}, protocol=4)), r'tensor view \[250000000\].*storage of 1000'),
    ('huge-kwargs', 'ckpt', lambda d: torch.save({'ema': {}, 'net_kwargs': HUGE(384)}, d / 'huge.pt') or d / 'huge.pt', r'huge.pt: weights do not match.*missing keys'),
    ('param-budget', 'ckpt', lambda d: torch.save({'ema': {}, 'net_kwargs': HUGE(768)}, d / 'p.pt') or d / 'p.pt', r'p.pt: .*parameters \(limit 2e\+09\)'),
    ('zip-bomb', 'data', lambda d: zip_bomb(d / 'bomb.zip'), r'bomb.zip: member a.png declares 1073741824 bytes'),
    ('label-1e8', 'data', lambda d: labels_zip(d, 'big', [[f'{i}.png', 10 ** 8] for i in range(3)]), r'big.zip: dataset.json labels must be'),
    ('labels-not-list', 'data', lambda d: labels_zip(d, 'five', 5), r'five.zip: dataset.json labels must be a list'),
    ('labels-not-pairs', 'data', lambda d: labels_zip(d, 'pairs', [['0.png']]), r'pairs.zip: dataset.json labels must be a list of \[name, int'),
    ('png-9000', 'image', lambda d: png_header(d / 'big9000.png', 9000, 9000), r'9000x9000 pixels exceeds the limit'),
    ('png-12000', 'image', lambda d: png_header(d / 'big12000.png', 12000, 12000), r'big12000.png: unreadable image \(DecompressionBombWarning'),
    ('png-100000', 'image', lambda d: png_header(d / 'big100000.png', 100000, 100000), r'big100000.png:.*(exceeds|bomb)'),
    ('fid-ref-labels', 'fid', lambda d: FID('ref', '--data', d / 'big.zip', '--dest', d / 'r.npz'), 'labels must be'),
    ('fid-num', 'fid', lambda d: FID('calc', '--images', d, '--ref', 'x', '--num', 1), '--num must be >= 2'),
    ('fid-dest', 'fid', lambda d: FID('ref', '--data', d / 'bomb.zip', '--dest', d / 'no' / 'r.npz'), 'cannot write --dest')]

READ_ALL = f"""import contextlib, io, json, resource, signal, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({1536 << 20}, {1536 << 20}))
import edm_nets, fid, runs
signal.signal(signal.SIGALRM, lambda *a: sys.exit('timeout'))
READ = dict(ckpt=edm_nets.load_checkpoint, data=edm_nets.load_dataset, image=edm_nets.read_image, fid=lambda a: fid.main(a.split('|')[1:]))
for line in sys.stdin:  # each refusal as the commands report it: one line on stderr, exit code 2
    name, reader, arg = line.split()
    t, err, code = time.time(), io.StringIO(), 0
    signal.alarm(20)
    with contextlib.redirect_stderr(err):
        try:
            runs.one_line_errors(lambda: READ[reader](arg))
        except SystemExit as e:  # the refusal, or the alarm
            code = e.code
        except BaseException as e:  # anything else (MemoryError, ...) fails this file only
            code = repr(e)
    signal.alarm(0)
    print(json.dumps([name, code, err.getvalue() or str(code), time.time() - t]), flush=True)
"""

@pytest.fixture(scope='module')
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp('hostile')
    args = {name: str(build(d)) for name, _, build, _ in HOSTILE}
    assert all(os.path.getsize(a) < 1.1e6 for a in args.values() if os.path.isfile(a))
    r = subprocess.run([sys.executable, '-c', READ_ALL], input=''.join(f'{n} {reader} {args[n]}\n' for n, reader, _, _ in HOSTILE),
                       cwd=HERE, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    return {row[0]: row[1:] for row in map(json.loads, r.stdout.splitlines())}

@pytest.mark.parametrize('name,match', [(h[0], h[3]) for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_file_refused_fast_in_bounded_memory(hostile, name, match):
    code, err, seconds = hostile[name]
    assert_one_line_error(types.SimpleNamespace(returncode=code, stderr=err), '')
    assert re.search(match, err) and seconds < 10, (err, seconds)  # the refusal itself takes milliseconds

#----------------------------------------------------------------------------
# The bounded unpickler in-process (depth / shared-DAG / cycle caps, exact on honest data), network kwargs,
# atomic_write, the PNG writer and image reader.

def test_unpickler_bounds_structure_and_is_exact_on_honest_data():
    dag = b'\x80\x04]\x940' + b''.join(bytes([0x68, k, 0x68, k, 0x86, 0x94]) + (b'0' if k < 39 else b'') for k in range(40)) + b'.'
    for blob in (dag, b'\x80\x04' + b'](' * 100 + b'e' * 100 + b'.', b'\x80\x04]\x94h\x00a.'):  # 2^40 nodes as a tree; deep; a cycle
        t = time.time()
        with pytest.raises(ValueError, match='x.pkl: .*nesting deeper than 64 or more than'): edm_nets.bounded_unpickle(io.BytesIO(blob), {}, 'x.pkl')
        assert time.time() - t < 5
    assert edm_nets.bounded_unpickle(io.BytesIO(b'\x80\x04' + b'](' * 60 + b'e' * 60 + b'.'), {}, 'x.pkl')  # shallower is fine
    obj = {'a': [1, 2.5, None, True, b'x', 'y'], 3: (np.arange(6, dtype=np.float32).reshape(2, 3), {1, 'q'}),
           'od': collections.OrderedDict(z=1), 's': np.float64(0.25)}
    for protocol in (2, 4):
        obj = dict(obj, f=frozenset({1, 2})) if protocol == 4 else obj  # FROZENSET opcode only from protocol 4
        got = edm_nets.bounded_unpickle(io.BytesIO(pickle.dumps(obj, protocol)), edm_nets.EDM_GLOBALS, 'x.pkl')
        assert got.keys() == obj.keys() and got['a'] == obj['a'] and got['od'] == obj['od'] and got['s'] == 0.25
        assert np.array_equal(got[3][0], obj[3][0]) and got[3][1] == obj[3][1] and got.get('f') == obj.get('f')
    for bad in ({(1,): 2}, {frozenset({1}): 1}, np.array([None], dtype=object)):  # keys/objects refused
        with pytest.raises(ValueError, match='x.pkl: unsafe or unreadable pickle'):
            edm_nets.bounded_unpickle(io.BytesIO(pickle.dumps(bad, 4)), edm_nets.EDM_GLOBALS, 'x.pkl')
    base = dict(edm_nets.PRESETS['cifar10-32x32-cond-vp']['kwargs'])  # network kwargs: exact allow-list and ranges
    assert edm_nets.check_net_kwargs(base, 'f') == base and edm_nets.check_net_kwargs(dict(model_type='ToyMLP', hidden=64, depth=3, dropout=0.1), 'f')
    for kw, match in [(dict(model_channels='128'), 'model_channels=128 is unknown or out of range'), (dict(evil=1), 'evil=1 is unknown'),
                      (dict(model_type='Nope'), 'model_type'), (dict(channel_mult=[1] * 20), 'channel_mult'), (dict(label_dim=10 ** 8), 'label_dim')]:
        with pytest.raises(ValueError, match=f'f: network kwarg {match}'): edm_nets.check_net_kwargs(dict(base, **kw), 'f')

def test_atomic_write_symlink_crash_and_stale(tmp_path, monkeypatch):
    secret, dest, names = tmp_path / 'secret', tmp_path / 'out.bin', iter(['aaaaaa', 'bbbbbb'])
    write_bytes(secret, b'secret')
    monkeypatch.setattr(edm_nets.secrets, 'token_hex', lambda n: next(names))
    (tmp_path / '.out.bin.aaaaaa.tmp').symlink_to(secret)  # planted at the first name tried
    with edm_nets.atomic_write(dest) as f: f.write(b'new')
    assert secret.read_bytes() == b'secret' and dest.read_bytes() == b'new'
    monkeypatch.setattr(edm_nets.secrets, 'token_hex', lambda n: 'cccccc')
    with pytest.raises(KeyError), edm_nets.atomic_write(dest) as f:  # a crash mid-write: old content kept, no temporary left
        f.write(b'half')
        raise KeyError
    assert dest.read_bytes() == b'new' and not (tmp_path / '.out.bin.cccccc.tmp').exists()
    write_bytes(tmp_path / '.g.png.0a1b2c.tmp', b'x'), write_bytes(tmp_path / 'keep.tmp', b'x')
    assert edm_nets.remove_stale_temporaries(tmp_path) == ['.g.png.0a1b2c.tmp', '.out.bin.aaaaaa.tmp']
    assert sorted(os.listdir(tmp_path)) == ['keep.tmp', 'out.bin', 'secret']

@pytest.mark.parametrize('shape,cols', [((3, 5, 7), None), ((1, 5, 7), None), ((5, 3, 4, 6), None), ((3, 1, 4, 6), 2)])
def test_save_png_read_image_round_trip(tmp_path, shape, cols):
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    edm_nets.save_png(tmp_path / 'g.png', x, cols=cols)
    got, (n, c, h, w) = edm_nets.read_image(tmp_path / 'g.png'), (1, *shape) if len(shape) == 3 else shape
    cols = cols or math.ceil(math.sqrt(n))  # a grid of cols columns, row by row
    assert all(np.array_equal(got[:, i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w], x.view(n, c, h, w)[i].numpy()) for i in range(n))
    assert os.listdir(tmp_path) == ['g.png'] and got.shape[0] == c
    batch = next(fid.iterate_image_files([str(tmp_path / 'g.png')], 1))  # fid reads through read_image (gray -> RGB)
    assert batch.shape[1] == 3 and np.array_equal(batch[0, 0].numpy(), got[0])
    with pytest.raises(ValueError, match='junk.png: unreadable image'): edm_nets.read_image(b'not a png', 'junk.png')
    for mode, channels in (('L', 1), ('1', 1), ('LA', 1), ('RGBA', 3), ('P', 3), ('I;16', 3)):
        buf = io.BytesIO()
        PIL.Image.new(mode, (4, 3)).save(buf, format='PNG')
        assert edm_nets.read_image(buf.getvalue()).shape == (channels, 3, 4), mode

#----------------------------------------------------------------------------
# fid: Frechet distance (closed forms, scipy), streaming statistics, a TorchScript detector stand-in, files, CLI.

def random_cov(rng, d, rank=None, scale=1.0):
    a = rng.standard_normal((d, rank or d)) * scale
    return a @ a.T / (rank or d)

class FidStandIn(nn.Module):
    """forward(img uint8, return_features) like NVIDIA's .pt: float cast, fixed resize, (x-128)/128, features."""
    def __init__(self, dim=16):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(48, dim, generator=torch.Generator().manual_seed(0)), requires_grad=False)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = torch.tanh(F.adaptive_avg_pool2d((img.to(torch.float32) - 128) / 128, 4).flatten(1) @ self.proj)
        return features if return_features else features.sum(1, keepdim=True)

def detector_file(path, dim=16):
    torch.jit.save(torch.jit.script(FidStandIn(dim)), str(path))
    return str(path)

def write_pngs(folder, n, size=8):
    return write_dataset(folder, {k.split('/')[1]: v for k, v in edm_files(n, size)[0].items()})  # flat: a folder of PNGs

def test_frechet_closed_forms_and_scipy():
    rng, d = np.random.default_rng(1), 128
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenbasis: commuting covariances
    a, b, mu1, mu2 = rng.uniform(0, 3, d), rng.uniform(0, 3, d), rng.standard_normal(d), rng.standard_normal(d)
    closed = lambda a, b: np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T) == pytest.approx(closed(a, b), rel=1e-10)
    a[:10] = 0  # singular directions: eigenvalues ~1e-16 have square roots ~1e-8
    assert fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T) == pytest.approx(closed(a, b), abs=1e-5)
    s1, s2, low, m1, m2 = random_cov(rng, 32), random_cov(rng, 32), random_cov(rng, 64, rank=20), mu1[:32], mu2[:32]
    fd = fid.frechet_distance(m1, s1, m2, s2)
    assert fid.frechet_distance(m2, s2, m1, s1) == pytest.approx(fd, rel=1e-10) and fid.frechet_distance(3 * m1, 9 * s1, 3 * m2, 9 * s2) == pytest.approx(9 * fd, rel=1e-10)
    assert abs(fid.frechet_distance(mu1[:64], low, mu1[:64], low)) < 1e-6 * np.trace(low)
    try:  # EDM's way, scipy.linalg.sqrtm of the product; without scipy the eigenvalues of the (non-symmetric) product
        from scipy.linalg import sqrtm
        tr_sqrt = lambda m: np.trace(sqrtm(m).real)
    except ImportError:
        tr_sqrt = lambda m: np.sqrt(np.clip(np.linalg.eigvals(m).real, 0, None)).sum()
    for d, rank in ((64, None), (128, 40), (200, 199)):
        m1, m2, c1, c2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1, random_cov(rng, d, rank), random_cov(rng, d, rank, 1.3)
        assert fid.frechet_distance(m1, c1, m2, c2) == pytest.approx(float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2) - 2 * tr_sqrt(c1 @ c2)), rel=1e-6)
    with pytest.raises(ValueError, match='do not match'): fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(5), np.eye(5))

def test_feature_stats_any_split_and_all_reduce():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((101, 12)) * rng.uniform(0.1, 5, 12) + rng.standard_normal(12) * 3
    for sizes in ([101], [1, 50, 50], [7] * 14 + [3]):
        perm, stats = rng.permutation(len(f)), fid.FeatureStats()
        [stats.update(torch.from_numpy(f[perm[s - n:s]])) for n, s in zip(sizes, np.cumsum(sizes))]
        np.testing.assert_allclose(stats.mean_cov()[0], f.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.mean_cov()[1], np.cov(f, rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)
    a, b = fid.FeatureStats(), fid.FeatureStats()
    a.update(torch.from_numpy(f[:40])), b.update(torch.from_numpy(f[40:]))
    other = iter([torch.tensor(float(b.n), dtype=torch.float64), b.sum, b.sum_outer])  # a fake 2-rank all_reduce
    a.all_reduce(lambda t: t.add_(next(other)))
    np.testing.assert_allclose(a.mean_cov()[1], np.cov(f, rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError): s = fid.FeatureStats(); s.update(torch.from_numpy(f[:1])); s.mean_cov()

def test_to_uint8_detector_and_generator_fid(tmp_path, monkeypatch):
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 5.0, 100.9 / 127.5 - 128 / 127.5, 0.999 / 127.5, 1 / 127.5, -125 / 127.5])
    assert fid.to_uint8(x).tolist() == [0, 128, 255, 0, 255, 100, 128, 129, 3]  # EDM: +128 and truncation (round(x*127.5+127.5): 128, 2)
    path = detector_file(tmp_path / 'standin.pt')
    det, images = fid.load_detector('cpu', path), torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    features = fid.extract_features(det, images, 'cpu')
    assert features.dtype == torch.float64 and torch.equal(features, FidStandIn()(images, True).double())
    assert torch.equal(fid.extract_features(det, images[:, :1], 'cpu'), fid.extract_features(det, images[:, :1].repeat(1, 3, 1, 1), 'cpu'))
    with pytest.raises(ValueError): fid.extract_features(det, images.float(), 'cpu')
    monkeypatch.setenv('SID_DETECTOR', path)
    assert torch.equal(fid.extract_features(fid.load_detector('cpu'), images, 'cpu'), features)
    make = lambda seeds: torch.stack([torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds])
    mu, sigma = fid.compute_stats_from_images([fid.to_uint8(make(range(13))), fid.to_uint8(make(range(13, 40)))], det, 'cpu')
    assert fid.fid_of_generator(make, 40, mu, sigma, det, 'cpu', batch=7) == pytest.approx(0, abs=1e-9)
    with pytest.raises(RuntimeError, match='needs an initialised torch.distributed'): fid.fid_of_generator(make, 40, mu, sigma, det, 'cpu', rank=1, world_size=2)

def test_fid_files_and_cli(tmp_path, capsys):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(6), random_cov(rng, 6)
    fid.save_ref(str(tmp_path / 'ref6.npz'), mu, sigma)
    with np.load(tmp_path / 'ref6.npz') as data:  # EDM's keys and dtype, no temporary left
        assert os.listdir(tmp_path) == ['ref6.npz'] and set(data.files) == {'mu', 'sigma'} and data['sigma'].dtype == np.float64
    assert all(np.array_equal(a, b) for a, b in zip(fid.load_ref(str(tmp_path / 'ref6.npz')), (mu, sigma)))
    write_bytes(tmp_path / 'bad.npz', b'not a zip'), np.savez(str(tmp_path / 'keys.npz'), mean=mu)
    for bad in ('bad.npz', 'keys.npz'):
        with pytest.raises(ValueError): fid.load_ref(str(tmp_path / bad))
    all_b = fid.list_images(write_pngs(tmp_path / 'b', 12))
    assert fid.list_images(str(tmp_path / 'b'), num=4, seed=0) == [all_b[i] for i in (4, 6, 10, 11)]  # EDM's subset rule
    folder, ref, det = write_pngs(tmp_path / 'imgs', 24), str(tmp_path / 'ref.npz'), ['--detector', detector_file(tmp_path / 'det.pt')]
    fid.main(['ref', '--data', folder, '--dest', ref, *det, '--batch', '5'])
    fid.main(['calc', '--images', folder, '--ref', ref, '--num', '24', *det])
    assert abs(float(capsys.readouterr().out.split()[-1])) < 1e-6  # the reference's own images
    files, chw, _ = edm_files(n=24, size=8)  # a dataset zip goes through edm_nets' loader
    fid.main(['ref', '--data', write_dataset(tmp_path / 'd.zip', files, None, 'zip'), '--dest', str(tmp_path / 'z.npz'), *det])
    assert np.allclose(fid.load_ref(str(tmp_path / 'z.npz'))[0], FidStandIn()(torch.from_numpy(chw), True).double().mean(0).numpy())
    write_pngs(tmp_path / 'mixed', 3), write_pngs(tmp_path / 'mixed' / 'big', 1, size=16), os.makedirs(tmp_path / 'empty')
    dest = str(tmp_path / 'x.npz')
    for args in [['ref', '--data', str(tmp_path / d), '--dest', dest, *det] for d in ('missing', 'mixed', 'empty')] + [
            ['ref', '--data', folder, '--dest', dest, '--detector', ref], ['calc', '--images', folder, '--ref', str(tmp_path / 'ref6.npz'), '--num', '4', *det],
            ['calc', '--images', folder, '--ref', ref, '--num', '99', *det]]:  # the detector gives 16 features, ref6 has 6
        with pytest.raises(SystemExit) as e: fid.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith('error: ') and len(err.splitlines()) == 1, (args, err)
    assert not os.path.exists(dest)
