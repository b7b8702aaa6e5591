// Host-side argument checks and dtype dispatch shared by the CPU and CUDA entry points. The Python
// wrapper validates first and with friendlier messages; these checks keep a direct call through
// torch.ops.dbsam safe too. DBSAM_CHECK_VALUE/TYPE (common/check.h) surface as ValueError/TypeError in Python.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "common/check.h"

namespace dbsam {
namespace msda {

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

inline Dims check_args(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  DBSAM_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got ",
                    value.sizes());
  DBSAM_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "ms_deform_attn: spatial_shapes must be [L, 2], got ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  DBSAM_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == L,
                    "ms_deform_attn: level_start_index must be [L] = [", L, "], got ",
                    level_start_index.sizes());
  DBSAM_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                    "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got ",
                    sampling_locations.sizes());
  Dims d{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
         L, sampling_locations.size(4)};
  DBSAM_CHECK_VALUE(sampling_locations.size(0) == d.N && sampling_locations.size(2) == d.M &&
                        sampling_locations.size(3) == L,
                    "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2] = [", d.N,
                    ", Lq, ", d.M, ", ", L, ", P, 2], got ", sampling_locations.sizes());
  DBSAM_CHECK_VALUE(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "ms_deform_attn: attention_weights must be [N, Lq, M, L, P] = ",
                    sampling_locations.sizes().slice(0, 5), ", got ", attention_weights.sizes());
  DBSAM_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong &&
                       level_start_index.scalar_type() == at::kLong,
                   "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const auto vt = value.scalar_type();
  DBSAM_CHECK_TYPE(vt == at::kFloat || vt == at::kDouble || vt == at::kHalf || vt == at::kBFloat16,
                   "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got ", vt);
  const auto ct = sampling_locations.scalar_type();
  DBSAM_CHECK_TYPE(attention_weights.scalar_type() == ct,
                   "ms_deform_attn: sampling_locations and attention_weights must share a dtype, got ",
                   ct, " and ", attention_weights.scalar_type());
  const bool low = vt == at::kHalf || vt == at::kBFloat16;
  DBSAM_CHECK_TYPE(ct == vt || (low && ct == at::kFloat),
                   "ms_deform_attn: sampling_locations/attention_weights must have value's dtype (",
                   vt, ")", low ? " or float32" : "", ", got ", ct);
  const auto dev = value.device();
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations,
                              &attention_weights}) {
    DBSAM_CHECK_VALUE(t->device() == dev, "ms_deform_attn: all tensors must be on ", dev,
                      ", got one on ", t->device());
  }
  return d;
}

// The backward's extra input, against the dims check_args returned (both backends).
inline void check_grad_output(const Dims& d, const at::Tensor& grad_output, const at::Tensor& value) {
  DBSAM_CHECK_VALUE(grad_output.numel() == d.N * d.Lq * d.M * d.D && grad_output.dim() >= 2 &&
                        grad_output.size(0) == d.N && grad_output.size(1) == d.Lq,
                    "ms_deform_attn_backward: grad_output must be [N, Lq, M*D] = [", d.N, ", ",
                    d.Lq, ", ", d.M * d.D, "], got ", grad_output.sizes());
  DBSAM_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type(),
                   "ms_deform_attn_backward: grad_output must have value's dtype");
  DBSAM_CHECK_VALUE(grad_output.device() == value.device(),
                    "ms_deform_attn_backward: grad_output must be on ", value.device());
}

// Value checks need the shapes on the host; they run wherever that is free (CPU tensors).
inline void check_levels_on_host(const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, int64_t S) {
  auto shapes = spatial_shapes.contiguous();
  auto starts = level_start_index.contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t acc = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    DBSAM_CHECK_VALUE(sh[2 * l] >= 0 && sh[2 * l + 1] >= 0,
                      "ms_deform_attn: spatial_shapes must be non-negative");
    DBSAM_CHECK_VALUE(st[l] == acc, "ms_deform_attn: level_start_index[", l, "] must be ", acc,
                      " (exclusive prefix sum of H*W), got ", st[l]);
    acc += sh[2 * l] * sh[2 * l + 1];
  }
  DBSAM_CHECK_VALUE(acc == S, "ms_deform_attn: spatial_shapes cover ", acc,
                    " rows but value has S = ", S);
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<scalar_t>, Tag<coord_t>) for the supported (value, location/weight) dtype pairs.
template <typename F>
void dispatch_dtypes(at::ScalarType vt, at::ScalarType ct, const char* name, F&& f) {
  switch (vt) {
    case at::kDouble:
      return f(Tag<double>{}, Tag<double>{});
    case at::kFloat:
      return f(Tag<float>{}, Tag<float>{});
    case at::kHalf:
      if (ct == at::kFloat) return f(Tag<at::Half>{}, Tag<float>{});
      return f(Tag<at::Half>{}, Tag<at::Half>{});
    case at::kBFloat16:
      if (ct == at::kFloat) return f(Tag<at::BFloat16>{}, Tag<float>{});
      return f(Tag<at::BFloat16>{}, Tag<at::BFloat16>{});
    default:
      DBSAM_CHECK_TYPE(false, name, ": unsupported dtype ", vt);
  }
}

}  // namespace msda
}  // namespace dbsam
