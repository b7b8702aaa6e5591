"""Random inputs for ms_deform_attn tests, shared by the test files of every backend."""
from typing import List, Sequence, Tuple

import torch

from dbsam.ops.ms_deform_attn import level_layout


def level_tensors(shapes: Sequence[Tuple[int, int]], device="cpu"):
    """(spatial_shapes, level_start_index, S) for levels of these sizes."""
    spatial, starts = level_layout(shapes, device)
    return spatial, starts, sum(h * w for h, w in shapes)


def make_inputs(N: int, Lq: int, M: int, D: int, shapes: List[Tuple[int, int]], P: int, *,
                dtype=torch.float64, coord_dtype=None, device="cpu", outside=0.2, seed=0,
                away_from_grid: bool = False):
    """Fresh random inputs. `outside` widens the location range to [-outside, 1 + outside] so some
    points fall partly or fully off the map. `away_from_grid` nudges every location off integer
    pixel coordinates, where the location gradient jumps (needed for numeric gradient checks)."""
    g = torch.Generator().manual_seed(seed)
    spatial, starts, S = level_tensors(shapes)
    L = len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * outside) - outside
    if away_from_grid:
        size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64).view(1, 1, 1, L, 1, 2)
        pix = loc * size - 0.5
        frac = pix - pix.floor()
        frac = frac.clamp(0.1, 0.9)  # at least 0.1 px from any pixel centre
        loc = (pix.floor() + frac + 0.5) / size
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64) + 0.05
    attn = attn / attn.sum((-1, -2), keepdim=True)
    coord_dtype = coord_dtype or dtype
    return (value.to(device, dtype), spatial.to(device), starts.to(device), loc.to(device, coord_dtype),
            attn.to(device, coord_dtype))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in the 2-norm, robust to empty tensors."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()
