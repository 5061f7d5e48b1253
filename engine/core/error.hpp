// Typed errors for bad input: every error names where it happened (file, line, column or byte offset)
// and carries a hint. Bugs are asserts; only main() turns an Error into an exit code.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace px {

enum class ErrorKind {
  Io,          // a file could not be read or written
  Parse,       // malformed YAML/JSON/trace syntax
  Spec,        // a spec field is missing, has the wrong type or an impossible value
  Plan,        // a parallel plan breaks a divisibility or compatibility rule
  Database,    // SQLite refused an operation
  NotFound,    // a named model/cluster/plan does not exist
  Usage,       // command-line misuse not caught by the CLI parser
};

const char* to_string(ErrorKind kind);

// Where in an input the problem is. line/column are 1-based; 0 means unknown.
struct Location {
  std::string file;
  int line = 0;
  int column = 0;
  std::int64_t byte_offset = -1;
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, Location where, std::string message, std::string hint = {});

  ErrorKind kind() const { return kind_; }
  const Location& where() const { return where_; }
  const std::string& message() const { return message_; }
  const std::string& hint() const { return hint_; }

 private:
  ErrorKind kind_;
  Location where_;
  std::string message_;
  std::string hint_;
};

// Formats "file:line:col: kind error: message (hint: ...)" on one line.
std::string format_error(ErrorKind kind, const Location& where, const std::string& message,
                         const std::string& hint);

}  // namespace px
