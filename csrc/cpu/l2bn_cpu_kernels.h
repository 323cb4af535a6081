// L2BN CPU kernels: the passes over x (statistics, gradient sums, apply), the finalize phases
// between them and the op drivers that run them. Included twice by l2bn_cpu.cpp, inside namespace
// k_default and (x86-64 GCC) inside namespace k_avx2 under `#pragma GCC target("avx2")`; the op
// bodies pick one at run time: the same source compiled for two instruction sets. No include
// guard, no includes (the includer provides ATen, View3, Act, the finalize of l2bn_finalize.h,
// the job structs FwdJob / BwdJob, team_run / part, NK_INLINE, NK_AVX2 = 0 / 1).
//
// Lanes: explicit 8-lane vectors (V8 of csrc/cpu/vec8.h: one ymm register of floats in the AVX2
// build, two xmm in the baseline build). Every lane does the IEEE operations the scalar code
// does, in the same order (no FMA: neither target enables it), and lanes and tails run the same
// formulas (pre_act, act_forward, act_backward of csrc/activation.h), so the two builds, the
// lanes and the tails agree bit for bit. pre is one expression (pre_act) in every pass, so the
// activation's masks agree exactly.
// Summation orders are fixed functions of the shape (never of the thread count).
//
// One parallel region per op: team_run runs an op's phases on a team of threads with a barrier
// between phases (statistics pass | sample norms | channel statistics | apply, and gradient sums |
// channel sums | sample terms | apply); the finalize phases are split by samples or by channel
// groups over the same team, so no phase runs on one thread while the other waits.

constexpr int64_t kChunk = 1024;  // NCS: float lane sums are flushed to double every kChunk values
constexpr int64_t kCBlock = 128;  // NSC: channels per task
constexpr int64_t kSRows = 32;    // NSC: spatial rows per chunk
constexpr int64_t kFinC = 64;     // channels per block of the channel finalize loops

// ---------------------------------------------------------------- lanes
// V8<T>, splat, load8, store8, tree8: the build's lanes (csrc/cpu/vec8.h); act_forward<A> /
// act_backward<A> of csrc/activation.h run on them as on a value.
template <typename T, typename S>
NK_INLINE T to_acc(S v) {
  if constexpr (std::is_same_v<S, T> || std::is_same_v<S, double> || std::is_same_v<S, float>)
    return static_cast<T>(v);
  else
    return static_cast<T>(static_cast<float>(v));
}

template <typename F>
inline void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::ReLU: f(std::integral_constant<Act, Act::ReLU>{}); break;
    case Act::LeakyReLU: f(std::integral_constant<Act, Act::LeakyReLU>{}); break;
    case Act::SiLU: f(std::integral_constant<Act, Act::SiLU>{}); break;
    default: f(std::integral_constant<Act, Act::Identity>{}); break;
  }
}

// ---------------------------------------------------------------- NCS rows
// Statistics of a row of float / half / bfloat16: one pass in double over the values shifted by
// the row's first element, d = x - x[0] (exact in double), accumulating sum d and sum d^2; then
// mean = x[0] + sum/S and M2 = sum d^2 - (sum d)^2 / S. Since x[0] is one of the values,
// S (x[0] - mean)^2 <= (S - 1) M2, so the cancellation costs at most a factor S on the double
// rounding error (~S^2 * 1e-16 relative), far below float output precision.
template <typename scalar_t>
NK_INLINE void row_stats_shifted(const scalar_t* p, int64_t S, double invS, float& mean,
                                 float& m2) {
  const double x0 = to_acc<double>(p[0]);
  const V8<double> v0 = splat(x0);
  V8<double> s0 = V8<double>{}, s1 = s0, q0 = s0, q1 = s0;
  int64_t i = 0;
  for (; i + 16 <= S; i += 16) {
    const V8<double> a = load8<double>(p + i) - v0, b = load8<double>(p + i + 8) - v0;
    s0 += a;
    s1 += b;
    q0 += a * a;
    q1 += b * b;
  }
  if (i + 8 <= S) {
    const V8<double> a = load8<double>(p + i) - v0;
    s0 += a;
    q0 += a * a;
    i += 8;
  }
  double sum = tree8(s0 + s1), sq = tree8(q0 + q1);
  for (; i < S; ++i) {
    const double d = to_acc<double>(p[i]) - x0;
    sum += d;
    sq += d * d;
  }
  const double md = sum * invS;
  mean = static_cast<float>(x0 + md);
  m2 = static_cast<float>(std::max(0.0, sq - sum * md));
}

