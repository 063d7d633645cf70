// Parameter structs shared by the host (ops.cpp, compiled by the C++ compiler with torch's
// headers) and the kernels (*.cu, compiled by nvcc without them), and the launchers' signatures.
// Plain data only: no torch, no device code.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fusedopt {

constexpr int kThreads = 256;

// Columns of a table row. The table is [tensors, kRowWidth] int64.
enum Column : int {
  kNumel = 0,  // elements of the tensor
  kAligned,    // 1 when every address of the row is 16-byte aligned
  kDtype,      // ScalarKind of the tensor at kParam (the global norm's tensors differ)
  kParam,      // address of the param (or of the tensor whose norm is taken)
  kGrad,
  kState0,     // the family's states, in its order (Adam: exp_avg, exp_avg_sq, max_exp_avg_sq;
  kState1,     // RMSprop: square_avg, then momentum_buffer and grad_avg when it has them)
  kState2,
  kAbsmax0,    // 8-bit states: fp32 absmax of each state
  kAbsmax1,
  kAbsmax2,
  kStep,       // 0-d fp32 step count
  kSalt,       // the param's position in its group: salts its stochastic-rounding noise
  kOffset,     // the index of the tensor's first element in its full param (a shard's start,
               // FSDP2): element j draws the noise of element kOffset + j
  kRowWidth
};

// Element type of a param, grad or normed tensor.
enum ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Mirror of fusedopt/scalars.py: the per-step device scalars every kernel reads.
enum StepScalar : int { kGradMult = 0, kSkip = 1, kNorm = 2, kStepScalars = 3 };

// Elements per work item of the 32-bit kernels and the norm (a multiple of kThreads * 8).
constexpr int64_t kChunk = 64 * 1024;

// 8-bit states: elements a block covers per iteration, before rounding down to whole
// quantization blocks, and iterations per work item. A quantization block wider than the span
// (block_size > kQuantSpan) is swept twice by one block instead (see quant8_wide).
constexpr int kQuantVec = 16;
constexpr int64_t kQuantSpan = int64_t(kThreads) * kQuantVec;
constexpr int64_t kQuantSpansPerChunk = 8;

// Elements per work item: kChunk, or for 8-bit states (block_size > 0) whole quantization
// blocks: kQuantSpansPerChunk spans, or for wide blocks as many as fit in as many elements (at
// least one). The table builder and the launchers both use this.
inline int64_t chunk_elements(int64_t block_size) {
  if (block_size <= 0) return kChunk;
  if (block_size <= kQuantSpan) return (kQuantSpan / block_size) * block_size * kQuantSpansPerChunk;
  const int64_t blocks = kQuantSpan * kQuantSpansPerChunk / block_size;
  return (blocks > 0 ? blocks : 1) * block_size;
}

// What every multi-tensor launch shares.
struct MultiTensor {
  const int64_t* table;  // [tensors, kRowWidth]
  const int* work;       // [n_work, 2] of (tensor, chunk)
  int64_t n_work;
  int64_t chunk;         // elements per work item
  const float* scalars;  // [kStepScalars]
  int* counters;         // [tensors] finished chunks; zero between launches
  ScalarKind grad;       // element type of every grad (a runtime switch: see load_grad)
  // bf16 params stored with stochastic rounding (a compile-time choice of the kernel: see
  // dispatch_param), the noise keyed by the group's seed, the step and the row's kSalt, and
  // drawn for each element's index in the full param (the row's kOffset plus its index).
  bool stochastic = false;
  uint32_t seed = 0;
};

// A hyper-parameter: a value fixed at launch, or read on the device from a 1-element fp32
// tensor (a tensor lr changes between steps without the host reading it). The value is the
// host's double (the kernels compute in its fp32 rounding, except Adam's step size).
struct Scalar {
  double value;
  const float* ptr;
};

// A beta (or any value the math takes with its complement: RMSprop's alpha, SGD's dampening), with 1 - beta and log(beta) computed in double on the host when beta is a number (as
// the reference computes them), on the device when it is a tensor (1 - beta in fp32, log(beta)
// in double).
struct Beta {
  float value;
  float one_minus;
  double log;  // log(beta) (-inf for 0): the bias correction 1 - beta^t is -expm1(t * log)
  const float* ptr;
};

// Decoupled weight decay's factor 1 - lr * weight_decay: computed in double on the host when
// both are numbers (as the reference computes it), else on the device in fp32.
struct Decay {
  float value;
  bool on_device;
};

// LAMB and LARS (two_pass.cuh; the elementwise families keep their params structs in their
// own headers).
struct LambHyper {
  Scalar lr;
  Beta beta1, beta2;
  Scalar eps, weight_decay;
  bool bias_correction;
};

struct LarsHyper {
  Scalar lr, momentum, dampening, weight_decay, max_unorm;
  bool nesterov;
};

// The per-tensor norms of the two-pass families (LAMB, LARS; two_pass.cuh).
struct TensorNorms {
  float* partials;  // [n_work, 2]: per work item the sums of p^2 and u^2 (the norms pass)
  float* norms;     // [tensors, 2]: per tensor the sums of p^2 and u^2 (written by the norms
                    // pass, read by the apply pass)
};

// The passes of a two-pass launch: both, or one of them. Sharded params (FSDP2) run them apart
// and sum each tensor's norms over its shards in between.
enum TwoPass : int { kNormsPass = 1, kApplyPass = 2, kBothPasses = 3 };

// 8-bit block-wise states.
struct Quant {
  int64_t block_size;     // elements per absmax (a multiple of 32); 0: fp32 states
  const float* codebook;  // [4, 256]: signed values, unsigned values, signed midpoints,
                          // unsigned midpoints (255 each, padded)
};

enum NormKind : int { kNormInf = 0, kNorm1 = 1, kNorm2 = 2 };

struct NormArgs {
  NormKind kind;
  float* partials;  // [n_work]
  float* out;       // 0-d result
};

cudaError_t launch_lamb(const MultiTensor& mt, const LambHyper& h, const TensorNorms& norms, ScalarKind param,
                        const Quant& quant, TwoPass passes, cudaStream_t stream);
// momentum: whether the momentum buffer exists (momentum != 0), kState0.
cudaError_t launch_lars(const MultiTensor& mt, const LarsHyper& h, const TensorNorms& norms, ScalarKind param,
                        bool momentum, const Quant& quant, TwoPass passes, cudaStream_t stream);
cudaError_t launch_norm(const MultiTensor& mt, const NormArgs& args, cudaStream_t stream);
// Quantize one fp32 tensor with the kernels' own quantizer (tests compare it with
// fusedopt.quant.quantize_blockwise).
cudaError_t launch_quantize(const float* x, int64_t numel, bool is_signed, const Quant& quant, uint8_t* codes,
                            float* absmax, cudaStream_t stream);

}  // namespace fusedopt
