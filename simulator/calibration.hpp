// Calibration profiles: measured op durations keyed by op signature (kind, variant, shapes, dtype,
// bytes), built from the engine's Kineto traces of a plan and looked up by the replay, so that a
// simulated op costs what the same op measured. Each entry keeps its sample count and spread: the
// replay reports which ops it costed from measurements and how tightly.
#pragma once

#include <filesystem>
#include <map>
#include <tuple>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "engine/plan/compiler.hpp"

namespace px::sim {

// Where a rank runs an op, as far as the op's cost depends on it: under context parallelism a
// causal ring step's key block lies before the rank's queries (every key visible), on them (the
// diagonal) or after them (every key masked, nearly free), so one op of the shared program costs
// from nothing to its whole work depending on the rank.
struct OpContext {
  int cp_index = 0;
  int cp = 1;
};
OpContext op_context(const CompiledPlan& plan, int rank);

// "gemm/2/2048x1536x512x1/bf16/r0w0/f3221225472" — the same string for the same work, whichever rank or layer
// (an attention ring step's also names its key block: "/past", "/diagonal", "/future").
std::string op_signature(const Op& op, OpContext where = {});
// A comm op's host-thread share (packing and posting it, unpacking its result): "host:" + its
// signature, which names its buffer size.
std::string host_signature(const Op& op);

struct MeasuredCost {
  double seconds = 0;   // mean of the samples
  double spread = 0;    // mean absolute deviation / mean: the fit residual of a lookup
  std::int64_t samples = 0;
  // Not measured itself: interpolated from measured ops of its kind at other sizes (spread then
  // adds the interpolation's own leave-one-out residual).
  bool interpolated = false;
};

// Ops whose costs interpolate into each other: one kind, variant, dtype, direction (forward,
// backward, optimizer) and (context-parallel ring steps) key-block place; and the size they scale
// with: matmul FLOPs for GEMMs and attention, bytes moved for the others.
std::string op_family(const Op& op, OpContext where = {});
double op_work(const Op& op);

// One traced iteration of a run, rank by rank and op by op: what a verbatim replay of that
// iteration costs its ops with. Replaying iterations one by one (not a median iteration) keeps
// which rank was slow when: a delay on either rank holds up both at their next collective, and
// medians or means per op would spread it over both.
struct RecordedIteration {
  int iteration = 0;
  // [rank][op]: a compute or memory op's duration plus the host's dispatch gap before an op (the
  // run's median gap between back-to-back compute ops, as calibration profiles cost it); comm ops 0.
  std::vector<std::vector<double>> op_seconds;
  // [rank][op]: the host thread's own time in a comm op (the trace's "host us"); 0 for other ops.
  std::vector<std::vector<double>> host_seconds;
  double measured_s = 0;  // the iteration's span on its slowest rank
};

// Every iteration that each rank's trace holds, in order. Throws px::Error naming the file for a
// trace of another plan or of an emulated rank, and naming the rank when a rank's trace is
// missing or lacks one of its ops.
std::vector<RecordedIteration> recorded_iterations(const CompiledPlan& plan, const std::vector<std::filesystem::path>& traces);

class CalibrationProfile {
 public:
  // Adds every compute and memory op of the traces (the engine's per-rank Chrome traces of
  // `plan`, one JSON object per file); op ids index the rank's program. Throws px::Error naming the
  // file for a trace that does not belong to the plan.
  void add_traces(const CompiledPlan& plan, const std::vector<std::filesystem::path>& traces);
  void add(const std::string& signature, double seconds);
  // Adds a comm benchmark's rows (comm_bench --json: collective, ranks, size in nccl-tests' sense,
  // the median iteration's time, else the mean): the measured time of each collective by group
  // size and buffer size. A size several files measured gets their mean (sweeps taken at both
  // ends of a stretch of runs stand for the machine's state across it).
  void add_comm_bench(const std::filesystem::path& file);
  // The measured time of a collective (or, for send/recv and ring steps, a message) of `bytes` in a
  // group of `ranks`, interpolated linearly between benchmarked sizes and extrapolated past the
  // largest at its bandwidth; none when that collective and group size were not benchmarked.
  std::optional<double> collective_seconds(OpKind kind, int ranks, double bytes) const;

