// L2BN ops on CUDA: three launches per direction (csrc/l2bn.cpp has the schemas and layouts).
//   forward  = statistics pass, finalize, apply        backward = gradient sums, finalize, apply
// x is viewed as (N, C, S) in layout NCS (rows of S contiguous values) or NSC (channels_last:
// for each n an S x C row-major block). Accumulation in float (double for double x); the
// finalize computes in float64 with the functions of csrc/l2bn_finalize.h (shared with the CPU).
//
// Passes. NCS: a team of TEAM lanes per (row, segment): TEAM in {4, 8, 16, 32} for rows of up to
// 1024 16-byte vectors (a warp or less per row, several rows per block, no block barrier: 56x56
// maps included), a whole 256-thread block for longer rows, which are cut into segments when
// there are too few rows to fill the GPU. Each row is realigned on its own: scalar head up to
// the first 16-byte boundary, 16-byte vector body, scalar tail. NSC: a
// block covers (channel vectors) x (spatial lanes); channel vectors are 16-byte loads when C is a
// multiple of the vector width. Statistics are shifted sums (shift = the row's first value, the
// same for all its segments): no divide per element; segments are combined with Chan's formula
// in the finalize. Every grid is bounded (grid-stride loops) and every reduction runs in a fixed
// order: results are deterministic.
// Finalize: ONE kernel per direction (cooperative launch, one grid-wide barrier between its
// per-sample and per-channel phases; two plain launches where cooperative launch is missing). It
// folds in the combine of the segment partials.
// Apply: the work items and teams of the passes; a work item loads its rows' coefficients once
// (no per-element loads or index divisions), 16-byte vectors where the pointers allow. The
// activation is a kernel argument (uniform over the grid, so its branch costs nothing next to the
// memory traffic) rather than a template parameter: four times fewer kernels to compile.
// Grids: one wave (SMs x the kernel's resident blocks on this device, from the occupancy
// calculator per kernel and device); the grid-stride loops do the rest.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <tuple>

#include "../activation.h"
#include "../l2bn.h"
#include "launch.h"

namespace normkernels {
namespace l2bn {
namespace {

namespace cg = cooperative_groups;
using cuda::launch;
using cuda::launch_cooperative;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTeamMaxVecs = 1024;  // NCS: rows of at most 1024 vectors use a warp (or less)
constexpr int kFinTileC = 32;      // finalize per-channel phase: 32 channels x kWarps sample lanes

template <typename T, int V>
struct alignas(sizeof(T) * V) VecT {
  T v[V];
};

template <typename scalar_t>
__host__ __device__ constexpr int vec_size() {
  return int(16 / sizeof(scalar_t));
}

// ------------------------------------------------------------------------------- device queries
// Queried once per device, then cached (no driver query per call).
struct DeviceInfo {
  int sms = 1;
  bool cooperative = false;
};
const DeviceInfo& device_info() {
  static DeviceInfo cache[C10_COMPILE_TIME_MAX_GPUS];
  static std::once_flag once[C10_COMPILE_TIME_MAX_GPUS];
  const int dev = c10::cuda::current_device();
  std::call_once(once[dev], [dev] {
    int sms = 0, coop = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
    cache[dev].sms = std::max(sms, 1);
    cache[dev].cooperative = coop != 0;
  });
  return cache[dev];
}
int64_t sm_count() { return device_info().sms; }

// Blocks of `kernel` for `blocks` blocks' worth of work: at most one wave on this device (its SMs
// x the kernel's resident blocks per SM); grid-stride loops cover the rest without a tail wave.
template <typename... Params>
int64_t wave_grid(void (*kernel)(Params...), int64_t blocks) {
  const int64_t resident = std::max(1, cuda::resident_blocks(kernel, kThreads));
  return std::max<int64_t>(1, std::min<int64_t>(blocks, sm_count() * resident));
}

// Segments per row: enough work items to fill the GPU, segments of >= min_seg elements.
int64_t choose_splits(int64_t items, int64_t S, int64_t min_seg) {
  const int64_t target = sm_count() * 4;
  if (items >= target || S <= min_seg) return 1;
  const int64_t splits = (target + items - 1) / items;
  return std::max<int64_t>(1, std::min<int64_t>(splits, S / min_seg));
}

__host__ __device__ inline void segment(int64_t S, int64_t seg_len, int64_t j, int64_t& a,
                                        int64_t& b) {
  a = j * seg_len;
  if (a > S) a = S;
  b = a + seg_len < S ? a + seg_len : S;
}

// ------------------------------------------------------------------------------- reductions
// Sum over a team of TEAM lanes (TEAM <= 32: shuffles; TEAM == kThreads: the block). Valid in the
// team's lane 0. Every thread of the block must call it (block-uniform control flow).
template <int TEAM, typename T>
__device__ __forceinline__ void team_sum2(T& a, T& b) {
  if constexpr (TEAM <= 32) {
#pragma unroll
    for (int off = TEAM / 2; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off, TEAM);
      b += __shfl_down_sync(0xffffffffu, b, off, TEAM);
    }
  } else {
    static_assert(TEAM == kThreads, "team size");
    __shared__ T sh[2][kWarps];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
    if (lane == 0) {
      sh[0][warp] = a;
      sh[1][warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
      a = lane < kWarps ? sh[0][lane] : T(0);
      b = lane < kWarps ? sh[1][lane] : T(0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, off);
        b += __shfl_down_sync(0xffffffffu, b, off);
      }
    }
    __syncthreads();  // sh is reused by the next work item
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Visit the elements [a, b) of row p with a team: scalar head to the first 16-byte boundary,
// 16-byte vectors, scalar tail (pointer q2, when given, must have the same alignment as p).
template <typename scalar_t, int TEAM, typename F>
__device__ __forceinline__ void team_row(const scalar_t* p, const scalar_t* q2, int64_t a,
                                         int64_t b, int lane, bool vec_ok, F&& f) {
  constexpr int V = vec_size<scalar_t>();
  const scalar_t* pa = p + a;
  const int64_t L = b - a;
  int64_t head = L;
  if (vec_ok) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(pa);
    head = int64_t(((16 - addr % 16) % 16) / sizeof(scalar_t));
    if (head > L) head = L;
  }
  for (int64_t i = lane; i < head; i += TEAM) f(pa[i], q2 ? q2[a + i] : scalar_t(0));
  const int64_t nvec = (L - head) / V;
  const VecT<scalar_t, V>* pv = reinterpret_cast<const VecT<scalar_t, V>*>(pa + head);
  const VecT<scalar_t, V>* qv =
      q2 ? reinterpret_cast<const VecT<scalar_t, V>*>(q2 + a + head) : nullptr;
#pragma unroll 2
  for (int64_t i = lane; i < nvec; i += TEAM) {
    const VecT<scalar_t, V> xv = pv[i];
    VecT<scalar_t, V> dv;
    if (qv) dv = qv[i];
#pragma unroll
    for (int k = 0; k < V; ++k) f(xv.v[k], qv ? dv.v[k] : scalar_t(0));
  }
  for (int64_t i = head + nvec * V + lane; i < L; i += TEAM)
    f(pa[i], q2 ? q2[a + i] : scalar_t(0));
}

// ------------------------------------------------------------------------------- statistics pass
// Output per work item (row, segment j): mean and M2 of the segment, straight into (mean, m2)
// when there is one segment per row, else into partial[item * 2 + {0, 1}].
template <typename acc_t>
__device__ __forceinline__ void write_stat(int64_t row, int64_t item, int64_t splits, int64_t n,
                                           acc_t K, acc_t s1, acc_t s2, acc_t* mean, acc_t* m2,
                                           acc_t* partial) {
  acc_t mu = acc_t(0), q = acc_t(0);
  if (n > 0) {
    const acc_t d = s1 / acc_t(n);
    mu = K + d;
    q = s2 - s1 * d;
    if (q < acc_t(0)) q = acc_t(0);
  }
  if (splits == 1) {
    mean[row] = mu;
    m2[row] = q;
  } else {
    partial[item * 2] = mu;
    partial[item * 2 + 1] = q;
  }
}

template <typename scalar_t, typename acc_t, int TEAM>
__global__ void __launch_bounds__(kThreads)
    stats_ncs_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ mean,
                     acc_t* __restrict__ m2, acc_t* __restrict__ partial, int64_t rows, int64_t S,
                     int64_t splits, int64_t seg_len) {
  constexpr int TEAMS = kThreads / TEAM;
  const int team = threadIdx.x / TEAM, lane = threadIdx.x % TEAM;
  const int64_t items = rows * splits;
  for (int64_t base = int64_t(blockIdx.x) * TEAMS; base < items;
       base += int64_t(gridDim.x) * TEAMS) {
    const int64_t item = base + team;
    acc_t s1 = 0, s2 = 0, K = 0;
    int64_t row = 0, a = 0, b = 0;
    if (item < items) {
      row = item / splits;
      segment(S, seg_len, item % splits, a, b);
      const scalar_t* p = x + row * S;
      K = static_cast<acc_t>(p[0]);
      team_row<scalar_t, TEAM>(p, nullptr, a, b, lane, true, [&](scalar_t v, scalar_t) {
        const acc_t d = static_cast<acc_t>(v) - K;
        s1 += d;
        s2 += d * d;
      });
    }
    team_sum2<TEAM>(s1, s2);
    if (item < items && lane == 0) write_stat(row, item, splits, b - a, K, s1, s2, mean, m2, partial);
  }
}

// The NSC kernels' block reduction: the TS spatial lanes of channel vector tc add their two
// sums (a, b) into lane ts = 0's. Every thread of the block calls it (it holds a barrier).
template <typename acc_t, int V>
__device__ __forceinline__ void spatial_lanes_sum2(acc_t (*sh)[kThreads * V], int tc, int ts, int TC,
                                                   acc_t (&a)[V], acc_t (&b)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sh[0][(ts * TC + tc) * V + k] = a[k];
    sh[1][(ts * TC + tc) * V + k] = b[k];
  }
  __syncthreads();
  if (ts == 0)
    for (int l = 1; l < kThreads / TC; ++l)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        a[k] += sh[0][(l * TC + tc) * V + k];
        b[k] += sh[1][(l * TC + tc) * V + k];
      }
}