// Statistics of a row of doubles: two passes per chunk of kChunk values (the chunk's mean, then
// its centered squares), chunks combined with Chan's formula.
NK_INLINE void row_stats_double(const double* p, int64_t S, double& mean, double& m2) {
  ChanRow row{0.0, 0.0, 0.0};
  for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
    const int64_t L = std::min(kChunk, S - s0);
    const double* q = p + s0;
    V8<double> a = V8<double>{};
    int64_t i = 0;
    for (; i + 8 <= L; i += 8) a += load8<double>(q + i);
    double sum = tree8(a);
    for (; i < L; ++i) sum += q[i];
    const double mb = sum / static_cast<double>(L);
    const V8<double> vm = splat(mb);
    V8<double> b = V8<double>{};
    for (i = 0; i + 8 <= L; i += 8) {
      const V8<double> d = load8<double>(q + i) - vm;
      b += d * d;
    }
    double sq = tree8(b);
    for (; i < L; ++i) sq += (q[i] - mb) * (q[i] - mb);
    chan_merge(row, ChanRow{static_cast<double>(L), mb, sq});
  }
  mean = row.mean;
  m2 = row.m2;
}

template <typename scalar_t>
NK_INLINE void row_stats(const scalar_t* p, int64_t S, double invS, at::opmath_type<scalar_t>& m,
                         at::opmath_type<scalar_t>& m2) {
  if constexpr (std::is_same_v<scalar_t, double>)
    row_stats_double(p, S, m, m2);
  else
    row_stats_shifted<scalar_t>(p, S, invS, m, m2);
}

// Gradient sums of a row: Q = sum g, P = sum g (x - ctr), g = act'(pre) dy; lanes in acc (two
// 8-lane accumulators each), flushed to double every kChunk values. STORE_G: g also into pg.
template <typename scalar_t, Act A, bool STORE_G>
NK_INLINE void row_grad_sums(const scalar_t* px, const scalar_t* pd, int64_t S,
                             at::opmath_type<scalar_t> ctr, at::opmath_type<scalar_t> a,
                             at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> slope,
                             scalar_t* pg, at::opmath_type<scalar_t>& Q,
                             at::opmath_type<scalar_t>& P) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = V8<acc_t>;
  const V vc = splat(ctr), va = splat(a), vb = splat(b), vs = splat(slope);
  double tq = 0.0, tp = 0.0;
  for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
    const int64_t e = s0 + std::min(kChunk, S - s0);
    V q0 = V{}, q1 = q0, p0 = q0, p1 = q0;
    int64_t i = s0;
    for (; i + 16 <= e; i += 16) {
      const V x0 = load8<acc_t>(px + i), x1 = load8<acc_t>(px + i + 8);
      const V g0 = act_backward<A>(pre_act<V>(x0, vc, va, vb), vs, load8<acc_t>(pd + i));
      const V g1 = act_backward<A>(pre_act<V>(x1, vc, va, vb), vs, load8<acc_t>(pd + i + 8));
      if constexpr (STORE_G) {
        store8<acc_t>(pg + i, g0);
        store8<acc_t>(pg + i + 8, g1);
      }
      q0 += g0;
      q1 += g1;
      p0 += g0 * (x0 - vc);
      p1 += g1 * (x1 - vc);
    }
    if (i + 8 <= e) {
      const V x0 = load8<acc_t>(px + i);
      const V g0 = act_backward<A>(pre_act<V>(x0, vc, va, vb), vs, load8<acc_t>(pd + i));
      if constexpr (STORE_G) store8<acc_t>(pg + i, g0);
      q0 += g0;
      p0 += g0 * (x0 - vc);
      i += 8;
    }
    acc_t cq = tree8(q0 + q1), cp = tree8(p0 + p1);
    for (; i < e; ++i) {
      const acc_t xv = to_acc<acc_t>(px[i]);
      const acc_t g = act_backward<acc_t>(A, pre_act<acc_t>(xv, ctr, a, b), slope, to_acc<acc_t>(pd[i]));
      if constexpr (STORE_G) pg[i] = g;
      cq += g;
      cp += g * (xv - ctr);
    }
    tq += cq;
    tp += cp;
  }
  Q = static_cast<acc_t>(tq);
  P = static_cast<acc_t>(tp);
}

// Forward apply of a row: y = act(pre).
template <typename scalar_t, Act A>
NK_INLINE void row_apply_fwd(const scalar_t* px, int64_t S, at::opmath_type<scalar_t> ctr,
                             at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b,
                             at::opmath_type<scalar_t> slope, scalar_t* po) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = V8<acc_t>;
  const V vc = splat(ctr), va = splat(a), vb = splat(b), vs = splat(slope);
  int64_t i = 0;
  for (; i + 8 <= S; i += 8)
    store8<acc_t>(po + i, act_forward<A>(pre_act<V>(load8<acc_t>(px + i), vc, va, vb), vs));
  for (; i < S; ++i)
    po[i] = static_cast<scalar_t>(
        act_forward<acc_t>(A, pre_act<acc_t>(to_acc<acc_t>(px[i]), ctr, a, b), slope));
}

