"""Tests of fileio: atomic writes (planted symlinks, crashes, stale temporaries), the PNG writer and
image reader, downloads and their cache."""
import hashlib
import io
import math
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch

import fid
import fileio
from conftest import http_server, write_bytes


def test_atomic_write_symlink_crash_and_stale(tmp_path, monkeypatch):
    secret, dest, names = tmp_path / 'secret', tmp_path / 'out.bin', iter(['aaaaaa', 'bbbbbb'])
    write_bytes(secret, b'secret')
    monkeypatch.setattr(fileio.secrets, 'token_hex', lambda n: next(names))
    (tmp_path / '.out.bin.aaaaaa.tmp').symlink_to(secret)  # planted at the first name tried
    with fileio.atomic_write(dest) as f:
        f.write(b'new')
    assert secret.read_bytes() == b'secret' and dest.read_bytes() == b'new'
    monkeypatch.setattr(fileio.secrets, 'token_hex', lambda n: 'cccccc')
    # a crash mid-write: old content kept, no temporary left
    with pytest.raises(KeyError), fileio.atomic_write(dest) as f:
        f.write(b'half')
        raise KeyError
    assert dest.read_bytes() == b'new' and not (tmp_path / '.out.bin.cccccc.tmp').exists()
    write_bytes(tmp_path / '.g.png.0a1b2c.tmp', b'x')
    write_bytes(tmp_path / 'keep.tmp', b'x')
    removed = fileio.remove_stale_temporaries(tmp_path)
    assert removed == ['.g.png.0a1b2c.tmp', '.out.bin.aaaaaa.tmp']
    assert sorted(os.listdir(tmp_path)) == ['keep.tmp', 'out.bin', 'secret']


@pytest.mark.parametrize('shape,cols', [((3, 5, 7), None), ((1, 5, 7), None), ((5, 3, 4, 6), None),
                                        ((3, 1, 4, 6), 2)])
def test_save_png_read_image_round_trip(tmp_path, shape, cols):
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fileio.save_png(tmp_path / 'g.png', x, cols=cols)
    got = fileio.read_image(tmp_path / 'g.png')
    n, c, h, w = (1, *shape) if len(shape) == 3 else shape
    cols = cols or math.ceil(math.sqrt(n))  # a grid of cols columns, row by row
    for i in range(n):
        row, col = i // cols, i % cols
        tile = got[:, row * h:(row + 1) * h, col * w:(col + 1) * w]
        assert np.array_equal(tile, x.view(n, c, h, w)[i].numpy())
    assert os.listdir(tmp_path) == ['g.png'] and got.shape[0] == c
    # fid reads through read_image (gray -> RGB)
    batch = next(fid.iterate_image_files([str(tmp_path / 'g.png')], 1))
    assert batch.shape[1] == 3 and np.array_equal(batch[0, 0].numpy(), got[0])
    with pytest.raises(ValueError, match='junk.png: unreadable image'):
        fileio.read_image(b'not a png', 'junk.png')
    for mode, channels in (('L', 1), ('1', 1), ('LA', 1), ('RGBA', 3), ('P', 3), ('I;16', 3)):
        buf = io.BytesIO()
        PIL.Image.new(mode, (4, 3)).save(buf, format='PNG')
        assert fileio.read_image(buf.getvalue()).shape == (channels, 3, 4), mode


def test_download_local_path_and_cache_keyed_on_url(tmp_path, capsys):
    a = tmp_path / 'edm.pkl'
    write_bytes(a, b'first')
    assert fileio.download(str(a)) == str(a)
    with pytest.raises(FileNotFoundError):
        fileio.download(str(tmp_path / 'nope.pkl'))
    cache = str(tmp_path / 'cache')
    with http_server({'/a/edm.pkl': b'first', '/b/edm.pkl': b'second'}) as (url, seen):
        # the same file name at two URLs: two entries, each with its hash recorded (none pinned)
        pa, pb = (fileio.download(f'{url}/{d}/edm.pkl', cache) for d in 'ab')
        assert pa != pb and open(pa, 'rb').read() == b'first' and open(pb, 'rb').read() == b'second'
        assert open(pa + '.sha256').read().strip() == hashlib.sha256(b'first').hexdigest()
        assert fileio.download(f'{url}/a/edm.pkl', cache) == pa  # cached now: no second fetch
        assert seen == ['/a/edm.pkl', '/b/edm.pkl']
        with pytest.raises(RuntimeError, match=r'sha256 .* not the known 0{64}.*fetch it by hand '
                                               r'to .*c2/[0-9a-f]{16}-edm\.pkl$'):
            fileio.download(f'{url}/b/edm.pkl', str(tmp_path / 'c2'), sha256='0' * 64)
        assert os.listdir(tmp_path / 'c2') == []  # no partial or temporary file left
    write_bytes(pa, b'firsT')  # changed after its first download: refused at the next use
    with pytest.raises(RuntimeError, match=r'sha256 .* not the known .*delete it to download'):
        fileio.download(f'{url}/a/edm.pkl', cache)
    assert 'no published SHA-256; recorded' in capsys.readouterr().err


