"""Torch datasets of per-target samples for box-prompted segmentation.

Every dataset yields one sample per (image or slice, label) pair:

    {"image": float32 tensor 3xHxW in [0, 255], "mask": uint8 tensor HxW (0/1),
     "box": float32 tensor [4] (x0, y0, x1, y1), "case": str, "label": int,
     "slice": int (-1 for 2D files), "spacing": (sy, sx) in mm}

Files that cannot be used are skipped, never fatal: they are listed in
`dataset.skipped` as (name, reason) and in `dataset.summary()`.

Box prompts: `train=True` moves each side outward by a random 0..max_jitter
pixels drawn from the dataset's numpy Generator (seedable); `train=False`
uses the fixed `margin`. With DataLoader workers, each worker gets a copy of
the generator: reseed it in `worker_init_fn` if the jitter must differ.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from . import io
from .boxes import MAX_JITTER, box_from_mask

__all__ = [
    "TargetDataset",
    "ArrayDataset",
    "FolderDataset",
    "NpzDataset",
    "NiftiDataset",
    "split_by_case",
    "synthetic_dataset",
]


@dataclass(frozen=True)
class Target:
    source: int  # index into the dataset's sources (one file or volume each)
    label: int
    slice: int = -1


class TargetDataset(Dataset):
    """Shared bookkeeping; subclasses fill `targets` and implement `_load`.

    Options every dataset takes: `label_ids` (keep only these labels),
    `binarize` (one target, mask > 0, labelled 1), `train` with `rng` (a numpy
    Generator or seed) and `max_jitter` for random box growth, `margin` for
    the fixed growth used otherwise.
    """

    def __init__(self, *, label_ids=None, binarize=False, train=False, rng=None,
                 margin=0, max_jitter=MAX_JITTER):
        # label_ids: keep only these labels (None: every non-zero label).
        self.label_ids = None if label_ids is None else {int(v) for v in label_ids}
        self.binarize = binarize
        self.train = train
        self.rng = np.random.default_rng(rng)
        self.margin = margin
        self.max_jitter = max_jitter
        self.case_names: list[str] = []  # one per source
        self.targets: list[Target] = []
        self.skipped: list[tuple[str, str]] = []

    # -- to implement ---------------------------------------------------------
    def _load(self, source: int, slice_index: int):
        """-> (image float32 HxWx3 in [0, 255], label map HxW, (sy, sx))."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------
    def _labels_in(self, label_map) -> list[int]:
        if self.binarize:
            return [1] if np.any(label_map) else []
        present = [int(v) for v in np.unique(label_map) if v != 0]
        if self.label_ids is not None:
            present = [v for v in present if v in self.label_ids]
        return present

    def _add_source(self, name: str, label_map, slice_axis=None) -> None:
        """Register a source and one target per label (per slice for volumes)."""
        source = len(self.case_names)
        self.case_names.append(name)
        if slice_axis is None:
            for label in self._labels_in(label_map):
                self.targets.append(Target(source, label))
            return
        # Only slices with labels; reduce over the in-plane axes once.
        planes = np.moveaxis(np.asarray(label_map), slice_axis, 0)
        for k in np.flatnonzero(planes.reshape(planes.shape[0], -1).any(axis=1)):
            for label in self._labels_in(planes[k]):
                self.targets.append(Target(source, label, int(k)))

    def volume_geometry(self, source: int):
        """(label volume shape, spacing per array axis in mm, slice axis) of a 3D source, so that
        per-slice predictions can be stacked and scored over the whole volume; None for 2D."""
        return None

    @property
    def cases(self) -> list[str]:
        """The case id of every sample, in index order."""
        return [self.case_names[t.source] for t in self.targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        target = self.targets[index]
        image, label_map, spacing = self._load(target.source, target.slice)
        mask = (label_map != 0) if self.binarize else (label_map == target.label)
        if self.train:
            box = box_from_mask(mask, self.margin, self.rng, self.max_jitter)
        else:
            box = box_from_mask(mask, self.margin)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), np.float32)),
            "mask": torch.from_numpy(mask.astype(np.uint8)),
            "box": torch.tensor(box, dtype=torch.float32),
            "case": self.case_names[target.source],
            "label": target.label,
            "slice": target.slice,
            "spacing": tuple(float(s) for s in spacing),
        }

    def summary(self) -> str:
        """One line: sample and case counts, then every skipped file and why."""
        n_cases = len({t.source for t in self.targets})
        line = f"{len(self)} samples from {n_cases} cases; skipped {len(self.skipped)} files"
        if self.skipped:
            line += ": " + ", ".join(f"{name} ({why})" for name, why in self.skipped)
        return line


