// SBN / BN+SBN CPU pass kernels. Included twice by sbn_cpu.cpp, inside namespace k_default and
// (x86-64 GCC) inside namespace k_avx2 under `#pragma GCC target("avx2")`, which picks one at run
// time: the same source compiled for two instruction sets. No include guard, no includes (the
// includer provides ATen, FwdTab / BwdTab, Act, NK_AVX2 = 0 / 1).
//
// Layouts: NCHW (contiguous) and NHWC (channels_last).
// NCHW row reductions on small maps (statistics up to kTMax values, the training backward apply up
// to sbn_cpu.cpp's kLaneBwd):
//   lanes = 8 consecutive channels of one sample. Their 8 planes are one contiguous block; it is
//   transposed into an L1 buffer buf[e*8 + j] (e = h*W + w, j = channel) by 8x8 register
//   transposes (AVX2, float) or scalar copies, so every row reduction (R, A per row: the cost of
//   SBN over BatchNorm) is a vertical vector add, whatever W.
//   Exception: the training backward apply on maps of width 8, or of <= 8 rows of 2-7 values
//   (sbn_cpu.cpp small_bwd), stays on the planes (bwd_nchw_w8 / bwd_nchw_small): their rows fit
//   one transpose of x for the row sums, so dy and dx are not transposed at all.
// NCHW, larger maps: rows reduced straight from x in kL lane accumulators.
// NCHW elementwise passes and gradient sums: contiguous 8-vectors along each plane; the first
//   vectors of a plane take row 0's offsets from tables padded to whole vectors (FwdTab::ts).
// NHWC: tasks (n, kCB channels); each row (n, h) reduced in compile-time blocks of 8 channels.
// Accumulation: acc within a plane / row / chunk, double across them. Reductions write partials
// per (sample block, channel), the blocks a function of (N, C) only: results do not depend on the
// thread count. pre = cx (x - K) + add is one expression, evaluated the same way in every pass
// (no FMA: neither target enables it), so the activation's masks agree exactly.

constexpr int kL = 8;             // lane accumulators of the row / span loops
constexpr int64_t kCB = 64;       // NHWC reductions: channels per task
constexpr int64_t kChunk = 1024;  // elements per lane summed in acc before a flush to double
constexpr int64_t kTMax = 4096;   // NCHW statistics: largest map processed transposed
constexpr int64_t kTasks = 64;    // reductions: sample blocks are cut to give about this many tasks

// The lanes: V8<T>, M8<T>, splat, load8, store8, tree8 of csrc/cpu/vec8.h (one ymm register of
// floats in the AVX2 build, two xmm in the baseline build); act_forward<A> / act_backward<A> of
// csrc/activation.h run on them as on a value (lane masks select, the float exp of SiLU is
// exp_float_lanes), so a lane equals the scalar function bit for bit.
// Lanes l >= 8 - r (-1), the others 0: of the last 8 values of a span whose last r < 8 values
// are left after its whole vectors, the lanes not done yet (the span's end is then one overlapping
// vector instead of r scalar steps, which would branch per value for a masked activation).
template <typename T>
NK_INLINE M8<T> last_lanes(int64_t r) {
  M8<T> m = {};
  for (int l = 0; l < 8; ++l) m.set(l, l >= 8 - r);
  return m;
}
// Lanes at odd positions (-1): with a vector starting at an even column, the odd columns.
template <typename T>
NK_INLINE M8<T> odd_lanes() {
  M8<T> m = {};
  for (int l = 0; l < 8; ++l) m.set(l, l & 1);
  return m;
}
// lanes j < cw of src[c0 + j], the others 0
template <typename T>
NK_INLINE V8<T> lanes8(const T* src, int64_t c0, int cw) {
  V8<T> v = {};
  for (int j = 0; j < cw; ++j) v.set(j, src[c0 + j]);
  return v;
}
#if NK_AVX2
// the AVX2 build's float lanes as one __m256 and back (the transposes and permutes)
NK_INLINE __m256 m256(const V8<float>& v) { return (__m256)v.v[0]; }
NK_INLINE V8<float> v8(__m256 m) {
  V8<float> v;
  v.v[0] = (V8<float>::N)m;
  return v;
}
#endif

// Sample blocks of the reductions: `count` blocks of `size` samples, chosen from N and the number
// of channel tasks only (so the partials, and their fixed-order sum, ignore the thread count).
struct NBlocks {
  int64_t count, size;
};
inline NBlocks n_blocks(int64_t N, int64_t channel_tasks) {
  const int64_t want = std::max<int64_t>(
      1, std::min<int64_t>(N, (kTasks + channel_tasks - 1) / std::max<int64_t>(1, channel_tasks)));
  const int64_t size = (N + want - 1) / want;
  return {(N + size - 1) / size, size};
}

// ------------------------------------------------------------------------------ 8-plane transposes

#if NK_AVX2
// r[i] <- column i of the 8x8 matrix whose rows are r[0..7] (its own inverse)
NK_INLINE void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

