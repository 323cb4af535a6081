// csrc/cuda/running_stats_cuda.cu compiled as host C++ under the emulation.
#include "../../csrc/cuda/running_stats_cuda.cu"