# --- in-memory arrays ----------------------------------------------------------------


class ArrayDataset(TargetDataset):
    """Targets from in-memory images (HxW or HxWx3) and label maps (HxW)."""

    def __init__(self, images, label_maps, cases=None, spacings=None, **options):
        super().__init__(**options)
        if len(images) != len(label_maps):
            raise ValueError(f"{len(images)} images but {len(label_maps)} label maps")
        self._images, self._label_maps, self._spacings = [], [], []
        for i, (image, label_map) in enumerate(zip(images, label_maps)):
            name = cases[i] if cases is not None else f"case_{i:04d}"
            image, label_map = np.asarray(image), np.asarray(label_map)
            if image.shape[:2] != label_map.shape:
                self.skipped.append((name, _size_reason(image.shape, label_map.shape)))
                continue
            self._images.append(io.to_model_range(io.to_rgb(image)))
            self._label_maps.append(label_map)
            self._spacings.append(tuple(spacings[i]) if spacings is not None else (1.0, 1.0))
            self._add_source(name, label_map)

    def _load(self, source, slice_index):
        return self._images[source], self._label_maps[source], self._spacings[source]


def _size_reason(image_shape, mask_shape) -> str:
    return (f"size mismatch: image {image_shape[0]}x{image_shape[1]}, "
            f"mask {mask_shape[0]}x{mask_shape[1]}")


# --- 2D image folders ------------------------------------------------------------------


class FolderDataset(TargetDataset):
    """`root/images/*` with `root/masks/*` matched by file stem.

    A label map gives one target per label present (wbc: 128 cytoplasm and
    255 nucleus); `binarize=True` gives one target, mask > 0, labelled 1.
    Pixel spacing is unknown for these formats and reported as (1.0, 1.0).
    """

    def __init__(self, root, image_dir="images", mask_dir="masks", **options):
        super().__init__(**options)
        self.root = Path(root)
        image_files = _files_by_stem(self.root / image_dir, io.IMAGE_SUFFIXES)
        mask_files = _files_by_stem(self.root / mask_dir, io.IMAGE_SUFFIXES)
        if not image_files:
            raise FileNotFoundError(f"no images in {self.root / image_dir}")
        self._files: list[tuple[Path, Path]] = []
        for stem, image_path in image_files.items():
            mask_path = mask_files.get(stem)
            if mask_path is None:
                self.skipped.append((image_path.name, "no mask"))
                continue
            try:
                image = io.read_image(image_path)
            except Exception as err:  # any decoder error means "cannot use it"
                self.skipped.append((image_path.name, f"unreadable image: {_short(err)}"))
                continue
            try:
                label_map = io.read_mask(mask_path)
            except Exception as err:
                self.skipped.append((image_path.name, f"unreadable mask: {_short(err)}"))
                continue
            if image.shape[:2] != label_map.shape:
                self.skipped.append((image_path.name, _size_reason(image.shape, label_map.shape)))
                continue
            if not label_map.any():
                self.skipped.append((image_path.name, "empty mask"))
                continue
            self._files.append((image_path, mask_path))
            self._add_source(stem, label_map)
        for stem in sorted(set(mask_files) - set(image_files)):
            self.skipped.append((mask_files[stem].name, "mask without image"))

    def _load(self, source, slice_index):
        image_path, mask_path = self._files[source]
        return io.read_image(image_path), io.read_mask(mask_path), (1.0, 1.0)


def _files_by_stem(folder: Path, suffixes) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            files.setdefault(path.stem, path)  # first by name wins on duplicates
    return files


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:80]


# --- volumes (shared by npz and NIfTI) -----------------------------------------------


def volume_to_model_range(volume, modality="auto", level=io.CT_LEVEL, width=io.CT_WIDTH):
    """A whole volume -> float32 in [0, 255], windowed once for all its slices.

    modality "ct": level/width window on HU; "mr": 0.5/99.5 percentile window;
    "auto": CT when the data are signed integers reaching below -500 (air in
    HU), else `io.to_model_range` (uint8 kept, [0, 1] floats scaled, else MR).
    """
    volume = np.asarray(volume)
    if modality == "auto":
        is_ct = volume.dtype.kind == "i" and volume.size and volume.min() < -500
        modality = "ct" if is_ct else "other"
    if modality == "ct":
        return io.window_ct(volume, level, width)
    if modality == "mr":
        return io.normalize_intensity(volume)
    if modality == "other":
        return io.to_model_range(volume)
    raise ValueError(f"modality must be 'auto', 'ct' or 'mr', got {modality!r}")


