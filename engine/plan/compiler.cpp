// The plan compiler. For each pipeline stage it lays out the stage's parameters in flat buffers,
// then walks the stage's schedule and emits, per pass, the ops of every layer in its chunk:
// forward, backward (split into B and W for zero-bubble), recompute, the TP/SP/CP/EP collectives
// around them, pipeline sends and receives, ZeRO gathers and gradient reductions, and the
// optimizer tail. Every operand is an exact view (tensor, byte offset, bytes), so the program says
// precisely what each op reads and writes. Cross-stream dependencies come from data flow: an op
// waits for the last writer of every tensor it touches when that writer is on another stream.
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
#include "engine/spec/parameters.hpp"

namespace px {
namespace {

using i64 = std::int64_t;
inline i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }
using Dims = LocalDims;

// A part of a tensor, in elements of the tensor's dtype.
struct Part {
  i64 offset = 0;
  i64 count = 0;
};

// Where one layer's weights sit in its flat buffer(s).
struct LayerWeights {
  int buffer = -1, expert_buffer = -1;  // into Program::buffers
  Part norm1_w, norm1_b, qkv_w, qkv_b, proj_w, proj_b, norm2_w, norm2_b, fc1_w, fc1_b, fc2_w, fc2_b, router_w;
  Part ex_fc1_w, ex_fc1_b, ex_fc2_w, ex_fc2_b;  // stacked over the rank's experts
  bool moe = false;
};

// A view operand: a tensor, or `count` elements of it from element `offset`.
struct V {
  std::uint32_t tensor;
  i64 offset = 0;   // elements
  i64 count = -1;   // -1: the whole tensor
  V(std::uint32_t t) : tensor(t) {}  // NOLINT: a tensor id is the whole-tensor view
  V(std::uint32_t t, Part p) : tensor(t), offset(p.offset), count(p.count) {}
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
    make_buffers();
    if (P_.overlap_param_gather) gather_weights();
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

  // `elem`: bytes per element, for views in elements.
  std::uint32_t tensor(std::string_view nm, i64 bytes, TensorClass cls, i64 elem = 4) {
    assert(bytes >= 0);
    Tensor t;
    t.bytes = bytes;
    t.name = name(nm);
    t.cls = cls;
    prog_.tensors.push_back(t);
    last_writer_.push_back(-1);
    elem_bytes_.push_back(elem);
    return static_cast<std::uint32_t>(prog_.tensors.size() - 1);
  }
  // Activations and weights in the training precision; gradients in the main-gradient dtype.
  std::uint32_t act(std::string_view nm, i64 elems, TensorClass cls) { return tensor(nm, D_.e * elems, cls, D_.e); }
  std::uint32_t fp32(std::string_view nm, i64 elems, TensorClass cls) { return tensor(nm, 4 * elems, cls, 4); }
  std::uint32_t grad(std::string_view nm, i64 elems, TensorClass cls) { return tensor(nm, D_.gb * elems, cls, D_.gb); }
  std::uint32_t mask(std::string_view nm, i64 elems, TensorClass cls) { return tensor(nm, elems, cls, 1); }

  Op make(OpKind kind, std::string_view nm, Stream stream = Stream::Compute) {
    Op op;
    op.kind = kind;
    op.name = name(nm);
    op.phase = phase_;
    op.stream = stream;
    op.layer = layer_;
    op.micro_batch = mb_;
    op.chunk = static_cast<std::uint8_t>(chunk_);
    op.dtype = P_.precision == DType::FP8 && kind != OpKind::Gemm ? DType::BF16 : P_.precision;
    return op;
  }

  TensorUse use_of(const V& v, bool write) const {
    const i64 eb = elem_bytes_[v.tensor];
    const i64 whole = prog_.tensors[v.tensor].bytes;
    TensorUse u{v.tensor, write, eb * v.offset, v.count < 0 ? whole - eb * v.offset : eb * v.count};
    assert(u.offset >= 0 && u.offset + u.bytes <= whole);
    return u;
  }

  std::uint32_t emit(Op op, const std::vector<V>& reads, const std::vector<V>& writes,
                     std::initializer_list<std::uint32_t> extra_deps = {}) {
    const auto idx = static_cast<std::uint32_t>(prog_.ops.size());
    op.deps_begin = op.deps_end = static_cast<std::uint32_t>(prog_.deps.size());
    op.uses_begin = op.uses_end = static_cast<std::uint32_t>(prog_.uses.size());
    prog_.ops.push_back(op);
    for (auto d : extra_deps) depend(idx, static_cast<std::int32_t>(d));
    for (const V& v : reads) add_use(idx, v, false);
    for (const V& v : writes) add_use(idx, v, true);
    return idx;
  }

  void depend(std::uint32_t idx, std::int32_t on) {
    Op& op = prog_.ops[idx];
    if (on < 0 || prog_.ops[static_cast<std::size_t>(on)].stream == op.stream) return;
    const auto u = static_cast<std::uint32_t>(on);
    for (std::uint32_t i = op.deps_begin; i < op.deps_end; ++i)
      if (prog_.deps[i] == u) return;
    assert(op.deps_end == prog_.deps.size() && "dependencies are added to the op just emitted");
    prog_.deps.push_back(u);
    ++op.deps_end;
  }

  // Appends an operand to the op just emitted.
  void add_use(std::uint32_t idx, const V& v, bool write) {
    assert(idx + 1 == prog_.ops.size() && prog_.ops[idx].uses_end == prog_.uses.size());
    depend(idx, last_writer_[v.tensor]);
    prog_.uses.push_back(use_of(v, write));
    ++prog_.ops[idx].uses_end;
    Tensor& t = prog_.tensors[v.tensor];
    if (write && last_writer_[v.tensor] < 0 && !is_persistent(t.cls)) t.first_op = idx;
    t.last_op = std::max(t.last_op, idx);
    if (write) last_writer_[v.tensor] = static_cast<std::int32_t>(idx);
  }

  // ---- op helpers ----
  std::uint32_t gemm(std::string_view nm, Variant variant, i64 m, i64 n, i64 k, i64 batch, const std::vector<V>& reads,
                     const std::vector<V>& writes) {
    Op op = make(OpKind::Gemm, nm);
    op.variant = variant;
    op.m = m;
    op.n = n;
    op.k = k;
    op.batch = batch;
    op.flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) * static_cast<double>(batch);
    op.bytes_read = D_.e * (m * k + k * n) * batch;
    op.bytes_written = D_.e * m * n * batch;
    return emit(op, reads, writes);
  }

  // Forward y[m x n] = x[m x k] w[k x n] (+ bias), batched over `batch` experts when grouped.
  void gemm_fwd(std::string_view nm, i64 m, i64 n, i64 k, i64 batch, V x, V w, std::optional<V> b, std::uint32_t y,
                bool grouped = false) {
    std::vector<V> reads = {x, w};
    if (b) reads.push_back(*b);
    gemm(nm, grouped ? Variant::GemmGroupedForward : Variant::GemmForward, m, n, k, batch, reads, {y});
  }
  // Its input gradient dx[m x k] = dy[m x n] w^T.
  void gemm_dgrad(std::string_view nm, i64 m, i64 n, i64 k, i64 batch, V dy, V w, std::uint32_t dx, bool grouped = false) {
    gemm(nm, grouped ? Variant::GemmGroupedInputGrad : Variant::GemmInputGrad, m, k, n, batch, {dy, w}, {dx});
  }
  // Its weight gradient dw[k x n] += x^T dy (and dbias += column sums of dy).
  void gemm_wgrad(std::string_view nm, i64 m, i64 n, i64 k, i64 batch, V x, V dy, V dw, std::optional<V> db,
                  bool grouped = false) {
    std::vector<V> writes = {dw};
    if (db) writes.push_back(*db);
    gemm(nm, grouped ? Variant::GemmGroupedWeightGrad : Variant::GemmWeightGrad, k, n, m, batch, {x, dy}, writes);
  }

  std::uint32_t elementwise(OpKind kind, std::string_view nm, i64 rows, i64 cols, double flops_per_elem,
                            const std::vector<V>& reads, const std::vector<V>& writes, Variant variant = Variant::Plain) {
    Op op = make(kind, nm);
    op.variant = variant;
    op.m = rows;
    op.n = cols;
    op.vector_flops = flops_per_elem * static_cast<double>(rows * cols);
    const auto idx = emit(op, reads, writes);
    Op& o = prog_.ops[idx];
    for (const TensorUse& u : prog_.uses_of(o)) (u.write ? o.bytes_written : o.bytes_read) += u.bytes;
    return idx;
  }

  std::uint32_t comm(OpKind kind, GroupKind g, std::string_view nm, i64 bytes, Stream stream, const std::vector<V>& reads,
                     const std::vector<V>& writes, std::int8_t peer = 0, std::optional<DType> dtype = {},
                     Variant variant = Variant::Plain) {
    Op op = make(kind, nm, stream);
    op.group = g;
    op.peer = peer;
    op.comm_bytes = bytes;
    op.variant = variant;
    if (dtype) op.dtype = *dtype;
    return emit(op, reads, writes);
  }

