"""Tests of augment: the pipe as SiD's runs build it (augment.edm_pipe), EDM's label layout, exact
flips, the warp against an independent computation of EDM's geometric pipeline, labels that
describe the warp applied (every geometric transform, measured on the image), and the run using
that pipe."""
import math

import numpy as np
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
# The warp against EDM's geometric pipeline (EDM augment.py, StyleGAN2-ADA's), recomputed here in
# float64 numpy from its definition: reflect padding by the batch's warped footprint + 6 px,
# zero-stuffing and correlation with the reversed sym6 taps (2x up), bilinear sampling on a 2x grid
# in grid_sample's align_corners=False coordinates (zeros outside), correlation with sym6 at stride
# 2 and a crop of 3 (2x down).

def _correlate(a, taps, pad, stride=1):
    """Along the last axis: out[j] = sum_t taps[t] a[stride j + t - pad] (zeros outside)."""
    ap = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(pad, pad)])
    n = (ap.shape[-1] - len(taps)) // stride + 1
    return np.stack([ap[..., stride * j:stride * j + len(taps)] @ taps for j in range(n)], -1)


def edm_geometry(images, G_inv):
    """EDM's geometric augmentation of float64 images [N,C,H,W] by G_inv [N,3,3] (output -> input
    pixel coordinates about the centre)."""
    N, C, H, W = images.shape
    taps = np.asarray(augment._SYM6)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = np.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]]).T
    reach = (G_inv @ corners)[:, :2]  # [N, xy, corner]
    m = np.concatenate([-reach, reach], 1).max(axis=(0, 2)) + [6 - cx, 6 - cy] * 2
    mx0, my0, mx1, my1 = np.ceil(np.clip(m, 0, [W - 1, H - 1] * 2)).astype(int)
    x = np.pad(images, [(0, 0), (0, 0), (my0, my1), (mx0, mx1)], mode='reflect')
    shift = np.array([[1, 0, (mx0 - mx1) / 2], [0, 1, (my0 - my1) / 2], [0, 0, 1]])
    for axis in (3, 2):  # up: zero-stuff to 2n - 1, correlate with the reversed taps, pad 6
        x = np.moveaxis(x, axis, -1)
        z = np.zeros(x.shape[:-1] + (2 * x.shape[-1] - 1,))
        z[..., ::2] = x
        x = np.moveaxis(_correlate(z, taps[::-1], 6), -1, axis)
    Hu, Wu, Ho, Wo = x.shape[2], x.shape[3], 2 * (H + 6), 2 * (W + 6)

    def affine(sx, sy, tx=0.0, ty=0.0):
        return np.array([[sx, 0, tx], [0, sy, ty], [0, 0, 1]])

    theta = (affine(2 / Wu, 2 / Hu) @ affine(1, 1, -0.5, -0.5) @ affine(2, 2) @ shift @ G_inv
             @ affine(0.5, 0.5) @ affine(1, 1, 0.5, 0.5) @ affine(Wo / 2, Ho / 2))
    gx, gy = np.meshgrid((2 * np.arange(Wo) + 1) / Wo - 1, (2 * np.arange(Ho) + 1) / Ho - 1)
    out = np.zeros((N, C, Ho, Wo))
    for n in range(N):  # bilinear, zeros outside, pixel k at normalised (2k + 1) / size - 1
        px = ((theta[n, 0, 0] * gx + theta[n, 0, 1] * gy + theta[n, 0, 2] + 1) * Wu - 1) / 2
        py = ((theta[n, 1, 0] * gx + theta[n, 1, 1] * gy + theta[n, 1, 2] + 1) * Hu - 1) / 2
        x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
        for dy in (0, 1):
            for dx in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
                inside = (xi >= 0) & (xi < Wu) & (yi >= 0) & (yi < Hu)
                value = x[n][:, np.clip(yi, 0, Hu - 1), np.clip(xi, 0, Wu - 1)]
                out[n] += np.where(inside, value * weight, 0)
    for axis in (3, 2):  # down: correlate with the taps at stride 2, pad 5, crop 3 on each side
        out = np.moveaxis(_correlate(np.moveaxis(out, axis, -1), taps, 5, 2)[..., 3:-3], -1, axis)
    return out