// NSC: a block is TC channel vectors x TS spatial lanes; work item = (n, channel tile, segment).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    stats_nsc_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ mean,
                     acc_t* __restrict__ m2, acc_t* __restrict__ partial, int64_t N, int64_t C,
                     int64_t S, int TC, int64_t ctiles, int64_t splits, int64_t seg_len) {
  __shared__ acc_t sh[2][kThreads * V];
  const int TS = kThreads / TC;
  const int tc = threadIdx.x % TC, ts = threadIdx.x / TC;
  const int64_t items = N * ctiles * splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t j = item % splits, t = item / splits;
    const int64_t n = t / ctiles, c0 = ((t % ctiles) * TC + tc) * V;
    int64_t a, b;
    segment(S, seg_len, j, a, b);
    acc_t s1[V], s2[V], K[V];
#pragma unroll
    for (int k = 0; k < V; ++k) s1[k] = s2[k] = K[k] = acc_t(0);
    if (c0 < C) {
      const scalar_t* p = x + n * S * C + c0;
      if constexpr (V > 1) {
        const VecT<scalar_t, V> kv = *reinterpret_cast<const VecT<scalar_t, V>*>(p);
#pragma unroll
        for (int k = 0; k < V; ++k) K[k] = static_cast<acc_t>(kv.v[k]);
        for (int64_t s = a + ts; s < b; s += TS) {
          const VecT<scalar_t, V> xv = *reinterpret_cast<const VecT<scalar_t, V>*>(p + s * C);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const acc_t d = static_cast<acc_t>(xv.v[k]) - K[k];
            s1[k] += d;
            s2[k] += d * d;
          }
        }
      } else {
        K[0] = static_cast<acc_t>(p[0]);
        for (int64_t s = a + ts; s < b; s += TS) {
          const acc_t d = static_cast<acc_t>(p[s * C]) - K[0];
          s1[0] += d;
          s2[0] += d * d;
        }
      }
    }
    spatial_lanes_sum2<acc_t, V>(sh, tc, ts, TC, s1, s2);
    if (ts == 0 && c0 < C) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t row = n * C + c0 + k;
        write_stat(row, row * splits + j, splits, b - a, K[k], s1[k], s2[k], mean, m2, partial);
      }
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------- gradient sums
// Q = sum g, P = sum g (x - center), g = act'(pre) dy (pre recomputed from saved as the forward
// apply computed it). Output like the statistics pass: (q, p) or partial[item * 2 + {0, 1}].
template <typename acc_t>
struct PassCoefs {
  const acc_t* center;
  const acc_t* x_coef;
  const acc_t* offset;
  acc_t slope;
  Act act;  // a kernel argument, uniform over the grid (one instantiation for every activation)
};

template <typename acc_t>
__device__ __forceinline__ void write_sums(int64_t row, int64_t item, int64_t splits, acc_t sq,
                                           acc_t sp, acc_t* q, acc_t* p, acc_t* partial) {
  if (splits == 1) {
    q[row] = sq;
    p[row] = sp;
  } else {
    partial[item * 2] = sq;
    partial[item * 2 + 1] = sp;
  }
}

template <typename acc_t>
__device__ __forceinline__ void grad_add(Act act, acc_t xv, acc_t d, acc_t ctr, acc_t a, acc_t b,
                                         acc_t slope, acc_t& sq, acc_t& sp) {
  const acc_t g =
      act == Act::Identity ? d : act_backward<acc_t>(act, pre_act<acc_t>(xv, ctr, a, b), slope, d);
  sq += g;
  sp += g * (xv - ctr);
}

template <typename scalar_t, typename acc_t, int TEAM>
__global__ void __launch_bounds__(kThreads)
    sums_ncs_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                    PassCoefs<acc_t> pc, acc_t* __restrict__ q, acc_t* __restrict__ p,
                    acc_t* __restrict__ partial, int64_t rows, int64_t S, int64_t splits,
                    int64_t seg_len, bool vec_ok) {
  constexpr int TEAMS = kThreads / TEAM;
  const int team = threadIdx.x / TEAM, lane = threadIdx.x % TEAM;
  const int64_t items = rows * splits;
  for (int64_t base = int64_t(blockIdx.x) * TEAMS; base < items;
       base += int64_t(gridDim.x) * TEAMS) {
    const int64_t item = base + team;
    acc_t sq = 0, sp = 0;
    int64_t row = 0;
    if (item < items) {
      row = item / splits;
      int64_t a, b;
      segment(S, seg_len, item % splits, a, b);
      const acc_t ctr = pc.center[row], ca = pc.x_coef[row], cb = pc.offset[row];
      team_row<scalar_t, TEAM>(x + row * S, dy + row * S, a, b, lane, vec_ok,
                               [&](scalar_t xv, scalar_t dv) {
                                 grad_add<acc_t>(pc.act, static_cast<acc_t>(xv), static_cast<acc_t>(dv),
                                                    ctr, ca, cb, pc.slope, sq, sp);
                               });
    }
    team_sum2<TEAM>(sq, sp);
    if (item < items && lane == 0) write_sums(row, item, splits, sq, sp, q, p, partial);
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    sums_nsc_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                    PassCoefs<acc_t> pc, acc_t* __restrict__ q, acc_t* __restrict__ p,
                    acc_t* __restrict__ partial, int64_t N, int64_t C, int64_t S, int TC,
                    int64_t ctiles, int64_t splits, int64_t seg_len) {
  __shared__ acc_t sh[2][kThreads * V];
  const int TS = kThreads / TC;
  const int tc = threadIdx.x % TC, ts = threadIdx.x / TC;
  const int64_t items = N * ctiles * splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t j = item % splits, t = item / splits;
    const int64_t n = t / ctiles, c0 = ((t % ctiles) * TC + tc) * V;
    int64_t a, b;
    segment(S, seg_len, j, a, b);
    acc_t sq[V], sp[V], ctr[V], ca[V], cb[V];
#pragma unroll
    for (int k = 0; k < V; ++k) sq[k] = sp[k] = ctr[k] = ca[k] = cb[k] = acc_t(0);
    if (c0 < C) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        ctr[k] = pc.center[n * C + c0 + k];
        ca[k] = pc.x_coef[n * C + c0 + k];
        cb[k] = pc.offset[n * C + c0 + k];
      }
      const scalar_t* px = x + n * S * C + c0;
      const scalar_t* pd = dy + n * S * C + c0;
      for (int64_t s = a + ts; s < b; s += TS) {
        VecT<scalar_t, V> xv, dv;
        if constexpr (V > 1) {
          xv = *reinterpret_cast<const VecT<scalar_t, V>*>(px + s * C);
          dv = *reinterpret_cast<const VecT<scalar_t, V>*>(pd + s * C);
        } else {
          xv.v[0] = px[s * C];
          dv.v[0] = pd[s * C];
        }
#pragma unroll
        for (int k = 0; k < V; ++k)
          grad_add<acc_t>(pc.act, static_cast<acc_t>(xv.v[k]), static_cast<acc_t>(dv.v[k]), ctr[k],
                             ca[k], cb[k], pc.slope, sq[k], sp[k]);
      }
    }
    spatial_lanes_sum2<acc_t, V>(sh, tc, ts, TC, sq, sp);
    if (ts == 0 && c0 < C) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t row = n * C + c0 + k;
        write_sums(row, row * splits + j, splits, sq[k], sp[k], q, p, partial);
      }
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------- pass launchers
struct PassPlan {
  bool nsc;
  int team;          // NCS: lanes per row (4..32, or kThreads)
  int tc, vec;       // NSC: channel vectors per block, vector width (1: scalar)
  int64_t ctiles;
  int64_t splits, seg_len;
  int64_t items, blocks;  // blocks: enough for every work item at once (wave_grid bounds it)
};

