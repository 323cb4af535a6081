// SBN / BN+SBN on CPU: every op of csrc/sbn.cpp (schemas and contracts there) as one C++ call:
// its heavy passes over the tensor plus the finalize of csrc/sbn_finalize.h, with no aten compute
// op inside (allocations with at::empty, everything else in the loops below).
//
// Passes. x (N, C, H, W) is processed in one of two layouts:
//   NCHW (contiguous): work items are the N*C planes; rows of W values are reduced straight from
//                      x in kL lane accumulators.
//   NHWC (channels_last): reductions run over tasks (n, kCB channels); each row (n, h) is reduced
//                      in compile-time blocks of 8 channels (tail 4/2/1) whose accumulators stay in
//                      registers; the apply passes run over rows (n, h).
// Other layouts are made contiguous; dy is brought to x's layout when it differs.
// Accumulation: acc (float, double for double) within a row / chunk, double across rows. Every
// reduction writes per-(n, c) partial sums that are combined over n in a fixed order, so results
// do not depend on the number of threads (deterministic, no atomics).
// pre = cx (x - K) + add is formed by the same expression (same operands, same order, acc type) in
// the forward apply and in both backward passes, so the activation's masks agree exactly.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../activation.h"
#include "../common.h"
#include "../sbn_finalize.h"

namespace normkernels {
namespace sbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ============================================================================== host helpers

FftNorm parse_fft_norm(c10::string_view name, const char* op) {
  const std::string_view s(name.data(), name.size());
  if (s == "backward") return FftNorm::Backward;
  if (s == "ortho") return FftNorm::Ortho;
  if (s == "forward") return FftNorm::Forward;
  TORCH_CHECK_VALUE(false, op, ": fft_norm must be 'backward', 'ortho' or 'forward', got '",
                    std::string(s), "'");
}

Act act_of(c10::string_view name, const char* op) {
  return parse_act(std::string_view(name.data(), name.size()), op);
}

// x as (N, C, S = H*W) in layout NCS (NCHW) or NSC (channels_last), plus its H and W.
struct X4 : View3 {
  int64_t H, W;
};

X4 view4(const Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": expected x of shape (N, C, H, W), got rank ", x.dim());
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, op,
                    ": expected H > 0 and W > 0, got shape ", x.sizes());
  X4 v;
  static_cast<View3&>(v) = make_view(x, op);
  v.H = x.size(2);
  v.W = x.size(3);
  return v;
}

// dy in x's dtype and in the layout of v.x (a copy only when needed).
Tensor like_x(const Tensor& t, const X4& v, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be floating point, got ", t.scalar_type());
  const Tensor r = t.scalar_type() == v.x.scalar_type() ? t : t.to(v.x.scalar_type());
  return match_layout(r, v, op, name);
}

// y / dx: x's dtype, v's layout (what the fake kernels return).
Tensor new_like(const X4& v) {
  return at::empty(v.x.sizes(), v.x.options(),
                   v.layout == Layout::NSC ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous);
}

void check_cpu(const Tensor& t, const X4& v, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == v.x.device(), op, ": ", name, " must be on ", v.x.device(),
                    ", got ", t.device());
}

// A (C,) parameter or statistic of any floating dtype / stride -> double; absent -> dflt.
std::vector<double> read_channels(const OptTensor& t, const X4& v, double dflt, const char* op,
                                  const char* name) {
  std::vector<double> out(v.C, dflt);
  if (!t.has_value() || !t->defined()) return out;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == v.C, op, ": ", name, " must have shape (",
                    v.C, ",), got ", t->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", name,
                   " must be floating point, got ", t->scalar_type());
  check_cpu(*t, v, op, name);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "sbn_read", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t st = t->stride(0);
    for (int64_t c = 0; c < v.C; ++c) out[c] = static_cast<double>(p[c * st]);
  });
  return out;
}

// A spectral mean (C, 2) [re, im] of any floating dtype / strides -> double (re, im interleaved).
std::vector<double> read_mean2(const Tensor& t, const X4& v, const char* op, const char* name) {
  TORCH_CHECK_TYPE(!t.is_complex(), op, ": ", name,
                   " must be real (C, 2) [re, im] (torch.view_as_real of the complex mean)");
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == v.C && t.size(1) == 2, op, ": ", name,
                    " must have shape (", v.C, ", 2), got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be floating point, got ", t.scalar_type());
  check_cpu(t, v, op, name);
  std::vector<double> out(2 * v.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "sbn_read", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t s0 = t.stride(0), s1 = t.stride(1);
    for (int64_t c = 0; c < v.C; ++c) {
      out[2 * c] = static_cast<double>(p[c * s0]);
      out[2 * c + 1] = static_cast<double>(p[c * s0 + s1]);
    }
  });
  return out;
}

// A float64 tensor of an exact shape (rows, saved, gradient sums), contiguous.
Tensor f64_arg(const Tensor& t, at::IntArrayRef shape, const X4& v, const char* op,
               const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, op, ": ", name, " must be float64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  check_cpu(t, v, op, name);
  return t.contiguous();
}

// (C, k) / (C,) outputs in acc, written through double values.
struct AccOut {
  Tensor t;
  float* f = nullptr;
  double* d = nullptr;
  AccOut(at::IntArrayRef shape, const X4& v) {
    t = at::empty(shape, v.x.options().dtype(acc_type(v.x.scalar_type())));
    if (t.scalar_type() == at::kDouble)
      d = t.data_ptr<double>();
    else
      f = t.data_ptr<float>();
  }
  void set(int64_t i, double val) {
    if (d)
      d[i] = val;
    else
      f[i] = static_cast<float>(val);
  }
};

Tensor new_f64(at::IntArrayRef shape, const X4& v) {
  return at::empty(shape, v.x.options().dtype(at::kDouble));
}

// Row constants of this W (closed form, double).
struct RowConsts {
  std::vector<double> re_d, im_d, pi;
  explicit RowConsts(int64_t W) : re_d(W), im_d(W), pi(W) {
    for (int64_t w = 0; w < W; ++w) row_consts_at(w, W, re_d[w], im_d[w], pi[w]);
  }
};

template <typename acc_t>
std::vector<acc_t> cast_vec(const std::vector<double>& v) {
  return std::vector<acc_t>(v.begin(), v.end());
}

template <typename F>
void with_act(Act a, F&& f) {
  switch (a) {
    case Act::ReLU:
      f(std::integral_constant<Act, Act::ReLU>());
      break;
    case Act::LeakyReLU:
      f(std::integral_constant<Act, Act::LeakyReLU>());
      break;
    case Act::SiLU:
      f(std::integral_constant<Act, Act::SiLU>());
      break;
    default:
      f(std::integral_constant<Act, Act::Identity>());
  }
}

// ============================================================================== coefficient tables

// Forward-apply coefficients in acc (saved[:, :5] of either layer, `stride` doubles per channel):
// pre = cx (x - K) + add, add = b off row 0 and T0[c, w] = b (1 - Pr[w]) + u Pr[w] + v Pi[w] on
// row 0 (Pr = delta_w0, Pi[0] = 0). T0 is [c*W + w] for NCHW, [w*C + c] for NHWC.
template <typename acc_t>
struct FwdTab {
  std::vector<acc_t> K, cx, b, T0;
};

template <typename acc_t>
FwdTab<acc_t> fwd_tab(const double* coef, int64_t stride, int64_t C, int64_t W,
                      const RowConsts& rc, Layout lay) {
  FwdTab<acc_t> t{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C),
                  std::vector<acc_t>(C * W)};
  for (int64_t c = 0; c < C; ++c) {
    const double* r = coef + c * stride;
    t.K[c] = static_cast<acc_t>(r[SavedCol::K]);
    t.cx[c] = static_cast<acc_t>(r[SavedCol::cx]);
    t.b[c] = static_cast<acc_t>(r[SavedCol::b]);
    for (int64_t w = 0; w < W; ++w) {
      const double t0 = (w == 0 ? r[SavedCol::u] : r[SavedCol::b]) + r[SavedCol::v] * rc.pi[w];
      t.T0[lay == Layout::NCS ? c * W + w : w * C + c] = static_cast<acc_t>(t0);
    }
  }
  return t;
}

