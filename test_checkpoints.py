"""Tests of checkpoints: the reader on fixtures in EDM's and EDM2's persistence formats, our own
snapshots, refusals, network-kwargs checks, and hostile files of every reader in one bounded
subprocess."""
import collections
import copy
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import types
import zipfile
import zlib

import numpy as np
import pytest
import torch

import checkpoints
import edm_nets
import fileio
import releases
import runs
import sid
from conftest import (HERE, NCSNPP, BoundMethod, Evil, Record, assert_one_line_error,
                      encoder_record, fake_edm_modules, net_inputs, png_bytes, slow, states_equal,
                      tiny_edm2, tiny_net, write_bytes, write_dataset, write_edm2_pickle,
                      write_edm_pickle)


def assert_same_net(a, b):
    assert a.init_kwargs == b.init_kwargs and list(a.state_dict()) == list(b.state_dict())
    assert states_equal(a, b)
    x, sigma, labels, aug = net_inputs(a)
    assert torch.equal(a(x, sigma, labels, aug), b(x, sigma, labels, aug))

#----------------------------------------------------------------------------
# The reader: round trips, refusals of code in the file, strict errors, our own snapshots, released
# generators by name.

@pytest.mark.parametrize('name,overrides,spelling', [
    ('cifar10-32x32-cond-vp', {}, ''), ('ffhq-64x64-uncond-vp', NCSNPP, ''),
    ('imagenet-64x64-cond-adm', {}, ''), ('cifar10-32x32-uncond-vp', {}, 'numpy.core.multiarray'),
    ('cifar10-32x32-uncond-vp', {}, 'numpy._core.multiarray')])
def test_loader_roundtrip_edm_pickle(tmp_path, name, overrides, spelling):
    net = tiny_net(name, **overrides)
    # protocol 3: globals as text lines
    raw = write_edm_pickle(tmp_path / 'net.pkl', net, protocol=3 if spelling else 4)
    if spelling:  # numpy 1 and 2 spell the array module differently
        modules = (b'numpy._core.multiarray', b'numpy.core.multiarray')
        found = [m for m in modules if b'c' + m + b'\nscalar\n' in raw][0]
        raw = raw.replace(b'c' + found + b'\n', b'c' + spelling.encode() + b'\n')
        assert raw.count(b'c' + spelling.encode() + b'\n') >= 2  # scalar and _reconstruct
        write_bytes(tmp_path / 'net.pkl', raw)
    loaded, info = checkpoints.load_checkpoint(str(tmp_path / 'net.pkl'))
    assert isinstance(loaded, edm_nets.EDMPrecond) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert_same_net(net, loaded)


@pytest.mark.parametrize('make,global_name', [
    (lambda m: Evil(os.system, f'touch {m}'), f'{os.system.__module__}.system'),
    (lambda m: Evil(eval, f'open({str(m)!r}, "w")'), 'builtins.eval'),
    (lambda m: Evil(getattr, 'text', 'upper'), 'builtins.getattr'),
    (lambda m: Evil(subprocess.Popen, ['touch', str(m)]), 'subprocess.Popen'),
    (lambda m: Evil(torch.save, {}, str(m)), 'torch.serialization.save'),
    (lambda m: Evil(np.save, str(m), np.zeros(1)), 'numpy.save')])
def test_loader_refuses_unsafe_globals_and_never_runs_module_src(tmp_path, make, global_name):
    marker, net = tmp_path / 'marker', tiny_net('cifar10-32x32-uncond-vp')
    inside_ema = dict(ema=dict(state=dict(_modules=dict(x=make(marker)))))
    for extra in (dict(evil=make(marker)), inside_ema):
        write_edm_pickle(tmp_path / 'evil.pkl', net, extra=extra)
        with pytest.raises(ValueError, match=f'evil.pkl: unsafe .*refusing to load global '
                                             f'{global_name}'):
            checkpoints.load_checkpoint(str(tmp_path / 'evil.pkl'))
        assert not marker.exists()
    source = f'open({str(marker)!r}, "w").write("ran")\nraise SystemExit("ran")\n'
    write_edm_pickle(tmp_path / 'src.pkl', net, module_src=source)
    checkpoints.load_checkpoint(str(tmp_path / 'src.pkl'))
    assert not marker.exists()


