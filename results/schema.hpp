// The results schema as an ordered list of migrations, and the code that brings a database file up to
// the latest one. A released migration is never edited: a schema change is a new migration appended
// at the end (results/README.md).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "results/sqlite.hpp"

namespace px::results_schema {

struct Migration {
  int version;            // 1, 2, 3, ... in order, no gaps
  std::string_view name;  // recorded in schema_migrations
  std::string_view sql;   // one or more statements, run inside the upgrade transaction
};

// Stored in the database header (PRAGMA application_id) so a Parallax file is told apart from any
// other SQLite database: "PRLX".
inline constexpr std::int64_t kApplicationId = 0x50524c58;

std::span<const Migration> migrations();
int latest_version(std::span<const Migration> steps = migrations());

// Reads the header of an open database and refuses, without writing anything, a file that is not a
// SQLite database, a SQLite database that is not a Parallax one, or a schema newer than `steps`.
// Returns the database's current version.
int check_compatible(sqlite::Connection& db, std::span<const Migration> steps = migrations());

// Applies every migration newer than the database's version, all in one write transaction: the file
// ends at the latest version or, on any failure, exactly as it was. Safe when several processes open
// the same new file at once: the version is read again under the write lock.
void upgrade(sqlite::Connection& db, std::span<const Migration> steps = migrations());

}  // namespace px::results_schema