def rot(t):
    return augment._rot(torch.tensor([float(t)], dtype=torch.float64))[0]


def scale(sx, sy=None):
    sx = torch.tensor([float(sx)], dtype=torch.float64)
    sy = sx if sy is None else torch.tensor([float(sy)], dtype=torch.float64)
    return augment._scale(sx, sy)[0]


def shift(tx, ty):
    return augment._translate(torch.tensor([tx], dtype=torch.float64),
                              torch.tensor([ty], dtype=torch.float64))[0]


EXACT = [rot(math.pi / 2), rot(math.pi), rot(-math.pi / 2), torch.eye(3, dtype=torch.float64),
         shift(2.0, -3.0)]  # every sample lands on the 2x grid: equal to float64 rounding
WARPS = [rot(0.5), rot(2.5), scale(0.8), scale(1.6), scale(3.0),  # zoom in, out (past the cap)
         rot(-0.7) @ scale(1.3, 1 / 1.3) @ rot(0.7), shift(1.3, -2.2),
         rot(0.3) @ scale(0.9, 1.6) @ shift(1.3, -2.2)]


@pytest.mark.parametrize('size', [(16, 16), (12, 20)])
def test_warp_is_edm_geometric_pipeline(size):
    """Equal to EDM's pipeline: to float64 rounding where every sample lands on the 2x grid (exact
    90 / 180 degree rotations, integer shifts), else to the float32 sample coordinates (~1e-6 px
    on slopes ~3 per px); also when a zoom out reaches past EDM's footprint margin (it reads zeros
    there) and for a batch, whose margin is the whole batch's (EDM's)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, *size, dtype=torch.float64, generator=g)
    for G, atol in [(G, 1e-12) for G in EXACT] + [(G, 5e-5) for G in WARPS]:
        got = augment.warp_images(x, G[None]).numpy()
        np.testing.assert_allclose(got, edm_geometry(x.numpy(), G[None].numpy()), atol=atol, rtol=0)
    batch = torch.stack([rot(0.5), scale(1.6), shift(1.3, -2.2)])
    x = torch.randn(3, 1, *size, dtype=torch.float64, generator=g)
    np.testing.assert_allclose(augment.warp_images(x, batch).numpy(),
                               edm_geometry(x.numpy(), batch.numpy()), atol=5e-5, rtol=0)

#----------------------------------------------------------------------------
# Where content goes, measured on images: the centroid of a Gaussian blob. EDM rotates and scales
# about ((W-1)/2, (H-1)/2), and its 2x upsampling places sample k at k/2 as if sym6 were centred
# on tap 5; its centroid is tap t_c = sum t h_t / sum h_t = 5.098, so content sits delta =
# (t_c - 5)/2 = 0.049 px off in the upsampled image (both axes) and the downsampling takes it back.
# A map whose linear part A moves content: p -> c + A (p + delta - c) - delta, i.e. a centroid at
# offset d goes to c + A d + (A - I) delta. Identity and shifts: delta cancels. (The old placement
# (k - 5.5)/2 made delta -0.20 px: rotations about 15.70 instead of EDM's 15.45 at 32 px.)

H = W = 32
C0 = (W - 1) / 2  # the centre in pixel coordinates
TAPS = torch.tensor(augment._SYM6, dtype=torch.float64)
DELTA = float(((torch.arange(12) * TAPS).sum() / TAPS.sum() - 5) / 2)
BLOBS = [(1.5, -1.0, 1.5), (3.0, -2.0, 2.0)]  # offset (x right, y down) and std, in pixels


def blob_images(n, blob, dtype=torch.float32):
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing='ij')
    dx, dy, std = BLOBS[blob] if isinstance(blob, int) else blob
    image = torch.exp(-((xx - C0 - dx) ** 2 + (yy - C0 - dy) ** 2) / (2 * std ** 2))
    return image.to(dtype).expand(n, 1, H, W).contiguous()


def moments(images):
    """-> centroid x, centroid y and mean squared distance from the centroid, per image; and the
    second-moment matrices [N, 2, 2]."""
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing='ij')
    m = images[:, 0].double()
    mass = m.sum((1, 2))
    cx, cy = (m * xx).sum((1, 2)) / mass, (m * yy).sum((1, 2)) / mass
    ux, uy = xx - cx[:, None, None], yy - cy[:, None, None]
    cov = torch.stack([(m * a * b).sum((1, 2)) / mass
                       for a, b in ((ux, ux), (ux, uy), (uy, ux), (uy, uy))], 1).view(-1, 2, 2)
    return cx, cy, (m * (ux ** 2 + uy ** 2)).sum((1, 2)) / mass, cov


def where_content_goes(A, d):
    """The centroid [..., 2] of a blob at offset d [..., 2] (x, y from the centre) under a map
    with linear part A [..., 2, 2] that moves content (the inverse of G_inv's)."""
    delta = torch.full((2,), DELTA, dtype=torch.float64)
    moved = A @ d[..., None] + (A - torch.eye(2, dtype=torch.float64)) @ delta[:, None]
    return C0 + moved[..., 0]


@pytest.mark.parametrize('blob', [(0.0, 0.0, 2.0), (3.0, -2.0, 2.0)], ids=['centred', 'offset'])
def test_rotation_scale_aniso_about_the_centre(blob):
    """Rotations (90, 180 degrees and others), zooms and anisotropic stretches move a blob's
    centroid where EDM's geometry puts it (to ~5e-4 px; a quarter pixel off centre would be 0.2-0.5
    px), and a zoom by s scales its spread by s."""
    x = blob_images(1, blob, torch.float64)
    d = torch.tensor(blob[:2], dtype=torch.float64)
    spread0 = moments(x)[2]
    for G in [rot(math.pi / 2), rot(math.pi), rot(0.3), rot(-2.0), scale(0.8), scale(1.25),
              scale(1.2, 1 / 1.2), rot(-0.6) @ scale(1.3, 1 / 1.3) @ rot(0.6)]:
        A = torch.linalg.inv(G)[:2, :2]
        cx, cy, spread, _ = moments(augment.warp_images(x, G[None]))
        expect = where_content_goes(A, d)
        assert abs(cx.item() - expect[0].item()) < 3e-3 and abs(cy.item() - expect[1]) < 3e-3
        if G[0, 1] == 0 and G[0, 0] == G[1, 1]:  # isotropic zoom by s = 1 / G[0, 0]
            assert math.isclose((spread / spread0).sqrt().item(), 1 / G[0, 0].item(), rel_tol=0.01)
    assert 0.04 < DELTA < 0.06

#----------------------------------------------------------------------------
# Every label describes the warp applied, measured on the image: a Gaussian blob off the centre is
# flipped about the centre, moved by (w_x W, w_y H) * translate_frac_std pixels (content follows
# the label's sign), zoomed by s = 2^(scale_std w) (w > 0: larger), turned by -w (x right, y down:
# the label's angle w is G_inv's) and stretched by 2^(aniso_std w) along x, 1/that along y (the
# unrotated frame). Rows where only one geometric transform fired are picked by their labels (flip
# columns free). A small blob for the translations, a larger one for the rest, same draws.
# In a rotated frame the labels (w cos r, w sin r) do not fix the stretch: (-w, r + pi) has the
# same labels and the inverse stretch (EDM's labels), so only r = 0 rows are checked.

@pytest.fixture(scope='module')
def augmented():
    pipe, images, draws = augment.edm_pipe(0.5), [], []
    for blob in range(len(BLOBS)):
        torch.manual_seed(0)  # the same draws: the draws do not depend on the pixels
        out, labels = pipe(blob_images(2048, blob))
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


def only(labels, *columns):
    """Rows where no geometric label outside `columns` (2..8) is nonzero, and some inside is."""
    others = [c for c in range(2, 9) if c not in columns]
    return (labels[:, others] == 0).all(dim=1) & (labels[:, list(columns)] != 0).any(dim=1)


def test_translation_labels_move_the_content(augmented):
    pipe, images, labels, sign_x, sign_y = augmented
    cx, cy, _, _ = moments(images[0])
    dx, dy, std = BLOBS[0]
    bx, by = C0 + sign_x * dx, C0 + sign_y * dy  # after the flips
    tx = labels[:, 7].double() * W * pipe.translate_frac_std
    ty = labels[:, 8].double() * H * pipe.translate_frac_std
    rows = only(labels, 7, 8)
    rows &= clear_of_edges(bx, tx, 5 * std, W) & clear_of_edges(by, ty, 5 * std, H)
    assert rows.sum() >= 20 and (labels[rows, 0] == 1).any() and (labels[rows, 1] == 1).any()
    assert tx[rows].abs().max() > 4 and ty[rows].abs().max() > 4
    # fractional shifts as exact as the band-limited resampler (measured ~1e-5 px)
    torch.testing.assert_close(cx[rows], bx[rows] + tx[rows], atol=0.01, rtol=0)
    torch.testing.assert_close(cy[rows], by[rows] + ty[rows], atol=0.01, rtol=0)


def check_linear_rows(augmented, rows, A, spread_scale=None, second_moments=False):
    """The blob of the rows lands where a content map with linear part A [R, 2, 2] puts it (EDM's
    geometry, flips applied first); its spread scales by spread_scale where given, and its second
    moments become A cov A^T (second_moments; resampling adds a blur of ~0.05 px^2 at 2x)."""
    pipe, images, labels, sign_x, sign_y = augmented
    cx, cy, spread, cov = moments(images[1][rows])
    dx, dy, _ = BLOBS[1]
    d = torch.stack([sign_x[rows] * dx, sign_y[rows] * dy], 1)
    expect = where_content_goes(A, d)
    # bilinear sampling of the 2x image moves a centroid by up to ~0.013 px at these sizes; the
    # old quarter-pixel offset moved it by 0.17 px or more (rotations by |w| > 0.5, zooms by 7 %)
    torch.testing.assert_close(cx, expect[:, 0], atol=0.02, rtol=0)
    torch.testing.assert_close(cy, expect[:, 1], atol=0.02, rtol=0)
    _, _, spread0, cov0 = moments(blob_images(1, 1))
    if second_moments:
        torch.testing.assert_close(cov, A @ cov0 @ A.transpose(1, 2), atol=0.1, rtol=0.02)
    if spread_scale is not None:  # resampling blur: ~0.5 % of the radius at these sizes
        torch.testing.assert_close((spread / spread0).sqrt(), spread_scale, atol=0, rtol=0.02)


def test_scale_labels_zoom_in_the_labelled_direction(augmented):
    pipe, _, labels, _, _ = augmented
    s = (labels[:, 2].double() * pipe.scale_std).exp2()
    # isotropic scale only; |w| > 1/2 (s 7 % or more from 1); no zoom out below 0.75, where the
    # reflect-padded copies come into view
    rows = only(labels, 2) & (labels[:, 2].abs() > 0.5) & (s > 0.75)
    assert rows.sum() >= 20 and s[rows].min() < 0.9 < 1.1 < s[rows].max()
    # w > 0 zooms in: the radius grows by s; about EDM's centre
    A = s[rows, None, None] * torch.eye(2, dtype=torch.float64)
    check_linear_rows(augmented, rows, A, s[rows])


def test_rotation_labels_turn_the_content(augmented):
    _, _, labels, _, _ = augmented
    rows = only(labels, 3, 4)
    w = torch.atan2(labels[rows, 4].double(), labels[rows, 3].double() + 1)  # (cos w - 1, sin w)
    assert rows.sum() >= 20 and w.min() < -2.5 and w.max() > 2.5  # the full circle
    c, s = w.cos(), w.sin()
    A = torch.stack([c, s, -s, c], 1).view(-1, 2, 2)  # R(-w): G_inv is R(w)
    check_linear_rows(augmented, rows, A)


def test_aniso_labels_stretch_along_x(augmented):
    pipe, _, labels, _, _ = augmented
    s = (labels[:, 5].double() * pipe.aniso_std).exp2()
    # the unrotated frame, |w| > 1/2, no axis zoomed out below 0.75 (reflected copies in view)
    rows = only(labels, 5, 6) & (labels[:, 6] == 0) & (labels[:, 5].abs() > 0.5)
    rows &= (s > 0.75) & (s < 1 / 0.75)
    s = s[rows]
    assert rows.sum() >= 10 and s.min() < 0.9 < 1.1 < s.max()
    A = torch.diag_embed(torch.stack([s, 1 / s], 1))  # w > 0: wider along x, narrower along y
    check_linear_rows(augmented, rows, A, second_moments=True)

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