// Backward-apply coefficients: dx = c_dy g + c_t t + cst + c_R R + c_A A (-1)^w + [h == 0] T1[c, w],
// T1 = u Re D(w) + v Im D(w) (layout as T0).
template <typename acc_t>
struct BwdTab {
  std::vector<acc_t> cdy, ct, cR, cA, cst, T1;
};

template <typename acc_t>
BwdTab<acc_t> bwd_tab(const std::vector<BackCoef>& bc, int64_t C, int64_t W, const RowConsts& rc,
                      Layout lay) {
  BwdTab<acc_t> t{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C),
                  std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C * W)};
  for (int64_t c = 0; c < C; ++c) {
    const BackCoef& k = bc[c];
    t.cdy[c] = static_cast<acc_t>(k.c_dy);
    t.ct[c] = static_cast<acc_t>(k.c_t);
    t.cR[c] = static_cast<acc_t>(k.c_R);
    t.cA[c] = static_cast<acc_t>(k.c_A);
    t.cst[c] = static_cast<acc_t>(k.cst);
    for (int64_t w = 0; w < W; ++w)
      t.T1[lay == Layout::NCS ? c * W + w : w * C + c] =
          static_cast<acc_t>(k.u * rc.re_d[w] + k.v * rc.im_d[w]);
  }
  return t;
}

// ============================================================================== row reductions

// Lane-accumulated reductions: kL independent accumulators (lane j takes the elements with index
// = j mod kL) that the compiler keeps in vector registers (it does not reassociate float sums by
// itself); lanes are combined in a fixed tree. kL is even, so a lane's parity is w's parity.
constexpr int kL = 8;
constexpr int64_t kCB = 64;       // NHWC reductions: channels per task
constexpr int64_t kChunk = 1024;  // NCHW: elements per chunk summed in acc

template <typename acc_t>
inline acc_t lane_sum(const acc_t* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// Row of W values t = p[w] - k:  R = sum t, A = sum (-1)^w t, Q = sum t^2 (if kQ).
template <bool kQ, typename scalar_t, typename acc_t>
inline void row_raq(const scalar_t* p, int64_t W, acc_t k, acc_t& R, acc_t& A, acc_t& Q) {
  acc_t e = 0, o = 0, q = 0;
  int64_t w = 0;
  if (W >= kL) {
    acc_t r[kL], s[kL];
    for (int j = 0; j < kL; ++j) r[j] = s[j] = acc_t(0);
    for (; w + kL <= W; w += kL) {
      for (int j = 0; j < kL; ++j) {
        const acc_t t = static_cast<acc_t>(p[w + j]) - k;
        r[j] += t;
        if (kQ) s[j] += t * t;
      }
    }
    e = (r[0] + r[4]) + (r[2] + r[6]);
    o = (r[1] + r[5]) + (r[3] + r[7]);
    if (kQ) q = lane_sum(s);
  }
  for (; w + 1 < W; w += 2) {  // w is even here
    const acc_t t0 = static_cast<acc_t>(p[w]) - k, t1 = static_cast<acc_t>(p[w + 1]) - k;
    e += t0;
    o += t1;
    if (kQ) q += t0 * t0 + t1 * t1;
  }
  if (w < W) {
    const acc_t t = static_cast<acc_t>(p[w]) - k;
    e += t;
    if (kQ) q += t * t;
  }
  R = e + o;
  A = e - o;
  Q = q;
}

// Row-0 projections d0 = sum (p[w] - k) P0[w], d1 = sum (p[w] - k) P1[w].
template <typename scalar_t, typename acc_t>
inline void row_dots(const scalar_t* p, int64_t W, acc_t k, const acc_t* P0, const acc_t* P1,
                     acc_t& d0, acc_t& d1) {
  acc_t a[kL], b[kL];
  for (int j = 0; j < kL; ++j) a[j] = b[j] = acc_t(0);
  int64_t w = 0;
  for (; w + kL <= W; w += kL) {
    for (int j = 0; j < kL; ++j) {
      const acc_t t = static_cast<acc_t>(p[w + j]) - k;
      a[j] += t * P0[w + j];
      b[j] += t * P1[w + j];
    }
  }
  acc_t ta = 0, tb = 0;
  for (; w < W; ++w) {
    const acc_t t = static_cast<acc_t>(p[w]) - k;
    ta += t * P0[w];
    tb += t * P1[w];
  }
  d0 = lane_sum(a) + ta;
  d1 = lane_sum(b) + tb;
}

// ============================================================================== statistics pass
// part[(n*C + c)*6 + k] = this sample's [S1, S2, SR, SA, SD0, SD1] of channel c.

template <typename scalar_t, typename acc_t>
void stats_nchw(const scalar_t* x, const acc_t* K, const acc_t* ReD, const acc_t* ImD,
                double* part, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  const bool even = W % 2 == 0;
  at::parallel_for(0, N * C, grain_for(HW), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const acc_t k = K[r % C];
      const scalar_t* base = x + r * HW;
      double s1 = 0, s2 = 0, sr = 0, sa = 0;
      for (int64_t h = 0; h < H; ++h) {
        acc_t R, A, Q;
        row_raq<true>(base + h * W, W, k, R, A, Q);
        s1 += R;
        s2 += Q;
        sr += double(R) * double(R);
        sa += double(A) * double(A);
      }
      acc_t d0, d1;
      row_dots(base, W, k, ReD, ImD, d0, d1);
      double* o = part + r * 6;
      o[0] = s1;
      o[1] = s2;
      o[2] = sr;
      o[3] = even ? sa : 0.0;
      o[4] = d0;
      o[5] = d1;
    }
  });
}

// NHWC row kernel over a compile-time block of CB channels (p = x + row offset + c0, pixel stride
// C): fixed-size local accumulators that stay in registers, loops over j vectorized. Even / odd
// pixels go to separate accumulators (R = E + O, A = E - O). kD (row 0): also the D projections.
template <int CB, bool kD, typename scalar_t, typename acc_t>
inline void nhwc_row_stats(const scalar_t* p, int64_t W, int64_t C, const acc_t* kk,
                           const acc_t* ReD, const acc_t* ImD, acc_t* R, acc_t* A, acc_t* Q,
                           acc_t* D0, acc_t* D1) {
  acc_t k[CB], e[CB], o[CB], q[CB], a0[CB], a1[CB];
  for (int j = 0; j < CB; ++j) {
    k[j] = kk[j];
    e[j] = o[j] = q[j] = a0[j] = a1[j] = acc_t(0);
  }
  int64_t w = 0;
  for (; w + 1 < W; w += 2) {
    const scalar_t* p0 = p + w * C;
    const scalar_t* p1 = p0 + C;
    if (kD) {
      const acc_t u0 = ReD[w], u1 = ReD[w + 1], v0 = ImD[w], v1 = ImD[w + 1];
      for (int j = 0; j < CB; ++j) {
        const acc_t t0 = static_cast<acc_t>(p0[j]) - k[j];
        const acc_t t1 = static_cast<acc_t>(p1[j]) - k[j];
        e[j] += t0;
        o[j] += t1;
        q[j] += t0 * t0;
        q[j] += t1 * t1;
        a0[j] += t0 * u0;
        a0[j] += t1 * u1;
        a1[j] += t0 * v0;
        a1[j] += t1 * v1;
      }
    } else {
      for (int j = 0; j < CB; ++j) {
        const acc_t t0 = static_cast<acc_t>(p0[j]) - k[j];
        const acc_t t1 = static_cast<acc_t>(p1[j]) - k[j];
        e[j] += t0;
        o[j] += t1;
        q[j] += t0 * t0;
        q[j] += t1 * t1;
      }
    }
  }
  if (w < W) {  // w is even
    const scalar_t* p0 = p + w * C;
    for (int j = 0; j < CB; ++j) {
      const acc_t t0 = static_cast<acc_t>(p0[j]) - k[j];
      e[j] += t0;
      q[j] += t0 * t0;
      if (kD) {
        a0[j] += t0 * ReD[w];
        a1[j] += t0 * ImD[w];
      }
    }
  }
  for (int j = 0; j < CB; ++j) {
    R[j] = e[j] + o[j];
    A[j] = e[j] - o[j];
    Q[j] = q[j];
    if (kD) {
      D0[j] = a0[j];
      D1[j] = a1[j];
    }
  }
}