template <typename scalar_t>
PassPlan plan_pass(const View3& v, bool vec_ok) {
  constexpr int V = vec_size<scalar_t>();
  PassPlan pl{};
  pl.nsc = v.layout == Layout::NSC;
  if (!pl.nsc) {
    const int64_t rows = v.N * v.C, nvec = (v.S + V - 1) / V;
    if (nvec <= kTeamMaxVecs) {
      pl.team = nvec <= 8 ? 4 : nvec <= 16 ? 8 : nvec <= 32 ? 16 : 32;
      pl.splits = 1;
      pl.seg_len = v.S;
      pl.items = rows;
      pl.blocks = (rows + kThreads / pl.team - 1) / (kThreads / pl.team);
    } else {
      pl.team = kThreads;
      pl.splits = choose_splits(rows, v.S, int64_t(kThreads) * V * 4);
      pl.seg_len = (v.S + pl.splits - 1) / pl.splits;
      pl.items = rows * pl.splits;
      pl.blocks = pl.items;
    }
    return pl;
  }
  pl.vec = vec_ok && v.C % V == 0 ? V : 1;
  const int64_t cvecs = v.C / pl.vec + (v.C % pl.vec != 0);
  int tc = 1;
  while (tc < 32 && tc < cvecs) tc *= 2;
  pl.tc = tc;
  pl.ctiles = (cvecs + tc - 1) / tc;
  const int64_t ts = kThreads / tc;
  pl.splits = choose_splits(v.N * pl.ctiles, v.S, ts * 4);
  pl.seg_len = (v.S + pl.splits - 1) / pl.splits;
  pl.items = v.N * pl.ctiles * pl.splits;
  pl.blocks = pl.items;
  return pl;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
bool same_phase16(const void* p, const void* q) {
  return (reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(q)) % 16 == 0;
}

// A kThreads-thread launch of `kernel` on wave_grid(kernel, blocks) blocks.
template <typename... Params, typename... Args>
void launch_wave(void (*kernel)(Params...), int64_t blocks, cudaStream_t stream, Args&&... args) {
  launch(kernel, wave_grid(kernel, blocks), kThreads, stream, std::forward<Args>(args)...);
}

template <typename scalar_t, typename acc_t>
void launch_stats(const View3& v, const PassPlan& pl, acc_t* mean, acc_t* m2, acc_t* partial,
                  cudaStream_t stream) {
  const scalar_t* x = v.x.const_data_ptr<scalar_t>();
  constexpr int V = vec_size<scalar_t>();
  if (!pl.nsc) {
    const int64_t rows = v.N * v.C;
#define L2BN_STATS_NCS(T)                                                               \
  launch_wave(&stats_ncs_kernel<scalar_t, acc_t, T>, pl.blocks, stream, x, mean, m2, partial, \
              rows, v.S, pl.splits, pl.seg_len)
    switch (pl.team) {
      case 4: L2BN_STATS_NCS(4); break;
      case 8: L2BN_STATS_NCS(8); break;
      case 16: L2BN_STATS_NCS(16); break;
      case 32: L2BN_STATS_NCS(32); break;
      default: L2BN_STATS_NCS(kThreads); break;
    }
#undef L2BN_STATS_NCS
  } else if (pl.vec == V) {
    launch_wave(&stats_nsc_kernel<scalar_t, acc_t, V>, pl.blocks, stream, x, mean, m2, partial, v.N,
                v.C, v.S, pl.tc, pl.ctiles, pl.splits, pl.seg_len);
  } else {
    launch_wave(&stats_nsc_kernel<scalar_t, acc_t, 1>, pl.blocks, stream, x, mean, m2, partial, v.N,
                v.C, v.S, pl.tc, pl.ctiles, pl.splits, pl.seg_len);
  }
}

template <typename scalar_t, typename acc_t>
void launch_sums(const View3& v, const PassPlan& pl, const scalar_t* dy, PassCoefs<acc_t> pc,
                 acc_t* q, acc_t* p, acc_t* partial, bool vec_ok, cudaStream_t stream) {
  const scalar_t* x = v.x.const_data_ptr<scalar_t>();
  constexpr int V = vec_size<scalar_t>();
  if (!pl.nsc) {
    const int64_t rows = v.N * v.C;
#define L2BN_SUMS_NCS(T)                                                                \
  launch_wave(&sums_ncs_kernel<scalar_t, acc_t, T>, pl.blocks, stream, dy, x, pc, q, p,        \
              partial, rows, v.S, pl.splits, pl.seg_len, vec_ok)
    switch (pl.team) {
      case 4: L2BN_SUMS_NCS(4); break;
      case 8: L2BN_SUMS_NCS(8); break;
      case 16: L2BN_SUMS_NCS(16); break;
      case 32: L2BN_SUMS_NCS(32); break;
      default: L2BN_SUMS_NCS(kThreads); break;
    }
#undef L2BN_SUMS_NCS
  } else if (pl.vec == V) {
    launch_wave(&sums_nsc_kernel<scalar_t, acc_t, V>, pl.blocks, stream, dy, x, pc, q, p, partial,
                v.N, v.C, v.S, pl.tc, pl.ctiles, pl.splits, pl.seg_len);
  } else {
    launch_wave(&sums_nsc_kernel<scalar_t, acc_t, 1>, pl.blocks, stream, dy, x, pc, q, p, partial,
                v.N, v.C, v.S, pl.tc, pl.ctiles, pl.splits, pl.seg_len);
  }
}

// ------------------------------------------------------------------------------- finalize
// Partial of segment j of row `row` (counts recomputed from the plan).
__device__ __forceinline__ int64_t seg_count(int64_t S, int64_t seg_len, int64_t j) {
  int64_t a, b;
  segment(S, seg_len, j, a, b);
  return b - a;
}

// Forward finalize. Phase 0 (a warp per sample): combine the segment partials of its rows, the
// sample norm and scale. Phase 1 (a block per 32-channel tile, kWarps sample lanes): the local
// channel rows, the statistics (local / group rows / eval), the coefficients of every (n, c).
template <typename acc_t>
struct FwdFinalize {
  int64_t N, C, S, splits, seg_len;
  const acc_t* partial;   // segment partials, or nullptr (the pass wrote m / m2)
  const acc_t* m;         // stats planes (read in phase 1)
  const acc_t* m2;
  acc_t* m_out;           // where phase 0 writes combined stats (nullptr: stats are an input)
  acc_t* m2_out;
  const double* rows_all;  // (P, 3, C) group rows, or nullptr
  int64_t P;
  double* rows_out;       // (3, C) local rows, or nullptr
  bool coefs;             // write saved and the apply coefficients (forward / finish)
  ChannelVec mean, var, weight, bias;
  double eps, l2_eps, sqrt_d;
  acc_t* saved;
  acc_t* bmean;
  acc_t* bvar;
  double* inv_r;          // (N,) scratch
  int phase;              // -1: both phases, grid barrier between (cooperative launch)
};

template <typename acc_t>
__device__ void fwd_phase0(const FwdFinalize<acc_t>& f) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t nwarps = int64_t(gridDim.x) * blockDim.x / 32;
  const double Sd = static_cast<double>(f.S);
  const SavedLayout L{f.N, f.C};
  for (int64_t n = warp; n < f.N; n += nwarps) {  // warp-uniform loop
    double nrm2 = 0.0;
    for (int64_t c = lane; c < f.C; c += 32) {
      const int64_t row = n * f.C + c;
      acc_t m, m2;
      if (f.partial != nullptr) {
        ChanRow r{0.0, 0.0, 0.0};
        for (int64_t j = 0; j < f.splits; ++j)
          chan_merge(r, ChanRow{static_cast<double>(seg_count(f.S, f.seg_len, j)),
                                static_cast<double>(f.partial[(row * f.splits + j) * 2]),
                                static_cast<double>(f.partial[(row * f.splits + j) * 2 + 1])});
        m = static_cast<acc_t>(r.mean);
        m2 = static_cast<acc_t>(r.m2);
        f.m_out[row] = m;
        f.m2_out[row] = m2;
      } else if (f.S == 0 && f.m_out != nullptr) {
        m = m2 = acc_t(0);
        f.m_out[row] = m;
        f.m2_out[row] = m2;
      } else {
        m = f.m[row];
        m2 = f.m2[row];
      }
      nrm2 += row_sq_norm(static_cast<double>(m), static_cast<double>(m2), Sd);
    }
    nrm2 = warp_sum(nrm2);
    if (lane == 0) {
      const SampleScale sc = sample_scale(nrm2, f.l2_eps, f.sqrt_d);
      f.inv_r[n] = sc.inv_r;
      if (f.coefs) {
        f.saved[L.r() + n] = static_cast<acc_t>(sc.r);
        f.saved[L.nrm() + n] = static_cast<acc_t>(sc.nrm);
      }
    }
  }
}

