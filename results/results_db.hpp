// The results database: experiments, runs with their metrics and per-op samples, and published
// baselines, in one SQLite file that several processes may write at once. Plans, models and clusters
// are stored as names plus the caller's JSON text, so this library does not depend on the spec types.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "results/sqlite.hpp"

namespace px {

enum class RunKind { Measured, Simulated, Analytical, Baseline };
enum class RunStatus { Running, Ok, Failed };

std::string_view to_string(RunKind kind);
std::string_view to_string(RunStatus status);
std::optional<RunKind> parse_run_kind(std::string_view text);
std::optional<RunStatus> parse_run_status(std::string_view text);

struct Metric {
  std::string name{};  // unique within a run, e.g. "step_time"
  double value = 0;    // finite
  std::string unit{};  // e.g. "ms", "TFLOP/s", "%"; may be empty
};

// One op's execution on one rank, keyed by the op id of the compiled program.
struct OpSample {
  int rank = 0;
  std::int64_t op_id = 0;
  std::string op_name{};
  std::string kind{};  // e.g. "compute", "comm", "memory"
  int stream = 0;
  double start_us = 0;
  double end_us = 0;
  std::int64_t bytes = 0;
  double flops = 0;
};

// A whole run. JSON fields hold the caller's JSON text; an empty string is stored as "{}".
// Timestamps are UTC ISO 8601 ("2024-05-01T12:00:00.000Z"); an empty one means "now".
struct RunRecord {
  std::int64_t id = 0;       // assigned by the database; ignored when recording
  std::string experiment{};  // experiment name; created on first use
  RunKind kind = RunKind::Measured;
  RunStatus status = RunStatus::Ok;
  std::string failure_reason{};  // required for Failed, empty otherwise
  std::string model{};
  std::string cluster{};
  std::string plan_json{};
  std::string model_json{};
  std::string cluster_json{};
  std::string software_json{};  // software_provenance_json()
  std::string hardware_json{};  // hardware_provenance_json()
  std::string started_at{};
  std::string finished_at{};  // empty while running
  std::vector<Metric> metrics{};
  std::vector<OpSample> op_samples{};
};

// A run without its JSON, metrics and samples: one line of a run list.
struct RunSummary {
  std::int64_t id = 0;
  std::string experiment{};
  RunKind kind = RunKind::Measured;
  RunStatus status = RunStatus::Ok;
  std::string failure_reason{};
  std::string model{};
  std::string cluster{};
  std::string started_at{};
  std::string finished_at{};
};

// Conditions ANDed together; an unset field matches every run.
struct RunFilter {
  std::optional<std::string> experiment{};
  std::optional<RunKind> kind{};
  std::optional<RunStatus> status{};
  std::optional<std::string> model{};
  std::optional<std::string> cluster{};
  std::int64_t limit = -1;  // most runs returned, oldest first; -1: all
};

// A published figure to compare against, with where it comes from.
struct Baseline {
  std::int64_t id = 0;   // assigned by the database
  std::string source{};  // citation: paper, MLPerf round and submission, URL
  std::string benchmark{};
  std::string model{};
  std::string system{};  // cluster or system name as the source gives it
  std::string metric{};
  double value = 0;
  std::string unit{};
  std::string notes{};
};

struct BaselineFilter {
  std::optional<std::string> benchmark{};
  std::optional<std::string> model{};
  std::optional<std::string> system{};
  std::optional<std::string> metric{};
};

// One connection to a results file. Use one ResultsDb per thread; several processes (or threads,
// each with its own ResultsDb) may write the same file concurrently.
class ResultsDb {
 public:
  // Creates the file if absent, refuses a file that is not a Parallax results database or whose
  // schema is newer than this build (leaving it untouched), upgrades an older one, and turns on WAL.
  static ResultsDb open(const std::filesystem::path& file);
  static ResultsDb open_memory();

  const std::string& file() const { return db_.file(); }
  int schema_version();

  // Returns the id of the named experiment, creating it if needed (an existing description is kept).
  std::int64_t ensure_experiment(const std::string& name, const std::string& description = {});

  // Records a finished run (status Ok or Failed) with all its metrics and op samples in one
  // transaction: afterwards either everything is in the file or nothing is. A failed run carries its
  // reason and no metrics or samples.
  std::int64_t record_run(const RunRecord& run);

  // Two phases for long runs. begin_run stores the run as 'running' (metrics and samples in `run`
  // must be empty); finish_run adds them and marks it ok, atomically; fail_run marks it failed with
  // its root cause. Finishing or failing a run that is not running is an error.
  std::int64_t begin_run(const RunRecord& run);
  void finish_run(std::int64_t run_id, const std::vector<Metric>& metrics,
                  const std::vector<OpSample>& op_samples = {}, const std::string& finished_at = {});
  void fail_run(std::int64_t run_id, const std::string& reason, const std::string& finished_at = {});

  std::vector<RunSummary> list_runs(const RunFilter& filter = {});
  // The whole run: JSON, metrics and op samples included, in the order they were recorded.
  std::optional<RunRecord> get_run(std::int64_t run_id);
  std::vector<Metric> metrics(std::int64_t run_id);
  std::vector<OpSample> op_samples(std::int64_t run_id);

  // Adds a baseline, or updates value, unit and notes of the one with the same source, benchmark,
  // model, system and metric, so loading a baseline file twice changes nothing. Returns its id.
  std::int64_t add_baseline(const Baseline& baseline);
  std::vector<Baseline> baselines(const BaselineFilter& filter = {});

 private:
  explicit ResultsDb(sqlite::Connection db) : db_(std::move(db)) {}
  std::int64_t insert_run(const RunRecord& run, RunStatus status, std::string_view purpose);
  void insert_metrics(std::int64_t run_id, const std::vector<Metric>& metrics);
  void insert_op_samples(std::int64_t run_id, const std::vector<OpSample>& samples);
  sqlite::Connection db_;
};

}  // namespace px
