// The torch side of the CUDA backend: every input is checked here (each message names the
// argument), the device tables are built here, and the ops are registered as torch.ops.fusedopt.*.
// The kernels (*.cu) see only the plain structs of params.h and family.h.
//
// Ops (schemas in TORCH_LIBRARY below; fake implementations in fusedopt/cuda_backend.py):
//   make_table   (host) the [tensors, kRowWidth] int64 address table (with each param's salt: its
//                position in its group, and offset: where a shard starts in its full param) and
//                the (tensor, chunk) work list of a batch, as CPU tensors; the backend caches
//                them on the device.
//   elementwise_ one step of an elementwise family (Adam/AdamW, Lion, SGD, Adagrad, RMSprop) over
//                a batch, in place: the family by name, its states in its own order (states0..2,
//                absmaxes0..2 when 8-bit), its hyper-parameters and switches by name.
//   lamb_, lars_ one step of a two-pass family over a batch, in place (two kernels,
//                csrc/two_pass.cuh); fp32 or 8-bit states.
//                All round bf16 params to nearest, or with stochastic_rounding under the group's
//                seed (the reference's bits).
//   lamb_moments_, lamb_apply_, lars_norms_, lars_apply_   the two passes apart, for sharded params
//                (FSDP2): the per-tensor norms the first returns are summed over the shards
//                before the second.
//   global_norm  the norm of many tensors (mixed dtypes), deterministic.
//   quantize_blockwise   the kernels' 8-bit quantizer, for tests.
//
// Checks come in an order that lets a machine without a GPU test them: list lengths, then
// dtypes, shapes and layouts, then devices.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

// FUSEDOPT_CUDA_EMULATION: the test-only build of tests/cuda_emu/, whose kernels run on the host:
// the ops take CPU tensors and register as torch.ops.fusedopt_emu.*, with no device guard or
// stream. Every other line is the same in both builds.
#ifdef FUSEDOPT_CUDA_EMULATION
#define FUSEDOPT_NAMESPACE fusedopt_emu
#define FUSEDOPT_DEVICE_GUARD(device) (void)(device)
#define C10_CUDA_CHECK(expr)                                                             \
  do {                                                                                   \
    const cudaError_t error_ = (expr);                                                   \
    TORCH_CHECK(error_ == cudaSuccess, "fusedopt: emulated launch failed, error ", int(error_)); \
  } while (0)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FUSEDOPT_NAMESPACE fusedopt
#define FUSEDOPT_DEVICE_GUARD(device) const c10::cuda::CUDAGuard guard(device)
#endif
// TORCH_LIBRARY pastes its namespace argument: expanded here first.
#define FUSEDOPT_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define FUSEDOPT_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "family.h"
#include "params.h"