def test_loader_strict_errors_and_own_checkpoints(tmp_path):
    net = tiny_net('cifar10-32x32-cond-vp')
    del net.model.map_layer1._parameters['bias']  # a weight missing from the checkpoint
    write_edm_pickle(tmp_path / 'a.pkl', net)
    net = tiny_net('cifar10-32x32-cond-vp')
    net.init_kwargs['label_dim'] = 0  # kwargs that do not match the weights
    write_edm_pickle(tmp_path / 'b.pkl', net)
    with fake_edm_modules():
        write_bytes(tmp_path / 'c.pkl', pickle.dumps(dict(loss_fn=None)))
    for name, err, msg in (
            ('a.pkl', ValueError, 'a.pkl: weights do not match.*missing keys.*map_layer1.bias'),
            ('c.pkl', ValueError, 'c.pkl: no "ema"'),
            ('b.pkl', ValueError, 'b.pkl: weights do not match.*unexpected keys.*map_label'),
            ('missing.pkl', FileNotFoundError, 'missing.pkl')):
        with pytest.raises(err, match=msg):
            checkpoints.load_checkpoint(str(tmp_path / name))
    net = tiny_net('cifar10-32x32-cond-vp')
    for key in ('G_ema', 'ema'):
        torch.save({key: net.state_dict(), 'net_kwargs': net.init_kwargs, 'kimg': 3},
                   tmp_path / f'{key}.pt')
        assert_same_net(net, checkpoints.load_checkpoint(str(tmp_path / f'{key}.pt'))[0])
    runs.save_snapshot(str(tmp_path / 's.pt'), net, 12, sid.Config(sigma_init=1.5))
    loaded, info = checkpoints.load_checkpoint(str(tmp_path / 's.pt'))
    assert states_equal(net, loaded) and info['kimg'] == 0.012
    assert info['config']['sigma_init'] == 1.5



@pytest.mark.parametrize('name,preset', [('sid-cifar10-cond-a1.2', 'cifar10-32x32-cond-vp'),
                                         ('sid2a-imagenet64-a1.2', 'imagenet-64x64-cond-adm'),
                                         ('sida-afhqv2-64-a1', 'afhqv2-64x64-uncond-vp')])
def test_released_generator_by_name_from_the_cache(tmp_path, monkeypatch, name, preset):
    """A file in the official format where the cache keeps the release's URL loads by name (no
    network) and generates; a hostile or truncated file there is refused with one line."""
    monkeypatch.setenv('SID_CACHE', str(tmp_path))
    release = releases.resolve(name)
    cached = fileio.cache_path(release.url)
    assert cached.startswith(str(tmp_path)) and cached.endswith('-' + release.file)
    net = tiny_net(preset)
    raw = write_edm_pickle(cached, net)
    loaded, info = checkpoints.load_checkpoint(name)
    assert_same_net(net, loaded)
    assert info['release'] == name and info['path'] == cached
    x = runs.sample_images(loaded, [0, 1, 2], releases.SIGMA_INIT, 'cpu')
    assert list(x.shape) == [3, *net.img_shape] and torch.isfinite(x).all()
    write_bytes(cached, raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=re.escape(cached)) as e:
        checkpoints.load_checkpoint(name)
    assert len(str(e.value).splitlines()) == 1
    write_edm_pickle(cached, net, extra=dict(evil=Evil(os.system, 'true')))
    with pytest.raises(ValueError, match='unsafe .*refusing to load global'):
        checkpoints.load_checkpoint(name)


def test_unknown_release_names_refused_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setenv('SID_CACHE', str(tmp_path / 'cache'))
    near = 'sid-cifar10-uncond-a1.2, sid-cifar10-uncond-a1'
    for name, msg in (('sid-img512-xxs-a1', 'unknown released generator "sid-img512-xxs-a1"'),
                      ('sid-cifar10-uncond-a1.1', f'unknown released generator .*e.g. {near}')):
        with pytest.raises(ValueError, match=msg):
            checkpoints.load_checkpoint(name)
    assert not os.path.exists(tmp_path / 'cache')

def test_network_kwargs_exact_allow_list_and_ranges():
    base = dict(edm_nets.PRESETS['cifar10-32x32-cond-vp']['kwargs'])
    assert checkpoints.check_net_kwargs(base, 'f') == base
    toy = dict(model_type='ToyMLP', hidden=64, depth=3, dropout=0.1)
    assert checkpoints.check_net_kwargs(toy, 'f') == toy
    for kw, match in [(dict(model_channels='128'), 'model_channels=128 is unknown or out of range'),
                      (dict(evil=1), 'evil=1 is unknown'), (dict(model_type='Nope'), 'model_type'),
                      (dict(channel_mult=[1] * 20), 'channel_mult'),
                      (dict(label_dim=10 ** 8), 'label_dim')]:
        with pytest.raises(ValueError, match=f'f: network kwarg {match}'):
            checkpoints.check_net_kwargs(dict(base, **kw), 'f')


