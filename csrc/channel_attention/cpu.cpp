// CPU kernels of the channel-attention adapter y = x + PW1x1(SE(GELU(DW3x3(LN(x))))), channels-last.
//
// Everything runs in the op-math type (float for float32/float16/bfloat16, double for float64): a
// low-precision x is widened once and the result rounded once. Stages:
//   forward : (1) LN per pixel, (2) DW3x3 + GELU + per-row channel sums (one task per image row; the
//             C channels of a pixel are contiguous, so every inner loop is a unit-stride loop the
//             compiler vectorises), (3) the SE MLP on [B, C] (ATen, tiny), (4) the 1x1 conv as one
//             batched GEMM with the SE gate folded into the weight per image and the residual as the
//             GEMM's addend (at::baddbmm).
//   backward: recomputes LN and DW (nothing but x and the [B,H,W] / [B,C] statistics is saved), two
//             GEMMs for grad_pw and grad_v, the SE backward on [B, C], then one fused pass per row
//             that applies the GELU derivative, transposes the depthwise conv, accumulates grad_dw
//             and the LN affine grads in per-chunk partials (deterministic, no atomics) and finishes
//             the LN backward per pixel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "channel_attention/checks.h"
#include "channel_attention/math.h"

namespace dbsam {
namespace ca {
namespace {

// LN per pixel. With compute_stats, writes mean/rstd; otherwise reads them (backward recompute).
template <typename acc_t>
void layer_norm(const acc_t* x, const acc_t* g, const acc_t* b, acc_t* n, acc_t* mean, acc_t* rstd,
                int64_t P, int64_t C, double eps, bool compute_stats) {
  at::parallel_for(0, P, std::max<int64_t>(1, 4096 / C), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t* xp = x + p * C;
      acc_t mu, r;
      if (compute_stats) {
        acc_t s = 0;
        for (int64_t c = 0; c < C; ++c) s += xp[c];
        mu = s / acc_t(C);
        acc_t v = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t t = xp[c] - mu;
          v += t * t;
        }
        r = acc_t(1) / std::sqrt(v / acc_t(C) + acc_t(eps));
        mean[p] = mu;
        rstd[p] = r;
      } else {
        mu = mean[p];
        r = rstd[p];
      }
      acc_t* np = n + p * C;
      for (int64_t c = 0; c < C; ++c) np[c] = (xp[c] - mu) * r * g[c] + b[c];
    }
  });
}

// DW3x3 (padding 1) + GELU + per-row sums. wt is the depthwise weight as [9, C] (tap-major).
template <typename acc_t>
void dw_gelu_rowsum(const acc_t* n, const acc_t* wt, acc_t* d_out, acc_t* u_out, acc_t* rowsum,
                    const Dims& d) {
  const int64_t H = d.H, W = d.W, C = d.C;
  at::parallel_for(0, d.B * H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(C);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, i = r % H;
      acc_t* rs = rowsum + r * C;
      std::fill(rs, rs + C, acc_t(0));
      for (int64_t j = 0; j < W; ++j) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t ky = 0; ky < 3; ++ky) {
          const int64_t ii = i + ky - 1;
          if (ii < 0 || ii >= H) continue;
          for (int64_t kx = 0; kx < 3; ++kx) {
            const int64_t jj = j + kx - 1;
            if (jj < 0 || jj >= W) continue;
            const acc_t* np = n + ((b * H + ii) * W + jj) * C;
            const acc_t* wk = wt + (ky * 3 + kx) * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += np[c] * wk[c];
          }
        }
        const int64_t o = ((b * H + i) * W + j) * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = acc[c];
          const acc_t u = gelu(v);
          if (d_out) d_out[o + c] = v;
          u_out[o + c] = u;
          rs[c] += u;
        }
      }
    }
  });
}

// In place: gv <- (gv * s[b] + gp[b] / HW) * gelu'(dpre): the gradient at the DW output.
template <typename acc_t>
void grad_dw_out(acc_t* gv, const acc_t* dpre, const acc_t* s, const acc_t* gp, const Dims& d) {
  const int64_t HW = d.H * d.W, C = d.C;
  const acc_t inv = acc_t(1) / acc_t(HW);
  at::parallel_for(0, d.B * HW, std::max<int64_t>(1, 4096 / C), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / HW;
      acc_t* g = gv + p * C;
      const acc_t* dp = dpre + p * C;
      const acc_t* sb = s + b * C;
      const acc_t* gb = gp + b * C;
      for (int64_t c = 0; c < C; ++c) g[c] = (g[c] * sb[c] + gb[c] * inv) * gelu_grad(dp[c]);
    }
  });
}

