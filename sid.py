"""sid: Score identity Distillation (SiD), SiDA / SiD²A and SIGN, the papers and SiD's Algorithm 1.

Papers: SiD, Zhou et al., ICML 2024 (arXiv 2404.04057); SiDA, Zhou et al., ICLR 2025 (arXiv
2410.14919); SIGN, Zaman et al. 2025 (arXiv 2509.21470; no public code: our reconstruction, see the
README). Official code: github.com/mingyuanzhou/SiD (branches main and sida). This file holds the
maths and the training loop and knows nothing of files: the run driver (runs.py: command line, run
folders, snapshots, FID, resume) sits above it and calls `setup` and `iterate`.

    python sid.py --dataset toy                  # 2-D toy with an exact teacher, seconds on a CPU
    python sid.py --help                         # every option (the driver in runs.py parses them)

Reading order: identities and noise draws -> the generator -> SiD -> SiDA -> SIGN -> what each
method minimises -> Config and presets -> set-up -> the loop (Algorithm 1).

Notation (paper -> code):
    f_phi, the teacher's denoiser D(x; sigma)        f_phi          (frozen, eval mode)
    f_psi, the fake score (SiDA: also D's encoder)   f_psi
    G_theta, the one-step generator                  G, and G_ema (its EMA: sampled and saved)
    x_g = G(sigma_init eps; sigma_init)              x_g, generate(), cfg.sigma_init (2.5)
    x_t = x_g + sigma n                              x_t, sigma, noise
    alpha, the SiD loss's weight                     alpha
    w, the per-sample normaliser of SiD's loss       w, sid_normaliser()
    lambda(sigma), EDM's loss weight                 edm_weight()
    t ~ U(0, t_max / 1000) on EDM's rho=7 levels     tmax, sigma_from_t()
    SiDA's discriminator logits (f_psi's encoder)    logits
    SIGN / IGN: f_theta, its frozen copy f_theta'    f, f_bar (G at sigma_init, G_bar)
    lambda_idem, lambda_rec, lambda_flow             cfg.lambda_idem, lambda_rec, lambda_flow
    EDM2: u(sigma), f_psi's log-variance head        u, logvar (cfg.logvar)
The official option names are kept: ls, lsg (f_psi's and G's loss scales), lsd, lsg_gan (SiDA's
discriminator and adversarial scales); lr is f_psi's Adam learning rate, glr G's.

EDM2 teachers (Karras et al., CVPR 2024; ImageNet 512x512 in Stable Diffusion VAE latents, the
imagenet512-* presets) run the same losses and loop; where the official EDM2 code differs from its
EDM code, a Config field names the difference: P_mean/P_std (f_psi's levels), logvar (EDM2's
uncertainty weighting), clip_psi (SiDA's f_psi clip), force_normalization (EDM2's networks).

Where we differ from the official code, and why (the README lists them with more detail):
  - A non-finite sample of G is zeroed before any network sees it and its loss is dropped, with
    the official normalisation (the images per GPU): the same sums as dropping it, no host sync,
    and the other samples' gradients stay finite (officially they become NaN: see finite_part).
  - Every micro-batch draws from its own seed (seed, iteration, phase, global micro-batch index):
    a resumed run is bitwise the uninterrupted one, and any split into GPUs x rounds draws the same
    numbers. Officially each rank has one stream (SiDA's is shifted on resume).
  - Data-free runs of conditional teachers draw uniform labels (officially: the dataset's labels).
  - SiDA's first 100 kimg skip G's backward, which the official loop computes and discards.
  - FID and sample grids use per-seed generators (EDM's generate.py), not the training stream.
  - bf16 autocast, channels_last, fused Adam, compiled or checkpointed U-Net blocks are ours
    (off by default); fp32 with TF32 off and EDM's fp16 casting are the official settings.
  - SIGN is our reconstruction; L_flow in particular is a stand-in (README, SIGN).
  - EDM2: the README's EDM2 section lists where we differ from the official EDM2 scripts.
"""
import copy
import dataclasses
import math
import os
import re
import types
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import augment
import edm_nets
import toy

#----------------------------------------------------------------------------
# Identities and noise draws (SiD §3-4; EDM, Karras et al. 2022). Tweedie: a denoiser
# D(x; sigma) ~ E[x_0 | x_t = x] gives the score grad log p_sigma(x) = (D(x; sigma) - x) / sigma^2,
# so the paper's score differences are denoiser differences,
# s_phi - s_psi = (f_phi - f_psi) / sigma^2, and every loss below is written on denoiser outputs.

def sigma_from_t(t, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's rho=7 levels, t = 0 -> sigma_min and t = 1 -> sigma_max (SiD's generator schedule)."""
    a = sigma_max ** (1 / rho)
    b = sigma_min ** (1 / rho)
    return (a + (1 - t) * (b - a)) ** rho

def edm_weight(sigma, sigma_data=0.5):
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

def per_sample(x):
    """The shape [B, 1, ...] of one value per sample of x (the draws below take x's dtype too)."""
    return [x.shape[0]] + [1] * (x.dim() - 1)

def draw_sigma_generator(x, tmax):
    """G's loss levels: t ~ U(0, tmax/1000) per sample, through sigma_from_t (800: <= 24.41)."""
    return sigma_from_t(torch.rand(per_sample(x), device=x.device, dtype=x.dtype) * tmax / 1000)

def draw_sigma_fake(x, P_mean=-1.2, P_std=1.2):
    """f_psi's loss levels: EDM's lognormal ln(sigma) ~ N(P_mean, P_std^2), one per sample."""
    return (torch.randn(per_sample(x), device=x.device, dtype=x.dtype) * P_std + P_mean).exp()

SIGN_DT = 0.02  # L_flow's step in EDM's rho=7 time: sigma'/sigma = 0.84 at sigma = 2.5, 0.79 at 0.1

def flow_sigmas(t, dt=SIGN_DT):
    """L_flow's pair of levels: sigma = sigma_from_t(t), sigma' = sigma_from_t(t - dt)."""
    return sigma_from_t(t), sigma_from_t((t - dt).clamp(min=0))

def draw_sigma_flow(x, tmax, dt=SIGN_DT):
    """SIGN's L_flow levels (ours): t ~ U(dt, tmax/1000) per sample -> (sigma, sigma')."""
    u = torch.rand(per_sample(x), device=x.device, dtype=x.dtype)
    return flow_sigmas(dt + (tmax / 1000 - dt) * u, dt)

def finite_rows(*ts, keep=None):
    """[B] bool: the samples finite in every tensor (and in `keep`); the others get a zero loss.
    (Officially NaN only; an infinite value gives an infinite loss and NaN gradients anyway.)"""
    rows = torch.stack([t.flatten(1).isfinite().all(1) for t in ts]).all(0)
    return rows if keep is None else rows & keep

def finite_part(x):
    """(x with its non-finite samples zeroed, [B] bool of the finite ones), before x reaches a
    network. Dropping a sample's loss afterwards is not enough: the backward pass multiplies the
    sample's NaN activations by its zero gradient, 0 * NaN = NaN, and every weight gradient would
    be NaN (the official code drops the sample after the networks ran on it, so its gradients are
    NaN too and nan_to_num zeroes them: no update). Zeroed first, the other samples' gradients are
    those of the batch without it. No boolean indexing: no host synchronisation."""
    keep = finite_rows(x)
    return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, 0), keep

#----------------------------------------------------------------------------
# The generator (SiD §4): EDM's denoiser at sigma_init applied to z = sigma_init * eps. SIGN's
# multi-step sampling and projection re-apply it (IGN, Shocher et al., ICLR 2024).