namespace fusedopt {
namespace {

using at::Tensor;
using at::TensorList;

// An argument's name for messages, formatted only when a check fails (a step checks every
// tensor of a batch: no string is built on the way). index < 0: not a list item.
struct Name {
  Name(const char* list_, int64_t index_ = -1, const char* note_ = nullptr)
      : list(list_), index(index_), note(note_) {}
  const char* list;
  int64_t index;
  const char* note;
};

std::ostream& operator<<(std::ostream& os, const Name& n) {
  os << n.list;
  if (n.index >= 0) os << "[" << n.index << "]";
  if (n.note) os << " (" << n.note << ")";
  return os;
}

ScalarKind kind_of(const Tensor& t, const Name& name, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      TORCH_CHECK(false, "fusedopt.", op, ": ", name, " has dtype ", t.scalar_type(),
                  "; the cuda backend takes float32, bfloat16 and float16 tensors");
  }
}

const char* kind_name(ScalarKind k) {
  return k == kFloat32 ? "float32" : k == kBFloat16 ? "bfloat16" : "float16";
}

void check_length(TensorList list, const Name& name, size_t expected, const char* op) {
  TORCH_CHECK(list.size() == expected, "fusedopt.", op, ": ", name, " has ", list.size(), " tensors; expected ",
              expected, expected ? " (one per param)" : " (the stream is not used)");
}

void check_dtype(const Tensor& t, const Name& name, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(t.scalar_type() == dtype, "fusedopt.", op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// Read and written as flat memory from its address: every element at its own address, no
// gaps (strides a permutation of a contiguous layout: transposed, channels_last, ...).
void check_dense(const Tensor& t, const Name& name, const char* op) {
  TORCH_CHECK(t.layout() == at::kStrided, "fusedopt.", op, ": ", name, " must be a dense tensor, got ", t.layout());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "fusedopt.", op, ": ", name,
              " must be non-overlapping and dense (it is read and written as flat memory through its address), "
              "got sizes ", t.sizes(), " and strides ", t.strides());
}

// A param's grad and states are read element for element with it as flat memory: they must lie
// in its layout (the same strides on every dimension of more than one element).
void check_layout(const Tensor& t, const Name& name, const Tensor& p, const Name& pname, const char* op) {
  if (t.is_contiguous() && p.is_contiguous()) return;
  bool same = t.sizes() == p.sizes();
  for (int64_t d = 0; same && d < p.dim(); ++d) same = p.size(d) == 1 || t.stride(d) == p.stride(d);
  TORCH_CHECK(same, "fusedopt.", op, ": ", name, " has sizes ", t.sizes(), " and strides ", t.strides(), " but ",
              pname, " has sizes ", p.sizes(), " and strides ", p.strides(),
              "; a param's grad and states must be laid out as the param");
}

void check_numel(const Tensor& t, const Name& name, int64_t numel, const Name& of, const char* op) {
  TORCH_CHECK(t.numel() == numel, "fusedopt.", op, ": ", name, " has ", t.numel(), " elements; ", of, " has ", numel);
}

void check_cuda(const Tensor& t, const Name& name, const char* op) {
#ifdef FUSEDOPT_CUDA_EMULATION
  TORCH_CHECK(t.is_cpu(), "fusedopt.", op, ": ", name, " must be a CPU tensor (emulated CUDA), got a ",
              t.device().type(), " tensor");
#else
  TORCH_CHECK(t.is_cuda(), "fusedopt.", op, ": ", name, " must be a CUDA tensor, got a ", t.device().type(),
              " tensor");
#endif
}

int64_t num_blocks(int64_t numel, int64_t block_size) { return (numel + block_size - 1) / block_size; }

// Every block size the optimizers accept (a positive multiple of 32; quant8.cuh sweeps blocks
// wider than kQuantSpan twice).
void check_block_size(int64_t block_size, const char* op) {
  TORCH_CHECK(block_size == 0 || (block_size > 0 && block_size % 32 == 0), "fusedopt.", op,
              ": block_size must be 0 (fp32 states) or a positive multiple of 32, got ", block_size);
}

// The tensors that must share one CUDA device, checked last: every other check runs first, so
// that a machine without a GPU can test them with CPU tensors.
struct OnDevice {
  std::vector<std::pair<TensorList, const char*>> lists;
  std::vector<std::pair<Tensor, Name>> tensors;

  void add(TensorList list, const char* name) { lists.emplace_back(list, name); }
  void add(const Tensor& t, const Name& name) { tensors.emplace_back(t, name); }

  at::Device check(const char* op) const {
    const Tensor& first = lists.empty() ? tensors.front().first : lists.front().first[0];
    check_cuda(first, lists.empty() ? tensors.front().second : Name{lists.front().second, 0}, op);
    const at::Device device = first.device();
    auto same = [&](const Tensor& t, const Name& name) {
      TORCH_CHECK(t.device() == device, "fusedopt.", op, ": ", name, " is on ", t.device(), " but ",
                  lists.empty() ? tensors.front().second : Name{lists.front().second, 0}, " is on ", device);
    };
    for (const auto& [list, name] : lists)
      for (size_t i = 0; i < list.size(); ++i) same(list[i], Name{name, int64_t(i)});
    for (const auto& [t, name] : tensors) same(t, name);
    return device;
  }
};

const char* const kAdamStateLists[3] = {"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};
const char* const kAdamAbsmaxLists[3] = {"exp_avg_absmaxes", "exp_avg_sq_absmaxes", "max_exp_avg_sq_absmaxes"};
const char* const kStateLists[3] = {"states0", "states1", "states2"};
const char* const kAbsmaxLists[3] = {"absmaxes0", "absmaxes1", "absmaxes2"};

// The tensors of a batch, stream by stream, as the table lays them out, and for messages the
// op's names of the state lists and, where the op is family-neutral, the family's name of each
// state ("states1 (momentum_buffer)").
struct Streams {
  TensorList params, grads, states[3], absmaxes[3], steps;
  const char* const* state_lists = kAdamStateLists;
  const char* const* absmax_lists = kAdamAbsmaxLists;
  const char* const* notes = nullptr;

  Name state(int k, int64_t i = -1) const { return Name{state_lists[k], i, notes ? notes[k] : nullptr}; }
  Name absmax(int k, int64_t i = -1) const { return Name{absmax_lists[k], i, notes ? notes[k] : nullptr}; }
};

// Lengths, dtypes, layouts and sizes of a batch. `num_states` state lists hold one tensor per
// param, the others are empty; with block_size > 0 the states are uint8 codes with fp32
// absmaxes, else fp32. Adds every tensor to `on_device`.
void check_streams(const Streams& s, int num_states, int64_t block_size, OnDevice& on_device, const char* op) {
  check_block_size(block_size, op);
  const size_t n = s.params.size();
  check_length(s.grads, "grads", n, op);
  check_length(s.steps, "steps", n, op);
  for (int k = 0; k < 3; ++k) {
    check_length(s.states[k], s.state(k), k < num_states ? n : 0, op);
    check_length(s.absmaxes[k], s.absmax(k), k < num_states && block_size > 0 ? n : 0, op);
  }
  if (n == 0) return;
  const ScalarKind param_kind = kind_of(s.params[0], Name{"params", 0}, op);
  const ScalarKind grad_kind = kind_of(s.grads[0], Name{"grads", 0}, op);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = s.params[i];
    const int64_t numel = p.numel();
    const Name pname{"params", int64_t(i)}, gname{"grads", int64_t(i)}, sname{"steps", int64_t(i)};
    TORCH_CHECK(kind_of(p, pname, op) == param_kind, "fusedopt.", op, ": ", pname, " is ", p.scalar_type(),
                " but params[0] is ", kind_name(param_kind), "; a batch has one param dtype");
    check_dense(p, pname, op);
    TORCH_CHECK(kind_of(s.grads[i], gname, op) == grad_kind, "fusedopt.", op, ": ", gname, " is ",
                s.grads[i].scalar_type(), " but grads[0] is ", kind_name(grad_kind), "; a batch has one grad dtype");
    check_dense(s.grads[i], gname, op);
    check_numel(s.grads[i], gname, numel, pname, op);
    check_layout(s.grads[i], gname, p, pname, op);
    for (int k = 0; k < num_states; ++k) {
      const Name name = s.state(k, int64_t(i));
      check_dtype(s.states[k][i], name, block_size > 0 ? at::kByte : at::kFloat, op);
      check_dense(s.states[k][i], name, op);
      check_numel(s.states[k][i], name, numel, pname, op);
      check_layout(s.states[k][i], name, p, pname, op);
      if (block_size > 0) {
        const Name aname = s.absmax(k, int64_t(i));
        check_dtype(s.absmaxes[k][i], aname, at::kFloat, op);
        check_dense(s.absmaxes[k][i], aname, op);
        TORCH_CHECK(s.absmaxes[k][i].numel() == num_blocks(numel, block_size), "fusedopt.", op, ": ", aname, " has ",
                    s.absmaxes[k][i].numel(), " elements; ", pname, " has ", numel, " elements, so block_size=",
                    block_size, " needs ", num_blocks(numel, block_size));
      }
    }
    check_dtype(s.steps[i], sname, at::kFloat, op);
    TORCH_CHECK(s.steps[i].numel() == 1, "fusedopt.", op, ": ", sname, " must have one element, got ",
                s.steps[i].numel());
  }
  on_device.add(s.params, "params");
  on_device.add(s.grads, "grads");
  for (int k = 0; k < num_states; ++k) {
    on_device.add(s.states[k], s.state_lists[k]);
    if (block_size > 0) on_device.add(s.absmaxes[k], s.absmax_lists[k]);
  }
  on_device.add(s.steps, "steps");
}

void check_plan(const Tensor& table, const Tensor& work, const Tensor& counters, size_t n, OnDevice& on_device,
                const char* op) {
  check_dtype(table, Name{"table"}, at::kLong, op);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == int64_t(n) && table.size(1) == kRowWidth && table.is_contiguous(),
              "fusedopt.", op, ": table must be a contiguous [", n, ", ", int(kRowWidth),
              "] tensor (from make_table), got ", table.sizes());
  check_dtype(work, Name{"work"}, at::kInt, op);
  TORCH_CHECK(work.dim() == 2 && work.size(1) == 2 && work.is_contiguous(), "fusedopt.", op,
              ": work must be a contiguous [n_work, 2] tensor (from make_table), got ", work.sizes());
  on_device.add(table, Name{"table"});
  on_device.add(work, Name{"work"});
  if (counters.defined()) {
    check_dtype(counters, Name{"counters"}, at::kInt, op);
    TORCH_CHECK(counters.numel() == int64_t(n) && counters.is_contiguous(), "fusedopt.", op,
                ": counters must be a contiguous zero-filled tensor of ", n, " elements, got ", counters.sizes());
    on_device.add(counters, Name{"counters"});
  }
}

void check_scalars(const Tensor& scalars, OnDevice& on_device, const char* op) {
  check_dtype(scalars, Name{"scalars"}, at::kFloat, op);
  TORCH_CHECK(scalars.numel() == kStepScalars && scalars.is_contiguous(), "fusedopt.", op,
              ": scalars must be a contiguous tensor of ", int(kStepScalars), " elements (fusedopt.scalars), got ",
              scalars.sizes());
  on_device.add(scalars, Name{"scalars"});
}

// Stochastic rounding: bf16 params only (the others are stored to nearest, or exactly), and a
// 32-bit seed. Returns the seed.
uint32_t check_rounding(bool stochastic_rounding, int64_t seed, const Tensor& param, const char* op) {
  TORCH_CHECK(seed >= 0 && seed <= int64_t(UINT32_MAX), "fusedopt.", op, ": seed must be in [0, 2**32), got ", seed);
  TORCH_CHECK(!stochastic_rounding || param.scalar_type() == at::kBFloat16, "fusedopt.", op,
              ": stochastic_rounding applies to bfloat16 params; params[0] is ", param.scalar_type());
  return uint32_t(seed);
}

void check_codebook(const std::optional<Tensor>& codebook, int64_t block_size, OnDevice& on_device, const char* op) {
  if (block_size == 0) return;
  TORCH_CHECK(codebook.has_value(), "fusedopt.", op, ": codebook is required with 8-bit states (block_size=",
              block_size, ")");
  const Tensor& c = *codebook;
  check_dtype(c, Name{"codebook"}, at::kFloat, op);
  TORCH_CHECK(c.dim() == 2 && c.size(0) == 4 && c.size(1) == 256 && c.is_contiguous(), "fusedopt.", op,
              ": codebook must be a contiguous [4, 256] tensor (signed and unsigned values, then midpoints), got ",
              c.sizes());
  on_device.add(c, Name{"codebook"});
}

// Hyper-parameters: numbers in `hyper`, or 1-element fp32 device tensors in `hyper_tensors`
// (None where the number is used), both in the order of `names`.
struct Hyper {
  std::vector<double> values;
  std::vector<const float*> ptrs;
  Scalar scalar(int i) const { return Scalar{values[i], ptrs[i]}; }
  Beta beta(int i) const {
    const double log = values[i] > 0 ? std::log(values[i]) : -std::numeric_limits<double>::infinity();
    return Beta{float(values[i]), float(1.0 - values[i]), log, ptrs[i]};
  }
};

Hyper check_hyper(at::ArrayRef<double> hyper, const c10::List<std::optional<Tensor>>& hyper_tensors,
                  const std::vector<const char*>& names, OnDevice& on_device, const char* op) {
  const size_t n = names.size();
  TORCH_CHECK(hyper.size() == n && hyper_tensors.size() == n, "fusedopt.", op, ": hyper and hyper_tensors must hold ",
              n, " entries each, got ", hyper.size(), " and ", hyper_tensors.size());
  Hyper h{std::vector<double>(hyper.begin(), hyper.end()), std::vector<const float*>(n, nullptr)};
  size_t i = 0;
  for (const char* name : names) {
    const std::optional<Tensor> t = hyper_tensors.get(i);
    if (t.has_value()) {
      const Name label{"hyper_tensors", int64_t(i), name};
      check_dtype(*t, label, at::kFloat, op);
      TORCH_CHECK(t->numel() == 1, "fusedopt.", op, ": ", label, " must have one element, got ", t->numel());
      on_device.add(*t, label);
      h.ptrs[i] = t->data_ptr<float>();
    }
    ++i;
  }
  return h;
}

MultiTensor multi_tensor(const Tensor& table, const Tensor& work, const Tensor& scalars, const Tensor& counters,
                         int64_t chunk, ScalarKind grad = kFloat32, bool stochastic = false, uint32_t seed = 0) {
  return MultiTensor{table.data_ptr<int64_t>(),
                     work.data_ptr<int>(),
                     work.size(0),
                     chunk,
                     scalars.defined() ? scalars.data_ptr<float>() : nullptr,
                     counters.defined() ? counters.data_ptr<int>() : nullptr,
                     grad,
                     stochastic,
                     seed};
}

#ifdef FUSEDOPT_CUDA_EMULATION
cudaStream_t stream_of(const at::Device&) { return nullptr; }
#else
cudaStream_t stream_of(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }
#endif

// ---- the ops ----------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> make_table(TensorList params, TensorList grads, TensorList states0, TensorList states1,
                                      TensorList states2, TensorList absmaxes0, TensorList absmaxes1,
                                      TensorList absmaxes2, TensorList steps, int64_t block_size,
                                      at::IntArrayRef salts, at::IntArrayRef offsets) {
  const char* op = "make_table";
  check_block_size(block_size, op);
  const size_t n = params.size();
  TORCH_CHECK(salts.empty() || salts.size() == n, "fusedopt.", op, ": salts has ", salts.size(),
              " entries; expected none or one per param (", n, ")");
  for (size_t i = 0; i < salts.size(); ++i)
    TORCH_CHECK(salts[i] >= 0 && salts[i] <= int64_t(UINT32_MAX), "fusedopt.", op, ": salts[", i,
                "] must be in [0, 2**32), got ", salts[i]);
  TORCH_CHECK(offsets.empty() || offsets.size() == n, "fusedopt.", op, ": offsets has ", offsets.size(),
              " entries; expected none or one per param (", n, ")");
  for (size_t i = 0; i < offsets.size(); ++i)
    TORCH_CHECK(offsets[i] >= 0, "fusedopt.", op, ": offsets[", i, "] must be >= 0, got ", offsets[i]);
  const Streams s{params, grads, {states0, states1, states2}, {absmaxes0, absmaxes1, absmaxes2}, steps};
  // Each list is empty (the stream is not used) or holds one tensor per param.
  auto optional_list = [&](TensorList list, const char* name) {
    TORCH_CHECK(list.empty() || list.size() == n, "fusedopt.", op, ": ", name, " has ", list.size(),
                " tensors; expected none or one per param (", n, ")");
  };
  optional_list(grads, "grads");
  optional_list(steps, "steps");
  for (int k = 0; k < 3; ++k) {
    optional_list(s.states[k], kStateLists[k]);
    optional_list(s.absmaxes[k], kAbsmaxLists[k]);
  }
  const int64_t chunk = chunk_elements(block_size);
  Tensor table = at::empty({int64_t(n), kRowWidth}, at::TensorOptions().dtype(at::kLong));
  int64_t* rows = table.data_ptr<int64_t>();
  std::vector<int> work;
  auto address = [](TensorList list, size_t i) -> int64_t {
    return list.empty() ? 0 : reinterpret_cast<int64_t>(list[i].data_ptr());
  };
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    const Name pname{"params", int64_t(i)};
    int64_t* row = rows + i * kRowWidth;
    row[kNumel] = p.numel();
    row[kDtype] = kind_of(p, pname, op);
    row[kParam] = address(params, i);
    row[kGrad] = address(grads, i);
    for (int k = 0; k < 3; ++k) {
      row[kState0 + k] = address(s.states[k], i);
      row[kAbsmax0 + k] = address(s.absmaxes[k], i);
    }
    row[kStep] = address(steps, i);
    row[kSalt] = salts.empty() ? 0 : salts[i];
    row[kOffset] = offsets.empty() ? 0 : offsets[i];
    bool aligned = true;
    for (int c : {kParam, kGrad, kState0, kState1, kState2}) aligned = aligned && row[c] % 16 == 0;
    row[kAligned] = aligned;
    const int64_t chunks = p.numel() == 0 ? 1 : (p.numel() + chunk - 1) / chunk;
    TORCH_CHECK(chunks <= INT32_MAX, "fusedopt.", op, ": ", pname, " is too large (", p.numel(), " elements)");
    for (int64_t c = 0; c < chunks; ++c) {
      work.push_back(int(i));
      work.push_back(int(c));
    }
  }
  Tensor work_list = at::empty({int64_t(work.size() / 2), 2}, at::TensorOptions().dtype(at::kInt));
  std::copy(work.begin(), work.end(), work_list.data_ptr<int>());
  return {table, work_list};
}

