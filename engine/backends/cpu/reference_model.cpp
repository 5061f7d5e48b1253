// Whole-model single-rank forward and backward on the CPU kernels; see reference_model.hpp.
// Forward keeps every activation the backward reads (the model is small), so the backward is a
// plain walk back through the same steps.
#include "engine/backends/cpu/reference_model.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <span>
#include <stdexcept>

#include "engine/backends/cpu/activation.hpp"
#include "engine/backends/cpu/attention.hpp"
#include "engine/backends/cpu/cross_entropy.hpp"
#include "engine/backends/cpu/dropout.hpp"
#include "engine/backends/cpu/embedding.hpp"
#include "engine/backends/cpu/gemm.hpp"
#include "engine/backends/cpu/moe.hpp"
#include "engine/backends/cpu/norm.hpp"
#include "engine/backends/cpu/rope.hpp"
#include "engine/spec/model_math.hpp"
#include "engine/spec/parameters.hpp"

namespace px::cpu {

std::uint64_t dropout_row_key(std::int64_t iteration, int layer, DropoutSite site, std::int64_t sample, std::int64_t position) {
  const auto u = [](std::int64_t v) { return static_cast<std::uint64_t>(v); };
  std::uint64_t k = mix_key(u(iteration), u(layer));
  k = mix_key(k, static_cast<std::uint64_t>(site));
  k = mix_key(k, u(sample));
  return mix_key(k, u(position));
}

std::int64_t moe_capacity(const ModelSpec& m, std::int64_t tokens) {
  const double exact = m.moe->capacity_factor * static_cast<double>(tokens) * m.moe->top_k / m.moe->num_experts;
  return static_cast<std::int64_t>(std::ceil(exact - 1e-9 * std::max(1.0, exact)));
}

template <class T>
ParamMap<T> init_parameters(const ModelSpec& model, int padded_vocab, std::uint64_t seed) {
  ParamMap<T> out;
  for (const LogicalParam& p : model_parameters(model, padded_vocab)) {
    std::vector<T>& v = out[p.name];
    v.resize(static_cast<std::size_t>(p.count()));
    for (std::int64_t i = 0; i < p.count(); ++i) v[static_cast<std::size_t>(i)] = static_cast<T>(initial_value(p, i, seed));
  }
  return out;
}

template <class T>
ParamMap<T> zero_like(const ParamMap<T>& params) {
  ParamMap<T> out;
  for (const auto& [name, v] : params) out[name].assign(v.size(), T(0));
  return out;
}

namespace {

using i64 = std::int64_t;

template <class T>
using Vec = std::vector<T>;

template <class T>
Vec<T> zeros(i64 n) {
  return Vec<T>(static_cast<std::size_t>(n), T(0));
}

template <class T>
std::span<T> rows_of(Vec<T>& v, i64 first, i64 count, i64 cols) {
  return std::span<T>(v).subspan(static_cast<std::size_t>(first * cols), static_cast<std::size_t>(count * cols));
}
template <class T>
std::span<const T> rows_of(const Vec<T>& v, i64 first, i64 count, i64 cols) {
  return std::span<const T>(v).subspan(static_cast<std::size_t>(first * cols), static_cast<std::size_t>(count * cols));
}

// What the backward reads of one layer's forward. The MLP buffers hold the dense MLP's n = tokens
// rows, or the MoE experts' E * capacity rows, expert-major.
template <class T>
struct LayerActs {
  Vec<T> x_in, ln1, qkv, attn, lse, x_mid, ln2;
  Vec<std::uint8_t> mask_attn, mask_mlp;
  Vec<T> fc1, act;                             // fc1 output (pre-activation), activation output
  Vec<T> probs, gate, dispatched, expert_out;  // MoE only
  Vec<std::int32_t> expert, slot;
};

template <class T>
class Reference {
 public:
  Reference(const ModelSpec& m, int padded_vocab, const ParamMap<T>& params, const MicroBatch& mb, const ReferenceOptions& o)
      : m_(m), mb_(mb), o_(o), params_(params), V_(padded_vocab), h_(m.hidden_size), a_(m.num_attention_heads),
        g_(m.num_query_groups), d_(m.kv_channels), C_((a_ + 2 * g_) * d_), N_(mb.b * mb.s), p_(m.hidden_dropout),
        eps_(static_cast<T>(o.norm_eps)) {
    check();
    for (i64 r = 0; r < N_; ++r) positions_.push_back(static_cast<std::int32_t>(r / mb_.b));
  }

