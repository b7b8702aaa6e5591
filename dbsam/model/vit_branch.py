"""The ViT branch: SAM's ImageEncoderViT, run stage by stage instead of through its forward.

SAM's forward is patch_embed -> + pos_embed -> blocks -> neck. DB-SAM splits the blocks into stages
(ViT-B: [0-2], [3-5], [6-8], [9-11]) and puts a channel-attention adapter and the bilateral
cross-attention between them, and a new LayerNorm + the fusion before the neck. Tokens stay
channels-last [B, H, W, C] throughout, which is what SAM's blocks and `ChannelAttention` take.
"""
from functools import partial
from typing import List, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.common import LayerNorm2d
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DBSAMConfig


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


def layer_norm_2d_fp32(norm: LayerNorm2d, x: torch.Tensor) -> torch.Tensor:
    """SAM's LayerNorm2d (over channels of (B, C, H, W)), computed in float32 whatever autocast does."""
    y = F.layer_norm(x.permute(0, 2, 3, 1).float(), (x.shape[1],), norm.weight.float(), norm.bias.float(), norm.eps)
    return y.permute(0, 3, 1, 2).to(x.dtype)


def run_neck(neck: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """SAM's neck (1x1 conv, LN2d, 3x3 conv, LN2d) on channels-last tokens -> (B, out, H, W), with
    its norms in float32 (under bf16 autocast SAM's hand-written LayerNorm2d would run in bf16)."""
    x = x.permute(0, 3, 1, 2)
    for layer in neck:
        x = layer_norm_2d_fp32(layer, x) if isinstance(layer, LayerNorm2d) else layer(x)
    return x


def frozen_parts(encoder: ImageEncoderViT) -> Sequence[nn.Module]:
    return (encoder.patch_embed, encoder.blocks)
