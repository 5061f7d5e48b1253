// The executor over real MPI collectives, run under mpirun: every rank runs its role's program
// (no arithmetic yet, NullBackend) through every comm op the compiler emits; the job completes,
// and each rank's trace is well formed with one event per compiled op.
#include <gtest/gtest.h>

#include <functional>

#include "engine/comm/mpi_comm.hpp"
#include "engine/exec/executor.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "engine/trace/chrome_trace.hpp"

namespace px {
namespace {

MpiRuntime* runtime = nullptr;

struct Case {
  const char* name;
  const char* model;
  std::function<void(PlanSpec&)> set;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::vector<Case> all_cases() {
  auto fp32 = [](PlanSpec& p) {
    p.precision = DType::F32;
    p.grad_dtype = DType::F32;
  };
  std::vector<Case> all = {
      {"tp2_pp2_dp2", "tiny-gpt-deep",
       [=](PlanSpec& p) {
         fp32(p);
         p.tensor_model_parallel_size = 2;
         p.pipeline_model_parallel_size = 2;
         p.data_parallel_size = 2;
         p.global_batch_size = 8;
       }},
      {"tp2_sp_pp2_interleaved_dp2_zero1", "tiny-gpt-deep",
       [=](PlanSpec& p) {
         fp32(p);
         p.tensor_model_parallel_size = 2;
         p.sequence_parallel = true;
         p.pipeline_model_parallel_size = 2;
         p.schedule = PipelineSchedule::Interleaved1F1B;
         p.virtual_pipeline_model_parallel_size = 2;
         p.data_parallel_size = 2;
         p.zero_stage = 1;
         p.global_batch_size = 8;
       }},
      {"cp2_dp2_ep2_pp2_zero3", "tiny-moe",
       [=](PlanSpec& p) {
         fp32(p);
         p.context_parallel_size = 2;
         p.data_parallel_size = 2;
         p.expert_model_parallel_size = 2;
         p.pipeline_model_parallel_size = 2;
         p.zero_stage = 3;
         p.schedule = PipelineSchedule::ZeroBubble;
         p.global_batch_size = 4;
       }},
      {"dp4_zero2_offload", "tiny-gpt",
       [=](PlanSpec& p) {
         fp32(p);
         p.data_parallel_size = 4;
         p.zero_stage = 2;
         p.optimizer_offload = true;
         p.global_batch_size = 8;
       }},
      {"tp2_sp_dp2_full_recompute", "tiny-llama",
       [=](PlanSpec& p) {
         fp32(p);
         p.tensor_model_parallel_size = 2;
         p.data_parallel_size = 2;
         p.sequence_parallel = true;
         p.recompute = Recompute::Full;
         p.global_batch_size = 2;
       }},
  };
  return all;
}

class ExecutorMpi : public ::testing::TestWithParam<Case> {};

TEST_P(ExecutorMpi, EveryRankRunsItsProgramAndTracesIt) {
  const SpecCatalog cat(PX_DATASETS_DIR);
  const ModelSpec model = cat.model(GetParam().model);
  PlanSpec p;
  GetParam().set(p);
  const PlanSpec resolved = resolve_plan(p, model, nullptr);
  if (resolved.world_size() != runtime->world_size()) GTEST_SKIP() << "needs " << resolved.world_size() << " ranks";
  const CompiledPlan plan = compile_plan(model, resolved);
  const int rank = runtime->world_rank();
  const MpiGroups groups = make_mpi_groups(plan.topology, rank);
  GroupComms comms{};
  for (int g = 0; g < kNumGroupKinds; ++g) {
    comms[static_cast<std::size_t>(g)] = groups[static_cast<GroupKind>(g)];
    if (comms[static_cast<std::size_t>(g)]) comms[static_cast<std::size_t>(g)]->set_timeout(std::chrono::seconds(20));
  }
  NullBackend backend;
  Executor exec(plan, rank, backend, comms);
  ChromeTrace trace(plan, {rank, "mpi", "cpu", false});
  for (int it = 0; it < 2; ++it) {
    const auto timings = exec.run_iteration();
    ASSERT_EQ(timings.size(), plan.program_of(rank).ops.size());
    for (const auto& t : timings) ASSERT_LE(t.start, t.end);
    trace.add_iteration(it, timings);
  }
  const auto j = trace.to_json();
  const auto problems = check_chrome_trace(j);
  EXPECT_TRUE(problems.empty()) << "rank " << rank << ": " << (problems.empty() ? "" : problems.front());
  std::vector<int> seen(plan.program_of(rank).ops.size(), 0);
  for (const auto& e : j["traceEvents"])
    if (e["ph"] == "X" && e["args"].contains("op id")) ++seen[e["args"]["op id"].get<std::size_t>()];
  for (std::size_t i = 0; i < seen.size(); ++i) ASSERT_EQ(seen[i], 2) << "op " << i << " of rank " << rank;
  // The arena the executor allocated is the memory planner's figure.
  EXPECT_EQ(exec.arena().size_bytes(), exec.memory().arena_bytes);
  runtime->world()->barrier();
}

INSTANTIATE_TEST_SUITE_P(Plans, ExecutorMpi, ::testing::ValuesIn(all_cases()),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace
}  // namespace px

int main(int argc, char** argv) {
  px::MpiRuntime mpi(&argc, &argv);
  px::runtime = &mpi;
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi.world_rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  return RUN_ALL_TESTS();
}
