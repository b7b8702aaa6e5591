// Shapes for error messages, formatted by hand rather than by streaming `sizes()` into TORCH_CHECK.
// Why: on the GPU machine (torch 2.11.0+cu130, Python 3.12, 2026-11-27) every check whose message
// streamed an IntArrayRef crashed the process with SIGSEGV instead of raising, while checks that
// streamed only numbers, dtypes and devices raised normally; the same build against the same torch
// here raised. Building the string from plain integers keeps the message path to std::string alone.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace dbsam {

inline std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(static_cast<long long>(sizes[i]));
  }
  return s + "]";
}

}  // namespace dbsam
