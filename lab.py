"""lab: the two-hour lab's helpers (lab.ipynb): the exercises' checks, the picture of SiD's
mechanism on the 2-D toy, runs of the README's experiments over several seeds, and the notebook's
execution.

    python lab.py mechanism                          # assets/mechanism.png, the README's picture
    python lab.py seeds 0-2 --dataset toy --alpha 0.5   # one run per seed, their end figures
    python lab.py seeds 0-2 --detach-xt --dataset toy   # the same with SiD's x_t detached (DMD)
    python lab.py execute [--check]                  # run lab.ipynb top to bottom, save outputs

The exercises are in lab_exercises.py (questions) and lab_solutions.py (answers); test_lab.py runs
the checks below on the answers (LAB_ANSWERS=lab_exercises: on yours).
"""
import contextlib
import dataclasses
import hashlib
import io
import math
import os
import sys

import numpy as np
import torch

import draw
import runs
import sid
import toy

HERE = os.path.dirname(os.path.abspath(__file__))

#----------------------------------------------------------------------------
# The exercises' checks. Each takes the module (or namespace) holding the answers, compares them
# with an independent computation (autograd of a log-density, a brute-force sum, a closed form
# derived by hand, the project's tested functions) and raises AssertionError with a hint.

def close(got, want, what, rtol=1e-7, atol=1e-10):
    """Assert that two tensors agree; the message says what was compared and by how much not."""
    got = torch.as_tensor(got, dtype=torch.float64).detach()
    want = torch.as_tensor(want, dtype=torch.float64).detach()
    if got.shape != want.shape:
        raise AssertionError(f'{what}: shape {list(got.shape)}, expected {list(want.shape)}')
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        err = float((got - want).abs().max())
        raise AssertionError(f'{what}: off by up to {err:.3g} (max |expected| '
                             f'{float(want.abs().max()):.3g})')

def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

def check_gaussian_denoiser(m):
    """Against Tweedie: x + sigma^2 grad log N(x; mu, (s^2 + sigma^2) I), by autograd."""
    mu = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    for s, sigma in ((0.5, 0.2), (1.7, 2.0), (0.1, torch.linspace(0.01, 5, 64).double()[:, None])):
        x = (2 * randn(64, 3, seed=1)).requires_grad_(True)
        var = s ** 2 + torch.as_tensor(sigma, dtype=torch.float64) ** 2
        log_p = torch.distributions.Normal(mu, var.sqrt()).log_prob(x).sum()
        score, = torch.autograd.grad(log_p, x)
        want = x.detach() + sigma ** 2 * score
        close(m.gaussian_denoiser(x.detach(), sigma, mu, s), want,
              f'gaussian_denoiser at s = {s}, sigma = {"a [B, 1] tensor" if s == 0.1 else sigma}')

def check_score_from_denoiser(m):
    """Against autograd of the 2-D toy's exact log-density (its denoiser is exact, toy.py)."""
    T = toy.ToyMixture()
    x = 1.5 * randn(64, 2, seed=2)
    for sig in (0.05, 0.5, 3.0):
        sigma = torch.full((64, 1), sig, dtype=torch.float64)
        xg = x.clone().requires_grad_(True)
        want, = torch.autograd.grad(T.log_prob(xg, sigma).sum(), xg)
        close(m.score_from_denoiser(T, x, sigma), want, f'the score at sigma = {sig}', rtol=1e-6,
              atol=1e-8 / sig ** 2)

def check_sid_generator_loss(m):
    """Values against the paper's other form (Eq. 23: (y_phi - y_psi)(y_psi - x_g) + (1 - alpha)
    (y_phi - y_psi)^2, over the TEACHER's w), gradients with w detached."""
    for alpha in (1.2, 1.0, 0.5):
        y_phi, y_psi, x_g = (randn(6, 5, seed=k).requires_grad_(True) for k in (3, 4, 5))
        w = (x_g - y_phi).abs().mean(1).detach()
        diff = y_phi - y_psi
        want = (diff * (y_psi - x_g) + (1 - alpha) * diff ** 2).sum(1) / w
        got = m.sid_generator_loss(y_phi, y_psi, x_g, alpha)
        close(got, want, f"SiD loss values at alpha {alpha} (w = mean |x_g - y_phi|, the teacher's "
              'error, per sample)', rtol=1e-9)
        weights = randn(6, seed=6)
        g_want = torch.autograd.grad((want * weights).sum(), (y_phi, y_psi, x_g))
        g_got = torch.autograd.grad((got * weights).sum(), (y_phi, y_psi, x_g))
        for name, a, b in zip(('y_phi', 'y_psi', 'x_g'), g_got, g_want):
            close(a, b, f'SiD loss gradient w.r.t. {name} at alpha {alpha} (is w detached?)',
                  rtol=1e-9)

