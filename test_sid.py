"""Tests for sid: the maths against closed forms and independent computations, then files, CLI, the loop, DDP.

    python -m pytest -q                 # the default, CPU, under 2 minutes on 2 cores
    SID_SLOW=1 python -m pytest -q      # also the slow tests (longer toy runs, every CLI case as a subprocess)

One section per module or method; under torchrun this file is the multi-process driver of the DDP tests (_driver).
"""
import contextlib, copy, dataclasses, io, json, math, os, re, subprocess, sys, time, types
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints, edm_nets, fid, runs, sid, toy

from conftest import (HERE, SLOW, slow, Stub, affine, gaussian, linear, NET, cfg_for, perturb_copy, nets_for,
                      run_quiet, cli, assert_one_line_error, states_equal, read_stats, load_state, draws,
                      softplus, sigmoid, edm_files, write_dataset, write_pngs, detector_file, FidStandIn)

#----------------------------------------------------------------------------
# Identities and SiD losses (SiD §3-4, Eq. 22/23): Tweedie, the schedule, both paper forms, what is detached,
# the 1-D Gaussian closed form, the fake-score minimiser, NaN samples.

@pytest.mark.parametrize('modes,s', [(1, 0.5), (8, 0.1)])
def test_tweedie_exact_on_the_toy_mixture(modes, s):
    """The toy's exact denoiser equals x + sigma^2 grad log p_sigma(x) (autograd of its closed-form log_prob)."""
    T = toy.ToyMixture(modes=modes, s=s)
    T.mu.mul_(modes > 1)  # one mode: N(0, s^2 I)
    x = (torch.randn(64, 2, dtype=torch.float64) * 1.5).requires_grad_(True)
    for sig in (0.01, 0.3, 2.5, 40.0):
        sigma = torch.full((64, 1), sig, dtype=torch.float64)
        grad, = torch.autograd.grad(T.log_prob(x, sigma).sum(), x)
        assert torch.allclose(T(x.detach(), sigma), x.detach() + sig ** 2 * grad, atol=1e-9 * max(1, sig ** 2), rtol=1e-7)
    if modes == 1:  # the textbook form: D = s^2 x / (s^2 + sigma^2)
        assert torch.allclose(T(x.detach(), torch.full((64, 1), 0.7, dtype=torch.float64)), s ** 2 * x.detach() / (s ** 2 + 0.49))

def test_sigma_schedule_and_draws():
    got = sid.sigma_from_t(torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64))
    assert got[0].item() == pytest.approx(0.002) and got[-1].item() == pytest.approx(80.0)
    assert got[1:4].tolist() == pytest.approx([0.085, 2.515, 24.41], abs=2e-3)
    x, _ = torch.zeros(200000, 3, 4, 4), torch.manual_seed(0)
    s = sid.draw_sigma_generator(x, 800)
    assert s.shape == (200000, 1, 1, 1) and s.min() >= 0.002 and s.max() <= 24.42
    assert s.median().item() == pytest.approx(sid.sigma_from_t(torch.tensor(0.4)).item(), rel=0.02)
    s = sid.draw_sigma_fake(x).log()
    assert s.mean().item() == pytest.approx(-1.2, abs=0.01) and s.std().item() == pytest.approx(1.2, abs=0.01)
    assert sid.edm_weight(torch.tensor(2.0)).item() == pytest.approx((4 + 0.25) / (2 * 0.5) ** 2)

@pytest.mark.parametrize('alpha', [0.5, 1.0, 1.2])
def test_sid_loss_equals_both_paper_forms(alpha):
    x_g, sigma, noise, _ = draws()
    got = sid.sid_generator_loss(affine(0.8, c=0.1), affine(0.6, c=-0.2), x_g, sigma, noise, None, alpha)
    x_t = x_g + sigma * noise
    y_phi, y_psi = 0.8 * x_t + 0.1 * sigma, 0.6 * x_t - 0.2 * sigma
    w = (x_g - y_phi).abs().flatten(1).mean(1)  # the TEACHER's error normalises
    code = ((y_phi - y_psi) * ((y_phi - x_g) - alpha * (y_phi - y_psi))).flatten(1).sum(1) / w
    paper = ((y_phi - y_psi) * (y_psi - x_g) + (1 - alpha) * (y_phi - y_psi) ** 2).flatten(1).sum(1) / w
    assert got.shape == (6,) and torch.allclose(got, code, rtol=1e-6) and torch.allclose(got, paper, rtol=1e-6)

def test_sid_loss_gradient_flows_through_both_networks():
    """Only w is detached: d loss / d x_g equals the hand-derived gradient, and differs if f_phi or f_psi is detached."""
    x_g, sigma, noise, _ = draws(seed=1)
    a, c, alpha = 0.8, 0.6, 1.2
    f_phi, f_psi = affine(a, c=0.1).requires_grad_(False), affine(c, c=-0.2).requires_grad_(False)

    def grad_of(phi, psi):
        x = x_g.clone().requires_grad_(True)
        sid.sid_generator_loss(phi, psi, x, sigma, noise, None, alpha).sum().backward()
        return x.grad
    g = grad_of(f_phi, f_psi)
    x_t = x_g + sigma * noise
    u, v = (a - c) * x_t + 0.3 * sigma, (a * x_t + 0.1 * sigma - x_g) - alpha * ((a - c) * x_t + 0.3 * sigma)
    w = (x_g - a * x_t - 0.1 * sigma).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(g, ((a - c) * v + u * (a - 1 - alpha * (a - c))) / w, rtol=1e-6)
    detached = lambda net: (lambda x, s, l=None: net(x, s).detach())
    assert not torch.allclose(grad_of(detached(f_phi), f_psi), g, rtol=1e-3)
    assert not torch.allclose(grad_of(f_phi, detached(f_psi)), g, rtol=1e-3)
    assert not torch.allclose(grad_of(f_phi, f_psi), grad_of(lambda x, s, l=None: f_phi(x.detach(), s), f_psi), rtol=1e-3)

def test_sid_1d_gaussian_closed_form():
    """SiD §3: p_data = N(0,1), x_g = theta + eps0, exact f_phi and f_psi. Without w the per-sample gradient w.r.t. theta
    is (sigma^2/(1+sigma^2))^2 theta for every alpha; with w it still points to theta = 0 and vanishes there."""
    B, g = 4000, torch.Generator().manual_seed(0)
    eps0, noise = torch.randn(B, 1, generator=g, dtype=torch.float64), torch.randn(B, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    sigma = sid.draw_sigma_generator(eps0, 800).double()
    k = sigma ** 2 / (1 + sigma ** 2)
    for theta0 in (1.5, -0.7, 0.0):
        f_phi, f_psi = gaussian(0.0, 1.0), gaussian(theta0, 1.0)
        for alpha in (0.5, 1.0, 1.2):
            theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
            x_g = theta + eps0
            per = sid.sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, None, alpha)
            w = (x_g - f_phi(x_g + sigma * noise, sigma)).abs().detach().squeeze(1).clamp_min(1e-5)
            grads = torch.stack([torch.autograd.grad(p, theta, retain_graph=True)[0] for p in (per * w)[:50]])
            assert torch.allclose(grads, (k[:50, 0] ** 2) * theta0, rtol=1e-6, atol=1e-12)  # w is float32: ~1e-7
            gw, = torch.autograd.grad(per.mean(), theta)
            assert gw.item() * theta0 > 0 if theta0 else abs(gw.item()) < 1e-12
    s2 = sid.sigma_from_t(torch.linspace(0, 0.8, 200001, dtype=torch.float64)) ** 2  # E[k^2] over the t-schedule
    assert (k ** 2).mean().item() == pytest.approx((s2 / (1 + s2)).pow(2).mean().item(), abs=0.02)

def test_fake_score_loss_minimised_by_true_denoiser():
    """x_g ~ N(theta, 1): at the true denoiser the loss is lambda * D * posterior variance, any other is worse."""
    theta, D, B, g = 0.7, 4, 100000, torch.Generator().manual_seed(0)
    x_g = theta + torch.randn(B, D, generator=g, dtype=torch.float64)
    noise, sigma = torch.randn(B, D, generator=g, dtype=torch.float64), torch.full((B, 1), 0.8, dtype=torch.float64)
    L = sid.fake_score_loss(gaussian(theta, 1.0), x_g, sigma, noise, None)
    assert L.shape == (B,) and L.mean().item() == pytest.approx(sid.edm_weight(0.8) * D * 0.64 / 1.64, rel=0.01)
    for da, db in ((0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)):
        worse = Stub(lambda m, x, s: (1 / (1 + s ** 2) + da) * x + (theta * s ** 2 / (1 + s ** 2) + db))
        assert sid.fake_score_loss(worse, x_g, sigma, noise, None).mean() > L.mean()
    assert not sid.fake_score_loss(gaussian(theta, 1.0), x_g.requires_grad_(True), sigma, noise, None).requires_grad

@pytest.mark.parametrize('name', ['sid', 'fake', 'dsm', 'sida_fake', 'sida_G'])
def test_nan_samples_get_zero_loss(name):
    """A NaN sample gets a ZERO loss (shape [B] kept); the others' losses are those computed without it."""
    phi, psi = affine(0.8), (lambda o: affine(0.6, 0.05, off=o, off_enc=-o))
    fn = {'sid': lambda x, s, n, o: [sid.sid_generator_loss(phi, psi(o), x, s, n, None, 1.2)],
          'fake': lambda x, s, n, o: [sid.fake_score_loss(psi(o), x, s, n, None)],
          'dsm': lambda x, s, n, o: [sid.dsm_loss(psi(o)(x + s * n, s), x, s)],
          'sida_fake': lambda x, s, n, o: [sid.sida_fake_score_loss(psi(o), x, x, s, n, None)[0]],
          'sida_G': lambda x, s, n, o: list(sid.sida_generator_loss(phi, psi(o), x, s, n, None, 1.0))}[name]
    (x_g, sigma, noise, off), keep = draws(B=4, shape=(3, 8, 8)), [0, 1, 3]
    ref = fn(x_g[keep], sigma[keep], noise[keep], off[keep])
    x_g[2, 1, 3, 3] = float('nan')
    for got, r in zip(fn(x_g, sigma, noise, off), ref):
        assert got.shape == (4,) and got[2] == 0 and torch.isfinite(got).all()
        assert torch.allclose(got[keep], r, rtol=1e-6)  # SiDA's GAN term: the BCE mean over kept samples only

#----------------------------------------------------------------------------
# SiDA (ICLR 2025 §3): the fake-score/discriminator loss, the generator loss, the micro-batch coupling, the phases.