// buf[e*8 + j] = p[j*HW + e] for the cw <= 8 planes at p (lanes >= cw: 0).
template <typename scalar_t, typename acc_t>
inline void gather_planes(const scalar_t* p, int64_t HW, int cw, acc_t* buf) {
  int64_t e = 0;
#if NK_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (cw == 8) {
      for (; e + 8 <= HW; e += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(p + j * HW + e);
        transpose8(r);
        float* o = reinterpret_cast<float*>(buf) + e * 8;
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(o + 8 * j, r[j]);
      }
    }
  }
#endif
  for (; e < HW; ++e) {
    acc_t* o = buf + e * 8;
    for (int j = 0; j < cw; ++j) o[j] = static_cast<acc_t>(p[j * HW + e]);
    for (int j = cw; j < 8; ++j) o[j] = acc_t(0);
  }
}

// p[j*HW + e] = buf[e*8 + j] for the cw <= 8 planes at p: the inverse of gather_planes.
template <typename scalar_t, typename acc_t>
inline void scatter_planes(const acc_t* buf, int64_t HW, int cw, scalar_t* p) {
  int64_t e = 0;
#if NK_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (cw == 8) {
      for (; e + 8 <= HW; e += 8) {
        __m256 r[8];
        const float* i = reinterpret_cast<const float*>(buf) + e * 8;
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(i + 8 * j);
        transpose8(r);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(p + j * HW + e, r[j]);
      }
    }
  }
#endif
  for (; e < HW; ++e) {
    const acc_t* i = buf + e * 8;
    for (int j = 0; j < cw; ++j) p[j * HW + e] = static_cast<scalar_t>(i[j]);
  }
}

// ------------------------------------------------------------------------------ row reductions

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
    if (kQ) q = tree8(s);
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
  d0 = tree8(a) + ta;
  d1 = tree8(b) + tb;
}

// ============================================================================== statistics pass
// part[(blk*C + c)*6 + k] = [S1, S2, SR, SA, SD0, SD1] of channel c over sample block blk.
// Returns the number of sample blocks.

// NCHW, small maps: lanes = 8 channels of a sample (transposed buffer).
template <typename scalar_t, typename acc_t>
int64_t stats_nchw_t(const scalar_t* x, const acc_t* K, const acc_t* ReD, const acc_t* ImD,
                     double* part, int64_t N, int64_t C, int64_t H, int64_t W) {
  using V = V8<acc_t>;
  const int64_t HW = H * W, ncb = (C + 7) / 8;
  const NBlocks nb = n_blocks(N, ncb);
  at::parallel_for(0, nb.count * ncb, grain_for(nb.size * 8 * HW), [&](int64_t b, int64_t e) {
    std::vector<acc_t> buf(HW * 8);
    for (int64_t task = b; task < e; ++task) {
      const int64_t blk = task / ncb, c0 = (task % ncb) * 8;
      const int cw = static_cast<int>(std::min<int64_t>(8, C - c0));
      const V k = lanes8(K, c0, cw);
      double s1[8] = {}, s2[8] = {}, sr[8] = {}, sa[8] = {}, d0[8] = {}, d1[8] = {};
      const int64_t n_end = std::min(N, (blk + 1) * nb.size);
      for (int64_t n = blk * nb.size; n < n_end; ++n) {
        gather_planes(x + (n * C + c0) * HW, HW, cw, buf.data());
        V l1 = {}, l2 = {}, l2o = {}, lr = {}, la = {}, a0 = {}, a1 = {};
        for (int64_t h = 0; h < H; ++h) {
          const acc_t* row = buf.data() + h * W * 8;
          V ev = {}, od = {};
          int64_t w = 0;
          if (h == 0) {
            for (; w + 1 < W; w += 2) {
              const V t0 = load8<acc_t>(row + w * 8) - k, t1 = load8<acc_t>(row + w * 8 + 8) - k;
              ev += t0;
              od += t1;
              l2 += t0 * t0;
              l2o += t1 * t1;
              a0 += t0 * ReD[w];
              a0 += t1 * ReD[w + 1];
              a1 += t0 * ImD[w];
              a1 += t1 * ImD[w + 1];
            }
            if (w < W) {
              const V t0 = load8<acc_t>(row + w * 8) - k;
              ev += t0;
              l2 += t0 * t0;
              a0 += t0 * ReD[w];
              a1 += t0 * ImD[w];
            }
          } else {
            for (; w + 1 < W; w += 2) {
              const V t0 = load8<acc_t>(row + w * 8) - k, t1 = load8<acc_t>(row + w * 8 + 8) - k;
              ev += t0;
              od += t1;
              l2 += t0 * t0;
              l2o += t1 * t1;
            }
            if (w < W) {
              const V t0 = load8<acc_t>(row + w * 8) - k;
              ev += t0;
              l2 += t0 * t0;
            }
          }
          const V R = ev + od, Aa = ev - od;
          l1 += R;
          lr += R * R;
          la += Aa * Aa;
        }
        l2 += l2o;
        for (int j = 0; j < 8; ++j) {
          s1[j] += l1[j];
          s2[j] += l2[j];
          sr[j] += lr[j];
          sa[j] += la[j];
          d0[j] += a0[j];
          d1[j] += a1[j];
        }
      }
      for (int j = 0; j < cw; ++j) {
        double* o = part + (blk * C + c0 + j) * 6;
        o[0] = s1[j];
        o[1] = s2[j];
        o[2] = sr[j];
        o[3] = W % 2 == 0 ? sa[j] : 0.0;
        o[4] = d0[j];
        o[5] = d1[j];
      }
    }
  });
  return nb.count;
}

