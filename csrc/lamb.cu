// LAMB launcher: the moments pass, then the apply pass, on the same stream.
#include "lamb.cuh"

namespace fusedopt {

cudaError_t launch_lamb(const MultiTensor& mt, const LambHyper& h, ScalarKind param, ScalarKind grad,
                        cudaStream_t stream) {
  return dispatch_types(param, grad, [&](auto p, auto g) {
    using P = typename decltype(p)::type;
    using G = typename decltype(g)::type;
    const cudaError_t err = launch(lamb_moments_kernel<P, G>, mt.n_work, stream, mt, h);
    if (err != cudaSuccess) return err;
    return launch(lamb_apply_kernel<P, G>, mt.n_work, stream, mt, h);
  });
}

}  // namespace fusedopt