def check_sid_grad_x_g(m):
    """Against the gradient derived by hand for affine denoisers f(x; sigma) = a x + c sigma:
    [(a_phi - a_psi) v + u (a_phi - 1 - alpha (a_phi - a_psi))] / w, u = f_phi - f_psi,
    v = (f_phi - x_g) - alpha u, all at x_t = x_g + sigma n."""
    a, b, c1, c2 = 0.8, 0.6, 0.1, -0.2

    def f_phi(x, sigma):
        return a * x + c1 * sigma

    def f_psi(x, sigma):
        return b * x + c2 * sigma

    x_g, noise = randn(8, 3, seed=7), randn(8, 3, seed=8)
    sigma = torch.linspace(0.1, 3, 8, dtype=torch.float64)[:, None]
    for alpha in (1.2, 0.5):
        x_t = x_g + sigma * noise
        u = f_phi(x_t, sigma) - f_psi(x_t, sigma)
        v = (f_phi(x_t, sigma) - x_g) - alpha * u
        w = (x_g - f_phi(x_t, sigma)).abs().mean(1, keepdim=True)
        want = ((a - b) * v + u * (a - 1 - alpha * (a - b))) / w
        close(m.sid_grad_x_g(f_phi, f_psi, x_g, sigma, noise, alpha), want,
              f'd loss / d x_g at alpha {alpha} (does the gradient run through x_t into both '
              'networks?)', rtol=1e-9)

def check_fake_score_minimiser(m):
    """Against a brute-force posterior mean over the points, one row at a time (numpy, with the
    log-sum-exp), from sigma = 0.02 (the nearest point) to 20 (the points' mean)."""
    points = randn(7, 2, seed=9)
    x = 1.5 * randn(40, 2, seed=10)
    sigma = torch.logspace(math.log10(0.02), math.log10(20), 40, dtype=torch.float64)[:, None]
    want = []
    for xi, si in zip(x.numpy(), sigma[:, 0].numpy()):
        logw = -((xi[None] - points.numpy()) ** 2).sum(1) / (2 * si ** 2)
        wts = np.exp(logw - logw.max())
        want.append(wts @ points.numpy() / wts.sum())
    close(m.fake_score_minimiser(points, x, sigma), torch.from_numpy(np.stack(want)),
          'the posterior mean over the points', rtol=1e-7, atol=1e-9)

SCALE_CASES = ((0.5, 0.3), (1.5, 1.0), (0.8, 2.0))  # (s, sigma) of the alpha exercise

def scale_family(s0, sigma, alpha, n=2 ** 18, seed=11):
    """The 1-D scale family of exercise 6: p_data = N(0, 1), x_g = s eps, x_t = x_g + sigma n, the
    exact denoisers f_phi(x) = a x and f_psi*(x) = b(s) x. From one set of n draws -> (Monte-Carlo
    Fisher divergence E[(f_phi - f_psi*)^2] and its standard error, its gradient in s with
    f_psi* moving with s, SiD's gradient in s without w with f_psi held at f_psi*(s0))."""
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    eps, noise = randn(n, seed=seed), randn(n, seed=seed + 1)
    x_g = s * eps
    x_t = x_g + sigma * noise
    a = 1 / (1 + sigma ** 2)                   # f_phi(x) = a x: the denoiser of N(0, 1)
    b = s ** 2 / (s ** 2 + sigma ** 2)         # f_psi*(x) = b x: the denoiser of N(0, s^2)
    sq = ((a - b) * x_t) ** 2
    g_fisher, = torch.autograd.grad(sq.mean(), s, retain_graph=True)
    b0 = b.detach()                            # SiD's step: f_psi is a fixed network
    loss = ((a - b0) * x_t * ((a * x_t - x_g) - alpha * (a - b0) * x_t)).mean()
    g_sid, = torch.autograd.grad(loss, s)
    sq = sq.detach()
    return float(sq.mean()), float(sq.std()) / math.sqrt(n), float(g_fisher), float(g_sid)

