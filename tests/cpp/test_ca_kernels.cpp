// The channel_attention CUDA kernels (csrc/channel_attention/kernels.cuh), run on the CPU under
// tests/cpp/cuda_emulation.h and checked against plain double-precision loops, for one, two and four
// channels per thread (VEC), float, double and bf16 (tests/cpp/host_bf16.h standing in for
// c10::BFloat16, with float statistics), odd sizes: partial channel blocks (C < 32 * VEC, C not
// a multiple of the block's channels), rows shorter than the block's column groups (W = 7 < 8) and
// longer (W = 17: uneven column runs); the DW kernels at 1, 2 and 4 output rows per thread (RT,
// DBSAM_CA_ROWS) with partial last tiles of rows, and ln_stats with and without its copy of x. What
// this cannot check (speed, real memory ordering, the host code's buffer and alignment choices) the
// GPU tests do. Built and run by CMake/ctest.
#include "cuda_emulation.h"
#include "expect_close.h"
#include "host_bf16.h"

#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "channel_attention/kernels.cuh"

using namespace dbsam::ca;

static double gelu_d(double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }
static double gelu_grad_d(double v) {
  return 0.5 * (1 + std::erf(v / std::sqrt(2.0))) + v * std::exp(-0.5 * v * v) / std::sqrt(2 * M_PI);
}

// f(std::integral_constant<int, RT>) for the rows per thread the DW kernels take (1, 2, 4).
template <typename F>
static void for_rows(F&& f) {
  f(std::integral_constant<int, 1>{});
  f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 4>{});
}

