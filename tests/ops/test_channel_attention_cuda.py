"""channel_attention, CUDA backend (hand-written kernels in csrc/channel_attention/kernels.cuh, launched
by cuda.cu): parity with the float64 reference in every dtype, gradcheck, opcheck, drop-path scale,
stream/device rules."""
import pytest
import torch

from dbsam.ops import _native
from dbsam.ops.channel_attention import channel_attention, channel_attention_reference

from _ca_common import SHAPES, make_inputs, rel_err, saved_activation_bytes
from _shared import no_host_sync

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _native.HAS_NATIVE_CUDA, reason="dbsam._C was built without CUDA kernels"),
]

BIG = [(2, 16, 70, 96, 24), (1, 64, 64, 768, 192), (3, 33, 17, 100, 25)]
TOL = {torch.float64: (1e-12, 1e-11), torch.float32: (2e-6, 2e-5), torch.bfloat16: (1e-2, 3e-2),
       torch.float16: (2e-3, 1e-2)}


def _run(shape, dtype, wdtype=None, scale=None, backend="cuda", residual=True):
    x, ws = make_inputs(*shape, dtype=dtype, wdtype=wdtype, device="cuda")
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    y = channel_attention(x, *ws, branch_scale=scale, backend=backend, residual=residual)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(y)
    grads = torch.autograd.grad(y, [x, *ws], gy)
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in ws]
    yr = channel_attention_reference(x64, *w64, branch_scale=None if scale is None else scale.double(),
                                     residual=residual)
    gr = torch.autograd.grad(yr, [x64, *w64], gy.double())
    return y, grads, yr, gr, [x, *ws]


@pytest.mark.parametrize("shape", SHAPES + BIG, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_parity(shape, dtype):
    if dtype == torch.float64 and shape[3] > 100:
        pytest.skip("float64 on the small shapes only")
    y, grads, yr, gr, ins = _run(shape, dtype)
    tol, gtol = TOL[dtype]
    assert y.dtype == dtype and y.device.type == "cuda"
    assert rel_err(y, yr) < tol
    for g, r, w in zip(grads, gr, ins):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, r) < gtol


def _check_against_float64(shape, dtype):
    """Output and every gradient within the dtype's tolerance of the float64 reference; returns the
    output tolerance."""
    y, grads, yr, gr, _ = _run(shape, dtype)
    tol, gtol = TOL[dtype]
    assert rel_err(y, yr) < tol
    for g, r in zip(grads, gr):
        assert rel_err(g, r) < gtol
    return tol


