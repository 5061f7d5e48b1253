// YAML spec files via yaml-cpp. Every key is checked against the schema (unknown keys get a spelling
// suggestion), every value against its type, and every error carries yaml-cpp's mark as 1-based
// file:line:column, so a typo in a 10,000-GPU cluster file is found in one step.
#include "engine/spec/spec_yaml.hpp"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <tuple>
#include <utility>

#include "engine/spec/validate.hpp"

#ifndef PX_DEFAULT_DATASETS_DIR
#define PX_DEFAULT_DATASETS_DIR "datasets"
#endif

namespace px {
namespace {

namespace fs = std::filesystem;
using FieldLines = std::map<std::string, int, std::less<>>;

constexpr std::string_view kModelKeys[] = {
    "name", "source", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "ffn_hidden_size", "vocab_size", "seq_length", "max_position_embeddings",
    "activation", "normalization", "position_embedding", "tied_embeddings", "add_bias_linear",
    "add_qkv_bias", "hidden_dropout", "attention_dropout", "rope_theta", "moe"};
constexpr std::string_view kModelRequired[] = {
    "name", "source", "num_layers", "hidden_size", "num_attention_heads", "vocab_size",
    "seq_length", "activation", "normalization", "position_embedding", "tied_embeddings",
    "add_bias_linear"};
constexpr std::string_view kMoEKeys[] = {"num_experts", "top_k", "ffn_hidden_size",
                                         "capacity_factor", "layer_freq"};
constexpr std::string_view kMoERequired[] = {"num_experts", "top_k"};

constexpr std::string_view kGpuKeys[] = {
    "name", "source", "peak_bf16_tflops", "peak_fp16_tflops", "peak_fp8_tflops",
    "peak_fp32_tflops", "hbm_gib", "hbm_bandwidth_gbs", "nvlink_bandwidth_gbs", "sms", "gemm_measured"};
// `sms` and `gemm_measured` are optional: without them the simulator costs GEMMs at a flat efficiency.
constexpr std::string_view kGpuRequired[] = {
    "name", "source", "peak_bf16_tflops", "peak_fp16_tflops", "peak_fp8_tflops",
    "peak_fp32_tflops", "hbm_gib", "hbm_bandwidth_gbs", "nvlink_bandwidth_gbs"};
constexpr std::string_view kGemmMeasuredKeys[] = {"tflops", "m", "n", "k"};
// A GPU written inline in a cluster file may leave its citation to the cluster's `source`.
constexpr std::string_view kGpuInlineRequired[] = {
    "name", "peak_bf16_tflops", "peak_fp16_tflops", "peak_fp8_tflops", "peak_fp32_tflops",
    "hbm_gib", "hbm_bandwidth_gbs", "nvlink_bandwidth_gbs"};

constexpr std::string_view kClusterKeys[] = {"name", "source", "gpu", "num_nodes", "node", "fabric"};
constexpr std::string_view kClusterRequired[] = {"name", "source", "gpu", "num_nodes", "node"};
constexpr std::string_view kNodeKeys[] = {"gpus_per_node", "nvlink_bandwidth_gbs", "nvlink_efficiency",
                                          "nvlink_latency_us", "nics_per_node",
                                          "nic_bandwidth_gbps", "nic_latency_us",
                                          "pcie_bandwidth_gbs"};
constexpr std::string_view kNodeRequired[] = {"gpus_per_node", "nvlink_bandwidth_gbs"};
constexpr std::string_view kFabricKeys[] = {
    "topology", "nodes_per_leaf_group", "leaf_radix", "spine_radix", "oversubscription",
    "switch_latency_us", "dragonfly_groups", "dragonfly_routers_per_group"};
constexpr std::string_view kFabricRequired[] = {"topology"};

constexpr std::string_view kPlanKeys[] = {
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "expert_model_parallel_size", "data_parallel_size", "micro_batch_size", "global_batch_size",
    "virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage", "seq_length",
    "zero_stage", "pipeline_schedule", "recompute", "sequence_parallel", "optimizer_offload",
    "overlap_param_gather", "tp_comm_overlap", "use_flash_attn", "precision", "grad_dtype"};

constexpr Activation kActivations[] = {Activation::Gelu, Activation::SwiGLU};
constexpr NormKind kNorms[] = {NormKind::LayerNorm, NormKind::RMSNorm};
constexpr PositionKind kPositions[] = {PositionKind::Learned, PositionKind::Rope};
constexpr FabricTopology kTopologies[] = {FabricTopology::RailOptimizedFatTree,
                                          FabricTopology::FatTree, FabricTopology::Dragonfly};
constexpr PipelineSchedule kSchedules[] = {PipelineSchedule::GPipe, PipelineSchedule::OneFOneB,
                                           PipelineSchedule::Interleaved1F1B,
                                           PipelineSchedule::ZeroBubble};
constexpr Recompute kRecomputes[] = {Recompute::None, Recompute::Selective, Recompute::Full};
constexpr DType kDTypes[] = {DType::F32, DType::BF16, DType::F16, DType::FP8};

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Levenshtein distance, case-insensitive: "Hiden_Size" is one edit from "hidden_size".
std::size_t edit_distance(std::string_view a_in, std::string_view b_in) {
  const std::string a = lower(a_in);
  const std::string b = lower(b_in);
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

bool starts_with_either(std::string_view a, std::string_view b) {
  const std::string la = lower(a);
  const std::string lb = lower(b);
  return !la.empty() && !lb.empty() && (la.starts_with(lb) || lb.starts_with(la));
}

// The words of a name: "tensor_parallel_size" -> tensor, parallel, size.
std::vector<std::string> words(std::string_view name) {
  std::vector<std::string> out;
  std::string word;
  for (char ch : lower(name)) {
    if (ch == '_' || ch == '-' || ch == '.') {
      if (!word.empty()) out.push_back(std::exchange(word, {}));
    } else {
      word += ch;
    }
  }
  if (!word.empty()) out.push_back(word);
  return out;
}

// Candidates ordered by how many of the word's words they lack, then by edit distance, then by name,
// at most `max_count` of them. With `close_only`, only plausible misspellings: a few edits away, a
// shortening ("interleaved" for "interleaved-1f1b"), or all the same words and more
// ("tensor_parallel_size" for "tensor_model_parallel_size").
std::vector<std::string> closest(std::string_view word, std::span<const std::string> candidates,
                                 std::size_t max_count, bool close_only) {
  const std::vector<std::string> parts = words(word);
  const std::size_t near = std::max<std::size_t>(2, word.size() / 3);
  std::vector<std::tuple<std::size_t, std::size_t, std::string>> scored;
  for (const std::string& c : candidates) {
    const std::vector<std::string> theirs = words(c);
    const auto lacking = static_cast<std::size_t>(std::count_if(
        parts.begin(), parts.end(), [&](const std::string& w) {
          return std::find(theirs.begin(), theirs.end(), w) == theirs.end();
        }));
    const std::size_t d = edit_distance(word, c);
    const bool plausible =
        d <= near || starts_with_either(word, c) || (parts.size() >= 2 && lacking == 0);
    if (!close_only || plausible) scored.emplace_back(lacking, d, c);
  }
  std::sort(scored.begin(), scored.end());
  std::vector<std::string> out;
  for (std::size_t i = 0; i < scored.size() && i < max_count; ++i) {
    out.push_back(std::get<2>(scored[i]));
  }
  return out;
}

std::string quoted_list(std::span<const std::string> names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "'" : ", '") + n + "'";
  return out;
}

std::string join(std::span<const std::string_view> names) {
  std::string out;
  for (std::string_view n : names) out += (out.empty() ? "" : ", ") + std::string(n);
  return out;
}

Location at(const std::string& file, const YAML::Mark& mark) {
  if (mark.is_null()) return Location{file, 0, 0, -1};
  return Location{file, mark.line + 1, mark.column + 1, mark.pos};
}

std::string_view describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a map";
    case YAML::NodeType::Scalar: return "a value";
    default: return "nothing";
  }
}

