"""SAM's ViT attention through one fused attention kernel, with SAM's relative positions kept exact.

SAM's `Attention` builds the full score matrix, adds decomposed relative positions and then
softmaxes it:

    s[q, k] = scale <q, k> + <q, Rh[qh, kh]> + <q, Rw[qw, kw]>          (q at (qh, qw), k at (kh, kw))

At 1024 px a global block holds B * heads * 4096^2 scores, several copies of them (the product,
the sum with the rel-pos terms, the fp32 softmax), one of them kept for backward: the largest part
of a DB-SAM training step's activations (ViT-B, fp32, batch 1: 3.3 of the 6.1 GiB saved for backward,
benchmarks/saved_activations.py; more under bf16 autocast, where the softmax is kept in fp32 and
again in bf16). A fused kernel (`F.scaled_dot_product_attention`: flash or
memory-efficient on a GPU) never stores the matrix, but takes only q, k, v. Both rel-pos terms are
dot products of a query-side vector with a one-hot key-side vector,
<q, Rh[qh, kh]> = <rel_h(q), onehot(kh)> with rel_h(q) = Rh[qh] q, so

    q' = [scale q | rel_h(q) | rel_w(q)],    k' = [k | onehot(kh) | onehot(kw)]

gives <q', k'> = s[q, k] exactly, and SDPA(q', k', v, scale=1) is SAM's attention. The q/k head
width grows from hd to hd + H + W (64 -> 192 at ViT-B's 64 x 64 global blocks, 64 -> 92 -> 96 in the
14 x 14 windows), so q k^T costs 3x its FLOPs in a global block (2x for the whole attention, v
keeping its width on CUDA): FLOPs an H100 has, spent to remove the (H W)^2 traffic and memory that
bound SAM's version. On a CPU v is zero-padded to q's width (its flash kernel takes one head width
for q, k and v) and the padding sliced off.

The class adds no parameter, so SAM's names and weights stay: `set_vit_attention` switches a model's
blocks between the two implementations in place, at run time, as the op backends switch.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

# Head widths are padded to a multiple of this: what flash / memory-efficient kernels require of
# 16-bit inputs (8 elements = 16 bytes) and more than fp32 needs.
HEAD_ALIGN = 8


def fold_rel_pos(q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size, scale: float):
    """q, k (B, heads, H*W, hd) -> q', k' (B, heads, H*W, hd') with <q', k'> = SAM's scores with
    decomposed relative positions (and the softmax scale) included; hd' = hd + H + W rounded up to
    HEAD_ALIGN, the padding zeros."""
    H, W = size
    B, heads, N, hd = q.shape
    Rh = get_rel_pos(H, H, rel_pos_h).to(q.dtype)              # (H, H, hd): [qh, kh, c]
    Rw = get_rel_pos(W, W, rel_pos_w).to(q.dtype)              # (W, W, hd): [qw, kw, c]
    r_q = q.reshape(B, heads, H, W, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh).reshape(B, heads, N, H)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw).reshape(B, heads, N, W)
    # Key token n = kh * W + kw: its one-hot rows.
    onehot_h = torch.eye(H, dtype=k.dtype, device=k.device).repeat_interleave(W, dim=0)   # (N, H)
    onehot_w = torch.eye(W, dtype=k.dtype, device=k.device).repeat(H, 1)                  # (N, W)
    pad = -(hd + H + W) % HEAD_ALIGN
    q2 = F.pad(torch.cat([q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], dim=-1), (0, pad))
    keys = torch.cat([onehot_h, onehot_w], dim=-1).expand(B, heads, N, H + W)
    k2 = F.pad(torch.cat([k, keys], dim=-1), (0, pad))
    return q2, k2


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                      rel_pos_w: torch.Tensor, size, scale: float, pad_value: Optional[bool] = None) -> torch.Tensor:
    """SAM's attention with decomposed relative positions on q, k, v (B, heads, H*W, hd) -> (B, heads,
    H*W, hd), through F.scaled_dot_product_attention. pad_value: widen v to q's width with zeros
    (None: on CPUs only, whose flash kernel takes one width for q, k and v; CUDA's memory-efficient
    kernel takes a narrower v, which saves 2/3 of the second matmul at ViT-B)."""
    hd = v.shape[-1]
    q, k = fold_rel_pos(q, k, rel_pos_h, rel_pos_w, size, scale)
    if pad_value if pad_value is not None else not v.is_cuda:
        v = F.pad(v, (0, q.shape[-1] - hd))
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :hd]


class SDPARelPosAttention(Attention):
    """segment_anything's `Attention` (same parameters, same result) with the scores never stored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos:
            out = rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (H, W), self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, -1))   # (B, heads, N, hd) -> (B, H, W, C)


ATTENTION_CLASSES = {"sam": Attention, "sdpa": SDPARelPosAttention}


def set_vit_attention(module: nn.Module, impl: str) -> nn.Module:
    """Switch every SAM attention inside `module` to `impl` ("sdpa" or "sam"), in place: the class
    changes, the parameters (and so the state-dict keys) stay."""
    if impl not in ATTENTION_CLASSES:
        raise ValueError(f"vit_attention must be one of {sorted(ATTENTION_CLASSES)}, got {impl!r}")
    for m in module.modules():
        if isinstance(m, Attention):
            m.__class__ = ATTENTION_CLASSES[impl]
    return module
