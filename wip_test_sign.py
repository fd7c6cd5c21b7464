"""Tests for the SIGN pieces (wip_sign.py): gradient paths, closed forms, sampling/projection."""
import math
import pytest
import torch
import torch.nn as nn
import sid as S

torch.set_num_threads(1)

#----------------------------------------------------------------------------
# Tiny networks with the EDMPrecond call convention net(x, sigma, class_labels, augment_labels).

class Linear(nn.Module):
    """f(x) = A x, ignoring sigma: the linear student of the closed-form tests."""
    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A.clone())
    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return x @ self.A.T

class Gaussian(nn.Module):
    """Exact denoiser of data N(mu, s^2 I): D(x; sigma) = mu + s^2/(s^2 + sigma^2) (x - mu)."""
    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s
    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)

class MLP(nn.Module):
    """A small denoiser with EDM preconditioning and dropout, standing in for G, f_phi, f_psi."""
    def __init__(self, d=2, h=16, sd=0.5):
        super().__init__()
        self.sd = sd
        self.register_buffer('count', torch.zeros(1))   # a buffer, to test refresh_frozen_
        self.net = nn.Sequential(nn.Linear(d + 1, h), nn.SiLU(), nn.Dropout(0.5), nn.Linear(h, d))
    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        v = sigma ** 2 + self.sd ** 2
        F = self.net(torch.cat([x / v.sqrt(), sigma.log() / 4], 1))
        return self.sd ** 2 / v * x + sigma * self.sd / v.sqrt() * F

#----------------------------------------------------------------------------
# L_idem: gradient only through the inner call (IGN), frozen copy gets none.

def test_idem_gradient_inner_path_only():
    torch.manual_seed(0)
    B, n = 5, 4
    A0 = (torch.eye(n) + 0.3 * torch.randn(n, n)).double()
    G = Linear(A0)
    G_bar = S.frozen_copy(G)
    Z = torch.randn(B, n, dtype=torch.float64)
    x_g = S.generate(G, Z, None, 2.5)
    S.idem_loss(lambda v: S.generate(G_bar, v, None, 2.5), x_g).mean().backward()
    assert G_bar.A.grad is None and not G_bar.A.requires_grad
    # hand gradient of L = 1/(B n) sum_b ||(Abar - I) A z_b||^2 w.r.t. the inner A only
    A, I = A0, torch.eye(n, dtype=torch.float64)
    X = Z @ A.T
    R = X @ (A - I).T                                  # (B, n) residuals f(f(z)) - f(z)
    inner = 2 / (B * n) * (A - I).T @ R.T @ Z
    outer = 2 / (B * n) * R.T @ X                      # the part IGN must not use
    assert torch.allclose(G.A.grad, inner, atol=1e-12)
    assert not torch.allclose(G.A.grad, inner + outer, atol=1e-3)

def _train_idem_rec(both_paths, steps=400):
    """Fit f(x) = A x with L_idem + L_rec to data on a 2-D subspace of R^4; returns (A, U)."""
    g = torch.Generator().manual_seed(1)
    n, k = 4, 2
    U = torch.linalg.qr(torch.randn(n, k, generator=g))[0]         # orthonormal basis of the subspace
    G = Linear(0.7 * torch.eye(n) + 0.05 * torch.randn(n, n, generator=g))
    G_bar = S.frozen_copy(G)
    opt = torch.optim.Adam(G.parameters(), lr=1e-2)
    for _ in range(steps):
        S.refresh_frozen_(G_bar, G)
        x = torch.randn(64, k, generator=g) @ U.T
        z = torch.randn(64, n, generator=g)
        f = lambda v: S.generate(G, v, None, 2.5)
        f_out = f if both_paths else (lambda v: S.generate(G_bar, v, None, 2.5))
        loss = S.rec_loss(f, x).mean() + S.idem_loss(f_out, f(z)).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return G.A.detach(), U

