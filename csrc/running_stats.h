// Host-side checks of normkernels::running_stats_update_ shared by its CPU and CUDA bodies
// (schema and semantics: csrc/running_stats.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace normkernels {
namespace running_stats {

struct Args {
  at::Tensor mean, var;              // the buffers to update (mean as its real view: (C,) or (C, 2))
  at::Tensor batch_mean, batch_var;  // same shapes, contiguous
  at::Tensor count;                  // num_batches_tracked (int64, one element) or undefined
  bool f64;                          // arithmetic in float64 (a float64 operand), else float32
};

Args check(const at::Tensor& running_mean, const at::Tensor& running_var,
           const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& batch_mean,
           const at::Tensor& batch_var, double momentum, const char* op);

}  // namespace running_stats
}  // namespace normkernels
