// L2BN ops on CPU: each op is ONE leaf op (its outputs allocated with at::empty, every pass and the
// finalize in the loops below; no aten compute op inside).
//   passes   x viewed as (N, C, S) in layout NCS (rows of S contiguous values) or NSC (for each n,
//            an S x C row-major block); accumulation in float (double for double).
//   finalize float64, the formulas of csrc/l2bn_finalize.h; each sample's sums run over c in
//            order and each channel's over n in order, so the result does not depend on the
//            number of threads (nor on how the rows were split among them).
//   apply    y = act(pre) / dx, per-(n, c) coefficients.
// GCC: the activation selects (leaky_relu's pre * slope, silu) may be evaluated speculatively,
// which lets the elementwise loops be if-converted and vectorized instead of branching per
// element. Only floating-point exception flags are affected, never a value. Set before every
// include so that all inline functions of this file share the option (and stay inlinable).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <tuple>

#include "../activation.h"
#include "../l2bn.h"

namespace normkernels {
namespace l2bn {
namespace {

constexpr int64_t kChunk = 1024;  // NCS: elements per chunk (two passes over an L1-resident chunk)
constexpr int64_t kCBlock = 128;  // NSC: channels per task
constexpr int64_t kSRows = 32;    // NSC: spatial rows per chunk

template <typename acc_t>
inline void chan_combine(acc_t& n_a, acc_t& mean_a, acc_t& m2_a, acc_t n_b, acc_t mean_b,
                         acc_t m2_b) {
  const acc_t n = n_a + n_b;
  if (n_b == acc_t(0)) return;
  const acc_t delta = mean_b - mean_a;
  const acc_t w = n_b / n;
  mean_a += delta * w;
  m2_a += m2_b + delta * delta * n_a * w;
  n_a = n;
}

// ---------------------------------------------------------------- lane reductions
// Sums over a short contiguous run written so the compiler vectorizes them at the baseline ISA:
// kWide independent lane accumulators for the bulk, folded (fixed order) into kNarrow lanes,
// which also take the kNarrow-wide tail, then the scalar remainder, then a fixed pairwise tree.
// No buffer copy and no per-row setup beyond a few register zeroings, so short rows are cheap;
// the summation order is a fixed function of the length (deterministic).
template <typename acc_t>
struct Lanes {
  static constexpr int kNarrow = 16 / sizeof(acc_t);  // 4 float, 2 double (one SSE register)
};

// A kNarrow-wide vector of acc_t: GCC/Clang vector extension (lowered to the baseline ISA),
// plain array elsewhere (same arithmetic, same order, only slower).
#if defined(__GNUC__) || defined(__clang__)
template <typename acc_t>
struct LaneVec {
  typedef acc_t type __attribute__((vector_size(16)));
};
template <typename acc_t>
using lane_t = typename LaneVec<acc_t>::type;
#else
template <typename acc_t>
struct lane_t {
  acc_t v[Lanes<acc_t>::kNarrow];
  acc_t& operator[](int j) { return v[j]; }
  acc_t operator[](int j) const { return v[j]; }
  friend lane_t operator-(lane_t a, acc_t b) {
    for (auto& e : a.v) e -= b;
    return a;
  }
  friend lane_t operator-(lane_t a, const lane_t& b) {
    for (int j = 0; j < Lanes<acc_t>::kNarrow; ++j) a.v[j] -= b.v[j];
    return a;
  }
  friend lane_t operator*(lane_t a, const lane_t& b) {
    for (int j = 0; j < Lanes<acc_t>::kNarrow; ++j) a.v[j] *= b.v[j];
    return a;
  }
};
#endif

template <typename acc_t, typename V>
inline void lane_fill(V& v, acc_t c) {  // broadcast (built in registers, not element by element)
#if defined(__GNUC__) || defined(__clang__)
  v = V{} + c;
#else
  for (int j = 0; j < Lanes<acc_t>::kNarrow; ++j) v[j] = c;
#endif
}
template <typename acc_t, typename V>
inline void lane_zero(V& v) {
  lane_fill<acc_t>(v, acc_t(0));
}
template <typename acc_t, typename V>
inline void lane_add(V& a, const V& b) {
  for (int j = 0; j < Lanes<acc_t>::kNarrow; ++j) a[j] += b[j];
}
template <typename acc_t, typename scalar_t, typename V>
inline void lane_load(V& v, const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, p, sizeof(acc_t) * Lanes<acc_t>::kNarrow);
  } else {
    for (int j = 0; j < Lanes<acc_t>::kNarrow; ++j) v[j] = static_cast<acc_t>(p[j]);
  }
}

template <typename acc_t, typename V>
inline acc_t tree_sum(const V& a) {
  constexpr int K = Lanes<acc_t>::kNarrow;
  if constexpr (K == 4) {
    return (a[0] + a[2]) + (a[1] + a[3]);
  } else {
    static_assert(K == 2, "lane count");
    return a[0] + a[1];
  }
}

// (sum dy, sum dy*(x - ctr)) over L elements in one sweep, same order scheme as lane_sum.
template <typename acc_t, typename dy_t, typename scalar_t>
inline void lane_sums_dy(const dy_t* pd, const scalar_t* px, acc_t ctr, int64_t L, acc_t& sq,
                         acc_t& spc) {
  using V = lane_t<acc_t>;
  constexpr int K = Lanes<acc_t>::kNarrow;
  V q0, q1, c0, c1, vc;
  lane_fill<acc_t>(vc, ctr);
  lane_zero<acc_t>(q0);
  lane_zero<acc_t>(c0);
  int64_t i = 0;
  if (L >= 2 * K) {
    lane_zero<acc_t>(q1);
    lane_zero<acc_t>(c1);
    for (; i + 2 * K <= L; i += 2 * K) {
      V d0, d1, x0, x1;
      lane_load<acc_t>(d0, pd + i);
      lane_load<acc_t>(d1, pd + i + K);
      lane_load<acc_t>(x0, px + i);
      lane_load<acc_t>(x1, px + i + K);
      lane_add<acc_t>(q0, d0);
      lane_add<acc_t>(q1, d1);
      lane_add<acc_t>(c0, d0 * (x0 - vc));
      lane_add<acc_t>(c1, d1 * (x1 - vc));
    }
    lane_add<acc_t>(q0, q1);
    lane_add<acc_t>(c0, c1);
  }
  for (; i + K <= L; i += K) {
    V d, xv;
    lane_load<acc_t>(d, pd + i);
    lane_load<acc_t>(xv, px + i);
    lane_add<acc_t>(q0, d);
    lane_add<acc_t>(c0, d * (xv - vc));
  }
  acc_t tq = acc_t(0), tc = acc_t(0);
  for (; i < L; ++i) {
    const acc_t d = static_cast<acc_t>(pd[i]);
    tq += d;
    tc += d * (static_cast<acc_t>(px[i]) - ctr);
  }
  sq = tree_sum<acc_t>(q0) + tq;
  spc = tree_sum<acc_t>(c0) + tc;
}

// NCS row tasks: enough rows per task that short rows do not pay a task each.
inline int64_t row_grain(int64_t S) { return std::max<int64_t>(16, grain_for(S)); }

// ---------------------------------------------------------------- sample stats
// Short rows of float / half / bfloat16: one pass in double over the values shifted by the row's
// first element, d = x - x[0] (exact in double), accumulating sum d and sum d^2; then
// mean = x[0] + sum/S and M2 = sum d^2 - (sum d)^2 / S. Since x[0] is one of the values,
// S (x[0] - mean)^2 <= (S - 1) M2, so the cancellation costs at most a factor S on the
// double rounding error (~S^2 * 1e-16 relative), far below float output precision.
// Each row's summation order is a fixed function of S (deterministic, independent of how rows
// are split across threads); rows are independent, so their short chains overlap.
constexpr int64_t kOnePassMaxS = 64;

#if defined(__GNUC__) || defined(__clang__)
typedef double d2_t __attribute__((vector_size(16)));
typedef float f4_t __attribute__((vector_size(16)));
typedef float f2_t __attribute__((vector_size(8)));
#endif

template <typename scalar_t>
inline void row_stats_1p(const scalar_t* p, int64_t S, double& sum, double& sq) {
  const double x0 = static_cast<double>(static_cast<float>(p[0]));
  int64_t i = 0;
#if defined(__GNUC__) || defined(__clang__)
  const d2_t v0 = d2_t{} + x0;
  d2_t s0{}, s1{}, s2{}, s3{}, q0{}, q1{}, q2{}, q3{};
  auto load4 = [&](const scalar_t* q, d2_t& a, d2_t& b) {
    if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(__SSE2__)
      const __m128 f = _mm_loadu_ps(q);
      a = (d2_t)_mm_cvtps_pd(f) - v0;
      b = (d2_t)_mm_cvtps_pd(_mm_movehl_ps(f, f)) - v0;
#else
      f4_t f;
      std::memcpy(&f, q, sizeof(f));
      a = __builtin_convertvector(__builtin_shufflevector(f, f, 0, 1), d2_t) - v0;
      b = __builtin_convertvector(__builtin_shufflevector(f, f, 2, 3), d2_t) - v0;
#endif
    } else {
      a = d2_t{static_cast<double>(static_cast<float>(q[0])),
               static_cast<double>(static_cast<float>(q[1]))} - v0;
      b = d2_t{static_cast<double>(static_cast<float>(q[2])),
               static_cast<double>(static_cast<float>(q[3]))} - v0;
    }
  };
  for (; i + 8 <= S; i += 8) {
    d2_t a, b, c, d;
    load4(p + i, a, b);
    load4(p + i + 4, c, d);
    s0 += a;
    s1 += b;
    s2 += c;
    s3 += d;
    q0 += a * a;
    q1 += b * b;
    q2 += c * c;
    q3 += d * d;
  }
  if (i + 4 <= S) {
    d2_t a, b;
    load4(p + i, a, b);
    s0 += a;
    s1 += b;
    q0 += a * a;
    q1 += b * b;
    i += 4;
  }
  s0 = (s0 + s2) + (s1 + s3);
  q0 = (q0 + q2) + (q1 + q3);
  sum = s0[0] + s0[1];
  sq = q0[0] + q0[1];
#else
  double s[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0};
  for (; i + 4 <= S; i += 4)
    for (int j = 0; j < 4; ++j) {
      const double d = static_cast<double>(static_cast<float>(p[i + j])) - x0;
      s[j] += d;
      q[j] += d * d;
    }
  sum = (s[0] + s[2]) + (s[1] + s[3]);
  sq = (q[0] + q[2]) + (q[1] + q[3]);
#endif
  for (; i < S; ++i) {
    const double d = static_cast<double>(static_cast<float>(p[i])) - x0;
    sum += d;
    sq += d * d;
  }
}

