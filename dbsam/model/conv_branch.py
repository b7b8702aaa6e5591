"""The convolution branch (paper §2.2) and the merge of its levels.

One level (the paper's block): the image resized to 256 (img_size/4), then
    3x3 s2 3->256, BN, ReLU;  1x1 256->256, BN, ReLU;  3x3 s2 256->512, BN, ReLU;  1x1 512->512, BN, ReLU;
    1x1 512->C
giving (B, 64, 64, C) at ViT-B: 1,910,528 parameters (no conv biases: BN follows, and the last 1x1
has none). Options: "pyramid", 4 levels from the image resized to S, S/2, S/4, S/8, each with the
strides that bring it onto the token grid; "multiscale", the same inputs at stride 8, giving levels
of 2x, 1x, 1/2x and 1/4x the token grid. Levels > 1 get a learnable, zero-initialised level embedding.
Outputs are channels-last [B, h, w, C], like the ViT tokens.
"""
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DBSAMConfig


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvBlock(nn.Sequential):
    """Two 3x3 and three 1x1 convolutions, BN + ReLU after the first four."""

    def __init__(self, embed_dim: int, widths: Tuple[int, int], strides: Tuple[int, int] = (2, 2)):
        w1, w2 = widths
        super().__init__(
            conv_bn_relu(3, w1, 3, strides[0]),
            conv_bn_relu(w1, w1, 1, 1),
            conv_bn_relu(w1, w2, 3, strides[1]),
            conv_bn_relu(w2, w2, 1, 1),
            nn.Conv2d(w2, embed_dim, 1, bias=False),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def split_stride(stride: int) -> Tuple[int, int]:
    """A power-of-two total stride over the two 3x3 convs: 16 -> (4, 4), 8 -> (4, 2), 4 -> (2, 2), 2 -> (2, 1)."""
    k = int(round(math.log2(stride)))
    if 2 ** k != stride or k < 1 or k > 4:
        raise ValueError(f"conv branch: total stride {stride} must be 2, 4, 8 or 16")
    return 2 ** ((k + 1) // 2), 2 ** (k // 2)


def level_plan(cfg: DBSAMConfig) -> List[Tuple[int, Tuple[int, int]]]:
    """(input size, (stride of 3x3 #1, stride of 3x3 #2)) of each level."""
    grid = cfg.grid
    if cfg.conv_pyramid == "single":
        size = cfg.conv_input_size or cfg.img_size // 4
        return [(size, split_stride(size // grid))]
    sizes = [cfg.img_size // 2 ** i for i in range(4)]
    if cfg.conv_pyramid == "pyramid":
        return [(s, split_stride(s // grid)) for s in sizes]
    return [(s, split_stride(cfg.img_size // (2 * grid))) for s in sizes]  # multiscale: 2x .. 1/4x the grid


class ConvBranch(nn.Module):
    def __init__(self, cfg: DBSAMConfig):
        super().__init__()
        self.plan = level_plan(cfg)
        self.levels = nn.ModuleList(ConvBlock(cfg.embed_dim, cfg.conv_widths, strides) for _, strides in self.plan)
        self.level_embed = nn.Parameter(torch.zeros(len(self.plan), cfg.embed_dim)) if len(self.plan) > 1 else None

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x (B, 3, S, S) normalised -> F_s: L_s maps [B, h, w, C]."""
        maps = []
        for lvl, ((size, _), block) in enumerate(zip(self.plan, self.levels)):
            xi = x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear",
                                                              align_corners=False, antialias=True)
            f = block(xi).permute(0, 2, 3, 1)
            if self.level_embed is not None:
                f = f + self.level_embed[lvl]
            maps.append(f)
        return maps


class LevelMerge(nn.Module):
    """F_s^o = merge(F_s): identity for one level; otherwise every level resized to the token grid,
    concatenated over channels and mixed by a 1x1 conv (a Linear on channels-last maps)."""

    def __init__(self, embed_dim: int, n_levels: int, grid: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(n_levels * embed_dim, embed_dim) if n_levels > 1 else None

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        if self.proj is None:
            return maps[0]
        g = self.grid
        same = [m if m.shape[1:3] == (g, g) else
                F.interpolate(m.permute(0, 3, 1, 2), size=(g, g), mode="bilinear", align_corners=False,
                              antialias=m.shape[1] > g).permute(0, 2, 3, 1)
                for m in maps]
        return self.proj(torch.cat(same, dim=-1))
