"""The `dbsam` command end to end on small synthetic files (and the real data when present)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbsam.cli import build_parser, main

from _shared import needs_onnx

REPO_ROOT = Path(__file__).resolve().parents[2]
MICRO = ["--model-option=img_size=64", "--model-option=depth=2", "--model-option=num_stages=2",
         "--model-option=global_attn_indexes=(1,)"]


def data_dir() -> Path:
    env = os.environ.get("DBSAM_DATA_DIR")
    return Path(env) if env else REPO_ROOT / ".." / "shared" / "data"


def test_help_of_every_subcommand_needs_no_heavy_import():
    code = ("import sys\nfrom dbsam.cli import main\n"
            "for cmd in ['info', 'train', 'evaluate', 'predict', 'export', 'demo']:\n"
            "    try:\n        main([cmd, '--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'segment_anything', 'triton', 'nibabel') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("train", "evaluate", "predict", "export", "demo"):
        assert f"usage: dbsam {cmd}" in out.stdout


def _folder(root, n=4, size=48):
    from dbsam.data.datasets import synthetic_case

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True), (root / "masks").mkdir()
    for i in range(n):
        image, labels = synthetic_case(rng, size)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray((labels > 0).astype(np.uint8) * 255).save(root / "masks" / f"{i:03d}.png")
    (root / "images" / "broken.png").write_bytes(b"not a png")
    (root / "masks" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "images" / "small.png")
    Image.fromarray(np.full((12, 12), 255, np.uint8)).save(root / "masks" / "small.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("segment_anything")
    tmp = tmp_path_factory.mktemp("cli")
    data = _folder(tmp / "data")
    return tmp, data


def test_train_then_evaluate_from_the_command_line(trained, capsys):
    tmp, data = trained
    run = tmp / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--steps", "2", "--batch-size", "2",
                 "--val-fraction", "0.25", "--checkpoint-every", "1", *MICRO]) == 0
    out = capsys.readouterr().out
    # Bad input is skipped and named in one line, never fatal.
    assert "skipped 2 files: broken.png (unreadable image" in out and "small.png (size mismatch" in out
    assert "final val DSC" in out
    for name in ("last.pt", "model.pt", "metrics.csv", "split.json", "options.json"):
        assert (run / name).exists(), name
    assert (run / "metrics.csv").read_text().startswith("step,epoch,loss,dice_loss,bce_loss,lr")
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(run / "model.pt"), "--subset", "val",
                 "--val-fraction", "0.25", "--tolerance-mm", "2", "--out", str(tmp / "eval")]) == 0
    out = capsys.readouterr().out
    assert "dbsam checkpoint" in out and "NSD@2mm" in out
    assert (tmp / "eval" / "cases.csv").read_text().count("\n") == 2  # header + the one val case
    assert "model: dbsam checkpoint" in (tmp / "eval" / "summary.txt").read_text()


def test_evaluate_without_checkpoint_says_untrained_and_bad_checkpoints_fail_clearly(trained, capsys):
    tmp, data = trained
    assert main(["evaluate", "--data", str(data), "--out", str(tmp / "e0"), "--subset", "val",
                 "--val-fraction", "0.25"]) == 0
    assert "UNTRAINED dbsam tiny" in capsys.readouterr().out
    bad = tmp / "bad.pt"
    bad.write_bytes(b"PK\x03\x04garbage")
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(bad), "--out", str(tmp / "e1")]) == 2
    assert "truncated or not a torch file" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tmp / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


def test_predict_image_folder_and_overlay(trained, capsys):
    tmp, data = trained
    image = data / "images" / "000.png"
    out = tmp / "pred"
    assert main(["predict", str(image), "--box", "4,5,30,40", "--box=-3,0,20,60", "--overlay",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "clipped" in text and "UNTRAINED" in text
    mask = np.asarray(Image.open(out / "000_mask.png"))
    assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 1, 2}  # two boxes: label ids
    assert (out / "000_overlay.png").exists()
    assert main(["predict", str(image), "--box", "100,100,120,120"]) == 2
    assert "entirely outside" in capsys.readouterr().err
    boxes = tmp / "boxes.json"
    boxes.write_text(json.dumps({"001.png": [[2, 2, 30, 30]], "002.png": [[1, 1, 20, 20]]}))
    assert main(["predict", str(data / "images"), "--boxes", str(boxes), "--out", str(tmp / "pf")]) == 0
    text = capsys.readouterr().out
    single = np.asarray(Image.open(tmp / "pf" / "001_mask.png"))
    assert single.shape == (48, 48) and set(np.unique(single)) <= {0, 255}  # one box: 0/255
    assert "skipped" in text and "000.png (no box)" in text


def test_predict_nifti_keeps_the_affine(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("segment_anything")
    vol = np.zeros((30, 26, 5), np.int16) - 1000
    vol[8:20, 6:18, 1:4] = 60
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [10, -5, 3]
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "ct.nii.gz")
    assert main(["predict", str(tmp_path / "ct.nii.gz"), "--box", "5,7,1,19,21,3", "--overlay",
                 "--out", str(tmp_path / "o")]) == 0
    out = nib.load(tmp_path / "o" / "ct_mask.nii.gz")
    assert out.shape == vol.shape and np.allclose(out.affine, affine)
    data = np.asarray(out.dataobj)
    assert set(np.unique(data)) <= {0, 1} and not data[..., [0, 4]].any()  # only slices z 1..3
    assert list((tmp_path / "o").glob("ct_overlay_z*.png"))
    assert main(["predict", str(tmp_path / "ct.nii.gz"), "--box", "5,7,9,19,21,12"]) == 2
    assert "outside 0..4" in capsys.readouterr().err


def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    pytest.importorskip("segment_anything")
    from argparse import Namespace

    from dbsam.demo import run_demo

    args = build_parser().parse_args(["demo", "--out", str(tmp_path), "--steps", "2", "--cases", "4",
                                      "--batch-size", "2", "--minutes", "1"])
    assert isinstance(args, Namespace)
    results = run_demo(args)
    out = capsys.readouterr().out
    assert "DSC before" in out and "overlay" in out
    assert set(results) == {"dbsam", "medsam", "overlay"} and Path(results["overlay"]).exists()
    for method in ("dbsam", "medsam"):
        assert results[method]["steps"] == 2 and 0 <= results[method]["after"]["dsc"] <= 1


@needs_onnx
def test_export_writes_an_onnx_model_that_matches(tmp_path, capsys):
    pytest.importorskip("segment_anything")
    import onnxruntime
    import torch

    from dbsam.train.methods import build_model

    model = build_model("dbsam", "tiny", init_seed=3).eval()  # what `export` builds: untrained tiny, seed 3
    g = torch.Generator().manual_seed(0)
    fixed, dynamic = tmp_path / "fixed.onnx", tmp_path / "dynamic.onnx"
    assert main(["export", "--out", str(fixed), "--batch", "2", "--seed", "3"]) == 0
    assert "low_res_logits (2, 1, 32, 32)" in capsys.readouterr().out
    assert main(["export", "--out", str(dynamic), "--seed", "3"]) == 0
    assert "low_res_logits (B, 1, 32, 32)" in capsys.readouterr().out
    for path, batches in ((fixed, (2,)), (dynamic, (1, 3))):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for B in batches:
            images = torch.randn(B, 3, 128, 128, generator=g)  # not the traced values
            lo = torch.rand(B, 2, generator=g) * 60
            boxes = torch.cat([lo, lo + 8 + torch.rand(B, 2, generator=g) * 60], 1)
            with torch.no_grad():
                want = model(images, boxes)
            got = session.run(None, {"images": images.numpy(), "boxes": boxes.numpy()})
            for gt, w in zip(got, want):
                torch.testing.assert_close(torch.from_numpy(gt), w, atol=1e-4, rtol=1e-4, msg=f"{path.name} B={B}")
    assert main(["export", "--out", str(fixed), "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err


def test_real_wbc_folder_is_detected(capsys):
    root = data_dir() / "wbc"
    if not root.is_dir():
        pytest.skip(f"real data folder {root} is absent (set DBSAM_DATA_DIR to use it)")
    from dbsam.data import FolderDataset
    from dbsam.train.data import open_dataset

    ds = open_dataset(root)
    assert isinstance(ds, FolderDataset) and len(ds.case_names) == 300 and not ds.skipped
