"""Tests of draw.py: the FID curve and the image panels (the toys' pictures are tested with their
runs in test_toy.py)."""
import io

import numpy as np
import PIL.Image
import pytest
import torch

import draw


def blue_columns(png):
    """The x pixel columns that hold the curve's colour."""
    a = np.asarray(PIL.Image.open(io.BytesIO(png)).convert('RGB')).astype(int)
    mask = (abs(a - np.array([31, 119, 180])).sum(-1) < 30)
    return np.flatnonzero(mask.any(0))


def test_curve_spans_its_points_and_ticks_cover_them():
    """The curve runs from the first point's column to the last one's, and the ticks cover the
    points (a curve drawn off its axes or from the wrong ends fails)."""
    points = [(0.5, 3.0), (0.1, 9.0), (0.3, 4.5)]  # unsorted: the curve sorts by x
    cols = blue_columns(draw.curve(points, width=560))
    xt = draw.ticks(*draw.widened(0.1, 0.5))
    left, right = 60, 560 - 20
    x_px = [left + (x - xt[0]) / (xt[-1] - xt[0]) * (right - left) for x in (0.1, 0.5)]
    assert xt[0] <= 0.1 and xt[-1] >= 0.5
    assert abs(cols.min() - (x_px[0] - 3)) <= 1 and abs(cols.max() - (x_px[1] + 3)) <= 1


def test_curve_of_one_point_and_of_none():
    assert len(blue_columns(draw.curve([(1.0, 2.0)]))) > 0  # a widened range around the point
    lo, hi = draw.widened(2.0, 2.0)
    assert lo < 2.0 < hi
    with pytest.raises(ValueError):
        draw.curve([])


def test_image_panels_show_each_image_upright_in_an_8x8_grid():
    """A panel of 64 images (16x16, none symmetric): image i sits at row i // 8, column i % 8 of
    the grid, upright, each pixel EDM's uint8 value repeated scale x scale times."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 16, 8, generator=g) * 2 - 1
    x = torch.cat([x, -x], 3)  # [64, 3, 16, 16]: the left half the negative of the right one
    png = draw.image_panels([('title', 'subtitle', x)], cols=8, scale=2)
    a = np.asarray(PIL.Image.open(io.BytesIO(png)).convert('RGB')).astype(int)
    u = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
    head, pad, cell = 30, 8, 17  # the layout: title band, margin, 16 pixels + 1 separator
    for i in (0, 9, 63):
        r, k = divmod(i, 8)
        top, left = head + 2 * (1 + r * cell), pad + 2 * (1 + k * cell)
        assert np.array_equal(a[top:top + 32:2, left:left + 32:2], u[i]), i
