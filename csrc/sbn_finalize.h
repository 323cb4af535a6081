// The per-channel finalize math of the SBN family (BN+SBN; SBN = the BN stage off), written once
// in float64 for host and device code (the pattern of PyTorch's Normalization.cuh). The CPU ops
// (csrc/cpu/sbn_cpu.cpp) call these functions; a CUDA finalize kernel may call them too. Column
// layouts and the meaning of every quantity are documented once in csrc/sbn.cpp; the derivations
// are in docs/DESIGN.md section 2 and in the module docstring of normkernels/ops/sbn_oracle.py
// (whose torch functions are the oracle of these).
//
// Notation (one channel): x (N, H, W), Wr = W/2 + 1, M = N*H*Wr (spectral coefficients),
// t = x - K for a per-channel shift K, R = sum_w t (row sums), A = sum_w (-1)^w t (W even),
// D(w) = sum_{l<Wr} exp(-2 pi i l w / W), Pr[w] = delta_{w0}, Pi[w] = irfft(1j*ones(Wr), n=W)[w].
#pragma once
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace normkernels {
namespace sbn {

// torch.fft's norm argument: the forward transform is scaled by f = 1, 1/sqrt(HW), 1/(HW).
enum class FftNorm : int { Backward = 0, Ortho = 1, Forward = 2 };

// Column indices of the tensors the ops exchange (csrc/sbn.cpp documents them, in the math
// notation of this header: count = N, shift = K, sum_t = S1, ..., x_scale = cx, z_shift = Kz ...);
// the same names, in the same order, as normkernels/ops/sbn_layout.py (ROWS, SAVED, GSUMS).
struct RowCol {  // sbn_stats: (C, 8) per process
  enum : int { count, shift, sum_t, sum_t2, sum_row2, sum_alt2, sum_d_re, sum_d_im, Width };
};
struct SavedCol {  // sbn_forward / sbn_finish saved: (C, 26), BN stage on or off
  enum : int {
    shift, x_scale, offset, pr_coef, pi_coef,  // the apply coefficients K, cx, b, u, v
    bn_scale, bn_std, z_shift,                 // BN stage: p, sd, Kz
    mean_re, mean_im, sbn_std, sbn_scale,      // SBN stage: mr, mi, s, a
    bn_mean, count,                            // mbn, N_all
    sum_t, sum_t2, sum_row2, sum_alt2, sum_d_re, sum_d_im,  // the group's sums at K
    local_sum_t, local_sum_t2, local_sum_row2, local_sum_alt2, local_sum_d_re,
    local_sum_d_im,                                          // this process's sums at K
    Width
  };
};
struct GradCol {  // sbn_grad_stats: (C, 4) [Sdy, Gt, G0, G1]
  enum : int { sum_g, sum_gt, sum_g_pr, sum_g_pi, Width };
};

constexpr double kPi = 3.14159265358979323846;

// sin / cos of pi*k/n with k reduced modulo 2n in integers first (exact angle reduction).
C10_HOST_DEVICE inline double sinpi_frac(int64_t k, int64_t n) {
  k %= 2 * n;
  return ::sin(kPi * double(k) / double(n));
}
C10_HOST_DEVICE inline double cospi_frac(int64_t k, int64_t n) {
  k %= 2 * n;
  return ::cos(kPi * double(k) / double(n));
}

// The row constants at column w of a W-wide map, in closed form (geometric sums):
//   D(w)  = exp(-i pi w (Wr-1)/W) sin(pi w Wr/W) / sin(pi w/W)      (D(0) = Wr)
//   Pi[w] = -(2/W) sum_{l=1}^{L} sin(2 pi l w/W), L = (W-1)/2          (the DC and Nyquist bins
//           are self-conjugate: irfft drops their imaginary part)
//         = -(2/W) sin(pi w L/W) sin(pi w (L+1)/W) / sin(pi w/W)       (Pi[0] = 0)
//   Pr[w] = delta_{w0} (not returned).
C10_HOST_DEVICE inline void row_consts_at(int64_t w, int64_t W, double& re_d, double& im_d,
                                          double& pi) {
  const int64_t Wr = W / 2 + 1, L = (W - 1) / 2;
  if (w == 0) {
    re_d = double(Wr);
    im_d = 0.0;
    pi = 0.0;
    return;
  }
  const double den = sinpi_frac(w, W);
  const double q = sinpi_frac(w * Wr, W) / den;
  re_d = cospi_frac(w * (Wr - 1), W) * q;
  im_d = -sinpi_frac(w * (Wr - 1), W) * q;
  pi = -(2.0 / double(W)) * sinpi_frac(w * L, W) * sinpi_frac(w * (L + 1), W) / den;
}

C10_HOST_DEVICE inline double fft_scale(FftNorm m, int64_t H, int64_t W) {
  const double n = double(H) * double(W);
  return m == FftNorm::Backward ? 1.0 : (m == FftNorm::Ortho ? 1.0 / ::sqrt(n) : 1.0 / n);
}

// ------------------------------------------------------------------------------ shifted sums
// Sums of t = x - K over a batch: S1 = sum t, S2 = sum t^2, SR = sum R^2, SA = sum A^2 (0 for
// odd W), SD0 / SD1 = sum_{n,w} t[n, 0, w] Re D(w) / Im D(w).
struct Sums {
  double S1, S2, SR, SA, SD0, SD1;
};

C10_HOST_DEVICE inline Sums load_sums(const double* p) {
  return {p[0], p[1], p[2], p[3], p[4], p[5]};
}
C10_HOST_DEVICE inline void store_sums(const Sums& s, double* p) {
  p[0] = s.S1;
  p[1] = s.S2;
  p[2] = s.SR;
  p[3] = s.SA;
  p[4] = s.SD0;
  p[5] = s.SD1;
}
C10_HOST_DEVICE inline Sums add_sums(const Sums& a, const Sums& b) {
  return {a.S1 + b.S1, a.S2 + b.S2, a.SR + b.SR, a.SA + b.SA, a.SD0 + b.SD0, a.SD1 + b.SD1};
}
// Sums of p*t from the sums of t (z - Kz = p t).
C10_HOST_DEVICE inline Sums scale_sums(const Sums& s, double p) {
  const double p2 = p * p;
  return {p * s.S1, p2 * s.S2, p2 * s.SR, p2 * s.SA, p * s.SD0, p * s.SD1};
}

// Sums of `samples` samples at shift K moved exactly to shift K' = K - delta (t' = t + delta):
//   S1' = S1 + n delta, S2' = S2 + 2 delta S1 + n delta^2 (n = samples*H*W),
//   SR' = SR + 2 W delta S1 + samples H W^2 delta^2, SA' = SA (sum_w (-1)^w = 0 for even W;
//   unused for odd W), SD0' = SD0 + delta samples W (sum_w D(w) = W), SD1' = SD1.
C10_HOST_DEVICE inline Sums recenter(const Sums& s, double samples, double delta, int64_t H,
                                     int64_t W) {
  const double n = samples * double(H) * double(W);
  return {s.S1 + n * delta,
          s.S2 + 2.0 * delta * s.S1 + n * delta * delta,
          s.SR + 2.0 * double(W) * delta * s.S1 + n * double(W) * delta * delta,
          s.SA,
          s.SD0 + delta * samples * double(W),
          s.SD1};
}

// The statistics rows of a group of P processes ((P, C, 8) row-major, see RowCol) combined for
// channel c: every process's sums re-centered to the shift of the first process with N > 0, then
// summed in process order. `local` is process `rank`'s sums at that shift.
struct Group {
  Sums sums, local;
  double K, N;
};

C10_HOST_DEVICE inline Group combine_rows(const double* rows, int64_t P, int64_t C, int64_t c,
                                          int64_t rank, int64_t H, int64_t W) {
  const double* first = rows + c * RowCol::Width;
  for (int64_t r = 0; r < P; ++r) {
    const double* row = rows + (r * C + c) * RowCol::Width;
    if (row[RowCol::count] > 0) {
      first = row;
      break;
    }
  }
  Group g;
  g.K = first[RowCol::shift];
  g.N = 0.0;
  g.sums = Sums{0, 0, 0, 0, 0, 0};
  g.local = g.sums;
  for (int64_t r = 0; r < P; ++r) {
    const double* row = rows + (r * C + c) * RowCol::Width;
    const double n = row[RowCol::count];
    const Sums moved =
        recenter(load_sums(row + RowCol::sum_t), n, row[RowCol::shift] - g.K, H, W);
    g.sums = add_sums(g.sums, moved);
    g.N += n;
    if (r == rank) g.local = moved;
  }
  return g;
}

// ------------------------------------------------------------------------------ SBN statistics
// Spectral mean (re, im) and modulus variance, "backward" scale, of x = t + K from the sums of t:
//   mu_t = (H/M) SD,  var_t = (H W S2 + H SR + [W even] H SA) / (2M) - |mu_t|^2,
//   mu = mu_t + K W/Wr (a constant only moves the DC bin),
//   var = var_t + (N d (d - cK) + 2 d (S1 - N Re mu_t)) / M,  d = K H W, cK = K W/Wr.
struct Spectral {
  double mr, mi, var;
};

C10_HOST_DEVICE inline Spectral spectral_stats(const Sums& s, double K, double N, int64_t H,
                                               int64_t W) {
  const double Wr = double(W / 2 + 1), HW = double(H) * double(W);
  const double M = N * double(H) * Wr;
  const double mr_t = s.SD0 * (double(H) / M), mi_t = s.SD1 * (double(H) / M);
  double E = HW * s.S2 + double(H) * s.SR;
  if (W % 2 == 0) E += double(H) * s.SA;
  const double var_t = E / (2.0 * M) - (mr_t * mr_t + mi_t * mi_t);
  const double d = K * HW, cK = K * double(W) / Wr;
  double var = var_t + (N * d * (d - cK) + 2.0 * d * (s.S1 - N * mr_t)) / M;
  if (var < 0) var = 0;  // rounding only; NaN stays NaN
  return {mr_t + cK, mi_t, var};
}

// ------------------------------------------------------------------------------ SBN coefficients
// SBN of z (shift Kz) with statistics st ("backward" scale) and fft_norm scale f (h = 1/f): the
// literal irfft2_m(gamma (rfft2_m(z) - f mu)/sqrt(f^2 var + eps) + beta) equals the "backward"
// formulas with gamma_eff = h gamma, beta_eff = h beta, eps_eff = eps/f^2:
//   s = sqrt(var + eps_eff), a = gamma_eff / s,
//   pre = a (z - Kz) + a Kz  off row 0,
//   pre = a (z - Kz) + (a Kz)(1 - Pr[w]) + (beta_eff + a (Kz - mr)) Pr[w] + (-a mi) Pi[w] on row 0.
struct SbnCoef {
  double cx, b, u, v, s, a;
};

C10_HOST_DEVICE inline SbnCoef sbn_coef(double Kz, const Spectral& st, double gamma, double beta,
                                        double eps, double f) {
  const double h = 1.0 / f;
  const double s = ::sqrt(st.var + eps / (f * f));
  const double a = h * gamma / s;
  return {a, a * Kz, h * beta + a * (Kz - st.mr), -a * st.mi, s, a};
}

// ------------------------------------------------------------------------------ BN stage
// BN of x with batch sums (shift K, N samples) or given statistics: z = p (x - K) + Kz; with the
// BN stage off (SBN alone) the identity z = x: p = sd = 1, Kz = mbn = K (vbn = 0, not reported).
struct BnPart {
  double mbn, vbn, sd, p, Kz;
};

C10_HOST_DEVICE inline BnPart bn_identity(double K) { return {K, 0.0, 1.0, 1.0, K}; }

C10_HOST_DEVICE inline BnPart bn_from_sums(const Sums& s, double K, double N, int64_t H,
                                           int64_t W, double gamma, double beta, double eps) {
  const double nb = N * double(H) * double(W), m_t = s.S1 / nb;
  double vbn = s.S2 / nb - m_t * m_t;  // biased, of t: no cancellation against K
  if (vbn < 0) vbn = 0;
  const double sd = ::sqrt(vbn + eps), p = gamma / sd;
  return {K + m_t, vbn, sd, p, beta - p * m_t};
}

C10_HOST_DEVICE inline BnPart bn_from_stats(double mean, double var, double K, double gamma,
                                            double beta, double eps) {
  const double sd = ::sqrt(var + eps), p = gamma / sd;
  return {mean, var, sd, p, beta + p * (K - mean)};
}

// ------------------------------------------------------------------------------ backward
// SBN backward on z (shift Kz) from the gradient sums over the batch (g = act'(pre) dy):
// Sdy = sum g, gz = sum g (z - Kz), G0 / G1 = sum_{n,w} g[n, 0, w] Pr[w] / Pi[w].
//   Ga = gz + Kz Sdy - mr G0 - mi G1,  dgamma_eff = Ga / s,  dbeta_eff = G0,
//   training: kE = -dgamma_eff (a/s) / (2M),  u = -(H/M) a G0 - 2 H mr kE,
//             v = -(H/M) a G1 - 2 H mi kE,  cst = 2 H W Kz kE, and
//   dz = a g + kE (H W (z-Kz) + H R + [W even] H A (-1)^w) + cst + [h == 0] (u Re D + v Im D)
//   (R, A of z - Kz); eval: dz = a g (kE = u = v = cst = 0).
// The user's parameters' gradients are h dgamma_eff and h dbeta_eff.
struct SbnGrad {
  double dgamma, dbeta, kE, u, v, cst;
};

C10_HOST_DEVICE inline SbnGrad sbn_grad_core(double Sdy, double gz, double G0, double G1,
                                             double Kz, double mr, double mi, double s, double a,
                                             double N, int64_t H, int64_t W, bool training) {
  const double Ga = gz + Kz * Sdy - mr * G0 - mi * G1;
  SbnGrad g{Ga / s, G0, 0.0, 0.0, 0.0, 0.0};
  if (training) {
    const double M = N * double(H) * double(W / 2 + 1), Hd = double(H);
    g.kE = -0.5 * g.dgamma * (a / s) / M;
    g.u = -(Hd / M) * a * G0 - 2.0 * Hd * mr * g.kE;
    g.v = -(Hd / M) * a * G1 - 2.0 * Hd * mi * g.kE;
    g.cst = 2.0 * Hd * double(W) * Kz * g.kE;
  }
  return g;
}

// Backward-apply coefficients: with t = x - K, R, A of t,
//   dx = c_dy g + c_t t + cst + c_R R + c_A A (-1)^w + [h == 0] (u Re D(w) + v Im D(w)).
struct BackCoef {
  double c_dy, c_t, c_R, c_A, cst, u, v;
};

// sum dz and sum dz t over a batch of N samples with statistics sums s (of t = x - K) and
// gradient sums Sdy, Gt (= sum g t), dz as in sbn_grad_core with z - Kz = p t
// (the row-0 term sums to N W u since sum_w D(w) = W). Used with the BN stage on, in training.
C10_HOST_DEVICE inline void bn_grad_sums(const Sums& s, double Sdy, double Gt, double a, double p,
                                         const SbnGrad& g, double N, int64_t H, int64_t W,
                                         double& sdz, double& sdzt) {
  const double HW = double(H) * double(W), kEp = g.kE * p;
  sdz = a * Sdy + 2.0 * HW * kEp * s.S1 + N * HW * g.cst + N * double(W) * g.u;
  double E = HW * s.S2 + double(H) * s.SR;
  if (W % 2 == 0) E += double(H) * s.SA;
  sdzt = a * Gt + kEp * E + g.cst * s.S1 + g.u * s.SD0 + g.v * s.SD1;
}

// The backward-apply coefficients of the family: dx = p (dz - sdz/nb - xhat dgb/nb) with
// xhat = (t - m_t)/sd, dgb = (sdzt - m_t sdz)/sd, nb = N H W, dz as in sbn_grad_core
// (z - Kz = p t).
// The BN-batch terms (sdz, dgb; m_t = S1/nb) are those of training with the BN stage on
// (bn_batch); otherwise they are zero and dx = p dz (BN stage off: p = 1, dx = dz = SBN's dx;
// eval: kE = u = v = cst = 0 too, dx = p a g).
C10_HOST_DEVICE inline BackCoef back_coef(double p, double a, double sd, double m_t, double sdz,
                                          double dgb, bool bn_batch, const SbnGrad& g, double N,
                                          int64_t H, int64_t W) {
  const double nb = N * double(H) * double(W);
  const double kb = bn_batch ? p * dgb / (sd * nb) : 0.0;
  const double cst = bn_batch ? p * g.cst - p * sdz / nb + kb * m_t : p * g.cst;
  const double pkEH = p * p * g.kE * double(H);
  return {p * a, pkEH * double(W) - kb, pkEH, W % 2 == 0 ? pkEH : 0.0, cst, p * g.u, p * g.v};
}

}  // namespace sbn
}  // namespace normkernels