template <typename acc_t>
__device__ void fwd_phase1(const FwdFinalize<acc_t>& f) {
  __shared__ double sh[kWarps][kFinTileC];
  __shared__ double shm[kFinTileC];
  __shared__ ChannelCoef shc[kFinTileC];
  const int tc = threadIdx.x % kFinTileC, tn = threadIdx.x / kFinTileC;
  const double Sd = static_cast<double>(f.S), Nd = static_cast<double>(f.N);
  const SavedLayout L{f.N, f.C};
  const bool local = f.rows_out != nullptr || (f.rows_all == nullptr && f.mean.p == nullptr);
  const int64_t tiles = (f.C + kFinTileC - 1) / kFinTileC;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // block-uniform loop
    const int64_t c = tile * kFinTileC + tc;
    const bool valid = c < f.C;
    ChanRow row{0.0, 0.0, 0.0};
    if (local) {  // two passes over n: the mean of u, then its M2
      double su = 0.0;
      if (valid)
        for (int64_t n = tn; n < f.N; n += kWarps) su += u_row_mean(f.m[n * f.C + c], f.inv_r[n]);
      sh[tn][tc] = su;
      __syncthreads();
      if (tn == 0) {
        for (int l = 1; l < kWarps; ++l) su += sh[l][tc];
        shm[tc] = u_channel_mean(su, Nd);
      }
      __syncthreads();
      const double mean = shm[tc];
      double sm = 0.0;
      if (valid)
        for (int64_t n = tn; n < f.N; n += kWarps) {
          const int64_t i = n * f.C + c;
          sm += u_row_m2(f.m2[i], f.inv_r[n], Sd, u_row_mean(f.m[i], f.inv_r[n]), mean);
        }
      __syncthreads();
      sh[tn][tc] = sm;
      __syncthreads();
      if (tn == 0) {
        for (int l = 1; l < kWarps; ++l) sm += sh[l][tc];
        row = ChanRow{Nd * Sd, mean, sm};
      }
    }
    if (tn == 0 && valid) {
      if (f.rows_out != nullptr) {
        f.rows_out[c] = row.n;
        f.rows_out[f.C + c] = row.mean;
        f.rows_out[2 * f.C + c] = row.m2;
      }
      if (f.coefs) {
        double mean, var;
        if (f.mean.p != nullptr) {
          mean = load_channel(f.mean, c, 0.0);
          var = load_channel(f.var, c, 1.0);
        } else {
          if (f.rows_all != nullptr) row = group_row(f.rows_all, f.P, f.C, c);
          mean = row.mean;
          var = row_variance(row);
        }
        const ChannelCoef cc = channel_coef(mean, var, f.eps, load_channel(f.weight, c, 1.0),
                                            load_channel(f.bias, c, 0.0));
        shc[tc] = cc;
        f.bmean[c] = static_cast<acc_t>(mean);
        f.bvar[c] = static_cast<acc_t>(var);
        f.saved[L.inv_s() + c] = static_cast<acc_t>(cc.inv_s);
        if (c == 0) {
          double n_all = Nd;
          if (f.rows_all != nullptr) n_all = group_samples(row, Sd);
          f.saved[L.n_all()] = static_cast<acc_t>(n_all);
        }
      }
    }
    __syncthreads();
    if (f.coefs && valid) {
      const ChannelCoef cc = shc[tc];
      const bool copy = f.m != f.saved + L.center();
      for (int64_t n = tn; n < f.N; n += kWarps) {
        const int64_t i = n * f.C + c;
        const RowCoef rc = forward_row_coef(f.m[i], f.inv_r[n], cc);
        f.saved[L.x_coef() + i] = static_cast<acc_t>(rc.x_coef);
        f.saved[L.offset() + i] = static_cast<acc_t>(rc.offset);
        f.saved[L.cen() + i] = static_cast<acc_t>(rc.cen);
        if (copy) {
          f.saved[L.center() + i] = f.m[i];
          f.saved[L.m2() + i] = f.m2[i];
        }
      }
    }
    __syncthreads();
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) fwd_finalize_kernel(FwdFinalize<acc_t> f) {
  if (f.phase <= 0) fwd_phase0(f);
  if (f.phase < 0) cg::this_grid().sync();
  if (f.phase != 0) fwd_phase1(f);
}

// Backward finalize. Phase 0 (a block per 32-channel tile): combine the segment partials, the
// channel grad rows, dweight / dbias and the du coefficients. Phase 1 (a warp per sample): t_n
// and the dx coefficients of its rows.
template <typename acc_t>
struct BwdFinalize {
  int64_t N, C, S, splits;
  const acc_t* partial;   // segment partials, or nullptr
  acc_t* q;               // sums planes (written by phase 0 from the partials)
  acc_t* p;
  const acc_t* saved;
  double* rows_out;       // (2, C) local grad rows computed here, or nullptr
  const double* rows_in;  // (2, C) local grad rows given (grad_finish), or nullptr
  const double* rows_tot; // (2, C) group totals (training), or nullptr (eval)
  bool tot_is_local;      // training on this batch alone: totals = the local rows
  bool coefs;
  ChannelVec weight;
  acc_t* dweight;
  acc_t* dbias;
  GradChannel* gc;        // (C,) scratch
  acc_t* dx_coef;         // may alias q / p (each sample reads its sums before writing)
  acc_t* dx_offset;
  int phase;
};

