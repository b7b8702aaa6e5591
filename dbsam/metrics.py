"""Segmentation metrics: Dice (DSC) and normalised surface Dice (NSD).

Both work on 2D and 3D masks and take the real voxel spacing in mm.

Empty masks, by rule (documented because papers disagree):
  both empty        -> DSC 1, NSD 1 (nothing to find, nothing found)
  exactly one empty -> DSC 0, NSD 0

NSD follows the surfel-area-weighted definition of Nikolov et al. (2021), the
one DeepMind's `surface-distance` package implements:
  - the surface of a mask lives on the grid of voxel corners; each corner gets
    a code from its 2x2 (2D) or 2x2x2 (3D) neighbourhood of voxels, and every
    corner whose code is neither all-out nor all-in is a surface element;
  - each element is weighted by the length (2D) or area (3D) in mm of the
    marching-squares/-cubes surface inside its cell;
  - an element counts as matched when its corner lies within `tolerance_mm` of
    a surface corner of the other mask (Euclidean distance transform with the
    real spacing).
  NSD = (matched pred area + matched gt area) / (total pred + total gt area).
The tests check this against `surface-distance` to 1e-6 when it is installed.
"""

from __future__ import annotations

import csv
import itertools
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "dice",
    "nsd",
    "surface_distances",
    "evaluate_case",
    "write_case_csv",
    "summarize",
]


def _as_bool_pair(pred, gt):
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {pred.ndim}D")
    return pred, gt


def _as_spacing(spacing, ndim):
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in np.ravel(spacing))
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} does not match a {ndim}D mask")
    if any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return spacing


def dice(pred, gt) -> float:
    """Dice coefficient 2|P & G| / (|P| + |G|); 1.0 when both are empty."""
    pred, gt = _as_bool_pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred & gt).sum()) / total


# --- surface elements ------------------------------------------------------
#
# A cell is the square/cube spanned by 2^ndim neighbouring voxel centres. Its
# corners are numbered in itertools.product order; corner k sets bit k of the
# cell's code. The surface inside a cell joins the midpoints of the cell edges
# whose two corners disagree (marching squares/cubes).


def _corners(ndim):
    return list(itertools.product((0, 1), repeat=ndim))


def _faces(ndim):
    """The square faces of a cell, each as 4 corners in cyclic order."""
    if ndim == 2:
        return [((0, 0), (0, 1), (1, 1), (1, 0))]
    faces = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for side in (0, 1):
            face = []
            for a, b in ((0, 0), (1, 0), (1, 1), (0, 1)):
                c = [0, 0, 0]
                c[axis], c[u], c[v] = side, a, b
                face.append(tuple(c))
            faces.append(tuple(face))
    return faces


def _face_segments(face, inside, keep_apart):
    """Segments (pairs of cut edges) where the surface crosses one face.

    On a face with two diagonal corners inside ("saddle"), the corners whose
    state is `keep_apart` are cut off separately.
    """
    edges = [frozenset((face[i], face[(i + 1) % 4])) for i in range(4)]
    state = [c in inside for c in face]
    cut = [e for i, e in enumerate(edges) if state[i] != state[(i + 1) % 4]]
    if len(cut) == 2:
        return [tuple(cut)]
    if len(cut) == 4:
        return [(edges[i - 1], edges[i]) for i in range(4) if state[i] == keep_apart]
    return []


def _polygons(segments):
    """Chain segments that share cut edges into closed polygons."""
    left = list(segments)
    polygons = []
    while left:
        first, current = left.pop()
        polygon = [first, current]
        while True:
            i = next(i for i, s in enumerate(left) if current in s)
            a, b = left.pop(i)
            current = b if a == current else a
            if current == first:
                break
            polygon.append(current)
        polygons.append(polygon)
    return polygons


def _midpoint(edge):
    a, b = tuple(edge)
    return (np.array(a, float) + np.array(b, float)) / 2


def _triangle_area(p, q, r):
    return 0.5 * float(np.linalg.norm(np.cross(q - p, r - p)))


def _max_area_triangulation(points):
    """Triangles (index triples) of the polygon's largest-area triangulation.

    Cut polygons can be non-planar, so the area depends on the split; taking
    the largest one reproduces the reference marching-cubes table (ties give
    the same area under any spacing, checked against surface-distance).
    """
    n = len(points)

    @lru_cache(maxsize=None)
    def best(i, j):  # polygon points[i..j], closed by the edge (i, j)
        if j - i < 2:
            return 0.0, ()
        options = []
        for k in range(i + 1, j):
            area_ik, tris_ik = best(i, k)
            area_kj, tris_kj = best(k, j)
            area = area_ik + area_kj + _triangle_area(points[i], points[k], points[j])
            options.append((area, tris_ik + tris_kj + ((i, k, j),)))
        return max(options, key=lambda o: o[0])

    return best(0, n - 1)[1]


@lru_cache(maxsize=None)
def _cell_geometry(ndim):
    """Per code: the surface pieces of a cell in voxel units.

    2D: list of segments (2 points); 3D: list of triangles (3 points).
    """
    corners = _corners(ndim)
    faces = _faces(ndim)
    pieces = []
    for code in range(2 ** len(corners)):
        inside = {c for k, c in enumerate(corners) if code >> k & 1}
        # Marching cubes keeps the minority state apart on saddle faces.
        keep_apart = len(inside) <= len(corners) // 2
        segments = [s for f in faces for s in _face_segments(f, inside, keep_apart)]
        if ndim == 2:
            pieces.append([tuple(_midpoint(e) for e in s) for s in segments])
            continue
        triangles = []
        for polygon in _polygons(segments):
            points = [_midpoint(e) for e in polygon]
            for i, j, k in _max_area_triangulation(points):
                triangles.append((points[i], points[j], points[k]))
        pieces.append(triangles)
    return pieces