// ---- the two-pass families (LAMB, LARS: two_pass.cuh) -------------------------------------------
//
// Each has three ops: <family>_ (both passes), and for sharded params (FSDP2) the two apart:
// <family>_norms_ (lamb_moments_ for LAMB; pass 1: returns each tensor's [sum p^2, sum u^2] over the elements it holds,
// for a shard this rank's part; fp32 states are updated, 8-bit ones are not) and <family>_apply_
// (pass 2 with the norms summed over the shards: the param, 8-bit states and steps). Every op
// takes the grads (pass 2 reads them for 8-bit states and for some families' u).

// What every two-pass op checks after check_streams: scalars, tables, codebook, hyper-parameters.
Hyper check_two_pass(const Tensor& scalars, const Tensor& table, const Tensor& work, const Tensor& counters, size_t n,
                     const std::optional<Tensor>& codebook, int64_t block_size, at::ArrayRef<double> hyper,
                     const c10::List<std::optional<Tensor>>& hyper_tensors, const std::vector<const char*>& names,
                     OnDevice& on_device, const char* op) {
  check_scalars(scalars, on_device, op);
  check_plan(table, work, counters, n, on_device, op);
  check_codebook(codebook, block_size, on_device, op);
  return check_hyper(hyper, hyper_tensors, names, on_device, op);
}