// Backward apply of a row: dx = x_coef g + dx_coef (x - ctr) + dx_offset, g = act'(pre) dy
// (pd = dy), or g read from pd (G_IN: the gradient-sums pass stored it there; A is Identity).
template <typename scalar_t, Act A, bool G_IN>
NK_INLINE void row_apply_bwd(const scalar_t* px, const scalar_t* pd, int64_t S,
                             at::opmath_type<scalar_t> ctr, at::opmath_type<scalar_t> a,
                             at::opmath_type<scalar_t> b, at::opmath_type<scalar_t> dxc,
                             at::opmath_type<scalar_t> dxo, at::opmath_type<scalar_t> slope,
                             scalar_t* po) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = V8<acc_t>;
  const V vc = splat(ctr), va = splat(a), vb = splat(b), vs = splat(slope);
  const V vdc = splat(dxc), vdo = splat(dxo);
  int64_t i = 0;
  for (; i + 8 <= S; i += 8) {
    const V xv = load8<acc_t>(px + i);
    V g = load8<acc_t>(pd + i);
    if constexpr (!G_IN) g = act_backward<A>(pre_act<V>(xv, vc, va, vb), vs, g);
    store8<acc_t>(po + i, va * g + vdc * (xv - vc) + vdo);
  }
  for (; i < S; ++i) {
    const acc_t xv = to_acc<acc_t>(px[i]);
    acc_t g = to_acc<acc_t>(pd[i]);
    if constexpr (!G_IN) g = act_backward<acc_t>(A, pre_act<acc_t>(xv, ctr, a, b), slope, g);
    po[i] = static_cast<scalar_t>(a * g + dxc * (xv - ctr) + dxo);
  }
}

// ---------------------------------------------------------------- NSC blocks
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
// Chan combination across chunks (each channel on its own: the loops over c vectorize without
// reordering any sum). Writes run_mean[W], run_m2[W].
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
      for (int64_t c = 0; c < W; ++c) sum[c] += to_acc<acc_t>(row[c]);
    }
    const acc_t inv = acc_t(1) / acc_t(L);
    for (int64_t c = 0; c < W; ++c) sum[c] *= inv;  // chunk mean
    for (int64_t s = s0; s < s0 + L; ++s) {
      const scalar_t* row = base + s * ld;
      for (int64_t c = 0; c < W; ++c) {
        const acc_t d = to_acc<acc_t>(row[c]) - sum[c];
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

// One-pass gradient sums of W channels (ld apart between rows) over Srows rows, per-chunk
// partials (kSRows rows) added in order; 8 channels a vector, then single channels.
template <typename scalar_t, Act A>
inline void sums_block(const scalar_t* bx, const scalar_t* bd, int64_t ld, int64_t W,
                       int64_t Srows, const at::opmath_type<scalar_t>* ctr,
                       const at::opmath_type<scalar_t>* a, const at::opmath_type<scalar_t>* bb,
                       at::opmath_type<scalar_t> slope, at::opmath_type<scalar_t>* tot_p,
                       at::opmath_type<scalar_t>* tot_q) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = V8<acc_t>;
  int64_t c = 0;
  for (; c + 8 <= W; c += 8) {
    const V vc = load8<acc_t>(ctr + c), va = load8<acc_t>(a + c), vb = load8<acc_t>(bb + c);
    const V vs = splat(slope);
    V tp = V{}, tq = tp;
    for (int64_t s0 = 0; s0 < Srows; s0 += kSRows) {
      const int64_t e = s0 + std::min(kSRows, Srows - s0);
      V cp = V{}, cq = cp;
      for (int64_t s = s0; s < e; ++s) {
        const V xv = load8<acc_t>(bx + s * ld + c);
        const V g = act_backward<A>(pre_act<V>(xv, vc, va, vb), vs, load8<acc_t>(bd + s * ld + c));
        cq += g;
        cp += g * (xv - vc);
      }
      tp += cp;
      tq += cq;
    }
    store8<acc_t>(tot_p + c, tp);
    store8<acc_t>(tot_q + c, tq);
  }
  for (; c < W; ++c) {
    acc_t tp = 0, tq = 0;
    for (int64_t s0 = 0; s0 < Srows; s0 += kSRows) {
      const int64_t e = s0 + std::min(kSRows, Srows - s0);
      acc_t cp = 0, cq = 0;
      for (int64_t s = s0; s < e; ++s) {
        const acc_t xv = to_acc<acc_t>(bx[s * ld + c]);
        const acc_t g = act_backward<acc_t>(A, pre_act<acc_t>(xv, ctr[c], a[c], bb[c]), slope,
                                            to_acc<acc_t>(bd[s * ld + c]));
        cq += g;
        cp += g * (xv - ctr[c]);
      }
      tp += cp;
      tq += cq;
    }
    tot_p[c] = tp;
    tot_q[c] = tq;
  }
}

// Apply of one NSC row (C contiguous channels of one (n, s)); coefficient planes of sample n.
template <typename scalar_t, Act A, bool BWD>
NK_INLINE void nsc_row_apply(const scalar_t* px, const scalar_t* pd, int64_t C,
                             const at::opmath_type<scalar_t>* ctr,
                             const at::opmath_type<scalar_t>* a,
                             const at::opmath_type<scalar_t>* b,
                             const at::opmath_type<scalar_t>* dxc,
                             const at::opmath_type<scalar_t>* dxo, at::opmath_type<scalar_t> slope,
                             scalar_t* po) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = V8<acc_t>;
  const V vs = splat(slope);
  int64_t ch = 0;
  for (; ch + 8 <= C; ch += 8) {
    const V xv = load8<acc_t>(px + ch), vc = load8<acc_t>(ctr + ch);
    const V pre = pre_act<V>(xv, vc, load8<acc_t>(a + ch), load8<acc_t>(b + ch));
    if constexpr (!BWD) {
      store8<acc_t>(po + ch, act_forward<A>(pre, vs));
    } else {
      const V g = act_backward<A>(pre, vs, load8<acc_t>(pd + ch));
      store8<acc_t>(po + ch, load8<acc_t>(a + ch) * g + load8<acc_t>(dxc + ch) * (xv - vc) +
                                 load8<acc_t>(dxo + ch));
    }
  }
  for (; ch < C; ++ch) {
    const acc_t xv = to_acc<acc_t>(px[ch]);
    const acc_t pre = pre_act<acc_t>(xv, ctr[ch], a[ch], b[ch]);
    if constexpr (!BWD) {
      po[ch] = static_cast<scalar_t>(act_forward<acc_t>(A, pre, slope));
    } else {
      const acc_t g = act_backward<acc_t>(A, pre, slope, to_acc<acc_t>(pd[ch]));
      po[ch] = static_cast<scalar_t>(a[ch] * g + dxc[ch] * (xv - ctr[ch]) + dxo[ch]);
    }
  }
}

