// Autograd of the native channel_attention_forward op (CPU and CUDA kernels alike), in C++.
//
// Why not torch.library.register_autograd, as the Triton backend's ops do (dbsam/ops/channel_attention/
// op.py): the Python formula cost the host 60-130 us per forward+backward of the module on the dev
// machine's CPU (2026-12-03, 1x2x2x8, one thread: ~440-525 against ~380-390 us; the two ops'
// kernels ~207), on an op whose H100 figures are host-bound at B = 1 and half host at B = 8
// (benchmarks/NOTES.md sections 12 and 14). Here the backward runs on the autograd engine's thread
// without taking the GIL. The formula is the same call: the backward op on the saved tensors, a
// gradient only where an input needs one.
// Fake kernels stay in Python (register_fake), and both ops are reached through the dispatcher, so
// torch.compile traces the forward and the backward op as before (opcheck and the compile tests).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace dbsam {
namespace ca {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dbsam::channel_attention_forward", "")
          .typed<Outputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const c10::optional<Tensor>&, double, bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dbsam::channel_attention_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const Tensor&, const Tensor&, const c10::optional<Tensor>&, const Tensor&, const Tensor&,
              const Tensor&, const Tensor&, double, bool)>();
  return op;
}

// Saved: the seven differentiable inputs, branch_scale (undefined when absent), then the forward's
// state outputs mean, rstd, pooled and pre.
enum Saved { kX = 0, kScale = 7, kMean, kRstd, kPooled, kPre, kSaved };

struct ChannelAttentionFunction : torch::autograd::Function<ChannelAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& ln_weight,
                               const Tensor& ln_bias, const Tensor& dw_weight, const Tensor& fc1_weight,
                               const Tensor& fc2_weight, const Tensor& pw_weight,
                               const c10::optional<Tensor>& branch_scale, double eps, bool residual) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, rstd, pooled, pre] = forward_op().call(x, ln_weight, ln_bias, dw_weight, fc1_weight,
                                                          fc2_weight, pw_weight, branch_scale, eps, residual);
    ctx->save_for_backward({x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight,
                            branch_scale.value_or(Tensor()), mean, rstd, pooled, pre});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["residual"] = residual;
    ctx->mark_non_differentiable({mean, rstd, pooled, pre});
    // The four state outputs never receive a gradient; materialised, each would be a zero tensor made
    // before every backward (pre is [B, H, W, C]: H100 run 5 showed the 50 MB fill).
    ctx->set_materialize_grads(false);
    return {y, mean, rstd, pooled, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr int kArgs = 10;  // x, six weights, branch_scale, eps, residual
    const Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return variable_list(kArgs);  // only the state outputs were used
    const variable_list s = ctx->get_saved_variables();
    const c10::optional<Tensor> scale = s[kScale].defined() ? c10::optional<Tensor>(s[kScale]) : c10::nullopt;
    auto g = backward_op().call(grad_y.contiguous(), s[kX], s[1], s[2], s[3], s[4], s[5], s[6], scale, s[kMean],
                                s[kRstd], s[kPooled], s[kPre], ctx->saved_data["eps"].toDouble(),
                                ctx->saved_data["residual"].toBool());
    variable_list out{std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g),
                      std::get<5>(g), std::get<6>(g), Tensor(), Tensor(), Tensor()};
    // The seven tensors are the forward's first seven inputs and always present, so their edge
    // indices are their positions.
    for (int i = 0; i < 7; ++i) {
      if (!ctx->needs_input_grad(i)) out[i] = Tensor();
    }
    return out;
  }
};

Outputs forward_autograd(const Tensor& x, const Tensor& ln_weight, const Tensor& ln_bias, const Tensor& dw_weight,
                         const Tensor& fc1_weight, const Tensor& fc2_weight, const Tensor& pw_weight,
                         const c10::optional<Tensor>& branch_scale, double eps, bool residual) {
  // Inference (no grad mode, or no input needing a grad) skips the node and its saved tensors.
  const bool record = at::GradMode::is_enabled() &&
                      (x.requires_grad() || ln_weight.requires_grad() || ln_bias.requires_grad() ||
                       dw_weight.requires_grad() || fc1_weight.requires_grad() || fc2_weight.requires_grad() ||
                       pw_weight.requires_grad());
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight, branch_scale,
                             eps, residual);
  }
  auto r = ChannelAttentionFunction::apply(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight,
                                           branch_scale, eps, residual);
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dbsam, Autograd, m) { m.impl("channel_attention_forward", &forward_autograd); }

}  // namespace ca
}  // namespace dbsam