// The norms an apply op takes: [tensors, 2] fp32, from the norms op `from`.
void check_norms(const Tensor& norms, size_t n, OnDevice& on_device, const char* op, const char* from) {
  check_dtype(norms, Name{"norms"}, at::kFloat, op);
  TORCH_CHECK(norms.dim() == 2 && norms.size(0) == int64_t(n) && norms.size(1) == 2 && norms.is_contiguous(),
              "fusedopt.", op, ": norms must be a contiguous [", n, ", 2] tensor (from ", from, "), got ",
              norms.sizes());
  on_device.add(norms, Name{"norms"});
}

Tensor new_norms(size_t n, const Tensor& scalars) {
  return at::empty({int64_t(n), 2}, scalars.options().dtype(at::kFloat));
}

// One two-pass op: the checks (the family's `num_states` streams and hyper-parameters `names`),
// then `passes`, launched by launch(hyper, mt, norms, param, quant, passes, stream) (the family's
// launcher). The apply op takes `norms` (from `norms_op`), summed over the shards; the norms op
// returns the new ones; the others return an undefined tensor.
template <typename Launch>
Tensor two_pass_op(const Streams& s, int num_states, const Tensor& scalars, const Tensor& table, const Tensor& work,
                   const Tensor& counters, const std::optional<Tensor>& codebook, int64_t block_size,
                   const Tensor& norms, at::ArrayRef<double> hyper,
                   const c10::List<std::optional<Tensor>>& hyper_tensors, const std::vector<const char*>& names,
                   TwoPass passes, bool stochastic_rounding, int64_t seed, const char* op, const char* norms_op,
                   Launch&& launch) {
  OnDevice on_device;
  check_streams(s, num_states, block_size, on_device, op);
  if (s.params.empty()) return passes == kNormsPass ? new_norms(0, scalars) : Tensor();
  const Hyper h = check_two_pass(scalars, table, work, counters, s.params.size(), codebook, block_size, hyper,
                                 hyper_tensors, names, on_device, op);
  if (passes == kApplyPass) check_norms(norms, s.params.size(), on_device, op, norms_op);
  const uint32_t seed32 = check_rounding(stochastic_rounding, seed, s.params[0], op);
  const at::Device device = on_device.check(op);

  FUSEDOPT_DEVICE_GUARD(device);
  const Tensor out = passes == kApplyPass ? norms : new_norms(s.params.size(), scalars);
  // Per-work-item partials of the norms pass: every slot is written before it is read.
  const Tensor partials = passes & kNormsPass ? at::empty({work.size(0), 2}, scalars.options()) : Tensor();
  const TensorNorms args{partials.defined() ? partials.data_ptr<float>() : nullptr, out.data_ptr<float>()};
  const Quant quant{block_size, block_size > 0 ? codebook->data_ptr<float>() : nullptr};
  const MultiTensor mt = multi_tensor(table, work, scalars, counters, chunk_elements(block_size),
                                      kind_of(s.grads[0], Name{"grads", 0}, op), stochastic_rounding, seed32);
  C10_CUDA_CHECK(launch(h, mt, args, kind_of(s.params[0], Name{"params", 0}, op), quant, passes, stream_of(device)));
  return passes == kNormsPass ? out : Tensor();
}

