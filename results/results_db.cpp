// ResultsDb: opening (check, WAL, upgrade), recording runs atomically, and the read queries. Every
// write that spans several rows is one BEGIN IMMEDIATE transaction, so a reader or a crash never sees
// a run without its metrics.
#include "results/results_db.hpp"

#include <cassert>
#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engine/core/error.hpp"
#include "results/schema.hpp"

namespace px {
namespace {

// The current UTC time in the schema's timestamp format, pasted into constant SQL text.
#define PX_SQL_NOW "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

[[noreturn]] void refuse(const std::string& file, std::string message, std::string hint = {}) {
  throw Error(ErrorKind::Database, Location{file, 0, 0, -1}, std::move(message), std::move(hint));
}

// Checked here as well as by the schema's json_valid() CHECK, to name the field and the byte.
std::string json_or_empty_object(const std::string& file, std::string_view field, const std::string& text) {
  if (text.empty()) return "{}";
  try {
    [[maybe_unused]] const auto parsed = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    refuse(file, fmt::format("{} is not valid JSON (byte {})", field, e.byte),
           "pass the JSON text of the object, or an empty string");
  }
  return text;
}

void check_metrics(const std::string& file, const std::vector<Metric>& metrics) {
  for (const Metric& m : metrics) {
    if (m.name.empty()) refuse(file, "a metric has an empty name");
    if (!std::isfinite(m.value)) {
      refuse(file, fmt::format("metric '{}' is not a finite number ({})", m.name, m.value),
             "record the run as failed instead of storing NaN or infinity");
    }
  }
}

// Rethrows a database error with the name of the row that caused it, e.g. a duplicate metric.
template <typename Fn>
void naming_row(std::string_view row, Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    throw Error(e.kind(), e.where(), fmt::format("{} ({})", e.message(), row), e.hint());
  }
}

RunKind kind_from_db(const std::string& text) {
  const auto kind = parse_run_kind(text);
  return kind ? *kind : RunKind::Measured;  // the schema's CHECK admits only known kinds
}

RunStatus status_from_db(const std::string& text) {
  const auto status = parse_run_status(text);
  return status ? *status : RunStatus::Failed;  // the schema's CHECK admits only known statuses
}

void bind_optional(sqlite::Statement& stmt, int index, const std::optional<std::string>& value) {
  if (value) {
    stmt.bind_text(index, *value);
  } else {
    stmt.bind_null(index);
  }
}

std::int64_t experiment_id(sqlite::Connection& db, const std::string& name, const std::string& description) {
  if (name.empty()) refuse(db.file(), "a run or experiment needs an experiment name");
  db.prepare("INSERT INTO experiments (name, description, created_at) VALUES (?1, ?2, " PX_SQL_NOW ") "
             "ON CONFLICT (name) DO NOTHING",
             "create experiment")
      .bind_text(1, name)
      .bind_text(2, description)
      .run();
  sqlite::Statement find = db.prepare("SELECT id FROM experiments WHERE name = ?1", "look up experiment");
  find.bind_text(1, name);
  [[maybe_unused]] const bool found = find.step();
  assert(found && "the experiment was just inserted or already existed");
  return find.column_int(0);
}

// The status of a run that finish_run/fail_run may move on from; anything else is an error.
void require_running(sqlite::Connection& db, std::int64_t run_id, std::string_view action) {
  sqlite::Statement stmt = db.prepare("SELECT status FROM runs WHERE id = ?1", "look up run status");
  stmt.bind_int(1, run_id);
  if (!stmt.step()) refuse(db.file(), fmt::format("cannot {} run {}: there is no such run", action, run_id));
  const std::string status = stmt.column_text(0);
  if (status != "running") {
    refuse(db.file(), fmt::format("cannot {} run {}: it is already {}", action, run_id, status),
           "only a run started with begin_run and not yet finished can be finished or failed");
  }
}

}  // namespace

std::string_view to_string(RunKind kind) {
  switch (kind) {
    case RunKind::Measured: return "measured";
    case RunKind::Simulated: return "simulated";
    case RunKind::Analytical: return "analytical";
    case RunKind::Baseline: return "baseline";
  }
  return "measured";
}

std::string_view to_string(RunStatus status) {
  switch (status) {
    case RunStatus::Running: return "running";
    case RunStatus::Ok: return "ok";
    case RunStatus::Failed: return "failed";
  }
  return "failed";
}

std::optional<RunKind> parse_run_kind(std::string_view text) {
  for (RunKind k : {RunKind::Measured, RunKind::Simulated, RunKind::Analytical, RunKind::Baseline}) {
    if (text == to_string(k)) return k;
  }
  return std::nullopt;
}

std::optional<RunStatus> parse_run_status(std::string_view text) {
  for (RunStatus s : {RunStatus::Running, RunStatus::Ok, RunStatus::Failed}) {
    if (text == to_string(s)) return s;
  }
  return std::nullopt;
}

