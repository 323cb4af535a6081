// csrc/cuda/l2bn_cuda.cu compiled as host C++ under the emulation (tools/cuda_emu/cuda_emu.h).
#include "../../csrc/cuda/l2bn_cuda.cu"
