"""Benchmarks of the channel-attention adapter y = x + PW1x1(SE(GELU(DW3x3(LN(x))))).

    pytest benchmarks/test_channel_attention.py --benchmark-only [--benchmark-json out.json]

GPU: (B, 64, 64, C) for B in 1, 8 and C in 768 (ViT-B) and 1024 (ViT-L), bf16 and fp32, forward and
forward+backward, for every available dbsam backend (and, at B = 8, the CUDA op's variants: 2 and 4
channels per thread, `cuda_vec2`, `cuda_vec4`, DBSAM_CA_VEC, where the default is 8 bytes per thread;
1, 2 and 4 output rows per thread in the DW kernels, `cuda_rows1`, `cuda_rows2`, `cuda_rows4`,
`cuda_vec2_rows2`, DBSAM_CA_ROWS, where the default is 2 in bf16 and 1 in fp32; the fused grad with
rows, `cuda_fusedgrad_rows4`), against
eager PyTorch written NCHW as the original code does (permutes, nn.Conv2d, AdaptiveAvgPool2d), eager
channels-last (the reference composition), and torch.compile(mode="max-autotune") of the eager
composition (compiles once per shape/dtype; slow: select with -k to skip it). CPU: scaled down to (1, 32, 32, 192) fp32 so the file
runs in about a minute, most of it torch.compile. Both: `test_host_overhead`, fwd+bwd at a 1x2x2x8 map
through the module and through the raw native ops (the layers around the kernels).

Each benchmark records in extra_info the activation memory saved for backward (bytes of the unique
tensors packed by autograd, measured with torch.autograd.graph.saved_tensors_hooks, excluding the
parameters and x itself), the total saved bytes, one-pass bytes (B*H*W*C*itemsize) and GEMM GFLOP.
GPU timings synchronise inside the timed function; pytest-benchmark warms up and reports the median.
fp32 math: TF32 off for every implementation by default (torch.backends.cuda.matmul.allow_tf32 and
torch.backends.cudnn.allow_tf32 both False). PyTorch's defaults differ (cuDNN's flag is on, the
matmul flag off), so with them the eager rows' 1x1 convs ran in TF32 while our GEMMs ran in fp32:
on the H100 (2026-11-27) eager's whole fp32 forward took less time than one of our fp32 GEMMs.
DBSAM_BENCH_TF32=1 turns TF32 on for all of them instead; each row records the setting.
DBSAM_BENCH_THREADS=n sets torch's intra-op threads for the CPU runs (on a shared, oversubscribed
machine, 1 gives stable numbers; OpenMP barriers make multi-threaded timings swing 10-100x there).
"""
import contextlib
import os

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from conftest import bench_host_overhead, record_host_time
from saved_activations import saved_bytes

from dbsam.ops import _backends
from dbsam.ops.channel_attention import ChannelAttention, channel_attention_reference

