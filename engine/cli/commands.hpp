// The CLI's subcommands (model info/list, plan check/show): options, registration and running.
#pragma once

#include <CLI/CLI.hpp>

#include <optional>
#include <string>

namespace px::cli {

struct PlanFlags {
  std::string plan_file;
  std::optional<int> tp, pp, cp, ep, dp, micro_batch, global_batch, virtual_stages, layers_per_virtual_stage, seq_length, zero;
  std::string schedule, recompute, precision;
  bool sequence_parallel = false, offload = false, no_flash_attn = false;
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
};

void register_commands(CLI::App& app, Options& opts);
int run(const CLI::App& app, const Options& opts);

}  // namespace px::cli
