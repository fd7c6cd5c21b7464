"""Tests for sid: the maths on closed-form Gaussians, equivalence checks, short end-to-end runs.

    python -m pytest -q                 # the default, CPU, a few minutes
    SID_SLOW=1 python -m pytest -q      # also the slow tests
"""
import contextlib, copy, unittest.mock, dataclasses, http.server, io, json, math, os, pathlib, pickle, subprocess, sys, tarfile, threading, types, zipfile
from PIL import Image
import torch.nn as nn
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn

import edm_nets
import fid
import sid
S = sid  # short alias used by some sections

HERE = os.path.dirname(os.path.abspath(__file__))
slow = pytest.mark.skipif(not os.environ.get('SID_SLOW'), reason='set SID_SLOW=1')
torch.set_num_threads(1)
# NVIDIA's Inception detector exists only as TorchScript, which torch 2.13 marks deprecated.
pytestmark = pytest.mark.filterwarnings('ignore:.*torch.jit.*:DeprecationWarning')

def run_cli(*args, timeout=300):
    """python sid.py ARGS in a subprocess -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(HERE, 'sid.py'), *map(str, args)], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)

#----------------------------------------------------------------------------
# Identities and noise levels.

@pytest.mark.parametrize('modes,s', [(1, 0.5), (8, 0.1)])
def test_tweedie_exact_for_gaussians(modes, s):
    """The analytic denoiser equals x + sigma^2 grad log p_sigma(x) (autograd of the closed-form density)."""
    T = sid.ToyMixture(modes=modes, s=s)
    if modes == 1:
        T.mu.zero_()  # a single Gaussian N(0, s^2 I)
    x = (torch.randn(64, 2, dtype=torch.float64) * 1.5).requires_grad_(True)
    for sig in (0.01, 0.3, 2.5, 40.0):
        sigma = torch.full((64, 1), sig, dtype=torch.float64)
        grad, = torch.autograd.grad(T.log_prob(x, sigma).sum(), x)
        D = T(x.detach(), sigma)
        assert torch.allclose(D, x.detach() + sig ** 2 * grad, atol=1e-9 * max(1, sig ** 2), rtol=1e-7)
        assert torch.allclose(sid.score_from_denoiser(D, x.detach(), sigma), grad, rtol=1e-6, atol=1e-9)
    if modes == 1:  # and the textbook form for one Gaussian: D = s^2 x / (s^2 + sigma^2)
        assert torch.allclose(T(x.detach(), torch.full((64, 1), 0.7, dtype=torch.float64)), s ** 2 * x.detach() / (s ** 2 + 0.49))

def test_sigma_schedule_values():
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    got = sid.sigma_from_t(t)
    assert got[0].item() == pytest.approx(0.002, rel=1e-9) and got[-1].item() == pytest.approx(80.0, rel=1e-9)
    assert got[1:4].tolist() == pytest.approx([0.085, 2.515, 24.41], abs=2e-3)
    x = torch.zeros(200000, 3, 4, 4)
    s = sid.draw_sigma_generator(x, 800, torch.Generator().manual_seed(0))
    assert s.shape == (200000, 1, 1, 1) and s.min() >= 0.002 and s.max() <= 24.42
    assert s.median().item() == pytest.approx(sid.sigma_from_t(torch.tensor(0.4)).item(), rel=0.02)
    s = sid.draw_sigma_fake(x, gen=torch.Generator().manual_seed(0)).log()
    assert s.mean().item() == pytest.approx(-1.2, abs=0.01) and s.std().item() == pytest.approx(1.2, abs=0.01)
    assert sid.edm_weight(torch.tensor(2.0)).item() == pytest.approx((4 + 0.25) / (2 * 0.5) ** 2)

#----------------------------------------------------------------------------
# The SiD generator loss: algebraic forms, what is detached, the 1-D Gaussian closed form.

class Affine(nn.Module):
    """D(x) = a*x + b*sigma (per pixel), a stand-in network with the EDMPrecond call signature."""
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a, dtype=torch.float64)), nn.Parameter(torch.tensor(b, dtype=torch.float64))
        self.sigma_data = 0.5
    def forward(self, x, sigma, labels=None, augment_labels=None):
        return self.a * x + self.b * sigma

def _draws(B=6, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, *shape, generator=g, dtype=torch.float64), torch.rand(B, 1, 1, 1, generator=g, dtype=torch.float64) * 3 + 0.1,
            torch.randn(B, *shape, generator=g, dtype=torch.float64))

@pytest.mark.parametrize('alpha', [0.5, 1.0, 1.2])
def test_sid_loss_equals_both_paper_forms(alpha):
    x_g, sigma, noise = _draws()
    f_phi, f_psi = Affine(0.8, 0.1).double(), Affine(0.6, -0.2).double()
    got = sid.sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, None, alpha)
    x_t = x_g + sigma * noise
    y_phi, y_psi = 0.8 * x_t + 0.1 * sigma, 0.6 * x_t - 0.2 * sigma
    w = (x_g - y_phi).abs().flatten(1).mean(1)
    code = ((y_phi - y_psi) * ((y_phi - x_g) - alpha * (y_phi - y_psi))).flatten(1).sum(1) / w
    paper = ((y_phi - y_psi) * (y_psi - x_g) + (1 - alpha) * (y_phi - y_psi) ** 2).flatten(1).sum(1) / w
    assert torch.allclose(got, code, rtol=1e-6) and torch.allclose(got, paper, rtol=1e-6)  # w is float32, as official

def test_sid_loss_gradient_flows_through_both_networks():
    """Only w is detached: d loss / d x_g equals the hand-derived gradient, and differs if f_phi or f_psi is detached."""
    x_g, sigma, noise = _draws(seed=1)
    a, c, alpha = 0.8, 0.6, 1.2
    f_phi, f_psi = Affine(a, 0.1).double().requires_grad_(False), Affine(c, -0.2).double().requires_grad_(False)

    def grad_of(phi, psi):
        x = x_g.clone().requires_grad_(True)
        sid.sid_generator_loss(phi, psi, x, sigma, noise, None, alpha).sum().backward()
        return x.grad
    g = grad_of(f_phi, f_psi)
    x_t = x_g + sigma * noise
    u = (a - c) * x_t + 0.3 * sigma                                # f_phi - f_psi
    v = (a * x_t + 0.1 * sigma - x_g) - alpha * u                  # (f_phi - x_g) - alpha (f_phi - f_psi)
    w = (x_g - a * x_t - 0.1 * sigma).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(g, ((a - c) * v + u * (a - 1 - alpha * (a - c))) / w, rtol=1e-6)
    detached = lambda net: (lambda x, s, l=None, aug=None: net(x, s).detach())
    assert not torch.allclose(grad_of(detached(f_phi), f_psi), g, rtol=1e-3)
    assert not torch.allclose(grad_of(f_phi, detached(f_psi)), g, rtol=1e-3)

def test_sid_1d_gaussian_closed_form():
    """SiD §3's 1-D example: p_data = N(0,1), x_g = theta + eps0, analytic teacher x_t/(1+sigma^2), f_psi at its
    optimum (x_t + psi sigma^2)/(1+sigma^2) with psi = theta. Without w the per-sample gradient w.r.t. theta is
    (sigma^2/(1+sigma^2))^2 theta for every alpha; with w it still points to theta = 0 and vanishes there."""
    B = 4000
    g = torch.Generator().manual_seed(0)
    eps0, noise = torch.randn(B, 1, generator=g, dtype=torch.float64), torch.randn(B, 1, generator=g, dtype=torch.float64)
    sigma = sid.draw_sigma_generator(eps0, 800, g).double()
    k = sigma ** 2 / (1 + sigma ** 2)
    for theta0 in (1.5, -0.7, 0.0):
        psi = theta0
        f_phi = lambda x, s, l=None, a=None: x / (1 + s ** 2)
        f_psi = lambda x, s, l=None, a=None: (x + psi * s ** 2) / (1 + s ** 2)
        for alpha in (0.5, 1.0, 1.2):
            theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
            x_g = theta + eps0
            per = sid.sid_generator_loss(f_phi, f_psi, x_g, sigma, noise, None, alpha)
            w = (x_g - f_phi(x_g + sigma * noise, sigma)).abs().detach().squeeze(1).clamp_min(1e-5)
            grads = torch.stack([torch.autograd.grad(p, theta, retain_graph=True)[0] for p in (per * w)[:50]])
            # (w is float32 as in the official code, so per * w undoes it only to ~1e-7)
            assert torch.allclose(grads, (k[:50, 0] ** 2) * theta0, rtol=1e-6, atol=1e-12)  # per sample, without w
            gbar, = torch.autograd.grad((per * w).mean(), theta, retain_graph=True)
            assert gbar.item() == pytest.approx((k ** 2).mean().item() * theta0, rel=1e-6, abs=1e-12)
            gw, = torch.autograd.grad(per.mean(), theta)                                # with w
            assert gw.item() * theta0 > 0 if theta0 else abs(gw.item()) < 1e-12
    # and the Monte-Carlo E[k^2] agrees with its integral over the t-schedule (t ~ U(0, 0.8))
    t = torch.linspace(0, 0.8, 200001, dtype=torch.float64)
    s2 = sid.sigma_from_t(t) ** 2
    assert (k ** 2).mean().item() == pytest.approx((s2 / (1 + s2)).pow(2).mean().item(), abs=0.02)

def test_sid_loss_drops_nan_samples():
    x_g, sigma, noise = _draws()
    x_g[2, 0, 0, 0] = float('nan')
    out = sid.sid_generator_loss(Affine(0.8, 0.1).double(), Affine(0.6, -0.2).double(), x_g, sigma, noise, None, 1.2)
    keep = [0, 1, 3, 4, 5]
    ref = sid.sid_generator_loss(Affine(0.8, 0.1).double(), Affine(0.6, -0.2).double(), x_g[keep], sigma[keep], noise[keep], None, 1.2)
    assert out.shape == (5,) and torch.allclose(out, ref)

#----------------------------------------------------------------------------
# The fake-score loss: minimised by the generator distribution's true denoiser.

def test_fake_score_loss_minimised_by_true_denoiser():
    """x_g ~ N(theta, 1) per pixel: the true denoiser is (x + theta sigma^2)/(1 + sigma^2) and the loss at it is
    lambda(sigma) * D * sigma^2/(1 + sigma^2) (the posterior variance); any perturbation raises it."""
    theta, D, B = 0.7, 4, 100000
    g = torch.Generator().manual_seed(0)
    x_g = theta + torch.randn(B, D, generator=g, dtype=torch.float64)
    noise = torch.randn(B, D, generator=g, dtype=torch.float64)
    sigma = torch.full((B, 1), 0.8, dtype=torch.float64)
    best = lambda x, s, l=None, a=None: (x + theta * s ** 2) / (1 + s ** 2)
    L = sid.fake_score_loss(best, x_g, sigma, noise, None)
    lam = sid.edm_weight(torch.tensor(0.8, dtype=torch.float64)).item()
    assert L.mean().item() == pytest.approx(lam * D * 0.64 / 1.64, rel=0.01)
    for da, db in ((0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)):
        worse = lambda x, s, l=None, a=None: (1 / (1 + s ** 2) + da) * x + (theta * s ** 2 / (1 + s ** 2) + db)
        assert sid.fake_score_loss(worse, x_g, sigma, noise, None).mean() > L.mean()
    x = x_g.clone().requires_grad_(True)  # x_g is detached inside: no gradient can reach the generator
    assert not sid.fake_score_loss(best, x, sigma, noise, None).requires_grad

#----------------------------------------------------------------------------
# The toy: the exact teacher, the demo run, configuration errors.

def test_toy_run_improves_quality(tmp_path):
    cfg = sid.make_config({'duration_mimg': 0.05, 'tick_kimg': 10, 'snap_kimg': 50, 'outdir': str(tmp_path)})
    G, G_ema, _ = sid.train(cfg)
    T = sid.ToyMixture()
    z = 2.5 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    G0 = sid.toy_pretrain(sid.ToyDenoiser(), T)                  # the common starting point of G and f_psi
    with torch.no_grad():
        q_end = sid.toy_quality(sid.generate(G_ema, z, None, 2.5), T)
        q_start = sid.toy_quality(sid.generate(G0, z, None, 2.5), T)
    assert q_start[1] <= 2 and q_end[1] >= 7                     # modes covered
    assert q_end[0] < 0.1 * q_start[0]                          # energy distance
    assert q_end[2] > q_start[2] + 0.3                          # mass near the modes
    assert (tmp_path / 'toy.png').stat().st_size > 1000 and (tmp_path / 'toy.gif').stat().st_size > 1000
    lines = [json.loads(l) for l in open(tmp_path / 'stats.jsonl')]
    assert len(lines) == 5 and lines[-1]['kimg'] == pytest.approx(50.176)  # 196 iterations of 256

@pytest.mark.parametrize('args,msg', [
    (['--dataset', 'mnist'], "unknown --dataset 'mnist'"),
    (['--batch', '0'], '--batch must be positive'),
    (['--alpha', '3'], '--alpha must lie in'),
    (['--sigma-init', '0'], '--sigma-init must lie in'),
    (['--method', 'dmd'], "unknown --method 'dmd'"),
    (['--batch', '100', '--batch-gpu', '64'], 'must be a multiple of --batch-gpu'),
])
def test_bad_config_is_one_line_exit_2(args, msg, tmp_path):
    r = run_cli(*args, '--outdir', tmp_path)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr


#============================================================================
# edm_nets: networks, presets, safe loader, downloads, sampler, augmentation (issue: EDM networks).

# Tests for edm_nets.py: network structure vs the official EDM configs, SiDA logits, precision paths, the
# safe checkpoint loader (fixtures written at test time in EDM's persistence format), download, the EDM
# sampler (against a closed-form Gaussian denoiser) and the augmentation pipe. Offline and CPU-only.





#----------------------------------------------------------------------------
# Helpers: tiny versions of the official configs (same channel_mult; ADM also at half resolution). The real
# sizes and the 8x8 logit maps are checked on the 'meta' device, which computes shapes only.

NCSNPP = dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1])
TINY = {name: dict(model_channels=16, num_blocks=1) for name in edm_nets.PRESETS}
TINY['imagenet-64x64-cond-adm'] = dict(model_channels=64, num_blocks=1, img_resolution=32)  # >= 64 ch: 1 attention head


def tiny_net(name, seed=0, randomize=True, **overrides):
    torch.manual_seed(seed)
    net = edm_nets.build_preset(name, **{**TINY[name], **overrides}).eval()
    if randomize:  # EDM zero-inits output layers; random weights make every parameter matter
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
    return net


def net_inputs(net, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    R = net.img_resolution
    x = torch.randn([batch, net.img_channels, R, R], generator=g)
    sigma = torch.exp(torch.randn([batch, 1, 1, 1], generator=g))
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [batch], generator=g)] if net.label_dim else None
    aug = torch.randn([batch, 9], generator=g) if net.model.map_augment is not None else None
    return x, sigma, labels, aug

#----------------------------------------------------------------------------
# Structure: parameter and state-dict key counts of the official configs (edm-fid.md §2.2).

EXPECTED_SIZES = [
    ('cifar10-32x32-cond-vp', {}, 55_735_299, 427),
    ('cifar10-32x32-uncond-vp', {}, 55_733_891, 425),
    ('ffhq-64x64-uncond-vp', {}, 61_805_571, 553),
    ('afhqv2-64x64-uncond-vp', {}, 61_805_571, 553),
    ('imagenet-64x64-cond-adm', {}, 295_899_267, 553),
    ('cifar10-32x32-cond-vp', NCSNPP, 56_400_643, 434),
    ('cifar10-32x32-uncond-vp', NCSNPP, 56_397_827, 432),
    ('ffhq-64x64-uncond-vp', NCSNPP, 62_761_091, 563),
]


@pytest.mark.parametrize('name,overrides,n_params,n_keys', EXPECTED_SIZES)
def test_official_config_sizes(monkeypatch, name, overrides, n_params, n_keys):
    monkeypatch.setattr(edm_nets, 'weight_init', lambda shape, **kw: torch.empty(*shape))  # values are irrelevant here
    with torch.device('meta'):  # no memory and no arithmetic: counts and shapes only
        net = edm_nets.build_preset(name, **overrides)
        if not overrides:  # full-size forward: SiDA logits are 8x8 for every official teacher
            R, B = net.img_resolution, 2
            x, sigma, aug = torch.empty(B, 3, R, R), torch.empty(B, 1, 1, 1), torch.empty(B, 9)
            labels = torch.empty(B, net.label_dim) if net.label_dim else None
            D, logits = net(x, sigma, labels, aug, return_logits=True)
            assert D.shape == x.shape and D.dtype == torch.float32 and logits.shape == (B, 1, 8, 8)
            assert net(x, sigma, labels, aug, encoder_only=True).shape == (B, 1, 8, 8)
    assert sum(p.numel() for p in net.parameters()) == n_params
    sd = net.state_dict()
    assert len(sd) == n_keys
    if name == 'cifar10-32x32-cond-vp' and not overrides:
        shapes = {'model.map_label.weight': (128, 10), 'model.map_augment.weight': (128, 9),
                  'model.map_layer0.weight': (512, 128), 'model.enc.32x32_conv.weight': (128, 3, 3, 3),
                  'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
                  'model.enc.16x16_down.conv0.resample_filter': (1, 1, 2, 2),
                  'model.dec.32x32_aux_conv.weight': (3, 256, 3, 3)}
        assert {k: tuple(sd[k].shape) for k in shapes} == shapes
        assert not any('freqs' in k for k in sd)
    if overrides:  # NCSN++: Fourier frequencies and 4x4-filtered residual branch
        assert sd['model.map_noise.freqs'].shape == (128,)
        assert sd[f'model.enc.{net.img_resolution // 2}x{net.img_resolution // 2}_aux_residual.resample_filter'].shape == (1, 1, 4, 4)
    if name.startswith('imagenet'):
        assert sd['model.map_label.weight'].shape == (768, 1000) and 'model.map_label.bias' not in sd
        assert not any(k.startswith('model.map_noise') for k in sd)
        assert [k for k in sd if k.startswith('model.enc.32x32_down.skip')] == ['model.enc.32x32_down.skip.resample_filter']
        heads = {k: m.num_heads for k, m in net.model.enc.items() if getattr(m, 'num_heads', 0)}
        assert heads['32x32_block0'] == 6 and heads['16x16_block0'] == 9 and heads['8x8_block0'] == 12


def test_build_preset_rejects_unknown_name():
    with pytest.raises(ValueError, match='unknown preset'):
        edm_nets.build_preset('cifar10-32x32-uncond-ve')

#----------------------------------------------------------------------------
# EDM preconditioning coefficients (Karras et al. 2022, Table 1) at the SiD generator's sigma_init = 2.5.

class RecordingModel(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, noise_labels, class_labels, augment_labels=None, return_logits=False, encoder_only=False):
        self.x_in, self.noise_labels = x, noise_labels
        return torch.full_like(x, self.value)


@pytest.mark.parametrize('sigma,c_skip,c_out,c_in,c_noise', [(2.5, 0.038462, 0.490290, 0.392232, 0.229073),
                                                             (0.5, 0.5, 0.5 / math.sqrt(2), 1 / (0.5 * math.sqrt(2)), math.log(0.5) / 4),
                                                             (80.0, None, None, None, 1.09551)])
def test_precond_coefficients(sigma, c_skip, c_out, c_in, c_noise):
    net = tiny_net('cifar10-32x32-uncond-vp', randomize=False)
    x = torch.randn(3, 3, 32, 32)
    net.model = RecordingModel(0.0)
    D0 = net(x, torch.tensor(sigma))  # scalar sigma broadcasts
    assert D0.dtype == torch.float32 and D0.shape == x.shape
    if c_skip is not None:
        torch.testing.assert_close(D0, c_skip * x, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(net.model.x_in, c_in * x, atol=1e-6, rtol=1e-5)
        net.model.value = 1.0
        torch.testing.assert_close(net(x, sigma) - D0, torch.full_like(x, c_out), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(net.model.noise_labels, torch.tensor([c_noise]), atol=1e-5, rtol=1e-5)

#----------------------------------------------------------------------------
# SiDA logits: one forward gives (D_x, logits [B,1,8,8]); encoder_only gives the same logits; the logits
# depend on the encoder (and mapping) only.

@pytest.mark.parametrize('name,overrides', [(n, {}) for n in edm_nets.PRESETS] + [('cifar10-32x32-cond-vp', NCSNPP),
                         ('cifar10-32x32-uncond-vp', dict(encoder_type='skip', decoder_type='skip'))])
def test_logits_and_encoder_only(name, overrides):
    net = tiny_net(name, **overrides)
    x, sigma, labels, aug = net_inputs(net)
    D, logits = net(x, sigma, labels, aug, return_logits=True)
    assert D.shape == x.shape and D.dtype == torch.float32
    r = net.img_resolution >> (len(net.init_kwargs['channel_mult']) - 1)  # lowest encoder resolution
    assert logits.shape == (2, 1, r, r) and logits.dtype == torch.float32
    torch.testing.assert_close(D, net(x, sigma, labels, aug), rtol=0, atol=0)
    torch.testing.assert_close(logits, net(x, sigma, labels, aug, encoder_only=True), rtol=0, atol=0)
    # The logits are the channel mean of the last encoder feature map (captured by a forward hook).
    feats = []
    last = list(net.model.enc.values())[-1]
    handle = last.register_forward_hook(lambda m, i, o: feats.append(o))
    net(x, sigma, labels, aug, encoder_only=True)
    handle.remove()
    torch.testing.assert_close(logits, feats[0].mean(dim=1, keepdim=True))
    # Gradients of the logits reach the encoder and mapping layers only.
    net.requires_grad_(True)
    net(x, sigma, labels, aug, encoder_only=True).square().sum().backward()
    for k, p in net.named_parameters():
        if k.startswith('model.dec.') or k.startswith('model.out_'):
            assert p.grad is None, k
        elif k.startswith('model.enc.'):
            assert p.grad is not None and torch.isfinite(p.grad).all(), k


def test_class_labels_none_means_zeros_and_sigma_shapes():
    net = tiny_net('cifar10-32x32-cond-vp')
    x, sigma, labels, aug = net_inputs(net)
    torch.testing.assert_close(net(x, sigma[:1]), net(x, sigma[:1].expand(2, 1, 1, 1), torch.zeros(2, 10)))
    torch.testing.assert_close(net(x, float(sigma[0])), net(x, sigma[:1].reshape(1)))
    # The label and augmentation inputs are actually used.
    assert not torch.allclose(net(x, sigma, labels), net(x, sigma))
    assert not torch.allclose(net(x, sigma, labels, aug), net(x, sigma, labels))


def test_attention_uses_interleaved_qkv_layout():
    torch.manual_seed(0)
    block = edm_nets.UNetBlock(64, 64, emb_channels=8, attention=True, num_heads=2).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x, emb = torch.randn(2, 64, 4, 4), torch.randn(2, 8)
    seen = {}
    block.norm2.register_forward_hook(lambda m, i, o: seen.update(h=i[0], n=o))
    y = block(x, emb)
    h, qkv = seen['h'], block.qkv(seen['n']).flatten(2)  # (B, 3C, HW)
    # Channel (head*C_head + c)*3 + j holds q/k/v (j = 0/1/2): take every third channel, then split heads.
    q, k, v = (qkv[:, j::3].reshape(2, 2, 32, 16) for j in range(3))  # (B, heads, C_head, HW)
    w = torch.softmax(torch.einsum('bhcq,bhck->bhqk', q, k) / math.sqrt(32), dim=-1)
    a = torch.einsum('bhqk,bhck->bhcq', w, v).reshape(2, 64, 4, 4)
    torch.testing.assert_close(y, (block.proj(a) + h) * math.sqrt(1.0), atol=1e-5, rtol=1e-5)

#----------------------------------------------------------------------------
# Precision: bf16 autocast keeps float32 outputs close to fp32; the fp16 body (per-layer casting) works.

@pytest.mark.parametrize('name', ['cifar10-32x32-cond-vp', 'imagenet-64x64-cond-adm'])
def test_bf16_autocast_close_to_fp32(name):
    net = tiny_net(name, randomize=False)
    with torch.no_grad():  # moderate random weights so the network output matters
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, sigma, labels, aug = net_inputs(net)
    sigma = sigma * 0 + 1.0
    with torch.no_grad():
        ref, ref_logits = net(x, sigma, labels, aug, return_logits=True)
        with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
            out, logits = net(x, sigma, labels, aug, return_logits=True)
    assert out.dtype == torch.float32 and logits.dtype == torch.float32
    assert ((out - ref).norm() / (ref - 0.2 * x).norm()) < 0.05
    assert ((logits - ref_logits).norm() / ref_logits.norm()) < 0.05


def test_fp16_body_matches_fp32():
    # fp16 convolutions are slow on CPU, so a 16x16 two-level ADM (with attention) stands in here.
    torch.manual_seed(0)
    net = edm_nets.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, use_fp16=True, model_type='DhariwalUNet',
                              model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, sigma, labels, _ = net_inputs(net)
    c_noise = sigma.log().flatten() / 4
    with torch.no_grad():
        ref = net.model(x, c_noise, labels)
        try:
            out = net.model(x.half(), c_noise, labels)
        except RuntimeError as e:  # pragma: no cover - depends on the CPU kernels of the torch build
            pytest.skip(f'fp16 not supported on this CPU build: {e}')
    assert out.dtype == torch.float16 and all(p.dtype == torch.float32 for p in net.parameters())
    assert ((out.float() - ref).norm() / ref.norm()) < 0.01
    # On CPU, EDMPrecond runs use_fp16 nets in fp32 exactly like EDM (fp16 only on CUDA).
    assert net.use_fp16
    torch.testing.assert_close(net(x, sigma, labels), net(x, sigma, labels, force_fp32=True), rtol=0, atol=0)

#----------------------------------------------------------------------------
# Checkpoint fixtures in EDM's persistence format (edm-fid.md §8.3), written without the EDM code: a fake
# torch_utils.persistence module exists only while pickling; our modules reduce to
# (_reconstruct_persistent_obj, (meta,)) with meta = dict(type='class', version=6, module_src, class_name, state).

@contextlib.contextmanager
def fake_edm_modules():
    persistence = types.ModuleType('torch_utils.persistence')
    def _reconstruct_persistent_obj(meta):
        raise AssertionError('only used as a pickle reference')
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils = types.ModuleType('torch_utils')
    torch_utils.persistence = persistence
    util = types.ModuleType('dnnlib.util')
    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = 'dnnlib.util', 'EasyDict'
    util.EasyDict = EasyDict
    dnnlib = types.ModuleType('dnnlib')
    dnnlib.util = util
    fakes = {'torch_utils': torch_utils, 'torch_utils.persistence': persistence, 'dnnlib': dnnlib, 'dnnlib.util': util}
    saved = {k: sys.modules.get(k) for k in fakes}
    sys.modules.update(fakes)
    try:
        yield _reconstruct_persistent_obj, EasyDict
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class FakeEDMLoss:  # stands in for EDM's EDMLoss record
    P_mean, P_std, sigma_data = -1.2, 1.2, 0.5


class PersistencePickler(pickle.Pickler):
    def __init__(self, f, reconstruct, module_src, protocol):
        super().__init__(f, protocol=protocol)
        self.reconstruct, self.module_src = reconstruct, module_src

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and type(obj).__module__ == 'edm_nets':
            state = dict(obj.__dict__)
            state['_init_args'], state['_init_kwargs'] = (), state.pop('init_kwargs', {})
            if 'skip_scale' in state:  # EDM stores np.float64 here, exercising the numpy globals
                state['skip_scale'] = np.float64(state['skip_scale'])
        elif isinstance(obj, FakeEDMLoss):
            state = dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, extra=np.arange(3.0), _init_args=(), _init_kwargs={})
        else:
            return NotImplemented
        meta = dict(type='class', version=6, module_src=self.module_src, class_name=type(obj).__name__.replace('Fake', ''), state=state)
        return self.reconstruct, (meta,)


def write_edm_pickle(path, ema, module_src='# networks.py source would be here\n', protocol=4, extra=None):
    with fake_edm_modules() as (reconstruct, EasyDict):
        data = dict(ema=ema, loss_fn=FakeEDMLoss(), augment_pipe=None, dataset_kwargs=EasyDict(path='x.zip', xflip=False))
        data.update(extra or {})
        buf = io.BytesIO()
        PersistencePickler(buf, reconstruct, module_src, protocol).dump(data)
    assert 'torch_utils' not in sys.modules
    with open(path, 'wb') as f:
        f.write(buf.getvalue())
    return buf.getvalue()


def assert_same_net(a, b, name):
    assert a.init_kwargs == b.init_kwargs
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x, sigma, labels, aug = net_inputs(a)
    torch.testing.assert_close(a(x, sigma, labels, aug), b(x, sigma, labels, aug), rtol=0, atol=0)


@pytest.mark.parametrize('name,overrides', [('cifar10-32x32-cond-vp', {}), ('ffhq-64x64-uncond-vp', NCSNPP),
                                            ('imagenet-64x64-cond-adm', {})])
def test_loader_roundtrip_edm_pickle(tmp_path, name, overrides):
    net = tiny_net(name, **overrides)
    write_edm_pickle(tmp_path / 'net.pkl', net)
    loaded, info = edm_nets.load_checkpoint(str(tmp_path / 'net.pkl'))
    assert isinstance(loaded, edm_nets.EDMPrecond) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert info['class_name'] == 'EDMPrecond' and info['config'] == {}
    assert_same_net(net, loaded, name)


@pytest.mark.parametrize('spelling', ['numpy.core.multiarray', 'numpy._core.multiarray'])
def test_loader_numpy_spellings(tmp_path, spelling):
    net = tiny_net('cifar10-32x32-uncond-vp')
    raw = write_edm_pickle(tmp_path / 'a.pkl', net, protocol=3)  # protocol 3 spells globals as text lines
    found = [m for m in (b'numpy._core.multiarray', b'numpy.core.multiarray') if b'c' + m + b'\nscalar\n' in raw]
    assert found, 'fixture must contain numpy scalars'
    raw = raw.replace(b'c' + found[0] + b'\n', b'c' + spelling.encode() + b'\n')
    assert raw.count(b'c' + spelling.encode() + b'\n') >= 2  # scalar and _reconstruct
    (tmp_path / 'b.pkl').write_bytes(raw)
    assert_same_net(net, edm_nets.load_checkpoint(str(tmp_path / 'b.pkl'))[0], 'cifar')


def test_loader_never_runs_module_src(tmp_path):
    marker = tmp_path / 'marker'
    src = f'open({str(marker)!r}, "w").write("ran")\nraise SystemExit("module_src was executed")\n'
    net = tiny_net('cifar10-32x32-uncond-vp')
    write_edm_pickle(tmp_path / 'net.pkl', net, module_src=src)
    loaded, info = edm_nets.load_checkpoint(str(tmp_path / 'net.pkl'))
    assert not marker.exists()
    assert len(info['module_src_sha1']) == 40


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize('make,global_name', [
    (lambda m: Evil(os.system, f'touch {m}'), f'{os.system.__module__}.system'),
    (lambda m: Evil(eval, f'open({str(m)!r}, "w")'), 'builtins.eval'),
    (lambda m: Evil(exec, f'open({str(m)!r}, "w")'), 'builtins.exec'),
    (lambda m: Evil(getattr, 'text', 'upper'), 'builtins.getattr'),
    (lambda m: Evil(__import__, 'os'), 'builtins.__import__'),
    (lambda m: Evil(subprocess.Popen, ['touch', str(m)]), 'subprocess.Popen'),
    (lambda m: Evil(torch.save, {}, str(m)), 'torch.serialization.save'),
])
def test_loader_refuses_unsafe_globals(tmp_path, make, global_name):
    marker = tmp_path / 'marker'
    net = tiny_net('cifar10-32x32-uncond-vp')
    write_edm_pickle(tmp_path / 'evil.pkl', net, extra=dict(evil=make(marker)))
    with pytest.raises(ValueError, match=f'refusing to load global {global_name}'):
        edm_nets.load_checkpoint(str(tmp_path / 'evil.pkl'))[0]
    assert not marker.exists()
    # The same payload inside the network record is refused too.
    write_edm_pickle(tmp_path / 'evil2.pkl', net, extra=dict(ema=dict(state=dict(_modules=dict(x=make(marker))))))
    with pytest.raises(ValueError, match='refusing to load global'):
        edm_nets.load_checkpoint(str(tmp_path / 'evil2.pkl'))[0]
    assert not marker.exists()


def test_loader_strict_and_clear_errors(tmp_path):
    net = tiny_net('cifar10-32x32-cond-vp')
    # A weight missing from the checkpoint -> strict loading fails with the key named.
    del net.model.map_layer1._parameters['bias']
    write_edm_pickle(tmp_path / 'a.pkl', net)
    with pytest.raises(ValueError, match='missing keys.*map_layer1.bias'):
        edm_nets.load_checkpoint(str(tmp_path / 'a.pkl'))[0]
    # init_kwargs that do not match the weights.
    net = tiny_net('cifar10-32x32-cond-vp')
    net.init_kwargs['label_dim'] = 0
    write_edm_pickle(tmp_path / 'b.pkl', net)
    with pytest.raises(ValueError, match='unexpected keys.*map_label'):
        edm_nets.load_checkpoint(str(tmp_path / 'b.pkl'))[0]
    # No 'ema'.
    with fake_edm_modules():
        (tmp_path / 'c.pkl').write_bytes(pickle.dumps(dict(loss_fn=None)))
    with pytest.raises(ValueError, match='no "ema"'):
        edm_nets.load_checkpoint(str(tmp_path / 'c.pkl'))[0]
    with pytest.raises(FileNotFoundError):
        edm_nets.load_checkpoint(str(tmp_path / 'missing.pkl'))[0]


def test_loader_own_torch_checkpoints(tmp_path):
    net = tiny_net('cifar10-32x32-cond-vp')
    for key in ('G_ema', 'ema'):
        torch.save({key: net.state_dict(), 'net_kwargs': net.init_kwargs, 'kimg': 3}, tmp_path / f'{key}.pt')
        assert_same_net(net, edm_nets.load_checkpoint(str(tmp_path / f'{key}.pt'))[0], 'cifar')
    torch.save({'G': net.state_dict(), 'net_kwargs': net.init_kwargs}, tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match='"ema" or "G_ema"'):
        edm_nets.load_checkpoint(str(tmp_path / 'bad.pt'))[0]
    torch.save({'ema': net}, tmp_path / 'module.pt')  # a whole module is refused by weights_only loading
    with pytest.raises(ValueError, match='refusing to load global'):  # the pre-scan refuses the module class
        edm_nets.load_checkpoint(str(tmp_path / 'module.pt'))[0]

@slow
def test_official_cifar_teacher_loads_and_samples():
    # Needs the real checkpoint (downloaded once into $SID_CACHE, ~225 MB) and ~1-2 CPU minutes.
    name = 'cifar10-32x32-uncond-vp'
    net = edm_nets.load_checkpoint(name)[0]
    with torch.device('meta'):
        assert net.init_kwargs == edm_nets.build_preset(name).init_kwargs  # PRESETS match the pickled kwargs
    x = edm_nets.edm_sampler(net, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(x).all() and -1.5 < x.min() and x.max() < 1.5 and 0.2 < x.std() < 0.8

#----------------------------------------------------------------------------
# download(): local paths, file:// and a loopback HTTP server (full and truncated responses).

@contextlib.contextmanager
def http_server(files):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                self.send_error(404)
                return
            body, claimed = files[self.path]
            self.send_response(200)
            self.send_header('Content-Length', str(claimed))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()


def test_download_local_and_file_url(tmp_path):
    src = tmp_path / 'teacher.pkl'
    src.write_bytes(b'abc' * 1000)
    assert edm_nets.download(str(src)) == str(src)
    with pytest.raises(FileNotFoundError):
        edm_nets.download(str(tmp_path / 'nope.pkl'))
    cache = tmp_path / 'cache'
    path = edm_nets.download(src.as_uri(), cache_dir=str(cache))
    assert path.startswith(str(cache / '')) and path.endswith('-teacher.pkl') and open(path, 'rb').read() == b'abc' * 1000
    src.unlink()  # cached now: no second fetch
    assert edm_nets.download(src.as_uri(), cache_dir=str(cache)) == path


def test_download_http_full_truncated_and_offline(tmp_path, monkeypatch):
    body = os.urandom(3 << 20)
    monkeypatch.setenv('SID_CACHE', str(tmp_path / 'cache'))
    with http_server({'/edm-x.pkl': (body, len(body)), '/short.pkl': (b'0123456789', 1000)}) as base:
        path = edm_nets.download(base + '/edm-x.pkl')
        assert path.endswith('-edm-x.pkl') and open(path, 'rb').read() == body
        with pytest.raises(RuntimeError, match=r'could not download .*/short\.pkl.*truncated.*cache/[0-9a-f]{16}-short\.pkl$'):
            edm_nets.download(base + '/short.pkl')
        with pytest.raises(RuntimeError, match='404'):
            edm_nets.download(base + '/missing.pkl')
        port = base.rsplit(':', 1)[1]
    assert os.listdir(tmp_path / 'cache') == [os.path.basename(path)]  # no partial or temporary files left
    with pytest.raises(RuntimeError, match=rf'could not download http://127.0.0.1:{port}/gone.pkl.*fetch it by hand to'):
        edm_nets.download(f'http://127.0.0.1:{port}/gone.pkl')  # server is down: connection refused

#----------------------------------------------------------------------------
# EDM sampler vs a closed form: for data N(mu, s^2 I) the ideal denoiser is D(x; sigma) =
# (s^2 x + sigma^2 mu)/(s^2 + sigma^2) and the probability-flow ODE maps x_T to
# mu + (x_T - mu) sqrt(s^2 + t^2)/sqrt(s^2 + T^2).

class GaussianDenoiser:
    sigma_min, sigma_max = 0, float('inf')

    def __init__(self, mu, s):
        self.mu, self.s, self.sigmas = mu, s, []

    def __call__(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma))
        return (self.s ** 2 * x + sigma ** 2 * self.mu) / (self.s ** 2 + sigma ** 2)


def test_edm_sampler_heun_matches_ode_solution():
    mu, s = 0.7, 0.3
    den = GaussianDenoiser(mu, s)
    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x = edm_nets.edm_sampler(den, z)
    assert x.dtype == torch.float64 and len(den.sigmas) == 35
    steps = [80, 57.586, 40.786, 28.375, 19.352, 12.910, 8.4009, 5.3152, 3.2568, 1.9233, 1.0882, 0.58535,
             0.29644, 0.13952, 0.059947, 0.022935, 0.0075280, 0.002]
    np.testing.assert_allclose(sorted(set(den.sigmas), reverse=True), steps, rtol=1e-4)
    exact = mu + (80 * z.double() - mu) * s / math.sqrt(s ** 2 + 80 ** 2)
    err18 = (x - exact).abs().max()
    assert abs(x.mean() - mu * (1 - s / 80)) < 3 * s / math.sqrt(20000)
    assert abs(x.std() / s - 1) < 0.08  # 18 steps: about 6 % too wide for this narrow Gaussian
    # Second-order convergence towards the exact ODE solution (the error falls ~ 1/N^2).
    err50 = (edm_nets.edm_sampler(den, z, num_steps=50) - exact).abs().max()
    err200 = (edm_nets.edm_sampler(den, z, num_steps=200) - exact).abs().max()
    assert err18 < 0.1 and err50 < err18 / 6 and err200 < err50 / 12, (err18, err50, err200)


def test_edm_sampler_stochastic_churn_keeps_the_distribution():
    mu, s = -0.4, 0.5
    den = GaussianDenoiser(mu, s)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 1, 1, 1, generator=g)
    x = edm_nets.edm_sampler(den, z, num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003,
                             randn_like=lambda t: torch.randn(t.shape, dtype=t.dtype, generator=g))  # EDM's ImageNet setting
    assert len(den.sigmas) == 511
    assert abs(x.mean() - mu) < 0.02 and abs(x.std() / s - 1) < 0.02

#----------------------------------------------------------------------------
# AugmentPipe: EDM's label layout, exact flips, and labels that describe the geometric warp applied.

SID_AUG = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def blob_images(n, size=32, offset=(0.0, 0.0), width=2.0):
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing='ij')
    img = torch.exp(-((xx - c - offset[0]) ** 2 + (yy - c - offset[1]) ** 2) / (2 * width ** 2))
    return img.expand(n, 3, size, size).clone()


def local_centroid(images, around, radius=7.0):  # (N, 2) centre of mass near `around`, centred pixel coordinates
    size = images.shape[-1]
    grid = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(grid, grid, indexing='ij')
    # The window ignores mirrored copies of the blob that large rotations pull in from the reflect padding.
    near = ((xx - around[:, 0, None, None]) ** 2 + (yy - around[:, 1, None, None]) ** 2) < radius ** 2
    w = images[:, 0] * near
    return torch.stack([(w * xx).sum((1, 2)), (w * yy).sum((1, 2))], dim=1) / w.sum((1, 2))[:, None]


def test_augment_p0_is_identity_and_label_layout():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y, labels = edm_nets.AugmentPipe(p=0, **SID_AUG)(x)
    assert torch.equal(y, x) and labels.shape == (8, 9) and labels.dtype == torch.float32 and not labels.any()
    y, labels = edm_nets.AugmentPipe(p=0.12, **SID_AUG)(torch.randn(4000, 1, 2, 2))
    assert labels.shape == (4000, 9)
    assert abs(labels[:, 0].mean() - 0.5) < 0.04  # xflip=1e8: a fair coin for every image, whatever p
    assert abs((labels[:, 2] != 0).float().mean() - 0.12) < 0.02  # the others fire with probability p
    assert set(labels[:, 1].unique().tolist()) <= {0.0, 1.0}


def test_augment_flips_are_exact():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    y, labels = edm_nets.AugmentPipe(p=1, xflip=1, yflip=1)(x)
    assert labels.shape == (64, 2)
    for i in range(64):
        expected = x[i].flip(2) if labels[i, 0] else x[i]
        expected = expected.flip(1) if labels[i, 1] else expected
        assert torch.equal(y[i], expected)
    assert 0 < labels[:, 0].sum() < 64 and 0 < labels[:, 1].sum() < 64


def test_warp_integer_translation_is_a_reflect_shift():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    G_inv = edm_nets._translate(torch.tensor([-3.0, 2.0]), torch.tensor([1.0, -4.0]))  # content moves by (+3,-1), (-2,+4)
    y = edm_nets.warp_images(x, G_inv)
    pad = torch.nn.functional.pad(x, [8, 8, 8, 8], mode='reflect')
    torch.testing.assert_close(y[0], pad[0, :, 8 + 1:8 + 1 + 16, 8 - 3:8 - 3 + 16], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1], pad[1, :, 8 - 4:8 - 4 + 16, 8 + 2:8 + 2 + 16], atol=1e-5, rtol=0)
    torch.testing.assert_close(edm_nets.warp_images(x, torch.eye(3).expand(2, 3, 3)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize('kind', ['translate_frac', 'rotate_frac', 'scale', 'aniso'])
def test_augment_labels_describe_the_warp(kind):
    torch.manual_seed(0)
    offset = (0.0, 0.0) if kind == 'translate_frac' else (6.0, -3.0)
    x = blob_images(64, offset=offset)
    y, labels = edm_nets.AugmentPipe(p=1, **{kind: 1})(x)
    q = torch.tensor(offset)
    # EDM's sym6 resampling assumes the filter delay is 5.5 taps but it is 5.098, so rotations and scalings
    # pivot ~0.2 px right of/below the centre (translations are exact); the warp reproduces this.
    h = torch.tensor(edm_nets._SYM6, dtype=torch.float64)
    pivot = float((5.5 - (torch.arange(12) * h).sum() / h.sum()) / 2)
    if kind == 'translate_frac':  # label w = shift / (0.125 * size)
        expected, keep = q + labels * 32 * 0.125, torch.ones(64, dtype=torch.bool)
    else:
        if kind == 'rotate_frac':  # labels (cos w - 1, sin w); content rotates by -w (x right, y down)
            c, s = labels[:, 0] + 1, labels[:, 1]
            fwd = torch.stack([c, s, -s, c], dim=1).reshape(-1, 2, 2)
        elif kind == 'scale':  # label w: content scaled by 2^(0.2 w)
            fwd = torch.eye(2) * (0.2 * labels[:, 0]).exp2()[:, None, None]
        else:  # labels (w cos r, w sin r); with r = 0 (label 1 == 0) content is scaled by (2^(0.2 w), 2^(-0.2 w))
            sx = (0.2 * labels[:, 0]).exp2()
            fwd = torch.diag_embed(torch.stack([sx, 1 / sx], dim=1))
        keep = labels[:, 1] == 0 if kind == 'aniso' else torch.ones(64, dtype=torch.bool)
        expected = (fwd @ (q - pivot)[:, None])[:, :, 0] + pivot
    keep &= (expected.abs() < 8).all(dim=1)  # stay clear of the border
    assert keep.sum() > 15
    err = (local_centroid(y, expected) - expected)[keep].abs().max()
    assert err < 0.02, err


def test_augment_full_sid_config():
    x = torch.randn(256, 3, 8, 8)
    torch.manual_seed(0)
    y, labels = edm_nets.AugmentPipe(p=1, **SID_AUG)(x)
    assert y.shape == x.shape and labels.shape == (256, 9) and torch.isfinite(y).all()
    assert (labels[:, 2:] != 0).all(dim=0)[[0, 1, 2, 5, 6]].all()  # scale, rotation, translation always drawn at p=1
    assert 0.35 < (labels[:, 6] == 0).float().mean() < 0.65  # aniso acts in a rotated frame half of the time
    torch.manual_seed(0)
    y2, labels2 = edm_nets.AugmentPipe(p=1, **SID_AUG)(x)
    assert torch.equal(y, y2) and torch.equal(labels, labels2)  # reproducible from the torch seed


#============================================================================
# fid: Frechet distance, streaming statistics, detector stand-in, command line.

# Tests for fid.py (offline: a small TorchScript stand-in replaces the Inception detector).



#----------------------------------------------------------------------------
# Helpers: random covariances and a detector stand-in with the NVIDIA call signature.

def random_cov(rng, d, rank=None, scale=1.0):
    a = rng.standard_normal((d, rank or d)) * scale
    return a @ a.T / (rank or d)

def sqrtm_reference(mu1, s1, mu2, s2):
    linalg = pytest.importorskip('scipy.linalg')
    root = linalg.sqrtm(s1 @ s2).real  # EDM's formula
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))

class FidStandIn(torch.nn.Module):
    """forward(img uint8, return_features) like NVIDIA's .pt: float cast, fixed resize, (x-128)/128, features."""
    def __init__(self, dim=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, dim, generator=g), requires_grad=False)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = (img.to(torch.float32) - 128) / 128
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (N, 48)
        features = torch.tanh(x @ self.proj)  # (N, dim)
        return features if return_features else features.sum(1, keepdim=True)