def generate(G, z, labels, sigma_init, augment_labels=None):
    """x_g = G(z; sigma_init) with z = sigma_init * eps: one step, no clamp (SiD §4).
    augment_labels: zeros for nets built with augmentation labels (EDM's map_augment(0) = 0)."""
    sigma = z.new_full(per_sample(z), sigma_init)
    # contiguous: a channels_last net returns NHWC memory, and randn_like(x_g) would draw otherwise
    return G(z, sigma, labels, augment_labels).contiguous()

@torch.no_grad()
def multistep_sample(f, z, sigmas=(), noises=None):
    """x_1 = f(z), x_{k+1} = f(x_k + sigmas[k-1] * noises[k-1]): len(sigmas) + 1 calls of f, fresh
    noise between them (as consistency models); noises=None draws torch.randn. -> [x_1 .. x_K]."""
    xs = [f(z)]
    for k, s in enumerate(sigmas):
        eps = torch.randn_like(xs[-1]) if noises is None else noises[k]
        xs.append(f(xs[-1] + s * eps))
    return xs

@torch.no_grad()
def project(f, y, sigma=0.0, noise=None, repeat=1):
    """Projection / zero-shot editing: y <- f(y + sigma * eps_k), `repeat` times (sigma 0: f(y)).
    noise: a list of `repeat` tensors, a torch.Generator on y's device, or None."""
    for k in range(repeat):
        if sigma > 0:
            if isinstance(noise, (list, tuple)):
                eps = noise[k]
            else:
                eps = torch.randn(y.shape, generator=noise, device=y.device)
            y = y + sigma * eps
        y = f(y)
    return y

@torch.no_grad()
def sign_evaluation(f, z, x_data, sigmas, noises, noise_proj, sigma_proj=0.2, corrupted=None):
    """IGN's two properties and SIGN's uses: idempotence error E|f(f(z)) - f(z)|, fixed-point error
    E|f(x) - x| on data, multi-step samples, the projection of x_data + sigma_proj * noise_proj, and
    of other corruptions (corrupted: name -> inputs; returned as name -> (inputs, projections))."""
    def err(a, b):
        return float((a - b).flatten(1).norm(dim=1).mean())
    xs = multistep_sample(f, z, sigmas, noises)
    y = x_data + sigma_proj * noise_proj
    return dict(idem=err(f(xs[0]), xs[0]), fix=err(f(x_data), x_data), steps=xs, data=x_data,
                noisy=y, projected=project(f, y),
                corrupted={k: (v, project(f, v)) for k, v in (corrupted or {}).items()})

#----------------------------------------------------------------------------
# SiD (SiD §4, Eq. 22/23 in the official code's form) and f_psi's denoising score matching (EDM).
# Pure functions of denoiser outputs; each returns per-sample pixel sums [B], zero for samples that
# are not finite or not in `keep` (finite_part's: samples dropped before the networks ran).

@torch.no_grad()
def sid_normaliser(x_g, y_phi):
    """w = mean over pixels of |x_g - f_phi(x_t)| per sample, in float32, floored at 1e-5 (no grad).
    The TEACHER's error normalises (not f_psi's)."""
    return (x_g - y_phi).abs().float().flatten(1).mean(1).clamp_min(1e-5)

def sid_generator_loss(y_phi, y_psi, x_g, alpha, keep=None, logvar=None):
    """SiD's generator loss per sample, y_phi = f_phi(x_t), y_psi = f_psi(x_t), x_t = x_g + sigma n:
        sum_pixels (y_phi - y_psi) * ((y_phi - x_g) - alpha (y_phi - y_psi)) / w
      = sum_pixels [(y_phi - y_psi)(y_psi - x_g) + (1 - alpha)(y_phi - y_psi)^2] / w  (the paper's).
    Only w is detached: the gradient reaches x_g directly AND through x_t via both frozen networks,
    so the caller must keep x_t's graph (a DMD-style detached target is another gradient).
    logvar (EDM2 with --logvar): also divided by e^u, u = f_psi's log-variance at the sample's
    sigma (officially f_psi's, not the teacher's)."""
    keep = finite_rows(x_g, y_phi, y_psi, keep=keep)
    w = sid_normaliser(x_g, y_phi)
    diff = y_phi - y_psi
    loss = (diff * ((y_phi - x_g) - alpha * diff)).flatten(1).sum(1) / w
    if logvar is not None:
        loss = loss / logvar.flatten().exp()
    return torch.where(keep, loss, 0)

def dsm_loss(D_x, x, sigma, sigma_data=0.5, keep=None, logvar=None):
    """EDM's denoising score matching, lambda(sigma) * sum_pixels (D_x - x)^2 per sample, with
    D_x = f_psi(x + sigma n): f_psi learns the score of the images x (SiD: G's samples).
    logvar (EDM2 with --logvar): EDM2's learned uncertainty weighting (Karras et al. 2024, Config
    B, after Kendall et al. 2018), u = logvar = f_psi's log-variance head u(sigma), [B, 1, 1, 1]:
        sum_pixels [lambda(sigma) / e^u (D_x - x)^2 + u],
    u added to every pixel, as EDM2's loss; the best u is the log of the mean over pixels of
    lambda (D_x - x)^2, where the loss is that mean's log plus 1, times the pixel count."""
    err = edm_weight(sigma, sigma_data) * (D_x - x) ** 2
    if logvar is not None:
        err = err / logvar.exp() + logvar
    return torch.where(finite_rows(x, D_x, keep=keep), err.flatten(1).sum(1), 0)

#----------------------------------------------------------------------------
# SiDA (Zhou et al., ICLR 2025, §3; official sida branch, sida_loss.py). The discriminator is
# f_psi's own encoder: logits = channel mean of its last encoder feature map ([B,1,8,8] on EDM's
# U-Nets). Both BCE terms are means over the whole per-GPU micro-batch, so samples are coupled and
# the results depend on batch_gpu, as officially.

def kept_mean(values, keep):
    """The mean of `values` [B, ...] over the kept samples' elements (0 if none is kept)."""
    mask = keep.view(-1, *[1] * (values.dim() - 1)).expand_as(values)
    return torch.where(mask, values, 0).sum() / mask.sum().clamp_min(1)

def sida_discriminator_loss(logits_real, logits_fake, sigma, sigma_data=0.5, keep=None,
                            logvar=None):
    """d_b = lambda(sigma_b) * (BCE(logits_real, 1) + BCE(logits_fake, 0)) / 2, each BCE one scalar
    (the micro-batch mean over the kept samples, as officially), logits unclamped. Real and fake
    share sigma and the noise. Summed over the micro-batch, every sample's BCE gradient is scaled by
    the SUM of lambda over it. logvar (EDM2 with --logvar): d_b / e^u_b, u from f_psi's forward on
    the fakes."""
    keep = finite_rows(logits_real, logits_fake, keep=keep)
    lam = edm_weight(sigma, sigma_data).flatten().expand(len(logits_fake))
    bce = F.binary_cross_entropy_with_logits
    real = kept_mean(bce(logits_real, torch.ones_like(logits_real), reduction='none'), keep)
    fake = kept_mean(bce(logits_fake, torch.zeros_like(logits_fake), reduction='none'), keep)
    if logvar is not None:
        lam = lam / logvar.flatten().exp()
    return torch.where(keep, lam * (real + fake) / 2, 0)

def sida_generator_gan_loss(logits, x_g, y_phi, y_psi, keep=None, logvar=None):
    """gan_b = C*H*W * BCE(clamp(logits, -10, 10), 1) / w_b, the non-saturating adversarial term on
    f_psi's logits at G's x_t. The BCE is one scalar, the mean over the kept samples' logits; w_b
    and the kept samples are SiD's. The clamp zeroes the gradient beyond +-10.
    logvar (EDM2 with --logvar): gan_b / e^u_b, as SiD's term."""
    keep = finite_rows(x_g, y_phi, y_psi, logits, keep=keep)
    w = sid_normaliser(x_g, y_phi)
    if logvar is not None:
        w = w * logvar.flatten().exp()
    logits = logits.clamp(-10, 10)
    bce = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction='none')
    gan = kept_mean(bce, keep) / w * math.prod(x_g.shape[1:])
    return torch.where(keep, gan, 0)