template <typename acc_t>
__device__ void bwd_phase0(const BwdFinalize<acc_t>& f) {
  __shared__ double sh[2][kWarps][kFinTileC];
  const int tc = threadIdx.x % kFinTileC, tn = threadIdx.x / kFinTileC;
  const SavedLayout L{f.N, f.C};
  const bool need_sums = f.rows_in == nullptr;
  const int64_t tiles = (f.C + kFinTileC - 1) / kFinTileC;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // block-uniform loop
    const int64_t c = tile * kFinTileC + tc;
    const bool valid = c < f.C;
    double sq = 0.0, sg = 0.0;
    if (need_sums) {
      if (valid)
        for (int64_t n = tn; n < f.N; n += kWarps) {
          const int64_t i = n * f.C + c;
          acc_t qv, pv;
          if (f.partial != nullptr) {
            double a = 0.0, b = 0.0;
            for (int64_t j = 0; j < f.splits; ++j) {
              a += static_cast<double>(f.partial[(i * f.splits + j) * 2]);
              b += static_cast<double>(f.partial[(i * f.splits + j) * 2 + 1]);
            }
            qv = static_cast<acc_t>(a);
            pv = static_cast<acc_t>(b);
            f.q[i] = qv;
            f.p[i] = pv;
          } else {
            qv = f.q[i];
            pv = f.p[i];
          }
          sq += static_cast<double>(qv);
          sg += grad_row_g(pv, qv, 1.0 / static_cast<double>(f.saved[L.r() + n]),
                           f.saved[L.cen() + i]);
        }
      sh[0][tn][tc] = sq;
      sh[1][tn][tc] = sg;
      __syncthreads();
      if (tn == 0)
        for (int l = 1; l < kWarps; ++l) {
          sq += sh[0][l][tc];
          sg += sh[1][l][tc];
        }
    } else if (tn == 0 && valid) {
      sq = f.rows_in[c];
      sg = f.rows_in[f.C + c];
    }
    if (tn == 0 && valid) {
      if (f.rows_out != nullptr) {
        f.rows_out[c] = sq;
        f.rows_out[f.C + c] = sg;
      }
      if (f.coefs) {
        const double is = static_cast<double>(f.saved[L.inv_s() + c]);
        f.dbias[c] = static_cast<acc_t>(sq);
        f.dweight[c] = static_cast<acc_t>(sg * is);
        const bool training = f.tot_is_local || f.rows_tot != nullptr;
        const double tq = f.tot_is_local ? sq : training ? f.rows_tot[c] : 0.0;
        const double tg = f.tot_is_local ? sg : training ? f.rows_tot[f.C + c] : 0.0;
        const double m_count = static_cast<double>(f.saved[L.n_all()]) * static_cast<double>(f.S);
        f.gc[c] = grad_channel(load_channel(f.weight, c, 1.0), is, training, tq, tg, m_count);
      }
    }
    __syncthreads();
  }
}

template <typename acc_t>
__device__ void bwd_phase1(const BwdFinalize<acc_t>& f) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t nwarps = int64_t(gridDim.x) * blockDim.x / 32;
  const double Sd = static_cast<double>(f.S);
  const SavedLayout L{f.N, f.C};
  for (int64_t n = warp; n < f.N; n += nwarps) {  // warp-uniform loop
    const double inv_r = 1.0 / static_cast<double>(f.saved[L.r() + n]);
    double dot = 0.0;
    for (int64_t c = lane; c < f.C; c += 32) {
      const int64_t i = n * f.C + c;
      dot += grad_dot_term(f.gc[c], f.p[i], f.q[i], f.saved[L.center() + i], f.saved[L.m2() + i],
                           inv_r, f.saved[L.cen() + i], Sd);
    }
    dot = warp_sum(dot);
    const double t = grad_sample_t(__shfl_sync(0xffffffffu, dot, 0),
                                   static_cast<double>(f.saved[L.nrm() + n]));
    for (int64_t c = lane; c < f.C; c += 32) {
      const int64_t i = n * f.C + c;
      const GradRowCoef rc =
          backward_row_coef(f.gc[c], t, f.saved[L.center() + i], inv_r, f.saved[L.cen() + i]);
      f.dx_coef[i] = static_cast<acc_t>(rc.dx_coef);
      f.dx_offset[i] = static_cast<acc_t>(rc.dx_offset);
    }
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) bwd_finalize_kernel(BwdFinalize<acc_t> f) {
  if (f.phase <= 0) bwd_phase0(f);
  if (f.phase < 0) cg::this_grid().sync();
  if (f.phase != 0) bwd_phase1(f);
}

// Launch a finalize kernel: both phases in one cooperative launch (grid bounded by what can be
// co-resident on this device), or phase 0 alone, or two plain launches without cooperative
// launch support.
template <typename Params>
void launch_finalize(void (*kernel)(Params), Params prm, int64_t N, int64_t C, bool both,
                     cudaStream_t stream) {
  const int64_t work = std::max<int64_t>(std::max<int64_t>((N + kWarps - 1) / kWarps,
                                                           (C + kFinTileC - 1) / kFinTileC), 1);
  if (!both) {
    prm.phase = 0;
    launch_wave(kernel, work, stream, prm);
    return;
  }
  const int resident_per_sm = cuda::resident_blocks(kernel, kThreads);  // of this device
  if (device_info().cooperative && resident_per_sm > 0) {
    prm.phase = -1;
    const int64_t grid = std::min<int64_t>(work, sm_count() * resident_per_sm);
    launch_cooperative(kernel, grid, kThreads, stream, prm);
    return;
  }
  for (int phase = 0; phase < 2; ++phase) {
    prm.phase = phase;
    launch_wave(kernel, work, stream, prm);
  }
}

// ------------------------------------------------------------------------------- apply
// Forward y = act(pre); backward dx = x_coef g + dx_coef (x - center) + dx_offset. The work items
// and teams of the passes (plan_pass); each work item loads its rows' coefficients once.
template <typename acc_t>
struct RowApply {  // the coefficients of one row
  acc_t center, x_coef, offset, dx_coef, dx_offset;
};

template <typename acc_t>
struct ApplyCoefs {
  PassCoefs<acc_t> f;
  const acc_t* dx_coef;    // backward only
  const acc_t* dx_offset;

  template <bool BWD>
  __device__ __forceinline__ RowApply<acc_t> row(int64_t i) const {
    RowApply<acc_t> r{f.center[i], f.x_coef[i], f.offset[i], acc_t(0), acc_t(0)};
    if constexpr (BWD) {
      r.dx_coef = dx_coef[i];
      r.dx_offset = dx_offset[i];
    }
    return r;
  }
};

template <typename scalar_t, typename acc_t, bool BWD>
__device__ __forceinline__ scalar_t apply_one(const ApplyCoefs<acc_t>& ac, const RowApply<acc_t>& r,
                                              scalar_t xs, scalar_t ds) {
  const acc_t xv = static_cast<acc_t>(xs);
  if constexpr (!BWD) {
    return static_cast<scalar_t>(
        act_forward<acc_t>(ac.f.act, pre_act<acc_t>(xv, r.center, r.x_coef, r.offset), ac.f.slope));
  } else {
    const acc_t dv = static_cast<acc_t>(ds);
    const acc_t pre = pre_act<acc_t>(xv, r.center, r.x_coef, r.offset);  // unused for identity
    const acc_t g =
        ac.f.act == Act::Identity ? dv : act_backward<acc_t>(ac.f.act, pre, ac.f.slope, dv);
    return static_cast<scalar_t>(r.x_coef * g + r.dx_coef * (xv - r.center) + r.dx_offset);
  }
}

// out[i] = f(p[i], q[i]) for the elements [a, b) of one row (q: BWD only), by a team: the order of
// team_row (scalar head up to p's 16-byte boundary, 16-byte vectors, scalar tail); q and out must
// have p's 16-byte phase when vec_ok.
template <typename scalar_t, int TEAM, bool BWD, typename F>
__device__ __forceinline__ void team_row_map(const scalar_t* p, const scalar_t* q, scalar_t* out,
                                             int64_t a, int64_t b, int lane, bool vec_ok, F&& f) {
  constexpr int V = vec_size<scalar_t>();
  using Vec = VecT<scalar_t, V>;
  const int64_t L = b - a;
  int64_t head = L;
  if (vec_ok) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(p + a);
    head = int64_t(((16 - addr % 16) % 16) / sizeof(scalar_t));
    if (head > L) head = L;
  }
  for (int64_t i = a + lane; i < a + head; i += TEAM) out[i] = f(p[i], BWD ? q[i] : scalar_t(0));
  const int64_t nvec = (L - head) / V, v0 = a + head;
  const Vec* pv = reinterpret_cast<const Vec*>(p + v0);
  const Vec* qv = reinterpret_cast<const Vec*>(q + v0);
  Vec* ov = reinterpret_cast<Vec*>(out + v0);
  // one vector at a time: with two in flight around SiLU's IEEE division (a call on its slow
  // path) ptxas spilled the loop state of the float kernels
  for (int64_t i = lane; i < nvec; i += TEAM) {
    const Vec xv = pv[i];
    Vec dv, yv;
    if constexpr (BWD) dv = qv[i];
#pragma unroll
    for (int k = 0; k < V; ++k) yv.v[k] = f(xv.v[k], BWD ? dv.v[k] : scalar_t(0));
    ov[i] = yv;
  }
  for (int64_t i = v0 + nvec * V + lane; i < b; i += TEAM) out[i] = f(p[i], BWD ? q[i] : scalar_t(0));
}

