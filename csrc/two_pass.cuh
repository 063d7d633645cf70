// The families whose update is scaled per tensor by a function of the tensor's norms (LAMB's
// trust ratio, LARS's clip of the update), in two passes over the work list, written once over
// a family as elementwise_kernel is for the elementwise families.
//
// Pass 1 (norms): per element the new states and the update direction u; per work item the sums
// of p^2 and u^2, written to fixed slots; the block that finishes a tensor's last chunk adds that
// tensor's slots in a fixed order (no float atomics: the result does not depend on which block
// finishes last). fp32 states are written here; 8-bit states are not.
// Pass 2 (apply): the tensor's factor f from its norms, p -= f * u, and the step advanced.
//   fp32 states: u again from p and the states pass 1 wrote (and the grad, for a family whose u
//   needs it: LARS's u = d without momentum, d + momentum * buf with nesterov).
//   8-bit states: the new states computed again from the old codes and the grad (the same
//   inputs and operations as pass 1: the same bits), u from them, then requantized and written
//   (quant8.cuh's kernels, the family wrapped as Applied<Family>). So the norms and the update
//   use this step's fp32 states, not their requantized values (FAMILIES.md, "8-bit forms").
// The passes are one launch each, back to back, or apart, so that sharded params can sum each
// tensor's norms over the shards in between.
//
// A family provides, besides kStates, is_signed(k), Step and step(t) as an elementwise family:
//   static float update(float p, float g, float (&s)[slots(kStates)], const Step&)
//       the new states in s (from the old ones and g); returns u
//   static float direction(float p, float g, const float (&s)[slots(kStates)], const Step&)
//       u from p and the new states (fp32 pass 2); g is the grad where the pass reads it, else 0
//   kApplyGrad (with apply_reads_grad() for kPerLaunch): whether fp32 pass 2 reads the grad
//   static float factor(float p_sq, float u_sq, const Step&): the f of p -= f * u
//
// Bytes per element (fp32 p and g, S fp32 states): pass 1 reads p, g, S states and writes S;
// pass 2 reads p, S states (and g where the family needs it) and writes p. With 8-bit states,
// pass 1 reads p, g, S codes; pass 2 reads them again and writes p and S codes (and absmaxes).
#pragma once

#include "multi_tensor.cuh"
#include "quant8.cuh"

