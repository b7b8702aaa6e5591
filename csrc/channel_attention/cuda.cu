// CUDA kernels of the channel-attention adapter y = x + PW1x1(SE(GELU(DW3x3(LN(x))))), channels-last.
//
// Forward (x read twice, u, pre and a copy of x written once, then one GEMM):
//   pack_weights  the six small weights converted to op-math in one buffer (one launch).
//   ln_stats      one warp per pixel: LN mean/rstd in fp32 (fp64 for double), and x copied into y.
//   dw_gelu       one block per (32 * VEC channels, RT image rows, image); the LN is applied on the fly
//                 to a 3 x (RT + 2) window walked along the rows ((RT + 2) / RT LN evaluations per
//                 output), DW3x3 + GELU, u and the pre-activation pre written in x's dtype (pre is
//                 saved for the backward) and the tile's channel sums reduced in shared memory into
//                 rowsum[B, ceil(H / RT), C] (deterministic: no atomics). RT: pick_rows.
//   the SE MLP    sum_rows (pooled means), then two small_mm launches, one warp per output, with the
//                 GELU and the gate (sigmoid times the drop-path factor) fused as epilogues.
//   fold          the gate folded into the 1x1 weight per image, in x's dtype: wf[b] = Wp * gate[b].
//   1x1 conv      one batched cuBLAS GEMM (in-place baddbmm_ on y, which holds x) on wf^T (a view):
//                 the residual is the GEMM's addend (residual=False: no copy, a bmm into y).
// Backward (saved: pre in x's dtype, the LN statistics, the pooled means; the LN is recomputed from x):
//   pack_weights (with W1^T, W2^T), the SE recomputed (two small_mm), the GEMM gv = gy Wp (the grad
//   at the gated activations), gate_dot (one pass over pre and gv: v = GELU(pre) * gate and the
//   per-row channel sums of gv * GELU(pre)), the GEMM grad_pw = gy^T v, the SE backward (sum_rows for
//   the gate's grad, two small_mm, se_weight_grad), grad_pre (the grad at the DW output from gv, pre,
//   the gate and the pooled-mean gradient, into an fp32 map), dw_backward (transposed DW, grad_dw and
//   LN-affine partial sums per block, deterministic; DBSAM_CA_FUSED_GRAD=1 forms the grad at the DW
//   output inside it instead), ln_backward (one warp per pixel, + residual), sum_rows over its
//   partials (grad_dw and the LN affine's grads, in the weights' dtypes). Until 2026-11-27 the backward
//   recomputed the DW conv (214 us at 8x64x64x768 bf16 on the H100) and gated u in a separate multiply
//   (73 us); saving pre costs one [B,H,W,C] map in x's dtype (50 MB there; eager saves 202 MB).
// Host calls: everything small is a direct launch into one op-math buffer per call (the weights,
// the SE vectors, the row sums), not an ATen op: the H100 runs showed the op host-bound at B = 1 and
// the host's share visible at B = 8 (kernels.cuh, "The SE MLP, the small weights...").
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
#include <vector>

#include "channel_attention/checks.h"
#include "channel_attention/kernels.cuh"

namespace dbsam {
namespace ca {
namespace {

unsigned grid_stride_blocks(int64_t total, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 65535 * 8)));
}

void check_cuda_dims(const Dims& d, const at::Tensor& x) {
  DBSAM_CHECK_VALUE(x.is_cuda(), "channel_attention: the CUDA kernel got a tensor on ", x.device());
  DBSAM_CHECK_VALUE(d.H <= 65535 && d.B <= 65535 && d.C <= INT_MAX / 11 && d.W <= INT_MAX,
                    "channel_attention: CUDA kernels support H, B <= 65535, got ", x.sizes());
}

// Row tiles of the DW kernels: ceil(H / rows).
int64_t row_tiles(const Dims& d, int rows) { return (d.H + rows - 1) / rows; }

dim3 tile_grid(const Dims& d, int vec, int rows = 1) {
  return dim3(static_cast<unsigned>((d.C + TX * vec - 1) / (TX * vec)), static_cast<unsigned>(row_tiles(d, rows)),
              static_cast<unsigned>(d.B));
}

// The value of a knob that takes a width, "1", "2" or "4"; 0 when unset or anything else.
int env_width(const char* name) {
  const char* e = std::getenv(name);
  if (e == nullptr || (e[0] != '1' && e[0] != '2' && e[0] != '4') || e[1] != '\0') return 0;
  return e[0] - '0';
}

