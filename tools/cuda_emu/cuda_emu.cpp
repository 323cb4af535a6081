// The runtime of tools/cuda_emu/cuda_emu.h (execution model described there).
#include "cuda_emu.h"

#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

// The bounds of the __shared__ section (defined by the linker for a section named like a C
// identifier).
extern "C" char __start_nk_emu_shared[] __attribute__((weak));
extern "C" char __stop_nk_emu_shared[] __attribute__((weak));

namespace nk_emu {

// ------------------------------------------------------------------------------- devices
namespace {
// 0: the default; 1: one SM (the most grid-stride iterations); 2: no cooperative launch (the
// finalize's two-launch path).
const Device kDevices[] = {{2, 2, true}, {1, 1, true}, {3, 2, false}};
int g_device = 0;
}  // namespace

int device_count() { return static_cast<int>(sizeof(kDevices) / sizeof(kDevices[0])); }
const Device& device(int index) {
  TORCH_CHECK(index >= 0 && index < device_count(), "no emulated device ", index);
  return kDevices[index];
}
void set_device(int index) {
  device(index);
  g_device = index;
}
int current_device() { return g_device; }

}  // namespace nk_emu

const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid value";
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev < 0 || dev >= nk_emu::device_count()) return cudaErrorInvalidValue;
  const nk_emu::Device& d = nk_emu::device(dev);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = d.cooperative ? 1 : 0; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel,
                                                         int block, size_t) {
  if (kernel == nullptr || block <= 0 || block > 1024) return cudaErrorInvalidValue;
  *blocks = nk_emu::device(nk_emu::current_device()).blocks_per_sm;
  return cudaSuccess;
}

