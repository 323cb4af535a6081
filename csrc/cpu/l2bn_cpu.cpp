// L2BN ops on CPU: each op is ONE leaf op (its outputs allocated with at::empty, every pass and the
// finalize in the kernels of l2bn_cpu_kernels.h; no aten compute op inside).
//   passes   x viewed as (N, C, S) in layout NCS (rows of S contiguous values) or NSC (for each n,
//            an S x C row-major block); accumulation in float (double for double), explicit
//            8-lane vectors; compiled for the baseline ISA and for AVX2, chosen at run time
//            (NORMKERNELS_CPU_ISA=baseline forces the baseline build; both give the same bits).
//   finalize float64, the formulas of csrc/l2bn_finalize.h; each sample's sums run over c and each
//            channel's over n in a fixed order, so the result does not depend on the number of
//            threads (nor on how the rows were split among them).
//   apply    y = act(pre) / dx, per-(n, c) coefficients.
// Each op runs its passes and finalize phases in one parallel region (team_run: a barrier between
// phases), with its scratch in thread-local buffers reused across calls (no allocation per call
// beyond the outputs).
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__GNUC__)
// the kernels' 8-lane vector types cross internal (inlined) function boundaries only
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "../activation.h"
#include "../l2bn.h"
#include "isa.h"

namespace normkernels {
namespace l2bn {
namespace {

#if defined(__GNUC__)
#define NK_INLINE inline __attribute__((always_inline))
#else
#define NK_INLINE inline
#endif

// ---------------------------------------------------------------- teams
// Elements of x per thread below which an op runs on fewer threads (ATen's grain).
constexpr int64_t kTeamGrain = 32768;

int team_for(const View3& v) {
  if (at::in_parallel_region()) return 1;
  const int64_t numel = v.N * v.C * v.S;
  const int64_t t = std::min<int64_t>(at::get_num_threads(), (numel + kTeamGrain - 1) / kTeamGrain);
  return static_cast<int>(std::max<int64_t>(1, t));
}

// Runs f(phase, tid, nt) for phase = 0 .. nphases-1 on a team of (up to) T threads, all threads
// through each phase before any starts the next: one OpenMP region with a barrier between the
// phases (ATen's own backend here is OpenMP, so the team is ATen's thread pool); without OpenMP,
// one at::parallel_for per phase. The work split (part) depends on nt, never the results.
template <typename F>
void team_run(int T, int nphases, const F& f) {
#if defined(_OPENMP)
  if (T > 1) {
#pragma omp parallel num_threads(T)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      for (int k = 0; k < nphases; ++k) {
        if (k > 0) {
#pragma omp barrier
        }
        f(k, tid, nt);
      }
    }
    return;
  }
#else
  if (T > 1) {
    for (int k = 0; k < nphases; ++k)
      at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) f(k, static_cast<int>(t), T);
      });
    return;
  }
#endif
  for (int k = 0; k < nphases; ++k) f(k, 0, 1);
}

// Thread tid's share [b, e) of n items (contiguous, sizes within one of each other).
inline void part(int64_t n, int tid, int nt, int64_t& b, int64_t& e) {
  b = n * tid / nt;
  e = n * (tid + 1) / nt;
}

// ---------------------------------------------------------------- scratch
// Thread-local buffers reused across calls (each op takes distinct slots; grown when too small).
enum Slot : int { kSlotInvR, kSlotRows, kSlotCoef, kSlotSums, kSlotGradRows, kSlotGrad, kSlotDx,
                  kSlots };
template <typename T>
T* scratch(Slot slot, int64_t n) {
  static_assert(std::is_trivially_copyable_v<T>, "scratch holds plain values");
  struct Buf {
    std::unique_ptr<double[]> p;
    size_t cap = 0;  // in doubles
  };
  thread_local Buf bufs[kSlots];
  Buf& b = bufs[slot];
  const size_t need = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 7) / 8;
  if (need > b.cap) {
    b.p.reset(new double[need]);
    b.cap = need;
  }
  return reinterpret_cast<T*>(b.p.get());
}

// ---------------------------------------------------------------- jobs
// Pass operands: the saved forward coefficients (center, x_coef, offset planes) and slope.
template <typename acc_t>
struct RowCoefs {
  const acc_t* center;
  const acc_t* x_coef;
  const acc_t* offset;
  acc_t slope;
};

// Where the channel statistics come from: the group's rows, this batch's rows, or eval's.
struct StatsSource {
  const double* rows_all = nullptr;  // (P, 3, C)
  int64_t P = 0;
  ChannelVec mean, var;              // eval
};

