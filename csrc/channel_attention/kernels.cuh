// Device code of the channel_attention CUDA op (cuda.cu holds the host side: checks, buffers,
// launches, GEMMs). Kept apart, free of ATen, so that tests/cpp/test_ca_kernels.cpp can compile these
// very kernels for the CPU under a small CUDA emulation (tests/cpp/cuda_emulation.h) and check them
// against plain loops in every CI run, without a GPU.
//
// VEC: consecutive channels per thread (1, 2 or 4), loaded and stored as one access (2 bf16 = 4
// bytes, 4 bf16 = 8 bytes), with the per-pixel LN statistics read once for all VEC channels. The host
// picks 8 bytes per thread by default (bf16: VEC = 4, fp32: 2; up to 1.28x faster than VEC = 1 on
// the H100, cuda.cu pick_vec), overridden by DBSAM_CA_VEC, and only where C % VEC == 0 and the
// buffers are aligned to VEC elements.
#pragma once

#include <stdint.h>

#include "channel_attention/math.h"
#include "common/vec_access.cuh"

namespace dbsam {
namespace ca {

constexpr int TX = 32;  // threads across contiguous channels per block (TX * VEC channels)
constexpr int TY = 8;   // column groups per block
constexpr int WARPS = 8;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per pixel, VEC channels per lane and load. Where x_copy is given, x is also written there
// as it is read: the forward's output buffer, to which the 1x1 GEMM then adds in place (the residual
// as the GEMM's addend without at::baddbmm's separate copy of x: run 5's profile showed it as a
// 33 us device-to-device memcpy at 8x64x64x768 bf16; this pass writes the same bytes, reads none).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void ln_stats_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ mean,
                                acc_t* __restrict__ rstd, int64_t P, int C, acc_t eps,
                                scalar_t* __restrict__ x_copy = nullptr) {
  const int lane = threadIdx.x & 31;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * WARPS + (threadIdx.x >> 5);
  if (p >= P) return;  // whole warps leave together
  const scalar_t* xp = x + p * C;
  acc_t s = 0;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    acc_t xv[VEC];
    load_vec<VEC>(xp + c, xv);
    // Exact: every x dtype widens to its op-math type and narrows back without loss.
    if (x_copy != nullptr) store_vec<VEC>(x_copy + p * C + c, xv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += xv[k];
  }
  const acc_t mu = warp_sum(s) / acc_t(C);
  acc_t v = 0;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    acc_t xv[VEC];
    load_vec<VEC>(xp + c, xv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v += (xv[k] - mu) * (xv[k] - mu);
  }
  v = warp_sum(v) / acc_t(C);
  if (lane == 0) {
    mean[p] = mu;
    rstd[p] = acc_t(1) / sqrt(v + eps);
  }
}

// Sums vals[q][k] over threadIdx.y and writes them to out[q * C + channel]: the block's TX * VEC
// channels are summed by the first VEC rows of threads, consecutive threads on consecutive channels.
template <typename acc_t, int Q, int VEC>
__device__ __forceinline__ void block_sum_rows(const acc_t (&vals)[Q][VEC], acc_t* __restrict__ out, int C) {
  static_assert(VEC <= TY, "the first VEC rows of threads write the sums");
  __shared__ acc_t sh[TY][TX * VEC];
  const int c_block = blockIdx.x * TX * VEC;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) sh[threadIdx.y][threadIdx.x * VEC + k] = vals[q][k];
    __syncthreads();
    if (threadIdx.y < VEC) {
      const int col = threadIdx.y * TX + threadIdx.x;
      if (c_block + col < C) {
        acc_t s = 0;
#pragma unroll
        for (int t = 0; t < TY; ++t) s += sh[t][col];
        out[static_cast<int64_t>(q) * C + c_block + col] = s;
      }
    }
    __syncthreads();
  }
}

// The LN values of column jj, rows i_first .. i_first + NR - 1, of VEC channels from c; 0 off the map
// (DW's zero padding applies to the LN output). gc, bc: the LN affine of those channels. Where xh is
// given, the normalised x of the NR - 2 interior rows too (the backward's LN-affine grads read it; 0
// off the map).
template <typename scalar_t, typename acc_t, int VEC, int NR>
__device__ __forceinline__ void ln_rows(const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                                        const acc_t* __restrict__ rstd, int64_t b, int i_first, int jj, int H,
                                        int W, int C, int c, const acc_t (&gc)[VEC], const acc_t (&bc)[VEC],
                                        acc_t (&col)[NR][VEC], acc_t (*xh)[VEC] = nullptr) {
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const int ii = i_first + r;
    const bool interior = xh != nullptr && r > 0 && r < NR - 1;
    if (ii >= 0 && ii < H && jj >= 0 && jj < W) {
      const int64_t p = (b * H + ii) * W + jj;
      const acc_t mu = mean[p], rs = rstd[p];
      acc_t xv[VEC];
      load_vec<VEC>(x + p * C + c, xv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t n = (xv[k] - mu) * rs;
        col[r][k] = n * gc[k] + bc[k];
        if (interior) xh[r - 1][k] = n;
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        col[r][k] = acc_t(0);
        if (interior) xh[r - 1][k] = acc_t(0);
      }
    }
  }
}

