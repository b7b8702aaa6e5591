"""The dispatch policy of every dbsam op, in one place.

A backend is one implementation of an op: "cuda" (hand-written CUDA kernels), "triton", "cpu"
(C++ kernels) or "reference" (pure PyTorch, float64-capable, the definition the others are tested
against). `auto` picks, for the device of the inputs, the first available of
cuda -> triton -> cpu -> reference (Triton only for CUDA tensors: on the CPU it runs under its
interpreter, a testing tool, never a fast path), less any backend an op registers with a
`not_auto` reason (usable by name or when forced: channel_attention's Triton backend, slower than the
reference in every H100 measurement). DBSAM_BACKEND=<name> (read at import) or the context manager
`use_backend(name)` forces one; a forced backend that cannot run on the inputs raises, it never
silently falls back.
"""
import contextlib
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
AUTO_ORDER = BACKENDS

# Each op registers, per backend, a function `reason(device) -> str` ('' when it can run there).
_registry: Dict[str, Dict[str, Callable[[torch.device], str]]] = {}
# Per op, the backends `auto` passes over, with why (register(..., not_auto=...)).
_not_auto: Dict[str, Dict[str, str]] = {}

_forced: Optional[str] = None


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected 'auto' or one of {BACKENDS}")
    return name


def _from_env() -> Optional[str]:
    name = os.environ.get("DBSAM_BACKEND", "auto").strip().lower() or "auto"
    return None if _check_name(name) == "auto" else name


_forced = _from_env()


def alert_not_deterministic(what: str) -> None:
    """Raise (or warn, under `warn_only=True`) when deterministic algorithms are enabled, as
    PyTorch's own nondeterministic kernels do. Written here because torch keeps its alert in C++
    (at::globalContext().alertNotDeterministic) with no Python binding."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{what} does not have a deterministic implementation, but "
           "torch.use_deterministic_algorithms(True) is set: use another backend for this op "
           "(backend='cuda' has a deterministic backward), or use_deterministic_algorithms(True, "
           "warn_only=True) to only warn")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg)
    else:
        raise RuntimeError(msg)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of the autocast region active for `device_type`, or None when there is none,
    including device types autocast does not know (meta: torch raises there rather than answer)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type)


def register(op: str, backend: str, reason: Callable[[torch.device], str], not_auto: str = "") -> None:
    """`reason(device)` says why `backend` cannot run `op` there ('' when it can). A non-empty
    `not_auto` keeps the backend out of `auto`'s choice, for the reason it gives (the backend still
    runs when named or forced)."""
    _registry.setdefault(op, {})[_check_name(backend)] = reason
    if not_auto:
        _not_auto.setdefault(op, {})[backend] = not_auto
    else:
        _not_auto.get(op, {}).pop(backend, None)


def get_backend() -> str:
    """The backend currently forced, or 'auto'."""
    return _forced or "auto"


def set_backend(name: str) -> None:
    """Force a backend for every dbsam op ('auto' to go back to automatic choice)."""
    global _forced
    _forced = None if _check_name(name) == "auto" else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with use_backend("reference"): ...` forces a backend inside the block."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def why_not(op: str, backend: str, device: torch.device) -> str:
    reason = _registry.get(op, {}).get(backend)
    if reason is None:
        return f"{op} has no {backend} backend"
    return reason(device)


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device` now."""
    if _forced is not None:
        reason = why_not(op, _forced, device)
        if reason:
            raise RuntimeError(f"dbsam backend {_forced!r} was forced but cannot run {op} on {device}: {reason}")
        return _forced
    for name in AUTO_ORDER:
        if (name == "triton" and device.type != "cuda") or name in _not_auto.get(op, {}):
            continue
        if not why_not(op, name, device):
            return name
    raise RuntimeError(f"no backend can run {op} on {device}")  # the reference runs everywhere


def report(devices: Tuple[str, ...] = ("cpu", "cuda")) -> str:
    """A table of every op's backends: available or why not, and what auto picks, per device."""
    lines = []
    for op in sorted(_registry):
        for dev in devices:
            device = torch.device(dev)
            lines.append(f"{op} on {dev}:")
            for name in BACKENDS:
                if name not in _registry[op]:
                    continue
                reason = why_not(op, name, device)
                state = "available" if not reason else "unavailable: " + reason
                if name in _not_auto.get(op, {}):
                    state += f" (auto passes over it: {_not_auto[op][name]})"
                lines.append(f"  {name:<10} {state}")
            try:
                lines.append(f"  auto -> {resolve(op, device)}")
            except RuntimeError as exc:
                lines.append(f"  auto -> none ({exc})")
    return "\n".join(lines)
