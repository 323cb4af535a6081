// Host-side helpers shared by every op (declarations and contracts in csrc/common.h).
#include "common.h"

namespace normkernels {

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

static bool is_nsc_3d(const at::Tensor& x) {
  // (N, C, L) with strides (L*C, 1, C); strides of size-1 dims are irrelevant.
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2);
  if (C != 1 && x.stride(1) != 1) return false;
  if (L != 1 && x.stride(2) != C) return false;
  if (N != 1 && x.stride(0) != C * L) return false;
  return true;
}

View3 make_view(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": expected x of rank >= 2 (N, C, *spatial), got rank ",
                    x.dim());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": expected a floating point x, got ", x.scalar_type());
  View3 v;
  v.N = x.size(0);
  v.C = x.size(1);
  v.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) v.S *= x.size(d);
  if (x.is_contiguous()) {
    v.x = x;
    v.layout = Layout::NCS;
  } else if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    v.x = x;
    v.layout = Layout::NSC;
  } else if (x.dim() == 3 && is_nsc_3d(x)) {
    v.x = x;
    v.layout = Layout::NSC;
  } else {
    v.x = x.contiguous();
    v.layout = Layout::NCS;
  }
  return v;
}

at::Tensor match_layout(const at::Tensor& t, const View3& v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == v.x.sizes(), op, ": ", name, " must have the shape of x ",
                    v.x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == v.x.device(), op, ": ", name, " must be on ", v.x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == v.x.scalar_type(), op, ": ", name, " must have dtype ",
                   v.x.scalar_type(), ", got ", t.scalar_type());
  if (t.strides() == v.x.strides()) return t;
  // Same-strides check is stricter than needed for size-1 dims; also accept equal layouts.
  if (v.layout == Layout::NCS && t.is_contiguous()) return t;
  if (v.layout == Layout::NSC && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast))
    return t;
  if (v.layout == Layout::NSC && t.dim() == 3 && is_nsc_3d(t)) return t;
  at::Tensor out = at::empty_like(v.x);
  out.copy_(t);
  return out;
}

}  // namespace normkernels
