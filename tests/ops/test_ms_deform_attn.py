"""ms_deform_attn: every backend runnable here against the float64 reference, gradients, op
registration (opcheck, torch.compile), bad inputs and edge cases. GPU backends have their own
files (test_ms_deform_attn_cuda.py, test_ms_deform_attn_triton.py); the cases there reuse
_msda_cases."""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dbsam.ops as ops
from dbsam.ops import MSDeformAttnFunction, ms_deform_attn, ms_deform_attn_reference
from dbsam.ops import _native

from _msda_cases import level_tensors, make_inputs, rel_err

needs_native = pytest.mark.skipif(not _native.HAS_NATIVE, reason=f"dbsam._C not built: {_native.LOAD_ERROR}")

# Backends that can run here on CPU tensors; the reference is compared with itself only in float64
# semantics checks below.
CPU_BACKENDS = ["cpu"] if _native.HAS_NATIVE else []
LEVELS = [(7, 9), (4, 3), (2, 5)]  # non-square, different sizes


def run_with_grads(backend, inputs, grad_out=None):
    value, spatial, starts, loc, attn = [t.detach().clone() for t in inputs]
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = ms_deform_attn(value, spatial, starts, loc, attn, backend=backend)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), value.grad, loc.grad, attn.grad


def reference_with_grads(inputs, grad_out=None):
    value, spatial, starts, loc, attn = [t.detach().double().clone() if t.is_floating_point() else t for t in inputs]
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = ms_deform_attn_reference(value, spatial, loc, attn)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.double())
    return out.detach(), value.grad, loc.grad, attn.grad


# ----------------------------------------------------------------------------------------------
# The reference itself: grid_sample semantics checked against a direct loop.

