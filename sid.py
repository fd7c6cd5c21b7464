"""sid: Score identity Distillation (SiD), SiDA/SiD²A and SIGN in one readable file (examples: python sid.py --help).

Reading order: identities -> SiD losses -> SiDA -> SIGN -> the three methods as objectives -> configuration ->
the training loop (SiD Algorithm 1) -> command line. Papers: SiD, Zhou et al., ICML 2024 (arXiv 2404.04057);
SiDA, Zhou et al., ICLR 2025 (arXiv 2410.14919); SIGN, Zaman et al. 2025 (arXiv 2509.21470; no public code,
our reconstruction is documented in README). Official code: github.com/mingyuanzhou/SiD.
"""
import argparse, collections, copy, dataclasses, json, math, os, re, sys, types
from contextlib import nullcontext
import numpy as np
import torch
import torch.nn.functional as F

import augment, checkpoints, data, edm_nets, fid, runs, toy
from runs import generate

#----------------------------------------------------------------------------
# Identities and noise levels (SiD §3-4). Tweedie: a denoiser D(x; sigma) ~ E[x_0 | x_t = x] gives the score
# s(x; sigma) = grad log p_sigma(x) = (D(x; sigma) - x) / sigma^2, so the paper's score differences are denoiser
# differences, s_phi - s_psi = (f_phi - f_psi) / sigma^2, and every loss below is written with denoisers.

def sigma_from_t(t, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's rho=7 noise levels with t=0 -> sigma_min and t=1 -> sigma_max (SiD's generator schedule)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + (1 - t) * (b - a)) ** rho

def edm_weight(sigma, sigma_data=0.5):
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (Karras et al. 2022)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

def draw_sigma_generator(x, tmax):
    """Generator-loss levels: t ~ U(0, tmax/1000) per sample through sigma_from_t (tmax=800: sigma <= 24.41)."""
    return sigma_from_t(torch.rand([x.shape[0]] + [1] * (x.dim() - 1), device=x.device) * tmax / 1000)

def draw_sigma_fake(x, P_mean=-1.2, P_std=1.2):
    """Fake-score levels: EDM's lognormal ln(sigma) ~ N(P_mean, P_std^2), one per sample."""
    return (torch.randn([x.shape[0]] + [1] * (x.dim() - 1), device=x.device) * P_std + P_mean).exp()

def finite_rows(*ts):
    """Samples without NaN in any tensor. The official code drops the others; we give them a zero loss instead:
    the same sums, without the host synchronisation that boolean indexing costs on a GPU."""
    return torch.stack([~t.flatten(1).isnan().any(1) for t in ts]).all(0)

#----------------------------------------------------------------------------
# SiD losses (SiD Eq. 22/23 in the official code's form; EDM denoising score matching for f_psi). Pure functions:
# sigma and noise are arguments. Each returns per-sample pixel sums [B]; the objectives below reduce them.

def sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, labels, alpha, with_logits=False):
    """SiD generator loss per sample, with x_t = x_g + sigma*noise and w = mean|x_g - f_phi| (no grad):
        sum_pixels (f_phi - f_psi) * ((f_phi - x_g) - alpha*(f_phi - f_psi)) / w
      = sum_pixels [(f_phi - f_psi)(f_psi - x_g) + (1 - alpha)(f_phi - f_psi)^2] / w   (the paper's form).
    Only w is detached: the gradient reaches x_g directly AND through x_t via both frozen networks (a DMD-style
    detached target is another gradient). with_logits (SiDA): f_psi's one forward also returns its encoder
    logits; then returns (loss, logits, w, kept rows)."""
    x_t = x_g + sigma * noise
    y_phi = f_phi(x_t, sigma, labels)
    y_psi, logits = f_psi(x_t, sigma, labels, return_logits=True) if with_logits else (f_psi(x_t, sigma, labels), None)
    keep = finite_rows(x_g, y_phi, y_psi)
    with torch.no_grad():  # the normaliser uses the teacher, in float32, floored at 1e-5
        w = (x_g - y_phi).abs().float().flatten(1).mean(1).clamp_min(1e-5)
    diff = y_phi - y_psi
    loss = torch.where(keep, (diff * ((y_phi - x_g) - alpha * diff)).flatten(1).sum(1) / w, 0)
    return (loss, logits, w, keep) if with_logits else loss

def fake_score_loss(f_psi, x_g, sigma, noise, labels, augment_labels=None, sigma_data=0.5):
    """EDM denoising score matching on generated images: lambda(sigma) sum_pixels (f_psi(x_g + sigma*noise) - x_g)^2."""
    x_g = x_g.detach()
    return dsm_loss(f_psi(x_g + sigma * noise, sigma, labels, augment_labels), x_g, sigma, sigma_data)

def dsm_loss(D_x, x_g, sigma, sigma_data=0.5):
    """lambda(sigma) * sum_pixels (D_x - x_g)^2 per sample, zero for NaN samples (SiD's and SiDA's f_psi)."""
    loss = (edm_weight(sigma, sigma_data) * (D_x - x_g) ** 2).flatten(1).sum(1)
    return torch.where(finite_rows(x_g, D_x), loss, 0)

#----------------------------------------------------------------------------
# SiDA (Zhou et al., ICLR 2025, §3; official sida branch, sida_loss.py). The discriminator is f_psi's own encoder:
# logits = channel mean of its last encoder feature map, [B,1,8,8] on the EDM U-Nets. Both BCE terms are means
# over the whole per-GPU micro-batch, so samples are coupled and results depend on batch_gpu, as officially.

