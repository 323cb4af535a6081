// The CPU kernels' lanes: Vec8<T, B>, 8 lanes of T held as K = 8 / (B / sizeof(T)) native vectors
// of B bytes (GCC vector extensions), so that every operation is one instruction per native
// vector: B = 32 in the AVX2 build (1 ymm of floats, 2 ymm of doubles), B = 16 in the baseline
// build (2 xmm of floats, 4 xmm of doubles). Both kernel families (l2bn_cpu_kernels.h,
// sbn_cpu_kernels.h) use this one type, and the activations of csrc/activation.h run on it as
// written there (if_else and act_exp overloaded below): one formula for a value and for lanes.
//
// Why not one GCC vector of 8 lanes (vector_size(8 * sizeof(T)), the former SBN V8): where that
// is wider than the target's registers (floats in the baseline build, doubles in both), GCC 12
// lowers it through the stack (stores of 16-byte pieces reassembled by vmovq / vpinsrq). Loads and
// stores here are one native vector each through an unaligned may_alias vector type (as
// _mm256_loadu_ps): one vmovups ymm / movups xmm, never split (GCC 12's generic tuning does not
// split unaligned 256-bit loads; no vinsertf128 from memory in the AVX2 build).
// Lanes never cross a call: everything taking or returning them is always inlined (here and the
// formulas of activation.h), since an out-of-line copy is default-target code, where a 32-byte
// vector argument has another calling convention than in the AVX2 build.
// Every lane does the IEEE operations a scalar does, in the same order (no FMA: neither target
// enables it), so the two builds, the lanes and scalar tails agree bit for bit.
//
// Two parts. The types (first part) are defined once at file scope (isa.h includes this file):
// default-target always-inline templates, which the default-target formulas (pre_act of
// l2bn_finalize.h, activation.h) may inline, and which, inlined into a kernel of the AVX2 build,
// are compiled for AVX2. The build's names (second part: V8<T>, M8<T>, splat, load8, store8) are
// declared inside each build's namespace by isa_builds.h, which includes this file again there
// with NK_AVX2 = 0 / 1.
#ifndef NORMKERNELS_CPU_VEC8_TYPES
#define NORMKERNELS_CPU_VEC8_TYPES
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../activation.h"

namespace normkernels {

// NatVec<T, B>: the native vector of B bytes of T (type), its lane mask (mask: 0 or -1 per lane),
// the same vector for unaligned, aliasing memory access (u) and, for double, the floats of one
// vector (f, unaligned) for float -> double loads.
template <typename T, int B>
struct NatVec;
template <>
struct NatVec<float, 16> {
  typedef float type __attribute__((vector_size(16)));
  typedef int32_t mask __attribute__((vector_size(16)));
  typedef float u __attribute__((vector_size(16), aligned(4), may_alias));
};
template <>
struct NatVec<float, 32> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t mask __attribute__((vector_size(32)));
  typedef float u __attribute__((vector_size(32), aligned(4), may_alias));
};
template <>
struct NatVec<double, 16> {
  typedef double type __attribute__((vector_size(16)));
  typedef int64_t mask __attribute__((vector_size(16)));
  typedef double u __attribute__((vector_size(16), aligned(8), may_alias));
  typedef float f __attribute__((vector_size(8), aligned(4), may_alias));
};
template <>
struct NatVec<double, 32> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t mask __attribute__((vector_size(32)));
  typedef double u __attribute__((vector_size(32), aligned(8), may_alias));
  typedef float f __attribute__((vector_size(16), aligned(4), may_alias));
};