@slow
def test_official_cifar_teacher_loads_and_samples():  # the real checkpoint (~225 MB in $SID_CACHE)
    net, _ = checkpoints.load_checkpoint('cifar10-32x32-uncond-vp')
    z = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = edm_nets.edm_sampler(net, z)
    assert torch.isfinite(x).all() and -1.5 < x.min() and x.max() < 1.5 and 0.2 < x.std() < 0.8

#----------------------------------------------------------------------------
# EDM2's pickles (Karras et al. 2024; official SiD sida branch): NVIDIA's teachers and the official
# SiD/SiDA generators, written by conftest.write_edm2_pickle in their format without their code.

def assert_same_edm2(a, b):
    """The same outputs: denoiser, SiDA's logits and (with a head) the log-variance."""
    x, labels = torch.randn(2, 4, 16, 16), torch.eye(10)[[3, 7]]
    sigma = torch.tensor([0.4, 2.5])
    with torch.no_grad():
        head = a.logvar_channels and b.logvar_channels
        for kw in (dict(), dict(return_logits=True), dict(return_logvar=True) if head else {}):
            out_a, out_b = a(x, sigma, labels, **kw), b(x, sigma, labels, **kw)
            for u, v in zip(out_a if isinstance(out_a, tuple) else [out_a],
                            out_b if isinstance(out_b, tuple) else [out_b]):
                assert torch.equal(u, v)


def test_edm2_teacher_in_nvidias_format_loads_in_float32(tmp_path):
    net = tiny_edm2().eval()
    raw = write_edm2_pickle(tmp_path / 't.pkl', net)
    assert b'HalfStorage' in raw and b'EDM2Loss' in raw  # written as NVIDIA's: float16
    loaded, info = checkpoints.load_checkpoint(str(tmp_path / 't.pkl'))
    assert isinstance(loaded, edm_nets.EDM2Precond) and not loaded.training
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values())
    assert loaded.init_kwargs == net.init_kwargs and info['class_name'] == 'Precond'
    rounded = copy.deepcopy(net).half().float()  # NVIDIA's float16, then our float32
    assert states_equal(loaded, rounded) and not states_equal(loaded, net)
    assert_same_edm2(loaded, rounded)
    assert info['encoder']['vae_name'] == 'stabilityai/sd-vae-ft-mse'
    assert np.allclose(info['encoder']['scale'], [0.11990407, 0.10822511, 0.13477089, 0.15243903])


@pytest.mark.parametrize('use_gan,fn,forced', [(1, 1, True), (1, 0, False), (0, 0, True),
                                               (True, False, False)])
def test_edm2_official_generator_loads_hooks_inert(tmp_path, use_gan, fn, forced):
    """The official generators: 200 unet.* entries (here the tiny net's), float32, the flags mapped
    to forced weight normalisation, the pickled hooks read as inert markers."""
    G = tiny_edm2(logvar_channels=0).eval()
    raw = write_edm2_pickle(tmp_path / 'g.pkl', G, 'generator', hooks=bool(use_gan and fn),
                            use_gan=use_gan, force_normalization=fn)
    assert (b'getattr' in raw) == bool(use_gan and fn)
    marker = tmp_path / 'ran'
    loaded, info = checkpoints.load_checkpoint(str(tmp_path / 'g.pkl'))
    assert info['class_name'] == 'EDM_2_Precond_Generator' and info['encoder'] is None
    assert loaded.logvar_channels == 0 and loaded.init_kwargs['force_normalization'] is forced
    assert 'use_gan' not in loaded.init_kwargs and states_equal(loaded, G)
    assert_same_edm2(loaded, G)
    assert not marker.exists()



