"""Tests of fileio: atomic writes (planted symlinks, crashes, stale temporaries), the PNG writer and
image reader, downloads and their cache."""
import io
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch

import fid
import fileio
from conftest import write_bytes


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


def test_download_local_path_and_cache_keyed_on_url(tmp_path):
    a, b, cache = tmp_path / 'a' / 'edm.pkl', tmp_path / 'b' / 'edm.pkl', str(tmp_path / 'cache')
    for p, blob in ((a, b'first'), (b, b'second')):
        os.makedirs(p.parent)
        write_bytes(p, blob)
    assert fileio.download(str(a)) == str(a)
    with pytest.raises(FileNotFoundError):
        fileio.download(str(tmp_path / 'nope.pkl'))
    # the same file name at two URLs: two entries
    pa, pb = (fileio.download(p.as_uri(), cache) for p in (a, b))
    assert pa != pb and open(pa, 'rb').read() == b'first' and open(pb, 'rb').read() == b'second'
    a.unlink()  # cached now: no second fetch
    assert fileio.download(a.as_uri(), cache) == pa and open(pa, 'rb').read() == b'first'
    with pytest.raises(RuntimeError, match=r'sha256 mismatch.*fetch it by hand to '
                                           r'.*c2/[0-9a-f]{16}-edm\.pkl$'):
        fileio.download(b.as_uri(), str(tmp_path / 'c2'), sha256='0' * 64)
    assert os.listdir(tmp_path / 'c2') == []  # no partial or temporary file left


def test_truncated_download_leaves_nothing(tmp_path, monkeypatch):
    """A connection that ends before its Content-Length: one error line, no file in the cache."""
    class Response(io.BytesIO):
        headers = {'Content-Length': '10'}

    def urlopen(url, timeout):
        return Response(b'12345')

    monkeypatch.setattr(fileio.urllib.request, 'urlopen', urlopen)
    cache, url = tmp_path / 'cache', 'https://example.invalid/models/gen.pkl'
    with pytest.raises(RuntimeError, match='truncated download, got 5 of 10 bytes') as e:
        fileio.download(url, str(cache))
    assert len(str(e.value).splitlines()) == 1
    assert fileio.cache_path(url, str(cache)) in str(e.value)  # where to put it by hand
    assert os.listdir(cache) == []
