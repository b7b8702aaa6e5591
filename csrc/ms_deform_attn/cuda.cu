// CUDA kernels of multi-scale deformable attention (forward, backward, deterministic backward).
//
// Thread mapping (forward and backward): a "group" of G lanes (G a power of two <= 32, so a group
// never straddles a warp) owns one (n, q, m) sample; lane j owns channel chunks j, j+G, j+2G, ...
// of VEC contiguous channels each. VEC = 16 bytes / sizeof(value) on the fast path (D % VEC == 0
// and 16-byte aligned pointers: 8 fp16/bf16, 4 fp32, 2 fp64 per load), VEC = 1 otherwise (any D).
// G = min(32, next_pow2(D / VEC)), so for D = 64 bf16 a group is 8 lanes and one corner of one
// sample is one 128-byte line read by 8 lanes with 16-byte loads. Consecutive groups are
// consecutive (q, m), so a 256-thread block works on 256 / G samples (several queries) at once.
// Locations and weights are read once per lane (a broadcast within the group), the bilinear math
// is the shared sampling.h code the CPU kernel runs, and nothing synchronises the block.
//
// Backward: the same mapping. Each lane computes its partial <grad_out, corner value> over its
// channels; the grad_attn / grad_loc terms are linear in those dot products, so the group reduces
// three numbers per sample point with xor shuffles and lane 0 writes them (every element of
// grad_loc and grad_attn is written exactly once: no zero fill, no atomics). grad_value is a
// scatter: atomics into an acc_t buffer (fp32 for fp16/bf16 values, rounded once at the end);
// on sm_90 four fp32 channels go in one vector red (red.global.add.v4.f32). Opt-in
// (DBSAM_MSDA_LOWP_ATOMICS=1): fp16/bf16 channels added straight into grad_value, packed in pairs.
// Deterministic mode (torch.use_deterministic_algorithms(True)): the same kernel without the
// scatter, then each (corner, weight) contribution is keyed by its value row, the keys are sorted
// stably and one group per distinct row sums its contributions in sorted order: no atomics,
// bitwise identical across runs (see benchmarks/NOTES.md for the byte and atomic counts).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "ms_deform_attn/checks.h"
#include "ms_deform_attn/kernels.cuh"

