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
