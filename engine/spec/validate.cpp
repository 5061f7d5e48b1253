// Model, GPU, cluster and plan rules. Each broken rule has its own message naming the values involved
// and, for divisibility, the nearest values that satisfy it, so a user can fix a plan without
// reading Megatron-LM's argument checks.
#include "engine/spec/validate.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <numeric>
#include <string_view>
#include <vector>

#include "engine/core/error.hpp"

namespace px {
namespace {

using FieldLines = std::map<std::string, int, std::less<>>;

// The place of `key` in a spec file: its own line, else the line of the map holding it
// ("moe.top_k" falls back to "moe"), else just the file.
Location locate(const std::string& file, const FieldLines* lines, std::string key) {
  Location loc{file};
  if (lines == nullptr) return loc;
  while (true) {
    if (auto it = lines->find(key); it != lines->end()) {
      loc.line = it->second;
      return loc;
    }
    const std::size_t dot = key.rfind('.');
    if (dot == std::string::npos) return loc;
    key.resize(dot);
  }
}

// The closest value below and the closest above `x`, within [1, limit], that satisfy `ok`.
std::vector<std::int64_t> nearest_valid(std::int64_t x, std::int64_t limit,
                                        const std::function<bool(std::int64_t)>& ok) {
  std::vector<std::int64_t> found;
  for (std::int64_t v = std::min(x - 1, limit); v >= 1; --v) {
    if (ok(v)) {
      found.push_back(v);
      break;
    }
  }
  for (std::int64_t v = std::max<std::int64_t>(x + 1, 1); v <= limit; ++v) {
    if (ok(v)) {
      found.push_back(v);
      break;
    }
  }
  return found;
}

// The multiples of `step` just below and just above `x`.
std::vector<std::int64_t> nearest_multiples(std::int64_t x, std::int64_t step) {
  std::vector<std::int64_t> found;
  const std::int64_t below = x / step * step;
  if (below >= step) found.push_back(below);
  found.push_back(below + step);
  return found;
}

// "nearest valid: 2 or 4", or with a key: "nearest valid global_batch_size: 2560 or 2640".
std::string nearest_hint(const std::vector<std::int64_t>& values, std::string_view key = {}) {
  if (values.empty()) return {};
  std::string out = key.empty() ? "nearest valid: " : fmt::format("nearest valid {}: ", key);
  for (std::size_t i = 0; i < values.size(); ++i) {
    out += (i == 0 ? "" : " or ") + std::to_string(values[i]);
  }
  return out;
}

// Range checks on spec fields, reported as ErrorKind::Spec at the key's line.
struct FieldChecker {
  std::string file;
  const FieldLines* lines = nullptr;
  std::string prefix;

  std::string name(std::string_view key) const { return prefix + std::string(key); }
  Location at(std::string_view key) const { return locate(file, lines, name(key)); }

