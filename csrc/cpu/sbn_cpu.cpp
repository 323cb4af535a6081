// The SBN family on CPU (BN+SBN; SBN = the BN stage off): every op of csrc/sbn.cpp (schemas and
// contracts there) as one C++ call: its heavy passes over the tensor plus the finalize of
// csrc/sbn_finalize.h, with no aten compute op inside (allocations with at::empty, everything else
// in the loops below).
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

// Forward-apply coefficients in acc (saved[:, :5]; the tables' fields keep the kernels' short names
// K = shift, cx = x_scale, b = offset): pre = x_scale (x - shift) + add, add = offset off row 0 and
// T0[c, w] = offset (1 - Pr[w]) + pr_coef Pr[w] + pi_coef Pi[w] on row 0 (Pr = delta_w0,
// Pi[0] = 0). K, cx, b have C rounded up to 8 entries (0 past C: a block of lanes loads whole
// vectors). T0 of Planes is [c*ts + q] for the first ts = W rounded up to 8
// values of each plane (q >= W: row 1 already, add = b), so the kernels read whole 8-vectors of
// offsets from the plane's start; of Lanes [w*cs + c] (cs = C rounded up to 8, 0 past C); of
// Pixels [w*cs + c] (cs = C).
template <typename acc_t>
struct FwdTab {
  std::vector<acc_t> K, cx, b, T0;
  int64_t ts, cs;
};

template <typename acc_t>
FwdTab<acc_t> fwd_tab(const double* saved, int64_t C, int64_t W, const RowConsts& rc, Tab kind) {
  const int64_t Cp = pad8(C);
  const int64_t ts = kind == Tab::Planes ? pad8(W) : W;
  const int64_t cs = kind == Tab::Lanes ? Cp : C;
  FwdTab<acc_t> t{std::vector<acc_t>(Cp), std::vector<acc_t>(Cp), std::vector<acc_t>(Cp),
                  std::vector<acc_t>(kind == Tab::Planes ? C * ts : W * cs), ts, cs};
  for (int64_t c = 0; c < C; ++c) {
    const double* r = saved + c * SavedCol::Width;
    const double offset = r[SavedCol::offset];
    t.K[c] = static_cast<acc_t>(r[SavedCol::shift]);
    t.cx[c] = static_cast<acc_t>(r[SavedCol::x_scale]);
    t.b[c] = static_cast<acc_t>(offset);
    for (int64_t q = 0; q < ts; ++q) {
      const double t0 = q >= W ? offset
                               : (q == 0 ? r[SavedCol::pr_coef] : offset) +
                                     r[SavedCol::pi_coef] * rc.pi[q];
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
      o[RowCol::count] = double(N);
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
      o[RowCol::count] = double(N);
      o[RowCol::shift] = static_cast<double>(K[c]);
      for (int k = 0; k < 6; ++k) o[RowCol::sum_t + k] = 0.0;
    }
    for (int64_t blk = 0; blk < nblk; ++blk)  // fixed order: deterministic
      for (int64_t c = 0; c < C; ++c) {
        const double* p = part.get() + (blk * C + c) * 6;
        double* o = rows + c * RowCol::Width + RowCol::sum_t;
        for (int k = 0; k < 6; ++k) o[k] += p[k];
      }
  });
}

// ============================================================================== pass drivers

// y for the saved coefficients (saved[:, :5]).
Tensor apply_forward(const X4& v, const double* saved, const RowConsts& rc, Act act, double slope) {
  Tensor y = new_like(v);
  if (v.x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdTab<acc_t> ft = fwd_tab<acc_t>(saved, v.C, v.W, rc, tab_of(v.layout, false));
    with_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      NK_CALL(fwd_apply<A>, v.x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), ft,
              static_cast<acc_t>(slope), v.N, v.C, v.H, v.W, v.layout);
    });
  });
  return y;
}