def test_truncated_download_leaves_nothing(tmp_path, monkeypatch):
    """A connection that ends before its Content-Length: one error line, no file in the cache."""
    class Response(io.BytesIO):
        headers = {'Content-Length': '10'}

    class Opener:
        def open(self, url, timeout):
            return Response(b'12345')

    monkeypatch.setattr(fileio.urllib.request, 'build_opener', lambda *handlers: Opener())
    cache, url = tmp_path / 'cache', 'https://example.invalid/models/gen.pkl'
    with pytest.raises(RuntimeError, match='truncated download, got 5 of 10 bytes') as e:
        fileio.download(url, str(cache))
    assert len(str(e.value).splitlines()) == 1
    assert fileio.cache_path(url, str(cache)) in str(e.value)  # where to put it by hand
    assert os.listdir(cache) == []


def test_download_pinned_files_schemes_deadline_and_size(tmp_path, monkeypatch):
    """KNOWN_FILES pins its URLs (hash and size); only http(s), redirects included; a trickling
    server meets the total deadline, an endless one the size limit; nothing is left in the cache
    either time."""
    cache = str(tmp_path / 'cache')
    body = b'known bytes'
    for scheme in ('file:///etc/passwd', 'ftp://127.0.0.1/x'):
        with pytest.raises(ValueError, match='only http'):
            fileio.download(scheme, cache)
    routes = {'/known.bin': body, '/bigger.bin': body + b'!',
              '/to-file': ('redirect', 'file:///etc/passwd'), '/to-ftp': ('redirect', 'ftp://x/y'),
              '/slow.bin': ('trickle', 100, 0.3), '/endless.bin': ('endless',)}
    with http_server(routes, max_seconds=10) as (url, seen):
        pins = {f'{url}/known.bin': dict(sha256=hashlib.sha256(body).hexdigest(), size=len(body)),
                f'{url}/bigger.bin': dict(sha256=hashlib.sha256(body).hexdigest(), size=len(body))}
        monkeypatch.setattr(fileio, 'KNOWN_FILES', pins)
        assert open(fileio.download(f'{url}/known.bin', cache), 'rb').read() == body
        assert not os.path.exists(fileio.cache_path(f'{url}/known.bin', cache) + '.sha256')
        with pytest.raises(RuntimeError, match=r'12 bytes announced, more than the 11 expected'):
            fileio.download(f'{url}/bigger.bin', cache)
        with pytest.raises(RuntimeError, match="to url 'file:///etc/passwd' is not allowed"):
            fileio.download(f'{url}/to-file', cache)  # urllib's own rule
        with pytest.raises(RuntimeError, match='refusing a redirect to ftp://x/y'):
            fileio.download(f'{url}/to-ftp', cache)  # ours: http(s) only
        with pytest.raises(RuntimeError, match=r'not done after 1 s'):  # not the server's 30 s
            fileio.download(f'{url}/slow.bin', cache, deadline_s=1)
        with pytest.raises(RuntimeError, match=r'more than the 1048576 bytes expected'):
            fileio.download(f'{url}/endless.bin', cache, max_bytes=1 << 20)
        assert len(seen) == 6
    assert sorted(os.listdir(cache)) == [os.path.basename(fileio.cache_path(f'{url}/known.bin',
                                                                          cache))]
    # a download killed long ago left a temporary: the next download into the cache removes it
    stale = os.path.join(cache, '.x.bin.0a1b2c.tmp')
    write_bytes(stale, b'half')
    os.utime(stale, (0, 0))
    with http_server({'/x.bin': body}) as (url, _):
        fileio.download(f'{url}/x.bin', cache)
    assert not os.path.exists(stale)


def test_every_known_url_is_pinned():
    """Every URL the project knows is in KNOWN_FILES (a SHA-256, or None where no hash is
    published: recorded at the first download)."""
    import data
    import edm_nets
    urls = [p['url'] for p in edm_nets.PRESETS.values()]
    import metrics
    urls += [fid.DETECTOR_URL, data.CIFAR10_URL, *fid.REF_PRESETS.values()]
    urls += [metrics.VGG16_URL, *metrics.PR_REF_PRESETS.values()]
    assert set(urls) == set(fileio.KNOWN_FILES)
    for url, pin in fileio.KNOWN_FILES.items():
        assert pin['sha256'] is None or re.fullmatch('[0-9a-f]{64}', pin['sha256'])
    assert fileio.KNOWN_FILES[fid.DETECTOR_URL]['sha256'] == fid.DETECTOR_SHA256

