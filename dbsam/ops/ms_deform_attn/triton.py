"""Triton backend of ms_deform_attn: forward and backward kernels, registered as torch ops.

Interface the dispatcher relies on (op.py):
    unavailable_reason(device) -> str            '' when the backend can run on `device`
    ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights) -> Tensor
        differentiable; locations/weights already in the kernels' coordinate dtype.

Ops: `dbsam::ms_deform_attn_triton_forward` and `dbsam::ms_deform_attn_triton_backward`, made with
`torch.library.triton_op` rather than `custom_op`: eager calls are the same, but torch.compile
(Inductor) sees the kernels inside and can schedule/fuse around them instead of treating the op as
an opaque call. They share op.py's fake kernels and autograd formula, like every other backend.

Availability: triton must import (op.py imports this module lazily, and this module imports triton
safely: the CPU-only torch has no triton); CUDA tensors run compiled kernels, CPU tensors run only under the Triton interpreter
(TRITON_INTERPRET=1 when triton is first imported, and at call time; that is how CI tests
these kernels).

Kernel design (one program = BLOCK_Q queries of one (batch n, head m), all D channels):
- The D channels of a value row are contiguous, so the channel axis is the vectorised block axis
  (BLOCK_D = next power of two >= D, masked); queries are the other axis.
- One pass over the L*P samples; each sample's location and weight are loaded once per query
  as a [BLOCK_Q] vector and the bilinear corner math is done once per (query, sample), never per
  channel. Level shapes and starts are read from the int64 tensors inside the kernel.
- Forward accumulates in fp32 registers (fp64 for a fp64 value) and writes the output once.
- Backward keeps grad_output's [BLOCK_Q, BLOCK_D] tile in registers; per corner it gathers the
  value tile, reduces <grad_out, value> over D inside the program (giving grad_attention and
  grad_location without any barrier or shared-memory round trip), and scatters grad_value.
- All offsets that multiply out to tensor sizes are int64 (N*S*M*D or N*Lq*M*L*P*2 can pass 2^31).
- The boundary rules are those of csrc/ms_deform_attn/sampling.h (the CPU kernel): pixel coordinate
  loc*size - 0.5; a point with x <= -1, x >= W, y <= -1 or y >= H (or NaN) contributes nothing and
  gets zero gradient; corners outside the map (or outside [0, S)) read as zero.
"""
import contextlib
import functools
import os
import types
from typing import Dict, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from . import op as _op
from .._backends import alert_not_deterministic

try:  # triton is optional: `import dbsam.ops` must work without it (CPU-only torch)
    import triton
    import triton.language as tl

    _TRITON_ERROR = ""
except Exception as exc:  # ImportError, or a broken install
    triton = None
    # Only for the kernels' `tl.constexpr` annotations below, which must be spelt that way (the
    # interpreter reads them from the source); nothing runs without triton.
    tl = types.SimpleNamespace(constexpr="tl.constexpr")
    _TRITON_ERROR = ("triton is not installed" if isinstance(exc, ImportError)
                     else f"triton failed to import ({type(exc).__name__}: {exc})")

FORWARD_OP = "dbsam::ms_deform_attn_triton_forward"
BACKWARD_OP = "dbsam::ms_deform_attn_triton_backward"