def sida_phase(cur_nimg, warmup_kimg=100, mix_kimg=200):
    """SiDA's schedule from the images seen before this step: 'frozen' (<= warmup: only f_psi
    trains), 'sid' (<= mix: G on SiD's loss alone), then 'mix' (0.5 SiD + 0.5 adversarial)."""
    if cur_nimg > mix_kimg * 1000:
        return 'mix'
    if cur_nimg > warmup_kimg * 1000:
        return 'sid'
    return 'frozen'

#----------------------------------------------------------------------------
# SIGN (Zaman et al. 2025; our reconstruction, see README) on the frame of IGN. The student is
# time-free, f(x) = G(x; sigma_init): SiD's generator applied to any input. IGN's frozen copy
# f_bar (same weights, no parameter gradient) gives idempotence its target.

def frozen_copy(G):
    """IGN's f_theta': a deepcopy of G whose parameters need no grad; it stays differentiable in its
    input. Build it once, refresh it (refresh_frozen_) before every step, so that theta' = theta."""
    G_bar = copy.deepcopy(G).requires_grad_(False)
    for p in G_bar.parameters():
        p.grad = None  # deepcopy also copies any .grad of G
    return G_bar

@torch.no_grad()
def refresh_frozen_(G_bar, G):
    """theta' <- theta, and G's train/eval mode: the copy is the SAME function as f, dropout
    included (an eval-mode copy would be another function, and idempotence would hold for it, not
    for f)."""
    dst = list(G_bar.parameters()) + list(G_bar.buffers())
    for a, b in zip(dst, list(G.parameters()) + list(G.buffers())):
        a.copy_(b)
    G_bar.train(G.training)

def d_mse(a, b):
    """IGN's distance d(a, b): the per-sample mean squared error."""
    return (a - b).square().flatten(1).mean(1)

def idem_loss(f_bar, x_g):
    """L_idem = d(f_bar(x_g), x_g), x_g = f(z) (IGN Eq. 4): the gradient reaches theta only through
    the inner call. Through the outer call too, f would learn the identity (all points fixed)."""
    return d_mse(f_bar(x_g), x_g)

def rec_loss(f, x):
    """L_rec = d(f(x), x) on real images x: data are fixed points (IGN Eq. 3)."""
    return d_mse(f(x), x)

@torch.no_grad()
def euler_step(D, x, sigma, sigma_next):
    """One Euler step of the teacher's probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
    (EDM Eq. 3), D a function of (x, sigma)."""
    return x + (sigma_next - sigma) * (x - D(x, sigma)) / sigma

def flow_loss(f, f_bar, D_phi, x, sigma, sigma_next, noise):
    """L_flow = d(f(x_sigma), sg f_bar(x_sigma')), x_sigma = x + sigma n and x_sigma' one teacher
    Euler step down: f is constant along the teacher's PF-ODE paths and, with L_rec as boundary
    condition, maps noisy inputs to their clean end (consistency models, Song et al. 2023, in IGN's
    form). Ours: a stand-in for SIGN's L_flow, which we know only by name."""
    x_sigma = x.detach() + sigma * noise
    with torch.no_grad():
        target = f_bar(euler_step(D_phi, x_sigma, sigma, sigma_next))
    return d_mse(f(x_sigma), target)

#----------------------------------------------------------------------------
# What each method minimises, per micro-batch of G's samples x_g (with real images x_r and labels c
# where the method uses them). Each objective draws its noise (the official order), does one forward
# of each network on it, and returns (loss to backpropagate, [logged loss, logged extra term]),
# reduced as the official loop: per-sample pixel sums, summed, divided by n = images per GPU per
# iteration, times the method's scale. A non-finite sample of G is zeroed before any network and
# its loss dropped (finite_part); n stays the images per GPU, as officially when it drops a sample.
# f_psi's objective sees augmented images with their labels; G's step feeds every network zero
# augmentation labels (official; see `setup`). Logged: each term of the loss, [2].

def autocast(s):
    """bf16 autocast when the run asks for it (--precision bf16), else nothing."""
    if s.cfg.precision == 'bf16':
        return torch.autocast(s.device.type, torch.bfloat16)
    return nullcontext()

def augment_images(s, x):
    """EDM's non-leaky augmentation with its 9 labels (f_psi's step only); off: zero labels."""
    if s.pipe is None:
        return x, s.zero_aug
    return s.pipe(x)

def logged(a, b=None):
    return torch.stack([a.detach(), torch.zeros_like(a) if b is None else b.detach()])

def psi_outputs(s, net, *args, **kwargs):
    """f_psi's outputs, and u = its log-variance head's output (EDM2 with --logvar; else None).
    EDM2's networks return u last (the official SiDA order: D, logits, u)."""
    if not s.cfg.logvar:
        return net(*args, **kwargs), None
    *out, u = net(*args, **kwargs, return_logvar=True)
    return (out[0] if len(out) == 1 else tuple(out)), u

def fake_sid(s, x_g, x_r, c):
    """SiD, SIGN: f_psi learns the score of G's samples by denoising score matching."""
    x_g, keep = finite_part(x_g)
    sigma = draw_sigma_fake(x_g, s.cfg.P_mean, s.cfg.P_std)
    y, aug = augment_images(s, x_g)
    noise = torch.randn_like(x_g)
    with autocast(s):
        D_x, u = psi_outputs(s, s.psi_ddp, y + sigma * noise, sigma, c, aug)
        loss = dsm_loss(D_x, y, sigma, keep=keep, logvar=u).sum() * s.cfg.ls / s.n
    return loss, logged(loss)

def fake_sida(s, x_g, x_r, c):
    """SiDA: the same, plus the discriminator on f_psi's encoder, real x_r against fake x_g (both
    augmented, each with its own labels; the same sigma and noise; c: the real batch's labels)."""
    x_g, keep = finite_part(x_g)
    sigma = draw_sigma_fake(x_g, s.cfg.P_mean, s.cfg.P_std)
    y, aug = augment_images(s, x_g)
    noise = torch.randn_like(x_g)
    y_r, aug_r = augment_images(s, x_r)
    with autocast(s):
        (D_x, logits_fake), u = psi_outputs(s, s.psi_ddp, y + sigma * noise, sigma, c, aug,
                                            return_logits=True)
        logits_real = s.psi_ddp(y_r + sigma * noise, sigma, c, aug_r, encoder_only=True)
        keep = finite_rows(D_x, logits_fake, logits_real, keep=keep)  # one mask, as officially
        dsm = dsm_loss(D_x, y, sigma, keep=keep, logvar=u).sum() * s.cfg.ls / s.n
        d = sida_discriminator_loss(logits_real, logits_fake, sigma, keep=keep, logvar=u)
        d = d.sum() * s.cfg.lsd
        d = d / s.n
    return dsm + d, logged(dsm, d)

def G_sid(s, x_g, x_r, c):
    """SiD: the generator loss against the just-updated f_psi."""
    cfg, aug0 = s.cfg, s.zero_aug
    x_g, keep = finite_part(x_g)
    with autocast(s):
        sigma = draw_sigma_generator(x_g, cfg.tmax)
        noise = torch.randn_like(x_g)
        x_t = x_g + sigma * noise
        y_phi = s.f_phi(x_t, sigma, c, aug0)
        y_psi, u = psi_outputs(s, s.f_psi, x_t, sigma, c, aug0)
        loss = sid_generator_loss(y_phi, y_psi, x_g, cfg.alpha, keep, logvar=u)
        loss = loss.sum() * cfg.lsg / s.n
    return loss, logged(loss)

