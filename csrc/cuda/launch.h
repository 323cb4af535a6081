// The CUDA API the kernels of csrc/cuda/ use, and the one way their host code launches a kernel
// (no `<<<>>>` at call sites). nvcc: the CUDA runtime and c10's CUDA helpers, a plain <<<>>>
// launch or cudaLaunchCooperativeKernel. NORMKERNELS_CUDA_EMULATION (the CPU test build of
// tests/test_cuda_emulated.py): the same names from tools/cuda_emu/cuda_emu.h, which runs every
// block's threads as host threads -- so the very same host code and kernels run on the CPU.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#if defined(NORMKERNELS_CUDA_EMULATION)
#include "cuda_emu.h"  // found through -I tools/cuda_emu
// The emulated kernels register for CPU tensors under a test-only library (same schemas).
#define NORMKERNELS_CUDA_KEY CPU
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#define NORMKERNELS_CUDA_KEY CUDA
#endif

namespace normkernels {
namespace cuda {

// kernel<<<grid, block, 0, stream>>>(args...).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t grid, int block, cudaStream_t stream,
            Args&&... args) {
  TORCH_CHECK(grid >= 1 && grid <= INT32_MAX, "launch: grid of ", grid, " blocks");
#if defined(NORMKERNELS_CUDA_EMULATION)
  nk_emu::launch(false, kernel, grid, block, std::forward<Args>(args)...);
#else
  kernel<<<dim3(static_cast<unsigned>(grid)), dim3(block), 0, stream>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// A cooperative launch (grid-wide barriers allowed): every block must be co-resident, so grid <=
// SMs x resident_blocks(kernel, block).
template <typename... Params, typename... Args>
void launch_cooperative(void (*kernel)(Params...), int64_t grid, int block, cudaStream_t stream,
                        Args&&... args) {
  TORCH_CHECK(grid >= 1 && grid <= INT32_MAX, "launch_cooperative: grid of ", grid, " blocks");
#if defined(NORMKERNELS_CUDA_EMULATION)
  nk_emu::launch(true, kernel, grid, block, std::forward<Args>(args)...);
#else
  std::tuple<Params...> params(std::forward<Args>(args)...);
  std::apply(
      [&](auto&... p) {
        void* ptrs[] = {static_cast<void*>(&p)...};
        C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel),
                                                   dim3(static_cast<unsigned>(grid)), dim3(block),
                                                   ptrs, 0, stream));
      },
      params);
#endif
}

// Blocks of `kernel` (with `block` threads, no dynamic shared memory) resident per SM of the
// current device: the occupancy calculator's answer, queried once per (device, kernel, block).
template <typename... Params>
int resident_blocks(void (*kernel)(Params...), int block) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int>, int> cache;
  const int dev = c10::cuda::current_device();
  const auto key = std::make_tuple(dev, reinterpret_cast<const void*>(kernel), block);
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int nb = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &nb, reinterpret_cast<const void*>(kernel), block, 0));
    it = cache.emplace(key, nb).first;
  }
  return it->second;
}

}  // namespace cuda
}  // namespace normkernels
