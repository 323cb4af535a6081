// The activations a normalization kernel can apply in its elementwise pass (y = act(pre)) and
// their derivatives (the backward passes recompute pre and use g = act'(pre) * dy), written once
// for host and device code. Kinks follow torch: relu'(0) = 0 (threshold_backward on the result),
// leaky_relu'(0) = negative_slope (leaky_relu_backward: pre > 0 ? 1 : slope).
// Selects pick a value or a constant, never an expression (leaky_relu multiplies by the selected
// factor, exactly the same values): with IEEE trapping math a compiler will not evaluate an
// expression of the other branch speculatively, and emits a branch per element instead, which
// on CPU is mispredicted half the time and blocks vectorization.
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
// GCC vector types of float / int32_t of the same width: the CPU kernels' explicit SIMD passes,
// csrc/cpu/l2bn_cpu_kernels.h): the same IEEE operations lane by lane (no FMA contraction where the
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

template <typename T>
C10_HOST_DEVICE inline T act_exp(T v) {
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
C10_HOST_DEVICE inline T act_sigmoid_den(T v) {
  return T(1) + act_exp(-v);
}

template <typename T>
C10_HOST_DEVICE inline T act_sigmoid(T v) {
  return T(1) / act_sigmoid_den(v);
}

// act(pre); `slope` is leaky_relu's negative slope (ignored by the others).
template <typename T>
C10_HOST_DEVICE inline T act_forward(Act act, T pre, T slope) {
  switch (act) {
    case Act::ReLU:
      return pre < T(0) ? T(0) : pre;  // NaN stays NaN, as torch.relu
    case Act::LeakyReLU:
      return pre * (pre > T(0) ? T(1) : slope);
    case Act::SiLU:
      return pre / act_sigmoid_den(pre);
    default:
      return pre;
  }
}

// act'(pre) * dy.
template <typename T>
C10_HOST_DEVICE inline T act_backward(Act act, T pre, T slope, T dy) {
  switch (act) {
    case Act::ReLU:
      return pre > T(0) ? dy : T(0);
    case Act::LeakyReLU:
      return dy * (pre > T(0) ? T(1) : slope);
    case Act::SiLU: {
      const T s = act_sigmoid(pre);
      return dy * s * (T(1) + pre * (T(1) - s));
    }
    default:
      return dy;
  }
}

}  // namespace normkernels
