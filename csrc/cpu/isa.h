// Run-time choice between the two builds of a CPU kernel source (csrc/cpu/isa_builds.h makes
// them): the baseline ISA build k_default and, on x86-64 GCC, the AVX2 build k_avx2, taken when
// the CPU has AVX2. NORMKERNELS_CPU_ISA=baseline forces the baseline build (tests compare the
// two builds bit for bit). The builds' lanes: vec8.h (included here, at file scope).
#pragma once
#include <cstdlib>
#include <string>

#include "vec8.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NK_HAVE_AVX2_BUILD 1
#else
#define NK_HAVE_AVX2_BUILD 0
#endif

namespace normkernels {

inline bool cpu_use_avx2() {
#if NK_HAVE_AVX2_BUILD
  static const bool ok = [] {
    const char* isa = std::getenv("NORMKERNELS_CPU_ISA");
    return __builtin_cpu_supports("avx2") && !(isa && std::string(isa) == "baseline");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace normkernels

// NK_CALL(f, args...): f of the AVX2 build when cpu_use_avx2(), else of the baseline build
// (k_avx2 / k_default: the namespaces isa_builds.h opens where it is included).
#if NK_HAVE_AVX2_BUILD
#define NK_CALL(fn, ...) \
  (::normkernels::cpu_use_avx2() ? k_avx2::fn(__VA_ARGS__) : k_default::fn(__VA_ARGS__))
#else
#define NK_CALL(fn, ...) k_default::fn(__VA_ARGS__)
#endif
