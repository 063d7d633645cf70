// Multi-tensor launcher: one launch updates every tensor of a batch, whatever their count.
//
// The host (csrc/ops.cpp, make_table) writes a device table with one row of int64 per tensor
// (element count, alignment, the addresses of its param, grad, states, absmaxes and step) and a
// work list of (tensor, chunk) items. A persistent grid strides over the work list; each block
// takes one chunk of one tensor at a time. Nothing in a launch depends on the tensor count, so
// 20,000 tensors are one launch, and no kernel argument struct caps it.
//
// Within a chunk every thread owns N consecutive elements per iteration: N * sizeof(T) is a
// multiple of 16 bytes for every stream, so a full, aligned segment moves as 128-bit loads and
// stores (LDG.E.128 / STG.E.128). The last segment of a tensor, and tensors whose storage is not
// 16-byte aligned, take the scalar tail path. Both paths call the same per-element math.
//
// This header and the kernels include no torch header: they compile quickly and stand alone.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "params.h"

// A kernel launch, `FUSEDOPT_LAUNCH(kernel, grid, block, smem, stream)(args...)`: the <<<>>>
// launch under nvcc. The test-only CPU emulator (tests/cuda_emu/) defines it first, as a call
// that runs the kernel's blocks on the host.
#ifndef FUSEDOPT_LAUNCH
#define FUSEDOPT_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace fusedopt {

__device__ __forceinline__ float get(const Scalar& s) { return s.ptr ? __ldg(s.ptr) : float(s.value); }
__device__ __forceinline__ double get_double(const Scalar& s) { return s.ptr ? double(__ldg(s.ptr)) : s.value; }

__device__ __forceinline__ void get(const Beta& b, float& beta, float& one_minus_beta) {
  if (b.ptr) {
    beta = __ldg(b.ptr);
    one_minus_beta = 1.f - beta;
  } else {
    beta = b.value;
    one_minus_beta = b.one_minus;
  }
}

// 1 - beta^t as -expm1(t * log(beta)) in double (the reference's one_minus_power): 1 -
// powf(beta, t) in fp32 cancels (fp32(0.99999) alone is off by 1.4e-5 of 1 - beta). What is
// derived from it is rounded once to fp32. Once per work item, so double costs nothing here.
__device__ __forceinline__ double one_minus_power(const Beta& b, float beta, float t) {
  const double log_beta = b.ptr ? log(double(beta)) : b.log;
  return -expm1(double(t) * log_beta);
}

// ---- element conversions: fp32 math, storage in the tensor's own dtype (round to nearest) ----

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
__device__ __forceinline__ T* address(int64_t a) { return reinterpret_cast<T*>(static_cast<uintptr_t>(a)); }

// The addresses come from the table as integers, so the compiler cannot know their address
// space and would emit generic LD/ST. Every access below assumes global memory at the access
// itself (an assumption made where the pointer is created does not survive the arrays and
// lambdas in between), which gives LDG/STG, and LDG.E.128 / STG.E.128 for the packs.
template <typename T>
__device__ __forceinline__ const T& global(const T* p) {
  __builtin_assume(__isGlobal(p));
  return *p;
}

template <typename T>
__device__ __forceinline__ T& global(T* p) {
  __builtin_assume(__isGlobal(p));
  return *p;
}