// LAMB: hyper = lr, beta1, beta2, eps, weight_decay; exp_avgs and exp_avg_sqs fp32 (block_size 0)
// or 8-bit codes with their absmaxes.
Tensor lamb_op(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
               TensorList exp_avg_absmaxes, TensorList exp_avg_sq_absmaxes, TensorList steps, const Tensor& scalars,
               const Tensor& table, const Tensor& work, const Tensor& counters,
               const std::optional<Tensor>& codebook, const Tensor& norms, at::ArrayRef<double> hyper,
               const c10::List<std::optional<Tensor>>& hyper_tensors, bool bias_correction, int64_t block_size,
               TwoPass passes, bool stochastic_rounding, int64_t seed, const char* op) {
  const Streams s{params, grads, {exp_avgs, exp_avg_sqs, {}}, {exp_avg_absmaxes, exp_avg_sq_absmaxes, {}}, steps};
  return two_pass_op(
      s, 2, scalars, table, work, counters, codebook, block_size, norms, hyper, hyper_tensors,
      {"lr", "beta1", "beta2", "eps", "weight_decay"}, passes, stochastic_rounding, seed, op, "lamb_moments_",
      [&](const Hyper& h, const MultiTensor& mt, const TensorNorms& n, ScalarKind param, const Quant& quant,
          TwoPass which, cudaStream_t stream) {
        const LambHyper args{h.scalar(0), h.beta(1), h.beta(2), h.scalar(3), h.scalar(4), bias_correction};
        return launch_lamb(mt, args, n, param, quant, which, stream);
      });
}

void lamb_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
           TensorList exp_avg_absmaxes, TensorList exp_avg_sq_absmaxes, TensorList steps, const Tensor& scalars,
           const Tensor& table, const Tensor& work, const Tensor& counters, const std::optional<Tensor>& codebook,
           at::ArrayRef<double> hyper, const c10::List<std::optional<Tensor>>& hyper_tensors, bool bias_correction,
           int64_t block_size, bool stochastic_rounding, int64_t seed) {
  lamb_op(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes, steps, scalars, table, work,
          counters, codebook, Tensor(), hyper, hyper_tensors, bias_correction, block_size, kBothPasses,
          stochastic_rounding, seed, "lamb_");
}

// LAMB's first pass: fp32 moments updated in place (8-bit ones are written by the apply pass),
// and each tensor's [sum p^2, sum u^2] over the elements it holds (for a shard: this rank's part).
Tensor lamb_moments_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                     TensorList exp_avg_absmaxes, TensorList exp_avg_sq_absmaxes, TensorList steps,
                     const Tensor& scalars, const Tensor& table, const Tensor& work, const Tensor& counters,
                     const std::optional<Tensor>& codebook, at::ArrayRef<double> hyper,
                     const c10::List<std::optional<Tensor>>& hyper_tensors, bool bias_correction, int64_t block_size) {
  return lamb_op(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes, steps, scalars, table,
                 work, counters, codebook, Tensor(), hyper, hyper_tensors, bias_correction, block_size, kNormsPass,
                 false, 0, "lamb_moments_");
}

// LAMB's second pass: p -= lr * r * u with r from `norms` (lamb_moments_'s, summed over the
// shards), 8-bit moments requantized, and the steps advanced.
void lamb_apply_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList exp_avg_absmaxes, TensorList exp_avg_sq_absmaxes, TensorList steps, const Tensor& scalars,
                 const Tensor& table, const Tensor& work, const Tensor& counters,
                 const std::optional<Tensor>& codebook, const Tensor& norms, at::ArrayRef<double> hyper,
                 const c10::List<std::optional<Tensor>>& hyper_tensors, bool bias_correction, int64_t block_size,
                 bool stochastic_rounding, int64_t seed) {
  lamb_op(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes, steps, scalars, table, work,
          counters, codebook, norms, hyper, hyper_tensors, bias_correction, block_size, kApplyPass,
          stochastic_rounding, seed, "lamb_apply_");
}

// LARS: hyper = lr, momentum, dampening, weight_decay, max_unorm. The momentum buffer (fp32, or
// with block_size > 0 8-bit codes with their absmaxes) is kept when momentum != 0
// (fusedopt.families.LARS): the op runs with it when momentum_buffers is not empty, and without it
// (u = d) when it is; a number momentum must agree.
const char* const kLarsStateNames[3] = {"momentum_buffers", "(unused)", "(unused)"};
const char* const kLarsAbsmaxNames[3] = {"momentum_buffer_absmaxes", "(unused)", "(unused)"};

Tensor lars_op(TensorList params, TensorList grads, TensorList momentum_buffers,
               TensorList momentum_buffer_absmaxes, TensorList steps, const Tensor& scalars, const Tensor& table,
               const Tensor& work, const Tensor& counters, const std::optional<Tensor>& codebook,
               const Tensor& norms, at::ArrayRef<double> hyper, const c10::List<std::optional<Tensor>>& hyper_tensors,
               bool nesterov, int64_t block_size, TwoPass passes, bool stochastic_rounding, int64_t seed,
               const char* op) {
  const Streams s{params, grads, {momentum_buffers, {}, {}}, {momentum_buffer_absmaxes, {}, {}}, steps,
                  kLarsStateNames, kLarsAbsmaxNames};
  const bool momentum = !momentum_buffers.empty();
  if (hyper.size() == 5 && hyper_tensors.size() == 5 && !hyper_tensors.get(1).has_value())
    TORCH_CHECK(momentum == (hyper[1] != 0.0), "fusedopt.", op, ": momentum_buffers has ", momentum_buffers.size(),
                " tensors with momentum ", hyper[1], "; LARS keeps a momentum buffer exactly when momentum != 0");
  return two_pass_op(
      s, momentum ? 1 : 0, scalars, table, work, counters, codebook, block_size, norms, hyper, hyper_tensors,
      {"lr", "momentum", "dampening", "weight_decay", "max_unorm"}, passes, stochastic_rounding, seed, op,
      "lars_norms_",
      [&](const Hyper& h, const MultiTensor& mt, const TensorNorms& n, ScalarKind param, const Quant& quant,
          TwoPass which, cudaStream_t stream) {
        const LarsHyper args{h.scalar(0), h.scalar(1), h.scalar(2), h.scalar(3), h.scalar(4), nesterov};
        return launch_lars(mt, args, n, param, momentum, quant, which, stream);
      });
}

