// Global norm of many tensors of mixed dtypes, deterministic: pass 1 writes one partial per
// work item into a fixed slot (a fixed-order reduction inside the block), pass 2 (one block)
// reduces the slots in a fixed order. No float atomics, so the same inputs give the same bits.
#pragma once

#include "multi_tensor.cuh"

namespace fusedopt {

// acc ⊕ |x|: the sum of x^2, the sum of |x|, or the max of |x| (NaN propagates).
template <NormKind K>
__device__ __forceinline__ float norm_accumulate(float acc, float x) {
  if constexpr (K == kNorm2) return acc + x * x;
  if constexpr (K == kNorm1) return acc + fabsf(x);
  return MaxNan{}(acc, fabsf(x));
}

template <NormKind K>
__device__ __forceinline__ float norm_combine(float a, float b) {
  if constexpr (K == kNormInf) return MaxNan{}(a, b);
  return a + b;
}

// One accumulator per element of a segment (each adds a thread's every 8th element), combined
// pairwise at the end: short sequential sums keep the fp32 error near torch's own reduction's.
template <NormKind K, typename T>
__device__ __forceinline__ float norm_chunk(const T* x, int64_t begin, int64_t end, bool aligned) {
  float acc[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
  for_each_segment<kVec>(begin, end, aligned, [&](auto vec, int64_t i, int n) {
    constexpr bool V = decltype(vec)::value;
    float x_[kVec];
    load<V>(x_, x + i, n);
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (j < n) acc[j] = norm_accumulate<K>(acc[j], x_[j]);
  });
#pragma unroll
  for (int width = kVec / 2; width > 0; width /= 2)
#pragma unroll
    for (int j = 0; j < width; ++j) acc[j] = norm_combine<K>(acc[j], acc[j + width]);
  return acc[0];
}

template <NormKind K>
__global__ void __launch_bounds__(kThreads, kMinBlocks) norm_partials_kernel(MultiTensor mt, NormArgs a) {
  for (int64_t w = blockIdx.x; w < mt.n_work; w += gridDim.x) {
    const int2 item = reinterpret_cast<const int2*>(mt.work)[w];
    const int64_t* row = mt.table + int64_t(item.x) * kRowWidth;
    const int64_t numel = row[kNumel];
    const int64_t begin = int64_t(item.y) * mt.chunk;
    const int64_t end = numel < begin + mt.chunk ? numel : begin + mt.chunk;
    const bool aligned = row[kAligned] != 0;
    float acc;
    switch (row[kDtype]) {
      case kBFloat16: acc = norm_chunk<K>(address<const __nv_bfloat16>(row[kParam]), begin, end, aligned); break;
      case kFloat16: acc = norm_chunk<K>(address<const __half>(row[kParam]), begin, end, aligned); break;
      default: acc = norm_chunk<K>(address<const float>(row[kParam]), begin, end, aligned); break;
    }
    acc = block_reduce(acc, [](float x, float y) { return norm_combine<K>(x, y); });
    if (threadIdx.x == 0) a.partials[w] = acc;
  }
}

template <NormKind K>
__global__ void __launch_bounds__(kThreads) norm_finish_kernel(int64_t n_partials, NormArgs a) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n_partials; i += kThreads) acc = norm_combine<K>(acc, a.partials[i]);
  acc = block_reduce(acc, [](float x, float y) { return norm_combine<K>(x, y); });
  if (threadIdx.x == 0) {
    if constexpr (K == kNorm2) acc = sqrtf(acc);
    *a.out = acc;
  }
}

}  // namespace fusedopt
