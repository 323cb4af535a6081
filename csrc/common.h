// Host-side helpers shared by every op's CPU and CUDA bodies (definitions in csrc/common.cpp).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

// The dispatcher namespace of the ops that the CUDA files and their shared host code define.
// The CPU-emulated build of csrc/cuda/ (tools/cuda_emu, tests/test_cuda_emulated.py) registers the
// same schemas under normkernels_cuda_emu, beside the real library.
#ifndef NORMKERNELS_LIBRARY
#define NORMKERNELS_LIBRARY normkernels
#endif

namespace normkernels {

// Memory layout of x seen as (N, C, S), S = prod(spatial):
//   NCS: strides (C*S, S, 1)  (contiguous)
//   NSC: strides (S*C, 1, C)  (4d channels_last, or the 3d equivalent)
enum class Layout { NCS, NSC };

struct View3 {
  at::Tensor x;  // dense tensor in `layout` (the input itself, or a contiguous copy)
  int64_t N, C, S;
  Layout layout;
};

// Accumulation dtype: double for double, float otherwise.
at::ScalarType acc_type(at::ScalarType t);
// Checks rank >= 2 and a floating dtype; picks the layout (copies to contiguous only for
// layouts other than NCS / NSC).
View3 make_view(const at::Tensor& x, const char* op);
// Returns t (same shape as v.x) with exactly v.x's strides (copy only when they differ).
at::Tensor match_layout(const at::Tensor& t, const View3& v, const char* op, const char* name);

// at::parallel_for grain: about 32K elements of work per task.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

}  // namespace normkernels
