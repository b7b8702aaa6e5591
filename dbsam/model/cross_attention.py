"""The bilateral cross-attention block (paper §2.2, Fig. 1c) on dbsam.ops.MSDeformAttn.

    a = MSDeformAttn(LN_q(q), ref, LN_v(v), shapes, level_start)
    x = q + DropPath(Dropout(a))
    x = x + DropPath(FFN(LN(x)))          FFN = Linear C->4C, GELU, Dropout, Linear 4C->C, Dropout

Queries and values are lists of channels-last maps [B, h, w, C] (the ViT tokens: one map; the conv
branch: L_s maps). Every query map attends from its pixel centres ((j+0.5)/w, (i+0.5)/h), in (x, y)
order, shared by every value level. Two blocks a stage: ViT <- conv (n_levels = L_s) and conv <- ViT
(n_levels = 1).
"""
from typing import List, Sequence, Tuple

import torch
from torch import nn

from dbsam.ops import MSDeformAttn

from .layers import FFN, DropPath


def pixel_centres(sizes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Reference points [1, sum(h*w), 1, 2] (x, y) in [0, 1] of every query map, in fp32."""
    points = []
    for h, w in sizes:
        y, x = torch.meshgrid((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
                              (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w, indexing="ij")
        points.append(torch.stack([x, y], -1).reshape(-1, 2))
    return torch.cat(points, 0)[None, :, None, :]


def flatten_maps(maps: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """L maps [B, h, w, C] -> tokens [B, sum(h*w), C] and the (h, w) of each."""
    sizes = [(int(m.shape[1]), int(m.shape[2])) for m in maps]
    return torch.cat([m.flatten(1, 2) for m in maps], 1), sizes


def unflatten_maps(tokens: torch.Tensor, sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    parts = torch.split(tokens, [h * w for h, w in sizes], dim=1)
    return [p.reshape(p.shape[0], h, w, p.shape[-1]) for p, (h, w) in zip(parts, sizes)]


def level_layout(sizes: Sequence[Tuple[int, int]], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """spatial_shapes [L, 2] (h, w) and level_start_index [L], int64, as MSDeformAttn takes them."""
    starts, total = [], 0
    for h, w in sizes:
        starts.append(total)
        total += h * w
    return (torch.tensor(sizes, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device))


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, n_levels: int, n_heads: int, n_points: int = 4, ffn_ratio: float = 4.0,
                 dropout: float = 0.1, drop_path: float = 0.4, eps: float = 1e-5):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=eps)   # LN_q
        self.value_norm = nn.LayerNorm(dim, eps=eps)   # LN_v
        self.attn = MSDeformAttn(d_model=dim, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FFN(dim, ffn_ratio, dropout)

    def forward(self, queries: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        q, q_sizes = flatten_maps(queries)
        v, v_sizes = flatten_maps(values)
        shapes, starts = level_layout(v_sizes, q.device)
        ref = pixel_centres(q_sizes, q.device).expand(q.shape[0], -1, -1, -1)

        a = self.attn(self.query_norm(q), ref, self.value_norm(v), shapes, starts)
        x = q + self.drop_path(self.dropout(a))
        x = x + self.drop_path(self.ffn(self.ffn_norm(x)))
        return unflatten_maps(x, q_sizes)


class BilateralCrossAttention(nn.Module):
    """The two cross-attention blocks of one stage."""

    def __init__(self, dim: int, conv_levels: int, n_heads: int, n_points: int, ffn_ratio: float, dropout: float,
                 drop_path: float):
        super().__init__()
        self.vit_from_conv = CrossAttentionBlock(dim, conv_levels, n_heads, n_points, ffn_ratio, dropout, drop_path)
        self.conv_from_vit = CrossAttentionBlock(dim, 1, n_heads, n_points, ffn_ratio, dropout, drop_path)

    def forward(self, f_d: torch.Tensor, f_s: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        f_d_new = self.vit_from_conv(queries=[f_d], values=f_s)[0]   # F_d' = CrossAttn_vit(F_d, F_s)
        f_s = self.conv_from_vit(queries=f_s, values=[f_d])          # F_s uses F_d before the update
        return f_d_new, f_s
