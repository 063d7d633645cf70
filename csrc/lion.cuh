// Lion (Chen et al., 2023): the per-element math, the family the elementwise and 8-bit kernels
// instantiate, and its entry for elementwise_ (families.cuh).
#pragma once

#include "family.h"
#include "multi_tensor.cuh"

namespace fusedopt {

struct LionHyper {
  Scalar lr;
  Beta beta1, beta2;
  Scalar weight_decay;
  Decay decay;
};

struct LionStep {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
  float decay;  // 1 - lr * weight_decay
};

// torch.sign (the reference uses it): -1, 0 or 1, and 0 for NaN.
__device__ __forceinline__ float sign(float x) { return x > 0.f ? 1.f : (x < 0.f ? -1.f : 0.f); }

// DESIGN.md "The math": p *= 1 - lr*wd; c = b1*m + (1-b1)*g; p -= lr*sign(c); m = b2*m + (1-b2)*g.
__device__ __forceinline__ void lion_math(float& p, float g, float& m, const LionStep& s) {
  p = p * s.decay;
  const float c = s.beta1 * m + s.one_minus_beta1 * g;
  p = p - s.lr * sign(c);
  m = s.beta2 * m + s.one_minus_beta2 * g;
}

struct Lion {
  static constexpr int kStates = 1;  // exp_avg
  __host__ __device__ static constexpr bool is_signed(int) { return true; }
  using Step = LionStep;

  LionHyper h;

  __device__ __forceinline__ Step step(float) const {
    Step s;
    s.lr = get(h.lr);
    get(h.beta1, s.beta1, s.one_minus_beta1);
    get(h.beta2, s.beta2, s.one_minus_beta2);
    s.decay = h.decay.on_device ? 1.f - s.lr * get(h.weight_decay) : h.decay.value;
    return s;
  }

  __device__ __forceinline__ static void math(float& p, float g, States<kStates>& s, const Step& step) {
    lion_math(p, g, s[0], step);
  }
};

// What elementwise_ takes (see ElementwiseFamily), and the kernel for the named inputs.
struct LionSpec {
  static ElementwiseFamily declare() {
    return {"lion", {"lr", "beta1", "beta2", "weight_decay"}, {}, {{"exp_avg"}}, {}, nullptr};
  }

  template <typename F>
  static cudaError_t dispatch(const Named& v, F&& f) {
    return f(Lion{LionHyper{v.scalar("lr"), v.beta("beta1"), v.beta("beta2"), v.scalar("weight_decay"),
                            v.decay("lr", "weight_decay")}});
  }
};

}  // namespace fusedopt