// 8 lanes of T. Vec8{} / `= {}`: zeros; Vec8(s): s in every lane (T(c) of the formulas).
template <typename T, int B>
struct Vec8 {
  using N = typename NatVec<T, B>::type;
  static constexpr int W = B / static_cast<int>(sizeof(T));  // lanes per native vector
  static constexpr int K = 8 / W;                             // native vectors
  N v[K];
  Vec8() = default;
  C10_ALWAYS_INLINE explicit Vec8(T s) {
    for (int k = 0; k < K; ++k) v[k] = N{} + s;
  }
  C10_ALWAYS_INLINE T operator[](int j) const { return v[j / W][j % W]; }
  C10_ALWAYS_INLINE void set(int j, T s) { v[j / W][j % W] = s; }
};
// Lane masks (0 or -1 per lane): comparisons, the first argument of if_else.
template <typename T, int B>
struct Mask8 {
  using N = typename NatVec<T, B>::mask;
  static constexpr int W = Vec8<T, B>::W, K = Vec8<T, B>::K;
  N v[K];
  C10_ALWAYS_INLINE bool operator[](int j) const { return v[j / W][j % W] != 0; }
  C10_ALWAYS_INLINE void set(int j, bool on) { v[j / W][j % W] = on ? -1 : 0; }
};

#define NK_VEC8_BINOP(op)                                                                    \
  template <typename T, int B>                                                               \
  C10_ALWAYS_INLINE Vec8<T, B> operator op(const Vec8<T, B>& a, const Vec8<T, B>& b) {       \
    Vec8<T, B> r;                                                                            \
    for (int k = 0; k < Vec8<T, B>::K; ++k) r.v[k] = a.v[k] op b.v[k];                       \
    return r;                                                                                \
  }                                                                                          \
  template <typename T, int B>                                                               \
  C10_ALWAYS_INLINE Vec8<T, B> operator op(const Vec8<T, B>& a, T b) {                       \
    Vec8<T, B> r;                                                                            \
    for (int k = 0; k < Vec8<T, B>::K; ++k) r.v[k] = a.v[k] op b;                            \
    return r;                                                                                \
  }                                                                                          \
  template <typename T, int B>                                                               \
  C10_ALWAYS_INLINE Vec8<T, B> operator op(T a, const Vec8<T, B>& b) {                       \
    Vec8<T, B> r;                                                                            \
    for (int k = 0; k < Vec8<T, B>::K; ++k) r.v[k] = a op b.v[k];                            \
    return r;                                                                                \
  }                                                                                          \
  template <typename T, int B>                                                               \
  C10_ALWAYS_INLINE Vec8<T, B>& operator op##=(Vec8<T, B>& a, const Vec8<T, B>& b) {         \
    for (int k = 0; k < Vec8<T, B>::K; ++k) a.v[k] = a.v[k] op b.v[k];                       \
    return a;                                                                                \
  }
NK_VEC8_BINOP(+)
NK_VEC8_BINOP(-)
NK_VEC8_BINOP(*)
NK_VEC8_BINOP(/)
#undef NK_VEC8_BINOP
template <typename T, int B>
C10_ALWAYS_INLINE Vec8<T, B> operator-(const Vec8<T, B>& a) {
  Vec8<T, B> r;
  for (int k = 0; k < Vec8<T, B>::K; ++k) r.v[k] = -a.v[k];
  return r;
}
#define NK_VEC8_CMP(op)                                                                  \
  template <typename T, int B>                                                           \
  C10_ALWAYS_INLINE Mask8<T, B> operator op(const Vec8<T, B>& a, const Vec8<T, B>& b) {  \
    Mask8<T, B> r;                                                                       \
    for (int k = 0; k < Vec8<T, B>::K; ++k) r.v[k] = a.v[k] op b.v[k];                   \
    return r;                                                                            \
  }
NK_VEC8_CMP(<)
NK_VEC8_CMP(>)
#undef NK_VEC8_CMP

// m ? a : b lane by lane (activation.h's if_else for lanes)
template <typename T, int B>
C10_ALWAYS_INLINE Vec8<T, B> if_else(const Mask8<T, B>& m, const Vec8<T, B>& a,
                                     const Vec8<T, B>& b) {
  Vec8<T, B> r;
  for (int k = 0; k < Vec8<T, B>::K; ++k) r.v[k] = m.v[k] ? a.v[k] : b.v[k];
  return r;
}

