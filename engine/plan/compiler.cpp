// The plan compiler. For each pipeline stage it walks the stage's schedule and emits, per pass,
// the ops of every layer in its chunk: forward, backward (split into B and W for zero-bubble),
// recompute, the TP/SP/CP/EP collectives around them, pipeline sends and receives, ZeRO gathers
// and gradient reductions, and the optimizer tail. Cross-stream dependencies come from data flow:
// an op waits for the last writer of every tensor it touches when that writer is on another stream.
#include "engine/plan/compiler.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>

#include "engine/spec/model_math.hpp"

namespace px {
namespace {

using i64 = std::int64_t;
inline i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// Per-rank sizes every emitter needs.
struct Dims {
  i64 h, a_l, g_l, d, f_l, V_l, s, S, b, T, Tres, e, gb;
  i64 qkv_cols;  // (a_l + 2 g_l) d
  int tp, cp, ep;
  bool sp, flash, swiglu, rope, bias, qkv_bias, layernorm, hidden_dropout, attn_dropout;
  // MoE
  i64 E = 0, E_l = 0, fe = 0, top_k = 0, capacity = 0, R = 0;
  i64 gated() const { return swiglu ? 2 : 1; }
};

Dims make_dims(const ModelSpec& M, const PlanSpec& P, int padded_vocab) {
  Dims D{};
  D.tp = P.tp();
  D.cp = P.cp();
  D.ep = P.ep();
  D.h = M.hidden_size;
  D.d = M.kv_channels;
  D.a_l = M.num_attention_heads / D.tp;
  D.g_l = local_query_groups(M.num_query_groups, D.tp);
  D.qkv_cols = (D.a_l + 2 * D.g_l) * D.d;
  D.f_l = M.ffn_hidden_size / D.tp;
  D.V_l = padded_vocab / D.tp;
  D.s = P.seq_length;
  D.S = D.s / D.cp;
  D.b = P.micro_batch_size;
  D.T = D.S * D.b;
  D.sp = P.sequence_parallel && D.tp > 1;
  D.Tres = D.sp ? D.T / D.tp : D.T;
  D.e = static_cast<i64>(dtype_bytes(P.precision));
  D.gb = static_cast<i64>(dtype_bytes(P.grad_dtype));
  D.flash = P.use_flash_attn;
  D.swiglu = M.activation == Activation::SwiGLU;
  D.rope = M.position == PositionKind::Rope;
  D.bias = M.add_bias_linear;
  D.qkv_bias = M.add_bias_linear || M.add_qkv_bias;
  D.layernorm = M.norm == NormKind::LayerNorm;
  D.hidden_dropout = M.hidden_dropout > 0;
  D.attn_dropout = M.attention_dropout > 0;
  if (M.is_moe()) {
    D.E = M.moe->num_experts;
    D.E_l = D.E / D.ep;
    D.fe = M.moe->ffn_hidden_size;
    D.top_k = M.moe->top_k;
    // Per-expert capacity for the tokens the whole EP group routes, so that E_l * capacity is the
    // number of routed tokens this rank receives (cf * T * k under uniform routing).
    D.capacity = static_cast<i64>(std::ceil(M.moe->capacity_factor * static_cast<double>(D.Tres * D.top_k * D.ep) /
                                            static_cast<double>(D.E)));
    D.R = D.E_l * D.capacity;
  }
  return D;
}

// Parameter counts of one layer as held by one rank (tensor-parallel shards), split the way
// gradients are reduced: tp-sharded dense params, replicated params, expert params.
struct LayerParams {
  i64 norm = 0;       // per norm
  i64 qkv_w = 0, qkv_b = 0, proj_w = 0, proj_b = 0;
  i64 fc1_w = 0, fc1_b = 0, fc2_w = 0, fc2_b = 0;  // dense MLP
  i64 router = 0, expert = 0;                        // MoE: router (replicated), all local experts
  i64 sharded() const { return qkv_w + qkv_b + proj_w + fc1_w + fc1_b + fc2_w; }
  i64 replicated() const { return 2 * norm + proj_b + fc2_b + router; }
};

LayerParams layer_params(const Dims& D, bool moe) {
  LayerParams p;
  p.norm = D.layernorm ? 2 * D.h : D.h;
  p.qkv_w = D.h * D.qkv_cols;
  p.qkv_b = D.qkv_bias ? D.qkv_cols : 0;
  p.proj_w = D.a_l * D.d * D.h;
  p.proj_b = D.bias ? D.h : 0;
  if (moe) {
    p.router = D.h * D.E;
    const i64 per_expert = D.h * D.fe * D.gated() + D.fe * D.h + (D.bias ? D.fe * D.gated() + D.h : 0);
    p.expert = D.E_l * per_expert;
  } else {
    p.fc1_w = D.h * D.f_l * D.gated();
    p.fc1_b = D.bias ? D.f_l * D.gated() : 0;
    p.fc2_w = D.f_l * D.h;
    p.fc2_b = D.bias ? D.h : 0;
  }
  return p;
}

// Tensors a layer's forward leaves for its backward.
struct LayerActs {
  std::uint32_t x_in = 0, ln1_out = 0, qkv = 0, stats = 0, attn_out = 0, mask1 = 0, x_mid = 0;
  std::uint32_t ln2_out = 0, fc1_out = 0, act_out = 0, mask2 = 0, x_out = 0;
  std::uint32_t probs = 0, expert_in = 0;  // MoE
  bool has_mask = false;
};

// Weight tensors of a layer on this rank.
struct LayerWeights {
  std::uint32_t norm1 = 0, qkv = 0, proj = 0, norm2 = 0, fc1 = 0, fc2 = 0, router = 0, experts = 0;
  std::uint32_t grad = 0;         // persistent (shard of the) tp-sharded dense gradients
  std::uint32_t grad_expert = 0;  // persistent (shard of the) expert gradients
  LayerParams params;
  bool moe = false;
  std::vector<std::uint32_t> dense_weights() const {
    return moe ? std::vector<std::uint32_t>{norm1, qkv, proj, norm2, router} : std::vector<std::uint32_t>{norm1, qkv, proj, norm2, fc1, fc2};
  }
};

class StageCompiler {
 public:
  StageCompiler(const ModelSpec& M, const PlanSpec& P, const Dims& D, int stage, int padded_vocab,
                const std::vector<PipelinePass>& passes)
      : M_(M), P_(P), D_(D), stage_(stage), vocab_(padded_vocab), passes_(passes) {
    prog_.pp_stage = stage;
    p_ = P.pp();
    v_ = P.vp();
    m_ = P.num_micro_batches();
    dp_group_ = P.dp() * P.cp();
    edp_group_ = P.tp() * P.cp() * P.dp() / P.ep();
    split_w_ = P.schedule == PipelineSchedule::ZeroBubble;
  }

  Program compile() {
    make_persistent_tensors();
    std::vector<int> finished(static_cast<std::size_t>(v_), 0);  // gradient passes done per chunk
    for (const PipelinePass& pass : passes_) {
      mb_ = pass.micro_batch;
      chunk_ = pass.chunk;
      switch (pass.kind) {
        case PassKind::F: forward_pass(); break;
        case PassKind::B: backward_pass(!split_w_ && ++finished[chunk_] == m_); break;
        case PassKind::W: weight_pass(++finished[chunk_] == m_); break;
      }
    }
    optimizer_tail();
    const auto last = static_cast<std::uint32_t>(prog_.ops.empty() ? 0 : prog_.ops.size() - 1);
    for (auto& t : prog_.tensors)
      if (is_persistent(t.cls)) {
        t.first_op = 0;
        t.last_op = last;
      }
    return std::move(prog_);
  }

 private:
  // ---- program building ----
  std::uint32_t name(std::string_view s) {
    auto it = name_ids_.find(std::string(s));
    if (it != name_ids_.end()) return it->second;
    const auto id = static_cast<std::uint32_t>(prog_.names.size());
    prog_.names.emplace_back(s);
    name_ids_.emplace(std::string(s), id);
    return id;
  }

  std::uint32_t tensor(std::string_view nm, i64 bytes, TensorClass cls) {
    assert(bytes >= 0);
    Tensor t;
    t.bytes = bytes;
    t.name = name(nm);
    t.cls = cls;
    prog_.tensors.push_back(t);
    last_writer_.push_back(-1);
    return static_cast<std::uint32_t>(prog_.tensors.size() - 1);
  }

