// SBN / BN+SBN pass kernels, CPU (schemas and semantics: csrc/sbn.cpp).
//
// x (N, C, H, W) is processed in one of two layouts:
//   NCHW (contiguous): work items are the N*C planes; each row of W values is reduced straight
//                      from x in kL lane accumulators (R, A, sum t^2; t = x - K).
//   NHWC (channels_last): the reductions run over tasks (n, kCB channels); each row (n, h) is
//                      reduced in compile-time blocks of 8 channels (tail 4/2/1) whose
//                      accumulators stay in registers (loops over c vectorized by the
//                      compiler); the apply passes over rows (n, h).
// Other layouts are made contiguous; dy is copied to x's layout when it differs.
// Accumulation: float (double for double) within a row / chunk, double across rows; every
// reduction writes per-(n, c) partial sums that are combined over n in a fixed order, so the
// result does not depend on the number of threads (deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace normkernels {
namespace sbn {
namespace {

// x as (N, C, S = H*W) in layout NCS (NCHW) or NSC (channels_last), plus its H and W.
struct X4 : View3 {
  int64_t H, W;
};

constexpr int64_t kCB = 64;       // NHWC reductions: channels per task
constexpr int64_t kChunk = 1024;  // NCHW grad stats: elements per L1 chunk

X4 view4(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": expected x of shape (N, C, H, W), got rank ", x.dim());
  X4 v;
  static_cast<View3&>(v) = make_view(x, op);
  v.H = x.size(2);
  v.W = x.size(3);
  return v;
}

// dy in x's dtype and in the layout of v.x (copy only when needed).
at::Tensor like_x(const at::Tensor& t, const X4& v, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be floating point");
  const at::Tensor r = t.scalar_type() == v.x.scalar_type() ? t : t.to(v.x.scalar_type());
  return match_layout(r, v, op, name);
}

at::Tensor small(const at::Tensor& t, const X4& v, int64_t d0, int64_t d1, const char* op,
                 const char* name) {
  const bool ok = d1 < 0 ? (t.dim() == 1 && t.size(0) == d0)
                         : (t.dim() == 2 && t.size(0) == d0 && t.size(1) == d1);
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must have shape (", d0, d1 < 0 ? "" : ", ",
                    d1 < 0 ? std::string() : std::to_string(d1), "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == v.x.device(), op, ": ", name, " must be on ", v.x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be floating point");
  return t.to(acc_type(v.x.scalar_type())).contiguous();
}

// Output like torch.empty_like(x) (the fake kernels' answer); `work` is where the kernel writes
// (the output itself when it already has v.x's layout, else a temporary copied back).
at::Tensor make_out(const at::Tensor& x_orig, const X4& v, at::Tensor& work) {
  at::Tensor out = at::empty_like(x_orig);
  const bool ok = v.layout == Layout::NCS ? out.is_contiguous()
                                     : out.is_contiguous(at::MemoryFormat::ChannelsLast);
  work = ok ? out : at::empty_like(v.x);
  return out;
}

void finish_out(at::Tensor& out, const at::Tensor& work) {
  if (!work.is_same(out)) out.copy_(work);
}

// Sum of per-(n, c) partials (N, C, k) over n in order -> (C, k) in `dt`.
at::Tensor combine(const std::vector<double>& part, int64_t N, int64_t C, int64_t k,
                   const at::TensorOptions& opt) {
  at::Tensor out = at::empty({C, k}, opt.dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < C * k; ++i) o[i] = 0.0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < C * k; ++i) o[i] += part[n * C * k + i];
  return out;
}

// Lane-accumulated reductions: kL independent accumulators (lane j takes the elements with
// index = j mod kL) that the compiler keeps in vector registers (float reductions are not
// reassociated by the compiler itself); lanes are combined in a fixed tree.  kL is even, so a
// lane's parity is the parity of w for a row starting at w = 0.
constexpr int kL = 8;

// Row of W values t = p[w] - k:  R = sum t, A = sum (-1)^w t, Q = sum t^2 (float for float).
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
    acc_t r4[4], s4[4];
    for (int j = 0; j < 4; ++j) {
      r4[j] = r[j] + r[j + 4];
      s4[j] = s[j] + s[j + 4];
    }
    e = r4[0] + r4[2];
    o = r4[1] + r4[3];
    if (kQ) q = (s4[0] + s4[2]) + (s4[1] + s4[3]);
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

