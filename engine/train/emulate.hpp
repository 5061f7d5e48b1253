// Rank emulation: one rank of a plan of any size executed alone in this process, so that a
// one-device machine can measure the compute of a large plan's ranks (their shard shapes) for the
// simulator's calibration. The plan is compiled for its full world size; only the chosen rank's
// program runs, its arena holds only that rank's shards, and every comm op is served at once by a
// stand-in communicator of the group's real size (engine/comm/standin_comm.hpp). The trace is the
// rank's normal trace file, flagged: "emulated_rank" at the top, "stand_in": true on comm events.
// Compute times are real; comm times are not communication and calibration ignores them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "engine/train/train_config.hpp"

namespace px {

struct EmulationResult {
  int rank = 0;
  int world_size = 0;                     // the plan's
  int stage = 0;                          // the rank's pipeline stage (its role)
  std::filesystem::path trace;            // OUT/trace_rankNNNNN.json
  std::size_t ops = 0;                    // ops of the rank's program (each traced once per traced iteration)
  std::size_t stand_in_ops = 0;           // its comm ops, each served by a stand-in
  std::int64_t stand_in_calls = 0;        // communicator operations the stand-ins served, all iterations
  std::string device;                     // what the compute ran on: "cpu" or the GPU's name
  std::vector<double> iteration_seconds;  // wall time of every iteration run
  // Mean cross-entropy of the tokens this rank computed, per iteration, where it reports the loss
  // (the last stage's first tensor-parallel rank): the training loss of a one-rank plan.
  std::vector<double> losses;
  double compute_seconds = 0;             // last iteration: summed durations of its compute and memory ops
  // The last iteration's gradient norm as this rank saw it (the stand-ins add no peer's share):
  // meaningless as a number, but finite shows the stand-ins' data kept the arithmetic in range.
  double grad_norm = 0;
  std::int64_t arena_bytes = 0;           // the memory planner's figure for this rank
  std::int64_t arena_bytes_touched = 0;   // highest arena byte any op wrote
};

// Runs rank `rank` of `config`'s plan alone for config.iterations iterations, traces the last
// config.trace_iterations of them into config.out_dir, and returns what it measured, on
// config.device's backend. A one-rank plan has no comm op, so there this is a real training run
// (unflagged trace). Throws px::Error for a rank outside the plan, a plan the backend cannot run
// (the CPU's must be fp32), and for what emulation does not
// do (results database, checkpoints, resume: the run is not a training run of the plan).
EmulationResult emulate_rank(const TrainConfig& config, int rank, const std::function<void(const std::string&)>& log = {});

}  // namespace px