  Op make(OpKind kind, std::string_view nm, Stream stream = Stream::Compute) {
    Op op;
    op.kind = kind;
    op.name = name(nm);
    op.phase = phase_;
    op.stream = stream;
    op.layer = layer_;
    op.micro_batch = mb_;
    op.chunk = static_cast<std::uint8_t>(chunk_);
    op.dtype = P_.precision;
    return op;
  }

  std::uint32_t emit(Op op, std::initializer_list<std::uint32_t> reads, std::initializer_list<std::uint32_t> writes,
                     std::initializer_list<std::uint32_t> extra_deps = {}) {
    const auto idx = static_cast<std::uint32_t>(prog_.ops.size());
    op.deps_begin = static_cast<std::uint32_t>(prog_.deps.size());
    op.uses_begin = static_cast<std::uint32_t>(prog_.uses.size());
    auto depend = [&](std::int32_t on) {
      if (on < 0 || prog_.ops[static_cast<std::size_t>(on)].stream == op.stream) return;
      const auto u = static_cast<std::uint32_t>(on);
      for (std::uint32_t i = op.deps_begin; i < prog_.deps.size(); ++i)
        if (prog_.deps[i] == u) return;
      prog_.deps.push_back(u);
    };
    for (auto d : extra_deps) depend(static_cast<std::int32_t>(d));
    for (auto t : reads) {
      if (std::count_if(prog_.uses.begin() + op.uses_begin, prog_.uses.end(), [t](const TensorUse& u) { return u.tensor == t; }))
        continue;  // the same tensor passed twice (e.g. the local key/value block of a one-step ring)
      depend(last_writer_[t]);
      prog_.uses.push_back({t, false});
      prog_.tensors[t].last_op = std::max(prog_.tensors[t].last_op, idx);
    }
    for (auto t : writes) {
      depend(last_writer_[t]);
      prog_.uses.push_back({t, true});
      Tensor& tt = prog_.tensors[t];
      if (last_writer_[t] < 0 && !is_persistent(tt.cls)) tt.first_op = idx;
      tt.last_op = std::max(tt.last_op, idx);
      last_writer_[t] = static_cast<std::int32_t>(idx);
    }
    op.deps_end = static_cast<std::uint32_t>(prog_.deps.size());
    op.uses_end = static_cast<std::uint32_t>(prog_.uses.size());
    prog_.ops.push_back(op);
    return idx;
  }

  // ---- op helpers ----
  std::uint32_t gemm(std::string_view nm, i64 m, i64 n, i64 k, i64 batch, std::initializer_list<std::uint32_t> reads,
                     std::initializer_list<std::uint32_t> writes) {
    Op op = make(OpKind::Gemm, nm);
    op.m = m;
    op.n = n;
    op.k = k;
    op.batch = batch;
    op.flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) * static_cast<double>(batch);
    op.bytes_read = D_.e * (m * k + k * n) * batch;
    op.bytes_written = D_.e * m * n * batch;
    return emit(op, reads, writes);
  }

  // A forward GEMM y[m x n] = x[m x k] w[k x n] (batched over `batch` experts).
  void gemm_fwd(std::string_view nm, i64 m, i64 n, i64 k, i64 batch, std::uint32_t x, std::uint32_t w, std::uint32_t y) {
    gemm(nm, m, n, k, batch, {x, w}, {y});
  }
  // Its input gradient dx[m x k] = dy[m x n] w^T.
  void gemm_dgrad(std::string_view nm, i64 m, i64 n, i64 k, i64 batch, std::uint32_t dy, std::uint32_t w, std::uint32_t dx) {
    gemm(nm, m, k, n, batch, {dy, w}, {dx});
  }
  // Its weight gradient dw[k x n] += x^T dy, accumulated into grad.
  void gemm_wgrad(std::string_view nm, i64 m, i64 n, i64 k, i64 batch, std::uint32_t x, std::uint32_t dy, std::uint32_t grad) {
    gemm(nm, k, n, m, batch, {x, dy, grad}, {grad});
  }

  std::uint32_t elementwise(OpKind kind, std::string_view nm, i64 rows, i64 cols, double flops_per_elem,
                            std::initializer_list<std::uint32_t> reads, std::initializer_list<std::uint32_t> writes) {
    Op op = make(kind, nm);
    op.m = rows;
    op.n = cols;
    op.vector_flops = flops_per_elem * static_cast<double>(rows * cols);
    i64 rb = 0, wb = 0;
    for (auto t : reads) rb += prog_.tensors[t].bytes;
    for (auto t : writes) wb += prog_.tensors[t].bytes;
    op.bytes_read = rb;
    op.bytes_written = wb;
    return emit(op, reads, writes);
  }

  std::uint32_t comm(OpKind kind, GroupKind g, std::string_view nm, i64 bytes, Stream stream,
                     std::initializer_list<std::uint32_t> reads, std::initializer_list<std::uint32_t> writes,
                     std::int8_t peer = 0, std::optional<DType> dtype = {}) {
    Op op = make(kind, nm, stream);
    op.group = g;
    op.peer = peer;
    op.comm_bytes = bytes;
    if (dtype) op.dtype = *dtype;
    return emit(op, reads, writes);
  }
  // Gradient traffic: `count` elements in the main-gradient dtype (fp32 under Megatron's bf16).
  std::uint32_t grad_comm(OpKind kind, GroupKind g, std::string_view nm, i64 count, Stream stream,
                          std::initializer_list<std::uint32_t> reads, std::initializer_list<std::uint32_t> writes) {
    return comm(kind, g, nm, D_.gb * count, stream, reads, writes, 0, P_.grad_dtype);
  }

  // TP "g" after a row-parallel GEMM: all-reduce in place, or reduce-scatter to sequence shards.
  std::uint32_t tp_reduce(std::string_view nm, std::uint32_t full) {
    if (D_.tp == 1) return full;
    if (!D_.sp) {
      comm(OpKind::AllReduce, GroupKind::TP, nm, D_.e * D_.T * D_.h, Stream::TensorComm, {full}, {full});
      return full;
    }
    const auto out = tensor(nm, D_.e * D_.Tres * D_.h, TensorClass::Temporary);
    comm(OpKind::ReduceScatter, GroupKind::TP, nm, D_.e * D_.T * D_.h, Stream::TensorComm, {full}, {out});
    return out;
  }
  // SP gather of sequence shards before a column-parallel GEMM (identity without SP).
  std::uint32_t sp_gather(std::string_view nm, std::uint32_t shard) {
    if (!D_.sp) return shard;
    const auto out = tensor(nm, D_.e * D_.T * D_.h, TensorClass::Temporary);
    comm(OpKind::AllGather, GroupKind::TP, nm, D_.e * D_.T * D_.h, Stream::TensorComm, {shard}, {out});
    return out;
  }

  // ---- persistent tensors ----
  i64 shard(i64 count, int group, int min_stage) const {
    return P_.zero_stage >= min_stage && group > 1 ? ceil_div(count, group) : count;
  }
  std::uint32_t weight(std::string_view nm, i64 count, int group = 0) {
    const int g = group ? group : dp_group_;
    return tensor(nm, D_.e * shard(count, g, 3), TensorClass::Weight);
  }

