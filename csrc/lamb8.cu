// LAMB with block-wise 8-bit states (LAMB8bit).
#include "lamb.cuh"

namespace fusedopt {

cudaError_t launch_lamb8(const MultiTensor& mt, const LambHyper& h, const TensorNorms& norms, ScalarKind param,
                         const Quant& quant, TwoPass passes, cudaStream_t stream) {
  return launch_two_pass<Lamb, true>(mt, Lamb{h}, norms, param, quant, passes, stream);
}

}  // namespace fusedopt
