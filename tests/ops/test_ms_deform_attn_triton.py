"""The Triton kernels of ms_deform_attn against the float64 reference.

Triton fixes a process's mode (compiled or interpreted) when it is first imported: it jits its
own library functions (tl.sum, tl.cdiv) for the TRITON_INTERPRET of that moment. So:

CPU host: tests/conftest.py imports triton with TRITON_INTERPRET=1 (then restores the environment)
and the kernels run under the interpreter. The variable is set again per test by the autouse fixture,
never for the whole session: with it set, `auto` dispatch would pick the slow interpreter for
every other CPU test. Shapes are tiny: the interpreter runs numpy per block operation, and this
file must stay well under 2 minutes on 2 shared cores. If triton was already imported in compiled
mode (another module imported it first), the interpreter tests skip and say so. Compiled-mode
checks that need no GPU (ahead-of-time compilation for sm90, the torch.compile decomposition)
run in one subprocess.

GPU host: compiled kernels at the shapes of docs/kernels.md, fixed launch config (no autotuning
in tests), opcheck with the triton-kernel decomposition torch.compile uses, torch.compile itself,
64-bit offsets, the deterministic-mode alert.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not HAS_TRITON,
                                reason="triton is not installed (the CPU-only torch has none): the Triton "
                                       "backend is unavailable")

from dbsam.ops.ms_deform_attn import op as msda_op  # noqa: E402
from dbsam.ops.ms_deform_attn.reference import ms_deform_attn_reference  # noqa: E402
from _msda_cases import level_tensors  # noqa: E402

INTERPRETED = HAS_TRITON and __import__("dbsam.ops.ms_deform_attn.triton", fromlist=["_"])._interpreting()
# Tests that need neither the interpreter nor a GPU.
_ANY_MODE = {"test_import_without_triton", "test_compiled_mode_without_gpu"}


@pytest.fixture(autouse=True)
def _mode(request, monkeypatch):
    name = request.node.originalname
    monkeypatch.setenv("DBSAM_TRITON_AUTOTUNE", "0")
    if name.startswith("test_gpu"):
        if INTERPRETED:
            pytest.skip("triton was imported in interpreter mode (TRITON_INTERPRET=1): no compiled kernels here")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    elif name not in _ANY_MODE:
        if not INTERPRETED:
            pytest.skip("the interpreter tests need triton first imported with TRITON_INTERPRET=1 (tests/conftest.py "
                        "does that on a host without CUDA, unless triton was imported before it: run the "
                        "tests through pytest from the repository, or with TRITON_INTERPRET=1)")
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _tb():
    from dbsam.ops.ms_deform_attn import triton as triton_backend

    return triton_backend


def _inputs(N, Lq, M, D, shapes, P, *, device="cpu", seed=0, away_from_grid=False, outside=0.25):
    """float64 inputs. Locations: partly outside [0, 1] (up to `outside` beyond each side). With
    `away_from_grid`, pixel coordinates are integer + a fraction in [0.15, 0.85] (the location
    gradient jumps at integer pixel coordinates), including points whose footprint is cut by the
    border and points fully outside."""
    g = torch.Generator().manual_seed(seed)
    sh, starts, S = level_tensors(shapes)
    L = len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    if away_from_grid:
        loc = torch.empty(N, Lq, M, L, P, 2, dtype=torch.float64)
        for lvl, (H, W) in enumerate(shapes):
            for axis, size in ((0, W), (1, H)):
                pix = torch.randint(-2, size + 1, (N, Lq, M, P), generator=g).double()
                pix += 0.15 + 0.7 * torch.rand(N, Lq, M, P, generator=g, dtype=torch.float64)
                loc[:, :, :, lvl, :, axis] = (pix + 0.5) / size
    else:
        loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * outside) - outside
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64) + 0.1
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return [x.to(device) for x in (value, sh, starts, loc, attn)]


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _reference_grads(value, shapes, loc, attn, grad_out):
    v, l, a = (x.detach().double().requires_grad_() for x in (value, loc, attn))
    out = ms_deform_attn_reference(v, shapes, l, a)
    return (out,) + torch.autograd.grad(out, (v, l, a), grad_out.double())


def _triton_fwd_bwd(value, shapes, starts, loc, attn, grad_out):
    v, l, a = (x.detach().requires_grad_() for x in (value, loc, attn))
    out = msda_op.ms_deform_attn(v, shapes, starts, l, a, backend="triton")
    grads = torch.autograd.grad(out, (v, l, a), grad_out.to(out.dtype))
    return (out,) + grads


# ----------------------------------------------------------------------------------------------
# Availability and import safety.

def test_unavailable_reason_cpu(monkeypatch):
    tb = _tb()
    assert tb.unavailable_reason(torch.device("cpu")) == ""
    assert "meta" in tb.unavailable_reason(torch.device("meta"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET is not set" in tb.unavailable_reason(torch.device("cpu"))
    value, shapes, starts, loc, attn = _inputs(1, 2, 1, 2, [(2, 2)], 1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        msda_op.ms_deform_attn(value.float(), shapes, starts, loc.float(), attn.float(), backend="triton")


@pytest.mark.parametrize("N,Lq,M,D", [(1, 300, 8, 32), (8, 300, 8, 32), (1, 4096, 12, 64), (8, 4096, 12, 64),
                                      (1, 1, 1, 1025)])
def test_launch_config_fills_the_gpu(N, Lq, M, D):
    """The fixed launch config (compiled mode) keeps ~8 tile elements per thread, and shrinks
    BLOCK_Q until there are two programs per SM or BLOCK_Q is 4; the autotuner of small problems
    is a separate one. Pure arithmetic: no GPU needed."""
    tb = _tb()
    work, sms = N * M * Lq, 132
    cfg = tb._fixed_config(D, 16, interpret=False, work=work, sms=sms)
    base = tb._fixed_config(D, 16, interpret=False)
    block_q, block_d = cfg["BLOCK_Q"], max(1 << (D - 1).bit_length(), 2)
    programs = -(-work // block_q)
    assert 4 <= block_q <= base["BLOCK_Q"] and block_q & (block_q - 1) == 0
    assert programs >= 2 * sms or block_q == 4
    if block_q < base["BLOCK_Q"]:  # shrunk only as far as needed
        assert -(-work // (2 * block_q)) < 2 * sms
    assert cfg["num_warps"] == max(1, min(8, block_q * block_d // 256))
    assert tb._is_small(work, sms) == (work < 2 * sms * 128)
    if (N, Lq, M, D) == (8, 4096, 12, 64):  # the DB-SAM shape at N = 8 keeps the measured config
        assert cfg == base == {"BLOCK_Q": 32, "num_warps": 8}


def test_import_without_triton():
    # A process where `import triton` fails, like the CPU-only torch: dbsam.ops imports, and the
    # Triton backend says why it is unavailable.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, dbsam.ops\n"
            "from dbsam.ops.ms_deform_attn import triton as tb\n"
            "print(repr(tb.unavailable_reason(torch.device('cpu'))))\n"
            "print(hasattr(torch.ops.dbsam, 'ms_deform_attn_triton_forward'))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["'triton is not installed'", "False"]


# ----------------------------------------------------------------------------------------------
# Forward parity (interpreter): odd D, several non-square levels, several P, partial query blocks.

CASES = [
    # N, Lq, M, D, levels, P
    (2, 19, 2, 3, [(5, 7), (3, 4), (2, 9)], 2),
    (1, 5, 3, 1, [(4, 6)], 4),
    (1, 17, 1, 30, [(6, 3), (2, 2)], 3),
    (1, 4, 2, 71, [(3, 5)], 1),
]


@pytest.mark.parametrize("N,Lq,M,D,levels,P", CASES)
def test_forward_fp32_matches_reference(N, Lq, M, D, levels, P):
    value, shapes, starts, loc, attn = _inputs(N, Lq, M, D, levels, P, seed=D)
    ref = ms_deform_attn_reference(value, shapes, loc, attn)
    out = msda_op.ms_deform_attn(value.float(), shapes, starts, loc.float(), attn.float(), backend="triton")
    assert out.dtype == torch.float32 and out.shape == (N, Lq, M * D)
    assert _rel(out, ref) < 1e-6


def test_forward_float64_matches_reference():
    value, shapes, starts, loc, attn = _inputs(*CASES[0], seed=3)
    out = msda_op.ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")
    assert out.dtype == torch.float64
    assert _rel(out, ms_deform_attn_reference(value, shapes, loc, attn)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("coords", ["fp32", "own"])
def test_forward_low_precision(dtype, coords):
    N, Lq, M, D, levels, P = 1, 9, 2, 8, [(5, 7), (3, 4)], 2
    value, shapes, starts, loc, attn = _inputs(N, Lq, M, D, levels, P, seed=7)
    cdt = torch.float32 if coords == "fp32" else dtype
    v, l, a = value.to(dtype), loc.to(cdt), attn.to(cdt)
    out = msda_op.ms_deform_attn(v, shapes, starts, l, a, backend="triton")
    assert out.dtype == dtype
    # Against the reference on the same (rounded) inputs: only the kernel's own rounding counts.
    assert _rel(out, ms_deform_attn_reference(v.double(), shapes, l.double(), a.double())) < 1e-2


@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0)])
def test_empty(N, Lq):
    value, shapes, starts, loc, attn = _inputs(max(N, 1), max(Lq, 1), 2, 3, [(3, 4)], 2)
    value, loc, attn = value[:N].float(), loc[:N, :Lq].float(), attn[:N, :Lq].float()
    v, l, a = (x.clone().requires_grad_() for x in (value, loc, attn))
    out = msda_op.ms_deform_attn(v, shapes, starts, l, a, backend="triton")
    assert out.shape == (N, Lq, 6)
    out.sum().backward()
    assert v.grad.shape == v.shape and not v.grad.any()
    assert l.grad.shape == l.shape and a.grad.shape == a.shape


def test_points_outside_contribute_nothing():
    # On the border (x = -1 or x = W in pixels), beyond it, NaN and huge: no contribution to the
    # output, zero location and weight gradient. Checked against the same call with those samples'
    # weights zeroed.
    N, Lq, M, D, levels, P = 1, 6, 1, 4, [(3, 5)], 4
    value, shapes, starts, loc, attn = _inputs(N, Lq, M, D, levels, P, seed=5)
    value, loc, attn = value.float(), loc.float(), attn.float()
    H, W = levels[0]
    special = torch.tensor([[-0.5 / W, 0.5], [(W + 0.5) / W, 0.5], [0.5, -0.5 / H], [0.5, (H + 0.5) / H],
                            [float("nan"), 0.5], [0.5, float("nan")], [1e30, 0.5], [-1e30, -1e30]])
    loc = loc.clone()
    flat = loc.view(-1, 2)  # [N*Lq*M*L*P, 2]
    hit = torch.arange(0, 8 * 3, 3)  # every third sample
    flat[hit] = special
    weights_zeroed = attn.clone()
    weights_zeroed.view(-1)[hit] = 0
    v, l, a = (x.clone().requires_grad_() for x in (value, loc, attn))
    out = msda_op.ms_deform_attn(v, shapes, starts, l, a, backend="triton")
    expected = msda_op.ms_deform_attn(value, shapes, starts, loc, weights_zeroed, backend="triton")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(v.grad).all() and torch.isfinite(l.grad).all() and torch.isfinite(a.grad).all()
    assert not l.grad.view(-1, 2)[hit].any() and not a.grad.view(-1)[hit].any()


def test_non_contiguous_inputs():
    N, Lq, M, D, levels, P = 2, 6, 2, 5, [(3, 4), (2, 3)], 2
    value, shapes, starts, loc, attn = _inputs(N, Lq, M, D, levels, P, seed=8)
    ref = ms_deform_attn_reference(value, shapes, loc, attn)
    # Same values, strided layouts (channels and queries not innermost).
    v = value.float().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    l = loc.float().transpose(1, 2).contiguous().transpose(1, 2)
    a = attn.float().transpose(0, 1).contiguous().transpose(0, 1)
    assert not (v.is_contiguous() or l.is_contiguous() or a.is_contiguous())
    out = msda_op.ms_deform_attn(v, shapes, starts, l, a, backend="triton")
    assert _rel(out, ref) < 1e-6


def test_module_on_triton_backend():
    # The drop-in module with the triton backend forced: same output and parameter gradients as the
    # reference backend.
    import dbsam.ops
    from dbsam.ops import MSDeformAttn

    torch.manual_seed(0)
    levels = [(4, 5), (2, 3)]
    shapes, starts, S = level_tensors(levels)
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0, 0.1)
        module.attention_weights.weight.normal_(0, 0.1)
    query, src = torch.randn(2, 7, 16), torch.randn(2, S, 16)
    ref_points = torch.rand(2, 7, 2, 2)
    results = []
    for backend in ("reference", "triton"):
        module.zero_grad()
        with dbsam.ops.use_backend(backend):
            out = module(query, ref_points, src, shapes, starts)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in module.parameters()]))
    assert _rel(results[1][0], results[0][0]) < 1e-5
    for g_triton, g_ref in zip(results[1][1], results[0][1]):
        assert _rel(g_triton, g_ref) < 1e-4


# ----------------------------------------------------------------------------------------------
# Gradients against the reference (interpreter), locations away from integer pixel coordinates.

@pytest.mark.parametrize("dtype,coords,tol", [
    (torch.float32, torch.float32, 1e-5),
    (torch.bfloat16, torch.float32, 1e-2),
    (torch.bfloat16, torch.bfloat16, 1e-2),
    (torch.float16, torch.float32, 1e-2),
])
@pytest.mark.parametrize("case", [0, 2])
def test_gradients_match_reference(dtype, coords, tol, case):
    N, Lq, M, D, levels, P = CASES[case]
    value, shapes, starts, loc, attn = _inputs(N, Lq, M, D, levels, P, seed=11 + case, away_from_grid=True)
    v, l, a = value.to(dtype), loc.to(coords), attn.to(coords)
    grad_out = torch.randn(N, Lq, M * D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grad_out = grad_out.to(dtype).double()  # what the kernel sees, exactly
    got = _triton_fwd_bwd(v, shapes, starts, l, a, grad_out)
    want = _reference_grads(v, shapes, l, a, grad_out)
    for name, x, y, ref_dtype in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, want,
                                     (dtype, dtype, coords, coords)):
        assert x.dtype == ref_dtype, name
        assert _rel(x, y) < tol, f"{name}: rel err {_rel(x, y):.3g}"


@pytest.mark.parametrize("lowp", ["0", "1"])
def test_low_precision_grad_value_buffer(lowp, monkeypatch):
    # DBSAM_MSDA_LOWP_ATOMICS=1: an fp16/bf16 value's grad_value is scattered into a buffer of its own
    # dtype (the kernel's atomics take the buffer's dtype), not into fp32; fp32 values are untouched.
    # fp16 here: the interpreter has no bf16 atomics (Triton 3.8), the GPU test runs both.
    monkeypatch.setenv("DBSAM_MSDA_LOWP_ATOMICS", lowp)
    tb = _tb()
    buffers = []
    real_launch = tb._launch

    def spy(kind, tensors, *args):
        if kind == "bwd":
            buffers.append(tensors[6].dtype)
        return real_launch(kind, tensors, *args)

    monkeypatch.setattr(tb, "_launch", spy)
    N, Lq, M, D, levels, P = CASES[0]
    value, shapes, starts, loc, attn = _inputs(N, Lq, M, D, levels, P, seed=11, away_from_grid=True)
    grad_out = torch.randn(N, Lq, M * D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.float32):
        v, l, a = value.to(dtype), loc.float(), attn.float()
        g = grad_out.to(dtype).double()
        got = _triton_fwd_bwd(v, shapes, starts, l, a, g)
        want = _reference_grads(v, shapes, l, a, g)
        tol = 1e-2 if dtype == torch.float16 else 1e-5
        for name, x, y in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, want):
            assert _rel(x, y) < tol, f"{dtype} {name}: rel err {_rel(x, y):.3g}"
        assert got[1].dtype == dtype
    assert buffers == [torch.float16 if lowp == "1" else torch.float32, torch.float32]


def test_gradcheck_float64():
    # Finite differences on the kernels themselves (float64), tiny shape, away from the grid.
    value, shapes, starts, loc, attn = _inputs(1, 3, 1, 2, [(3, 4), (2, 3)], 1, seed=2, away_from_grid=True)
    f = lambda v, l, a: msda_op.ms_deform_attn(v, shapes, starts, l, a, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(x.requires_grad_() for x in (value, loc, attn)), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# opcheck. Under the interpreter the kernels are numpy code, not traceable: the triton_op
# decomposition (which hands torch.compile the kernels) is switched off there, so the aot-dispatch
# check treats the op as opaque. The GPU test below runs opcheck with the decomposition on.

def _opcheck_both(value, shapes, starts, loc, attn):
    tb = _tb()
    fwd = torch.ops.dbsam.ms_deform_attn_triton_forward
    bwd = torch.ops.dbsam.ms_deform_attn_triton_backward
    assert tb.FORWARD_OP == "dbsam::ms_deform_attn_triton_forward"
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_())
    torch.library.opcheck(fwd, args)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=value.device)
    torch.library.opcheck(bwd, (grad_out.to(value.dtype),) + tuple(x.detach() for x in args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_interpreter(dtype):
    import torch._functorch.config as functorch_config

    value, shapes, starts, loc, attn = _inputs(1, 5, 2, 3, [(3, 4), (2, 2)], 2, seed=4)
    with functorch_config.patch(decompose_custom_triton_ops=False):
        _opcheck_both(value.to(dtype), shapes, starts, loc.float(), attn.float())


# ----------------------------------------------------------------------------------------------
# Compiled mode without a GPU, in a subprocess (compiled mode cannot share a process with the
# interpreter). The interpreter runs numpy and misses compile-time errors of the real pipeline
# (three reached the first H100 runs): compile both kernels ahead of time for sm90 (Triton bundles
# ptxas) with the argument specialisation a real launch gets (CI does this with Triton 3.6 too,
# the GPU machine's); and, with a CUDA build of torch, trace the ops as torch.compile's
# AOTAutograd does, for fake CUDA tensors, checking that the triton_op bodies decompose into the
# kernels.

_COMPILED_MODE_SCRIPT = textwrap.dedent("""
    import warnings, logging
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    from dbsam.ops.ms_deform_attn import triton as tb

    assert not tb._interpreting()
    ks = tb._kernels(interpret=False)
    # bf16 at D = 64 (DB-SAM, ViT-Adapter) and fp32 at D = 32 (Deformable DETR), fixed configs.
    for vt, D in (("bf16", 64), ("fp32", 32)):
        cfg = tb._fixed_config(D, 12, interpret=False)
        common = {"shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32", "attn_ptr": "*fp32"}
        sigs = {
            "fwd": (ks.fwd, {"value_ptr": f"*{vt}", **common, "out_ptr": f"*{vt}"}),
            "bwd": (ks.bwd, {"grad_out_ptr": f"*{vt}", "value_ptr": f"*{vt}", **common, "grad_value_ptr": "*fp32",
                             "grad_loc_ptr": "*fp32", "grad_attn_ptr": "*fp32"}),
        }
        for kind, (fn, sig) in sigs.items():
            sig.update({k: "i32" for k in ("Lq", "S", "M", "D", "L", "P", "LP")})
            # A real launch takes constexpr-ness from the jitted function's annotations (lost once
            # by copying the kernel: the first GPU run failed with "arange's arguments must be
            # constexpr").
            const_names = {p.name for p in fn.params if p.is_constexpr}
            assert const_names == {"BLOCK_Q", "BLOCK_D", "ACC_FP64"}, (kind, const_names)
            sig.update({k: "constexpr" for k in ("BLOCK_Q", "BLOCK_D", "ACC_FP64")})
            # Pointers 16-byte aligned, D and Lq = 4096 divisible by 16, as Triton specialises them.
            attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig)
                     if name.endswith("_ptr") or name in ("Lq", "D")}
            consts = {"BLOCK_Q": cfg["BLOCK_Q"], "BLOCK_D": D, "ACC_FP64": False}
            ptx = triton_compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                 target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]}).asm["ptx"]
            assert "ld.global.v4" in ptx, (vt, kind)  # 16-byte channel loads (8 bf16 or 4 fp32)
            if kind == "bwd":
                assert "atom.global" in ptx or "red.global" in ptx
    print("compiled sm90")
    if torch.version.cuda is None:  # a CPU-only torch has no fake CUDA tensors to trace with
        raise SystemExit(0)

    from functorch.compile import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Without a driver Triton's mutation analysis falls back to "every input is mutated", with a
    # logged warning; the GPU run does the real analysis.
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    graphs = []

    def keep(gm, _):
        graphs.append(gm.code)
        return make_boxed_func(gm)

    def f(grad_out, v, sh, st, loc, attn):
        out = torch.ops.dbsam.ms_deform_attn_triton_forward(v, sh, st, loc, attn)
        return out, torch.ops.dbsam.ms_deform_attn_triton_backward(grad_out, v, sh, st, loc, attn)

    with FakeTensorMode():
        args = (torch.empty(2, 7, 192, device="cuda", dtype=torch.bfloat16),
                torch.empty(2, 20, 3, 64, device="cuda", dtype=torch.bfloat16),
                torch.empty(1, 2, dtype=torch.int64, device="cuda"), torch.empty(1, dtype=torch.int64, device="cuda"),
                torch.empty(2, 7, 3, 1, 4, 2, device="cuda"), torch.empty(2, 7, 3, 1, 4, device="cuda"))
        out, (gv, gl, ga) = aot_function(f, fw_compiler=keep)(*args)
    assert (out.shape, gv.dtype, gl.shape, ga.shape) == ((2, 7, 192), torch.bfloat16, (2, 7, 3, 1, 4, 2),
                                                         (2, 7, 3, 1, 4))
    assert graphs and graphs[0].count("triton_kernel_wrapper_functional(") == 2, graphs
    print("traced to triton kernels")