  // TP "g" after a row-parallel GEMM: all-reduce in place, or reduce-scatter to sequence shards.
  std::uint32_t tp_reduce(std::string_view nm, std::uint32_t full) {
    if (D_.tp == 1) return full;
    if (!D_.sp) {
      comm(OpKind::AllReduce, GroupKind::TP, nm, D_.e * D_.T * D_.h, Stream::TensorComm, {full}, {full});
      return full;
    }
    const auto out = act(nm, D_.Tres * D_.h, TensorClass::Temporary);
    comm(OpKind::ReduceScatter, GroupKind::TP, nm, D_.e * D_.T * D_.h, Stream::TensorComm, {full}, {out});
    return out;
  }
  // SP gather of sequence shards before a column-parallel GEMM (identity without SP).
  std::uint32_t sp_gather(std::string_view nm, std::uint32_t shard) {
    if (!D_.sp) return shard;
    const auto out = act(nm, D_.T * D_.h, TensorClass::Temporary);
    comm(OpKind::AllGather, GroupKind::TP, nm, D_.e * D_.T * D_.h, Stream::TensorComm, {shard}, {out});
    return out;
  }

  // tp_comm_overlap, all-gather side: the shards of a [T x cols] tensor travel the tp ring; step i
  // hands `use` the block that has just arrived, while it moves on to the next rank (see Op).
  template <class Use>
  void ag_ring(const std::string& ring, i64 cols, std::uint32_t shard, Use&& use) {
    std::uint32_t cur = shard;
    for (int i = 0; i < D_.tp; ++i) {
      std::uint32_t next = cur;
      if (i + 1 < D_.tp) {
        next = act(ring, D_.Tres * cols, TensorClass::Temporary);
        comm(OpKind::RingExchange, GroupKind::TP, ring, D_.e * D_.Tres * cols, Stream::TensorComm, {cur}, {next}, 1);
      }
      use(cur, i);
      cur = next;
    }
  }
  // y = all_gather(shard) w (+ b): each step's GEMM multiplies the block that arrived.
  void ag_gemm(std::string_view nm, i64 n, i64 k, std::uint32_t shard, V w, std::optional<V> b, std::uint32_t y) {
    ag_ring(std::string(nm) + ".ring", k, shard, [&](std::uint32_t cur, int i) {
      std::vector<V> reads = {cur, w};
      if (b) reads.push_back(*b);
      tp_step(gemm(nm, Variant::GemmForward, D_.Tres, n, k, 1, reads, {y}), i, 1);
    });
  }
  // tp_comm_overlap, reduce-scatter side: this rank's block of the group's sum of x w (a forward,
  // or dx = x w^T for GemmInputGrad) as tp ring steps: each GEMM makes one block's partial, adds
  // the partial sum that arrived for it and passes it on; the last step's is the rank's own block.
  std::uint32_t gemm_rs(std::string_view nm, Variant variant, i64 n, i64 k, std::uint32_t x, V w) {
    const std::string ring = std::string(nm) + ".ring", part_nm = std::string(nm) + ".partial";
    std::optional<std::uint32_t> arrived;
    std::uint32_t part = 0;
    for (int i = 0; i < D_.tp; ++i) {
      part = act(part_nm, D_.Tres * n, TensorClass::Temporary);
      tp_step(gemm(nm, variant, D_.Tres, n, k, 1, {x, w}, {part}), i, -1);
      if (arrived) elementwise(OpKind::Copy, std::string(nm) + ".accumulate", D_.Tres, n, 1.0, {*arrived, part}, {part}, Variant::Accumulate);
      if (i + 1 < D_.tp) {
        arrived = act(ring, D_.Tres * n, TensorClass::Temporary);
        comm(OpKind::RingExchange, GroupKind::TP, ring, D_.e * D_.Tres * n, Stream::TensorComm, {part}, {*arrived}, 1);
      }
    }
    return part;
  }
  // A row-parallel layer's backward: the output gradient's shards dy travel the ring, and each
  // step takes the block that arrived into its rows of dx = dy w^T and its share of dw += x^T dy
  // (x's rows of that block): the gathered gradient is never assembled.
  void ag_backward(std::string_view nm, i64 dx_cols, i64 dy_cols, std::uint32_t shard, V w, std::uint32_t dx, V x, V dw) {
    const std::string dgrad_nm = std::string(nm) + ".dgrad", wgrad_nm = std::string(nm) + ".wgrad";
    ag_ring(std::string(nm) + ".grad_ring", dy_cols, shard, [&](std::uint32_t cur, int i) {
      tp_step(gemm(dgrad_nm, Variant::GemmInputGrad, D_.Tres, dx_cols, dy_cols, 1, {cur, w}, {dx}), i, 1);
      wgrad([this, i, wgrad_nm, dx_cols, dy_cols, cur, w, x, dw] {
        tp_step(gemm(wgrad_nm, Variant::GemmWeightGrad, dx_cols, dy_cols, D_.Tres, 1, {x, cur}, {dw}), i, 1);
      });
    });
  }
  void tp_step(std::uint32_t gemm_op, int step, std::int8_t side) {
    Op& op = prog_.ops[gemm_op];
    op.group = GroupKind::TP;
    op.step = static_cast<std::uint8_t>(step);
    op.peer = side;
  }

  // ---- parameter buffers ----
  int group_size(GroupKind g) const { return g == GroupKind::ExpertDP ? edp_group_ : dp_group_; }

  // Lays out the given logical parameters (by index into params_) as one flat buffer and makes
  // its weight and gradient tensors; returns the buffer and each slot's part.
  int add_buffer(std::string nm, int layer, GroupKind shard_group, const std::vector<std::uint32_t>& which,
                 std::vector<Part>* parts, bool experts = false) {
    ParamBuffer buf;
    buf.name = std::move(nm);
    buf.layer = layer;
    buf.shard_group = shard_group;
    i64 offset = 0;
    for (auto i : which) {
      const i64 count = experts ? params_[i].count() : shard_count(params_[i], dims_, D_.tp);
      buf.slots.push_back({i, offset, count});
      if (parts) parts->push_back({offset, count});
      offset += count;
    }
    const int g = group_size(shard_group);
    buf.count = offset;
    buf.padded = ceil_div(offset, g) * g;
    buf.weight_sharded = P_.zero_stage >= 3 && g > 1;
    buf.grad_sharded = P_.zero_stage >= 2 && g > 1;
    buf.optimizer_sharded = P_.zero_stage >= 1 && g > 1;
    buf.weight = act(buf.name + ".weight", buf.weight_sharded ? buf.padded / g : buf.padded, TensorClass::Weight);
    buf.grad = grad(buf.name + ".grad", buf.grad_sharded ? buf.padded / g : buf.padded, TensorClass::Gradient);
    buf.optimizer_offset = optimizer_elements_;
    optimizer_elements_ += optimizer_per_param() * (buf.optimizer_sharded ? buf.padded / g : buf.padded);
    prog_.buffers.push_back(std::move(buf));
    return static_cast<int>(prog_.buffers.size() - 1);
  }
  // fp32 master copy (when training in lower precision), Adam m and v: floats per parameter.
  i64 optimizer_per_param() const { return P_.precision == DType::F32 ? 2 : 3; }

  std::vector<std::uint32_t> params_named(const std::string& prefix, const std::vector<std::string>& suffixes) const {
    std::vector<std::uint32_t> out;
    for (const auto& sfx : suffixes) {
      auto it = param_index_.find(prefix + sfx);
      if (it != param_index_.end()) out.push_back(it->second);
    }
    return out;
  }

