"""Data loading: file I/O, box prompts, datasets, and the real data when present."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dbsam.data import boxes, io
from dbsam.data.datasets import (
    ArrayDataset,
    FolderDataset,
    NiftiDataset,
    NpzDataset,
    nifti_case_id,
    split_by_case,
    synthetic_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    env = os.environ.get("DBSAM_DATA_DIR")
    return Path(env) if env else REPO_ROOT / ".." / "shared" / "data"


def need_data(sub: str) -> Path:
    path = data_dir() / sub
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set DBSAM_DATA_DIR to use it)")
    return path


def ramp(h=20, w=30, lo=0, hi=255, dtype=np.uint8):
    return np.linspace(lo, hi, h * w).reshape(h, w).astype(dtype)


# --- intensity -----------------------------------------------------------------------


def test_window_ct_soft_tissue_default():
    hu = np.array([-1000, -160, 40, 240, 3000], np.int16)
    out = io.window_ct(hu)
    assert out.tolist() == pytest.approx([0.0, 0.0, 127.5, 255.0, 255.0])
    assert io.window_ct(np.array([0]), level=0, width=2)[0] == pytest.approx(127.5)
    with pytest.raises(ValueError):
        io.window_ct(hu, width=0)


def test_normalize_intensity_ignores_outliers():
    arr = np.arange(1000, dtype=np.float32)
    arr[0] = -1e6  # one hot/dead pixel must not squash the rest
    out = io.normalize_intensity(arr)
    assert out.min() == 0 and out.max() == 255
    assert 100 < out[500] < 155
    exact = io.normalize_intensity(np.array([2.0, 4.0, 6.0]), 0, 100)
    assert exact.tolist() == pytest.approx([0.0, 127.5, 255.0])
    assert np.all(io.normalize_intensity(np.full((3, 3), 7.0)) >= 0)


# --- 2D files ---------------------------------------------------------------------------


def test_read_image_grey_8bit_replicated(tmp_path):
    grey = ramp()
    Image.fromarray(grey).save(tmp_path / "g.png")
    img = io.read_image(tmp_path / "g.png")
    assert img.shape == (20, 30, 3) and img.dtype == np.float32
    assert np.array_equal(img[..., 0], grey) and np.array_equal(img[..., 2], grey)


def test_read_image_rgb_and_rgba(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.dstack([rgb, np.full((12, 9), 7, np.uint8)])).save(tmp_path / "a.png")
    smooth = np.dstack([ramp(12, 9), ramp(12, 9)[::-1], np.full((12, 9), 90, np.uint8)])
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)
    assert np.array_equal(io.read_image(tmp_path / "c.png"), rgb)
    assert np.array_equal(io.read_image(tmp_path / "a.png"), rgb)
    assert np.abs(io.read_image(tmp_path / "s.jpg") - smooth).mean() < 4


def test_read_image_16bit_png_and_tiff(tmp_path):
    raw = ramp(lo=1000, hi=40000, dtype=np.uint16)
    raw[0, 0] = 65535  # outlier outside the 99.5 percentile
    Image.fromarray(raw).save(tmp_path / "s.png")
    png = io.read_image(tmp_path / "s.png")
    assert png.shape == (20, 30, 3)
    assert png.min() == 0 and png.max() == 255
    assert png[0, 1, 0] < 5 and png[-1, -2, 0] > 250  # window from 0.5% to 99.5%
    assert np.all(np.diff(png[1:, :, 0].ravel()) >= 0)  # order of intensities kept
    pytest.importorskip("tifffile", reason="16-bit TIFF check uses tifffile")
    import tifffile

    tifffile.imwrite(tmp_path / "s.tif", raw)
    assert np.allclose(io.read_image(tmp_path / "s.tif"), png)
    tifffile.imwrite(tmp_path / "f.tif", (raw / 65535.0).astype(np.float32))
    unit = (raw / 65535.0).astype(np.float32)  # floats in [0, 1] are scaled, not windowed
    assert np.allclose(io.read_image(tmp_path / "f.tif")[..., 1], unit * 255, atol=1e-3)


def test_read_mask_labels_and_colour_rejected(tmp_path):
    labels = np.zeros((10, 10), np.uint8)
    labels[2:5, 2:5], labels[6:9, 6:9] = 128, 255
    Image.fromarray(labels).save(tmp_path / "m.png")
    mask = io.read_mask(tmp_path / "m.png")
    assert np.array_equal(mask, labels) and mask.dtype == np.int32
    colour = np.zeros((10, 10, 3), np.uint8)
    colour[2:5, 2:5] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match="colour mask"):
        io.read_mask(tmp_path / "c.png")


def test_write_mask_png_round_trips(tmp_path):
    binary = np.zeros((8, 8), bool)
    binary[1:4, 2:6] = True
    io.write_mask_png(binary, tmp_path / "b.png")
    stored = np.array(Image.open(tmp_path / "b.png"))
    assert set(np.unique(stored)) == {0, 255} and np.array_equal(stored == 255, binary)
    labels = np.zeros((8, 8), np.int64)
    labels[0, 0], labels[5, 5] = 3, 7
    io.write_mask_png(labels, tmp_path / "l.png")
    assert np.array_equal(io.read_mask(tmp_path / "l.png"), labels)
    labels[7, 7] = 1000  # beyond 8 bits: stored as 16-bit
    io.write_mask_png(labels, tmp_path / "w.png")
    assert np.array_equal(io.read_mask(tmp_path / "w.png"), labels)
    with pytest.raises(ValueError):
        io.write_mask_png(-labels, tmp_path / "n.png")


# --- MedSAM-style arrays -------------------------------------------------------------------


def test_read_npz_both_key_styles(tmp_path):
    img, gt = ramp(), (ramp() > 128).astype(np.uint8)
    np.savez(tmp_path / "a.npz", imgs=img, gts=gt, spacing=np.array([0.5, 0.7]))
    np.savez(tmp_path / "b.npz", image=img, label=gt)
    np.savez(tmp_path / "c.npz", pixels=img)
    a_img, a_gt, a_sp = io.read_npz(tmp_path / "a.npz")
    b_img, b_gt, b_sp = io.read_npz(tmp_path / "b.npz")
    assert np.array_equal(a_img, img) and np.array_equal(b_gt, gt)
    assert a_sp == (0.5, 0.7) and b_sp is None
    with pytest.raises(KeyError, match="imgs/gts or image/label"):
        io.read_npz(tmp_path / "c.npz")
    np.save(tmp_path / "i.npy", img)
    np.save(tmp_path / "m.npy", gt)
    pair = io.read_npy_pair(tmp_path / "i.npy", tmp_path / "m.npy")
    assert np.array_equal(pair[0], img) and np.array_equal(pair[1], gt)


def test_to_model_range_rules():
    assert io.to_model_range(np.array([0.0, 0.5, 1.0])).tolist() == [0.0, 127.5, 255.0]
    assert io.to_model_range(np.array([3, 200], np.uint8)).tolist() == [3.0, 200.0]
    assert io.to_model_range(np.array([True, False])).tolist() == [255.0, 0.0]


# --- NIfTI ------------------------------------------------------------------------------------


def _affine():
    c, s = np.cos(0.3), np.sin(0.3)
    return np.array([[0.8 * c, -0.8 * s, 0, -50.0],
                     [0.8 * s, 0.8 * c, 0, 20.0],
                     [0, 0, 2.5, 7.5],
                     [0, 0, 0, 1]])


def test_nifti_round_trip_keeps_affine_header_and_values(tmp_path):
    nib = pytest.importorskip("nibabel", reason="NIfTI tests need nibabel")
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1500, (16, 12, 6)).astype(np.int16)
    src = nib.Nifti1Image(ct, _affine())
    src.header.set_xyzt_units("mm")
    nib.save(src, tmp_path / "ct.nii.gz")
    array, affine, spacing = io.read_nifti(tmp_path / "ct.nii.gz")
    assert np.array_equal(array, ct) and array.dtype == np.int16
    assert np.allclose(affine, _affine())
    assert spacing == pytest.approx((0.8, 0.8, 2.5))

    labels = (ct > 500).astype(np.uint8) * 3
    io.write_nifti(labels, tmp_path / "out" / "seg.nii.gz", like=tmp_path / "ct.nii.gz")
    back, back_affine, back_spacing = io.read_nifti(tmp_path / "out" / "seg.nii.gz")
    assert np.array_equal(back, labels) and back.dtype == np.uint8
    assert np.allclose(back_affine, _affine()) and back_spacing == pytest.approx(spacing)
    written = nib.load(tmp_path / "out" / "seg.nii.gz")
    assert written.header.get_xyzt_units() == ("mm", "unknown")
    assert int(written.header["sform_code"]) == int(src.header["sform_code"])


def test_nifti_needs_nibabel_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match="pip install nibabel"):
        io.read_nifti(tmp_path / "x.nii.gz")


# --- boxes ------------------------------------------------------------------------------------


def _blob(h=100, w=120, rows=(30, 50), cols=(40, 70)):
    m = np.zeros((h, w), np.uint8)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = 1
    return m


def test_box_from_mask_tight_margin_and_clip():
    m = _blob()
    assert boxes.box_from_mask(m) == (40, 30, 70, 50)
    assert boxes.box_from_mask(m, margin=5) == (35, 25, 75, 55)
    edge = _blob(rows=(0, 10), cols=(100, 119))
    assert boxes.box_from_mask(edge, margin=5) == (95, 0, 119, 15)
    with pytest.raises(ValueError, match="empty"):
        boxes.box_from_mask(np.zeros((5, 5)))


def test_box_jitter_per_side_in_range_and_seeded():
    m = _blob()
    rng = np.random.default_rng(7)
    grow = np.array([[40 - b[0], 30 - b[1], b[2] - 70, b[3] - 50]
                     for b in (boxes.box_from_mask(m, rng=rng) for _ in range(400))])
    assert grow.min() == 0 and grow.max() == 20
    assert np.all((grow >= 0) & (grow <= 20))
    # Sides move independently, not by one shared amount.
    assert np.mean(grow[:, 0] == grow[:, 2]) < 0.2
    a = [boxes.box_from_mask(m, rng=np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]


def test_box_jitter_clipped_at_border():
    m = _blob(rows=(0, 5), cols=(110, 119))
    rng = np.random.default_rng(0)
    for _ in range(50):
        x0, y0, x1, y1 = boxes.box_from_mask(m, rng=rng)
        assert y0 == 0 and x1 == 119 and 90 <= x0 <= 110 and 5 <= y1 <= 25


def test_validate_and_clip_box():
    assert boxes.clip_box((-5, -1, 200, 50), 100, 120) == (0, 0, 119, 50)
    assert boxes.validate_box((-5, 10, 30, 40), 100, 120) == (0, 10, 30, 40)
    with pytest.raises(ValueError, match="inverted"):
        boxes.validate_box((30, 10, 20, 40), 100, 120)
    with pytest.raises(ValueError, match="outside"):
        boxes.validate_box((130, 10, 150, 40), 100, 120)
    with pytest.raises(ValueError, match="outside"):
        boxes.validate_box((-30, -20, -1, 40), 100, 120)
    with pytest.raises(ValueError, match="4 numbers"):
        boxes.validate_box((1, 2, 3), 100, 120)


def test_box3d_from_mask():
    m = np.zeros((10, 20, 30), bool)
    m[2:5, 3:9, 10:21] = True
    assert boxes.box3d_from_mask(m) == (10, 3, 2, 20, 8, 4)
    assert boxes.box3d_from_mask(m, margin=3) == (7, 0, 0, 23, 11, 7)
    rng = np.random.default_rng(1)
    for _ in range(20):
        b = boxes.box3d_from_mask(m, rng=rng)
        assert 0 <= b[0] <= 10 and 20 <= b[3] <= 29 and 0 <= b[2] <= 2 and 4 <= b[5] <= 9


# --- FolderDataset --------------------------------------------------------------------------------


@pytest.fixture()
def folder(tmp_path):
    """A small image/mask folder with every kind of file, good and bad."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    two = np.zeros((20, 30), np.uint8)
    two[2:8, 3:12], two[10:16, 15:25] = 128, 255
    one = np.zeros((20, 30), np.uint8)
    one[5:9, 5:9] = 1
    Image.fromarray(ramp()).save(images / "grey8.png")
    Image.fromarray(two).save(masks / "grey8.png")
    Image.fromarray(ramp(lo=100, hi=60000, dtype=np.uint16)).save(images / "grey16.png")
    Image.fromarray(one).save(masks / "grey16.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(images / "rgb.png")
    Image.fromarray(one * 255).save(masks / "rgb.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.fromarray(one).save(masks / "corrupt.png")
    Image.fromarray(ramp()).save(images / "nomask.png")
    Image.fromarray(ramp(10, 10)).save(images / "small.png")
    Image.fromarray(one).save(masks / "small.png")
    Image.fromarray(ramp()).save(images / "blank.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(masks / "blank.png")
    Image.fromarray(one).save(masks / "orphan.png")
    return tmp_path


def test_folder_dataset_targets_and_skips(folder):
    ds = FolderDataset(folder)
    assert len(ds) == 4  # grey8 (2 labels) + grey16 + rgb
    assert sorted((c, t.label) for c, t in zip(ds.cases, ds.targets)) == [
        ("grey16", 1), ("grey8", 128), ("grey8", 255), ("rgb", 255)]
    reasons = dict(ds.skipped)
    assert reasons["nomask.png"] == "no mask"
    assert reasons["corrupt.png"].startswith("unreadable image")
    assert reasons["small.png"].startswith("size mismatch")
    assert reasons["blank.png"] == "empty mask"
    assert reasons["orphan.png"] == "mask without image"
    summary = ds.summary()
    assert summary.startswith("4 samples from 3 cases; skipped 5 files: ")
    assert "nomask.png (no mask)" in summary and "corrupt.png (unreadable image" in summary


def test_folder_dataset_sample_contents(folder):
    ds = FolderDataset(folder)
    by_key = {(c, t.label): i for i, (c, t) in enumerate(zip(ds.cases, ds.targets))}
    s = ds[by_key[("grey8", 255)]]
    assert s["image"].shape == (3, 20, 30) and s["image"].dtype == torch.float32
    assert torch.equal(s["image"][0], torch.from_numpy(ramp()).float())
    assert s["mask"].dtype == torch.uint8 and int(s["mask"].sum()) == 6 * 10
    assert s["mask"][12, 20] == 1 and s["mask"][4, 5] == 0  # the 255 blob, not the 128 one
    assert s["box"].tolist() == [15.0, 10.0, 24.0, 15.0]
    assert s["case"] == "grey8" and s["label"] == 255 and s["spacing"] == (1.0, 1.0)
    s16 = ds[by_key[("grey16", 1)]]
    assert float(s16["image"].min()) == 0.0 and float(s16["image"].max()) == 255.0


def test_folder_dataset_binarize_and_margin(folder):
    ds = FolderDataset(folder, binarize=True, margin=2)
    assert len(ds) == 3
    s = ds[ds.cases.index("grey8")]
    assert s["label"] == 1 and int(s["mask"].sum()) == 6 * 9 + 6 * 10
    assert s["box"].tolist() == [1.0, 0.0, 26.0, 17.0]


def test_folder_dataset_train_jitter_seeded(folder):
    def boxes_of(seed):
        ds = FolderDataset(folder, train=True, rng=seed)
        return [ds[i]["box"].tolist() for i in range(len(ds)) for _ in range(5)]

    assert boxes_of(1) == boxes_of(1)
    assert boxes_of(1) != boxes_of(2)
    ds = FolderDataset(folder, train=True, rng=0)
    i = ds.cases.index("grey16")
    for _ in range(30):
        x0, y0, x1, y1 = ds[i]["box"].tolist()
        assert 0 <= x0 <= 5 and 0 <= y0 <= 5 and 8 <= x1 <= 28 and 8 <= y1 <= 19


def test_dataloader_batches(folder):
    ds = FolderDataset(folder)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 20, 30) and batch["box"].shape == (2, 4)
    assert len(batch["case"]) == 2


def test_folder_dataset_without_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        FolderDataset(tmp_path)


# --- NpzDataset ----------------------------------------------------------------------------------


def test_npz_dataset_2d_3d_and_npy(tmp_path):
    img = ramp()
    gt = np.zeros((20, 30), np.uint8)
    gt[3:7, 4:9] = 1
    gt[10:15, 10:20] = 2
    np.savez(tmp_path / "flat.npz", imgs=np.dstack([img] * 3), gts=gt)
    vol = np.stack([ramp(), ramp(), ramp(), ramp()]).astype(np.float32) / 255.0  # MedSAM [0, 1]
    lab = np.zeros((4, 20, 30), np.uint8)
    lab[1, 2:5, 2:5] = 5
    lab[3, 8:12, 8:12] = 5
    np.savez(tmp_path / "vol.npz", image=vol, label=lab, spacing=np.array([0.7, 0.9, 3.0]))
    np.savez(tmp_path / "bad.npz", imgs=img, gts=np.zeros((5, 5), np.uint8))
    (tmp_path / "broken.npz").write_bytes(b"nope")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gts").mkdir()
    np.save(tmp_path / "imgs" / "p.npy", img)
    np.save(tmp_path / "gts" / "p.npy", gt)
    np.save(tmp_path / "imgs" / "lonely.npy", img)

    ds = NpzDataset(tmp_path)
    order = [(c, t.label, t.slice) for c, t in zip(ds.cases, ds.targets)]
    assert sorted(order) == [("flat", 1, -1), ("flat", 2, -1), ("p", 1, -1), ("p", 2, -1),
                   ("vol", 5, 1), ("vol", 5, 3)]
    reasons = dict(ds.skipped)
    assert reasons["bad.npz"].startswith("size mismatch")
    assert reasons["broken.npz"].startswith("unreadable")
    assert reasons["lonely.npy"] == "no mask"
    s = ds[order.index(("vol", 5, 3))]
    assert s["spacing"] == (0.9, 0.7)  # MedSAM stores (x, y, z)
    assert s["box"].tolist() == [8.0, 8.0, 11.0, 11.0] and s["slice"] == 3
    assert np.allclose(s["image"][1].numpy(), ramp().astype(np.float32) / 255 * 255, atol=1e-3)
    flat = ds[order.index(("flat", 2, -1))]
    assert flat["spacing"] == (1.0, 1.0) and int(flat["mask"].sum()) == 50


# --- NiftiDataset -------------------------------------------------------------------------------


@pytest.fixture()
def nifti_folder(tmp_path):
    nib = pytest.importorskip("nibabel", reason="NIfTI tests need nibabel")
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    affine = np.diag([0.8, 0.6, 2.5, 1.0])
    ct = np.full((16, 12, 5), -1000, np.int16)
    ct[2:10, 2:8, :] = 40
    lab = np.zeros((16, 12, 5), np.uint8)
    lab[2:10, 2:8, 1] = 1
    lab[3:5, 3:5, 3] = 1
    lab[6:9, 6:8, 3] = 2
    nib.save(nib.Nifti1Image(ct, affine), images / "case1_0000.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), labels / "case1.nii.gz")
    nib.save(nib.Nifti1Image(ct, affine), images / "case2_0000.nii.gz")  # no label
    return images, labels


def test_nifti_dataset_slices_spacing_and_window(nifti_folder):
    images, labels = nifti_folder
    ds = NiftiDataset(images, labels)
    assert [(t.slice, t.label) for t in ds.targets] == [(1, 1), (3, 1), (3, 2)]
    assert dict(ds.skipped) == {"case2_0000.nii.gz": "no mask"}
    assert ds.summary() == "3 samples from 1 cases; skipped 1 files: case2_0000.nii.gz (no mask)"
    s = ds[2]
    assert s["case"] == "case1" and s["spacing"] == (0.8, 0.6) and s["slice"] == 3
    assert s["image"].shape == (3, 16, 12)
    assert float(s["image"][0, 5, 5]) == pytest.approx(127.5)  # 40 HU: window centre
    assert float(s["image"][0, 0, 0]) == 0.0  # air
    assert s["box"].tolist() == [6.0, 6.0, 7.0, 8.0]
    along0 = NiftiDataset(images / "case1_0000.nii.gz", labels / "case1.nii.gz", axis=0)
    assert along0[0]["spacing"] == (0.6, 2.5) and along0[0]["image"].shape == (3, 12, 5)
    assert {t.slice for t in along0.targets} == set(range(2, 10))


def test_nifti_dataset_label_filter_and_binarize(nifti_folder):
    images, labels = nifti_folder
    only2 = NiftiDataset(images, labels, label_ids=[2])
    assert [(t.slice, t.label) for t in only2.targets] == [(3, 2)]
    assert int(only2[0]["mask"].sum()) == 3 * 2
    merged = NiftiDataset(images, labels, binarize=True)
    assert [(t.slice, t.label) for t in merged.targets] == [(1, 1), (3, 1)]
    assert int(merged[1]["mask"].sum()) == 2 * 2 + 3 * 2


def test_nifti_case_id():
    assert nifti_case_id("a/b/liver_007_0000.nii.gz") == "liver_007"
    assert nifti_case_id("x.nii") == "x"


# --- splits and synthetic data -------------------------------------------------------------------


def test_split_by_case_no_leak():
    ds = synthetic_dataset(12, size=48, seed=3)
    train, val = split_by_case(ds, 0.25, seed=0)
    cases = ds.cases
    assert sorted(train + val) == list(range(len(ds)))
    assert not {cases[i] for i in train} & {cases[i] for i in val}
    assert len({cases[i] for i in val}) == 3
    assert split_by_case(ds, 0.25, seed=0) == (train, val)
    assert any(split_by_case(ds, 0.25, seed=s)[1] != val for s in range(1, 6))
    assert split_by_case(ds, 0.0, 0)[1] == [] and split_by_case(ds, 1.0, 0)[0] == []


def test_synthetic_dataset_is_seeded_and_visible():
    a, b = synthetic_dataset(4, size=64, seed=5), synthetic_dataset(4, size=64, seed=5)
    assert len(a) == len(b) >= 4 and a.cases == b.cases
    assert torch.equal(a[0]["image"], b[0]["image"]) and torch.equal(a[0]["mask"], b[0]["mask"])
    assert not torch.equal(a[0]["image"], synthetic_dataset(4, size=64, seed=6)[0]["image"])
    for i in range(len(a)):
        s = a[i]
        mask = s["mask"].bool()
        assert s["image"].shape == (3, 64, 64) and 0 < int(mask.sum()) < 64 * 64
        inside, outside = s["image"][0][mask].mean(), s["image"][0][~mask].mean()
        assert abs(float(inside - outside)) > 10  # objects differ from background
        x0, y0, x1, y1 = s["box"].tolist()
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_array_dataset_skips_mismatch():
    img = ramp()
    lab = (img > 100).astype(np.uint8)
    ds = ArrayDataset([img, img], [lab, lab[:5]], cases=["ok", "bad"])
    assert len(ds) == 1 and ds.skipped[0][0] == "bad"


# --- real data (skipped when ../shared/data is absent) --------------------------------------------


def test_real_wbc_folder():
    root = need_data("wbc")
    ds = FolderDataset(root)
    assert ds.skipped == [] and len(ds) == 600 and len(set(ds.cases)) == 300
    assert {t.label for t in ds.targets} == {128, 255}
    s = ds[1]
    assert s["image"].shape == (3, 120, 120) and float(s["image"].max()) <= 255
    x0, y0, x1, y1 = s["box"].tolist()
    assert 0 <= x0 < x1 <= 119 and 0 <= y0 < y1 <= 119
    cells = FolderDataset(root, binarize=True)
    assert len(cells) == 300
    whole, nucleus = cells[0]["mask"].sum(), ds[1]["mask"].sum()
    assert whole > nucleus > 0


def test_real_totalseg_volumes(tmp_path):
    root = need_data("totalseg")
    pytest.importorskip("nibabel", reason="NIfTI tests need nibabel")
    ct, affine, spacing = io.read_nifti(root / "example_ct_sm.nii.gz")
    seg, seg_affine, _ = io.read_nifti(root / "example_seg.nii.gz")
    assert ct.shape == seg.shape == (122, 101, 30) and spacing == (3.0, 3.0, 3.0)
    assert np.allclose(affine, seg_affine)
    io.write_nifti(seg, tmp_path / "seg.nii.gz", like=root / "example_ct_sm.nii.gz")
    back, back_affine, back_spacing = io.read_nifti(tmp_path / "seg.nii.gz")
    assert np.array_equal(back, seg) and np.allclose(back_affine, affine)
    assert back_spacing == spacing
    ds = NiftiDataset([root / "example_ct_sm.nii.gz", root / "example_mr_sm.nii.gz"],
                      [root / "example_seg.nii.gz", root / "example_seg_mr.nii.gz"])
    assert ds.skipped == [] and set(ds.cases) == {"example_ct_sm", "example_mr_sm"}
    s = ds[len(ds) // 3]
    assert s["spacing"] == (3.0, 3.0) and s["mask"].any()
    assert np.array_equal(s["mask"].numpy(), seg[:, :, s["slice"]] == s["label"])
    label = int(np.bincount(seg.ravel())[1:].argmax()) + 1
    box = boxes.box3d_from_mask(np.transpose(seg == label, (2, 1, 0)))
    zs, ys, xs = np.nonzero(np.transpose(seg == label, (2, 1, 0)))
    assert box == (xs.min(), ys.min(), zs.min(), xs.max(), ys.max(), zs.max())