// The gradient-sums pass: gsums (C, 4) into `out` (double), for the coefficients saved[:, :5].
void grad_sums(const X4& v, const Tensor& dy, const double* saved, const RowConsts& rc, Act act,
               double slope, double* out) {
  const int64_t N = v.N, C = v.C;
  for (int64_t i = 0; i < C * GradCol::Width; ++i) out[i] = 0.0;
  if (v.x.numel() == 0) return;
  std::unique_ptr<double[]> part(new double[N * C * 4]);  // the blocks used are written in full
  int64_t nblk = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdTab<acc_t> ft = fwd_tab<acc_t>(saved, C, v.W, rc, tab_of(v.layout, false));
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

Tensor apply_backward(const X4& v, const Tensor& dy, const double* saved,
                      const std::vector<BackCoef>& bc, const RowConsts& rc, Act act, double slope,
                      bool need_row) {
  Tensor dx = new_like(v);
  if (v.x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "sbn_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tab kind = tab_of(v.layout, lanes_bwd(v.layout, v.H, v.W, need_row));
    const FwdTab<acc_t> ft = fwd_tab<acc_t>(saved, v.C, v.W, rc, kind);
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

// ============================================================================== ops
// One implementation per op for the family: `bn` switches the BN stage on or off (off: z = x,
// bn_identity; BN's outputs are (0,) tensors).

using Fwd6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Bwd5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// With the BN stage off, its parameters and statistics must be None.
void check_bn_off(bool bn, const OptTensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(bn || !given(t), op, ": ", name,
                    " must be None with bn=False (the BN stage off: SBN alone)");
}

// The affine parameters per channel (absent: weight 1, bias 0).
struct Params {
  std::vector<double> bn_weight, bn_bias, sbn_weight, sbn_bias;
};

Params read_params(const X4& v, bool bn, const OptTensor& bn_weight, const OptTensor& bn_bias,
                   const OptTensor& sbn_weight, const OptTensor& sbn_bias, const char* op) {
  check_bn_off(bn, bn_weight, op, "bn_weight");
  check_bn_off(bn, bn_bias, op, "bn_bias");
  return {read_channels(bn_weight, v, 1.0, op, "bn_weight"),
          read_channels(bn_bias, v, 0.0, op, "bn_bias"),
          read_channels(sbn_weight, v, 1.0, op, "sbn_weight"),
          read_channels(sbn_bias, v, 0.0, op, "sbn_bias")};
}

// The statistics outputs in acc; BN's are (0,) with the BN stage off.
struct StatsOut {
  bool bn;
  AccOut bn_mean, bn_var, sbn_mean, sbn_var;
  StatsOut(const X4& v, bool bn_on)
      : bn(bn_on),
        bn_mean({bn_on ? v.C : 0}, v),
        bn_var({bn_on ? v.C : 0}, v),
        sbn_mean({v.C, 2}, v),
        sbn_var({v.C}, v) {}
  void set(int64_t c, double mean, double var, double spec_re, double spec_im, double spec_var) {
    if (bn) {
      bn_mean.set(c, mean);
      bn_var.set(c, var);
    }
    sbn_mean.set(2 * c, spec_re);
    sbn_mean.set(2 * c + 1, spec_im);
    sbn_var.set(c, spec_var);
  }
};

// One channel's saved row (SavedCol): the SBN coefficients of z = BN(x) on top of the BN stage.
void save_channel(const BnPart& bn_stage, double shift, double count, const Sums& sums,
                  const Sums& local, const Spectral& spec, double sbn_weight, double sbn_bias,
                  double sbn_eps, double f, double* o) {
  const SbnCoef sbn = sbn_coef(bn_stage.Kz, spec, sbn_weight, sbn_bias, sbn_eps, f);
  o[SavedCol::shift] = shift;
  o[SavedCol::x_scale] = sbn.a * bn_stage.p;
  o[SavedCol::offset] = sbn.b;
  o[SavedCol::pr_coef] = sbn.u;
  o[SavedCol::pi_coef] = sbn.v;
  o[SavedCol::bn_scale] = bn_stage.p;
  o[SavedCol::bn_std] = bn_stage.sd;
  o[SavedCol::z_shift] = bn_stage.Kz;
  o[SavedCol::mean_re] = spec.mr;
  o[SavedCol::mean_im] = spec.mi;
  o[SavedCol::sbn_std] = sbn.s;
  o[SavedCol::sbn_scale] = sbn.a;
  o[SavedCol::bn_mean] = bn_stage.mbn;
  o[SavedCol::count] = count;
  store_sums(sums, o + SavedCol::sum_t);
  store_sums(local, o + SavedCol::local_sum_t);
}

// The training finalize of a group's rows (P, C, 8) + the apply pass.
Fwd6 finish_rows(const X4& v, const RowConsts& rc, const double* rows, int64_t P, int64_t rank,
                 bool bn, const Params& prm, double bn_eps, double sbn_eps, FftNorm fn, Act act,
                 double slope, const char* op) {
  const int64_t C = v.C, H = v.H, W = v.W;
  const double f = fft_scale(fn, H, W);
  Tensor saved = new_f64({C, SavedCol::Width}, v);
  double* sv = saved.data_ptr<double>();
  StatsOut out(v, bn);
  for (int64_t c = 0; c < C; ++c) {
    const Group group = combine_rows(rows, P, C, c, rank, H, W);
    TORCH_CHECK_VALUE(group.N > 0, op, ": the batch (over every process) has no samples");
    const BnPart bn_stage = bn ? bn_from_sums(group.sums, group.K, group.N, H, W,
                                              prm.bn_weight[c], prm.bn_bias[c], bn_eps)
                               : bn_identity(group.K);
    const Spectral spec =
        spectral_stats(scale_sums(group.sums, bn_stage.p), bn_stage.Kz, group.N, H, W);
    save_channel(bn_stage, group.K, group.N, group.sums, group.local, spec, prm.sbn_weight[c],
                 prm.sbn_bias[c], sbn_eps, f, sv + c * SavedCol::Width);
    out.set(c, bn_stage.mbn, bn_stage.vbn, f * spec.mr, f * spec.mi, f * f * spec.var);
  }
  Tensor y = apply_forward(v, sv, rc, act, slope);
  return {y, out.bn_mean.t, out.bn_var.t, out.sbn_mean.t, out.sbn_var.t, saved};
}

Tensor sbn_stats_cpu(const Tensor& x) {
  const char* op = "sbn_stats";
  const X4 v = view4(x, op);
  Tensor rows = new_f64({v.C, RowCol::Width}, v);
  stats_rows(v, RowConsts(v.W), rows.data_ptr<double>());
  return rows;
}

Fwd6 sbn_finish_cpu(const Tensor& x, const Tensor& rows_all, int64_t rank, bool bn,
                    const OptTensor& bn_weight, const OptTensor& bn_bias,
                    const OptTensor& sbn_weight, const OptTensor& sbn_bias, double bn_eps,
                    double sbn_eps, c10::string_view fft_norm, c10::string_view act,
                    double act_param) {
  const char* op = "sbn_finish";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  TORCH_CHECK_VALUE(rows_all.dim() == 3, op, ": rows_all must have shape (P, ", v.C, ", ",
                    int(RowCol::Width), "), got ", rows_all.sizes());
  const int64_t P = rows_all.size(0);
  TORCH_CHECK_VALUE(rank >= 0 && rank < P, op, ": rank must be in [0, ", P, "), got ", rank);
  const Tensor rows = f64_arg(rows_all, {P, v.C, RowCol::Width}, v, op, "rows_all");
  const Params prm = read_params(v, bn, bn_weight, bn_bias, sbn_weight, sbn_bias, op);
  return finish_rows(v, RowConsts(v.W), rows.const_data_ptr<double>(), P, rank, bn, prm, bn_eps,
                     sbn_eps, fn, a, act_param, op);
}

Fwd6 sbn_forward_cpu(const Tensor& x, bool bn, const OptTensor& bn_weight,
                     const OptTensor& bn_bias, const OptTensor& bn_mean, const OptTensor& bn_var,
                     const OptTensor& sbn_weight, const OptTensor& sbn_bias,
                     const OptTensor& sbn_mean, const OptTensor& sbn_var, double bn_eps,
                     double sbn_eps, c10::string_view fft_norm, c10::string_view act,
                     double act_param) {
  const char* op = "sbn_forward";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  const RowConsts rc(v.W);
  const Params prm = read_params(v, bn, bn_weight, bn_bias, sbn_weight, sbn_bias, op);
  check_bn_off(bn, bn_mean, op, "bn_mean");
  check_bn_off(bn, bn_var, op, "bn_var");
  const int n_given = given(bn_mean) + given(bn_var) + given(sbn_mean) + given(sbn_var);
  TORCH_CHECK_VALUE(n_given == 0 || n_given == (bn ? 4 : 2), op,
                    bn ? ": bn_mean, bn_var, sbn_mean, sbn_var must all be given (eval) or all be "
                         "None"
                       : ": sbn_mean and sbn_var must both be given (eval) or both be None");
  if (n_given == 0) {
    std::vector<double> rows(v.C * RowCol::Width);
    stats_rows(v, rc, rows.data());
    return finish_rows(v, rc, rows.data(), 1, 0, bn, prm, bn_eps, sbn_eps, fn, a, act_param, op);
  }
  // eval: no statistics pass. BN stage on: shift = BN's mean rounded to acc (so that x - shift is
  // the passes' exact t): z = bn_scale (x - shift) + z_shift then has no cancellation for data with
  // a large mean. BN stage off: shift = 0.
  const int64_t C = v.C, H = v.H, W = v.W;
  const std::vector<double> bm = read_channels(bn_mean, v, 0.0, op, "bn_mean");
  const std::vector<double> bv = read_channels(bn_var, v, 0.0, op, "bn_var");
  const std::vector<double> sm = read_mean2(*sbn_mean, v, op, "sbn_mean");
  const std::vector<double> svr = read_channels(sbn_var, v, 0.0, op, "sbn_var");
  const double f = fft_scale(fn, H, W);
  Tensor saved = new_f64({C, SavedCol::Width}, v);
  double* sv = saved.data_ptr<double>();
  StatsOut out(v, bn);
  const Sums zero{0, 0, 0, 0, 0, 0};
  const bool f64 = acc_type(v.x.scalar_type()) == at::kDouble;
  for (int64_t c = 0; c < C; ++c) {
    const double shift =
        !bn ? 0.0 : (f64 ? bm[c] : static_cast<double>(static_cast<float>(bm[c])));
    const BnPart bn_stage =
        bn ? bn_from_stats(bm[c], bv[c], shift, prm.bn_weight[c], prm.bn_bias[c], bn_eps)
           : bn_identity(shift);
    const Spectral spec{sm[2 * c] / f, sm[2 * c + 1] / f, svr[c] / (f * f)};
    save_channel(bn_stage, shift, double(v.N), zero, zero, spec, prm.sbn_weight[c],
                 prm.sbn_bias[c], sbn_eps, f, sv + c * SavedCol::Width);
    out.set(c, bm[c], bv[c], sm[2 * c], sm[2 * c + 1], svr[c]);
  }
  Tensor y = apply_forward(v, sv, rc, a, act_param);
  return {y, out.bn_mean.t, out.bn_var.t, out.sbn_mean.t, out.sbn_var.t, saved};
}

Tensor saved_arg(const Tensor& saved, const X4& v, const char* op) {
  return f64_arg(saved, {v.C, SavedCol::Width}, v, op, "saved");
}

Tensor sbn_grad_stats_cpu(const Tensor& dy_in, const Tensor& x, const Tensor& saved_in,
                          c10::string_view act, double act_param) {
  const char* op = "sbn_grad_stats";
  const X4 v = view4(x, op);
  const Act a = act_of(act, op);
  const Tensor dy = like_x(dy_in, v, op, "dy");
  const Tensor saved = saved_arg(saved_in, v, op);
  Tensor out = new_f64({v.C, GradCol::Width}, v);
  grad_sums(v, dy, saved.const_data_ptr<double>(), RowConsts(v.W), a, act_param,
            out.data_ptr<double>());
  return out;
}

// The backward finalize from the gradient sums (the group's `all`, this process's `mine`; the same
// pointer when P == 1) + the backward apply.
Bwd5 grad_finish_sums(const X4& v, const Tensor& dy, const RowConsts& rc, const double* saved,
                      const double* gsums_mine, const double* gsums_all, bool bn, bool training,
                      FftNorm fn, Act act, double slope) {
  const int64_t C = v.C, H = v.H, W = v.W;
  const double h = 1.0 / fft_scale(fn, H, W);
  const double local_count = double(v.N);
  const bool bn_batch = bn && training;  // the BN stage's batch-statistics terms
  AccOut dbn_weight({bn ? C : 0}, v), dbn_bias({bn ? C : 0}, v), dsbn_weight({C}, v),
      dsbn_bias({C}, v);
  std::vector<BackCoef> bc(C);
  for (int64_t c = 0; c < C; ++c) {
    const double* s = saved + c * SavedCol::Width;
    const double* all = gsums_all + c * GradCol::Width;
    const double* mine = gsums_mine + c * GradCol::Width;
    const double bn_scale = s[SavedCol::bn_scale], bn_std = s[SavedCol::bn_std];
    const double sbn_scale = s[SavedCol::sbn_scale], count = s[SavedCol::count];
    const auto sbn_grad = [&](const double* gs, bool batch_terms) {
      return sbn_grad_core(gs[GradCol::sum_g], bn_scale * gs[GradCol::sum_gt],
                           gs[GradCol::sum_g_pr], gs[GradCol::sum_g_pi], s[SavedCol::z_shift],
                           s[SavedCol::mean_re], s[SavedCol::mean_im], s[SavedCol::sbn_std],
                           sbn_scale, count, H, W, batch_terms);
    };
    const SbnGrad g = sbn_grad(all, training);
    const SbnGrad g_mine = gsums_mine == gsums_all ? g : sbn_grad(mine, false);
    dsbn_weight.set(c, h * g_mine.dgamma);
    dsbn_bias.set(c, h * g_mine.dbeta);
    double mean_t = 0.0, sum_dz = 0.0, dgb = 0.0;  // the BN-batch terms (zero unless bn_batch)
    if (bn_batch) {
      const Sums sums = load_sums(s + SavedCol::sum_t);
      double sum_dzt;
      bn_grad_sums(sums, all[GradCol::sum_g], all[GradCol::sum_gt], sbn_scale, bn_scale, g, count,
                   H, W, sum_dz, sum_dzt);
      mean_t = sums.S1 / (count * double(H) * double(W));
      dgb = (sum_dzt - mean_t * sum_dz) / bn_std;
      double my_dz = sum_dz, my_dzt = sum_dzt;
      if (gsums_mine != gsums_all)  // this process's share: its own sums, its own samples
        bn_grad_sums(load_sums(s + SavedCol::local_sum_t), mine[GradCol::sum_g],
                     mine[GradCol::sum_gt], sbn_scale, bn_scale, g, local_count, H, W, my_dz,
                     my_dzt);
      dbn_bias.set(c, my_dz);
      dbn_weight.set(c, (my_dzt - mean_t * my_dz) / bn_std);
    } else if (bn) {  // eval: dz = sbn_scale g, xhat = (x - bn_mean) / bn_std
      const double centre = s[SavedCol::shift] - s[SavedCol::bn_mean];
      dbn_bias.set(c, sbn_scale * mine[GradCol::sum_g]);
      dbn_weight.set(
          c, sbn_scale * (mine[GradCol::sum_gt] + centre * mine[GradCol::sum_g]) / bn_std);
    }
    bc[c] = back_coef(bn_scale, sbn_scale, bn_std, mean_t, sum_dz, dgb, bn_batch, g, count, H, W);
  }
  Tensor dx = apply_backward(v, dy, saved, bc, rc, act, slope, training);
  return {dx, dbn_weight.t, dbn_bias.t, dsbn_weight.t, dsbn_bias.t};
}

Bwd5 sbn_grad_finish_cpu(const Tensor& dy_in, const Tensor& x, const Tensor& saved_in,
                         const Tensor& gsums_local, const Tensor& gsums_all, bool bn,
                         bool training, c10::string_view fft_norm, c10::string_view act,
                         double act_param) {
  const char* op = "sbn_grad_finish";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  const Tensor dy = like_x(dy_in, v, op, "dy");
  const Tensor saved = saved_arg(saved_in, v, op);
  const Tensor gl = f64_arg(gsums_local, {v.C, GradCol::Width}, v, op, "gsums_local");
  const Tensor ga = f64_arg(gsums_all, {v.C, GradCol::Width}, v, op, "gsums_all");
  return grad_finish_sums(v, dy, RowConsts(v.W), saved.const_data_ptr<double>(),
                          gl.const_data_ptr<double>(), ga.const_data_ptr<double>(), bn, training,
                          fn, a, act_param);
}

Bwd5 sbn_backward_cpu(const Tensor& dy_in, const Tensor& x, const Tensor& saved_in, bool bn,
                      bool training, c10::string_view fft_norm, c10::string_view act,
                      double act_param) {
  const char* op = "sbn_backward";
  const X4 v = view4(x, op);
  const FftNorm fn = parse_fft_norm(fft_norm, op);
  const Act a = act_of(act, op);
  const Tensor dy = like_x(dy_in, v, op, "dy");
  const Tensor saved = saved_arg(saved_in, v, op);
  const RowConsts rc(v.W);
  const double* sv = saved.const_data_ptr<double>();
  std::vector<double> gs(v.C * GradCol::Width);
  grad_sums(v, dy, sv, rc, a, act_param, gs.data());
  return grad_finish_sums(v, dy, rc, sv, gs.data(), gs.data(), bn, training, fn, a, act_param);
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
}
