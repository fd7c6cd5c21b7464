# Toy worlds with exact teachers: distillation you can run and check on a laptop CPU, no download.
#
# A world gives the training loop what a dataset preset gives it for CIFAR-10: a teacher f_phi (here the EXACT
# denoiser E[x_0 | x_t] of a known distribution, so no network has to be trusted), the starting point of G and
# f_psi (a small EDM-preconditioned network fitted to that teacher, as SiD starts from the teacher's weights),
# exact samples (the "real data" of SiDA and SIGN), quality figures against the exact distribution, and pictures.
# Used by sid.py (`--dataset toy`: 2-D mixture; `--dataset toy-images`: 16x16 shapes); imports only edm_nets, fileio.

import json
import math
import os
import numpy as np
import torch

import edm_nets
import fileio

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
    """(energy distance to exact samples, modes covered, fraction of samples within 2 s of a mode): the classic
    three of toy_figures. For exact samples the last is 1 - exp(-2) = 0.865 (a 2-D Gaussian's mass within 2 std)."""
    q = toy_figures(x, teacher)
    return q['energy'], q['covered'], q['within']

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
    with fileio.atomic_write(path) as f:
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
    with fileio.atomic_write(path) as f:
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

def sign_errors_line(sign):
    """IGN's two errors (mean L2 norms over a sample's values) at the end, and before training where known."""
    s = sign.get('start')
    return (f"sign: idempotence error E|f(f(z)) - f(z)| {sign['idem']:.4f}, fixed-point error E|f(x) - x| on data "
            f"{sign['fix']:.4f}" + (f" (before training: {s['idem']:.4f}, {s['fix']:.4f})" if s else ''))

#----------------------------------------------------------------------------
# The 2-D world as the loop sees it: teacher, student, exact samples, and the report (frames, figures, pictures).

class World:
    """What every toy world shares: its real-data stream for SiDA and SIGN."""
    def batches(self, batch, seed, start=0):
        """Endless exact samples from their own generator (replayed up to `start` on resume)."""
        gen = torch.Generator().manual_seed(seed + 99)
        for _ in range(start):
            self.sample(batch, gen)
        while True:
            yield self.sample(batch, gen)

class Toy2D(World):
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

    sign_labels = None  # the 2-D toy is unconditional

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
            log(sign_errors_line(sign))
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

#----------------------------------------------------------------------------
# The image toy: 16x16 RGB pictures of 4 shapes (the class), drawn with PIL. The set is kept simple enough for a
# 180k-parameter one-step generator to master on a CPU in minutes: every shape is centred and of one size, and its
# colour (a random saturated hue on black) is the only variation within a class. The teacher f_phi is the exact
# denoiser of the set's empirical distribution, so no network has to be trusted and samples are scored against
# the set itself.
#
# Its defaults (sid.PRESETS['toy-images']: batch 8, 10 kimg, lr 3e-3 for f_psi, 3e-5 for G) come from a sweep of 32
# runs. What matters is that f_psi keeps up with G: the generator gradient is only as right as f_psi's picture of
# G's current samples. With lr 1e-3 / 1e-4 the hues within a class collapsed and the figures oscillated (energy
# 0.01-0.24 between ticks, coverage 0.66 at 10 kimg). f_psi 3x faster ended at coverage 0.69-0.84 (seeds 0-2) but
# still jumped early (energy 0.27 at 1 kimg); G 3x slower as well ended at 0.73-0.88, with energy <= 0.06 at every
# tick after the first but one (0.079). Not better at these lrs: batch 16 or 32, alpha 1.2; worse: alpha 0.5 and
# tmax 500 (both collapse). A 32-channel student or a 4x longer student fit cost minutes more for little.

SHAPES = ('disc', 'square', 'triangle', 'cross')  # class k = SHAPES[k]

