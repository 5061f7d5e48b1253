// Pipeline schedules: the order in which one pipeline stage runs the forward (F), backward (B) and,
// for zero-bubble, weight-gradient (W) passes of each (micro-batch, model chunk).
#pragma once

#include <cstdint>
#include <vector>

#include "engine/spec/spec.hpp"

namespace px {

enum class PassKind : std::uint8_t { F, B, W };

struct PipelinePass {
  PassKind kind = PassKind::F;
  int micro_batch = 0;
  int chunk = 0;  // virtual pipeline chunk on this stage (0 unless interleaved)
};

// The passes of `stage` (0-based) for p stages, m micro-batches and v chunks per stage.
// Non-zero-bubble schedules emit no W passes (B includes the weight gradients).
std::vector<PipelinePass> pipeline_schedule(PipelineSchedule schedule, int stage, int p, int m, int v);

// Micro-batches (or chunk-micro-batches when interleaved) whose activations a stage holds at once
// under the schedule: forwards done whose backward has not run. Under zero-bubble the inputs of
// each GEMM are kept a little longer, until its deferred W pass.
int max_in_flight(const std::vector<PipelinePass>& passes);

}  // namespace px
