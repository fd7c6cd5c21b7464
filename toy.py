# Toy worlds with exact teachers: distillation you can run and check on a laptop CPU, no download.
#
# A world gives the training loop what a dataset preset gives it for CIFAR-10: a teacher f_phi (here
# the EXACT denoiser E[x_0 | x_t] of a known distribution, so no network has to be trusted), the
# starting point of G and f_psi (a small EDM-preconditioned network fitted to that teacher, as SiD
# starts from the teacher's weights), exact samples (the "real data" of SiDA and SIGN), and quality
# figures against the exact distribution. Pictures are drawn by draw.py and written by the driver
# (runs.py); this file writes nothing. `--dataset toy`: the 2-D mixture; `toy-images`: 16x16 shapes.

import math

import numpy as np
import torch

import edm_nets

#----------------------------------------------------------------------------
# The 2-D toy: a mixture of 8 Gaussians on a ring, per-axis std sigma_data = 0.5. Its noised
# densities are mixtures too, so the denoiser is closed form: posterior-weighted component means.

class ToyMixture(torch.nn.Module):
    """Exact EDM-style denoiser of p_data = (1/K) sum_k N(mu_k, s^2 I); EDMPrecond's call."""
    def __init__(self, modes=8, s=0.1, sigma_data=0.5):
        super().__init__()
        r = math.sqrt(2 * (sigma_data ** 2 - s ** 2))  # ring radius: each axis has std sigma_data
        ang = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
        self.register_buffer('mu', torch.stack([r * ang.cos(), r * ang.sin()], 1))  # (K, 2)
        self.s = s
        self.sigma_data = sigma_data
        self.label_dim = 0
        self.img_resolution = 0
        self.img_channels = 2

    def log_prob(self, x, sigma):
        """log p_sigma(x) of the noised mixture (x: (B, 2), sigma: (B, 1)); tests check Tweedie."""
        v = self.s ** 2 + sigma.double() ** 2                                  # (B, 1)
        d2 = ((x.double()[:, None] - self.mu[None]) ** 2).sum(-1)              # (B, K)
        lp = -0.5 * d2 / v - torch.log(2 * math.pi * v) - math.log(len(self.mu))
        return lp.logsumexp(1)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, **kw):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        v = self.s ** 2 + sigma ** 2
        xd = x.double()
        r = (-0.5 * ((xd[:, None] - self.mu[None]) ** 2).sum(-1) / v).softmax(1)  # (B, K)
        means = (self.s ** 2 * xd[:, None] + sigma[:, :, None] ** 2 * self.mu[None]) / v[:, :, None]
        return (r[:, :, None] * means).sum(1).to(x.dtype)

    def sample(self, n, gen=None):
        k = torch.randint(len(self.mu), (n,), generator=gen)
        x = self.mu[k] + self.s * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        return x.float()

def toy_quality(x, teacher):
    """(energy distance to exact samples, modes covered, fraction within 2 s of a mode): the classic
    three of toy_figures. For exact samples the last is 1 - exp(-2) = 0.865 (a 2-D Gaussian's mass
    within 2 std)."""
    q = toy_figures(x, teacher)
    return q['energy'], q['covered'], q['within']

def energy_distance(x, teacher):
    """2 E|x - y| - E|x - x'| - E|y - y'| against as many exact samples y (fixed draw); O(N^2)
    memory and time: callers pass at most ENERGY_N points (toy_figures). The V-statistic: the zero
    diagonals make exact samples score ~1.8 / N, not 0 (0.0009 at N = 2000, +-0.0003 between
    draws), so compare figures at the same N and read differences below ~0.001 as noise."""
    y = teacher.sample(len(x), torch.Generator().manual_seed(1234)).to(x)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())

# 'Within 2 std' alone does not tell clusters from a ring: points spread uniformly over the ring of
# modes also land in the modes' discs ~62 % of the time (exact samples: 86.5 %). Clustering
# subtracts that chance level.

