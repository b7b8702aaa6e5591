"""Reading and writing medical images, masks and volumes.

Images for the model are float32 HxWx3 arrays in [0, 255]. Masks and label
maps are integer arrays of label ids. Volumes come from NIfTI via nibabel,
which is optional: only the NIfTI functions need it; or from a folder holding
a DICOM series (dbsam.data.dicom, optional pydicom), in the same axis order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")

# Soft-tissue CT window (level 40 HU, width 400 HU): shows organs and vessels,
# the usual default for abdominal CT.
CT_LEVEL = 40.0
CT_WIDTH = 400.0


# --- intensity ----------------------------------------------------------------


def window_ct(hu, level: float = CT_LEVEL, width: float = CT_WIDTH) -> np.ndarray:
    """Map CT values in HU to [0, 255] with a level/width window (clipped)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = level - width / 2
    out = (np.asarray(hu, np.float32) - lo) / width * 255.0
    return np.clip(out, 0.0, 255.0)


def normalize_intensity(arr, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Map to [0, 255] between two percentiles (0/100 gives plain min-max).

    Used for MR and 16-bit images, whose raw range has no fixed meaning and
    often a few extreme outliers that a plain min-max would let dominate.
    """
    arr = np.asarray(arr, np.float32)
    lo, hi = np.percentile(arr, [lower, upper]) if arr.size else (0.0, 0.0)
    if hi <= lo:
        # A flat image: keep it flat but in range rather than dividing by zero.
        return np.zeros_like(arr) if hi <= 0 else np.full_like(arr, 255.0 if lo >= 255 else 0.0)
    return np.clip((arr - lo) / (hi - lo) * 255.0, 0.0, 255.0)


def to_model_range(arr) -> np.ndarray:
    """Any image array -> float32 in [0, 255], keeping 8-bit values as they are.

    bool -> 0/255; uint8 -> unchanged; floats already in [0, 1] (MedSAM's npy
    files) -> x255; anything else (16-bit, HU, MR) -> percentile window.
    """
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.float32) * 255.0
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if arr.dtype.kind == "f" and arr.size and np.nanmin(arr) >= 0 and np.nanmax(arr) <= 1:
        return arr.astype(np.float32) * 255.0
    return normalize_intensity(arr)


def to_rgb(arr) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 -> HxWx3 (grey replicated, alpha dropped)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return arr[..., :3]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] > 4:
        return to_rgb(np.moveaxis(arr, 0, -1))  # channels-first
    raise ValueError(f"cannot make an RGB image from an array of shape {arr.shape}")


# --- 2D files -------------------------------------------------------------------


def _load_pixels(path: Path, as_mask: bool) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            pass  # Pillow reads the common TIFFs; tifffile only adds coverage
        else:
            return np.asarray(tifffile.imread(path))
    with Image.open(path) as im:
        if im.mode == "P" and not as_mask:  # palette indices are label ids in masks
            im = im.convert("RGB")
        elif im.mode in ("LA", "PA"):
            im = im.convert("L")
        elif im.mode in ("CMYK", "YCbCr"):
            im = im.convert("RGB")
        return np.asarray(im)


def read_image(path) -> np.ndarray:
    """A 2D image file -> float32 HxWx3 in [0, 255].

    8-bit values are kept; 16-bit and float images go through a 0.5/99.5
    percentile window (all channels together, so colour balance survives);
    grey is replicated to 3 channels.
    """
    path = Path(path)
    pixels = _load_pixels(path, as_mask=False)
    if pixels.ndim not in (2, 3):
        raise ValueError(f"{path.name}: expected a 2D image, got shape {pixels.shape}")
    return to_model_range(to_rgb(pixels))


def read_mask(path) -> np.ndarray:
    """A mask / label-map file -> int32 HxW array of label ids."""
    path = Path(path)
    pixels = _load_pixels(path, as_mask=True)
    if pixels.ndim == 3:
        channels = pixels[..., :3]
        if not (channels == channels[..., :1]).all():
            raise ValueError(f"{path.name}: colour mask; convert it to one channel of label ids")
        pixels = channels[..., 0]
    if pixels.ndim != 2:
        raise ValueError(f"{path.name}: expected a 2D mask, got shape {pixels.shape}")
    if pixels.dtype.kind == "f" and not np.array_equal(pixels, np.round(pixels)):
        raise ValueError(f"{path.name}: mask has non-integer values")
    return pixels.astype(np.int32)


def write_mask_png(mask, path) -> Path:
    """Write a mask as PNG: bool -> 0/255, label ids kept (16-bit above 255)."""
    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D, got shape {mask.shape}")
    if mask.dtype == bool:
        out = mask.astype(np.uint8) * 255
    else:
        if mask.size and (mask.min() < 0 or mask.max() > 65535):
            raise ValueError("label ids must be in 0..65535 to be stored as PNG")
        out = mask.astype(np.uint8 if (not mask.size or mask.max() <= 255) else np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out).save(path)
    return path


# --- MedSAM-style arrays ----------------------------------------------------------

NPZ_KEYS = (("imgs", "gts"), ("image", "label"))


def read_npz(path):
    """A MedSAM-style .npz -> (image, label, spacing or None).

    Accepts the keys imgs/gts (MedSAM) or image/label; an optional `spacing`.
    Arrays are returned as stored (2D image HxW[x3] or volume DxHxW).
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        for image_key, label_key in NPZ_KEYS:
            if image_key in data and label_key in data:
                spacing = tuple(float(s) for s in data["spacing"]) if "spacing" in data else None
                return data[image_key], data[label_key], spacing
        keys = ", ".join(sorted(data.files))
    raise KeyError(f"{path.name}: needs keys imgs/gts or image/label, has {keys}")


def read_npy_pair(image_path, mask_path):
    """A plain .npy image and its .npy mask -> (image, mask)."""
    return np.load(image_path, allow_pickle=False), np.load(mask_path, allow_pickle=False)


# --- NIfTI ------------------------------------------------------------------------


def _nibabel():
    try:
        import nibabel
    except ImportError as err:
        raise ImportError("install nibabel to read NIfTI: pip install nibabel") from err
    return nibabel


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path):
    """A NIfTI file -> (array, affine 4x4, voxel spacing in mm per array axis)."""
    nib = _nibabel()
    img = nib.load(str(path))
    array = np.asanyarray(img.dataobj)
    # The header holds float32: take the shortest decimal that gives it back
    # (0.8, not 0.800000011920929), which is what the writer meant.
    spacing = tuple(float(str(np.float32(z))) for z in img.header.get_zooms()[: array.ndim])
    return array, img.affine.copy(), spacing


