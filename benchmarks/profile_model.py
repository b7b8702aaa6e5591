"""Where a DB-SAM training step's time goes: kernels by kind, launches, host time and wall time.

#6's pair (ViT-B, 1024, bf16 autocast, batch 2: the fast path against the reference ops with SAM's
attention) missed its 1.3x on the H200 (108 against 133 ms, run 6) while batch 1 took 94 ms and
batch 4 190: at batch 2 the host and the GPU take about as long (NOTES.md section 16). This says
which of the two a change must shorten, and where on the GPU the time is: per step, the kernels'
summed time by kind (GEMMs, fused attention, our two ops, elementwise, normalisation, copies,
convolutions, reductions, the optimiser, the rest), their launch count, the 15 longest kernels, the
host time (the step until it returns) and the synchronised wall time; for each row of
benchmarks/test_model.py's goal group.

    python benchmarks/profile_model.py [--variant vit_b] [--batch 2] [--fp32] [--rows auto reference]

On a CPU (no CUDA device) it profiles the `tiny` config's CPU ops instead, for tests.
"""
import argparse
import contextlib
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Kernel kinds, first match wins (names as CUDA 13 / torch 2.11 / Triton 3.6 print them on sm_90).
KINDS = (
    ("dbsam ops", r"dbsam::|_msda_|msda_|dw_gelu|dw_backward|ln_stats|ln_backward|gate_dot|grad_pre|"
                  r"pack_weights|small_mm|sum_rows|fold_kernel|se_weight_grad"),
    ("attention", r"fmha|flash|attention|mem_eff"),
    ("optimizer", r"multi_tensor_apply|adam"),
    ("gemm", r"gemm|nvjet|cutlass|cublas|xmma_gemm|splitK|^aten::(addmm|mm|bmm|baddbmm)$"),
    ("convolution", r"conv|dgrad|wgrad|fprop|implicit_gemm|nchwToNhwc|nhwcToNchw"),
    ("normalisation", r"layer_norm|LayerNorm|GammaBeta|batch_norm|BatchNorm|welford"),
    ("copy / cat / pad", r"copy|Memcpy|Memset|cat_|CatArray|pad|index|gather|scatter|fill|Fill"),
    ("reduction", r"reduce_kernel|Reduce|softmax|Softmax"),
    ("elementwise", r"elementwise|vectorized|Functor|unrolled"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def profile_step(step, device: torch.device, reps: int = 3, warm: int = 2, top: int = 15):
    """Runs step() `warm` times, then `reps` times under the profiler; prints the table."""
    from torch.profiler import ProfilerActivity, profile

    from conftest import host_and_wall_us
    from profile_ops import device_us

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warm):
        step()
    sync()
    host_us, wall_us = host_and_wall_us(step, reps=reps) if device.type == "cuda" else (float("nan"),) * 2
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            step()
        sync()
    by_kind, launches = defaultdict(float), defaultdict(int)
    kernels = []
    for e in prof.key_averages():
        if device.type == "cuda":
            # Kernels and memcpy/memset activities (no children: their device time is their own).
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = device_us(e)
        else:
            t = e.self_cpu_time_total
        if t <= 0:
            continue
        kernels.append((t / reps, e.count / reps, e.key))
        by_kind[kind_of(e.key)] += t / reps
        launches[kind_of(e.key)] += e.count / reps
    total = sum(by_kind.values())
    what = "kernels" if device.type == "cuda" else "CPU ops (self time)"
    print(f"   {total / 1e3:9.2f} ms of {what} per step, {sum(launches.values()):.0f} of them; "
          f"host {host_us / 1e3:.2f} ms, wall {wall_us / 1e3:.2f} ms")
    for kind in sorted(by_kind, key=lambda k: -by_kind[k]):
        print(f"   {kind:18s} {by_kind[kind] / 1e3:9.2f} ms  {100 * by_kind[kind] / max(total, 1e-9):5.1f}%  "
              f"x{launches[kind]:.0f}")
    for t, n, name in sorted(kernels, reverse=True)[:top]:
        print(f"      {t / 1e3:8.2f} ms  x{n:<5.0f} [{kind_of(name)}] {name[:100]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default=None, help="vit_b on a GPU, tiny on a CPU")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="no autocast (default: bf16 autocast)")
    parser.add_argument("--rows", nargs="+", default=["auto", "auto_pad_v", "reference"],
                        help="benchmarks/test_model.py rows (auto, reference, auto_sam_attention) and auto_pad_v: "
                             "auto with DBSAM_SDPA_PAD_V=1 (v widened to q's width, FlashAttention eligible)")
    args = parser.parse_args(argv)

    import dbsam.ops
    from dbsam.model import build_dbsam
    from test_model import ROWS, make_inputs, train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variant = args.variant or ("vit_b" if device.type == "cuda" else "tiny")
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    torch.manual_seed(0)
    model = build_dbsam(variant).to(device).train()
    images, boxes, target = make_inputs(model, args.batch, device)
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    for row in args.rows:
        backend, attention = ROWS["auto" if row == "auto_pad_v" else row]
        os.environ.pop("DBSAM_SDPA_PAD_V", None)
        if row == "auto_pad_v":
            os.environ["DBSAM_SDPA_PAD_V"] = "1"
        model.set_vit_attention(attention)
        step = train_step(model, images, boxes, target, amp)

        print(f"== {variant} train step batch {args.batch} {str(dtype)[6:]} {row} "
              f"(ops: {backend}, ViT attention: {attention})")
        with dbsam.ops.use_backend(backend):
            profile_step(step, device)
        del step
        model.zero_grad(set_to_none=True)
        os.environ.pop("DBSAM_SDPA_PAD_V", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