// The grad at the DW output (before GELU), as grad_pre_kernel wrote it, of column jj, rows i_first ..
// i_first + NR - 1, of VEC channels from c; 0 off the map.
template <typename acc_t, int VEC, int NR>
__device__ __forceinline__ void gd_rows(const acc_t* __restrict__ gd, int64_t b, int i_first, int jj, int H, int W,
                                        int C, int c, acc_t (&col)[NR][VEC]) {
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const int ii = i_first + r;
    if (ii >= 0 && ii < H && jj >= 0 && jj < W) {
      load_vec<VEC>(gd + ((b * H + ii) * W + jj) * C + c, col[r]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) col[r][k] = acc_t(0);
    }
  }
}

// The grad at the DW output (before GELU) of column jj, rows i_first .. i_first + NR - 1, of VEC
// channels from c, computed where it is read (the fused variant): (gv * s + gp / HW) * GELU'(pre),
// with sb = s[b, c..], gpb = gp[b, c..] / HW. 0 off the map.
template <typename scalar_t, typename acc_t, int VEC, int NR>
__device__ __forceinline__ void grad_pre_rows(const scalar_t* __restrict__ gv, const scalar_t* __restrict__ pre,
                                              const acc_t (&sb)[VEC], const acc_t (&gpb)[VEC], int64_t b, int i_first,
                                              int jj, int H, int W, int C, int c, acc_t (&col)[NR][VEC]) {
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const int ii = i_first + r;
    if (ii >= 0 && ii < H && jj >= 0 && jj < W) {
      const int64_t o = ((b * H + ii) * W + jj) * C + c;
      acc_t gvv[VEC], pv[VEC];
      load_vec<VEC>(gv + o, gvv);
      load_vec<VEC>(pre + o, pv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) col[r][k] = (gvv[k] * sb[k] + gpb[k]) * gelu_grad(pv[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) col[r][k] = acc_t(0);
    }
  }
}

// The DW taps ([9][C], tap-major) and the LN affine of VEC channels from c, into registers.
template <typename acc_t, int VEC>
__device__ __forceinline__ void channel_params(const acc_t* __restrict__ wt, const acc_t* __restrict__ g,
                                               const acc_t* __restrict__ bta, int C, int c, acc_t (&w)[9][VEC],
                                               acc_t (&gc)[VEC], acc_t (&bc)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
#pragma unroll
    for (int t = 0; t < 9; ++t) w[t][k] = wt[t * C + c + k];
    gc[k] = g[c + k];
    bc[k] = bta[c + k];
  }
}

// win[column][row][channel] moves one column left: [0] <- [1] <- ... <- [NC - 1].
template <typename acc_t, int NC, int NR, int VEC>
__device__ __forceinline__ void shift_window(acc_t (&win)[NC][NR][VEC]) {
#pragma unroll
  for (int col = 0; col + 1 < NC; ++col) {
#pragma unroll
    for (int r = 0; r < NR; ++r) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) win[col][r][k] = win[col + 1][r][k];
    }
  }
}

// RT, rows per thread (1, 2 or 4; DBSAM_CA_ROWS, cuda.cu pick_rows): a thread computes RT adjacent
// output rows of its column run, so each new window column is RT + 2 rows of loads and LN evaluations
// for RT outputs: 3 per output at RT = 1, 2 at RT = 2, 1.5 at RT = 4 (x, mean and rstd alike), at the
// price of (RT + 2) * 3 * VEC window registers and RT times fewer blocks. The row sums (forward) and
// the weight-grad partials (backward) are then per tile of RT rows: [B, ceil(H / RT), ...].

