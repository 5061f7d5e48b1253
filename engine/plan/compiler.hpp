// The plan compiler: (model, resolved plan) -> one op program per distinct rank role (pipeline
// stage) for one training iteration, plus every rank's binding to its role and process groups.
// Tensor/sequence/context/expert/data parallelism, ZeRO 1-3, pipeline schedules, recompute and
// optimizer offload are all expressed as which ops it emits; see engine/plan/README.md.
#pragma once

#include <vector>

#include "engine/plan/program.hpp"
#include "engine/plan/schedule.hpp"
#include "engine/plan/topology.hpp"
#include "engine/spec/spec.hpp"

namespace px {

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
