# Toy worlds with exact teachers: distillation you can run and check on a laptop CPU, no download.
#
# A world gives the training loop what a dataset preset gives it for CIFAR-10: a teacher f_phi (here the EXACT
# denoiser E[x_0 | x_t] of a known distribution, so no network has to be trusted), the starting point of G and
# f_psi (a small EDM-preconditioned network fitted to that teacher, as SiD starts from the teacher's weights),
# exact samples (the "real data" of SiDA and SIGN), quality figures against the exact distribution, and pictures.
# Used by sid.py (`--dataset toy`); imports only edm_nets.

import json
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
    d = torch.cdist(x.double(), teacher.mu)                                   # (N, K)
    near = d.min(1).values < 2 * teacher.s
    hits = torch.bincount(d.argmin(1)[near], minlength=len(teacher.mu))
    covered = int((hits >= 0.2 * len(x) / len(teacher.mu)).sum())            # a mode holds >= 20 % of its share
    return energy_distance(x, teacher), covered, float(near.float().mean())

def energy_distance(x, teacher):
    """2 E|x - y| - E|x - x'| - E|y - y'| against as many exact samples y (fixed draw); O(N^2)."""
    y = teacher.sample(len(x), torch.Generator().manual_seed(1234)).to(x)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())

# 'Within 2 std' alone does not tell clusters from a ring: points spread uniformly over the ring of modes also
# land in the modes' discs ~62 % of the time (exact samples: 86.5 %). Clustering subtracts that chance level.

def ring_chance(x, teacher):
    """E[fraction within 2 s of a mode] after giving every sample a uniformly random angle on its own radius r:
    the arc of the circle |x| = r inside the disc of radius 2 s around a mode at radius R has half-angle
    theta = arccos((r^2 + R^2 - 4 s^2) / (2 r R)) (law of cosines); the K discs do not overlap (2 s < R sin(pi/K))."""
    r, R, c = x.double().norm(dim=1).clamp_min(1e-12), float(teacher.mu[0].norm()), 2 * teacher.s
    cos = ((r ** 2 + R ** 2 - c ** 2) / (2 * r * R)).clamp(-1, 1)
    return float((len(teacher.mu) * torch.arccos(cos) / math.pi).clamp(max=1).mean())

def toy_figures(x, teacher, energy_n=None):
    """All quality figures of samples x (N, 2) as a dict: energy distance (of the first energy_n samples: cheaper),
    modes covered and within 2 std of a mode (as toy_quality), clustering = within - ring_chance (exact samples
    ~0.24, a uniform ring ~0, a blob at the centre 0) and balance = 1 - TV(each mode's share of the near samples,
    uniform) / (1 - 1/K): 1 for equal modes, 0 when all sit in one mode."""
    d = torch.cdist(x.double(), teacher.mu)                                   # (N, K)
    K, near = len(teacher.mu), d.min(1).values < 2 * teacher.s
    hits = torch.bincount(d.argmin(1)[near], minlength=K).double()
    share, within = hits / max(float(hits.sum()), 1), float(near.double().mean())
    return dict(energy=energy_distance(x[:energy_n], teacher), covered=int((hits >= 0.2 * len(x) / K).sum()),
                within=within, clustering=within - ring_chance(x, teacher),
                balance=1 - float((share - 1 / K).abs().sum() / 2) / (1 - 1 / K) if near.any() else 0.0)

EXACT = dict(within=0.865, clustering=0.24, balance=1.0)  # exact samples' values (tested), printed for reference
CURVE_ENERGY_N = 500  # toy_quality.png: energy distance of 500 of the 2000 samples per frame (16x cheaper)