// yaml-cpp reports a tab in indentation under several unrelated messages ("illegal map value", ...);
// pointing at the tab itself is the useful answer.
std::optional<Location> indentation_tab(std::string_view text, const std::string& file,
                                        int last_line) {
  int line = 0;
  std::size_t start = 0;
  while (start <= text.size() && line <= last_line) {
    const std::size_t end = std::min(text.find('\n', start), text.size());
    for (std::size_t i = start; i < end && (text[i] == ' ' || text[i] == '\t'); ++i) {
      if (text[i] == '\t') {
        return Location{file, line + 1, static_cast<int>(i - start) + 1,
                        static_cast<std::int64_t>(i)};
      }
    }
    start = end + 1;
    ++line;
  }
  return std::nullopt;
}

// yaml-cpp's messages name the symptom; the usual causes, for the common ones.
std::string parse_hint(const std::string& message) {
  if (message == YAML::ErrorMsg::END_OF_SEQ_FLOW) return "a '[' above is never closed by ']'";
  if (message == YAML::ErrorMsg::END_OF_MAP_FLOW) return "a '{' above is never closed by '}'";
  if (message == YAML::ErrorMsg::END_OF_SEQ || message == YAML::ErrorMsg::END_OF_MAP ||
      message == YAML::ErrorMsg::BLOCK_ENTRY) {
    return "check the indentation of this line against the lines above";
  }
  if (message == YAML::ErrorMsg::MAP_VALUE) {
    return "check the indentation: this line may sit under a key that already has a value, or a "
           "value holds ': ' and needs quotes";
  }
  return {};
}