// Row 0 projections: d0 = sum (p[w] - k) P0[w], d1 = sum (p[w] - k) P1[w] (k = 0 for dy).
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
  d0 = (((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))) + ta;
  d1 = (((b[0] + b[4]) + (b[2] + b[6])) + ((b[1] + b[5]) + (b[3] + b[7]))) + tb;
}

// Gradient sums on small maps (NCHW): groups of kL consecutive planes, one plane per lane; the
// planes are transposed into an L1 buffer [i][lane] so every reduction runs across lanes with no
// per-plane horizontal sums (float over the whole plane: HW < kSmallHW <= kChunk).
constexpr int64_t kSmallHW = 256;

template <typename scalar_t>
void grad_nchw_grp(const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* K,
                   const at::opmath_type<scalar_t>* P, double* part, int64_t N, int64_t C,
                   int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, NR = N * C, ng = (NR + kL - 1) / kL;
  at::parallel_for(0, ng, grain_for(2 * HW * kL), [&](int64_t b, int64_t e) {
    std::vector<acc_t> bd(HW * kL), bt(HW * kL);
    for (int64_t g = b; g < e; ++g) {
      const int64_t r0 = g * kL, nl = std::min<int64_t>(kL, NR - r0);
      if (nl < kL) {
        std::fill(bd.begin(), bd.end(), acc_t(0));
        std::fill(bt.begin(), bt.end(), acc_t(0));
      }
      for (int64_t j = 0; j < nl; ++j) {
        const scalar_t* px = x + (r0 + j) * HW;
        const scalar_t* pd = dy + (r0 + j) * HW;
        const acc_t k = K[(r0 + j) % C];
        for (int64_t i = 0; i < HW; ++i) {
          bd[i * kL + j] = static_cast<acc_t>(pd[i]);
          bt[i * kL + j] = static_cast<acc_t>(px[i]) - k;
        }
      }
      const acc_t* dp = bd.data();
      const acc_t* tp = bt.data();
      acc_t u[kL], v[kL], g0[kL], g1[kL];
      for (int j = 0; j < kL; ++j) u[j] = v[j] = g0[j] = g1[j] = acc_t(0);
      for (int64_t w = 0; w < W; ++w) {
        const acc_t p0 = P[w], p1 = P[W + w];
        for (int j = 0; j < kL; ++j) {
          g0[j] += dp[w * kL + j] * p0;
          g1[j] += dp[w * kL + j] * p1;
        }
      }
      for (int64_t i = 0; i < HW; ++i) {
        for (int j = 0; j < kL; ++j) {
          u[j] += dp[i * kL + j];
          v[j] += dp[i * kL + j] * tp[i * kL + j];
        }
      }
      for (int64_t j = 0; j < nl; ++j) {
        double* o = part + (r0 + j) * 4;
        o[0] = u[j]; o[1] = v[j]; o[2] = g0[j]; o[3] = g1[j];
      }
    }
  });
}

// ------------------------------------------------------------------------------ statistics
template <typename scalar_t>
void stats_nchw(const scalar_t* x, const at::opmath_type<scalar_t>* K,
                const at::opmath_type<scalar_t>* P, double* part, int64_t N, int64_t C,
                int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
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
      row_dots(base, W, k, P, P + W, d0, d1);
      double* o = part + r * 6;
      o[0] = s1; o[1] = s2; o[2] = sr; o[3] = sa; o[4] = d0; o[5] = d1;
    }
  });
}