namespace fusedopt {

// Length of a family's state arrays: a family may have none (LARS without momentum).
__host__ __device__ constexpr int slots(int states) { return states > 0 ? states : 1; }

// Whether the fp32 apply pass reads the grad: never, always, or as apply_reads_grad() says for
// the launch (one kernel each way).
enum class ApplyGrad { kNever, kAlways, kPerLaunch };

// The sums of p^2 and u^2 of a work item's elements, and of a tensor's once its last work item
// is done. STATES8: the states are 8-bit codes (dequantized with the codebook's values in
// `book`, and not written); else fp32 states, written.
template <typename Family, typename P, bool STATES8>
__device__ __forceinline__ void two_pass_norms(const MultiTensor& mt, const Family& family, const TensorNorms& out,
                                               const Quant& q) {
  constexpr int S = Family::kStates;
  constexpr int N = STATES8 ? kQuantVec : kVec;  // 16 codes or 8 fp32 states: whole 16-byte words
  __shared__ float book[2][256];                 // 8-bit: signed and unsigned values
  if (mt.scalars[kSkip] != 0.f) return;
  if constexpr (STATES8) {
    for (int i = threadIdx.x; i < 2 * 256; i += kThreads) (&book[0][0])[i] = q.codebook[i];
    __syncthreads();
  }
  const float grad_mult = mt.scalars[kGradMult];
  for (int64_t w = blockIdx.x; w < mt.n_work; w += gridDim.x) {
    const int2 item = reinterpret_cast<const int2*>(mt.work)[w];
    const int64_t* row = mt.table + int64_t(item.x) * kRowWidth;
    const int64_t numel = row[kNumel];
    const typename Family::Step step = family.step(global(address<const float>(row[kStep])) + 1.f);
    const P* p = address<const P>(row[kParam]);
    const int64_t begin = int64_t(item.y) * mt.chunk;
    const int64_t end = numel < begin + mt.chunk ? numel : begin + mt.chunk;
    // The addresses of the fp32 states it writes, read once: read in the loop, each is read
    // again after the store before it (a store may alias the table, as far as the compiler
    // knows), and an address read after a store loses the alignment the 128-bit path needs
    // (python -m fusedopt static found LAMB's second state stored with 32-bit stores). The
    // other addresses are read in the loop: cheaper than the registers to hold them (measured
    // on sm_90; 8-bit states are not written here).
    int64_t states[slots(S)];
#pragma unroll
    for (int k = 0; k < S; ++k) states[k] = row[kState0 + k];

    float p_sq = 0.f, u_sq = 0.f;
    for_each_segment<N>(begin, end, row[kAligned] != 0, [&](auto vec, int64_t i, int n) {
      constexpr bool V = decltype(vec)::value;
      float p_[N], g_[N], s_[slots(S)][N];
      load<V>(p_, p + i, n);
      load_grad<V>(g_, mt.grad, row[kGrad], i, n);
#pragma unroll
      for (int k = 0; k < S; ++k) {
        if constexpr (STATES8) {
          // i is a multiple of N and a quantization block of a multiple of 32: the N elements
          // share one absmax.
          int c_[N];
          load_codes<V>(c_, address<const uint8_t>(row[kState0 + k]) + i, n);
          const float* values = book[Family::is_signed(k) ? kSignedValues : kUnsignedValues];
          const float scale = global(address<const float>(row[kAbsmax0 + k]) + i / q.block_size);
#pragma unroll
          for (int j = 0; j < N; ++j) s_[k][j] = values[c_[j]] * scale;
        } else {
          load<V>(s_[k], address<const float>(states[k]) + i, n);
        }
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float e[slots(S)];
#pragma unroll
        for (int k = 0; k < S; ++k) e[k] = s_[k][j];
        const float u = Family::update(p_[j], g_[j] * grad_mult, e, step);
#pragma unroll
        for (int k = 0; k < S; ++k) s_[k][j] = e[k];
        if (j < n) {
          p_sq += p_[j] * p_[j];
          u_sq += u * u;
        }
      }
      if constexpr (!STATES8) {
#pragma unroll
        for (int k = 0; k < S; ++k) store<V>(address<float>(states[k]) + i, s_[k], n);
      }
    });
    p_sq = block_reduce(p_sq, Sum{});
    u_sq = block_reduce(u_sq, Sum{});
    if (threadIdx.x == 0) {
      out.partials[2 * w] = p_sq;
      out.partials[2 * w + 1] = u_sq;
    }
    if (finished_tensor(mt, item.x, numel)) {
      // This tensor's chunks are the work items w - item.y .. in order; a tensor of one chunk
      // has its sums already.
      const int64_t first = w - item.y, chunks = num_chunks(numel, mt.chunk);
      float p_total = p_sq, u_total = u_sq;
      if (chunks > 1) {
        p_total = u_total = 0.f;
        for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
          p_total += __ldcg(out.partials + 2 * (first + c));
          u_total += __ldcg(out.partials + 2 * (first + c) + 1);
        }
        p_total = block_reduce(p_total, Sum{});
        u_total = block_reduce(u_total, Sum{});
      }
      if (threadIdx.x == 0) {
        out.norms[2 * item.x] = p_total;
        out.norms[2 * item.x + 1] = u_total;
      }
    }
  }
}

// Pass 1 with fp32 states, written.
template <typename Family, typename P>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    two_pass_norms_kernel(MultiTensor mt, Family family, TensorNorms out, Quant q) {
  two_pass_norms<Family, P, false>(mt, family, out, q);
}

// Pass 1 that writes no tensor: 8-bit states (STATES8), or a family without states.
template <typename Family, typename P, bool STATES8>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    two_pass_norms_only_kernel(MultiTensor mt, Family family, TensorNorms out, Quant q) {
  two_pass_norms<Family, P, STATES8>(mt, family, out, q);
}

