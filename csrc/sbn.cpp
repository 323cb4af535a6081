// The SBN family (BN+SBN; SBN, Parseval, is it with the BN stage off): the op schemas and their
// contracts, written once here. Kernels: CPU in csrc/cpu/sbn_cpu.cpp (C++), CUDA in
// normkernels/triton (Triton, registered from Python onto these schemas); autograd in
// csrc/autograd/sbn_autograd.cpp; fake kernels in normkernels/ops/sbn.py; the torch oracle (python
// functions with exactly these contracts) in normkernels/ops/sbn_oracle.py. The finalize math is
// csrc/sbn_finalize.h (float64, host + device).
//
// Common
// ------
// x is (N, C, H, W), float16 / bfloat16 / float32 / float64; acc = float64 for float64 x, else
// float32: the passes accumulate in acc within a row / chunk and in float64 across them; every
// finalize computes in float64. Outputs y / dx have x's dtype and memory format (contiguous for
// layouts other than contiguous and channels_last); (C,)-shaped outputs are in acc; weights, biases
// and eval statistics may be any floating dtype. Optional parameters may be None (weight = 1,
// bias = 0). act in {"identity", "relu", "leaky_relu", "silu"}, act_param = leaky_relu's negative
// slope (csrc/activation.h): y = act(pre), pre = the normalized output; the backward recomputes
// pre from x and saved[:, :5] with the forward's arithmetic and uses g = act'(pre) dy.
// fft_norm in {"backward", "ortho", "forward"} (torch.fft's meaning). With f = 1, 1/sqrt(HW),
// 1/(HW) (the forward transform's scale) and h = 1/f the literal
//     irfft2(gamma (rfft2_m(x) - mu_m) / sqrt(var_m + eps) + beta, norm=m)
// is computed by the "backward" formulas with gamma_eff = h gamma, beta_eff = h beta,
// eps_eff = eps / f^2; the statistics reported (and given in eval) are those of the m-normalized
// spectrum, mu_m = f mu, var_m = f^2 var; dgamma = h dgamma_eff, dbeta = h dbeta_eff.
//
// Notation per channel: t = x - K (K a per-channel shift), rows (n, h) with R = sum_w t,
// A = sum_w (-1)^w t; D(w) = sum_{l < W/2+1} exp(-2 pi i l w / W); Pr[w] = delta_{w0} and Pi[w] =
// irfft(1j*ones(W/2+1), n=W)[w] (the row-0 patterns of irfft2 of a constant spectrum; zero on rows
// h > 0). M = N_all * H * (W/2+1).
//
// Statistics rows (sbn_stats): (C, 8) float64
//     [N, K, S1, S2, SR, SA, SD0, SD1]
//   (RowCol: count, shift, sum_t, sum_t2, sum_row2, sum_alt2, sum_d_re, sum_d_im)
//   K = x[0, c, 0, 0] (0 when N == 0); over this process's batch S1 = sum t, S2 = sum t^2,
//   SR = sum over rows of R^2, SA = sum of A^2 (0 for odd W), SD0 / SD1 = sum_{n,w} t[n, c, 0, w]
//   Re D(w) / Im D(w).  rows_all (P, C, 8): the rows of every process of a group (P = 1: this
//   one); the finish ops combine them exactly by re-centering to the shift K of the first process
//   with N > 0 (sbn_finalize.h combine_rows).
//
// One family: BN+SBN is the op; SBN is it with the BN stage off (bn = false: z = x, i.e. p = 1,
// Kz = K). Every formula below is the BN+SBN one; with the BN stage off the BN parameters and
// statistics must be None, bn_eps is ignored, and BN's outputs (bn_mean, bn_var, dbn_weight,
// dbn_bias) are empty (0,) tensors in acc.
//
// Forward-apply coefficients saved[:, :5] = [K, cx, b, u, v]:
//   pre = cx (x - K) + b                                          rows h > 0
//   pre = cx (x - K) + b (1 - Pr[w]) + u Pr[w] + v Pi[w]           row h = 0
//
// saved: (C, 26) float64 (csrc/sbn_finalize.h SavedCol; normkernels/ops/sbn_layout.py)
//   [K, cx, b, u, v, p, sd, Kz, mr, mi, s, a, mbn, N_all,
//    S1, S2, SR, SA, SD0, SD1,    the group's sums of t at K
//    L1, L2, LR, LA, LD0, LD1]    this process's sums of t at K (= the group's when P == 1)
//   (SavedCol: shift, x_scale, offset, pr_coef, pi_coef, bn_scale, bn_std, z_shift, mean_re,
//    mean_im, sbn_std, sbn_scale, bn_mean, count, sum_t .. sum_d_im, local_sum_t .. local_sum_d_im)
//   BN stage: mbn, sd = sqrt(var_bn + bn_eps), p = bn_gamma / sd; z = BN(x) = p (x - K) + Kz
//   (BN stage off: p = sd = 1, Kz = K, mbn = K); SBN part on z with shift Kz: mr, mi the spectral
//   mean in the "backward" scale, s = sqrt(var + eps_eff), a = gamma_eff / s; cx = a p; N_all: the
//   group's sample count. In eval the sums are 0; K is bn_mean rounded to acc (BN stage on) or 0.
//
// Gradient sums (sbn_grad_stats): (C, 4) float64 [Sdy, Gt, G0, G1]
//   = [sum g, sum g t, sum_{n,w} g[n, c, 0, w] Pr[w], sum_{n,w} g[n, c, 0, w] Pi[w]],
//   g = act'(pre) dy, t = x - K, K and pre from saved[:, :5]  (GradCol: sum_g, sum_gt, sum_g_pr,
//   sum_g_pi).
//
// Ops (one per direction, plus the pieces of the synchronized path)
// ---
// sbn_stats(x) -> rows (C, 8)
// sbn_finish(x, rows_all, rank, bn, bn_weight?, bn_bias?, sbn_weight?, sbn_bias?, bn_eps, sbn_eps,
//            fft_norm, act, act_param)
//     -> (y, bn_mean (C,), bn_var (C,) biased, sbn_mean (C, 2) [re, im], sbn_var (C,), saved)
//   training statistics of the group (biased: BN's over N H W, SBN's over M coefficients),
//   m-scale; rank: this process's row of rows_all (for the L columns).
// sbn_forward(x, bn, bn_weight?, bn_bias?, bn_mean?, bn_var?, sbn_weight?, sbn_bias?, sbn_mean?,
//             sbn_var?, bn_eps, sbn_eps, fft_norm, act, act_param) -> as sbn_finish
//   statistics all None (training: = sbn_finish(x, sbn_stats(x)[None], 0, ...)) or all given
//   (eval, m-scale; no statistics pass; the outputs are then the given statistics).
// sbn_grad_stats(dy, x, saved, act, act_param) -> gsums (C, 4)
// sbn_grad_finish(dy, x, saved, gsums_local, gsums_all, bn, training, fft_norm, act, act_param)
//     -> (dx, dbn_weight, dbn_bias, dsbn_weight, dsbn_bias)   (C,) acc each ((0,) with bn off)
//   dx from gsums_all (the group's: summed over processes) and N_all; the parameter gradients
//   are this process's share (from gsums_local).
// sbn_backward(dy, x, saved, bn, training, fft_norm, act, act_param) -> (the same five)
//   = sbn_grad_finish(dy, x, saved, g, g, ...) with g = sbn_grad_stats(dy, x, saved, ...).
//
// Every top-level CPU op is one leaf op (its passes and finalize in one C++ call). An empty batch
// (N = 0) is valid for sbn_stats / the grad ops (a process of a group with no samples); the finish
// ops need N_all > 0. Inputs are validated once, in normkernels/functional.py; the kernels check
// only what would otherwise read out of bounds (shapes, devices, dtypes) and that the BN stage's
// arguments are None with it off.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(normkernels, m) {
  m.def("sbn_stats(Tensor x) -> Tensor rows");
  m.def(
      "sbn_finish(Tensor x, Tensor rows_all, int rank, bool bn, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor? sbn_weight, Tensor? sbn_bias, float bn_eps, float sbn_eps, "
      "str fft_norm, str act, float act_param) -> (Tensor y, Tensor bn_mean, Tensor bn_var, "
      "Tensor sbn_mean, Tensor sbn_var, Tensor saved)");
  m.def(
      "sbn_forward(Tensor x, bool bn, Tensor? bn_weight, Tensor? bn_bias, Tensor? bn_mean, "
      "Tensor? bn_var, Tensor? sbn_weight, Tensor? sbn_bias, Tensor? sbn_mean, Tensor? sbn_var, "
      "float bn_eps, float sbn_eps, str fft_norm, str act, float act_param) -> (Tensor y, "
      "Tensor bn_mean, Tensor bn_var, Tensor sbn_mean, Tensor sbn_var, Tensor saved)");
  m.def("sbn_grad_stats(Tensor dy, Tensor x, Tensor saved, str act, float act_param) -> Tensor");
  m.def(
      "sbn_grad_finish(Tensor dy, Tensor x, Tensor saved, Tensor gsums_local, "
      "Tensor gsums_all, bool bn, bool training, str fft_norm, str act, float act_param) -> "
      "(Tensor dx, Tensor dbn_weight, Tensor dbn_bias, Tensor dsbn_weight, Tensor dsbn_bias)");
  m.def(
      "sbn_backward(Tensor dy, Tensor x, Tensor saved, bool bn, bool training, str fft_norm, "
      "str act, float act_param) -> (Tensor dx, Tensor dbn_weight, Tensor dbn_bias, "
      "Tensor dsbn_weight, Tensor dsbn_bias)");
}