ResultsDb ResultsDb::open(const std::filesystem::path& file) {
  sqlite::Connection db = sqlite::Connection::open(file);
  const int version = results_schema::check_compatible(db);
  // WAL lets readers (the GUI) run beside a writer and keeps each commit to one append.
  const std::string mode = db.enable_wal();
  if (mode != "wal") {
    refuse(db.file(), fmt::format("could not switch to write-ahead logging (journal mode is '{}')", mode),
           "put the database on a local file system");
  }
  // In WAL mode NORMAL still keeps every commit atomic; it only skips the fsync per commit.
  db.exec("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON", "set connection options");
  if (version < results_schema::latest_version()) results_schema::upgrade(db);
  return ResultsDb(std::move(db));
}

ResultsDb ResultsDb::open_memory() {
  sqlite::Connection db = sqlite::Connection::open_memory();
  db.exec("PRAGMA foreign_keys = ON", "set connection options");
  results_schema::upgrade(db);
  return ResultsDb(std::move(db));
}

int ResultsDb::schema_version() {
  return static_cast<int>(db_.query_int("PRAGMA user_version", "read the schema version"));
}

std::int64_t ResultsDb::ensure_experiment(const std::string& name, const std::string& description) {
  sqlite::WriteTransaction tx(db_, "create an experiment");
  const std::int64_t id = experiment_id(db_, name, description);
  tx.commit();
  return id;
}

std::int64_t ResultsDb::insert_run(const RunRecord& run, RunStatus status, std::string_view purpose) {
  const std::string& file = db_.file();
  const std::string plan = json_or_empty_object(file, "plan_json", run.plan_json);
  const std::string model = json_or_empty_object(file, "model_json", run.model_json);
  const std::string cluster = json_or_empty_object(file, "cluster_json", run.cluster_json);
  const std::string software = json_or_empty_object(file, "software_json", run.software_json);
  const std::string hardware = json_or_empty_object(file, "hardware_json", run.hardware_json);
  if ((status == RunStatus::Failed) != !run.failure_reason.empty()) {
    refuse(file,
           status == RunStatus::Failed ? "a failed run needs a failure reason"
                                       : "only a failed run has a failure reason",
           "the reason is the root cause of the failure, e.g. the error message");
  }

  const std::int64_t experiment = experiment_id(db_, run.experiment, {});
  sqlite::Statement insert = db_.prepare(
      "INSERT INTO runs (experiment_id, kind, status, failure_reason, model, cluster, plan_json, model_json, "
      "cluster_json, software_json, hardware_json, started_at, finished_at) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, coalesce(?12, " PX_SQL_NOW "), "
      "CASE WHEN ?3 = 'running' THEN NULL ELSE coalesce(?13, " PX_SQL_NOW ") END)",
      purpose);
  insert.bind_int(1, experiment)
      .bind_text(2, to_string(run.kind))
      .bind_text(3, to_string(status))
      .bind_text_or_null(4, run.failure_reason)
      .bind_text(5, run.model)
      .bind_text(6, run.cluster)
      .bind_text(7, plan)
      .bind_text(8, model)
      .bind_text(9, cluster)
      .bind_text(10, software)
      .bind_text(11, hardware)
      .bind_text_or_null(12, run.started_at)
      .bind_text_or_null(13, run.finished_at)
      .run();
  return db_.last_insert_rowid();
}

void ResultsDb::insert_metrics(std::int64_t run_id, const std::vector<Metric>& metrics) {
  check_metrics(db_.file(), metrics);
  sqlite::Statement insert = db_.prepare(
      "INSERT INTO metrics (run_id, name, value, unit) VALUES (?1, ?2, ?3, ?4)", "insert a run metric");
  for (const Metric& m : metrics) {
    naming_row(fmt::format("metric '{}' of run {}", m.name, run_id), [&] {
      insert.bind_int(1, run_id).bind_text(2, m.name).bind_real(3, m.value).bind_text(4, m.unit).run();
    });
    insert.reset();
  }
}

void ResultsDb::insert_op_samples(std::int64_t run_id, const std::vector<OpSample>& samples) {
  sqlite::Statement insert = db_.prepare(
      "INSERT INTO op_samples (run_id, rank, op_id, op_name, kind, stream, start_us, end_us, bytes, flops) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
      "insert an op sample");
  for (const OpSample& s : samples) {
    naming_row(fmt::format("op {} '{}' on rank {} of run {}", s.op_id, s.op_name, s.rank, run_id), [&] {
      insert.bind_int(1, run_id)
          .bind_int(2, s.rank)
          .bind_int(3, s.op_id)
          .bind_text(4, s.op_name)
          .bind_text(5, s.kind)
          .bind_int(6, s.stream)
          .bind_real(7, s.start_us)
          .bind_real(8, s.end_us)
          .bind_int(9, s.bytes)
          .bind_real(10, s.flops)
          .run();
    });
    insert.reset();
  }
}

