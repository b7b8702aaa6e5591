"""ms_deform_attn benchmarks: every available backend at the shapes of kernels.md.

GPU: every shape at N = 1 and 8, fp32 and bf16 (fp32 locations/weights), forward and
forward+backward; plus torch.compile of the reference and `deformops` (when installed) at N = 8, and
`triton_lowp` (the Triton backward with DBSAM_MSDA_LOWP_ATOMICS=1) in bf16 fwd+bwd at N = 8.
Locations are drawn as a model makes them (reference point + per-head offsets, msda_inputs.py);
rows marked `uniform` draw them uniformly over the map instead (no locality: the caches' worst case).
CPU: the DB-SAM one-level shape at full size (N = 1, fp32 and bf16) and the others scaled down, fp32.
Both: `test_host_overhead`, fwd+bwd of a tiny problem through the op and through the raw native ops
(the layers around the kernels).

Run: pytest benchmarks/ --benchmark-only   (add --benchmark-json=FILE to keep the figures)
"""
import functools

import pytest
import torch

from dbsam.ops import ms_deform_attn, ms_deform_attn_reference
from dbsam.ops._backends import why_not

from conftest import DEVICE, ON_GPU, bench_host_overhead, record_host_time, report_bandwidth, sync
from msda_inputs import case_inputs

# name: (Lq, levels, M, D, P)
SHAPES = {
    "dbsam_vit_from_conv": (4096, [(64, 64)], 12, 64, 4),
    "dbsam_conv_from_vit": (4096, [(64, 64)], 12, 64, 4),
    "dbsam_pyramid": (4096, [(128, 128), (64, 64), (32, 32), (16, 16)], 12, 64, 4),
    "vitadapter_injector": (4096, [(128, 128), (64, 64), (32, 32)], 12, 64, 4),
    "vitadapter_extractor": (21504, [(64, 64)], 12, 64, 4),
    "detr_encoder": (17821, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 4),
    "detr_decoder": (300, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 4),
}
# The two DB-SAM shapes are the same problem (4096 queries on a 64x64 map); one row is enough.
del SHAPES["dbsam_conv_from_vit"]

if ON_GPU:
    CASES = [(name, n, dt, "model") for name in SHAPES for n in (1, 8) for dt in ("float32", "bfloat16")]
    CASES += [(name, 8, dt, "uniform") for name in ("dbsam_vit_from_conv", "vitadapter_injector")
              for dt in ("float32", "bfloat16")]
    # triton_lowp: the Triton backend with DBSAM_MSDA_LOWP_ATOMICS=1 (grad_value scattered in bf16,
    # as deformops does), fwd+bwd in bf16 at N = 8 only: the opt-in's time beside its error figure
    # (tests/ops/test_ms_deform_attn_triton.py prints it). The CUDA kernel reads that knob once per
    # process: ab_order.py times its variant.
    BACKENDS = ["cuda", "triton", "triton_lowp", "reference", "reference_compiled", "deformops"]
else:
    # Full DB-SAM shape (the README's CPU figure), the rest scaled to a few queries per level.
    CASES = [("dbsam_vit_from_conv", 1, "float32", "model"), ("dbsam_vit_from_conv", 1, "bfloat16", "model")] + [
        (name, 1, "float32", "model") for name in SHAPES if name != "dbsam_vit_from_conv"]
    # reference_compiled too: the GPU check's bench_slow row, run here so that it cannot rot.
    BACKENDS = ["cpu", "reference", "reference_compiled"]
IDS = [f"{n}-N{b}-{d}" + ("-uniform" if loc == "uniform" else "") for n, b, d, loc in CASES]


