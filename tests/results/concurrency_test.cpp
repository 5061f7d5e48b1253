// Several writers on one file: four processes (and, separately, four threads with their own
// connections) each record 50 runs into the same new database; every run must arrive, none may fail
// with "database is locked".
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "engine/core/error.hpp"
#include "results/results_db.hpp"
#include "results/sqlite.hpp"
#include "tests/results/test_support.hpp"

namespace px {
namespace {

constexpr int kWriters = 4;
constexpr int kRunsEach = 50;

// One writer's work: open the (possibly not yet created) file and record its runs one by one.
void write_runs(const std::filesystem::path& file, int writer) {
  ResultsDb db = ResultsDb::open(file);
  for (int i = 0; i < kRunsEach; ++i) {
    RunRecord run = test::sample_run("writer-" + std::to_string(writer));
    run.metrics.push_back({"iteration", static_cast<double>(i), ""});
    db.record_run(run);
  }
}

void expect_all_runs(const std::filesystem::path& file) {
  ResultsDb db = ResultsDb::open(file);
  EXPECT_EQ(db.list_runs().size(), static_cast<std::size_t>(kWriters * kRunsEach));
  for (int w = 0; w < kWriters; ++w) {
    EXPECT_EQ(db.list_runs({.experiment = "writer-" + std::to_string(w)}).size(),
              static_cast<std::size_t>(kRunsEach));
  }
  sqlite::Connection raw = sqlite::Connection::open(file);
  sqlite::Statement mode = raw.prepare("PRAGMA journal_mode", "read journal mode");
  ASSERT_TRUE(mode.step());
  EXPECT_EQ(mode.column_text(0), "wal");
  EXPECT_EQ(raw.query_int("SELECT count(*) FROM metrics", "count metrics"), kWriters * kRunsEach * 4);
  EXPECT_EQ(raw.query_int("SELECT count(*) FROM schema_migrations", "count migrations"), 2);
}

TEST(ResultsConcurrency, FourProcessesWriteOneNewFile) {
  test::TempDir dir;
  const auto file = dir / "shared.db";
  std::vector<pid_t> children;
  for (int w = 0; w < kWriters; ++w) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0) << "fork failed";
    if (pid == 0) {
      int code = 0;
      try {
        write_runs(file, w);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "writer %d: %s\n", w, e.what());
        code = 1;
      }
      std::fflush(stderr);
      _exit(code);  // no gtest teardown or static destructors in the child
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "a writer process failed (see stderr)";
  }
  expect_all_runs(file);
}

TEST(ResultsConcurrency, FourThreadsWithTheirOwnConnections) {
  test::TempDir dir;
  const auto file = dir / "threads.db";
  std::vector<std::string> errors(kWriters);
  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      try {
        write_runs(file, w);
      } catch (const std::exception& e) {
        errors[w] = e.what();
      }
    });
  }
  // A reader beside the writers: WAL lets it list runs while they commit.
  std::size_t seen = 0;
  std::string reader_error;
  try {
    ResultsDb reader = ResultsDb::open(file);
    for (int i = 0; i < 20; ++i) seen = std::max(seen, reader.list_runs().size());
  } catch (const std::exception& e) {
    reader_error = e.what();
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors) EXPECT_EQ(e, "");
  EXPECT_EQ(reader_error, "");
  EXPECT_LE(seen, static_cast<std::size_t>(kWriters * kRunsEach));
  expect_all_runs(file);
}

}  // namespace
}  // namespace px