std::int64_t ResultsDb::record_run(const RunRecord& run) {
  if (run.status == RunStatus::Running) {
    refuse(db_.file(), "record_run stores finished runs only", "use begin_run for a run that is still going");
  }
  if (run.status == RunStatus::Failed && (!run.metrics.empty() || !run.op_samples.empty())) {
    refuse(db_.file(), "a failed run has no metrics or op samples",
           "keep the failure reason; numbers from a failed run would read as a result");
  }
  sqlite::WriteTransaction tx(db_, "record a run");
  const std::int64_t id = insert_run(run, run.status, "insert a run");
  insert_metrics(id, run.metrics);
  insert_op_samples(id, run.op_samples);
  tx.commit();
  return id;
}

std::int64_t ResultsDb::begin_run(const RunRecord& run) {
  if (!run.metrics.empty() || !run.op_samples.empty()) {
    refuse(db_.file(), "begin_run takes no metrics or op samples", "pass them to finish_run");
  }
  sqlite::WriteTransaction tx(db_, "begin a run");
  const std::int64_t id = insert_run(run, RunStatus::Running, "insert a running run");
  tx.commit();
  return id;
}

void ResultsDb::finish_run(std::int64_t run_id, const std::vector<Metric>& metrics,
                           const std::vector<OpSample>& op_samples, const std::string& finished_at) {
  sqlite::WriteTransaction tx(db_, "finish a run");
  require_running(db_, run_id, "finish");
  insert_metrics(run_id, metrics);
  insert_op_samples(run_id, op_samples);
  db_.prepare("UPDATE runs SET status = 'ok', finished_at = coalesce(?2, " PX_SQL_NOW ") WHERE id = ?1",
              "mark a run ok")
      .bind_int(1, run_id)
      .bind_text_or_null(2, finished_at)
      .run();
  tx.commit();
}

void ResultsDb::fail_run(std::int64_t run_id, const std::string& reason, const std::string& finished_at) {
  if (reason.empty()) {
    refuse(db_.file(), fmt::format("cannot fail run {} without a reason", run_id),
           "the reason is the root cause of the failure, e.g. the error message");
  }
  sqlite::WriteTransaction tx(db_, "fail a run");
  require_running(db_, run_id, "fail");
  db_.prepare("UPDATE runs SET status = 'failed', failure_reason = ?2, finished_at = coalesce(?3, " PX_SQL_NOW
              ") WHERE id = ?1",
              "mark a run failed")
      .bind_int(1, run_id)
      .bind_text(2, reason)
      .bind_text_or_null(3, finished_at)
      .run();
  tx.commit();
}

// The columns every run query starts with, and their reader (for RunSummary and RunRecord alike).
#define PX_RUN_COLUMNS "r.id, e.name, r.kind, r.status, r.failure_reason, r.model, r.cluster, r.started_at, r.finished_at"

namespace {
template <class Run>
void read_run_columns(sqlite::Statement& stmt, Run& r) {
  r.id = stmt.column_int(0);
  r.experiment = stmt.column_text(1);
  r.kind = kind_from_db(stmt.column_text(2));
  r.status = status_from_db(stmt.column_text(3));
  r.failure_reason = stmt.column_text(4);
  r.model = stmt.column_text(5);
  r.cluster = stmt.column_text(6);
  r.started_at = stmt.column_text(7);
  r.finished_at = stmt.column_text(8);
}
}  // namespace

std::vector<RunSummary> ResultsDb::list_runs(const RunFilter& filter) {
  sqlite::Statement stmt = db_.prepare(
      "SELECT " PX_RUN_COLUMNS " FROM runs r JOIN experiments e ON e.id = r.experiment_id "
      "WHERE (?1 IS NULL OR e.name = ?1) AND (?2 IS NULL OR r.kind = ?2) AND (?3 IS NULL OR r.status = ?3) "
      "AND (?4 IS NULL OR r.model = ?4) AND (?5 IS NULL OR r.cluster = ?5) ORDER BY r.id LIMIT ?6",
      "list runs");
  bind_optional(stmt, 1, filter.experiment);
  bind_optional(stmt, 2, filter.kind ? std::optional<std::string>(to_string(*filter.kind)) : std::nullopt);
  bind_optional(stmt, 3, filter.status ? std::optional<std::string>(to_string(*filter.status)) : std::nullopt);
  bind_optional(stmt, 4, filter.model);
  bind_optional(stmt, 5, filter.cluster);
  stmt.bind_int(6, filter.limit);
  std::vector<RunSummary> runs;
  while (stmt.step()) {
    read_run_columns(stmt, runs.emplace_back());
  }
  return runs;
}

