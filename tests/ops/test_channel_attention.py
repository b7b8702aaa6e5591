"""channel_attention: parity of every backend available on CPU with the float64 reference, gradients,
low precision, validation, the module (state dict, drop-path), opcheck and torch.compile."""
import pytest
import torch
from torch import nn

import dbsam.ops as ops
from dbsam.ops import _native
from dbsam.ops.channel_attention import ChannelAttention, channel_attention, channel_attention_reference
from dbsam.ops.channel_attention.op import stat_dtype

from _ca_common import SHAPES, make_inputs, rel_err, saved_activation_bytes

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared, oversubscribed machine OpenMP
    barriers make them 10-40x slower (gradcheck: 0.4 s on one thread, 17 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


needs_native = pytest.mark.skipif(not _native.HAS_NATIVE, reason=f"dbsam._C not built: {_native.LOAD_ERROR}")
CPU_BACKENDS = ["reference", pytest.param("cpu", marks=needs_native)]


def grads_of(fn, x, ws, scale=None, seed=1):
    x = x.detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in ws]
    y = fn(x, *ws, branch_scale=scale)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [x, *ws], gy)
    return y.detach(), grads


def ref64(x, *ws, branch_scale=None):
    return channel_attention_reference(x.double(), *(w.double() for w in ws), 1e-6,
                                       branch_scale=None if branch_scale is None else branch_scale.double())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_with_float64_reference(backend, shape, dtype):
    x, ws = make_inputs(*shape, dtype=dtype)
    scale = torch.tensor([0.0, 2.0, 1.0, 1.5][: shape[0]], dtype=stat_dtype(dtype))
    for sc in (None, scale):
        y, grads = grads_of(lambda *a, **k: channel_attention(*a, **k, backend=backend), x, ws, sc)
        y_ref, grads_ref = grads_of(ref64, x, ws, sc)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        assert y.dtype == dtype
        assert rel_err(y, y_ref) < tol
        for name, g, gr in zip(["x", "ln_w", "ln_b", "dw", "fc1", "fc2", "pw"], grads, grads_ref):
            assert g.dtype == dtype and g.shape == gr.shape, name
            assert rel_err(g, gr) < 10 * tol, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wdtype", ["same", torch.float32])
def test_low_precision(backend, dtype, wdtype):
    wdtype = dtype if wdtype == "same" else wdtype
    x, ws = make_inputs(2, 7, 5, 24, 6, dtype=dtype, wdtype=wdtype)
    y, grads = grads_of(lambda *a, **k: channel_attention(*a, **k, backend=backend), x, ws)
    y_ref, grads_ref = grads_of(ref64, x, ws)  # the same (rounded) inputs, evaluated in float64
    assert y.dtype == dtype
    assert rel_err(y, y_ref) < 1e-2
    for g, gr, w in zip(grads, grads_ref, [x, *ws]):
        assert g.dtype == w.dtype
        assert rel_err(g, gr) < 3e-2


def native_op(x, *ws, branch_scale=None, residual=True):
    return torch.ops.dbsam.channel_attention_forward(x, *ws, branch_scale, 1e-6, residual)[0]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_op_ignores_an_enclosing_autocast(dtype):
    # The op picks its own compute dtypes; an autocast region around it must not recast the GEMMs
    # inside the kernel or the float32 statistics saved for backward (the Python entry point decides
    # what autocast means for the op: test_autocast_runs_the_branch_low_and_the_residual_in_float32).
    x, ws = make_inputs(2, 7, 5, 24, 6, dtype=dtype, wdtype=torch.float32)
    y, grads = grads_of(native_op, x, ws)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac, grads_ac = grads_of(native_op, x, ws)
    assert torch.equal(y_ac, y)
    for g, g_ac in zip(grads, grads_ac):
        assert torch.equal(g_ac, g)


