// Ops of the test-only library normkernels_cuda_emu that control the emulation: which emulated
// device the next launches run on (tools/cuda_emu/cuda_emu.cpp lists them).
#include <torch/library.h>

#include <vector>

#include "cuda_emu.h"

namespace {

void emu_set_device(int64_t index) { nk_emu::set_device(static_cast<int>(index)); }

// [SMs, resident blocks per SM, cooperative launch] of emulated device `index`
std::vector<int64_t> emu_device(int64_t index) {
  const nk_emu::Device& d = nk_emu::device(static_cast<int>(index));
  return {d.sms, d.blocks_per_sm, d.cooperative ? 1 : 0};
}

int64_t emu_device_count() { return nk_emu::device_count(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(normkernels_cuda_emu, m) {
  m.def("emu_set_device(int index) -> ()", &emu_set_device);
  m.def("emu_device(int index) -> int[]", &emu_device);
  m.def("emu_device_count() -> int", &emu_device_count);
}
