// Device code of the ms_deform_attn CUDA op (cuda.cu holds the host side: checks, buffers, the
// sample order and load-width choices, launches, the sort of the deterministic backward). Kept apart
// and free of ATen so that tests/cpp/test_msda_kernels.cpp can compile these very kernels for the CPU
// under a small CUDA emulation (tests/cpp/cuda_emulation.h) and check them against plain loops over
// sampling.h in every CI run, without a GPU: float and double values; the fp16/bf16 instantiations and
// the sm_90 vector atomics are compiled only by nvcc, and checked by the GPU tests.
//
// Thread mapping: see cuda.cu's header.
#pragma once

#include <stdint.h>

#include <type_traits>

#if defined(__CUDACC__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#endif

#include "common/vec_access.cuh"
#include "ms_deform_attn/sampling.h"

namespace dbsam {
namespace msda {

// The accumulation type: float for fp16/bf16 values, the value type otherwise (ATen's
// opmath_type, without ATen).
template <typename T>
struct OpMath {
  using type = T;
};
#if defined(__CUDACC__)
template <>
struct OpMath<c10::Half> {
  using type = float;
};
template <>
struct OpMath<c10::BFloat16> {
  using type = float;
};
#endif

constexpr int kThreads = 256;

// Keeps a parameter out of template argument deduction (std::type_identity, which is C++20).
template <typename T>
struct NoDeduce {
  using type = T;
};

// Launch geometry and sizes, passed by value.
struct KDims {
  int64_t N, S, M, D, Lq, L, P;
  int64_t total;  // number of groups (samples, or sorted positions in the gather kernel)
  int G;          // lanes per group, power of two <= 32
  int log2G;
  int chunks;     // D / VEC
  int head_major; // 1: consecutive groups walk queries of one (n, m); 0: (n, q, m) order
};

// The (n, q, m) sample (flattened like out's first three axes) that group `g` works on. Query-major
// order (g = t) matches the output layout; head-major order (g = (n*M + m)*Lq + q) puts neighbouring
// queries of one head in one block, which share value rows: more L1 hits on the gathers, and more
// same-address atomics in the backward. The host picks per kernel (see pick_order()).
__device__ __forceinline__ int64_t sample_of_group(int64_t g, const KDims& d) {
  if (!d.head_major) return g;
  const int64_t ml = d.M * d.Lq;
  const int64_t n = g / ml;
  const int64_t r = g - n * ml;
  const int64_t m = r / d.Lq;
  const int64_t q = r - m * d.Lq;
  return (n * d.Lq + q) * d.M + m;
}

// grad_value scatter of VEC channels. `dst` is VEC-aligned (checked on the host).
template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* dst, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = VEC % 4 == 0;  // red.global.add.v4.f32, sm_90 and later
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
    }
#endif
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, v[j]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(double* dst, const double (&v)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, v[j]);
}

