// Shared host-side helpers of the L2BN pass ops (definitions in csrc/l2bn.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common.h"

namespace normkernels {
namespace l2bn {

// Checks a per-(n, c) coefficient (shape (N, C), same device) and returns it contiguous in the
// accumulation dtype.
at::Tensor coef(const at::Tensor& t, const View3& v, const char* op, const char* name);

// The checked, layout-matched operands of l2bn_apply (shared by the CPU and CUDA bodies).
struct ApplyArgs {
  View3 v;
  at::Tensor center, x_coef, offset;  // (N, C), accumulation dtype, contiguous
  at::Tensor dy, dy_coef;             // undefined unless has_dy
  bool has_dy;
};
ApplyArgs apply_args(const at::Tensor& x, const at::Tensor& center, const at::Tensor& x_coef,
                     const at::Tensor& offset, const std::optional<at::Tensor>& dy,
                     const std::optional<at::Tensor>& dy_coef);

}  // namespace l2bn
}  // namespace normkernels
