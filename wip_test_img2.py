"""Tests of the image toy (toy.ImageToy) and of SIGN's two fixes (data-free L_rec, frozen copy's mode).
    python -m pytest -q wip_test_img2.py            # SID_SLOW=1 also runs the image-toy training runs"""
import os
import numpy as np
import pytest
import torch
import sid, toy

@pytest.fixture(scope='module')
def world():
    return toy.ImageToy(per_class=4, fit_steps=0)

def brute_force(X, x, sigma, allowed=None):
    """D(x; sigma) one sample at a time in numpy float64 with an explicit log-sum-exp."""
    out = []
    for k, v in enumerate(x.reshape(len(x), -1).double().numpy()):
        logw = -((v[None] - X) ** 2).sum(1) / (2 * float(sigma[k]) ** 2)
        logw = np.where(allowed[k], logw, -np.inf) if allowed is not None else logw
        w = np.exp(logw - logw.max())
        out.append((w / w.sum()) @ X)
    return np.stack(out).reshape(x.shape)

def test_denoiser_matches_brute_force(world):
    X, g = world.teacher.X.numpy(), torch.Generator().manual_seed(0)
    x0, c = world.sample(6, g)
    x = x0 + 0.7 * torch.randn(x0.shape, generator=g)
    chunked = toy.EmpiricalDenoiser(world.images, world.labels, chunk_elems=2 * len(X))  # 2 rows per chunk
    allowed = (c.numpy() @ world.labels.numpy().T) > 0.5
    for sigma in (0.3, 1.0, 4.0, torch.tensor([0.2, 0.5, 1, 2, 5, 30.0]).reshape(-1, 1, 1, 1)):
        s = np.broadcast_to(np.asarray(sigma).reshape(-1), 6)
        for net in (world.teacher, chunked):
            np.testing.assert_allclose(net(x, sigma).double().numpy(), brute_force(X, x, s), atol=2e-6)
        np.testing.assert_allclose(world.teacher(x, sigma, c).double().numpy(), brute_force(X, x, s, allowed), atol=2e-6)

def test_denoiser_limits_and_classes(world):
    X, x0 = world.teacher.X, world.images.float() / 127.5 - 1
    x = x0 + 0.02 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    assert (world.teacher(x, 1e-3) - x0).abs().max() < 1e-6                           # sigma -> 0: nearest image
    assert (world.teacher(x, 1e5) - X.mean(0).reshape(x0.shape[1:]).float()).abs().max() < 1e-5   # -> inf: mean
    other = world.labels.roll(1, dims=1)                                               # another class's label:
    d = world.teacher(x, 1e-3, other).flatten(1).double()                              # that class's nearest image
    assert torch.equal(world.labels[torch.cdist(d, X).argmin(1)], other)
    cls_mean = (other @ world.labels.T / other.sum(0)[0]).double() @ X
    assert (world.teacher(x, 1e5, other).flatten(1).double() - cls_mean).abs().max() < 1e-5

def test_quality_exact_far_better_than_noise_or_blur(world):
    x, c = world.sample(64, torch.Generator().manual_seed(2))
    q = toy.image_quality(world.teacher.X, world.teacher.set_labels, x, c)
    assert q['fidelity'] < 1e-6 and q['class_acc'] == 1 and abs(q['energy']) < 0.06 and q['coverage'] > 0.8
    noise = toy.image_quality(world.teacher.X, world.teacher.set_labels, 0.5 * torch.randn(x.shape), c)
    blur = toy.image_quality(world.teacher.X, world.teacher.set_labels, world.teacher(x, 1e5, c), c)  # class means
    assert noise['energy'] > 0.3 and blur['energy'] > 0.05 and blur['coverage'] < 0.3
    assert blur['sharpness'] < 0.7 * q['sharpness'] and noise['class_acc'] < 0.6

#----------------------------------------------------------------------------
# SIGN fixes. f(x) = A x as a one-layer "generator" with sid.generate's call convention.

class Linear(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())
    def forward(self, x, sigma, labels=None):
        return x @ self.A.T

