// CPU kernels of multi-scale deformable attention.
//
// Forward: one task per (n, q, m); the D channels of a value row are contiguous, so the inner loop
// is a unit-stride axpy the compiler vectorises. Backward: one task per (n, m) so that each task
// owns grad_value[n, :, m, :] alone: no atomics, no races, and the same result on every run. When
// N*M tasks would leave threads idle (one image, 8 heads, a 32-core CPU), each (n, m) also splits
// its queries, the extra ranges accumulating into private copies of grad_value that are summed.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn/checks.h"
#include "ms_deform_attn/sampling.h"

namespace dbsam {
namespace msda {
namespace {

template <typename scalar_t, typename coord_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const coord_t* loc, const coord_t* attn, scalar_t* out, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tasks = d.N * d.Lq * d.M;
  // Grain chosen so that a task chunk does at least ~16k multiply-adds.
  const int64_t work = std::max<int64_t>(1, d.L * d.P * 4 * d.D);
  at::parallel_for(0, tasks, std::max<int64_t>(1, 16384 / work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d.D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m = t % d.M;
      const int64_t n = t / (d.M * d.Lq);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const coord_t* tl = loc + t * d.L * d.P * 2;
      const coord_t* ta = attn + t * d.L * d.P;
      const scalar_t* vbase = value + n * d.S * d.M * d.D + m * d.D;
      for (int64_t l = 0; l < d.L; ++l) {
        const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
        for (int64_t p = 0; p < d.P; ++p) {
          const int64_t i = l * d.P + p;
          Sample<acc_t> s;
          if (!locate<acc_t>(tl[2 * i], tl[2 * i + 1], H, W, starts[l], d.S, s)) continue;
          const acc_t a = ta[i];
          for (int c = 0; c < 4; ++c) {
            if (s.row[c] < 0) continue;
            const acc_t w = a * s.weight[c];
            const scalar_t* v = vbase + s.row[c] * d.M * d.D;
            for (int64_t k = 0; k < d.D; ++k) acc[k] += w * static_cast<acc_t>(v[k]);
          }
        }
      }
      scalar_t* o = out + t * d.D;
      for (int64_t k = 0; k < d.D; ++k) o[k] = static_cast<scalar_t>(acc[k]);
    }
  });
}

// grad_value is acc_t (float for half/bfloat16 values), laid out like value. With splits > 1 the
// queries of each (n, m) are cut into `splits` ranges; range 0 accumulates into grad_value, range
// r > 0 into its own copy partial[r - 1] (each laid out like value), summed by the caller. The cut
// depends only on Lq and splits, so a given thread count always gives the same result.
template <typename scalar_t, typename coord_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const coord_t* loc, const coord_t* attn,
                     at::opmath_type<scalar_t>* grad_value, at::opmath_type<scalar_t>* partial,
                     int64_t splits, coord_t* grad_loc, coord_t* grad_attn, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, d.N * d.M * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(d.D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nm = task / splits, part = task % splits;
      const int64_t n = nm / d.M, m = nm % d.M;
      const scalar_t* vbase = value + n * d.S * d.M * d.D + m * d.D;
      acc_t* target = part == 0 ? grad_value : partial + (part - 1) * d.N * d.S * d.M * d.D;
      acc_t* gvbase = target + n * d.S * d.M * d.D + m * d.D;
      const int64_t q_begin = d.Lq * part / splits, q_end = d.Lq * (part + 1) / splits;
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t t = (n * d.Lq + q) * d.M + m;  // index of (n, q, m)
        const scalar_t* go = grad_out + t * d.D;
        for (int64_t k = 0; k < d.D; ++k) g[k] = static_cast<acc_t>(go[k]);
        const coord_t* tl = loc + t * d.L * d.P * 2;
        const coord_t* ta = attn + t * d.L * d.P;
        coord_t* gl = grad_loc + t * d.L * d.P * 2;
        coord_t* ga = grad_attn + t * d.L * d.P;
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t i = l * d.P + p;
            Sample<acc_t> s;
            if (!locate<acc_t>(tl[2 * i], tl[2 * i + 1], H, W, starts[l], d.S, s)) {
              gl[2 * i] = gl[2 * i + 1] = ga[i] = coord_t(0);
              continue;
            }
            const acc_t a = ta[i];
            // The sampled value is linear in the corner values, so <g, corner value> per corner
            // is all the location and weight gradients need.
            acc_t dot[4] = {0, 0, 0, 0};
            for (int c = 0; c < 4; ++c) {
              if (s.row[c] < 0) continue;
              const scalar_t* v = vbase + s.row[c] * d.M * d.D;
              acc_t* gv = gvbase + s.row[c] * d.M * d.D;
              const acc_t w = a * s.weight[c];
              acc_t sum = 0;
              for (int64_t k = 0; k < d.D; ++k) {
                sum += g[k] * static_cast<acc_t>(v[k]);
                gv[k] += w * g[k];
              }
              dot[c] = sum;
            }
            acc_t d_dx, d_dy;
            value_grad_xy<acc_t>(s, dot[0], dot[1], dot[2], dot[3], d_dx, d_dy);
            ga[i] = static_cast<coord_t>(interpolate<acc_t>(s, dot));
            gl[2 * i] = static_cast<coord_t>(a * d_dx * static_cast<acc_t>(W));
            gl[2 * i + 1] = static_cast<coord_t>(a * d_dy * static_cast<acc_t>(H));
          }
        }
      }
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
                    forward_kernel<scalar_t, coord_t>(
                        v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                        starts.data_ptr<int64_t>(), loc.data_ptr<coord_t>(),
                        attn.data_ptr<coord_t>(), out.data_ptr<scalar_t>(), d);
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
  const bool low = v.scalar_type() == at::kHalf || v.scalar_type() == at::kBFloat16;
  // Half/bfloat16 grad_value accumulates in float32 and is rounded once at the end.
  auto grad_value_acc = at::zeros(v.sizes(), v.options().dtype(low ? at::kFloat : v.scalar_type()));
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  if (go.numel() > 0) {
    const int64_t splits = query_splits(d, grad_value_acc.numel() * grad_value_acc.element_size());
    auto partial = splits > 1 ? at::zeros({splits - 1, d.N, d.S, d.M, d.D}, grad_value_acc.options())
                              : at::Tensor();
    dispatch_dtypes(v.scalar_type(), loc.scalar_type(), "ms_deform_attn_backward",
                    [&](auto vtag, auto ctag) {
                      using scalar_t = typename decltype(vtag)::type;
                      using coord_t = typename decltype(ctag)::type;
                      using acc_t = at::opmath_type<scalar_t>;
                      backward_kernel<scalar_t, coord_t>(
                          go.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                          shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                          loc.data_ptr<coord_t>(), attn.data_ptr<coord_t>(),
                          grad_value_acc.data_ptr<acc_t>(),
                          splits > 1 ? partial.data_ptr<acc_t>() : nullptr, splits,
                          grad_loc.data_ptr<coord_t>(), grad_attn.data_ptr<coord_t>(), d);
                    });
    if (splits > 1) grad_value_acc.add_(partial.sum(0));
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  auto grad_value = low ? grad_value_acc.to(v.scalar_type()) : grad_value_acc;
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(dbsam, CPU, m) {
  m.impl("ms_deform_attn_forward", &forward_cpu);
  m.impl("ms_deform_attn_backward", &backward_cpu);
}

}  // namespace msda
}  // namespace dbsam
