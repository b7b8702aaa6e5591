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
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

from .layers import kept

# Head widths are padded to a multiple of this: what flash / memory-efficient kernels require of
# 16-bit inputs (8 elements = 16 bytes) and more than fp32 needs.
HEAD_ALIGN = 8


class RelPosTables(NamedTuple):
    """What fold_rel_pos needs besides q and k, none of it depending on the tokens: SAM's gathered
    rel-pos tables as matmul right-hand sides, Rh_t (H, hd, H) = [qh, c, kh] and Rw_t (W, hd, W), in
    q's dtype; the key side's constant columns (N, H + W + pad) (the one-hot rows of each key's kh and
    kw, then the zero padding); the query side's zero padding (1, 1, 1, 1, pad), or None without padding."""
    Rh_t: torch.Tensor
    Rw_t: torch.Tensor
    key_tail: torch.Tensor
    q_pad: Optional[torch.Tensor]


def rel_pos_tables(rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size, hd: int, dtype: torch.dtype,
                   device: torch.device) -> RelPosTables:
    H, W = size
    Rh_t = get_rel_pos(H, H, rel_pos_h).to(dtype).transpose(1, 2).contiguous()   # (H, hd, H)
    Rw_t = get_rel_pos(W, W, rel_pos_w).to(dtype).transpose(1, 2).contiguous()   # (W, hd, W)
    pad = -(hd + H + W) % HEAD_ALIGN
    # Key token n = kh * W + kw: its one-hot rows, then the padding.
    onehot_h = torch.eye(H, dtype=dtype, device=device).repeat_interleave(W, dim=0)   # (N, H)
    onehot_w = torch.eye(W, dtype=dtype, device=device).repeat(H, 1)                  # (N, W)
    key_tail = F.pad(torch.cat([onehot_h, onehot_w], dim=-1), (0, pad))
    q_pad = torch.zeros(1, 1, 1, 1, pad, dtype=dtype, device=device) if pad else None
    return RelPosTables(Rh_t, Rw_t, key_tail, q_pad)


def fold_rel_pos(q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size, scale: float, tables: Optional[RelPosTables] = None):
    """q, k (B, heads, H*W, hd) -> q', k' (B, heads, H*W, hd') with <q', k'> = SAM's scores with
    decomposed relative positions (and the softmax scale) included; hd' = hd + H + W rounded up to
    HEAD_ALIGN, the padding zeros. `tables`: rel_pos_tables(rel_pos_h, rel_pos_w, size, hd, q's dtype,
    q's device), made here when not given."""
    H, W = size
    B, heads, N, hd = q.shape
    if tables is None:
        tables = rel_pos_tables(rel_pos_h, rel_pos_w, size, hd, q.dtype, q.device)
    # rel_h[.., qh, qw, kh] = <q, Rh[qh, kh]>: one bmm batched over qh, q's other dims in its rows;
    # rel_w the same over qw. Written out rather than as einsum, which also copied its result into
    # place (18 ops a term, here 6): the cat below reads the permuted results as they are. Not a
    # broadcasting matmul either: that would expand the table to q's size and keep it for backward.
    r_q = q.reshape(B, heads, H, W, hd)
    rel_h = torch.bmm(r_q.permute(2, 0, 1, 3, 4).reshape(H, -1, hd), tables.Rh_t)   # (H, B*heads*W, H)
    rel_h = rel_h.view(H, B, heads, W, H).permute(1, 2, 0, 3, 4)                     # (B, heads, H, W, H)
    rel_w = torch.bmm(r_q.permute(3, 0, 1, 2, 4).reshape(W, -1, hd), tables.Rw_t)   # (W, B*heads*H, W)
    rel_w = rel_w.view(W, B, heads, H, W).permute(1, 2, 3, 0, 4)                     # (B, heads, H, W, W)
    # One cat a side, the constant columns broadcast into it (no separate pad pass over q' or k').
    q_parts = [r_q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)]
    if tables.q_pad is not None:
        q_parts.append(tables.q_pad.expand(B, heads, H, W, -1))
    q2 = torch.cat(q_parts, dim=-1).view(B, heads, N, -1)
    k2 = torch.cat([k, tables.key_tail.to(k.dtype).expand(B, heads, N, -1)], dim=-1)
    return q2, k2


def _pad_value_default(v: torch.Tensor) -> bool:
    """Whether to widen v to q's width: on CPUs (their flash kernel takes one width for q, k and v);
    on CUDA only with DBSAM_SDPA_PAD_V=1, an A/B knob read per call. A narrow v leaves CUDA the
    memory-efficient kernel (q and k 192 wide, v 64 at ViT-B's global blocks: 2/3 of the second
    matmul saved); a padded one makes FlashAttention eligible (3x that matmul's FLOPs, a faster
    kernel): which wins at ViT-B is for a GPU to say (benchmarks/profile_model.py's auto_pad_v row)."""
    if not v.is_cuda:
        return True
    return os.environ.get("DBSAM_SDPA_PAD_V", "0") == "1"


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                      rel_pos_w: torch.Tensor, size, scale: float, pad_value: Optional[bool] = None,
                      tables: Optional[RelPosTables] = None) -> torch.Tensor:
    """SAM's attention with decomposed relative positions on q, k, v (B, heads, H*W, hd) -> (B, heads,
    H*W, hd), through F.scaled_dot_product_attention. pad_value: widen v to q's width with zeros
    (None: _pad_value_default); tables: see fold_rel_pos."""
    hd = v.shape[-1]
    q, k = fold_rel_pos(q, k, rel_pos_h, rel_pos_w, size, scale, tables)
    if pad_value if pad_value is not None else _pad_value_default(v):
        v = F.pad(v, (0, q.shape[-1] - hd))
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :hd]


class SDPARelPosAttention(Attention):
    """segment_anything's `Attention` (same parameters, same result) with the scores never stored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos:
            tables = self._cached_tables((H, W), q)
            out = rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (H, W), self.scale, tables=tables)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, -1))   # (B, heads, N, hd) -> (B, H, W, C)

    def _cached_tables(self, size, q: torch.Tensor) -> Optional[RelPosTables]:
        """rel_pos_tables for this call, kept from the last call while they cannot have changed.

        Why: they took ~30 of the ~87 ops this forward dispatched (SAM's two gathers, the one-hot key
        columns, casts, pads), the same every step; a DB-SAM training step dispatches ~7000 ops, and
        the GPU machine's host was measured at ~10-30 us an op, the bf16 batch 1-2 steps host-bound
        (benchmarks/NOTES.md section 16). Kept only where nothing can notice: the tables need no
        gradient (frozen ViT, or no grad mode), and layers.kept's rules (rebuilt when the rel-pos
        parameters change: an optimiser step, a load_state_dict or a .to(); keyed on the shape, dtype
        and device of q)."""
        h, w = self.rel_pos_h, self.rel_pos_w
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            return None
        hd = q.shape[-1]
        return kept(self, "_rel_pos_tables", (h, w), (size, hd, q.dtype, q.device),
                    lambda: rel_pos_tables(h, w, size, hd, q.dtype, q.device))


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
