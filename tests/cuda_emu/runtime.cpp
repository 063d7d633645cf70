// The emulator's runtime: fibers, the block scheduler, barriers, warp exchanges, the memory
// check, and the C interface the Python side configures it through (tests/cuda_emu/emulator.py).
//
// A launch runs its blocks one after another, in a configurable order (forward, reverse, or
// shuffled by a seed). The threads of the running block are fibers on one OS thread, switched
// cooperatively: a thread runs until it reaches a barrier (__syncthreads: the block's; a
// shuffle: its warp's) or returns; the order threads run in between barriers is configurable
// too.
#include "cuda_emu.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>


namespace cuda_emu {

Thread* current = nullptr;
std::mutex launch_mutex;  // one launch at a time: the scheduler's state is global

// ---- configuration and statistics (set and read from Python through ctypes) -----------------

enum Order : int { kForward = 0, kReverse = 1, kShuffled = 2 };

struct Config {
  int sms = 3;            // emulated multiprocessors
  int blocks_per_sm = 2;  // what cudaOccupancyMaxActiveBlocksPerMultiprocessor reports
  int block_order = kForward;
  int thread_order = kForward;
  uint64_t seed = 0;
};

struct Stats {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t max_grid = 0;
  int64_t block_barriers = 0;
  int64_t warp_exchanges = 0;
  int64_t checked_accesses = 0;
};

Config config;
Stats stats;
cudaError_t last_error = cudaSuccess;

// ---- fibers ------------------------------------------------------------------------------------
//
// x86-64: a context is a stack pointer; switch_to saves the callee-saved registers, MXCSR and the
// x87 control word on the current stack and restores them from the other (no signal-mask system
// call, unlike swapcontext: the LAMB and 8-bit kernels switch millions of times per test).

#if !defined(__x86_64__)
#error "the CUDA emulator's fibers are written for x86-64"
#endif

extern "C" void cuda_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;

enum State : int { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Slot;

struct Fiber {
  Thread thread;
  void* sp = nullptr;
  char* memory = nullptr;  // guard page + stack
  State state = kDone;
  Slot* slot = nullptr;
  // memory check: the last range found, tried first
  uintptr_t hit_begin = 1, hit_end = 0;
};

struct Warp {
  int arrived = 0;
  uint32_t values[32];
  int sources[32];
  uint32_t masks[32];
};

struct Slot {
  int live = 0;     // threads not done
  int arrived = 0;  // at the block barrier
  int exited = 0;
  std::vector<Fiber*> fibers;
  std::vector<Warp> warps;
};

struct Launch {
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  std::string error;
};

void* scheduler_sp = nullptr;
Launch* launch_now = nullptr;
std::vector<std::unique_ptr<Fiber>> fiber_pool;

Fiber* fiber(size_t i) {
  while (fiber_pool.size() <= i) {
    auto f = std::make_unique<Fiber>();
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a fiber stack");
    mprotect(m, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    f->memory = static_cast<char*>(m);
    fiber_pool.push_back(std::move(f));
  }
  return fiber_pool[i].get();
}

[[noreturn]] void yield_forever();

void to_scheduler(Fiber* f) { cuda_emu_switch(&f->sp, scheduler_sp); }

extern "C" void cuda_emu_fiber_main() {
  Fiber* f = reinterpret_cast<Fiber*>(current);
  launch_now->body(launch_now->context);
  f->state = kDone;
  Slot& s = *f->slot;
  --s.live;
  ++s.exited;
  if (s.arrived > 0 && launch_now->error.empty())
    launch_now->error = "a thread returned while others of its block wait at __syncthreads (barrier divergence)";
  yield_forever();
}

[[noreturn]] void yield_forever() {
  Fiber* f = reinterpret_cast<Fiber*>(current);
  for (;;) to_scheduler(f);
}

// The stack a fresh fiber is switched to: cuda_emu_switch pops MXCSR/FPU control, six registers,
// then returns into cuda_emu_fiber_main with the stack aligned as after a call.
void prepare(Fiber* f) {
  uintptr_t top = reinterpret_cast<uintptr_t>(f->memory + kGuardBytes + kStackBytes);
  top &= ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                                    // the "return address" of fiber_main
  *--sp = reinterpret_cast<uint64_t>(&cuda_emu_fiber_main);     // ret target
  for (int i = 0; i < 6; ++i) *--sp = 0;                        // rbp rbx r12 r13 r14 r15
  *--sp = uint64_t(0x1F80) | (uint64_t(0x037F) << 32);          // MXCSR, x87 control word
  f->sp = sp;
}

// ---- barriers ------------------------------------------------------------------------------

Fiber* self() {
  if (current == nullptr || launch_now == nullptr) {
    std::fprintf(stderr, "cuda_emu: a device function was called outside a kernel\n");
    std::abort();
  }
  return reinterpret_cast<Fiber*>(current);
}

void fail(Fiber* f, const std::string& what) {
  if (launch_now->error.empty()) launch_now->error = what;
  yield_forever();
}

void syncthreads() {
  Fiber* f = self();
  Slot& s = *f->slot;
  if (s.exited > 0) fail(f, "__syncthreads after a thread of the block returned (barrier divergence)");
  ++stats.block_barriers;
  if (++s.arrived == s.live) {
    s.arrived = 0;
    for (Fiber* g : s.fibers)
      if (g->state == kAtBlockBarrier) g->state = kRunnable;
    return;  // the last to arrive goes on
  }
  f->state = kAtBlockBarrier;
  to_scheduler(f);
  if (!launch_now->error.empty()) yield_forever();
}

uint32_t warp_exchange(uint32_t mask, uint32_t value, int src_lane) {
  Fiber* f = self();
  Slot& s = *f->slot;
  if (mask != 0xffffffffu) fail(f, "the emulator models full-warp shuffles only (mask 0xffffffff)");
  const int tid = int(f->thread.thread_idx.x), lane = tid % 32;
  Warp& w = s.warps[tid / 32];
  const int first = tid - lane;
  for (int l = 0; l < 32; ++l)
    if (s.fibers[first + l]->state == kDone) fail(f, "a warp shuffle names a lane that has returned");
  ++stats.warp_exchanges;
  w.values[lane] = value;
  w.sources[lane] = src_lane;
  // Two rounds: all lanes deposit, then all read (nobody deposits the next value before the
  // last lane has read this one).
  for (int round = 0; round < 2; ++round) {
    if (++w.arrived == 32) {
      w.arrived = 0;
      for (int l = 0; l < 32; ++l)
        if (s.fibers[first + l]->state == kAtWarpBarrier) s.fibers[first + l]->state = kRunnable;
    } else {
      f->state = kAtWarpBarrier;
      to_scheduler(f);
      if (!launch_now->error.empty()) yield_forever();
    }
    if (round == 0) value = w.values[(src_lane & 31)];
  }
  return value;
}

[[noreturn]] void fault(const char* what, const void* address, size_t bytes) {
  Fiber* f = self();
  char text[256];
  std::snprintf(text, sizeof text, "%s: %zu bytes at %p (block %u, thread %u)", what, bytes, address,
                f->thread.block_idx.x, f->thread.thread_idx.x);
  fail(f, text);
}

// ---- the memory check ------------------------------------------------------------------------
//
// A kernel may touch the tensors of the op that launched it (registered by the Python side
// before each op call) and memory the op allocated itself (a recording CPU allocator is
// installed for the duration of the op).

std::mutex memory_mutex;
std::map<uintptr_t, uintptr_t> regions;  // begin -> end
bool check_memory = false;

void add_region(uintptr_t begin, uintptr_t end) {
  if (end <= begin) return;
  std::lock_guard<std::mutex> lock(memory_mutex);
  auto it = regions.find(begin);
  if (it == regions.end() || it->second < end) regions[begin] = end;
}

void check_access(const void* p, size_t bytes, size_t align) {
  Fiber* f = self();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (align > 1 && a % align != 0) fault("misaligned address", p, bytes);
  if (!check_memory) return;
  ++stats.checked_accesses;
  if (a >= f->hit_begin && a + bytes <= f->hit_end) return;
  {
    std::lock_guard<std::mutex> lock(memory_mutex);  // released before a fault leaves the fiber
    auto it = regions.upper_bound(a);
    // Regions may overlap (views of one storage): look at every region starting at or before a.
    while (it != regions.begin()) {
      --it;
      if (a + bytes <= it->second) {
        f->hit_begin = it->first;
        f->hit_end = it->second;
        return;
      }
    }
  }
  fault("out-of-bounds access (no tensor of this op holds it)", p, bytes);
}

struct RecordingAllocator final : c10::Allocator {
  c10::Allocator* inner = nullptr;
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = inner->allocate(n);
    const uintptr_t begin = reinterpret_cast<uintptr_t>(p.get());
    add_region(begin, begin + n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { inner->copy_data(dest, src, count); }
};

RecordingAllocator recorder;

// ---- the scheduler ---------------------------------------------------------------------------

std::vector<int> permutation(int n, int order, uint64_t salt) {
  std::vector<int> p(n);
  std::iota(p.begin(), p.end(), 0);
  if (order == kReverse) std::reverse(p.begin(), p.end());
  if (order == kShuffled) {
    std::mt19937_64 gen(config.seed * 0x9E3779B97F4A7C15ull + salt);
    std::shuffle(p.begin(), p.end(), gen);
  }
  return p;
}

void run(dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* context) {
  if (current != nullptr) throw std::runtime_error("cuda_emu: a launch from inside a kernel");
  std::lock_guard<std::mutex> launch_lock(launch_mutex);
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1 || block.x % 32 != 0 || block.x == 0)
    throw std::runtime_error("cuda_emu: only 1-d grids of 1-d blocks of whole warps are modelled");
  if (smem != 0) throw std::runtime_error("cuda_emu: dynamic shared memory is not modelled");
  ++stats.launches;
  const int n_blocks = int(grid.x), threads = int(block.x);
  if (n_blocks == 0) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  stats.blocks += n_blocks;
  stats.max_grid = std::max<int64_t>(stats.max_grid, n_blocks);
  const std::vector<int> block_order = permutation(n_blocks, config.block_order, uint64_t(stats.launches) << 20);
  const std::vector<int> order = permutation(threads, config.thread_order, uint64_t(stats.launches));

  Launch launch{body, context, {}};
  launch_now = &launch;
  Slot s;
  s.warps.resize(threads / 32);
  for (int t = 0; t < threads; ++t) s.fibers.push_back(fiber(size_t(t)));
  auto finish = [&](const std::string& error) {
    current = nullptr;
    launch_now = nullptr;
    if (!error.empty()) {
      last_error = cudaErrorLaunchFailure;
      throw std::runtime_error("cuda_emu: " + error);
    }
  };

  // One block after another (__shared__ variables are statics: one copy, which the running
  // block owns). Within a block, each pass runs every runnable thread until it waits or returns.
  for (int b : block_order) {
    s.live = threads;
    s.arrived = s.exited = 0;
    for (Warp& w : s.warps) w.arrived = 0;
    for (int t = 0; t < threads; ++t) {
      Fiber* f = s.fibers[t];
      f->thread = Thread{make_uint3(unsigned(t), 0, 0), make_uint3(unsigned(b), 0, 0), block, grid};
      f->state = kRunnable;
      f->slot = &s;
      f->hit_begin = 1;
      f->hit_end = 0;
      prepare(f);
    }
    while (s.live > 0) {
      bool ran = false;
      for (int t : order) {
        Fiber* f = s.fibers[t];
        if (f->state != kRunnable) continue;
        ran = true;
        current = &f->thread;
        cuda_emu_switch(&scheduler_sp, f->sp);
        current = nullptr;
        if (!launch.error.empty()) finish(launch.error);
      }
      if (!ran) {
        char text[200];
        std::snprintf(text, sizeof text,
                      "block %d deadlocked: %d threads live, %d at __syncthreads, none runnable (a warp shuffle "
                      "and a block barrier waiting on each other?)",
                      b, s.live, s.arrived);
        finish(text);
      }
    }
  }
  finish({});
  last_error = cudaSuccess;
}

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = config.sms;
  return cudaSuccess;
}

cudaError_t occupancy_blocks(int* blocks, int, size_t) {
  *blocks = config.blocks_per_sm;
  return cudaSuccess;
}

cudaError_t get_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

}  // namespace cuda_emu

// ---- the C interface (tests/cuda_emu/emulator.py) -------------------------------------------

using namespace cuda_emu;

extern "C" CUDA_EMU_API void cuda_emu_configure(int sms, int blocks_per_sm, int block_order, int thread_order,
                                               uint64_t seed) {
  config = Config{sms, blocks_per_sm, block_order, thread_order, seed};
}

extern "C" CUDA_EMU_API void cuda_emu_stats(int64_t* out) {
  const int64_t values[] = {stats.launches,       stats.blocks,         stats.max_grid,
                            stats.block_barriers, stats.warp_exchanges, stats.checked_accesses};
  std::copy(std::begin(values), std::end(values), out);
}

extern "C" CUDA_EMU_API void cuda_emu_reset_stats() { stats = Stats{}; }

// Before an op: the memory its kernels may touch (begin, end pairs), and the recording
// allocator for what the op allocates itself. After: the check off, the allocator restored.
extern "C" CUDA_EMU_API void cuda_emu_begin_op(int64_t n, const uint64_t* ranges) {
  {
    std::lock_guard<std::mutex> lock(memory_mutex);
    regions.clear();
  }
  for (int64_t i = 0; i < n; ++i) add_region(ranges[2 * i], ranges[2 * i + 1]);
  recorder.inner = c10::GetCPUAllocator();
  c10::SetCPUAllocator(&recorder, /*priority=*/100);
  check_memory = true;
}

extern "C" CUDA_EMU_API void cuda_emu_end_op() {
  if (recorder.inner != nullptr) c10::SetCPUAllocator(recorder.inner, /*priority=*/100);
  recorder.inner = nullptr;
  check_memory = false;
  std::lock_guard<std::mutex> lock(memory_mutex);
  regions.clear();
}
