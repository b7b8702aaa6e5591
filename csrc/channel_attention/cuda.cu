// CUDA kernels of the channel-attention adapter y = x + PW1x1(SE(GELU(DW3x3(LN(x))))), channels-last.
//
// Forward (x read twice, u and pre written once, then one GEMM):
//   ln_stats      one warp per pixel: LN mean/rstd in fp32 (fp64 for double).
//   dw_gelu       one block per (32 * VEC channels, image row, image); the LN is applied on the fly
//                 to a 3x3 window walked along the row (3 LN evaluations per output), DW3x3 + GELU, u
//                 and the pre-activation pre written in x's dtype (pre is saved for the backward) and
//                 the row's channel sums reduced in shared memory into rowsum[B, H, C]
//                 (deterministic: no atomics; the H-sum is one tiny ATen reduction).
//   se_gate       one block per image: pooled means from the row sums, the SE MLP (one warp per
//                 hidden unit / channel, coalesced weight rows), the gate times the drop-path factor.
//   fold          the gate folded into the 1x1 weight per image, in x's dtype: wf[b] = Wp * gate[b].
//   1x1 conv      one batched cuBLAS GEMM (at::baddbmm) on wf^T (a view) with the residual x as the
//                 GEMM's addend.
// Backward (saved: pre in x's dtype, the LN statistics, the pooled means; the LN is recomputed from x):
//   gated_act (v = GELU(pre) * gate), two GEMMs (grad_pw from v, gv = grad at the gated
//   activations), chan_dot_gelu (per-channel sums of gv * GELU(pre), for the SE backward), the SE
//   backward (small_mm_kernel for its products), grad_pre (the grad at the DW output from gv, pre, the
//   gate and the pooled-mean gradient, into an fp32 map), dw_backward (transposed DW, grad_dw and
//   LN-affine partial sums per block, deterministic; DBSAM_CA_FUSED_GRAD=1 forms the grad at the DW
//   output inside it instead), ln_backward (one warp per pixel, + residual). Until 2026-11-27 the
//   backward recomputed the DW conv (214 us at 8x64x64x768 bf16 on the H100) and gated u in a separate
//   multiply (73 us); saving pre costs one [B,H,W,C] map in x's dtype (50 MB there; eager saves 202 MB).
//
// The [B,H,W,C] kernels are in kernels.cuh (CPU-tested under tests/cpp/cuda_emulation.h), templated
// on VEC channels per thread (pick_vec, DBSAM_CA_VEC). Current stream, device guard, 64-bit offsets
// for every [B,H,W,C] index.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "channel_attention/checks.h"
#include "channel_attention/kernels.cuh"

namespace dbsam {
namespace ca {
namespace {

// The SE MLP of one image per block: pooled = (sum over rows of rowsum) / HW (written out, saved for
// the backward), h = GELU(W1 pooled), gate = sigmoid(W2 h) * branch_scale[b]. One warp per hidden
// unit / output channel, so every weight row is read coalesced. Dynamic smem: (C + R) acc_t.
// Only B blocks run, so the kernel is bound by load latency, not bandwidth: on the H100 (2026-11-27)
// 256 threads with one dependent load chain each took 212 us at B = 8, C = 768. Hence 1024 threads
// and four independent partial sums per thread, so several loads of each chain are in flight.
constexpr int kSeThreads = 1024;

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

// out [B, R] = a [B, K] @ w^T with w [R, K]: the SE MLP's small-batch products (small_mm_kernel).
at::Tensor small_mm(const at::Tensor& a, const at::Tensor& w, cudaStream_t stream) {
  const int64_t B = a.size(0), K = a.size(1), R = w.size(0);
  auto out = at::empty({B, R}, a.options());
  if (out.numel() == 0) return out;
  auto ac = a.contiguous(), wc = w.contiguous();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "channel_attention_small_mm", [&] {
    const int64_t threads = B * R * 32;
    small_mm_kernel<scalar_t><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
        ac.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), static_cast<int>(B),
        static_cast<int>(R), static_cast<int>(K));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

unsigned grid_stride_blocks(int64_t total, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 65535 * 8)));
}

void check_cuda_dims(const Dims& d, const at::Tensor& x) {
  DBSAM_CHECK_VALUE(x.is_cuda(), "channel_attention: the CUDA kernel got a tensor on ", x.device());
  DBSAM_CHECK_VALUE(d.H <= 65535 && d.B <= 65535 && d.C <= INT_MAX / 11 && d.W <= INT_MAX,
                    "channel_attention: CUDA kernels support H, B <= 65535, got ", x.sizes());
}

dim3 tile_grid(const Dims& d, int vec) {
  return dim3(static_cast<unsigned>((d.C + TX * vec - 1) / (TX * vec)), static_cast<unsigned>(d.H),
              static_cast<unsigned>(d.B));
}