template <typename scalar_t>
void stats_ncs_1p(const scalar_t* x, float* mean, float* m2, int64_t R, int64_t S) {
  const double invS = 1.0 / static_cast<double>(S);
  at::parallel_for(0, R, row_grain(S), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* p = x + r * S;
      double sum, sq;
      row_stats_1p<scalar_t>(p, S, sum, sq);
      const double md = sum * invS;
      mean[r] = static_cast<float>(static_cast<double>(static_cast<float>(p[0])) + md);
      m2[r] = static_cast<float>(std::max(0.0, sq - sum * md));
    }
  });
}

template <typename scalar_t>
void stats_ncs(const scalar_t* x, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* m2,
               int64_t R, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    static_assert(std::is_same_v<acc_t, float>, "float accumulator");
    if (S <= kOnePassMaxS) return stats_ncs_1p<scalar_t>(x, mean, m2, R, S);
  }
  at::parallel_for(0, R, grain_for(S), [&](int64_t b, int64_t e) {
    acc_t buf[kChunk];
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* p = x + r * S;
      acc_t n_a = 0, mean_a = 0, m2_a = 0;
      for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
        const int64_t L = std::min(kChunk, S - s0);
        for (int64_t i = 0; i < L; ++i) buf[i] = static_cast<acc_t>(p[s0 + i]);
        const acc_t sum = at::vec::reduce_all<acc_t>(
            [](Vec& a, Vec& c) { return a + c; }, buf, L);
        const acc_t mb = sum / acc_t(L);
        const acc_t m2b = at::vec::map_reduce_all<acc_t>(
            [mb](Vec v) {
              Vec d = v - Vec(mb);
              return d * d;
            },
            [](Vec a, Vec c) { return a + c; }, buf, L);
        chan_combine<acc_t>(n_a, mean_a, m2_a, acc_t(L), mb, m2b);
      }
      mean[r] = mean_a;
      m2[r] = m2_a;
    }
  });
}

// NSC channel grouping. For C below kCBlock, rows are regrouped: the (S, C) block of a sample is
// read as (S/m, C*m) with m | S, i.e. m "virtual channels" per channel (virtual channel g*C + c
// sees spatial rows s = m*s' + g), so the inner loops run over C*m contiguous values instead of
// a few; the m partial results of a channel are folded afterwards in a fixed order.
inline int64_t nsc_group(int64_t C, int64_t S) {
  if (C >= 16) return 1;  // wide enough already; folding m partials costs more than it saves
  int64_t best = 1;
  for (int64_t m = 2; m * C <= kCBlock && m <= S; ++m)
    if (S % m == 0) best = m;
  return best;
}

