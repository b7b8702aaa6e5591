// Every schema of the dbsam namespace, declared once. Kernels register per dispatch key next to
// their sources (ms_deform_attn/cpu.cpp, ms_deform_attn/cuda.cu, ...), the autograd of each forward
// op too (*/autograd.cpp, C++ for the host time it saves); fake kernels are registered from Python
// (dbsam/ops/*/op.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/cpu_simd.h"

namespace dbsam {

// What this binary was built with, so `python -m dbsam.ops` can say why a backend is missing.
static std::string build_info() {
  std::string info = "cpu";
#ifdef DBSAM_WITH_CUDA
  info += ",cuda";
#endif
#ifdef DBSAM_CUDA_ARCHS
  info += ";archs=" DBSAM_CUDA_ARCHS;
#endif
  // What the MSDA CPU kernels run on this machine (common/cpu_simd.h; DBSAM_CPU_SIMD=baseline
  // overrides it per call).
  info += dbsam::cpu_avx2_available() ? ";cpu_simd=avx2" : ";cpu_simd=baseline";
  return info;
}

TORCH_LIBRARY(dbsam, m) {
  m.def("build_info() -> str", &build_info);

  // Multi-scale deformable attention. value [N, S, M, D]; spatial_shapes [L, 2] int64 (H, W);
  // level_start_index [L] int64; sampling_locations [N, Lq, M, L, P, 2] (x, y) normalised;
  // attention_weights [N, Lq, M, L, P]. Returns [N, Lq, M*D] in value's dtype. Locations and
  // weights share one dtype: value's, or float32 when value is float16/bfloat16.
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // Returns (grad_value, grad_sampling_locations, grad_attention_weights). Deterministic when
  // torch.are_deterministic_algorithms_enabled().
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");

  // --- channel_attention schemas (owned by csrc/channel_attention/) ---
  // y = x + PW1x1(SE(GELU(DW3x3(LN(x))))) on channels-last x [B, H, W, C]. ln_weight/ln_bias [C];
  // dw_weight [C, 1, 3, 3]; fc1_weight [R, C, 1, 1]; fc2_weight [C, R, 1, 1]; pw_weight [C, C, 1, 1];
  // weights in x's dtype, or float32 when x is float16/bfloat16. branch_scale: optional [B] float32
  // (float64 for a float64 x) per-sample factor on the branch (drop-path: keep/(1-p)), folded into
  // the 1x1 weight with the SE gate, so it costs nothing; no gradient. Returns (y, mean, rstd, pooled,
  // pre): y in x's dtype; LN mean/rstd [B, H, W] and the SE input pooled [B, C] in float32 (float64
  // for a float64 x); pre [B, H, W, C], the DW output before its GELU, in x's dtype. mean, rstd,
  // pooled and pre are saved for the backward, which recomputes the LN from x but not the DW conv
  // (pre costs one [B,H,W,C] map in x's dtype, a quarter of what eager PyTorch saves).
  // residual=False returns the branch alone, y = PW1x1(SE(...)) (autocast runs the branch in low
  // precision on a float32 x and adds the residual in float32, as eager PyTorch does).
  m.def(
      "channel_attention_forward(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor dw_weight, "
      "Tensor fc1_weight, Tensor fc2_weight, Tensor pw_weight, Tensor? branch_scale, float eps, "
      "bool residual=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_ln_weight, grad_ln_bias, grad_dw, grad_fc1, grad_fc2, grad_pw), each in
  // its input's dtype; grad_x has grad_y added when residual.
  m.def(
      "channel_attention_backward(Tensor grad_y, Tensor x, Tensor ln_weight, Tensor ln_bias, "
      "Tensor dw_weight, Tensor fc1_weight, Tensor fc2_weight, Tensor pw_weight, "
      "Tensor? branch_scale, Tensor mean, Tensor rstd, Tensor pooled, Tensor pre, float eps, "
      "bool residual=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // --- end channel_attention ---
}

}  // namespace dbsam

// A plain Python module, so that `import dbsam._C` loads the library and runs the registrations
// above; every entry point is reached through torch.ops.dbsam.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