// S: the tensors' dtype (float, double, or bf16 standing in for c10::BFloat16); A: the accumulation
// and statistics dtype the host pairs with it (float for bf16).
template <typename S, typename A, int VEC>
static void run_case(int B, int H, int W, int C) {
  char tag[96];
  const char* name = std::is_same<S, bf16>::value ? "bf16" : sizeof(S) == 8 ? "double" : "float";
  std::snprintf(tag, sizeof tag, "[%s VEC=%d B=%d H=%d W=%d C=%d]", name, VEC, B, H, W, C);
  const double tol = sizeof(A) == 8 ? 1e-11 : 2e-5;       // what the kernel accumulates or keeps in A
  const double tol_s = sizeof(S) == 2 ? 8e-3 : tol;        // what it rounds to S
  const int64_t P = int64_t(B) * H * W, N = P * C;
  std::mt19937 rng(1234 + VEC * 7 + C + W + int(sizeof(S)));
  std::normal_distribution<double> nd(0.0, 1.0);
  auto rand_s = [&](size_t n, double mean = 0.0, double sd = 1.0) {
    std::vector<S> v(n);
    for (auto& e : v) e = static_cast<S>(mean + sd * nd(rng));
    return v;
  };
  auto rand_a = [&](size_t n, double mean = 0.0, double sd = 1.0) {
    std::vector<A> v(n);
    for (auto& e : v) e = static_cast<A>(mean + sd * nd(rng));
    return v;
  };
  // Inputs: x with a per-pixel offset (LN must remove it), LN affine, DW taps [9][C] (tap-major).
  std::vector<S> x(N);
  for (int64_t p = 0; p < P; ++p)
    for (int c = 0; c < C; ++c) x[p * C + c] = static_cast<S>(nd(rng) + 0.5 * (p % 5));
  std::vector<A> g = rand_a(C, 1.0, 0.3), bta = rand_a(C, 0.0, 0.3), wt = rand_a(9 * C, 0.0, 0.4);
  const A eps = static_cast<A>(1e-6);

  // --- reference, in double --------------------------------------------------------------------------
  std::vector<double> mu(P), rs(P), ln(N), xhat(N), pre(N, 0.0), u(N), rowsum(int64_t(B) * H * C, 0.0);
  for (int64_t p = 0; p < P; ++p) {
    double s = 0, v = 0;
    for (int c = 0; c < C; ++c) s += x[p * C + c];
    mu[p] = s / C;
    for (int c = 0; c < C; ++c) v += (x[p * C + c] - mu[p]) * (x[p * C + c] - mu[p]);
    rs[p] = 1.0 / std::sqrt(v / C + double(eps));
    for (int c = 0; c < C; ++c) {
      xhat[p * C + c] = (x[p * C + c] - mu[p]) * rs[p];
      ln[p * C + c] = xhat[p * C + c] * g[c] + bta[c];
    }
  }
  auto at = [&](int b, int i, int j) { return (int64_t(b) * H + i) * W + j; };
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < H; ++i)
      for (int j = 0; j < W; ++j)
        for (int c = 0; c < C; ++c) {
          double acc = 0;
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) {
              const int ii = i + ky - 1, jj = j + kx - 1;
              if (ii >= 0 && ii < H && jj >= 0 && jj < W) acc += ln[at(b, ii, jj) * C + c] * wt[(ky * 3 + kx) * C + c];
            }
          pre[at(b, i, j) * C + c] = acc;
          u[at(b, i, j) * C + c] = gelu_d(acc);
          rowsum[(int64_t(b) * H + i) * C + c] += gelu_d(acc);
        }

  // --- ln_stats ------------------------------------------------------------------------------------------
  std::vector<A> mean(P), rstd(P);
  cuda_emu::launch(dim3(unsigned((P + WARPS - 1) / WARPS)), dim3(WARPS * 32),
                   [&] { ln_stats_kernel<S, A, VEC>(x.data(), mean.data(), rstd.data(), P, C, eps); });
  expect_close("ln_stats mean", mean, mu, tol, tag);
  expect_close("ln_stats rstd", rstd, rs, tol, tag);
  // with the copy of x the forward's output buffer starts from (the GEMM adds to it in place)
  std::vector<S> x_copy(N, S(-7.0f));
  std::fill(mean.begin(), mean.end(), A(-7));
  cuda_emu::launch(dim3(unsigned((P + WARPS - 1) / WARPS)), dim3(WARPS * 32), [&] {
    ln_stats_kernel<S, A, VEC>(x.data(), mean.data(), rstd.data(), P, C, eps, x_copy.data());
  });
  expect_close("ln_stats mean (with the copy)", mean, mu, tol, tag);
  {
    std::vector<double> xd(x.begin(), x.end());
    expect_close("ln_stats copy of x", x_copy, xd, 0.0, tag);
  }

  // --- dw_gelu: u, the saved pre-activation, row sums (and without the optional outputs), for 1, 2
  //     and 4 rows per thread (the row sums then per tile of RT rows; H = 5 leaves a partial tile) -------
  const dim3 tiles(unsigned((C + TX * VEC - 1) / (TX * VEC)), unsigned(H), unsigned(B));
  auto row_tiles = [&](int rt) { return dim3(tiles.x, unsigned((H + rt - 1) / rt), tiles.z); };
  // sums over each tile of rt rows of a [B, H, n] array
  auto tile_sums = [&](const std::vector<double>& rows, int rt, int n) {
    const int ht = (H + rt - 1) / rt;
    std::vector<double> out(int64_t(B) * ht * n, 0.0);
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < H; ++i)
        for (int q = 0; q < n; ++q) out[(int64_t(b) * ht + i / rt) * n + q] += rows[(int64_t(b) * H + i) * n + q];
    return out;
  };
  std::vector<S> u_k(N), pre_k(N);
  for_rows([&](auto RTc) {
    constexpr int RT = decltype(RTc)::value;
    char what[64];
    std::fill(u_k.begin(), u_k.end(), S(-7.0f));
    std::fill(pre_k.begin(), pre_k.end(), S(-7.0f));
    std::vector<A> rowsum_k(int64_t(B) * row_tiles(RT).y * C, A(-7));
    cuda_emu::launch(row_tiles(RT), dim3(TX, TY), [&] {
      dw_gelu_kernel<S, A, VEC, RT>(x.data(), mean.data(), rstd.data(), g.data(), bta.data(), wt.data(), u_k.data(),
                                    pre_k.data(), rowsum_k.data(), H, W, C);
    });
    std::snprintf(what, sizeof what, "dw_gelu RT=%d u", RT);
    expect_close(what, u_k, u, tol_s, tag);
    std::snprintf(what, sizeof what, "dw_gelu RT=%d pre", RT);
    expect_close(what, pre_k, pre, tol_s, tag);
    std::snprintf(what, sizeof what, "dw_gelu RT=%d rowsum", RT);
    expect_close(what, rowsum_k, tile_sums(rowsum, RT, C), tol, tag);
    std::fill(u_k.begin(), u_k.end(), S(-7.0f));
    cuda_emu::launch(row_tiles(RT), dim3(TX, TY), [&] {
      dw_gelu_kernel<S, A, VEC, RT>(x.data(), mean.data(), rstd.data(), g.data(), bta.data(), wt.data(), u_k.data(),
                                    nullptr, nullptr, H, W, C);
    });
    std::snprintf(what, sizeof what, "dw_gelu RT=%d u (u only)", RT);
    expect_close(what, u_k, u, tol_s, tag);
  });

  // --- gate_dot: v = GELU(pre) * s[b] and per (image, row) sums of gv * GELU(pre), one pass -------------------
  std::vector<A> s = rand_a(int64_t(B) * C, 0.5, 0.2), gp = rand_a(int64_t(B) * C);
  std::vector<S> gv = rand_s(N), v_k(N, S(-7.0f));
  const int64_t HWC = int64_t(H) * W * C;
  std::vector<double> v(N);
  for (int64_t k = 0; k < N; ++k) v[k] = gelu_d(double(pre_k[k])) * s[(k / HWC) * C + k % C];
  std::vector<A> rowdot_k(int64_t(B) * H * C);
  std::vector<double> rowdot(int64_t(B) * H * C, 0.0);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < H; ++i)
      for (int j = 0; j < W; ++j)
        for (int c = 0; c < C; ++c)
          rowdot[(int64_t(b) * H + i) * C + c] += double(gv[at(b, i, j) * C + c]) * gelu_d(double(pre_k[at(b, i, j) * C + c]));
  cuda_emu::launch(tiles, dim3(TX, TY), [&] {
    gate_dot_kernel<S, A, VEC>(gv.data(), pre_k.data(), s.data(), v_k.data(), rowdot_k.data(), H, W, C);
  });
  expect_close("gate_dot v", v_k, v, tol_s, tag);
  expect_close("gate_dot rowdot", rowdot_k, rowdot, tol, tag);

  // --- dw_backward: the grad at pre formed on the fly, transposed DW, per-block partials of grad_dw /
  //     grad_ln_weight / grad_ln_bias ----------------------------------------------------------------------
  const double inv_hw = 1.0 / (H * W);
  std::vector<double> gd(N);
  for (int64_t k = 0; k < N; ++k) {
    const int64_t bc = (k / HWC) * C + k % C;
    gd[k] = (double(gv[k]) * s[bc] + double(gp[bc]) * inv_hw) * gelu_grad_d(double(pre_k[k]));
  }
  std::vector<A> gn_k(N);
  std::vector<double> gn(N, 0.0), gdw(9 * C, 0.0), gg(C, 0.0), gb(C, 0.0);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < H; ++i)
      for (int j = 0; j < W; ++j)
        for (int c = 0; c < C; ++c)
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) {
              const int ii = i + ky - 1, jj = j + kx - 1;  // output (i, j) read pixel (ii, jj) through tap (ky, kx)
              if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
              const double go = gd[at(b, i, j) * C + c];
              gn[at(b, ii, jj) * C + c] += go * double(wt[(ky * 3 + kx) * C + c]);
              gdw[(ky * 3 + kx) * C + c] += go * ln[at(b, ii, jj) * C + c];
            }
  for (int64_t p = 0; p < P; ++p)
    for (int c = 0; c < C; ++c) {
      gg[c] += gn[p * C + c] * xhat[p * C + c];
      gb[c] += gn[p * C + c];
    }
  // Both ways to the grad at pre: grad_pre_kernel's map read by dw_backward (the default), and formed
  // inside dw_backward (FUSED, DBSAM_CA_FUSED_GRAD=1).
  std::vector<A> gd_k(N, A(-7));
  cuda_emu::launch(dim3(unsigned(std::min<int64_t>((P + WARPS - 1) / WARPS, 3))), dim3(32, WARPS), [&] {  // grid-stride
    grad_pre_kernel<S, A, VEC>(gv.data(), pre_k.data(), s.data(), gp.data(), gd_k.data(), P, int64_t(H) * W, C,
                               A(inv_hw));
  });
  expect_close("grad_pre", gd_k, gd, tol, tag);
  for (bool fused : {false, true}) {
    for_rows([&](auto RTc) {
      constexpr int RT = decltype(RTc)::value;
      const dim3 grid = row_tiles(RT);
      std::vector<A> partials(int64_t(B) * grid.y * 11 * C, A(-7));
      std::fill(gn_k.begin(), gn_k.end(), A(-7));
      cuda_emu::launch(grid, dim3(TX, TY), [&] {
        if (fused) {
          dw_backward_kernel<S, A, VEC, true, RT>(nullptr, gv.data(), pre_k.data(), s.data(), gp.data(), A(inv_hw),
                                                  x.data(), mean.data(), rstd.data(), g.data(), bta.data(), wt.data(),
                                                  gn_k.data(), partials.data(), H, W, C);
        } else {
          dw_backward_kernel<S, A, VEC, false, RT>(gd_k.data(), nullptr, nullptr, nullptr, nullptr, A(inv_hw),
                                                   x.data(), mean.data(), rstd.data(), g.data(), bta.data(), wt.data(),
                                                   gn_k.data(), partials.data(), H, W, C);
        }
      });
      char what[64];
      const char* how = fused ? "dw_backward (fused)" : "dw_backward";
      std::snprintf(what, sizeof what, "%s RT=%d gn", how, RT);
      expect_close(what, gn_k, gn, tol, tag);
      std::vector<A> red(11 * C, A(0));
      for (int64_t r = 0; r < int64_t(B) * grid.y; ++r)
        for (int q = 0; q < 11 * C; ++q) red[q] += partials[r * 11 * C + q];
      std::vector<A> red_dw(red.begin(), red.begin() + 9 * C), red_g(red.begin() + 9 * C, red.begin() + 10 * C),
          red_b(red.begin() + 10 * C, red.end());
      std::snprintf(what, sizeof what, "%s RT=%d grad_dw", how, RT);
      expect_close(what, red_dw, gdw, 10 * tol, tag);
      std::snprintf(what, sizeof what, "%s RT=%d grad_ln_weight", how, RT);
      expect_close(what, red_g, gg, 10 * tol, tag);
      std::snprintf(what, sizeof what, "%s RT=%d grad_ln_bias", how, RT);
      expect_close(what, red_b, gb, 10 * tol, tag);
    });
  }
  // gn as the default path (RT = 1, from grad_pre's map) left it, for ln_backward below
  {
    std::vector<A> partials(int64_t(B) * H * 11 * C);
    cuda_emu::launch(tiles, dim3(TX, TY), [&] {
      dw_backward_kernel<S, A, VEC, false>(gd_k.data(), nullptr, nullptr, nullptr, nullptr, A(inv_hw), x.data(),
                                           mean.data(), rstd.data(), g.data(), bta.data(), wt.data(), gn_k.data(),
                                           partials.data(), H, W, C);
    });
  }

  // --- ln_backward (+ residual) ------------------------------------------------------------------------------
  std::vector<S> gy = rand_s(N), gx_k(N);
  std::vector<double> gx(N);
  for (int64_t p = 0; p < P; ++p) {
    double s1 = 0, s2 = 0;
    for (int c = 0; c < C; ++c) {
      const double gxh = double(gn_k[p * C + c]) * g[c];
      s1 += gxh;
      s2 += gxh * xhat[p * C + c];
    }
    s1 /= C, s2 /= C;
    for (int c = 0; c < C; ++c)
      gx[p * C + c] = gy[p * C + c] + rs[p] * (double(gn_k[p * C + c]) * g[c] - s1 - xhat[p * C + c] * s2);
  }
  cuda_emu::launch(dim3(unsigned((P + WARPS - 1) / WARPS)), dim3(WARPS * 32), [&] {
    ln_backward_kernel<S, A, VEC>(gn_k.data(), x.data(), gy.data(), mean.data(), rstd.data(), g.data(), gx_k.data(), P, C);
  });
  expect_close("ln_backward", gx_k, gx, tol_s, tag);
  // Without the op's residual (gy == nullptr): the same minus gy.
  for (int64_t i = 0; i < N; ++i) gx[i] -= double(gy[i]);
  cuda_emu::launch(dim3(unsigned((P + WARPS - 1) / WARPS)), dim3(WARPS * 32), [&] {
    ln_backward_kernel<S, A, VEC>(gn_k.data(), x.data(), nullptr, mean.data(), rstd.data(), g.data(), gx_k.data(), P,
                                  C);
  });
  expect_close("ln_backward without residual", gx_k, gx, tol_s, tag);
}