  ReferenceLoss forward() {
    ReferenceLoss loss;
    Vec<T> emb = zeros<T>(N_ * h_);
    const std::span<const T> pos = learned() ? W("position_embedding.weight") : none();
    embedding_forward<T>(mb_.tokens, positions_, W("word_embedding.weight"), 0, pos, emb, h_);
    x_ = zeros<T>(N_ * h_);
    mask_emb_.resize(x_.size());
    dropout_add_forward<T>(emb, {}, x_, mask_emb_, keys(-1, DropoutSite::Embedding), h_, p_, o_.dropout_seed);

    layers_.resize(static_cast<std::size_t>(m_.num_layers));
    for (int l = 0; l < m_.num_layers; ++l) loss.aux += layer_forward(l, layers_[static_cast<std::size_t>(l)]);

    lnf_ = zeros<T>(N_ * h_);
    norm_forward("final_norm", x_, lnf_);
    logits_ = zeros<T>(N_ * V_);
    gemm<T>(false, true, N_, V_, h_, T(1), lnf_.data(), h_, W(output_name()).data(), h_, T(0), logits_.data(), V_);
    row_max_ = zeros<T>(N_), sum_exp_ = zeros<T>(N_);
    Vec<T> target_logit = zeros<T>(N_), row_loss = zeros<T>(N_);
    cross_entropy_row_max<T>(logits_, row_max_, N_, V_);
    cross_entropy_partials<T>(logits_, mb_.targets, 0, row_max_, sum_exp_, target_logit, N_, V_);
    cross_entropy_loss<T>(row_max_, sum_exp_, target_logit, row_loss);
    for (T v : row_loss) loss.lm += static_cast<double>(v);
    loss.lm /= static_cast<double>(N_);
    return loss;
  }

  void backward(ParamMap<T>& grads) {
    grads_ = &grads;
    const Vec<T> dloss(static_cast<std::size_t>(N_), static_cast<T>(o_.loss_scale / static_cast<double>(N_)));
    Vec<T> dlogits = zeros<T>(N_ * V_), dlnf = zeros<T>(N_ * h_);
    cross_entropy_backward<T>(logits_, mb_.targets, 0, row_max_, sum_exp_, dloss, dlogits, N_, V_);
    gemm<T>(false, false, N_, h_, V_, T(1), dlogits.data(), V_, W(output_name()).data(), h_, T(0), dlnf.data(), h_);
    gemm<T>(true, false, V_, h_, N_, T(1), dlogits.data(), V_, lnf_.data(), h_, T(1), G(output_name()).data(), h_);
    Vec<T> dx = zeros<T>(N_ * h_);  // gradient of the residual stream, carried down the layers
    norm_backward("final_norm", dlnf, x_, dx);

    for (int l = m_.num_layers - 1; l >= 0; --l) layer_backward(l, layers_[static_cast<std::size_t>(l)], dx);

    Vec<T> demb = zeros<T>(N_ * h_);
    dropout_backward<T>(dx, mask_emb_, demb, p_);
    embedding_backward<T>(demb, mb_.tokens, positions_, G("word_embedding.weight"), 0,
                          learned() ? G("position_embedding.weight") : std::span<T>{}, h_);
  }

