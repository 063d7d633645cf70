// Adam / AdamW launcher: fp32 states here, 8-bit states in adam8.cu (a separate translation
// unit so that the two compile in parallel).
#include "adam.cuh"

namespace fusedopt {

cudaError_t launch_adam(const MultiTensor& mt, const AdamHyper& h, ScalarKind param, bool amsgrad,
                        const Quant& quant, cudaStream_t stream) {
  if (quant.block_size > 0) return launch_adam8(mt, h, param, amsgrad, quant, stream);
  return dispatch_param(param, [&](auto p) {
    using P = typename decltype(p)::type;
    if (amsgrad) return launch(elementwise_kernel<Adam<true>, P>, mt.n_work, stream, mt, Adam<true>{h});
    return launch(elementwise_kernel<Adam<false>, P>, mt.n_work, stream, mt, Adam<false>{h});
  });
}

}  // namespace fusedopt
