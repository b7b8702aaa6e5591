// A host bfloat16 (round to nearest even, NaN kept NaN) standing in for c10::BFloat16 in the
// emulated kernel tests: the kernels only convert it to and from float, so the 2-byte element paths
// (alignment, packing VEC of them into one access, rounding the outputs) run on the CPU as they run
// on the GPU. Not c10's type: the C++ tests do not depend on torch.
#pragma once

#include <cstdint>
#include <cstring>

struct bf16 {
  uint16_t x;
  bf16() = default;
  explicit bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      x = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    } else {
      x = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  explicit bf16(double d) : bf16(static_cast<float>(d)) {}
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};
static_assert(sizeof(bf16) == 2, "two bytes, as on the GPU");
