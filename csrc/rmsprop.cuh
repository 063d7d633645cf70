// RMSprop (torch.optim.RMSprop semantics), centered or not, with or without momentum, with
// maximize: the per-element math, the family the elementwise and 8-bit kernels instantiate, and
// its entry for elementwise_ (families.cuh).
#pragma once

#include "family.h"
#include "multi_tensor.cuh"

namespace fusedopt {

// maximize is a runtime switch; momentum (a momentum_buffer state) and centered (a grad_avg
// state) are variants of the kernel.
struct RmspropHyper {
  Scalar lr;
  Beta alpha;  // square_avg = alpha * square_avg + (1 - alpha) * g^2
  Scalar eps, weight_decay, momentum;
  bool maximize;
};

struct RmspropStep {
  float lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  float lerp_complement;  // 1 - (1 - alpha) in fp32: the second form of torch's lerp
  bool maximize;
};

// torch.lerp(a, b, w): a + w * (b - a) for |w| < 0.5, else b - (b - a) * (1 - w), each a fused
// multiply-add as torch computes it (its CUDA kernel is contracted by nvcc, its CPU vector loop
// calls fmadd with the coefficient w - 1): explicit fmaf, which -fmad=false leaves alone.
__device__ __forceinline__ float torch_lerp(float a, float b, float w, float one_minus_w) {
  const float d = b - a;
  return fabsf(w) < 0.5f ? fmaf(w, d, a) : fmaf(-one_minus_w, d, b);
}

// FAMILIES.md "RMSprop": g = -g if maximize; g += wd*p; square_avg = alpha*square_avg +
// (1-alpha)*g*g; centered: grad_avg = lerp(grad_avg, g, 1-alpha), avg = sqrt(square_avg -
// grad_avg^2) + eps, else avg = sqrt(square_avg) + eps; momentum: buf = momentum*buf + g/avg,
// p -= lr*buf, else p -= lr*g/avg. Rounded in torch's order (the reference's): addcmul's
// ((1-alpha) * g) * g, addcdiv's (lr * g) / avg.
template <bool MOMENTUM, bool CENTERED>
__device__ __forceinline__ void rmsprop_math(float& p, float g, float& square_avg, float& buf, float& grad_avg,
                                             const RmspropStep& s) {
  if (s.maximize) g = -g;
  if (s.weight_decay != 0.f) g = g + s.weight_decay * p;
  square_avg = s.alpha * square_avg + s.one_minus_alpha * g * g;
  float avg;
  if (CENTERED) {
    grad_avg = torch_lerp(grad_avg, g, s.one_minus_alpha, s.lerp_complement);
    avg = sqrtf(square_avg - grad_avg * grad_avg) + s.eps;
  } else {
    avg = sqrtf(square_avg) + s.eps;
  }
  if (MOMENTUM) {
    buf = s.momentum * buf + g / avg;
    p = p - s.lr * buf;
  } else {
    p = p - s.lr * g / avg;
  }
}

template <bool MOMENTUM, bool CENTERED>
struct Rmsprop {
  // square_avg, then momentum_buffer and grad_avg when the variant has them (torch's order)
  static constexpr int kStates = 1 + int(MOMENTUM) + int(CENTERED);
  // square_avg uses the unsigned codebook, momentum_buffer and grad_avg the signed one.
  __host__ __device__ static constexpr bool is_signed(int k) { return k > 0; }
  using Step = RmspropStep;

  RmspropHyper h;

  __device__ __forceinline__ Step step(float) const {
    Step s;
    s.lr = get(h.lr);
    get(h.alpha, s.alpha, s.one_minus_alpha);
    s.lerp_complement = 1.f - s.one_minus_alpha;
    s.eps = get(h.eps);
    s.weight_decay = get(h.weight_decay);
    s.momentum = get(h.momentum);
    s.maximize = h.maximize;
    return s;
  }

  // A variant without momentum_buffer or grad_avg passes another slot in its place: never
  // touched by the math (MOMENTUM / CENTERED false).
  __device__ __forceinline__ static void math(float& p, float g, States<kStates>& s, const Step& step) {
    rmsprop_math<MOMENTUM, CENTERED>(p, g, s[0], s[MOMENTUM ? 1 : 0], s[kStates - 1], step);
  }
};

// What elementwise_ takes (see ElementwiseFamily), and the kernel for the named inputs: the
// states passed pick Rmsprop<MOMENTUM, CENTERED>.
struct RmspropSpec {
  static ElementwiseFamily declare() {
    return {"rmsprop",
            {"lr", "alpha", "eps", "weight_decay", "momentum"},
            {"centered", "maximize"},
            {{"square_avg"},
             {"square_avg", "momentum_buffer"},
             {"square_avg", "grad_avg"},
             {"square_avg", "momentum_buffer", "grad_avg"}},
            {{"centered", "grad_avg"}},
            &check};
  }

  static std::string check(const Named& v) { return check_momentum_buffer(v, true, "rmsprop"); }

  template <typename F>
  static cudaError_t dispatch(const Named& v, F&& f) {
    const RmspropHyper h{v.scalar("lr"),          v.beta("alpha"),       v.scalar("eps"),
                         v.scalar("weight_decay"), v.scalar("momentum"), v.flag("maximize")};
    if (v.has_state("momentum_buffer"))
      return v.has_state("grad_avg") ? f(Rmsprop<true, true>{h}) : f(Rmsprop<true, false>{h});
    return v.has_state("grad_avg") ? f(Rmsprop<false, true>{h}) : f(Rmsprop<false, false>{h});
  }
};

}  // namespace fusedopt
