// The elementwise families' kernels for bfloat16 params stored with stochastic
// rounding (see elementwise.cuh).
#include "elementwise.cuh"

namespace fusedopt {

template cudaError_t launch_elementwise_as<kBFloat16, true>(size_t, const Named&, const MultiTensor&, const Quant&,
                                                            cudaStream_t);

}  // namespace fusedopt