// The single YAML document of a spec file, whose root must be a map.
YAML::Node load_root(std::string_view text, const std::string& file, std::string_view what) {
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(std::string(text));
  } catch (const YAML::Exception& e) {
    if (auto tab = indentation_tab(text, file, e.mark.is_null() ? INT_MAX : e.mark.line + 1)) {
      throw Error(ErrorKind::Parse, *tab, "tab character in indentation",
                  "YAML indents with spaces only");
    }
    throw Error(ErrorKind::Parse, at(file, e.mark), e.msg, parse_hint(e.msg));
  }
  if (docs.empty() || docs.front().IsNull()) {
    throw Error(ErrorKind::Spec, Location{file, 1, 0, 0},
                fmt::format("empty {} file: it holds no keys", what),
                "see datasets/README.md for the schema");
  }
  if (docs.size() > 1) {
    throw Error(ErrorKind::Spec, at(file, docs[1].Mark()),
                fmt::format("a {} file holds one YAML document, this one holds {}", what,
                            docs.size()),
                "remove the second '---' and what follows it");
  }
  const YAML::Node& root = docs.front();
  if (!root.IsMap()) {
    throw Error(ErrorKind::Spec, at(file, root.Mark()),
                fmt::format("the top level of a {} file must be a map of keys, got {}", what,
                            describe(root)),
                "write one 'key: value' per line");
  }
  return root;
}

// One YAML map checked against its schema: keys known and unique, values of the right type. The line
// of every key goes into `lines` under `prefix` + key ("moe.top_k").
class MapReader {
 public:
  MapReader(const YAML::Node& map, std::string file, std::string prefix,
            std::span<const std::string_view> keys, FieldLines& lines, std::string what,
            Location missing_at)
      : file_(std::move(file)),
        prefix_(std::move(prefix)),
        what_(std::move(what)),
        missing_at_(std::move(missing_at)),
        lines_(lines) {
    for (const auto& entry : map) {
      const YAML::Node& key = entry.first;
      if (!key.IsScalar()) {
        throw Error(ErrorKind::Spec, at(file_, key.Mark()),
                    fmt::format("keys of {} must be plain names, got {}", what_, describe(key)));
      }
      const std::string& name = key.Scalar();
      if (std::find(keys.begin(), keys.end(), name) == keys.end()) {
        const std::vector<std::string> known(keys.begin(), keys.end());
        const std::vector<std::string> near = closest(name, known, 1, true);
        throw Error(ErrorKind::Spec, at(file_, key.Mark()),
                    fmt::format("unknown key '{}' in {}", name, what_),
                    near.empty() ? "accepted keys: " + join(keys)
                                 : fmt::format("did you mean '{}'?", near.front()));
      }
      if (auto seen = entries_.find(name); seen != entries_.end()) {
        throw Error(ErrorKind::Spec, at(file_, key.Mark()),
                    fmt::format("duplicate key '{}' in {} (first set on line {})", name, what_,
                                seen->second.first.Mark().line + 1),
                    "keep one of them");
      }
      entries_.emplace(name, std::make_pair(key, entry.second));
      lines_[prefix_ + name] = key.Mark().line + 1;
    }
  }

  bool has(std::string_view key) const { return entries_.find(key) != entries_.end(); }

  void require(std::span<const std::string_view> keys) const {
    for (std::string_view key : keys) {
      if (!has(key)) {
        throw Error(ErrorKind::Spec, missing_at_,
                    fmt::format("missing required key '{}' in {}", key, what_),
                    "required keys: " + join(keys));
      }
    }
  }

  bool read(std::string_view key, int& out) const {
    const YAML::Node* v = scalar(key, "an integer");
    if (v == nullptr) return false;
    long long parsed = 0;
    if (!YAML::convert<long long>::decode(*v, parsed)) type_error(key, *v, "an integer");
    if (parsed < INT_MIN || parsed > INT_MAX) {
      throw Error(ErrorKind::Spec, at(file_, v->Mark()),
                  fmt::format("{} {} is out of range for an integer", name(key), v->Scalar()));
    }
    out = static_cast<int>(parsed);
    return true;
  }