def sida_fake_score_loss(f_psi, x_g, x_r, sigma, noise, labels, aug_labels_g=None, aug_labels_r=None, sigma_data=0.5):
    """Per-sample (dsm [B], d_loss [B]) on generated x_g (detached) and real x_r, each already augmented. sigma
    (lognormal) and noise are SHARED by both branches; labels are the real batch's (x_g was made with them).
        dsm_b    = lambda(sigma_b) * sum_pixels (f_psi(x_g + sigma*noise) - x_g)^2
        d_loss_b = lambda(sigma_b) * (BCE(logits_real, 1) + BCE(logits_fake, 0)) / 2, logits unclamped.
    The loop's (dsm.sum() + lsd * d_loss.sum()) / n scales every sample's BCE gradient by the micro-batch sum of
    lambda, and clips f_psi's gradients element-wise to +-1 after backward."""
    x_g = x_g.detach()
    D_x, logits_fake = f_psi(x_g + sigma * noise, sigma, labels, aug_labels_g, return_logits=True)  # one forward
    logits_real = f_psi(x_r + sigma * noise, sigma, labels, aug_labels_r, encoder_only=True)       # encoder only
    lam = edm_weight(sigma, sigma_data).flatten().expand(len(x_g))
    bce = F.binary_cross_entropy_with_logits
    d_loss = lam * (bce(logits_real, torch.ones_like(logits_real)) + bce(logits_fake, torch.zeros_like(logits_fake))) / 2
    return dsm_loss(D_x, x_g, sigma, sigma_data), d_loss

def sida_generator_loss(f_phi, f_psi, x_g, sigma, noise, labels, alpha):
    """Per-sample (sid [B], gan [B]) on x_t = x_g + sigma*noise (sigma from the SiD tmax schedule):
        sid_b = sid_generator_loss (same x_t, same single f_psi forward, which also gives the logits)
        gan_b = C*H*W * BCE(clamp(logits, -10, 10), 1) / w_b,
    the BCE one scalar: the mean over the micro-batch's kept samples (B x 1 x 8 x 8). The clamp zeroes the gradient
    beyond +-10. Each logit's gradient thus scales with the micro-batch sum of 1/w_b."""
    sid, logits, w, keep = sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, labels, alpha, with_logits=True)
    logits = logits.clamp(-10, 10)
    bce = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction='none')
    mask = keep.view(-1, *[1] * (bce.dim() - 1)).expand_as(bce)
    gan = torch.where(mask, bce, 0).sum() / mask.sum() / w * math.prod(x_g.shape[1:])
    return sid, torch.where(keep, gan, 0)

def sida_phase(cur_nimg, warmup_kimg=100, mix_kimg=200):
    """SiDA's generator schedule, from the images seen before this step: 'frozen' (<= 100 kimg: only f_psi/D train),
    'sid' (<= 200 kimg: G on SiD's loss alone), then 'mix' (0.5 SiD + 0.5 adversarial). The EMA updates always."""
    return 'mix' if cur_nimg > mix_kimg * 1000 else 'sid' if cur_nimg > warmup_kimg * 1000 else 'frozen'

#----------------------------------------------------------------------------
# SIGN (Zaman et al. 2025; our reconstruction, see README) on the frame of IGN (Shocher et al., ICLR 2024).
# The student is time-free, f_theta(x) = G_theta(x; sigma_c): SiD's generator applied to any input.
# IGN's frozen copy f_theta' (same weights, no parameter gradient) gives idempotence its target.

def frozen_copy(G):
    """IGN's f_theta': a deepcopy of G whose parameters need no grad; it stays differentiable w.r.t. its input.
    Build it once, refresh it (refresh_frozen_) before every student step so that theta' = theta."""
    G_bar = copy.deepcopy(G).requires_grad_(False)
    for p in G_bar.parameters():
        p.grad = None  # deepcopy also copies any .grad of G
    return G_bar

@torch.no_grad()
def refresh_frozen_(G_bar, G):
    """theta' <- theta, and G's train/eval mode: IGN's copy is the SAME function as f, so it applies dropout when G
    does (an eval-mode copy would be another function, and idempotence would hold for it, not for f)."""
    torch._foreach_copy_(list(G_bar.parameters()) + list(G_bar.buffers()), list(G.parameters()) + list(G.buffers()))
    G_bar.train(G.training)

def d_mse(a, b):
    """IGN's distance d(a, b): per-sample mean squared error."""
    return (a - b).square().flatten(1).mean(1)

def idem_loss(f_bar, x_g):
    """L_idem = d(f_theta'(x_g), x_g) with x_g = f_theta(z) (IGN Eq. 4): the gradient reaches theta only through the
    inner call. Through the outer call too, f would learn the identity (every point a fixed point)."""
    return d_mse(f_bar(x_g), x_g)

def rec_loss(f, x):
    """L_rec = d(f_theta(x), x): real images are fixed points (IGN Eq. 3)."""
    return d_mse(f(x), x)

@torch.no_grad()
def euler_step(f_phi, x, sigma, sigma_next, labels=None):
    """One Euler step of the teacher's probability-flow ODE dx/dsigma = (x - f_phi(x; sigma))/sigma (EDM Eq. 3)."""
    return x + (sigma_next - sigma) * (x - f_phi(x, sigma, labels)) / sigma

SIGN_DT = 0.02  # L_flow's step in EDM's rho=7 time: sigma'/sigma = 0.84 at sigma = 2.5, 0.79 at 0.1

def flow_sigmas(t, dt=SIGN_DT):
    """L_flow's levels sigma = sigma_from_t(t), sigma' = sigma_from_t(t - dt); draw t ~ U(dt, tmax/1000)."""
    return sigma_from_t(t), sigma_from_t((t - dt).clamp(min=0))

def flow_loss(f, f_bar, f_phi, x, sigma, sigma_next, noise, labels=None):
    """L_flow = d(f_theta(x_sigma), sg f_theta'(x_sigma')), x_sigma = x + sigma*noise, x_sigma' one teacher Euler step
    down: f is constant along teacher PF-ODE paths and, with L_rec as boundary condition, maps noisy inputs to their
    clean endpoint (consistency models, Song et al. 2023, in IGN form). Our stand-in for SIGN's L_flow."""
    x_sigma = x.detach() + sigma * noise
    with torch.no_grad():
        target = f_bar(euler_step(f_phi, x_sigma, sigma, sigma_next, labels))
    return d_mse(f(x_sigma), target)

