// The elementwise families' kernels for float32 params (see elementwise.cuh).
#include "elementwise.cuh"

namespace fusedopt {

template cudaError_t launch_elementwise_as<kFloat32, false>(size_t, const Named&, const MultiTensor&, const Quant&,
                                                            cudaStream_t);

}  // namespace fusedopt
