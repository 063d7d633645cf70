// Test-only CUDA emulation: the kernels of csrc/ compiled by g++ as host C++ and run on CPU
// memory, each block's threads as cooperative fibers (see README.md in this folder).
//
// Force-included (g++ -include cuda_emu.h) before every csrc .cu file of the emulated build;
// never part of the shipped package. It includes the toolkit's own cuda_runtime.h, cuda_bf16.h
// and cuda_fp16.h (their host paths: __nv_bfloat16, __half and their round-to-nearest
// conversions are the real ones), then replaces what only exists on a device: the thread
// indices, __shared__, barriers, warp shuffles, the load intrinsics, atomics, the runtime calls
// the launchers make, and the <<<...>>> launch (csrc spells it FUSEDOPT_LAUNCH).
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define CUDA_EMU_API __attribute__((visibility("default")))

namespace cuda_emu {

// The emulated thread running now (launches are serialized: one scheduler at a time).
struct Thread {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern Thread* current;

// Block barrier and warp exchange (the calling fiber waits for the others).
void syncthreads();
uint32_t warp_exchange(uint32_t mask, uint32_t value, int src_lane);
// A fault: the launch stops and fails with `what` (as a GPU reports a trap).
[[noreturn]] void fault(const char* what, const void* address, size_t bytes);
// Whether [p, p + bytes) lies in memory a kernel may touch (the tensors of the current op, or
// memory the op allocated); a fault otherwise.
void check_access(const void* p, size_t bytes, size_t align);

// Runs `body` as every thread of `grid` blocks of `block` threads. Throws std::runtime_error when
// a thread faulted or the blocks deadlocked.
void run(dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* context);

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... a) const {
    // As a launch does: the arguments converted to the parameter types once, then every thread
    // gets its own copy.
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    auto body = [&] { std::apply(kernel, args); };
    run(grid, block, smem, [](void* c) { (*static_cast<decltype(body)*>(c))(); }, &body);
  }
};

template <typename... P>
Launcher<P...> launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return Launcher<P...>{kernel, grid, block, smem};
}

template <typename T>
inline T shfl(uint32_t mask, T value, int src_lane) {
  static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = warp_exchange(mask, bits, src_lane);
  std::memcpy(&value, &bits, 4);
  return value;
}

inline int lane() { return int(current->thread_idx.x % 32); }

template <typename T>
inline T load(const T* p) {
  check_access(p, sizeof(T), alignof(T));
  return *p;
}

// The runtime calls of the launchers (csrc/multi_tensor.cuh: grid_size, launch).
cudaError_t get_device(int* device);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t get_last_error();
cudaError_t occupancy_blocks(int* blocks, int block_size, size_t smem);
template <typename Kernel>
cudaError_t occupancy(int* blocks, Kernel, int block_size, size_t smem) {
  return occupancy_blocks(blocks, block_size, smem);
}

}  // namespace cuda_emu

// ---- the device's names, as the emulator provides them ---------------------------------------

#define threadIdx (::cuda_emu::current->thread_idx)
#define blockIdx (::cuda_emu::current->block_idx)
#define blockDim (::cuda_emu::current->block_dim)
#define gridDim (::cuda_emu::current->grid_dim)

// Shared memory: one static per variable. Blocks run one after another, so the running block
// owns it (and finds what the previous block left there, not garbage: see README.md).
#undef __shared__
#define __shared__ static

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#define __syncthreads() ::cuda_emu::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) \
  ::cuda_emu::shfl((mask), (value), ::cuda_emu::lane() ^ int(lane_mask))
#define __shfl_sync(mask, value, src_lane) ::cuda_emu::shfl((mask), (value), int(src_lane))
#define __threadfence() ((void)0)
// A trap fails the launch, as on a GPU (cudaErrorLaunchFailure).
#define __trap() ::cuda_emu::fault("__trap()", nullptr, 0)

// Global memory: every access through these is bounds- and alignment-checked.
template <typename T>
inline T __ldg(const T* p) { return ::cuda_emu::load(p); }
template <typename T>
inline T __ldcg(const T* p) { return ::cuda_emu::load(p); }
template <typename T>
inline bool __isGlobal(const T* p) {
  ::cuda_emu::check_access(p, sizeof(T), alignof(T));
  return true;
}
#define __builtin_assume(x) ((void)(x))

inline int atomicAdd(int* address, int value) {
  ::cuda_emu::check_access(address, sizeof(int), alignof(int));
  const int old = *address;
  *address = old + value;
  return old;
}

#define cudaGetDevice ::cuda_emu::get_device
#define cudaDeviceGetAttribute ::cuda_emu::device_get_attribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::cuda_emu::occupancy
#define cudaGetLastError ::cuda_emu::get_last_error

#define FUSEDOPT_LAUNCH(kernel, grid, block, smem, stream) ::cuda_emu::launcher(kernel, grid, block, smem, stream)
