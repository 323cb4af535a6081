// L2BN ops: schemas, the layouts they exchange, shared host checks, and the Python module init of
// normkernels._C. Math: csrc/l2bn_finalize.h (docs/DESIGN.md section 3). Kernels: csrc/cpu/l2bn_cpu.cpp,
// csrc/cuda/l2bn_cuda.cu; autograd: csrc/autograd/l2bn_autograd.cpp; fake kernels and the torch
// oracle with the same contracts: normkernels/ops/l2bn.py.
//
// x is (N, C, *spatial), viewed as (N, C, S); float16 / bfloat16 / float32 / float64; "acc" is
// float64 for float64 x, else float32 (the passes accumulate in it); the finalize computes in
// float64. y / dx have x's dtype and memory format (contiguous for layouts other than contiguous
// and channels_last). weight, bias, mean, var: (C,) of any float dtype, or None.
// act: "identity" | "relu" | "leaky_relu" | "silu" (csrc/activation.h), act_param = leaky_relu's
// negative slope (ignored otherwise); y = act(pre), and the backward recomputes pre from x and
// saved inside its passes (g = act'(pre) dy).
//
// Layouts:
//   saved  (SavedLayout{N, C}.numel(),) acc: see csrc/l2bn_finalize.h (center, m2, x_coef, offset,
//          cen planes (N, C); r, nrm (N); inv_s (C); n_all (1)).
//   stats  (2, N, C) acc: [m, m2], the statistics pass (per-row mean, centered sum of squares).
//   rows   (3, C) float64: [count, mean, M2] of u over this process's batch (Chan rows);
//          rows_all (P, 3, C): every process's rows, stacked (P = 1: this one).
//   sums   (2, N, C) acc: [Q, P] = [sum_s g, sum_s g (x - m)], the gradient-sums pass.
//   grad rows (2, C) float64: [sum_n Q, sum_n G]; grad rows_all (2, C): their sum over processes.
// The top-level ops are exactly the composition of the pieces (bitwise on one device):
//   l2bn_forward(x, w, b, mean, var, ...) = l2bn_finish(x, stats, rows[None] if training else
//       None, w, b, mean, var, ...) with (stats, rows) = l2bn_stats(x, l2_eps, rescale);
//   l2bn_backward(dy, x, w, saved, training, ...) = l2bn_grad_finish(dy, x, w, saved, sums, rows,
//       rows if training else None, ...) with (sums, rows) = l2bn_grad_stats(dy, x, saved, ...).
// GPU launches: forward = statistics pass, finalize, apply; backward = gradient sums, finalize,
// apply (the split rows' combine is folded into the finalize).
#include <Python.h>

#include <torch/library.h>

#include "l2bn.h"

// `import normkernels._C` loads this shared library, which runs the static op registrations
// (same pattern as pytorch/extension-cpp). Defined here once for the whole extension.
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

ChannelVec channel_vec(const std::optional<at::Tensor>& t, const View3& v, const char* op,
                       const char* name) {
  if (!t.has_value() || !t->defined()) return ChannelVec{};
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == v.C, op, ": ", name, " must have shape (C,) = (",
                    v.C, ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == v.x.device(), op, ": ", name, " is on ", t->device(),
                    " but x is on ", v.x.device());
  ChannelVec out;
  out.p = t->data_ptr();
  out.stride = t->stride(0);
  switch (t->scalar_type()) {
    case at::kHalf: out.dtype = VecDtype::Half; break;
    case at::kBFloat16: out.dtype = VecDtype::BFloat16; break;
    case at::kFloat: out.dtype = VecDtype::Float; break;
    case at::kDouble: out.dtype = VecDtype::Double; break;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float16, bfloat16, float32 or float64, got ",
                       t->scalar_type());
  }
  return out;
}

at::Tensor checked(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype,
                   const View3& v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == v.x.device(), op, ": ", name, " is on ", t.device(),
                    " but x is on ", v.x.device());
  return t.contiguous();
}

at::Tensor checked_saved(const at::Tensor& saved, const View3& v, const char* op) {
  return checked(saved, {layout_of(v).numel()}, acc_type(v.x.scalar_type()), v, op, "saved");
}

at::Tensor checked_rows_all(const at::Tensor& rows_all, int64_t fields, const View3& v,
                            const char* op) {
  TORCH_CHECK_VALUE(rows_all.dim() == 3 && rows_all.size(0) >= 1, op,
                    ": rows_all must have shape (P, ", fields, ", C), got ", rows_all.sizes());
  return checked(rows_all, {rows_all.size(0), fields, v.C}, at::kDouble, v, op, "rows_all");
}

}  // namespace l2bn
}  // namespace normkernels

// FRAGMENT rather than TORCH_LIBRARY so that other layers' .cpp files (SBN, ...) and the Python
// torch.library.custom_op registrations can add ops to the same "normkernels" namespace.
TORCH_LIBRARY_FRAGMENT(NORMKERNELS_LIBRARY, m) {
  // The whole layer, one op per direction (Autograd kernel: forward saves x and saved).
  // mean/var None: training (batch statistics); given: eval with them. batch_mean / batch_var
  // (C,) acc: the statistics used (biased batch variance in training).
  m.def(
      "l2bn_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? var, float eps, "
      "float l2_eps, bool rescale, str act, float act_param) -> "
      "(Tensor y, Tensor batch_mean, Tensor batch_var, Tensor saved)");
  // dweight, dbias (C,) acc. training: the forward used batch statistics.
  m.def(
      "l2bn_backward(Tensor dy, Tensor x, Tensor? weight, Tensor saved, bool training, str act, "
      "float act_param) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // Pieces of the synchronized path (normkernels/ops/l2bn.py l2bn_sync: one gather of rows in
  // the forward, one all_reduce of grad rows in the backward).
  m.def("l2bn_stats(Tensor x, float l2_eps, bool rescale) -> (Tensor stats, Tensor rows)");
  // rows_all given: training with the group's rows; mean/var given: eval; neither: training with
  // this batch alone (the local rows); both: error.
  m.def(
      "l2bn_finish(Tensor x, Tensor stats, Tensor? rows_all, Tensor? weight, Tensor? bias, "
      "Tensor? mean, Tensor? var, float eps, float l2_eps, bool rescale, str act, float act_param) "
      "-> (Tensor y, Tensor batch_mean, Tensor batch_var, Tensor saved)");
  m.def(
      "l2bn_grad_stats(Tensor dy, Tensor x, Tensor saved, str act, float act_param) -> "
      "(Tensor sums, Tensor rows)");
  // rows: this process's grad rows (dweight, dbias are this process's share); rows_all: their sum
  // over the group (the batch terms), None for eval (no batch terms).
  m.def(
      "l2bn_grad_finish(Tensor dy, Tensor x, Tensor? weight, Tensor saved, Tensor sums, "
      "Tensor rows, Tensor? rows_all, str act, float act_param) -> "
      "(Tensor dx, Tensor dweight, Tensor dbias)");
  // The statistics pass alone: (N, C) row means and centered sums of squares (acc). Used by the
  // tests of the passes and as the name normkernels/_backend.py probes for the CUDA kernels.
  m.def("l2bn_sample_stats(Tensor x) -> (Tensor mean, Tensor m2)");
}