// small_mm_kernel: out [B, R] = a [B, K] @ w^T, one warp per output (StoreEpi).
template <typename T>
static void run_small_mm(int B, int R, int K) {
  char tag[64];
  std::snprintf(tag, sizeof tag, "[%s small_mm B=%d R=%d K=%d]", sizeof(T) == 8 ? "double" : "float", B, R, K);
  std::mt19937 rng(99 + K);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<T> a(int64_t(B) * K), w(int64_t(R) * K), out(int64_t(B) * R, T(-7));
  for (auto& v : a) v = static_cast<T>(nd(rng));
  for (auto& v : w) v = static_cast<T>(nd(rng));
  std::vector<double> want(int64_t(B) * R, 0.0);
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < K; ++k) want[int64_t(b) * R + r] += double(a[int64_t(b) * K + k]) * w[int64_t(r) * K + k];
  const int64_t threads = int64_t(B) * R * 32;
  cuda_emu::launch(dim3(unsigned((threads + 255) / 256)), dim3(256),
                   [&] { small_mm_kernel<T>(a.data(), w.data(), B, R, K, StoreEpi<T>{out.data(), R}); });
  expect_close("small_mm", out, want, sizeof(T) == 8 ? 1e-12 : 1e-5, tag);
}

// pack_weights_kernel: the six weights, some in S and some in float (AMP's master weights), converted
// to A and laid out as WeightLayout says (the DW taps and the SE weights' transposes included). Every
// value is exact (a conversion, no arithmetic). Then sum_rows_kernel + PartialsEpi and se_weight_grad_kernel
// store grads in the same mix of dtypes.
template <typename S, typename A>
static void run_weights(int C, int R, unsigned float_mask, int rows) {
  char tag[96];
  const char* name = std::is_same<S, bf16>::value ? "bf16" : sizeof(S) == 8 ? "double" : "float";
  std::snprintf(tag, sizeof tag, "[%s weights C=%d R=%d mask=%u rows=%d]", name, C, R, float_mask, rows);
  std::mt19937 rng(7 + C + R + float_mask);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int64_t sizes[6] = {C, C, int64_t(C) * 9, int64_t(R) * C, int64_t(C) * R, int64_t(C) * C};
  std::vector<std::vector<S>> ws(6);
  std::vector<std::vector<float>> wf(6);
  std::vector<std::vector<double>> wd(6);  // the values as stored, whichever dtype holds them
  WeightPtrs ptrs{};
  ptrs.float_mask = float_mask;
  for (int i = 0; i < 6; ++i) {
    const bool f = (float_mask >> i) & 1u;
    for (int64_t k = 0; k < sizes[i]; ++k) {
      const double v = nd(rng);
      if (f) {
        wf[i].push_back(static_cast<float>(v));
        wd[i].push_back(double(wf[i].back()));
      } else {
        ws[i].push_back(static_cast<S>(v));
        wd[i].push_back(double(ws[i].back()));
      }
    }
    ptrs.p[i] = f ? static_cast<const void*>(wf[i].data()) : static_cast<const void*>(ws[i].data());
  }
  for (bool transposes : {false, true}) {
    const WeightLayout L{C, R, transposes};
    std::vector<A> out(L.total(), A(-7));
    std::vector<double> want(L.total());
    for (int c = 0; c < C; ++c) {
      want[L.g() + c] = wd[0][c];
      want[L.b() + c] = wd[1][c];
      for (int k = 0; k < 9; ++k) want[L.wt() + int64_t(k) * C + c] = wd[2][int64_t(c) * 9 + k];
      for (int r = 0; r < R; ++r) {
        want[L.w1() + int64_t(r) * C + c] = wd[3][int64_t(r) * C + c];
        want[L.w2() + int64_t(c) * R + r] = wd[4][int64_t(c) * R + r];
        if (transposes) {
          want[L.w1t() + int64_t(c) * R + r] = wd[3][int64_t(r) * C + c];
          want[L.w2t() + int64_t(r) * C + c] = wd[4][int64_t(c) * R + r];
        }
      }
      for (int k = 0; k < C; ++k) want[L.wp() + int64_t(c) * C + k] = wd[5][int64_t(c) * C + k];
    }
    cuda_emu::launch(dim3(3), dim3(64), [&] { pack_weights_kernel<S, A>(ptrs, L, out.data()); });  // grid-stride
    expect_close(transposes ? "pack_weights (with transposes)" : "pack_weights", out, want, 0.0, tag);
  }

  // the partials: [rows, 11, C] summed over rows into grad_dw [C, 9] and the LN affine's grads,
  // stored in the dtypes of dw_weight (bit 2), ln_weight (bit 0) and ln_bias (bit 1).
  std::vector<A> partials(int64_t(rows) * 11 * C);
  for (auto& v : partials) v = static_cast<A>(nd(rng));
  std::vector<double> gdw(int64_t(C) * 9, 0.0), glnw(C, 0.0), glnb(C, 0.0);
  for (int row = 0; row < rows; ++row)
    for (int k = 0; k < 11; ++k)
      for (int c = 0; c < C; ++c) {
        const double v = partials[(int64_t(row) * 11 + k) * C + c];
        if (k < 9) gdw[int64_t(c) * 9 + k] += v;
        else (k == 9 ? glnw : glnb)[c] += v;
      }
  std::vector<S> gdw_s(gdw.size()), glnw_s(C), glnb_s(C);
  std::vector<float> gdw_f(gdw.size()), glnw_f(C), glnb_f(C);
  auto out_ptr = [&](int bit, std::vector<S>& s_out, std::vector<float>& f_out) -> void* {
    return ((float_mask >> bit) & 1u) ? static_cast<void*>(f_out.data()) : static_cast<void*>(s_out.data());
  };
  cuda_emu::launch(dim3(unsigned((11 * C + 31) / 32)), dim3(32, SR), [&] {
    sum_rows_kernel<A>(partials.data(), rows, 11 * C,
                       PartialsEpi<S, A>{out_ptr(2, gdw_s, gdw_f), out_ptr(0, glnw_s, glnw_f), out_ptr(1, glnb_s, glnb_f),
                                         bool((float_mask >> 2) & 1u), bool(float_mask & 1u),
                                         bool((float_mask >> 1) & 1u), C});
  });
  const double tol_s = sizeof(S) == 2 ? 8e-3 : sizeof(A) == 8 ? 1e-12 : 2e-6;
  auto check = [&](const char* what, int bit, const std::vector<S>& s_out, const std::vector<float>& f_out,
                   const std::vector<double>& want) {
    if ((float_mask >> bit) & 1u) {
      expect_close(what, f_out, want, sizeof(A) == 8 ? 1e-12 : 2e-6, tag);
    } else {
      expect_close(what, s_out, want, tol_s, tag);
    }
  };
  check("partials grad_dw", 2, gdw_s, gdw_f, gdw);
  check("partials grad_ln_weight", 0, glnw_s, glnw_f, glnw);
  check("partials grad_ln_bias", 1, glnb_s, glnb_f, glnb);
}