def shape_of(name):
    Lq, levels, M, D, P = SHAPES[name]
    if not ON_GPU and name != "dbsam_vit_from_conv":
        Lq = min(Lq, 512)
        levels = [(max(1, h // 2), max(1, w // 2)) for h, w in levels]
    return Lq, levels, M, D, P


def make(name, N, dtype_name, locality="model"):
    Lq, levels, M, D, P = shape_of(name)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    inputs = case_inputs(N, Lq, levels, M, D, P, getattr(torch, dtype_name), device=DEVICE, generator=g,
                         locality=locality)
    return (*inputs, levels)


def floor_bytes(value, loc, attn, Lq, backward):
    """Each tensor read or written once: value, locations, weights in; output out. The backward
    adds grad_output in, value/locations/weights again, grad_value/locations/weights out."""
    N, S, M, D = value.shape
    out = N * Lq * M * D * value.element_size()
    fwd = value.nbytes + loc.nbytes + attn.nbytes + out
    bwd = out + value.nbytes + loc.nbytes + attn.nbytes + value.nbytes + loc.nbytes + attn.nbytes
    return fwd + (bwd if backward else 0)


@functools.lru_cache(maxsize=None)
def _compiled_reference(levels):
    return torch.compile(functools.partial(ms_deform_attn_reference, spatial_shapes=list(levels)), dynamic=False)


def runner(backend, levels):
    if backend == "reference_compiled":
        fn = _compiled_reference(tuple(levels))
        return lambda v, s, st, l, a: fn(v, sampling_locations=l, attention_weights=a)
    if backend == "triton_lowp":
        backend = "triton"  # the knob itself is set around the row (test_forward_backward)
    if backend == "deformops":
        # deformops (the strongest public peer; Python >= 3.12, torch >= 2.11): its dispatching
        # entry point deformops.registry.msda takes the same five tensors, all of one dtype (it
        # rejects fp32 locations/weights with a bf16 value): they are cast to value's dtype, which
        # is how it runs in a bf16 model, and the (differentiable) cast is timed with it.
        registry = pytest.importorskip("deformops.registry", reason="deformops is not installed")
        return lambda v, s, st, l, a: registry.msda(v, s, st, l.to(v.dtype), a.to(v.dtype))
    reason = why_not("ms_deform_attn", backend, DEVICE)
    if reason:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    return lambda v, s, st, l, a: ms_deform_attn(v, s, st, l, a, backend=backend)


def skip_peer(backend, name, N, locality="model", dtype="float32", backward=True):
    if backend == "triton_lowp" and (not backward or N != 8 or dtype != "bfloat16"):
        pytest.skip("the lowp-atomics variant changes the bf16 backward only: timed at N = 8, fwd+bwd")
    # On the GPU peers are measured where the goals are set (N = 8), and torch.compile of the
    # reference (a compile per shape and dtype, tens of seconds each) only at the two
    # DB-SAM-relevant shapes. The CPU cases are all N = 1.
    if backend in ("reference_compiled", "deformops") and N != 8 and ON_GPU:
        pytest.skip("peers are measured at N = 8 only, to keep the GPU check short")
    if backend in ("reference", "reference_compiled") and locality == "uniform":
        pytest.skip("the grid_sample reference reads every corner whatever the locations: measured once, on `model` rows")
    if backend == "reference_compiled" and name not in ("dbsam_vit_from_conv", "vitadapter_injector"):
        pytest.skip("torch.compile of the reference is measured at the DB-SAM and ViT-Adapter injector shapes only")
    if backend == "reference_compiled" and not ON_GPU and dtype != "float32":
        pytest.skip("on the CPU torch.compile of the reference is run in float32 only (a compile per dtype)")


def _rounds(value):
    # Large CPU problems take a fraction of a second each: fewer rounds keep the suite short.
    return 20 if ON_GPU else max(3, min(20, int(2e6 // max(1, value.numel()))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,N,dtype,locality", CASES, ids=IDS)
def test_forward(benchmark, copy_bandwidth, backend, name, N, dtype, locality):
    skip_peer(backend, name, N, locality, dtype, backward=False)
    value, spatial, starts, loc, attn, levels = make(name, N, dtype, locality)
    fn = runner(backend, levels)

    def work():
        with torch.no_grad():
            return fn(value, spatial, starts, loc, attn)

    def step():
        out = work()
        sync()
        return out

    benchmark.group = f"msda-fwd-{name}-N{N}-{dtype}" + ("-uniform" if locality == "uniform" else "")
    benchmark.pedantic(step, rounds=_rounds(value), warmup_rounds=2)
    record_host_time(benchmark, work)
    report_bandwidth(benchmark, floor_bytes(value, loc, attn, loc.shape[1], backward=False), copy_bandwidth)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,N,dtype,locality", CASES, ids=IDS)
def test_forward_backward(benchmark, copy_bandwidth, backend, name, N, dtype, locality, monkeypatch):
    skip_peer(backend, name, N, locality, dtype)
    if backend == "triton_lowp":
        monkeypatch.setenv("DBSAM_MSDA_LOWP_ATOMICS", "1")  # the Triton backward reads it per call
    value, spatial, starts, loc, attn, levels = make(name, N, dtype, locality)
    fn = runner(backend, levels)
    value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()
    grad = torch.randn(N, loc.shape[1], value.shape[2] * value.shape[3], device=DEVICE, dtype=value.dtype)

    def work():
        return torch.autograd.grad(fn(value, spatial, starts, loc, attn), (value, loc, attn), grad)

    def step():
        grads = work()
        sync()
        return grads

    benchmark.group = f"msda-fwdbwd-{name}-N{N}-{dtype}" + ("-uniform" if locality == "uniform" else "")
    benchmark.pedantic(step, rounds=_rounds(value), warmup_rounds=1)
    record_host_time(benchmark, work)
    report_bandwidth(benchmark, floor_bytes(value, loc, attn, loc.shape[1], backward=True), copy_bandwidth)


@pytest.mark.parametrize("path", ["op", "raw_ops"])
def test_host_overhead(benchmark, path):
    """What the layers around the kernels cost: fwd+bwd at a tiny problem (1 image, 5 queries, 2 heads
    of 16 channels, two levels of 4x4 and 2x2, 2 points), where the kernels do next to nothing, through
    `ms_deform_attn` (validation, dispatch, autograd) and through the two native ops called directly
    under no_grad. Their difference is the Python and autograd layers (benchmarks/NOTES.md section 14:
    the op's autograd moved to C++ on 2026-12-03)."""
    backend = "cuda" if ON_GPU else "cpu"
    reason = why_not("ms_deform_attn", backend, DEVICE)
    if reason:
        pytest.skip(f"the native ops are needed: {reason}")
    g = torch.Generator().manual_seed(0)
    spatial = torch.tensor([[4, 4], [2, 2]], device=DEVICE)
    starts = torch.tensor([0, 16], device=DEVICE)
    value = torch.randn(1, 20, 2, 16, generator=g).to(DEVICE).requires_grad_()
    loc = torch.rand(1, 5, 2, 2, 2, 2, generator=g).to(DEVICE).requires_grad_()
    attn = torch.rand(1, 5, 2, 2, 2, generator=g).to(DEVICE).requires_grad_()
    grad = torch.randn(1, 5, 32, generator=g).to(DEVICE)
    if path == "op":
        def work():
            ms_deform_attn(value, spatial, starts, loc, attn).backward(grad)
    else:
        def work():
            with torch.no_grad():
                torch.ops.dbsam.ms_deform_attn_forward(value, spatial, starts, loc, attn)
                torch.ops.dbsam.ms_deform_attn_backward(grad, value, spatial, starts, loc, attn)

    bench_host_overhead(benchmark, work, "msda-host-overhead-tiny")
