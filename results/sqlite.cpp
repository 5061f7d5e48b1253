// The checked SQLite handles: every return code is looked at, and each failure is reported with the
// database file, the purpose of the statement and SQLite's message, plus a hint for the usual causes.
#include "results/sqlite.hpp"

#include <sqlite3.h>

#include <algorithm>
#include <cassert>
#include <chrono>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "engine/core/error.hpp"

namespace px::sqlite {
namespace {

// Long enough for a writer to wait out another process's transaction (each is milliseconds);
// short enough that a stuck process is reported rather than waited on forever.
constexpr int kBusyTimeoutMs = 10'000;

std::string hint_for(int rc) {
  switch (rc & 0xff) {
    case SQLITE_NOTADB:
      return "the file is not a SQLite database; pass a results database or a path that does not exist yet";
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return "another process held the database longer than the busy timeout; retry";
    case SQLITE_CONSTRAINT:
      return "the values break a rule of the results schema (see results/README.md)";
    case SQLITE_CANTOPEN:
      return "check that the directory exists and is writable";
    case SQLITE_READONLY:
      return "the database file or its directory is read-only";
    case SQLITE_CORRUPT:
      return "the database file is damaged; restore it from a copy";
    case SQLITE_FULL:
      return "the disk is full";
    default:
      return {};
  }
}

[[noreturn]] void throw_error(sqlite3* db, const std::string& file, int rc, std::string_view purpose) {
  const char* message = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  throw Error(ErrorKind::Database, Location{file, 0, 0, -1},
              fmt::format("{} failed: {}", purpose, message), hint_for(rc));
}

}  // namespace

Connection Connection::open_named(const std::string& name, const std::string& file_for_errors) {
  sqlite3* db = nullptr;
  const int rc = sqlite3_open_v2(name.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr);
  if (rc != SQLITE_OK) {
    const std::string message = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close(db);
    throw Error(ErrorKind::Database, Location{file_for_errors, 0, 0, -1},
                fmt::format("open database failed: {}", message), hint_for(rc));
  }
  sqlite3_extended_result_codes(db, 1);
  sqlite3_busy_timeout(db, kBusyTimeoutMs);
  return Connection(db, file_for_errors);
}

Connection Connection::open(const std::filesystem::path& file) { return open_named(file.string(), file.string()); }

Connection Connection::open_memory() { return open_named(":memory:", ":memory:"); }

Connection::Connection(Connection&& other) noexcept
    : db_(std::exchange(other.db_, nullptr)), file_(std::move(other.file_)) {}

Connection& Connection::operator=(Connection&& other) noexcept {
  if (this != &other) {
    sqlite3_close_v2(db_);
    db_ = std::exchange(other.db_, nullptr);
    file_ = std::move(other.file_);
  }
  return *this;
}

// close_v2 defers the close until any statement still alive is finalized, so destruction order
// between a connection and its statements never matters.
Connection::~Connection() { sqlite3_close_v2(db_); }

void Connection::exec(std::string_view sql, std::string_view purpose) {
  const std::string text(sql);
  const int rc = sqlite3_exec(db_, text.c_str(), nullptr, nullptr, nullptr);
  if (rc != SQLITE_OK) fail(rc, purpose);
}

Statement Connection::prepare(std::string_view sql, std::string_view purpose) {
  sqlite3_stmt* stmt = nullptr;
  const char* tail = nullptr;
  const int rc = sqlite3_prepare_v2(db_, sql.data(), static_cast<int>(sql.size()), &stmt, &tail);
  if (rc != SQLITE_OK) fail(rc, purpose);
  assert(tail == sql.data() + sql.size() && "prepare() takes exactly one statement");
  return Statement(stmt, file_, std::string(purpose));
}

std::int64_t Connection::query_int(std::string_view sql, std::string_view purpose) {
  Statement stmt = prepare(sql, purpose);
  const bool has_row = stmt.step();
  assert(has_row && "query_int() expects a query that returns one row");
  (void)has_row;
  return stmt.column_int(0);
}

std::string Connection::enable_wal() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kBusyTimeoutMs);
  auto pause = std::chrono::milliseconds(1);
  for (;;) {
    sqlite3_stmt* stmt = nullptr;
    int rc = sqlite3_prepare_v2(db_, "PRAGMA journal_mode = WAL", -1, &stmt, nullptr);
    std::string mode;
    if (rc == SQLITE_OK) {
      rc = sqlite3_step(stmt);
      if (rc == SQLITE_ROW) {
        mode = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
        rc = SQLITE_OK;
      }
    }
    sqlite3_finalize(stmt);
    if (rc == SQLITE_OK) return mode;
    if ((rc & 0xff) != SQLITE_BUSY || std::chrono::steady_clock::now() >= deadline) {
      fail(rc, "switch to write-ahead logging");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(20));
  }
}

