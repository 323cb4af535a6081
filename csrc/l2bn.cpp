// L2BN pass ops: schemas, shared host checks, and the Python module init of normkernels._C.
//
// The kernels do only the heavy passes over x; the finalize math (per-sample norms, channel
// statistics, forward/backward coefficients) lives once in normkernels/ops/l2bn.py.
#include <Python.h>

#include <torch/library.h>

#include "l2bn.h"

// `import normkernels._C` loads this shared library, which runs the static op registrations
// below (same pattern as pytorch/extension-cpp). Defined here once for the whole extension.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "normkernels C++/CUDA ops (registered with torch.library as torch.ops.normkernels.*)",
      -1,    // size of per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

namespace normkernels {
namespace l2bn {

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

at::Tensor coef(const at::Tensor& t, const View3& v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == v.N && t.size(1) == v.C, op, ": ", name,
                    " must have shape (N, C) = (", v.N, ", ", v.C, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == v.x.device(), op, ": ", name, " must be on ", v.x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be floating point");
  return t.to(acc_type(v.x.scalar_type())).contiguous();
}

ApplyArgs apply_args(const at::Tensor& x, const at::Tensor& center, const at::Tensor& x_coef,
                     const at::Tensor& offset, const std::optional<at::Tensor>& dy,
                     const std::optional<at::Tensor>& dy_coef) {
  const char* op = "l2bn_apply";
  ApplyArgs a{make_view(x, op), {}, {}, {}, {}, {}, dy.has_value()};
  TORCH_CHECK_VALUE(dy.has_value() == dy_coef.has_value(), op,
                    ": dy and dy_coef must be given together");
  a.center = coef(center, a.v, op, "center");
  a.x_coef = coef(x_coef, a.v, op, "x_coef");
  a.offset = coef(offset, a.v, op, "offset");
  if (a.has_dy) {
    a.dy = match_layout(*dy, a.v, op, "dy");
    a.dy_coef = coef(*dy_coef, a.v, op, "dy_coef");
  }
  return a;
}

}  // namespace l2bn
}  // namespace normkernels

// FRAGMENT rather than TORCH_LIBRARY so that other layers' .cpp files (SBN, ...) and the Python
// torch.library.custom_op registrations can add ops to the same "normkernels" namespace.
TORCH_LIBRARY_FRAGMENT(normkernels, m) {
  // Per-(n, c) mean and centered sum of squares (M2) of x over S: (N, C) each, float32
  // (float64 for float64 x).
  m.def("l2bn_sample_stats(Tensor x) -> (Tensor mean, Tensor m2)");
  // pc[n, c] = sum_s dy * (x - center[n, c]),  q[n, c] = sum_s dy.
  m.def("l2bn_backward_sums(Tensor dy, Tensor x, Tensor center) -> (Tensor pc, Tensor q)");
  // out = x_coef * (x - center) + offset (+ dy_coef * dy), per-(n, c) coefficients; x's dtype
  // and memory format (contiguous for layouts other than NCS / NSC).
  m.def(
      "l2bn_apply(Tensor x, Tensor center, Tensor x_coef, Tensor offset, Tensor? dy=None, "
      "Tensor? dy_coef=None) -> Tensor");
}
