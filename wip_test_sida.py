"""Tests for wip_sida.py: real-data loaders and SiDA losses (tiny, CPU, seconds)."""
import io, json, math, os, pickle, sys, tarfile, types, zipfile
import numpy as np
import PIL.Image
import pytest
import torch
import sid as S

torch.set_num_threads(1)

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
    images, onehot = S.load_image_dataset(tmp_path / 'c.tar.gz')
    assert images.dtype == torch.uint8 and images.shape == (15, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(data))  # batches 1..5 in order, test_batch ignored
    assert onehot.dtype == torch.float32 and onehot.shape == (15, 10)
    assert onehot.argmax(1).tolist() == labels and torch.equal(onehot.sum(1), torch.ones(15))

def test_cifar_word_downloads_lazily(tmp_path, monkeypatch):
    _cifar_tar(tmp_path / 'c.tar.gz')
    urls = []
    fake = types.SimpleNamespace(download=lambda url: urls.append(url) or str(tmp_path / 'c.tar.gz'))
    monkeypatch.setitem(sys.modules, 'edm_nets', fake)
    assert S.load_image_dataset('cifar10')[0].shape == (15, 3, 32, 32)
    assert urls == ['https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz']

class _Evil:
    def __init__(self, cmd): self.cmd = cmd
    def __reduce__(self): return (os.system, (self.cmd,))

def test_cifar_refuses_foreign_globals(tmp_path):
    flag = tmp_path / 'pwned'
    _cifar_tar(tmp_path / 'c.tar.gz', payload=_Evil(f'touch {flag}'))
    with pytest.raises(ValueError, match='refusing to unpickle global .*system'):
        S.load_image_dataset(tmp_path / 'c.tar.gz')
    assert not flag.exists()

def test_cifar_truncated(tmp_path):
    _cifar_tar(tmp_path / 'c.tar.gz', per_batch=50)
    blob = (tmp_path / 'c.tar.gz').read_bytes()
    (tmp_path / 't.tar.gz').write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match='not a readable CIFAR-10'):
        S.load_image_dataset(tmp_path / 't.tar.gz')

@pytest.mark.parametrize('kind', ['zip', 'folder'])
def test_edm_dataset(tmp_path, kind):
    files, chw, ys = _edm_files()
    meta = {'labels': [[n, y] for n, y in zip(files, ys)]}
    path = tmp_path / ('d.zip' if kind == 'zip' else 'd')
    (_write_zip if kind == 'zip' else _write_folder)(path, files, meta)
    images, onehot = S.load_image_dataset(path)
    assert torch.equal(images, torch.from_numpy(chw))  # sorted by name
    assert onehot.shape == (5, 3) and onehot.argmax(1).tolist() == ys

def test_folder_grayscale_without_labels(tmp_path):
    files, chw, _ = _edm_files(n=3, rgb=False)
    _write_folder(tmp_path, files)
    images, labels = S.load_image_dataset(tmp_path)
    assert images.shape == (3, 1, 8, 8) and torch.equal(images, torch.from_numpy(chw))
    assert labels.shape == (3, 0) and labels.dtype == torch.float32

def test_dataset_errors(tmp_path):
    files, _, ys = _edm_files(n=3)
    _write_zip(tmp_path / 'missing.zip', files, {'labels': [[n, 0] for n in files] + [['00000/gone.png', 1]]})
    with pytest.raises(ValueError, match='not in the dataset, e.g. 00000/gone.png'):
        S.load_image_dataset(tmp_path / 'missing.zip')
    _write_zip(tmp_path / 'unlabelled.zip', files, {'labels': [[n, 0] for n in list(files)[:2]]})
    with pytest.raises(ValueError, match='no label for 1 image.*img00000002'):
        S.load_image_dataset(tmp_path / 'unlabelled.zip')
    blob = (tmp_path / 'missing.zip').read_bytes()
    (tmp_path / 'trunc.zip').write_bytes(blob[:len(blob) - 40])
    with pytest.raises(ValueError, match='unreadable dataset'):
        S.load_image_dataset(tmp_path / 'trunc.zip')
    files['00000/img00000009.png'] = _png(np.zeros((16, 16, 3), np.uint8))
    _write_folder(tmp_path / 'mixed', files)
    with pytest.raises(ValueError, match='img00000009.png is \\(3, 16, 16\\)'):
        S.load_image_dataset(tmp_path / 'mixed')
    with pytest.raises(FileNotFoundError):
        S.load_image_dataset(tmp_path / 'nope.zip')

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
