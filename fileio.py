# File I/O of sid: atomic writes and appends, regular-file reads, images, .npy/.npz, downloads.
#
# Every file sid writes goes through `atomic_write` or `append_line` (never through a link; no run
# leaves a half-written file); every file it reads is opened by `open_regular` (regular files
# only, within a declared size; never a FIFO, device or a link out of the folder it reads); images
# go through `read_image` (decompression bombs refused from the header), arrays through `read_npy`
# and `read_npz` (shapes checked before anything is allocated). The download cache plays the role
# of EDM's dnnlib.util.open_url (Karras et al. 2022, github.com/NVlabs/edm), keyed on the whole
# URL; every file the project knows is pinned by its SHA-256 (KNOWN_FILES).

import contextlib
import hashlib
import http.client
import io
import math
import os
import re
import secrets
import stat
import sys
import time
import urllib.parse
import urllib.request
import warnings
import zipfile
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


def remove_stale_temporaries(folder, min_age_s=0):
    """Delete leftovers `.NAME.XXXXXX.tmp` of atomic_write calls that were killed (at least
    min_age_s old: a download cache is shared by running processes); returns their names."""
    pattern = re.compile(r'^\..+\.[0-9a-f]{6}\.tmp$')
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        p = os.path.join(folder, name)
        old = min_age_s <= 0 or time.time() - os.lstat(p).st_mtime >= min_age_s
        if pattern.match(name) and (os.path.islink(p) or os.path.isfile(p)) and old:
            with contextlib.suppress(OSError):
                os.remove(p)
                removed.append(name)
    return removed


def append_line(path, text):
    """Append one line to `path` under atomic_write's rules: never through a link (O_NOFOLLOW),
    only to a regular file (a FIFO planted there is refused, not waited for), in one write."""
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
             | getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_CLOEXEC', 0))
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:  # ELOOP: a link; ENXIO: a FIFO without reader
        raise OSError(f'{path}: refusing to append ({e.strerror}; links and special files are '
                      f'never written through)') from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f'{path}: refusing to append to a special file')
        os.write(fd, text.encode() if text.endswith('\n') else (text + '\n').encode())
    finally:
        os.close(fd)

#----------------------------------------------------------------------------
# Reading: regular files only, within a declared size. A FIFO would block a reader forever, a
# device (/dev/zero) never end, a link could lead out of the folder being read; the size is read
# from the open descriptor (a link to a device reports 0). Opened without blocking and checked
# again on the descriptor, so nothing swapped in between the two checks is read.

def _inside(path, root):
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) == top


def open_regular(path, max_bytes=None, root=None, what=None):
    """A binary file object for reading `path`: a regular file (or a link to one, inside `root`
    when given) of at most max_bytes bytes; else one ValueError / FileNotFoundError line."""
    name = what or os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileNotFoundError(f'{name}: {e.strerror or type(e).__name__}') from None
    if not stat.S_ISREG(st.st_mode):
        kind = 'a folder' if stat.S_ISDIR(st.st_mode) else 'a FIFO, device or socket'
        raise ValueError(f'{name}: not a regular file ({kind})')
    if root is not None and not _inside(path, root):
        raise ValueError(f'{name}: a link out of {root}')
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise ValueError(f'{name}: replaced while being opened')
    if max_bytes is not None and st2.st_size > max_bytes:
        os.close(fd)
        raise ValueError(f'{name}: {st2.st_size} bytes, more than the {max_bytes} such a file may '
                         f'have')
    return os.fdopen(fd, 'rb')


def read_regular(path, max_bytes, root=None, what=None):
    """The bytes of a regular file of at most max_bytes bytes (open_regular's rules)."""
    with open_regular(path, max_bytes, root, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f'{what or path}: grew beyond {max_bytes} bytes while being read')
    return data


def check_regular(path, what=None):
    """`path` if it names a regular file (read later by a library that opens it itself)."""
    open_regular(path, what=what).close()
    return path


def available_memory():
    """Bytes this process may still allocate: the memory the OS reports available and what its
    address-space limit (ulimit -v) leaves; None where neither can be read."""
    bounds = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open('/proc/meminfo') as f:
            info = dict(line.split(':', 1) for line in f)
        bounds.append(int(info['MemAvailable'].split()[0]) * 1024)
    with contextlib.suppress(ImportError, OSError, ValueError, IndexError, KeyError):
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open('/proc/self/status') as f:
                status = dict(line.split(':', 1) for line in f)
            bounds.append(limit - int(status['VmSize'].split()[0]) * 1024)
    return min(bounds) if bounds else None


