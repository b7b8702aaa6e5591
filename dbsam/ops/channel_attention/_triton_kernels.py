"""Triton kernels of channel_attention (imported only by triton.py, only when Triton is used).

Same stages as csrc/channel_attention/cuda.cu: LN statistics; LN-apply + DW3x3 + GELU + per-tile
channel sums; the gated activations + the gate's gradient sums (gate_dot); GELU-derivative/pooled-
gradient pass; transposed DW + grad_dw/LN-affine partials; LN backward. All math in float32 (inputs
float32/float16/bfloat16). Only core tl features present in both Triton 3.6 and 3.8 are used (tl.erf,
tl.static_range, masks), and no @triton.jit helper functions (the LN-apply of a tap is written
inline), which also keeps the interpreter happy when TRITON_INTERPRET is set after triton was imported.
"""
import triton
import triton.language as tl

# Compiled kernels may read only constexpr globals (the interpreter accepts plain floats too).
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def ln_stats_kernel(X, MEAN, RSTD, P, C, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < P
    m = rmask[:, None] & (cols < C)[None, :]
    x = tl.load(X + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mu = tl.sum(x, axis=1) / C
    xc = tl.where(m, x - mu[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    tl.store(MEAN + rows, mu, mask=rmask)
    tl.store(RSTD + rows, 1.0 / tl.sqrt(var + eps), mask=rmask)


@triton.jit
def dw_gelu_kernel(X, MEAN, RSTD, G, BETA, WT, U, D, ROWPART, H, W, C, NWB,
                   WRITE_D: tl.constexpr, WRITE_SUM: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)  # b * H + i
    pid_w = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = pid_r // H
    i = pid_r % H
    js = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    jmask = js < W
    cmask = cs < C
    g = tl.load(G + cs, mask=cmask, other=0.0)
    be = tl.load(BETA + cs, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for ky in tl.static_range(3):
        for kx in tl.static_range(3):
            ii = i + ky - 1
            jj = js + kx - 1
            pm = jmask & (jj >= 0) & (jj < W) & (ii >= 0) & (ii < H)
            pix = (b * H + ii).to(tl.int64) * W + jj
            mu = tl.load(MEAN + pix, mask=pm, other=0.0)
            rs = tl.load(RSTD + pix, mask=pm, other=0.0)
            m2 = pm[:, None] & cmask[None, :]
            xv = tl.load(X + pix[:, None] * C + cs[None, :], mask=m2, other=0.0).to(tl.float32)
            n = tl.where(m2, (xv - mu[:, None]) * rs[:, None] * g[None, :] + be[None, :], 0.0)  # 0 = padding
            w = tl.load(WT + (ky * 3 + kx) * C + cs, mask=cmask, other=0.0)
            acc += n * w[None, :]
    u = 0.5 * acc * (1.0 + tl.erf(acc * SQRT1_2))
    om = jmask[:, None] & cmask[None, :]
    offs = ((b * H + i).to(tl.int64) * W + js)[:, None] * C + cs[None, :]
    tl.store(U + offs, u.to(U.dtype.element_ty), mask=om)
    if WRITE_D:
        tl.store(D + offs, acc.to(D.dtype.element_ty), mask=om)
    if WRITE_SUM:
        s = tl.sum(tl.where(om, u, 0.0), axis=0)
        tl.store(ROWPART + (pid_r * NWB + pid_w).to(tl.int64) * C + cs, s, mask=cmask)


@triton.jit
def gate_dot_kernel(PRE, GV, S, V, ROWPART, H, W, C, NWB, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """From the saved DW output, in one pass over a [BLOCK_W, BLOCK_C] tile of one image row: the gated
    activations V = GELU(PRE) * S[b] (what grad_pw's GEMM reads) and the tile's channel sums of
    GV * GELU(PRE) (the SE gate's gradient). Both used to be full-map torch passes in float32
    (a float32 copy of pre, GELU, two casts, two products and a sum: ~1.2 GB of traffic at
    8x64x64x768 bf16 against 0.15 GB here)."""
    pid_r = tl.program_id(0)  # b * H + i
    pid_w = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = pid_r // H
    js = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    om = (js < W)[:, None] & cmask[None, :]
    offs = (pid_r.to(tl.int64) * W + js)[:, None] * C + cs[None, :]
    d = tl.load(PRE + offs, mask=om, other=0.0).to(tl.float32)
    gv = tl.load(GV + offs, mask=om, other=0.0).to(tl.float32)
    s = tl.load(S + b * C + cs, mask=cmask, other=0.0)
    u = 0.5 * d * (1.0 + tl.erf(d * SQRT1_2))
    tl.store(V + offs, (u * s[None, :]).to(V.dtype.element_ty), mask=om)
    tl.store(ROWPART + (pid_r * NWB + pid_w).to(tl.int64) * C + cs, tl.sum(gv * u, axis=0), mask=cmask)


@triton.jit
def grad_pre_kernel(GV, PRE, S, GP, GD, total, HWC, C, inv_hw, BLOCK: tl.constexpr):
    """GD = (GV * S[b] + GP[b] / HW) * gelu'(PRE), in float32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    bc = (offs // HWC) * C + offs % C
    gv = tl.load(GV + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(PRE + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.load(S + bc, mask=m, other=0.0)
    gp = tl.load(GP + bc, mask=m, other=0.0)
    cdf = 0.5 * (1.0 + tl.erf(d * SQRT1_2))
    pdf = tl.exp(-0.5 * d * d) * INV_SQRT_2PI
    tl.store(GD + offs, (gv * s + gp * inv_hw) * (cdf + d * pdf), mask=m)


@triton.jit
def dw_backward_kernel(GD, X, MEAN, RSTD, G, BETA, WT, GN, PART, H, W, C, NWB,
                       BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """GN = transposed DW of GD; PART[tile, 0:9] = grad_dw taps, [9] grad_ln_weight, [10] grad_ln_bias."""
    pid_r = tl.program_id(0)
    pid_w = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = pid_r // H
    i = pid_r % H
    js = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    jmask = js < W
    cmask = cs < C
    om = jmask[:, None] & cmask[None, :]
    g = tl.load(G + cs, mask=cmask, other=0.0)
    be = tl.load(BETA + cs, mask=cmask, other=0.0)
    opix = (b * H + i).to(tl.int64) * W + js
    offs = opix[:, None] * C + cs[None, :]
    gdo = tl.load(GD + offs, mask=om, other=0.0)
    gn = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    part = PART + (pid_r * NWB + pid_w).to(tl.int64) * 11 * C
    for ky in tl.static_range(3):
        for kx in tl.static_range(3):
            w = tl.load(WT + (ky * 3 + kx) * C + cs, mask=cmask, other=0.0)
            io = i - ky + 1
            jo = js - kx + 1
            pm = jmask & (jo >= 0) & (jo < W) & (io >= 0) & (io < H)
            qpix = (b * H + io).to(tl.int64) * W + jo
            gq = tl.load(GD + qpix[:, None] * C + cs[None, :], mask=pm[:, None] & cmask[None, :], other=0.0)
            gn += gq * w[None, :]
            ii = i + ky - 1
            jj = js + kx - 1
            pm = jmask & (jj >= 0) & (jj < W) & (ii >= 0) & (ii < H)
            pix = (b * H + ii).to(tl.int64) * W + jj
            mu = tl.load(MEAN + pix, mask=pm, other=0.0)
            rs = tl.load(RSTD + pix, mask=pm, other=0.0)
            m2 = pm[:, None] & cmask[None, :]
            xv = tl.load(X + pix[:, None] * C + cs[None, :], mask=m2, other=0.0).to(tl.float32)
            n = tl.where(m2, (xv - mu[:, None]) * rs[:, None] * g[None, :] + be[None, :], 0.0)  # 0 = padding
            tl.store(part + (ky * 3 + kx) * C + cs, tl.sum(gdo * n, axis=0), mask=cmask)
    mu = tl.load(MEAN + opix, mask=jmask, other=0.0)
    rs = tl.load(RSTD + opix, mask=jmask, other=0.0)
    xv = tl.load(X + offs, mask=om, other=0.0).to(tl.float32)
    xh = tl.where(om, (xv - mu[:, None]) * rs[:, None], 0.0)
    tl.store(part + 9 * C + cs, tl.sum(gn * xh, axis=0), mask=cmask)
    tl.store(part + 10 * C + cs, tl.sum(gn, axis=0), mask=cmask)
    tl.store(GN + offs, gn, mask=om)


@triton.jit
def ln_backward_kernel(GN, X, GY, MEAN, RSTD, G, GX, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                       RESIDUAL: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < P
    cmask = cols < C
    m = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    mu = tl.load(MEAN + rows, mask=rmask, other=0.0)
    rs = tl.load(RSTD + rows, mask=rmask, other=0.0)
    g = tl.load(G + cols, mask=cmask, other=0.0)
    gn = tl.load(GN + offs, mask=m, other=0.0)
    xv = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    xh = tl.where(m, (xv - mu[:, None]) * rs[:, None], 0.0)
    gxh = gn * g[None, :]
    s1 = tl.sum(gxh, axis=1) / C
    s2 = tl.sum(gxh * xh, axis=1) / C
    gx = rs[:, None] * (gxh - s1[:, None] - xh * s2[:, None])
    if RESIDUAL:  # the op's residual x: its gradient grad_y passes straight through
        gx += tl.load(GY + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=m)
