"""Shared helpers of the tests: one family of stand-in networks, one tiny-config builder, one run
and one command-line helper, and small file builders (datasets, a detector stand-in).

Test files import what they need from here (`from conftest import Stub, cli`); pytest loads it
first.
"""
import collections
import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edm_nets
import runs
import sid
import toy

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW = bool(os.environ.get('SID_SLOW'))
slow = pytest.mark.skipif(not SLOW, reason='set SID_SLOW=1')
torch.set_num_threads(1)


def pytest_configure(config):
    # the TorchScript detector stand-ins of the FID tests
    config.addinivalue_line('filterwarnings', 'ignore:.*torch.jit.*:DeprecationWarning')

#----------------------------------------------------------------------------
# ONE family of stand-in networks: EDMPrecond's call convention with a closed-form denoiser.

class Stub(nn.Module):
    """D(x; sigma) = fn(self, x, sigma) in closed form (keyword tensors become its parameters);
    SiDA logits x[:, :1] + off (off_enc: encoder_only; leaves, for d loss / d logit); every call
    recorded."""
    def __init__(self, fn, off=None, off_enc=None, img_shape=(2,), **params):
        super().__init__()
        for k, v in params.items():
            setattr(self, k, nn.Parameter(torch.as_tensor(v, dtype=torch.float64).clone()))
        self.fn, self.off, self.off_enc, self.calls = fn, off, off_enc, []
        self.img_shape, self.label_dim, self.sigma_data = list(img_shape), 0, 0.5

    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_logits=False,
                encoder_only=False):
        self.calls.append(dict(x=x.detach().clone(), sigma=sigma, labels=class_labels,
                               aug=augment_labels, return_logits=return_logits,
                               encoder_only=encoder_only, x_graph=x.requires_grad))
        if encoder_only:
            return x[:, :1] + self.off_enc
        D = self.fn(self, x, sigma)
        if return_logits:
            return D, x[:, :1] + self.off
        return D


def affine(a, b=0.0, c=0.0, **kw):
    """D = a x + b x^2 + c sigma."""
    return Stub(lambda m, x, s: m.a * x + m.b * x ** 2 + m.c * s, a=a, b=b, c=c, **kw)


def gaussian(mu, s, **kw):
    """The exact denoiser of N(mu, s^2)."""
    return Stub(lambda m, x, sig: mu + s ** 2 / (s ** 2 + sig ** 2) * (x - mu), **kw)


def linear(A, **kw):
    """f(x) = x A^T whatever sigma: the IGN closed forms' student."""
    return Stub(lambda m, x, s: x @ m.A.T, A=A, **kw)


def objective_state(cfg=None, **kw):
    """What an objective reads of sid.State (the tests' stand-in for a set-up run): cfg, n, the
    networks, no augmentation."""
    base = dict(cfg=cfg or sid.Config(), n=4, device=torch.device('cpu'), zero_aug=None, pipe=None,
                cur_nimg=0)
    return types.SimpleNamespace(**{**base, **kw})

#----------------------------------------------------------------------------
# Tiny runs: a config, networks, a whole run with its console captured, the command line.

NET = json.dumps(dict(model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[]))
# a tiny EDM2 teacher on 4x8x8 latents (64x64 pixels through a VAE), 1000 classes, logvar head
EDM2_NET = json.dumps(dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                           attn_resolutions=[4], channels_per_head=16, logvar_channels=8))
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec('diffusers') is None,
                                     reason='diffusers not installed (optional: pip install '
                                            'diffusers)')


def cfg_for(outdir, kind='cifar10', iters=2, **kw):
    """toy: batch 64 in 2 rounds of 32; images: a random ~80k-parameter teacher, batch 4 in 2 rounds
    of 2; one tick per iteration, a snapshot at the end."""
    if kind == 'toy':
        base = dict(dataset='toy', batch=64, batch_gpu=32)
    else:
        base = dict(dataset=kind, teacher='random', net_overrides=NET, batch=4, batch_gpu=2,
                    device='cpu', lr=1e-3, glr=1e-3)
    b = {**base, **kw}['batch']
    run = dict(duration_mimg=iters * b / 1e6, tick_kimg=b / 1e3, snap_kimg=iters * b / 1e3,
               outdir=str(outdir))
    return sid.make_config({**run, **base, **kw})


