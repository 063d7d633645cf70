// Lion launcher: fp32 or 8-bit state, every param dtype.
#include "lion.cuh"
#include "quant8.cuh"

namespace fusedopt {

cudaError_t launch_lion(const MultiTensor& mt, const LionHyper& h, ScalarKind param, const Quant& quant,
                        cudaStream_t stream) {
  return dispatch_param(param, mt.stochastic, [&](auto p, auto sr) {
    using P = typename decltype(p)::type;
    constexpr bool SR = decltype(sr)::value;
    if (quant.block_size > 0) return launch_quant8<Lion, P, SR>(mt, Lion{h}, quant, stream);
    return launch(elementwise_kernel<Lion, P, SR>, mt.n_work, stream, mt, Lion{h});
  });
}

}  // namespace fusedopt