def ring_chance(x, teacher):
    """E[fraction within 2 s of a mode] after giving every sample a uniformly random angle on its
    own radius r: the arc of the circle |x| = r inside the disc of radius 2 s around a mode at
    radius R has half-angle theta = arccos((r^2 + R^2 - 4 s^2) / (2 r R)) (law of cosines); the K
    discs do not overlap (2 s < R sin(pi/K))."""
    r = x.double().norm(dim=1).clamp_min(1e-12)
    R, c = float(teacher.mu[0].norm()), 2 * teacher.s
    cos = ((r ** 2 + R ** 2 - c ** 2) / (2 * r * R)).clamp(-1, 1)
    return float((len(teacher.mu) * torch.arccos(cos) / math.pi).clamp(max=1).mean())

ENERGY_N = 2000  # the energy distance takes the first 2000 samples: bounded work for any N

def toy_figures(x, teacher, energy_n=ENERGY_N):
    """All quality figures of samples x (N, 2): energy distance of the first energy_n of them
    (its O(n^2) cost bounded; `energy_n` and `n` say how many were used and given), modes covered
    and within 2 std of a mode (as toy_quality), clustering = within - ring_chance (exact samples
    ~0.24, a uniform ring ~0, a blob at the centre 0) and balance = 1 - TV(each mode's share of the
    near samples, uniform) / (1 - 1/K): 1 for equal modes, 0 for one; all but the energy O(N)."""
    d = torch.cdist(x.double(), teacher.mu)                                   # (N, K)
    K, near = len(teacher.mu), d.min(1).values < 2 * teacher.s
    hits = torch.bincount(d.argmin(1)[near], minlength=K).double()
    share, within = hits / max(float(hits.sum()), 1), float(near.double().mean())
    balance = 1 - float((share - 1 / K).abs().sum() / 2) / (1 - 1 / K) if near.any() else 0.0
    return dict(energy=energy_distance(x[:energy_n], teacher),
                covered=int((hits >= 0.2 * len(x) / K).sum()), within=within,
                clustering=within - ring_chance(x, teacher), balance=balance,
                energy_n=min(len(x), energy_n), n=len(x))

EXACT = dict(within=0.865, clustering=0.24, balance=1.0)  # exact samples' values (tested)
def figure_lines(q):
    """The quality figures printed under a picture's panel."""
    return [f"within 2 std of a mode {q['within']:.3f} (exact 0.865)",
            f"clustering {q['clustering']:.3f} (exact {EXACT['clustering']}, ring 0)",
            f"balance {q['balance']:.2f}, modes covered {q['covered']}/8",
            f"energy distance {q['energy']:.4f}{energy_sample(q)}"]

def energy_sample(q):
    """'' when the energy distance saw every sample, else which ones it saw."""
    if q['energy_n'] == q['n']:
        return ''
    return f" (first {q['energy_n']} of {q['n']} samples)"

def toy_pretrain(net, teacher, steps=1000, batch=256, lr=2e-2, seed=0):
    """Fit the MLP to the exact denoiser at EDM's training levels (ln sigma ~ N(-1.2, 1.2^2), Karras
    et al. 2022, Table 1), so that G and f_psi start as 'the teacher', as in SiD. A large lr with
    cosine decay to 0: the fit at small sigma decides how sharp G can become, since f_psi starts
    from it (README, the toy)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for i in range(steps):
        opt.param_groups[0]['lr'] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        x0 = teacher.sample(batch, gen)
        sigma = (torch.randn(batch, 1, generator=gen) * 1.2 - 1.2).exp()
        x = x0 + sigma * torch.randn(batch, 2, generator=gen)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2  # EDM's lambda(sigma), sigma_data = 0.5
        loss = (weight * (net(x, sigma) - teacher(x, sigma)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net

# SIGN's multi-step noise levels on the toy. The student is time-free, and in 2-D a re-noised point
# x + sigma*eps with sigma above the mode width (s = 0.1) looks like a clean tail point, so f cannot
# undo the noise: re-noising at 0.8 or 0.2 makes the samples worse (README, SIGN); at <= 0.1 each
# step sharpens them. (In image space ||x_sigma - x|| ~ sigma*sqrt(d) gives sigma away.)
TOY_SIGN_SIGMAS = (0.1, 0.05, 0.02)

def sign_errors_line(sign):
    """IGN's two errors (mean L2 norms) at the end, and before training where known."""
    s = sign.get('start')
    before = f" (before training: {s['idem']:.4f}, {s['fix']:.4f})" if s else ''
    return (f"sign: idempotence error E|f(f(z)) - f(z)| {sign['idem']:.4f}, fixed-point error "
            f"E|f(x) - x| on data {sign['fix']:.4f}" + before)

