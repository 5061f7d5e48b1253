// Logical parameters, their tensor-parallel shards and counter-based initial values.
#include "engine/spec/parameters.hpp"

#include <cassert>
#include <cmath>
#include <fmt/format.h>
#include <numbers>

#include "engine/core/hash.hpp"
#include "engine/spec/model_math.hpp"

namespace px {

ParamDims param_dims(const ModelSpec& m, int padded_vocab) {
  return {m.hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels, m.ffn_hidden_size, padded_vocab};
}

std::vector<LogicalParam> model_parameters(const ModelSpec& m, int padded_vocab) {
  const std::int64_t h = m.hidden_size, a = m.num_attention_heads, g = m.num_query_groups, d = m.kv_channels;
  const bool ln = m.norm == NormKind::LayerNorm, swiglu = m.activation == Activation::SwiGLU;
  const bool qkv_bias = m.add_bias_linear || m.add_qkv_bias;
  const double out_std = 0.02 / std::sqrt(2.0 * m.num_layers);
  std::vector<LogicalParam> ps;
  auto add = [&](std::string name, int layer, std::int64_t rows, std::int64_t cols, TpSplit split, ParamInit init, double sd = 0.02,
                 int expert = -1) { ps.push_back({std::move(name), layer, expert, rows, cols, split, init, sd}); };
  auto norm = [&](const std::string& prefix, int layer) {
    add(prefix + ".weight", layer, 1, h, TpSplit::Replicated, ParamInit::One);
    if (ln) add(prefix + ".bias", layer, 1, h, TpSplit::Replicated, ParamInit::Zero);
  };
  add("word_embedding.weight", -1, padded_vocab, h, TpSplit::Rows, ParamInit::Normal);
  if (m.position == PositionKind::Learned)
    add("position_embedding.weight", -1, m.max_position_embeddings, h, TpSplit::Replicated, ParamInit::Normal);
  for (int l = 0; l < m.num_layers; ++l) {
    const std::string p = fmt::format("layers.{}.", l);
    norm(p + "norm1", l);
    add(p + "qkv.weight", l, h, (a + 2 * g) * d, TpSplit::QkvColumns, ParamInit::Normal);
    if (qkv_bias) add(p + "qkv.bias", l, 1, (a + 2 * g) * d, TpSplit::QkvColumns, ParamInit::Zero);
    add(p + "proj.weight", l, a * d, h, TpSplit::Rows, ParamInit::Normal, out_std);
    if (m.add_bias_linear) add(p + "proj.bias", l, 1, h, TpSplit::Replicated, ParamInit::Zero);
    norm(p + "norm2", l);
    if (is_moe_layer(m, l)) {
      const std::int64_t fe = m.moe->ffn_hidden_size, fg = swiglu ? 2 * fe : fe;
      add(p + "router.weight", l, h, m.moe->num_experts, TpSplit::Replicated, ParamInit::Normal);
      for (int e = 0; e < m.moe->num_experts; ++e) {
        const std::string q = fmt::format("{}experts.{}.", p, e);
        add(q + "fc1.weight", l, h, fg, TpSplit::Replicated, ParamInit::Normal, 0.02, e);
        if (m.add_bias_linear) add(q + "fc1.bias", l, 1, fg, TpSplit::Replicated, ParamInit::Zero, 0.02, e);
        add(q + "fc2.weight", l, fe, h, TpSplit::Replicated, ParamInit::Normal, out_std, e);
        if (m.add_bias_linear) add(q + "fc2.bias", l, 1, h, TpSplit::Replicated, ParamInit::Zero, 0.02, e);
      }
    } else {
      const std::int64_t f = m.ffn_hidden_size, fg = swiglu ? 2 * f : f;
      const TpSplit split = swiglu ? TpSplit::GatedColumns : TpSplit::Columns;
      add(p + "fc1.weight", l, h, fg, split, ParamInit::Normal);
      if (m.add_bias_linear) add(p + "fc1.bias", l, 1, fg, split, ParamInit::Zero);
      add(p + "fc2.weight", l, f, h, TpSplit::Rows, ParamInit::Normal, out_std);
      if (m.add_bias_linear) add(p + "fc2.bias", l, 1, h, TpSplit::Replicated, ParamInit::Zero);
    }
  }
  norm("final_norm", -1);
  if (!m.tied_embeddings) add("output.weight", -1, padded_vocab, h, TpSplit::Rows, ParamInit::Normal);
  return ps;
}

std::int64_t shard_count(const LogicalParam& p, const ParamDims&, int tp) {
  return p.split == TpSplit::Replicated ? p.count() : p.count() / tp;
}

std::int64_t global_index(const LogicalParam& p, const ParamDims& D, int tp, int tp_rank, std::int64_t local) {
  if (p.split == TpSplit::Replicated || tp == 1) return local;
  if (p.split == TpSplit::Rows) return static_cast<std::int64_t>(tp_rank) * (p.count() / tp) + local;
  const std::int64_t local_cols = p.cols / tp, row = local / local_cols, c = local % local_cols;
  std::int64_t col = 0;
  switch (p.split) {
    case TpSplit::Columns: col = tp_rank * local_cols + c; break;
    case TpSplit::GatedColumns: {
      const std::int64_t half = local_cols / 2;  // [gate f/tp | up f/tp] locally
      col = c < half ? tp_rank * half + c : p.cols / 2 + tp_rank * half + (c - half);
      break;
    }
    case TpSplit::QkvColumns: {
      assert(D.groups % tp == 0 && "query groups must divide among tensor-parallel ranks");
      const std::int64_t q = D.heads / tp * D.d, kv = D.groups / tp * D.d;
      if (c < q)
        col = tp_rank * q + c;
      else if (c < q + kv)
        col = D.heads * D.d + tp_rank * kv + (c - q);
      else
        col = (D.heads + D.groups) * D.d + tp_rank * kv + (c - q - kv);
      break;
    }
    default: assert(false);
  }
  return row * p.cols + col;
}

double initial_value(const LogicalParam& p, std::int64_t index, std::uint64_t seed) {
  switch (p.init) {
    case ParamInit::Zero: return 0.0;
    case ParamInit::One: return 1.0;
    case ParamInit::Normal: break;
  }
  // Box-Muller on two counter-based uniforms: the value depends on nothing but its coordinates.
  const std::uint64_t base = splitmix64(seed ^ fnv1a(p.name)) ^ static_cast<std::uint64_t>(index) * 0xd1b54a32d192ed03ULL;
  const double u1 = (static_cast<double>(splitmix64(base) >> 11) + 0.5) * 0x1.0p-53;
  const double u2 = static_cast<double>(splitmix64(base + 1) >> 11) * 0x1.0p-53;
  return p.std * std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

}  // namespace px
