// The plan compiler against closed forms: every strategy compiles to programs that a dry run
// executes without deadlock or mismatch, FLOPs sum to the Megatron count, communication volumes
// equal the Megatron/ZeRO/pipeline formulas, and the pipeline bubble is (p-1)/(m+p-1).
#include <gtest/gtest.h>

#include <ostream>

#include <algorithm>
#include <cmath>

#include "engine/plan/dry_run.hpp"
#include "engine/plan/plan_summary.hpp"
#include "engine/spec/model_math.hpp"
#include "plan_test_support.hpp"

namespace px {
namespace {

using test::compile;

struct Case {
  const char* name;
  const char* model;
  std::function<void(PlanSpec&)> set;
};

// Names the case in test output instead of dumping its bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

void batch(PlanSpec& p, int micro, int global) {
  p.micro_batch_size = micro;
  p.global_batch_size = global;
}

const std::vector<Case>& strategy_cases() {
  static const std::vector<Case> cases = {
      {"single", "tiny-gpt", [](PlanSpec& p) { batch(p, 2, 2); }},
      {"grad_accumulation", "tiny-gpt", [](PlanSpec& p) { batch(p, 1, 4); }},
      {"dp2", "tiny-gpt", [](PlanSpec& p) { p.data_parallel_size = 2; batch(p, 1, 4); }},
      {"zero1", "tiny-gpt", [](PlanSpec& p) { p.data_parallel_size = 2; p.zero_stage = 1; batch(p, 1, 4); }},
      {"zero2", "tiny-gpt", [](PlanSpec& p) { p.data_parallel_size = 2; p.zero_stage = 2; batch(p, 1, 4); }},
      {"zero1_overlap_param_gather_ep2", "tiny-moe",
       [](PlanSpec& p) {
         p.data_parallel_size = 2;
         p.expert_model_parallel_size = 2;
         p.zero_stage = 1;
         p.overlap_param_gather = true;
         batch(p, 1, 4);
       }},
      {"zero3", "tiny-gpt", [](PlanSpec& p) { p.data_parallel_size = 2; p.zero_stage = 3; batch(p, 1, 4); }},
      {"tp2", "tiny-gpt", [](PlanSpec& p) { p.tensor_model_parallel_size = 2; batch(p, 1, 2); }},
      {"tp2_sp", "tiny-llama", [](PlanSpec& p) { p.tensor_model_parallel_size = 2; p.sequence_parallel = true; batch(p, 1, 2); }},
      {"cp2", "tiny-llama", [](PlanSpec& p) { p.context_parallel_size = 2; batch(p, 1, 2); }},
      {"ep2", "tiny-moe", [](PlanSpec& p) { p.data_parallel_size = 2; p.expert_model_parallel_size = 2; batch(p, 1, 4); }},
      {"pp2_gpipe", "tiny-gpt-deep", [](PlanSpec& p) { p.pipeline_model_parallel_size = 2; p.schedule = PipelineSchedule::GPipe; batch(p, 1, 4); }},
      {"pp4_1f1b", "tiny-gpt-deep", [](PlanSpec& p) { p.pipeline_model_parallel_size = 4; batch(p, 1, 8); }},
      {"pp2_interleaved", "tiny-gpt-deep",
       [](PlanSpec& p) {
         p.pipeline_model_parallel_size = 2;
         p.schedule = PipelineSchedule::Interleaved1F1B;
         p.virtual_pipeline_model_parallel_size = 2;
         batch(p, 1, 4);
       }},
      {"pp4_zero_bubble", "tiny-gpt-deep", [](PlanSpec& p) { p.pipeline_model_parallel_size = 4; p.schedule = PipelineSchedule::ZeroBubble; batch(p, 1, 8); }},
      {"recompute_selective", "tiny-gpt", [](PlanSpec& p) { p.recompute = Recompute::Selective; p.use_flash_attn = false; batch(p, 1, 2); }},
      {"recompute_full", "tiny-gpt", [](PlanSpec& p) { p.recompute = Recompute::Full; batch(p, 1, 2); }},
      {"offload", "tiny-gpt", [](PlanSpec& p) { p.optimizer_offload = true; p.data_parallel_size = 2; p.zero_stage = 1; batch(p, 1, 2); }},
      {"tp2_pp2_dp2", "tiny-gpt-deep",
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2;
         p.pipeline_model_parallel_size = 2;
         p.data_parallel_size = 2;
         batch(p, 1, 8);
       }},
      {"tp2_dp2_ep2", "tiny-moe",
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2;
         p.sequence_parallel = true;
         p.data_parallel_size = 2;
         p.expert_model_parallel_size = 2;
         batch(p, 1, 4);
       }},
      {"tp2_sp_tp_comm_overlap", "tiny-llama",
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2;
         p.sequence_parallel = true;
         p.tp_comm_overlap = true;
         batch(p, 1, 2);
       }},
      {"tp4_sp_pp2_zero_bubble_tp_comm_overlap", "tiny-gpt-deep",
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 4;
         p.sequence_parallel = true;
         p.tp_comm_overlap = true;
         p.pipeline_model_parallel_size = 2;
         p.schedule = PipelineSchedule::ZeroBubble;
         p.recompute = Recompute::Selective;
         batch(p, 1, 4);
       }},
      {"everything", "tiny-moe",
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2;
         p.sequence_parallel = true;
         p.context_parallel_size = 2;
         p.pipeline_model_parallel_size = 2;
         p.data_parallel_size = 2;
         p.expert_model_parallel_size = 2;
         p.zero_stage = 3;
         p.recompute = Recompute::Full;
         batch(p, 1, 4);
       }},
  };
  return cases;
}

