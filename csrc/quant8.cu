// The stand-alone 8-bit quantizer: the kernels' own quantization of one fp32 tensor, which the
// tests compare with fusedopt.quant.quantize_blockwise code for code.
#include "quant8.cuh"

namespace fusedopt {

// Quantize one fp32 tensor (the tests' check that the kernels' quantizer is the reference's).
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const float* x, int64_t numel, bool is_signed, Quant q, uint8_t* codes, float* absmax) {
  constexpr int N = kQuantVec;
  __shared__ float midpoints[256];
  __shared__ float scratch[kThreads];
  for (int i = threadIdx.x; i < 256; i += kThreads)
    midpoints[i] = q.codebook[(is_signed ? kSignedMidpoints : kUnsignedMidpoints) * 256 + i];
  __syncthreads();
  if (q.block_size > kQuantSpan) {  // wide blocks: one block each, swept for the max, then quantized
    const int64_t blocks = (numel + q.block_size - 1) / q.block_size;
    for (int64_t qblock = blockIdx.x; qblock < blocks; qblock += gridDim.x) {
      const int64_t first = qblock * q.block_size;
      const int64_t last = numel < first + q.block_size ? numel : first + q.block_size;
      float local = 0.f;
      for (int64_t i = first + int64_t(threadIdx.x) * N; i < last; i += kQuantSpan) {
        const int n = last - i < N ? int(last - i) : N;
        float x_[N];
        load<false>(x_, x + i, n);
#pragma unroll
        for (int j = 0; j < N; ++j)
          if (j < n) local = MaxNan{}(local, fabsf(x_[j]));
      }
      const float m = block_reduce(local, MaxNan{});
      const float scale = m > 0.f ? m : 1.f;
      for (int64_t i = first + int64_t(threadIdx.x) * N; i < last; i += kQuantSpan) {
        const int n = last - i < N ? int(last - i) : N;
        float x_[N];
        int c_[N];
        load<false>(x_, x + i, n);
#pragma unroll
        for (int j = 0; j < N; ++j) x_[j] = normalized(x_[j], scale);
        is_signed ? quantize<true>(x_, c_, midpoints) : quantize<false>(x_, c_, midpoints);
        store_codes<false>(codes + i, c_, n);
      }
      if (threadIdx.x == 0) absmax[qblock] = m;
    }
    return;
  }
  const QuantGeometry geo(int(q.block_size));
  for (int64_t base = int64_t(blockIdx.x) * geo.span; base < numel; base += int64_t(gridDim.x) * geo.span) {
    const int64_t i = base + int64_t(threadIdx.x) * N;
    const int n = (threadIdx.x * N >= geo.span || i >= numel) ? 0 : (numel - i < N ? int(numel - i) : N);
    float x_[N];
    load<false>(x_, x + i, n);
    float local = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < n) local = MaxNan{}(local, fabsf(x_[j]));
    const float m = qblock_max(local, geo, scratch);
    if (n > 0) {
      const float scale = m > 0.f ? m : 1.f;
#pragma unroll
      for (int j = 0; j < N; ++j) x_[j] = normalized(x_[j], scale);
      int c_[N];
      is_signed ? quantize<true>(x_, c_, midpoints) : quantize<false>(x_, c_, midpoints);
      store_codes<false>(codes + i, c_, n);
      if (threadIdx.x % geo.threads_per_qblock == 0) absmax[i / geo.block_size] = m;
    }
  }
}

cudaError_t launch_quantize(const float* x, int64_t numel, bool is_signed, const Quant& quant, uint8_t* codes,
                            float* absmax, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  // A block per span of whole quantization blocks, or per wide quantization block.
  const int64_t span = quant.block_size > kQuantSpan ? quant.block_size : (kQuantSpan / quant.block_size) * quant.block_size;
  const int64_t blocks = (numel + span - 1) / span;
  FUSEDOPT_LAUNCH(quantize_kernel, int(blocks < 1024 ? blocks : 1024), kThreads, 0, stream)(x, numel, is_signed,
                                                                                              quant, codes, absmax);
  return cudaGetLastError();
}

}  // namespace fusedopt
