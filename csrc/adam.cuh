// Adam / AdamW (torch semantics), with amsgrad and maximize: the per-element math, the family
// the elementwise and 8-bit kernels instantiate, and its entry for elementwise_ (families.cuh).
#pragma once

#include "family.h"
#include "multi_tensor.cuh"

namespace fusedopt {

struct AdamHyper {
  Scalar lr;
  Beta beta1, beta2;
  Scalar eps, weight_decay;
  Decay decay;
  bool maximize, decoupled;
};

// Everything the math needs that is the same for a whole tensor this step.
struct AdamStep {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  float decay;                  // AdamW: 1 - lr * weight_decay
  float step_size;              // lr / (1 - beta1^t), in double rounded once
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t), in double rounded once
  bool maximize, decoupled;
};

// DESIGN.md "The math": g = -g if maximize; Adam: g += wd*p; AdamW: p *= 1 - lr*wd;
// m = b1*m + (1-b1)*g (NaN where m is infinite, as torch's lerp); v = b2*v + (1-b2)*g^2;
// amsgrad: v_max = max(v_max, v), used as v;
// p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps).
template <bool AMSGRAD>
__device__ __forceinline__ void adam_math(float& p, float g, float& m, float& v, float& v_max, const AdamStep& s) {
  if (s.maximize) g = -g;
  if (s.decoupled) {
    p = p * s.decay;
  } else if (s.weight_decay != 0.f) {
    g = g + s.weight_decay * p;
  }
  // torch updates m by lerp, m + w * (g - m) for w = 1 - b1 < 0.5, else g - (g - m) * (1 - w):
  // NaN where m is infinite in the first form, where g is in the second
  const float lerp_from = s.beta1 > 0.5f ? m : g;
  m = fabsf(lerp_from) == INFINITY ? NAN : s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  float v_hat = v;
  if (AMSGRAD) {
    v_max = (v_max > v || v_max != v_max) ? v_max : v;  // torch.maximum: NaN wins (fmaxf drops it)
    v_hat = v_max;
  }
  const float denom = sqrtf(v_hat) / s.bias_correction2_sqrt + s.eps;
  p = p - s.step_size * m / denom;
}

template <bool AMSGRAD>
struct Adam {
  static constexpr int kStates = AMSGRAD ? 3 : 2;  // exp_avg, exp_avg_sq[, max_exp_avg_sq]
  // exp_avg uses the signed codebook, the second moments the unsigned one.
  __host__ __device__ static constexpr bool is_signed(int k) { return k == 0; }
  using Step = AdamStep;

  AdamHyper h;

  __device__ __forceinline__ Step step(float t) const {
    Step s;
    const float lr = get(h.lr);
    get(h.beta1, s.beta1, s.one_minus_beta1);
    get(h.beta2, s.beta2, s.one_minus_beta2);
    s.eps = get(h.eps);
    s.weight_decay = get(h.weight_decay);
    s.decay = h.decay.on_device ? 1.f - lr * s.weight_decay : h.decay.value;
    // In double, each rounded once to fp32, as the reference (and torch's for-loop) takes them.
    s.step_size = float(get_double(h.lr) / one_minus_power(h.beta1, s.beta1, t));
    s.bias_correction2_sqrt = float(sqrt(one_minus_power(h.beta2, s.beta2, t)));
    s.maximize = h.maximize;
    s.decoupled = h.decoupled;
    return s;
  }

  __device__ __forceinline__ static void math(float& p, float g, States<kStates>& s, const Step& step) {
    adam_math<AMSGRAD>(p, g, s[0], s[1], s[kStates - 1], step);
  }
};

// What elementwise_ takes (see ElementwiseFamily), and the kernel for the named inputs:
// max_exp_avg_sq passed (amsgrad) picks Adam<true>.
struct AdamSpec {
  static ElementwiseFamily declare() {
    return {"adam",
            {"lr", "beta1", "beta2", "eps", "weight_decay"},
            {"amsgrad", "maximize", "decoupled_weight_decay"},
            {{"exp_avg", "exp_avg_sq"}, {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}},
            {{"amsgrad", "max_exp_avg_sq"}},
            nullptr};
  }

  template <typename F>
  static cudaError_t dispatch(const Named& v, F&& f) {
    const AdamHyper h{v.scalar("lr"),          v.beta("beta1"),
                      v.beta("beta2"),         v.scalar("eps"),
                      v.scalar("weight_decay"), v.decay("lr", "weight_decay"),
                      v.flag("maximize"),      v.flag("decoupled_weight_decay")};
    return v.has_state("max_exp_avg_sq") ? f(Adam<true>{h}) : f(Adam<false>{h});
  }
};

}  // namespace fusedopt
