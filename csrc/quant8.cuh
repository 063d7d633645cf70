// Block-wise 8-bit states (Dettmers et al., ICLR 2022): the kernel that dequantizes, runs a
// family's per-element math in fp32 and requantizes, for Adam/AdamW and Lion alike.
//
// A state is uint8 codes of the dynamic map plus one fp32 absmax per block_size elements.
// Requantization writes, for x = state / new_absmax, the number of codebook midpoints strictly
// below x: the nearest code, a tie going to the lower one, computed as fusedopt.quant.fast_codes
// does (a closed-form guess, one comparison with the fp32 midpoint table of
// fusedopt.quant.midpoints), so the codes are those of fusedopt.quant.quantize_blockwise given
// the same fp32 state. An all-zero block keeps absmax 0 and gets the zero code.
//
// Layout: each thread owns kQuantVec = 16 consecutive elements (16 bytes of codes, whole
// 16-byte words of every other stream), a block covers whole quantization blocks per iteration
// (block_size / 16 threads each), and the new absmax of a quantization block is a max over its
// threads: warp shuffles when they are a power of two within a warp, shared memory otherwise.
// A quantization block wider than a block's span (block_size > kQuantSpan = 4096) is swept
// twice by the whole block instead (quant8_wide), in a kernel of its own (quant8_wide_kernel)
// so that the narrow kernels keep their registers.
#pragma once

#include "multi_tensor.cuh"

namespace fusedopt {

// Rows of the [4, 256] codebook tensor.
enum CodebookRow : int { kSignedValues = 0, kUnsignedValues = 1, kSignedMidpoints = 2, kUnsignedMidpoints = 3 };

// fusedopt.quant.fast_constants(signed): the decade thresholds D_1..D_6, slopes A_0..A_6 and
// offsets B_0..B_6 of the quantizer below, exact fp32 values (tests/test_quant.py checks them
// against the Python ones, from which the proof is made).
struct FastConstants {
  float threshold[6], slope[7], offset[7];
};
__host__ __device__ constexpr FastConstants fast_constants(bool is_signed) {
  return is_signed
      ? FastConstants{{0x1.0c6f7ap-20f, 0x1.4f8b58p-17f, 0x1.a36e2ep-14f, 0x1.0624dep-10f, 0x1.47ae14p-7f, 0x1.99999ap-4f},
                      {0x1.0f4472p+20f, 0x1.b2071cp+17f, 0x1.5b38e4p+15f, 0x1.15c71cp+13f, 0x1.bc71c8p+10f, 0x1.638e38p+8f, 0x1.1c71c8p+6f},
                      {0x1.00c71cp+7f, 0x1.028e38p+7f, 0x1.061c72p+7f, 0x1.0d38e4p+7f, 0x1.1b71c8p+7f, 0x1.37e38ep+7f, 0x1.70c71cp+7f}}
      : FastConstants{{0x1.0c6f7ap-20f, 0x1.4f8b58p-17f, 0x1.a36e2ep-14f, 0x1.0624dep-10f, 0x1.47ae14p-7f, 0x1.99999ap-4f},
                      {0x1.0f4472p+21f, 0x1.b2071cp+18f, 0x1.5b38e4p+16f, 0x1.15c71cp+14f, 0x1.bc71c8p+11f, 0x1.638e38p+9f, 0x1.1c71c8p+7f},
                      {0x1.471c72p+0f, 0x1.871c72p+1f, 0x1.a71c72p+2f, 0x1.b71c72p+3f, 0x1.bf1c72p+4f, 0x1.c31c72p+5f, 0x1.c51c72p+6f}};
}

// code[j] = #{midpoints < x[j]} over the map's 255 sorted midpoints (x not NaN), without a
// search: fusedopt.quant.fast_codes, proved equal to the search for every fp32 x in [-1, 1]
// (bench/prove_fast_codes.py; the -fmad=false build rounds T as the proof's reference does,
// and any T within 1e-3 of the exact one gives the same code). The decade from six compares
// (a >= D_k), T = a * A_d + B_d, g = trunc(min(T, 255)) (mirrored, g = max(255 - g, 1), for
// a negative x of the signed map), then one midpoint comparison: code = g - (mid[g - 1] >= x).
template <bool SIGNED, int N>
__device__ __forceinline__ void quantize(const float (&x)[N], int (&code)[N], const float* midpoints) {
  constexpr FastConstants c = fast_constants(SIGNED);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float a = SIGNED ? fabsf(x[j]) : fmaxf(x[j], 0.f);
    float slope = c.slope[0], offset = c.offset[0];
#pragma unroll
    for (int k = 0; k < 6; ++k) {
      const bool up = a >= c.threshold[k];
      slope = up ? c.slope[k + 1] : slope;
      offset = up ? c.offset[k + 1] : offset;
    }
    const int f = int(fminf(a * slope + offset, 255.f));  // >= 0: truncation is floor
    const int g = SIGNED && x[j] < 0.f ? (f < 254 ? 255 - f : 1) : f;
    code[j] = g - (midpoints[g - 1] >= x[j] ? 1 : 0);
  }
}

