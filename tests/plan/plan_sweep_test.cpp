// A sweep over plan combinations of the tiny models: every plan that resolve_plan accepts compiles,
// runs to completion in a dry run with matched communication, and sums to the closed-form FLOPs.
// Deterministic sampling keeps the sweep to a few hundred plans.
#include <gtest/gtest.h>

#include <random>

#include "engine/core/error.hpp"
#include "engine/plan/dry_run.hpp"
#include "engine/spec/model_math.hpp"
#include "plan_test_support.hpp"

namespace px {
namespace {

TEST(PlanSweep, EveryAcceptedPlanCompilesAndRuns) {
  std::mt19937 rng(20261122);
  auto pick = [&](std::initializer_list<int> xs) {
    std::uniform_int_distribution<std::size_t> d(0, xs.size() - 1);
    return *(xs.begin() + d(rng));
  };
  int accepted = 0, rejected = 0;
  for (int trial = 0; trial < 600 && accepted < 250; ++trial) {
    const char* name = pick({0, 1, 2}) == 0 ? "tiny-gpt-deep" : (pick({0, 1}) ? "tiny-moe" : "tiny-llama");
    const ModelSpec model = test::model(name);
    PlanSpec p;
    p.tensor_model_parallel_size = pick({1, 2});
    p.pipeline_model_parallel_size = pick({1, 2, 4});
    p.context_parallel_size = pick({1, 1, 2});
    p.data_parallel_size = pick({1, 2});
    p.expert_model_parallel_size = model.is_moe() ? pick({1, 2}) : 1;
    p.zero_stage = pick({0, 1, 2, 3});
    p.schedule = static_cast<PipelineSchedule>(pick({0, 1, 2, 3}));
    p.virtual_pipeline_model_parallel_size = p.schedule == PipelineSchedule::Interleaved1F1B ? 2 : 1;
    p.recompute = static_cast<Recompute>(pick({0, 1, 2}));
    p.sequence_parallel = pick({0, 1}) == 1 || model.is_moe();
    p.optimizer_offload = pick({0, 0, 1}) == 1;
    p.use_flash_attn = pick({0, 1}) == 1;
    p.micro_batch_size = pick({1, 2});
    p.global_batch_size = p.micro_batch_size * p.data_parallel_size * pick({1, 2, 4});
    PlanSpec resolved;
    try {
      resolved = resolve_plan(p, model, nullptr);
    } catch (const Error&) {
      ++rejected;
      continue;
    }
    ++accepted;
    const std::string what = std::string(name) + " tp" + std::to_string(p.tp()) + " pp" + std::to_string(p.pp()) + " cp" +
                             std::to_string(p.cp()) + " dp" + std::to_string(p.dp()) + " ep" + std::to_string(p.ep()) +
                             " zero" + std::to_string(p.zero_stage) + " " + std::string(to_string(p.schedule)) + " " +
                             std::string(to_string(p.recompute)) + " m" + std::to_string(resolved.num_micro_batches());
    const CompiledPlan plan = compile_plan(model, resolved);
    const DryRunResult r = dry_run(plan);
    ASSERT_TRUE(r.ok) << what << ": " << r.error;
    double sum = 0;
    for (const auto& b : plan.ranks)
      for (const Op& op : plan.roles[static_cast<std::size_t>(b.role)].ops) sum += op.flops;
    ASSERT_NEAR(sum / iteration_flops(model, resolved).total(), 1.0, 1e-12) << what;
  }
  RecordProperty("accepted", accepted);
  RecordProperty("rejected", rejected);
  EXPECT_GE(accepted, 100) << rejected << " rejected";
}

}  // namespace
}  // namespace px