  void make_persistent_tensors() {
    i64 dense_total = 0, expert_total = 0;
    for (int c = 0; c < v_; ++c) {
      const LayerRange r = chunk_layers(M_, P_, stage_, c);
      for (int l = r.first; l < r.first + r.count; ++l) {
        LayerWeights w;
        w.moe = is_moe_layer(M_, l);
        w.params = layer_params(D_, w.moe);
        const LayerParams& p = w.params;
        w.norm1 = weight("norm1.weight", p.norm);
        w.qkv = weight("qkv.weight", p.qkv_w + p.qkv_b);
        w.proj = weight("proj.weight", p.proj_w + p.proj_b);
        w.norm2 = weight("norm2.weight", p.norm);
        if (w.moe) {
          w.router = weight("router.weight", p.router);
          w.experts = weight("experts.weight", p.expert, edp_group_);
          w.grad_expert = tensor("experts.grad", D_.gb * shard(p.expert, edp_group_, 2), TensorClass::Gradient);
          expert_total += p.expert;
        } else {
          w.fc1 = weight("fc1.weight", p.fc1_w + p.fc1_b);
          w.fc2 = weight("fc2.weight", p.fc2_w + p.fc2_b);
        }
        w.grad = tensor("layer.grad", D_.gb * shard(p.sharded(), dp_group_, 2), TensorClass::Gradient);
        repl_params_ += p.replicated();
        dense_total += p.sharded() + p.replicated();
        layers_.emplace(l, w);
      }
    }
    const bool first = stage_ == 0, last = stage_ == p_ - 1;
    const i64 word = static_cast<i64>(vocab_) * D_.h / D_.tp;
    if (first) {
      word_emb_ = weight("word_embedding.weight", word);
      emb_params_ = word;
      if (M_.position == PositionKind::Learned) {
        pos_params_ = static_cast<i64>(M_.max_position_embeddings) * D_.h;
        pos_emb_ = weight("position_embedding.weight", pos_params_);
        repl_params_ += static_cast<i64>(M_.max_position_embeddings) * D_.h;
        dense_total += static_cast<i64>(M_.max_position_embeddings) * D_.h;
      }
      dense_total += word;
    }
    if (last) {
      final_norm_params_ = D_.layernorm ? 2 * D_.h : D_.h;
      final_norm_ = weight("final_norm.weight", final_norm_params_);
      repl_params_ += D_.layernorm ? 2 * D_.h : D_.h;
      dense_total += D_.layernorm ? 2 * D_.h : D_.h;
      if (M_.tied_embeddings && first) {
        out_w_ = word_emb_;  // one tensor serves both ends
      } else {
        out_w_ = weight(M_.tied_embeddings ? "word_embedding_copy.weight" : "output.weight", word);
        out_params_ = word;
        dense_total += word;
      }
    }
    if (first) grad_emb_ = tensor("embedding.grad", D_.gb * shard(emb_params_, dp_group_, 2), TensorClass::Gradient);
    if (last && out_params_ > 0)
      grad_out_ = tensor("output.grad", D_.gb * shard(out_params_, dp_group_, 2), TensorClass::Gradient);
    else if (last)
      grad_out_ = grad_emb_;
    // Replicated parameters (norms, row-parallel biases, position table, router) accumulate full
    // gradients over all micro-batches, whatever the ZeRO stage; they are reduced once at the end.
    grad_repl_ = tensor("replicated.grad", D_.gb * repl_params_, TensorClass::Gradient);
    dense_params_ = dense_total;
    expert_params_ = expert_total;
    if (!P_.optimizer_offload) {
      const i64 per_param = P_.precision == DType::F32 ? 8 : 12;
      const i64 opt = per_param * (shard(dense_total, dp_group_, 1) + shard(expert_total, edp_group_, 1));
      optimizer_ = tensor("optimizer.state", opt, TensorClass::Optimizer);
    }
  }

  // ---- ZeRO-3 gathers ----
  // Gathers a layer's weights (issued one layer ahead, so two are alive at once, as with prefetch).
  std::uint32_t gather_layer(int l) {
    const LayerWeights& w = layers_.at(l);
    const auto g = tensor("zero3.gathered", D_.e * (w.params.sharded() + w.params.replicated()), TensorClass::Gathered);
    const auto idx = comm(OpKind::AllGather, GroupKind::DP, "zero3.all_gather", D_.e * (w.params.sharded() + w.params.replicated()),
                          Stream::DataComm, {}, {g});
    for (auto t : w.dense_weights()) add_read(idx, t);
    if (w.moe && edp_group_ > 1) {
      const auto ge = tensor("zero3.gathered_experts", D_.e * w.params.expert, TensorClass::Gathered);
      comm(OpKind::AllGather, GroupKind::ExpertDP, "zero3.all_gather_experts", D_.e * w.params.expert, Stream::DataComm,
           {w.experts}, {ge});
      gathered_experts_[l] = ge;
    }
    return g;
  }
  bool zero3() const { return P_.zero_stage == 3 && dp_group_ > 1; }

  // Weight tensor an op of layer l reads: the gathered copy under ZeRO-3.
  std::uint32_t W(int l, std::uint32_t own) const {
    auto it = gathered_.find(l);
    return it == gathered_.end() ? own : it->second;
  }
  std::uint32_t WE(int l) const {
    auto it = gathered_experts_.find(l);
    return it == gathered_experts_.end() ? layers_.at(l).experts : it->second;
  }
  void prefetch(const std::vector<int>& order, std::size_t i) {
    if (!zero3()) return;
    if (i == 0 && !gathered_.count(order[0])) gathered_[order[0]] = gather_layer(order[0]);
    if (i + 1 < order.size()) gathered_[order[i + 1]] = gather_layer(order[i + 1]);
  }

  // ---- gradients ----
  // Under ZeRO-2/3 each micro-batch's full gradients of a layer are reduce-scattered at once; they
  // accumulate into a transient full-size buffer first.
  std::uint32_t grad_target(int l, bool expert) {
    const LayerWeights& w = layers_.at(l);
    if (P_.zero_stage < 2 || (expert ? edp_group_ : dp_group_) == 1) return expert ? w.grad_expert : w.grad;
    auto& slot = expert ? grad_bucket_expert_[l] : grad_bucket_[l];
    if (!slot) slot = tensor("grad.bucket", D_.gb * (expert ? w.params.expert : w.params.sharded()), TensorClass::Gathered);
    return *slot;
  }

  // After a layer's gradients for this pass are complete: reduce them (every micro-batch under
  // ZeRO-2/3, once after the last micro-batch otherwise).
  void reduce_layer_grads(int l, bool last_pass) {
    const LayerWeights& w = layers_.at(l);
    auto reduce = [&](bool expert) {
      const int group = expert ? edp_group_ : dp_group_;
      if (group == 1) return;
      const GroupKind gk = expert ? GroupKind::ExpertDP : GroupKind::DP;
      const i64 count = expert ? w.params.expert : w.params.sharded();
      const std::uint32_t persistent = expert ? w.grad_expert : w.grad;
      if (P_.zero_stage >= 2) {
        auto& slot = expert ? grad_bucket_expert_[l] : grad_bucket_[l];
        if (!slot) return;
        grad_comm(OpKind::ReduceScatter, gk, "grad.reduce_scatter", count, Stream::DataComm, {*slot, persistent}, {persistent});
        slot.reset();
      } else if (last_pass) {
        grad_comm(P_.zero_stage == 1 ? OpKind::ReduceScatter : OpKind::AllReduce, gk,
                  P_.zero_stage == 1 ? "grad.reduce_scatter" : "grad.all_reduce", count, Stream::DataComm, {persistent},
                  {persistent});
      }
    };
    reduce(false);
    if (w.moe) reduce(true);
  }

  // ---- layers ----
  LayerActs layer_forward(int l, std::uint32_t x_in) {
    const LayerWeights& w = layers_.at(l);
    const bool keep = phase_ == Phase::Recompute || P_.recompute != Recompute::Full;
    const TensorClass act = keep ? TensorClass::Activation : TensorClass::Temporary;
    const TensorClass core_cls =
        keep && (P_.recompute == Recompute::None || phase_ == Phase::Recompute) ? TensorClass::Activation : TensorClass::Temporary;
    const double norm_flops = D_.layernorm ? 8.0 : 5.0;
    LayerActs A;
    A.x_in = x_in;
    // attention block
    A.ln1_out = tensor("ln1.out", D_.e * D_.Tres * D_.h, act);
    elementwise(OpKind::Norm, "ln1", D_.Tres, D_.h, norm_flops, {x_in, W(l, w.norm1)}, {A.ln1_out});
    const auto qkv_in = sp_gather("ln1.all_gather", A.ln1_out);
    A.qkv = tensor("qkv.out", D_.e * D_.T * D_.qkv_cols, act);
    gemm_fwd("qkv", D_.T, D_.qkv_cols, D_.h, 1, qkv_in, W(l, w.qkv), A.qkv);
    if (D_.rope) elementwise(OpKind::Rope, "rope", D_.T, (D_.a_l + D_.g_l) * D_.d, 6.0, {A.qkv}, {A.qkv});
    attention_forward(A, core_cls, act);
    const auto proj = tensor("proj.out", D_.e * D_.T * D_.h, TensorClass::Temporary);
    gemm_fwd("proj", D_.T, D_.h, D_.a_l * D_.d, 1, A.attn_out, W(l, w.proj), proj);
    const auto branch1 = tp_reduce("proj.tp_reduce", proj);
    A.x_mid = tensor("residual1.out", D_.e * D_.Tres * D_.h, act);
    A.has_mask = D_.hidden_dropout;
    if (A.has_mask) {
      A.mask1 = tensor("dropout1.mask", D_.Tres * D_.h, act);
      elementwise(OpKind::DropoutAdd, "dropout_add1", D_.Tres, D_.h, 3.0, {branch1, x_in}, {A.x_mid, A.mask1});
    } else {
      elementwise(OpKind::DropoutAdd, "residual_add1", D_.Tres, D_.h, 1.0, {branch1, x_in}, {A.x_mid});
    }
    // MLP block
    A.ln2_out = tensor("ln2.out", D_.e * D_.Tres * D_.h, act);
    elementwise(OpKind::Norm, "ln2", D_.Tres, D_.h, norm_flops, {A.x_mid, W(l, w.norm2)}, {A.ln2_out});
    const auto branch2 = w.moe ? moe_forward(l, A, act) : mlp_forward(l, A, act);
    A.x_out = tensor("residual2.out", D_.e * D_.Tres * D_.h, TensorClass::Activation);
    if (A.has_mask) {
      A.mask2 = tensor("dropout2.mask", D_.Tres * D_.h, act);
      elementwise(OpKind::DropoutAdd, "dropout_add2", D_.Tres, D_.h, 3.0, {branch2, A.x_mid}, {A.x_out, A.mask2});
    } else {
      elementwise(OpKind::DropoutAdd, "residual_add2", D_.Tres, D_.h, 1.0, {branch2, A.x_mid}, {A.x_out});
    }
    return A;
  }

