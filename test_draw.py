"""Tests of draw.py: the FID curve (the toys' pictures are tested with their runs in test_toy.py)."""
import io

import numpy as np
import PIL.Image
import pytest

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