// NHWC row kernels over a compile-time block of CB channels (p = x + row offset + c0, pixel
// stride C): the per-channel accumulators are fixed-size local arrays that stay in registers and
// the loops over j vectorize.  Even / odd pixels go to separate accumulators (R = E + O,
// A = E - O, as in row_raq); float within the row.  kD (row 0): also the P projections.
template <int CB, bool kD, typename scalar_t, typename acc_t>
inline void nhwc_row_stats(const scalar_t* p, int64_t W, int64_t C, const acc_t* kk,
                           const acc_t* P, acc_t* R, acc_t* A, acc_t* Q, acc_t* D0, acc_t* D1) {
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
      const acc_t u0 = P[w], u1 = P[w + 1], v0 = P[W + w], v1 = P[W + w + 1];
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
        a0[j] += t0 * P[w];
        a1[j] += t0 * P[W + w];
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
                               const acc_t* kk, const acc_t* P, acc_t* R, acc_t* A, acc_t* Q,
                               acc_t* D0, acc_t* D1) {
  int64_t c = 0;
  for (; c + 8 <= cw; c += 8)
    nhwc_row_stats<8, kD>(p + c, W, C, kk + c, P, R + c, A + c, Q + c, D0 + c, D1 + c);
  if (c + 4 <= cw) {
    nhwc_row_stats<4, kD>(p + c, W, C, kk + c, P, R + c, A + c, Q + c, D0 + c, D1 + c);
    c += 4;
  }
  if (c + 2 <= cw) {
    nhwc_row_stats<2, kD>(p + c, W, C, kk + c, P, R + c, A + c, Q + c, D0 + c, D1 + c);
    c += 2;
  }
  if (c < cw)
    nhwc_row_stats<1, kD>(p + c, W, C, kk + c, P, R + c, A + c, Q + c, D0 + c, D1 + c);
}

template <typename scalar_t>
void stats_nhwc(const scalar_t* x, const at::opmath_type<scalar_t>* K,
                const at::opmath_type<scalar_t>* P, double* part, int64_t N, int64_t C,
                int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nblk = (C + kCB - 1) / kCB;
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
          nhwc_row_stats_all<true>(p, W, C, cw, K + c0, P, rR, rA, rQ, d0, d1);
        else
          nhwc_row_stats_all<false>(p, W, C, cw, K + c0, P, rR, rA, rQ, d0, d1);
        for (int64_t c = 0; c < cw; ++c) {
          s1[c] += rR[c];
          s2[c] += rQ[c];
          sr[c] += double(rR[c]) * double(rR[c]);
          sa[c] += double(rA[c]) * double(rA[c]);
        }
      }
      for (int64_t c = 0; c < cw; ++c) {
        double* o = part + (n * C + c0 + c) * 6;
        o[0] = s1[c]; o[1] = s2[c]; o[2] = sr[c]; o[3] = sa[c]; o[4] = d0[c]; o[5] = d1[c];
      }
    }
  });
}

at::Tensor stats_cpu(const at::Tensor& x_in, const at::Tensor& K_in, const at::Tensor& P_in) {
  const char* op = "sbn_stats";
  X4 v = view4(x_in, op);
  const at::Tensor K = small(K_in, v, v.C, -1, op, "K");
  const at::Tensor P = small(P_in, v, 2, v.W, op, "P");
  std::vector<double> part(v.N * v.C * 6, 0.0);
  if (v.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
      const acc_t* kp = K.const_data_ptr<acc_t>();
      const acc_t* pp = P.const_data_ptr<acc_t>();
      if (v.layout == Layout::NCS)
        stats_nchw<scalar_t>(xp, kp, pp, part.data(), v.N, v.C, v.H, v.W);
      else
        stats_nhwc<scalar_t>(xp, kp, pp, part.data(), v.N, v.C, v.H, v.W);
    });
  }
  return combine(part, v.N, v.C, 6, v.x.options()).to(acc_type(v.x.scalar_type()));
}

