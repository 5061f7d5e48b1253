// What `parallax plan show` reports about a compiled plan: per rank role, its ops, FLOPs,
// communication volume by process group, planned memory and schedule shape.
#pragma once

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <vector>

#include "engine/plan/compiler.hpp"
#include "engine/plan/memory_planner.hpp"

namespace px {

struct CommVolume {
  std::int64_t ops = 0;
  std::int64_t bytes = 0;  // sum of comm_bytes (buffer sizes, nccl-tests convention)
};

struct RoleSummary {
  int stage = 0;
  std::int64_t ranks = 0;  // ranks bound to this role
  std::int64_t ops = 0;
  std::int64_t tensors = 0;
  double flops = 0;         // matmul FLOPs of one iteration on one rank of this role
  double vector_flops = 0;
  std::array<CommVolume, kNumGroupKinds> comm{};
  std::vector<LayerRange> chunks;
  int forward_passes = 0, backward_passes = 0, weight_passes = 0;
  int max_in_flight = 0;
  MemoryPlan memory;
};

struct PlanSummary {
  std::int64_t world_size = 0;
  int micro_batches = 0;
  double total_flops = 0;           // all ranks, one iteration
  double ideal_bubble_fraction = 0; // closed form for the schedule with equal pass times
  std::vector<RoleSummary> roles;
};

PlanSummary summarize(const CompiledPlan& plan);

// The resolved plan's fields under Megatron-LM's names, for reports and run records.
nlohmann::json plan_to_json(const PlanSpec& plan);

}  // namespace px
