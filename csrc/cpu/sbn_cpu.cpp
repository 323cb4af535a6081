// SBN / BN+SBN on CPU: every op of csrc/sbn.cpp (schemas and contracts there) as one C++ call:
// its heavy passes over the tensor plus the finalize of csrc/sbn_finalize.h, with no aten compute
// op inside (allocations with at::empty, everything else in the loops below).
//
// The pass kernels (layouts, lanes, accumulation, determinism) are in sbn_cpu_kernels.h; this file
// has the ops: argument checks, the coefficient tables of the passes, the finalize calls.
// Layouts other than contiguous / channels_last are made contiguous; dy is brought to x's layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>


#if defined(__GNUC__)
// the kernels' 8-lane vector types cross internal (inlined) function boundaries only
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "../activation.h"
#include "../common.h"
#include "../sbn_finalize.h"
#include "isa.h"
#if NK_HAVE_AVX2_BUILD
#include <immintrin.h>  // the AVX2 build's register transposes
#endif

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

// How the NCHW passes walk a map, which decides the layout of the tables below. "Lanes": blocks of
// 8 channels of one sample transposed into an L1 buffer (lane = channel), so that row sums are
// vertical vector adds and every per-channel coefficient is one vector, whatever W: the training
// backward apply on maps up to kLaneBwd values (the statistics pass does so up to kTMax, in the
// kernels; larger maps have rows long enough for the row kernels, and the transposes' extra
// buffer traffic costs more than they save: measured at 28x28). Otherwise "planes": contiguous
// 8-vectors along each plane. NHWC: "pixels".
// Exceptions (planes, bwd_nchw_w8 / bwd_nchw_small): maps of width 8, and maps of at most 8 rows
// of 2-7 values (16 values at least): their rows fit one transpose of x (for the row sums), so dy
// and dx need none: measured at 8x8 and 7x7.
constexpr int64_t kLaneBwd = 256;
inline bool small_bwd(int64_t H, int64_t W) {
  return W >= 2 && W < 8 && H <= 8 && H * W >= 16;
}
inline bool lanes_bwd(Layout lay, int64_t H, int64_t W, bool need_row) {
  return lay == Layout::NCS && need_row && H * W <= kLaneBwd && W != 8 && !small_bwd(H, W);
}
enum class Tab { Planes, Lanes, Pixels };
inline Tab tab_of(Layout lay, bool lanes) {
  return lay == Layout::NSC ? Tab::Pixels : (lanes ? Tab::Lanes : Tab::Planes);
}
inline int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

// Forward-apply coefficients in acc (saved[:, :5] of either layer, `stride` doubles per channel):
// pre = cx (x - K) + add, add = b off row 0 and T0[c, w] = b (1 - Pr[w]) + u Pr[w] + v Pi[w] on
// row 0 (Pr = delta_w0, Pi[0] = 0). K, cx, b have C rounded up to 8 entries (0 past C: a block of
// lanes loads whole vectors). T0 of Planes is [c*ts + q] for the first ts = W rounded up to 8
// values of each plane (q >= W: row 1 already, add = b), so the kernels read whole 8-vectors of
// offsets from the plane's start; of Lanes [w*cs + c] (cs = C rounded up to 8, 0 past C); of
// Pixels [w*cs + c] (cs = C).
template <typename acc_t>
struct FwdTab {
  std::vector<acc_t> K, cx, b, T0;
  int64_t ts, cs;
};

