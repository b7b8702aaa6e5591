// CUDA kernels of the channel-attention adapter y = x + PW1x1(SE(GELU(DW3x3(LN(x))))), channels-last.
//
// Forward (x read twice, u written once, then one GEMM):
//   ln_stats      one warp per pixel: LN mean/rstd in fp32 (fp64 for double).
//   dw_gelu       one block per (32 channels, image row, image); the LN is applied on the fly to the
//                 3x3 neighbourhood (9 reads per output, served by L1/L2), DW3x3 + GELU, u written in
//                 x's dtype and the row's channel sums reduced in shared memory into rowsum[B, H, C]
//                 (deterministic: no atomics; the H-sum is one tiny ATen reduction).
//   se_gate       one block per image: pooled means from the row sums, the SE MLP (one warp per
//                 hidden unit / channel, coalesced weight rows), the gate times the drop-path factor.
//   fold          the gate folded into the 1x1 weight per image, in x's dtype: wf[b] = Wp * gate[b].
//   1x1 conv      one batched cuBLAS GEMM (at::baddbmm) on wf^T (a view) with the residual x as the
//                 GEMM's addend.
// Backward (recomputes LN/DW from x and the saved statistics; nothing [B,H,W,C] is saved):
//   dw_gelu (again, writing the pre-activation in fp32), two GEMMs (grad_pw, grad at the gated
//   activations), chan_dot (per-channel sums of grad*u, for the SE backward), the SE backward in ATen,
//   grad_pre (GELU derivative + pooled-mean gradient, in place), dw_backward (transposed DW, grad_dw
//   and LN-affine partial sums per block, deterministic), ln_backward (one warp per pixel, + residual).
//
// Current stream, device guard, 64-bit offsets for every [B,H,W,C] index.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <tuple>

#include "channel_attention/checks.h"
#include "channel_attention/math.h"