def test_sida_fake_score_loss_values_and_coupling():
    x_g, sigma, noise, off = draws(B=4, shape=(3, 8, 8))
    x_r = torch.randn_like(x_g) + 0.3
    off_f, off_r = off.clone().requires_grad_(), (-off).clone().requires_grad_()
    net, x_g_leaf = affine(0.7, 0.1, off=off_f, off_enc=off_r), x_g.clone().requires_grad_()
    labels, aug_g, aug_r = torch.eye(4), torch.zeros(4, 9), torch.ones(4, 9)
    dsm, d_loss = sid.sida_fake_score_loss(net, x_g_leaf, x_r, sigma, noise, labels, aug_g, aug_r)
    fake, real = net.calls  # one full forward with logits on x_g, one encoder-only on x_r; SHARED sigma and noise
    assert fake['return_logits'] and not fake['encoder_only'] and fake['aug'] is aug_g and fake['labels'] is labels
    assert real['encoder_only'] and real['aug'] is aug_r and fake['sigma'] is sigma and real['sigma'] is sigma
    assert torch.allclose(fake['x'], x_g + sigma * noise) and torch.allclose(real['x'], x_r + sigma * noise)
    lam = [(s * s + 0.25) / (s * 0.5) ** 2 for s in sigma.flatten().tolist()]
    x_t = x_g + sigma * noise
    lf, lr, D = x_t[:, :1] + off, (x_r + sigma * noise)[:, :1] - off, 0.7 * x_t + 0.1 * x_t ** 2
    bce_f, bce_r = (sum(softplus(sign * v) for v in l.flatten().tolist()) / l.numel() for sign, l in ((1, lf), (-1, lr)))
    for b in range(4):
        assert math.isclose(dsm[b].item(), lam[b] * ((D[b] - x_g[b]) ** 2).sum().item(), rel_tol=1e-12)
        assert math.isclose(d_loss[b].item(), lam[b] * (bce_r + bce_f) / 2, rel_tol=1e-12)
    (dsm.sum() + d_loss.sum()).backward()  # each logit's gradient carries the micro-batch SUM of lambda; x_g detached
    assert x_g_leaf.grad is None
    for i in [(0, 0, 0, 0), (3, 0, 7, 2)]:
        assert math.isclose(off_f.grad[i].item(), sum(lam) / 2 * sigmoid(lf[i].item()) / 256, rel_tol=1e-10)
        assert math.isclose(off_r.grad[i].item(), -sum(lam) / 2 * (1 - sigmoid(lr[i].item())) / 256, rel_tol=1e-10)

def test_sida_generator_loss_values_clamp_and_coupling():
    x_g, sigma, noise, off = draws(B=4, shape=(3, 8, 8))
    off[0, 0, 1, 1], off[2, 0, 3, 4] = 40.0, -40.0  # beyond the +-10 clamp whatever x_t adds
    off.requires_grad_()
    f_phi, f_psi = affine(0.8), affine(0.6, 0.05, off=off)
    x_t = x_g + sigma * noise
    y_phi, y_psi, logits = 0.8 * x_t, 0.6 * x_t + 0.05 * x_t ** 2, (x_t[:, :1] + off).detach()
    w = [max((x_g[b] - y_phi[b]).abs().float().mean().item(), 1e-5) for b in range(4)]
    bce = sum(softplus(-min(max(v, -10), 10)) for v in logits.flatten().tolist()) / logits.numel()
    for alpha in (1.0, 1.2):
        f_psi.calls.clear()
        loss, gan = sid.sida_generator_loss(f_phi, f_psi, x_g, sigma, noise, None, alpha)
        assert len(f_psi.calls) == 1 and f_psi.calls[0]['return_logits'] and f_psi.calls[0]['aug'] is None
        for b in range(4):
            ref = ((y_phi[b] - y_psi[b]) * (y_psi[b] - x_g[b]) + (1 - alpha) * (y_phi[b] - y_psi[b]) ** 2).sum().item() / w[b]
            assert math.isclose(loss[b].item(), ref, rel_tol=1e-10)
            assert math.isclose(gan[b].item(), 192 * bce / w[b], rel_tol=1e-6)
    gan.sum().backward()  # d gan.sum() / d logit = 192 * sum_b(1/w_b) * (sigmoid(l) - 1) / (B*64), zero where clamped
    for i in [(0, 0, 0, 0), (1, 0, 5, 6), (3, 0, 7, 7)]:
        expect = 192 * sum(1 / v for v in w) * (sigmoid(logits[i].item()) - 1) / 256
        assert math.isclose(off.grad[i].item(), expect, rel_tol=1e-6)
    assert off.grad[0, 0, 1, 1] == 0 and off.grad[2, 0, 3, 4] == 0
    x = x_g.clone().requires_grad_()  # and SiD's part reaches x_g through both networks (linear closed form)
    sid.sida_generator_loss(affine(0.8), affine(0.5, off=off.detach()), x, sigma, noise, None, 1.2)[0].sum().backward()
    wv = (x_g - 0.8 * x_t).abs().float().mean((1, 2, 3), keepdim=True).double()
    u, v = 0.3 * x_t, (0.8 * x_t - x_g) - 1.2 * 0.3 * x_t
    assert torch.allclose(x.grad, (0.3 * v + u * (-0.2 - 1.2 * 0.3)) / wv, rtol=1e-10, atol=1e-12)