template <typename acc_t>
FwdTab<acc_t> fwd_tab(const double* coef, int64_t stride, int64_t C, int64_t W,
                      const RowConsts& rc, Tab kind) {
  const int64_t Cp = pad8(C);
  const int64_t ts = kind == Tab::Planes ? pad8(W) : W;
  const int64_t cs = kind == Tab::Lanes ? Cp : C;
  FwdTab<acc_t> t{std::vector<acc_t>(Cp), std::vector<acc_t>(Cp), std::vector<acc_t>(Cp),
                  std::vector<acc_t>(kind == Tab::Planes ? C * ts : W * cs), ts, cs};
  for (int64_t c = 0; c < C; ++c) {
    const double* r = coef + c * stride;
    t.K[c] = static_cast<acc_t>(r[SavedCol::K]);
    t.cx[c] = static_cast<acc_t>(r[SavedCol::cx]);
    t.b[c] = static_cast<acc_t>(r[SavedCol::b]);
    for (int64_t q = 0; q < ts; ++q) {
      const double t0 = q >= W ? r[SavedCol::b]
                               : (q == 0 ? r[SavedCol::u] : r[SavedCol::b]) + r[SavedCol::v] * rc.pi[q];
      t.T0[kind == Tab::Planes ? c * ts + q : q * cs + c] = static_cast<acc_t>(t0);
    }
  }
  return t;
}

// Backward-apply coefficients: dx = c_dy g + c_t t + cst + c_R R + c_A A (-1)^w + [h == 0] T1[c, w],
// T1 = u Re D(w) + v Im D(w) (layout as T0; Planes entries q >= W are 0; channel arrays as K).
template <typename acc_t>
struct BwdTab {
  std::vector<acc_t> cdy, ct, cR, cA, cst, T1;
};

template <typename acc_t>
BwdTab<acc_t> bwd_tab(const std::vector<BackCoef>& bc, int64_t C, int64_t W, const RowConsts& rc,
                      Tab kind) {
  const int64_t Cp = pad8(C);
  const int64_t ts = kind == Tab::Planes ? pad8(W) : W;
  const int64_t cs = kind == Tab::Lanes ? Cp : C;
  BwdTab<acc_t> t{std::vector<acc_t>(Cp), std::vector<acc_t>(Cp), std::vector<acc_t>(Cp),
                  std::vector<acc_t>(Cp), std::vector<acc_t>(Cp),
                  std::vector<acc_t>(kind == Tab::Planes ? C * ts : W * cs)};
  for (int64_t c = 0; c < C; ++c) {
    const BackCoef& k = bc[c];
    t.cdy[c] = static_cast<acc_t>(k.c_dy);
    t.ct[c] = static_cast<acc_t>(k.c_t);
    t.cR[c] = static_cast<acc_t>(k.c_R);
    t.cA[c] = static_cast<acc_t>(k.c_A);
    t.cst[c] = static_cast<acc_t>(k.cst);
    for (int64_t q = 0; q < ts; ++q)
      t.T1[kind == Tab::Planes ? c * ts + q : q * cs + c] =
          q >= W ? acc_t(0) : static_cast<acc_t>(k.u * rc.re_d[q] + k.v * rc.im_d[q]);
  }
  return t;
}

// ============================================================================== pass kernels
#if defined(__GNUC__)
#define NK_INLINE inline __attribute__((always_inline))
#else
#define NK_INLINE inline
#endif

// The same kernel source compiled for the baseline ISA and AVX2 (8-wide float vectors and
// register transposes), chosen at run time by NK_CALL (isa.h).
#define NK_ISA_KERNELS "sbn_cpu_kernels.h"
#include "isa_builds.h"

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
  std::unique_ptr<double[]> part(new double[N * C * 6]);  // the blocks used are written in full
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const int64_t kstride = v.layout == Layout::NCS ? v.H * v.W : 1;  // x[0, c, 0, 0]
    std::vector<acc_t> K(C);
    for (int64_t c = 0; c < C; ++c) K[c] = static_cast<acc_t>(xp[c * kstride]);
    const std::vector<acc_t> re = cast_vec<acc_t>(rc.re_d), im = cast_vec<acc_t>(rc.im_d);
    const int64_t nblk = NK_CALL(stats, xp, K.data(), re.data(), im.data(), part.get(), N, C, v.H,
                                 v.W, v.layout);
    for (int64_t c = 0; c < C; ++c) {
      double* o = rows + c * RowCol::Width;
      o[RowCol::N] = double(N);
      o[RowCol::K] = static_cast<double>(K[c]);
      for (int k = 0; k < 6; ++k) o[RowCol::S1 + k] = 0.0;
    }
    for (int64_t blk = 0; blk < nblk; ++blk)  // fixed order: deterministic
      for (int64_t c = 0; c < C; ++c) {
        const double* p = part.get() + (blk * C + c) * 6;
        double* o = rows + c * RowCol::Width + RowCol::S1;
        for (int k = 0; k < 6; ++k) o[k] += p[k];
      }
  });
}

