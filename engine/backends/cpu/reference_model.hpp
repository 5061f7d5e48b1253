// The whole model on one rank: one micro-batch's forward and backward of the transformer language
// model, written directly on the CPU kernels with no op program and no parallelism. It is the
// oracle every parallel plan the engine executes is checked against, so it favours plainness over
// speed: full (unsharded) tensors keyed by the canonical names of engine/spec/parameters.hpp.
//
// Model (Megatron-LM GPT / Llama / Mixtral), rows sequence-major (row si * b + j):
//   x = dropout(word_emb[token] (+ pos_emb[si] when learned))
//   per layer l:  a = attention(rope(norm1(x) Wqkv (+b)))          causal, GQA, RoPE at position si
//                 x = x + dropout(a Wproj (+b))
//                 x = x + dropout(mlp(norm2(x)))                    GELU / SwiGLU MLP, or top-k MoE
//   loss = mean over the b * s tokens of cross_entropy(norm_f(x) W_out^T, target)
// over the padded vocabulary (padded rows take part in the softmax, as in Megatron). Tied models
// use word_embedding.weight as W_out.
//
// Dropout row keys (the distributed engine must reproduce them bit for bit). hidden_dropout p
// acts at three sites: the embedding output (layer -1), and each layer's attention and MLP
// branches. Element (row, col) of a site's [b*s x h] tensor, row = si * b + j, is dropped iff
//   dropped(opts.dropout_seed, dropout_row_key(opts.iteration, layer, site, sample_ids[j], si), col, p)
// (dropout.hpp), with
//   dropout_row_key(it, l, site, n, si) = mix_key(mix_key(mix_key(mix_key(it, l), site), n), si),
// each argument converted to std::uint64_t (two's complement, so layer -1 is 2^64 - 1), site
// Embedding 0, Attention 1, Mlp 2. The mask depends only on where an element sits in the global
// batch, never on how rows are sharded or grouped into micro-batches.
//
// MoE: capacity per expert = moe_capacity(model, b * s) over the micro-batch's tokens; slots fill
// in row order; the aux (load-balancing) loss of each MoE layer is router_forward's, summed.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/spec/spec.hpp"

namespace px::cpu {

template <class T>
using ParamMap = std::map<std::string, std::vector<T>>;  // name -> full tensor, row-major

// Every parameter of model_parameters(model, padded_vocab), element i = initial_value(p, i, seed).
template <class T>
ParamMap<T> init_parameters(const ModelSpec& model, int padded_vocab, std::uint64_t seed);

// Same names and sizes, all zero (a gradient accumulator).
template <class T>
ParamMap<T> zero_like(const ParamMap<T>& params);

struct MicroBatch {
  std::int64_t b = 0, s = 0;                   // sequences, positions
  std::vector<std::int32_t> tokens, targets;   // b * s each, row si * b + j
  std::vector<std::int64_t> sample_ids;        // b: global sample index of sequence j (dropout keys)
};

struct ReferenceOptions {
  double loss_scale = 1.0;          // gradients are loss_scale * d(loss + aux) / d param
  std::uint64_t dropout_seed = 0;
  std::int64_t iteration = 0;
  double moe_aux_coeff = 0.0;       // Switch load-balancing loss coefficient, per MoE layer
  bool moe_renormalize = true;      // top-k gates renormalised to sum 1 (Mixtral)
  double norm_eps = 1e-5;
};

struct ReferenceLoss {
  double lm = 0;   // mean cross-entropy over the micro-batch's tokens
  double aux = 0;  // MoE load-balancing loss, coefficient included, summed over MoE layers
};

enum class DropoutSite : std::uint8_t { Embedding = 0, Attention = 1, Mlp = 2 };

std::uint64_t dropout_row_key(std::int64_t iteration, int layer, DropoutSite site, std::int64_t sample,
                              std::int64_t position);

// ceil(capacity_factor * tokens * top_k / num_experts), rounding a hair above an integer down as
// model_math does.
std::int64_t moe_capacity(const ModelSpec& model, std::int64_t tokens);

// Forward and backward of one micro-batch: ADDS loss_scale * d(lm + aux) / d param into grads
// (which must hold every parameter, e.g. from zero_like) and returns both losses. Throws
// std::invalid_argument on inconsistent inputs or attention_dropout > 0 (not supported).
template <class T>
ReferenceLoss forward_backward(const ModelSpec& model, int padded_vocab, const ParamMap<T>& params, ParamMap<T>& grads,
                               const MicroBatch& batch, const ReferenceOptions& opts);

// The forward alone (what finite differences evaluate).
template <class T>
ReferenceLoss forward_loss(const ModelSpec& model, int padded_vocab, const ParamMap<T>& params, const MicroBatch& batch,
                           const ReferenceOptions& opts);

}  // namespace px::cpu
