"""sid: Score identity Distillation (SiD), SiDA/SiD²A and SIGN in one readable file.

    python sid.py --dataset toy                        # 2-D demo with an exact teacher, ~20 s on a CPU
    python sid.py --dataset cifar10                    # SiD on the official EDM CIFAR-10 teacher (GPU)
    torchrun --nproc_per_node=4 sid.py --dataset cifar10 --outdir runs/c10
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 sid.py ...  # per node
    python sid.py generate --ckpt runs/c10 --seeds 0-49999 --outdir out/c10
    python sid.py --help                               # every option, with its unit and default

Papers: SiD, Zhou et al., ICML 2024 (arXiv 2404.04057); SiDA, Zhou et al., ICLR 2025 (arXiv 2410.14919);
SIGN, Zaman et al. 2025 (arXiv 2509.21470; no public code, our reconstruction is documented in README).
Reading order: identities -> losses -> toy -> data -> config -> loop -> generation -> command line.
"""
import copy, dataclasses, io, json, math, os, pathlib, pickle, sys, tarfile, time, types, zipfile, zlib
import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F

import fid  # FID, and EDM's uint8 conversion of images
from fid import to_uint8

#----------------------------------------------------------------------------
# Identities (SiD §3). A denoiser D(x; sigma) ~ E[x_0 | x_t = x] gives the score by Tweedie's formula,
#   s(x; sigma) = grad log p_sigma(x) = (D(x; sigma) - x) / sigma^2,
# so "score difference" terms of the paper are written with denoisers: s_phi - s_psi = (f_phi - f_psi)/sigma^2.

def score_from_denoiser(D_x, x, sigma):
    """Tweedie: the score of p_sigma at x from the denoised estimate D_x."""
    return (D_x - x) / sigma ** 2

def sigma_from_t(t, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's rho=7 noise levels with t=0 -> sigma_min and t=1 -> sigma_max (SiD's generator schedule)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + (1 - t) * (b - a)) ** rho

def edm_weight(sigma, sigma_data=0.5):
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

def draw_sigma_generator(x, tmax, gen=None):
    """SiD generator-loss levels: t ~ U(0, tmax/1000) per sample through sigma_from_t (tmax=800: sigma <= 24.41)."""
    t = torch.rand([x.shape[0]] + [1] * (x.dim() - 1), device=x.device, generator=gen)
    return sigma_from_t(t * tmax / 1000)

def draw_sigma_fake(x, P_mean=-1.2, P_std=1.2, gen=None):
    """Fake-score levels: EDM's lognormal ln(sigma) ~ N(P_mean, P_std^2), one per sample."""
    n = torch.randn([x.shape[0]] + [1] * (x.dim() - 1), device=x.device, generator=gen)
    return (n * P_std + P_mean).exp()

def _keep_finite(*ts):
    """Rows without NaN in any of the tensors (the official code drops such samples)."""
    keep = torch.ones(ts[0].shape[0], dtype=torch.bool, device=ts[0].device)
    for t in ts:
        keep &= ~torch.isnan(t.flatten(1)).any(1)
    return keep

#----------------------------------------------------------------------------
# Losses (SiD Eq. 22/23 in code form; EDM denoising score matching for f_psi). Pure functions: sigma and
# noise are arguments so tests can fix them. Each returns per-sample pixel sums [B'] of the kept samples;
# the loop reduces them as the official code: sum / batch_gpu_total, x100 for G, x1 for f_psi.

def generate(G, z, labels, sigma_init):
    """One-step generation x_g = G(sigma_init * eps; sigma_init), z = sigma_init * eps (SiD §4)."""
    # contiguous: a channels_last net returns NHWC memory, and randn_like(x_g) would draw other numbers
    return G(z, z.new_full([z.shape[0]] + [1] * (z.dim() - 1), sigma_init), labels).contiguous()

def sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, labels, alpha, with_logits=False):
    """SiD generator loss per sample, with x_t = x_g + sigma*noise and w = mean|x_g - f_phi| (no grad):
        sum_pixels (f_phi - f_psi) * ((f_phi - x_g) - alpha*(f_phi - f_psi)) / w
      = sum_pixels [(f_phi - f_psi)(f_psi - x_g) + (1 - alpha)(f_phi - f_psi)^2] / w   (the paper's form).
    Only w is detached: the gradient reaches x_g directly AND through x_t via both frozen networks.
    with_logits (SiDA): f_psi's one forward also returns its encoder logits; returns (loss, logits, w)."""
    x_t = x_g + sigma * noise
    y_phi = f_phi(x_t, sigma, labels)
    y_psi, logits = f_psi(x_t, sigma, labels, return_logits=True) if with_logits else (f_psi(x_t, sigma, labels), None)
    keep = _keep_finite(x_g, y_phi, y_psi)
    x_g, y_phi, y_psi = x_g[keep], y_phi[keep], y_psi[keep]
    with torch.no_grad():  # the normaliser uses the teacher, in float32, floored at 1e-5
        w = (x_g - y_phi).abs().float().flatten(1).mean(1).clamp_min(1e-5)
    diff = y_phi - y_psi
    loss = diff * ((y_phi - x_g) - alpha * diff)
    loss = loss.flatten(1).sum(1) / w
    return (loss, logits[keep], w) if with_logits else loss

def fake_score_loss(f_psi, x_g, sigma, noise, labels, augment_labels=None, sigma_data=0.5):
    """EDM denoising score matching on generated images: lambda(sigma) * sum_pixels (f_psi(x_g + sigma*noise) - x_g)^2."""
    x_g = x_g.detach()
    return _dsm(f_psi(x_g + sigma * noise, sigma, labels, augment_labels), x_g, sigma, sigma_data)

def _dsm(D_x, x_g, sigma, sigma_data):
    """lambda(sigma) * sum_pixels (D_x - x_g)^2 per sample, NaN samples dropped (shared by SiD's and SiDA's f_psi)."""
    keep = _keep_finite(x_g, D_x)
    return (edm_weight(sigma, sigma_data) * (D_x - x_g) ** 2)[keep].flatten(1).sum(1)

#----------------------------------------------------------------------------
# SiDA fake-score + discriminator loss (Zhou et al., ICLR 2025; official sida_loss.py:77-126). The
# discriminator is f_psi's encoder: logits [B,1,8,8] = channel mean of the last encoder feature map.

def sida_fake_score_loss(f_psi, x_g, x_r, sigma, noise, labels, aug_labels_g=None, aug_labels_r=None, sigma_data=0.5):
    """Per-sample (dsm [B'], d_loss [B]). x_g / x_r: generated / real images, each already augmented by the
    caller; x_g is detached. sigma [B,1,1,1] (lognormal) and noise are SHARED by the fake and real branch;
    labels are the real batch's (x_g was generated with them).
        dsm_b    = lambda(sigma_b) * sum_pixels (f_psi(x_g + sigma*noise) - x_g)^2      (as fake_score_loss)
        d_loss_b = lambda(sigma_b) * (BCE(logits_real, 1) + BCE(logits_fake, 0)) / 2
    Each BCE is the mean over the WHOLE micro-batch (B x 1 x 8 x 8), logits unclamped. Micro-batch coupling:
    the loop's (dsm.sum() + lsd * d_loss.sum()) / batch_gpu_total scales every sample's BCE gradient by
    the micro-batch sum of lambda(sigma_b), so results depend on batch_gpu. After backward the official
    loop sanitises the grads and clips f_psi's element-wise to +-1: sanitize_grads_(f_psi.parameters(), 1)."""
    x_g = x_g.detach()
    D_x, logits_fake = f_psi(x_g + sigma * noise, sigma, labels, aug_labels_g, return_logits=True)  # one forward
    logits_real = f_psi(x_r + sigma * noise, sigma, labels, aug_labels_r, encoder_only=True)       # encoder only
    lam = edm_weight(sigma, sigma_data).flatten().expand(len(x_g))  # [B]
    bce = F.binary_cross_entropy_with_logits
    d_loss = lam * (bce(logits_real, torch.ones_like(logits_real)) + bce(logits_fake, torch.zeros_like(logits_fake))) / 2
    return _dsm(D_x, x_g, sigma, sigma_data), d_loss

#----------------------------------------------------------------------------
# SiDA generator loss (Zhou et al., ICLR 2025; official sida_loss.py:25-75): SiD's loss plus a
# non-saturating GAN term from the same f_psi forward, "batch-normalised" within each micro-batch.

def sida_generator_loss(f_phi, f_psi, x_g, sigma, noise, labels, alpha):
    """Per-sample (sid [B'], gan [B']) on x_t = x_g + sigma*noise (sigma from the SiD tmax schedule):
        sid_b = sid_generator_loss (same x_t, same single f_psi forward, which also gives the logits)
        gan_b = C*H*W * BCE(clamp(logits, -10, 10), 1) / w_b
    with w_b = mean|x_g - f_phi| (no grad, >= 1e-5) and the BCE one scalar: the mean over the whole micro-batch
    (B' x 1 x 8 x 8). The clamp zeroes the gradient of logits beyond +-10. The loop forms
    L = 100 * sid.sum() / batch_gpu_total and L_gan = 0.01 * gan.sum() / batch_gpu_total, so each logit's
    gradient scales with the micro-batch sum of 1/w_b (micro-batch coupling); sida_phase says how they combine."""
    sid, logits, w = sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, labels, alpha, with_logits=True)
    logits = logits.clamp(-10, 10)
    gan = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)) / w * math.prod(x_g.shape[1:])
    return sid, gan

def sida_phase(cur_nimg, warmup_kimg=100, mix_kimg=200):
    """SiDA generator schedule (official loop :410-426) from the images seen before this step:
    'frozen' (cur_nimg <= 100k): f_psi/D train, G takes no optimizer step (its backward is discarded);
    'sid' (<= 200k): backward on L alone; 'mix' (> 200k): backward on 0.5*L + 0.5*L_gan. EMA updates always."""
    return 'mix' if cur_nimg > mix_kimg * 1000 else 'sid' if cur_nimg > warmup_kimg * 1000 else 'frozen'

