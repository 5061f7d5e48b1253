// A rank's coordinates, parameter ownership, initial weights and micro-batch feed.
#include "engine/backends/cpu/rank_context.hpp"

#include <algorithm>
#include <fmt/format.h>

#include "engine/backends/cpu/reference_model.hpp"
#include "engine/core/error.hpp"

namespace px::cpu {

using i64 = std::int64_t;

Operands operands(const Program& prog, const Op& op) {
  Operands o;
  for (const TensorUse& u : prog.uses_of(op)) (u.write ? o.out : o.in).push_back(u);
  return o;
}

RankContext::RankContext(const CompiledPlan& plan, int rank, const TokenSource& data, std::uint64_t seed)
    : plan_(plan),
      program_(plan.program_of(rank)),
      rank_(rank),
      coord_(plan.topology.coord(rank)),
      data_(data),
      seed_(seed),
      params_(model_parameters(plan.model, plan.padded_vocab)),
      dims_(param_dims(plan.model, plan.padded_vocab)),
      z_(local_dims(plan.model, plan.plan, plan.padded_vocab)) {
  const ModelSpec& m = plan.model;
  if (m.attention_dropout > 0)
    throw Error(ErrorKind::Usage, {m.file, 0, 0, -1}, "the engine has no attention dropout", "set attention_dropout: 0");
  if (m.num_query_groups % plan.plan.tp() != 0)
    throw Error(ErrorKind::Usage, {m.file, 0, 0, -1}, "the engine needs query groups divisible by tp",
                "choose tp dividing num_query_groups");
  if (data.vocab_size() > m.vocab_size)
    throw Error(ErrorKind::Usage, {m.file, 0, 0, -1},
                fmt::format("the data has {} token ids but the model's vocabulary is {}", data.vocab_size(), m.vocab_size),
                "use a model whose vocab_size covers the data");
}

int RankContext::group_index(GroupKind g) const { return plan_.topology.group_index(g, rank_); }

bool RankContext::reports_loss() const { return coord_.tp == 0 && coord_.pp == plan_.plan.pp() - 1; }

const LogicalParam& RankContext::slot_param(const ParamBuffer& b, const ParamSlot& s) const {
  if (b.shard_group != GroupKind::ExpertDP) return params_[s.param];
  // Slots name experts 0..E/ep-1; this rank holds experts ep_rank·E/ep onwards.
  const i64 per_expert = plan_.model.add_bias_linear ? 4 : 2;
  const i64 local = plan_.model.moe->num_experts / plan_.plan.ep();
  return params_[static_cast<std::size_t>(s.param + coord_.ep * local * per_expert)];
}

RankContext::Range RankContext::optimizer_range(const ParamBuffer& b) const {
  if (!b.optimizer_sharded) return {0, b.padded};
  const i64 block = b.padded / plan_.topology.size(b.shard_group);
  const i64 i = group_index(b.shard_group);
  return {i * block, (i + 1) * block};
}

RankContext::Range RankContext::owned(const ParamBuffer& b, const ParamSlot& s) const {
  const Range none{s.offset, s.offset};
  if (b.name == "word_embedding_copy") return none;  // the first stage counts the tied table
  if (b.shard_group == GroupKind::DP && params_[s.param].split == TpSplit::Replicated && coord_.tp != 0) return none;
  if (!b.optimizer_sharded) return group_index(b.shard_group) == 0 ? Range{s.offset, s.offset + s.count} : none;
  const Range r = optimizer_range(b);
  const i64 begin = std::max(s.offset, r.begin), end = std::min(s.offset + s.count, r.end);
  return begin < end ? Range{begin, end} : none;
}

RankContext::Range RankContext::held_owned(const ParamBuffer& b, const ParamSlot& s, bool sharded, i64 held) const {
  const i64 base = sharded ? optimizer_range(b).begin : 0;
  const Range o = owned(b, s);
  const i64 lo = std::max<i64>(o.begin - base, 0), hi = std::min<i64>(o.end - base, held);
  return lo < hi ? Range{lo, hi} : Range{0, 0};
}

void RankContext::initial_weights(const ParamBuffer& b, std::span<float> w) const {
  const i64 base = b.weight_sharded ? optimizer_range(b).begin : 0;
  std::fill(w.begin(), w.end(), 0.0f);
  for (const ParamSlot& s : b.slots) {
    const LogicalParam& p = slot_param(b, s);
    for (i64 li = 0; li < s.count; ++li) {
      const i64 i = s.offset + li - base;
      if (i < 0 || i >= static_cast<i64>(w.size())) continue;
      const i64 gi = b.shard_group == GroupKind::ExpertDP ? li : global_index(p, dims_, z_.tp, coord_.tp, li);
      w[static_cast<std::size_t>(i)] = static_cast<float>(initial_value(p, gi, seed_));
    }
  }
}

void RankContext::export_owned(const ParamBuffer& b, std::span<const float> held, bool sharded, Export what,
                               std::map<std::string, std::vector<double>>& out) const {
  const i64 base = sharded ? optimizer_range(b).begin : 0;
  for (const ParamSlot& s : b.slots) {
    const LogicalParam& p = slot_param(b, s);
    auto& full = out[p.name];
    if (full.empty()) full.assign(static_cast<std::size_t>(p.count()), 0.0);
    const Range r = held_owned(b, s, sharded, static_cast<i64>(held.size()));
    for (i64 at = r.begin; at < r.end; ++at) {
      const i64 li = at + base - s.offset;
      const i64 gi = b.shard_group == GroupKind::ExpertDP ? li : global_index(p, dims_, z_.tp, coord_.tp, li);
      full[static_cast<std::size_t>(gi)] = what == Export::Ownership ? 1.0 : held[static_cast<std::size_t>(at)];
    }
  }
}

void RankContext::begin_iteration(std::int64_t iteration) {
  iteration_ = iteration;
  micro_batch_ = -1;
}

void RankContext::fetch_micro_batch(std::int32_t mb) {
  if (mb == micro_batch_ || mb < 0) return;
  micro_batch_ = mb;
  const LocalDims& z = z_;
  const int dp = plan_.plan.dp(), dp_rank = plan_.topology.dp_rank(coord_);
  tokens_.assign(static_cast<std::size_t>(z.T), 0);
  targets_.assign(static_cast<std::size_t>(z.T), 0);
  positions_.assign(static_cast<std::size_t>(z.T), 0);
  samples_.assign(static_cast<std::size_t>(z.b), 0);
  std::vector<std::int32_t> seq(static_cast<std::size_t>(z.s)), next(static_cast<std::size_t>(z.s));
  for (i64 j = 0; j < z.b; ++j) {
    // Megatron's sampler: micro-batch mb of data-parallel rank r holds samples (mb·dp + r)·b + j.
    const i64 sample = (static_cast<i64>(mb) * dp + dp_rank) * z.b + j;
    samples_[static_cast<std::size_t>(j)] = sample;
    data_.sample(iteration_, sample, seq, next);
    for (i64 si = 0; si < z.S; ++si) {
      const i64 pos = coord_.cp * z.S + si;
      const auto row = static_cast<std::size_t>(si * z.b + j);
      tokens_[row] = seq[static_cast<std::size_t>(pos)];
      targets_[row] = next[static_cast<std::size_t>(pos)];
      positions_[row] = static_cast<std::int32_t>(pos);
    }
  }
}

std::vector<std::uint64_t> RankContext::dropout_keys(const Op& op, i64 rows) const {
  const LocalDims& z = z_;
  const DropoutSite site = op.variant == Variant::EmbeddingDropout ? DropoutSite::Embedding
                           : op.variant == Variant::AttentionResidual ? DropoutSite::Attention
                                                                      : DropoutSite::Mlp;
  const i64 first = z.sp && rows == z.Tres ? coord_.tp * z.Tres : 0;  // the sequence shard's rows
  std::vector<std::uint64_t> keys(static_cast<std::size_t>(rows));
  for (i64 r = 0; r < rows; ++r) {
    const i64 row = first + r, si = row / z.b, j = row % z.b;
    keys[static_cast<std::size_t>(r)] =
        dropout_row_key(iteration_, op.layer, site, samples_[static_cast<std::size_t>(j)], coord_.cp * z.S + si);
  }
  return keys;
}

}  // namespace px::cpu