// Two-pass stats of W channels (ld apart between rows) over Srows rows, chunked by kSRows with
// Chan combination across chunks. Writes run_mean[W], run_m2[W].
template <typename scalar_t>
inline void stats_block(const scalar_t* base, int64_t ld, int64_t W, int64_t Srows,
                        at::opmath_type<scalar_t>* run_mean, at::opmath_type<scalar_t>* run_m2) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t sum[kCBlock], m2b[kCBlock];
  acc_t n_a = 0;
  for (int64_t c = 0; c < W; ++c) run_mean[c] = run_m2[c] = acc_t(0);
  for (int64_t s0 = 0; s0 < Srows; s0 += kSRows) {
    const int64_t L = std::min(kSRows, Srows - s0);
    for (int64_t c = 0; c < W; ++c) sum[c] = m2b[c] = acc_t(0);
    for (int64_t s = s0; s < s0 + L; ++s) {
      const scalar_t* row = base + s * ld;
      for (int64_t c = 0; c < W; ++c) sum[c] += static_cast<acc_t>(row[c]);
    }
    const acc_t inv = acc_t(1) / acc_t(L);
    for (int64_t c = 0; c < W; ++c) sum[c] *= inv;  // chunk mean
    for (int64_t s = s0; s < s0 + L; ++s) {
      const scalar_t* row = base + s * ld;
      for (int64_t c = 0; c < W; ++c) {
        const acc_t d = static_cast<acc_t>(row[c]) - sum[c];
        m2b[c] += d * d;
      }
    }
    const acc_t n_b = acc_t(L), n_tot = n_a + n_b, w = n_b / n_tot, cross = n_a * w;
    for (int64_t c = 0; c < W; ++c) {
      const acc_t delta = sum[c] - run_mean[c];
      run_mean[c] += delta * w;
      run_m2[c] += m2b[c] + delta * delta * cross;
    }
    n_a = n_tot;
  }
}

template <typename scalar_t>
void stats_nsc(const scalar_t* x, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* m2,
               int64_t N, int64_t C, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = nsc_group(C, S);
  if (m > 1) {
    const int64_t W = C * m, Sg = S / m;
    at::parallel_for(0, N, grain_for(S * C), [&](int64_t b, int64_t e) {
      acc_t run_mean[kCBlock], run_m2[kCBlock];
      for (int64_t n = b; n < e; ++n) {
        stats_block<scalar_t>(x + n * S * C, W, W, Sg, run_mean, run_m2);
        for (int64_t c = 0; c < C; ++c) {
          acc_t n_a = acc_t(Sg), mean_a = run_mean[c], m2_a = run_m2[c];
          for (int64_t g = 1; g < m; ++g)
            chan_combine<acc_t>(n_a, mean_a, m2_a, acc_t(Sg), run_mean[g * C + c],
                                run_m2[g * C + c]);
          mean[n * C + c] = mean_a;
          m2[n * C + c] = m2_a;
        }
      }
    });
    return;
  }
  const int64_t nblk = (C + kCBlock - 1) / kCBlock;
  at::parallel_for(0, N * nblk, grain_for(S * std::min(C, kCBlock)), [&](int64_t b, int64_t e) {
    acc_t run_mean[kCBlock], run_m2[kCBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nblk, c0 = (t % nblk) * kCBlock;
      const int64_t W = std::min(kCBlock, C - c0);
      stats_block<scalar_t>(x + n * S * C + c0, C, W, S, run_mean, run_m2);
      for (int64_t c = 0; c < W; ++c) {
        mean[n * C + c0 + c] = run_mean[c];
        m2[n * C + c0 + c] = run_m2[c];
      }
    }
  });
}

template <typename scalar_t>
void stats_pass(const View3& v, at::opmath_type<scalar_t>* m, at::opmath_type<scalar_t>* m2) {
  const int64_t rows = v.N * v.C;
  if (rows == 0) return;
  if (v.S == 0) {  // empty rows: mean 0, no spread
    for (int64_t i = 0; i < rows; ++i) m[i] = m2[i] = 0;
    return;
  }
  const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
  if (v.layout == Layout::NCS)
    stats_ncs<scalar_t>(xp, m, m2, rows, v.S);
  else
    stats_nsc<scalar_t>(xp, m, m2, v.N, v.C, v.S);
}

// ---------------------------------------------------------------- activation dispatch
template <typename F>
inline void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::ReLU: f(std::integral_constant<Act, Act::ReLU>{}); break;
    case Act::LeakyReLU: f(std::integral_constant<Act, Act::LeakyReLU>{}); break;
    case Act::SiLU: f(std::integral_constant<Act, Act::SiLU>{}); break;
    default: f(std::integral_constant<Act, Act::Identity>{}); break;
  }
}

template <typename acc_t>
inline acc_t fold_lanes(const acc_t* q) {
  constexpr int K = Lanes<acc_t>::kNarrow;
  if constexpr (K == 4) {
    return (q[0] + q[2]) + (q[1] + q[3]);
  } else {
    return q[0] + q[1];
  }
}

// ---------------------------------------------------------------- gradient sums
// Q = sum_s g, P = sum_s g (x - center), g = act'(pre) dy with pre recomputed as the forward did.
// A chunk (L <= kChunk) of one row: g into a buffer (a plain elementwise loop, which vectorizes),
// then the same lane sums as for g = dy.
template <typename acc_t, typename scalar_t, Act A>
inline void row_grad_sums_act(const scalar_t* pd, const scalar_t* px, acc_t ctr, acc_t a, acc_t b,
                              acc_t slope, int64_t L, acc_t& sq, acc_t& sp) {
  acc_t g[kChunk];
  for (int64_t i = 0; i < L; ++i)
    g[i] = act_backward<acc_t>(A, pre_act<acc_t>(static_cast<acc_t>(px[i]), ctr, a, b), slope,
                               static_cast<acc_t>(pd[i]));
  lane_sums_dy<acc_t>(g, px, ctr, L, sq, sp);
}

// Pass operands: the saved forward coefficients (center, x_coef, offset planes) and slope.
template <typename acc_t>
struct RowCoefs {
  const acc_t* center;
  const acc_t* x_coef;
  const acc_t* offset;
  acc_t slope;
};

template <typename scalar_t, Act A>
void sums_ncs(const scalar_t* dy, const scalar_t* x, const RowCoefs<at::opmath_type<scalar_t>>& rc,
              at::opmath_type<scalar_t>* q, at::opmath_type<scalar_t>* p, int64_t R, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, R, row_grain(2 * S), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* px = x + r * S;
      const scalar_t* pd = dy + r * S;
      const acc_t ctr = rc.center[r];
      acc_t sp = 0, sq = 0;
      for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
        const int64_t L = std::min(kChunk, S - s0);
        acc_t cq, cp;
        if constexpr (A == Act::Identity)
          lane_sums_dy<acc_t>(pd + s0, px + s0, ctr, L, cq, cp);
        else
          row_grad_sums_act<acc_t, scalar_t, A>(pd + s0, px + s0, ctr, rc.x_coef[r], rc.offset[r],
                                                rc.slope, L, cq, cp);
        sq += cq;
        sp += cp;
      }
      p[r] = sp;
      q[r] = sq;
    }
  });
}

