// The kernel source named by NK_ISA_KERNELS (a quoted file name beside this one) compiled for two
// instruction sets, inside the includer's namespace: namespace k_default (the baseline ISA) and,
// where isa.h has NK_HAVE_AVX2_BUILD, namespace k_avx2 under `#pragma GCC target("avx2")`; NK_CALL
// (isa.h) picks one at run time. The kernel source sees NK_AVX2 = 0 / 1 and the build's lanes
// (vec8.h's second part: V8<T>, M8<T>, splat, load8, store8 of 16- / 32-byte native vectors).
// No include guard: included once per kernel source, after isa.h.
#ifndef NK_ISA_KERNELS
#error "define NK_ISA_KERNELS (the kernel source to build) before including isa_builds.h"
#endif
namespace k_default {
#define NK_AVX2 0
#include "vec8.h"
#include NK_ISA_KERNELS
#undef NK_AVX2
}  // namespace k_default
#if NK_HAVE_AVX2_BUILD
#pragma GCC push_options
#pragma GCC target("avx2")
namespace k_avx2 {
#define NK_AVX2 1
#include "vec8.h"
#include NK_ISA_KERNELS
#undef NK_AVX2
}  // namespace k_avx2
#pragma GCC pop_options
#endif
#undef NK_ISA_KERNELS
