"""Box-prompted prediction on files: a 2D image, a folder of them, a NIfTI volume or a DICOM series.

Boxes are in the input's pixels: (x0, y0, x1, y1) for 2D, x the column and y the row (inclusive,
as dbsam.data.boxes); (x0, y0, z0, x1, y1, z1) for volumes, where z indexes the slices along
--axis and x, y are the column and row of such a slice (np.take(volume, z, axis)). A box partly
outside the image is clipped (and said so); one wholly outside, inverted or malformed is refused.

Masks keep the input's geometry: a PNG of the same size (0/255 for one box, label ids 1..N for N
boxes, later boxes drawn over earlier ones), or a NIfTI with the input's affine and header. A DICOM
series (a folder) is read in NIfTI's array order (dbsam.data.dicom) and its mask is a NIfTI with the
series' affine, named after the folder.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from dbsam.data import io
from dbsam.data.boxes import validate_box

COLOURS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


# --- boxes ----------------------------------------------------------------------------------


def parse_box(text: str, dims: int = 4) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"box {text!r}: expected {dims} comma-separated numbers") from None
    if len(values) != dims:
        raise ValueError(f"box {text!r}: expected {dims} numbers "
                         f"({'x0,y0,x1,y1' if dims == 4 else 'x0,y0,z0,x1,y1,z1'}), got {len(values)}")
    return values


def read_boxes_file(path, dims: int = 4) -> dict:
    """{image name or "" (every input): [box, ...]} from JSON or CSV.

    JSON: a list of boxes, or {image name: [boxes]}. CSV: columns x0,y0,x1,y1 (and z0,z1 for
    volumes) and optionally `image`.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        items = data.items() if isinstance(data, dict) else [("", data)]
        out = {}
        for name, boxes in items:
            if boxes and not isinstance(boxes[0], (list, tuple)):
                boxes = [boxes]  # one box given bare
            out[str(name)] = [_check_len(b, dims, path) for b in boxes]
        return out
    keys = ["x0", "y0", "x1", "y1"] if dims == 4 else ["x0", "y0", "z0", "x1", "y1", "z1"]
    out: dict = {}
    with path.open(newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            try:
                box = [float(row[k]) for k in keys]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path.name} line {n}: needs numeric columns {','.join(keys)}") from None
            out.setdefault((row.get("image") or "").strip(), []).append(box)
    return out


def _check_len(box, dims, path):
    if len(box) != dims:
        raise ValueError(f"{path.name}: box {box} has {len(box)} numbers, expected {dims}")
    return [float(v) for v in box]


def checked_box(box, height: int, width: int, where: str, note=print) -> tuple:
    clipped = validate_box(box, height, width)  # ValueError for outside / inverted / malformed
    if tuple(float(v) for v in clipped) != tuple(float(v) for v in box):
        note(f"{where}: box {tuple(box)} clipped to the {width}x{height} image: {tuple(clipped)}")
    return clipped


# --- 2D ------------------------------------------------------------------------------------------


def predict_image(predictor, image: np.ndarray, boxes) -> np.ndarray:
    """(N, H, W) bool masks for N boxes on an HxWx3 [0, 255] image."""
    from dbsam.train.data import as_uint8

    predictor.set_image(as_uint8(image))
    return predictor.predict(np.asarray(boxes, np.float32).reshape(-1, 4)).masks.cpu().numpy()


def label_map(masks: np.ndarray) -> np.ndarray:
    """One mask -> bool (saved 0/255); several -> uint8/16 ids 1..N, later over earlier."""
    if len(masks) == 1:
        return masks[0]
    out = np.zeros(masks.shape[1:], np.uint16 if len(masks) > 255 else np.uint8)
    for i, m in enumerate(masks, start=1):
        out[m] = i
    return out