// The SE MLP, forward and backward, as cuda.cu chains its kernels: pooled means from per-row sums
// (sum_rows_kernel + PoolEpi), the hidden units and the gate (small_mm_kernel + HiddenEpi, GateEpi,
// with and without a per-sample scale), the gate folded into the 1x1 weight (fold_kernel); then gz
// (GateGradEpi), ga (GeluGradEpi, through W2^T), gp (StoreEpi, through W1^T) and the SE weights'
// grads (se_weight_grad_kernel). Against double loops over the same inputs.
template <typename S, typename A>
static void run_se(int B, int H, int C, int R, bool with_scale) {
  char tag[96];
  const char* name = std::is_same<S, bf16>::value ? "bf16" : sizeof(S) == 8 ? "double" : "float";
  std::snprintf(tag, sizeof tag, "[%s SE B=%d H=%d C=%d R=%d scale=%d]", name, B, H, C, R, int(with_scale));
  const double tol = sizeof(A) == 8 ? 1e-11 : 2e-5;
  std::mt19937 rng(31 + B + C + R + int(with_scale));
  std::normal_distribution<double> nd(0.0, 1.0);
  auto rand_a = [&](size_t n, double sd) {
    std::vector<A> v(n);
    for (auto& e : v) e = static_cast<A>(sd * nd(rng));
    return v;
  };
  const int W = 5, HW = H * W;
  std::vector<A> rowsum = rand_a(size_t(B) * H * C, 3.0), w1 = rand_a(size_t(R) * C, 0.3),
                 w2 = rand_a(size_t(C) * R, 0.3), wp = rand_a(size_t(C) * C, 0.5), rowdot = rand_a(size_t(B) * H * C, 2.0);
  std::vector<A> w1t(size_t(C) * R), w2t(size_t(R) * C);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      w1t[size_t(c) * R + r] = w1[size_t(r) * C + c];
      w2t[size_t(r) * C + c] = w2[size_t(c) * R + r];
    }
  std::vector<A> scale(B);
  for (int b = 0; b < B; ++b) scale[b] = static_cast<A>(b % 2 ? 0.0 : 1.0 / 0.7);  // drop-path: kept or dropped
  const A* scale_p = with_scale ? scale.data() : nullptr;

  // reference
  std::vector<double> pooled(size_t(B) * C), a(size_t(B) * R), h(size_t(B) * R), s(size_t(B) * C),
      gate(size_t(B) * C), wf(size_t(B) * C * C), gz(size_t(B) * C), ga(size_t(B) * R), gp(size_t(B) * C),
      gw1(size_t(R) * C, 0.0), gw2(size_t(C) * R, 0.0);
  for (int b = 0; b < B; ++b) {
    const double sc = with_scale ? double(scale[b]) : 1.0;
    for (int c = 0; c < C; ++c) {
      double t = 0;
      for (int i = 0; i < H; ++i) t += rowsum[(size_t(b) * H + i) * C + c];
      pooled[size_t(b) * C + c] = t / HW;
    }
    for (int r = 0; r < R; ++r) {
      double t = 0;
      for (int c = 0; c < C; ++c) t += pooled[size_t(b) * C + c] * w1[size_t(r) * C + c];
      a[size_t(b) * R + r] = t;
      h[size_t(b) * R + r] = gelu_d(t);
    }
    for (int c = 0; c < C; ++c) {
      double t = 0;
      for (int r = 0; r < R; ++r) t += h[size_t(b) * R + r] * w2[size_t(c) * R + r];
      s[size_t(b) * C + c] = 1 / (1 + std::exp(-t));
      gate[size_t(b) * C + c] = s[size_t(b) * C + c] * sc;
      double gs = 0;
      for (int i = 0; i < H; ++i) gs += rowdot[(size_t(b) * H + i) * C + c];
      gz[size_t(b) * C + c] = gs * sc * s[size_t(b) * C + c] * (1 - s[size_t(b) * C + c]);
    }
    for (int co = 0; co < C; ++co)
      for (int ci = 0; ci < C; ++ci)
        wf[(size_t(b) * C + co) * C + ci] = double(wp[size_t(co) * C + ci]) * gate[size_t(b) * C + ci];
    for (int r = 0; r < R; ++r) {
      double t = 0;
      for (int c = 0; c < C; ++c) t += gz[size_t(b) * C + c] * w2[size_t(c) * R + r];
      ga[size_t(b) * R + r] = t * gelu_grad_d(a[size_t(b) * R + r]);
    }
    for (int c = 0; c < C; ++c) {
      double t = 0;
      for (int r = 0; r < R; ++r) t += ga[size_t(b) * R + r] * w1[size_t(r) * C + c];
      gp[size_t(b) * C + c] = t;
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) {
        gw1[size_t(r) * C + c] += ga[size_t(b) * R + r] * pooled[size_t(b) * C + c];
        gw2[size_t(c) * R + r] += gz[size_t(b) * C + c] * h[size_t(b) * R + r];
      }
  }

  // the kernels, chained as cuda.cu chains them
  std::vector<A> k_pooled(size_t(B) * C), k_a(size_t(B) * R), k_h(size_t(B) * R), k_h2(size_t(B) * R),
      k_s(size_t(B) * C), k_gate(size_t(B) * C), k_gate2(size_t(B) * C), k_gz(size_t(B) * C), k_ga(size_t(B) * R),
      k_gp(size_t(B) * C);
  std::vector<S> k_wf(size_t(B) * C * C);
  auto mm_grid = [](int b, int r) { return dim3(unsigned((int64_t(b) * r * 32 + 255) / 256)); };
  const dim3 rows_grid(unsigned((C + 31) / 32), unsigned(B));
  cuda_emu::launch(rows_grid, dim3(32, SR),
                   [&] { sum_rows_kernel<A>(rowsum.data(), H, C, PoolEpi<A>{k_pooled.data(), A(1) / A(HW), C}); });
  expect_close("SE pooled", k_pooled, pooled, tol, tag);
  // forward: h only; backward's recompute: a and h, s and the gate
  cuda_emu::launch(mm_grid(B, R), dim3(256),
                   [&] { small_mm_kernel<A>(k_pooled.data(), w1.data(), B, R, C, HiddenEpi<A>{nullptr, k_h.data(), R}); });
  cuda_emu::launch(mm_grid(B, C), dim3(256), [&] {
    small_mm_kernel<A>(k_h.data(), w2.data(), B, C, R, GateEpi<A>{scale_p, k_gate.data(), nullptr, C});
  });
  cuda_emu::launch(mm_grid(B, R), dim3(256), [&] {
    small_mm_kernel<A>(k_pooled.data(), w1.data(), B, R, C, HiddenEpi<A>{k_a.data(), k_h2.data(), R});
  });
  cuda_emu::launch(mm_grid(B, C), dim3(256), [&] {
    small_mm_kernel<A>(k_h2.data(), w2.data(), B, C, R, GateEpi<A>{scale_p, k_gate2.data(), k_s.data(), C});
  });
  expect_close("SE hidden (forward)", k_h, h, tol, tag);
  expect_close("SE gate (forward)", k_gate, gate, tol, tag);
  expect_close("SE a (backward)", k_a, a, tol, tag);
  expect_close("SE hidden (backward)", k_h2, h, tol, tag);
  expect_close("SE s (backward)", k_s, s, tol, tag);
  expect_close("SE gate (backward)", k_gate2, gate, tol, tag);
  cuda_emu::launch(dim3(5), dim3(64), [&] {  // grid-stride
    fold_kernel<S, A>(wp.data(), k_gate.data(), k_wf.data(), int64_t(B) * C * C, C);
  });
  expect_close("fold", k_wf, wf, sizeof(S) == 2 ? 8e-3 : tol, tag);
  cuda_emu::launch(rows_grid, dim3(32, SR), [&] {
    sum_rows_kernel<A>(rowdot.data(), H, C, GateGradEpi<A>{scale_p, k_s.data(), k_gz.data(), C});
  });
  expect_close("SE gz", k_gz, gz, tol, tag);
  cuda_emu::launch(mm_grid(B, R), dim3(256), [&] {
    small_mm_kernel<A>(k_gz.data(), w2t.data(), B, R, C, GeluGradEpi<A>{k_a.data(), k_ga.data(), R});
  });
  expect_close("SE ga", k_ga, ga, tol, tag);
  cuda_emu::launch(mm_grid(B, C), dim3(256),
                   [&] { small_mm_kernel<A>(k_ga.data(), w1t.data(), B, C, R, StoreEpi<A>{k_gp.data(), C}); });
  expect_close("SE gp", k_gp, gp, tol, tag);
  // the SE weights' grads: fc1's in S, fc2's in float (both kinds of store in one launch)
  std::vector<S> k_gw1(size_t(R) * C);
  std::vector<float> k_gw2(size_t(C) * R);
  cuda_emu::launch(dim3(3), dim3(64), [&] {  // grid-stride
    se_weight_grad_kernel<S, A>(k_ga.data(), k_pooled.data(), k_gz.data(), k_h2.data(), B, R, C, k_gw1.data(), false,
                                k_gw2.data(), true);
  });
  expect_close("SE grad_fc1", k_gw1, gw1, sizeof(S) == 2 ? 8e-3 : tol, tag);
  expect_close("SE grad_fc2", k_gw2, gw2, sizeof(A) == 8 ? 1e-7 : tol, tag);  // stored as float
}

