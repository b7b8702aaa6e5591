// The ms_deform_attn CUDA kernels (csrc/ms_deform_attn/kernels.cuh), run on the CPU under
// tests/cpp/cuda_emulation.h and checked against plain double-precision loops over sampling.h (the
// per-sample math every backend shares, itself checked by test_sampling.cpp and the Python tests):
// forward (and its located-once-per-group variant), the atomic backward (grad_value scatter;
// grad_loc and grad_attn from the group reductions), and the deterministic backward (keys, a stable
// sort as the host does, gather). Float,
// double and bf16 values (tests/cpp/host_bf16.h standing in for c10::BFloat16, with fp32 locations:
// the GPU's main path, 8 channels per 16-byte load), 1 to 8 channels per lane, both sample orders,
// lanes per group from 1 to 32, locations partly outside every level, and block sizes of 64 and 256
// (cuda.cu picks either). Only the sm_90 vector atomics and the opt-in bf16/fp16 grad_value atomics
// are nvcc-only: the GPU tests cover them.
#include "cuda_emulation.h"
#include "expect_close.h"
#include "host_bf16.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/kernels.cuh"

using namespace dbsam::msda;

// As c10::BFloat16 on the GPU: accumulated in float.
template <>
struct dbsam::msda::OpMath<bf16> {
  using type = float;
};

struct Problem {
  int64_t N, Lq, M, D, P;
  std::vector<std::pair<int64_t, int64_t>> levels;
};

// KDims as cuda.cu's make_dims builds it.
static KDims dims_for(const Problem& pr, int64_t S, int64_t groups, int vec, int head_major) {
  KDims k{pr.N, S, pr.M, pr.D, pr.Lq, static_cast<int64_t>(pr.levels.size()), pr.P, groups, 1, 0, 0, 0};
  k.chunks = static_cast<int>(pr.D / vec);
  while (k.G < 32 && k.G < k.chunks) {
    k.G <<= 1;
    ++k.log2G;
  }
  k.head_major = head_major;
  return k;
}