def overlay(image: np.ndarray, masks, boxes, path) -> Path:
    """The image with each mask tinted and each box outlined in its colour."""
    from PIL import Image, ImageDraw

    from dbsam.train.data import as_uint8

    rgb = as_uint8(image).astype(np.float32)
    for i, m in enumerate(masks):
        colour = np.array(COLOURS[i % len(COLOURS)], np.float32)
        rgb[m] = 0.55 * rgb[m] + 0.45 * colour
    im = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for i, b in enumerate(boxes):
        draw.rectangle([float(v) for v in b[:4]], outline=COLOURS[i % len(COLOURS)], width=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def predict_2d_file(predictor, path: Path, boxes, out_dir: Path, make_overlay: bool, note=print):
    image = io.read_image(path)
    h, w = image.shape[:2]
    boxes = [checked_box(b, h, w, path.name, note) for b in boxes]
    masks = predict_image(predictor, image, boxes)
    written = [io.write_mask_png(label_map(masks), out_dir / f"{path.stem}_mask.png")]
    if make_overlay:
        written.append(overlay(image, masks, boxes, out_dir / f"{path.stem}_overlay.png"))
    return written


# --- volumes -----------------------------------------------------------------------------------------


def predict_volume(predictor, path: Path, boxes, out_dir: Path, axis: int = 2, modality: str = "auto",
                   make_overlay: bool = False, note=print):
    """Slice-wise prediction of 3D boxes; the label volume is written with the input's affine.

    `path`: a NIfTI file or a folder holding a DICOM series (written as NIfTI with its affine)."""
    from dbsam.data.datasets import nifti_case_id, volume_to_model_range

    volume, affine, _ = io.read_volume(path)
    if volume.ndim != 3:
        raise ValueError(f"{path.name}: expected a 3D volume, got shape {volume.shape}")
    scaled = volume_to_model_range(volume, modality)
    depth = volume.shape[axis]
    plane_shape = np.take(volume, 0, axis=axis).shape
    labels = np.zeros(volume.shape, np.uint16 if len(boxes) > 255 else np.uint8)
    best = (-1, None)  # the slice with most predicted pixels, for the overlay
    for n, box in enumerate(boxes, start=1):
        x0, y0, z0, x1, y1, z1 = box
        if z1 < z0 or z1 < 0 or z0 > depth - 1:
            raise ValueError(f"{path.name}: box {tuple(box)}: slices z {z0}..{z1} are inverted or outside 0..{depth - 1}")
        box2d = checked_box((x0, y0, x1, y1), *plane_shape, path.name, note)
        z_lo, z_hi = int(max(0, np.ceil(z0))), int(min(depth - 1, np.floor(z1)))
        if (z_lo, z_hi) != (z0, z1):
            note(f"{path.name}: box {tuple(box)} slices clipped to z {z_lo}..{z_hi}")
        for z in range(z_lo, z_hi + 1):
            plane = io.to_rgb(np.take(scaled, z, axis=axis))
            mask = predict_image(predictor, plane, [box2d])[0]
            index = [slice(None)] * 3
            index[axis] = z
            view = labels[tuple(index)]
            view[mask] = n
            if mask.sum() > best[0]:
                best = (int(mask.sum()), z)
    stem = nifti_case_id(path)
    target = out_dir / f"{stem}_mask.nii.gz"
    if Path(path).is_dir():  # a DICOM series: no NIfTI header to copy
        written = [io.write_nifti(labels, target, affine=affine)]
    else:
        written = [io.write_nifti(labels, target, like=path)]
    if make_overlay and best[1] is not None:
        z = best[1]
        plane = io.to_rgb(np.take(scaled, z, axis=axis))
        plane_labels = np.take(labels, z, axis=axis)
        masks = [plane_labels == n for n in range(1, len(boxes) + 1)]
        boxes2d = [(b[0], b[1], b[3], b[4]) for b in boxes]
        written.append(overlay(plane, masks, boxes2d, out_dir / f"{stem}_overlay_z{z}.png"))
    return written