def sign_student_loss(G, G_bar, f_phi, f_psi, x_g, labels, sigma, noise, alpha=1.0, x=None,
                      sigma_f=None, sigma_f_next=None, noise_f=None, lam_idem=10.0, lam_rec=10.0, lam_flow=10.0,
                      sigma_c=2.5):
    """Per-sample SIGN terms dict(dm, idem, rec, flow) for x_g = f_theta(z) with its graph; the loop forms
    (lsg * sum dm + sum_k lam_k * sum term_k) / n. dm is SiD's loss (for SIGN's distribution-matching term); the
    IGN terms are pixel MEANS times D = pixels per sample, i.e. pixel sums like SiD's, so that a lambda tuned on
    the toy (D = 2) carries over to images. A zero lambda skips. x: real images; None (data-free): no L_rec, since
    d(f(sg f(z)), sg f(z)) would train f's OUTER call, what IGN's tightness term pushes against: every generated
    point would become a fixed point, growing the fixed-point set towards the identity. L_flow then starts at sg x_g."""
    if lam_flow and (sigma_f is None or sigma_f_next is None or noise_f is None):
        raise ValueError('sign_student_loss: lam_flow > 0 needs sigma_f, sigma_f_next and noise_f')
    B, D = x_g.shape[0], x_g[0].numel()
    f = lambda v: generate(G, v, labels, sigma_c)
    f_bar = lambda v: generate(G_bar, v, labels, sigma_c)
    zero = x_g.new_zeros(B)
    return dict(dm=sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, labels, alpha),
                idem=D * idem_loss(f_bar, x_g) if lam_idem else zero,
                rec=D * rec_loss(f, x) if lam_rec and x is not None else zero,
                flow=D * flow_loss(f, f_bar, f_phi, x_g.detach() if x is None else x, sigma_f, sigma_f_next, noise_f, labels)
                if lam_flow else zero)

#----------------------------------------------------------------------------
# The three methods as objectives: what one micro-batch of generator samples x_g (with real images x_r and labels
# c where the method uses them) contributes to the f_psi step and to the G step. Each draws its own noise (the
# official order) and returns (loss to backpropagate, [logged loss, extra term]), reduced as the official loop:
# per-sample pixel sums, summed, divided by n = images per GPU per iteration, times the method's scale.

def fake_draws(run, x_g):
    sigma = draw_sigma_fake(x_g)
    y, aug = run.augment(x_g)  # EDM's non-leaky augmentation with its 9-dim labels (SiD: fake-score step only)
    return sigma, y, aug, torch.randn_like(x_g)

def logged(a, b=None):
    return torch.stack([a.detach(), torch.zeros_like(a) if b is None else b.detach()])

def fake_sid(run, x_g, x_r, c):
    """SiD, SIGN: f_psi learns the score of G's samples by denoising score matching."""
    sigma, y, aug, noise = fake_draws(run, x_g)
    with run.autocast():
        loss = fake_score_loss(run.psi_ddp, y, sigma, noise, c, aug).sum() * run.cfg.ls / run.n
    return loss, logged(loss)

def fake_sida(run, x_g, x_r, c):
    """SiDA: the same plus the discriminator term, real x_r against fake x_g, on f_psi's encoder."""
    sigma, y, aug, noise = fake_draws(run, x_g)
    y_r, aug_r = run.augment(x_r)
    with run.autocast():
        dsm, d_loss = sida_fake_score_loss(run.psi_ddp, y, y_r, sigma, noise, c, aug, aug_r)
        loss = (dsm.sum() * run.cfg.ls + d_loss.sum() * run.cfg.lsd) / run.n
    return loss, logged(loss)

def G_sid(run, x_g, x_r, c):
    """SiD: the generator loss against the just-updated f_psi."""
    cfg = run.cfg
    with run.autocast():
        sigma, noise = draw_sigma_generator(x_g, cfg.tmax), torch.randn_like(x_g)
        loss = sid_generator_loss(run.f_phi, run.f_psi, x_g, sigma, noise, c, cfg.alpha).sum() * cfg.lsg / run.n
    return loss, logged(loss)

def G_sida(run, x_g, x_r, c):
    """SiDA: SiD's loss, mixed 0.5/0.5 with the non-saturating adversarial term after sida_mix_kimg."""
    cfg = run.cfg
    with run.autocast():
        sigma, noise = draw_sigma_generator(x_g, cfg.tmax), torch.randn_like(x_g)
        sid, gan = sida_generator_loss(run.f_phi, run.f_psi, x_g, sigma, noise, c, cfg.alpha)
        loss, loss_gan = sid.sum() * cfg.lsg / run.n, gan.sum() * cfg.lsg_gan / run.n
    mix = sida_phase(run.cur_nimg, cfg.sida_warmup_kimg, cfg.sida_mix_kimg) == 'mix'
    return (0.5 * loss + 0.5 * loss_gan if mix else loss), logged(loss, loss_gan)

def G_sign(run, x_g, x_r, c):
    """SIGN: SiD's loss plus IGN's idempotence, reconstruction (on real x_r) and our flow term."""
    cfg = run.cfg
    refresh_frozen_(run.G_bar, run.G)  # theta' = theta (G does not change between the rounds of a step)
    with run.autocast():
        sigma, noise = draw_sigma_generator(x_g, cfg.tmax), torch.randn_like(x_g)
        sf, sf_next = flow_sigmas(SIGN_DT + (cfg.tmax / 1000 - SIGN_DT) * torch.rand_like(sigma))
        terms = sign_student_loss(run.G_ddp, run.G_bar, run.f_phi, run.f_psi, x_g, c, sigma, noise, cfg.alpha, x_r,
                                  sf, sf_next, torch.randn_like(x_g), cfg.lambda_idem, cfg.lambda_rec, cfg.lambda_flow,
                                  cfg.sigma_init)
        loss = terms['dm'].sum() * cfg.lsg / run.n
        extra = sum(getattr(cfg, 'lambda_' + k) * terms[k].sum() for k in ('idem', 'rec', 'flow')) / run.n
    return loss + extra, logged(loss, extra)

