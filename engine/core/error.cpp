// One-line rendering of input errors so every front end reports them the same way.
#include "engine/core/error.hpp"

#include <fmt/format.h>

namespace px {

const char* to_string(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::Io: return "io";
    case ErrorKind::Parse: return "parse";
    case ErrorKind::Spec: return "spec";
    case ErrorKind::Plan: return "plan";
    case ErrorKind::Database: return "database";
    case ErrorKind::NotFound: return "not-found";
    case ErrorKind::Usage: return "usage";
  }
  return "unknown";
}

std::string format_error(ErrorKind kind, const Location& where, const std::string& message,
                         const std::string& hint) {
  std::string out;
  if (!where.file.empty()) {
    out += where.file;
    if (where.line > 0) {
      out += fmt::format(":{}", where.line);
      if (where.column > 0) out += fmt::format(":{}", where.column);
    } else if (where.byte_offset >= 0) {
      out += fmt::format(":@{}", where.byte_offset);
    }
    out += ": ";
  }
  out += fmt::format("{} error: {}", to_string(kind), message);
  if (!hint.empty()) out += fmt::format(" (hint: {})", hint);
  return out;
}

Error::Error(ErrorKind kind, Location where, std::string message, std::string hint)
    : std::runtime_error(format_error(kind, where, message, hint)),
      kind_(kind),
      where_(std::move(where)),
      message_(std::move(message)),
      hint_(std::move(hint)) {}

}  // namespace px
