// The plan compiler: (model, resolved plan) -> one op program per distinct rank role (pipeline
// stage) for one training iteration, plus every rank's binding to its role and process groups.
// Tensor/sequence/context/expert/data parallelism, ZeRO 1-3, pipeline schedules, recompute and
// optimizer offload are all expressed as which ops it emits; see engine/plan/README.md.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/plan/program.hpp"
#include "engine/plan/schedule.hpp"
#include "engine/plan/topology.hpp"
#include "engine/spec/spec.hpp"

namespace px {

// The sizes one rank works with (its tensor-parallel shards, its sequence block, its experts):
// what every op's shape is made of, for the compiler and the backends that execute its programs.
struct LocalDims {
  std::int64_t h, a_l, g_l, d, f_l, V_l, s, S, b, T, Tres, e, gb;  // T: tokens of a micro-batch, Tres under SP
  std::int64_t qkv_cols;  // (a_l + 2 g_l) d
  int tp, cp, ep;
  bool sp, flash, swiglu, rope, bias, qkv_bias, layernorm, hidden_dropout, attn_dropout;
  // MoE: experts, local experts, expert FFN size, top-k, slots per expert per rank, what one expert
  // receives from its EP group, and one rank's dispatch rows
  std::int64_t E = 0, E_l = 0, fe = 0, top_k = 0, slots = 0, capacity = 0, R = 0;
  std::int64_t gated() const { return swiglu ? 2 : 1; }
};
LocalDims local_dims(const ModelSpec& model, const PlanSpec& plan, int padded_vocab);

struct CompiledPlan {
  ModelSpec model;
  PlanSpec plan;  // resolved (see resolve_plan)
  Topology topology;
  int padded_vocab = 0;
  int num_micro_batches = 0;
  std::vector<Program> roles;                         // index = pipeline stage
  std::vector<std::vector<PipelinePass>> schedules;   // per pipeline stage
  std::vector<RankBinding> ranks;                     // index = global rank

  const Program& program_of(int rank) const { return roles[ranks[rank].role]; }
};

// `plan` must already be resolved and valid for `model` (resolve_plan in engine/spec/validate.hpp).
CompiledPlan compile_plan(const ModelSpec& model, const PlanSpec& plan);

// The transformer layers (global indices [first, first + count)) of a stage's chunk.
struct LayerRange {
  int first = 0;
  int count = 0;
};
LayerRange chunk_layers(const ModelSpec& model, const PlanSpec& plan, int stage, int chunk);

}  // namespace px
