"""DBSAMPredictor: SamPredictor's workflow for DB-SAM and medical images.

    predictor = DBSAMPredictor(model)
    predictor.set_image(image)            # once: H x W (grey) or H x W x 3, uint8 / uint16 / int16 / float
    masks, scores, low_res = predictor.predict(boxes)   # boxes (N, 4) XYXY in original pixels

Images: uint8 is taken as is; any other dtype (16-bit CT/MR, float) is min-max rescaled to [0, 255]
(MedSAM's convention). Grey is repeated to RGB. The longest side is resized to img_size (bilinear,
antialiased), the image normalised with SAM's pixel mean/std and zero-padded bottom/right, as SAM does.
"""
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .dbsam import DBSAM

ArrayLike = Union[np.ndarray, torch.Tensor]


class Prediction(NamedTuple):
    masks: torch.Tensor           # (N, H, W) bool at the original size
    scores: torch.Tensor          # (N,) predicted IoU
    low_res_logits: torch.Tensor  # (N, S/4, S/4) logits in the padded S x S frame


def resized_shape(h: int, w: int, long_side: int) -> Tuple[int, int]:
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def to_rgb_0_255(image: ArrayLike) -> torch.Tensor:
    """H x W, H x W x 1 or H x W x 3 of any numeric dtype -> float32 (3, H, W) in [0, 255]."""
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if t.dim() == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.dim() == 2:
        t = t[..., None].expand(-1, -1, 3)
    if t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"image must be H x W (grey) or H x W x 3 (RGB), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"image dtype {t.dtype} is not an intensity image")
    if t.dtype == torch.uint8:
        x = t.float()
    else:
        x = t.float()
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo).clamp_min(1e-8) * 255.0
    return x.permute(2, 0, 1).contiguous()


class DBSAMPredictor:
    def __init__(self, model: DBSAM, max_boxes_per_call: int = 64):
        self.model = model
        self.max_boxes_per_call = max_boxes_per_call
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    def reset_image(self) -> None:
        self.features: Optional[torch.Tensor] = None
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None

    @torch.no_grad()
    def set_image(self, image: ArrayLike) -> None:
        """Encode one image (any size; grey or RGB; uint8, 16-bit or float) once for many predicts."""
        x = to_rgb_0_255(image).to(self.device)
        h, w = x.shape[-2:]
        S = self.model.config.img_size
        nh, nw = resized_shape(h, w, S)
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(0, 255)
        was_training = self.model.training
        self.model.eval()
        try:
            self.features = self.model.encode(self.model.preprocess(x))
        finally:
            self.model.train(was_training)
        self.original_size, self.input_size = (int(h), int(w)), (nh, nw)

    def transform_boxes(self, boxes: ArrayLike) -> torch.Tensor:
        """(N, 4) XYXY in original pixels -> the resized frame."""
        b = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, torch.Tensor) else boxes,
                            dtype=torch.float32, device=self.device).reshape(-1, 4)
        (h, w), (nh, nw) = self.original_size, self.input_size
        return b * torch.tensor([nw / w, nh / h, nw / w, nh / h], device=self.device)

    @torch.no_grad()
    def predict(self, boxes: ArrayLike) -> Prediction:
        """Masks for N boxes (N, 4) XYXY in original pixel coordinates, at the original size."""
        if self.features is None:
            raise RuntimeError("call set_image(image) before predict(boxes)")
        b = self.transform_boxes(boxes)
        was_training = self.model.training
        self.model.eval()
        masks, scores, lows = [], [], []
        try:
            for chunk in torch.split(b, self.max_boxes_per_call):
                low, iou = self.model.decode(self.features, chunk[None])   # (1, n, s, s), (1, n)
                masks.append(self.postprocess(low[0]))
                scores.append(iou[0])
                lows.append(low[0])
        finally:
            self.model.train(was_training)
        if not masks:
            H, W = self.original_size
            s = self.model.config.img_size // 4
            return Prediction(torch.zeros(0, H, W, dtype=torch.bool, device=self.device),
                              torch.zeros(0, device=self.device), torch.zeros(0, s, s, device=self.device))
        return Prediction(torch.cat(masks), torch.cat(scores), torch.cat(lows))

    def postprocess(self, low_res: torch.Tensor) -> torch.Tensor:
        """(n, s, s) logits in the padded frame -> (n, H, W) bool at the original size (as SAM)."""
        S = self.model.config.img_size
        x = F.interpolate(low_res[:, None].float(), (S, S), mode="bilinear", align_corners=False)
        x = x[..., : self.input_size[0], : self.input_size[1]]
        x = F.interpolate(x, self.original_size, mode="bilinear", align_corners=False)
        return x[:, 0] > self.model.mask_threshold
