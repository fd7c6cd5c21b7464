"""Hostile files and safe writes for edm_nets' I/O (to be merged into test_sid.py).

Every hostile file is a few bytes to ~1 MB, built here, and read in a subprocess under RLIMIT_AS = 1.5 GB
and a timeout: the reader must answer with one `error: ...` line and exit code 2, quickly.
"""
import collections, io, json, os, pickle, struct, subprocess, sys, time, zipfile, zlib

import numpy as np
import PIL.Image
import pytest
import torch

import edm_nets
import fid

HERE = os.path.dirname(os.path.abspath(__file__))
LIMIT_AS = 1536 << 20
READERS = dict(ckpt='edm_nets.load_checkpoint(sys.argv[1])', data='edm_nets.load_dataset(sys.argv[1])',
               image='edm_nets.read_image(sys.argv[1])')
PROLOGUE = f"""import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_AS}, {LIMIT_AS}))
import edm_nets
try:
    READ
except (ValueError, OSError, RuntimeError) as e:  # as sid.py / fid.py main do
    print('error: ' + str(e).splitlines()[0], file=sys.stderr)
    sys.exit(2)
"""


def run_limited(code, *args, timeout=30):
    """-> (exit code, stderr, seconds) of `python -c code args` under the memory limit."""
    t = time.time()
    p = subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True, cwd=HERE,
                       timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1'))
    return p.returncode, p.stderr, time.time() - t


def assert_one_line_error(rc, err, match):
    assert rc == 2 and err.count('\n') == 1 and err.startswith('error: '), (rc, err[-2000:])
    assert __import__('re').search(match, err), err

#----------------------------------------------------------------------------
# Hostile-file builders (each returns the path it wrote).

def _raw(path, blob):
    path.write_bytes(blob)
    return path


def pkl_object_array(d):  # _reconstruct of a 600M-element object array: 4.8 GB before any check
    return _raw(d / 'obj.pkl', b'\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ'
                + struct.pack('<i', 600_000_000) + b'\x85U\x01O\x87R.')


def pkl_hash_bomb(d):  # {t64: 1}, t_{k+1} = (t_k, t_k) through the memo: hashing t64 touches 2^64 leaves
    body = b'\x80\x04})\x940' + b''.join(bytes([0x68, k, 0x68, k, 0x86, 0x94]) + (b'0' if k < 63 else b'')
                                          for k in range(64))
    return _raw(d / 'hash.pkl', body + b'K\x01s.')


def pkl_read_claim(d):  # BINBYTES8 claiming 1 TiB
    return _raw(d / 'claim.pkl', b'\x80\x04\x8e' + struct.pack('<Q', 1 << 40) + b'xyz.')


class _View:  # a tensor view of 250M floats on a storage of 1000: set_() would grow the storage to 1 GB
    def __reduce__(self):
        storage = torch.storage.TypedStorage(wrap_storage=torch.zeros(1000).untyped_storage(), dtype=torch.float32,
                                             _internal=True)
        return torch._utils._rebuild_tensor_v2, (storage, 0, (250_000_000,), (1,), False, collections.OrderedDict())


def pkl_tensor_view(d):
    return _raw(d / 'view.pkl', pickle.dumps({'ema': _View()}, protocol=4))


def pt_huge_kwargs(d, channels=384):  # kwargs of a ~1.2e9-parameter DhariwalUNet and no weights
    kw = dict(img_resolution=64, img_channels=3, label_dim=0, model_type='DhariwalUNet', model_channels=channels)
    torch.save({'ema': {}, 'net_kwargs': kw}, d / 'huge.pt')
    return d / 'huge.pt'


def _zip(path, members):
    """A zip written by hand so that a member's deflate stream can repeat one compressed block."""
    out, central = io.BytesIO(), b''
    for name, (crc, usize, data) in members.items():
        off, n = out.tell(), name.encode()
        out.write(struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 0, 8, 0, 0, crc, len(data), usize, len(n), 0) + n + data)
        central += struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, 8, 0, 0, crc, len(data), usize, len(n),
                               0, 0, 0, 0, 0, off) + n
    cd = out.tell()
    out.write(central + struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, len(members), len(members), len(central), cd, 0))
    return _raw(path, out.getvalue())


def zip_bomb(d, gib=1):  # ~1 MB zip whose image member inflates to 1 GiB of zeros
    c, chunk = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 << 20)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)  # after a full flush every block is the same
    crc = 0
    for _ in range(1024 * gib):
        crc = zlib.crc32(chunk, crc)
    data = block + again * (1024 * gib - 1) + c.flush()
    return _zip(d / 'bomb.zip', {'a.png': (crc, (1 << 30) * gib, data)})


