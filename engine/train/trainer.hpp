// Training on CPU ranks: one process per rank under mpirun (or alone), each executing its role's
// op program on the CPU backend over MPI communicators. Logs the loss, checkpoints (each rank its
// shard, then a commit marker by rename) and resumes bit-exactly, writes Kineto-style traces, and
// records the run in the results database — as failed, with the root cause, when a rank dies.
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "engine/backends/cpu/cpu_backend.hpp"
#include "engine/comm/mpi_comm.hpp"
#include "engine/spec/spec.hpp"

namespace px {

struct TrainConfig {
  ModelSpec model;
  PlanSpec plan;                 // resolved, fp32
  std::string data = "synthetic";  // "synthetic", "corpus" (datasets/corpus) or a text file
  std::filesystem::path datasets_dir;
  int iterations = 10;
  cpu::TrainOptions options;
  std::filesystem::path out_dir = "parallax-run";  // traces, checkpoints, heartbeats
  std::optional<std::filesystem::path> results_db;
  std::string experiment = "train";
  int checkpoint_every = 0;      // iterations between checkpoints; 0: only after the last
  bool resume = false;           // continue from out_dir's latest committed checkpoint
  int trace_iterations = 1;      // the last N iterations go into each rank's trace
  std::chrono::milliseconds comm_timeout{60000};
  int log_every = 1;
};

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
