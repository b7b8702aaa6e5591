"""MSDeformAttn as a drop-in for Deformable DETR's module: names, shapes, initialisation, forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from dbsam.ops import MSDeformAttn, ms_deform_attn_reference, use_backend
from dbsam.ops import _native

from _msda_cases import level_tensors

SHAPES = [(8, 6), (4, 3), (2, 2)]


def original_state_dict(d_model=64, n_levels=3, n_heads=4, n_points=2, seed=0):
    """What Deformable DETR's module saves: these names, these shapes (written out, not imported)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return {
        "sampling_offsets.weight": r(n_heads * n_levels * n_points * 2, d_model),
        "sampling_offsets.bias": r(n_heads * n_levels * n_points * 2),
        "attention_weights.weight": r(n_heads * n_levels * n_points, d_model),
        "attention_weights.bias": r(n_heads * n_levels * n_points),
        "value_proj.weight": r(d_model, d_model),
        "value_proj.bias": r(d_model),
        "output_proj.weight": r(d_model, d_model),
        "output_proj.bias": r(d_model),
    }


def original_forward(sd, query, reference_points, value_in, shapes, mask, n_heads, n_levels, n_points):
    """The original module's forward, re-derived from the contract with the float64 reference."""
    N, Lq, C = query.shape
    S = value_in.shape[1]
    value = F.linear(value_in, sd["value_proj.weight"], sd["value_proj.bias"])
    if mask is not None:
        value = value.masked_fill(mask[..., None], 0.0)
    value = value.view(N, S, n_heads, -1)
    off = F.linear(query, sd["sampling_offsets.weight"], sd["sampling_offsets.bias"]).view(
        N, Lq, n_heads, n_levels, n_points, 2)
    att = F.linear(query, sd["attention_weights.weight"], sd["attention_weights.bias"]).view(
        N, Lq, n_heads, n_levels * n_points).softmax(-1).view(N, Lq, n_heads, n_levels, n_points)
    if reference_points.shape[-1] == 2:
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)
        loc = reference_points[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = reference_points[:, :, None, :, None, :2] + off / n_points * reference_points[:, :, None, :, None, 2:] * 0.5
    out = ms_deform_attn_reference(value, shapes, loc, att)
    return F.linear(out, sd["output_proj.weight"], sd["output_proj.bias"])


def test_state_dict_of_the_original_loads_unchanged():
    module = MSDeformAttn(64, 3, 4, 2)
    sd = original_state_dict()
    assert set(module.state_dict()) == set(sd)
    module.load_state_dict(sd, strict=True)
    for k, v in module.state_dict().items():
        assert torch.equal(v, sd[k])


def test_initialisation_is_the_grid_init():
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=8, n_points=3)
    bias = module.sampling_offsets.bias.view(8, 2, 3, 2)
    # Head 0 looks along +x, head 2 along +y, head 1 along the diagonal; point p is (p+1) times as far.
    for p in range(3):
        torch.testing.assert_close(bias[0, 1, p], torch.tensor([p + 1.0, 0.0]))
        torch.testing.assert_close(bias[2, 0, p], torch.tensor([0.0, p + 1.0]), atol=1e-6, rtol=0)
        torch.testing.assert_close(bias[1, 0, p], torch.tensor([p + 1.0, p + 1.0]))
        torch.testing.assert_close(bias[4, 0, p], torch.tensor([-(p + 1.0), 0.0]), atol=1e-6, rtol=0)
    assert not module.sampling_offsets.weight.any()
    assert not module.attention_weights.weight.any() and not module.attention_weights.bias.any()
    assert not module.value_proj.bias.any() and not module.output_proj.bias.any()
    bound = math.sqrt(6.0 / (32 + 32))
    assert module.value_proj.weight.abs().max() <= bound and module.value_proj.weight.std() > bound / 4


@pytest.mark.skipif(not _native.HAS_NATIVE, reason="dbsam._C not built")
@pytest.mark.parametrize("coords", [2, 4])
@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_matches_the_original(coords, with_mask):
    torch.manual_seed(0)
    module = MSDeformAttn(64, 3, 4, 2).double()
    sd = {k: v.double() for k, v in original_state_dict().items()}
    module.load_state_dict(sd)
    spatial, starts, S = level_tensors(SHAPES)
    N, Lq = 3, 10
    query = torch.randn(N, Lq, 64, dtype=torch.float64)
    value = torch.randn(N, S, 64, dtype=torch.float64)
    ref = torch.rand(N, Lq, 3, coords, dtype=torch.float64)
    mask = torch.rand(N, S) < 0.3 if with_mask else None
    expected = original_forward(sd, query, ref, value, SHAPES, mask, 4, 3, 2)
    torch.testing.assert_close(module(query, ref, value, spatial, starts, mask), expected)


@pytest.mark.skipif(not _native.HAS_NATIVE, reason="dbsam._C not built")
def test_reference_points_for_one_level_broadcast_and_ratio():
    # ViT-Adapter: reference points [N, Lq, 1, 2] for every level, value projected to d_model * ratio.
    module = MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=2, ratio=0.5)
    assert module.value_proj.weight.shape == (32, 64) and module.output_proj.weight.shape == (64, 32)
    spatial, starts, S = level_tensors(SHAPES)
    query, value = torch.randn(2, 5, 64), torch.randn(2, S, 64)
    ref1 = torch.rand(2, 5, 1, 2)
    out = module(query, ref1, value, spatial, starts)
    torch.testing.assert_close(out, module(query, ref1.expand(2, 5, 3, 2), value, spatial, starts))
    with use_backend("reference"):
        torch.testing.assert_close(out, module(query, ref1, value, spatial, starts), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _native.HAS_NATIVE, reason="dbsam._C not built")
def test_bf16_autocast_keeps_fp32_locations():
    module = MSDeformAttn(64, 3, 4, 2)
    spatial, starts, S = level_tensors(SHAPES)
    query, value, ref = torch.randn(2, 5, 64), torch.randn(2, S, 64), torch.rand(2, 5, 3, 2)
    expected = module(query, ref, value, spatial, starts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, ref, value, spatial, starts)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).norm() / expected.norm() < 3e-2


def test_bad_configuration_and_reference_points():
    with pytest.raises(ValueError, match="n_heads"):
        MSDeformAttn(d_model=30, n_heads=4)
    module = MSDeformAttn(64, 3, 4, 2)
    spatial, starts, S = level_tensors(SHAPES)
    with pytest.raises(ValueError, match="reference_points"):
        module(torch.randn(1, 2, 64), torch.rand(1, 2, 3, 3), torch.randn(1, S, 64), spatial, starts)
