// The activations a normalization kernel can apply in its elementwise pass (y = act(pre)) and
// their derivatives (the backward passes recompute pre and use g = act'(pre) * dy), written once
// for host and device code. Kinks follow torch: relu'(0) = 0 (threshold_backward on the result),
// leaky_relu'(0) = negative_slope (leaky_relu_backward: pre > 0 ? 1 : slope).
// Selects pick a value or a constant, never an expression (leaky_relu multiplies by the selected
// factor, exactly the same values): with IEEE trapping math a compiler will not evaluate an
// expression of the other branch speculatively, and emits a branch per element instead, which
// on CPU is mispredicted half the time and blocks vectorization.
// One formula for a value and for lanes: the formulas are templates on T, written with if_else
// (c ? a : b), act_exp and T(c) for a constant, which csrc/cpu/vec8.h provides for the CPU
// kernels' 8 lanes (Vec8: a lane mask selects, T(c) is c in every lane); so a lane computes what
// the scalar function computes, bit for bit.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

namespace normkernels {

enum class Act : int { Identity = 0, ReLU = 1, LeakyReLU = 2, SiLU = 3 };

// The op schemas take the activation by name ("identity", "relu", "leaky_relu", "silu").
inline Act parse_act(std::string_view name, const char* op) {
  if (name == "identity") return Act::Identity;
  if (name == "relu") return Act::ReLU;
  if (name == "leaky_relu") return Act::LeakyReLU;
  if (name == "silu") return Act::SiLU;
  TORCH_CHECK_VALUE(false, op, ": act must be 'identity', 'relu', 'leaky_relu' or 'silu', got '",
                    std::string(name), "'");
}

// exp of a float on the host, branch-free so that the CPU loops vectorize (libm's expf is a call
// per element, which made a fused SiLU slower than an unfused one): Cody-Waite reduction
// x = n ln2 + r, Cephes' degree-7 polynomial for e^r, 2^n from the exponent bits. Relative error
// within ~2 ulp of expf on [-87.3, 88.7]; 0 below, +inf above, NaN stays NaN.
// Written once for a float (F = float, I = int32_t: exp_float_host) and for lanes of floats (F, I
// GCC vector types of float / int32_t of the same width: act_exp of the CPU kernels' lanes,
// csrc/cpu/vec8.h): the same IEEE operations lane by lane (no FMA contraction where the
// target has none), so every lane equals exp_float_host of its value bit for bit. to_int(n)
// truncates like static_cast<int32_t> (__builtin_convertvector for the lanes).
template <typename F, typename I, typename ToInt>
C10_ALWAYS_INLINE F exp_float_lanes(F x, ToInt to_int) {
  static_assert(sizeof(F) == sizeof(I), "float and int lanes of one width");
  const F hi = F{} + 88.7228f, lo = F{} + -87.3365f;  // F{} + c: c (or c in every lane)
  const F xc = x > hi ? hi : (x < lo ? lo : x);
  const F shifter = F{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const F n = (xc * 1.44269504088896341f + shifter) - shifter;
  const F r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  // e^r = 1 + r + r^2 p(r), p = c0 + c1 r + ... + c5 r^5 by Estrin's scheme (pairs, then powers
  // of r^2): a dependency chain half as long as Horner's, which is what bounds the lanes' loops
  const F r2 = r * r, r4 = r2 * r2;
  const F q0 = r * 1.6666665459e-1f + 5.0000001201e-1f;
  const F q1 = r * 8.3334519073e-3f + 4.1665795894e-2f;
  const F q2 = r * 1.9875691500e-4f + 1.3981999507e-3f;
  const F p = ((q0 + r2 * q1) + r4 * q2) * r2 + r + 1.0f;
  // 2^n as two normal factors 2^(n/2) 2^(n - n/2) (n in [-126, 128] reaches past both ends of
  // the single-float exponent range)
  const I ni = to_int(n), n1 = ni / 2;
  const I b1 = (n1 + 127) << 23, b2 = (ni - n1 + 127) << 23;
  F s1, s2;
  std::memcpy(&s1, &b1, sizeof(s1));
  std::memcpy(&s2, &b2, sizeof(s2));
  const F e = (p * s1) * s2;
  const F inf = F{} + static_cast<float>(INFINITY), zero = F{};
  return x > hi ? inf : (x < lo ? zero : e);
}

struct TruncToInt32 {
  int32_t operator()(float n) const { return static_cast<int32_t>(n); }
};

inline float exp_float_host(float x) { return exp_float_lanes<float, int32_t>(x, TruncToInt32{}); }

// The formulas are always inlined on the host: the CPU kernels' lanes (vec8.h) must never be
// passed to an out-of-line copy, which is default-target code, where a 32-byte vector argument
// of the AVX2 build has another calling convention (a register with AVX, memory without).
#if defined(__CUDACC__)
#define NK_ACT_INLINE C10_HOST_DEVICE inline
#else
#define NK_ACT_INLINE C10_ALWAYS_INLINE
#endif

// c ? a : b (a and b values, never expressions; vec8.h: lane by lane by a lane mask)
template <typename T>
NK_ACT_INLINE T if_else(bool c, T a, T b) {
  return c ? a : b;
}

template <typename T>
NK_ACT_INLINE T act_exp(T v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  if constexpr (std::is_same_v<T, float>) {
    return exp_float_host(v);
  } else {
    return std::exp(v);
  }
#endif
}

// 1 + e^-v: sigmoid(v) = 1 / den and silu(v) = v / den (one division either way, as torch's CPU
// silu; no multiply after the division, which ends the longest dependency chain of the loops)
template <typename T>
NK_ACT_INLINE T act_sigmoid_den(T v) {
  return T(1) + act_exp(-v);
}

template <typename T>
NK_ACT_INLINE T act_sigmoid(T v) {
  return T(1) / act_sigmoid_den(v);
}

// act(pre) of a compile-time activation A; `slope` is leaky_relu's negative slope (ignored by
// the others).
template <Act A, typename T>
NK_ACT_INLINE T act_forward(T pre, T slope) {
  if constexpr (A == Act::ReLU) {
    return if_else(pre < T(0), T(0), pre);  // NaN stays NaN, as torch.relu
  } else if constexpr (A == Act::LeakyReLU) {
    return pre * if_else(pre > T(0), T(1), slope);
  } else if constexpr (A == Act::SiLU) {
    return pre / act_sigmoid_den(pre);
  } else {
    return pre;
  }
}

// act'(pre) * dy of a compile-time activation A.
template <Act A, typename T>
NK_ACT_INLINE T act_backward(T pre, T slope, T dy) {
  if constexpr (A == Act::ReLU) {
    return if_else(pre > T(0), dy, T(0));
  } else if constexpr (A == Act::LeakyReLU) {
    return dy * if_else(pre > T(0), T(1), slope);
  } else if constexpr (A == Act::SiLU) {
    const T s = act_sigmoid(pre);
    return dy * s * (T(1) + pre * (T(1) - s));
  } else {
    return dy;
  }
}

// The same of a run-time activation.
template <typename T>
NK_ACT_INLINE T act_forward(Act act, T pre, T slope) {
  switch (act) {
    case Act::ReLU:
      return act_forward<Act::ReLU>(pre, slope);
    case Act::LeakyReLU:
      return act_forward<Act::LeakyReLU>(pre, slope);
    case Act::SiLU:
      return act_forward<Act::SiLU>(pre, slope);
    default:
      return pre;
  }
}

template <typename T>
NK_ACT_INLINE T act_backward(Act act, T pre, T slope, T dy) {
  switch (act) {
    case Act::ReLU:
      return act_backward<Act::ReLU>(pre, slope, dy);
    case Act::LeakyReLU:
      return act_backward<Act::LeakyReLU>(pre, slope, dy);
    case Act::SiLU:
      return act_backward<Act::SiLU>(pre, slope, dy);
    default:
      return dy;
  }
}

}  // namespace normkernels