template <typename S, typename A>
static void run_all(int B, int H, int W, int C) {
  run_case<S, A, 1>(B, H, W, C);
  run_case<S, A, 2>(B, H, W, C);
  run_case<S, A, 4>(B, H, W, C);
}

int main() {
  // C = 72: three channel blocks at VEC = 1, a full and a partial one at VEC = 2, one partial at 4.
  run_all<float, float>(2, 5, 7, 72);
  run_all<double, double>(2, 5, 7, 72);
  run_all<bf16, float>(2, 5, 7, 72);  // 2-byte elements: 4- and 8-byte accesses at VEC 2 and 4
  run_all<float, float>(1, 3, 17, 24);
  run_all<double, double>(2, 4, 17, 36);
  run_all<bf16, float>(1, 3, 17, 24);
  run_case<float, float, 1>(1, 2, 3, 7);  // C odd: only VEC = 1 may run it (the host falls back to it)
  // K below, at and above a warp's 128-element unrolled step; B * R not a multiple of 8 warps.
  run_small_mm<float>(3, 5, 7);
  run_small_mm<float>(2, 7, 128);
  run_small_mm<double>(3, 6, 300);
  // The weights' packing and the grads' stores: all in x's dtype, all float32, and mixed.
  run_weights<bf16, float>(24, 6, 0u, 5);
  run_weights<bf16, float>(24, 6, 0x3fu, 9);
  run_weights<bf16, float>(40, 10, 0x15u, 3);
  run_weights<float, float>(40, 10, 0x15u, 70);  // rows past sum_rows' unrolled step (4 x 8 rows)
  run_weights<float, float>(24, 6, 0x3fu, 4);
  run_weights<double, double>(17, 5, 0u, 7);
  // The SE chain: C and R below, at and above a warp's unrolled step; with and without drop-path's scale.
  run_se<float, float>(3, 4, 24, 6, false);
  run_se<float, float>(2, 3, 160, 40, true);
  run_se<double, double>(3, 5, 36, 9, true);
  run_se<float, float>(2, 41, 24, 6, true);  // H past sum_rows' unrolled step
  run_se<bf16, float>(2, 4, 24, 6, true);
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("channel_attention kernels: all checks passed\n");
  return 0;
}