// NCS: a team per (row, segment), as the statistics pass.
template <typename scalar_t, typename acc_t, int TEAM, bool BWD>
__global__ void __launch_bounds__(kThreads)
    apply_ncs_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                     ApplyCoefs<acc_t> ac, scalar_t* __restrict__ out, int64_t rows, int64_t S,
                     int64_t splits, int64_t seg_len, bool vec_ok) {
  constexpr int TEAMS = kThreads / TEAM;
  const int team = threadIdx.x / TEAM, lane = threadIdx.x % TEAM;
  const int64_t items = rows * splits;
  // no barrier inside: each team runs its own loop
  for (int64_t item = int64_t(blockIdx.x) * TEAMS + team; item < items;
       item += int64_t(gridDim.x) * TEAMS) {
    const int64_t row = item / splits;
    int64_t a, b;
    segment(S, seg_len, item % splits, a, b);
    const RowApply<acc_t> rc = ac.template row<BWD>(row);
    team_row_map<scalar_t, TEAM, BWD>(x + row * S, BWD ? dy + row * S : nullptr, out + row * S, a,
                                      b, lane, vec_ok, [&](scalar_t xv, scalar_t dv) {
                                        return apply_one<scalar_t, acc_t, BWD>(ac, rc, xv, dv);
                                      });
  }
}

// NSC: a block is TC channel vectors x TS spatial lanes, as the statistics pass; a thread loads
// the coefficients of its V channels once per work item.
template <typename scalar_t, typename acc_t, int V, bool BWD>
__global__ void __launch_bounds__(kThreads)
    apply_nsc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                     ApplyCoefs<acc_t> ac, scalar_t* __restrict__ out, int64_t N, int64_t C,
                     int64_t S, int TC, int64_t ctiles, int64_t splits, int64_t seg_len) {
  using Vec = VecT<scalar_t, V>;
  const int TS = kThreads / TC;
  const int tc = threadIdx.x % TC, ts = threadIdx.x / TC;
  const int64_t items = N * ctiles * splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t j = item % splits, t = item / splits;
    const int64_t n = t / ctiles, c0 = ((t % ctiles) * TC + tc) * V;
    if (c0 >= C) continue;  // no barrier in this loop
    int64_t a, b;
    segment(S, seg_len, j, a, b);
    RowApply<acc_t> rc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) rc[k] = ac.template row<BWD>(n * C + c0 + k);
    const int64_t base = n * S * C + c0;
    for (int64_t s = a + ts; s < b; s += TS) {
      Vec xv, dv, yv;
      if constexpr (V > 1) {
        xv = *reinterpret_cast<const Vec*>(x + base + s * C);
        if constexpr (BWD) dv = *reinterpret_cast<const Vec*>(dy + base + s * C);
      } else {
        xv.v[0] = x[base + s * C];
        if constexpr (BWD) dv.v[0] = dy[base + s * C];
      }
#pragma unroll
      for (int k = 0; k < V; ++k)
        yv.v[k] = apply_one<scalar_t, acc_t, BWD>(ac, rc[k], xv.v[k], BWD ? dv.v[k] : scalar_t(0));
      if constexpr (V > 1)
        *reinterpret_cast<Vec*>(out + base + s * C) = yv;
      else
        out[base + s * C] = yv.v[0];
    }
  }
}

template <typename scalar_t, typename acc_t, bool BWD>
void launch_apply(const View3& v, const scalar_t* dy, const ApplyCoefs<acc_t>& ac,
                  const at::Tensor& out, cudaStream_t stream) {
  if (out.numel() == 0) return;
  constexpr int V = vec_size<scalar_t>();
  const scalar_t* x = v.x.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  // NCS rows realign per row when x, dy and out share their 16-byte phase; NSC needs all aligned
  const bool vec_ok = v.layout == Layout::NCS
                          ? same_phase16(x, o) && (!BWD || same_phase16(x, dy))
                          : aligned16(x) && aligned16(o) && (!BWD || aligned16(dy));
  const PassPlan pl = plan_pass<scalar_t>(v, vec_ok);
  if (!pl.nsc) {
    const int64_t rows = v.N * v.C;
#define L2BN_APPLY_NCS(T)                                                               \
  launch_wave(&apply_ncs_kernel<scalar_t, acc_t, T, BWD>, pl.blocks, stream, x, dy, ac, o,     \
              rows, v.S, pl.splits, pl.seg_len, vec_ok)
    switch (pl.team) {
      case 4: L2BN_APPLY_NCS(4); break;
      case 8: L2BN_APPLY_NCS(8); break;
      case 16: L2BN_APPLY_NCS(16); break;
      case 32: L2BN_APPLY_NCS(32); break;
      default: L2BN_APPLY_NCS(kThreads); break;
    }
#undef L2BN_APPLY_NCS
  } else if (pl.vec == V) {
    launch_wave(&apply_nsc_kernel<scalar_t, acc_t, V, BWD>, pl.blocks, stream, x, dy, ac, o, v.N,
                v.C, v.S, pl.tc, pl.ctiles, pl.splits, pl.seg_len);
  } else {
    launch_wave(&apply_nsc_kernel<scalar_t, acc_t, 1, BWD>, pl.blocks, stream, x, dy, ac, o, v.N,
                v.C, v.S, pl.tc, pl.ctiles, pl.splits, pl.seg_len);
  }
}

// ------------------------------------------------------------------------------- op bodies
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
using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

double sqrt_d_of(const View3& v, bool rescale) {
  return rescale ? std::sqrt(static_cast<double>(v.C) * static_cast<double>(v.S)) : 1.0;
}

// The statistics pass: stats into (m, m2) directly, or into partials combined by the finalize.
// Returns the partial buffer (undefined when there is one segment per row).
template <typename scalar_t>
at::Tensor run_stats(const View3& v, at::opmath_type<scalar_t>* m, at::opmath_type<scalar_t>* m2,
                     PassPlan& pl, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  pl = plan_pass<scalar_t>(v, aligned16(v.x.const_data_ptr()));
  at::Tensor partial;
  if (v.N * v.C == 0 || v.S == 0) {
    pl.splits = 1;
    return partial;
  }
  if (pl.splits > 1) partial = at::empty({v.N * v.C * pl.splits * 2}, v.x.options().dtype(acc_type(v.x.scalar_type())));
  launch_stats<scalar_t, acc_t>(v, pl, m, m2, partial.defined() ? partial.data_ptr<acc_t>() : nullptr,
                                stream);
  return partial;
}

template <typename scalar_t>
FwdFinalize<at::opmath_type<scalar_t>> fwd_params(const View3& v, const PassPlan& pl,
                                                   const at::Tensor& partial, double eps,
                                                   double l2_eps, bool rescale,
                                                   const at::Tensor& inv_r) {
  using acc_t = at::opmath_type<scalar_t>;
  FwdFinalize<acc_t> f{};
  f.N = v.N;
  f.C = v.C;
  f.S = v.S;
  f.splits = pl.splits;
  f.seg_len = pl.seg_len;
  f.partial = partial.defined() ? partial.const_data_ptr<acc_t>() : nullptr;
  f.eps = eps;
  f.l2_eps = l2_eps;
  f.sqrt_d = sqrt_d_of(v, rescale);
  f.inv_r = inv_r.data_ptr<double>();
  return f;
}

Fwd forward_outputs(const Common& k) {
  const auto opts = k.v.x.options().dtype(k.acc);
  return {at::empty_like(k.v.x), at::empty({k.v.C}, opts), at::empty({k.v.C}, opts),
          at::empty({layout_of(k.v).numel()}, opts)};
}

template <typename scalar_t>
void finish_apply(const Common& k, const at::Tensor& y, const at::Tensor& saved,
                  cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const SavedLayout L = layout_of(k.v);
  const acc_t* sp = saved.const_data_ptr<acc_t>();
  const ApplyCoefs<acc_t> ac{
      {sp + L.center(), sp + L.x_coef(), sp + L.offset(), static_cast<acc_t>(k.slope), k.act},
      nullptr, nullptr};
  launch_apply<scalar_t, acc_t, false>(k.v, nullptr, ac, y, stream);
}

