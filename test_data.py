"""Tests of data: a fake cifar-10-python.tar.gz in the official layout, EDM zips and folders with
dataset.json labels, sharded batch streams, the teacher match; EDM2's latent zips, labels files."""
import io
import json
import os
import pickle
import tarfile
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from conftest import (Evil, edm_files, latent_files, npy_bytes, png_bytes, write_bytes,
                      write_dataset)

#----------------------------------------------------------------------------
# Readers.

def cifar_tar(path, per_batch=3, payload=None):
    """Five data_batch_i pickles (bytes keys, protocol 2) plus test_batch; -> (rows, labels)."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (5 * per_batch, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, 5 * per_batch)]
    with tarfile.open(path, 'w:gz') as tar:
        for i in range(6):
            s = slice(i * per_batch, (i + 1) * per_batch) if i < 5 else slice(0, 1)
            batch = {b'labels': labels[s], b'data': rows[s]}
            if payload and i == 2:
                batch[b'x'] = payload
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/'
                                   f'{f"data_batch_{i + 1}" if i < 5 else "test_batch"}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return rows.reshape(-1, 3, 32, 32), labels


def test_cifar_archive_truncation_and_allow_list(tmp_path):
    rows, labels = cifar_tar(tmp_path / 'c.tar.gz')
    images, onehot = data.load_dataset(tmp_path / 'c.tar.gz')
    # batches 1..5 in order
    assert images.dtype == torch.uint8 and torch.equal(images, torch.from_numpy(rows))
    assert onehot.dtype == torch.float32 and onehot.shape == (15, 10)
    assert onehot.argmax(1).tolist() == labels
    cifar_tar(tmp_path / 'big.tar.gz', per_batch=50)
    write_bytes(tmp_path / 't.tar.gz', (tmp_path / 'big.tar.gz').read_bytes()[:20000])
    with pytest.raises(ValueError, match='not a readable CIFAR-10'):
        data.load_dataset(tmp_path / 't.tar.gz')
    # only numpy's array reconstruction and the bytes codec are allowed: any other global (numpy's
    # too) is refused
    for payload, name in [(Evil(os.system, 'true'), 'system'),
                          (Evil(np.load, 'x.npy'), 'numpy.load'),
                          (Evil(np.frombuffer, b'\0' * 8), 'numpy.frombuffer')]:
        cifar_tar(tmp_path / 'e.tar.gz', payload=payload)
        with pytest.raises(ValueError, match=f'e.tar.gz: not a readable CIFAR.*refusing to load '
                                             f'global .*{name}'):
            data.load_dataset(tmp_path / 'e.tar.gz')


@pytest.mark.parametrize('kind', ['zip', 'folder'])
def test_edm_dataset_zip_folder_grayscale_and_errors(tmp_path, kind):
    ext = '.zip' if kind == 'zip' else ''
    files, chw, _ = edm_files()
    classes = [2, 0, 1, 1, 0]  # the i-th image (by name) is of class classes[i]
    # dataset.json lists the images in another order than their names: labels follow the names
    pairs = [[n, c] for n, c in zip(files, classes)]
    meta = {'labels': pairs[::-1]}
    images, onehot = data.load_dataset(write_dataset(tmp_path / f'd{ext}', files, meta, kind))
    assert torch.equal(images, torch.from_numpy(chw)) and onehot.shape == (5, 3)
    assert onehot.argmax(1).tolist() == classes
    upper = {n.replace('.png', '.PNG') if i % 2 else n: b for i, (n, b) in enumerate(files.items())}
    images, _ = data.load_dataset(write_dataset(tmp_path / f'u{ext}', upper, None, kind))
    assert torch.equal(images, torch.from_numpy(chw))  # EDM lower-cases the extension too
    gfiles, chw, _ = edm_files(n=3, rgb=False)
    images, labels = data.load_dataset(write_dataset(tmp_path / f'g{ext}', gfiles, None, kind))
    assert torch.equal(images, torch.from_numpy(chw)) and images.shape == (3, 1, 8, 8)
    assert labels.shape == (3, 0)
    bigger = {**files, '00000/img00000009.png': png_bytes(np.zeros((16, 16, 3), np.uint8))}
    gone = {'labels': [[n, 0] for n in files] + [['00000/gone.png', 1]]}
    for i, (fs, meta, msg) in enumerate([
            (files, gone, 'not in the dataset, e.g. 00000/gone.png'),
            (files, {'labels': [[n, 0] for n in list(files)[:2]]},
             'no label for 3 image.*img00000002'),
            (bigger, None, r'img00000009.png is \(3, 16, 16\)')]):
        with pytest.raises(ValueError, match=msg):
            data.load_dataset(write_dataset(tmp_path / f'e{i}{ext}', fs, meta, kind))
    if kind == 'zip':
        write_bytes(tmp_path / 'trunc.zip', (tmp_path / 'd.zip').read_bytes()[:-40])
        with pytest.raises(ValueError, match='unreadable dataset'):
            data.load_dataset(tmp_path / 'trunc.zip')
    with pytest.raises(FileNotFoundError):
        data.load_dataset(tmp_path / f'nope{ext or "/"}')

#----------------------------------------------------------------------------
# Batch streams: epochs are permutations drawn from (seed, epoch), ranks take disjoint shards,
# `start` resumes; and the data must fit the teacher.

def test_batches_sharding_epochs_and_teacher_match():
    n = 11
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels, shards = torch.eye(n), []

    def stream(rank, start=0):
        return data.infinite_batches(images, labels, batch=3, seed=7, rank=rank, world_size=2,
                                     start=start)

    for rank in range(2):
        it = stream(rank)
        x, y = (torch.cat(t) for t in zip(*[next(it) for _ in range(4)]))
        # labels travel with their images, in [-1, 1]
        assert torch.equal(x, images[y.argmax(1)].float() / 127.5 - 1)
        shards.append(y.argmax(1)[:6 - rank].tolist())  # the first epoch's shard
    assert sorted(shards[0] + shards[1]) == list(range(n))  # disjoint and complete
    for rank in range(2):  # `start` resumes each rank's stream (shards of 6 and 5 images)
        resumed, it = stream(rank, start=2), stream(rank)
        for _ in range(2):
            next(it)
        assert all(torch.equal(next(it)[1], next(resumed)[1]) for _ in range(3)), rank

    def take(seed):
        it = data.infinite_batches(images[:8], torch.eye(8), 8, seed)
        return [next(it)[1].argmax(1).tolist() for _ in range(3)]

    a = take(3)
    assert a == take(3) and a != take(4) and a[0] != a[1]
    assert all(sorted(e) == list(range(8)) for e in a)
    net = types.SimpleNamespace(img_resolution=32, img_channels=3, label_dim=10)
    img, lab = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 10)
    assert data.check_dataset_matches(img, lab, net) is lab
    for bad, msg in [((torch.zeros(2, 3, 64, 64), lab), 'resolution 64x64 .* resolution 32'),
                     ((torch.zeros(2, 1, 32, 32), lab), '1 channels'),
                     ((img, lab[:, :0]), 'label_dim 0 .* label_dim 10')]:
        with pytest.raises(ValueError, match=msg):
            data.check_dataset_matches(*bad, net)
    net.label_dim = 0  # an unconditional teacher drops the labels
    assert data.check_dataset_matches(img, lab, net).shape == (2, 0)

#----------------------------------------------------------------------------
# EDM2's latent datasets (dataset_tool.py encode: .npy posterior mean and std per image, read a
# batch at a time), labels files for data-free runs, one-hot labels at the teacher's label_dim.

@pytest.mark.parametrize('kind', ['zip', 'folder'])
def test_latent_dataset_reads_edm2s_layout_on_demand(tmp_path, kind, monkeypatch):
    files, arrs = latent_files(n=5, res=8)
    names = sorted(files)
    meta = {'labels': [[n, c] for n, c in zip(names, [3, 0, 7, 3, 1])]}
    path = write_dataset(tmp_path / ('l.zip' if kind == 'zip' else 'l'), files, meta, kind)
    monkeypatch.setattr(data, 'MAX_DATASET_BYTES', 100)  # a lazy reader has no total bound
    ds = data.LatentDataset(path)
    assert len(ds) == 5 and ds.shape == (8, 8, 8) and ds.labels.tolist() == [3, 0, 7, 3, 1]
    reads = []
    read = ds._read
    ds._read = lambda name: reads.append(name) or read(name)
    x = ds.batch(torch.tensor([4, 0, 4]))
    assert reads == [names[4], names[0], names[4]]  # only what the batch needs
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(arrs[[4, 0, 4]]))
    batches = data.latent_batches(ds, 10, batch=2, seed=3)
    b, c = next(batches)
    idx = next(data.shard_indices(5, 2, 3))
    assert torch.equal(b, torch.from_numpy(arrs[idx.numpy()]))
    assert torch.equal(c, F.one_hot(ds.labels[idx], 10).float())  # at the teacher's label_dim
    assert next(data.latent_batches(ds, 0, 2, 3))[1].shape == (2, 0)  # unconditional teacher
    with pytest.raises(ValueError, match="class 7 >= the teacher's label_dim 5"):
        data.latent_batches(ds, 5, 2, 3)
    unlabeled = write_dataset(tmp_path / 'u.zip', files, None, 'zip')
    with pytest.raises(ValueError, match='no labels.*the teacher is conditional'):
        data.latent_batches(data.LatentDataset(unlabeled), 10, 2, 3)


def test_latent_dataset_refusals(tmp_path):
    files, arrs = latent_files(n=2, res=4)
    name = sorted(files)[1]
    cases = {'shape': npy_bytes(arrs[0][:4]), 'dtype': npy_bytes(arrs[0].astype(np.float64)),
             'other': npy_bytes(np.zeros((8, 2, 2), np.float32)),
             'object': npy_bytes(np.array([{}, 1], dtype=object)),
             'header': npy_bytes(arrs[0]).replace(b"(8, 4, 4)", b"(8, 4000, 4000)", 1)}
    for case, blob in cases.items():
        path = write_dataset(tmp_path / f'{case}.zip', {**files, name: blob}, None, 'zip')
        with pytest.raises(ValueError, match=f'{case}.zip:{name}: expected float32 latents'):
            data.LatentDataset(path).batch([0, 1])
    path = write_dataset(tmp_path / 'junk.zip', {**files, name: b'junk'}, None, 'zip')
    with pytest.raises(ValueError, match='not a readable .npy'):
        data.LatentDataset(path).batch([1])
    with pytest.raises(ValueError, match="no .npy latents"):
        data.LatentDataset(write_dataset(tmp_path / 'p', edm_files(2)[0]))


def test_labels_file_and_label_batches(tmp_path):
    labels = [[f'{i:05d}.png', c] for i, c in enumerate([5, 2, 2, 9])]
    path = write_bytes(tmp_path / 'dataset.json', json.dumps({'labels': labels}).encode())
    ys = data.read_labels_file(path)
    assert ys.tolist() == [5, 2, 2, 9]
    stream = data.label_batches(ys, 10, batch=3, seed=1)
    for _ in range(3):
        x, c = next(stream)
        assert x is None and c.shape == (3, 10) and set(c.argmax(1).tolist()) <= {2, 5, 9}
    first = next(data.label_batches(ys, 10, 3, 1))[1]
    assert torch.equal(first, F.one_hot(ys[next(data.shard_indices(4, 3, 1))], 10).float())
    for blob, match in ((b'{"labels": null}', 'expected'), (b'[1]', 'expected'),
                        (b'{"labels": [["a", -1]]}', 'labels must be'), (b'{', 'not valid JSON')):
        with pytest.raises(ValueError, match=match):
            data.read_labels_file(write_bytes(tmp_path / 'bad.json', blob))
