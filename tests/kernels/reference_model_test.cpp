// The whole-model reference against central finite differences of its own loss (double), over
// sampled elements of every parameter tensor of the tiny models; plus gradient accumulation,
// float-vs-double agreement, and that AdamW on it actually learns.
#include "engine/backends/cpu/reference_model.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "engine/backends/cpu/adamw.hpp"
#include "engine/spec/model_math.hpp"
#include "engine/spec/spec_yaml.hpp"

namespace px::cpu {
namespace {

ModelSpec load(const std::string& name) {
  return load_model_file(std::filesystem::path(PX_DATASETS_DIR) / "models" / (name + ".yaml"));
}

// Small enough that a forward takes well under a millisecond; vocab 96 pads to 128.
ModelSpec shrink(ModelSpec m) {
  m.seq_length = 8;
  m.vocab_size = 96;
  return m;
}

int padded(const ModelSpec& m) { return padded_vocab_size(m.vocab_size, 1); }

MicroBatch make_batch(std::int64_t b, std::int64_t s, int vocab, std::uint64_t seed, std::int64_t first_sample = 0) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int32_t> tok(0, vocab - 1);
  MicroBatch mb{b, s, {}, {}, {}};
  for (std::int64_t r = 0; r < b * s; ++r) mb.tokens.push_back(tok(rng)), mb.targets.push_back(tok(rng));
  for (std::int64_t j = 0; j < b; ++j) mb.sample_ids.push_back(first_sample + j);
  return mb;
}

// Megatron's init (std 0.02, unit norms, zero biases) leaves attention uniform and the MLP nearly
// linear, where a wrong derivative can hide; every element gets O(0.1) noise on top.
ParamMap<double> rough_parameters(const ModelSpec& m, std::uint64_t seed) {
  ParamMap<double> p = init_parameters<double>(m, padded(m), seed);
  std::mt19937_64 rng(seed + 1);
  std::uniform_real_distribution<double> noise(-0.25, 0.25);
  for (auto& [name, v] : p)
    for (double& x : v) x += noise(rng);
  return p;
}

struct GradCheck {
  int probes = 0;
  double worst = 0;  // largest |analytic - numeric| / (|numeric| + 1e-4)
};

// Compares forward_backward's gradient with central differences of lm (+ aux) at `per_tensor`
// random elements of every tensor, plus as many in the embedding rows the batch actually uses.
GradCheck check_gradients(const ModelSpec& m, const MicroBatch& mb, const ReferenceOptions& o, bool with_aux, int per_tensor) {
  const int V = padded(m);
  ParamMap<double> params = rough_parameters(m, 7);
  ParamMap<double> grads = zero_like(params);
  forward_backward(m, V, params, grads, mb, o);
  auto objective = [&] {
    const ReferenceLoss l = forward_loss(m, V, params, mb, o);
    return l.lm + (with_aux ? l.aux : 0.0);
  };
  std::mt19937_64 rng(11);
  GradCheck res;
  const double h = 3e-5;  // truncation (h^2) and rounding (1/h) errors balance here, about 1e-7 relative
  for (auto& [name, v] : params) {
    std::vector<std::size_t> idx;
    std::uniform_int_distribution<std::size_t> any(0, v.size() - 1);
    for (int i = 0; i < per_tensor; ++i) idx.push_back(any(rng));
    const auto H = static_cast<std::size_t>(m.hidden_size);
    std::uniform_int_distribution<std::size_t> col(0, H - 1), row(0, mb.tokens.size() - 1);
    for (int i = 0; i < per_tensor && name == "word_embedding.weight"; ++i)
      idx.push_back(static_cast<std::size_t>(mb.tokens[row(rng)]) * H + col(rng));
    for (int i = 0; i < per_tensor && name == "position_embedding.weight"; ++i)
      idx.push_back(static_cast<std::size_t>(row(rng) / static_cast<std::size_t>(mb.b)) * H + col(rng));
    for (std::size_t i : idx) {
      const double keep = v[i];
      v[i] = keep + h;
      const double up = objective();
      v[i] = keep - h;
      const double down = objective();
      v[i] = keep;
      const double numeric = (up - down) / (2 * h), analytic = grads.at(name)[i];
      // The 1e-4 floor: exact zeros (the K bias, by softmax shift invariance) read 1e-11 of noise.
      const double err = std::abs(analytic - numeric) / (std::abs(numeric) + 1e-4);
      EXPECT_LT(err, 1e-6) << name << "[" << i << "]: analytic " << analytic << ", numeric " << numeric;
      res.worst = std::max(res.worst, err);
      ++res.probes;
    }
  }
  ::testing::Test::RecordProperty("worst_relative_error", ::testing::PrintToString(res.worst));
  return res;
}

TEST(ReferenceModel, GradCheckTinyGpt) {  // LayerNorm, GELU, learned positions, tied, biases
  const ModelSpec m = shrink(load("tiny-gpt"));
  const GradCheck r = check_gradients(m, make_batch(2, 8, m.vocab_size, 1), {}, false, 8);
  EXPECT_GT(r.probes, 200);
}

TEST(ReferenceModel, GradCheckTinyLlama) {  // RMSNorm, SwiGLU, RoPE, GQA, untied, no biases
  const ModelSpec m = shrink(load("tiny-llama"));
  const GradCheck r = check_gradients(m, make_batch(2, 8, m.vocab_size, 2), {}, false, 14);
  EXPECT_GT(r.probes, 200);
}

TEST(ReferenceModel, GradCheckTinyMoeDropless) {
  ModelSpec m = shrink(load("tiny-moe"));
  m.moe->capacity_factor = static_cast<double>(m.moe->num_experts) / m.moe->top_k;  // capacity = all tokens
  ASSERT_EQ(moe_capacity(m, 16), 16);
  const GradCheck r = check_gradients(m, make_batch(2, 8, m.vocab_size, 3), {}, false, 8);
  EXPECT_GT(r.probes, 200);
}

TEST(ReferenceModel, GradCheckTinyMoeDropsAndAux) {
  ModelSpec m = shrink(load("tiny-moe"));
  m.moe->capacity_factor = 0.75;  // 4 experts x 6 slots < 32 assignments: drops are certain
  ASSERT_EQ(moe_capacity(m, 16), 6);
  ReferenceOptions o;
  o.moe_aux_coeff = 0.1;
  const GradCheck r = check_gradients(m, make_batch(2, 8, m.vocab_size, 4), o, true, 8);
  EXPECT_GT(r.probes, 200);
  ParamMap<double> p = rough_parameters(m, 7);
  EXPECT_GT(forward_loss(m, padded(m), p, make_batch(2, 8, m.vocab_size, 4), o).aux, 0.0);
}

TEST(ReferenceModel, GradCheckTinyGptDropout) {
  ModelSpec m = shrink(load("tiny-gpt"));
  m.hidden_dropout = 0.1;
  ReferenceOptions o;
  o.dropout_seed = 1234, o.iteration = 5;
  const GradCheck r = check_gradients(m, make_batch(2, 8, m.vocab_size, 5, 40), o, false, 8);
  EXPECT_GT(r.probes, 200);
}

// loss_scale multiplies every gradient, the MoE aux loss's included.
TEST(ReferenceModel, LossScaleScalesEveryGradient) {
  ModelSpec m = shrink(load("tiny-moe"));
  ReferenceOptions o;
  o.moe_aux_coeff = 0.1;
  const ParamMap<double> p = rough_parameters(m, 7);
  const MicroBatch mb = make_batch(2, 8, m.vocab_size, 13);
  ParamMap<double> g1 = zero_like(p), g3 = zero_like(p);
  forward_backward(m, padded(m), p, g1, mb, o);
  o.loss_scale = 3.0;
  forward_backward(m, padded(m), p, g3, mb, o);
  for (const auto& [name, g] : g1)
    for (std::size_t i = 0; i < g.size(); ++i) ASSERT_NEAR(g3[name][i], 3.0 * g[i], 1e-12) << name << "[" << i << "]";
}

TEST(ReferenceModel, DropoutIsActiveAndKeyedByIteration) {
  ModelSpec m = shrink(load("tiny-gpt"));
  const ParamMap<double> p = rough_parameters(m, 7);
  const MicroBatch mb = make_batch(2, 8, m.vocab_size, 6);
  const double plain = forward_loss(m, padded(m), p, mb, {}).lm;
  m.hidden_dropout = 0.1;
  ReferenceOptions o;
  const double it0 = forward_loss(m, padded(m), p, mb, o).lm;
  EXPECT_EQ(it0, forward_loss(m, padded(m), p, mb, o).lm);  // deterministic
  o.iteration = 1;
  const double it1 = forward_loss(m, padded(m), p, mb, o).lm;
  EXPECT_NE(plain, it0);
  EXPECT_NE(it0, it1);
}

// Two micro-batches at loss_scale 0.5 accumulate to the gradient of one micro-batch holding both
// (same sample ids, so the same dropout masks): grads add, and masks don't depend on grouping.
TEST(ReferenceModel, GradientAccumulationMatchesCombinedBatch) {
  ModelSpec m = shrink(load("tiny-gpt"));
  m.hidden_dropout = 0.1;
  const int V = padded(m);
  const ParamMap<double> p = rough_parameters(m, 7);
  const MicroBatch a = make_batch(2, 8, m.vocab_size, 8, 0), b = make_batch(2, 8, m.vocab_size, 9, 2);
  MicroBatch both{4, 8, {}, {}, {0, 1, 2, 3}};
  for (std::int64_t si = 0; si < 8; ++si)
    for (const MicroBatch* part : {&a, &b})
      for (std::int64_t j = 0; j < 2; ++j) {
        both.tokens.push_back(part->tokens[static_cast<std::size_t>(si * 2 + j)]);
        both.targets.push_back(part->targets[static_cast<std::size_t>(si * 2 + j)]);
      }
  ReferenceOptions half;
  half.loss_scale = 0.5;
  ParamMap<double> acc = zero_like(p), ref = zero_like(p);
  const double la = forward_backward(m, V, p, acc, a, half).lm;
  const double lb = forward_backward(m, V, p, acc, b, half).lm;
  const double lboth = forward_backward(m, V, p, ref, both, {}).lm;
  EXPECT_NEAR(0.5 * (la + lb), lboth, 1e-12);
  for (const auto& [name, g] : ref) {
    double gmax = 0, diff = 0;
    for (std::size_t i = 0; i < g.size(); ++i)
      gmax = std::max(gmax, std::abs(g[i])), diff = std::max(diff, std::abs(g[i] - acc[name][i]));
    EXPECT_LE(diff, 1e-12 * std::max(gmax, 1e-3)) << name;
  }
}

TEST(ReferenceModel, FloatAgreesWithDouble) {
  for (const std::string name : {"tiny-gpt", "tiny-llama", "tiny-moe"}) {
    ModelSpec m = shrink(load(name));
    if (m.is_moe()) m.moe->capacity_factor = 1.0;
    ReferenceOptions o;
    o.moe_aux_coeff = 0.01;
    const int V = padded(m);
    const ParamMap<double> pd = rough_parameters(m, 7);
    ParamMap<float> pf;
    for (const auto& [n, v] : pd) pf[n] = std::vector<float>(v.begin(), v.end());
    ParamMap<double> gd = zero_like(pd);
    ParamMap<float> gf = zero_like(pf);
    const MicroBatch mb = make_batch(2, 8, m.vocab_size, 10);
    const ReferenceLoss ld = forward_backward(m, V, pd, gd, mb, o), lf = forward_backward(m, V, pf, gf, mb, o);
    EXPECT_NEAR(lf.lm, ld.lm, 1e-5 * ld.lm) << name;
    EXPECT_NEAR(lf.aux, ld.aux, 1e-5 * ld.aux + 1e-9) << name;
    for (const auto& [n, g] : gd) {  // normwise per tensor: tiny elements carry only float noise
      double gmax = 0, diff = 0;
      for (std::size_t i = 0; i < g.size(); ++i)
        gmax = std::max(gmax, std::abs(g[i])), diff = std::max(diff, std::abs(g[i] - static_cast<double>(gf[n][i])));
      EXPECT_LE(diff, 1e-4 * gmax) << name << " " << n;
    }
  }
}

// 30 AdamW steps on one repeated batch of 64 tokens: the loss starts at ln(256) (std-0.02 init
// gives near-uniform logits) and must fall below 1 (it reaches about 0.04): it memorises the batch.
TEST(ReferenceModel, LearnsWithAdamW) {
  ModelSpec m = load("tiny-gpt");
  m.seq_length = 16;
  const int V = padded(m);
  ASSERT_EQ(V, 256);
  ParamMap<float> p = init_parameters<float>(m, V, 3);
  ParamMap<float> mom = zero_like(p), var = zero_like(p);
  const MicroBatch mb = make_batch(4, 16, m.vocab_size, 12);
  AdamWConfig cfg;
  cfg.lr = 1e-2;
  double first = 0, last = 0;
  for (int step = 1; step <= 30; ++step) {
    ParamMap<float> g = zero_like(p);
    last = forward_backward(m, V, p, g, mb, {}).lm;
    if (step == 1) first = last;
    for (auto& [n, w] : p) adamw_step<float>(w, g[n], mom[n], var[n], cfg, step, 1.0);
  }
  EXPECT_NEAR(first, std::log(256.0), 0.05);
  EXPECT_LT(last, 1.0);
  RecordProperty("final_loss", ::testing::PrintToString(last));
}

TEST(ReferenceModel, RejectsAttentionDropoutAndBadBatches) {
  ModelSpec m = shrink(load("tiny-gpt"));
  const ParamMap<double> p = init_parameters<double>(m, padded(m), 1);
  MicroBatch mb = make_batch(2, 8, m.vocab_size, 1);
  m.attention_dropout = 0.1;
  EXPECT_THROW(forward_loss(m, padded(m), p, mb, {}), std::invalid_argument);
  m.attention_dropout = 0;
  mb.tokens.pop_back();
  EXPECT_THROW(forward_loss(m, padded(m), p, mb, {}), std::invalid_argument);
}

}  // namespace
}  // namespace px::cpu