def draw_shape(shape, hue, res=16, ss=4):
    """One RGB uint8 image [res, res, 3]: `shape` in the saturated colour of `hue` on black, drawn at ss x the
    resolution and box-filtered down (anti-aliased edges)."""
    from PIL import Image, ImageDraw
    R, c, r = res * ss, res * ss / 2, 0.36 * res * ss  # centre, half-size
    fg = tuple(int(255 * np.clip(abs((hue * 6 + k) % 6 - 3) - 1, 0, 1)) for k in (0, 4, 2))
    im = Image.new('RGB', (R, R), (0, 0, 0))
    d = ImageDraw.Draw(im)
    if shape == 'disc':
        d.ellipse([c - r, c - r, c + r, c + r], fill=fg)
    elif shape == 'square':
        d.rectangle([c - r * 0.85, c - r * 0.85, c + r * 0.85, c + r * 0.85], fill=fg)
    elif shape == 'triangle':
        d.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=fg)
    else:  # cross: two bars a third as wide as long
        w = r / 3
        d.rectangle([c - r, c - w, c + r, c + w], fill=fg)
        d.rectangle([c - w, c - r, c + w, c + r], fill=fg)
    return np.asarray(im.resize((res, res), Image.BOX))

def make_image_set(per_class=16, res=16, seed=0):
    """-> (uint8 [N, 3, res, res], float32 one-hot [N, 4]), N = 4 * per_class, classes interleaved; fixed seed:
    the same set on every machine."""
    hues = np.random.default_rng(seed).uniform(0, 1, per_class * len(SHAPES))
    ims = [draw_shape(SHAPES[i % len(SHAPES)], h, res) for i, h in enumerate(hues)]
    ys = torch.arange(len(ims)) % len(SHAPES)
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous(), torch.eye(len(SHAPES))[ys]

#----------------------------------------------------------------------------
# The exact image teacher. For p_data = (1/N) sum_i delta(x_i), x_t = x_0 + sigma*eps has the posterior mean
#   D(x; sigma) = sum_i softmax_i(-||x - x_i||^2 / (2 sigma^2)) x_i          (Tweedie; SiD §3 uses D as f_phi)
# in float64 (logits reach ~1e4 / sigma^2) and differentiable in x. With labels, the sum runs over that class.

class EmpiricalDenoiser(torch.nn.Module):
    """Exact D(x; sigma) of an image set; call convention of edm_nets.EDMPrecond (float32 in and out)."""
    def __init__(self, images, labels, conditional=True, chunk_elems=2 ** 22):
        super().__init__()
        X = images.double().flatten(1) / 127.5 - 1                        # [N, D] in [-1, 1]
        self.register_buffer('X', X)
        self.register_buffer('half_sq', 0.5 * (X ** 2).sum(1))             # ||x_i||^2 / 2
        self.register_buffer('set_labels', labels.double())
        self.img_channels, self.img_resolution = images.shape[1], images.shape[2]
        self.label_dim = labels.shape[1] if conditional else 0
        self.sigma_data, self.chunk = 0.5, max(1, chunk_elems // len(X))    # rows per chunk bound the [rows, N] memory

    def weights(self, x, sigma, class_labels=None):
        """Posterior weights [B, N] in float64 (x [B, C, H, W], sigma [B])."""
        # -||x - x_i||^2 / 2 = x.x_i - ||x_i||^2 / 2 - ||x||^2 / 2; the last term is the same for all i: dropped
        logits = (x.double().flatten(1) @ self.X.T - self.half_sq) / (sigma.reshape(-1, 1) ** 2).clamp_min(1e-300)
        if self.label_dim and class_labels is not None:
            same = class_labels.double().reshape(-1, self.label_dim) @ self.set_labels.T > 0.5
            logits = logits.masked_fill(~same, -float('inf'))
        return logits.softmax(1)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, **kw):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(len(x))
        c = class_labels.reshape(-1, self.label_dim).expand(len(x), -1) if self.label_dim and class_labels is not None else None
        out = [self.weights(x[i:i + self.chunk], sigma[i:i + self.chunk], None if c is None else c[i:i + self.chunk]) @ self.X
               for i in range(0, len(x), self.chunk)]  # chunks: memory [chunk, N] however large the batch
        return torch.cat(out).reshape(x.shape).to(torch.float32)

#----------------------------------------------------------------------------
# The image student: EDM's DDPM++ U-Net (SongUNet) shrunk to 16 channels, in EDM preconditioning, fitted to the
# exact teacher by EDM's loss with the teacher's output as target, so that G and f_psi start as "the teacher" (SiD §4).