  double attention_flops(i64 keys) const {
    return 4.0 * static_cast<double>(D_.b * D_.a_l) * static_cast<double>(D_.S) * static_cast<double>(keys) *
           static_cast<double>(D_.d);
  }

  // Saved softmax statistics (flash) or probabilities (unfused) of one attention call.
  std::uint32_t attention_stats(TensorClass cls) {
    if (D_.flash) return tensor("attention.lse", 4 * D_.b * D_.a_l * D_.S, cls);
    i64 bytes = D_.e * D_.b * D_.a_l * D_.S * D_.s;
    if (D_.attn_dropout) bytes += (1 + D_.e) * D_.b * D_.a_l * D_.S * D_.s;  // mask and dropped probabilities
    return tensor("attention.softmax", bytes, cls);
  }

  Op attention_op(std::string_view nm, i64 keys, double flops_factor) {
    Op op = make(OpKind::AttentionCore, nm);
    op.m = D_.S;
    op.n = keys;
    op.k = D_.d;
    op.batch = D_.b * D_.a_l;
    op.flops = flops_factor * attention_flops(keys);
    op.vector_flops = flops_factor * 5.0 * static_cast<double>(D_.b * D_.a_l * D_.S * keys);
    op.bytes_read = D_.e * D_.T * D_.qkv_cols;
    op.bytes_written = D_.e * D_.T * D_.a_l * D_.d;
    return op;
  }

  // Causal attention, as cp steps of a ring (Liu et al., ring attention): each key/value block
  // moves on to the next CP rank while the current one is computed. Without CP, one step.
  template <class Step>
  void attention_ring(std::string_view ring_name, i64 block_bytes, std::uint32_t qkv, Step step) {
    std::uint32_t kv = qkv;
    for (int i = 0; i < D_.cp; ++i) {
      std::uint32_t next = kv;
      if (i + 1 < D_.cp) {
        next = tensor(ring_name, block_bytes, TensorClass::Temporary);
        comm(OpKind::RingExchange, GroupKind::CP, ring_name, block_bytes, Stream::TensorComm, {kv}, {next}, 1);
      }
      step(kv);
      kv = next;
    }
  }

  void attention_forward(LayerActs& A, TensorClass core_cls, TensorClass act) {
    A.stats = attention_stats(core_cls);
    A.attn_out = tensor("attention.out", D_.e * D_.T * D_.a_l * D_.d, act);
    attention_ring("attention.kv_ring", 2 * D_.e * D_.T * D_.g_l * D_.d, A.qkv, [&](std::uint32_t kv) {
      emit(attention_op("attention", D_.S, 1.0), {A.qkv, kv}, {A.attn_out, A.stats});
    });
  }

  std::uint32_t mlp_forward(int l, LayerActs& A, TensorClass act) {
    const LayerWeights& w = layers_.at(l);
    const auto fc_in = sp_gather("ln2.all_gather", A.ln2_out);
    A.fc1_out = tensor("fc1.out", D_.e * D_.T * D_.f_l * D_.gated(), act);
    gemm_fwd("fc1", D_.T, D_.f_l * D_.gated(), D_.h, 1, fc_in, W(l, w.fc1), A.fc1_out);
    A.act_out = tensor("activation.out", D_.e * D_.T * D_.f_l, act);
    elementwise(OpKind::Activation, D_.swiglu ? "swiglu" : "gelu", D_.T, D_.f_l, D_.swiglu ? 6.0 : 10.0, {A.fc1_out}, {A.act_out});
    const auto fc2 = tensor("fc2.out", D_.e * D_.T * D_.h, TensorClass::Temporary);
    gemm_fwd("fc2", D_.T, D_.h, D_.f_l, 1, A.act_out, W(l, w.fc2), fc2);
    return tp_reduce("fc2.tp_reduce", fc2);
  }

  std::uint32_t moe_forward(int l, LayerActs& A, TensorClass act) {
    const LayerWeights& w = layers_.at(l);
    const i64 tok = D_.Tres;  // MoE with tp > 1 requires sequence parallelism: tokens stay sharded
    const auto logits = tensor("router.logits", D_.e * tok * D_.E, TensorClass::Temporary);
    gemm_fwd("router", tok, D_.E, D_.h, 1, A.ln2_out, W(l, w.router), logits);
    A.probs = tensor("router.probs", 4 * tok * D_.E, act);
    elementwise(OpKind::Router, "router.topk", tok, D_.E, 8.0, {logits}, {A.probs});
    const auto dispatch = tensor("moe.permuted", D_.e * D_.R * D_.h, D_.ep > 1 ? TensorClass::Temporary : act);
    elementwise(OpKind::Permute, "moe.permute", D_.R, D_.h, 0.0, {A.ln2_out, A.probs}, {dispatch});
    A.expert_in = dispatch;
    if (D_.ep > 1) {
      A.expert_in = tensor("moe.expert_in", D_.e * D_.R * D_.h, act);
      comm(OpKind::AllToAll, GroupKind::EP, "moe.dispatch", D_.e * D_.R * D_.h, Stream::TensorComm, {dispatch}, {A.expert_in});
    }
    A.fc1_out = tensor("expert_fc1.out", D_.e * D_.R * D_.fe * D_.gated(), act);
    gemm_fwd("expert_fc1", D_.capacity, D_.fe * D_.gated(), D_.h, D_.E_l, A.expert_in, WE(l), A.fc1_out);
    A.act_out = tensor("expert_activation.out", D_.e * D_.R * D_.fe, act);
    elementwise(OpKind::Activation, D_.swiglu ? "expert_swiglu" : "expert_gelu", D_.R, D_.fe, D_.swiglu ? 6.0 : 10.0,
                {A.fc1_out}, {A.act_out});
    auto out = tensor("expert_fc2.out", D_.e * D_.R * D_.h, TensorClass::Temporary);
    gemm_fwd("expert_fc2", D_.capacity, D_.h, D_.fe, D_.E_l, A.act_out, WE(l), out);
    if (D_.ep > 1) {
      const auto back = tensor("moe.combined", D_.e * D_.R * D_.h, TensorClass::Temporary);
      comm(OpKind::AllToAll, GroupKind::EP, "moe.combine", D_.e * D_.R * D_.h, Stream::TensorComm, {out}, {back});
      out = back;
    }
    const auto moe_out = tensor("moe.out", D_.e * tok * D_.h, TensorClass::Temporary);
    elementwise(OpKind::Permute, "moe.unpermute", D_.R, D_.h, 2.0, {out, A.probs}, {moe_out});
    return moe_out;
  }

  // Deferred weight-gradient work of zero-bubble schedules, replayed in the W pass.
  using WJob = std::function<void()>;

  void wgrad(WJob job) {
    if (split_w_) {
      w_jobs_[mb_].push_back({layer_, chunk_, std::move(job)});
    } else {
      job();
    }
  }

  Phase bwd_phase() const { return split_w_ ? Phase::BackwardInput : Phase::Backward; }