// V: value / output dtype (float, double, or bf16 standing in for c10::BFloat16); C: locations and
// weights (float with a bf16 value); the grad_value accumulator is OpMath<V>::type, as on the GPU.
template <typename V, typename C, int VEC>
static void run_case(const Problem& pr, int head_major, unsigned block) {
  using A = typename OpMath<V>::type;
  char tag[192];
  const char* name = std::is_same<V, bf16>::value ? "bf16" : sizeof(V) == 8 ? "double" : "float";
  std::snprintf(tag, sizeof tag, "[%s VEC=%d N=%lld Lq=%lld M=%lld D=%lld L=%zu P=%lld order=%s block=%u]", name,
                VEC, (long long)pr.N, (long long)pr.Lq, (long long)pr.M, (long long)pr.D, pr.levels.size(),
                (long long)pr.P, head_major ? "head" : "query", block);
  const double tol = sizeof(A) == 8 ? 1e-11 : 3e-5;  // kept in A or C
  const double tol_v = sizeof(V) == 2 ? 8e-3 : tol;   // rounded to V
  const int64_t N = pr.N, Lq = pr.Lq, M = pr.M, D = pr.D, P = pr.P, L = static_cast<int64_t>(pr.levels.size());
  std::vector<int64_t> shapes, starts;
  int64_t S = 0;
  for (auto& hw : pr.levels) {
    shapes.push_back(hw.first);
    shapes.push_back(hw.second);
    starts.push_back(S);
    S += hw.first * hw.second;
  }
  std::mt19937 rng(17 + VEC + D + 3 * head_major + int(sizeof(V)));
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(-0.15, 1.15);  // ~20% of the points partly or wholly outside
  std::vector<V> value(N * S * M * D), go(N * Lq * M * D);
  std::vector<C> loc(N * Lq * M * L * P * 2), attn(N * Lq * M * L * P);
  for (auto& v : value) v = static_cast<V>(nd(rng));
  for (auto& v : loc) v = static_cast<C>(ud(rng));
  for (auto& v : attn) v = static_cast<C>(0.5 + 0.5 * nd(rng));
  for (auto& v : go) v = static_cast<V>(nd(rng));

  // --- reference over sampling.h, in double ---------------------------------------------------------
  std::vector<double> out(N * Lq * M * D, 0.0), gval(value.size(), 0.0), gloc(loc.size(), 0.0), gattn(attn.size(), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t q = 0; q < Lq; ++q)
      for (int64_t m = 0; m < M; ++m) {
        const int64_t t = (n * Lq + q) * M + m;
        for (int64_t l = 0; l < L; ++l)
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = t * L * P + l * P + p;
            Sample<double> s;
            if (!locate<double>(loc[2 * i], loc[2 * i + 1], shapes[2 * l], shapes[2 * l + 1], starts[l], S, s)) continue;
            const double a = attn[i];
            for (int64_t c = 0; c < D; ++c) {
              double v[4];
              for (int k = 0; k < 4; ++k) v[k] = s.row[k] >= 0 ? double(value[((n * S + s.row[k]) * M + m) * D + c]) : 0.0;
              const double g = go[t * D + c];
              out[t * D + c] += a * interpolate(s, v);
              for (int k = 0; k < 4; ++k)
                if (s.row[k] >= 0) gval[((n * S + s.row[k]) * M + m) * D + c] += a * s.weight[k] * g;
              double dx, dy;
              value_grad_xy(s, v[0], v[1], v[2], v[3], dx, dy);
              gattn[i] += interpolate(s, v) * g;
              gloc[2 * i] += a * dx * shapes[2 * l + 1] * g;
              gloc[2 * i + 1] += a * dy * shapes[2 * l] * g;
            }
          }
      }

  const int64_t samples = N * Lq * M;
  // --- forward ---------------------------------------------------------------------------------------
  {
    const KDims k = dims_for(pr, S, samples, VEC, head_major);
    std::vector<V> out_k(out.size(), V(-9.0f));
    const int64_t threads = samples * k.G;
    cuda_emu::launch(dim3(unsigned((threads + block - 1) / block)), dim3(block), [&] {
      msda_forward_kernel<V, C, VEC>(value.data(), shapes.data(), starts.data(), loc.data(), attn.data(), out_k.data(), k);
    });
    expect_close("forward", out_k, out, tol_v, tag);
    // The located-once-per-group variant (every lane owning at most one chunk): same additions in
    // the same order, so bitwise the same output.
    if (k.chunks <= k.G) {
      std::vector<V> out_b(out.size(), V(-9.0f));
      cuda_emu::launch(dim3(unsigned((threads + block - 1) / block)), dim3(block), [&] {
        msda_forward_bcast_kernel<V, C, VEC>(value.data(), shapes.data(), starts.data(), loc.data(), attn.data(),
                                             out_b.data(), k);
      });
      bool same = true;
      for (size_t j = 0; j < out_b.size(); ++j) same = same && std::memcmp(&out_b[j], &out_k[j], sizeof(V)) == 0;
      if (!same) {
        std::printf("%s forward, located once per group: not bitwise equal to msda_forward_kernel\n", tag);
        ++failures;
      }
    }
  }
  // --- atomic backward: grad_value scatter + grad_loc / grad_attn ---------------------------------------
  {
    const KDims k = dims_for(pr, S, samples, VEC, head_major);
    std::vector<A> gv_k(value.size(), A(0));
    std::vector<C> gl_k(loc.size(), C(-9)), ga_k(attn.size(), C(-9));
    const int64_t threads = samples * k.G;
    cuda_emu::launch(dim3(unsigned((threads + block - 1) / block)), dim3(block), [&] {
      msda_backward_kernel<V, C, VEC, true>(go.data(), value.data(), shapes.data(), starts.data(), loc.data(),
                                            attn.data(), gv_k.data(), gl_k.data(), ga_k.data(), k);
    });
    expect_close("backward grad_value", gv_k, gval, tol, tag);
    expect_close("backward grad_loc", gl_k, gloc, tol, tag);
    expect_close("backward grad_attn", ga_k, gattn, tol, tag);
  }
  // --- deterministic backward: no scatter, then keys + stable sort + gather ------------------------------
  {
    const KDims k = dims_for(pr, S, samples, VEC, head_major);
    std::vector<C> gl_k(loc.size(), C(-9)), ga_k(attn.size(), C(-9));
    const int64_t threads = samples * k.G;
    cuda_emu::launch(dim3(unsigned((threads + block - 1) / block)), dim3(block), [&] {
      msda_backward_kernel<V, C, VEC, false>(go.data(), value.data(), shapes.data(), starts.data(), loc.data(),
                                             attn.data(), static_cast<A*>(nullptr), gl_k.data(), ga_k.data(), k);
    });
    expect_close("deterministic grad_loc", gl_k, gloc, tol, tag);
    expect_close("deterministic grad_attn", ga_k, gattn, tol, tag);
    const int64_t points = samples * L * P, E = 4 * points;
    std::vector<int64_t> keys(E);
    std::vector<A> wbuf(E);
    cuda_emu::launch(dim3(unsigned((points + 255) / 256)), dim3(256), [&] {
      msda_det_keys_kernel<C, A>(shapes.data(), starts.data(), loc.data(), attn.data(), keys.data(), wbuf.data(), k);
    });
    std::vector<int64_t> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
    std::vector<int64_t> skeys(E);
    for (int64_t j = 0; j < E; ++j) skeys[j] = keys[perm[j]];
    const KDims kg = dims_for(pr, S, E, VEC, 0);
    std::vector<V> gv_k(value.size(), V(0.0f));
    cuda_emu::launch(dim3(unsigned((E * kg.G + 255) / 256)), dim3(256), [&] {
      msda_det_gather_kernel<V, A, VEC>(skeys.data(), perm.data(), wbuf.data(), go.data(), gv_k.data(), kg);
    });
    expect_close("deterministic grad_value", gv_k, gval, tol_v, tag);
  }
}

