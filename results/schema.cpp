// The migrations of the results database and the upgrade procedure. Tables are STRICT so a value of
// the wrong type is an error rather than silently stored; enums and the failed-run rules are CHECKs,
// so the file stays consistent whichever program writes to it.
#include "results/schema.hpp"

#include <array>
#include <cassert>

#include <fmt/format.h>

#include "engine/core/error.hpp"

namespace px::results_schema {
namespace {

// Timestamps are UTC ISO 8601 text with milliseconds, e.g. 2024-05-01T12:00:00.123Z: readable in
// the sqlite3 shell, sortable as text, and understood by SQLite's date functions.
constexpr std::string_view kInitialSchema = R"sql(
CREATE TABLE schema_migrations (
  version    INTEGER PRIMARY KEY,
  name       TEXT NOT NULL,
  applied_at TEXT NOT NULL
) STRICT;

CREATE TABLE experiments (
  id          INTEGER PRIMARY KEY,
  name        TEXT NOT NULL UNIQUE CHECK (length(name) > 0),
  description TEXT NOT NULL DEFAULT '',
  created_at  TEXT NOT NULL CHECK (julianday(created_at) IS NOT NULL)
) STRICT;

CREATE TABLE runs (
  id             INTEGER PRIMARY KEY,
  experiment_id  INTEGER NOT NULL REFERENCES experiments (id) ON DELETE RESTRICT,
  kind           TEXT NOT NULL CHECK (kind IN ('measured', 'simulated', 'analytical', 'baseline')),
  status         TEXT NOT NULL CHECK (status IN ('running', 'ok', 'failed')),
  failure_reason TEXT CHECK (failure_reason IS NULL OR length(failure_reason) > 0),
  model          TEXT NOT NULL,
  cluster        TEXT NOT NULL,
  plan_json      TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(plan_json)),
  model_json     TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(model_json)),
  cluster_json   TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(cluster_json)),
  software_json  TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(software_json)),
  hardware_json  TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(hardware_json)),
  started_at     TEXT NOT NULL CHECK (julianday(started_at) IS NOT NULL),
  finished_at    TEXT CHECK (finished_at IS NULL OR julianday(finished_at) >= julianday(started_at)),
  CHECK ((status = 'failed') = (failure_reason IS NOT NULL)),
  CHECK ((status = 'running') = (finished_at IS NULL))
) STRICT;

CREATE TABLE metrics (
  id     INTEGER PRIMARY KEY,
  run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
  name   TEXT NOT NULL CHECK (length(name) > 0),
  value  REAL NOT NULL,
  unit   TEXT NOT NULL DEFAULT '',
  UNIQUE (run_id, name)
) STRICT;

-- A failed run keeps its root cause, never numbers that look like a result.
CREATE TRIGGER metrics_only_for_live_runs
BEFORE INSERT ON metrics
WHEN (SELECT status FROM runs WHERE id = NEW.run_id) = 'failed'
BEGIN
  SELECT RAISE(ABORT, 'a failed run has no metrics');
END;

-- One row per executed (or replayed) op; the same op id may repeat across iterations.
CREATE TABLE op_samples (
  id       INTEGER PRIMARY KEY,
  run_id   INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
  rank     INTEGER NOT NULL CHECK (rank >= 0),
  op_id    INTEGER NOT NULL,
  op_name  TEXT NOT NULL,
  kind     TEXT NOT NULL,
  stream   INTEGER NOT NULL,
  start_us REAL NOT NULL,
  end_us   REAL NOT NULL CHECK (end_us >= start_us),
  bytes    INTEGER NOT NULL DEFAULT 0 CHECK (bytes >= 0),
  flops    REAL NOT NULL DEFAULT 0 CHECK (flops >= 0)
) STRICT;

CREATE TABLE baselines (
  id        INTEGER PRIMARY KEY,
  source    TEXT NOT NULL CHECK (length(source) > 0),
  benchmark TEXT NOT NULL,
  model     TEXT NOT NULL,
  system    TEXT NOT NULL,
  metric    TEXT NOT NULL CHECK (length(metric) > 0),
  value     REAL NOT NULL,
  unit      TEXT NOT NULL DEFAULT '',
  notes     TEXT NOT NULL DEFAULT '',
  UNIQUE (source, benchmark, model, system, metric)
) STRICT;
)sql";

