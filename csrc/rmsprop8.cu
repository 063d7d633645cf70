// RMSprop with block-wise 8-bit states.
#include "quant8.cuh"
#include "rmsprop.cuh"

namespace fusedopt {

cudaError_t launch_rmsprop8(const MultiTensor& mt, const RmspropHyper& h, ScalarKind param, const Quant& quant,
                            cudaStream_t stream) {
  return dispatch_param(param, mt.stochastic, [&](auto p, auto sr) {
    using P = typename decltype(p)::type;
    constexpr bool SR = decltype(sr)::value;
    return dispatch_rmsprop(h, [&](auto family) {
      return launch_quant8<decltype(family), P, SR>(mt, family, quant, stream);
    });
  });
}

}  // namespace fusedopt