std::int64_t Connection::last_insert_rowid() const { return sqlite3_last_insert_rowid(db_); }

std::int64_t Connection::changes() const { return sqlite3_changes64(db_); }

void Connection::fail(int rc, std::string_view purpose) const { throw_error(db_, file_, rc, purpose); }

void Connection::rollback_quietly() noexcept { sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr); }

Statement::Statement(Statement&& other) noexcept
    : stmt_(std::exchange(other.stmt_, nullptr)),
      file_(std::move(other.file_)),
      purpose_(std::move(other.purpose_)) {}

Statement& Statement::operator=(Statement&& other) noexcept {
  if (this != &other) {
    sqlite3_finalize(stmt_);
    stmt_ = std::exchange(other.stmt_, nullptr);
    file_ = std::move(other.file_);
    purpose_ = std::move(other.purpose_);
  }
  return *this;
}

Statement::~Statement() { sqlite3_finalize(stmt_); }

void Statement::check_bind(int rc) const {
  if (rc != SQLITE_OK) throw_error(sqlite3_db_handle(stmt_), file_, rc, purpose_);
}

Statement& Statement::bind_int(int index, std::int64_t value) {
  check_bind(sqlite3_bind_int64(stmt_, index, value));
  return *this;
}

Statement& Statement::bind_real(int index, double value) {
  check_bind(sqlite3_bind_double(stmt_, index, value));
  return *this;
}

Statement& Statement::bind_text(int index, std::string_view value) {
  check_bind(sqlite3_bind_text64(stmt_, index, value.data(), value.size(), SQLITE_TRANSIENT, SQLITE_UTF8));
  return *this;
}

Statement& Statement::bind_null(int index) {
  check_bind(sqlite3_bind_null(stmt_, index));
  return *this;
}

Statement& Statement::bind_text_or_null(int index, std::string_view value) {
  return value.empty() ? bind_null(index) : bind_text(index, value);
}

bool Statement::step() {
  const int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  throw_error(sqlite3_db_handle(stmt_), file_, rc, purpose_);
}

void Statement::run() {
  while (step()) {
  }
}

void Statement::reset() {
  // The step that failed already threw; reset only repeats that code, so it is not checked again.
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
}

bool Statement::column_is_null(int index) const { return sqlite3_column_type(stmt_, index) == SQLITE_NULL; }

std::int64_t Statement::column_int(int index) const { return sqlite3_column_int64(stmt_, index); }

double Statement::column_real(int index) const { return sqlite3_column_double(stmt_, index); }

std::string Statement::column_text(int index) const {
  const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, index));
  if (text == nullptr) return {};
  return std::string(text, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, index)));
}

WriteTransaction::WriteTransaction(Connection& db, std::string_view purpose) : db_(db), purpose_(purpose) {
  db_.exec("BEGIN IMMEDIATE", fmt::format("begin transaction to {}", purpose_));
}

WriteTransaction::~WriteTransaction() {
  if (open_) db_.rollback_quietly();
}

void WriteTransaction::commit() {
  db_.exec("COMMIT", fmt::format("commit transaction to {}", purpose_));
  open_ = false;
}

}  // namespace px::sqlite