 private:
  void check() const {
    auto fail = [](const std::string& why) { throw std::invalid_argument("reference model: " + why); };
    if (m_.attention_dropout > 0) fail("attention dropout is not supported");
    if (m_.hidden_dropout < 0 || m_.hidden_dropout >= 1) fail("hidden dropout must lie in [0, 1)");
    if (mb_.b <= 0 || mb_.s <= 0) fail("empty micro-batch");
    if (std::ssize(mb_.tokens) != N_ || std::ssize(mb_.targets) != N_) fail("tokens and targets must hold b * s rows each");
    if (p_ > 0 && std::ssize(mb_.sample_ids) != mb_.b) fail("hidden dropout needs one sample id per sequence");
    if (learned() && mb_.s > m_.max_position_embeddings) fail("sequence longer than max_position_embeddings");
    if (m_.num_query_groups <= 0 || m_.num_attention_heads % m_.num_query_groups != 0) fail("heads must divide into groups");
    for (std::size_t r = 0; r < mb_.tokens.size(); ++r)
      if (mb_.tokens[r] < 0 || mb_.tokens[r] >= V_ || mb_.targets[r] < 0 || mb_.targets[r] >= V_) fail("token out of vocabulary");
    for (const LogicalParam& p : model_parameters(m_, static_cast<int>(V_))) {
      auto it = params_.find(p.name);
      if (it == params_.end() || std::ssize(it->second) != p.count())
        fail(fmt::format("parameter {} missing or mis-sized", p.name));
    }
  }

  bool learned() const { return m_.position == PositionKind::Learned; }
  bool swiglu() const { return m_.activation == Activation::SwiGLU; }
  std::string output_name() const { return m_.tied_embeddings ? "word_embedding.weight" : "output.weight"; }
  static std::span<const T> none() { return {}; }

  std::span<const T> W(const std::string& name) const { return params_.at(name); }
  std::span<const T> B(const std::string& name) const {  // a bias, empty when the model has none
    auto it = params_.find(name);
    return it == params_.end() ? none() : std::span<const T>(it->second);
  }
  std::span<T> G(const std::string& name) {
    auto it = grads_->find(name);
    if (it == grads_->end() || it->second.size() != params_.at(name).size())
      throw std::invalid_argument(fmt::format("reference model: gradient {} missing or mis-sized", name));
    return it->second;
  }
  std::span<T> GB(const std::string& name) { return params_.contains(name) ? G(name) : std::span<T>{}; }

  Vec<std::uint64_t> keys(int layer, DropoutSite site) const {
    Vec<std::uint64_t> k(static_cast<std::size_t>(N_));
    for (i64 r = 0; r < N_; ++r) {
      const i64 j = r % mb_.b, si = r / mb_.b;
      const i64 sample = mb_.sample_ids.empty() ? j : mb_.sample_ids[static_cast<std::size_t>(j)];
      k[static_cast<std::size_t>(r)] = dropout_row_key(o_.iteration, layer, site, sample, si);
    }
    return k;
  }

  void norm_forward(const std::string& p, std::span<const T> x, std::span<T> y) const {
    if (m_.norm == NormKind::LayerNorm)
      layernorm_forward<T>(x, W(p + ".weight"), W(p + ".bias"), y, N_, h_, eps_);
    else
      rmsnorm_forward<T>(x, W(p + ".weight"), y, N_, h_, eps_);
  }
  void norm_backward(const std::string& p, std::span<const T> dy, std::span<const T> x, std::span<T> dx) {
    if (m_.norm == NormKind::LayerNorm)
      layernorm_backward<T>(dy, x, W(p + ".weight"), dx, G(p + ".weight"), G(p + ".bias"), N_, h_, eps_);
    else
      rmsnorm_backward<T>(dy, x, W(p + ".weight"), dx, G(p + ".weight"), N_, h_, eps_);
  }