class Strategy : public ::testing::TestWithParam<Case> {};

TEST_P(Strategy, DryRunCompletesWithMatchedCommunication) {
  const CompiledPlan plan = compile(GetParam().model, GetParam().set);
  const DryRunResult r = dry_run(plan);
  EXPECT_TRUE(r.ok) << r.error;
}

TEST_P(Strategy, InOrderIssueFromOneThreadCannotDeadlock) {
  const CompiledPlan plan = compile(GetParam().model, GetParam().set);
  DryRunOptions options;
  options.in_order_issue = true;
  const DryRunResult r = dry_run(plan, options);
  EXPECT_TRUE(r.ok) << r.error;
}

// The CUDA engine's order: one device stream, each NCCL communicator one operation at a time,
// every comm op after the device work before it.
TEST_P(Strategy, NcclCommunicatorOrderCannotDeadlock) {
  const CompiledPlan plan = compile(GetParam().model, GetParam().set);
  DryRunOptions options;
  options.nccl_order = true;
  const DryRunResult r = dry_run(plan, options);
  EXPECT_TRUE(r.ok) << r.error;
}

TEST_P(Strategy, SummedFlopsEqualTheClosedForm) {
  const CompiledPlan plan = compile(GetParam().model, GetParam().set);
  double sum = 0;
  for (const auto& b : plan.ranks)
    for (const Op& op : plan.roles[static_cast<std::size_t>(b.role)].ops) sum += op.flops;
  const double expected = iteration_flops(plan.model, plan.plan).total();
  EXPECT_NEAR(sum / expected, 1.0, 1e-12) << "compiled " << sum << " closed form " << expected;
}

TEST_P(Strategy, EveryTensorIsProducedBeforeItIsRead) {
  const CompiledPlan plan = compile(GetParam().model, GetParam().set);
  for (const Program& prog : plan.roles) {
    for (const Tensor& t : prog.tensors) {
      ASSERT_LE(t.first_op, t.last_op) << prog.name_of(t);
      ASSERT_GE(t.bytes, 0);
    }
    for (std::size_t i = 0; i < prog.ops.size(); ++i)
      for (auto d : prog.deps_of(prog.ops[i])) ASSERT_LT(d, i) << "dependency on a later op";
  }
}