  // Backward of one layer: `dy` is the gradient of its output; returns the gradient of its input.
  std::uint32_t layer_backward(int l, const LayerActs& A, std::uint32_t dy) {
    const LayerWeights& w = layers_.at(l);
    const double norm_flops = D_.layernorm ? 12.0 : 8.0;
    const i64 res = D_.e * D_.Tres * D_.h;
    // MLP block
    const auto d_branch2 = tensor("residual2.grad", res, TensorClass::Temporary);
    if (A.has_mask)
      elementwise(OpKind::DropoutAdd, "dropout_add2.bwd", D_.Tres, D_.h, 2.0, {dy, A.mask2}, {d_branch2});
    else
      elementwise(OpKind::DropoutAdd, "residual_add2.bwd", D_.Tres, D_.h, 0.0, {dy}, {d_branch2});
    const auto d_ln2 = w.moe ? moe_backward(l, A, d_branch2) : mlp_backward(l, A, d_branch2);
    const auto dy_mid = tensor("residual1.grad", res, TensorClass::Temporary);
    elementwise(OpKind::Norm, "ln2.bwd", D_.Tres, D_.h, norm_flops, {d_ln2, A.x_mid, dy, W(l, w.norm2), grad_repl_},
                {dy_mid, grad_repl_});
    // attention block
    const auto d_branch1 = tensor("proj.grad_out", res, TensorClass::Temporary);
    if (A.has_mask)
      elementwise(OpKind::DropoutAdd, "dropout_add1.bwd", D_.Tres, D_.h, 2.0, {dy_mid, A.mask1}, {d_branch1});
    else
      elementwise(OpKind::DropoutAdd, "residual_add1.bwd", D_.Tres, D_.h, 0.0, {dy_mid}, {d_branch1});
    const auto d_proj = sp_gather("proj.grad_all_gather", d_branch1);
    const auto d_attn = tensor("attention.out_grad", D_.e * D_.T * D_.a_l * D_.d, TensorClass::Temporary);
    gemm_dgrad("proj.dgrad", D_.T, D_.h, D_.a_l * D_.d, 1, d_proj, W(l, w.proj), d_attn);
    const auto grad = grad_target(l, false);
    const i64 T = D_.T, h = D_.h, ad = D_.a_l * D_.d;
    wgrad([this, T, h, ad, x = A.attn_out, d_proj, grad] { gemm_wgrad("proj.wgrad", T, h, ad, 1, x, d_proj, grad); });
    const auto d_qkv = tensor("qkv.grad_out", D_.e * D_.T * D_.qkv_cols, TensorClass::Temporary);
    attention_backward(A, d_attn, d_qkv);
    if (D_.rope) elementwise(OpKind::Rope, "rope.bwd", D_.T, (D_.a_l + D_.g_l) * D_.d, 6.0, {d_qkv}, {d_qkv});
    const auto d_ln1 = tensor("ln1.grad_out", D_.e * D_.T * D_.h, TensorClass::Temporary);
    gemm_dgrad("qkv.dgrad", D_.T, D_.qkv_cols, D_.h, 1, d_qkv, W(l, w.qkv), d_ln1);
    const i64 cols = D_.qkv_cols;
    wgrad([this, T, h, cols, ln1 = A.ln1_out, d_qkv, grad] {
      const auto x = sp_gather("ln1.regather", ln1);  // SP keeps only the shard; gather it again
      gemm_wgrad("qkv.wgrad", T, cols, h, 1, x, d_qkv, grad);
    });
    const auto d_ln1r = tp_reduce_grad("ln1.grad_tp_reduce", d_ln1);
    const auto dx = tensor("layer.grad_in", res, TensorClass::Temporary);
    elementwise(OpKind::Norm, "ln1.bwd", D_.Tres, D_.h, norm_flops, {d_ln1r, A.x_in, dy_mid, W(l, w.norm1), grad_repl_},
                {dx, grad_repl_});
    return dx;
  }

  // TP conjugate of sp_gather/tp_reduce for input gradients: all-reduce (f's backward) or
  // reduce-scatter (the backward of SP's all-gather).
  std::uint32_t tp_reduce_grad(std::string_view nm, std::uint32_t full) { return tp_reduce(nm, full); }

  void attention_backward(const LayerActs& A, std::uint32_t d_attn, std::uint32_t d_qkv) {
    std::uint32_t stats = A.stats;
    if (P_.recompute == Recompute::Selective) {
      const Phase saved = phase_;
      phase_ = Phase::Recompute;
      stats = attention_stats(TensorClass::Temporary);
      const auto out = tensor("attention.out_recomputed", D_.flash ? 0 : D_.e * D_.T * D_.a_l * D_.d, TensorClass::Temporary);
      attention_ring("attention.kv_ring", 2 * D_.e * D_.T * D_.g_l * D_.d, A.qkv,
                     [&](std::uint32_t kv) { emit(attention_op("attention", D_.S, 1.0), {A.qkv, kv}, {out, stats}); });
      phase_ = saved;
    }
    // Backward: key/value blocks travel with their accumulated gradients.
    attention_ring("attention.kv_grad_ring", 4 * D_.e * D_.T * D_.g_l * D_.d, A.qkv, [&](std::uint32_t kv) {
      emit(attention_op("attention.bwd", D_.S, 2.0), {d_attn, A.qkv, kv, A.attn_out, stats}, {d_qkv});
    });
  }

  std::uint32_t mlp_backward(int l, const LayerActs& A, std::uint32_t d_branch) {
    const LayerWeights& w = layers_.at(l);
    const auto d_fc2 = sp_gather("fc2.grad_all_gather", d_branch);
    const auto d_act = tensor("activation.grad_out", D_.e * D_.T * D_.f_l, TensorClass::Temporary);
    gemm_dgrad("fc2.dgrad", D_.T, D_.h, D_.f_l, 1, d_fc2, W(l, w.fc2), d_act);
    const auto grad = grad_target(l, false);
    const i64 T = D_.T, h = D_.h, f = D_.f_l, fg = D_.f_l * D_.gated();
    wgrad([this, T, h, f, x = A.act_out, d_fc2, grad] { gemm_wgrad("fc2.wgrad", T, h, f, 1, x, d_fc2, grad); });
    const auto d_fc1 = tensor("fc1.grad_out", D_.e * D_.T * fg, TensorClass::Temporary);
    elementwise(OpKind::Activation, D_.swiglu ? "swiglu.bwd" : "gelu.bwd", D_.T, D_.f_l, D_.swiglu ? 8.0 : 14.0,
                {d_act, A.fc1_out}, {d_fc1});
    const auto d_ln2 = tensor("ln2.grad_out", D_.e * D_.T * D_.h, TensorClass::Temporary);
    gemm_dgrad("fc1.dgrad", D_.T, fg, D_.h, 1, d_fc1, W(l, w.fc1), d_ln2);
    wgrad([this, T, h, fg, ln2 = A.ln2_out, d_fc1, grad] {
      const auto x = sp_gather("ln2.regather", ln2);
      gemm_wgrad("fc1.wgrad", T, fg, h, 1, x, d_fc1, grad);
    });
    return tp_reduce_grad("ln2.grad_tp_reduce", d_ln2);
  }

  std::uint32_t moe_backward(int l, const LayerActs& A, std::uint32_t d_branch) {
    const LayerWeights& w = layers_.at(l);
    const i64 tok = D_.Tres, R = D_.R, h = D_.h, fe = D_.fe, fg = D_.fe * D_.gated(), C = D_.capacity, El = D_.E_l;
    auto d_out = tensor("moe.grad_combined", D_.e * R * h, TensorClass::Temporary);
    const auto d_probs = tensor("router.grad_probs", 4 * tok * D_.E, TensorClass::Temporary);
    elementwise(OpKind::Permute, "moe.unpermute.bwd", R, h, 2.0, {d_branch, A.probs}, {d_out, d_probs});
    if (D_.ep > 1) {
      const auto back = tensor("moe.grad_expert_out", D_.e * R * h, TensorClass::Temporary);
      comm(OpKind::AllToAll, GroupKind::EP, "moe.combine.bwd", D_.e * R * h, Stream::TensorComm, {d_out}, {back});
      d_out = back;
    }
    const auto d_act = tensor("expert_activation.grad_out", D_.e * R * fe, TensorClass::Temporary);
    gemm_dgrad("expert_fc2.dgrad", C, h, fe, El, d_out, WE(l), d_act);
    const auto grad = grad_target(l, true);
    wgrad([this, C, h, fe, El, x = A.act_out, d_out, grad] { gemm_wgrad("expert_fc2.wgrad", C, h, fe, El, x, d_out, grad); });
    const auto d_fc1 = tensor("expert_fc1.grad_out", D_.e * R * fg, TensorClass::Temporary);
    elementwise(OpKind::Activation, D_.swiglu ? "expert_swiglu.bwd" : "expert_gelu.bwd", R, fe, D_.swiglu ? 8.0 : 14.0,
                {d_act, A.fc1_out}, {d_fc1});
    auto d_in = tensor("expert_fc1.grad_in", D_.e * R * h, TensorClass::Temporary);
    gemm_dgrad("expert_fc1.dgrad", C, fg, h, El, d_fc1, WE(l), d_in);
    wgrad([this, C, h, fg, El, x = A.expert_in, d_fc1, grad] { gemm_wgrad("expert_fc1.wgrad", C, fg, h, El, x, d_fc1, grad); });
    if (D_.ep > 1) {
      const auto back = tensor("moe.grad_permuted", D_.e * R * h, TensorClass::Temporary);
      comm(OpKind::AllToAll, GroupKind::EP, "moe.dispatch.bwd", D_.e * R * h, Stream::TensorComm, {d_in}, {back});
      d_in = back;
    }
    const auto d_ln2 = tensor("ln2.grad_out", D_.e * tok * h, TensorClass::Temporary);
    const auto d_logits = tensor("router.grad_logits", D_.e * tok * D_.E, TensorClass::Temporary);
    elementwise(OpKind::Permute, "moe.permute.bwd", R, h, 0.0, {d_in}, {d_ln2});
    elementwise(OpKind::Router, "router.topk.bwd", tok, D_.E, 6.0, {d_probs, A.probs}, {d_logits});
    gemm("router.dgrad", tok, h, D_.E, 1, {d_logits, W(l, w.router), d_ln2}, {d_ln2});
    const i64 E = D_.E;
    wgrad([this, tok, h, E, x = A.ln2_out, d_logits] { gemm_wgrad("router.wgrad", tok, E, h, 1, x, d_logits, grad_repl_); });
    return d_ln2;
  }

