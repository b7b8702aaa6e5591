"""What is trained: `dbsam` (the paper's model) or `medsam` (the decoder-only baseline).

`medsam` is the paper's "decoder-only baseline" (its MedSAM row, 81.02 3D DSC): SAM's own image
encoder path (patch embed, ViT blocks, neck) and prompt encoder, all frozen, and only the mask
decoder trained. It is built from the same DB-SAM object (so the frozen weights are the very same
tensors) but its forward skips every DB-SAM addition; nothing of the adapters is used or trained.
"""
from typing import Optional

import torch
from torch import nn

from dbsam.model import DBSAM, dbsam_model_registry

METHODS = ("dbsam", "medsam")


class DecoderOnlySAM(nn.Module):
    """SAM encoder (frozen, run without autograd) + trainable SAM mask decoder. Offers what
    DBSAMPredictor uses (config, pixel_mean, preprocess, encode, decode, mask_threshold)."""

    mask_threshold = DBSAM.mask_threshold

    def __init__(self, dbsam: DBSAM):
        super().__init__()
        self.dbsam = dbsam
        for name, p in dbsam.named_parameters():
            p.requires_grad_(name.startswith("mask_decoder."))

    @property
    def config(self):
        return self.dbsam.config

    @property
    def pixel_mean(self):
        return self.dbsam.pixel_mean

    def preprocess(self, images):
        return self.dbsam.preprocess(images)

    def encode(self, x):
        with torch.no_grad():  # frozen encoder: nothing below it needs gradients
            return self.dbsam.image_encoder(x)  # SAM's own forward: no adapters, no conv branch

    def decode(self, embeddings, boxes):
        return self.dbsam.decode(embeddings, boxes)

    def forward(self, images, boxes):
        return self.decode(self.encode(images), boxes)


def build_model(method: str, variant: str, sam_checkpoint: Optional[str] = None, init_seed: int = 0,
                grad_checkpointing: bool = False, **options) -> nn.Module:
    """The network for `method`. Random parts are drawn from `init_seed`, so a run without SAM
    weights can be rebuilt exactly later (checkpoints store the seed; see checkpoint.load_trained)."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(init_seed)
    model = dbsam_model_registry[variant](checkpoint=sam_checkpoint, grad_checkpointing=grad_checkpointing,
                                          **options)
    return wrap(method, model)


def wrap(method: str, model: DBSAM) -> nn.Module:
    return DecoderOnlySAM(model) if method == "medsam" else model


def core(model: nn.Module) -> DBSAM:
    """The DBSAM inside a method's model (or a DDP wrapper of it)."""
    model = getattr(model, "module", model)
    return model.dbsam if isinstance(model, DecoderOnlySAM) else model
