"""channel_attention: input validation, the torch.library glue (fake kernels, autograd) and dispatch.

The native schemas `dbsam::channel_attention_forward/backward` are declared in csrc/ops.cpp with CPU
and CUDA kernels and their autograd (csrc/channel_attention/; autograd.cpp says why it is C++); the
Triton backend registers its own pair of ops (triton.py) and gets the same formula, in Python, from
`register_autograd_for` below. Every backend shares one fake kernel. The reference backend is plain
PyTorch (autograd by PyTorch itself).

Forward ops return (y, mean, rstd, pooled, pre): the LN statistics [B, H, W] and the SE input [B, C],
in float32 (float64 for a float64 x), and the depthwise conv's output pre [B, H, W, C] in x's dtype.
The backward recomputes the LN from x and its statistics and GELU from pre, so the op saves one
[B, H, W, C] map of its own (eager PyTorch keeps about four: the LN, DW, GELU and gated outputs).
"""
from typing import Callable, Optional

import torch

from .. import _backends, _native
from .reference import channel_attention_reference

OP = "channel_attention"
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOW = (torch.float16, torch.bfloat16)
_WEIGHTS = ("ln_weight", "ln_bias", "dw_weight", "fc1_weight", "fc2_weight", "pw_weight")


# ----------------------------------------------------------------------------------------------
# Validation: once, in Python, with messages that name the argument.

def validate(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, eps) -> None:
    tensors = (x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight)
    for name, t in zip(("x",) + _WEIGHTS, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"channel_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(eps, (float, int)) or isinstance(eps, bool):
        raise TypeError(f"channel_attention: eps must be a float, got {type(eps).__name__}")
    if x.dim() != 4:
        raise ValueError(f"channel_attention: x must be channels-last [B, H, W, C], got shape {tuple(x.shape)}")
    B, H, W, C = x.shape
    if H == 0 or W == 0 or C == 0:
        raise ValueError(f"channel_attention: x must have positive H, W and C, got shape {tuple(x.shape)}")
    if fc1_weight.dim() != 4 or fc1_weight.shape[1:] != (C, 1, 1) or fc1_weight.shape[0] == 0:
        raise ValueError(f"channel_attention: fc1_weight must be [C/r, C, 1, 1] with C={C} (from x), "
                         f"got shape {tuple(fc1_weight.shape)}")
    R = fc1_weight.shape[0]
    expected = {"ln_weight": (C,), "ln_bias": (C,), "dw_weight": (C, 1, 3, 3), "fc2_weight": (C, R, 1, 1),
                "pw_weight": (C, C, 1, 1)}
    for name, t in zip(_WEIGHTS, tensors[1:]):
        if name in expected and tuple(t.shape) != expected[name]:
            raise ValueError(f"channel_attention: {name} must have shape {expected[name]} (C={C} from x, "
                             f"C/r={R} from fc1_weight), got {tuple(t.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"channel_attention: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    for name, t in zip(_WEIGHTS, tensors[1:]):
        if t.dtype != x.dtype and not (x.dtype in _LOW and t.dtype == torch.float32):
            allowed = f"{x.dtype}" + (" or torch.float32" if x.dtype in _LOW else "")
            raise TypeError(f"channel_attention: {name} must have x's dtype ({allowed}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"channel_attention: {name} is on {t.device} but x is on {x.device}; "
                             "all inputs must be on one device")


def weight_dtype(x_dtype: torch.dtype, weights) -> torch.dtype:
    """One dtype for all weights: x's, or float32 when x is half/bfloat16 and any weight is float32
    (AMP: master weights stay float32, the activations run in low precision)."""
    if x_dtype in _LOW and any(w.dtype == torch.float32 for w in weights):
        return torch.float32
    return x_dtype


def stat_dtype(x_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if x_dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by every backend's ops.

def fake_forward(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, branch_scale, eps,
                 residual=True):
    B, H, W, C = x.shape
    st = stat_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((B, H, W), dtype=st),
            x.new_empty((B, H, W), dtype=st), x.new_empty((B, C), dtype=st),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def fake_backward(grad_y, x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, branch_scale,
                  mean, rstd, pooled, pre, eps, residual=True):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight))


def _setup_context(ctx, inputs, output):
    x, lw, lb, dw, f1, f2, pw, scale, eps, residual = inputs
    y, mean, rstd, pooled, pre = output
    ctx.save_for_backward(x, lw, lb, dw, f1, f2, pw, scale, mean, rstd, pooled, pre)
    ctx.eps, ctx.residual = eps, residual
    ctx.mark_non_differentiable(mean, rstd, pooled, pre)
    # The four saved-state outputs never receive a gradient; by default autograd would still make a
    # zero tensor for each before every backward (pre is [B, H, W, C]: a 50 MB fill and four extra
    # launches per step at 8x64x64x768 bf16, seen in H100 run 5's profile as FillFunctor kernels).
    ctx.set_materialize_grads(False)


def register_autograd_for(forward_op: str, backward: Callable) -> None:
    """Gives `forward_op` (a qualified op name) the autograd formula, with `backward(grad_y, x, ln_weight,
    ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, branch_scale, mean, rstd, pooled, pre, eps,
    residual) -> 7 grads`."""

    def _backward(ctx, grad_y, _gm, _gr, _gp, _gpre):
        saved = ctx.saved_tensors
        if grad_y is None:  # not materialised (_setup_context): nothing flows back
            return (None,) * 10
        grads = backward(grad_y.contiguous(), *saved, ctx.eps, ctx.residual)
        need = ctx.needs_input_grad
        return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None, None, None)

    torch.library.register_autograd(forward_op, _backward, setup_context=_setup_context)