#----------------------------------------------------------------------------
# A world as the loop and the driver see it: teacher, student, exact samples, fixed latents on which
# G_ema is observed, and the figures of what it makes.

class World:
    """What every toy world shares: its real-data stream for SiDA and SIGN."""
    def batches(self, batch, seed, start=0):
        """Endless exact samples from their own generator (replayed up to `start` on resume)."""
        gen = torch.Generator().manual_seed(seed + 99)
        for _ in range(start):
            self.sample(batch, gen)
        while True:
            yield self.sample(batch, gen)

    def frames_to_save(self, frames):
        """The observations a training state keeps (all of them: points are small)."""
        return frames

class Toy2D(World):
    name = 'toy'
    eval_labels = None  # the 2-D toy is unconditional

    def __init__(self):
        self.teacher = ToyMixture().eval().requires_grad_(False)
        self.eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))  # fixed

    def student(self, dropout=0.0):
        """G's and f_psi's common start: the toy MLP in EDM preconditioning, fitted to the
        teacher; the same for every --seed (the seed varies the training only)."""
        torch.manual_seed(0)
        net = edm_nets.EDMPrecond(img_resolution=0, img_channels=2, model_type='ToyMLP',
                                  dropout=dropout)
        return toy_pretrain(net, self.teacher)

    def sample(self, n, gen):
        """Exact samples and (empty) labels: the toy's real data for SiDA and SIGN."""
        return self.teacher.sample(n, gen), torch.zeros(n, 0)

    @torch.no_grad()
    def observe(self, G_ema, sigma_init):
        """G_ema's samples on the fixed latents z = sigma_init * eps (the run's own latent law)."""
        z = self.eps * sigma_init
        return G_ema(z, torch.full([len(z), 1], sigma_init)).contiguous()

    def quality_line(self, x):
        q = toy_figures(x, self.teacher)
        return (f"energy distance {q['energy']:.4f}, modes covered {q['covered']}/8, within 2 std "
                f"of a mode {q['within']:.3f} (exact: 0.865), clustering {q['clustering']:.3f} "
                f"(exact: {EXACT['clustering']}, a ring: 0), balance {q['balance']:.2f} (exact: "
                f"~1, one mode: 0)")

    def sign_inputs(self, sigma_init):
        """Fixed draws for SIGN's evaluation: latents, exact data, re-noising levels and noises,
        projection noise."""
        x_data = self.teacher.sample(2000, torch.Generator().manual_seed(5))
        noises = [torch.randn(self.eps.shape, generator=torch.Generator().manual_seed(9 + k))
                  for k in range(len(TOY_SIGN_SIGMAS))]
        noise_proj = torch.randn(x_data.shape, generator=torch.Generator().manual_seed(11))
        return self.eps * sigma_init, x_data, TOY_SIGN_SIGMAS, noises, noise_proj

    def report_lines(self, frames, sign=None):
        """The end-of-run lines (sign: sid.sign_evaluation's results, 'start' before training)."""
        lines = [f'toy end:   {self.quality_line(frames[-1][1])}']
        if sign is not None:
            lines.append(sign_errors_line(sign))
            n = len(TOY_SIGN_SIGMAS)
            for k in sorted({1, 2, n + 1}):
                q = toy_figures(sign['steps'][k - 1], self.teacher)
                lines.append(f"sign: {k} step(s) (sigmas {list(TOY_SIGN_SIGMAS[:k - 1])}): energy "
                             f"distance {q['energy']:.4f}, modes covered {q['covered']}/8, within "
                             f"2 std {q['within']:.3f}, clustering {q['clustering']:.3f}, balance "
                             f"{q['balance']:.2f}")
            noisy, proj, data = (self.nearest_mode(sign[k]) for k in ('noisy', 'projected', 'data'))
            lines.append(f'sign: projection of data + 0.2 eps: mean distance to the nearest mode '
                         f'{noisy:.3f} -> {proj:.3f} (data itself: {data:.3f})')
        return lines

    def nearest_mode(self, x):
        """Mean distance of points to their nearest mode centre (exact samples: s*sqrt(pi/2))."""
        return float(torch.cdist(x.double(), self.teacher.mu).min(1).values.mean())