namespace dbsam {
namespace ca {
namespace {

constexpr int TX = 32;  // channels per block (one warp across contiguous channels)
constexpr int TY = 8;   // column groups per block
constexpr int WARPS = 8;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void ln_stats_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ mean,
                                acc_t* __restrict__ rstd, int64_t P, int C, acc_t eps) {
  const int lane = threadIdx.x & 31;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * WARPS + (threadIdx.x >> 5);
  if (p >= P) return;  // whole warps leave together
  const scalar_t* xp = x + p * C;
  acc_t s = 0;
  for (int c = lane; c < C; c += 32) s += static_cast<acc_t>(xp[c]);
  const acc_t mu = warp_sum(s) / acc_t(C);
  acc_t v = 0;
  for (int c = lane; c < C; c += 32) {
    const acc_t t = static_cast<acc_t>(xp[c]) - mu;
    v += t * t;
  }
  v = warp_sum(v) / acc_t(C);
  if (lane == 0) {
    mean[p] = mu;
    rstd[p] = acc_t(1) / sqrt(v + eps);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t ln_at(const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                                       const acc_t* __restrict__ rstd, int64_t p, int C, int c, acc_t gc,
                                       acc_t bc) {
  return (static_cast<acc_t>(x[p * C + c]) - mean[p]) * rstd[p] * gc + bc;
}

// Sums `vals[q]` over threadIdx.y and writes them to out[q * C + c] (threadIdx.y == 0).
template <typename acc_t, int Q>
__device__ __forceinline__ void block_sum_rows(const acc_t (&vals)[Q], acc_t* __restrict__ out, int C,
                                               int c) {
  __shared__ acc_t sh[TY][TX];
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    sh[threadIdx.y][threadIdx.x] = vals[q];
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      acc_t s = 0;
#pragma unroll
      for (int t = 0; t < TY; ++t) s += sh[t][threadIdx.x];
      out[static_cast<int64_t>(q) * C + c] = s;
    }
    __syncthreads();
  }
}

// The LN values of column jj, rows i-1, i, i+1, of one channel; 0 off the map (DW's zero padding
// applies to the LN output).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void ln_column(const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                                          const acc_t* __restrict__ rstd, int64_t b, int i, int jj, int H,
                                          int W, int C, int c, acc_t gc, acc_t bc, acc_t (&col)[3]) {
#pragma unroll
  for (int r = 0; r < 3; ++r) {
    const int ii = i + r - 1;
    col[r] = (ii >= 0 && ii < H && jj >= 0 && jj < W) ? ln_at(x, mean, rstd, (b * H + ii) * W + jj, C, c, gc, bc)
                                                       : acc_t(0);
  }
}

// The grad at the DW output of column jj, rows i-1, i, i+1, of one channel; 0 off the map.
template <typename acc_t>
__device__ __forceinline__ void gd_column(const acc_t* __restrict__ gd, int64_t b, int i, int jj, int H, int W,
                                          int C, int c, acc_t (&col)[3]) {
#pragma unroll
  for (int r = 0; r < 3; ++r) {
    const int ii = i + r - 1;
    col[r] = (ii >= 0 && ii < H && jj >= 0 && jj < W) ? gd[((b * H + ii) * W + jj) * C + c] : acc_t(0);
  }
}

// Each thread walks a run of `chunk` adjacent columns with a 3x3 window of LN values in registers,
// computing one new column per output (3 LN evaluations and x loads instead of 9). On the H100
// (2026-11-27) the version that evaluated all 9 taps per output ran at 65% SM throughput with
// L1TEX stalls at 57% of issue time, 297 us per call at 8x64x64x768 bf16.
// grid (ceil(C/TX), H, B), block (TX, TY).
template <typename scalar_t, typename acc_t>
__global__ void dw_gelu_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                               const acc_t* __restrict__ rstd, const acc_t* __restrict__ g,
                               const acc_t* __restrict__ bta, const acc_t* __restrict__ wt,
                               scalar_t* __restrict__ u_out, acc_t* __restrict__ d_out,
                               acc_t* __restrict__ rowsum, int H, int W, int C) {
  const int c = blockIdx.x * TX + threadIdx.x;
  const int i = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int chunk = (W + TY - 1) / TY;
  const int j0 = threadIdx.y * chunk, j1 = min(W, j0 + chunk);
  acc_t part[1] = {acc_t(0)};
  if (c < C && j0 < j1) {
    acc_t w[9];
#pragma unroll
    for (int k = 0; k < 9; ++k) w[k] = wt[k * C + c];
    const acc_t gc = g[c], bc = bta[c];
    acc_t win[3][3];  // [column j-1, j, j+1][row i-1, i, i+1]
    ln_column(x, mean, rstd, b, i, j0 - 1, H, W, C, c, gc, bc, win[0]);
    ln_column(x, mean, rstd, b, i, j0, H, W, C, c, gc, bc, win[1]);
    for (int j = j0; j < j1; ++j) {
      ln_column(x, mean, rstd, b, i, j + 1, H, W, C, c, gc, bc, win[2]);
      acc_t acc = 0;
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) acc += win[kx][ky] * w[ky * 3 + kx];
      }
      const int64_t o = ((b * H + i) * W + j) * C + c;
      const acc_t uv = gelu(acc);
      u_out[o] = static_cast<scalar_t>(uv);
      if (d_out != nullptr) d_out[o] = acc;
      part[0] += uv;
#pragma unroll
      for (int r = 0; r < 3; ++r) {
        win[0][r] = win[1][r];
        win[1][r] = win[2][r];
      }
    }
  }
  if (rowsum != nullptr) block_sum_rows<acc_t, 1>(part, rowsum + (b * H + i) * C, C, c);
}

