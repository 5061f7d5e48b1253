// Closed-form model math: parameter counts, FLOPs per iteration and per-rank training memory.
// These formulas are the independent reference the plan compiler's emitted op program is checked
// against (summed FLOPs must match exactly, per-rank memory within 5%), so every convention is
// written down here and must not drift.
//
// Inputs: a ModelSpec and an already resolved PlanSpec; plan.seq_length == 0 means the model's
// seq_length. Divisibility (layers by pp·vp, heads by tp, batch by micro·dp, experts by ep) is a
// precondition checked by plan validation, not here.
//
// Parameters (count_parameters)
//   Word embedding V·h with the UNPADDED vocabulary, plus max_position_embeddings·h for learned
//   positions. Output layer V·h when untied, else 0. Final norm. Per layer: two norms (layernorm
//   weight+bias = 2h each, rmsnorm h each); QKV weight h·(a·d + 2·g·d) plus bias (a·d + 2·g·d) when
//   add_bias_linear or add_qkv_bias; output projection a·d·h plus bias h when add_bias_linear;
//   MLP gelu h·f + f·h (+ f + h biases), swiglu 3·h·f (+ 2f + h biases). Layer l (0-based) is an MoE
//   layer when (l + 1) % layer_freq == 0; its MLP is a router h·E (no bias) plus E expert MLPs of the
//   expert ffn size. "Active" counts top_k experts instead of E (router included).
//
// Vocabulary padding: padded_vocab_size(V, tp) is the smallest multiple of 128·tp ≥ V (Megatron's
// make_vocab_size_divisible_by); every compute shape and every per-rank memory figure uses it.
//
// FLOPs (iteration_flops), Megatron convention (Narayanan et al. 2021)
//   Matmul FLOPs only, 2 per multiply-add, whole job (all ranks), one iteration of global_batch_size
//   sequences of length s. Attention scores QKᵀ and AV are counted in full (no causal halving).
//   Per layer forward per sequence: QKV 2·s·h·(a·d + 2·g·d); scores 4·s²·a·d; output projection
//   2·s·a·d·h; dense MLP gelu 4·s·h·f, swiglu 6·s·h·f; MoE layer: router 2·s·h·E plus
//   top_k·s·(expert MLP per token) (routed tokens only; capacity factor not applied).
//   Logits 2·s·h·V_padded per sequence. Backward = 2 × forward for every matmul, logits included.
//   Recompute: full → every layer's forward once more (never the logits); selective → the scores
//   term 4·s²·a·d once more per layer. model_flops() = forward + backward is what MFU counts.
//
// Per-rank training memory (training_memory), Megatron sharding
//   A pipeline stage holds L/pp layers: with vp model chunks, chunk c of stage i holds layers
//   [(c·pp + i)·L/(pp·vp), +L/(pp·vp)). QKV, output projection and MLP weights and the column-parallel
//   biases (QKV bias, fc1 bias) are divided by tp; norms and row-parallel biases (output-projection
//   bias, fc2 bias) are replicated. Key/value heads per rank are g_local = max(1, g/tp) (replicated
//   when g < tp), for weights, activations and the KV cache alike. The first stage holds the word
//   embedding V_padded·h/tp (+ learned positions max_pos·h, replicated); the last stage holds the
//   output layer V_padded·h/tp (when tied and pp > 1 it holds its own copy; tied and pp == 1: shared,
//   counted once) and the final norm. Experts are not tensor-parallel: a rank holds E/ep whole
//   experts; the router is replicated.
//   Bytes per parameter: weights bytes(precision); gradients bytes(grad_dtype); optimizer 12 (fp32
//   master + Adam m, v) when precision is not fp32, else 8. ZeRO shards over the data-parallel group
//   dp·cp for dense parameters and tp·cp·dp/ep for expert parameters: stage 1 the optimizer, stage 2
//   also gradients, stage 3 also weights, plus zero3_buffers = 2 × the largest layer's weight bytes on
//   this rank (the gathered layer and the prefetched next). optimizer_offload: optimizer bytes 0.
//   Activations: see training_memory below and model_math.cpp; per micro-batch, times the micro-batches
//   in flight of the schedule.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/spec/spec.hpp"