def _bilinear_loop(value, shapes, loc, attn):
    """The contract written out with Python scalars: slow, obviously right."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = torch.zeros(N, Lq, M, D, dtype=torch.float64)
    start = 0
    starts = []
    for h, w in shapes:
        starts.append(start)
        start += h * w
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for lvl, (H, W) in enumerate(shapes):
                    for p in range(P):
                        x = loc[n, q, m, lvl, p, 0].item() * W - 0.5
                        y = loc[n, q, m, lvl, p, 1].item() * H - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        for dy in (0, 1):
                            for dx in (0, 1):
                                xi, yi = x0 + dx, y0 + dy
                                if 0 <= xi < W and 0 <= yi < H:
                                    wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    row = starts[lvl] + yi * W + xi
                                    out[n, q, m] += attn[n, q, m, lvl, p] * wgt * value[n, row, m]
    return out.view(N, Lq, M * D)


def test_reference_matches_the_contract_written_out():
    shapes = [(3, 4), (2, 3)]
    value, spatial, starts, loc, attn = make_inputs(2, 3, 2, 3, shapes, 2, outside=0.4, seed=3)
    expected = _bilinear_loop(value, shapes, loc, attn)
    assert rel_err(ms_deform_attn_reference(value, spatial, loc, attn), expected) < 1e-12


# ----------------------------------------------------------------------------------------------
# Parity with the float64 reference.

@needs_native
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("D", [1, 3, 30, 71, 1025])
def test_forward_backward_float64_parity(backend, D):
    inputs = make_inputs(2, 5, 2, D, LEVELS, 3, outside=0.3, seed=D)
    out, gv, gl, ga = run_with_grads(backend, inputs)
    rout, rgv, rgl, rga = reference_with_grads(inputs)
    assert rel_err(out, rout) < 1e-12
    assert rel_err(gv, rgv) < 1e-12
    assert rel_err(ga, rga) < 1e-12
    assert rel_err(gl, rgl) < 1e-10


@needs_native
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M,D,P", [(8, 32, 4), (3, 8, 1), (1, 16, 6)])
def test_float32_parity(backend, M, D, P):
    inputs = make_inputs(3, 11, M, D, LEVELS, P, dtype=torch.float32, seed=M * D + P, away_from_grid=True)
    out, gv, gl, ga = run_with_grads(backend, inputs)
    rout, rgv, rgl, rga = reference_with_grads(inputs)
    assert rel_err(out, rout) < 1e-6
    assert rel_err(gv, rgv) < 1e-6
    assert rel_err(ga, rga) < 1e-6
    assert rel_err(gl, rgl) < 1e-5


@needs_native
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("coord", ["float32", "same"])
def test_low_precision_against_float32(backend, dtype, coord):
    coord_dtype = torch.float32 if coord == "float32" else dtype
    inputs = make_inputs(2, 16, 4, 32, LEVELS, 4, dtype=dtype, coord_dtype=coord_dtype, seed=7, away_from_grid=True)
    out, gv, gl, ga = run_with_grads(backend, inputs)
    assert out.dtype == dtype and gv.dtype == dtype and gl.dtype == coord_dtype and ga.dtype == coord_dtype
    # Compared with fp32 run on the same (rounded) inputs, and with the float64 reference.
    fp32 = [t.float() if t.is_floating_point() else t for t in inputs]
    out32, gv32, gl32, ga32 = run_with_grads(backend, fp32)
    rout, rgv, rgl, rga = reference_with_grads(inputs)
    for got, ref32, ref64 in ((out, out32, rout), (gv, gv32, rgv), (ga, ga32, rga), (gl, gl32, rgl)):
        assert rel_err(got, ref32) < 1e-2
        assert rel_err(got, ref64) < 1e-2


@needs_native
@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 3), Lq=st.integers(1, 9), M=st.integers(1, 4), D=st.integers(1, 20), P=st.integers(1, 5),
       shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
       outside=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_random_shapes_parity(N, Lq, M, D, P, shapes, outside, seed):
    inputs = make_inputs(N, Lq, M, D, shapes, P, outside=outside, seed=seed)
    out, gv, gl, ga = run_with_grads("cpu", inputs)
    rout, rgv, rgl, rga = reference_with_grads(inputs)
    assert rel_err(out, rout) < 1e-12
    assert rel_err(gv, rgv) < 1e-12
    assert rel_err(ga, rga) < 1e-12
    assert rel_err(gl, rgl) < 1e-9


@needs_native
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_gradcheck_float64(backend):
    value, spatial, starts, loc, attn = make_inputs(2, 3, 2, 4, [(5, 4), (3, 2)], 2, outside=0.25, seed=11,
                                                    away_from_grid=True)
    fn = lambda v, l, a: ms_deform_attn(v, spatial, starts, l, a, backend=backend)
    assert torch.autograd.gradcheck(fn, (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()),
                                    eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile.

@needs_native
@pytest.mark.parametrize("dtype,coord", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                         (torch.bfloat16, torch.float32)])
def test_opcheck(dtype, coord):
    value, spatial, starts, loc, attn = make_inputs(2, 4, 2, 8, LEVELS, 2, dtype=dtype, coord_dtype=coord, seed=5)
    value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()
    torch.library.opcheck(torch.ops.dbsam.ms_deform_attn_forward, (value, spatial, starts, loc, attn))
    grad = torch.randn(2, 4, 16).to(dtype)
    torch.library.opcheck(torch.ops.dbsam.ms_deform_attn_backward,
                          (grad, value.detach(), spatial, starts, loc.detach(), attn.detach()))


@needs_native
def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = ops.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    shapes = [(6, 5), (3, 3)]
    spatial, starts, S = level_tensors(shapes)
    query, value = torch.randn(2, 7, 32), torch.randn(2, S, 32)
    ref = torch.rand(2, 7, 2, 2)
    eager = module(query, ref, value, spatial, starts)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(query, ref, value, spatial, starts)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert module.sampling_offsets.weight.grad is not None


@needs_native
def test_op_compiles_with_inductor():
    torch._dynamo.reset()
    value, spatial, starts, loc, attn = make_inputs(1, 6, 2, 8, LEVELS, 2, dtype=torch.float32, seed=9)
    fn = torch.compile(lambda v, l, a: ms_deform_attn(v, spatial, starts, l, a) * 2, fullgraph=True)
    torch.testing.assert_close(fn(value, loc, attn), 2 * ms_deform_attn(value, spatial, starts, loc, attn))


# ----------------------------------------------------------------------------------------------
# Edge cases.

@needs_native
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("N,Lq", [(0, 4), (2, 0)])
def test_empty_inputs(backend, N, Lq):
    value, spatial, starts, loc, attn = make_inputs(max(N, 1), max(Lq, 1), 2, 3, LEVELS, 2, seed=2)
    value, loc, attn = value[:N], loc[:N, :Lq], attn[:N, :Lq]
    value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()
    out = ms_deform_attn(value, spatial, starts, loc, attn, backend=backend)
    assert out.shape == (N, Lq, 6)
    out.sum().backward()
    assert value.grad.shape == value.shape and loc.grad.shape == loc.shape and attn.grad.shape == attn.shape
    assert not value.grad.any()


@needs_native
def test_non_contiguous_inputs():
    value, spatial, starts, loc, attn = make_inputs(2, 5, 3, 6, LEVELS, 2, seed=4)
    # Same values through strided views.
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_t = loc.movedim(-1, 0).contiguous().movedim(0, -1)
    attn_t = attn.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    spatial_t = spatial.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (value_t, loc_t, attn_t))
    expected = ms_deform_attn(value, spatial, starts, loc, attn, backend="cpu")
    torch.testing.assert_close(ms_deform_attn(value_t, spatial_t, starts, loc_t, attn_t, backend="cpu"), expected)
    grad = torch.randn(expected.shape[::-1], dtype=expected.dtype).permute(2, 1, 0)
    assert not grad.is_contiguous()
    a = torch.ops.dbsam.ms_deform_attn_backward(grad, value_t, spatial_t, starts, loc_t, attn_t)
    b = torch.ops.dbsam.ms_deform_attn_backward(grad.contiguous(), value, spatial, starts, loc, attn)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@needs_native
def test_nonfinite_and_far_locations_contribute_nothing():
    value, spatial, starts, loc, attn = make_inputs(1, 4, 2, 5, LEVELS, 3, dtype=torch.float32, seed=6)
    bad = loc.clone()
    bad[0, 0, 0, 0, 0] = torch.tensor([float("nan"), 0.5])
    bad[0, 1, 1, 1, 2] = torch.tensor([float("inf"), float("-inf")])
    bad[0, 2, 0, 2, 1] = torch.tensor([1e30, -1e30])
    bad[0, 3, 1, 0, 0] = torch.tensor([1.0 + 1.0 / 9 * 0.5 + 1e-3, 0.5])  # just past the right edge (W=9)
    attn_cut = attn.clone()
    for idx in [(0, 0, 0, 0, 0), (0, 1, 1, 1, 2), (0, 2, 0, 2, 1), (0, 3, 1, 0, 0)]:
        attn_cut[idx] = 0
    loc_ok = torch.where(torch.isfinite(bad) & (bad.abs() < 10), bad, torch.zeros_like(bad))
    value.requires_grad_(), bad.requires_grad_()
    out = ms_deform_attn(value, spatial, starts, bad, attn, backend="cpu")
    torch.testing.assert_close(out, ms_deform_attn(value, spatial, starts, loc_ok, attn_cut, backend="cpu"))
    out.sum().backward()
    assert torch.isfinite(bad.grad).all() and torch.isfinite(value.grad).all()
    assert not bad.grad[0, 0, 0, 0, 0].any() and not bad.grad[0, 3, 1, 0, 0].any()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_both_cpu_simd_paths_match_the_reference(dtype, monkeypatch):
    # The CPU kernels exist twice, for the baseline ISA and for AVX2 + FMA, picked at run time
    # (csrc/common/cpu_simd.h); DBSAM_CPU_SIMD=baseline forces the first. Both are checked whichever
    # this machine picks by itself. D = 37: the vector loops and their scalar tails.
    assert "cpu_simd=" in _native.BUILD_INFO
    coord = torch.float32 if dtype == torch.bfloat16 else dtype
    inputs = make_inputs(2, 9, 3, 37, LEVELS, 3, dtype=dtype, coord_dtype=coord, seed=31, outside=0.3)
    ref = reference_with_grads(inputs)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for simd in ("baseline", None):
        if simd is None:
            monkeypatch.delenv("DBSAM_CPU_SIMD", raising=False)
        else:
            monkeypatch.setenv("DBSAM_CPU_SIMD", simd)
        got = run_with_grads("cpu", inputs)
        for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), got, ref):
            assert rel_err(a, b) < tol, f"{name} on the {simd or 'default'} path"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_corners_outside_the_map_read_no_value_row(dtype):
    # Points on a 3x4 map whose left, top or right corners fall outside: every value row that is
    # not an inside corner of some point holds NaN. A kernel that fetched any stand-in row for an
    # outside corner (with weight 0) would return NaN, as 0 * NaN is NaN.
    H, W = 3, 4
    spatial, starts, S = level_tensors([(H, W)])
    # (x, y) pixel coordinates, one point per query: left, top, right and bottom corners outside.
    px = torch.tensor([[-0.4, 1.2], [2.6, -0.3], [3.4, 0.5], [0.6, 2.5]])
    loc = ((px + 0.5) / torch.tensor([W, H])).view(1, 4, 1, 1, 1, 2)
    attn = torch.full((1, 4, 1, 1, 1), 0.7)
    inside = set()
    for x, y in px.tolist():
        x0, y0 = math.floor(x), math.floor(y)
        for h, w in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= h < H and 0 <= w < W:
                inside.add(h * W + w)
    assert len(inside) < S  # some rows are read by nobody
    clean = torch.randn(1, S, 1, 6, generator=torch.Generator().manual_seed(3)).to(dtype)
    poisoned = clean.clone()
    for row in set(range(S)) - inside:
        poisoned[0, row] = float("nan")
    out, gv, gl, ga = run_with_grads("cpu", (poisoned, spatial, starts, loc, attn))
    assert torch.isfinite(out).all() and torch.isfinite(gl).all() and torch.isfinite(ga).all()
    ref = run_with_grads("cpu", (clean, spatial, starts, loc, attn))
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(gl, ref[2])
    torch.testing.assert_close(ga, ref[3])


@needs_native
def test_any_batch_size_whatever_im2col_step():
    value, spatial, starts, loc, attn = make_inputs(5, 3, 2, 4, LEVELS, 2, dtype=torch.float32, seed=8)
    out = MSDeformAttnFunction.apply(value, spatial, starts, loc, attn, 2)  # 5 is not a multiple of 2
    torch.testing.assert_close(out, ms_deform_attn_reference(value, spatial, loc, attn))
    big = make_inputs(65, 2, 1, 2, [(2, 2)], 1, dtype=torch.float32, seed=1)
    assert MSDeformAttnFunction.apply(*big, 64).shape == (65, 2, 2)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument; nothing reaches a kernel.

def _good():
    return list(make_inputs(2, 3, 2, 4, [(3, 4), (2, 2)], 2, dtype=torch.float32, seed=0))


def _replace(i, t):
    args = _good()
    args[i] = t
    return args


BAD = {
    "value rank": (ValueError, "value", lambda: _replace(0, torch.randn(2, 16, 8))),
    "shapes rank": (ValueError, "value_spatial_shapes", lambda: _replace(1, torch.tensor([3, 4, 2, 2]))),
    "shapes dtype": (TypeError, "value_spatial_shapes", lambda: _replace(1, torch.tensor([[3, 4], [2, 2]], dtype=torch.int32))),
    "shapes sum": (ValueError, "value_spatial_shapes", lambda: _replace(1, torch.tensor([[3, 4], [2, 3]]))),
    "shapes nonpositive": (ValueError, "value_spatial_shapes", lambda: _replace(1, torch.tensor([[4, 4], [0, 2]]))),
    "start index": (ValueError, "value_level_start_index", lambda: _replace(2, torch.tensor([0, 11]))),
    "start index length": (ValueError, "value_level_start_index", lambda: _replace(2, torch.tensor([0]))),
    "locations rank": (ValueError, "sampling_locations", lambda: _replace(3, torch.rand(2, 3, 2, 2, 2))),
    "locations heads": (ValueError, "sampling_locations", lambda: _replace(3, torch.rand(2, 3, 3, 2, 2, 2))),
    "locations batch": (ValueError, "sampling_locations", lambda: _replace(3, torch.rand(1, 3, 2, 2, 2, 2))),
    "weights shape": (ValueError, "attention_weights", lambda: _replace(4, torch.rand(2, 3, 2, 2, 3))),
    "value dtype": (TypeError, "value", lambda: _replace(0, torch.randint(0, 5, (2, 16, 2, 4)))),
    "weights dtype": (TypeError, "attention_weights", lambda: _replace(4, torch.randint(0, 2, (2, 3, 2, 2, 2)))),
    "not a tensor": (TypeError, "attention_weights", lambda: _replace(4, [[0.5]])),
    "mixed devices": (ValueError, "sampling_locations", lambda: _replace(3, torch.rand(2, 3, 2, 2, 2, 2, device="meta"))),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_named(case):
    error, name, make = BAD[case]
    with pytest.raises(error, match=name):
        ms_deform_attn(*make())


@needs_native
def test_direct_op_call_checks_levels():
    # torch.ops.dbsam.* bypasses the Python validation: the C++ entry points check for themselves.
    args = _replace(1, torch.tensor([[3, 4], [2, 3]]))
    with pytest.raises(ValueError, match="spatial_shapes cover"):
        torch.ops.dbsam.ms_deform_attn_forward(*args)
    args = _replace(2, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="level_start_index"):
        torch.ops.dbsam.ms_deform_attn_forward(*args)
    args = _replace(3, _good()[3].double())
    with pytest.raises(TypeError, match="sampling_locations"):
        torch.ops.dbsam.ms_deform_attn_forward(*args)
    # The backward checks grad_output too: a flat one with the right number of elements is refused.
    args = _good()
    out = torch.ops.dbsam.ms_deform_attn_forward(*args)
    with pytest.raises(ValueError, match=r"grad_output must be \[N, Lq, M\*D\]"):
        torch.ops.dbsam.ms_deform_attn_backward(out.flatten(), *args)


# ----------------------------------------------------------------------------------------------
# Dispatch.

@needs_native
def test_native_autograd_is_cpp_and_returns_only_the_grads_asked_for():
    """The native op's autograd is the C++ node (csrc/ms_deform_attn/autograd.cpp), not a Python
    formula; it gives a gradient exactly where an input needs one, the same one the full backward
    gives, and records nothing for inference."""
    assert _native.has_cpp_autograd("dbsam::ms_deform_attn_forward")
    inputs = make_inputs(2, 5, 2, 8, LEVELS, 2)
    out, *full = run_with_grads("cpu", inputs)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for wanted in ([0], [3], [4], [3, 4]):  # value, locations, weights
        ts = [t.detach().requires_grad_(i in wanted) if t.is_floating_point() else t for i, t in enumerate(inputs)]
        y = ms_deform_attn(*ts, backend="cpu")
        assert "MSDeformAttnFunction" in y.grad_fn.name()
        y.backward(gout)
        for i, g in zip((0, 3, 4), full):
            if i in wanted:
                assert torch.equal(ts[i].grad, g), i
            else:
                assert ts[i].grad is None, i
    value, spatial, starts, loc, attn = inputs
    with torch.no_grad():
        assert ms_deform_attn(value.requires_grad_(), spatial, starts, loc, attn, backend="cpu").grad_fn is None
    assert ms_deform_attn(value.detach(), spatial, starts, loc, attn, backend="cpu").grad_fn is None


def test_use_backend_forces_and_restores():
    args = _good()
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
        ref = ms_deform_attn(*args)
    assert ops.get_backend() == "auto"
    torch.testing.assert_close(ms_deform_attn(*args), ref)


def test_forced_backend_that_cannot_run_raises():
    with ops.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        ms_deform_attn(*_good())
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("fastest")


def test_env_var_and_report_in_a_fresh_process(tmp_path):
    # Run away from the checkout, so `-m`/`-c` import the same dbsam this process did.
    import dbsam

    env = dict(os.environ, DBSAM_BACKEND="reference",
               PYTHONPATH=os.path.dirname(os.path.dirname(dbsam.__file__)))
    code = "import dbsam.ops as o; print(o.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "reference"
    env.pop("DBSAM_BACKEND")
    report = subprocess.run([sys.executable, "-m", "dbsam.ops"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, check=True).stdout
    assert "ms_deform_attn on cpu:" in report and "auto ->" in report
    assert ("auto -> cpu" in report) == _native.HAS_NATIVE


@needs_native
def test_module_exports():
    torch.manual_seed(0)
    module = ops.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).eval()
    spatial, starts, S = level_tensors([(6, 5), (3, 3)])
    args = (torch.randn(2, 7, 32), torch.rand(2, 7, 2, 2), torch.randn(2, S, 32), spatial, starts)
    exported = torch.export.export(module, args)
    assert any("ms_deform_attn_forward" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*args), module(*args))


@needs_native
def test_meta_tensors_give_shapes():
    """A shape-only run (the module built and called on the meta device): the native op's fake kernel
    answers, gradients included, and no level size is read (meta tensors hold none)."""
    with torch.device("meta"):
        module = ops.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    spatial = torch.tensor([[6, 5], [3, 3]], device="meta")
    starts = torch.tensor([0, 30], device="meta")
    query = torch.randn(2, 7, 32, device="meta", requires_grad=True)
    value = torch.randn(2, 39, 32, device="meta", requires_grad=True)
    out = module(query, torch.rand(2, 7, 2, 2, device="meta"), value, spatial, starts)
    assert out.shape == (2, 7, 32) and out.device.type == "meta"
    out.sum().backward()
    assert query.grad.shape == query.shape and value.grad.shape == value.shape
    assert module.sampling_offsets.weight.grad.shape == module.sampling_offsets.weight.shape


def test_level_checks_are_remembered_per_tensor_pair():
    # On the GPU the level check is a host sync, so a (shapes, starts) pair is checked once and
    # remembered; the memory is keyed on the objects and their in-place version. Meta tensors stand
    # in for CUDA ones here (no data to read, so a repeated check would fail loudly).
    from dbsam.ops.ms_deform_attn import op

    shapes = torch.tensor([[3, 4], [2, 2]], device="meta")
    starts = torch.tensor([0, 12], device="meta")
    assert not op._checked_before(shapes, starts, 16)
    op._remember_checked(shapes, starts, 16)
    assert op._checked_before(shapes, starts, 16)
    assert not op._checked_before(shapes, starts, 17)
    assert not op._checked_before(shapes, starts.clone(), 16)
    shapes.add_(0)  # an in-place change bumps the version: check again
    assert not op._checked_before(shapes, starts, 16)
    assert not op._checked_before(torch.tensor([[3, 4]]), torch.tensor([0]), 12)  # CPU: always checked


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_backward_splits_queries_when_heads_are_few(dtype):
    # With fewer (n, head) pairs than threads the CPU backward also cuts each head's queries into
    # ranges with private grad_value copies; the sum must match the one-thread result.
    coord = torch.float32 if dtype == torch.bfloat16 else dtype
    inputs = make_inputs(1, 13, 2, 5, LEVELS, 3, dtype=dtype, coord_dtype=coord, seed=21, outside=0.3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads("cpu", inputs)
        torch.set_num_threads(8)  # 2 heads, 8 threads: 4 query ranges per head
        split = run_with_grads("cpu", inputs)
    finally:
        torch.set_num_threads(threads)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    for a, b in zip(split, one):
        assert rel_err(a, b) < tol
    ref = reference_with_grads(inputs)
    for a, b in zip(split[:3], ref[:3]):
        assert rel_err(a, b) < tol