// N elements moved as whole 16-byte words.
template <typename T, int N>
struct alignas(16) Pack {
  static_assert(N * sizeof(T) % 16 == 0, "a pack is a whole number of 16-byte words");
  T x[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* src) {
  return global(reinterpret_cast<const Pack<T, N>*>(src));
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, N>& v) {
  global(reinterpret_cast<Pack<T, N>*>(dst)) = v;
}

// Load N elements at src into fp32: 16-byte vectors when VEC, else the first n one by one (the
// rest are zero, so the math on them is harmless and never stored).
template <bool VEC, int N, typename T>
__device__ __forceinline__ void load(float (&dst)[N], const T* src, int n) {
  if constexpr (VEC) {
    const Pack<T, N> v = load_pack<T, N>(src);
#pragma unroll
    for (int j = 0; j < N; ++j) dst[j] = to_float(v.x[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) dst[j] = j < n ? to_float(global(src + j)) : 0.f;
  }
}

template <bool VEC, int N, typename T>
__device__ __forceinline__ void store(T* dst, const float (&src)[N], int n) {
  if constexpr (VEC) {
    Pack<T, N> v;
#pragma unroll
    for (int j = 0; j < N; ++j) v.x[j] = from_float<T>(src[j]);
    store_pack<T, N>(dst, v);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < n) global(dst + j) = from_float<T>(src[j]);
  }
}

// ---- stochastic rounding of bf16 params (fusedopt.reference: rounding_noise, round_stochastic_bf16) ----
//
// Element j of a tensor gets the 16 noise bits mix32(key ^ mix32(low32(i) ^ mix32(high32(i)))),
// i = offset + j its index in the full param (offset: where a shard starts in it, 0 for a whole
// tensor), key = mix32(mix32(mix32(seed ^ 0x9E3779B9) ^ t) ^ salt) for step t (after the
// increment) and the param's salt (its position in its group): the same bits as the reference
// and Triton backends draw. The fp32 bits plus the noise, truncated to the high 16 bits; NaN
// stays NaN.

// lowbias32, the 32-bit finaliser every backend uses.
__host__ __device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

__host__ __device__ __forceinline__ uint32_t rounding_key(uint32_t seed, uint32_t t, uint32_t salt) {
  return mix32(mix32(mix32(seed ^ 0x9E3779B9u) ^ t) ^ salt);
}

__device__ __forceinline__ uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;  // the host compiler (the test-only emulator) has no __float_as_uint
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

__device__ __forceinline__ __nv_bfloat16 to_bf16_stochastic(float x, uint32_t key, int64_t index) {
  const uint64_t i = uint64_t(index);
  const uint32_t noise = mix32(key ^ mix32(uint32_t(i) ^ mix32(uint32_t(i >> 32)))) & 0xFFFFu;
  // A NaN becomes the quiet NaN torch's conversion gives (noise added to its bits could carry
  // out of the exponent and make a number of it).
  const uint32_t rounded = x != x ? 0x7FC00000u : float_bits(x) + noise;
  return __ushort_as_bfloat16(static_cast<unsigned short>(rounded >> 16));
}

// What a row's stochastic rounding draws from: the key of this step and the row's offset (where
// the tensor starts in its full param). Both 0 without SR: never read.
struct Rounding {
  uint32_t key;
  int64_t offset;
};

// A param's store: round to nearest (store), or with SR (bf16 params only) stochastically, the
// noise of full-param element `r.offset + index + j` for src[j] under `r.key`. The same 16-byte
// packs either way.
template <bool SR, bool VEC, int N, typename T>
__device__ __forceinline__ void store_param(T* dst, const float (&src)[N], int n, int64_t index, const Rounding& r) {
  if constexpr (!SR) {
    store<VEC>(dst, src, n);
  } else {
    static_assert(sizeof(T) == 2 && !std::is_same<T, __half>::value, "stochastic rounding is for bf16 params");
    const uint32_t key = r.key;
    index += r.offset;
    if constexpr (VEC) {
      Pack<T, N> v;
#pragma unroll
      for (int j = 0; j < N; ++j) v.x[j] = to_bf16_stochastic(src[j], key, index + j);
      store_pack<T, N>(dst, v);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (j < n) global(dst + j) = to_bf16_stochastic(src[j], key, index + j);
    }
  }
}

// The rounding of a table row at step t (zeros without SR: never read).
template <bool SR>
__device__ __forceinline__ Rounding row_key(const MultiTensor& mt, const int64_t* row, float t) {
  if constexpr (SR) return {rounding_key(mt.seed, uint32_t(t), uint32_t(row[kSalt])), row[kOffset]};
  return {0u, 0};
}

// The grads of a batch may be fp32, bf16 or fp16 whatever the params are (fp32 grads of bf16
// params, bf16 grads of fp32 params): their type is a runtime switch, uniform over the launch,
// rather than a template parameter that would triple the kernels to compile.
template <bool VEC, int N>
__device__ __forceinline__ void load_grad(float (&dst)[N], ScalarKind kind, int64_t base, int64_t i, int n) {
  switch (kind) {
    case kBFloat16: load<VEC>(dst, address<const __nv_bfloat16>(base) + i, n); break;
    case kFloat16: load<VEC>(dst, address<const __half>(base) + i, n); break;
    default: load<VEC>(dst, address<const float>(base) + i, n); break;
  }
}

// Calls body(vec, i, n) for each of this thread's segments of [begin, end): n elements at i,
// vec (a std::integral_constant-like tag) true when the segment is full and aligned.
template <bool B> struct Tag { static constexpr bool value = B; };

template <int N, typename Body>
__device__ __forceinline__ void for_each_segment(int64_t begin, int64_t end, bool aligned, Body&& body) {
  for (int64_t i = begin + int64_t(threadIdx.x) * N; i < end; i += int64_t(kThreads) * N) {
    const int n = end - i < N ? int(end - i) : N;
    if (aligned && n == N) {
      body(Tag<true>{}, i, N);
    } else {
      body(Tag<false>{}, i, n);
    }
  }
}

__host__ __device__ __forceinline__ int64_t num_chunks(int64_t numel, int64_t chunk) {
  // A tensor with no elements still gets one (empty) work item, so its step advances.
  return numel == 0 ? 1 : (numel + chunk - 1) / chunk;
}

// Called by every thread of the block after it finished a chunk of `tensor`. True in exactly one
// block per tensor and launch: the one that finished its last chunk. Every other block has read
// the tensor's step (and written its partials) before counting itself, so that block may
// advance the step or combine the partials. Deterministic: who finishes last changes nothing.
__device__ __forceinline__ bool finished_tensor(const MultiTensor& mt, int tensor, int64_t numel) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t chunks = num_chunks(numel, mt.chunk);
    if (chunks == 1) {
      last = true;
    } else {
      __threadfence();
      last = atomicAdd(mt.counters + tensor, 1) == chunks - 1;
      if (last) {
        mt.counters[tensor] = 0;
        __threadfence();
      }
    }
  }
  __syncthreads();
  return last;
}