// One row (n, h) of channels [c0, c0 + cw): blocks of 8 channels, then 4 / 2 / 1 for the tail.
template <bool kD, typename scalar_t, typename acc_t>
inline void nhwc_row_stats_all(const scalar_t* p, int64_t W, int64_t C, int64_t cw,
                               const acc_t* kk, const acc_t* ReD, const acc_t* ImD, acc_t* R,
                               acc_t* A, acc_t* Q, acc_t* D0, acc_t* D1) {
  int64_t c = 0;
  for (; c + 8 <= cw; c += 8)
    nhwc_row_stats<8, kD>(p + c, W, C, kk + c, ReD, ImD, R + c, A + c, Q + c, D0 + c, D1 + c);
  if (c + 4 <= cw) {
    nhwc_row_stats<4, kD>(p + c, W, C, kk + c, ReD, ImD, R + c, A + c, Q + c, D0 + c, D1 + c);
    c += 4;
  }
  if (c + 2 <= cw) {
    nhwc_row_stats<2, kD>(p + c, W, C, kk + c, ReD, ImD, R + c, A + c, Q + c, D0 + c, D1 + c);
    c += 2;
  }
  if (c < cw)
    nhwc_row_stats<1, kD>(p + c, W, C, kk + c, ReD, ImD, R + c, A + c, Q + c, D0 + c, D1 + c);
}

template <typename scalar_t, typename acc_t>
void stats_nhwc(const scalar_t* x, const acc_t* K, const acc_t* ReD, const acc_t* ImD,
                double* part, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t nblk = (C + kCB - 1) / kCB;
  const bool even = W % 2 == 0;
  at::parallel_for(0, N * nblk, grain_for(H * W * std::min(C, kCB)), [&](int64_t b, int64_t e) {
    acc_t rR[kCB], rA[kCB], rQ[kCB], d0[kCB], d1[kCB];
    double s1[kCB], s2[kCB], sr[kCB], sa[kCB];
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / nblk, c0 = (task % nblk) * kCB;
      const int64_t cw = std::min(kCB, C - c0);
      for (int64_t c = 0; c < cw; ++c) s1[c] = s2[c] = sr[c] = sa[c] = 0.0;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* p = x + (n * H + h) * W * C + c0;
        if (h == 0)
          nhwc_row_stats_all<true>(p, W, C, cw, K + c0, ReD, ImD, rR, rA, rQ, d0, d1);
        else
          nhwc_row_stats_all<false>(p, W, C, cw, K + c0, ReD, ImD, rR, rA, rQ, d0, d1);
        for (int64_t c = 0; c < cw; ++c) {
          s1[c] += rR[c];
          s2[c] += rQ[c];
          sr[c] += double(rR[c]) * double(rR[c]);
          sa[c] += double(rA[c]) * double(rA[c]);
        }
      }
      for (int64_t c = 0; c < cw; ++c) {
        double* o = part + (n * C + c0 + c) * 6;
        o[0] = s1[c];
        o[1] = s2[c];
        o[2] = sr[c];
        o[3] = even ? sa[c] : 0.0;
        o[4] = d0[c];
        o[5] = d1[c];
      }
    }
  });
}

// The statistics pass: rows (C, 8) = [N, K, S1, S2, SR, SA, SD0, SD1] of this batch.
void stats_rows(const X4& v, const RowConsts& rc, double* rows) {
  const int64_t N = v.N, C = v.C;
  if (v.x.numel() == 0) {
    for (int64_t c = 0; c < C; ++c) {
      double* o = rows + c * RowCol::Width;
      for (int k = 0; k < RowCol::Width; ++k) o[k] = 0.0;
      o[RowCol::N] = double(N);
    }
    return;
  }
  std::unique_ptr<double[]> part(new double[N * C * 6]);  // written in full by the pass
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const int64_t kstride = v.layout == Layout::NCS ? v.H * v.W : 1;  // x[0, c, 0, 0]
    std::vector<acc_t> K(C);
    for (int64_t c = 0; c < C; ++c) K[c] = static_cast<acc_t>(xp[c * kstride]);
    const std::vector<acc_t> re = cast_vec<acc_t>(rc.re_d), im = cast_vec<acc_t>(rc.im_d);
    if (v.layout == Layout::NCS)
      stats_nchw(xp, K.data(), re.data(), im.data(), part.get(), N, C, v.H, v.W);
    else
      stats_nhwc(xp, K.data(), re.data(), im.data(), part.get(), N, C, v.H, v.W);
    for (int64_t c = 0; c < C; ++c) {
      double* o = rows + c * RowCol::Width;
      o[RowCol::N] = double(N);
      o[RowCol::K] = static_cast<double>(K[c]);
      for (int k = 0; k < 6; ++k) o[RowCol::S1 + k] = 0.0;
    }
    for (int64_t n = 0; n < N; ++n)  // fixed order: deterministic
      for (int64_t c = 0; c < C; ++c) {
        const double* p = part.get() + (n * C + c) * 6;
        double* o = rows + c * RowCol::Width + RowCol::S1;
        for (int k = 0; k < 6; ++k) o[k] += p[k];
      }
  });
}

// ============================================================================== forward apply
// y = act(pre), pre = cx (x - K) + add (FwdTab).

template <Act A, typename scalar_t, typename acc_t>
void fwd_apply(const scalar_t* x, scalar_t* y, const FwdTab<acc_t>& ft, acc_t slope, int64_t N,
               int64_t C, int64_t H, int64_t W, Layout lay) {
  const int64_t HW = H * W;
  if (lay == Layout::NCS) {
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t c = r % C;
        const acc_t k = ft.K[c], a = ft.cx[c], bc = ft.b[c];
        const acc_t* t0 = ft.T0.data() + c * W;
        const scalar_t* px = x + r * HW;
        scalar_t* py = y + r * HW;
        for (int64_t w = 0; w < W; ++w) {
          const acc_t pre = a * (static_cast<acc_t>(px[w]) - k) + t0[w];
          py[w] = static_cast<scalar_t>(act_forward(A, pre, slope));
        }
        for (int64_t i = W; i < HW; ++i) {
          const acc_t pre = a * (static_cast<acc_t>(px[i]) - k) + bc;
          py[i] = static_cast<scalar_t>(act_forward(A, pre, slope));
        }
      }
    });
  } else {
    const acc_t* kp = ft.K.data();
    const acc_t* ap = ft.cx.data();
    const acc_t* bp = ft.b.data();
    at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const bool row0 = (r % H) == 0;
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* px = x + (r * W + w) * C;
          scalar_t* py = y + (r * W + w) * C;
          const acc_t* add = row0 ? ft.T0.data() + w * C : bp;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t pre = ap[c] * (static_cast<acc_t>(px[c]) - kp[c]) + add[c];
            py[c] = static_cast<scalar_t>(act_forward(A, pre, slope));
          }
        }
      }
    });
  }
}

// y for the saved coefficients (saved[:, :5], `stride` doubles per channel).
Tensor apply_forward(const X4& v, const double* coef, int64_t stride, const RowConsts& rc,
                     Act act, double slope) {
  Tensor y = new_like(v);
  if (v.x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdTab<acc_t> ft = fwd_tab<acc_t>(coef, stride, v.C, v.W, rc, v.layout);
    with_act(act, [&](auto tag) {
      fwd_apply<decltype(tag)::value>(v.x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ft,
                                      static_cast<acc_t>(slope), v.N, v.C, v.H, v.W, v.layout);
    });
  });
  return y;
}