// What the quantizer looks up for a state value s in a block of absmax scale: s / scale, or, where
// that is NaN (inf / inf, a NaN state), -1 for a negative s and +1 otherwise (see the module
// docstring of fusedopt/quant.py: +-inf then decodes back to +-inf, not 0 * inf = NaN).
__device__ __forceinline__ float normalized(float s, float scale) {
  const float x = s / scale;
  return x == x ? x : (s < 0.f ? -1.f : 1.f);
}

template <bool VEC, int N>
__device__ __forceinline__ void load_codes(int (&dst)[N], const uint8_t* src, int n) {
  if constexpr (VEC) {
    const Pack<uint8_t, N> v = load_pack<uint8_t, N>(src);
#pragma unroll
    for (int j = 0; j < N; ++j) dst[j] = v.x[j];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) dst[j] = j < n ? global(src + j) : 0;
  }
}

template <bool VEC, int N>
__device__ __forceinline__ void store_codes(uint8_t* dst, const int (&src)[N], int n) {
  if constexpr (VEC) {
    Pack<uint8_t, N> v;
#pragma unroll
    for (int j = 0; j < N; ++j) v.x[j] = uint8_t(src[j]);
    store_pack<uint8_t, N>(dst, v);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < n) global(dst + j) = uint8_t(src[j]);
  }
}

// A state's new fp32 values, quantized against the block's new absmax (an all-zero block,
// absmax 0, divides by 1 and gets the zero code) and stored as codes. `is_signed` picks the
// map (a constant where the caller's loop over the states is unrolled).
template <bool VEC, int N>
__device__ __forceinline__ void requantize(uint8_t* dst, const float (&s)[N], float new_absmax,
                                           const float (*book)[256], bool is_signed, int n) {
  const float scale = new_absmax > 0.f ? new_absmax : 1.f;
  float x[N];
  int code[N];
#pragma unroll
  for (int j = 0; j < N; ++j) x[j] = normalized(s[j], scale);
  if (is_signed) {
    quantize<true>(x, code, book[kSignedMidpoints]);
  } else {
    quantize<false>(x, code, book[kUnsignedMidpoints]);
  }
  store_codes<VEC>(dst, code, n);
}

// Quantization geometry of a launch: a block handles `span` elements per iteration, whole
// quantization blocks of `threads_per_qblock` threads each.
// (block_size <= kQuantSpan; wider blocks take quant8_wide.)
struct QuantGeometry {
  int block_size;
  int threads_per_qblock;
  int64_t span;
  bool shuffle;  // groups are a power of two no wider than a warp
  __device__ __forceinline__ explicit QuantGeometry(int block_size_)
      : block_size(block_size_),
        threads_per_qblock(block_size_ / kQuantVec),
        span((kQuantSpan / block_size_) * block_size_),
        shuffle(threads_per_qblock <= 32 && (threads_per_qblock & (threads_per_qblock - 1)) == 0) {}
};

