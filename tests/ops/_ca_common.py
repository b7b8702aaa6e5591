"""Shared inputs and error measures for the channel_attention tests."""
import torch
from _paths import import_from

SHAPES = [  # (B, H, W, C, R)
    (1, 7, 5, 24, 6),
    (2, 4, 6, 16, 4),
    (3, 1, 1, 8, 2),
    (4, 3, 2, 5, 1),
]


def make_inputs(B, H, W, C, R, dtype=torch.float64, wdtype=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    wdtype = wdtype or dtype
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x = rn(B, H, W, C) * 1.5 + 0.3
    ws = [1 + 0.2 * rn(C), 0.2 * rn(C), rn(C, 1, 3, 3) / 2, rn(R, C, 1, 1) / C ** 0.5 * 2,
          rn(C, R, 1, 1) / R ** 0.5, rn(C, C, 1, 1) / C ** 0.5]
    return x.to(device, dtype), [w.to(device, wdtype) for w in ws]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def saved_activation_bytes(fn, x, ws):
    """Bytes of the distinct storages autograd keeps for backward, apart from x and the weights: the
    benchmarks' counter (benchmarks/saved_activations.py), which the adapter benchmark reports."""
    return import_from("benchmarks", "saved_activations").saved_bytes(fn, exclude=(x, *ws))[0]