// The buffer conventions the engine relies on: an all-reduce works in place on exactly its
// buffer; an all-gather writes its whole output; a reduce-scatter reads its whole input; a message
// fills the receiving buffer.
TEST_P(Strategy, CommBuffersMatchTheirTensors) {
  const CompiledPlan plan = compile(GetParam().model, GetParam().set);
  for (const Program& prog : plan.roles)
    for (const Op& op : prog.ops) {
      if (!is_comm(op.kind)) continue;
      std::int64_t read = 0, written = 0, largest_read = 0;
      for (const TensorUse& u : prog.uses_of(op)) {
        const std::int64_t b = u.bytes;
        (u.write ? written : read) += b;
        if (!u.write) largest_read = std::max(largest_read, b);
      }
      const std::string what = std::string(prog.name_of(op)) + " on stage " + std::to_string(prog.pp_stage);
      switch (op.kind) {
        case OpKind::AllReduce: EXPECT_EQ(written, op.comm_bytes) << what; break;
        case OpKind::AllGather: EXPECT_EQ(written, op.comm_bytes) << what; break;
        case OpKind::ReduceScatter: EXPECT_EQ(largest_read, op.comm_bytes) << what; break;
        case OpKind::Recv:
        case OpKind::AllToAll:
        case OpKind::RingExchange: EXPECT_EQ(written, op.comm_bytes) << what; break;
        case OpKind::Send: EXPECT_EQ(read, op.comm_bytes) << what; break;
        default: break;
      }
    }
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, Strategy, ::testing::ValuesIn(strategy_cases()),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

// Sum of comm_bytes over one rank's ops of a kind/group, inside transformer layers or not.
std::int64_t comm_bytes(const Program& prog, OpKind kind, GroupKind group, bool in_layers) {
  std::int64_t s = 0;
  for (const Op& op : prog.ops)
    if (op.kind == kind && op.group == group && (op.layer != kNone) == in_layers) s += op.comm_bytes;
  return s;
}

TEST(CommVolume, TensorParallelAllReducesFourTimesPerLayer) {
  // Megatron: f and g in attention and MLP, forward and backward: 4 all-reduces of s*b*h per layer.
  const CompiledPlan plan = compile("tiny-gpt", [](PlanSpec& p) { p.tensor_model_parallel_size = 2; batch(p, 1, 3); });
  const ModelSpec& m = plan.model;
  const std::int64_t tokens = m.seq_length, e = 2;
  EXPECT_EQ(comm_bytes(plan.roles[0], OpKind::AllReduce, GroupKind::TP, true),
            4 * m.num_layers * 3 * e * tokens * m.hidden_size);
}

TEST(CommVolume, SequenceParallelTradesAllReducesForGathersAndScatters) {
  // Korthikanti et al.: each all-reduce becomes a reduce-scatter plus an all-gather; backward also
  // re-gathers the two sharded GEMM inputs for the weight gradients.
  const CompiledPlan plan = compile("tiny-llama", [](PlanSpec& p) {
    p.tensor_model_parallel_size = 2;
    p.sequence_parallel = true;
    batch(p, 1, 2);
  });
  const ModelSpec& m = plan.model;
  const std::int64_t full = 2 * std::int64_t{m.seq_length} * m.hidden_size * 2 /*micro-batches*/ * m.num_layers;
  EXPECT_EQ(comm_bytes(plan.roles[0], OpKind::AllReduce, GroupKind::TP, true), 0);
  EXPECT_EQ(comm_bytes(plan.roles[0], OpKind::ReduceScatter, GroupKind::TP, true), 4 * full);
  EXPECT_EQ(comm_bytes(plan.roles[0], OpKind::AllGather, GroupKind::TP, true), 6 * full);
}

TEST(CommVolume, TpCommOverlapRingsMoveWhatTheirCollectivesWould) {
  // Megatron's --tp-comm-overlap: the forward gathers, the backward's gathers of output gradients
  // and both passes' reduce-scatters of the four linear layers become rings, each rank passing
  // tp - 1 blocks, (tp - 1)/tp of the collective's buffer; the re-gathers for wgrad stay collectives.
  for (const int tp : {2, 4}) {
    const CompiledPlan plan = compile("tiny-gpt-deep", [tp](PlanSpec& p) {
      p.tensor_model_parallel_size = tp;
      p.sequence_parallel = true;
      p.tp_comm_overlap = true;
      batch(p, 1, 2);
    });
    const ModelSpec& m = plan.model;
    const std::int64_t full = 2 * std::int64_t{m.seq_length} * m.hidden_size * 2 /*micro-batches*/ * m.num_layers;
    const Program& prog = plan.roles[0];
    EXPECT_EQ(comm_bytes(prog, OpKind::ReduceScatter, GroupKind::TP, true), 0) << "tp " << tp;
    EXPECT_EQ(comm_bytes(prog, OpKind::AllGather, GroupKind::TP, true), 2 * full) << "tp " << tp;
    EXPECT_EQ(comm_bytes(prog, OpKind::RingExchange, GroupKind::TP, true), 8 * full * (tp - 1) / tp) << "tp " << tp;
    // Every GEMM of a ring is one block of rows (a weight gradient's: of the rows it sums over):
    // tp steps per ring, the same FLOPs; a backward gather's ring has two GEMMs a step.
    int ring_gemms = 0;
    for (const Op& op : prog.ops) {
      if (op.kind != OpKind::Gemm || op.group != GroupKind::TP) continue;
      ++ring_gemms;
      EXPECT_EQ(op.variant == Variant::GemmWeightGrad ? op.k : op.m, m.seq_length / tp) << prog.name_of(op);
    }
    EXPECT_EQ(ring_gemms, (6 + 2 * 2) * tp * 2 * m.num_layers) << "tp " << tp;
  }
}

TEST(CommVolume, DataParallelReducesEveryGradientOnce) {
  const CompiledPlan plan = compile("tiny-gpt", [](PlanSpec& p) { p.data_parallel_size = 4; batch(p, 1, 8); });
  const ParameterCount pc = count_parameters(plan.model);
  const std::int64_t held = pc.total - std::int64_t{plan.model.vocab_size} * plan.model.hidden_size +
                            std::int64_t{plan.padded_vocab} * plan.model.hidden_size;
  std::int64_t reduced = 0;
  for (const Op& op : plan.roles[0].ops)
    if (op.group == GroupKind::DP && op.kind == OpKind::AllReduce && op.comm_bytes != 4) {  // 4 B: the gradient norm
      reduced += op.comm_bytes;
      EXPECT_EQ(op.dtype, DType::F32) << plan.roles[0].name_of(op);  // Megatron's fp32 main gradients
    }
  // Each flat buffer (word embedding, position table, each layer, final norm) is padded to a
  // multiple of dp, as Megatron-Core pads its gradient buffers.
  const std::int64_t h = plan.model.hidden_size;
  auto pad = [](std::int64_t n) { return (n + 3) / 4 * 4; };
  const std::int64_t padded = pad(std::int64_t{plan.padded_vocab} * h) + pad(std::int64_t{plan.model.max_position_embeddings} * h) +
                              plan.model.num_layers * pad(pc.per_dense_layer) + pad(pc.final_norm);
  EXPECT_GE(padded, held);
  EXPECT_EQ(reduced, 4 * padded);
}

TEST(CommVolume, Zero1ReduceScattersGradientsAndGathersEveryWeightOnce) {
  const CompiledPlan plan = compile("tiny-gpt", [](PlanSpec& p) {
    p.data_parallel_size = 4;
    p.zero_stage = 1;
    batch(p, 1, 8);
  });
  const ParameterCount pc = count_parameters(plan.model);
  const std::int64_t held = pc.total - std::int64_t{plan.model.vocab_size} * plan.model.hidden_size +
                            std::int64_t{plan.padded_vocab} * plan.model.hidden_size;
  std::int64_t scattered = 0, gathered = 0, reduced = 0;
  for (const Op& op : plan.roles[0].ops) {
    if (op.group != GroupKind::DP || op.comm_bytes == 4) continue;  // 4 B: the gradient norm
    scattered += op.kind == OpKind::ReduceScatter ? op.comm_bytes : 0;
    gathered += op.kind == OpKind::AllGather ? op.comm_bytes : 0;
    reduced += op.kind == OpKind::AllReduce ? op.comm_bytes : 0;
  }
  EXPECT_EQ(scattered, 4 * held);  // fp32 gradients, once per iteration
  EXPECT_EQ(gathered, 2 * held);   // bf16 weights
  EXPECT_EQ(reduced, 0);
}

TEST(CommVolume, Zero3GathersEveryLayerTwicePerMicroBatch) {
  const CompiledPlan plan = compile("tiny-gpt", [](PlanSpec& p) {
    p.data_parallel_size = 2;
    p.zero_stage = 3;
    batch(p, 1, 6);
  });
  const ModelSpec& m = plan.model;
  const std::int64_t h = m.hidden_size, per_layer = 12 * h * h + 13 * h, micro = 3;
  EXPECT_EQ(comm_bytes(plan.roles[0], OpKind::AllGather, GroupKind::DP, true), 2 * micro * m.num_layers * 2 * per_layer);
  // Gradients: each layer's whole flat buffer reduce-scattered once per micro-batch, in fp32.
  EXPECT_EQ(comm_bytes(plan.roles[0], OpKind::ReduceScatter, GroupKind::DP, true), micro * m.num_layers * 4 * per_layer);
  // Likewise the tied word embedding (both its uses), the position table and the final norm.
  EXPECT_EQ(comm_bytes(plan.roles[0], OpKind::ReduceScatter, GroupKind::DP, false),
            4 * micro * (plan.padded_vocab * h + std::int64_t{m.max_position_embeddings} * h + 2 * h));
}

TEST(CommVolume, PipelineSendsOneActivationPerMicroBatchAndChunk) {
  const CompiledPlan plan = compile("tiny-gpt-deep", [](PlanSpec& p) {
    p.pipeline_model_parallel_size = 2;
    p.schedule = PipelineSchedule::Interleaved1F1B;
    p.virtual_pipeline_model_parallel_size = 2;
    batch(p, 1, 4);
  });
  const std::int64_t act = 2 * std::int64_t{plan.model.seq_length} * plan.model.hidden_size;
  for (const Program& prog : plan.roles) {
    std::int64_t sends = 0, recvs = 0;
    for (const Op& op : prog.ops) {
      if (op.kind == OpKind::Send) sends += op.comm_bytes;
      if (op.kind == OpKind::Recv) recvs += op.comm_bytes;
    }
    // 4 micro-batches x 2 chunks, forward and backward, less the model's two ends.
    EXPECT_EQ(sends, (2 * 4 * 2 - 4) * act);
    EXPECT_EQ(recvs, (2 * 4 * 2 - 4) * act);
  }
}

TEST(CommVolume, ExpertParallelAllToAllFourTimesPerMoeLayer) {
  const CompiledPlan plan = compile("tiny-moe", [](PlanSpec& p) {
    p.data_parallel_size = 2;
    p.expert_model_parallel_size = 2;
    batch(p, 1, 2);
  });
  const ModelSpec& m = plan.model;
  const std::int64_t routed = static_cast<std::int64_t>(std::ceil(m.moe->capacity_factor * m.seq_length * m.moe->top_k));
  EXPECT_EQ(comm_bytes(plan.roles[0], OpKind::AllToAll, GroupKind::EP, true), 4 * m.num_layers * 2 * routed * m.hidden_size);
}

TEST(CommVolume, ExpertCapacityRoundsPerExpertAsTheMemoryModelDoes) {
  ModelSpec m = test::model("tiny-moe");
  m.moe->capacity_factor = 1.1;
  const PlanSpec p = test::plan_for(m, [](PlanSpec& s) {
    s.data_parallel_size = 2;
    s.expert_model_parallel_size = 2;
    batch(s, 1, 2);
  });
  const CompiledPlan plan = compile_plan(m, p);
  // GShard capacity per routing group (a rank's 64 tokens): ceil(1.1 · 64 · top-2 / 4 experts) = 36
  // slots per expert, for each of the 4 experts: 144 routed tokens leave and reach each rank.
  const std::int64_t routed = 4 * 36;
  for (const Op& op : plan.roles[0].ops)
    if (op.kind == OpKind::AllToAll) {
      EXPECT_EQ(op.comm_bytes, 2 * routed * m.hidden_size);
    }
}

TEST(CommVolume, ContextParallelRingPassesKeysAndValues) {
  const CompiledPlan plan = compile("tiny-llama", [](PlanSpec& p) {
    p.context_parallel_size = 4;
    batch(p, 1, 1);
  });
  const ModelSpec& m = plan.model;
  const std::int64_t kv = 2 * std::int64_t{m.seq_length} / 4 * m.num_query_groups * m.kv_channels * 2;
  // Forward: cp-1 steps pass K,V. Backward: cp-1 steps pass K,V ahead, and cp steps pass dK,dV
  // behind them, the last one bringing each block's gradients home.
  EXPECT_EQ(comm_bytes(plan.roles[0], OpKind::RingExchange, GroupKind::CP, true), m.num_layers * (3 + 3 + 4) * kv);
}

// Costs only transformer-layer compute, so every stage has equal forward and backward times.
double layer_compute_cost(const Program&, const Op& op) {
  return op.layer != kNone && op.stream == Stream::Compute ? op.flops + op.vector_flops : 0.0;
}

double stage0_bubble(const CompiledPlan& plan) {
  const DryRunResult r = dry_run(plan, {layer_compute_cost, false});
  EXPECT_TRUE(r.ok) << r.error;
  return 1.0 - r.compute_busy[0] / r.makespan;
}

TEST(CommVolume, OverlappedParamGatherMovesTheSameGathersToTheIterationsStart) {
  // Megatron's --overlap-param-gather: the same all-gathers, before any forward op, and a forward
  // op waits for its own layer's gather only.
  const auto with = [](bool overlap) {
    return test::compile("tiny-gpt-deep", [&](PlanSpec& p) {
      p.data_parallel_size = 2;
      p.pipeline_model_parallel_size = 2;
      p.zero_stage = 1;
      p.overlap_param_gather = overlap;
      batch(p, 1, 4);
    });
  };
  const CompiledPlan after = with(false), before = with(true);
  for (std::size_t r = 0; r < before.roles.size(); ++r) {
    const Program& prog = before.roles[r];
    const auto gathers = [](const Program& p) {
      std::vector<std::int64_t> bytes;
      for (const Op& op : p.ops)
        if (op.kind == OpKind::AllGather && p.name_of(op) == "weights.all_gather") bytes.push_back(op.comm_bytes);
      return bytes;
    };
    std::vector<std::int64_t> a = gathers(after.roles[r]), b = gathers(prog);
    ASSERT_FALSE(a.empty());
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    EXPECT_EQ(a, b);
    const auto n = static_cast<std::uint32_t>(a.size());
    for (std::uint32_t g = 0; g < n; ++g) EXPECT_EQ(prog.name_of(prog.ops[g]), "weights.all_gather") << "the gathers open the program";
    // The first op to read a gathered buffer waits for that gather, and for no gather of a buffer
    // it does not read.
    const auto written = [&](std::uint32_t g) {
      for (const TensorUse& u : prog.uses_of(prog.ops[g]))
        if (u.write) return u.tensor;
      return std::uint32_t{0};
    };
    const auto reads = [&](const Op& op, std::uint32_t t) {
      const auto uses = prog.uses_of(op);
      return std::any_of(uses.begin(), uses.end(), [&](const TensorUse& u) { return !u.write && u.tensor == t; });
    };
    for (std::uint32_t g = 0; g < n; ++g) {
      const auto reader = std::find_if(prog.ops.begin() + n, prog.ops.end(), [&](const Op& op) { return reads(op, written(g)); });
      ASSERT_NE(reader, prog.ops.end()) << "gather " << g;
      const auto deps = prog.deps_of(*reader);
      EXPECT_NE(std::find(deps.begin(), deps.end(), g), deps.end()) << prog.name_of(*reader);
      for (auto d : deps) {
        if (d < n) {
          EXPECT_TRUE(reads(*reader, written(d))) << prog.name_of(*reader) << " waits for a gather it does not read";
        }
      }
    }
  }
}

TEST(Precision, Fp8RunsTheGemmsInFp8AndKeepsTheRestInBf16) {
  // As Transformer Engine's fp8 recipe and torchao's Float8 linears do: the same plan in bf16
  // stores and moves the same bytes, and only its GEMMs change dtype.
  const ModelSpec m = test::model("gpt2-124m");
  const auto with = [&](DType d) {
    return compile_plan(m, test::plan_for(m, [&](PlanSpec& s) {
      s.precision = d;
      batch(s, 2, 2);
    }));
  };
  const CompiledPlan fp8 = with(DType::FP8), bf16 = with(DType::BF16);
  ASSERT_EQ(fp8.roles[0].ops.size(), bf16.roles[0].ops.size());
  int gemms = 0;
  for (std::size_t i = 0; i < fp8.roles[0].ops.size(); ++i) {
    const Op& a = fp8.roles[0].ops[i];
    const Op& b = bf16.roles[0].ops[i];
    gemms += a.kind == OpKind::Gemm;
    EXPECT_EQ(a.dtype, a.kind == OpKind::Gemm ? DType::FP8 : b.dtype) << fp8.roles[0].name_of(a);
    EXPECT_EQ(a.bytes_read + a.bytes_written, b.bytes_read + b.bytes_written) << fp8.roles[0].name_of(a);
  }
  EXPECT_GT(gemms, 0);
}

TEST(AttentionTraffic, UnfusedAttentionCountsItsScorePassesAndFlashDoesNot) {
  // Per score element of e bytes, with attention dropout: forward 3e read and 3e + 1 written (scores,
  // probabilities, dropped probabilities and the mask), backward 6e + 1 read and 3e written.
  const ModelSpec m = test::model("gpt2-124m");
  ASSERT_GT(m.attention_dropout, 0);
  for (const bool flash : {true, false}) {
    const PlanSpec p = test::plan_for(m, [&](PlanSpec& s) {
      s.use_flash_attn = flash;
      s.seq_length = 128;
      batch(s, 2, 2);
    });
    const CompiledPlan plan = compile_plan(m, p);
    const std::int64_t scores = 2 * m.num_attention_heads * 128 * 128, e = 2;
    int seen = 0;
    for (const Op& op : plan.roles[0].ops) {
      if (op.kind != OpKind::AttentionCore) continue;
      ++seen;
      const bool bwd = op.phase == Phase::Backward;
      const std::int64_t io_read = e * 2 * 128 * 3 * m.hidden_size, io_written = e * 2 * 128 * m.hidden_size;
      EXPECT_EQ(op.variant, flash ? Variant::Plain : Variant::AttentionUnfused);
      EXPECT_EQ(op.bytes_read, io_read + (flash ? 0 : (bwd ? 6 * e + 1 : 3 * e) * scores));
      EXPECT_EQ(op.bytes_written, io_written + (flash ? 0 : (bwd ? 3 * e : 3 * e + 1) * scores));
    }
    EXPECT_EQ(seen, 2 * m.num_layers);
  }
}

TEST(PipelineBubble, OneFOneBMatchesClosedForm) {
  for (int p : {2, 4}) {
    for (int m : {4, 8, 12}) {
      const CompiledPlan plan = compile("tiny-gpt-deep", [&](PlanSpec& s) {
        s.pipeline_model_parallel_size = p;
        batch(s, 1, m);
      });
      EXPECT_NEAR(stage0_bubble(plan), double(p - 1) / (m + p - 1), 1e-9) << "p=" << p << " m=" << m;
    }
  }
}

TEST(PipelineBubble, GPipeMatchesClosedForm) {
  const CompiledPlan plan = compile("tiny-gpt-deep", [](PlanSpec& s) {
    s.pipeline_model_parallel_size = 4;
    s.schedule = PipelineSchedule::GPipe;
    batch(s, 1, 8);
  });
  EXPECT_NEAR(stage0_bubble(plan), 3.0 / 11.0, 1e-9);
}

TEST(PipelineBubble, InterleavingDividesTheBubbleByChunks) {
  const CompiledPlan plan = compile("tiny-gpt-deep", [](PlanSpec& s) {
    s.pipeline_model_parallel_size = 4;
    s.schedule = PipelineSchedule::Interleaved1F1B;
    s.virtual_pipeline_model_parallel_size = 2;
    batch(s, 1, 8);
  });
  const double p = 4, m = 8, v = 2;
  EXPECT_NEAR(stage0_bubble(plan), (p - 1) / v / (m + (p - 1) / v), 1e-9);
  EXPECT_NEAR(summarize(plan).ideal_bubble_fraction, (p - 1) / v / (m + (p - 1) / v), 1e-12);
}

TEST(PipelineBubble, ZeroBubbleReachesTheZbH1Bound) {
  auto with = [](PipelineSchedule s) {
    return compile("tiny-gpt-deep", [s](PlanSpec& p) {
      p.pipeline_model_parallel_size = 4;
      p.schedule = s;
      batch(p, 1, 8);
    });
  };
  const CompiledPlan zb = with(PipelineSchedule::ZeroBubble);
  // Qi et al. 2023: ZB-H1 takes m (F + B + W) + (p - 1)(F + B - W) with per-micro-batch pass times
  // F, B (input gradients) and W (weight gradients); 1F1B takes (m + p - 1)(F + B + W).
  double f = 0, b = 0, w = 0;
  for (const Op& op : zb.roles[0].ops) {
    const double c = layer_compute_cost(zb.roles[0], op);
    if (op.phase == Phase::Forward) f += c;
    if (op.phase == Phase::BackwardInput) b += c;
    if (op.phase == Phase::BackwardWeight) w += c;
  }
  const double p = 4, m = 8;
  f /= m, b /= m, w /= m;
  ASSERT_GT(w, 0);
  const double bound = (p - 1) * (f + b - w) / (m * (f + b + w) + (p - 1) * (f + b - w));
  EXPECT_LE(stage0_bubble(zb), bound + 1e-9);
  EXPECT_LT(stage0_bubble(zb), stage0_bubble(with(PipelineSchedule::OneFOneB)));
}

TEST(DryRun, DetectsADeadlock) {
  CompiledPlan plan = compile("tiny-gpt-deep", [](PlanSpec& p) {
    p.pipeline_model_parallel_size = 2;
    batch(p, 1, 2);
  });
  // Make the first op wait on the last: a cycle no execution can satisfy.
  Program& prog = plan.roles[1];
  prog.ops[0].deps_begin = static_cast<std::uint32_t>(prog.deps.size());
  prog.deps.push_back(static_cast<std::uint32_t>(prog.ops.size() - 1));
  prog.ops[0].deps_end = static_cast<std::uint32_t>(prog.deps.size());
  // deps must point backwards for the engine; the dry run must still catch the cycle.
  const DryRunResult r = dry_run(plan);
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.error.find("deadlock"), std::string::npos) << r.error;
}

