// L2BN pass kernels, CPU. x is viewed as (N, C, S) in layout NCS (rows of S contiguous values)
// or NSC (for each n, an S x C row-major block). Accumulation in float (double for double),
// per-chunk two-pass mean/M2 combined across chunks with Chan's formula.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <tuple>

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
template <typename acc_t, typename scalar_t>
inline void lane_sums_dy(const scalar_t* pd, const scalar_t* px, acc_t ctr, int64_t L, acc_t& sq,
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

std::tuple<at::Tensor, at::Tensor> sample_stats_cpu(const at::Tensor& x_in) {
  const char* op = "l2bn_sample_stats";
  View3 v = make_view(x_in, op);
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor mean = at::zeros({v.N, v.C}, v.x.options().dtype(acc));
  at::Tensor m2 = at::zeros({v.N, v.C}, v.x.options().dtype(acc));
  if (v.N * v.C == 0 || v.S == 0) return {mean, m2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn_sample_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    if (v.layout == Layout::NCS)
      stats_ncs<scalar_t>(xp, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>(), v.N * v.C, v.S);
    else
      stats_nsc<scalar_t>(xp, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>(), v.N, v.C, v.S);
  });
  return {mean, m2};
}

// ---------------------------------------------------------------- backward sums
template <typename scalar_t>
void sums_ncs(const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* center,
              at::opmath_type<scalar_t>* pc, at::opmath_type<scalar_t>* q, int64_t R, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, R, row_grain(2 * S), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* px = x + r * S;
      const scalar_t* pd = dy + r * S;
      const acc_t ctr = center[r];
      acc_t spc = 0, sq = 0;
      for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
        const int64_t L = std::min(kChunk, S - s0);
        const scalar_t* cx = px + s0;
        const scalar_t* cd = pd + s0;
        acc_t cq, cpc;
        lane_sums_dy<acc_t>(cd, cx, ctr, L, cq, cpc);
        sq += cq;
        spc += cpc;
      }
      pc[r] = spc;
      q[r] = sq;
    }
  });
}

// One-pass sums of W channels (ld apart between rows) over Srows rows, per-chunk partials added
// in order. ctr[W] holds the centers. Writes tot_pc[W], tot_q[W].
template <typename scalar_t>
inline void sums_block(const scalar_t* bx, const scalar_t* bd, int64_t ld, int64_t W, int64_t Srows,
                       const at::opmath_type<scalar_t>* ctr, at::opmath_type<scalar_t>* tot_pc,
                       at::opmath_type<scalar_t>* tot_q) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t cpc[kCBlock], cq[kCBlock];
  for (int64_t c = 0; c < W; ++c) tot_pc[c] = tot_q[c] = acc_t(0);
  for (int64_t s0 = 0; s0 < Srows; s0 += kSRows) {
    const int64_t L = std::min(kSRows, Srows - s0);
    for (int64_t c = 0; c < W; ++c) cpc[c] = cq[c] = acc_t(0);
    for (int64_t s = s0; s < s0 + L; ++s) {
      const scalar_t* rx = bx + s * ld;
      const scalar_t* rd = bd + s * ld;
      for (int64_t c = 0; c < W; ++c) {
        const acc_t d = static_cast<acc_t>(rd[c]);
        cq[c] += d;
        cpc[c] += d * (static_cast<acc_t>(rx[c]) - ctr[c]);
      }
    }
    for (int64_t c = 0; c < W; ++c) {
      tot_pc[c] += cpc[c];
      tot_q[c] += cq[c];
    }
  }
}