// ============================================================================== pass drivers

// y for the saved coefficients (saved[:, :5], `stride` doubles per channel).
Tensor apply_forward(const X4& v, const double* coef, int64_t stride, const RowConsts& rc,
                     Act act, double slope) {
  Tensor y = new_like(v);
  if (v.x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdTab<acc_t> ft = fwd_tab<acc_t>(coef, stride, v.C, v.W, rc, tab_of(v.layout, false));
    with_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      NK_CALL(fwd_apply<A>, v.x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ft,
              static_cast<acc_t>(slope), v.N, v.C, v.H, v.W, v.layout);
    });
  });
  return y;
}

// The gradient-sums pass: gsums (C, 4) into `out` (double), for the coefficients saved[:, :5].
void grad_sums(const X4& v, const Tensor& dy, const double* coef, int64_t stride,
               const RowConsts& rc, Act act, double slope, double* out) {
  const int64_t N = v.N, C = v.C;
  for (int64_t i = 0; i < C * GradCol::Width; ++i) out[i] = 0.0;
  if (v.x.numel() == 0) return;
  std::unique_ptr<double[]> part(new double[N * C * 4]);  // the blocks used are written in full
  int64_t nblk = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdTab<acc_t> ft = fwd_tab<acc_t>(coef, stride, C, v.W, rc, tab_of(v.layout, false));
    const std::vector<acc_t> pi = cast_vec<acc_t>(rc.pi);
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    with_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      nblk = NK_CALL(grad<A>, dp, xp, ft, pi.data(), static_cast<acc_t>(slope), part.get(), N, C,
                     v.H, v.W, v.layout);
    });
  });
  for (int64_t blk = 0; blk < nblk; ++blk)  // fixed order: deterministic
    for (int64_t c = 0; c < C; ++c)
      for (int k = 0; k < 4; ++k) out[c * 4 + k] += part[(blk * C + c) * 4 + k];
}

Tensor apply_backward(const X4& v, const Tensor& dy, const double* coef, int64_t stride,
                      const std::vector<BackCoef>& bc, const RowConsts& rc, Act act, double slope,
                      bool need_row) {
  Tensor dx = new_like(v);
  if (v.x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tab kind = tab_of(v.layout, lanes_bwd(v.layout, v.H, v.W, need_row));
    const FwdTab<acc_t> ft = fwd_tab<acc_t>(coef, stride, v.C, v.W, rc, kind);
    const BwdTab<acc_t> bt = bwd_tab<acc_t>(bc, v.C, v.W, rc, kind);
    with_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      NK_CALL(bwd_apply<A>, dy.const_data_ptr<scalar_t>(), v.x.const_data_ptr<scalar_t>(),
              dx.data_ptr<scalar_t>(), ft, bt, static_cast<acc_t>(slope), v.N, v.C, v.H, v.W,
              v.layout, need_row);
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
  // eval: no statistics pass; shift K = BN's mean rounded to acc (so that x - K is the passes'
  // exact t): z = p (x - K) + Kz then has no cancellation for data with a large mean
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
  const bool f64 = acc_type(v.x.scalar_type()) == at::kDouble;
  for (int64_t c = 0; c < C; ++c) {
    const double K = f64 ? bm[c] : static_cast<double>(static_cast<float>(bm[c]));
    const BnPart bp = bn_from_stats(bm[c], bv[c], K, prm.bn_g[c], prm.bn_b[c], bn_eps);
    const Spectral st{sm[2 * c] / f, sm[2 * c + 1] / f, svr[c] / (f * f)};
    bnsbn_channel(bp, K, double(v.N), zero, zero, st, prm.sbn_g[c], prm.sbn_b[c], sbn_eps, f,
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
