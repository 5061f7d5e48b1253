// Closed-form model math against published figures (parameter counts, Narayanan et al. 2021 FLOPs,
// Korthikanti et al. 2022 activation memory) and small cases worked out by hand.
#include <gtest/gtest.h>

#include <cmath>

#include "engine/spec/model_math.hpp"

namespace px {
namespace {

ModelSpec gpt(int layers, int hidden, int heads, int seq) {
  ModelSpec m;
  m.num_layers = layers;
  m.hidden_size = hidden;
  m.num_attention_heads = heads;
  m.num_query_groups = heads;
  m.kv_channels = hidden / heads;
  m.ffn_hidden_size = 4 * hidden;
  m.vocab_size = 50257;
  m.seq_length = seq;
  m.max_position_embeddings = seq;
  m.activation = Activation::Gelu;
  m.norm = NormKind::LayerNorm;
  m.position = PositionKind::Learned;
  m.tied_embeddings = true;
  m.add_bias_linear = true;
  m.hidden_dropout = 0.1;
  m.attention_dropout = 0.1;
  return m;
}

ModelSpec gpt3_175b() { return gpt(96, 12288, 96, 2048); }

ModelSpec llama(int layers, int hidden, int heads, int groups, int ffn, int vocab) {
  ModelSpec m;
  m.num_layers = layers;
  m.hidden_size = hidden;
  m.num_attention_heads = heads;
  m.num_query_groups = groups;
  m.kv_channels = hidden / heads;
  m.ffn_hidden_size = ffn;
  m.vocab_size = vocab;
  m.seq_length = 4096;
  m.max_position_embeddings = 4096;
  m.activation = Activation::SwiGLU;
  m.norm = NormKind::RMSNorm;
  m.position = PositionKind::Rope;
  m.tied_embeddings = false;
  m.add_bias_linear = false;
  return m;
}

ModelSpec llama2_70b() { return llama(80, 8192, 64, 8, 28672, 32000); }

ModelSpec mixtral_8x7b() {
  ModelSpec m = llama(32, 4096, 32, 8, 14336, 32000);
  m.moe = MoESpec{.num_experts = 8, .top_k = 2, .ffn_hidden_size = 14336, .capacity_factor = 1.0,
                  .layer_freq = 1};
  return m;
}

void expect_relative(double actual, double expected, double tolerance) {
  EXPECT_LE(std::abs(actual - expected), tolerance * std::abs(expected))
      << "actual " << actual << " expected " << expected;
}

// ---------------------------------------------------------------------------------------------
// Parameters

TEST(Parameters, Gpt3_175b) {
  const ParameterCount c = count_parameters(gpt3_175b());
  // Per layer 12h² + 13h; word + position embeddings; final layernorm 2h; tied output.
  EXPECT_EQ(c.per_dense_layer, 12LL * 12288 * 12288 + 13 * 12288);
  EXPECT_EQ(c.embedding, 50257LL * 12288 + 2048LL * 12288);
  EXPECT_EQ(c.output_layer, 0);
  EXPECT_EQ(c.final_norm, 2 * 12288);
  EXPECT_EQ(c.total, 174'604'259'328LL);
  EXPECT_EQ(c.active, c.total);
  expect_relative(static_cast<double>(c.total), 174.6e9, 1e-3);
}

TEST(Parameters, Llama2_70b) {
  const ParameterCount c = count_parameters(llama2_70b());
  // QKV 8192·(8192 + 2·1024), out 8192², SwiGLU 3·8192·28672, two RMSNorms.
  EXPECT_EQ(c.per_dense_layer, 83'886'080LL + 67'108'864LL + 704'643'072LL + 16'384LL);
  EXPECT_EQ(c.output_layer, 32000LL * 8192);
  EXPECT_EQ(c.total, 68'976'648'192LL);
  expect_relative(static_cast<double>(c.total), 68.98e9, 1e-3);
}

TEST(Parameters, Llama3_8b) {
  const ParameterCount c = count_parameters(llama(32, 4096, 32, 8, 14336, 128256));
  EXPECT_EQ(c.total, 8'030'261'248LL);
  expect_relative(static_cast<double>(c.total), 8.03e9, 1e-3);
}

TEST(Parameters, Mixtral_8x7b) {
  const ParameterCount c = count_parameters(mixtral_8x7b());
  EXPECT_EQ(c.num_moe_layers, 32);
  EXPECT_EQ(c.num_dense_layers, 0);
  // Attention + norms 41,951,232; router 4096·8; one expert 3·4096·14336 = 176,160,768.
  EXPECT_EQ(c.per_moe_layer, 41'951'232LL + 32'768LL + 8 * 176'160'768LL);
  EXPECT_EQ(c.per_moe_layer_active, 41'951'232LL + 32'768LL + 2 * 176'160'768LL);
  EXPECT_EQ(c.total, 46'702'792'704LL);
  EXPECT_EQ(c.active, 12'879'925'248LL);
  expect_relative(static_cast<double>(c.total), 46.7e9, 1e-3);
  expect_relative(static_cast<double>(c.active), 12.9e9, 2e-3);
}

TEST(Parameters, Gpt2) {
  EXPECT_EQ(count_parameters(gpt(12, 768, 12, 1024)).total, 124'439'808LL);
  EXPECT_EQ(count_parameters(gpt(48, 1600, 25, 1024)).total, 1'557'611'200LL);
}

TEST(Parameters, MoELayerFrequencyAndBiases) {
  ModelSpec m = gpt(4, 64, 4, 32);
  m.moe = MoESpec{.num_experts = 4, .top_k = 1, .ffn_hidden_size = 32, .capacity_factor = 1.0,
                  .layer_freq = 2};
  EXPECT_FALSE(is_moe_layer(m, 0));
  EXPECT_TRUE(is_moe_layer(m, 1));
  EXPECT_FALSE(is_moe_layer(m, 2));
  EXPECT_TRUE(is_moe_layer(m, 3));
  const ParameterCount c = count_parameters(m);
  EXPECT_EQ(c.num_moe_layers, 2);
  EXPECT_EQ(c.num_dense_layers, 2);
  // Attention + norms: 4·64 norms + 3·64² + 3·64 QKV + 64² + 64 out = 16,896.
  const std::int64_t attention = 256 + 12288 + 192 + 4096 + 64;
  // Gelu expert with biases: 64·32 + 32·64 + 32 + 64 = 4,192.
  const std::int64_t expert = 2048 + 2048 + 32 + 64;
  EXPECT_EQ(c.per_moe_layer, attention + 64 * 4 + 4 * expert);
  EXPECT_EQ(c.per_moe_layer_active, attention + 64 * 4 + expert);
  EXPECT_EQ(c.per_dense_layer, attention + 2 * 64 * 256 + 256 + 64);
}

TEST(Parameters, QkvBiasWithoutLinearBiases) {
  ModelSpec m = llama(1, 64, 4, 2, 128, 1000);
  const std::int64_t without = count_parameters(m).per_dense_layer;
  m.add_qkv_bias = true;
  EXPECT_EQ(count_parameters(m).per_dense_layer - without, 64 + 2 * 2 * 16);
}

TEST(Vocabulary, Padding) {
  EXPECT_EQ(padded_vocab_size(50257, 1), 50304);
  EXPECT_EQ(padded_vocab_size(50257, 8), 51200);
  EXPECT_EQ(padded_vocab_size(32000, 1), 32000);
  EXPECT_EQ(padded_vocab_size(32000, 8), 32768);
  EXPECT_EQ(padded_vocab_size(128256, 8), 129024);
  EXPECT_EQ(padded_vocab_size(128, 1), 128);
  EXPECT_EQ(padded_vocab_size(129, 1), 256);
  EXPECT_EQ(padded_vocab_size(1000, 2, 64), 1024);
}

// ---------------------------------------------------------------------------------------------
// FLOPs

PlanSpec gpt3_plan(Recompute recompute) {
  PlanSpec p;
  p.tensor_model_parallel_size = 8;
  p.pipeline_model_parallel_size = 16;
  p.data_parallel_size = 8;
  p.micro_batch_size = 1;
  p.global_batch_size = 1536;
  p.recompute = recompute;
  return p;
}

TEST(Flops, NarayananEq3WithFullRecompute) {
  const ModelSpec m = gpt3_175b();
  const PlanSpec p = gpt3_plan(Recompute::Full);
  const double B = 1536, s = 2048, l = 96, h = 12288;
  const double V = padded_vocab_size(50257, 8);
  ASSERT_EQ(V, 51200);
  const double expected = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h));
  expect_relative(iteration_flops(m, p).total(), expected, 1e-12);
}

TEST(Flops, NarayananWithoutRecompute) {
  const ModelSpec m = gpt3_175b();
  const PlanSpec p = gpt3_plan(Recompute::None);
  const double B = 1536, s = 2048, l = 96, h = 12288, V = 51200;
  // Without recompute the layers lose a fourth of their work (96 → 72) but the logits keep 6·h·V
  // per token (forward + backward, never recomputed), so V/(16·l·h) becomes V/(12·l·h): simply
  // replacing 96 by 72 in Eq. 3 would undercount the logits by a quarter.
  const double expected = 72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h));
  const FlopsBreakdown f = iteration_flops(m, p);
  expect_relative(f.total(), expected, 1e-12);
  EXPECT_EQ(f.recompute, 0.0);
  EXPECT_DOUBLE_EQ(f.backward, 2 * f.forward);
  // Model FLOPs ignore recomputation: the same with full recompute.
  EXPECT_DOUBLE_EQ(iteration_flops(m, gpt3_plan(Recompute::Full)).model_flops(), f.model_flops());
  EXPECT_DOUBLE_EQ(model_flops_per_token(m, p), expected / (B * s));
}

ModelSpec tiny_swiglu() {
  ModelSpec m = llama(2, 64, 4, 2, 128, 1000);
  m.seq_length = 32;
  return m;
}

TEST(Flops, TinyModelByHand) {
  const ModelSpec m = tiny_swiglu();
  PlanSpec p;
  p.tensor_model_parallel_size = 2;  // vocabulary 1000 → 1024
  p.global_batch_size = 4;
  p.micro_batch_size = 4;
  // Per layer per sequence (s 32, h 64, a·d 64, g·d 32, f 128):
  //   QKV 2·32·64·(64 + 64) = 524,288; scores 4·32²·64 = 262,144; out 2·32·64·64 = 262,144;
  //   SwiGLU 6·32·64·128 = 1,572,864; layer 2,621,440; two layers 5,242,880.
  //   Logits 2·32·64·1024 = 4,194,304. Forward per sequence 9,437,184; batch 4: 37,748,736.
  const FlopsBreakdown f = iteration_flops(m, p);
  EXPECT_DOUBLE_EQ(f.forward, 37'748'736.0);
  EXPECT_DOUBLE_EQ(f.backward, 75'497'472.0);
  EXPECT_DOUBLE_EQ(f.recompute, 0.0);
  EXPECT_DOUBLE_EQ(model_flops_per_token(m, p), 3 * 37'748'736.0 / (4 * 32));

  p.recompute = Recompute::Selective;  // scores again: 4 sequences · 2 layers · 262,144
  EXPECT_DOUBLE_EQ(iteration_flops(m, p).recompute, 2'097'152.0);
  p.recompute = Recompute::Full;  // every layer forward again, logits excluded: 4 · 5,242,880
  EXPECT_DOUBLE_EQ(iteration_flops(m, p).recompute, 20'971'520.0);

  p.seq_length = 64;  // the plan's sequence length wins over the model's
  EXPECT_GT(iteration_flops(m, p).forward, 2 * f.forward);
}

TEST(Flops, TinyMoEByHand) {
  ModelSpec m = tiny_swiglu();
  m.moe = MoESpec{.num_experts = 4, .top_k = 2, .ffn_hidden_size = 32, .capacity_factor = 1.25,
                  .layer_freq = 2};
  PlanSpec p;
  p.tensor_model_parallel_size = 2;
  p.global_batch_size = 4;
  p.micro_batch_size = 4;
  // Layer 0 dense: 2,621,440. Layer 1 MoE: attention 1,048,576 + router 2·32·64·4 = 16,384 +
  // 2 experts · 6·32·64·32 = 786,432 → 1,851,392. Logits 4,194,304. Per sequence 8,667,136.
  EXPECT_DOUBLE_EQ(iteration_flops(m, p).forward, 4 * 8'667'136.0);
}

// ---------------------------------------------------------------------------------------------
// Activation memory

// GPT layer with every Korthikanti term present (dropouts on, unfused attention), one layer per
// stage and a middle stage so that no embedding/logits extras enter; one micro-batch in flight.
ModelSpec korthikanti_model() {
  ModelSpec m = gpt(4, 1024, 16, 512);
  return m;
}

PlanSpec korthikanti_plan(int tp, bool sp) {
  PlanSpec p;
  p.tensor_model_parallel_size = tp;
  p.pipeline_model_parallel_size = 4;
  p.micro_batch_size = 2;
  p.global_batch_size = 2;
  p.sequence_parallel = sp;
  p.use_flash_attn = false;
  return p;
}

constexpr double kS = 512, kB = 2, kH = 1024, kA = 16;

TEST(Activations, KorthikantiNoParallelism) {
  const RankMemory mem = training_memory(korthikanti_model(), korthikanti_plan(1, false), 1);
  EXPECT_EQ(mem.in_flight, 1);
  EXPECT_DOUBLE_EQ(mem.activations, kS * kB * kH * (34 + 5 * kA * kS / kH));
  EXPECT_DOUBLE_EQ(mem.activations, 77'594'624.0);
}

TEST(Activations, KorthikantiSequenceParallel) {
  const double t = 4;
  const RankMemory mem = training_memory(korthikanti_model(), korthikanti_plan(4, true), 1);
  EXPECT_DOUBLE_EQ(mem.activations, kS * kB * kH / t * (34 + 5 * kA * kS / kH));
}

TEST(Activations, KorthikantiTensorParallelWithoutSp) {
  const double t = 4;
  const RankMemory mem = training_memory(korthikanti_model(), korthikanti_plan(4, false), 1);
  EXPECT_DOUBLE_EQ(mem.activations, kS * kB * kH * (10 + 24 / t + 5 * kA * kS / (kH * t)));
}

TEST(Activations, SelectiveRecomputeAndFlash) {
  const double t = 4;
  PlanSpec p = korthikanti_plan(4, true);
  p.recompute = Recompute::Selective;
  EXPECT_DOUBLE_EQ(training_memory(korthikanti_model(), p, 1).activations, 34 * kS * kB * kH / t);
  p.recompute = Recompute::None;
  p.use_flash_attn = true;  // fp32 softmax statistics: 4 bytes per token per local head
  EXPECT_DOUBLE_EQ(training_memory(korthikanti_model(), p, 1).activations,
                   34 * kS * kB * kH / t + 4 * kS * kB * kA / t);
}

TEST(Activations, ContextParallelSplitsTokensNotKeys) {
  PlanSpec p = korthikanti_plan(1, false);
  p.context_parallel_size = 2;
  // Every per-token term halves; the s² terms halve too since only the query side is split.
  EXPECT_DOUBLE_EQ(training_memory(korthikanti_model(), p, 1).activations,
                   kS / 2 * kB * kH * (34 + 5 * kA * kS / kH));
}

TEST(Activations, FullRecomputeKeepsLayerInputsPlusOneLayer) {
  ModelSpec m = gpt(8, 1024, 16, 512);
  PlanSpec p = korthikanti_plan(1, false);
  p.global_batch_size = 16;  // 8 micro-batches of 2
  p.recompute = Recompute::Full;
  // Stage 1 of 4 holds 2 layers; 1F1B keeps min(4 − 1, 8) = 3 micro-batches in flight, each with
  // both layer inputs (2 bytes · 1024 tokens · 1024), plus one layer's full activations.
  const RankMemory mem = training_memory(m, p, 1);
  EXPECT_EQ(mem.in_flight, 3);
  EXPECT_DOUBLE_EQ(mem.activations, 3 * 2 * 2'097'152.0 + 77'594'624.0);
}

TEST(Activations, ScheduleInFlight) {
  ModelSpec m = gpt(8, 1024, 16, 512);
  PlanSpec p = korthikanti_plan(1, false);
  p.global_batch_size = 16;  // m = 8
  const double layer = 77'594'624.0;

  p.schedule = PipelineSchedule::GPipe;
  RankMemory mem = training_memory(m, p, 1);
  EXPECT_EQ(mem.in_flight, 8);
  EXPECT_DOUBLE_EQ(mem.activations, 8 * 2 * layer);

  p.schedule = PipelineSchedule::ZeroBubble;
  EXPECT_EQ(training_memory(m, p, 2).in_flight, 2);

  p.schedule = PipelineSchedule::Interleaved1F1B;
  p.virtual_pipeline_model_parallel_size = 2;  // 1 layer per chunk
  EXPECT_EQ(stage_layers(m, p, 1), (std::vector<int>{1, 5}));
  mem = training_memory(m, p, 1);
  // (4 − 1 − 1)·2 + (2 − 1)·4 + 1 = 9 chunk-micro-batches of one layer each.
  EXPECT_EQ(mem.in_flight, 9);
  EXPECT_DOUBLE_EQ(mem.activations, 9 * layer);
  // Capped at m·v when there are few micro-batches.
  p.global_batch_size = 4;
  EXPECT_EQ(training_memory(m, p, 0).in_flight, 4);
}

TEST(Activations, FirstAndLastStageExtras) {
  const ModelSpec m = korthikanti_model();
  const PlanSpec p = korthikanti_plan(1, false);
  const double layer = 77'594'624.0, tokens = kS * kB;
  // Embedding dropout mask: one byte per token and hidden unit.
  EXPECT_DOUBLE_EQ(training_memory(m, p, 0).activations, layer + tokens * kH);
  // Final-norm input and output-layer input (bf16), fp32 logits over the padded vocabulary 50304.
  EXPECT_DOUBLE_EQ(training_memory(m, p, 3).activations,
                   layer + 2 * 2 * tokens * kH + 4 * tokens * 50304);
}

TEST(Activations, MoELayerByHand) {
  ModelSpec m = llama(4, 64, 4, 4, 128, 1000);
  m.seq_length = 32;
  m.moe = MoESpec{.num_experts = 4, .top_k = 2, .ffn_hidden_size = 32, .capacity_factor = 1.0,
                  .layer_freq = 1};
  PlanSpec p;
  p.tensor_model_parallel_size = 2;
  p.pipeline_model_parallel_size = 4;
  p.expert_model_parallel_size = 1;
  p.micro_batch_size = 2;
  p.global_batch_size = 2;
  p.sequence_parallel = true;
  // T = 64 tokens, t = 2. Attention part: norms 8,192; QKV input 4,096; Q 4,096; K+V (2 local
  // groups of 16) 8,192; flash stats 4·64·2 = 512; out-proj input 4,096 → 29,184.
  // MoE: T' = 32, R = 64: router input 4,096; probabilities 512; routing 12·32·2 = 768; fc1 input
  // 8,192; SwiGLU input 8,192; fc2 input 4,096; expert output 8,192 → 34,048.
  EXPECT_DOUBLE_EQ(training_memory(m, p, 1).activations, 29'184.0 + 34'048.0);
  // Each routed token keeps 2·64 + 2·32·2 + 2·32 + 2·64 = 448 bytes.
  m.moe->capacity_factor = 1.1;  // per expert ceil(1.1·32·2/4) = ceil(17.6) = 18; 4 experts: R = 72
  EXPECT_DOUBLE_EQ(training_memory(m, p, 1).activations, 29'184.0 + 4'096 + 512 + 768 + 72 * 448.0);
  m.moe->capacity_factor = 1.25;  // R = 80 exactly
  EXPECT_DOUBLE_EQ(training_memory(m, p, 1).activations, 29'184.0 + 4'096 + 512 + 768 + 80 * 448.0);
}

// ---------------------------------------------------------------------------------------------
// Model state: sharding and ZeRO

TEST(RankParameters, StagesSumToTheModel) {
  const ModelSpec m = llama2_70b();  // vocabulary 32000 needs no padding at tp 1
  PlanSpec p;
  p.pipeline_model_parallel_size = 4;
  std::int64_t sum = 0;
  for (int stage = 0; stage < 4; ++stage) {
    const RankParams r = rank_parameters(m, p, stage);
    EXPECT_EQ(r.expert, 0);
    sum += r.dense;
  }
  EXPECT_EQ(sum, count_parameters(m).total);

  // Tied embeddings: with pp > 1 the last stage keeps its own output-layer copy.
  ModelSpec tied = gpt(4, 64, 4, 32);
  tied.vocab_size = 1024;
  PlanSpec one;
  EXPECT_EQ(rank_parameters(tied, one, 0).dense, count_parameters(tied).total);
  PlanSpec two;
  two.pipeline_model_parallel_size = 2;
  EXPECT_EQ(rank_parameters(tied, two, 0).dense + rank_parameters(tied, two, 1).dense,
            count_parameters(tied).total + 1024 * 64);
}

TEST(RankParameters, Gpt3Tp8Pp16Stage0ByHand) {
  const ModelSpec m = gpt3_175b();
  PlanSpec p = gpt3_plan(Recompute::Selective);
  p.sequence_parallel = true;
  p.use_flash_attn = false;
  p.zero_stage = 1;
  // One layer on a tp-8 rank: 12h²/8 = 226,492,416 weights; QKV bias 3h/8 = 4,608 and fc1 bias
  // 4h/8 = 6,144 split; two layernorms 4h = 49,152, out-proj bias and fc2 bias h each = 24,576
  // replicated → 226,576,896. Six layers: 1,359,461,376. Word embedding 51200·12288/8 =
  // 78,643,200; learned positions 2048·12288 = 25,165,824. Stage 0: 1,463,270,400.
  const RankParams r = rank_parameters(m, p, 0);
  EXPECT_EQ(r.dense, 1'463'270'400LL);
  EXPECT_EQ(r.expert, 0);
  // Last stage: six layers, its own copy of the output layer, final layernorm.
  EXPECT_EQ(rank_parameters(m, p, 15).dense, 1'359'461'376LL + 78'643'200LL + 24'576LL);

  const RankMemory mem = training_memory(m, p, 0);
  EXPECT_DOUBLE_EQ(mem.weights, 2 * 1'463'270'400.0);
  EXPECT_DOUBLE_EQ(mem.gradients, 4 * 1'463'270'400.0);
  EXPECT_DOUBLE_EQ(mem.optimizer, 12 * 1'463'270'400.0 / 8);
  EXPECT_DOUBLE_EQ(mem.zero3_buffers, 0.0);
  // Selective recompute with SP: 34·s·b·h/t = 106,954,752 bytes per layer; six layers; 1F1B keeps
  // min(16, 192) = 16 micro-batches; plus the embedding dropout mask s·h/t = 3,145,728 each.
  EXPECT_EQ(mem.in_flight, 16);
  EXPECT_DOUBLE_EQ(mem.activations, 16 * (6 * 106'954'752.0 + 3'145'728.0));
  EXPECT_DOUBLE_EQ(mem.activations, 10'317'987'840.0);
  EXPECT_DOUBLE_EQ(mem.total(), 2'926'540'800.0 + 5'853'081'600.0 + 2'194'905'600.0 +
                                    10'317'987'840.0);
}

TEST(ModelState, ZeroStageBytesPerParameter) {
  const ModelSpec m = llama2_70b();
  PlanSpec p;
  p.tensor_model_parallel_size = 8;
  p.pipeline_model_parallel_size = 4;
  p.data_parallel_size = 4;
  p.context_parallel_size = 2;  // ZeRO shards over dp·cp = 8
  p.global_batch_size = 64;
  const double n = static_cast<double>(rank_parameters(m, p, 1).dense);
  const auto state = [&](const RankMemory& r) { return r.weights + r.gradients + r.optimizer; };

  p.zero_stage = 0;
  EXPECT_DOUBLE_EQ(state(training_memory(m, p, 1)), 18 * n);  // 2 + 4 + 12
  p.zero_stage = 1;
  EXPECT_DOUBLE_EQ(state(training_memory(m, p, 1)), (2 + 4 + 12.0 / 8) * n);
  p.zero_stage = 2;
  EXPECT_DOUBLE_EQ(state(training_memory(m, p, 1)), (2 + 4.0 / 8 + 12.0 / 8) * n);
  p.zero_stage = 3;
  RankMemory z3 = training_memory(m, p, 1);
  EXPECT_DOUBLE_EQ(state(z3), 18.0 / 8 * n);
  // Two layers' bf16 weights (20 layers per stage, all alike).
  EXPECT_DOUBLE_EQ(z3.zero3_buffers, 2 * 2 * (n / 20));
  p.optimizer_offload = true;
  EXPECT_DOUBLE_EQ(training_memory(m, p, 1).optimizer, 0.0);

  p.zero_stage = 0;
  p.optimizer_offload = false;
  p.precision = DType::F32;
  p.grad_dtype = DType::F32;
  EXPECT_DOUBLE_EQ(state(training_memory(m, p, 1)), 16 * n);  // 4 + 4 + 8
  p.precision = DType::BF16;
  p.grad_dtype = DType::BF16;
  EXPECT_DOUBLE_EQ(state(training_memory(m, p, 1)), 16 * n);  // 2 + 2 + 12
}

TEST(ModelState, ExpertsAreWholeAndShardOverExpertDataParallel) {
  const ModelSpec m = mixtral_8x7b();
  PlanSpec p;
  p.tensor_model_parallel_size = 1;
  p.expert_model_parallel_size = 8;
  p.data_parallel_size = 8;
  p.global_batch_size = 8;
  RankParams r = rank_parameters(m, p, 0);
  // 32 layers × (attention 41,951,232 + router 32,768) + embedding + output + final norm.
  EXPECT_EQ(r.dense, 32 * (41'951'232LL + 32'768LL) + 2 * 32000LL * 4096 + 4096);
  EXPECT_EQ(r.expert, 32 * 176'160'768LL);  // one whole expert per layer
  EXPECT_EQ(r.dense + 8 * r.expert, count_parameters(m).total);

  p.zero_stage = 1;  // dense over dp 8, experts over tp·cp·dp/ep = 1
  const RankMemory mem = training_memory(m, p, 0);
  EXPECT_DOUBLE_EQ(mem.optimizer, 12 * (static_cast<double>(r.dense) / 8 +
                                        static_cast<double>(r.expert)));

  // Tensor parallelism splits attention and vocabulary but never the experts.
  p.tensor_model_parallel_size = 2;
  p.data_parallel_size = 4;
  p.expert_model_parallel_size = 4;
  r = rank_parameters(m, p, 0);
  EXPECT_EQ(r.expert, 32 * 2 * 176'160'768LL);
}

TEST(ModelState, GroupedQueryHeadsReplicateBelowTp) {
  const ModelSpec m = llama(1, 1024, 16, 2, 2048, 1024);  // d 64, g 2
  PlanSpec p;
  p.tensor_model_parallel_size = 4;
  const std::int64_t h = 1024, d = 64;
  // Q 16·64/4 columns, K and V one replicated group each; out 16·64·1024/4; SwiGLU 3·1024·2048/4;
  // two rmsnorms h, final norm h; embedding and output 1024·1024/4 each.
  const std::int64_t expected = h * (256 + 2 * d) + 256 * h + 3 * h * 2048 / 4 + 3 * h + 2 * h * h / 4;
  EXPECT_EQ(rank_parameters(m, p, 0).dense, expected);
}

TEST(KvCache, Llama2_70b) {
  const ModelSpec m = llama2_70b();
  EXPECT_EQ(kv_cache_bytes(m, 1, 4096, 1, DType::BF16), 2LL * 80 * 8 * 128 * 4096 * 2);
  EXPECT_EQ(kv_cache_bytes(m, 1, 4096, 1, DType::BF16), 1'342'177'280LL);
  EXPECT_EQ(kv_cache_bytes(m, 1, 4096, 8, DType::BF16), 1'342'177'280LL / 8);
  // 8 groups on 16 ranks: each rank keeps one replicated group.
  EXPECT_EQ(kv_cache_bytes(m, 1, 4096, 16, DType::BF16), 1'342'177'280LL / 8);
  EXPECT_EQ(kv_cache_bytes(m, 4, 1024, 1, DType::FP8), 1'342'177'280LL / 2);
}

}  // namespace
}  // namespace px
