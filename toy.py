# Toy worlds with exact teachers: distillation you can run and check on a laptop CPU, no download.
#
# A world gives the training loop what a dataset preset gives it for CIFAR-10: a teacher f_phi (here the EXACT
# denoiser E[x_0 | x_t] of a known distribution, so no network has to be trusted), the starting point of G and
# f_psi (a small EDM-preconditioned network fitted to that teacher, as SiD starts from the teacher's weights),
# exact samples (the "real data" of SiDA and SIGN), quality figures against the exact distribution, and pictures.
# Used by sid.py (`--dataset toy`); imports only edm_nets.

import math
import numpy as np
import torch

import edm_nets

#----------------------------------------------------------------------------
# The 2-D toy: a mixture of 8 Gaussians on a ring, per-axis std sigma_data = 0.5. Its noised densities are
# mixtures too, so the denoiser is closed form: posterior-weighted component posterior means.

class ToyMixture(torch.nn.Module):
    """Exact EDM-style denoiser of p_data = (1/K) sum_k N(mu_k, s^2 I); call convention as EDMPrecond."""
    def __init__(self, modes=8, s=0.1, sigma_data=0.5):
        super().__init__()
        r = math.sqrt(2 * (sigma_data ** 2 - s ** 2))  # ring radius so that each axis has std sigma_data
        ang = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
        self.register_buffer('mu', torch.stack([r * ang.cos(), r * ang.sin()], 1))  # (K, 2)
        self.s, self.sigma_data, self.label_dim, self.img_resolution, self.img_channels = s, sigma_data, 0, 0, 2

    def log_prob(self, x, sigma):
        """log p_sigma(x) of the noised mixture (x: (B, 2), sigma: (B, 1)); Tweedie's identity is tested on it."""
        v = self.s ** 2 + sigma.double() ** 2                                  # (B, 1)
        d2 = ((x.double()[:, None] - self.mu[None]) ** 2).sum(-1)               # (B, K)
        lp = -0.5 * d2 / v - torch.log(2 * math.pi * v) - math.log(len(self.mu))
        return lp.logsumexp(1)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, **kw):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        v = self.s ** 2 + sigma ** 2
        xd = x.double()
        r = (-0.5 * ((xd[:, None] - self.mu[None]) ** 2).sum(-1) / v).softmax(1)   # (B, K) responsibilities
        means = (self.s ** 2 * xd[:, None] + sigma[:, :, None] ** 2 * self.mu[None]) / v[:, :, None]  # (B, K, 2)
        return (r[:, :, None] * means).sum(1).to(x.dtype)

    def sample(self, n, gen=None):
        k = torch.randint(len(self.mu), (n,), generator=gen)
        return (self.mu[k] + self.s * torch.randn(n, 2, generator=gen, dtype=torch.float64)).float()

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
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2  # EDM's lambda(sigma), sigma_data = 0.5
        loss = (weight * (net(x, sigma) - teacher(x, sigma)) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return net

def toy_picture(frames, teacher, path, size=256, extent=1.4):
    """Samples (yellow dots) over the true density (grey); one panel per (title, points); PNG or animated GIF."""
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
    with edm_nets.atomic_write(path) as f:
        if path.endswith('.gif'):
            panels[0].save(f, format='GIF', save_all=True, append_images=panels[1:], duration=80, loop=0)
        else:
            canvas = Image.new('RGB', (size * len(panels), size))
            for i, p in enumerate(panels):
                canvas.paste(p, (i * size, 0))
            canvas.save(f, format='PNG')

# SIGN's multi-step noise levels on the toy. The student is time-free, and in 2-D a re-noised point x + sigma*eps
# with sigma above the mode width (s = 0.1) looks like a clean tail point, so f cannot undo the noise: re-noising
# at 0.8 or 0.2 makes the samples worse (README, SIGN), at <= 0.1 each step sharpens them. (In image space
# sigma is readable from the input itself, ||x_sigma - x|| ~ sigma*sqrt(d), and larger levels are usable.)
TOY_SIGN_SIGMAS = (0.1, 0.05, 0.02)

#----------------------------------------------------------------------------
# The 2-D world as the loop sees it: teacher, student, exact samples, and the report (frames, figures, pictures).

class Toy2D:
    name = 'toy'

    def __init__(self):
        self.teacher = ToyMixture().eval().requires_grad_(False)
        self.z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7)) * 2.5  # fixed latents for the frames
        self.frames = []  # (title, G_ema samples) through training, for the GIF

    def student(self, dropout=0.0):
        """G's and f_psi's common start: the toy MLP in EDM preconditioning, fitted to the exact denoiser."""
        torch.manual_seed(0)  # same MLP starting point for every seed: the run's seed varies only the training
        net = edm_nets.EDMPrecond(img_resolution=0, img_channels=2, model_type='ToyMLP', dropout=dropout)
        return toy_pretrain(net, self.teacher)

    def sample(self, n, gen):
        """Exact samples and (empty) labels: the toy's real data for SiDA and SIGN."""
        return self.teacher.sample(n, gen), torch.zeros(n, 0)

    def batches(self, batch, seed, start=0):
        """Endless exact samples from their own generator (replayed up to `start` on resume)."""
        gen = torch.Generator().manual_seed(seed + 99)
        for _ in range(start):
            self.sample(batch, gen)
        while True:
            yield self.sample(batch, gen)

    def observe(self, G_ema, sigma_init, title):
        with torch.no_grad():
            self.frames.append((title, G_ema(self.z, torch.full([len(self.z), 1], sigma_init)).contiguous()))
        return self.frames[-1][1]

    def quality_line(self, x):
        q = toy_quality(x, self.teacher)
        return f'energy distance {q[0]:.4f}, modes covered {q[1]}/8, within 2 std of a mode {q[2]:.3f} (exact: 0.865)'

    def sign_inputs(self):
        """Fixed draws for SIGN's evaluation: latents, exact data, re-noising levels and noises, projection noise."""
        x_data = self.teacher.sample(2000, torch.Generator().manual_seed(5))
        noises = [torch.randn(self.z.shape, generator=torch.Generator().manual_seed(9 + k))
                  for k in range(len(TOY_SIGN_SIGMAS))]
        return self.z, x_data, TOY_SIGN_SIGMAS, noises, torch.randn(x_data.shape, generator=torch.Generator().manual_seed(11))

    def report(self, outdir, log, sign=None):
        """End-of-run figures and pictures (sign: sid.sign_evaluation's results); returns the files written."""
        log(f'toy end:   {self.quality_line(self.frames[-1][1])}')
        if sign is not None:
            log(f"sign: idempotence error E|f(f(z)) - f(z)| {sign['idem']:.4f}, "
                f"fixed-point error E|f(x) - x| on data {sign['fix']:.4f}")
            n = len(TOY_SIGN_SIGMAS)
            for k in sorted({1, 2, n + 1}):
                q = toy_quality(sign['steps'][k - 1], self.teacher)
                log(f'sign: {k} step(s) (sigmas {list(TOY_SIGN_SIGMAS[:k - 1])}): energy distance {q[0]:.4f}, '
                    f'modes covered {q[1]}/8, within 2 std {q[2]:.3f}')
            near = lambda v: float(torch.cdist(v.double(), self.teacher.mu).min(1).values.mean())  # to the nearest mode centre
            log(f"sign: projection of data + 0.2 eps: mean distance to the nearest mode {near(sign['noisy']):.3f} -> "
                f"{near(sign['projected']):.3f} (data itself: {near(sign['data']):.3f})")
        paths = [f'{outdir}/toy.png', f'{outdir}/toy.gif']
        toy_picture([self.frames[0], self.frames[-1]], self.teacher, paths[0])
        toy_picture(self.frames, self.teacher, paths[1])
        return paths

WORLDS = {'toy': Toy2D}
