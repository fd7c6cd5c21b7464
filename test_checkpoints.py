"""Tests of checkpoints: the reader on fixtures in EDM's and EDM2's persistence formats, our own
snapshots, refusals, network-kwargs checks, and hostile files of every reader in one bounded
subprocess."""
import collections
import copy
import io
import json
import os
import pathlib
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
                      detector_file, edm_files, encoder_record, fake_edm_modules, flip_member_byte,
                      http_server, net_inputs, png_bytes, slow, states_equal, tiny_edm2, tiny_net,
                      write_bytes, write_dataset, write_edm2_pickle, write_edm_pickle)


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
    write_bytes(cached, raw[:len(raw) // 2])  # changed since its hash was recorded at first use
    with pytest.raises(RuntimeError, match=re.escape(cached) + '.*refusing it') as e:
        checkpoints.load_checkpoint(name)
    assert len(str(e.value).splitlines()) == 1
    os.remove(cached + '.sha256')  # no record: the reader itself refuses what it cannot load
    with pytest.raises(ValueError, match=re.escape(cached)) as e:
        checkpoints.load_checkpoint(name)
    assert len(str(e.value).splitlines()) == 1
    os.remove(cached + '.sha256')
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
def test_official_cifar_teacher_loads_and_samples():
    """NVIDIA's real CIFAR-10 teacher (~225 MB), when it is already in the cache: tests never
    download."""
    cached = fileio.cache_path(edm_nets.PRESETS['cifar10-32x32-uncond-vp']['url'])
    if not os.path.exists(cached):
        pytest.skip(f'the real teacher is not in the cache ({cached})')
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
    with pytest.raises(RuntimeError, match='not the known'):  # its hash was recorded at first use
        checkpoints.load_checkpoint(name)
    write_bytes(cached + '.sha256', fileio.sha256_of(cached).encode())  # as if first seen so
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


def zip_bomb(path, name=b'a.png', before=()):
    """A hand-written ~1 MB zip whose member `name` inflates to 1 GiB of zeros (one deflate block,
    repeated), after the stored members `before` [(name, bytes)]."""
    c, chunk = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 << 20)
    # after a full flush: identical blocks
    first, again = (c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) for _ in range(2))
    data, crc = first + again * 1023 + c.flush(), 0
    for _ in range(1024):
        crc = zlib.crc32(chunk, crc)
    members = [(n, 0, zlib.crc32(b), b, len(b)) for n, b in before]
    members.append((name, 8, crc, data, 1 << 30))
    local = central = b''
    for n, method, crc, data, size in members:
        central += struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, method, 0, 0, crc,
                               len(data), size, len(n), 0, 0, 0, 0, 0, len(local)) + n
        local += struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 0, method, 0, 0, crc, len(data),
                             size, len(n), 0) + n + data
    end = struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, len(members), len(members), len(central),
                      len(local), 0)
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
    # 1025 members of 64 MiB each (the most one member may declare): 64.06 GiB in all
    ('zip-total', 'data', lambda d: zip_declaring(d / 'many.zip', 1025, 1 << 26),
     r'many.zip: members declare 68786585600 bytes in all \(limit 68719476736\)'),
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

#----------------------------------------------------------------------------
# The regression table of issues 20 and 22 (items 5-6), read by the same bounded subprocess: what a
# hostile or unlucky file did before (loaded, allocated GBs, hung, or gave a traceback), now one
# line and exit code 2. Downloads go to a local HTTP server that the fixture starts and stops.

def tiny_snapshot(path, **kwargs):
    """One of our snapshots of a tiny DDPM++ generator; kwargs replace stored net_kwargs."""
    net = tiny_net('cifar10-32x32-uncond-vp', randomize=False, channel_mult=[1, 1],
                   attn_resolutions=[])
    torch.save(dict(G_ema=net.state_dict(), net_kwargs=dict(net.init_kwargs, **kwargs), kimg=0.0,
                    config={}), path)
    return str(path)


def in_folder(d, name, **entries):
    """A folder d/name with a real 8x8 PNG a.png and entries: name -> 'fifo', a link target, or
    bytes."""
    folder = d / name
    os.makedirs(folder)
    write_bytes(folder / 'a.png', png_bytes(np.zeros((8, 8, 3), np.uint8)))
    for entry, what in entries.items():
        if what == 'fifo':
            os.mkfifo(folder / entry)
        elif isinstance(what, bytes):
            write_bytes(folder / entry, what)
        else:
            (folder / entry).symlink_to(what)
    return str(folder)


def state_file(d, name, **fields):
    base = dict(cur_nimg=0, data_images=0, fid=[], frames=[])
    return str(torch_file(d / f'{name}.pt', dict(base, **fields)))


