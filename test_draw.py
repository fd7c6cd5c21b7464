"""Tests of draw.py: the FID curve, the image panels, the toy's curve against its end line, the
mechanism picture (the toys' pictures are tested with their runs in test_toy.py)."""
import io

import numpy as np
import PIL.Image
import pytest
import torch

import draw
import toy


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


def test_toy_curve_ends_with_the_end_line_figures():
    """toy.gif and toy_quality.png take their figures from toy_curve: its last entry is what the
    run's end line prints (the same samples, the same energy sample)."""
    w, gen = toy.Toy2D(), torch.Generator().manual_seed(0)
    frames = [('0 kimg', torch.randn(2000, 2, generator=gen)),
              ('300 kimg', w.teacher.sample(2000, gen) * 1.1)]
    curve = draw.toy_curve(frames, w.teacher)
    assert [k for k, _ in curve] == [0.0, 300.0]
    q = curve[-1][1]
    assert q == toy.toy_figures(frames[-1][1], w.teacher)
    line = w.quality_line(frames[-1][1])
    assert f"energy distance {q['energy']:.4f}," in line
    assert f"clustering {q['clustering']:.3f}" in line


def test_mechanism_picture_draws_each_part():
    """Each colour of the legend appears in the panels: samples, x_g, x_t, f_phi, f_psi, arrows."""
    T, gen = toy.ToyMixture(), torch.Generator().manual_seed(1)
    x = T.sample(200, gen)
    panel = dict(title='t', samples=x, x_g=x[:5], x_t=x[:5] + 0.3, y_phi=x[:5] * 0.5,
                 y_psi=x[:5] * 0.2, direction=torch.randn(5, 2, generator=gen), lines=['a', 'b'])
    png = draw.mechanism_picture([panel, panel], T)
    a = np.asarray(PIL.Image.open(io.BytesIO(png)).convert('RGB')).astype(int)
    w = a.shape[1]
    assert w == 2 * (48 + 300 + 26)
    for colour in (draw.YELLOW, draw.CYAN, draw.MAGENTA, draw.ORANGE):
        hits = (abs(a - np.array(colour)).sum(-1) < 10)
        assert hits[:, : w // 2].any() and hits[:, w // 2:].any()
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