def perturb_copy(net, seed=1, scale=0.2):
    """A copy with every parameter moved randomly: EDM zero-inits output layers, which would hide
    the weights."""
    net, g = copy.deepcopy(net), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def nets_for(cfg, perturb=True):
    """(f_phi, G, f_psi); the toy without its 5 s pretraining; perturb: shake the teacher and copy
    it into G and f_psi."""
    if cfg.dataset == 'toy':
        torch.manual_seed(0)
        G = edm_nets.EDMPrecond(img_resolution=0, img_channels=2, model_type='ToyMLP',
                                dropout=cfg.dropout)
        return toy.ToyMixture().eval().requires_grad_(False), G, copy.deepcopy(G)
    f_phi, G, f_psi = runs.load_networks(cfg, None, torch.device('cpu'))
    if perturb:
        f_phi = perturb_copy(f_phi, 1, 0.05)
        G.load_state_dict(f_phi.state_dict())
        f_psi.load_state_dict(f_phi.state_dict())
    return f_phi, G, f_psi


def edm2_nets(cfg, perturb=True):
    """(f_phi, G, f_psi) of an EDM2 config; perturb: the teacher's weights shaken first (EDM2
    zero-inits its gains, which would hide the weights), then G and f_psi rebuilt from it."""
    f_phi, G, f_psi = nets = runs.load_networks(cfg, None, torch.device('cpu'))
    if perturb:
        teacher = perturb_copy(f_phi, 1, 0.05)
        nets = sid.build_networks(cfg, teacher, torch.device('cpu'), runs.net_overrides(cfg))
    return nets


def loop_state(cfg, nets=None):
    """sid.setup on the config's networks: the loop alone, no driver, no files."""
    return sid.setup(cfg, nets if nets is not None else nets_for(cfg))


def run_quiet(cfg, nets=None):
    """runs.train with its console captured -> (run, s, stdout)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        run, s = runs.train(cfg, nets if nets is not None else nets_for(cfg))
    return run, s, out.getvalue()


def cli(*args, sub=False):
    """`python sid.py ARGS` -> (returncode, stdout, stderr): runs.main in this process (the
    default), or a subprocess."""
    args = [str(a) for a in args]
    if sub:
        return subprocess.run([sys.executable, os.path.join(HERE, 'sid.py'), *args], cwd=HERE,
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS='1'))
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runs.main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_one_line_error(r, msg):
    lines = r.stderr.strip().splitlines()
    ok = r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ')
    assert ok and msg in lines[0], (r.returncode, r.stderr[-2000:])


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def read_stats(outdir):
    with open(os.path.join(outdir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]


def load_state(outdir):
    return torch.load(os.path.join(outdir, 'training-state.pt'), weights_only=True)


def write_bytes(path, data):
    with open(path, 'wb') as f:
        f.write(data)
    return str(path)


def draws(B=6, shape=(3, 4, 4), seed=0):
    """(x_g, sigma, noise, logit offsets) in float64."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    return r(B, *shape), (r(B, *[1] * len(shape)) * 1.2 - 1.2).exp(), r(B, *shape), \
        3 * r(B, 1, *shape[1:])


def softplus(v):
    """BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l)."""
    return math.log1p(math.exp(v)) if v < 30 else v


def sigmoid(v):
    return 1 / (1 + math.exp(-v))

#----------------------------------------------------------------------------
# Shared by the tests of the networks, checkpoints, data and fid: tiny official configs, files in
# EDM's dataset layouts, a pickle payload that would run code, a TorchScript FID detector stand-in.

# NCSN++ (EDM's ncsnpp architecture) on top of a DDPM++ preset
NCSNPP = dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
              resample_filter=[1, 3, 3, 1])
EDM_PRESETS = [n for n, p in edm_nets.PRESETS.items()
               if p['kwargs']['model_type'] != 'EDM2UNet']
TINY = {name: dict(model_channels=16, num_blocks=1) for name in EDM_PRESETS}
# >= 64 channels: one attention head
TINY['imagenet-64x64-cond-adm'] = dict(model_channels=64, num_blocks=1, img_resolution=32)


def tiny_net(name, seed=0, randomize=True, **overrides):
    """A preset at a tiny size, in eval mode; randomize: every parameter moved (EDM zero-inits
    output layers, which would hide the weights behind them)."""
    torch.manual_seed(seed)
    net = edm_nets.build_preset(name, **{**TINY[name], **overrides}).eval()
    return perturb_copy(net, seed) if randomize else net


