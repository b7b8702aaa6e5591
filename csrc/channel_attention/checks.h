// Host-side argument checks of channel_attention shared by the CPU and CUDA entry points. The Python
// wrapper (dbsam/ops/channel_attention/op.py) validates first with friendlier messages; these keep a
// direct call through torch.ops.dbsam safe. DBSAM_CHECK_VALUE/TYPE (common/check.h) surface as ValueError/TypeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "common/check.h"

namespace dbsam {
namespace ca {

// The kernels compose ATen calls (GEMMs, reductions) that must run in the dtypes chosen here, not
// in autocast's: a custom op has no autocast kernel, so without this guard a bf16 autocast region
// around the op would silently recast its inner matmuls (and the saved float32 statistics).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

struct Dims {
  int64_t B, H, W, C, R;  // R = SE hidden width
};

inline bool is_low(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

inline Dims check_args(const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                       const at::Tensor& dw_weight, const at::Tensor& fc1_weight,
                       const at::Tensor& fc2_weight, const at::Tensor& pw_weight) {
  DBSAM_CHECK_VALUE(x.dim() == 4, "channel_attention: x must be [B, H, W, C], got ", x.sizes());
  Dims d{x.size(0), x.size(1), x.size(2), x.size(3), fc1_weight.dim() > 0 ? fc1_weight.size(0) : 0};
  DBSAM_CHECK_VALUE(d.H > 0 && d.W > 0 && d.C > 0, "channel_attention: H, W and C must be positive, got ",
                    x.sizes());
  DBSAM_CHECK_VALUE(ln_weight.dim() == 1 && ln_weight.size(0) == d.C,
                    "channel_attention: ln_weight must be [C] = [", d.C, "], got ", ln_weight.sizes());
  DBSAM_CHECK_VALUE(ln_bias.dim() == 1 && ln_bias.size(0) == d.C,
                    "channel_attention: ln_bias must be [C] = [", d.C, "], got ", ln_bias.sizes());
  DBSAM_CHECK_VALUE(dw_weight.sizes() == at::IntArrayRef({d.C, 1, 3, 3}),
                    "channel_attention: dw_weight must be [C, 1, 3, 3] with C = ", d.C, ", got ",
                    dw_weight.sizes());
  DBSAM_CHECK_VALUE(fc1_weight.dim() == 4 && d.R > 0 &&
                        fc1_weight.sizes() == at::IntArrayRef({d.R, d.C, 1, 1}),
                    "channel_attention: fc1_weight must be [C/r, C, 1, 1] with C = ", d.C, ", got ",
                    fc1_weight.sizes());
  DBSAM_CHECK_VALUE(fc2_weight.sizes() == at::IntArrayRef({d.C, d.R, 1, 1}),
                    "channel_attention: fc2_weight must be [C, C/r, 1, 1] = [", d.C, ", ", d.R,
                    ", 1, 1], got ", fc2_weight.sizes());
  DBSAM_CHECK_VALUE(pw_weight.sizes() == at::IntArrayRef({d.C, d.C, 1, 1}),
                    "channel_attention: pw_weight must be [C, C, 1, 1] with C = ", d.C, ", got ",
                    pw_weight.sizes());
  const auto xt = x.scalar_type();
  DBSAM_CHECK_TYPE(xt == at::kFloat || xt == at::kDouble || is_low(xt),
                   "channel_attention: x must be float32, float64, float16 or bfloat16, got ", xt);
  for (const at::Tensor* t : {&ln_weight, &ln_bias, &dw_weight, &fc1_weight, &fc2_weight, &pw_weight}) {
    const auto wt = t->scalar_type();
    DBSAM_CHECK_TYPE(wt == xt || (is_low(xt) && wt == at::kFloat),
                     "channel_attention: weights must have x's dtype (", xt, ")",
                     is_low(xt) ? " or float32" : "", ", got ", wt);
    DBSAM_CHECK_VALUE(t->device() == x.device(), "channel_attention: all tensors must be on ",
                      x.device(), ", got one on ", t->device());
  }
  return d;
}

inline void check_scale(const Dims& d, const at::Tensor& x, const c10::optional<at::Tensor>& scale) {
  if (!scale.has_value()) return;
  const auto st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  DBSAM_CHECK_VALUE(scale->dim() == 1 && scale->size(0) == d.B,
                    "channel_attention: branch_scale must be [B] = [", d.B, "], got ", scale->sizes());
  DBSAM_CHECK_TYPE(scale->scalar_type() == st, "channel_attention: branch_scale must be ", st, ", got ",
                   scale->scalar_type());
  DBSAM_CHECK_VALUE(scale->device() == x.device(), "channel_attention: branch_scale must be on ",
                    x.device(), ", got ", scale->device());
}

inline void check_saved(const Dims& d, const at::Tensor& grad_y, const at::Tensor& x,
                        const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& pooled,
                        const at::Tensor& pre) {
  DBSAM_CHECK_VALUE(pre.sizes() == x.sizes(), "channel_attention_backward: pre must be ", x.sizes(), ", got ",
                    pre.sizes());
  DBSAM_CHECK_TYPE(pre.scalar_type() == x.scalar_type(), "channel_attention_backward: pre must have x's dtype");
  DBSAM_CHECK_VALUE(grad_y.sizes() == x.sizes(), "channel_attention_backward: grad_y must be ",
                    x.sizes(), ", got ", grad_y.sizes());
  DBSAM_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(),
                   "channel_attention_backward: grad_y must have x's dtype");
  const auto st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  DBSAM_CHECK_VALUE(mean.sizes() == at::IntArrayRef({d.B, d.H, d.W}) && rstd.sizes() == mean.sizes(),
                    "channel_attention_backward: mean/rstd must be [B, H, W]");
  DBSAM_CHECK_VALUE(pooled.sizes() == at::IntArrayRef({d.B, d.C}),
                    "channel_attention_backward: pooled must be [B, C]");
  for (const at::Tensor* t : {&mean, &rstd, &pooled}) {
    DBSAM_CHECK_TYPE(t->scalar_type() == st, "channel_attention_backward: saved statistics must be ", st);
  }
  for (const at::Tensor* t : {&grad_y, &mean, &rstd, &pooled, &pre}) {
    DBSAM_CHECK_VALUE(t->device() == x.device(), "channel_attention_backward: all tensors must be on ",
                      x.device());
  }
}

// The small weights in the op-math dtype, in the layouts the kernels read.
struct Weights {
  at::Tensor g, b, wt, w1, w2, wp;  // op-math dtype; wt [9, C], w1 [R, C], w2 [C, R], wp [C, C]
};

inline Weights widen(const Dims& d, at::ScalarType acc, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
              const at::Tensor& dw_weight, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
              const at::Tensor& pw_weight) {
  return {ln_weight.to(acc).contiguous(),
          ln_bias.to(acc).contiguous(),
          dw_weight.reshape({d.C, 9}).t().to(acc).contiguous(),
          fc1_weight.reshape({d.R, d.C}).to(acc),
          fc2_weight.reshape({d.C, d.R}).to(acc),
          pw_weight.reshape({d.C, d.C}).to(acc)};
}

}  // namespace ca
}  // namespace dbsam
