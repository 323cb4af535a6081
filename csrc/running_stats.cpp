// normkernels::running_stats_update_: the running-statistics update of every layer, a separate
// mutating op (the layer ops are functional so that autograd and torch.compile can see them).
//
//   running_stats_update_(running_mean!, running_var!, num_batches_tracked!?, batch_mean,
//                         batch_var, momentum, unbias)
//   if num_batches_tracked is given it is incremented by 1 first;
//   f = momentum if momentum >= 0, else 1 / num_batches_tracked (the cumulative average of
//   momentum=None; read on the device, no host sync);
//   running_mean = (1 - f) running_mean + f batch_mean;
//   running_var  = (1 - f) running_var + (f unbias) batch_var.
// A complex running_mean (SBN's spectral mean) is updated as its real view: batch_mean is then
// (C, 2) [re, im]. Arithmetic in float32, float64 when any operand is float64; results written in
// the buffers' dtypes. Bodies: csrc/cpu/running_stats_cpu.cpp, csrc/cuda/running_stats_cuda.cu;
// fake kernel and torch fallback: normkernels/ops/running_stats.py.
#include <torch/library.h>

#include "common.h"
#include "running_stats.h"

namespace normkernels {
namespace running_stats {

static void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a float tensor, got ", t.scalar_type());
}

Args check(const at::Tensor& running_mean, const at::Tensor& running_var,
           const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& batch_mean,
           const at::Tensor& batch_var, double momentum, const char* op) {
  Args a;
  a.mean = running_mean.is_complex() ? at::view_as_real(running_mean) : running_mean;
  a.var = running_var;
  check_float(a.mean, op, "running_mean");
  check_float(a.var, op, "running_var");
  check_float(batch_mean, op, "batch_mean");
  check_float(batch_var, op, "batch_var");
  TORCH_CHECK_VALUE(a.var.dim() == 1, op, ": running_var must have shape (C,), got ", a.var.sizes());
  const int64_t C = a.var.size(0);
  const bool complex = running_mean.is_complex();
  TORCH_CHECK_VALUE(running_mean.dim() == 1 && running_mean.size(0) == C, op,
                    ": running_mean must have shape (C,) = (", C, ",), got ", running_mean.sizes());
  TORCH_CHECK_VALUE(batch_mean.sizes() == a.mean.sizes(), op, ": batch_mean must have shape ",
                    a.mean.sizes(), complex ? " ([re, im] of the complex running_mean)" : "",
                    ", got ", batch_mean.sizes());
  TORCH_CHECK_VALUE(batch_var.sizes() == a.var.sizes(), op, ": batch_var must have shape (", C,
                    ",), got ", batch_var.sizes());
  TORCH_CHECK_TYPE(a.mean.scalar_type() == a.var.scalar_type(), op,
                   ": running_mean (its real view) and running_var must share a dtype, got ",
                   a.mean.scalar_type(), " and ", a.var.scalar_type());
  TORCH_CHECK_TYPE(batch_mean.scalar_type() == batch_var.scalar_type(), op,
                   ": batch_mean and batch_var must share a dtype, got ", batch_mean.scalar_type(),
                   " and ", batch_var.scalar_type());
  TORCH_CHECK_VALUE(a.mean.is_contiguous() && a.var.is_contiguous(), op,
                    ": running_mean and running_var must be contiguous");
  const auto dev = a.var.device();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&a.mean, &batch_mean, &batch_var})
    TORCH_CHECK_VALUE(t->device() == dev, op, ": every tensor must be on ", dev, ", got one on ",
                      t->device());
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    a.count = *num_batches_tracked;
    TORCH_CHECK_TYPE(a.count.scalar_type() == at::kLong, op,
                     ": num_batches_tracked must be int64, got ", a.count.scalar_type());
    TORCH_CHECK_VALUE(a.count.numel() == 1 && a.count.device() == dev, op,
                      ": num_batches_tracked must be one element on ", dev);
  }
  TORCH_CHECK_VALUE(momentum >= 0 || a.count.defined(), op,
                    ": momentum < 0 (cumulative average, momentum=None) needs num_batches_tracked");
  a.batch_mean = batch_mean.contiguous();
  a.batch_var = batch_var.contiguous();
  a.f64 = false;
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&a.mean, &a.var, &a.batch_mean, &a.batch_var})
    a.f64 = a.f64 || t->scalar_type() == at::kDouble;
  return a;
}

}  // namespace running_stats
}  // namespace normkernels

TORCH_LIBRARY_FRAGMENT(NORMKERNELS_LIBRARY, m) {
  m.def(
      "running_stats_update_(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!)? num_batches_tracked, Tensor batch_mean, Tensor batch_var, float momentum, "
      "float unbias) -> ()");
}