@pytest.mark.parametrize('cur_nimg,mix', [(199_999, False), (200_000, False), (200_001, True), (10 ** 6, True)])
def test_G_sida_mixes_half_and_half_after_sida_mix_kimg(cur_nimg, mix):
    """Pure SiD up to 200 kimg (the default), then 0.5 grad(lsg * sum(sid)/n) + 0.5 grad(lsg_gan * sum(gan)/n)."""
    x_g, _, _, off = draws(B=4, shape=(3, 8, 8))
    run = types.SimpleNamespace(cfg=sid.Config(method='sida', lsg=100.0, lsg_gan=0.01), autocast=contextlib.nullcontext,
                                n=4, cur_nimg=cur_nimg, f_phi=affine(0.8), f_psi=affine(0.6, 0.05, off=off))
    x_g.requires_grad_()
    torch.manual_seed(5)
    loss, logs = sid.G_sida(run, x_g, None, None)
    g, = torch.autograd.grad(loss, x_g)
    torch.manual_seed(5)  # the same draws, in the objective's order
    sigma, noise = sid.draw_sigma_generator(x_g, 800), torch.randn_like(x_g)
    s, gan = sid.sida_generator_loss(run.f_phi, run.f_psi, x_g, sigma, noise, None, run.cfg.alpha)
    L, L_gan = s.sum() * 100 / 4, gan.sum() * 0.01 / 4
    gL, gG = (torch.autograd.grad(v, x_g, retain_graph=True)[0] for v in (L, L_gan))
    assert torch.allclose(logs, torch.stack([L, L_gan]).detach())
    assert torch.allclose(g, 0.5 * gL + 0.5 * gG if mix else gL, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(gL, gG, rtol=0.1)  # the two gradients differ: the weights are visible

def test_sida_phases_and_method_table():
    assert [sid.sida_phase(n) for n in (0, 100_000, 100_001, 200_000, 200_001)] == ['frozen', 'frozen', 'sid', 'sid', 'mix']
    for ds in ('cifar10', 'imagenet64', 'ffhq64'):  # the schedule of every image preset: 100 / 200 kimg
        c = sid.make_config(dict(dataset=ds, method='sida', outdir='x'))
        assert (c.sida_warmup_kimg, c.sida_mix_kimg, c.alpha) == (100, 200, 1.0)
    m = sid.METHODS['sida']
    assert m.psi_clip == 1 and sid.METHODS['sid'].psi_clip is None and sid.METHODS['sign'].psi_clip is None
    assert [m.G_trains(sid.Config(method='sida'), n) for n in (100_000, 100_001)] == [False, True]
    p, q = torch.zeros(4, requires_grad=True), torch.zeros(1, requires_grad=True)
    p.grad = torch.tensor([3.0, -0.5, float('nan'), -float('inf')])
    sid.sanitize_grads_([p, q], 1.0)
    assert p.grad.tolist() == [1.0, -0.5, 0.0, -1.0] and q.grad is None  # element-wise: a norm clip would rescale -0.5
    p.grad = torch.tensor([float('inf'), 2.0, float('nan'), 0.25])
    sid.sanitize_grads_([p])
    assert p.grad.tolist() == [1e5, 2.0, 0.0, 0.25]

#----------------------------------------------------------------------------
# SIGN (our reconstruction on IGN's frame): gradient paths, the frozen copy, closed forms of the terms.

def test_idem_and_rec_gradient_paths_and_frozen_copy_gets_none():
    """f(x) = A x: L_idem's gradient takes the inner path alone (both paths teach f the identity); f_theta' gets none."""
    torch.manual_seed(0)
    B, n = 5, 4
    A0 = (torch.eye(n) + 0.3 * torch.randn(n, n)).double()
    G = linear(A0)
    G.A.grad = torch.ones_like(G.A)  # a stale gradient must not be copied into f_theta'
    G_bar = sid.frozen_copy(G)
    G.A.grad = None
    assert G_bar.A.grad is None and not G_bar.A.requires_grad and G_bar.training == G.training  # the same function
    Z, I = torch.randn(B, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    f = lambda v: runs.generate(G, v, None, 2.5)
    sid.idem_loss(lambda v: runs.generate(G_bar, v, None, 2.5), f(Z)).mean().backward()
    assert G_bar.A.grad is None
    X = Z @ A0.T
    R = X @ (A0 - I).T                                  # f(f(z)) - f(z)
    inner, outer = 2 / (B * n) * (A0 - I).T @ R.T @ Z, 2 / (B * n) * R.T @ X
    assert torch.allclose(G.A.grad, inner, atol=1e-12) and not torch.allclose(G.A.grad, inner + outer, atol=1e-3)
    G.A.grad = None
    sid.rec_loss(f, Z).mean().backward()
    assert torch.allclose(G.A.grad, 2 / (B * n) * (X - Z).T @ Z, atol=1e-12)

def test_euler_step_and_flow_loss_closed_forms():
    mu, s = 0.3, 0.5
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    sigma = torch.tensor(1.5, dtype=torch.float64)
    exact = lambda sn: mu + (x - mu) * ((s ** 2 + sn ** 2) / (s ** 2 + sigma ** 2)).sqrt()  # the PF-ODE of N(mu, s^2)
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
    sg, sn = torch.full((B, 1), 2.0, dtype=torch.float64), torch.full((B, 1), 1.6, dtype=torch.float64)
    L = sid.flow_loss(lambda v: runs.generate(G, v, None, 2.5), lambda v: runs.generate(G_bar, v, None, 2.5),
                      gaussian(0.1, 0.5), x, sg, sn, noise)
    L.mean().backward()
    xs = x + sg * noise
    R = xs @ A0.T - (xs + (sn - sg) * sg * (xs - 0.1) / (0.25 + sg ** 2)) @ A0.T
    assert torch.allclose(L, R.square().mean(1), atol=1e-12)
    assert torch.allclose(G.A.grad, 2 / (B * n) * R.T @ xs, atol=1e-12) and G_bar.A.grad is None  # target: stop-grad
    t = torch.tensor([0.02, 0.3, 0.8])
    s1, s2 = sid.flow_sigmas(t)
    assert torch.allclose(s1, sid.sigma_from_t(t)) and s2[0].item() == pytest.approx(0.002)
    assert torch.allclose(s2[1:], sid.sigma_from_t(t[1:] - sid.SIGN_DT))

def test_sign_student_loss_routing_and_refresh():
    torch.manual_seed(0)
    mk = lambda: edm_nets.EDMPrecond(img_resolution=0, img_channels=2, model_type='ToyMLP', dropout=0.5)
    G, f_phi, f_psi = mk(), mk().eval().requires_grad_(False), mk().eval().requires_grad_(False)
    G_bar, B = sid.frozen_copy(G).eval(), 8  # without dropout here, so that the idem value can be recomputed below
    x_g = runs.generate(G, 2.5 * torch.randn(B, 2), None, 2.5)
    x, noise, noise_f, sigma = torch.randn(B, 2), torch.randn(B, 2), torch.randn(B, 2), torch.rand(B, 1) + 0.1
    sf, sfn = sid.flow_sigmas(torch.rand(B, 1) * 0.7 + 0.02)
    out = sid.sign_student_loss(G, G_bar, f_phi, f_psi, x_g, None, sigma, noise, 1.0, x, sf, sfn, noise_f, 3.0, 5.0, 7.0)
    (100 * out['dm'].sum() + 3 * out['idem'].sum() + 5 * out['rec'].sum() + 7 * out['flow'].sum()).backward()
    assert all(p.grad is None for net in (G_bar, f_phi, f_psi) for p in net.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    with torch.no_grad():  # D * per-pixel mean = pixel sum
        assert torch.allclose(out['idem'], (runs.generate(G_bar, x_g, None, 2.5) - x_g).square().sum(1))
    xd = x_g.detach()  # data-free (x None): no L_rec, it would train f's outer call; a zero lambda skips a term
    out2 = sid.sign_student_loss(G.eval(), G_bar, f_phi, f_psi, xd, None, sigma, noise, lam_idem=0, lam_flow=0)
    assert (out2['rec'] == 0).all() and (out2['idem'] == 0).all() and (out2['flow'] == 0).all()
    out3 = sid.sign_student_loss(G, G_bar, f_phi, f_psi, xd, None, sigma, noise, x=xd + 0.1, lam_idem=0, lam_flow=0)
    assert torch.allclose(out3['rec'], (runs.generate(G, xd + 0.1, None, 2.5) - xd - 0.1).square().sum(1))
    G.train()
    sid.refresh_frozen_(G_bar, G)
    assert G_bar.training  # refresh copies G's mode: f_theta' applies dropout when f_theta does
    with torch.no_grad():
        for p in G.parameters(): p.add_(1.0)
        G.model.freqs += 1  # a buffer
    assert not states_equal(G, G_bar)
    sid.refresh_frozen_(G_bar, G)
    assert states_equal(G, G_bar) and not any(p.requires_grad for p in G_bar.parameters())

def test_multistep_project_and_sign_evaluation():
    A = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    f = lambda v: v @ A.T
    z, e1, e2 = torch.randn(3, 4, 3).unbind(0)
    assert [x.tolist() for x in runs.multistep_sample(f, z)] == [f(z).tolist()]
    xs = runs.multistep_sample(f, z, [0.8, 0.2], [e1, e2])
    assert len(xs) == 3 and torch.allclose(xs[1], f(f(z) + 0.8 * e1)) and torch.allclose(xs[2], f(xs[1] + 0.2 * e2))
    U = torch.linalg.qr(torch.randn(4, 2))[0]
    P = lambda v: v @ (U @ U.T).T
    y, n1, n2 = torch.randn(3, 5, 4).unbind(0)
    assert torch.allclose(runs.project(P, y), P(y), atol=1e-6)
    assert torch.allclose(runs.project(P, y, 0.5, [n1, n2], repeat=2), P(P(y + 0.5 * n1) + 0.5 * n2), atol=1e-6)
    a, b = (runs.project(P, y, 0.5, torch.Generator().manual_seed(3), repeat=3) for _ in range(2))
    assert torch.equal(a, b) and not torch.allclose(a, P(y))
    double = lambda v: 2 * v  # |f(f(z)) - f(z)| = 2|z|, |f(x) - x| = |x|
    ev = runs.sign_evaluation(double, z, y, [0.5], [torch.zeros_like(z)], torch.ones_like(y), sigma_proj=0.1)
    assert ev['idem'] == pytest.approx(2 * z.norm(dim=1).mean().item(), rel=1e-5)
    assert ev['fix'] == pytest.approx(y.norm(dim=1).mean().item(), rel=1e-5)
    assert torch.allclose(ev['noisy'], y + 0.1) and torch.allclose(ev['projected'], 2 * (y + 0.1)) and len(ev['steps']) == 2

#----------------------------------------------------------------------------
# Toy (toy.py): the quality figures, and a demo run that must get much better than its start.

_PRETRAINED = []
def toy_nets_pretrained():
    """The toy's real starting point (teacher, pretrained G, f_psi copy); pretrained once per session (~5 s)."""
    if not _PRETRAINED:
        w = toy.Toy2D()
        _PRETRAINED.append((w.teacher, w.student(0.0)))
    return _PRETRAINED[0][0], copy.deepcopy(_PRETRAINED[0][1]), copy.deepcopy(_PRETRAINED[0][1])

def test_toy_run_improves_quality_and_reports(tmp_path):
    (G, G_ema, _), out = run_quiet(sid.make_config({'duration_mimg': 0.05, 'tick_kimg': 10, 'snap_kimg': 50,
                                                    'outdir': str(tmp_path)}), toy_nets_pretrained())
    T, z = toy.ToyMixture(), 2.5 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    G0 = toy_nets_pretrained()[1]  # the common starting point of G and f_psi
    with torch.no_grad(): q_end, q_start = (toy.toy_quality(runs.generate(n, z, None, 2.5), T) for n in (G_ema, G0))
    assert q_start[1] <= 2 and q_end[1] >= 7 and q_end[0] < 0.1 * q_start[0] and q_end[2] > q_start[2] + 0.3
    assert toy.toy_quality(T.sample(20000, torch.Generator().manual_seed(0)), T)[1:] == (8, pytest.approx(1 - math.exp(-2), abs=0.01))  # exact: 0.865
    b1, b2 = toy.Toy2D().batches(16, 3), toy.Toy2D().batches(16, 3, start=2)  # the real-data stream resumes at its position
    assert torch.equal([next(b1) for _ in range(3)][-1][0], next(b2)[0]) and G0.img_shape == [2] and G0.init_kwargs['model_type'] == 'ToyMLP'
    assert [round(e["kimg"] * 1e3) for e in read_stats(tmp_path)] == [10240, 20480, 30208, 40448, 50176]  # batch 512
    assert 'toy start:' in out and 'toy end:' in out and 'toy.png, toy.gif, toy_quality.png' in out
    with PIL.Image.open(tmp_path / 'toy.png') as png, PIL.Image.open(tmp_path / 'toy.gif') as gif:
        assert png.size[0] == 3 * gif.size[0] and gif.n_frames == 41  # start, end, exact; the start and 40 frames
    assert os.path.getsize(tmp_path / 'toy_quality.png') > 1000 and not [p for p in os.listdir(tmp_path) if 'tmp' in p]

def test_toy_figures_tell_clusters_from_rings_and_single_modes():
    T, gen = toy.ToyMixture(), torch.Generator().manual_seed(1)
    on_ring = lambda r: (lambda a: torch.stack([r * a.cos(), r * a.sin()], 1).float())(  # radii r, random angles
        torch.rand(len(r), generator=gen, dtype=torch.float64) * 2 * math.pi)
    x = T.sample(20000, gen)
    shuffled = on_ring(x.double().norm(dim=1)[:4000])
    mc = float((torch.cdist(shuffled.double(), T.mu).min(1).values < 2 * T.s).double().mean())
    assert abs(toy.ring_chance(x[:4000], T) - mc) < 0.02 and abs(toy.ring_chance(x, T) - 0.624) < 0.01  # MC std ~0.008
    exact = toy.toy_figures(T.sample(4000, gen), T)
    assert abs(exact['within'] - toy.EXACT['within']) < 0.02 and abs(exact['clustering'] - toy.EXACT['clustering']) < 0.02
    assert exact['balance'] > 0.9 and exact['covered'] == 8
    for r in (torch.full((4000,), float(T.mu[0].norm()), dtype=torch.float64), T.sample(4000, gen).double().norm(dim=1)):
        q = toy.toy_figures(on_ring(r), T)  # thin and thick rings: the old figures pass, clustering does not
        assert q['within'] > 0.6 and q['covered'] == 8 and abs(q['clustering']) < 0.03
    one = toy.toy_figures(T.mu[2].float() + T.s * torch.randn(4000, 2, generator=gen), T)
    assert one['within'] > 0.8 and one['balance'] < 0.01 and one['covered'] == 1
    x = T.sample(8000, gen)
    half = toy.toy_figures(x[torch.cdist(x.double(), T.mu).argmin(1) < 4], T)
    assert abs(half['balance'] - (1 - 0.5 / (1 - 1 / 8))) < 0.03  # 4 of 8 modes: TV 0.5
    assert toy.toy_figures(torch.zeros(10, 2), T)['balance'] == 0 == toy.toy_figures(torch.zeros(10, 2), T)['clustering']

#----------------------------------------------------------------------------
# Config & CLI: presets vs the official scripts, every field an option, --help, --dry-run, switches, run folders,
# and one table of bad inputs (one line `error: ...`, exit code 2, for training, generate and project).

OFFICIAL = {  # official run_sid.sh: alpha, batch, batch_gpu, lr, glr, g_beta1, precision, dropout, augment, EMA Mimg, Mimg, teacher
    'cifar10':      (1.2, 256, 16, 1e-5, 1e-5, 0.0, 'fp32', 0.13, 0.12, 0.5, 500, 'cifar10-32x32-uncond-vp'),
    'cifar10-cond': (1.2, 256, 16, 1e-5, 1e-5, 0.0, 'fp32', 0.13, 0.12, 0.5, 800, 'cifar10-32x32-cond-vp'),
    'imagenet64':   (1.2, 8192, 16, 4e-6, 4e-6, 0.0, 'fp16', 0.10, 0.0, 2.0, 1000, 'imagenet-64x64-cond-adm'),
    'ffhq64':       (1.2, 512, 32, 1e-5, 1e-5, 0.9, 'fp16', 0.05, 0.15, 0.5, 500, 'ffhq-64x64-uncond-vp'),
    'afhqv2-64':    (1.0, 512, 32, 5e-6, 5e-6, 0.0, 'fp16', 0.05, 0.15, 0.5, 500, 'afhqv2-64x64-uncond-vp')}

@pytest.mark.parametrize('dataset', list(OFFICIAL))
def test_presets_match_official_sid(dataset):
    c = sid.make_config({'dataset': dataset, 'outdir': 'x'})
    assert (c.alpha, c.batch, c.batch_gpu, c.lr, c.glr, c.g_beta1, c.precision, c.dropout, c.augment, c.ema_mimg,
            c.duration_mimg, c.teacher) == OFFICIAL[dataset]
    tick = 20 if dataset == 'imagenet64' else 10  # official: tick 10 kimg (ImageNet 20), a snapshot every 50 ticks
    assert (c.sigma_init, c.tmax, c.ls, c.lsg, c.method, c.tick_kimg, c.snap_kimg) == (2.5, 800, 1.0, 100.0, 'sid', tick, 50 * tick)
    assert sid.make_config({'dataset': dataset, 'method': 'sida', 'init_generator': 'g', 'outdir': 'x'}).duration_mimg == 100  # SiD²A

def test_cli_options_help_dry_run_and_run_folders(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(sid, 'train', lambda cfg: seen.setdefault('cfg', cfg))
    cli('--dataset', 'cifar10-cond', '--alpha', '1.0', '--g-beta1', '0.5', '--lsg', '10', '--teacher', 'my.pkl',
        '--batch-gpu', '8', '--net-overrides', '{}', '--outdir', tmp_path / 'o')
    c = seen['cfg']
    assert (c.alpha, c.g_beta1, c.lsg, c.teacher, c.batch_gpu, c.duration_mimg) == (1.0, 0.5, 10.0, 'my.pkl', 8, 800)
    r = cli('--dataset', 'cifar10', '--help')
    assert r.returncode == 0 and all(f'\n{g}:' in r.stdout for g in ('method', 'data', 'training', 'speed', 'output'))
    assert all('--' + f.name.replace('_', '-') in r.stdout for f in dataclasses.fields(sid.Config))
    lr_help = lambda out: out.split('\n  --lr FLOAT')[1].split('--glr')[0]
    assert '(default: 1e-05)' in lr_help(r.stdout) and '(default: 0.001)' in lr_help(cli('--dataset', 'toy', '--help').stdout)
    r = cli('--dataset', 'toy', '--method', 'sign', '--lsg', '5', '--dry-run', '--outdir', tmp_path / 'd')
    assert r.returncode == 0 and json.loads(r.stdout) == dataclasses.asdict(sid.make_config(
        dict(dataset='toy', method='sign', lsg=5.0, outdir=str(tmp_path / 'd')))) and not os.path.exists(tmp_path / 'd')
    dry = lambda *a: json.loads(cli('--dataset', 'cifar10', '--dry-run', '--outdir', 'x', *a).stdout)
    assert (dry()['fast'], dry()['channels_last']) == (False, False)  # bool switches: --flag / --no-flag
    assert [dry('--fast')[k] for k in ('fast', 'precision', 'channels_last', 'fused_adam', 'compile', 'batch_gpu')] == [True, 'bf16', True, True, False, 64]
    assert dry('--method', 'sida', '--fast')['batch_gpu'] == 32  # SiDA keeps its micro-batch
    assert (dry('--fast', '--no-channels-last')['channels_last'], dry('--checkpointing')['checkpointing']) == (False, True)
    for k in ('channels_last', 'fused_adam', 'compile', 'checkpointing', 'fast'):
        with pytest.raises(ValueError, match='is a switch'): sid.make_config({'dataset': 'cifar10', k: 2, 'outdir': 'x'})
    monkeypatch.chdir(tmp_path)  # run folders: EDM's numbering, never into another run's folder
    assert sid.make_config({}).outdir == os.path.join('runs', '00000-toy-sid')
    os.makedirs('runs/00007-cifar10-sid'), os.makedirs('runs/notes')
    assert sid.make_config({'dataset': 'cifar10', 'method': 'sida'}).outdir == os.path.join('runs', '00008-cifar10-sida')

def test_batch_gpu_clamped_to_batch_per_rank(monkeypatch, capsys):
    """torchrun: WORLD_SIZE ranks share `batch`; a larger --batch-gpu shrinks to batch / world_size, with a message."""
    monkeypatch.setenv('WORLD_SIZE', '2'), monkeypatch.setenv('RANK', '0')
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)  # a caller's group: none is created
    run = sid.init_processes(sid.make_config(dict(batch=64, batch_gpu=64, outdir='x')))
    assert (run.batch_gpu, run.n, run.rounds, run.world_size, run.own_group) == (32, 32, 1, 2, False)
    assert '--batch-gpu 64 > --batch 64 / 2 GPUs: using micro-batches of 32' in capsys.readouterr().out
    run = sid.init_processes(sid.make_config(dict(batch=64, batch_gpu=16, outdir='x')))
    assert (run.batch_gpu, run.n, run.rounds) == (16, 32, 2)
    with pytest.raises(ValueError, match='must be a multiple of --batch-gpu 24 x 2'):
        sid.init_processes(sid.make_config(dict(batch=64, batch_gpu=24, outdir='x')))

@pytest.fixture
def bad_env(tmp_path):
    """Files the bad-input table refers to: an unconditional snapshot, a toy run folder, small PNG datasets."""
    G = perturb_copy(nets_for(cfg_for(tmp_path / 'unused'), perturb=False)[1])
    runs.save_snapshot(str(tmp_path / 'g.pt'), G.eval(), 0, sid.Config())
    for name, cfg in (('run', sid.make_config({'outdir': str(tmp_path / 'run')})), ('nostate', cfg_for(tmp_path / 'nostate'))):
        os.makedirs(tmp_path / name), runs.write_json(str(tmp_path / name / 'config.json'), dataclasses.asdict(cfg))
    os.makedirs(tmp_path / 'full'), (tmp_path / 'full' / 'x').write_text('x')
    write_pngs(tmp_path / 'png16', 3, size=16), write_pngs(tmp_path / 'png32', 3, size=32)
    return tmp_path

TINY_ARGS = ['--teacher', 'random', '--net-overrides', NET, '--batch', 4, '--batch-gpu', 2, '--duration-mimg', 4e-6, '--device', 'cpu']
GEN = lambda t, *a: ['generate', '--ckpt', t / 'g.pt', '--outdir', t / 'o', *a]
BAD = [  # (name, args(t), message)
    ('seeds-order', lambda t: GEN(t, '--seeds', '5-3'), "bad --seeds '5-3'"),
    ('sigmas-count', lambda t: GEN(t, '--steps', 3, '--sigmas', '0.1'), '--steps 3 needs 2 noise levels'),
    ('class-idx-uncond', lambda t: GEN(t, '--class-idx', 3), 'this generator is unconditional'),
    ('gen-cuda', lambda t: GEN(t, '--device', 'cuda'), 'CUDA is not available'),
    ('gen-outdir-full', lambda t: ['generate', '--ckpt', t / 'g.pt', '--outdir', t / 'full'], 'is not empty'),
    ('ckpt-missing', lambda t: ['generate', '--ckpt', t / 'nope.pt', '--outdir', t / 'o'], 'nope.pt'),
    ('ckpt-no-snapshots', lambda t: ['generate', '--ckpt', t / 'nostate', '--outdir', t / 'o'], 'no network-snapshot-*.pt'),
    ('project-sigma', lambda t: ['project', '--ckpt', t / 'g.pt', '--input', t / 'png32', '--sigma', 'nan', '--outdir', t / 'o'], 'need a finite --sigma'),
    ('project-input', lambda t: ['project', '--ckpt', t / 'g.pt', '--input', t / 'none', '--outdir', t / 'o'], '--input not found'),
    ('project-shape', lambda t: ['project', '--ckpt', t / 'g.pt', '--input', t / 'png16', '--outdir', t / 'o'], 'the generator makes [3, 32, 32]'),
    ('dataset', lambda t: ['--dataset', 'mnist'], "unknown --dataset 'mnist'"),
    ('method', lambda t: ['--method', 'dmd'], "--method 'dmd'"),
    ('lsg-nan', lambda t: ['--lsg', 'nan'], '--lsg must be a finite float >= 0'),
    ('alpha-range', lambda t: ['--alpha', '3'], '--alpha must be a finite float in [0, 2]'),
    ('batch-zero', lambda t: ['--batch', '0'], '--batch must be a finite int >= 1'),
    ('precision', lambda t: ['--precision', 'fp8'], "unknown --precision 'fp8'"),
    ('device', lambda t: ['--device', 'tpu'], '--device must be cpu or cuda'),
    ('device-cuda', lambda t: ['--dataset', 'cifar10', '--device', 'cuda'], 'no CUDA here'),
    ('net-overrides', lambda t: ['--dataset', 'cifar10', '--net-overrides', '[1, 2]'], '--net-overrides must be a JSON object'),
    ('toy-fid', lambda t: ['--fid-every-kimg', 10], 'do not apply to the toy'),
    ('batch-multiple', lambda t: ['--batch', 100, '--batch-gpu', 64, '--outdir', t / 'new'], 'must be a multiple of --batch-gpu'),
    ('outdir-holds-run', lambda t: ['--outdir', t / 'run'], 'holds a run: continue it with --resume'),
    ('resume-alpha', lambda t: ['--resume', t / 'run', '--alpha', '1.0'], '--resume: the run used other values of --alpha'),
    ('resume-no-config', lambda t: ['--resume', t / 'png16'], '--resume: no readable config.json'),
    ('resume-no-state', lambda t: ['--resume', t / 'nostate'], '--resume: no training state'),
    ('data-resolution', lambda t: ['--dataset', 'cifar10', *TINY_ARGS, '--data', t / 'png16', '--outdir', t / 'n1'],
     'dataset resolution 16x16 does not match the teacher resolution 32'),
    ('data-labels', lambda t: ['--dataset', 'cifar10-cond', *TINY_ARGS, '--data', t / 'png32', '--outdir', t / 'n2'],
     'dataset label_dim 0 does not match the teacher label_dim 10'),
    ('sida-no-data', lambda t: ['--dataset', 'cifar10', '--method', 'sida', *TINY_ARGS, '--data', '', '--outdir', t / 'n3'], 'needs real images'),
    ('teacher-missing', lambda t: ['--dataset', 'cifar10', *TINY_ARGS[2:], '--teacher', t / 'missing.pkl', '--outdir', t / 'n4'], 'missing.pkl'),
    ('fid-ref-missing', lambda t: ['--dataset', 'cifar10', *TINY_ARGS, '--fid-every-kimg', 1, '--fid-ref', t / 'ref.npz', '--outdir', t / 'n5'], 'ref.npz'),
]

@pytest.mark.parametrize('sub', [False, True], ids=['in-process', 'subprocess'])
@pytest.mark.parametrize('name,args,msg', BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2(bad_env, name, args, msg, sub):
    if 'cuda' in name and torch.cuda.is_available(): pytest.skip('CUDA is available here')
    if sub and not SLOW and name != 'lsg-nan': pytest.skip('set SID_SLOW=1')  # the real command line once by default
    r = cli(*args(bad_env), sub=sub)
    assert_one_line_error(r, msg)
    assert not os.path.exists(bad_env / 'o') and not os.path.exists(bad_env / 'n5' / 'stats.jsonl')  # nothing half-written

#----------------------------------------------------------------------------
# The loop (SiD Algorithm 1): files of a run, per-phase network states, optimisers, NaN gradients, EMA, SiDA's
# schedule and clip, crash-safe checkpoints, FID, bitwise resume.

def test_end_to_end_image_run_files(tmp_path):
    cfg = cfg_for(tmp_path, iters=3, snap_kimg=0.008)
    f_phi, G, f_psi = nets = nets_for(cfg)
    phi0, G0, psi0 = (copy.deepcopy(n) for n in nets)
    (G1, G_ema, psi1), out = run_quiet(cfg, nets)
    assert states_equal(f_phi, phi0) and not any(p.requires_grad for p in f_phi.parameters())  # teacher untouched
    assert not states_equal(G1, G0) and not states_equal(psi1, psi0)
    assert json.load(open(tmp_path / 'config.json')) == dataclasses.asdict(cfg)
    assert [l.split()[:4] for l in out.splitlines() if l.startswith('tick ')] == [['tick', str(i), 'kimg', f'{0.004 * (i + 1):.1f}'] for i in range(3)]
    assert [e['kimg'] for e in read_stats(tmp_path)] == pytest.approx([0.004, 0.008, 0.012])
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(('network', 'samples'))) == [  # named by images seen
        'network-snapshot-000000008.pt', 'network-snapshot-000000012.pt', 'samples-000000008.png', 'samples-000000012.png']
    assert load_state(tmp_path)['cur_nimg'] == 12
    net, info = checkpoints.load_checkpoint(runs.snapshot_path(str(tmp_path)))  # the run folder -> its latest snapshot
    assert states_equal(net, G_ema) and info['kimg'] == pytest.approx(0.012) and info['config']['dataset'] == 'cifar10'
    with PIL.Image.open(tmp_path / 'samples-000000012.png') as im: assert im.size == (8 * 32, 8 * 32)

def test_phase_states_and_micro_batches(tmp_path):
    cfg = cfg_for(tmp_path)  # 2 iterations, 2 micro-batches of 2 per step
    f_phi, G, f_psi = nets = nets_for(cfg)
    names, calls = {id(f_phi): 'phi', id(G): 'G', id(f_psi): 'psi'}, []

    def pre(module, args, kwargs):
        if id(module) not in names:  # G_ema is a deepcopy of G and inherits the hooks
            return
        x, aug = args[0], args[3] if len(args) > 3 else kwargs.get('augment_labels')
        blocks = [m for m in module.modules() if type(m).__name__ == 'UNetBlock']
        calls.append(dict(net=names[id(module)], training=module.training, B=x.shape[0], blocks={m.training for m in blocks},
                          p_drop={m.dropout for m in blocks}, grad_enabled=torch.is_grad_enabled(), x_graph=x.requires_grad,
                          params_grad={p.requires_grad for p in module.parameters()}, aug=None if aug is None else tuple(aug.shape)))
    for n in nets:
        n.register_forward_pre_hook(pre, with_kwargs=True)
        n.register_forward_hook(lambda m, a, out: calls[-1].update(out_graph=out.requires_grad) if id(m) == id(G) else None)
    run_quiet(cfg, nets)
    assert [c['net'] for c in calls] == ['G', 'psi', 'G', 'psi', 'G', 'phi', 'psi', 'G', 'phi', 'psi'] * 2  # 2 rounds per step
    assert all(c['B'] == cfg.batch_gpu for c in calls)
    for i, c in enumerate(calls):
        G_step, frozen = i % 10 >= 4, dict(training=False, blocks={False})
        if c['net'] == 'G':  # samples for f_psi: no graph, no dropout; in its own step: dropout, the output carries the graph
            want = dict(training=True, blocks={True}, out_graph=True) if G_step else dict(frozen, grad_enabled=False, out_graph=False)
        else:  # f_psi's step: dropout on, trainable, augmented input, x_g detached; G's step: teacher and f_psi in eval mode,
            want = (dict(frozen, params_grad={False}, aug=None, x_graph=True, grad_enabled=True) if G_step  # frozen, no augmentation,
                    else dict(training=True, blocks={True}, params_grad={True}, aug=(2, 9), x_graph=False))  # differentiated in x_t
        assert {k: c[k] for k in want} == want, (i, c)
    assert all(c['p_drop'] == ({0.0} if c['net'] == 'phi' else {cfg.dropout}) for c in calls)  # the teacher never drops out

@pytest.mark.parametrize('precision,eps', [('fp32', 1e-8), ('fp16', 1e-6)])
def test_adam_settings_and_nonfinite_grads(tmp_path, precision, eps):
    cfg = cfg_for(tmp_path / 'a', g_beta1=0.9, lr=2e-5, glr=3e-5, precision=precision)
    with contextlib.redirect_stdout(io.StringIO()): run = sid.setup(cfg, nets_for(cfg, perturb=False))
    for opt, lr, b1 in ((run.opt_psi, 2e-5, 0.0), (run.opt_G, 3e-5, 0.9)):  # official: f_psi beta1 0, eps 1e-6 with fp16
        assert (opt.defaults['lr'], opt.defaults['betas'], opt.defaults['eps'], opt.defaults['weight_decay']) == (lr, (b1, 0.999), eps, 0)
    assert [p for g in run.opt_G.param_groups for p in g['params']] == list(run.G.parameters())
    assert [p for g in run.opt_psi.param_groups for p in g['params']] == list(run.f_psi.parameters())
    if precision == 'fp32':  # NaN gradients become 0: Adam leaves those weights alone, the others move
        f_phi, G, f_psi = nets = nets_for(cfg)
        pG, ppsi = G.model.enc['32x32_conv'].weight, f_psi.model.dec['32x32_aux_conv'].weight
        before, other = (pG.detach().clone(), ppsi.detach().clone()), G.model.enc['32x32_block0'].conv0.weight.detach().clone()
        for p in (pG, ppsi): p.register_hook(lambda g: torch.full_like(g, float('nan')))
        (G1, _, psi1), _ = run_quiet(cfg_for(tmp_path / 'b', iters=1), nets)
        assert torch.equal(pG, before[0]) and torch.equal(ppsi, before[1])
        assert not torch.equal(G1.model.enc['32x32_block0'].conv0.weight, other)
        assert all(torch.isfinite(p).all() for n in (G1, psi1) for p in n.parameters())

@pytest.mark.parametrize('ema_mimg', [8e-6, 1.0])  # half-life 8 images (reached after 20 iterations) / pure ramp-up
def test_ema_closed_form_with_accumulation(tmp_path, ema_mimg):
    """beta = 0.5^(batch / max(h, 1e-8)), h = min(half-life, 5 % of the images seen): the WHOLE batch, not batch_gpu."""
    batch, iters = 8, 30
    cfg = cfg_for(tmp_path, 'toy', iters, batch=batch, batch_gpu=4, ema_mimg=ema_mimg, lr=1e-2, glr=1e-2, snap_kimg=1)
    ema, n = [p.detach().double().clone() for p in nets_for(cfg)[1].parameters()], 0  # G_ema starts as a copy of G
    with contextlib.redirect_stdout(io.StringIO()):
        for it in sid.iterate(cfg, nets_for(cfg)):
            if not hasattr(it, 'loss_fake'): break
            G_i = [p.detach().double().clone() for p in it.G.parameters()]
            beta = 0.5 ** (batch / max(min(ema_mimg * 1e6, 0.05 * n * batch), 1e-8))
            ema, n = [beta * e + (1 - beta) * g for e, g in zip(ema, G_i)], n + 1
            assert max((a.double() - b).abs().max().item() for a, b in zip(it.G_ema.parameters(), ema)) < 1e-6
    assert n == iters and max((a - b).abs().max().item() for a, b in zip(ema, G_i)) > 1e-3  # EMA visibly lags G

def test_sida_loop_schedule_and_clip(tmp_path, monkeypatch):
    """Phases from the images seen BEFORE the step (frozen, SiD, mix); f_psi's gradients clipped to +-1, which matters."""
    m, G_seen, clips, sanitize = sid.METHODS['sida'], [], [], sid.sanitize_grads_
    def G_obj(run, *a):
        loss, logs = m.G(run, *a)
        G_seen.append((run.cur_nimg, loss.item(), (0.5 * logs[0] + 0.5 * logs[1]).item(), logs[0].item()))
        return loss, logs
    def sanitize_logged(params, clip=None):
        params = list(params)
        grad_max = lambda: max(p.grad.abs().max().item() for p in params if p.grad is not None)
        before = grad_max()
        sanitize(params, clip)
        clips.append((clip, before, grad_max()))
    monkeypatch.setitem(sid.METHODS, 'sida', m._replace(G=G_obj))
    monkeypatch.setattr(sid, 'sanitize_grads_', sanitize_logged)
    cfg = cfg_for(tmp_path / 'a', 'toy', 6, method='sida', batch_gpu=64, sida_warmup_kimg=0.128, sida_mix_kimg=0.256, ls=100.0)
    (_, _, psi_clipped), _ = run_quiet(cfg)
    assert [n for n, *_ in G_seen] == [192, 256, 320]  # 0, 64, 128: frozen; 192, 256: SiD; 320 > 256: mix
    for n, loss, mix, sid_only in G_seen: assert loss == pytest.approx(mix if n > 256 else sid_only, rel=1e-6)
    psi_clips = [c for c in clips if c[0] is not None]
    assert len(psi_clips) == 6 and all(c == 1.0 and after <= 1.0 for c, _, after in psi_clips)
    assert any(before > 1 for _, before, _ in psi_clips), psi_clips
    monkeypatch.setitem(sid.METHODS, 'sida', m._replace(psi_clip=None))
    (_, _, psi_free), _ = run_quiet(dataclasses.replace(cfg, outdir=str(tmp_path / 'b')))
    assert not states_equal(psi_clipped, psi_free)

@pytest.mark.parametrize('fail_on', ['snapshot', 'state'])
def test_crash_during_checkpoint_keeps_previous(tmp_path, monkeypatch, fail_on):
    cfg, real, seen = cfg_for(tmp_path, snap_kimg=0.004), torch.save, []  # a snapshot and a state after iterations 1 and 2

    def save(obj, f, *a, **k):  # the 2nd iteration's write dies half-way, as if the process were killed
        seen.append([n for n in os.listdir(tmp_path) if n.endswith('.tmp')])
        if len(seen) > 2 and ('opt_G' in obj) == (fail_on == 'state'):
            f.write(b'PK\x03\x04 half a file')
            raise KeyboardInterrupt
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(KeyboardInterrupt): run_quiet(cfg)
    tmp = r'\.(training-state\.pt|network-snapshot-00000000[48]\.pt)\.[0-9a-f]{6}\.tmp'
    assert len(seen) == 3 + (fail_on == 'state') and all(len(t) == 1 and re.fullmatch(tmp, t[0]) for t in seen)  # via temporaries
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]  # the dying write removed its own
    monkeypatch.setattr(torch, 'save', real)
    assert load_state(tmp_path)['cur_nimg'] == 4
    assert checkpoints.load_checkpoint(str(tmp_path / 'network-snapshot-000000004.pt'))[1]['kimg'] == pytest.approx(0.004)
    assert os.path.exists(tmp_path / 'network-snapshot-000000008.pt') == (fail_on == 'state')
    _, out = run_quiet(sid.make_config(dict(resume=str(tmp_path))))  # the run continues from the surviving state
    assert 'resumed from' in out and load_state(tmp_path)['cur_nimg'] == 8

def test_fid_in_loop_best_snapshot_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv('SID_DETECTOR', detector_file(tmp_path / 'det.pt', dim=8))
    mu_ref, sig_ref = np.full(8, 0.1), np.eye(8) * 0.5
    fid.save_ref(str(tmp_path / 'ref.npz'), mu_ref, sig_ref)
    cfg = cfg_for(tmp_path / 'run', iters=3, fid_every_kimg=0.004, fid_num=16, fid_ref=str(tmp_path / 'ref.npz'), lr=1e-2, glr=1e-2)
    nets = nets_for(cfg)
    _, out = run_quiet(cfg, (nets[0], perturb_copy(nets[1]), nets[2]))
    fids = load_state(tmp_path / 'run')['fid']
    assert [m for m, _ in fids] == pytest.approx([4e-6, 8e-6, 12e-6]) and len({v for _, v in fids}) == 3
    assert sum(l.startswith('FID ') for l in out.splitlines()) == 3 and [e['fid'] for e in read_stats(tmp_path / 'run') if 'fid' in e] == [v for _, v in fids]
    G, info = checkpoints.load_checkpoint(str(tmp_path / 'run' / 'network-snapshot-best.pt'))
    m_best, v_best = min(fids, key=lambda p: p[1])
    assert info['kimg'] == pytest.approx(m_best * 1e3) and os.path.getsize(tmp_path / 'run' / 'fid.png') > 1000
    z = 2.5 * torch.stack([torch.randn([3, 32, 32], generator=torch.Generator().manual_seed(s)) for s in range(16)])
    with torch.no_grad():  # independent FID of the best snapshot: numpy statistics of the stand-in features
        x = G(z, torch.full([16, 1, 1, 1], 2.5))
    feats = FidStandIn(dim=8)((x * 127.5 + 128).clip(0, 255).to(torch.uint8), True).double().numpy()
    assert v_best == pytest.approx(fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_ref, sig_ref), rel=1e-6)

@pytest.mark.parametrize('kind', ['toy', 'image', 'cond-data'])
def test_resume_is_bitwise_identical(tmp_path, kind):
    """Interrupted + resumed (only --resume and a longer --duration-mimg) = uninterrupted, bit for bit, stats and data."""
    extra = dict(ema_mimg=1e-4) if kind == 'toy' else {}
    if kind == 'cond-data':  # labels from a labelled folder: the data position must be restored too
        files, _, _ = edm_files(n=6, size=32)
        extra = dict(data=write_dataset(tmp_path / 'data', files, {'labels': [[n, c] for n, c in zip(files, [0, 9, 3, 5, 9, 1])]}))
    make = lambda out, iters: cfg_for(out, 'toy' if kind == 'toy' else 'cifar10-cond' if extra.get('data') else 'cifar10', iters,
                                      snap_kimg=(64 if kind == 'toy' else 4) * 2 / 1e3, **extra)
    nets = nets_for(make(tmp_path / 'x', 1))
    torch.manual_seed(11)  # the global RNG state before a run must not matter
    A, _ = run_quiet(make(tmp_path / 'a', 4), copy.deepcopy(nets))
    torch.manual_seed(12)
    run_quiet(make(tmp_path / 'b', 2), copy.deepcopy(nets))
    runs.append_stats(str(tmp_path / 'b'), dict(kimg=1e6, loss_fake=0.0))  # a tick written after the last state
    torch.manual_seed(13)
    cfg_b = sid.make_config(dict(resume=str(tmp_path / 'b'), duration_mimg=make('', 4).duration_mimg))
    assert cfg_b == dataclasses.replace(make(tmp_path / 'b', 4), resume=str(tmp_path / 'b'))
    B, out = run_quiet(cfg_b, copy.deepcopy(nets))
    assert 'resumed from' in out and all(states_equal(a, b) for a, b in zip(A, B)) and not states_equal(A[0], nets[1])
    same = lambda e: {k: v for k, v in e.items() if k not in ('tick', 'time', 'sec_per_kimg')}  # ticks restart, as EDM's
    assert [same(e) for e in read_stats(tmp_path / 'b')] == [same(e) for e in read_stats(tmp_path / 'a')] and len(read_stats(tmp_path / 'a')) == 4
    assert load_state(tmp_path / 'b')['data_images'] == (2 * 4 * 4 if extra.get('data') else 0)  # both steps of 4 iterations draw a batch

@slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_and_leaves_no_half_file(tmp_path):
    """`python sid.py` killed 3 times and resumed = uninterrupted, bit for bit; every file left is whole (a temporary
    may remain: the next start removes it); a half line ending stats.jsonl (a kill mid-append) is dropped."""
    args = ['--dataset', 'toy', '--duration-mimg', 0.1, '--batch', 256, '--tick-kimg', 5, '--snap-kimg', 5]
    start = lambda *a: subprocess.Popen([sys.executable, os.path.join(HERE, 'sid.py'), *map(str, a)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    a, b, rng = tmp_path / 'a', tmp_path / 'b', np.random.default_rng(int(time.time()))
    state_time = lambda: os.path.getmtime(b / 'training-state.pt') if os.path.exists(b / 'training-state.pt') else 0
    p = start(*args, '--outdir', b)
    for _ in range(3):
        since = state_time()
        while p.poll() is None and state_time() == since:
            time.sleep(0.01)  # until this process has written a state: the kill lands in training, not at start-up
        time.sleep(rng.uniform(0, 0.5))
        assert p.poll() is None, ('the run ended before 3 kills', p.stderr.read()[-2000:])
        p.kill(), p.wait()
        for name in os.listdir(b):  # whole files only
            if name.endswith('.pt'): torch.load(b / name, weights_only=True)
            elif name.endswith('.json'): json.load(open(b / name))
            else: assert name.endswith(('.tmp', '.jsonl', '.png', '.gif')), name
        with open(b / 'stats.jsonl', 'a') as f: f.write('{"kimg": 1')
        p = start('--resume', b)
    assert p.wait() == 0 and cli(*args, '--outdir', a, sub=True).returncode == 0, p.stderr.read()[-2000:]
    A, B = load_state(a), load_state(b)
    assert A['cur_nimg'] == B['cur_nimg'] > 1e5 and all(torch.equal(A[k][n], B[k][n]) for k in ('G', 'G_ema', 'f_psi') for n in A[k])
    assert [e['kimg'] for e in read_stats(b)] == [e['kimg'] for e in read_stats(a)] and not [n for n in os.listdir(b) if n.endswith('.tmp')]

#----------------------------------------------------------------------------
# DDP (torchrun, gloo on CPU). Every micro-batch is seeded from (seed, images seen, phase, global micro-batch index
# rank*rounds + r), so 2 ranks x 1 round and 1 rank x 2 rounds draw the same numbers for the same micro-batches, and
# DDP's gradient mean equals the accumulated sum: the runs agree up to float summation order (and nothing else:
# unsynchronised gradients, a wrong normalisation or a rank-dependent stream break the tolerances below).

def run_dict(cfg, perturb=True):
    """One in-process run -> final state dicts and stats.jsonl entries."""
    (G, G_ema, f_psi), _ = run_quiet(cfg, nets_for(cfg, perturb))
    return dict(G=G.state_dict(), G_ema=G_ema.state_dict(), f_psi=f_psi.state_dict(), stats=read_stats(cfg.outdir))

def mean_diff(a, b):
    """Mean |difference| per weight over G, G_ema and f_psi. Not the max: Adam moves every weight by ~lr whatever its
    gradient, so a weight with a mathematically zero gradient (a bias before a GroupNorm) may step +lr in one run and
    -lr in the other from rounding alone; a real fault changes most weights' steps, i.e. by ~lr on average."""
    ks = ('G', 'G_ema', 'f_psi')
    return sum((a[k][n] - b[k][n]).abs().sum().item() for k in ks for n in a[k]) / sum(a[k][n].numel() for k in ks for n in a[k])

def _driver(jobs_path):
    """`torchrun --nproc_per_node=2 test_sid.py JOBS.json`: check_ranks_agree must catch differing replicas; then
    each job trains (train() checks the replicas every tick) and each rank saves its weights as rank{r}.pt."""
    import torch.distributed as dist
    dist.init_process_group('gloo')  # train() leaves a caller's group alone
    rank, net = dist.get_rank(), nn.Linear(3, 2)
    nn.init.constant_(net.weight, 0.5), nn.init.constant_(net.bias, 0.5)
    runs.check_ranks_agree([net])  # equal: must pass
    with torch.no_grad(): net.bias[1] += 1e-6 * rank
    try:
        runs.check_ranks_agree([net])
    except RuntimeError:  # caught: the test looks for this file
        runs.write_json(os.path.join(os.path.dirname(jobs_path), f'check{rank}.json'), {})
    for job in json.load(open(jobs_path)):
        cfg = sid.make_config(job['cfg'])
        G, G_ema, f_psi = sid.train(cfg, nets_for(cfg, job['perturb']))
        torch.save(dict(G=G.state_dict(), G_ema=G_ema.state_dict(), f_psi=f_psi.state_dict()), os.path.join(cfg.outdir, f'rank{rank}.pt'))
    dist.destroy_process_group()

@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    """One torchrun launch (2 ranks) for all multi-process tests, and the single-process runs they compare to."""
    t = tmp_path_factory.mktemp('ddp')
    d = {k: t / k for k in ('toy1', 'toy2', 'img1_half', 'img1_full', 'img2_half', 'img2_back', 'img1_resumed', 'sida2', 'sida1_resumed', 'sign2')}
    img = lambda k, n, **kw: cfg_for(d[k], 'cifar10', n, batch=8, batch_gpu=4, lr=1e-4, glr=1e-4, **kw)
    one = dict(toy1=run_dict(cfg_for(d['toy1'], 'toy', 3, batch=128), False), img1_half=run_dict(img('img1_half', 2)),
               img1_full=run_dict(img('img1_full', 4)))
    jobs = [dict(cfg=cfg_for(d['toy2'], 'toy', 3, batch=128), perturb=False),           # 2 ranks x 2 rounds of 32 (no_sync)
            dict(cfg=img('img2_half', 2), perturb=True),                               # 2 ranks x 1 round of 4
            dict(cfg=img('img2_back', 4, resume=str(d['img1_half'])), perturb=True),   # 1 rank -> 2 ranks
            dict(cfg=cfg_for(d['sida2'], 'toy', 2, method='sida', batch_gpu=16), perturb=False),  # 2 rounds per rank
            dict(cfg=cfg_for(d['sign2'], 'toy', 2, method='sign'), perturb=False)]
    runs.write_json(str(t / 'jobs.json'), [dict(job, cfg=dataclasses.asdict(job['cfg'])) for job in jobs])
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', __file__, str(t / 'jobs.json')],
                       env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=HERE), cwd=t, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one['img1_resumed'] = run_dict(img('img1_resumed', 4, resume=str(d['img2_half'])))  # back on 1 rank
    one['sida1_resumed'] = run_dict(cfg_for(d['sida1_resumed'], 'toy', 4, method='sida', batch_gpu=16, resume=str(d['sida2'])), False)
    return dict(dirs=d, one=one, stdout=r.stdout, tmp=t)

def rank_states(outdir):
    return [torch.load(os.path.join(outdir, f'rank{r}.pt'), weights_only=True) for r in (0, 1)]

def test_ddp_replicas_identical_only_rank0_writes(ddp):
    assert all(os.path.exists(ddp['tmp'] / f'check{r}.json') for r in (0, 1))  # a 1e-6 difference is caught
    for job in ('toy2', 'img2_half', 'img2_back', 'sida2', 'sign2'):
        a, b = rank_states(ddp['dirs'][job])
        assert all(torch.equal(a[k][n], b[k][n]) for k in ('G', 'G_ema', 'f_psi') for n in a[k]), job
    assert [round(e['kimg'] * 1e3) for e in read_stats(ddp['dirs']['img2_half'])] == [8, 16]  # one writer
    assert ddp['stdout'].count(' 2 process(es) on cpu, 1 round(s) of 4 per step') == 2  # the startup line, once per job

def test_ddp_equals_single_process_and_resumes_across_world_sizes(ddp):
    for one, two, tol in ((ddp['one']['toy1'], 'toy2', 1e-5), (ddp['one']['img1_half'], 'img2_half', 1e-6)):  # lr 1e-3 / 1e-4
        assert mean_diff(one, rank_states(ddp['dirs'][two])[0]) < tol
        for e1, e2 in zip(one['stats'], read_stats(ddp['dirs'][two])):  # the logged losses are the whole batch's
            assert math.isclose(e1['loss_fake'], e2['loss_fake'], rel_tol=1e-4) and math.isclose(e1['loss_G'], e2['loss_G'], rel_tol=1e-3, abs_tol=1e-4)
    full = ddp['one']['img1_full']  # 4 uninterrupted iterations on 1 rank
    assert mean_diff(ddp['one']['img1_half'], full) > 3e-5  # two more steps move the weights far more
    for resumed, stats in ((ddp['one']['img1_resumed'], ddp['one']['img1_resumed']['stats']),
                           (rank_states(ddp['dirs']['img2_back'])[0], read_stats(ddp['dirs']['img2_back']))):
        assert mean_diff(full, resumed) < 1e-6 and [round(e['kimg'] * 1e3) for e in stats] == [24, 32]  # into a new folder
        assert all(math.isclose(e['loss_fake'], ref['loss_fake'], rel_tol=1e-5) for e, ref in zip(stats, full['stats'][2:]))
    st2, st1 = (load_state(ddp['dirs'][k]) for k in ('sida2', 'sida1_resumed'))
    assert (st2['cur_nimg'], st2['data_images'], st1['cur_nimg'], st1['data_images']) == (128, 128, 256, 256)  # f_psi step only (frozen G)

#----------------------------------------------------------------------------
# Fast options: each reproduces the faithful path within its precision's tolerance, and does take effect.

def test_fast_options_same_losses(tmp_path, monkeypatch):
    """Fused Adam and checkpointing (dropout on: the recomputation must replay its masks) give the faithful run to fp32
    rounding (an unreplayed mask or a wrong step is O(1)); another seed moves the losses > 10 %: the checks can fail."""
    fast_run = lambda name, **opt: run_dict(cfg_for(tmp_path / name, batch=4, batch_gpu=4, lr=1e-4, glr=1e-4, **opt))
    close = lambda a, b, rel: all(math.isclose(e1[k], e2[k], rel_tol=rel) for e1, e2 in zip(a['stats'], b['stats']) for k in ('loss_fake', 'loss_G'))
    faithful, other = fast_run('fp32'), fast_run('s', seed=1)
    assert not math.isclose(other['stats'][0]['loss_G'], faithful['stats'][0]['loss_G'], rel_tol=0.1) and mean_diff(other, faithful) > 3e-5
    seen, adam = [], torch.optim.Adam
    monkeypatch.setattr(torch.optim, 'Adam', lambda *a, **k: seen.append(k.get('fused')) or adam(*a, **k))
    out = fast_run('f', fused_adam=1)
    assert seen == [True, True] and close(faithful, out, 1e-5) and mean_diff(faithful, out) < 1e-6
    out = fast_run('c', checkpointing=1)
    assert close(faithful, out, 1e-6) and mean_diff(faithful, out) < 1e-7

# The GPU fast path on CPU: bf16 autocast, channels_last and compiled UNet blocks against the faithful fp32 path, on
# one SiD iteration's losses and parameter gradients of a tiny DDPM++ with attention (5 UNet blocks, 4 kinds).

FAST_NET = dict(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1],
                num_blocks=1, attn_resolutions=[8], augment_dim=9, dropout=0.0)

def losses_and_grads(bf16=False, channels_last=False, compiled=False):
    torch.manual_seed(0)
    f_phi = perturb_copy(edm_nets.EDMPrecond(**FAST_NET), 0, 0.05)  # EDM's near-zero init would hide most of the net
    G, f_psi = copy.deepcopy(f_phi), perturb_copy(f_phi, 2, 0.02)
    f_phi.eval().requires_grad_(False)
    for net in (f_phi, G, f_psi):
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        edm_nets.compile_blocks(net) if compiled else None
    amp = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)
    g = torch.Generator().manual_seed(1)
    z, noise, aug = torch.randn(4, 3, 8, 8, generator=g) * 2.5, torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 9, generator=g) * 0.3
    sigma = torch.full([4, 1, 1, 1], 1.3)
    with torch.no_grad(), amp():  # G samples without a graph, eval mode
        x_g = sid.generate(G.eval(), z, None, 2.5).float()
    with amp():
        l_psi = sid.fake_score_loss(f_psi.train(), x_g, sigma, noise, None, aug).sum()
    g_psi = torch.autograd.grad(l_psi, list(f_psi.parameters()), allow_unused=True)
    f_psi.eval().requires_grad_(False)  # frozen, but differentiated w.r.t. its input x_t
    with amp():
        l_G = sid.sid_generator_loss(f_phi, f_psi, sid.generate(G.train(), z, None, 2.5).float(), sigma, noise, None, 1.2).sum()
    g_G = torch.autograd.grad(l_G, list(G.parameters()), allow_unused=True)  # G's map_augment gets none
    flat = lambda gs: torch.cat([g.flatten() for g in gs if g is not None])
    return torch.stack([l_psi, l_G]).detach(), flat(g_psi), flat(g_G)