// One-pass sums of W channels (ld apart between rows) over Srows rows, per-chunk partials added
// in order. ctr / a / b [W] hold the channels' coefficients. Writes tot_p[W], tot_q[W].
template <typename scalar_t, Act A>
inline void sums_block(const scalar_t* bx, const scalar_t* bd, int64_t ld, int64_t W, int64_t Srows,
                       const at::opmath_type<scalar_t>* ctr, const at::opmath_type<scalar_t>* a,
                       const at::opmath_type<scalar_t>* bb, at::opmath_type<scalar_t> slope,
                       at::opmath_type<scalar_t>* tot_p, at::opmath_type<scalar_t>* tot_q) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t cp[kCBlock], cq[kCBlock];
  for (int64_t c = 0; c < W; ++c) tot_p[c] = tot_q[c] = acc_t(0);
  for (int64_t s0 = 0; s0 < Srows; s0 += kSRows) {
    const int64_t L = std::min(kSRows, Srows - s0);
    for (int64_t c = 0; c < W; ++c) cp[c] = cq[c] = acc_t(0);
    for (int64_t s = s0; s < s0 + L; ++s) {
      const scalar_t* rx = bx + s * ld;
      const scalar_t* rd = bd + s * ld;
      for (int64_t c = 0; c < W; ++c) {
        const acc_t xv = static_cast<acc_t>(rx[c]);
        acc_t g = static_cast<acc_t>(rd[c]);
        if constexpr (A != Act::Identity)
          g = act_backward<acc_t>(A, pre_act<acc_t>(xv, ctr[c], a[c], bb[c]), slope, g);
        cq[c] += g;
        cp[c] += g * (xv - ctr[c]);
      }
    }
    for (int64_t c = 0; c < W; ++c) {
      tot_p[c] += cp[c];
      tot_q[c] += cq[c];
    }
  }
}

template <typename scalar_t, Act A>
void sums_nsc(const scalar_t* dy, const scalar_t* x, const RowCoefs<at::opmath_type<scalar_t>>& rc,
              at::opmath_type<scalar_t>* q, at::opmath_type<scalar_t>* p, int64_t N, int64_t C,
              int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = nsc_group(C, S);
  if (m > 1) {
    const int64_t W = C * m, Sg = S / m;
    at::parallel_for(0, N, grain_for(2 * S * C), [&](int64_t b, int64_t e) {
      acc_t tot_p[kCBlock], tot_q[kCBlock], ctr[kCBlock], ca[kCBlock], cb[kCBlock];
      for (int64_t n = b; n < e; ++n) {
        for (int64_t g = 0; g < m; ++g)
          for (int64_t c = 0; c < C; ++c) {
            ctr[g * C + c] = rc.center[n * C + c];
            ca[g * C + c] = rc.x_coef[n * C + c];
            cb[g * C + c] = rc.offset[n * C + c];
          }
        sums_block<scalar_t, A>(x + n * S * C, dy + n * S * C, W, W, Sg, ctr, ca, cb, rc.slope,
                                tot_p, tot_q);
        for (int64_t c = 0; c < C; ++c) {
          acc_t sp = tot_p[c], sq = tot_q[c];
          for (int64_t g = 1; g < m; ++g) {
            sp += tot_p[g * C + c];
            sq += tot_q[g * C + c];
          }
          p[n * C + c] = sp;
          q[n * C + c] = sq;
        }
      }
    });
    return;
  }
  const int64_t nblk = (C + kCBlock - 1) / kCBlock;
  at::parallel_for(0, N * nblk, grain_for(2 * S * std::min(C, kCBlock)), [&](int64_t b, int64_t e) {
    acc_t tot_p[kCBlock], tot_q[kCBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nblk, c0 = (t % nblk) * kCBlock;
      const int64_t W = std::min(kCBlock, C - c0);
      const int64_t off = n * S * C + c0, r0 = n * C + c0;
      sums_block<scalar_t, A>(x + off, dy + off, C, W, S, rc.center + r0, rc.x_coef + r0,
                              rc.offset + r0, rc.slope, tot_p, tot_q);
      for (int64_t c = 0; c < W; ++c) {
        p[r0 + c] = tot_p[c];
        q[r0 + c] = tot_q[c];
      }
    }
  });
}

template <typename scalar_t>
void grad_sums_pass(const View3& v, const at::Tensor& dy, Act act,
                    const RowCoefs<at::opmath_type<scalar_t>>& rc, at::opmath_type<scalar_t>* q,
                    at::opmath_type<scalar_t>* p) {
  const int64_t rows = v.N * v.C;
  if (rows == 0) return;
  if (v.S == 0) {
    for (int64_t i = 0; i < rows; ++i) q[i] = p[i] = 0;
    return;
  }
  const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
  const scalar_t* dp = dy.const_data_ptr<scalar_t>();
  dispatch_act(act, [&](auto tag) {
    constexpr Act A = decltype(tag)::value;
    if (v.layout == Layout::NCS)
      sums_ncs<scalar_t, A>(dp, xp, rc, q, p, rows, v.S);
    else
      sums_nsc<scalar_t, A>(dp, xp, rc, q, p, v.N, v.C, v.S);
  });
}

// ---------------------------------------------------------------- apply
// Forward: y = act(pre). Backward: dx = x_coef g + dx_coef (x - center) + dx_offset.
template <typename scalar_t, Act A, bool BWD>
inline void apply_run(const scalar_t* px, const scalar_t* pd, int64_t L,
                      at::opmath_type<scalar_t> ctr, at::opmath_type<scalar_t> a,
                      at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> dxc,
                      at::opmath_type<scalar_t> dxo, at::opmath_type<scalar_t> slope,
                      scalar_t* po) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t s = 0; s < L; ++s) {
    const acc_t xv = static_cast<acc_t>(px[s]);
    if constexpr (!BWD) {
      po[s] = static_cast<scalar_t>(act_forward<acc_t>(A, pre_act<acc_t>(xv, ctr, a, b), slope));
    } else {
      acc_t g = static_cast<acc_t>(pd[s]);
      if constexpr (A != Act::Identity)
        g = act_backward<acc_t>(A, pre_act<acc_t>(xv, ctr, a, b), slope, g);
      po[s] = static_cast<scalar_t>(a * g + dxc * (xv - ctr) + dxo);
    }
  }
}

template <typename acc_t>
struct ApplyCoefs {
  RowCoefs<acc_t> f;          // forward coefficients (saved)
  const acc_t* dx_coef;       // backward only
  const acc_t* dx_offset;
};