def _has_native_op() -> bool:
    # A dbsam._C built before this op existed loads fine but lacks its schemas.
    try:
        torch.ops.dbsam.channel_attention_forward
        torch.ops.dbsam.channel_attention_backward
    except (AttributeError, RuntimeError):
        return False
    return True


HAS_NATIVE_OP = _native.HAS_NATIVE and _has_native_op()

if HAS_NATIVE_OP:
    torch.library.register_fake("dbsam::channel_attention_forward")(fake_forward)
    torch.library.register_fake("dbsam::channel_attention_backward")(fake_backward)
    # The native op's autograd is C++ (csrc/channel_attention/autograd.cpp: the same formula without
    # ~80 us of Python per step); a dbsam._C built before that file gets this one.
    if not _native.has_cpp_autograd("dbsam::channel_attention_forward"):
        register_autograd_for("dbsam::channel_attention_forward", torch.ops.dbsam.channel_attention_backward)


# ----------------------------------------------------------------------------------------------
# Backends: what each needs, and how each is called.

def _native_reason(backend: str, device: torch.device) -> str:
    reason = _native.backend_reason(backend, device)
    if not reason and not HAS_NATIVE_OP:
        return "dbsam._C was built before channel_attention existed; rebuild it (pip install .)"
    return reason


def _triton_reason(device: torch.device) -> str:
    from . import triton as triton_backend  # imported lazily: triton is optional

    return triton_backend.unavailable_reason(device)


_backends.register(OP, "cuda", lambda device: _native_reason("cuda", device))
# Not in `auto`: the H100 runs (benchmarks/results, run 3 at every shape, run 4 at B = 8) timed the
# Triton adapter slower than the reference composition forward and forward+backward, bf16 and fp32
# (e.g. 8x64x64x768 bf16 fwd+bwd 3893 against 2375 us), so a GPU without the CUDA build is better
# served by the reference; the Triton backend runs when named (it keeps a quarter of the reference's
# activations). Revisit when a run shows it ahead (benchmarks/NOTES.md section 10).
_backends.register(OP, "triton", _triton_reason,
                   not_auto="slower than the reference composition in every H100 run (benchmarks/NOTES.md)")
_backends.register(OP, "cpu", lambda device: _native_reason("cpu", device))
_backends.register(OP, "reference", lambda device: "")


def _run_native(*args):
    return torch.ops.dbsam.channel_attention_forward(*args)[0]


def _run_triton(*args):
    from . import triton as triton_backend

    return triton_backend.channel_attention_triton(*args)


def _run_reference(x, lw, lb, dw, f1, f2, pw, scale, eps, residual):
    if x.dtype in _LOW:  # the definition, evaluated in float32 and rounded once
        ws = (w.float() for w in (lw, lb, dw, f1, f2, pw))
        return channel_attention_reference(x.float(), *ws, eps, branch_scale=scale, residual=residual).to(x.dtype)
    return channel_attention_reference(x, lw, lb, dw, f1, f2, pw, eps, branch_scale=scale, residual=residual)