  bool read(std::string_view key, double& out) const {
    const YAML::Node* v = scalar(key, "a number");
    if (v == nullptr) return false;
    double parsed = 0;
    if (!YAML::convert<double>::decode(*v, parsed)) type_error(key, *v, "a number");
    if (!std::isfinite(parsed)) {
      throw Error(ErrorKind::Spec, at(file_, v->Mark()),
                  fmt::format("{} must be a finite number, got '{}'", name(key), v->Scalar()));
    }
    out = parsed;
    return true;
  }

  bool read(std::string_view key, bool& out) const {
    const YAML::Node* v = scalar(key, "true or false");
    if (v == nullptr) return false;
    if (!YAML::convert<bool>::decode(*v, out)) type_error(key, *v, "true or false");
    return true;
  }

  bool read(std::string_view key, std::string& out) const {
    const YAML::Node* v = value(key, "a string");
    if (v == nullptr) return false;
    if (!v->IsScalar()) {
      throw Error(ErrorKind::Spec, at(file_, v->Mark()),
                  fmt::format("{} must be a string, got {}", name(key), describe(*v)));
    }
    out = v->Scalar();
    return true;
  }

  // Enum values are spelled as the to_string() of each enumerator.
  template <class E>
  bool read_enum(std::string_view key, E& out, std::span<const E> values) const {
    std::string text;
    if (!read(key, text)) return false;
    std::vector<std::string> names;
    for (E e : values) {
      names.emplace_back(to_string(e));
      if (names.back() == text) {
        out = e;
        return true;
      }
    }
    const std::vector<std::string> near = closest(text, names, 1, true);
    throw Error(ErrorKind::Spec, at(file_, entries_.find(key)->second.second.Mark()),
                fmt::format("unknown {} '{}'", name(key), text),
                (near.empty() ? std::string() : fmt::format("did you mean '{}'? ", near.front())) +
                    "accepted values: " + quoted_list(names));
  }

  // The map under `key`, read with its own schema; nullopt when the key is absent.
  std::optional<MapReader> sub(std::string_view key, std::span<const std::string_view> keys) const {
    const YAML::Node* v = value(key, "a map");
    if (v == nullptr) return std::nullopt;
    if (!v->IsMap()) {
      throw Error(ErrorKind::Spec, at(file_, v->Mark()),
                  fmt::format("{} must be a map of keys, got {}", name(key), describe(*v)),
                  "accepted keys: " + join(keys));
    }
    return MapReader(*v, file_, prefix_ + std::string(key) + ".", keys, lines_,
                     fmt::format("'{}'", name(key)), key_at(key));
  }

  const YAML::Node& node(std::string_view key) const { return entries_.find(key)->second.second; }
  Location key_at(std::string_view key) const {
    return at(file_, entries_.find(key)->second.first.Mark());
  }
  Location value_at(std::string_view key) const { return at(file_, node(key).Mark()); }
  const std::string& prefix() const { return prefix_; }

 private:
  std::string name(std::string_view key) const { return prefix_ + std::string(key); }

  // The value of a present key, nullptr when the key is absent; a key with no value is an error.
  const YAML::Node* value(std::string_view key, std::string_view expected) const {
    auto it = entries_.find(key);
    if (it == entries_.end()) return nullptr;
    const YAML::Node& v = it->second.second;
    if (v.IsNull()) {
      throw Error(ErrorKind::Spec, at(file_, it->second.first.Mark()),
                  fmt::format("{} has no value (expected {})", name(key), expected));
    }
    return &v;
  }

  const YAML::Node* scalar(std::string_view key, std::string_view expected) const {
    const YAML::Node* v = value(key, expected);
    if (v == nullptr) return nullptr;
    if (!v->IsScalar()) {
      throw Error(ErrorKind::Spec, at(file_, v->Mark()),
                  fmt::format("{} must be {}, got {}", name(key), expected, describe(*v)));
    }
    // A quoted scalar is a string in YAML, whatever it spells.
    if (v->Tag() == "!") {
      throw Error(ErrorKind::Spec, at(file_, v->Mark()),
                  fmt::format("{} must be {}, got the quoted string \"{}\"", name(key), expected,
                              v->Scalar()),
                  "write it without quotes");
    }
    return v;
  }

  [[noreturn]] void type_error(std::string_view key, const YAML::Node& v,
                               std::string_view expected) const {
    throw Error(ErrorKind::Spec, at(file_, v.Mark()),
                fmt::format("{} must be {}, got '{}'", name(key), expected, v.Scalar()));
  }

