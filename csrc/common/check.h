// DBSAM_CHECK / DBSAM_CHECK_VALUE / DBSAM_CHECK_TYPE: TORCH_CHECK* whose message this file builds.
//
// Why not TORCH_CHECK's own formatting: on the GPU machine (Ubuntu 24.04, gcc 13.3, torch
// 2.11.0+cu130, Python 3.12; 2026-11-27, two runs) every check in this extension whose message
// streamed a number (an int64, or sizes()) into c10::str's std::ostringstream crashed the process
// with SIGSEGV instead of raising, while checks whose messages held only text, dtypes and devices
// (no numeric insertion: Device and ScalarType print as strings) raised normally. The same build
// against the same torch with gcc 12 here raised every time, so the crash sits in the numeric
// ostream path of that toolchain/runtime mix. Numbers are formatted with std::to_string (no
// locale, no stream) and shapes by shape_str, so a message reaches c10 as one std::string.
// Not yet confirmed on the GPU machine: the next run of benchmarks/gpu_check.sh does
// (tests_cuda: test_bad_dtypes_and_shapes_raise; tests: test_native_checks_reject_bad_calls).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

namespace dbsam {

inline std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(static_cast<long long>(sizes[i]));
  }
  return s + "]";
}

template <typename T>
std::string message_piece(const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_integral_v<T>) {
    return std::to_string(v);
  } else if constexpr (std::is_same_v<T, c10::IntArrayRef>) {
    return shape_str(v);
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    return std::string(std::string_view(v));
  } else if constexpr (std::is_same_v<T, c10::ScalarType>) {
    return c10::toString(v);
  } else if constexpr (std::is_same_v<T, c10::Device>) {
    return v.str();
  } else {
    static_assert(!sizeof(T), "dbsam::message: add a case for this type (no std::ostream numerics)");
  }
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (s += ... += message_piece(args));
  return s;
}

}  // namespace dbsam

#define DBSAM_CHECK(cond, ...) TORCH_CHECK(cond, ::dbsam::message(__VA_ARGS__))
#define DBSAM_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::dbsam::message(__VA_ARGS__))
#define DBSAM_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::dbsam::message(__VA_ARGS__))
