// Traces of a tp2·pp2·dp2 plan: well formed for the Chrome trace format and Kineto's conventions,
// one event per op of the compiled program, collective metadata on every comm event.
#include <gtest/gtest.h>

#include <fstream>
#include <set>

#include "engine/plan/dry_run.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "engine/trace/chrome_trace.hpp"

namespace px {
namespace {

CompiledPlan tp2_pp2_dp2() {
  const SpecCatalog cat(PX_DATASETS_DIR);
  const ModelSpec m = cat.model("tiny-gpt-deep");
  PlanSpec p;
  p.tensor_model_parallel_size = 2;
  p.pipeline_model_parallel_size = 2;
  p.data_parallel_size = 2;
  p.global_batch_size = 8;
  return compile_plan(m, resolve_plan(p, m, nullptr));
}

// Op costs proportional to work, so the trace has real extents.
double work(const Program&, const Op& op) { return 1e-12 * (op.flops + op.vector_flops) + 1e-11 * static_cast<double>(op.comm_bytes) + 1e-6; }

TEST(ChromeTrace, EveryRankWellFormedWithOneEventPerOp) {
  const CompiledPlan plan = tp2_pp2_dp2();
  const DryRunResult run = dry_run(plan, {work, true});
  ASSERT_TRUE(run.ok) << run.error;
  for (int rank = 0; rank < plan.topology.world_size(); ++rank) {
    ChromeTrace trace(plan, {rank, "nccl", "cpu", true});
    trace.add_iteration(0, run.timings[static_cast<std::size_t>(rank)]);
    const nlohmann::json j = trace.to_json();
    const auto problems = check_chrome_trace(j);
    EXPECT_TRUE(problems.empty()) << "rank " << rank << ": " << problems.front();
    std::multiset<std::size_t> ids;
    for (const auto& e : j["traceEvents"])
      if (e["ph"] == "X" && e["args"].contains("op id")) {
        ids.insert(e["args"]["op id"].get<std::size_t>());
        if (e["name"].get<std::string>().rfind("nccl:", 0) == 0) {
          EXPECT_TRUE(e["args"].contains("Process Group Ranks")) << e.dump();
          EXPECT_GE(e["args"]["Group size"].get<int>(), 2) << e.dump();
        }
      }
    const std::size_t n = plan.program_of(rank).ops.size();
    ASSERT_EQ(ids.size(), n) << "rank " << rank;
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(ids.count(i), 1u) << "op " << i << " of rank " << rank;
    EXPECT_EQ(j["distributedInfo"]["world_size"], 8);
  }
}

TEST(ChromeTrace, WrittenFileParsesBack) {
  const CompiledPlan plan = tp2_pp2_dp2();
  const DryRunResult run = dry_run(plan, {work, true});
  ChromeTrace trace(plan, {3, "mpi", "cpu", false});
  trace.add_iteration(0, run.timings[3]);
  trace.add_iteration(1, run.timings[3], -run.makespan);  // a second iteration right after the first
  const auto path = std::filesystem::path(::testing::TempDir()) / "rank3.json";
  trace.write(path);
  std::ifstream in(path);
  const auto j = nlohmann::json::parse(in);
  EXPECT_TRUE(check_chrome_trace(j).empty());
  int steps = 0;
  for (const auto& e : j["traceEvents"]) steps += e.value("cat", "") == "user_annotation";
  EXPECT_EQ(steps, 2);
  EXPECT_FALSE(std::filesystem::exists(path.string() + ".tmp"));
}

TEST(ChromeTrace, CheckerRejectsBrokenTraces) {
  const CompiledPlan plan = tp2_pp2_dp2();
  const DryRunResult run = dry_run(plan, {work, true});
  ChromeTrace trace(plan, {0, "nccl", "cpu", true});
  trace.add_iteration(0, run.timings[0]);
  nlohmann::json j = trace.to_json();
  EXPECT_FALSE(check_chrome_trace(nlohmann::json::array()).empty());
  auto no_info = j;
  no_info.erase("distributedInfo");
  EXPECT_FALSE(check_chrome_trace(no_info).empty());
  auto overlap = j;  // two ops of one stream at once
  for (auto& e : overlap["traceEvents"])
    if (e["ph"] == "X" && e["tid"] == 1) e["ts"] = 5.0, e["dur"] = 10.0;
  EXPECT_FALSE(check_chrome_trace(overlap).empty());
  auto negative = j;
  for (auto& e : negative["traceEvents"])
    if (e["ph"] == "X") {
      e["dur"] = -1.0;
      break;
    }
  EXPECT_FALSE(check_chrome_trace(negative).empty());
}

}  // namespace
}  // namespace px
