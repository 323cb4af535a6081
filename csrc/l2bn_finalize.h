// L2BN's O(N*C) finalize math (docs/DESIGN.md section 3), written once as inline host+device functions
// in float64 and called by the CPU finalize (csrc/cpu/l2bn_cpu.cpp) and by the CUDA finalize
// kernel (csrc/cuda/l2bn_cuda.cu) -- the pattern of aten/src/ATen/native/cuda/Normalization.cuh.
// The loops (which thread owns which sample / channel, the summation order) belong to each device;
// every formula is here. The torch oracle (normkernels/ops/l2bn.py, backend "torch") is the same
// math in torch ops.
//
// Notation: x is (N, C, S); per row (n, c) the statistics pass gives its mean m and centered sum
// of squares m2 (accumulation dtype, "acc"); D = C*S.
//   sample norm  nrm_n = sqrt(sum_c m2 + S m^2),  r_n = max(nrm_n, l2_eps) [/ sqrt(D) if rescale]
//   u = x / r_n;  per row: mean of u um = m / r, centered sum of squares m2 / r^2
//   channel row  (count, mean, M2) of u over this process's batch; rows of several processes are
//                combined with Chan's formula (chan_merge); var = M2 / count
//   forward      inv_s = 1/sqrt(var + eps), k = gamma inv_s, cen = um - mean,
//                pre = x_coef (x - m) + offset,  x_coef = k / r,  offset = k cen + beta
//   backward     g = act'(pre) dy; per row Q = sum_s g, P = sum_s g (x - m);
//                G = P / r + cen Q;  dbeta = sum_n Q, dgamma = inv_s sum_n G;
//                du = k g + alpha (u - mean) + beta0 (training: alpha = -k inv_s^2 sum G / M,
//                beta0 = -k sum Q / M, M = group count; eval: 0);
//                dot_n = sum_c x.du = sum_c k (P + m Q) + alpha m2 / r + (alpha cen + beta0) S m;
//                t_n = dot_n / nrm_n^2 (0 where the norm was clamped: F.normalize's clamp_min);
//                dx = (du - t x) / r = x_coef g + dx_coef (x - m) + dx_offset,
//                dx_coef = (alpha / r - t) / r,  dx_offset = (alpha cen + beta0 - t m) / r.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "activation.h"

