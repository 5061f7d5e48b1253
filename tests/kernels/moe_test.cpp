// MoE routing and permutation kernels: routing against hand-worked cases (top-k, ties, capacity
// drops in token order, renormalised gates), the load-balancing loss against its formula and
// closed forms, a dispatch/combine round trip, every backward against central differences in
// double, and the float instantiation against double.
#include "engine/backends/cpu/moe.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "tests/kernels/gradcheck.hpp"

namespace px::cpu {
namespace {

using px::test::all_near;
using px::test::numeric_grad;
using px::test::random_vector;

template <typename T>
struct Routed {
  std::vector<T> probs, gate;
  std::vector<std::int32_t> expert, slot;
  T aux = 0;
};

template <typename T>
Routed<T> route(const std::vector<T>& logits, const MoeShape& s, bool renormalize, T aux_coeff = 0) {
  Routed<T> r{std::vector<T>(s.tokens * s.experts), std::vector<T>(s.tokens * s.topk),
              std::vector<std::int32_t>(s.tokens * s.topk), std::vector<std::int32_t>(s.tokens * s.topk)};
  r.aux = router_forward<T>(logits, r.probs, r.expert, r.slot, r.gate, s, renormalize, aux_coeff);
  return r;
}

// Logits whose sorted values per token are at least 0.2 apart, so no probe step of 1e-6 changes
// the top-k choice or its order.
std::vector<double> separated_logits(const MoeShape& s, std::uint64_t seed) {
  const std::vector<double> noise = random_vector(s.tokens * s.experts, seed, -0.2, 0.2);
  std::mt19937_64 rng(seed);
  std::vector<double> logits(noise.size());
  std::vector<int> rank(s.experts);
  for (std::int64_t t = 0; t < s.tokens; ++t) {
    std::iota(rank.begin(), rank.end(), 0);
    std::shuffle(rank.begin(), rank.end(), rng);
    for (std::int64_t e = 0; e < s.experts; ++e)
      logits[t * s.experts + e] = 0.6 * rank[e] + noise[t * s.experts + e];
  }
  return logits;
}

std::int64_t dropped(const std::vector<std::int32_t>& expert) { return std::count(expert.begin(), expert.end(), -1); }

std::vector<double> log_of(std::vector<double> p) {
  for (double& x : p) x = std::log(x);
  return p;
}

TEST(MoeRouter, TopKAndRenormalisedGates) {
  const MoeShape s{.tokens = 2, .experts = 4, .topk = 2, .capacity = 2};
  const std::vector<double> logits = log_of({0.1, 0.4, 0.2, 0.3, 0.5, 0.1, 0.1, 0.3});
  for (const bool renormalize : {false, true}) {
    const Routed<double> r = route(logits, s, renormalize);
    EXPECT_TRUE(all_near(r.probs, {0.1, 0.4, 0.2, 0.3, 0.5, 0.1, 0.1, 0.3}, 1e-12));
    EXPECT_EQ(r.expert, (std::vector<std::int32_t>{1, 3, 0, 3}));
    EXPECT_EQ(r.slot, (std::vector<std::int32_t>{0, 0, 0, 1}));
    const std::vector<double> gate =
        renormalize ? std::vector<double>{0.4 / 0.7, 0.3 / 0.7, 0.5 / 0.8, 0.3 / 0.8} : std::vector<double>{0.4, 0.3, 0.5, 0.3};
    EXPECT_TRUE(all_near(r.gate, gate, 1e-12));
  }
}

TEST(MoeRouter, TiesGoToTheLowerExpert) {
  const MoeShape s{.tokens = 3, .experts = 4, .topk = 2, .capacity = 3};
  const Routed<double> r = route<double>({0, 0, 0, 0, 1, 2, 2, 0, 2, 1, 2, 2}, s, false);
  EXPECT_EQ(r.expert, (std::vector<std::int32_t>{0, 1, 1, 2, 0, 2}));
  EXPECT_TRUE(all_near(r.gate, {0.25, 0.25, r.probs[5], r.probs[6], r.probs[8], r.probs[10]}, 1e-15));
}

TEST(MoeRouter, CapacityDropsInTokenOrder) {
  {  // Switch, k = 1: the third token to want expert 0 finds it full.
    const MoeShape s{.tokens = 4, .experts = 2, .topk = 1, .capacity = 2};
    const Routed<double> r = route<double>({1, 0, 2, 0, 3, 0, 0, 1}, s, false);
    EXPECT_EQ(r.expert, (std::vector<std::int32_t>{0, 0, -1, 1}));
    EXPECT_EQ(r.slot, (std::vector<std::int32_t>{0, 1, -1, 0}));
    EXPECT_TRUE(all_near(r.gate, {r.probs[0], r.probs[2], 0, r.probs[7]}, 1e-15));
  }
  {  // k = 2, capacity 1: token 1 loses both choices to token 0, token 2 its second.
    const MoeShape s{.tokens = 3, .experts = 3, .topk = 2, .capacity = 1};
    const Routed<double> r = route(log_of({0.5, 0.3, 0.2, 0.3, 0.6, 0.1, 0.3, 0.1, 0.6}), s, true);
    EXPECT_EQ(r.expert, (std::vector<std::int32_t>{0, 1, -1, -1, 2, -1}));
    EXPECT_EQ(r.slot, (std::vector<std::int32_t>{0, 0, -1, -1, 0, -1}));
    // A kept gate stays normalised over all k chosen, the dropped one included (Megatron).
    EXPECT_TRUE(all_near(r.gate, {0.5 / 0.8, 0.3 / 0.8, 0, 0, 0.6 / 0.9, 0}, 1e-12));
  }
}

TEST(MoeAuxLoss, MatchesTheFormula) {
  const MoeShape s{.tokens = 7, .experts = 5, .topk = 2, .capacity = 2};
  const double coeff = 0.01;
  const std::vector<double> logits = random_vector(s.tokens * s.experts, 11, -2, 2);
  const Routed<double> r = route(logits, s, true, coeff);
  ASSERT_GT(dropped(r.expert), 0);  // so counting after capacity would give another value
  // coeff * E * sum_e f_e P_e, f_e from an independent top-k before capacity.
  std::vector<double> f(s.experts, 0), P(s.experts, 0);
  for (std::int64_t t = 0; t < s.tokens; ++t) {
    std::vector<int> order(s.experts);
    std::iota(order.begin(), order.end(), 0);
    const double* p = r.probs.data() + t * s.experts;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    for (std::int64_t j = 0; j < s.topk; ++j) f[order[j]] += 1.0 / static_cast<double>(s.tokens * s.topk);
    for (std::int64_t e = 0; e < s.experts; ++e) P[e] += p[e] / static_cast<double>(s.tokens);
  }
  EXPECT_NEAR(r.aux, coeff * static_cast<double>(s.experts) * px::test::dot(f, P), 1e-15);
}

TEST(MoeAuxLoss, ClosedForms) {
  const double coeff = 0.02;
  // Uniform probabilities: sum_e f_e / E = 1 / E whatever the (tie-broken) assignment.
  EXPECT_NEAR(route(std::vector<double>(8 * 4, 0.0), {.tokens = 8, .experts = 4, .topk = 2, .capacity = 8}, false, coeff).aux,
              coeff, 1e-15);
  // Balanced routing: token t's logits are token 0's rotated by t, so every expert is picked once
  // and has mean probability 1 / E.
  const MoeShape s{.tokens = 4, .experts = 4, .topk = 1, .capacity = 1};
  const std::vector<double> row = {0.3, -1.2, 2.0, 0.7};
  std::vector<double> logits;
  for (std::int64_t t = 0; t < s.tokens; ++t)
    for (std::int64_t e = 0; e < s.experts; ++e) logits.push_back(row[(e + t) % s.experts]);
  const Routed<double> r = route(logits, s, false, coeff);
  EXPECT_EQ(dropped(r.expert), 0);
  EXPECT_NEAR(r.aux, coeff, 1e-15);
  // Collapse onto one expert approaches the maximum, coeff * E.
  EXPECT_NEAR(route<double>({40, 0, 0, 40, 0, 0}, {.tokens = 2, .experts = 3, .topk = 1, .capacity = 2}, false, coeff).aux,
              coeff * 3, 1e-15);
}

TEST(MoePermute, IdentityExpertRoundTrip) {
  // Tokens want experts 0, 0, 0, 1, 1: token 2 is dropped and expert 2's slots stay empty.
  const MoeShape s{.tokens = 5, .experts = 3, .topk = 1, .capacity = 2};
  const std::int64_t h = 4;
  const Routed<double> r = route<double>({1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0}, s, false);
  ASSERT_EQ(r.expert, (std::vector<std::int32_t>{0, 0, -1, 1, 1}));
  const std::vector<double> x = random_vector(s.tokens * h, 4);
  std::vector<double> dispatched(s.experts * s.capacity * h, 7.0), y(x.size(), 7.0);
  permute_forward<double>(x, r.expert, r.slot, dispatched, s, h);
  std::vector<double> expect(dispatched.size(), 0);
  for (const auto& [t, row] : {std::pair{0, 0}, {1, 1}, {3, 2}, {4, 3}})
    std::copy_n(x.begin() + t * h, h, expect.begin() + row * h);
  EXPECT_TRUE(all_near(dispatched, expect, 0));

  unpermute_forward<double>(dispatched, r.expert, r.slot, std::vector<double>(s.tokens, 1.0), y, s, h);
  expect = x;
  std::fill_n(expect.begin() + 2 * h, h, 0.0);
  EXPECT_TRUE(all_near(y, expect, 0));
}

TEST(MoeRouter, BackwardMatchesFiniteDifferences) {
  struct Case {
    std::int64_t topk, capacity;
    bool renormalize;
  };
  for (const Case c : {Case{1, 1, false}, Case{2, 2, false}, Case{2, 2, true}}) {
    SCOPED_TRACE(::testing::Message() << "topk " << c.topk << " renormalize " << c.renormalize);
    const MoeShape s{.tokens = 6, .experts = 4, .topk = c.topk, .capacity = c.capacity};
    const double coeff = 0.3;
    std::vector<double> logits = separated_logits(s, 5);
    const std::vector<double> w = random_vector(s.tokens * s.topk, 6);
    const Routed<double> r = route(logits, s, c.renormalize, coeff);
    ASSERT_GT(dropped(r.expert), 0);
    std::vector<double> d_logits(logits.size(), 7.0);
    router_backward<double>(w, r.probs, r.expert, d_logits, s, c.renormalize, coeff);
    const auto loss = [&] {
      const Routed<double> q = route(logits, s, c.renormalize, coeff);
      return px::test::dot(w, q.gate) + q.aux;
    };
    EXPECT_TRUE(all_near(d_logits, numeric_grad(logits, loss), 1e-7));
  }
}

TEST(MoePermute, BackwardMatchesFiniteDifferences) {
  const MoeShape s{.tokens = 5, .experts = 3, .topk = 2, .capacity = 2};
  const std::int64_t h = 3;
  const Routed<double> r = route(separated_logits(s, 7), s, true);
  ASSERT_GT(dropped(r.expert), 0);
  std::vector<double> x = random_vector(s.tokens * h, 8);
  const std::vector<double> w = random_vector(s.experts * s.capacity * h, 9);
  std::vector<double> d_x(x.size(), 7.0), dispatched(w.size());
  permute_backward<double>(w, r.expert, r.slot, d_x, s, h);
  const auto loss = [&] {
    permute_forward<double>(x, r.expert, r.slot, dispatched, s, h);
    return px::test::dot(w, dispatched);
  };
  EXPECT_TRUE(all_near(d_x, numeric_grad(x, loss), 1e-8));
}

TEST(MoeUnpermute, BackwardMatchesFiniteDifferences) {
  const MoeShape s{.tokens = 5, .experts = 3, .topk = 2, .capacity = 2};
  const std::int64_t h = 3;
  Routed<double> r = route(separated_logits(s, 10), s, true);
  ASSERT_GT(dropped(r.expert), 0);
  std::vector<double> out = random_vector(s.experts * s.capacity * h, 11);
  const std::vector<double> w = random_vector(s.tokens * h, 12);
  std::vector<double> d_out(out.size(), 7.0), d_gate(r.gate.size(), 7.0), y(w.size());
  unpermute_backward<double>(w, out, r.expert, r.slot, r.gate, d_out, d_gate, s, h);
  const auto loss = [&] {
    unpermute_forward<double>(out, r.expert, r.slot, r.gate, y, s, h);
    return px::test::dot(w, y);
  };
  EXPECT_TRUE(all_near(d_out, numeric_grad(out, loss), 1e-8));
  EXPECT_TRUE(all_near(d_gate, numeric_grad(r.gate, loss), 1e-8));
}

// The whole layer's routing path in T: forward outputs and every backward output, concatenated.
template <typename T>
std::vector<double> pipeline(const std::vector<double>& logits64, const std::vector<double>& x64,
                             const std::vector<double>& dy64, const MoeShape& s, std::int64_t h,
                             std::vector<std::int32_t>& expert) {
  const auto cast = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
  const std::vector<T> x = cast(x64), dy = cast(dy64);
  Routed<T> r = route(cast(logits64), s, true, T(0.1));
  expert = r.expert;
  std::vector<T> dispatched(s.experts * s.capacity * h), y(x.size()), d_out(dispatched.size()), d_gate(r.gate.size()),
      d_logits(r.probs.size()), d_x(x.size());
  permute_forward<T>(x, r.expert, r.slot, dispatched, s, h);
  unpermute_forward<T>(dispatched, r.expert, r.slot, r.gate, y, s, h);
  unpermute_backward<T>(dy, dispatched, r.expert, r.slot, r.gate, d_out, d_gate, s, h);
  permute_backward<T>(d_out, r.expert, r.slot, d_x, s, h);
  router_backward<T>(d_gate, r.probs, r.expert, d_logits, s, true, T(0.1));
  std::vector<double> all{static_cast<double>(r.aux)};
  for (const std::vector<T>* v : {&r.probs, &r.gate, &dispatched, &y, &d_out, &d_gate, &d_logits, &d_x})
    all.insert(all.end(), v->begin(), v->end());
  return all;
}

TEST(MoeFloat, MatchesDouble) {
  const MoeShape s{.tokens = 8, .experts = 4, .topk = 2, .capacity = 3};
  const std::int64_t h = 6;
  const std::vector<double> logits = separated_logits(s, 13), x = random_vector(s.tokens * h, 14),
                            dy = random_vector(s.tokens * h, 15);
  std::vector<std::int32_t> expert32, expert64;
  const std::vector<double> f = pipeline<float>(logits, x, dy, s, h, expert32);
  const std::vector<double> d = pipeline<double>(logits, x, dy, s, h, expert64);
  EXPECT_EQ(expert32, expert64);
  EXPECT_GT(dropped(expert64), 0);
  EXPECT_TRUE(all_near(f, d, 1e-5));
}

}  // namespace
}  // namespace px::cpu