// ---------------------------------------------------------------- pass phases (a share of a team)
// Items of the reductions: NCS rows; NSC (sample, channel block) tasks, or samples when grouped.
inline int64_t reduce_items(const View3& v) {
  if (v.layout == Layout::NCS) return v.N * v.C;
  if (nsc_group(v.C, v.S) > 1) return v.N;
  return v.N * ((v.C + kCBlock - 1) / kCBlock);
}

// The first (n, c) entry of item t: items cover the (N, C) entries in order, each a contiguous
// run (an NCS row, a sample, or a channel block of a sample), and item reduce_items(v) starts at
// the end, N*C.
inline int64_t item_entry(const View3& v, int64_t t) {
  if (v.layout == Layout::NCS) return t;
  if (nsc_group(v.C, v.S) > 1) return t * v.C;
  const int64_t nblk = (v.C + kCBlock - 1) / kCBlock;
  return (t / nblk) * v.C + std::min(v.C, (t % nblk) * kCBlock);
}

// a and c of the entries of items [b, e) set to 0.
template <typename acc_t>
void zero_items(const View3& v, int64_t b, int64_t e, acc_t* a, acc_t* c) {
  for (int64_t i = item_entry(v, b), i1 = item_entry(v, e); i < i1; ++i) a[i] = c[i] = acc_t(0);
}

// Statistics of items [b, e) into m, m2 (N, C).
template <typename scalar_t>
void stats_items(const View3& v, const scalar_t* x, int64_t b, int64_t e,
                 at::opmath_type<scalar_t>* m, at::opmath_type<scalar_t>* m2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = v.C, S = v.S;
  if (S == 0) {  // sums over empty rows
    zero_items<acc_t>(v, b, e, m, m2);
    return;
  }
  if (v.layout == Layout::NCS) {
    const double invS = 1.0 / static_cast<double>(S);
    for (int64_t r = b; r < e; ++r) row_stats<scalar_t>(x + r * S, S, invS, m[r], m2[r]);
    return;
  }
  const int64_t g = nsc_group(C, S);
  acc_t run_mean[kCBlock], run_m2[kCBlock];
  if (g > 1) {
    const int64_t W = C * g, Sg = S / g;
    for (int64_t n = b; n < e; ++n) {
      stats_block<scalar_t>(x + n * S * C, W, W, Sg, run_mean, run_m2);
      for (int64_t c = 0; c < C; ++c) {
        // the g partials of channel c in order, with the finalize's Chan combination
        ChanRow row{static_cast<double>(Sg), run_mean[c], run_m2[c]};
        for (int64_t k = 1; k < g; ++k)
          chan_merge(row, ChanRow{static_cast<double>(Sg), run_mean[k * C + c], run_m2[k * C + c]});
        m[n * C + c] = static_cast<acc_t>(row.mean);
        m2[n * C + c] = static_cast<acc_t>(row.m2);
      }
    }
    return;
  }
  const int64_t nblk = (C + kCBlock - 1) / kCBlock;
  for (int64_t t = b; t < e; ++t) {
    const int64_t n = t / nblk, c0 = (t % nblk) * kCBlock, W = std::min(kCBlock, C - c0);
    stats_block<scalar_t>(x + n * S * C + c0, C, W, S, run_mean, run_m2);
    for (int64_t c = 0; c < W; ++c) {
      m[n * C + c0 + c] = run_mean[c];
      m2[n * C + c0 + c] = run_m2[c];
    }
  }
}