#----------------------------------------------------------------------------
# The image toy: 16x16 RGB pictures of 4 shapes (the class), drawn with PIL. Every shape is centred
# and of one size, and its colour (a random saturated hue on black) is the only variation within a
# class: simple enough for a 180k-parameter one-step generator to master on a CPU in minutes. The
# teacher f_phi is the exact denoiser of the set's empirical distribution, so no network has to be
# trusted and samples are scored against the set itself. Its defaults (sid.PRESETS['toy-images'])
# come from a sweep of 32 runs (README, the image toy): what matters is that f_psi keeps up with G.

SHAPES = ('disc', 'square', 'triangle', 'cross')  # class k = SHAPES[k]

def draw_shape(shape, hue, res=16, ss=4):
    """One RGB uint8 image [res, res, 3]: `shape` in the saturated colour of `hue` on black, drawn
    at ss x the resolution and box-filtered down (anti-aliased edges)."""
    from PIL import Image, ImageDraw
    R, c, r = res * ss, res * ss / 2, 0.36 * res * ss  # size, centre, half-size
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
    """-> (uint8 [N, 3, res, res], float32 one-hot [N, 4]), N = 4 * per_class, classes interleaved;
    fixed seed: the same set on every machine."""
    hues = np.random.default_rng(seed).uniform(0, 1, per_class * len(SHAPES))
    ims = [draw_shape(SHAPES[i % len(SHAPES)], h, res) for i, h in enumerate(hues)]
    ys = torch.arange(len(ims)) % len(SHAPES)
    images = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()
    return images, torch.eye(len(SHAPES))[ys]

#----------------------------------------------------------------------------
# The exact image teacher. For p_data = (1/N) sum_i delta(x_i), x_t = x_0 + sigma*eps has the
# posterior mean
#   D(x; sigma) = sum_i softmax_i(-||x - x_i||^2 / (2 sigma^2)) x_i     (Tweedie; SiD §3: f_phi)
# in float64 (logits reach ~1e4 / sigma^2) and differentiable in x. With labels, the sum runs over
# that class.