// NCHW, large maps: rows straight from x.
template <typename scalar_t, typename acc_t>
int64_t stats_nchw_rows(const scalar_t* x, const acc_t* K, const acc_t* ReD, const acc_t* ImD,
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
  return N;
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
int64_t stats_nhwc(const scalar_t* x, const acc_t* K, const acc_t* ReD, const acc_t* ImD,
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
  return N;
}

template <typename scalar_t, typename acc_t>
int64_t stats(const scalar_t* x, const acc_t* K, const acc_t* ReD, const acc_t* ImD, double* part,
              int64_t N, int64_t C, int64_t H, int64_t W, Layout lay) {
  if (lay == Layout::NSC) return stats_nhwc(x, K, ReD, ImD, part, N, C, H, W);
  if (H * W <= kTMax) return stats_nchw_t(x, K, ReD, ImD, part, N, C, H, W);
  return stats_nchw_rows(x, K, ReD, ImD, part, N, C, H, W);
}

// ============================================================================== forward apply
// y = act(pre), pre = cx (x - K) + add (FwdTab).

template <Act A, typename scalar_t, typename acc_t>
void fwd_apply(const scalar_t* x, scalar_t* y, const FwdTab<acc_t>& ft, acc_t slope, int64_t N,
               int64_t C, int64_t H, int64_t W, Layout lay) {
  const int64_t HW = H * W;
  if (lay == Layout::NCS) {
    using V = V8<acc_t>;
    const V vs = splat(slope);
    const acc_t* Kp = ft.K.data();
    const acc_t* Ap = ft.cx.data();
    const acc_t* Bp = ft.b.data();
    const acc_t* T0p = ft.T0.data();
    const int64_t ts = ft.ts, head = std::min(ts, HW);
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t c = r % C;
        const acc_t k = Kp[c], a = Ap[c], bc = Bp[c];
        const acc_t* t0 = T0p + c * ts;
        const scalar_t* px = x + r * HW;
        scalar_t* py = y + r * HW;
        const V kv = splat(k), av = splat(a), bv = splat(bc);
        int64_t i = 0;
        for (; i + 8 <= head; i += 8)  // row 0 (and the rest of its last vector)
          store8<acc_t>(py + i, act_forward<A>(av * (load8<acc_t>(px + i) - kv) +
                                                   load8<acc_t>(t0 + i), vs));
        for (; i < head; ++i) {
          const acc_t pre = a * (static_cast<acc_t>(px[i]) - k) + t0[i];
          py[i] = static_cast<scalar_t>(act_forward<A>(pre, slope));
        }
        for (; i + 8 <= HW; i += 8)
          store8<acc_t>(py + i, act_forward<A>(av * (load8<acc_t>(px + i) - kv) + bv, vs));
        if (i < HW && HW - 8 >= head) {  // the last 8 values again: those already written get
          const int64_t j = HW - 8;       // the same value (the same formula) once more
          store8<acc_t>(py + j, act_forward<A>(av * (load8<acc_t>(px + j) - kv) + bv, vs));
          continue;
        }
        for (; i < HW; ++i) {
          const acc_t pre = a * (static_cast<acc_t>(px[i]) - k) + bc;
          py[i] = static_cast<scalar_t>(act_forward<A>(pre, slope));
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
            py[c] = static_cast<scalar_t>(act_forward<A>(pre, slope));
          }
        }
      }
    });
  }
}

// ============================================================================== gradient sums
// part[(blk*C + c)*4 + k] = [sum g, sum g t, sum_n g[n, 0, 0], sum_{n,w} g[n, 0, w] Pi[w]] of
// channel c over sample block blk, g = act'(pre) dy. Returns the number of sample blocks.

