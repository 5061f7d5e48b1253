// The CLI's subcommands (model info/list, plan check/show): options, registration and running.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/spec/spec.hpp"
#include "engine/spec/spec_yaml.hpp"

namespace px::cli {

struct PlanFlags {
  std::string plan_file;
  std::optional<int> tp, pp, cp, ep, dp, micro_batch, global_batch, virtual_stages, layers_per_virtual_stage, seq_length, zero;
  std::string schedule, recompute, precision;
  bool sequence_parallel = false, offload = false, no_flash_attn = false, overlap_param_gather = false, tp_comm_overlap = false;
};

struct TrainFlags {
  int iterations = 10;
  std::string data = "synthetic";
  std::string out = "parallax-run";
  std::string db;
  std::string experiment = "train";
  double lr = 1e-3, weight_decay = 0.1, clip_grad = 1.0, moe_aux_coeff = 0.0;
  std::uint64_t seed = 1234;
  int checkpoint_every = 0, trace_iterations = 1, log_every = 1;
  double timeout_s = 60;
  bool resume = false;
  std::optional<int> emulate_rank;  // run this rank of the plan alone, comm on stand-ins
  std::string device = "cpu";       // compute backend: cpu or cuda
  std::optional<double> hidden_dropout, attention_dropout;  // override the model file's
};

struct SimulateFlags {
  std::string trace_out, db, experiment = "simulate";
  std::vector<int> trace_ranks;
  std::vector<std::string> slowdown;  // RANK=FACTOR
  std::vector<std::string> links;     // LINK=FACTOR
  std::vector<std::string> replay_traces;  // verbatim replay of a recorded run
  std::string all_reduce = "auto";    // auto, ring, tree or hierarchical
  std::string profile;                // calibration profile to cost ops from
  bool in_order_issue = false;        // model the CPU engine's one-thread issue
  bool fold = false;                  // replay data-parallel replica 0 only
  std::vector<std::string> traces;    // calibrate: the engine's trace files
  std::vector<std::string> comm_bench;  // calibrate: comm_bench --json outputs
  std::string layer_times;            // calibrate: measured layer times to fit the GEMM curve to
  std::string out, source;            // calibrate: where the profile goes, what it measured
};

struct Options {
  std::string datasets;  // empty: PARALLAX_DATASETS or the build's datasets/
  bool json = false;
  std::optional<int> rank;  // plan show: also report this rank's binding
  std::string model, cluster;
  PlanFlags plan;
  CLI::App* model_info = nullptr;
  CLI::App* model_list = nullptr;
  CLI::App* cluster_list = nullptr;
  CLI::App* plan_check = nullptr;
  CLI::App* plan_show = nullptr;
  TrainFlags train;
  CLI::App* train_cmd = nullptr;
  SimulateFlags sim;
  CLI::App* simulate_cmd = nullptr;
  CLI::App* calibrate_cmd = nullptr;
};

// The dataset catalog --datasets (or $PARALLAX_DATASETS, or the source tree's) names.
SpecCatalog catalog(const Options& o);

// Plan flags shared by every command that takes a plan.
void add_plan_flags(CLI::App* cmd, Options& o);
// The resolved plan the flags describe (engine/cli/commands.cpp).
PlanSpec plan_from_flags(const Options& o, const ModelSpec& model, const ClusterSpec* cluster = nullptr);

// `parallax train` (engine/cli/train_command.cpp).
void register_train(CLI::App& app, Options& o);
int train(const Options& o, int* argc, char*** argv);

// `parallax simulate` (engine/cli/simulate_command.cpp).
void register_simulate(CLI::App& app, Options& o);
int simulate(const Options& o);
int calibrate(const Options& o);

void register_commands(CLI::App& app, Options& opts);
int run(const CLI::App& app, const Options& opts);

}  // namespace px::cli
