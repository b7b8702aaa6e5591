// CPU kernels of the channel-attention adapter y = x + PW1x1(SE(GELU(DW3x3(LN(x))))), channels-last.
//
// A composition of ATen's vectorised, multi-threaded CPU kernels chosen to do fewer passes than the
// eager composition, in the op-math type (float for float32/float16/bfloat16, double for float64;
// a low-precision x is widened once and the result rounded once):
//   forward : native_layer_norm (stats kept for the backward); the depthwise 3x3 as a grouped conv on
//             the channels-last memory (no permute copies), kept for the backward; GELU; channel means; the SE MLP on
//             [B, C]; the 1x1 conv as one batched GEMM with the SE gate and the drop-path factor folded
//             into the weight per image and the residual x as the GEMM's addend (at::baddbmm): no
//             gated copy of the activations, no separate residual pass.
//   backward: recomputes the LN from x and its saved statistics, and GELU from the saved DW output
//             (pre, in x's dtype); grad_pw as one GEMM per image scaled by the gate; grad at the gated activations
//             as one GEMM; the SE backward on [B, C]; the GELU backward with the gate and the pooled-mean
//             gradient fused into its input; convolution_backward for the depthwise conv;
//             native_layer_norm_backward; the residual gradient added in place (residual=False: the
//             branch alone, no addend and no residual gradient).
// An earlier version used hand-written fused loops (git history); without AVX code generation in the
// extension build (scalar erf) they ran about 4x slower than ATen's vectorised kernels.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "channel_attention/checks.h"