@pytest.mark.parametrize('name', ['sida-img512-xs-a1', 'sid-img512-xxl-a1'])
def test_edm2_released_generator_by_name_from_the_cache(tmp_path, monkeypatch, name):
    """An EDM2 release: the official generator file (EDM_2_Precond_Generator, `ema` only, the
    pickled weight-normalisation hooks of a SiDA run) where the cache keeps its URL loads by name
    with no network, and generates latents; a hostile file there is refused with one line."""
    monkeypatch.setenv('SID_CACHE', str(tmp_path))
    release = releases.resolve(name)
    assert release.network == 'edm2' and release.preset.startswith('edm2-img512-')
    cached = fileio.cache_path(release.url)
    G = tiny_edm2(logvar_channels=0).eval()
    raw = write_edm2_pickle(cached, G, 'generator', hooks=True)
    assert b'EDM_2_Precond_Generator' in raw and b'getattr' in raw
    loaded, info = checkpoints.load_checkpoint(name)
    assert isinstance(loaded, edm_nets.EDM2Precond) and states_equal(loaded, G)
    assert info['release'] == name and info['path'] == cached
    assert_same_edm2(loaded, G)
    x = runs.sample_images(loaded, [0, 1], releases.SIGMA_INIT, 'cpu')
    assert list(x.shape) == [2, 4, 16, 16] and torch.isfinite(x).all()
    write_edm2_pickle(cached, G, 'generator', extra=dict(evil=Evil(os.system, 'true')))
    with pytest.raises(ValueError, match='unsafe .*refusing to load global'):
        checkpoints.load_checkpoint(name)


@pytest.mark.parametrize('change,match', [
    (dict(extra=dict(encoder=encoder_record(scale=np.ones(4, np.float32)))),
     "latent encoder .* is not EDM2's stabilityai/sd-vae-ft-mse"),
    (dict(extra=dict(encoder=encoder_record(vae_name='other/vae'))), 'other/vae'),
    (dict(extra=dict(encoder=Record('Evil', {}))), 'not an EDM2 latent encoder'),
    (dict(kind='generator', use_gan=2), 'use_gan=2 is not a flag'),
    (dict(kind='generator', force_normalization='yes'), 'force_normalization=yes is not a flag'),
    (dict(kwargs=dict(img_resolution=16, img_channels=4, evil=1)), 'network kwarg evil=1 is'),
    (dict(kwargs=dict(img_resolution=16, img_channels=4, label_dim=10, model_channels=16,
                      channel_mult=[1, 2], resample_filter=[1, 3, 3, 1])), 'resample_filter'),
    (dict(kwargs=dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=768)),
     r'parameters \(limit 2e\+09\)')])
def test_edm2_pickles_refused_in_one_line(tmp_path, change, match):
    net = tiny_edm2(logvar_channels=0 if change.get('kind') == 'generator' else 8).eval()
    write_edm2_pickle(tmp_path / 'x.pkl', net, **change)
    with pytest.raises(ValueError, match=f'x.pkl: .*{match}'):
        checkpoints.load_checkpoint(str(tmp_path / 'x.pkl'))


@pytest.mark.parametrize('make,global_name', [
    (lambda m: Evil(os.system, f'touch {m}'), f'{os.system.__module__}.system'),
    (lambda m: BoundMethod('text', 'upper'), 'builtins.getattr'),  # getattr on anything else
    (lambda m: BoundMethod(Record('Block', {})), 'builtins.getattr'),
    (lambda m: BoundMethod(Record('MPConv', {}), 'register_forward_hook'), 'builtins.getattr'),
    (lambda m: Evil(torch.save, {}, str(m)), 'torch.serialization.save')])
def test_edm2_loader_refuses_unsafe_globals_anywhere(tmp_path, make, global_name):
    marker, net = tmp_path / 'marker', tiny_edm2().eval()
    for extra in (dict(evil=make(marker)),
                  dict(encoder=Record('StabilityVAEEncoder', dict(scale=make(marker))))):
        write_edm2_pickle(tmp_path / 'evil.pkl', net, extra=extra)
        with pytest.raises(ValueError, match=f'evil.pkl: unsafe .*refusing to load global '
                                             f'{global_name}'):
            checkpoints.load_checkpoint(str(tmp_path / 'evil.pkl'))
        assert not marker.exists()


