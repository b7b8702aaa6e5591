// Autograd of the native ms_deform_attn_forward op (CPU and CUDA kernels alike), in C++.
//
// Why not torch.library.register_autograd, as the Triton backend's op does (dbsam/ops/ms_deform_attn/
// op.py): the Python formula was a third of the op's forward+backward host time at a small shape
// (the dev machine's CPU, 2026-12-03: 50 against 33 us; benchmarks/NOTES.md section 14), and the H100
// runs timed the op host-bound at N = 1.
// Here the backward runs on the autograd engine's thread without taking the GIL. The formula is the
// same call: the backward op on the saved inputs, a gradient only where an input needs one. Fake
// kernels stay in Python (register_fake); both ops are reached through the dispatcher, so
// torch.compile traces the forward and the backward op as before.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace dbsam {
namespace msda {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dbsam::ms_deform_attn_forward", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dbsam::ms_deform_attn_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const Tensor&)>();
  return op;
}

// The forward's inputs, in order; also their edge indices (all five are tensors, always present).
enum Input { kValue = 0, kShapes, kStarts, kLocations, kWeights, kInputs };

struct MSDeformAttnFunction : torch::autograd::Function<MSDeformAttnFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& value, const Tensor& spatial_shapes,
                        const Tensor& level_start_index, const Tensor& sampling_locations,
                        const Tensor& attention_weights) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({value, spatial_shapes, level_start_index, sampling_locations, attention_weights});
    return forward_op().call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto [grad_value, grad_locations, grad_weights] =
        backward_op().call(grads[0].contiguous(), s[kValue], s[kShapes], s[kStarts], s[kLocations], s[kWeights]);
    variable_list out(kInputs);
    if (ctx->needs_input_grad(kValue)) out[kValue] = grad_value;
    if (ctx->needs_input_grad(kLocations)) out[kLocations] = grad_locations;
    if (ctx->needs_input_grad(kWeights)) out[kWeights] = grad_weights;
    return out;
  }
};

Tensor forward_autograd(const Tensor& value, const Tensor& spatial_shapes, const Tensor& level_start_index,
                        const Tensor& sampling_locations, const Tensor& attention_weights) {
  // Inference (no grad mode, or no input needing a grad) skips the node and its saved tensors.
  const bool record = at::GradMode::is_enabled() && (value.requires_grad() || sampling_locations.requires_grad() ||
                                                     attention_weights.requires_grad());
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  }
  return MSDeformAttnFunction::apply(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(dbsam, Autograd, m) { m.impl("ms_deform_attn_forward", &forward_autograd); }

}  // namespace msda
}  // namespace dbsam