// Per (image, row) channel sums of a * b. grid (ceil(C/TX), H, B), block (TX, TY).
template <typename scalar_t, typename acc_t>
__global__ void chan_dot_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ bb,
                                acc_t* __restrict__ out, int H, int W, int C) {
  const int c = blockIdx.x * TX + threadIdx.x;
  const int i = blockIdx.y;
  const int64_t b = blockIdx.z;
  acc_t part[1] = {acc_t(0)};
  if (c < C) {
    for (int j = threadIdx.y; j < W; j += TY) {
      const int64_t o = ((b * H + i) * W + j) * C + c;
      part[0] += static_cast<acc_t>(a[o]) * static_cast<acc_t>(bb[o]);
    }
  }
  block_sum_rows<acc_t, 1>(part, out + (b * H + i) * C, C, c);
}

// In place: d <- (gv * s[b] + gp[b] / HW) * gelu'(d).
template <typename scalar_t, typename acc_t>
__global__ void grad_pre_kernel(const scalar_t* __restrict__ gv, acc_t* __restrict__ d,
                                const acc_t* __restrict__ s, const acc_t* __restrict__ gp, int64_t total,
                                int64_t HWC, int C, acc_t inv_hw) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bc = (idx / HWC) * C + idx % C;
    d[idx] = (static_cast<acc_t>(gv[idx]) * s[bc] + gp[bc] * inv_hw) * gelu_grad(d[idx]);
  }
}

// Transposed DW (gn = grad at the LN output) + per-block partials [B*H, 11, C] of grad_dw (9 taps),
// grad_ln_weight, grad_ln_bias. grid (ceil(C/TX), H, B), block (TX, TY).
template <typename scalar_t, typename acc_t>
__global__ void dw_backward_kernel(const acc_t* __restrict__ gd, const scalar_t* __restrict__ x,
                                   const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                   const acc_t* __restrict__ g, const acc_t* __restrict__ bta,
                                   const acc_t* __restrict__ wt, acc_t* __restrict__ gn_out,
                                   acc_t* __restrict__ partials, int H, int W, int C) {
  const int c = blockIdx.x * TX + threadIdx.x;
  const int i = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int chunk = (W + TY - 1) / TY;
  const int j0 = threadIdx.y * chunk, j1 = min(W, j0 + chunk);
  acc_t part[11];
#pragma unroll
  for (int q = 0; q < 11; ++q) part[q] = 0;
  if (c < C && j0 < j1) {
    acc_t w[9];
#pragma unroll
    for (int k = 0; k < 9; ++k) w[k] = wt[k * C + c];
    const acc_t gc = g[c], bc = bta[c];
    // The same column walk as dw_gelu_kernel, with two windows: the grad at the DW output (gd) and
    // the LN values, [column j-1, j, j+1][row i-1, i, i+1]. Before: 721 us per call at
    // 8x64x64x768 bf16 on the H100 (2026-11-27), 9 gd loads and 9 LN evaluations per pixel.
    acc_t gwin[3][3], lwin[3][3];
    gd_column(gd, b, i, j0 - 1, H, W, C, c, gwin[0]);
    gd_column(gd, b, i, j0, H, W, C, c, gwin[1]);
    ln_column(x, mean, rstd, b, i, j0 - 1, H, W, C, c, gc, bc, lwin[0]);
    ln_column(x, mean, rstd, b, i, j0, H, W, C, c, gc, bc, lwin[1]);
    for (int j = j0; j < j1; ++j) {
      gd_column(gd, b, i, j + 1, H, W, C, c, gwin[2]);
      ln_column(x, mean, rstd, b, i, j + 1, H, W, C, c, gc, bc, lwin[2]);
      const int64_t p = (b * H + i) * W + j;
      const acc_t gdo = gwin[1][1];
      acc_t gn = 0;
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          // output (i - ky + 1, j - kx + 1) read this pixel through tap (ky, kx)
          gn += gwin[2 - kx][2 - ky] * w[ky * 3 + kx];
          // this output read (i + ky - 1, j + kx - 1) through tap (ky, kx)
          part[ky * 3 + kx] += gdo * lwin[kx][ky];
        }
      }
      const acc_t xh = (static_cast<acc_t>(x[p * C + c]) - mean[p]) * rstd[p];
      part[9] += gn * xh;
      part[10] += gn;
      gn_out[p * C + c] = gn;
#pragma unroll
      for (int r = 0; r < 3; ++r) {
        gwin[0][r] = gwin[1][r];
        gwin[1][r] = gwin[2][r];
        lwin[0][r] = lwin[1][r];
        lwin[1][r] = lwin[2][r];
      }
    }
  }
  block_sum_rows<acc_t, 11>(part, partials + (b * H + i) * 11 * C, C, c);
}

