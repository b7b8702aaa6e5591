"""Reading a DICOM series (one folder of single-frame slices) as a volume.

An optional extra: pydicom is imported only when a series is read
(`pip install 'dbsam[dicom]'`). Detecting a series (`is_dicom_file`,
`is_dicom_series`) needs no pydicom, so a DICOM folder on a machine without it
gets the install message rather than "no images".

Array order and affine follow nibabel's convention for NIfTI, so a series
and a NIfTI of the same geometry read the same through `read_nifti`:

    volume[i, j, k]  i: column of the DICOM image (along the first
                        ImageOrientationPatient vector, the row direction),
                     j: row of the DICOM image (along the second vector),
                     k: slice, in increasing position along the slice normal
                        (row vector x column vector), whatever the file names
                        or InstanceNumbers say.

i.e. shape (Columns, Rows, slices): each DICOM pixel array transposed. This
is what ITK (SimpleITK's series reader) gives once written to NIfTI and read
back with nibabel; dcm2niix's output differs from it by axis flips only. The
affine maps (i, j, k, 1) to RAS+ world millimetres (DICOM's LPS with x and y
negated), with column 0 = row cosine x PixelSpacing[1], column 1 = column
cosine x PixelSpacing[0], column 2 = the mean step between consecutive slice
positions, column 3 = ImagePositionPatient of slice 0. Spacing is (column
spacing, row spacing, slice step) in mm, one per array axis.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

INSTALL_HINT = "install the dicom extra: pip install 'dbsam[dicom]'"
DICOM_SUFFIXES = (".dcm", ".dicom")

# Header values are decimal strings: allow their rounding, nothing more.
ORIENTATION_TOL = 1e-3  # direction cosines
SPACING_TOL = 1e-3  # mm, PixelSpacing
GAP_TOLERANCE = 0.01  # slice gaps may differ from the median gap by this fraction


def _pydicom():
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(f"reading DICOM needs pydicom: {INSTALL_HINT}") from err
    return pydicom


def is_dicom_file(path) -> bool:
    """A Part 10 file (b"DICM" after the 128-byte preamble), or a .dcm/.dicom file name."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_series(path) -> bool:
    """A folder holding at least one DICOM file (sub-folders are not searched)."""
    path = Path(path)
    return path.is_dir() and any(is_dicom_file(p) for p in sorted(path.iterdir()))


def _floats(value, n, what, name):
    try:
        out = np.array([float(v) for v in value], np.float64)
    except (TypeError, ValueError):
        out = np.array([])
    if out.shape != (n,):
        raise ValueError(f"{name}: {what} should be {n} numbers, got {value!r}")
    return out


def _header(pydicom, path):
    """The header of one file, or None when it is not a DICOM image slice."""
    try:
        # Files without the Part 10 preamble are tried only when named .dcm/.dicom.
        force = Path(path).suffix.lower() in DICOM_SUFFIXES
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=force)
    except Exception:  # InvalidDicomError, truncated files, anything unreadable: not a slice
        return None
    needed = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    if not all(k in ds for k in needed):
        return None  # DICOMDIR, structured reports, images without geometry
    return ds


def _series_list(headers) -> str:
    counts = {}
    for path, ds in headers:
        uid = str(ds.get("SeriesInstanceUID", "(none)"))
        desc = str(ds.get("SeriesDescription", "")).strip()
        n, _ = counts.get(uid, (0, desc))
        counts[uid] = (n + 1, desc)
    return "; ".join(f"{uid} ({n} slices{', ' + repr(d) if d else ''})" for uid, (n, d) in counts.items())