template <typename scalar_t, Act A, bool BWD>
void apply_ncs(const scalar_t* x, const scalar_t* dy, const ApplyCoefs<at::opmath_type<scalar_t>>& c,
               scalar_t* out, int64_t R, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, R, row_grain(S), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const acc_t dxc = BWD ? c.dx_coef[r] : acc_t(0), dxo = BWD ? c.dx_offset[r] : acc_t(0);
      apply_run<scalar_t, A, BWD>(x + r * S, BWD ? dy + r * S : nullptr, S, c.f.center[r],
                                  c.f.x_coef[r], c.f.offset[r], dxc, dxo, c.f.slope, out + r * S);
    }
  });
}

template <typename scalar_t, Act A, bool BWD>
void apply_nsc(const scalar_t* x, const scalar_t* dy, const ApplyCoefs<at::opmath_type<scalar_t>>& c,
               scalar_t* out, int64_t N, int64_t C, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  // rows of C contiguous values; row index = n * S + s
  at::parallel_for(0, N * S, grain_for(C), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t n0 = (r / S) * C;
      const acc_t* ctr = c.f.center + n0;
      const acc_t* a = c.f.x_coef + n0;
      const acc_t* b = c.f.offset + n0;
      const scalar_t* px = x + r * C;
      const scalar_t* pd = BWD ? dy + r * C : nullptr;
      scalar_t* po = out + r * C;
      for (int64_t ch = 0; ch < C; ++ch) {
        const acc_t xv = static_cast<acc_t>(px[ch]);
        if constexpr (!BWD) {
          po[ch] = static_cast<scalar_t>(
              act_forward<acc_t>(A, pre_act<acc_t>(xv, ctr[ch], a[ch], b[ch]), c.f.slope));
        } else {
          acc_t g = static_cast<acc_t>(pd[ch]);
          if constexpr (A != Act::Identity)
            g = act_backward<acc_t>(A, pre_act<acc_t>(xv, ctr[ch], a[ch], b[ch]), c.f.slope, g);
          po[ch] = static_cast<scalar_t>(a[ch] * g + c.dx_coef[n0 + ch] * (xv - ctr[ch]) +
                                         c.dx_offset[n0 + ch]);
        }
      }
    }
  });
}

template <typename scalar_t, bool BWD>
void apply_pass(const View3& v, const at::Tensor& dy, Act act,
                const ApplyCoefs<at::opmath_type<scalar_t>>& c, const at::Tensor& out) {
  if (out.numel() == 0) return;
  const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
  const scalar_t* dp = BWD ? dy.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  dispatch_act(act, [&](auto tag) {
    constexpr Act A = decltype(tag)::value;
    if (v.layout == Layout::NCS)
      apply_ncs<scalar_t, A, BWD>(xp, dp, c, op, v.N * v.C, v.S);
    else
      apply_nsc<scalar_t, A, BWD>(xp, dp, c, op, v.N, v.C, v.S);
  });
}

// ---------------------------------------------------------------- finalize (float64)
constexpr int64_t kFinC = 64;  // channels per finalize task

inline int64_t channel_blocks(int64_t C) { return (C + kFinC - 1) / kFinC; }
// Finalize tasks: at least 32K (n, c) values each, so a finalize of ResNet size runs on the
// calling thread (a parallel region costs more than it saves there, and much more on a loaded
// machine, where every region waits for its threads to be scheduled).
inline int64_t fin_grain(int64_t per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, per_item));
}

// Per sample: the norm and the scale r (inv_r always; r, nrm into saved when given).
template <typename acc_t>
void sample_scales(int64_t N, int64_t C, int64_t S, const acc_t* m, const acc_t* m2, double l2_eps,
                   double sqrt_d, double* inv_r, acc_t* r_out, acc_t* nrm_out) {
  const double Sd = static_cast<double>(S);
  at::parallel_for(0, N, fin_grain(C), [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      double nrm2 = 0.0;
      for (int64_t c = 0; c < C; ++c) nrm2 += row_sq_norm(m[n * C + c], m2[n * C + c], Sd);
      const SampleScale sc = sample_scale(nrm2, l2_eps, sqrt_d);
      inv_r[n] = sc.inv_r;
      if (r_out != nullptr) {
        r_out[n] = static_cast<acc_t>(sc.r);
        nrm_out[n] = static_cast<acc_t>(sc.nrm);
      }
    }
  });
}

// This process's channel rows (count N*S, mean, M2 of u), two passes over n in order.
template <typename acc_t>
void local_rows(int64_t N, int64_t C, int64_t S, const acc_t* m, const acc_t* m2,
                const double* inv_r, ChanRow* rows) {
  const double Sd = static_cast<double>(S), Nd = static_cast<double>(N);
  at::parallel_for(0, channel_blocks(C), fin_grain(N * kFinC), [&](int64_t b, int64_t e) {
    double su[kFinC], sm[kFinC], mean[kFinC];
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t c0 = blk * kFinC, W = std::min(kFinC, C - c0);
      for (int64_t j = 0; j < W; ++j) su[j] = sm[j] = 0.0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < W; ++j) su[j] += u_row_mean(m[n * C + c0 + j], inv_r[n]);
      for (int64_t j = 0; j < W; ++j) mean[j] = u_channel_mean(su[j], Nd);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < W; ++j) {
          const int64_t i = n * C + c0 + j;
          sm[j] += u_row_m2(m2[i], inv_r[n], Sd, u_row_mean(m[i], inv_r[n]), mean[j]);
        }
      for (int64_t j = 0; j < W; ++j) rows[c0 + j] = ChanRow{Nd * Sd, mean[j], sm[j]};
    }
  });
}

// Where the channel statistics come from: the group's rows, this batch's rows, or eval's.
struct StatsSource {
  const double* rows_all = nullptr;  // (P, 3, C)
  int64_t P = 0;
  const ChanRow* local = nullptr;    // (C,)
  ChannelVec mean, var;              // eval
};

// Channel statistics and coefficients; writes batch_mean / batch_var / saved's inv_s and returns
// the group's sample count (n_all).
template <typename acc_t>
double channel_coefs(int64_t N, int64_t C, int64_t S, const StatsSource& src, double eps,
                     const ChannelVec& weight, const ChannelVec& bias, ChannelCoef* cc,
                     acc_t* bmean, acc_t* bvar, acc_t* inv_s) {
  for (int64_t c = 0; c < C; ++c) {
    double mean, var;
    if (src.mean.p != nullptr) {
      mean = load_channel(src.mean, c, 0.0);
      var = load_channel(src.var, c, 1.0);
    } else {
      const ChanRow row = src.rows_all != nullptr ? group_row(src.rows_all, src.P, C, c) : src.local[c];
      mean = row.mean;
      var = row_variance(row);
    }
    cc[c] = channel_coef(mean, var, eps, load_channel(weight, c, 1.0), load_channel(bias, c, 0.0));
    bmean[c] = static_cast<acc_t>(mean);
    bvar[c] = static_cast<acc_t>(var);
    inv_s[c] = static_cast<acc_t>(cc[c].inv_s);
  }
  if (src.rows_all != nullptr && C > 0)
    return group_samples(group_row(src.rows_all, src.P, C, 0), static_cast<double>(S));
  return static_cast<double>(N);
}

