"""ViT-Conv fusion (paper §2.3, Eq. 2).

    A_d = CA_d(F_d),  A_s = CA_s(F_s)        channel attention: FC C->C/12, GELU, FC C/12->C (logits)
    M   = sigmoid(A_d + A_s)
    F   = F_d * M + F_s * (1 - M)
    F   = F + DropPath(MLP(LN(F)))            MLP: C->4C, GELU, 4C->C

With `pool=True` (default) the channel attention sees the globally averaged features and M is a
per-channel gate [B, 1, 1, C]; with `pool=False` it runs per token and M is [B, H, W, C].
The gate is computed in float32 (bf16-autocast friendly).
"""
import torch
from torch import nn

from .layers import DropPath


class ChannelLogits(nn.Sequential):
    def __init__(self, dim: int, reduction: int):
        hidden = max(1, dim // reduction)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class ViTConvFusion(nn.Module):
    def __init__(self, dim: int, reduction: int = 12, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 pool: bool = True, eps: float = 1e-6):
        super().__init__()
        self.pool = pool
        self.vit_logits = ChannelLogits(dim, reduction)    # A_d
        self.conv_logits = ChannelLogits(dim, reduction)   # A_s
        self.norm = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, f_d: torch.Tensor, f_s: torch.Tensor) -> torch.Tensor:
        """f_d, f_s [B, H, W, C] -> F [B, H, W, C]."""
        pooled = (lambda t: t.mean(dim=(1, 2), keepdim=True)) if self.pool else (lambda t: t)
        a_d = self.vit_logits(pooled(f_d))
        a_s = self.conv_logits(pooled(f_s))
        m = torch.sigmoid(a_d.float() + a_s.float()).to(f_d.dtype)
        f = f_d * m + f_s * (1 - m)
        return self.drop_path.add(f, self.mlp(self.norm(f)))      # F + DropPath(MLP(LN(F)))
