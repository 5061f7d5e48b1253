// Causal attention kernels: one block against a direct reference (explicit scores, mask, softmax);
// ring (context-parallel) query and key/value blocks, in any order, against one block, forward and
// backward; the backward against central differences; float against double.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include "engine/backends/cpu/attention.hpp"
#include "tests/kernels/gradcheck.hpp"

namespace px {
namespace {

using cpu::AttentionShape;
using cpu::QkvView;

// One micro-batch of packed qkv rows (row s * b + j holds [Q | K | V]).
struct Packed {
  std::int64_t b, heads, groups, d, s;
  std::int64_t ld() const { return (heads + 2 * groups) * d; }
  std::int64_t k_col() const { return heads * d; }
  std::int64_t v_col() const { return (heads + groups) * d; }
  std::size_t qkv_size() const { return s * b * ld(); }
  std::size_t out_size() const { return s * b * heads * d; }
  std::size_t lse_size() const { return b * heads * s; }
};

const Packed kCases[] = {{2, 4, 4, 4, 7}, {2, 4, 2, 4, 7}, {2, 4, 1, 4, 6}};  // MHA, GQA, MQA

template <typename T>
QkvView<T> packed_view(const Packed& p, std::span<T> qkv, std::int64_t s0 = 0) {
  const std::span<T> rows = qkv.subspan(s0 * p.b * p.ld());
  return {rows, rows.subspan(p.k_col()), rows.subspan(p.v_col()), p.ld(), p.ld(), p.ld()};
}

template <typename T>
void one_block_forward(const Packed& p, const std::vector<T>& qkv, std::vector<T>& out, std::vector<T>& lse) {
  out.assign(p.out_size(), T(0));
  lse.assign(p.lse_size(), T(0));
  cpu::attention_forward<T>({p.b, p.heads, p.groups, p.d, p.s, p.s}, packed_view(p, std::span<const T>(qkv)), out, lse,
                            true);
}

template <typename T>
std::vector<T> one_block_backward(const Packed& p, const std::vector<T>& qkv, const std::vector<T>& out,
                                  const std::vector<T>& lse, const std::vector<T>& dout) {
  std::vector<T> dqkv(p.qkv_size(), T(0));
  cpu::attention_backward<T>({p.b, p.heads, p.groups, p.d, p.s, p.s}, packed_view(p, std::span<const T>(qkv)), out,
                             lse, dout, packed_view(p, std::span<T>(dqkv)));
  return dqkv;
}

// Scores of every key, masked to -inf after the query, softmax, weighted sum of values.
void naive_attention(const Packed& p, const std::vector<double>& qkv, std::vector<double>& out,
                     std::vector<double>& lse) {
  out.assign(p.out_size(), 0.0);
  lse.assign(p.lse_size(), 0.0);
  const std::int64_t ld = p.ld(), hd = p.heads * p.d;
  std::vector<double> score(p.s);
  for (std::int64_t j = 0; j < p.b; ++j)
    for (std::int64_t h = 0; h < p.heads; ++h) {
      const std::int64_t g = h / (p.heads / p.groups);
      for (std::int64_t i = 0; i < p.s; ++i) {
        for (std::int64_t t = 0; t < p.s; ++t) {
          double qk = 0;
          for (std::int64_t c = 0; c < p.d; ++c)
            qk += qkv[(i * p.b + j) * ld + h * p.d + c] * qkv[(t * p.b + j) * ld + p.k_col() + g * p.d + c];
          score[t] = t <= i ? qk / std::sqrt(double(p.d)) : -std::numeric_limits<double>::infinity();
        }
        const double m = *std::max_element(score.begin(), score.end());
        double sum = 0;
        for (auto& x : score) {
          x = std::exp(x - m);
          sum += x;
        }
        for (std::int64_t t = 0; t < p.s; ++t)
          for (std::int64_t c = 0; c < p.d; ++c)
            out[(i * p.b + j) * hd + h * p.d + c] +=
                score[t] / sum * qkv[(t * p.b + j) * ld + p.v_col() + g * p.d + c];
        lse[(j * p.heads + h) * p.s + i] = m + std::log(sum);
      }
    }
}

// Causal attention as context-parallel ranks compute it. Rank r holds the queries at positions
// [cuts[r], cuts[r+1]) and sees every rank's key/value block, its own first and then the previous
// ranks' (ring order), or in the reverse order, where a block none of the rank's queries see
// can come first.
// Each block travels as its own [K | V] buffer (rows of 2 * groups * d), with its own [dK | dV].
// Returns out, lse ([b][heads][s]) and dqkv in the one-block layouts.
template <typename T>
void ring_attention(const Packed& p, const std::vector<T>& qkv, const std::vector<T>& dout,
                    const std::vector<std::int64_t>& cuts, bool reverse, std::vector<T>& out, std::vector<T>& lse,
                    std::vector<T>& dqkv) {
  const std::int64_t ranks = std::ssize(cuts) - 1, gd = p.groups * p.d, hd = p.heads * p.d;
  std::vector<std::vector<T>> kv(ranks), dkv(ranks);
  for (std::int64_t r = 0; r < ranks; ++r) {
    for (std::int64_t row = cuts[r] * p.b; row < cuts[r + 1] * p.b; ++row) {
      const auto k = qkv.begin() + row * p.ld() + p.k_col();
      kv[r].insert(kv[r].end(), k, k + 2 * gd);
    }
    dkv[r].assign(kv[r].size(), T(0));
  }
  out.assign(p.out_size(), T(0));
  lse.assign(p.lse_size(), T(0));
  dqkv.assign(p.qkv_size(), T(0));
  for (std::int64_t r = 0; r < ranks; ++r) {
    const std::int64_t sq = cuts[r + 1] - cuts[r];
    const auto rows = std::span<T>(out).subspan(cuts[r] * p.b * hd, sq * p.b * hd);
    const auto dout_rows = std::span<const T>(dout).subspan(cuts[r] * p.b * hd, sq * p.b * hd);
    const QkvView<const T> q = packed_view(p, std::span<const T>(qkv), cuts[r]);
    const QkvView<T> dq = packed_view(p, std::span<T>(dqkv), cuts[r]);
    std::vector<T> rank_lse(p.b * p.heads * sq);
    auto block = [&](std::int64_t step) {
      const std::int64_t kr = reverse ? (r + 1 + step) % ranks : (r - step + ranks) % ranks;
      const std::int64_t sk = cuts[kr + 1] - cuts[kr];
      return std::pair{AttentionShape{p.b, p.heads, p.groups, p.d, sq, sk, cuts[r], cuts[kr]}, kr};
    };
    for (std::int64_t step = 0; step < ranks; ++step) {
      const auto [sh, kr] = block(step);
      const std::span<const T> kvb(kv[kr]);
      cpu::attention_forward<T>(sh, {q.q, kvb, kvb.subspan(gd), q.ldq, 2 * gd, 2 * gd}, rows, rank_lse, step == 0);
    }
    for (std::int64_t step = 0; step < ranks; ++step) {
      const auto [sh, kr] = block(step);
      const std::span<const T> kvb(kv[kr]);
      const std::span<T> dkvb(dkv[kr]);
      cpu::attention_backward<T>(sh, {q.q, kvb, kvb.subspan(gd), q.ldq, 2 * gd, 2 * gd}, rows, rank_lse, dout_rows,
                                 {dq.q, dkvb, dkvb.subspan(gd), dq.ldq, 2 * gd, 2 * gd});
    }
    for (std::int64_t jh = 0; jh < p.b * p.heads; ++jh)
      std::copy_n(rank_lse.begin() + jh * sq, sq, lse.begin() + jh * p.s + cuts[r]);
  }
  for (std::int64_t r = 0; r < ranks; ++r)
    for (std::int64_t row = cuts[r] * p.b; row < cuts[r + 1] * p.b; ++row)
      std::copy_n(dkv[r].begin() + (row - cuts[r] * p.b) * 2 * gd, 2 * gd,
                  dqkv.begin() + row * p.ld() + p.k_col());
}

std::vector<float> to_float(const std::vector<double>& x) { return {x.begin(), x.end()}; }
std::vector<double> to_double(const std::vector<float>& x) { return {x.begin(), x.end()}; }

TEST(Attention, OneBlockMatchesNaiveReference) {
  for (const Packed& p : kCases) {
    SCOPED_TRACE(testing::Message() << "heads " << p.heads << ", groups " << p.groups);
    const auto qkv = test::random_vector(p.qkv_size(), 1, -2.0, 2.0);
    std::vector<double> out, lse, ref_out, ref_lse;
    one_block_forward(p, qkv, out, lse);
    naive_attention(p, qkv, ref_out, ref_lse);
    EXPECT_TRUE(test::all_near(out, ref_out, 1e-13));
    EXPECT_TRUE(test::all_near(lse, ref_lse, 1e-13));
  }
}

TEST(Attention, RingBlocksInAnyOrderMatchOneBlock) {
  for (const Packed& p : kCases)
    for (const std::vector<std::int64_t>& cuts : {std::vector<std::int64_t>{0, 4, p.s}, {0, 2, 5, p.s}})
      for (const bool reverse : {false, true}) {
        SCOPED_TRACE(testing::Message() << "groups " << p.groups << ", " << cuts.size() - 1 << " blocks"
                                        << (reverse ? ", reversed" : ""));
        const auto qkv = test::random_vector(p.qkv_size(), 2, -2.0, 2.0);
        const auto dout = test::random_vector(p.out_size(), 3);
        std::vector<double> out, lse, ring_out, ring_lse, ring_dqkv;
        one_block_forward(p, qkv, out, lse);
        const auto dqkv = one_block_backward(p, qkv, out, lse, dout);
        ring_attention(p, qkv, dout, cuts, reverse, ring_out, ring_lse, ring_dqkv);
        EXPECT_TRUE(test::all_near(ring_out, out, 1e-12));
        EXPECT_TRUE(test::all_near(ring_lse, lse, 1e-12));
        EXPECT_TRUE(test::all_near(ring_dqkv, dqkv, 1e-12));
      }
}

// L = sum(w * out), differentiated in every element of the packed qkv rows at once: q, k and v,
// and in the GQA cases k and v groups that serve several heads.
TEST(Attention, BackwardMatchesFiniteDifferences) {
  for (const Packed& p : kCases) {
    SCOPED_TRACE(testing::Message() << "heads " << p.heads << ", groups " << p.groups);
    auto qkv = test::random_vector(p.qkv_size(), 4, -2.0, 2.0);
    const auto w = test::random_vector(p.out_size(), 5);
    std::vector<double> out, lse;
    const auto loss = [&] {
      one_block_forward(p, qkv, out, lse);
      return test::dot(w, out);
    };
    const auto numeric = test::numeric_grad(qkv, loss);
    loss();
    EXPECT_TRUE(test::all_near(one_block_backward(p, qkv, out, lse, w), numeric, 1e-7));
  }
}

TEST(Attention, FloatMatchesDouble) {
  const Packed p = kCases[1];
  const auto qkv = test::random_vector(p.qkv_size(), 6, -2.0, 2.0);
  const auto dout = test::random_vector(p.out_size(), 7);
  std::vector<double> out, lse;
  one_block_forward(p, qkv, out, lse);
  const auto dqkv = one_block_backward(p, qkv, out, lse, dout);
  std::vector<float> out_f, lse_f, dqkv_f;
  ring_attention(p, to_float(qkv), to_float(dout), {0, 2, 5, p.s}, false, out_f, lse_f, dqkv_f);
  EXPECT_TRUE(test::all_near(to_double(out_f), out, 1e-5));
  EXPECT_TRUE(test::all_near(to_double(lse_f), lse, 1e-5));
  EXPECT_TRUE(test::all_near(to_double(dqkv_f), dqkv, 1e-5));
}

}  // namespace
}  // namespace px