ON_GPU = torch.cuda.is_available()
if os.environ.get("DBSAM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["DBSAM_BENCH_THREADS"]))
DEVICE = "cuda" if ON_GPU else "cpu"

if ON_GPU:
    SHAPES = [(1, 64, 64, 768), (8, 64, 64, 768), (1, 64, 64, 1024), (8, 64, 64, 1024)]
    DTYPES = [torch.bfloat16, torch.float32]
else:
    SHAPES = [(1, 32, 32, 192)]
    DTYPES = [torch.float32]


class EagerNCHW(nn.Module):
    """The adapter as the original code writes it: LN channels-last, then permute to NCHW for the convs."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.se = nn.Module()
        self.se.pool = nn.AdaptiveAvgPool2d(1)
        self.se.fc1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.se.fc2 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.pwconv = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x):
        h = self.norm(x).permute(0, 3, 1, 2)
        h = F.gelu(self.dwconv(h))
        s = torch.sigmoid(self.se.fc2(F.gelu(self.se.fc1(self.se.pool(h)))))
        return x + self.pwconv(h * s).permute(0, 2, 3, 1)


class EagerChannelsLast(nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.m = mod

    def forward(self, x):
        m = self.m
        return channel_attention_reference(x, m.norm.weight, m.norm.bias, m.dwconv.weight, m.se.fc1.weight,
                                           m.se.fc2.weight, m.pwconv.weight, 1e-6)


def _backend_impls():
    names = []
    for name in _backends.BACKENDS:
        if name == "reference":
            continue  # measured as "eager_channels_last"
        reason = _backends.why_not("channel_attention", name, torch.device(DEVICE))
        if name == "triton" and DEVICE == "cpu":
            reason = reason or "the Triton interpreter is not a benchmark"
        names.append(pytest.param(name, marks=pytest.mark.skipif(bool(reason), reason=reason or "")))
    return names


# A/B rows of the CUDA op at B = 8 only: 2 or 4 channels per thread in its [B,H,W,C] kernels
# (DBSAM_CA_VEC; the default, 8 bytes per thread, is one of them, and its `cuda` row beside that one
# shows the run's spread; one channel per thread lost at every case of run 5); 2 or 4 output rows
# per thread in the two DW kernels (DBSAM_CA_ROWS; the default is 2 in bf16 since the H200 run of
# 2026-12-03, 1 in fp32, and cuda_rows1 keeps the one-row kernel's row; at bf16's VEC = 4
# the backward runs 2 and the forward at 4 rows keeps one block per SM, hence also 2 channels x 2
# rows, two blocks in both kernels); and the grad at the DW output formed inside the transposed DW
# (DBSAM_CA_FUSED_GRAD=1, which lost 3-8% in run 5 at one row per thread) with rows, where it
# repeats less of its GELU' (benchmarks/NOTES.md 13).
# Each variant is the CUDA op run with these knobs set (profile_ops.py uses the same table).
CUDA_VARIANTS = {"cuda_vec2": {"DBSAM_CA_VEC": "2"}, "cuda_vec4": {"DBSAM_CA_VEC": "4"},
                 "cuda_rows1": {"DBSAM_CA_ROWS": "1"}, "cuda_rows2": {"DBSAM_CA_ROWS": "2"},
                 "cuda_rows4": {"DBSAM_CA_ROWS": "4"},
                 "cuda_vec2_rows2": {"DBSAM_CA_VEC": "2", "DBSAM_CA_ROWS": "2"},
                 "cuda_fusedgrad_rows4": {"DBSAM_CA_FUSED_GRAD": "1", "DBSAM_CA_ROWS": "4"}}
_no_cuda = _backends.why_not("channel_attention", "cuda", torch.device(DEVICE)) if ON_GPU else "needs a GPU"
VARIANT_IMPLS = [pytest.param(name, marks=pytest.mark.skipif(bool(_no_cuda), reason=_no_cuda or ""))
                 for name in CUDA_VARIANTS]
# compile_max_autotune runs on the CPU too (inductor's C++ backend, ~20 s of compiling at the CPU
# shape): CI then runs the row the GPU check times in bench_slow, so that code cannot rot unseen.
IMPLS = _backend_impls() + VARIANT_IMPLS + ["eager_nchw", "eager_channels_last", "compile_max_autotune"]

_compiled = {}


def backend_for(impl):
    """The context a row of `impl` runs in: its backend forced (our ops), or nothing (eager, compiled).
    Entered once around a row, not in every timed call: until 2026-12-04 each call of our rows went
    through a use_backend context manager of its own, host time the eager rows did not pay."""
    if impl in CUDA_VARIANTS:
        return _backends.use_backend("cuda")  # the caller sets the variant's knobs (CUDA_VARIANTS)
    if impl in _backends.BACKENDS:
        return _backends.use_backend(impl)
    return contextlib.nullcontext()


def _build(impl, shape, dtype):
    """The module a row times (run it inside backend_for(impl))."""
    B, H, W, C = shape
    torch.manual_seed(0)
    base = ChannelAttention(C).to(DEVICE, dtype)
    if impl in _backends.BACKENDS or impl in CUDA_VARIANTS:
        return base
    eager = EagerNCHW(C, base.se.fc1.weight.shape[0]).to(DEVICE, dtype)
    eager.load_state_dict(base.state_dict(), strict=False)
    if impl == "eager_nchw":
        return eager
    if impl == "eager_channels_last":
        return EagerChannelsLast(base)
    key = (shape, dtype)
    if key not in _compiled:
        torch._dynamo.reset()
        _compiled[key] = torch.compile(EagerChannelsLast(base), mode="max-autotune")
    return _compiled[key]


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


TF32 = os.environ.get("DBSAM_BENCH_TF32", "0") == "1"


@pytest.fixture(autouse=True)
def same_fp32_math():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = TF32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channel_attention(benchmark, shape, dtype, mode, impl, monkeypatch):
    if impl in CUDA_VARIANTS:
        if shape[0] != 8:
            pytest.skip("the CUDA variants' A/B rows run at B = 8 only")
        for knob, value in CUDA_VARIANTS[impl].items():
            monkeypatch.setenv(knob, value)
    with backend_for(impl):
        _bench_row(benchmark, _build(impl, shape, dtype), shape, dtype, mode)


def _bench_row(benchmark, model, shape, dtype, mode):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    B, H, W, C = shape
    if mode == "fwd":
        def work():
            with torch.no_grad():
                model(x)
    else:
        xg = x.clone().requires_grad_()
        gy = torch.randn_like(x)

        def work():
            model(xg).backward(gy)

        act, total = saved_bytes(lambda: model(xg), exclude=list(model.parameters()) + [xg])
        benchmark.extra_info["saved_activation_bytes"] = act
        benchmark.extra_info["saved_total_bytes"] = total
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if ON_GPU else "cpu",
                                one_pass_bytes=B * H * W * C * x.element_size(), tf32=TF32,
                                gemm_gflop=2 * B * H * W * C * C / 1e9)
    def run():
        work()
        _sync()

    run()  # first call: compilation / autotuning outside the timed rounds
    rounds = 20 if ON_GPU else 5
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=3 if ON_GPU else 1, iterations=1)
    record_host_time(benchmark, work)


@pytest.mark.parametrize("path", ["module", "raw_ops"])
def test_host_overhead(benchmark, path):
    """What the layers around the kernels cost: fwd+bwd (every grad, accumulated) at a 1x2x2x8 map,
    where the kernels do next to nothing, through `ChannelAttention` (validation, dispatch, autograd)
    and through the two native ops called directly under no_grad. Their difference is the Python and
    autograd layers (benchmarks/NOTES.md section 14: the op's autograd moved to C++ on 2026-12-03)."""
    backend = "cuda" if ON_GPU else "cpu"
    reason = _backends.why_not("channel_attention", backend, torch.device(DEVICE))
    if reason:
        pytest.skip(f"the native ops are needed: {reason}")
    model = ChannelAttention(8).to(DEVICE)
    x = torch.randn(1, 2, 2, 8, device=DEVICE, requires_grad=True)
    gy = torch.randn_like(x)
    ws = [model.norm.weight, model.norm.bias, model.dwconv.weight, model.se.fc1.weight, model.se.fc2.weight,
          model.pwconv.weight]
    if path == "module":
        def work():
            model(x).backward(gy)
    else:
        def work():
            with torch.no_grad():
                _y, *state = torch.ops.dbsam.channel_attention_forward(x, *ws, None, 1e-6)
                torch.ops.dbsam.channel_attention_backward(gy, x, *ws, None, *state, 1e-6)

    bench_host_overhead(benchmark, work, "ca-host-overhead-1x2x2x8")
