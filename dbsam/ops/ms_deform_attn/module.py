"""MSDeformAttn: the drop-in nn.Module of Deformable DETR (and DINO, Mask2Former, ViT-Adapter).

Same constructor, forward signature, parameter names, shapes and initialisation as the original,
so a state dict saved from it loads unchanged. Extras: `ratio` (ViT-Adapter's value-projection
ratio) and any batch size whatever `im2col_step` is.
"""
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .op import ms_deform_attn


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0):
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model * ratio = {value_dim} must be divisible by n_heads = {n_heads}")
        head_dim = value_dim // n_heads
        if head_dim & (head_dim - 1):
            # The original warns here because its CUDA kernel was tuned for powers of two; ours are
            # correct for any head dim, fastest for multiples of 8.
            warnings.warn(f"MSDeformAttn: head dim {head_dim} is not a power of 2; fast paths need a multiple of 8",
                          stacklevel=2)
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.ratio = ratio

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head m starts looking along the direction at angle 2*pi*m/M, scaled so that the larger
        # coordinate is 1 (onto the unit square); point p looks (p + 1) times as far.
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([angles.cos(), angles.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = direction.view(self.n_heads, 1, 1, 2) * scale
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: torch.Tensor, input_level_start_index: torch.Tensor,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [N, Lq, C]; reference_points [N, Lq, L, 2] (x, y) or [N, Lq, L, 4] (cx, cy, w, h),
        normalised (an L of 1 broadcasts over levels); input_flatten [N, S, C];
        input_padding_mask [N, S], True where padded. Returns [N, Lq, C]."""
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, -1)

        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        # Locations and softmax in float32 (float64 for a float64 module) whatever the autocast
        # dtype: the kernels take fp32 locations/weights with a bf16/fp16 value, and a bf16
        # location would be quantised to half a pixel on a 128-wide level.
        cdt = torch.float64 if value.dtype == torch.float64 else torch.float32
        offsets = offsets.to(cdt)
        weights = self.attention_weights(query).view(N, Lq, M, L * P)
        weights = F.softmax(weights.to(cdt), -1).view(N, Lq, M, L, P)

        if reference_points.shape[-1] == 2:
            normaliser = input_spatial_shapes.flip(-1).view(1, 1, 1, -1, 1, 2)  # (W, H) per level
            locations = reference_points[:, :, None, :, None, :].to(cdt) + offsets / normaliser
        elif reference_points.shape[-1] == 4:
            ref = reference_points[:, :, None, :, None, :].to(cdt)
            locations = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
        else:
            raise ValueError("MSDeformAttn: reference_points must end in 2 (x, y) or 4 (cx, cy, w, h) coordinates, "
                             f"got shape {tuple(reference_points.shape)}")
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights,
                                self.im2col_step)
        return self.output_proj(output)