// Pass 2 with fp32 states: p -= f * u, u from p and the states pass 1 wrote (and the grad when
// GRAD).
template <typename Family, typename P, bool SR, bool GRAD>
__global__ void __launch_bounds__(kThreads, kMinBlocks) two_pass_apply_kernel(MultiTensor mt, Family family,
                                                                              TensorNorms in) {
  constexpr int S = Family::kStates;
  if (mt.scalars[kSkip] != 0.f) return;
  const float grad_mult = GRAD ? mt.scalars[kGradMult] : 0.f;
  for (int64_t w = blockIdx.x; w < mt.n_work; w += gridDim.x) {
    const int2 item = reinterpret_cast<const int2*>(mt.work)[w];
    const int64_t* row = mt.table + int64_t(item.x) * kRowWidth;
    const int64_t numel = row[kNumel];
    const float t = global(address<const float>(row[kStep])) + 1.f;
    const typename Family::Step step = family.step(t);
    const float f = Family::factor(in.norms[2 * item.x], in.norms[2 * item.x + 1], step);
    const Rounding key = row_key<SR>(mt, row, t);
    P* p = address<P>(row[kParam]);
    const int64_t begin = int64_t(item.y) * mt.chunk;
    const int64_t end = numel < begin + mt.chunk ? numel : begin + mt.chunk;

    for_each_segment<kVec>(begin, end, row[kAligned] != 0, [&](auto vec, int64_t i, int n) {
      constexpr bool V = decltype(vec)::value;
      float p_[kVec], g_[kVec], s_[slots(S)][kVec];
      load<V>(p_, p + i, n);
      if constexpr (GRAD) {
        load_grad<V>(g_, mt.grad, row[kGrad], i, n);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) g_[j] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < S; ++k) load<V>(s_[k], address<const float>(row[kState0 + k]) + i, n);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float e[slots(S)];
#pragma unroll
        for (int k = 0; k < S; ++k) e[k] = s_[k][j];
        p_[j] = p_[j] - f * Family::direction(p_[j], g_[j] * grad_mult, e, step);
      }
      store_param<SR, V>(p + i, p_, n, i, key);
    });
    advance_step(mt, row, item.x, t);
  }
}

// Pass 2 with 8-bit states as an elementwise family for quant8.cuh's kernels: the new states
// from the old (dequantized) ones and g, then p -= f * u with the tensor's f.
template <typename Family>
struct Applied {
  static constexpr int kStates = Family::kStates;
  __host__ __device__ static constexpr bool is_signed(int k) { return Family::is_signed(k); }
  struct Step {
    typename Family::Step family;
    float factor;
  };

  Family family;
  const float* norms;  // TensorNorms::norms

  __device__ __forceinline__ Step step(float t, int tensor) const {
    Step s;
    s.family = family.step(t);
    s.factor = Family::factor(norms[2 * tensor], norms[2 * tensor + 1], s.family);
    return s;
  }

  __device__ __forceinline__ static void math(float& p, float g, float (&s)[kStates], const Step& step) {
    const float u = Family::update(p, g, s, step.family);
    p = p - step.factor * u;
  }
};

// The passes of a batch of `family` over fp32 states (STATES8 false) or 8-bit ones (true: the
// launcher of a family's 8-bit translation unit).
template <typename Family, bool STATES8>
cudaError_t launch_two_pass(const MultiTensor& mt, const Family& family, const TensorNorms& norms, ScalarKind param,
                            const Quant& q, TwoPass passes, cudaStream_t stream) {
  static_assert(!STATES8 || Family::kStates > 0, "8-bit states need states");
  return dispatch_param(param, mt.stochastic, [&](auto p, auto sr) {
    using P = typename decltype(p)::type;
    constexpr bool SR = decltype(sr)::value;
    if (passes & kNormsPass) {
      // The norms pass writes no param: one instance whatever the rounding.
      cudaError_t err;
      if constexpr (STATES8 || Family::kStates == 0) {
        err = launch(two_pass_norms_only_kernel<Family, P, STATES8>, mt.n_work, stream, mt, family, norms, q);
      } else {
        err = launch(two_pass_norms_kernel<Family, P>, mt.n_work, stream, mt, family, norms, q);
      }
      if (err != cudaSuccess) return err;
    }
    if (!(passes & kApplyPass)) return cudaSuccess;
    if constexpr (STATES8) {
      return launch_quant8<Applied<Family>, P, SR>(mt, Applied<Family>{family, norms.norms}, q, stream);
    } else {
      if constexpr (Family::kApplyGrad != ApplyGrad::kNever) {
        if (Family::kApplyGrad == ApplyGrad::kAlways || family.apply_reads_grad())
          return launch(two_pass_apply_kernel<Family, P, SR, true>, mt.n_work, stream, mt, family, norms);
      }
      if constexpr (Family::kApplyGrad != ApplyGrad::kAlways) {
        return launch(two_pass_apply_kernel<Family, P, SR, false>, mt.n_work, stream, mt, family, norms);
      }
      return cudaErrorInvalidValue;  // (unreachable: kAlways returned above)
    }
  });
}

}  // namespace fusedopt
