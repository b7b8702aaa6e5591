"""Sampling locations and weights for the ms_deform_attn benchmarks, drawn as a model makes them.

`model` (the default): each query has a reference point on a grid in query order (a 64x64 token
map's queries are its pixels), and each head samples around it as Deformable DETR's `MSDeformAttn`
does: `loc = ref + offset / (W_l, H_l)`, the offset along the head's direction (angle 2*pi*m/M)
times (p + 1) pixels, the initialisation pattern, plus N(0, 1) pixels of learned spread. Points near
the border fall outside [0, 1]. Queries with no map of their own (the DETR decoder's 300 object
queries) get uniform random reference points.

`uniform`: every location uniform over [-0.1, 1.1]^2, independent of the query. No model samples
like this; it removes all locality between neighbouring queries, which is the worst case for the
caches (at N = 8 the value tensor is larger than the H100's 50 MB L2). The first GPU run
(2026-11-27) used only this; `model` is what the goals are measured on, `uniform` stays as a row.
"""
import math

import torch

from dbsam.ops.ms_deform_attn import level_layout

DECODER_QUERIES = 1024  # fewer queries than this: object queries, random reference points
# The ViT-Adapter injector (kernels.md), the shape the profiling scripts look at.
INJECTOR = dict(Lq=4096, levels=[(128, 128), (64, 64), (32, 32)], M=12, D=64, P=4)


def locations_and_weights(N, Lq, levels, M, P, *, device, generator, locality="model"):
    L = len(levels)
    if locality == "uniform":
        loc = torch.rand(N, Lq, M, L, P, 2, generator=generator, device=device) * 1.2 - 0.1
    elif locality == "model":
        if Lq < DECODER_QUERIES:
            ref = torch.rand(N, Lq, 2, generator=generator, device=device)
        else:
            side = math.ceil(math.sqrt(Lq))
            q = torch.arange(Lq, device=device)
            ref = torch.stack(((q % side + 0.5) / side, (q // side + 0.5) / side), -1).expand(N, Lq, 2)
        theta = 2 * math.pi * torch.arange(M, device=device, dtype=torch.float32) / M
        direction = torch.stack((theta.cos(), theta.sin()), -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values  # onto the unit square
        steps = torch.arange(1, P + 1, device=device, dtype=torch.float32)
        offset_px = direction[:, None, None, :] * steps[None, None, :, None]  # [M, 1, P, 2]
        offset_px = offset_px + torch.randn(N, Lq, M, L, P, 2, generator=generator, device=device)
        wh = torch.tensor([[w, h] for h, w in levels], device=device, dtype=torch.float32)  # [L, 2]
        loc = ref[:, :, None, None, None, :] + offset_px / wh[:, None, :]
    else:
        raise ValueError(f"locality must be 'model' or 'uniform', got {locality!r}")
    logits = torch.randn(N, Lq, M, L * P, generator=generator, device=device)
    attn = torch.softmax(logits, -1).view(N, Lq, M, L, P)
    return loc.contiguous(), attn


def case_inputs(N, Lq, levels, M, D, P, dtype, *, device, generator, locality="model"):
    """value (in `dtype`), spatial_shapes, level_start_index, locations and weights (fp32) of one
    benchmark case, drawn on `device` (at N = 8 they are hundreds of MB: drawing on the CPU takes
    seconds)."""
    spatial, starts = level_layout(levels, device)
    S = sum(h * w for h, w in levels)
    value = torch.randn(N, S, M, D, generator=generator, device=device).to(dtype)
    loc, attn = locations_and_weights(N, Lq, levels, M, P, device=device, generator=generator, locality=locality)
    return value, spatial, starts, loc, attn
