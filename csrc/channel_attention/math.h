// Scalar math of the channel_attention kernels (erf GELU and its derivative), host- and
// device-compilable. Used by cuda.cu; the CPU kernel calls ATen's vectorised GELU instead.
#pragma once

#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DBSAM_CA_HD __host__ __device__ __forceinline__
#else
#define DBSAM_CA_HD inline
#endif

namespace dbsam {
namespace ca {

// Explicit float/double overloads: no silent promotion of float math to double on the host.
DBSAM_CA_HD float ca_erf(float v) { return erff(v); }
DBSAM_CA_HD double ca_erf(double v) { return erf(v); }
DBSAM_CA_HD float ca_exp(float v) { return expf(v); }
DBSAM_CA_HD double ca_exp(double v) { return exp(v); }

template <typename T>
DBSAM_CA_HD T gelu(T v) {
  return T(0.5) * v * (T(1) + ca_erf(v * T(0.70710678118654752440)));
}

// d/dv [v * Phi(v)] = Phi(v) + v * phi(v)
template <typename T>
DBSAM_CA_HD T gelu_grad(T v) {
  const T cdf = T(0.5) * (T(1) + ca_erf(v * T(0.70710678118654752440)));
  const T pdf = ca_exp(T(-0.5) * v * v) * T(0.39894228040143267794);
  return cdf + v * pdf;
}

}  // namespace ca
}  // namespace dbsam
