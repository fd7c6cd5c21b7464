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

from conftest import (HERE, SLOW, slow, Stub, affine, gaussian, linear, perturb_copy, tiny_edm2,
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


@pytest.mark.parametrize('where', ['x_g', 'y_psi'])
@pytest.mark.parametrize('name', ['sid', 'dsm', 'sida_gan'])
def test_nan_samples_get_zero_loss(name, where):
    """A NaN sample gets a ZERO loss (shape [B] kept); the others' losses are those computed without
    it (SiDA's adversarial term: the BCE mean over the kept samples only). A sample is dropped when
    ANY input is NaN (the official loss ORs the masks of images, y_real and y_fake): a NaN in G's
    sample reaches every output, one in f_psi's output alone reaches only that tensor."""
    def outputs(x, s, n, o):
        x_t = x + s * n
        y_psi = 0.6 * x_t + 0.05 * x_t ** 2
        if where == 'y_psi' and len(x) == 4:
            y_psi = torch.where(torch.arange(4).reshape(4, 1, 1, 1) == 2, float('nan'), y_psi)
        return 0.8 * x_t, y_psi, x_t[:, :1] + o

    def fn(x, s, n, o):
        y_phi, y_psi, logits = outputs(x, s, n, o)
        if name == 'sid':
            return sid.sid_generator_loss(y_phi, y_psi, x, 1.2)
        if name == 'dsm':
            return sid.dsm_loss(y_psi, x, s)
        return sid.sida_generator_gan_loss(logits, x, y_phi, y_psi)

    (x_g, sigma, noise, off), keep = draws(B=4, shape=(3, 8, 8)), [0, 1, 3]
    ref = fn(x_g[keep], sigma[keep], noise[keep], off[keep])
    if where == 'x_g':
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
    here, each term logged; each logit's gradient carries the micro-batch SUM of lambda."""
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
    ref = [2.0 * sum(dsm) / 8, 3.0 * sum(lam) * (bce_r + bce_f) / 2 / 8]  # logged: the two terms
    assert math.isclose(loss.item(), sum(ref), rel_tol=1e-12)
    assert logs.tolist() == pytest.approx(ref, rel=1e-12)
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


@pytest.mark.parametrize('B,shape', [(8, (3,)), (4, (2, 3, 3))])  # points; images, 2 rounds
def test_G_sign_terms_routing_and_reductions(B, shape):
    """G_sign = lsg sum(SiD)/n + sum_k lambda_k sum_b D d_k / n, each IGN term computed here from
    IGN's formulas with the objective's draws (D = pixels per sample, n = 8 images per GPU per
    step, also for a micro-batch of 4); G_bar refreshed to G and without gradients; a zero lambda
    or no real data skips its term (data-free: no L_rec, L_flow from sg x_g)."""
    torch.manual_seed(0)
    d = shape[-1]
    D = math.prod(shape)
    G = linear(torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, dtype=torch.float64))
    x_r = torch.randn(B, *shape, dtype=torch.float64)
    for data in (x_r, None):
        s = sign_state(G)
        with torch.no_grad():
            G.A.add_(0.01)  # G moved since the copy: G_sign must refresh f_theta'
        z = torch.randn(B, *shape, dtype=torch.float64)
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
            idem = ((x_g @ A.T - x_g) ** 2).flatten(1).mean(1)
            start = x_g if data is None else data
            xs = start + sf * noise_f
            step = xs + (sf_next - sf) * (xs - s.f_phi(xs, sf)) / sf
            flow = ((xs @ A.T - step @ A.T) ** 2).flatten(1).mean(1)
            rec = torch.zeros(B)
            if data is not None:
                rec = ((data @ A.T - data) ** 2).flatten(1).mean(1)
            ign = (3.0 * D * idem.sum() + 5.0 * D * rec.sum() + 7.0 * D * flow.sum()) / 8
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
# EDM2 (Karras et al. 2024) in SiD and SiDA (official sida branch, sida_loss_edm2.py): the loss
# differences from EDM as named fields (P_mean/P_std, logvar), each against its closed form, and
# the objectives against the official code's values on its stub networks.

class EDM2Stub(nn.Module):
    """EDM2's call convention in closed form: D = a x sd^2 / (sigma^2 + sd^2) + b; logits = the
    channel mean of x at even rows and columns; log-variance u = c ln(sigma), returned last."""
    def __init__(self, a, b=0.0, c=0.1):
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_logits=False,
                encoder_only=False, return_logvar=False):
        D = self.a * x * 0.25 / (sigma ** 2 + 0.25) + self.b
        logits = x.mean(1, keepdim=True)[:, :, ::2, ::2]
        out = [logits] if encoder_only else [D] + ([logits] if return_logits else [])
        if return_logvar:
            out.append((self.c * torch.as_tensor(sigma).log()).reshape(-1, 1, 1, 1))
        return out[0] if len(out) == 1 else tuple(out)