// One warp per pixel: gx = gy + rstd * (gn*g - mean(gn*g) - xhat * mean(gn*g*xhat)).
template <typename scalar_t, typename acc_t>
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
  for (int c = lane; c < C; c += 32) {
    const acc_t gxh = gn[base + c] * g[c];
    s1 += gxh;
    s2 += gxh * (static_cast<acc_t>(x[base + c]) - mu) * rs;
  }
  s1 = warp_sum(s1) / acc_t(C);
  s2 = warp_sum(s2) / acc_t(C);
  for (int c = lane; c < C; c += 32) {
    const acc_t xh = (static_cast<acc_t>(x[base + c]) - mu) * rs;
    gx[base + c] = static_cast<scalar_t>(static_cast<acc_t>(gy[base + c]) +
                                         rs * (gn[base + c] * g[c] - s1 - xh * s2));
  }
}

// The SE MLP of one image per block: pooled = (sum over rows of rowsum) / HW (written out, saved for
// the backward), h = GELU(W1 pooled), gate = sigmoid(W2 h) * branch_scale[b]. One warp per hidden
// unit / output channel, so every weight row is read coalesced. Dynamic smem: (C + R) acc_t.
// Only B blocks run, so the kernel is bound by load latency, not bandwidth: on the H100 (2026-11-27)
// 256 threads with one dependent load chain each took 212 us at B = 8, C = 768. Hence 1024 threads
// and four independent partial sums per thread, so several loads of each chain are in flight.
constexpr int kSeThreads = 1024;

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

template <typename acc_t>
__global__ void __launch_bounds__(kSeThreads) se_gate_kernel(
    const acc_t* __restrict__ rowsum, const acc_t* __restrict__ w1, const acc_t* __restrict__ w2,
    const acc_t* __restrict__ scale, acc_t* __restrict__ pooled, acc_t* __restrict__ gate, int H, int C,
    int R, acc_t inv_hw) {
  extern __shared__ __align__(16) unsigned char se_smem[];
  acc_t* p = reinterpret_cast<acc_t*>(se_smem);
  acc_t* h = p + C;
  const int64_t b = blockIdx.x;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t* rs = rowsum + b * H * C + c;
    acc_t s[4] = {0, 0, 0, 0};
    int i = 0;
    for (; i + 4 <= H; i += 4) {
#pragma unroll
      for (int q = 0; q < 4; ++q) s[q] += rs[static_cast<int64_t>(i + q) * C];
    }
    for (; i < H; ++i) s[0] += rs[static_cast<int64_t>(i) * C];
    const acc_t acc = ((s[0] + s[1]) + (s[2] + s[3])) * inv_hw;
    p[c] = acc;
    pooled[b * C + c] = acc;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int r = warp; r < R; r += nw) {
    const acc_t t = warp_dot(p, w1 + static_cast<int64_t>(r) * C, C, lane);
    if (lane == 0) h[r] = gelu(t);
  }
  __syncthreads();
  const acc_t sc = scale != nullptr ? scale[b] : acc_t(1);
  for (int c = warp; c < C; c += nw) {
    const acc_t t = warp_dot(h, w2 + static_cast<int64_t>(c) * R, R, lane);
    if (lane == 0) gate[b * C + c] = sc / (acc_t(1) + ca_exp(-t));
  }
}