// ============================================================================== gradient sums
// part[(n*C + c)*4 + k] = this sample's [sum g, sum g t, g[0, 0], sum_w g[0, w] Pi[w]],
// g = act'(pre) dy.

template <Act A, typename acc_t>
inline acc_t grad_of(acc_t pre, acc_t slope, acc_t dy) {
  return act_backward(A, pre, slope, dy);
}

template <Act A, typename scalar_t, typename acc_t>
void grad_nchw(const scalar_t* dy, const scalar_t* x, const FwdTab<acc_t>& ft, const acc_t* Pi,
               acc_t slope, double* part, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  at::parallel_for(0, N * C, grain_for(2 * HW), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t c = r % C;
      const acc_t k = ft.K[c], a = ft.cx[c], bc = ft.b[c];
      const acc_t* t0 = ft.T0.data() + c * W;
      const scalar_t* px = x + r * HW;
      const scalar_t* pd = dy + r * HW;
      // row 0 (its own offsets; the Pr / Pi projections)
      acc_t s0 = 0, q0 = 0, g1 = 0, g0 = 0;
      for (int64_t w = 0; w < W; ++w) {
        const acc_t t = static_cast<acc_t>(px[w]) - k;
        const acc_t g = grad_of<A>(a * t + t0[w], slope, static_cast<acc_t>(pd[w]));
        if (w == 0) g0 = g;
        s0 += g;
        q0 += g * t;
        g1 += g * Pi[w];
      }
      // rows h > 0: one contiguous span, float lanes within a chunk, double across chunks
      double sd = s0, sdt = q0;
      for (int64_t s = W; s < HW; s += kChunk) {
        const int64_t L = std::min(kChunk, HW - s);
        const scalar_t* cx = px + s;
        const scalar_t* cd = pd + s;
        acc_t u[kL], vv[kL];
        for (int j = 0; j < kL; ++j) u[j] = vv[j] = acc_t(0);
        int64_t i = 0;
        for (; i + kL <= L; i += kL) {
          for (int j = 0; j < kL; ++j) {
            const acc_t t = static_cast<acc_t>(cx[i + j]) - k;
            const acc_t g = grad_of<A>(a * t + bc, slope, static_cast<acc_t>(cd[i + j]));
            u[j] += g;
            vv[j] += g * t;
          }
        }
        acc_t tu = 0, tv = 0;
        for (; i < L; ++i) {
          const acc_t t = static_cast<acc_t>(cx[i]) - k;
          const acc_t g = grad_of<A>(a * t + bc, slope, static_cast<acc_t>(cd[i]));
          tu += g;
          tv += g * t;
        }
        sd += lane_sum(u) + tu;
        sdt += lane_sum(vv) + tv;
      }
      double* o = part + r * 4;
      o[0] = sd;
      o[1] = sdt;
      o[2] = g0;
      o[3] = g1;
    }
  });
}

// NHWC gradient row kernel over a compile-time block of CB channels: S = sum g, T = sum g t over
// the row; kD (row 0): G0 = g at w = 0, G1 = sum_w g Pi[w]. add = T0 (row 0, [w*C + c]) or b.
template <int CB, bool kD, Act A, typename scalar_t, typename acc_t>
inline void nhwc_row_grad(const scalar_t* pd, const scalar_t* px, int64_t W, int64_t C,
                          const acc_t* kk, const acc_t* cxx, const acc_t* bb, const acc_t* T0,
                          const acc_t* Pi, acc_t slope, acc_t* S, acc_t* T, acc_t* G0,
                          acc_t* G1) {
  acc_t k[CB], a[CB], add[CB], se[CB], te[CB], g1[CB];
  for (int j = 0; j < CB; ++j) {
    k[j] = kk[j];
    a[j] = cxx[j];
    add[j] = bb[j];
    se[j] = te[j] = g1[j] = acc_t(0);
  }
  for (int64_t w = 0; w < W; ++w) {
    const scalar_t* d0 = pd + w * C;
    const scalar_t* x0 = px + w * C;
    if (kD) {
      const acc_t pw = Pi[w];
      const acc_t* t0 = T0 + w * C;
      for (int j = 0; j < CB; ++j) {
        const acc_t t = static_cast<acc_t>(x0[j]) - k[j];
        const acc_t g = grad_of<A>(a[j] * t + t0[j], slope, static_cast<acc_t>(d0[j]));
        if (w == 0) G0[j] = g;
        se[j] += g;
        te[j] += g * t;
        g1[j] += g * pw;
      }
    } else {
      for (int j = 0; j < CB; ++j) {
        const acc_t t = static_cast<acc_t>(x0[j]) - k[j];
        const acc_t g = grad_of<A>(a[j] * t + add[j], slope, static_cast<acc_t>(d0[j]));
        se[j] += g;
        te[j] += g * t;
      }
    }
  }
  for (int j = 0; j < CB; ++j) {
    S[j] = se[j];
    T[j] = te[j];
    if (kD) G1[j] = g1[j];
  }
}

template <bool kD, Act A, typename scalar_t, typename acc_t>
inline void nhwc_row_grad_all(const scalar_t* pd, const scalar_t* px, int64_t W, int64_t C,
                              int64_t cw, const acc_t* kk, const acc_t* cxx, const acc_t* bb,
                              const acc_t* T0, const acc_t* Pi, acc_t slope, acc_t* S, acc_t* T,
                              acc_t* G0, acc_t* G1) {
  int64_t c = 0;
  for (; c + 8 <= cw; c += 8)
    nhwc_row_grad<8, kD, A>(pd + c, px + c, W, C, kk + c, cxx + c, bb + c, T0 + c, Pi, slope,
                            S + c, T + c, G0 + c, G1 + c);
  if (c + 4 <= cw) {
    nhwc_row_grad<4, kD, A>(pd + c, px + c, W, C, kk + c, cxx + c, bb + c, T0 + c, Pi, slope,
                            S + c, T + c, G0 + c, G1 + c);
    c += 4;
  }
  if (c + 2 <= cw) {
    nhwc_row_grad<2, kD, A>(pd + c, px + c, W, C, kk + c, cxx + c, bb + c, T0 + c, Pi, slope,
                            S + c, T + c, G0 + c, G1 + c);
    c += 2;
  }
  if (c < cw)
    nhwc_row_grad<1, kD, A>(pd + c, px + c, W, C, kk + c, cxx + c, bb + c, T0 + c, Pi, slope,
                            S + c, T + c, G0 + c, G1 + c);
}

template <Act A, typename scalar_t, typename acc_t>
void grad_nhwc(const scalar_t* dy, const scalar_t* x, const FwdTab<acc_t>& ft, const acc_t* Pi,
               acc_t slope, double* part, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t nblk = (C + kCB - 1) / kCB;
  at::parallel_for(0, N * nblk, grain_for(2 * H * W * std::min(C, kCB)),
                   [&](int64_t b, int64_t e) {
    acc_t rS[kCB], rT[kCB], g0[kCB], g1[kCB];
    double sS[kCB], sT[kCB];
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / nblk, c0 = (task % nblk) * kCB;
      const int64_t cw = std::min(kCB, C - c0);
      for (int64_t c = 0; c < cw; ++c) sS[c] = sT[c] = 0.0;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t off = (n * H + h) * W * C + c0;
        const acc_t* kk = ft.K.data() + c0;
        const acc_t* cxx = ft.cx.data() + c0;
        const acc_t* bb = ft.b.data() + c0;
        const acc_t* t0 = ft.T0.data() + c0;
        if (h == 0)
          nhwc_row_grad_all<true, A>(dy + off, x + off, W, C, cw, kk, cxx, bb, t0, Pi, slope, rS,
                                     rT, g0, g1);
        else
          nhwc_row_grad_all<false, A>(dy + off, x + off, W, C, cw, kk, cxx, bb, t0, Pi, slope,
                                      rS, rT, g0, g1);
        for (int64_t c = 0; c < cw; ++c) {
          sS[c] += rS[c];
          sT[c] += rT[c];
        }
      }
      for (int64_t c = 0; c < cw; ++c) {
        double* o = part + (n * C + c0 + c) * 4;
        o[0] = sS[c];
        o[1] = sT[c];
        o[2] = g0[c];
        o[3] = g1[c];
      }
    }
  });
}