def npz_file(d, name, **arrays):
    np.savez(str(d / f'{name}.npz'), **arrays)
    return str(d / f'{name}.npz')


def npy_bytes(array, shape=None):
    """The .npy bytes of `array`, its header claiming `shape` if given."""
    buf = io.BytesIO()
    header = dict(descr=np.lib.format.dtype_to_descr(array.dtype), fortran_order=False,
                  shape=shape or array.shape)
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + array.tobytes()


def many_pngs_zip(path, n, side):
    """n copies of a black side x side grayscale PNG: a few hundred bytes each, side^2 decoded."""
    blob = png_bytes(np.zeros((side, side), np.uint8))
    with zipfile.ZipFile(path, 'w') as zf:
        for i in range(n):
            zf.writestr(f'{i:05d}.png', blob)
    return str(path)


def sid_args(*a):  # sid.py's command line
    return '|'.join(['sid', *map(str, a)])


def snapshot_with_flipped(d, name, suffix):
    return write_bytes(d / name, flip_member_byte(tiny_snapshot(d / f'{name}.orig'), suffix))


def refs(d):
    return str(npz_file(d, 'ref4', mu=np.zeros(4), sigma=np.eye(4)))


REGRESSION = [
    # issue 20: a TorchScript detector is code; known files are pinned
    ('detector-untrusted', 'fid',
     lambda d: fid_args('calc', '--images', in_folder(d, 'imgs2', **{'b.png': png_bytes(
         np.ones((8, 8, 3), np.uint8))}), '--ref', refs(d), '--num', 2, '--detector',
         detector_file(d / 'det.pt')), "not NVIDIA's Inception detector"),
    ('download-hash', 'get', lambda d: f'{d.url}/teacher.pkl|{d / "cache"}|{"0" * 64}|',
     r'sha256 [0-9a-f]{64}, not the known 0{64}'),
    # issue 20: memory bombs
    ('snapshot-res-2048', 'sid', lambda d: sid_args('generate', '--ckpt', tiny_snapshot(
        d / 'res.pt', img_resolution=2048), '--outdir', d / 'out-res'),
     r'res.pt: network kwarg img_resolution=2048 is unknown or out of range'),
    ('data-side-4096', 'data', lambda d: write_dataset(d / 'side.zip', {'0.png': open(png_header(
        d / 'side.png', 4096, 4096), 'rb').read()}, None, 'zip'),
     r'4096x4096 pixels, larger than 512'),
    ('data-memory', 'data', lambda d: many_pngs_zip(d / 'mem.zip', 4000, 512),
     r'mem.zip: 4000 images of \(1, 512, 512\) need 0.98 GiB, but only [0-9.]+ GiB'),
    ('ref-npz-bomb', 'ref', lambda d: zip_bomb(d / 'rbomb.npz', b'sigma.npy', [(
        b'mu.npy', npy_bytes(np.zeros(4)))]), r'rbomb.npz: sigma.npy declares 1073741824 bytes'),
    ('ref-npz-bomb-cli', 'fid', lambda d: fid_args('calc', '--images', d / 'imgs2', '--ref',
                                                   d / 'rbomb.npz', '--num', 2),
     r'declares 1073741'),
    ('loop-fid-ref-bomb', 'sid', lambda d: sid_args(
        '--dataset', 'cifar10', '--teacher', 'random', '--device', 'cpu', '--batch', 2,
        '--net-overrides', '{"model_channels":8,"channel_mult":[1],"num_blocks":1,'
        '"attn_resolutions":[]}', '--fid-every-kimg', 1, '--fid-ref', d / 'rbomb.npz',
        '--outdir', d / 'run-fid'), r'declares 1073741'),
    ('ref-claims', 'ref', lambda d: zip_bomb(d / 'claim.npz', b'x.npy', [
        (b'mu.npy', npy_bytes(np.zeros(4))),
        (b'sigma.npy', npy_bytes(np.zeros(4), (10 ** 5,) * 2))]),
     r'claim.npz:sigma: an array of shape \[100000, 100000\] exceeds 16777216 elements'),
    ('state-storage-bomb', 'state',
     lambda d: torch_zip(d / 'sbomb.pt', lambda b: b.replace(b'M\xe8\x03t', BIG + b't', 1)),
     r'sbomb.pt is not a training state.*storage record that does not match'),
    ('dataset-json-bomb', 'data', lambda d: write_dataset(d / 'jbomb.zip', dict(edm_files(3)[0], **{
        'dataset.json': b'[' * 100000}), None, 'zip'), r'dataset.json declares 100000 bytes'),
    # issue 20: corruption that loaded silently or gave a traceback
    ('snapshot-crc-storage', 'sid', lambda d: sid_args('generate', '--ckpt', snapshot_with_flipped(
        d, 'crc.pt', '/data/0'), '--outdir', d / 'out-crc'), r'crc.pt: corrupt .*Bad CRC-32'),
    ('snapshot-crc-pkl', 'sid', lambda d: sid_args('generate', '--ckpt', snapshot_with_flipped(
        d, 'crcpkl.pt', '/data.pkl'), '--outdir', d / 'out-crcpkl'), r'crcpkl.pt: corrupt .*CRC'),
    ('state-cur-nimg-str', 'state', lambda d: state_file(d, 'str', cur_nimg='12'),
     r'cur_nimg must be an int in \[0, 2\^53\], got str 12'),
    ('state-cur-nimg-tensor', 'state', lambda d: state_file(d, 'ten', cur_nimg=torch.tensor(5)),
     r'cur_nimg must be an int in \[0, 2\^53\], got Tensor'),
    ('state-data-negative', 'state', lambda d: state_file(d, 'neg', data_images=-1),
     r'data_images must be an int in \[0, 2\^53\], got int -1'),
    ('state-frames', 'state',
     lambda d: state_file(d, 'frames', frames=[('t', torch.zeros(1))] * 1001),
     r'frames must be at most 1000'),
    ('ref-nan', 'ref', lambda d: npz_file(d, 'nan', mu=np.full(4, np.nan), sigma=np.eye(4)),
     'NaN or infinite'),
    ('ref-negdef', 'ref', lambda d: npz_file(d, 'negdef', mu=np.zeros(4), sigma=-np.eye(4)),
     'not positive semi-definite'),
    ('ref-complex', 'ref', lambda d: npz_file(d, 'cplx', mu=np.zeros(4),
                                              sigma=np.eye(4, dtype=np.complex128)),
     'plain numbers only'),
    # issue 20: bench.py's tracebacks
    ('bench-batch-0', 'bench', lambda d: 'bench|--batch|0', '--batch must be >= 1'),
    ('bench-device-tpu', 'bench', lambda d: 'bench|--device|tpu', '--device tpu'),
    ('bench-json', 'bench', lambda d: 'bench|--fast-fields|{bad', '--fast-fields must be'),
    # issue 22 item 5: appends never through a link
    ('stats-symlink', 'append', lambda d: in_folder(d, 'run', **{'stats.jsonl': d / 'victim'}),
     'stats.jsonl: refusing to append'),
    # issue 22 item 6: regular files only; downloads bounded in time and size, http(s) only
    ('data-fifo-png', 'data', lambda d: in_folder(d, 'fifo', **{'b.png': 'fifo'}),
     r'b.png: not a regular file \(a FIFO'),
    ('data-fifo-json', 'data', lambda d: in_folder(d, 'fifojson', **{'dataset.json': 'fifo'}),
     r'dataset.json: not a regular file'),
    ('data-dev-zero', 'data', lambda d: in_folder(d, 'zero', **{'z.png': '/dev/zero'}),
     r'z.png: not a regular file'),
    ('data-link-out', 'data', lambda d: in_folder(d, 'linkout', **{'o.png': d / 'imgs2' / 'a.png'}),
     r'o.png: a link out of'),
    ('resume-config-fifo', 'sid',
     lambda d: sid_args('--resume', in_folder(d, 'resume', **{'config.json': 'fifo'})),
     r'--resume: no readable config.json'),
    ('project-fifo', 'sid', lambda d: sid_args('project', '--ckpt', tiny_snapshot(d / 'g.pt'),
                                               '--input', in_folder(d, 'proj', **{'0.png': 'fifo'}),
                                               '--outdir', d / 'out-proj'), 'not a regular file'),
    ('project-npy-claims', 'sid', lambda d: sid_args(
        'project', '--ckpt', d / 'g.pt', '--input', write_bytes(d / 'pts.npy', npy_bytes(
            np.zeros(4), (10 ** 9, 2))), '--outdir', d / 'out-npy'),
     r'pts.npy: an array of shape \[1000000000, 2\] exceeds 20000000 elements'),
    ('generate-seeds-open', 'sid', lambda d: sid_args('generate', '--ckpt', d / 'g.pt', '--seeds',
                                                      '0-', '--outdir', d / 'out-open'),
     "bad --seeds '0-'"),
    ('generate-batch-huge', 'sid', lambda d: sid_args(
        'generate', '--ckpt', d / 'g.pt', '--seeds', '0-9999999', '--batch', 1000000, '--outdir',
        d / 'out-batch'), r'--batch 1000000: at most 5461 images of \[3, 32, 32\] per forward'),
    ('generate-grid-huge', 'sid', lambda d: sid_args(
        'generate', '--ckpt', d / 'g.pt', '--seeds', '0-9999999', '--grid', '--outdir',
        d / 'out-grid'), r'--grid of 10000000 images'),
    ('project-repeat-huge', 'sid', lambda d: sid_args(
        'project', '--ckpt', d / 'g.pt', '--input', write_bytes(d / 'p32.png', png_bytes(
            np.zeros((32, 32, 3), np.uint8))), '--repeat', 1000000000,
        '--outdir', d / 'out-rep'), r'--repeat in \[1, 1000\], got 0.0 and 1000000000'),
    ('fid-folder-fifo', 'fid', lambda d: fid_args('calc', '--images', in_folder(
        d, 'fidfifo', **{'b.png': 'fifo'}), '--ref', refs(d), '--num', 2, '--detector',
        d / 'det.pt', '--trust-detector'), 'b.png: not a regular file'),
    ('download-trickle', 'get', lambda d: f'{d.url}/slow.pkl|{d / "cache"}||',
     r'not done after 2 s'),
    ('download-endless', 'get', lambda d: f'{d.url}/endless.pkl|{d / "cache"}||1048576',
     r'more than the 1048576 bytes expected'),
    ('download-file-url', 'get', lambda d: f'file:///etc/passwd|{d / "cache"}||',
     'only http\\(s\\) URLs')]
