// L2BN pass kernels, CUDA. x is viewed as (N, C, S) in layout NCS (rows of S contiguous values)
// or NSC (channels_last: for each n an S x C row-major block).
//
// Reductions (sample stats, backward sums): one block per (row, segment) for NCS, one block per
// (n, 32-channel tile, segment) for NSC; rows are split into segments when N*C is small so the
// GPU fills up. Segment partials go to a buffer and a second kernel combines them per row in a
// fixed order: deterministic, no float atomics. Accumulation in float (double for double);
// statistics use per-thread Welford on vector chunks and Chan's formula across threads/blocks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../l2bn.h"

namespace normkernels {
namespace l2bn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileC = 32;                 // NSC: channels per block (one warp wide)
constexpr int kTileS = kThreads / kTileC;  // NSC: spatial lanes per block

template <typename T, int V>
struct alignas(sizeof(T) * V) VecT {
  T v[V];
};

template <typename scalar_t>
__host__ __device__ constexpr int vec_size() {
  return 16 / sizeof(scalar_t) > 0 ? int(16 / sizeof(scalar_t)) : 1;
}

int num_sms() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return std::max(sms, 1);
}

// Number of segments per row: enough blocks to fill the GPU, segments of >= min_seg elements.
int64_t choose_splits(int64_t rows, int64_t S, int64_t min_seg) {
  const int64_t target = int64_t(num_sms()) * 4;
  if (rows >= target) return 1;
  int64_t splits = (target + rows - 1) / rows;
  const int64_t max_splits = std::max<int64_t>(1, S / std::max<int64_t>(1, min_seg));
  splits = std::min(splits, max_splits);
  return std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
}

// How the reduction passes cut each row's S elements into segments (one block each).
struct SplitPlan {
  int64_t splits, seg_len;
};
SplitPlan plan_splits(const View3& v, int V) {
  const int64_t work_rows = v.layout == Layout::NCS ? v.N * v.C : v.N * ((v.C + kTileC - 1) / kTileC);
  const int64_t min_seg = v.layout == Layout::NCS ? int64_t(kThreads) * V * 4 : int64_t(kTileS) * 16;
  const int64_t splits = choose_splits(work_rows, v.S, min_seg);
  const int64_t seg_len = ((v.S + splits - 1) / splits + V - 1) / V * V;  // vector-aligned starts
  return {splits, seg_len};
}

// --------------------------------------------------------------------------- Welford / Chan
template <typename acc_t>
struct Stat {
  acc_t n, mean, m2;
};

template <typename acc_t>
__device__ __forceinline__ Stat<acc_t> chan(Stat<acc_t> a, Stat<acc_t> b) {
  const acc_t n = a.n + b.n;
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t delta = b.mean - a.mean;
  const acc_t w = b.n / n;
  Stat<acc_t> r;
  r.n = n;
  r.mean = a.mean + delta * w;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * w;
  return r;
}

template <typename acc_t>
__device__ __forceinline__ void welford(Stat<acc_t>& s, acc_t x) {
  s.n += acc_t(1);
  const acc_t d = x - s.mean;
  s.mean += d / s.n;
  s.m2 += d * (x - s.mean);
}

template <typename acc_t>
__device__ __forceinline__ Stat<acc_t> shfl_down(Stat<acc_t> s, int off) {
  Stat<acc_t> o;
  o.n = __shfl_down_sync(0xffffffffu, s.n, off);
  o.mean = __shfl_down_sync(0xffffffffu, s.mean, off);
  o.m2 = __shfl_down_sync(0xffffffffu, s.m2, off);
  return o;
}

// Block-wide Chan reduction (fixed tree: deterministic). Result valid in thread 0.
template <typename acc_t>
__device__ Stat<acc_t> block_reduce_stat(Stat<acc_t> s) {
  __shared__ acc_t sh[3][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off >>= 1) s = chan(s, shfl_down(s, off));
  if (lane == 0) {
    sh[0][warp] = s.n;
    sh[1][warp] = s.mean;
    sh[2][warp] = s.m2;
  }
  __syncthreads();
  if (warp == 0) {
    Stat<acc_t> t{acc_t(0), acc_t(0), acc_t(0)};
    if (lane < kWarps) t = Stat<acc_t>{sh[0][lane], sh[1][lane], sh[2][lane]};
    for (int off = 16; off > 0; off >>= 1) t = chan(t, shfl_down(t, off));
    s = t;
  }
  return s;
}