def toy_pretrain(net, teacher, steps=1000, batch=256, lr=2e-2, seed=0):
    """Fit the MLP to the exact denoiser at EDM's training levels (ln sigma ~ N(-1.2, 1.2^2), Karras et al. 2022,
    Table 1), so that G and f_psi start as 'the teacher' as in SiD. A large lr with cosine decay to 0: the fit at
    small sigma decides how sharp G can become, since f_psi starts from it (600 steps at a constant 2e-3 left a
    relative error ~0.17 at sigma in [0.01, 1] and SiD's samples on a ring; this: ~0.035, at less cost)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for i in range(steps):
        opt.param_groups[0]['lr'] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        x0 = teacher.sample(batch, gen)
        sigma = (torch.randn(batch, 1, generator=gen) * 1.2 - 1.2).exp()
        x = x0 + sigma * torch.randn(batch, 2, generator=gen)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2  # EDM's lambda(sigma), sigma_data = 0.5
        loss = (weight * (net(x, sigma) - teacher(x, sigma)) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return net

def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()

def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12) / n))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]

def _density(teacher, size, extent):
    """The true density as a grey image (row 0 at the top, y = +extent)."""
    g = torch.linspace(-extent, extent, size)
    grid = torch.stack(torch.meshgrid(g, -g, indexing='xy'), -1).reshape(-1, 2)
    dens = teacher.log_prob(grid, torch.full((len(grid), 1), 1e-3)).exp().reshape(size, size)
    return (dens / dens.max()).clamp(0, 1).pow(0.3).mul(110).byte().numpy()

def _panel(bg, title, pts, lines, size, extent, pad=(48, 34, 26, 16)):
    """One panel: title, samples over the density, x/y axes with numbered ticks, and text lines underneath."""
    from PIL import Image, ImageDraw
    left, top, right, below = pad
    im = Image.new('RGB', (left + size + right, top + size + below + 15 * len(lines) + 4), 'black')
    plot = np.repeat(bg[:, :, None], 3, 2)
    uv = ((pts.float().clamp(-extent, extent) / extent + 1) * (size - 1) / 2).round().long().numpy()
    plot[size - 1 - uv[:, 1], uv[:, 0]] = (255, 220, 80)  # one pixel per sample
    im.paste(Image.fromarray(plot), (left, top))
    dr, font = ImageDraw.Draw(im), _font(11)
    px = lambda v: (v / extent + 1) * (size - 1) / 2
    dr.rectangle([left - 1, top - 1, left + size, top + size], outline=(160, 160, 160))
    for t in [t for t in _ticks(-extent, extent, 6) if abs(t) < extent - 0.05]:  # none at the corners
        x, y = left + px(t), top + size - 1 - px(t)
        dr.line([(x, top + size), (x, top + size + 4)], fill='white')
        dr.text((x, top + size + 5), f'{t:g}', fill='white', font=font, anchor='mt')
        dr.line([(left - 5, y), (left - 1, y)], fill='white')
        dr.text((left - 7, y), f'{t:g}', fill='white', font=font, anchor='rm')
    dr.text((left + size / 2, 8), title, fill='white', font=_font(12), anchor='mt')
    for i, line in enumerate(lines):
        dr.text((left, top + size + below + 2 + 15 * i), line, fill=(220, 220, 220), font=font)
    return im

def figure_lines(q):
    """The quality figures printed under a panel."""
    return [f"within 2 std of a mode {q['within']:.3f} (exact 0.865)",
            f"clustering {q['clustering']:.3f} (exact {EXACT['clustering']}, ring 0)",
            f"balance {q['balance']:.2f}, modes covered {q['covered']}/8",
            f"energy distance {q['energy']:.4f}"]

def toy_picture(panels, teacher, path, size=256, extent=1.4):
    """Samples (yellow dots) over the true density (grey), one panel per (title, points, text lines), side by side
    with a legend (PNG), or one frame per panel (animated GIF)."""
    from PIL import Image, ImageDraw
    bg = _density(teacher, size, extent)
    ims = [_panel(bg, title, pts, lines, size, extent) for title, pts, lines in panels]
    w, h = ims[0].size
    with edm_nets.atomic_write(path) as f:
        if path.endswith('.gif'):  # a fixed palette, 250 greys and the dots' yellow: fast (Pillow's default
            pal = Image.new('P', (1, 1))  # median cut per frame is slow) and without banding in the density
            pal.putpalette([v for i in range(250) for v in (i * 255 // 249,) * 3] + [255, 220, 80] * 6)
            ims = [im.quantize(palette=pal, dither=Image.Dither.NONE) for im in ims]
            ims[0].save(f, format='GIF', save_all=True, append_images=ims[1:], duration=80, loop=0)
            return
        canvas = Image.new('RGB', (w * len(ims), h + 24), 'black')
        for i, im in enumerate(ims):
            canvas.paste(im, (i * w, 0))
        dr = ImageDraw.Draw(canvas)
        dr.rectangle([12, h + 6, 24, h + 18], fill=(110, 110, 110))
        dr.text((30, h + 12), 'true density (grey)', fill='white', font=_font(11), anchor='lm')
        dr.ellipse([170, h + 9, 176, h + 15], fill=(255, 220, 80))
        dr.text((182, h + 12), 'samples (yellow dots); the figures: toy.toy_figures', fill='white',
                font=_font(11), anchor='lm')
        canvas.save(f, format='PNG')

def quality_plot(curve, path, width=760, height=350):
    """Quality against kimg, from (kimg, toy_figures) pairs: energy distance (log scale) on the left; within 2 std,
    clustering and balance on the right, each with its exact samples' value dashed."""
    from PIL import Image, ImageDraw
    img, font = Image.new('RGB', (width, height), 'white'), _font(11)
    dr, ks = ImageDraw.Draw(img), [k for k, _ in curve]
    log_ed = [math.log10(max(q['energy'], 1e-5)) for _, q in curve]
    plots = [(f'energy distance (log10, {CURVE_ENERGY_N} samples), lower is better', [('energy distance', log_ed, (31, 119, 180), None)],
              (math.floor(min(log_ed)), math.ceil(max(log_ed) + 1e-9))),
             ('clusters: higher is better, dashed = exact samples',
              [(n, [q[n] for _, q in curve], c, EXACT[n]) for n, c in
               (('within', (214, 39, 40)), ('clustering', (44, 160, 44)), ('balance', (148, 103, 189)))], (0, 1))]
    for i, (title, series, (lo, hi)) in enumerate(plots):
        L, R, T, B = 55 + i * width // 2, (i + 1) * width // 2 - 15, 30, height - 60
        px = lambda k: L + (k - ks[0]) / max(ks[-1] - ks[0], 1e-9) * (R - L)
        py = lambda v: B - (v - lo) / (hi - lo) * (B - T)
        for k in _ticks(ks[0], ks[-1]):
            dr.line([(px(k), T), (px(k), B)], fill=(225, 225, 225))
            dr.text((px(k), B + 5), f'{k:g}', fill='black', font=font, anchor='mt')
        for v in _ticks(lo, hi):
            dr.line([(L, py(v)), (R, py(v))], fill=(225, 225, 225))
            dr.text((L - 5, py(v)), f'{v:g}', fill='black', font=font, anchor='rm')
        dr.rectangle([L, T, R, B], outline='black')
        dr.text(((L + R) / 2, 8), title, fill='black', font=_font(12), anchor='mt')
        dr.text(((L + R) / 2, B + 20), 'kimg', fill='black', font=font, anchor='mt')
        for j, (name, ys, colour, exact) in enumerate(series):
            if exact is not None:
                for x0 in range(L, R, 10):
                    dr.line([(x0, py(exact)), (min(x0 + 5, R), py(exact))], fill=colour)
            dr.line([(px(k), py(v)) for k, v in zip(ks, ys)], fill=colour, width=2)
            x0 = L + j * (R - L) // len(series)  # legend row under the plot
            dr.line([(x0, height - 10), (x0 + 20, height - 10)], fill=colour, width=2)
            dr.text((x0 + 25, height - 10), name, fill=colour, font=font, anchor='lm')
    with edm_nets.atomic_write(path) as f:
        img.save(f, format='PNG')

