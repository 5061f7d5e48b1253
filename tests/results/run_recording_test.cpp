// Recording runs: the round trip of every field, all-or-nothing transactions, the begin/finish/fail
// flow, the failed-run rules, filters, experiments and baselines.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "engine/core/error.hpp"
#include "results/results_db.hpp"
#include "results/sqlite.hpp"
#include "tests/results/test_support.hpp"

namespace px {
namespace {

using test::TempDir;

template <typename Fn>
std::string database_error(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Database) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected a database error";
  return {};
}

std::int64_t count_rows(const std::filesystem::path& file, const std::string& table) {
  sqlite::Connection raw = sqlite::Connection::open(file);
  return raw.query_int("SELECT count(*) FROM " + table, "count rows");
}

void expect_same_run(const RunRecord& got, const RunRecord& want) {
  EXPECT_EQ(got.experiment, want.experiment);
  EXPECT_EQ(got.kind, want.kind);
  EXPECT_EQ(got.status, want.status);
  EXPECT_EQ(got.failure_reason, want.failure_reason);
  EXPECT_EQ(got.model, want.model);
  EXPECT_EQ(got.cluster, want.cluster);
  EXPECT_EQ(got.plan_json, want.plan_json);
  EXPECT_EQ(got.model_json, want.model_json);
  EXPECT_EQ(got.cluster_json, want.cluster_json);
  EXPECT_EQ(got.software_json, want.software_json);
  EXPECT_EQ(got.hardware_json, want.hardware_json);
  EXPECT_EQ(got.started_at, want.started_at);
  EXPECT_EQ(got.finished_at, want.finished_at);
  ASSERT_EQ(got.metrics.size(), want.metrics.size());
  for (std::size_t i = 0; i < got.metrics.size(); ++i) {
    EXPECT_EQ(got.metrics[i].name, want.metrics[i].name);
    EXPECT_EQ(got.metrics[i].value, want.metrics[i].value);
    EXPECT_EQ(got.metrics[i].unit, want.metrics[i].unit);
  }
  ASSERT_EQ(got.op_samples.size(), want.op_samples.size());
  for (std::size_t i = 0; i < got.op_samples.size(); ++i) {
    const OpSample& g = got.op_samples[i];
    const OpSample& w = want.op_samples[i];
    EXPECT_EQ(g.rank, w.rank);
    EXPECT_EQ(g.op_id, w.op_id);
    EXPECT_EQ(g.op_name, w.op_name);
    EXPECT_EQ(g.kind, w.kind);
    EXPECT_EQ(g.stream, w.stream);
    EXPECT_EQ(g.start_us, w.start_us);
    EXPECT_EQ(g.end_us, w.end_us);
    EXPECT_EQ(g.bytes, w.bytes);
    EXPECT_EQ(g.flops, w.flops);
  }
}

TEST(ResultsRuns, RecordedRunReadsBackFieldForField) {
  ResultsDb db = ResultsDb::open_memory();
  const RunRecord run = test::sample_run();
  const std::int64_t id = db.record_run(run);
  const auto got = db.get_run(id);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->id, id);
  expect_same_run(*got, run);
  EXPECT_FALSE(db.get_run(id + 1).has_value());
}

TEST(ResultsRuns, EmptyJsonIsStoredAsAnEmptyObjectAndMissingTimesAreNow) {
  ResultsDb db = ResultsDb::open_memory();
  RunRecord run = test::sample_run();
  run.plan_json.clear();
  run.started_at.clear();
  run.finished_at.clear();
  const auto got = db.get_run(db.record_run(run));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->plan_json, "{}");
  ASSERT_EQ(got->started_at.size(), std::string("2024-05-01T12:00:00.000Z").size()) << got->started_at;
  EXPECT_EQ(got->started_at[10], 'T');
  EXPECT_EQ(got->started_at.back(), 'Z');
  EXPECT_GE(got->finished_at, got->started_at);
}