// Forward: u = GELU(DW3x3(LN(x))) and pre = DW3x3(LN(x)) (saved for the backward), both in x's dtype,
// and each tile's channel sums of u. Each thread walks a run of `chunk` adjacent columns with a 3 x
// (RT + 2) window of LN values in registers, computing one new column per step (RT + 2 LN evaluations
// and x loads for RT outputs instead of 9 each). On the H100 (2026-11-27) the version that evaluated
// all 9 taps per output ran at 65% SM throughput with L1TEX stalls at 57% of issue time, 297 us per
// call at 8x64x64x768 bf16; the column walk (RT = 1), 214 us.
// grid (ceil(C / (TX * VEC)), ceil(H / RT), B), block (TX, TY); rowsum [B, ceil(H / RT), C].
// Several rows per thread: two blocks per SM (<= 128 registers) up to VEC * RT = 8; ptxas sm_90 (bf16)
// fits VEC 4 x RT 2 in 128 without a spill (160 unbounded: one block per SM), VEC 4 x RT 4 would spill
// 120 bytes there. At RT = 1 the bound (one block) moved ptxas's counts (bf16 VEC 1/2/4: 56/95/126
// -> 64/90/128 registers) without changing the blocks per SM (4/2/2) from what the H100 runs measured.
template <typename scalar_t, typename acc_t, int VEC, int RT = 1>
__global__ void __launch_bounds__(TX * TY, RT > 1 && VEC * RT < 16 ? 2 : 1) dw_gelu_kernel(
    const scalar_t* __restrict__ x, const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
    const acc_t* __restrict__ g, const acc_t* __restrict__ bta, const acc_t* __restrict__ wt,
    scalar_t* __restrict__ u_out, scalar_t* __restrict__ pre_out, acc_t* __restrict__ rowsum, int H, int W,
    int C) {
  constexpr int NR = RT + 2;
  const int c = (blockIdx.x * TX + threadIdx.x) * VEC;
  const int i0 = blockIdx.y * RT;
  const int64_t b = blockIdx.z;
  const int chunk = (W + TY - 1) / TY;
  const int j0 = threadIdx.y * chunk, j1 = min(W, j0 + chunk);
  acc_t part[1][VEC] = {};
  if (c < C && j0 < j1) {
    acc_t w[9][VEC], gc[VEC], bc[VEC];
    channel_params(wt, g, bta, C, c, w, gc, bc);
    acc_t win[3][NR][VEC];  // [column j-1, j, j+1][row i0-1 .. i0+RT][channel]
    ln_rows(x, mean, rstd, b, i0 - 1, j0 - 1, H, W, C, c, gc, bc, win[0]);
    ln_rows(x, mean, rstd, b, i0 - 1, j0, H, W, C, c, gc, bc, win[1]);
    for (int j = j0; j < j1; ++j) {
      ln_rows(x, mean, rstd, b, i0 - 1, j + 1, H, W, C, c, gc, bc, win[2]);
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        if (RT > 1 && i0 + r >= H) break;  // the last tile's rows past the map
        acc_t pre[VEC], uv[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t acc = 0;
#pragma unroll
          for (int ky = 0; ky < 3; ++ky) {
#pragma unroll
            for (int kx = 0; kx < 3; ++kx) acc += win[kx][r + ky][k] * w[ky * 3 + kx][k];
          }
          pre[k] = acc;
          uv[k] = gelu(acc);
          part[0][k] += uv[k];
        }
        const int64_t o = ((b * H + i0 + r) * W + j) * C + c;
        store_vec<VEC>(u_out + o, uv);
        if (pre_out != nullptr) store_vec<VEC>(pre_out + o, pre);
      }
      shift_window(win);
    }
  }
  if (rowsum != nullptr) block_sum_rows<acc_t, 1, VEC>(part, rowsum + (b * gridDim.y + blockIdx.y) * C, C);
}

// One pass over the saved pre-activation and gv (the grad at the gated activations), per image row:
// v = GELU(pre) * gate[b] in x's dtype (what grad_pw's GEMM reads) and the row's channel sums of
// gv * GELU(pre) (the SE gate's gradient). These were two passes (gated_act over the pixels, then
// chan_dot_gelu over the rows, 40 + 48 us at 8x64x64x768 bf16 in run 4), each reading pre and
// evaluating GELU. grid (ceil(C / (TX * VEC)), H, B), block (TX, TY).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void gate_dot_kernel(const scalar_t* __restrict__ gv, const scalar_t* __restrict__ pre,
                                const acc_t* __restrict__ gate, scalar_t* __restrict__ v, acc_t* __restrict__ out,
                                int H, int W, int C) {
  const int c = (blockIdx.x * TX + threadIdx.x) * VEC;
  const int i = blockIdx.y;
  const int64_t b = blockIdx.z;
  acc_t part[1][VEC] = {};
  if (c < C) {
    acc_t gt[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) gt[k] = gate[b * C + c + k];
    for (int j = threadIdx.y; j < W; j += TY) {
      const int64_t o = ((b * H + i) * W + j) * C + c;
      acc_t av[VEC], pv[VEC], vv[VEC];
      load_vec<VEC>(gv + o, av);
      load_vec<VEC>(pre + o, pv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t u = gelu(pv[k]);
        part[0][k] += av[k] * u;
        vv[k] = u * gt[k];
      }
      store_vec<VEC>(v + o, vv);
    }
  }
  block_sum_rows<acc_t, 1, VEC>(part, out + (b * H + i) * C, C);
}

