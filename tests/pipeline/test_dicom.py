"""DICOM series: synthetic CT slices written by pydicom here, read as volumes in NIfTI's order."""
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="DICOM tests need pydicom (the dicom extra)")
nib = pytest.importorskip("nibabel", reason="DICOM tests compare with NIfTI, which needs nibabel")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from dbsam.data import io  # noqa: E402
from dbsam.data.datasets import NiftiDataset, align_to  # noqa: E402
from dbsam.data.dicom import is_dicom_series, read_dicom_series  # noqa: E402

ROWS, COLS, N = 12, 10, 5
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _write_slice(path, stored, position, *, series, orientation=AXIAL, pixel_spacing=(0.7, 0.8),
                 slope=1.0, intercept=-1024.0, instance=1):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "synthetic"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.1", series
    ds.SeriesDescription = f"series {series[-1]}"
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.PixelData = np.ascontiguousarray(stored, "<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _series(folder, *, step=(0.0, 0.0, 2.5), origin=(-50.0, 30.0, 100.0), seed=0, series="1.2.3.4.1",
            n=N, names=None, **options):
    """N slices with stored values 0..2000 (HU -1024..976) at origin + k * step, written in a
    shuffled order under shuffled names, InstanceNumber running against the positions.
    Returns the stored slices (rows x cols) in position order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 2001, (n, ROWS, COLS)).astype(np.int16)
    names = names or [f"x{v:03d}" for v in rng.permutation(900)[:n]]  # no suffix: found by the DICM magic
    for w, k in enumerate(rng.permutation(n)):
        position = np.asarray(origin) + k * np.asarray(step)
        _write_slice(folder / names[w], stored[k], position, series=series, instance=n - k, **options)
    return stored


def test_series_values_order_spacing_and_affine_match_nifti(tmp_path):
    folder = tmp_path / "ct"
    stored = _series(folder)
    (folder / "notes.txt").write_text("not DICOM")  # skipped
    (folder / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert is_dicom_series(folder) and not is_dicom_series(tmp_path)
    volume, affine, spacing = read_dicom_series(folder)

    hu = stored.astype(np.int32) - 1024
    assert volume.dtype == np.int16 and volume.shape == (COLS, ROWS, N)  # (columns, rows, slices)
    assert np.array_equal(volume, hu.transpose(2, 1, 0))  # by position, not name or InstanceNumber
    assert spacing == pytest.approx((0.8, 0.7, 2.5))
    expected = np.array([[-0.8, 0, 0, 50], [0, -0.7, 0, -30], [0, 0, 2.5, 100], [0, 0, 0, 1]])
    assert np.allclose(affine, expected)  # LPS -> RAS: x and y negated
    # Voxel (i=col 3, j=row 5, k=2) sits at IPP_2 + 3 * 0.8 along the row + 5 * 0.7 down the column.
    lps = np.array([-50 + 3 * 0.8, 30 + 5 * 0.7, 100 + 2 * 2.5])
    assert np.allclose(affine @ [3, 5, 2, 1], [-lps[0], -lps[1], lps[2], 1])

    io.write_nifti(volume, tmp_path / "ct.nii.gz", affine=affine)
    back, back_affine, back_spacing = io.read_nifti(tmp_path / "ct.nii.gz")
    assert np.array_equal(back, volume) and back.dtype == volume.dtype
    assert np.allclose(back_affine, affine) and back_spacing == pytest.approx(spacing)
    assert nib.load(tmp_path / "ct.nii.gz").header.get_xyzt_units()[0] == "mm"
    via_io = io.read_volume(folder)
    assert np.array_equal(via_io[0], volume) and np.allclose(via_io[1], affine)


def test_coronal_series_descending_positions_and_rescale_types(tmp_path):
    # Coronal: rows along +x, columns along -z, so the normal is +y; positions written in steps of
    # -3 mm along it must come back in increasing y.
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    stored = _series(tmp_path / "cor", step=(0.0, -3.0, 0.0), orientation=coronal,
                     pixel_spacing=(1.5, 0.5), slope=2.0, intercept=-1000.0)
    volume, affine, spacing = read_dicom_series(tmp_path / "cor")
    ascending = stored[::-1]  # slice k of the volume = the last written position first
    assert volume.dtype == np.int16
    assert np.array_equal(volume, (ascending.astype(np.int32) * 2 - 1000).transpose(2, 1, 0))
    assert spacing == pytest.approx((0.5, 1.5, 3.0))
    origin_lps = np.array([-50.0, 30.0 - 3.0 * (N - 1), 100.0])
    expected = np.array([[-0.5, 0, 0, -origin_lps[0]], [0, 0, -3.0, -origin_lps[1]],
                         [0, -1.5, 0, origin_lps[2]], [0, 0, 0, 1]])
    assert np.allclose(affine, expected)

    stored = _series(tmp_path / "half", slope=0.5, intercept=-10.0)
    half, _, _ = read_dicom_series(tmp_path / "half")
    expected_half = stored * 0.5 - 10.0
    assert half.dtype == np.float32 and np.array_equal(half, expected_half.transpose(2, 1, 0))


def test_gantry_tilt_is_kept_in_the_affine(tmp_path):
    stored = _series(tmp_path / "tilt", step=(0.0, 0.5, 2.5))  # each slice 0.5 mm further back
    volume, affine, spacing = read_dicom_series(tmp_path / "tilt")
    assert np.array_equal(volume, (stored.astype(np.int32) - 1024).transpose(2, 1, 0))
    assert np.allclose(affine[:3, 2], [0.0, -0.5, 2.5]) and spacing[2] == pytest.approx(np.sqrt(6.5))


def test_same_as_simpleitk_written_to_nifti(tmp_path):
    """An independent reader: ITK's series, written as NIfTI, read by read_nifti (when installed)."""
    sitk = pytest.importorskip("SimpleITK", reason="the cross-check needs SimpleITK")
    geometries = {"axial": {}, "oblique": dict(orientation=(0.8, 0.6, 0, -0.6, 0.8, 0), step=(0, 0, -2.0)),
                  "sagittal": dict(orientation=(0, 1, 0, 0, 0, -1), step=(1.2, 0, 0), pixel_spacing=(0.9, 0.6))}
    for name, options in geometries.items():
        _series(tmp_path / name, **options)
        volume, affine, spacing = read_dicom_series(tmp_path / name)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / name)))
        sitk.WriteImage(reader.Execute(), str(tmp_path / f"{name}.nii.gz"))
        array, nifti_affine, nifti_spacing = io.read_nifti(tmp_path / f"{name}.nii.gz")
        assert np.array_equal(array, volume), name
        assert np.allclose(nifti_affine, affine, atol=1e-4), name
        assert nifti_spacing == pytest.approx(spacing), name