std::optional<RunRecord> ResultsDb::get_run(std::int64_t run_id) {
  sqlite::Statement stmt = db_.prepare(
      "SELECT " PX_RUN_COLUMNS ", r.plan_json, r.model_json, r.cluster_json, r.software_json, r.hardware_json "
      "FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE r.id = ?1",
      "read a run");
  stmt.bind_int(1, run_id);
  if (!stmt.step()) return std::nullopt;
  RunRecord r;
  read_run_columns(stmt, r);
  r.plan_json = stmt.column_text(9);
  r.model_json = stmt.column_text(10);
  r.cluster_json = stmt.column_text(11);
  r.software_json = stmt.column_text(12);
  r.hardware_json = stmt.column_text(13);
  r.metrics = metrics(run_id);
  r.op_samples = op_samples(run_id);
  return r;
}

std::vector<Metric> ResultsDb::metrics(std::int64_t run_id) {
  sqlite::Statement stmt =
      db_.prepare("SELECT name, value, unit FROM metrics WHERE run_id = ?1 ORDER BY id", "read run metrics");
  stmt.bind_int(1, run_id);
  std::vector<Metric> out;
  while (stmt.step()) out.push_back(Metric{stmt.column_text(0), stmt.column_real(1), stmt.column_text(2)});
  return out;
}

std::vector<OpSample> ResultsDb::op_samples(std::int64_t run_id) {
  sqlite::Statement stmt = db_.prepare(
      "SELECT rank, op_id, op_name, kind, stream, start_us, end_us, bytes, flops FROM op_samples "
      "WHERE run_id = ?1 ORDER BY id",
      "read run op samples");
  stmt.bind_int(1, run_id);
  std::vector<OpSample> out;
  while (stmt.step()) {
    OpSample& s = out.emplace_back();
    s.rank = static_cast<int>(stmt.column_int(0));
    s.op_id = stmt.column_int(1);
    s.op_name = stmt.column_text(2);
    s.kind = stmt.column_text(3);
    s.stream = static_cast<int>(stmt.column_int(4));
    s.start_us = stmt.column_real(5);
    s.end_us = stmt.column_real(6);
    s.bytes = stmt.column_int(7);
    s.flops = stmt.column_real(8);
  }
  return out;
}

std::int64_t ResultsDb::add_baseline(const Baseline& b) {
  if (b.source.empty()) refuse(db_.file(), "a baseline needs a source", "cite the paper, MLPerf round or URL");
  if (b.metric.empty()) refuse(db_.file(), "a baseline needs a metric name");
  if (!std::isfinite(b.value)) {
    refuse(db_.file(), fmt::format("baseline '{}' of {} is not a finite number", b.metric, b.model));
  }
  sqlite::Statement stmt = db_.prepare(
      "INSERT INTO baselines (source, benchmark, model, system, metric, value, unit, notes) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) "
      "ON CONFLICT (source, benchmark, model, system, metric) "
      "DO UPDATE SET value = excluded.value, unit = excluded.unit, notes = excluded.notes RETURNING id",
      "add a baseline");
  stmt.bind_text(1, b.source)
      .bind_text(2, b.benchmark)
      .bind_text(3, b.model)
      .bind_text(4, b.system)
      .bind_text(5, b.metric)
      .bind_real(6, b.value)
      .bind_text(7, b.unit)
      .bind_text(8, b.notes);
  [[maybe_unused]] const bool returned = stmt.step();
  const std::int64_t id = stmt.column_int(0);
  stmt.run();  // RETURNING rows must be stepped to the end for the write to complete
  return id;
}

std::vector<Baseline> ResultsDb::baselines(const BaselineFilter& filter) {
  sqlite::Statement stmt = db_.prepare(
      "SELECT id, source, benchmark, model, system, metric, value, unit, notes FROM baselines "
      "WHERE (?1 IS NULL OR benchmark = ?1) AND (?2 IS NULL OR model = ?2) AND (?3 IS NULL OR system = ?3) "
      "AND (?4 IS NULL OR metric = ?4) ORDER BY id",
      "list baselines");
  bind_optional(stmt, 1, filter.benchmark);
  bind_optional(stmt, 2, filter.model);
  bind_optional(stmt, 3, filter.system);
  bind_optional(stmt, 4, filter.metric);
  std::vector<Baseline> out;
  while (stmt.step()) {
    Baseline& b = out.emplace_back();
    b.id = stmt.column_int(0);
    b.source = stmt.column_text(1);
    b.benchmark = stmt.column_text(2);
    b.model = stmt.column_text(3);
    b.system = stmt.column_text(4);
    b.metric = stmt.column_text(5);
    b.value = stmt.column_real(6);
    b.unit = stmt.column_text(7);
    b.notes = stmt.column_text(8);
  }
  return out;
}

}  // namespace px