  void make_buffers() {
    params_ = model_parameters(M_, vocab_);
    dims_ = param_dims(M_, vocab_);
    for (std::uint32_t i = 0; i < params_.size(); ++i) param_index_.emplace(params_[i].name, i);
    const bool first = stage_ == 0, last = stage_ == p_ - 1;
    std::vector<Part> parts;
    if (first) {
      word_buf_ = add_buffer("word_embedding", kNone, GroupKind::DP, params_named("", {"word_embedding.weight"}), nullptr);
      if (M_.position == PositionKind::Learned)
        pos_buf_ = add_buffer("position_embedding", kNone, GroupKind::DP, params_named("", {"position_embedding.weight"}), nullptr);
    }
    for (int c = 0; c < v_; ++c) {
      const LayerRange r = chunk_layers(M_, P_, stage_, c);
      for (int l = r.first; l < r.first + r.count; ++l) {
        LayerWeights w;
        w.moe = is_moe_layer(M_, l);
        const std::string pre = "layers." + std::to_string(l) + ".";
        // Every name the layer may have, in buffer order; absent ones (biases, LayerNorm's beta
        // under RMSNorm) take no space and leave an empty part.
        const std::vector<std::string> names = {"norm1.weight", "norm1.bias", "qkv.weight", "qkv.bias", "proj.weight",
                                                "proj.bias",    "norm2.weight", "norm2.bias", "fc1.weight", "fc1.bias",
                                                "fc2.weight",   "fc2.bias",   "router.weight"};
        std::vector<std::uint32_t> present;
        std::vector<int> slot_of(names.size(), -1);
        for (std::size_t n = 0; n < names.size(); ++n) {
          auto it = param_index_.find(pre + names[n]);
          if (it == param_index_.end()) continue;
          slot_of[n] = static_cast<int>(present.size());
          present.push_back(it->second);
        }
        parts.clear();
        w.buffer = add_buffer("layers." + std::to_string(l), l, GroupKind::DP, present, &parts);
        Part* fields[] = {&w.norm1_w, &w.norm1_b, &w.qkv_w, &w.qkv_b, &w.proj_w, &w.proj_b, &w.norm2_w,
                          &w.norm2_b, &w.fc1_w,   &w.fc1_b, &w.fc2_w, &w.fc2_b,  &w.router_w};
        for (std::size_t n = 0; n < names.size(); ++n)
          if (slot_of[n] >= 0) *fields[n] = parts[static_cast<std::size_t>(slot_of[n])];
        if (w.moe) {
          // Stacked per weight kind over the rank's experts (grouped-GEMM operands); the slots name
          // experts 0..E/ep-1, which a rank maps to its own experts (see ParamSlot).
          std::vector<std::uint32_t> ex;
          for (const char* kind : {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"})
            for (i64 j = 0; j < D_.E_l; ++j) {
              auto it = param_index_.find(pre + "experts." + std::to_string(j) + "." + kind);
              if (it != param_index_.end()) ex.push_back(it->second);
            }
          parts.clear();
          w.expert_buffer = add_buffer("layers." + std::to_string(l) + ".experts", l, GroupKind::ExpertDP, ex, &parts, true);
          const i64 per = D_.E_l;
          std::size_t at = 0;
          auto stacked = [&](bool present_kind) {
            if (!present_kind) return Part{};
            Part p{parts[at].offset, parts[at].count * per};
            at += static_cast<std::size_t>(per);
            return p;
          };
          w.ex_fc1_w = stacked(true);
          w.ex_fc1_b = stacked(D_.bias);
          w.ex_fc2_w = stacked(true);
          w.ex_fc2_b = stacked(D_.bias);
        }
        layers_.emplace(l, w);
      }
    }
    if (last) {
      parts.clear();
      final_buf_ = add_buffer("final_norm", kNone, GroupKind::DP, params_named("final_norm.", {"weight", "bias"}), &parts);
      final_w_ = parts[0];
      if (parts.size() > 1) final_b_ = parts[1];
      if (!M_.tied_embeddings)
        out_buf_ = add_buffer("output", kNone, GroupKind::DP, params_named("", {"output.weight"}), nullptr);
      else if (!first)  // tied across pipeline ends: the last stage keeps a copy, kept equal by summed gradients
        out_buf_ = add_buffer("word_embedding_copy", kNone, GroupKind::DP, params_named("", {"word_embedding.weight"}), nullptr);
      else
        out_buf_ = word_buf_;  // one buffer serves both ends
    }
    if (!P_.optimizer_offload && optimizer_elements_ > 0)
      optimizer_ = fp32("optimizer.state", optimizer_elements_, TensorClass::Optimizer);
    prog_.optimizer_elements = optimizer_elements_;
  }

  const ParamBuffer& buffer(int b) const { return prog_.buffers[static_cast<std::size_t>(b)]; }

  // ---- ZeRO-3 gathers ----
  // The full weights of buffer b: its weight tensor, or under ZeRO-3 a gathered copy.
  std::uint32_t gather(int b, std::string_view nm) {
    const ParamBuffer& buf = buffer(b);
    if (!buf.weight_sharded) return buf.weight;
    const auto g = act("zero3.gathered", buf.padded, TensorClass::Gathered);
    comm(OpKind::AllGather, buf.shard_group, nm, D_.e * buf.padded, Stream::DataComm, {buf.weight}, {g});
    return g;
  }
  bool zero3() const { return P_.zero_stage == 3; }

  struct Gathered {
    std::uint32_t dense = 0, experts = 0;
  };
  // Gathers a layer's weights (issued one layer ahead, so two are alive at once, as with prefetch).
  Gathered gather_layer(int l) {
    const LayerWeights& w = layers_.at(l);
    Gathered g;
    g.dense = gather(w.buffer, "zero3.all_gather");
    if (w.moe) g.experts = gather(w.expert_buffer, "zero3.all_gather_experts");
    return g;
  }
  // Weight tensors an op of layer l reads.
  std::uint32_t W(int l) const {
    auto it = gathered_.find(l);
    return it == gathered_.end() ? buffer(layers_.at(l).buffer).weight : it->second.dense;
  }
  std::uint32_t WE(int l) const {
    auto it = gathered_.find(l);
    return it == gathered_.end() ? buffer(layers_.at(l).expert_buffer).weight : it->second.experts;
  }
  void prefetch(const std::vector<int>& order, std::size_t i) {
    if (!zero3()) return;
    if (i == 0 && !gathered_.count(order[0])) gathered_[order[0]] = gather_layer(order[0]);
    if (i + 1 < order.size()) gathered_[order[i + 1]] = gather_layer(order[i + 1]);
  }

  // ---- gradients ----
  // Where this micro-batch's gradients of buffer b accumulate: its gradient tensor, or under
  // ZeRO-2/3 a transient full-size bucket, reduce-scattered once the buffer's pass is done.
  std::uint32_t grad_target(int b) {
    const ParamBuffer& buf = buffer(b);
    if (!buf.grad_sharded) return buf.grad;
    auto& slot = bucket_[{b, mb_}];
    if (!slot) slot = grad("grad.bucket", buf.padded, TensorClass::Gathered);
    return *slot;
  }

  // Views of the slots of buffer b whose parameters are replicated across tensor-parallel ranks
  // but see different sequence shards under SP, so their gradients are summed over TP.
  std::vector<V> replicated_views(int b, std::uint32_t t) const {
    std::vector<V> out;
    const ParamBuffer& buf = buffer(b);
    if (buf.shard_group != GroupKind::DP) return out;  // experts: reduced over expert-dp, which spans tp
    for (const ParamSlot& s : buf.slots)
      if (params_[s.param].split == TpSplit::Replicated) out.push_back(V(t, Part{s.offset, s.count}));
    return out;
  }
  void replicated_tp_all_reduce(const std::vector<std::pair<int, std::uint32_t>>& targets) {
    if (!D_.sp) return;
    i64 count = 0;
    std::vector<V> views;
    for (auto [b, t] : targets)
      for (const V& v : replicated_views(b, t)) {
        views.push_back(v);
        count += v.count;
      }
    if (views.empty()) return;
    Op op = make(OpKind::AllReduce, "replicated.grad_all_reduce", Stream::TensorComm);
    op.group = GroupKind::TP;
    op.comm_bytes = D_.gb * count;
    op.dtype = P_.grad_dtype;
    const auto idx = emit(op, {}, {});
    for (const V& v : views) add_use(idx, v, false);
    for (const V& v : views) add_use(idx, v, true);
  }

  // After buffer b's gradients for this pass are complete: under ZeRO-2/3 reduce-scatter the
  // bucket into the gradient shard (every micro-batch); otherwise reduce once after the last one.
  void reduce_grads(int b, bool last_pass) {
    const ParamBuffer& buf = buffer(b);
    const int g = group_size(buf.shard_group);
    if (buf.grad_sharded) {
      auto it = bucket_.find({b, mb_});
      if (it == bucket_.end() || !it->second) return;
      const std::uint32_t bucket = *it->second;
      replicated_tp_all_reduce({{b, bucket}});
      // The shard accumulates over micro-batches: it is read and written.
      comm(OpKind::ReduceScatter, buf.shard_group, "grad.reduce_scatter", D_.gb * buf.padded, Stream::DataComm,
           {bucket, buf.grad}, {buf.grad}, 0, P_.grad_dtype);
      bucket_.erase(it);
    } else if (last_pass && g > 1) {
      const bool rs = P_.zero_stage == 1;
      comm(rs ? OpKind::ReduceScatter : OpKind::AllReduce, buf.shard_group, rs ? "grad.reduce_scatter" : "grad.all_reduce",
           D_.gb * buf.padded, Stream::DataComm, {buf.grad}, {buf.grad}, 0, P_.grad_dtype);
    }
  }
  void reduce_layer_grads(int l, bool last_pass) {
    const LayerWeights& w = layers_.at(l);
    // Without ZeRO-2/3 the replicated slots are summed over TP once, in the optimizer tail.
    reduce_grads(w.buffer, last_pass);
    if (w.moe) reduce_grads(w.expert_buffer, last_pass);
  }

  // ---- layers ----
  struct LayerActs {
    std::uint32_t x_in = 0, ln1_out = 0, qkv = 0, stats = 0, attn_out = 0, mask1 = 0, x_mid = 0;
    std::uint32_t ln2_out = 0, fc1_out = 0, act_out = 0, mask2 = 0, x_out = 0;
    std::uint32_t probs = 0, routing = 0, expert_in = 0, expert_out = 0;  // MoE
    bool has_mask = false;
  };

  std::optional<V> opt(std::uint32_t t, Part p) const { return p.count > 0 ? std::optional<V>(V(t, p)) : std::nullopt; }

  // Norm forward: reads [x, gamma, (beta)], writes [y].
  void norm_fwd(std::string_view nm, std::uint32_t x, std::uint32_t w, Part gamma, Part beta, std::uint32_t y) {
    std::vector<V> reads = {x, V(w, gamma)};
    if (beta.count > 0) reads.push_back(V(w, beta));
    elementwise(OpKind::Norm, nm, D_.Tres, D_.h, D_.layernorm ? 8.0 : 5.0, reads, {y});
  }
  // Norm backward: reads [dy, x, gamma, (residual gradient)], writes [dx = residual + d norm,
  // dgamma, (dbeta)].
  void norm_bwd(std::string_view nm, std::uint32_t dy, std::uint32_t x, std::uint32_t w, Part gamma,
                std::optional<std::uint32_t> residual, std::uint32_t dx, std::uint32_t g, Part dgamma, Part dbeta) {
    std::vector<V> reads = {dy, x, V(w, gamma)}, writes = {dx, V(g, dgamma)};
    if (residual) reads.push_back(*residual);
    if (dbeta.count > 0) writes.push_back(V(g, dbeta));
    elementwise(OpKind::Norm, nm, D_.Tres, D_.h, D_.layernorm ? 12.0 : 8.0, reads, writes);
  }

  // Residual add after a branch: reads [branch, residual, (bias)], writes [out, (mask)]:
  // out = residual + dropout(branch + bias), Megatron's fused bias-dropout-add.
  void residual_fwd(std::string_view nm, Variant site, std::uint32_t branch, std::uint32_t residual, std::optional<V> bias,
                    std::uint32_t out, std::optional<std::uint32_t> mask) {
    std::vector<V> reads = {branch, residual}, writes = {out};
    if (bias) reads.push_back(*bias);
    if (mask) writes.push_back(*mask);
    elementwise(OpKind::DropoutAdd, nm, D_.Tres, D_.h, mask ? 3.0 : 1.0, reads, writes, site);
  }
  // Its backward: reads [dy, (mask)], writes [d_branch, (dbias)]; the residual's gradient is dy.
  void residual_bwd(std::string_view nm, Variant site, std::uint32_t dy, std::optional<std::uint32_t> mask, std::uint32_t d_branch,
                    std::optional<V> dbias) {
    std::vector<V> reads = {dy}, writes = {d_branch};
    if (mask) reads.push_back(*mask);
    if (dbias) writes.push_back(*dbias);
    elementwise(OpKind::DropoutAdd, nm, D_.Tres, D_.h, mask ? 2.0 : 0.0, reads, writes, site);
  }

  LayerActs layer_forward(int l, std::uint32_t x_in) {
    const LayerWeights& w = layers_.at(l);
    const std::uint32_t wt = W(l);
    const bool keep = phase_ == Phase::Recompute || P_.recompute != Recompute::Full;
    const TensorClass cls = keep ? TensorClass::Activation : TensorClass::Temporary;
    const TensorClass core_cls =
        keep && (P_.recompute == Recompute::None || phase_ == Phase::Recompute) ? TensorClass::Activation : TensorClass::Temporary;
    LayerActs A;
    A.x_in = x_in;
    // attention block
    A.ln1_out = act("ln1.out", D_.Tres * D_.h, cls);
    norm_fwd("ln1", x_in, wt, w.norm1_w, w.norm1_b, A.ln1_out);
    if (P_.tp_comm_overlap) {
      A.qkv = act("qkv.out", D_.T * D_.qkv_cols, cls);
      ag_gemm("qkv", D_.qkv_cols, D_.h, A.ln1_out, V(wt, w.qkv_w), opt(wt, w.qkv_b), A.qkv);
    } else {
      const auto qkv_in = sp_gather("ln1.all_gather", A.ln1_out);
      A.qkv = act("qkv.out", D_.T * D_.qkv_cols, cls);
      gemm_fwd("qkv", D_.T, D_.qkv_cols, D_.h, 1, qkv_in, V(wt, w.qkv_w), opt(wt, w.qkv_b), A.qkv);
    }
    if (D_.rope) elementwise(OpKind::Rope, "rope", D_.T, (D_.a_l + D_.g_l) * D_.d, 6.0, {A.qkv}, {A.qkv});
    attention_forward(A, core_cls, cls);
    std::uint32_t branch1 = 0;
    if (P_.tp_comm_overlap) {
      branch1 = gemm_rs("proj", Variant::GemmForward, D_.h, D_.a_l * D_.d, A.attn_out, V(wt, w.proj_w));
    } else {
      const auto proj = act("proj.out", D_.T * D_.h, TensorClass::Temporary);
      gemm_fwd("proj", D_.T, D_.h, D_.a_l * D_.d, 1, A.attn_out, V(wt, w.proj_w), std::nullopt, proj);
      branch1 = tp_reduce("proj.tp_reduce", proj);
    }
    A.x_mid = act("residual1.out", D_.Tres * D_.h, cls);
    A.has_mask = D_.hidden_dropout;
    if (A.has_mask) A.mask1 = mask("dropout1.mask", D_.Tres * D_.h, cls);
    residual_fwd(A.has_mask ? "dropout_add1" : "residual_add1", Variant::AttentionResidual, branch1, x_in, opt(wt, w.proj_b), A.x_mid,
                 A.has_mask ? std::optional<std::uint32_t>(A.mask1) : std::nullopt);
    // MLP block
    A.ln2_out = act("ln2.out", D_.Tres * D_.h, cls);
    norm_fwd("ln2", A.x_mid, wt, w.norm2_w, w.norm2_b, A.ln2_out);
    const auto branch2 = w.moe ? moe_forward(l, A, cls) : mlp_forward(l, A, cls);
    A.x_out = act("residual2.out", D_.Tres * D_.h, TensorClass::Activation);
    if (A.has_mask) A.mask2 = mask("dropout2.mask", D_.Tres * D_.h, cls);
    residual_fwd(A.has_mask ? "dropout_add2" : "residual_add2", Variant::MlpResidual, branch2, A.x_mid, w.moe ? std::nullopt : opt(wt, w.fc2_b), A.x_out,
                 A.has_mask ? std::optional<std::uint32_t>(A.mask2) : std::nullopt);
    return A;
  }

  double attention_flops(i64 keys) const {
    return 4.0 * static_cast<double>(D_.b * D_.a_l) * static_cast<double>(D_.S) * static_cast<double>(keys) *
           static_cast<double>(D_.d);
  }

  // Saved softmax statistics: the log-sum-exp per query and head (flash), or the probabilities
  // (unfused), whose first 4·b·heads·S bytes a flash-style kernel uses for the log-sum-exp.
  std::uint32_t attention_stats(TensorClass cls) {
    if (D_.flash) return fp32("attention.lse", D_.b * D_.a_l * D_.S, cls);
    i64 bytes = D_.e * D_.b * D_.a_l * D_.S * D_.s;
    if (D_.attn_dropout) bytes += (1 + D_.e) * D_.b * D_.a_l * D_.S * D_.s;  // mask and dropped probabilities
    return tensor("attention.softmax", std::max(bytes, 4 * D_.b * D_.a_l * D_.S), cls);
  }

  Op attention_op(std::string_view nm, i64 keys, double flops_factor, int step) {
    Op op = make(OpKind::AttentionCore, nm);
    op.m = D_.S;
    op.n = keys;
    op.k = D_.d;
    op.batch = D_.b * D_.a_l;
    op.step = static_cast<std::uint8_t>(step);
    op.flops = flops_factor * attention_flops(keys);
    op.vector_flops = flops_factor * 5.0 * static_cast<double>(D_.b * D_.a_l * D_.S * keys);
    op.bytes_read = D_.e * D_.T * D_.qkv_cols;
    op.bytes_written = D_.e * D_.T * D_.a_l * D_.d;
    if (!D_.flash) {
      // Megatron's unfused path, per score element (e bytes each): forward, q k^T writes the
      // scores, the fused scale-mask-softmax reads them and writes the probabilities, dropout reads
      // those and writes the dropped ones and a 1-byte mask, p v reads them. Backward, do v^T
      // writes dP, dropout's backward reads it and the mask and writes its gradient, softmax's
      // backward reads that and the probabilities and writes dS, dq and dk read dS, dv reads p.
      op.variant = Variant::AttentionUnfused;
      const i64 scores = D_.b * D_.a_l * D_.S * keys;
      const bool bwd = flops_factor > 1.5;
      const i64 reads = bwd ? (D_.attn_dropout ? 4 * D_.e + 1 : 3 * D_.e) + 2 * D_.e : (D_.attn_dropout ? 3 * D_.e : 2 * D_.e);
      const i64 writes = bwd ? (D_.attn_dropout ? 3 * D_.e : 2 * D_.e) : (D_.attn_dropout ? 3 * D_.e + 1 : 2 * D_.e);
      op.bytes_read += reads * scores;
      op.bytes_written += writes * scores;
    }
    return op;
  }

  i64 kv_elems() const { return 2 * D_.T * D_.g_l * D_.d; }  // one block's K and V, rows [K | V]

  // Causal attention as cp steps of a ring (Liu et al., ring attention): each key/value block moves
  // on to the next CP rank while the current one is computed. Without CP, one step on qkv itself.
  template <class Step>
  void attention_ring(std::uint32_t qkv, Step step) {
    if (D_.cp == 1) {
      step(qkv, 0);
      return;
    }
    std::uint32_t kv = act("attention.kv", kv_elems(), TensorClass::Temporary);
    elementwise(OpKind::Copy, "attention.kv_pack", D_.T, 2 * D_.g_l * D_.d, 0.0, {qkv}, {kv}, Variant::PackKeyValues);
    for (int i = 0; i < D_.cp; ++i) {
      std::uint32_t next = kv;
      if (i + 1 < D_.cp) {
        next = act("attention.kv_ring", kv_elems(), TensorClass::Temporary);
        comm(OpKind::RingExchange, GroupKind::CP, "attention.kv_ring", D_.e * kv_elems(), Stream::TensorComm, {kv}, {next}, 1);
      }
      step(kv, i);
      kv = next;
    }
  }

  void attention_forward(LayerActs& A, TensorClass core_cls, TensorClass cls) {
    A.stats = attention_stats(core_cls);
    A.attn_out = act("attention.out", D_.T * D_.a_l * D_.d, cls);
    attention_ring(A.qkv, [&](std::uint32_t kv, int i) {
      emit(attention_op("attention", D_.S, 1.0, i), {A.qkv, kv}, {A.attn_out, A.stats});
    });
  }

  std::uint32_t mlp_forward(int l, LayerActs& A, TensorClass cls) {
    const LayerWeights& w = layers_.at(l);
    const std::uint32_t wt = W(l);
    if (P_.tp_comm_overlap) {
      A.fc1_out = act("fc1.out", D_.T * D_.f_l * D_.gated(), cls);
      ag_gemm("fc1", D_.f_l * D_.gated(), D_.h, A.ln2_out, V(wt, w.fc1_w), opt(wt, w.fc1_b), A.fc1_out);
    } else {
      const auto fc_in = sp_gather("ln2.all_gather", A.ln2_out);
      A.fc1_out = act("fc1.out", D_.T * D_.f_l * D_.gated(), cls);
      gemm_fwd("fc1", D_.T, D_.f_l * D_.gated(), D_.h, 1, fc_in, V(wt, w.fc1_w), opt(wt, w.fc1_b), A.fc1_out);
    }
    A.act_out = act("activation.out", D_.T * D_.f_l, cls);
    elementwise(OpKind::Activation, D_.swiglu ? "swiglu" : "gelu", D_.T, D_.f_l, D_.swiglu ? 6.0 : 10.0, {A.fc1_out}, {A.act_out});
    if (P_.tp_comm_overlap) return gemm_rs("fc2", Variant::GemmForward, D_.h, D_.f_l, A.act_out, V(wt, w.fc2_w));
    const auto fc2 = act("fc2.out", D_.T * D_.h, TensorClass::Temporary);
    gemm_fwd("fc2", D_.T, D_.h, D_.f_l, 1, A.act_out, V(wt, w.fc2_w), std::nullopt, fc2);
    return tp_reduce("fc2.tp_reduce", fc2);
  }

  // Routing of one token-assignment: expert (int32), slot (int32), gate (fp32).
  static constexpr i64 kRoutingBytes = 12;

  std::uint32_t moe_forward(int l, LayerActs& A, TensorClass cls) {
    const LayerWeights& w = layers_.at(l);
    const std::uint32_t wt = W(l), we = WE(l);
    const i64 tok = D_.Tres;  // MoE with tp > 1 requires sequence parallelism: tokens stay sharded
    const auto logits = act("router.logits", tok * D_.E, TensorClass::Temporary);
    gemm_fwd("router", tok, D_.E, D_.h, 1, A.ln2_out, V(wt, w.router_w), std::nullopt, logits);
    A.probs = fp32("router.probs", tok * D_.E, cls);
    A.routing = tensor("router.routing", kRoutingBytes * tok * D_.top_k, cls);
    elementwise(OpKind::Router, "router.topk", tok, D_.E, 8.0, {logits}, {A.probs, A.routing});
    const auto dispatch = act("moe.permuted", D_.R * D_.h, D_.ep > 1 ? TensorClass::Temporary : cls);
    elementwise(OpKind::Permute, "moe.permute", D_.R, D_.h, 0.0, {A.ln2_out, A.routing}, {dispatch}, Variant::Dispatch);
    A.expert_in = dispatch;
    if (D_.ep > 1) {
      A.expert_in = act("moe.expert_in", D_.R * D_.h, cls);
      comm(OpKind::AllToAll, GroupKind::EP, "moe.dispatch", D_.e * D_.R * D_.h, Stream::TensorComm, {dispatch}, {A.expert_in});
    }
    A.fc1_out = act("expert_fc1.out", D_.R * D_.fe * D_.gated(), cls);
    gemm_fwd("expert_fc1", D_.capacity, D_.fe * D_.gated(), D_.h, D_.E_l, A.expert_in, V(we, w.ex_fc1_w), opt(we, w.ex_fc1_b),
             A.fc1_out, true);
    A.act_out = act("expert_activation.out", D_.R * D_.fe, cls);
    elementwise(OpKind::Activation, D_.swiglu ? "expert_swiglu" : "expert_gelu", D_.R, D_.fe, D_.swiglu ? 6.0 : 10.0,
                {A.fc1_out}, {A.act_out});
    auto out = act("expert_fc2.out", D_.R * D_.h, D_.ep > 1 ? TensorClass::Temporary : cls);
    gemm_fwd("expert_fc2", D_.capacity, D_.h, D_.fe, D_.E_l, A.act_out, V(we, w.ex_fc2_w), opt(we, w.ex_fc2_b), out, true);
    if (D_.ep > 1) {
      const auto back = act("moe.combined", D_.R * D_.h, cls);
      comm(OpKind::AllToAll, GroupKind::EP, "moe.combine", D_.e * D_.R * D_.h, Stream::TensorComm, {out}, {back});
      out = back;
    }
    A.expert_out = out;  // the combine's backward needs it for the gate gradients
    const auto moe_out = act("moe.out", tok * D_.h, TensorClass::Temporary);
    elementwise(OpKind::Permute, "moe.unpermute", D_.R, D_.h, 2.0, {out, A.routing}, {moe_out}, Variant::Combine);
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
    const std::uint32_t wt = W(l);
    const auto g = grad_target(w.buffer);
    const i64 res = D_.Tres * D_.h;
    // MLP block
    const auto d_branch2 = act("residual2.grad", res, TensorClass::Temporary);
    residual_bwd(A.has_mask ? "dropout_add2.bwd" : "residual_add2.bwd", Variant::MlpResidual, dy, A.has_mask ? std::optional<std::uint32_t>(A.mask2) : std::nullopt,
                 d_branch2, w.moe ? std::nullopt : opt(g, w.fc2_b));
    const auto d_ln2 = w.moe ? moe_backward(l, A, d_branch2) : mlp_backward(l, A, d_branch2);
    const auto dy_mid = act("residual1.grad", res, TensorClass::Temporary);
    norm_bwd("ln2.bwd", d_ln2, A.x_mid, wt, w.norm2_w, dy, dy_mid, g, w.norm2_w, w.norm2_b);
    // attention block
    const auto d_branch1 = act("proj.grad_out", res, TensorClass::Temporary);
    residual_bwd(A.has_mask ? "dropout_add1.bwd" : "residual_add1.bwd", Variant::AttentionResidual, dy_mid,
                 A.has_mask ? std::optional<std::uint32_t>(A.mask1) : std::nullopt, d_branch1, opt(g, w.proj_b));
    const i64 T = D_.T, h = D_.h, ad = D_.a_l * D_.d;
    const auto d_attn = act("attention.out_grad", D_.T * ad, TensorClass::Temporary);
    if (P_.tp_comm_overlap) {
      ag_backward("proj", ad, h, d_branch1, V(wt, w.proj_w), d_attn, A.attn_out, V(g, w.proj_w));
    } else {
      const auto d_proj = sp_gather("proj.grad_all_gather", d_branch1);
      gemm_dgrad("proj.dgrad", D_.T, D_.h, ad, 1, d_proj, V(wt, w.proj_w), d_attn);
      wgrad([this, T, h, ad, x = A.attn_out, d_proj, g, p = w.proj_w] { gemm_wgrad("proj.wgrad", T, h, ad, 1, x, d_proj, V(g, p), std::nullopt); });
    }
    const auto d_qkv = act("qkv.grad_out", D_.T * D_.qkv_cols, TensorClass::Temporary);
    attention_backward(A, d_attn, d_qkv);
    if (D_.rope) elementwise(OpKind::Rope, "rope.bwd", D_.T, (D_.a_l + D_.g_l) * D_.d, 6.0, {d_qkv}, {d_qkv});
    // The input gradient's reduction: a ring overlapped with its GEMM, or a collective after the
    // weight gradient (which it then overlaps).
    std::uint32_t d_ln1r = 0, d_ln1 = 0;
    if (P_.tp_comm_overlap) {
      d_ln1r = gemm_rs("qkv.dgrad", Variant::GemmInputGrad, D_.h, D_.qkv_cols, d_qkv, V(wt, w.qkv_w));
    } else {
      d_ln1 = act("ln1.grad_out", D_.T * D_.h, TensorClass::Temporary);
      gemm_dgrad("qkv.dgrad", D_.T, D_.qkv_cols, D_.h, 1, d_qkv, V(wt, w.qkv_w), d_ln1);
    }
    const i64 cols = D_.qkv_cols;
    wgrad([this, T, h, cols, ln1 = A.ln1_out, d_qkv, g, pw = w.qkv_w, pb = w.qkv_b] {
      const auto x = sp_gather("ln1.regather", ln1);  // SP keeps only the shard; gather it again
      gemm_wgrad("qkv.wgrad", T, cols, h, 1, x, d_qkv, V(g, pw), opt(g, pb));
    });
    if (!P_.tp_comm_overlap) d_ln1r = tp_reduce("ln1.grad_tp_reduce", d_ln1);
    const auto dx = act("layer.grad_in", res, TensorClass::Temporary);
    norm_bwd("ln1.bwd", d_ln1r, A.x_in, wt, w.norm1_w, dy_mid, dx, g, w.norm1_w, w.norm1_b);
    return dx;
  }

  void attention_backward(const LayerActs& A, std::uint32_t d_attn, std::uint32_t d_qkv) {
    std::uint32_t stats = A.stats;
    if (P_.recompute == Recompute::Selective) {
      const Phase saved = phase_;
      phase_ = Phase::Recompute;
      stats = attention_stats(TensorClass::Temporary);
      const auto out = act("attention.out_recomputed", D_.flash ? 0 : D_.T * D_.a_l * D_.d, TensorClass::Temporary);
      attention_ring(A.qkv, [&](std::uint32_t kv, int i) { emit(attention_op("attention", D_.S, 1.0, i), {A.qkv, kv}, {out, stats}); });
      phase_ = saved;
    }
    if (D_.cp == 1) {
      emit(attention_op("attention.bwd", D_.S, 2.0, 0), {d_attn, A.qkv, A.qkv, A.attn_out, stats}, {d_qkv});
      return;
    }
    // Ring backward: key/value blocks travel ahead (prefetched); each block's dK, dV travel behind
    // them, gaining every rank's share, and a last hop brings them home to the block's owner.
    std::uint32_t kv = act("attention.kv", kv_elems(), TensorClass::Temporary);
    elementwise(OpKind::Copy, "attention.kv_pack", D_.T, 2 * D_.g_l * D_.d, 0.0, {A.qkv}, {kv}, Variant::PackKeyValues);
    std::optional<std::uint32_t> dkv_in;
    for (int i = 0; i < D_.cp; ++i) {
      std::uint32_t next = kv;
      if (i + 1 < D_.cp) {
        next = act("attention.kv_ring", kv_elems(), TensorClass::Temporary);
        comm(OpKind::RingExchange, GroupKind::CP, "attention.kv_ring", D_.e * kv_elems(), Stream::TensorComm, {kv}, {next}, 1);
      }
      const auto dkv = act("attention.dkv", kv_elems(), TensorClass::Temporary);
      const auto idx = emit(attention_op("attention.bwd", D_.S, 2.0, i), {d_attn, A.qkv, kv, A.attn_out, stats}, {});
      if (dkv_in) add_use(idx, *dkv_in, false);
      add_use(idx, d_qkv, true);
      add_use(idx, dkv, true);
      const auto dkv_next = act("attention.dkv_ring", kv_elems(), TensorClass::Temporary);
      comm(OpKind::RingExchange, GroupKind::CP, "attention.dkv_ring", D_.e * kv_elems(), Stream::TensorComm, {dkv}, {dkv_next}, 1);
      dkv_in = dkv_next;
      kv = next;
    }
    elementwise(OpKind::Copy, "attention.dkv_add", D_.T, 2 * D_.g_l * D_.d, 1.0, {*dkv_in, d_qkv}, {d_qkv},
                Variant::AddKeyValueGrads);
  }

  std::uint32_t mlp_backward(int l, const LayerActs& A, std::uint32_t d_branch) {
    const LayerWeights& w = layers_.at(l);
    const std::uint32_t wt = W(l);
    const auto g = grad_target(w.buffer);
    const i64 T = D_.T, h = D_.h, f = D_.f_l, fg = D_.f_l * D_.gated();
    const auto d_act = act("activation.grad_out", D_.T * D_.f_l, TensorClass::Temporary);
    if (P_.tp_comm_overlap) {
      ag_backward("fc2", f, h, d_branch, V(wt, w.fc2_w), d_act, A.act_out, V(g, w.fc2_w));
    } else {
      const auto d_fc2 = sp_gather("fc2.grad_all_gather", d_branch);
      gemm_dgrad("fc2.dgrad", D_.T, D_.h, D_.f_l, 1, d_fc2, V(wt, w.fc2_w), d_act);
      wgrad([this, T, h, f, x = A.act_out, d_fc2, g, p = w.fc2_w] { gemm_wgrad("fc2.wgrad", T, h, f, 1, x, d_fc2, V(g, p), std::nullopt); });
    }
    const auto d_fc1 = act("fc1.grad_out", D_.T * fg, TensorClass::Temporary);
    elementwise(OpKind::Activation, D_.swiglu ? "swiglu.bwd" : "gelu.bwd", D_.T, D_.f_l, D_.swiglu ? 8.0 : 14.0,
                {d_act, A.fc1_out}, {d_fc1});
    if (P_.tp_comm_overlap) {
      const auto d_ln2r = gemm_rs("fc1.dgrad", Variant::GemmInputGrad, D_.h, fg, d_fc1, V(wt, w.fc1_w));
      fc1_wgrad(A, d_fc1, g, w);
      return d_ln2r;
    }
    const auto d_ln2 = act("ln2.grad_out", D_.T * D_.h, TensorClass::Temporary);
    gemm_dgrad("fc1.dgrad", D_.T, fg, D_.h, 1, d_fc1, V(wt, w.fc1_w), d_ln2);
    fc1_wgrad(A, d_fc1, g, w);
    return tp_reduce("ln2.grad_tp_reduce", d_ln2);
  }

  void fc1_wgrad(const LayerActs& A, std::uint32_t d_fc1, std::uint32_t g, const LayerWeights& w) {
    const i64 T = D_.T, h = D_.h, fg = D_.f_l * D_.gated();
    wgrad([this, T, h, fg, ln2 = A.ln2_out, d_fc1, g, pw = w.fc1_w, pb = w.fc1_b] {
      const auto x = sp_gather("ln2.regather", ln2);
      gemm_wgrad("fc1.wgrad", T, fg, h, 1, x, d_fc1, V(g, pw), opt(g, pb));
    });
  }

  std::uint32_t moe_backward(int l, const LayerActs& A, std::uint32_t d_branch) {
    const LayerWeights& w = layers_.at(l);
    const std::uint32_t wt = W(l), we = WE(l);
    const auto g = grad_target(w.buffer), ge = grad_target(w.expert_buffer);
    const i64 tok = D_.Tres, R = D_.R, h = D_.h, fe = D_.fe, fg = D_.fe * D_.gated(), C = D_.capacity, El = D_.E_l;
    auto d_out = act("moe.grad_combined", R * h, TensorClass::Temporary);
    const auto d_gate = fp32("router.grad_gate", tok * D_.top_k, TensorClass::Temporary);
    elementwise(OpKind::Permute, "moe.unpermute.bwd", R, h, 2.0, {d_branch, A.expert_out, A.routing}, {d_out, d_gate}, Variant::Combine);
    if (D_.ep > 1) {
      const auto back = act("moe.grad_expert_out", R * h, TensorClass::Temporary);
      comm(OpKind::AllToAll, GroupKind::EP, "moe.combine.bwd", D_.e * R * h, Stream::TensorComm, {d_out}, {back});
      d_out = back;
    }
    const auto d_act = act("expert_activation.grad_out", R * fe, TensorClass::Temporary);
    gemm_dgrad("expert_fc2.dgrad", C, h, fe, El, d_out, V(we, w.ex_fc2_w), d_act, true);
    wgrad([this, C, h, fe, El, x = A.act_out, d_out, ge, pw = w.ex_fc2_w, pb = w.ex_fc2_b] {
      gemm_wgrad("expert_fc2.wgrad", C, h, fe, El, x, d_out, V(ge, pw), opt(ge, pb), true);
    });
    const auto d_fc1 = act("expert_fc1.grad_out", R * fg, TensorClass::Temporary);
    elementwise(OpKind::Activation, D_.swiglu ? "expert_swiglu.bwd" : "expert_gelu.bwd", R, fe, D_.swiglu ? 8.0 : 14.0,
                {d_act, A.fc1_out}, {d_fc1});
    auto d_in = act("expert_fc1.grad_in", R * h, TensorClass::Temporary);
    gemm_dgrad("expert_fc1.dgrad", C, fg, h, El, d_fc1, V(we, w.ex_fc1_w), d_in, true);
    wgrad([this, C, h, fg, El, x = A.expert_in, d_fc1, ge, pw = w.ex_fc1_w, pb = w.ex_fc1_b] {
      gemm_wgrad("expert_fc1.wgrad", C, fg, h, El, x, d_fc1, V(ge, pw), opt(ge, pb), true);
    });
    if (D_.ep > 1) {
      const auto back = act("moe.grad_permuted", R * h, TensorClass::Temporary);
      comm(OpKind::AllToAll, GroupKind::EP, "moe.dispatch.bwd", D_.e * R * h, Stream::TensorComm, {d_in}, {back});
      d_in = back;
    }
    const auto d_ln2 = act("ln2.grad_out", tok * h, TensorClass::Temporary);
    const auto d_logits = act("router.grad_logits", tok * D_.E, TensorClass::Temporary);
    elementwise(OpKind::Permute, "moe.permute.bwd", R, h, 0.0, {d_in, A.routing}, {d_ln2}, Variant::Dispatch);
    elementwise(OpKind::Router, "router.topk.bwd", tok, D_.E, 6.0, {d_gate, A.probs, A.routing}, {d_logits});
    gemm("router.dgrad", Variant::GemmInputGradAccumulate, tok, h, D_.E, 1, {d_logits, V(wt, w.router_w), d_ln2}, {d_ln2});
    const i64 E = D_.E;
    wgrad([this, tok, h, E, x = A.ln2_out, d_logits, g, p = w.router_w] {
      gemm_wgrad("router.wgrad", tok, E, h, 1, x, d_logits, V(g, p), std::nullopt);
    });
    return d_ln2;
  }

  // ---- embedding and loss ----
  std::uint32_t embedding_forward() {
    const std::uint32_t word = gather(word_buf_, "zero3.all_gather_embedding");
    const std::optional<std::uint32_t> pos =
        pos_buf_ >= 0 ? std::optional<std::uint32_t>(gather(pos_buf_, "zero3.all_gather_position")) : std::nullopt;
    const auto emb = act("embedding.out", D_.T * D_.h, TensorClass::Temporary);
    Op op = make(OpKind::Embedding, "embedding");
    op.m = D_.T;
    op.n = D_.h;
    op.vector_flops = static_cast<double>(D_.T * D_.h);
    op.bytes_read = D_.e * D_.T * D_.h * (pos ? 2 : 1);
    op.bytes_written = D_.e * D_.T * D_.h;
    const i64 word_count = buffer(word_buf_).count;
    if (pos)
      emit(op, {V(word, Part{0, word_count}), V(*pos, Part{0, buffer(pos_buf_).count})}, {emb});
    else
      emit(op, {V(word, Part{0, word_count})}, {emb});
    auto x = tp_reduce("embedding.tp_reduce", emb);  // vocab-parallel lookup: partial rows
    if (D_.hidden_dropout) {
      emb_mask_[mb_] = mask("embedding.dropout_mask", D_.Tres * D_.h, TensorClass::Activation);
      const auto out = act("embedding.dropout_out", D_.Tres * D_.h, TensorClass::Activation);
      elementwise(OpKind::DropoutAdd, "embedding.dropout", D_.Tres, D_.h, 2.0, {x}, {out, emb_mask_[mb_]}, Variant::EmbeddingDropout);
      x = out;
    }
    return x;
  }

  void embedding_backward(std::uint32_t dy) {
    if (D_.hidden_dropout) {
      const auto d = act("embedding.dropout_grad", D_.Tres * D_.h, TensorClass::Temporary);
      elementwise(OpKind::DropoutAdd, "embedding.dropout.bwd", D_.Tres, D_.h, 1.0, {dy, emb_mask_.at(mb_)}, {d}, Variant::EmbeddingDropout);
      dy = d;
    }
    // Backward of the forward's all-reduce is the identity; of its reduce-scatter, an all-gather.
    const auto full = sp_gather("embedding.grad_all_gather", dy);
    // Tied embeddings on one stage: the output layer's gradient bucket of this micro-batch is
    // shared, and reduced by whichever of the two writes it last.
    const auto shared = shared_bucket_.find(mb_);
    const bool reduce_here = shared == shared_bucket_.end() || !split_w_;
    const auto g = shared != shared_bucket_.end() ? shared->second : grad_target(word_buf_);
    if (shared != shared_bucket_.end()) shared_bucket_.erase(shared);
    const std::optional<std::uint32_t> gpos = pos_buf_ >= 0 ? std::optional<std::uint32_t>(grad_target(pos_buf_)) : std::nullopt;
    Op op = make(OpKind::Embedding, "embedding.bwd");
    op.m = D_.T;
    op.n = D_.h;
    op.vector_flops = static_cast<double>(D_.T * D_.h);
    op.bytes_read = D_.e * D_.T * D_.h;
    op.bytes_written = D_.gb * D_.T * D_.h;
    if (gpos)
      emit(op, {full}, {V(g, Part{0, buffer(word_buf_).count}), V(*gpos, Part{0, buffer(pos_buf_).count})});
    else
      emit(op, {full}, {V(g, Part{0, buffer(word_buf_).count})});
    if (reduce_here) reduce_grads(word_buf_, false);
    if (gpos) reduce_grads(pos_buf_, false);
  }

  struct LossActs {
    std::uint32_t x = 0, lnf_out = 0, logits = 0, stats = 0;
  };

  LossActs loss_forward(std::uint32_t x) {
    LossActs L;
    L.x = x;
    const std::uint32_t fw = gather(final_buf_, "zero3.all_gather_final_norm");
    const std::uint32_t ow = gather(out_buf_, "zero3.all_gather_output");
    L.lnf_out = act("final_norm.out", D_.Tres * D_.h, TensorClass::Activation);
    norm_fwd("final_norm", x, fw, final_w_, final_b_, L.lnf_out);
    const auto in = sp_gather("final_norm.all_gather", L.lnf_out);
    const auto logits = act("logits", D_.T * D_.V_l, TensorClass::Temporary);
    gemm("output", Variant::GemmForwardTransposed, D_.T, D_.V_l, D_.h, 1, {in, V(ow, Part{0, D_.V_l * D_.h})}, {logits});
    // The fp32 logits are kept; the statistics are [row max | sum of exponentials | target logit].
    L.logits = fp32("cross_entropy.logits", D_.T * D_.V_l, TensorClass::Activation);
    L.stats = fp32("cross_entropy.stats", 3 * D_.T, TensorClass::Activation);
    if (D_.tp == 1) {
      elementwise(OpKind::CrossEntropy, "cross_entropy", D_.T, D_.V_l, 5.0, {logits}, {L.logits, L.stats});
      return L;
    }
    // Megatron's vocab-parallel cross entropy: max-reduce the row maxima, then sum the partials.
    const V max_part(L.stats, Part{0, D_.T}), sums(L.stats, Part{D_.T, 2 * D_.T});
    elementwise(OpKind::CrossEntropy, "cross_entropy.max", D_.T, D_.V_l, 1.0, {logits}, {L.logits, max_part}, Variant::CrossEntropyMax);
    comm(OpKind::AllReduce, GroupKind::TP, "cross_entropy.max_all_reduce", 4 * D_.T, Stream::TensorComm, {max_part}, {max_part}, 0,
         DType::F32, Variant::ReduceMax);
    elementwise(OpKind::CrossEntropy, "cross_entropy", D_.T, D_.V_l, 4.0, {L.logits, max_part}, {sums}, Variant::CrossEntropyPartials);
    comm(OpKind::AllReduce, GroupKind::TP, "cross_entropy.all_reduce", 8 * D_.T, Stream::TensorComm, {sums}, {sums}, 0, DType::F32);
    return L;
  }

  std::uint32_t loss_backward(const LossActs& L) {
    const std::uint32_t fw = gather(final_buf_, "zero3.all_gather_final_norm");
    const std::uint32_t ow = gather(out_buf_, "zero3.all_gather_output");
    const auto d_logits = act("logits.grad", D_.T * D_.V_l, TensorClass::Temporary);
    elementwise(OpKind::CrossEntropy, "cross_entropy.bwd", D_.T, D_.V_l, 3.0, {L.logits, L.stats}, {d_logits});
    const auto d_in = act("final_norm.grad_out", D_.T * D_.h, TensorClass::Temporary);
    const V w(ow, Part{0, D_.V_l * D_.h});
    gemm("output.dgrad", Variant::GemmInputGradTransposed, D_.T, D_.h, D_.V_l, 1, {d_logits, w}, {d_in});
    const auto g = grad_target(out_buf_);
    const bool shared = out_buf_ == word_buf_ && buffer(out_buf_).grad_sharded;
    if (shared) shared_bucket_[mb_] = g;
    const bool reduce_here = !shared || split_w_;
    const i64 T = D_.T, Vl = D_.V_l, h = D_.h;
    wgrad([this, T, Vl, h, lnf = L.lnf_out, d_logits, g, reduce_here] {
      const auto x = sp_gather("final_norm.regather", lnf);
      gemm("output.wgrad", Variant::GemmWeightGradTransposed, Vl, h, T, 1, {x, d_logits}, {V(g, Part{0, Vl * h})});
      if (reduce_here) reduce_grads(out_buf_, false);
    });
    const auto d_lnf = tp_reduce("final_norm.grad_tp_reduce", d_in);
    const auto dy = act("final_norm.grad_in", D_.Tres * D_.h, TensorClass::Temporary);
    const auto gf = grad_target(final_buf_);
    norm_bwd("final_norm.bwd", d_lnf, L.x, fw, final_w_, std::nullopt, dy, gf, final_w_, final_b_);
    reduce_grads(final_buf_, false);
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
      x = tensor("pipe.activation_in", pipe_bytes(), TensorClass::Received, D_.e);
      comm(OpKind::Recv, GroupKind::PP, "pipe.recv_forward", pipe_bytes(), Stream::PipeRecvPrev, {}, {x}, -1);
    }
    const auto order = chunk_layer_order(false);
    for (std::size_t i = 0; i < order.size(); ++i) {
      layer_ = order[i];
      prefetch(order, i);
      LayerActs A = layer_forward(order[i], x);
      gathered_.erase(order[i]);
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
      dy = tensor("pipe.grad_in", pipe_bytes(), TensorClass::Received, D_.e);
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
    // Tied word embeddings live on both pipeline ends; their gradients are summed across them
    // (under ZeRO-2/3 both ends hold matching blocks of equal buffers, so the blocks are summed).
    if (M_.tied_embeddings && p_ > 1 && (first || last)) {
      const auto g = buffer(first ? word_buf_ : out_buf_).grad;
      comm(OpKind::AllReduce, GroupKind::Embedding, "embedding.grad_all_reduce", prog_.tensors[g].bytes, Stream::DataComm, {g}, {g}, 0,
           P_.grad_dtype);
    }
    std::vector<std::pair<int, std::uint32_t>> unsharded;
    for (int b = 0; b < static_cast<int>(prog_.buffers.size()); ++b)
      if (!buffer(b).grad_sharded) unsharded.emplace_back(b, buffer(b).grad);
    replicated_tp_all_reduce(unsharded);
    // Layers reduced their own gradients in backward; the stage's other buffers reduce here.
    for (int b = 0; b < static_cast<int>(prog_.buffers.size()); ++b)
      if (buffer(b).layer == kNone) reduce_grads(b, true);
    // Global gradient norm for clipping: each rank sums the squares of the gradient elements it
    // owns (each element has exactly one owner), and the sum runs over every rank.
    const auto norm = fp32("grad_norm", 1, TensorClass::Temporary);
    std::vector<std::uint32_t> grads;
    for (const ParamBuffer& b : prog_.buffers) grads.push_back(b.grad);
    {
      Op op = make(OpKind::OptimizerStep, "grad_norm");
      op.variant = Variant::GradNorm;
      op.vector_flops = 2.0 * static_cast<double>(local_params());
      op.bytes_read = grad_bytes();
      const auto idx = emit(op, {}, {});
      for (auto g : grads) add_use(idx, g, false);
      add_use(idx, norm, true);
    }
    if (D_.tp > 1) comm(OpKind::AllReduce, GroupKind::TP, "grad_norm.all_reduce", 4, Stream::TensorComm, {norm}, {norm}, 0, DType::F32);
    if (p_ > 1) comm(OpKind::AllReduce, GroupKind::PP, "grad_norm.all_reduce", 4, Stream::DataComm, {norm}, {norm}, 0, DType::F32);
    if (dp_group_ > 1)
      comm(OpKind::AllReduce, GroupKind::DP, "grad_norm.all_reduce", 4, Stream::DataComm, {norm}, {norm}, 0, DType::F32);
    std::vector<std::uint32_t> weights;
    for (const ParamBuffer& b : prog_.buffers) weights.push_back(b.weight);
    if (P_.optimizer_offload) {
      // Gradients go to the host, AdamW runs there on the fp32 master copy, weights come back.
      Op d2h = make(OpKind::CopyD2H, "optimizer.grads_to_host", Stream::Memcpy);
      d2h.comm_bytes = grad_bytes();
      const auto d2h_idx = emit(d2h, {norm}, {});
      for (auto g : grads) add_use(d2h_idx, g, false);
      Op step = make(OpKind::OptimizerStep, "adamw", Stream::Host);
      step.variant = Variant::AdamW;
      step.vector_flops = 16.0 * static_cast<double>(local_params());
      step.bytes_read = step.bytes_written = 16 * local_params();
      const auto step_idx = emit(step, {}, {}, {d2h_idx});
      Op h2d = make(OpKind::CopyH2D, "optimizer.weights_to_device", Stream::Memcpy);
      h2d.comm_bytes = weight_bytes();
      const auto h2d_idx = emit(h2d, {}, {}, {step_idx});
      for (auto w : weights) add_use(h2d_idx, w, true);
    } else {
      Op step = make(OpKind::OptimizerStep, "adamw");
      step.variant = Variant::AdamW;
      step.vector_flops = 16.0 * static_cast<double>(local_params());
      step.bytes_read = grad_bytes() + prog_.tensors[*optimizer_].bytes;
      step.bytes_written = weight_bytes() + prog_.tensors[*optimizer_].bytes;
      const auto idx = emit(step, {norm}, {});
      for (auto g : grads) add_use(idx, g, false);
      add_use(idx, *optimizer_, false);
      for (auto w : weights) add_use(idx, w, true);
      add_use(idx, *optimizer_, true);
    }
    if (!P_.overlap_param_gather) gather_weights();
  }

  // ZeRO-1/2: every rank updated its block of each buffer; the updated weights are gathered back,
  // after the step or (overlapped) at the next iteration's start in the order the forward needs
  // them, each forward op waiting only for its own buffer's.
  void gather_weights() {
    if (P_.zero_stage != 1 && P_.zero_stage != 2) return;
    std::vector<int> order(prog_.buffers.size());
    for (std::size_t b = 0; b < order.size(); ++b) order[b] = static_cast<int>(b);
    const auto rank_of = [&](int b) {  // embeddings, then layers in order, then the head
      const int l = buffer(b).layer;
      return l != kNone ? l + 1 : b == word_buf_ || b == pos_buf_ ? 0 : M_.num_layers + 1;
    };
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return rank_of(a) < rank_of(b); });
    for (int b : order) {
      const ParamBuffer& buf = buffer(b);
      if (!buf.optimizer_sharded) continue;
      layer_ = buf.layer;
      comm(OpKind::AllGather, buf.shard_group, buf.shard_group == GroupKind::DP ? "weights.all_gather" : "weights.all_gather_experts",
           D_.e * buf.padded, Stream::DataComm, {}, {buf.weight});
    }
    layer_ = kNone;
  }