  std::string file_;
  std::string prefix_;
  std::string what_;
  Location missing_at_;
  FieldLines& lines_;
  std::map<std::string, std::pair<YAML::Node, YAML::Node>, std::less<>> entries_;
};

MapReader root_reader(const YAML::Node& root, const std::string& file,
                      std::span<const std::string_view> keys, FieldLines& lines,
                      std::string_view what) {
  return MapReader(root, file, "", keys, lines, fmt::format("{} file", what), at(file, root.Mark()));
}

// `value` times `factor`, or 0 when that would not fit an int (validation then reports the 0).
int scaled(int value, int factor) {
  const long long product = static_cast<long long>(value) * factor;
  return product > INT_MAX || product < INT_MIN ? 0 : static_cast<int>(product);
}

ModelSpec model_from(const YAML::Node& root, const std::string& file) {
  ModelSpec m;
  m.file = file;
  const MapReader r = root_reader(root, file, kModelKeys, m.field_lines, "model");
  r.require(kModelRequired);
  r.read("name", m.name);
  r.read("source", m.source);
  r.read("num_layers", m.num_layers);
  r.read("hidden_size", m.hidden_size);
  r.read("num_attention_heads", m.num_attention_heads);
  if (!r.read("num_query_groups", m.num_query_groups)) m.num_query_groups = m.num_attention_heads;
  // Left 0 when hidden_size does not split evenly over the heads: validate_model reports that.
  if (!r.read("kv_channels", m.kv_channels) && m.num_attention_heads > 0 &&
      m.hidden_size % m.num_attention_heads == 0) {
    m.kv_channels = m.hidden_size / m.num_attention_heads;
  }
  if (!r.read("ffn_hidden_size", m.ffn_hidden_size)) m.ffn_hidden_size = scaled(m.hidden_size, 4);
  r.read("vocab_size", m.vocab_size);
  r.read("seq_length", m.seq_length);
  if (!r.read("max_position_embeddings", m.max_position_embeddings)) {
    m.max_position_embeddings = m.seq_length;
  }
  r.read_enum<Activation>("activation", m.activation, kActivations);
  r.read_enum<NormKind>("normalization", m.norm, kNorms);
  r.read_enum<PositionKind>("position_embedding", m.position, kPositions);
  r.read("tied_embeddings", m.tied_embeddings);
  r.read("add_bias_linear", m.add_bias_linear);
  r.read("add_qkv_bias", m.add_qkv_bias);
  r.read("hidden_dropout", m.hidden_dropout);
  r.read("attention_dropout", m.attention_dropout);
  r.read("rope_theta", m.rope_theta);
  if (const std::optional<MapReader> moe = r.sub("moe", kMoEKeys)) {
    moe->require(kMoERequired);
    MoESpec e;
    e.ffn_hidden_size = m.ffn_hidden_size;
    moe->read("num_experts", e.num_experts);
    moe->read("top_k", e.top_k);
    moe->read("ffn_hidden_size", e.ffn_hidden_size);
    moe->read("capacity_factor", e.capacity_factor);
    moe->read("layer_freq", e.layer_freq);
    m.moe = e;
  }
  return m;
}

GpuSpec gpu_from(const MapReader& r, std::span<const std::string_view> required) {
  r.require(required);
  GpuSpec g;
  r.read("name", g.name);
  r.read("source", g.source);
  r.read("peak_bf16_tflops", g.peak_bf16_tflops);
  r.read("peak_fp16_tflops", g.peak_fp16_tflops);
  r.read("peak_fp8_tflops", g.peak_fp8_tflops);
  r.read("peak_fp32_tflops", g.peak_fp32_tflops);
  r.read("hbm_gib", g.hbm_gib);
  r.read("hbm_bandwidth_gbs", g.hbm_bandwidth_gbs);
  r.read("nvlink_bandwidth_gbs", g.nvlink_bandwidth_gbs);
  r.read("sms", g.sms);
  if (const auto gemm = r.sub("gemm_measured", kGemmMeasuredKeys)) {
    gemm->require(kGemmMeasuredKeys);
    gemm->read("tflops", g.gemm_measured.tflops);
    gemm->read("m", g.gemm_measured.m);
    gemm->read("n", g.gemm_measured.n);
    gemm->read("k", g.gemm_measured.k);
  }
  return g;
}