@lru_cache(maxsize=64)
def _code_to_area(spacing):
    """Surface length (2D) or area (3D) in mm for every neighbourhood code."""
    scale = np.array(spacing, float)
    table = np.zeros(2 ** (2 ** len(spacing)))
    for code, pieces in enumerate(_cell_geometry(len(spacing))):
        for piece in pieces:
            pts = [p * scale for p in piece]
            if len(pts) == 2:
                table[code] += float(np.linalg.norm(pts[1] - pts[0]))
            else:
                table[code] += _triangle_area(*pts)
    table.setflags(write=False)
    return table


def _corner_codes(mask):
    """Neighbourhood code of every voxel corner (shape = mask.shape + 1)."""
    padded = np.pad(mask, 1).astype(np.int32)
    out_shape = tuple(n + 1 for n in mask.shape)
    codes = np.zeros(out_shape, np.int32)
    for bit, offset in enumerate(_corners(mask.ndim)):
        window = tuple(slice(o, o + n) for o, n in zip(offset, out_shape))
        codes |= padded[window] << bit
    return codes


def surface_distances(pred, gt, spacing=None):
    """Surface elements of both masks with their areas and cross distances.

    Returns (dist_pred_to_gt, area_pred, dist_gt_to_pred, area_gt): for each
    surface element of one mask, its distance in mm to the other mask's
    surface (inf when the other mask is empty) and its length/area in mm.
    """
    pred, gt = _as_bool_pair(pred, gt)
    spacing = _as_spacing(spacing, pred.ndim)
    union = pred | gt
    if not union.any():
        empty = np.zeros(0)
        return empty, empty, empty, empty
    # Work on the union's bounding box only: far cheaper, same distances.
    box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(union))
    full = 2 ** (2 ** pred.ndim) - 1
    table = _code_to_area(spacing)
    codes = [_corner_codes(m[box]) for m in (pred, gt)]
    borders = [(c != 0) & (c != full) for c in codes]
    areas = [table[c[b]] for c, b in zip(codes, borders)]

    def distance_to(border):
        if not border.any():
            return np.full(border.shape, np.inf)
        return ndimage.distance_transform_edt(~border, sampling=spacing)

    dist_pred_to_gt = distance_to(borders[1])[borders[0]]
    dist_gt_to_pred = distance_to(borders[0])[borders[1]]
    return dist_pred_to_gt, areas[0], dist_gt_to_pred, areas[1]


def nsd(pred, gt, tolerance_mm: float = 1.0, spacing=None) -> float:
    """Normalised surface Dice at `tolerance_mm` (see module docstring)."""
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    d_pg, a_p, d_gp, a_g = surface_distances(pred, gt, spacing)
    total = a_p.sum() + a_g.sum()
    if a_p.size == 0 and a_g.size == 0:
        return 1.0
    if a_p.size == 0 or a_g.size == 0 or total == 0:
        return 0.0
    matched = a_p[d_pg <= tolerance_mm].sum() + a_g[d_gp <= tolerance_mm].sum()
    return float(matched / total)


# --- per-case evaluation ----------------------------------------------------


def evaluate_case(pred_volume, gt_volume, spacing=None, labels=None,
                  tolerance_mm: float = 1.0, case: str = "") -> list[dict]:
    """One row per label: DSC and NSD of `pred == label` against `gt == label`.

    `labels` defaults to every non-zero label found in either volume.
    """
    pred_volume = np.asarray(pred_volume)
    gt_volume = np.asarray(gt_volume)
    if pred_volume.shape != gt_volume.shape:
        raise ValueError(
            f"pred and gt shapes differ: {pred_volume.shape} vs {gt_volume.shape}")
    if labels is None:
        labels = np.union1d(np.unique(pred_volume), np.unique(gt_volume))
        labels = [v for v in labels.tolist() if v != 0]
    rows = []
    for label in labels:
        p, g = pred_volume == label, gt_volume == label
        rows.append({
            "case": case,
            "label": int(label),
            "dsc": dice(p, g),
            "nsd": nsd(p, g, tolerance_mm, spacing),
            "gt_voxels": int(g.sum()),
            "pred_voxels": int(p.sum()),
        })
    return rows


CSV_FIELDS = ["case", "label", "dsc", "nsd", "gt_voxels", "pred_voxels"]


def write_case_csv(rows, path) -> Path:
    """Write evaluation rows (from `evaluate_case`) as CSV; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def summarize(rows) -> dict:
    """Mean DSC/NSD per label and overall (mean over all case-label rows)."""
    rows = list(rows)
    per_label = {}
    for label in sorted({int(r["label"]) for r in rows}):
        sel = [r for r in rows if int(r["label"]) == label]
        per_label[label] = {
            "dsc": float(np.mean([float(r["dsc"]) for r in sel])),
            "nsd": float(np.mean([float(r["nsd"]) for r in sel])),
            "n": len(sel),
        }
    overall = {
        "dsc": float(np.mean([float(r["dsc"]) for r in rows])) if rows else float("nan"),
        "nsd": float(np.mean([float(r["nsd"]) for r in rows])) if rows else float("nan"),
        "n": len(rows),
    }
    return {"per_label": per_label, "overall": overall}
