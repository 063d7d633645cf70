// The registry of the elementwise families (families.cuh) and the dispatch of a step to the
// translation unit of its param dtype and rounding (elementwise_<dtype>.cu). No kernel here.
#include "families.cuh"

namespace fusedopt {

// Defined in elementwise.cuh, instantiated by the elementwise_<dtype>.cu files.
template <ScalarKind K, bool SR>
cudaError_t launch_elementwise_as(size_t family, const Named& v, const MultiTensor& mt, const Quant& quant,
                                  cudaStream_t stream);

template <typename... Specs>
std::vector<ElementwiseFamily> declare_all(SpecList<Specs...>) {
  return {Specs::declare()...};
}

const std::vector<ElementwiseFamily>& elementwise_families() {
  static const std::vector<ElementwiseFamily> families = declare_all(ElementwiseSpecs{});
  return families;
}

// Stochastic rounding only with bf16 params (ops.cpp refuses it first), so the round-to-nearest
// kernels are the only instances for the other dtypes.
cudaError_t launch_elementwise(size_t family, const Named& v, const MultiTensor& mt, ScalarKind param,
                               const Quant& quant, cudaStream_t stream) {
  if (mt.stochastic)
    return param == kBFloat16 ? launch_elementwise_as<kBFloat16, true>(family, v, mt, quant, stream)
                              : cudaErrorInvalidValue;
  switch (param) {
    case kFloat32: return launch_elementwise_as<kFloat32, false>(family, v, mt, quant, stream);
    case kBFloat16: return launch_elementwise_as<kBFloat16, false>(family, v, mt, quant, stream);
    case kFloat16: return launch_elementwise_as<kFloat16, false>(family, v, mt, quant, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedopt
