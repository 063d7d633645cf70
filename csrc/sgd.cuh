// SGD with momentum, dampening and Nesterov (torch.optim.SGD semantics), with maximize: the
// per-element math, the family the elementwise and 8-bit kernels instantiate, and its entry for
// elementwise_ (families.cuh).
#pragma once

#include "family.h"
#include "multi_tensor.cuh"

namespace fusedopt {

// nesterov and maximize are runtime switches; momentum (a momentum_buffer state) is a variant.
struct SgdHyper {
  Scalar lr, momentum;
  Beta dampening;  // its 1 - dampening is what the math uses
  Scalar weight_decay;
  bool nesterov, maximize;
};

struct SgdStep {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool first;  // t == 1: the momentum buffer becomes a copy of the grad (torch's first step)
  bool nesterov, maximize;
};

// FAMILIES.md "SGD": g = -g if maximize; g += wd*p; with momentum: buf = g on the first step,
// else momentum*buf + (1-dampening)*g, and g = g + momentum*buf (nesterov) or buf; p -= lr*g.
template <bool MOMENTUM>
__device__ __forceinline__ void sgd_math(float& p, float g, float& buf, const SgdStep& s) {
  if (s.maximize) g = -g;
  if (s.weight_decay != 0.f) g = g + s.weight_decay * p;
  if (MOMENTUM) {
    buf = s.first ? g : s.momentum * buf + s.one_minus_dampening * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  p = p - s.lr * g;
}

template <bool MOMENTUM>
struct Sgd {
  static constexpr int kStates = MOMENTUM ? 1 : 0;  // momentum_buffer
  __host__ __device__ static constexpr bool is_signed(int) { return true; }
  using Step = SgdStep;

  SgdHyper h;

  __device__ __forceinline__ Step step(float t) const {
    Step s;
    s.lr = get(h.lr);
    s.momentum = get(h.momentum);
    float dampening;
    get(h.dampening, dampening, s.one_minus_dampening);
    s.weight_decay = get(h.weight_decay);
    s.first = t == 1.f;
    s.nesterov = h.nesterov;
    s.maximize = h.maximize;
    return s;
  }

  // Without momentum s[0] is an unused slot (States<0>).
  __device__ __forceinline__ static void math(float& p, float g, States<kStates>& s, const Step& step) {
    sgd_math<MOMENTUM>(p, g, s[0], step);
  }
};

// What elementwise_ takes (see ElementwiseFamily), and the kernel for the named inputs: a
// momentum_buffer passed picks Sgd<true>.
struct SgdSpec {
  static ElementwiseFamily declare() {
    return {"sgd", {"lr", "momentum", "dampening", "weight_decay"}, {"nesterov", "maximize"},
            {{}, {"momentum_buffer"}}, {}, &check};
  }

  static std::string check(const Named& v) {
    std::string error = check_momentum_buffer(v, false, "sgd");
    if (error.empty() && v.flag("nesterov") && !v.has_state("momentum_buffer"))
      error = "sgd with nesterov needs the momentum_buffer state (and momentum > 0)";
    return error;
  }

  template <typename F>
  static cudaError_t dispatch(const Named& v, F&& f) {
    const SgdHyper h{v.scalar("lr"), v.scalar("momentum"), v.beta("dampening"), v.scalar("weight_decay"),
                     v.flag("nesterov"), v.flag("maximize")};
    return v.has_state("momentum_buffer") ? f(Sgd<true>{h}) : f(Sgd<false>{h});
  }
};

}  // namespace fusedopt