  // y[n x h] = act(x W1 (+b1)) W2 (+b2), f the inner width (per branch for SwiGLU); p names fc1 and
  // fc2's prefix ("layers.0." or "layers.0.experts.1.").
  void ffn_forward(const std::string& p, i64 n, i64 f, std::span<const T> x, std::span<T> fc1, std::span<T> act,
                   std::span<T> y) const {
    const i64 f1 = swiglu() ? 2 * f : f;
    linear_forward<T>(x, W(p + "fc1.weight"), B(p + "fc1.bias"), fc1, n, f1, h_);
    if (swiglu())
      swiglu_forward<T>(fc1, act, n, f);
    else
      gelu_forward<T>(fc1, act);
    linear_forward<T>(act, W(p + "fc2.weight"), B(p + "fc2.bias"), y, n, h_, f);
  }
  // dx (overwritten) from dy; weight gradients accumulate.
  void ffn_backward(const std::string& p, i64 n, i64 f, std::span<const T> x, std::span<const T> fc1, std::span<const T> act,
                    std::span<const T> dy, std::span<T> dx) {
    const i64 f1 = swiglu() ? 2 * f : f;
    Vec<T> dact = zeros<T>(n * f), dfc1 = zeros<T>(n * f1);
    linear_backward_weight<T>(act, dy, G(p + "fc2.weight"), GB(p + "fc2.bias"), n, h_, f);
    linear_backward_input<T>(dy, W(p + "fc2.weight"), dact, n, h_, f);
    if (swiglu())
      swiglu_backward<T>(dact, fc1, dfc1, n, f);
    else
      gelu_backward<T>(dact, fc1, dfc1);
    linear_backward_weight<T>(x, dfc1, G(p + "fc1.weight"), GB(p + "fc1.bias"), n, f1, h_);
    linear_backward_input<T>(dfc1, W(p + "fc1.weight"), dx, n, f1, h_);
  }

  AttentionShape attention_shape() const { return {mb_.b, a_, g_, d_, mb_.s, mb_.s, 0, 0}; }
  template <class U>
  QkvView<U> qkv_view(std::span<U> qkv) const {  // Q, K, V columns of packed [Q heads | K groups | V groups] rows
    const auto k = static_cast<std::size_t>(a_ * d_), v = static_cast<std::size_t>((a_ + g_) * d_);
    return {qkv, qkv.subspan(k), qkv.subspan(v), C_, C_, C_};
  }