EDM2_TINY = dict(img_resolution=16, img_channels=4, label_dim=10, use_fp16=False,
                 model_type='EDM2UNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[8], channels_per_head=16, logvar_channels=8)


def tiny_edm2(**kw):
    """A tiny EDM2 net: 16x16x4 inputs, levels 16 and 8 (so SiDA's logits are 8x8), 10 classes,
    attention at 8x8 with 2 heads of 16 channels (channels_per_head must not exceed the narrowest
    attention width, else 0 heads, as upstream), and every gain made non-zero."""
    torch.manual_seed(0)
    net = edm_nets.EDM2Precond(**{**EDM2_TINY, **kw})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net


def net_inputs(net, batch=2, seed=1):
    """(x, sigma, one-hot labels or None, augmentation labels or None) for `net`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, *net.img_shape], generator=g)
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [batch], generator=g)]
    aug = torch.randn([batch, 9], generator=g) if net.model.map_augment is not None else None
    return x, torch.exp(torch.randn([batch, 1, 1, 1], generator=g)), labels, aug


class Evil:
    """Unpickles as fn(*args): a file that would run code if its globals were allowed."""
    def __init__(self, fn, *args):
        self.reduced = fn, args

    def __reduce__(self):
        return self.reduced


def png_bytes(arr):
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()


def edm_files(n=5, size=8, rgb=True):
    """{name: png bytes} in a subfolder as EDM's dataset_tool writes them, the arrays (C,H,W) and
    int labels."""
    rng = np.random.default_rng(1)
    shape = (size, size, 3) if rgb else (size, size)
    arrs = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]
    files = {f'00000/img{i:08d}.png': png_bytes(a) for i, a in enumerate(arrs)}
    return files, np.stack([a.transpose(2, 0, 1) if rgb else a[None] for a in arrs]), \
        [i % 3 for i in range(n)]


def write_dataset(path, files, meta=None, kind='folder'):
    files = dict(files)
    if meta is not None:
        files['dataset.json'] = json.dumps(meta).encode()
    if kind == 'zip':
        with zipfile.ZipFile(path, 'w') as zf:
            for name in reversed(list(files)):  # stored out of order: the loader must sort
                zf.writestr(name, files[name])
        return str(path)
    for name, blob in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        write_bytes(os.path.join(path, name), blob)
    return str(path)


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def latent_files(n=5, res=8, seed=1):
    """{name: .npy bytes} as EDM2's dataset_tool.py encode writes them (posterior mean and std,
    float32 [8, res, res]) and the arrays [n, 8, res, res]."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 4, (n, 4, res, res))
    std = rng.uniform(0.05, 0.5, (n, 4, res, res))
    arrs = np.concatenate([mean, std], 1).astype(np.float32)
    return {f'{i:08d}'[:5] + f'/img-mean-std-{i:08d}.npy': npy_bytes(a)
            for i, a in enumerate(arrs)}, arrs


def write_pngs(folder, n, size=8):
    """A flat folder of n random PNGs."""
    files = {k.split('/')[1]: v for k, v in edm_files(n, size)[0].items()}
    return write_dataset(folder, files)