#if defined(__CUDACC__)  // the 16-bit types exist only in the CUDA build (not under tests/cpp's emulation)
// DBSAM_MSDA_LOWP_ATOMICS=1 only: the scatter adds straight into a bf16/fp16 grad_value, two
// channels per 32-bit word, rounding at every add (see half_grad_atomics()). On sm_90 one vector
// red carries VEC channels; before sm_90 one packed atomic per channel pair.
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const scalar_t a(lo), b(hi);  // round to nearest even
  return static_cast<uint32_t>(a.x) | (static_cast<uint32_t>(b.x) << 16);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void atomic_add_vec_lowp(scalar_t* dst, const float (&v)[VEC]) {
  static_assert(VEC == 4 || VEC == 8, "packed atomics need 4 or 8 channels");
  constexpr bool kBf16 = std::is_same<scalar_t, c10::BFloat16>::value;
  uint32_t w[VEC / 2];
#pragma unroll
  for (int j = 0; j < VEC / 2; ++j) w[j] = pack2<scalar_t>(v[2 * j], v[2 * j + 1]);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC == 8 && kBf16) {
    asm volatile("red.global.add.noftz.v4.bf16x2 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3]) : "memory");
  } else if constexpr (VEC == 8) {
    asm volatile("red.global.add.noftz.v4.f16x2 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3]) : "memory");
  } else if constexpr (kBf16) {
    asm volatile("red.global.add.noftz.v2.bf16x2 [%0], {%1, %2};" ::"l"(dst), "r"(w[0]), "r"(w[1]) : "memory");
  } else {
    asm volatile("red.global.add.noftz.v2.f16x2 [%0], {%1, %2};" ::"l"(dst), "r"(w[0]), "r"(w[1]) : "memory");
  }
#elif defined(__CUDA_ARCH__)
#pragma unroll
  for (int j = 0; j < VEC / 2; ++j) {
    if constexpr (kBf16) {
      __nv_bfloat162 x;
      memcpy(&x, &w[j], sizeof(x));
      atomicAdd(reinterpret_cast<__nv_bfloat162*>(dst) + j, x);
    } else {
      __half2 x;
      memcpy(&x, &w[j], sizeof(x));
      atomicAdd(reinterpret_cast<__half2*>(dst) + j, x);
    }
  }
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(c10::BFloat16* dst, const float (&v)[VEC]) {
  atomic_add_vec_lowp<c10::BFloat16, VEC>(dst, v);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(c10::Half* dst, const float (&v)[VEC]) {
  atomic_add_vec_lowp<c10::Half, VEC>(dst, v);
}
#endif

// Sum over the G lanes of a group (xor butterfly: every lane ends with the total, and the order of
// additions is fixed, so the result is the same on every run).
template <typename T>
__device__ __forceinline__ T group_sum(T x, int G) {
  for (int off = G >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// ------------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, typename coord_t, int VEC>
__global__ void __launch_bounds__(kThreads)
msda_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const coord_t* __restrict__ loc,
                    const coord_t* __restrict__ attn, scalar_t* __restrict__ out, const KDims d) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = gid >> d.log2G;
  const int lane = static_cast<int>(gid & (d.G - 1));
  if (g >= d.total) return;  // no shuffles in the forward: an early exit is safe
  const int64_t t = sample_of_group(g, d);  // (n, q, m), flattened like out's first three axes
  const int64_t m = t % d.M;
  const int64_t n = t / (d.M * d.Lq);
  const int64_t LP = d.L * d.P;
  const coord_t* tl = loc + t * LP * 2;
  const coord_t* ta = attn + t * LP;
  const int64_t row_stride = d.M * d.D;
  const scalar_t* vbase = value + n * d.S * row_stride + m * d.D;

  for (int c = lane; c < d.chunks; c += d.G) {
    acc_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
    const scalar_t* vb = vbase + static_cast<int64_t>(c) * VEC;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t i = l * d.P + p;
        Sample<acc_t> s;
        if (!locate<acc_t>(static_cast<acc_t>(tl[2 * i]), static_cast<acc_t>(tl[2 * i + 1]), H, W,
                           start, d.S, s)) {
          continue;
        }
        const acc_t a = static_cast<acc_t>(ta[i]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (s.row[k] < 0) continue;
          const acc_t w = a * s.weight[k];
          acc_t v[VEC];
          load_vec<VEC>(vb + s.row[k] * row_stride, v);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += w * v[j];
        }
      }
    }
    store_vec<VEC>(out + t * d.D + static_cast<int64_t>(c) * VEC, acc);
  }
}

// The forward with each sample point located once per group instead of once per lane (the default
// since H100 run 5, 1.36-1.79x faster than msda_forward_kernel; DBSAM_MSDA_FWD_BCAST=0 turns it off;
// the host takes it only where every lane owns at most one channel chunk and a value slice's
// offsets fit 32 bits). In msda_forward_kernel every lane of a group runs
// locate() for every point: in its sm_90 SASS (bf16, VEC = 8) one point costs ~245 instructions per
// lane, ~90 of them the bilinear setup that all G lanes repeat and most of the rest 64-bit index
// math, against 32 FFMAs; run 3's ncu had the kernel issue-bound (SM throughput 64%, memory 26%).
// Here lane j locates point i0 + j, keeps its four corner offsets (32-bit) and weights, and the group
// walks the G points, each lane taking point u's offsets and weights from lane u by shuffle (8
// shuffles per point) before its 4 gathers and FMAs. Same additions in the same order as
// msda_forward_kernel: bitwise the same output.
template <typename scalar_t, typename coord_t, int VEC>
__global__ void __launch_bounds__(kThreads)
msda_forward_bcast_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                          const int64_t* __restrict__ starts, const coord_t* __restrict__ loc,
                          const coord_t* __restrict__ attn, scalar_t* __restrict__ out, const KDims d) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = gid >> d.log2G;
  const int lane = static_cast<int>(gid & (d.G - 1));
  // Groups past the end stay to the end: every lane of the warp takes part in the shuffles.
  const bool active = g < d.total;
  const int64_t t = active ? sample_of_group(g, d) : 0;
  const int64_t m = t % d.M;
  const int64_t n = t / (d.M * d.Lq);
  const int LP = static_cast<int>(d.L * d.P), P = static_cast<int>(d.P);
  const coord_t* tl = loc + t * LP * 2;
  const coord_t* ta = attn + t * LP;
  const int row_stride = static_cast<int>(d.M * d.D);
  const scalar_t* vb = value + (n * d.S * d.M + m) * d.D + static_cast<int64_t>(lane) * VEC;
  const bool has_chunk = active && lane < d.chunks;
  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
  for (int i0 = 0; i0 < LP; i0 += d.G) {
    int off[4] = {-1, -1, -1, -1};  // -1: corner outside (skipped, as msda_forward_kernel skips it)
    acc_t w[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    const int i = i0 + lane;
    if (active && i < LP) {
      const int l = i / P;
      Sample<acc_t> s;
      if (locate<acc_t>(static_cast<acc_t>(tl[2 * i]), static_cast<acc_t>(tl[2 * i + 1]), shapes[2 * l],
                        shapes[2 * l + 1], starts[l], d.S, s)) {
        const acc_t a = static_cast<acc_t>(ta[i]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (s.row[k] < 0) continue;
          off[k] = static_cast<int>(s.row[k]) * row_stride;
          w[k] = a * s.weight[k];
        }
      }
    }
    const int points = min(d.G, LP - i0);
    for (int u = 0; u < points; ++u) {
      int o[4];
      acc_t ww[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        o[k] = __shfl_sync(0xffffffffu, off[k], u, d.G);
        ww[k] = __shfl_sync(0xffffffffu, w[k], u, d.G);
      }
      if (!has_chunk) continue;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (o[k] < 0) continue;
        acc_t v[VEC];
        load_vec<VEC>(vb + o[k], v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += ww[k] * v[j];
      }
    }
  }
  if (has_chunk) store_vec<VEC>(out + t * d.D + static_cast<int64_t>(lane) * VEC, acc);
}

