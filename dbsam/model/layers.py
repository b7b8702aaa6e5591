"""Small layers shared by the DB-SAM modules."""
from typing import Callable, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def kept(owner: object, slot: str, tensors: Sequence[torch.Tensor], key: tuple, make: Callable[[], T]) -> T:
    """make()'s result (run without grad), kept in owner.__dict__[slot] while it cannot have changed:
    rebuilt when `key` differs or any of `tensors` was modified in place (version counter), moved or
    replaced (storage, identity), or the inference mode changed (what is made under inference_mode
    is an inference tensor, which autograd refuses to save). None while torch.compile traces (it
    folds such work itself) or for tensors that keep no version counter (inference tensors).
    Not seen: writes through `.data`, which bump no version counter. The caller decides whether
    keeping is safe at all (e.g. nothing that needs a gradient)."""
    if torch.compiler.is_compiling():
        return None
    try:
        full = (key, torch.is_inference_mode_enabled()) + tuple((t.device, t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:  # inference tensors keep no version counter
        return None
    cached = owner.__dict__.get(slot)
    # The tensors themselves are held with the result, so that a replaced one (a new tensor, its version
    # counter starting again) cannot take the old one's address while the key names it.
    if (cached is None or cached[0] != full or len(cached[2]) != len(tensors)
            or any(a is not b for a, b in zip(cached[2], tensors))):
        with torch.no_grad():
            cached = (full, make(), tuple(tensors))
        owner.__dict__[slot] = cached
    return cached[1]


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's branch with probability p, scale the rest by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * self._keep(x) / (1.0 - self.p)

    def add(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """x + self(branch) as one addcmul with a 0/1 per-sample mask, the 1/(1-p) a scalar (exact in
        the kernel's fp32 math, where a bf16 scale tensor would round it): 3 ops where the two steps
        took 5, and one pass over the branch instead of three. The result's dtype is x + branch's (the
        mask, exact in any dtype, takes the branch's)."""
        if self.p == 0.0 or not self.training:
            return x + branch
        return torch.addcmul(x, branch, self._keep(branch), value=1.0 / (1.0 - self.p))

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask per sample, [B, 1, ...] in t's dtype."""
        return t.new_empty((t.shape[0],) + (1,) * (t.dim() - 1)).bernoulli_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FFN(nn.Sequential):
    """Linear C->hC, GELU, Dropout, Linear hC->C, Dropout."""

    def __init__(self, dim: int, ratio: float = 4.0, dropout: float = 0.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))
