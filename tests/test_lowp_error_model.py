"""benchmarks/lowp_error_model.py predicts the accuracy cost of bf16 grad_value atomics on the CPU;
its emulation of a rounding at every add must really round at every add (ATen's CPU index_add_
accumulates bf16 in float, which first hid the effect)."""
import torch
from _paths import import_from

model = import_from("benchmarks", "lowp_error_model")


def test_every_add_rounds():
    # 1000 ones into one bf16 cell stall at 256 (256 + 1 rounds back to 256); a second row gets 3.
    rows = torch.tensor([0] * 1000 + [1] * 3)
    vals = torch.ones(1003, 2, dtype=torch.float64)
    out = model.bf16_sum_per_add(rows, vals, 2, generator=torch.Generator().manual_seed(0))
    assert out[0].tolist() == [256.0, 256.0] and out[1].tolist() == [3.0, 3.0]


def test_small_layout_orders_the_errors():
    mean_k, max_k, once, per_add = model.errors((1, 40, 2, 8, [(6, 5), (2, 2)], 2), seed=1)
    assert 1 <= mean_k <= max_k
    assert 1e-4 < once < 4e-3  # one bf16 rounding: ~2^-9 relative
    assert per_add > once  # a rounding per add costs more