// activation.h's act_exp for lanes: float through exp_float_lanes (the lanes' form of
// exp_float_host, one native vector at a time), double lane by lane through std::exp (as the
// scalar act_exp<double>).
template <int B>
struct TruncLanes {  // exp_float_lanes' truncation: static_cast<int32_t> lane by lane
  using F = typename NatVec<float, B>::type;
  using I = typename NatVec<float, B>::mask;
  C10_ALWAYS_INLINE I operator()(F n) const { return __builtin_convertvector(n, I); }
};
template <int B>
C10_ALWAYS_INLINE Vec8<float, B> act_exp(const Vec8<float, B>& x) {
  using NV = NatVec<float, B>;
  Vec8<float, B> r;
  for (int k = 0; k < Vec8<float, B>::K; ++k)
    r.v[k] = exp_float_lanes<typename NV::type, typename NV::mask>(x.v[k], TruncLanes<B>{});
  return r;
}
template <int B>
C10_ALWAYS_INLINE Vec8<double, B> act_exp(const Vec8<double, B>& x) {
  Vec8<double, B> r;
  for (int j = 0; j < 8; ++j) r.set(j, std::exp(x[j]));
  return r;
}

// 8 values of p as lanes of T: same type, one unaligned native load per vector; float -> double,
// one conversion per vector; other types (half, bfloat16) converted value by value through float.
template <typename T, int B, typename S>
C10_ALWAYS_INLINE Vec8<T, B> lanes_load(const S* p) {
  using V = Vec8<T, B>;
  using NV = NatVec<T, B>;
  V r;
  if constexpr (std::is_same_v<S, T>) {
    for (int k = 0; k < V::K; ++k) r.v[k] = *reinterpret_cast<const typename NV::u*>(p + k * V::W);
  } else if constexpr (std::is_same_v<T, double> && std::is_same_v<S, float>) {
    for (int k = 0; k < V::K; ++k)
      r.v[k] = __builtin_convertvector(*reinterpret_cast<const typename NV::f*>(p + k * V::W),
                                       typename V::N);
  } else {
    T t[8];
    for (int j = 0; j < 8; ++j) t[j] = static_cast<T>(static_cast<float>(p[j]));
    r = lanes_load<T, B>(t);
  }
  return r;
}
// the lanes into 8 values at p (other types than T: value by value)
template <typename T, int B, typename S>
C10_ALWAYS_INLINE void lanes_store(S* p, const Vec8<T, B>& v) {
  using V = Vec8<T, B>;
  if constexpr (std::is_same_v<S, T>) {
    for (int k = 0; k < V::K; ++k)
      *reinterpret_cast<typename NatVec<T, B>::u*>(p + k * V::W) = v.v[k];
  } else {
    for (int j = 0; j < 8; ++j) p[j] = static_cast<S>(v[j]);
  }
}

// The fixed tree over 8 lanes (or 8 values of an array) of both kernel families.
template <typename A>
C10_ALWAYS_INLINE auto tree8(const A& v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

}  // namespace normkernels
#endif  // NORMKERNELS_CPU_VEC8_TYPES

// ---------------------------------------------------------------- the build's names
// Inside a build's namespace (isa_builds.h): V8<T> / M8<T> of this build's width and the short
// names of the kernels.
#ifdef NK_AVX2
constexpr int kVecBytes = NK_AVX2 ? 32 : 16;
template <typename T>
using V8 = Vec8<T, kVecBytes>;
template <typename T>
using M8 = Mask8<T, kVecBytes>;
template <typename T>
C10_ALWAYS_INLINE V8<T> splat(T s) {
  return V8<T>(s);
}
template <typename T, typename S>
C10_ALWAYS_INLINE V8<T> load8(const S* p) {
  return lanes_load<T, kVecBytes>(p);
}
template <typename T, typename S>
C10_ALWAYS_INLINE void store8(S* p, const V8<T>& v) {
  lanes_store<T, kVecBytes>(p, v);
}
#endif