""")


@pytest.mark.skipif(HAS_CUDA, reason="covered by the GPU tests")
def test_compiled_mode_without_gpu(compiled_triton):
    out = compiled_triton(_COMPILED_MODE_SCRIPT)
    traced = ["traced", "to", "triton", "kernels"] if torch.version.cuda else []  # CPU torch: compile only
    assert out.split() == ["compiled", "sm90"] + traced


# ----------------------------------------------------------------------------------------------
# GPU: the same checks at the shapes of docs/kernels.md (compiled kernels, fixed config).

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

KERNELS_MD = {
    # name: N, Lq, levels, M, D, P
    "dbsam_1level": (1, 4096, [(64, 64)], 12, 64, 4),
    "dbsam_4level": (1, 4096, [(128, 128), (64, 64), (32, 32), (16, 16)], 12, 64, 4),
    "vit_adapter_injector": (1, 4096, [(128, 128), (64, 64), (32, 32)], 12, 64, 4),
    "vit_adapter_injector_r05": (1, 4096, [(128, 128), (64, 64), (32, 32)], 12, 32, 4),
    "vit_adapter_extractor": (1, 21504, [(64, 64)], 12, 64, 4),
    "detr_encoder": (2, 17821, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 4),
    "detr_decoder": (2, 300, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 4),
}


@gpu
@pytest.mark.parametrize("name", sorted(KERNELS_MD))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_md_shapes(name, dtype):
    N, Lq, levels, M, D, P = KERNELS_MD[name]
    value, shapes, starts, loc, attn = _inputs(N, Lq, M, D, levels, P, device="cuda", seed=0,
                                               away_from_grid=True)
    v, l, a = value.to(dtype), loc.float(), attn.float()
    grad_out = torch.randn(N, Lq, M * D, device="cuda", dtype=torch.float64).to(dtype).double()
    got = _triton_fwd_bwd(v, shapes, starts, l, a, grad_out)
    want = _reference_grads(v, shapes, l, a, grad_out)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name_, x, y in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, want):
        assert _rel(x, y) < tol, f"{name}/{name_}: rel err {_rel(x, y):.3g}"


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_grad_value_atomics(dtype, monkeypatch):
    # DBSAM_MSDA_LOWP_ATOMICS=1 on the GPU: 16-bit atomics into a grad_value of value's dtype. A
    # realistic layout (a few contributions per value row) and a hot spot (a 2x2 level every query
    # samples: hundreds of rounded adds per row). The 10% bound catches a wrong buffer or address
    # (O(1) errors); the printed errors are the figure that decides whether this could be a default.
    monkeypatch.setenv("DBSAM_MSDA_LOWP_ATOMICS", "1")
    for levels, D in (([(24, 20), (12, 10), (6, 5)], 64), ([(16, 16), (2, 2)], 8)):
        value, shapes, starts, loc, attn = _inputs(2, 200, 4, D, levels, 4, device="cuda", seed=D, outside=0.0)
        v, l, a = value.to(dtype), loc.float(), attn.float()
        grad_out = torch.randn(2, 200, 4 * D, device="cuda", dtype=torch.float64).to(dtype).double()
        got = _triton_fwd_bwd(v, shapes, starts, l, a, grad_out)
        want = _reference_grads(v, shapes, l, a, grad_out)
        errs = [_rel(x, y) for x, y in zip(got, want)]
        print(f"triton lowp {dtype} D={D} levels={levels}: relative error out {errs[0]:.2e} grad_value "
              f"{errs[1]:.2e} grad_loc {errs[2]:.2e} grad_attn {errs[3]:.2e}")
        assert got[1].dtype == dtype
        assert errs[1] < 0.1 and max(errs[0], errs[2], errs[3]) < 1e-2, errs


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gpu_odd_shapes(dtype):
    for N, Lq, M, D, levels, P in CASES:
        value, shapes, starts, loc, attn = _inputs(N, Lq, M, D, levels, P, device="cuda", seed=D)
        v = value.to(dtype)
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        out = msda_op.ms_deform_attn(v, shapes, starts, loc.to(cdt), attn.to(cdt), backend="triton")
        ref = ms_deform_attn_reference(v.double(), shapes, loc.to(cdt).double(), attn.to(cdt).double())
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        assert _rel(out, ref) < tol, (N, Lq, M, D, levels, P)


@gpu
def test_gpu_opcheck_and_compile():
    # opcheck with the triton_op decomposition on (what torch.compile sees), then torch.compile.
    value, shapes, starts, loc, attn = _inputs(2, 37, 4, 32, [(16, 12), (8, 6)], 4, device="cuda", seed=9)
    _opcheck_both(value.float(), shapes, starts, loc.float(), attn.float())
    _opcheck_both(value.bfloat16(), shapes, starts, loc.float(), attn.float())

    def f(v, l, a):
        return torch.ops.dbsam.ms_deform_attn_triton_forward(v, shapes, starts, l, a).square().sum()

    v, l, a = (x.float().requires_grad_() for x in (value, loc, attn))
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(v, l, a)
    grads = torch.autograd.grad(out, (v, l, a))
    v2, l2, a2 = (x.detach().clone().requires_grad_() for x in (v, l, a))
    out2 = f(v2, l2, a2)
    grads2 = torch.autograd.grad(out2, (v2, l2, a2))
    assert _rel(out, out2) < 1e-6
    for x, y in zip(grads, grads2):
        assert _rel(x, y) < 1e-5


@gpu
def test_gpu_int64_offsets():
    # N*S*M*D > 2^31: the last batch element's rows sit past 2^31 elements (4.3 GB of bf16).
    S_levels = [(128, 128)]
    M, D, P, Lq = 12, 64, 4, 16
    S = 128 * 128
    N = (2 ** 31) // (S * M * D) + 2
    if torch.cuda.get_device_properties(0).total_memory < 10 * N * S * M * D:
        pytest.skip("needs about 22 GB of GPU memory")  # value, its grad, the fp32 grad buffer
    shapes, starts, _ = level_tensors(S_levels, "cuda")
    value = torch.empty(N, S, M, D, device="cuda", dtype=torch.bfloat16).normal_()
    g = torch.Generator(device="cuda").manual_seed(0)
    loc = torch.rand(N, Lq, M, 1, P, 2, device="cuda", generator=g)
    attn = torch.rand(N, Lq, M, 1, P, device="cuda", generator=g)
    v, l, a = value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()
    out = msda_op.ms_deform_attn(v, shapes, starts, l, a, backend="triton")
    grad_out = torch.randn_like(out)
    gv, gl, ga = torch.autograd.grad(out, (v, l, a), grad_out)
    last = slice(N - 1, N)
    want = _reference_grads(value[last], shapes, loc[last], attn[last], grad_out[last].double())
    for x, y in zip((out[last], gv[last], gl[last], ga[last]), want):
        assert _rel(x, y) < 1e-2


@gpu
def test_gpu_deterministic_mode_alerts():
    # grad_value uses atomics: under torch.use_deterministic_algorithms(True) the backward must say so.
    value, shapes, starts, loc, attn = _inputs(1, 8, 2, 8, [(4, 4)], 2, device="cuda")
    v = value.float().requires_grad_()
    out = msda_op.ms_deform_attn(v, shapes, starts, loc.float(), attn.float(), backend="triton")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("warn_only", [False, True])
def test_deterministic_alert_raises_or_warns(warn_only):
    # The GPU test above reaches this through the Triton backward; here the helper itself, on any
    # host (torch has no Python binding for its own alert: the first GPU run found the one we
    # called missing).
    from dbsam.ops._backends import alert_not_deterministic

    alert_not_deterministic("x")  # determinism off: silent
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        if warn_only:
            with pytest.warns(UserWarning, match="the op under test does not have a deterministic"):
                alert_not_deterministic("the op under test")
        else:
            with pytest.raises(RuntimeError, match="the op under test does not have a deterministic"):
                alert_not_deterministic("the op under test")
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