class _VolumeCache:
    """The last few preprocessed volumes: slices of one volume come in runs."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self._items: OrderedDict = OrderedDict()

    def get(self, key, load):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


def _in_plane(spacing, axis, ndim=3):
    if spacing is None:
        return (1.0, 1.0)
    rest = [float(spacing[a]) for a in range(ndim) if a != axis]
    return tuple(rest)


# --- MedSAM-style npz / npy ----------------------------------------------------------


class NpzDataset(TargetDataset):
    """MedSAM-style arrays under `root`.

    - `root/*.npz` with keys imgs/gts (MedSAM) or image/label, 2D (HxW or
      HxWx3 with an HxW label) or 3D (DxHxW, sliced along axis 0);
    - `.npy` pairs matched by stem in `root/imgs` + `root/gts` (MedSAM) or
      `root/images` + `root/masks` / `root/labels`.
    An npz `spacing` is read in MedSAM's (x, y[, z]) order.
    """

    PAIR_DIRS = (("imgs", "gts"), ("images", "masks"), ("images", "labels"))

    def __init__(self, root, cache_size=2, modality="auto", **options):
        super().__init__(**options)
        self.root = Path(root)
        self.modality = modality
        self._sources: list[tuple[Path, Path | None]] = []
        self._cache = _VolumeCache(cache_size)
        candidates = [(p, None) for p in sorted(self.root.glob("*.npz"))]
        for image_dir, label_dir in self.PAIR_DIRS:
            images = _files_by_stem(self.root / image_dir, (".npy",))
            labels = _files_by_stem(self.root / label_dir, (".npy",))
            for stem, path in images.items():
                if stem in labels:
                    candidates.append((path, labels[stem]))
                else:
                    self.skipped.append((path.name, "no mask"))
        if not candidates:
            raise FileNotFoundError(f"no .npz files or .npy pairs in {self.root}")
        for image_path, label_path in candidates:
            try:
                image, label, _ = self._read(image_path, label_path)
            except Exception as err:
                self.skipped.append((image_path.name, f"unreadable: {_short(err)}"))
                continue
            problem = _npz_problem(image, label)
            if problem:
                self.skipped.append((image_path.name, problem))
                continue
            if not np.any(label):
                self.skipped.append((image_path.name, "empty mask"))
                continue
            self._sources.append((image_path, label_path))
            self._add_source(image_path.stem, label, slice_axis=0 if label.ndim == 3 else None)

    def volume_geometry(self, source):
        _, label, spacing = self._read(*self._sources[source])
        if label.ndim != 3:
            return None
        # npz spacing is (x, y, z), the reverse of the (D, H, W) array axes.
        spacing = tuple(reversed(spacing)) if spacing is not None else (1.0, 1.0, 1.0)
        return label.shape, spacing, 0

    @staticmethod
    def _read(image_path, label_path):
        if label_path is None:
            return io.read_npz(image_path)
        image, label = io.read_npy_pair(image_path, label_path)
        return image, label, None

    def _prepared(self, source):
        def load():
            image, label, spacing = self._read(*self._sources[source])
            if label.ndim == 3:
                in_plane = None if spacing is None else tuple(reversed(spacing))[1:3]
                return volume_to_model_range(image, self.modality), label, in_plane
            in_plane = None if spacing is None else tuple(reversed(spacing))[-2:]
            return io.to_model_range(io.to_rgb(image)), label, in_plane
        return self._cache.get(source, load)

    def _load(self, source, slice_index):
        image, label, in_plane = self._prepared(source)
        if slice_index >= 0:
            image, label = io.to_rgb(image[slice_index]), label[slice_index]
        return image, label, in_plane or (1.0, 1.0)


def _npz_problem(image, label):
    if label.ndim == 2 and image.ndim in (2, 3) and image.shape[:2] == label.shape:
        return None
    if label.ndim == 3 and image.shape == label.shape:
        return None
    return f"size mismatch: image {'x'.join(map(str, image.shape))}, " \
           f"label {'x'.join(map(str, label.shape))}"


# --- NIfTI volumes -----------------------------------------------------------------------


def _as_paths(spec) -> list[Path]:
    """Volumes named by `spec`: a file, a DICOM series folder, a folder of NIfTI files and/or
    DICOM series sub-folders, or a list of any of these."""
    if isinstance(spec, (str, Path)):
        spec = Path(spec)
        if spec.is_dir() and not io.is_dicom_series(spec):
            return sorted(p for p in spec.iterdir() if io.is_nifti(p) or io.is_dicom_series(p))
        return [spec]
    return [Path(p) for p in spec]


def _is_folder_of_volumes(spec) -> bool:
    return isinstance(spec, (str, Path)) and Path(spec).is_dir() and not io.is_dicom_series(spec)


def nifti_case_id(path) -> str:
    """File name without .nii[.gz] and without an nnU-Net channel tag (_0000); for a DICOM
    series, its folder's name."""
    name = Path(path).name
    name = re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)
    return re.sub(r"_\d{4}$", "", name)


