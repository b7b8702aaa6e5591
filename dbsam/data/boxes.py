"""Box prompts from masks.

Boxes are in original pixel coordinates, (x0, y0, x1, y1) with x the column
and y the row; x1/y1 are the last object column/row (inclusive), the MedSAM
convention. Training moves each side outward by its own random 0..max_jitter
pixels, so the model learns loose boxes; evaluation uses a fixed margin.
"""

from __future__ import annotations

import math

import numpy as np

MAX_JITTER = 20


def _outward(rng, n_sides, margin, max_jitter):
    if margin < 0 or max_jitter < 0:
        raise ValueError(f"margin and max_jitter must be >= 0, got {margin}, {max_jitter}")
    if rng is None:
        return np.full(n_sides, margin, np.int64)
    return margin + rng.integers(0, max_jitter + 1, size=n_sides)


def box_from_mask(mask, margin: int = 0, rng: np.random.Generator | None = None,
                  max_jitter: int = MAX_JITTER) -> tuple[int, int, int, int]:
    """Tight box around the non-zero pixels of a 2D mask, grown and clipped.

    Each side moves outward by `margin`, plus (when `rng` is given) an
    independent random 0..max_jitter pixels. Raises ValueError for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"box_from_mask needs a 2D mask, got shape {mask.shape}")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("cannot make a box from an empty mask")
    grow = _outward(rng, 4, margin, max_jitter)
    h, w = mask.shape
    return clip_box((int(cols.min() - grow[0]), int(rows.min() - grow[1]),
                     int(cols.max() + grow[2]), int(rows.max() + grow[3])), h, w)


def clip_box(box, height: int, width: int):
    """Clip (x0, y0, x1, y1) to the pixels of an image of height x width."""
    x0, y0, x1, y1 = box
    return (min(max(x0, 0), width - 1), min(max(y0, 0), height - 1),
            min(max(x1, 0), width - 1), min(max(y1, 0), height - 1))


def validate_box(box, height: int, width: int):
    """Check a user box against the image and return it clipped.

    Raises ValueError when it is malformed, inverted (x1 < x0 or y1 < y0) or
    lies entirely outside the image.
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"a box is 4 numbers (x0, y0, x1, y1), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {box!r} has non-finite coordinates")
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {box!r} is inverted: need x0 <= x1 and y0 <= y1")
    if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
        raise ValueError(
            f"box {box!r} lies entirely outside the {width}x{height} (WxH) image")
    return clip_box((x0, y0, x1, y1), height, width)


def box3d_from_mask(mask, margin: int = 0, rng: np.random.Generator | None = None,
                    max_jitter: int = MAX_JITTER) -> tuple[int, int, int, int, int, int]:
    """(x0, y0, z0, x1, y1, z1) around a 3D mask in numpy (D, H, W) order.

    x indexes the last axis, y the middle one, z the first; the same margin and
    jitter rules as `box_from_mask`, per side. Transpose NIfTI (i, j, k) arrays
    first if their axes mean something else.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"box3d_from_mask needs a 3D mask, got shape {mask.shape}")
    zs, ys, xs = np.nonzero(mask)
    if zs.size == 0:
        raise ValueError("cannot make a box from an empty mask")
    grow = _outward(rng, 6, margin, max_jitter)
    d, h, w = mask.shape
    lo = (xs.min() - grow[0], ys.min() - grow[1], zs.min() - grow[2])
    hi = (xs.max() + grow[3], ys.max() + grow[4], zs.max() + grow[5])
    limits = (w - 1, h - 1, d - 1)
    lo = tuple(int(max(v, 0)) for v in lo)
    hi = tuple(int(min(v, m)) for v, m in zip(hi, limits))
    return lo + hi