def G_sida(s, x_g, x_r, c):
    """SiDA: SiD's loss and the adversarial term from f_psi's one forward (its denoiser and its
    logits), mixed 0.5/0.5 after sida_mix_kimg."""
    cfg, aug0 = s.cfg, s.zero_aug
    x_g, keep = finite_part(x_g)
    with autocast(s):
        sigma = draw_sigma_generator(x_g, cfg.tmax)
        noise = torch.randn_like(x_g)
        x_t = x_g + sigma * noise
        y_phi = s.f_phi(x_t, sigma, c, aug0)
        (y_psi, logits), u = psi_outputs(s, s.f_psi, x_t, sigma, c, aug0, return_logits=True)
        loss = sid_generator_loss(y_phi, y_psi, x_g, cfg.alpha, keep, logvar=u)
        loss = loss.sum() * cfg.lsg / s.n
        gan = sida_generator_gan_loss(logits, x_g, y_phi, y_psi, keep, logvar=u)
        gan = gan.sum() * cfg.lsg_gan / s.n
    mix = sida_phase(s.cur_nimg, cfg.sida_warmup_kimg, cfg.sida_mix_kimg) == 'mix'
    total = 0.5 * loss + 0.5 * gan if mix else loss
    return total, logged(loss, gan)

def G_sign(s, x_g, x_r, c):
    """SIGN: SiD's loss plus IGN's idempotence, reconstruction (real x_r) and our flow term. Each
    IGN term is a pixel MEAN times D = pixels per sample, i.e. a pixel sum like SiD's, so that
    lambdas chosen on the toy (D = 2) carry over to images. A zero lambda skips its term. Data-free
    (x_r None): no L_rec, since d(f(sg f(z)), sg f(z)) would train f's OUTER call, what IGN's
    tightness term pushes against (every generated point a fixed point); L_flow then starts at
    sg x_g."""
    cfg, aug0 = s.cfg, s.zero_aug
    refresh_frozen_(s.G_bar, s.G)  # theta' = theta (G does not change between the rounds of a step)

    def f(v):
        return generate(s.G_ddp, v, c, cfg.sigma_init, aug0)

    def f_bar(v):
        return generate(s.G_bar, v, c, cfg.sigma_init, aug0)

    def D_phi(v, sigma):
        return s.f_phi(v, sigma, c, aug0)

    def kept(d):  # a term's per-sample distances, zero for dropped samples
        return torch.where(finite_rows(d[:, None], keep=keep), d, 0)

    x_g, keep = finite_part(x_g)
    with autocast(s):
        sigma = draw_sigma_generator(x_g, cfg.tmax)
        noise = torch.randn_like(x_g)
        sigma_f, sigma_f_next = draw_sigma_flow(x_g, cfg.tmax)
        noise_f = torch.randn_like(x_g)
        x_t = x_g + sigma * noise
        y_phi = s.f_phi(x_t, sigma, c, aug0)
        y_psi = s.f_psi(x_t, sigma, c, aug0)
        loss = sid_generator_loss(y_phi, y_psi, x_g, cfg.alpha, keep).sum() * cfg.lsg / s.n
        D = x_g[0].numel()
        ign = x_g.new_zeros([])
        if cfg.lambda_idem:
            ign = ign + cfg.lambda_idem * (D * kept(idem_loss(f_bar, x_g))).sum()
        if cfg.lambda_rec and x_r is not None:
            ign = ign + cfg.lambda_rec * (D * rec_loss(f, x_r)).sum()
        if cfg.lambda_flow:
            x_start = x_g.detach() if x_r is None else x_r
            flow = flow_loss(f, f_bar, D_phi, x_start, sigma_f, sigma_f_next, noise_f)
            ign = ign + cfg.lambda_flow * (D * (kept(flow) if x_r is None else flow)).sum()
        ign = ign / s.n
    return loss + ign, logged(loss, ign)

def after_psi_warmup(cfg, cur_nimg):
    """SiD, SIGN: G steps once f_psi has had psi_warmup_kimg alone (0: from the start)."""
    return cur_nimg >= cfg.psi_warmup_kimg * 1e3

def after_sida_warmup(cfg, cur_nimg):
    """SiDA: G steps after sida_warmup_kimg (SiD²A's f_psi must first learn G's samples)."""
    return sida_phase(cur_nimg, cfg.sida_warmup_kimg, cfg.sida_mix_kimg) != 'frozen'

@dataclasses.dataclass(frozen=True)
class Method:
    fake_loss: object        # f_psi's objective (s, x_g, x_r, c) -> (loss, logged [2])
    G_loss: object           # G's objective, the same signature
    G_trains: object         # (cfg, images seen) -> whether G steps in this iteration
    psi_clip: float = None   # element-wise clip of f_psi's gradients after backward (SiDA: +-1)
    extra: str = None        # the name of G's second logged term

METHODS = {
    'sid': Method(fake_loss=fake_sid, G_loss=G_sid, G_trains=after_psi_warmup),
    'sida': Method(fake_loss=fake_sida, G_loss=G_sida, G_trains=after_sida_warmup, psi_clip=1.0,
                   extra='loss_gan'),
    'sign': Method(fake_loss=fake_sid, G_loss=G_sign, G_trains=after_psi_warmup, extra='loss_ign'),
}

#----------------------------------------------------------------------------
# Configuration: one flat dataclass, units in the names, each option's range on the option. A
# dataset preset holds the official SiD hyper-parameters (main:run_sid.sh, without its known script
# bugs), a method preset SiDA's (sida:run_sida.sh); the command line overrides any field.

def opt(default, help, group='training', ge=None, gt=None, le=None, choices=None,
        resume='fixed'):
    """A Config field: its default, help, --help group, its range (>= ge or > gt, <= le) and what
    --resume may do with it: 'may change' (the maths stays: length, intervals, device, kernels,
    layout), 'fixed' (it is the maths: refused if it differs from the run's), 'fixed for sida'
    (SiDA's losses depend on it) or 'the folder' (resume, outdir). The driver's resume, --help and
    the README read this one policy."""
    meta = dict(help=help, group=group, ge=ge, gt=gt, le=le, choices=choices, resume=resume)
    return dataclasses.field(default=default, metadata=meta)

