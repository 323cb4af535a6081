// normkernels::running_stats_update_ on CUDA (semantics: csrc/running_stats.cpp): one launch of
// one block. Every thread reads num_batches_tracked before thread 0 increments it (a barrier in
// between), so f = 1 / (count + 1) needs no host sync and no second launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "../running_stats.h"
#include "launch.h"

namespace normkernels {
namespace running_stats {
namespace {

constexpr int kThreads = 256;

template <typename opmath_t, typename mean_t, typename bm_t, typename var_t, typename bv_t>
__global__ void __launch_bounds__(kThreads)
    update_kernel(mean_t* __restrict__ mean, const bm_t* __restrict__ bmean, int64_t nm,
                  var_t* __restrict__ var, const bv_t* __restrict__ bvar, int64_t nv,
                  int64_t* __restrict__ count, double momentum, double unbias) {
  opmath_t f = static_cast<opmath_t>(momentum);
  if (count != nullptr) {
    const int64_t n = *count + 1;
    if (momentum < 0) f = opmath_t(1) / static_cast<opmath_t>(n);
    __syncthreads();  // every thread has read the old count
    if (threadIdx.x == 0) *count = n;
  }
  const opmath_t one_minus_f = opmath_t(1) - f;
  const opmath_t fu = f * static_cast<opmath_t>(unbias);
  for (int64_t i = threadIdx.x; i < nm; i += blockDim.x)
    mean[i] = static_cast<mean_t>(one_minus_f * static_cast<opmath_t>(mean[i]) +
                                  f * static_cast<opmath_t>(bmean[i]));
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x)
    var[i] = static_cast<var_t>(one_minus_f * static_cast<opmath_t>(var[i]) +
                                fu * static_cast<opmath_t>(bvar[i]));
}

// The buffers (one dtype: half / bfloat16 / float / double) and the batch statistics (one dtype:
// float / double) are dispatched separately.
template <typename opmath_t>
void launch(const Args& a, double momentum, double unbias, cudaStream_t stream) {
  int64_t* count = a.count.defined() ? a.count.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.var.scalar_type(), "running_stats", [&] {
    using buf_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(a.batch_var.scalar_type(), "running_stats", [&] {
      cuda::launch(&update_kernel<opmath_t, buf_t, scalar_t, buf_t, scalar_t>, 1, kThreads, stream,
                   a.mean.data_ptr<buf_t>(), a.batch_mean.const_data_ptr<scalar_t>(),
                   a.mean.numel(), a.var.data_ptr<buf_t>(), a.batch_var.const_data_ptr<scalar_t>(),
                   a.var.numel(), count, momentum, unbias);
    });
  });
}

void update_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                 const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& batch_mean,
                 const at::Tensor& batch_var, double momentum, double unbias) {
  const c10::cuda::CUDAGuard guard(running_var.device());
  const Args a = check(running_mean, running_var, num_batches_tracked, batch_mean, batch_var,
                       momentum, "running_stats_update_");
  TORCH_CHECK_TYPE(a.batch_var.scalar_type() == at::kFloat || a.batch_var.scalar_type() == at::kDouble,
                   "running_stats_update_: batch statistics must be float32 or float64 on CUDA, got ",
                   a.batch_var.scalar_type());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (a.f64)
    launch<double>(a, momentum, unbias, stream);
  else
    launch<float>(a, momentum, unbias, stream);
}

}  // namespace
}  // namespace running_stats
}  // namespace normkernels

TORCH_LIBRARY_IMPL(NORMKERNELS_LIBRARY, NORMKERNELS_CUDA_KEY, m) {
  m.impl("running_stats_update_", &normkernels::running_stats::update_cuda);
}
