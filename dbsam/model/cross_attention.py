"""The bilateral cross-attention block (paper §2.2, Fig. 1c) on dbsam.ops.MSDeformAttn.

    a = MSDeformAttn(LN_q(q), ref, LN_v(v), shapes, level_start)
    x = q + DropPath(Dropout(a))
    x = x + DropPath(FFN(LN(x)))          FFN = Linear C->4C, GELU, Dropout, Linear 4C->C, Dropout

Queries and values are lists of channels-last maps [B, h, w, C] (the ViT tokens: one map; the conv
branch: L_s maps). Every query map attends from its pixel centres ((j+0.5)/w, (i+0.5)/h), in (x, y)
order, shared by every value level. Two blocks a stage: ViT <- conv (n_levels = L_s) and conv <- ViT
(n_levels = 1).
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from dbsam.ops import MSDeformAttn
from dbsam.ops.ms_deform_attn import level_layout

from .layers import FFN, DropPath


def pixel_centres(sizes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Reference points [1, sum(h*w), 1, 2] (x, y) in [0, 1] of every query map, in fp32."""
    points = []
    for h, w in sizes:
        y, x = torch.meshgrid((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
                              (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w, indexing="ij")
        points.append(torch.stack([x, y], -1).reshape(-1, 2))
    return torch.cat(points, 0)[None, :, None, :]


class MapGeometry(NamedTuple):
    """A set of maps' reference points (as queries) and level layout (as values). DB-SAM keeps them
    as buffers, fixed by its config, so that no forward builds tensors on the host (each would be a
    host-to-device copy, i.e. a sync, on CUDA)."""
    ref: torch.Tensor          # [1, sum(h*w), 1, 2] fp32 pixel centres (x, y)
    shapes: torch.Tensor       # [L, 2] int64
    starts: torch.Tensor       # [L] int64


def map_geometry(sizes: Sequence[Tuple[int, int]], device: Optional[torch.device] = None) -> MapGeometry:
    device = device or torch.device("cpu")
    return MapGeometry(pixel_centres(sizes, device), *level_layout(sizes, device))


GEOMETRY_BUFFERS = ("ref_num", "ref_den", "shapes", "starts")


def geometry_buffers(sizes: Sequence[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
    """A MapGeometry as int64 tensors, for a model's buffers: the reference points as numerator
    (2j+1, 2i+1) and denominator (2w, 2h), so that model.to(torch.bfloat16) cannot round them.
    Made on the host, returned on the default device (meta included)."""
    cpu = torch.device("cpu")
    geo = map_geometry(sizes, cpu)
    den = 2 * torch.tensor([[w, h] for h, w in sizes for _ in range(h * w)], dtype=torch.int64, device=cpu)
    num = torch.round(geo.ref[0, :, 0] * den).to(torch.int64)
    here = torch.empty(0).device
    return {name: t.to(here) for name, t in zip(GEOMETRY_BUFFERS, (num, den, geo.shapes, geo.starts))}


def geometry_from_buffers(ref_num: torch.Tensor, ref_den: torch.Tensor, shapes: torch.Tensor,
                          starts: torch.Tensor) -> MapGeometry:
    ref = ref_num.to(torch.float32) / ref_den.to(torch.float32)
    return MapGeometry(ref[None, :, None, :], shapes, starts)


def flatten_maps(maps: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """L maps [B, h, w, C] -> tokens [B, sum(h*w), C] and the (h, w) of each."""
    sizes = [(int(m.shape[1]), int(m.shape[2])) for m in maps]
    if len(maps) == 1:  # no cat of one map: a view where the map is contiguous, a copy where not
        return maps[0].flatten(1, 2), sizes
    return torch.cat([m.flatten(1, 2) for m in maps], 1), sizes


def unflatten_maps(tokens: torch.Tensor, sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    parts = torch.split(tokens, [h * w for h, w in sizes], dim=1)
    return [p.reshape(p.shape[0], h, w, p.shape[-1]) for p, (h, w) in zip(parts, sizes)]


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

    def forward(self, queries: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                query_geometry: Optional[MapGeometry] = None,
                value_geometry: Optional[MapGeometry] = None) -> List[torch.Tensor]:
        """queries, values: lists of maps [B, h, w, C]; their geometries (computed when not given).
        Returns the updated query maps."""
        q, q_sizes = flatten_maps(queries)
        v, v_sizes = flatten_maps(values)
        if value_geometry is None:
            value_geometry = map_geometry(v_sizes, q.device)
        ref = (query_geometry or map_geometry(q_sizes, q.device)).ref.expand(q.shape[0], -1, -1, -1)
        shapes, starts = value_geometry.shapes, value_geometry.starts

        a = self.attn(self.query_norm(q), ref, self.value_norm(v), shapes, starts)
        x = self.drop_path.add(q, self.dropout(a))                 # q + DropPath(Dropout(a))
        x = self.drop_path.add(x, self.ffn(self.ffn_norm(x)))      # x + DropPath(FFN(LN(x)))
        return unflatten_maps(x, q_sizes)


class BilateralCrossAttention(nn.Module):
    """The two cross-attention blocks of one stage."""

    def __init__(self, dim: int, conv_levels: int, n_heads: int, n_points: int, ffn_ratio: float, dropout: float,
                 drop_path: float):
        super().__init__()
        self.vit_from_conv = CrossAttentionBlock(dim, conv_levels, n_heads, n_points, ffn_ratio, dropout, drop_path)
        self.conv_from_vit = CrossAttentionBlock(dim, 1, n_heads, n_points, ffn_ratio, dropout, drop_path)

    def forward(self, f_d: torch.Tensor, f_s: List[torch.Tensor], vit_geometry: Optional[MapGeometry] = None,
                conv_geometry: Optional[MapGeometry] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        # F_d' = CrossAttn_vit(query=F_d, value=F_s)
        f_d_new = self.vit_from_conv([f_d], f_s, vit_geometry, conv_geometry)[0]
        # F_s = CrossAttn_conv(query=F_s, value=F_d), with F_d before its update
        f_s = self.conv_from_vit(f_s, [f_d], conv_geometry, vit_geometry)
        return f_d_new, f_s