# SIGN's multi-step noise levels on the toy. The student is time-free, and in 2-D a re-noised point x + sigma*eps
# with sigma above the mode width (s = 0.1) looks like a clean tail point, so f cannot undo the noise: re-noising
# at 0.8 or 0.2 makes the samples worse (README, SIGN), at <= 0.1 each step sharpens them. (In image space
# sigma is readable from the input itself, ||x_sigma - x|| ~ sigma*sqrt(d), and larger levels are usable.)
TOY_SIGN_SIGMAS = (0.1, 0.05, 0.02)

# The toy's defaults (sid.PRESETS['toy'], chosen on one CPU thread, seeds 0 and 1). SiD turns G's blob into a ring
# quickly; the ring splits into clusters only as far as f_psi, which starts from the pretrained MLP, resolves the
# small noise levels, and as the gradient noise allows. Steps, not images, cost time here (an MLP step at batch 512
# costs little more than at 64). Hence a sharper pretraining fit (toy_pretrain: cosine lr, EDM's levels) and batch
# 512 for 0.3 Mimg (586 steps where batch 256 for 0.2 Mimg took 782), the same lr 1e-3: within 2 std of a mode
# 0.68 -> ~0.80 (exact 0.865). Tried without gain: lr 2e-3 at batch 512 (unstable), a wider (256) or deeper (4)
# MLP, 2x longer runs, alpha 1.0, tmax 400, a shorter EMA.

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
        self.sigma_init = sigma_init
        with torch.no_grad():
            self.frames.append((title, G_ema(self.z, torch.full([len(self.z), 1], sigma_init)).contiguous()))
        return self.frames[-1][1]

    def quality_line(self, x):
        q = toy_figures(x, self.teacher)
        return (f"energy distance {q['energy']:.4f}, modes covered {q['covered']}/8, within 2 std of a mode "
                f"{q['within']:.3f} (exact: 0.865), clustering {q['clustering']:.3f} (exact: {EXACT['clustering']}, "
                f"a ring: 0), balance {q['balance']:.2f} (exact: ~1, one mode: 0)")

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
                q = toy_figures(sign['steps'][k - 1], self.teacher)
                log(f"sign: {k} step(s) (sigmas {list(TOY_SIGN_SIGMAS[:k - 1])}): energy distance {q['energy']:.4f}, "
                    f"modes covered {q['covered']}/8, within 2 std {q['within']:.3f}, clustering {q['clustering']:.3f}, "
                    f"balance {q['balance']:.2f}")
            near = lambda v: float(torch.cdist(v.double(), self.teacher.mu).min(1).values.mean())  # to the nearest mode centre
            log(f"sign: projection of data + 0.2 eps: mean distance to the nearest mode {near(sign['noisy']):.3f} -> "
                f"{near(sign['projected']):.3f} (data itself: {near(sign['data']):.3f})")
        self.pictures(outdir)
        return [f'{outdir}/{n}' for n in ('toy.png', 'toy.gif', 'toy_quality.png')]

    def pictures(self, outdir):
        """toy.png (start, end, exact samples, with figures), toy.gif (every frame), toy_quality.png (figures
        against kimg). The figures are computed here from the kept frames, so a resumed run draws its whole history."""
        try:
            with open(f'{outdir}/config.json') as f:
                method = {'sid': 'SiD', 'sida': 'SiDA', 'sign': 'SIGN'}.get(json.load(f)['method'], 'SiD')
        except (OSError, ValueError, KeyError):
            method = 'SiD'
        curve = [(float(t.split()[0]), toy_figures(x, self.teacher, CURVE_ENERGY_N)) for t, x in self.frames]
        first, last = (toy_figures(self.frames[i][1], self.teacher) for i in (0, -1))  # all 2000 samples, as logged
        exact = self.teacher.sample(len(self.z), torch.Generator().manual_seed(3))
        sigma = getattr(self, 'sigma_init', 2.5)
        toy_picture([(f"start: G = teacher's denoiser at sigma_init {sigma:g}", self.frames[0][1], figure_lines(first)),
                     (f'after {method}, {curve[-1][0]:g} kimg', self.frames[-1][1], figure_lines(last)),
                     ('exact samples', exact, figure_lines(toy_figures(exact, self.teacher)))],
                    self.teacher, f'{outdir}/toy.png')
        toy_picture([(f'{method}, {t}', x, figure_lines(q)) for (t, x), (_, q) in zip(self.frames, curve)],
                    self.teacher, f'{outdir}/toy.gif')
        quality_plot(curve, f'{outdir}/toy_quality.png')

WORLDS = {'toy': Toy2D}
