// Building a run table from the database and rendering it as CSV, JSON or LaTeX. The SQL stays in
// ResultsDb; this file only arranges what it returns.
#include "results/export.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engine/core/error.hpp"

namespace px {
namespace {

// Shortest text that reads back as the same double ("0.1", "1e+21").
std::string full_precision(const TableCell& cell) {
  if (const auto* i = std::get_if<std::int64_t>(&cell)) return fmt::format("{}", *i);
  if (const auto* d = std::get_if<double>(&cell)) return fmt::format("{}", *d);
  if (const auto* s = std::get_if<std::string>(&cell)) return *s;
  return {};
}

std::string csv_field(const std::string& text) {
  if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
  std::string out = "\"";
  for (char c : text) {
    if (c == '"') out += '"';
    out += c;
  }
  out += '"';
  return out;
}

nlohmann::ordered_json json_value(const TableCell& cell) {
  if (const auto* i = std::get_if<std::int64_t>(&cell)) return *i;
  if (const auto* d = std::get_if<double>(&cell)) return *d;
  if (const auto* s = std::get_if<std::string>(&cell)) return *s;
  return nullptr;
}

std::string latex_cell(const TableCell& cell, int precision) {
  if (const auto* i = std::get_if<std::int64_t>(&cell)) return fmt::format("{}", *i);
  if (const auto* d = std::get_if<double>(&cell)) return fmt::format("{:.{}f}", *d, precision);
  if (const auto* s = std::get_if<std::string>(&cell)) return latex_escape(*s);
  return "--";
}

[[noreturn]] void io_error(const std::filesystem::path& file, std::string_view what, int err) {
  throw Error(ErrorKind::Io, Location{file.string(), 0, 0, -1},
              fmt::format("{}: {}", what, std::strerror(err)), "check that the directory exists and is writable");
}

}  // namespace

RunTable make_run_table(ResultsDb& db, const RunFilter& filter, const std::vector<std::string>& metric_names) {
  RunTable table;
  for (const char* name : {"run_id", "experiment", "kind", "status", "model", "cluster"}) {
    table.columns.push_back(TableColumn{name, {}});
  }
  const std::size_t fixed = table.columns.size();
  for (const std::string& name : metric_names) table.columns.push_back(TableColumn{name, {}});
  std::vector<std::int64_t> unit_source(metric_names.size(), 0);  // run that set each column's unit

  for (const RunSummary& run : db.list_runs(filter)) {
    std::vector<TableCell>& row = table.rows.emplace_back();
    row = {run.id, run.experiment, std::string(to_string(run.kind)), std::string(to_string(run.status)),
           run.model, run.cluster};
    row.resize(table.columns.size());
    std::map<std::string, Metric, std::less<>> by_name;
    for (Metric& m : db.metrics(run.id)) by_name.emplace(m.name, std::move(m));
    for (std::size_t i = 0; i < metric_names.size(); ++i) {
      const auto found = by_name.find(metric_names[i]);
      if (found == by_name.end()) continue;
      row[fixed + i] = found->second.value;
      TableColumn& column = table.columns[fixed + i];
      if (unit_source[i] == 0) {
        column.unit = found->second.unit;
        unit_source[i] = run.id;
      } else if (column.unit != found->second.unit) {
        throw Error(ErrorKind::Database, Location{db.file(), 0, 0, -1},
                    fmt::format("metric '{}' is in '{}' in run {} but in '{}' in run {}", column.name,
                                column.unit, unit_source[i], found->second.unit, run.id),
                    "export these runs separately, or record the metric in one unit");
      }
    }
  }
  return table;
}

std::string to_csv(const RunTable& table) {
  std::string out;
  for (std::size_t i = 0; i < table.columns.size(); ++i) {
    if (i > 0) out += ',';
    out += csv_field(table.columns[i].name);
  }
  out += "\r\n";
  for (const auto& row : table.rows) {
    for (std::size_t i = 0; i < row.size(); ++i) {
      if (i > 0) out += ',';
      out += csv_field(full_precision(row[i]));
    }
    out += "\r\n";
  }
  return out;
}

std::string to_json(const RunTable& table) {
  nlohmann::ordered_json doc;
  doc["columns"] = nlohmann::ordered_json::array();
  for (const TableColumn& c : table.columns) doc["columns"].push_back({{"name", c.name}, {"unit", c.unit}});
  doc["rows"] = nlohmann::ordered_json::array();
  for (const auto& row : table.rows) {
    nlohmann::ordered_json object = nlohmann::ordered_json::object();
    for (std::size_t i = 0; i < row.size(); ++i) object[table.columns[i].name] = json_value(row[i]);
    doc["rows"].push_back(std::move(object));
  }
  return doc.dump(2) + "\n";
}

std::string latex_escape(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&': out += "\\&"; break;
      case '%': out += "\\%"; break;
      case '$': out += "\\$"; break;
      case '#': out += "\\#"; break;
      case '_': out += "\\_"; break;
      case '{': out += "\\{"; break;
      case '}': out += "\\}"; break;
      case '~': out += "\\textasciitilde{}"; break;
      case '^': out += "\\textasciicircum{}"; break;
      case '\\': out += "\\textbackslash{}"; break;
      case '\r':
      case '\n': out += ' '; break;  // a blank line inside a tabular cell would end the paragraph
      default: out += c;
    }
  }
  return out;
}

