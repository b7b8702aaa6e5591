"""Per-kernel CUDA time of one forward+backward of each op, from torch.profiler: where the time goes.

The first H100 runs (benchmarks/results/h100_2026-11-27_*) left two questions that the end-to-end
benchmarks cannot answer: which of the channel_attention op's launches (CUDA and Triton) make it
slower than eager PyTorch, and how the ms_deform_attn backward's time splits between the kernel, the
zero-fill and the fp32-to-bf16 conversion of grad_value (CUDA and Triton, against deformops' kernels
when it is installed).
Prints, per case, the kernels by total CUDA time (median of 5 profiled steps after 3 warm-ups), and
the step's synchronised wall time and host time beside it.

    python benchmarks/profile_ops.py        # needs a GPU
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import host_and_wall_us  # noqa: E402


def device_us(e) -> float:
    """A profiler event's device time in us, whichever name this torch gives it (device_time_total;
    cuda_time_total in older releases)."""
    return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0


def _profile(name, step, reps=5, top=12, gemm_shapes=False, host_ops=False):
    """gemm_shapes: also list the matmul calls (aten::mm/bmm/baddbmm/addmm) by input shape with their
    CUDA time: run 4 showed two fp32 cuBLAS kernels of ~55 us each inside the bf16 adapter op whose
    source call could not be told from the kernel names. host_ops: also list where the host time goes
    (self CPU time per step of each op and runtime call: launches, allocations, cuBLAS, the autograd
    nodes): run 5 measured the adapter's fwd+bwd at ~1.1 ms of host time on that machine, about half
    the wall at B = 8, without saying which calls take it."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    host_us, wall_us = host_and_wall_us(step)  # host far below wall: the GPU, not the host, is the limit
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = device_us(e)
        if t > 0:
            rows.append((t / reps, e.count // reps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"== {name}: {total:.1f} us of kernels per step; wall {wall_us:.1f} us, host {host_us:.1f} us")
    for t, n, key in rows[:top]:
        print(f"   {t:9.1f} us  {100 * t / max(total, 1e-9):5.1f}%  x{n:<3d} {key[:110]}")
    if gemm_shapes:  # a second pass with the CPU ops and their input shapes
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(reps):
                step()
            torch.cuda.synchronize()
        mm = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.key in ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm")]
        for e in sorted(mm, key=lambda e: -device_us(e)):
            t = device_us(e) / reps
            print(f"   [gemm] {t:9.1f} us  x{e.count // reps:<3d} {e.key} {e.input_shapes}")
    if host_ops:
        print_host_ops(step, reps)


def print_host_ops(step, reps=5, top=15, sync=torch.cuda.synchronize, warm=3):
    """The CPU side of `reps` steps alone: self CPU time per step of each op and runtime call, the
    largest first (the profiler's own cost inflates the total: read the shares). The first `warm` steps
    inside the profiler are left out: the profiler's start-up lands on its first events (on the dev
    CPU the adapter's first few forwards inside a session took 1.3-5x the steady ~115 us, 2026-12-04),
    which put ~500 us of self time on ms_deform_attn_forward per step in run 6's table."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(warm + reps):
            with record_function("dbsam::profiled_step"):
                step()
        sync()
    events = prof.events()
    steps = sorted(e.time_range.start for e in events if e.name == "dbsam::profiled_step")
    start = steps[warm]
    self_us, count = defaultdict(float), defaultdict(int)
    for e in events:
        if e.time_range.start >= start and e.name != "dbsam::profiled_step" and e.self_cpu_time_total > 0:
            self_us[e.name] += e.self_cpu_time_total
            count[e.name] += 1
    total = sum(self_us.values()) / reps
    print(f"   [host] {total:9.1f} us of self CPU time per step under the profiler")
    for name in sorted(self_us, key=lambda n: -self_us[n])[:top]:
        t = self_us[name] / reps
        print(f"   [host] {t:9.1f} us  {100 * t / max(total, 1e-9):5.1f}%  x{count[name] // reps:<3d} {name[:90]}")


def channel_attention_cases():
    # The benchmark's own builders (benchmarks/test_channel_attention.py), so each profile is of
    # exactly what a benchmark row times: our CUDA and Triton ops, and eager PyTorch written NCHW
    # (the baseline of #4's goal). fp32 with TF32 off everywhere, as the benchmark runs it.
    from test_channel_attention import CUDA_VARIANTS, _build, backend_for

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    knobs = {knob for variant in CUDA_VARIANTS.values() for knob in variant}

    def case(impl, shape, dtype):
        # cuda_rows1 / cuda_rows2 / cuda_rows4 / cuda_vec2_rows2 / cuda_fusedgrad_rows4: the CUDA op
        # with 1, 2 or 4 output rows per thread in the DW kernels (default 2 in bf16, 1 in fp32: the
        # per-kernel times say what dw_gelu and dw_backward gain, and what the fused grad costs); the knobs
        # (CUDA_VARIANTS) are read at every call, so they are set around the whole profile.
        for knob in knobs:
            os.environ.pop(knob, None)
        os.environ.update(CUDA_VARIANTS.get(impl, {}))
        model = _build(impl, shape, dtype)
        x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)

        def step(model=model, x=x, g=g):
            torch.autograd.grad(model(x), [x, *model.parameters()], g)

        with backend_for(impl):
            _profile(f"channel_attention {impl} {'x'.join(map(str, shape))} {str(dtype)[6:]} fwd+bwd", step,
                     gemm_shapes=impl == "cuda" and shape[0] > 1, host_ops=shape[0] == 1)
        for knob in knobs:
            os.environ.pop(knob, None)

    for dtype in (torch.bfloat16, torch.float32):
        for impl in ("cuda", "cuda_rows1", "cuda_rows2", "cuda_rows4", "cuda_vec2_rows2", "cuda_fusedgrad_rows4",
                     "triton", "eager_nchw"):
            case(impl, (8, 64, 64, 768), dtype)
    # B = 1: run 3 timed every implementation there at about its B = 8 time (bf16 fwd+bwd: ours 1946
    # against 3365 us, eager NCHW 1896 against 1823), i.e. host-bound. Wall against the kernels' sum
    # and the host time says by how much, before and after the adapter's small ATen calls became
    # direct launches (NOTES section 10).
    for impl in ("cuda", "eager_nchw"):
        case(impl, (1, 64, 64, 768), torch.bfloat16)


def msda_cases():
    from msda_inputs import INJECTOR, case_inputs

    from dbsam.ops import ms_deform_attn

    g = torch.Generator("cuda").manual_seed(0)
    try:
        from deformops.registry import msda as deformops_msda
    except ImportError:
        deformops_msda = None
    # The injector at N = 8 (where the bf16 backward's split matters) and at N = 1 (where the Triton
    # backend was 1.5-2.5x slower than CUDA, fwd+bwd at ~1 ms whatever the shape).
    for N, dtype in ((8, torch.bfloat16), (8, torch.float32), (1, torch.bfloat16)):
        Lq, M, D = INJECTOR["Lq"], INJECTOR["M"], INJECTOR["D"]
        value, spatial, starts, l, a = case_inputs(N, **INJECTOR, dtype=dtype, device="cuda", generator=g)
        value.requires_grad_(), l.requires_grad_(), a.requires_grad_()
        grad = torch.randn(N, Lq, M * D, device="cuda", dtype=dtype)
        runs = {"cuda": lambda: ms_deform_attn(value, spatial, starts, l, a, backend="cuda"),
                "triton": lambda: ms_deform_attn(value, spatial, starts, l, a, backend="triton")}
        if deformops_msda is not None:
            runs["deformops"] = lambda: deformops_msda(value, spatial, starts, l.to(dtype), a.to(dtype))
        for name, fn in runs.items():
            def step(fn=fn):
                torch.autograd.grad(fn(), (value, l, a), grad)

            _profile(f"ms_deform_attn {name} injector N{N} {str(dtype)[6:]} fwd+bwd", step, host_ops=N == 1)


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_ops: needs a CUDA device")
        return 0
    msda_cases()
    channel_attention_cases()
    return 0


if __name__ == "__main__":
    sys.exit(main())