// wf[b, co, ci] = wp[co, ci] * gate[b, ci], in x's dtype: the 1x1 weight with the gate folded in
// (the GEMM takes its transpose as a view).
template <typename scalar_t, typename acc_t>
__global__ void fold_kernel(const acc_t* __restrict__ wp, const acc_t* __restrict__ gate,
                            scalar_t* __restrict__ wf, int64_t total, int C) {
  const int64_t CC = static_cast<int64_t>(C) * C;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / CC, k = idx % CC;
    wf[idx] = static_cast<scalar_t>(wp[k] * gate[b * C + k % C]);
  }
}

unsigned grid_stride_blocks(int64_t total, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 65535 * 8)));
}

void check_cuda_dims(const Dims& d, const at::Tensor& x) {
  DBSAM_CHECK_VALUE(x.is_cuda(), "channel_attention: the CUDA kernel got a tensor on ", x.device());
  DBSAM_CHECK_VALUE(d.H <= 65535 && d.B <= 65535 && d.C <= INT_MAX / 11 && d.W <= INT_MAX,
                    "channel_attention: CUDA kernels support H, B <= 65535, got ", x.sizes());
}

dim3 tile_grid(const Dims& d) {
  return dim3(static_cast<unsigned>((d.C + TX - 1) / TX), static_cast<unsigned>(d.H),
              static_cast<unsigned>(d.B));
}

