"""lab_exercises: the lab's exercises, to fill in (lab.ipynb walks through them; the answers are in
lab_solutions.py, read them after trying).

Check one exercise, or all (each check passes on the reference answer and fails on the common
wrong ones):

    LAB_ANSWERS=lab_exercises python -m pytest -q test_lab.py -k gaussian_denoiser
    LAB_ANSWERS=lab_exercises python -m pytest -q test_lab.py -k exercise

or, in the notebook, `lab.check('gaussian_denoiser', lab_exercises)`. Tensors are float64 unless
said otherwise; x has shape [B, D] (a batch of points), sigma is a number or a [B, 1] tensor.
"""
import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# 1. Tweedie's formula for a Gaussian.

def gaussian_denoiser(x, sigma, mu, s):
    """x_0 ~ N(mu, s^2 I) (mu: [D], s: a number) is observed as x = x_0 + sigma n, n ~ N(0, I).
    Return the denoiser D(x; sigma) = E[x_0 | x]. Hint: both x_0 and x are Gaussian; or use
    Tweedie, D(x; sigma) = x + sigma^2 grad log p_sigma(x), p_sigma = N(mu, (s^2 + sigma^2) I)."""
    raise NotImplementedError

#----------------------------------------------------------------------------
# 2. Tweedie in reverse: the score from a denoiser.

def score_from_denoiser(D, x, sigma):
    """D(x, sigma) is the exact denoiser of some noised density p_sigma. Return the score
    grad_x log p_sigma(x). (SiD never evaluates a density: every score it needs comes from a
    denoiser this way, the teacher's f_phi and the fake score f_psi.)"""
    raise NotImplementedError

#----------------------------------------------------------------------------
# 3. SiD's generator loss.

def sid_generator_loss(y_phi, y_psi, x_g, alpha):
    """y_phi = f_phi(x_t), y_psi = f_psi(x_t) (denoised points), x_g the generator's samples, all
    [B, D]. Return SiD's per-sample loss [B] in the official code's form (SiD Eq. 22):
        sum over D of (y_phi - y_psi) * ((y_phi - x_g) - alpha (y_phi - y_psi)) / w,
    w = mean over D of |x_g - y_phi|, floored at 1e-5. Think about which quantities the gradient
    may flow through: the check differentiates your loss with respect to all three inputs."""
    raise NotImplementedError

#----------------------------------------------------------------------------
# 4. The gradient that reaches x_g (what breaks when x_t is detached).

def sid_grad_x_g(f_phi, f_psi, x_g, sigma, noise, alpha):
    """f_phi, f_psi: frozen denoisers, called as f(x, sigma). Return d(sum_b loss_b) / d x_g [B, D]
    of SiD's loss at x_t = x_g + sigma * noise (use lab_solutions.sid_generator_loss or yours).
    Then try the DMD-style variant, x_t computed from x_g.detach(): which terms of the gradient
    vanish, and why does alpha then no longer matter? (lab.ipynb, section 4.)"""
    raise NotImplementedError

#----------------------------------------------------------------------------
# 5. The fake score's minimiser.

def fake_score_minimiser(points, x, sigma):
    """The generator's samples are the N points `points` [N, D], each equally likely. f_psi is
    trained by EDM's denoising loss lambda(sigma) ||f_psi(x_i + sigma n) - x_i||^2 on them. Return
    the function it converges to, evaluated at x [B, D] with sigma [B, 1]: the posterior mean
    E[x_0 | x_0 + sigma n = x] over the points."""
    raise NotImplementedError

#----------------------------------------------------------------------------
# 6. alpha: the Fisher divergence of a 1-D scale family, and the alpha that follows its gradient.

def fisher_1d(s, sigma):
    """Data p_data = N(0, 1) in 1-D; the generator G(eps) = s * eps (s > 0), so p_theta = N(0, s^2);
    x_t = G(eps) + sigma n. With the exact denoisers f_phi (of the data) and f_psi* (of G's
    samples), return SiD's Fisher divergence at this sigma in denoiser units,
        E_{x_t ~ p_theta,sigma} [(f_phi(x_t) - f_psi*(x_t))^2]
    (= sigma^4 times the squared score difference), in closed form. s, sigma: numbers."""
    raise NotImplementedError

# Hold f_psi fixed at f_psi* (as SiD's generator step does) and differentiate SiD's loss, without w,
# with respect to s. For which alpha is that gradient proportional to d fisher_1d / ds for every s
# and sigma? Set ALPHA_EXACT to it (the check measures both gradients).
ALPHA_EXACT = None

#----------------------------------------------------------------------------
# 7. SiDA's adversarial term and its micro-batch coupling.

def sida_gan_loss(logits, w, chw):
    """SiDA's adversarial term of G's loss for one micro-batch: logits [B, 1, 8, 8] from f_psi's
    encoder at G's x_t, w [B] SiD's normaliser, chw = C*H*W. Return [B]: C*H*W times the
    non-saturating BCE(logit, 1) with logits clamped to [-10, 10], divided by w_b, as in the
    official sida branch. Which mean does the BCE take? (Its gradient couples the samples.)"""
    raise NotImplementedError

#----------------------------------------------------------------------------
# 8. IGN's idempotence loss.

def idem_loss(f, f_bar, z):
    """f: the generator (x -> f(x)); f_bar: its frozen copy (the same function, no parameter
    gradient). Return IGN's idempotence loss per sample [B], d(f(f(z)), f(z)) with d the mean
    squared error over D, written so that theta gets its gradient only through the INNER call:
    through the outer one f would learn to make every point a fixed point (the identity)."""
    raise NotImplementedError