def branch64(x, *ws, branch_scale=None):
    return channel_attention_reference(x.double(), *(w.double() for w in ws), 1e-6, residual=False,
                                       branch_scale=None if branch_scale is None else branch_scale.double())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_branch_without_residual(backend, dtype):
    """residual=False: the (scaled) branch alone, and gradients without the residual's identity."""
    x, ws = make_inputs(2, 7, 5, 24, 6, dtype=dtype, wdtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    scale = torch.tensor([0.5, 2.0], dtype=stat_dtype(dtype))
    for sc in (None, scale):
        y, grads = grads_of(lambda *a, **k: channel_attention(*a, **k, backend=backend, residual=False), x, ws, sc)
        y_ref, grads_ref = grads_of(branch64, x, ws, sc)
        tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
        assert y.dtype == dtype and rel_err(y, y_ref) < tol
        for name, g, gr in zip(["x", "ln_w", "ln_b", "dw", "fc1", "fc2", "pw"], grads, grads_ref):
            assert rel_err(g, gr) < (3e-2 if dtype == torch.bfloat16 else 10 * tol), name


class _OpDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """The dtype of x each dbsam channel_attention op call got."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "channel_attention" in str(func):
            self.seen.append((str(func.overloadpacket), args[1 if "backward" in str(func) else 0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_runs_the_branch_low_and_the_residual_in_float32(backend):
    """Under bf16 autocast a float32 x gives a float32 y = x + branch with the branch in bf16, as the
    eager composition runs there, not the whole op in float32, nor the residual rounded to bf16: x
    is large against the branch here, so a bf16 residual would miss the branch by ~|x| / 256."""
    x, ws = make_inputs(2, 7, 5, 24, 6, dtype=torch.float32)
    x = (x * 64).detach()
    y_ref, grads_ref = grads_of(ref64, x, ws)
    mode = _OpDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), mode:
        y, grads = grads_of(lambda *a, **k: channel_attention(*a, **k, backend=backend), x, ws)
    assert y.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert rel_err(y - x, y_ref - x.double()) < 2e-2  # the branch, to bf16 precision
    for name, g, gr in zip(["x", "ln_w", "ln_b", "dw", "fc1", "fc2", "pw"], grads, grads_ref):
        assert rel_err(g, gr) < 3e-2, name
    if backend == "cpu":  # the kernels ran in bf16, forward and backward
        assert mode.seen == [("dbsam.channel_attention_forward", torch.bfloat16),
                             ("dbsam.channel_attention_backward", torch.bfloat16)], mode.seen
    with torch.autocast("cpu", dtype=torch.bfloat16):  # residual=False there: the branch, in bf16
        branch = channel_attention(x, *ws, backend=backend, residual=False)
    assert branch.dtype == torch.bfloat16 and rel_err(branch, y_ref - x.double()) < 2e-2


@needs_native
def test_gradcheck_float64():
    x, ws = make_inputs(2, 4, 3, 6, 2)
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    assert torch.autograd.gradcheck(lambda *t: channel_attention(*t, backend="cpu"), (x, *ws))
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: channel_attention(*t, branch_scale=scale, backend="cpu"), (x, *ws))
    assert torch.autograd.gradcheck(lambda *t: channel_attention(*t, residual=False, backend="cpu"), (x, *ws))


@needs_native
def test_gradgrad_not_required_but_first_order_exact_on_noncontiguous_x():
    # channels-last views of an NCHW tensor (what x.permute(0, 2, 3, 1) gives) are accepted.
    x, ws = make_inputs(2, 5, 4, 8, 2)
    xv = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert not xv.is_contiguous()
    assert rel_err(channel_attention(xv, *ws, backend="cpu"), ref64(x, *ws)) < 1e-12


def test_auto_passes_over_triton_on_a_gpu_without_the_cuda_build(monkeypatch):
    """Triton is slower than the reference for this op in every H100 measurement, so `auto` on a CUDA
    device without the CUDA kernels picks the reference, while the MSDA op still picks Triton; both
    Triton backends still run when named. The device's backends are stood in for by their reasons."""
    from dbsam.ops import _backends

    reasons = {"cuda": "dbsam._C was built without CUDA kernels", "triton": "", "cpu": "CPU tensors only",
               "reference": ""}
    for op in ("channel_attention", "ms_deform_attn"):
        for backend, reason in reasons.items():
            monkeypatch.setitem(_backends._registry[op], backend, lambda device, r=reason: r)
    gpu = torch.device("cuda")
    assert _backends.resolve("channel_attention", gpu) == "reference"
    assert _backends.resolve("ms_deform_attn", gpu) == "triton"
    assert _backends.why_not("channel_attention", "triton", gpu) == ""
    assert "auto passes over it: slower than the reference" in _backends.report(("cuda",))  # python -m dbsam.ops
    with ops.use_backend("triton"):
        assert _backends.resolve("channel_attention", gpu) == "triton"


@needs_native
def test_auto_picks_cpu_and_matches():
    assert ops._backends.resolve("channel_attention", torch.device("cpu")) == "cpu"
    x, ws = make_inputs(1, 3, 3, 8, 2, dtype=torch.float32)
    with ops.use_backend("reference"):
        a = channel_attention(x, *ws)
    assert rel_err(channel_attention(x, *ws), a) < 1e-6


# ----------------------------------------------------------------------------------------------
# Validation

def _args(**over):
    x, ws = make_inputs(2, 4, 3, 8, 2, dtype=torch.float32)
    names = ["x", "ln_weight", "ln_bias", "dw_weight", "fc1_weight", "fc2_weight", "pw_weight"]
    args = dict(zip(names, [x, *ws]))
    args.update(over)
    return args


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("over, exc, word", [
    (dict(x=torch.randn(2, 4, 8)), ValueError, "x"),
    (dict(x=torch.randn(2, 4, 3, 9)), ValueError, "fc1_weight"),
    (dict(ln_weight=torch.randn(9)), ValueError, "ln_weight"),
    (dict(ln_bias=torch.randn(8, 1)), ValueError, "ln_bias"),
    (dict(dw_weight=torch.randn(8, 1, 5, 5)), ValueError, "dw_weight"),
    (dict(fc1_weight=torch.randn(2, 8)), ValueError, "fc1_weight"),
    (dict(fc2_weight=torch.randn(8, 3, 1, 1)), ValueError, "fc2_weight"),
    (dict(pw_weight=torch.randn(8, 8)), ValueError, "pw_weight"),
    (dict(pw_weight=torch.randn(8, 8, 1, 1, device="meta")), ValueError, "pw_weight"),
    (dict(x=torch.randn(2, 4, 3, 8, device="meta")), ValueError, "on meta"),
    (dict(x=torch.randint(0, 3, (2, 4, 3, 8))), TypeError, "x"),
    (dict(dw_weight=torch.randn(8, 1, 3, 3, dtype=torch.float64)), TypeError, "dw_weight"),
    (dict(x=torch.randn(2, 4, 3, 8, dtype=torch.bfloat16), fc2_weight=torch.randn(8, 2, 1, 1, dtype=torch.float16)),
     TypeError, "fc2_weight"),
    (dict(x=[1.0]), TypeError, "x"),
])
def test_bad_inputs(backend, over, exc, word):
    with pytest.raises(exc, match=word):
        channel_attention(**_args(**over), backend=backend)


def test_meta_tensors_give_shapes():
    """Everything on the meta device (a shape-only run): the output's and the gradients' shapes, no
    error from the autocast query (torch raises for device types autocast does not know)."""
    with torch.device("meta"):
        mod = ChannelAttention(24)
    x = torch.randn(3, 7, 5, 24, device="meta", requires_grad=True)
    y = mod(x)
    assert y.shape == x.shape and y.device.type == "meta"
    y.sum().backward()
    assert x.grad.shape == x.shape and mod.pwconv.weight.grad.shape == mod.pwconv.weight.shape


def test_bad_branch_scale():
    with pytest.raises(ValueError, match="branch_scale"):
        channel_attention(**_args(), branch_scale=torch.ones(3))
    with pytest.raises(TypeError, match="branch_scale"):
        channel_attention(**_args(), branch_scale=torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="residual must be a bool"):
        channel_attention(**_args(), residual=1)


@needs_native
def test_native_checks_reject_bad_calls():
    a = _args()
    with pytest.raises(ValueError, match="pw_weight"):
        torch.ops.dbsam.channel_attention_forward(a["x"], a["ln_weight"], a["ln_bias"], a["dw_weight"],
                                                  a["fc1_weight"], a["fc2_weight"], torch.randn(8, 7, 1, 1),
                                                  None, 1e-6)
    with pytest.raises(TypeError, match="x must be"):
        torch.ops.dbsam.channel_attention_forward(a["x"].int(), *list(a.values())[1:], None, 1e-6)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_native), "triton"])