class EmpiricalDenoiser(torch.nn.Module):
    """Exact D(x; sigma) of an image set; EDMPrecond's call convention (float32 in and out)."""
    def __init__(self, images, labels, conditional=True, chunk_elems=2 ** 22):
        super().__init__()
        X = images.double().flatten(1) / 127.5 - 1                        # [N, D] in [-1, 1]
        self.register_buffer('X', X)
        self.register_buffer('half_sq', 0.5 * (X ** 2).sum(1))             # ||x_i||^2 / 2
        self.register_buffer('set_labels', labels.double())
        self.img_channels, self.img_resolution = images.shape[1], images.shape[2]
        self.label_dim = labels.shape[1] if conditional else 0
        self.sigma_data = 0.5
        self.chunk = max(1, chunk_elems // len(X))  # rows per chunk bound the [rows, N] memory

    def weights(self, x, sigma, class_labels=None):
        """Posterior weights [B, N] in float64 (x [B, C, H, W], sigma [B])."""
        # -||x - x_i||^2 / 2 = x.x_i - ||x_i||^2 / 2 - ||x||^2 / 2; the last term is the same for
        # all i: dropped
        s2 = (sigma.reshape(-1, 1) ** 2).clamp_min(1e-300)
        logits = (x.double().flatten(1) @ self.X.T - self.half_sq) / s2
        if self.label_dim and class_labels is not None:
            same = class_labels.double().reshape(-1, self.label_dim) @ self.set_labels.T > 0.5
            logits = logits.masked_fill(~same, -float('inf'))
        return logits.softmax(1)

    def forward(self, x, sigma, class_labels=None, augment_labels=None, **kw):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sigma = sigma.reshape(-1).expand(len(x))
        c = None
        if self.label_dim and class_labels is not None:
            c = class_labels.reshape(-1, self.label_dim).expand(len(x), -1)
        out = []
        for i in range(0, len(x), self.chunk):  # chunks: memory [chunk, N] however large the batch
            part = slice(i, i + self.chunk)
            out.append(self.weights(x[part], sigma[part], None if c is None else c[part]) @ self.X)
        return torch.cat(out).reshape(x.shape).to(torch.float32)

#----------------------------------------------------------------------------
# The image student: EDM's DDPM++ U-Net (SongUNet) shrunk to 16 channels, in EDM preconditioning,
# fitted to the exact teacher by EDM's loss with the teacher's output as target, so that G and f_psi
# start as "the teacher" (SiD §4).

STUDENT_KWARGS = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                      decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                      augment_dim=9, model_channels=16, channel_mult=[1, 2], channel_mult_emb=4,
                      num_blocks=1, attn_resolutions=[])