TEST(ResultsRuns, DuplicateMetricLeavesNoTraceOfTheRun) {
  TempDir dir;
  const auto file = dir / "results.db";
  {
    ResultsDb db = ResultsDb::open(file);
    RunRecord run = test::sample_run("atomicity");
    run.metrics.push_back({"step_time", 99.0, "ms"});  // second "step_time"
    const std::string message = database_error([&] { db.record_run(run); });
    EXPECT_NE(message.find("UNIQUE constraint failed: metrics.run_id, metrics.name"), std::string::npos) << message;
    EXPECT_NE(message.find("metric 'step_time'"), std::string::npos) << message;
    EXPECT_TRUE(db.list_runs().empty());
  }
  EXPECT_EQ(count_rows(file, "runs"), 0);
  EXPECT_EQ(count_rows(file, "metrics"), 0);
  EXPECT_EQ(count_rows(file, "op_samples"), 0);
  EXPECT_EQ(count_rows(file, "experiments"), 0);  // created in the same transaction, so rolled back too
}

TEST(ResultsRuns, BadOpSampleLeavesNoTraceOfTheRun) {
  TempDir dir;
  const auto file = dir / "results.db";
  {
    ResultsDb db = ResultsDb::open(file);
    RunRecord run = test::sample_run();
    run.op_samples.push_back({2, 7, "mlp_fwd", "compute", 0, 50.0, 40.0, 0, 0.0});  // ends before it starts
    const std::string message = database_error([&] { db.record_run(run); });
    EXPECT_NE(message.find("CHECK constraint failed: end_us >= start_us"), std::string::npos) << message;
    EXPECT_NE(message.find("op 7 'mlp_fwd' on rank 2"), std::string::npos) << message;
  }
  EXPECT_EQ(count_rows(file, "runs"), 0);
  EXPECT_EQ(count_rows(file, "metrics"), 0);
  EXPECT_EQ(count_rows(file, "op_samples"), 0);
}

TEST(ResultsRuns, RefusesInvalidJsonNamingTheFieldAndByte) {
  ResultsDb db = ResultsDb::open_memory();
  RunRecord run = test::sample_run();
  run.cluster_json = R"({"nodes": 8,})";
  const std::string message = database_error([&] { db.record_run(run); });
  EXPECT_NE(message.find("cluster_json is not valid JSON (byte 13)"), std::string::npos) << message;
  EXPECT_TRUE(db.list_runs().empty());
}

TEST(ResultsRuns, RefusesNonFiniteMetrics) {
  ResultsDb db = ResultsDb::open_memory();
  RunRecord run = test::sample_run();
  run.metrics.push_back({"loss", std::numeric_limits<double>::quiet_NaN(), ""});
  const std::string message = database_error([&] { db.record_run(run); });
  EXPECT_NE(message.find("metric 'loss' is not a finite number"), std::string::npos) << message;
  EXPECT_TRUE(db.list_runs().empty());
}

TEST(ResultsRuns, FailedRunKeepsItsReasonAndNoNumbers) {
  ResultsDb db = ResultsDb::open_memory();
  RunRecord failed = test::sample_run();
  failed.status = RunStatus::Failed;
  failed.failure_reason = "CUDA out of memory on rank 5 (stage 3): tried to allocate 2.00 GiB";
  database_error([&] { db.record_run(failed); });  // still has metrics and samples

  failed.metrics.clear();
  failed.op_samples.clear();
  const auto got = db.get_run(db.record_run(failed));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->status, RunStatus::Failed);
  EXPECT_EQ(got->failure_reason, failed.failure_reason);
  EXPECT_TRUE(got->metrics.empty());

  failed.failure_reason.clear();
  EXPECT_NE(database_error([&] { db.record_run(failed); }).find("a failed run needs a failure reason"),
            std::string::npos);
  RunRecord ok = test::sample_run();
  ok.failure_reason = "spurious";
  EXPECT_NE(database_error([&] { db.record_run(ok); }).find("only a failed run has a failure reason"),
            std::string::npos);
  ok.failure_reason.clear();
  ok.status = RunStatus::Running;
  EXPECT_NE(database_error([&] { db.record_run(ok); }).find("use begin_run"), std::string::npos);
  EXPECT_EQ(db.list_runs().size(), 1u);
}