TEST(DryRun, DetectsMismatchedSendAndReceive) {
  CompiledPlan plan = compile("tiny-gpt-deep", [](PlanSpec& p) {
    p.pipeline_model_parallel_size = 2;
    batch(p, 1, 4);
  });
  for (Op& op : plan.roles[1].ops)
    if (op.kind == OpKind::Recv && op.micro_batch == 1) op.micro_batch = 2;
  const DryRunResult r = dry_run(plan);
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.error.find("mismatch"), std::string::npos) << r.error;
}

TEST(DryRun, DetectsMismatchedCollectives) {
  CompiledPlan plan = compile("tiny-gpt", [](PlanSpec& p) {
    p.tensor_model_parallel_size = 2;
    batch(p, 1, 1);
  });
  plan.roles.push_back(plan.roles[0]);
  plan.ranks[1].role = 1;
  for (Op& op : plan.roles[1].ops)
    if (op.kind == OpKind::AllReduce && op.group == GroupKind::TP) {
      op.comm_bytes += 2;
      break;
    }
  plan.schedules.push_back(plan.schedules[0]);
  const DryRunResult r = dry_run(plan);
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.error.find("collective mismatch"), std::string::npos) << r.error;
}

TEST(Compiler, IsDeterministic) {
  auto make = [] {
    return compile("tiny-moe", [](PlanSpec& p) {
      p.tensor_model_parallel_size = 2;
      p.sequence_parallel = true;
      p.data_parallel_size = 2;
      p.expert_model_parallel_size = 2;
      p.pipeline_model_parallel_size = 2;
      p.schedule = PipelineSchedule::ZeroBubble;
      batch(p, 1, 4);
    });
  };
  const CompiledPlan a = make(), b = make();
  ASSERT_EQ(a.roles.size(), b.roles.size());
  for (std::size_t r = 0; r < a.roles.size(); ++r) {
    ASSERT_EQ(a.roles[r].ops.size(), b.roles[r].ops.size());
    for (std::size_t i = 0; i < a.roles[r].ops.size(); ++i) {
      const Op &x = a.roles[r].ops[i], &y = b.roles[r].ops[i];
      ASSERT_EQ(std::tie(x.kind, x.phase, x.stream, x.m, x.n, x.k, x.comm_bytes, x.deps_begin, x.deps_end),
                std::tie(y.kind, y.phase, y.stream, y.m, y.n, y.k, y.comm_bytes, y.deps_begin, y.deps_end));
    }
    EXPECT_EQ(a.roles[r].deps, b.roles[r].deps);
  }
}

}  // namespace
}  // namespace px