def _png(arr):
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()


def zip_labels(d, labels, n=3):  # three 8x8 images and the given dataset.json "labels"
    with zipfile.ZipFile(d / 'labels.zip', 'w') as zf:
        for i in range(n):
            zf.writestr(f'{i}.png', _png(np.full((8, 8, 3), i, np.uint8)))
        zf.writestr('dataset.json', json.dumps({'labels': labels}))
    return d / 'labels.zip'


def png_header_only(d, w=12000, h=12000):  # 9000^2 is under PIL's own warning limit, 12000^2 over  # a valid PNG header claiming w x h pixels, one tiny IDAT
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    blob = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(bytes(100))) + chunk(b'IEND', b''))
    return _raw(d / f'big{w}.png', blob)


HOSTILE = [  # (id, reader, builder, expected message)
    ('object-array', 'ckpt', pkl_object_array, r'refusing numpy _reconstruct'),
    ('hash-bomb', 'ckpt', pkl_hash_bomb, r'refusing a tuple as a dict key'),
    ('read-claim', 'ckpt', pkl_read_claim, r'claims 1099511627776 bytes'),
    ('tensor-view', 'ckpt', pkl_tensor_view, r'tensor view \[250000000\].*storage of 1000'),
    ('huge-kwargs', 'ckpt', pt_huge_kwargs, r'huge.pt: weights do not match.*missing keys'),
    ('param-budget', 'ckpt', lambda d: pt_huge_kwargs(d, 768), r'parameters \(limit 2e\+09\)'),
    ('zip-bomb', 'data', zip_bomb, r'member a.png declares 1073741824 bytes'),
    ('label-1e8', 'data', lambda d: zip_labels(d, [[f'{i}.png', 10 ** 8] for i in range(3)]), r'labels must be'),
    ('labels-not-list', 'data', lambda d: zip_labels(d, 5), r'labels.zip: dataset.json labels must be a list'),
    ('labels-not-pairs', 'data', lambda d: zip_labels(d, [['0.png']]), r'labels must be a list of \[name, int'),
    ('label-unknown-name', 'data', lambda d: zip_labels(d, [[f'{i}.png', 0] for i in range(4)]), r'not in the dataset'),
    ('png-9000x9000', 'image', lambda d: png_header_only(d, 9000, 9000), r'9000x9000 pixels exceeds the limit'),
    ('png-12000x12000', 'image', png_header_only, r'big12000.png: unreadable image \(DecompressionBombWarning'),
    ('png-100000x100000', 'image', lambda d: png_header_only(d, 100000, 100000), r'big100000.png:.*(exceeds|bomb)'),
]