// ------------------------------------------------------------------------------ gradient sums
template <typename scalar_t>
void grad_nchw(const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* K,
               const at::opmath_type<scalar_t>* P, double* part, int64_t N, int64_t C,
               int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  at::parallel_for(0, N * C, grain_for(2 * HW), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const acc_t k = K[r % C];
      const scalar_t* px = x + r * HW;
      const scalar_t* pd = dy + r * HW;
      acc_t g0, g1;
      row_dots(pd, W, acc_t(0), P, P + W, g0, g1);
      double sd = 0, sdt = 0;
      for (int64_t s0 = 0; s0 < HW; s0 += kChunk) {  // float within a chunk, double across
        const int64_t L = std::min(kChunk, HW - s0);
        const scalar_t* cx = px + s0;
        const scalar_t* cd = pd + s0;
        acc_t u[kL], v[kL];
        for (int j = 0; j < kL; ++j) u[j] = v[j] = acc_t(0);
        int64_t i = 0;
        for (; i + kL <= L; i += kL) {
          for (int j = 0; j < kL; ++j) {
            const acc_t d = static_cast<acc_t>(cd[i + j]);
            u[j] += d;
            v[j] += d * (static_cast<acc_t>(cx[i + j]) - k);
          }
        }
        acc_t tu = 0, tv = 0;
        for (; i < L; ++i) {
          const acc_t d = static_cast<acc_t>(cd[i]);
          tu += d;
          tv += d * (static_cast<acc_t>(cx[i]) - k);
        }
        sd += (((u[0] + u[4]) + (u[2] + u[6])) + ((u[1] + u[5]) + (u[3] + u[7]))) + tu;
        sdt += (((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))) + tv;
      }
      double* o = part + r * 4;
      o[0] = sd; o[1] = sdt; o[2] = g0; o[3] = g1;
    }
  });
}

// NHWC gradient row kernel over a compile-time block of CB channels (see nhwc_row_stats):
// S = sum dy, T = sum dy*t in float over the row; kD (row 0): G0/G1 = sum dy*P[0/1, w].
template <int CB, bool kD, typename scalar_t, typename acc_t>
inline void nhwc_row_grad(const scalar_t* pd, const scalar_t* px, int64_t W, int64_t C,
                          const acc_t* kk, const acc_t* P, acc_t* S, acc_t* T, acc_t* G0,
                          acc_t* G1) {
  // even / odd pixels in separate accumulators (two independent add chains), summed at the end
  acc_t k[CB], se[CB], so[CB], te[CB], to[CB], g0[CB], g1[CB];
  for (int j = 0; j < CB; ++j) {
    k[j] = kk[j];
    se[j] = so[j] = te[j] = to[j] = g0[j] = g1[j] = acc_t(0);
  }
  int64_t w = 0;
  for (; w + 1 < W; w += 2) {
    const scalar_t* d0 = pd + w * C;
    const scalar_t* d1 = d0 + C;
    const scalar_t* x0 = px + w * C;
    const scalar_t* x1 = x0 + C;
    if (kD) {
      const acc_t u0 = P[w], u1 = P[w + 1], v0 = P[W + w], v1 = P[W + w + 1];
      for (int j = 0; j < CB; ++j) {
        const acc_t a = static_cast<acc_t>(d0[j]), b = static_cast<acc_t>(d1[j]);
        se[j] += a;
        so[j] += b;
        te[j] += a * (static_cast<acc_t>(x0[j]) - k[j]);
        to[j] += b * (static_cast<acc_t>(x1[j]) - k[j]);
        g0[j] += a * u0;
        g0[j] += b * u1;
        g1[j] += a * v0;
        g1[j] += b * v1;
      }
    } else {
      for (int j = 0; j < CB; ++j) {
        const acc_t a = static_cast<acc_t>(d0[j]), b = static_cast<acc_t>(d1[j]);
        se[j] += a;
        so[j] += b;
        te[j] += a * (static_cast<acc_t>(x0[j]) - k[j]);
        to[j] += b * (static_cast<acc_t>(x1[j]) - k[j]);
      }
    }
  }
  if (w < W) {
    const scalar_t* d0 = pd + w * C;
    const scalar_t* x0 = px + w * C;
    for (int j = 0; j < CB; ++j) {
      const acc_t a = static_cast<acc_t>(d0[j]);
      se[j] += a;
      te[j] += a * (static_cast<acc_t>(x0[j]) - k[j]);
      if (kD) {
        g0[j] += a * P[w];
        g1[j] += a * P[W + w];
      }
    }
  }
  for (int j = 0; j < CB; ++j) {
    S[j] = se[j] + so[j];
    T[j] = te[j] + to[j];
    if (kD) {
      G0[j] = g0[j];
      G1[j] = g1[j];
    }
  }
}