def test_saves_one_map_for_backward(backend, triton_interpreter):
    """The op keeps one [B, H, W, C] map in x's dtype (the DW output) plus [B, H, W] / [B, C]
    statistics: at most a third of what the eager composition (the reference backend) keeps, the
    adapter issue's memory goal, checked here on the bytes themselves (device-independent)."""
    if ops._backends.why_not("channel_attention", backend, torch.device("cpu")):
        pytest.skip(f"{backend}: {ops._backends.why_not('channel_attention', backend, torch.device('cpu'))}")
    x, ws = make_inputs(2, 9, 7, 24, 6)
    x = x.float().requires_grad_()
    ws = [w.float().requires_grad_() for w in ws]
    saved = {}
    for b in (backend, "reference"):
        saved[b] = saved_activation_bytes(lambda: channel_attention(x, *ws, backend=b), x, ws)
    B, H, W, C = x.shape
    stats = (2 * B * H * W + B * C) * 4
    assert saved[backend] <= x.nbytes + stats, saved
    assert 3 * saved[backend] <= saved["reference"], saved


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_native), "triton"])
def test_backward_makes_no_zero_grads_for_saved_outputs(backend, triton_interpreter):
    """The forward op's outputs besides y (mean, rstd, pooled and pre, the [B, H, W, C] DW output) are
    saved state, never differentiated: autograd must not zero-fill a gradient for each of them before
    every backward (it did until 2026-11-27: a 50 MB fill per step at the ViT-B shape in bf16)."""
    from torch.profiler import ProfilerActivity, profile

    if ops._backends.why_not("channel_attention", backend, torch.device("cpu")):
        pytest.skip(f"{backend}: {ops._backends.why_not('channel_attention', backend, torch.device('cpu'))}")
    x, ws = make_inputs(2, 9, 7, 24, 6)
    x = x.float().requires_grad_()
    ws = [w.float().requires_grad_() for w in ws]
    y = channel_attention(x, *ws, backend=backend)
    gy = torch.ones_like(y)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        grads = torch.autograd.grad(y, [x, *ws], gy)
    # A materialised gradient is at::zeros, i.e. a zero_ of the output's shape.
    saved_shapes = ([2, 9, 7, 24], [2, 9, 7], [2, 24])
    zeroed = [e.input_shapes for e in prof.events()
              if e.name == "aten::zero_" and e.input_shapes and e.input_shapes[0] in saved_shapes]
    assert not zeroed, zeroed
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@needs_native
def test_native_autograd_is_cpp_and_returns_only_the_grads_asked_for():
    """The native op's autograd is the C++ node (csrc/channel_attention/autograd.cpp), not a Python
    formula; it gives a gradient exactly where an input needs one, the same one the full backward
    gives, and records nothing for inference."""
    assert _native.has_cpp_autograd("dbsam::channel_attention_forward")
    x, ws = make_inputs(2, 5, 3, 8, 2)
    y, full = grads_of(lambda *a, **k: channel_attention(*a, **k, backend="cpu"), x, ws)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for wanted in ([0], [3], [1, 6]):  # x alone, the DW weight alone, the LN weight and the 1x1 weight
        ts = [t.detach().requires_grad_(i in wanted) for i, t in enumerate([x, *ws])]
        out = channel_attention(*ts, backend="cpu")
        assert "ChannelAttentionFunction" in out.grad_fn.name()
        out.backward(gy)
        for i, t in enumerate(ts):
            if i in wanted:
                assert torch.equal(t.grad, full[i]), i
            else:
                assert t.grad is None, i
    with torch.no_grad():
        assert channel_attention(x.requires_grad_(), *ws, backend="cpu").grad_fn is None
    assert channel_attention(x.detach(), *ws, backend="cpu").grad_fn is None  # nothing needs a grad


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        channel_attention(**_args(), backend="nope")


