// LAMB (You et al., ICLR 2020) in two passes over the work list.
//
// Pass 1 (moments): m and v of every element, and per chunk the sums of p^2 and u^2 written to
// fixed slots; the block that finishes a tensor's last chunk adds that tensor's slots in a fixed
// order (no float atomics: the result does not depend on which block finishes last).
// Pass 2 (apply): the trust ratio r = ||p|| / ||u|| (1 unless both are positive), u recomputed
// from the stored m and v, p -= lr * r * u, and the step advanced.
// The passes are one launch each, back to back (lamb_), or apart (lamb_moments_, lamb_apply_) so
// that sharded params can sum each tensor's norms over the shards in between.
// Bytes per element: pass 1 reads p, g, m, v and writes m, v; pass 2 reads p, m, v, writes p.
#pragma once

#include "multi_tensor.cuh"

namespace fusedopt {

struct LambStep {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  float bias_correction1, bias_correction2;  // 1 - beta^t, or 1 without bias correction
};

__device__ __forceinline__ LambStep lamb_step(const LambHyper& h, float t) {
  LambStep s;
  s.lr = get(h.lr);
  get(h.beta1, s.beta1, s.one_minus_beta1);
  get(h.beta2, s.beta2, s.one_minus_beta2);
  s.eps = get(h.eps);
  s.weight_decay = get(h.weight_decay);
  s.bias_correction1 = h.bias_correction ? float(one_minus_power(h.beta1, s.beta1, t)) : 1.f;
  s.bias_correction2 = h.bias_correction ? float(one_minus_power(h.beta2, s.beta2, t)) : 1.f;
  return s;
}

// DESIGN.md "The math": m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2.
__device__ __forceinline__ void lamb_moments(float g, float& m, float& v, const LambStep& s) {
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
}

// u = m_hat / (sqrt(v_hat) + eps) + wd*p (the term skipped when wd == 0, as Adam's) with m_hat = m / (1-b1^t), v_hat = v / (1-b2^t).
__device__ __forceinline__ float lamb_direction(float p, float m, float v, const LambStep& s) {
  const float m_hat = m / s.bias_correction1;
  const float v_hat = v / s.bias_correction2;
  const float u = m_hat / (sqrtf(v_hat) + s.eps);
  return s.weight_decay != 0.f ? u + s.weight_decay * p : u;  // 0 * inf would make a NaN
}

// r = ||p|| / ||u|| when both are positive, else 1.
__device__ __forceinline__ float trust_ratio(float p_norm_sq, float u_norm_sq) {
  const float p_norm = sqrtf(p_norm_sq), u_norm = sqrtf(u_norm_sq);
  return (p_norm > 0.f && u_norm > 0.f) ? p_norm / u_norm : 1.f;
}

template <typename P>
__global__ void __launch_bounds__(kThreads, kMinBlocks) lamb_moments_kernel(MultiTensor mt, LambHyper h) {
  if (mt.scalars[kSkip] != 0.f) return;
  const float grad_mult = mt.scalars[kGradMult];
  for (int64_t w = blockIdx.x; w < mt.n_work; w += gridDim.x) {
    const int2 item = reinterpret_cast<const int2*>(mt.work)[w];
    const int64_t* row = mt.table + int64_t(item.x) * kRowWidth;
    const int64_t numel = row[kNumel];
    const LambStep step = lamb_step(h, global(address<const float>(row[kStep])) + 1.f);
    const P* p = address<const P>(row[kParam]);
    float* m = address<float>(row[kState0]);
    float* v = address<float>(row[kState1]);
    const int64_t begin = int64_t(item.y) * mt.chunk;
    const int64_t end = numel < begin + mt.chunk ? numel : begin + mt.chunk;

    float p_sq = 0.f, u_sq = 0.f;
    for_each_segment<kVec>(begin, end, row[kAligned] != 0, [&](auto vec, int64_t i, int n) {
      constexpr bool V = decltype(vec)::value;
      float p_[kVec], g_[kVec], m_[kVec], v_[kVec];
      load<V>(p_, p + i, n);
      load_grad<V>(g_, mt.grad, row[kGrad], i, n);
      load<V>(m_, m + i, n);
      load<V>(v_, v + i, n);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        lamb_moments(g_[j] * grad_mult, m_[j], v_[j], step);
        const float u = lamb_direction(p_[j], m_[j], v_[j], step);
        if (j < n) {
          p_sq += p_[j] * p_[j];
          u_sq += u * u;
        }
      }
      store<V>(m + i, m_, n);
      store<V>(v + i, v_, n);
    });
    p_sq = block_reduce(p_sq, Sum{});
    u_sq = block_reduce(u_sq, Sum{});
    if (threadIdx.x == 0) {
      h.partials[2 * w] = p_sq;
      h.partials[2 * w + 1] = u_sq;
    }
    if (finished_tensor(mt, item.x, numel)) {
      // This tensor's chunks are the work items w - item.y .. in order; a tensor of one chunk
      // has its sums already.
      const int64_t first = w - item.y, chunks = num_chunks(numel, mt.chunk);
      float p_total = p_sq, u_total = u_sq;
      if (chunks > 1) {
        p_total = u_total = 0.f;
        for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
          p_total += __ldcg(h.partials + 2 * (first + c));
          u_total += __ldcg(h.partials + 2 * (first + c) + 1);
        }
        p_total = block_reduce(p_total, Sum{});
        u_total = block_reduce(u_total, Sum{});
      }
      if (threadIdx.x == 0) {
        h.norms[2 * item.x] = p_total;
        h.norms[2 * item.x + 1] = u_total;
      }
    }
  }
}

template <typename P, bool SR>
__global__ void __launch_bounds__(kThreads, kMinBlocks) lamb_apply_kernel(MultiTensor mt, LambHyper h) {
  if (mt.scalars[kSkip] != 0.f) return;
  for (int64_t w = blockIdx.x; w < mt.n_work; w += gridDim.x) {
    const int2 item = reinterpret_cast<const int2*>(mt.work)[w];
    const int64_t* row = mt.table + int64_t(item.x) * kRowWidth;
    const int64_t numel = row[kNumel];
    const float t = global(address<const float>(row[kStep])) + 1.f;
    const LambStep step = lamb_step(h, t);
    const float lr_r = step.lr * trust_ratio(h.norms[2 * item.x], h.norms[2 * item.x + 1]);
    const Rounding key = row_key<SR>(mt, row, t);
    P* p = address<P>(row[kParam]);
    const float* m = address<const float>(row[kState0]);
    const float* v = address<const float>(row[kState1]);
    const int64_t begin = int64_t(item.y) * mt.chunk;
    const int64_t end = numel < begin + mt.chunk ? numel : begin + mt.chunk;

    for_each_segment<kVec>(begin, end, row[kAligned] != 0, [&](auto vec, int64_t i, int n) {
      constexpr bool V = decltype(vec)::value;
      float p_[kVec], m_[kVec], v_[kVec];
      load<V>(p_, p + i, n);
      load<V>(m_, m + i, n);
      load<V>(v_, v + i, n);
#pragma unroll
      for (int j = 0; j < kVec; ++j) p_[j] = p_[j] - lr_r * lamb_direction(p_[j], m_[j], v_[j], step);
      store_param<SR, V>(p + i, p_, n, i, key);
    });
    advance_step(mt, row, item.x, t);
  }
}

}  // namespace fusedopt
