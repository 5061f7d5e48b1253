// resolve_plan on plans built in code: the fields it derives, and the rules (with their nearest valid
// values) that the fixture files do not already cover.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "engine/core/error.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

namespace px {
namespace {

const SpecCatalog& catalog() {
  static const SpecCatalog c{PX_DATASETS_DIR};
  return c;
}

const ModelSpec& model(const std::string& name) {
  static std::map<std::string, ModelSpec> cache;
  auto it = cache.find(name);
  if (it == cache.end()) it = cache.emplace(name, catalog().model(name)).first;
  return it->second;
}

PlanSpec plan(const std::function<void(PlanSpec&)>& set) {
  PlanSpec p;
  set(p);
  return p;
}

// The Plan error that resolving `p` raises; fails the test when there is none.
Error plan_error(const PlanSpec& p, const ModelSpec& m, const ClusterSpec* cluster = nullptr) {
  try {
    resolve_plan(p, m, cluster);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Plan) << e.what();
    return e;
  }
  ADD_FAILURE() << "plan accepted";
  return Error(ErrorKind::Usage, {}, "none");
}

TEST(ResolvePlan, SequenceLengthDefaultsToTheModels) {
  EXPECT_EQ(resolve_plan(PlanSpec{}, model("gpt3-175b"), nullptr).seq_length, 2048);
  const PlanSpec shorter = plan([](PlanSpec& p) { p.seq_length = 1024; });
  EXPECT_EQ(resolve_plan(shorter, model("gpt3-175b"), nullptr).seq_length, 1024);
}

TEST(ResolvePlan, SequenceParallelIsOffWithoutTensorParallel) {
  const PlanSpec on = plan([](PlanSpec& p) { p.sequence_parallel = true; });
  EXPECT_FALSE(resolve_plan(on, model("tiny-gpt"), nullptr).sequence_parallel);
  const PlanSpec tp2 = plan([](PlanSpec& p) {
    p.tensor_model_parallel_size = 2;
    p.sequence_parallel = true;
  });
  EXPECT_TRUE(resolve_plan(tp2, model("tiny-gpt"), nullptr).sequence_parallel);
}

TEST(ResolvePlan, LayersPerVirtualStageImplyVp) {
  // tiny-gpt-deep: 8 layers; 2 stages of 4 layers; 1 layer per chunk -> 4 chunks per stage.
  const PlanSpec p = plan([](PlanSpec& q) {
    q.pipeline_model_parallel_size = 2;
    q.num_layers_per_virtual_pipeline_stage = 1;
    q.schedule = PipelineSchedule::Interleaved1F1B;
    q.global_batch_size = 4;
  });
  const PlanSpec r = resolve_plan(p, model("tiny-gpt-deep"), nullptr);
  EXPECT_EQ(r.vp(), 4);
  EXPECT_EQ(r.num_layers_per_virtual_pipeline_stage, 1);
  // And the other way round: vp given, layers per chunk filled in.
  const PlanSpec by_vp = plan([](PlanSpec& q) {
    q.pipeline_model_parallel_size = 2;
    q.virtual_pipeline_model_parallel_size = 2;
    q.schedule = PipelineSchedule::Interleaved1F1B;
    q.global_batch_size = 4;
  });
  EXPECT_EQ(resolve_plan(by_vp, model("tiny-gpt-deep"), nullptr).num_layers_per_virtual_pipeline_stage,
            2);
  // Resolving twice changes nothing more.
  const PlanSpec twice = resolve_plan(r, model("tiny-gpt-deep"), nullptr);
  EXPECT_EQ(twice.vp(), r.vp());
  EXPECT_EQ(twice.num_layers_per_virtual_pipeline_stage, r.num_layers_per_virtual_pipeline_stage);
  EXPECT_EQ(twice.seq_length, r.seq_length);
}

TEST(ResolvePlan, LayersPerVirtualStageMustDivideTheStage) {
  const Error e = plan_error(plan([](PlanSpec& q) {
                               q.pipeline_model_parallel_size = 2;
                               q.num_layers_per_virtual_pipeline_stage = 3;
                             }),
                             model("tiny-gpt-deep"));
  EXPECT_EQ(e.message(),
            "num_layers_per_virtual_pipeline_stage 3 must divide the 4 layers of each pipeline "
            "stage (num_layers 8 / pipeline_model_parallel_size 2)");
  EXPECT_EQ(e.hint(), "nearest valid: 2 or 4");
}

TEST(ResolvePlan, VpAndLayersPerStageMustAgree) {
  const Error e = plan_error(plan([](PlanSpec& q) {
                               q.pipeline_model_parallel_size = 2;
                               q.virtual_pipeline_model_parallel_size = 4;
                               q.num_layers_per_virtual_pipeline_stage = 2;
                             }),
                             model("tiny-gpt-deep"));
  EXPECT_NE(e.message().find("contradicts num_layers_per_virtual_pipeline_stage 2, which implies 2"),
            std::string::npos)
      << e.message();
}

TEST(ResolvePlan, LayersNotDivisibleByStagesTimesChunks) {
  // gpt3-175b: 96 layers over 16 stages is 6 per stage; 4 chunks of 1.5 layers is not possible.
  const Error e = plan_error(plan([](PlanSpec& q) {
                               q.tensor_model_parallel_size = 8;
                               q.pipeline_model_parallel_size = 16;
                               q.virtual_pipeline_model_parallel_size = 4;
                               q.schedule = PipelineSchedule::Interleaved1F1B;
                               q.global_batch_size = 16;
                             }),
                             model("gpt3-175b"));
  EXPECT_EQ(e.message(),
            "num_layers 96 is not divisible by pipeline_model_parallel_size x "
            "virtual_pipeline_model_parallel_size = 16 x 4 = 64");
  EXPECT_EQ(e.hint(), "nearest valid virtual_pipeline_model_parallel_size: 3 or 6");
}

TEST(ResolvePlan, InterleavedNeedsStagesAndChunks) {
  const Error no_pp = plan_error(
      plan([](PlanSpec& q) { q.schedule = PipelineSchedule::Interleaved1F1B; }), model("tiny-gpt"));
  EXPECT_EQ(no_pp.message(), "interleaved-1f1b needs pipeline_model_parallel_size >= 2, got 1");
  const Error no_vp = plan_error(plan([](PlanSpec& q) {
                                   q.schedule = PipelineSchedule::Interleaved1F1B;
                                   q.pipeline_model_parallel_size = 2;
                                   q.global_batch_size = 2;
                                 }),
                                 model("tiny-gpt-deep"));
  EXPECT_NE(no_vp.message().find("needs virtual_pipeline_model_parallel_size >= 2"),
            std::string::npos);
  EXPECT_EQ(no_vp.hint(), "nearest valid virtual_pipeline_model_parallel_size: 2");
}

TEST(ResolvePlan, PipelineDeeperThanTheModel) {
  const Error e = plan_error(plan([](PlanSpec& q) { q.pipeline_model_parallel_size = 4; }),
                             model("tiny-gpt"));
  EXPECT_EQ(e.message(),
            "pipeline_model_parallel_size 4 exceeds num_layers 2: every stage needs a layer");
  EXPECT_EQ(e.hint(), "nearest valid: 2");
}

TEST(ResolvePlan, TensorParallelMustDivideKeyValueGroups) {
  // llama2-70b: 64 heads but 8 key/value groups.
  const Error e = plan_error(plan([](PlanSpec& q) {
                               q.tensor_model_parallel_size = 16;
                               q.sequence_parallel = true;
                             }),
                             model("llama2-70b"));
  EXPECT_EQ(e.message(), "tensor_model_parallel_size 16 must divide num_query_groups 8");
  EXPECT_EQ(e.hint(), "nearest valid: 8");
}

TEST(ResolvePlan, TensorParallelMustDivideTheMlp) {
  ModelSpec m = model("tiny-gpt");
  m.ffn_hidden_size = 250;
  const Error e = plan_error(plan([](PlanSpec& q) { q.tensor_model_parallel_size = 4; }), m);
  EXPECT_EQ(e.message(), "tensor_model_parallel_size 4 must divide ffn_hidden_size 250");
  EXPECT_EQ(e.hint(), "nearest valid: 2");  // divides 4 heads, 4 groups and 250 alike
}

TEST(ResolvePlan, ExpertParallelMustDivideTheExperts) {
  const Error e = plan_error(plan([](PlanSpec& q) {
                               q.expert_model_parallel_size = 3;
                               q.data_parallel_size = 6;
                               q.global_batch_size = 6;
                             }),
                             model("mixtral-8x7b"));
  EXPECT_EQ(e.message(), "expert_model_parallel_size 3 must divide moe.num_experts 8");
  EXPECT_EQ(e.hint(), "nearest valid: 2");  // divides 8 experts and dp 6
}

TEST(ResolvePlan, ContextParallelWithSequenceParallel) {
  // tiny-gpt at 48 tokens: 2 x cp = 8 divides 48, but 2 x cp x tp = 32 does not.
  const Error e = plan_error(plan([](PlanSpec& q) {
                               q.tensor_model_parallel_size = 4;
                               q.context_parallel_size = 4;
                               q.sequence_parallel = true;
                               q.seq_length = 48;
                             }),
                             model("tiny-gpt"));
  EXPECT_EQ(e.message(),
            "context_parallel_size 4 with sequence_parallel needs seq_length 48 divisible by 2 x "
            "context_parallel_size x tensor_model_parallel_size = 32");
  EXPECT_EQ(e.hint(), "nearest valid seq_length: 32 or 64");
}

TEST(ResolvePlan, SizesAndDtypes) {
  const Error tp0 = plan_error(plan([](PlanSpec& q) { q.tensor_model_parallel_size = 0; }),
                               model("tiny-gpt"));
  EXPECT_EQ(tp0.message(), "tensor_model_parallel_size must be >= 1, got 0");
  EXPECT_EQ(std::string(tp0.what()),
            "plan error: tensor_model_parallel_size must be >= 1, got 0");  // no file: no place
  const Error fp8_grads = plan_error(plan([](PlanSpec& q) { q.grad_dtype = DType::FP8; }),
                                     model("tiny-gpt"));
  EXPECT_NE(fp8_grads.message().find("grad_dtype fp8 is not supported"), std::string::npos);
}

TEST(ResolvePlan, KeyNotInTheFileStillNamesTheFile) {
  const std::string path = std::string(PX_DATASETS_DIR) + "/fixtures/good/plan_defaults.yaml";
  PlanSpec p = load_plan_file(path);
  p.tensor_model_parallel_size = 3;  // set by a command-line override, not in the file
  const Error e = plan_error(p, model("tiny-gpt"));
  EXPECT_EQ(e.where().file, path);
  EXPECT_EQ(e.where().line, 0);
  EXPECT_EQ(std::string(e.what()).rfind(path + ": plan error: tensor_model_parallel_size 3", 0), 0U)
      << e.what();
}

TEST(ResolvePlan, ClusterChecks) {
  const ClusterSpec h100 = catalog().cluster("h100-8");
  const PlanSpec full = plan([](PlanSpec& q) {
    q.tensor_model_parallel_size = 8;
    q.sequence_parallel = true;
    q.precision = DType::FP8;
  });
  EXPECT_NO_THROW(resolve_plan(full, model("gpt3-175b"), &h100));  // exactly 8 GPUs, fp8 present
  const PlanSpec too_deep = plan([](PlanSpec& q) {
    q.tensor_model_parallel_size = 8;
    q.pipeline_model_parallel_size = 2;
  });
  const Error e = plan_error(too_deep, model("gpt3-175b"), &h100);
  EXPECT_EQ(e.hint(), "tp x pp x cp = 16 alone exceeds the cluster");
}

TEST(ResolvePlan, MoeWithTensorAndExpertParallelIsAccepted) {
  const PlanSpec p = plan([](PlanSpec& q) {
    q.tensor_model_parallel_size = 2;
    q.sequence_parallel = true;
    q.data_parallel_size = 8;
    q.expert_model_parallel_size = 8;
    q.global_batch_size = 64;
  });
  const PlanSpec r = resolve_plan(p, model("mixtral-8x7b"), nullptr);
  EXPECT_EQ(r.world_size(), 16);
  EXPECT_EQ(r.num_micro_batches(), 8);
}

// Each rule has its own message, so a user can tell which one broke.
TEST(ResolvePlan, RulesHaveDistinctMessages) {
  const ModelSpec& gpt = model("gpt3-175b");
  const std::vector<PlanSpec> broken = {
      plan([](PlanSpec& q) { q.tensor_model_parallel_size = 5; }),
      plan([](PlanSpec& q) { q.pipeline_model_parallel_size = 5; }),
      plan([](PlanSpec& q) {
        q.global_batch_size = 3;
        q.data_parallel_size = 2;
      }),
      plan([](PlanSpec& q) { q.zero_stage = -1; }),
      plan([](PlanSpec& q) { q.context_parallel_size = 3; }),
      plan([](PlanSpec& q) { q.seq_length = 4096; }),
      plan([](PlanSpec& q) {
        q.expert_model_parallel_size = 2;
        q.data_parallel_size = 2;
        q.global_batch_size = 2;
      }),
      plan([](PlanSpec& q) { q.schedule = PipelineSchedule::Interleaved1F1B; }),
  };
  std::set<std::string> messages;
  for (const PlanSpec& p : broken) messages.insert(plan_error(p, gpt).message());
  EXPECT_EQ(messages.size(), broken.size());
}

}  // namespace
}  // namespace px