// ------------------------------------------------------------------------------------------------
// Backward. SCATTER: accumulate grad_value with atomics (else only grad_loc / grad_attn).

// At most 80 registers: three 256-thread blocks (24 warps) per SM. Uncapped the vector scatter
// variant takes ~115 registers and two blocks; ptxas_ms_deform_attn.txt shows what it costs.
constexpr int kBackwardMinBlocks = 3;

template <typename scalar_t, typename coord_t, int VEC, bool SCATTER,
          typename gv_t = typename OpMath<scalar_t>::type>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks)
msda_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                     const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                     const coord_t* __restrict__ loc, const coord_t* __restrict__ attn,
                     gv_t* __restrict__ grad_value,
                     coord_t* __restrict__ grad_loc, coord_t* __restrict__ grad_attn,
                     const KDims d) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t t_raw = gid >> d.log2G;
  const int lane = static_cast<int>(gid & (d.G - 1));
  // Lanes past the end stay to the end: the group reductions below need the whole warp.
  const bool active = t_raw < d.total;
  const int64_t t = active ? sample_of_group(t_raw, d) : 0;
  const int64_t m = t % d.M;
  const int64_t n = t / (d.M * d.Lq);
  const int64_t LP = d.L * d.P;
  const coord_t* tl = loc + t * LP * 2;
  const coord_t* ta = attn + t * LP;
  const int64_t row_stride = d.M * d.D;
  const int64_t vofs = n * d.S * row_stride + m * d.D;
  const scalar_t* go = grad_out + t * d.D;

  // The lane's first chunk of grad_out stays in registers (the only chunk on the fast path).
  acc_t g0[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) g0[j] = acc_t(0);
  if (active && lane < d.chunks) load_vec<VEC>(go + static_cast<int64_t>(lane) * VEC, g0);

  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
    for (int64_t p = 0; p < d.P; ++p) {
      const int64_t i = l * d.P + p;
      Sample<acc_t> s;
      const bool ok = active && locate<acc_t>(static_cast<acc_t>(tl[2 * i]),
                                              static_cast<acc_t>(tl[2 * i + 1]), H, W, start,
                                              d.S, s);
      const acc_t a = active ? static_cast<acc_t>(ta[i]) : acc_t(0);
      acc_t ga = 0, gx = 0, gy = 0;  // this lane's share of the three gradients
      if (ok) {
        for (int c = lane; c < d.chunks; c += d.G) {
          const int64_t cofs = static_cast<int64_t>(c) * VEC;
          acc_t g[VEC];
          if (c == lane) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) g[j] = g0[j];
          } else {
            load_vec<VEC>(go + cofs, g);
          }
          acc_t dot[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            dot[k] = acc_t(0);
            if (s.row[k] < 0) continue;
            const int64_t o = vofs + s.row[k] * row_stride + cofs;
            acc_t v[VEC];
            load_vec<VEC>(value + o, v);
#pragma unroll
            for (int j = 0; j < VEC; ++j) dot[k] += g[j] * v[j];
            if constexpr (SCATTER) {
              const acc_t w = a * s.weight[k];
              acc_t contrib[VEC];
#pragma unroll
              for (int j = 0; j < VEC; ++j) contrib[j] = w * g[j];
              atomic_add_vec<VEC>(grad_value + o, contrib);
            }
          }
          acc_t dx, dy;
          value_grad_xy<acc_t>(s, dot[0], dot[1], dot[2], dot[3], dx, dy);
          ga += interpolate<acc_t>(s, dot);
          gx += dx;
          gy += dy;
        }
      }
      ga = group_sum(ga, d.G);
      gx = group_sum(gx, d.G);
      gy = group_sum(gy, d.G);
      if (active && lane == 0) {
        const int64_t o = t * LP + i;
        grad_attn[o] = static_cast<coord_t>(ok ? ga : acc_t(0));
        grad_loc[2 * o] = static_cast<coord_t>(ok ? a * gx * static_cast<acc_t>(W) : acc_t(0));
        grad_loc[2 * o + 1] = static_cast<coord_t>(ok ? a * gy * static_cast<acc_t>(H) : acc_t(0));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Deterministic grad_value: key every (sample point, corner) contribution by its value row, sort
// stably, then one group per distinct row gathers its contributions in sorted order.

// One thread per (n, q, m, l, p); writes keys/weights of its 4 corners at e = 4 * index + corner.
// Corners that contribute nothing get the key `sentinel` (= N*M*S, sorted after every row).
template <typename coord_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
msda_det_keys_kernel(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                     const coord_t* __restrict__ loc, const coord_t* __restrict__ attn,
                     int64_t* __restrict__ keys, acc_t* __restrict__ wbuf, const KDims d) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t LP = d.L * d.P;
  if (idx >= d.N * d.Lq * d.M * LP) return;
  const int64_t t = idx / LP;
  const int64_t i = idx - t * LP;
  const int64_t l = i / d.P;
  const int64_t m = t % d.M;
  const int64_t n = t / (d.M * d.Lq);
  const int64_t sentinel = d.N * d.M * d.S;
  Sample<acc_t> s;
  const bool ok = locate<acc_t>(static_cast<acc_t>(loc[2 * idx]), static_cast<acc_t>(loc[2 * idx + 1]),
                                shapes[2 * l], shapes[2 * l + 1], starts[l], d.S, s);
  const acc_t a = static_cast<acc_t>(attn[idx]);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const bool hit = ok && s.row[k] >= 0;
    keys[4 * idx + k] = hit ? (n * d.M + m) * d.S + s.row[k] : sentinel;
    wbuf[4 * idx + k] = hit ? a * s.weight[k] : acc_t(0);
  }
}