// Max of x over the threads of this thread's quantization block (they are consecutive and the
// first is a multiple of threads_per_qblock). Called by every thread of the block.
__device__ __forceinline__ float qblock_max(float x, const QuantGeometry& geo, float* scratch) {
  if (geo.shuffle) {
    for (int offset = geo.threads_per_qblock / 2; offset > 0; offset >>= 1)
      x = MaxNan{}(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
  }
  scratch[threadIdx.x] = x;
  __syncthreads();
  const int first = threadIdx.x - threadIdx.x % geo.threads_per_qblock;
  float m = 0.f;
  if (first + geo.threads_per_qblock <= kThreads)
    for (int j = 0; j < geo.threads_per_qblock; ++j) m = MaxNan{}(m, scratch[first + j]);
  __syncthreads();  // scratch is reused by the next call
  return m;
}

// The family's update of the n elements at i (n <= kQuantVec): p_ and s_ get the new param and
// fp32 states (the states dequantized with the quantization block's current absmax); nothing is
// written. Elements past n are zero in, never stored.
template <typename Family, bool V, typename P, int S = Family::kStates, int N = kQuantVec>
__device__ __forceinline__ void update_elements(float (&p_)[N], float (&s_)[S][N], const MultiTensor& mt,
                                                const int64_t* row, const P* p, uint8_t* const (&codes)[S],
                                                float* const (&absmax)[S], int64_t qblock, const float (*book)[256],
                                                const typename Family::Step& step, float grad_mult, int64_t i,
                                                int n) {
  float g_[N];
  int c_[N];
  load<V>(p_, p + i, n);
  load_grad<V>(g_, mt.grad, row[kGrad], i, n);
#pragma unroll
  for (int k = 0; k < S; ++k) {
    load_codes<V>(c_, codes[k] + i, n);
    const float* values = book[Family::is_signed(k) ? kSignedValues : kUnsignedValues];
    const float scale = global(absmax[k] + qblock);
#pragma unroll
    for (int j = 0; j < N; ++j) s_[k][j] = values[c_[j]] * scale;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    States<S> e;
#pragma unroll
    for (int k = 0; k < S; ++k) e[k] = s_[k][j];
    Family::math(p_[j], g_[j] * grad_mult, e, step);
#pragma unroll
    for (int k = 0; k < S; ++k) s_[k][j] = e[k];
  }
}

// Quantization blocks wider than a block's span (block_size > kQuantSpan) in [begin, end): the
// whole block sweeps each one twice. First for its new absmax (the states computed, nothing
// written), then computing the same values again (the same inputs and operations: the same
// bits) and writing the param and the codes; the absmax last, once every thread has read the
// old one. The states of a whole quantization block do not fit in registers across the
// reduction: reading the param, grad and codes twice is the price of block sizes this large.
template <typename Family, bool SR, typename P, int S = Family::kStates>
__device__ __forceinline__ void quant8_wide(const MultiTensor& mt, const int64_t* row, const typename Family::Step& step,
                                            const Rounding& key, P* p, uint8_t* const (&codes)[S], float* const (&absmax)[S],
                                            const float (*book)[256], float grad_mult, bool aligned, int64_t begin,
                                            int64_t end, int64_t block_size) {
  constexpr int N = kQuantVec;
  for (int64_t first = begin; first < end; first += block_size) {  // block-uniform
    const int64_t last = end < first + block_size ? end : first + block_size;
    const int64_t qblock = first / block_size;
    float new_absmax[S];
    {
      float local[S];
#pragma unroll
      for (int k = 0; k < S; ++k) local[k] = 0.f;
      for (int64_t i = first + int64_t(threadIdx.x) * N; i < last; i += kQuantSpan) {
        const int n = last - i < N ? int(last - i) : N;
        float p_[N], s_[S][N];
        if (n == N && aligned) {
          update_elements<Family, true>(p_, s_, mt, row, p, codes, absmax, qblock, book, step, grad_mult, i, n);
        } else {
          update_elements<Family, false>(p_, s_, mt, row, p, codes, absmax, qblock, book, step, grad_mult, i, n);
        }
#pragma unroll
        for (int k = 0; k < S; ++k)
#pragma unroll
          for (int j = 0; j < N; ++j)
            if (j < n) local[k] = MaxNan{}(local[k], fabsf(s_[k][j]));
      }
#pragma unroll
      for (int k = 0; k < S; ++k) new_absmax[k] = block_reduce(local[k], MaxNan{});
    }
    for (int64_t i = first + int64_t(threadIdx.x) * N; i < last; i += kQuantSpan) {
      const int n = last - i < N ? int(last - i) : N;
      auto write = [&](auto vec) {
        constexpr bool V = decltype(vec)::value;
        float p_[N], s_[S][N];
        update_elements<Family, V>(p_, s_, mt, row, p, codes, absmax, qblock, book, step, grad_mult, i, n);
        store_param<SR, V>(p + i, p_, n, i, key);
#pragma unroll
        for (int k = 0; k < S; ++k)
          requantize<V>(codes[k] + i, s_[k], new_absmax[k], book, Family::is_signed(k), n);
      };
      if (n == N && aligned) {
        write(Tag<true>{});
      } else {
        write(Tag<false>{});
      }
    }
    __syncthreads();  // every thread has read the old absmax
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < S; ++k) global(absmax[k] + qblock) = new_absmax[k];
    }
  }
}