  [[noreturn]] void fail(std::string_view key, std::string message, std::string hint = {}) const {
    throw Error(ErrorKind::Spec, at(key), std::move(message), std::move(hint));
  }
  void positive(std::string_view key, double v) const {
    if (!(v > 0)) fail(key, fmt::format("{} must be > 0, got {}", name(key), v));
  }
  void positive(std::string_view key, int v) const {
    if (v <= 0) fail(key, fmt::format("{} must be > 0, got {}", name(key), v));
  }
  void non_negative(std::string_view key, double v) const {
    if (!(v >= 0)) fail(key, fmt::format("{} must be >= 0, got {}", name(key), v));
  }
  void at_least(std::string_view key, int v, int min) const {
    if (v < min) fail(key, fmt::format("{} must be >= {}, got {}", name(key), min, v));
  }
  void fraction(std::string_view key, double v) const {
    if (!(v >= 0 && v < 1)) fail(key, fmt::format("{} must be in [0, 1), got {}", name(key), v));
  }
};

}  // namespace

void validate_model(const ModelSpec& m) {
  const FieldChecker c{m.file, &m.field_lines, ""};
  if (m.name.empty()) c.fail("name", "name must not be empty");
  c.positive("num_layers", m.num_layers);
  c.positive("hidden_size", m.hidden_size);
  c.positive("num_attention_heads", m.num_attention_heads);
  if (m.kv_channels == 0 && m.hidden_size % m.num_attention_heads != 0) {
    const int heads = m.num_attention_heads;
    c.fail("hidden_size",
           fmt::format("hidden_size {} is not divisible by num_attention_heads {}", m.hidden_size,
                       heads),
           "set kv_channels, or use a head count that divides it; " +
               nearest_hint(nearest_valid(heads, m.hidden_size,
                                          [&](std::int64_t h) { return m.hidden_size % h == 0; }),
                            "num_attention_heads"));
  }
  c.positive("kv_channels", m.kv_channels);
  c.positive("num_query_groups", m.num_query_groups);
  if (m.num_attention_heads % m.num_query_groups != 0) {
    c.fail("num_query_groups",
           fmt::format("num_attention_heads {} is not divisible by num_query_groups {}",
                       m.num_attention_heads, m.num_query_groups),
           nearest_hint(nearest_valid(m.num_query_groups, m.num_attention_heads,
                                      [&](std::int64_t g) { return m.num_attention_heads % g == 0; })));
  }
  c.positive("ffn_hidden_size", m.ffn_hidden_size);
  c.positive("vocab_size", m.vocab_size);
  c.positive("seq_length", m.seq_length);
  c.positive("max_position_embeddings", m.max_position_embeddings);
  if (m.position == PositionKind::Learned && m.max_position_embeddings < m.seq_length) {
    c.fail("max_position_embeddings",
           fmt::format("max_position_embeddings {} is less than seq_length {}: learned position "
                       "embeddings have no row for the later positions",
                       m.max_position_embeddings, m.seq_length),
           fmt::format("set max_position_embeddings >= {}", m.seq_length));
  }
  c.fraction("hidden_dropout", m.hidden_dropout);
  c.fraction("attention_dropout", m.attention_dropout);
  if (m.position == PositionKind::Rope) c.positive("rope_theta", m.rope_theta);
  if (m.moe) {
    const MoESpec& e = *m.moe;
    const FieldChecker mc{m.file, &m.field_lines, "moe."};
    mc.at_least("num_experts", e.num_experts, 2);
    mc.at_least("top_k", e.top_k, 1);
    if (e.top_k > e.num_experts) {
      mc.fail("top_k", fmt::format("moe.top_k {} exceeds moe.num_experts {}", e.top_k,
                                   e.num_experts));
    }
    mc.positive("ffn_hidden_size", e.ffn_hidden_size);
    mc.positive("capacity_factor", e.capacity_factor);
    mc.at_least("layer_freq", e.layer_freq, 1);
  }
}

void validate_gpu(const GpuSpec& g, const FieldSite& site) {
  const FieldChecker c{site.file, site.lines, site.prefix};
  if (g.name.empty()) c.fail("name", fmt::format("{} must not be empty", c.name("name")));
  c.positive("peak_bf16_tflops", g.peak_bf16_tflops);
  c.positive("peak_fp16_tflops", g.peak_fp16_tflops);
  c.non_negative("peak_fp8_tflops", g.peak_fp8_tflops);  // 0: no fp8 tensor cores
  c.positive("peak_fp32_tflops", g.peak_fp32_tflops);
  c.positive("hbm_gib", g.hbm_gib);
  c.positive("hbm_bandwidth_gbs", g.hbm_bandwidth_gbs);
  c.non_negative("nvlink_bandwidth_gbs", g.nvlink_bandwidth_gbs);  // 0: a PCIe part
  c.at_least("sms", g.sms, 0);  // 0: unknown
  const GpuSpec::GemmMeasurement& gm = g.gemm_measured;
  if (gm.tflops != 0 || gm.m != 0 || gm.n != 0 || gm.k != 0) {
    const FieldChecker mc{site.file, site.lines, site.prefix + "gemm_measured."};
    mc.positive("tflops", gm.tflops);
    mc.positive("m", gm.m);
    mc.positive("n", gm.n);
    mc.positive("k", gm.k);
    if (gm.tflops > g.peak_bf16_tflops) {
      mc.fail("tflops", fmt::format("{} {} exceeds the dense bf16 peak {}", mc.name("tflops"), gm.tflops, g.peak_bf16_tflops),
              "a measurement above the dense peak is a sparsity or fp8 figure");
    }
  }
}

void validate_cluster(const ClusterSpec& cl) {
  const FieldChecker c{cl.file, &cl.field_lines, ""};
  if (cl.name.empty()) c.fail("name", "name must not be empty");
  c.at_least("num_nodes", cl.num_nodes, 1);
  validate_gpu(cl.gpu, FieldSite{cl.file, &cl.field_lines, "gpu."});

  const NodeSpec& n = cl.node;
  const FieldChecker nc{cl.file, &cl.field_lines, "node."};
  nc.at_least("gpus_per_node", n.gpus_per_node, 1);
  if (n.gpus_per_node > 1) nc.positive("nvlink_bandwidth_gbs", n.nvlink_bandwidth_gbs);
  if (!(n.nvlink_efficiency > 0 && n.nvlink_efficiency <= 1)) {
    nc.fail("nvlink_efficiency", fmt::format("node.nvlink_efficiency must be in (0, 1], got {}", n.nvlink_efficiency),
            "the share of the NVLink line rate collectives reach, e.g. 0.8 for A100");
  }
  nc.non_negative("nvlink_latency_us", n.nvlink_latency_us);
  nc.at_least("nics_per_node", n.nics_per_node, 0);
  if (cl.num_nodes > 1 && n.nics_per_node < 1) {
    nc.fail("nics_per_node",
            fmt::format("node.nics_per_node must be >= 1 when the cluster has {} nodes, got {}",
                        cl.num_nodes, n.nics_per_node),
            "nodes reach each other only through their NICs");
  }
  if (n.nics_per_node > 0) nc.positive("nic_bandwidth_gbps", n.nic_bandwidth_gbps);
  nc.non_negative("nic_latency_us", n.nic_latency_us);
  nc.non_negative("pcie_bandwidth_gbs", n.pcie_bandwidth_gbs);

  const FabricSpec& f = cl.fabric;
  const FieldChecker fc{cl.file, &cl.field_lines, "fabric."};
  fc.at_least("nodes_per_leaf_group", f.nodes_per_leaf_group, 1);
  fc.at_least("leaf_radix", f.leaf_radix, 2);
  fc.at_least("spine_radix", f.spine_radix, 2);
  if (!(f.oversubscription >= 1)) {
    fc.fail("oversubscription",
            fmt::format("fabric.oversubscription must be >= 1, got {}", f.oversubscription),
            "it is the leaf's downlink : uplink bandwidth ratio; 1 is a non-blocking fabric");
  }
  fc.non_negative("switch_latency_us", f.switch_latency_us);
  if (f.topology == FabricTopology::Dragonfly) {
    const std::pair<std::string_view, int> sizes[] = {
        {"dragonfly_groups", f.dragonfly_groups},
        {"dragonfly_routers_per_group", f.dragonfly_routers_per_group}};
    for (const auto& [key, value] : sizes) {
      if (value <= 0) {
        fc.fail(key, fmt::format("fabric.{} must be set (> 0) when fabric.topology is dragonfly, "
                                 "got {}", key, value));
      }
    }
  }
}

namespace {

// Plan rules are reported as ErrorKind::Plan at the first of the named keys the plan file sets.
struct PlanChecker {
  const PlanSpec& plan;

