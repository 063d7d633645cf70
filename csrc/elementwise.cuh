// The one launcher of the elementwise families (families.cuh): for a family's spec, its kernel
// variant for the named inputs, over every param dtype and rounding, with fp32 states
// (elementwise_kernel) or 8-bit states (quant8.cuh). Instantiated per param dtype and rounding in
// the elementwise_<dtype>.cu files (translation units that compile in parallel), for every
// registered family; elementwise.cu holds the registry and the runtime dispatch to them.
#pragma once

#include "families.cuh"
#include "quant8.cuh"

namespace fusedopt {

// One step of Spec's family with params of type P (stochastically rounded: SR).
template <typename Spec, typename P, bool SR>
cudaError_t launch_spec(const Named& v, const MultiTensor& mt, const Quant& quant, cudaStream_t stream) {
  return Spec::dispatch(v, [&](auto family) {
    using Family = decltype(family);
    // A variant without states (SGD without momentum) has nothing to quantize: 8-bit or not,
    // the same kernel (ops.cpp passes block_size 0 for it).
    if constexpr (Family::kStates > 0) {
      if (quant.block_size > 0) return launch_quant8<Family, P, SR>(mt, family, quant, stream);
    }
    return launch(elementwise_kernel<Family, P, SR>, mt.n_work, stream, mt, family);
  });
}

template <ScalarKind K> struct ElementOf;
template <> struct ElementOf<kFloat32> { using type = float; };
template <> struct ElementOf<kBFloat16> { using type = __nv_bfloat16; };
template <> struct ElementOf<kFloat16> { using type = __half; };

template <ScalarKind K, bool SR, typename... Specs>
cudaError_t launch_nth(SpecList<Specs...>, size_t family, const Named& v, const MultiTensor& mt, const Quant& quant,
                       cudaStream_t stream) {
  cudaError_t error = cudaErrorInvalidValue;
  size_t i = 0;
  (void)((i++ == family ? (error = launch_spec<Specs, typename ElementOf<K>::type, SR>(v, mt, quant, stream), true)
                        : false) ||
         ...);
  return error;
}

// Every registered family with params of kind K: the definition the elementwise_<dtype>.cu files
// instantiate (elementwise.cu calls them).
template <ScalarKind K, bool SR>
cudaError_t launch_elementwise_as(size_t family, const Named& v, const MultiTensor& mt, const Quant& quant,
                                  cudaStream_t stream) {
  return launch_nth<K, SR>(ElementwiseSpecs{}, family, v, mt, quant, stream);
}

}  // namespace fusedopt