def test_idem_rec_linear_converges_to_projection():
    A, U = _train_idem_rec(both_paths=False)
    P_perp = torch.eye(4) - U @ U.T
    assert torch.allclose(A @ A, A, atol=1e-3)           # idempotent
    assert torch.allclose(A @ U, U, atol=1e-3)           # data are fixed points
    assert (P_perp @ A).abs().max() < 1e-3               # range = the data subspace
    # control: differentiating through the outer call too drives f towards the identity instead
    A2, _ = _train_idem_rec(both_paths=True)
    assert (P_perp @ A2 @ P_perp - P_perp).abs().max() < 1e-2

#----------------------------------------------------------------------------
# L_flow: the teacher Euler step against the Gaussian PF-ODE closed form.

def test_euler_step_matches_gaussian_pf_ode():
    torch.manual_seed(0)
    mu, s = 0.3, 0.5
    f_phi = Gaussian(mu, s)
    x = torch.randn(6, 3, dtype=torch.float64) * 2
    sigma = torch.tensor(1.5, dtype=torch.float64)
    exact = lambda sn: mu + (x - mu) * ((s ** 2 + sn ** 2) / (s ** 2 + sigma ** 2)).sqrt()
    errs = []
    for h in (0.2, 0.1, 0.05):
        sn = sigma - h
        x1 = S.euler_step(f_phi, x, sigma, sn)
        hand = x + (sn - sigma) * sigma * (x - mu) / (s ** 2 + sigma ** 2)   # dx/dsigma = sigma (x-mu)/(s^2+sigma^2)
        assert torch.allclose(x1, hand, atol=1e-12)
        errs.append((x1 - exact(sn)).abs().max().item())
    for e1, e2 in zip(errs, errs[1:]):
        assert 3.5 < e1 / e2 < 4.5                     # local error O(h^2)

def test_flow_loss_value_and_stop_gradient():
    torch.manual_seed(0)
    B, n = 5, 3
    A0 = (torch.eye(n) + 0.2 * torch.randn(n, n)).double()
    G, f_phi = Linear(A0), Gaussian(0.1, 0.5)
    G_bar = S.frozen_copy(G)
    x, noise = torch.randn(B, n, dtype=torch.float64), torch.randn(B, n, dtype=torch.float64)
    sigma, sn = torch.full((B, 1), 2.0, dtype=torch.float64), torch.full((B, 1), 1.6, dtype=torch.float64)
    L = S.flow_loss(lambda v: S.generate(G, v, None, 2.5), lambda v: S.generate(G_bar, v, None, 2.5), f_phi, x, sigma, sn, noise)
    L.mean().backward()
    xs = x + sigma * noise
    xn = xs + (sn - sigma) * sigma * (xs - 0.1) / (0.25 + sigma ** 2)
    R = xs @ A0.T - xn @ A0.T                            # f(x_sigma) - f_bar(x_sigma')
    assert torch.allclose(L, R.square().mean(1), atol=1e-12)
    assert torch.allclose(G.A.grad, 2 / (B * n) * R.T @ xs, atol=1e-12)   # target is stop-gradient
    assert G_bar.A.grad is None

def test_flow_sigmas():
    t = torch.tensor([0.02, 0.3, 0.8])
    sigma, sn = S.flow_sigmas(t, dt=0.02)
    assert torch.allclose(sigma, S.sigma_from_t(t)) and (sn < sigma).all()
    assert abs(sn[0].item() - 0.002) < 1e-6 and torch.allclose(sn[1:], S.sigma_from_t(t[1:] - 0.02))

#----------------------------------------------------------------------------
# Combined loss: which parameters receive gradients; the data-free switch; the scaling.

