// LAMB launcher: the moments pass, then the apply pass, on the same stream (or one of them).
#include "lamb.cuh"

namespace fusedopt {

cudaError_t launch_lamb(const MultiTensor& mt, const LambHyper& h, ScalarKind param, LambPasses passes,
                        cudaStream_t stream) {
  return dispatch_param(param, mt.stochastic, [&](auto p, auto sr) {
    using P = typename decltype(p)::type;
    constexpr bool SR = decltype(sr)::value;
    if (passes & kLambMoments) {
      // The moments pass writes no param: one instance whatever the rounding.
      const cudaError_t err = launch(lamb_moments_kernel<P>, mt.n_work, stream, mt, h);
      if (err != cudaSuccess) return err;
    }
    return passes & kLambApply ? launch(lamb_apply_kernel<P, SR>, mt.n_work, stream, mt, h) : cudaSuccess;
  });
}

}  // namespace fusedopt