Method = collections.namedtuple('Method', 'fake G G_trains psi_clip extra')
METHODS = {  # f_psi objective, G objective, does G step at this point, f_psi's gradient clip, name of the extra term
    'sid':  Method(fake_sid, G_sid, lambda cfg, nimg: nimg >= cfg.psi_warmup_kimg * 1e3, None, None),
    'sida': Method(fake_sida, G_sida, lambda cfg, nimg: sida_phase(nimg, cfg.sida_warmup_kimg, cfg.sida_mix_kimg) != 'frozen',
                   1.0, 'loss_gan'),
    'sign': Method(fake_sid, G_sign, lambda cfg, nimg: nimg >= cfg.psi_warmup_kimg * 1e3, None, 'loss_ign'),
}

#----------------------------------------------------------------------------
# Configuration: one flat dataclass, units in the names. A dataset preset holds the official SiD hyper-parameters
# (main:run_sid.sh of the official repository, without its known script bugs), a method preset SiDA's
# (sida:run_sida.sh); the command line overrides any field as --field-name.

def opt(default, help, group='training'):
    return dataclasses.field(default=default, metadata=dict(help=help, group=group))

@dataclasses.dataclass
class Config:
    dataset: str = opt('toy', 'toy | toy-images | cifar10 | cifar10-cond | imagenet64 | ffhq64 | afhqv2-64', 'method')
    method: str = opt('sid', 'sid | sida (SiD²A with --init-generator) | sign', 'method')
    alpha: float = opt(1.2, "SiD's alpha in the generator loss", 'method')
    sigma_init: float = opt(2.5, "the generator's input noise level: x_g = G(sigma_init*eps; sigma_init)", 'method')
    tmax: float = opt(800, 'generator-loss levels t ~ U(0, tmax/1000) on the EDM schedule (800: sigma <= 24.41)', 'method')
    ls: float = opt(1.0, 'fake-score loss scale', 'method')
    lsg: float = opt(100.0, 'SiD generator loss scale', 'method')
    lsd: float = opt(1.0, 'SiDA: discriminator loss scale', 'method')
    lsg_gan: float = opt(0.01, 'SiDA: adversarial generator loss scale', 'method')
    psi_warmup_kimg: float = opt(0, 'SiD, SIGN: only f_psi trains until then (G waits for f_psi to track it)', 'method')
    sida_warmup_kimg: float = opt(100, 'SiDA: only f_psi/D train until then', 'method')
    sida_mix_kimg: float = opt(200, 'SiDA: pure SiD until then, then 0.5 SiD + 0.5 adversarial', 'method')
    lambda_idem: float = opt(100.0, 'SIGN: idempotence weight (pixel sums, like SiD with lsg 100)', 'method')
    lambda_rec: float = opt(100.0, 'SIGN: reconstruction weight (real images are fixed points)', 'method')
    lambda_flow: float = opt(30.0, 'SIGN: teacher-flow consistency weight', 'method')
    teacher: str = opt('', "EDM .pkl path, URL or preset name ('random': untrained, for tests)", 'data')
    data: str = opt('', 'real images: cifar10 | EDM .zip | folder (SiDA, SIGN; labels of conditional runs)', 'data')
    init_generator: str = opt('', 'SiD²A: G starts from this SiD run or checkpoint (ours or official .pkl)', 'data')
    net_overrides: str = opt('', 'JSON object of network arguments, e.g. a tiny net with --teacher random', 'data')
    seed: int = opt(0, 'seed of every random draw')
    batch: int = opt(256, 'images per iteration over all GPUs (the unit of kimg)')
    batch_gpu: int = opt(16, 'images per GPU per micro-batch (accumulation fills the rest)')
    lr: float = opt(1e-5, 'Adam lr of the fake score f_psi')
    glr: float = opt(1e-5, 'Adam lr of the generator G')
    g_beta1: float = opt(0.0, "G's Adam beta1 (f_psi's is 0)")
    dropout: float = opt(0.13, 'dropout of G and f_psi (never the teacher)')
    augment: float = opt(0.12, "EDM augmentation probability in f_psi's step (0: none)")
    ema_mimg: float = opt(0.5, 'half-life of G_ema (5 %% ramp-up)')
    duration_mimg: float = opt(500, 'training length in generator images')
    fast: bool = opt(False, 'GPU fast path: bf16 autocast, channels_last, fused Adam, micro-batch >= 64 (not SiDA)', 'speed')
    precision: str = opt('fp32', 'fp32 (TF32 off, official) | tf32 | bf16 (autocast) | fp16 (EDM per-layer casting)', 'speed')
    channels_last: bool = opt(False, 'NHWC memory layout for the U-Nets (same maths)', 'speed')
    fused_adam: bool = opt(False, "Adam's fused kernel (same update up to rounding)", 'speed')
    compile: bool = opt(False, 'torch.compile the U-Net blocks (minutes of warm-up; README, Speed)', 'speed')
    checkpointing: bool = opt(False, 'recompute U-Net blocks in backward: less memory, ~30 %% more compute', 'speed')
    device: str = opt('', "cuda | cpu ('': cuda if available)", 'speed')
    outdir: str = opt('', "run folder ('': a new runs/NNNNN-DATASET-METHOD)", 'output')
    resume: str = opt('', 'continue the run in this folder with its saved options', 'output')
    tick_kimg: float = opt(10, 'status line and stats.jsonl every this many kimg', 'output')
    snap_kimg: float = opt(500, 'snapshot, training state and sample grid every this many kimg', 'output')
    fid_every_kimg: float = opt(0, 'FID of G_ema every this many kimg (0: off)', 'output')
    fid_num: int = opt(50000, 'images per FID', 'output')
    fid_ref: str = opt('', "FID reference .npz or preset ('': the dataset's EDM reference)", 'output')

FAST = dict(precision='bf16', channels_last=True, fused_adam=True)  # eager: compiling takes minutes (README, Speed)
C10 = dict(teacher='cifar10-32x32-uncond-vp', fid_ref='cifar10-32x32', batch=256, batch_gpu=16, lr=1e-5, glr=1e-5,
           dropout=0.13, augment=0.12, ema_mimg=0.5, tick_kimg=10, snap_kimg=500)