// Per (n, c): x_coef, offset, cen into saved (and m, m2 when they are not saved's own planes).
template <typename acc_t>
void forward_row_coefs(int64_t N, int64_t C, const acc_t* m, const acc_t* m2, const double* inv_r,
                       const ChannelCoef* cc, acc_t* saved) {
  const SavedLayout L{N, C};
  acc_t* center = saved + L.center();
  acc_t* sm2 = saved + L.m2();
  acc_t* xc = saved + L.x_coef();
  acc_t* off = saved + L.offset();
  acc_t* cen = saved + L.cen();
  const bool copy = m != center;
  at::parallel_for(0, N, fin_grain(C), [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = n * C + c;
        const RowCoef rc = forward_row_coef(m[i], inv_r[n], cc[c]);
        xc[i] = static_cast<acc_t>(rc.x_coef);
        off[i] = static_cast<acc_t>(rc.offset);
        cen[i] = static_cast<acc_t>(rc.cen);
        if (copy) {
          center[i] = m[i];
          sm2[i] = m2[i];
        }
      }
  });
}

// Backward, per channel: grad rows [sum_n Q, sum_n G] of this process.
template <typename acc_t>
void grad_channel_sums(int64_t N, int64_t C, const acc_t* q, const acc_t* p, const acc_t* saved,
                       const double* inv_r, double* rows) {
  const acc_t* cen = saved + SavedLayout{N, C}.cen();
  at::parallel_for(0, channel_blocks(C), fin_grain(N * kFinC), [&](int64_t b, int64_t e) {
    double sq[kFinC], sg[kFinC];
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t c0 = blk * kFinC, W = std::min(kFinC, C - c0);
      for (int64_t j = 0; j < W; ++j) sq[j] = sg[j] = 0.0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < W; ++j) {
          const int64_t i = n * C + c0 + j;
          sq[j] += q[i];
          sg[j] += grad_row_g(p[i], q[i], inv_r[n], cen[i]);
        }
      for (int64_t j = 0; j < W; ++j) {
        rows[c0 + j] = sq[j];
        rows[C + c0 + j] = sg[j];
      }
    }
  });
}

// Backward, per channel: dweight / dbias (this process's rows) and the du coefficients (the
// group's rows_tot in training; nullptr: eval).
template <typename acc_t>
void grad_channel_coefs(int64_t N, int64_t C, int64_t S, const double* rows, const double* rows_tot,
                        const acc_t* saved, const ChannelVec& weight, acc_t* dweight, acc_t* dbias,
                        GradChannel* gc) {
  const SavedLayout L{N, C};
  const acc_t* inv_s = saved + L.inv_s();
  const double m_count = static_cast<double>(saved[L.n_all()]) * static_cast<double>(S);
  for (int64_t c = 0; c < C; ++c) {
    const double is = static_cast<double>(inv_s[c]);
    dbias[c] = static_cast<acc_t>(rows[c]);
    dweight[c] = static_cast<acc_t>(rows[C + c] * is);
    const bool training = rows_tot != nullptr;
    gc[c] = grad_channel(load_channel(weight, c, 1.0), is, training, training ? rows_tot[c] : 0.0,
                         training ? rows_tot[C + c] : 0.0, m_count);
  }
}

// Backward, per sample: t_n, then per (n, c) the dx coefficients (out may alias q / p: each
// sample's sums are read in full before its coefficients are written).
template <typename acc_t>
void grad_row_coefs(int64_t N, int64_t C, int64_t S, const acc_t* q, const acc_t* p,
                    const acc_t* saved, const double* inv_r, const GradChannel* gc, acc_t* dx_coef,
                    acc_t* dx_offset) {
  const SavedLayout L{N, C};
  const acc_t* m = saved + L.center();
  const acc_t* m2 = saved + L.m2();
  const acc_t* cen = saved + L.cen();
  const acc_t* nrm = saved + L.nrm();
  const double Sd = static_cast<double>(S);
  at::parallel_for(0, N, fin_grain(C), [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      double dot = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = n * C + c;
        dot += grad_dot_term(gc[c], p[i], q[i], m[i], m2[i], inv_r[n], cen[i], Sd);
      }
      const double t = grad_sample_t(dot, static_cast<double>(nrm[n]));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = n * C + c;
        const GradRowCoef rc = backward_row_coef(gc[c], t, m[i], inv_r[n], cen[i]);
        dx_coef[i] = static_cast<acc_t>(rc.dx_coef);
        dx_offset[i] = static_cast<acc_t>(rc.dx_offset);
      }
    }
  });
}

