// The model's parameters as logical (unsharded) tensors with Megatron's names, shapes and
// tensor-parallel splits, and their initial values. Every element's initial value is a function
// of (seed, parameter, global element index) alone, so a rank initialises exactly its shard and
// any parallel plan starts from the very weights of the single-rank run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/spec/spec.hpp"

namespace px {

// How tensor parallelism splits a parameter [rows x cols] across tp ranks (Megatron-LM).
enum class TpSplit : std::uint8_t {
  Replicated,     // norms, row-parallel biases, position table, router, experts (not tensor-parallel)
  Columns,        // column-parallel output features (plain)
  QkvColumns,     // columns [Q heads | K groups | V groups]: each rank takes its heads and groups
  GatedColumns,   // SwiGLU fc1 columns [gate F | up F]: each rank takes its slice of both halves
  Rows,           // row-parallel input features; and the vocabulary rows of embedding/output
};

enum class ParamInit : std::uint8_t { Normal, Zero, One };

struct LogicalParam {
  std::string name;        // e.g. "layers.3.qkv.weight", "experts" live as "layers.1.experts.2.fc1.weight"
  int layer = -1;          // -1: not in a transformer layer
  int expert = -1;         // MoE expert index, -1 otherwise
  std::int64_t rows = 1, cols = 1;
  TpSplit split = TpSplit::Replicated;
  ParamInit init = ParamInit::Normal;
  double std = 0.02;
  std::int64_t count() const { return rows * cols; }
};

// Layout facts the splits need.
struct ParamDims {
  std::int64_t h = 0, heads = 0, groups = 0, d = 0, ffn = 0, vocab = 0;  // vocab: padded
};
ParamDims param_dims(const ModelSpec& model, int padded_vocab);

// Every parameter of the model, in a fixed order: embedding, position table, then per layer
// norm1, qkv, proj, norm2, (fc1, fc2 | router, experts), then final norm and output layer.
// Tied embeddings have no output entry. Initialisation follows Megatron: N(0, 0.02), output
// projections of each layer (proj, fc2) N(0, 0.02 / sqrt(2 L)), biases 0, norm weights 1.
std::vector<LogicalParam> model_parameters(const ModelSpec& model, int padded_vocab);

// Elements of rank tp_rank's shard, and the global (row-major) index of local element i.
std::int64_t shard_count(const LogicalParam& p, const ParamDims& dims, int tp);
std::int64_t global_index(const LogicalParam& p, const ParamDims& dims, int tp, int tp_rank, std::int64_t local);

// Initial value of element `index` (global, row-major) of parameter p.
double initial_value(const LogicalParam& p, std::int64_t index, std::uint64_t seed);

}  // namespace px