P64 = dict(batch=512, batch_gpu=32, lr=1e-5, glr=1e-5, dropout=0.05, augment=0.15, precision='fp16', tick_kimg=10, snap_kimg=500)
PRESETS = {  # SiD, official run_sid.sh
    'toy':          dict(alpha=1.2, lr=1e-3, glr=1e-3, batch=512, batch_gpu=512, dropout=0.0, augment=0.0,
                         ema_mimg=0.03, duration_mimg=0.3, tick_kimg=30, snap_kimg=300, device='cpu'),  # toy.py: why
    'toy-images':   dict(alpha=1.0, lr=3e-3, glr=3e-5, batch=8, batch_gpu=8, dropout=0.0, augment=0.0, psi_warmup_kimg=0.5,
                         ema_mimg=0.001, duration_mimg=0.01, tick_kimg=1, snap_kimg=10, device='cpu'),  # toy.py: the image toy
    'cifar10':      dict(C10, duration_mimg=500),
    'cifar10-cond': dict(C10, teacher='cifar10-32x32-cond-vp', duration_mimg=800),
    'imagenet64':   dict(teacher='imagenet-64x64-cond-adm', fid_ref='imagenet-64x64', batch=8192, batch_gpu=16,
                         lr=4e-6, glr=4e-6, dropout=0.10, augment=0.0, ema_mimg=2, precision='fp16',
                         duration_mimg=1000, tick_kimg=20, snap_kimg=1000),
    'ffhq64':       dict(P64, teacher='ffhq-64x64-uncond-vp', fid_ref='ffhq-64x64', g_beta1=0.9, duration_mimg=500),
    'afhqv2-64':    dict(P64, teacher='afhqv2-64x64-uncond-vp', fid_ref='afhqv2-64x64', alpha=1.0, lr=5e-6, glr=5e-6,
                         duration_mimg=500),
}
METHOD_PRESETS = {  # SiDA, official run_sida.sh: alpha 1, larger micro-batches; SiD²A (--init-generator) 100 Mimg
    'sida': {'cifar10': dict(alpha=1.0, batch_gpu=32, data='cifar10', duration_mimg=300),
             'cifar10-cond': dict(alpha=1.0, batch_gpu=32, data='cifar10', duration_mimg=300),
             'imagenet64': dict(alpha=1.0, batch_gpu=32, duration_mimg=300),
             'ffhq64': dict(alpha=1.0, batch_gpu=64, g_beta1=0.0, duration_mimg=200),
             'afhqv2-64': dict(alpha=1.0, batch_gpu=64, duration_mimg=200),
             'toy': dict(alpha=1.0, sida_warmup_kimg=5, sida_mix_kimg=10, lsg_gan=2.0),  # scaled to the toy (README)
             'toy-images': dict(alpha=1.0, sida_warmup_kimg=1, sida_mix_kimg=2, lsg_gan=2.0, duration_mimg=0.006)},
    'sign': {'toy-images': dict(duration_mimg=0.005)},  # SIGN's student step costs ~2 SiD steps: the same minutes
}
# What a resumed run may change; anything else would change its maths.
RESUMABLE = {'resume', 'outdir', 'data', 'duration_mimg', 'tick_kimg', 'snap_kimg', 'fid_every_kimg', 'fid_num',
             'fid_ref', 'device', 'batch_gpu', 'fast', 'compile', 'checkpointing', 'channels_last', 'fused_adam'}
RANGES = dict(batch=(1, None), batch_gpu=(1, None), fid_num=(2, None), seed=(0, 2 ** 32 - 1), alpha=(0, 2),
              sigma_init=(0.002, 80), tmax=(0, 1000), dropout=(0, 0.99), augment=(0, 1), g_beta1=(0, 0.99))
POSITIVE = {'alpha', 'tmax', 'lr', 'glr', 'duration_mimg', 'tick_kimg', 'snap_kimg', 'ema_mimg'}
RANGES.update(dict.fromkeys(['ls', 'lsg', 'lsd', 'lsg_gan', 'lambda_idem', 'lambda_rec', 'lambda_flow', 'fid_every_kimg',
                              'sida_warmup_kimg', 'sida_mix_kimg', 'psi_warmup_kimg'], (0, None)))

def preset(dataset='toy', method='sid', init_generator='', fast=False):
    """The resolved defaults of a dataset and method."""
    if dataset not in PRESETS or method not in METHODS:
        raise ValueError(f"unknown --dataset '{dataset}' or --method '{method}' (datasets: {', '.join(PRESETS)}; "
                         f"methods: {', '.join(METHODS)})")
    p = dict(PRESETS[dataset], dataset=dataset, method=method, **METHOD_PRESETS.get(method, {}).get(dataset, {}))
    p.update(dict(duration_mimg=100) if method == 'sida' and init_generator and dataset not in toy.WORLDS else {})  # SiD²A
    if fast and method != 'sida':  # SiD's and SIGN's maths do not depend on the micro-batch (SiDA's batch statistics do)
        p['batch_gpu'] = max(p['batch_gpu'], 64)  # the GPU launch-bound below 64 (README, Speed); at most batch / GPUs
    return dict(p, **FAST, fast=True) if fast else p

