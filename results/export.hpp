// Run tables out of the results database: one row per run, chosen metrics as columns, rendered as
// CSV (RFC 4180), JSON or a LaTeX booktabs tabular, and written so an existing file is replaced whole
// or not at all.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "results/results_db.hpp"

namespace px {

// An absent value (a metric the run does not have) is std::monostate.
using TableCell = std::variant<std::monostate, std::int64_t, double, std::string>;

struct TableColumn {
  std::string name{};
  std::string unit{};  // empty for the descriptive columns
};

struct RunTable {
  std::vector<TableColumn> columns{};
  std::vector<std::vector<TableCell>> rows{};  // each row has one cell per column
};

// Columns run_id, experiment, kind, status, model, cluster, then one per metric name in the order
// given; rows are the runs `filter` selects, oldest first. A metric whose unit differs between two
// runs is an error, since one column cannot hold both.
RunTable make_run_table(ResultsDb& db, const RunFilter& filter, const std::vector<std::string>& metric_names);

// A header line and one line per row, CRLF-terminated; fields holding a comma, quote, CR or LF are
// quoted with inner quotes doubled; absent values are empty fields; numbers keep full precision.
std::string to_csv(const RunTable& table);

// {"columns": [{"name", "unit"}...], "rows": [{column: value or null}...]}, keys in column order.
std::string to_json(const RunTable& table);

// A booktabs tabular (\toprule, \midrule, \bottomrule); text columns left-aligned, numeric ones
// right-aligned with `precision` digits after the point; LaTeX specials escaped; absent values "--".
std::string to_latex(const RunTable& table, int precision = 2);
std::string latex_escape(std::string_view text);

enum class ExportFormat { Csv, Json, Latex };
// "csv", "json", "latex" or "tex".
std::optional<ExportFormat> parse_export_format(std::string_view name);
std::string render(const RunTable& table, ExportFormat format, int latex_precision = 2);

// Writes `content` to a new file beside `file`, flushes it to disk and renames it over `file`, so
// readers see the old file or the new one, never a partial one. Failure is px::Error(Io).
void write_file_atomically(const std::filesystem::path& file, std::string_view content);

void export_run_table(const RunTable& table, ExportFormat format, const std::filesystem::path& file,
                      int latex_precision = 2);

}  // namespace px
