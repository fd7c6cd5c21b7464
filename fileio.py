# File I/O of sid: atomic writes, stale temporaries, the PNG writer, the image reader, downloads.
#
# Every file sid writes goes through `atomic_write` (no run leaves a half-written file); every image
# it reads goes through `read_image` (bounded: decompression bombs are refused from the header). The
# download cache plays the role of EDM's dnnlib.util.open_url (Karras et al. 2022,
# github.com/NVlabs/edm), keyed on the whole URL instead of the file name.

import contextlib
import hashlib
import http.client
import io
import math
import os
import re
import secrets
import sys
import urllib.parse
import urllib.request
import warnings
import zlib

import numpy as np
import torch

#----------------------------------------------------------------------------
# Atomic writes: a uniquely named temporary file in the destination's folder, opened with
# O_EXCL|O_NOFOLLOW (a symlink planted at that name is never followed), fsync'ed and renamed;
# nothing is left on failure.

_TMP_PREFIX, _TMP_SUFFIX = '.', '.tmp'


@contextlib.contextmanager
def atomic_write(path):
    """Context manager yielding a binary file that replaces `path` only when the block ends
    without error."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    flags = (os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, 'O_NOFOLLOW', 0)
             | getattr(os, 'O_BINARY', 0))
    for _ in range(100):
        tmp = os.path.join(folder, f'{_TMP_PREFIX}{name}.{secrets.token_hex(3)}{_TMP_SUFFIX}')
        try:
            fd = os.open(tmp, flags, 0o644)
            break
        except FileExistsError:  # a clash, or something planted: pick another name, never reuse it
            continue
    else:
        raise OSError(f'cannot create a temporary file next to {path}')
    try:
        with os.fdopen(fd, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not possible on every platform)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove_stale_temporaries(folder):
    """Delete leftovers `.NAME.XXXXXX.tmp` of atomic_write calls that were killed; returns their
    names."""
    pattern = re.compile(r'^\..+\.[0-9a-f]{6}\.tmp$')
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        p = os.path.join(folder, name)
        if pattern.match(name) and (os.path.islink(p) or os.path.isfile(p)):
            with contextlib.suppress(OSError):
                os.remove(p)
                removed.append(name)
    return removed

#----------------------------------------------------------------------------
# Images: the one PNG writer and the one image reader (bounded: decompression bombs are refused
# from the header, before any pixel is decoded).

MAX_IMAGE_PIXELS = 2 ** 26


def save_png(path, images, cols=None):
    """uint8 [C,H,W] -> one image, [N,C,H,W] -> a grid (cols = ceil(sqrt N)); C in {1, 3};
    written atomically."""
    import PIL.Image
    if isinstance(images, torch.Tensor):
        x = torch.as_tensor(images).detach().cpu()
    else:
        x = torch.as_tensor(np.asarray(images)).detach().cpu()
    if x.ndim == 3:
        x = x[None]
        cols = 1
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f'save_png expects uint8 [C,H,W] or [N,C,H,W] with C in (1, 3), '
                         f'got {x.dtype} {tuple(x.shape)}')
    n, ch, h, w = x.shape
    cols = int(cols or math.ceil(math.sqrt(n)))
    rows = (n + cols - 1) // cols
    grid = torch.zeros(rows * h, cols * w, ch, dtype=torch.uint8)
    for i, im in enumerate(x):
        row, col = i // cols, i % cols
        grid[row * h:(row + 1) * h, col * w:(col + 1) * w] = im.permute(1, 2, 0)
    arr = grid.numpy()
    with atomic_write(path) as f:
        PIL.Image.fromarray(arr[:, :, 0] if ch == 1 else arr).save(f, format='PNG')


def read_image(data_or_path, name=''):
    """Bytes or a path -> uint8 numpy [C,H,W]: grayscale -> C=1, anything else -> RGB (C=3)."""
    import PIL.Image
    is_bytes = isinstance(data_or_path, (bytes, bytearray))
    name = name or ('<bytes>' if is_bytes else str(data_or_path))
    src = io.BytesIO(data_or_path) if is_bytes else data_or_path
    try:
        with warnings.catch_warnings():
            # PIL's warning becomes a one-line error
            warnings.simplefilter('error', PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(src) as im:
                w, h = im.size  # from the header: nothing decoded yet
                if w * h > MAX_IMAGE_PIXELS:
                    raise ValueError(f'{name}: image of {w}x{h} pixels exceeds the limit of '
                                     f'{MAX_IMAGE_PIXELS} pixels')
                if im.mode in ('L', 'RGB'):
                    a = np.asarray(im)
                else:
                    a = np.asarray(im.convert('L' if im.mode in ('1', 'LA') else 'RGB'))
    except ValueError as e:
        raise ValueError(str(e).splitlines()[0] if str(e).startswith(name)
                         else f'{name}: {e}') from None
    except (OSError, SyntaxError, EOFError, PIL.Image.DecompressionBombError,
            PIL.Image.DecompressionBombWarning, zlib.error) as e:
        first = str(e).splitlines()[0] if str(e) else ''
        raise ValueError(f'{name}: unreadable image ({type(e).__name__}: {first})') from None
    return np.ascontiguousarray(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))

#----------------------------------------------------------------------------
# Download with a cache keyed on the whole URL (so two URLs with one file name never collide);
# atomic, optionally checked against a sha256.

def cache_path(url, cache_dir=None):
    """Where `download` keeps a URL: `cache_dir`, $SID_CACHE or ~/.cache/sid, then the first 16
    hex digits of the URL's sha256 and its file name."""
    cache_dir = (cache_dir or os.environ.get('SID_CACHE')
                 or os.path.join(os.path.expanduser('~'), '.cache', 'sid'))
    base = os.path.basename(urllib.parse.urlparse(url).path)
    base = re.sub(r'[^A-Za-z0-9._-]', '_', base) or 'download'
    return os.path.join(cache_dir, f'{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}')


def download(url, cache_dir=None, sha256=None):
    """Local path of a file; URLs are fetched once into `cache_dir` or $SID_CACHE (default
    ~/.cache/sid)."""
    src = os.fspath(url) if not isinstance(url, str) else url
    if '://' not in src:
        if not os.path.isfile(src):
            raise FileNotFoundError(f'no such file: {src}')
        return src
    path = cache_path(src, cache_dir)
    cache_dir = os.path.dirname(path)
    if os.path.isfile(path):
        _check_sha256(path, sha256)
        return path
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_write(path) as f, urllib.request.urlopen(src, timeout=60) as resp:
            total = resp.headers.get('Content-Length')
            total, done, h = (int(total) if total else None), 0, hashlib.sha256()
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                of_total = f'/{total / 2**20:.1f}' if total else ''
                print(f'\rdownloading {src}: {done / 2**20:.1f}{of_total} MiB',
                      end='', file=sys.stderr, flush=True)
            print(file=sys.stderr)
            if total is not None and done != total:
                raise OSError(f'truncated download, got {done} of {total} bytes')
            if sha256 and h.hexdigest() != sha256.lower():
                raise OSError(f'sha256 mismatch: got {h.hexdigest()}, expected {sha256}')
    except (OSError, ValueError, http.client.HTTPException) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(f'could not download {src} ({why}); '
                           f'fetch it by hand to {path}') from None
    return path


def _check_sha256(path, sha256):
    if sha256:
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != sha256.lower():
            raise RuntimeError(f'{path}: sha256 {h.hexdigest()} does not match the expected '
                               f'{sha256}; delete it to refetch')