def read_dicom_series(folder, series_uid: str | None = None, gap_tolerance: float = GAP_TOLERANCE):
    """A folder of single-frame DICOM slices -> (volume, affine 4x4 RAS+, spacing in mm).

    See the module docstring for the axis order. Values are the stored pixels
    after RescaleSlope/RescaleIntercept (CT in HU): an integer array (int16
    when it fits, else int32; unsigned data without rescale keep their type)
    when slope and intercept are whole numbers, float32 otherwise.

    Files that are not DICOM image slices are skipped (sub-folders too).
    ValueError for: no readable slices; several series without `series_uid`
    (the message lists them); slices that disagree on orientation, pixel
    spacing or size; two slices at one position; gaps between consecutive
    slices differing from the median gap by more than `gap_tolerance` of it
    (missing slices, most often), or positions off one straight line by as
    much; multi-frame or colour images. A gantry tilt (positions on a line
    oblique to the slice normal) is kept in the affine's third column; the
    third spacing is then that column's length, not the gap between planes.
    """
    pydicom = _pydicom()
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of DICOM files")
    headers = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = _header(pydicom, path)
        if ds is not None:
            headers.append((path, ds))
    if not headers:
        raise ValueError(f"{folder}: no readable DICOM image slices "
                         "(need ImagePositionPatient, ImageOrientationPatient and PixelSpacing)")

    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if series_uid is not None:
        chosen = [(p, ds) for p, ds in headers if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        if not chosen:
            raise ValueError(f"{folder}: no slices of series {series_uid}; present: {_series_list(headers)}")
        headers = chosen
    elif len(uids) > 1:
        raise ValueError(f"{folder}: {len(uids)} series mixed in one folder; pick one with series_uid: "
                         f"{_series_list(headers)}")

    first_path, first = headers[0]
    orientation = _floats(first.ImageOrientationPatient, 6, "ImageOrientationPatient", first_path.name)
    pixel_spacing = _floats(first.PixelSpacing, 2, "PixelSpacing", first_path.name)
    size = (int(first.Rows), int(first.Columns))
    for path, ds in headers:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(f"{path.name}: multi-frame DICOM is not supported (one file per slice only)")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise ValueError(f"{path.name}: colour DICOM ({ds.SamplesPerPixel} samples per pixel) is not supported")
        o = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", path.name)
        if not np.allclose(o, orientation, atol=ORIENTATION_TOL):
            raise ValueError(f"{folder}: inconsistent ImageOrientationPatient: {first_path.name} has "
                             f"{orientation.tolist()}, {path.name} has {o.tolist()}")
        s = _floats(ds.PixelSpacing, 2, "PixelSpacing", path.name)
        if not np.allclose(s, pixel_spacing, atol=SPACING_TOL):
            raise ValueError(f"{folder}: inconsistent PixelSpacing: {first_path.name} has "
                             f"{pixel_spacing.tolist()}, {path.name} has {s.tolist()}")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise ValueError(f"{folder}: inconsistent image size: {first_path.name} is {size[0]}x{size[1]}, "
                             f"{path.name} is {int(ds.Rows)}x{int(ds.Columns)} (rows x columns)")

    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    positions = [_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", p.name) for p, ds in headers]
    along = np.array([float(pos @ normal) for pos in positions])
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    positions = [positions[i] for i in order]
    along = along[order]

    gaps = np.diff(along)
    if len(gaps):
        dup = np.flatnonzero(gaps <= SPACING_TOL)
        if len(dup):
            k = int(dup[0])
            raise ValueError(f"{folder}: {headers[k][0].name} and {headers[k + 1][0].name} are at the same "
                             f"position {along[k]:g} mm along the slice normal (several acquisitions, echoes "
                             "or time points in one series?)")
        median = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - median) > gap_tolerance * median)
        if len(bad):
            listed = ", ".join(f"{headers[k][0].name} -> {headers[k + 1][0].name}: {gaps[k]:g} mm" for k in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise ValueError(f"{folder}: uneven slice gaps (median {median:g} mm, tolerance "
                             f"{gap_tolerance:.0%}): {listed}{more}; missing slices?")
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        # Gantry tilt keeps the positions on a line (a sheared grid, which the affine holds); a
        # line that bends does not fit any affine.
        off = [float(np.linalg.norm(pos - positions[0] - k * step)) for k, pos in enumerate(positions)]
        worst = int(np.argmax(off))
        if off[worst] > max(gap_tolerance * median, SPACING_TOL):
            raise ValueError(f"{folder}: slice positions are not on one line: {headers[worst][0].name} is "
                             f"{off[worst]:g} mm off the line from the first slice to the last")
    else:  # one slice: its thickness, if stated, along the normal
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        step = normal * float(thickness)

    volume = _pixels(pydicom, headers, folder)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * pixel_spacing[1]
    affine_lps[:3, 1] = col_cos * pixel_spacing[0]
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    # Rounded to 1e-6 mm: a step of 1.2 from positions like 100.6 - 99.4 is 1.2, not 1.1999999999999993.
    spacing = tuple(round(float(v), 6) for v in (pixel_spacing[1], pixel_spacing[0], np.linalg.norm(step)))
    return volume, affine, spacing


def _pixels(pydicom, headers, folder):
    """Stacked slices, rescaled, as (Columns, Rows, slices)."""
    slices, slopes, intercepts, raw_dtype = [], [], [], None
    for path, _ in headers:
        try:
            ds = pydicom.dcmread(str(path))
            pixels = ds.pixel_array
        except Exception as err:
            raise ValueError(f"{path.name}: cannot decode the pixel data ({err}); compressed transfer "
                             "syntaxes need pydicom's optional decoders (pylibjpeg, gdcm)") from err
        if pixels.ndim != 2:
            raise ValueError(f"{path.name}: expected one 2D frame, got pixel data of shape {pixels.shape}")
        raw_dtype = pixels.dtype
        slices.append(pixels)
        slopes.append(float(ds.get("RescaleSlope", 1) or 1))
        intercepts.append(float(ds.get("RescaleIntercept", 0) or 0))
    whole = all(float(v).is_integer() for v in slopes + intercepts)
    if whole:
        stack = np.stack([s.astype(np.int64) * int(m) + int(b) for s, m, b in zip(slices, slopes, intercepts)])
        lo, hi = (int(stack.min()), int(stack.max())) if stack.size else (0, 0)
        untouched = all(m == 1 for m in slopes) and all(b == 0 for b in intercepts)
        if untouched and raw_dtype.kind == "u":
            dtype = raw_dtype
        elif np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max:
            dtype = np.int16
        else:
            dtype = np.int32
        stack = stack.astype(dtype)
    else:
        stack = np.stack([s.astype(np.float64) * m + b for s, m, b in zip(slices, slopes, intercepts)])
        stack = stack.astype(np.float32)
    return np.ascontiguousarray(stack.transpose(2, 1, 0))
