"""What DBSAM_MSDA_LOWP_ATOMICS=1 costs in accuracy, predicted on the CPU: grad_value of ms_deform_attn
accumulated with a bf16 rounding at every add (the GPU's packed bf16 atomics, in an arbitrary order)
against one rounding of an exact sum (the default: fp32 atomics, rounded once).

Each sample point's four corner contributions attn * w_corner * grad_out[q] are formed in float64
from random inputs (locations uniform over the map, attention weights normalised per query and
head, grad_out ~ N(0, 1), optionally correlated across the queries of an image and head: `--corr`),
then summed per value row three ways: exactly; exactly and rounded once to bf16; and in a random
order with a bf16 rounding after every add. The last is emulated rank by rank (the k-th
contribution of every row in one vectorised step: rows are unique within a rank), because ATen's
CPU index_add_ accumulates bf16 in float, which would hide exactly the rounding measured here.

    python benchmarks/lowp_error_model.py [--corr 0.5]

Prints, per layout, the contributions per touched row and the two relative errors (norm of the
difference over norm of the exact sum). The GPU test test_low_precision_grad_value_atomics prints
the measured figures for the same kind of layouts (benchmarks/NOTES.md section 12).
"""
import argparse
from typing import List, Tuple

import torch

LAYOUTS = {
    # name: (N, Lq, M, D, levels, P)
    "test layout (DETR-encoder-like)": (2, 200, 4, 64, [(24, 20), (12, 10), (6, 5)], 4),
    "hot spot (a 2x2 level)": (2, 200, 4, 8, [(16, 16), (2, 2)], 4),
    "ViT-Adapter injector, N = 1": (1, 4096, 12, 64, [(128, 128), (64, 64), (32, 32)], 4),
    "DB-SAM vit_from_conv, N = 1": (1, 4096, 12, 64, [(64, 64)], 4),
}


def contributions(N: int, Lq: int, M: int, D: int, levels: List[Tuple[int, int]], P: int, corr: float = 0.0,
                  generator=None):
    """(value row of each contribution, its D values in float64, number of value rows N * S * M)."""
    g_ = generator
    S = sum(h * w for h, w in levels)
    starts = [0]
    for h, w in levels[:-1]:
        starts.append(starts[-1] + h * w)
    L = len(levels)
    loc = torch.rand(N, Lq, M, L, P, 2, dtype=torch.float64, generator=g_)
    attn = torch.rand(N, Lq, M, L, P, dtype=torch.float64, generator=g_)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    grad_out = torch.randn(N, Lq, M, D, dtype=torch.float64, generator=g_)
    if corr:
        grad_out = torch.randn(N, 1, M, D, dtype=torch.float64, generator=g_) + corr * grad_out
    rows, vals = [], []
    n_idx = torch.arange(N).view(N, 1, 1, 1)
    m_idx = torch.arange(M).view(1, 1, M, 1)
    for lvl, (H, W) in enumerate(levels):
        x = loc[..., lvl, :, 0] * W - 0.5  # pixel coordinates, align_corners=False
        y = loc[..., lvl, :, 1] * H - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = (x0 + dx).long(), (y0 + dy).long()
            inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
            r = starts[lvl] + yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)  # [N, Lq, M, P]
            row = (n_idx * S + r) * M + m_idx
            c = (attn[..., lvl, :] * w)[..., None] * grad_out[:, :, :, None, :]  # [N, Lq, M, P, D]
            rows.append(row[inside])
            vals.append(c[inside])
    return torch.cat(rows), torch.cat(vals), N * S * M


def bf16_sum_per_add(rows: torch.Tensor, vals: torch.Tensor, n_rows: int, generator=None) -> torch.Tensor:
    """Per-row sums with a bf16 rounding after every add, each row's contributions in a random order
    (each contribution itself rounded to bf16 first, as the kernel converts it before its atomic)."""
    key = rows.double() + 0.5 * torch.rand(rows.numel(), dtype=torch.float64, generator=generator)
    order = torch.argsort(key)
    r = rows[order]
    v = vals[order].to(torch.bfloat16).double()
    first = torch.ones_like(r, dtype=torch.bool)
    first[1:] = r[1:] != r[:-1]
    pos = torch.arange(r.numel())
    rank = pos - torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    acc = torch.zeros(n_rows, vals.shape[-1], dtype=torch.float64)
    for k in range(int(rank.max()) + 1 if rank.numel() else 0):
        sel = rank == k
        rr = r[sel]
        acc[rr] = (acc[rr] + v[sel]).to(torch.bfloat16).double()
    return acc


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def errors(layout, corr: float = 0.0, seed: int = 0):
    """(mean and max contributions per touched row, error of one rounding, error of a rounding per add)."""
    g_ = torch.Generator().manual_seed(seed)
    rows, vals, n_rows = contributions(*layout, corr=corr, generator=g_)
    exact = torch.zeros(n_rows, vals.shape[-1], dtype=torch.float64).index_add_(0, rows, vals)
    once = exact.to(torch.bfloat16).double()
    per_add = bf16_sum_per_add(rows, vals, n_rows, generator=g_)
    count = torch.bincount(rows, minlength=n_rows)
    touched = count[count > 0].double()
    return touched.mean().item(), int(count.max()), rel(once, exact), rel(per_add, exact)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corr", type=float, default=0.0,
                    help="grad_out = shared + corr * own per query (0: independent queries)")
    args = ap.parse_args()
    for name, layout in LAYOUTS.items():
        mean_k, max_k, once, per_add = errors(layout, args.corr)
        print(f"{name:34} contributions per row {mean_k:5.1f} (max {max_k:4d})   relative error of grad_value: "
              f"one rounding {once:.2e}, a rounding per add {per_add:.2e}", flush=True)


if __name__ == "__main__":
    main()