// Transposed DW + grad_dw + LN backward, per chunk of rows. partials: [chunks, 11, C] =
// (9 taps of grad_dw, grad_ln_weight, grad_ln_bias), zero-initialised by the caller.
template <typename acc_t>
void dw_ln_backward(const acc_t* gd, const acc_t* n, const acc_t* x, const acc_t* mean,
                    const acc_t* rstd, const acc_t* g, const acc_t* wt, const acc_t* gy, acc_t* gx,
                    acc_t* partials, int64_t chunks, const Dims& d) {
  const int64_t H = d.H, W = d.W, C = d.C, rows = d.B * H;
  const int64_t per = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> gn(C);
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* pdw = partials + k * 11 * C;
      acc_t* pgamma = pdw + 9 * C;
      acc_t* pbeta = pgamma + C;
      for (int64_t r = k * per; r < std::min(rows, (k + 1) * per); ++r) {
        const int64_t b = r / H, i = r % H;
        for (int64_t j = 0; j < W; ++j) {
          const int64_t o = ((b * H + i) * W + j) * C;
          std::fill(gn.begin(), gn.end(), acc_t(0));
          const acc_t* gdo = gd + o;
          for (int64_t ky = 0; ky < 3; ++ky) {
            for (int64_t kx = 0; kx < 3; ++kx) {
              const acc_t* wk = wt + (ky * 3 + kx) * C;
              // out (i - ky + 1, j - kx + 1) read this pixel through tap (ky, kx)
              const int64_t io = i - ky + 1, jo = j - kx + 1;
              if (io >= 0 && io < H && jo >= 0 && jo < W) {
                const acc_t* gq = gd + ((b * H + io) * W + jo) * C;
                for (int64_t c = 0; c < C; ++c) gn[c] += gq[c] * wk[c];
              }
              // this output pixel read (i + ky - 1, j + kx - 1) through tap (ky, kx)
              const int64_t ii = i + ky - 1, jj = j + kx - 1;
              if (ii >= 0 && ii < H && jj >= 0 && jj < W) {
                const acc_t* nq = n + ((b * H + ii) * W + jj) * C;
                acc_t* pk = pdw + (ky * 3 + kx) * C;
                for (int64_t c = 0; c < C; ++c) pk[c] += gdo[c] * nq[c];
              }
            }
          }
          const int64_t p = o / C;
          const acc_t mu = mean[p], rs = rstd[p];
          const acc_t* xp = x + o;
          acc_t s1 = 0, s2 = 0;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xh = (xp[c] - mu) * rs;
            const acc_t gxh = gn[c] * g[c];
            s1 += gxh;
            s2 += gxh * xh;
            pgamma[c] += gn[c] * xh;
            pbeta[c] += gn[c];
          }
          s1 /= acc_t(C);
          s2 /= acc_t(C);
          const acc_t* gyp = gy + o;
          acc_t* gxp = gx + o;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xh = (xp[c] - mu) * rs;
            gxp[c] = gyp[c] + rs * (gn[c] * g[c] - s1 - xh * s2);
          }
        }
      }
    }
  });
}