def check_alpha(m):
    """fisher_1d against a Monte-Carlo estimate (5 standard errors); ALPHA_EXACT by measuring, with
    the same draws, SiD's gradient (f_psi held at f_psi*, no w) and the Fisher divergence's
    gradient (f_psi* moving with s) with respect to s: their ratio must not depend on s or sigma."""
    if getattr(m, 'ALPHA_EXACT', None) is None or not hasattr(m, 'fisher_1d'):
        raise NotImplementedError('fisher_1d and ALPHA_EXACT')
    ratios = []
    for s0, sigma in SCALE_CASES:
        mc, se, g_fisher, g_sid = scale_family(s0, sigma, m.ALPHA_EXACT)
        got = float(m.fisher_1d(s0, sigma))
        if not abs(got - mc) <= 5 * se:
            raise AssertionError(f'fisher_1d({s0}, {sigma}) = {got:.5g}, a Monte-Carlo estimate '
                                 f'gives {mc:.5g} +- {se:.2g}')
        ratios.append(g_sid / g_fisher)
    if min(ratios) <= 0 or max(ratios) > 1.05 * min(ratios):
        raise AssertionError(f'at alpha = {m.ALPHA_EXACT} the ratio of SiD\'s gradient to the '
                             f"Fisher divergence's is {', '.join(f'{r:.3f}' for r in ratios)} at "
                             f'(s, sigma) = {SCALE_CASES}: not one positive constant')

def check_sida_gan_loss(m):
    """Against the project's sid.sida_generator_gan_loss (tested against the official sida_loss.py
    reductions): values, the gradient of one sample's loss on the OTHER samples' logits (the
    micro-batch coupling), and the clamp (no gradient beyond +-10)."""
    x_g, y_phi, y_psi = randn(4, 3, 8, 8, seed=12), randn(4, 3, 8, 8, seed=13), randn(4, 3, 8, 8)
    logits = 4 * randn(4, 1, 8, 8, seed=14)
    logits[0, 0, 0, :3] = torch.tensor([12.0, -12.0, -10.5])
    logits.requires_grad_(True)
    want = sid.sida_generator_gan_loss(logits, x_g, y_phi, y_psi)
    w = sid.sid_normaliser(x_g, y_phi).double()
    got = m.sida_gan_loss(logits, w, 3 * 8 * 8)
    close(got, want, 'the adversarial term per sample (one BCE mean per micro-batch, clamped '
          'logits)', rtol=1e-6)
    g_want, = torch.autograd.grad(want[1], logits)
    g_got, = torch.autograd.grad(got[1], logits)
    close(g_got, g_want, "d gan_1 / d logits (sample 1's term depends on every sample's logits; "
          'beyond +-10 the clamp stops the gradient)', rtol=1e-6, atol=1e-12)

def check_idem_loss(m):
    """A linear f(x) = x A^T: the loss values, and d loss / d A through the inner call only,
    (2 / D) sum_b [(A' - I)^T (A' - I) A z_b] z_b^T with A' = A frozen (derived by hand)."""
    D = 3
    A = (torch.eye(D, dtype=torch.float64) + 0.3 * randn(D, D, seed=15)).requires_grad_(True)
    A_bar = A.detach().clone()
    z = randn(10, D, seed=16)

    def f(x):
        return x @ A.T

    def f_bar(x):
        return x @ A_bar.T

    got = m.idem_loss(f, f_bar, z)
    y = z @ A_bar.T
    M = A_bar - torch.eye(D, dtype=torch.float64)
    close(got, (y @ M.T).square().mean(1), 'the idempotence loss values d(f(f(z)), f(z))')
    grad, = torch.autograd.grad(got.sum(), A)
    want = (2 / D) * (y @ M.T @ M).T @ z
    close(grad, want, 'd loss / d A (only the inner call of f may carry the gradient)', rtol=1e-9)

