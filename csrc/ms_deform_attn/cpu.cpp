// CPU kernels of multi-scale deformable attention.
//
// Forward: one task per (n, q, m); the D channels of a value row are contiguous, so the inner loop
// is a unit-stride axpy the compiler vectorises. Backward: one task per (n, m) so that each task
// owns grad_value[n, :, m, :] alone (accumulated in a contiguous buffer of its own, stored once): no
// atomics, no races, and the same result on every run. When N*M tasks would leave threads idle (one
// image, 8 heads, a 32-core CPU), each (n, m) also splits its queries, each range storing its own
// partial copy of grad_value, and the copies are summed. Each kernel's per-range function exists as
// a baseline and an AVX2 + FMA copy, picked at run time (common/cpu_simd.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_simd.h"
#include "ms_deform_attn/checks.h"
#include "ms_deform_attn/sampling.h"

namespace dbsam {
namespace msda {
namespace {

// One sample point: acc += sum over its four corners of w[c] * v[c][k], the four corners in one pass
// (one load and store of acc per channel instead of four). A corner outside the map reads `zeros`
// with weight 0, never a neighbouring row: 0 times a non-finite value would be NaN.
template <typename scalar_t, typename acc_t>
DBSAM_ALWAYS_INLINE void point_axpy(acc_t* DBSAM_RESTRICT acc, const scalar_t* DBSAM_RESTRICT v0,
                                    const scalar_t* DBSAM_RESTRICT v1, const scalar_t* DBSAM_RESTRICT v2,
                                    const scalar_t* DBSAM_RESTRICT v3, const acc_t (&w)[4], int64_t D) {
  for (int64_t k = 0; k < D; ++k) {
    acc[k] += (w[0] * static_cast<acc_t>(v0[k]) + w[1] * static_cast<acc_t>(v1[k])) +
              (w[2] * static_cast<acc_t>(v2[k]) + w[3] * static_cast<acc_t>(v3[k]));
  }
}

// The op's inputs, as both kernels read them (contiguous).
template <typename scalar_t, typename coord_t>
struct Inputs {
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const coord_t* loc;
  const coord_t* attn;
  Dims d;
};

template <typename scalar_t, typename coord_t>
struct ForwardArgs : Inputs<scalar_t, coord_t> {
  scalar_t* out;
};

// Tasks [begin, end) of the forward, one per (n, q, m).
template <typename scalar_t, typename coord_t>
DBSAM_ALWAYS_INLINE void forward_range(const ForwardArgs<scalar_t, coord_t>& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = args.d;
  std::vector<acc_t> acc(d.D);
  const std::vector<scalar_t> zeros(d.D, scalar_t(0));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t m = t % d.M;
    const int64_t n = t / (d.M * d.Lq);
    std::fill(acc.begin(), acc.end(), acc_t(0));
    const coord_t* tl = args.loc + t * d.L * d.P * 2;
    const coord_t* ta = args.attn + t * d.L * d.P;
    const scalar_t* vbase = args.value + n * d.S * d.M * d.D + m * d.D;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = args.shapes[2 * l], W = args.shapes[2 * l + 1];
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t i = l * d.P + p;
        Sample<acc_t> s;
        if (!locate<acc_t>(tl[2 * i], tl[2 * i + 1], H, W, args.starts[l], d.S, s)) continue;
        const acc_t a = ta[i];
        const scalar_t* v[4];
        acc_t w[4];
        for (int c = 0; c < 4; ++c) {
          const bool inside = s.row[c] >= 0;
          v[c] = inside ? vbase + s.row[c] * d.M * d.D : zeros.data();
          w[c] = inside ? a * s.weight[c] : acc_t(0);
        }
        point_axpy<scalar_t, acc_t>(acc.data(), v[0], v[1], v[2], v[3], w, d.D);
      }
    }
    scalar_t* o = args.out + t * d.D;
    for (int64_t k = 0; k < d.D; ++k) o[k] = static_cast<scalar_t>(acc[k]);
  }
}

template <typename scalar_t, typename coord_t>
void forward_range_baseline(const ForwardArgs<scalar_t, coord_t>& args, int64_t begin, int64_t end) {
  forward_range(args, begin, end);
}

template <typename scalar_t, typename coord_t>
DBSAM_TARGET_AVX2 void forward_range_avx2(const ForwardArgs<scalar_t, coord_t>& args, int64_t begin, int64_t end) {
  forward_range(args, begin, end);
}

template <typename scalar_t, typename coord_t>
void forward_kernel(const ForwardArgs<scalar_t, coord_t>& args) {
  const Dims& d = args.d;
  const int64_t tasks = d.N * d.Lq * d.M;
  // Grain chosen so that a task chunk does at least ~16k multiply-adds.
  const int64_t work = std::max<int64_t>(1, d.L * d.P * 4 * d.D);
  const bool avx2 = cpu_use_avx2();
  at::parallel_for(0, tasks, std::max<int64_t>(1, 16384 / work), [&](int64_t begin, int64_t end) {
    if (avx2) {
      forward_range_avx2(args, begin, end);
    } else {
      forward_range_baseline(args, begin, end);
    }
  });
}