HOSTILE += REGRESSION

READ_ALL = f"""import contextlib, io, json, resource, signal, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({1536 << 20}, {1536 << 20}))
import bench, checkpoints, data, fid, fileio, metrics, runs
signal.signal(signal.SIGALRM, lambda *a: sys.exit('timeout'))


def get(a):  # URL|cache|sha256|max bytes
    url, cache, sha256, limit = a.split('|')
    return fileio.download(url, cache, sha256 or None, int(limit) if limit else None)


READ = dict(ckpt=checkpoints.load_checkpoint, data=data.load_dataset, image=fileio.read_image,
            fid=lambda a: fid.main(a.split('|')[1:]), sid=lambda a: runs.main(a.split('|')[1:]),
            bench=lambda a: bench.main(a.split('|')[1:]), ref=fid.load_ref, get=get,
            state=lambda a: runs.read_training_state(a, {{}}, 'cpu'),
            append=lambda a: runs.append_stats(a, dict(kimg=1)),
            npz=lambda a: sum(len(b) for b in metrics.real_image_batches(a, 64)))
for line in sys.stdin:  # each refusal as the commands report it: one line on stderr, exit code 2
    name, reader, arg = line.split()
    err, code, t0 = io.StringIO(), 0, time.monotonic()
    signal.alarm(60)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runs.one_line_errors(lambda: READ[reader](arg))
        except SystemExit as e:  # the refusal, or the alarm
            code = e.code
        except BaseException as e:  # anything else (MemoryError, ...) fails this file only
            code = repr(e)
    signal.alarm(0)
    print(json.dumps([name, code, err.getvalue() or str(code), time.monotonic() - t0]), flush=True)
"""


