// Adam / AdamW launcher: fp32 states here, 8-bit states in adam8.cu (a separate translation
// unit so that the two compile in parallel).
#include "adam.cuh"

namespace fusedopt {

cudaError_t launch_adam(const MultiTensor& mt, const AdamHyper& h, ScalarKind param, bool amsgrad,
                        const Quant& quant, cudaStream_t stream) {
  if (quant.block_size > 0) return launch_adam8(mt, h, param, amsgrad, quant, stream);
  return dispatch_param(param, mt.stochastic, [&](auto p, auto sr) {
    using P = typename decltype(p)::type;
    constexpr bool SR = decltype(sr)::value;
    if (amsgrad) return launch(elementwise_kernel<Adam<true>, P, SR>, mt.n_work, stream, mt, Adam<true>{h});
    return launch(elementwise_kernel<Adam<false>, P, SR>, mt.n_work, stream, mt, Adam<false>{h});
  });
}

}  // namespace fusedopt
