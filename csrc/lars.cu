// LARS launcher: fp32 states here, an 8-bit momentum buffer in lars8.cu (a separate translation
// unit so that the two compile in parallel).
#include "lars.cuh"

namespace fusedopt {

cudaError_t launch_lars(const MultiTensor& mt, const LarsHyper& h, const TensorNorms& norms, ScalarKind param,
                        bool momentum, const Quant& quant, TwoPass passes, cudaStream_t stream) {
  if (!momentum) return launch_two_pass<Lars<false>, false>(mt, Lars<false>{h}, norms, param, quant, passes, stream);
  if (quant.block_size > 0) return launch_lars8(mt, h, norms, param, quant, passes, stream);
  return launch_two_pass<Lars<true>, false>(mt, Lars<true>{h}, norms, param, quant, passes, stream);
}

}  // namespace fusedopt
