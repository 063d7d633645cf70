// Global norm launcher: partials, then one block that finishes them.
#include "norm.cuh"

namespace fusedopt {

template <NormKind K>
static cudaError_t norm_passes(const MultiTensor& mt, const NormArgs& args, cudaStream_t stream) {
  const cudaError_t err = launch(norm_partials_kernel<K>, mt.n_work, stream, mt, args);
  if (err != cudaSuccess) return err;
  FUSEDOPT_LAUNCH(norm_finish_kernel<K>, 1, kThreads, 0, stream)(mt.n_work, args);
  return cudaGetLastError();
}

cudaError_t launch_norm(const MultiTensor& mt, const NormArgs& args, cudaStream_t stream) {
  switch (args.kind) {
    case kNormInf: return norm_passes<kNormInf>(mt, args, stream);
    case kNorm2: return norm_passes<kNorm2>(mt, args, stream);
    case kNorm1: return norm_passes<kNorm1>(mt, args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedopt
