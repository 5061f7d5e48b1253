// Exports: golden CSV, JSON and LaTeX for runs whose names hold commas, quotes, newlines,
// underscores, percent signs and other LaTeX specials; atomic replacement of the output file.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "engine/core/error.hpp"
#include "results/export.hpp"
#include "results/results_db.hpp"
#include "tests/results/test_support.hpp"

namespace px {
namespace {

RunRecord tricky_run(std::string experiment, RunKind kind, std::string model, std::string cluster,
                     std::vector<Metric> metrics) {
  RunRecord r;
  r.experiment = std::move(experiment);
  r.kind = kind;
  r.model = std::move(model);
  r.cluster = std::move(cluster);
  r.started_at = "2024-05-01T12:00:00.000Z";
  r.finished_at = "2024-05-01T12:00:01.000Z";
  r.metrics = std::move(metrics);
  return r;
}

// Three runs: one with every metric, one missing "mfu", one failed (no metrics at all).
RunTable tricky_table(ResultsDb& db) {
  db.record_run(tricky_run("sweep, \"big\"\nbatch_1", RunKind::Simulated, "gpt3_175b", "dgx-h100 100%",
                           {{"step_time", 1534.2571, "ms"}, {"mfu", 45.5, "%"}, {"extra", 1.0, ""}}));
  db.record_run(tricky_run("plain", RunKind::Measured, "llama{2}~70b^", "a&b $5 #1 \\path",
                           {{"step_time", 812.5, "ms"}}));
  RunRecord failed = tricky_run("plain", RunKind::Measured, "m", "c", {});
  failed.status = RunStatus::Failed;
  failed.failure_reason = "out of memory";
  db.record_run(failed);
  return make_run_table(db, {}, {"step_time", "mfu", "missing_metric"});
}

TEST(ResultsExport, TableHasFixedColumnsThenMetrics) {
  ResultsDb db = ResultsDb::open_memory();
  const RunTable table = tricky_table(db);
  ASSERT_EQ(table.columns.size(), 9u);
  EXPECT_EQ(table.columns[6].name, "step_time");
  EXPECT_EQ(table.columns[6].unit, "ms");
  EXPECT_EQ(table.columns[7].unit, "%");
  EXPECT_EQ(table.columns[8].unit, "");
  ASSERT_EQ(table.rows.size(), 3u);
  EXPECT_EQ(std::get<double>(table.rows[0][6]), 1534.2571);
  EXPECT_TRUE(std::holds_alternative<std::monostate>(table.rows[1][7]));
  EXPECT_EQ(std::get<std::string>(table.rows[2][3]), "failed");
}

TEST(ResultsExport, CsvGolden) {
  ResultsDb db = ResultsDb::open_memory();
  const std::string expected =
      "run_id,experiment,kind,status,model,cluster,step_time,mfu,missing_metric\r\n"
      "1,\"sweep, \"\"big\"\"\nbatch_1\",simulated,ok,gpt3_175b,dgx-h100 100%,1534.2571,45.5,\r\n"
      "2,plain,measured,ok,llama{2}~70b^,a&b $5 #1 \\path,812.5,,\r\n"
      "3,plain,measured,failed,m,c,,,\r\n";
  EXPECT_EQ(to_csv(tricky_table(db)), expected);
}

TEST(ResultsExport, JsonGolden) {
  ResultsDb db = ResultsDb::open_memory();
  RunTable table = tricky_table(db);
  table.rows.resize(2);  // the golden text stays readable with two rows
  const std::string expected = R"({
  "columns": [
    {
      "name": "run_id",
      "unit": ""
    },
    {
      "name": "experiment",
      "unit": ""
    },
    {
      "name": "kind",
      "unit": ""
    },
    {
      "name": "status",
      "unit": ""
    },
    {
      "name": "model",
      "unit": ""
    },
    {
      "name": "cluster",
      "unit": ""
    },
    {
      "name": "step_time",
      "unit": "ms"
    },
    {
      "name": "mfu",
      "unit": "%"
    },
    {
      "name": "missing_metric",
      "unit": ""
    }
  ],
  "rows": [
    {
      "run_id": 1,
      "experiment": "sweep, \"big\"\nbatch_1",
      "kind": "simulated",
      "status": "ok",
      "model": "gpt3_175b",
      "cluster": "dgx-h100 100%",
      "step_time": 1534.2571,
      "mfu": 45.5,
      "missing_metric": null
    },
    {
      "run_id": 2,
      "experiment": "plain",
      "kind": "measured",
      "status": "ok",
      "model": "llama{2}~70b^",
      "cluster": "a&b $5 #1 \\path",
      "step_time": 812.5,
      "mfu": null,
      "missing_metric": null
    }
  ]
}
)";
  EXPECT_EQ(to_json(table), expected);
}

TEST(ResultsExport, LatexGolden) {
  ResultsDb db = ResultsDb::open_memory();
  const std::string expected =
      "\\begin{tabular}{rlllllrrr}\n"
      "\\toprule\n"
      "run\\_id & experiment & kind & status & model & cluster & step\\_time (ms) & mfu (\\%) & missing\\_metric \\\\\n"
      "\\midrule\n"
      "1 & sweep, \"big\" batch\\_1 & simulated & ok & gpt3\\_175b & dgx-h100 100\\% & 1534.26 & 45.50 & -- \\\\\n"
      "2 & plain & measured & ok & llama\\{2\\}\\textasciitilde{}70b\\textasciicircum{} & "
      "a\\&b \\$5 \\#1 \\textbackslash{}path & 812.50 & -- & -- \\\\\n"
      "3 & plain & measured & failed & m & c & -- & -- & -- \\\\\n"
      "\\bottomrule\n"
      "\\end{tabular}\n";
  EXPECT_EQ(to_latex(tricky_table(db), 2), expected);
}

TEST(ResultsExport, LatexPrecisionIsTheStatedOne) {
  RunTable table;
  table.columns = {{"x", "s"}};
  table.rows = {{0.125}, {2.0}};
  const std::string latex = to_latex(table, 3);
  EXPECT_NE(latex.find("\n0.125 \\\\\n2.000 \\\\\n"), std::string::npos) << latex;
  EXPECT_NE(to_latex(table, 0).find("\n2 \\\\\n"), std::string::npos);
}

TEST(ResultsExport, LatexEscapesEverySpecial) {
  EXPECT_EQ(latex_escape("&%$#_{}~^\\"),
            "\\&\\%\\$\\#\\_\\{\\}\\textasciitilde{}\\textasciicircum{}\\textbackslash{}");
  EXPECT_EQ(latex_escape("two\n\nlines\r\n"), "two  lines  ");
  EXPECT_EQ(latex_escape("plain text 1.5"), "plain text 1.5");
}

TEST(ResultsExport, MetricWithTwoUnitsIsAnError) {
  ResultsDb db = ResultsDb::open_memory();
  db.record_run(tricky_run("e", RunKind::Measured, "m", "c", {{"step_time", 1.5, "s"}}));
  db.record_run(tricky_run("e", RunKind::Measured, "m", "c", {{"step_time", 1500.0, "ms"}}));
  try {
    make_run_table(db, {}, {"step_time"});
    ADD_FAILURE() << "mixed units were exported";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Database);
    EXPECT_NE(e.message().find("metric 'step_time' is in 's' in run 1 but in 'ms' in run 2"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(make_run_table(db, {.limit = 1}, {"step_time"}).rows.size(), 1u);
}

TEST(ResultsExport, FormatNames) {
  EXPECT_EQ(parse_export_format("csv"), ExportFormat::Csv);
  EXPECT_EQ(parse_export_format("json"), ExportFormat::Json);
  EXPECT_EQ(parse_export_format("latex"), ExportFormat::Latex);
  EXPECT_EQ(parse_export_format("tex"), ExportFormat::Latex);
  EXPECT_FALSE(parse_export_format("xlsx").has_value());
}

std::vector<std::string> listing(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

TEST(ResultsExport, ExportReplacesTheFileWholeAndLeavesNoTemporary) {
  test::TempDir dir;
  const auto file = dir / "runs.csv";
  test::write_bytes(file, "old contents that are longer than the new ones ....................\n");
  ResultsDb db = ResultsDb::open_memory();
  const RunTable table = tricky_table(db);
  export_run_table(table, ExportFormat::Csv, file);
  EXPECT_EQ(test::read_bytes(file), to_csv(table));
  export_run_table(table, ExportFormat::Latex, dir / "runs.tex", 1);
  EXPECT_EQ(test::read_bytes(dir / "runs.tex"), to_latex(table, 1));
  EXPECT_EQ(listing(dir.path()), (std::vector<std::string>{"runs.csv", "runs.tex"}));
}

TEST(ResultsExport, FailedExportLeavesWhatWasThere) {
  test::TempDir dir;
  const auto occupied = dir / "runs.json";
  std::filesystem::create_directory(occupied);  // a directory where the file should go: rename fails
  test::write_bytes(occupied / "keep.txt", "keep");
  try {
    write_file_atomically(occupied, "{}");
    ADD_FAILURE() << "replaced a directory";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_EQ(e.where().file, occupied.string());
    EXPECT_NE(e.message().find("cannot replace"), std::string::npos) << e.what();
  }
  EXPECT_EQ(listing(dir.path()), std::vector<std::string>{"runs.json"});
  EXPECT_EQ(test::read_bytes(occupied / "keep.txt"), "keep");

  const auto nowhere = dir / "missing" / "runs.csv";
  try {
    write_file_atomically(nowhere, "x");
    ADD_FAILURE() << "wrote into a missing directory";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_EQ(e.where().file, nowhere.string());
  }
}

}  // namespace
}  // namespace px