// NCHW: per channel, contiguous spans of each plane (the first vectors with row 0's offsets T0 and
// the Pi projection), 8-lane accumulators across the planes of a task, flushed to double every
// kChunk vectors. The same order for every act, so a fused activation sums exactly what an unfused
// one would.
template <Act A, typename scalar_t, typename acc_t>
int64_t grad_nchw(const scalar_t* dy, const scalar_t* x, const FwdTab<acc_t>& ft, const acc_t* Pi,
                  acc_t slope, double* part, int64_t N, int64_t C, int64_t H, int64_t W) {
  using V = V8<acc_t>;
  const V vs = splat(slope);
  const int64_t HW = H * W, ts = ft.ts, head = std::min(ts, HW);
  std::vector<acc_t> pi(ts, acc_t(0));  // Pi[0, :] padded to the head vectors
  std::copy(Pi, Pi + W, pi.begin());
  const acc_t* pp = pi.data();
  const acc_t* Kp = ft.K.data();
  const acc_t* Ap = ft.cx.data();
  const acc_t* Bp = ft.b.data();
  const acc_t* T0p = ft.T0.data();
  const NBlocks nb = n_blocks(N, C);
  // each plane's values past its whole vectors: one overlapping vector when the plane has 8
  const int64_t rest = (HW - head) % 8;
  const bool vec_tail = rest > 0 && HW >= 8;
  const M8<acc_t> tail = last_lanes<acc_t>(rest);
  at::parallel_for(0, nb.count * C, grain_for(2 * nb.size * HW), [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t blk = task / C, c = task % C;
      const acc_t k = Kp[c], a = Ap[c], bc = Bp[c];
      const acc_t* t0 = T0p + c * ts;
      const V kv = splat(k), av = splat(a), bv = splat(bc);
      double sd = 0, sdt = 0, g0 = 0, g1 = 0;
      V u = {}, vv = {};
      int64_t pending = 0;
      const int64_t n_end = std::min(N, (blk + 1) * nb.size);
      for (int64_t n = blk * nb.size; n < n_end; ++n) {
        const scalar_t* px = x + (n * C + c) * HW;
        const scalar_t* pd = dy + (n * C + c) * HW;
        V gh = {};
        acc_t tu = 0, tv = 0, th = 0;
        int64_t i = 0;
        for (; i + 8 <= head; i += 8) {
          const V t = load8<acc_t>(px + i) - kv;
          const V g = act_backward<A>(av * t + load8<acc_t>(t0 + i), vs, load8<acc_t>(pd + i));
          if (i == 0) g0 += g[0];
          u += g;
          vv += g * t;
          gh += g * load8<acc_t>(pp + i);
        }
        for (; i < head; ++i) {
          const acc_t t = static_cast<acc_t>(px[i]) - k;
          const acc_t g = act_backward<A>(a * t + t0[i], slope, static_cast<acc_t>(pd[i]));
          if (i == 0) g0 += g;
          tu += g;
          tv += g * t;
          th += g * pp[i];
        }
        for (; i + 8 <= HW; i += 8) {
          const V t = load8<acc_t>(px + i) - kv;
          const V g = act_backward<A>(av * t + bv, vs, load8<acc_t>(pd + i));
          u += g;
          vv += g * t;
        }
        if (vec_tail) {  // lanes of values >= i (off row 0: i >= head), the others masked out
          const V zero = {};
          const V t = load8<acc_t>(px + HW - 8) - kv;
          const V g = act_backward<A>(av * t + bv, vs, load8<acc_t>(pd + HW - 8));
          u += if_else(tail, g, zero);
          vv += if_else(tail, g * t, zero);
          i = HW;
        }
        for (; i < HW; ++i) {
          const acc_t t = static_cast<acc_t>(px[i]) - k;
          const acc_t g = act_backward<A>(a * t + bc, slope, static_cast<acc_t>(pd[i]));
          tu += g;
          tv += g * t;
        }
        g1 += tree8(gh) + th;
        sd += tu;
        sdt += tv;
        pending += HW / 8;
        if (pending >= kChunk) {
          sd += tree8(u);
          sdt += tree8(vv);
          u = V{};
          vv = V{};
          pending = 0;
        }
      }
      sd += tree8(u);
      sdt += tree8(vv);
      double* o = part + (blk * C + c) * 4;
      o[0] = sd;
      o[1] = sdt;
      o[2] = g0;
      o[3] = g1;
    }
  });
  return nb.count;
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
        const acc_t g = act_backward<A>(a[j] * t + t0[j], slope, static_cast<acc_t>(d0[j]));
        if (w == 0) G0[j] = g;
        se[j] += g;
        te[j] += g * t;
        g1[j] += g * pw;
      }
    } else {
      for (int j = 0; j < CB; ++j) {
        const acc_t t = static_cast<acc_t>(x0[j]) - k[j];
        const acc_t g = act_backward<A>(a[j] * t + add[j], slope, static_cast<acc_t>(d0[j]));
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
int64_t grad_nhwc(const scalar_t* dy, const scalar_t* x, const FwdTab<acc_t>& ft, const acc_t* Pi,
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
  return N;
}

template <Act A, typename scalar_t, typename acc_t>
int64_t grad(const scalar_t* dy, const scalar_t* x, const FwdTab<acc_t>& ft, const acc_t* Pi,
             acc_t slope, double* part, int64_t N, int64_t C, int64_t H, int64_t W, Layout lay) {
  if (lay == Layout::NSC) return grad_nhwc<A>(dy, x, ft, Pi, slope, part, N, C, H, W);
  return grad_nchw<A>(dy, x, ft, Pi, slope, part, N, C, H, W);
}

// ============================================================================== backward apply
// dx = c_dy g + c_t t + cst [+ c_R R + c_A A (-1)^w] + [h == 0] T1[c, w], g = act'(pre) dy.

// NCHW, small maps, training (lanes_bwd): x and dy of 8 channels of a sample transposed (lane =
// channel); per row the row sums R, A (vertical adds, whatever W), then dx of the row into dy's
// buffer in place, which is transposed back into dx.
template <Act A, typename scalar_t, typename acc_t>
void bwd_nchw_t(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const FwdTab<acc_t>& ft,
                const BwdTab<acc_t>& bt, acc_t slope, int64_t N, int64_t C, int64_t H,
                int64_t W) {
  using V = V8<acc_t>;
  const V vs = splat(slope);
  const int64_t HW = H * W, ncb = (C + 7) / 8, cs = ft.cs;
  at::parallel_for(0, N * ncb, grain_for(3 * 8 * HW), [&](int64_t b, int64_t e) {
    std::vector<acc_t> bx(HW * 8), bd(HW * 8);
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / ncb, c0 = (task % ncb) * 8;
      const int cw = static_cast<int>(std::min<int64_t>(8, C - c0));
      const int64_t off = (n * C + c0) * HW;
      gather_planes(x + off, HW, cw, bx.data());
      gather_planes(dy + off, HW, cw, bd.data());
      const V k = load8<acc_t>(ft.K.data() + c0), a = load8<acc_t>(ft.cx.data() + c0);
      const V add = load8<acc_t>(ft.b.data() + c0);
      const V cdy = load8<acc_t>(bt.cdy.data() + c0), ct = load8<acc_t>(bt.ct.data() + c0);
      const V cst = load8<acc_t>(bt.cst.data() + c0), cR = load8<acc_t>(bt.cR.data() + c0);
      const V cA = load8<acc_t>(bt.cA.data() + c0);
      const acc_t* T0 = ft.T0.data() + c0;
      const acc_t* T1 = bt.T1.data() + c0;
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* rx = bx.data() + h * W * 8;
        acc_t* rd = bd.data() + h * W * 8;
        V ev = {}, od = {};
        int64_t w = 0;
        for (; w + 1 < W; w += 2) {
          ev += load8<acc_t>(rx + w * 8) - k;
          od += load8<acc_t>(rx + w * 8 + 8) - k;
        }
        if (w < W) ev += load8<acc_t>(rx + w * 8) - k;
        const V R = ev + od, Aa = ev - od;
        const V base = cst + cR * R, alt = cA * Aa;
        const V oe = base + alt, oo = base - alt;  // offsets of even / odd columns
        if (h == 0) {
          for (w = 0; w < W; ++w) {
            const V t = load8<acc_t>(rx + w * 8) - k;
            const V g =
                act_backward<A>(a * t + load8<acc_t>(T0 + w * cs), vs, load8<acc_t>(rd + w * 8));
            store8<acc_t>(rd + w * 8,
                          cdy * g + ct * t + (((w & 1) ? oo : oe) + load8<acc_t>(T1 + w * cs)));
          }
          continue;
        }
        for (w = 0; w + 1 < W; w += 2) {
          const V t0 = load8<acc_t>(rx + w * 8) - k, t1 = load8<acc_t>(rx + w * 8 + 8) - k;
          const V g0 = act_backward<A>(a * t0 + add, vs, load8<acc_t>(rd + w * 8));
          const V g1 = act_backward<A>(a * t1 + add, vs, load8<acc_t>(rd + w * 8 + 8));
          store8<acc_t>(rd + w * 8, cdy * g0 + ct * t0 + oe);
          store8<acc_t>(rd + w * 8 + 8, cdy * g1 + ct * t1 + oo);
        }
        if (w < W) {
          const V t = load8<acc_t>(rx + w * 8) - k;
          const V g = act_backward<A>(a * t + add, vs, load8<acc_t>(rd + w * 8));
          store8<acc_t>(rd + w * 8, cdy * g + ct * t + oe);
        }
      }
      scatter_planes(bd.data(), HW, cw, dx + off);
    }
  });
}