namespace nk_emu {
namespace {

enum class State { Ready, Running, AtBarrier, AtShuffle, AtGridSync, Done };

const char* state_name(State s) {
  switch (s) {
    case State::Ready: return "ready";
    case State::Running: return "running";
    case State::AtBarrier: return "__syncthreads";
    case State::AtShuffle: return "a warp shuffle";
    case State::AtGridSync: return "grid sync";
    default: return "exited";
  }
}

struct AbortLaunch {};  // unwinds a thread's kernel code when the launch fails

struct Warp {
  int arrived = 0, gen = 0;
  uint64_t words[2][32] = {};  // by generation parity: one barrier per exchange suffices
};

struct Block {
  int64_t index = 0;
  int live = 0, arrived = 0, gen = 0;
  const char* barrier_file = nullptr;  // the __syncthreads the first arrival of this round is at
  int barrier_line = 0;
  std::vector<Warp> warps;
  std::deque<int> runq;        // slots ready to run, in the order they run
  std::vector<char> shared;    // this block's __shared__ bytes while another block runs
};

struct Thread {
  State state = State::Ready;
  const char* shuffle = "";  // which shuffle it waits at (for the deadlock report)
  bool started = false;
  int block = 0;  // index into Wave::blocks
  int tid = 0;
};

// Blocks running at the same time (one block, or a whole cooperative grid).
struct Wave {
  bool cooperative = false;
  int block_threads = 0;
  dim3 grid_dim, block_dim;
  const std::function<void()>* body = nullptr;
  std::vector<Block> blocks;
  std::vector<Thread> threads;  // by slot
  int grid_arrived = 0, grid_gen = 0, live = 0;
  int shared_owner = -1;        // block whose bytes are in the section
  bool abort = false;
  std::string error;
};

struct Worker {
  std::condition_variable cv;
};

std::mutex g_mu;           // guards everything below
std::mutex g_launch_mu;    // one launch at a time (the __shared__ section is global)
std::condition_variable g_host_cv;
std::vector<Worker*> g_workers;  // by slot; never freed (threads outlive static destructors)
Wave* g_wave = nullptr;
int g_turn = -1;           // slot holding the baton
thread_local ThreadCtx t_ctx;

size_t shared_bytes() {
  if (__start_nk_emu_shared == nullptr) return 0;
  return static_cast<size_t>(__stop_nk_emu_shared - __start_nk_emu_shared);
}

void fail(Wave& w, const std::string& msg) {
  if (!w.abort) {
    w.abort = true;
    w.error = msg;
  }
  for (size_t s = 0; s < w.threads.size(); ++s) g_workers[s]->cv.notify_one();
  g_host_cv.notify_all();
}

std::string where(const Wave& w) {
  std::ostringstream os;
  int shown = 0;
  for (size_t s = 0; s < w.threads.size() && shown < 12; ++s) {
    const Thread& t = w.threads[s];
    if (t.state == State::Done) continue;
    os << "\n  block " << w.blocks[t.block].index << " thread " << t.tid << ": at "
       << (t.state == State::AtShuffle ? t.shuffle : state_name(t.state));
    ++shown;
  }
  return os.str();
}

// Pass the baton: the next ready thread of block `from` (or of the next block that has one).
// Returns false when no thread is ready (every thread exited, or a deadlock: then the wave fails).
bool pass_baton(Wave& w, int from) {
  const int nb = static_cast<int>(w.blocks.size());
  for (int k = 0; k < nb; ++k) {
    const int b = (from + k) % nb;
    Block& blk = w.blocks[b];
    if (blk.runq.empty()) continue;
    if (w.shared_owner != b) {  // switch the __shared__ bytes
      const size_t n = shared_bytes();
      if (w.shared_owner >= 0) std::memcpy(w.blocks[w.shared_owner].shared.data(), __start_nk_emu_shared, n);
      if (n > 0) std::memcpy(__start_nk_emu_shared, blk.shared.data(), n);
      w.shared_owner = b;
    }
    g_turn = blk.runq.front();
    blk.runq.pop_front();
    g_workers[g_turn]->cv.notify_one();
    return true;
  }
  g_turn = -1;
  if (w.live > 0) fail(w, "emulated kernel deadlocked (threads wait at different barriers):" + where(w));
  g_host_cv.notify_all();
  return false;
}

// Make the waiting threads of [first, first + n) slots ready: descending on even generations,
// ascending on odd ones. A block starts ascending, so the low threads (which usually read what
// the others wrote: lane 0, warp 0) run first up to the first barrier, and after it last (a
// writer running into the next round before they read shows). `ahead`: they run before every
// other ready thread (a warp released by its shuffle runs on as far as it can: a warp racing
// ahead of the others shows a missing __syncthreads).
void release(Wave& w, Block& blk, int first, int n, State waiting, int gen, bool ahead) {
  std::vector<int> order;
  for (int k = 0; k < n; ++k) {
    const int s = gen % 2 == 1 ? first + k : first + n - 1 - k;
    if (w.threads[s].state == waiting) {
      w.threads[s].state = State::Ready;
      order.push_back(s);
    }
  }
  if (ahead)
    blk.runq.insert(blk.runq.begin(), order.begin(), order.end());
  else
    blk.runq.insert(blk.runq.end(), order.begin(), order.end());
}

// The calling thread (holding g_mu, in state `waiting` or Ready) gives up the baton and waits
// until it is handed back.
void wait_turn(std::unique_lock<std::mutex>& lk, int slot) {
  Wave& w = *g_wave;
  pass_baton(w, w.threads[slot].block);
  g_workers[slot]->cv.wait(lk, [&] { return g_turn == slot || w.abort; });
  if (w.abort) throw AbortLaunch{};
  w.threads[slot].state = State::Running;
}

void thread_main(int slot) {
  std::unique_lock<std::mutex> lk(g_mu);
  for (;;) {
    g_workers[slot]->cv.wait(lk, [&] {
      return g_wave != nullptr && slot < static_cast<int>(g_wave->threads.size()) &&
             !g_wave->threads[slot].started && (g_turn == slot || g_wave->abort);
    });
    Wave& w = *g_wave;
    Thread& t = w.threads[slot];
    t.started = true;
    if (!w.abort) {
      t.state = State::Running;
      t_ctx.thread_idx = dim3(static_cast<unsigned>(t.tid));
      t_ctx.block_idx = dim3(static_cast<unsigned>(w.blocks[t.block].index));
      t_ctx.block_dim = w.block_dim;
      t_ctx.grid_dim = w.grid_dim;
      t_ctx.slot = slot;
      lk.unlock();
      std::string err;
      try {
        (*w.body)();
      } catch (const AbortLaunch&) {
      } catch (const std::exception& e) {
        err = e.what();
      }
      lk.lock();
      if (!err.empty())
        fail(w, "in block " + std::to_string(w.blocks[t.block].index) + " thread " +
                    std::to_string(t.tid) + ": " + err);
    }
    t.state = State::Done;
    --w.live;
    Block& blk = w.blocks[t.block];
    --blk.live;
    if (w.abort) {
      if (w.live == 0) g_host_cv.notify_all();
      continue;
    }
    // CUDA requires every thread of the block (of the grid) at __syncthreads (grid sync)
    if (blk.arrived > 0 || w.grid_arrived > 0) {
      fail(w, "a thread exited while others wait at a barrier:" + where(w));
      continue;
    }
    pass_baton(w, t.block);
  }
}

void* worker_entry(void* arg) {
  thread_main(static_cast<int>(reinterpret_cast<intptr_t>(arg)));
  return nullptr;
}

void ensure_workers(int n) {
  while (static_cast<int>(g_workers.size()) < n) {
    const int slot = static_cast<int>(g_workers.size());
    g_workers.push_back(new Worker);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    pthread_t th;
    const int rc = pthread_create(&th, &attr, &worker_entry, reinterpret_cast<void*>(intptr_t(slot)));
    pthread_attr_destroy(&attr);
    TORCH_CHECK(rc == 0, "emulated CUDA: cannot start a host thread (", rc, ")");
    pthread_detach(th);
  }
}

void run_wave(Wave& w) {
  std::unique_lock<std::mutex> lk(g_mu);
  const int nthreads = static_cast<int>(w.blocks.size()) * w.block_threads;
  ensure_workers(nthreads);
  w.threads.assign(nthreads, Thread{});
  const size_t shbytes = shared_bytes();
  for (int b = 0; b < static_cast<int>(w.blocks.size()); ++b) {
    Block& blk = w.blocks[b];
    blk.live = w.block_threads;
    blk.warps.assign(w.block_threads / 32, Warp{});
    blk.shared.assign(shbytes, static_cast<char>(0xff));  // NaN for float and double
    for (int t = 0; t < w.block_threads; ++t) {
      const int slot = b * w.block_threads + t;
      w.threads[slot].block = b;
      w.threads[slot].tid = t;
      blk.runq.push_back(slot);
    }
  }
  w.live = nthreads;
  g_wave = &w;
  pass_baton(w, 0);
  g_host_cv.wait(lk, [&] { return w.live == 0; });
  g_wave = nullptr;
  g_turn = -1;
}

}  // namespace

ThreadCtx& ctx() { return t_ctx; }

void syncthreads(const char* file, int line) {
  std::unique_lock<std::mutex> lk(g_mu);
  Wave& w = *g_wave;
  const int slot = t_ctx.slot;
  Block& blk = w.blocks[w.threads[slot].block];
  if (blk.arrived == 0) {
    blk.barrier_file = file;
    blk.barrier_line = line;
  } else if (line != blk.barrier_line || std::strcmp(file, blk.barrier_file) != 0) {
    lk.unlock();
    TORCH_CHECK(false, "divergent __syncthreads: this thread at ", file, ":", line, ", others at ",
                blk.barrier_file, ":", blk.barrier_line);
  }
  w.threads[slot].state = State::AtBarrier;
  if (++blk.arrived == blk.live) {
    blk.arrived = 0;
    release(w, blk, w.threads[slot].block * w.block_threads, w.block_threads, State::AtBarrier,
            blk.gen++, false);
  }
  wait_turn(lk, slot);
}

void grid_sync() {
  std::unique_lock<std::mutex> lk(g_mu);
  Wave& w = *g_wave;
  TORCH_CHECK(w.cooperative, "grid sync in a kernel not launched cooperatively");
  const int slot = t_ctx.slot;
  w.threads[slot].state = State::AtGridSync;
  if (++w.grid_arrived == w.live) {
    w.grid_arrived = 0;
    // what follows a grid sync is a new phase: it starts ascending, as a block does
    const int gen = 1 + w.grid_gen++;
    for (size_t b = 0; b < w.blocks.size(); ++b)
      release(w, w.blocks[b], static_cast<int>(b) * w.block_threads, w.block_threads,
              State::AtGridSync, gen, false);
  }
  wait_turn(lk, slot);
}

uint64_t warp_exchange(uint64_t mine, int src_lane, const char* what) {
  std::unique_lock<std::mutex> lk(g_mu);
  Wave& w = *g_wave;
  const int slot = t_ctx.slot;
  const int b = w.threads[slot].block;
  Block& blk = w.blocks[b];
  const int tid = w.threads[slot].tid, lane = tid % 32;
  Warp& wp = blk.warps[tid / 32];
  const int buf = wp.gen % 2;
  wp.words[buf][lane] = mine;
  w.threads[slot].state = State::AtShuffle;
  w.threads[slot].shuffle = what;
  if (++wp.arrived == 32) {
    wp.arrived = 0;
    release(w, blk, b * w.block_threads + (tid / 32) * 32, 32, State::AtShuffle, wp.gen++, true);
  }
  wait_turn(lk, slot);
  return src_lane < 0 ? mine : wp.words[buf][src_lane];
}

void run_grid(bool cooperative, int64_t grid, int block, const std::function<void()>& body) {
  TORCH_CHECK(block >= 32 && block <= 1024 && block % 32 == 0,
              "emulated launch: blocks of a multiple of 32 threads (<= 1024), got ", block);
  TORCH_CHECK(grid >= 1 && grid <= INT32_MAX, "emulated launch: grid of ", grid, " blocks");
  const std::lock_guard<std::mutex> launch_lock(g_launch_mu);
  const Device& dev = device(current_device());
  auto make_wave = [&] {
    Wave w;
    w.cooperative = cooperative;
    w.block_threads = block;
    w.grid_dim = dim3(static_cast<unsigned>(grid));
    w.block_dim = dim3(static_cast<unsigned>(block));
    w.body = &body;
    return w;
  };
  auto finish = [](Wave& w) { TORCH_CHECK(!w.abort, "emulated CUDA launch failed: ", w.error); };
  if (cooperative) {
    TORCH_CHECK(dev.cooperative, "cooperative launch on an emulated device without support");
    TORCH_CHECK(grid <= int64_t(dev.sms) * dev.blocks_per_sm,
                "cooperative launch too large: ", grid, " blocks, ", dev.sms * dev.blocks_per_sm,
                " co-resident");
    Wave w = make_wave();
    w.blocks.resize(grid);
    for (int64_t b = 0; b < grid; ++b) w.blocks[b].index = b;
    run_wave(w);
    finish(w);
    return;
  }
  for (int64_t b = 0; b < grid; ++b) {  // blocks one after another
    Wave w = make_wave();
    w.blocks.resize(1);
    w.blocks[0].index = b;
    run_wave(w);
    finish(w);
  }
}

}  // namespace nk_emu
