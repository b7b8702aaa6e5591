// C++-level checks of the shared per-sample math (csrc/ms_deform_attn/sampling.h), without torch:
// the boundary rules every kernel inherits. Built and run by CMake/ctest (see CMakeLists.txt).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "ms_deform_attn/sampling.h"

using dbsam::msda::Sample;
using dbsam::msda::locate;

static int failures = 0;
#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

static bool near(double a, double b) { return std::fabs(a - b) < 1e-12; }

int main() {
  Sample<double> s;
  // Pixel centre of (h=1, w=2) on a 4x5 level starting at row 10: x = (2+0.5)/5, y = (1+0.5)/4.
  CHECK(locate<double>(2.5 / 5, 1.5 / 4, 4, 5, 10, 30, s));
  CHECK(s.row[0] == 10 + 1 * 5 + 2 && near(s.weight[0], 1.0));
  CHECK(near(s.weight[1] + s.weight[2] + s.weight[3], 0.0));

  // Half-way between four pixels: each weighs a quarter.
  CHECK(locate<double>(3.0 / 5, 2.0 / 4, 4, 5, 0, 20, s));
  for (int c = 0; c < 4; ++c) CHECK(near(s.weight[c], 0.25));
  CHECK(s.row[0] == 1 * 5 + 2 && s.row[1] == s.row[0] + 1 && s.row[2] == s.row[0] + 5 && s.row[3] == s.row[0] + 6);

  // Partly outside at the top-left corner: only the (0, 0) corner is inside, with its weight.
  CHECK(locate<double>(0.25 / 5, 0.25 / 4, 4, 5, 0, 20, s));  // x = y = -0.25
  CHECK(s.row[0] == -1 && s.row[1] == -1 && s.row[2] == -1 && s.row[3] == 0);
  CHECK(near(s.weight[3], 0.75 * 0.75));

  // Fully outside (x <= -1 or x >= W), NaN and huge coordinates: nothing at all.
  CHECK(!locate<double>(-0.5 / 5, 0.5, 4, 5, 0, 20, s));
  CHECK(!locate<double>(5.5 / 5, 0.5, 4, 5, 0, 20, s));
  CHECK(!locate<double>(std::numeric_limits<double>::quiet_NaN(), 0.5, 4, 5, 0, 20, s));
  CHECK(!locate<double>(0.5, std::numeric_limits<double>::infinity(), 4, 5, 0, 20, s));
  CHECK(!locate<double>(1e300, -1e300, 4, 5, 0, 20, s));

  // Just inside the right edge: only the left corners count.
  CHECK(locate<double>(4.9 / 5, 0.5, 4, 5, 0, 20, s));  // x = 4.4
  CHECK(s.row[1] == -1 && s.row[3] == -1 && s.row[0] >= 0 && s.row[2] >= 0);

  // Rows past S (inconsistent shapes) are dropped rather than read.
  CHECK(locate<double>(3.0 / 5, 2.0 / 4, 4, 5, 0, 12, s));
  CHECK(s.row[0] == 7 && s.row[1] == 8 && s.row[2] == -1 && s.row[3] == -1 && near(s.weight[2], 0.0));

  // Location gradient of a plane v = 2*x + 3*y sampled inside the map.
  CHECK(locate<double>(2.3 / 5, 1.6 / 4, 4, 5, 0, 20, s));
  double v[4] = {2.0 * 1 + 3.0 * 1, 2.0 * 2 + 3.0 * 1, 2.0 * 1 + 3.0 * 2, 2.0 * 2 + 3.0 * 2};  // (w,h) corners
  double dx, dy;
  dbsam::msda::value_grad_xy<double>(s, v[0], v[1], v[2], v[3], dx, dy);
  CHECK(near(dx, 2.0) && near(dy, 3.0));
  CHECK(near(dbsam::msda::interpolate<double>(s, v), 2.0 * 1.8 + 3.0 * 1.1));

  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("sampling.h: all checks passed\n");
  return EXIT_SUCCESS;
}
