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
#include <string_view>

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

template <typename T>
C10_HOST_DEVICE inline T act_sigmoid(T v) {
  return T(1) / (T(1) + ::exp(-v));
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
      return pre * act_sigmoid(pre);
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