// Block-wide sum of two values (fixed tree). Result valid in thread 0.
template <typename acc_t>
__device__ void block_reduce_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t sh[2][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
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
    a = lane < kWarps ? sh[0][lane] : acc_t(0);
    b = lane < kWarps ? sh[1][lane] : acc_t(0);
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

__host__ __device__ __forceinline__ void segment(int64_t S, int64_t seg_len, int64_t j, int64_t& a,
                                                 int64_t& b) {
  a = j * seg_len;
  b = a + seg_len < S ? a + seg_len : S;
  if (a > S) a = S;
}

// --------------------------------------------------------------------------- sample stats
// NCS: grid.x = rows * splits; partial[(row * splits + j) * 2 + {0,1}] = (mean, m2) of segment j.
template <typename scalar_t, typename acc_t>
__global__ void stats_ncs_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ out_mean,
                                 acc_t* __restrict__ out_m2, acc_t* __restrict__ partial,
                                 int64_t S, int64_t splits, int64_t seg_len) {
  constexpr int V = vec_size<scalar_t>();
  const int64_t blk = blockIdx.x;
  const int64_t row = blk / splits, j = blk % splits;
  int64_t a, b;
  segment(S, seg_len, j, a, b);
  const scalar_t* p = x + row * S;
  Stat<acc_t> st{acc_t(0), acc_t(0), acc_t(0)};
  // scalar head up to 16-byte alignment, vector body, scalar tail
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p + a);
  int64_t head = int64_t(((16 - (addr % 16)) % 16) / sizeof(scalar_t));
  if (addr % sizeof(scalar_t) != 0) head = b - a;  // cannot happen for valid tensors
  head = head < b - a ? head : b - a;
  for (int64_t i = a + threadIdx.x; i < a + head; i += blockDim.x)
    welford(st, static_cast<acc_t>(p[i]));
  const int64_t body = ((b - a - head) / V) * V;
  const VecT<scalar_t, V>* pv = reinterpret_cast<const VecT<scalar_t, V>*>(p + a + head);
  for (int64_t i = threadIdx.x; i < body / V; i += blockDim.x) {
    const VecT<scalar_t, V> v = pv[i];
    acc_t vals[V];
    acc_t m = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      vals[k] = static_cast<acc_t>(v.v[k]);
      m += vals[k];
    }
    m /= acc_t(V);
    acc_t q = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) q += (vals[k] - m) * (vals[k] - m);
    st = chan(st, Stat<acc_t>{acc_t(V), m, q});
  }
  for (int64_t i = a + head + body + threadIdx.x; i < b; i += blockDim.x)
    welford(st, static_cast<acc_t>(p[i]));
  st = block_reduce_stat(st);
  if (threadIdx.x == 0) {
    if (splits == 1) {
      out_mean[row] = st.mean;
      out_m2[row] = st.m2;
    } else {
      partial[blk * 2] = st.mean;
      partial[blk * 2 + 1] = st.m2;
    }
  }
}

// NSC: grid.x = N * ctiles * splits; block = (32 channels) x (8 spatial lanes).
template <typename scalar_t, typename acc_t>
__global__ void stats_nsc_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ out_mean,
                                 acc_t* __restrict__ out_m2, acc_t* __restrict__ partial,
                                 int64_t C, int64_t S, int64_t ctiles, int64_t splits,
                                 int64_t seg_len) {
  const int64_t blk = blockIdx.x;
  const int64_t j = blk % splits;
  const int64_t t = blk / splits;
  const int64_t n = t / ctiles, c0 = (t % ctiles) * kTileC;
  const int tc = threadIdx.x % kTileC, ts = threadIdx.x / kTileC;
  const int64_t c = c0 + tc;
  int64_t a, b;
  segment(S, seg_len, j, a, b);
  Stat<acc_t> st{acc_t(0), acc_t(0), acc_t(0)};
  if (c < C) {
    const scalar_t* p = x + n * S * C + c;
    for (int64_t s = a + ts; s < b; s += kTileS) welford(st, static_cast<acc_t>(p[s * C]));
  }
  __shared__ acc_t sh[3][kTileS][kTileC];
  sh[0][ts][tc] = st.n;
  sh[1][ts][tc] = st.mean;
  sh[2][ts][tc] = st.m2;
  __syncthreads();
  if (ts == 0 && c < C) {
    for (int k = 1; k < kTileS; ++k) st = chan(st, Stat<acc_t>{sh[0][k][tc], sh[1][k][tc], sh[2][k][tc]});
    const int64_t row = n * C + c;
    if (splits == 1) {
      out_mean[row] = st.mean;
      out_m2[row] = st.m2;
    } else {
      partial[(row * splits + j) * 2] = st.mean;
      partial[(row * splits + j) * 2 + 1] = st.m2;
    }
  }
}