// Gradient sums of items [b, e) into q, p (N, C); g into pg when given (NCS, scalar_t == acc).
template <typename scalar_t, Act A>
void sums_items(const View3& v, const scalar_t* x, const scalar_t* dy,
                const RowCoefs<at::opmath_type<scalar_t>>& rc, int64_t b, int64_t e,
                at::opmath_type<scalar_t>* q, at::opmath_type<scalar_t>* p, scalar_t* pg) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = v.C, S = v.S;
  if (S == 0) {
    zero_items<acc_t>(v, b, e, q, p);
    return;
  }
  if (v.layout == Layout::NCS) {
    for (int64_t r = b; r < e; ++r) {
      if (pg != nullptr) {
        if constexpr (std::is_same_v<scalar_t, acc_t>)
          row_grad_sums<scalar_t, A, true>(x + r * S, dy + r * S, S, rc.center[r], rc.x_coef[r],
                                           rc.offset[r], rc.slope, pg + r * S, q[r], p[r]);
      } else {
        row_grad_sums<scalar_t, A, false>(x + r * S, dy + r * S, S, rc.center[r], rc.x_coef[r],
                                          rc.offset[r], rc.slope, nullptr, q[r], p[r]);
      }
    }
    return;
  }
  const int64_t g = nsc_group(C, S);
  acc_t tot_p[kCBlock], tot_q[kCBlock];
  if (g > 1) {
    const int64_t W = C * g, Sg = S / g;
    acc_t ctr[kCBlock], ca[kCBlock], cb[kCBlock];
    for (int64_t n = b; n < e; ++n) {
      for (int64_t k = 0; k < g; ++k)
        for (int64_t c = 0; c < C; ++c) {
          ctr[k * C + c] = rc.center[n * C + c];
          ca[k * C + c] = rc.x_coef[n * C + c];
          cb[k * C + c] = rc.offset[n * C + c];
        }
      sums_block<scalar_t, A>(x + n * S * C, dy + n * S * C, W, W, Sg, ctr, ca, cb, rc.slope,
                              tot_p, tot_q);
      for (int64_t c = 0; c < C; ++c) {
        acc_t sp = tot_p[c], sq = tot_q[c];
        for (int64_t k = 1; k < g; ++k) {
          sp += tot_p[k * C + c];
          sq += tot_q[k * C + c];
        }
        p[n * C + c] = sp;
        q[n * C + c] = sq;
      }
    }
    return;
  }
  const int64_t nblk = (C + kCBlock - 1) / kCBlock;
  for (int64_t t = b; t < e; ++t) {
    const int64_t n = t / nblk, c0 = (t % nblk) * kCBlock, W = std::min(kCBlock, C - c0);
    const int64_t off = n * S * C + c0, r0 = n * C + c0;
    sums_block<scalar_t, A>(x + off, dy + off, C, W, S, rc.center + r0, rc.x_coef + r0,
                            rc.offset + r0, rc.slope, tot_p, tot_q);
    for (int64_t c = 0; c < W; ++c) {
      p[r0 + c] = tot_p[c];
      q[r0 + c] = tot_q[c];
    }
  }
}

// ---------------------------------------------------------------- finalize phases (float64)
// Samples [n0, n1): the norm (sum over c in 8 lanes of c mod 8, a fixed tree, then the tail) and
// the scale r (inv_r always; r, nrm when r_out is given).
template <typename acc_t>
void sample_scales(int64_t n0, int64_t n1, int64_t C, int64_t S, const acc_t* m, const acc_t* m2,
                   double l2_eps, double sqrt_d, double* inv_r, acc_t* r_out, acc_t* nrm_out) {
  const double Sd = static_cast<double>(S);
  for (int64_t n = n0; n < n1; ++n) {
    const acc_t* mp = m + n * C;
    const acc_t* qp = m2 + n * C;
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t c = 0;
    for (; c + 8 <= C; c += 8)
      for (int j = 0; j < 8; ++j) l[j] += row_sq_norm(mp[c + j], qp[c + j], Sd);
    double nrm2 = tree8(l);
    for (; c < C; ++c) nrm2 += row_sq_norm(mp[c], qp[c], Sd);
    const SampleScale sc = sample_scale(nrm2, l2_eps, sqrt_d);
    inv_r[n] = sc.inv_r;
    if (r_out != nullptr) {
      r_out[n] = static_cast<acc_t>(sc.r);
      nrm_out[n] = static_cast<acc_t>(sc.nrm);
    }
  }
}