def test_mixed_series_refused_unless_one_is_picked(tmp_path):
    folder = tmp_path / "mixed"
    _series(folder, series="1.2.3.4.1", names=[f"a{i}" for i in range(N)])
    other = _series(folder, series="1.2.3.4.2", seed=1, n=3, names=[f"b{i}" for i in range(3)])
    with pytest.raises(ValueError, match=r"2 series mixed.*1\.2\.3\.4\.1 \(5 slices.*1\.2\.3\.4\.2 \(3 slices"):
        read_dicom_series(folder)
    picked, _, _ = read_dicom_series(folder, series_uid="1.2.3.4.2")
    assert np.array_equal(picked, (other.astype(np.int32) - 1024).transpose(2, 1, 0))
    with pytest.raises(ValueError, match="no slices of series 9.9; present: 1.2.3.4.1"):
        read_dicom_series(folder, series_uid="9.9")


def test_uneven_gaps_duplicates_and_inconsistent_headers_refused(tmp_path):
    folder = tmp_path / "gap"
    _series(folder, names=[f"s{i}" for i in range(N)])
    positions = {p.name: float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in folder.iterdir()}
    missing = next(name for name, z in positions.items() if z == 105.0)  # the third slice
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=r"uneven slice gaps \(median 2.5 mm.*: s\d -> s\d: 5 mm; missing slices"):
        read_dicom_series(folder)

    bent = tmp_path / "bent"
    _series(bent, n=2, names=["a", "b"])  # z 100 and 102.5 at x -50; then z 105 at x -45
    _write_slice(bent / "c", np.ones((ROWS, COLS)), (-45, 30, 105), series="1.2.3.4.1")
    with pytest.raises(ValueError, match=r"not on one line: [ab] is 2.5 mm off"):
        read_dicom_series(bent)

    dup = tmp_path / "dup"
    _series(dup, step=(0.0, 0.0, 0.0), n=2)
    with pytest.raises(ValueError, match="same position 100 mm"):
        read_dicom_series(dup)

    mixed = tmp_path / "orient"
    _series(mixed, n=2, names=["a", "b"])
    _write_slice(mixed / "c", np.ones((ROWS, COLS)), (0, 0, 110), series="1.2.3.4.1",
                 orientation=(0, 1, 0, 0, 0, -1))
    with pytest.raises(ValueError, match="inconsistent ImageOrientationPatient"):
        read_dicom_series(mixed)
    spacing = tmp_path / "spacing"
    _series(spacing, n=2, names=["a", "b"])
    _write_slice(spacing / "c", np.ones((ROWS, COLS)), (-50, 30, 105), series="1.2.3.4.1", pixel_spacing=(0.7, 0.9))
    with pytest.raises(ValueError, match=r"inconsistent PixelSpacing: a has \[0.7, 0.8\], c has \[0.7, 0.9\]"):
        read_dicom_series(spacing)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no readable DICOM image slices"):
        read_dicom_series(empty)