  // Advances x_ through layer l; returns the layer's aux loss.
  double layer_forward(int l, LayerActs<T>& L) {
    const std::string p = fmt::format("layers.{}.", l);
    L.x_in = x_;
    L.ln1 = zeros<T>(N_ * h_);
    norm_forward(p + "norm1", L.x_in, L.ln1);
    L.qkv = zeros<T>(N_ * C_);
    linear_forward<T>(L.ln1, W(p + "qkv.weight"), B(p + "qkv.bias"), L.qkv, N_, C_, h_);
    if (!learned()) rope_forward<T>(L.qkv, N_, C_, a_ + g_, d_, positions_, m_.rope_theta);  // Q and K heads are adjacent
    L.attn = zeros<T>(N_ * a_ * d_);
    L.lse = zeros<T>(mb_.b * a_ * mb_.s);
    attention_forward<T>(attention_shape(), qkv_view(std::span<const T>(L.qkv)), L.attn, L.lse, true);
    Vec<T> proj = zeros<T>(N_ * h_);
    linear_forward<T>(L.attn, W(p + "proj.weight"), B(p + "proj.bias"), proj, N_, h_, a_ * d_);
    L.x_mid = zeros<T>(N_ * h_);
    L.mask_attn.resize(L.x_mid.size());
    dropout_add_forward<T>(proj, L.x_in, L.x_mid, L.mask_attn, keys(l, DropoutSite::Attention), h_, p_, o_.dropout_seed);

    L.ln2 = zeros<T>(N_ * h_);
    norm_forward(p + "norm2", L.x_mid, L.ln2);
    Vec<T> mlp = zeros<T>(N_ * h_);
    double aux = 0;
    if (!is_moe_layer(m_, l)) {
      const i64 f = m_.ffn_hidden_size;
      L.fc1 = zeros<T>(N_ * (swiglu() ? 2 * f : f));
      L.act = zeros<T>(N_ * f);
      ffn_forward(p, N_, f, L.ln2, L.fc1, L.act, mlp);
    } else {
      const MoeShape s = moe_shape();
      const i64 E = s.experts, cap = s.capacity, f = m_.moe->ffn_hidden_size, f1 = swiglu() ? 2 * f : f;
      Vec<T> router_logits = zeros<T>(N_ * E);
      linear_forward<T>(L.ln2, W(p + "router.weight"), none(), router_logits, N_, E, h_);
      L.probs = zeros<T>(N_ * E), L.gate = zeros<T>(N_ * s.topk);
      L.expert.assign(static_cast<std::size_t>(N_ * s.topk), 0), L.slot.assign(L.expert.size(), 0);
      aux = static_cast<double>(router_forward<T>(router_logits, L.probs, L.expert, L.slot, L.gate, s, o_.moe_renormalize,
                                                  static_cast<T>(o_.moe_aux_coeff)));
      L.dispatched = zeros<T>(E * cap * h_), L.expert_out = zeros<T>(E * cap * h_);
      L.fc1 = zeros<T>(E * cap * f1), L.act = zeros<T>(E * cap * f);
      permute_forward<T>(L.ln2, L.expert, L.slot, L.dispatched, s, h_);
      // Empty slots are zero rows: they pass through the experts but unpermute never reads them.
      for (i64 e = 0; e < E; ++e) {
        auto mine = [&](Vec<T>& v, i64 cols) { return rows_of(v, e * cap, cap, cols); };  // expert e's slots
        ffn_forward(fmt::format("{}experts.{}.", p, e), cap, f, mine(L.dispatched, h_), mine(L.fc1, f1), mine(L.act, f),
                    mine(L.expert_out, h_));
      }
      unpermute_forward<T>(L.expert_out, L.expert, L.slot, L.gate, mlp, s, h_);
    }
    L.mask_mlp.resize(x_.size());
    dropout_add_forward<T>(mlp, L.x_mid, x_, L.mask_mlp, keys(l, DropoutSite::Mlp), h_, p_, o_.dropout_seed);
    return aux;
  }

  // dx: in, d loss / d (layer output); out, d loss / d (layer input).
  void layer_backward(int l, const LayerActs<T>& L, Vec<T>& dx) {
    const std::string p = fmt::format("layers.{}.", l);
    Vec<T> dmlp = zeros<T>(N_ * h_), dln2 = zeros<T>(N_ * h_);
    dropout_backward<T>(dx, L.mask_mlp, dmlp, p_);
    if (!is_moe_layer(m_, l)) {
      ffn_backward(p, N_, m_.ffn_hidden_size, L.ln2, L.fc1, L.act, dmlp, dln2);
    } else {
      const MoeShape s = moe_shape();
      const i64 E = s.experts, cap = s.capacity, f = m_.moe->ffn_hidden_size, f1 = swiglu() ? 2 * f : f;
      Vec<T> dexpert_out = zeros<T>(E * cap * h_), ddispatched = zeros<T>(E * cap * h_), dgate = zeros<T>(N_ * s.topk);
      unpermute_backward<T>(dmlp, L.expert_out, L.expert, L.slot, L.gate, dexpert_out, dgate, s, h_);
      for (i64 e = 0; e < E; ++e) {
        auto mine = [&](const Vec<T>& v, i64 cols) { return rows_of(v, e * cap, cap, cols); };
        ffn_backward(fmt::format("{}experts.{}.", p, e), cap, f, mine(L.dispatched, h_), mine(L.fc1, f1), mine(L.act, f),
                     mine(dexpert_out, h_), rows_of(ddispatched, e * cap, cap, h_));
      }
      permute_backward<T>(ddispatched, L.expert, L.slot, dln2, s, h_);
      // The aux loss enters the objective with weight 1, so its gradient scales like the LM loss's.
      Vec<T> drouter = zeros<T>(N_ * E);
      router_backward<T>(dgate, L.probs, L.expert, drouter, s, o_.moe_renormalize,
                         static_cast<T>(o_.moe_aux_coeff * o_.loss_scale));
      linear_backward_weight<T>(L.ln2, drouter, G(p + "router.weight"), {}, N_, E, h_);
      linear_backward_input<T>(drouter, W(p + "router.weight"), dln2, N_, E, h_, true);
    }
    norm_backward(p + "norm2", dln2, L.x_mid, dx);  // dx now d loss / d x_mid

    Vec<T> dproj = zeros<T>(N_ * h_), dattn = zeros<T>(N_ * a_ * d_), dqkv = zeros<T>(N_ * C_), dln1 = zeros<T>(N_ * h_);
    dropout_backward<T>(dx, L.mask_attn, dproj, p_);
    linear_backward_weight<T>(L.attn, dproj, G(p + "proj.weight"), GB(p + "proj.bias"), N_, h_, a_ * d_);
    linear_backward_input<T>(dproj, W(p + "proj.weight"), dattn, N_, h_, a_ * d_);
    attention_backward<T>(attention_shape(), qkv_view(std::span<const T>(L.qkv)), L.attn, L.lse, dattn,
                          qkv_view(std::span<T>(dqkv)));
    if (!learned()) rope_backward<T>(dqkv, N_, C_, a_ + g_, d_, positions_, m_.rope_theta);
    linear_backward_weight<T>(L.ln1, dqkv, G(p + "qkv.weight"), GB(p + "qkv.bias"), N_, C_, h_);
    linear_backward_input<T>(dqkv, W(p + "qkv.weight"), dln1, N_, C_, h_);
    norm_backward(p + "norm1", dln1, L.x_in, dx);  // dx now d loss / d x_in
  }