// The gradient-sums pass: gsums (C, 4) into `out` (double), for the coefficients saved[:, :5].
void grad_sums(const X4& v, const Tensor& dy, const double* coef, int64_t stride,
               const RowConsts& rc, Act act, double slope, double* out) {
  const int64_t N = v.N, C = v.C;
  for (int64_t i = 0; i < C * GradCol::Width; ++i) out[i] = 0.0;
  if (v.x.numel() == 0) return;
  std::unique_ptr<double[]> part(new double[N * C * 4]);  // written in full by the pass
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdTab<acc_t> ft = fwd_tab<acc_t>(coef, stride, C, v.W, rc, v.layout);
    const std::vector<acc_t> pi = cast_vec<acc_t>(rc.pi);
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    with_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      if (v.layout == Layout::NCS)
        grad_nchw<A>(dp, xp, ft, pi.data(), static_cast<acc_t>(slope), part.get(), N, C, v.H,
                     v.W);
      else
        grad_nhwc<A>(dp, xp, ft, pi.data(), static_cast<acc_t>(slope), part.get(), N, C, v.H,
                     v.W);
    });
  });
  for (int64_t n = 0; n < N; ++n)  // fixed order: deterministic
    for (int64_t c = 0; c < C; ++c)
      for (int k = 0; k < 4; ++k) out[c * 4 + k] += part[(n * C + c) * 4 + k];
}

// ============================================================================== backward apply
// dx = c_dy g + c_t t + cst [+ c_R R + c_A A (-1)^w] + [h == 0] T1[c, w], g = act'(pre) dy.

template <Act A, typename scalar_t, typename acc_t>
void bwd_apply(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const FwdTab<acc_t>& ft,
               const BwdTab<acc_t>& bt, acc_t slope, int64_t N, int64_t C, int64_t H, int64_t W,
               Layout lay, bool need_row) {
  const int64_t HW = H * W;
  if (lay == Layout::NCS) {
    at::parallel_for(0, N * C, grain_for(2 * HW), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t c = r % C;
        const acc_t k = ft.K[c], a = ft.cx[c], bc = ft.b[c];
        const acc_t cdy = bt.cdy[c], ct = bt.ct[c], cs = bt.cst[c], cr = bt.cR[c],
                    ca = bt.cA[c];
        const acc_t* t0 = ft.T0.data() + c * W;
        const acc_t* t1 = bt.T1.data() + c * W;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t base = r * HW + h * W;
          const scalar_t* px = x + base;
          const scalar_t* pd = dy + base;
          scalar_t* pdx = dx + base;
          acc_t ev = cs, od = cs;
          if (need_row) {
            acc_t R, Aa, Q;
            row_raq<false>(px, W, k, R, Aa, Q);
            const acc_t base_r = cs + cr * R, alt = ca * Aa;
            ev = base_r + alt;
            od = base_r - alt;
          }
          if (h == 0) {
            for (int64_t w = 0; w < W; ++w) {
              const acc_t t = static_cast<acc_t>(px[w]) - k;
              const acc_t g = grad_of<A>(a * t + t0[w], slope, static_cast<acc_t>(pd[w]));
              pdx[w] = static_cast<scalar_t>(cdy * g + ct * t + (((w & 1) ? od : ev) + t1[w]));
            }
            continue;
          }
          acc_t ofs[kL];
          for (int j = 0; j < kL; ++j) ofs[j] = (j & 1) ? od : ev;
          int64_t w = 0;
          for (; w + kL <= W; w += kL)
            for (int j = 0; j < kL; ++j) {
              const acc_t t = static_cast<acc_t>(px[w + j]) - k;
              const acc_t g = grad_of<A>(a * t + bc, slope, static_cast<acc_t>(pd[w + j]));
              pdx[w + j] = static_cast<scalar_t>(cdy * g + ct * t + ofs[j]);
            }
          for (; w < W; ++w) {
            const acc_t t = static_cast<acc_t>(px[w]) - k;
            const acc_t g = grad_of<A>(a * t + bc, slope, static_cast<acc_t>(pd[w]));
            pdx[w] = static_cast<scalar_t>(cdy * g + ct * t + ((w & 1) ? od : ev));
          }
        }
      }
    });
  } else {
    const acc_t* kp = ft.K.data();
    const acc_t* ap = ft.cx.data();
    const acc_t* bp = ft.b.data();
    const acc_t* cdy = bt.cdy.data();
    const acc_t* ctp = bt.ct.data();
    at::parallel_for(0, N * H, grain_for(2 * W * C), [&](int64_t b, int64_t e) {
      std::vector<acc_t> R(C), Aa(C), ev(bt.cst), od(bt.cst), ofs(C);
      for (int64_t r = b; r < e; ++r) {
        const bool row0 = (r % H) == 0;
        const scalar_t* xr = x + r * W * C;
        if (need_row) {
          for (int64_t c = 0; c < C; ++c) R[c] = Aa[c] = acc_t(0);
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* px = xr + w * C;
            if (w & 1) {
              for (int64_t c = 0; c < C; ++c) {
                const acc_t t = static_cast<acc_t>(px[c]) - kp[c];
                R[c] += t;
                Aa[c] -= t;
              }
            } else {
              for (int64_t c = 0; c < C; ++c) {
                const acc_t t = static_cast<acc_t>(px[c]) - kp[c];
                R[c] += t;
                Aa[c] += t;
              }
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            const acc_t base_r = bt.cst[c] + bt.cR[c] * R[c], alt = bt.cA[c] * Aa[c];
            ev[c] = base_r + alt;
            od[c] = base_r - alt;
          }
        }
        for (int64_t w = 0; w < W; ++w) {
          const int64_t o = (r * W + w) * C;
          const scalar_t* px = x + o;
          const scalar_t* pd = dy + o;
          scalar_t* pdx = dx + o;
          const acc_t* of = (w & 1) ? od.data() : ev.data();
          const acc_t* add = bp;
          if (row0) {
            const acc_t* t1 = bt.T1.data() + w * C;
            for (int64_t c = 0; c < C; ++c) ofs[c] = of[c] + t1[c];
            of = ofs.data();
            add = ft.T0.data() + w * C;
          }
          for (int64_t c = 0; c < C; ++c) {
            const acc_t t = static_cast<acc_t>(px[c]) - kp[c];
            const acc_t g = grad_of<A>(ap[c] * t + add[c], slope, static_cast<acc_t>(pd[c]));
            pdx[c] = static_cast<scalar_t>(cdy[c] * g + ctp[c] * t + of[c]);
          }
        }
      }
    });
  }
}

Tensor apply_backward(const X4& v, const Tensor& dy, const double* coef, int64_t stride,
                      const std::vector<BackCoef>& bc, const RowConsts& rc, Act act, double slope,
                      bool need_row) {
  Tensor dx = new_like(v);
  if (v.x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdTab<acc_t> ft = fwd_tab<acc_t>(coef, stride, v.C, v.W, rc, v.layout);
    const BwdTab<acc_t> bt = bwd_tab<acc_t>(bc, v.C, v.W, rc, v.layout);
    with_act(act, [&](auto tag) {
      bwd_apply<decltype(tag)::value>(dy.const_data_ptr<scalar_t>(),
                                      v.x.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), ft,
                                      bt, static_cast<acc_t>(slope), v.N, v.C, v.H, v.W, v.layout,
                                      need_row);
    });
  });
  return dx;
}

// ============================================================================== SBN ops

using Fwd4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Bwd3 = std::tuple<Tensor, Tensor, Tensor>;

