// Adagrad (torch.optim.Adagrad semantics), with maximize: the per-element math, the family the
// elementwise and 8-bit kernels instantiate, and its entry for elementwise_ (families.cuh).
#pragma once

#include "family.h"
#include "multi_tensor.cuh"

namespace fusedopt {

// clr = lr / (1 + (t - 1) * lr_decay) is derived per step (Adagrad::step).
struct AdagradHyper {
  Scalar lr, lr_decay, weight_decay, eps;
  bool maximize;
};

struct AdagradStep {
  float clr;  // lr / (1 + (t - 1) * lr_decay), in double rounded once
  float weight_decay, eps;
  bool maximize;
};

// FAMILIES.md "Adagrad": g = -g if maximize; g += wd*p; sum += g*g; p -= clr * g / (sqrt(sum) + eps),
// the last as torch's addcdiv rounds it: (clr * g) / std.
__device__ __forceinline__ void adagrad_math(float& p, float g, float& sum, const AdagradStep& s) {
  if (s.maximize) g = -g;
  if (s.weight_decay != 0.f) g = g + s.weight_decay * p;
  sum = sum + g * g;
  const float std = sqrtf(sum) + s.eps;
  p = p - s.clr * g / std;
}

struct Adagrad {
  static constexpr int kStates = 1;  // sum
  __host__ __device__ static constexpr bool is_signed(int) { return false; }
  using Step = AdagradStep;

  AdagradHyper h;

  __device__ __forceinline__ Step step(float t) const {
    Step s;
    // In double, rounded once to fp32, as torch's for-loop takes it (a Python float).
    s.clr = float(get_double(h.lr) / (1.0 + (double(t) - 1.0) * get_double(h.lr_decay)));
    s.weight_decay = get(h.weight_decay);
    s.eps = get(h.eps);
    s.maximize = h.maximize;
    return s;
  }

  __device__ __forceinline__ static void math(float& p, float g, States<kStates>& s, const Step& step) {
    adagrad_math(p, g, s[0], step);
  }
};

// What elementwise_ takes (see ElementwiseFamily), and the kernel for the named inputs.
// initial_accumulator_value is the sum's initial value (the optimizer fills the state with it):
// taken so that the op's names are the family's (fusedopt.families.ADAGRAD), and checked like the
// others, though the kernel does not read it.
struct AdagradSpec {
  static ElementwiseFamily declare() {
    return {"adagrad", {"lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"}, {"maximize"},
            {{"sum"}}, {}, nullptr};
  }

  template <typename F>
  static cudaError_t dispatch(const Named& v, F&& f) {
    return f(Adagrad{AdagradHyper{v.scalar("lr"), v.scalar("lr_decay"), v.scalar("weight_decay"), v.scalar("eps"),
                                  v.flag("maximize")}});
  }
};

}  // namespace fusedopt