void lars_(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList momentum_buffer_absmaxes,
           TensorList steps, const Tensor& scalars, const Tensor& table, const Tensor& work, const Tensor& counters,
           const std::optional<Tensor>& codebook, at::ArrayRef<double> hyper,
           const c10::List<std::optional<Tensor>>& hyper_tensors, bool nesterov, int64_t block_size,
           bool stochastic_rounding, int64_t seed) {
  lars_op(params, grads, momentum_buffers, momentum_buffer_absmaxes, steps, scalars, table, work, counters, codebook,
          Tensor(), hyper, hyper_tensors, nesterov, block_size, kBothPasses, stochastic_rounding, seed, "lars_");
}

// LARS's first pass: an fp32 momentum buffer updated in place (an 8-bit one is written by the
// apply pass), and each tensor's [sum p^2, sum u^2] over the elements it holds.
Tensor lars_norms_(TensorList params, TensorList grads, TensorList momentum_buffers,
                   TensorList momentum_buffer_absmaxes, TensorList steps, const Tensor& scalars, const Tensor& table,
                   const Tensor& work, const Tensor& counters, const std::optional<Tensor>& codebook,
                   at::ArrayRef<double> hyper, const c10::List<std::optional<Tensor>>& hyper_tensors, bool nesterov,
                   int64_t block_size) {
  return lars_op(params, grads, momentum_buffers, momentum_buffer_absmaxes, steps, scalars, table, work, counters,
                 codebook, Tensor(), hyper, hyper_tensors, nesterov, block_size, kNormsPass, false, 0, "lars_norms_");
}

// LARS's second pass: p -= lr * scale * u with the scale from `norms` (lars_norms_'s, summed over
// the shards), an 8-bit buffer requantized, and the steps advanced.
void lars_apply_(TensorList params, TensorList grads, TensorList momentum_buffers,
                 TensorList momentum_buffer_absmaxes, TensorList steps, const Tensor& scalars, const Tensor& table,
                 const Tensor& work, const Tensor& counters, const std::optional<Tensor>& codebook,
                 const Tensor& norms, at::ArrayRef<double> hyper, const c10::List<std::optional<Tensor>>& hyper_tensors,
                 bool nesterov, int64_t block_size, bool stochastic_rounding, int64_t seed) {
  lars_op(params, grads, momentum_buffers, momentum_buffer_absmaxes, steps, scalars, table, work, counters, codebook,
          norms, hyper, hyper_tensors, nesterov, block_size, kApplyPass, stochastic_rounding, seed, "lars_apply_");
}

// ---- elementwise_: every elementwise family through one op ------------------------------------
//
// A family declares in its header (csrc/families.cuh) what the op takes from it, under
// fusedopt.families' names (family.h, ElementwiseFamily): its hyper-parameters by name (all
// required), its switches by name (`flags` lists those that are on), the state lists it accepts
// (each in the family's order; the states passed pick the kernel's variant, as an RMSprop with
// momentum_buffer and grad_avg, and must agree with the switches and numbers that decide them:
// amsgrad, centered, momentum), and the checks only it knows. The op makes every check (streams,
// tables, codebook, hyper tensors, rounding) for any family from that declaration, then
// launch_elementwise fills the family's params struct from the named inputs (family.h, Named).

// A family's named inputs, checked, and the Named view of them the family reads.
struct NamedInputs {
  Hyper hyper;
  std::vector<std::string> hyper_names, flags, states;
  std::vector<const char*> hyper_ptrs, flag_ptrs, state_ptrs;
  std::vector<Scalar> scalars;
  std::vector<Beta> betas;

  // Call once every field above is filled (the views point into them).
  Named view() {
    auto pointers = [](const std::vector<std::string>& names, std::vector<const char*>& out) {
      out.clear();
      for (const std::string& name : names) out.push_back(name.c_str());
    };
    pointers(hyper_names, hyper_ptrs);
    pointers(flags, flag_ptrs);
    pointers(states, state_ptrs);
    scalars.clear();
    betas.clear();
    for (size_t i = 0; i < hyper_names.size(); ++i) {
      scalars.push_back(hyper.scalar(int(i)));
      betas.push_back(hyper.beta(int(i)));
    }
    return Named{hyper_ptrs.data(), scalars.data(), betas.data(), hyper_ptrs.size(), flag_ptrs.data(),
                 flag_ptrs.size(),  state_ptrs.data(), state_ptrs.size()};
  }
};

template <typename List>
std::string join(const List& items) {
  std::string out = "[";
  for (const auto& item : items) out += (out.size() > 1 ? ", " : "") + std::string(item);
  return out + "]";
}

// The family's index in elementwise_families().
size_t find_family(const std::string& name, const char* op) {
  const std::vector<ElementwiseFamily>& families = elementwise_families();
  std::vector<const char*> known;
  for (size_t i = 0; i < families.size(); ++i) {
    if (name == families[i].name) return i;
    known.push_back(families[i].name);
  }
  TORCH_CHECK(false, "fusedopt.", op, ": family must be one of ", join(known), ", got '", name, "'");
}