class FidStandIn(nn.Module):
    """forward(img uint8, return_features, no_output_bias) like NVIDIA's .pt: float cast, fixed
    resize, (x-128)/128, features; else softmax class probabilities (output bias optional)."""
    def __init__(self, dim=16, classes=10):
        super().__init__()
        proj = torch.randn(48, dim, generator=torch.Generator().manual_seed(0))
        self.proj = nn.Parameter(proj, requires_grad=False)
        g = torch.Generator().manual_seed(1)
        self.out_w = nn.Parameter(3 * torch.randn(classes, dim, generator=g), requires_grad=False)
        self.out_b = nn.Parameter(torch.randn(classes, generator=g), requires_grad=False)

    def forward(self, img: torch.Tensor, return_features: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d((img.to(torch.float32) - 128) / 128, 4).flatten(1)
        features = torch.tanh(pooled @ self.proj)
        if return_features:
            return features
        logits = features @ self.out_w.T
        if not no_output_bias:
            logits = logits + self.out_b
        return torch.softmax(logits, dim=1)


def detector_file(path, dim=16):
    torch.jit.save(torch.jit.script(FidStandIn(dim)), str(path))
    return str(path)

#----------------------------------------------------------------------------
# Checkpoints in EDM's persistence format (EDM's and the official SiD/SiDA .pkl), written without
# EDM's code: a fake torch_utils.persistence exists only while pickling; our modules reduce to
# (_reconstruct_persistent_obj, (meta,)) as EDM's persistent classes do.

@contextlib.contextmanager
def fake_edm_modules():
    def _reconstruct_persistent_obj(meta):
        raise AssertionError('only used as a pickle reference')

    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    EasyDict = type('EasyDict', (dict,), dict(__module__='dnnlib.util'))
    names = ('torch_utils', 'torch_utils.persistence', 'dnnlib', 'dnnlib.util')
    fakes = {k: types.ModuleType(k) for k in names}
    fakes['torch_utils.persistence']._reconstruct_persistent_obj = _reconstruct_persistent_obj
    fakes['dnnlib.util'].EasyDict = EasyDict
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


def write_edm_pickle(path, ema, module_src='# networks.py source would be here\n', protocol=4,
                     extra=None):
    """EDM's .pkl layout: our modules reduce to (_reconstruct_persistent_obj, (meta,)) with the
    class name and state."""
    with fake_edm_modules() as (reconstruct, EasyDict):
        def reduce(obj):
            if not (isinstance(obj, nn.Module) and type(obj).__module__ == 'edm_nets'):
                return NotImplemented
            state = {**obj.__dict__, '_init_args': (),
                     '_init_kwargs': obj.__dict__.get('init_kwargs', {})}
            state.pop('init_kwargs', None)
            if 'skip_scale' in state:  # EDM stores np.float64 here, exercising the numpy globals
                state['skip_scale'] = np.float64(state['skip_scale'])
            meta = dict(type='class', version=6, module_src=module_src,
                        class_name=type(obj).__name__, state=state)
            return reconstruct, (meta,)

        dataset_kwargs = EasyDict(path='x.zip', arr=np.arange(3.0))
        snapshot = {**dict(ema=ema, augment_pipe=None, dataset_kwargs=dataset_kwargs),
                    **(extra or {})}  # extra may replace the ema record
        buf = io.BytesIO()
        pickler = type('P', (pickle.Pickler,),
                       dict(reducer_override=lambda self, obj: reduce(obj)))
        pickler(buf, protocol=protocol).dump(snapshot)
    write_bytes(path, buf.getvalue())
    return buf.getvalue()

def flip_member_byte(path, suffix):
    """The bytes of a stored zip archive with the first data byte of the member named *suffix
    flipped (its CRC then fails)."""
    blob = bytearray(open(path, 'rb').read())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    at = info.header_offset
    name_len, extra_len = struct.unpack('<HH', blob[at + 26:at + 30])  # the local header's
    blob[at + 30 + name_len + extra_len] ^= 0xFF
    return bytes(blob)


@contextlib.contextmanager
def http_server(routes, max_requests=20, max_seconds=20.0):
    """A local HTTP server on 127.0.0.1 for the download tests, started and stopped here (no
    proxy). routes: {path: bytes | ('trickle', n_bytes, seconds_per_byte) | ('endless',) |
    ('redirect', url)}; at most max_requests requests, none served longer than max_seconds.
    Yields (base URL, the list of paths requested)."""
    import http.server
    import threading
    import time
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.path)
            route = routes.get(self.path)
            if len(seen) > max_requests or route is None:
                self.send_error(404 if route is None else 503)
                return
            if isinstance(route, bytes):
                self.send_response(200)
                self.send_header('Content-Length', str(len(route)))
                self.end_headers()
                self.wfile.write(route)
                return
            if route[0] == 'redirect':
                self.send_response(302)
                self.send_header('Location', route[1])
                self.end_headers()
                return
            self.send_response(200)
            if route[0] == 'trickle':
                self.send_header('Content-Length', str(route[1]))
            self.end_headers()
            end, sent = time.monotonic() + max_seconds, 0
            with contextlib.suppress(OSError):  # the client hung up
                while time.monotonic() < end and (route[0] == 'endless' or sent < route[1]):
                    self.wfile.write(b'x' if route[0] == 'trickle' else bytes(1 << 16))
                    self.wfile.flush()
                    sent += 1
                    if route[0] == 'trickle':
                        time.sleep(route[2])

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    old = os.environ.get('no_proxy')
    os.environ['no_proxy'] = '127.0.0.1'
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}', seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=max_seconds + 5)
        if old is None:
            os.environ.pop('no_proxy', None)
        else:
            os.environ['no_proxy'] = old