// Combine the segment partials of each row in order (counts recomputed from S, seg_len).
template <typename acc_t>
__global__ void stats_combine_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out_mean,
                                     acc_t* __restrict__ out_m2, int64_t rows, int64_t S,
                                     int64_t splits, int64_t seg_len) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  Stat<acc_t> st{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t j = 0; j < splits; ++j) {
    int64_t a, b;
    segment(S, seg_len, j, a, b);
    st = chan(st, Stat<acc_t>{acc_t(b - a), partial[(row * splits + j) * 2],
                              partial[(row * splits + j) * 2 + 1]});
  }
  out_mean[row] = st.mean;
  out_m2[row] = st.m2;
}

// --------------------------------------------------------------------------- backward sums
template <typename scalar_t, typename acc_t>
__global__ void sums_ncs_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                const acc_t* __restrict__ center, acc_t* __restrict__ out_pc,
                                acc_t* __restrict__ out_q, acc_t* __restrict__ partial, int64_t S,
                                int64_t splits, int64_t seg_len, bool vec_ok) {
  constexpr int V = vec_size<scalar_t>();
  const int64_t blk = blockIdx.x;
  const int64_t row = blk / splits, j = blk % splits;
  int64_t a, b;
  segment(S, seg_len, j, a, b);
  const scalar_t* px = x + row * S;
  const scalar_t* pd = dy + row * S;
  const acc_t ctr = center[row];
  acc_t spc = 0, sq = 0;
  int64_t done = a;
  // vectorized when both rows are 16-byte aligned at the segment start (seg_len % V == 0)
  if (vec_ok && reinterpret_cast<uintptr_t>(px + a) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(pd + a) % 16 == 0) {
    const int64_t body = ((b - a) / V) * V;
    const VecT<scalar_t, V>* vx = reinterpret_cast<const VecT<scalar_t, V>*>(px + a);
    const VecT<scalar_t, V>* vd = reinterpret_cast<const VecT<scalar_t, V>*>(pd + a);
    for (int64_t i = threadIdx.x; i < body / V; i += blockDim.x) {
      const VecT<scalar_t, V> xv = vx[i], dv = vd[i];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t d = static_cast<acc_t>(dv.v[k]);
        sq += d;
        spc += d * (static_cast<acc_t>(xv.v[k]) - ctr);
      }
    }
    done = a + body;
  }
  for (int64_t i = done + threadIdx.x; i < b; i += blockDim.x) {
    const acc_t d = static_cast<acc_t>(pd[i]);
    sq += d;
    spc += d * (static_cast<acc_t>(px[i]) - ctr);
  }
  block_reduce_sum2(spc, sq);
  if (threadIdx.x == 0) {
    if (splits == 1) {
      out_pc[row] = spc;
      out_q[row] = sq;
    } else {
      partial[blk * 2] = spc;
      partial[blk * 2 + 1] = sq;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sums_nsc_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                const acc_t* __restrict__ center, acc_t* __restrict__ out_pc,
                                acc_t* __restrict__ out_q, acc_t* __restrict__ partial, int64_t C,
                                int64_t S, int64_t ctiles, int64_t splits, int64_t seg_len) {
  const int64_t blk = blockIdx.x;
  const int64_t j = blk % splits;
  const int64_t t = blk / splits;
  const int64_t n = t / ctiles, c0 = (t % ctiles) * kTileC;
  const int tc = threadIdx.x % kTileC, ts = threadIdx.x / kTileC;
  const int64_t c = c0 + tc;
  int64_t a, b;
  segment(S, seg_len, j, a, b);
  acc_t spc = 0, sq = 0;
  if (c < C) {
    const acc_t ctr = center[n * C + c];
    const scalar_t* px = x + n * S * C + c;
    const scalar_t* pd = dy + n * S * C + c;
    for (int64_t s = a + ts; s < b; s += kTileS) {
      const acc_t d = static_cast<acc_t>(pd[s * C]);
      sq += d;
      spc += d * (static_cast<acc_t>(px[s * C]) - ctr);
    }
  }
  __shared__ acc_t sh[2][kTileS][kTileC];
  sh[0][ts][tc] = spc;
  sh[1][ts][tc] = sq;
  __syncthreads();
  if (ts == 0 && c < C) {
    for (int k = 1; k < kTileS; ++k) {
      spc += sh[0][k][tc];
      sq += sh[1][k][tc];
    }
    const int64_t row = n * C + c;
    if (splits == 1) {
      out_pc[row] = spc;
      out_q[row] = sq;
    } else {
      partial[(row * splits + j) * 2] = spc;
      partial[(row * splits + j) * 2 + 1] = sq;
    }
  }
}

template <typename acc_t>
__global__ void sums_combine_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out_pc,
                                    acc_t* __restrict__ out_q, int64_t rows, int64_t splits) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  acc_t spc = 0, sq = 0;
  for (int64_t j = 0; j < splits; ++j) {
    spc += partial[(row * splits + j) * 2];
    sq += partial[(row * splits + j) * 2 + 1];
  }
  out_pc[row] = spc;
  out_q[row] = sq;
}