// NCHW training backward apply on maps of width 8 (planes tables): each row is one 8-vector of
// its plane, so dy and dx are used in place (bwd_nchw_t transposes x, dy and dx). Only the row
// sums R, A reduce across a vector: AVX2 float transposes t = x - K of 8 rows at a time (lane =
// row), the other rows / builds sum each row's lanes; both in the order ev = ((t0 + t2) + t4) + t6,
// od = ((t1 + t3) + t5) + t7, so the builds agree bit for bit.
template <Act A, typename scalar_t, typename acc_t>
void bwd_nchw_w8(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const FwdTab<acc_t>& ft,
                 const BwdTab<acc_t>& bt, acc_t slope, int64_t N, int64_t C, int64_t H) {
  using V = V8<acc_t>;
  const V vs = splat(slope);
  const int64_t HW = H * 8, ts = ft.ts;
  const M8<acc_t> odd = odd_lanes<acc_t>();
  at::parallel_for(0, N * C, grain_for(3 * HW), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t c = r % C;
      const acc_t cs = bt.cst[c], cr = bt.cR[c], ca = bt.cA[c];
      const V kv = splat(ft.K[c]), av = splat(ft.cx[c]), bv = splat(ft.b[c]);
      const V dv = splat(bt.cdy[c]), tv = splat(bt.ct[c]);
      const V T0 = load8<acc_t>(ft.T0.data() + c * ts), T1 = load8<acc_t>(bt.T1.data() + c * ts);
      const scalar_t* px = x + r * HW;
      const scalar_t* pd = dy + r * HW;
      scalar_t* pdx = dx + r * HW;
      // dx of row h from its t and its offsets of = [ev, od, ev, od, ...] (+ row 0's tables)
      auto row = [&](int64_t h, const V& t, const V& of) {
        if (h == 0) {
          const V g = act_backward<A>(av * t + T0, vs, load8<acc_t>(pd));
          store8<acc_t>(pdx, dv * g + tv * t + (of + T1));
        } else {
          const V g = act_backward<A>(av * t + bv, vs, load8<acc_t>(pd + h * 8));
          store8<acc_t>(pdx + h * 8, dv * g + tv * t + of);
        }
      };
      int64_t h = 0;
#if NK_AVX2
      if constexpr (std::is_same_v<scalar_t, float>) {
        // pairs [ev_h, od_h] of rows h = 0, 1, 4, 5 (lo) / 2, 3, 6, 7 (hi), broadcast per row
        static const __m256i kPair[4] = {_mm256_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1),
                                         _mm256_setr_epi32(2, 3, 2, 3, 2, 3, 2, 3),
                                         _mm256_setr_epi32(4, 5, 4, 5, 4, 5, 4, 5),
                                         _mm256_setr_epi32(6, 7, 6, 7, 6, 7, 6, 7)};
        for (; h + 8 <= H; h += 8) {
          V t[8];
          __m256 m[8];
          for (int j = 0; j < 8; ++j) {
            t[j] = load8<acc_t>(px + (h + j) * 8) - kv;
            m[j] = m256(t[j]);
          }
          transpose8(m);  // m[w] = column w of the 8 rows
          V ev = v8(m[0]) + v8(m[2]), od = v8(m[1]) + v8(m[3]);
          ev += v8(m[4]);
          od += v8(m[5]);
          ev += v8(m[6]);
          od += v8(m[7]);
          const V R = ev + od, Aa = ev - od;
          const V base = splat(cs) + splat(cr) * R, alt = splat(ca) * Aa;
          const __m256 oe = m256(base + alt), oo = m256(base - alt);
          const __m256 lo = _mm256_unpacklo_ps(oe, oo), hi = _mm256_unpackhi_ps(oe, oo);
          for (int j = 0; j < 8; ++j) {
            const __m256 src = (j & 2) ? hi : lo;
            const int q = (j & 1) | ((j & 4) >> 1);
            row(h + j, t[j], v8(_mm256_permutevar8x32_ps(src, kPair[q])));
          }
        }
      }
#endif
      for (; h < H; ++h) {
        const V t = load8<acc_t>(px + h * 8) - kv;
        const acc_t ev = ((t[0] + t[2]) + t[4]) + t[6], od = ((t[1] + t[3]) + t[5]) + t[7];
        const acc_t base = cs + cr * (ev + od), alt = ca * (ev - od);
        row(h, t, if_else(odd, splat(base - alt), splat(base + alt)));
      }
    }
  });
}