// gd = (gv * s[b] + gp[b] / HW) * GELU'(pre), written to an acc_t map for dw_backward_kernel
// (FUSED = false). block (32, WARPS): a warp walks one pixel's channels, VEC per lane and access;
// pixels grid-stride over threadIdx.y and the blocks. Indexing by (pixel, channel) keeps 64-bit
// divisions out of the per-element work (one per pixel: its image b); the flat version divided
// every element's index by HWC and C, and ptxas sm_90 made it 122 instructions per element (bf16).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void grad_pre_kernel(const scalar_t* __restrict__ gv, const scalar_t* __restrict__ pre,
                                const acc_t* __restrict__ s, const acc_t* __restrict__ gp, acc_t* __restrict__ gd,
                                int64_t P, int64_t HW, int C, acc_t inv_hw) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; p < P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t b = p / HW;
    const acc_t* sb = s + b * C;
    const acc_t* gpb = gp + b * C;
    for (int c = threadIdx.x * VEC; c < C; c += 32 * VEC) {
      const int64_t idx = p * C + c;
      acc_t gvv[VEC], pv[VEC], out[VEC];
      load_vec<VEC>(gv + idx, gvv);
      load_vec<VEC>(pre + idx, pv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = (gvv[k] * sb[c + k] + gpb[c + k] * inv_hw) * gelu_grad(pv[k]);
      store_vec<VEC>(gd + idx, out);
    }
  }
}

// Transposed DW (gn = grad at the LN output) + per-block partials [B * ceil(H / RT), 11, C] of grad_dw
// (9 taps), grad_ln_weight, grad_ln_bias. grid (ceil(C / (TX * VEC)), ceil(H / RT), B), block (TX,
// TY); RT rows per thread as in dw_gelu_kernel. The grad at the DW output comes either from gd, the
// map grad_pre_kernel wrote (FUSED = false, the default), or is formed where the window loads it from
// gv (the grad at the gated activations), the saved pre, the gate s [B, C] and gp [B, C] (FUSED =
// true, DBSAM_CA_FUSED_GRAD=1). Fusing saves grad_pre's pass and the fp32 map, but every gd value
// enters three rows' windows, so GELU' is evaluated three times per pixel: ptxas sm_90 (bf16) puts
// the fused loop at 394 instructions per output against 112 for this kernel plus 122 for grad_pre's
// per element at VEC = 1 (262 against 95 + 81 at VEC = 2). Which is faster depends on how far the
// kernels are from issue-bound: the GPU A/B decides (it lost at RT = 1).
// Two blocks per SM for VEC < 4 and VEC * RT < 8 (4 when FUSED) (the fused variant wanted 143
// registers at VEC = 2, which leaves one 256-thread block per SM: 8 warps to hide the window loads;
// VEC 2 x RT 2 fits 128 without a spill, 138 unbounded, but FUSED spills 16 bytes there); the others
// take up to 255 (VEC = 4 spills ~440 bytes at 128).
template <typename scalar_t, typename acc_t, int VEC, bool FUSED, int RT = 1>
__global__ void __launch_bounds__(TX * TY, VEC >= 4 || VEC * RT >= (FUSED ? 4 : 8) ? 1 : 2) dw_backward_kernel(
    const acc_t* __restrict__ gd, const scalar_t* __restrict__ gv, const scalar_t* __restrict__ pre,
    const acc_t* __restrict__ s, const acc_t* __restrict__ gp, acc_t inv_hw, const scalar_t* __restrict__ x,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, const acc_t* __restrict__ g,
    const acc_t* __restrict__ bta, const acc_t* __restrict__ wt, acc_t* __restrict__ gn_out,
    acc_t* __restrict__ partials, int H, int W, int C) {
  constexpr int NR = RT + 2;
  const int c = (blockIdx.x * TX + threadIdx.x) * VEC;
  const int i0 = blockIdx.y * RT;
  const int64_t b = blockIdx.z;
  const int chunk = (W + TY - 1) / TY;
  const int j0 = threadIdx.y * chunk, j1 = min(W, j0 + chunk);
  acc_t part[11][VEC] = {};
  if (c < C && j0 < j1) {
    acc_t w[9][VEC], gc[VEC], bc[VEC], sb[VEC], gpb[VEC];
    channel_params(wt, g, bta, C, c, w, gc, bc);
    if constexpr (FUSED) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        sb[k] = s[b * C + c + k];
        gpb[k] = gp[b * C + c + k] * inv_hw;
      }
    }
    auto grad_column = [&](int jj, acc_t(&col)[NR][VEC]) {
      if constexpr (FUSED) {
        grad_pre_rows(gv, pre, sb, gpb, b, i0 - 1, jj, H, W, C, c, col);
      } else {
        gd_rows(gd, b, i0 - 1, jj, H, W, C, c, col);
      }
    };
    // The same column walk as dw_gelu_kernel, with two windows: the grad at the DW output (gd) and
    // the LN values, [column j-1, j, j+1][row i0-1 .. i0+RT][channel], and the normalised x of the
    // centre and next columns' output rows (xh). Before the walk: 721 us per call at 8x64x64x768 bf16
    // on the H100 (2026-11-27), 9 gd loads and 9 LN evaluations per pixel; after (RT = 1), 343.
    acc_t gwin[3][NR][VEC], lwin[3][NR][VEC], xh[2][RT][VEC];
    grad_column(j0 - 1, gwin[0]);
    grad_column(j0, gwin[1]);
    ln_rows(x, mean, rstd, b, i0 - 1, j0 - 1, H, W, C, c, gc, bc, lwin[0]);
    ln_rows(x, mean, rstd, b, i0 - 1, j0, H, W, C, c, gc, bc, lwin[1], xh[0]);
    for (int j = j0; j < j1; ++j) {
      grad_column(j + 1, gwin[2]);
      ln_rows(x, mean, rstd, b, i0 - 1, j + 1, H, W, C, c, gc, bc, lwin[2], xh[1]);
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        if (RT > 1 && i0 + r >= H) break;  // the last tile's rows past the map
        acc_t gn[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t gdo = gwin[1][r + 1][k];
          acc_t s = 0;
#pragma unroll
          for (int ky = 0; ky < 3; ++ky) {
#pragma unroll
            for (int kx = 0; kx < 3; ++kx) {
              // output (i - ky + 1, j - kx + 1) read this pixel through tap (ky, kx)
              s += gwin[2 - kx][r + 2 - ky][k] * w[ky * 3 + kx][k];
              // this output read (i + ky - 1, j + kx - 1) through tap (ky, kx)
              part[ky * 3 + kx][k] += gdo * lwin[kx][r + ky][k];
            }
          }
          part[9][k] += s * xh[0][r][k];
          part[10][k] += s;
          gn[k] = s;
        }
        store_vec<VEC>(gn_out + ((b * H + i0 + r) * W + j) * C + c, gn);
      }
      shift_window(gwin);
      shift_window(lwin);
      shift_window(xh);
    }
  }
  block_sum_rows<acc_t, 11, VEC>(part, partials + (b * gridDim.y + blockIdx.y) * 11 * C, C);
}