class Folder(type(pathlib.Path())):  # the fixture's folder, and the local server's URL
    url = ''


@pytest.fixture(scope='module')
def hostile(tmp_path_factory):
    routes = {'/teacher.pkl': b'not the teacher', '/slow.pkl': ('trickle', 1000, 0.5),
              '/endless.pkl': ('endless',)}
    with http_server(routes, max_requests=10, max_seconds=10) as (url, _):
        d = Folder(tmp_path_factory.mktemp('hostile'))
        d.url = url
        args = {name: str(build(d)) for name, _, build, _ in HOSTILE}
        files = [a for a in args.values() if os.path.isfile(a) and not a.endswith('.pt.orig')]
        assert all(os.path.getsize(a) < 2e6 for a in files)
        lines = ''.join(f'{n} {reader} {args[n]}\n' for n, reader, _, _ in HOSTILE)
        r = subprocess.run([sys.executable, '-c', READ_ALL], input=lines, cwd=HERE,
                           capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, OMP_NUM_THREADS='1', SID_DOWNLOAD_DEADLINE='2',
                                    SID_CACHE=str(d / 'cache')))
    assert r.returncode == 0, r.stderr[-3000:]
    return {row[0]: row[1:] for row in map(json.loads, r.stdout.splitlines())}


@pytest.mark.parametrize('name,match', [(h[0], h[3]) for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_file_refused_in_bounded_memory(hostile, name, match):
    code, err, _ = hostile[name]
    assert_one_line_error(types.SimpleNamespace(returncode=code, stderr=err), '')
    assert re.search(match, err), err
