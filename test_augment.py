"""Tests of augment: the pipe as SiD's runs build it (augment.edm_pipe), EDM's label layout, exact
flips, labels that describe the warp applied, and the run using that pipe."""
import math

import pytest
import torch
import torch.nn.functional as F

import augment
from conftest import cfg_for, run_quiet

#----------------------------------------------------------------------------
# Label layout (EDM's augment.py with SiD's settings): xflip, yflip, scale, rotation (cos - 1, sin),
# anisotropy (w cos r, w sin r), translation (x, y); exact flips; seeded.

def test_augment_p0_flips_layout_and_reproducible():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y, labels = augment.edm_pipe(0)(x)  # the identity warp still resamples: round-off ~1e-5
    assert torch.allclose(y, x, atol=1e-4) and labels.shape == (8, 9) and not labels.any()
    # xflip=1e8: a fair coin whatever p
    y, labels = augment.edm_pipe(0.12)(torch.randn(4000, 1, 2, 2))
    assert abs(labels[:, 0].mean() - 0.5) < 0.04
    assert abs((labels[:, 2] != 0).float().mean() - 0.12) < 0.02
    x = torch.randn(64, 3, 8, 8)
    y, labels = augment.AugmentPipe(p=1, xflip=1, yflip=1)(x)  # flips only

    def flip(v, a, b):
        v = v.flip(2) if a else v
        return v.flip(1) if b else v

    assert all(torch.equal(y[i], flip(x[i], labels[i, 0], labels[i, 1])) for i in range(64))
    assert 0 < labels[:, 0].sum() < 64 and 0 < labels[:, 1].sum() < 64
    x = torch.randn(2, 3, 16, 16)  # an integer translation is a reflect-padded shift
    pad = F.pad(x, [8, 8, 8, 8], mode='reflect')
    G_inv = augment._translate(torch.tensor([-3.0, 2.0]), torch.tensor([1.0, -4.0]))
    y = augment.warp_images(x, G_inv)
    torch.testing.assert_close(y, torch.stack([pad[0, :, 9:25, 5:21], pad[1, :, 4:20, 10:26]]),
                               atol=1e-5, rtol=0)
    x = torch.randn(256, 3, 8, 8)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(augment.edm_pipe(1)(x))
    (y1, l1), (y2, l2) = runs
    assert torch.equal(l1, l2) and torch.allclose(y1, y2, atol=1e-5)  # seeded
    # p = 1: every transform fires (the rotation's cos - 1 and the translation columns are
    # nonzero in every row; aniso's w sin r is 0 where its frame is not rotated)
    assert (l1[:, 2:] != 0).all(dim=0)[[0, 1, 2, 5, 6]].all()


def test_augment_sync_free_identity_rows_exact_rows_independent():
    # no host values: any .item()/.tolist() (a GPU sync) would raise here
    y, labels = augment.edm_pipe(0.5)(torch.empty(8, 3, 16, 16, device='meta'))
    assert y.shape == (8, 3, 16, 16) and labels.shape == (8, 9)
    x = torch.randn(512, 3, 8, 8)
    torch.manual_seed(0)
    y, labels = augment.edm_pipe(0.3)(x)
    ident = (labels[:, 2:] == 0).all(dim=1)
    flipped = torch.where(labels[:, 0, None, None, None] == 1, x.flip(3), x)
    flipped = torch.where(labels[:, 1, None, None, None] == 1, flipped.flip(2), flipped)
    assert 50 < ident.sum() < 400 and torch.equal(y[ident], flipped[ident])  # not resampled
    x2 = torch.where(torch.arange(512)[:, None, None, None] % 2 == 0, x, torch.randn_like(x))
    torch.manual_seed(0)  # other images in the batch (same draws) leave a row's output as it was
    y2, labels2 = augment.edm_pipe(0.3)(x2)
    assert torch.equal(labels2, labels) and torch.allclose(y2[::2], y[::2], atol=1e-6, rtol=0)

#----------------------------------------------------------------------------
# Every label describes the warp applied, measured on the image: a Gaussian blob off the centre is
# flipped about the centre, moved by (w_x W, w_y H) * translate_frac_std pixels (content follows
# the label's sign) and zoomed by s = 2^(scale_std w) (w > 0: larger). Rows where only one
# geometric transform fired are picked by their labels (flip columns free). A small blob for the
# translations, a larger one for the zooms, warped by the same draws.

H = W = 32
C0 = (W - 1) / 2  # the centre in pixel coordinates
BLOBS = [(1.5, -1.0, 1.5), (3.0, -2.0, 2.0)]  # offset (x right, y down) and std, in pixels


def blob_images(n, blob):
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing='ij')
    dx, dy, std = BLOBS[blob]
    image = torch.exp(-((xx - C0 - dx) ** 2 + (yy - C0 - dy) ** 2) / (2 * std ** 2))
    return image.float().expand(n, 1, H, W).contiguous()