// NCHW training backward apply on maps of H <= 8 rows of W < 8 values (small_bwd; planes tables):
// the plane's HW values are walked as contiguous 8-vectors (the last one overlapping), dy and dx in
// place. The row sums: AVX2 float transposes the H rows of t = x - K (lane = row; rows past the
// plane's end are shifted down from its last vector), the other builds sum each row in scalars; both
// as ev = ((t0 + t2) + t4) + ..., od = ((t1 + t3) + ...) from column 0 / 1. Each vector then takes
// its values' row offsets by the (row, column parity) of its lanes, tables of (H, W) only.
template <Act A, typename scalar_t, typename acc_t>
void bwd_nchw_small(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const FwdTab<acc_t>& ft,
                    const BwdTab<acc_t>& bt, acc_t slope, int64_t N, int64_t C, int64_t H,
                    int64_t W) {
  using V = V8<acc_t>;
  const V vs = splat(slope);
  const int64_t HW = H * W, ts = ft.ts;
  const int64_t nv = (HW + 7) / 8;  // vectors of a plane; vector p starts at pos[p]
  int64_t pos[8];
  int32_t rowi[8][8];  // row of lane l of vector p
  M8<acc_t> par[8] = {};  // lanes of odd columns
  for (int64_t p = 0; p < nv; ++p) {
    pos[p] = std::min<int64_t>(p * 8, HW - 8);
    for (int l = 0; l < 8; ++l) {
      const int64_t i = pos[p] + l;
      rowi[p][l] = static_cast<int32_t>(i / W);
      par[p].set(l, (i % W) & 1);
    }
  }
  at::parallel_for(0, N * C, grain_for(3 * HW), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t c = r % C;
      const acc_t cs = bt.cst[c], cr = bt.cR[c], ca = bt.cA[c];
      const V kv = splat(ft.K[c]), av = splat(ft.cx[c]), bv = splat(ft.b[c]);
      const V dv = splat(bt.cdy[c]), tv = splat(bt.ct[c]);
      const scalar_t* px = x + r * HW;
      const scalar_t* pd = dy + r * HW;
      scalar_t* pdx = dx + r * HW;
      alignas(32) acc_t oe[8] = {}, oo[8] = {};  // offsets of even / odd columns per row
      bool done = false;
#if NK_AVX2
      if constexpr (std::is_same_v<scalar_t, float>) {
        const __m256 last = _mm256_loadu_ps(px + HW - 8);
        __m256 m[8];
        for (int64_t h = 0; h < 8; ++h) {
          if (h >= H) {
            m[h] = _mm256_setzero_ps();
          } else if (h * W + 8 <= HW) {
            m[h] = m256(load8<acc_t>(px + h * W) - kv);
          } else {  // lane j = value h*W + j, found at lane j + s of the last vector
            const int s = static_cast<int>(h * W - (HW - 8));
            const __m256i idx = _mm256_min_epi32(
                _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(s)),
                _mm256_set1_epi32(7));
            m[h] = m256(v8(_mm256_permutevar8x32_ps(last, idx)) - kv);
          }
        }
        transpose8(m);  // m[w] = column w of the rows
        V ev = v8(m[0]), od = v8(m[1]);
        for (int64_t w = 2; w < W; ++w) {
          if (w & 1)
            od += v8(m[w]);
          else
            ev += v8(m[w]);
        }
        const V R = ev + od, Aa = ev - od;
        const V base = splat(cs) + splat(cr) * R, alt = splat(ca) * Aa;
        store8<acc_t>(oe, base + alt);
        store8<acc_t>(oo, base - alt);
        done = true;
      }
#endif
      if (!done) {
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* q = px + h * W;
          acc_t ev = static_cast<acc_t>(q[0]) - ft.K[c], od = static_cast<acc_t>(q[1]) - ft.K[c];
          for (int64_t w = 2; w < W; ++w) {
            if (w & 1)
              od += static_cast<acc_t>(q[w]) - ft.K[c];
            else
              ev += static_cast<acc_t>(q[w]) - ft.K[c];
          }
          const acc_t base = cs + cr * (ev + od), alt = ca * (ev - od);
          oe[h] = base + alt;
          oo[h] = base - alt;
        }
      }
      for (int64_t p = 0; p < nv; ++p) {
        const int64_t i = pos[p];
        V of;
#if NK_AVX2
        if constexpr (std::is_same_v<acc_t, float>) {
          const __m256i ri = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rowi[p]));
          const V ve = v8(_mm256_permutevar8x32_ps(_mm256_loadu_ps(oe), ri));
          const V vo = v8(_mm256_permutevar8x32_ps(_mm256_loadu_ps(oo), ri));
          of = if_else(par[p], vo, ve);
        } else
