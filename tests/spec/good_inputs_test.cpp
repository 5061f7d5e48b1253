// Every spec file under datasets/ loads and validates; the good fixtures parse to exactly the values
// they spell, and omitted keys take their documented defaults.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/core/error.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

namespace px {
namespace {

namespace fs = std::filesystem;

const fs::path kDatasets = fs::path(PX_DATASETS_DIR);
const fs::path kGood = kDatasets / "fixtures" / "good";

const SpecCatalog& catalog() {
  static const SpecCatalog c{PX_DATASETS_DIR};
  return c;
}

std::vector<std::string> stems(const fs::path& dir) {
  std::vector<std::string> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() == ".yaml") out.push_back(entry.path().stem().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Errors are printed whole, so a broken dataset file says where it broke.
#define EXPECT_LOADS(...)      \
  try {                        \
    __VA_ARGS__;               \
  } catch (const Error& e) {   \
    ADD_FAILURE() << e.what(); \
  }

TEST(Datasets, CatalogListsTheFilesSorted) {
  EXPECT_EQ(catalog().model_names(), stems(kDatasets / "models"));
  EXPECT_EQ(catalog().gpu_names(), stems(kDatasets / "gpus"));
  EXPECT_EQ(catalog().cluster_names(), stems(kDatasets / "clusters"));
  EXPECT_EQ(catalog().plan_names(), stems(kDatasets / "plans"));
  const std::vector<std::string> models = catalog().model_names();
  EXPECT_TRUE(std::is_sorted(models.begin(), models.end()));
  EXPECT_FALSE(models.empty());
}

TEST(Datasets, EveryModelLoadsAndIsNamedAfterItsFile) {
  for (const std::string& name : catalog().model_names()) {
    SCOPED_TRACE(name);
    EXPECT_LOADS({
      const ModelSpec m = catalog().model(name);
      EXPECT_EQ(m.name, name);
      EXPECT_FALSE(m.source.empty());
      EXPECT_EQ(m.file, catalog().model_path(name).string());
      EXPECT_GT(m.field_lines.at("num_layers"), 0);
    });
  }
}

TEST(Datasets, EveryGpuLoadsAndIsNamedAfterItsFile) {
  for (const std::string& name : catalog().gpu_names()) {
    SCOPED_TRACE(name);
    EXPECT_LOADS({
      const GpuSpec g = catalog().gpu(name);
      EXPECT_EQ(g.name, name);
      EXPECT_GT(g.peak_bf16_tflops, 0);
    });
  }
}

TEST(Datasets, EveryClusterLoadsWithItsGpu) {
  for (const std::string& name : catalog().cluster_names()) {
    SCOPED_TRACE(name);
    EXPECT_LOADS({
      const ClusterSpec c = catalog().cluster(name);
      EXPECT_EQ(c.name, name);
      EXPECT_GT(c.num_gpus(), 0);
      EXPECT_GT(c.gpu.peak_bf16_tflops, 0);
      // Standalone loading finds the same GPU in the gpus/ folder beside clusters/.
      const ClusterSpec again = load_cluster_file(catalog().cluster_path(name));
      EXPECT_EQ(again.gpu.name, c.gpu.name);
      EXPECT_EQ(again.gpu.hbm_gib, c.gpu.hbm_gib);
    });
  }
}

// Plan files are named after the model they fit ("gpt3-175b-tp8-pp16"): each must resolve against
// that model, and fit in at least one cluster of the catalog.
TEST(Datasets, EveryPlanResolvesForItsModelAndFitsSomeCluster) {
  const std::vector<std::string> models = catalog().model_names();
  std::vector<ClusterSpec> clusters;
  for (const std::string& c : catalog().cluster_names()) {
    EXPECT_LOADS(clusters.push_back(catalog().cluster(c)));
  }
  for (const std::string& name : catalog().plan_names()) {
    SCOPED_TRACE(name);
    std::string model_name;
    for (const std::string& m : models) {
      if (name.rfind(m + "-", 0) == 0 && m.size() > model_name.size()) model_name = m;
    }
    ASSERT_FALSE(model_name.empty()) << "plan " << name << " does not start with a model name";
    EXPECT_LOADS({
      const ModelSpec model = catalog().model(model_name);
      const PlanSpec plan = resolve_plan(catalog().plan(name), model, nullptr);
      EXPECT_GT(plan.seq_length, 0);
      bool fits = false;
      for (const ClusterSpec& c : clusters) {
        try {
          resolve_plan(plan, model, &c);
          fits = true;
        } catch (const Error&) {
        }
      }
      EXPECT_TRUE(fits) << "no cluster holds " << plan.world_size() << " GPUs";
    });
  }
}

// Measured layer times name a model, a cluster and plans of the catalog, and times in milliseconds.
TEST(Datasets, EveryLayerTimesFileNamesSpecsOfTheCatalog) {
  int files = 0;
  for (const std::string& name : stems(kDatasets / "layer_times")) {
    SCOPED_TRACE(name);
    EXPECT_LOADS({
      const LayerTimesSpec t = load_layer_times_file(kDatasets / "layer_times" / (name + ".yaml"));
      const ModelSpec model = catalog().model(t.model);
      const ClusterSpec cluster = catalog().cluster(t.cluster);
      ASSERT_FALSE(t.runs.empty());
      for (const LayerTimesSpec::Run& run : t.runs) {
        resolve_plan(catalog().plan(run.plan), model, &cluster);
        EXPECT_GT(run.forward_ms, 0);
        EXPECT_GT(run.backward_ms, run.forward_ms) << run.plan;  // a backward pass does twice the forward's GEMMs
        EXPECT_GT(run.line, 0);
      }
    });
    ++files;
  }
  EXPECT_GE(files, 1);
}

TEST(Datasets, DefaultRootIsTheEnvironmentVariable) {
  // ctest sets PARALLAX_DATASETS to the source tree's datasets folder.
  const char* env = std::getenv("PARALLAX_DATASETS");
  if (env == nullptr) GTEST_SKIP() << "PARALLAX_DATASETS is not set";
  EXPECT_EQ(SpecCatalog::default_root(), fs::path(env));
}

TEST(GoodFixtures, ModelRoundTripsEveryField) {
  const fs::path path = kGood / "model_all_keys.yaml";
  const ModelSpec m = load_model_file(path);
  EXPECT_EQ(m.name, "fixture-all-keys");
  EXPECT_EQ(m.source, "test fixture, every key");
  EXPECT_EQ(m.file, path.string());
  EXPECT_EQ(m.num_layers, 6);
  EXPECT_EQ(m.hidden_size, 256);
  EXPECT_EQ(m.num_attention_heads, 8);
  EXPECT_EQ(m.num_query_groups, 2);
  EXPECT_EQ(m.kv_channels, 40);
  EXPECT_EQ(m.head_dim(), 40);
  EXPECT_EQ(m.ffn_hidden_size, 688);
  EXPECT_EQ(m.vocab_size, 5000);
  EXPECT_EQ(m.seq_length, 512);
  EXPECT_EQ(m.max_position_embeddings, 2048);
  EXPECT_EQ(m.activation, Activation::SwiGLU);
  EXPECT_EQ(m.norm, NormKind::RMSNorm);
  EXPECT_EQ(m.position, PositionKind::Rope);
  EXPECT_FALSE(m.tied_embeddings);
  EXPECT_FALSE(m.add_bias_linear);
  EXPECT_TRUE(m.add_qkv_bias);
  EXPECT_DOUBLE_EQ(m.hidden_dropout, 0.05);
  EXPECT_DOUBLE_EQ(m.attention_dropout, 0.02);
  EXPECT_DOUBLE_EQ(m.rope_theta, 500000.0);
  ASSERT_TRUE(m.is_moe());
  EXPECT_EQ(m.moe->num_experts, 16);
  EXPECT_EQ(m.moe->top_k, 4);
  EXPECT_EQ(m.moe->ffn_hidden_size, 172);
  EXPECT_DOUBLE_EQ(m.moe->capacity_factor, 1.25);
  EXPECT_EQ(m.moe->layer_freq, 2);
  // field_lines: top-level keys by name, nested ones with their map's prefix.
  EXPECT_EQ(m.field_lines.at("name"), 2);
  EXPECT_EQ(m.field_lines.at("kv_channels"), 8);
  EXPECT_EQ(m.field_lines.at("moe"), 22);
  EXPECT_EQ(m.field_lines.at("moe.top_k"), 24);
  EXPECT_EQ(m.field_lines.at("moe.layer_freq"), 27);
  EXPECT_EQ(m.field_lines.size(), 26U);  // 21 top-level keys and 5 under moe
}

TEST(GoodFixtures, ModelDefaultsFollowTheSchema) {
  const ModelSpec m = load_model_file(kGood / "model_minimal.yaml");
  EXPECT_EQ(m.num_query_groups, 6);          // = num_attention_heads
  EXPECT_EQ(m.kv_channels, 16);              // = 96 / 6
  EXPECT_EQ(m.ffn_hidden_size, 384);         // = 4 * 96
  EXPECT_EQ(m.max_position_embeddings, 128); // = seq_length
  EXPECT_FALSE(m.add_qkv_bias);
  EXPECT_DOUBLE_EQ(m.hidden_dropout, 0.0);
  EXPECT_DOUBLE_EQ(m.attention_dropout, 0.0);
  EXPECT_FALSE(m.moe.has_value());
  EXPECT_FALSE(m.field_lines.contains("kv_channels"));

  const ModelSpec moe = load_model_file(kGood / "model_moe_defaults.yaml");
  ASSERT_TRUE(moe.is_moe());
  EXPECT_EQ(moe.moe->ffn_hidden_size, 160);  // the model's ffn_hidden_size
  EXPECT_DOUBLE_EQ(moe.moe->capacity_factor, 1.0);
  EXPECT_EQ(moe.moe->layer_freq, 1);
}

TEST(GoodFixtures, PlanRoundTripsEveryField) {
  const fs::path path = kGood / "plan_all_keys.yaml";
  const PlanSpec p = load_plan_file(path);
  EXPECT_EQ(p.file, path.string());
  EXPECT_EQ(p.tensor_model_parallel_size, 2);
  EXPECT_EQ(p.pipeline_model_parallel_size, 2);
  EXPECT_EQ(p.context_parallel_size, 2);
  EXPECT_EQ(p.expert_model_parallel_size, 1);
  EXPECT_EQ(p.data_parallel_size, 2);
  EXPECT_EQ(p.micro_batch_size, 2);
  EXPECT_EQ(p.global_batch_size, 16);
  EXPECT_EQ(p.virtual_pipeline_model_parallel_size, 2);
  EXPECT_EQ(p.num_layers_per_virtual_pipeline_stage, 2);
  EXPECT_EQ(p.seq_length, 32);
  EXPECT_EQ(p.zero_stage, 2);
  EXPECT_EQ(p.schedule, PipelineSchedule::Interleaved1F1B);
  EXPECT_EQ(p.recompute, Recompute::Full);
  EXPECT_TRUE(p.sequence_parallel);
  EXPECT_TRUE(p.optimizer_offload);
  EXPECT_FALSE(p.use_flash_attn);
  EXPECT_EQ(p.precision, DType::F16);
  EXPECT_EQ(p.grad_dtype, DType::BF16);
  EXPECT_EQ(p.field_lines.at("tensor_model_parallel_size"), 3);
  EXPECT_EQ(p.field_lines.at("grad_dtype"), 20);
  EXPECT_EQ(p.field_lines.size(), 18U);

  // It is also a valid plan for the model its comment names, unchanged by resolution.
  const PlanSpec r = resolve_plan(p, catalog().model("tiny-gpt-deep"), nullptr);
  EXPECT_EQ(r.vp(), 2);
  EXPECT_EQ(r.num_layers_per_virtual_pipeline_stage, 2);
  EXPECT_EQ(r.seq_length, 32);
  EXPECT_TRUE(r.sequence_parallel);
  EXPECT_EQ(r.num_micro_batches(), 4);
}

TEST(GoodFixtures, PlanDefaultsTakeTheModelsSequence) {
  const PlanSpec p = load_plan_file(kGood / "plan_defaults.yaml");
  EXPECT_EQ(p.global_batch_size, 4);
  EXPECT_EQ(p.tp(), 1);
  EXPECT_EQ(p.schedule, PipelineSchedule::OneFOneB);
  EXPECT_EQ(p.precision, DType::BF16);
  EXPECT_EQ(p.grad_dtype, DType::F32);
  EXPECT_TRUE(p.use_flash_attn);
  EXPECT_EQ(p.seq_length, 0);
  const PlanSpec r = resolve_plan(p, catalog().model("tiny-gpt"), nullptr);
  EXPECT_EQ(r.seq_length, 64);
  EXPECT_EQ(r.num_micro_batches(), 4);
}

TEST(GoodFixtures, GpuAndInlineGpuCluster) {
  const GpuSpec g = load_gpu_file(kGood / "gpu_full.yaml");
  EXPECT_EQ(g.name, "fixture-gpu");
  EXPECT_DOUBLE_EQ(g.peak_bf16_tflops, 312);
  EXPECT_DOUBLE_EQ(g.peak_fp8_tflops, 0);
  EXPECT_DOUBLE_EQ(g.peak_fp32_tflops, 19.5);
  EXPECT_DOUBLE_EQ(g.hbm_bandwidth_gbs, 2039);

  const ClusterSpec c = catalog().cluster((kGood / "cluster_inline_gpu.yaml").string());
  EXPECT_EQ(c.name, "fixture-dragonfly");
  EXPECT_EQ(c.gpu.name, "fixture-inline-gpu");
  EXPECT_TRUE(c.gpu.source.empty());
  EXPECT_DOUBLE_EQ(c.gpu.peak_fp8_tflops, 1000);
  EXPECT_EQ(c.num_nodes, 64);
  EXPECT_EQ(c.num_gpus(), 256);
  EXPECT_EQ(c.node.nics_per_node, 4);
  EXPECT_DOUBLE_EQ(c.node.nvlink_latency_us, 0);  // omitted: default
  EXPECT_DOUBLE_EQ(c.node.nvlink_efficiency, 1.0);  // omitted: the line rate
  EXPECT_EQ(c.fabric.topology, FabricTopology::Dragonfly);
  EXPECT_DOUBLE_EQ(c.fabric.oversubscription, 2.0);
  EXPECT_EQ(c.fabric.dragonfly_groups, 8);
  EXPECT_EQ(c.fabric.dragonfly_routers_per_group, 4);
  EXPECT_EQ(c.field_lines.at("gpu.hbm_gib"), 10);
  EXPECT_EQ(c.field_lines.at("fabric.dragonfly_groups"), 26);
}

TEST(GoodFixtures, NamedGpuIsResolvedThroughTheResolver) {
  std::string asked;
  Location where;
  const GpuResolver fake = [&](const std::string& name, const Location& at) {
    asked = name;
    where = at;
    GpuSpec g;
    g.name = name;
    g.peak_bf16_tflops = 1;
    return g;
  };
  const ClusterSpec c = parse_cluster_yaml(
      "name: c\nsource: s\nnum_nodes: 1\ngpu: my-gpu\nnode: {gpus_per_node: 1, "
      "nvlink_bandwidth_gbs: 0}\n",
      "inline.yaml", fake);
  EXPECT_EQ(asked, "my-gpu");
  EXPECT_EQ(where.file, "inline.yaml");
  EXPECT_EQ(where.line, 4);
  EXPECT_EQ(where.column, 6);
  EXPECT_EQ(c.gpu.name, "my-gpu");
}

}  // namespace
}  // namespace px
