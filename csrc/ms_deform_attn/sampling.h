// Per-sample bilinear math of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// Semantics are those of grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)
// on the grid 2*loc - 1: the pixel coordinate is loc*size - 0.5, pixel centres sit at integer
// coordinates, a corner outside the map contributes zero (weights are never renormalised), and a
// point whose 2x2 footprint misses the map entirely contributes zero and gets zero gradient.
//
// Everything here is index and weight arithmetic on scalars. Kernels own their loops over
// channels (the CPU kernel walks D contiguously, the CUDA kernels load 8 channels at a time), so
// both run exactly the same boundary code: the CPU tests exercise what the GPU executes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DBSAM_HD __host__ __device__ __forceinline__
#else
#define DBSAM_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define DBSAM_UNROLL _Pragma("unroll")
#else
#define DBSAM_UNROLL
#endif

namespace dbsam {
namespace msda {

// One sample point on one level, resolved to its four neighbouring value rows.
// Corner order: 0 = (h0, w0), 1 = (h0, w0+1), 2 = (h0+1, w0), 3 = (h0+1, w0+1).
template <typename acc_t>
struct Sample {
  int64_t row[4];   // value row (level start + h*W + w), or -1 when the corner is outside the map
  acc_t weight[4];  // bilinear weight of each corner (0 for corners outside)
  acc_t lh, lw;     // fractional offsets inside the cell, needed by the location gradient
};

// Resolves a normalised location (x = width axis, y = height axis) on a level of size H x W whose
// rows start at `level_start`, in a value of S rows. Returns false when the point contributes
// nothing at all; the comparisons are written so that NaN locations also land there. Rows outside
// [0, S) are dropped too: the wrappers validate the shapes, but a kernel handed inconsistent
// shapes (say under torch.compile, where value checks are skipped) must still never read past S.
template <typename acc_t>
DBSAM_HD bool locate(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W, int64_t level_start,
                     int64_t S, Sample<acc_t>& s) {
  const acc_t x = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  // Checked before any conversion to an integer: a huge or NaN coordinate must never reach floor().
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H))) {
    return false;
  }
  // x > -1 so x + 1 > 0 and the truncation below is a floor.
  const int64_t w0 = static_cast<int64_t>(x + acc_t(1)) - 1;
  const int64_t h0 = static_cast<int64_t>(y + acc_t(1)) - 1;
  const acc_t lw = x - static_cast<acc_t>(w0);
  const acc_t lh = y - static_cast<acc_t>(h0);
  const acc_t hw = acc_t(1) - lw;
  const acc_t hh = acc_t(1) - lh;
  s.lh = lh;
  s.lw = lw;

  const bool top = h0 >= 0;
  const bool bottom = h0 + 1 <= H - 1;
  const bool left = w0 >= 0;
  const bool right = w0 + 1 <= W - 1;
  const int64_t base = level_start + h0 * W + w0;

  s.row[0] = (top && left) ? base : -1;
  s.row[1] = (top && right) ? base + 1 : -1;
  s.row[2] = (bottom && left) ? base + W : -1;
  s.row[3] = (bottom && right) ? base + W + 1 : -1;
  s.weight[0] = (top && left) ? hh * hw : acc_t(0);
  s.weight[1] = (top && right) ? hh * lw : acc_t(0);
  s.weight[2] = (bottom && left) ? lh * hw : acc_t(0);
  s.weight[3] = (bottom && right) ? lh * lw : acc_t(0);
DBSAM_UNROLL
  for (int c = 0; c < 4; ++c) {
    if (s.row[c] < 0 || s.row[c] >= S) {
      s.row[c] = -1;
      s.weight[c] = acc_t(0);
    }
  }
  return true;
}

// Derivatives of the bilinear value with respect to the pixel coordinates (x, y), given the four
// corner values (0 for corners outside, as the forward treats them). Multiply by W (resp. H) for
// the derivative with respect to the normalised location.
template <typename acc_t>
DBSAM_HD void value_grad_xy(const Sample<acc_t>& s, acc_t v0, acc_t v1, acc_t v2, acc_t v3,
                            acc_t& d_dx, acc_t& d_dy) {
  const acc_t hh = acc_t(1) - s.lh;
  const acc_t hw = acc_t(1) - s.lw;
  d_dx = hh * (v1 - v0) + s.lh * (v3 - v2);
  d_dy = hw * (v2 - v0) + s.lw * (v3 - v1);
}

// Loads the four corner values of one channel through `load(row)`, zero for corners outside.
template <typename acc_t, typename Load>
DBSAM_HD void corner_values(const Sample<acc_t>& s, Load load, acc_t v[4]) {
DBSAM_UNROLL
  for (int c = 0; c < 4; ++c) v[c] = s.row[c] >= 0 ? load(s.row[c]) : acc_t(0);
}

template <typename acc_t>
DBSAM_HD acc_t interpolate(const Sample<acc_t>& s, const acc_t v[4]) {
  return s.weight[0] * v[0] + s.weight[1] * v[1] + s.weight[2] * v[2] + s.weight[3] * v[3];
}

}  // namespace msda
}  // namespace dbsam