// One corner of the backward: returns <g, v> and adds w * g into gv, over D channels. The dot keeps
// kLanes partial sums (lane j takes channels j, j + kLanes, ...), added in a fixed order at the end:
// one running sum is a chain of dependent additions that IEEE rules forbid the compiler to reorder,
// so it neither vectorises nor overlaps (benchmarks/NOTES.md section 11 has the CPU backward's
// figures before and after). Restrict: g, v and gv never overlap
// (g is the task's own buffer, gv the accumulator, v the input), which lets the axpy vectorise
// without runtime overlap checks.
template <typename scalar_t, typename acc_t>
DBSAM_ALWAYS_INLINE acc_t corner_dot_axpy(const acc_t* DBSAM_RESTRICT g, const scalar_t* DBSAM_RESTRICT v,
                                          acc_t* DBSAM_RESTRICT gv, acc_t w, int64_t D) {
  constexpr int kLanes = 8;  // the final sum below adds exactly eight
  acc_t part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= D; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      part[j] += g[k + j] * static_cast<acc_t>(v[k + j]);
      gv[k + j] += w * g[k + j];
    }
  }
  for (int j = 0; k + j < D; ++j) {
    part[j] += g[k + j] * static_cast<acc_t>(v[k + j]);
    gv[k + j] += w * g[k + j];
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <typename scalar_t, typename coord_t, typename out_t>
struct BackwardArgs : Inputs<scalar_t, coord_t> {
  const scalar_t* grad_out;
  out_t* out;
  int64_t splits;
  coord_t* grad_loc;
  coord_t* grad_attn;
};

// Each (n, m) task (or query range `part` of it, with splits > 1) accumulates its grad_value slice in
// a contiguous acc_t buffer [S, D] of its own (one per thread, reused), then stores it once into
// out[part, n, :, m, :] in out_t: value's dtype when splits == 1 (no zero-filled full-size buffer, no
// separate rounding pass), acc_t partial sums otherwise (the caller adds the `splits` copies). The
// query cut depends only on Lq and splits, so a given thread count always gives the same result.
// Before 2026-11-27 the tasks added into one zero-filled acc_t tensor laid out like value: at the
// ViT-Adapter injector shape (N = 1) that fill alone took ~24 ms of one thread (a fresh 66 MB
// buffer, page faults), and bf16 paid another full pass to round it (NOTES.md section 11).
template <typename scalar_t, typename coord_t, typename out_t>
DBSAM_ALWAYS_INLINE void backward_range(const BackwardArgs<scalar_t, coord_t, out_t>& args, int64_t begin,
                                        int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = args.d;
  std::vector<acc_t> g(d.D);
  std::vector<acc_t> slice(d.S * d.D);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t nm = task / args.splits, part = task % args.splits;
    const int64_t n = nm / d.M, m = nm % d.M;
    const scalar_t* vbase = args.value + n * d.S * d.M * d.D + m * d.D;
    std::fill(slice.begin(), slice.end(), acc_t(0));
    const int64_t q_begin = d.Lq * part / args.splits, q_end = d.Lq * (part + 1) / args.splits;
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t t = (n * d.Lq + q) * d.M + m;  // index of (n, q, m)
      const scalar_t* go = args.grad_out + t * d.D;
      for (int64_t k = 0; k < d.D; ++k) g[k] = static_cast<acc_t>(go[k]);
      const coord_t* tl = args.loc + t * d.L * d.P * 2;
      const coord_t* ta = args.attn + t * d.L * d.P;
      coord_t* gl = args.grad_loc + t * d.L * d.P * 2;
      coord_t* ga = args.grad_attn + t * d.L * d.P;
      for (int64_t l = 0; l < d.L; ++l) {
        const int64_t H = args.shapes[2 * l], W = args.shapes[2 * l + 1];
        for (int64_t p = 0; p < d.P; ++p) {
          const int64_t i = l * d.P + p;
          Sample<acc_t> s;
          if (!locate<acc_t>(tl[2 * i], tl[2 * i + 1], H, W, args.starts[l], d.S, s)) {
            gl[2 * i] = gl[2 * i + 1] = ga[i] = coord_t(0);
            continue;
          }
          const acc_t a = ta[i];
          // The sampled value is linear in the corner values, so <g, corner value> per corner
          // is all the location and weight gradients need.
          acc_t dot[4] = {0, 0, 0, 0};
          for (int c = 0; c < 4; ++c) {
            if (s.row[c] < 0) continue;
            dot[c] = corner_dot_axpy<scalar_t, acc_t>(g.data(), vbase + s.row[c] * d.M * d.D,
                                                      slice.data() + s.row[c] * d.D, a * s.weight[c], d.D);
          }
          acc_t d_dx, d_dy;
          value_grad_xy<acc_t>(s, dot[0], dot[1], dot[2], dot[3], d_dx, d_dy);
          ga[i] = static_cast<coord_t>(interpolate<acc_t>(s, dot));
          gl[2 * i] = static_cast<coord_t>(a * d_dx * static_cast<acc_t>(W));
          gl[2 * i + 1] = static_cast<coord_t>(a * d_dy * static_cast<acc_t>(H));
        }
      }
    }
    out_t* dst = args.out + (part * d.N + n) * d.S * d.M * d.D + m * d.D;
    for (int64_t r = 0; r < d.S; ++r) {
      const acc_t* src = slice.data() + r * d.D;
      out_t* row = dst + r * d.M * d.D;
      for (int64_t k = 0; k < d.D; ++k) row[k] = static_cast<out_t>(src[k]);
    }
  }
}