// This process's channel rows of channels [c0, c1) (count N*S, mean, M2 of u), two passes over n
// in order.
template <typename acc_t>
void local_rows(int64_t c0, int64_t c1, int64_t N, int64_t C, int64_t S, const acc_t* m,
                const acc_t* m2, const double* inv_r, ChanRow* rows) {
  const double Sd = static_cast<double>(S), Nd = static_cast<double>(N);
  double su[kFinC], sm[kFinC], mean[kFinC];
  for (int64_t cb = c0; cb < c1; cb += kFinC) {
    const int64_t W = std::min(kFinC, c1 - cb);
    for (int64_t j = 0; j < W; ++j) su[j] = sm[j] = 0.0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < W; ++j) su[j] += u_row_mean(m[n * C + cb + j], inv_r[n]);
    for (int64_t j = 0; j < W; ++j) mean[j] = u_channel_mean(su[j], Nd);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < W; ++j) {
        const int64_t i = n * C + cb + j;
        sm[j] += u_row_m2(m2[i], inv_r[n], Sd, u_row_mean(m[i], inv_r[n]), mean[j]);
      }
    for (int64_t j = 0; j < W; ++j) rows[cb + j] = ChanRow{Nd * Sd, mean[j], sm[j]};
  }
}

// Channel statistics and coefficients of channels [c0, c1) (local rows: from `local`); writes
// batch_mean / batch_var / saved's inv_s.
template <typename acc_t>
void channel_coefs(int64_t c0, int64_t c1, int64_t C, const StatsSource& src, const ChanRow* local,
                   double eps, const ChannelVec& weight, const ChannelVec& bias, ChannelCoef* cc,
                   acc_t* bmean, acc_t* bvar, acc_t* inv_s) {
  for (int64_t c = c0; c < c1; ++c) {
    double mean, var;
    if (src.mean.p != nullptr) {
      mean = load_channel(src.mean, c, 0.0);
      var = load_channel(src.var, c, 1.0);
    } else {
      const ChanRow row = src.rows_all != nullptr ? group_row(src.rows_all, src.P, C, c) : local[c];
      mean = row.mean;
      var = row_variance(row);
    }
    cc[c] = channel_coef(mean, var, eps, load_channel(weight, c, 1.0), load_channel(bias, c, 0.0));
    bmean[c] = static_cast<acc_t>(mean);
    bvar[c] = static_cast<acc_t>(var);
    inv_s[c] = static_cast<acc_t>(cc[c].inv_s);
  }
}

// Forward coefficients of row i = (n, c) into saved (and m, m2 when they are not saved's planes);
// returns the acc values the apply uses (those saved).
template <typename acc_t>
NK_INLINE void row_coef(const FwdJob<acc_t>& J, int64_t i, int64_t n, int64_t c, acc_t& ctr,
                        acc_t& a, acc_t& b) {
  const SavedLayout L{J.v->N, J.v->C};
  const RowCoef rc = forward_row_coef(J.m[i], J.inv_r[n], J.cc[c]);
  acc_t* sp = J.saved;
  ctr = J.m[i];
  a = static_cast<acc_t>(rc.x_coef);
  b = static_cast<acc_t>(rc.offset);
  sp[L.x_coef() + i] = a;
  sp[L.offset() + i] = b;
  sp[L.cen() + i] = static_cast<acc_t>(rc.cen);
  if (J.m != sp + L.center()) {
    sp[L.center() + i] = J.m[i];
    sp[L.m2() + i] = J.m2[i];
  }
}

// Backward, channels [c0, c1): grad rows [sum_n Q, sum_n G] of this process into rows.
template <typename acc_t>
void grad_channel_sums(int64_t c0, int64_t c1, int64_t N, int64_t C, const acc_t* q,
                       const acc_t* p, const acc_t* cen, const double* inv_r, double* rows) {
  double sq[kFinC], sg[kFinC];
  for (int64_t cb = c0; cb < c1; cb += kFinC) {
    const int64_t W = std::min(kFinC, c1 - cb);
    for (int64_t j = 0; j < W; ++j) sq[j] = sg[j] = 0.0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < W; ++j) {
        const int64_t i = n * C + cb + j;
        sq[j] += q[i];
        sg[j] += grad_row_g(p[i], q[i], inv_r[n], cen[i]);
      }
    for (int64_t j = 0; j < W; ++j) {
      rows[cb + j] = sq[j];
      rows[C + cb + j] = sg[j];
    }
  }
}

// Backward, channels [c0, c1): dweight / dbias (this process's rows) and the du coefficients
// (the group's rows_tot in training; nullptr: eval).
template <typename acc_t>
void grad_channel_coefs(int64_t c0, int64_t c1, int64_t C, double m_count, const double* rows,
                        const double* rows_tot, const acc_t* inv_s, const ChannelVec& weight,
                        acc_t* dweight, acc_t* dbias, GradChannel* gc) {
  const bool training = rows_tot != nullptr;
  for (int64_t c = c0; c < c1; ++c) {
    const double is = static_cast<double>(inv_s[c]);
    dbias[c] = static_cast<acc_t>(rows[c]);
    dweight[c] = static_cast<acc_t>(rows[C + c] * is);
    gc[c] = grad_channel(load_channel(weight, c, 1.0), is, training, training ? rows_tot[c] : 0.0,
                         training ? rows_tot[C + c] : 0.0, m_count);
  }
}

