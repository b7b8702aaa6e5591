"""ChannelAttention: the adapter block y = x + DropPath(PW1x1(SE(GELU(DW3x3(LN(x)))))) on [B, H, W, C].

Parameter names and shapes are those of the eager composition (LayerNorm `norm`, depthwise conv
`dwconv` [C, 1, 3, 3], SE `se.fc1` [C/r, C, 1, 1] and `se.fc2` [C, C/r, 1, 1], pointwise `pwconv`
[C, C, 1, 1]), so its state dict loads unchanged.

Forward runs the fused op `dbsam.ops.channel_attention` (backend chosen by dbsam.ops' dispatch policy).
Drop-path boundary: the op computes y = x + scale[b] * branch(x) with an optional per-sample
`branch_scale` [B]; in training the module draws keep ~ Bernoulli(1 - p) per sample and passes
keep / (1 - p). The kernels fold that factor into the 1x1 weight together with the SE gate, so
stochastic depth costs no extra pass and no extra [B, H, W, C] tensor, and the residual stays fused
into the GEMM. It is the same function as the eager `x + drop_path(branch(x))` (tested). `branch()`
keeps the eager composition (reference) for inspection.
"""
import math

import torch
from torch import nn

from .op import channel_attention
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
        scale = None
        if self.training and self.drop_path > 0.0:
            keep = torch.empty(x.shape[0], device=x.device, dtype=torch.float32).bernoulli_(1.0 - self.drop_path)
            scale = keep / (1.0 - self.drop_path)
        return channel_attention(x, self.norm.weight, self.norm.bias, self.dwconv.weight, self.se.fc1.weight,
                                 self.se.fc2.weight, self.pwconv.weight, self.norm.eps, branch_scale=scale)