// SBN finalize of a group's rows (P, C, 8) + the apply pass.
Fwd4 sbn_finish_rows(const X4& v, const RowConsts& rc, const double* rows, int64_t P,
                     const OptTensor& weight, const OptTensor& bias, double eps, FftNorm fn,
                     Act act, double slope, const char* op) {
  const int64_t C = v.C, H = v.H, W = v.W;
  const std::vector<double> gamma = read_channels(weight, v, 1.0, op, "weight");
  const std::vector<double> beta = read_channels(bias, v, 0.0, op, "bias");
  const double f = fft_scale(fn, H, W);
  Tensor saved = new_f64({C, SavedCol::Width}, v);
  double* sv = saved.data_ptr<double>();
  AccOut mean({C, 2}, v), var({C}, v);
  for (int64_t c = 0; c < C; ++c) {
    const Group g = combine_rows(rows, P, C, c, 0, H, W);
    TORCH_CHECK_VALUE(g.N > 0, op, ": the batch (over every process) has no samples");
    const Spectral st = spectral_stats(g.sums, g.K, g.N, H, W);
    const SbnCoef k = sbn_coef(g.K, st, gamma[c], beta[c], eps, f);
    double* o = sv + c * SavedCol::Width;
    o[SavedCol::K] = g.K;
    o[SavedCol::cx] = k.cx;
    o[SavedCol::b] = k.b;
    o[SavedCol::u] = k.u;
    o[SavedCol::v] = k.v;
    o[SavedCol::mr] = st.mr;
    o[SavedCol::mi] = st.mi;
    o[SavedCol::s] = k.s;
    o[SavedCol::a] = k.a;
    o[SavedCol::N_all] = g.N;
    mean.set(2 * c, f * st.mr);
    mean.set(2 * c + 1, f * st.mi);
    var.set(c, f * f * st.var);
  }
  Tensor y = apply_forward(v, sv, SavedCol::Width, rc, act, slope);
  return {y, mean.t, var.t, saved};
}

Tensor sbn_stats_cpu(const Tensor& x) {
  const char* op = "sbn_stats";
  const X4 v = view4(x, op);
  Tensor rows = new_f64({v.C, RowCol::Width}, v);
  stats_rows(v, RowConsts(v.W), rows.data_ptr<double>());
  return rows;
}

Fwd4 sbn_finish_cpu(const Tensor& x, const Tensor& rows_all, const OptTensor& weight,
                    const OptTensor& bias, double eps, c10::string_view fft_norm,
                    c10::string_view act, double act_param) {
  const char* op = "sbn_finish";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  TORCH_CHECK_VALUE(rows_all.dim() == 3, op, ": rows_all must have shape (P, ", v.C, ", ",
                    int(RowCol::Width), "), got ", rows_all.sizes());
  const int64_t P = rows_all.size(0);
  const Tensor rows = f64_arg(rows_all, {P, v.C, RowCol::Width}, v, op, "rows_all");
  return sbn_finish_rows(v, RowConsts(v.W), rows.const_data_ptr<double>(), P, weight, bias, eps,
                         fn, a, act_param, op);
}

Fwd4 sbn_forward_cpu(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& mean, const OptTensor& var, double eps,
                     c10::string_view fft_norm, c10::string_view act, double act_param) {
  const char* op = "sbn_forward";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  const RowConsts rc(v.W);
  const bool has_m = mean.has_value() && mean->defined(), has_v = var.has_value() && var->defined();
  TORCH_CHECK_VALUE(has_m == has_v, op, ": mean and var must both be given (eval) or both be None");
  if (!has_m) {
    std::vector<double> rows(v.C * RowCol::Width);
    stats_rows(v, rc, rows.data());
    return sbn_finish_rows(v, rc, rows.data(), 1, weight, bias, eps, fn, a, act_param, op);
  }
  // eval: coefficients from the given (m-scale) statistics, K = 0; no statistics pass
  const int64_t C = v.C, H = v.H, W = v.W;
  const std::vector<double> m2 = read_mean2(*mean, v, op, "mean");
  const std::vector<double> vr = read_channels(var, v, 0.0, op, "var");
  const std::vector<double> gamma = read_channels(weight, v, 1.0, op, "weight");
  const std::vector<double> beta = read_channels(bias, v, 0.0, op, "bias");
  const double f = fft_scale(fn, H, W);
  Tensor saved = new_f64({C, SavedCol::Width}, v);
  double* sv = saved.data_ptr<double>();
  AccOut mo({C, 2}, v), vo({C}, v);
  for (int64_t c = 0; c < C; ++c) {
    const Spectral st{m2[2 * c] / f, m2[2 * c + 1] / f, vr[c] / (f * f)};
    const SbnCoef k = sbn_coef(0.0, st, gamma[c], beta[c], eps, f);
    double* o = sv + c * SavedCol::Width;
    o[SavedCol::K] = 0.0;
    o[SavedCol::cx] = k.cx;
    o[SavedCol::b] = k.b;
    o[SavedCol::u] = k.u;
    o[SavedCol::v] = k.v;
    o[SavedCol::mr] = st.mr;
    o[SavedCol::mi] = st.mi;
    o[SavedCol::s] = k.s;
    o[SavedCol::a] = k.a;
    o[SavedCol::N_all] = double(v.N);
    mo.set(2 * c, m2[2 * c]);
    mo.set(2 * c + 1, m2[2 * c + 1]);
    vo.set(c, vr[c]);
  }
  Tensor y = apply_forward(v, sv, SavedCol::Width, rc, a, act_param);
  return {y, mo.t, vo.t, saved};
}

Tensor sbn_grad_stats_cpu(const Tensor& dy_in, const Tensor& x, const Tensor& saved_in,
                          c10::string_view act, double act_param) {
  const char* op = "sbn_grad_stats";
  const X4 v = view4(x, op);
  const Act a = act_of(act, op);
  const Tensor dy = like_x(dy_in, v, op, "dy");
  TORCH_CHECK_VALUE(saved_in.dim() == 2 && saved_in.size(0) == v.C && saved_in.size(1) >= 5, op,
                    ": saved must have shape (", v.C, ", k >= 5), got ", saved_in.sizes());
  const Tensor saved = f64_arg(saved_in, saved_in.sizes(), v, op, "saved");
  Tensor out = new_f64({v.C, GradCol::Width}, v);
  grad_sums(v, dy, saved.const_data_ptr<double>(), saved.size(1), RowConsts(v.W), a, act_param,
            out.data_ptr<double>());
  return out;
}

// SBN backward finalize from the gradient sums + the backward apply.
Bwd3 sbn_grad_finish_sums(const X4& v, const Tensor& dy, const RowConsts& rc, const double* sv,
                          const double* gl, const double* ga, bool training, FftNorm fn, Act act,
                          double slope) {
  const int64_t C = v.C, H = v.H, W = v.W;
  const double h = 1.0 / fft_scale(fn, H, W);
  AccOut dw({C}, v), db({C}, v);
  std::vector<BackCoef> bc(C);
  for (int64_t c = 0; c < C; ++c) {
    const double* s = sv + c * SavedCol::Width;
    const double* A = ga + c * GradCol::Width;
    const double K = s[SavedCol::K], a = s[SavedCol::a], sd = s[SavedCol::s];
    const double mr = s[SavedCol::mr], mi = s[SavedCol::mi];
    const SbnGrad g = sbn_grad_core(A[GradCol::Sdy], A[GradCol::Gt], A[GradCol::G0],
                                    A[GradCol::G1], K, mr, mi, sd, a, s[SavedCol::N_all], H, W,
                                    training);
    bc[c] = sbn_back_coef(a, g, H, W);
    SbnGrad mine = g;
    if (gl != ga) {
      const double* L = gl + c * GradCol::Width;
      mine = sbn_grad_core(L[GradCol::Sdy], L[GradCol::Gt], L[GradCol::G0], L[GradCol::G1], K, mr,
                           mi, sd, a, s[SavedCol::N_all], H, W, false);
    }
    dw.set(c, h * mine.dgamma);
    db.set(c, h * mine.dbeta);
  }
  Tensor dx = apply_backward(v, dy, sv, SavedCol::Width, bc, rc, act, slope, training);
  return {dx, dw.t, db.t};
}

Tensor sbn_saved_arg(const Tensor& saved, const X4& v, const char* op) {
  return f64_arg(saved, {v.C, SavedCol::Width}, v, op, "saved");
}