// Step of a tensor advanced by one by the block that finished it (steps never advance on a
// skipped step: the kernels return before this).
__device__ __forceinline__ void advance_step(const MultiTensor& mt, const int64_t* row, int tensor, float t) {
  if (finished_tensor(mt, tensor, row[kNumel]) && threadIdx.x == 0) global(address<float>(row[kStep])) = t;
}

// Block-wide reduction in a fixed order (warp shuffles, then one warp): deterministic for a
// given block size. The result is returned to every thread.
template <typename Op>
__device__ __forceinline__ float block_reduce(float x, Op op) {
  constexpr int kWarps = kThreads / 32;
  static_assert(kWarps <= 32 && (kWarps & (kWarps - 1)) == 0, "the warps' results fit one warp, a power of two");
  __shared__ float warp_results[kWarps];
  __shared__ float result;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // earlier readers of warp_results and result are done
  if (lane == 0) warp_results[warp] = x;
  __syncthreads();
  if (warp == 0) {
    // Lanes 0..kWarps-1 combine the kWarps results among themselves (an xor by less than
    // kWarps stays in that range); the other lanes' values never reach lane 0. No padding
    // value is combined: there is none that is an identity for every op.
    x = warp_results[lane < kWarps ? lane : 0];
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
    if (lane == 0) result = x;
  }
  __syncthreads();
  return result;
}

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
// max that propagates NaN, as torch's amax and inf-norm do.
struct MaxNan {
  __device__ __forceinline__ float operator()(float a, float b) const { return (a > b || a != a) ? a : b; }
};

// Persistent grid: enough blocks to fill the device, never more than there is work.
template <typename Kernel>
inline int grid_size(Kernel kernel, int64_t n_work, int smem_bytes = 0) {
  int device = 0, sms = 0, per_sm = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem_bytes);
  const int64_t full = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  return int(n_work < full ? n_work : full);
}

// ---- the elementwise update: one kernel for every family whose math is per element ----------
//
// A Family provides kStates (fp32 state streams kState0.., in the family's order; 0 for a variant
// with no state, as SGD without momentum), a Step computed once per tensor and work item from the
// hyper-parameters and the step count t, and the per-element math
//   static void math(float& p, float g, States<kStates>& s, const Step&).
// Elements per thread: 8 (two 16-byte words of an fp32 stream, one of a 16-bit stream).
constexpr int kVec = 8;