@pytest.mark.parametrize('name,reader,build,match', HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_file_fails_fast(tmp_path, name, reader, build, match):
    path = build(tmp_path)
    assert path.stat().st_size < 1.1e6
    rc, err, seconds = run_limited(PROLOGUE.replace('READ', READERS[reader]), path)
    assert_one_line_error(rc, err, match)
    assert seconds < 20  # mostly interpreter and torch start-up; the refusal itself takes milliseconds


def test_fid_cli_hostile_dataset_and_arguments(tmp_path):
    """fid.py's own CLI: a hostile dataset, --num < 2, an unwritable --dest (checked before any work)."""
    fid_cli = [os.path.join(HERE, 'fid.py')]
    code = f'import resource, runpy, sys\nresource.setrlimit(resource.RLIMIT_AS, ({LIMIT_AS}, {LIMIT_AS}))\n' \
           'sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name="__main__")'
    bomb = zip_labels(tmp_path, [[f'{i}.png', 10 ** 8] for i in range(3)])
    assert_one_line_error(*run_limited(code, *fid_cli, 'ref', '--data', bomb, '--dest', tmp_path / 'r.npz')[:2],
                          'labels must be')
    assert_one_line_error(*run_limited(code, *fid_cli, 'calc', '--images', tmp_path, '--ref', 'x', '--num', '1')[:2],
                          '--num must be >= 2')
    assert_one_line_error(*run_limited(code, *fid_cli, 'ref', '--data', bomb, '--dest', tmp_path / 'no' / 'r.npz')[:2],
                          'cannot write --dest')

#----------------------------------------------------------------------------
# The bounded unpickler in-process: depth / shared-DAG / cycle caps, sets, and exactness on honest data.

def _nested(kind, levels):
    if kind == 'dag':  # a list of shared halves: 2^levels nodes when walked as a tree
        return b'\x80\x04]\x940' + b''.join(bytes([0x68, k, 0x68, k, 0x86, 0x94]) + (b'0' if k < levels - 1 else b'')
                                            for k in range(levels)) + b'.'
    if kind == 'deep':
        return b'\x80\x04' + b'](' * levels + b'e' * levels + b'.'
    return b'\x80\x04]\x94h\x00a.'  # cycle: a list that contains itself


@pytest.mark.parametrize('kind,levels', [('dag', 40), ('deep', 100), ('cycle', 0)])
def test_unpickler_bounds_structure(kind, levels):
    t = time.time()
    with pytest.raises(ValueError, match='nesting deeper than 64 or more than'):
        edm_nets.bounded_unpickle(io.BytesIO(_nested(kind, levels)), {}, 'x.pkl')
    assert time.time() - t < 5
    assert edm_nets.bounded_unpickle(io.BytesIO(_nested('deep', 60)), {}, 'x.pkl')  # shallower is fine


def test_unpickler_exact_on_honest_data():
    obj = {'a': [1, 2.5, None, True, b'x', 'y'], 3: (np.arange(6, dtype=np.float32).reshape(2, 3), {1, 'q'}),
           'od': collections.OrderedDict(z=1), 's': np.float64(0.25)}
    for protocol in (2, 4):
        obj = dict(obj, f=frozenset({1, 2})) if protocol == 4 else obj  # FROZENSET opcode only from protocol 4
        got = edm_nets.bounded_unpickle(io.BytesIO(pickle.dumps(obj, protocol)), edm_nets.EDM_GLOBALS, 'x.pkl')
        assert got.keys() == obj.keys() and got['a'] == obj['a'] and got['od'] == obj['od'] and got['s'] == 0.25
        assert np.array_equal(got[3][0], obj[3][0]) and got[3][1] == obj[3][1] and got.get('f') == obj.get('f')
    for bad in ({(1,): 2}, {frozenset({1}): 1}, np.array([None], dtype=object)):  # keys/objects refused
        with pytest.raises(ValueError, match='x.pkl: unsafe or unreadable pickle'):
            edm_nets.bounded_unpickle(io.BytesIO(pickle.dumps(bad, 4)), edm_nets.EDM_GLOBALS, 'x.pkl')


@pytest.mark.parametrize('kw,match', [(dict(model_channels='128'), 'model_channels=128 is unknown or out of range'),
                                      (dict(evil=1), 'evil=1 is unknown'), (dict(model_type='Nope'), 'model_type'),
                                      (dict(channel_mult=[1] * 20), 'channel_mult'), (dict(label_dim=10 ** 8), 'label_dim')])
def test_net_kwargs_table(kw, match):
    base = dict(edm_nets.PRESETS['cifar10-32x32-cond-vp']['kwargs'])
    assert edm_nets.check_net_kwargs(base, 'f') == base
    with pytest.raises(ValueError, match=f'f: network kwarg {match}'):
        edm_nets.check_net_kwargs(dict(base, **kw), 'f')
    assert edm_nets.check_net_kwargs(dict(model_type='ToyMLP', hidden=64, depth=3, dropout=0.1), 'f')

#----------------------------------------------------------------------------
# atomic_write, download cache, PNG writer/reader.

def test_atomic_write_symlink_crash_and_stale(tmp_path, monkeypatch):
    secret, dest = tmp_path / 'secret', tmp_path / 'out.bin'
    secret.write_bytes(b'secret')
    names = iter(['aaaaaa', 'bbbbbb'])
    monkeypatch.setattr(edm_nets.secrets, 'token_hex', lambda n: next(names))
    (tmp_path / '.out.bin.aaaaaa.tmp').symlink_to(secret)  # planted at the first name tried
    with edm_nets.atomic_write(dest) as f:
        f.write(b'new')
    assert secret.read_bytes() == b'secret' and dest.read_bytes() == b'new'
    monkeypatch.setattr(edm_nets.secrets, 'token_hex', lambda n: 'cccccc')
    with pytest.raises(KeyError):  # a crash mid-write: old content kept, no temporary left
        with edm_nets.atomic_write(dest) as f:
            f.write(b'half')
            raise KeyError
    assert dest.read_bytes() == b'new' and not (tmp_path / '.out.bin.cccccc.tmp').exists()
    (tmp_path / '.g.png.0a1b2c.tmp').write_bytes(b'x')
    (tmp_path / 'keep.tmp').write_bytes(b'x')
    assert edm_nets.remove_stale_temporaries(tmp_path) == ['.g.png.0a1b2c.tmp', '.out.bin.aaaaaa.tmp']
    assert sorted(os.listdir(tmp_path)) == ['keep.tmp', 'out.bin', 'secret']


def test_download_cache_keyed_on_url(tmp_path):
    a, b = tmp_path / 'a' / 'edm.pkl', tmp_path / 'b' / 'edm.pkl'
    for p, blob in ((a, b'first'), (b, b'second')):
        p.parent.mkdir()
        p.write_bytes(blob)
    cache = str(tmp_path / 'cache')
    pa, pb = (edm_nets.download(p.as_uri(), cache) for p in (a, b))
    assert pa != pb and open(pa, 'rb').read() == b'first' and open(pb, 'rb').read() == b'second'
    assert edm_nets.download(a.as_uri(), cache) == pa and open(pa, 'rb').read() == b'first'
    import hashlib
    good = hashlib.sha256(b'x').hexdigest()
    c = tmp_path / 'c.bin'
    c.write_bytes(b'y')
    with pytest.raises(RuntimeError, match=r'sha256 mismatch.*fetch it by hand to .*cache/[0-9a-f]{16}-c\.bin$') as e:
        edm_nets.download(c.as_uri(), cache, sha256=good)
    assert '--teacher' not in str(e.value) and len(os.listdir(cache)) == 2


@pytest.mark.parametrize('shape,cols', [((3, 5, 7), None), ((1, 5, 7), None), ((5, 3, 4, 6), None), ((3, 1, 4, 6), 2)])
def test_save_png_read_image_round_trip(tmp_path, shape, cols):
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    edm_nets.save_png(tmp_path / 'g.png', x, cols=cols)
    got = edm_nets.read_image(tmp_path / 'g.png')
    if x.ndim == 3:
        assert np.array_equal(got, x.numpy())
    else:
        n, c, h, w = x.shape
        cols = cols or int(np.ceil(np.sqrt(n)))
        for i in range(n):
            r, k = divmod(i, cols)
            assert np.array_equal(got[:, r * h:(r + 1) * h, k * w:(k + 1) * w], x[i].numpy())
    assert os.listdir(tmp_path) == ['g.png']
    batch = next(fid.iterate_image_files([str(tmp_path / 'g.png')], 1))  # fid reads through read_image
    assert batch.shape[1] == 3 and np.array_equal(batch[0, 0].numpy(), got[0])
    with pytest.raises(ValueError, match='unreadable image'):
        edm_nets.read_image(b'not a png', 'junk.png')


@pytest.mark.parametrize('mode,channels', [('L', 1), ('1', 1), ('LA', 1), ('RGBA', 3), ('P', 3), ('I;16', 3)])
def test_read_image_modes(mode, channels):
    buf = io.BytesIO()
    PIL.Image.new(mode, (4, 3)).save(buf, format='PNG')
    assert edm_nets.read_image(buf.getvalue()).shape == (channels, 3, 4)


@pytest.mark.parametrize('kind', ['zip', 'folder'])
def test_load_dataset_round_trip(tmp_path, kind):
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 256, (8, 6, 3), dtype=np.uint8) for _ in range(4)]
    names, ys = [f'd/{i:03d}.png' for i in (3, 1, 0, 2)], [7, 0, 99999, 2]
    meta = {'labels': [[n, y] for n, y in zip(names, ys)]}
    if kind == 'zip':
        with zipfile.ZipFile(tmp_path / 'd.zip', 'w') as zf:
            for n, a in zip(names, arrs):
                zf.writestr(n, _png(a))
            zf.writestr('dataset.json', json.dumps(meta))
        path = tmp_path / 'd.zip'
    else:
        path = tmp_path / 'd'
        (path / 'd').mkdir(parents=True)
        for n, a in zip(names, arrs):
            (path / n).write_bytes(_png(a))
        (path / 'dataset.json').write_text(json.dumps(meta))
    images, labels = edm_nets.load_dataset(path)
    order = np.argsort(names)
    assert images.dtype == torch.uint8 and torch.equal(images, torch.from_numpy(np.stack([arrs[i] for i in order])).permute(0, 3, 1, 2))
    assert labels.shape == (4, 100000) and labels.argmax(1).tolist() == [ys[i] for i in order]
