"""Autotuning helper for the Triton ms_deform_attn kernels (GPU only; skipped elsewhere).

    PYTHONPATH=$PWD python -m pytest benchmarks/test_ms_deform_attn_triton_tune.py -q -s

For each shape of docs/kernels.md: runs the autotuned forward and backward (the table in
dbsam/ops/ms_deform_attn/triton.py), checks that the autotuned backward gives the fixed-config
result (the autotuner must zero grad_value between trial launches: reset_to_zero), and prints the
chosen config, time, effective bandwidth (floor bytes / time) and per cent of the copy bandwidth
measured in the same run. The tests (tests/ops) never autotune; this file is where the table is
checked and refreshed.

Floor bytes: forward = value + locations + weights + output, each once. Backward = value +
grad_output + locations + weights (read) + grad_locations + grad_weights (write) + the fp32
grad_value buffer written once and read once by the final cast + grad_value in value's dtype
(for fp32 values the cast is a no-op: buffer written once).
"""

import pytest
import torch

from msda_inputs import case_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = {
    # name: N, Lq, levels, M, D, P
    "dbsam_1level": (1, 4096, [(64, 64)], 12, 64, 4),
    "dbsam_4level": (1, 4096, [(128, 128), (64, 64), (32, 32), (16, 16)], 12, 64, 4),
    "vit_adapter_injector": (1, 4096, [(128, 128), (64, 64), (32, 32)], 12, 64, 4),
    "vit_adapter_injector_r05": (1, 4096, [(128, 128), (64, 64), (32, 32)], 12, 32, 4),
    "vit_adapter_extractor": (1, 21504, [(64, 64)], 12, 64, 4),
    "detr_encoder": (2, 17821, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 4),
    "detr_decoder": (2, 300, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 4),
}


@pytest.fixture(scope="module")
def copy_bandwidth():
    from triton.testing import do_bench

    x = torch.empty(256 * 2 ** 20, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def _inputs(N, Lq, levels, M, D, P, dtype):
    # Sampling points near a per-query reference point, as the real modules produce.
    g = torch.Generator("cuda").manual_seed(0)
    return case_inputs(N, Lq, levels, M, D, P, dtype, device="cuda", generator=g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_tune(name, dtype, copy_bandwidth, monkeypatch):
    import triton
    from triton.testing import do_bench

    from dbsam.ops.ms_deform_attn import triton as tb

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    N, Lq, levels, M, D, P = SHAPES[name]
    value, shapes, starts, loc, attn = _inputs(N, Lq, levels, M, D, P, dtype)
    fwd = torch.ops.dbsam.ms_deform_attn_triton_forward
    bwd = torch.ops.dbsam.ms_deform_attn_triton_backward
    grad_out = torch.randn(N, Lq, M * D, device="cuda").to(dtype)

    monkeypatch.setenv("DBSAM_TRITON_AUTOTUNE", "0")
    out_fixed = fwd(value, shapes, starts, loc, attn)
    grads_fixed = bwd(grad_out, value, shapes, starts, loc, attn)
    t_fixed = (do_bench(lambda: fwd(value, shapes, starts, loc, attn)),
               do_bench(lambda: bwd(grad_out, value, shapes, starts, loc, attn)))

    monkeypatch.setenv("DBSAM_TRITON_AUTOTUNE", "1")
    out = fwd(value, shapes, starts, loc, attn)
    grads = bwd(grad_out, value, shapes, starts, loc, attn)  # tunes: trial launches must not accumulate
    torch.testing.assert_close(out, out_fixed)
    for x, y in zip(grads, grads_fixed):
        torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=1e-3)
    t_tuned = (do_bench(lambda: fwd(value, shapes, starts, loc, attn)),
               do_bench(lambda: bwd(grad_out, value, shapes, starts, loc, attn)))

    ks = tb._kernels(False)
    esz, csz = value.element_size(), loc.element_size()
    io = value.numel() * esz + (loc.numel() + attn.numel()) * csz
    fwd_bytes = io + out.numel() * esz
    bwd_bytes = (io + grad_out.numel() * esz + (loc.numel() + attn.numel()) * csz
                 + value.numel() * (4 if esz == 4 else 8 + esz))
    block_d = max(triton.next_power_of_2(D), 2)
    small = tb._is_small(N * M * Lq, tb._sm_count(torch.cuda.current_device()))
    for kind, floor, (tf, tt), tuner in (("fwd", fwd_bytes, (t_fixed[0], t_tuned[0]), ks.tuned("fwd", block_d, small)),
                                         ("bwd", bwd_bytes, (t_fixed[1], t_tuned[1]), ks.tuned("bwd", block_d, small))):
        for label, ms in (("fixed", tf), ("tuned", tt)):
            bw = floor / (ms * 1e-3)
            print(f"\n{name:26s} {str(dtype):15s} {kind} {label}: {ms * 1e3:8.1f} us  "
                  f"{bw / 1e9:7.1f} GB/s  {100 * bw / copy_bandwidth:5.1f}% of copy "
                  f"({copy_bandwidth / 1e9:.0f} GB/s)", end="")
        print(f"  best: {tuner.best_config}", end="")
    print()
