// The memory planner: placements never overlap in space and time, and each rank's planned peak
// agrees with the closed-form memory model (weights, gradients, optimizer by ZeRO stage,
// Korthikanti activations) within 5% on large published configurations.
#include <gtest/gtest.h>

#include <ostream>

#include "engine/plan/memory_planner.hpp"
#include "engine/spec/model_math.hpp"
#include "plan_test_support.hpp"

namespace px {
namespace {

TEST(MemoryPlanner, LiveTensorsNeverShareBytes) {
  const CompiledPlan plan = test::compile("tiny-gpt-deep", [](PlanSpec& p) {
    p.pipeline_model_parallel_size = 2;
    p.data_parallel_size = 2;
    p.zero_stage = 3;
    p.micro_batch_size = 1;
    p.global_batch_size = 8;
  });
  for (const Program& prog : plan.roles) {
    const MemoryPlan mp = plan_memory(prog);
    EXPECT_GE(mp.arena_bytes, mp.peak_live_bytes);
    EXPECT_GE(mp.peak_live_bytes, mp.static_bytes);
    const auto& ts = prog.tensors;
    for (std::size_t i = 0; i < ts.size(); ++i) {
      for (std::size_t j = i + 1; j < ts.size(); ++j) {
        const bool time = is_persistent(ts[i].cls) || is_persistent(ts[j].cls) ||
                          (ts[i].first_op <= ts[j].last_op && ts[j].first_op <= ts[i].last_op);
        if (!time || ts[i].bytes == 0 || ts[j].bytes == 0) continue;
        const bool space = mp.offsets[i] < mp.offsets[j] + ts[j].bytes && mp.offsets[j] < mp.offsets[i] + ts[i].bytes;
        ASSERT_FALSE(space) << prog.name_of(ts[i]) << " and " << prog.name_of(ts[j]) << " overlap";
      }
    }
  }
}

struct MemoryCase {
  const char* name;
  const char* model;
  std::function<void(PlanSpec&)> set;
};

// Names the case in test output instead of dumping its bytes.
void PrintTo(const MemoryCase& c, std::ostream* os) { *os << c.name; }

class MemoryAgreement : public ::testing::TestWithParam<MemoryCase> {};

TEST_P(MemoryAgreement, PlannerPeakWithinFivePercentOfTheModel) {
  const ModelSpec model = test::model(GetParam().model);
  const PlanSpec plan = test::plan_for(model, GetParam().set);
  const CompiledPlan compiled = compile_plan(model, plan);
  for (int stage : {0, plan.pp() / 2, plan.pp() - 1}) {
    const MemoryPlan mp = plan_memory(compiled.roles[static_cast<std::size_t>(stage)]);
    const RankMemory rm = training_memory(model, plan, stage);
    const double planned = static_cast<double>(mp.arena_bytes), closed = rm.total();
    EXPECT_NEAR(planned / closed, 1.0, 0.05)
        << "stage " << stage << ": planner " << planned / (1 << 30) << " GiB, model " << closed / (1 << 30)
        << " GiB (weights " << rm.weights / (1 << 30) << ", grads " << rm.gradients / (1 << 30) << ", optimizer "
        << rm.optimizer / (1 << 30) << ", activations " << rm.activations / (1 << 30) << ")";
    // The persistent region alone must match the model's weights + gradients + optimizer.
    EXPECT_NEAR(static_cast<double>(mp.static_bytes) / (rm.weights + rm.gradients + rm.optimizer), 1.0, 0.01) << "stage " << stage;
  }
}

void megatron_gpt3(PlanSpec& p) {
  p.tensor_model_parallel_size = 8;
  p.pipeline_model_parallel_size = 16;
  p.data_parallel_size = 80;
  p.sequence_parallel = true;
  p.recompute = Recompute::Selective;
  p.micro_batch_size = 1;
  p.global_batch_size = 2560;
  p.zero_stage = 1;
}

INSTANTIATE_TEST_SUITE_P(
    Published, MemoryAgreement,
    ::testing::Values(
        MemoryCase{"gpt3_175b_interleaved", "gpt3-175b",
                   [](PlanSpec& p) {
                     megatron_gpt3(p);
                     p.schedule = PipelineSchedule::Interleaved1F1B;
                     p.virtual_pipeline_model_parallel_size = 2;
                   }},
        MemoryCase{"gpt3_175b_1f1b_full_recompute", "gpt3-175b",
                   [](PlanSpec& p) {
                     megatron_gpt3(p);
                     p.recompute = Recompute::Full;
                     p.pipeline_model_parallel_size = 8;
                     p.data_parallel_size = 4;
                     p.global_batch_size = 64;
                   }},
        MemoryCase{"llama2_70b_tp8_pp4", "llama2-70b",
                   [](PlanSpec& p) {
                     p.tensor_model_parallel_size = 8;
                     p.pipeline_model_parallel_size = 4;
                     p.data_parallel_size = 2;
                     p.sequence_parallel = true;
                     p.micro_batch_size = 1;
                     p.global_batch_size = 32;
                   }},
        MemoryCase{"llama3_8b_zero3", "llama3-8b",
                   [](PlanSpec& p) {
                     p.data_parallel_size = 8;
                     p.zero_stage = 3;
                     p.micro_batch_size = 2;
                     p.global_batch_size = 32;
                   }},
        MemoryCase{"mixtral_ep8", "mixtral-8x7b",
                   [](PlanSpec& p) {
                     p.tensor_model_parallel_size = 2;
                     p.sequence_parallel = true;
                     p.pipeline_model_parallel_size = 4;
                     p.data_parallel_size = 8;
                     p.expert_model_parallel_size = 8;
                     p.zero_stage = 1;
                     p.micro_batch_size = 1;
                     p.global_batch_size = 64;
                   }}),
    [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace
}  // namespace px