unsigned warp_blocks(int64_t P) { return static_cast<unsigned>((P + WARPS - 1) / WARPS); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& dw_weight, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const at::Tensor& pw_weight, const c10::optional<at::Tensor>& branch_scale, double eps) {
  const NoAutocast no_autocast;
  const Dims d = check_args(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  check_scale(d, x, branch_scale);
  check_cuda_dims(d, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto st = x.scalar_type();
  const auto acc = at::toOpMathType(st);
  auto xc = x.contiguous();
  const Weights w = widen(d, acc, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  auto aopts = xc.options().dtype(acc);
  auto mean = at::empty({d.B, d.H, d.W}, aopts);
  auto rstd = at::empty({d.B, d.H, d.W}, aopts);
  auto u = at::empty_like(xc);
  auto rowsum = at::empty({d.B, d.H, d.C}, aopts);
  const int64_t P = d.B * d.H * d.W, HW = d.H * d.W;
  if (P > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      ln_stats_kernel<scalar_t, acc_t><<<warp_blocks(P), WARPS * 32, 0, stream>>>(
          xc.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), P,
          static_cast<int>(d.C), static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dw_gelu_kernel<scalar_t, acc_t><<<tile_grid(d), dim3(TX, TY), 0, stream>>>(
          xc.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), w.g.data_ptr<acc_t>(),
          w.b.data_ptr<acc_t>(), w.wt.data_ptr<acc_t>(), u.data_ptr<scalar_t>(), nullptr,
          rowsum.data_ptr<acc_t>(), static_cast<int>(d.H), static_cast<int>(d.W), static_cast<int>(d.C));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    rowsum.zero_();
    mean.zero_();
    rstd.zero_();
  }
  at::Tensor pooled, wf;
  const size_t se_smem = static_cast<size_t>(d.C + d.R) * at::elementSize(acc);
  if (P > 0 && se_smem <= 48 * 1024) {
    // SE MLP and the gate folding: two launches.
    pooled = at::empty({d.B, d.C}, aopts);
    auto gate = at::empty({d.B, d.C}, aopts);
    wf = at::empty({d.B, d.C, d.C}, xc.options());  // [B, Cout, Cin]
    c10::optional<at::Tensor> scale_c;
    if (branch_scale.has_value()) scale_c = branch_scale->contiguous();
    auto w1 = w.w1.contiguous(), w2 = w.w2.contiguous(), wp = w.wp.contiguous();
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_se_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      se_gate_kernel<acc_t><<<static_cast<unsigned>(d.B), kSeThreads, se_smem, stream>>>(
          rowsum.data_ptr<acc_t>(), w1.data_ptr<acc_t>(), w2.data_ptr<acc_t>(),
          scale_c.has_value() ? scale_c->data_ptr<acc_t>() : nullptr, pooled.data_ptr<acc_t>(),
          gate.data_ptr<acc_t>(), static_cast<int>(d.H), static_cast<int>(d.C), static_cast<int>(d.R),
          acc_t(1) / acc_t(HW));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t total = d.B * d.C * d.C;
      fold_kernel<scalar_t, acc_t><<<grid_stride_blocks(total, 256), 256, 0, stream>>>(
          wp.data_ptr<acc_t>(), gate.data_ptr<acc_t>(), wf.data_ptr<scalar_t>(), total,
          static_cast<int>(d.C));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {  // empty batch, or a C too wide for the SE kernel's shared memory: the same math in ATen
    pooled = rowsum.sum(1).div_(static_cast<double>(HW));
    auto s = at::sigmoid(at::mm(at::gelu(at::mm(pooled, w.w1.t())), w.w2.t()));  // [B, C]
    if (branch_scale.has_value()) s = s * branch_scale->unsqueeze(1);
    wf = (w.wp.unsqueeze(0) * s.unsqueeze(1)).to(st);  // [B, Cout, Cin]
  }
  // y_b = x_b + u_b @ (Wp * gate_b)^T, residual as the GEMM's addend.
  auto y = at::baddbmm(xc.view({d.B, HW, d.C}), u.view({d.B, HW, d.C}), wf.transpose(1, 2)).view(x.sizes());
  return {y, mean, rstd, pooled};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ln_weight,
              const at::Tensor& ln_bias, const at::Tensor& dw_weight, const at::Tensor& fc1_weight,
              const at::Tensor& fc2_weight, const at::Tensor& pw_weight,
              const c10::optional<at::Tensor>& branch_scale, const at::Tensor& mean,
              const at::Tensor& rstd, const at::Tensor& pooled, double eps) {
  const NoAutocast no_autocast;
  const Dims d = check_args(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  check_scale(d, x, branch_scale);
  check_saved(d, grad_y, x, mean, rstd, pooled);
  check_cuda_dims(d, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto st = x.scalar_type();
  const auto acc = at::toOpMathType(st);
  auto xc = x.contiguous();
  auto gyc = grad_y.contiguous();
  auto mean_c = mean.contiguous();
  auto rstd_c = rstd.contiguous();
  auto pooled_c = pooled.contiguous();
  const Weights w = widen(d, acc, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  auto aopts = xc.options().dtype(acc);
  const int64_t P = d.B * d.H * d.W, HW = d.H * d.W;
  auto u = at::empty_like(xc);
  auto dpre = at::empty({d.B, d.H, d.W, d.C}, aopts);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int H = static_cast<int>(d.H), W = static_cast<int>(d.W), C = static_cast<int>(d.C);
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dw_gelu_kernel<scalar_t, acc_t><<<tile_grid(d), dim3(TX, TY), 0, stream>>>(
          xc.data_ptr<scalar_t>(), mean_c.data_ptr<acc_t>(), rstd_c.data_ptr<acc_t>(),
          w.g.data_ptr<acc_t>(), w.b.data_ptr<acc_t>(), w.wt.data_ptr<acc_t>(), u.data_ptr<scalar_t>(),
          dpre.data_ptr<acc_t>(), nullptr, H, W, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // SE, recomputed from the saved pooled means.
  auto a = at::mm(pooled_c, w.w1.t());
  auto h = at::gelu(a);
  auto s = at::sigmoid(at::mm(h, w.w2.t()));
  auto s_eff = branch_scale.has_value() ? s * branch_scale->unsqueeze(1) : s;
  auto gy2 = gyc.view({P, d.C});
  auto u3 = u.view({d.B, HW, d.C});
  // grad_pw = gy^T (u * s_eff) over all pixels: one GEMM with fp32 accumulation.
  auto v = (u3 * s_eff.unsqueeze(1).to(st)).view({P, d.C});
  auto gpw = at::mm(gy2.t(), v);
  auto gv = at::mm(gy2, w.wp.to(st));  // [P, Cin]: grad at the gated activations
  auto rowdot = at::empty({d.B, d.H, d.C}, aopts);
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      chan_dot_kernel<scalar_t, acc_t><<<tile_grid(d), dim3(TX, TY), 0, stream>>>(
          gv.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), rowdot.data_ptr<acc_t>(), H, W, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    rowdot.zero_();
  }
  auto gs = rowdot.sum(1);
  if (branch_scale.has_value()) gs.mul_(branch_scale->unsqueeze(1));
  auto gz = gs * s * (1 - s);
  auto gw2 = at::mm(gz.t(), h);
  auto ga = at::gelu_backward(at::mm(gz, w.w2), a);
  auto gw1 = at::mm(ga.t(), pooled_c);
  auto gp = at::mm(ga, w.w1).contiguous();
  auto s_c = s_eff.contiguous();
  auto gn = at::empty({d.B, d.H, d.W, d.C}, aopts);
  auto partials = at::empty({d.B * d.H, 11, d.C}, aopts);
  auto gx = at::empty_like(xc);
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t total = P * d.C;
      const int threads = 256;
      const int64_t want = (total + threads - 1) / threads;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(want, 65535 * 8));
      grad_pre_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
          gv.data_ptr<scalar_t>(), dpre.data_ptr<acc_t>(), s_c.data_ptr<acc_t>(), gp.data_ptr<acc_t>(),
          total, HW * d.C, C, acc_t(1) / acc_t(HW));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dw_backward_kernel<scalar_t, acc_t><<<tile_grid(d), dim3(TX, TY), 0, stream>>>(
          dpre.data_ptr<acc_t>(), xc.data_ptr<scalar_t>(), mean_c.data_ptr<acc_t>(),
          rstd_c.data_ptr<acc_t>(), w.g.data_ptr<acc_t>(), w.b.data_ptr<acc_t>(), w.wt.data_ptr<acc_t>(),
          gn.data_ptr<acc_t>(), partials.data_ptr<acc_t>(), H, W, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ln_backward_kernel<scalar_t, acc_t><<<warp_blocks(P), WARPS * 32, 0, stream>>>(
          gn.data_ptr<acc_t>(), xc.data_ptr<scalar_t>(), gyc.data_ptr<scalar_t>(), mean_c.data_ptr<acc_t>(),
          rstd_c.data_ptr<acc_t>(), w.g.data_ptr<acc_t>(), gx.data_ptr<scalar_t>(), P, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    partials.zero_();
  }
  auto red = partials.sum(0);  // [11, C]
  auto gdw = red.narrow(0, 0, 9).t().contiguous().view({d.C, 1, 3, 3});
  return {gx,
          red[9].to(ln_weight.scalar_type(), false, /*copy=*/true),
          red[10].to(ln_bias.scalar_type(), false, /*copy=*/true),
          gdw.to(dw_weight.scalar_type()),
          gw1.reshape({d.R, d.C, 1, 1}).to(fc1_weight.scalar_type()),
          gw2.reshape({d.C, d.R, 1, 1}).to(fc2_weight.scalar_type()),
          gpw.reshape({d.C, d.C, 1, 1}).to(pw_weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dbsam, CUDA, m) {
  m.impl("channel_attention_forward", &forward_cuda);
  m.impl("channel_attention_backward", &backward_cuda);
}

}  // namespace ca
}  // namespace dbsam