template <typename acc_t>
void run_front(const Dims& d, const at::Tensor& xa, const Weights& w, double eps, at::Tensor& mean,
               at::Tensor& rstd, bool compute_stats, at::Tensor& n, at::Tensor* dpre, at::Tensor& u,
               at::Tensor& rowsum) {
  const int64_t P = d.B * d.H * d.W;
  layer_norm<acc_t>(xa.data_ptr<acc_t>(), w.g.data_ptr<acc_t>(), w.b.data_ptr<acc_t>(),
                    n.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), P, d.C, eps,
                    compute_stats);
  dw_gelu_rowsum<acc_t>(n.data_ptr<acc_t>(), w.wt.data_ptr<acc_t>(),
                        dpre ? dpre->data_ptr<acc_t>() : nullptr, u.data_ptr<acc_t>(),
                        rowsum.data_ptr<acc_t>(), d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& dw_weight, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const at::Tensor& pw_weight, const c10::optional<at::Tensor>& branch_scale, double eps) {
  const Dims d = check_args(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  check_scale(d, x, branch_scale);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto xa = x.to(acc).contiguous();
  const Weights w = widen(d, acc, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  auto opts = xa.options();
  auto mean = at::empty({d.B, d.H, d.W}, opts);
  auto rstd = at::empty({d.B, d.H, d.W}, opts);
  auto u = at::empty({d.B, d.H, d.W, d.C}, opts);
  auto rowsum = at::empty({d.B, d.H, d.C}, opts);
  {
    auto n = at::empty({d.B, d.H, d.W, d.C}, opts);
    AT_DISPATCH_FLOATING_TYPES(acc, "channel_attention_forward", [&] {
      run_front<scalar_t>(d, xa, w, eps, mean, rstd, true, n, nullptr, u, rowsum);
    });
  }
  auto pooled = rowsum.sum(1).div_(double(d.H * d.W));
  auto s = at::sigmoid(at::mm(at::gelu(at::mm(pooled, w.w1.t())), w.w2.t()));  // [B, C]
  if (branch_scale.has_value()) s = s * branch_scale->unsqueeze(1);
  // Fold the gate (and drop-path) into the 1x1 weight per image: y_b = x_b + u_b @ (Wp * s_b)^T.
  auto wf = (w.wp.unsqueeze(0) * s.unsqueeze(1)).transpose(1, 2);  // [B, Cin, Cout]
  const int64_t HW = d.H * d.W;
  auto y = at::baddbmm(xa.view({d.B, HW, d.C}), u.view({d.B, HW, d.C}), wf).view(x.sizes());
  return {y.to(x.scalar_type()), mean, rstd, pooled};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ln_weight,
             const at::Tensor& ln_bias, const at::Tensor& dw_weight, const at::Tensor& fc1_weight,
             const at::Tensor& fc2_weight, const at::Tensor& pw_weight,
             const c10::optional<at::Tensor>& branch_scale, const at::Tensor& mean,
             const at::Tensor& rstd, const at::Tensor& pooled, double eps) {
  const Dims d = check_args(x, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  check_scale(d, x, branch_scale);
  check_saved(d, grad_y, x, mean, rstd, pooled);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto xa = x.to(acc).contiguous();
  auto gya = grad_y.to(acc).contiguous();
  auto mean_c = mean.contiguous();
  auto rstd_c = rstd.contiguous();
  auto pooled_c = pooled.contiguous();
  const Weights w = widen(d, acc, ln_weight, ln_bias, dw_weight, fc1_weight, fc2_weight, pw_weight);
  auto opts = xa.options();
  const int64_t HW = d.H * d.W;
  auto n = at::empty({d.B, d.H, d.W, d.C}, opts);
  auto dpre = at::empty({d.B, d.H, d.W, d.C}, opts);
  auto u = at::empty({d.B, d.H, d.W, d.C}, opts);
  auto rowsum = at::empty({d.B, d.H, d.C}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "channel_attention_backward", [&] {
    run_front<scalar_t>(d, xa, w, eps, mean_c, rstd_c, false, n, &dpre, u, rowsum);
  });
  // SE, recomputed from the saved pooled means.
  auto a = at::mm(pooled_c, w.w1.t());  // [B, R]
  auto h = at::gelu(a);
  auto s = at::sigmoid(at::mm(h, w.w2.t()));  // [B, C]
  // With drop-path, the effective gate is s * scale: grad_s picks up the scale once.
  auto s_eff = branch_scale.has_value() ? s * branch_scale->unsqueeze(1) : s;
  auto gy3 = gya.view({d.B, HW, d.C});
  auto u3 = u.view({d.B, HW, d.C});
  // grad_pw[o, c] = sum_b s[b, c] * (gy_b^T u_b)[o, c]
  auto gpw = at::bmm(gy3.transpose(1, 2), u3).mul_(s_eff.unsqueeze(1)).sum(0);
  auto gv = at::matmul(gy3, w.wp);  // [B, HW, Cin]: grad at the gated activations
  auto gs = (gv * u3).sum(1);       // [B, C]
  if (branch_scale.has_value()) gs.mul_(branch_scale->unsqueeze(1));
  auto gz = gs * s * (1 - s);
  auto gw2 = at::mm(gz.t(), h);
  auto ga = at::gelu_backward(at::mm(gz, w.w2), a);
  auto gw1 = at::mm(ga.t(), pooled_c);
  auto gp = at::mm(ga, w.w1).contiguous();  // [B, C]: grad at the pooled means
  const int64_t rows = d.B * d.H;
  const int64_t chunks = std::min<int64_t>(rows, std::max<int64_t>(1, 4 * at::get_num_threads()));
  auto partials = at::zeros({chunks, 11, d.C}, opts);
  auto gx = at::empty_like(xa);
  AT_DISPATCH_FLOATING_TYPES(acc, "channel_attention_backward", [&] {
    auto sc = s_eff.contiguous();
    grad_dw_out<scalar_t>(gv.data_ptr<scalar_t>(), dpre.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                          gp.data_ptr<scalar_t>(), d);
    dw_ln_backward<scalar_t>(gv.data_ptr<scalar_t>(), n.data_ptr<scalar_t>(), xa.data_ptr<scalar_t>(),
                             mean_c.data_ptr<scalar_t>(), rstd_c.data_ptr<scalar_t>(),
                             w.g.data_ptr<scalar_t>(), w.wt.data_ptr<scalar_t>(),
                             gya.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                             partials.data_ptr<scalar_t>(), chunks, d);
  });
  auto red = partials.sum(0);  // [11, C]
  auto gdw = red.narrow(0, 0, 9).t().contiguous().view({d.C, 1, 3, 3});
  return {gx.to(x.scalar_type()),
          red[9].to(ln_weight.scalar_type(), false, /*copy=*/true),
          red[10].to(ln_bias.scalar_type(), false, /*copy=*/true),
          gdw.to(dw_weight.scalar_type()),
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