template <bool kD, typename scalar_t, typename acc_t>
inline void nhwc_row_grad_all(const scalar_t* pd, const scalar_t* px, int64_t W, int64_t C,
                              int64_t cw, const acc_t* kk, const acc_t* P, acc_t* S, acc_t* T,
                              acc_t* G0, acc_t* G1) {
  int64_t c = 0;
  for (; c + 8 <= cw; c += 8)
    nhwc_row_grad<8, kD>(pd + c, px + c, W, C, kk + c, P, S + c, T + c, G0 + c, G1 + c);
  if (c + 4 <= cw) {
    nhwc_row_grad<4, kD>(pd + c, px + c, W, C, kk + c, P, S + c, T + c, G0 + c, G1 + c);
    c += 4;
  }
  if (c + 2 <= cw) {
    nhwc_row_grad<2, kD>(pd + c, px + c, W, C, kk + c, P, S + c, T + c, G0 + c, G1 + c);
    c += 2;
  }
  if (c < cw)
    nhwc_row_grad<1, kD>(pd + c, px + c, W, C, kk + c, P, S + c, T + c, G0 + c, G1 + c);
}

template <typename scalar_t>
void grad_nhwc(const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* K,
               const at::opmath_type<scalar_t>* P, double* part, int64_t N, int64_t C,
               int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
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
        if (h == 0)
          nhwc_row_grad_all<true>(dy + off, x + off, W, C, cw, K + c0, P, rS, rT, g0, g1);
        else
          nhwc_row_grad_all<false>(dy + off, x + off, W, C, cw, K + c0, P, rS, rT, g0, g1);
        for (int64_t c = 0; c < cw; ++c) {
          sS[c] += rS[c];
          sT[c] += rT[c];
        }
      }
      for (int64_t c = 0; c < cw; ++c) {
        double* o = part + (n * C + c0 + c) * 4;
        o[0] = sS[c]; o[1] = sT[c]; o[2] = g0[c]; o[3] = g1[c];
      }
    }
  });
}

at::Tensor grad_stats_cpu(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& K_in,
                          const at::Tensor& P_in) {
  const char* op = "sbn_grad_stats";
  X4 v = view4(x_in, op);
  const at::Tensor dy = like_x(dy_in, v, op, "dy");
  const at::Tensor K = small(K_in, v, v.C, -1, op, "K");
  const at::Tensor P = small(P_in, v, 2, v.W, op, "P");
  std::vector<double> part(v.N * v.C * 4, 0.0);
  if (v.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
      const scalar_t* dp = dy.const_data_ptr<scalar_t>();
      const acc_t* kp = K.const_data_ptr<acc_t>();
      const acc_t* pp = P.const_data_ptr<acc_t>();
      if (v.layout == Layout::NCS && v.H * v.W < kSmallHW && v.N * v.C >= kL)
        grad_nchw_grp<scalar_t>(dp, xp, kp, pp, part.data(), v.N, v.C, v.H, v.W);
      else if (v.layout == Layout::NCS)
        grad_nchw<scalar_t>(dp, xp, kp, pp, part.data(), v.N, v.C, v.H, v.W);
      else
        grad_nhwc<scalar_t>(dp, xp, kp, pp, part.data(), v.N, v.C, v.H, v.W);
    });
  }
  return combine(part, v.N, v.C, 4, v.x.options()).to(acc_type(v.x.scalar_type()));
}

