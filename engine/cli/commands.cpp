// `parallax model ...` and `parallax plan ...`: specs resolved through the dataset catalog, plans
// from a YAML file and/or flags, reports as text tables or JSON.
#include "engine/cli/commands.hpp"

#include <fmt/format.h>

#include <chrono>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "engine/core/error.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/plan/plan_summary.hpp"
#include "engine/spec/model_math.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

namespace px::cli {
namespace {

using nlohmann::json;

const std::map<std::string, PipelineSchedule> kSchedules = {{"gpipe", PipelineSchedule::GPipe},
                                                            {"1f1b", PipelineSchedule::OneFOneB},
                                                            {"interleaved-1f1b", PipelineSchedule::Interleaved1F1B},
                                                            {"zero-bubble", PipelineSchedule::ZeroBubble}};
const std::map<std::string, Recompute> kRecompute = {
    {"none", Recompute::None}, {"selective", Recompute::Selective}, {"full", Recompute::Full}};
const std::map<std::string, DType> kPrecision = {
    {"fp32", DType::F32}, {"bf16", DType::BF16}, {"fp16", DType::F16}, {"fp8", DType::FP8}};

template <class Map>
std::vector<std::string> keys(const Map& m) {
  std::vector<std::string> out;
  for (const auto& [k, v] : m) out.push_back(k);
  return out;
}

}  // namespace

void add_plan_flags(CLI::App* cmd, Options& o) {
  PlanFlags& f = o.plan;
  cmd->add_option("--model,-m", o.model, "Model name (datasets/models) or YAML path")->required();
  cmd->add_option("--cluster,-c", o.cluster, "Cluster name (datasets/clusters) or YAML path");
  cmd->add_option("--plan", f.plan_file, "Plan YAML (datasets/plans name or path); flags override it");
  cmd->add_option("--tp,--tensor-model-parallel-size", f.tp, "Tensor-parallel size");
  cmd->add_option("--pp,--pipeline-model-parallel-size", f.pp, "Pipeline-parallel size");
  cmd->add_option("--cp,--context-parallel-size", f.cp, "Context-parallel size");
  cmd->add_option("--ep,--expert-model-parallel-size", f.ep, "Expert-parallel size (divides dp)");
  cmd->add_option("--dp,--data-parallel-size", f.dp, "Data-parallel size (default: the cluster's GPUs / (tp pp cp))");
  cmd->add_option("--micro-batch,--micro-batch-size", f.micro_batch, "Micro-batch size");
  cmd->add_option("--global-batch,--global-batch-size", f.global_batch, "Global batch size");
  cmd->add_option("--virtual-stages,--virtual-pipeline-model-parallel-size", f.virtual_stages,
                  "Model chunks per pipeline rank (interleaved)");
  cmd->add_option("--layers-per-virtual-stage,--num-layers-per-virtual-pipeline-stage", f.layers_per_virtual_stage,
                  "Layers per virtual pipeline stage");
  cmd->add_option("--seq-length", f.seq_length, "Sequence length (default: the model's)");
  cmd->add_option("--zero,--zero-stage", f.zero, "ZeRO stage 0-3");
  cmd->add_option("--schedule", f.schedule, "Pipeline schedule")->check(CLI::IsMember(keys(kSchedules)));
  cmd->add_option("--recompute", f.recompute, "Activation recomputation")->check(CLI::IsMember(keys(kRecompute)));
  cmd->add_option("--precision", f.precision, "Weights/activations precision")->check(CLI::IsMember(keys(kPrecision)));
  cmd->add_flag("--sequence-parallel,--sp", f.sequence_parallel, "Megatron sequence parallelism");
  cmd->add_flag("--offload", f.offload, "Optimizer states and step on the host");
  cmd->add_flag("--overlap-param-gather", f.overlap_param_gather,
                "ZeRO-1/2: gather updated weights at the next iteration's start, overlapped with its forward");
  cmd->add_flag("--tp-comm-overlap", f.tp_comm_overlap,
                "SP: tensor-parallel all-gathers and reduce-scatters as ring steps overlapped with their GEMMs");
  cmd->add_flag("--no-flash-attn", f.no_flash_attn, "Unfused attention (keeps s x s softmax for backward)");
  cmd->add_flag("--json", o.json, "Machine-readable output");
}

SpecCatalog catalog(const Options& o) {
  return SpecCatalog(o.datasets.empty() ? SpecCatalog::default_root() : std::filesystem::path(o.datasets));
}

namespace {

PlanSpec build_plan(const SpecCatalog& cat, const PlanFlags& f, const ModelSpec& model, const ClusterSpec* cluster) {
  PlanSpec p = f.plan_file.empty() ? PlanSpec{} : cat.plan(f.plan_file);
  auto set = [](int& field, const std::optional<int>& v) {
    if (v) field = *v;
  };
  set(p.tensor_model_parallel_size, f.tp);
  set(p.pipeline_model_parallel_size, f.pp);
  set(p.context_parallel_size, f.cp);
  set(p.expert_model_parallel_size, f.ep);
  set(p.micro_batch_size, f.micro_batch);
  set(p.virtual_pipeline_model_parallel_size, f.virtual_stages);
  set(p.num_layers_per_virtual_pipeline_stage, f.layers_per_virtual_stage);
  set(p.seq_length, f.seq_length);
  set(p.zero_stage, f.zero);
  if (f.dp) {
    p.data_parallel_size = *f.dp;
  } else if (f.plan_file.empty() && cluster) {
    const std::int64_t model_parallel = std::int64_t{p.tp()} * p.pp() * p.cp();
    if (model_parallel > 0 && cluster->num_gpus() % model_parallel == 0)
      p.data_parallel_size = static_cast<int>(cluster->num_gpus() / model_parallel);
  }
  if (f.global_batch)
    p.global_batch_size = *f.global_batch;
  else if (f.plan_file.empty())
    p.global_batch_size = p.micro_batch_size * p.data_parallel_size;
  if (!f.schedule.empty()) p.schedule = kSchedules.at(f.schedule);
  if (!f.recompute.empty()) p.recompute = kRecompute.at(f.recompute);
  if (!f.precision.empty()) p.precision = kPrecision.at(f.precision);
  if (f.sequence_parallel) p.sequence_parallel = true;
  if (f.offload) p.optimizer_offload = true;
  if (f.overlap_param_gather) p.overlap_param_gather = true;
  if (f.tp_comm_overlap) p.tp_comm_overlap = true;
  if (f.no_flash_attn) p.use_flash_attn = false;
  return resolve_plan(p, model, cluster);
}

std::string plan_string(const PlanSpec& p) {
  std::string s = fmt::format("tp{}·pp{}", p.tp(), p.pp());
  if (p.cp() > 1) s += fmt::format("·cp{}", p.cp());
  s += fmt::format("·dp{}", p.dp());
  if (p.ep() > 1) s += fmt::format("·ep{}", p.ep());
  return s;
}


constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

int model_info(const Options& o) {
  const ModelSpec m = catalog(o).model(o.model);
  const ParameterCount pc = count_parameters(m);
  PlanSpec one;
  one.seq_length = m.seq_length;
  const double flops_per_token = model_flops_per_token(m, one);
  if (o.json) {
    json j = {{"name", m.name},
              {"source", m.source},
              {"file", m.file},
              {"architecture",
               {{"num_layers", m.num_layers},
                {"hidden_size", m.hidden_size},
                {"num_attention_heads", m.num_attention_heads},
                {"num_query_groups", m.num_query_groups},
                {"kv_channels", m.kv_channels},
                {"ffn_hidden_size", m.ffn_hidden_size},
                {"vocab_size", m.vocab_size},
                {"seq_length", m.seq_length},
                {"activation", std::string(to_string(m.activation))},
                {"normalization", std::string(to_string(m.norm))},
                {"position_embedding", std::string(to_string(m.position))},
                {"tied_embeddings", m.tied_embeddings}}},
              {"parameters",
               {{"total", pc.total},
                {"active", pc.active},
                {"embedding", pc.embedding},
                {"total_billions", static_cast<double>(pc.total) / 1e9},
                {"active_billions", static_cast<double>(pc.active) / 1e9}}},
              {"training_flops_per_token", flops_per_token},
              {"flops_convention", "matmul FLOPs, 2 per multiply-add, forward + backward (3x forward), no recompute, "
                                   "attention scores counted in full, vocabulary padded to 128"},
              {"kv_cache_bytes_per_token_bf16", kv_cache_bytes(m, 1, 1, 1, DType::BF16)}};
    if (m.is_moe())
      j["architecture"]["moe"] = {{"num_experts", m.moe->num_experts},
                                  {"top_k", m.moe->top_k},
                                  {"ffn_hidden_size", m.moe->ffn_hidden_size},
                                  {"capacity_factor", m.moe->capacity_factor}};
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  fmt::print("{}  ({})\n", m.name, m.source);
  fmt::print("  layers {}, hidden {}, heads {} ({} kv groups, head dim {}), ffn {}, vocab {}, seq {}\n", m.num_layers,
             m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels, m.ffn_hidden_size, m.vocab_size,
             m.seq_length);
  fmt::print("  {} · {} · {} positions · {} embeddings{}\n", to_string(m.activation), to_string(m.norm), to_string(m.position),
             m.tied_embeddings ? "tied" : "untied",
             m.is_moe() ? fmt::format(" · MoE {} experts top-{}", m.moe->num_experts, m.moe->top_k) : "");
  fmt::print("  parameters: {:.4g} B total", static_cast<double>(pc.total) / 1e9);
  if (m.is_moe()) fmt::print(", {:.4g} B active", static_cast<double>(pc.active) / 1e9);
  fmt::print(" ({} exactly; embeddings {:.4g} B)\n", pc.total, static_cast<double>(pc.embedding) / 1e9);
  fmt::print("  training FLOPs per token at seq {}: {:.4g} GFLOP (matmul, fwd+bwd, no recompute)\n", m.seq_length,
             flops_per_token / 1e9);
  fmt::print("  KV cache: {} bytes per token (bf16, tp 1)\n", kv_cache_bytes(m, 1, 1, 1, DType::BF16));
  return 0;
}

int list(const Options& o, bool models) {
  const SpecCatalog cat = catalog(o);
  const auto names = models ? cat.model_names() : cat.cluster_names();
  if (o.json) {
    std::cout << json(names).dump(2) << "\n";
    return 0;
  }
  for (const auto& n : names) fmt::print("{}\n", n);
  return 0;
}

struct Loaded {
  ModelSpec model;
  std::optional<ClusterSpec> cluster;
  PlanSpec plan;
};

Loaded load(const Options& o) {
  const SpecCatalog cat = catalog(o);
  Loaded l;
  l.model = cat.model(o.model);
  if (!o.cluster.empty()) l.cluster = cat.cluster(o.cluster);
  l.plan = build_plan(cat, o.plan, l.model, l.cluster ? &*l.cluster : nullptr);
  return l;
}

int plan_check(const Options& o) {
  const Loaded l = load(o);
  if (o.json) {
    std::cout << json{{"valid", true}, {"model", l.model.name}, {"plan", plan_to_json(l.plan)}}.dump(2) << "\n";
  } else {
    fmt::print("valid: {} on {} with {} ({} ranks, {} micro-batches of {}, {} schedule)\n", l.model.name,
               l.cluster ? l.cluster->name : std::string("any cluster"), plan_string(l.plan), l.plan.world_size(),
               l.plan.num_micro_batches(), l.plan.micro_batch_size, to_string(l.plan.schedule));
  }
  return 0;
}

// A rank's place in the plan: its coordinates, role, and the members of each of its groups.
json rank_binding_json(const CompiledPlan& plan, int rank) {
  const Topology& t = plan.topology;
  if (rank < 0 || rank >= t.world_size())
    throw Error(ErrorKind::Usage, {}, fmt::format("--rank {} is outside the plan's {} ranks", rank, t.world_size()),
                fmt::format("choose 0..{}", t.world_size() - 1));
  const RankCoord c = t.coord(rank);
  json groups = json::object();
  for (int g = 1; g < kNumGroupKinds; ++g) {
    const auto kind = static_cast<GroupKind>(g);
    const int id = plan.ranks[static_cast<std::size_t>(rank)].group[static_cast<std::size_t>(g)];
    if (id < 0 || t.size(kind) < 2) continue;
    if (!plan.model.is_moe() && (kind == GroupKind::EP || kind == GroupKind::ExpertDP)) continue;
    groups[std::string(to_string(kind))] = {{"instance", id}, {"index", t.group_index(kind, rank)}, {"members", t.members(kind, id)}};
  }
  return {{"rank", rank},
          {"pipeline_stage", plan.ranks[static_cast<std::size_t>(rank)].role},
          {"coordinates", {{"tp", c.tp}, {"cp", c.cp}, {"dp", t.dp_rank(c)}, {"ep", c.ep}, {"pp", c.pp}}},
          {"groups", groups}};
}

int plan_show(const Options& o) {
  const Loaded l = load(o);
  const auto t0 = std::chrono::steady_clock::now();
  const CompiledPlan compiled = compile_plan(l.model, l.plan);
  const auto t1 = std::chrono::steady_clock::now();
  const std::optional<json> binding = o.rank ? std::optional<json>(rank_binding_json(compiled, *o.rank)) : std::nullopt;
  const PlanSummary s = summarize(compiled);
  const auto t2 = std::chrono::steady_clock::now();
  const double compile_s = std::chrono::duration<double>(t1 - t0).count();
  const double summary_s = std::chrono::duration<double>(t2 - t1).count();
  const double closed_flops = iteration_flops(l.model, l.plan).total();
  const double hbm = l.cluster ? l.cluster->gpu.hbm_gib * kGiB : 0.0;

  if (o.json) {
    json roles = json::array();
    for (std::size_t r = 0; r < s.roles.size(); ++r) {
      const RoleSummary& rs = s.roles[r];
      const RankMemory rm = training_memory(l.model, l.plan, rs.stage);
      json comm = json::object();
      for (int g = 1; g < kNumGroupKinds; ++g) {
        const auto& c = rs.comm[static_cast<std::size_t>(g)];
        if (c.ops) comm[std::string(to_string(static_cast<GroupKind>(g)))] = {{"ops", c.ops}, {"bytes", c.bytes}};
      }
      json chunks = json::array();
      for (const auto& c : rs.chunks) chunks.push_back({{"first_layer", c.first}, {"num_layers", c.count}});
      roles.push_back({{"pipeline_stage", rs.stage},
                       {"ranks", rs.ranks},
                       {"chunks", chunks},
                       {"ops", rs.ops},
                       {"tensors", rs.tensors},
                       {"flops", rs.flops},
                       {"vector_flops", rs.vector_flops},
                       {"comm", comm},
                       {"passes", {{"forward", rs.forward_passes}, {"backward", rs.backward_passes}, {"weight", rs.weight_passes}}},
                       {"max_in_flight", rs.max_in_flight},
                       {"memory",
                        {{"planned_peak_bytes", rs.memory.arena_bytes},
                         {"live_peak_bytes", rs.memory.peak_live_bytes},
                         {"static_bytes", rs.memory.static_bytes},
                         {"model_bytes", rm.total()},
                         {"model_breakdown",
                          {{"weights", rm.weights},
                           {"gradients", rm.gradients},
                           {"optimizer", rm.optimizer},
                           {"activations", rm.activations},
                           {"zero3_buffers", rm.zero3_buffers},
                           {"loss_transient", rm.loss_transient}}},
                         {"fits_hbm", hbm > 0 ? json(static_cast<double>(rs.memory.arena_bytes) <= hbm) : json(nullptr)}}}});
    }
    json j = {{"model", l.model.name},
              {"cluster", l.cluster ? json(l.cluster->name) : json(nullptr)},
              {"plan", plan_to_json(l.plan)},
              {"world_size", s.world_size},
              {"distinct_roles", s.roles.size()},
              {"ranks_bound", compiled.ranks.size()},
              {"micro_batches", s.micro_batches},
              {"ideal_bubble_fraction", s.ideal_bubble_fraction},
              {"flops_per_iteration", s.total_flops},
              {"flops_per_iteration_closed_form", closed_flops},
              {"compile_seconds", compile_s},
              {"summary_seconds", summary_s},
              {"roles", roles}};
    if (binding) j["rank_binding"] = *binding;
    std::cout << j.dump(2) << "\n";
    return 0;
  }

  fmt::print("{} on {}: {} = {} ranks, {} distinct rank roles bound to {} ranks\n", l.model.name,
             l.cluster ? l.cluster->name : std::string("(no cluster)"), plan_string(l.plan), s.world_size, s.roles.size(),
             compiled.ranks.size());
  fmt::print("batch {} = micro {} x {} micro-batches x dp {}; seq {}; {} schedule{}; ZeRO-{}; recompute {}{}{}\n",
             l.plan.global_batch_size, l.plan.micro_batch_size, s.micro_batches, l.plan.dp(), l.plan.seq_length,
             to_string(l.plan.schedule), l.plan.vp() > 1 ? fmt::format(" (v={})", l.plan.vp()) : "", l.plan.zero_stage,
             to_string(l.plan.recompute), l.plan.sequence_parallel ? "; sequence parallel" : "",
             l.plan.optimizer_offload ? "; optimizer offload" : "");
  fmt::print("pipeline bubble (equal pass times): {:.2f}% of the iteration\n", 100.0 * s.ideal_bubble_fraction);
  fmt::print("FLOPs per iteration: {:.6g} (compiled program) vs {:.6g} (closed form)\n", s.total_flops, closed_flops);
  fmt::print("compiled in {:.3f} s, memory planned in {:.3f} s\n\n", compile_s, summary_s);
  fmt::print("{:>5} {:>6} {:>10} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>6}\n", "stage", "ranks", "layers",
             "ops", "TFLOP", "TP GiB", "DP GiB", "PP GiB", "other GiB", "peak GiB", "model GiB", "fits");
  for (const RoleSummary& rs : s.roles) {
    std::string layers;
    for (const auto& c : rs.chunks) layers += fmt::format("{}{}-{}", layers.empty() ? "" : ",", c.first, c.first + c.count - 1);
    auto gib = [&](std::initializer_list<GroupKind> gs) {
      double b = 0;
      for (auto g : gs) b += static_cast<double>(rs.comm[static_cast<std::size_t>(g)].bytes);
      return b / kGiB;
    };
    const RankMemory rm = training_memory(l.model, l.plan, rs.stage);
    const double peak = static_cast<double>(rs.memory.arena_bytes);
    fmt::print("{:>5} {:>6} {:>10} {:>7} {:>10.1f} {:>9.2f} {:>9.2f} {:>9.3f} {:>9.3f} {:>10.2f} {:>10.2f} {:>6}\n", rs.stage,
               rs.ranks, layers, rs.ops, rs.flops / 1e12, gib({GroupKind::TP}), gib({GroupKind::DP, GroupKind::ExpertDP}),
               gib({GroupKind::PP}), gib({GroupKind::CP, GroupKind::EP, GroupKind::Embedding}), peak / kGiB,
               rm.total() / kGiB, hbm > 0 ? (peak <= hbm ? "yes" : "NO") : "-");
  }
  if (binding) {
    const json& b = *binding;
    const auto& c = b["coordinates"];
    fmt::print("\nrank {}: stage {}, tp {} cp {} dp {} ep {} pp {}\n", *o.rank, b["pipeline_stage"].get<int>(), c["tp"].get<int>(),
               c["cp"].get<int>(), c["dp"].get<int>(), c["ep"].get<int>(), c["pp"].get<int>());
    for (const auto& [kind, g] : b["groups"].items()) {
      const auto members = g["members"].get<std::vector<int>>();
      std::string list;
      for (std::size_t i = 0; i < members.size() && i < 16; ++i) list += fmt::format("{}{}", i ? " " : "", members[i]);
      if (members.size() > 16) list += fmt::format(" ... ({} ranks)", members.size());
      fmt::print("  {:<10} #{:<6} member {:>3} of {:<3}: {}\n", kind, g["instance"].get<int>(), g["index"].get<int>(), members.size(), list);
    }
  }
  fmt::print("\nTP/DP/PP/other GiB: summed buffer sizes of that group's collectives per rank per iteration "
             "(nccl-tests 'size'); peak: the memory planner's arena; model: the closed-form estimate.\n");
  return 0;
}

}  // namespace

void register_commands(CLI::App& app, Options& o) {
  app.add_option("--datasets", o.datasets, "Datasets folder (default: $PARALLAX_DATASETS or the source tree's)");
  CLI::App* model = app.add_subcommand("model", "Model specs: parameters, FLOPs, memory");
  model->require_subcommand(1);
  o.model_info = model->add_subcommand("info", "Parameter count and FLOPs of a model");
  o.model_info->add_option("model", o.model, "Model name or YAML path")->required();
  o.model_info->add_flag("--json", o.json, "Machine-readable output");
  o.model_list = model->add_subcommand("list", "Models in the datasets folder");
  o.model_list->add_flag("--json", o.json, "Machine-readable output");
  CLI::App* cluster = app.add_subcommand("cluster", "Cluster specs");
  cluster->require_subcommand(1);
  o.cluster_list = cluster->add_subcommand("list", "Clusters in the datasets folder");
  o.cluster_list->add_flag("--json", o.json, "Machine-readable output");
  CLI::App* plan = app.add_subcommand("plan", "Parallel plans: validate and compile");
  plan->require_subcommand(1);
  o.plan_check = plan->add_subcommand("check", "Validate a plan against a model (and cluster)");
  add_plan_flags(o.plan_check, o);
  o.plan_show = plan->add_subcommand("show", "Compile a plan: per-role ops, FLOPs, comm volume, memory, schedule");
  add_plan_flags(o.plan_show, o);
  o.plan_show->add_option("--rank", o.rank, "Also show this rank's coordinates and process groups");
  register_train(app, o);
  register_simulate(app, o);
}

PlanSpec plan_from_flags(const Options& o, const ModelSpec& model, const ClusterSpec* cluster) {
  return build_plan(catalog(o), o.plan, model, cluster);
}

int run(const CLI::App&, const Options& o) {
  if (o.model_info->parsed()) return model_info(o);
  if (o.model_list->parsed()) return list(o, true);
  if (o.cluster_list->parsed()) return list(o, false);
  if (o.plan_check->parsed()) return plan_check(o);
  if (o.plan_show->parsed()) return plan_show(o);
  if (o.simulate_cmd->parsed()) return simulate(o);
  if (o.calibrate_cmd->parsed()) return calibrate(o);
  return 2;
}

}  // namespace px::cli