TEST(ResultsRuns, BeginThenFinishStoresMetricsAtomically) {
  ResultsDb db = ResultsDb::open_memory();
  RunRecord run = test::sample_run();
  const std::vector<Metric> metrics = run.metrics;
  const std::vector<OpSample> samples = run.op_samples;
  run.metrics.clear();
  run.op_samples.clear();
  run.finished_at.clear();
  const std::int64_t id = db.begin_run(run);

  auto running = db.list_runs({.status = RunStatus::Running});
  ASSERT_EQ(running.size(), 1u);
  EXPECT_EQ(running[0].id, id);
  EXPECT_EQ(running[0].finished_at, "");
  EXPECT_TRUE(db.metrics(id).empty());

  // A failing finish (duplicate metric) leaves the run running and without metrics.
  std::vector<Metric> duplicated = metrics;
  duplicated.push_back(metrics.front());
  database_error([&] { db.finish_run(id, duplicated, samples); });
  EXPECT_EQ(db.get_run(id)->status, RunStatus::Running);
  EXPECT_TRUE(db.metrics(id).empty());
  EXPECT_TRUE(db.op_samples(id).empty());

  db.finish_run(id, metrics, samples, "2024-05-01T13:00:00.000Z");
  const auto got = db.get_run(id);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->status, RunStatus::Ok);
  EXPECT_EQ(got->finished_at, "2024-05-01T13:00:00.000Z");
  ASSERT_EQ(got->metrics.size(), 3u);
  EXPECT_EQ(got->metrics[0].name, "step_time");
  EXPECT_EQ(got->metrics[0].value, 1534.25);
  EXPECT_EQ(got->op_samples.size(), 3u);

  EXPECT_NE(database_error([&] { db.finish_run(id, {}); }).find("cannot finish run 1: it is already ok"),
            std::string::npos);
  EXPECT_NE(database_error([&] { db.fail_run(id, "late"); }).find("cannot fail run 1: it is already ok"),
            std::string::npos);
}

TEST(ResultsRuns, BeginThenFailRecordsTheRootCause) {
  ResultsDb db = ResultsDb::open_memory();
  RunRecord run = test::sample_run();
  run.metrics.clear();
  run.op_samples.clear();
  const std::int64_t id = db.begin_run(run);
  EXPECT_NE(database_error([&] { db.fail_run(id, ""); }).find("without a reason"), std::string::npos);
  db.fail_run(id, "NCCL error: unhandled system error (rank 12)");
  const auto got = db.get_run(id);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->status, RunStatus::Failed);
  EXPECT_EQ(got->failure_reason, "NCCL error: unhandled system error (rank 12)");
  EXPECT_FALSE(got->finished_at.empty());
  EXPECT_TRUE(got->metrics.empty());
  EXPECT_NE(database_error([&] { db.finish_run(id, {{"step_time", 1.0, "ms"}}); }).find("already failed"),
            std::string::npos);
  EXPECT_TRUE(db.metrics(id).empty());
  EXPECT_NE(database_error([&] { db.fail_run(99, "x"); }).find("cannot fail run 99: there is no such run"),
            std::string::npos);

  RunRecord with_metrics = test::sample_run();
  EXPECT_NE(database_error([&] { db.begin_run(with_metrics); }).find("pass them to finish_run"),
            std::string::npos);
}

TEST(ResultsRuns, FailedRunRefusesMetricsInTheSchemaToo) {
  TempDir dir;
  const auto file = dir / "results.db";
  std::int64_t id = 0;
  {
    ResultsDb db = ResultsDb::open(file);
    RunRecord run = test::sample_run();
    run.metrics.clear();
    run.op_samples.clear();
    id = db.begin_run(run);
    db.fail_run(id, "killed by the scheduler");
  }
  sqlite::Connection raw = sqlite::Connection::open(file);
  sqlite::Statement insert = raw.prepare("INSERT INTO metrics (run_id, name, value) VALUES (?1, 'x', 1.0)", "test");
  insert.bind_int(1, id);
  EXPECT_NE(database_error([&] { insert.run(); }).find("a failed run has no metrics"), std::string::npos);
}

TEST(ResultsRuns, InvalidTimestampIsRefused) {
  ResultsDb db = ResultsDb::open_memory();
  RunRecord run = test::sample_run();
  run.started_at = "last Tuesday";
  EXPECT_NE(database_error([&] { db.record_run(run); }).find("CHECK constraint failed"), std::string::npos);
}