// state_names: one of the family's layouts. hyper_names: its hyper-parameters, each once.
// flags: switches it takes, each once.
void check_named(const ElementwiseFamily& f, const std::vector<std::string>& state_names,
                 const std::vector<std::string>& hyper_names, at::ArrayRef<double> hyper,
                 const c10::List<std::optional<Tensor>>& hyper_tensors, const std::vector<std::string>& flags,
                 OnDevice& on_device, NamedInputs& v, const char* op) {
  v.states.assign(state_names.begin(), state_names.end());
  bool known_layout = false;
  for (const auto& layout : f.layouts)
    known_layout = known_layout || std::equal(layout.begin(), layout.end(), v.states.begin(), v.states.end());
  if (!known_layout) {
    std::string layouts;
    for (const auto& layout : f.layouts) layouts += (layouts.empty() ? "" : ", ") + join(layout);
    TORCH_CHECK(false, "fusedopt.", op, ": state_names ", join(v.states), " are not states of ", f.name,
                "; it takes ", layouts);
  }
  std::vector<const char*> names;
  for (const std::string& name : hyper_names) {
    TORCH_CHECK(std::find_if(f.hypers.begin(), f.hypers.end(), [&](const char* h) { return name == h; }) !=
                    f.hypers.end(),
                "fusedopt.", op, ": hyper_names has '", name, "'; ", f.name, " takes ", join(f.hypers));
    TORCH_CHECK(std::count(hyper_names.begin(), hyper_names.end(), name) == 1, "fusedopt.", op,
                ": hyper_names has '", name, "' more than once");
    names.push_back(name.c_str());
  }
  for (const char* h : f.hypers)
    TORCH_CHECK(std::find(hyper_names.begin(), hyper_names.end(), h) != hyper_names.end(), "fusedopt.", op,
                ": hyper_names lacks '", h, "'; ", f.name, " takes ", join(f.hypers));
  for (const std::string& flag : flags) {
    TORCH_CHECK(std::find_if(f.flags.begin(), f.flags.end(), [&](const char* x) { return flag == x; }) !=
                    f.flags.end(),
                "fusedopt.", op, ": flags has '", flag, "'; ", f.name, " takes ", join(f.flags));
    TORCH_CHECK(std::count(flags.begin(), flags.end(), flag) == 1, "fusedopt.", op, ": flags has '", flag,
                "' more than once");
  }
  v.hyper = check_hyper(hyper, hyper_tensors, names, on_device, op);
  v.hyper_names.assign(hyper_names.begin(), hyper_names.end());
  v.flags.assign(flags.begin(), flags.end());
  for (const auto& [flag, state] : f.flag_states) {
    const bool on = std::find(v.flags.begin(), v.flags.end(), flag) != v.flags.end();
    const bool has = std::find(v.states.begin(), v.states.end(), state) != v.states.end();
    TORCH_CHECK(on == has, "fusedopt.", op, ": ", f.name, on ? " with " : " without ", flag,
                on ? " needs the " : " takes no ", state, " state");
  }
}

void elementwise_(const std::string& family, TensorList params, TensorList grads,
                  const std::vector<std::string>& state_names, TensorList states0, TensorList states1,
                  TensorList states2, TensorList absmaxes0, TensorList absmaxes1, TensorList absmaxes2,
                  TensorList steps, const Tensor& scalars,
                  const Tensor& table, const Tensor& work, const Tensor& counters,
                  const std::optional<Tensor>& codebook, const std::vector<std::string>& hyper_names,
                  at::ArrayRef<double> hyper, const c10::List<std::optional<Tensor>>& hyper_tensors,
                  const std::vector<std::string>& flags, int64_t block_size, bool stochastic_rounding, int64_t seed) {
  const char* op = "elementwise_";
  const size_t index = find_family(family, op);
  const ElementwiseFamily& f = elementwise_families()[index];
  OnDevice on_device;
  NamedInputs inputs;
  check_named(f, state_names, hyper_names, hyper, hyper_tensors, flags, on_device, inputs, op);
  const Named v = inputs.view();
  const char* notes[3] = {nullptr, nullptr, nullptr};
  for (size_t k = 0; k < v.n_states; ++k) notes[k] = v.states[k];
  Streams s{params, grads, {states0, states1, states2}, {absmaxes0, absmaxes1, absmaxes2}, steps};
  s.state_lists = kStateLists;
  s.absmax_lists = kAbsmaxLists;
  s.notes = notes;
  check_streams(s, int(v.n_states), block_size, on_device, op);
  if (f.check) {
    const std::string error = f.check(v);
    TORCH_CHECK(error.empty(), "fusedopt.", op, ": ", error);
  }
  if (params.empty()) return;
  check_scalars(scalars, on_device, op);
  check_plan(table, work, counters, params.size(), on_device, op);
  // Without states (SGD without momentum) an 8-bit batch has nothing to decode.
  if (v.n_states > 0) check_codebook(codebook, block_size, on_device, op);
  const uint32_t seed32 = check_rounding(stochastic_rounding, seed, params[0], op);
  const at::Device device = on_device.check(op);

  FUSEDOPT_DEVICE_GUARD(device);
  const Quant quant{v.n_states == 0 ? 0 : block_size,
                    block_size > 0 && v.n_states > 0 ? codebook->data_ptr<float>() : nullptr};
  const MultiTensor mt = multi_tensor(table, work, scalars, counters, chunk_elements(block_size),
                                      kind_of(grads[0], Name{"grads", 0}, op), stochastic_rounding, seed32);
  C10_CUDA_CHECK(
      launch_elementwise(index, v, mt, kind_of(params[0], Name{"params", 0}, op), quant, stream_of(device)));
}

Tensor global_norm(TensorList tensors, const Tensor& table, const Tensor& work, double norm_type) {
  const char* op = "global_norm";
  TORCH_CHECK(!tensors.empty(), "fusedopt.", op, ": tensors must hold at least one tensor");
  TORCH_CHECK(norm_type == 1.0 || norm_type == 2.0 || std::isinf(norm_type), "fusedopt.", op,
              ": norm_type must be 1, 2 or inf, got ", norm_type);
  for (size_t i = 0; i < tensors.size(); ++i) {
    kind_of(tensors[i], Name{"tensors", int64_t(i)}, op);
    check_dense(tensors[i], Name{"tensors", int64_t(i)}, op);
  }
  OnDevice on_device;
  on_device.add(tensors, "tensors");
  check_plan(table, work, Tensor(), tensors.size(), on_device, op);
  const at::Device device = on_device.check(op);

  FUSEDOPT_DEVICE_GUARD(device);
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  Tensor out = at::empty({}, options);
  Tensor partials = at::empty({work.size(0)}, options);
  const NormKind kind = std::isinf(norm_type) ? kNormInf : norm_type == 2.0 ? kNorm2 : kNorm1;
  const NormArgs args{kind, partials.data_ptr<float>(), out.data_ptr<float>()};
  C10_CUDA_CHECK(launch_norm(multi_tensor(table, work, Tensor(), Tensor(), kChunk), args, stream_of(device)));
  return out;
}