def test_edm2_network_kwargs_and_own_snapshots(tmp_path):
    kw = dict(edm_nets.PRESETS['edm2-img512-xs']['kwargs'], logvar_channels=0, channels_per_head=64,
              channel_mult_noise=None, clip_act=None, force_normalization=False)
    assert checkpoints.check_net_kwargs(kw, 'f') == kw
    for bad, match in [(dict(force_normalization=1), 'force_normalization=1'),
                       (dict(logvar_channels=-1), 'logvar_channels'),
                       (dict(attn_balance=2), 'attn_balance'), (dict(clip_act='x'), 'clip_act'),
                       (dict(sigma_min=0.1), None)]:
        if match is None:  # an EDM argument: allowed by the common table, refused when building
            continue
        with pytest.raises(ValueError, match=f'f: network kwarg {match}'):
            checkpoints.check_net_kwargs(dict(kw, **bad), 'f')
    G = tiny_edm2(logvar_channels=0).eval()
    runs.save_snapshot(str(tmp_path / 's.pt'), G, 4, sid.Config())
    loaded, _ = checkpoints.load_checkpoint(str(tmp_path / 's.pt'))
    assert isinstance(loaded, edm_nets.EDM2Precond) and states_equal(loaded, G)
    assert_same_edm2(loaded, G)
    torch.save({'G_ema': G.state_dict(), 'net_kwargs': dict(G.init_kwargs, sigma_min=0.0)},
               tmp_path / 'b.pt')
    with pytest.raises(ValueError, match="b.pt: cannot build the network .*sigma_min"):
        checkpoints.load_checkpoint(str(tmp_path / 'b.pt'))

#----------------------------------------------------------------------------
# Hostile files (a few bytes to ~1 MB each), all read in ONE subprocess under RLIMIT_AS = 1.5 GB:
# each is refused with one line naming the file, without exhausting memory. A 60 s alarm per file
# only turns a hang into a failure (a refusal takes milliseconds; no test asserts a duration).

class TensorView:  # a view of 250M floats on a storage of 1000: set_() would grow it to 1 GB
    def __reduce__(self):
        storage = torch.storage.TypedStorage(wrap_storage=torch.zeros(1000).untyped_storage(),
                                             dtype=torch.float32, _internal=True)
        args = (storage, 0, (250_000_000,), (1,), False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


def zip_bomb(path):
    """A hand-written ~1 MB zip whose one member inflates to 1 GiB of zeros (one deflate block,
    repeated)."""
    c, chunk = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 << 20)
    # after a full flush: identical blocks
    first, again = (c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) for _ in range(2))
    data, crc, n = first + again * 1023 + c.flush(), 0, b'a.png'
    for _ in range(1024):
        crc = zlib.crc32(chunk, crc)
    local = struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 0, 8, 0, 0, crc, len(data), 1 << 30,
                        len(n), 0) + n + data
    central = struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, 8, 0, 0, crc, len(data),
                          1 << 30, len(n), 0, 0, 0, 0, 0, 0) + n
    end = struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, 1, 1, len(central), len(local), 0)
    return write_bytes(path, local + central + end)


def zip_declaring(path, members, size):
    """A zip whose central directory lists `members` entries of `size` bytes each, all pointing at
    one empty local member (the declared sizes are never read)."""
    first = b'0.png'
    local = struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 0, 0, 0, 0, 0, 0, 0, len(first), 0) + first
    central = b''
    for i in range(members):
        n = f'{i}.png'.encode()
        central += struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, 0, 0, 0, 0, size, size,
                               len(n), 0, 0, 0, 0, 0, 0) + n
    end = struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, members, members, len(central), len(local), 0)
    return write_bytes(path, local + central + end)


def torch_zip(path, edit):
    """A torch.save file of one 1000-float tensor whose data.pkl is rewritten by `edit`."""
    buf = io.BytesIO()
    torch.save({'ema': {'w': torch.zeros(1000)}, 'net_kwargs': {}}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, 'w') as dst:
        for info in src.infolist():
            blob = src.read(info)
            dst.writestr(info.filename, edit(blob) if info.filename.endswith('/data.pkl') else blob)
    return path


BIG = b'J' + struct.pack('<i', 250_000_000)  # BININT 250M, for BININT2 1000 (M\xe8\x03)


def png_header(path, w, h):  # a valid PNG header claiming w x h pixels, one tiny IDAT
    def chunk(kind, data):
        crc = struct.pack('>I', zlib.crc32(kind + data))
        return struct.pack('>I', len(data)) + kind + data + crc

    header = chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
    png = b'\x89PNG\r\n\x1a\n' + header + chunk(b'IDAT', zlib.compress(bytes(100)))
    return write_bytes(path, png + chunk(b'IEND', b''))


