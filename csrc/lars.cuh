// LARS (bitsandbytes' PytorchLARS; FAMILIES.md): the per-element math and the family
// two_pass.cuh's kernels instantiate (pass 1: the momentum buffer and the norms of p and u;
// pass 2: p -= lr * scale * u, the update clipped to max_unorm * ||p||).
// Bytes per element, fp32: pass 1 reads p, g, buf and writes buf; pass 2 reads p, buf (and g with
// nesterov) and writes p. Without momentum (no state): pass 1 reads p, g; pass 2 reads p, g and
// writes p. 8-bit momentum buffer (LARS8bit): pass 1 reads p, g and the codes; pass 2 reads them
// again and writes p and the codes.
#pragma once

#include "two_pass.cuh"

namespace fusedopt {

struct LarsStep {
  float lr, momentum, one_minus_dampening, weight_decay, max_unorm;
  bool nesterov;
  bool first;  // t == 1: the buffer starts as d (torch's first step copies it)
};

// d = g + wd*p (the term skipped when wd == 0: 0 * inf would make a NaN).
__device__ __forceinline__ float lars_d(float p, float g, const LarsStep& s) {
  return s.weight_decay != 0.f ? g + s.weight_decay * p : g;
}

// buf = d on the first step, else momentum*buf + (1-dampening)*d.
__device__ __forceinline__ void lars_momentum(float d, float& buf, const LarsStep& s) {
  buf = s.first ? d : s.momentum * buf + s.one_minus_dampening * d;
}

// u = d + momentum*buf with nesterov, else buf.
__device__ __forceinline__ float lars_direction(float d, float buf, const LarsStep& s) {
  return s.nesterov ? d + s.momentum * buf : buf;
}

// scale = max_unorm * ||p|| / ||u|| if max_unorm > 0 and ||u|| > max_unorm * ||p||, else 1.
__device__ __forceinline__ float lars_scale(float p_norm_sq, float u_norm_sq, const LarsStep& s) {
  if (!(s.max_unorm > 0.f)) return 1.f;
  const float p_norm = sqrtf(p_norm_sq), u_norm = sqrtf(u_norm_sq);
  return u_norm > s.max_unorm * p_norm ? s.max_unorm * p_norm / u_norm : 1.f;
}

// MOMENTUM: whether the momentum buffer exists (momentum != 0); without it u = d.
template <bool MOMENTUM>
struct Lars {
  static constexpr int kStates = MOMENTUM ? 1 : 0;  // momentum_buffer
  __host__ __device__ static constexpr bool is_signed(int) { return true; }
  // u = d needs the grad; with momentum only nesterov's u = d + momentum * buf does.
  static constexpr ApplyGrad kApplyGrad = MOMENTUM ? ApplyGrad::kPerLaunch : ApplyGrad::kAlways;
  using Step = LarsStep;

  LarsHyper h;

  __host__ __device__ bool apply_reads_grad() const { return !MOMENTUM || h.nesterov; }

  __device__ __forceinline__ Step step(float t) const {
    Step s;
    s.lr = get(h.lr);
    s.momentum = get(h.momentum);
    // 1 - dampening in double rounded once when dampening is a number (as the reference takes it)
    s.one_minus_dampening = h.dampening.ptr ? 1.f - __ldg(h.dampening.ptr) : float(1.0 - h.dampening.value);
    s.weight_decay = get(h.weight_decay);
    s.max_unorm = get(h.max_unorm);
    s.nesterov = h.nesterov;
    s.first = t == 1.f;
    return s;
  }

  __device__ __forceinline__ static float update(float p, float g, float (&s)[slots(kStates)], const Step& step) {
    const float d = lars_d(p, g, step);
    if constexpr (MOMENTUM) {
      lars_momentum(d, s[0], step);
      return lars_direction(d, s[0], step);
    } else {
      return d;
    }
  }

  __device__ __forceinline__ static float direction(float p, float g, const float (&s)[slots(kStates)],
                                                    const Step& step) {
    // (g is 0 when the pass does not read it: then u = buf, and d is not used)
    if constexpr (MOMENTUM) {
      return lars_direction(lars_d(p, g, step), s[0], step);
    } else {
      return lars_d(p, g, step);
    }
  }

  __device__ __forceinline__ static float factor(float p_sq, float u_sq, const Step& step) {
    return step.lr * lars_scale(p_sq, u_sq, step);
  }
};

// The 8-bit launcher (lars8.cu); launch_lars hands 8-bit batches with a momentum buffer to it.
cudaError_t launch_lars8(const MultiTensor& mt, const LarsHyper& h, const TensorNorms& norms, ScalarKind param,
                         const Quant& quant, TwoPass passes, cudaStream_t stream);

}  // namespace fusedopt