// One group per sorted position; only the first position of each row's run works.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
msda_det_gather_kernel(const int64_t* __restrict__ skeys, const int64_t* __restrict__ perm,
                       const acc_t* __restrict__ wbuf, const scalar_t* __restrict__ grad_out,
                       scalar_t* __restrict__ grad_value, const KDims d) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j = gid >> d.log2G;
  const int lane = static_cast<int>(gid & (d.G - 1));
  const int64_t E = d.total;
  if (j >= E) return;  // no shuffles here
  const int64_t key = skeys[j];
  if (key >= d.N * d.M * d.S) return;  // sentinel run: corners that contribute nothing
  if (j > 0 && skeys[j - 1] == key) return;
  const int64_t nm = key / d.S;
  const int64_t row = key - nm * d.S;
  const int64_t n = nm / d.M, m = nm - n * d.M;
  const int64_t corners_per_t = 4 * d.L * d.P;
  scalar_t* gv = grad_value + ((n * d.S + row) * d.M + m) * d.D;
  for (int c = lane; c < d.chunks; c += d.G) {
    const int64_t cofs = static_cast<int64_t>(c) * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int j2 = 0; j2 < VEC; ++j2) acc[j2] = acc_t(0);
    for (int64_t k = j; k < E && skeys[k] == key; ++k) {
      const int64_t e = perm[k];
      const int64_t t = e / corners_per_t;
      const acc_t w = wbuf[e];
      acc_t g[VEC];
      load_vec<VEC>(grad_out + t * d.D + cofs, g);
#pragma unroll
      for (int j2 = 0; j2 < VEC; ++j2) acc[j2] += w * g[j2];
    }
    store_vec<VEC>(gv + cofs, acc);
  }
}

}  // namespace msda
}  // namespace dbsam