def labels_zip(d, name, labels):
    files = {f'{i}.png': png_bytes(np.full((8, 8, 3), i, np.uint8)) for i in range(3)}
    return write_dataset(d / f'{name}.zip', files, {'labels': labels}, 'zip')


def huge(ch):
    return dict(img_resolution=64, img_channels=3, label_dim=0, model_type='DhariwalUNet',
                model_channels=ch)


def torch_file(path, obj):
    torch.save(obj, path)
    return path


def npz_declaring(path, count):
    """An .npz whose arr_0 header says `count` uint8 images [64, 64, 3] and which holds one."""
    with zipfile.ZipFile(path, 'w') as zf, zf.open('arr_0.npy', 'w') as f:
        header = dict(descr='|u1', fortran_order=False, shape=(count, 64, 64, 3))
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(64 * 64 * 3))
    return path


def fid_args(*a):  # fid.py's command line
    return '|'.join(['fid', *map(str, a)])


def hash_bomb():  # t_{k+1} = (t_k, t_k): 2^64 leaves, as a dict key
    memo = b''.join(bytes([0x68, k, 0x68, k, 0x86, 0x94]) + (b'0' if k < 63 else b'')
                    for k in range(64))
    return b'\x80\x04})\x940' + memo + b'K\x01s.'


OBJECT_ARRAY = (b'\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ'
                + struct.pack('<i', 600_000_000) + b'\x85U\x01O\x87R.')
HOSTILE = [  # (id, reader, build(folder) -> argument, message)
    ('object-array', 'ckpt', lambda d: write_bytes(d / 'obj.pkl', OBJECT_ARRAY),
     r'obj.pkl: .*refusing numpy _reconstruct'),
    ('hash-bomb', 'ckpt', lambda d: write_bytes(d / 'hash.pkl', hash_bomb()),
     r'refusing a tuple as a dict key'),
    ('read-claim', 'ckpt',
     lambda d: write_bytes(d / 'claim.pkl', b'\x80\x04\x8e' + struct.pack('<Q', 1 << 40) + b'xyz.'),
     r'claims 1099511627776 bytes'),
    ('tensor-view', 'ckpt',
     lambda d: write_bytes(d / 'view.pkl', pickle.dumps({'ema': TensorView()}, protocol=4)),
     r'tensor view \[250000000\].*storage of 1000'),
    ('huge-kwargs', 'ckpt',
     lambda d: torch_file(d / 'huge.pt', {'ema': {}, 'net_kwargs': huge(384)}),
     r'huge.pt: weights do not match.*missing keys'),
    ('param-budget', 'ckpt', lambda d: torch_file(d / 'p.pt', {'ema': {}, 'net_kwargs': huge(768)}),
     r'p.pt: .*parameters \(limit 2e\+09\)'),
    # torch.save zips whose data.pkl lies: a storage of 250M floats in a member of 1000, a view of
    # 250M floats on that storage of 1000
    ('zip-storage-size', 'ckpt',
     lambda d: torch_zip(d / 'size.pt', lambda b: b.replace(b'M\xe8\x03t', BIG + b't', 1)),
     r'size.pt: .*storage record that does not match its data member'),
    ('zip-tensor-view', 'ckpt',
     lambda d: torch_zip(d / 'zview.pt', lambda b: b.replace(b'M\xe8\x03\x85', BIG + b'\x85', 1)),
     r'zview.pt: .*tensor view \[250000000\].*storage of 1000 elements'),
    ('zip-bomb', 'data', lambda d: zip_bomb(d / 'bomb.zip'),
     r'bomb.zip: member a.png declares 1073741824 bytes'),
    # 257 members of 256 MiB each (the most one member may declare): 64.25 GiB in all
    ('zip-total', 'data', lambda d: zip_declaring(d / 'many.zip', 257, 1 << 28),
     r'many.zip: members declare 68987912192 bytes in all \(limit 68719476736\)'),
    ('label-1e8', 'data', lambda d: labels_zip(d, 'big', [[f'{i}.png', 10 ** 8] for i in range(3)]),
     r'big.zip: dataset.json labels must be'),
    ('labels-not-list', 'data', lambda d: labels_zip(d, 'five', 5),
     r'five.zip: dataset.json labels must be a list'),
    ('labels-not-pairs', 'data', lambda d: labels_zip(d, 'pairs', [['0.png']]),
     r'pairs.zip: dataset.json labels must be a list of \[name, int'),
    ('png-9000', 'image', lambda d: png_header(d / 'big9000.png', 9000, 9000),
     r'9000x9000 pixels exceeds the limit'),
    ('png-12000', 'image', lambda d: png_header(d / 'big12000.png', 12000, 12000),
     r'big12000.png: unreadable image \(DecompressionBombWarning'),
    ('png-100000', 'image', lambda d: png_header(d / 'big100000.png', 100000, 100000),
     r'big100000.png:.*(exceeds|bomb)'),
    # an OpenAI-style reference batch whose arr_0 header declares 10^9 images of 64x64
    ('npz-count', 'npz', lambda d: npz_declaring(d / 'ref.npz', 10 ** 9),
     r'ref.npz: arr_0 declares 1000000000 images but holds 12288 bytes'),
    ('fid-ref-labels', 'fid', lambda d: fid_args('ref', '--data', d / 'big.zip', '--dest',
                                                 d / 'r.npz'), 'labels must be'),
    ('fid-num', 'fid', lambda d: fid_args('calc', '--images', d, '--ref', 'x', '--num', 1),
     '--num must be >= 2'),
    ('fid-dest', 'fid', lambda d: fid_args('ref', '--data', d / 'bomb.zip', '--dest',
                                           d / 'no' / 'r.npz'), 'cannot write --dest'),
    # EDM2 pickles: an XXL-sized claim on tiny weights, getattr other than the hooks', code in the
    # encoder record
    ('edm2-param-budget', 'ckpt',
     lambda d: write_edm2_path(d / 'p2.pkl', kwargs=dict(img_resolution=64, img_channels=4,
                                                           label_dim=1000, model_channels=768)),
     r'p2.pkl: .*parameters \(limit 2e\+09\)'),
    ('edm2-getattr', 'ckpt',
     lambda d: write_edm2_path(d / 'ga.pkl', extra=dict(x=BoundMethod('text', 'upper'))),
     r'ga.pkl: .*refusing to load global builtins.getattr'),
    ('edm2-encoder-code', 'ckpt',
     lambda d: write_edm2_path(d / 'enc.pkl', extra=dict(encoder=Record(
         'StabilityVAEEncoder', dict(scale=Evil(os.system, 'touch x'))))),
     r'enc.pkl: .*refusing to load global (posix|nt).system')]