// Whether a launch's quantization blocks are wider than a block's span: they take the other
// kernel (quant8_wide_kernel), chosen on the host by launch_quant8.
__host__ __device__ __forceinline__ bool wide_blocks(const Quant& q) { return q.block_size > kQuantSpan; }

// A family's Step for tensor `tensor` at step t: family.step(t), or family.step(t, tensor) for a
// family that reads per-tensor values (two_pass.cuh's Applied: the tensor's norms). The last
// argument picks the second overload where both exist.
template <typename Family>
__device__ __forceinline__ auto tensor_step(const Family& family, float t, int tensor, int)
    -> decltype(family.step(t, tensor)) {
  return family.step(t, tensor);
}
template <typename Family>
__device__ __forceinline__ auto tensor_step(const Family& family, float t, int, long) -> decltype(family.step(t)) {
  return family.step(t);
}

// The body of both kernels. WIDE is a template parameter, not a branch on q.block_size: both
// paths in one kernel took the amsgrad kernels from 168 registers to 246-255 (sm_80/sm_90),
// though each path alone needs at most 168.
template <typename Family, typename P, bool SR, bool WIDE>
__device__ __forceinline__ void quant8_body(const MultiTensor& mt, const Family& family, const Quant& q) {
  constexpr int S = Family::kStates, N = kQuantVec;
  static_assert(S > 0, "a variant without states has nothing to quantize: it takes elementwise_kernel");
  __shared__ float book[4][256];
  __shared__ float scratch[kThreads];
  if (wide_blocks(q) != WIDE) __trap();  // the host picked the wrong kernel: fail loudly
  if (mt.scalars[kSkip] != 0.f) return;
  for (int i = threadIdx.x; i < 4 * 256; i += kThreads) (&book[0][0])[i] = q.codebook[i];
  __syncthreads();

  const float grad_mult = mt.scalars[kGradMult];
  const QuantGeometry geo(WIDE ? kQuantVec : int(q.block_size));  // (narrow blocks only)
  for (int64_t w = blockIdx.x; w < mt.n_work; w += gridDim.x) {
    const int2 item = reinterpret_cast<const int2*>(mt.work)[w];
    const int64_t* row = mt.table + int64_t(item.x) * kRowWidth;
    const int64_t numel = row[kNumel];
    const float t = global(address<const float>(row[kStep])) + 1.f;
    const typename Family::Step step = tensor_step(family, t, item.x, 0);
    const Rounding key = row_key<SR>(mt, row, t);
    P* p = address<P>(row[kParam]);
    uint8_t* codes[S];
    float* absmax[S];
#pragma unroll
    for (int k = 0; k < S; ++k) {
      codes[k] = address<uint8_t>(row[kState0 + k]);
      absmax[k] = address<float>(row[kAbsmax0 + k]);
    }
    const bool aligned = row[kAligned] != 0;
    const int64_t begin = int64_t(item.y) * mt.chunk;
    const int64_t end = numel < begin + mt.chunk ? numel : begin + mt.chunk;
    if constexpr (WIDE) {
      quant8_wide<Family, SR>(mt, row, step, key, p, codes, absmax, book, grad_mult, aligned, begin, end,
                              q.block_size);
      advance_step(mt, row, item.x, t);
      continue;
    }

    // Block-uniform loop: every thread reaches the reductions.
    for (int64_t base = begin; base < end; base += geo.span) {
      const int64_t i = base + int64_t(threadIdx.x) * N;
      const int n = (threadIdx.x * N >= geo.span || i >= end) ? 0 : (end - i < N ? int(end - i) : N);
      const int64_t qblock = i / geo.block_size;
      float s_[S][N];
      auto update = [&](auto vec) {
        constexpr bool V = decltype(vec)::value;
        float p_[N];
        update_elements<Family, V>(p_, s_, mt, row, p, codes, absmax, qblock, book, step, grad_mult, i, n);
        store_param<SR, V>(p + i, p_, n, i, key);  // the param needs no absmax: written now, its registers freed
      };
      if (n == N && aligned) {
        update(Tag<true>{});
      } else if (n > 0) {
        update(Tag<false>{});
      }

      float new_absmax[S];
#pragma unroll
      for (int k = 0; k < S; ++k) {
        float local = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j)
          if (j < n) local = MaxNan{}(local, fabsf(s_[k][j]));
        new_absmax[k] = qblock_max(local, geo, scratch);
      }

      auto commit = [&](auto vec) {
        constexpr bool V = decltype(vec)::value;
#pragma unroll
        for (int k = 0; k < S; ++k) {
          requantize<V>(codes[k] + i, s_[k], new_absmax[k], book, Family::is_signed(k), n);
          if (threadIdx.x % geo.threads_per_qblock == 0) global(absmax[k] + qblock) = new_absmax[k];
        }
      };
      if (n == N && aligned) {
        commit(Tag<true>{});
      } else if (n > 0) {
        commit(Tag<false>{});
      }
    }
    advance_step(mt, row, item.x, t);
  }
}

