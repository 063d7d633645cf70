// SGD launcher: fp32 or 8-bit momentum buffer (none without momentum), every param dtype.
#include "quant8.cuh"
#include "sgd.cuh"

namespace fusedopt {

cudaError_t launch_sgd(const MultiTensor& mt, const SgdHyper& h, ScalarKind param, const Quant& quant,
                       cudaStream_t stream) {
  return dispatch_param(param, mt.stochastic, [&](auto p, auto sr) {
    using P = typename decltype(p)::type;
    constexpr bool SR = decltype(sr)::value;
    // Without momentum there is no state to quantize: 8-bit or not, the same kernel.
    if (!h.has_momentum) return launch(elementwise_kernel<Sgd<false>, P, SR>, mt.n_work, stream, mt, Sgd<false>{h});
    if (quant.block_size > 0) return launch_quant8<Sgd<true>, P, SR>(mt, Sgd<true>{h}, quant, stream);
    return launch(elementwise_kernel<Sgd<true>, P, SR>, mt.n_work, stream, mt, Sgd<true>{h});
  });
}

}  // namespace fusedopt
