// Dry run: executes every rank's program with op costs from a callback (zero by default) and
// no data, the way the engine would order them: per-stream program order, explicit dependencies,
// collectives that complete when every member of the group instance has arrived, and
// point-to-point messages that complete when both ends are there. It proves a compiled plan is
// executable (no deadlock, sends match receives, collectives agree across members) and, with
// costs, gives each op's start and end.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "engine/plan/compiler.hpp"

namespace px {

using OpCostFn = std::function<double(const Program&, const Op&)>;

struct OpTiming {
  double start = 0;
  double end = 0;
};

struct DryRunResult {
  bool ok = false;
  std::string error;     // deadlock or mismatch, naming ranks and ops
  double makespan = 0;
  std::vector<std::vector<OpTiming>> timings;  // [rank][op] when requested
  std::vector<double> compute_busy;            // per rank: time the compute stream was busy
};

struct DryRunOptions {
  OpCostFn cost;               // null: every op costs nothing
  bool record_timings = false;
  // Issue each rank's ops strictly in program order from one host thread, as the CPU engine does:
  // a compute op runs to completion before the next op is issued; a comm op is posted and the next
  // op issued at once. Proves that order itself cannot deadlock, on top of the stream semantics.
  bool in_order_issue = false;
  // Order ops as the CUDA engine does over NCCL (engine/backends/cuda/cuda_backend.hpp) instead
  // of by the plan's streams: compute and memory ops on one device stream in program order; each
  // comm op after all device work issued before it (the compute stream's progress at its posting)
  // and after the previous op on its NCCL communicator, which runs its operations one at a time:
  // one per group instance, and for the pipeline's activations and gradients one per sending pair
  // and direction (engine/comm/nccl_comm.hpp's channels). Proves that order cannot deadlock.
  bool nccl_order = false;
};

DryRunResult dry_run(const CompiledPlan& plan, const DryRunOptions& options = {});

}  // namespace px
