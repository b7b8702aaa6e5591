"""The ViT attention through SDPA (dbsam/model/vit_attention.py) against segment_anything's own.

The rel-pos tables are zero at init (SAM's rel_pos_zero_init): every test fills them with noise
first, or the folded rel-pos terms would be checked against zeros.
"""
import pytest
import torch

pytest.importorskip("segment_anything")

from segment_anything.modeling.image_encoder import Attention  # noqa: E402

from dbsam.model.vit_attention import (SDPARelPosAttention, fold_rel_pos, rel_pos_attention,  # noqa: E402
                                      set_vit_attention)

# (H, W) of the tokens, input_size the rel-pos tables were built for (a mismatch takes SAM's
# interpolation path), whether rel-pos is used.
CASES = [
    pytest.param((6, 5), (6, 5), True, id="global-6x5"),
    pytest.param((7, 7), (4, 4), True, id="interpolated-7x7-from-4x4"),
    pytest.param((1, 3), (1, 3), True, id="one-row"),
    pytest.param((5, 4), (5, 4), False, id="no-rel-pos"),
]


def sam_attention(dim=32, heads=4, input_size=(6, 5), use_rel_pos=True, dtype=torch.float64):
    a = Attention(dim, num_heads=heads, use_rel_pos=use_rel_pos, input_size=input_size).to(dtype)
    if use_rel_pos:
        with torch.no_grad():
            a.rel_pos_h.normal_()
            a.rel_pos_w.normal_()
    return a


def forward_and_grads(attn, x, impl):
    set_vit_attention(attn, impl)
    x = x.detach().requires_grad_()
    out = attn(x)
    # Random weights, not out.sum(): every output then counts differently in the gradients.
    weights = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * weights).sum(), [x] + list(attn.parameters()))
    return out.detach(), grads


@pytest.mark.parametrize("size,input_size,use_rel_pos", CASES)
def test_sdpa_matches_sam_float64(size, input_size, use_rel_pos):
    attn = sam_attention(input_size=input_size, use_rel_pos=use_rel_pos)
    x = torch.randn(3, *size, 32, dtype=torch.float64)
    ref, ref_grads = forward_and_grads(attn, x, "sam")
    out, grads = forward_and_grads(attn, x, "sdpa")
    assert type(attn) is SDPARelPosAttention
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    names = ["x"] + [n for n, _ in attn.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11, msg=name)


def sam_scores(attn, q, k, size):
    """SAM's score matrix (B, heads, N, N) for q, k (B, heads, N, hd): scale, then its rel-pos terms."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    B, heads, N, hd = q.shape
    flat_q, flat_k = q.reshape(B * heads, N, hd), k.reshape(B * heads, N, hd)
    scores = add_decomposed_rel_pos((flat_q * attn.scale) @ flat_k.transpose(-2, -1), flat_q, attn.rel_pos_h,
                                    attn.rel_pos_w, size, size)
    return scores.reshape(B, heads, N, N)


def test_folded_scores_are_sams_scores():
    """<q', k'> is SAM's score matrix, rel-pos and scale included, and the head width is padded to 8."""
    attn = sam_attention()
    B, heads, (H, W), hd = 2, 4, (6, 5), 8
    q, k = torch.randn(2, B, heads, H * W, hd, dtype=torch.float64)
    q2, k2 = fold_rel_pos(q, k, attn.rel_pos_h, attn.rel_pos_w, (H, W), attn.scale)
    assert q2.shape[-1] == k2.shape[-1] == 24  # 8 + 6 + 5 = 19 -> 24
    torch.testing.assert_close(q2 @ k2.transpose(-2, -1), sam_scores(attn, q, k, (H, W)))