// ------------------------------------------------------------------------------ forward apply
// y = cx*(x - K) + (h > 0 ? b : T0[c, w]),  T0 = b*(1 - P0) + u*P0 + v*P1.
template <typename scalar_t>
void fwd_apply(const scalar_t* x, scalar_t* y, const at::opmath_type<scalar_t>* cf,
               const at::opmath_type<scalar_t>* P, int64_t N, int64_t C, int64_t H, int64_t W,
               Layout lay) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> K(C), cx(C), bb(C), T0(C * W);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* r = cf + c * 5;
    K[c] = r[0];
    cx[c] = r[1];
    bb[c] = r[2];
    for (int64_t w = 0; w < W; ++w) {
      const acc_t t0 = r[2] * (acc_t(1) - P[w]) + r[3] * P[w] + r[4] * P[W + w];
      if (lay == Layout::NCS)
        T0[c * W + w] = t0;
      else
        T0[w * C + c] = t0;
    }
  }
  const int64_t HW = H * W;
  if (lay == Layout::NCS) {
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t c = r % C;
        const acc_t k = K[c], a = cx[c], bc = bb[c];
        const acc_t* t0 = T0.data() + c * W;
        const scalar_t* px = x + r * HW;
        scalar_t* py = y + r * HW;
        for (int64_t w = 0; w < W; ++w)
          py[w] = static_cast<scalar_t>(a * (static_cast<acc_t>(px[w]) - k) + t0[w]);
        for (int64_t i = W; i < HW; ++i)
          py[i] = static_cast<scalar_t>(a * (static_cast<acc_t>(px[i]) - k) + bc);
      }
    });
  } else {
    const acc_t* kp = K.data();
    const acc_t* ap = cx.data();
    const acc_t* bp = bb.data();
    at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const bool row0 = (r % H) == 0;
        for (int64_t w = 0; w < W; ++w) {
          const scalar_t* px = x + (r * W + w) * C;
          scalar_t* py = y + (r * W + w) * C;
          const acc_t* add = row0 ? T0.data() + w * C : bp;
          for (int64_t c = 0; c < C; ++c)
            py[c] = static_cast<scalar_t>(ap[c] * (static_cast<acc_t>(px[c]) - kp[c]) + add[c]);
        }
      }
    });
  }
}

at::Tensor forward_apply_cpu(const at::Tensor& x_in, const at::Tensor& coef_in,
                             const at::Tensor& P_in) {
  const char* op = "sbn_forward_apply";
  X4 v = view4(x_in, op);
  const at::Tensor cf = small(coef_in, v, v.C, 5, op, "coef");
  const at::Tensor P = small(P_in, v, 2, v.W, op, "P");
  at::Tensor work;
  at::Tensor out = make_out(x_in, v, work);
  if (v.x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_apply<scalar_t>(v.x.const_data_ptr<scalar_t>(), work.data_ptr<scalar_t>(),
                        cf.const_data_ptr<acc_t>(), P.const_data_ptr<acc_t>(), v.N, v.C, v.H,
                        v.W, v.layout);
  });
  finish_out(out, work);
  return out;
}

