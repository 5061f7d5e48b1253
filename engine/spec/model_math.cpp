// Closed-form parameter counts, FLOPs and per-rank training memory; conventions in model_math.hpp.
#include "engine/spec/model_math.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>

namespace px {
namespace {

using i64 = std::int64_t;

i64 norm_params(const ModelSpec& m) {
  return m.norm == NormKind::LayerNorm ? 2 * i64{m.hidden_size} : i64{m.hidden_size};
}

int mlp_branches(const ModelSpec& m) { return m.activation == Activation::SwiGLU ? 2 : 1; }

bool has_qkv_bias(const ModelSpec& m) { return m.add_bias_linear || m.add_qkv_bias; }

// One MLP (dense or one expert) split by its tensor-parallel role.
struct MlpParams {
  i64 fc1_weight = 0;  // column parallel
  i64 fc1_bias = 0;    // column parallel
  i64 fc2_weight = 0;  // row parallel
  i64 fc2_bias = 0;    // row parallel: replicated
  i64 total() const { return fc1_weight + fc1_bias + fc2_weight + fc2_bias; }
};

MlpParams mlp_params(const ModelSpec& m, int ffn) {
  const i64 h = m.hidden_size;
  const i64 f = ffn;
  const i64 branches = mlp_branches(m);
  MlpParams p;
  p.fc1_weight = branches * h * f;
  p.fc2_weight = f * h;
  if (m.add_bias_linear) {
    p.fc1_bias = branches * f;
    p.fc2_bias = h;
  }
  return p;
}

// Parameters of the attention block and both norms of one layer, on one tensor-parallel rank.
i64 attention_params(const ModelSpec& m, int tp) {
  const i64 h = m.hidden_size;
  const i64 d = m.kv_channels;
  const i64 q_width = i64{m.num_attention_heads} * d / tp;
  const i64 kv_width = 2 * i64{local_query_groups(m.num_query_groups, tp)} * d;
  i64 p = 2 * norm_params(m);
  p += h * (q_width + kv_width);
  if (has_qkv_bias(m)) p += q_width + kv_width;
  p += i64{m.num_attention_heads} * d * h / tp;
  if (m.add_bias_linear) p += h;
  return p;
}

i64 router_params(const ModelSpec& m) { return i64{m.hidden_size} * m.moe->num_experts; }

i64 mlp_params_on_rank(const ModelSpec& m, int tp) {
  const MlpParams p = mlp_params(m, m.ffn_hidden_size);
  return (p.fc1_weight + p.fc1_bias + p.fc2_weight) / tp + p.fc2_bias;
}

// What one micro-batch leaves in memory for one layer, bytes.
struct ActivationShape {
  double e = 0;       // bytes per activation element
  double tokens = 0;  // T = (s/cp)·micro_batch
  double seq = 0;     // s, the full key length
  double tp = 1;
  double sp_div = 1;  // tp with sequence parallelism, else 1
};

ActivationShape activation_shape(const ModelSpec& m, const PlanSpec& plan) {
  ActivationShape a;
  a.e = static_cast<double>(dtype_bytes(plan.precision));
  a.seq = effective_seq_length(m, plan);
  a.tokens = a.seq / plan.cp() * plan.micro_batch_size;
  a.tp = plan.tp();
  a.sp_div = plan.sequence_parallel ? a.tp : 1.0;
  return a;
}

double attention_core_bytes(const ModelSpec& m, const PlanSpec& plan, const ActivationShape& s) {
  const double heads = m.num_attention_heads / s.tp;
  if (plan.use_flash_attn) return 4.0 * s.tokens * heads;
  double bytes = s.e * heads * s.tokens * s.seq;
  if (m.attention_dropout > 0) bytes += (1.0 + s.e) * heads * s.tokens * s.seq;
  return bytes;
}

double layer_activation_bytes(const ModelSpec& m, const PlanSpec& plan, const ActivationShape& s,
                              bool moe_layer, Recompute mode) {
  const double h = m.hidden_size;
  const double th = s.tokens * h;
  if (mode == Recompute::Full) return s.e * th / s.sp_div;

  const double d = m.kv_channels;
  const double q_width = m.num_attention_heads * d / s.tp;
  const double kv_width = local_query_groups(m.num_query_groups, plan.tp()) * d;
  const double dropout = m.hidden_dropout > 0 ? 1.0 : 0.0;
  const double branches = mlp_branches(m);

  double bytes = 2 * s.e * th / s.sp_div;          // both norm inputs
  bytes += s.e * th / s.sp_div;                    // QKV input
  bytes += s.e * s.tokens * (q_width + 2 * kv_width);  // Q, K, V
  if (mode == Recompute::None) bytes += attention_core_bytes(m, plan, s);
  bytes += s.e * s.tokens * q_width;               // output-projection input
  bytes += dropout * th / s.sp_div;                // attention-side dropout mask

  if (!moe_layer) {
    const double f = m.ffn_hidden_size;
    bytes += dropout * th / s.sp_div;              // MLP-side dropout mask
    bytes += s.e * th / s.sp_div;                  // fc1 input
    bytes += s.e * s.tokens * f * branches / s.tp;  // activation input
    bytes += s.e * s.tokens * f / s.tp;            // fc2 input
    return bytes;
  }
  const MoESpec& moe = *m.moe;
  const double local_tokens = s.tokens / s.tp;
  // Each expert keeps moe_slots_per_expert slots for every rank of the EP group; a rank serves
  // E/ep experts, so it receives slots·E routed tokens.
  const double routed = static_cast<double>(moe_slots_per_expert(m, plan)) * moe.num_experts;
  const double fe = moe.ffn_hidden_size;
  bytes += s.e * local_tokens * h;                 // router input
  bytes += 4.0 * local_tokens * moe.num_experts;   // router probabilities, fp32
  bytes += 12.0 * local_tokens * moe.top_k;        // routing: expert, slot and gate per assignment
  bytes += s.e * routed * h;                       // expert fc1 input
  bytes += s.e * routed * fe * branches;           // expert activation input
  bytes += s.e * routed * fe;                      // expert fc2 input
  bytes += s.e * routed * h;                       // expert output, for the gate gradients
  return bytes;
}

}  // namespace

int padded_vocab_size(int vocab, int tp, int divisible_by) {
  assert(vocab > 0 && tp > 0 && divisible_by > 0);
  const int multiple = divisible_by * tp;
  return (vocab + multiple - 1) / multiple * multiple;
}

int effective_seq_length(const ModelSpec& model, const PlanSpec& plan) {
  return plan.seq_length > 0 ? plan.seq_length : model.seq_length;
}

bool is_moe_layer(const ModelSpec& model, int layer) {
  if (!model.is_moe()) return false;
  const int freq = std::max(1, model.moe->layer_freq);
  return (layer + 1) % freq == 0;
}

int moe_slots_per_expert(const ModelSpec& model, const PlanSpec& plan) {
  const MoESpec& moe = *model.moe;
  const double tokens = static_cast<double>(effective_seq_length(model, plan)) / plan.cp() * plan.micro_batch_size /
                        (plan.sequence_parallel ? plan.tp() : 1);
  // The guard keeps capacity_factor·tokens that lands a hair above an integer in binary from
  // rounding up.
  const double exact = moe.capacity_factor * tokens * moe.top_k / moe.num_experts;
  return static_cast<int>(std::ceil(exact - 1e-9 * std::max(1.0, exact)));
}

int local_query_groups(int num_query_groups, int tp) { return std::max(1, num_query_groups / tp); }

std::vector<int> stage_layers(const ModelSpec& model, const PlanSpec& plan, int pp_stage) {
  const int pp = plan.pp();
  const int vp = std::max(1, plan.vp());
  assert(pp_stage >= 0 && pp_stage < pp);
  assert(model.num_layers % (pp * vp) == 0);
  const int per_chunk = model.num_layers / (pp * vp);
  std::vector<int> layers;
  layers.reserve(static_cast<std::size_t>(per_chunk * vp));
  for (int chunk = 0; chunk < vp; ++chunk) {
    const int first = (chunk * pp + pp_stage) * per_chunk;
    for (int l = first; l < first + per_chunk; ++l) layers.push_back(l);
  }
  return layers;
}

ParameterCount count_parameters(const ModelSpec& model) {
  ParameterCount c;
  const i64 h = model.hidden_size;
  const i64 v = model.vocab_size;
  c.embedding = v * h;
  if (model.position == PositionKind::Learned) c.embedding += i64{model.max_position_embeddings} * h;
  c.output_layer = model.tied_embeddings ? 0 : v * h;
  c.final_norm = norm_params(model);

  const i64 attention = attention_params(model, 1);
  c.per_dense_layer = attention + mlp_params(model, model.ffn_hidden_size).total();
  if (model.is_moe()) {
    const MoESpec& moe = *model.moe;
    const i64 expert = mlp_params(model, moe.ffn_hidden_size).total();
    c.per_moe_layer = attention + router_params(model) + moe.num_experts * expert;
    c.per_moe_layer_active = attention + router_params(model) + moe.top_k * expert;
  }
  for (int l = 0; l < model.num_layers; ++l) {
    if (is_moe_layer(model, l)) {
      ++c.num_moe_layers;
    } else {
      ++c.num_dense_layers;
    }
  }
  const i64 outside = c.embedding + c.output_layer + c.final_norm;
  c.total = outside + c.num_dense_layers * c.per_dense_layer + c.num_moe_layers * c.per_moe_layer;
  c.active =
      outside + c.num_dense_layers * c.per_dense_layer + c.num_moe_layers * c.per_moe_layer_active;
  return c;
}

FlopsBreakdown iteration_flops(const ModelSpec& model, const PlanSpec& plan) {
  const double s = effective_seq_length(model, plan);
  const double h = model.hidden_size;
  const double ad = double{1.0} * model.num_attention_heads * model.kv_channels;
  const double gd = double{1.0} * model.num_query_groups * model.kv_channels;
  const double vocab = padded_vocab_size(model.vocab_size, plan.tp());
  const double mlp_per_token_per_ffn = model.activation == Activation::SwiGLU ? 6.0 * h : 4.0 * h;

  // Forward FLOPs of one sequence.
  const double scores = 4.0 * s * s * ad;
  const double attention = 2.0 * s * h * (ad + 2.0 * gd) + scores + 2.0 * s * ad * h;
  const double dense_mlp = mlp_per_token_per_ffn * model.ffn_hidden_size * s;
  double moe_mlp = 0;
  if (model.is_moe()) {
    const MoESpec& moe = *model.moe;
    moe_mlp = 2.0 * s * h * moe.num_experts +
              moe.top_k * mlp_per_token_per_ffn * moe.ffn_hidden_size * s;
  }
  double layers = 0;
  for (int l = 0; l < model.num_layers; ++l) {
    layers += attention + (is_moe_layer(model, l) ? moe_mlp : dense_mlp);
  }
  const double logits = 2.0 * s * h * vocab;

  const double batch = plan.global_batch_size;
  FlopsBreakdown f;
  f.forward = batch * (layers + logits);
  f.backward = 2.0 * f.forward;
  switch (plan.recompute) {
    case Recompute::None: break;
    case Recompute::Selective: f.recompute = batch * model.num_layers * scores; break;
    case Recompute::Full: f.recompute = batch * layers; break;
  }
  return f;
}

double model_flops_per_token(const ModelSpec& model, const PlanSpec& plan) {
  const double tokens = double{1.0} * plan.global_batch_size * effective_seq_length(model, plan);
  return iteration_flops(model, plan).model_flops() / tokens;
}

RankParams rank_parameters(const ModelSpec& model, const PlanSpec& plan, int pp_stage) {
  const int tp = plan.tp();
  const int pp = plan.pp();
  const i64 h = model.hidden_size;
  const i64 vocab = padded_vocab_size(model.vocab_size, tp);

  RankParams r;
  const i64 attention = attention_params(model, tp);
  const i64 dense_mlp = mlp_params_on_rank(model, tp);
  i64 experts_per_rank = 0;
  i64 expert = 0;
  if (model.is_moe()) {
    assert(model.moe->num_experts % plan.ep() == 0);
    experts_per_rank = model.moe->num_experts / plan.ep();
    expert = mlp_params(model, model.moe->ffn_hidden_size).total();
  }
  for (const int l : stage_layers(model, plan, pp_stage)) {
    r.dense += attention;
    if (is_moe_layer(model, l)) {
      r.dense += router_params(model);
      r.expert += experts_per_rank * expert;
    } else {
      r.dense += dense_mlp;
    }
  }
  if (pp_stage == 0) {
    r.dense += vocab * h / tp;
    if (model.position == PositionKind::Learned) r.dense += i64{model.max_position_embeddings} * h;
  }
  if (pp_stage == pp - 1) {
    const bool shares_embedding = model.tied_embeddings && pp == 1;
    if (!shares_embedding) r.dense += vocab * h / tp;
    r.dense += norm_params(model);
  }
  return r;
}

RankMemory training_memory(const ModelSpec& model, const PlanSpec& plan, int pp_stage) {
  const int tp = plan.tp();
  const int pp = plan.pp();
  const int vp = std::max(1, plan.vp());
  RankMemory mem;

  // Model state.
  const RankParams params = rank_parameters(model, plan, pp_stage);
  const double dense = static_cast<double>(params.dense);
  const double expert = static_cast<double>(params.expert);
  const double dense_shard = double{1.0} * plan.dp() * plan.cp();
  const double expert_shard = double{1.0} * tp * plan.cp() * plan.dp() / plan.ep();
  const auto sharded = [&](double bytes_per_param, bool shard) {
    return shard ? bytes_per_param * (dense / dense_shard + expert / expert_shard)
                 : bytes_per_param * (dense + expert);
  };
  const double weight_bytes = static_cast<double>(dtype_bytes(plan.precision));
  const double grad_bytes = static_cast<double>(dtype_bytes(plan.grad_dtype));
  const double optimizer_bytes = plan.precision == DType::F32 ? 8.0 : 12.0;
  mem.weights = sharded(weight_bytes, plan.zero_stage >= 3);
  mem.gradients = sharded(grad_bytes, plan.zero_stage >= 2);
  mem.optimizer = plan.optimizer_offload ? 0.0 : sharded(optimizer_bytes, plan.zero_stage >= 1);

  const std::vector<int> layers = stage_layers(model, plan, pp_stage);
  if (plan.zero_stage >= 3) {
    i64 largest = 0;
    const i64 attention = attention_params(model, tp);
    for (const int l : layers) {
      i64 layer = attention;
      if (is_moe_layer(model, l)) {
        layer += router_params(model) + model.moe->num_experts / plan.ep() *
                                            mlp_params(model, model.moe->ffn_hidden_size).total();
      } else {
        layer += mlp_params_on_rank(model, tp);
      }
      largest = std::max(largest, layer);
    }
    mem.zero3_buffers = 2.0 * weight_bytes * static_cast<double>(largest);
  }

  // Activations of one micro-batch.
  const ActivationShape shape = activation_shape(model, plan);
  double stage_layer_bytes = 0;
  double largest_full_layer = 0;
  for (const int l : layers) {
    const bool moe = is_moe_layer(model, l);
    stage_layer_bytes += layer_activation_bytes(model, plan, shape, moe, plan.recompute);
    largest_full_layer = std::max(
        largest_full_layer, layer_activation_bytes(model, plan, shape, moe, Recompute::None));
  }
  double extras = 0;
  const double th = shape.tokens * model.hidden_size;
  if (pp_stage == 0 && model.hidden_dropout > 0) extras += th / shape.sp_div;
  if (pp_stage == pp - 1) {
    const double vocab = padded_vocab_size(model.vocab_size, tp);
    extras += 2.0 * shape.e * th / shape.sp_div;  // final-norm input, output-layer input
    extras += 4.0 * shape.tokens * vocab / shape.tp;
    mem.loss_transient = shape.e * shape.tokens * vocab / shape.tp;
  }

  // Micro-batches in flight.
  const int m = plan.num_micro_batches();
  const int i = pp_stage;
  const int one_f_one_b = std::min(pp - i, m);
  const int extras_in_flight = plan.schedule == PipelineSchedule::GPipe ? m : one_f_one_b;
  double layer_activations = 0;
  switch (plan.schedule) {
    case PipelineSchedule::GPipe:
      mem.in_flight = m;
      layer_activations = m * stage_layer_bytes;
      break;
    case PipelineSchedule::OneFOneB:
    case PipelineSchedule::ZeroBubble:
      mem.in_flight = one_f_one_b;
      layer_activations = one_f_one_b * stage_layer_bytes;
      break;
    case PipelineSchedule::Interleaved1F1B:
      // Megatron's warm-up count plus the one chunk in steady state; each chunk is 1/vp of the stage.
      mem.in_flight = std::min((pp - i - 1) * 2 + (vp - 1) * pp + 1, m * vp);
      layer_activations = mem.in_flight * stage_layer_bytes / vp;
      break;
  }
  mem.activations = layer_activations + extras_in_flight * extras;
  if (plan.recompute == Recompute::Full) mem.activations += largest_full_layer;
  return mem;
}

std::int64_t kv_cache_bytes(const ModelSpec& model, std::int64_t batch, std::int64_t seq_len, int tp,
                            DType dtype) {
  const i64 groups = local_query_groups(model.num_query_groups, tp);
  return 2 * i64{model.num_layers} * groups * model.kv_channels * batch * seq_len *
         static_cast<i64>(dtype_bytes(dtype));
}

}  // namespace px