// One warp per pixel, VEC channels per lane and load: gx = gy + rstd * (gn*g - mean(gn*g) - xhat *
// mean(gn*g*xhat)); gy == nullptr (the op without its residual): no gy term.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void ln_backward_kernel(const acc_t* __restrict__ gn, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ gy, const acc_t* __restrict__ mean,
                                   const acc_t* __restrict__ rstd, const acc_t* __restrict__ g,
                                   scalar_t* __restrict__ gx, int64_t P, int C) {
  const int lane = threadIdx.x & 31;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * WARPS + (threadIdx.x >> 5);
  if (p >= P) return;
  const acc_t mu = mean[p], rs = rstd[p];
  const int64_t base = p * C;
  acc_t s1 = 0, s2 = 0;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    acc_t gnv[VEC], xv[VEC];
    load_vec<VEC>(gn + base + c, gnv);
    load_vec<VEC>(x + base + c, xv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t gxh = gnv[k] * g[c + k];
      s1 += gxh;
      s2 += gxh * (xv[k] - mu) * rs;
    }
  }
  s1 = warp_sum(s1) / acc_t(C);
  s2 = warp_sum(s2) / acc_t(C);
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    acc_t gnv[VEC], xv[VEC], gyv[VEC], out[VEC];
    load_vec<VEC>(gn + base + c, gnv);
    load_vec<VEC>(x + base + c, xv);
    if (gy != nullptr) {
      load_vec<VEC>(gy + base + c, gyv);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) gyv[k] = acc_t(0);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t xh = (xv[k] - mu) * rs;
      out[k] = gyv[k] + rs * (gnv[k] * g[c + k] - s1 - xh * s2);
    }
    store_vec<VEC>(gx + base + c, out);
  }
}