Fwd forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                 const std::optional<at::Tensor>& var, double eps, double l2_eps, bool rescale,
                 c10::string_view act, double act_param) {
  const char* op = "l2bn_forward";
  const c10::cuda::CUDAGuard guard(x.device());
  const Common k = common(x, act, act_param, op);
  TORCH_CHECK_VALUE(mean.has_value() == var.has_value(), op,
                    ": mean and var must both be given (eval) or both be None (training)");
  // named references, not structured bindings (C++17 cannot capture those in the lambdas)
  const Fwd out = forward_outputs(k);
  const at::Tensor &y = std::get<0>(out), &bmean = std::get<1>(out), &bvar = std::get<2>(out),
                   &saved = std::get<3>(out);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor inv_r = at::empty({std::max<int64_t>(k.v.N, 1)}, k.v.x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SavedLayout L = layout_of(k.v);
    acc_t* sp = saved.data_ptr<acc_t>();
    PassPlan pl;
    const at::Tensor partial = run_stats<scalar_t>(k.v, sp + L.center(), sp + L.m2(), pl, stream);
    auto f = fwd_params<scalar_t>(k.v, pl, partial, eps, l2_eps, rescale, inv_r);
    f.m = sp + L.center();
    f.m2 = sp + L.m2();
    f.m_out = sp + L.center();
    f.m2_out = sp + L.m2();
    f.coefs = true;
    f.mean = channel_vec(mean, k.v, op, "mean");
    f.var = channel_vec(var, k.v, op, "var");
    f.weight = channel_vec(weight, k.v, op, "weight");
    f.bias = channel_vec(bias, k.v, op, "bias");
    f.saved = sp;
    f.bmean = bmean.data_ptr<acc_t>();
    f.bvar = bvar.data_ptr<acc_t>();
    launch_finalize(&fwd_finalize_kernel<acc_t>, f, k.v.N, k.v.C, true, stream);
    finish_apply<scalar_t>(k, y, saved, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& x, double l2_eps, bool rescale) {
  const char* op = "l2bn_stats";
  const c10::cuda::CUDAGuard guard(x.device());
  const View3 v = make_view(x, op);
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor stats = at::empty({2, v.N, v.C}, v.x.options().dtype(acc));
  at::Tensor rows = at::empty({kRowFields, v.C}, v.x.options().dtype(at::kDouble));
  const at::Tensor inv_r = at::empty({std::max<int64_t>(v.N, 1)}, v.x.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* m = stats.data_ptr<acc_t>();
    acc_t* m2 = m + v.N * v.C;
    PassPlan pl;
    const at::Tensor partial = run_stats<scalar_t>(v, m, m2, pl, stream);
    auto f = fwd_params<scalar_t>(v, pl, partial, 0.0, l2_eps, rescale, inv_r);
    f.m = m;
    f.m2 = m2;
    f.m_out = m;
    f.m2_out = m2;
    f.rows_out = rows.data_ptr<double>();
    f.coefs = false;
    launch_finalize(&fwd_finalize_kernel<acc_t>, f, v.N, v.C, true, stream);
  });
  return {stats, rows};
}

Fwd finish_cuda(const at::Tensor& x, const at::Tensor& stats_in,
                const std::optional<at::Tensor>& rows_all_in, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mean,
                const std::optional<at::Tensor>& var, double eps, double l2_eps, bool rescale,
                c10::string_view act, double act_param) {
  const char* op = "l2bn_finish";
  const c10::cuda::CUDAGuard guard(x.device());
  const Common k = common(x, act, act_param, op);
  TORCH_CHECK_VALUE(mean.has_value() == var.has_value(), op,
                    ": mean and var must both be given (eval) or both be None");
  TORCH_CHECK_VALUE(!(mean.has_value() && rows_all_in.has_value()), op,
                    ": give rows_all (training over a group) or mean/var (eval), not both");
  const at::Tensor stats = checked(stats_in, {2, k.v.N, k.v.C}, k.acc, k.v, op, "stats");
  at::Tensor rows_all;
  if (rows_all_in.has_value()) rows_all = checked_rows_all(*rows_all_in, kRowFields, k.v, op);
  // named references, not structured bindings (C++17 cannot capture those in the lambdas)
  const Fwd out = forward_outputs(k);
  const at::Tensor &y = std::get<0>(out), &bmean = std::get<1>(out), &bvar = std::get<2>(out),
                   &saved = std::get<3>(out);
  const at::Tensor inv_r = at::empty({std::max<int64_t>(k.v.N, 1)}, k.v.x.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn_finish", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PassPlan pl{};
    pl.splits = 1;
    auto f = fwd_params<scalar_t>(k.v, pl, at::Tensor(), eps, l2_eps, rescale, inv_r);
    f.m = stats.const_data_ptr<acc_t>();
    f.m2 = f.m + k.v.N * k.v.C;
    if (rows_all.defined()) {
      f.rows_all = rows_all.const_data_ptr<double>();
      f.P = rows_all.size(0);
    }
    f.coefs = true;
    f.mean = channel_vec(mean, k.v, op, "mean");
    f.var = channel_vec(var, k.v, op, "var");
    f.weight = channel_vec(weight, k.v, op, "weight");
    f.bias = channel_vec(bias, k.v, op, "bias");
    f.saved = saved.data_ptr<acc_t>();
    f.bmean = bmean.data_ptr<acc_t>();
    f.bvar = bvar.data_ptr<acc_t>();
    launch_finalize(&fwd_finalize_kernel<acc_t>, f, k.v.N, k.v.C, true, stream);
    finish_apply<scalar_t>(k, y, saved, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_stats_cuda(const at::Tensor& x) {
  const char* op = "l2bn_sample_stats";
  const c10::cuda::CUDAGuard guard(x.device());
  const View3 v = make_view(x, op);
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor mean = at::empty({v.N, v.C}, v.x.options().dtype(acc));
  at::Tensor m2 = at::empty({v.N, v.C}, v.x.options().dtype(acc));
  const at::Tensor inv_r = at::empty({std::max<int64_t>(v.N, 1)}, v.x.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn_sample_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PassPlan pl;
    const at::Tensor partial = run_stats<scalar_t>(v, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>(), pl, stream);
    auto f = fwd_params<scalar_t>(v, pl, partial, 0.0, 1e-12, false, inv_r);
    f.m = f.m_out = mean.data_ptr<acc_t>();
    f.m2 = f.m2_out = m2.data_ptr<acc_t>();
    f.coefs = false;
    if (partial.defined() || v.S == 0)  // combine the segments (or zero empty rows) only
      launch_finalize(&fwd_finalize_kernel<acc_t>, f, v.N, v.C, false, stream);
  });
  return {mean, m2};
}

// The gradient-sums pass into (q, p) or partials.
template <typename scalar_t>
at::Tensor run_sums(const Common& k, const at::Tensor& dy, const at::Tensor& saved,
                    at::opmath_type<scalar_t>* q, at::opmath_type<scalar_t>* p, PassPlan& pl,
                    cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const View3& v = k.v;
  const scalar_t* dp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
  // NCS rows realign per row when x and dy share their 16-byte phase; NSC needs both aligned
  const bool vec_ok = v.layout == Layout::NCS ? same_phase16(xp, dp) : aligned16(xp) && aligned16(dp);
  pl = plan_pass<scalar_t>(v, vec_ok);
  at::Tensor partial;
  if (v.N * v.C == 0 || v.S == 0) {
    pl.splits = 1;
    if (v.N * v.C > 0) {  // empty rows: zero sums (no pass to write them)
      at::Tensor qs = at::from_blob(q, {v.N * v.C}, v.x.options().dtype(k.acc));
      at::Tensor ps = at::from_blob(p, {v.N * v.C}, v.x.options().dtype(k.acc));
      qs.zero_();
      ps.zero_();
    }
    return partial;
  }
  if (pl.splits > 1) partial = at::empty({v.N * v.C * pl.splits * 2}, v.x.options().dtype(k.acc));
  const SavedLayout L = layout_of(v);
  const acc_t* sp = saved.const_data_ptr<acc_t>();
  const PassCoefs<acc_t> pc{sp + L.center(), sp + L.x_coef(), sp + L.offset(),
                            static_cast<acc_t>(k.slope), k.act};
  launch_sums<scalar_t, acc_t>(v, pl, dp, pc, q, p,
                               partial.defined() ? partial.data_ptr<acc_t>() : nullptr, vec_ok,
                               stream);
  return partial;
}

template <typename scalar_t>
BwdFinalize<at::opmath_type<scalar_t>> bwd_params(const View3& v, const PassPlan& pl,
                                                   const at::Tensor& partial,
                                                   const at::Tensor& saved) {
  using acc_t = at::opmath_type<scalar_t>;
  BwdFinalize<acc_t> f{};
  f.N = v.N;
  f.C = v.C;
  f.S = v.S;
  f.splits = pl.splits;
  f.partial = partial.defined() ? partial.const_data_ptr<acc_t>() : nullptr;
  f.saved = saved.const_data_ptr<acc_t>();
  return f;
}

Bwd backward_outputs(const Common& k) {
  const auto opts = k.v.x.options().dtype(k.acc);
  return {at::empty_like(k.v.x), at::empty({k.v.C}, opts), at::empty({k.v.C}, opts)};
}

template <typename scalar_t>
void backward_apply(const Common& k, const scalar_t* dy, const at::Tensor& saved,
                    const at::opmath_type<scalar_t>* dxc, const at::opmath_type<scalar_t>* dxo,
                    const at::Tensor& dx, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const SavedLayout L = layout_of(k.v);
  const acc_t* sp = saved.const_data_ptr<acc_t>();
  const ApplyCoefs<acc_t> ac{
      {sp + L.center(), sp + L.x_coef(), sp + L.offset(), static_cast<acc_t>(k.slope), k.act},
      dxc, dxo};
  launch_apply<scalar_t, acc_t, true>(k.v, dy, ac, dx, stream);
}

Bwd backward_cuda(const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const at::Tensor& saved_in, bool training, c10::string_view act, double act_param) {
  const char* op = "l2bn_backward";
  const c10::cuda::CUDAGuard guard(x.device());
  const Common k = common(x, act, act_param, op);
  const at::Tensor dy = match_layout(dy_in, k.v, op, "dy");
  const at::Tensor saved = checked_saved(saved_in, k.v, op);
  const Bwd out = backward_outputs(k);
  const at::Tensor &dx = std::get<0>(out), &dweight = std::get<1>(out), &dbias = std::get<2>(out);
  const int64_t NC = k.v.N * k.v.C;
  at::Tensor sums = at::empty({std::max<int64_t>(2 * NC, 1)}, k.v.x.options().dtype(k.acc));
  at::Tensor gc = at::empty({std::max<int64_t>(3 * k.v.C, 1)}, k.v.x.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* q = sums.data_ptr<acc_t>();
    acc_t* p = q + NC;
    PassPlan pl;
    const at::Tensor partial = run_sums<scalar_t>(k, dy, saved, q, p, pl, stream);
    auto f = bwd_params<scalar_t>(k.v, pl, partial, saved);
    f.q = q;
    f.p = p;
    f.tot_is_local = training;
    f.coefs = true;
    f.weight = channel_vec(weight, k.v, op, "weight");
    f.dweight = dweight.data_ptr<acc_t>();
    f.dbias = dbias.data_ptr<acc_t>();
    f.gc = reinterpret_cast<GradChannel*>(gc.data_ptr<double>());
    f.dx_coef = q;  // in place: phase 1 reads each sample's sums before writing them
    f.dx_offset = p;
    launch_finalize(&bwd_finalize_kernel<acc_t>, f, k.v.N, k.v.C, true, stream);
    backward_apply<scalar_t>(k, dy.const_data_ptr<scalar_t>(), saved, q, p, dx, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grad_stats_cuda(const at::Tensor& dy_in, const at::Tensor& x,
                                                   const at::Tensor& saved_in, c10::string_view act,
                                                   double act_param) {
  const char* op = "l2bn_grad_stats";
  const c10::cuda::CUDAGuard guard(x.device());
  const Common k = common(x, act, act_param, op);
  const at::Tensor dy = match_layout(dy_in, k.v, op, "dy");
  const at::Tensor saved = checked_saved(saved_in, k.v, op);
  at::Tensor sums = at::empty({2, k.v.N, k.v.C}, k.v.x.options().dtype(k.acc));
  at::Tensor rows = at::empty({kGradRowFields, k.v.C}, k.v.x.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn_grad_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* q = sums.data_ptr<acc_t>();
    acc_t* p = q + k.v.N * k.v.C;
    PassPlan pl;
    const at::Tensor partial = run_sums<scalar_t>(k, dy, saved, q, p, pl, stream);
    auto f = bwd_params<scalar_t>(k.v, pl, partial, saved);
    f.q = q;
    f.p = p;
    f.rows_out = rows.data_ptr<double>();
    f.coefs = false;
    launch_finalize(&bwd_finalize_kernel<acc_t>, f, k.v.N, k.v.C, false, stream);
  });
  return {sums, rows};
}

Bwd grad_finish_cuda(const at::Tensor& dy_in, const at::Tensor& x,
                     const std::optional<at::Tensor>& weight, const at::Tensor& saved_in,
                     const at::Tensor& sums_in, const at::Tensor& rows_in,
                     const std::optional<at::Tensor>& rows_all_in, c10::string_view act,
                     double act_param) {
  const char* op = "l2bn_grad_finish";
  const c10::cuda::CUDAGuard guard(x.device());
  const Common k = common(x, act, act_param, op);
  const at::Tensor dy = match_layout(dy_in, k.v, op, "dy");
  const at::Tensor saved = checked_saved(saved_in, k.v, op);
  const at::Tensor sums = checked(sums_in, {2, k.v.N, k.v.C}, k.acc, k.v, op, "sums");
  const at::Tensor rows = checked(rows_in, {kGradRowFields, k.v.C}, at::kDouble, k.v, op, "rows");
  at::Tensor rows_all;
  if (rows_all_in.has_value())
    rows_all = checked(*rows_all_in, {kGradRowFields, k.v.C}, at::kDouble, k.v, op, "rows_all");
  const Bwd out = backward_outputs(k);
  const at::Tensor &dx = std::get<0>(out), &dweight = std::get<1>(out), &dbias = std::get<2>(out);
  const int64_t NC = k.v.N * k.v.C;
  at::Tensor coef = at::empty({std::max<int64_t>(2 * NC, 1)}, k.v.x.options().dtype(k.acc));
  at::Tensor gc = at::empty({std::max<int64_t>(3 * k.v.C, 1)}, k.v.x.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.v.x.scalar_type(), "l2bn_grad_finish", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PassPlan pl{};
    pl.splits = 1;
    auto f = bwd_params<scalar_t>(k.v, pl, at::Tensor(), saved);
    // read only (rows_in is given, so phase 0 does not write the sums)
    f.q = const_cast<acc_t*>(sums.const_data_ptr<acc_t>());
    f.p = f.q + NC;
    f.rows_in = rows.const_data_ptr<double>();
    f.rows_tot = rows_all.defined() ? rows_all.const_data_ptr<double>() : nullptr;
    f.coefs = true;
    f.weight = channel_vec(weight, k.v, op, "weight");
    f.dweight = dweight.data_ptr<acc_t>();
    f.dbias = dbias.data_ptr<acc_t>();
    f.gc = reinterpret_cast<GradChannel*>(gc.data_ptr<double>());
    f.dx_coef = coef.data_ptr<acc_t>();
    f.dx_offset = f.dx_coef + NC;
    launch_finalize(&bwd_finalize_kernel<acc_t>, f, k.v.N, k.v.C, true, stream);
    backward_apply<scalar_t>(k, dy.const_data_ptr<scalar_t>(), saved, f.dx_coef, f.dx_offset, dx,
                             stream);
  });
  return out;
}

}  // namespace
}  // namespace l2bn
}  // namespace normkernels

TORCH_LIBRARY_IMPL(NORMKERNELS_LIBRARY, NORMKERNELS_CUDA_KEY, m) {
  m.impl("l2bn_forward", &normkernels::l2bn::forward_cuda);
  m.impl("l2bn_backward", &normkernels::l2bn::backward_cuda);
  m.impl("l2bn_stats", &normkernels::l2bn::stats_cuda);
  m.impl("l2bn_finish", &normkernels::l2bn::finish_cuda);
  m.impl("l2bn_grad_stats", &normkernels::l2bn::grad_stats_cuda);
  m.impl("l2bn_grad_finish", &normkernels::l2bn::grad_finish_cuda);
  m.impl("l2bn_sample_stats", &normkernels::l2bn::sample_stats_cuda);
}