// --------------------------------------------------------------------------- apply
// Each thread handles groups of V consecutive elements. VEC: x/dy/out 16-byte aligned and the
// group stays in one row (NCS: S % V == 0) or one (n, s) row of channels (NSC: C % V == 0).
template <typename scalar_t, typename acc_t, bool NSC, bool HAS_DY, int V>
__global__ void apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                             const acc_t* __restrict__ center, const acc_t* __restrict__ xa,
                             const acc_t* __restrict__ off, const acc_t* __restrict__ dc,
                             scalar_t* __restrict__ out, int64_t numel, int64_t C, int64_t S) {
  const int64_t groups = numel / V;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t i0 = g * V;
    VecT<scalar_t, V> xv = reinterpret_cast<const VecT<scalar_t, V>*>(x)[g];
    VecT<scalar_t, V> dv;
    if constexpr (HAS_DY) dv = reinterpret_cast<const VecT<scalar_t, V>*>(dy)[g];
    VecT<scalar_t, V> ov;
    int64_t row0;
    if constexpr (NSC) {
      const int64_t c0 = i0 % C, n = i0 / (S * C);
      row0 = n * C + c0;
    } else {
      row0 = i0 / S;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t row = NSC ? row0 + k : row0;
      acc_t val = xa[row] * (static_cast<acc_t>(xv.v[k]) - center[row]) + off[row];
      if constexpr (HAS_DY) val += dc[row] * static_cast<acc_t>(dv.v[k]);
      ov.v[k] = static_cast<scalar_t>(val);
    }
    reinterpret_cast<VecT<scalar_t, V>*>(out)[g] = ov;
  }
}

template <typename scalar_t, typename acc_t, bool NSC, bool HAS_DY>
void launch_apply(const scalar_t* x, const scalar_t* dy, const acc_t* center, const acc_t* xa,
                  const acc_t* off, const acc_t* dc, scalar_t* out, int64_t numel, int64_t C,
                  int64_t S, cudaStream_t stream) {
  constexpr int V = vec_size<scalar_t>();
  auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = aligned(x) && aligned(dy) && aligned(out) && numel % V == 0 &&
                   (NSC ? C % V == 0 : S % V == 0);
  const int64_t max_blocks = int64_t(num_sms()) * 32;
  if (vec) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((numel / V + kThreads - 1) / kThreads, max_blocks));
    apply_kernel<scalar_t, acc_t, NSC, HAS_DY, V>
        <<<blocks, kThreads, 0, stream>>>(x, dy, center, xa, off, dc, out, numel, C, S);
  } else {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, max_blocks));
    apply_kernel<scalar_t, acc_t, NSC, HAS_DY, 1>
        <<<blocks, kThreads, 0, stream>>>(x, dy, center, xa, off, dc, out, numel, C, S);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --------------------------------------------------------------------------- host wrappers