Bwd3 sbn_grad_finish_cpu(const Tensor& dy_in, const Tensor& x, const Tensor& saved_in,
                         const Tensor& gsums_local, const Tensor& gsums_all, bool training,
                         c10::string_view fft_norm, c10::string_view act, double act_param) {
  const char* op = "sbn_grad_finish";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  const Tensor dy = like_x(dy_in, v, op, "dy");
  const Tensor saved = sbn_saved_arg(saved_in, v, op);
  const Tensor gl = f64_arg(gsums_local, {v.C, GradCol::Width}, v, op, "gsums_local");
  const Tensor ga = f64_arg(gsums_all, {v.C, GradCol::Width}, v, op, "gsums_all");
  return sbn_grad_finish_sums(v, dy, RowConsts(v.W), saved.const_data_ptr<double>(),
                              gl.const_data_ptr<double>(), ga.const_data_ptr<double>(), training,
                              fn, a, act_param);
}

Bwd3 sbn_backward_cpu(const Tensor& dy_in, const Tensor& x, const Tensor& saved_in, bool training,
                      c10::string_view fft_norm, c10::string_view act, double act_param) {
  const char* op = "sbn_backward";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  const Tensor dy = like_x(dy_in, v, op, "dy");
  const Tensor saved = sbn_saved_arg(saved_in, v, op);
  const RowConsts rc(v.W);
  const double* sv = saved.const_data_ptr<double>();
  std::vector<double> gs(v.C * GradCol::Width);
  grad_sums(v, dy, sv, SavedCol::Width, rc, a, act_param, gs.data());
  return sbn_grad_finish_sums(v, dy, rc, sv, gs.data(), gs.data(), training, fn, a, act_param);
}

// ============================================================================== BN+SBN ops

using Fwd6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Bwd5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

struct BnSbnParams {
  std::vector<double> bn_g, bn_b, sbn_g, sbn_b;
};

BnSbnParams read_bnsbn_params(const X4& v, const OptTensor& bn_w, const OptTensor& bn_b,
                              const OptTensor& sbn_w, const OptTensor& sbn_b, const char* op) {
  return {read_channels(bn_w, v, 1.0, op, "bn_weight"), read_channels(bn_b, v, 0.0, op, "bn_bias"),
          read_channels(sbn_w, v, 1.0, op, "sbn_weight"),
          read_channels(sbn_b, v, 0.0, op, "sbn_bias")};
}

// One channel's BN+SBN forward coefficients and statistics into saved row `o` and the outputs.
struct BnSbnOut {
  AccOut bn_mean, bn_var, sbn_mean, sbn_var;
  explicit BnSbnOut(const X4& v)
      : bn_mean({v.C}, v), bn_var({v.C}, v), sbn_mean({v.C, 2}, v), sbn_var({v.C}, v) {}
};

void bnsbn_channel(const BnPart& bp, double K, double N, const Sums& sums, const Sums& local,
                   const Spectral& st, double sbn_g, double sbn_b, double sbn_eps, double f,
                   double* o) {
  const SbnCoef k = sbn_coef(bp.Kz, st, sbn_g, sbn_b, sbn_eps, f);
  o[BnSavedCol::K] = K;
  o[BnSavedCol::cx] = k.a * bp.p;
  o[BnSavedCol::b] = k.b;
  o[BnSavedCol::u] = k.u;
  o[BnSavedCol::v] = k.v;
  o[BnSavedCol::p] = bp.p;
  o[BnSavedCol::sd] = bp.sd;
  o[BnSavedCol::Kz] = bp.Kz;
  o[BnSavedCol::mr] = st.mr;
  o[BnSavedCol::mi] = st.mi;
  o[BnSavedCol::s] = k.s;
  o[BnSavedCol::a] = k.a;
  o[BnSavedCol::mbn] = bp.mbn;
  o[BnSavedCol::N_all] = N;
  store_sums(sums, o + BnSavedCol::S1);
  store_sums(local, o + BnSavedCol::L1);
}

Fwd6 bnsbn_finish_rows(const X4& v, const RowConsts& rc, const double* rows, int64_t P,
                       int64_t rank, const BnSbnParams& prm, double bn_eps, double sbn_eps,
                       FftNorm fn, Act act, double slope, const char* op) {
  const int64_t C = v.C, H = v.H, W = v.W;
  const double f = fft_scale(fn, H, W);
  Tensor saved = new_f64({C, BnSavedCol::Width}, v);
  double* sv = saved.data_ptr<double>();
  BnSbnOut out(v);
  for (int64_t c = 0; c < C; ++c) {
    const Group g = combine_rows(rows, P, C, c, rank, H, W);
    TORCH_CHECK_VALUE(g.N > 0, op, ": the batch (over every process) has no samples");
    const BnPart bp = bn_from_sums(g.sums, g.K, g.N, H, W, prm.bn_g[c], prm.bn_b[c], bn_eps);
    const Spectral st = spectral_stats(scale_sums(g.sums, bp.p), bp.Kz, g.N, H, W);
    bnsbn_channel(bp, g.K, g.N, g.sums, g.local, st, prm.sbn_g[c], prm.sbn_b[c], sbn_eps, f,
                  sv + c * BnSavedCol::Width);
    out.bn_mean.set(c, bp.mbn);
    out.bn_var.set(c, bp.vbn);
    out.sbn_mean.set(2 * c, f * st.mr);
    out.sbn_mean.set(2 * c + 1, f * st.mi);
    out.sbn_var.set(c, f * f * st.var);
  }
  Tensor y = apply_forward(v, sv, BnSavedCol::Width, rc, act, slope);
  return {y, out.bn_mean.t, out.bn_var.t, out.sbn_mean.t, out.sbn_var.t, saved};
}

Fwd6 bnsbn_finish_cpu(const Tensor& x, const Tensor& rows_all, int64_t rank,
                      const OptTensor& bn_w, const OptTensor& bn_b, const OptTensor& sbn_w,
                      const OptTensor& sbn_b, double bn_eps, double sbn_eps,
                      c10::string_view fft_norm, c10::string_view act, double act_param) {
  const char* op = "bnsbn_finish";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  TORCH_CHECK_VALUE(rows_all.dim() == 3, op, ": rows_all must have shape (P, ", v.C, ", ",
                    int(RowCol::Width), "), got ", rows_all.sizes());
  const int64_t P = rows_all.size(0);
  TORCH_CHECK_VALUE(rank >= 0 && rank < P, op, ": rank must be in [0, ", P, "), got ", rank);
  const Tensor rows = f64_arg(rows_all, {P, v.C, RowCol::Width}, v, op, "rows_all");
  const BnSbnParams prm = read_bnsbn_params(v, bn_w, bn_b, sbn_w, sbn_b, op);
  return bnsbn_finish_rows(v, RowConsts(v.W), rows.const_data_ptr<double>(), P, rank, prm,
                           bn_eps, sbn_eps, fn, a, act_param, op);
}

