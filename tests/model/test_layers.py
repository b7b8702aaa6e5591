"""The small shared layers (dbsam/model/layers.py)."""
import pytest
import torch

from dbsam.model.layers import DropPath


def test_drop_path_add_is_the_residual_of_drop_path():
    """add(x, b) == x + DropPath(b) draw for draw (same generator state), with gradients."""
    dp = DropPath(0.4).train()
    x = torch.randn(16, 5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, 5, 7, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    ours = dp.add(x, b)
    torch.manual_seed(3)
    ref = x + dp(b)
    torch.testing.assert_close(ours, ref, rtol=1e-15, atol=0)
    kept = (ours - x).abs().amax((1, 2)) > 0
    assert 0 < kept.sum() < 16  # some samples dropped, some kept
    torch.testing.assert_close((ours - x)[kept], b[kept] / 0.6)
    g = torch.randn_like(ours)
    gx, gb = torch.autograd.grad(ours, (x, b), g)
    torch.testing.assert_close(gx, g)
    torch.testing.assert_close(gb, g * kept[:, None, None] / 0.6)
    assert torch.autograd.gradcheck(lambda x, b: (torch.manual_seed(5), dp.add(x, b))[1], (x, b))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_drop_path_add_dtypes_and_scale(x_dtype):
    """The result has x + branch's dtype (a bf16 branch onto the fp32 ViT stream stays fp32), and
    1/(1-p) is applied in the kernel's fp32, not rounded to bf16 first."""
    dp = DropPath(0.4).train()
    x = torch.randn(64, 3, dtype=x_dtype)
    b = torch.randn(64, 3).bfloat16()
    out = dp.add(x, b)
    assert out.dtype == torch.promote_types(x_dtype, torch.bfloat16)
    kept = (out.float() - x.float()).abs().amax(1) > 0
    want = (x.float() + b.float() / 0.6).to(out.dtype)
    # fp32: to rounding (a bf16-rounded scale, 1.6640625, would be off by 1.6e-3); bf16: one unit of the last place
    tol = dict(rtol=1e-6, atol=1e-6) if out.dtype == torch.float32 else dict(rtol=8e-3, atol=0)
    torch.testing.assert_close(out[kept], want[kept], **tol)


def test_drop_path_add_outside_training_is_a_plain_add():
    dp = DropPath(0.4).eval()
    x, b = torch.randn(2, 4, 4, 8), torch.randn(2, 4, 4, 8)
    assert torch.equal(dp.add(x, b), x + b)
    assert torch.equal(DropPath(0.0).train().add(x, b), x + b)