std::tuple<at::Tensor, at::Tensor> sample_stats_cuda(const at::Tensor& x_in) {
  const char* op = "l2bn_sample_stats";
  View3 v = make_view(x_in, op);
  const c10::cuda::CUDAGuard guard(v.x.device());
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor mean = at::zeros({v.N, v.C}, v.x.options().dtype(acc));
  at::Tensor m2 = at::zeros({v.N, v.C}, v.x.options().dtype(acc));
  const int64_t rows = v.N * v.C;
  if (rows == 0 || v.S == 0) return {mean, m2};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn_sample_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const SplitPlan plan = plan_splits(v, V);
    const int64_t splits = plan.splits, seg_len = plan.seg_len;
    at::Tensor partial;
    acc_t* pp = nullptr;
    if (splits > 1) {
      partial = at::empty({rows * splits * 2}, v.x.options().dtype(acc));
      pp = partial.data_ptr<acc_t>();
    }
    if (v.layout == Layout::NCS) {
      stats_ncs_kernel<scalar_t, acc_t><<<rows * splits, kThreads, 0, stream>>>(
          xp, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>(), pp, v.S, splits, seg_len);
    } else {
      const int64_t ctiles = (v.C + kTileC - 1) / kTileC;
      stats_nsc_kernel<scalar_t, acc_t><<<v.N * ctiles * splits, kThreads, 0, stream>>>(
          xp, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>(), pp, v.C, v.S, ctiles, splits, seg_len);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      stats_combine_kernel<acc_t><<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          pp, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>(), rows, v.S, splits, seg_len);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor> backward_sums_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                      const at::Tensor& center_in) {
  const char* op = "l2bn_backward_sums";
  View3 v = make_view(x_in, op);
  const c10::cuda::CUDAGuard guard(v.x.device());
  at::Tensor dy = match_layout(dy_in, v, op, "dy");
  at::Tensor center = coef(center_in, v, op, "center");
  const auto acc = acc_type(v.x.scalar_type());
  at::Tensor pc = at::zeros({v.N, v.C}, v.x.options().dtype(acc));
  at::Tensor q = at::zeros({v.N, v.C}, v.x.options().dtype(acc));
  const int64_t rows = v.N * v.C;
  if (rows == 0 || v.S == 0) return {pc, q};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn_backward_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = vec_size<scalar_t>();
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    const SplitPlan plan = plan_splits(v, V);
    const int64_t splits = plan.splits, seg_len = plan.seg_len;
    at::Tensor partial;
    acc_t* pp = nullptr;
    if (splits > 1) {
      partial = at::empty({rows * splits * 2}, v.x.options().dtype(acc));
      pp = partial.data_ptr<acc_t>();
    }
    if (v.layout == Layout::NCS) {
      sums_ncs_kernel<scalar_t, acc_t><<<rows * splits, kThreads, 0, stream>>>(
          dp, xp, center.const_data_ptr<acc_t>(), pc.data_ptr<acc_t>(), q.data_ptr<acc_t>(), pp,
          v.S, splits, seg_len, v.S % V == 0);
    } else {
      const int64_t ctiles = (v.C + kTileC - 1) / kTileC;
      sums_nsc_kernel<scalar_t, acc_t><<<v.N * ctiles * splits, kThreads, 0, stream>>>(
          dp, xp, center.const_data_ptr<acc_t>(), pc.data_ptr<acc_t>(), q.data_ptr<acc_t>(), pp,
          v.C, v.S, ctiles, splits, seg_len);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      sums_combine_kernel<acc_t><<<(rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          pp, pc.data_ptr<acc_t>(), q.data_ptr<acc_t>(), rows, splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {pc, q};
}

at::Tensor apply_cuda(const at::Tensor& x_in, const at::Tensor& center_in, const at::Tensor& x_coef_in,
                      const at::Tensor& offset_in, const std::optional<at::Tensor>& dy_in,
                      const std::optional<at::Tensor>& dy_coef_in) {
  const ApplyArgs args = apply_args(x_in, center_in, x_coef_in, offset_in, dy_in, dy_coef_in);
  const View3& v = args.v;
  const at::Tensor &center = args.center, &a = args.x_coef, &b = args.offset, &dy = args.dy,
                   &d = args.dy_coef;
  const bool has_dy = args.has_dy;
  const c10::cuda::CUDAGuard guard(v.x.device());
  at::Tensor out = at::empty_like(v.x);
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "l2bn_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = v.x.const_data_ptr<scalar_t>();
    const scalar_t* dp = has_dy ? dy.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* cp = center.const_data_ptr<acc_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const acc_t* dcp = has_dy ? d.const_data_ptr<acc_t>() : nullptr;
    scalar_t* outp = out.data_ptr<scalar_t>();
    if (v.layout == Layout::NCS) {
      if (has_dy)
        launch_apply<scalar_t, acc_t, false, true>(xp, dp, cp, ap, bp, dcp, outp, numel, v.C, v.S, stream);
      else
        launch_apply<scalar_t, acc_t, false, false>(xp, dp, cp, ap, bp, dcp, outp, numel, v.C, v.S, stream);
    } else {
      if (has_dy)
        launch_apply<scalar_t, acc_t, true, true>(xp, dp, cp, ap, bp, dcp, outp, numel, v.C, v.S, stream);
      else
        launch_apply<scalar_t, acc_t, true, false>(xp, dp, cp, ap, bp, dcp, outp, numel, v.C, v.S, stream);
    }
  });
  return out;
}

}  // namespace
}  // namespace l2bn
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, CUDA, m) {
  m.impl("l2bn_sample_stats", &normkernels::l2bn::sample_stats_cuda);
  m.impl("l2bn_backward_sums", &normkernels::l2bn::backward_sums_cuda);
  m.impl("l2bn_apply", &normkernels::l2bn::apply_cuda);
}
