// Per-rank traces in the Chrome Trace Event format as PyTorch's profiler (Kineto) writes them, so
// Perfetto, chrome://tracing and Holistic Trace Analysis open them unchanged: one track per
// stream, one complete ("X") event per op with its op id, shapes and collective metadata in args,
// and a ProfilerStep#N annotation per iteration. The engine writes measured traces, the simulator
// simulated ones, from the same op program.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "engine/plan/compiler.hpp"
#include "engine/plan/dry_run.hpp"

namespace px {

struct TraceInfo {
  int rank = 0;
  std::string backend = "nccl";  // collective library the comm events are named after: nccl, mpi
  std::string device = "cpu";    // e.g. "NVIDIA H100 80GB HBM3", or "cpu"
  bool simulated = false;
  // Rank emulation: this rank's program ran alone with stand-in communicators
  // (engine/comm/standin_comm.hpp). Its comm events carry "stand_in": true and the trace says
  // "emulated_rank": their times are local copies, not communication.
  bool emulated = false;
};

class ChromeTrace {
 public:
  ChromeTrace(const CompiledPlan& plan, TraceInfo info);

  // One iteration of this rank's program; `timings` are per op, in seconds from `origin_s`
  // (the same clock for every iteration of the trace). `host_s`, when given, is each comm op's
  // host-thread time (Executor::host_seconds), recorded as its "host us". `op_args`, when given,
  // adds per op its own arguments (a simulated trace: the cost model that timed each op).
  void add_iteration(int iteration, std::span<const OpTiming> timings, double origin_s = 0.0,
                     std::span<const double> host_s = {}, std::span<const nlohmann::json> op_args = {});

  nlohmann::json to_json() const;
  // Writes to a temporary file beside `path`, then renames: a trace is whole or absent.
  void write(const std::filesystem::path& path) const;

 private:
  const CompiledPlan& plan_;
  TraceInfo info_;
  nlohmann::json events_ = nlohmann::json::array();
};

// Structural check against the Chrome Trace Event format and the Kineto conventions this project
// relies on. Returns the problems found (empty: the trace is well formed).
std::vector<std::string> check_chrome_trace(const nlohmann::json& trace);

}  // namespace px