@dataclasses.dataclass
class Config:
    dataset: str = opt('toy', 'toy | toy-images | cifar10 | cifar10-cond | imagenet64 | ffhq64 | '
                       'afhqv2-64 | imagenet512-xs|s|m|l|xl|xxl (EDM2)', 'method')
    method: str = opt('sid', 'sid | sida (SiD²A with --init-generator) | sign', 'method')
    alpha: float = opt(1.2, "SiD's alpha in the generator loss", 'method', gt=0, le=2)
    sigma_init: float = opt(2.5, "the generator's input level: x_g = G(sigma_init*eps; sigma_init)",
                            'method', ge=0.002, le=80)
    tmax: float = opt(800, "G's loss levels t ~ U(0, tmax/1000) on the EDM schedule (800: sigma <= "
                      '24.41)', 'method', gt=0, le=1000)
    ls: float = opt(1.0, "multiplies f_psi's denoising loss (per image: lambda(sigma) x pixel "
                    "sum); Adam undoes a constant factor: it matters against SiDA's lsd",
                    'method', ge=0)
    lsg: float = opt(100.0, "multiplies G's SiD loss (per image: pixel sum / w); Adam undoes a "
                     "constant factor: it matters against SiDA's lsg_gan and SIGN's lambdas "
                     "(and Adam's eps, fp16's range)", 'method', ge=0)
    lsd: float = opt(1.0, "SiDA: multiplies the discriminator's BCE term in f_psi's loss (against "
                     'ls x the denoising term)', 'method', ge=0)
    lsg_gan: float = opt(0.01, "SiDA: multiplies the adversarial term in G's loss (C*H*W x BCE / "
                         'w per image, against lsg x the SiD term)', 'method', ge=0)
    psi_warmup_kimg: float = opt(0, 'SiD, SIGN: only f_psi trains until then (G waits for f_psi to '
                                 'track it)', 'method', ge=0)
    sida_warmup_kimg: float = opt(100, 'SiDA: only f_psi/D train until then', 'method', ge=0)
    sida_mix_kimg: float = opt(200, 'SiDA: pure SiD until then, then 0.5 SiD + 0.5 adversarial',
                               'method', ge=0)
    lambda_idem: float = opt(100.0, 'SIGN: idempotence weight (pixel sums, like SiD with lsg 100)',
                             'method', ge=0)
    lambda_rec: float = opt(100.0, 'SIGN: reconstruction weight (real images are fixed points)',
                            'method', ge=0)
    lambda_flow: float = opt(30.0, 'SIGN: teacher-flow consistency weight', 'method', ge=0)
    P_mean: float = opt(-1.2, "f_psi's levels: ln(sigma) ~ N(P_mean, P_std^2) (EDM; EDM2: -0.4)",
                        'method', ge=-10, le=10)
    P_std: float = opt(1.2, "f_psi's levels' spread (EDM; EDM2: 1.0)", 'method', gt=0, le=10)
    logvar: bool = opt(False, "EDM2: weight f_psi's, D's and G's losses by f_psi's learned "
                       'uncertainty e^-u(sigma) (official --return_logvar)', 'method')
    clip_psi: bool = opt(True, "SiDA: clip f_psi's gradients element-wise to +-1 (official on EDM; "
                         "EDM2's loop does not)", 'method')
    force_normalization: bool = opt(True, "EDM2: forced weight normalisation of f_psi and G in "
                                    'training (official; off in the SiDA-S recipe)', 'method')
    teacher: str = opt('', "EDM .pkl path, URL or preset name ('random': untrained, for tests)",
                       'data')
    data: str = opt('', 'real images: cifar10 | EDM .zip | folder (SiDA, SIGN; labels of '
                    'conditional runs)', 'data')
    init_generator: str = opt('', 'SiD²A: G starts from this SiD run or checkpoint (ours or '
                              'official .pkl)', 'data')
    net_overrides: str = opt('', 'JSON object of network arguments, e.g. a tiny net with --teacher '
                             'random', 'data')
    seed: int = opt(0, 'seed of every random draw', ge=0, le=2 ** 32 - 1)
    batch: int = opt(256, 'images per iteration over all GPUs (the unit of kimg)', ge=1)
    batch_gpu: int = opt(16, 'images per GPU per micro-batch (accumulation fills the rest)', ge=1,
                         resume='fixed for sida')
    lr: float = opt(1e-5, 'Adam lr of the fake score f_psi', gt=0)
    glr: float = opt(1e-5, 'Adam lr of the generator G', gt=0)
    g_beta1: float = opt(0.0, "G's Adam beta1 (f_psi's is 0)", ge=0, le=0.99)
    dropout: float = opt(0.13, 'dropout of G and f_psi (never the teacher)', ge=0, le=0.99)
    augment: float = opt(0.12, "EDM augmentation probability in f_psi's step (0: none)", ge=0, le=1)
    ema_mimg: float = opt(0.5, 'half-life of G_ema (5 %% ramp-up)', gt=0)
    duration_mimg: float = opt(500, 'training length in generator images', gt=0,
                               resume='may change')
    fast: bool = opt(False, 'GPU fast path: bf16 autocast, channels_last, fused Adam, micro-batch '
                     '>= 64 (not SiDA)', 'speed')
    # precision is fixed on resume: fp16 also sets Adam's eps (1e-6, official) and the networks'
    # casting; tf32 and bf16 round every product to ~1e-3 where fp32 rounds to ~1e-7
    precision: str = opt('fp32', 'fp32 (TF32 off, official) | tf32 | bf16 (autocast) | fp16 (EDM '
                         'per-layer casting)', 'speed', choices=('fp32', 'tf32', 'bf16', 'fp16'))
    channels_last: bool = opt(False, 'NHWC memory layout for the U-Nets (same maths)', 'speed',
                              resume='may change')
    fused_adam: bool = opt(False, "Adam's fused kernel (same update up to rounding)", 'speed',
                           resume='may change')
    compile: bool = opt(False, 'torch.compile the U-Net blocks (minutes of warm-up; README, Speed)',
                        'speed', resume='may change')
    checkpointing: bool = opt(False, 'recompute U-Net blocks in backward: less memory, ~30 %% more '
                              'compute', 'speed', resume='may change')
    device: str = opt('', "cuda | cpu ('': cuda if available)", 'speed', resume='may change')
    outdir: str = opt('', "run folder ('': a new runs/NNNNN-DATASET-METHOD)", 'output',
                      resume='the folder')
    resume: str = opt('', 'continue the run in this folder with its saved options', 'output',
                      resume='the folder')
    tick_kimg: float = opt(10, 'status line and stats.jsonl every this many kimg', 'output', gt=0,
                           resume='may change')
    snap_kimg: float = opt(500, 'snapshot, training state and sample grid every this many kimg',
                           'output', gt=0, resume='may change')
    fid_every_kimg: float = opt(0, 'FID of G_ema every this many kimg (0: off)', 'output', ge=0,
                                resume='may change')
    fid_num: int = opt(50000, 'images per FID', 'output', ge=2)
    fid_ref: str = opt('', "FID reference .npz (EDM2's: .pkl) or preset ('': the dataset's)",
                       'output')
    vae: str = opt('', "EDM2: the VAE to pixels ('': stabilityai/sd-vae-ft-mse; a folder, a "
                   "Hugging Face name; 'random': a tiny untrained one, for checks)", 'output',
                   resume='may change')  # it only decodes grids and FID's images

FAST = dict(precision='bf16', channels_last=True, fused_adam=True)  # eager (README, Speed)
C10 = dict(teacher='cifar10-32x32-uncond-vp', fid_ref='cifar10-32x32', batch=256, batch_gpu=16,
           lr=1e-5, glr=1e-5, dropout=0.13, augment=0.12, ema_mimg=0.5, tick_kimg=10, snap_kimg=500)
P64 = dict(batch=512, batch_gpu=32, lr=1e-5, glr=1e-5, dropout=0.05, augment=0.15, precision='fp16',
           tick_kimg=10, snap_kimg=500)
IMG512 = dict(alpha=1.0, batch=2048, lr=5e-5, glr=5e-5, augment=0.0, ema_mimg=2, precision='fp16',
              duration_mimg=200, tick_kimg=10, snap_kimg=500, fid_ref='img512', P_mean=-0.4,
              P_std=1.0, logvar=True, clip_psi=False)
