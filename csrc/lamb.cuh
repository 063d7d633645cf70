// LAMB (You et al., ICLR 2020): the per-element math and the family two_pass.cuh's kernels
// instantiate (pass 1: the moments and the norms of p and u; pass 2: p -= lr * r * u with the
// trust ratio r = ||p|| / ||u||, 1 unless both are positive).
// Bytes per element, fp32 states: pass 1 reads p, g, m, v and writes m, v; pass 2 reads p, m, v,
// writes p. 8-bit states (LAMB8bit): pass 1 reads p, g and the codes; pass 2 reads them again and
// writes p and the codes.
#pragma once

#include "two_pass.cuh"

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

struct Lamb {
  static constexpr int kStates = 2;  // exp_avg, exp_avg_sq
  // exp_avg uses the signed codebook, exp_avg_sq the unsigned one.
  __host__ __device__ static constexpr bool is_signed(int k) { return k == 0; }
  static constexpr ApplyGrad kApplyGrad = ApplyGrad::kNever;  // u from p, m and v
  using Step = LambStep;

  LambHyper h;

  __device__ __forceinline__ Step step(float t) const { return lamb_step(h, t); }

  __device__ __forceinline__ static float update(float p, float g, float (&s)[kStates], const Step& step) {
    lamb_moments(g, s[0], s[1], step);
    return lamb_direction(p, s[0], s[1], step);
  }

  __device__ __forceinline__ static float direction(float p, float, const float (&s)[kStates], const Step& step) {
    return lamb_direction(p, s[0], s[1], step);
  }

  __device__ __forceinline__ static float factor(float p_sq, float u_sq, const Step& step) {
    return step.lr * trust_ratio(p_sq, u_sq);
  }
};

// The 8-bit launcher (lamb8.cu); launch_lamb hands 8-bit batches to it.
cudaError_t launch_lamb8(const MultiTensor& mt, const LambHyper& h, const TensorNorms& norms, ScalarKind param,
                         const Quant& quant, TwoPass passes, cudaStream_t stream);

}  // namespace fusedopt