// Backward, samples [n0, n1): t_n (dot in 8 lanes of c mod 8, a fixed tree, then the tail), then
// per (n, c) the dx coefficients (out may alias q / p: each sample's sums are read in full
// before its coefficients are written).
template <typename acc_t>
void grad_row_coefs(int64_t n0, int64_t n1, int64_t C, int64_t S, const acc_t* q, const acc_t* p,
                    const acc_t* saved, const double* inv_r, const GradChannel* gc, acc_t* dx_coef,
                    acc_t* dx_offset, int64_t N) {
  const SavedLayout L{N, C};
  const acc_t* m = saved + L.center();
  const acc_t* m2 = saved + L.m2();
  const acc_t* cen = saved + L.cen();
  const acc_t* nrm = saved + L.nrm();
  const double Sd = static_cast<double>(S);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t o = n * C;
    const double ir = inv_r[n];
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t c = 0;
    for (; c + 8 <= C; c += 8)
      for (int j = 0; j < 8; ++j) {
        const int64_t i = o + c + j;
        l[j] += grad_dot_term(gc[c + j], p[i], q[i], m[i], m2[i], ir, cen[i], Sd);
      }
    double dot = tree8(l);
    for (; c < C; ++c) {
      const int64_t i = o + c;
      dot += grad_dot_term(gc[c], p[i], q[i], m[i], m2[i], ir, cen[i], Sd);
    }
    const double t = grad_sample_t(dot, static_cast<double>(nrm[n]));
    for (c = 0; c < C; ++c) {
      const int64_t i = o + c;
      const GradRowCoef rc = backward_row_coef(gc[c], t, m[i], ir, cen[i]);
      dx_coef[i] = static_cast<acc_t>(rc.dx_coef);
      dx_offset[i] = static_cast<acc_t>(rc.dx_offset);
    }
  }
}

// ---------------------------------------------------------------- op drivers
// Forward family (l2bn_forward / l2bn_stats / l2bn_finish / l2bn_sample_stats): the phases of J
// (see FwdJob) on one team.
template <typename scalar_t>
void forward_job(const FwdJob<at::opmath_type<scalar_t>>& J) {
  using acc_t = at::opmath_type<scalar_t>;
  const View3& v = *J.v;
  const int64_t N = v.N, C = v.C, S = v.S;
  const scalar_t* x = v.x.template const_data_ptr<scalar_t>();
  scalar_t* y = static_cast<scalar_t*>(J.y);
  const bool nsc = v.layout == Layout::NSC, apply = J.apply;
  const int64_t groups = (C + 7) / 8;  // channel phases: groups of 8 channels
  enum { kStats, kScales, kChannels, kRowCoefs, kApply };
  int ph[5], nph = 0;
  if (J.run_stats) ph[nph++] = kStats;
  if (J.inv_r != nullptr) ph[nph++] = kScales;
  if (J.rows_out != nullptr || J.cc != nullptr) ph[nph++] = kChannels;
  if (apply && nsc) ph[nph++] = kRowCoefs;
  if (apply) ph[nph++] = kApply;
  const acc_t slope = J.slope;
  team_run(J.team, nph, [&](int k, int tid, int nt) {
    int64_t b, e;
    switch (ph[k]) {
      case kStats:
        part(reduce_items(v), tid, nt, b, e);
        stats_items<scalar_t>(v, x, b, e, J.m, J.m2);
        break;
      case kScales:
        part(N, tid, nt, b, e);
        sample_scales<acc_t>(b, e, C, S, J.m, J.m2, J.l2_eps, J.sqrt_d, J.inv_r, J.r_out, J.nrm_out);
        break;
      case kChannels: {
        part(groups, tid, nt, b, e);
        const int64_t c0 = std::min(C, b * 8), c1 = std::min(C, e * 8);
        if (J.local != nullptr) local_rows<acc_t>(c0, c1, N, C, S, J.m, J.m2, J.inv_r, J.local);
        if (J.rows_out != nullptr) {
          for (int64_t c = c0; c < c1; ++c) {
            J.rows_out[c] = J.local[c].n;
            J.rows_out[C + c] = J.local[c].mean;
            J.rows_out[2 * C + c] = J.local[c].m2;
          }
        }
        if (J.cc != nullptr)
          channel_coefs<acc_t>(c0, c1, C, J.src, J.local, J.eps, J.w, J.b, J.cc, J.bmean, J.bvar,
                               J.inv_s);
        break;
      }
      case kRowCoefs:
        part(N, tid, nt, b, e);
        for (int64_t n = b; n < e; ++n)
          for (int64_t c = 0; c < C; ++c) {
            acc_t ctr, a, bb;
            row_coef<acc_t>(J, n * C + c, n, c, ctr, a, bb);
          }
        break;
      case kApply:
        if (!nsc) {
          part(N * C, tid, nt, b, e);
          dispatch_act(J.act, [&](auto tag) {
            constexpr Act A = decltype(tag)::value;
            for (int64_t r = b; r < e; ++r) {
              acc_t ctr, a, bb;
              row_coef<acc_t>(J, r, r / C, r % C, ctr, a, bb);
              row_apply_fwd<scalar_t, A>(x + r * S, S, ctr, a, bb, slope, y + r * S);
            }
          });
        } else {
          const SavedLayout L{N, C};
          const acc_t* sp = J.saved;
          part(N * S, tid, nt, b, e);
          dispatch_act(J.act, [&](auto tag) {
            constexpr Act A = decltype(tag)::value;
            for (int64_t r = b; r < e; ++r) {
              const int64_t o = (r / S) * C;
              nsc_row_apply<scalar_t, A, false>(x + r * C, nullptr, C, sp + L.center() + o,
                                                sp + L.x_coef() + o, sp + L.offset() + o, nullptr,
                                                nullptr, slope, y + r * C);
            }
          });
        }
        break;
    }
  });
}

