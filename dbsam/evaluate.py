"""Evaluate box-prompted segmentation: DSC and NSD per case and per label.

Every target of a dataset (one label in one image or slice) is predicted from a box around its
ground truth grown by a fixed margin, through DBSAMPredictor (the inference path users get).
2D images are scored on their own with unit spacing (their files carry none); a 3D case is scored
once over its whole volume at its real spacing: slice predictions are stacked into the volume,
slices without that label predicting nothing (a box needs the label to be there).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from dbsam.data import box_from_mask
from dbsam.metrics import evaluate_case, summarize, write_case_csv


def _groups(dataset, indices):
    """Dataset indices grouped by (source, slice): one image encoding serves all its labels."""
    groups = defaultdict(list)
    for i in indices:
        t = dataset.targets[i]
        groups[(t.source, t.slice)].append(i)
    return groups


def predict_targets(model, dataset, indices=None, margin: int = 0, device="cpu", progress=None):
    """{(source, label): {slice: (pred bool HxW, gt bool HxW, spacing)}} for `indices`."""
    from dbsam.model import DBSAMPredictor
    from dbsam.train.data import as_uint8

    model = model.to(device)
    predictor = DBSAMPredictor(model)
    indices = range(len(dataset)) if indices is None else indices
    out = defaultdict(dict)
    groups = _groups(dataset, indices)
    for n, ((source, slice_index), members) in enumerate(groups.items()):
        samples = [dataset[i] for i in members]
        predictor.set_image(as_uint8(samples[0]["image"].numpy().transpose(1, 2, 0)))
        masks = [s["mask"].numpy().astype(bool) for s in samples]
        boxes = np.array([box_from_mask(m, margin) for m in masks], np.float32)
        pred = predictor.predict(boxes).masks.cpu().numpy()
        for s, gt, p in zip(samples, masks, pred):
            out[(source, s["label"])][slice_index] = (p, gt, s["spacing"])
        if progress:
            progress(n + 1, len(groups))
    return out


def evaluate_dataset(model, dataset, indices=None, tolerance_mm: float = 1.0, margin: int = 0,
                     device="cpu", progress=None) -> list[dict]:
    """metrics.evaluate_case rows, one per (case, label), 3D cases over their whole volume."""
    predictions = predict_targets(model, dataset, indices, margin, device, progress)
    rows = []
    for (source, label), slices in sorted(predictions.items()):
        case = dataset.case_names[source]
        geometry = dataset.volume_geometry(source) if -1 not in slices else None
        if geometry is None:
            pred, gt, spacing = slices[-1]
        else:
            shape, spacing, axis = geometry
            pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
            for k, (p, g, _) in slices.items():
                index = [slice(None)] * 3
                index[axis] = k
                pred[tuple(index)], gt[tuple(index)] = p, g
        rows += evaluate_case(pred.astype(np.uint8) * label, gt.astype(np.uint8) * label, spacing,
                              labels=[label], tolerance_mm=tolerance_mm, case=case)
    return rows


def format_summary(summary: dict, tolerance_mm: float) -> str:
    lines = [f"{'label':>8} {'n':>5} {'DSC':>7} {f'NSD@{tolerance_mm:g}mm':>10}"]
    for label, s in summary["per_label"].items():
        lines.append(f"{label:>8} {s['n']:>5} {s['dsc']:>7.4f} {s['nsd']:>10.4f}")
    o = summary["overall"]
    lines.append(f"{'all':>8} {o['n']:>5} {o['dsc']:>7.4f} {o['nsd']:>10.4f}")
    return "\n".join(lines)


def write_results(rows, out_dir, tolerance_mm: float, header: str = "") -> tuple[Path, Path, str]:
    """cases.csv (one row per case and label) and summary.txt; returns them and the summary text."""
    out_dir = Path(out_dir)
    csv_path = write_case_csv(rows, out_dir / "cases.csv")
    text = (header + "\n" if header else "") + format_summary(summarize(rows), tolerance_mm)
    summary_path = out_dir / "summary.txt"
    summary_path.write_text(text + "\n")
    return csv_path, summary_path, text