def moments(images):
    """-> centroid x, centroid y and mean squared distance from the centroid, per image."""
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing='ij')
    m = images[:, 0].double()
    mass = m.sum((1, 2))
    cx, cy = (m * xx).sum((1, 2)) / mass, (m * yy).sum((1, 2)) / mass
    dx2 = (xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2
    return cx, cy, (m * dx2).sum((1, 2)) / mass


@pytest.fixture(scope='module')
def augmented():
    pipe, images, draws = augment.edm_pipe(0.5), [], []
    for blob in range(len(BLOBS)):
        torch.manual_seed(0)  # the same draws: the draws do not depend on the pixels
        out, labels = pipe(blob_images(1024, blob))
        images.append(out)
        draws.append(labels)
    assert torch.equal(draws[0], draws[1])
    sign_x = 1 - 2 * labels[:, 0].double()  # a flip mirrors the blob's offset
    sign_y = 1 - 2 * labels[:, 1].double()
    return pipe, images, labels, sign_x, sign_y


def clear_of_edges(b, t, margin, size):
    """The blob at b moved by t, and its reflect-padded copies at -b + t and 2 (size - 1) - b + t,
    each at least `margin` from the edges of the image (inside, resp. outside)."""
    moved = b + t
    return ((moved >= margin) & (moved <= size - 1 - margin) & (b - t >= margin)
            & (size - 1 - b + t >= margin))


def test_translation_labels_move_the_content(augmented):
    pipe, images, labels, sign_x, sign_y = augmented
    cx, cy, _ = moments(images[0])
    dx, dy, std = BLOBS[0]
    bx, by = C0 + sign_x * dx, C0 + sign_y * dy  # after the flips
    tx = labels[:, 7].double() * W * pipe.translate_frac_std
    ty = labels[:, 8].double() * H * pipe.translate_frac_std
    rows = (labels[:, 2:7] == 0).all(dim=1) & (labels[:, 7:] != 0).any(dim=1)  # translation only
    rows &= clear_of_edges(bx, tx, 5 * std, W) & clear_of_edges(by, ty, 5 * std, H)
    assert rows.sum() >= 20 and (labels[rows, 0] == 1).any() and (labels[rows, 1] == 1).any()
    assert tx[rows].abs().max() > 4 and ty[rows].abs().max() > 4
    # fractional shifts as exact as the band-limited resampler (measured ~1e-5 px)
    torch.testing.assert_close(cx[rows], bx[rows] + tx[rows], atol=0.01, rtol=0)
    torch.testing.assert_close(cy[rows], by[rows] + ty[rows], atol=0.01, rtol=0)


def test_scale_labels_zoom_in_the_labelled_direction(augmented):
    pipe, images, labels, sign_x, sign_y = augmented
    cx, cy, spread = moments(images[1])
    dx, dy, _ = BLOBS[1]
    s = (labels[:, 2].double() * pipe.scale_std).exp2()
    # isotropic scale only; |w| > 1/2 (s 7 % or more from 1); no zoom out below 0.75, where the
    # reflect-padded copies come into view
    rows = (labels[:, 3:] == 0).all(dim=1) & (labels[:, 2].abs() > 0.5) & (s > 0.75)
    assert rows.sum() >= 20 and s[rows].min() < 0.9 < 1.1 < s[rows].max()
    # the blob's radius grows by s: w > 0 zooms in (resampling blur: ~0.5 % at these sizes)
    spread0 = moments(blob_images(1, 1))[2]
    ratio = (spread[rows] / spread0).sqrt()
    torch.testing.assert_close(ratio, s[rows], atol=0, rtol=0.02)
    # about the centre: the flipped offset grows by s too (to 0.5 px: the zoom centre's sub-pixel
    # position is not what this test checks)
    torch.testing.assert_close(cx[rows], C0 + s[rows] * sign_x[rows] * dx, atol=0.5, rtol=0)
    torch.testing.assert_close(cy[rows], C0 + s[rows] * sign_y[rows] * dy, atol=0.5, rtol=0)

#----------------------------------------------------------------------------
# The run's pipe: sid builds its augmentation with augment.edm_pipe(--augment) and applies it.

def test_run_augments_with_edm_pipe(tmp_path, monkeypatch):
    made, calls = [], []
    make = augment.edm_pipe

    def recording_pipe(p):
        pipe = make(p)
        made.append((p, vars(pipe).copy()))

        def call(images):
            calls.append(tuple(images.shape))
            return pipe(images)

        return call

    monkeypatch.setattr(augment, 'edm_pipe', recording_pipe)
    run_quiet(cfg_for(tmp_path / 'run', iters=1, augment=0.5))
    assert made == [(0.5, vars(make(0.5)))] and math.isclose(made[0][1]['xflip'], 1e8)
    assert calls and all(shape == (2, 3, 32, 32) for shape in calls)  # batch_gpu 2 images