def make_config(overrides):
    """Defaults <- presets <- --fast <- overrides (a resumed run: its saved options <- what may change); checked."""
    over = {k: v for k, v in overrides.items() if v is not None}
    over = resumed_options(over) if over.get('resume') else over
    cfg = Config(**{**preset(*(over.get(k, d) for k, d in (('dataset', 'toy'), ('method', 'sid'), ('init_generator', ''),
                                                              ('fast', False)))), **over})
    cfg.outdir = cfg.outdir or runs.new_run_dir('runs', f'{cfg.dataset}-{cfg.method}')
    for f in dataclasses.fields(cfg):
        v, name, (lo, hi) = getattr(cfg, f.name), '--' + f.name.replace('_', '-'), RANGES.get(f.name, (None, None))
        if f.type is bool and v not in (0, 1):
            raise ValueError(f'{name} is a switch (0 or 1), got {v!r}')
        if f.type in (int, float) and (type(v) not in (int, f.type) or not math.isfinite(v) or (lo is not None and v < lo)
                                       or (hi is not None and v > hi) or (f.name in POSITIVE and v <= 0)):
            rng = [f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'] if lo is not None else []
            rng += ['> 0'] if f.name in POSITIVE else []
            raise ValueError(f"{name} must be a finite {f.type.__name__} {' and '.join(rng)}, got {v!r}".replace('  ', ' '))
        setattr(cfg, f.name, bool(v) if f.type is bool else v)
    for ok, msg in [(cfg.precision in ('fp32', 'tf32', 'bf16', 'fp16'), f"unknown --precision '{cfg.precision}'"),
                    (re.fullmatch(r'(cpu|cuda(:\d+)?)?', cfg.device), f"--device must be cpu or cuda, got '{cfg.device}'"),
                    (not cfg.device.startswith('cuda') or torch.cuda.is_available(), f'--device {cfg.device}: no CUDA here'),
                    (cfg.dataset not in toy.WORLDS or not (cfg.data or cfg.fid_every_kimg or cfg.teacher or cfg.net_overrides),
                     '--data, --teacher, --net-overrides and --fid-every-kimg do not apply to the toy (its teacher is exact)')]:
        if not ok:
            raise ValueError(msg)
    net_overrides(cfg)
    return cfg

def resumed_options(over):
    """The saved options of the run being resumed, with the command line's changes of RESUMABLE fields."""
    folder = over['resume'] if os.path.isdir(over['resume']) else os.path.dirname(over['resume'])
    saved = {k: v for k, v in runs.read_json(os.path.join(folder, 'config.json'), '--resume').items() if k in Config.__dataclass_fields__}
    changed = sorted('--' + k.replace('_', '-') for k, v in over.items() if k not in RESUMABLE and k in saved and v != saved[k])
    if changed:
        raise ValueError(f'--resume: the run used other values of {", ".join(changed)}; a resumed run keeps its maths (start a new run)')
    return {**saved, **over, 'outdir': over.get('outdir') or folder}

def net_overrides(cfg):
    return checkpoints.parse_net_overrides(cfg.net_overrides, PRESETS[cfg.dataset].get('teacher'))

#----------------------------------------------------------------------------
# Set-up. Teacher f_phi, fake score f_psi and generator G all start from the teacher's weights (SiD §4); G and f_psi
# are rebuilt with the run's dropout and precision. Everything the loop needs lives in one namespace, `run`.

def setup(cfg, nets=None):
    run = init_processes(cfg)
    run.toy = toy.WORLDS[cfg.dataset]() if cfg.dataset in toy.WORLDS else None
    runs.prepare_outdir(cfg.outdir, cfg.resume, run.rank)  # before anything heavy: never into another run's folder
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision == 'tf32'  # official: off
    torch.backends.cudnn.benchmark = True  # official default: cuDNN times its algorithms once per shape
    run.autocast = lambda: torch.autocast(run.device.type, torch.bfloat16) if cfg.precision == 'bf16' else nullcontext()
    run.f_phi, run.G, run.f_psi = nets if nets is not None else build_networks(cfg, run.device, run.toy)
    if cfg.channels_last and run.G.img_resolution:  # before DDP, whose gradient buckets copy the parameters' layout
        for net in (run.f_phi, run.G, run.f_psi):
            net.to(memory_format=torch.channels_last)
    run.G_ema = copy.deepcopy(run.G).eval().requires_grad_(False)
    run.G_bar = frozen_copy(run.G) if cfg.method == 'sign' else None  # SIGN's f_theta', refreshed every step
    pipe = augment.edm_pipe(cfg.augment)
    run.augment = pipe if cfg.augment > 0 and run.G.img_resolution else (lambda x: (x, None))
    eps, fused = (1e-6 if cfg.precision == 'fp16' else 1e-8), (True if cfg.fused_adam else None)  # official eps
    run.opt_psi = torch.optim.Adam(run.f_psi.parameters(), lr=cfg.lr, betas=(0.0, 0.999), eps=eps, fused=fused)
    run.opt_G = torch.optim.Adam(run.G.parameters(), lr=cfg.glr, betas=(cfg.g_beta1, 0.999), eps=eps, fused=fused)
    run.cur_nimg, run.data_batches, run.stats_fid, run.end_nimg = 0, 0, [], int(cfg.duration_mimg * 1e6)
    if cfg.resume:
        runs.resume(run)
    open_data(run)
    if cfg.fid_every_kimg > 0:  # reference and detector now: a bad --fid-ref fails before training
        run.fid_tools = (*fid.load_ref(cfg.fid_ref or PRESETS[cfg.dataset]['fid_ref']), fid.load_detector(run.device))
    for net in (run.f_phi, run.G, run.f_psi):  # after every deepcopy of G: a copy would share the patched call
        edm_nets.checkpoint_blocks(net) if cfg.checkpointing else None
        if cfg.compile:  # regional: each U-Net block (minutes less warm-up than the whole net); same state_dict names;
            edm_nets.compile_blocks(net) if net.img_resolution else net.compile()  # compiled dropout: other masks, same law
    run.G_ddp, run.psi_ddp = ddp(run, run.G, ['map_augment']), ddp(run, run.f_psi, [] if cfg.augment else ['map_augment'])
    if run.rank == 0:
        runs.write_json(os.path.join(cfg.outdir, 'config.json'), dataclasses.asdict(cfg))
    run.written = ['config.json']
    return run

def init_processes(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on CPUs. A caller's group is left alone."""
    import torch.distributed as dist
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = torch.device('cpu' if cfg.dataset in toy.WORLDS else cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    own_group = world_size > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    log = print if rank == 0 else (lambda *a, **k: None)
    batch_gpu = min(cfg.batch_gpu, cfg.batch // world_size)  # as the official code: at most batch / GPUs
    if batch_gpu < cfg.batch_gpu:
        log(f'--batch-gpu {cfg.batch_gpu} > --batch {cfg.batch} / {world_size} GPUs: using micro-batches of {batch_gpu}')
    if batch_gpu < 1 or cfg.batch % (batch_gpu * world_size):
        raise ValueError(f'--batch {cfg.batch} must be a multiple of --batch-gpu {batch_gpu} x {world_size} GPU(s)')
    return types.SimpleNamespace(cfg=cfg, rank=rank, world_size=world_size, device=device, own_group=own_group, log=log,
                                 batch_gpu=batch_gpu, n=cfg.batch // world_size, rounds=cfg.batch // world_size // batch_gpu)

def build_networks(cfg, device, world=None):
    """-> (f_phi frozen in eval mode, G, f_psi); a toy world gives its exact teacher and a small net fitted to it."""
    if world is not None:
        f_phi, G = world.teacher, world.student(cfg.dropout)
    else:
        name, over = cfg.teacher or PRESETS[cfg.dataset]['teacher'], net_overrides(cfg)
        if name == 'random':  # an untrained net of the preset's architecture (tests, benchmarks)
            torch.manual_seed(0)
            f_phi = edm_nets.build_preset(PRESETS[cfg.dataset]['teacher'], **over)
        else:
            f_phi = checkpoints.load_checkpoint(name)[0]
        kw, state = dict(f_phi.init_kwargs, **over, use_fp16=cfg.precision == 'fp16'), f_phi.state_dict()
        f_phi, G = edm_nets.EDMPrecond(**dict(kw, dropout=0.0)), edm_nets.EDMPrecond(**dict(kw, dropout=cfg.dropout))
        for net in (f_phi, G):
            net.load_state_dict(state)
    f_psi = copy.deepcopy(G)
    if cfg.init_generator:  # SiD²A: G (and so G_ema) from a SiD generator; f_psi stays the teacher
        G.load_state_dict(checkpoints.load_checkpoint(runs.snapshot_path(cfg.init_generator))[0].state_dict())
    return f_phi.to(device).eval().requires_grad_(False), G.to(device), f_psi.to(device)

def ddp(run, net, unused):
    """DistributedDataParallel of G or f_psi (not the frozen teacher), as officially without buffer broadcast. Parameters
    that never get a gradient (G never sees augmentation labels) are excluded, else DDP waits for them forever.
    Only gradients are averaged: batch statistics (SiDA's micro-batch BCE means) stay per rank, as officially."""
    if run.world_size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP
    DDP._set_params_and_buffers_to_ignore_for_model(net, [n for n, _ in net.named_parameters() if any(u in n for u in unused)])
    return DDP(net, device_ids=[run.device] if run.device.type == 'cuda' else None, broadcast_buffers=False)

def open_data(run):
    """Real images for SiDA / SIGN and labels for conditional nets: a toy's exact samples, else --data (official:
    labels from the dataset; without --data, uniform labels). Streams resume at the saved position."""
    cfg, run.data = run.cfg, None
    if cfg.method == 'sign' and not cfg.data and run.toy is None:
        run.log('SIGN without --data: no reconstruction term L_rec (only real images are made fixed points)')
    if run.toy is not None and cfg.method in ('sida', 'sign'):
        run.data = run.toy.batches(run.batch_gpu, cfg.seed * run.world_size + run.rank, start=run.data_batches)
    elif cfg.method == 'sida' or cfg.data:
        if not cfg.data:
            raise ValueError(f'--method {cfg.method} needs real images: pass --data PATH')
        images, labels = data.load_dataset(cfg.data)
        labels = data.check_dataset_matches(images, labels, run.f_phi)
        run.data = data.infinite_batches(images, labels, run.batch_gpu, cfg.seed, run.rank, run.world_size,
                                             start=run.data_batches, pin=run.device.type == 'cuda')

#----------------------------------------------------------------------------
# The training loop (SiD Algorithm 1, official update order): per iteration a fake-score step on fresh generator
# samples, a generator step against the just-updated f_psi, the EMA of G; then maintenance once per tick. Progress
# is counted in generator images (kimg). A generator: one namespace per iteration (bench.py and the tests drive it).

def iterate(cfg, nets=None):
    run, method = setup(cfg, nets), METHODS[cfg.method]
    if run.toy is not None and not cfg.resume:
        run.log(f'toy start: {run.toy.quality_line(run.toy.observe(run.G_ema, cfg.sigma_init, "0 kimg"))}')
    runs.start(run, Config(**preset(cfg.dataset, cfg.method, cfg.init_generator, cfg.fast)))  # status line, tick clock
    while run.cur_nimg < run.end_nimg:
        # 1. f_psi learns the score of G's current samples: G makes them without a graph and with dropout off,
        #    f_psi trains with dropout on, on augmented images (SiDA: plus its discriminator term on real images).
        run.G.eval(); run.f_psi.train().requires_grad_(True)
        fake = accumulate(run, 1, run.psi_ddp, run.opt_psi, method.fake, method.psi_clip)
        # 2. G learns against the updated f_psi, with dropout on; f_psi and the teacher are frozen in eval mode but
        #    differentiated w.r.t. their input x_t (only w is detached in SiD's loss).
        gen = torch.zeros_like(fake)
        if method.G_trains(cfg, run.cur_nimg):
            run.G.train(); run.f_psi.eval().requires_grad_(False)
            gen = accumulate(run, 2, run.G_ddp, run.opt_G, method.G)
        # 3. EMA of G; the iteration counts `batch` generator images.
        update_ema(run.G_ema, run.G, cfg, run.cur_nimg)
        run.cur_nimg += cfg.batch
        run.tick.sums += torch.cat([fake[:1], gen])
        run.tick.iters += 1
        yield types.SimpleNamespace(cur_nimg=run.cur_nimg, loss_fake=fake[0], loss_G=gen[0], loss_extra=gen[1],
                                    G=run.G, G_ema=run.G_ema, f_psi=run.f_psi)
        maintain(run, method)
    yield runs.finish(run)

def accumulate(run, phase, net, opt, objective, clip=None):
    """One Adam step of `net` on the whole batch: rounds of batch_gpu images per GPU with summed gradients, DDP's
    all-reduce on the last round only. -> this step's two logged losses, summed over the rounds."""
    cfg = run.cfg
    opt.zero_grad(set_to_none=True)
    logs = torch.zeros(2, dtype=torch.float64, device=run.device)
    for r in range(run.rounds):
        reseed(run, phase, r)
        last = r == run.rounds - 1  # forward AND backward of a round sit in one sync context (official Feb 2025 fix)
        with net.no_sync() if run.world_size > 1 and not last else nullcontext():
            x_r, c = next_batch(run)
            z = cfg.sigma_init * torch.randn([run.batch_gpu, *run.G.img_shape], device=run.device)
            with torch.set_grad_enabled(phase == 2), run.autocast():  # G's samples carry a graph in its own step only
                x_g = generate(run.G_ddp if phase == 2 else run.G, z, c, cfg.sigma_init).float()
            loss, log = objective(run, x_g, x_r, c)
            loss.backward()
            logs += log
    sanitize_grads_(net.parameters(), clip)
    opt.step()
    return logs

def reseed(run, phase, r):
    """The RNG of a micro-batch is a function of (seed, iteration, phase, global micro-batch index rank*rounds + r):
    per-rank streams, exact replay on resume, and the same numbers for any split of the batch into GPUs x rounds."""
    key = [run.cfg.seed, run.cur_nimg // run.cfg.batch, phase, run.rank * run.rounds + r]
    torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))

def next_batch(run):
    """(real images or None, labels or None) for one micro-batch."""
    if run.data is not None:
        run.data_batches += 1
        x_r, c = next(run.data)
        return x_r.to(run.device, non_blocking=True), (c.to(run.device) if run.G.label_dim else None)
    L = run.G.label_dim
    return None, F.one_hot(torch.randint(L, (run.batch_gpu,), device=run.device), L).float() if L else None

def sanitize_grads_(params, clip_value=None):
    """As the official loops: NaN -> 0, +-inf -> +-1e5; SiDA also clips f_psi's gradients element-wise to +-1."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        g.nan_to_num_(nan=0.0, posinf=1e5, neginf=-1e5)
    if clip_value is not None:
        torch._foreach_clamp_min_(grads, -clip_value)
        torch._foreach_clamp_max_(grads, clip_value)

@torch.no_grad()
def update_ema(G_ema, G, cfg, cur_nimg):
    """G_ema <- beta G_ema + (1 - beta) G, beta = 0.5^(batch / h), half-life h = min(ema_mimg, 5 % of the images seen
    before this step): a ramp-up from beta = 0 (official)."""
    beta = 0.5 ** (cfg.batch / max(min(cfg.ema_mimg * 1e6, 0.05 * cur_nimg), 1e-8))
    ema = list(G_ema.parameters())
    torch._foreach_copy_(ema, torch._foreach_lerp([p.detach() for p in G.parameters()], ema, beta))

#----------------------------------------------------------------------------
# Maintenance: once per tick a status line and a stats.jsonl entry; FID and snapshots at their intervals; the end.

def maintain(run, method):
    """Once per tick a status line and a stats.jsonl entry, FID and snapshots at their intervals (runs.py), the toy's
    frames: each when this iteration crossed a multiple of its interval, or ended the run."""
    cfg, done = run.cfg, run.cur_nimg >= run.end_nimg
    every = lambda kimg: max(round(kimg * 1e3), 1)
    crossed = lambda kimg: kimg > 0 and (done or run.cur_nimg // every(kimg) > (run.cur_nimg - cfg.batch) // every(kimg))
    if run.toy is not None and crossed(cfg.duration_mimg * 1e3 / 40):  # 40 frames for the toy's GIF
        run.toy.observe(run.G_ema, cfg.sigma_init, f'{run.cur_nimg / 1e3:.4g} kimg')
    if crossed(cfg.tick_kimg):
        runs.report_tick(run, method.extra)
    if crossed(cfg.fid_every_kimg):
        runs.fid_step(run)
    if crossed(cfg.snap_kimg) and run.rank == 0:
        runs.save_checkpoint(run)

def train(cfg, nets=None):
    """Run (or resume) a distillation to its end; -> the final (G, G_ema, f_psi)."""
    for it in iterate(cfg, nets):
        pass
    return it.G, it.G_ema, it.f_psi

#----------------------------------------------------------------------------
# Command line: `python sid.py [options]` trains; `python sid.py generate|project` use a trained generator (runs.py).
# Options come from Config, grouped, with the defaults of the chosen --dataset and --method.

EXAMPLES = """examples:
  python sid.py --dataset toy                                  # 2-D toy, exact teacher, ~15 s on a CPU
  python sid.py --dataset toy --method sign --dry-run          # print the resolved options and stop
  torchrun --nproc_per_node=4 sid.py --dataset cifar10 --fast  # SiD on EDM's CIFAR-10 teacher, GPU fast path
  python sid.py --dataset cifar10 --method sida --init-generator runs/00001-cifar10-sid   # SiD²A
  python sid.py --resume runs/00001-cifar10-sid --duration-mimg 600                     # continue, for longer
  python sid.py generate --help ; python sid.py project --help                          # use a trained generator"""

def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] in (['generate'], ['project']):
        return runs.main(argv)

    def run():
        pre = argparse.ArgumentParser(add_help=False)  # the preset decides the defaults that --help shows
        for k in ('dataset', 'method', 'init_generator'):
            pre.add_argument('--' + k.replace('_', '-'), default=getattr(Config, k))
        pre.add_argument('--fast', action='store_true')
        try:
            defaults = Config(**preset(**vars(pre.parse_known_args(argv)[0])))
        except ValueError:
            defaults = Config()
        args = vars(runs.options_parser(defaults, 'sid.py', EXAMPLES, 'SiD / SiDA / SIGN distillation of an EDM teacher '
                                        f'into a one-step generator (defaults for --dataset {defaults.dataset} '
                                        f'--method {defaults.method}).').parse_args(argv))
        dry = args.pop('dry_run')
        cfg = make_config(args)
        if dry:
            return print(json.dumps(dataclasses.asdict(cfg), indent=2))
        if cfg.dataset in toy.WORLDS and 'OMP_NUM_THREADS' not in os.environ:
            torch.set_num_threads(1)  # tiny networks: a second thread only spins (and other jobs share the cores)
        train(cfg)
    runs.one_line_errors(run)

if __name__ == '__main__':
    main()
