// Shared host-side helpers of the L2BN pass ops (definitions in csrc/l2bn.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace normkernels {
namespace l2bn {

// Memory layout of x seen as (N, C, S), S = prod(spatial):
//   NCS: strides (C*S, S, 1)  (contiguous)
//   NSC: strides (S*C, 1, C)  (4d channels_last, or the 3d equivalent)
enum class Layout { NCS, NSC };

struct View3 {
  at::Tensor x;  // dense tensor in `layout` (the input itself, or a contiguous copy)
  int64_t N, C, S;
  Layout layout;
};

// Accumulation dtype: double for double, float otherwise.
at::ScalarType acc_type(at::ScalarType t);
// Checks rank >= 2 and a floating dtype; picks the layout (copies to contiguous only for
// layouts other than NCS / NSC).
View3 make_view(const at::Tensor& x, const char* op);
// Returns t (same shape as v.x) with exactly v.x's strides (copy only when they differ).
at::Tensor match_layout(const at::Tensor& t, const View3& v, const char* op, const char* name);
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