#----------------------------------------------------------------------------
# Reading only regular files, appending only to them; arrays checked from their headers.

def test_readers_open_regular_files_only(tmp_path):
    folder = tmp_path / 'data'
    os.makedirs(folder / 'sub')
    write_bytes(folder / 'a.bin', b'12345')
    write_bytes(tmp_path / 'outside.bin', b'secret')
    os.mkfifo(folder / 'fifo.png')
    (folder / 'zero.png').symlink_to('/dev/zero')
    (folder / 'out.bin').symlink_to(tmp_path / 'outside.bin')
    (folder / 'sub' / 'in.bin').symlink_to(folder / 'a.bin')
    assert fileio.read_regular(folder / 'a.bin', 5) == b'12345'
    assert fileio.read_regular(folder / 'sub' / 'in.bin', 5, root=folder) == b'12345'
    assert fileio.read_regular(folder / 'out.bin', 10) == b'secret'  # no root: any regular file
    for name, msg in (('fifo.png', 'FIFO'), ('zero.png', 'FIFO, device'), ('sub', 'a folder')):
        with pytest.raises(ValueError, match=f'not a regular file.*{msg}'):
            fileio.read_regular(folder / name, 10, root=folder)  # never blocks, never floods
    with pytest.raises(ValueError, match='a link out of'):
        fileio.read_regular(folder / 'out.bin', 10, root=folder)
    with pytest.raises(ValueError, match='5 bytes, more than the 4'):
        fileio.read_regular(folder / 'a.bin', 4)
    with pytest.raises(ValueError, match='not a regular file'):
        fileio.read_image(str(folder / 'fifo.png'))
    with pytest.raises(ValueError, match='not a regular file'):
        fileio.download(str(folder / 'zero.png'))


def test_append_line_never_through_links_or_fifos(tmp_path):
    log, target = tmp_path / 'stats.jsonl', tmp_path / 'target'
    fileio.append_line(log, '{"a": 1}')
    fileio.append_line(log, '{"a": 2}\n')
    assert log.read_text() == '{"a": 1}\n{"a": 2}\n'
    write_bytes(target, b'')
    link = tmp_path / 'link.jsonl'
    link.symlink_to(target)
    with pytest.raises(OSError, match='refusing to append'):
        fileio.append_line(link, 'x')
    assert target.read_bytes() == b''
    os.mkfifo(tmp_path / 'fifo.jsonl')
    with pytest.raises(OSError, match='refusing to append'):
        fileio.append_line(tmp_path / 'fifo.jsonl', 'x')  # no reader: refused, not waited for


def test_npy_npz_headers_checked_before_reading(tmp_path):
    good = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / 'good.npy', good)
    assert np.array_equal(fileio.read_npy(tmp_path / 'good.npy', 12), good)
    with pytest.raises(ValueError, match=r'shape \[3, 4\] exceeds 11 elements'):
        fileio.read_npy(tmp_path / 'good.npy', 11)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, dict(descr='<f8', fortran_order=False,
                                                      shape=(100000, 100000)))
    write_bytes(tmp_path / 'claims.npy', header.getvalue() + bytes(64))
    with pytest.raises(ValueError, match=r'claims 80000000000 bytes of data, the file holds 64'):
        fileio.read_npy(tmp_path / 'claims.npy', 10 ** 10)
    np.save(tmp_path / 'obj.npy', np.array([None, 1], dtype=object), allow_pickle=True)
    np.save(tmp_path / 'cplx.npy', np.ones(3, np.complex128))
    for bad in ('obj.npy', 'cplx.npy'):
        with pytest.raises(ValueError, match='plain numbers only'):
            fileio.read_npy(tmp_path / bad, 10)
    np.savez(tmp_path / 'r.npz', mu=good[0], sigma=good)
    got = fileio.read_npz(tmp_path / 'r.npz', ['mu', 'sigma'], 12)
    assert np.array_equal(got['sigma'], good) and np.array_equal(got['mu'], good[0])
    with pytest.raises(ValueError, match=r'not an .npz file with mu, cov'):
        fileio.read_npz(tmp_path / 'r.npz', ['mu', 'cov'], 12)
    blob = bytearray((tmp_path / 'r.npz').read_bytes())
    blob[blob.index(good.tobytes()[8:16])] ^= 1  # one bit of sigma's data: the CRC fails
    write_bytes(tmp_path / 'crc.npz', bytes(blob))
    with pytest.raises(ValueError, match=r'crc.npz: not an .npz file .*Bad CRC'):
        fileio.read_npz(tmp_path / 'crc.npz', ['mu', 'sigma'], 12)