// The lookups the library and the GUI make: runs of an experiment or a model, a run's ops by rank
// (the op-by-op join of a simulated and a measured run), baselines of a model.
constexpr std::string_view kQueryIndices = R"sql(
CREATE INDEX runs_by_experiment ON runs (experiment_id, id);
CREATE INDEX runs_by_model_cluster ON runs (model, cluster);
CREATE INDEX runs_by_status ON runs (status);
CREATE INDEX metrics_by_name ON metrics (name, run_id);
CREATE INDEX op_samples_by_run_rank_op ON op_samples (run_id, rank, op_id);
CREATE INDEX baselines_by_model ON baselines (model, metric);
)sql";

constexpr std::array kMigrations{
    Migration{1, "initial schema", kInitialSchema},
    Migration{2, "query indices", kQueryIndices},
};

struct Header {
  std::int64_t application_id = 0;
  std::int64_t version = 0;
  std::int64_t objects = 0;
};

// The first read of the file: a file that is not a database fails here, before anything is written.
// One statement, hence one snapshot: separate reads could straddle another process's upgrade.
Header read_header(sqlite::Connection& db) {
  sqlite::Statement stmt = db.prepare(
      "SELECT (SELECT count(*) FROM sqlite_schema), a.application_id, v.user_version "
      "FROM pragma_application_id AS a, pragma_user_version AS v",
      "read the database header");
  [[maybe_unused]] const bool has_row = stmt.step();
  assert(has_row && "the pragma functions always return one row");
  return Header{stmt.column_int(1), stmt.column_int(2), stmt.column_int(0)};
}

void require_compatible(const sqlite::Connection& db, const Header& h, int latest) {
  const bool empty = h.application_id == 0 && h.version == 0 && h.objects == 0;
  if (h.application_id != kApplicationId && !empty) {
    throw Error(ErrorKind::Database, Location{db.file(), 0, 0, -1},
                fmt::format("a SQLite database, but not a Parallax results database (application_id {:#x}, "
                            "user_version {}, {} schema objects)",
                            h.application_id, h.version, h.objects),
                "pass a results database or a path that does not exist yet; the file was not changed");
  }
  if (h.version > latest) {
    throw Error(ErrorKind::Database, Location{db.file(), 0, 0, -1},
                fmt::format("results schema version {} is newer than this build understands (latest {})",
                            h.version, latest),
                "open it with a newer Parallax build; the file was not changed");
  }
}

}  // namespace

std::span<const Migration> migrations() { return kMigrations; }

int latest_version(std::span<const Migration> steps) { return steps.empty() ? 0 : steps.back().version; }

int check_compatible(sqlite::Connection& db, std::span<const Migration> steps) {
  const Header h = read_header(db);
  require_compatible(db, h, latest_version(steps));
  return static_cast<int>(h.version);
}

void upgrade(sqlite::Connection& db, std::span<const Migration> steps) {
  const int latest = latest_version(steps);
  sqlite::WriteTransaction tx(db, "upgrade the results schema");
  const Header h = read_header(db);
  require_compatible(db, h, latest);
  if (h.version == latest) return;  // another process upgraded it while this one waited for the lock

  for (const Migration& m : steps) {
    assert(m.version == static_cast<int>(&m - steps.data()) + 1 && "migrations are numbered 1, 2, 3, ...");
    if (m.version <= h.version) continue;
    db.exec(m.sql, fmt::format("apply migration {} ({})", m.version, m.name));
    db.prepare("INSERT INTO schema_migrations (version, name, applied_at) "
               "VALUES (?1, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
               "record an applied migration")
        .bind_int(1, m.version)
        .bind_text(2, m.name)
        .run();
  }
  // PRAGMA takes no bound parameters; both values are constants of this program, not input.
  db.exec(fmt::format("PRAGMA user_version = {}; PRAGMA application_id = {}", latest, kApplicationId),
          "store the schema version");
  tx.commit();
}

}  // namespace px::results_schema