// A thread's states of one element: kStates values (one unused slot when there are none, so that
// every family's math has the same signature).
template <int S>
using States = float[S > 0 ? S : 1];

// Two blocks per SM at least: ptxas may use up to 128 registers. Without a minimum it picked 48
// for Lion on sm_90 and spilled (CUDA 13.0); the kernels need 50-100.
constexpr int kMinBlocks = 2;

template <typename Family, typename P, bool SR>
__global__ void __launch_bounds__(kThreads, kMinBlocks) elementwise_kernel(MultiTensor mt, Family family) {
  constexpr int S = Family::kStates, SA = S > 0 ? S : 1;
  if (mt.scalars[kSkip] != 0.f) return;
  const float grad_mult = mt.scalars[kGradMult];
  for (int64_t w = blockIdx.x; w < mt.n_work; w += gridDim.x) {
    const int2 item = reinterpret_cast<const int2*>(mt.work)[w];
    const int64_t* row = mt.table + int64_t(item.x) * kRowWidth;
    const int64_t numel = row[kNumel];
    const float t = global(address<const float>(row[kStep])) + 1.f;
    const typename Family::Step step = family.step(t);
    const Rounding key = row_key<SR>(mt, row, t);
    P* p = address<P>(row[kParam]);
    float* s[SA];
#pragma unroll
    for (int k = 0; k < S; ++k) s[k] = address<float>(row[kState0 + k]);
    const int64_t begin = int64_t(item.y) * mt.chunk;
    const int64_t end = numel < begin + mt.chunk ? numel : begin + mt.chunk;

    for_each_segment<kVec>(begin, end, row[kAligned] != 0, [&](auto vec, int64_t i, int n) {
      constexpr bool V = decltype(vec)::value;
      float p_[kVec], g_[kVec], s_[SA][kVec];
      load<V>(p_, p + i, n);
      load_grad<V>(g_, mt.grad, row[kGrad], i, n);
#pragma unroll
      for (int k = 0; k < S; ++k) load<V>(s_[k], s[k] + i, n);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        States<S> e;
#pragma unroll
        for (int k = 0; k < S; ++k) e[k] = s_[k][j];
        Family::math(p_[j], g_[j] * grad_mult, e, step);
#pragma unroll
        for (int k = 0; k < S; ++k) s_[k][j] = e[k];
      }
      store_param<SR, V>(p + i, p_, n, i, key);
#pragma unroll
      for (int k = 0; k < S; ++k) store<V>(s[k] + i, s_[k], n);
    });
    advance_step(mt, row, item.x, t);
  }
}

// ---- host side ---------------------------------------------------------------------------

template <typename T> struct Type { using type = T; };

// Calls f(Type<P>{}) for the runtime param element type.
template <typename F>
cudaError_t dispatch_param(ScalarKind param, F&& f) {
  switch (param) {
    case kFloat32: return f(Type<float>{});
    case kBFloat16: return f(Type<__nv_bfloat16>{});
    case kFloat16: return f(Type<__half>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(Type<P>{}, Tag<SR>{}) for the runtime param element type and rounding: SR (stochastic
// rounding) only with bf16 params, so the round-to-nearest kernels are the only instances for
// the other dtypes, and unchanged.
template <typename F>
cudaError_t dispatch_param(ScalarKind param, bool stochastic, F&& f) {
  if (param == kBFloat16 && stochastic) return f(Type<__nv_bfloat16>{}, Tag<true>{});
  if (stochastic) return cudaErrorInvalidValue;  // ops.cpp refuses it first
  return dispatch_param(param, [&](auto p) { return f(p, Tag<false>{}); });
}

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, int64_t n_work, cudaStream_t stream, Args... args) {
  if (n_work == 0) return cudaSuccess;
  FUSEDOPT_LAUNCH(kernel, grid_size(kernel, n_work), kThreads, 0, stream)(args...);
  return cudaGetLastError();
}

}  // namespace fusedopt
