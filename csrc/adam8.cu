// Adam / AdamW with block-wise 8-bit states.
#include "adam.cuh"
#include "quant8.cuh"

namespace fusedopt {

cudaError_t launch_adam8(const MultiTensor& mt, const AdamHyper& h, ScalarKind param, ScalarKind grad,
                         bool amsgrad, const Quant& quant, cudaStream_t stream) {
  return dispatch_types(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    if (amsgrad) return launch(quant8_kernel<Adam<true>, P, G>, mt.n_work, stream, mt, Adam<true>{h}, quant);
    return launch(quant8_kernel<Adam<false>, P, G>, mt.n_work, stream, mt, Adam<false>{h}, quant);
  });
}

}  // namespace fusedopt
