// The op program: the ordered ops one rank role executes in one training iteration, with the
// tensors they read and write. It is the IR both the engine (executes it) and the simulator
// (replays it) consume, so it holds everything either needs and nothing about how either runs.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/spec/spec.hpp"

namespace px {

enum class OpKind : std::uint8_t {
  // compute
  Embedding,      // token (+ position) lookup
  Norm,           // LayerNorm or RMSNorm
  Gemm,           // dense matmul, optionally with bias (m x k) * (k x n)
  Rope,           // rotary position embedding on q and k
  AttentionCore,  // softmax(q k^T) v, causal; flash or unfused
  Activation,     // GELU or SwiGLU
  DropoutAdd,     // (bias +) dropout + residual add
  Router,         // MoE gate: logits, softmax, top-k, capacity
  Permute,        // MoE token permutation into per-expert order (and back)
  CrossEntropy,   // vocab-parallel softmax cross-entropy
  Copy,           // a strided copy on the device (packing keys and values for the CP ring)
  OptimizerStep,  // AdamW with gradient clipping on this rank's (shard of) parameters
  // communication
  AllReduce,
  ReduceScatter,
  AllGather,
  AllToAll,
  Send,
  Recv,
  RingExchange,  // one step of a ring: send to the next member, receive from the previous (CP)
  // memory
  CopyD2H,
  CopyH2D,
};
constexpr int kNumOpKinds = static_cast<int>(OpKind::CopyH2D) + 1;

enum class OpClass : std::uint8_t { Compute, Comm, Memory };
OpClass op_class(OpKind k);
std::string_view to_string(OpKind k);
inline bool is_comm(OpKind k) { return op_class(k) == OpClass::Comm; }
inline bool is_collective(OpKind k) { return is_comm(k) && k != OpKind::Send && k != OpKind::Recv; }

enum class Phase : std::uint8_t {
  Forward,
  Backward,        // input and weight gradients together
  BackwardInput,   // "B" of zero-bubble schedules: input gradients only
  BackwardWeight,  // "W": weight gradients only
  Recompute,       // forward work repeated during backward
  Optimizer,       // gradient reduction tail and the optimizer step
};
std::string_view to_string(Phase p);

// Streams are the tracks of a trace: ops on one stream run in program order; across streams only
// explicit dependencies order them (CUDA streams and events; MPI progress threads on CPU).
enum class Stream : std::uint8_t {
  Compute,
  TensorComm,   // TP/CP/EP collectives the compute stream waits on
  DataComm,     // DP gradient reduction and ZeRO gathers, overlapped with compute
  PipeSendNext, // activations to the next pipeline stage
  PipeRecvPrev,
  PipeSendPrev, // gradients to the previous pipeline stage
  PipeRecvNext,
  Memcpy,       // host<->device offload copies
  Host,         // work on the host CPU (offloaded optimizer)
};
constexpr int kNumStreams = static_cast<int>(Stream::Host) + 1;
std::string_view to_string(Stream s);

// Process groups, Megatron-style. Members of one group instance share every coordinate but the
// ones the group spans (rank order tp-cp-ep-dp-pp, ep subdividing dp).
enum class GroupKind : std::uint8_t {
  None,
  TP,         // spans tp
  CP,         // spans cp
  EP,         // spans ep
  DP,         // spans cp and dp: dense gradient reduction and ZeRO sharding
  ExpertDP,   // spans tp, cp and dp/ep: expert gradient reduction (experts are not tensor-parallel)
  PP,         // spans pp
  Embedding,  // first and last pipeline stage: tied word-embedding gradients
};
constexpr int kNumGroupKinds = static_cast<int>(GroupKind::Embedding) + 1;
std::string_view to_string(GroupKind g);

enum class TensorClass : std::uint8_t {
  Weight,       // persistent model weights (the ZeRO-3 shard when sharded)
  Gradient,     // persistent main gradients (the shard under ZeRO-2/3)
  Optimizer,    // persistent fp32 master weights and Adam moments (the shard under ZeRO-1+)
  Activation,   // saved by a forward op for its backward
  Temporary,    // produced and consumed within a phase
  Gathered,     // ZeRO-3 gathered weights, or full-size gradients awaiting reduce-scatter
  Received,     // pipeline receive buffers
};
constexpr int kNumTensorClasses = static_cast<int>(TensorClass::Received) + 1;
std::string_view to_string(TensorClass c);
inline bool is_persistent(TensorClass c) {
  return c == TensorClass::Weight || c == TensorClass::Gradient || c == TensorClass::Optimizer;
}

struct Tensor {
  std::int64_t bytes = 0;
  std::uint32_t name = 0;   // index into Program::names
  std::uint32_t first_op = 0;  // op that produces it (persistent tensors: 0)
  std::uint32_t last_op = 0;   // last op that reads it (persistent tensors: the last op)
  TensorClass cls = TensorClass::Temporary;
};

// An operand: `bytes` bytes of a tensor from byte `offset` (the whole tensor unless the op reads
// or writes one part of it, e.g. one weight of a layer's flat parameter buffer).
struct TensorUse {
  std::uint32_t tensor = 0;
  bool write = false;
  std::int64_t offset = 0;
  std::int64_t bytes = 0;
};

// What an op computes, where its kind alone does not say (see engine/plan/README.md, "Operands").
enum class Variant : std::uint8_t {
  Plain = 0,
  // Gemm. "Transposed" weights are stored [n x k] (the output layer reuses the [vocab x h]
  // embedding table): forward y = x w^T, input gradient dx = dy w, weight gradient dw += dy^T x.
  GemmForward = 0,
  GemmInputGrad,
  GemmInputGradAccumulate,  // dx += dy w^T (the router's share of the MoE block's input gradient)
  GemmWeightGrad,
  GemmForwardTransposed,
  GemmInputGradTransposed,
  GemmWeightGradTransposed,
  // Grouped expert GEMMs: the x rows are [ep][E/ep][slots] (as the all-to-all delivers them) and
  // the weights are stacked over the rank's E/ep experts.
  GemmGroupedForward,
  GemmGroupedInputGrad,
  GemmGroupedWeightGrad,
  // AllReduce
  ReduceMax = 16,
  // CrossEntropy forward under tensor parallelism: row maxima first, partial sums after their
  // max-reduce.
  CrossEntropyMax = 20,
  CrossEntropyPartials,
  // Copy
  PackKeyValues = 24,  // K and V columns of a qkv tensor -> rows [K | V]
  AddKeyValueGrads,    // rows [dK | dV] added into the K and V columns of a qkv gradient
  Accumulate,          // out += in, element for element (the partial sums of a TP ring)
  // OptimizerStep
  GradNorm = 28,
  AdamW,
  // Permute
  Dispatch = 32,  // tokens -> expert-major slots (forward), and its backward
  Combine,        // expert slots -> gate-weighted tokens (forward), and its backward
  // DropoutAdd: which dropout site (masks are keyed by it)
  EmbeddingDropout = 36,
  AttentionResidual,
  MlpResidual,
  // AttentionCore: scores and probabilities materialized in device memory between separate
  // kernels (no flash kernel); the op's bytes then count that traffic.
  AttentionUnfused = 40,
};

inline constexpr std::int32_t kNone = -1;

// A Gemm with group TP is one step of a tensor-parallel ring that overlaps the GEMM with the
// exchange of sequence blocks (tp_comm_overlap); its m is one block's rows, and tp_rank r at step
// i works on block b: peer > 0 (all-gather side) multiplies the block that arrived (b = (r - i)
// mod tp, the whole input operand) into rows b of its output, or (GemmWeightGrad: dw += x^T dy
// with dy the block that arrived) takes rows b of x into the whole dw; peer < 0 (reduce-scatter
// side) multiplies rows b = (r - i - 1) mod tp of its input into a partial sum (the whole output).
struct Op {
  OpKind kind = OpKind::Gemm;
  Phase phase = Phase::Forward;
  Stream stream = Stream::Compute;
  GroupKind group = GroupKind::None;
  std::int8_t peer = 0;       // Send/Recv/RingExchange: +1 next, -1 previous member of the group's ring
  DType dtype = DType::BF16;
  std::uint8_t chunk = 0;     // virtual pipeline chunk
  Variant variant = Variant::Plain;
  std::uint8_t step = 0;      // AttentionCore, TP-ring Gemm: ring step (0: the rank's own block)
  std::uint32_t name = 0;     // index into Program::names, e.g. "qkv"
  std::int32_t layer = kNone;        // global transformer layer index
  std::int32_t micro_batch = kNone;
  // Shape: Gemm (m, n, k) with batch = number of independent matmuls (grouped experts);
  // AttentionCore (m = query tokens per sequence, n = key tokens, k = head dim, batch = seqs * heads);
  // elementwise ops: m = rows, n = columns.
  std::int64_t m = 0, n = 0, k = 0, batch = 1;
  double flops = 0;            // tensor-core (matmul) FLOPs, the ones MFU counts
  double vector_flops = 0;     // other arithmetic (norms, softmax, elementwise, optimizer)
  std::int64_t bytes_read = 0;
  std::int64_t bytes_written = 0;
  // Comm: the buffer size in nccl-tests' sense: all-reduce buffer; all-gather output; reduce-scatter
  // input; all-to-all per-rank send buffer; send/recv/ring-exchange message. Memory: bytes copied.
  std::int64_t comm_bytes = 0;
  std::uint32_t deps_begin = 0, deps_end = 0;  // into Program::deps: ops (besides the stream's
                                               // previous op) that must finish first
  std::uint32_t uses_begin = 0, uses_end = 0;  // into Program::uses
};

// One logical parameter (engine/spec/parameters.hpp) inside a parameter buffer.
struct ParamSlot {
  std::uint32_t param = 0;   // index into model_parameters()
  std::int64_t offset = 0;   // elements from the buffer's start
  std::int64_t count = 0;    // elements this rank holds (its tensor-parallel shard)
};

// A flat parameter buffer (Megatron-Core's DDP buffers, FSDP's FlatParameter): the weights of a
// layer (or of its experts, the embedding, the head), their gradients and optimizer states all
// share its layout. ZeRO shards it into `shard_group`-many equal contiguous blocks.
struct ParamBuffer {
  std::string name;               // "layers.3", "layers.3.experts", "word_embedding", ...
  std::int32_t layer = kNone;
  GroupKind shard_group = GroupKind::DP;
  std::int64_t count = 0;         // elements (this rank's tensor-parallel shards of every slot)
  std::int64_t padded = 0;        // count rounded up to a multiple of the shard group's size
  std::uint32_t weight = 0;       // tensor: the whole padded buffer, or its block under ZeRO-3
  std::uint32_t grad = 0;         // tensor: the whole padded buffer, or its block under ZeRO-2/3
  std::int64_t optimizer_offset = 0;  // elements into optimizer.state (or the host copy)
  bool weight_sharded = false, grad_sharded = false, optimizer_sharded = false;
  std::vector<ParamSlot> slots;
};

// The program of one rank role (a pipeline stage); every rank of that role runs it, bound to its
// own process groups.
struct Program {
  int pp_stage = 0;
  std::vector<ParamBuffer> buffers;
  std::int64_t optimizer_elements = 0;  // per owned parameter element: m and v (and fp32 master)
  std::vector<Op> ops;
  std::vector<std::uint32_t> deps;
  std::vector<TensorUse> uses;
  std::vector<Tensor> tensors;
  std::vector<std::string> names;

  std::span<const std::uint32_t> deps_of(const Op& op) const {
    return {deps.data() + op.deps_begin, op.deps_end - op.deps_begin};
  }
  std::span<const TensorUse> uses_of(const Op& op) const {
    return {uses.data() + op.uses_begin, op.uses_end - op.uses_begin};
  }
  std::string_view name_of(const Op& op) const { return names[op.name]; }
  std::string_view name_of(const Tensor& t) const { return names[t.name]; }
};

}  // namespace px