// ---- The SE MLP, the small weights and the final reductions: direct launches, no ATen calls ----
// Why here and not as ATen ops: at B = 1 every implementation measured on the H100 ran at its host's
// pace (run 3, bf16 fwd+bwd: this op 1.95 ms at B = 1 against 3.37 ms at B = 8, eager NCHW 1.90
// against 1.82 ms), and at B = 8 run 4's op took 2383 us for 1745 us of kernels. Each ATen call
// costs the host several microseconds of dispatch, allocation and launch; the SE MLP, the weight
// conversions and the reductions of the grads were ~50 of them per forward + backward, each with
// a kernel of a few microseconds. Here they are ~10 launches.

// Where each small weight sits in the one op-math buffer pack_weights_kernel fills: the LN affine
// g, b [C]; the DW taps wt [9][C] (tap-major); fc1 w1 [R][C], fc2 w2 [C][R], the 1x1 weight wp [C][C];
// and, for the backward's products, w1t = w1^T [C][R] and w2t = w2^T [R][C] (so every warp_dot
// reads a contiguous row).
struct WeightLayout {
  int64_t C, R;
  bool transposes;
  DBSAM_CA_HD int64_t g() const { return 0; }
  DBSAM_CA_HD int64_t b() const { return C; }
  DBSAM_CA_HD int64_t wt() const { return 2 * C; }
  DBSAM_CA_HD int64_t w1() const { return 11 * C; }
  DBSAM_CA_HD int64_t w2() const { return w1() + R * C; }
  DBSAM_CA_HD int64_t wp() const { return w2() + C * R; }
  DBSAM_CA_HD int64_t w1t() const { return wp() + C * C; }
  DBSAM_CA_HD int64_t w2t() const { return w1t() + C * R; }
  DBSAM_CA_HD int64_t total() const { return transposes ? w2t() + R * C : w1t(); }
};

// A weight or a weight's grad is stored in x's dtype or, under AMP, in float32: each of the op's six
// is one or the other (bit i of a mask set: float32), so one instantiation serves both.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_weight(const void* p, bool is_float, int64_t i) {
  return is_float ? static_cast<acc_t>(static_cast<const float*>(p)[i])
                  : static_cast<acc_t>(static_cast<const scalar_t*>(p)[i]);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_weight(void* p, bool is_float, int64_t i, acc_t v) {
  if (is_float) {
    static_cast<float*>(p)[i] = static_cast<float>(v);
  } else {
    static_cast<scalar_t*>(p)[i] = static_cast<scalar_t>(v);
  }
}

// The op's six weights in the order of its schema: ln_weight [C], ln_bias [C], dw_weight [C, 1, 3, 3],
// fc1_weight [R, C, 1, 1], fc2_weight [C, R, 1, 1], pw_weight [C, C, 1, 1], contiguous.
enum WeightIndex { kLnWeight = 0, kLnBias, kDw, kFc1, kFc2, kPw };

struct WeightPtrs {
  const void* p[6];
  unsigned float_mask;  // bit i: weight i is float32 (else x's dtype)
};

// Element j of weight K. K is a constant in every call: w.p[k] with a run-time k put the pointer
// array on the stack (ptxas: a 56-byte frame).
template <int K, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t weight_at(const WeightPtrs& w, int64_t j) {
  return load_weight<scalar_t, acc_t>(w.p[K], (w.float_mask >> K) & 1u, j);
}

// Every small weight converted to op-math and laid out as WeightLayout says, in one launch (it was
// eight ATen conversions and copies per call). Grid-stride over L.total().
template <typename scalar_t, typename acc_t>
__global__ void pack_weights_kernel(WeightPtrs w, WeightLayout L, acc_t* __restrict__ out) {
  const int64_t C = L.C, R = L.R, total = L.total();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t v;
    if (i < L.b()) {
      v = weight_at<kLnWeight, scalar_t, acc_t>(w, i);
    } else if (i < L.wt()) {
      v = weight_at<kLnBias, scalar_t, acc_t>(w, i - L.b());
    } else if (i < L.w1()) {
      const int64_t t = i - L.wt(), k = t / C, c = t - k * C;  // wt[k][c] = dw[c][k]
      v = weight_at<kDw, scalar_t, acc_t>(w, c * 9 + k);
    } else if (i < L.w2()) {
      v = weight_at<kFc1, scalar_t, acc_t>(w, i - L.w1());
    } else if (i < L.wp()) {
      v = weight_at<kFc2, scalar_t, acc_t>(w, i - L.w2());
    } else if (i < L.w1t()) {
      v = weight_at<kPw, scalar_t, acc_t>(w, i - L.wp());
    } else if (i < L.w2t()) {
      const int64_t t = i - L.w1t(), c = t / R, r = t - c * R;  // w1t[c][r] = w1[r][c]
      v = weight_at<kFc1, scalar_t, acc_t>(w, r * C + c);
    } else {
      const int64_t t = i - L.w2t(), r = t / C, c = t - r * C;  // w2t[r][c] = w2[c][r]
      v = weight_at<kFc2, scalar_t, acc_t>(w, c * R + r);
    }
    out[i] = v;
  }
}