namespace dbsam {
namespace ca {
namespace {

at::Tensor nchw(const at::Tensor& t) { return t.permute({0, 3, 1, 2}); }  // [B,H,W,C] -> channels_last NCHW view
at::Tensor nhwc(const at::Tensor& t) { return t.permute({0, 2, 3, 1}); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& dw_weight, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const at::Tensor& pw_weight, const c10::optional<at::Tensor>& branch_scale, double eps, bool residual) {
  const NoAutocast no_autocast;
  const Dims d = check_args(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  check_scale(d, x, branch_scale);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto xa = x.to(acc).contiguous();
  const Weights w = widen(d, acc, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  const int64_t HW = d.H * d.W;
  at::Tensor n, mean, rstd;
  std::tie(n, mean, rstd) = at::native_layer_norm(xa, {d.C}, w.g, w.b, eps);
  auto pre = nhwc(at::conv2d(nchw(n), dw_weight.to(acc), {}, 1, 1, 1, d.C)).contiguous();
  n.reset();
  auto u3 = at::gelu(pre).view({d.B, HW, d.C});
  auto pre_saved = pre.to(x.scalar_type());  // pre itself for float32/float64
  auto pooled = u3.mean(1);  // [B, C]
  auto s = at::sigmoid(at::mm(at::gelu(at::mm(pooled, w.w1.t())), w.w2.t()));  // [B, C]
  if (branch_scale.has_value()) s = s * branch_scale->unsqueeze(1);
  // Fold the gate (and drop-path) into the 1x1 weight per image: y_b = x_b + u_b @ (Wp * s_b)^T.
  auto wf = (w.wp.unsqueeze(0) * s.unsqueeze(1)).transpose(1, 2);  // [B, Cin, Cout]
  auto y = (residual ? at::baddbmm(xa.view({d.B, HW, d.C}), u3, wf) : at::bmm(u3, wf)).view(x.sizes());
  return {y.to(x.scalar_type()), mean.view({d.B, d.H, d.W}), rstd.view({d.B, d.H, d.W}), pooled, pre_saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ln_weight,
             const at::Tensor& ln_bias, const at::Tensor& dw_weight, const at::Tensor& fc1_weight,
             const at::Tensor& fc2_weight, const at::Tensor& pw_weight,
             const c10::optional<at::Tensor>& branch_scale, const at::Tensor& mean,
             const at::Tensor& rstd, const at::Tensor& pooled, const at::Tensor& pre, double eps,
             bool residual) {
  const NoAutocast no_autocast;
  const Dims d = check_args(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  check_scale(d, x, branch_scale);
  check_saved(d, grad_y, x, mean, rstd, pooled, pre);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto xa = x.to(acc).contiguous();
  auto gya = grad_y.to(acc).contiguous();
  const Weights w = widen(d, acc, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  const int64_t HW = d.H * d.W;
  auto dw4 = dw_weight.to(acc);
  // Recompute the LN output (its statistics equal the saved ones: same kernel, same input); the DW
  // output is saved.
  auto n = std::get<0>(at::native_layer_norm(xa, {d.C}, w.g, w.b, eps));
  auto pre_a = pre.to(acc).contiguous();
  auto u = at::gelu(pre_a);
  auto mean4 = mean.reshape({d.B, d.H, d.W, 1});
  auto rstd4 = rstd.reshape({d.B, d.H, d.W, 1});
  // SE, recomputed from the saved pooled means.
  auto a = at::mm(pooled, w.w1.t());  // [B, R]
  auto h = at::gelu(a);
  auto s = at::sigmoid(at::mm(h, w.w2.t()));  // [B, C]
  // With drop-path the effective gate is s * scale: grad_s picks up the scale once.
  auto s_eff = branch_scale.has_value() ? s * branch_scale->unsqueeze(1) : s;
  auto gy3 = gya.view({d.B, HW, d.C});
  auto u3 = u.view({d.B, HW, d.C});
  // grad_pw[o, c] = sum_b s[b, c] * (gy_b^T u_b)[o, c]
  auto gpw = at::bmm(gy3.transpose(1, 2), u3).mul_(s_eff.unsqueeze(1)).sum(0);
  auto gv = at::matmul(gy3, w.wp);  // [B, HW, Cin]: grad at the gated activations
  // In place from here on (u and gv are this function's own maps): two fresh full-size buffers and
  // a pass fewer. A fresh multi-MB buffer can cost its page faults (~1.5 us per 4 KB page on the
  // development host); whether it does depends on the allocator's state, so the saving is real in
  // memory but shows in wall time only sometimes (NOTES.md section 12).
  auto gs = u3.mul_(gv).sum(1);  // [B, C]; u is not read again
  if (branch_scale.has_value()) gs.mul_(branch_scale->unsqueeze(1));
  auto gz = gs * s * (1 - s);
  auto gw2 = at::mm(gz.t(), h);
  auto ga = at::gelu_backward(at::mm(gz, w.w2), a);
  auto gw1 = at::mm(ga.t(), pooled);
  auto gp = at::mm(ga, w.w1);  // [B, C]: grad at the pooled means
  // grad at the DW output: (gv * s + gp / HW) * gelu'(pre)
  gv.mul_(s_eff.unsqueeze(1)).add_(gp.unsqueeze(1), 1.0 / static_cast<double>(HW));
  u.reset();
  u3.reset();
  auto gd = gv.view({d.B, d.H, d.W, d.C});
  at::gelu_backward_out(gd, gd, pre_a);
  at::Tensor gn4, gdw, unused;
  std::tie(gn4, gdw, unused) = at::convolution_backward(
      nchw(gd), nchw(n), dw4, c10::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, d.C,
      {true, true, false});
  auto gn = nhwc(gn4).contiguous();
  at::Tensor gx, gg, gb;
  std::tie(gx, gg, gb) = at::native_layer_norm_backward(gn, xa, {d.C}, mean4, rstd4, w.g, w.b,
                                                        {true, true, true});
  if (residual) gx.add_(gya);
  return {gx.to(x.scalar_type()),
          gg.to(ln_weight.scalar_type()),
          gb.to(ln_bias.scalar_type()),
          gdw.contiguous().to(dw_weight.scalar_type()),
          gw1.reshape({d.R, d.C, 1, 1}).to(fc1_weight.scalar_type()),
          gw2.reshape({d.C, d.R, 1, 1}).to(fc2_weight.scalar_type()),
          gpw.reshape({d.C, d.C, 1, 1}).to(pw_weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dbsam, CPU, m) {
  m.impl("channel_attention_forward", &forward_cpu);
  m.impl("channel_attention_backward", &backward_cpu);
}

}  // namespace ca
}  // namespace dbsam