GpuSpec gpu_from_text(std::string_view text, const std::string& file, FieldLines& lines) {
  const YAML::Node root = load_root(text, file, "GPU");
  return gpu_from(root_reader(root, file, kGpuKeys, lines, "GPU"), kGpuRequired);
}

ClusterSpec cluster_from(const YAML::Node& root, const std::string& file,
                         const GpuResolver& resolve_gpu) {
  ClusterSpec c;
  c.file = file;
  const MapReader r = root_reader(root, file, kClusterKeys, c.field_lines, "cluster");
  r.require(kClusterRequired);
  r.read("name", c.name);
  r.read("source", c.source);
  r.read("num_nodes", c.num_nodes);
  const YAML::Node& gpu = r.node("gpu");
  if (gpu.IsMap()) {
    c.gpu = gpu_from(*r.sub("gpu", kGpuKeys), kGpuInlineRequired);
  } else if (gpu.IsScalar()) {
    std::string gpu_name;
    r.read("gpu", gpu_name);
    c.gpu = resolve_gpu(gpu_name, r.value_at("gpu"));
  } else {
    throw Error(ErrorKind::Spec, gpu.IsNull() ? r.key_at("gpu") : r.value_at("gpu"),
                fmt::format("gpu must be a GPU name or a map of GPU keys, got {}", describe(gpu)),
                "e.g. 'gpu: h100-sxm', a file stem in datasets/gpus/");
  }
  if (const std::optional<MapReader> node = r.sub("node", kNodeKeys)) {
    node->require(kNodeRequired);
    NodeSpec& n = c.node;
    node->read("gpus_per_node", n.gpus_per_node);
    node->read("nvlink_bandwidth_gbs", n.nvlink_bandwidth_gbs);
    node->read("nvlink_efficiency", n.nvlink_efficiency);
    node->read("nvlink_latency_us", n.nvlink_latency_us);
    node->read("nics_per_node", n.nics_per_node);
    node->read("nic_bandwidth_gbps", n.nic_bandwidth_gbps);
    node->read("nic_latency_us", n.nic_latency_us);
    node->read("pcie_bandwidth_gbs", n.pcie_bandwidth_gbs);
  }
  if (const std::optional<MapReader> fabric = r.sub("fabric", kFabricKeys)) {
    fabric->require(kFabricRequired);
    FabricSpec& f = c.fabric;
    fabric->read_enum<FabricTopology>("topology", f.topology, kTopologies);
    fabric->read("nodes_per_leaf_group", f.nodes_per_leaf_group);
    fabric->read("leaf_radix", f.leaf_radix);
    fabric->read("spine_radix", f.spine_radix);
    fabric->read("oversubscription", f.oversubscription);
    fabric->read("switch_latency_us", f.switch_latency_us);
    fabric->read("dragonfly_groups", f.dragonfly_groups);
    fabric->read("dragonfly_routers_per_group", f.dragonfly_routers_per_group);
  }
  return c;
}

PlanSpec plan_from(const YAML::Node& root, const std::string& file) {
  PlanSpec p;
  p.file = file;
  const MapReader r = root_reader(root, file, kPlanKeys, p.field_lines, "plan");
  r.read("tensor_model_parallel_size", p.tensor_model_parallel_size);
  r.read("pipeline_model_parallel_size", p.pipeline_model_parallel_size);
  r.read("context_parallel_size", p.context_parallel_size);
  r.read("expert_model_parallel_size", p.expert_model_parallel_size);
  r.read("data_parallel_size", p.data_parallel_size);
  r.read("micro_batch_size", p.micro_batch_size);
  r.read("global_batch_size", p.global_batch_size);
  r.read("virtual_pipeline_model_parallel_size", p.virtual_pipeline_model_parallel_size);
  r.read("num_layers_per_virtual_pipeline_stage", p.num_layers_per_virtual_pipeline_stage);
  r.read("seq_length", p.seq_length);
  r.read("zero_stage", p.zero_stage);
  r.read_enum<PipelineSchedule>("pipeline_schedule", p.schedule, kSchedules);
  r.read_enum<Recompute>("recompute", p.recompute, kRecomputes);
  r.read("sequence_parallel", p.sequence_parallel);
  r.read("optimizer_offload", p.optimizer_offload);
  r.read("overlap_param_gather", p.overlap_param_gather);
  r.read("tp_comm_overlap", p.tp_comm_overlap);
  r.read("use_flash_attn", p.use_flash_attn);
  r.read_enum<DType>("precision", p.precision, kDTypes);
  r.read_enum<DType>("grad_dtype", p.grad_dtype, kDTypes);
  return p;
}