std::string to_latex(const RunTable& table, int precision) {
  std::string spec;
  for (std::size_t i = 0; i < table.columns.size(); ++i) {
    const bool text = std::any_of(table.rows.begin(), table.rows.end(),
                                  [&](const auto& row) { return std::holds_alternative<std::string>(row[i]); });
    spec += text ? 'l' : 'r';  // numbers (and columns with no value at all) align on the right
  }
  std::string out = fmt::format("\\begin{{tabular}}{{{}}}\n\\toprule\n", spec);
  for (std::size_t i = 0; i < table.columns.size(); ++i) {
    const TableColumn& c = table.columns[i];
    if (i > 0) out += " & ";
    out += latex_escape(c.unit.empty() ? c.name : fmt::format("{} ({})", c.name, c.unit));
  }
  out += " \\\\\n\\midrule\n";
  for (const auto& row : table.rows) {
    for (std::size_t i = 0; i < row.size(); ++i) {
      if (i > 0) out += " & ";
      out += latex_cell(row[i], precision);
    }
    out += " \\\\\n";
  }
  out += "\\bottomrule\n\\end{tabular}\n";
  return out;
}

std::optional<ExportFormat> parse_export_format(std::string_view name) {
  if (name == "csv") return ExportFormat::Csv;
  if (name == "json") return ExportFormat::Json;
  if (name == "latex" || name == "tex") return ExportFormat::Latex;
  return std::nullopt;
}

std::string render(const RunTable& table, ExportFormat format, int latex_precision) {
  switch (format) {
    case ExportFormat::Csv: return to_csv(table);
    case ExportFormat::Json: return to_json(table);
    case ExportFormat::Latex: return to_latex(table, latex_precision);
  }
  return {};
}

void write_file_atomically(const std::filesystem::path& file, std::string_view content) {
  static std::atomic<unsigned> counter{0};
  const std::filesystem::path dir = file.has_parent_path() ? file.parent_path() : std::filesystem::path(".");
  // Same directory, hence same file system, so the final rename is atomic.
  const std::filesystem::path temp =
      dir / fmt::format(".{}.{}.{}.tmp", file.filename().string(), getpid(), counter++);
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) io_error(file, fmt::format("cannot create temporary file {}", temp.string()), errno);

  auto give_up = [&](std::string_view what) {
    const int err = errno;
    ::close(fd);
    ::unlink(temp.c_str());
    io_error(file, what, err);
  };
  std::size_t written = 0;
  while (written < content.size()) {
    const ssize_t n = ::write(fd, content.data() + written, content.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) give_up("cannot write");
    written += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) give_up("cannot flush to disk");
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(temp.c_str());
    io_error(file, "cannot close", err);
  }
  if (::rename(temp.c_str(), file.c_str()) != 0) {
    const int err = errno;
    ::unlink(temp.c_str());
    io_error(file, "cannot replace", err);
  }
}

void export_run_table(const RunTable& table, ExportFormat format, const std::filesystem::path& file,
                      int latex_precision) {
  write_file_atomically(file, render(table, format, latex_precision));
}

}  // namespace px
