// RMSprop launcher: fp32 states here, 8-bit states in rmsprop8.cu (a separate translation unit
// so that the two compile in parallel). Each variant (momentum, centered) is a kernel of its
// own: each has its own states.
#include "rmsprop.cuh"

namespace fusedopt {

cudaError_t launch_rmsprop(const MultiTensor& mt, const RmspropHyper& h, ScalarKind param, const Quant& quant,
                           cudaStream_t stream) {
  if (quant.block_size > 0) return launch_rmsprop8(mt, h, param, quant, stream);
  return dispatch_param(param, mt.stochastic, [&](auto p, auto sr) {
    using P = typename decltype(p)::type;
    constexpr bool SR = decltype(sr)::value;
    return dispatch_rmsprop(h, [&](auto family) {
      using Family = decltype(family);
      return launch(elementwise_kernel<Family, P, SR>, mt.n_work, stream, mt, family);
    });
  });
}

}  // namespace fusedopt