def sanitize_grads_(params, clip_value=None):
    """In place, as the official loops: NaN -> 0, +-inf -> +-1e5; then (SiDA's f_psi: 1) clip each element to +-clip_value."""
    params = [p for p in params if p.grad is not None]
    for p in params:
        p.grad.nan_to_num_(nan=0.0, posinf=1e5, neginf=-1e5)
    if clip_value is not None:
        torch.nn.utils.clip_grad_value_(params, clip_value)

#----------------------------------------------------------------------------
# SIGN (Zaman et al. 2025; our reconstruction, sign.md §3) on IGN's frame (Shocher et al., ICLR 2024). The
# student is time-free: f_theta(x) = generate(G, x, labels, sigma_c) = G_theta(x; sigma_c), i.e. SiD's generator
# applied to any input, not only to z = sigma_c*eps. IGN's frozen copy f_theta' gives idempotence its target.

def frozen_copy(G):
    """IGN's f_theta': a deepcopy of G in eval mode (no dropout, so targets are deterministic) whose parameters
    have requires_grad False. No gradient reaches its weights, yet it stays differentiable w.r.t. its input.
    Build it once; call refresh_frozen_ before every student step so that theta' = theta."""
    G_bar = copy.deepcopy(G).eval().requires_grad_(False)
    for p in G_bar.parameters():
        p.grad = None  # deepcopy also copies any .grad of G
    return G_bar

@torch.no_grad()
def refresh_frozen_(G_bar, G):
    """theta' <- theta in place (parameters and buffers); cheaper than a new deepcopy every step."""
    for a, b in zip(G_bar.parameters(), G.parameters()):
        a.copy_(b)
    for a, b in zip(G_bar.buffers(), G.buffers()):
        a.copy_(b)
    return G_bar

#----------------------------------------------------------------------------
# IGN terms with d = per-sample mean squared error (sign.md §3). f, f_bar are callables x -> f(x) with the
# labels bound: f = lambda x: generate(G, x, labels, sigma_c).

def _d(a, b):
    """d(a, b) = mean over the non-batch dims of (a - b)^2, per sample."""
    return (a - b).square().flatten(1).mean(1)  # (B,)

def idem_loss(f_bar, x_g):
    """IGN idempotence L_idem = d(f_theta'(x_g), x_g) with x_g = f_theta(z) (Shocher et al., Eq. 4).
    Gradient reaches theta only through the inner call: both x_g's carry theta's graph, f_theta' has frozen
    weights but is NOT detached (its input Jacobian is needed). Through the outer call as well, f would
    learn to be the identity (every point a fixed point)."""
    return _d(f_bar(x_g), x_g)

def rec_loss(f, x):
    """IGN reconstruction L_rec = d(f_theta(x), x): real images are fixed points (Shocher et al., Eq. 3)."""
    return _d(f(x), x)

@torch.no_grad()
def euler_step(f_phi, x, sigma, sigma_next, labels=None):
    """One Euler step of the teacher's probability-flow ODE dx/dsigma = (x - f_phi(x; sigma))/sigma
    (Karras et al. 2022, Eq. 3 with sigma(t) = t), from sigma to sigma_next."""
    return x + (sigma_next - sigma) * (x - f_phi(x, sigma, labels)) / sigma

SIGN_DT = 0.02  # L_flow's step in EDM's rho=7 time

def flow_sigmas(t, dt=SIGN_DT):
    """Levels for L_flow: sigma = sigma_from_t(t) and sigma' = sigma_from_t(t - dt), i.e. one step down a grid of
    1/dt levels uniform in EDM's rho=7 time (dt=0.02: sigma'/sigma = 0.84 at sigma=2.5, 0.79 at sigma=0.1).
    Draw t ~ U(dt, tmax/1000) so that sigma' >= sigma_min; t = dt lands sigma' on 0.002 (the clean end)."""
    return sigma_from_t(t), sigma_from_t((t - dt).clamp(min=0))

def flow_loss(f, f_bar, f_phi, x, sigma, sigma_next, noise, labels=None):
    """SIGN-style flow consistency L_flow = d(f_theta(x_sigma), sg f_theta'(x_sigma')) with x_sigma = x + sigma*noise
    and x_sigma' one teacher Euler step towards sigma_next < sigma: f is constant along teacher PF-ODE paths,
    and with L_rec as the boundary condition it maps noisy inputs to their clean endpoint (consistency
    models, Song et al. 2023, in IGN form). Gradient only through f_theta(x_sigma)."""
    x_sigma = x.detach() + sigma * noise
    with torch.no_grad():
        target = f_bar(euler_step(f_phi, x_sigma, sigma, sigma_next, labels))
    return _d(f(x_sigma), target)

#----------------------------------------------------------------------------
# SIGN student loss (sign.md §3): L_f = L_dm + lam_idem L_idem + lam_rec L_rec + lam_flow L_flow, no tightness.
# Scaling: SiD's term is a per-sample pixel SUM (x lsg = 100 in the loop). The IGN terms are per-pixel means
# above; here they are multiplied by D = pixels per sample, i.e. also pixel sums, so that every term's
# gradient per pixel is resolution-free and a lambda tuned on the toy (D = 2) carries over to CIFAR (D = 3072).
# A lambda then compares directly with lsg: lam = 100 weighs a squared error like SiD's term is weighted.

def sign_student_loss(G, G_bar, f_phi, f_psi, x_g, labels, sigma, noise, alpha=1.0, x=None,
                      sigma_f=None, sigma_f_next=None, noise_f=None,
                      lam_idem=10.0, lam_rec=10.0, lam_flow=10.0, sigma_c=2.5):
    """Per-sample SIGN terms for x_g = generate(G, z, labels, sigma_c) with its graph.
    sigma, noise: draws of the SiD term; sigma_f, sigma_f_next, noise_f: of L_flow (see flow_sigmas).
    x: real images of the same batch (labels shared); x=None is the data-free switch, x = sg(x_g).
    Returns per-sample dict(dm [B'], idem, rec, flow [B]) (B' < B when SiD drops NaN rows); the loop forms
    (lsg*sum dm + sum_k lam_k*sum term_k) / batch_gpu_total. A term whose lambda is 0 is skipped (zeros).
    G_bar must be refreshed (refresh_frozen_) before the call; it gets no gradient."""
    B, D = x_g.shape[0], x_g[0].numel()
    x = x_g.detach() if x is None else x
    f = lambda v: generate(G, v, labels, sigma_c)
    f_bar = lambda v: generate(G_bar, v, labels, sigma_c)
    zero = x_g.new_zeros(B)
    out = dict(dm=sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, labels, alpha))
    out['idem'] = D * idem_loss(f_bar, x_g) if lam_idem else zero
    out['rec'] = D * rec_loss(f, x) if lam_rec else zero
    if lam_flow and (sigma_f is None or sigma_f_next is None or noise_f is None):
        raise ValueError('lam_flow > 0 needs sigma_f, sigma_f_next and noise_f')
    out['flow'] = D * flow_loss(f, f_bar, f_phi, x, sigma_f, sigma_f_next, noise_f, labels) if lam_flow else zero
    return out

#----------------------------------------------------------------------------
# Sampling, projection and the toy's IGN diagnostics (sign.md §3). f is a callable x -> f(x) (labels bound).

@torch.no_grad()
def multistep_sample(f, z, sigmas=(), noises=None):
    """x_1 = f(z), x_{k+1} = f(x_k + sigmas[k-1] * noises[k-1]); K = len(sigmas) + 1 calls (IGN's re-application
    with fresh noise, as in consistency models). noises=None draws torch.randn. Returns [x_1, ..., x_K]."""
    if noises is not None and len(noises) < len(sigmas):
        raise ValueError(f'{len(sigmas)} sigmas need as many noises, got {len(noises)}')
    if any(s < 0 for s in sigmas):
        raise ValueError(f'sigmas must be >= 0, got {list(sigmas)}')
    xs = [f(z)]
    for k, s in enumerate(sigmas):
        eps = torch.randn_like(xs[-1]) if noises is None else noises[k]
        xs.append(f(xs[-1] + s * eps))
    return xs

@torch.no_grad()
def project(f, y, sigma=0.0, noise=None, repeat=1):
    """Projection / zero-shot editing: y <- f(y + sigma*eps_k), `repeat` times with fresh eps_k (sigma = 0: plain
    projection f(y)). noise: a list of `repeat` tensors, a torch.Generator on y's device, or None."""
    if repeat < 1 or sigma < 0:
        raise ValueError(f'need repeat >= 1 and sigma >= 0, got repeat={repeat}, sigma={sigma}')
    for k in range(repeat):
        if sigma > 0:
            eps = noise[k] if isinstance(noise, (list, tuple)) else \
                torch.randn(y.shape, generator=noise, device=y.device, dtype=y.dtype)
            y = y + sigma * eps
        y = f(y)
    return y

@torch.no_grad()
def idempotence_error(f, z):
    """E ||f(f(z)) - f(z)|| (L2 norm per sample, averaged): how far generated samples are from f's fixed set."""
    fz = f(z)
    return float((f(fz) - fz).flatten(1).norm(dim=1).mean())

@torch.no_grad()
def fixed_point_error(f, x):
    """E ||f(x) - x|| on data: how far real images are from being fixed points."""
    return float((f(x) - x).flatten(1).norm(dim=1).mean())

#----------------------------------------------------------------------------
# Toy: a 2-D Gaussian mixture (8 modes on a ring, per-axis std sigma_data = 0.5) whose teacher is the exact
# denoiser E[x_0 | x_t] (posterior-weighted component means), and small MLP denoisers with EDM
# preconditioning (Karras et al. 2022, Table 1) that play G and f_psi.

