// A second copy of a CPU kernel compiled for AVX2 + FMA, picked at run time.
//
// The extension is built for the compiler's baseline ISA (SSE2 on x86-64): `pip install .` must give
// a module that runs on any x86-64 machine its user copies it to. An AVX2 build of the MSDA CPU
// kernels ran their forward 1.3-1.55x faster here (benchmarks/NOTES.md section 11), so the hot
// per-range functions exist twice: `name_baseline` and `DBSAM_TARGET_AVX2 name_avx2`, both calling
// one DBSAM_ALWAYS_INLINE body. The target attribute applies to the annotated function only: the
// body and the header code it inlines are compiled for AVX2 inside it, while every out-of-line copy
// of an inline function (the ones the linker may share with other translation units) stays
// baseline, so no AVX2 instruction can run on a CPU without it.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DBSAM_HAVE_AVX2_PATH 1
#define DBSAM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DBSAM_HAVE_AVX2_PATH 0
#define DBSAM_TARGET_AVX2
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DBSAM_ALWAYS_INLINE inline __attribute__((always_inline))
#define DBSAM_RESTRICT __restrict__
#else
#define DBSAM_ALWAYS_INLINE inline
#define DBSAM_RESTRICT __restrict  // MSVC's spelling
#endif

namespace dbsam {

// Whether this build has the AVX2 copies and this CPU can run them.
inline bool cpu_avx2_available() {
#if DBSAM_HAVE_AVX2_PATH
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// The copy to run now: AVX2 where available, unless DBSAM_CPU_SIMD=baseline (read at every call, so
// that the tests run both copies in one process).
inline bool cpu_use_avx2() {
  const char* e = std::getenv("DBSAM_CPU_SIMD");
  if (e != nullptr && std::strcmp(e, "baseline") == 0) return false;
  return cpu_avx2_available();
}

}  // namespace dbsam