PRESETS = {  # SiD, official run_sid.sh; the toys' (toy.py says why)
    'toy': dict(alpha=1.2, lr=1e-3, glr=1e-3, batch=512, batch_gpu=512, dropout=0.0, augment=0.0,
                ema_mimg=0.03, duration_mimg=0.3, tick_kimg=30, snap_kimg=300, device='cpu'),
    'toy-images': dict(alpha=1.0, lr=3e-3, glr=3e-5, batch=8, batch_gpu=8, dropout=0.0, augment=0.0,
                       psi_warmup_kimg=0.5, ema_mimg=0.001, duration_mimg=0.01, tick_kimg=1,
                       snap_kimg=10, device='cpu'),
    'cifar10': dict(C10, duration_mimg=500),
    'cifar10-cond': dict(C10, teacher='cifar10-32x32-cond-vp', duration_mimg=800),
    'imagenet64': dict(teacher='imagenet-64x64-cond-adm', fid_ref='imagenet-64x64', batch=8192,
                       batch_gpu=16, lr=4e-6, glr=4e-6, dropout=0.10, augment=0.0, ema_mimg=2,
                       precision='fp16', duration_mimg=1000, tick_kimg=20, snap_kimg=1000),
    'ffhq64': dict(P64, teacher='ffhq-64x64-uncond-vp', fid_ref='ffhq-64x64', g_beta1=0.9,
                   duration_mimg=500),
    'afhqv2-64': dict(P64, teacher='afhqv2-64x64-uncond-vp', fid_ref='afhqv2-64x64', alpha=1.0,
                      lr=5e-6, glr=5e-6, duration_mimg=500),
    # EDM2, ImageNet 512x512 in SD-VAE latents (sida branch, run_sid_edm2.sh): the loss and loop
    # differences from EDM are the fields P_mean, P_std, logvar and clip_psi (README, EDM2)
    'imagenet512-xs': dict(IMG512, teacher='edm2-img512-xs', batch_gpu=64, dropout=0.0),
    'imagenet512-s': dict(IMG512, teacher='edm2-img512-s', batch_gpu=64, dropout=0.0),
    'imagenet512-m': dict(IMG512, teacher='edm2-img512-m', batch_gpu=32, dropout=0.1),
    'imagenet512-l': dict(IMG512, teacher='edm2-img512-l', batch_gpu=32, dropout=0.1),
    'imagenet512-xl': dict(IMG512, teacher='edm2-img512-xl', batch_gpu=16, dropout=0.1),
    'imagenet512-xxl': dict(IMG512, teacher='edm2-img512-xxl', batch_gpu=2, dropout=0.1,
                            duration_mimg=100),
}
SIDA_64 = dict(alpha=1.0, batch_gpu=64, duration_mimg=200)
METHOD_PRESETS = {  # SiDA, official run_sida.sh: alpha 1, larger micro-batches; SiD²A 100 Mimg
    'sida': {'cifar10': dict(alpha=1.0, batch_gpu=32, data='cifar10', duration_mimg=300),
             'cifar10-cond': dict(alpha=1.0, batch_gpu=32, data='cifar10', duration_mimg=300),
             'imagenet64': dict(alpha=1.0, batch_gpu=32, duration_mimg=300),
             'ffhq64': dict(SIDA_64, g_beta1=0.0),
             'afhqv2-64': dict(SIDA_64),
             'toy': dict(alpha=1.0, sida_warmup_kimg=5, sida_mix_kimg=10, lsg_gan=2.0),  # README
             'toy-images': dict(alpha=1.0, sida_warmup_kimg=1, sida_mix_kimg=2, lsg_gan=2.0,
                                duration_mimg=0.006)},
    'sign': {'toy-images': dict(duration_mimg=0.005)},  # a SIGN step costs ~2 SiD steps
}
METHOD_PRESETS['sida'].update({  # EDM2: run_sida_edm2.sh (S without forced WN and logvar)
    'imagenet512-xs': dict(lsd=100.0),
    'imagenet512-s': dict(lsd=100.0, force_normalization=False, logvar=False),
    'imagenet512-m': dict(lsd=100.0),
    'imagenet512-l': dict(lsd=100.0),
    'imagenet512-xl': dict(lsd=100.0),
    'imagenet512-xxl': dict(lsd=100.0),
})
SID2A_PRESETS = {  # SiD²A on EDM2, run_sid_sida_edm2.sh (from the size's SiD generator)
    'imagenet512-xs': dict(duration_mimg=30),
    'imagenet512-s': dict(duration_mimg=80),
    'imagenet512-m': dict(duration_mimg=200, lsg=50.0),
    'imagenet512-l': dict(duration_mimg=55),
    'imagenet512-xl': dict(duration_mimg=50),
    'imagenet512-xxl': dict(duration_mimg=30),
}

def preset(dataset='toy', method='sid', init_generator='', fast=False):
    """The resolved defaults of a dataset and a method (SiD²A: --init-generator; --fast)."""
    if dataset not in PRESETS or method not in METHODS:
        raise ValueError(f"unknown --dataset '{dataset}' or --method '{method}' (datasets: "
                         f"{', '.join(PRESETS)}; methods: {', '.join(METHODS)})")
    p = dict(PRESETS[dataset], dataset=dataset, method=method)
    p.update(METHOD_PRESETS.get(method, {}).get(dataset, {}))
    if method == 'sida' and init_generator and dataset not in toy.WORLDS:
        p['duration_mimg'] = 100  # SiD²A
        p.update(SID2A_PRESETS.get(dataset, {}))
    if fast:
        p.update(FAST, fast=True)
        if method != 'sida':  # SiD's and SIGN's maths do not depend on the micro-batch; SiDA's does
            p['batch_gpu'] = max(p['batch_gpu'], 64)  # launch-bound below 64 (README, Speed)
    return p

def make_config(overrides):
    """Defaults <- presets (dataset, method, --fast) <- overrides (None: not given); checked, each
    override before the presets read it (a file's values too: a resumed run's config.json)."""
    over = {k: check_option(k, v) for k, v in overrides.items() if v is not None}
    keys = ('dataset', 'method', 'init_generator', 'fast')
    defaults = preset(**{k: over[k] for k in keys if k in over})
    cfg = Config(**{**defaults, **over})
    check_config(cfg)
    return cfg

def check_option(name, v):
    """One option's value against its Config field: known, of its type (a switch: a bool or 0/1;
    an int: an int; a float: an int or float; text: a str) and in its range -> the value."""
    f = Config.__dataclass_fields__.get(name)
    flag = '--' + str(name).replace('_', '-')
    if f is None:
        raise ValueError(f'unknown option {flag[:60]}')
    m = f.metadata
    if f.type is bool:
        if type(v) not in (bool, int) or v not in (0, 1):
            raise ValueError(f'{flag} is a switch (0 or 1), got {shown(v)}')
        return bool(v)
    if f.type in (int, float):
        ok = type(v) in (int, f.type) and math.isfinite(v)
        low = ok and (m['ge'] is None or v >= m['ge']) and (m['gt'] is None or v > m['gt'])
        if not (low and (m['le'] is None or v <= m['le'])):
            raise ValueError(f'{flag} must be a finite {f.type.__name__} {range_text(m)}, '
                             f'got {shown(v)}')
        return v
    if not isinstance(v, str):
        raise ValueError(f'{flag} must be text, got {shown(v)}')
    if m['choices'] and v not in m['choices']:
        raise ValueError(f"unknown {flag} {shown(v)} (one of {', '.join(m['choices'])})")
    return v

