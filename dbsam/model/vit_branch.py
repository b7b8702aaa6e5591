"""The ViT branch: SAM's ImageEncoderViT, run stage by stage instead of through its forward.

SAM's forward is patch_embed -> + pos_embed -> blocks -> neck. DB-SAM splits the blocks into stages
(ViT-B: [0-2], [3-5], [6-8], [9-11]) and puts a channel-attention adapter and the bilateral
cross-attention between them, and a new LayerNorm + the fusion before the neck. Tokens stay
channels-last [B, H, W, C] throughout, which is what SAM's blocks and `ChannelAttention` take.
"""
from functools import partial
from typing import List

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.common import LayerNorm2d
from torch import nn
from torch.utils.checkpoint import checkpoint

from dbsam.ops._backends import autocast_dtype

from .config import DBSAMConfig
from .layers import kept


def build_image_encoder(cfg: DBSAMConfig) -> ImageEncoderViT:
    """SAM's image encoder exactly as segment_anything's build_sam builds it."""
    return ImageEncoderViT(
        depth=cfg.depth,
        embed_dim=cfg.embed_dim,
        img_size=cfg.img_size,
        mlp_ratio=cfg.mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(cfg.global_attn_indexes),
        window_size=cfg.window_size,
        out_chans=cfg.prompt_embed_dim,
    )


def stage_ranges(depth: int, num_stages: int) -> List[range]:
    """Block indices of each stage: depth/num_stages consecutive blocks."""
    per = depth // num_stages
    return [range(s * per, (s + 1) * per) for s in range(num_stages)]


def embed(encoder: ImageEncoderViT, x: torch.Tensor) -> torch.Tensor:
    """F_d = patch_embed(x) + pos_embed: (B, 3, S, S) -> (B, S/16, S/16, C)."""
    f = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        f = f + encoder.pos_embed
    return f


def run_block(block: nn.Module, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """One frozen ViT block; recomputed in backward under gradient checkpointing. A block whose
    input needs no gradient (stage 0: only frozen weights before it) stores nothing anyway."""
    if grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class LayerNorm2dFP32(LayerNorm2d):
    """SAM's LayerNorm2d (over the channels of (B, C, H, W)) computed in float32 whatever autocast
    does: SAM's hand-written version would run in bf16 under autocast. Same parameters and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1).float(), (x.shape[1],), self.weight.float(), self.bias.float(),
                         self.eps)
        return y.permute(0, 3, 1, 2).to(x.dtype)


def norms_in_fp32(module: nn.Module) -> nn.Module:
    """Turn every LayerNorm2d inside `module` (SAM's neck, mask decoder, prompt encoder) into
    LayerNorm2dFP32, in place, keeping its parameters (and so the state-dict keys)."""
    for m in module.modules():
        if type(m) is LayerNorm2d:
            m.__class__ = LayerNorm2dFP32
    return module


class FrozenLinear(nn.Linear):
    """nn.Linear that keeps its autocast-dtype weight and bias between calls while they are frozen.

    Why: autocast casts a weight at every use unless it requires grad (its own cache holds only
    those, and only within one autocast region), so each step cast the frozen ViT's 48 Linear
    weights and biases again: 96 ops and ~170 MB (ViT-B, bf16) written a step, and the bf16 weight
    kept for backward as activation memory. Here the copy is made once and autograd keeps the same
    one. Kept only while nothing can notice: no gradient wanted for the weights, and layers.kept's
    rules (new copies after an optimiser step, load_state_dict or .to(); none while torch.compile
    traces, which hoists the casts itself).
    Same parameters and names as nn.Linear; outside autocast it is nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        dtype = autocast_dtype(x.device.type)
        autocast_casts = w.dtype != dtype and w.dtype in (torch.float32, torch.float16, torch.bfloat16)
        if dtype is None or not autocast_casts or w.requires_grad or (b is not None and b.requires_grad):
            return F.linear(x, w, b)
        frozen = (w,) if b is None else (w, b)
        copies = kept(self, "_autocast_copies", frozen, (dtype,), lambda: tuple(t.to(dtype) for t in frozen))
        return F.linear(x, w, b) if copies is None else F.linear(x, *copies)


def frozen_linears(module: nn.Module) -> nn.Module:
    """Turn every nn.Linear inside `module` (the frozen ViT blocks) into FrozenLinear, in place."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = FrozenLinear
    return module


def run_neck(neck: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """SAM's neck (1x1 conv, LN2d, 3x3 conv, LN2d) on channels-last tokens -> (B, out, H, W)."""
    return neck(x.permute(0, 3, 1, 2))
