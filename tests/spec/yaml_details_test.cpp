// Corner cases of YAML reading that need no fixture file: values with no value, out-of-range and
// non-finite numbers, odd keys, case slips, and what counts as a path on the command line.
#include <gtest/gtest.h>

#include <string>

#include "engine/core/error.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

namespace px {
namespace {

// A valid model, one key per line, for tests to append to or edit.
constexpr const char* kModel =
    "name: m\n"
    "source: s\n"
    "num_layers: 2\n"
    "hidden_size: 64\n"
    "num_attention_heads: 4\n"
    "vocab_size: 256\n"
    "seq_length: 64\n"
    "activation: gelu\n"
    "normalization: layernorm\n"
    "position_embedding: learned\n"
    "tied_embeddings: true\n"
    "add_bias_linear: true\n";

std::string replaced(std::string text, const std::string& from, const std::string& to) {
  const std::size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return text.replace(at, from.size(), to);
}

// The error that parsing `text` as a model raises; fails the test when there is none.
Error model_error(const std::string& text) {
  try {
    validate_model(parse_model_yaml(text, "m.yaml"));
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "accepted:\n" << text;
  return Error(ErrorKind::Usage, {}, "none");
}

TEST(YamlDetails, TheBaseModelIsValid) {
  const ModelSpec m = parse_model_yaml(kModel, "m.yaml");
  EXPECT_NO_THROW(validate_model(m));
  EXPECT_EQ(m.file, "m.yaml");
  EXPECT_EQ(m.field_lines.at("add_bias_linear"), 12);
}

TEST(YamlDetails, KeyWithoutValue) {
  const Error e = model_error(replaced(kModel, "num_layers: 2", "num_layers:"));
  EXPECT_EQ(e.kind(), ErrorKind::Spec);
  EXPECT_EQ(e.where().line, 3);
  EXPECT_EQ(e.where().column, 1);
  EXPECT_EQ(e.message(), "num_layers has no value (expected an integer)");
}

TEST(YamlDetails, IntegerOutOfRange) {
  const Error e = model_error(replaced(kModel, "vocab_size: 256", "vocab_size: 99999999999"));
  EXPECT_EQ(e.where().line, 6);
  EXPECT_NE(e.message().find("out of range"), std::string::npos) << e.message();
}

TEST(YamlDetails, FractionForInteger) {
  const Error e = model_error(replaced(kModel, "num_layers: 2", "num_layers: 2.5"));
  EXPECT_EQ(e.message(), "num_layers must be an integer, got '2.5'");
}

TEST(YamlDetails, NonFiniteNumber) {
  const Error e = model_error(std::string(kModel) + "hidden_dropout: .nan\n");
  EXPECT_EQ(e.where().line, 13);
  EXPECT_NE(e.message().find("finite"), std::string::npos) << e.message();
}

TEST(YamlDetails, MapForScalar) {
  const Error e = model_error(replaced(kModel, "name: m", "name: {first: m}"));
  EXPECT_EQ(e.message(), "name must be a string, got a map");
  EXPECT_EQ(e.where().line, 1);
  EXPECT_EQ(e.where().column, 7);
}

TEST(YamlDetails, KeyThatIsNotAName) {
  const Error e = model_error(std::string(kModel) + "[a, b]: 1\n");
  EXPECT_NE(e.message().find("must be plain names, got a list"), std::string::npos) << e.message();
  EXPECT_EQ(e.where().line, 13);
}

TEST(YamlDetails, CaseSlipsGetSuggestions) {
  const Error key = model_error(replaced(kModel, "hidden_size", "Hidden_Size"));
  EXPECT_EQ(key.hint(), "did you mean 'hidden_size'?");
  const Error value = model_error(replaced(kModel, "activation: gelu", "activation: GELU"));
  EXPECT_NE(value.hint().find("did you mean 'gelu'?"), std::string::npos) << value.hint();
}

TEST(YamlDetails, FarOffKeyListsTheAcceptedKeys) {
  const Error e = model_error(std::string(kModel) + "learning_rate: 0.001\n");
  EXPECT_EQ(e.message(), "unknown key 'learning_rate' in model file");
  EXPECT_EQ(e.hint().rfind("accepted keys: name, source, num_layers", 0), 0U) << e.hint();
}

TEST(YamlDetails, NestedKeysOfMoeAreChecked) {
  const Error e = model_error(std::string(kModel) + "moe:\n  num_experts: 4\n  topk: 2\n");
  EXPECT_EQ(e.message(), "unknown key 'topk' in 'moe'");
  EXPECT_EQ(e.hint(), "did you mean 'top_k'?");
  EXPECT_EQ(e.where().line, 15);
  EXPECT_EQ(e.where().column, 3);
}

TEST(YamlDetails, MissingNestedKeyPointsAtItsMap) {
  const Error e = model_error(std::string(kModel) + "moe:\n  num_experts: 4\n");
  EXPECT_EQ(e.message(), "missing required key 'top_k' in 'moe'");
  EXPECT_EQ(e.where().line, 13);
}

TEST(YamlDetails, ScalarRootAndEmptyText) {
  try {
    parse_plan_yaml("just words", "p.yaml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Spec);
    EXPECT_EQ(e.message(), "the top level of a plan file must be a map of keys, got a value");
  }
  try {
    parse_plan_yaml("", "p.yaml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Spec);
    EXPECT_EQ(e.message(), "empty plan file: it holds no keys");
    EXPECT_EQ(std::string(e.what()).rfind("p.yaml:1: spec error: empty plan file", 0), 0U);
  }
}

TEST(YamlDetails, ParseErrorsKeepLineColumnAndOffset) {
  try {
    parse_gpu_yaml("name: g\npeak_bf16_tflops: {1\n", "g.yaml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Parse);
    EXPECT_EQ(e.where().file, "g.yaml");
    EXPECT_GT(e.where().line, 0);
    EXPECT_GT(e.where().column, 0);
    EXPECT_GE(e.where().byte_offset, 0);
    EXPECT_EQ(e.message(), "end of map flow not found");
  }
}

TEST(YamlDetails, InlineGpuKeysAreCheckedAndLocated) {
  const std::string cluster =
      "name: c\n"
      "source: s\n"
      "num_nodes: 1\n"
      "gpu:\n"
      "  name: g\n"
      "  peak_bf16_tflop: 1\n"
      "node: {gpus_per_node: 1, nvlink_bandwidth_gbs: 0}\n";
  const GpuResolver unused = [](const std::string&, const Location&) -> GpuSpec {
    ADD_FAILURE() << "an inline GPU needs no resolving";
    return {};
  };
  try {
    parse_cluster_yaml(cluster, "c.yaml", unused);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.message(), "unknown key 'peak_bf16_tflop' in 'gpu'");
    EXPECT_EQ(e.hint(), "did you mean 'peak_bf16_tflops'?");
    EXPECT_EQ(e.where().line, 6);
  }
}

TEST(YamlDetails, GpuValidationPointsAtTheClusterLine) {
  const std::string cluster =
      "name: c\n"
      "source: s\n"
      "num_nodes: 1\n"
      "gpu:\n"
      "  name: g\n"
      "  peak_bf16_tflops: 100\n"
      "  peak_fp16_tflops: 100\n"
      "  peak_fp8_tflops: 0\n"
      "  peak_fp32_tflops: 10\n"
      "  hbm_gib: 0\n"
      "  hbm_bandwidth_gbs: 1000\n"
      "  nvlink_bandwidth_gbs: 0\n"
      "node: {gpus_per_node: 1, nvlink_bandwidth_gbs: 0}\n";
  const ClusterSpec c = parse_cluster_yaml(cluster, "c.yaml", nullptr);
  try {
    validate_cluster(c);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.message(), "gpu.hbm_gib must be > 0, got 0");
    EXPECT_EQ(e.where().file, "c.yaml");
    EXPECT_EQ(e.where().line, 10);
  }
}

TEST(YamlDetails, CodeBuiltSpecsReportWithoutAPlace) {
  GpuSpec g;
  g.name = "g";
  try {
    validate_gpu(g);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "spec error: peak_bf16_tflops must be > 0, got 0");
  }
}

TEST(YamlDetails, WhatLooksLikeAPath) {
  EXPECT_FALSE(looks_like_path("gpt3-175b"));
  EXPECT_FALSE(looks_like_path("llama3.1-405b"));
  EXPECT_TRUE(looks_like_path("gpt3-175b.yaml"));
  EXPECT_TRUE(looks_like_path("x.yml"));
  EXPECT_TRUE(looks_like_path("./gpt3-175b"));
  EXPECT_TRUE(looks_like_path("/abs/model"));
  const SpecCatalog c{"/data"};
  EXPECT_EQ(c.model_path("gpt3-175b"), std::filesystem::path("/data/models/gpt3-175b.yaml"));
  EXPECT_EQ(c.cluster_path("x/y.yaml"), std::filesystem::path("x/y.yaml"));
  EXPECT_EQ(c.plan_path("p"), std::filesystem::path("/data/plans/p.yaml"));
  EXPECT_EQ(c.gpu_path("h100-sxm"), std::filesystem::path("/data/gpus/h100-sxm.yaml"));
}

}  // namespace
}  // namespace px