template <typename V, typename C, int VEC>
static void both_orders(const Problem& pr, unsigned block) {
  run_case<V, C, VEC>(pr, 0, block);
  run_case<V, C, VEC>(pr, 1, block);
}

int main() {
  // Two levels, odd sizes; D = 12 (3 chunks of 4: 4-lane groups with a lane idle), 8 and 6 (the
  // fp64 fast path's VEC = 2), 5 and 1 (the any-D path, VEC = 1, 5- and 1-lane groups).
  const Problem small{2, 7, 3, 12, 2, {{5, 4}, {2, 3}}};
  both_orders<float, float, 4>(small, 256);
  both_orders<float, float, 1>(small, 64);
  both_orders<double, double, 2>(small, 64);
  both_orders<double, double, 1>(Problem{1, 5, 2, 5, 3, {{3, 3}, {1, 2}, {4, 1}}}, 256);
  both_orders<float, float, 1>(Problem{2, 4, 2, 1, 2, {{3, 5}}}, 64);
  // 32-lane groups: D = 128 fp32 at VEC 4 (32 chunks), and D = 72 at VEC 1 (72 chunks, lanes loop).
  both_orders<float, float, 4>(Problem{1, 3, 2, 128, 2, {{4, 4}, {2, 2}}}, 256);
  run_case<float, float, 1>(Problem{1, 3, 1, 72, 1, {{3, 2}}}, 0, 64);
  // bf16 values with fp32 locations: the GPU's main path, 16-byte loads of 8 channels (D = 64: 8-lane
  // groups) and 8-byte loads of 4 (16-lane groups), with fp32 grad_value accumulation.
  const Problem bf{2, 5, 2, 64, 2, {{4, 3}, {2, 2}}};
  both_orders<bf16, float, 8>(bf, 256);
  both_orders<bf16, float, 4>(bf, 64);
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("ms_deform_attn kernels: all checks passed\n");
  return 0;
}
