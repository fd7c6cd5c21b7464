# Tests for edm_nets.py: network structure vs the official EDM configs, SiDA logits, precision paths, the
# safe checkpoint loader (fixtures written at test time in EDM's persistence format), download, the EDM
# sampler (against a closed-form Gaussian denoiser) and the augmentation pipe. Offline and CPU-only.

import contextlib
import http.server
import io
import math
import os
import pickle
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import torch

import edm_nets

slow = pytest.mark.skipif(not os.environ.get('SID_SLOW'), reason='set SID_SLOW=1')
torch.set_num_threads(1)

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
    loaded = edm_nets.load_edm_pickle(str(tmp_path / 'net.pkl'))
    assert isinstance(loaded, edm_nets.EDMPrecond) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.checkpoint_info['class_name'] == 'EDMPrecond'
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
    assert_same_net(net, edm_nets.load_edm_pickle(str(tmp_path / 'b.pkl')), 'cifar')


def test_loader_never_runs_module_src(tmp_path):
    marker = tmp_path / 'marker'
    src = f'open({str(marker)!r}, "w").write("ran")\nraise SystemExit("module_src was executed")\n'
    net = tiny_net('cifar10-32x32-uncond-vp')
    write_edm_pickle(tmp_path / 'net.pkl', net, module_src=src)
    loaded = edm_nets.load_edm_pickle(str(tmp_path / 'net.pkl'))
    assert not marker.exists()
    assert len(loaded.checkpoint_info['module_src_sha1']) == 40


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
    with pytest.raises(RuntimeError, match=f'refusing to load global {global_name}'):
        edm_nets.load_edm_pickle(str(tmp_path / 'evil.pkl'))
    assert not marker.exists()
    # The same payload inside the network record is refused too.
    write_edm_pickle(tmp_path / 'evil2.pkl', net, extra=dict(ema=dict(state=dict(_modules=dict(x=make(marker))))))
    with pytest.raises(RuntimeError, match='refusing to load global'):
        edm_nets.load_edm_pickle(str(tmp_path / 'evil2.pkl'))
    assert not marker.exists()


def test_loader_strict_and_clear_errors(tmp_path):
    net = tiny_net('cifar10-32x32-cond-vp')
    # A weight missing from the checkpoint -> strict loading fails with the key named.
    del net.model.map_layer1._parameters['bias']
    write_edm_pickle(tmp_path / 'a.pkl', net)
    with pytest.raises(RuntimeError, match='missing keys.*map_layer1.bias'):
        edm_nets.load_edm_pickle(str(tmp_path / 'a.pkl'))
    # init_kwargs that do not match the weights.
    net = tiny_net('cifar10-32x32-cond-vp')
    net.init_kwargs['label_dim'] = 0
    write_edm_pickle(tmp_path / 'b.pkl', net)
    with pytest.raises(RuntimeError, match='unexpected keys.*map_label'):
        edm_nets.load_edm_pickle(str(tmp_path / 'b.pkl'))
    # No 'ema'.
    with fake_edm_modules():
        (tmp_path / 'c.pkl').write_bytes(pickle.dumps(dict(loss_fn=None)))
    with pytest.raises(RuntimeError, match='no "ema"'):
        edm_nets.load_edm_pickle(str(tmp_path / 'c.pkl'))
    with pytest.raises(FileNotFoundError):
        edm_nets.load_edm_pickle(str(tmp_path / 'missing.pkl'))


def test_loader_own_torch_checkpoints(tmp_path):
    net = tiny_net('cifar10-32x32-cond-vp')
    for key in ('G_ema', 'ema'):
        torch.save({key: net.state_dict(), 'net_kwargs': net.init_kwargs, 'kimg': 3}, tmp_path / f'{key}.pt')
        assert_same_net(net, edm_nets.load_edm_pickle(str(tmp_path / f'{key}.pt')), 'cifar')
    torch.save({'G': net.state_dict(), 'net_kwargs': net.init_kwargs}, tmp_path / 'bad.pt')
    with pytest.raises(RuntimeError, match='"ema" or "G_ema"'):
        edm_nets.load_edm_pickle(str(tmp_path / 'bad.pt'))
    torch.save({'ema': net}, tmp_path / 'module.pt')  # a whole module is refused by weights_only loading
    with pytest.raises(RuntimeError, match='cannot read checkpoint safely'):
        edm_nets.load_edm_pickle(str(tmp_path / 'module.pt'))

@slow
def test_official_cifar_teacher_loads_and_samples():
    # Needs the real checkpoint (downloaded once into $SID_CACHE, ~225 MB) and ~1-2 CPU minutes.
    name = 'cifar10-32x32-uncond-vp'
    net = edm_nets.load_edm_pickle(name)
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
    assert path == str(cache / 'teacher.pkl') and open(path, 'rb').read() == b'abc' * 1000
    src.unlink()  # cached now: no second fetch
    assert edm_nets.download(src.as_uri(), cache_dir=str(cache)) == path


def test_download_http_full_truncated_and_offline(tmp_path, monkeypatch):
    body = os.urandom(3 << 20)
    monkeypatch.setenv('SID_CACHE', str(tmp_path / 'cache'))
    with http_server({'/edm-x.pkl': (body, len(body)), '/short.pkl': (b'0123456789', 1000)}) as base:
        path = edm_nets.download(base + '/edm-x.pkl')
        assert path == str(tmp_path / 'cache' / 'edm-x.pkl') and open(path, 'rb').read() == body
        with pytest.raises(RuntimeError, match=r'could not download .*/short\.pkl.*truncated.*cache/short\.pkl.*--teacher'):
            edm_nets.download(base + '/short.pkl')
        with pytest.raises(RuntimeError, match='404'):
            edm_nets.download(base + '/missing.pkl')
        port = base.rsplit(':', 1)[1]
    assert sorted(os.listdir(tmp_path / 'cache')) == ['edm-x.pkl']  # no partial or temporary files left
    with pytest.raises(RuntimeError, match=rf'could not download http://127.0.0.1:{port}/gone.pkl.*--teacher PATH'):
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