@pytest.mark.parametrize("pad_value", [True, False], ids=["v-padded", "v-as-is"])
def test_value_width_either_way(pad_value):
    """v padded to q's width (a CPU's flash kernel) or left as it is (CUDA's memory-efficient kernel;
    on a CPU the math fallback takes it): the same attention."""
    attn = sam_attention()
    q, k, v = torch.randn(3, 2, 4, 30, 8, dtype=torch.float64)
    ref = sam_scores(attn, q, k, (6, 5)).softmax(-1) @ v
    out = rel_pos_attention(q, k, v, attn.rel_pos_h, attn.rel_pos_w, (6, 5), attn.scale, pad_value=pad_value)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_pad_value_default(monkeypatch):
    from dbsam.model.vit_attention import _pad_value_default

    cpu = torch.zeros(1)
    monkeypatch.delenv("DBSAM_SDPA_PAD_V", raising=False)
    assert _pad_value_default(cpu)
    cuda_like = type("CudaLike", (), {"is_cuda": True})()
    assert not _pad_value_default(cuda_like)
    monkeypatch.setenv("DBSAM_SDPA_PAD_V", "1")
    assert _pad_value_default(cuda_like) and _pad_value_default(cpu)


def test_float32_and_bf16_autocast_track_float64():
    """In fp32 and under bf16 autocast the SDPA version is as close to the float64 result as SAM's
    own (the folded scores are accumulated in fp32 inside the kernel, SAM adds bf16 rel-pos terms to
    a bf16 score matrix)."""
    attn = sam_attention(input_size=(8, 8))
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64)
    exact, _ = forward_and_grads(attn, x, "sam")
    attn32, x32 = attn.float(), x.float()
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        errors = {}
        for impl in ("sam", "sdpa"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out, _ = forward_and_grads(attn32, x32, impl)
            errors[impl] = ((out.double() - exact).abs().max() / exact.abs().max()).item()
        print(dtype, "relative max error vs float64:", errors)
        assert errors["sdpa"] < bound
        assert errors["sdpa"] <= 2 * errors["sam"] + 1e-6


def test_switch_keeps_parameters_and_rejects_unknown():
    attn = sam_attention()
    before = {n: p for n, p in attn.named_parameters()}
    set_vit_attention(attn, "sdpa")
    assert {n: p for n, p in attn.named_parameters()} == before  # the same Parameter objects
    with pytest.raises(ValueError, match="vit_attention must be one of"):
        set_vit_attention(attn, "flash")


def test_model_switches_at_run_time(tiny, tiny_batch):
    """The whole tiny model with either attention: same logits and gradients; SDPA is the default."""
    from dbsam.model import DBSAMConfig

    assert DBSAMConfig().vit_attention == "sdpa" and tiny.vit_attention == "sdpa"
    with pytest.raises(ValueError, match="vit_attention"):
        DBSAMConfig(vit_attention="xformers")
    images, boxes = tiny_batch
    tiny.eval()
    with torch.no_grad():
        for name, p in tiny.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    keys = set(tiny.state_dict())
    results = {}
    for impl in ("sam", "sdpa"):
        tiny.set_vit_attention(impl).zero_grad(set_to_none=True)
        low, iou = tiny(images, boxes)
        (low.sigmoid().mean() + iou.mean()).backward()
        results[impl] = low.detach(), {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}
    assert set(tiny.state_dict()) == keys
    torch.testing.assert_close(results["sdpa"][0], results["sam"][0], rtol=1e-4, atol=1e-5)
    assert results["sdpa"][1].keys() == results["sam"][1].keys()
    for n, g in results["sam"][1].items():
        torch.testing.assert_close(results["sdpa"][1][n], g, rtol=1e-3, atol=1e-5, msg=n)


def test_frozen_tables_are_kept_and_follow_the_parameters():
    """A frozen attention (DB-SAM's ViT) keeps its rel-pos tables between calls and makes new ones
    when a parameter changes in place (an optimiser step, load_state_dict) or q's dtype changes; the
    result stays SAM's throughout."""
    attn = set_vit_attention(sam_attention().requires_grad_(False), "sdpa")
    x = torch.randn(2, 6, 5, 32, dtype=torch.float64)
    attn(x)
    tables = attn._rel_pos_tables
    attn(x)
    assert attn._rel_pos_tables is tables
    with torch.no_grad():
        attn.rel_pos_h.normal_()
    out = attn(x)
    assert attn._rel_pos_tables is not tables
    torch.testing.assert_close(out, set_vit_attention(attn, "sam")(x), rtol=1e-10, atol=1e-12)
    state = {k: torch.randn_like(v) for k, v in attn.state_dict().items()}
    attn.load_state_dict(state)
    out = set_vit_attention(attn, "sdpa")(x)
    torch.testing.assert_close(out, set_vit_attention(attn, "sam")(x), rtol=1e-10, atol=1e-12)
    set_vit_attention(attn, "sdpa")
    attn.rel_pos_w = torch.nn.Parameter(torch.randn_like(attn.rel_pos_w), requires_grad=False)
    out = attn(x)
    torch.testing.assert_close(out, set_vit_attention(attn, "sam")(x), rtol=1e-10, atol=1e-12)
    attn32 = set_vit_attention(attn.float(), "sdpa")
    out32 = attn32(x.float())
    assert attn32._rel_pos_tables[1].Rh_t.dtype == torch.float32
    # Against the float64 result: fp32 rounding relative to the output's scale (|out| reaches ~100 with
    # these random parameters), as SAM's own fp32 forward has it.
    torch.testing.assert_close(out32.double(), out, rtol=1e-5, atol=1e-5 * out.abs().max().item())


def test_tables_needing_a_gradient_are_never_kept():
    attn = set_vit_attention(sam_attention(), "sdpa")
    attn(torch.randn(2, 6, 5, 32, dtype=torch.float64))
    assert getattr(attn, "_rel_pos_tables", None) is None


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_compiles_in_one_graph(frozen):
    torch._dynamo.reset()
    attn = set_vit_attention(sam_attention(dtype=torch.float32).requires_grad_(not frozen), "sdpa")
    x = torch.randn(2, 6, 5, 32, requires_grad=True)
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, attn(x))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the fused SDPA kernels (flash, memory-efficient) need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 64, 64, 768, 12, 64), (50, 14, 14, 768, 12, 14)],
                         ids=["vitb-global", "vitb-window"])