Fwd6 bnsbn_forward_cpu(const Tensor& x, const OptTensor& bn_w, const OptTensor& bn_b,
                       const OptTensor& bn_mean, const OptTensor& bn_var, const OptTensor& sbn_w,
                       const OptTensor& sbn_b, const OptTensor& sbn_mean,
                       const OptTensor& sbn_var, double bn_eps, double sbn_eps,
                       c10::string_view fft_norm, c10::string_view act, double act_param) {
  const char* op = "bnsbn_forward";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  const RowConsts rc(v.W);
  const BnSbnParams prm = read_bnsbn_params(v, bn_w, bn_b, sbn_w, sbn_b, op);
  const auto given = [](const OptTensor& t) { return t.has_value() && t->defined(); };
  const int n_given = given(bn_mean) + given(bn_var) + given(sbn_mean) + given(sbn_var);
  TORCH_CHECK_VALUE(n_given == 0 || n_given == 4, op,
                    ": bn_mean, bn_var, sbn_mean, sbn_var must all be given (eval) or all be None");
  if (n_given == 0) {
    std::vector<double> rows(v.C * RowCol::Width);
    stats_rows(v, rc, rows.data());
    return bnsbn_finish_rows(v, rc, rows.data(), 1, 0, prm, bn_eps, sbn_eps, fn, a, act_param,
                             op);
  }
  // eval: K = 0, no statistics pass
  const int64_t C = v.C, H = v.H, W = v.W;
  const std::vector<double> bm = read_channels(bn_mean, v, 0.0, op, "bn_mean");
  const std::vector<double> bv = read_channels(bn_var, v, 0.0, op, "bn_var");
  const std::vector<double> sm = read_mean2(*sbn_mean, v, op, "sbn_mean");
  const std::vector<double> svr = read_channels(sbn_var, v, 0.0, op, "sbn_var");
  const double f = fft_scale(fn, H, W);
  Tensor saved = new_f64({C, BnSavedCol::Width}, v);
  double* sv = saved.data_ptr<double>();
  BnSbnOut out(v);
  const Sums zero{0, 0, 0, 0, 0, 0};
  for (int64_t c = 0; c < C; ++c) {
    const BnPart bp = bn_from_stats(bm[c], bv[c], 0.0, prm.bn_g[c], prm.bn_b[c], bn_eps);
    const Spectral st{sm[2 * c] / f, sm[2 * c + 1] / f, svr[c] / (f * f)};
    bnsbn_channel(bp, 0.0, double(v.N), zero, zero, st, prm.sbn_g[c], prm.sbn_b[c], sbn_eps, f,
                  sv + c * BnSavedCol::Width);
    out.bn_mean.set(c, bm[c]);
    out.bn_var.set(c, bv[c]);
    out.sbn_mean.set(2 * c, sm[2 * c]);
    out.sbn_mean.set(2 * c + 1, sm[2 * c + 1]);
    out.sbn_var.set(c, svr[c]);
  }
  Tensor y = apply_forward(v, sv, BnSavedCol::Width, rc, a, act_param);
  return {y, out.bn_mean.t, out.bn_var.t, out.sbn_mean.t, out.sbn_var.t, saved};
}

Bwd5 bnsbn_grad_finish_sums(const X4& v, const Tensor& dy, const RowConsts& rc, const double* sv,
                            const double* gl, const double* ga, bool training, FftNorm fn, Act act,
                            double slope) {
  const int64_t C = v.C, H = v.H, W = v.W;
  const double h = 1.0 / fft_scale(fn, H, W);
  const double N_local = double(v.N);
  AccOut dgb_o({C}, v), dbb_o({C}, v), dgs_o({C}, v), dbs_o({C}, v);
  std::vector<BackCoef> bc(C);
  for (int64_t c = 0; c < C; ++c) {
    const double* s = sv + c * BnSavedCol::Width;
    const double* A = ga + c * GradCol::Width;
    const double* L = gl + c * GradCol::Width;
    const double K = s[BnSavedCol::K], p = s[BnSavedCol::p], sd = s[BnSavedCol::sd];
    const double Kz = s[BnSavedCol::Kz], mr = s[BnSavedCol::mr], mi = s[BnSavedCol::mi];
    const double ss = s[BnSavedCol::s], a = s[BnSavedCol::a], N = s[BnSavedCol::N_all];
    const SbnGrad g = sbn_grad_core(A[GradCol::Sdy], p * A[GradCol::Gt], A[GradCol::G0],
                                    A[GradCol::G1], Kz, mr, mi, ss, a, N, H, W, training);
    const SbnGrad mine =
        gl == ga ? g
                 : sbn_grad_core(L[GradCol::Sdy], p * L[GradCol::Gt], L[GradCol::G0],
                                 L[GradCol::G1], Kz, mr, mi, ss, a, N, H, W, false);
    dgs_o.set(c, h * mine.dgamma);
    dbs_o.set(c, h * mine.dbeta);
    if (training) {
      const Sums S = load_sums(s + BnSavedCol::S1);
      double sdz, sdzt;
      bn_grad_sums(S, A[GradCol::Sdy], A[GradCol::Gt], a, p, g, N, H, W, sdz, sdzt);
      const double m_t = S.S1 / (N * double(H) * double(W));
      bc[c] = bnsbn_back_coef(p, a, sd, m_t, sdz, (sdzt - m_t * sdz) / sd, g, N, H, W);
      if (gl != ga)  // this process's share: its own sums, its own samples
        bn_grad_sums(load_sums(s + BnSavedCol::L1), L[GradCol::Sdy], L[GradCol::Gt], a, p, g,
                     N_local, H, W, sdz, sdzt);
      dbb_o.set(c, sdz);
      dgb_o.set(c, (sdzt - m_t * sdz) / sd);
    } else {
      bc[c] = BackCoef{p * a, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
      dbb_o.set(c, a * L[GradCol::Sdy]);
      dgb_o.set(c, a * (L[GradCol::Gt] + (K - s[BnSavedCol::mbn]) * L[GradCol::Sdy]) / sd);
    }
  }
  Tensor dx = apply_backward(v, dy, sv, BnSavedCol::Width, bc, rc, act, slope, training);
  return {dx, dgb_o.t, dbb_o.t, dgs_o.t, dbs_o.t};
}

Tensor bnsbn_saved_arg(const Tensor& saved, const X4& v, const char* op) {
  return f64_arg(saved, {v.C, BnSavedCol::Width}, v, op, "saved");
}

Bwd5 bnsbn_grad_finish_cpu(const Tensor& dy_in, const Tensor& x, const Tensor& saved_in,
                           const Tensor& gsums_local, const Tensor& gsums_all, bool training,
                           c10::string_view fft_norm, c10::string_view act, double act_param) {
  const char* op = "bnsbn_grad_finish";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  const Tensor dy = like_x(dy_in, v, op, "dy");
  const Tensor saved = bnsbn_saved_arg(saved_in, v, op);
  const Tensor gl = f64_arg(gsums_local, {v.C, GradCol::Width}, v, op, "gsums_local");
  const Tensor ga = f64_arg(gsums_all, {v.C, GradCol::Width}, v, op, "gsums_all");
  return bnsbn_grad_finish_sums(v, dy, RowConsts(v.W), saved.const_data_ptr<double>(),
                                gl.const_data_ptr<double>(), ga.const_data_ptr<double>(),
                                training, fn, a, act_param);
}

Bwd5 bnsbn_backward_cpu(const Tensor& dy_in, const Tensor& x, const Tensor& saved_in,
                        bool training, c10::string_view fft_norm, c10::string_view act,
                        double act_param) {
  const char* op = "bnsbn_backward";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  const Tensor dy = like_x(dy_in, v, op, "dy");
  const Tensor saved = bnsbn_saved_arg(saved_in, v, op);
  const RowConsts rc(v.W);
  const double* sv = saved.const_data_ptr<double>();
  std::vector<double> gs(v.C * GradCol::Width);
  grad_sums(v, dy, sv, BnSavedCol::Width, rc, a, act_param, gs.data());
  return bnsbn_grad_finish_sums(v, dy, rc, sv, gs.data(), gs.data(), training, fn, a, act_param);
}

}  // namespace
}  // namespace sbn
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, CPU, m) {
  namespace s = normkernels::sbn;
  m.impl("sbn_stats", &s::sbn_stats_cpu);
  m.impl("sbn_finish", &s::sbn_finish_cpu);
  m.impl("sbn_forward", &s::sbn_forward_cpu);
  m.impl("sbn_grad_stats", &s::sbn_grad_stats_cpu);
  m.impl("sbn_grad_finish", &s::sbn_grad_finish_cpu);
  m.impl("sbn_backward", &s::sbn_backward_cpu);
  m.impl("bnsbn_finish", &s::bnsbn_finish_cpu);
  m.impl("bnsbn_forward", &s::bnsbn_forward_cpu);
  m.impl("bnsbn_grad_finish", &s::bnsbn_grad_finish_cpu);
  m.impl("bnsbn_backward", &s::bnsbn_backward_cpu);
}