template <typename scalar_t, typename coord_t, typename out_t>
void backward_range_baseline(const BackwardArgs<scalar_t, coord_t, out_t>& args, int64_t begin, int64_t end) {
  backward_range(args, begin, end);
}

template <typename scalar_t, typename coord_t, typename out_t>
DBSAM_TARGET_AVX2 void backward_range_avx2(const BackwardArgs<scalar_t, coord_t, out_t>& args, int64_t begin,
                                           int64_t end) {
  backward_range(args, begin, end);
}

template <typename scalar_t, typename coord_t, typename out_t>
void backward_kernel(const BackwardArgs<scalar_t, coord_t, out_t>& args) {
  const Dims& d = args.d;
  const bool avx2 = cpu_use_avx2();
  at::parallel_for(0, d.N * d.M * args.splits, 1, [&](int64_t begin, int64_t end) {
    if (avx2) {
      backward_range_avx2(args, begin, end);
    } else {
      backward_range_baseline(args, begin, end);
    }
  });
}

// How many query ranges each (n, m) task of the backward is cut into: enough to give every thread
// work, at most one per query, and at most 256 MB of extra grad_value copies.
int64_t query_splits(const Dims& d, int64_t grad_value_bytes) {
  const int64_t threads = at::get_num_threads();
  const int64_t heads = std::max<int64_t>(1, d.N * d.M);
  if (heads >= threads) return 1;
  const int64_t by_threads = (threads + heads - 1) / heads;
  const int64_t by_memory = 1 + (int64_t{256} << 20) / std::max<int64_t>(1, grad_value_bytes);
  return std::max<int64_t>(1, std::min({by_threads, d.Lq, by_memory}));
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights);
  check_levels_on_host(spatial_shapes, level_start_index, d.S);
  auto v = value.contiguous();
  auto shapes = spatial_shapes.contiguous();
  auto starts = level_start_index.contiguous();
  auto loc = sampling_locations.contiguous();
  auto attn = attention_weights.contiguous();
  auto out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  dispatch_dtypes(v.scalar_type(), loc.scalar_type(), "ms_deform_attn_forward",
                  [&](auto vtag, auto ctag) {
                    using scalar_t = typename decltype(vtag)::type;
                    using coord_t = typename decltype(ctag)::type;
                    forward_kernel(ForwardArgs<scalar_t, coord_t>{
                        {v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                         loc.data_ptr<coord_t>(), attn.data_ptr<coord_t>(), d},
                        out.data_ptr<scalar_t>()});
                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Dims d = check_args(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights);
  check_levels_on_host(spatial_shapes, level_start_index, d.S);
  check_grad_output(d, grad_output, value);
  auto go = grad_output.contiguous();
  auto v = value.contiguous();
  auto shapes = spatial_shapes.contiguous();
  auto starts = level_start_index.contiguous();
  auto loc = sampling_locations.contiguous();
  auto attn = attention_weights.contiguous();
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  if (go.numel() == 0 || v.numel() == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {at::zeros(v.sizes(), v.options()), grad_loc, grad_attn};
  }
  // Half/bfloat16 grad_value accumulates in float32 and is rounded once, when a task stores it.
  const auto acc_type = at::toOpMathType(v.scalar_type());
  const int64_t splits = query_splits(d, v.numel() * at::elementSize(acc_type));
  at::Tensor grad_value;
  dispatch_dtypes(v.scalar_type(), loc.scalar_type(), "ms_deform_attn_backward", [&](auto vtag, auto ctag) {
    using scalar_t = typename decltype(vtag)::type;
    using coord_t = typename decltype(ctag)::type;
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto* out) {
      using out_t = std::remove_pointer_t<decltype(out)>;
      backward_kernel(BackwardArgs<scalar_t, coord_t, out_t>{
          {v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<coord_t>(),
           attn.data_ptr<coord_t>(), d},
          go.data_ptr<scalar_t>(), out, splits, grad_loc.data_ptr<coord_t>(), grad_attn.data_ptr<coord_t>()});
    };
    if (splits == 1) {
      grad_value = at::empty(v.sizes(), v.options());  // every element stored once by its task
      run(grad_value.data_ptr<scalar_t>());
    } else {
      auto partial = at::empty({splits, d.N, d.S, d.M, d.D}, v.options().dtype(acc_type));
      run(partial.data_ptr<acc_t>());
      grad_value = partial.sum(0).to(v.scalar_type());
    }
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(dbsam, CPU, m) {
  m.impl("ms_deform_attn_forward", &forward_cpu);
  m.impl("ms_deform_attn_backward", &backward_cpu);
}

}  // namespace msda
}  // namespace dbsam
