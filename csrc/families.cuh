// The elementwise families that ops.cpp's elementwise_ runs: each header holds a family's math,
// its params struct and its spec (what the op takes from it, and its kernel for the named
// inputs). A new family is its header and one line in each list below; elementwise.cuh
// instantiates its kernels, and ops.cpp checks its inputs from its spec.
#pragma once

#include "adagrad.cuh"
#include "adam.cuh"
#include "lion.cuh"
#include "rmsprop.cuh"
#include "sgd.cuh"

namespace fusedopt {

template <typename... Specs>
struct SpecList {};

// In this order in the op's messages ("family must be one of [...]").
using ElementwiseSpecs = SpecList<AdamSpec, LionSpec, SgdSpec, AdagradSpec, RmspropSpec>;

}  // namespace fusedopt
