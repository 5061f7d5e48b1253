// Training under mpirun (or alone): one process per rank, each executing its role's op program on
// config.device's backend: the CPU's over MPI communicators, or CUDA's (one GPU per rank, chosen by
// the rank's place on its node) over NCCL communicators. Logs the loss, checkpoints (each rank its
// shard, then a commit marker by rename) and resumes bit-exactly, writes Kineto-style traces, and
// records the run in the results database — as failed, with the root cause, when a rank dies.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "engine/comm/mpi_comm.hpp"
#include "engine/train/train_config.hpp"

namespace px {

struct IterationLog {
  int iteration = 0;
  double loss = 0;         // mean cross-entropy over the global batch, nats
  double seconds = 0;      // slowest rank's iteration time
  double grad_norm = 0;
};

struct TrainResult {
  std::vector<IterationLog> log;
  double tokens_per_second = 0;  // median iteration, global batch tokens
  std::int64_t arena_bytes = 0;          // the memory planner's figure for this rank
  std::int64_t arena_bytes_touched = 0;  // highest arena byte any op wrote on this rank
  std::optional<std::int64_t> run_id;
};

// Runs on every rank of the job (collective). Throws px::Error for bad input; a dead or hung peer
// is recorded as a failed run and ends the job (MpiRuntime::abort_job).
TrainResult train(const TrainConfig& config, const MpiRuntime& mpi, const std::function<void(const std::string&)>& log);

}  // namespace px