STUDENT_KWARGS = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                      decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], augment_dim=9,
                      model_channels=16, channel_mult=[1, 2], channel_mult_emb=4, num_blocks=1, attn_resolutions=[])

def fit_student(net, teacher, sampler, steps, batch=64, lr=2e-3, seed=0, P_mean=-0.6, P_std=1.6):
    """lambda(sigma) |net(x_0 + sigma n) - f_phi(x_0 + sigma n)|^2 over ln sigma ~ N(-0.6, 1.6^2), wider than EDM's
    because SiD queries f_psi up to sigma ~ 24 and G at 2.5; the lr decays over the second half."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, 2 * (1 - k / max(steps, 1)) + 0.05))
    for _ in range(steps):
        x0, c = sampler(batch, gen)
        sigma = (torch.randn(batch, 1, 1, 1, generator=gen) * P_std + P_mean).exp().clamp(0.002, 80)
        x = x0 + sigma * torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            target = teacher(x, sigma, c)
        w = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2  # EDM's lambda(sigma), sigma_data = 0.5
        loss = (w * (net(x, sigma, c) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
    return net

#----------------------------------------------------------------------------
# Image quality against the set (per-pixel RMS distances, float64).

def _rms(a, b):
    return ((a ** 2).sum(1, keepdim=True) - 2 * a @ b.T + (b ** 2).sum(1)).clamp_min(0).div(a.shape[1]).sqrt()

def image_quality(X, set_labels, x, labels=None):
    """coverage = fraction of set images that are some sample's nearest; fidelity = mean RMS distance to it;
    class_acc = its class is the sample's label; energy = energy distance to the set in RMS units (0 for p_g =
    p_data; blur and collapse both raise it); sharpness = mean squared difference of neighbouring pixels."""
    xd, X = x.detach().cpu().double().flatten(1), X.cpu()
    d = _rms(xd, X)
    dmin, nn_i = d.min(1)
    n, im = len(xd), x.detach().cpu().double()
    e_xx, e_yy = _rms(xd, xd).sum() / max(n * (n - 1), 1), _rms(X, X).sum() / (len(X) * (len(X) - 1))  # zero diagonals out
    sharp = ((im[..., 1:, :] - im[..., :-1, :]) ** 2).mean() + ((im[..., 1:] - im[..., :-1]) ** 2).mean()
    out = dict(coverage=len(nn_i.unique()) / len(X), fidelity=float(dmin.mean()), energy=float(2 * d.mean() - e_xx - e_yy),
               sharpness=float(sharp / 2))
    if labels is not None and labels.shape[-1]:
        out['class_acc'] = float((set_labels.cpu()[nn_i].argmax(1) == labels.cpu().argmax(1)).double().mean())
    return out

def quality_text(q):
    return (f"coverage {q['coverage']:.2f}, energy {q['energy']:.3f}, class acc {q.get('class_acc', float('nan')):.2f}, "
            f"fidelity {q['fidelity']:.3f}, sharpness {q['sharpness']:.3f}")

def image_panels(panels, path, cols=8, scale=4):
    """panels: [(title, subtitle, images [n, C, H, W] in [-1, 1])] -> one PNG of grids side by side (atomic);
    pixels as EDM's uint8 rule, upscaled by nearest neighbour so that 16x16 images can be seen."""
    from PIL import Image, ImageDraw
    grids = []
    for _, _, x in panels:
        u = (x[:cols * cols].detach().cpu().float() * 127.5 + 128).clip(0, 255).to(torch.uint8)
        n, C, H, W = u.shape
        g = torch.full(((n + cols - 1) // cols * (H + 1) + 1, cols * (W + 1) + 1, C), 80, dtype=torch.uint8)
        for i, v in enumerate(u):
            r, k = divmod(i, cols)
            g[1 + r * (H + 1):1 + r * (H + 1) + H, 1 + k * (W + 1):1 + k * (W + 1) + W] = v.permute(1, 2, 0)
        im = Image.fromarray(g.numpy())
        grids.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    head, pad = 30, 8
    canvas = Image.new('RGB', (sum(g.width + pad for g in grids) + pad, max(g.height for g in grids) + head + pad), (20, 20, 20))
    d, u = ImageDraw.Draw(canvas), pad
    for (title, sub, _), g in zip(panels, grids):
        d.text((u, 3), title, fill=(255, 255, 255))
        d.text((u, 16), sub, fill=(200, 200, 120))
        canvas.paste(g, (u, head))
        u += g.width + pad
    with fileio.atomic_write(path) as f:
        canvas.save(f, format='PNG')

# SIGN's re-noising levels on the image toy (multi-step sampling) and its corruptions for projection.
IMAGE_SIGN_SIGMAS = (0.8, 0.4, 0.2)
IMAGE_PROJ_SIGMA = 0.3  # additive noise; masking blanks a random 8x8 square to 0 (mid grey)

#----------------------------------------------------------------------------
# The image world as the loop sees it (same interface as Toy2D). Class-conditional: G and f_psi get one-hot labels.

_FITTED = {}  # fitted student weights per setting: the fit runs once per process

class ImageToy(World):
    name = 'toy-images'

    def __init__(self, per_class=16, res=16, fit_steps=400, n_eval=256, net_kwargs=None, seed=0):
        self.images, self.labels = make_image_set(per_class, res, seed)
        self.teacher = EmpiricalDenoiser(self.images, self.labels).eval().requires_grad_(False)
        self.net_kwargs, self.fit_steps, self.seed = dict(STUDENT_KWARGS, **(net_kwargs or {})), fit_steps, seed
        g = torch.Generator().manual_seed(7)  # fixed latents (unit noise) and labels for frames and figures
        self.eps = torch.randn([n_eval, *self.images.shape[1:]], generator=g)
        self.sign_labels = torch.eye(len(SHAPES))[torch.arange(n_eval) % len(SHAPES)]
        self.sigma_init = 2.5
        self.frames = []  # [(title, G_ema samples)]: the first and the latest only (images are large)
        self.curve = []   # (title, figures) at every observation
        self._exact = None

    def student(self, dropout=0.0):
        """G's and f_psi's common start: a tiny SongUNet fitted to the exact teacher (the global RNG is untouched)."""
        kw = dict(img_resolution=self.images.shape[2], img_channels=self.images.shape[1], label_dim=len(SHAPES),
                  **self.net_kwargs)
        key = (len(self.images), self.fit_steps, self.seed, repr(sorted(self.net_kwargs.items())))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if key not in _FITTED:
                net = edm_nets.EDMPrecond(**kw, dropout=0.0)
                _FITTED[key] = fit_student(net, self.teacher, self.sample, self.fit_steps, seed=self.seed).state_dict()
            net = edm_nets.EDMPrecond(**kw, dropout=dropout)
        net.load_state_dict(_FITTED[key])
        return net

    def sample(self, n, gen=None):
        """n exact samples (uniform draws from the set) -> (x [n, C, H, W] in [-1, 1], one-hot labels [n, 4])."""
        i = torch.randint(len(self.images), (n,), generator=gen)
        return self.images[i].float() / 127.5 - 1, self.labels[i]

    def sample_of(self, labels, gen):
        """One exact sample per given label (a random set image of that class)."""
        per = len(self.images) // len(SHAPES)
        i = labels.argmax(1) + len(SHAPES) * torch.randint(per, (len(labels),), generator=gen)
        return self.images[i].float() / 127.5 - 1

    def observe(self, G_ema, sigma_init, title):
        self.sigma_init = sigma_init
        with torch.no_grad():
            x = G_ema(self.eps * sigma_init, torch.full([len(self.eps), 1, 1, 1], sigma_init), self.sign_labels).contiguous()
        self.frames = self.frames[:1] + [(title, x)]
        self.curve.append((title, self.quality(x)))
        return x

    def quality(self, x, labels=None):
        return image_quality(self.teacher.X, self.teacher.set_labels, x, self.sign_labels if labels is None else labels)

    def exact(self):
        """As many exact samples as frames have, with the frames' labels (fixed seed): the reference figures."""
        if self._exact is None:
            x = self.sample_of(self.sign_labels, torch.Generator().manual_seed(1234))
            self._exact = (x, self.quality(x))
        return self._exact

    def quality_line(self, x):
        return f'{quality_text(self.quality(x))} (exact samples: {quality_text(self.exact()[1])})'

    def sign_inputs(self):
        """Fixed draws for SIGN's evaluation, one per frame label: latents, exact data, re-noising levels and
        noises, additive projection noise and level, and the masked data (an 8x8 square set to 0)."""
        x_data = self.sample_of(self.sign_labels, torch.Generator().manual_seed(5))
        noises = [torch.randn(self.eps.shape, generator=torch.Generator().manual_seed(9 + k)) for k in range(len(IMAGE_SIGN_SIGMAS))]
        g = torch.Generator().manual_seed(11)
        noise_proj = torch.randn(x_data.shape, generator=g)
        H = x_data.shape[-1]
        u, v = torch.randint(H - 7, (2, len(x_data)), generator=g)
        ar = torch.arange(H)
        keep = ~(((ar[None] >= u[:, None]) & (ar[None] < u[:, None] + 8))[:, :, None] &
                 ((ar[None] >= v[:, None]) & (ar[None] < v[:, None] + 8))[:, None, :])
        return (self.eps * self.sigma_init, x_data, IMAGE_SIGN_SIGMAS, noises, noise_proj, IMAGE_PROJ_SIGMA,
                dict(masked=x_data * keep[:, None]))

    def report(self, outdir, log, sign=None):
        """End figures, SIGN's multi-step and projection figures, and the pictures; returns the files written."""
        (t0, x0), (t1, x1), (xe, qe) = self.frames[0], self.frames[-1], self.exact()
        log(f'toy end:   {self.quality_line(x1)}')
        step = max(1, len(self.curve) // 10)
        if self.curve:  # (a resumed run has only the frames)
            points = self.curve[::step] + ([] if (len(self.curve) - 1) % step == 0 else self.curve[-1:])  # the end once
            log('toy curve (energy / coverage): ' + ', '.join(f"{t} {q['energy']:.3f} / {q['coverage']:.2f}" for t, q in points))
        paths = [os.path.join(outdir, 'toy-images.png')]
        image_panels([(f'start ({t0})', quality_text(self.quality(x0)), x0), (f'end ({t1})', quality_text(self.quality(x1)), x1),
                      ('exact samples', quality_text(qe), xe)], paths[0])
        if sign is not None:
            paths += [os.path.join(outdir, f'toy-images-sign-{k}.png') for k in ('steps', 'projection')]
            self.report_sign(sign, log, *paths[1:])
        return paths

    def report_sign(self, sign, log, path_steps, path_proj):
        """SIGN's figures: 1-, 2- and 4-step samples, and the projections f(y) of corrupted data y (RMS to the clean
        image, and how often the nearest set image is the clean one); one PNG each."""
        log(sign_errors_line(sign))
        panels, n = [], len(IMAGE_SIGN_SIGMAS)
        for k in (1, 2, n + 1):
            q = self.quality(sign['steps'][k - 1])
            log(f'sign: {k} step(s) (sigmas {list(IMAGE_SIGN_SIGMAS[:k - 1])}): {quality_text(q)}')
            panels.append((f'{k} step(s)', f"cov {q['coverage']:.2f} en {q['energy']:.3f} acc {q['class_acc']:.2f}", sign['steps'][k - 1]))
        image_panels(panels, path_steps)
        x, panels = sign['data'], []
        rms = lambda a: float((a - x).flatten(1).pow(2).mean(1).sqrt().mean())  # to the clean image
        hit = lambda a: float((_rms(a.double().flatten(1), self.teacher.X).argmin(1) == _rms(x.double().flatten(1), self.teacher.X).argmin(1)).double().mean())
        for name, (y, p) in [('noisy', (sign['noisy'], sign['projected']))] + list(sign.get('corrupted', {}).items()):
            log(f'sign: projection of {name} data: RMS to the clean image {rms(y):.3f} -> {rms(p):.3f}, '
                f'nearest set image is the clean one {hit(y):.2f} -> {hit(p):.2f}')
            panels += [(name, f'RMS {rms(y):.3f}', y), (f'f({name})', f'RMS {rms(p):.3f} hit {hit(p):.2f}', p)]
        image_panels(panels + [('clean data', '', x)], path_proj)

WORLDS = {'toy': Toy2D, 'toy-images': ImageToy}