  i64 local_params() const {
    i64 s = 0;
    for (const ParamBuffer& b : prog_.buffers) s += b.optimizer_sharded ? b.padded / group_size(b.shard_group) : b.padded;
    return s;
  }
  i64 grad_bytes() const {
    i64 s = 0;
    for (const ParamBuffer& b : prog_.buffers) s += prog_.tensors[b.grad].bytes;
    return s;
  }
  i64 weight_bytes() const {
    i64 s = 0;
    for (const ParamBuffer& b : prog_.buffers) s += prog_.tensors[b.weight].bytes;
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
  std::vector<i64> elem_bytes_;

  std::vector<LogicalParam> params_;
  ParamDims dims_;
  std::unordered_map<std::string, std::uint32_t> param_index_;
  i64 optimizer_elements_ = 0;

  // emission context
  Phase phase_ = Phase::Forward;
  std::int32_t layer_ = kNone;
  std::int32_t mb_ = kNone;
  int chunk_ = 0;

  std::map<int, LayerWeights> layers_;
  int word_buf_ = -1, pos_buf_ = -1, final_buf_ = -1, out_buf_ = -1;
  Part final_w_, final_b_;
  std::optional<std::uint32_t> optimizer_;

  std::map<std::pair<int, int>, LayerActs> stash_;  // (micro-batch, layer) -> saved activations
  std::map<int, LossActs> loss_;
  std::map<int, std::uint32_t> emb_mask_;
  std::map<int, Gathered> gathered_;
  std::map<int, std::uint32_t> shared_bucket_;  // micro-batch -> tied-embedding gradient bucket
  // (buffer, micro-batch) -> its open ZeRO-2/3 gradient bucket; zero-bubble schedules run a
  // micro-batch's B before an earlier one's W, so buckets of several micro-batches are open at once.
  std::map<std::pair<int, int>, std::optional<std::uint32_t>> bucket_;
  struct DeferredW {
    std::int32_t layer;
    int chunk;
    WJob job;
  };
  std::map<int, std::vector<DeferredW>> w_jobs_;
};

}  // namespace

