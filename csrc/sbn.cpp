// SBN / BN+SBN pass ops (Parseval path): schemas only.
//
// The kernels do only the four heavy passes over the tensor; every formula that turns their
// sums into statistics and per-channel coefficients lives once in normkernels/ops/sbn.py
// (these ops have the semantics of its _torch_stats, _torch_grad_stats, _torch_forward_apply
// and _torch_backward_apply). x is (N, C, H, W); t = x - K[c]; per row (n, c, h):
// R = sum_w t, A = sum_w (-1)^w t. K, P, coef are in the accumulation dtype (float32, float64 for
// float64 x); P is (2, W) (the caller picks Re D / Im D or Pr[0, :] / Pi[0, :]).
// CPU kernels: csrc/cpu/sbn_cpu.cpp; fake kernels: normkernels/ops/sbn.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(normkernels, m) {
  // (C, 6): [sum t, sum t^2, sum R^2, sum A^2, sum_{n,w} t[n,c,0,w]*P[0,w], ... *P[1,w]]
  m.def("sbn_stats(Tensor x, Tensor K, Tensor P) -> Tensor");
  // (C, 4): [sum dy, sum dy*t, sum_{n,w} dy[n,c,0,w]*P[0,w], ... *P[1,w]]
  m.def("sbn_grad_stats(Tensor dy, Tensor x, Tensor K, Tensor P) -> Tensor");
  // coef (C, 5) = [K, cx, b, u, v]: y = cx*(x-K) + b off row 0,
  // y = cx*(x-K) + b*(1-P[0,w]) + u*P[0,w] + v*P[1,w] on row 0. x's dtype and memory format.
  m.def("sbn_forward_apply(Tensor x, Tensor coef, Tensor P) -> Tensor");
  // coef (C, 8) = [K, c_dy, c_t, c_R, c_A, cst, u, v]:
  // dx = c_dy*dy + c_t*t + cst (+ c_R*R + c_A*A*(-1)^w if need_row) + [h==0](u*P[0,w] + v*P[1,w])
  m.def(
      "sbn_backward_apply(Tensor dy, Tensor x, Tensor coef, Tensor P, bool need_row) -> Tensor");
}
