"""Triton backend of channel_attention: forward and backward through the kernels of _triton_kernels.py.

Stages (as the CUDA backend): LN statistics; LN-apply + DW3x3 + GELU + per-tile channel sums; the SE
MLP on [B, C] (torch, tiny); the 1x1 conv as one batched GEMM (torch.baddbmm, i.e. cuBLAS) with the SE
gate and drop-path factor folded into the weight per image and the residual as the addend; the DW
output is written out (pre, saved). Backward: the grad at the gated activations (torch GEMM), then one
Triton pass over pre and it for the gated activations and the SE gate's gradient sums (gate_dot),
grad_pw (torch GEMM), the SE backward (torch, tiny), then Triton kernels for the GELU derivative, the
transposed DW (+ grad_dw and LN-affine partials) and the LN backward.

Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 (slow; for tests on tiny shapes).
float32, float16, bfloat16 (float32 statistics and accumulation); float64 is left to the cpu/reference
backends. Triton is imported only when this backend is first used: `import dbsam.ops` works without it.

Interface the dispatcher relies on (op.py):
    unavailable_reason(device) -> str     '' when the backend can run on `device`
    channel_attention_triton(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight,
                             branch_scale, eps) -> Tensor (differentiable)
"""
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_registered = False


def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return ""


def unavailable_reason(device: torch.device) -> str:
    err = _triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        return "" if torch.cuda.is_available() else "torch sees no CUDA device"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return ""
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (the interpreter, for tests)"
    return f"Triton kernels do not run on {device.type} tensors"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _tiles(W: int, C: int) -> Tuple[int, int]:
    block_c = min(64, _next_pow2(C))
    block_w = min(max(1, 4096 // block_c), _next_pow2(W), 64)
    return block_w, block_c


def _widen(C, R, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight):
    f = torch.float32
    return (ln_weight.to(f).contiguous(), ln_bias.to(f).contiguous(),
            dw_weight.reshape(C, 9).t().to(f).contiguous(), fc1_weight.reshape(R, C).to(f),
            fc2_weight.reshape(C, R).to(f), pw_weight.reshape(C, C).to(f))


def _front(x, mean, rstd, g, be, wt, u, d_out, rowpart, nwb, block_w, block_c):
    from . import _triton_kernels as K

    B, H, W, C = x.shape
    grid = (B * H, nwb, triton_cdiv(C, block_c))
    K.dw_gelu_kernel[grid](x, mean, rstd, g, be, wt, u, d_out if d_out is not None else u,
                           rowpart if rowpart is not None else mean, H, W, C, nwb,
                           WRITE_D=d_out is not None, WRITE_SUM=rowpart is not None,
                           BLOCK_W=block_w, BLOCK_C=block_c, num_warps=8)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_dtype(x):
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"channel_attention: the triton backend takes x in float32, float16 or bfloat16, got "
                        f"{x.dtype} (use the cpu or reference backend for float64)")


def forward_impl(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, branch_scale, eps,
                 residual=True):
    from . import _triton_kernels as K

    _check_dtype(x)
    B, H, W, C = x.shape
    R = fc1_weight.shape[0]
    xc = x.contiguous()
    g, be, wt, w1, w2, wp = _widen(C, R, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight)
    P, HW = B * H * W, H * W
    mean = torch.empty((B, H, W), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    u = torch.empty_like(xc)
    pre = torch.empty_like(xc)  # the DW output, saved for the backward in x's dtype
    block_w, block_c = _tiles(W, C)
    nwb = triton_cdiv(W, block_w)
    rowpart = torch.empty((B * H, nwb, C), device=x.device, dtype=torch.float32)  # every tile writes its row
    if P > 0:
        bc_full = _next_pow2(C)
        bp = max(1, min(16, 4096 // bc_full))
        K.ln_stats_kernel[(triton_cdiv(P, bp),)](xc, mean, rstd, P, C, float(eps), BLOCK_P=bp, BLOCK_C=bc_full)
        _front(xc, mean, rstd, g, be, wt, u, pre, rowpart, nwb, block_w, block_c)
    pooled = rowpart.view(B, H * nwb, C).sum(1) / HW
    s = torch.sigmoid(F.gelu(pooled @ w1.t()) @ w2.t())
    if branch_scale is not None:
        s = s * branch_scale[:, None]
    wf = (wp[None] * s[:, None, :]).transpose(1, 2).to(x.dtype)
    u3 = u.view(B, HW, C)
    y = (torch.baddbmm(xc.view(B, HW, C), u3, wf) if residual else torch.bmm(u3, wf)).view(B, H, W, C)
    return y, mean, rstd, pooled, pre


def backward_impl(grad_y, x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, branch_scale,
                  mean, rstd, pooled, pre, eps, residual=True):
    from . import _triton_kernels as K

    _check_dtype(x)
    B, H, W, C = x.shape
    R = fc1_weight.shape[0]
    xc, gyc = x.contiguous(), grad_y.contiguous()
    mean, rstd, pooled = mean.contiguous(), rstd.contiguous(), pooled.contiguous()
    g, be, wt, w1, w2, wp = _widen(C, R, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight)
    P, HW = B * H * W, H * W
    block_w, block_c = _tiles(W, C)
    nwb = triton_cdiv(W, block_w)
    # The DW output is saved (pre); GELU is recomputed from it (in the kernels), the DW conv is not.
    a = pooled @ w1.t()
    h = F.gelu(a)
    s = torch.sigmoid(h @ w2.t())
    s_eff = s * branch_scale[:, None] if branch_scale is not None else s
    s_c = s_eff.contiguous()
    prec = pre.contiguous()
    gy2 = gyc.view(P, C)
    gv = gy2 @ wp.to(x.dtype)  # [P, Cin]: the grad at the gated activations
    v = torch.empty_like(xc)  # GELU(pre) * s_eff, for grad_pw
    rowpart = torch.empty((B * H, nwb, C), device=x.device, dtype=torch.float32)  # every tile writes its row
    if P > 0:
        K.gate_dot_kernel[(B * H, nwb, triton_cdiv(C, block_c))](prec, gv, s_c, v, rowpart, H, W, C, nwb,
                                                                  BLOCK_W=block_w, BLOCK_C=block_c, num_warps=8)
    gpw = gy2.t() @ v.view(P, C)
    del v
    gs = rowpart.view(B, H * nwb, C).sum(1)
    if branch_scale is not None:
        gs = gs * branch_scale[:, None]
    gz = gs * s * (1 - s)
    gw2 = gz.t() @ h
    ga = torch.ops.aten.gelu_backward(gz @ w2, a)
    gw1 = ga.t() @ pooled
    gp = (ga @ w1).contiguous()
    gn = torch.empty((B, H, W, C), device=x.device, dtype=torch.float32)
    part = torch.empty((B * H * nwb, 11, C), device=x.device, dtype=torch.float32)  # every tile writes its rows
    gx = torch.empty_like(xc)
    if P > 0:
        total = P * C
        blk = 1024
        gd = torch.empty((B, H, W, C), device=x.device, dtype=torch.float32)
        K.grad_pre_kernel[(triton_cdiv(total, blk),)](gv, prec, s_c, gp, gd, total, HW * C, C, 1.0 / HW,
                                                      BLOCK=blk)
        K.dw_backward_kernel[(B * H, nwb, triton_cdiv(C, block_c))](
            gd, xc, mean, rstd, g, be, wt, gn, part, H, W, C, nwb, BLOCK_W=block_w, BLOCK_C=block_c,
            num_warps=8)
        del gd
        bc_full = _next_pow2(C)
        bp = max(1, min(16, 4096 // bc_full))
        K.ln_backward_kernel[(triton_cdiv(P, bp),)](gn, xc, gyc, mean, rstd, g, gx, P, C, BLOCK_P=bp,
                                                    BLOCK_C=bc_full, RESIDUAL=residual)
    red = part.sum(0)
    return (gx,
            red[9].to(ln_weight.dtype).clone(),
            red[10].to(ln_bias.dtype).clone(),
            red[:9].t().contiguous().view(C, 1, 3, 3).to(dw_weight.dtype),
            gw1.reshape(R, C, 1, 1).to(fc1_weight.dtype).contiguous(),
            gw2.reshape(C, R, 1, 1).to(fc2_weight.dtype).contiguous(),
            gpw.reshape(C, C, 1, 1).to(pw_weight.dtype).contiguous())


def _register() -> None:
    """Declares dbsam::channel_attention_triton_forward/backward once, with op.py's fake kernels and
    autograd formula (shared with the native ops)."""
    global _registered
    if _registered:
        return
    from . import op

    Tensor = torch.Tensor

    @torch.library.custom_op("dbsam::channel_attention_triton_forward", mutates_args=())
    def _fwd(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, dw_weight: Tensor, fc1_weight: Tensor,
             fc2_weight: Tensor, pw_weight: Tensor, branch_scale: Optional[Tensor], eps: float,
             residual: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        # The torch calls between the kernels (SE MLP, GEMMs) run in the dtypes chosen here, not
        # in those of an enclosing autocast region (as the C++ kernels' NoAutocast guard).
        with torch.autocast(x.device.type, enabled=False):
            return forward_impl(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, branch_scale,
                                eps, residual)

    @torch.library.custom_op("dbsam::channel_attention_triton_backward", mutates_args=())
    def _bwd(grad_y: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, dw_weight: Tensor, fc1_weight: Tensor,
             fc2_weight: Tensor, pw_weight: Tensor, branch_scale: Optional[Tensor], mean: Tensor, rstd: Tensor,
             pooled: Tensor, pre: Tensor, eps: float,
             residual: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            return backward_impl(grad_y, x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight,
                                 branch_scale, mean, rstd, pooled, pre, eps, residual)

    torch.library.register_fake("dbsam::channel_attention_triton_forward")(op.fake_forward)
    torch.library.register_fake("dbsam::channel_attention_triton_backward")(op.fake_backward)
    op.register_autograd_for("dbsam::channel_attention_triton_forward",
                             torch.ops.dbsam.channel_attention_triton_backward)
    _registered = True


def channel_attention_triton(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, branch_scale, eps,
                             residual=True):
    _check_dtype(x)
    _register()
    return torch.ops.dbsam.channel_attention_triton_forward(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight,
                                                            pw_weight, branch_scale, eps, residual)[0]
