// Lion launcher: fp32 or 8-bit state, every param and grad dtype.
#include "lion.cuh"
#include "quant8.cuh"

namespace fusedopt {

cudaError_t launch_lion(const MultiTensor& mt, const LionHyper& h, ScalarKind param, ScalarKind grad,
                        const Quant& quant, cudaStream_t stream) {
  return dispatch_types(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    if (quant.block_size > 0) return launch(quant8_kernel<Lion, P, G>, mt.n_work, stream, mt, Lion{h}, quant);
    return launch(elementwise_kernel<Lion, P, G>, mt.n_work, stream, mt, Lion{h});
  });
}

}  // namespace fusedopt