// Stems of the *.yaml files directly in `dir`, sorted; none when the folder does not exist.
std::vector<std::string> yaml_stems(const fs::path& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->path().extension() == ".yaml" && it->is_regular_file(ec)) {
      names.push_back(it->path().stem().string());
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

// The file a catalog name leads to, or NotFound naming the closest names in that folder.
fs::path existing_entry(const fs::path& dir, const std::string& name, std::string_view kind,
                        const Location& where) {
  fs::path path = dir / (name + ".yaml");
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) return path;
  const std::vector<std::string> names = yaml_stems(dir);
  Location loc = where;
  if (loc.file.empty()) loc.file = dir.string();
  const std::vector<std::string> near = closest(name, names, 3, false);
  throw Error(ErrorKind::NotFound, loc, fmt::format("unknown {} '{}'", kind, name),
              names.empty() ? fmt::format("there are no {} files in {}", kind, dir.string())
                            : fmt::format("closest: {}; all {} files are in {}", quoted_list(near),
                                          kind, dir.string()));
}

GpuResolver resolver_in(fs::path gpus_dir) {
  return [dir = std::move(gpus_dir)](const std::string& name, const Location& where) {
    return load_gpu_file(existing_entry(dir, name, "GPU", where));
  };
}

}  // namespace

ModelSpec parse_model_yaml(std::string_view text, const std::string& file_label) {
  return model_from(load_root(text, file_label, "model"), file_label);
}

GpuSpec parse_gpu_yaml(std::string_view text, const std::string& file_label) {
  FieldLines lines;
  return gpu_from_text(text, file_label, lines);
}

ClusterSpec parse_cluster_yaml(std::string_view text, const std::string& file_label,
                               const GpuResolver& resolve_gpu) {
  return cluster_from(load_root(text, file_label, "cluster"), file_label, resolve_gpu);
}

PlanSpec parse_plan_yaml(std::string_view text, const std::string& file_label) {
  return plan_from(load_root(text, file_label, "plan"), file_label);
}

std::string read_spec_file(const fs::path& path) {
  const std::string file = path.string();
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    throw Error(ErrorKind::Io, Location{file}, "no such file",
                "check the path, or give a name from the datasets folder");
  }
  if (fs::is_directory(path, ec)) {
    throw Error(ErrorKind::Io, Location{file}, "is a directory, not a spec file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Error(ErrorKind::Io, Location{file},
                fmt::format("cannot open for reading: {}", std::strerror(errno)));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw Error(ErrorKind::Io, Location{file}, "read failed");
  return text.str();
}

ModelSpec load_model_file(const fs::path& path) {
  ModelSpec m = parse_model_yaml(read_spec_file(path), path.string());
  validate_model(m);
  return m;
}

GpuSpec load_gpu_file(const fs::path& path) {
  const std::string file = path.string();
  FieldLines lines;
  GpuSpec g = gpu_from_text(read_spec_file(path), file, lines);
  validate_gpu(g, FieldSite{file, &lines, ""});
  return g;
}

ClusterSpec load_cluster_file(const fs::path& path) {
  return load_cluster_file(path, resolver_in(fs::absolute(path).parent_path().parent_path() / "gpus"));
}

ClusterSpec load_cluster_file(const fs::path& path, const GpuResolver& resolve_gpu) {
  ClusterSpec c = parse_cluster_yaml(read_spec_file(path), path.string(), resolve_gpu);
  validate_cluster(c);
  return c;
}

PlanSpec load_plan_file(const fs::path& path) {
  return parse_plan_yaml(read_spec_file(path), path.string());
}