@pytest.fixture(scope='module')
def fp32_ref():
    return losses_and_grads()

# bf16: ~3x the measured errors (losses <= 6e-3, gradients <= 1.2e-2 relative); every block's output x 1.05 breaks
# them (5e-2). fp32 options: the same maths in another summation order.
@pytest.mark.parametrize('opt,loss_tol,grad_tol', [(dict(channels_last=True), 1e-5, 1e-5), (dict(bf16=True, channels_last=True), 2e-2, 4e-2),
                         pytest.param(dict(compiled=True), 1e-4, 1e-4, marks=slow), pytest.param(dict(bf16=True, channels_last=True, compiled=True), 2e-2, 4e-2, marks=slow)])
def test_fast_path_agrees_with_fp32(fp32_ref, opt, loss_tol, grad_tol):
    if opt.get('compiled'):
        __import__('torch._dynamo')
        torch._dynamo.reset(), torch._dynamo.utils.counters.clear()
    out = losses_and_grads(**opt)
    torch.testing.assert_close(out[0], fp32_ref[0], rtol=loss_tol, atol=0)
    for x0, x1 in zip(fp32_ref[1:], out[1:]):  # gradients: relative error of the whole vector
        assert (x1 - x0).norm() / x0.norm() < grad_tol, float((x1 - x0).norm() / x0.norm())
    assert not (opt.get('bf16') and torch.equal(out[0], fp32_ref[0]))  # bf16: autocast did run
    if opt.get('compiled'):  # 3 modes (eval no_grad, train, frozen with input grads) x 4 block kinds, not x 5 blocks x 3 nets
        assert torch._dynamo.utils.counters['stats']['unique_graphs'] <= 12
    net = edm_nets.EDMPrecond(**dict(FAST_NET, dropout=0.5))  # compiling keeps the state_dict names: checkpoints stay loadable
    assert list(edm_nets.compile_blocks(copy.deepcopy(net)).state_dict()) == list(net.state_dict())