template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {  // uninitialized (every element is written first)
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// ---------------------------------------------------------------- op bodies
struct Common {
  View3 v;
  at::ScalarType acc;
  Act act;
  double slope;
};

Common common(const at::Tensor& x, c10::string_view act, double act_param, const char* op) {
  Common c{make_view(x, op), at::kFloat, parse_act(std::string_view(act.data(), act.size()), op),
           act_param};
  c.acc = acc_type(c.v.x.scalar_type());
  return c;
}

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Finalize + apply of the forward from stats (m, m2 may be saved's own planes).
template <typename scalar_t>
void finish_core(const Common& k, const at::opmath_type<scalar_t>* m,
                 const at::opmath_type<scalar_t>* m2, const StatsSource& src, const ChannelVec& w,
                 const ChannelVec& b, double eps, double l2_eps, bool rescale, const at::Tensor& y,
                 const at::Tensor& bmean, const at::Tensor& bvar, const at::Tensor& saved) {
  using acc_t = at::opmath_type<scalar_t>;
  const View3& v = k.v;
  const SavedLayout L = layout_of(v);
  acc_t* sp = saved.data_ptr<acc_t>();
  const double sqrt_d = rescale ? std::sqrt(static_cast<double>(v.C) * static_cast<double>(v.S)) : 1.0;
  auto inv_r = scratch<double>(v.N);
  sample_scales<acc_t>(v.N, v.C, v.S, m, m2, l2_eps, sqrt_d, inv_r.get(), sp + L.r(), sp + L.nrm());
  StatsSource s = src;
  std::unique_ptr<ChanRow[]> local;
  if (s.rows_all == nullptr && s.mean.p == nullptr) {
    local = scratch<ChanRow>(v.C);
    local_rows<acc_t>(v.N, v.C, v.S, m, m2, inv_r.get(), local.get());
    s.local = local.get();
  }
  auto cc = scratch<ChannelCoef>(v.C);
  const double n_all = channel_coefs<acc_t>(v.N, v.C, v.S, s, eps, w, b, cc.get(),
                                            bmean.data_ptr<acc_t>(), bvar.data_ptr<acc_t>(),
                                            sp + L.inv_s());
  sp[L.n_all()] = static_cast<acc_t>(n_all);
  forward_row_coefs<acc_t>(v.N, v.C, m, m2, inv_r.get(), cc.get(), sp);
  const ApplyCoefs<acc_t> ac{
      {sp + L.center(), sp + L.x_coef(), sp + L.offset(), static_cast<acc_t>(k.slope)}, nullptr,
      nullptr};
  apply_pass<scalar_t, false>(v, at::Tensor(), k.act, ac, y);
}

Fwd forward_outputs(const Common& k) {
  const auto opts = k.v.x.options().dtype(k.acc);
  return {at::empty_like(k.v.x), at::empty({k.v.C}, opts), at::empty({k.v.C}, opts),
          at::empty({layout_of(k.v).numel()}, opts)};
}

Fwd forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                const std::optional<at::Tensor>& var, double eps, double l2_eps, bool rescale,
                c10::string_view act, double act_param) {
  const char* op = "l2bn_forward";
  const Common k = common(x, act, act_param, op);
  TORCH_CHECK_VALUE(mean.has_value() == var.has_value(), op,
                    ": mean and var must both be given (eval) or both be None (training)");
  const ChannelVec w = channel_vec(weight, k.v, op, "weight"), b = channel_vec(bias, k.v, op, "bias");
  StatsSource src;
  src.mean = channel_vec(mean, k.v, op, "mean");
  src.var = channel_vec(var, k.v, op, "var");
  // named references, not structured bindings (C++17 cannot capture those in the lambdas)
  const Fwd out = forward_outputs(k);
  const at::Tensor &y = std::get<0>(out), &bmean = std::get<1>(out), &bvar = std::get<2>(out),
                   &saved = std::get<3>(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sp = saved.data_ptr<acc_t>();
    const SavedLayout L = layout_of(k.v);
    stats_pass<scalar_t>(k.v, sp + L.center(), sp + L.m2());  // straight into saved
    finish_core<scalar_t>(k, sp + L.center(), sp + L.m2(), src, w, b, eps, l2_eps, rescale, y,
                          bmean, bvar, saved);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& x, double l2_eps, bool rescale) {
  const char* op = "l2bn_stats";
  const View3 v = make_view(x, op);
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor stats = at::empty({2, v.N, v.C}, v.x.options().dtype(acc));
  at::Tensor rows = at::empty({kRowFields, v.C}, v.x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* m = stats.data_ptr<acc_t>();
    acc_t* m2 = m + v.N * v.C;
    stats_pass<scalar_t>(v, m, m2);
    const double sqrt_d = rescale ? std::sqrt(static_cast<double>(v.C) * static_cast<double>(v.S)) : 1.0;
    auto inv_r = scratch<double>(v.N);
    sample_scales<acc_t>(v.N, v.C, v.S, m, m2, l2_eps, sqrt_d, inv_r.get(), nullptr, nullptr);
    auto local = scratch<ChanRow>(v.C);
    local_rows<acc_t>(v.N, v.C, v.S, m, m2, inv_r.get(), local.get());
    double* rp = rows.data_ptr<double>();
    for (int64_t c = 0; c < v.C; ++c) {
      rp[c] = local[c].n;
      rp[v.C + c] = local[c].mean;
      rp[2 * v.C + c] = local[c].m2;
    }
  });
  return {stats, rows};
}

Fwd finish_cpu(const at::Tensor& x, const at::Tensor& stats_in,
               const std::optional<at::Tensor>& rows_all_in, const std::optional<at::Tensor>& weight,
               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
               const std::optional<at::Tensor>& var, double eps, double l2_eps, bool rescale,
               c10::string_view act, double act_param) {
  const char* op = "l2bn_finish";
  const Common k = common(x, act, act_param, op);
  TORCH_CHECK_VALUE(mean.has_value() == var.has_value(), op,
                    ": mean and var must both be given (eval) or both be None");
  TORCH_CHECK_VALUE(!(mean.has_value() && rows_all_in.has_value()), op,
                    ": give rows_all (training over a group) or mean/var (eval), not both");
  const at::Tensor stats = checked(stats_in, {2, k.v.N, k.v.C}, k.acc, k.v, op, "stats");
  at::Tensor rows_all;
  StatsSource src;
  if (rows_all_in.has_value()) {
    rows_all = checked_rows_all(*rows_all_in, kRowFields, k.v, op);
    src.rows_all = rows_all.const_data_ptr<double>();
    src.P = rows_all.size(0);
  }
  src.mean = channel_vec(mean, k.v, op, "mean");
  src.var = channel_vec(var, k.v, op, "var");
  const ChannelVec w = channel_vec(weight, k.v, op, "weight"), b = channel_vec(bias, k.v, op, "bias");
  // named references, not structured bindings (C++17 cannot capture those in the lambdas)
  const Fwd out = forward_outputs(k);
  const at::Tensor &y = std::get<0>(out), &bmean = std::get<1>(out), &bvar = std::get<2>(out),
                   &saved = std::get<3>(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* m = stats.const_data_ptr<acc_t>();
    finish_core<scalar_t>(k, m, m + k.v.N * k.v.C, src, w, b, eps, l2_eps, rescale, y, bmean, bvar,
                          saved);
  });
  return out;
}

// Gradient sums pass of the backward (sums planes q, p).
template <typename scalar_t>
void grad_sums_core(const Common& k, const at::Tensor& dy, const at::Tensor& saved,
                    at::opmath_type<scalar_t>* q, at::opmath_type<scalar_t>* p) {
  using acc_t = at::opmath_type<scalar_t>;
  const SavedLayout L = layout_of(k.v);
  const acc_t* sp = saved.const_data_ptr<acc_t>();
  const RowCoefs<acc_t> rc{sp + L.center(), sp + L.x_coef(), sp + L.offset(),
                           static_cast<acc_t>(k.slope)};
  grad_sums_pass<scalar_t>(k.v, dy, k.act, rc, q, p);
}

template <typename acc_t>
std::unique_ptr<double[]> inv_r_of(const acc_t* saved, int64_t N, int64_t C) {
  const acc_t* r = saved + SavedLayout{N, C}.r();
  auto inv_r = scratch<double>(N);
  for (int64_t n = 0; n < N; ++n) inv_r[n] = 1.0 / static_cast<double>(r[n]);
  return inv_r;
}

