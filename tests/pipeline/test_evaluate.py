"""Evaluation: 2D per image at unit spacing, 3D per case over the whole volume at real spacing."""
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("segment_anything")

from dbsam import evaluate as ev  # noqa: E402
from dbsam.data import ArrayDataset, NpzDataset  # noqa: E402
from dbsam.metrics import dice, nsd  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    env = os.environ.get("DBSAM_DATA_DIR")
    return Path(env) if env else REPO_ROOT / ".." / "shared" / "data"


def _volume_npz(tmp_path):
    label = np.zeros((6, 20, 24), np.uint8)
    label[1:5, 4:12, 5:15] = 1
    label[2:4, 14:18, 16:22] = 2
    image = (label * 80 + 20).astype(np.uint8)
    np.savez(tmp_path / "vol.npz", imgs=image, gts=label, spacing=np.array([0.5, 0.7, 2.5]))  # x, y, z
    return NpzDataset(tmp_path), label


def _shifted(slices):
    """A fake predictor: each ground-truth slice mask moved one column right."""
    return {key: {k: (np.roll(gt, 1, axis=1), gt, sp) for k, (_, gt, sp) in per.items()}
            for key, per in slices.items()}


def test_3d_cases_are_scored_over_the_stacked_volume_at_real_spacing(tmp_path, monkeypatch):
    ds, label = _volume_npz(tmp_path)
    assert ds.volume_geometry(0) == (label.shape, (2.5, 0.7, 0.5), 0)
    truth = {(0, lab): {k: (label[k] == lab, label[k] == lab, (0.7, 0.5))
                        for k in range(6) if (label[k] == lab).any()} for lab in (1, 2)}
    monkeypatch.setattr(ev, "predict_targets", lambda *a, **k: _shifted(truth))
    rows = ev.evaluate_dataset(None, ds, tolerance_mm=0.4)
    assert [(r["case"], r["label"]) for r in rows] == [("vol", 1), ("vol", 2)]  # one row per case and label
    for row, lab in zip(rows, (1, 2)):
        gt = label == lab
        pred = np.roll(gt, 1, axis=2)
        assert row["dsc"] == pytest.approx(dice(pred, gt))
        assert row["nsd"] == pytest.approx(nsd(pred, gt, 0.4, (2.5, 0.7, 0.5)))
        assert row["gt_voxels"] == gt.sum()
    # A 0.5 mm shift: within 0.6 mm everywhere, so NSD 1 at that tolerance; not at 0.4.
    assert rows[0]["nsd"] < 1
    monkeypatch.setattr(ev, "predict_targets", lambda *a, **k: _shifted(truth))
    assert ev.evaluate_dataset(None, ds, tolerance_mm=0.6)[0]["nsd"] == pytest.approx(1.0)


def test_2d_images_are_scored_alone_with_a_real_model(tmp_path):
    from dbsam.train.methods import build_model

    img = np.zeros((40, 50), np.uint8)
    lab = np.zeros((40, 50), np.uint8)
    lab[5:20, 5:25], lab[25:35, 30:45] = 1, 2
    ds = ArrayDataset([img + lab * 90, img], [lab, lab], cases=["a", "b"])
    model = build_model("dbsam", "tiny", img_size=64, depth=2, num_stages=2, global_attn_indexes=(1,))
    rows = ev.evaluate_dataset(model, ds, tolerance_mm=2.0)
    assert sorted((r["case"], r["label"]) for r in rows) == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert all(0 <= r["dsc"] <= 1 and 0 <= r["nsd"] <= 1 for r in rows)
    csv_path, summary_path, text = ev.write_results(rows, tmp_path / "out", 2.0, "model: test")
    assert csv_path.read_text().count("\n") == 5 and "NSD@2mm" in text and summary_path.exists()


def test_real_nifti_case_gives_one_row_per_label(tmp_path):
    root = data_dir() / "totalseg"
    if not root.is_dir():
        pytest.skip(f"real data folder {root} is absent (set DBSAM_DATA_DIR to use it)")
    from dbsam.data import NiftiDataset
    from dbsam.train.methods import build_model

    ds = NiftiDataset(root / "example_mr_sm.nii.gz", root / "example_seg_mr.nii.gz", label_ids=[1])
    shape, spacing, axis = ds.volume_geometry(0)
    assert shape == (117, 91, 20) and spacing == (3.0, 3.0, 3.0) and axis == 2
    model = build_model("dbsam", "tiny", img_size=64, depth=2, num_stages=2, global_attn_indexes=(1,))
    rows = ev.evaluate_dataset(model, ds, tolerance_mm=1.0)
    assert len(rows) == 1 and rows[0]["label"] == 1
    assert rows[0]["gt_voxels"] > 0  # the whole volume's voxels of label 1, not one slice's