def edm2_state(**cfg):
    base = dict(logvar=True, alpha=1.0, P_mean=-0.4, P_std=1.0, lsg=1.0, lsg_gan=1.0, lsd=1.0)
    psi = EDM2Stub(0.9, 0.01)
    teacher = EDM2Stub(1.0, c=0.3)  # its u must never be used (officially f_psi's weights G)
    return objective_state(sid.Config(**{**base, **cfg}), n=1, f_phi=teacher, f_psi=psi,
                           psi_ddp=psi, cur_nimg=10 ** 7)


def test_edm2_objectives_give_the_official_values():
    """The official code's own check (stub networks above, y = linspace(-1, 1, 512) as [2, 4, 8, 8],
    torch.manual_seed(123) before each call, alpha 1, tmax 800, logvar on): SiD's generator loss
    sums to -12.628258, the adversarial terms per sample are [8.782638, 1.706215] before the C*H*W
    factor, f_psi's loss sums to 606.074768 (P_mean -0.4, P_std 1.0) and SiDA's discriminator
    adds [5.180727, 4.291700]."""
    y = torch.linspace(-1, 1, 512).reshape(2, 4, 8, 8)
    s = edm2_state()
    torch.manual_seed(123)
    assert (torch.rand(2) * 0.8).tolist() == pytest.approx([0.23688956, 0.41324982], abs=1e-7)
    torch.manual_seed(123)
    _, (loss, gan) = sid.G_sida(s, y, None, None)
    assert loss.item() == pytest.approx(-12.628258, rel=1e-6)
    assert gan.item() / 256 == pytest.approx(8.782638 + 1.706215, rel=1e-6)
    torch.manual_seed(123)
    _, (loss, _) = sid.G_sid(s, y, None, None)
    assert loss.item() == pytest.approx(-12.628258, rel=1e-6)
    torch.manual_seed(123)
    _, (fake, _) = sid.fake_sid(s, y, None, None)
    assert fake.item() == pytest.approx(606.074768, rel=1e-6)
    torch.manual_seed(123)
    _, (dsm, d) = sid.fake_sida(s, y, 0.5 * y, None)  # logged: each term
    assert dsm.item() == pytest.approx(606.074768, rel=1e-6)
    assert d.item() == pytest.approx(5.180727 + 4.291700, rel=1e-6)
    torch.manual_seed(123)  # EDM's levels (P_mean -1.2, P_std 1.2) give another value
    assert sid.fake_sid(edm2_state(P_mean=-1.2, P_std=1.2), y, None, None)[1][0].item() != \
        pytest.approx(606.074768, rel=1e-3)


def test_edm2_uncertainty_weighting_closed_forms():
    """--logvar: each loss per sample divided by e^u; f_psi's also + u per pixel, minimised at
    e^u = the mean over pixels of lambda (D - x)^2, where it equals (1 + ln that mean) * pixels."""
    x_g, sigma, noise, off = draws(B=3, shape=(4, 8, 8))
    u = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64).reshape(3, 1, 1, 1)
    x_t = x_g + sigma * noise
    D = 0.8 * x_t + 0.02 * x_t ** 2
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    sq = lam * (D - x_g) ** 2
    want = [(sq[b].sum() / math.exp(u[b].item()) + 256 * u[b].item()).item() for b in range(3)]
    assert sid.dsm_loss(D, x_g, sigma, logvar=u).tolist() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(sid.dsm_loss(D, x_g, sigma, logvar=torch.zeros_like(u)),
                          sid.dsm_loss(D, x_g, sigma))
    best = sq.flatten(1).mean(1).log().reshape(3, 1, 1, 1).requires_grad_()
    at_best = sid.dsm_loss(D, x_g, sigma, logvar=best)
    g, = torch.autograd.grad(at_best.sum(), best)
    assert g.abs().max() < 1e-9
    assert at_best.tolist() == pytest.approx((256 * (1 + best.flatten())).tolist(), rel=1e-12)
    e = u.flatten().exp()
    y_phi, y_psi = 0.7 * x_t, 0.6 * x_t
    assert torch.allclose(sid.sid_generator_loss(y_phi, y_psi, x_g, 1.2, logvar=u),
                          sid.sid_generator_loss(y_phi, y_psi, x_g, 1.2) / e, rtol=1e-12)
    logits = x_t[:, :1] + off
    assert torch.allclose(sid.sida_generator_gan_loss(logits, x_g, y_phi, y_psi, logvar=u),
                          sid.sida_generator_gan_loss(logits, x_g, y_phi, y_psi) / e,
                          rtol=1e-6)  # w is float32 (as officially)
    real = -logits
    assert torch.allclose(sid.sida_discriminator_loss(real, logits, sigma, logvar=u),
                          sid.sida_discriminator_loss(real, logits, sigma) / e, rtol=1e-12)