namespace dbsam {
namespace msda {
namespace {

// ------------------------------------------------------------------------------------------------
// Host side

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

KDims make_dims(const Dims& d, int64_t groups, int vec) {
  KDims k{d.N, d.S, d.M, d.D, d.Lq, d.L, d.P, groups, 1, 0, 0, 0};
  const int64_t chunks = d.D / vec;
  DBSAM_CHECK(chunks <= std::numeric_limits<int>::max(), "ms_deform_attn: D too large");
  k.chunks = static_cast<int>(chunks);
  while (k.G < 32 && k.G < k.chunks) {
    k.G <<= 1;
    ++k.log2G;
  }
  return k;
}

// Sample order per kernel. DBSAM_MSDA_ORDER=query|head overrides both kernels (for A/B timing,
// benchmarks/ab_order.py); unset, the forward runs head-major (gathers only: L1 reuse between
// neighbouring queries) and the backward query-major (fewer same-address atomics in flight).
int pick_order(bool backward) {
  static const int forced = [] {
    const char* e = std::getenv("DBSAM_MSDA_ORDER");
    if (e == nullptr) return -1;
    const std::string v(e);
    if (v == "head") return 1;
    if (v == "query") return 0;
    return -1;
  }();
  if (forced >= 0) return forced;
  return backward ? 0 : 1;
}

// fp16/bf16 lanes own 8 channels (16-byte loads) or 4 (8-byte loads, twice the lanes per sample).
// Measured on the H100 (2026-11-27, commit 10030cd, benchmarks/results, NOTES.md section 8): the
// forward is faster with 16 bytes (bf16 injector 486 vs 809 us), the atomic backward with 8 (3661
// vs 2205 us: half the channels per lane halves each lane's atomics in flight and doubles the lanes
// that issue them). So by default the forward loads 16 bytes and the atomic backward 8; the
// deterministic gather keeps 16. DBSAM_MSDA_LOAD_BYTES=8 or =16 forces one width on both (the A/B
// rows of benchmarks/ab_order.py); read once per process.
int forced_load_bytes() {
  static const int forced = [] {
    const char* e = std::getenv("DBSAM_MSDA_LOAD_BYTES");
    if (e == nullptr) return 0;
    const std::string v(e);
    if (v == "8") return 8;
    if (v == "16") return 16;
    return 0;
  }();
  return forced;
}

bool half_width_loads(bool backward) {
  const int forced = forced_load_bytes();
  if (forced != 0) return forced == 8;
  return backward;
}

// The forward locates each sample point once per group of lanes and shares it by shuffle
// (msda_forward_bcast_kernel), where every lane owns at most one channel chunk and a value slice's
// offsets fit 32 bits; elsewhere msda_forward_kernel, where each lane locates the point itself.
// Default since the H100 run of 2026-11-27 (results/h100_2026-11-27_dfbc80c, ab.log): 1.36x
// (DB-SAM vit_from_conv bf16) to 1.79x (injector fp32, 62% of copy bandwidth) faster, same output
// bit for bit. DBSAM_MSDA_FWD_BCAST=0 picks the per-lane kernel (A/B and tests); read once per process.
bool forward_bcast() {
  static const bool on = [] {
    const char* e = std::getenv("DBSAM_MSDA_FWD_BCAST");
    return e == nullptr || std::string(e) != "0";
  }();
  return on;
}

// DBSAM_MSDA_LOWP_ATOMICS=1: fp16/bf16 values on the fast path scatter grad_value straight into a
// tensor of value's dtype (packed bf16x2/f16x2 reds) instead of an fp32 buffer rounded once at the
// end: half the atomic bytes, and no fp32 zero-fill and conversion passes (on the H100, 2026-11-27,
// 159 + 259 us of the 2637 us bf16 injector fwd+bwd; deformops's bf16 backward works this way and
// took 1003 us against our 1747 us kernel). The price is a rounding at every add: an element that
// gathers k contributions carries up to ~k/2 bf16 ulps of error instead of one. Off by default:
// on the H100 (2026-11-27, ab.log) the bf16 backward ran 1.21-1.51x faster, but the error figure
// of test_low_precision_grad_value_atomics did not come back from that run (it is under the test's
// 10% bound); it stays an opt-in until that figure is read.
bool half_grad_atomics() {
  static const bool on = [] {
    const char* e = std::getenv("DBSAM_MSDA_LOWP_ATOMICS");
    return e != nullptr && std::string(e) == "1";
  }();
  return on;
}

// Launch shape for `threads` threads: 256-thread blocks, or 64-thread blocks when 256 would leave
// SMs idle (the DETR decoder: 300 queries x 8 heads x 8 lanes = 75 blocks of 256 on 132 SMs).
// Kernels index by blockDim.x, and 64 keeps whole warps, so groups (<= 32 lanes) stay intact.
struct Launch {
  dim3 grid;
  unsigned block;
};

Launch launch_for(int64_t threads) {
  // The current device is value's (CUDAGuard); ATen caches the properties per device, no sync.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t block = (threads + kThreads - 1) / kThreads < 2 * static_cast<int64_t>(sms) ? 64 : kThreads;
  const int64_t blocks = (threads + block - 1) / block;
  DBSAM_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "ms_deform_attn: problem too large for one launch (", blocks, " blocks)");
  return {dim3(static_cast<unsigned>(blocks)), static_cast<unsigned>(block)};
}

dim3 grid_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  DBSAM_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "ms_deform_attn: problem too large for one launch (", blocks, " blocks)");
  return dim3(static_cast<unsigned>(blocks));
}

