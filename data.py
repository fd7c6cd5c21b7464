# Real data of sid: the CIFAR-10 python archive, EDM's zip/folder datasets, sharded batch streams.
#
# SiDA's real images and fid.py's reference sets. The layouts are those of EDM's dataset_tool.py
# and ImageFolderDataset (Karras et al. 2022, github.com/NVlabs/edm): images at any depth sorted by
# name, optional dataset.json labels, the whole set decoded once into memory as uint8
# (cache=True). Bounded: only regular files are read (no FIFO, device, or link out of a folder),
# sizes declared by archives and headers are checked before anything is read or allocated, and
# the decoded set must fit the memory left.

import json
import os
import tarfile
import zipfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from fileio import (MAX_RESOLUTION, check_allocation, check_regular, download, open_regular,
                    read_image, read_regular)
from unpickle import CIFAR_GLOBALS, bounded_unpickle

#----------------------------------------------------------------------------
# Readers: the CIFAR-10 python archive, or an EDM-style zip / folder of images with optional
# dataset.json labels.

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
MAX_MEMBER_BYTES, MAX_DATASET_BYTES, MAX_LABEL = 1 << 26, 1 << 36, 100000
MAX_ARCHIVE_BYTES = 1 << 30  # a CIFAR-10 python archive (163 MiB)


def _one_hot(ys, path, num=None):
    """Integer class labels -> float32 one-hot [N, num], num = max + 1 unless given (EDM's
    label_dim)."""
    if not all(type(y) is int and 0 <= y < (num or MAX_LABEL) for y in ys):
        raise ValueError(f'{path}: labels must be one integer class in [0, {num or MAX_LABEL}) '
                         f'per image')
    ys = torch.as_tensor(ys, dtype=torch.long)
    return F.one_hot(ys, num or (int(ys.max()) + 1 if len(ys) else 0)).float()


def _load_cifar_archive(path):
    """cifar-10-python.tar.gz -> uint8 [50000,3,32,32] and labels, data_batch_1..5 in order (as
    EDM's dataset_tool)."""
    xs, ys = [], []
    try:
        with open_regular(path, MAX_ARCHIVE_BYTES) as f, \
                tarfile.open(fileobj=f, mode='r:gz') as tar:
            for i in range(1, 6):
                member = tar.getmember(f'cifar-10-batches-py/data_batch_{i}')
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    raise ValueError(f'{member.name} is not a file of at most '
                                     f'{MAX_MEMBER_BYTES} bytes')
                d = bounded_unpickle(tar.extractfile(member), CIFAR_GLOBALS,
                                     f'{path}:{member.name}', encoding='bytes')
                x, y = d[b'data'], d[b'labels']
                ok = (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2
                      and x.shape[1] == 3072 and isinstance(y, list) and len(y) == len(x))
                if not ok:
                    raise ValueError(f'{member.name}: expected uint8 data [N, 3072] and N labels')
                xs.append(x.reshape(-1, 3, 32, 32))
                ys += y
    except (tarfile.TarError, EOFError, OSError, zlib.error, KeyError, TypeError,
            ValueError) as e:
        raise ValueError(f'{path}: not a readable CIFAR-10 python archive '
                         f'({type(e).__name__}: {e})') from None
    return np.concatenate(xs), _one_hot(ys, path, 10)


def _list_members(path):
    """(names, read(name, max_bytes) -> bytes) for a folder or a zip; every size is checked
    before reading; a folder's entries must be regular files (or links to them inside it)."""
    if os.path.isdir(path):
        names = [os.path.relpath(os.path.join(r, f), path).replace(os.sep, '/')
                 for r, _, fs in os.walk(path) for f in fs]

        def read(name, max_bytes=MAX_MEMBER_BYTES):
            return read_regular(os.path.join(path, name), max_bytes, root=path,
                                what=f'{path}: {name}')

        return names, read
    zf = zipfile.ZipFile(open_regular(path))
    infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
    big = [i for i in infos.values() if i.file_size > MAX_MEMBER_BYTES]
    if big:
        raise ValueError(f'{path}: member {big[0].filename} declares {big[0].file_size} bytes '
                         f'(limit {MAX_MEMBER_BYTES})')
    total = sum(i.file_size for i in infos.values())
    if total > max(MAX_DATASET_BYTES, 0):
        raise ValueError(f'{path}: members declare {total} bytes in all '
                         f'(limit {MAX_DATASET_BYTES})')

    def read(name, max_bytes=MAX_MEMBER_BYTES):
        if infos[name].file_size > max_bytes:
            raise ValueError(f'{path}: {name} declares {infos[name].file_size} bytes '
                             f'(limit {max_bytes})')
        return zf.read(name)  # zipfile stops at the declared size and checks the CRC

    return list(infos), read


