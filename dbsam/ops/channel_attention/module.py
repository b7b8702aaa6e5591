"""ChannelAttention: the adapter block y = x + DropPath(PW1x1(SE(GELU(DW3x3(LN(x)))))) on [B, H, W, C].

Parameter names and shapes are those of the eager composition (LayerNorm `norm`, depthwise conv
`dwconv` [C, 1, 3, 3], SE `se.fc1` [C/r, C, 1, 1] and `se.fc2` [C, C/r, 1, 1], pointwise `pwconv`
[C, C, 1, 1]), so its state dict loads unchanged. Drop-path scales the branch per sample outside the
fused computation (it is a per-sample multiply, free to fuse into the residual add later).
"""
import math

import torch
from torch import nn

from .reference import channel_attention_branch_reference


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability p, rescale the rest by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class _SE(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, dim, 1, bias=False)


class ChannelAttention(nn.Module):
    def __init__(self, dim: int, se_ratio: float = 0.25, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        hidden = max(1, int(round(dim * se_ratio)))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.se = _SE(dim, hidden)
        self.pwconv = nn.Conv2d(dim, dim, 1, bias=False)
        self.drop_path = drop_path
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He-normal by fan-out (model.md): the block is active from the first step, not zero-initialised.
        for conv in (self.dwconv, self.se.fc1, self.se.fc2, self.pwconv):
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return channel_attention_branch_reference(x, self.norm.weight, self.norm.bias, self.dwconv.weight,
                                                  self.se.fc1.weight, self.se.fc2.weight, self.pwconv.weight,
                                                  self.norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, W, C] -> [B, H, W, C]."""
        return x + drop_path(self.branch(x), self.drop_path, self.training)
