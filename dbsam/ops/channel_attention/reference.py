"""The channel-attention adapter branch in plain PyTorch (Eq. 1 of DB-SAM), channels-last.

branch(x) = PW1x1(SE(GELU(DW3x3(LN(x))))) on x [B, H, W, C]; the block adds it to x. SE: mean over
H, W -> C -> C/r (no bias) -> GELU -> C/r -> C (no bias) -> sigmoid -> per-channel scale.
"""
import torch
import torch.nn.functional as F


def channel_attention_branch_reference(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                       dw_weight: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
                                       pw_weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [B, H, W, C]; dw_weight [C, 1, 3, 3]; fc1_weight [C/r, C, 1, 1]; fc2_weight [C, C/r, 1, 1];
    pw_weight [C, C, 1, 1]. Returns the branch [B, H, W, C] (without the residual)."""
    C = x.shape[-1]
    h = F.layer_norm(x, (C,), ln_weight, ln_bias, eps)
    h = F.conv2d(h.permute(0, 3, 1, 2), dw_weight, padding=1, groups=C)  # [B, C, H, W]
    h = F.gelu(h)
    s = h.mean(dim=(2, 3))  # [B, C]
    s = F.gelu(s @ fc1_weight.flatten(1).t())
    s = torch.sigmoid(s @ fc2_weight.flatten(1).t())
    h = h * s[:, :, None, None]
    return torch.einsum("bchw,oc->bhwo", h, pw_weight.flatten(1))


def channel_attention_reference(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, eps=1e-6,
                                branch_scale=None, residual=True):
    """y = x + branch(x), or x + branch_scale[b] * branch(x) (drop-path) with branch_scale [B]; without
    `residual`, the (scaled) branch alone."""
    branch = channel_attention_branch_reference(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight,
                                                pw_weight, eps)
    if branch_scale is not None:
        branch = branch * branch_scale.to(branch.dtype)[:, None, None, None]
    return x + branch if residual else branch