def write_nifti(array, path, like=None, affine=None, header=None) -> Path:
    """Write `array` as NIfTI with the affine and header of `like` (a path).

    Pass `affine`/`header` instead to set them directly. The stored data type
    follows `array` (so a label map written "like" an int16 CT stays uint8),
    and intensity scaling is cleared so label ids survive unchanged.
    """
    nib = _nibabel()
    if like is not None:
        ref = nib.load(str(like))
        affine = ref.affine if affine is None else affine
        header = ref.header if header is None else header
    if affine is None:
        raise ValueError("write_nifti needs `like` or an `affine`")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    header = header.copy() if header is not None else None
    img = nib.Nifti1Image(array, affine, header=header)
    img.header.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if header is None:
        # A bare affine (e.g. a DICOM series'): scanner coordinates in mm.
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    else:
        # Nifti1Image keeps the reference's qform/sform codes only if told to.
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


# --- volumes: NIfTI or a DICOM series ------------------------------------------------


def is_dicom_series(path) -> bool:
    """A folder holding DICOM files (no pydicom needed to tell)."""
    from .dicom import is_dicom_series as check

    return check(path)


def is_volume(path) -> bool:
    """A NIfTI file or a folder holding a DICOM series."""
    return (Path(path).is_file() and is_nifti(path)) or is_dicom_series(path)


def read_volume(path):
    """A NIfTI file or a DICOM series folder -> (array, affine 4x4, spacing per array axis in mm).

    Both come in nibabel's array order and RAS+ affine (see dbsam.data.dicom).
    """
    if Path(path).is_dir():
        from .dicom import read_dicom_series

        return read_dicom_series(path)
    return read_nifti(path)