#----------------------------------------------------------------------------
# runs.py: generate (per-seed images, grid, classes), SIGN's multi-step noise, and SIGN on the toy.

def test_generate_per_seed_grid_and_classes(tmp_path):
    snap, read_png = {}, lambda path: np.asarray(PIL.Image.open(path))
    for ds in ('cifar10', 'cifar10-cond'):  # perturbed tiny generators, unconditional and class-conditional
        snap[ds] = str(tmp_path / f'{ds}.pt')
        runs.save_snapshot(snap[ds], perturb_copy(nets_for(cfg_for(tmp_path / 'u', ds), perturb=False)[1]).eval(), 0, sid.Config(dataset=ds))
    gen = lambda ckpt, out, *a: cli('generate', '--device', 'cpu', '--ckpt', snap[ckpt], '--outdir', tmp_path / out, *a)
    gen('cifar10', 'a', '--seeds', '0-3', '--batch', 4), gen('cifar10', 'b', '--seeds', '2,3,0-1', '--batch', 3)
    names = [f'{s:06d}.png' for s in range(4)]
    imgs = [read_png(tmp_path / 'a' / n) for n in names]
    assert sorted(os.listdir(tmp_path / 'b')) == names and imgs[0].shape == (32, 32, 3) and imgs[0].std() > 10
    assert all(np.array_equal(read_png(tmp_path / 'b' / n), im) for n, im in zip(names, imgs))  # any batch split
    assert not np.array_equal(imgs[0], imgs[1])
    gen('cifar10', 'g', '--seeds', '0-3', '--grid')
    grid = read_png(tmp_path / 'g' / 'grid.png')
    assert os.listdir(tmp_path / 'g') == ['grid.png'] and np.array_equal(grid[:32, 32:], imgs[1]) and np.array_equal(grid[32:, 32:], imgs[3])
    G, _ = checkpoints.load_checkpoint(snap['cifar10-cond'])
    old, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False  # as generate: oneDNN rounds per batch size
    try:
        for c in (3, 7):  # the image of a seed computed independently: z = 2.5 eps from the seed, G(z; 2.5), EDM's uint8 rule
            gen('cifar10-cond', str(c), '--seeds', '0-1', '--class-idx', c)
            for s in range(2):
                z = 2.5 * torch.randn([1, 3, 32, 32], generator=torch.Generator().manual_seed(s))
                with torch.no_grad(): x = G(z, torch.full([1, 1, 1, 1], 2.5), F.one_hot(torch.tensor([c]), 10).float())[0]
                ref = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                assert np.array_equal(read_png(tmp_path / str(c) / f'{s:06d}.png'), ref)
    finally:
        torch.backends.mkldnn.enabled = old
    assert not np.array_equal(read_png(tmp_path / '3' / '000000.png'), read_png(tmp_path / '7' / '000000.png'))
    assert_one_line_error(gen('cifar10-cond', 'x', '--class-idx', 10), 'this generator has classes 0..9')