// Finalize + apply of the backward from the sums (coefficients may overwrite the sums: in_place).
template <typename scalar_t>
void grad_finish_core(const Common& k, const at::Tensor& dy, const at::Tensor& saved,
                      at::opmath_type<scalar_t>* q, at::opmath_type<scalar_t>* p, bool in_place,
                      const double* rows, const double* rows_tot, const ChannelVec& w,
                      const at::Tensor& dx, const at::Tensor& dweight, const at::Tensor& dbias) {
  using acc_t = at::opmath_type<scalar_t>;
  const View3& v = k.v;
  const SavedLayout L = layout_of(v);
  const acc_t* sp = saved.const_data_ptr<acc_t>();
  auto inv_r = inv_r_of<acc_t>(sp, v.N, v.C);
  auto gc = scratch<GradChannel>(v.C);
  grad_channel_coefs<acc_t>(v.N, v.C, v.S, rows, rows_tot, sp, w, dweight.data_ptr<acc_t>(),
                            dbias.data_ptr<acc_t>(), gc.get());
  std::unique_ptr<acc_t[]> coef;
  acc_t* dxc = q;
  acc_t* dxo = p;
  if (!in_place) {
    coef = scratch<acc_t>(2 * v.N * v.C);
    dxc = coef.get();
    dxo = coef.get() + v.N * v.C;
  }
  grad_row_coefs<acc_t>(v.N, v.C, v.S, q, p, sp, inv_r.get(), gc.get(), dxc, dxo);
  const ApplyCoefs<acc_t> ac{
      {sp + L.center(), sp + L.x_coef(), sp + L.offset(), static_cast<acc_t>(k.slope)}, dxc, dxo};
  apply_pass<scalar_t, true>(v, dy, k.act, ac, dx);
}

using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Bwd backward_outputs(const Common& k) {
  const auto opts = k.v.x.options().dtype(k.acc);
  return {at::empty_like(k.v.x), at::empty({k.v.C}, opts), at::empty({k.v.C}, opts)};
}

Bwd backward_cpu(const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                 const at::Tensor& saved_in, bool training, c10::string_view act, double act_param) {
  const char* op = "l2bn_backward";
  const Common k = common(x, act, act_param, op);
  const at::Tensor dy = match_layout(dy_in, k.v, op, "dy");
  const at::Tensor saved = checked_saved(saved_in, k.v, op);
  const ChannelVec w = channel_vec(weight, k.v, op, "weight");
  const Bwd out = backward_outputs(k);
  const at::Tensor &dx = std::get<0>(out), &dweight = std::get<1>(out), &dbias = std::get<2>(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t NC = k.v.N * k.v.C;
    auto sums = scratch<acc_t>(2 * NC);
    grad_sums_core<scalar_t>(k, dy, saved, sums.get(), sums.get() + NC);
    auto inv_r = inv_r_of<acc_t>(saved.const_data_ptr<acc_t>(), k.v.N, k.v.C);
    auto rows = scratch<double>(kGradRowFields * k.v.C);
    grad_channel_sums<acc_t>(k.v.N, k.v.C, sums.get(), sums.get() + NC, saved.const_data_ptr<acc_t>(),
                             inv_r.get(), rows.get());
    grad_finish_core<scalar_t>(k, dy, saved, sums.get(), sums.get() + NC, /*in_place=*/true,
                               rows.get(), training ? rows.get() : nullptr, w, dx, dweight, dbias);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grad_stats_cpu(const at::Tensor& dy_in, const at::Tensor& x,
                                                  const at::Tensor& saved_in, c10::string_view act,
                                                  double act_param) {
  const char* op = "l2bn_grad_stats";
  const Common k = common(x, act, act_param, op);
  const at::Tensor dy = match_layout(dy_in, k.v, op, "dy");
  const at::Tensor saved = checked_saved(saved_in, k.v, op);
  at::Tensor sums = at::empty({2, k.v.N, k.v.C}, k.v.x.options().dtype(k.acc));
  at::Tensor rows = at::empty({kGradRowFields, k.v.C}, k.v.x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t NC = k.v.N * k.v.C;
    acc_t* q = sums.data_ptr<acc_t>();
    grad_sums_core<scalar_t>(k, dy, saved, q, q + NC);
    auto inv_r = inv_r_of<acc_t>(saved.const_data_ptr<acc_t>(), k.v.N, k.v.C);
    grad_channel_sums<acc_t>(k.v.N, k.v.C, q, q + NC, saved.const_data_ptr<acc_t>(), inv_r.get(),
                             rows.data_ptr<double>());
  });
  return {sums, rows};
}

Bwd grad_finish_cpu(const at::Tensor& dy_in, const at::Tensor& x,
                    const std::optional<at::Tensor>& weight, const at::Tensor& saved_in,
                    const at::Tensor& sums_in, const at::Tensor& rows_in,
                    const std::optional<at::Tensor>& rows_all_in, c10::string_view act,
                    double act_param) {
  const char* op = "l2bn_grad_finish";
  const Common k = common(x, act, act_param, op);
  const at::Tensor dy = match_layout(dy_in, k.v, op, "dy");
  const at::Tensor saved = checked_saved(saved_in, k.v, op);
  const at::Tensor sums = checked(sums_in, {2, k.v.N, k.v.C}, k.acc, k.v, op, "sums");
  const at::Tensor rows = checked(rows_in, {kGradRowFields, k.v.C}, at::kDouble, k.v, op, "rows");
  at::Tensor rows_all;
  if (rows_all_in.has_value())
    rows_all = checked(*rows_all_in, {kGradRowFields, k.v.C}, at::kDouble, k.v, op, "rows_all");
  const ChannelVec w = channel_vec(weight, k.v, op, "weight");
  const Bwd out = backward_outputs(k);
  const at::Tensor &dx = std::get<0>(out), &dweight = std::get<1>(out), &dbias = std::get<2>(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // const_cast: with in_place=false the sums are only read
    acc_t* q = const_cast<acc_t*>(sums.const_data_ptr<acc_t>());
    grad_finish_core<scalar_t>(k, dy, saved, q, q + k.v.N * k.v.C, /*in_place=*/false,
                               rows.const_data_ptr<double>(),
                               rows_all.defined() ? rows_all.const_data_ptr<double>() : nullptr, w,
                               dx, dweight, dbias);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_stats_cpu(const at::Tensor& x) {
  const char* op = "l2bn_sample_stats";
  const View3 v = make_view(x, op);
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor mean = at::empty({v.N, v.C}, v.x.options().dtype(acc));
  at::Tensor m2 = at::empty({v.N, v.C}, v.x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_pass<scalar_t>(v, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>());
  });
  return {mean, m2};
}

}  // namespace
}  // namespace l2bn
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, CPU, m) {
  m.impl("l2bn_forward", &normkernels::l2bn::forward_cpu);
  m.impl("l2bn_backward", &normkernels::l2bn::backward_cpu);
  m.impl("l2bn_stats", &normkernels::l2bn::stats_cpu);
  m.impl("l2bn_finish", &normkernels::l2bn::finish_cpu);
  m.impl("l2bn_grad_stats", &normkernels::l2bn::grad_stats_cpu);
  m.impl("l2bn_grad_finish", &normkernels::l2bn::grad_finish_cpu);
  m.impl("l2bn_sample_stats", &normkernels::l2bn::sample_stats_cpu);
}