class ToyMixture(nn.Module):
    """Exact EDM-style denoiser of p_data = (1/K) sum_k N(mu_k, s^2 I); call convention as EDMPrecond."""
    def __init__(self, modes=8, s=0.1, sigma_data=0.5):
        super().__init__()
        r = math.sqrt(2 * (sigma_data ** 2 - s ** 2))  # ring radius so that each axis has std sigma_data
        ang = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
        self.register_buffer('mu', torch.stack([r * ang.cos(), r * ang.sin()], 1))  # (K, 2)
        self.s, self.sigma_data, self.label_dim, self.img_resolution, self.img_channels = s, sigma_data, 0, 0, 2

    def log_prob(self, x, sigma):
        """log p_sigma(x) of the noised mixture, for tests (x: (B, 2), sigma: (B, 1))."""
        v = self.s ** 2 + sigma.double() ** 2                                  # (B, 1)
        d2 = ((x.double()[:, None] - self.mu[None]) ** 2).sum(-1)               # (B, K)
        lp = -0.5 * d2 / v - torch.log(2 * math.pi * v) - math.log(len(self.mu))
        return lp.logsumexp(1)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, **kw):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        v = self.s ** 2 + sigma ** 2
        xd = x.double()
        logits = -0.5 * ((xd[:, None] - self.mu[None]) ** 2).sum(-1) / v           # (B, K) responsibilities
        r = logits.softmax(1)
        means = (self.s ** 2 * xd[:, None] + sigma[:, :, None] ** 2 * self.mu[None]) / v[:, :, None]  # (B, K, 2)
        return (r[:, :, None] * means).sum(1).to(x.dtype)

    def sample(self, n, gen=None):
        k = torch.randint(len(self.mu), (n,), generator=gen)
        return (self.mu[k] + self.s * torch.randn(n, 2, generator=gen, dtype=torch.float64)).float()

class ToyDenoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with an MLP F; the first layers act as SiDA's encoder."""
    def __init__(self, hidden=128, depth=3, dropout=0.0, sigma_data=0.5):
        super().__init__()
        self.init_kwargs = dict(hidden=hidden, depth=depth, dropout=dropout, sigma_data=sigma_data)
        self.sigma_data, self.label_dim, self.img_resolution, self.img_channels = sigma_data, 0, 0, 2
        self.enc = nn.Sequential(nn.Linear(2 + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        layers = []
        for _ in range(depth - 2):
            layers += [nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.SiLU()]
        self.dec = nn.Sequential(*layers, nn.Linear(hidden, 2))
        self.register_buffer('freqs', torch.arange(1, 9, dtype=torch.float32))

    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_logits=False, encoder_only=False):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        sd = self.sigma_data
        c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in, c_noise = 1 / (sigma ** 2 + sd ** 2).sqrt(), sigma.log() / 4
        emb = torch.cat([(c_noise * self.freqs).sin(), (c_noise * self.freqs).cos()], 1)
        h = self.enc(torch.cat([c_in * x.float(), emb], 1))
        logits = h.mean(1, keepdim=True)  # channel mean of the encoder features, as SiDA does on the UNet
        if encoder_only:
            return logits
        D_x = c_skip * x.float() + c_out * self.dec(h)
        return (D_x, logits) if return_logits else D_x

def toy_quality(x, teacher):
    """(energy distance to exact samples, modes covered, fraction of samples within 2 s of a mode).
    For exact samples the last is 1 - exp(-2) = 0.865 (a 2-D Gaussian's mass within 2 std)."""
    gen = torch.Generator().manual_seed(1234)
    y = teacher.sample(len(x), gen).to(x)
    ed = 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()
    d = torch.cdist(x.double(), teacher.mu)                                   # (N, K)
    near = d.min(1).values < 2 * teacher.s
    hits = torch.bincount(d.argmin(1)[near], minlength=len(teacher.mu))
    covered = int((hits >= 0.2 * len(x) / len(teacher.mu)).sum())            # a mode holds >= 20 % of its share
    return float(ed), covered, float(near.float().mean())

def toy_pretrain(net, teacher, steps=600, batch=512, lr=2e-3, seed=0):
    """Fit the MLP to the exact denoiser over EDM's sigma range, so that G, f_psi start as 'the teacher' as in SiD."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        x0 = teacher.sample(batch, gen)
        sigma = (torch.randn(batch, 1, generator=gen) * 1.6 - 0.4).exp().clamp(0.002, 80)
        x = x0 + sigma * torch.randn(batch, 2, generator=gen)
        loss = (edm_weight(sigma) * (net(x, sigma) - teacher(x, sigma)) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return net

def toy_picture(frames, teacher, path, size=256, extent=1.4):
    """Samples (white dots) over the true density (grey); one panel per (title, points); PNG or animated GIF."""
    from PIL import Image, ImageDraw
    g = torch.linspace(-extent, extent, size)
    grid = torch.stack(torch.meshgrid(g, -g, indexing='xy'), -1).reshape(-1, 2)
    dens = teacher.log_prob(grid, torch.full((len(grid), 1), 1e-3)).exp().reshape(size, size)
    bg = (dens / dens.max()).clamp(0, 1).pow(0.3).mul(110).byte().numpy()
    panels = []
    for title, pts in frames:
        im = Image.fromarray(bg).convert('RGB')
        dr = ImageDraw.Draw(im)
        uv = ((pts.float().clamp(-extent, extent) / extent + 1) * (size - 1) / 2).tolist()
        for u, v in uv:
            dr.point((u, size - 1 - v), fill=(255, 220, 80))
        dr.text((4, 4), title, fill=(255, 255, 255))
        panels.append(im)
    tmp = path + '.tmp'
    if path.endswith('.gif'):
        panels[0].save(tmp, format='GIF', save_all=True, append_images=panels[1:], duration=80, loop=0)
    else:
        canvas = Image.new('RGB', (size * len(panels), size))
        for i, p in enumerate(panels):
            canvas.paste(p, (i * size, 0))
        canvas.save(tmp, format='PNG')
    os.replace(tmp, path)

# SIGN's multi-step noise levels on the toy. The student is time-free, and in 2-D a re-noised point x + sigma*eps
# with sigma above the mode width (s = 0.1) looks like a clean tail point, so f cannot undo the noise: re-noising
# at 0.8 or 0.2 makes the samples worse (README, SIGN), at <= 0.1 each step sharpens them. (In image space
# sigma is readable from the input itself, ||x_sigma - x|| ~ sigma*sqrt(d), and larger levels are usable.)
TOY_SIGN_SIGMAS = (0.1, 0.05, 0.02)

def toy_data_stream(teacher, batch, seed, start=0):
    """Infinite (x_r, labels) batches of exact mixture samples: the toy's 'real data' for SiDA and SIGN."""
    gen = torch.Generator().manual_seed(seed + 99)
    for _ in range(start):  # replay the stream up to where a resumed run stopped
        teacher.sample(batch, gen)
    while True:
        yield teacher.sample(batch, gen), torch.zeros(batch, 0)

#----------------------------------------------------------------------------
# Real data (SiDA's real images; fid.py's reference sets): the CIFAR-10 python archive, or an EDM-style
# zip / folder of images with optional dataset.json labels. Everything is decoded once and held in memory
# as uint8, like EDM's ImageFolderDataset(cache=True).

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
_NP_RECONSTRUCT = np.ndarray(0).__reduce__()[0]  # numpy's array-unpickling helper, whatever its module path

class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR-10 batches are plain dicts of bytes, lists and numpy arrays: allow only numpy's array
    reconstruction (plus the bytes codec that Python-3 protocol-2 pickles use), refuse every other global."""
    def find_class(self, module, name):
        if name == '_reconstruct' and module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            return _NP_RECONSTRUCT
        if module == 'numpy' and name in ('ndarray', 'dtype'):
            return getattr(np, name)
        if (module, name) == ('_codecs', 'encode'):
            return lambda s, encoding='utf-8': s.encode(encoding)  # str.encode admits text codecs only
        raise pickle.UnpicklingError(f'refusing to unpickle global {module}.{name}')

def _one_hot(ys, path, num=None):
    """Integer class labels -> float32 one-hot [N, num], num = max + 1 unless given (EDM's label_dim)."""
    ys = torch.as_tensor(ys)
    if ys.dim() != 1 or ys.is_floating_point() or (ys < 0).any() or (num is not None and (ys >= num).any()):
        raise ValueError(f'{path}: labels must be one integer class in [0, {num or "inf"}) per image')
    return F.one_hot(ys.long(), num or int(ys.max()) + 1).float()

def _load_cifar_archive(path):
    """cifar-10-python.tar.gz -> uint8 [50000,3,32,32] and labels, data_batch_1..5 in order (as EDM's dataset_tool)."""
    xs, ys = [], []
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for i in range(1, 6):
                d = _CifarUnpickler(tar.extractfile(f'cifar-10-batches-py/data_batch_{i}'), encoding='bytes').load()
                xs.append(np.asarray(d[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys += list(d[b'labels'])
    except (tarfile.TarError, EOFError, OSError, zlib.error, KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f'{path}: not a readable CIFAR-10 python archive ({type(e).__name__}: {e})') from None
    images = np.concatenate(xs)
    if len(ys) != len(images):
        raise ValueError(f'{path}: {len(images)} images but {len(ys)} labels')
    return images, _one_hot(ys, path, 10)

def _load_image_files(path):
    """EDM layout: image files at any depth, sorted by name; dataset.json {"labels": [[name, int], ...] or null}."""
    if os.path.isdir(path):
        names = [os.path.relpath(os.path.join(r, f), path).replace(os.sep, '/') for r, _, fs in os.walk(path) for f in fs]
        read = lambda name: pathlib.Path(path, name).read_bytes()
    else:
        zf = zipfile.ZipFile(path)
        names, read = zf.namelist(), zf.read
    files = sorted(n for n in names if n.lower().endswith(('.png', '.jpg', '.jpeg')))
    if not files:
        raise ValueError(f'{path}: no .png/.jpg images found')
    labels = torch.zeros(len(files), 0)
    meta = json.loads(read('dataset.json')).get('labels') if 'dataset.json' in names else None
    if meta is not None:  # check the labels before decoding anything
        meta = dict(meta)
        missing, extra = [n for n in files if n not in meta], sorted(set(meta) - set(files))
        if missing:
            raise ValueError(f'{path}: dataset.json has no label for {len(missing)} image(s), e.g. {missing[0]}')
        if extra:
            raise ValueError(f'{path}: dataset.json names {len(extra)} file(s) not in the dataset, e.g. {extra[0]}')
        labels = _one_hot([meta[n] for n in files], path)
    images = None
    for i, name in enumerate(files):
        with PIL.Image.open(io.BytesIO(read(name))) as im:  # grayscale -> C=1, anything else -> RGB
            a = np.asarray(im if im.mode in ('L', 'RGB') else im.convert('L' if im.mode in ('1', 'LA') else 'RGB'))
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
        if images is None:
            images = np.empty((len(files), *a.shape), dtype=np.uint8)
        elif a.shape != images.shape[1:]:
            raise ValueError(f'{path}: {name} is {a.shape} (C,H,W) but {files[0]} is {images.shape[1:]}')
        images[i] = a
    return images, labels

def load_image_dataset(path):
    """Real images -> (uint8 [N,C,H,W], float32 one-hot labels [N,L], L=0 without labels). path: 'cifar10'
    (the python archive, downloaded once to the cache), a cifar-10-python.tar.gz, an EDM .zip or a folder."""
    path = os.fspath(path)
    if path == 'cifar10':
        import edm_nets  # only needed for the download
        path = edm_nets.download(CIFAR10_URL)
    if not os.path.exists(path):
        raise FileNotFoundError(f'dataset not found: {path}')
    if path.endswith(('.tar.gz', '.tgz')):
        images, labels = _load_cifar_archive(path)
    elif os.path.isdir(path) or path.endswith('.zip'):
        try:
            images, labels = _load_image_files(path)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise ValueError(f'{path}: unreadable dataset ({type(e).__name__}: {e})') from None
    else:
        raise ValueError(f'{path}: expected cifar10, a CIFAR-10 python .tar.gz, an EDM-style .zip or a folder')
    return torch.from_numpy(images), labels

def infinite_batches(images, labels, batch, seed, rank=0, world_size=1, start=0):
    """Endless (x [batch,C,H,W] float32 in [-1,1], labels [batch,L]). Each epoch is a permutation drawn from
    (seed, epoch), identical on all ranks (so pass the same seed everywhere); rank r takes every
    world_size-th entry, so ranks see disjoint shards. Batches run across epoch boundaries. `start` skips
    the first `start` batches (resume) without drawing them."""
    n, idx = len(images), torch.zeros(0, dtype=torch.long)
    if n < world_size:
        raise ValueError(f'{n} images cannot be sharded over {world_size} ranks')
    m = len(range(rank, n, world_size))                 # indices this rank gets per epoch
    epoch, skip = divmod(start * batch, m)
    while True:
        while len(idx) < batch:
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]))
            idx, epoch = torch.cat([idx, torch.randperm(n, generator=gen)[rank::world_size][skip:]]), epoch + 1
            skip = 0
        b, idx = idx[:batch], idx[batch:]
        yield images[b].float() / 127.5 - 1, labels[b]

def check_dataset_matches(images, labels, net):
    """Fail before training if the data cannot feed the teacher; returns the labels to use (none for an
    unconditional teacher, which ignores them: e.g. CIFAR-10 comes with labels)."""
    C, H, W = images.shape[1:]
    if H != net.img_resolution or W != net.img_resolution:
        raise ValueError(f'dataset resolution {H}x{W} does not match the teacher resolution {net.img_resolution}')
    if C != net.img_channels:
        raise ValueError(f'dataset has {C} channels but the teacher has {net.img_channels}')
    if net.label_dim and labels.shape[1] != net.label_dim:
        raise ValueError(f'dataset label_dim {labels.shape[1]} does not match the teacher label_dim {net.label_dim}')
    return labels if net.label_dim else labels[:, :0]

#----------------------------------------------------------------------------
# Configuration: one flat dataclass; a dataset preset fills in the official SiD / SiDA hyper-parameters
# (sid-official.md §6, main:run_sid.sh and sida:run_sida.sh, without the scripts' bugs), and every field
# can be overridden on the command line as --field-name.

@dataclasses.dataclass
class Config:
    dataset: str = 'toy'          # toy | cifar10 | cifar10-cond | imagenet64 | ffhq64 | afhqv2-64
    method: str = 'sid'           # sid | sida (SiD²A with --init-generator) | sign
    outdir: str = ''              # run directory ('' = runs/<dataset>-<method>)
    teacher: str = ''             # EDM .pkl path or URL ('' = the preset's official teacher; 'random' = untrained, for tests)
    data: str = ''                # real images: cifar10 | EDM zip | folder (labels for cond. nets; needed by sida, sign)
    init_generator: str = ''      # SiD²A: G and G_ema start from this SiD checkpoint (ours or official .pkl)
    resume: str = ''              # run directory or training-state.pt to continue from
    seed: int = 0                 # global seed; rank r uses seed*world + r
    alpha: float = 1.2            # SiD's alpha in the generator loss
    sigma_init: float = 2.5       # G(sigma_init * eps; sigma_init): the generator's input noise level
    tmax: float = 800             # generator-loss levels: t ~ U(0, tmax/1000) -> sigma <= 24.41 for 800
    lr: float = 1e-5              # Adam lr of the fake score f_psi (constant)
    glr: float = 1e-5             # Adam lr of the generator G (constant)
    g_beta1: float = 0.0          # G's Adam beta1 (f_psi always uses 0)
    batch: int = 256              # images per iteration over all GPUs (counted in kimg)
    batch_gpu: int = 16           # images per GPU per micro-batch (gradient accumulation fills the rest)
    dropout: float = 0.13         # dropout of G and f_psi (the teacher never uses dropout)
    augment: float = 0.12         # EDM augmentation probability in the fake-score step (0 = none)
    ema_mimg: float = 0.5         # G_ema half-life in Mimg (5 % ramp-up)
    duration_mimg: float = 500    # training length in Mimg of generator samples
    ls: float = 1.0               # fake-score loss scale
    lsg: float = 100.0            # SiD generator loss scale
    lsd: float = 1.0              # SiDA: discriminator loss scale
    lsg_gan: float = 0.01         # SiDA: generator adversarial loss scale
    sida_warmup_kimg: float = 100 # SiDA: G is frozen (only f_psi / D train) until this many kimg
    sida_mix_kimg: float = 200    # SiDA: pure SiD until this many kimg, then 0.5 SiD + 0.5 adversarial
    lambda_idem: float = 100.0    # SIGN: idempotence weight (terms are pixel sums like SiD's, which has lsg = 100)
    lambda_rec: float = 100.0     # SIGN: reconstruction weight (real images are fixed points)
    lambda_flow: float = 30.0     # SIGN: teacher-flow consistency weight (weights chosen on the toy, README)
    precision: str = 'fp32'       # fp32 (TF32 off, official) | tf32 | bf16 (autocast) | fp16 (EDM per-layer casting)
    channels_last: int = 0        # 1 = NHWC memory layout for the image nets (faster GPU convs; same maths)
    fused_adam: int = 0           # 1 = Adam's fused kernel (same update up to float rounding)
    compile: int = 0              # 1 = torch.compile the three networks (compiles for minutes at start-up)
    checkpointing: int = 0        # 1 = recompute UNet blocks in backward: less memory, ~30 % more compute
    tick_kimg: float = 10         # status line every this many kimg
    snap_kimg: float = 500        # snapshot (G_ema, training state, sample grid) every this many kimg
    fid_every_kimg: float = 0     # FID of G_ema every this many kimg (0 = off)
    fid_num: int = 50000          # images for each FID
    fid_ref: str = ''             # FID reference .npz or preset name ('' = the dataset's EDM reference)
    net_overrides: str = ''       # JSON dict of EDM network kwargs (e.g. tiny nets with --teacher random)
    device: str = ''              # cuda | cpu ('' = cuda if available)

C10 = dict(teacher='cifar10-32x32-uncond-vp', fid_ref='cifar10-32x32', batch=256, batch_gpu=16,
           lr=1e-5, glr=1e-5, dropout=0.13, augment=0.12, ema_mimg=0.5, tick_kimg=10, snap_kimg=500)
P64 = dict(batch=512, batch_gpu=32, lr=1e-5, glr=1e-5, dropout=0.05, augment=0.15, precision='fp16', tick_kimg=10, snap_kimg=500)
PRESETS = {  # SiD (sid-official.md §6); method-specific changes in METHOD_PRESETS
    'toy':          dict(alpha=1.2, lr=1e-3, glr=1e-3, batch=256, batch_gpu=256, dropout=0.0, augment=0.0,
                         ema_mimg=0.02, duration_mimg=0.2, tick_kimg=20, snap_kimg=200, device='cpu'),
    'cifar10':      dict(C10, duration_mimg=500),
    'cifar10-cond': dict(C10, teacher='cifar10-32x32-cond-vp', duration_mimg=800),
    'imagenet64':   dict(teacher='imagenet-64x64-cond-adm', data='', fid_ref='imagenet-64x64', batch=8192, batch_gpu=16,
                         lr=4e-6, glr=4e-6, dropout=0.10, augment=0.0, ema_mimg=2, precision='fp16',
                         duration_mimg=1000, tick_kimg=20, snap_kimg=1000),
    'ffhq64':       dict(P64, teacher='ffhq-64x64-uncond-vp', fid_ref='ffhq-64x64', g_beta1=0.9, duration_mimg=500),
    'afhqv2-64':    dict(P64, teacher='afhqv2-64x64-uncond-vp', fid_ref='afhqv2-64x64', alpha=1.0, lr=5e-6, glr=5e-6,
                         duration_mimg=500),
}
METHOD_PRESETS = {  # SiDA (sida:run_sida.sh): alpha 1, larger micro-batches; SiD²A uses duration 100 Mimg
    'sida': {'cifar10': dict(alpha=1.0, batch_gpu=32, data='cifar10', duration_mimg=300),
             'cifar10-cond': dict(alpha=1.0, batch_gpu=32, data='cifar10', duration_mimg=300),
             'imagenet64': dict(alpha=1.0, batch_gpu=32, duration_mimg=300), 'ffhq64': dict(alpha=1.0, batch_gpu=64, g_beta1=0.0, duration_mimg=200),
             'afhqv2-64': dict(alpha=1.0, batch_gpu=64, duration_mimg=200),
             'toy': dict(alpha=1.0, sida_warmup_kimg=5, sida_mix_kimg=10, lsg_gan=2.0)},  # scaled to the toy (README)
}

def make_config(overrides):
    """Defaults <- dataset preset <- method preset <- command line; then checks (one-line errors)."""
    ds, method = overrides.get('dataset', 'toy'), overrides.get('method', 'sid')
    if ds not in PRESETS:
        raise ValueError(f"unknown --dataset '{ds}' (choose from {', '.join(PRESETS)})")
    if method not in ('sid', 'sida', 'sign'):
        raise ValueError(f"unknown --method '{method}' (choose from sid, sida, sign)")
    mp = dict(METHOD_PRESETS.get(method, {}).get(ds, {}))
    if method == 'sida' and overrides.get('init_generator'):
        mp['duration_mimg'] = 100 if ds != 'toy' else PRESETS['toy']['duration_mimg']
    cfg = Config(**{**PRESETS[ds], **mp, **overrides})
    if not cfg.outdir and cfg.resume:  # a resumed run continues in its own directory
        cfg.outdir = cfg.resume if os.path.isdir(cfg.resume) else os.path.dirname(cfg.resume)
    cfg.outdir = cfg.outdir or os.path.join('runs', f'{cfg.dataset}-{cfg.method}')
    for k in ('batch', 'batch_gpu', 'fid_num'):
        if getattr(cfg, k) <= 0:
            raise ValueError(f'--{k.replace("_", "-")} must be positive, got {getattr(cfg, k)}')
    for k in ('lr', 'glr', 'duration_mimg', 'tick_kimg', 'snap_kimg', 'ema_mimg'):
        if not getattr(cfg, k) > 0:
            raise ValueError(f'--{k.replace("_", "-")} must be positive, got {getattr(cfg, k)}')
    if not 0 < cfg.alpha <= 2:
        raise ValueError(f'--alpha must lie in (0, 2], got {cfg.alpha}')
    if not 0.002 < cfg.sigma_init <= 80:
        raise ValueError(f'--sigma-init must lie in (0.002, 80], got {cfg.sigma_init}')
    if not 0 < cfg.tmax <= 1000:
        raise ValueError(f'--tmax must lie in (0, 1000], got {cfg.tmax}')
    if not (0 <= cfg.dropout < 1 and 0 <= cfg.augment <= 1 and 0 <= cfg.g_beta1 < 1):
        raise ValueError('--dropout, --augment and --g-beta1 must lie in [0, 1)')
    if cfg.precision not in ('fp32', 'tf32', 'bf16', 'fp16'):
        raise ValueError(f"unknown --precision '{cfg.precision}' (fp32, tf32, bf16, fp16)")
    for k in ('channels_last', 'fused_adam', 'compile', 'checkpointing'):
        if getattr(cfg, k) not in (0, 1):
            raise ValueError(f'--{k.replace("_", "-")} must be 0 or 1, got {getattr(cfg, k)}')
    if cfg.dataset == 'toy' and (cfg.data or cfg.fid_every_kimg > 0):
        raise ValueError('--data and --fid-every-kimg do not apply to the toy (it is scored against its exact mixture)')
    return cfg

#----------------------------------------------------------------------------
# Networks. Teacher f_phi, fake score f_psi and generator G all start from the teacher's weights (SiD §4);
# G and f_psi are rebuilt with the run's dropout and precision. The toy uses the exact mixture denoiser
# as f_phi and an MLP fitted to it as the common starting point of G and f_psi.

def build_networks(cfg, device):
    """-> (f_phi, G, f_psi), with f_phi frozen and in eval mode."""
    if cfg.dataset == 'toy':
        f_phi = ToyMixture().to(device)
        torch.manual_seed(0)  # same MLP starting point for every seed: the run's seed varies only the training
        base = toy_pretrain(ToyDenoiser(dropout=cfg.dropout), f_phi.cpu()).to(device)
        G, f_psi = base, copy.deepcopy(base)
    else:
        import edm_nets
        name = cfg.teacher or PRESETS[cfg.dataset]['teacher']
        over = json.loads(cfg.net_overrides) if cfg.net_overrides else {}
        if name == 'random':  # an untrained net of the preset's architecture (tests, benchmarks)
            torch.manual_seed(0)
            f_phi = edm_nets.build_preset(PRESETS[cfg.dataset]['teacher'], **over)
        else:
            f_phi = edm_nets.load_edm_pickle(edm_nets.PRESETS[name]['url'] if name in edm_nets.PRESETS else name)
        kw = dict(f_phi.init_kwargs, **over, use_fp16=cfg.precision == 'fp16')
        state = f_phi.state_dict()
        f_phi = edm_nets.EDMPrecond(**dict(kw, dropout=0.0))
        G = edm_nets.EDMPrecond(**dict(kw, dropout=cfg.dropout))
        for net in (f_phi, G):
            net.load_state_dict(state)
        f_phi, G = f_phi.to(device), G.to(device)
        f_psi = copy.deepcopy(G)
    if cfg.init_generator:  # SiD²A: G (and so G_ema) from a SiD generator; f_psi stays the teacher
        G.load_state_dict(load_generator(cfg.init_generator)[0].state_dict())
    return f_phi.eval().requires_grad_(False), G, f_psi

def load_generator(path):
    """A generator from our snapshot (file or run directory) or an official SiD/EDM .pkl -> (net, config dict)."""
    if os.path.isdir(path):
        snaps = sorted((f for f in os.listdir(path) if f.startswith('network-snapshot-') and f.endswith('.pt')),
                       key=lambda f: (len(f), f))  # numeric order, also past 999999 kimg
        if not snaps:
            raise FileNotFoundError(f'no network-snapshot-*.pt in {path}')
        path = os.path.join(path, 'network-snapshot-best.pt' if 'network-snapshot-best.pt' in snaps else snaps[-1])
    if not os.path.exists(path) and '://' not in path:
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.pt'):
        try:
            ck = torch.load(path, map_location='cpu', weights_only=True)
            if ck.get('net_class') == 'ToyDenoiser':
                net = ToyDenoiser(**ck['net_kwargs'])
            else:
                import edm_nets
                net = edm_nets.EDMPrecond(**ck['net_kwargs'])
            net.load_state_dict(ck['G_ema'])
        except Exception as e:
            raise ValueError(f'cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}')
        return net.eval().requires_grad_(False), ck.get('config', {})
    import edm_nets  # an official .pkl through the safe loader (no code from the pickle is run)
    return edm_nets.load_edm_pickle(path), {}

def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)

#----------------------------------------------------------------------------
# Scale-out and speed helpers (sid-official.md §9, §10): DDP wrapping, a cross-rank parameter check, and
# gradient checkpointing of EDM's UNet blocks. None of them changes the maths.

def ddp_wrap(net, device, never_used=()):
    """DistributedDataParallel as in the official code: no per-step search for unused parameters and no buffer
    broadcast. Without the search DDP waits for a gradient of every trainable parameter, so parameters this run
    never reaches (names containing a `never_used` entry, e.g. G's augmentation embedding) are excluded."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    skip = [n for n, _ in net.named_parameters() if any(u in n for u in never_used)]
    DDP._set_params_and_buffers_to_ignore_for_model(net, skip)  # identical on every rank: never updated
    return DDP(net, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=False)

@torch.no_grad()
def check_ranks_agree(nets, what=''):
    """Raise unless every rank holds bit-identical parameters (a per-tensor float64 sum, all-gathered). DDP keeps
    replicas equal only if each rank steps on the same all-reduced gradients; a desync would otherwise go unseen."""
    import torch.distributed as dist
    s = torch.stack([p.double().sum() for net in nets for p in net.parameters()])
    out = [torch.empty_like(s) for _ in range(dist.get_world_size())]
    dist.all_gather(out, s)
    bad = [r for r, o in enumerate(out) if not torch.equal(o, out[0])]
    if bad:
        raise RuntimeError(f'DDP replicas diverged{what}: rank(s) {bad} differ from rank 0')

def checkpoint_unet_blocks_(net):
    """Gradient checkpointing: each edm_nets.UNetBlock of `net` keeps only its inputs and recomputes its activations
    during backward. Non-reentrant checkpointing (use_reentrant=False) gives input gradients (the teacher's and
    f_psi's in the generator step), works under DDP and torch.compile; preserve_rng_state=True replays the same
    dropout masks in the recomputation. Patches the instances in place: apply it after any deepcopy of `net`."""
    import edm_nets
    from torch.utils.checkpoint import checkpoint
    for block in net.modules():
        if isinstance(block, edm_nets.UNetBlock):
            block.forward = lambda x, emb, fwd=block.forward: (
                checkpoint(fwd, x, emb, use_reentrant=False, preserve_rng_state=True) if torch.is_grad_enabled() else fwd(x, emb))
    return net

#----------------------------------------------------------------------------
# Training loop (SiD Algorithm 1; official update order, sid-official.md §4): per iteration a fake-score
# step on fresh generator samples, then a generator step against the just-updated f_psi, then the EMA of G.
# Progress is counted in generator images (kimg), not iterations.

def iterate(cfg, nets=None):
    """Run (or resume) a distillation as a generator: one namespace per iteration (images seen, this iteration's
    losses as tensors, the networks), then a last one when the run has ended. `nets` = (f_phi, G, f_psi) for tests;
    bench.py times next() on it. train() below runs it to the end."""
    from contextlib import nullcontext
    import torch.distributed as dist
    # Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on CPUs.
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()  # a caller's (e.g. a test's) group is left to the caller
    if own_group:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if cfg.batch % (cfg.batch_gpu * world):
        raise ValueError(f'--batch {cfg.batch} must be a multiple of --batch-gpu x GPUs = {cfg.batch_gpu * world}')
    batch_gpu_total = cfg.batch // world                 # images per GPU per iteration
    rounds = batch_gpu_total // cfg.batch_gpu            # gradient-accumulation rounds
    # Precision: the official runs keep TF32 off; bf16 is autocast; fp16 is EDM's per-layer casting (use_fp16).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision == 'tf32'
    torch.backends.cudnn.benchmark = True  # official default: cuDNN times its conv algorithms once per shape
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.precision == 'bf16' else nullcontext
    log = print if rank == 0 else (lambda *a, **k: None)

    def append_stats(entry):  # one JSON line of stats.jsonl (rank 0 only)
        if rank == 0:
            with open(os.path.join(cfg.outdir, 'stats.jsonl'), 'a') as f:
                f.write(json.dumps(entry) + '\n')

    if cfg.dataset == 'toy':
        device = torch.device('cpu')  # the toy is tiny: the CPU is faster than launching GPU kernels
    f_phi, G, f_psi = nets if nets is not None else build_networks(cfg, device)
    if cfg.channels_last and cfg.dataset != 'toy':  # NHWC weights; conv outputs follow, inputs may stay NCHW
        for net in (f_phi, G, f_psi):  # before DDP, whose gradient buckets copy the parameters' layout
            net.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    is_image = cfg.dataset != 'toy'
    pipe = None
    if is_image and cfg.augment > 0:  # SiD: EDM's non-leaky augmentation in the fake-score step only
        import edm_nets
        pipe = edm_nets.AugmentPipe(p=cfg.augment, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    eps = 1e-6 if cfg.precision == 'fp16' else 1e-8
    fused = True if cfg.fused_adam else None  # one fused kernel instead of foreach ops; same formula
    opt_psi = torch.optim.Adam(f_psi.parameters(), lr=cfg.lr, betas=(0.0, 0.999), eps=eps, fused=fused)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.glr, betas=(cfg.g_beta1, 0.999), eps=eps, fused=fused)
    cur_nimg, data_batches, stats_fid = 0, 0, []

    # Resume: weights, optimisers, images seen and data position; the RNG follows from (seed, images seen).
    if cfg.resume:
        path = os.path.join(cfg.resume, 'training-state.pt') if os.path.isdir(cfg.resume) else cfg.resume
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--resume: no training state at {path}')
        st = torch.load(path, map_location=device, weights_only=True)
        for obj, key in ((G, 'G'), (G_ema, 'G_ema'), (f_psi, 'f_psi'), (opt_G, 'opt_G'), (opt_psi, 'opt_psi')):
            obj.load_state_dict(st[key])
        cur_nimg = st['cur_nimg']
        data_batches = st['data_images'] // (cfg.batch_gpu * world)
        stats_fid = [tuple(p) for p in st.get('fid', [])]
        log(f'resumed from {path} at {cur_nimg / 1e3:.1f} kimg')

    # Data: class labels for conditional nets, real images for SiDA / SIGN. Without --data, uniform labels.
    data = None
    needs_real = cfg.method == 'sida' or bool(cfg.data)  # SiD with --data: labels from it, shape checked (as official)
    if cfg.dataset == 'toy' and cfg.method in ('sida', 'sign'):
        data = toy_data_stream(f_phi, cfg.batch_gpu, cfg.seed * world + rank, start=data_batches)
    elif needs_real:
        if not cfg.data:
            raise ValueError(f'--method {cfg.method} needs real images: pass --data PATH')
        images, labels = load_image_dataset(cfg.data)
        labels = check_dataset_matches(images, labels, f_phi)
        data = infinite_batches(images, labels, cfg.batch_gpu, cfg.seed, rank, world, start=data_batches)
    # FID reference and detector are fetched now: a bad --fid-ref fails before training, not at the first FID.
    fid_tools = load_fid_tools(cfg, device) if cfg.fid_every_kimg > 0 else None

    def next_batch():
        """(real images or None, labels or None) for one micro-batch."""
        nonlocal data_batches
        if data is not None:
            data_batches += 1
            x_r, c = next(data)
            x_r, c = x_r.to(device), c.to(device)
            return x_r, (c if G.label_dim else None)
        c = None
        if G.label_dim:
            c = F.one_hot(torch.randint(G.label_dim, (cfg.batch_gpu,), device=device), G.label_dim).float()
        return None, c

    shape = [cfg.batch_gpu, 2] if not is_image else [cfg.batch_gpu, G.img_channels, G.img_resolution, G.img_resolution]
    # DDP: G and f_psi are wrapped, the teacher is not. G never gets augment labels, f_psi only with --augment > 0:
    # their augmentation embeddings get no gradient and are excluded (DDP would otherwise wait for them forever).
    # Only gradients are averaged: batch statistics (SiDA's micro-batch BCE means) stay per rank, as officially.
    G_ddp, psi_ddp = G, f_psi
    if world > 1:
        G_ddp = ddp_wrap(G, device, never_used=['map_augment'])
        psi_ddp = ddp_wrap(f_psi, device, never_used=['map_augment'] if pipe is None else [])

    def sync(ddp, last):  # accumulate without all-reduce; forward AND backward of a round sit in one context
        return ddp.no_sync() if world > 1 and not last else nullcontext()

    if rank == 0:
        os.makedirs(cfg.outdir, exist_ok=True)
        with open(os.path.join(cfg.outdir, 'config.json'), 'w') as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    log(json.dumps(dataclasses.asdict(cfg), indent=2))
    log(f'{world} process(es) on {device}; {rounds} accumulation round(s) of {cfg.batch_gpu}; '
        f'G {sum(p.numel() for p in G.parameters()) / 1e6:.2f}M parameters')
    toy_frames, toy_z = [], torch.randn(2000, 2, generator=torch.Generator().manual_seed(7)) * cfg.sigma_init
    if cfg.dataset == 'toy':
        with torch.no_grad():
            x0 = generate(G_ema, toy_z.to(device), None, cfg.sigma_init).cpu()
        q0 = toy_quality(x0, f_phi)
        toy_frames.append(('0 kimg', x0))
        log(f'toy start: energy distance {q0[0]:.4f}, modes covered {q0[1]}/8, within 2 std of a mode {q0[2]:.3f} (exact: 0.865)')
    end_nimg = int(cfg.duration_mimg * 1e6)
    tick_nimg, tick_time, start_time = cur_nimg, time.time(), time.time()
    # losses (fake score, G, SiDA's GAN / SIGN's IGN terms) summed as tensors: no host sync per micro-batch
    tick_sums, n_iter_tick = torch.zeros(3, dtype=torch.float64, device=device), 0
    G_frozen = frozen_copy(G) if cfg.method == 'sign' else None  # SIGN's f_theta-bar, refreshed every step

    # Fast paths, off by default. After every deepcopy of G (G_ema, G_frozen): a copy would share the patched or
    # compiled call of the original. compile keeps state_dict names (nn.Module.compile, not torch.compile(net)).
    for net in (f_phi, G, f_psi):
        if cfg.checkpointing and is_image:
            checkpoint_unet_blocks_(net)
        if cfg.compile:  # compiled dropout draws other masks than eager (same law); DDP's all-reduce then waits
            if is_image:  # for the whole compiled backward instead of overlapping with it. Image nets: regional
                import edm_nets  # compilation of the UNet blocks (minutes less warm-up than the whole net)
                edm_nets.compile_blocks(net)
            else:
                net.compile()

    def reseed(nimg, phase=0, r=0):  # the RNG of each micro-batch is a function of (seed, images seen, phase, global
        # micro-batch index rank*rounds + r): per-rank streams, exact replay on resume, and the same random numbers
        # for any split of the batch into GPUs x rounds (2 GPUs x 1 round = 1 GPU x 2 rounds, up to float sums)
        key = [cfg.seed, nimg // cfg.batch, phase, rank * rounds + r]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))
    reseed(cur_nimg)
    while cur_nimg < end_nimg:
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # this iteration's losses
        # Phase 1: fake-score step. G makes samples without a graph, with its dropout off; f_psi trains with
        # dropout on, on augmented images (SiDA: plus the discriminator term on real images).
        G.eval(); f_psi.train().requires_grad_(True)
        opt_psi.zero_grad(set_to_none=True)
        for r in range(rounds):
            reseed(cur_nimg, 1, r)
            with sync(psi_ddp, r == rounds - 1):
                x_r, c = next_batch()
                z = cfg.sigma_init * torch.randn(shape, device=device)
                with torch.no_grad(), autocast():
                    x_g = generate(G, z, c, cfg.sigma_init).float()
                sigma = draw_sigma_fake(x_g)
                y, aug = pipe(x_g) if pipe is not None else (x_g, None)
                noise = torch.randn_like(x_g)
                with autocast():
                    if cfg.method == 'sida':
                        y_r, aug_r = pipe(x_r) if pipe is not None else (x_r, None)
                        dsm, d_loss = sida_fake_score_loss(psi_ddp, y, y_r, sigma, noise, c, aug, aug_r)
                        loss = (dsm.sum() * cfg.ls + d_loss.sum() * cfg.lsd) / batch_gpu_total
                    else:
                        loss = fake_score_loss(psi_ddp, y, sigma, noise, c, aug).sum() * cfg.ls / batch_gpu_total
                loss.backward()
                sums[0] += loss.detach()
        sanitize_grads_(f_psi.parameters(), 1.0 if cfg.method == 'sida' else None)  # SiDA clips at +-1
        opt_psi.step()

        # Phase 2: generator step. G trains with dropout on; f_psi in eval mode and frozen, but both f_psi
        # and the teacher are differentiated w.r.t. their input x_t (only w is detached in the SiD loss).
        phase = sida_phase(cur_nimg, cfg.sida_warmup_kimg, cfg.sida_mix_kimg) if cfg.method == 'sida' else 'sid'
        if phase != 'frozen':  # SiDA trains only f_psi / D for its first 100 kimg
            G_ddp.train(); f_psi.eval().requires_grad_(False)
            if cfg.method == 'sign':
                refresh_frozen_(G_frozen, G)  # theta' = theta at every step
            opt_G.zero_grad(set_to_none=True)
            for r in range(rounds):
                reseed(cur_nimg, 2, r)
                with sync(G_ddp, r == rounds - 1):
                    x_r, c = next_batch()
                    z = cfg.sigma_init * torch.randn(shape, device=device)
                    with autocast():
                        x_g = generate(G_ddp, z, c, cfg.sigma_init).float()
                        sigma = draw_sigma_generator(x_g, cfg.tmax)
                        noise = torch.randn_like(x_g)
                        if cfg.method == 'sida':
                            sid, gan = sida_generator_loss(f_phi, f_psi, x_g, sigma, noise, c, cfg.alpha)
                            loss = sid.sum() * cfg.lsg / batch_gpu_total
                            loss_gan = gan.sum() * cfg.lsg_gan / batch_gpu_total
                            sums[2] += loss_gan.detach()
                            total = 0.5 * loss + 0.5 * loss_gan if phase == 'mix' else loss
                        elif cfg.method == 'sign':  # x_r None: data-free, x = sg(x_g)
                            sf, sf_next = flow_sigmas(SIGN_DT + (cfg.tmax / 1000 - SIGN_DT) * torch.rand_like(sigma))
                            terms = sign_student_loss(G_ddp, G_frozen, f_phi, f_psi, x_g, c, sigma, noise, cfg.alpha, x_r,
                                                      sf, sf_next, torch.randn_like(x_g), cfg.lambda_idem, cfg.lambda_rec,
                                                      cfg.lambda_flow, cfg.sigma_init)
                            loss = terms['dm'].sum() * cfg.lsg / batch_gpu_total
                            extra = sum(getattr(cfg, 'lambda_' + k) * terms[k].sum() for k in ('idem', 'rec', 'flow'))
                            extra = extra / batch_gpu_total
                            sums[2] += extra.detach()
                            total = loss + extra
                        else:
                            loss = sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, c, cfg.alpha).sum() * cfg.lsg / batch_gpu_total
                            total = loss
                    total.backward()
                    sums[1] += loss.detach()
            sanitize_grads_(G.parameters())
            opt_G.step()

        # Phase 3: EMA of G with half-life ema_mimg, ramped up over the first 5 % of images seen.
        h = min(cfg.ema_mimg * 1e6, 0.05 * cur_nimg)
        beta = 0.5 ** (cfg.batch / max(h, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
        cur_nimg += cfg.batch
        tick_sums += sums
        n_iter_tick += 1
        yield types.SimpleNamespace(cur_nimg=cur_nimg, loss_fake=sums[0], loss_G=sums[1], loss_extra=sums[2],
                                    G=G, G_ema=G_ema, f_psi=f_psi)

        # Phase 4: maintenance once per tick: status line, stats.jsonl, snapshots, FID, toy frames.
        done = cur_nimg >= end_nimg

        def crossed(every_kimg):  # did this iteration cross a multiple of every_kimg (or end the run)?
            every = max(round(every_kimg * 1e3), 1)
            return every_kimg > 0 and (done or cur_nimg // every > (cur_nimg - cfg.batch) // every)
        if cfg.dataset == 'toy' and crossed(cfg.duration_mimg * 1e3 / 40):
            with torch.no_grad():
                toy_frames.append((f'{cur_nimg / 1e3:.0f} kimg', generate(G_ema, toy_z.to(device), None, cfg.sigma_init).cpu()))
        if crossed(cfg.tick_kimg):
            if world > 1:
                check_ranks_agree((G, f_psi), f' at {cur_nimg / 1e3:.1f} kimg')
                # each rank summed its own share of the batch (loss / batch_gpu_total): the mean over ranks is the
                # loss of the whole batch, the number a single GPU would log
                dist.all_reduce(tick_sums)
                tick_sums /= world
            loss_fake, loss_G, loss_extra = (tick_sums / n_iter_tick).tolist()
            now = time.time()
            sec_per_kimg = (now - tick_time) / max((cur_nimg - tick_nimg) / 1e3, 1e-9)
            entry = dict(kimg=cur_nimg / 1e3, sec_per_kimg=sec_per_kimg, loss_fake=loss_fake, loss_G=loss_G,
                         time=now - start_time)
            if cfg.method in ('sida', 'sign'):
                entry['loss_' + ('gan' if cfg.method == 'sida' else 'ign')] = loss_extra
            if device.type == 'cuda':
                entry['mem_gb'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            eta = sec_per_kimg * (end_nimg - cur_nimg) / 1e3
            log(f"kimg {entry['kimg']:<9.1f} sec/kimg {sec_per_kimg:<7.3f} eta {eta / 3600:<6.2f}h "
                f"loss_fake {entry['loss_fake']:<9.4g} loss_G {entry['loss_G']:<+9.4g}"
                + ''.join(f' {k} {entry[k]:.4g}' for k in ('loss_gan', 'loss_ign', 'mem_gb') if k in entry))
            append_stats(entry)
            tick_nimg, tick_time, n_iter_tick = cur_nimg, now, 0
            tick_sums.zero_()
        if crossed(cfg.fid_every_kimg):
            fid_value = evaluate_fid(cfg, G_ema, device, rank, world, fid_tools)
            stats_fid.append((cur_nimg / 1e6, fid_value))
            log(f'FID {fid_value:.3f} at {cur_nimg / 1e3:.1f} kimg')
            append_stats(dict(kimg=cur_nimg / 1e3, fid=fid_value))
            if rank == 0:
                fid.plot_curve(stats_fid, os.path.join(cfg.outdir, 'fid.png'))
                if fid_value <= min(v for _, v in stats_fid):
                    save_snapshot(cfg, G_ema, cur_nimg, os.path.join(cfg.outdir, 'network-snapshot-best.pt'), fid_value)
        if crossed(cfg.snap_kimg):
            if rank == 0:
                save_snapshot(cfg, G_ema, cur_nimg, os.path.join(cfg.outdir, f'network-snapshot-{cur_nimg // 1000:06d}.pt'))
                save_atomic(dict(G=G.state_dict(), G_ema=G_ema.state_dict(), f_psi=f_psi.state_dict(),
                                 opt_G=opt_G.state_dict(), opt_psi=opt_psi.state_dict(), cur_nimg=cur_nimg,
                                 data_images=data_batches * cfg.batch_gpu * world, fid=stats_fid,
                                 config=dataclasses.asdict(cfg)), os.path.join(cfg.outdir, 'training-state.pt'))
                if is_image:
                    save_grid(G_ema, os.path.join(cfg.outdir, f'samples-{cur_nimg // 1000:06d}.png'), cfg.sigma_init, device)
            reseed(cur_nimg)  # the same on every rank and in a resumed run

    if cfg.dataset == 'toy' and rank == 0:
        q1 = toy_quality(toy_frames[-1][1], f_phi)
        log(f'toy end:   energy distance {q1[0]:.4f}, modes covered {q1[1]}/8, within 2 std of a mode {q1[2]:.3f} (exact: 0.865)')
        if cfg.method == 'sign':  # IGN diagnostics and multi-step quality (sign.md §4)
            f = lambda v: generate(G_ema, v, None, cfg.sigma_init)
            x_data = f_phi.sample(2000, torch.Generator().manual_seed(5))
            log(f'sign: idempotence error E|f(f(z)) - f(z)| {idempotence_error(f, toy_z):.4f}, '
                f'fixed-point error E|f(x) - x| on data {fixed_point_error(f, x_data):.4f}')
            n = len(TOY_SIGN_SIGMAS)
            xs = multistep_sample(f, toy_z, TOY_SIGN_SIGMAS, [torch.randn(toy_z.shape, generator=torch.Generator().manual_seed(9 + k)) for k in range(n)])
            for k in sorted({1, 2, n + 1}):
                q = toy_quality(xs[k - 1], f_phi)
                log(f'sign: {k} step(s) (sigmas {list(TOY_SIGN_SIGMAS[:k - 1])}): energy distance {q[0]:.4f}, '
                    f'modes covered {q[1]}/8, within 2 std {q[2]:.3f}')
            # Projection (editing): data + 0.2*eps mapped back by one call of f; distance to the nearest mode center
            y = x_data + 0.2 * torch.randn(x_data.shape, generator=torch.Generator().manual_seed(11))
            near = lambda v: float(torch.cdist(v.double(), f_phi.mu).min(1).values.mean())
            log(f'sign: projection of data + 0.2 eps: mean distance to the nearest mode {near(y):.3f} -> '
                f'{near(project(f, y)):.3f} (data itself: {near(x_data):.3f})')
        toy_picture([toy_frames[0], toy_frames[-1]], f_phi, os.path.join(cfg.outdir, 'toy.png'))
        toy_picture(toy_frames, f_phi, os.path.join(cfg.outdir, 'toy.gif'))
        log(f"wrote {os.path.join(cfg.outdir, 'toy.png')} and toy.gif")
    if own_group:
        dist.destroy_process_group()
    yield types.SimpleNamespace(cur_nimg=cur_nimg, G=G, G_ema=G_ema, f_psi=f_psi)  # the run has ended

def train(cfg, nets=None):
    """Run (or resume) a distillation to its end; returns the final (G, G_ema, f_psi)."""
    for it in iterate(cfg, nets):
        pass
    return it.G, it.G_ema, it.f_psi

def save_snapshot(cfg, G_ema, cur_nimg, path, fid_value=None):
    """G_ema for sampling, readable with torch.load(weights_only=True) and by load_generator()."""
    save_atomic(dict(G_ema=G_ema.state_dict(), net_class=type(G_ema).__name__,
                     net_kwargs=dict(G_ema.init_kwargs, dropout=0.0), kimg=cur_nimg / 1e3, fid=fid_value,
                     config=dataclasses.asdict(cfg)), path)

#----------------------------------------------------------------------------
# Generation: one PNG per seed as EDM's generate.py does (per-seed latents and labels, x*127.5 + 128
# truncated to uint8), a sample grid, FID of G_ema, and SIGN's multi-step sampling and projection.

def seed_latents(seeds, shape, label_dim, sigma_init, class_idx=None):
    """z = sigma_init * eps and one-hot labels from one generator per seed (independent of the batch split)."""
    zs, cs = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        zs.append(torch.randn(shape, generator=g))
        cs.append(class_idx if class_idx is not None else int(torch.randint(max(label_dim, 1), (), generator=g)))
    c = F.one_hot(torch.tensor(cs), label_dim).float() if label_dim else None
    return sigma_init * torch.stack(zs), c

def sample_images(G, seeds, sigma_init, device, class_idx=None, sigmas=()):
    """G(z) for the seeds; with SIGN's `sigmas`, x_{k+1} = f(x_k + sigma_k eps) after the first step."""
    shape = [2] if isinstance(G, ToyDenoiser) else [G.img_channels, G.img_resolution, G.img_resolution]
    z, c = seed_latents(seeds, shape, G.label_dim, sigma_init, class_idx)
    z, c = z.to(device), (c.to(device) if c is not None else None)
    noises = [torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s) + 10 ** 6 * (k + 1)))
                           for s in seeds]).to(device) for k in range(len(sigmas))]  # fresh per step, per seed (any batch split)
    return multistep_sample(lambda v: generate(G, v, c, sigma_init), z, sigmas, noises)[-1]