def fit_student(net, teacher, sampler, steps, batch=64, lr=2e-3, seed=0, P_mean=-0.6, P_std=1.6):
    """lambda(sigma) |net(x_0 + sigma n) - f_phi(x_0 + sigma n)|^2 over ln sigma ~ N(-0.6, 1.6^2),
    wider than EDM's because SiD queries f_psi up to sigma ~ 24 and G at 2.5; the lr decays over the
    second half."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, 2 * (1 - k / max(steps, 1))
                                                                 + 0.05))
    for _ in range(steps):
        x0, c = sampler(batch, gen)
        sigma = (torch.randn(batch, 1, 1, 1, generator=gen) * P_std + P_mean).exp().clamp(0.002, 80)
        x = x0 + sigma * torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            target = teacher(x, sigma, c)
        w = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2  # EDM's lambda(sigma), sigma_data = 0.5
        loss = (w * (net(x, sigma, c) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net

#----------------------------------------------------------------------------
# Image quality against the set (per-pixel RMS distances, float64).

def rms_distances(a, b):
    """[len(a), len(b)] RMS distances between flattened images, float64."""
    d2 = (a ** 2).sum(1, keepdim=True) - 2 * a @ b.T + (b ** 2).sum(1)
    return d2.clamp_min(0).div(a.shape[1]).sqrt()

def image_quality(X, set_labels, x, labels=None):
    """coverage = fraction of set images that are some sample's nearest; fidelity = mean RMS
    distance to it; class_acc = its class is the sample's label; energy = energy distance to the set
    in RMS units (blur and collapse both raise it), unbiased: 0 on average for exact samples, since
    the samples' self-term runs over distinct pairs and the set's over all N^2 pairs (the set IS
    p_data: two draws from it are the same image 1/N of the time); sharpness = mean squared
    difference of neighbouring pixels."""
    xd, X = x.detach().cpu().double().flatten(1), X.cpu()
    d = rms_distances(xd, X)
    dmin, nn_i = d.min(1)
    n, im = len(xd), x.detach().cpu().double()
    e_xx = rms_distances(xd, xd).sum() / max(n * (n - 1), 1)  # the zero diagonals left out
    e_yy = rms_distances(X, X).mean()  # the zeros included: the expectation under p_data
    sharp = ((im[..., 1:, :] - im[..., :-1, :]) ** 2).mean()
    sharp = sharp + ((im[..., 1:] - im[..., :-1]) ** 2).mean()
    out = dict(coverage=len(nn_i.unique()) / len(X), fidelity=float(dmin.mean()),
               energy=float(2 * d.mean() - e_xx - e_yy), sharpness=float(sharp / 2))
    if labels is not None and labels.shape[-1]:
        nearest_class = set_labels.cpu()[nn_i].argmax(1)
        out['class_acc'] = float((nearest_class == labels.cpu().argmax(1)).double().mean())
    return out

def quality_text(q):
    return (f"coverage {q['coverage']:.2f}, energy {q['energy']:.3f}, class acc "
            f"{q.get('class_acc', float('nan')):.2f}, fidelity {q['fidelity']:.3f}, sharpness "
            f"{q['sharpness']:.3f}")

# SIGN's re-noising levels on the image toy (multi-step sampling), its corruptions for projection.
IMAGE_SIGN_SIGMAS = (0.8, 0.4, 0.2)
IMAGE_PROJ_SIGMA = 0.3  # additive noise; masking blanks a random 8x8 square to 0 (mid grey)

#----------------------------------------------------------------------------
# The image world as the loop sees it (Toy2D's interface). Class-conditional: G and f_psi get
# one-hot labels.

_FITTED = {}  # fitted student weights per setting: the fit runs once per process

class ImageToy(World):
    name = 'toy-images'

    def __init__(self, per_class=16, res=16, fit_steps=400, n_eval=256, net_kwargs=None, seed=0):
        self.images, self.labels = make_image_set(per_class, res, seed)
        teacher = EmpiricalDenoiser(self.images, self.labels)
        self.teacher = teacher.eval().requires_grad_(False)
        self.net_kwargs = dict(STUDENT_KWARGS, **(net_kwargs or {}))
        self.fit_steps = fit_steps
        self.seed = seed
        g = torch.Generator().manual_seed(7)  # fixed latents (unit noise) and labels: the figures'
        self.eps = torch.randn([n_eval, *self.images.shape[1:]], generator=g)
        self.eval_labels = torch.eye(len(SHAPES))[torch.arange(n_eval) % len(SHAPES)]
        self._exact = None

    def student(self, dropout=0.0):
        """G's and f_psi's common start: a tiny SongUNet fitted to the exact teacher (the global RNG
        is left as it was)."""
        kw = dict(img_resolution=self.images.shape[2], img_channels=self.images.shape[1],
                  label_dim=len(SHAPES), **self.net_kwargs)
        key = (len(self.images), self.fit_steps, self.seed, repr(sorted(self.net_kwargs.items())))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if key not in _FITTED:
                net = edm_nets.EDMPrecond(**kw, dropout=0.0)
                net = fit_student(net, self.teacher, self.sample, self.fit_steps, seed=self.seed)
                _FITTED[key] = net.state_dict()
            net = edm_nets.EDMPrecond(**kw, dropout=dropout)
        net.load_state_dict(_FITTED[key])
        return net

    def sample(self, n, gen=None):
        """n exact samples (uniform draws from the set) -> (x [n, C, H, W] in [-1, 1], labels)."""
        i = torch.randint(len(self.images), (n,), generator=gen)
        return self.images[i].float() / 127.5 - 1, self.labels[i]

    def sample_of(self, labels, gen):
        """One exact sample per given label (a random set image of that class)."""
        per = len(self.images) // len(SHAPES)
        i = labels.argmax(1) + len(SHAPES) * torch.randint(per, (len(labels),), generator=gen)
        return self.images[i].float() / 127.5 - 1

    @torch.no_grad()
    def observe(self, G_ema, sigma_init):
        """G_ema's samples on the fixed latents z = sigma_init * eps, with the fixed labels."""
        sigma = torch.full([len(self.eps), 1, 1, 1], sigma_init)
        return G_ema(self.eps * sigma_init, sigma, self.eval_labels).contiguous()

    def frames_to_save(self, frames):
        """The first and the latest observation only (images are large)."""
        return frames[:1] + frames[-1:]

    def quality(self, x, labels=None):
        labels = self.eval_labels if labels is None else labels
        return image_quality(self.teacher.X, self.teacher.set_labels, x, labels)

    def exact(self):
        """Exact samples with the observations' labels (fixed seed): the reference figures."""
        if self._exact is None:
            x = self.sample_of(self.eval_labels, torch.Generator().manual_seed(1234))
            self._exact = (x, self.quality(x))
        return self._exact

    def quality_line(self, x):
        return f'{quality_text(self.quality(x))} (exact samples: {quality_text(self.exact()[1])})'

    def sign_inputs(self, sigma_init):
        """Fixed draws for SIGN's evaluation, one per observation label: latents, exact data,
        re-noising levels and noises, additive projection noise and level, and the masked data (an
        8x8 square set to 0)."""
        x_data = self.sample_of(self.eval_labels, torch.Generator().manual_seed(5))
        noises = [torch.randn(self.eps.shape, generator=torch.Generator().manual_seed(9 + k))
                  for k in range(len(IMAGE_SIGN_SIGMAS))]
        g = torch.Generator().manual_seed(11)
        noise_proj = torch.randn(x_data.shape, generator=g)
        H = x_data.shape[-1]
        u, v = torch.randint(H - 7, (2, len(x_data)), generator=g)
        ar = torch.arange(H)
        rows = (ar[None] >= u[:, None]) & (ar[None] < u[:, None] + 8)
        cols = (ar[None] >= v[:, None]) & (ar[None] < v[:, None] + 8)
        keep = ~(rows[:, :, None] & cols[:, None, :])
        return (self.eps * sigma_init, x_data, IMAGE_SIGN_SIGMAS, noises, noise_proj,
                IMAGE_PROJ_SIGMA, dict(masked=x_data * keep[:, None]))

    def curve(self, frames, points=10):
        """(title, figures) of about `points` observations, evenly spaced, the last one included."""
        step = max(1, len(frames) // points)
        picked = frames[::step] + ([] if (len(frames) - 1) % step == 0 else frames[-1:])
        return [(t, self.quality(x)) for t, x in picked]

    def report_lines(self, frames, sign=None):
        """The end figures, a curve through the observations, and SIGN's multi-step and projection
        figures (sign: sid.sign_evaluation's results)."""
        lines = [f'toy end:   {self.quality_line(frames[-1][1])}']
        points = ', '.join(f"{t} {q['energy']:.3f} / {q['coverage']:.2f}"
                           for t, q in self.curve(frames))
        lines.append(f'toy curve (energy / coverage): {points}')
        if sign is not None:
            lines.append(sign_errors_line(sign))
            for k, q in self.step_figures(sign):
                lines.append(f'sign: {k} step(s) (sigmas {list(IMAGE_SIGN_SIGMAS[:k - 1])}): '
                             f'{quality_text(q)}')
            for name, y, p, rms, hit in self.projection_figures(sign):
                lines.append(f'sign: projection of {name} data: RMS to the clean image '
                             f'{rms[0]:.3f} -> {rms[1]:.3f}, nearest set image is the clean one '
                             f'{hit[0]:.2f} -> {hit[1]:.2f}')
        return lines

    def step_figures(self, sign):
        """[(k, figures of the k-step samples)] for 1, 2 and all steps."""
        return [(k, self.quality(sign['steps'][k - 1])) for k in (1, 2, len(IMAGE_SIGN_SIGMAS) + 1)]

    def projection_figures(self, sign):
        """[(name, corrupted y, projection f(y), RMS to the clean image (y, f(y)), how often the
        nearest set image is the clean one's (y, f(y)))], noisy data and other corruptions."""
        x = sign['data']

        def nearest(a):
            return rms_distances(a.double().flatten(1), self.teacher.X).argmin(1)

        def rms(a):
            return float((a - x).flatten(1).pow(2).mean(1).sqrt().mean())

        def hit(a):
            return float((nearest(a) == nearest(x)).double().mean())

        pairs = [('noisy', (sign['noisy'], sign['projected']))]
        pairs += list(sign.get('corrupted', {}).items())
        return [(name, y, p, (rms(y), rms(p)), (hit(y), hit(p))) for name, (y, p) in pairs]

WORLDS = {'toy': Toy2D, 'toy-images': ImageToy}