namespace px {

struct ParameterCount {
  std::int64_t total = 0;
  std::int64_t active = 0;           // MoE: top_k of num_experts experts per MoE layer
  std::int64_t embedding = 0;        // word (unpadded vocab) + learned positions
  std::int64_t output_layer = 0;     // 0 when tied
  std::int64_t per_dense_layer = 0;
  std::int64_t per_moe_layer = 0;    // all experts; 0 for a dense model
  std::int64_t per_moe_layer_active = 0;
  std::int64_t final_norm = 0;
  int num_dense_layers = 0;
  int num_moe_layers = 0;
};

ParameterCount count_parameters(const ModelSpec& model);

// Smallest multiple of divisible_by·tp that is ≥ vocab.
int padded_vocab_size(int vocab, int tp, int divisible_by = 128);

// plan.seq_length, or the model's when the plan leaves it 0.
int effective_seq_length(const ModelSpec& model, const PlanSpec& plan);

// Layer l (0-based) carries an MoE MLP when (l + 1) % layer_freq == 0.
bool is_moe_layer(const ModelSpec& model, int layer);

// MoE capacity, GShard-style per routing group (one rank's tokens of a micro-batch): each expert
// keeps ceil(capacity_factor · T' · top_k / E) slots for the T' tokens of each rank, so an expert
// receives slots · ep tokens from its expert-parallel group.
int moe_slots_per_expert(const ModelSpec& model, const PlanSpec& plan);

// Key/value heads held by one tensor-parallel rank: g/tp, or 1 (replicated) when g < tp.
int local_query_groups(int num_query_groups, int tp);

// Global indices of the layers held by pipeline stage pp_stage, in chunk order.
std::vector<int> stage_layers(const ModelSpec& model, const PlanSpec& plan, int pp_stage);

struct FlopsBreakdown {
  double forward = 0;
  double backward = 0;
  double recompute = 0;
  double total() const { return forward + backward + recompute; }
  double model_flops() const { return forward + backward; }  // what MFU counts
};

// Whole job, one iteration.
FlopsBreakdown iteration_flops(const ModelSpec& model, const PlanSpec& plan);
// model_flops / (global_batch_size · s)
double model_flops_per_token(const ModelSpec& model, const PlanSpec& plan);

struct RankParams {
  std::int64_t dense = 0;   // everything but expert MLPs (router included)
  std::int64_t expert = 0;  // E/ep experts of every MoE layer on the stage
};

// Parameters held by one rank of pipeline stage pp_stage (before any ZeRO sharding).
RankParams rank_parameters(const ModelSpec& model, const PlanSpec& plan, int pp_stage);

// Per-rank training memory, bytes.
//   Activations (e = bytes(precision), T = (s/cp)·micro_batch tokens, t = tp; "(/t)" means divided
//   by t only with sequence parallelism). Dense layer: norm inputs 2·e·T·h (/t); QKV input e·T·h (/t);
//   Q e·T·a·d/t; K, V e·T·g_local·d each; attention core: flash → fp32 softmax statistics 4·T·a/t,
//   unfused → softmax output e·(a/t)·T·s (+ when attention_dropout > 0 mask 1·(a/t)·T·s and dropout
//   output e·(a/t)·T·s); output-projection input e·T·a·d/t; hidden_dropout > 0 → two masks 1·T·h (/t);
//   fc1 input e·T·h (/t); activation input e·T·f·(2 swiglu | 1 gelu)/t; fc2 input e·T·f/t.
//   MoE layer: attention part and first dropout mask as above, then with T' = T/t and
//   R = E·ceil(capacity_factor·T'·top_k/E) (moe_slots_per_expert): router input e·T'·h, router
//   probabilities 4·T'·E, routing 12·T'·top_k, expert fc1 input e·R·h, activation input
//   e·R·f_e·(2|1), fc2 input e·R·f_e, expert output e·R·h (the combine's backward needs it).
//   Selective recompute drops the attention-core terms. Full recompute keeps per layer only its input
//   e·T·h (/t), plus once per stage the largest layer's full activations (the layer being recomputed).
//   Extras: first stage embedding dropout mask 1·T·h (/t) when hidden_dropout > 0; last stage final
//   norm input e·T·h (/t), output-layer input e·T·h (/t), fp32 logits softmax 4·T·V_padded/t.
//   In flight (p = pp, m = micro-batches, v = vp, stage i): gpipe m; 1f1b and zero-bubble
//   min(p − i, m); interleaved min((p − i − 1)·2 + (v − 1)·p + 1, m·v) chunk-micro-batches, each
//   holding L/(p·v) layers. The extras count min(p − i, m) times (gpipe: m).
struct RankMemory {
  double weights = 0;
  double gradients = 0;
  double optimizer = 0;
  double activations = 0;
  double zero3_buffers = 0;
  // Last stage: the logits gradient (e·T·V/t) that exists once, during the loss backward, beside
  // the saved fp32 softmax; with a 128K vocabulary it is gigabytes.
  double loss_transient = 0;
  int in_flight = 0;  // micro-batches, or chunk-micro-batches for interleaved 1F1B
  double total() const { return weights + gradients + optimizer + activations + zero3_buffers + loss_transient; }
};

RankMemory training_memory(const ModelSpec& model, const PlanSpec& plan, int pp_stage);

// Inference KV cache on one tensor-parallel rank: 2·L·g_local·d·batch·seq_len·bytes(dtype).
std::int64_t kv_cache_bytes(const ModelSpec& model, std::int64_t batch, std::int64_t seq_len, int tp,
                            DType dtype);

}  // namespace px