# ----------------------------------------------------------------------------------------------
# Module

class EagerChannelAttention(nn.Module):
    """The eager composition as the original code writes it (NCHW convs, permutes)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.se = nn.Module()
        self.se.fc1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.se.fc2 = nn.Conv2d(hidden, dim, 1, bias=False)
        self.pwconv = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x):
        h = self.norm(x).permute(0, 3, 1, 2)
        h = nn.functional.gelu(self.dwconv(h))
        s = h.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.se.fc2(nn.functional.gelu(self.se.fc1(s))))
        return x + self.pwconv(h * s).permute(0, 2, 3, 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_loads_eager_state_dict(backend):
    torch.manual_seed(0)
    eager = EagerChannelAttention(24, 6).double()
    for p in eager.parameters():
        nn.init.normal_(p, 0.0, 0.3)
    mod = ChannelAttention(24).double()
    assert {k: v.shape for k, v in mod.state_dict().items()} == {k: v.shape for k, v in eager.state_dict().items()}
    mod.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(2, 7, 5, 24, dtype=torch.float64)
    with ops.use_backend(backend):
        assert rel_err(mod(x), eager(x)) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_drop_path_in_training(backend):
    torch.manual_seed(0)
    mod = ChannelAttention(16, drop_path=0.5).double()
    x = torch.randn(8, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    branch = mod.branch(x).detach()
    with ops.use_backend(backend):
        mod.train()
        y = mod(x)
        y.sum().backward()
        kept = 0
        for b in range(8):
            if torch.allclose(y[b], x[b]):
                assert torch.equal(x.grad[b], torch.ones_like(x.grad[b]))
            else:
                assert torch.allclose(y[b], x[b] + 2 * branch[b])
                kept += 1
        assert 0 < kept < 8  # with seed 0, some samples dropped and some kept
        mod.eval()
        assert torch.allclose(mod(x), x + branch)


# ----------------------------------------------------------------------------------------------
# torch.library and torch.compile

@needs_native
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "branch"])
def test_opcheck(with_scale, residual):
    x, ws = make_inputs(2, 4, 3, 8, 2, dtype=torch.float32)
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    scale = torch.tensor([0.0, 2.0]) if with_scale else None
    torch.library.opcheck(torch.ops.dbsam.channel_attention_forward.default, (x, *ws, scale, 1e-6, residual))
    y = torch.ops.dbsam.channel_attention_forward(x, *ws, scale, 1e-6, residual)
    gy = torch.randn_like(y[0])
    torch.library.opcheck(torch.ops.dbsam.channel_attention_backward.default,
                          (gy, x.detach(), *(w.detach() for w in ws), scale, *y[1:], 1e-6, residual))


@pytest.mark.parametrize("backend, compiler", [("reference", "aot_eager"),
                                               pytest.param("cpu", "aot_eager", marks=needs_native),
                                               pytest.param("cpu", "inductor", marks=needs_native)])
def test_compile_fullgraph(backend, compiler):
    torch._dynamo.reset()
    mod = ChannelAttention(16, drop_path=0.2)
    x = torch.randn(2, 5, 4, 16, requires_grad=True)
    with ops.use_backend(backend):
        expect = mod.eval()(x)
        compiled = torch.compile(mod, fullgraph=True, backend=compiler)
        got = compiled(x)
        got.sum().backward()
        mod.train()
        compiled(x).sum().backward()  # training graph with the drop-path draw
    assert rel_err(got, expect) < 1e-6
    assert x.grad is not None


@needs_native
def test_compile_fullgraph_under_autocast():
    # The autocast path (a float32 x: the branch op on bf16, the float32 residual add) in one graph.
    torch._dynamo.reset()
    mod = ChannelAttention(16).eval()
    x = torch.randn(2, 5, 4, 16, requires_grad=True)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with ops.use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        expect = mod(x)
        got = torch.compile(mod, fullgraph=True, backend=keep_graph)(x)
    assert got.dtype == torch.float32 and rel_err(got, expect) < 1e-6
    calls = [n for n in graphs[0].graph.nodes if "channel_attention_forward" in str(n.target)]
    assert len(calls) == 1 and calls[0].args[0].meta["example_value"].dtype == torch.bfloat16
    got.sum().backward()
    assert x.grad is not None


@needs_native
def test_module_exports_with_a_dynamic_batch():
    # torch.export keeps the op as one node (its fake kernel gives the shapes), so an exported ViT
    # with adapters runs our kernels; the batch stays symbolic.
    torch.manual_seed(0)
    mod = ChannelAttention(24).eval()
    for p in mod.parameters():
        nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 7, 5, 24)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(mod, (x,), dynamic_shapes={"x": {0: batch}})
    assert any("channel_attention_forward" in str(node.target) for node in exported.graph.nodes)
    for b in (2, 5):
        xb = torch.randn(b, 7, 5, 24)
        assert rel_err(exported.module()(xb), mod(xb)) < 1e-6


# ----------------------------------------------------------------------------------------------
# Property test: random small shapes, every CPU backend against the float64 reference.

from hypothesis import given, settings, strategies as st  # noqa: E402


@needs_native
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 4), H=st.integers(1, 6), W=st.integers(1, 6), C=st.integers(1, 20),
       r=st.floats(0.05, 1.0), seed=st.integers(0, 2 ** 16))
def test_random_shapes_cpu(B, H, W, C, r, seed):
    R = max(1, int(C * r))
    x, ws = make_inputs(B, H, W, C, R, seed=seed)
    y, grads = grads_of(lambda *a, **k: channel_attention(*a, **k, backend="cpu"), x, ws)
    y_ref, grads_ref = grads_of(ref64, x, ws)
    assert rel_err(y, y_ref) < 1e-12
    for g, gr in zip(grads, grads_ref):
        assert (g - gr).abs().max().item() <= 1e-10 * (1 + gr.abs().max().item())
