// CPU emulation of the part of CUDA that csrc/cuda/ uses, so that its kernels and host code compile
// as host C++ and run on CPU tensors (tests/test_cuda_emulated.py; DESIGN.md section 8).
//
// Execution model. Every thread of a block is a host thread (a pooled pthread); exactly one runs
// at a time and hands over at synchronization points only (a baton), in a fixed order, so a run
// is deterministic and a missing barrier shows the same way every time. A block's threads start
// in ascending order (so do the threads released by a grid sync); the threads released by a
// __syncthreads resume in descending, then ascending, then descending order...; a warp released
// by its shuffle runs on before any other thread: a
// reader that runs ahead of the writers, and a writer (a warp) that runs ahead into the next
// round before the readers, both happen within a round or two.
//   __syncthreads()         barrier over the block's threads, all at the same call
//   __shfl_*_sync(...)      per-warp exchange with barrier semantics (all 32 lanes, full mask)
//   this_grid().sync()      barrier over every thread of a cooperative launch
//   __shared__              static storage in one linker section, saved and restored per block
//                           when the baton moves between blocks; filled with 0xff bytes (NaN for
//                           float / double) when a block starts, so a read before a write shows
// A plain launch runs its blocks one after another; a cooperative one runs all of them at once
// and fails, like CUDA, when the grid exceeds SMs x resident blocks. A deadlock (threads waiting
// at different barriers) fails the launch with the place of every waiting thread.
// The emulated devices (a few SMs, small occupancy, with or without cooperative launch) are
// chosen by nk_emu::set_device (op normkernels_cuda_emu::emu_set_device), so that grid-stride
// loops, split rows and both finalize paths run on tiny tensors.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("nk_emu_shared")))

// ------------------------------------------------------------------------------- runtime types
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned int x_, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrCooperativeLaunch = 95 };
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel,
                                                         int block, size_t dynamic_smem);

#define C10_CUDA_CHECK(expr)                                                        \
  do {                                                                              \
    const cudaError_t nk_emu_err = (expr);                                          \
    TORCH_CHECK(nk_emu_err == cudaSuccess, "emulated CUDA error: ",                 \
                cudaGetErrorString(nk_emu_err));                                    \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_COMPILE_TIME_MAX_GPUS 16

namespace nk_emu {

// ------------------------------------------------------------------------------- devices
struct Device {
  int sms;              // multiprocessors
  int blocks_per_sm;    // the occupancy calculator's answer for every kernel
  bool cooperative;     // cudaDevAttrCooperativeLaunch
};
// The emulated devices; set_device picks the current one (index into this list).
int device_count();
const Device& device(int index);
void set_device(int index);
int current_device();

// ------------------------------------------------------------------------------- threads
struct ThreadCtx {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  int slot;  // index of this thread among the launch's running threads
};
ThreadCtx& ctx();  // the calling emulated thread's

// file:line of the __syncthreads call: CUDA leaves a barrier reached from different places
// undefined (hardware counts arrivals at any of them); here it fails the launch
void syncthreads(const char* file, int line);
void grid_sync();
// Exchange of 8-byte words within the warp: every lane gives `mine`, gets the word of lane
// src_of(lane) (its own where src_of returns -1).
uint64_t warp_exchange(uint64_t mine, int src_lane, const char* what);

// Runs body() on grid x block threads (see the top of this file). Throws c10::Error on a
// deadlock, a misused barrier or shuffle, or an exception in a thread.
void run_grid(bool cooperative, int64_t grid, int block, const std::function<void()>& body);

template <typename... Params, typename... Args>
void launch(bool cooperative, void (*kernel)(Params...), int64_t grid, int block,
            Args&&... args) {
  // kernel parameters by value, converted once as a <<<>>> launch converts them
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_grid(cooperative, grid, block, [&] { std::apply(kernel, params); });
}

template <typename T>
T shuffle(T v, int src_lane, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a word");
  uint64_t w = 0;
  std::memcpy(&w, &v, sizeof(T));
  w = warp_exchange(w, src_lane, what);
  T out;
  std::memcpy(&out, &w, sizeof(T));
  return out;
}

inline int lane_id() { return static_cast<int>(ctx().thread_idx.x % 32); }

}  // namespace nk_emu

#define threadIdx (::nk_emu::ctx().thread_idx)
#define blockIdx (::nk_emu::ctx().block_idx)
#define blockDim (::nk_emu::ctx().block_dim)
#define gridDim (::nk_emu::ctx().grid_dim)

#define __syncthreads() ::nk_emu::syncthreads(__FILE__, __LINE__)

// The shuffles of CUDA's programming guide (full mask only: the kernels here use no other).
inline void nk_emu_check_mask(unsigned mask, int width) {
  TORCH_CHECK(mask == 0xffffffffu, "emulated shuffle: only the full mask is supported");
  TORCH_CHECK(width > 0 && width <= 32 && (width & (width - 1)) == 0,
              "emulated shuffle: width must be a power of 2 <= 32, got ", width);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  nk_emu_check_mask(mask, width);
  const int lane = ::nk_emu::lane_id();
  return ::nk_emu::shuffle(v, (lane / width) * width + (src % width), "__shfl_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  nk_emu_check_mask(mask, width);
  const int lane = ::nk_emu::lane_id();
  const int src = (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : -1;
  return ::nk_emu::shuffle(v, src, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  nk_emu_check_mask(mask, width);
  const int lane = ::nk_emu::lane_id();
  const int src = (lane % width) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1;
  return ::nk_emu::shuffle(v, src, "__shfl_up_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  nk_emu_check_mask(mask, width);
  const int lane = ::nk_emu::lane_id();
  const int src = lane ^ lane_mask;
  return ::nk_emu::shuffle(v, src / width == lane / width ? src : -1, "__shfl_xor_sync");
}

namespace cooperative_groups {
struct grid_group {
  void sync() const { ::nk_emu::grid_sync(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// c10's CUDA helpers that the host code uses; the tensors are CPU tensors.
namespace c10 {
namespace cuda {
inline int current_device() { return ::nk_emu::current_device(); }
struct CUDAGuard {
  template <typename D>
  explicit CUDAGuard(const D&) {}
};
struct EmuStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