  // ---- embedding and loss ----
  std::uint32_t embedding_forward() {
    // Under ZeRO-3 one gathered buffer holds the word and position tables.
    if (zero3())
      emb_gathered_ = pos_emb_ ? gather_params("zero3.all_gather_embedding", emb_params_ + pos_params_, {*word_emb_, *pos_emb_})
                               : gather_params("zero3.all_gather_embedding", emb_params_, {*word_emb_});
    const auto emb = tensor("embedding.out", D_.e * D_.T * D_.h, TensorClass::Temporary);
    const auto word = emb_gathered_ ? *emb_gathered_ : *word_emb_;
    Op op = make(OpKind::Embedding, "embedding");
    op.m = D_.T;
    op.n = D_.h;
    op.vector_flops = static_cast<double>(D_.T * D_.h);
    op.bytes_read = D_.e * D_.T * D_.h * (pos_emb_ ? 2 : 1);
    op.bytes_written = D_.e * D_.T * D_.h;
    if (pos_emb_ && !emb_gathered_)
      emit(op, {word, *pos_emb_}, {emb});
    else
      emit(op, {word}, {emb});
    auto x = tp_reduce("embedding.tp_reduce", emb);  // vocab-parallel lookup: partial rows
    if (D_.hidden_dropout) {
      emb_mask_[mb_] = tensor("embedding.dropout_mask", D_.Tres * D_.h,
                              TensorClass::Activation);
      const auto out = tensor("embedding.dropout_out", D_.e * D_.Tres * D_.h, TensorClass::Activation);
      elementwise(OpKind::DropoutAdd, "embedding.dropout", D_.Tres, D_.h, 2.0, {x}, {out, emb_mask_[mb_]});
      x = out;
    }
    emb_gathered_.reset();
    return x;
  }

  void embedding_backward(std::uint32_t dy) {
    if (D_.hidden_dropout) {
      const auto d = tensor("embedding.dropout_grad", D_.e * D_.Tres * D_.h, TensorClass::Temporary);
      elementwise(OpKind::DropoutAdd, "embedding.dropout.bwd", D_.Tres, D_.h, 1.0, {dy, emb_mask_.at(mb_)}, {d});
      dy = d;
    }
    // Backward of the forward's all-reduce is the identity; of its reduce-scatter, an all-gather.
    const auto full = sp_gather("embedding.grad_all_gather", dy);
    // Tied embeddings on one stage: the output layer's gradient bucket of this micro-batch is
    // shared, and reduced by whichever of the two writes it last.
    const auto shared = shared_bucket_.find(mb_);
    const bool reduce_here = shared == shared_bucket_.end() || !split_w_;
    const auto grad = shared != shared_bucket_.end() ? shared->second : zero_grad_target(grad_emb_, emb_params_);
    if (shared != shared_bucket_.end()) shared_bucket_.erase(shared);
    Op op = make(OpKind::Embedding, "embedding.bwd");
    op.m = D_.T;
    op.n = D_.h;
    op.vector_flops = static_cast<double>(D_.T * D_.h);
    op.bytes_read = D_.e * D_.T * D_.h;
    op.bytes_written = D_.gb * D_.T * D_.h;
    if (pos_emb_)
      emit(op, {full, grad, grad_repl_}, {grad, grad_repl_});
    else
      emit(op, {full, grad}, {grad});
    if (reduce_here) reduce_zero_grad(grad, grad_emb_, emb_params_);
  }

  // Non-layer parameters under ZeRO-2/3 use transient full-size gradients, like layers do.
  std::uint32_t zero_grad_target(std::uint32_t persistent, i64 params) {
    if (P_.zero_stage < 2 || dp_group_ == 1 || params == 0) return persistent;
    return tensor("grad.bucket", D_.gb * params, TensorClass::Gathered);
  }
  void reduce_zero_grad(std::uint32_t bucket, std::uint32_t persistent, i64 params) {
    if (bucket == persistent) return;
    grad_comm(OpKind::ReduceScatter, GroupKind::DP, "grad.reduce_scatter", params, Stream::DataComm, {bucket, persistent},
         {persistent});
  }

  std::uint32_t gather_params(std::string_view nm, i64 params, std::initializer_list<std::uint32_t> shards) {
    const auto g = tensor("zero3.gathered", D_.e * params, TensorClass::Gathered);
    comm(OpKind::AllGather, GroupKind::DP, nm, D_.e * params, Stream::DataComm, shards, {g});
    return g;
  }

  struct LossActs {
    std::uint32_t x = 0, lnf_out = 0, softmax = 0, stats = 0;
  };

  LossActs loss_forward(std::uint32_t x) {
    LossActs L;
    L.x = x;
    const i64 out_params = out_params_ > 0 ? out_params_ : emb_params_;
    // Under ZeRO-3 one gathered buffer holds the final norm and the output layer.
    std::optional<std::uint32_t> gathered;
    if (zero3()) gathered = gather_params("zero3.all_gather_output", out_params + final_norm_params_, {*out_w_, *final_norm_});
    L.lnf_out = tensor("final_norm.out", D_.e * D_.Tres * D_.h, TensorClass::Activation);
    elementwise(OpKind::Norm, "final_norm", D_.Tres, D_.h, D_.layernorm ? 8.0 : 5.0, {x, gathered ? *gathered : *final_norm_},
                {L.lnf_out});
    const auto in = sp_gather("final_norm.all_gather", L.lnf_out);
    const auto logits = tensor("logits", D_.e * D_.T * D_.V_l, TensorClass::Temporary);
    gemm_fwd("output", D_.T, D_.V_l, D_.h, 1, in, gathered ? *gathered : *out_w_, logits);
    L.softmax = tensor("cross_entropy.softmax", 4 * D_.T * D_.V_l, TensorClass::Activation);
    L.stats = tensor("cross_entropy.stats", 12 * D_.T, TensorClass::Activation);
    elementwise(OpKind::CrossEntropy, "cross_entropy", D_.T, D_.V_l, 5.0, {logits}, {L.softmax, L.stats});
    if (D_.tp > 1)  // max, sum of exponentials and target logit across the vocabulary shards
      comm(OpKind::AllReduce, GroupKind::TP, "cross_entropy.all_reduce", 12 * D_.T, Stream::TensorComm, {L.stats}, {L.stats}, 0,
           DType::F32);
    return L;
  }