@pytest.mark.parametrize("vec", ["1", "2", "4"])
@pytest.mark.parametrize("shape", [(2, 7, 5, 24, 6), (1, 5, 9, 30, 8), (3, 33, 17, 100, 25), (2, 64, 64, 768, 192)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_channels_per_thread(shape, dtype, vec, monkeypatch):
    """DBSAM_CA_VEC (read at every call): 1, 2 or 4 channels per thread in the [B,H,W,C] kernels (the
    default is 8 bytes per thread), or the widest that divides C (30: 2; C odd would be 1). Same
    tolerances as the default layout; the kernels themselves are also checked on the CPU, under
    emulation (tests/cpp/test_ca_kernels.cpp)."""
    monkeypatch.setenv("DBSAM_CA_VEC", vec)
    tol = _check_against_float64(shape, dtype)
    # An input view whose offset breaks the wider alignment still runs (falls back to VEC = 1).
    x, ws = make_inputs(*shape, dtype=dtype, device="cuda")
    flat = torch.cat([torch.zeros(1, dtype=dtype, device="cuda"), x.reshape(-1)])
    x_odd = flat[1:].view(x.shape)
    assert int(vec) == 1 or x_odd.data_ptr() % (int(vec) * x.element_size()) != 0
    assert rel_err(channel_attention(x_odd, *ws, backend="cuda"), channel_attention(x, *ws, backend="cuda")) < tol


@pytest.mark.parametrize("rows", ["1", "4"])
@pytest.mark.parametrize("vec", ["1", "2", "4"])
@pytest.mark.parametrize("shape", [(2, 7, 5, 24, 6), (3, 33, 17, 100, 25), (2, 64, 64, 768, 192)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_fused_grad(shape, dtype, vec, rows, monkeypatch):
    """DBSAM_CA_FUSED_GRAD=1 (read at every call): the transposed-DW kernel forms the grad at the DW
    output itself instead of reading grad_pre_kernel's map, at 1, 2 and 4 rows per thread. Same
    tolerances as the default path."""
    monkeypatch.setenv("DBSAM_CA_FUSED_GRAD", "1")
    monkeypatch.setenv("DBSAM_CA_VEC", vec)
    monkeypatch.setenv("DBSAM_CA_ROWS", rows)
    _check_against_float64(shape, dtype)


@pytest.mark.parametrize("rows", ["1", "2", "4"])
@pytest.mark.parametrize("vec", ["1", "4"])
@pytest.mark.parametrize("shape", [(2, 7, 5, 24, 6), (1, 5, 9, 32, 8), (3, 33, 17, 100, 25), (2, 64, 64, 768, 192)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_rows_per_thread(shape, dtype, vec, rows, monkeypatch):
    """DBSAM_CA_ROWS (read at every call): 1, 2 or 4 output rows per thread in dw_gelu and dw_backward
    (the default is 2 for bf16/fp16, 1 for fp32), with their row sums and weight-grad partials per
    tile of rows; H = 7, 5 and 33 leave a partial last tile. Same tolerances as the default path; the kernels are also checked on the
    CPU under emulation (tests/cpp/test_ca_kernels.cpp) in every dtype, fp16's code path is bf16's."""
    monkeypatch.setenv("DBSAM_CA_ROWS", rows)
    monkeypatch.setenv("DBSAM_CA_VEC", vec)
    _check_against_float64(shape, dtype)


def test_cuda_rows_per_thread_same_output(monkeypatch):
    """Each output pixel's DW sum is formed in the same order whatever the rows per thread, so pre
    is identical bit for bit; the pooled means, summed per tile of rows instead of per row, may differ
    in the last bits, and y with them through the gate."""
    x, ws = make_inputs(2, 33, 17, 96, 24, dtype=torch.float32, device="cuda")
    fwd = torch.ops.dbsam.channel_attention_forward
    outs = []
    for rows in ("1", "2", "4"):
        monkeypatch.setenv("DBSAM_CA_ROWS", rows)
        outs.append(fwd(x, *ws, None, 1e-6))
    for o in outs[1:]:
        assert torch.equal(o[4], outs[0][4])  # pre, the DW output
        assert torch.allclose(o[3], outs[0][3], rtol=1e-5, atol=1e-6)  # pooled means
        assert rel_err(o[0], outs[0][0]) < 1e-5


def test_cuda_saves_one_map_for_backward():
    """bf16 at 8x64x64x768, the adapter goal's shape: one map in x's dtype plus statistics, at most a
    third of what the eager composition keeps (the reference backend, which runs bf16 in float32,
    keeps more still; the benchmark compares with eager NCHW in bf16)."""
    x, ws = make_inputs(8, 64, 64, 768, 192, dtype=torch.bfloat16, device="cuda")
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    cuda = saved_activation_bytes(lambda: channel_attention(x, *ws, backend="cuda"), x, ws)
    ref = saved_activation_bytes(lambda: channel_attention(x, *ws, backend="reference"), x, ws)
    stats = (2 * 8 * 64 * 64 + 8 * 768) * 4
    assert cuda <= x.nbytes + stats and 3 * cuda <= ref, (cuda, ref, x.nbytes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_amp_weights_float32(dtype):
    y, grads, yr, gr, ins = _run((2, 16, 16, 64, 16), dtype, wdtype=torch.float32)
    assert rel_err(y, yr) < TOL[dtype][0]
    for g, r in zip(grads, gr):
        assert rel_err(g, r) < TOL[dtype][1]


def test_cuda_mixed_weight_dtypes_per_weight():
    """A direct op call may mix float32 and bf16 weights (each is x's dtype or float32): the kernels
    read each weight in its own dtype (pack_weights_kernel) and store each grad in its weight's dtype.
    The same values all in float32 must give the same output bit for bit and the same grads up to
    the bf16 grads' final rounding."""
    x, ws = make_inputs(2, 9, 7, 40, 10, dtype=torch.bfloat16, wdtype=torch.float32, device="cuda")
    mixed = [w.to(torch.bfloat16) if i % 2 else w for i, w in enumerate(ws)]  # ln_bias, fc1, pw in bf16
    as_f32 = [w.float() for w in mixed]  # the same values, all float32
    fwd, bwd = torch.ops.dbsam.channel_attention_forward, torch.ops.dbsam.channel_attention_backward
    out_m, out_f = fwd(x, *mixed, None, 1e-6), fwd(x, *as_f32, None, 1e-6)
    for a, b in zip(out_m, out_f):
        assert torch.equal(a, b)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x)
    g_m = bwd(gy, x, *mixed, None, *out_m[1:], 1e-6)
    g_f = bwd(gy, x, *as_f32, None, *out_f[1:], 1e-6)
    assert torch.equal(g_m[0], g_f[0])
    for gm, gf, w in zip(g_m[1:], g_f[1:], mixed):
        assert gm.dtype == w.dtype and gm.shape == w.shape
        assert torch.equal(gm, gf.to(w.dtype))


def test_cuda_empty_batch():
    x, ws = make_inputs(0, 4, 3, 8, 2, dtype=torch.float32, device="cuda")
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    y = channel_attention(x, *ws, backend="cuda")
    assert y.shape == x.shape
    grads = torch.autograd.grad(y, [x, *ws], torch.randn_like(y))
    for g, w in zip(grads, [x, *ws]):
        assert g.shape == w.shape and g.dtype == w.dtype and not g.abs().sum().item()


def test_cuda_graph_capture_and_replay():
    """The op's forward and backward are capturable (no host sync, no host-side allocation decisions
    that change between replays): a graph of both, replayed on new inputs, matches eager calls. For
    callers whose steps are host-bound (the H100 runs at B = 1), a CUDA graph removes the host cost."""
    fwd, bwd = torch.ops.dbsam.channel_attention_forward, torch.ops.dbsam.channel_attention_backward
    x, ws = make_inputs(2, 9, 7, 40, 10, dtype=torch.bfloat16, wdtype=torch.float32, device="cuda")
    scale = torch.tensor([1.0, 0.5], device="cuda")
    gy = torch.randn_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture
        for _ in range(2):
            saved = fwd(x, *ws, scale, 1e-6)
            bwd(gy, x, *ws, scale, *saved[1:], 1e-6)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd(x, *ws, scale, 1e-6)
        grads = bwd(gy, x, *ws, scale, *out[1:], 1e-6)
    for seed in (3, 4):
        nx, nws = make_inputs(2, 9, 7, 40, 10, dtype=torch.bfloat16, wdtype=torch.float32, seed=seed, device="cuda")
        x.copy_(nx)
        for w, nw in zip(ws, nws):
            w.copy_(nw)
        gy.copy_(torch.randn_like(gy))
        graph.replay()
        torch.cuda.synchronize()
        e_out = fwd(x, *ws, scale, 1e-6)
        e_grads = bwd(gy, x, *ws, scale, *e_out[1:], 1e-6)
        for a, b in zip(out + grads, e_out + e_grads):
            # Our kernels are deterministic; cuBLAS may pick another algorithm under capture.
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_cuda_no_host_sync():
    """Forward and backward through the public API never wait for the GPU (a sync in a host-bound
    op costs the whole queue)."""
    x, ws = make_inputs(2, 9, 7, 40, 10, dtype=torch.bfloat16, device="cuda")
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    channel_attention(x, *ws, backend="cuda").sum().backward()  # first call: lazy setup may sync
    torch.cuda.synchronize()
    with no_host_sync():
        y = channel_attention(x, *ws, backend="cuda")
        torch.autograd.grad(y, [x, *ws], torch.ones_like(y))


def test_cuda_branch_scale():
    scale = torch.tensor([0.0, 2.0, 1.25], device="cuda")
    y, grads, yr, gr, _ = _run((3, 5, 6, 24, 6), torch.float32, scale=scale)
    assert rel_err(y, yr) < 2e-6
    for g, r in zip(grads, gr):
        assert rel_err(g, r) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 6, 24, 6), (2, 64, 64, 768, 192)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_branch_without_residual(shape, dtype):
    # residual=False: the GEMM writes y (no copy of x, beta 0) and ln_backward adds no grad_y.
    scale = torch.tensor([0.5, 2.0, 1.25][: shape[0]], device="cuda")
    y, grads, yr, gr, _ = _run(shape, dtype, scale=scale, residual=False)
    tol, gtol = TOL[dtype]
    assert rel_err(y, yr) < tol
    for g, r in zip(grads, gr):
        assert rel_err(g, r) < gtol


def test_cuda_autocast_runs_the_branch_in_bf16():
    # A float32 x under bf16 autocast (DB-SAM's ViT tokens): float32 y, the branch to bf16 precision,
    # the residual in float32 (x large against the branch), the kernels in bf16.
    x, ws = make_inputs(2, 64, 64, 768, 192, dtype=torch.float32, device="cuda")
    x = x * 64
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = channel_attention(x, *ws, backend="cuda")
    branch = channel_attention_reference(x.double(), *(w.double() for w in ws), residual=False)
    assert y.dtype == torch.float32 and rel_err(y - x, branch) < 2e-2


def test_cuda_gradcheck():
    x, ws = make_inputs(2, 4, 3, 6, 2, device="cuda")
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    assert torch.autograd.gradcheck(lambda *t: channel_attention(*t, backend="cuda"), (x, *ws))
    assert torch.autograd.gradcheck(lambda *t: channel_attention(*t, backend="cuda", residual=False), (x, *ws))


def test_cuda_opcheck():
    x, ws = make_inputs(2, 4, 3, 8, 2, dtype=torch.float32, device="cuda")
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    torch.library.opcheck(torch.ops.dbsam.channel_attention_forward.default, (x, *ws, None, 1e-6))
    torch.library.opcheck(torch.ops.dbsam.channel_attention_forward.default, (x, *ws, None, 1e-6, False))


def test_cuda_matches_cpu_kernel():
    x, ws = make_inputs(2, 9, 7, 40, 10, dtype=torch.float32)
    a = channel_attention(x, *ws, backend="cpu")
    b = channel_attention(x.cuda(), *(w.cuda() for w in ws), backend="cuda")
    assert rel_err(b.cpu(), a) < 2e-6


def test_cuda_side_stream_and_device_index():
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x, ws = make_inputs(2, 8, 8, 32, 8, dtype=torch.float32, device=dev)
    ref = channel_attention_reference(x, *ws)
    s = torch.cuda.Stream(device=dev)
    with torch.cuda.device(0), torch.cuda.stream(s):
        y = channel_attention(x, *ws, backend="cuda")
    s.synchronize()
    assert y.device == dev
    assert rel_err(y, ref) < 2e-6


def test_cuda_mixed_devices_rejected():
    x, ws = make_inputs(1, 3, 3, 8, 2, dtype=torch.float32, device="cuda")
    ws[2] = ws[2].cpu()
    with pytest.raises(ValueError, match="dw_weight"):
        channel_attention(x, *ws)


def test_cuda_compile_fullgraph():
    from dbsam.ops.channel_attention import ChannelAttention

    torch._dynamo.reset()
    mod = ChannelAttention(64, drop_path=0.1).cuda()
    x = torch.randn(2, 16, 16, 64, device="cuda", requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True)
    compiled(x).sum().backward()
    mod.eval()
    assert rel_err(compiled(x), mod(x)) < 1e-6
