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

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

// ---------------------------------------------------------------- sample stats
template <typename scalar_t>
void stats_ncs(const scalar_t* x, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* m2,
               int64_t R, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
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

template <typename scalar_t>
void stats_nsc(const scalar_t* x, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* m2,
               int64_t N, int64_t C, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nblk = (C + kCBlock - 1) / kCBlock;
  at::parallel_for(0, N * nblk, grain_for(S * std::min(C, kCBlock)), [&](int64_t b, int64_t e) {
    acc_t run_mean[kCBlock], run_m2[kCBlock], sum[kCBlock], m2b[kCBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nblk, c0 = (t % nblk) * kCBlock;
      const int64_t W = std::min(kCBlock, C - c0);
      const scalar_t* base = x + n * S * C + c0;
      acc_t n_a = 0;
      for (int64_t c = 0; c < W; ++c) run_mean[c] = run_m2[c] = acc_t(0);
      for (int64_t s0 = 0; s0 < S; s0 += kSRows) {
        const int64_t L = std::min(kSRows, S - s0);
        for (int64_t c = 0; c < W; ++c) sum[c] = m2b[c] = acc_t(0);
        for (int64_t s = s0; s < s0 + L; ++s) {
          const scalar_t* row = base + s * C;
          for (int64_t c = 0; c < W; ++c) sum[c] += static_cast<acc_t>(row[c]);
        }
        const acc_t inv = acc_t(1) / acc_t(L);
        for (int64_t c = 0; c < W; ++c) sum[c] *= inv;  // chunk mean
        for (int64_t s = s0; s < s0 + L; ++s) {
          const scalar_t* row = base + s * C;
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
  using Vec = at::vec::Vectorized<acc_t>;
  at::parallel_for(0, R, grain_for(2 * S), [&](int64_t b, int64_t e) {
    acc_t bx[kChunk], bdy[kChunk];
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* px = x + r * S;
      const scalar_t* pd = dy + r * S;
      const acc_t ctr = center[r];
      acc_t spc = 0, sq = 0;
      for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
        const int64_t L = std::min(kChunk, S - s0);
        for (int64_t i = 0; i < L; ++i) {
          bx[i] = static_cast<acc_t>(px[s0 + i]);
          bdy[i] = static_cast<acc_t>(pd[s0 + i]);
        }
        sq += at::vec::reduce_all<acc_t>([](Vec& a, Vec& c) { return a + c; }, bdy, L);
        spc += at::vec::map2_reduce_all<acc_t>(
            [ctr](Vec d, Vec xv) { return d * (xv - Vec(ctr)); },
            [](Vec a, Vec c) { return a + c; }, bdy, bx, L);
      }
      pc[r] = spc;
      q[r] = sq;
    }
  });
}

template <typename scalar_t>
void sums_nsc(const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* center,
              at::opmath_type<scalar_t>* pc, at::opmath_type<scalar_t>* q, int64_t N, int64_t C,
              int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nblk = (C + kCBlock - 1) / kCBlock;
  at::parallel_for(0, N * nblk, grain_for(2 * S * std::min(C, kCBlock)), [&](int64_t b, int64_t e) {
    acc_t tot_pc[kCBlock], tot_q[kCBlock], cpc[kCBlock], cq[kCBlock], ctr[kCBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nblk, c0 = (t % nblk) * kCBlock;
      const int64_t W = std::min(kCBlock, C - c0);
      const int64_t off = n * S * C + c0;
      for (int64_t c = 0; c < W; ++c) {
        tot_pc[c] = tot_q[c] = acc_t(0);
        ctr[c] = center[n * C + c0 + c];
      }
      for (int64_t s0 = 0; s0 < S; s0 += kSRows) {
        const int64_t L = std::min(kSRows, S - s0);
        for (int64_t c = 0; c < W; ++c) cpc[c] = cq[c] = acc_t(0);
        for (int64_t s = s0; s < s0 + L; ++s) {
          const scalar_t* rx = x + off + s * C;
          const scalar_t* rd = dy + off + s * C;
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