@pytest.fixture
def detector_path(tmp_path):
    path = str(tmp_path / 'standin.pt')
    torch.jit.save(torch.jit.script(FidStandIn()), path)
    return path

def write_fid_pngs(folder, n, size=8, seed=0, mode='RGB'):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (size, size, 3) if mode == 'RGB' else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(f'{folder}/{i:05d}.png')

def run_fid_cli(*args):
    env = dict(os.environ, PYTHONPATH=HERE)
    return subprocess.run([sys.executable, os.path.join(HERE, 'fid.py'), *args], capture_output=True,
                          text=True, env=env, timeout=120)

#----------------------------------------------------------------------------
# Frechet distance: closed forms, invariants, and scipy.linalg.sqrtm (EDM's way).

def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(64), random_cov(rng, 64)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    s_low = random_cov(rng, 64, rank=20)  # rank-deficient, as with fewer images than features
    assert abs(fid.frechet_distance(mu, s_low, mu, s_low)) < 1e-6 * np.trace(s_low)

def test_frechet_closed_form_commuting():
    rng = np.random.default_rng(1)
    d = 128
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenbasis -> commuting covariances
    a, b = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    closed_form = lambda a, b: np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(closed_form(a, b), rel=1e-10)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed_form(a, b), rel=1e-12)
    a[:10] = 0  # singular directions: eigenvalues ~1e-16 have square roots ~1e-8, so only ~1e-7 absolute
    got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(closed_form(a, b), abs=1e-5)