#----------------------------------------------------------------------------
# EDM2's pickles (Karras et al. 2024; official SiD sida branch), written in their format without
# their code: NVIDIA's teachers (Precond, every tensor float16, with `encoder`, `loss_fn` and
# `dataset_kwargs`) and the official SiD/SiDA generators (EDM_2_Precond_Generator, float32, `ema`
# only; with use_gan=1 and force_normalization=1 every MPConv holds its weight-normalisation hook,
# pickled as the bound method getattr(mpconv, '_apply_forced_weight_normalization')).

EDM2_NAMES = {'teacher': dict(EDM2Precond='Precond', EDM2UNet='UNet'),
              'generator': dict(EDM2Precond='EDM_2_Precond_Generator',
                                EDM2UNet='UNet_EncoderDecoder')}
HOOK = '_apply_forced_weight_normalization'


class Record:
    """Another persistent object of the pickle (the encoder, the loss): class name and state."""
    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state


class BoundMethod:
    """Pickles as getattr(obj, name), as Python pickles a bound method."""
    def __init__(self, obj, name=HOOK):
        self.obj, self.name = obj, name


def encoder_record(scale=None, bias=None, vae_name='stabilityai/sd-vae-ft-mse'):
    """EDM2's StabilityVAEEncoder as its training loop pickles it (its default statistics)."""
    raw_mean = np.array([5.81, 3.25, 0.12, -2.15], np.float32)
    raw_std = np.array([4.17, 4.62, 3.71, 3.28], np.float32)
    default_scale = np.float32(0.5) / raw_std
    state = dict(vae_name=vae_name, scale=default_scale if scale is None else scale,
                 bias=-raw_mean * default_scale if bias is None else bias, batch_size=8,
                 _vae=None, _init_args=(), _init_kwargs={})
    return Record('StabilityVAEEncoder', state)


def write_edm2_pickle(path, net, kind='teacher', hooks=False, use_gan=1, force_normalization=1,
                      extra=None, kwargs=None):
    """An EDM2 .pkl of `net` (an EDM2Precond): kind 'teacher' as NVIDIA's (float16, four keys),
    'generator' as the official SiD's (`ema` only); hooks: each MPConv's pickled pre-hook."""
    net = copy.deepcopy(net).half() if kind == 'teacher' else net
    names = EDM2_NAMES[kind]
    init = {k: v for k, v in net.init_kwargs.items() if k != 'model_type'}
    if kind == 'generator':
        init.pop('logvar_channels')
        init.update(use_gan=use_gan, force_normalization=force_normalization)
    states = {}  # one state per module, as persistence pickles the module's own __dict__

    with fake_edm_modules() as (reconstruct, EasyDict):
        def reduce(obj):
            if isinstance(obj, BoundMethod):
                return getattr, (obj.obj, obj.name)
            if isinstance(obj, Record):
                meta = dict(type='class', version=6, module_src='# encoders.py\n',
                            class_name=obj.class_name, state=obj.state)
                return reconstruct, (meta,)
            if not (isinstance(obj, nn.Module) and type(obj).__module__ == 'edm_nets'):
                return NotImplemented
            if id(obj) not in states:
                state = {k: v for k, v in obj.__dict__.items()
                         if k not in ('init_kwargs', '_stamp')}
                top = isinstance(obj, edm_nets.EDM2Precond)
                state.update(_init_args=(), _init_kwargs=dict(kwargs or init) if top else {})
                if hooks and isinstance(obj, edm_nets.MPConv):
                    state['_forward_pre_hooks'] = collections.OrderedDict({0: BoundMethod(obj)})
                states[id(obj)] = state
            meta = dict(type='class', version=6, module_src='# networks_edm2.py\n',
                        class_name=names.get(type(obj).__name__, type(obj).__name__),
                        state=states[id(obj)])
            return reconstruct, (meta,)

        snapshot = dict(ema=net)
        if kind == 'teacher':
            loss = Record('EDM2Loss', dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5))
            snapshot.update(encoder=encoder_record(), loss_fn=loss, dataset_kwargs=EasyDict(
                class_name='training.dataset.ImageFolderDataset', path='img512-sd.zip',
                use_labels=True))
        snapshot.update(extra or {})
        buf = io.BytesIO()
        pickler = type('P', (pickle.Pickler,),
                       dict(reducer_override=lambda self, obj: reduce(obj)))
        pickler(buf, protocol=4).dump(snapshot)
    write_bytes(path, buf.getvalue())
    return buf.getvalue()