def check_allocation(nbytes, what):
    """Refuse, in one line, an allocation of nbytes that the memory left cannot hold."""
    free = available_memory()
    if free is not None and nbytes > 0.9 * free:
        raise ValueError(f'{what} need {nbytes / 2 ** 30:.2f} GiB, but only '
                         f'{free / 2 ** 30:.2f} GiB of memory is available')

#----------------------------------------------------------------------------
# Images: the one PNG writer and the one image reader (bounded: decompression bombs are refused
# from the header, before any pixel is decoded).

MAX_IMAGE_PIXELS, MAX_IMAGE_BYTES = 2 ** 26, 1 << 28
MAX_RESOLUTION = 512  # a plausible image side for sid (EDM: 32, 64; EDM2's latents: 64)


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


def read_image(data_or_path, name='', root=None, max_side=None):
    """Bytes or a path (a regular file, inside `root` when given) -> uint8 numpy [C,H,W]:
    grayscale -> C=1, anything else -> RGB (C=3). max_side: refuse larger images from the
    header."""
    import PIL.Image
    is_bytes = isinstance(data_or_path, (bytes, bytearray))
    name = name or ('<bytes>' if is_bytes else str(data_or_path))
    if not is_bytes:
        data_or_path = read_regular(data_or_path, MAX_IMAGE_BYTES, root, name)
    src = io.BytesIO(data_or_path)
    try:
        with warnings.catch_warnings():
            # PIL's warning becomes a one-line error
            warnings.simplefilter('error', PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(src) as im:
                w, h = im.size  # from the header: nothing decoded yet
                if w * h > MAX_IMAGE_PIXELS:
                    raise ValueError(f'{name}: image of {w}x{h} pixels exceeds the limit of '
                                     f'{MAX_IMAGE_PIXELS} pixels')
                if max_side is not None and max(w, h) > max_side:
                    raise ValueError(f'{name}: image of {w}x{h} pixels, larger than {max_side} '
                                     f'on a side')
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
# Arrays: .npy and .npz read with their headers checked first (a plain numeric dtype, the shape,
# the bytes that shape needs against the bytes stored), so that a small file cannot claim a huge
# array, and an .npz member is read whole (its CRC checked) only after its declared size.

def _npy_header(f, size, name, max_elements):
    """Check the .npy stream f of `size` bytes from its header -> (shape, dtype)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f'format version {version}')
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f'{name}: not a .npy array ({first})') from None
    plain = (dtype.kind in 'biuf' and not dtype.hasobject and dtype.names is None
             and dtype.subdtype is None and len(shape) <= 8)
    if not plain:
        raise ValueError(f'{name}: refusing a .npy array of dtype {dtype} and shape {shape} (plain '
                         f'numbers only)')
    n = math.prod(shape)
    if n > max_elements:
        raise ValueError(f'{name}: an array of shape {list(shape)} exceeds {max_elements} elements')
    if size - f.tell() != n * dtype.itemsize:
        raise ValueError(f'{name}: the header claims {n * dtype.itemsize} bytes of data, the file '
                         f'holds {size - f.tell()}')
    return shape, dtype


def read_npy(path, max_elements, root=None):
    """A .npy file (regular, inside `root` when given) of at most max_elements plain numbers."""
    name = os.fspath(path)
    with open_regular(path, max_elements * 16 + (1 << 16), root) as f:
        _npy_header(f, os.fstat(f.fileno()).st_size, name, max_elements)
        f.seek(0)
        return np.load(f, allow_pickle=False)


def read_npz(path, keys, max_elements, root=None):
    """{key: array} for the named arrays of an .npz file, each of at most max_elements numbers."""
    name, out = os.fspath(path), {}
    try:
        with open_regular(path, len(keys) * (max_elements * 16 + (1 << 16)), root) as f:
            with zipfile.ZipFile(f) as zf:
                for key in keys:
                    info = zf.getinfo(f'{key}.npy')
                    if info.file_size > max_elements * 16 + (1 << 16):
                        raise ValueError(f'{name}: {key}.npy declares {info.file_size} bytes')
                    blob = io.BytesIO(zf.read(info))  # the CRC is checked here
                    _npy_header(blob, info.file_size, f'{name}:{key}', max_elements)
                    blob.seek(0)
                    out[key] = np.lib.format.read_array(blob, allow_pickle=False)
    except (KeyError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f'{name}: not an .npz file with {", ".join(keys)} ({first})') from None
    return out

def check_zip(f, name, slack=1 << 20):
    """A zip archive whose members are stored (torch.save, TorchScript): the sizes they declare
    must fit in the file (+ slack), and every member is read through once in chunks, so that a
    corrupt member fails its CRC here (torch's own reader does not check it). -> the open
    ZipFile, at the start of f."""
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        size = os.fstat(f.fileno()).st_size if hasattr(f, 'fileno') else f.seek(0, 2)
        if total > size + slack:
            raise ValueError(f'{name}: zip members declare {total} bytes, more than the file holds')
        for info in infos:
            with zf.open(info) as member:
                while member.read(1 << 20):
                    pass
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f'{name}: corrupt or unreadable zip archive ({first})') from None
    f.seek(0)
    return zf

#----------------------------------------------------------------------------
# Downloads: http(s) only, with a total deadline and a size limit (the known size where the URL
# is known), into a cache keyed on the whole URL (two URLs with one file name never collide),
# written atomically (a failed download leaves nothing). Every file the project knows is pinned
# by its SHA-256; a file without a published hash gets its hash recorded next to it at the first
# download (FILE.sha256) and checked at every later use.

KNOWN_FILES = {  # url -> sha256 (None: none published), size in bytes where known, md5
    # CIFAR-10 python version: md5 published by its authors (cs.toronto.edu/~kriz/cifar.html,
    # also torchvision's); sha256 as pinned by Keras (keras.datasets.cifar10)
    'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz': dict(
        sha256='6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce',
        size=170498071, md5='c58f30108f718f92721af3b95e74349a'),
    # NVIDIA's TorchScript Inception (StyleGAN2-ADA metrics): sha256 as pinned by k-diffusion
    # (crowsonkb/k-diffusion, evaluation.py), the same URL; the size as a mirror reports it
    'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/'
    'inception-2015-12-05.pt': dict(
        sha256='f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4', size=95607719),
    # EDM's teachers: NVIDIA publishes no hashes; CIFAR-10 uncond's as recorded by third parties
    # who fetched it from this URL; the others are recorded at the first download
    'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl': dict(
        sha256='4d5dcc1f1d0d41c8934ad21626eeddbdc0460182becf9fc059a0631b1eedb4da'),
    **{f'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-{name}.pkl': dict(sha256=None)
       for name in ('cifar10-32x32-cond-vp', 'ffhq-64x64-uncond-vp', 'afhqv2-64x64-uncond-vp',
                    'imagenet-64x64-cond-adm')},
    # NVIDIA's VGG16 (StyleGAN2-ADA's precision/recall features) and OpenAI's ImageNet 64 reference
    # batch (guided-diffusion's evaluations): no published hashes; recorded at the first download
    'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt': dict(
        sha256=None),
    'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/64/'
    'VIRTUAL_imagenet64_labeled.npz': dict(sha256=None),
    # EDM2's teachers (posthoc reconstructions) and ImageNet-512 reference statistics: no
    # published hashes; recorded at the first download
    **{f'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-{name}.pkl':
       dict(sha256=None)
       for name in ('xs-2147483-0.135', 's-2147483-0.130', 'm-2147483-0.100', 'l-1879048-0.085',
                    'xl-1342177-0.085', 'xxl-0939524-0.070')},
    'https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl': dict(sha256=None),
    # EDM's FID reference statistics: no published hashes; recorded at the first download
    **{f'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/{name}.npz': dict(sha256=None)
       for name in ('cifar10-32x32', 'imagenet-64x64', 'ffhq-64x64', 'afhqv2-64x64')},
}
MAX_DOWNLOAD_BYTES = 1 << 32  # a URL of unknown size: 4 GiB (the largest teacher is ~1.2 GB)
DOWNLOAD_DEADLINE_S = 1800.0  # the whole download; $SID_DOWNLOAD_DEADLINE overrides
READ_TIMEOUT_S = 60.0  # one read


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme not in ('http', 'https'):
            raise OSError(f'refusing a redirect to {newurl} (http and https only)')
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def cache_path(url, cache_dir=None):
    """Where `url` is cached: $SID_CACHE (default ~/.cache/sid)/<hash of the URL>-<file name>."""
    cache_dir = (cache_dir or os.environ.get('SID_CACHE')
                 or os.path.join(os.path.expanduser('~'), '.cache', 'sid'))
    base = os.path.basename(urllib.parse.urlparse(url).path)
    base = re.sub(r'[^A-Za-z0-9._-]', '_', base) or 'download'
    return os.path.join(cache_dir, f'{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}')


def download(url, cache_dir=None, sha256=None, max_bytes=None, deadline_s=None):
    """Local path of a file: a local path is checked to be a regular file; an http(s) URL is
    fetched once into the cache and checked against its known SHA-256 (or the one recorded at its
    first download) at every use."""
    src = os.fspath(url) if not isinstance(url, str) else url
    if '://' not in src:
        return check_regular(src)
    scheme = urllib.parse.urlparse(src).scheme
    if scheme not in ('http', 'https'):
        raise ValueError(f'{src}: only http(s) URLs are downloaded (give a local file as a path)')
    known = KNOWN_FILES.get(src, {})
    sha256, size, md5 = sha256 or known.get('sha256'), known.get('size'), known.get('md5')
    path = cache_path(src, cache_dir)
    if os.path.lexists(path):
        _check_digests(path, src, sha256, md5)
        return path
    deadline_s = deadline_s or float(os.environ.get('SID_DOWNLOAD_DEADLINE', 0) or 0)
    got = _fetch(src, path, size or max_bytes or MAX_DOWNLOAD_BYTES, size,
                 deadline_s or DOWNLOAD_DEADLINE_S, sha256, md5)
    if sha256 is None:
        _record(path, src, got)
    return path


def _fetch(src, path, limit, size, deadline_s, sha256=None, md5=None):
    """src -> path within `limit` bytes (exactly `size` where known) and deadline_s seconds in
    all, matching sha256 / md5 where given (checked before the file takes its name); -> its
    sha256. One RuntimeError line otherwise, and nothing left behind."""
    folder = os.path.dirname(path)
    end = time.monotonic() + deadline_s
    h, m = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    tty = sys.stderr.isatty()
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder, min_age_s=2 * deadline_s)  # killed downloads
        opener = urllib.request.build_opener(_HttpOnlyRedirects)
        with atomic_write(path) as f, opener.open(src, timeout=min(READ_TIMEOUT_S,
                                                                   deadline_s)) as resp:
            total = resp.headers.get('Content-Length')
            total, done = (int(total) if total and total.isdigit() else None), 0
            if total is not None and total > limit:
                raise OSError(f'{total} bytes announced, more than the {limit} expected')
            while chunk := resp.read1(1 << 20):
                done += len(chunk)
                if done > limit:
                    raise OSError(f'more than the {limit} bytes expected')
                if time.monotonic() > end:
                    raise OSError(f'not done after {deadline_s:g} s ({done} bytes)')
                f.write(chunk)
                h.update(chunk)
                m.update(chunk)
                of_total = f'/{total / 2**20:.1f}' if total else ''
                if tty:  # progress for a person watching; logs get no half lines
                    print(f'\rdownloading {src}: {done / 2**20:.1f}{of_total} MiB',
                          end='', file=sys.stderr, flush=True)
            if tty:
                print(file=sys.stderr)
            if (total is not None and done != total) or (size is not None and done != size):
                raise OSError(f'truncated download, got {done} of {size or total} bytes')
            _check_match(h.hexdigest(), m.hexdigest(), sha256, md5, 'the download')
    except (OSError, ValueError, http.client.HTTPException) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(f'could not download {src} ({why}); '
                           f'fetch it by hand to {path}') from None
    return h.hexdigest()


def _check_match(got, got_md5, sha256, md5, what):
    if (sha256 is not None and got != sha256.lower()) or (md5 is not None and got_md5 != md5):
        raise ValueError(f'{what} has sha256 {got}, not the known {sha256}')


def _record(path, src, got):
    with atomic_write(path + '.sha256') as f:
        f.write(f'{got}\n'.encode())
    print(f'{src}: no published SHA-256; recorded {got} in {path}.sha256 (checked at every use)',
          file=sys.stderr)


def _file_digests(path):
    h, m = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open_regular(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            m.update(chunk)
    return h.hexdigest(), m.hexdigest()


def sha256_of(path):
    """The SHA-256 of a regular file, hex."""
    return _file_digests(path)[0]


def _check_digests(path, src, sha256, md5):
    """The cached file against the pinned SHA-256 (and md5), or the SHA-256 recorded at its first
    download (recorded now if there is none); a mismatch is one RuntimeError line."""
    got, got_md5 = _file_digests(path)
    record = path + '.sha256'
    if sha256 is None and not os.path.lexists(record):
        _record(path, src, got)
        return
    if sha256 is None:
        sha256 = read_regular(record, 100).decode(errors='replace').strip()
    try:
        _check_match(got, got_md5, sha256, md5, f'{path} ({src})')
    except ValueError as e:
        raise RuntimeError(f'{e}; refusing it (delete it to download again)') from None