def write_edm2_path(path, **kw):
    write_edm2_pickle(path, tiny_edm2().eval(), **kw)
    return path

READ_ALL = f"""import contextlib, io, json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, ({1536 << 20}, {1536 << 20}))
import checkpoints, data, fid, fileio, metrics, runs
signal.signal(signal.SIGALRM, lambda *a: sys.exit('timeout'))
READ = dict(ckpt=checkpoints.load_checkpoint, data=data.load_dataset, image=fileio.read_image,
            fid=lambda a: fid.main(a.split('|')[1:]),
            npz=lambda a: sum(len(b) for b in metrics.real_image_batches(a, 64)))
for line in sys.stdin:  # each refusal as the commands report it: one line on stderr, exit code 2
    name, reader, arg = line.split()
    err, code = io.StringIO(), 0
    signal.alarm(60)
    with contextlib.redirect_stderr(err):
        try:
            runs.one_line_errors(lambda: READ[reader](arg))
        except SystemExit as e:  # the refusal, or the alarm
            code = e.code
        except BaseException as e:  # anything else (MemoryError, ...) fails this file only
            code = repr(e)
    signal.alarm(0)
    print(json.dumps([name, code, err.getvalue() or str(code)]), flush=True)
"""


@pytest.fixture(scope='module')
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp('hostile')
    args = {name: str(build(d)) for name, _, build, _ in HOSTILE}
    assert all(os.path.getsize(a) < 1.1e6 for a in args.values() if os.path.isfile(a))
    lines = ''.join(f'{n} {reader} {args[n]}\n' for n, reader, _, _ in HOSTILE)
    r = subprocess.run([sys.executable, '-c', READ_ALL], input=lines, cwd=HERE,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    return {row[0]: row[1:] for row in map(json.loads, r.stdout.splitlines())}


@pytest.mark.parametrize('name,match', [(h[0], h[3]) for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_file_refused_in_bounded_memory(hostile, name, match):
    code, err = hostile[name]
    assert_one_line_error(types.SimpleNamespace(returncode=code, stderr=err), '')
    assert re.search(match, err), err