CHECKS = {'gaussian_denoiser': check_gaussian_denoiser,
          'score_from_denoiser': check_score_from_denoiser,
          'sid_generator_loss': check_sid_generator_loss,
          'sid_grad_x_g': check_sid_grad_x_g,
          'fake_score_minimiser': check_fake_score_minimiser,
          'alpha': check_alpha,
          'sida_gan_loss': check_sida_gan_loss,
          'idem_loss': check_idem_loss}

def check(name, answers):
    """Run exercise `name`'s check on `answers` (a module or namespace); -> 'name: ok'."""
    CHECKS[name](answers)
    return f'{name}: ok'

def attempt(name):
    """The notebook's cell for an exercise: checks lab_exercises' answer if written (a wrong one
    raises with its hint), else says so and checks the reference answer."""
    import importlib
    import lab_exercises
    import lab_solutions
    importlib.reload(lab_exercises)  # the answers as last saved
    try:
        print(check(name, lab_exercises), '(your answer in lab_exercises.py)')
    except NotImplementedError:
        print(check(name, lab_solutions), '(the reference answer: yours in lab_exercises.py is '
              'not written yet)')

#----------------------------------------------------------------------------
# SiD's generator step with x_t detached: the DMD-style gradient (the README's experiment and the
# lab's exercise 4). Only the explicit x_g in (f_phi - x_g) then carries the gradient:
# d loss / d x_g = -(f_phi - f_psi) / w, the score difference DMD follows, and alpha drops out.

def G_sid_detached(s, x_g, x_r, c):
    """sid.G_sid with x_t = (x_g + sigma n).detach(); the same draws and reductions."""
    cfg, aug0 = s.cfg, s.zero_aug
    sigma = sid.draw_sigma_generator(x_g, cfg.tmax)
    noise = torch.randn_like(x_g)
    x_t = (x_g + sigma * noise).detach()
    y_phi = s.f_phi(x_t, sigma, c, aug0)
    y_psi = s.f_psi(x_t, sigma, c, aug0)
    loss = sid.sid_generator_loss(y_phi, y_psi, x_g, cfg.alpha).sum() * cfg.lsg / s.n
    return loss, sid.logged(loss)

@contextlib.contextmanager
def detached_x_t():
    """Within: `--method sid` trains G with G_sid_detached (sid.METHODS restored after)."""
    method = sid.METHODS['sid']
    sid.METHODS['sid'] = dataclasses.replace(method, G_loss=G_sid_detached)
    try:
        yield
    finally:
        sid.METHODS['sid'] = method

#----------------------------------------------------------------------------
# The mechanism on the 2-D toy: at a few moments of a SiD run, G's samples x_g, for some of them
# the teacher's and the fake score's denoised points f_phi(x_t), f_psi(x_t) at one noise level,
# and the direction G's step moves each x_g (-d loss / d x_g, averaged over SiD's draws).

MECHANISM_KIMG = (1, 10, 40, 300)  # the moments drawn (the first iteration ends at 0.5 kimg)
MECHANISM_SIGMA = 0.3              # the noise level of the denoised points drawn