LayerTimesSpec load_layer_times_file(const fs::path& path) {
  static constexpr std::string_view kKeys[] = {"source", "model", "cluster", "runs"};
  static constexpr std::string_view kRunKeys[] = {"plan", "forward_ms", "backward_ms"};
  LayerTimesSpec t;
  t.file = path.string();
  const YAML::Node root = load_root(read_spec_file(path), t.file, "layer times");
  FieldLines lines;
  const MapReader r = root_reader(root, t.file, kKeys, lines, "layer times");
  r.require(kKeys);
  r.read("source", t.source);
  r.read("model", t.model);
  r.read("cluster", t.cluster);
  const YAML::Node& runs = r.node("runs");
  if (!runs.IsSequence() || runs.size() == 0)
    throw Error(ErrorKind::Spec, r.value_at("runs"), fmt::format("runs must be a list of measured runs, got {}", describe(runs)),
                "e.g. runs: [{plan: gpt-22b-tp8-selective-sp, forward_ms: 7.2, backward_ms: 13.1}]");
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const YAML::Node& run = runs[i];
    const std::string where = fmt::format("runs[{}]", i);
    if (!run.IsMap())
      throw Error(ErrorKind::Spec, at(t.file, run.Mark()), fmt::format("{} must be a map of keys, got {}", where, describe(run)),
                  "accepted keys: " + join(kRunKeys));
    const MapReader m(run, t.file, where + ".", kRunKeys, lines, where, at(t.file, run.Mark()));
    m.require(kRunKeys);
    LayerTimesSpec::Run one;
    one.line = run.Mark().line + 1;
    m.read("plan", one.plan);
    m.read("forward_ms", one.forward_ms);
    m.read("backward_ms", one.backward_ms);
    for (const auto& [key, ms] : {std::pair{"forward_ms", one.forward_ms}, std::pair{"backward_ms", one.backward_ms}})
      if (!(ms > 0)) throw Error(ErrorKind::Spec, m.value_at(key), fmt::format("{}.{} must be > 0, got {}", where, key, ms));
    t.runs.push_back(std::move(one));
  }
  return t;
}

bool looks_like_path(std::string_view name_or_path) {
  const auto ends_with = [&](std::string_view tail) {
    return name_or_path.size() >= tail.size() &&
           name_or_path.substr(name_or_path.size() - tail.size()) == tail;
  };
  return name_or_path.find('/') != std::string_view::npos || ends_with(".yaml") ||
         ends_with(".yml");
}

SpecCatalog::SpecCatalog(fs::path datasets_root) : root_(std::move(datasets_root)) {}

fs::path SpecCatalog::default_root() {
  const char* env = std::getenv("PARALLAX_DATASETS");
  if (env != nullptr && *env != '\0') return fs::path(env);
  return fs::path(PX_DEFAULT_DATASETS_DIR);
}

namespace {
fs::path entry_path(const fs::path& root, std::string_view folder, const std::string& name) {
  if (looks_like_path(name)) return fs::path(name);
  return root / folder / (name + ".yaml");
}

// A path is read as given (a missing one is Io); a name must exist in its folder (else NotFound).
fs::path lookup(const fs::path& root, std::string_view folder, std::string_view kind,
                const std::string& name) {
  if (looks_like_path(name)) return fs::path(name);
  return existing_entry(root / folder, name, kind, Location{});
}
}  // namespace

fs::path SpecCatalog::model_path(const std::string& n) const { return entry_path(root_, "models", n); }
fs::path SpecCatalog::cluster_path(const std::string& n) const {
  return entry_path(root_, "clusters", n);
}
fs::path SpecCatalog::gpu_path(const std::string& n) const { return entry_path(root_, "gpus", n); }
fs::path SpecCatalog::plan_path(const std::string& n) const { return entry_path(root_, "plans", n); }

ModelSpec SpecCatalog::model(const std::string& name_or_path) const {
  return load_model_file(lookup(root_, "models", "model", name_or_path));
}

ClusterSpec SpecCatalog::cluster(const std::string& name_or_path) const {
  return load_cluster_file(lookup(root_, "clusters", "cluster", name_or_path), gpu_resolver());
}

GpuSpec SpecCatalog::gpu(const std::string& name_or_path) const {
  return load_gpu_file(lookup(root_, "gpus", "GPU", name_or_path));
}

PlanSpec SpecCatalog::plan(const std::string& name_or_path) const {
  return load_plan_file(lookup(root_, "plans", "plan", name_or_path));
}

LayerTimesSpec SpecCatalog::layer_times(const std::string& name_or_path) const {
  return load_layer_times_file(lookup(root_, "layer_times", "layer times", name_or_path));
}

PlanSpec SpecCatalog::plan_of(const LayerTimesSpec& times, const LayerTimesSpec::Run& run) const {
  try {
    return plan(run.plan);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::NotFound) throw;
    throw Error(ErrorKind::NotFound, {times.file, run.line}, e.message(), e.hint());
  }
}

std::vector<std::string> SpecCatalog::model_names() const { return yaml_stems(root_ / "models"); }
std::vector<std::string> SpecCatalog::cluster_names() const {
  return yaml_stems(root_ / "clusters");
}
std::vector<std::string> SpecCatalog::gpu_names() const { return yaml_stems(root_ / "gpus"); }
std::vector<std::string> SpecCatalog::plan_names() const { return yaml_stems(root_ / "plans"); }

GpuResolver SpecCatalog::gpu_resolver() const { return resolver_in(root_ / "gpus"); }

}  // namespace px