def test_frechet_symmetric_and_scaling():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.standard_normal(32), rng.standard_normal(32), random_cov(rng, 32), random_cov(rng, 32)
    fd = fid.frechet_distance(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-10)
    assert fid.frechet_distance(3 * mu1, 9 * s1, 3 * mu2, 9 * s2) == pytest.approx(9 * fd, rel=1e-10)
    assert fid.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)

@pytest.mark.parametrize('d,rank', [(64, None), (256, None), (128, 40), (200, 199)])
def test_frechet_matches_scipy_sqrtm(d, rank):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    s1, s2 = random_cov(rng, d, rank), random_cov(rng, d, rank, scale=1.3)
    expected = sqrtm_reference(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)

def test_frechet_dimension_mismatch():
    with pytest.raises(ValueError, match='do not match'):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(5), np.eye(5))
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(4), np.eye(3), np.zeros(4), np.eye(4))

#----------------------------------------------------------------------------
# Streaming statistics.

def test_feature_stats_match_numpy_any_split():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((101, 12)) * rng.uniform(0.1, 5, 12) + rng.standard_normal(12) * 3
    for sizes in ([101], [1, 50, 50], [7] * 14 + [3]):
        perm = rng.permutation(len(f))
        stats, start = fid.FeatureStats(), 0
        for size in sizes:
            stats.update(torch.from_numpy(f[perm[start:start + size]]))
            start += size
        mu, sigma = stats.mean_cov()
        assert stats.n == 101 and mu.dtype == np.float64 and sigma.dtype == np.float64
        np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(f, rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)