  std::uint32_t loss_backward(const LossActs& L) {
    const i64 out_params = out_params_ > 0 ? out_params_ : emb_params_;
    std::optional<std::uint32_t> gathered;
    if (zero3()) gathered = gather_params("zero3.all_gather_output", out_params + final_norm_params_, {*out_w_, *final_norm_});
    const auto w = gathered ? *gathered : *out_w_;
    const auto d_logits = tensor("logits.grad", D_.e * D_.T * D_.V_l, TensorClass::Temporary);
    elementwise(OpKind::CrossEntropy, "cross_entropy.bwd", D_.T, D_.V_l, 3.0, {L.softmax, L.stats}, {d_logits});
    const auto d_in = tensor("final_norm.grad_out", D_.e * D_.T * D_.h, TensorClass::Temporary);
    gemm_dgrad("output.dgrad", D_.T, D_.V_l, D_.h, 1, d_logits, w, d_in);
    const auto grad = zero_grad_target(grad_out_, out_params);
    const bool shared = out_params_ == 0 && grad != grad_out_;
    if (shared) shared_bucket_[mb_] = grad;
    const bool reduce_here = !shared || split_w_;
    const i64 T = D_.T, V = D_.V_l, h = D_.h;
    wgrad([this, T, V, h, lnf = L.lnf_out, d_logits, grad, out_params, reduce_here] {
      const auto x = sp_gather("final_norm.regather", lnf);
      gemm_wgrad("output.wgrad", T, V, h, 1, x, d_logits, grad);
      if (reduce_here) reduce_zero_grad(grad, grad_out_, out_params);
    });
    const auto d_lnf = tp_reduce_grad("final_norm.grad_tp_reduce", d_in);
    const auto dy = tensor("final_norm.grad_in", D_.e * D_.Tres * D_.h, TensorClass::Temporary);
    elementwise(OpKind::Norm, "final_norm.bwd", D_.Tres, D_.h, D_.layernorm ? 12.0 : 8.0,
                {d_lnf, L.x, gathered ? w : *final_norm_, grad_repl_}, {dy, grad_repl_});
    return dy;
  }

  // ---- passes ----
  bool first_chunk() const { return stage_ == 0 && chunk_ == 0; }
  bool last_chunk() const { return stage_ == p_ - 1 && chunk_ == v_ - 1; }
  i64 pipe_bytes() const { return D_.e * D_.Tres * D_.h; }  // SP sends the sequence shard

  std::vector<int> chunk_layer_order(bool reverse) const {
    const LayerRange r = chunk_layers(M_, P_, stage_, chunk_);
    std::vector<int> out;
    for (int i = 0; i < r.count; ++i) out.push_back(reverse ? r.first + r.count - 1 - i : r.first + i);
    return out;
  }

  void forward_pass() {
    phase_ = Phase::Forward;
    layer_ = kNone;
    std::uint32_t x;
    if (first_chunk()) {
      x = embedding_forward();
    } else {
      x = tensor("pipe.activation_in", pipe_bytes(), TensorClass::Received);
      comm(OpKind::Recv, GroupKind::PP, "pipe.recv_forward", pipe_bytes(), Stream::PipeRecvPrev, {}, {x}, -1);
    }
    const auto order = chunk_layer_order(false);
    for (std::size_t i = 0; i < order.size(); ++i) {
      layer_ = order[i];
      prefetch(order, i);
      LayerActs A = layer_forward(order[i], x);
      gathered_.erase(order[i]);
      gathered_experts_.erase(order[i]);
      stash_[{mb_, order[i]}] = A;
      x = A.x_out;
    }
    layer_ = kNone;
    if (last_chunk()) {
      loss_[mb_] = loss_forward(x);
    } else {
      comm(OpKind::Send, GroupKind::PP, "pipe.send_forward", pipe_bytes(), Stream::PipeSendNext, {x}, {}, 1);
    }
  }

  void backward_pass(bool last_pass) {
    phase_ = bwd_phase();
    layer_ = kNone;
    std::uint32_t dy;
    if (last_chunk()) {
      dy = loss_backward(loss_.at(mb_));
      loss_.erase(mb_);
    } else {
      dy = tensor("pipe.grad_in", pipe_bytes(), TensorClass::Received);
      comm(OpKind::Recv, GroupKind::PP, "pipe.recv_backward", pipe_bytes(), Stream::PipeRecvNext, {}, {dy}, 1);
    }
    const auto order = chunk_layer_order(true);
    for (std::size_t i = 0; i < order.size(); ++i) {
      const int l = order[i];
      layer_ = l;
      prefetch(order, i);
      LayerActs A = stash_.at({mb_, l});
      stash_.erase({mb_, l});
      if (P_.recompute == Recompute::Full) {
        phase_ = Phase::Recompute;
        A = layer_forward(l, A.x_in);
        phase_ = bwd_phase();
      }
      dy = layer_backward(l, A, dy);
      gathered_.erase(l);
      gathered_experts_.erase(l);
      if (!split_w_) reduce_layer_grads(l, last_pass);
    }
    layer_ = kNone;
    if (first_chunk()) {
      embedding_backward(dy);
    } else {
      comm(OpKind::Send, GroupKind::PP, "pipe.send_backward", pipe_bytes(), Stream::PipeSendPrev, {dy}, {}, -1);
    }
  }

  void weight_pass(bool last_pass) {
    phase_ = Phase::BackwardWeight;
    auto jobs = std::move(w_jobs_[mb_]);
    w_jobs_.erase(mb_);
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      layer_ = jobs[i].layer;
      chunk_ = jobs[i].chunk;
      jobs[i].job();
      const bool layer_done = i + 1 == jobs.size() || jobs[i + 1].layer != jobs[i].layer;
      if (layer_ != kNone && layer_done) reduce_layer_grads(layer_, last_pass);
    }
    layer_ = kNone;
  }