LocalDims local_dims(const ModelSpec& M, const PlanSpec& P, int padded_vocab) {
  LocalDims D{};
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
  // fp8 training runs its linear layers' GEMMs in fp8 and keeps everything else, and what is
  // stored between ops, in bf16 (Transformer Engine's fp8 recipe; torchao's Float8 linears).
  D.e = static_cast<std::int64_t>(dtype_bytes(P.precision == DType::FP8 ? DType::BF16 : P.precision));
  D.gb = static_cast<std::int64_t>(dtype_bytes(P.grad_dtype));
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
    D.slots = moe_slots_per_expert(M, P);
    D.capacity = D.slots * D.ep;  // what one expert receives from the whole EP group
    D.R = D.E_l * D.capacity;     // == E * slots: the dispatch buffer of one rank
  }
  return D;
}

LayerRange chunk_layers(const ModelSpec& model, const PlanSpec& plan, int stage, int chunk) {
  const int per_chunk = model.num_layers / (plan.pp() * plan.vp());
  return {(chunk * plan.pp() + stage) * per_chunk, per_chunk};
}

CompiledPlan compile_plan(const ModelSpec& model, const PlanSpec& plan) {
  CompiledPlan out{model, plan, Topology(plan), padded_vocab_size(model.vocab_size, plan.tp()),
                   plan.num_micro_batches(), {}, {}, {}};
  const Dims D = local_dims(model, plan, out.padded_vocab);
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