// sum_k a[k] * b[k] over one warp (every lane gets it), four independent partial sums per lane.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const acc_t* a, const acc_t* __restrict__ b, int n, int lane) {
  acc_t s[4] = {0, 0, 0, 0};
  int k = lane;
  for (; k + 96 < n; k += 128) {
#pragma unroll
    for (int q = 0; q < 4; ++q) s[q] += a[k + 32 * q] * b[k + 32 * q];
  }
  for (; k < n; k += 32) s[0] += a[k] * b[k];
  return warp_sum((s[0] + s[1]) + (s[2] + s[3]));
}

// t = sum_k a[b, k] * w[r, k] for a small batch B (a [B, K], w [R, K], rows contiguous), one warp per
// (b, r), then epi(b, r, t) on lane 0: the SE MLP's products with their elementwise step fused. cuBLAS
// ran the backward's K = 768 products (B = 8, R = 192, fp32) as SIMT GEMMs of two thread blocks, ~55
// us each on the H100 (run 4's profile), and one block per image doing the whole MLP (the first SE
// kernel) 64-212 us: here B * R warps read coalesced rows.
template <typename acc_t, typename Epi>
__global__ void small_mm_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ w, int B, int R, int K,
                                Epi epi) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= static_cast<int64_t>(B) * R) return;  // whole warps leave together
  const int64_t b = warp / R, r = warp - b * R;
  const acc_t t = warp_dot(a + b * K, w + r * K, K, lane);
  if (lane == 0) epi(b, r, t);
}

// out[b, r] = t
template <typename acc_t>
struct StoreEpi {
  acc_t* out;
  int R;
  __device__ void operator()(int64_t b, int64_t r, acc_t t) const { out[b * R + r] = t; }
};

// The SE hidden units: h = GELU(t), and the pre-activation a = t where a is wanted (the backward's GELU').
template <typename acc_t>
struct HiddenEpi {
  acc_t* a;  // may be null
  acc_t* h;
  int R;
  __device__ void operator()(int64_t b, int64_t r, acc_t t) const {
    if (a != nullptr) a[b * R + r] = t;
    h[b * R + r] = gelu(t);
  }
};

// The SE gate: s = sigmoid(t) (kept where s_raw is given: the backward's s(1 - s)) and the gate the
// kernels apply, gate = s * scale[b] (drop-path's per-sample factor; scale may be null).
template <typename acc_t>
struct GateEpi {
  const acc_t* scale;  // may be null
  acc_t* gate;
  acc_t* s_raw;  // may be null
  int C;
  __device__ void operator()(int64_t b, int64_t c, acc_t t) const {
    const acc_t s = acc_t(1) / (acc_t(1) + ca_exp(-t));
    if (s_raw != nullptr) s_raw[b * C + c] = s;
    gate[b * C + c] = scale != nullptr ? s * scale[b] : s;
  }
};

// The grad at the SE hidden pre-activation: ga = t * GELU'(a).
template <typename acc_t>
struct GeluGradEpi {
  const acc_t* a;
  acc_t* ga;
  int R;
  __device__ void operator()(int64_t b, int64_t r, acc_t t) const { ga[b * R + r] = t * gelu_grad(a[b * R + r]); }
};

// t = sum over rows h of v[b, h, c] for v [B, H, C], then epi(b, c, t): the forward's per-row channel
// sums into the pooled means, the backward's per-row gate grad sums, dw_backward's per-row partials
// into the DW and LN-affine grads. Block (32, SR): 32 consecutive columns, the rows split over
// threadIdx.y (four loads in flight per thread), the SR partial sums combined in shared memory in a
// fixed order (deterministic). grid (ceil(C / 32), B). One thread per column looping over all rows
// (the first version) kept too few loads in flight: 8448 threads for the partials' 512 rows at
// 8x64x64x768, ~17 MB read at ~0.1-0.2 TB/s by Little's law.
constexpr int SR = 8;