# DBSAM_TRITON_AUTOTUNE=0 launches the fixed config below on the GPU too (no autotuning: tests,
# reproducible timing). The interpreter always uses the fixed config.
_AUTOTUNE_ENV = "DBSAM_TRITON_AUTOTUNE"
# DBSAM_MSDA_LOWP_ATOMICS=1 (the CUDA kernel's opt-in, read here at every backward): an fp16/bf16
# value's grad_value is scattered straight into a tensor of its dtype (the kernel's atomics take the
# buffer's dtype), not into an fp32 buffer converted at the end: half the atomic bytes, no fp32
# zero-fill and no conversion pass, and a rounding at every add. deformops's Triton backward works
# this way (its bf16 fwd+bwd led ours by 1.3x at the injector in H100 run 5); off by default until
# a GPU run has read the error it costs.
_LOWP_ENV = "DBSAM_MSDA_LOWP_ATOMICS"


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _interpreting() -> bool:
    """Whether this process runs Triton kernels in the interpreter. Triton jits its own library
    functions (tl.sum, tl.cdiv, ...) once, when triton is first imported, for the TRITON_INTERPRET
    of that moment; kernels calling them can only run in that same mode, so the mode is fixed per
    process by whoever imported triton first. It is read off the library, not the environment."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(tl.sum, InterpretedFunction):
        return True
    if isinstance(tl.sum, JITFunction):
        return False
    return _env_interpret()  # a triton whose tl.sum is neither: trust the environment


def unavailable_reason(device: torch.device) -> str:
    device = torch.device(device)
    if triton is None:
        return _TRITON_ERROR
    if device.type == "cuda":
        # (In an interpreter process CUDA tensors run through the interpreter, via host copies.)
        return "" if torch.cuda.is_available() else "torch sees no CUDA device"
    if device.type == "cpu":
        if not _interpreting():
            return ("Triton runs CPU tensors only under its interpreter (slow, for tests): set TRITON_INTERPRET=1 "
                    "before triton is first imported")
        if not _env_interpret():
            # Opt-in per call: with triton imported in interpreter mode but the variable unset, auto
            # dispatch must not route every CPU call through the interpreter.
            return "TRITON_INTERPRET is not set (triton was imported in interpreter mode, but CPU use is opt-in)"
        return ""
    return f"no Triton kernels for {device.type} tensors"


# ----------------------------------------------------------------------------------------------
# Kernels. Written as plain functions and jitted on first use by _kernels(), for the process's
# mode (see _interpreting: compiled or interpreted, fixed when triton was first imported).

def _locate(lx, ly, Hf, Wf, H, W, start, S, q_mask):
    """The bilinear footprint of one sample for a [BLOCK_Q] vector of queries (sampling.h's
    `locate`). lx, ly are in the accumulation dtype. Returns (valid, lh, lw, four rows (int64),
    four corner masks (row inside the map and inside [0, S)) and four corner weights (not masked:
    callers mask the loads and atomics instead))."""
    x = lx * Wf - 0.5
    y = ly * Hf - 0.5
    # Written so that NaN fails every comparison and lands in 'outside'.
    valid = q_mask & (x > -1.0) & (y > -1.0) & (x < Wf) & (y < Hf)
    x = tl.where(valid, x, 0.0)  # keeps huge/NaN coordinates away from the integer conversion
    y = tl.where(valid, y, 0.0)
    # x > -1 so x + 1 > 0 and truncation is a floor.
    w0 = (x + 1.0).to(tl.int32) - 1
    h0 = (y + 1.0).to(tl.int32) - 1
    lw = x - w0.to(x.dtype)
    lh = y - h0.to(y.dtype)
    hw = 1.0 - lw
    hh = 1.0 - lh
    w0l = w0.to(tl.int64)
    h0l = h0.to(tl.int64)
    top = valid & (h0l >= 0)
    bottom = valid & (h0l + 1 < H)
    left = w0l >= 0
    right = w0l + 1 < W
    base = start + h0l * W + w0l
    r0 = base
    r1 = base + 1
    r2 = base + W
    r3 = base + W + 1
    # Rows outside [0, S) are dropped too: under torch.compile the shapes are not validated on the
    # host, and inconsistent shapes must still never read out of bounds.
    ok0 = top & left & (r0 >= 0) & (r0 < S)
    ok1 = top & right & (r1 >= 0) & (r1 < S)
    ok2 = bottom & left & (r2 >= 0) & (r2 < S)
    ok3 = bottom & right & (r3 >= 0) & (r3 < S)
    # The corner masks are used only as load/atomic masks ([BLOCK_Q, BLOCK_D] tiles), never on
    # 1-D values: Triton 3.6 (torch 2.11's) failed to compile sm90 code that also selected 1-D
    # weights or rows with them (RemoveLayoutConversions gave the select operands mismatched
    # layouts). Nothing needs them there: a masked load gives 0 for a corner outside the map, so its
    # term vanishes whatever its weight, and masked lanes never touch memory, whatever their row.
    c0 = hh * hw
    c1 = hh * lw
    c2 = lh * hw
    c3 = lh * lw
    return valid, lh, lw, r0, r1, r2, r3, ok0, ok1, ok2, ok3, c0, c1, c2, c3


def _msda_fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                     Lq, S, M, D, L, P, LP,
                     BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_FP64: tl.constexpr):
    # Flattened 1-D grid (no 65535 limit on any axis): program = (n, m, query block).
    pid = tl.program_id(0)
    num_qb = tl.cdiv(Lq, BLOCK_Q)
    qb = pid % num_qb
    nm = pid // num_qb
    n = (nm // M).to(tl.int64)
    m = nm % M
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = offs_q < Lq
    d_mask = offs_d < D
    t = (n * Lq + offs_q) * M + m  # int64 index of (n, q, m)
    loc_base = t * (LP * 2)
    attn_base = t * LP
    row_stride = M * D
    v_base = n * S * row_stride + m * D
    if ACC_FP64:
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for l in range(L):
        H = tl.load(shapes_ptr + 2 * l)
        W = tl.load(shapes_ptr + 2 * l + 1)
        start = tl.load(starts_ptr + l)
        Hf = H.to(acc.dtype)
        Wf = W.to(acc.dtype)
        for p in range(P):
            i = l * P + p
            lx = tl.load(loc_ptr + loc_base + 2 * i, mask=q_mask, other=0.0).to(acc.dtype)
            ly = tl.load(loc_ptr + loc_base + 2 * i + 1, mask=q_mask, other=0.0).to(acc.dtype)
            a = tl.load(attn_ptr + attn_base + i, mask=q_mask, other=0.0).to(acc.dtype)
            valid, lh, lw, r0, r1, r2, r3, ok0, ok1, ok2, ok3, c0, c1, c2, c3 = _locate(
                lx, ly, Hf, Wf, H, W, start, S, q_mask)
            vp = value_ptr + v_base + offs_d[None, :]
            v0 = tl.load(vp + r0[:, None] * row_stride, mask=ok0[:, None] & d_mask[None, :], other=0.0)
            v1 = tl.load(vp + r1[:, None] * row_stride, mask=ok1[:, None] & d_mask[None, :], other=0.0)
            v2 = tl.load(vp + r2[:, None] * row_stride, mask=ok2[:, None] & d_mask[None, :], other=0.0)
            v3 = tl.load(vp + r3[:, None] * row_stride, mask=ok3[:, None] & d_mask[None, :], other=0.0)
            acc += (a * c0)[:, None] * v0.to(acc.dtype)
            acc += (a * c1)[:, None] * v1.to(acc.dtype)
            acc += (a * c2)[:, None] * v2.to(acc.dtype)
            acc += (a * c3)[:, None] * v3.to(acc.dtype)
    out_offs = t[:, None] * D + offs_d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


def _msda_bwd_kernel(grad_out_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,
                     grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                     Lq, S, M, D, L, P, LP,
                     BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_FP64: tl.constexpr):
    # grad_value: a scatter (many queries hit the same value rows), done with fp32 atomicAdd into
    # an fp32 buffer (fp64 for a fp64 value) that the host casts to bf16/fp16 at the end.
    # Why atomics rather than sorting the samples by value row (an atomic-free, deterministic
    # scatter): a sort costs an extra pass over N*Lq*M*L*P*4 (row, weight) keys, the sort itself
    # and a segmented reduction, more traffic than the relaxed atomics it removes. Relaxed fp32
    # atomics are resolved in L2 (Triton 3.8 emits 16-byte vector atomics on sm90); collisions do
    # happen (neighbouring queries of a head share corners when queries are as dense as the map)
    # and serialise in L2, which is the cost to measure against the ~95 us floor of kernels.md.
    # 16-bit atomics would halve the traffic, but bf16 accumulation loses the low bits of many small
    # contributions; fp32 is the default, and a bf16/fp16 grad_value buffer (DBSAM_MSDA_LOWP_ATOMICS=1,
    # _LOWP_ENV) makes these same atomics 16-bit: they take the buffer's dtype. Atomics make the
    # summation order vary run to run: the op alerts under torch.use_deterministic_algorithms(True).
    pid = tl.program_id(0)
    num_qb = tl.cdiv(Lq, BLOCK_Q)
    qb = pid % num_qb
    nm = pid // num_qb
    n = (nm // M).to(tl.int64)
    m = nm % M
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = offs_q < Lq
    d_mask = offs_d < D
    t = (n * Lq + offs_q) * M + m
    loc_base = t * (LP * 2)
    attn_base = t * LP
    row_stride = M * D
    v_base = n * S * row_stride + m * D
    qd_mask = q_mask[:, None] & d_mask[None, :]
    if ACC_FP64:
        g = tl.load(grad_out_ptr + t[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0).to(tl.float64)
    else:
        g = tl.load(grad_out_ptr + t[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0).to(tl.float32)
    gv_ty = grad_value_ptr.dtype.element_ty
    for l in range(L):
        H = tl.load(shapes_ptr + 2 * l)
        W = tl.load(shapes_ptr + 2 * l + 1)
        start = tl.load(starts_ptr + l)
        Hf = H.to(g.dtype)
        Wf = W.to(g.dtype)
        for p in range(P):
            i = l * P + p
            lx = tl.load(loc_ptr + loc_base + 2 * i, mask=q_mask, other=0.0).to(g.dtype)
            ly = tl.load(loc_ptr + loc_base + 2 * i + 1, mask=q_mask, other=0.0).to(g.dtype)
            a = tl.load(attn_ptr + attn_base + i, mask=q_mask, other=0.0).to(g.dtype)
            valid, lh, lw, r0, r1, r2, r3, ok0, ok1, ok2, ok3, c0, c1, c2, c3 = _locate(
                lx, ly, Hf, Wf, H, W, start, S, q_mask)
            vp = value_ptr + v_base + offs_d[None, :]
            gp = grad_value_ptr + v_base + offs_d[None, :]
            m0 = ok0[:, None] & d_mask[None, :]
            m1 = ok1[:, None] & d_mask[None, :]
            m2 = ok2[:, None] & d_mask[None, :]
            m3 = ok3[:, None] & d_mask[None, :]
            o0 = r0[:, None] * row_stride
            o1 = r1[:, None] * row_stride
            o2 = r2[:, None] * row_stride
            o3 = r3[:, None] * row_stride
            # The sample is linear in its corner values: <g, corner value> per corner (a reduction
            # over D inside the program) is all the location and weight gradients need.
            dot0 = tl.sum(g * tl.load(vp + o0, mask=m0, other=0.0).to(g.dtype), axis=1)
            dot1 = tl.sum(g * tl.load(vp + o1, mask=m1, other=0.0).to(g.dtype), axis=1)
            dot2 = tl.sum(g * tl.load(vp + o2, mask=m2, other=0.0).to(g.dtype), axis=1)
            dot3 = tl.sum(g * tl.load(vp + o3, mask=m3, other=0.0).to(g.dtype), axis=1)
            tl.atomic_add(gp + o0, ((a * c0)[:, None] * g).to(gv_ty), mask=m0, sem="relaxed")
            tl.atomic_add(gp + o1, ((a * c1)[:, None] * g).to(gv_ty), mask=m1, sem="relaxed")
            tl.atomic_add(gp + o2, ((a * c2)[:, None] * g).to(gv_ty), mask=m2, sem="relaxed")
            tl.atomic_add(gp + o3, ((a * c3)[:, None] * g).to(gv_ty), mask=m3, sem="relaxed")
            g_attn = c0 * dot0 + c1 * dot1 + c2 * dot2 + c3 * dot3
            d_dx = (1.0 - lh) * (dot1 - dot0) + lh * (dot3 - dot2)
            d_dy = (1.0 - lw) * (dot2 - dot0) + lw * (dot3 - dot1)
            g_x = tl.where(valid, a * d_dx * Wf, 0.0)
            g_y = tl.where(valid, a * d_dy * Hf, 0.0)
            g_attn = tl.where(valid, g_attn, 0.0)
            tl.store(grad_loc_ptr + loc_base + 2 * i, g_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + loc_base + 2 * i + 1, g_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_attn_ptr + attn_base + i, g_attn.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a fixed config (interpreter, tests, DBSAM_TRITON_AUTOTUNE=0) and the
# autotune table for the GPU, keyed on D and L*P (BLOCK_D is derived from D, never tuned).

# The largest BLOCK_Q of the autotune table; a problem with fewer than two programs of it per SM
# (queries x heads x batch < 2 * SMs * 128) is "small" and gets its own autotuner.
_MAX_BLOCK_Q = 128


# SMs assumed where the device cannot be asked (tracing with fake CUDA tensors on a host without a
# GPU): the H100's.
_DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    try:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    except Exception:
        return _DEFAULT_SMS


def _fixed_config(D: int, LP: int, interpret: bool, work: Optional[int] = None,
                  sms: int = _DEFAULT_SMS) -> Dict[str, int]:
    """work: the launch's (batch, query, head) count, N * M * Lq (None: not known)."""
    if interpret:
        # The interpreter's cost is per block operation, not per element: fewer, wider programs.
        return {"BLOCK_Q": 16, "num_warps": 4}
    # About 8 elements of the [BLOCK_Q, BLOCK_D] tile per thread: ptxas (sm90, Triton 3.8) gives
    # the forward ~47 registers and the backward ~97 there, against 80 / 168 at 16 per thread,
    # so enough warps stay resident to hide the gather latency. D=64 -> 32 queries x 8 warps.
    block_d = max(triton.next_power_of_2(D), 2)
    block_q = min(64, max(4, 2048 // block_d))
    # Then fill the GPU: halve BLOCK_Q (and the warps with it) until there are two programs per SM.
    # The Deformable DETR decoder (8 heads x 300 queries, D = 32) got 40 programs of 64 queries at
    # N = 1, on 40 of the H100's 132 SMs (run 3: 2.5-3.3x the CUDA kernel's time).
    while work is not None and block_q > 4 and (work + block_q - 1) // block_q < 2 * sms:
        block_q //= 2
    return {"BLOCK_Q": block_q, "num_warps": max(1, min(8, block_q * block_d // 256))}


def _is_small(work, sms: int) -> bool:
    return work < 2 * sms * _MAX_BLOCK_Q


def _autotune_configs(block_d: int):
    """The autotune table for one BLOCK_D: BLOCK_Q x num_warps with 1 to 16 tile elements per
    thread. More spills or starves occupancy: at 32 per thread ptxas (sm90) gives the backward 255
    registers plus a stack, the forward 140-250."""
    configs = []
    for block_q in (8, 16, 32, 64, _MAX_BLOCK_Q):
        for num_warps in (2, 4, 8):
            per_thread = block_q * block_d / (32 * num_warps)
            if 1 <= per_thread <= 16:
                configs.append(triton.Config({"BLOCK_Q": block_q}, num_warps=num_warps, num_stages=1))
    return configs or [triton.Config({"BLOCK_Q": 8}, num_warps=8, num_stages=1)]


class _Kernels:
    def __init__(self, interpret: bool):
        # Copies of the kernel functions over a private globals dict, so that the kernels call this
        # mode's jitted helper (triton resolves callees through the kernel's globals).
        ns = dict(globals())

        def jit(fn, helper=False):
            copy = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
            copy.__module__ = fn.__module__
            copy.__qualname__ = fn.__qualname__
            copy.__doc__ = fn.__doc__
            # FunctionType copies no annotations: without them Triton sees BLOCK_Q etc. as runtime
            # arguments ("arange's arguments must be of type tl.constexpr" at the first launch).
            copy.__annotations__ = dict(fn.__annotations__)
            copy.__kwdefaults__ = fn.__kwdefaults__
            # What triton.jit returns in each mode, chosen here rather than by the environment at
            # this moment, so that a cached mode never holds the other mode's kernels.
            if interpret and helper:
                # Under the interpreter a helper is plain Python running inside the kernel's
                # patched `tl`: an interpreted device function (Triton 3.8) re-patches `tl` on each
                # call and never restores it, which breaks later compilation in the same process.
                jitted = copy
            elif interpret:
                from triton.runtime.interpreter import InterpretedFunction

                jitted = InterpretedFunction(copy)
            else:
                jitted = triton.runtime.jit.JITFunction(copy)
            ns[fn.__name__] = jitted
            return jitted

        jit(_locate, helper=True)
        self.interpret = interpret
        self.fwd = jit(_msda_fwd_kernel)
        self.bwd = jit(_msda_bwd_kernel)
        self._tuned = {}

    def tuned(self, kind: str, block_d: int, small: bool = False):
        """The autotuned kernel (compiled mode only), one autotuner per (kind, BLOCK_D, small) so
        that each gets the table for its tile width, and a problem too small to fill the GPU with
        large blocks (_is_small) does not inherit the config tuned on a large one with the same D
        and L*P (Deformable DETR's decoder after its encoder); tuning is keyed on D and L*P (not on
        N or Lq: a new image size must not re-tune)."""
        if (kind, block_d, small) not in self._tuned:
            configs = _autotune_configs(block_d)
            if kind == "fwd":
                tuned = triton.autotune(configs=configs, key=["D", "LP"])(self.fwd)
            else:
                # Every trial launch adds into grad_value: the autotuner must zero it between trials.
                tuned = triton.autotune(configs=configs, key=["D", "LP"], reset_to_zero=["grad_value_ptr"])(self.bwd)
            self._tuned[(kind, block_d, small)] = tuned
        return self._tuned[(kind, block_d, small)]


_KERNELS: Dict[bool, _Kernels] = {}


def _kernels(interpret: bool) -> _Kernels:
    if interpret not in _KERNELS:
        _KERNELS[interpret] = _Kernels(interpret)
    return _KERNELS[interpret]


def _use_autotune(interpret: bool) -> bool:
    return not interpret and os.environ.get(_AUTOTUNE_ENV, "1").strip() != "0"


def _launch(kind: str, tensors: Tuple[torch.Tensor, ...], Lq: int, S: int, M: int, D: int, L: int, P: int,
            N: int, acc_fp64: bool) -> None:
    interpret = _interpreting()
    if tensors[0].device.type != "cuda" and not (interpret and tensors[0].device.type == "cpu"):
        raise RuntimeError(f"ms_deform_attn triton kernels: {unavailable_reason(tensors[0].device)}")
    ks = _kernels(interpret)
    LP = L * P
    # D picks the compile-time tile width: under torch.compile with dynamic shapes this
    # specialises on D (a model constant); N and Lq stay symbolic.
    D = int(D)
    block_d = max(triton.next_power_of_2(D), 2)
    args = (*tensors, Lq, S, M, D, L, P, LP)
    device = tensors[0].device
    # Triton launches on the current device and stream: make the tensors' device current (inputs
    # on cuda:1 with cuda:0 current must still work); the stream is torch's current one. Not while
    # tracing (fake tensors, e.g. torch.compile/export on a host without a GPU): nothing launches.
    guard = device.type == "cuda" and not interpret and not is_fake(tensors[0])
    sms = _sm_count(device.index if device.index is not None else 0) if guard else _DEFAULT_SMS
    with torch.cuda.device(device) if guard else contextlib.nullcontext():
        _launch_on_device(kind, ks, args, Lq, M, D, LP, N, block_d, interpret, acc_fp64, sms)


def _launch_on_device(kind, ks, args, Lq, M, D, LP, N, block_d, interpret, acc_fp64, sms):
    from torch.library import wrap_triton as _wrap

    # wrap_triton makes the launch traceable (torch.compile sees the kernel); interpreted kernels
    # are numpy code that nothing can trace, and older torch releases reject them in wrap_triton.
    wrap_triton = (lambda k: k) if interpret else _wrap
    if _use_autotune(interpret):
        kernel = ks.tuned(kind, block_d, _is_small(N * M * Lq, sms))

        def grid(meta):
            return (N * M * triton.cdiv(Lq, meta["BLOCK_Q"]),)

        wrap_triton(kernel)[grid](*args, BLOCK_D=block_d, ACC_FP64=acc_fp64)
    else:
        cfg = _fixed_config(D, LP, interpret, work=N * M * Lq, sms=sms)
        kernel = ks.fwd if kind == "fwd" else ks.bwd
        grid = (N * M * triton.cdiv(Lq, cfg["BLOCK_Q"]),)
        wrap_triton(kernel)[grid](*args, BLOCK_Q=cfg["BLOCK_Q"], BLOCK_D=block_d, ACC_FP64=acc_fp64,
                                  num_warps=cfg["num_warps"])


# ----------------------------------------------------------------------------------------------
# The ops.

if triton is not None:

    @torch.library.triton_op(FORWARD_OP, mutates_args=())
    def _forward_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                    sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
        N, S, M, D = value.shape
        Lq = sampling_locations.shape[1]
        L = spatial_shapes.shape[0]
        P = sampling_locations.shape[4]
        out = value.new_empty((N, Lq, M * D))
        if N * Lq * M * D == 0:
            return out
        if L * P == 0:
            return out.zero_()
        _launch("fwd", (value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
                        sampling_locations.contiguous(), attention_weights.contiguous(), out),
                Lq, S, M, D, L, P, N, value.dtype == torch.float64)
        return out

    @torch.library.triton_op(BACKWARD_OP, mutates_args=())
    def _backward_op(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                     level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                     attention_weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N, S, M, D = value.shape
        Lq = sampling_locations.shape[1]
        L = spatial_shapes.shape[0]
        P = sampling_locations.shape[4]
        if value.is_cuda and torch.are_deterministic_algorithms_enabled():
            # The grad_value scatter uses atomics, whose summation order varies run to run: raise
            # (or warn, with warn_only=True) as PyTorch's own nondeterministic ops do. The CPU
            # backend's backward is deterministic.
            alert_not_deterministic("ms_deform_attn's Triton backward (grad_value uses atomic adds)")
        if value.dtype in (torch.float16, torch.bfloat16) and os.environ.get(_LOWP_ENV) == "1":
            acc_dtype = value.dtype
        else:
            acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
        if N * Lq * M * D * L * P == 0:
            grad_loc = torch.zeros_like(sampling_locations)
            grad_attn = torch.zeros_like(attention_weights)
        else:
            grad_loc = torch.empty_like(sampling_locations, memory_format=torch.contiguous_format)
            grad_attn = torch.empty_like(attention_weights, memory_format=torch.contiguous_format)
            _launch("bwd", (grad_output.contiguous(), value.contiguous(), spatial_shapes.contiguous(),
                            level_start_index.contiguous(), sampling_locations.contiguous(),
                            attention_weights.contiguous(), grad_value, grad_loc, grad_attn),
                    Lq, S, M, D, L, P, N, value.dtype == torch.float64)
        return grad_value.to(value.dtype), grad_loc, grad_attn

    # The shared fake kernels replace the ones triton_op derives from the bodies: the same shapes
    # and dtypes for every backend, and no kernel launch under fake tensors (the interpreter's
    # kernels are not traceable).
    torch.library.register_fake(FORWARD_OP)(_op.fake_forward)
    torch.library.register_fake(BACKWARD_OP)(_op.fake_backward)
    _op.register_autograd_for(FORWARD_OP, torch.ops.dbsam.ms_deform_attn_triton_backward)


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    reason = unavailable_reason(value.device)
    if reason:
        raise RuntimeError(f"ms_deform_attn: the triton backend cannot run on {value.device}: {reason}")
    return torch.ops.dbsam.ms_deform_attn_triton_forward(value, spatial_shapes, level_start_index,
                                                         sampling_locations, attention_weights)
