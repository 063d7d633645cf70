// LAMB launcher: the moments pass, then the apply pass, on the same stream.
#include "lamb.cuh"

namespace fusedopt {

cudaError_t launch_lamb(const MultiTensor& mt, const LambHyper& h, ScalarKind param, cudaStream_t stream) {
  return dispatch_param(param, [&](auto p) {
    using P = typename decltype(p)::type;
    const cudaError_t err = launch(lamb_moments_kernel<P>, mt.n_work, stream, mt, h);
    if (err != cudaSuccess) return err;
    return launch(lamb_apply_kernel<P>, mt.n_work, stream, mt, h);
  });
}

}  // namespace fusedopt
