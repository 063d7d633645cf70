// Adagrad launcher: fp32 or 8-bit sum, every param dtype.
#include "adagrad.cuh"
#include "quant8.cuh"

namespace fusedopt {

cudaError_t launch_adagrad(const MultiTensor& mt, const AdagradHyper& h, ScalarKind param, const Quant& quant,
                           cudaStream_t stream) {
  return dispatch_param(param, mt.stochastic, [&](auto p, auto sr) {
    using P = typename decltype(p)::type;
    constexpr bool SR = decltype(sr)::value;
    if (quant.block_size > 0) return launch_quant8<Adagrad, P, SR>(mt, Adagrad{h}, quant, stream);
    return launch(elementwise_kernel<Adagrad, P, SR>, mt.n_work, stream, mt, Adagrad{h});
  });
}

}  // namespace fusedopt