def test_sign_noise_per_seed_fresh_per_step():
    """Identity generator: x_K = z + sum_k sigma_k eps_k, eps_k from the seed's own generator, fresh every step."""
    G, dev = Stub(lambda m, x, s: x, img_shape=(3, 2, 2)), torch.device('cpu')
    x0, x1, x2 = (runs.sample_images(G, range(6), 2.5, dev, sigmas=s) for s in ((), (1.0,), (1.0, 1.0)))
    assert torch.equal(runs.sample_images(G, [3, 4, 5], 2.5, dev, sigmas=(1.0, 1.0)), x2[3:])  # any batch split
    assert torch.equal(runs.sample_images(G, [4], 2.5, dev, sigmas=(1.0,)), x1[4:5])
    eps1, eps2 = x1 - x0, x2 - x1
    assert eps1.std().item() == pytest.approx(1, abs=0.3) and eps2.std().item() == pytest.approx(1, abs=0.3)
    assert not torch.allclose(eps1, eps2, atol=0.1) and not torch.allclose(eps1, x0 / 2.5, atol=0.1)  # fresh, not the latent

@slow
def test_sign_toy_idempotence_modes_multistep_projection(tmp_path):
    """SIGN trained on the toy (~510 iterations) against its initial generator."""
    T, G_init = toy_nets_pretrained()[0], toy_nets_pretrained()[1].eval()
    (_, G_ema, _), out = run_quiet(sid.make_config({'method': 'sign', 'duration_mimg': 0.13, 'outdir': str(tmp_path)}), toy_nets_pretrained())
    z, x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7)) * 2.5, T.sample(2000, torch.Generator().manual_seed(5))
    noise = [torch.randn(z.shape, generator=torch.Generator().manual_seed(j)) for j in range(3)]
    ev0, ev = (runs.sign_evaluation(torch.no_grad()(lambda v: runs.generate(G, v, None, 2.5)), z, x, toy.TOY_SIGN_SIGMAS, noise,
                                    torch.randn(x.shape, generator=torch.Generator().manual_seed(3))) for G in (G_init, G_ema.eval()))
    # at initialisation f is the teacher's denoiser at sigma 2.5: idem ~0.11, fix ~0.67; trained ~0.04 and ~0.035
    assert ev['idem'] < 0.5 * ev0['idem'] and ev['idem'] < 0.06 and ev['fix'] < 0.1 * ev0['fix'] and ev['fix'] < 0.06
    (ed, covered, within), (ed0, _, within0) = (toy.toy_quality(e['steps'][0], T) for e in (ev, ev0))
    assert covered == 8 and within > 0.4 and within0 < 0.05 and ed < 0.1 * ed0
    for k in (2, 4):  # more steps are not worse: within-2-std may drop by <= 0.02, energy distance at most 2x + 0.001
        q = toy.toy_quality(ev['steps'][k - 1], T)
        assert q[2] >= within - 0.02 and q[0] <= 2 * ed + 0.001, (k, q, ed, within)
    nearest_mode = lambda v: float(torch.cdist(v.double(), T.mu).min(1).values.mean())  # exact samples: s*sqrt(pi/2) = 0.125
    d_noisy, d_proj = nearest_mode(ev['noisy']), nearest_mode(ev['projected'])
    assert d_proj < 0.85 * d_noisy and d_proj < 0.5 * nearest_mode(ev0['projected'])  # ~0.24 -> ~0.19; untrained ~ring radius
    assert 'sign: idempotence error' in out and os.path.exists(tmp_path / 'toy.gif')

