"""Ops: one entry point per layer over torch.library custom ops (fake kernels, autograd), with
the heavy passes in C++/CUDA (csrc/) or Triton (normkernels/triton/) and a torch fallback."""
