"""The hand-written CUDA kernels of ms_deform_attn (csrc/ms_deform_attn/kernels.cuh, launched by cuda.cu)
against the float64 reference: every dtype pair, odd D (general path) and D % 8 == 0 (vector path),
locations off the map, non-square levels, the kernels.md shapes, gradcheck, deterministic mode, CUDA graphs, device
indices, bad inputs and torch.library.opcheck. Needs a GPU and a dbsam._C built with CUDA.
"""
import pytest
import torch

from dbsam.ops import _native, ms_deform_attn, ms_deform_attn_reference

from _msda_cases import make_inputs as _make_inputs, rel_err
from _shared import no_host_sync

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if not _native.HAS_NATIVE_CUDA:
    pytest.skip("needs a CUDA GPU and dbsam._C built with CUDA kernels (DBSAM_FORCE_CUDA=1): "
                + (_native.native_reason("cuda") or "built without CUDA"), allow_module_level=True)

DEV = torch.device("cuda")
FWD = torch.ops.dbsam.ms_deform_attn_forward
BWD = torch.ops.dbsam.ms_deform_attn_backward

# (value dtype, location/weight dtype) pairs the kernels take.
COMBOS = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
COMBO_IDS = [f"{str(v)[6:]}-{str(c)[6:]}" for v, c in COMBOS]
LEVELS = [(7, 9), (4, 5), (3, 2)]  # several non-square levels, one smaller than a 2x2 cell on a side

# kernels.md shapes: name -> (Lq, levels, M, D, P)
SHAPES = {
    "dbsam_vit_from_conv": (4096, [(64, 64)], 12, 64, 4),
    "dbsam_pyramid": (4096, [(128, 128), (64, 64), (32, 32), (16, 16)], 12, 64, 4),
    "vitadapter_injector": (4096, [(128, 128), (64, 64), (32, 32)], 12, 64, 4),
    "vitadapter_injector_r05": (4096, [(128, 128), (64, 64), (32, 32)], 12, 32, 4),
    "vitadapter_extractor": (21504, [(64, 64)], 12, 64, 4),
    "detr_encoder": (17821, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 4),
    "detr_decoder": (300, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 4),
}


def make_inputs(N, Lq, M, D, shapes, P, dtype=torch.float32, coord_dtype=None, device=DEV, outside=0.2,
                seed=0, away_from_grid=True):
    """_msda_cases.make_inputs with this file's defaults: float32 on the GPU, and `away_from_grid`
    on: the location gradient jumps at integer pixel coordinates, and with millions of points (the
    kernels.md shapes) dozens land within fp32 rounding (~1e-5 px) of one, where the kernel's fp32
    coordinate and the float64 reference's can fall on different sides and pick different cells:
    an O(1) difference on those entries, ~3e-3 in the relative norm."""
    return _make_inputs(N, Lq, M, D, shapes, P, dtype=dtype, coord_dtype=coord_dtype, device=device,
                        outside=outside, seed=seed, away_from_grid=away_from_grid)


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)


def reference_fwd_bwd(value, spatial, loc, attn, grad_out):
    """float64 reference output and gradients, from exactly the (possibly rounded) inputs given."""
    v = value.detach().double().requires_grad_()
    lo = loc.detach().double().requires_grad_()
    at = attn.detach().double().requires_grad_()
    out = ms_deform_attn_reference(v, spatial, lo, at)
    gv, gl, ga = torch.autograd.grad(out, (v, lo, at), grad_out.double())
    return out.detach(), gv, gl, ga


def cuda_fwd_bwd(value, spatial, starts, loc, attn, grad_out):
    v = value.detach().clone().requires_grad_()
    lo = loc.detach().clone().requires_grad_()
    at = attn.detach().clone().requires_grad_()
    out = ms_deform_attn(v, spatial, starts, lo, at, backend="cuda")
    gv, gl, ga = torch.autograd.grad(out, (v, lo, at), grad_out)
    return out.detach(), gv, gl, ga