  void optimizer_tail() {
    phase_ = Phase::Optimizer;
    mb_ = kNone;
    layer_ = kNone;
    chunk_ = 0;
    const bool first = stage_ == 0, last = stage_ == p_ - 1;
    // Tied word embeddings live on both pipeline ends; their gradients are summed across them.
    if (M_.tied_embeddings && p_ > 1 && (first || last)) {
      const auto g = first ? grad_emb_ : grad_out_;
      // Under ZeRO-2/3 both ends hold matching shards of it, so the shard is what is summed.
      comm(OpKind::AllReduce, GroupKind::Embedding, "embedding.grad_all_reduce", prog_.tensors[g].bytes, Stream::DataComm, {g},
           {g}, 0, P_.grad_dtype);
    }
    // Replicated parameters (norms, row-parallel biases, router) see different sequence shards
    // on each TP rank under SP, so their gradients are summed across TP first.
    if (D_.sp) grad_comm(OpKind::AllReduce, GroupKind::TP, "replicated.grad_all_reduce", repl_params_, Stream::TensorComm, {grad_repl_}, {grad_repl_});
    if (dp_group_ > 1) {
      auto reduce = [&](std::uint32_t g, i64 params) {
        if (params == 0) return;
        if (P_.zero_stage == 0)
          grad_comm(OpKind::AllReduce, GroupKind::DP, "grad.all_reduce", params, Stream::DataComm, {g}, {g});
        else if (P_.zero_stage == 1)
          grad_comm(OpKind::ReduceScatter, GroupKind::DP, "grad.reduce_scatter", params, Stream::DataComm, {g}, {g});
      };
      if (first) reduce(grad_emb_, emb_params_);
      if (last && out_params_ > 0) reduce(grad_out_, out_params_);
      if (P_.zero_stage >= 2)
        grad_comm(OpKind::ReduceScatter, GroupKind::DP, "grad.reduce_scatter", repl_params_, Stream::DataComm, {grad_repl_}, {grad_repl_});
      else
        reduce(grad_repl_, repl_params_);
    }
    // Global gradient norm for clipping: local sum of squares, summed over every group that
    // holds a distinct part of the gradients.
    const auto norm = tensor("grad_norm", 4, TensorClass::Temporary);
    std::vector<std::uint32_t> all_grads;
    for (auto& t : prog_.tensors)
      if (t.cls == TensorClass::Gradient) all_grads.push_back(static_cast<std::uint32_t>(&t - prog_.tensors.data()));
    {
      Op op = make(OpKind::OptimizerStep, "grad_norm");
      op.vector_flops = 2.0 * static_cast<double>(local_params());
      op.bytes_read = grad_bytes();
      const auto idx = emit(op, {}, {norm});
      for (auto g : all_grads) add_read(idx, g);
    }
    if (D_.tp > 1) comm(OpKind::AllReduce, GroupKind::TP, "grad_norm.all_reduce", 4, Stream::TensorComm, {norm}, {norm}, 0, DType::F32);
    if (p_ > 1) comm(OpKind::AllReduce, GroupKind::PP, "grad_norm.all_reduce", 4, Stream::DataComm, {norm}, {norm}, 0, DType::F32);
    if (P_.zero_stage >= 1 && dp_group_ > 1)
      comm(OpKind::AllReduce, GroupKind::DP, "grad_norm.all_reduce", 4, Stream::DataComm, {norm}, {norm}, 0, DType::F32);
    std::vector<std::uint32_t> weights;
    for (auto& t : prog_.tensors)
      if (t.cls == TensorClass::Weight) weights.push_back(static_cast<std::uint32_t>(&t - prog_.tensors.data()));
    if (P_.optimizer_offload) {
      // Gradients go to the host, AdamW runs there on the fp32 master copy, weights come back.
      Op d2h = make(OpKind::CopyD2H, "optimizer.grads_to_host", Stream::Memcpy);
      d2h.comm_bytes = grad_bytes();
      const auto d2h_idx = emit(d2h, {norm}, {});
      for (auto g : all_grads) add_read(d2h_idx, g);
      Op step = make(OpKind::OptimizerStep, "adamw", Stream::Host);
      step.vector_flops = 16.0 * static_cast<double>(local_params());
      step.bytes_read = step.bytes_written = 16 * local_params();
      const auto step_idx = emit(step, {}, {}, {d2h_idx});
      Op h2d = make(OpKind::CopyH2D, "optimizer.weights_to_device", Stream::Memcpy);
      h2d.comm_bytes = weight_bytes();
      const auto h2d_idx = emit(h2d, {}, {}, {step_idx});
      for (auto w : weights) add_write(h2d_idx, w);
    } else {
      Op step = make(OpKind::OptimizerStep, "adamw");
      step.vector_flops = 16.0 * static_cast<double>(local_params());
      step.bytes_read = grad_bytes() + prog_.tensors[*optimizer_].bytes;
      step.bytes_written = weight_bytes() + prog_.tensors[*optimizer_].bytes;
      const auto idx = emit(step, {norm, *optimizer_}, {*optimizer_});
      for (auto g : all_grads) add_read(idx, g);
      for (auto w : weights) add_write(idx, w);
    }
    // ZeRO-1/2: every rank updated its shard; gather the updated weights back, layer by layer,
    // then the stage's embedding, output and final-norm weights.
    if (P_.zero_stage == 1 || P_.zero_stage == 2) {
      if (dp_group_ > 1) {
        for (auto& [l, w] : layers_) {
          const auto idx = comm(OpKind::AllGather, GroupKind::DP, "weights.all_gather",
                                D_.e * (w.params.sharded() + w.params.replicated()), Stream::DataComm, {}, {});
          for (auto t : w.dense_weights()) add_write(idx, t);
        }
        const i64 rest = emb_params_ + pos_params_ + out_params_ + final_norm_params_;
        if (rest > 0) {
          const auto idx = comm(OpKind::AllGather, GroupKind::DP, "weights.all_gather", D_.e * rest, Stream::DataComm, {}, {});
          for (const auto& t : {word_emb_, pos_emb_, final_norm_})
            if (t) add_write(idx, *t);
          if (out_w_ && out_w_ != word_emb_) add_write(idx, *out_w_);  // tied on one stage: the same tensor
        }
      }
      if (edp_group_ > 1)
        for (auto& [l, w] : layers_)
          if (w.moe)
            comm(OpKind::AllGather, GroupKind::ExpertDP, "weights.all_gather_experts", D_.e * w.params.expert,
                 Stream::DataComm, {w.experts}, {w.experts});
    }
  }

  // Appends a tensor use to the op just emitted (for ops that touch many tensors).
  void add_read(std::uint32_t op_idx, std::uint32_t t) { add_use(op_idx, t, false); }
  void add_write(std::uint32_t op_idx, std::uint32_t t) { add_use(op_idx, t, true); }
  void add_use(std::uint32_t op_idx, std::uint32_t t, bool write) {
    Op& op = prog_.ops[op_idx];
    assert(op_idx + 1 == prog_.ops.size() && op.uses_end == prog_.uses.size());
    const std::int32_t w = last_writer_[t];
    if (w >= 0 && prog_.ops[static_cast<std::size_t>(w)].stream != op.stream) {
      const auto u = static_cast<std::uint32_t>(w);
      bool seen = false;
      for (std::uint32_t i = op.deps_begin; i < op.deps_end; ++i) seen = seen || prog_.deps[i] == u;
      if (!seen) {
        assert(op.deps_end == prog_.deps.size());
        prog_.deps.push_back(u);
        ++op.deps_end;
      }
    }
    prog_.uses.push_back({t, write});
    ++op.uses_end;
    prog_.tensors[t].last_op = std::max(prog_.tensors[t].last_op, op_idx);
    if (write) last_writer_[t] = static_cast<std::int32_t>(op_idx);
  }

  i64 local_params() const {
    return shard(dense_params_, dp_group_, 1) + shard(expert_params_, edp_group_, 1);
  }
  i64 grad_bytes() const {
    i64 s = 0;
    for (const auto& t : prog_.tensors)
      if (t.cls == TensorClass::Gradient) s += t.bytes;
    return s;
  }
  i64 weight_bytes() const {
    i64 s = 0;
    for (const auto& t : prog_.tensors)
      if (t.cls == TensorClass::Weight) s += t.bytes;
    return s;
  }

  const ModelSpec& M_;
  const PlanSpec& P_;
  const Dims& D_;
  int stage_;
  int vocab_;
  const std::vector<PipelinePass>& passes_;
  int p_ = 1, v_ = 1, m_ = 1, dp_group_ = 1, edp_group_ = 1;
  bool split_w_ = false;

  Program prog_;
  std::unordered_map<std::string, std::uint32_t> name_ids_;
  std::vector<std::int32_t> last_writer_;

  // emission context
  Phase phase_ = Phase::Forward;
  std::int32_t layer_ = kNone;
  std::int32_t mb_ = kNone;
  int chunk_ = 0;

  std::map<int, LayerWeights> layers_;
  std::optional<std::uint32_t> word_emb_, pos_emb_, final_norm_, out_w_, optimizer_;
  std::uint32_t grad_emb_ = 0, grad_out_ = 0, grad_repl_ = 0;
  i64 emb_params_ = 0, out_params_ = 0, repl_params_ = 0, dense_params_ = 0, expert_params_ = 0;
  i64 pos_params_ = 0, final_norm_params_ = 0;

  std::map<std::pair<int, int>, LayerActs> stash_;  // (micro-batch, layer) -> saved activations
  std::map<int, LossActs> loss_;
  std::map<int, std::uint32_t> emb_mask_;
  std::map<int, std::uint32_t> gathered_, gathered_experts_;
  std::optional<std::uint32_t> emb_gathered_;
  std::map<int, std::uint32_t> shared_bucket_;  // micro-batch -> tied-embedding gradient bucket
  std::map<int, std::optional<std::uint32_t>> grad_bucket_, grad_bucket_expert_;
  struct DeferredW {
    std::int32_t layer;
    int chunk;
    WJob job;
  };
  std::map<int, std::vector<DeferredW>> w_jobs_;
};

}  // namespace

LayerRange chunk_layers(const ModelSpec& model, const PlanSpec& plan, int stage, int chunk) {
  const int per_chunk = model.num_layers / (plan.pp() * plan.vp());
  return {(chunk * plan.pp() + stage) * per_chunk, per_chunk};
}

CompiledPlan compile_plan(const ModelSpec& model, const PlanSpec& plan) {
  CompiledPlan out{model, plan, Topology(plan), padded_vocab_size(model.vocab_size, plan.tp()),
                   plan.num_micro_batches(), {}, {}, {}};
  const Dims D = make_dims(model, plan, out.padded_vocab);
  const int p = plan.pp();
  out.roles.reserve(static_cast<std::size_t>(p));
  for (int stage = 0; stage < p; ++stage) {
    out.schedules.push_back(pipeline_schedule(plan.schedule, stage, p, out.num_micro_batches, plan.vp()));
    out.roles.push_back(StageCompiler(model, plan, D, stage, out.padded_vocab, out.schedules.back()).compile());
  }
  const Topology& topo = out.topology;
  out.ranks.resize(static_cast<std::size_t>(topo.world_size()));
  for (int r = 0; r < topo.world_size(); ++r) {
    RankBinding& b = out.ranks[static_cast<std::size_t>(r)];
    b.role = topo.coord(r).pp;
    for (int g = 0; g < kNumGroupKinds; ++g) b.group[static_cast<std::size_t>(g)] = topo.group_id(static_cast<GroupKind>(g), r);
  }
  return out;
}

}  // namespace px