@torch.no_grad()
def mechanism_panel(s, world, shown=16, sigma=MECHANISM_SIGMA, draws=256):
    """One moment: G's samples on the world's fixed latents, for the first `shown` of them x_t at
    `sigma` (fixed noise), f_phi(x_t), f_psi(x_t), and the mean of -d loss_b / d x_g over `draws`
    draws of (sigma, n) from G's schedule (SiD's loss, s's alpha and tmax)."""
    G, cfg = s.G.eval(), s.cfg
    x_g = world.observe(G, cfg.sigma_init)
    gen = torch.Generator().manual_seed(3)
    x = x_g[:shown]
    x_t = x + sigma * torch.randn(x.shape, generator=gen)
    level = torch.full([shown, 1], sigma)
    y_phi, y_psi = s.f_phi(x_t, level), s.f_psi(x_t, level)
    rep = x.repeat(draws, 1).requires_grad_(True)
    t = torch.rand([len(rep), 1], generator=gen) * cfg.tmax / 1000
    levels = sid.sigma_from_t(t)
    with torch.enable_grad():
        x_rt = rep + levels * torch.randn(rep.shape, generator=gen)
        loss = sid.sid_generator_loss(s.f_phi(x_rt, levels), s.f_psi(x_rt, levels), rep,
                                      cfg.alpha)
        grad, = torch.autograd.grad(loss.sum(), rep)
    direction = -grad.reshape(draws, shown, -1).mean(0)
    q = toy.toy_figures(x_g, world.teacher)
    gap = float((y_phi - y_psi).norm(dim=1).mean())
    steps = s.cur_nimg // cfg.batch
    return dict(title=f'after {steps} step(s), {s.cur_nimg / 1e3:.0f} kimg', samples=x_g, x_g=x,
                x_t=x_t, y_phi=y_phi, y_psi=y_psi, direction=direction,
                lines=[f'mean |f_phi - f_psi| at sigma {sigma:g}: {gap:.3f}',
                       f'mean |update| {float(direction.norm(dim=1).mean()):.3g}',
                       f"within 2 std {q['within']:.3f}, clustering {q['clustering']:.3f}"])

def mechanism(seed=0, at_kimg=MECHANISM_KIMG, **kw):
    """SiD on the 2-D toy with its preset (as `python sid.py --dataset toy --seed SEED`), stopped
    to look at the moments `at_kimg` -> [mechanism_panel(...)], the world."""
    cfg = sid.make_config({'dataset': 'toy', 'seed': seed})
    world = toy.Toy2D()
    s = sid.setup(cfg, sid.build_networks(cfg, world, torch.device('cpu')))
    panels, todo = [], sorted(at_kimg)
    for it in sid.iterate(s):
        while todo and it.cur_nimg >= todo[0] * 1e3:
            panels.append(mechanism_panel(s, world, **kw))
            todo.pop(0)
        if not todo:
            break
    return panels, world

def mechanism_command(argv):
    import argparse
    p = argparse.ArgumentParser(prog='lab.py mechanism', description='Draw SiD\'s mechanism on '
                                'the 2-D toy (the README\'s and the lab\'s picture).')
    p.add_argument('--seed', type=int, default=0, help='the run\'s seed (default: 0)')
    p.add_argument('--kimg', default=','.join(f'{k:g}' for k in MECHANISM_KIMG),
                   help='the moments drawn, in kimg (default: %(default)s)')
    p.add_argument('--out', default=os.path.join(HERE, 'assets', 'mechanism.png'),
                   help='the PNG written (default: assets/mechanism.png)')
    a = p.parse_args(argv)
    try:
        at_kimg = [float(k) for k in a.kimg.split(',')]
    except ValueError:
        at_kimg = []
    if not at_kimg or not all(0 < k <= 300 for k in at_kimg):
        raise ValueError(f"--kimg '{a.kimg}': moments in (0, 300], e.g. 1,10,40,300")
    panels, world = mechanism(a.seed, at_kimg)
    runs.write_file(a.out, draw.mechanism_picture(panels, world.teacher))
    print(f'wrote {a.out}')

#----------------------------------------------------------------------------
# The README's experiments: one run per seed with the same options, the end figures side by side.

def end_figures(run, s):
    """The figures of a finished toy run's end (and, for SIGN, IGN's two errors)."""
    x = run.frames[-1][1]
    if run.world.name == 'toy':
        q = toy.toy_figures(x, run.world.teacher)
        out = {k: q[k] for k in ('energy', 'covered', 'within', 'clustering', 'balance')}
    else:
        out = run.world.quality(x)
    if s.cfg.method == 'sign':
        ev = runs.toy_sign_evaluation(run, s)
        out.update(idem=ev['idem'], fix=ev['fix'])
    return out

REPORT = ('toy start', 'toy end', 'toy curve', 'sign:')  # the lines a toy run ends with

def train(cfg, detach=False, show=REPORT, prefix=''):
    """runs.train(cfg) with its status lines held back: prints the lines starting with `show`
    (the toy's report; after `prefix`) -> (run, s). detach: G's step with x_t detached
    (G_sid_detached)."""
    out = io.StringIO()
    variant = detached_x_t() if detach else contextlib.nullcontext()
    with contextlib.redirect_stdout(out), variant:
        run, s = runs.train(cfg)
    for line in out.getvalue().splitlines():
        if line.startswith(show):
            print(prefix + line)
    return run, s

