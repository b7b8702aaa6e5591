"""Dice and NSD: hand-computed answers, empty-mask rules, reference agreement."""

import csv
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage

from dbsam.metrics import dice, evaluate_case, nsd, summarize, surface_distances, write_case_csv

DIAG = math.sqrt(2) / 2  # contour length across a cell corner at 1 mm spacing


def square(shape, top, left, side):
    m = np.zeros(shape, bool)
    m[top:top + side, left:left + side] = True
    return m


def cube(shape, corner, side):
    m = np.zeros(shape, bool)
    z, y, x = corner
    m[z:z + side, y:y + side, x:x + side] = True
    return m


# --- Dice -------------------------------------------------------------------


def test_dice_offset_squares_by_hand():
    a = square((30, 30), 5, 5, 10)
    b = square((30, 30), 5, 7, 10)  # shifted 2 px: overlap 10 x 8
    assert dice(a, b) == pytest.approx(2 * 80 / 200)
    assert dice(a, a) == 1.0


def test_dice_disjoint_and_empty_rules():
    a = square((20, 20), 0, 0, 5)
    b = square((20, 20), 10, 10, 5)
    empty = np.zeros((20, 20), bool)
    assert dice(a, b) == 0.0
    assert dice(empty, empty) == 1.0
    assert dice(a, empty) == 0.0
    assert dice(empty, a) == 0.0


def test_dice_accepts_label_values_and_rejects_shape_mismatch():
    a = square((10, 10), 2, 2, 4).astype(np.uint8) * 7
    assert dice(a, a > 0) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))


# --- surface elements ----------------------------------------------------------


def test_square_contour_length():
    # Straight runs count 1 mm per corner, the 4 chamfered corners sqrt(2)/2.
    n = 10
    _, area, _, _ = surface_distances(square((20, 20), 3, 4, n), square((20, 20), 3, 4, n))
    assert area.sum() == pytest.approx(4 * (n - 1) + 4 * DIAG)


def test_cube_surface_area():
    # (n-1)^2 unit squares per face, chamfers along 12 edges, 8 corner triangles.
    n = 5
    m = cube((9, 9, 9), (2, 2, 2), n)
    _, area, _, _ = surface_distances(m, m)
    expected = 6 * (n - 1) ** 2 + 12 * (n - 1) * DIAG + 8 * math.sqrt(3) / 8
    assert area.sum() == pytest.approx(expected)


def test_cube_area_scales_with_spacing():
    m = cube((8, 8, 8), (2, 2, 2), 4)
    _, iso, _, _ = surface_distances(m, m, (1, 1, 1))
    _, big, _, _ = surface_distances(m, m, (2, 2, 2))
    assert big.sum() == pytest.approx(4 * iso.sum())


# --- NSD known answers -------------------------------------------------------------


def test_nsd_identical_and_one_pixel_shift():
    a = square((30, 30), 5, 5, 10)
    assert nsd(a, a) == 1.0
    assert nsd(a, square((30, 30), 5, 6, 10), tolerance_mm=1.0) == 1.0
    assert nsd(a, square((30, 30), 5, 6, 10), tolerance_mm=0.0) < 1.0


def test_nsd_three_pixel_shift_by_hand():
    # Two 10x10 squares 3 columns apart, 1 mm tolerance. On each square: the
    # top and bottom runs match from 1 column before the other square's edge
    # on (8 straight elements + 1 chamfer each), the trailing side only in the
    # rows next to the other square's top/bottom (2 elements), the leading side
    # not at all. Total per square: 36 straight + 4 chamfers.
    a = square((30, 30), 5, 5, 10)
    b = square((30, 30), 5, 8, 10)
    matched = 2 * (8 + DIAG) + 2
    total = 36 + 4 * DIAG
    assert nsd(a, b, 1.0, (1, 1)) == pytest.approx(matched / total)
    assert nsd(b, a, 1.0, (1, 1)) == pytest.approx(matched / total)


def test_nsd_anisotropic_spacing_by_hand():
    a = square((30, 30), 5, 5, 10)
    b = square((30, 30), 5, 8, 10)
    # Columns 0.25 mm apart: the 3-column shift is 0.75 mm, all within 1 mm.
    assert nsd(a, b, 1.0, (1.0, 0.25)) == pytest.approx(1.0)
    # Rows 0.25 mm apart: the trailing side now matches within 4 rows of the
    # other square's top/bottom (8 of its 9 elements, 0.25 mm each).
    d = 0.5 * math.hypot(0.25, 1.0)
    matched = 2 * (8 * 1.0 + d) + 8 * 0.25
    total = 18 * 1.0 + 18 * 0.25 + 4 * d
    assert nsd(a, b, 1.0, (0.25, 1.0)) == pytest.approx(matched / total)


def test_nsd_grows_with_tolerance():
    a = square((40, 40), 5, 5, 12)
    b = square((40, 40), 8, 9, 12)
    values = [nsd(a, b, t) for t in (0.0, 1.0, 2.0, 3.0, 6.0)]
    assert values == sorted(values)
    assert values[0] < values[-1] == pytest.approx(1.0)