_RUNNERS = {"cuda": _run_native, "cpu": _run_native, "triton": _run_triton, "reference": _run_reference}


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a convolution on x in, where it would change x's (float32 x, an
    autocast region of x's device type, to float16 or bfloat16); None elsewhere."""
    low = _backends.autocast_dtype(x.device.type) if x.dtype == torch.float32 else None
    return low if low in _LOW else None


def channel_attention(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, dw_weight: torch.Tensor,
                      fc1_weight: torch.Tensor, fc2_weight: torch.Tensor, pw_weight: torch.Tensor,
                      eps: float = 1e-6, *, branch_scale: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None, residual: bool = True) -> torch.Tensor:
    """The DB-SAM channel-attention adapter: y = x + PW1x1(SE(GELU(DW3x3(LN(x))))).

    x [B, H, W, C] channels-last (any strides; no permutes are made); ln_weight, ln_bias [C];
    dw_weight [C, 1, 3, 3] (depthwise, padding 1, no bias); fc1_weight [C/r, C, 1, 1] and fc2_weight
    [C, C/r, 1, 1] (SE: mean over H, W -> fc1 -> GELU -> fc2 -> sigmoid -> channel scale);
    pw_weight [C, C, 1, 1]. GELU is the erf form; LN uses `eps`. Weights in x's dtype, or float32 with
    a float16/bfloat16 x (statistics and accumulation are float32 either way). Returns y [B, H, W, C]
    in x's dtype, differentiable in x and every weight.

    `branch_scale` (optional [B], no gradient) multiplies the branch per sample before the residual
    add: y = x + branch_scale[b] * branch. It is how drop-path runs fused (keep_b / (1 - p)); the kernels
    fold it into the 1x1 weight with the SE gate, so it is free. `backend` overrides the dispatch
    policy for this call (see dbsam.ops.use_backend). `residual=False` returns the branch alone.

    Under autocast (float16/bfloat16, x's device type) a float32 x runs as eager PyTorch runs the
    composition there: the branch in the autocast dtype (x rounded to it once, statistics and
    accumulation in float32, the float32 weights read as they are) and the residual added in float32,
    so y is float32. Without this the kernels ran the whole op in float32, their float32 GEMMs
    included (DB-SAM's ViT tokens are float32 under autocast: SAM adds its float32 pos_embed).
    """
    validate(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, eps)
    if branch_scale is not None:
        if not isinstance(branch_scale, torch.Tensor):
            raise TypeError(f"channel_attention: branch_scale must be a torch.Tensor or None, got "
                            f"{type(branch_scale).__name__}")
        if tuple(branch_scale.shape) != (x.shape[0],):
            raise ValueError(f"channel_attention: branch_scale must be [B] = [{x.shape[0]}], "
                             f"got shape {tuple(branch_scale.shape)}")
        if not branch_scale.dtype.is_floating_point:
            raise TypeError(f"channel_attention: branch_scale must be floating point, got {branch_scale.dtype}")
        if branch_scale.device != x.device:
            raise ValueError(f"channel_attention: branch_scale is on {branch_scale.device} but x is on {x.device}")
        branch_scale = branch_scale.detach().to(stat_dtype(x.dtype))
    if not isinstance(residual, bool):
        raise TypeError(f"channel_attention: residual must be a bool, got {type(residual).__name__}")
    name = _backends._check_name(backend) if backend is not None else "auto"
    if name == "auto":
        name = _backends.resolve(OP, x.device)  # never triton for this op (see its registration)
    else:
        reason = _backends.why_not(OP, name, x.device)
        if reason:
            raise RuntimeError(f"channel_attention: backend {name!r} cannot run on {x.device}: {reason}")
    weights = (ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight)
    low = _autocast_dtype(x)
    xk = x if low is None else x.to(low)
    wdt = weight_dtype(xk.dtype, weights)
    # `.to` only where a dtype changes: six no-op calls still cost the host ~7 us per call here.
    ws = (w if w.dtype == wdt else w.to(wdt) for w in weights)
    if low is None:
        return _RUNNERS[name](x, *ws, branch_scale, float(eps), residual)
    branch = _RUNNERS[name](xk, *ws, branch_scale, float(eps), False)
    return x + branch if residual else branch
