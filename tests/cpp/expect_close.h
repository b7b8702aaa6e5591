// expect_close for the kernel tests: the largest absolute error against the reference, relative to
// the reference's largest magnitude, must be within tol (NaN fails); a failure is printed with its
// place and counted in `failures`.
#pragma once

#include <cmath>
#include <cstdio>
#include <vector>

static int failures = 0;

template <typename T>
static void expect_close(const char* what, const std::vector<T>& got, const std::vector<double>& want, double tol,
                         const char* tag) {
  double scale = 1e-30, worst = 0;
  size_t at = 0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t k = 0; k < want.size(); ++k) {
    const double e = std::fabs(static_cast<double>(got[k]) - want[k]);
    if (!(e <= worst)) worst = e, at = k;  // a NaN error becomes the worst
  }
  if (!(worst <= tol * scale)) {
    std::printf("%s %s: max error %.3g at %zu (got %.9g, want %.9g; scale %.3g)\n", tag, what, worst, at,
                static_cast<double>(got[at]), want[at], scale);
    ++failures;
  }
}
