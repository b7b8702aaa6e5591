"""Multi-scale deformable attention in plain PyTorch: the definition every backend is tested against.

Built on grid_sample(bilinear, zeros, align_corners=False) with grid = 2*loc - 1, which is exactly the
contract in docs: pixel coordinate loc*size - 0.5, corners outside the map count as zero. Works in
float64 (for gradcheck and as the parity reference) and is differentiable by autograd.
"""
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Shapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]


def _shape_list(spatial_shapes: Shapes) -> List[Tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_reference(value: torch.Tensor, spatial_shapes: Shapes, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor) -> torch.Tensor:
    """value [N, S, M, D], spatial_shapes [L, 2] (H, W) as a tensor or a list (a list keeps
    torch.compile free of data-dependent shapes), sampling_locations [N, Lq, M, L, P, 2] (x, y),
    attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D]. Computes in value's dtype; locations and
    weights are cast to it (grid_sample needs one dtype)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = _shape_list(spatial_shapes)
    dtype = value.dtype
    if N * Lq * M * D == 0:
        # grid_sample rejects empty batches; the zero term keeps the graph connected for backward.
        link = value.sum() + sampling_locations.sum() + attention_weights.sum()
        return value.new_zeros(N, Lq, M * D) + 0 * link.to(dtype)
    grids = 2 * sampling_locations.to(dtype) - 1
    sampled = []
    start = 0
    for lvl, (H, W) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value[:, start:start + H * W].permute(0, 2, 3, 1).reshape(N * M, D, H, W)
        start += H * W
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(N * M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, D, Lq, L*P] weighted by [N*M, 1, Lq, L*P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (stacked * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()
