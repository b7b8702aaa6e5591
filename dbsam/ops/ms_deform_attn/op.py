"""ms_deform_attn: input validation, the torch.library glue (fake kernels, autograd) and dispatch.

The native schemas `dbsam::ms_deform_attn_forward/backward` are declared in csrc/ops.cpp with CPU and
CUDA kernels and their autograd (csrc/ms_deform_attn/; autograd.cpp says why it is C++); the Triton
backend registers its own pair of ops (triton.py) and gets the same formula, in Python, from
`register_autograd_for` below. Every backend shares one fake kernel.
"""
import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .. import _backends, _native
from .reference import ms_deform_attn_reference

OP = "ms_deform_attn"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOW = (torch.float16, torch.bfloat16)


def level_layout(sizes: Sequence[Tuple[int, int]], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """spatial_shapes [L, 2] (h, w) and level_start_index [L], int64, for levels of these sizes."""
    starts, total = [], 0
    for h, w in sizes:
        starts.append(total)
        total += h * w
    return (torch.tensor(sizes, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device))


# ----------------------------------------------------------------------------------------------
# Validation: once, in Python, with messages that name the argument.

def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    names = ("value", "value_spatial_shapes", "value_level_start_index", "sampling_locations", "attention_weights")
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [N, S, M, D], got shape {tuple(value.shape)}")
    N, S, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: value_spatial_shapes must be [L, 2] (H, W), got shape {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if level_start_index.shape != (L,):
        raise ValueError(f"ms_deform_attn: value_level_start_index must be [L] = [{L}], got shape {tuple(level_start_index.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], "
                         f"got shape {tuple(sampling_locations.shape)}")
    n2, Lq, m2, l2, P, _ = sampling_locations.shape
    if (n2, m2, l2) != (N, M, L):
        raise ValueError(f"ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2] with N={N}, M={M}, L={L} "
                         f"(from value and value_spatial_shapes), got shape {tuple(sampling_locations.shape)}")
    if attention_weights.shape != (N, Lq, M, L, P):
        raise ValueError(f"ms_deform_attn: attention_weights must be [N, Lq, M, L, P] = {(N, Lq, M, L, P)}, "
                         f"got shape {tuple(attention_weights.shape)}")
    for name, t in (("value_spatial_shapes", spatial_shapes), ("value_level_start_index", level_start_index)):
        if t.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {t.dtype}")
    if value.dtype not in _FLOATS:
        raise TypeError(f"ms_deform_attn: value must be float32, float64, float16 or bfloat16, got {value.dtype}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"ms_deform_attn: {name} must be a floating dtype, got {t.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}; "
                             "all inputs must be on one device")
    # Meta tensors (a shape-only run) hold no level sizes to read.
    if not _is_compiling() and spatial_shapes.device.type != "meta" and not _checked_before(
            spatial_shapes, level_start_index, S):
        _validate_levels(spatial_shapes, level_start_index, S)
        _remember_checked(spatial_shapes, level_start_index, S)


# The level checks read the shape tensors on the host, a device sync when they live on the GPU.
# Models pass the same two tensors (buffers) on every call, so a pair is checked once and
# remembered for as long as both objects live and neither is modified in place (_version).
_checked: Dict[int, Tuple[weakref.ref, weakref.ref, int, int, int]] = {}


def _checked_before(shapes: torch.Tensor, starts: torch.Tensor, S: int) -> bool:
    if shapes.device.type == "cpu":
        return False  # checking is cheaper than remembering
    entry = _checked.get(id(shapes))
    return (entry is not None and entry[0]() is shapes and entry[1]() is starts
            and entry[2:] == (shapes._version, starts._version, S))


def _remember_checked(shapes: torch.Tensor, starts: torch.Tensor, S: int) -> None:
    if shapes.device.type == "cpu":
        return
    if len(_checked) > 256:  # forget the pairs whose tensors are gone
        for key in [k for k, e in _checked.items() if e[0]() is None or e[1]() is None]:
            del _checked[key]
    _checked[id(shapes)] = (weakref.ref(shapes), weakref.ref(starts), shapes._version, starts._version, S)


def _validate_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int) -> None:
    # Reads the (tiny) shape tensors on the host: a sync on CUDA, skipped under torch.compile where
    # the kernels' own bounds checks keep inconsistent shapes from reading out of bounds.
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    total = 0
    for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h <= 0 or w <= 0:
            raise ValueError(f"ms_deform_attn: value_spatial_shapes[{lvl}] = ({h}, {w}) must be positive")
        if start != total:
            raise ValueError(f"ms_deform_attn: value_level_start_index[{lvl}] = {start} but the levels before it cover "
                             f"{total} rows (it must be the exclusive prefix sum of H*W)")
        total += h * w
    if total != S:
        raise ValueError(f"ms_deform_attn: value_spatial_shapes cover {total} rows (sum of H*W) but value has S = {S}")


def coord_dtype(value_dtype: torch.dtype, loc_dtype: torch.dtype, attn_dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels take locations and weights in: value's own, or float32 for a
    half/bfloat16 value (AMP: fp32 locations keep sub-pixel precision on large levels)."""
    if value_dtype in _LOW:
        return value_dtype if loc_dtype == attn_dtype == value_dtype else torch.float32
    return value_dtype


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by every backend's ops.

def fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


def fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return (torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def register_autograd_for(forward_op: str, backward: Callable) -> None:
    """Gives `forward_op` (a qualified op name) the autograd formula, with `backward(grad_output,
    value, shapes, starts, locations, weights) -> (grad_value, grad_locations, grad_weights)`."""

    def _backward(ctx, grad_output):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        gv, gl, ga = backward(grad_output.contiguous(), value, shapes, starts, loc, attn)
        need = ctx.needs_input_grad
        return (gv if need[0] else None, None, None, gl if need[3] else None, ga if need[4] else None)

    torch.library.register_autograd(forward_op, _backward, setup_context=_setup_context)


if _native.HAS_NATIVE:
    torch.library.register_fake("dbsam::ms_deform_attn_forward")(fake_forward)
    torch.library.register_fake("dbsam::ms_deform_attn_backward")(fake_backward)
    # The native op's autograd is C++ (csrc/ms_deform_attn/autograd.cpp: the same formula without the
    # Python per step); a dbsam._C built before that file gets this one.
    if not _native.has_cpp_autograd("dbsam::ms_deform_attn_forward"):
        register_autograd_for("dbsam::ms_deform_attn_forward", torch.ops.dbsam.ms_deform_attn_backward)


# ----------------------------------------------------------------------------------------------
# Backends: what each needs, and how each is called.

def _triton_reason(device: torch.device) -> str:
    from . import triton as triton_backend  # imported lazily: triton is optional

    return triton_backend.unavailable_reason(device)


_backends.register(OP, "cuda", lambda device: _native.backend_reason("cuda", device))
_backends.register(OP, "triton", _triton_reason)
_backends.register(OP, "cpu", lambda device: _native.backend_reason("cpu", device))
_backends.register(OP, "reference", lambda device: "")


def _run_native(value, shapes, starts, loc, attn):
    return torch.ops.dbsam.ms_deform_attn_forward(value, shapes, starts, loc, attn)


def _run_triton(value, shapes, starts, loc, attn):
    from . import triton as triton_backend

    return triton_backend.ms_deform_attn_triton(value, shapes, starts, loc, attn)


def _run_reference(value, shapes, starts, loc, attn):
    return ms_deform_attn_reference(value, shapes, loc, attn)


_RUNNERS = {"cuda": _run_native, "cpu": _run_native, "triton": _run_triton, "reference": _run_reference}


def ms_deform_attn(value: torch.Tensor, value_spatial_shapes: torch.Tensor, value_level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                   im2col_step: Optional[int] = 64, *, backend: Optional[str] = None) -> torch.Tensor:
    """Multi-scale deformable attention (see docs: the de facto Deformable-DETR contract).

    value [N, S, M, D]; value_spatial_shapes [L, 2] int64 (H, W); value_level_start_index [L] int64;
    sampling_locations [N, Lq, M, L, P, 2] normalised (x, y), may lie outside [0, 1];
    attention_weights [N, Lq, M, L, P]. Returns [N, Lq, M*D] in value's dtype.

    `im2col_step` is accepted for compatibility and ignored: any batch size works. `backend`
    overrides the dispatch policy for this call (see dbsam.ops.use_backend).
    """
    del im2col_step  # the kernels need no batch chunking
    validate(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights)
    name = _backends._check_name(backend) if backend is not None else "auto"
    if value.device.type == "meta":
        # Shapes only: the native op's fake kernel answers for meta tensors, with its autograd.
        if not _native.HAS_NATIVE:
            raise RuntimeError("ms_deform_attn on meta tensors needs the compiled extension (dbsam._C), "
                               "whose fake kernel gives the shapes; the reference reads the level sizes")
        name = "cpu"
    elif name == "auto":
        name = _backends.resolve(OP, value.device)
    else:
        reason = _backends.why_not(OP, name, value.device)
        if reason:
            raise RuntimeError(f"ms_deform_attn: backend {name!r} cannot run on {value.device}: {reason}")
    cdt = coord_dtype(value.dtype, sampling_locations.dtype, attention_weights.dtype)
    return _RUNNERS[name](value, value_spatial_shapes, value_level_start_index,
                          sampling_locations.to(cdt), attention_weights.to(cdt))


class MSDeformAttnFunction:
    """Drop-in for Deformable-DETR's `MSDeformAttnFunction.apply(value, value_spatial_shapes,
    value_level_start_index, sampling_locations, attention_weights, im2col_step)`; autograd is
    the op's own."""

    @staticmethod
    def apply(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
              im2col_step=64):
        return ms_deform_attn(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                              attention_weights, im2col_step)