  // The op's measured cost; for a signature never measured, interpolated over the measured sizes
  // of its family (piecewise linear inside them, a least-squares overhead-plus-rate line beyond
  // them; from the one size measured, its work at that size's rate beyond the per-kernel overhead
  // other families show, with a wide band); none for a family never measured.
  std::optional<MeasuredCost> lookup(const Op& op, OpContext where = {}) const;
  // The CPU engine's host-thread time in a comm op (the trace's "host us"), mean over samples.
  std::optional<double> host_seconds(const Op& op) const;
  std::size_t size() const { return samples_.size(); }
  // The host's time between two back-to-back ops of a stream (the median gap between consecutive
  // compute ops of the traces): the engine's dispatch cost, as a kernel launch is a GPU's.
  double dispatch_gap_s() const;
  // The traced run's iteration time: per iteration the slowest rank's span (ProfilerStep), mean
  // over iterations (as op costs are means); 0 when unknown. What a replay of the same plan with this profile predicts.
  double measured_iteration_s() const;
  // The plan the traces were of (plan_to_json): a prediction compares with the measured iteration
  // only for that plan. Null when none was traced.
  const nlohmann::json& traced_plan() const { return traced_plan_; }
  // Each traced rank's speed against the others: its compute ops' measured time over what their
  // signatures' means give (1.06: 6% slower than the traced ranks' average). A replay of the
  // traced plan runs each rank at its own speed, as a measured straggler. Empty with fewer than
  // two traced ranks.
  std::map<int, double> rank_speeds() const;

  nlohmann::json to_json() const;
  static CalibrationProfile from_json(const nlohmann::json& j, const std::string& file = {});
  void write(const std::filesystem::path& file) const;
  static CalibrationProfile read(const std::filesystem::path& file);

  std::string source;  // what was measured: hardware, software, runs
  // The GEMM curve's level where this profile measured no GEMM (CostModelOptions::gemm_curve_scale),
  // fitted to measured per-layer times, and the fit: its RMS relative error over the times it
  // fitted and how many there were. 1 and 0 when none was fitted.
  double gemm_curve_scale = 1.0;
  double gemm_curve_residual = 0;
  int gemm_curve_points = 0;

 private:
  void finalize() const;
  void fit_families() const;
  std::map<std::string, std::vector<double>> samples_;
  std::vector<double> gaps_;
  std::map<std::string, std::map<int, std::vector<std::pair<double, double>>>> collectives_;  // name -> ranks -> (bytes, s)
  std::map<std::tuple<std::string, int, double>, int> comm_samples_;  // files pooled into each point
  std::map<int, double> step_span_;  // iteration -> slowest rank's span, seconds
  std::optional<double> iteration_;  // from a profile file
  std::optional<double> gap_;  // from a profile file
  nlohmann::json traced_plan_;
  std::map<int, std::map<std::string, std::pair<double, std::int64_t>>> by_rank_;  // rank -> signature -> (seconds, count)
  std::optional<std::map<int, double>> rank_speeds_;  // from a profile file
  struct Sized {
    std::string family;
    double work = 0;
  };
  std::map<std::string, Sized> sized_;  // signature -> its family and size
  struct Point {
    double work, seconds, spread;
  };
  struct Family {
    std::vector<Point> points;  // by size, one per size
    double overhead = 0, rate = 0;  // least-squares seconds = overhead + rate * work
    double residual = 0;  // leave-one-out relative error of interpolating each point from the others
  };
  static double interpolate(const Family& f, double work, const Point* skip = nullptr);
  mutable std::map<std::string, MeasuredCost> fitted_;
  mutable std::map<std::string, Family> families_;
  mutable bool dirty_ = false;
};

}  // namespace px::sim
