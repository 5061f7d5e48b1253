// MoE routing (softmax, top-k, capacity, load-balancing loss) and token permutation, forward and
// backward; see moe.hpp for the layouts.
#include "engine/backends/cpu/moe.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <vector>

namespace px::cpu {

namespace {

// The k largest of p[0..E) in descending order, ties to the lower index. A selection pass per rank
// (O(kE)) keeps the order exact and deterministic, which router_backward relies on to recompute it.
template <typename T>
void topk_row(const T* p, std::int64_t E, std::int64_t k, std::int32_t* out) {
  for (std::int64_t r = 0; r < k; ++r) {
    std::int64_t best = -1;
    for (std::int64_t e = 0; e < E; ++e) {
      if (std::find(out, out + r, static_cast<std::int32_t>(e)) != out + r) continue;
      if (best < 0 || p[e] > p[best]) best = e;
    }
    out[r] = static_cast<std::int32_t>(best);
  }
}

// Megatron-Core switch_load_balancing_loss_func (megatron/core/transformer/moe/moe_utils.py),
// after Switch Transformer eq. 4 (arXiv:2101.03961):
//   aux = coeff * E * sum_e f_e * P_e,  f_e = count_e / (T k),  P_e = sum_t probs[t, e] / T
//       = coeff * E / (k T^2) * sum_e count_e * sum_t probs[t, e],
// with count_e the assignments to e before capacity dropping (Megatron's routing map for the aux
// loss) and T the tokens of this call (Megatron's micro-batch level). Uniform probs give exactly
// coeff, since sum_e f_e = 1. The factor returned is also d aux / d probs[t, e] / count_e.
template <typename T>
T aux_scale(const MoeShape& s, T aux_coeff) {
  const T n = static_cast<T>(s.tokens);
  return aux_coeff * static_cast<T>(s.experts) / (static_cast<T>(s.topk) * n * n);
}

[[maybe_unused]] bool valid_routing(std::span<const std::int32_t> expert, std::span<const std::int32_t> slot,
                                    const MoeShape& s) {
  if (static_cast<std::int64_t>(expert.size()) != s.tokens * s.topk || slot.size() != expert.size()) return false;
  for (std::size_t i = 0; i < expert.size(); ++i) {
    const bool dropped = expert[i] < 0 && slot[i] < 0;
    const bool kept = expert[i] >= 0 && expert[i] < s.experts && slot[i] >= 0 && slot[i] < s.capacity;
    if (!dropped && !kept) return false;
  }
  return true;
}

// Dispatch row of assignment i, or -1 when it was dropped.
std::int64_t row_of(std::span<const std::int32_t> expert, std::span<const std::int32_t> slot, std::int64_t i,
                    const MoeShape& s) {
  return expert[i] < 0 ? -1 : static_cast<std::int64_t>(expert[i]) * s.capacity + slot[i];
}

}  // namespace

template <typename T>
T router_forward(std::span<const T> logits, std::span<T> probs, std::span<std::int32_t> expert,
                 std::span<std::int32_t> slot, std::span<T> gate, const MoeShape& s, bool renormalize, T aux_coeff) {
  const std::int64_t E = s.experts, k = s.topk;
  assert(s.tokens > 0 && k >= 1 && k <= E && s.capacity >= 0);
  assert(static_cast<std::int64_t>(logits.size()) == s.tokens * E && probs.size() == logits.size());
  assert(static_cast<std::int64_t>(expert.size()) == s.tokens * k && slot.size() == expert.size() &&
         gate.size() == expert.size());
  std::vector<std::int64_t> fill(E, 0), count(E, 0);
  std::vector<T> prob_sum(E, 0);
  for (std::int64_t t = 0; t < s.tokens; ++t) {
    const T* l = logits.data() + t * E;
    T* p = probs.data() + t * E;
    const T mx = *std::max_element(l, l + E);
    T sum = 0;
    for (std::int64_t e = 0; e < E; ++e) {
      p[e] = std::exp(l[e] - mx);
      sum += p[e];
    }
    for (std::int64_t e = 0; e < E; ++e) {
      p[e] /= sum;
      prob_sum[e] += p[e];
    }

    std::int32_t* ex = expert.data() + t * k;
    topk_row(p, E, k, ex);
    T S = 0;  // over all k chosen: capacity drops come after the renormalisation, as in Megatron
    for (std::int64_t r = 0; r < k; ++r) S += p[ex[r]];
    for (std::int64_t r = 0; r < k; ++r) {
      const std::int32_t e = ex[r];
      ++count[e];
      const bool kept = fill[e] < s.capacity;
      slot[t * k + r] = kept ? static_cast<std::int32_t>(fill[e]++) : -1;
      gate[t * k + r] = kept ? (renormalize ? p[e] / S : p[e]) : T(0);
      if (!kept) ex[r] = -1;
    }
  }
  T aux = 0;
  for (std::int64_t e = 0; e < E; ++e) aux += static_cast<T>(count[e]) * prob_sum[e];
  return aux * aux_scale(s, aux_coeff);
}

template <typename T>
void router_backward(std::span<const T> d_gate, std::span<const T> probs, std::span<const std::int32_t> expert,
                     std::span<T> d_logits, const MoeShape& s, bool renormalize, T aux_coeff) {
  const std::int64_t E = s.experts, k = s.topk;
  assert(s.tokens > 0 && k >= 1 && k <= E);
  assert(static_cast<std::int64_t>(probs.size()) == s.tokens * E && d_logits.size() == probs.size());
  assert(static_cast<std::int64_t>(d_gate.size()) == s.tokens * k && expert.size() == d_gate.size());
  // The aux gradient needs every token's pre-capacity choice before any row is done.
  std::vector<std::int32_t> chosen(s.tokens * k);
  std::vector<std::int64_t> count(E, 0);
  for (std::int64_t t = 0; t < s.tokens; ++t) {
    topk_row(probs.data() + t * E, E, k, chosen.data() + t * k);
    for (std::int64_t r = 0; r < k; ++r) ++count[chosen[t * k + r]];
  }
  const T scale = aux_scale(s, aux_coeff);
  std::vector<T> g(E);  // d loss / d probs of one token
  for (std::int64_t t = 0; t < s.tokens; ++t) {
    const T* p = probs.data() + t * E;
    const std::int32_t* c = chosen.data() + t * k;
    const T* dg = d_gate.data() + t * k;
    for (std::int64_t e = 0; e < E; ++e) g[e] = scale * static_cast<T>(count[e]);
    for (std::int64_t r = 0; r < k; ++r) assert(expert[t * k + r] < 0 || expert[t * k + r] == c[r]);
    auto kept_d = [&](std::int64_t r) { return expert[t * k + r] < 0 ? T(0) : dg[r]; };
    if (renormalize) {
      // gate_r = p_{c_r} / S with S summed over all k chosen, dropped ones included, so a dropped
      // choice still gets gradient through S.
      T S = 0, dot = 0;
      for (std::int64_t r = 0; r < k; ++r) S += p[c[r]];
      for (std::int64_t r = 0; r < k; ++r) dot += kept_d(r) * p[c[r]] / S;
      for (std::int64_t r = 0; r < k; ++r) g[c[r]] += (kept_d(r) - dot) / S;
    } else {
      for (std::int64_t r = 0; r < k; ++r) g[c[r]] += kept_d(r);
    }
    T pg = 0;
    for (std::int64_t e = 0; e < E; ++e) pg += p[e] * g[e];
    for (std::int64_t e = 0; e < E; ++e) d_logits[t * E + e] = p[e] * (g[e] - pg);
  }
}

template <typename T>
void permute_forward(std::span<const T> x, std::span<const std::int32_t> expert, std::span<const std::int32_t> slot,
                     std::span<T> dispatched, const MoeShape& s, std::int64_t hidden) {
  assert(valid_routing(expert, slot, s));
  assert(static_cast<std::int64_t>(x.size()) == s.tokens * hidden);
  assert(static_cast<std::int64_t>(dispatched.size()) == s.experts * s.capacity * hidden);
  std::fill(dispatched.begin(), dispatched.end(), T(0));
  for (std::int64_t i = 0; i < s.tokens * s.topk; ++i) {
    const std::int64_t row = row_of(expert, slot, i, s);
    if (row < 0) continue;
    const T* src = x.data() + (i / s.topk) * hidden;
    std::copy(src, src + hidden, dispatched.data() + row * hidden);
  }
}

template <typename T>
void permute_backward(std::span<const T> d_dispatched, std::span<const std::int32_t> expert,
                      std::span<const std::int32_t> slot, std::span<T> d_x, const MoeShape& s, std::int64_t hidden) {
  assert(valid_routing(expert, slot, s));
  assert(static_cast<std::int64_t>(d_x.size()) == s.tokens * hidden);
  assert(static_cast<std::int64_t>(d_dispatched.size()) == s.experts * s.capacity * hidden);
  std::fill(d_x.begin(), d_x.end(), T(0));
  for (std::int64_t i = 0; i < s.tokens * s.topk; ++i) {
    const std::int64_t row = row_of(expert, slot, i, s);
    if (row < 0) continue;
    const T* src = d_dispatched.data() + row * hidden;
    T* dst = d_x.data() + (i / s.topk) * hidden;
    for (std::int64_t j = 0; j < hidden; ++j) dst[j] += src[j];
  }
}

template <typename T>
void unpermute_forward(std::span<const T> expert_out, std::span<const std::int32_t> expert,
                       std::span<const std::int32_t> slot, std::span<const T> gate, std::span<T> y, const MoeShape& s,
                       std::int64_t hidden) {
  assert(valid_routing(expert, slot, s));
  assert(gate.size() == expert.size());
  assert(static_cast<std::int64_t>(y.size()) == s.tokens * hidden);
  assert(static_cast<std::int64_t>(expert_out.size()) == s.experts * s.capacity * hidden);
  std::fill(y.begin(), y.end(), T(0));
  for (std::int64_t i = 0; i < s.tokens * s.topk; ++i) {
    const std::int64_t row = row_of(expert, slot, i, s);
    if (row < 0) continue;
    const T* src = expert_out.data() + row * hidden;
    T* dst = y.data() + (i / s.topk) * hidden;
    for (std::int64_t j = 0; j < hidden; ++j) dst[j] += gate[i] * src[j];
  }
}

template <typename T>
void unpermute_backward(std::span<const T> dy, std::span<const T> expert_out, std::span<const std::int32_t> expert,
                        std::span<const std::int32_t> slot, std::span<const T> gate, std::span<T> d_expert_out,
                        std::span<T> d_gate, const MoeShape& s, std::int64_t hidden) {
  assert(valid_routing(expert, slot, s));
  assert(gate.size() == expert.size() && d_gate.size() == expert.size());
  assert(static_cast<std::int64_t>(dy.size()) == s.tokens * hidden);
  assert(static_cast<std::int64_t>(expert_out.size()) == s.experts * s.capacity * hidden &&
         d_expert_out.size() == expert_out.size());
  std::fill(d_expert_out.begin(), d_expert_out.end(), T(0));
  for (std::int64_t i = 0; i < s.tokens * s.topk; ++i) {
    const std::int64_t row = row_of(expert, slot, i, s);
    d_gate[i] = 0;
    if (row < 0) continue;
    const T* d = dy.data() + (i / s.topk) * hidden;
    const T* out = expert_out.data() + row * hidden;
    T* d_out = d_expert_out.data() + row * hidden;
    for (std::int64_t j = 0; j < hidden; ++j) {
      d_out[j] = gate[i] * d[j];
      d_gate[i] += d[j] * out[j];
    }
  }
}

#define PX_INSTANTIATE_MOE(T)                                                                                          \
  template T router_forward<T>(std::span<const T>, std::span<T>, std::span<std::int32_t>, std::span<std::int32_t>,     \
                               std::span<T>, const MoeShape&, bool, T);                                                \
  template void router_backward<T>(std::span<const T>, std::span<const T>, std::span<const std::int32_t>,              \
                                   std::span<T>, const MoeShape&, bool, T);                                            \
  template void permute_forward<T>(std::span<const T>, std::span<const std::int32_t>, std::span<const std::int32_t>,   \
                                   std::span<T>, const MoeShape&, std::int64_t);                                       \
  template void permute_backward<T>(std::span<const T>, std::span<const std::int32_t>, std::span<const std::int32_t>,  \
                                    std::span<T>, const MoeShape&, std::int64_t);                                      \
  template void unpermute_forward<T>(std::span<const T>, std::span<const std::int32_t>, std::span<const std::int32_t>, \
                                     std::span<const T>, std::span<T>, const MoeShape&, std::int64_t);                 \
  template void unpermute_backward<T>(std::span<const T>, std::span<const T>, std::span<const std::int32_t>,           \
                                      std::span<const std::int32_t>, std::span<const T>, std::span<T>, std::span<T>,   \
                                      const MoeShape&, std::int64_t);

PX_INSTANTIATE_MOE(float)
PX_INSTANTIATE_MOE(double)
#undef PX_INSTANTIATE_MOE

}  // namespace px::cpu
