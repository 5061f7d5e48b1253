// Every damaged file in datasets/fixtures/bad/ is rejected with the right error kind, the file and
// line (and column where yaml-cpp gives one) of the problem, and a message that names it.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "engine/core/error.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

namespace px {
namespace {

namespace fs = std::filesystem;

const fs::path kBad = fs::path(PX_DATASETS_DIR) / "fixtures" / "bad";

const SpecCatalog& catalog() {
  static const SpecCatalog c{PX_DATASETS_DIR};
  return c;
}

enum class Load { Model, Gpu, Cluster, Plan, LayerTimes };

struct BadCase {
  std::string file;         // in datasets/fixtures/bad/
  Load load;
  ErrorKind kind;
  int line;
  int column;               // 0: the error names a line only
  std::string message;      // a distinctive part of Error::message()
  std::string hint;         // a part of Error::hint(); empty: not checked
  std::string model = {};   // plans: the model and cluster they are resolved against
  std::string cluster = {};
};

void load(const BadCase& c, const fs::path& path) {
  switch (c.load) {
    case Load::Model: catalog().model(path.string()); return;
    case Load::Gpu: catalog().gpu(path.string()); return;
    case Load::Cluster: catalog().cluster(path.string()); return;
    case Load::LayerTimes: {
      const LayerTimesSpec times = catalog().layer_times(path.string());
      for (const LayerTimesSpec::Run& run : times.runs) catalog().plan_of(times, run);
      return;
    }
    case Load::Plan: {
      const PlanSpec plan = catalog().plan(path.string());
      const ModelSpec model = catalog().model(c.model.empty() ? "gpt3-175b" : c.model);
      if (c.cluster.empty()) {
        resolve_plan(plan, model, nullptr);
      } else {
        const ClusterSpec cluster = catalog().cluster(c.cluster);
        resolve_plan(plan, model, &cluster);
      }
      return;
    }
  }
}

const std::vector<BadCase>& bad_cases() {
  using K = ErrorKind;
  static const std::vector<BadCase> cases = {
      // Syntax.
      {"model_unclosed_bracket.yaml", Load::Model, K::Parse, 5, 12, "end of sequence flow not found",
       "never closed by ']'"},
      {"model_bad_indentation.yaml", Load::Model, K::Parse, 5, 14, "illegal map value",
       "indentation"},
      {"model_tab_indentation.yaml", Load::Model, K::Parse, 15, 1, "tab character in indentation",
       "spaces only"},
      // Shape of the document.
      {"empty.yaml", Load::Model, K::Spec, 1, 0, "empty model file", ""},
      {"model_root_list.yaml", Load::Model, K::Spec, 2, 1,
       "top level of a model file must be a map of keys, got a list", ""},
      {"model_two_documents.yaml", Load::Model, K::Spec, 15, 1, "holds one YAML document", "---"},
      // Keys.
      {"model_unknown_key.yaml", Load::Model, K::Spec, 5, 1, "unknown key 'hiden_size'",
       "did you mean 'hidden_size'?"},
      {"model_missing_key.yaml", Load::Model, K::Spec, 2, 1, "missing required key 'hidden_size'",
       "required keys:"},
      {"model_duplicate_key.yaml", Load::Model, K::Spec, 14, 1,
       "duplicate key 'num_layers' in model file (first set on line 4)", ""},
      {"gpu_missing_key.yaml", Load::Gpu, K::Spec, 2, 1, "missing required key 'hbm_bandwidth_gbs'",
       ""},
      {"cluster_node_unknown_key.yaml", Load::Cluster, K::Spec, 7, 3,
       "unknown key 'gpu_per_node' in 'node'", "did you mean 'gpus_per_node'?"},
      {"plan_unknown_key.yaml", Load::Plan, K::Spec, 2, 1, "unknown key 'tensor_parallel_size'",
       "did you mean 'tensor_model_parallel_size'?"},
      // Types.
      {"model_string_for_int.yaml", Load::Model, K::Spec, 4, 13,
       "num_layers must be an integer, got 'two'", ""},
      {"model_quoted_number.yaml", Load::Model, K::Spec, 5, 14,
       "hidden_size must be an integer, got the quoted string \"64\"", "without quotes"},
      {"model_list_for_map.yaml", Load::Model, K::Spec, 14, 6, "moe must be a map of keys, got a list",
       "num_experts"},
      {"gpu_bool_for_number.yaml", Load::Gpu, K::Spec, 8, 10, "hbm_gib must be a number, got 'yes'",
       ""},
      {"cluster_gpu_list.yaml", Load::Cluster, K::Spec, 4, 6,
       "gpu must be a GPU name or a map of GPU keys, got a list", ""},
      {"plan_bool_type.yaml", Load::Plan, K::Spec, 3, 20,
       "sequence_parallel must be true or false, got 'maybe'", ""},
      // Enumerations.
      {"model_unknown_activation.yaml", Load::Model, K::Spec, 9, 13, "unknown activation 'relu'",
       "accepted values: 'gelu', 'swiglu'"},
      {"cluster_unknown_topology.yaml", Load::Cluster, K::Spec, 15, 13,
       "unknown fabric.topology 'torus'", "'rail-optimized-fat-tree', 'fat-tree', 'dragonfly'"},
      {"plan_unknown_schedule.yaml", Load::Plan, K::Spec, 3, 20,
       "unknown pipeline_schedule 'interleaved'", "did you mean 'interleaved-1f1b'?"},
      // Model values.
      {"model_negative_layers.yaml", Load::Model, K::Spec, 4, 0, "num_layers must be > 0, got -2", ""},
      {"model_zero_hidden.yaml", Load::Model, K::Spec, 5, 0, "hidden_size must be > 0, got 0", ""},
      {"model_heads_groups.yaml", Load::Model, K::Spec, 7, 0,
       "num_attention_heads 4 is not divisible by num_query_groups 3", "nearest valid: 2 or 4"},
      {"model_hidden_heads.yaml", Load::Model, K::Spec, 5, 0,
       "hidden_size 100 is not divisible by num_attention_heads 3",
       "nearest valid num_attention_heads: 2 or 4"},
      {"model_dropout_range.yaml", Load::Model, K::Spec, 14, 0,
       "hidden_dropout must be in [0, 1), got 1.5", ""},
      {"model_moe_top_k.yaml", Load::Model, K::Spec, 16, 0, "moe.top_k 5 exceeds moe.num_experts 4",
       ""},
      {"model_positions_short.yaml", Load::Model, K::Spec, 9, 0,
       "max_position_embeddings 32 is less than seq_length 64", ">= 64"},
      // GPU and cluster values.
      {"gpu_negative_peak.yaml", Load::Gpu, K::Spec, 4, 0, "peak_bf16_tflops must be > 0, got -312",
       ""},
      {"cluster_unknown_gpu.yaml", Load::Cluster, K::NotFound, 4, 6, "unknown GPU 'h100-sxn'",
       "closest: 'h100-sxm'"},
      {"cluster_dragonfly_unset.yaml", Load::Cluster, K::Spec, 14, 0,
       "fabric.dragonfly_groups must be set (> 0) when fabric.topology is dragonfly", ""},
      {"cluster_no_nics.yaml", Load::Cluster, K::Spec, 10, 0,
       "node.nics_per_node must be >= 1 when the cluster has 4 nodes", ""},
      {"cluster_oversubscription.yaml", Load::Cluster, K::Spec, 19, 0,
       "fabric.oversubscription must be >= 1, got 0.5", ""},
      {"cluster_nvlink_efficiency.yaml", Load::Cluster, K::Spec, 9, 0,
       "node.nvlink_efficiency must be in (0, 1], got 1.2", "share of the NVLink line rate"},
      {"layer_times_negative.yaml", Load::LayerTimes, K::Spec, 7, 60, "runs[1].backward_ms must be > 0, got -19.5", ""},
      {"layer_times_unknown_plan.yaml", Load::LayerTimes, K::NotFound, 7, 0, "unknown plan 'gpt-22b-tp8-sideways'",
       "closest: 'gpt-22b-tp8-none'"},
      // Plan rules.
      {"plan_tp_heads.yaml", Load::Plan, K::Plan, 2, 0,
       "tensor_model_parallel_size 5 must divide num_attention_heads 96", "nearest valid: 4 or 6"},
      {"plan_layers_pp.yaml", Load::Plan, K::Plan, 3, 0,
       "num_layers 96 is not divisible by pipeline_model_parallel_size 5", "nearest valid: 4 or 6"},
      {"plan_global_batch.yaml", Load::Plan, K::Plan, 6, 0,
       "global_batch_size 2561 is not divisible by micro_batch_size x data_parallel_size = 80",
       "nearest valid: 2560 or 2640"},
      {"plan_interleaved_microbatches.yaml", Load::Plan, K::Plan, 8, 0,
       "interleaved-1f1b needs the number of micro-batches", "global_batch_size: 128 or 256"},
      {"plan_vp_with_1f1b.yaml", Load::Plan, K::Plan, 4, 0,
       "pipeline_schedule 1f1b needs virtual_pipeline_model_parallel_size 1, got 2",
       "interleaved-1f1b"},
      {"plan_zero_bubble_vp.yaml", Load::Plan, K::Plan, 5, 0,
       "zero-bubble with virtual_pipeline_model_parallel_size 2 is not supported", ""},
      {"plan_ep_dense.yaml", Load::Plan, K::Plan, 5, 0,
       "expert_model_parallel_size 2 needs an MoE model; gpt3-175b has no experts", ""},
      {"plan_ep_not_dividing_dp.yaml", Load::Plan, K::Plan, 3, 0,
       "expert_model_parallel_size 4 must divide data_parallel_size 2", "nearest valid: 2",
       "mixtral-8x7b"},
      {"plan_moe_tp_without_sp.yaml", Load::Plan, K::Plan, 3, 0,
       "an MoE model with tensor_model_parallel_size 2 needs sequence_parallel",
       "sequence_parallel: true", "mixtral-8x7b"},
      {"plan_seq_cp.yaml", Load::Plan, K::Plan, 3, 0,
       "context_parallel_size 3 needs seq_length 2048 divisible by 2 x context_parallel_size = 6",
       "nearest valid context_parallel_size: 2 or 4"},
      {"plan_sp_seq_tp.yaml", Load::Plan, K::Plan, 4, 0,
       "sequence_parallel needs seq_length 2047 divisible by tensor_model_parallel_size 2",
       "nearest valid seq_length: 2046 or 2048"},
      {"plan_seq_exceeds_positions.yaml", Load::Plan, K::Plan, 3, 0,
       "seq_length 4096 exceeds max_position_embeddings 2048", "seq_length <= 2048"},
      {"plan_world_exceeds_cluster.yaml", Load::Plan, K::Plan, 3, 0,
       "world size tp x pp x cp x dp = 8 x 1 x 1 x 2 = 16 exceeds the 8 GPUs of cluster h100-8",
       "largest data_parallel_size that fits: 1", "gpt3-175b", "h100-8"},
      {"plan_fp8_on_a100.yaml", Load::Plan, K::Plan, 4, 0,
       "precision fp8 needs a GPU with an fp8 peak; a100-sxm-80gb of cluster a100-8 has none", "bf16",
       "gpt3-175b", "a100-8"},
      {"plan_zero_stage.yaml", Load::Plan, K::Plan, 3, 0, "zero_stage 4 is not one of 0, 1, 2, 3", ""},
      {"plan_zero_micro_batch.yaml", Load::Plan, K::Plan, 3, 0,
       "micro_batch_size must be >= 1, got 0", ""},
  };
  return cases;
}

class BadInput : public testing::TestWithParam<BadCase> {};

TEST_P(BadInput, IsRejectedAtItsLine) {
  const BadCase& c = GetParam();
  const fs::path path = kBad / c.file;
  ASSERT_TRUE(fs::exists(path)) << path;
  try {
    load(c, path);
    FAIL() << c.file << " was accepted";
  } catch (const Error& e) {
    SCOPED_TRACE(e.what());
    EXPECT_EQ(e.kind(), c.kind);
    EXPECT_EQ(e.where().file, path.string());
    EXPECT_EQ(e.where().line, c.line);
    EXPECT_EQ(e.where().column, c.column);
    const std::string place = c.column > 0
                                  ? path.string() + ":" + std::to_string(c.line) + ":" +
                                        std::to_string(c.column) + ": "
                                  : path.string() + ":" + std::to_string(c.line) + ": ";
    EXPECT_EQ(std::string(e.what()).rfind(place, 0), 0U) << "the message starts with " << place;
    EXPECT_NE(e.message().find(c.message), std::string::npos) << e.message();
    if (!c.hint.empty()) {
      EXPECT_NE(e.hint().find(c.hint), std::string::npos) << e.hint();
    }
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "one line";
  }
}

std::string case_name(const testing::TestParamInfo<BadCase>& info) {
  std::string name = fs::path(info.param.file).stem().string();
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, BadInput, testing::ValuesIn(bad_cases()), case_name);

// A damaged fixture nobody checks is dead weight: each one is in the table above, and each says in
// its first line what is wrong with it.
TEST(BadFixtures, EveryFileIsCheckedAndExplained) {
  std::set<std::string> tested;
  for (const BadCase& c : bad_cases()) EXPECT_TRUE(tested.insert(c.file).second) << c.file;
  int count = 0;
  for (const auto& entry : fs::directory_iterator(kBad)) {
    const std::string name = entry.path().filename().string();
    EXPECT_TRUE(tested.contains(name)) << name << " has no test case";
    std::ifstream in(entry.path());
    std::string first;
    std::getline(in, first);
    EXPECT_EQ(first.rfind("# Bad", 0), 0U) << name << " opens without saying what is wrong";
    ++count;
  }
  EXPECT_EQ(count, static_cast<int>(bad_cases().size()));
  EXPECT_GE(count, 25);
}

// Failures that need no file of their own.
TEST(BadInput, MissingFileIsIo) {
  const fs::path path = kBad / "no-such-model.yaml";
  try {
    load_model_file(path);
    FAIL() << "a missing file was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_EQ(e.where().file, path.string());
    EXPECT_EQ(e.where().line, 0);
    EXPECT_NE(std::string(e.what()).find(path.string() + ": io error: no such file"),
              std::string::npos)
        << e.what();
  }
}

TEST(BadInput, MissingPathThroughCatalogIsIo) {
  try {
    catalog().plan("plans/does-not-exist.yaml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_EQ(e.where().file, "plans/does-not-exist.yaml");
  }
}

TEST(BadInput, DirectoryIsIo) {
  try {
    load_model_file(kBad);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_NE(e.message().find("is a directory"), std::string::npos);
  }
}

TEST(BadInput, UnknownModelNameListsClosestNames) {
  try {
    catalog().model("gpt3-176b");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::NotFound);
    EXPECT_EQ(e.where().file, (fs::path(PX_DATASETS_DIR) / "models").string());
    EXPECT_EQ(e.message(), "unknown model 'gpt3-176b'");
    EXPECT_EQ(e.hint().rfind("closest: 'gpt3-175b'", 0), 0U) << e.hint();
  }
}

TEST(BadInput, UnknownClusterAndGpuAndPlanNames) {
  const auto kind_of = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const Error& e) {
      return e.kind();
    }
    return ErrorKind::Usage;
  };
  EXPECT_EQ(kind_of([] { catalog().cluster("h100-1024"); }), ErrorKind::NotFound);
  EXPECT_EQ(kind_of([] { catalog().gpu("h100"); }), ErrorKind::NotFound);
  EXPECT_EQ(kind_of([] { catalog().plan("no-such-plan"); }), ErrorKind::NotFound);
}

TEST(BadInput, EmptyCatalogFolderSaysSo) {
  const SpecCatalog empty{kBad};  // has no models/ folder
  try {
    empty.model("gpt3-175b");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::NotFound);
    EXPECT_NE(e.hint().find("there are no model files in"), std::string::npos) << e.hint();
  }
}

}  // namespace
}  // namespace px