def check_parity(value, spatial, starts, loc, attn, seed=1, loc_tol_scale=10.0):
    N, _, M, D = value.shape
    Lq = loc.shape[1]
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(N, Lq, M * D, generator=g, dtype=torch.float64).to(DEV, value.dtype)
    ref = reference_fwd_bwd(value, spatial, loc, attn, grad_out)
    got = cuda_fwd_bwd(value, spatial, starts, loc, attn, grad_out)
    assert got[0].dtype == value.dtype and got[0].shape == (N, Lq, M * D)
    assert got[1].dtype == value.dtype and got[2].dtype == loc.dtype and got[3].dtype == attn.dtype
    t = tol(value.dtype)
    # The location gradient is a difference of corner values: allow it a little more in fp32.
    tols = (t, t, t * (loc_tol_scale if value.dtype == torch.float32 else 1.0), t)
    for name, a, b, tt in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, ref, tols):
        assert torch.isfinite(a.double()).all(), name
        err = rel_err(a, b)
        assert err < tt, f"{name}: relative error {err:.3g} >= {tt:g} ({value.dtype}, D={D})"


# ------------------------------------------------------------------------------------------------
# Parity with the float64 reference

@pytest.mark.parametrize("dtype,coord_dtype", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("D", [1, 3, 8, 30, 32, 64, 71])
def test_parity_all_dtypes(dtype, coord_dtype, D):
    inputs = make_inputs(2, 13, 3, D, LEVELS, 3, dtype=dtype, coord_dtype=coord_dtype, seed=D)
    check_parity(*inputs)


@pytest.mark.parametrize("dtype,coord_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16), (torch.float64, torch.float64)],
                         ids=["f32", "bf16-f32", "f16-f16", "f64"])
@pytest.mark.parametrize("D", [1025, 3096])
def test_parity_wide_channels(dtype, coord_dtype, D):
    # More channel chunks than lanes in a group: every lane walks several chunks.
    inputs = make_inputs(1, 5, 2, D, [(5, 6), (3, 2)], 2, dtype=dtype, coord_dtype=coord_dtype, seed=D)
    check_parity(*inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16-f32"])
def test_parity_unrestricted_locations(dtype):
    # Locations anywhere, integer pixel coordinates included: output, grad_value and grad_attn are
    # continuous there (only grad_loc jumps, see make_inputs), so they must match tightly.
    value, spatial, starts, loc, attn = make_inputs(2, 500, 4, 32, [(33, 47), (17, 24)], 4, dtype=dtype,
                                                    coord_dtype=torch.float32, seed=21, away_from_grid=False)
    go = torch.randn(2, 500, 128, device=DEV, dtype=dtype)
    ref = reference_fwd_bwd(value, spatial, loc, attn, go)
    got = cuda_fwd_bwd(value, spatial, starts, loc, attn, go)
    for name, i in (("out", 0), ("grad_value", 1), ("grad_attn", 3)):
        err = rel_err(got[i], ref[i])
        assert err < tol(dtype), f"{name}: {err:.3g}"


@pytest.mark.parametrize("N", [1, 3, 65])
def test_any_batch_size(N):
    inputs = make_inputs(N, 7, 2, 16, LEVELS, 2, dtype=torch.float32, seed=N)
    check_parity(*inputs)
    out = FWD(*inputs)
    assert out.shape == (N, 7, 32)


def test_far_outside_and_edges():
    value, spatial, starts, loc, attn = make_inputs(1, 64, 2, 16, LEVELS, 4, dtype=torch.float32, seed=3)
    loc = loc.clone()
    loc[:, :8] = 7.0       # far outside: zero output, zero gradients
    loc[:, 8:16] = -3.0
    loc[:, 16:24, ..., 0] = 0.0   # x exactly on the left border of every level (pixel -0.5)
    loc[:, 24:32, ..., 1] = 1.0   # y exactly on the bottom border
    check_parity(value, spatial, starts, loc, attn)
    out = FWD(value, spatial, starts, loc, attn)
    assert torch.count_nonzero(out[:, :16]) == 0
    go = torch.randn_like(out)
    _, gl, ga = BWD(go, value, spatial, starts, loc, attn)
    assert torch.count_nonzero(gl[:, :16]) == 0 and torch.count_nonzero(ga[:, :16]) == 0


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16-f32"])
def test_kernels_md_shapes(name, dtype):
    Lq, levels, M, D, P = SHAPES[name]
    inputs = make_inputs(1, Lq, M, D, levels, P, dtype=dtype, coord_dtype=torch.float32, outside=0.1, seed=7)
    check_parity(*inputs)


def test_misaligned_value_takes_the_general_path():
    # A contiguous value (and grad_output) whose data pointer is not 16-byte aligned cannot use
    # 16-byte loads: the kernels must fall back to the scalar path. Called directly: the public
    # API's autograd would not copy, but clone() in the helpers would realign.
    value, spatial, starts, loc, attn = make_inputs(2, 9, 2, 64, LEVELS, 2, dtype=torch.float32, seed=5)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, device=DEV, dtype=t.dtype)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        assert out.is_contiguous() and out.data_ptr() % 16 != 0
        return out

    go = torch.randn(2, 9, 128, device=DEV)
    ref = reference_fwd_bwd(value, spatial, loc, attn, go)
    out = FWD(shifted(value), spatial, starts, loc, attn)
    assert rel_err(out, ref[0]) < 1e-5
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            got = BWD(shifted(go), shifted(value), spatial, starts, loc, attn)
        finally:
            torch.use_deterministic_algorithms(False)
        for a, b in zip(got, ref[1:]):
            assert rel_err(a, b) < 1e-4


def drain():
    """Before a child process exits: let autograd's CUDA worker thread release the graphs' Python
    objects while the interpreter is still whole. The exit-time aborts of runs 3 and 4 look like the
    crash discussed in pytorch/pytorch#190489 (a worker releasing Python objects during finalization
    is pthread_exit-ed, and the forced unwind ends in std::terminate); benchmarks/exit_probe.py
    measures it with and without this."""
    import gc
    import time

    gc.collect()
    torch.cuda.synchronize()
    time.sleep(0.2)


def _run_fresh(script, **knobs):
    """Runs `script` (formatted with here=this directory) in a fresh process with the environment
    variables `knobs` set (the kernels read theirs once per process), importing dbsam exactly as
    this process did (its sys.path: the installed package, or the in-place build on PYTHONPATH).
    -X faulthandler: on the H100 (2026-11-27) one such process in four (a different setting each
    run) printed "ok" and then aborted at interpreter exit ("terminate called without an active
    exception", no Python frame); the Python stacks come back with it if it happens again."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **knobs)
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", script.format(here=here)], env=env,
                          capture_output=True, text=True, timeout=300)


_ORDER_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import test_ms_deform_attn_cuda as t
for dtype, coord, D in [(torch.float32, torch.float32, 32), (torch.bfloat16, torch.float32, 64), (torch.float32, torch.float32, 3),
                        (torch.float16, torch.float16, 8), (torch.bfloat16, torch.bfloat16, 40)]:
    t.check_parity(*t.make_inputs(2, 37, 3, D, t.LEVELS, 3, dtype=dtype, coord_dtype=coord, seed=D))
t.drain()
print("ok")
"""


@pytest.mark.parametrize("knob,setting", [("DBSAM_MSDA_ORDER", "query"), ("DBSAM_MSDA_ORDER", "head"),
                                          ("DBSAM_MSDA_LOAD_BYTES", "8"), ("DBSAM_MSDA_LOAD_BYTES", "16"),
                                          ("DBSAM_MSDA_FWD_BCAST", "0")])
def test_kernel_variants(knob, setting):
    # The kernels read their A/B variables (sample order; 8- or 16-byte loads for fp16/bf16 in both
    # directions, where the default is 16 forward and 8 backward; FWD_BCAST=0: the forward whose
    # every lane locates its point, where the default locates it once per group) once per process:
    # run each setting in a fresh one. Parity and the clean exit are asserted apart, so a failure says
    # which of the two broke (the exit-time abort: benchmarks/NOTES.md sections 8-9).
    res = _run_fresh(_ORDER_SCRIPT, **{knob: setting})
    assert "ok" in res.stdout, "parity failed:\n" + res.stdout[-2000:] + res.stderr[-4000:]
    assert res.returncode == 0, ("parity held, but the process then exited with status "
                                 f"{res.returncode}:\n" + res.stderr[-4000:])


_LOWP_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import test_ms_deform_attn_cuda as t
from _msda_cases import rel_err
# A DETR-encoder-like layout (a few contributions per value row) and a hot spot (a 2x2 level that
# every query samples: hundreds of adds per row, the worst case for rounding at every add).
for dtype, D, levels in [(torch.bfloat16, 64, [(24, 20), (12, 10), (6, 5)]), (torch.float16, 32, [(24, 20), (12, 10)]),
                         (torch.bfloat16, 8, [(16, 16), (2, 2)])]:
    value, spatial, starts, loc, attn = t.make_inputs(2, 200, 4, D, levels, 4, dtype=dtype, coord_dtype=torch.float32,
                                                      seed=D)
    g = torch.Generator().manual_seed(0)
    go = torch.randn(2, 200, 4 * D, generator=g, dtype=torch.float64).to(t.DEV, dtype)
    ref = t.reference_fwd_bwd(value, spatial, loc, attn, go)
    got = t.cuda_fwd_bwd(value, spatial, starts, loc, attn, go)
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    print(f"lowp {{dtype}} D={{D}} levels={{levels}}: relative error out {{errs[0]:.2e}} grad_value {{errs[1]:.2e}} "
          f"grad_loc {{errs[2]:.2e}} grad_attn {{errs[3]:.2e}}")
    assert errs[1] < 0.1 and max(errs[0], errs[2], errs[3]) < t.tol(dtype), errs
t.drain()
print("ok")
"""


@pytest.mark.parametrize("load_bytes", ["default", "16"])
def test_low_precision_grad_value_atomics(load_bytes):
    # DBSAM_MSDA_LOWP_ATOMICS=1 (opt-in): grad_value accumulated in bf16/fp16 with packed atomics.
    # The other outputs do not touch grad_value and keep the default tolerance. grad_value rounds at
    # every add: rows that gather hundreds of contributions (the hot-spot case) may reach a few per
    # cent, against under 2% for the default path's single rounding. The bound, 10%, is loose on
    # purpose (a packing or addressing bug shows as O(1) error); the printed errors are the figure
    # that decides whether the variant could become a default (benchmarks/NOTES.md section 8).
    knobs = {"DBSAM_MSDA_LOWP_ATOMICS": "1"}  # default: 4 channels per packed red; 16: 8
    if load_bytes != "default":
        knobs["DBSAM_MSDA_LOAD_BYTES"] = load_bytes
    res = _run_fresh(_LOWP_SCRIPT, **knobs)
    print(res.stdout)
    assert "ok" in res.stdout, "parity failed:\n" + res.stdout[-3000:] + res.stderr[-4000:]


def test_non_contiguous_inputs():
    value, spatial, starts, loc, attn = make_inputs(2, 9, 2, 16, LEVELS, 2, dtype=torch.float32, seed=6)
    v_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    assert not v_nc.is_contiguous() and not loc_nc.is_contiguous()
    torch.testing.assert_close(FWD(v_nc, spatial, starts, loc_nc, attn), FWD(value, spatial, starts, loc, attn),
                               rtol=0, atol=0)


def test_direct_op_matches_public_api():
    value, spatial, starts, loc, attn = make_inputs(2, 11, 3, 32, LEVELS, 3, dtype=torch.bfloat16,
                                                    coord_dtype=torch.float32, seed=8)
    a = ms_deform_attn(value, spatial, starts, loc, attn, backend="cuda")
    b = FWD(value, spatial, starts, loc, attn)
    assert torch.equal(a, b)
    go = torch.randn_like(b)
    gv, gl, ga = BWD(go, value, spatial, starts, loc, attn)
    assert gv.shape == value.shape and gl.shape == loc.shape and ga.shape == attn.shape


@pytest.mark.parametrize("D", [5, 4], ids=["general", "vector"])
def test_gradcheck_float64(D):
    value, spatial, starts, loc, attn = make_inputs(1, 3, 2, D, [(4, 5), (3, 2)], 2, dtype=torch.float64,
                                                    seed=11, away_from_grid=True)
    value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()

    def fn(v, lo, at):
        return ms_deform_attn(v, spatial, starts, lo, at, backend="cuda")

    # nondet_tol: grad_value is summed with atomics, so two backward passes may differ in the last
    # bits (the reentrancy check compares them); the deterministic mode test covers bitwise equality.
    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-5, rtol=1e-4, nondet_tol=1e-12)


# ------------------------------------------------------------------------------------------------
# Deterministic mode, CUDA graphs, empty inputs

@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("dtype,coord_dtype", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("D", [3, 64])
def test_deterministic_backward_is_bitwise_repeatable(deterministic, dtype, coord_dtype, D):
    # Many queries on a small map: every value row is hit by many samples (the atomic case).
    value, spatial, starts, loc, attn = make_inputs(2, 300, 4, D, [(6, 5), (3, 3)], 4, dtype=dtype,
                                                    coord_dtype=coord_dtype, seed=D)
    go = torch.randn(2, 300, 4 * D, device=DEV, dtype=dtype)
    first = BWD(go, value, spatial, starts, loc, attn)
    for _ in range(2):
        again = BWD(go, value, spatial, starts, loc, attn)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    # And it is still right. (Outside deterministic mode: the reference's grid_sample backward on
    # CUDA has no deterministic implementation and would raise.)
    torch.use_deterministic_algorithms(False)
    check_parity(value, spatial, starts, loc, attn)


def test_deterministic_matches_atomic_path():
    value, spatial, starts, loc, attn = make_inputs(1, 200, 2, 16, LEVELS, 3, dtype=torch.float64, seed=4)
    go = torch.randn(1, 200, 32, device=DEV, dtype=torch.float64)
    fast = BWD(go, value, spatial, starts, loc, attn)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = BWD(go, value, spatial, starts, loc, attn)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(fast, det):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,coord_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["f32", "bf16-f32"])
def test_cuda_graph_capture_and_replay(dtype, coord_dtype):
    value, spatial, starts, loc, attn = make_inputs(2, 50, 3, 32, LEVELS, 4, dtype=dtype, coord_dtype=coord_dtype,
                                                    seed=12)
    go = torch.randn(2, 50, 96, device=DEV, dtype=dtype)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up off the capture
        for _ in range(2):
            FWD(value, spatial, starts, loc, attn)
            BWD(go, value, spatial, starts, loc, attn)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = FWD(value, spatial, starts, loc, attn)
        gv, gl, ga = BWD(go, value, spatial, starts, loc, attn)
    for seed in (20, 21):
        new = make_inputs(2, 50, 3, 32, LEVELS, 4, dtype=dtype, coord_dtype=coord_dtype, seed=seed)
        value.copy_(new[0]), loc.copy_(new[3]), attn.copy_(new[4])
        go.copy_(torch.randn_like(go))
        graph.replay()
        torch.cuda.synchronize()
        eager_out = FWD(value, spatial, starts, loc, attn)
        eager = BWD(go, value, spatial, starts, loc, attn)
        assert torch.equal(out, eager_out)
        # Atomic accumulation order may differ between runs: equal up to rounding.
        for a, b in zip((gv, gl, ga), eager):
            torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_no_host_sync_once_the_levels_are_checked():
    """The level layout is read on the host once per (spatial_shapes, level_start_index) pair (a sync,
    remembered); after that, forward and backward through the public API never wait for the GPU."""
    value, spatial, starts, loc, attn = make_inputs(2, 50, 3, 32, LEVELS, 4, dtype=torch.bfloat16,
                                                    coord_dtype=torch.float32, seed=13)
    for t in (value, loc, attn):
        t.requires_grad_()
    ms_deform_attn(value, spatial, starts, loc, attn).sum().backward()
    torch.cuda.synchronize()
    with no_host_sync():
        out = ms_deform_attn(value, spatial, starts, loc, attn)
        torch.autograd.grad(out, [value, loc, attn], torch.ones_like(out))


@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0), (0, 0)])
def test_empty(N, Lq):
    value, spatial, starts, loc, attn = make_inputs(max(N, 1), max(Lq, 1), 2, 8, LEVELS, 2, dtype=torch.float32)
    value, loc, attn = value[:N], loc[:N, :Lq], attn[:N, :Lq]
    out = FWD(value, spatial, starts, loc, attn)
    assert out.shape == (N, Lq, 16) and out.device.type == "cuda"
    gv, gl, ga = BWD(torch.zeros_like(out), value, spatial, starts, loc, attn)
    assert gv.shape == value.shape and gl.shape == loc.shape and ga.shape == attn.shape
    assert torch.count_nonzero(gv) == 0
    out2 = ms_deform_attn(value, spatial, starts, loc, attn, backend="cuda")
    assert out2.shape == (N, Lq, 16)


# ------------------------------------------------------------------------------------------------
# Devices and bad inputs

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (cuda:1)")
def test_second_device():
    dev = torch.device("cuda:1")
    inputs = make_inputs(2, 17, 3, 32, LEVELS, 2, dtype=torch.float32, device=dev, seed=13)
    current = torch.cuda.current_device()
    out = ms_deform_attn(*inputs, backend="cuda")
    assert out.device == dev and torch.cuda.current_device() == current
    cpu = [t.cpu() for t in inputs]
    ref = ms_deform_attn_reference(cpu[0].double(), cpu[1], cpu[3].double(), cpu[4].double())
    assert rel_err(out.cpu(), ref) < 1e-5
    v = inputs[0].clone().requires_grad_()
    ms_deform_attn(v, *inputs[1:], backend="cuda").sum().backward()
    assert v.grad.device == dev
    # And with cuda:1 current while the tensors live on cuda:0.
    inputs0 = make_inputs(2, 17, 3, 32, LEVELS, 2, dtype=torch.float32, device=torch.device("cuda:0"), seed=13)
    with torch.cuda.device(1):
        out0 = FWD(*inputs0)
    assert out0.device == torch.device("cuda:0")
    torch.testing.assert_close(out0.cpu(), out.cpu(), rtol=0, atol=0)


def test_under_torch_cuda_device_context():
    last = torch.cuda.device_count() - 1
    dev = torch.device(f"cuda:{last}")
    with torch.cuda.device(last):
        inputs = make_inputs(1, 9, 2, 16, LEVELS, 2, dtype=torch.float32, device=dev, seed=14)
        value = inputs[0].clone().requires_grad_()
        out = ms_deform_attn(value, *inputs[1:], backend="cuda")
        out.sum().backward()
    assert out.device == dev and value.grad.device == dev
    cpu = [t.cpu() for t in inputs]
    ref = ms_deform_attn_reference(cpu[0].double(), cpu[1], cpu[3].double(), cpu[4].double())
    assert rel_err(out.detach().cpu(), ref) < 1e-5


def test_mixed_devices_raise_value_error():
    value, spatial, starts, loc, attn = make_inputs(1, 4, 2, 8, LEVELS, 2, dtype=torch.float32)
    with pytest.raises(ValueError):
        ms_deform_attn(value, spatial, starts, loc.cpu(), attn, backend="cuda")
    with pytest.raises(ValueError):
        ms_deform_attn(value, spatial.cpu(), starts.cpu(), loc, attn, backend="cuda")
    with pytest.raises(ValueError):
        FWD(value, spatial, starts, loc.cpu(), attn)
    with pytest.raises(ValueError):
        FWD(value, spatial, starts, loc, attn.cpu())
    out = FWD(value, spatial, starts, loc, attn)
    with pytest.raises(ValueError):
        BWD(out.cpu(), value, spatial, starts, loc, attn)


def test_bad_dtypes_and_shapes_raise():
    value, spatial, starts, loc, attn = make_inputs(1, 4, 2, 8, LEVELS, 2, dtype=torch.float32)
    with pytest.raises(TypeError):
        FWD(value, spatial, starts, loc.double(), attn.double())  # fp64 locations with an fp32 value
    with pytest.raises(TypeError):
        FWD(value, spatial.int(), starts, loc, attn)
    with pytest.raises(ValueError):
        FWD(value, spatial, starts, loc[..., :1, :, :], attn)  # L mismatch
    with pytest.raises(ValueError):
        BWD(torch.zeros(1, 4, 3, device=DEV), value, spatial, starts, loc, attn)


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck on CUDA tensors

@pytest.mark.parametrize("dtype,coord_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float64, torch.float64)], ids=["f32", "bf16-f32", "f64"])
def test_opcheck(dtype, coord_dtype):
    value, spatial, starts, loc, attn = make_inputs(2, 6, 2, 8, LEVELS, 2, dtype=dtype, coord_dtype=coord_dtype,
                                                    seed=15)
    value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()
    torch.library.opcheck(FWD.default, (value, spatial, starts, loc, attn))
    go = torch.randn(2, 6, 16, device=DEV, dtype=dtype)
    torch.library.opcheck(BWD.default, (go, value.detach(), spatial, starts, loc.detach(), attn.detach()))


def test_cuda_graph_capture_of_the_deterministic_backward():
    # The deterministic backward sorts (row, sample) keys with at::sort between its kernels. Whether
    # that sort is capturable in a CUDA graph was an open question when this was written (no GPU
    # had run it): this test answers it. Replays must equal eager bitwise (deterministic mode).
    value, spatial, starts, loc, attn = make_inputs(2, 40, 3, 32, LEVELS, 4, dtype=torch.float32, seed=31)
    go = torch.randn(2, 40, 96, device=DEV)
    torch.use_deterministic_algorithms(True)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                BWD(go, value, spatial, starts, loc, attn)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gv, gl, ga = BWD(go, value, spatial, starts, loc, attn)
        for seed in (32, 33):
            new = make_inputs(2, 40, 3, 32, LEVELS, 4, dtype=torch.float32, seed=seed)
            value.copy_(new[0]), loc.copy_(new[3]), attn.copy_(new[4])
            go.copy_(torch.randn_like(go))
            graph.replay()
            torch.cuda.synchronize()
            for a, b in zip((gv, gl, ga), BWD(go, value, spatial, starts, loc, attn)):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)