def seeds_command(argv):
    """`python lab.py seeds 0-2 [--detach-xt] OPTIONS`: `python sid.py OPTIONS --seed S` for each
    seed (a toy dataset), each in its own run folder, then the end figures per seed."""
    if not argv:
        raise ValueError('usage: python lab.py seeds 0-2 [--detach-xt] --dataset toy [OPTIONS]')
    ranges, argv = runs.parse_seeds(argv[0]), list(argv[1:])
    seeds = [k for lo, hi in ranges for k in range(lo, hi + 1)]
    if len(seeds) > 100:
        raise ValueError(f'lab.py seeds: {len(seeds)} seeds, one toy run each; give at most 100')
    detach = '--detach-xt' in argv
    if detach:
        argv.remove('--detach-xt')
    parser = runs.options_parser(sid.Config(), 'lab.py seeds', '', '')
    table = []
    for seed in seeds:
        args = vars(parser.parse_args(argv + ['--seed', str(seed)]))
        args.pop('dry_run')
        if args['outdir']:  # one folder per seed under it
            args['outdir'] = os.path.join(args['outdir'], f'seed{seed}')
        cfg = runs.resolve_config(args)
        if cfg.dataset not in toy.WORLDS:
            raise ValueError('lab.py seeds runs the toys only (--dataset toy or toy-images)')
        run, s = train(cfg, detach, ('toy start', 'toy end', 'sign:', 'wrote'),
                       f'seed {seed}: ')
        table.append(end_figures(run, s))
    print(f"{'figure':<12s}" + ''.join(f'{"seed " + str(k):>10s}' for k in seeds))
    for name in table[0]:
        print(f'{name:<12s}' + ''.join(f'{row[name]:>10.4g}' for row in table))
    return table

#----------------------------------------------------------------------------
# The notebook: executed top to bottom by nbclient (CI, and before committing its outputs). The hash
# of its code cells goes into its metadata, so a test can tell outputs from older code.

NOTEBOOK = os.path.join(HERE, 'lab.ipynb')

def code_hash(nb):
    """sha256 of the code cells' sources, in order."""
    h = hashlib.sha256()
    for cell in nb['cells']:
        if cell['cell_type'] == 'code':
            src = cell['source']
            h.update((''.join(src) if isinstance(src, list) else src).encode())
            h.update(b'\0')
    return h.hexdigest()

def execute_notebook(path=NOTEBOOK, write=True, timeout=1800):
    """Run the notebook in a fresh kernel (nbclient) in its folder; every cell must succeed. write:
    save the outputs and the code hash into the file (atomically)."""
    import nbclient
    import nbformat
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                                     resources={'metadata': {'path': os.path.dirname(path)}})
    client.execute()
    nb.metadata['lab'] = {'code_sha256': code_hash(nb)}
    if write:
        runs.write_file(path, (nbformat.writes(nb) + '\n').encode())
    return nb

def execute_command(argv):
    import argparse
    p = argparse.ArgumentParser(prog='lab.py execute', description='Run lab.ipynb top to bottom in '
                                'a fresh kernel (nbclient); save its outputs, or only check that '
                                'every cell runs.')
    p.add_argument('notebook', nargs='?', default=NOTEBOOK)
    p.add_argument('--check', action='store_true', help='run it, write nothing (CI)')
    a = p.parse_args(argv)
    execute_notebook(a.notebook, write=not a.check)
    print(f"{a.notebook}: every cell ran{'' if a.check else '; outputs saved'}")

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(1)  # as `python sid.py --dataset toy`: the same numbers
    commands = {'mechanism': mechanism_command, 'seeds': seeds_command,
                'execute': execute_command}
    if not argv:
        print(__doc__.split('\n\n')[1])
        sys.exit(2)
    if argv[0] not in commands:
        print(f"error: unknown command '{argv[0]}' (one of: {', '.join(commands)})",
              file=sys.stderr)
        sys.exit(2)
    runs.one_line_errors(lambda: commands[argv[0]](argv[1:]))

if __name__ == '__main__':
    main()