class NiftiDataset(TargetDataset):
    """2D slices of NIfTI volumes along `axis`, one target per label per slice.

    `images` and `labels` are each a file, a list of files (paired in order)
    or a folder (paired by case id, see `nifti_case_id`). An image may also
    be a folder holding one DICOM series (read by `io.read_volume`, same axis
    order as NIfTI); a folder of such folders pairs by folder name. Labels are
    NIfTI; for a DICOM image a label whose affine differs from the series' by
    axis flips/permutations only (a dcm2niix conversion, say) is brought into
    the series' array order, any other difference skips the case. Slices
    without any label are skipped. Slices keep the array's axis order (no
    reorientation) so predictions can be written back with
    `io.write_nifti(..., like=image)` (or `affine=` for a DICOM series).
    Intensities: see `volume_to_model_range` (CT window for int16 HU data).
    """

    def __init__(self, images, labels, axis=2, modality="auto", level=io.CT_LEVEL,
                 width=io.CT_WIDTH, cache_size=2, **options):
        super().__init__(**options)
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        self.axis = axis
        self._window = (modality, level, width)
        self._cache = _VolumeCache(cache_size)
        self._volumes: list[tuple[Path, Path, tuple]] = []
        for image_path, label_path in self._pairs(images, labels):
            name = image_path.name
            if label_path is None:
                self.skipped.append((name, "no mask"))
                continue
            try:
                image, image_affine, spacing = io.read_volume(image_path)
                label, label_affine, _ = io.read_nifti(label_path)
            except ImportError:
                raise
            except Exception as err:
                self.skipped.append((name, f"unreadable: {_short(err)}"))
                continue
            if image_path.is_dir() and image.ndim == 3:
                label, problem = align_to(label, label_affine, image_affine, image.shape)
                if problem:
                    self.skipped.append((name, problem))
                    continue
            if image.ndim != 3 or image.shape != label.shape:
                self.skipped.append((name, f"size mismatch: image {image.shape}, label {label.shape}"))
                continue
            if not np.any(label):
                self.skipped.append((name, "empty mask"))
                continue
            self._volumes.append((image_path, label_path, _in_plane(spacing, axis)))
            self._add_source(nifti_case_id(image_path), np.asarray(label), slice_axis=axis)

    def volume_geometry(self, source):
        image_path, _, _ = self._volumes[source]
        image, _, spacing = io.read_volume(image_path)  # the spacing the slices report
        return image.shape, spacing, self.axis

    def _pairs(self, images, labels):
        image_paths, label_paths = _as_paths(images), _as_paths(labels)
        folders = all(_is_folder_of_volumes(s) for s in (images, labels))
        if not folders:
            if len(image_paths) != len(label_paths):
                raise ValueError(f"{len(image_paths)} images but {len(label_paths)} labels")
            return list(zip(image_paths, label_paths))
        by_case = {nifti_case_id(p): p for p in label_paths}
        return [(p, by_case.get(nifti_case_id(p))) for p in image_paths]

    def _load(self, source, slice_index):
        image_path, label_path, spacing = self._volumes[source]

        def load():
            image, image_affine, _ = io.read_volume(image_path)
            label, label_affine, _ = io.read_nifti(label_path)
            if image_path.is_dir():
                label, _ = align_to(label, label_affine, image_affine, image.shape)
            return volume_to_model_range(image, *self._window), np.asarray(label)

        image, label = self._cache.get(source, load)
        plane = np.take(image, slice_index, axis=self.axis)
        return io.to_rgb(plane), np.take(label, slice_index, axis=self.axis), spacing


