// normkernels::running_stats_update_ on CPU (semantics: csrc/running_stats.cpp).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../running_stats.h"

namespace normkernels {
namespace running_stats {
namespace {

// buf = (1 - f) buf + fb * batch, in opmath_t.
template <typename opmath_t>
void blend(const at::Tensor& buf, const at::Tensor& batch, opmath_t one_minus_f, opmath_t fb) {
  const int64_t n = buf.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "running_stats", [&] {
    using buf_t = scalar_t;
    buf_t* b = buf.data_ptr<buf_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, batch.scalar_type(), "running_stats", [&] {
      const scalar_t* s = batch.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i)
        b[i] = static_cast<buf_t>(one_minus_f * static_cast<opmath_t>(b[i]) +
                                  fb * static_cast<opmath_t>(s[i]));
    });
  });
}

template <typename opmath_t>
void update(const Args& a, double momentum, double unbias) {
  opmath_t f = static_cast<opmath_t>(momentum);
  if (a.count.defined()) {
    int64_t* n = a.count.data_ptr<int64_t>();
    *n += 1;
    if (momentum < 0) f = opmath_t(1) / static_cast<opmath_t>(*n);
  }
  const opmath_t one_minus_f = opmath_t(1) - f;
  blend<opmath_t>(a.mean, a.batch_mean, one_minus_f, f);
  blend<opmath_t>(a.var, a.batch_var, one_minus_f, f * static_cast<opmath_t>(unbias));
}

void update_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& batch_mean,
                const at::Tensor& batch_var, double momentum, double unbias) {
  const Args a = check(running_mean, running_var, num_batches_tracked, batch_mean, batch_var,
                       momentum, "running_stats_update_");
  if (a.f64)
    update<double>(a, momentum, unbias);
  else
    update<float>(a, momentum, unbias);
}

}  // namespace
}  // namespace running_stats
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, CPU, m) {
  m.impl("running_stats_update_", &normkernels::running_stats::update_cpu);
}
