// What a training run is asked to do: model, plan, data, optimizer, iterations and where its
// traces and checkpoints go. Shared by the MPI training loop (trainer.hpp) and rank emulation
// (emulate.hpp), which needs no MPI.
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "engine/backends/cpu/cpu_backend.hpp"
#include "engine/exec/token_data.hpp"
#include "engine/spec/spec.hpp"

namespace px {

struct TrainConfig {
  ModelSpec model;
  PlanSpec plan;                 // resolved; fp32 on the CPU, bf16 on CUDA
  std::string device = "cpu";    // the compute backend (engine/train/backend_factory.hpp)
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

// The token source `config.data` names; throws px::Error naming a text file it cannot read.
std::unique_ptr<TokenSource> make_token_source(const TrainConfig& config);

}  // namespace px