def test_feature_stats_all_reduce():
    rng = np.random.default_rng(4)
    f = torch.from_numpy(rng.standard_normal((30, 5)))
    one, a, b = fid.FeatureStats(), fid.FeatureStats(), fid.FeatureStats()
    one.update(f); a.update(f[:11]); b.update(f[11:])
    # Fake 2-rank all_reduce: each tensor is summed with the other rank's copy.
    other = {0: torch.tensor(float(b.n), dtype=torch.float64), 1: b.sum, 2: b.sum_outer}
    calls = []
    def all_reduce(t):
        t += other[len(calls)]
        calls.append(t)
    a.all_reduce(all_reduce)
    assert a.n == 30 and len(calls) == 3
    np.testing.assert_allclose(a.mean_cov()[1], one.mean_cov()[1], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        s = fid.FeatureStats(); s.update(f[:1]); s.mean_cov()

#----------------------------------------------------------------------------
# Images, detector and reference files.

def test_to_uint8_edm_rule():
    x = torch.tensor([-1.0, 0.0, 1.0, -2.0, 5.0, 100.9 / 127.5 - 128 / 127.5, 0.999 / 127.5])
    assert fid.to_uint8(x).tolist() == [0, 128, 255, 0, 255, 100, 128]  # truncation, not rounding
    assert fid.to_uint8(x).dtype == torch.uint8

def test_detector_load_and_features(detector_path, monkeypatch):
    det = fid.load_detector('cpu', detector_path)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    features = fid.extract_features(det, images, 'cpu')
    assert features.shape == (5, 16) and features.dtype == torch.float64
    assert torch.equal(features, FidStandIn()(images, True).double())
    gray = images[:, :1]  # 1 channel is repeated to 3
    assert torch.equal(fid.extract_features(det, gray, 'cpu'),
                       fid.extract_features(det, gray.repeat(1, 3, 1, 1), 'cpu'))
    with pytest.raises(ValueError):
        fid.extract_features(det, images.float(), 'cpu')
    monkeypatch.setenv('SID_DETECTOR', detector_path)  # the environment variable is honoured
    assert torch.equal(fid.extract_features(fid.load_detector('cpu'), images, 'cpu'), features)
    with pytest.raises(FileNotFoundError):
        fid.load_detector('cpu', detector_path + '.missing')

def test_compute_stats_and_generator_fid(detector_path):
    det = fid.load_detector('cpu', detector_path)
    def make_batch(seeds):  # deterministic per seed, float in [-1, 1]
        return torch.stack([torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) * 2 - 1
                            for s in seeds])
    images = fid.to_uint8(make_batch(range(40)))
    mu, sigma = fid.compute_stats_from_images([images[:13], images[13:]], det, 'cpu')
    assert fid.fid_of_generator(make_batch, 40, mu, sigma, det, 'cpu', batch=7) == pytest.approx(0, abs=1e-9)
    # Two simulated ranks: each rank's sums, added, give the one-process statistics.
    ranks = [fid.FeatureStats().update(fid.extract_features(det, images[r::2], 'cpu')) for r in range(2)]
    for r in range(2):
        other = ranks[1 - r]
        tensors = iter([torch.tensor(float(other.n), dtype=torch.float64), other.sum, other.sum_outer])
        def all_reduce(t):
            t += next(tensors)
        with unittest.mock.patch.object(torch.distributed, 'is_initialized', lambda: True), \
             unittest.mock.patch.object(torch.distributed, 'all_reduce', all_reduce):
            value = fid.fid_of_generator(make_batch, 40, mu, sigma, det, 'cpu', batch=6, rank=r, world_size=2)
        assert value == pytest.approx(0, abs=1e-9)

def test_ref_npz_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(6), random_cov(rng, 6)
    path = str(tmp_path / 'ref.npz')
    fid.save_ref(path, mu, sigma)
    assert sorted(os.listdir(tmp_path)) == ['ref.npz']  # no temporary file left behind
    with np.load(path) as data:  # EDM's keys and dtype
        assert set(data.files) == {'mu', 'sigma'} and data['sigma'].dtype == np.float64
    mu2, sigma2 = fid.load_ref(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    (tmp_path / 'bad.npz').write_bytes(b'not a zip')
    with pytest.raises(ValueError):
        fid.load_ref(str(tmp_path / 'bad.npz'))
    np.savez(str(tmp_path / 'keys.npz'), mean=mu)
    with pytest.raises(ValueError):
        fid.load_ref(str(tmp_path / 'keys.npz'))
    assert set(fid.REF_PRESETS) == {'cifar10-32x32', 'imagenet-64x64', 'ffhq-64x64', 'afhqv2-64x64'}

def test_image_folder_reader(tmp_path):
    write_fid_pngs(str(tmp_path / 'a' / 'sub'), 3)
    write_fid_pngs(str(tmp_path / 'a'), 2, mode='L', seed=1)  # grayscale -> RGB by repetition
    files = fid.list_images(str(tmp_path / 'a'))
    assert len(files) == 5 and files == sorted(files)
    batches = list(fid.iterate_image_files(files, 2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    gray = np.asarray(Image.open(files[0]))
    assert np.array_equal(batches[0][0].numpy(), np.stack([gray] * 3))
    subset = fid.list_images(str(tmp_path / 'a'), num=3, seed=0)
    assert len(subset) == 3 and set(subset) <= set(files) and subset == sorted(subset)
    write_fid_pngs(str(tmp_path / 'b'), 12)
    subsets = [fid.list_images(str(tmp_path / 'b'), num=4, seed=seed) for seed in (0, 1)]
    assert subsets[0] != subsets[1] and fid.list_images(str(tmp_path / 'b'), num=4, seed=0) == subsets[0]
    all_b = fid.list_images(str(tmp_path / 'b'))
    assert subsets[0] == [all_b[i] for i in (4, 6, 10, 11)]  # EDM's rule: RandomState(0).shuffle, sort first 4

#----------------------------------------------------------------------------
# Command line and plot.

def test_cli_ref_then_calc(tmp_path, detector_path, capsys):
    folder, ref = str(tmp_path / 'imgs'), str(tmp_path / 'ref.npz')
    write_fid_pngs(folder, 24)
    fid.main(['ref', '--data', folder, '--dest', ref, '--detector', detector_path, '--batch', '5'])
    assert fid.load_ref(ref)[0].shape == (16,)
    out = run_fid_cli('calc', '--images', folder, '--ref', ref, '--num', '24', '--detector', detector_path)
    assert out.returncode == 0, out.stderr
    assert abs(float(out.stdout.split()[-1])) < 1e-6  # same images as the reference
    write_fid_pngs(str(tmp_path / 'other'), 24, seed=1)  # in-process: a subprocess costs ~2 s
    fid.main(['calc', '--images', str(tmp_path / 'other'), '--ref', ref, '--num', '24',
              '--detector', detector_path])
    assert float(capsys.readouterr().out.split()[-1]) > 1e-3

def test_cli_bad_inputs(tmp_path, detector_path, capsys):
    fid.save_ref(str(tmp_path / 'ref8.npz'), np.zeros(8), np.eye(8))  # the detector gives 16 features
    out = run_fid_cli('calc', '--images', str(tmp_path / 'missing'), '--ref', str(tmp_path / 'ref8.npz'))
    assert out.returncode == 2 and out.stderr.startswith('error: ') and len(out.stderr.splitlines()) == 1
    write_fid_pngs(str(tmp_path / 'mixed'), 3)
    write_fid_pngs(str(tmp_path / 'mixed' / 'big'), 1, size=16)
    os.makedirs(tmp_path / 'empty')
    (tmp_path / 'bad.npz').write_bytes(b'garbage')
    write_fid_pngs(str(tmp_path / 'ok'), 4)
    det, dest = ['--detector', detector_path], str(tmp_path / 'x.npz')
    cases = [['ref', '--data', str(tmp_path / 'missing'), '--dest', dest, *det],
             ['ref', '--data', str(tmp_path / 'mixed'), '--dest', dest, *det],
             ['ref', '--data', str(tmp_path / 'empty'), '--dest', dest, *det],
             ['ref', '--data', str(tmp_path / 'ok'), '--dest', dest, '--detector', str(tmp_path / 'bad.npz')],
             ['calc', '--images', str(tmp_path / 'ok'), '--ref', str(tmp_path / 'bad.npz'), '--num', '4', *det],
             ['calc', '--images', str(tmp_path / 'ok'), '--ref', str(tmp_path / 'ref8.npz'), '--num', '4', *det],
             ['calc', '--images', str(tmp_path / 'ok'), '--ref', str(tmp_path / 'ref8.npz'), '--num', '9', *det]]
    for args in cases:
        with pytest.raises(SystemExit) as exit_info:
            fid.main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, err)
        assert err.startswith('error: ') and len(err.splitlines()) == 1, (args, err)
    assert not os.path.exists(dest)

def test_plot_curve(tmp_path):
    path = str(tmp_path / 'fid.png')
    fid.plot_curve([(0, 80.5), (0.5, 20.1), (1.0, 9.3), (2.0, 4.2)], path)
    with Image.open(path) as img:
        img.load()
        assert img.format == 'PNG' and img.size == (560, 360)
        assert len(img.getcolors(1 << 16)) > 3  # more than a blank canvas
    fid.plot_curve([(1, 3.0)], path)  # one point, flat range
    assert os.listdir(tmp_path) == ['fid.png']
    assert fid._nice_ticks(0, 2) == pytest.approx([0, 0.5, 1, 1.5, 2])


#============================================================================
# Real-data loaders and the SiDA losses.

#----------------------------------------------------------------------------
# Data fixtures: a fake cifar-10-python.tar.gz in the official layout, EDM zips and folders.

def _cifar_tar(path, per_batch=3, payload=None):
    """Five data_batch_i pickles (bytes keys, protocol 2) plus the other official members; returns data, labels."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5 * per_batch, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, 5 * per_batch)]
    with tarfile.open(path, 'w:gz') as tar:
        def add(name, obj):
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo('cifar-10-batches-py/' + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        add('batches.meta', {b'label_names': [b'airplane'] * 10, b'num_vis': 3072})
        for i in range(5):
            s = slice(i * per_batch, (i + 1) * per_batch)
            d = {b'batch_label': b'training batch', b'labels': labels[s], b'data': data[s], b'filenames': [b'a.png'] * per_batch}
            if payload is not None and i == 2:
                d[b'evil'] = payload
            add(f'data_batch_{i + 1}', d)
        add('test_batch', {b'labels': [0], b'data': data[:1]})
    return data.reshape(-1, 3, 32, 32), labels

def _png(arr):
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()

def _edm_files(n=5, size=8, rgb=True):
    """{name: png bytes} in a subfolder as EDM's dataset_tool writes them, plus the arrays (C,H,W) and int labels."""
    rng = np.random.default_rng(1)
    arrs = [rng.integers(0, 256, (size, size, 3) if rgb else (size, size), dtype=np.uint8) for _ in range(n)]
    files = {f'00000/img{i:08d}.png': _png(a) for i, a in enumerate(arrs)}
    chw = np.stack([a.transpose(2, 0, 1) if rgb else a[None] for a in arrs])
    return files, chw, [i % 3 for i in range(n)]

def _write_zip(path, files, meta=None):
    with zipfile.ZipFile(path, 'w') as zf:
        for name in reversed(list(files)):  # stored out of order: the loader must sort
            zf.writestr(name, files[name])
        if meta is not None:
            zf.writestr('dataset.json', json.dumps(meta))

def _write_folder(root, files, meta=None):
    for name, blob in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    if meta is not None:
        (root / 'dataset.json').write_text(json.dumps(meta))

#----------------------------------------------------------------------------
# Loaders.

def test_cifar_archive(tmp_path):
    data, labels = _cifar_tar(tmp_path / 'c.tar.gz')
    images, onehot = edm_nets.load_dataset(tmp_path / 'c.tar.gz')
    assert images.dtype == torch.uint8 and images.shape == (15, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(data))  # batches 1..5 in order, test_batch ignored
    assert onehot.dtype == torch.float32 and onehot.shape == (15, 10)
    assert onehot.argmax(1).tolist() == labels and torch.equal(onehot.sum(1), torch.ones(15))

def test_cifar_word_downloads_lazily(tmp_path, monkeypatch):
    _cifar_tar(tmp_path / 'c.tar.gz')
    urls = []
    monkeypatch.setattr(edm_nets, 'download', lambda url: urls.append(url) or str(tmp_path / 'c.tar.gz'))
    assert edm_nets.load_dataset('cifar10')[0].shape == (15, 3, 32, 32)
    assert urls == ['https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz']

class _Evil:
    def __init__(self, cmd): self.cmd = cmd
    def __reduce__(self): return (os.system, (self.cmd,))

def test_cifar_refuses_foreign_globals(tmp_path):
    flag = tmp_path / 'pwned'
    _cifar_tar(tmp_path / 'c.tar.gz', payload=_Evil(f'touch {flag}'))
    with pytest.raises(ValueError, match='refusing to load global .*system'):
        edm_nets.load_dataset(tmp_path / 'c.tar.gz')
    assert not flag.exists()

def test_cifar_truncated(tmp_path):
    _cifar_tar(tmp_path / 'c.tar.gz', per_batch=50)
    blob = (tmp_path / 'c.tar.gz').read_bytes()
    (tmp_path / 't.tar.gz').write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match='not a readable CIFAR-10'):
        edm_nets.load_dataset(tmp_path / 't.tar.gz')

@pytest.mark.parametrize('kind', ['zip', 'folder'])
def test_edm_dataset(tmp_path, kind):
    files, chw, ys = _edm_files()
    meta = {'labels': [[n, y] for n, y in zip(files, ys)]}
    path = tmp_path / ('d.zip' if kind == 'zip' else 'd')
    (_write_zip if kind == 'zip' else _write_folder)(path, files, meta)
    images, onehot = edm_nets.load_dataset(path)
    assert torch.equal(images, torch.from_numpy(chw))  # sorted by name
    assert onehot.shape == (5, 3) and onehot.argmax(1).tolist() == ys

def test_folder_grayscale_without_labels(tmp_path):
    files, chw, _ = _edm_files(n=3, rgb=False)
    _write_folder(tmp_path, files)
    images, labels = edm_nets.load_dataset(tmp_path)
    assert images.shape == (3, 1, 8, 8) and torch.equal(images, torch.from_numpy(chw))
    assert labels.shape == (3, 0) and labels.dtype == torch.float32

def test_dataset_errors(tmp_path):
    files, _, ys = _edm_files(n=3)
    _write_zip(tmp_path / 'missing.zip', files, {'labels': [[n, 0] for n in files] + [['00000/gone.png', 1]]})
    with pytest.raises(ValueError, match='not in the dataset, e.g. 00000/gone.png'):
        edm_nets.load_dataset(tmp_path / 'missing.zip')
    _write_zip(tmp_path / 'unlabelled.zip', files, {'labels': [[n, 0] for n in list(files)[:2]]})
    with pytest.raises(ValueError, match='no label for 1 image.*img00000002'):
        edm_nets.load_dataset(tmp_path / 'unlabelled.zip')
    blob = (tmp_path / 'missing.zip').read_bytes()
    (tmp_path / 'trunc.zip').write_bytes(blob[:len(blob) - 40])
    with pytest.raises(ValueError, match='unreadable dataset'):
        edm_nets.load_dataset(tmp_path / 'trunc.zip')
    files['00000/img00000009.png'] = _png(np.zeros((16, 16, 3), np.uint8))
    _write_folder(tmp_path / 'mixed', files)
    with pytest.raises(ValueError, match='img00000009.png is \\(3, 16, 16\\)'):
        edm_nets.load_dataset(tmp_path / 'mixed')
    with pytest.raises(FileNotFoundError):
        edm_nets.load_dataset(tmp_path / 'nope.zip')

#----------------------------------------------------------------------------
# Batching and the teacher check.

def test_sharding_and_value_range():
    n = 11
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.eye(n)
    shards = []
    for rank in range(2):
        it = S.infinite_batches(images, labels, batch=3, seed=7, rank=rank, world_size=2)
        x, y = zip(*[next(it) for _ in range(4)])  # 12 >= one epoch's shard (6 or 5) for each rank
        x, y = torch.cat(x), torch.cat(y)
        assert x.dtype == torch.float32 and x.shape == (12, 1, 2, 2)
        idx = y.argmax(1)
        assert torch.equal(x, images[idx].float() / 127.5 - 1)  # labels travel with their images
        shards.append(idx[:6 - rank].tolist())  # the first epoch's shard
    assert len(set(shards[0])) == 6 and len(set(shards[1])) == 5
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(n))
    x, _ = next(S.infinite_batches(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1), torch.zeros(2, 0), 2, 0))
    assert sorted(x.flatten().tolist()) == [-1.0, 1.0]

def test_epochs_reshuffle_and_are_deterministic():
    images, labels = torch.zeros(8, 1, 1, 1, dtype=torch.uint8), torch.eye(8)
    take = lambda seed: [next(it)[1].argmax(1).tolist() for it in [S.infinite_batches(images, labels, 8, seed)] for _ in range(3)]
    a = take(3)
    assert a == take(3) and a != take(4)
    assert all(sorted(e) == list(range(8)) for e in a) and a[0] != a[1]

def test_check_dataset_matches():
    net = types.SimpleNamespace(img_resolution=32, img_channels=3, label_dim=10)
    images, labels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 10)
    assert S.check_dataset_matches(images, labels, net) is labels
    with pytest.raises(ValueError, match='resolution 64x64 .* resolution 32'):
        S.check_dataset_matches(torch.zeros(2, 3, 64, 64), labels, net)
    with pytest.raises(ValueError, match='1 channels .* 3'):
        S.check_dataset_matches(torch.zeros(2, 1, 32, 32), labels, net)
    with pytest.raises(ValueError, match='label_dim 0 .* label_dim 10'):
        S.check_dataset_matches(images, labels[:, :0], net)
    net.label_dim = 0  # unconditional teacher: labelled data is fine, the labels are dropped
    assert S.check_dataset_matches(images, labels, net).shape == (2, 0)