def test_nsd_3d_shift_and_far_apart():
    a = cube((16, 16, 16), (2, 2, 2), 6)
    assert nsd(a, cube((16, 16, 16), (2, 2, 3), 6), 1.0) == 1.0
    assert nsd(a, cube((16, 16, 16), (9, 9, 9), 6), 1.0) == 0.0
    # A 2-voxel shift along z: within 1 mm at 1 mm spacing? no; at 0.5 mm, yes.
    shifted = cube((16, 16, 16), (4, 2, 2), 6)
    assert nsd(a, shifted, 1.0, (1, 1, 1)) < 0.9
    assert nsd(a, shifted, 1.0, (0.5, 1, 1)) == pytest.approx(1.0)


def test_nsd_empty_rules():
    a = square((20, 20), 3, 3, 6)
    empty = np.zeros((20, 20), bool)
    assert nsd(empty, empty) == 1.0
    assert nsd(a, empty) == 0.0
    assert nsd(empty, a) == 0.0
    assert nsd(np.zeros((5, 5, 5)), np.zeros((5, 5, 5))) == 1.0


def test_nsd_rejects_bad_arguments():
    a = square((10, 10), 2, 2, 4)
    with pytest.raises(ValueError, match="spacing"):
        nsd(a, a, 1.0, (1, 1, 1))
    with pytest.raises(ValueError, match="2D or 3D"):
        nsd(np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="tolerance"):
        nsd(a, a, -1.0)


masks_2d = st.integers(0, 2**32 - 1).map(
    lambda seed: ndimage.gaussian_filter(np.random.default_rng(seed).random((16, 16)), 1.5) > 0.5)


@settings(max_examples=40, deadline=None)
@given(masks_2d, masks_2d, st.floats(0.0, 4.0))
def test_nsd_properties(a, b, tol):
    value = nsd(a, b, tol)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(nsd(b, a, tol))
    assert nsd(a, a, tol) == 1.0


# --- agreement with DeepMind's surface-distance --------------------------------


def _random_pair(rng, shape):
    while True:
        a = ndimage.gaussian_filter(rng.random(shape), 1.2) > 0.5
        if rng.random() < 0.5:
            b = ndimage.binary_dilation(a, iterations=int(rng.integers(1, 3)))
        else:
            b = ndimage.gaussian_filter(rng.random(shape), 1.2) > 0.5
        if a.any() and b.any():
            return a, b


@pytest.mark.parametrize("ndim", [2, 3])
def test_nsd_matches_surface_distance(ndim):
    sd = pytest.importorskip(
        "surface_distance", reason="reference check needs the test extra: pip install surface-distance")
    rng = np.random.default_rng(1234 + ndim)
    shape = (24, 22) if ndim == 2 else (12, 11, 10)
    for _ in range(25):
        a, b = _random_pair(rng, shape)
        spacing = tuple(rng.uniform(0.3, 3.0, ndim))
        tol = float(rng.uniform(0.0, 4.0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its scipy.ndimage.filters import
            ref = sd.compute_surface_dice_at_tolerance(
                sd.compute_surface_distances(b, a, spacing), tol)
        assert nsd(a, b, tol, spacing) == pytest.approx(ref, abs=1e-6)


# --- per-case evaluation ----------------------------------------------------------


def _label_volumes():
    gt = np.zeros((6, 20, 20), np.uint8)
    gt[1:5, 2:8, 2:8] = 1
    gt[1:5, 10:16, 10:16] = 2
    pred = gt.copy()
    pred[1:5, 10:16, 10:16] = 0
    pred[1:5, 10:16, 11:17] = 2  # label 2 shifted one voxel
    pred[0, 0, 0] = 3  # label only in the prediction
    return pred, gt


def test_evaluate_case_rows():
    pred, gt = _label_volumes()
    rows = evaluate_case(pred, gt, spacing=(3.0, 1.0, 1.0), tolerance_mm=1.0, case="c1")
    by_label = {r["label"]: r for r in rows}
    assert sorted(by_label) == [1, 2, 3]
    assert by_label[1]["dsc"] == 1.0 and by_label[1]["nsd"] == 1.0
    assert by_label[2]["dsc"] == pytest.approx(2 * 4 * 6 * 5 / (2 * 144))
    assert by_label[2]["nsd"] == 1.0  # 1 mm shift, 1 mm tolerance
    assert by_label[3]["dsc"] == 0.0 and by_label[3]["gt_voxels"] == 0
    assert all(r["case"] == "c1" for r in rows)
    only = evaluate_case(pred, gt, spacing=(3, 1, 1), labels=[2])
    assert [r["label"] for r in only] == [2]


def test_csv_and_summary(tmp_path):
    pred, gt = _label_volumes()
    rows = evaluate_case(pred, gt, (1, 1, 1), labels=[1, 2], case="a")
    rows += evaluate_case(gt, gt, (1, 1, 1), labels=[1, 2], case="b")
    path = write_case_csv(rows, tmp_path / "out" / "cases.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert len(read) == 4 and read[0]["case"] == "a"
    assert float(read[1]["dsc"]) == pytest.approx(rows[1]["dsc"])
    summary = summarize(read)
    assert summary["per_label"][1]["dsc"] == 1.0
    assert summary["per_label"][2]["dsc"] == pytest.approx((rows[1]["dsc"] + 1.0) / 2)
    assert summary["per_label"][2]["n"] == 2
    assert summary["overall"]["dsc"] == pytest.approx(np.mean([r["dsc"] for r in rows]))
    assert summary["overall"]["n"] == 4
