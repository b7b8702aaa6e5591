"""channel_attention, Triton backend: parity with the float64 reference. On a CUDA GPU it runs the
compiled kernels; without one it runs them in the Triton interpreter (TRITON_INTERPRET=1, set only
for this module's tests) on tiny shapes."""
import os
import subprocess
import textwrap
import sys

import pytest
import torch

from _ca_common import make_inputs, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Without a GPU the kernels run in the Triton interpreter, which must be on when triton is first
# imported: tests/conftest.py imports it so, and `triton_interpreter` sets TRITON_INTERPRET=1 again
# while each test runs, so other modules' dispatch is unaffected.
triton = pytest.importorskip("triton", reason="triton is not installed")
if DEVICE == "cpu" and type(triton.language.sum).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set (run the tests through pytest "
                "from the repository, or with TRITON_INTERPRET=1)", allow_module_level=True)

from dbsam.ops.channel_attention import channel_attention, channel_attention_reference  # noqa: E402


@pytest.fixture(autouse=True)
def interpret_on_cpu(triton_interpreter):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; avoids OpenMP barrier stalls on a shared machine
    yield
    torch.set_num_threads(n)


def _check(shape, dtype, wdtype=None, scale=None, tol=2e-6, gtol=2e-5, residual=True):
    x, ws = make_inputs(*shape, dtype=dtype, wdtype=wdtype, device=DEVICE)
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    y = channel_attention(x, *ws, branch_scale=scale, backend="triton", residual=residual)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(y)
    grads = torch.autograd.grad(y, [x, *ws], gy)
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in ws]
    yr = channel_attention_reference(x64, *w64, branch_scale=None if scale is None else scale.double(),
                                     residual=residual)
    gr = torch.autograd.grad(yr, [x64, *w64], gy.double())
    assert y.dtype == dtype
    assert rel_err(y, yr) < tol
    for g, r, w in zip(grads, gr, [x, *ws]):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, r) < gtol


SHAPES = [(1, 7, 5, 24, 6), (2, 3, 2, 5, 1)] if DEVICE == "cpu" else \
    [(1, 7, 5, 24, 6), (2, 3, 2, 5, 1), (3, 16, 70, 96, 24), (2, 64, 64, 768, 192)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_float32(shape):
    _check(shape, torch.float32)


def test_triton_branch_scale():
    _check((2, 3, 2, 5, 1), torch.float32, scale=torch.tensor([0.0, 2.0], device=DEVICE))


def test_triton_branch_without_residual():
    _check((2, 3, 2, 5, 1), torch.float32, residual=False)
    _check((2, 3, 2, 5, 1), torch.float32, scale=torch.tensor([0.5, 2.0], device=DEVICE), residual=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision(dtype):
    _check((1, 4, 3, 16, 4), dtype, wdtype=torch.float32, tol=1e-2, gtol=3e-2)


def test_triton_ignores_an_enclosing_autocast():
    # The torch calls between the Triton kernels must keep the op's own dtypes under bf16 autocast
    # (the Python entry point decides what autocast means for the op; below).
    from dbsam.ops.channel_attention import triton as ca_triton

    x, ws = make_inputs(2, 5, 4, 16, 4, dtype=torch.float32, device=DEVICE)
    y = ca_triton.channel_attention_triton(x, *ws, None, 1e-6)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y_ac = ca_triton.channel_attention_triton(x, *ws, None, 1e-6)
    assert y_ac.dtype == torch.float32 and torch.equal(y_ac, y)


def test_triton_under_autocast_runs_the_branch_low():
    # As the native backends (test_channel_attention.py): a float32 y, the branch to bf16 precision,
    # the residual added in float32 (x large against the branch: a bf16 residual would miss by far).
    x, ws = make_inputs(1, 7, 5, 24, 6, dtype=torch.float32, device=DEVICE)
    x = x * 64
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = channel_attention(x, *ws, backend="triton")
    branch = channel_attention_reference(x.double(), *(w.double() for w in ws), residual=False)
    assert y.dtype == torch.float32 and rel_err(y - x, branch) < 2e-2


def test_triton_rejects_float64():
    x, ws = make_inputs(1, 2, 2, 4, 1, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        channel_attention(x, *ws, backend="triton")


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import dbsam.ops, torch; "
            "from dbsam.ops import _backends; "
            "r = _backends.why_not('channel_attention', 'triton', torch.device('cpu')); "
            "assert 'not importable' in r, r; print('ok')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


_COMPILE_SM90 = textwrap.dedent("""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    from dbsam.ops.channel_attention import _triton_kernels as K

    floats = {"eps", "inv_hw"}
    ints = {"P", "C", "H", "W", "NWB", "total", "HWC"}
    consts = {"BLOCK_P": 16, "BLOCK_C": 64, "BLOCK_W": 16, "BLOCK": 1024, "WRITE_D": True, "WRITE_SUM": True,
              "RESIDUAL": True}
    names = [n for n, f in vars(K).items() if n.endswith("_kernel") and hasattr(f, "params")]
    for name in sorted(names):
        fn = getattr(K, name)
        sig = {}
        for p in fn.params:
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name in floats:
                sig[p.name] = "fp32"
            elif p.name in ints:
                sig[p.name] = "i32"
            else:
                sig[p.name] = "*fp32"
        cvals = {k: consts[k] for k, t in sig.items() if t == "constexpr"}
        triton_compile(ASTSource(fn=fn, signature=sig, constexprs=cvals), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
        print(name)
""")


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_sm90_without_a_gpu(compiled_triton):
    # The interpreter runs the kernels as numpy and accepts what the compiler rejects (a plain
    # float global read inside a kernel failed the first GPU run): compile each kernel for sm90 in
    # a fresh process without TRITON_INTERPRET (Triton bundles ptxas; no GPU is needed).
    assert compiled_triton(_COMPILE_SM90).split() == ["dw_backward_kernel", "dw_gelu_kernel", "gate_dot_kernel",
                                                      "grad_pre_kernel", "ln_backward_kernel", "ln_stats_kernel"]


def test_triton_opcheck():
    from dbsam.ops.channel_attention import triton as ca_triton

    ca_triton._register()
    x, ws = make_inputs(2, 3, 2, 5, 1, dtype=torch.float32, device=DEVICE)
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    torch.library.opcheck(torch.ops.dbsam.channel_attention_triton_forward.default, (x, *ws, None, 1e-6))
    torch.library.opcheck(torch.ops.dbsam.channel_attention_triton_forward.default, (x, *ws, None, 1e-6, False))


def test_triton_compile_fullgraph():
    from dbsam.ops import use_backend
    from dbsam.ops.channel_attention import ChannelAttention

    torch._dynamo.reset()
    mod = ChannelAttention(8, drop_path=0.2).to(DEVICE)
    x = torch.randn(2, 3, 4, 8, device=DEVICE, requires_grad=True)
    with use_backend("triton"):
        compiled = torch.compile(mod, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
        compiled(x).sum().backward()
        mod.eval()
        assert rel_err(compiled(x), mod(x)) < 1e-6
