// The results schema: STRICT tables and CHECK rules, migrations from an empty or an older file,
// idempotent reopening, and refusal (file untouched) of newer, foreign and non-database files.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "engine/core/error.hpp"
#include "results/results_db.hpp"
#include "results/schema.hpp"
#include "results/sqlite.hpp"
#include "tests/results/test_support.hpp"

namespace px {
namespace {

using test::TempDir;

std::string query_text(sqlite::Connection& db, const std::string& sql) {
  sqlite::Statement stmt = db.prepare(sql, "test query");
  return stmt.step() ? stmt.column_text(0) : std::string();
}

std::vector<std::string> column_texts(sqlite::Connection& db, const std::string& sql) {
  sqlite::Statement stmt = db.prepare(sql, "test query");
  std::vector<std::string> out;
  while (stmt.step()) out.push_back(stmt.column_text(0));
  return out;
}

// Runs `fn`, which must throw a px::Error of kind Database, and returns its one-line text.
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

std::vector<std::string> directory_listing(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

TEST(ResultsSchema, NewFileIsAtLatestVersionInWalMode) {
  TempDir dir;
  const auto file = dir / "results.db";
  {
    ResultsDb db = ResultsDb::open(file);
    EXPECT_EQ(db.schema_version(), 2);
    EXPECT_EQ(db.file(), file.string());
  }
  sqlite::Connection raw = sqlite::Connection::open(file);
  EXPECT_EQ(query_text(raw, "PRAGMA journal_mode"), "wal");
  EXPECT_EQ(raw.query_int("PRAGMA user_version", "test"), 2);
  EXPECT_EQ(raw.query_int("PRAGMA application_id", "test"), results_schema::kApplicationId);
  EXPECT_EQ(column_texts(raw, "SELECT name FROM schema_migrations ORDER BY version"),
            (std::vector<std::string>{"initial schema", "query indices"}));
}

TEST(ResultsSchema, EveryTableIsStrict) {
  sqlite::Connection raw = sqlite::Connection::open_memory();
  results_schema::upgrade(raw);
  const auto tables = column_texts(raw, "SELECT name FROM pragma_table_list WHERE schema = 'main' "
                                        "AND name NOT LIKE 'sqlite_%' AND strict = 0");
  EXPECT_TRUE(tables.empty()) << "not STRICT: " << tables.front();
  EXPECT_EQ(raw.query_int("SELECT count(*) FROM pragma_table_list WHERE schema = 'main' AND strict = 1", "test"),
            6);  // schema_migrations, experiments, runs, metrics, op_samples, baselines
}

TEST(ResultsSchema, StrictTablesRejectWrongTypes) {
  sqlite::Connection raw = sqlite::Connection::open_memory();
  results_schema::upgrade(raw);
  raw.exec("INSERT INTO experiments (id, name, created_at) VALUES (1, 'e', '2024-01-01T00:00:00Z')", "setup");
  raw.exec("INSERT INTO runs (id, experiment_id, kind, status, model, cluster, started_at, finished_at) "
           "VALUES (1, 1, 'measured', 'ok', 'm', 'c', '2024-01-01T00:00:00Z', '2024-01-01T00:01:00Z')",
           "setup");
  const std::string text_in_integer = database_error([&] {
    raw.exec("INSERT INTO op_samples (run_id, rank, op_id, op_name, kind, stream, start_us, end_us) "
             "VALUES (1, 'rank zero', 1, 'gemm', 'compute', 0, 0.0, 1.0)",
             "insert a text rank");
  });
  EXPECT_NE(text_in_integer.find("cannot store TEXT value in INTEGER column op_samples.rank"), std::string::npos)
      << text_in_integer;
  database_error([&] {  // the rowid alias refuses text as well
    raw.exec("INSERT INTO experiments (id, name, created_at) VALUES ('seven', 'f', '2024-01-01T00:00:00Z')",
             "insert a text id");
  });
  const std::string text_in_real = database_error([&] {
    raw.exec("INSERT INTO metrics (run_id, name, value) VALUES (1, 'step_time', 'fast')", "insert a text value");
  });
  EXPECT_NE(text_in_real.find("cannot store TEXT value in REAL column metrics.value"), std::string::npos)
      << text_in_real;
}

TEST(ResultsSchema, ChecksGuardEnumsFailureReasonsAndReferences) {
  sqlite::Connection raw = sqlite::Connection::open_memory();
  raw.exec("PRAGMA foreign_keys = ON", "setup");
  results_schema::upgrade(raw);
  raw.exec("INSERT INTO experiments (id, name, created_at) VALUES (1, 'e', '2024-01-01T00:00:00Z')", "setup");
  const std::string columns =
      "INSERT INTO runs (experiment_id, kind, status, failure_reason, model, cluster, plan_json, started_at, "
      "finished_at) VALUES ";
  auto insert = [&](const std::string& values) { raw.exec(columns + values, "insert a run"); };
  const std::string ok_times = "'2024-01-01T00:00:00Z', '2024-01-01T00:01:00Z')";

  insert("(1, 'measured', 'ok', NULL, 'm', 'c', '{}', " + ok_times);  // the valid reference row
  EXPECT_NE(database_error([&] { insert("(1, 'guessed', 'ok', NULL, 'm', 'c', '{}', " + ok_times); })
                .find("CHECK constraint failed"),
            std::string::npos);
  EXPECT_NE(database_error([&] { insert("(1, 'measured', 'done', NULL, 'm', 'c', '{}', " + ok_times); })
                .find("CHECK constraint failed"),
            std::string::npos);
  // failed <=> reason
  database_error([&] { insert("(1, 'measured', 'failed', NULL, 'm', 'c', '{}', " + ok_times); });
  database_error([&] { insert("(1, 'measured', 'ok', 'oom', 'm', 'c', '{}', " + ok_times); });
  database_error([&] { insert("(1, 'measured', 'failed', '', 'm', 'c', '{}', " + ok_times); });
  insert("(1, 'measured', 'failed', 'out of memory on rank 3', 'm', 'c', '{}', " + ok_times);
  // running <=> no finish time; finish not before start; JSON must parse; times must be dates
  database_error([&] { insert("(1, 'measured', 'running', NULL, 'm', 'c', '{}', " + ok_times); });
  database_error([&] {
    insert("(1, 'measured', 'ok', NULL, 'm', 'c', '{}', '2024-01-02T00:00:00Z', '2024-01-01T00:00:00Z')");
  });
  database_error([&] { insert("(1, 'measured', 'ok', NULL, 'm', 'c', '{tp: 8', " + ok_times); });
  database_error([&] { insert("(1, 'measured', 'ok', NULL, 'm', 'c', '{}', 'yesterday', '2024-01-01T00:01:00Z')"); });
  // unknown experiment
  EXPECT_NE(database_error([&] {
              raw.exec("INSERT INTO runs (experiment_id, kind, status, model, cluster, started_at, finished_at) "
                       "VALUES (42, 'measured', 'ok', 'm', 'c', " + ok_times,
                       "insert a run");
            }).find("FOREIGN KEY constraint failed"),
            std::string::npos);
  EXPECT_EQ(raw.query_int("SELECT count(*) FROM runs", "test"), 2);
}

TEST(ResultsSchema, MigratesAnEmptyFileFromVersionZero) {
  TempDir dir;
  const auto file = dir / "empty.db";
  test::write_bytes(file, "");  // a zero-length file is an empty SQLite database at version 0
  ResultsDb db = ResultsDb::open(file);
  EXPECT_EQ(db.schema_version(), 2);
  EXPECT_GT(db.ensure_experiment("first"), 0);
}

TEST(ResultsSchema, UpgradesAnOlderDatabaseKeepingItsRows) {
  TempDir dir;
  const auto file = dir / "v1.db";
  {
    sqlite::Connection raw = sqlite::Connection::open(file);
    results_schema::upgrade(raw, results_schema::migrations().first(1));
    raw.exec("INSERT INTO experiments (name, description, created_at) "
             "VALUES ('old', 'made by version 1', '2023-01-01T00:00:00Z')",
             "setup");
    ASSERT_EQ(raw.query_int("PRAGMA user_version", "test"), 1);
  }
  ResultsDb db = ResultsDb::open(file);
  EXPECT_EQ(db.schema_version(), 2);
  EXPECT_EQ(db.ensure_experiment("old"), 1);  // the row made at version 1 is still there
  sqlite::Connection raw = sqlite::Connection::open(file);
  EXPECT_EQ(raw.query_int("SELECT count(*) FROM schema_migrations", "test"), 2);
  EXPECT_EQ(query_text(raw, "SELECT name FROM sqlite_schema WHERE type = 'index' AND name = 'runs_by_experiment'"),
            "runs_by_experiment");
}

TEST(ResultsSchema, ReopeningChangesNothing) {
  TempDir dir;
  const auto file = dir / "results.db";
  std::int64_t run_id = 0;
  {
    ResultsDb db = ResultsDb::open(file);
    run_id = db.record_run(test::sample_run());
  }
  for (int i = 0; i < 2; ++i) {
    ResultsDb db = ResultsDb::open(file);
    EXPECT_EQ(db.schema_version(), 2);
    EXPECT_EQ(db.list_runs().size(), 1u);
    EXPECT_TRUE(db.get_run(run_id).has_value());
  }
  sqlite::Connection raw = sqlite::Connection::open(file);
  EXPECT_EQ(raw.query_int("SELECT count(*) FROM schema_migrations", "test"), 2);
}

TEST(ResultsSchema, FailedMigrationLeavesTheFileAsItWas) {
  TempDir dir;
  const auto file = dir / "broken.db";
  sqlite::Connection raw = sqlite::Connection::open(file);
  const results_schema::Migration steps[] = {
      {1, "base", "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                  "applied_at TEXT NOT NULL) STRICT; CREATE TABLE a (x INTEGER) STRICT;"},
      {2, "typo", "CREATE TABLE b (x INTEGER"},
  };
  const std::string message = database_error([&] { results_schema::upgrade(raw, steps); });
  EXPECT_NE(message.find("apply migration 2 (typo) failed"), std::string::npos) << message;
  EXPECT_EQ(raw.query_int("PRAGMA user_version", "test"), 0);
  EXPECT_EQ(raw.query_int("SELECT count(*) FROM sqlite_schema", "test"), 0);  // table a rolled back too
}

TEST(ResultsSchema, RefusesANewerSchemaAndLeavesTheFileUntouched) {
  TempDir dir;
  const auto file = dir / "future.db";
  {
    ResultsDb db = ResultsDb::open(file);
    db.record_run(test::sample_run());
  }
  {
    sqlite::Connection raw = sqlite::Connection::open(file);
    raw.exec("PRAGMA user_version = 99", "setup");
  }
  const std::string before = test::read_bytes(file);
  const std::string message = database_error([&] { ResultsDb::open(file); });
  EXPECT_NE(message.find(file.string()), std::string::npos) << message;
  EXPECT_NE(message.find("version 99 is newer than this build understands (latest 2)"), std::string::npos)
      << message;
  EXPECT_EQ(test::read_bytes(file), before);
}

TEST(ResultsSchema, RefusesAFileThatIsNotADatabaseAndLeavesItUntouched) {
  TempDir dir;
  const auto file = dir / "notes.txt";
  std::string text;
  for (int i = 0; i < 200; ++i) text += "step_time,1534.25,ms\n";  // longer than a SQLite header
  test::write_bytes(file, text);
  try {
    ResultsDb::open(file);
    ADD_FAILURE() << "opened a text file as a database";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Database);
    EXPECT_EQ(e.where().file, file.string());
    EXPECT_NE(e.message().find("file is not a database"), std::string::npos) << e.what();
    EXPECT_NE(e.hint().find("not a SQLite database"), std::string::npos) << e.what();
  }
  EXPECT_EQ(test::read_bytes(file), text);
  EXPECT_EQ(directory_listing(dir.path()), std::vector<std::string>{"notes.txt"});  // no -wal, -shm, -journal
}

TEST(ResultsSchema, RefusesAnotherApplicationsDatabaseAndLeavesItUntouched) {
  TempDir dir;
  const auto file = dir / "other.db";
  {
    sqlite::Connection raw = sqlite::Connection::open(file);
    raw.exec("CREATE TABLE runs (id INTEGER PRIMARY KEY, what TEXT); INSERT INTO runs (what) VALUES ('x')", "setup");
  }
  const std::string before = test::read_bytes(file);
  const std::string message = database_error([&] { ResultsDb::open(file); });
  EXPECT_NE(message.find("not a Parallax results database"), std::string::npos) << message;
  EXPECT_EQ(test::read_bytes(file), before);
}

TEST(ResultsSchema, ReportsAMissingDirectoryWithThePath) {
  TempDir dir;
  const auto file = dir / "no-such-dir" / "results.db";
  const std::string message = database_error([&] { ResultsDb::open(file); });
  EXPECT_NE(message.find(file.string()), std::string::npos) << message;
  EXPECT_NE(message.find("unable to open database file"), std::string::npos) << message;
}

}  // namespace
}  // namespace px