template <typename scalar_t>
void sums_nsc(const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* center,
              at::opmath_type<scalar_t>* pc, at::opmath_type<scalar_t>* q, int64_t N, int64_t C,
              int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = nsc_group(C, S);
  if (m > 1) {
    const int64_t W = C * m, Sg = S / m;
    at::parallel_for(0, N, grain_for(2 * S * C), [&](int64_t b, int64_t e) {
      acc_t tot_pc[kCBlock], tot_q[kCBlock], ctr[kCBlock];
      for (int64_t n = b; n < e; ++n) {
        for (int64_t g = 0; g < m; ++g)
          for (int64_t c = 0; c < C; ++c) ctr[g * C + c] = center[n * C + c];
        sums_block<scalar_t>(x + n * S * C, dy + n * S * C, W, W, Sg, ctr, tot_pc, tot_q);
        for (int64_t c = 0; c < C; ++c) {
          acc_t sp = tot_pc[c], sq = tot_q[c];
          for (int64_t g = 1; g < m; ++g) {
            sp += tot_pc[g * C + c];
            sq += tot_q[g * C + c];
          }
          pc[n * C + c] = sp;
          q[n * C + c] = sq;
        }
      }
    });
    return;
  }
  const int64_t nblk = (C + kCBlock - 1) / kCBlock;
  at::parallel_for(0, N * nblk, grain_for(2 * S * std::min(C, kCBlock)), [&](int64_t b, int64_t e) {
    acc_t tot_pc[kCBlock], tot_q[kCBlock], ctr[kCBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nblk, c0 = (t % nblk) * kCBlock;
      const int64_t W = std::min(kCBlock, C - c0);
      const int64_t off = n * S * C + c0;
      for (int64_t c = 0; c < W; ++c) ctr[c] = center[n * C + c0 + c];
      sums_block<scalar_t>(x + off, dy + off, C, W, S, ctr, tot_pc, tot_q);
      for (int64_t c = 0; c < W; ++c) {
        pc[n * C + c0 + c] = tot_pc[c];
        q[n * C + c0 + c] = tot_q[c];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> backward_sums_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                     const at::Tensor& center_in) {
  const char* op = "l2bn_backward_sums";
  View3 v = make_view(x_in, op);
  at::Tensor dy = match_layout(dy_in, v, op, "dy");
  at::Tensor center = coef(center_in, v, op, "center");
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor pc = at::zeros({v.N, v.C}, v.x.options().dtype(acc));
  at::Tensor q = at::zeros({v.N, v.C}, v.x.options().dtype(acc));
  if (v.N * v.C == 0 || v.S == 0) return {pc, q};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn_backward_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    if (v.layout == Layout::NCS)
      sums_ncs<scalar_t>(dp, xp, center.const_data_ptr<acc_t>(), pc.data_ptr<acc_t>(),
                         q.data_ptr<acc_t>(), v.N * v.C, v.S);
    else
      sums_nsc<scalar_t>(dp, xp, center.const_data_ptr<acc_t>(), pc.data_ptr<acc_t>(),
                         q.data_ptr<acc_t>(), v.N, v.C, v.S);
  });
  return {pc, q};
}

// ---------------------------------------------------------------- apply
template <typename scalar_t, bool HAS_DY>
void apply_ncs(const scalar_t* x, const scalar_t* dy, const at::opmath_type<scalar_t>* center,
               const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
               const at::opmath_type<scalar_t>* d, scalar_t* out, int64_t R, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, R, grain_for(S), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const acc_t ar = a[r], cr = center[r], br = b[r];
      const acc_t dr = HAS_DY ? d[r] : acc_t(0);
      const scalar_t* px = x + r * S;
      const scalar_t* pd = HAS_DY ? dy + r * S : nullptr;
      scalar_t* po = out + r * S;
      for (int64_t s = 0; s < S; ++s) {
        acc_t val = ar * (static_cast<acc_t>(px[s]) - cr) + br;
        if constexpr (HAS_DY) val += dr * static_cast<acc_t>(pd[s]);
        po[s] = static_cast<scalar_t>(val);
      }
    }
  });
}

template <typename scalar_t, bool HAS_DY>
void apply_nsc(const scalar_t* x, const scalar_t* dy, const at::opmath_type<scalar_t>* center,
               const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* b,
               const at::opmath_type<scalar_t>* d, scalar_t* out, int64_t N, int64_t C,
               int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  // rows of C contiguous values; row index = n * S + s
  at::parallel_for(0, N * S, grain_for(C), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t n = r / S;
      const acc_t* an = a + n * C;
      const acc_t* cn = center + n * C;
      const acc_t* bn = b + n * C;
      const acc_t* dn = HAS_DY ? d + n * C : nullptr;
      const scalar_t* px = x + r * C;
      const scalar_t* pd = HAS_DY ? dy + r * C : nullptr;
      scalar_t* po = out + r * C;
      for (int64_t c = 0; c < C; ++c) {
        acc_t val = an[c] * (static_cast<acc_t>(px[c]) - cn[c]) + bn[c];
        if constexpr (HAS_DY) val += dn[c] * static_cast<acc_t>(pd[c]);
        po[c] = static_cast<scalar_t>(val);
      }
    }
  });
}

at::Tensor apply_cpu(const at::Tensor& x_in, const at::Tensor& center_in, const at::Tensor& x_coef_in,
                     const at::Tensor& offset_in, const std::optional<at::Tensor>& dy_in,
                     const std::optional<at::Tensor>& dy_coef_in) {
  const ApplyArgs args = apply_args(x_in, center_in, x_coef_in, offset_in, dy_in, dy_coef_in);
  const View3& v = args.v;
  const at::Tensor &center = args.center, &a = args.x_coef, &b = args.offset, &dy = args.dy,
                   &d = args.dy_coef;
  const bool has_dy = args.has_dy;
  at::Tensor out = at::empty_like(v.x);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const scalar_t* dp = has_dy ? dy.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* cp = center.const_data_ptr<acc_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const acc_t* dcp = has_dy ? d.const_data_ptr<acc_t>() : nullptr;
    scalar_t* op_ = out.data_ptr<scalar_t>();
    if (v.layout == Layout::NCS) {
      if (has_dy)
        apply_ncs<scalar_t, true>(xp, dp, cp, ap, bp, dcp, op_, v.N * v.C, v.S);
      else
        apply_ncs<scalar_t, false>(xp, dp, cp, ap, bp, dcp, op_, v.N * v.C, v.S);
    } else {
      if (has_dy)
        apply_nsc<scalar_t, true>(xp, dp, cp, ap, bp, dcp, op_, v.N, v.C, v.S);
      else
        apply_nsc<scalar_t, false>(xp, dp, cp, ap, bp, dcp, op_, v.N, v.C, v.S);
    }
  });
  return out;
}

}  // namespace
}  // namespace l2bn
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, CPU, m) {
  m.impl("l2bn_sample_stats", &normkernels::l2bn::sample_stats_cpu);
  m.impl("l2bn_backward_sums", &normkernels::l2bn::backward_sums_cpu);
  m.impl("l2bn_apply", &normkernels::l2bn::apply_cpu);
}