// Channels per thread of the [B,H,W,C] kernels (kernels.cuh): DBSAM_CA_VEC=1|2|4, read at every
// call so that the benchmark's A/B rows and the tests switch it within one process; 1 (the layout
// the H100 runs measured) until a GPU run shows another is faster. A VEC that does not divide C, or
// that a buffer's alignment does not allow (a view with an odd offset), falls back to the widest
// that does; double always runs 1 (its correctness path, one instantiation fewer per kernel).
int pick_vec(const Dims& d, size_t elem, std::initializer_list<const void*> ptrs) {
  const char* e = std::getenv("DBSAM_CA_VEC");
  int vec = (e != nullptr && e[0] == '4' && e[1] == '\0') ? 4 : (e != nullptr && e[0] == '2' && e[1] == '\0') ? 2 : 1;
  if (elem >= 8) return 1;
  auto fits = [&](int v) {
    if (d.C % v != 0) return false;
    for (const void* p : ptrs) {
      if (reinterpret_cast<uintptr_t>(p) % (static_cast<uintptr_t>(v) * elem) != 0) return false;
    }
    return true;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  return vec;
}

// DBSAM_CA_FUSED_GRAD=1: the transposed-DW kernel forms the grad at the DW output itself from gv and
// the saved pre (no grad_pre pass, no fp32 map, GELU' three times per pixel); unset, grad_pre_kernel
// writes that grad once and dw_backward_kernel reads it, as the kernels measured on the H100 did.
// Read at every call, like DBSAM_CA_VEC: an A/B knob until a GPU run decides (kernels.cuh).
bool fused_grad() {
  const char* e = std::getenv("DBSAM_CA_FUSED_GRAD");
  return e != nullptr && e[0] == '1' && e[1] == '\0';
}

// f(std::integral_constant<int, VEC>) for the VEC picked at run time (1 only for double).
template <typename scalar_t, typename F>
void with_vec(int vec, F&& f) {
  if constexpr (sizeof(scalar_t) >= 8) {
    f(std::integral_constant<int, 1>{});
  } else if (vec == 4) {
    f(std::integral_constant<int, 4>{});
  } else if (vec == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

unsigned warp_blocks(int64_t P) { return static_cast<unsigned>((P + WARPS - 1) / WARPS); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
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
  auto pre = at::empty_like(xc);
  auto rowsum = at::empty({d.B, d.H, d.C}, aopts);
  const int64_t P = d.B * d.H * d.W, HW = d.H * d.W;
  if (P > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    const int vec = pick_vec(d, xc.element_size(), {xc.data_ptr(), u.data_ptr(), pre.data_ptr()});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_vec<scalar_t>(vec, [&](auto V) {
        constexpr int VEC = decltype(V)::value;
        ln_stats_kernel<scalar_t, acc_t, VEC><<<warp_blocks(P), WARPS * 32, 0, stream>>>(
            xc.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), P,
            static_cast<int>(d.C), static_cast<acc_t>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        dw_gelu_kernel<scalar_t, acc_t, VEC><<<tile_grid(d, VEC), dim3(TX, TY), 0, stream>>>(
            xc.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), w.g.data_ptr<acc_t>(),
            w.b.data_ptr<acc_t>(), w.wt.data_ptr<acc_t>(), u.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(),
            rowsum.data_ptr<acc_t>(), static_cast<int>(d.H), static_cast<int>(d.W), static_cast<int>(d.C));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
  return {y, mean, rstd, pooled, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ln_weight,
              const at::Tensor& ln_bias, const at::Tensor& dw_weight, const at::Tensor& fc1_weight,
              const at::Tensor& fc2_weight, const at::Tensor& pw_weight,
              const c10::optional<at::Tensor>& branch_scale, const at::Tensor& mean,
              const at::Tensor& rstd, const at::Tensor& pooled, const at::Tensor& pre, double eps) {
  const NoAutocast no_autocast;
  const Dims d = check_args(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  check_scale(d, x, branch_scale);
  check_saved(d, grad_y, x, mean, rstd, pooled, pre);
  check_cuda_dims(d, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto st = x.scalar_type();
  const auto acc = at::toOpMathType(st);
  auto xc = x.contiguous();
  auto gyc = grad_y.contiguous();
  auto prec = pre.contiguous();
  auto mean_c = mean.contiguous();
  auto rstd_c = rstd.contiguous();
  auto pooled_c = pooled.contiguous();
  const Weights w = widen(d, acc, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  auto aopts = xc.options().dtype(acc);
  const int64_t P = d.B * d.H * d.W, HW = d.H * d.W;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int H = static_cast<int>(d.H), W = static_cast<int>(d.W), C = static_cast<int>(d.C);
  const int vec = pick_vec(d, xc.element_size(), {xc.data_ptr(), gyc.data_ptr(), prec.data_ptr()});
  // SE, recomputed from the saved pooled means (its [B, K] x [K, R] products in small_mm_kernel).
  auto a = small_mm(pooled_c, w.w1, stream);  // [B, R]
  auto h = at::gelu(a);
  auto s = at::sigmoid(small_mm(h, w.w2, stream));  // [B, C]
  auto s_eff = branch_scale.has_value() ? s * branch_scale->unsqueeze(1) : s;
  auto s_c = s_eff.contiguous();
  // grad_pw = gy^T v over all pixels, v = GELU(pre) * s_eff: one GEMM with fp32 accumulation.
  auto v = at::empty_like(xc);
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_vec<scalar_t>(vec, [&](auto V) {
        constexpr int VEC = decltype(V)::value;
        gated_act_kernel<scalar_t, acc_t, VEC><<<grid_stride_blocks(P, WARPS), dim3(32, WARPS), 0, stream>>>(
            prec.data_ptr<scalar_t>(), s_c.data_ptr<acc_t>(), v.data_ptr<scalar_t>(), P, HW, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  auto gy2 = gyc.view({P, d.C});
  auto gpw = at::mm(gy2.t(), v.view({P, d.C}));
  v.reset();
  auto gv = at::mm(gy2, w.wp.to(st));  // [P, Cin]: grad at the gated activations
  // gv is a fresh GEMM output: its alignment may still cap VEC (checked, never assumed).
  const int vec_gv = std::min(vec, pick_vec(d, xc.element_size(), {gv.data_ptr()}));
  auto rowdot = at::empty({d.B, d.H, d.C}, aopts);
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_vec<scalar_t>(vec_gv, [&](auto V) {
        constexpr int VEC = decltype(V)::value;
        chan_dot_gelu_kernel<scalar_t, acc_t, VEC><<<tile_grid(d, VEC), dim3(TX, TY), 0, stream>>>(
            gv.data_ptr<scalar_t>(), prec.data_ptr<scalar_t>(), rowdot.data_ptr<acc_t>(), H, W, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else {
    rowdot.zero_();
  }
  auto gs = rowdot.sum(1);
  if (branch_scale.has_value()) gs.mul_(branch_scale->unsqueeze(1));
  auto gz = gs * s * (1 - s);
  auto gw2 = at::mm(gz.t(), h);
  auto ga = at::gelu_backward(small_mm(gz, w.w2.t().contiguous(), stream), a);  // [B, R]
  auto gw1 = at::mm(ga.t(), pooled_c);
  auto gp = small_mm(ga, w.w1.t().contiguous(), stream);  // [B, C]
  auto gn = at::empty({d.B, d.H, d.W, d.C}, aopts);
  auto partials = at::empty({d.B * d.H, 11, d.C}, aopts);
  auto gx = at::empty_like(xc);
  const bool fused = fused_grad();
  at::Tensor gd;  // the grad at the DW output, unless dw_backward forms it itself
  if (!fused) gd = at::empty({d.B, d.H, d.W, d.C}, aopts);
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_vec<scalar_t>(vec_gv, [&](auto V) {
        constexpr int VEC = decltype(V)::value;
        const acc_t inv_hw = acc_t(1) / acc_t(HW);
        if (fused) {
          dw_backward_kernel<scalar_t, acc_t, VEC, true><<<tile_grid(d, VEC), dim3(TX, TY), 0, stream>>>(
              nullptr, gv.data_ptr<scalar_t>(), prec.data_ptr<scalar_t>(), s_c.data_ptr<acc_t>(),
              gp.data_ptr<acc_t>(), inv_hw, xc.data_ptr<scalar_t>(), mean_c.data_ptr<acc_t>(),
              rstd_c.data_ptr<acc_t>(), w.g.data_ptr<acc_t>(), w.b.data_ptr<acc_t>(), w.wt.data_ptr<acc_t>(),
              gn.data_ptr<acc_t>(), partials.data_ptr<acc_t>(), H, W, C);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          grad_pre_kernel<scalar_t, acc_t, VEC><<<grid_stride_blocks(P, WARPS), dim3(32, WARPS), 0, stream>>>(
              gv.data_ptr<scalar_t>(), prec.data_ptr<scalar_t>(), s_c.data_ptr<acc_t>(), gp.data_ptr<acc_t>(),
              gd.data_ptr<acc_t>(), P, HW, C, inv_hw);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          dw_backward_kernel<scalar_t, acc_t, VEC, false><<<tile_grid(d, VEC), dim3(TX, TY), 0, stream>>>(
              gd.data_ptr<acc_t>(), nullptr, nullptr, nullptr, nullptr, inv_hw, xc.data_ptr<scalar_t>(),
              mean_c.data_ptr<acc_t>(), rstd_c.data_ptr<acc_t>(), w.g.data_ptr<acc_t>(), w.b.data_ptr<acc_t>(),
              w.wt.data_ptr<acc_t>(), gn.data_ptr<acc_t>(), partials.data_ptr<acc_t>(), H, W, C);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
      with_vec<scalar_t>(vec, [&](auto V) {
        constexpr int VEC = decltype(V)::value;
        ln_backward_kernel<scalar_t, acc_t, VEC><<<warp_blocks(P), WARPS * 32, 0, stream>>>(
            gn.data_ptr<acc_t>(), xc.data_ptr<scalar_t>(), gyc.data_ptr<scalar_t>(), mean_c.data_ptr<acc_t>(),
            rstd_c.data_ptr<acc_t>(), w.g.data_ptr<acc_t>(), gx.data_ptr<scalar_t>(), P, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