// The forward family's phases: statistics pass (run_stats: into m, m2), sample scales (inv_r
// given), channel phase (local rows when `local` is given, written to rows_out when given;
// coefficients when cc is given), row coefficients into saved and apply (apply; NSC: the row
// coefficients in a phase of their own).
template <typename acc_t>
struct FwdJob {
  const View3* v = nullptr;
  int team = 1;
  Act act = Act::Identity;
  acc_t slope = 0;
  bool apply = false;  // row coefficients and y
  void* y = nullptr;
  bool run_stats = false;
  acc_t* m = nullptr;  // (N, C) row means and centered sums of squares
  acc_t* m2 = nullptr;
  double l2_eps = 0.0, sqrt_d = 1.0;
  double* inv_r = nullptr;  // (N)
  acc_t* r_out = nullptr;   // saved's r, nrm planes
  acc_t* nrm_out = nullptr;
  ChanRow* local = nullptr;     // (C)
  double* rows_out = nullptr;   // (3, C)
  StatsSource src;
  double eps = 0.0;
  ChannelVec w, b;
  ChannelCoef* cc = nullptr;  // (C)
  acc_t* bmean = nullptr;
  acc_t* bvar = nullptr;
  acc_t* inv_s = nullptr;
  acc_t* saved = nullptr;
};

// The backward family's phases: gradient sums (run_sums: into q, p; g into dx when store_g),
// channel phase (grad rows into rows when run_sums; coefficients when finish), sample terms and
// dx coefficients (into dxc, dxo, which may be q, p), apply.
template <typename acc_t>
struct BwdJob {
  const View3* v = nullptr;
  int team = 1;
  Act act = Act::Identity;
  acc_t slope = 0;
  const at::Tensor* dy = nullptr;
  const acc_t* saved = nullptr;
  bool run_sums = false;
  bool store_g = false;
  acc_t* q = nullptr;  // (N, C)
  acc_t* p = nullptr;
  const double* inv_r = nullptr;    // (N)
  double* rows = nullptr;           // (2, C)
  const double* rows_tot = nullptr; // (2, C) training; nullptr: eval
  double m_count = 0.0;
  ChannelVec w;
  acc_t* dweight = nullptr;
  acc_t* dbias = nullptr;
  GradChannel* gc = nullptr;  // (C)
  acc_t* dxc = nullptr;       // (N, C)
  acc_t* dxo = nullptr;
  bool finish = false;  // coefficients and dx (l2bn_grad_stats: only the sums and rows)
  void* dx = nullptr;
};

// ---------------------------------------------------------------- kernels, two builds

// The kernels' lanes: csrc/cpu/vec8.h (Vec8, through isa.h and isa_builds.h).
#define NK_ISA_KERNELS "l2bn_cpu_kernels.h"
#include "isa_builds.h"

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

double sqrt_d_of(const View3& v, bool rescale) {
  return rescale ? std::sqrt(static_cast<double>(v.C) * static_cast<double>(v.S)) : 1.0;
}

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Fwd forward_outputs(const Common& k) {
  const auto opts = k.v.x.options().dtype(k.acc);
  return {at::empty_like(k.v.x), at::empty({k.v.C}, opts), at::empty({k.v.C}, opts),
          at::empty({layout_of(k.v).numel()}, opts)};
}

// The forward job of finalize + apply from stats m, m2 (saved's own planes, or given).
template <typename acc_t>
FwdJob<acc_t> finish_job(const Common& k, acc_t* m, acc_t* m2, const StatsSource& src,
                         const ChannelVec& w, const ChannelVec& b, double eps, double l2_eps,
                         bool rescale, const Fwd& out) {
  const View3& v = k.v;
  const SavedLayout L = layout_of(v);
  acc_t* sp = std::get<3>(out).data_ptr<acc_t>();
  FwdJob<acc_t> J;
  J.v = &k.v;
  J.team = team_for(v);
  J.act = k.act;
  J.slope = static_cast<acc_t>(k.slope);
  J.apply = true;
  J.y = std::get<0>(out).data_ptr();
  J.m = m;
  J.m2 = m2;
  J.l2_eps = l2_eps;
  J.sqrt_d = sqrt_d_of(v, rescale);
  J.inv_r = scratch<double>(kSlotInvR, v.N);
  J.r_out = sp + L.r();
  J.nrm_out = sp + L.nrm();
  J.src = src;
  if (src.rows_all == nullptr && src.mean.p == nullptr) J.local = scratch<ChanRow>(kSlotRows, v.C);
  J.eps = eps;
  J.w = w;
  J.b = b;
  J.cc = scratch<ChannelCoef>(kSlotCoef, v.C);
  J.bmean = std::get<1>(out).data_ptr<acc_t>();
  J.bvar = std::get<2>(out).data_ptr<acc_t>();
  J.inv_s = sp + L.inv_s();
  J.saved = sp;
  double n_all = static_cast<double>(v.N);
  if (src.rows_all != nullptr && v.C > 0)
    n_all = group_samples(group_row(src.rows_all, src.P, v.C, 0), static_cast<double>(v.S));
  sp[L.n_all()] = static_cast<acc_t>(n_all);
  return J;
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
  const Fwd out = forward_outputs(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sp = std::get<3>(out).data_ptr<acc_t>();
    const SavedLayout L = layout_of(k.v);
    // the statistics pass straight into saved
    FwdJob<acc_t> J = finish_job<acc_t>(k, sp + L.center(), sp + L.m2(), src, w, b, eps, l2_eps,
                                        rescale, out);
    J.run_stats = true;
    NK_CALL(forward_job<scalar_t>, J);
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
    FwdJob<acc_t> J;
    J.v = &v;
    J.team = team_for(v);
    J.run_stats = true;
    J.m = stats.data_ptr<acc_t>();
    J.m2 = J.m + v.N * v.C;
    J.l2_eps = l2_eps;
    J.sqrt_d = sqrt_d_of(v, rescale);
    J.inv_r = scratch<double>(kSlotInvR, v.N);
    J.local = scratch<ChanRow>(kSlotRows, v.C);
    J.rows_out = rows.data_ptr<double>();
    NK_CALL(forward_job<scalar_t>, J);
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
  const Fwd out = forward_outputs(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // const_cast: with run_stats = false the stats are only read
    acc_t* m = const_cast<acc_t*>(stats.const_data_ptr<acc_t>());
    const FwdJob<acc_t> J = finish_job<acc_t>(k, m, m + k.v.N * k.v.C, src, w, b, eps, l2_eps,
                                              rescale, out);
    NK_CALL(forward_job<scalar_t>, J);
  });
  return out;
}

