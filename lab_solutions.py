"""lab_solutions: reference answers to the lab's exercises (lab_exercises.py asks the questions).

Read this file after trying: `python -m pytest -q test_lab.py` checks these answers,
`LAB_ANSWERS=lab_exercises python -m pytest -q test_lab.py` checks yours (lab.check, one
exercise: `-k gaussian_denoiser`).
"""
import torch
import torch.nn.functional as F

#----------------------------------------------------------------------------
# 1. Tweedie's formula for a Gaussian (SiD §3; EDM's denoiser D(x; sigma) = E[x_0 | x_t = x]).

def gaussian_denoiser(x, sigma, mu, s):
    """x_0 ~ N(mu, s^2 I), x = x_0 + sigma n: the posterior mean shrinks x towards mu by the
    fraction of the variance that is noise, s^2 / (s^2 + sigma^2) of (x - mu) stays."""
    return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)

#----------------------------------------------------------------------------
# 2. Tweedie in reverse: a denoiser gives the score of the noised data.

def score_from_denoiser(D, x, sigma):
    """grad log p_sigma(x) = (D(x; sigma) - x) / sigma^2."""
    return (D(x, sigma) - x) / sigma ** 2

#----------------------------------------------------------------------------
# 3. SiD's generator loss (SiD Eq. 22, in the official code's form), per sample.

def sid_generator_loss(y_phi, y_psi, x_g, alpha):
    """sum over pixels of (y_phi - y_psi) * ((y_phi - x_g) - alpha (y_phi - y_psi)) / w, with
    w = mean over pixels of |x_g - y_phi|, detached: a per-sample normaliser, not a path."""
    w = (x_g - y_phi).abs().flatten(1).mean(1).clamp_min(1e-5).detach()
    diff = y_phi - y_psi
    return (diff * ((y_phi - x_g) - alpha * diff)).flatten(1).sum(1) / w

#----------------------------------------------------------------------------
# 4. The gradient that reaches the generator's samples: through x_t too.

def sid_grad_x_g(f_phi, f_psi, x_g, sigma, noise, alpha):
    """d(sum of SiD's per-sample losses) / d x_g, with x_t = x_g + sigma * noise KEEPING its graph:
    the gradient runs through x_g directly and through x_t into both frozen networks."""
    x_g = x_g.detach().requires_grad_(True)
    x_t = x_g + sigma * noise
    loss = sid_generator_loss(f_phi(x_t, sigma), f_psi(x_t, sigma), x_g, alpha).sum()
    grad, = torch.autograd.grad(loss, x_g)
    return grad

#----------------------------------------------------------------------------
# 5. What f_psi converges to: the denoiser of the generator's own samples.

def fake_score_minimiser(points, x, sigma):
    """For G's samples {x_i} (an empirical distribution), EDM's denoising loss on them is minimised
    by the posterior mean sum_i softmax_i(-||x - x_i||^2 / (2 sigma^2)) x_i."""
    logits = -torch.cdist(x, points) ** 2 / (2 * sigma ** 2)
    return logits.softmax(1) @ points

#----------------------------------------------------------------------------
# 6. alpha: the Fisher divergence of a 1-D scale family, and the alpha that follows its gradient.

def fisher_1d(s, sigma):
    """E_{x_t}[(f_phi(x_t) - f_psi*(x_t))^2], p_data = N(0, 1), G(eps) = s eps, x_t = G + sigma n:
    both denoisers are linear, a x_t and b x_t, and E[x_t^2] = s^2 + sigma^2."""
    a = 1 / (1 + sigma ** 2)
    b = s ** 2 / (s ** 2 + sigma ** 2)
    return (a - b) ** 2 * (s ** 2 + sigma ** 2)

# With f_psi held at the exact f_psi*, SiD's gradient is (1 - alpha) grad L + (1 - 2 alpha) c, where
# c is the part of grad L that runs through f_psi*'s dependence on theta: at alpha = 1/2 it is half
# the Fisher divergence's gradient, for any generator (the lab derives it).
ALPHA_EXACT = 0.5

#----------------------------------------------------------------------------
# 7. SiDA's adversarial term: one BCE per micro-batch (SiDA §3), spread over SiD's pixel sums.

def sida_gan_loss(logits, w, chw):
    """gan_b = C*H*W * mean over the micro-batch's logits of BCE(clamp(logit, -10, 10), 1) / w_b."""
    logits = logits.clamp(-10, 10)
    bce = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    return chw * bce / w

#----------------------------------------------------------------------------
# 8. IGN's idempotence loss: the gradient through the inner call only (IGN Eq. 4).

def idem_loss(f, f_bar, z):
    """d(f_bar(f(z)), f(z)) per sample, d the mean squared error: f_bar is f's frozen copy (the same
    function, no parameter gradient), so theta moves f(z) towards f's fixed points, not f's fixed
    points towards everything."""
    x = f(z)
    return (f_bar(x) - x).square().flatten(1).mean(1)