// Channels per thread of the [B,H,W,C] kernels (kernels.cuh): by default 8 bytes per thread (bf16 and
// fp16: 4 channels, fp32: 2). On the H100 (2026-11-27, results/h100_2026-11-27_dfbc80c) both widths
// were as fast as one channel per thread or faster at every 8x64x64xC case (up to 1.28x); 4 and 2
// channels were within each other's spread, and the 8-byte rule takes the better of the two at the
// model's width (C = 768) in bf16 fwd+bwd (1554 against 1843 us) and fp32 fwd+bwd (3864 against
// 4046 us). DBSAM_CA_VEC=1|2|4 forces one (read at every call, so the benchmark's A/B rows and the
// tests switch it within one process). A VEC that does not divide C, or that a buffer's alignment
// does not allow (a view with an odd offset), falls back to the widest that does; double always runs
// 1 (its correctness path, one instantiation fewer per kernel).
int pick_vec(const Dims& d, size_t elem, std::initializer_list<const void*> ptrs) {
  if (elem >= 8) return 1;
  const int forced = env_width("DBSAM_CA_VEC");
  int vec = forced != 0 ? forced : static_cast<int>(8 / elem);
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
// writes that grad once and dw_backward_kernel reads it. Read at every call, like DBSAM_CA_VEC. An
// opt-in that lost: on the H100 (2026-11-27) fwd+bwd ran 3-8% slower with it at every 8x64x64xC case
// (its GELU' thrice per pixel against grad_pre's one pass: a guess, not profiled). With several rows
// per thread (DBSAM_CA_ROWS) it repeats GELU' (RT + 2) / RT times per pixel instead of 3: its A/B
// row is cuda_fusedgrad_rows4 (RT 2 at VEC 4, RT 4 below).
bool fused_grad() {
  const char* e = std::getenv("DBSAM_CA_FUSED_GRAD");
  return e != nullptr && e[0] == '1' && e[1] == '\0';
}

// Output rows per thread of the two DW kernels (dw_gelu, dw_backward; kernels.cuh, RT): each new window
// column costs (RT + 2) / RT loads and LN evaluations per output instead of 3 at RT = 1. Written
// 2026-11-27 without a GPU from run 5's profile (dw_gelu and dw_backward 3-5x over their bytes'
// floor). Default: 2 for bf16/fp16, 1 for fp32. On the H200 (2026-12-03,
// results/h200_2026-12-03_f3c6a4b) RT = 2 made bf16 fwd+bwd 0.83x the RT = 1 time at 8x64x64x768 and
// 0.89x at C = 1024 (forward 0.93x / 1.03x); fp32 fwd+bwd 0.98-0.99x, within the spread, so fp32
// keeps the kernel measured longest. DBSAM_CA_ROWS=1|2|4 forces one (read at every call, for the A/B
// rows and the tests); double always runs 1 (its correctness path). With DBSAM_CA_FUSED_GRAD=1 the
// transposed DW forms the grad at its input for (RT + 2) / RT rows per output instead of 3: the GELU'
// it repeats, which made it lose at RT = 1, falls with RT.
int pick_rows(size_t elem) {
  if (elem >= 8) return 1;
  const int forced = env_width("DBSAM_CA_ROWS");
  return forced != 0 ? forced : (elem == 2 ? 2 : 1);
}

// f(std::integral_constant<int, N>) for a width N of 1, 2 or 4 picked at run time: the channels per
// thread (pick_vec) or the rows per thread (pick_rows) of the kernels. Double always runs 1 (its
// correctness path, one instantiation per kernel).
template <typename scalar_t, typename F>
void with_width(int n, F&& f) {
  if constexpr (sizeof(scalar_t) >= 8) {
    f(std::integral_constant<int, 1>{});
  } else if (n == 4) {
    f(std::integral_constant<int, 4>{});
  } else if (n == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// The op's six weights as pack_weights_kernel reads them (each made contiguous; a copy, if one was
// needed, lives until the launches are queued), which of them are float32 (their grads are stored
// in the same dtype), and branch_scale.
struct SmallInputs {
  std::vector<at::Tensor> kept;
  WeightPtrs ptrs{};
  at::Tensor scale;  // undefined without branch_scale

  SmallInputs(std::initializer_list<const at::Tensor*> weights, const c10::optional<at::Tensor>& branch_scale) {
    kept.reserve(weights.size());
    int i = 0;
    for (const at::Tensor* t : weights) {
      kept.push_back(t->contiguous());
      ptrs.p[i] = kept.back().data_ptr();
      if (t->scalar_type() == at::kFloat) ptrs.float_mask |= 1u << i;
      ++i;
    }
    if (branch_scale.has_value()) scale = branch_scale->contiguous();
  }
  bool is_float(WeightIndex i) const { return (ptrs.float_mask >> i) & 1u; }
  template <typename acc_t>
  const acc_t* scale_ptr() const {
    return scale.defined() ? scale.data_ptr<acc_t>() : nullptr;
  }
};

template <typename scalar_t, typename acc_t>
void launch_pack(const WeightPtrs& w, const WeightLayout& L, acc_t* out, cudaStream_t stream) {
  pack_weights_kernel<scalar_t, acc_t><<<grid_stride_blocks(L.total(), 256), 256, 0, stream>>>(w, L, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// epi(b, r, a[b] . w[r]) for b < B, r < R (small_mm_kernel: one warp per output).
template <typename acc_t, typename Epi>
void launch_small_mm(const acc_t* a, const acc_t* w, int64_t B, int64_t R, int64_t K, Epi epi, cudaStream_t stream) {
  const int64_t threads = B * R * 32;
  small_mm_kernel<acc_t, Epi><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
      a, w, static_cast<int>(B), static_cast<int>(R), static_cast<int>(K), epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// epi(b, c, sum over h of v[b, h, c]) for v [B, H, C] (sum_rows_kernel).
template <typename acc_t, typename Epi>
void launch_sum_rows(const acc_t* v, int64_t B, int64_t H, int64_t C, Epi epi, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((C + 31) / 32), static_cast<unsigned>(B));
  sum_rows_kernel<acc_t, Epi><<<grid, dim3(32, SR), 0, stream>>>(v, H, static_cast<int>(C), epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward's op-math buffer, one allocation: the packed weights (WeightLayout, with W1^T and
// W2^T), the SE's vectors a, h [B, R] and s, gate, gz, gp [B, C], ga [B, R], and the per-row gate
// grad sums rowdot [B, H, C].
template <typename acc_t>
struct BackwardBuffer {
  acc_t *w, *a, *h, *s, *gate, *gz, *gp, *ga, *rowdot;
  BackwardBuffer(acc_t* base, const WeightLayout& L, const Dims& d)
      : w(base), a(base + L.total()), h(a + d.B * d.R), s(h + d.B * d.R), gate(s + d.B * d.C),
        gz(gate + d.B * d.C), gp(gz + d.B * d.C), ga(gp + d.B * d.C), rowdot(ga + d.B * d.R) {}
  static int64_t size(const WeightLayout& L, const Dims& d) {
    return L.total() + d.B * (3 * d.R + 4 * d.C + d.H * d.C);
  }
};

unsigned warp_blocks(int64_t P) { return static_cast<unsigned>((P + WARPS - 1) / WARPS); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& dw_weight, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const at::Tensor& pw_weight, const c10::optional<at::Tensor>& branch_scale, double eps, bool residual) {
  const NoAutocast no_autocast;
  const Dims d = check_args(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  check_scale(d, x, branch_scale);
  check_cuda_dims(d, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto st = x.scalar_type();
  const auto acc = at::toOpMathType(st);
  auto xc = x.contiguous();
  auto aopts = xc.options().dtype(acc);
  auto mean = at::empty({d.B, d.H, d.W}, aopts);
  auto rstd = at::empty({d.B, d.H, d.W}, aopts);
  auto pooled = at::empty({d.B, d.C}, aopts);
  auto pre = at::empty_like(xc);
  const int64_t P = d.B * d.H * d.W, HW = d.H * d.W;
  if (P == 0) return {at::empty_like(xc), mean, rstd, pooled, pre};  // an empty batch
  auto u = at::empty_like(xc);
  auto y = at::empty_like(xc);  // ln_stats copies x here (residual); the 1x1 GEMM adds to it in place
  auto wf = at::empty({d.B, d.C, d.C}, xc.options());  // [B, Cout, Cin]
  // One op-math buffer: the packed weights, then the row-tile sums [B, ceil(H / rows), C], the SE
  // hidden units [B, R] and the gate [B, C].
  const WeightLayout L{d.C, d.R, false};
  const int rows = pick_rows(xc.element_size());
  const int64_t Ht = row_tiles(d, rows);
  auto buf = at::empty({L.total() + d.B * (Ht * d.C + d.R + d.C)}, aopts);
  const SmallInputs in({&ln_weight, &ln_bias, &dw_weight, &fc1_weight, &fc2_weight, &pw_weight}, branch_scale);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int vec = pick_vec(d, xc.element_size(), {xc.data_ptr(), u.data_ptr(), pre.data_ptr(), y.data_ptr()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* wbuf = buf.data_ptr<acc_t>();
    acc_t* rowsum = wbuf + L.total();
    acc_t* hidden = rowsum + d.B * Ht * d.C;
    acc_t* gate = hidden + d.B * d.R;
    const acc_t* scale = in.scale_ptr<acc_t>();
    launch_pack<scalar_t, acc_t>(in.ptrs, L, wbuf, stream);
    with_width<scalar_t>(vec, [&](auto V) {
      constexpr int VEC = decltype(V)::value;
      ln_stats_kernel<scalar_t, acc_t, VEC><<<warp_blocks(P), WARPS * 32, 0, stream>>>(
          xc.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), P,
          static_cast<int>(d.C), static_cast<acc_t>(eps), residual ? y.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      with_width<scalar_t>(rows, [&](auto RTc) {
        constexpr int RT = decltype(RTc)::value;
        dw_gelu_kernel<scalar_t, acc_t, VEC, RT><<<tile_grid(d, VEC, RT), dim3(TX, TY), 0, stream>>>(
            xc.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), wbuf + L.g(), wbuf + L.b(),
            wbuf + L.wt(), u.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(), rowsum, static_cast<int>(d.H),
            static_cast<int>(d.W), static_cast<int>(d.C));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    // The SE MLP: pooled means, h = GELU(W1 pooled), gate = sigmoid(W2 h) * branch_scale[b]; then the
    // gate folded into the 1x1 weight per image.
    const int C = static_cast<int>(d.C), R = static_cast<int>(d.R);
    launch_sum_rows(rowsum, d.B, Ht, d.C, PoolEpi<acc_t>{pooled.data_ptr<acc_t>(), acc_t(1) / acc_t(HW), C},
                    stream);
    launch_small_mm(pooled.data_ptr<acc_t>(), wbuf + L.w1(), d.B, d.R, d.C, HiddenEpi<acc_t>{nullptr, hidden, R},
                    stream);
    launch_small_mm(hidden, wbuf + L.w2(), d.B, d.C, d.R, GateEpi<acc_t>{scale, gate, nullptr, C}, stream);
    const int64_t total = d.B * d.C * d.C;
    fold_kernel<scalar_t, acc_t><<<grid_stride_blocks(total, 256), 256, 0, stream>>>(
        wbuf + L.wp(), gate, wf.data_ptr<scalar_t>(), total, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // y_b = x_b + u_b @ (Wp * gate_b)^T: y holds x (ln_stats wrote it), the GEMM adds in place (beta 1;
  // out of place, at::baddbmm would first copy x into its result, a full extra pass). Without the
  // residual the GEMM writes y (beta 0).
  auto y3 = y.view({d.B, HW, d.C});
  if (residual) {
    y3.baddbmm_(u.view({d.B, HW, d.C}), wf.transpose(1, 2));
  } else {
    at::bmm_out(y3, u.view({d.B, HW, d.C}), wf.transpose(1, 2));
  }
  return {y.view(x.sizes()), mean, rstd, pooled, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ln_weight,
              const at::Tensor& ln_bias, const at::Tensor& dw_weight, const at::Tensor& fc1_weight,
              const at::Tensor& fc2_weight, const at::Tensor& pw_weight,
              const c10::optional<at::Tensor>& branch_scale, const at::Tensor& mean,
              const at::Tensor& rstd, const at::Tensor& pooled, const at::Tensor& pre, double eps,
              bool residual) {
  const NoAutocast no_autocast;
  const Dims d = check_args(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  check_scale(d, x, branch_scale);
  check_saved(d, grad_y, x, mean, rstd, pooled, pre);
  check_cuda_dims(d, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto st = x.scalar_type();
  const auto acc = at::toOpMathType(st);
  auto xc = x.contiguous();
  const int64_t P = d.B * d.H * d.W, HW = d.H * d.W;
  auto grad_of = [](const at::Tensor& w) { return at::empty(w.sizes(), w.options()); };  // contiguous
  auto gx = at::empty_like(xc);
  auto g_lnw = grad_of(ln_weight), g_lnb = grad_of(ln_bias), g_dw = grad_of(dw_weight);
  auto g_fc1 = grad_of(fc1_weight), g_fc2 = grad_of(fc2_weight);
  if (P == 0) {  // an empty batch: no contribution to any weight
    for (at::Tensor* g : {&g_lnw, &g_lnb, &g_dw, &g_fc1, &g_fc2}) g->zero_();
    return {gx, g_lnw, g_lnb, g_dw, g_fc1, g_fc2, at::zeros(pw_weight.sizes(), pw_weight.options())};
  }
  auto gyc = grad_y.contiguous();
  auto prec = pre.contiguous();
  auto mean_c = mean.contiguous();
  auto rstd_c = rstd.contiguous();
  auto pooled_c = pooled.contiguous();
  auto aopts = xc.options().dtype(acc);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int H = static_cast<int>(d.H), W = static_cast<int>(d.W), C = static_cast<int>(d.C);
  const int R = static_cast<int>(d.R);
  const int vec = pick_vec(d, xc.element_size(), {xc.data_ptr(), gyc.data_ptr(), prec.data_ptr()});
  const WeightLayout L{d.C, d.R, true};
  auto buf = at::empty({BackwardBuffer<float>::size(L, d)}, aopts);
  const SmallInputs in({&ln_weight, &ln_bias, &dw_weight, &fc1_weight, &fc2_weight, &pw_weight}, branch_scale);
  auto gy2 = gyc.view({P, d.C});
  auto wp_st = pw_weight.reshape({d.C, d.C});
  if (wp_st.scalar_type() != st) wp_st = wp_st.to(st);  // float32 master weights under AMP
  const bool fused = fused_grad();
  at::Tensor gpw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "channel_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardBuffer<acc_t> m(buf.data_ptr<acc_t>(), L, d);
    acc_t* const wbuf = m.w;
    const acc_t* scale = in.scale_ptr<acc_t>();
    launch_pack<scalar_t, acc_t>(in.ptrs, L, wbuf, stream);
    // The SE recomputed from the saved pooled means: a, h = GELU(a), s = sigmoid(W2 h), gate = s * scale.
    launch_small_mm(pooled_c.data_ptr<acc_t>(), wbuf + L.w1(), d.B, d.R, d.C, HiddenEpi<acc_t>{m.a, m.h, R}, stream);
    launch_small_mm(static_cast<const acc_t*>(m.h), wbuf + L.w2(), d.B, d.C, d.R,
                    GateEpi<acc_t>{scale, m.gate, m.s, C}, stream);
    // gv = gy Wp (the grad at the gated activations), then one pass over pre and gv for v = GELU(pre) *
    // gate and the gate's per-row grad sums, then grad_pw = gy^T v: GEMMs with fp32 accumulation in
    // x's dtype.
    auto gv = at::mm(gy2, wp_st);  // [P, Cin]
    // gv is a fresh GEMM output: its alignment may still cap VEC (checked, never assumed).
    const int vec_gv = std::min(vec, pick_vec(d, xc.element_size(), {gv.data_ptr()}));
    auto v = at::empty_like(xc);
    with_width<scalar_t>(vec_gv, [&](auto V) {
      constexpr int VEC = decltype(V)::value;
      gate_dot_kernel<scalar_t, acc_t, VEC><<<tile_grid(d, VEC), dim3(TX, TY), 0, stream>>>(
          gv.data_ptr<scalar_t>(), prec.data_ptr<scalar_t>(), m.gate, v.data_ptr<scalar_t>(), m.rowdot, H, W, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    gpw = at::mm(gy2.t(), v.view({P, d.C}));
    v.reset();
    auto gn = at::empty({d.B, d.H, d.W, d.C}, aopts);
    // dw_backward's rows per thread: at most 8 / VEC (ptxas sm_90: VEC = 4 with 4 rows spills ~150
    // bytes at 255 registers; every other pair fits), so the partials' tiles follow the VEC it runs at.
    const int rows_bwd = std::min(pick_rows(xc.element_size()), 8 / vec_gv);
    const int64_t Ht = row_tiles(d, rows_bwd);
    auto partials = at::empty({d.B * Ht, 11, d.C}, aopts);  // per row tile of dw_backward
    at::Tensor gd;  // the grad at the DW output, unless dw_backward forms it itself
    if (!fused) gd = at::empty({d.B, d.H, d.W, d.C}, aopts);
    // The SE backward: gz at the gate's logit, ga at the hidden pre-activation, gp at the pooled means,
    // and the SE weights' grads (summed over the batch, in their own dtypes).
    launch_sum_rows(static_cast<const acc_t*>(m.rowdot), d.B, d.H, d.C, GateGradEpi<acc_t>{scale, m.s, m.gz, C},
                    stream);
    launch_small_mm(static_cast<const acc_t*>(m.gz), wbuf + L.w2t(), d.B, d.R, d.C, GeluGradEpi<acc_t>{m.a, m.ga, R},
                    stream);
    launch_small_mm(static_cast<const acc_t*>(m.ga), wbuf + L.w1t(), d.B, d.C, d.R, StoreEpi<acc_t>{m.gp, C}, stream);
    se_weight_grad_kernel<scalar_t, acc_t><<<grid_stride_blocks(2 * d.R * d.C, 256), 256, 0, stream>>>(
        m.ga, pooled_c.data_ptr<acc_t>(), m.gz, m.h, static_cast<int>(d.B), R, C, g_fc1.data_ptr(),
        in.is_float(kFc1), g_fc2.data_ptr(), in.is_float(kFc2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    with_width<scalar_t>(vec_gv, [&](auto V) {
      constexpr int VEC = decltype(V)::value;
      const acc_t inv_hw = acc_t(1) / acc_t(HW);
      if (!fused) {
        grad_pre_kernel<scalar_t, acc_t, VEC><<<grid_stride_blocks(P, WARPS), dim3(32, WARPS), 0, stream>>>(
            gv.data_ptr<scalar_t>(), prec.data_ptr<scalar_t>(), m.gate, m.gp, gd.data_ptr<acc_t>(), P, HW, C, inv_hw);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      auto launch = [&](auto fused_c, auto rows_c) {
        constexpr bool FUSED = decltype(fused_c)::value;
        constexpr int RT = decltype(rows_c)::value;
        if constexpr (VEC * RT <= 8) {  // rows_bwd's cap: the spilling VEC 4 x RT 4 kernel is never built
          dw_backward_kernel<scalar_t, acc_t, VEC, FUSED, RT><<<tile_grid(d, VEC, RT), dim3(TX, TY), 0, stream>>>(
              FUSED ? nullptr : gd.data_ptr<acc_t>(), FUSED ? gv.data_ptr<scalar_t>() : nullptr,
              FUSED ? prec.data_ptr<scalar_t>() : nullptr, FUSED ? m.gate : nullptr, FUSED ? m.gp : nullptr, inv_hw,
              xc.data_ptr<scalar_t>(), mean_c.data_ptr<acc_t>(), rstd_c.data_ptr<acc_t>(), wbuf + L.g(), wbuf + L.b(),
              wbuf + L.wt(), gn.data_ptr<acc_t>(), partials.data_ptr<acc_t>(), H, W, C);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          TORCH_INTERNAL_ASSERT(false, "channel_attention: dw_backward has no VEC = ", VEC, ", RT = ", RT);
        }
      };
      with_width<scalar_t>(rows_bwd, [&](auto rows_c) {
        if (fused) {
          launch(std::true_type{}, rows_c);
        } else {
          launch(std::false_type{}, rows_c);
        }
      });
    });
    with_width<scalar_t>(vec, [&](auto V) {
      constexpr int VEC = decltype(V)::value;
      ln_backward_kernel<scalar_t, acc_t, VEC><<<warp_blocks(P), WARPS * 32, 0, stream>>>(
          gn.data_ptr<acc_t>(), xc.data_ptr<scalar_t>(), residual ? gyc.data_ptr<scalar_t>() : nullptr,
          mean_c.data_ptr<acc_t>(),
          rstd_c.data_ptr<acc_t>(), wbuf + L.g(), gx.data_ptr<scalar_t>(), P, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // grad_dw and the LN affine's grads from dw_backward's per-row partials, in their weights' dtypes.
    launch_sum_rows(static_cast<const acc_t*>(partials.data_ptr<acc_t>()), 1, d.B * Ht, 11 * d.C,
                    PartialsEpi<scalar_t, acc_t>{g_dw.data_ptr(), g_lnw.data_ptr(), g_lnb.data_ptr(),
                                                 in.is_float(kDw), in.is_float(kLnWeight),
                                                 in.is_float(kLnBias), C},
                    stream);
  });
  return {gx, g_lnw, g_lnb, g_dw, g_fc1, g_fc2, gpw.view(pw_weight.sizes()).to(pw_weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dbsam, CUDA, m) {
  m.impl("channel_attention_forward", &forward_cuda);
  m.impl("channel_attention_backward", &backward_cuda);
}

}  // namespace ca
}  // namespace dbsam