#----------------------------------------------------------------------------
# The image toy (toy.ImageToy): the exact empirical denoiser, its quality figures, and SIGN's two fixes.

@pytest.fixture(scope='module')
def image_world():
    return toy.ImageToy(per_class=4, fit_steps=0)

def brute_force(X, x, sigma, allowed=None):
    """D(x; sigma) one sample at a time in numpy float64 with an explicit log-sum-exp."""
    out = []
    for k, v in enumerate(x.reshape(len(x), -1).double().numpy()):
        logw = -((v[None] - X) ** 2).sum(1) / (2 * float(sigma[k]) ** 2)
        logw = np.where(allowed[k], logw, -np.inf) if allowed is not None else logw
        w = np.exp(logw - logw.max())
        out.append((w / w.sum()) @ X)
    return np.stack(out).reshape(x.shape)

def test_denoiser_matches_brute_force(image_world):
    X, g = image_world.teacher.X.numpy(), torch.Generator().manual_seed(0)
    x0, c = image_world.sample(6, g)
    x = x0 + 0.7 * torch.randn(x0.shape, generator=g)
    chunked = toy.EmpiricalDenoiser(image_world.images, image_world.labels, chunk_elems=2 * len(X))  # 2 rows per chunk
    allowed = (c.numpy() @ image_world.labels.numpy().T) > 0.5
    for sigma in (0.3, 1.0, 4.0, torch.tensor([0.2, 0.5, 1, 2, 5, 30.0]).reshape(-1, 1, 1, 1)):
        s = np.broadcast_to(np.asarray(sigma).reshape(-1), 6)
        for net in (image_world.teacher, chunked):
            np.testing.assert_allclose(net(x, sigma).double().numpy(), brute_force(X, x, s), atol=2e-6)
        np.testing.assert_allclose(image_world.teacher(x, sigma, c).double().numpy(), brute_force(X, x, s, allowed), atol=2e-6)