def shown(v):
    """A value as an error message shows it: its repr, at most 60 characters."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + '...'

def check_config(cfg):
    """Each option against its field, then the combinations; a ValueError names the first bad."""
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, check_option(f.name, getattr(cfg, f.name)))
    if not re.fullmatch(r'(cpu|cuda(:\d+)?)?', cfg.device):
        raise ValueError(f"--device must be cpu or cuda, got '{cfg.device}'")
    if cfg.device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {cfg.device}: no CUDA here')
    if cfg.dataset in toy.WORLDS and (cfg.data or cfg.fid_every_kimg or cfg.teacher
                                      or cfg.net_overrides):
        raise ValueError('--data, --teacher, --net-overrides and --fid-every-kimg do not apply to '
                         'the toy (its teacher is exact)')
    if edm2_dataset(cfg.dataset) and cfg.augment:
        raise ValueError('--augment: EDM2 networks take no augmentation labels (official: none); '
                         'use --augment 0')
    if edm2_dataset(cfg.dataset) and cfg.method == 'sign':
        raise ValueError('--method sign is not wired for EDM2 latents (its IGN terms and '
                         'projection work on pixels): use sid or sida')

def edm2_dataset(dataset):
    """Whether a dataset preset distils an EDM2 teacher (latents, EDM2's losses and loop)."""
    teacher = edm_nets.PRESETS.get(PRESETS.get(dataset, {}).get('teacher'))
    return teacher is not None and teacher['kwargs'].get('model_type') == 'EDM2UNet'

def range_text(m):
    """'in (0, 2]', '>= 1', '> 0' from an option's metadata."""
    lo = f"[{m['ge']}" if m['ge'] is not None else f"({m['gt']}" if m['gt'] is not None else None
    if lo is not None and m['le'] is not None:
        return f"in {lo}, {m['le']}]"
    if lo is not None:
        return ('>= ' if lo[0] == '[' else '> ') + lo[1:]
    return f"<= {m['le']}" if m['le'] is not None else ''

#----------------------------------------------------------------------------
# Set-up (SiD §4): teacher f_phi, fake score f_psi and generator G all start from the teacher's
# weights; G and f_psi are rebuilt with the run's dropout and precision. The loop's state is
# declared once, in `State`; the driver (runs.py) loads files and passes networks and data in.

def init_processes(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on CPUs; a caller's process
    group is left alone. -> the processes' fields of State (the micro-batch: at most batch / GPUs,
    as the official code)."""
    import torch.distributed as dist
    rank = int(os.environ.get('RANK', 0))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if cfg.dataset in toy.WORLDS:
        device = torch.device('cpu')
    else:
        device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    own_group = world_size > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    batch_gpu = min(cfg.batch_gpu, cfg.batch // world_size)
    if batch_gpu < 1 or cfg.batch % (batch_gpu * world_size):
        raise ValueError(f'--batch {cfg.batch} must be a multiple of --batch-gpu {batch_gpu} x '
                         f'{world_size} GPU(s)')
    n = cfg.batch // world_size
    return dict(rank=rank, world_size=world_size, device=device, own_group=own_group,
                batch_gpu=batch_gpu, n=n, rounds=n // batch_gpu)

def build_networks(cfg, teacher, device, overrides=None, G_state=None):
    """-> (f_phi frozen in eval mode, G, f_psi). teacher: an EDM network (loaded by the driver)
    whose arguments, with `overrides`, rebuild all three; or a toy world (its exact teacher and a
    small net fitted to it). G_state (SiD²A): G's weights from a SiD generator; f_psi stays the
    teacher."""
    if isinstance(teacher, toy.World):
        f_phi, G = teacher.teacher, teacher.student(cfg.dropout)
    elif teacher.init_kwargs.get('model_type') == 'EDM2UNet':
        return build_edm2_networks(cfg, teacher, device, overrides, G_state)
    else:
        kw = dict(teacher.init_kwargs, **(overrides or {}), use_fp16=cfg.precision == 'fp16')
        f_phi = edm_nets.EDMPrecond(**dict(kw, dropout=0.0))
        G = edm_nets.EDMPrecond(**dict(kw, dropout=cfg.dropout))
        for net in (f_phi, G):
            net.load_state_dict(teacher.state_dict())
    f_psi = copy.deepcopy(G)
    if G_state is not None:
        G.load_state_dict(G_state)
    return f_phi.to(device).eval().requires_grad_(False), G.to(device), f_psi.to(device)

def build_edm2_networks(cfg, teacher, device, overrides=None, G_state=None):
    """EDM2 (sida branch, sida_edm2_train.py): f_phi is the teacher; G its U-Net alone, without
    the log-variance head (EDM_2_Precond_Generator), from the teacher's unet.* weights; f_psi the
    teacher, with its head when --logvar. G and f_psi get the run's dropout and forced weight
    normalisation."""
    kw = dict(teacher.init_kwargs, **(overrides or {}), use_fp16=cfg.precision == 'fp16',
              force_normalization=cfg.force_normalization)
    if cfg.augment:
        raise ValueError('--augment: EDM2 networks take no augmentation labels; use --augment 0')
    if cfg.logvar and not kw['logvar_channels']:
        raise ValueError('--logvar: this teacher has no log-variance head (logvar_channels 0); '
                         'use --no-logvar')
    f_phi = edm_nets.EDM2Precond(**dict(kw, dropout=0.0))
    G = edm_nets.EDM2Precond(**dict(kw, dropout=cfg.dropout, logvar_channels=0))
    psi_head = kw['logvar_channels'] if cfg.logvar else 0
    f_psi = edm_nets.EDM2Precond(**dict(kw, dropout=cfg.dropout, logvar_channels=psi_head))
    weights = teacher.state_dict()
    for net in (f_phi, G, f_psi):
        net.load_state_dict({k: weights[k] for k in net.state_dict()})
    if G_state is not None:
        G.load_state_dict(G_state)
    return f_phi.to(device).eval().requires_grad_(False), G.to(device), f_psi.to(device)

@dataclasses.dataclass
class State:
    """Everything SiD's Algorithm 1 reads and changes, in one place (setup builds it)."""
    cfg: Config            # the run's options
    rank: int              # this process's index among world_size (torchrun's RANK; 0 alone)
    world_size: int        # processes, one per GPU
    device: torch.device   # where this process's networks live
    own_group: bool        # whether init_processes created the process group (the driver ends it)
    batch_gpu: int         # images per micro-batch
    n: int                 # images per step on this process (batch / world_size): losses' divisor
    rounds: int            # micro-batches per step (gradient accumulation)
    f_phi: torch.nn.Module  # the teacher, frozen, in eval mode
    G: torch.nn.Module     # the generator
    f_psi: torch.nn.Module  # the fake score; SiDA: also the discriminator (its encoder)
    G_ema: torch.nn.Module  # EMA of G: what is sampled, scored and saved
    G_bar: object          # SIGN: IGN's frozen copy of G, refreshed every step; else None
    G_ddp: torch.nn.Module  # G in DistributedDataParallel (G itself in one process)
    psi_ddp: torch.nn.Module  # f_psi in DistributedDataParallel (f_psi itself in one process)
    opt_G: torch.optim.Optimizer    # G's Adam
    opt_psi: torch.optim.Optimizer  # f_psi's Adam
    pipe: object           # EDM's AugmentPipe for f_psi's inputs; None: no augmentation
    zero_aug: object       # [batch_gpu, augment_dim] zeros: "not augmented"; None: nets without
    end_nimg: int          # the run ends when cur_nimg reaches it
    cur_nimg: int = 0      # generator images seen: batch per iteration (kimg counts these)
    data: object = None    # endless (real images, labels) micro-batches; None: data-free
    data_batches: int = 0  # micro-batches drawn from `data` (its position, for resume)

def setup(cfg, nets, procs=None):
    """The loop's State from the run's options and networks (f_phi, G, f_psi); procs:
    init_processes' fields (one process by default). Data and resume are the driver's: it sets
    `data` and `cur_nimg`."""
    procs = procs or init_processes(cfg)
    device = procs['device']
    torch.backends.cuda.matmul.allow_tf32 = cfg.precision == 'tf32'  # official: TF32 off
    torch.backends.cudnn.allow_tf32 = cfg.precision == 'tf32'
    torch.backends.cudnn.benchmark = True  # official default: cuDNN times its algorithms per shape
    f_phi, G, f_psi = nets
    if cfg.channels_last and G.img_resolution:  # before DDP, whose buckets copy the layout
        for net in (f_phi, G, f_psi):
            net.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    G_bar = frozen_copy(G) if cfg.method == 'sign' else None
    pipe = None
    if cfg.augment > 0 and G.img_resolution:
        pipe = augment.edm_pipe(cfg.augment)
    # G (and the teacher and f_psi in G's step) always get zero augmentation labels, as officially:
    # map_augment(0) = 0 leaves their outputs as they are, and under DDP every parameter then gets
    # a gradient (a zero one), so no parameter has to be excluded from DDP's all-reduce.
    aug_dim = getattr(G, 'init_kwargs', {}).get('augment_dim', 0)
    zero_aug = torch.zeros(procs['batch_gpu'], aug_dim, device=device) if aug_dim else None
    eps = 1e-6 if cfg.precision == 'fp16' else 1e-8  # official
    fused = True if cfg.fused_adam else None
    opt_psi = torch.optim.Adam(f_psi.parameters(), lr=cfg.lr, betas=(0.0, 0.999), eps=eps,
                               fused=fused)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.glr, betas=(cfg.g_beta1, 0.999), eps=eps,
                             fused=fused)
    for net in (f_phi, G, f_psi):  # after every deepcopy of G: a copy would share the patched call
        if cfg.checkpointing:
            edm_nets.checkpoint_blocks(net)
        if cfg.compile and net.img_resolution:  # regional: each U-Net block; same state_dict names
            edm_nets.compile_blocks(net)
        elif cfg.compile:  # compiled dropout draws other masks, from the same law
            net.compile()
    G_ddp = ddp(G, device, procs['world_size'])
    psi_ddp = ddp(f_psi, device, procs['world_size'])
    return State(cfg=cfg, **procs, f_phi=f_phi, G=G, f_psi=f_psi, G_ema=G_ema, G_bar=G_bar,
                 G_ddp=G_ddp, psi_ddp=psi_ddp, opt_G=opt_G, opt_psi=opt_psi, pipe=pipe,
                 zero_aug=zero_aug, end_nimg=int(cfg.duration_mimg * 1e6))