def save_png_grid(images, path, cols=None):
    """uint8 NCHW -> one grid PNG (atomic)."""
    from PIL import Image
    n, ch, h, w = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = (n + cols - 1) // cols
    grid = torch.zeros(rows * h, cols * w, ch, dtype=torch.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im.permute(1, 2, 0)
    arr = grid.numpy()
    Image.fromarray(arr[:, :, 0] if ch == 1 else arr).save(path + '.tmp', format='PNG')
    os.replace(path + '.tmp', path)

def save_grid(G, path, sigma_init, device, n=64):
    """A grid of G_ema samples from the fixed seeds 0..n-1 (written at every snapshot)."""
    save_png_grid(to_uint8(sample_images(G, range(n), sigma_init, device)).cpu(), path)

def load_fid_tools(cfg, device):
    """(ref mu, ref sigma, detector) for in-loop FID; the detector honours $SID_DETECTOR."""
    mu, sigma = fid.load_ref(cfg.fid_ref or PRESETS[cfg.dataset].get('fid_ref', ''))
    return mu, sigma, fid.load_detector(device)

def evaluate_fid(cfg, G, device, rank=0, world=1, tools=None):
    """FID of G on cfg.fid_num images from seeds 0.. (own generators: the training RNG stream is untouched)."""
    mu, sigma, detector = tools or load_fid_tools(cfg, device)
    return fid.fid_of_generator(lambda seeds: sample_images(G, seeds, cfg.sigma_init, device), cfg.fid_num,
                                mu, sigma, detector, device, batch=64, rank=rank, world_size=world)

def parse_seeds(text):
    """'0-49999' or '1,5,10-19' -> list of ints."""
    out = []
    try:
        for part in text.split(','):
            a, _, b = part.partition('-')
            lo, hi = int(a), int(b) if b else int(a)
            if lo < 0 or hi < lo:
                raise ValueError
            out += range(lo, hi + 1)
    except ValueError:
        raise ValueError(f"bad --seeds '{text}': use e.g. 0-49999 or 1,5,10-19 (non-negative, increasing)")
    return out

def cmd_generate(a):
    """python sid.py generate --ckpt RUN_OR_FILE --seeds 0-49999 --outdir DIR [--grid] [--class-idx C] [--sigmas ...]"""
    seeds = parse_seeds(a.seeds)  # bad arguments fail before a large checkpoint is read
    if a.batch < 1:
        raise ValueError(f'--batch must be >= 1, got {a.batch}')
    G, cfg = load_generator(a.ckpt)
    device = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    G = G.to(device)
    sigma_init = cfg.get('sigma_init', 2.5)
    sigmas = [float(s) for s in a.sigmas.split(',')] if a.sigmas else []
    sigmas = sigmas[:a.steps - 1] if a.steps else sigmas
    if a.steps and len(sigmas) != a.steps - 1:
        raise ValueError(f'--steps {a.steps} needs {a.steps - 1} noise levels in --sigmas')
    if a.class_idx is not None and not 0 <= a.class_idx < max(G.label_dim, 1):
        raise ValueError(f'--class-idx must lie in [0, {G.label_dim}) for this generator')
    os.makedirs(a.outdir, exist_ok=True)
    if isinstance(G, ToyDenoiser):  # the toy writes points and a picture instead of PNG images
        x = sample_images(G, seeds, sigma_init, device, None, sigmas).cpu()
        np.save(os.path.join(a.outdir, 'samples.npy'), x.numpy())
        toy_picture([(f'{len(seeds)} samples', x)], ToyMixture(), os.path.join(a.outdir, 'samples.png'))
        print(f'wrote {len(seeds)} points to {a.outdir}/samples.npy and samples.png')
        return
    from PIL import Image
    images = []
    for i in range(0, len(seeds), a.batch):
        # oneDNN's CPU convolutions round differently per batch size; the native ones make a seed's PNG
        # independent of the batch split (on CPU; GPU kernels give no such promise).
        mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = mkldnn and device.type != 'cpu'
        try:
            x = to_uint8(sample_images(G, seeds[i:i + a.batch], sigma_init, device, a.class_idx, sigmas)).cpu()
        finally:
            torch.backends.mkldnn.enabled = mkldnn
        if a.grid:
            images.append(x)
            continue
        for s, im in zip(seeds[i:i + a.batch], x):
            arr = im.permute(1, 2, 0).numpy()
            Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(os.path.join(a.outdir, f'{s:06d}.png'))
    if a.grid:
        save_png_grid(torch.cat(images), os.path.join(a.outdir, 'grid.png'))
    print(f"wrote {len(seeds)} images to {a.outdir}{'/grid.png' if a.grid else ''}")

def cmd_project(a):
    """SIGN projection / editing: write f(y + sigma*eps), `repeat` times, for each input image (or toy .npy points)."""
    G, cfg = load_generator(a.ckpt)
    device = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    G, sigma_init = G.to(device), cfg.get('sigma_init', 2.5)
    if a.repeat < 1 or a.sigma < 0:
        raise ValueError('--repeat must be >= 1 and --sigma >= 0')
    if not os.path.exists(a.input):
        raise FileNotFoundError(f'--input not found: {a.input}')
    gen = torch.Generator(device).manual_seed(a.seed)
    os.makedirs(a.outdir, exist_ok=True)
    if a.input.endswith('.npy'):  # toy points [N, 2]
        y = torch.from_numpy(np.load(a.input)).float().to(device)
        if y.dim() != 2 or y.shape[1] != 2:
            raise ValueError(f'{a.input}: expected points of shape [N, 2], got {list(y.shape)}')
        x = project(lambda v: generate(G, v, None, sigma_init), y, a.sigma, gen, a.repeat)
        np.save(os.path.join(a.outdir, 'projected.npy'), x.cpu().numpy())
        print(f'wrote {len(x)} projected points to {a.outdir}/projected.npy')
        return
    files = [a.input] if os.path.isfile(a.input) else sorted(
        os.path.join(a.input, f) for f in os.listdir(a.input) if f.lower().endswith(('.png', '.jpg', '.jpeg')))
    c = None
    if G.label_dim:
        if a.class_idx is None or not 0 <= a.class_idx < G.label_dim:
            raise ValueError(f'this generator is class-conditional: pass --class-idx in [0, {G.label_dim})')
        c = F.one_hot(torch.tensor([a.class_idx]), G.label_dim).float().to(device)
    for path in files:
        with PIL.Image.open(path) as im:
            arr = np.asarray(im.convert('L' if G.img_channels == 1 else 'RGB'))
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        if arr.shape[:2] != (G.img_resolution, G.img_resolution):
            raise ValueError(f'{path}: {arr.shape[1]}x{arr.shape[0]} image, the generator makes {G.img_resolution}x{G.img_resolution}')
        y = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
        x = to_uint8(project(lambda v: generate(G, v, c, sigma_init), y, a.sigma, gen, a.repeat))[0].permute(1, 2, 0).cpu().numpy()
        PIL.Image.fromarray(x[:, :, 0] if x.shape[2] == 1 else x).save(os.path.join(a.outdir, os.path.basename(path).rsplit('.', 1)[0] + '.png'))
    print(f'wrote {len(files)} projected image(s) to {a.outdir}')

#----------------------------------------------------------------------------
# Command line: `python sid.py [options]` trains; `generate` and `project` use a trained generator.

def main(argv=None):
    import argparse
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == 'generate':
            p = argparse.ArgumentParser(prog='sid.py generate', description='one PNG per seed from a trained generator')
            p.add_argument('--ckpt', required=True, help='run directory, network-snapshot-*.pt or official .pkl')
            p.add_argument('--seeds', default='0-63', help='e.g. 0-49999 (default 0-63)')
            p.add_argument('--outdir', required=True)
            p.add_argument('--grid', action='store_true', help='write one grid.png instead of one PNG per seed')
            p.add_argument('--class-idx', type=int, default=None, help='class for conditional nets (default: random per seed)')
            p.add_argument('--steps', type=int, default=0, help='SIGN: number of steps (needs steps-1 --sigmas)')
            p.add_argument('--sigmas', default='', help='SIGN: noise levels between steps, e.g. 0.8,0.2')
            p.add_argument('--batch', type=int, default=64, help='images per forward pass')
            p.add_argument('--device', default='')
            return cmd_generate(p.parse_args(argv[1:]))
        if argv and argv[0] == 'project':
            p = argparse.ArgumentParser(prog='sid.py project', description='SIGN: project images onto the generator\'s fixed points, f(y + sigma*eps)')
            p.add_argument('--ckpt', required=True)
            p.add_argument('--input', required=True, help='a PNG or a folder of PNGs')
            p.add_argument('--outdir', required=True)
            p.add_argument('--sigma', type=float, default=0.0, help='noise added before each projection (0 = plain projection)')
            p.add_argument('--repeat', type=int, default=1, help='apply the projection this many times')
            p.add_argument('--class-idx', type=int, default=None, help='class for conditional generators')
            p.add_argument('--seed', type=int, default=0)
            p.add_argument('--device', default='')
            return cmd_project(p.parse_args(argv[1:]))
        p = argparse.ArgumentParser(prog='sid.py', description='SiD / SiDA / SIGN distillation of an EDM teacher '
                                    '(subcommands: generate, project; see --help of each)')
        import inspect, re  # each option's help is its field's comment in Config
        helps = dict(re.findall(r'^\s+(\w+): \w+ = [^#]*# (.*)$', inspect.getsource(Config), re.M))
        for f in dataclasses.fields(Config):
            p.add_argument('--' + f.name.replace('_', '-'), type=f.type if f.type in (int, float) else str, default=None,
                           metavar=f.type.__name__.upper(), help=f"{helps.get(f.name, '')} [default: the preset's, else {f.default!r}]".replace('%', '%%'))
        args = p.parse_args(argv)
        cfg = make_config({k: v for k, v in vars(args).items() if v is not None})
        train(cfg)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as e:
        if os.environ.get('SID_DEBUG'):
            raise
        msg = str(e).strip().splitlines()
        print(f'error: {msg[0] if msg else type(e).__name__}', file=sys.stderr)
        sys.exit(2)

if __name__ == '__main__':
    main()