TEST(ResultsRuns, ListFiltersCombine) {
  ResultsDb db = ResultsDb::open_memory();
  auto add = [&](const std::string& experiment, RunKind kind, const std::string& model) {
    RunRecord r = test::sample_run(experiment);
    r.kind = kind;
    r.model = model;
    return db.record_run(r);
  };
  const auto a = add("sweep", RunKind::Simulated, "gpt3-175b");
  const auto b = add("sweep", RunKind::Measured, "gpt3-175b");
  const auto c = add("sweep", RunKind::Simulated, "llama2-70b");
  const auto d = add("other", RunKind::Simulated, "gpt3-175b");

  auto ids = [](const std::vector<RunSummary>& runs) {
    std::vector<std::int64_t> out;
    for (const auto& r : runs) out.push_back(r.id);
    return out;
  };
  EXPECT_EQ(ids(db.list_runs()), (std::vector<std::int64_t>{a, b, c, d}));
  EXPECT_EQ(ids(db.list_runs({.experiment = "sweep"})), (std::vector<std::int64_t>{a, b, c}));
  EXPECT_EQ(ids(db.list_runs({.experiment = "sweep", .kind = RunKind::Simulated})),
            (std::vector<std::int64_t>{a, c}));
  EXPECT_EQ(ids(db.list_runs({.kind = RunKind::Simulated, .model = "gpt3-175b"})),
            (std::vector<std::int64_t>{a, d}));
  EXPECT_EQ(ids(db.list_runs({.status = RunStatus::Failed})), (std::vector<std::int64_t>{}));
  EXPECT_EQ(ids(db.list_runs({.cluster = "dgx-h100-64", .limit = 2})), (std::vector<std::int64_t>{a, b}));
  const auto listed = db.list_runs({.experiment = "other"});
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].experiment, "other");
  EXPECT_EQ(listed[0].kind, RunKind::Simulated);
  EXPECT_EQ(listed[0].started_at, "2024-05-01T12:00:00.000Z");
}

TEST(ResultsRuns, EnsureExperimentIsIdempotent) {
  ResultsDb db = ResultsDb::open_memory();
  const auto id = db.ensure_experiment("scaling", "weak scaling 8 to 1024 GPUs");
  EXPECT_EQ(db.ensure_experiment("scaling"), id);
  EXPECT_EQ(db.ensure_experiment("scaling", "other text"), id);
  EXPECT_NE(db.ensure_experiment("another"), id);
  EXPECT_NE(database_error([&] { db.ensure_experiment(""); }).find("needs an experiment name"), std::string::npos);
}

TEST(ResultsRuns, KindAndStatusNamesRoundTrip) {
  for (RunKind k : {RunKind::Measured, RunKind::Simulated, RunKind::Analytical, RunKind::Baseline}) {
    EXPECT_EQ(parse_run_kind(to_string(k)), k);
  }
  for (RunStatus s : {RunStatus::Running, RunStatus::Ok, RunStatus::Failed}) {
    EXPECT_EQ(parse_run_status(to_string(s)), s);
  }
  EXPECT_FALSE(parse_run_kind("guessed").has_value());
  EXPECT_FALSE(parse_run_status("done").has_value());
}

TEST(ResultsBaselines, AddingTheSameBaselineTwiceUpdatesIt) {
  ResultsDb db = ResultsDb::open_memory();
  Baseline b{0, "Narayanan et al., SC'21, Table 1", "megatron-scaling", "gpt3-175b", "1024x A100 (Selene)",
             "tflops_per_gpu", 140.0, "TFLOP/s", "first value"};
  const auto id = db.add_baseline(b);
  b.value = 138.0;
  b.notes = "corrected";
  EXPECT_EQ(db.add_baseline(b), id);
  Baseline other = b;
  other.model = "gpt-1t";
  other.value = 163.0;
  const auto other_id = db.add_baseline(other);
  EXPECT_NE(other_id, id);

  const auto all = db.baselines();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].id, id);
  EXPECT_EQ(all[0].value, 138.0);
  EXPECT_EQ(all[0].notes, "corrected");
  EXPECT_EQ(all[0].source, "Narayanan et al., SC'21, Table 1");
  const auto gpt1t = db.baselines({.model = "gpt-1t"});
  ASSERT_EQ(gpt1t.size(), 1u);
  EXPECT_EQ(gpt1t[0].value, 163.0);
  EXPECT_TRUE(db.baselines({.benchmark = "mlperf-training"}).empty());

  Baseline unsourced = b;
  unsourced.source.clear();
  EXPECT_NE(database_error([&] { db.add_baseline(unsourced); }).find("needs a source"), std::string::npos);
}

}  // namespace
}  // namespace px