def test_denoiser_limits_and_classes(image_world):
    X, x0 = image_world.teacher.X, image_world.images.float() / 127.5 - 1
    x = x0 + 0.02 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    assert (image_world.teacher(x, 1e-3) - x0).abs().max() < 1e-6                           # sigma -> 0: nearest image
    assert (image_world.teacher(x, 1e5) - X.mean(0).reshape(x0.shape[1:]).float()).abs().max() < 1e-5   # -> inf: mean
    other = image_world.labels.roll(1, dims=1)                                               # another class's label:
    d = image_world.teacher(x, 1e-3, other).flatten(1).double()                              # that class's nearest image
    assert torch.equal(image_world.labels[torch.cdist(d, X).argmin(1)], other)
    cls_mean = (other @ image_world.labels.T / other.sum(0)[0]).double() @ X
    assert (image_world.teacher(x, 1e5, other).flatten(1).double() - cls_mean).abs().max() < 1e-5

def test_quality_exact_far_better_than_noise_or_blur(image_world):
    x, c = image_world.sample(64, torch.Generator().manual_seed(2))
    q = toy.image_quality(image_world.teacher.X, image_world.teacher.set_labels, x, c)
    assert q['fidelity'] < 1e-6 and q['class_acc'] == 1 and abs(q['energy']) < 0.06 and q['coverage'] > 0.8
    noise = toy.image_quality(image_world.teacher.X, image_world.teacher.set_labels, 0.5 * torch.randn(x.shape), c)
    blur = toy.image_quality(image_world.teacher.X, image_world.teacher.set_labels, image_world.teacher(x, 1e5, c), c)  # class means
    assert noise['energy'] > 0.3 and blur['energy'] > 0.05 and blur['coverage'] < 0.3
    assert blur['sharpness'] < 0.7 * q['sharpness'] and noise['class_acc'] < 0.6

#----------------------------------------------------------------------------
# SIGN fixes. f(x) = A x as a one-layer "generator" with sid.generate's call convention.

class Linear(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())
    def forward(self, x, sigma, labels=None):
        return x @ self.A.T

def train_data_free(x_rec_flawed, steps=300):
    """sign_student_loss data-free with lambda_rec = lambda_idem, L_flow off; -> (A0, A), A0 = 0.8 I + noise.
    x_rec_flawed: pass x = sg f(z) explicitly, which is what the data-free L_rec used to do."""
    g = torch.Generator().manual_seed(1)
    A0 = 0.8 * torch.eye(4) + 0.05 * torch.randn(4, 4, generator=g)
    G = Linear(A0)
    G_bar, opt = sid.frozen_copy(G), torch.optim.Adam(G.parameters(), lr=1e-2)
    zero_net = lambda x, s, c: 0 * x
    for _ in range(steps):
        sid.refresh_frozen_(G_bar, G)
        x_g = sid.generate(G, torch.randn(64, 4, generator=g), None, 2.5)
        t = sid.sign_student_loss(G, G_bar, zero_net, zero_net, x_g, None, torch.ones(64, 1), torch.zeros(64, 4),
                                  x=x_g.detach() if x_rec_flawed else None, lam_flow=0)
        opt.zero_grad(); (t['idem'] + t['rec']).mean().backward(); opt.step()
    return A0, G.A.detach()

def fixed_dim(A):
    """Dimension of f's fixed-point set {x: A x = x}, numerically (singular values of A - I below 0.05)."""
    return int((torch.linalg.svdvals(A - torch.eye(len(A))) < 0.05).sum())

def test_data_free_sign_does_not_grow_the_fixed_points_towards_the_identity():
    A0, A = train_data_free(False)
    assert fixed_dim(A0) == 0 and fixed_dim(A) == 0 and (A - torch.eye(4)).norm() > (A0 - torch.eye(4)).norm()
    _, A_flawed = train_data_free(True)  # control: the old data-free L_rec = d(f(sg f(z)), sg f(z)) drives A to I
    assert fixed_dim(A_flawed) == 4 and (A_flawed - torch.eye(4)).abs().max() < 0.01

def test_frozen_copy_is_the_same_function_with_dropout():
    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 4))
    G_bar, x = sid.frozen_copy(G.eval()), torch.randn(8, 4)
    G.train()
    sid.refresh_frozen_(G_bar, G)
    assert G_bar.training and not any(p.requires_grad for p in G_bar.parameters())
    assert not torch.equal(G(x), G(x))                          # dropout is on ...
    torch.manual_seed(3); a = G(x)
    torch.manual_seed(3); b = G_bar(x)
    assert torch.equal(a, b)                                    # ... and the copy draws the same masks
    sid.refresh_frozen_(G_bar, G.eval())
    assert not G_bar.training and torch.equal(G_bar(x), G(x))

#----------------------------------------------------------------------------
# Whole runs on the image toy: a short one in the default run (a smaller set, a brief student fit), the preset's
# under SID_SLOW=1. Each must move its samples clearly towards the set, not merely run.

def run_world(tmp_path, monkeypatch, method, world_kw=None, **kw):
    worlds = []
    make = lambda: worlds.append(toy.ImageToy(**(world_kw or {}))) or worlds[-1]
    monkeypatch.setitem(toy.WORLDS, 'toy-images', make)
    cfg = sid.make_config(dict(dataset='toy-images', method=method, outdir=str(tmp_path / method), **kw))
    sid.train(cfg)
    return [q for _, q in worlds[0].curve]  # the figures at every tick, the start first

def test_image_loop_learns_in_a_minute(tmp_path, monkeypatch):
    # 16 images, a 100-step student fit (blurry, start fidelity ~0.39), 2 kimg of SiD: G must sharpen its samples
    # and bring them towards set images of the right class (seen, seeds 0/1: fidelity -0.08/-0.10, sharpness +0.015)
    curve = run_world(tmp_path, monkeypatch, 'sid', dict(per_class=4, fit_steps=100, n_eval=64),
                      duration_mimg=0.002, tick_kimg=0.5, psi_warmup_kimg=0.1, glr=1e-4)
    q0, q1 = curve[0], curve[-1]
    assert q1['fidelity'] < q0['fidelity'] - 0.05 and q1['sharpness'] > q0['sharpness'] + 0.008
    assert q1['class_acc'] > 0.95 and (tmp_path / 'sid' / 'toy-images.png').stat().st_size > 3000

@pytest.mark.skipif(not SLOW, reason='the preset run on the image toy takes ~3 min of CPU (SID_SLOW=1)')
@pytest.mark.parametrize('method', ['sid', 'sida', 'sign'])
def test_preset_learns_the_image_toy(tmp_path, monkeypatch, method):
    # Seen (SiD seeds 0-2, SiDA and SIGN seed 0, on two machines): coverage 0.66 -> 0.72-0.88, fidelity 0.303 ->
    # 0.23-0.26, sharpness 0.091 -> 0.110-0.136 (exact 0.134), energy 0.040 -> 0.001-0.08 (it jumps between ticks)
    curve = run_world(tmp_path, monkeypatch, method)
    q0, q1 = curve[0], curve[-1]
    assert q1['coverage'] > q0['coverage'] + 0.04 and q1['fidelity'] < q0['fidelity'] - 0.03
    assert q1['sharpness'] > q0['sharpness'] + 0.01 and q1['class_acc'] > 0.95
    assert np.mean([q['energy'] for q in curve[-3:]]) < q0['energy']

if __name__ == '__main__':  # the torchrun worker of the DDP section
    _driver(sys.argv[1])