// A thread keeps kStates x 16 fp32 states across the absmax reduction. With the search-free
// quantizer, two states fit in 128 registers without a spill (sm_80 and sm_90) for Adam, LAMB
// and centered RMSprop: two blocks (16 warps) per SM. Three states (Adam's amsgrad, RMSprop
// centered with momentum) spilled 4-8 bytes at 128, and so did RMSprop with momentum (4 bytes
// on sm_90): a family says so with kQuant8BlocksPerSm = 1 (rmsprop.cuh), and more than two
// states take one block per SM and the registers they need.
// For block_size <= kQuantSpan (every common setting).
template <typename Family, typename = void>
struct Quant8BlocksPerSm {
  static constexpr int value = Family::kStates <= 2 ? 2 : 1;
};
template <typename Family>
struct Quant8BlocksPerSm<Family, std::void_t<decltype(Family::kQuant8BlocksPerSm)>> {
  static constexpr int value = Family::kQuant8BlocksPerSm;
};
template <typename Family>
constexpr int quant8_blocks_per_sm() {
  return Quant8BlocksPerSm<Family>::value;
}

template <typename Family, typename P, bool SR>
__global__ void __launch_bounds__(kThreads, quant8_blocks_per_sm<Family>()) quant8_kernel(MultiTensor mt, Family family,
                                                                                          Quant q) {
  quant8_body<Family, P, SR, false>(mt, family, q);
}

// block_size > kQuantSpan: each quantization block swept twice (quant8_wide).
template <typename Family, typename P, bool SR>
__global__ void __launch_bounds__(kThreads, 1) quant8_wide_kernel(MultiTensor mt, Family family, Quant q) {
  quant8_body<Family, P, SR, true>(mt, family, q);
}

// The launch of a batch's 8-bit update: the kernel for its block size.
template <typename Family, typename P, bool SR>
cudaError_t launch_quant8(const MultiTensor& mt, const Family& family, const Quant& q, cudaStream_t stream) {
  if (wide_blocks(q)) return launch(quant8_wide_kernel<Family, P, SR>, mt.n_work, stream, mt, family, q);
  return launch(quant8_kernel<Family, P, SR>, mt.n_work, stream, mt, family, q);
}

}  // namespace fusedopt