def _read_labels(path, names, read, files):
    """dataset.json {"labels": [[name, int], ...] or null} -> labels of `files`, checked before
    decoding. Its size is bounded by what labels for `files` can take (a name and a short int
    per image), so that a bomb is refused before it is parsed."""
    bound = sum(len(n) + 64 for n in files) + 4096
    text = read('dataset.json', bound) if 'dataset.json' in names else b'null'
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f'{path}: dataset.json is not valid JSON ({type(e).__name__})') from None
    labels = meta.get('labels') if isinstance(meta, dict) else None
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f'{path}: dataset.json must be an object with "labels"')
    if labels is None:
        return torch.zeros(len(files), 0)
    pairs = isinstance(labels, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int
        and 0 <= p[1] < MAX_LABEL for p in labels)
    if not pairs:
        raise ValueError(f'{path}: dataset.json labels must be a list of '
                         f'[name, int in [0, {MAX_LABEL})] pairs')
    meta = dict(labels)
    if len(meta) != len(labels):
        raise ValueError(f'{path}: dataset.json names an image twice')
    missing, extra = [n for n in files if n not in meta], sorted(set(meta) - set(files))
    if missing:
        raise ValueError(f'{path}: dataset.json has no label for {len(missing)} image(s), '
                         f'e.g. {missing[0]}')
    if extra:
        raise ValueError(f'{path}: dataset.json names {len(extra)} file(s) not in the dataset, '
                         f'e.g. {extra[0]}')
    return _one_hot([meta[n] for n in files], path)


def _load_image_files(path):
    """EDM layout: image files at any depth, sorted by name, all of one size; optional
    dataset.json labels."""
    names, read = _list_members(path)
    files = sorted(n for n in names if n.lower().endswith(('.png', '.jpg', '.jpeg')))
    if not files:
        raise ValueError(f'{path}: no .png/.jpg images found')
    labels = _read_labels(path, names, read, files)
    images = None
    for i, name in enumerate(files):
        a = read_image(read(name), f'{path}:{name}', max_side=MAX_RESOLUTION)
        if images is None:
            if len(files) * a.size > MAX_DATASET_BYTES:
                raise ValueError(f'{path}: {len(files)} images of {a.shape} exceed '
                                 f'{MAX_DATASET_BYTES} bytes')
            check_allocation(len(files) * a.size, f'{path}: {len(files)} images of {a.shape}')
            images = np.empty((len(files), *a.shape), dtype=np.uint8)
        elif a.shape != images.shape[1:]:
            raise ValueError(f'{path}: {name} is {a.shape} (C,H,W) but {files[0]} is '
                             f'{images.shape[1:]}')
        images[i] = a
    return images, labels


def load_dataset(path):
    """Real images -> (uint8 [N,C,H,W], float32 one-hot labels [N,L], L=0 without labels).
    path: 'cifar10' (the python archive, downloaded once to the cache), a cifar-10-python.tar.gz,
    an EDM .zip or a folder."""
    path = os.fspath(path)
    if path == 'cifar10':
        path = download(CIFAR10_URL)
    if not os.path.exists(path):
        raise FileNotFoundError(f'dataset not found: {path}')
    if not os.path.isdir(path):
        check_regular(path)  # not a FIFO or device
    if path.endswith(('.tar.gz', '.tgz')):
        images, labels = _load_cifar_archive(path)
    elif os.path.isdir(path) or path.endswith('.zip'):
        try:
            images, labels = _load_image_files(path)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile, MemoryError) as e:
            raise ValueError(f'{path}: unreadable dataset ({type(e).__name__}: {e})') from None
    else:
        raise ValueError(f'{path}: expected cifar10, a CIFAR-10 python .tar.gz, an EDM-style .zip '
                         f'or a folder')
    return torch.from_numpy(images), labels

#----------------------------------------------------------------------------
# Batches: endless, seeded per epoch, sharded over ranks; and the check that data fits the teacher.

def infinite_batches(images, labels, batch, seed, rank=0, world_size=1, start=0, pin=False):
    """Endless (x [batch,C,H,W] in [-1,1], labels). Epoch e is a permutation drawn from (seed, e),
    the same on all ranks; rank r takes every world_size-th entry (disjoint shards). `start` skips
    batches (resume) without drawing."""
    n, idx = len(images), torch.zeros(0, dtype=torch.long)
    if n < world_size:
        raise ValueError(f'{n} images cannot be sharded over {world_size} ranks')
    epoch, skip = divmod(start * batch, len(range(rank, n, world_size)))
    while True:
        while len(idx) < batch:
            state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
            gen = torch.Generator().manual_seed(int(state))
            shard = torch.randperm(n, generator=gen)[rank::world_size][skip:]
            idx, epoch, skip = torch.cat([idx, shard]), epoch + 1, 0
        b, idx = idx[:batch], idx[batch:]
        x = images[b].float() / 127.5 - 1
        # pinned: the copy to the GPU needs no synchronisation
        yield (x.pin_memory() if pin else x), labels[b]


def check_dataset_matches(images, labels, net):
    """Fail before training if the data cannot feed the network; -> the labels to use (none if
    unconditional)."""
    C, H, W = images.shape[1:]
    if H != net.img_resolution or W != net.img_resolution:
        raise ValueError(f'dataset resolution {H}x{W} does not match the teacher resolution '
                         f'{net.img_resolution}')
    if C != net.img_channels:
        raise ValueError(f'dataset has {C} channels but the teacher has {net.img_channels}')
    if net.label_dim and labels.shape[1] != net.label_dim:
        raise ValueError(f'dataset label_dim {labels.shape[1]} does not match the teacher '
                         f'label_dim {net.label_dim}')
    return labels if net.label_dim else labels[:, :0]