// ------------------------------------------------------------------------------ backward apply
// dx = c_dy*dy + c_t*t + cst [+ c_R*R + c_A*A*(-1)^w] + [h==0] T0[c, w],  T0 = u*P0 + v*P1.
template <typename scalar_t>
void bwd_apply(const scalar_t* dy, const scalar_t* x, scalar_t* dx,
               const at::opmath_type<scalar_t>* cf, const at::opmath_type<scalar_t>* P,
               int64_t N, int64_t C, int64_t H, int64_t W, Layout lay, bool need_row) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> K(C), cdy(C), ct(C), cR(C), cA(C), cst(C), T0(C * W);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* r = cf + c * 8;
    K[c] = r[0];
    cdy[c] = r[1];
    ct[c] = r[2];
    cR[c] = r[3];
    cA[c] = r[4];
    cst[c] = r[5];
    for (int64_t w = 0; w < W; ++w) {
      const acc_t t0 = r[6] * P[w] + r[7] * P[W + w];
      if (lay == Layout::NCS)
        T0[c * W + w] = t0;
      else
        T0[w * C + c] = t0;
    }
  }
  const int64_t HW = H * W;
  if (lay == Layout::NCS) {
    at::parallel_for(0, N * C, grain_for(2 * HW), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t c = r % C;
        const acc_t k = K[c], a = cdy[c], bt = ct[c], cs = cst[c], cr = cR[c], ca = cA[c];
        const acc_t* t0 = T0.data() + c * W;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t base = r * HW + h * W;
          const scalar_t* px = x + base;
          const scalar_t* pd = dy + base;
          scalar_t* pdx = dx + base;
          acc_t ev = cs, od = cs;
          if (need_row) {
            acc_t R, A, Q;
            row_raq<false>(px, W, k, R, A, Q);
            const acc_t base_r = cs + cr * R, alt = ca * A;
            ev = base_r + alt;
            od = base_r - alt;
          }
          if (h == 0) {
            for (int64_t w = 0; w < W; ++w)
              pdx[w] = static_cast<scalar_t>(a * static_cast<acc_t>(pd[w]) +
                                             bt * (static_cast<acc_t>(px[w]) - k) +
                                             (((w & 1) ? od : ev) + t0[w]));
            continue;
          }
          acc_t ofs[kL];
          for (int j = 0; j < kL; ++j) ofs[j] = (j & 1) ? od : ev;
          int64_t w = 0;
          for (; w + kL <= W; w += kL)
            for (int j = 0; j < kL; ++j)
              pdx[w + j] = static_cast<scalar_t>(a * static_cast<acc_t>(pd[w + j]) +
                                                 bt * (static_cast<acc_t>(px[w + j]) - k) +
                                                 ofs[j]);
          for (; w < W; ++w)
            pdx[w] = static_cast<scalar_t>(a * static_cast<acc_t>(pd[w]) +
                                           bt * (static_cast<acc_t>(px[w]) - k) +
                                           ((w & 1) ? od : ev));
        }
      }
    });
  } else {
    const acc_t* kp = K.data();
    const acc_t* ap = cdy.data();
    const acc_t* tp = ct.data();
    at::parallel_for(0, N * H, grain_for(2 * W * C), [&](int64_t b, int64_t e) {
      std::vector<acc_t> R(C), A(C), ev(cst), od(cst), add(C);
      for (int64_t r = b; r < e; ++r) {
        const bool row0 = (r % H) == 0;
        const scalar_t* xr = x + r * W * C;
        if (need_row) {
          for (int64_t c = 0; c < C; ++c) R[c] = A[c] = acc_t(0);
          for (int64_t w = 0; w < W; ++w) {
            const scalar_t* px = xr + w * C;
            const acc_t sg = (w & 1) ? acc_t(-1) : acc_t(1);
            for (int64_t c = 0; c < C; ++c) {
              const acc_t t = static_cast<acc_t>(px[c]) - kp[c];
              R[c] += t;
              A[c] += sg * t;
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            const acc_t base_r = cst[c] + cR[c] * R[c], alt = cA[c] * A[c];
            ev[c] = base_r + alt;
            od[c] = base_r - alt;
          }
        }
        for (int64_t w = 0; w < W; ++w) {
          const int64_t o = (r * W + w) * C;
          const scalar_t* px = x + o;
          const scalar_t* pd = dy + o;
          scalar_t* pdx = dx + o;
          const acc_t* ofs = (w & 1) ? od.data() : ev.data();
          if (row0) {
            const acc_t* t0 = T0.data() + w * C;
            for (int64_t c = 0; c < C; ++c) add[c] = ofs[c] + t0[c];
            ofs = add.data();
          }
          for (int64_t c = 0; c < C; ++c)
            pdx[c] = static_cast<scalar_t>(ap[c] * static_cast<acc_t>(pd[c]) +
                                           tp[c] * (static_cast<acc_t>(px[c]) - kp[c]) + ofs[c]);
        }
      }
    });
  }
}

at::Tensor backward_apply_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                              const at::Tensor& coef_in, const at::Tensor& P_in, bool need_row) {
  const char* op = "sbn_backward_apply";
  X4 v = view4(x_in, op);
  const at::Tensor dy = like_x(dy_in, v, op, "dy");
  const at::Tensor cf = small(coef_in, v, v.C, 8, op, "coef");
  const at::Tensor P = small(P_in, v, 2, v.W, op, "P");
  at::Tensor work;
  at::Tensor out = make_out(x_in, v, work);
  if (v.x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bwd_apply<scalar_t>(dy.const_data_ptr<scalar_t>(), v.x.const_data_ptr<scalar_t>(),
                        work.data_ptr<scalar_t>(), cf.const_data_ptr<acc_t>(),
                        P.const_data_ptr<acc_t>(), v.N, v.C, v.H, v.W, v.layout, need_row);
  });
  finish_out(out, work);
  return out;
}

}  // namespace
}  // namespace sbn
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, CPU, m) {
  m.impl("sbn_stats", &normkernels::sbn::stats_cpu);
  m.impl("sbn_grad_stats", &normkernels::sbn::grad_stats_cpu);
  m.impl("sbn_forward_apply", &normkernels::sbn::forward_apply_cpu);
  m.impl("sbn_backward_apply", &normkernels::sbn::backward_apply_cpu);
}
