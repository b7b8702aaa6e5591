"""From dbsam.data datasets to model-ready batches, in an order that can be resumed anywhere.

- `open_dataset` picks the dataset class for a folder (images/+masks/, npz/npy, NIfTI).
- `PromptedSamples` turns a sample into what the model trains on: the image resized (longest side
  to the model size), normalised and padded exactly as DBSAMPredictor does at inference, the box in
  that frame (with the random 0..20 px outward jitter when training) and the mask at the low-res
  logit size.
- `ResumableDistributedSampler` is a DistributedSampler whose order is a function of (seed, epoch)
  and which can start at any global sample position, for any world size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from dbsam.data import FolderDataset, NiftiDataset, NpzDataset, box_from_mask
from dbsam.data.boxes import MAX_JITTER
from dbsam.data.io import IMAGE_SUFFIXES, is_dicom_series, is_nifti
from dbsam.model.predictor import resized_shape

NIFTI_DIRS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"), ("images", "labels"), ("images", "masks"))


def open_dataset(data=None, images=None, labels=None, axis: int = 2, binarize: bool = False,
                 label_ids=None, modality: str = "auto"):
    """A dbsam.data dataset for `data` (a folder) or for NIfTI `images` + `labels`.

    Auto-detection, in order: NIfTI images/labels given; DIR/images (or imgs) holding 2D image
    files with DIR/masks -> FolderDataset; *.npz or .npy pairs -> NpzDataset; a NIfTI pair of
    folders (imagesTr/labelsTr, images/labels) -> NiftiDataset. Boxes are left tight here
    (margin 0, no jitter): PromptedSamples adds the training jitter or the evaluation margin.
    """
    options = dict(binarize=binarize, label_ids=label_ids)
    if images is not None or labels is not None:
        if images is None or labels is None:
            raise ValueError("NIfTI input needs both --images and --labels")
        return NiftiDataset(images, labels, axis=axis, modality=modality, **options)
    if data is None:
        raise ValueError("give --data DIR (or --images and --labels for NIfTI volumes)")
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if _has(root / "images", IMAGE_SUFFIXES) and (root / "masks").is_dir():
        return FolderDataset(root, **options)
    if any(root.glob("*.npz")) or any(_has(root / d, (".npy",)) for d in ("imgs", "images")):
        return NpzDataset(root, modality=modality, **options)
    for image_dir, label_dir in NIFTI_DIRS:
        if _has(root / image_dir, (), nifti=True) and (root / label_dir).is_dir():
            return NiftiDataset(root / image_dir, root / label_dir, axis=axis, modality=modality, **options)
    raise FileNotFoundError(
        f"{root}: no known layout: expected images/ + masks/ (2D files), *.npz or imgs/ + gts/ (.npy), "
        "or imagesTr/ + labelsTr/ (NIfTI); for single NIfTI files use --images and --labels")


def _has(folder: Path, suffixes, nifti: bool = False) -> bool:
    if not folder.is_dir():
        return False
    if nifti:  # NIfTI files or DICOM series sub-folders
        return any((p.is_file() and is_nifti(p)) or is_dicom_series(p) for p in folder.iterdir())
    return any(p.is_file() and p.suffix.lower() in suffixes for p in folder.iterdir())


def as_uint8(image) -> np.ndarray:
    """Dataset images are float [0, 255]; the predictor takes uint8 as is (it min-max stretches
    anything else), so training and inference both go through uint8 to see identical pixels."""
    return np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)


def prepare_image(image_u8: np.ndarray, img_size: int, pixel_mean, pixel_std):
    """HxWx3 uint8 -> ((3, S, S) normalised and zero-padded, (h, w) resized size): the
    predictor's resize (bilinear, antialiased, longest side S) then the model's preprocess."""
    h, w = image_u8.shape[:2]
    nh, nw = resized_shape(h, w, img_size)
    x = torch.from_numpy(np.ascontiguousarray(image_u8)).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True).clamp(0, 255)
    mean = torch.tensor(pixel_mean).view(3, 1, 1)
    std = torch.tensor(pixel_std).view(3, 1, 1)
    x = (x[0] - mean) / std
    return F.pad(x, (0, img_size - nw, 0, img_size - nh)), (nh, nw)


def prepare_mask(mask: np.ndarray, img_size: int, resized) -> torch.Tensor:
    """HxW 0/1 -> (1, S/4, S/4) 0/1 float: resized like the image, padded, then area-pooled to
    the low-res logit size and thresholded at half coverage."""
    nh, nw = resized
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=(nh, nw), mode="nearest-exact")
    m = F.pad(m, (0, img_size - nw, 0, img_size - nh))
    low = F.interpolate(m, size=(img_size // 4, img_size // 4), mode="area")
    return (low[0] >= 0.5).float()


class PromptedSamples(Dataset):
    """Model-ready samples of a dbsam.data dataset (built with train=False, margin=0).

    Index with `i` (evaluation: box grown by the fixed `margin`) or with `(epoch, i)` as
    ResumableDistributedSampler yields (training: each side moved outward by a random
    0..max_jitter px). The jitter generator is seeded by (seed, epoch, i), so a sample's box does
    not depend on worker, rank or resume point.
    """

    def __init__(self, base, img_size: int, pixel_mean, pixel_std, seed: int = 0,
                 margin: int = 0, max_jitter: int = MAX_JITTER):
        self.base, self.img_size = base, img_size
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.seed, self.margin, self.max_jitter = seed, margin, max_jitter

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        sample = self.base[index]
        mask = sample["mask"].numpy()
        if epoch is None:
            box = box_from_mask(mask, self.margin)
        else:
            rng = np.random.default_rng([self.seed, epoch, index])
            box = box_from_mask(mask, 0, rng, self.max_jitter)
        image_u8 = as_uint8(sample["image"].numpy().transpose(1, 2, 0))
        image, resized = prepare_image(image_u8, self.img_size, self.pixel_mean, self.pixel_std)
        h, w = mask.shape
        scale = torch.tensor([resized[1] / w, resized[0] / h] * 2)
        return {"image": image, "box": torch.tensor(box, dtype=torch.float32) * scale,
                "target": prepare_mask(mask, self.img_size, resized), "index": index}


class ResumableDistributedSampler(DistributedSampler):
    """The global order of an epoch is a permutation of `indices` seeded by (seed, epoch); a step
    takes the next `global_batch` positions, of which rank r gets every world-th (r, r+W, ...),
    as DistributedSampler deals them. An incomplete last global batch is dropped, so every
    step is a full global batch whatever the world size. `set_epoch(epoch, start)` starts at
    global sample position `start`, which is all a resume needs.
    Yields (epoch, dataset index) for PromptedSamples.
    """

    def __init__(self, indices, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(list(indices), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.indices = list(indices)
        self.batch_size = batch_size
        self.global_batch = batch_size * num_replicas
        self.steps_per_epoch = len(self.indices) // self.global_batch
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def order(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed + epoch)
        return [self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()]

    def _positions(self):
        # Whole global batches from `start` on (start need not be a multiple of the global batch
        # when a run resumes with another world size).
        end = self.start + (len(self.indices) - self.start) // self.global_batch * self.global_batch
        return range(self.start + self.rank, end, self.num_replicas)

    def __iter__(self):
        order = self.order(self.epoch)
        return iter([(self.epoch, order[p]) for p in self._positions()])

    def __len__(self):
        return len(self._positions())