def test_sign_student_loss_gradients_and_terms():
    torch.manual_seed(0)
    B, d = 8, 2
    G, f_phi, f_psi = MLP(), MLP(), MLP()
    f_phi.eval().requires_grad_(False); f_psi.eval().requires_grad_(False)
    G_bar = S.frozen_copy(G)
    assert not G_bar.training and G.training
    x_g = S.generate(G, 2.5 * torch.randn(B, d), None, 2.5)
    x, noise, noise_f = torch.randn(B, d), torch.randn(B, d), torch.randn(B, d)
    sigma, (sf, sfn) = torch.rand(B, 1) + 0.1, S.flow_sigmas(torch.rand(B, 1) * 0.7 + 0.02)
    lam = dict(lam_idem=3.0, lam_rec=5.0, lam_flow=7.0)
    out = S.sign_student_loss(G, G_bar, f_phi, f_psi, x_g, None, sigma, noise, 1.0, x, sf, sfn, noise_f, **lam)
    total = (100 * out['dm'].sum() + 3 * out['idem'].sum() + 5 * out['rec'].sum() + 7 * out['flow'].sum()) / B
    total.backward()
    assert all(p.grad is None for p in G_bar.parameters())
    assert all(p.grad is None for p in list(f_phi.parameters()) + list(f_psi.parameters()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    with torch.no_grad():
        idem = (S.generate(G_bar, x_g, None, 2.5) - x_g).square().sum(1)          # D * per-pixel mean = pixel sum
    assert torch.allclose(out['idem'], idem)
    # data-free switch: x = sg(x_g); lambda = 0 skips a term
    out2 = S.sign_student_loss(G.eval(), G_bar, f_phi, f_psi, x_g.detach(), None, sigma, noise, lam_idem=0,
                               lam_flow=0)
    xd = x_g.detach()
    assert torch.allclose(out2['rec'], (S.generate(G, xd, None, 2.5) - xd).square().sum(1))
    assert (out2['idem'] == 0).all() and (out2['flow'] == 0).all()
    with pytest.raises(ValueError):
        S.sign_student_loss(G, G_bar, f_phi, f_psi, xd, None, sigma, noise)   # lam_flow > 0 without draws

def test_refresh_frozen():
    G = MLP()
    G_bar = S.frozen_copy(G)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G.count += 1
    assert not torch.equal(G_bar.net[0].weight, G.net[0].weight)
    S.refresh_frozen_(G_bar, G)
    assert all(torch.equal(a, b) for a, b in zip(G_bar.parameters(), G.parameters()))
    assert G_bar.count.item() == 1
    assert not any(p.requires_grad for p in G_bar.parameters())

#----------------------------------------------------------------------------
# Sampling, projection, diagnostics.

def test_multistep_sample():
    torch.manual_seed(0)
    A = torch.randn(3, 3)
    f = lambda v: v @ A.T
    z, e1, e2 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    xs = S.multistep_sample(f, z, [], [])
    assert len(xs) == 1 and torch.equal(xs[0], f(z))
    xs = S.multistep_sample(f, z, [0.8, 0.2], [e1, e2])
    x2 = f(f(z) + 0.8 * e1)
    assert len(xs) == 3 and torch.allclose(xs[1], x2) and torch.allclose(xs[2], f(x2 + 0.2 * e2))
    with pytest.raises(ValueError):
        S.multistep_sample(f, z, [0.8, 0.2], [e1])

def test_project():
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(4, 2))[0]
    P = U @ U.T
    f = lambda v: v @ P.T
    y, e1, e2 = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(S.project(f, y, 0.0), y @ P.T, atol=1e-6)
    assert torch.allclose(S.project(f, y, 0.5, [e1, e2], repeat=2), f(f(y + 0.5 * e1) + 0.5 * e2), atol=1e-6)
    a = S.project(f, y, 0.5, torch.Generator().manual_seed(3), repeat=3)
    b = S.project(f, y, 0.5, torch.Generator().manual_seed(3), repeat=3)
    assert torch.equal(a, b) and not torch.allclose(a, y @ P.T)
    with pytest.raises(ValueError):
        S.project(f, y, -1.0)

def test_idempotence_and_fixed_point_errors():
    torch.manual_seed(0)
    z = torch.randn(6, 3)
    U = torch.linalg.qr(torch.randn(3, 1))[0]
    proj = lambda v: v @ (U @ U.T).T
    assert S.idempotence_error(proj, z) < 1e-6
    double = lambda v: 2 * v                            # f(f(z)) - f(z) = 2z; f(x) - x = x
    assert math.isclose(S.idempotence_error(double, z), 2 * z.norm(dim=1).mean().item(), rel_tol=1e-5)
    assert math.isclose(S.fixed_point_error(double, z), z.norm(dim=1).mean().item(), rel_tol=1e-5)
    assert S.fixed_point_error(proj, z @ (U @ U.T)) < 1e-6