#endif
        {
          acc_t o[8];
          for (int l = 0; l < 8; ++l) o[l] = par[p][l] ? oo[rowi[p][l]] : oe[rowi[p][l]];
          of = load8<acc_t>(o);
        }
        const V t = load8<acc_t>(px + i) - kv;
        if (p == 0) {  // row 0 and the rest of its vector: the tables (b / 0 past W)
          const V g = act_backward<A>(av * t + load8<acc_t>(ft.T0.data() + c * ts), vs,
                                load8<acc_t>(pd));
          store8<acc_t>(pdx, dv * g + tv * t + (of + load8<acc_t>(bt.T1.data() + c * ts)));
        } else {
          const V g = act_backward<A>(av * t + bv, vs, load8<acc_t>(pd + i));
          store8<acc_t>(pdx + i, dv * g + tv * t + of);
        }
      }
    }
  });
}

template <Act A, typename scalar_t, typename acc_t>
void bwd_apply(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const FwdTab<acc_t>& ft,
               const BwdTab<acc_t>& bt, acc_t slope, int64_t N, int64_t C, int64_t H, int64_t W,
               Layout lay, bool need_row) {
  const int64_t HW = H * W;
  if (lanes_bwd(lay, H, W, need_row)) {
    bwd_nchw_t<A>(dy, x, dx, ft, bt, slope, N, C, H, W);
  } else if (lay == Layout::NCS && need_row && W == 8) {
    bwd_nchw_w8<A>(dy, x, dx, ft, bt, slope, N, C, H);
  } else if (lay == Layout::NCS && need_row && small_bwd(H, W)) {
    bwd_nchw_small<A>(dy, x, dx, ft, bt, slope, N, C, H, W);
  } else if (lay == Layout::NCS) {
    using V = V8<acc_t>;
    const V vs = splat(slope);
    const int64_t ts = ft.ts, head = std::min(ts, HW);
    const M8<acc_t> odd = odd_lanes<acc_t>();
    at::parallel_for(0, N * C, grain_for(2 * HW), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t c = r % C;
        const acc_t k = ft.K[c], a = ft.cx[c], bc = ft.b[c];
        const acc_t cdy = bt.cdy[c], ct = bt.ct[c], cs = bt.cst[c], cr = bt.cR[c],
                    ca = bt.cA[c];
        const acc_t* t0 = ft.T0.data() + c * ts;
        const acc_t* t1 = bt.T1.data() + c * ts;
        const V kv = splat(k), av = splat(a), bv = splat(bc), dv = splat(cdy), tv = splat(ct);
        if (!need_row) {  // eval: dx = c_dy g (the other terms are 0 in eval)
          const scalar_t* px = x + r * HW;
          const scalar_t* pd = dy + r * HW;
          scalar_t* pdx = dx + r * HW;
          const V sv = splat(cs);
          int64_t i = 0;
          for (; i + 8 <= head; i += 8) {
            const V t = load8<acc_t>(px + i) - kv;
            const V g = act_backward<A>(av * t + load8<acc_t>(t0 + i), vs, load8<acc_t>(pd + i));
            store8<acc_t>(pdx + i, dv * g + tv * t + (sv + load8<acc_t>(t1 + i)));
          }
          for (; i < head; ++i) {
            const acc_t t = static_cast<acc_t>(px[i]) - k;
            const acc_t g = act_backward<A>(a * t + t0[i], slope, static_cast<acc_t>(pd[i]));
            pdx[i] = static_cast<scalar_t>(cdy * g + ct * t + (cs + t1[i]));
          }
          for (; i + 8 <= HW; i += 8) {
            const V t = load8<acc_t>(px + i) - kv;
            const V g = act_backward<A>(av * t + bv, vs, load8<acc_t>(pd + i));
            store8<acc_t>(pdx + i, dv * g + tv * t + sv);
          }
          if (i < HW && HW - 8 >= head) i = HW - 8;  // overlapping: the same values again
          for (; i + 8 <= HW; i += 8) {
            const V t = load8<acc_t>(px + i) - kv;
            const V g = act_backward<A>(av * t + bv, vs, load8<acc_t>(pd + i));
            store8<acc_t>(pdx + i, dv * g + tv * t + sv);
          }
          for (; i < HW; ++i) {
            const acc_t t = static_cast<acc_t>(px[i]) - k;
            const acc_t g = act_backward<A>(a * t + bc, slope, static_cast<acc_t>(pd[i]));
            pdx[i] = static_cast<scalar_t>(cdy * g + ct * t + cs);
          }
          continue;
        }
        for (int64_t h = 0; h < H; ++h) {
          const int64_t base = r * HW + h * W;
          const scalar_t* px = x + base;
          const scalar_t* pd = dy + base;
          scalar_t* pdx = dx + base;
          acc_t R, Aa, Q;
          row_raq<false>(px, W, k, R, Aa, Q);
          const acc_t base_r = cs + cr * R, alt = ca * Aa;
          const acc_t ev = base_r + alt, od = base_r - alt;
          // vectors from even columns, then (W >= 8) the row's last 8 values overlapping: the
          // values written already get the same value again. Row 0 adds T0 to pre and T1 to dx
          // (their tables have W rounded up to 8 entries).
          const V ofe = if_else(odd, splat(od), splat(ev));
          const V ofo = if_else(odd, splat(ev), splat(od));
          if (h == 0) {
            int64_t w = 0;
            for (; w + 8 <= W; w += 8) {
              const V t = load8<acc_t>(px + w) - kv;
              const V g = act_backward<A>(av * t + load8<acc_t>(t0 + w), vs, load8<acc_t>(pd + w));
              store8<acc_t>(pdx + w, dv * g + tv * t + (ofe + load8<acc_t>(t1 + w)));
            }
            if (w < W && W >= 8) {
              const int64_t j = W - 8;
              const V t = load8<acc_t>(px + j) - kv;
              const V g = act_backward<A>(av * t + load8<acc_t>(t0 + j), vs, load8<acc_t>(pd + j));
              store8<acc_t>(pdx + j,
                            dv * g + tv * t + (((j & 1) ? ofo : ofe) + load8<acc_t>(t1 + j)));
              w = W;
            }
            for (; w < W; ++w) {
              const acc_t t = static_cast<acc_t>(px[w]) - k;
              const acc_t g = act_backward<A>(a * t + t0[w], slope, static_cast<acc_t>(pd[w]));
              pdx[w] = static_cast<scalar_t>(cdy * g + ct * t + (((w & 1) ? od : ev) + t1[w]));
            }
            continue;
          }
          int64_t w = 0;
          for (; w + 8 <= W; w += 8) {
            const V t = load8<acc_t>(px + w) - kv;
            const V g = act_backward<A>(av * t + bv, vs, load8<acc_t>(pd + w));
            store8<acc_t>(pdx + w, dv * g + tv * t + ofe);
          }
          if (w < W && W >= 8) {
            const int64_t j = W - 8;
            const V t = load8<acc_t>(px + j) - kv;
            const V g = act_backward<A>(av * t + bv, vs, load8<acc_t>(pd + j));
            store8<acc_t>(pdx + j, dv * g + tv * t + ((j & 1) ? ofo : ofe));
            w = W;
          }
          for (; w < W; ++w) {
            const acc_t t = static_cast<acc_t>(px[w]) - k;
            const acc_t g = act_backward<A>(a * t + bc, slope, static_cast<acc_t>(pd[w]));
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
            const acc_t g = act_backward<A>(ap[c] * t + add[c], slope, static_cast<acc_t>(pd[c]));
            pdx[c] = static_cast<scalar_t>(cdy[c] * g + ctp[c] * t + of[c]);
          }
        }
      }
    });
  }
}