def ddp(net, device, world_size):
    """G or f_psi (not the frozen teacher) in DistributedDataParallel, as officially without buffer
    broadcast. Only gradients are averaged: batch statistics (SiDA's micro-batch BCE means) stay
    per rank, as officially."""
    if world_size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device] if device.type == 'cuda' else None
    return DDP(net, device_ids=ids, broadcast_buffers=False)

#----------------------------------------------------------------------------
# The training loop (SiD Algorithm 1, the official update order). Progress is counted in generator
# images (kimg). A generator: after each iteration it yields the images seen and the logged losses,
# and the caller (the driver, a test, a notebook) logs and saves.

def iterate(s):
    """Algorithm 1 until s.cur_nimg reaches s.end_nimg; yields after every iteration."""
    method = METHODS[s.cfg.method]
    while s.cur_nimg < s.end_nimg:
        # 1. f_psi learns the score of G's current samples: G makes them without a graph and with
        #    dropout off; f_psi trains with dropout on, on augmented images (SiDA: plus its
        #    discriminator term on real images).
        s.G.eval()
        s.f_psi.train().requires_grad_(True)
        clip = method.psi_clip if s.cfg.clip_psi else None
        fake = accumulate(s, 1, s.psi_ddp, s.opt_psi, method.fake_loss, clip)
        # 2. G learns against the updated f_psi, with dropout on; f_psi and the teacher are frozen
        #    in eval mode but differentiated in their input x_t (only w is detached in SiD's loss).
        gen = torch.zeros_like(fake)
        if method.G_trains(s.cfg, s.cur_nimg):
            s.G.train()
            s.f_psi.eval().requires_grad_(False)
            gen = accumulate(s, 2, s.G_ddp, s.opt_G, method.G_loss)
        # 3. The EMA of G; the iteration counts `batch` generator images.
        update_ema(s.G_ema, s.G, s.cfg, s.cur_nimg)
        s.cur_nimg += s.cfg.batch
        # Logged: this process's whole loss of each step (the micro-batches' sum; f_psi's terms
        # added), and `last`, the terms of its last micro-batch (what the official loops print).
        yield types.SimpleNamespace(cur_nimg=s.cur_nimg, loss_fake=fake[0].sum(), loss_G=gen[0, 0],
                                    loss_extra=gen[0, 1], last=torch.cat([fake[1], gen[1]]))

def accumulate(s, phase, net, opt, objective, clip=None):
    """One Adam step of `net` on the whole batch: rounds of batch_gpu images per process, gradients
    summed, DDP's all-reduce on the last round only. -> the objective's two logged terms [2, 2]:
    summed over the rounds, and of the last round."""
    cfg = s.cfg
    opt.zero_grad(set_to_none=True)
    logs = torch.zeros(2, 2, dtype=torch.float64, device=s.device)
    for r in range(s.rounds):
        reseed(s, phase, r)
        last = r == s.rounds - 1
        # a round's forward AND backward sit in one sync context (the official Feb 2025 fix)
        with net.no_sync() if s.world_size > 1 and not last else nullcontext():
            x_r, c = next_batch(s)
            z = cfg.sigma_init * torch.randn([s.batch_gpu, *s.G.img_shape], device=s.device)
            # G's samples carry a graph in G's own step only
            with torch.set_grad_enabled(phase == 2), autocast(s):
                G = s.G_ddp if phase == 2 else s.G
                x_g = generate(G, z, c, cfg.sigma_init, s.zero_aug).float()
            loss, log = objective(s, x_g, x_r, c)
            loss.backward()
            logs[0] += log
            logs[1] = log
    sanitize_grads_(net.parameters(), clip)
    opt.step()
    return logs

def reseed(s, phase, r):
    """A micro-batch's random numbers are a function of (seed, iteration, phase, global micro-batch
    index rank * rounds + r): per-rank streams, exact replay on resume, and the same numbers for any
    split of the batch into GPUs x rounds."""
    key = [s.cfg.seed, s.cur_nimg // s.cfg.batch, phase, s.rank * s.rounds + r]
    torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))

def next_batch(s):
    """(real images or None, labels or None) for one micro-batch; data-free conditional runs draw
    uniform one-hot labels, or the classes of a labels file."""
    if s.data is not None:
        s.data_batches += 1
        x_r, c = next(s.data)
        if x_r is not None:  # None: a labels file (data-free runs with the data's classes)
            x_r = x_r.to(s.device, non_blocking=True)
        return x_r, (c.to(s.device) if s.G.label_dim else None)
    L = s.G.label_dim
    if not L:
        return None, None
    return None, F.one_hot(torch.randint(L, (s.batch_gpu,), device=s.device), L).float()

def sanitize_grads_(params, clip_value=None):
    """As the official loops: NaN -> 0, +-inf -> +-1e5; SiDA also clips f_psi's gradients
    element-wise to +-1 (clip_grad_value_, not a norm clip)."""
    params = list(params)  # a generator would be spent by the first pass
    for p in params:
        if p.grad is not None:
            p.grad.nan_to_num_(nan=0.0, posinf=1e5, neginf=-1e5)
    if clip_value is not None:
        torch.nn.utils.clip_grad_value_(params, clip_value)

@torch.no_grad()
def update_ema(G_ema, G, cfg, cur_nimg):
    """G_ema <- beta G_ema + (1 - beta) G, beta = 0.5^(batch / h), half-life h = min(ema_mimg,
    5 % of the images seen before this step): a ramp-up from beta = 0 (official)."""
    beta = 0.5 ** (cfg.batch / max(min(cfg.ema_mimg * 1e6, 0.05 * cur_nimg), 1e-8))
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.copy_(torch.lerp(p.detach(), p_ema, beta))

if __name__ == '__main__':  # `python sid.py ...`: the run driver parses the command line
    import runs
    runs.main()
