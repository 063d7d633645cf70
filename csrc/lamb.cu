// LAMB launcher: fp32 states here, 8-bit states in lamb8.cu (a separate translation unit so
// that the two compile in parallel).
#include "lamb.cuh"

namespace fusedopt {

cudaError_t launch_lamb(const MultiTensor& mt, const LambHyper& h, const TensorNorms& norms, ScalarKind param,
                        const Quant& quant, TwoPass passes, cudaStream_t stream) {
  if (quant.block_size > 0) return launch_lamb8(mt, h, norms, param, quant, passes, stream);
  return launch_two_pass<Lamb, false>(mt, Lamb{h}, norms, param, quant, passes, stream);
}

}  // namespace fusedopt