def test_edm2_fake_score_levels_and_logvar_routing():
    """f_psi's levels are exp(P_mean + P_std xi) from the objective's first draw; with --logvar
    every f_psi call asks for u and the teacher's never does; without, no call asks (EDM's nets
    take no such argument)."""
    y = torch.randn(4, 4, 8, 8)
    s = edm2_state(P_mean=-0.4, P_std=1.0)
    calls = []
    s.psi_ddp.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    torch.manual_seed(7)
    sid.fake_sid(s, y, None, None)
    torch.manual_seed(7)
    xi = torch.randn(4, 1, 1, 1)
    noise = torch.randn_like(y)
    torch.manual_seed(7)
    sigma = sid.draw_sigma_fake(y, -0.4, 1.0)
    assert torch.allclose(sigma, (-0.4 + 1.0 * xi).exp())
    torch.manual_seed(7)
    _, (loss, _) = sid.fake_sid(s, y, None, None)
    x_in = y + sigma * noise
    D, u = s.psi_ddp(x_in, sigma, return_logvar=True)
    assert loss.item() == pytest.approx(sid.dsm_loss(D, y, sigma, logvar=u).sum().item(), rel=1e-6)
    assert calls[0].get('return_logvar') is True
    teacher = []
    s.f_phi.register_forward_pre_hook(lambda m, a, kw: teacher.append(kw), with_kwargs=True)
    sid.G_sida(s, y, None, None)
    assert calls[-1] == dict(return_logits=True, return_logvar=True)
    assert teacher == [{}]
    s = objective_state(sid.Config(), n=1, psi_ddp=affine(0.5))  # EDM: no logvar argument
    sid.fake_sid(s, y, None, None)
    assert 'return_logvar' not in str(s.psi_ddp.calls)


def test_edm2_networks_from_the_teacher():
    """G: the teacher's U-Net without the log-variance head (the official generator's 200
    entries), with the run's dropout; f_psi: the teacher, with its head only under --logvar; both
    with the run's forced weight normalisation; f_phi: the teacher, frozen."""
    teacher = tiny_edm2(dropout=0.0).eval()
    cfg = sid.Config(dataset='imagenet512-xs', logvar=True, augment=0.0, dropout=0.1,
                     force_normalization=False)
    f_phi, G, f_psi = sid.build_networks(cfg, teacher, torch.device('cpu'))
    unet = {k: v for k, v in teacher.state_dict().items() if k.startswith('unet.')}
    assert list(G.state_dict()) == list(unet) and states_equal(f_phi, teacher)
    assert all(torch.equal(v, unet[k]) for k, v in G.state_dict().items())
    assert states_equal(f_psi, teacher) and f_psi.logvar_channels == 8 and G.logvar_channels == 0
    assert not f_phi.training and not any(p.requires_grad for p in f_phi.parameters())
    for net, p in ((f_phi, 0.0), (G, 0.1), (f_psi, 0.1)):
        blocks = [m for m in net.modules() if isinstance(m, edm_nets.EDM2Block)]
        assert {b.dropout for b in blocks} == {p}
    convs = [m for n in (G, f_psi) for m in n.modules() if isinstance(m, edm_nets.MPConv)]
    assert {m.force_normalization for m in convs} == {False}
    _, _, f_psi = sid.build_networks(dataclasses.replace(cfg, logvar=False), teacher,
                                     torch.device('cpu'))
    assert f_psi.logvar_channels == 0 and list(f_psi.state_dict()) == list(unet)
    for bad, match in ((dict(augment=0.1), '--augment'), (dict(logvar=True), '--no-logvar')):
        net = tiny_edm2(logvar_channels=0) if 'logvar' in bad else teacher
        with pytest.raises(ValueError, match=match):
            sid.build_networks(dataclasses.replace(cfg, **bad), net, torch.device('cpu'))