  MoeShape moe_shape() const { return {N_, m_.moe->num_experts, m_.moe->top_k, moe_capacity(m_, N_)}; }

  const ModelSpec& m_;
  const MicroBatch& mb_;
  const ReferenceOptions& o_;
  const ParamMap<T>& params_;
  ParamMap<T>* grads_ = nullptr;
  const i64 V_, h_, a_, g_, d_, C_, N_;  // padded vocab, hidden, heads, groups, head dim, qkv width, tokens
  const double p_;                        // hidden dropout
  const T eps_;
  Vec<std::int32_t> positions_;
  Vec<T> x_, lnf_, logits_, row_max_, sum_exp_;
  Vec<std::uint8_t> mask_emb_;
  Vec<LayerActs<T>> layers_;
};

}  // namespace

template <class T>
ReferenceLoss forward_backward(const ModelSpec& model, int padded_vocab, const ParamMap<T>& params, ParamMap<T>& grads,
                               const MicroBatch& batch, const ReferenceOptions& opts) {
  Reference<T> ref(model, padded_vocab, params, batch, opts);
  const ReferenceLoss loss = ref.forward();
  ref.backward(grads);
  return loss;
}

template <class T>
ReferenceLoss forward_loss(const ModelSpec& model, int padded_vocab, const ParamMap<T>& params, const MicroBatch& batch,
                           const ReferenceOptions& opts) {
  return Reference<T>(model, padded_vocab, params, batch, opts).forward();
}

#define PX_INSTANTIATE(T)                                                                                               \
  template ParamMap<T> init_parameters<T>(const ModelSpec&, int, std::uint64_t);                                       \
  template ParamMap<T> zero_like<T>(const ParamMap<T>&);                                                               \
  template ReferenceLoss forward_backward<T>(const ModelSpec&, int, const ParamMap<T>&, ParamMap<T>&, const MicroBatch&, \
                                             const ReferenceOptions&);                                                 \
  template ReferenceLoss forward_loss<T>(const ModelSpec&, int, const ParamMap<T>&, const MicroBatch&, const ReferenceOptions&);
PX_INSTANTIATE(float)
PX_INSTANTIATE(double)
#undef PX_INSTANTIATE

}  // namespace px::cpu