// Backward family (l2bn_backward / l2bn_grad_stats / l2bn_grad_finish): the phases of J.
template <typename scalar_t>
void backward_job(const BwdJob<at::opmath_type<scalar_t>>& J) {
  using acc_t = at::opmath_type<scalar_t>;
  const View3& v = *J.v;
  const int64_t N = v.N, C = v.C, S = v.S;
  const scalar_t* x = v.x.template const_data_ptr<scalar_t>();
  const scalar_t* dy = J.dy->template const_data_ptr<scalar_t>();
  scalar_t* dx = static_cast<scalar_t*>(J.dx);
  const bool nsc = v.layout == Layout::NSC, finish = J.finish;
  const SavedLayout L{N, C};
  const acc_t* sp = J.saved;
  const RowCoefs<acc_t> rc{sp + L.center(), sp + L.x_coef(), sp + L.offset(), J.slope};
  const int64_t groups = (C + 7) / 8;
  const bool g_stored = J.store_g && finish && !nsc && std::is_same_v<scalar_t, acc_t>;
  enum { kSums, kChannels, kRowCoefs, kApply };
  int ph[4], nph = 0;
  if (J.run_sums) ph[nph++] = kSums;
  ph[nph++] = kChannels;
  if (finish) {
    ph[nph++] = kRowCoefs;
    ph[nph++] = kApply;
  }
  team_run(J.team, nph, [&](int k, int tid, int nt) {
    int64_t b, e;
    switch (ph[k]) {
      case kSums:
        part(reduce_items(v), tid, nt, b, e);
        dispatch_act(J.act, [&](auto tag) {
          constexpr Act A = decltype(tag)::value;
          sums_items<scalar_t, A>(v, x, dy, rc, b, e, J.q, J.p, g_stored ? dx : nullptr);
        });
        break;
      case kChannels: {
        part(groups, tid, nt, b, e);
        const int64_t c0 = std::min(C, b * 8), c1 = std::min(C, e * 8);
        if (J.run_sums)
          grad_channel_sums<acc_t>(c0, c1, N, C, J.q, J.p, sp + L.cen(), J.inv_r, J.rows);
        if (finish)
          grad_channel_coefs<acc_t>(c0, c1, C, J.m_count, J.rows, J.rows_tot, sp + L.inv_s(), J.w,
                                    J.dweight, J.dbias, J.gc);
        break;
      }
      case kRowCoefs:
        part(N, tid, nt, b, e);
        grad_row_coefs<acc_t>(b, e, C, S, J.q, J.p, sp, J.inv_r, J.gc, J.dxc, J.dxo, N);
        break;
      case kApply:
        if (!nsc) {
          part(N * C, tid, nt, b, e);
          if (g_stored) {
            for (int64_t r = b; r < e; ++r)
              row_apply_bwd<scalar_t, Act::Identity, true>(
                  x + r * S, dx + r * S, S, rc.center[r], rc.x_coef[r], rc.offset[r], J.dxc[r],
                  J.dxo[r], J.slope, dx + r * S);
          } else {
            dispatch_act(J.act, [&](auto tag) {
              constexpr Act A = decltype(tag)::value;
              for (int64_t r = b; r < e; ++r)
                row_apply_bwd<scalar_t, A, false>(x + r * S, dy + r * S, S, rc.center[r],
                                                  rc.x_coef[r], rc.offset[r], J.dxc[r], J.dxo[r],
                                                  J.slope, dx + r * S);
            });
          }
        } else {
          part(N * S, tid, nt, b, e);
          dispatch_act(J.act, [&](auto tag) {
            constexpr Act A = decltype(tag)::value;
            for (int64_t r = b; r < e; ++r) {
              const int64_t o = (r / S) * C;
              nsc_row_apply<scalar_t, A, true>(x + r * C, dy + r * C, C, rc.center + o,
                                               rc.x_coef + o, rc.offset + o, J.dxc + o, J.dxo + o,
                                               J.slope, dx + r * C);
            }
          });
        }
        break;
    }
  });
}