@pytest.mark.parametrize("pad_v", ["0", "1"], ids=["v-as-is", "v-padded"])
def test_gpu_uses_a_fused_kernel(shape, dtype, pad_v, monkeypatch):
    """At ViT-B's shapes a fused kernel takes the folded q', k', v (the math fallback, which would
    store the scores again, is excluded: SDPA raises if no fused kernel accepts them), forward and
    backward, and agrees with SAM's attention; v as it is and widened to q's width
    (DBSAM_SDPA_PAD_V=1, where FlashAttention becomes eligible)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    monkeypatch.setenv("DBSAM_SDPA_PAD_V", pad_v)

    B, H, W, C, heads, size = shape
    torch.manual_seed(0)
    attn = sam_attention(C, heads, (size, size), dtype=torch.float32).cuda()
    with torch.no_grad():
        attn.rel_pos_h.mul_(0.1)
        attn.rel_pos_w.mul_(0.1)
    x = torch.randn(B, H, W, C, device="cuda")
    weights = None
    outs = {}
    for impl in ("sam", "sdpa"):
        set_vit_attention(attn, impl)
        xi = x.clone().requires_grad_()
        fused = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), fused:
            out = attn(xi)
        if weights is None:  # O(1) gradients at every input (a mean would make them ~1e-7: untestable)
            weights = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        (out.float() * weights).sum().backward()
        outs[impl] = out.float(), xi.grad

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    errors = {"out": rel(*[outs[i][0] for i in ("sdpa", "sam")]), "grad_x": rel(*[outs[i][1] for i in ("sdpa", "sam")])}
    print(shape, dtype, "relative max difference sdpa vs sam:", errors)
    bound = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert errors["out"] < bound and errors["grad_x"] < bound, errors


def test_tables_made_in_inference_mode_do_not_reach_autograd():
    attn = set_vit_attention(sam_attention(dtype=torch.float32).requires_grad_(False), "sdpa")
    with torch.inference_mode():
        attn(torch.randn(2, 6, 5, 32))
    x = torch.randn(2, 6, 5, 32, requires_grad=True)
    attn(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