def align_to(label, label_affine, image_affine, image_shape, tol=1e-2):
    """`label` in the voxel order of an image with `image_affine` and `image_shape`.

    -> (array, None), or (label unchanged, reason) when the two grids differ by more than axis
    flips and permutations (`tol` in voxels). Same affine: the label as it is.
    """
    label = np.asarray(label)
    if label.ndim != 3 or len(image_shape) != 3:
        return label, None  # the size check reports it
    # Image voxel index -> label voxel index.
    to_label = np.linalg.inv(np.asarray(label_affine, np.float64)) @ np.asarray(image_affine, np.float64)
    if np.allclose(to_label, np.eye(4), atol=tol):
        return label, None
    rot, shift = to_label[:3, :3], to_label[:3, 3]
    signs = np.rint(rot)
    perm = [int(np.flatnonzero(signs[:, a])[0]) if np.count_nonzero(signs[:, a]) == 1 else -1 for a in range(3)]
    why = "label affine does not match the DICOM series' (not the same voxel grid up to axis flips)"
    if not np.allclose(rot, signs, atol=tol) or sorted(perm) != [0, 1, 2]:
        return label, why
    for a in range(3):
        b, s = perm[a], signs[perm[a], a]
        if label.shape[b] != image_shape[a]:
            return label, why
        expected = 0.0 if s > 0 else image_shape[a] - 1.0  # where image index 0 lands
        if abs(shift[b] - expected) > tol:
            return label, why
    out = np.transpose(label, perm)
    flips = [a for a in range(3) if signs[perm[a], a] < 0]
    return np.ascontiguousarray(np.flip(out, flips) if flips else out), None


# --- splitting -----------------------------------------------------------------------------


def split_by_case(dataset, val_fraction: float, seed: int = 0):
    """(train indices, val indices) with every case wholly on one side.

    Cases are shuffled with `seed`; the validation side gets round(fraction x
    cases), at least one case when the fraction is above 0 and there are two
    or more cases, and never all of them unless the fraction is 1.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    cases = dataset.cases if hasattr(dataset, "cases") else [s["case"] for s in dataset]
    unique = sorted(set(cases))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_val = int(round(val_fraction * len(unique)))
    if 0 < val_fraction < 1 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    val_cases = {unique[i] for i in order[:n_val]}
    train = [i for i, c in enumerate(cases) if c not in val_cases]
    val = [i for i, c in enumerate(cases) if c in val_cases]
    return train, val


# --- synthetic data --------------------------------------------------------------------------


def synthetic_case(rng: np.random.Generator, size: int = 128):
    """One medical-looking grey image (uint8 HxW) and its label map (1..k).

    A smooth textured background, then 1-3 ellipses, each with its own mean
    intensity and texture, blurred edges and speckle noise on top, so the
    objects are visible but not trivially thresholded.
    """
    shape = (size, size)
    background = ndimage.gaussian_filter(rng.standard_normal(shape), size / 16)
    image = 100 + 25 * background / (np.abs(background).max() + 1e-8)
    label_map = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    n_objects = int(rng.integers(1, 4))
    for label in range(1, n_objects + 1):
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        ry, rx = rng.uniform(0.08, 0.2, 2) * size
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        inside = u ** 2 + v ** 2 <= 1.0
        texture = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(1, 3))
        level = rng.choice([-1, 1]) * rng.uniform(35, 70)
        image = np.where(inside, image + level + 40 * texture, image)
        label_map[inside] = label
    image = ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 6, shape)
    return np.clip(image, 0, 255).astype(np.uint8), label_map


def synthetic_dataset(n: int, size: int = 128, seed: int = 0, **options) -> ArrayDataset:
    """`n` synthetic cases (see `synthetic_case`), one target per visible object.

    Objects drawn later can cover earlier ones; a fully covered one gives no
    target. Needs no files: for demos and tests on a bare machine.
    """
    rng = np.random.default_rng(seed)
    cases = [synthetic_case(rng, size) for _ in range(n)]
    options.setdefault("rng", seed)
    return ArrayDataset([c[0] for c in cases], [c[1] for c in cases],
                        cases=[f"synth_{i:03d}" for i in range(n)], **options)