template <typename acc_t>
const double* inv_r_of(const acc_t* saved, int64_t N, int64_t C) {
  const acc_t* r = saved + SavedLayout{N, C}.r();
  double* inv_r = scratch<double>(kSlotInvR, N);
  for (int64_t n = 0; n < N; ++n) inv_r[n] = 1.0 / static_cast<double>(r[n]);
  return inv_r;
}

template <typename acc_t>
BwdJob<acc_t> bwd_job(const Common& k, const at::Tensor& dy, const at::Tensor& saved) {
  BwdJob<acc_t> J;
  J.v = &k.v;
  J.team = team_for(k.v);
  J.act = k.act;
  J.slope = static_cast<acc_t>(k.slope);
  J.dy = &dy;
  J.saved = saved.const_data_ptr<acc_t>();
  J.inv_r = inv_r_of<acc_t>(J.saved, k.v.N, k.v.C);
  return J;
}

template <typename acc_t>
void bwd_finish_outputs(BwdJob<acc_t>& J, const Common& k, const ChannelVec& w,
                        const std::tuple<at::Tensor, at::Tensor, at::Tensor>& out) {
  const SavedLayout L = layout_of(k.v);
  J.m_count = static_cast<double>(J.saved[L.n_all()]) * static_cast<double>(k.v.S);
  J.w = w;
  J.finish = true;
  J.dx = std::get<0>(out).data_ptr();
  J.dweight = std::get<1>(out).data_ptr<acc_t>();
  J.dbias = std::get<2>(out).data_ptr<acc_t>();
  J.gc = scratch<GradChannel>(kSlotGrad, k.v.C);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t NC = k.v.N * k.v.C;
    BwdJob<acc_t> J = bwd_job<acc_t>(k, dy, saved);
    J.run_sums = true;
    // SiLU: the gradient-sums pass stores g in dx, which the apply reads instead of evaluating
    // act' again (the same values: the results equal l2bn_grad_stats + l2bn_grad_finish)
    J.store_g = k.act == Act::SiLU;
    J.q = scratch<acc_t>(kSlotSums, 2 * NC);
    J.p = J.q + NC;
    J.rows = scratch<double>(kSlotGradRows, kGradRowFields * k.v.C);
    J.rows_tot = training ? J.rows : nullptr;
    bwd_finish_outputs<acc_t>(J, k, w, out);
    J.dxc = J.q;  // in place: each sample's sums are read in full before its coefficients
    J.dxo = J.p;
    NK_CALL(backward_job<scalar_t>, J);
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
    BwdJob<acc_t> J = bwd_job<acc_t>(k, dy, saved);
    J.run_sums = true;
    J.q = sums.data_ptr<acc_t>();
    J.p = J.q + k.v.N * k.v.C;
    J.rows = rows.data_ptr<double>();
    NK_CALL(backward_job<scalar_t>, J);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t NC = k.v.N * k.v.C;
    BwdJob<acc_t> J = bwd_job<acc_t>(k, dy, saved);
    // const_cast: with run_sums = false the sums and rows are only read
    J.q = const_cast<acc_t*>(sums.const_data_ptr<acc_t>());
    J.p = J.q + NC;
    J.rows = const_cast<double*>(rows.const_data_ptr<double>());
    J.rows_tot = rows_all.defined() ? rows_all.const_data_ptr<double>() : nullptr;
    bwd_finish_outputs<acc_t>(J, k, w, out);
    J.dxc = scratch<acc_t>(kSlotDx, 2 * NC);
    J.dxo = J.dxc + NC;
    NK_CALL(backward_job<scalar_t>, J);
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
    FwdJob<acc_t> J;
    J.v = &v;
    J.team = team_for(v);
    J.run_stats = true;
    J.m = mean.data_ptr<acc_t>();
    J.m2 = m2.data_ptr<acc_t>();
    NK_CALL(forward_job<scalar_t>, J);
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