template <typename acc_t, typename Epi>
__global__ void __launch_bounds__(32 * SR) sum_rows_kernel(const acc_t* __restrict__ v, int64_t H, int C, Epi epi) {
  __shared__ acc_t sh[SR][32];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t b = blockIdx.y;
  acc_t s[4] = {0, 0, 0, 0};
  if (c < C) {
    const acc_t* vb = v + b * H * C + c;
    int64_t h = threadIdx.y;
    for (; h + 3 * SR < H; h += 4 * SR) {
#pragma unroll
      for (int q = 0; q < 4; ++q) s[q] += vb[(h + q * SR) * C];
    }
    for (; h < H; h += SR) s[0] += vb[h * C];
  }
  sh[threadIdx.y][threadIdx.x] = (s[0] + s[1]) + (s[2] + s[3]);
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t t = 0;
#pragma unroll
    for (int y = 0; y < SR; ++y) t += sh[y][threadIdx.x];
    epi(b, c, t);
  }
}

// The SE input: pooled = (sum of the row sums) / HW.
template <typename acc_t>
struct PoolEpi {
  acc_t* pooled;
  acc_t inv_hw;
  int C;
  __device__ void operator()(int64_t b, int64_t c, acc_t t) const { pooled[b * C + c] = t * inv_hw; }
};

// The grad at the gate's logit: gz = (sum over pixels of gv * u) * scale[b] * s (1 - s).
template <typename acc_t>
struct GateGradEpi {
  const acc_t* scale;  // may be null
  const acc_t* s;
  acc_t* gz;
  int C;
  __device__ void operator()(int64_t b, int64_t c, acc_t t) const {
    const acc_t sv = s[b * C + c];
    gz[b * C + c] = (scale != nullptr ? t * scale[b] : t) * sv * (acc_t(1) - sv);
  }
};

// wf[b, co, ci] = wp[co, ci] * gate[b, ci], in x's dtype: the 1x1 weight with the gate folded in
// (the GEMM takes its transpose as a view).
template <typename scalar_t, typename acc_t>
__global__ void fold_kernel(const acc_t* __restrict__ wp, const acc_t* __restrict__ gate,
                            scalar_t* __restrict__ wf, int64_t total, int C) {
  const int64_t CC = static_cast<int64_t>(C) * C;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / CC, k = idx - b * CC;
    wf[idx] = static_cast<scalar_t>(wp[k] * gate[b * C + k % C]);
  }
}

// The SE weights' grads, summed over the batch in a fixed order and stored in each weight's dtype:
// grad_fc1[r, c] = sum_b ga[b, r] pooled[b, c], grad_fc2[c, r] = sum_b gz[b, c] h[b, r]. One thread
// per weight element (consecutive threads on a weight's contiguous index), grid-stride over 2 R C.
template <typename scalar_t, typename acc_t>
__global__ void se_weight_grad_kernel(const acc_t* __restrict__ ga, const acc_t* __restrict__ pooled,
                                      const acc_t* __restrict__ gz, const acc_t* __restrict__ h, int B, int R,
                                      int C, void* gw1, bool gw1_float, void* gw2, bool gw2_float) {
  const int64_t RC = static_cast<int64_t>(R) * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < 2 * RC;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = 0;
    if (i < RC) {
      const int64_t r = i / C, c = i - r * C;
      for (int b = 0; b < B; ++b) s += ga[static_cast<int64_t>(b) * R + r] * pooled[static_cast<int64_t>(b) * C + c];
      store_weight<scalar_t, acc_t>(gw1, gw1_float, i, s);
    } else {
      const int64_t j = i - RC, c = j / R, r = j - c * R;
      for (int b = 0; b < B; ++b) s += gz[static_cast<int64_t>(b) * C + c] * h[static_cast<int64_t>(b) * R + r];
      store_weight<scalar_t, acc_t>(gw2, gw2_float, j, s);
    }
  }
}

// dw_backward_kernel's partials [rows = B*H, 11 * C] summed over the rows (sum_rows_kernel with one
// "image" of 11 C columns): column k C + c is tap k of channel c's grad_dw [C, 1, 3, 3] for k < 9,
// grad_ln_weight[c] for k = 9, grad_ln_bias[c] for k = 10, each stored in its weight's dtype.
template <typename scalar_t, typename acc_t>
struct PartialsEpi {
  void* gdw;
  void* glnw;
  void* glnb;
  bool gdw_float, glnw_float, glnb_float;
  int C;
  __device__ void operator()(int64_t, int64_t i, acc_t t) const {
    const int64_t k = i / C, c = i - k * C;
    if (k < 9) {
      store_weight<scalar_t, acc_t>(gdw, gdw_float, c * 9 + k, t);
    } else if (k == 9) {
      store_weight<scalar_t, acc_t>(glnw, glnw_float, c, t);
    } else {
      store_weight<scalar_t, acc_t>(glnb, glnb_float, c, t);
    }
  }
};

}  // namespace ca
}  // namespace dbsam