  Location at(std::initializer_list<std::string_view> keys) const {
    Location loc{plan.file};
    for (std::string_view key : keys) {
      if (auto it = plan.field_lines.find(key); it != plan.field_lines.end()) {
        loc.line = it->second;
        break;
      }
    }
    return loc;
  }
  [[noreturn]] void fail(std::initializer_list<std::string_view> keys, std::string message,
                         std::string hint = {}) const {
    throw Error(ErrorKind::Plan, at(keys), std::move(message), std::move(hint));
  }
  void at_least(std::string_view key, int v, int min) const {
    if (v < min) fail({key}, fmt::format("{} must be >= {}, got {}", key, min, v));
  }
};

bool divides(std::int64_t d, std::int64_t n) { return d > 0 && n % d == 0; }

}  // namespace

PlanSpec resolve_plan(PlanSpec p, const ModelSpec& m, const ClusterSpec* cluster) {
  const PlanChecker c{p};

  c.at_least("tensor_model_parallel_size", p.tensor_model_parallel_size, 1);
  c.at_least("pipeline_model_parallel_size", p.pipeline_model_parallel_size, 1);
  c.at_least("context_parallel_size", p.context_parallel_size, 1);
  c.at_least("expert_model_parallel_size", p.expert_model_parallel_size, 1);
  c.at_least("data_parallel_size", p.data_parallel_size, 1);
  c.at_least("micro_batch_size", p.micro_batch_size, 1);
  c.at_least("global_batch_size", p.global_batch_size, 1);
  c.at_least("virtual_pipeline_model_parallel_size", p.virtual_pipeline_model_parallel_size, 1);
  c.at_least("num_layers_per_virtual_pipeline_stage", p.num_layers_per_virtual_pipeline_stage, 0);
  c.at_least("seq_length", p.seq_length, 0);
  if (p.zero_stage < 0 || p.zero_stage > 3) {
    c.fail({"zero_stage"}, fmt::format("zero_stage {} is not one of 0, 1, 2, 3", p.zero_stage),
           "1 shards optimizer states (Megatron-LM's distributed optimizer), 2 also gradients, "
           "3 also weights");
  }
  if (p.overlap_param_gather && (p.zero_stage < 1 || p.zero_stage > 2 || p.optimizer_offload)) {
    c.fail({"overlap_param_gather"},
           fmt::format("overlap_param_gather needs the weights gathered after a sharded step: zero_stage 1 or 2 without "
                       "optimizer_offload (this plan: zero_stage {}{})",
                       p.zero_stage, p.optimizer_offload ? ", optimizer_offload" : ""),
           "set zero_stage: 1, or drop overlap_param_gather");
  }
  if (p.tp_comm_overlap && !(p.sequence_parallel && p.tp() > 1)) {
    c.fail({"tp_comm_overlap"}, fmt::format("tp_comm_overlap overlaps sequence parallelism's collectives, but this plan has {}",
                                            p.tp() > 1 ? "no sequence parallelism" : "tp 1"),
           "set sequence_parallel: true with tp > 1, or drop tp_comm_overlap");
  }
  if (p.grad_dtype == DType::FP8) {
    c.fail({"grad_dtype"}, "grad_dtype fp8 is not supported: gradients accumulate in fp32, bf16 "
                           "or fp16", "use grad_dtype: fp32");
  }

  if (p.seq_length == 0) p.seq_length = m.seq_length;
  if (p.tensor_model_parallel_size == 1) p.sequence_parallel = false;  // as Megatron-LM does

  const int tp = p.tp();
  const int pp = p.pp();
  const int cp = p.cp();
  const int ep = p.ep();
  const int dp = p.dp();
  const int layers = m.num_layers;
  const std::int64_t seq = p.seq_length;

  // Tensor parallelism splits heads, key/value groups and MLP columns evenly.
  std::int64_t tp_limit = std::gcd(std::gcd(m.num_attention_heads, m.num_query_groups),
                                   m.ffn_hidden_size);
  if (m.is_moe()) tp_limit = std::gcd(tp_limit, std::int64_t{m.moe->ffn_hidden_size});
  const std::string tp_hint =
      nearest_hint(nearest_valid(tp, tp_limit, [&](std::int64_t t) { return divides(t, tp_limit); }));
  const auto tp_must_divide = [&](std::string_view what, int value) {
    if (!divides(tp, value)) {
      c.fail({"tensor_model_parallel_size"},
             fmt::format("tensor_model_parallel_size {} must divide {} {}", tp, what, value),
             tp_hint);
    }
  };
  tp_must_divide("num_attention_heads", m.num_attention_heads);
  tp_must_divide("num_query_groups", m.num_query_groups);
  tp_must_divide("ffn_hidden_size", m.ffn_hidden_size);
  if (m.is_moe()) tp_must_divide("moe.ffn_hidden_size", m.moe->ffn_hidden_size);

  // Pipeline stages, and model chunks per stage for the interleaved schedule.
  if (pp > layers) {
    c.fail({"pipeline_model_parallel_size"},
           fmt::format("pipeline_model_parallel_size {} exceeds num_layers {}: every stage needs a "
                       "layer", pp, layers),
           nearest_hint(nearest_valid(pp, layers, [&](std::int64_t s) { return divides(s, layers); })));
  }
  const auto layers_per_pp_hint = [&](int vp) {
    return nearest_hint(
        nearest_valid(pp, layers, [&](std::int64_t s) { return divides(s * vp, layers); }),
        vp == 1 ? std::string_view{} : std::string_view{"pipeline_model_parallel_size"});
  };
  if (!divides(pp, layers)) {
    c.fail({"pipeline_model_parallel_size"},
           fmt::format("num_layers {} is not divisible by pipeline_model_parallel_size {}", layers,
                       pp),
           layers_per_pp_hint(1));
  }
  if (const int chunk = p.num_layers_per_virtual_pipeline_stage; chunk > 0) {
    const int per_stage = layers / pp;
    if (!divides(chunk, per_stage)) {
      c.fail({"num_layers_per_virtual_pipeline_stage"},
             fmt::format("num_layers_per_virtual_pipeline_stage {} must divide the {} layers of "
                         "each pipeline stage (num_layers {} / pipeline_model_parallel_size {})",
                         chunk, per_stage, layers, pp),
             nearest_hint(nearest_valid(chunk, per_stage,
                                        [&](std::int64_t l) { return divides(l, per_stage); })));
    }
    const int implied = per_stage / chunk;
    const bool vp_given = p.virtual_pipeline_model_parallel_size != 1 ||
                          p.field_lines.contains("virtual_pipeline_model_parallel_size");
    if (vp_given && p.virtual_pipeline_model_parallel_size != implied) {
      c.fail({"virtual_pipeline_model_parallel_size"},
             fmt::format("virtual_pipeline_model_parallel_size {} contradicts "
                         "num_layers_per_virtual_pipeline_stage {}, which implies {}",
                         p.virtual_pipeline_model_parallel_size, chunk, implied),
             "set only one of the two");
    }
    p.virtual_pipeline_model_parallel_size = implied;
  }
  const int vp = p.vp();
  if (!divides(std::int64_t{pp} * vp, layers)) {
    c.fail({"virtual_pipeline_model_parallel_size", "pipeline_model_parallel_size"},
           fmt::format("num_layers {} is not divisible by pipeline_model_parallel_size x "
                       "virtual_pipeline_model_parallel_size = {} x {} = {}",
                       layers, pp, vp, pp * vp),
           nearest_hint(nearest_valid(vp, layers / pp,
                                      [&](std::int64_t v) { return divides(v, layers / pp); }),
                        "virtual_pipeline_model_parallel_size"));
  }
  if (vp > 1 && p.num_layers_per_virtual_pipeline_stage == 0) {
    p.num_layers_per_virtual_pipeline_stage = layers / (pp * vp);
  }

  // Batch: global = micro x accumulation steps x dp.
  const std::int64_t per_step = std::int64_t{p.micro_batch_size} * dp;
  if (p.global_batch_size % per_step != 0) {
    c.fail({"global_batch_size", "micro_batch_size", "data_parallel_size"},
           fmt::format("global_batch_size {} is not divisible by micro_batch_size x "
                       "data_parallel_size = {}",
                       p.global_batch_size, per_step),
           nearest_hint(nearest_multiples(p.global_batch_size, per_step)));
  }
  const std::int64_t micro_batches = p.global_batch_size / per_step;

  switch (p.schedule) {
    case PipelineSchedule::Interleaved1F1B:
      if (pp < 2) {
        c.fail({"pipeline_schedule", "pipeline_model_parallel_size"},
               fmt::format("interleaved-1f1b needs pipeline_model_parallel_size >= 2, got {}", pp),
               "use pipeline_schedule: 1f1b");
      }
      if (vp < 2) {
        c.fail({"virtual_pipeline_model_parallel_size", "pipeline_schedule"},
               "interleaved-1f1b needs virtual_pipeline_model_parallel_size >= 2 (or "
               "num_layers_per_virtual_pipeline_stage), got 1",
               nearest_hint(nearest_valid(vp, layers / pp,
                                          [&](std::int64_t v) {
                                            return v >= 2 && divides(v, layers / pp);
                                          }),
                            "virtual_pipeline_model_parallel_size"));
      }
      if (micro_batches % pp != 0) {
        c.fail({"global_batch_size", "pipeline_schedule"},
               fmt::format("interleaved-1f1b needs the number of micro-batches (global_batch_size / "
                           "(micro_batch_size x data_parallel_size) = {}) to be a multiple of "
                           "pipeline_model_parallel_size {}",
                           micro_batches, pp),
               nearest_hint(nearest_multiples(p.global_batch_size, per_step * pp),
                            "global_batch_size"));
      }
      break;
    case PipelineSchedule::ZeroBubble:
      if (vp > 1) {
        c.fail({"pipeline_schedule", "virtual_pipeline_model_parallel_size"},
               fmt::format("zero-bubble with virtual_pipeline_model_parallel_size {} is not "
                           "supported", vp),
               "use virtual_pipeline_model_parallel_size 1, or pipeline_schedule: interleaved-1f1b");
      }
      break;
    case PipelineSchedule::GPipe:
    case PipelineSchedule::OneFOneB:
      if (vp > 1) {
        c.fail({"virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                "pipeline_schedule"},
               fmt::format("pipeline_schedule {} needs virtual_pipeline_model_parallel_size 1, got "
                           "{}", to_string(p.schedule), vp),
               "model chunks need pipeline_schedule: interleaved-1f1b");
      }
      break;
  }

  // Sequence and context parallelism split the sequence.
  if (p.sequence_parallel && seq % tp != 0) {
    c.fail({"seq_length", "sequence_parallel"},
           fmt::format("sequence_parallel needs seq_length {} divisible by "
                       "tensor_model_parallel_size {}", seq, tp),
           nearest_hint(nearest_multiples(seq, tp), "seq_length"));
  }
  if (cp > 1) {
    // Load-balanced causal ring attention gives each rank two of 2*cp chunks (Megatron-LM).
    if (seq % (2 * cp) != 0) {
      c.fail({"context_parallel_size"},
             fmt::format("context_parallel_size {} needs seq_length {} divisible by 2 x "
                         "context_parallel_size = {} (causal load balancing splits each sequence "
                         "into 2 x cp chunks)", cp, seq, 2 * cp),
             nearest_hint(nearest_valid(cp, seq / 2,
                                        [&](std::int64_t k) { return k >= 2 && seq % (2 * k) == 0; }),
                          "context_parallel_size"));
    }
    if (p.sequence_parallel && seq % (std::int64_t{2} * cp * tp) != 0) {
      c.fail({"context_parallel_size", "sequence_parallel"},
             fmt::format("context_parallel_size {} with sequence_parallel needs seq_length {} "
                         "divisible by 2 x context_parallel_size x tensor_model_parallel_size = {}",
                         cp, seq, 2 * cp * tp),
             nearest_hint(nearest_multiples(seq, std::int64_t{2} * cp * tp), "seq_length"));
    }
  }

  // Expert parallelism shards experts over part of the data-parallel group.
  if (ep > 1) {
    if (!m.is_moe()) {
      c.fail({"expert_model_parallel_size"},
             fmt::format("expert_model_parallel_size {} needs an MoE model; {} has no experts", ep,
                         m.name),
             "use expert_model_parallel_size: 1");
    }
    const int experts = m.moe->num_experts;
    const auto ep_hint = [&] {
      return nearest_hint(nearest_valid(ep, experts, [&](std::int64_t e) {
        return divides(e, experts) && divides(e, dp);
      }));
    };
    if (!divides(ep, experts)) {
      c.fail({"expert_model_parallel_size"},
             fmt::format("expert_model_parallel_size {} must divide moe.num_experts {}", ep,
                         experts),
             ep_hint());
    }
    if (!divides(ep, dp)) {
      c.fail({"expert_model_parallel_size", "data_parallel_size"},
             fmt::format("expert_model_parallel_size {} must divide data_parallel_size {}: expert "
                         "groups are carved out of the data-parallel group", ep, dp),
             ep_hint());
    }
  }
  if (m.is_moe() && tp > 1 && !p.sequence_parallel) {
    c.fail({"sequence_parallel", "tensor_model_parallel_size"},
           fmt::format("an MoE model with tensor_model_parallel_size {} needs sequence_parallel "
                       "(Megatron-LM requires it)", tp),
           "set sequence_parallel: true");
  }

  if (m.position == PositionKind::Learned && seq > m.max_position_embeddings) {
    c.fail({"seq_length"},
           fmt::format("seq_length {} exceeds max_position_embeddings {} of {}: learned position "
                       "embeddings stop there", seq, m.max_position_embeddings, m.name),
           fmt::format("use seq_length <= {}", m.max_position_embeddings));
  }

  if (cluster != nullptr) {
    const std::int64_t gpus = cluster->num_gpus();
    if (p.world_size() > gpus) {
      const std::int64_t model_parallel = std::int64_t{tp} * pp * cp;
      c.fail({"data_parallel_size", "tensor_model_parallel_size", "pipeline_model_parallel_size"},
             fmt::format("world size tp x pp x cp x dp = {} x {} x {} x {} = {} exceeds the {} GPUs "
                         "of cluster {}", tp, pp, cp, dp, p.world_size(), gpus, cluster->name),
             gpus >= model_parallel
                 ? fmt::format("largest data_parallel_size that fits: {}", gpus / model_parallel)
                 : fmt::format("tp x pp x cp = {} alone exceeds the cluster", model_parallel));
    }
    if (p.precision == DType::FP8 && !(cluster->gpu.peak_fp8_tflops > 0)) {
      c.fail({"precision"},
             fmt::format("precision fp8 needs a GPU with an fp8 peak; {} of cluster {} has none",
                         cluster->gpu.name, cluster->name),
             "use precision: bf16");
    }
  }
  return p;
}

}  // namespace px