#----------------------------------------------------------------------------
# SiDA losses with stand-in networks: D_x = a*x (+ b*x^2 for the fake score), logits = x[:, :1] + offset,
# where `offset` is a leaf tensor so autograd gives d loss / d logits directly. Every call is recorded.

class StandIn(torch.nn.Module):
    sigma_data = 0.5
    def __init__(self, a, b=0.0, off=None, off_enc=None):
        super().__init__()
        self.a, self.b, self.off, self.off_enc, self.calls = a, b, off, off_enc, []
    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_logits=False, encoder_only=False):
        self.calls.append(dict(x=x.detach().clone(), sigma=sigma, labels=class_labels, aug=augment_labels,
                               return_logits=return_logits, encoder_only=encoder_only))
        if encoder_only:
            return x[:, :1] + self.off_enc
        D_x = self.a * x + self.b * x ** 2
        return (D_x, x[:, :1] + self.off) if return_logits else D_x

def _inputs(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_g = torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.randn(B, 1, 1, 1, generator=g, dtype=torch.float64) * 1.2 - 1.2)
    noise = torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64)
    off = 3 * torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    return x_g, sigma, noise, off

softplus = lambda v: math.log1p(math.exp(v)) if v < 30 else v  # BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l)
sigmoid = lambda v: 1 / (1 + math.exp(-v))

def test_sida_fake_score_loss():
    x_g, sigma, noise, off = _inputs()
    x_r = torch.randn_like(x_g) + 0.3
    off_f, off_r = off.clone().requires_grad_(), (-off).clone().requires_grad_()
    net = StandIn(0.7, 0.1, off_f, off_r)
    x_g_leaf = x_g.clone().requires_grad_()
    labels, aug_g, aug_r = torch.eye(4), torch.zeros(4, 9), torch.ones(4, 9)
    dsm, d_loss = S.sida_fake_score_loss(net, x_g_leaf, x_r, sigma, noise, labels, aug_g, aug_r)
    # the two calls: fake with return_logits + aug_g, real encoder-only + aug_r; same sigma and noise
    fake, real = net.calls
    assert fake['return_logits'] and not fake['encoder_only'] and fake['aug'] is aug_g and fake['labels'] is labels
    assert real['encoder_only'] and real['aug'] is aug_r and real['labels'] is labels
    assert fake['sigma'] is sigma and real['sigma'] is sigma
    assert torch.allclose(fake['x'], x_g + sigma * noise) and torch.allclose(real['x'], x_r + sigma * noise)
    # independent element-wise reference
    B, lam = 4, [(s * s + 0.25) / (s * 0.5) ** 2 for s in sigma.flatten().tolist()]
    lf, lr = (x_g + sigma * noise)[:, :1] + off, (x_r + sigma * noise)[:, :1] - off
    bce_f = sum(softplus(v) for v in lf.flatten().tolist()) / lf.numel()
    bce_r = sum(softplus(-v) for v in lr.flatten().tolist()) / lr.numel()
    x_t = x_g + sigma * noise
    D = 0.7 * x_t + 0.1 * x_t ** 2
    for b in range(B):
        assert math.isclose(dsm[b].item(), lam[b] * ((D[b] - x_g[b]) ** 2).sum().item(), rel_tol=1e-12)
        assert math.isclose(d_loss[b].item(), lam[b] * (bce_r + bce_f) / 2, rel_tol=1e-12)
    # micro-batch coupling: each logit's gradient carries the micro-batch SUM of lambda; x_g detached
    (dsm.sum() + d_loss.sum()).backward()
    assert x_g_leaf.grad is None
    n = B * 64
    for i in [(0, 0, 0, 0), (3, 0, 7, 2)]:
        assert math.isclose(off_f.grad[i].item(), sum(lam) / 2 * sigmoid(lf[i].item()) / n, rel_tol=1e-10)
        assert math.isclose(off_r.grad[i].item(), -sum(lam) / 2 * (1 - sigmoid(lr[i].item())) / n, rel_tol=1e-10)

def test_sida_fake_score_drops_nan_samples_from_dsm():
    x_g, sigma, noise, off = _inputs()
    x_g[1, 0, 0, 0] = float('nan')
    dsm, d_loss = S.sida_fake_score_loss(StandIn(0.7, 0.0, off, off), x_g, x_g, sigma, noise, None)
    assert dsm.shape == (3,) and torch.isfinite(dsm).all() and d_loss.shape == (4,)

def test_sida_generator_loss_values_and_coupling():
    x_g, sigma, noise, off = _inputs()
    off[0, 0, 1, 1], off[2, 0, 3, 4] = 40.0, -40.0  # beyond the +-10 clamp whatever x_t adds
    off = off.requires_grad_()
    f_phi, f_psi = StandIn(0.8), StandIn(0.6, 0.05, off)
    for alpha in (1.0, 1.2):
        f_psi.calls.clear()
        sid, gan = S.sida_generator_loss(f_phi, f_psi, x_g, sigma, noise, None, alpha)
        assert len(f_psi.calls) == 1 and f_psi.calls[0]['return_logits'] and f_psi.calls[0]['aug'] is None
        x_t = x_g + sigma * noise
        y_phi, y_psi = 0.8 * x_t, 0.6 * x_t + 0.05 * x_t ** 2
        logits = (x_t[:, :1] + off).detach()
        w = [max((x_g[b] - y_phi[b]).abs().float().mean().item(), 1e-5) for b in range(4)]  # teacher-based, float32
        bce = sum(softplus(-min(max(v, -10), 10)) for v in logits.flatten().tolist()) / logits.numel()
        for b in range(4):  # the paper's form of the SiD loss
            ref = ((y_phi[b] - y_psi[b]) * (y_psi[b] - x_g[b]) + (1 - alpha) * (y_phi[b] - y_psi[b]) ** 2).sum().item() / w[b]
            assert math.isclose(sid[b].item(), ref, rel_tol=1e-10)
            assert math.isclose(gan[b].item(), 192 * bce / w[b], rel_tol=1e-6)  # w is float32
    # d gan.sum() / d logit = 192 * sum_b(1/w_b) * (sigmoid(l) - 1) / (B*64), zero where clamped
    gan.sum().backward()
    for i in [(0, 0, 0, 0), (1, 0, 5, 6), (3, 0, 7, 7)]:
        expect = 192 * sum(1 / v for v in w) * (sigmoid(logits[i].item()) - 1) / (4 * 64)
        assert math.isclose(off.grad[i].item(), expect, rel_tol=1e-6)
    assert off.grad[0, 0, 1, 1] == 0 and off.grad[2, 0, 3, 4] == 0

def test_sida_generator_sid_gradient_flows_through_both_networks():
    # linear stand-ins f_phi = a*x_t, f_psi = c*x_t: closed-form d sid.sum() / d x_g, element-wise
    x_g, sigma, noise, off = _inputs()
    a, c, alpha = 0.8, 0.5, 1.2
    x = x_g.clone().requires_grad_()
    sid, _ = S.sida_generator_loss(StandIn(a), StandIn(c, 0.0, off), x, sigma, noise, None, alpha)
    sid.sum().backward()
    x_t = x_g + sigma * noise
    w = (x_g - a * x_t).abs().float().mean((1, 2, 3), keepdim=True).double()
    u, v = (a - c) * x_t, (a * x_t - x_g) - alpha * (a - c) * x_t
    expect = ((a - c) * v + u * ((a - 1) - alpha * (a - c))) / w
    assert torch.allclose(x.grad, expect, rtol=1e-10, atol=1e-12)

def test_sida_generator_drops_nan_samples():
    x_g, sigma, noise, off = _inputs()
    x_g[2, 1, 3, 3] = float('nan')
    sid, gan = S.sida_generator_loss(StandIn(0.8), StandIn(0.6, 0.0, off), x_g, sigma, noise, None, 1.0)
    assert sid.shape == gan.shape == (3,) and torch.isfinite(sid).all() and torch.isfinite(gan).all()

def test_sida_phase_boundaries():
    assert [S.sida_phase(n) for n in (0, 100_000, 100_001, 200_000, 200_001)] == ['frozen', 'frozen', 'sid', 'sid', 'mix']

def test_sanitize_grads_clips_elementwise():
    p, q = torch.zeros(4, requires_grad=True), torch.zeros(1, requires_grad=True)
    p.grad = torch.tensor([3.0, -0.5, float('nan'), -float('inf')])
    S.sanitize_grads_([p, q], 1.0)
    assert p.grad.tolist() == [1.0, -0.5, 0.0, -1.0] and q.grad is None  # a norm clip would rescale -0.5
    p.grad = torch.tensor([float('inf'), 2.0, float('nan'), 0.25])
    S.sanitize_grads_([p])
    assert p.grad.tolist() == [1e5, 2.0, 0.0, 0.25]