template <typename scalar_t>
constexpr int fast_vec() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights);
  DBSAM_CHECK_VALUE(value.is_cuda(), "ms_deform_attn: the CUDA kernel needs CUDA tensors, got ",
                    value.device());
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  auto v = value.contiguous();
  auto shapes = spatial_shapes.contiguous();
  auto starts = level_start_index.contiguous();
  auto loc = sampling_locations.contiguous();
  auto attn = attention_weights.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtypes(v.scalar_type(), loc.scalar_type(), "ms_deform_attn_forward",
                  [&](auto vtag, auto ctag) {
    using scalar_t = typename decltype(vtag)::type;
    using coord_t = typename decltype(ctag)::type;
    constexpr int V = fast_vec<scalar_t>();
    constexpr int VH = sizeof(scalar_t) == 2 ? V / 2 : V;  // 8-byte loads for fp16/bf16 only
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool fast = d.D % V == 0 && aligned16(vp) && aligned16(op);
    const bool half = fast && VH != V && half_width_loads(false);
    const int vec = half ? VH : fast ? V : 1;
    KDims k = make_dims(d, d.N * d.Lq * d.M, vec);
    k.head_major = pick_order(false);
    const Launch lc = launch_for(k.total * k.G);
    const bool bcast = fast && forward_bcast() && k.chunks <= k.G &&
                       d.S * d.M * d.D <= static_cast<int64_t>(std::numeric_limits<int32_t>::max());
    // Every forward kernel takes the same arguments; only the variant and VEC differ.
    auto run = [&](auto kernel) {
      kernel<<<lc.grid, lc.block, 0, stream>>>(vp, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                                               loc.data_ptr<coord_t>(), attn.data_ptr<coord_t>(), op, k);
    };
    if (bcast && half) {
      run(msda_forward_bcast_kernel<scalar_t, coord_t, VH>);
    } else if (bcast) {
      run(msda_forward_bcast_kernel<scalar_t, coord_t, V>);
    } else if (half) {
      run(msda_forward_kernel<scalar_t, coord_t, VH>);
    } else if (fast) {
      run(msda_forward_kernel<scalar_t, coord_t, V>);
    } else {
      run(msda_forward_kernel<scalar_t, coord_t, 1>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t, typename coord_t, int VEC, bool SCATTER,
          typename gv_t = at::opmath_type<scalar_t>>
void launch_backward(const at::Tensor& go, const at::Tensor& v, const at::Tensor& shapes,
                     const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn,
                     typename NoDeduce<gv_t>::type* gv, const at::Tensor& grad_loc,
                     const at::Tensor& grad_attn, const KDims& k, cudaStream_t stream) {
  const Launch lc = launch_for(k.total * k.G);
  msda_backward_kernel<scalar_t, coord_t, VEC, SCATTER, gv_t><<<lc.grid, lc.block, 0, stream>>>(
          go.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
          starts.data_ptr<int64_t>(), loc.data_ptr<coord_t>(), attn.data_ptr<coord_t>(), gv,
          grad_loc.data_ptr<coord_t>(), grad_attn.data_ptr<coord_t>(), k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights);
  DBSAM_CHECK_VALUE(value.is_cuda(), "ms_deform_attn: the CUDA kernel needs CUDA tensors, got ",
                    value.device());
  check_grad_output(d, grad_output, value);
  const c10::cuda::CUDAGuard guard(value.device());
  auto go = grad_output.contiguous();
  auto v = value.contiguous();
  auto shapes = spatial_shapes.contiguous();
  auto starts = level_start_index.contiguous();
  auto loc = sampling_locations.contiguous();
  auto attn = attention_weights.contiguous();
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  if (go.numel() == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {at::zeros(v.sizes(), v.options()), grad_loc, grad_attn};
  }
  const bool low = v.scalar_type() == at::kHalf || v.scalar_type() == at::kBFloat16;
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_value;
  dispatch_dtypes(v.scalar_type(), loc.scalar_type(), "ms_deform_attn_backward",
                  [&](auto vtag, auto ctag) {
    using scalar_t = typename decltype(vtag)::type;
    using coord_t = typename decltype(ctag)::type;
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = fast_vec<scalar_t>();
    constexpr int VH = sizeof(scalar_t) == 2 ? V / 2 : V;
    const bool fast = d.D % V == 0 && aligned16(v.data_ptr()) && aligned16(go.data_ptr());
    // The deterministic path keeps 16-byte loads (its gather kernel is instantiated for V only).
    const bool half = fast && !deterministic && VH != V && half_width_loads(true);
    KDims k = make_dims(d, d.N * d.Lq * d.M, half ? VH : fast ? V : 1);
    k.head_major = pick_order(true);
    if (!deterministic) {
      if constexpr (sizeof(scalar_t) == 2) {
        if (fast && half_grad_atomics()) {
          grad_value = at::zeros(v.sizes(), v.options());
          scalar_t* gvl = grad_value.data_ptr<scalar_t>();
          if (half) {
            launch_backward<scalar_t, coord_t, VH, true, scalar_t>(go, v, shapes, starts, loc, attn, gvl,
                                                                  grad_loc, grad_attn, k, stream);
          } else {
            launch_backward<scalar_t, coord_t, V, true, scalar_t>(go, v, shapes, starts, loc, attn, gvl,
                                                                 grad_loc, grad_attn, k, stream);
          }
          return;
        }
      }
      // acc_t buffer laid out like value: fp32 for fp16/bf16 (rounded once below).
      auto acc = at::zeros(v.sizes(), v.options().dtype(low ? at::kFloat : v.scalar_type()));
      acc_t* gv = acc.data_ptr<acc_t>();
      if (half) {
        launch_backward<scalar_t, coord_t, VH, true>(go, v, shapes, starts, loc, attn, gv,
                                                     grad_loc, grad_attn, k, stream);
      } else if (fast) {
        launch_backward<scalar_t, coord_t, V, true>(go, v, shapes, starts, loc, attn, gv,
                                                    grad_loc, grad_attn, k, stream);
      } else {
        launch_backward<scalar_t, coord_t, 1, true>(go, v, shapes, starts, loc, attn, gv,
                                                    grad_loc, grad_attn, k, stream);
      }
      grad_value = low ? acc.to(v.scalar_type()) : acc;
      return;
    }
    // Deterministic: location/weight gradients without the scatter, then sort + gather.
    if (fast) {
      launch_backward<scalar_t, coord_t, V, false>(go, v, shapes, starts, loc, attn, nullptr,
                                                   grad_loc, grad_attn, k, stream);
    } else {
      launch_backward<scalar_t, coord_t, 1, false>(go, v, shapes, starts, loc, attn, nullptr,
                                                   grad_loc, grad_attn, k, stream);
    }
    grad_value = at::zeros(v.sizes(), v.options());
    const int64_t points = d.N * d.Lq * d.M * d.L * d.P;
    if (points == 0 || d.S == 0) return;
    const int64_t E = 4 * points;
    auto keys = at::empty({E}, v.options().dtype(at::kLong));
    auto wbuf = at::empty({E}, v.options().dtype(low ? at::kFloat : v.scalar_type()));
    msda_det_keys_kernel<coord_t, acc_t><<<grid_for(points), kThreads, 0, stream>>>(
        shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<coord_t>(),
        attn.data_ptr<coord_t>(), keys.data_ptr<int64_t>(), wbuf.data_ptr<acc_t>(), k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor skeys, perm;
    std::tie(skeys, perm) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const bool gfast = fast && aligned16(grad_value.data_ptr());
    const KDims kg = make_dims(d, E, gfast ? V : 1);
    if (gfast) {
      msda_det_gather_kernel<scalar_t, acc_t, V><<<grid_for(E * kg.G), kThreads, 0, stream>>>(
          skeys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), wbuf.data_ptr<acc_t>(),
          go.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), kg);
    } else {
      msda_det_gather_kernel<scalar_t, acc_t, 1><<<grid_for(E * kg.G), kThreads, 0, stream>>>(
          skeys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), wbuf.data_ptr<acc_t>(),
          go.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), kg);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(dbsam, CUDA, m) {
  m.impl("ms_deform_attn_forward", &forward_cuda);
  m.impl("ms_deform_attn_backward", &backward_cuda);
}

}  // namespace msda
}  // namespace dbsam
