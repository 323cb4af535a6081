// Host-side checks shared by the CPU and CUDA bodies of the L2BN ops (definitions in
// csrc/l2bn.cpp; the schemas and the layouts of stats / rows / saved / sums are documented there).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common.h"
#include "l2bn_finalize.h"

namespace normkernels {
namespace l2bn {

// A (C,) float tensor on x's device (weight, bias, eval mean / var), or ChannelVec{} when absent.
ChannelVec channel_vec(const std::optional<at::Tensor>& t, const View3& v, const char* op,
                       const char* name);
// t with exactly `shape`, dtype and x's device, made contiguous.
at::Tensor checked(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype,
                   const View3& v, const char* op, const char* name);
// saved (1-d, SavedLayout{N, C}.numel(), accumulation dtype), made contiguous.
at::Tensor checked_saved(const at::Tensor& saved, const View3& v, const char* op);
// rows_all (P, fields, C) float64 (P >= 1), made contiguous.
at::Tensor checked_rows_all(const at::Tensor& rows_all, int64_t fields, const View3& v,
                            const char* op);

inline SavedLayout layout_of(const View3& v) { return SavedLayout{v.N, v.C}; }

}  // namespace l2bn
}  // namespace normkernels
