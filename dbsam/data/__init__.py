"""Medical image data: file I/O, box prompts and per-target datasets."""

from .boxes import box3d_from_mask, box_from_mask, clip_box, validate_box
from .datasets import (
    ArrayDataset,
    FolderDataset,
    NiftiDataset,
    NpzDataset,
    TargetDataset,
    split_by_case,
    synthetic_dataset,
)
from .io import (
    read_image,
    read_mask,
    read_nifti,
    read_npz,
    read_npy_pair,
    read_volume,
    window_ct,
    normalize_intensity,
    write_mask_png,
    write_nifti,
)

__all__ = [
    "ArrayDataset", "FolderDataset", "NiftiDataset", "NpzDataset", "TargetDataset",
    "box3d_from_mask", "box_from_mask", "clip_box", "validate_box",
    "normalize_intensity", "read_image", "read_mask", "read_nifti", "read_npy_pair",
    "read_npz", "read_volume", "split_by_case", "synthetic_dataset", "window_ct", "write_mask_png",
    "write_nifti",
]
