// Adam / AdamW with block-wise 8-bit states.
#include "adam.cuh"
#include "quant8.cuh"

namespace fusedopt {

cudaError_t launch_adam8(const MultiTensor& mt, const AdamHyper& h, ScalarKind param, bool amsgrad,
                         const Quant& quant, cudaStream_t stream) {
  return dispatch_param(param, mt.stochastic, [&](auto p, auto sr) {
    using P = typename decltype(p)::type;
    constexpr bool SR = decltype(sr)::value;
    if (amsgrad) return launch_quant8<Adam<true>, P, SR>(mt, Adam<true>{h}, quant, stream);
    return launch_quant8<Adam<false>, P, SR>(mt, Adam<false>{h}, quant, stream);
  });
}

}  // namespace fusedopt
