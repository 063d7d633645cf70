// What an elementwise family declares for ops.cpp's elementwise_ (its header's spec, listed in
// families.cuh), the named inputs it reads, and the registry and launcher ops.cpp calls
// (elementwise.cu). Host code only, no torch: included by ops.cpp and by the families' headers,
// not by the other kernels' translation units (whose compile it would slow).
#pragma once

#include <cstdio>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "params.h"

namespace fusedopt {

// An elementwise family's named inputs as ops.cpp checked them, which its header reads to fill
// its params struct: every hyper-parameter it declares (a number, or a device pointer), each as a
// Scalar and as a Beta; the switches that are on; the states passed, in the family's order.
// Views of ops.cpp's storage, valid during the op.
struct Named {
  const char* const* hyper_names;
  const Scalar* scalars;
  const Beta* betas;
  size_t n_hypers;
  const char* const* flags;
  size_t n_flags;
  const char* const* states;
  size_t n_states;

  Scalar scalar(const char* name) const { return scalars[index(name)]; }
  Beta beta(const char* name) const { return betas[index(name)]; }
  // 1 - lr * weight_decay in double, rounded once (on the device when either is a tensor).
  Decay decay(const char* lr, const char* weight_decay) const {
    const Scalar a = scalar(lr), b = scalar(weight_decay);
    return Decay{float(1.0 - a.value * b.value), a.ptr != nullptr || b.ptr != nullptr};
  }
  // The value given as a number (not a device tensor), or nullopt.
  std::optional<double> number(const char* name) const {
    const Scalar s = scalar(name);
    return s.ptr ? std::nullopt : std::optional<double>(s.value);
  }
  bool flag(const char* name) const { return contains(flags, n_flags, name); }
  bool has_state(const char* name) const { return contains(states, n_states, name); }

 private:
  static bool contains(const char* const* list, size_t n, const char* name) {
    for (size_t i = 0; i < n; ++i)
      if (std::strcmp(list[i], name) == 0) return true;
    return false;
  }
  size_t index(const char* name) const {
    for (size_t i = 0; i < n_hypers; ++i)
      if (std::strcmp(hyper_names[i], name) == 0) return i;
    // ops.cpp passes every hyper-parameter the family declares: a family reads one it did not.
    throw std::logic_error(std::string("fusedopt: internal error: no hyper-parameter ") + name);
  }
};

// What an elementwise family declares, under fusedopt.families' names, for ops.cpp to check
// before anything runs: its hyper-parameters (all required), its switches (`flags` lists those
// that are on), the state lists it accepts (each in its order; the states passed pick the
// kernel's variant), the switches that decide whether a state exists (on exactly when it is
// passed), and the checks only it knows (an empty string, or what is wrong).
struct ElementwiseFamily {
  const char* name;
  std::vector<const char*> hypers;
  std::vector<const char*> flags;
  std::vector<std::vector<const char*>> layouts;
  std::vector<std::pair<const char*, const char*>> flag_states;
  std::string (*check)(const Named&);
};

// momentum given as a number decides whether the momentum_buffer state exists (> 0 or != 0, in
// the family's words): a step with the wrong states would run another variant's math.
inline std::string check_momentum_buffer(const Named& v, bool positive_only, const char* family) {
  const std::optional<double> momentum = v.number("momentum");
  if (!momentum) return {};
  const bool needs = positive_only ? *momentum > 0 : *momentum != 0;
  if (needs == v.has_state("momentum_buffer")) return {};
  char value[32];  // %g: as an ostream writes a double (torch's messages)
  std::snprintf(value, sizeof(value), "%g", *momentum);
  return std::string(family) + " with momentum=" + value + (needs ? " needs" : " takes no") + " momentum_buffer state";
}

// The registered families, in csrc/families.cuh's order (elementwise.cu).
const std::vector<ElementwiseFamily>& elementwise_families();
// One step of family `family` (an index into elementwise_families()) over a batch: the family's
// params struct filled from `v`, its kernel variant for the states passed, every param dtype and
// rounding, fp32 or 8-bit states (elementwise.cuh).
cudaError_t launch_elementwise(size_t family, const Named& v, const MultiTensor& mt, ScalarKind param,
                               const Quant& quant, cudaStream_t stream);

}  // namespace fusedopt