std::tuple<Tensor, Tensor> quantize_blockwise(const Tensor& x, const Tensor& codebook, bool is_signed,
                                              int64_t block_size) {
  const char* op = "quantize_blockwise";
  check_dtype(x, Name{"x"}, at::kFloat, op);
  check_dense(x, Name{"x"}, op);
  TORCH_CHECK(block_size > 0, "fusedopt.", op, ": block_size must be positive, got ", block_size);
  check_block_size(block_size, op);
  OnDevice on_device;
  on_device.add(x, Name{"x"});
  check_codebook(codebook, block_size, on_device, op);
  const at::Device device = on_device.check(op);

  FUSEDOPT_DEVICE_GUARD(device);
  // Blocks over x's memory order: the codes lie in its layout (fusedopt.quant).
  Tensor codes = at::empty_strided(x.sizes(), x.strides(), x.options().dtype(at::kByte));
  Tensor absmax = at::empty({num_blocks(x.numel(), block_size)}, x.options());
  C10_CUDA_CHECK(launch_quantize(x.data_ptr<float>(), x.numel(), is_signed,
                                 Quant{block_size, codebook.data_ptr<float>()}, codes.data_ptr<uint8_t>(),
                                 absmax.data_ptr<float>(), stream_of(device)));
  return {codes, absmax};
}

int64_t table_width() { return kRowWidth; }
int64_t chunk_size(int64_t block_size) {
  check_block_size(block_size, "chunk_size");
  return chunk_elements(block_size);
}

}  // namespace

FUSEDOPT_LIBRARY(FUSEDOPT_NAMESPACE, m) {
  m.def(
      "make_table(Tensor[] params, Tensor[] grads, Tensor[] states0, Tensor[] states1, Tensor[] states2, "
      "Tensor[] absmaxes0, Tensor[] absmaxes1, Tensor[] absmaxes2, Tensor[] steps, int block_size, "
      "int[] salts=[], int[] offsets=[]) -> (Tensor, Tensor)");
  m.def(
      "lamb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] exp_avg_absmaxes, Tensor(e!)[] exp_avg_sq_absmaxes, Tensor(f!)[] steps, Tensor scalars, "
      "Tensor table, Tensor work, Tensor(g!) counters, Tensor? codebook, float[] hyper, Tensor?[] hyper_tensors, "
      "bool bias_correction, int block_size, bool stochastic_rounding=False, int seed=0) -> ()");
  m.def(
      "lamb_moments_(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
      "Tensor[] exp_avg_absmaxes, Tensor[] exp_avg_sq_absmaxes, Tensor[] steps, Tensor scalars, Tensor table, "
      "Tensor work, Tensor(c!) counters, Tensor? codebook, float[] hyper, Tensor?[] hyper_tensors, "
      "bool bias_correction, int block_size) -> Tensor");
  m.def(
      "lamb_apply_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] exp_avg_absmaxes, Tensor(e!)[] exp_avg_sq_absmaxes, Tensor(f!)[] steps, Tensor scalars, "
      "Tensor table, Tensor work, Tensor(g!) counters, Tensor? codebook, Tensor norms, float[] hyper, "
      "Tensor?[] hyper_tensors, bool bias_correction, int block_size, bool stochastic_rounding=False, "
      "int seed=0) -> ()");
  m.def(
      "lars_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] momentum_buffer_absmaxes, Tensor(d!)[] steps, Tensor scalars, Tensor table, Tensor work, "
      "Tensor(e!) counters, Tensor? codebook, float[] hyper, Tensor?[] hyper_tensors, bool nesterov, "
      "int block_size, bool stochastic_rounding=False, int seed=0) -> ()");
  m.def(
      "lars_norms_(Tensor[] params, Tensor[] grads, Tensor(a!)[] momentum_buffers, "
      "Tensor[] momentum_buffer_absmaxes, Tensor[] steps, Tensor scalars, Tensor table, Tensor work, "
      "Tensor(b!) counters, Tensor? codebook, float[] hyper, Tensor?[] hyper_tensors, bool nesterov, "
      "int block_size) -> Tensor");
  m.def(
      "lars_apply_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] momentum_buffer_absmaxes, Tensor(d!)[] steps, Tensor scalars, Tensor table, Tensor work, "
      "Tensor(e!) counters, Tensor? codebook, Tensor norms, float[] hyper, Tensor?[] hyper_tensors, "
      "bool nesterov, int block_size, bool stochastic_rounding=False, int seed=0) -> ()");
  m.def(
      "elementwise_(str family, Tensor(a!)[] params, Tensor[] grads, str[] state_names, Tensor(b!)[] states0, "
      "Tensor(c!)[] states1, Tensor(d!)[] states2, Tensor(e!)[] absmaxes0, Tensor(f!)[] absmaxes1, "
      "Tensor(g!)[] absmaxes2, Tensor(h!)[] steps, Tensor scalars, Tensor table, Tensor work, Tensor(i!) counters, "
      "Tensor? codebook, str[] hyper_names, float[] hyper, Tensor?[] hyper_tensors, str[] flags, int block_size, "
      "bool stochastic_rounding=False, int seed=0) -> ()");
  m.def("global_norm(Tensor[] tensors, Tensor table, Tensor work, float norm_type) -> Tensor");
  m.def("quantize_blockwise(Tensor x, Tensor codebook, bool signed, int block_size) -> (Tensor, Tensor)");
  m.def("table_width() -> int", &table_width);
  m.def("chunk_size(int block_size) -> int", &chunk_size);
}

// make_table reads addresses on the host; the step ops run on CUDA tensors, and are registered
// for CPU tensors too so that a CPU tensor gets their argument checks ("params[0] must be a CUDA
// tensor") rather than the dispatcher's "no kernel" error.
static void register_impls(torch::Library& m) {
  m.impl("make_table", &make_table);
  m.impl("lamb_", &lamb_);
  m.impl("lamb_moments_", &lamb_moments_);
  m.impl("lamb_apply_", &lamb_apply_);
  m.impl("lars_", &lars_);
  m.impl("lars_norms_", &lars_norms_);
  m.impl("lars_apply_", &lars_apply_);
  m.impl("elementwise_", &elementwise_);
  m.impl("global_norm", &global_norm);
  m.impl("quantize_blockwise", &quantize_blockwise);
}

FUSEDOPT_LIBRARY_IMPL(FUSEDOPT_NAMESPACE, CPU, m) { register_impls(m); }

#ifndef FUSEDOPT_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) { register_impls(m); }
#endif

}  // namespace fusedopt