#============================================================================
# SIGN pieces: gradient paths, closed forms, sampling and projection.

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
    assert G_bar.training and G.training  # the same function as G, dropout included (refresh_frozen_ keeps the mode)
    x_g = S.generate(G, 2.5 * torch.randn(B, d), None, 2.5)
    x, noise, noise_f = torch.randn(B, d), torch.randn(B, d), torch.randn(B, d)
    sigma, (sf, sfn) = torch.rand(B, 1) + 0.1, S.flow_sigmas(torch.rand(B, 1) * 0.7 + 0.02)
    lam = dict(lam_idem=3.0, lam_rec=5.0, lam_flow=7.0)
    G_bar.eval()  # here without dropout, so that the idem value can be recomputed below
    out = S.sign_student_loss(G, G_bar, f_phi, f_psi, x_g, None, sigma, noise, 1.0, x, sf, sfn, noise_f, **lam)
    total = (100 * out['dm'].sum() + 3 * out['idem'].sum() + 5 * out['rec'].sum() + 7 * out['flow'].sum()) / B
    total.backward()
    assert all(p.grad is None for p in G_bar.parameters())
    assert all(p.grad is None for p in list(f_phi.parameters()) + list(f_psi.parameters()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    with torch.no_grad():
        idem = (S.generate(G_bar, x_g, None, 2.5) - x_g).square().sum(1)          # D * per-pixel mean = pixel sum
    assert torch.allclose(out['idem'], idem)
    # data-free (x None): no L_rec (it would train f's outer call, see wip_test_img2); lambda = 0 skips a term
    out2 = S.sign_student_loss(G.eval(), G_bar, f_phi, f_psi, x_g.detach(), None, sigma, noise, lam_idem=0,
                               lam_flow=0)
    xd = x_g.detach()
    assert (out2['rec'] == 0).all() and (out2['idem'] == 0).all() and (out2['flow'] == 0).all()
    out3 = S.sign_student_loss(G, G_bar, f_phi, f_psi, xd, None, sigma, noise, x=xd + 0.1, lam_idem=0, lam_flow=0)
    assert torch.allclose(out3['rec'], (S.generate(G, xd + 0.1, None, 2.5) - xd - 0.1).square().sum(1))
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


#============================================================================
# The training loop on tiny random EDM nets: phases, EMA, resume, snapshots, FID, generate, bad input.

# A SongUNet of the CIFAR-10 preset shrunk to ~80k parameters (32x32, augment_dim 9 kept).
NET = json.dumps(dict(model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[]))

def tiny_cfg(outdir, **kw):
    """The cifar10 preset on a tiny random teacher: batch 4 in 2 micro-batches of 2, one tick per iteration."""
    d = dict(dataset='cifar10', teacher='random', net_overrides=NET, batch=4, batch_gpu=2, duration_mimg=12e-6,
             tick_kimg=0.004, snap_kimg=0.008, outdir=str(outdir), device='cpu', lr=1e-3, glr=1e-3)
    return sid.make_config({**d, **kw})

def run_quiet(cfg, nets=None):
    """sid.train with its console output captured -> ((G, G_ema, f_psi), stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = sid.train(cfg, nets=nets)
    return res, out.getvalue()

def tiny_nets(dataset='cifar10', seed=0):
    """(f_phi, G, f_psi) exactly as build_networks makes them for the tiny preset."""
    return sid.build_networks(tiny_cfg('unused', dataset=dataset, seed=seed), torch.device('cpu'))

def toy_nets():
    """Toy triple without the 5 s pretraining: exact mixture teacher, one random MLP for G and f_psi."""
    torch.manual_seed(0)
    G = sid.ToyDenoiser()
    return sid.ToyMixture().eval().requires_grad_(False), G, copy.deepcopy(G)

def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

# generate runs CPU convolutions without oneDNN, whose round-off depends on the batch size
@contextlib.contextmanager
def NATIVE_CONV():
    old, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old

def run_sid_cli(*args, sub=True, timeout=300):
    """`python sid.py ARGS` -> (returncode, stdout, stderr): a subprocess, or (sub=False, ~4 s faster per call on
    this machine) sid.main in this process with its exit code and both streams captured."""
    args = [str(a) for a in args]
    if sub:
        return subprocess.run([sys.executable, os.path.join(HERE, 'sid.py'), *args], cwd=HERE,
                              capture_output=True, text=True, timeout=timeout)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sid.main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())

SUB = [False, pytest.param(True, marks=slow, id='subprocess')]  # the real command line only with SID_SLOW=1

def perturbed(net, seed=1, scale=0.2):
    """A copy with every parameter moved randomly: the fresh nets' output layers are ~0 (EDM's init_zero),
    which would hide labels and seeds in 8-bit images."""
    net = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net

def write_label_pngs(folder, n, size, labels=None):
    """n RGB PNGs of size x size in an EDM-style folder, with dataset.json if labels are given."""
    os.makedirs(folder, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        PIL.Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f'{i}.png'))
    if labels is not None:
        json.dump({'labels': [[f'{i}.png', c] for i, c in enumerate(labels)]}, open(os.path.join(folder, 'dataset.json'), 'w'))
    return str(folder)

#----------------------------------------------------------------------------
# Presets and configuration.

# sid-official.md §6 (main:run_sid.sh): alpha, batch, batch_gpu, lr, glr, g_beta1, precision, dropout, augment,
# EMA half-life (Mimg), duration (Mimg), teacher.
OFFICIAL = {
    'cifar10':      (1.2, 256, 16, 1e-5, 1e-5, 0.0, 'fp32', 0.13, 0.12, 0.5, 500, 'cifar10-32x32-uncond-vp'),
    'cifar10-cond': (1.2, 256, 16, 1e-5, 1e-5, 0.0, 'fp32', 0.13, 0.12, 0.5, 800, 'cifar10-32x32-cond-vp'),
    'imagenet64':   (1.2, 8192, 16, 4e-6, 4e-6, 0.0, 'fp16', 0.10, 0.0, 2.0, 1000, 'imagenet-64x64-cond-adm'),
    'ffhq64':       (1.2, 512, 32, 1e-5, 1e-5, 0.9, 'fp16', 0.05, 0.15, 0.5, 500, 'ffhq-64x64-uncond-vp'),
    'afhqv2-64':    (1.0, 512, 32, 5e-6, 5e-6, 0.0, 'fp16', 0.05, 0.15, 0.5, 500, 'afhqv2-64x64-uncond-vp'),
}

@pytest.mark.parametrize('dataset', list(OFFICIAL))
def test_presets_match_official_sid(dataset):
    cfg = sid.make_config({'dataset': dataset})
    got = (cfg.alpha, cfg.batch, cfg.batch_gpu, cfg.lr, cfg.glr, cfg.g_beta1, cfg.precision, cfg.dropout,
           cfg.augment, cfg.ema_mimg, cfg.duration_mimg, cfg.teacher)
    assert got == OFFICIAL[dataset]
    assert (cfg.sigma_init, cfg.tmax, cfg.ls, cfg.lsg, cfg.method) == (2.5, 800, 1.0, 100.0, 'sid')
    tick = 20 if dataset == 'imagenet64' else 10  # official: tick 10 kimg (ImageNet 20), snapshot every 50 ticks
    assert (cfg.tick_kimg, cfg.snap_kimg) == (tick, 50 * tick)

def test_every_config_field_is_a_cli_option(monkeypatch):
    seen = {}
    monkeypatch.setattr(sid, 'train', lambda cfg: seen.setdefault('cfg', cfg))
    sid.main(['--dataset', 'cifar10-cond', '--alpha', '1.0', '--g-beta1', '0.5', '--ema-mimg', '0.7', '--lsg', '10',
              '--teacher', 'my.pkl', '--fid-ref', 'x.npz', '--batch-gpu', '8', '--net-overrides', '{}'])
    cfg = seen['cfg']
    assert (cfg.alpha, cfg.g_beta1, cfg.ema_mimg, cfg.lsg, cfg.teacher, cfg.fid_ref, cfg.batch_gpu, cfg.duration_mimg) == \
        (1.0, 0.5, 0.7, 10.0, 'my.pkl', 'x.npz', 8, 800)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        sid.main(['--help'])
    for f in dataclasses.fields(sid.Config):
        assert '--' + f.name.replace('_', '-') in out.getvalue()

#----------------------------------------------------------------------------
# End-to-end runs of the shrunk CIFAR-10 preset.

def test_three_iterations_end_to_end(tmp_path):
    cfg = tiny_cfg(tmp_path)
    f_phi, G, f_psi = tiny_nets()
    phi0, G0, psi0 = (copy.deepcopy(n) for n in (f_phi, G, f_psi))
    (G1, G_ema, psi1), out = run_quiet(cfg, nets=(f_phi, G, f_psi))
    assert states_equal(f_phi, phi0) and not any(p.requires_grad for p in f_phi.parameters())  # teacher untouched
    assert not states_equal(G1, G0) and not states_equal(psi1, psi0)                          # both trained
    assert all(torch.isfinite(p).all() for n in (G1, G_ema, psi1) for p in n.parameters())
    # config printed and saved; one status line and one stats.jsonl entry per tick (4 kimg = 1 iteration)
    saved = json.load(open(tmp_path / 'config.json'))
    assert saved == dataclasses.asdict(cfg) and json.dumps(saved, indent=2) in out
    assert sum(l.startswith('kimg ') for l in out.splitlines()) == 3
    stats = [json.loads(l) for l in open(tmp_path / 'stats.jsonl')]
    assert [s['kimg'] for s in stats] == pytest.approx([0.004, 0.008, 0.012])
    assert all(math.isfinite(s['loss_fake']) and math.isfinite(s['loss_G']) for s in stats)
    # snapshot (G_ema) and training state, both plain weights_only files; a sample grid of 8x8 images
    snap = torch.load(tmp_path / 'network-snapshot-000000.pt', weights_only=True)
    state = torch.load(tmp_path / 'training-state.pt', weights_only=True)
    assert snap['kimg'] == pytest.approx(0.012) and state['cur_nimg'] == 12
    assert all(torch.equal(snap['G_ema'][k], v) for k, v in G_ema.state_dict().items())
    net, saved_cfg = sid.load_generator(str(tmp_path))
    assert states_equal(net, G_ema) and saved_cfg['dataset'] == 'cifar10' and not net.training
    with PIL.Image.open(tmp_path / 'samples-000000.png') as im:
        assert im.size == (8 * 32, 8 * 32)

@pytest.mark.parametrize('sub', SUB)
def test_cli_run_then_generate_from_run_dir(tmp_path, sub):
    """The command of the issue, then `generate --ckpt RUN`; the PNGs equal an independent computation."""
    r = run_sid_cli(sub=sub, *['--dataset', 'cifar10', '--teacher', 'random', '--net-overrides', NET, '--batch', 4, '--batch-gpu', 2,
                '--duration-mimg', 0.000008, '--tick-kimg', 0.004, '--snap-kimg', 0.008, '--device', 'cpu',
                '--outdir', tmp_path / 'run_quiet'])
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / 'run_quiet' / 'config.json'))['net_overrides'] == NET
    r = run_sid_cli('generate', '--ckpt', tmp_path / 'run_quiet', '--seeds', '0-3', '--outdir', tmp_path / 'img', '--device', 'cpu', sub=sub)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / 'img')) == [f'{s:06d}.png' for s in range(4)]
    G, _ = sid.load_generator(str(tmp_path / 'run_quiet' / 'network-snapshot-000000.pt'))
    for s in range(4):
        z = 2.5 * torch.randn([3, 32, 32], generator=torch.Generator().manual_seed(s))
        with torch.no_grad(), NATIVE_CONV():
            x = G(z[None], torch.full([1, 1, 1, 1], 2.5))[0]
        ref = (x * 127.5 + 128).clip(0, 255).floor().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'img' / f'{s:06d}.png')), ref)

#----------------------------------------------------------------------------
# Resume: an interrupted and resumed run is bitwise identical to an uninterrupted one (CPU).

@pytest.mark.parametrize('kind', ['toy', 'image', 'cond-data'])
def test_resume_is_bitwise_identical(tmp_path, kind):
    if kind == 'toy':  # accumulation too: batch 64 in 2 micro-batches; snapshot every 2 iterations
        make = lambda out, **kw: sid.make_config(dict(dataset='toy', batch=64, batch_gpu=32, tick_kimg=0.064,
                                                      snap_kimg=0.128, ema_mimg=1e-4, outdir=str(out), **kw))
        nets, half, full = toy_nets(), 128e-6, 320e-6
    elif kind == 'image':
        make, nets, half, full = tiny_cfg, tiny_nets(), 8e-6, 16e-6
    else:  # labels come from a labelled image folder: the data position must be restored too
        data = write_label_pngs(tmp_path / 'data', 6, 32, labels=[0, 9, 3, 5, 9, 1])
        make = lambda out, **kw: tiny_cfg(out, dataset='cifar10-cond', data=data, **kw)
        nets, half, full = tiny_nets('cifar10-cond'), 8e-6, 16e-6
    torch.manual_seed(11)  # the global RNG state before a run must not matter
    A, _ = run_quiet(make(tmp_path / 'a', duration_mimg=full), copy.deepcopy(nets))
    torch.manual_seed(12)
    run_quiet(make(tmp_path / 'b', duration_mimg=half), copy.deepcopy(nets))
    assert torch.load(tmp_path / 'b' / 'training-state.pt', weights_only=True)['cur_nimg'] == round(half * 1e6)
    torch.manual_seed(13)
    B, out = run_quiet(make(tmp_path / 'b', duration_mimg=full, resume=str(tmp_path / 'b')), copy.deepcopy(nets))
    assert 'resumed from' in out
    for a, b in zip(A, B):  # G, G_ema, f_psi
        assert states_equal(a, b)
    assert not states_equal(A[0], nets[1])

def test_resume_missing_state_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='no training state'):
        run_quiet(tiny_cfg(tmp_path, resume=str(tmp_path / 'nothing')), tiny_nets())

#----------------------------------------------------------------------------
# Per-phase network states, micro-batches and kimg (sid-official.md §4, §11 items 6, 7, 10).

def test_phase_states_and_micro_batches(tmp_path):
    cfg = tiny_cfg(tmp_path, duration_mimg=8e-6)  # 2 iterations, 2 micro-batches of 2 per step
    f_phi, G, f_psi = nets = tiny_nets()
    names = {id(f_phi): 'phi', id(G): 'G', id(f_psi): 'psi'}
    calls = []

    def pre(module, args, kwargs):
        if id(module) not in names:  # G_ema is a deepcopy of G and inherits the hooks
            return
        x = args[0]
        aug = args[3] if len(args) > 3 else kwargs.get('augment_labels')
        blocks = [m for m in module.modules() if type(m).__name__ == 'UNetBlock']
        calls.append(dict(net=names[id(module)], training=module.training, B=x.shape[0],
                          blocks_training={m.training for m in blocks}, p_drop={m.dropout for m in blocks},
                          grad_enabled=torch.is_grad_enabled(), x_graph=x.requires_grad,
                          params_grad={p.requires_grad for p in module.parameters()},
                          aug=None if aug is None else tuple(aug.shape)))

    def post(module, args, output):
        if id(module) in names and names[id(module)] == 'G':
            calls[-1]['out_graph'] = output.requires_grad
    for n in nets:
        n.register_forward_pre_hook(pre, with_kwargs=True)
        n.register_forward_hook(post)
    run_quiet(cfg, nets)
    order = ['G', 'psi', 'G', 'psi', 'G', 'phi', 'psi', 'G', 'phi', 'psi']  # per iteration, 2 rounds per step
    assert [c['net'] for c in calls] == order * 2
    assert all(c['B'] == cfg.batch_gpu for c in calls)
    for it in range(2):
        fake, gen = calls[10 * it:10 * it + 4], calls[10 * it + 4:10 * it + 10]
        for c in fake:
            if c['net'] == 'G':  # samples for f_psi: no graph, dropout off
                assert not c['training'] and c['blocks_training'] == {False} and not c['grad_enabled']
                assert not c['out_graph']
            else:                # f_psi's own update: dropout on, trainable, augmented input (9-dim labels)
                assert c['training'] and c['blocks_training'] == {True} and c['params_grad'] == {True}
                assert c['aug'] == (cfg.batch_gpu, 9) and not c['x_graph']
        for c in gen:
            if c['net'] == 'G':  # generator update: dropout on, output carries the graph
                assert c['training'] and c['blocks_training'] == {True} and c['out_graph']
            else:                # teacher and f_psi: eval, frozen, no augmentation, differentiated w.r.t. x_t
                assert not c['training'] and c['blocks_training'] == {False} and c['params_grad'] == {False}
                assert c['aug'] is None and c['x_graph'] and c['grad_enabled']
    assert {c['p_drop'] == {cfg.dropout} for c in calls if c['net'] != 'phi'} == {True}
    assert {c['p_drop'] == {0.0} for c in calls if c['net'] == 'phi'} == {True}  # the teacher never drops out
    state = torch.load(tmp_path / 'training-state.pt', weights_only=True)
    assert state['cur_nimg'] == 2 * cfg.batch  # kimg counts generator images: batch per iteration

def test_adam_settings(tmp_path, monkeypatch):
    made = []
    real = torch.optim.Adam
    monkeypatch.setattr(torch.optim, 'Adam', lambda params, **kw: made.append(kw) or real(params, **kw))
    run_quiet(tiny_cfg(tmp_path, duration_mimg=4e-6, g_beta1=0.9, lr=2e-5, glr=3e-5))
    assert len(made) == 2
    (psi_kw,), (G_kw,) = [m for m in made if m['lr'] == 2e-5], [m for m in made if m['lr'] == 3e-5]
    assert psi_kw['betas'] == (0.0, 0.999) and G_kw['betas'] == (0.9, 0.999)
    assert psi_kw['eps'] == G_kw['eps'] == 1e-8 and psi_kw.get('weight_decay', 0) == 0

def test_nonfinite_grads_are_sanitised(tmp_path):
    """NaN gradients become 0 before the Adam steps (official nan_to_num), so weights stay finite."""
    f_phi, G, f_psi = nets = tiny_nets()
    pG, ppsi = G.model.enc['32x32_conv'].weight, f_psi.model.dec['32x32_aux_conv'].weight
    before = pG.detach().clone(), ppsi.detach().clone()
    for p in (pG, ppsi):
        p.register_hook(lambda g: torch.full_like(g, float('nan')))
    (G1, _, psi1), _ = run_quiet(tiny_cfg(tmp_path, duration_mimg=4e-6), nets)
    assert torch.equal(pG, before[0]) and torch.equal(ppsi, before[1])  # zero gradient: Adam leaves them alone
    assert all(torch.isfinite(p).all() for n in (G1, psi1) for p in n.parameters())
    G0 = tiny_nets()[1]
    assert not torch.equal(G1.model.enc['32x32_block0'].conv0.weight, G0.model.enc['32x32_block0'].conv0.weight)

#----------------------------------------------------------------------------
# EMA of G: beta = 0.5^(batch / max(h, 1e-8)), h = min(half-life, 0.05 * cur_nimg), cur_nimg before the step.

@pytest.mark.parametrize('ema_mimg', [4e-6, 1.0])  # half-life 4 images (reached after 20 iterations) / pure ramp-up
def test_ema_closed_form(tmp_path, ema_mimg):
    batch, iters = 4, 30
    cfg = sid.make_config(dict(dataset='toy', batch=batch, batch_gpu=batch, duration_mimg=iters * batch * 1e-6,
                               tick_kimg=1, snap_kimg=1, ema_mimg=ema_mimg, lr=1e-2, glr=1e-2, outdir=str(tmp_path)))
    f_phi, G, f_psi = toy_nets()
    seen = [[p.detach().double().clone() for p in G.parameters()]]  # G_0, then G after each step
    G.register_forward_pre_hook(lambda m, a: seen.append([p.detach().double().clone() for p in m.parameters()])
                                if m is G and not m.training else None)
    (G_end, G_ema, _), _ = run_quiet(cfg, (f_phi, G, f_psi))
    steps = seen[2:] + [[p.detach().double() for p in G_end.parameters()]]  # seen[1] is G_0 again (1st fake step)
    assert len(steps) == iters
    ema = seen[0]
    for i, G_i in enumerate(steps):
        h = min(ema_mimg * 1e6, 0.05 * i * batch)
        beta = 0.5 ** (batch / max(h, 1e-8))
        ema = [beta * e + (1 - beta) * g for e, g in zip(ema, G_i)]
    got = [p.double() for p in G_ema.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(got, ema)) < 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(got, steps[-1])) > 1e-3  # EMA visibly lags G

#----------------------------------------------------------------------------
# Checkpoints survive a crash in the middle of writing.

@pytest.mark.parametrize('fail_on', ['snapshot', 'state'])
def test_crash_during_checkpoint_keeps_previous(tmp_path, monkeypatch, fail_on):
    cfg = tiny_cfg(tmp_path, duration_mimg=8e-6, snap_kimg=0.004)  # checkpoints after iterations 1 and 2
    real, calls = torch.save, []

    def save(obj, f, *a, **k):  # the 2nd iteration's write dies half-way (as if the process were killed)
        calls.append(str(f))
        is_state = 'training-state' in str(f)
        if len(calls) > 2 and is_state == (fail_on == 'state'):
            with open(f, 'wb') as fh:
                fh.write(b'PK\x03\x04 half a file')
            raise KeyboardInterrupt
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(KeyboardInterrupt):
        run_quiet(cfg, tiny_nets())
    assert all(c.endswith('.tmp') for c in calls)  # every write goes to a temporary file first
    monkeypatch.setattr(torch, 'save', real)
    # the files from iteration 1 (the snapshot: from iteration 2 if only the state write died) are intact
    assert torch.load(tmp_path / 'training-state.pt', weights_only=True)['cur_nimg'] == 4
    snap = torch.load(tmp_path / 'network-snapshot-000000.pt', weights_only=True)
    assert snap['kimg'] == pytest.approx(0.008 if fail_on == 'state' else 0.004)
    sid.load_generator(str(tmp_path / 'network-snapshot-000000.pt'))
    assert os.path.exists(tmp_path / ('training-state.pt.tmp' if fail_on == 'state' else 'network-snapshot-000000.pt.tmp'))
    # the run continues from the surviving state
    (_, G_ema, _), out = run_quiet(dataclasses.replace(cfg, resume=str(tmp_path)), tiny_nets())
    assert 'resumed from' in out and torch.load(tmp_path / 'training-state.pt', weights_only=True)['cur_nimg'] == 8

#----------------------------------------------------------------------------
# FID in the loop with the TorchScript stand-in detector (FidStandIn, 8-d) and a hand-written reference.

def test_fid_in_loop_best_snapshot_and_plot(tmp_path, monkeypatch):
    import fid
    det = str(tmp_path / 'det.pt')
    torch.jit.save(torch.jit.script(FidStandIn(dim=8)), det)
    monkeypatch.setenv('SID_DETECTOR', det)
    fid.save_ref(str(tmp_path / 'ref.npz'), np.full(8, 0.1), np.eye(8) * 0.5)
    cfg = tiny_cfg(tmp_path / 'run_quiet', fid_every_kimg=0.004, fid_num=16, fid_ref=str(tmp_path / 'ref.npz'),
                   duration_mimg=12e-6, lr=1e-2, glr=1e-2, snap_kimg=1)
    nets = tiny_nets()
    nets = (nets[0], perturbed(nets[1]), nets[2])
    _, out = run_quiet(cfg, nets)
    fids = torch.load(tmp_path / 'run_quiet' / 'training-state.pt', weights_only=True)['fid']
    assert [m for m, _ in fids] == pytest.approx([4e-6, 8e-6, 12e-6]) and len({v for _, v in fids}) == 3
    assert sum(l.startswith('FID ') for l in out.splitlines()) == 3
    best = torch.load(tmp_path / 'run_quiet' / 'network-snapshot-best.pt', weights_only=True)
    m_best, v_best = min(fids, key=lambda p: p[1])
    assert best['fid'] == v_best and best['kimg'] == pytest.approx(m_best * 1e3)
    # independent FID of the best snapshot: numpy mean / covariance of the stand-in features
    G, _ = sid.load_generator(str(tmp_path / 'run_quiet' / 'network-snapshot-best.pt'))
    z = 2.5 * torch.stack([torch.randn([3, 32, 32], generator=torch.Generator().manual_seed(s)) for s in range(16)])
    with torch.no_grad():
        x = G(z, torch.full([16, 1, 1, 1], 2.5))  # one batch and sigma [B,1,1,1], as the loop: round-off flips pixels
    feats = FidStandIn(dim=8)((x * 127.5 + 128).clip(0, 255).to(torch.uint8), True).double().numpy()
    mu_ref, sig_ref = np.full(8, 0.1), np.eye(8) * 0.5
    expect = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu_ref, sig_ref)
    assert v_best == pytest.approx(expect, rel=1e-6)
    with PIL.Image.open(tmp_path / 'run_quiet' / 'fid.png') as im:
        assert im.size[0] > 100

def test_bad_fid_ref_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_quiet(tiny_cfg(tmp_path, fid_every_kimg=0.004, fid_ref=str(tmp_path / 'missing.npz')), tiny_nets())
    assert not (tmp_path / 'stats.jsonl').exists()

#----------------------------------------------------------------------------
# Bad input on the command line: one line on stderr, exit code 2, no traceback.


def assert_one_line_error(r, msg):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr, r.stderr

@pytest.mark.parametrize('sub', [False, True])
@pytest.mark.parametrize('case', ['resolution', 'labels', 'resume', 'teacher', 'toy-fid'])
def test_bad_training_input_exit_2(tmp_path, case, sub):
    if sub and case != 'resolution' and not os.environ.get('SID_SLOW'):
        pytest.skip('set SID_SLOW=1 (one case runs as a subprocess by default)')
    run_sid_cli = lambda *a: globals()['run_sid_cli'](*a, sub=sub)
    base = ['--teacher', 'random', '--net-overrides', NET, '--batch', 4, '--batch-gpu', 2, '--duration-mimg', 4e-6,
            '--device', 'cpu', '--outdir', tmp_path / 'run_quiet']
    if case == 'resolution':  # 16x16 images for a 32x32 teacher
        r = run_sid_cli('--dataset', 'cifar10', *base, '--data', write_label_pngs(tmp_path / 'png', 3, 16))
        assert_one_line_error(r, 'dataset resolution 16x16 does not match the teacher resolution 32')
    elif case == 'labels':    # unlabelled images for the class-conditional teacher
        r = run_sid_cli('--dataset', 'cifar10-cond', *base, '--data', write_label_pngs(tmp_path / 'png', 3, 32))
        assert_one_line_error(r, 'dataset label_dim 0 does not match the teacher label_dim 10')
    elif case == 'resume':
        r = run_sid_cli('--dataset', 'cifar10', *base, '--resume', tmp_path / 'nothing')
        assert_one_line_error(r, '--resume: no training state')
    elif case == 'teacher':
        r = run_sid_cli('--dataset', 'cifar10', *base[2:], '--teacher', tmp_path / 'missing.pkl')
        assert_one_line_error(r, 'missing.pkl')
    else:
        r = run_sid_cli('--dataset', 'toy', '--fid-every-kimg', 10, '--outdir', tmp_path / 'run_quiet')
        assert_one_line_error(r, 'do not apply to the toy')

@pytest.mark.parametrize('sub', SUB)
@pytest.mark.parametrize('args,msg', [
    (['--seeds', '5-3'], "bad --seeds '5-3'"),
    (['--seeds', '1,x'], "bad --seeds '1,x'"),
    (['--seeds', '-2'], "bad --seeds '-2'"),
    (['--seeds', '0-3', '--batch', '0'], '--batch must be >= 1'),
])
def test_generate_bad_seeds_exit_2(tmp_path, args, msg, sub):
    G = tiny_nets()[1]
    sid.save_snapshot(tiny_cfg(tmp_path), G.eval(), 0, str(tmp_path / 'g.pt'))
    assert_one_line_error(run_sid_cli('generate', '--ckpt', tmp_path / 'g.pt', '--outdir', tmp_path / 'o', *args, sub=sub), msg)
    assert not os.path.exists(tmp_path / 'o')

def test_generate_missing_ckpt_exit_2(tmp_path):
    r = run_sid_cli('generate', '--ckpt', tmp_path / 'nope.pt', '--outdir', tmp_path / 'o')
    assert_one_line_error(r, 'checkpoint not found')
    r = run_sid_cli('generate', '--ckpt', tmp_path, '--outdir', tmp_path / 'o', sub=False)  # a folder without snapshots
    assert_one_line_error(r, 'no network-snapshot-*.pt')

#----------------------------------------------------------------------------
# generate: names, per-seed determinism, grid, class labels (in-process: sid.main).

@pytest.fixture
def snapshots(tmp_path):
    """Snapshots of perturbed tiny generators, unconditional and class-conditional."""
    paths = {}
    for ds in ('cifar10', 'cifar10-cond'):
        G = perturbed(tiny_nets(ds)[1]).eval()
        paths[ds] = str(tmp_path / f'{ds}.pt')
        sid.save_snapshot(tiny_cfg(tmp_path, dataset=ds), G, 0, paths[ds])
    return paths

def read_png(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im)

def gen(*args):
    with contextlib.redirect_stdout(io.StringIO()):
        sid.main(['generate', '--device', 'cpu', *map(str, args)])

def test_generate_pngs_and_per_seed_determinism(tmp_path, snapshots):
    gen('--ckpt', snapshots['cifar10'], '--seeds', '0-3', '--outdir', tmp_path / 'a', '--batch', 4)
    gen('--ckpt', snapshots['cifar10'], '--seeds', '2,3,0-1', '--outdir', tmp_path / 'b', '--batch', 3)
    gen('--ckpt', snapshots['cifar10'], '--seeds', '2', '--outdir', tmp_path / 'c')
    names = [f'{s:06d}.png' for s in range(4)]
    assert sorted(os.listdir(tmp_path / 'a')) == sorted(os.listdir(tmp_path / 'b')) == names
    imgs = [read_png(tmp_path / 'a' / n) for n in names]
    assert imgs[0].shape == (32, 32, 3) and imgs[0].dtype == np.uint8 and imgs[0].std() > 10
    for n, im in zip(names, imgs):
        assert np.array_equal(read_png(tmp_path / 'b' / n), im)  # same seed, other batch split
    assert np.array_equal(read_png(tmp_path / 'c' / names[2]), imgs[2])
    assert not np.array_equal(imgs[0], imgs[1])
    gen('--ckpt', snapshots['cifar10'], '--seeds', '0-3', '--outdir', tmp_path / 'g', '--grid')
    assert os.listdir(tmp_path / 'g') == ['grid.png']
    grid = read_png(tmp_path / 'g' / 'grid.png')
    assert grid.shape == (64, 64, 3)
    assert np.array_equal(grid[:32, 32:], imgs[1]) and np.array_equal(grid[32:, 32:], imgs[3])

def test_generate_class_idx(tmp_path, snapshots):
    G, _ = sid.load_generator(snapshots['cifar10-cond'])
    for c in (3, 7):
        gen('--ckpt', snapshots['cifar10-cond'], '--seeds', '0-1', '--outdir', tmp_path / str(c), '--class-idx', c)
        for s in range(2):
            z = 2.5 * torch.randn([1, 3, 32, 32], generator=torch.Generator().manual_seed(s))
            with torch.no_grad(), NATIVE_CONV():
                x = G(z, torch.full([1, 1, 1, 1], 2.5), torch.nn.functional.one_hot(torch.tensor([c]), 10).float())[0]
            ref = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(read_png(tmp_path / str(c) / f'{s:06d}.png'), ref)
    assert not np.array_equal(read_png(tmp_path / '3' / '000000.png'), read_png(tmp_path / '7' / '000000.png'))
    with pytest.raises(SystemExit) as e:  # class out of range
        with contextlib.redirect_stderr(io.StringIO()):
            gen('--ckpt', snapshots['cifar10-cond'], '--seeds', '0', '--outdir', tmp_path / 'x', '--class-idx', 10)
    assert e.value.code == 2


#============================================================================
# SIGN on the toy: idempotence, multi-step sampling, projection, command line.

# Tests of SIGN on the 2-D toy (sign.md §4, issue #7): one short training run, checked against the same network
# at initialisation, plus the `generate --steps/--sigmas` and `project` command lines on its snapshot.

ROOT = os.path.dirname(os.path.abspath(__file__))
DURATION_MIMG = 0.13  # ~510 iterations: ~15 s on one core (the toy default, 0.2 Mimg, is the README's setting)

#----------------------------------------------------------------------------
# Helpers: fixed evaluation draws, and the toy's distance-to-data figure.

def nearest_mode_distance(x, teacher):
    """Mean distance from each point to the nearest mixture mode (exact samples: s*sqrt(pi/2) = 0.125)."""
    return float(torch.cdist(x.double(), teacher.mu).min(1).values.mean())

def quality(f, z, sigmas, teacher, reps=3):
    """(energy distance, within-2-std fraction) of the last of len(sigmas)+1 steps, averaged over `reps` noise draws."""
    qs = []
    for rep in range(reps):
        noises = [torch.randn(z.shape, generator=torch.Generator().manual_seed(100 * rep + k)) for k in range(len(sigmas))]
        qs.append(sid.toy_quality(sid.multistep_sample(f, z, sigmas, noises)[-1], teacher))
    return sum(q[0] for q in qs) / reps, sum(q[2] for q in qs) / reps

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """Train SIGN on the toy once; also keep the initial generator for before/after comparisons."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outdir = tmp_path_factory.mktemp('sign_toy')
        cfg = sid.make_config({'dataset': 'toy', 'method': 'sign', 'duration_mimg': DURATION_MIMG, 'outdir': str(outdir)})
        nets = sid.build_networks(cfg, torch.device('cpu'))
        G_init = copy.deepcopy(nets[1]).eval()
        _, G_ema, _ = sid.train(cfg, nets)
    finally:
        torch.set_num_threads(threads)
    teacher = nets[0]
    return dict(cfg=cfg, outdir=str(outdir), teacher=teacher, G_init=G_init, G=G_ema.eval(),
                z=torch.randn(2000, 2, generator=torch.Generator().manual_seed(7)) * cfg.sigma_init,
                x=teacher.sample(2000, torch.Generator().manual_seed(5)))

def student(G, sigma_init=2.5):
    """The time-free student f(x) = G(x; sigma_init), without a graph."""
    return torch.no_grad()(lambda v: sid.generate(G, v, None, sigma_init))

#----------------------------------------------------------------------------
# After training: IGN's two properties, multi-step quality, projection.

def test_sign_toy_defaults_are_the_tuned_ones():
    cfg = sid.make_config({'dataset': 'toy', 'method': 'sign'})
    assert (cfg.lambda_rec, cfg.lambda_idem, cfg.lambda_flow) == (100.0, 100.0, 30.0)
    assert all(0 < s <= 0.1 for s in sid.TOY_SIGN_SIGMAS) and list(sid.TOY_SIGN_SIGMAS) == sorted(sid.TOY_SIGN_SIGMAS, reverse=True)

def test_idempotence_and_fixed_points(run):
    f0, f = student(run['G_init']), student(run['G'])
    idem0, idem = sid.idempotence_error(f0, run['z']), sid.idempotence_error(f, run['z'])
    fix0, fix = sid.fixed_point_error(f0, run['x']), sid.fixed_point_error(f, run['x'])
    # at initialisation f = the teacher's denoiser at sigma 2.5: idem ~0.11, fix ~0.67; trained ~0.04 and ~0.035
    assert idem < 0.5 * idem0 and idem < 0.06, (idem0, idem)
    assert fix < 0.1 * fix0 and fix < 0.06, (fix0, fix)

def test_one_step_samples_cover_the_modes(run):
    ed, covered, within = sid.toy_quality(student(run['G'])(run['z']), run['teacher'])
    ed0, _, within0 = sid.toy_quality(student(run['G_init'])(run['z']), run['teacher'])
    assert covered == 8 and within > 0.4 and within0 < 0.05 and ed < 0.1 * ed0, (ed0, ed, within0, within)

def test_multistep_not_worse_than_one_step(run):
    # Tolerance: within-2-std may drop by at most 0.02; the energy distance may grow to 2x + 0.001 (the 4-step
    # samples are slightly over-contracted, README_sign.md). The old defaults (sigmas 0.8, 0.2, 0.05, lambdas 10)
    # fail both: 2 steps lose 0.16 of within-2-std, 4 steps have 5x the energy distance.
    f, T, z = student(run['G']), run['teacher'], run['z']
    ed1, w1 = quality(f, z, (), T, reps=1)
    for k in (2, 4):
        ed, w = quality(f, z, sid.TOY_SIGN_SIGMAS[:k - 1], T)
        assert w >= w1 - 0.02, (k, w1, w)
        assert ed <= 2 * ed1 + 0.001, (k, ed1, ed)

def test_projection_of_noisy_data_lands_near_the_data(run):
    f, T, x = student(run['G']), run['teacher'], run['x']
    y = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    d_noisy, d_proj = nearest_mode_distance(y, T), nearest_mode_distance(sid.project(f, y), T)
    assert d_proj < 0.85 * d_noisy, (d_noisy, d_proj)  # ~0.24 -> ~0.19 (clean data: 0.125)
    # and far more than the untrained network, which maps everything near the origin (distance ~ ring radius)
    assert d_proj < 0.5 * nearest_mode_distance(sid.project(student(run['G_init']), y), T)

#----------------------------------------------------------------------------
# Command line on the run's snapshot.

def cli(*args):
    return subprocess.run([sys.executable, 'sid.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))

def test_cli_project_writes_projected_points(run, tmp_path):
    T = run['teacher']
    pts = (T.sample(300, torch.Generator().manual_seed(1)) + 0.2 * torch.randn(300, 2, generator=torch.Generator().manual_seed(2))).numpy()
    np.save(tmp_path / 'pts.npy', pts)
    r = cli('project', '--ckpt', run['outdir'], '--input', str(tmp_path / 'pts.npy'), '--sigma', '0.2', '--outdir', str(tmp_path / 'out'))
    assert r.returncode == 0, r.stderr
    out = np.load(tmp_path / 'out' / 'projected.npy')
    assert out.shape == (300, 2) and np.isfinite(out).all()
    # f(pts + 0.2 eps): the extra noise is undone as well, so the result is still nearer the modes than pts
    assert nearest_mode_distance(torch.from_numpy(out), T) < nearest_mode_distance(torch.from_numpy(pts), T)

def test_cli_generate_multistep_matches_library(run, tmp_path):
    r = cli('generate', '--ckpt', run['outdir'], '--seeds', '0-99', '--steps', '3', '--sigmas', '0.1,0.05', '--outdir', str(tmp_path))
    assert r.returncode == 0, r.stderr
    x = np.load(tmp_path / 'samples.npy')
    G, _ = sid.load_generator(run['outdir'])
    ref = sid.sample_images(G, list(range(100)), 2.5, torch.device('cpu'), sigmas=(0.1, 0.05)).numpy()
    one = sid.sample_images(G, list(range(100)), 2.5, torch.device('cpu')).numpy()
    assert x.shape == (100, 2) and np.allclose(x, ref, atol=1e-5) and not np.allclose(x, one, atol=1e-3)

def test_cli_generate_steps_sigmas_mismatch_is_a_one_line_error(run, tmp_path):
    r = cli('generate', '--ckpt', run['outdir'], '--seeds', '0-9', '--steps', '3', '--sigmas', '0.1', '--outdir', str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and '--steps 3' in lines[0], r.stderr


#============================================================================
# torchrun DDP on CPU (gloo) and the fast options.

# Tests for sid.train() across processes (torchrun, gloo on CPU) and for its fast single-GPU options.
#   python -m pytest -q wip_test_ddp.py -x            (~1 min on 1-2 CPU cores; SID_SLOW=1 adds torch.compile)
# Run as a script under torchrun, this file is also the multi-process driver of the tests (see _driver).
#
# How "2 ranks = 1 process" is made testable: train() seeds every micro-batch from (seed, images seen, phase,
# global micro-batch index rank*rounds + r). A 2-rank run with 1 accumulation round and a 1-rank run with 2
# rounds (same global batch) therefore draw the same z, sigma, noise, augmentations and dropout masks for the
# same micro-batches, and DDP's mean of the two ranks' gradients equals the single process's accumulated sum.
# The runs then agree up to float summation order, which the tolerances below allow (and nothing else does:
# a gradient that is not synchronised, a wrong loss normalisation or a rank-dependent stream breaks them).



TINY_JSON = '{"model_channels":16,"channel_mult":[1,1],"num_blocks":1,"attn_resolutions":[]}'  # SongUNet kwargs

#----------------------------------------------------------------------------
# Configurations: a tiny DDPM++ (CIFAR-10 preset with net_overrides, random teacher, dropout 0.13 and
# augmentation 0.12 as the preset) and the 2-D toy. One status line per iteration (tick = one batch).

def img_cfg(outdir, iters, batch=8, batch_gpu=4, **kw):
    return dict(dict(dataset='cifar10', teacher='random', net_overrides=TINY_JSON, batch=batch, batch_gpu=batch_gpu,
                     lr=1e-4, glr=1e-4, duration_mimg=iters * batch / 1e6, tick_kimg=batch / 1e3, snap_kimg=1,
                     outdir=str(outdir), device='cpu'), **kw)

def toy_cfg(outdir, iters, method='sid', batch=64, batch_gpu=32, **kw):
    return dict(dict(dataset='toy', method=method, batch=batch, batch_gpu=batch_gpu, duration_mimg=iters * batch / 1e6,
                     tick_kimg=batch / 1e3, snap_kimg=1, outdir=str(outdir)), **kw)

def perturbed_nets(cfg):
    """The random teacher's last convolution is nearly zero (EDM's init), so its output barely depends on the
    weights; shaking all weights makes every loss depend on the whole network. G and f_psi copy the teacher."""
    f_phi, G, f_psi = sid.build_networks(cfg, torch.device('cpu'))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in f_phi.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    for net in (G, f_psi):
        net.load_state_dict(f_phi.state_dict())
    return f_phi, G, f_psi

def run_ddp(overrides, perturb=False):
    """One in-process (single-rank) run -> dict of final state dicts and the stats.jsonl entries."""
    cfg = sid.make_config(overrides)
    G, G_ema, f_psi = sid.train(cfg, perturbed_nets(cfg) if perturb else None)  # resume: the teacher is not saved
    return dict(G=G.state_dict(), G_ema=G_ema.state_dict(), f_psi=f_psi.state_dict(), stats=stats(cfg.outdir))

def stats(outdir):
    with open(os.path.join(outdir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]

def rank_states(outdir):
    return [torch.load(os.path.join(outdir, f'rank{r}.pt'), weights_only=True) for r in (0, 1)]

def max_diff(a, b):
    """Largest absolute difference over G, G_ema and f_psi."""
    return max((a[k][n] - b[k][n]).abs().max().item() for k in ('G', 'G_ema', 'f_psi') for n in a[k])

def mean_diff(a, b):
    """Mean absolute difference per weight over G, G_ema and f_psi. Not the max: Adam moves every weight by ~lr
    whatever the size of its gradient, so a weight whose gradient is mathematically zero (a bias in front of a
    GroupNorm) and numerically +-rounding may step +lr in one run and -lr in the other. A real fault (unsynced
    or wrongly scaled gradients, other noise) changes the steps of most weights, i.e. by ~lr on average."""
    tot = sum((a[k][n] - b[k][n]).abs().sum().item() for k in ('G', 'G_ema', 'f_psi') for n in a[k])
    return tot / sum(a[k][n].numel() for k in ('G', 'G_ema', 'f_psi') for n in a[k])

#----------------------------------------------------------------------------
# Multi-process driver: `torchrun --standalone --nproc_per_node=2 wip_test_ddp.py JOBS.json`. It first checks
# that sid.check_ranks_agree() catches differing replicas, then runs each job with train() (which checks the
# replicas at every tick, i.e. every iteration here) and saves each rank's final weights as rank{r}.pt.

def _driver(jobs_path):
    import torch.distributed as dist
    dist.init_process_group('gloo')  # train() leaves a caller's group alone
    rank = dist.get_rank()
    with open(jobs_path) as f:
        jobs = json.load(f)
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)
    sid.check_ranks_agree([net])  # equal: must pass
    with torch.no_grad():
        net.bias[1] += 1e-6 * rank  # a one-element difference on rank 1
    try:
        sid.check_ranks_agree([net])
        caught = False
    except RuntimeError:
        caught = True
    with open(os.path.join(os.path.dirname(jobs_path), f'check{rank}.json'), 'w') as f:
        json.dump(dict(caught=caught), f)
    for job in jobs:
        cfg = sid.make_config(job['cfg'])
        G, G_ema, f_psi = sid.train(cfg, perturbed_nets(cfg) if job['perturb'] else None)
        torch.save(dict(G=G.state_dict(), G_ema=G_ema.state_dict(), f_psi=f_psi.state_dict()),
                   os.path.join(cfg.outdir, f'rank{rank}.pt'))
    dist.destroy_process_group()

def torchrun(jobs, tmp):
    path = os.path.join(tmp, 'jobs.json')
    with open(path, 'w') as f:
        json.dump(jobs, f)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(HERE))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', __file__, path]
    r = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout

@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    """One torchrun launch (2 ranks) for all multi-process tests, plus the single-process runs they compare to."""
    t = tmp_path_factory.mktemp('ddp')
    d = {k: t / k for k in ('toy1', 'toy2', 'img1_half', 'img1_full', 'img2_half', 'img2_back', 'img1_resumed',
                            'sida2', 'sida1_resumed', 'sign2')}
    one = dict(toy1=run_ddp(toy_cfg(d['toy1'], 3, batch=128)), img1_half=run_ddp(img_cfg(d['img1_half'], 2), perturb=True),
               img1_full=run_ddp(img_cfg(d['img1_full'], 4), perturb=True))
    jobs = [dict(cfg=toy_cfg(d['toy2'], 3, batch=128), perturb=False),           # 2 ranks x 2 rounds of 32 (no_sync)
            dict(cfg=img_cfg(d['img2_half'], 2), perturb=True),                  # 2 ranks x 1 round of 4
            dict(cfg=img_cfg(d['img2_back'], 4, resume=str(d['img1_half'])), perturb=True),  # 1 rank -> 2 ranks
            dict(cfg=toy_cfg(d['sida2'], 2, method='sida', batch_gpu=16), perturb=False),     # 2 rounds per rank
            dict(cfg=toy_cfg(d['sign2'], 2, method='sign'), perturb=False)]
    out = torchrun(jobs, str(t))
    # back on 1 rank: continue the 2-rank runs
    one['img1_resumed'] = run_ddp(img_cfg(d['img1_resumed'], 4, resume=str(d['img2_half'])), perturb=True)
    one['sida1_resumed'] = run_ddp(toy_cfg(d['sida1_resumed'], 4, method='sida', batch_gpu=16, resume=str(d['sida2'])))
    return dict(dirs=d, one=one, stdout=out, tmp=t)

#----------------------------------------------------------------------------
# DDP: replicas identical, 2 ranks = 1 process, resume across world sizes.

def test_ddp_replicas_identical_and_check_can_fail(ddp):
    for r in (0, 1):
        with open(ddp['tmp'] / f'check{r}.json') as f:
            assert json.load(f)['caught'], 'check_ranks_agree missed a 1e-6 difference on rank 1'
    for job in ('toy2', 'img2_half', 'img2_back', 'sida2', 'sign2'):
        a, b = rank_states(ddp['dirs'][job])
        assert max_diff(a, b) == 0, job  # bit-identical (train() also checked this after every iteration)

def test_ddp_only_rank0_writes(ddp):
    # one stats line per iteration (a second writer would duplicate them); the config is logged once
    assert [round(e['kimg'] * 1e3) for e in stats(ddp['dirs']['img2_half'])] == [8, 16]
    assert ddp['stdout'].count('accumulation round(s)') == 5  # one line per job, from rank 0 only

def test_ddp_toy_equals_single_process(ddp):
    a, b = ddp['one']['toy1'], rank_states(ddp['dirs']['toy2'])[0]
    assert mean_diff(a, b) < 1e-5  # lr = 1e-3 on the toy
    # the printed losses are the mean over ranks, i.e. those of the whole batch
    for e1, e2 in zip(a['stats'], stats(ddp['dirs']['toy2'])):
        assert math.isclose(e1['loss_fake'], e2['loss_fake'], rel_tol=1e-4)
        assert math.isclose(e1['loss_G'], e2['loss_G'], rel_tol=1e-3, abs_tol=1e-4)

def test_ddp_image_equals_single_process(ddp):
    one, two = ddp['one']['img1_half'], rank_states(ddp['dirs']['img2_half'])[0]
    # the steps moved the weights by ~lr = 1e-4 per iteration; the two runs agree far below that
    assert mean_diff(one, ddp['one']['img1_full']) > 3e-5  # 2 more steps of lr = 1e-4
    assert mean_diff(one, two) < 1e-6
    for e1, e2 in zip(one['stats'], stats(ddp['dirs']['img2_half'])):
        assert math.isclose(e1['loss_fake'], e2['loss_fake'], rel_tol=1e-5)
        assert math.isclose(e1['loss_G'], e2['loss_G'], rel_tol=1e-4)

def test_resume_two_ranks_on_one_rank_and_back(ddp):
    full = ddp['one']['img1_full']  # 4 uninterrupted iterations on 1 rank
    for resumed in (ddp['one']['img1_resumed'], rank_states(ddp['dirs']['img2_back'])[0]):
        assert mean_diff(full, resumed) < 1e-6
    for e in ddp['one']['img1_resumed']['stats'] + stats(ddp['dirs']['img2_back']):
        assert math.isfinite(e['loss_fake']) and math.isfinite(e['loss_G'])
    # kimg continues where the 2-rank (1-rank) run stopped, and the losses are those of the uninterrupted run
    for resumed in (ddp['one']['img1_resumed']['stats'], stats(ddp['dirs']['img2_back'])):
        assert [round(e['kimg'] * 1e3) for e in resumed] == [24, 32]
        for e, ref in zip(resumed, full['stats'][2:]):
            assert math.isclose(e['loss_fake'], ref['loss_fake'], rel_tol=1e-5)

def test_resume_data_position_sida_toy(ddp):
    # SiDA draws real data in its fake-score step only during the first 100 kimg: one batch per iteration
    st2 = torch.load(ddp['dirs']['sida2'] / 'training-state.pt', weights_only=True)
    st1 = torch.load(ddp['dirs']['sida1_resumed'] / 'training-state.pt', weights_only=True)
    assert (st2['cur_nimg'], st2['data_images']) == (128, 128)
    assert (st1['cur_nimg'], st1['data_images']) == (256, 256)
    assert [round(e['kimg'] * 1e3) for e in ddp['one']['sida1_resumed']['stats']] == [192, 256]
    assert all(math.isfinite(e['loss_fake']) for e in stats(ddp['dirs']['sida2']) + ddp['one']['sida1_resumed']['stats'])

#----------------------------------------------------------------------------
# Fast options: each gives the faithful path's losses within its precision's tolerance, and does take effect.

@pytest.fixture(scope='module')
def faithful(tmp_path_factory):
    return run_ddp(img_cfg(tmp_path_factory.mktemp('fast') / 'fp32', 2, batch=4, batch_gpu=4), perturb=True)

def fast_run(tmp_path, **opt):
    return run_ddp(img_cfg(tmp_path / 'run_ddp', 2, batch=4, batch_gpu=4, **opt), perturb=True)

def assert_losses_close(a, b, rel):
    for e1, e2 in zip(a['stats'], b['stats']):
        for k in ('loss_fake', 'loss_G'):
            assert math.isclose(e1[k], e2[k], rel_tol=rel), (k, e1[k], e2[k])

def test_faithful_losses_depend_on_the_weights(faithful, tmp_path):
    # guard for the comparisons below: another seed changes the losses by far more than any tolerance used
    other = fast_run(tmp_path, seed=1)
    assert not math.isclose(other['stats'][0]['loss_G'], faithful['stats'][0]['loss_G'], rel_tol=0.1)
    assert mean_diff(other, faithful) > 3e-5  # as do the weights, by ~lr = 1e-4 per step

def test_channels_last_same_losses(tmp_path):
    # without dropout: F.dropout fills its mask in memory order, so NHWC activations get other (equally
    # distributed) masks; everything else draws the same numbers (sid.generate returns NCHW memory)
    ref = run_ddp(img_cfg(tmp_path / 'ref', 2, batch=4, batch_gpu=4, dropout=0), perturb=True)
    out = run_ddp(img_cfg(tmp_path / 'cl', 2, batch=4, batch_gpu=4, dropout=0, channels_last=1), perturb=True)
    assert out['G']['model.enc.32x32_block0.conv0.weight'].is_contiguous(memory_format=torch.channels_last)
    assert_losses_close(ref, out, 1e-5)
    assert mean_diff(ref, out) < 1e-6

def test_fused_adam_same_losses(faithful, tmp_path, monkeypatch):
    seen = []
    adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, 'Adam', lambda *a, **k: seen.append(k.get('fused')) or adam(*a, **k))
    out = fast_run(tmp_path, fused_adam=1)
    assert seen == [True, True]
    assert_losses_close(faithful, out, 1e-5)
    assert mean_diff(faithful, out) < 1e-6

def test_checkpointing_same_losses(faithful, tmp_path):
    out = fast_run(tmp_path, checkpointing=1)  # dropout 0.13 is on: the recomputation must replay its masks
    assert_losses_close(faithful, out, 1e-6)
    assert mean_diff(faithful, out) < 1e-7

def test_bf16_close_but_not_equal(faithful, tmp_path):
    out = fast_run(tmp_path, precision='bf16')
    assert_losses_close(faithful, out, 0.05)
    assert out['stats'][0]['loss_G'] != faithful['stats'][0]['loss_G']  # autocast did run in bf16

def test_tf32_is_a_cuda_switch():
    if not torch.cuda.is_available():
        pytest.skip('TF32 only changes CUDA matmuls/convolutions; no GPU here')

def test_checkpoint_unet_blocks_saves_memory_and_replays_dropout():
    import edm_nets
    torch.manual_seed(0)
    net = edm_nets.build_preset('cifar10-32x32-uncond-vp', dropout=0.5, **json.loads(TINY_JSON)).train()
    with torch.no_grad():  # EDM's near-zero conv1 init would hide the dropout (it sits just before conv1)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, sigma = torch.randn(2, 3, 32, 32, requires_grad=True), torch.full([2, 1, 1, 1], 1.5)

    def fwd_bwd(net):
        n = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.__setitem__(0, n[0] + 1) or t, lambda t: t):
            torch.manual_seed(3)
            y = net(x, sigma)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        return y.detach(), gx, n[0]

    y0, g0, n0 = fwd_bwd(net)
    torch.manual_seed(4)
    assert not torch.allclose(net(x, sigma), y0, rtol=1e-3)  # the dropout masks matter
    y1, g1, n1 = fwd_bwd(sid.checkpoint_unet_blocks_(net))
    assert n1 < n0 / 3  # only the block inputs are kept
    assert torch.equal(y0, y1) and torch.allclose(g0, g1, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # without grad the plain forward runs
        torch.manual_seed(3)
        assert torch.equal(net(x, sigma), y0)

@slow
def test_compile_same_losses_toy(tmp_path):
    # ~45 s of compilation on a CPU. The toy MLP has no dropout: compiled dropout draws other masks than eager
    # (same distribution), so only a dropout-free run can match number for number. The image nets take ~6 min
    # to compile on one CPU thread, too long even for the slow suite.
    ref = run_ddp(toy_cfg(tmp_path / 'eager', 2))
    out = run_ddp(toy_cfg(tmp_path / 'compiled', 2, compile=1))
    assert_losses_close(ref, out, 1e-4)

def test_fast_options_reject_other_values():
    for k in ('channels_last', 'fused_adam', 'compile', 'checkpointing'):
        with pytest.raises(ValueError, match='must be 0 or 1'):
            sid.make_config({'dataset': 'cifar10', k: 2})

#----------------------------------------------------------------------------
# bench.py times sid.iterate(), the loop train() runs: its first iteration reproduces train()'s logged losses.

def test_bench_iteration_matches_train(tmp_path):
    import bench
    cfg = sid.make_config(img_cfg(tmp_path / 'train', 1, batch=4, batch_gpu=4, lr=1e-5, glr=1e-5))  # bench's lr
    sid.train(cfg)
    e = stats(cfg.outdir)[0]
    _, it = bench.sid_iterations('sid', 'fp32', 4, torch.device('cpu'), str(tmp_path / 'bench'), net_overrides=TINY_JSON)
    out = bench.run_iteration(it)
    loss_psi, loss_G = float(out.loss_fake), float(out.loss_G)
    assert math.isclose(loss_psi, e['loss_fake'], rel_tol=1e-6) and math.isclose(loss_G, e['loss_G'], rel_tol=1e-6)


#============================================================================
# SiDA and SiD²A on the toy (mixture samples as the real data).

def _toy_end_quality(cfg):
    with contextlib.redirect_stdout(io.StringIO()):
        _, G_ema, _ = sid.train(cfg)
    z = 2.5 * torch.randn(4000, 2, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return sid.toy_quality(sid.generate(G_ema, z, None, 2.5), sid.ToyMixture())

def test_toy_sida_keeps_quality_of_sid_and_sid2a_starts_from_sid(tmp_path):
    base = dict(dataset='toy', duration_mimg=0.1, snap_kimg=100, tick_kimg=50)
    q_sid = _toy_end_quality(sid.make_config(dict(base, outdir=str(tmp_path / 'sid'))))
    cfg = sid.make_config(dict(base, method='sida', outdir=str(tmp_path / 'sida')))
    assert (cfg.alpha, cfg.sida_warmup_kimg, cfg.sida_mix_kimg) == (1.0, 5, 10)
    q_sida = _toy_end_quality(cfg)
    assert q_sida[1] == 8 and q_sida[0] <= 1.25 * q_sid[0] + 1e-4, (q_sida, q_sid)
    # SiD²A: G starts from the SiD generator; a short run keeps its quality (G frozen during the warm-up)
    cfg = sid.make_config(dict(base, method='sida', duration_mimg=0.01, init_generator=str(tmp_path / 'sid'),
                               sida_warmup_kimg=100, outdir=str(tmp_path / 'sid2a')))
    q_2a = _toy_end_quality(cfg)
    assert q_2a[0] == pytest.approx(q_sid[0], rel=0.05) and q_2a[1] == 8

if __name__ == '__main__':  # the torchrun worker of the DDP section
    _driver(sys.argv[1])
