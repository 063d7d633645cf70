// LARS with a block-wise 8-bit momentum buffer (LARS8bit).
#include "lars.cuh"

namespace fusedopt {

cudaError_t launch_lars8(const MultiTensor& mt, const LarsHyper& h, const TensorNorms& norms, ScalarKind param,
                         const Quant& quant, TwoPass passes, cudaStream_t stream) {
  return launch_two_pass<Lars<true>, true>(mt, Lars<true>{h}, norms, param, quant, passes, stream);
}

}  // namespace fusedopt