def train_data_free(x_rec_flawed, steps=300):
    """sign_student_loss data-free with lambda_rec = lambda_idem, L_flow off; -> (A0, A), A0 = 0.8 I + noise.
    x_rec_flawed: pass x = sg f(z) explicitly, which is what the data-free L_rec used to do."""
    g = torch.Generator().manual_seed(1)
    A0 = 0.8 * torch.eye(4) + 0.05 * torch.randn(4, 4, generator=g)
    G = Linear(A0)
    G_bar, opt = sid.frozen_copy(G), torch.optim.Adam(G.parameters(), lr=1e-2)
    zero_net = lambda x, s, c: 0 * x
    for _ in range(steps):
        sid.refresh_frozen_(G_bar, G)
        x_g = sid.generate(G, torch.randn(64, 4, generator=g), None, 2.5)
        t = sid.sign_student_loss(G, G_bar, zero_net, zero_net, x_g, None, torch.ones(64, 1), torch.zeros(64, 4),
                                  x=x_g.detach() if x_rec_flawed else None, lam_flow=0)
        opt.zero_grad(); (t['idem'] + t['rec']).mean().backward(); opt.step()
    return A0, G.A.detach()

def fixed_dim(A):
    """Dimension of f's fixed-point set {x: A x = x}, numerically (singular values of A - I below 0.05)."""
    return int((torch.linalg.svdvals(A - torch.eye(len(A))) < 0.05).sum())

def test_data_free_sign_does_not_grow_the_fixed_points_towards_the_identity():
    A0, A = train_data_free(False)
    assert fixed_dim(A0) == 0 and fixed_dim(A) == 0 and (A - torch.eye(4)).norm() > (A0 - torch.eye(4)).norm()
    _, A_flawed = train_data_free(True)  # control: the old data-free L_rec = d(f(sg f(z)), sg f(z)) drives A to I
    assert fixed_dim(A_flawed) == 4 and (A_flawed - torch.eye(4)).abs().max() < 0.01

def test_frozen_copy_is_the_same_function_with_dropout():
    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 4))
    G_bar, x = sid.frozen_copy(G.eval()), torch.randn(8, 4)
    G.train()
    sid.refresh_frozen_(G_bar, G)
    assert G_bar.training and not any(p.requires_grad for p in G_bar.parameters())
    assert not torch.equal(G(x), G(x))                          # dropout is on ...
    torch.manual_seed(3); a = G(x)
    torch.manual_seed(3); b = G_bar(x)
    assert torch.equal(a, b)                                    # ... and the copy draws the same masks
    sid.refresh_frozen_(G_bar, G.eval())
    assert not G_bar.training and torch.equal(G_bar(x), G(x))

#----------------------------------------------------------------------------
# Whole runs on the image toy (minutes of CPU each: SID_SLOW=1).

def run_world(tmp_path, method, **kw):
    cfg = sid.make_config(dict(dataset='toy-images', method=method, outdir=str(tmp_path / method), **kw))
    for it in sid.iterate(cfg):
        pass
    return it

def figures(out, which):
    line = out.split(which)[1].split(' (exact')[0]
    return {k.strip(): float(v) for k, v in (part.strip().rsplit(' ', 1) for part in line.split(','))}

@pytest.mark.skipif(not os.environ.get('SID_SLOW'), reason='SiD on the image toy takes ~2-3 min of CPU (SID_SLOW=1)')
def test_sid_learns_the_image_toy(tmp_path, capsys):
    run_world(tmp_path, 'sid')
    out = capsys.readouterr().out
    q0, q1 = figures(out, 'toy start: '), figures(out, 'toy end:   ')
    # seen (preset, 1 thread): sharpness 0.091 -> 0.135 (exact 0.134), fidelity 0.303 -> 0.239, energy 0.040 -> 0.038
    assert q1['sharpness'] > q0['sharpness'] + 0.03 and q1['fidelity'] < q0['fidelity'] - 0.04
    assert q1['energy'] < q0['energy'] + 0.01 and q1['class acc'] > 0.95
    assert (tmp_path / 'sid' / 'toy-images.png').stat().st_size > 3000
