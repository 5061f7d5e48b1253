// Owning handles over the SQLite C API: a connection, a prepared statement and a write transaction.
// Every call is checked; a failure becomes px::Error(Database) naming the database file, what the
// statement was for, and SQLite's own message. Not a query layer: callers write plain SQL.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

struct sqlite3;
struct sqlite3_stmt;

namespace px::sqlite {

class Statement;

class Connection {
 public:
  // Opens (creating if absent) a database file. Nothing is read or written yet, so a file that is
  // not a database is only detected by the first query.
  static Connection open(const std::filesystem::path& file);
  static Connection open_memory();

  Connection(Connection&& other) noexcept;
  Connection& operator=(Connection&& other) noexcept;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection();

  // Runs one or more statements without parameters (schema text, pragmas, BEGIN/COMMIT).
  void exec(std::string_view sql, std::string_view purpose);
  Statement prepare(std::string_view sql, std::string_view purpose);

  // Reads the integer result of a one-row query such as "PRAGMA user_version".
  std::int64_t query_int(std::string_view sql, std::string_view purpose);

  // Switches the file to write-ahead logging and returns the journal mode now in force ("wal", or
  // "memory" for an in-memory database). Retried while another process holds the file, because
  // SQLite answers a contended mode change with SQLITE_BUSY at once instead of waiting.
  std::string enable_wal();

  std::int64_t last_insert_rowid() const;
  std::int64_t changes() const;
  const std::string& file() const { return file_; }

  // Throws the Database error for a failed call, with SQLite's current message for this handle.
  [[noreturn]] void fail(int rc, std::string_view purpose) const;

 private:
  friend class WriteTransaction;
  Connection(sqlite3* db, std::string file) : db_(db), file_(std::move(file)) {}
  static Connection open_named(const std::string& name, const std::string& file_for_errors);
  void rollback_quietly() noexcept;
  sqlite3* db_ = nullptr;
  std::string file_;
};

// A prepared statement. Parameters are 1-based as in SQLite; bind_* return *this so a statement
// can be set up in one expression.
class Statement {
 public:
  Statement(Statement&& other) noexcept;
  Statement& operator=(Statement&& other) noexcept;
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  ~Statement();

  Statement& bind_int(int index, std::int64_t value);
  Statement& bind_real(int index, double value);
  Statement& bind_text(int index, std::string_view value);
  Statement& bind_null(int index);
  // Binds NULL for an empty string: optional text columns are NULL, never ''.
  Statement& bind_text_or_null(int index, std::string_view value);

  // Advances to the next row; false when the statement is done.
  bool step();
  // Runs a statement that returns no rows (or whose rows are not wanted) to completion.
  void run();
  // Clears the bindings and rewinds, so the statement can be run again with new parameters.
  void reset();

  bool column_is_null(int index) const;
  std::int64_t column_int(int index) const;
  double column_real(int index) const;
  std::string column_text(int index) const;  // "" for NULL

 private:
  friend class Connection;
  Statement(sqlite3_stmt* stmt, std::string file, std::string purpose)
      : stmt_(stmt), file_(std::move(file)), purpose_(std::move(purpose)) {}
  void check_bind(int rc) const;
  sqlite3_stmt* stmt_ = nullptr;
  std::string file_;  // copied, not borrowed, so a statement never points into a moved connection
  std::string purpose_;
};

// BEGIN IMMEDIATE ... COMMIT, rolled back if destroyed uncommitted. IMMEDIATE takes the write lock
// up front, so concurrent writers wait in the busy handler instead of failing with SQLITE_BUSY
// when a read transaction tries to become a write transaction.
class WriteTransaction {
 public:
  WriteTransaction(Connection& db, std::string_view purpose);
  WriteTransaction(const WriteTransaction&) = delete;
  WriteTransaction& operator=(const WriteTransaction&) = delete;
  ~WriteTransaction();
  void commit();

 private:
  Connection& db_;
  std::string purpose_;
  bool open_ = true;
};

}  // namespace px::sqlite