namespace normkernels {
namespace l2bn {

// ------------------------------------------------------------------------------- saved layout
// `saved` (output of l2bn_forward / l2bn_finish, input of the backward ops): a 1-d tensor in the
// accumulation dtype of x (float64 for float64 x, else float32) holding, in this order,
//   center  (N, C)  m: the row means (the apply passes' center)
//   m2      (N, C)  the rows' centered sums of squares
//   x_coef  (N, C)  k / r   (forward apply coefficient; also the backward's coefficient of g)
//   offset  (N, C)  k cen + beta
//   cen     (N, C)  um - mean (kept rather than the mean, so no cancellation in the backward)
//   r       (N)     the sample scale r_n
//   nrm     (N)     the sample norm nrm_n where nrm_n >= l2_eps, +inf where it was clamped
//   inv_s   (C)     1 / sqrt(var + eps)
//   n_all   (1)     the number of samples the batch statistics cover (over the process group)
// normkernels/ops/l2bn.py mirrors it (saved_numel / split_saved).
struct SavedLayout {
  int64_t N, C;
  C10_HOST_DEVICE int64_t center() const { return 0; }
  C10_HOST_DEVICE int64_t m2() const { return N * C; }
  C10_HOST_DEVICE int64_t x_coef() const { return 2 * N * C; }
  C10_HOST_DEVICE int64_t offset() const { return 3 * N * C; }
  C10_HOST_DEVICE int64_t cen() const { return 4 * N * C; }
  C10_HOST_DEVICE int64_t r() const { return 5 * N * C; }
  C10_HOST_DEVICE int64_t nrm() const { return 5 * N * C + N; }
  C10_HOST_DEVICE int64_t inv_s() const { return 5 * N * C + 2 * N; }
  C10_HOST_DEVICE int64_t n_all() const { return 5 * N * C + 2 * N + C; }
  C10_HOST_DEVICE int64_t numel() const { return 5 * N * C + 2 * N + C + 1; }
};

// Channel rows exchanged between processes: rows (3, C) float64 = [count, mean, M2] of u in the
// forward; grad rows (2, C) float64 = [sum_n Q, sum_n G] in the backward.
constexpr int kRowFields = 3;
constexpr int kGradRowFields = 2;

// ------------------------------------------------------------------------------- per-channel vectors
// weight, bias and the eval statistics arrive as (C,) tensors of any float dtype and stride.
enum class VecDtype : int { None = 0, Half = 1, BFloat16 = 2, Float = 3, Double = 4 };
struct ChannelVec {
  const void* p = nullptr;
  int64_t stride = 1;
  VecDtype dtype = VecDtype::None;
};

C10_HOST_DEVICE inline double load_channel(const ChannelVec& v, int64_t c, double absent) {
  const int64_t i = c * v.stride;
  switch (v.dtype) {
    case VecDtype::Half:
      return static_cast<double>(static_cast<float>(static_cast<const c10::Half*>(v.p)[i]));
    case VecDtype::BFloat16:
      return static_cast<double>(static_cast<float>(static_cast<const c10::BFloat16*>(v.p)[i]));
    case VecDtype::Float:
      return static_cast<double>(static_cast<const float*>(v.p)[i]);
    case VecDtype::Double:
      return static_cast<const double*>(v.p)[i];
    default:
      return absent;
  }
}

// ------------------------------------------------------------------------------- sample norms
// ||x_nc||^2 = m2 + S m^2; summed over c it is the squared sample norm.
C10_HOST_DEVICE inline double row_sq_norm(double m, double m2, double S) { return m2 + S * m * m; }

struct SampleScale {
  double r;      // u = x / r
  double inv_r;  // 1 / r
  double nrm;    // the norm where it is >= l2_eps (the gradient flows), +inf where clamped
};
// sqrt_d = sqrt(C*S) with rescale (u has unit RMS), 1 without (unit norm).
C10_HOST_DEVICE inline SampleScale sample_scale(double nrm2, double l2_eps, double sqrt_d) {
  const double nrm = ::sqrt(nrm2);
  const bool clamped = nrm < l2_eps;  // a NaN norm is not clamped: it propagates, as in F.normalize
  const double r = (clamped ? l2_eps : nrm) / sqrt_d;
  return SampleScale{r, 1.0 / r, clamped ? static_cast<double>(INFINITY) : nrm};
}

// ------------------------------------------------------------------------------- channel statistics
struct ChanRow {
  double n, mean, m2;  // count, mean, centered sum of squares
};

// Chan's combination a <- a (+) b (exact for an empty a: the result is b).
C10_HOST_DEVICE inline void chan_merge(ChanRow& a, const ChanRow& b) {
  if (b.n == 0.0) return;
  const double n = a.n + b.n;
  const double delta = b.mean - a.mean;
  const double w = b.n / n;
  a.mean += delta * w;
  a.m2 += b.m2 + delta * delta * a.n * w;
  a.n = n;
}

// The group's row of channel c from rows_all (P, 3, C) (kRowFields x C per process), combined in
// process order; the group's sample count is its count / S.
C10_HOST_DEVICE inline ChanRow group_row(const double* rows_all, int64_t P, int64_t C, int64_t c) {
  ChanRow row{0.0, 0.0, 0.0};
  for (int64_t p = 0; p < P; ++p) {
    const double* rp = rows_all + p * kRowFields * C;
    chan_merge(row, ChanRow{rp[c], rp[C + c], rp[2 * C + c]});
  }
  return row;
}
C10_HOST_DEVICE inline double group_samples(const ChanRow& row, double S) {
  return S > 0.0 ? row.n / S : 0.0;
}

// This process's channel row, in two passes over its samples: mean = sum_n um / N, then
// M2 = sum_n (m2 / r^2 + S (um - mean)^2) (the rows' within and between terms).
C10_HOST_DEVICE inline double u_row_mean(double m, double inv_r) { return m * inv_r; }
C10_HOST_DEVICE inline double u_row_m2(double m2, double inv_r, double S, double um, double mean) {
  const double d = um - mean;
  return m2 * inv_r * inv_r + S * d * d;
}
C10_HOST_DEVICE inline double u_channel_mean(double sum_um, double N) {
  return N > 0.0 ? sum_um / N : 0.0;
}

struct ChannelCoef {
  double mean, var, inv_s, k, beta;
};
// From the batch statistics (training) or the given ones (eval).
C10_HOST_DEVICE inline ChannelCoef channel_coef(double mean, double var, double eps, double gamma,
                                                double beta) {
  const double inv_s = 1.0 / ::sqrt(var + eps);
  return ChannelCoef{mean, var, inv_s, gamma * inv_s, beta};
}
C10_HOST_DEVICE inline double row_variance(const ChanRow& row) { return row.m2 / row.n; }

// Forward coefficients of row (n, c).
struct RowCoef {
  double x_coef, offset, cen;
};
C10_HOST_DEVICE inline RowCoef forward_row_coef(double m, double inv_r, const ChannelCoef& cc) {
  const double cen = u_row_mean(m, inv_r) - cc.mean;
  return RowCoef{cc.k * inv_r, cc.k * cen + cc.beta, cen};
}

// ------------------------------------------------------------------------------- backward
// G = sum_s g (u - mean) of row (n, c) from its gradient sums Q = sum g, P = sum g (x - m).
C10_HOST_DEVICE inline double grad_row_g(double P, double Q, double inv_r, double cen) {
  return P * inv_r + cen * Q;
}

struct GradChannel {
  double k, alpha, beta0;  // du = k g + alpha (u - mean) + beta0
};
// sum_q, sum_g: the sums of Q and G over the group (training); m_count = group count * S.
C10_HOST_DEVICE inline GradChannel grad_channel(double gamma, double inv_s, bool training,
                                                double sum_q, double sum_g, double m_count) {
  const double k = gamma * inv_s;
  if (!training) return GradChannel{k, 0.0, 0.0};
  const double km = -k / m_count;
  return GradChannel{k, km * inv_s * inv_s * sum_g, km * sum_q};
}

// Row (n, c)'s term of dot_n = sum x . du.
C10_HOST_DEVICE inline double grad_dot_term(const GradChannel& gc, double P, double Q, double m,
                                            double m2, double inv_r, double cen, double S) {
  return gc.k * (P + m * Q) + gc.alpha * m2 * inv_r + (gc.alpha * cen + gc.beta0) * S * m;
}
// t_n (nrm = +inf where the norm was clamped: t = 0).
C10_HOST_DEVICE inline double grad_sample_t(double dot, double nrm) { return dot / (nrm * nrm); }

struct GradRowCoef {
  double dx_coef, dx_offset;  // dx = x_coef g + dx_coef (x - m) + dx_offset
};
C10_HOST_DEVICE inline GradRowCoef backward_row_coef(const GradChannel& gc, double t, double m,
                                                     double inv_r, double cen) {
  return GradRowCoef{(gc.alpha * inv_r - t) * inv_r, (gc.alpha * cen + gc.beta0 - t * m) * inv_r};
}

// ------------------------------------------------------------------------------- per element (passes)
// The normalized value the forward apply writes (before the activation) and every backward pass
// recomputes: one function, so the backward's act' masks agree exactly with the forward.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t pre_act(acc_t x, acc_t center, acc_t x_coef, acc_t offset) {
  return x_coef * (x - center) + offset;
}

}  // namespace l2bn
}  // namespace normkernels