def test_missing_pydicom_says_which_extra(monkeypatch, tmp_path):
    _series(tmp_path / "ct", n=2)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    assert is_dicom_series(tmp_path / "ct")  # detection needs no pydicom
    with pytest.raises(ImportError, match=r"pip install 'dbsam\[dicom\]'"):
        io.read_volume(tmp_path / "ct")


def _labels_for(volume):
    lab = np.zeros(volume.shape, np.uint8)
    lab[2:6, 3:9, 1] = 1
    lab[4:8, 1:4, 3] = 2
    return lab


def test_nifti_dataset_takes_dicom_series_with_plain_or_flipped_labels(tmp_path):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    _series(images / "case1")
    volume, affine, _ = read_dicom_series(images / "case1")
    lab = _labels_for(volume)
    io.write_nifti(lab, labels / "case1.nii.gz", affine=affine)
    ds = NiftiDataset(images, labels)
    assert ds.case_names == ["case1"] and [(t.slice, t.label) for t in ds.targets] == [(1, 1), (3, 2)]
    s = ds[0]
    assert s["spacing"] == pytest.approx((0.8, 0.7)) and s["image"].shape == (3, COLS, ROWS)
    assert int(s["mask"].sum()) == 4 * 6 and s["box"].tolist() == [3.0, 2.0, 8.0, 5.0]
    expected = io.window_ct(volume[:, :, 1])  # int16 HU: the CT window, as for NIfTI
    assert np.allclose(s["image"][0].numpy(), expected)
    assert ds.volume_geometry(0) == ((COLS, ROWS, N), pytest.approx((0.8, 0.7, 2.5)), 2)

    # The same labels stored the way dcm2niix would (rows flipped): brought back to the series' order.
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    flip[1, 3] = ROWS - 1
    io.write_nifti(lab[:, ::-1], tmp_path / "flipped.nii.gz", affine=affine @ flip)
    flipped = NiftiDataset(images / "case1", tmp_path / "flipped.nii.gz")
    assert [(t.slice, t.label) for t in flipped.targets] == [(1, 1), (3, 2)]
    assert np.array_equal(flipped[1]["mask"].numpy(), lab[:, :, 3] == 2)
    shifted = affine.copy()
    shifted[:3, 3] += 7.0
    io.write_nifti(lab, tmp_path / "shifted.nii.gz", affine=shifted)
    bad = NiftiDataset(images / "case1", tmp_path / "shifted.nii.gz")
    assert len(bad) == 0 and "label affine does not match" in bad.skipped[0][1]
    assert align_to(lab, affine, affine, lab.shape)[1] is None


def test_open_dataset_finds_dicom_series_folders(tmp_path):
    from dbsam.train.data import open_dataset

    _series(tmp_path / "imagesTr" / "case1")
    volume, affine, _ = read_dicom_series(tmp_path / "imagesTr" / "case1")
    io.write_nifti(_labels_for(volume), tmp_path / "labelsTr" / "case1.nii.gz", affine=affine)
    assert len(open_dataset(tmp_path)) == 2
    single = open_dataset(images=tmp_path / "imagesTr" / "case1", labels=tmp_path / "labelsTr" / "case1.nii.gz")
    assert single.case_names == ["case1"] and len(single) == 2


def test_predict_on_a_series_writes_nifti_with_its_affine(tmp_path, capsys):
    pytest.importorskip("segment_anything")
    from dbsam.cli import main

    _series(tmp_path / "ct")
    _, affine, _ = read_dicom_series(tmp_path / "ct")
    assert main(["predict", str(tmp_path / "ct"), "--box", "1,2,1,8,9,3", "--out", str(tmp_path / "o")]) == 0
    out = nib.load(tmp_path / "o" / "ct_mask.nii.gz")
    assert out.shape == (COLS, ROWS, N) and np.allclose(out.affine, affine)
    assert out.header.get_xyzt_units()[0] == "mm" and int(out.header["sform_code"]) == 1
    data = np.asarray(out.dataobj)
    assert set(np.unique(data)) <= {0, 1} and not data[..., [0, 4]].any()  # only slices z 1..3
    assert "wrote" in capsys.readouterr().out
