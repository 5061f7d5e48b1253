// The replay against closed forms on an uncontended platform: a ring all-reduce takes 2(n-1)
// point-to-point steps of S/n, a small one the binary tree's 2 log2(n) hops, a hierarchical one its
// node and cross-node rings, a direct all-to-all
// shares each GPU's link among its n-1 flows,
// and a pipeline of known stage times has the 1F1B bubble (p-1)/(m+p-1). Then: the same inputs
// give the same output, bit for bit, and a whole compiled plan replays on an H100 node.
#include <gtest/gtest.h>

#include <functional>
#include <vector>

#include "engine/plan/compiler.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "engine/trace/chrome_trace.hpp"
#include "simulator/replay.hpp"

namespace px::sim {
namespace {

const SpecCatalog& catalog() {
  static const SpecCatalog cat(PX_DATASETS_DIR);
  return cat;
}

CompiledPlan compile(const char* model, const std::function<void(PlanSpec&)>& set) {
  const ModelSpec m = catalog().model(model);
  PlanSpec p;
  set(p);
  return compile_plan(m, resolve_plan(p, m, nullptr));
}

// Every role's program replaced by one comm op (the topology and groups stay the plan's).
CompiledPlan with_single_op(CompiledPlan plan, OpKind kind, GroupKind group, Stream stream, std::int64_t bytes, std::int8_t peer = 0) {
  for (Program& p : plan.roles) {
    Program one;
    one.pp_stage = p.pp_stage;
    one.names = {"op"};
    Op op;
    op.kind = kind;
    op.group = group;
    op.stream = stream;
    op.comm_bytes = bytes;
    op.peer = peer;
    one.ops.push_back(op);
    p = std::move(one);
  }
  return plan;
}

const ClusterSpec& h100_node() {
  static const ClusterSpec c = catalog().cluster("h100-8");
  return c;
}

// One uncontended message of `bytes` from GPU 0 to GPU 1 of the node.
double one_flow(std::int64_t bytes) {
  CompiledPlan plan = compile("tiny-gpt-deep", [](PlanSpec& p) {
    p.pipeline_model_parallel_size = 2;
    p.global_batch_size = 2;
  });
  plan = with_single_op(plan, OpKind::Send, GroupKind::PP, Stream::PipeSendNext, bytes, 1);
  Op& recv = plan.roles[1].ops[0];
  recv.kind = OpKind::Recv;
  recv.peer = -1;
  recv.stream = Stream::PipeRecvPrev;
  return simulate(plan, h100_node()).iteration_s;
}

CompiledPlan dp8(OpKind kind, std::int64_t bytes) {
  const CompiledPlan plan = compile("tiny-gpt", [](PlanSpec& p) {
    p.data_parallel_size = 8;
    p.global_batch_size = 8;
  });
  return with_single_op(plan, kind, GroupKind::DP, Stream::DataComm, bytes);
}

TEST(Replay, RingAllReduceTakesTwoNMinusOneSteps) {
  const std::int64_t bytes = 256 << 20, n = 8;
  const double expected = 2 * (n - 1) * one_flow(bytes / n);
  EXPECT_NEAR(simulate(dp8(OpKind::AllReduce, bytes), h100_node()).iteration_s / expected, 1.0, 0.01);
  EXPECT_NEAR(simulate(dp8(OpKind::AllGather, bytes), h100_node()).iteration_s / ((n - 1) * one_flow(bytes / n)), 1.0, 0.01);
}

TEST(Replay, SmallAllReducesTakeTheTreeLargeOnesTheRing) {
  const std::int64_t n = 8;
  // 8 bytes: latency-bound, the tree's 2 log2(8) = 6 hops beat the ring's 14 steps.
  EXPECT_NEAR(simulate(dp8(OpKind::AllReduce, 8), h100_node()).iteration_s / (6 * one_flow(8)), 1.0, 0.01);
  SimOptions ring;
  ring.all_reduce = AllReduceAlgorithm::Ring;
  EXPECT_NEAR(simulate(dp8(OpKind::AllReduce, 8), h100_node(), ring).iteration_s / (2 * (n - 1) * one_flow(1)), 1.0, 0.01);
  // 256 MiB through the tree: every hop moves S twice through one link.
  SimOptions tree;
  tree.all_reduce = AllReduceAlgorithm::Tree;
  const std::int64_t big = 256 << 20;
  EXPECT_NEAR(simulate(dp8(OpKind::AllReduce, big), h100_node(), tree).iteration_s / (6 * one_flow(2 * big)), 1.0, 0.01);
}

// Every GPU of node 0 sends `bytes` to the same GPU of node 1, eight messages at once, one per
// rail (rails share no link).
CompiledPlan cross_node_flows(std::int64_t bytes) {
  CompiledPlan plan = compile("tiny-gpt-deep", [](PlanSpec& p) {
    p.pipeline_model_parallel_size = 2;
    p.data_parallel_size = 8;
    p.global_batch_size = 8;
  });
  plan = with_single_op(plan, OpKind::Send, GroupKind::PP, Stream::PipeSendNext, bytes, 1);
  Op& recv = plan.roles[1].ops[0];
  recv.kind = OpKind::Recv;
  recv.peer = -1;
  recv.stream = Stream::PipeRecvPrev;
  return plan;
}
double one_cross_node_flow(std::int64_t bytes) { return simulate(cross_node_flows(bytes), catalog().cluster("h100-64")).iteration_s; }

TEST(Replay, DegradedAndFailedLinksSlowTheFlowsThatCrossThem) {
  const std::int64_t big = std::int64_t{1} << 30;  // bandwidth-bound: latency is < 0.01% of it
  const CompiledPlan plan = cross_node_flows(big);
  const ClusterSpec cluster = catalog().cluster("h100-64");
  const double base = simulate(plan, cluster).iteration_s;
  SimOptions half;
  half.links = {{"node0-nic0", 0.5}};
  EXPECT_NEAR(simulate(plan, cluster, half).iteration_s / base, 2.0, 0.01);
  // GPU 0's NIC fails: its traffic leaves through NIC 1, which GPU 1's flow already fills.
  SimOptions failed;
  failed.links = {{"node0-nic0", 0}};
  EXPECT_NEAR(simulate(plan, cluster, failed).iteration_s / base, 2.0, 0.01);
  // A degraded NVLink is off these routes; an upgraded NIC everywhere halves the time.
  SimOptions nvlink;
  nvlink.links = {{"gpu0-nvlink", 0.1}};
  EXPECT_DOUBLE_EQ(simulate(plan, cluster, nvlink).iteration_s, base);
  SimOptions faster;
  for (int k = 0; k < 8; ++k) faster.links.push_back({"node1-nic" + std::to_string(k) + "-down", 2.0});
  for (int k = 0; k < 8; ++k) faster.links.push_back({"node0-nic" + std::to_string(k) + "-up", 2.0});
  EXPECT_NEAR(simulate(plan, cluster, faster).iteration_s / base, 0.5, 0.01);
  // Bad what-ifs are refused with the link's name.
  for (const std::vector<LinkChange>& bad : {std::vector<LinkChange>{{"node0-nic9", 0.5}}, std::vector<LinkChange>{{"gpu0-nvlink", 0}},
                                             std::vector<LinkChange>{{"node0-nic0", -1}}}) {
    SimOptions o;
    o.links = bad;
    try {
      simulate(plan, cluster, o);
      ADD_FAILURE() << bad[0].link << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad[0].link), std::string::npos) << e.what();
    }
  }
  SimOptions all;
  for (int k = 0; k < 8; ++k) all.links.push_back({"node0-nic" + std::to_string(k), 0});
  EXPECT_THROW(simulate(plan, cluster, all), Error);
}

TEST(Replay, HierarchicalAllReduceIsReduceScatterOnTheNodeRingAcrossNodesAllGatherOnTheNode) {
  // dp 16 over two nodes of eight: L = 8 members per node, N = 2 nodes.
  const CompiledPlan plan = with_single_op(compile("tiny-gpt", [](PlanSpec& p) {
                                             p.data_parallel_size = 16;
                                             p.global_batch_size = 16;
                                           }),
                                           OpKind::AllReduce, GroupKind::DP, Stream::DataComm, 256 << 20);
  const std::int64_t S = 256 << 20, L = 8, N = 2;
  const double expected = 2 * (L - 1) * one_flow(S / L) + 2 * (N - 1) * one_cross_node_flow(S / (L * N));
  const ClusterSpec cluster = catalog().cluster("h100-64");
  SimOptions hier, ring;
  hier.all_reduce = AllReduceAlgorithm::Hierarchical;
  ring.all_reduce = AllReduceAlgorithm::Ring;
  const double h = simulate(plan, cluster, hier).iteration_s;
  EXPECT_NEAR(h / expected, 1.0, 0.01);
  // The flat ring's slowest hop is the NIC, which it crosses with 2(n-1) steps of S/n; the tuner
  // sees that and takes the hierarchy.
  const double r = simulate(plan, cluster, ring).iteration_s;
  EXPECT_NEAR(r / (2 * 15 * one_cross_node_flow(S / 16)), 1.0, 0.01);
  EXPECT_LT(h, 0.5 * r);
  EXPECT_DOUBLE_EQ(simulate(plan, cluster).iteration_s, h);
}

TEST(Replay, DirectAllToAllSharesEachLinkAmongItsFlows) {
  const std::int64_t bytes = 64 << 20, n = 8;
  // n-1 flows of S/n leave and reach each GPU at once: one flow's latency, (n-1) S/n of bandwidth.
  EXPECT_NEAR(simulate(dp8(OpKind::AllToAll, bytes), h100_node()).iteration_s / one_flow((n - 1) * bytes / n), 1.0, 0.01);
}

TEST(Replay, PipelineOfKnownStageTimesHasTheOneFOneBBubble) {
  const CompiledPlan plan = compile("tiny-gpt-deep", [](PlanSpec& p) {
    p.pipeline_model_parallel_size = 4;
    p.global_batch_size = 8;
  });
  SimOptions o;
  // 1 ms per layer compute op, nothing elsewhere: every stage's passes take equal time.
  o.op_cost = [](const Program&, const Op& op) { return op.layer != kNone && op.stream == Stream::Compute ? 1e-3 : 0.0; };
  const SimResult r = simulate(plan, h100_node(), o);
  const double p = 4, m = 8;
  EXPECT_NEAR(1.0 - r.breakdown.compute_s / r.iteration_s, (p - 1) / (m + p - 1), 0.01 * (p - 1) / (m + p - 1));
  EXPECT_GT(r.breakdown.bubble_s, 0.0);
}

TEST(Replay, LayerTimesAreTheSpansOfOneLayersForwardAndBackwardOps) {
  const CompiledPlan plan = compile("tiny-gpt", [](PlanSpec& p) {
    p.global_batch_size = 4;
    p.micro_batch_size = 2;
    p.recompute = Recompute::Full;
  });
  SimOptions o;
  o.op_cost = [](const Program&, const Op& op) { return op.layer != kNone && op.stream == Stream::Compute ? 1e-3 : 0.0; };
  // Back-to-back 1 ms ops: a layer's pass lasts 1 ms per compute op of its (layer 0, micro-batch 0).
  double forward = 0, backward = 0;
  for (const Op& op : plan.roles[0].ops) {
    if (op.layer != 0 || op.micro_batch != 0 || op.stream != Stream::Compute) continue;
    if (op.phase == Phase::Forward) forward += 1e-3;
    if (op.phase == Phase::Backward || op.phase == Phase::Recompute) backward += 1e-3;
  }
  ASSERT_GT(forward, 0.0);
  const SimResult r = simulate(plan, h100_node(), o);
  EXPECT_NEAR(r.layer.forward_s, forward, 1e-9);
  EXPECT_NEAR(r.layer.backward_s, backward, 1e-9);  // the recompute's forward ops included
  EXPECT_GT(r.layer.backward_s, r.layer.forward_s);
}

// A hand-made op and the ops (indices into its program) it must wait for besides its stream's.
struct HandOp {
  Op op;
  std::vector<std::uint32_t> deps;
};

// Replaces every role's program by the ops `make` gives for its stage.
void replace_programs(CompiledPlan& plan, const std::function<std::vector<HandOp>(int stage)>& make) {
  for (Program& prog : plan.roles) {
    Program p;
    p.pp_stage = prog.pp_stage;
    p.names = {"op"};
    for (HandOp& h : make(prog.pp_stage)) {
      h.op.deps_begin = static_cast<std::uint32_t>(p.deps.size());
      p.deps.insert(p.deps.end(), h.deps.begin(), h.deps.end());
      h.op.deps_end = static_cast<std::uint32_t>(p.deps.size());
      p.ops.push_back(h.op);
    }
    prog = std::move(p);
  }
}

TEST(Replay, InOrderIssueProgressesCommunicationOnlyBetweenTheHostsOps) {
  // Each of two data-parallel ranks posts a small all-reduce, runs a compute op, then one that
  // needs the all-reduce. Rank 0's first op is five times slower. GPU-style streams finish the
  // all-reduce at once, so rank 1 ends after 2 c; under in-order issue (the CPU engine's MPI) it
  // completes only when rank 0's host next tests it, after 5 c, so rank 1 ends at 6 c.
  CompiledPlan plan = compile("tiny-gpt", [](PlanSpec& p) {
    p.data_parallel_size = 2;
    p.global_batch_size = 2;
  });
  replace_programs(plan, [](int) {
    Op reduce;
    reduce.kind = OpKind::AllReduce;
    reduce.group = GroupKind::DP;
    reduce.stream = Stream::DataComm;
    reduce.comm_bytes = 1024;
    Op compute;
    compute.kind = OpKind::Gemm;
    compute.layer = 0;
    return std::vector<HandOp>{{reduce, {}}, {compute, {}}, {compute, {0}}};
  });
  const double c = 1e-3;
  SimOptions o;
  o.op_cost = [c](const Program&, const Op&) { return c; };
  o.slowdown = {{0, 5.0}};
  SimOptions cpu = o;
  cpu.in_order_issue = true;
  // Rank 1's second op waits for the all-reduce; rank 0's factor slows its own ops only.
  EXPECT_NEAR(simulate(plan, h100_node(), o).rank_end_s[1], 2 * c, 0.01 * c);
  EXPECT_NEAR(simulate(plan, h100_node(), cpu).rank_end_s[1], 6 * c, 0.01 * c);
}

TEST(Replay, InOrderIssueEndsAMessageAtTheReceiversProgressAndItsSendAtTheSenders) {
  // Stage 0 posts a message to stage 1 and runs a 5 c compute op; stage 1 waits for the message,
  // then computes for c. The message is pushed when posted (Open MPI's shared-memory transport):
  // the receive ends when it has arrived, at once, so stage 1 ends after c, not after stage 0's
  // op; the send ends at stage 0's next test, after its op.
  CompiledPlan plan = compile("tiny-gpt-deep", [](PlanSpec& p) {
    p.pipeline_model_parallel_size = 2;
    p.global_batch_size = 2;
  });
  replace_programs(plan, [](int stage) {
    Op message;
    message.kind = stage == 0 ? OpKind::Send : OpKind::Recv;
    message.group = GroupKind::PP;
    message.peer = stage == 0 ? 1 : -1;
    message.stream = stage == 0 ? Stream::PipeSendNext : Stream::PipeRecvPrev;
    message.comm_bytes = 1024;
    Op compute;
    compute.kind = OpKind::Gemm;
    compute.layer = stage;
    return std::vector<HandOp>{{message, {}}, {compute, stage == 1 ? std::vector<std::uint32_t>{0} : std::vector<std::uint32_t>{}}};
  });
  const double c = 1e-3;
  SimOptions o;
  o.op_cost = [c](const Program& p, const Op&) { return p.pp_stage == 0 ? 5 * c : c; };
  o.in_order_issue = true;
  o.traced_ranks = {0, 1};
  const SimResult r = simulate(plan, h100_node(), o);
  EXPECT_NEAR(r.rank_end_s[1], c, 0.01 * c);
  EXPECT_NEAR(r.timings[0][0].end, 5 * c, 0.01 * c) << "the send ends at its host's next test";
  EXPECT_LT(r.timings[1][0].end, 0.01 * c) << "the receive ends once the message is there";
}

TEST(Replay, SameInputsGiveBitIdenticalOutput) {
  const CompiledPlan plan = compile("tiny-moe", [](PlanSpec& p) {
    p.tensor_model_parallel_size = 2;
    p.sequence_parallel = true;
    p.data_parallel_size = 2;
    p.expert_model_parallel_size = 2;
    p.pipeline_model_parallel_size = 2;
    p.global_batch_size = 4;
  });
  SimOptions o;
  o.traced_ranks = {0, 7};
  EXPECT_EQ(simulate(plan, h100_node(), o).to_json().dump(), simulate(plan, h100_node(), o).to_json().dump());
}

TEST(Replay, ACompiledPlanReplaysWithEveryOpTimed) {
  const CompiledPlan plan = compile("gpt2-124m", [](PlanSpec& p) {
    p.tensor_model_parallel_size = 2;
    p.pipeline_model_parallel_size = 2;
    p.data_parallel_size = 2;
    p.micro_batch_size = 4;
    p.global_batch_size = 32;
  });
  SimOptions o;
  o.traced_ranks = {0, 4};
  const SimResult r = simulate(plan, h100_node(), o);
  ASSERT_EQ(r.timings.size(), 2u);
  for (std::size_t k = 0; k < 2; ++k)
    for (const OpTiming& t : r.timings[k]) EXPECT_LE(t.start, t.end);
  EXPECT_GT(r.iteration_s, 0);
  EXPECT_GT(r.mfu, 0.05);
  EXPECT_LT(r.mfu, 0.8);
  const Breakdown& b = r.breakdown;
  EXPECT_NEAR(b.compute_s + b.exposed_comm_s + b.bubble_s + b.other_s, r.iteration_s, 1e-9 * r.iteration_s);
  // The simulated trace is a trace like the engine's.
  ChromeTrace trace(plan, {4, "nccl", h100_node().gpu.name, true});
  trace.add_iteration(0, r.timings[1]);
  const std::vector<std::string> problems = check_chrome_trace(trace.to_json());
  EXPECT_TRUE(problems.empty()) << problems.front();
}

TEST(Replay, ClosedFormTensorParallelCollectivesEqualTheirFlows) {
  // tp8 fills the node and nothing else uses its NVLink: closed forms must be what the flows give.
  const CompiledPlan plan = compile("llama3-8b", [](PlanSpec& p) {
    p.tensor_model_parallel_size = 8;
    p.seq_length = 1024;
    p.sequence_parallel = true;
    p.global_batch_size = 2;
  });
  SimOptions flows;
  flows.closed_form_exclusive_groups = false;
  const SimResult exact = simulate(plan, h100_node(), flows), fast = simulate(plan, h100_node());
  // Rings agree to rounding; the tree's closed form (the small gradient-norm all-reduce) counts two
  // children at every level, a hair slower than a tree whose last level is one child short.
  EXPECT_NEAR(fast.iteration_s / exact.iteration_s, 1.0, 1e-5);
  EXPECT_LT(fast.flows, exact.flows / 10);
}

TEST(Replay, LockstepUnitsTimeEveryOpAsOneActorPerStreamDoes) {
  // tp8 owns each node's NVLink, so each tensor-parallel group's compute streams run as one unit;
  // pipeline and gradient traffic stay flows. With a straggler inside one group, every op of a
  // rank of that group and of its pipeline peer must be timed as the flow-by-flow replay times it.
  const CompiledPlan plan = compile("llama3-8b", [](PlanSpec& p) {
    p.tensor_model_parallel_size = 8;
    p.sequence_parallel = true;
    p.pipeline_model_parallel_size = 2;
    p.data_parallel_size = 2;
    p.seq_length = 1024;
    p.global_batch_size = 8;
  });
  const ClusterSpec cluster = catalog().cluster("h100-64");
  SimOptions units;
  units.slowdown = {{3, 1.3}};
  units.traced_ranks = {3, 16 + 3};
  SimOptions flows = units;
  flows.closed_form_exclusive_groups = false;
  const SimResult fast = simulate(plan, cluster, units), exact = simulate(plan, cluster, flows);
  EXPECT_NEAR(fast.iteration_s / exact.iteration_s, 1.0, 1e-5);
  EXPECT_EQ(fast.slowest_rank / 8, exact.slowest_rank / 8);  // the straggler's group
  ASSERT_EQ(fast.timings.size(), exact.timings.size());
  for (std::size_t k = 0; k < fast.timings.size(); ++k)
    for (std::size_t i = 0; i < fast.timings[k].size(); ++i) {
      EXPECT_NEAR(fast.timings[k][i].start, exact.timings[k][i].start, 1e-5 * exact.iteration_s) << "rank " << units.traced_ranks[k] << " op " << i;
      EXPECT_NEAR(fast.timings[k][i].end, exact.timings[k][i].end, 1e-5 * exact.iteration_s) << "rank " << units.traced_ranks[k] << " op " << i;
    }
}

TEST(Replay, OneStragglerSlowsTheWholeDataParallelJob) {
  const CompiledPlan plan = compile("gpt2-124m", [](PlanSpec& p) {
    p.data_parallel_size = 8;
    p.micro_batch_size = 4;
    p.global_batch_size = 32;
  });
  SimOptions slow;
  slow.slowdown = {{5, 1.5}};
  const SimResult base = simulate(plan, h100_node()), r = simulate(plan, h100_node(), slow);
  // Everyone waits for rank 5 at the gradient all-reduce: the iteration grows by about half its
  // compute, and rank 5 is the slowest.
  EXPECT_EQ(r.slowest_rank, 5);
  EXPECT_GT(r.iteration_s, base.iteration_s + 0.4 * base.breakdown.compute_s);
  EXPECT_LT(r.iteration_s, base.iteration_s + 0.6 * base.breakdown.compute_s + base.breakdown.exposed_comm_s);
}

TEST(Replay, FoldedDataParallelReplicasAgreeWithTheUnfoldedReplay) {
  // tp8 fills each node, so replicas meet only in their gradient rings across the rails, and the
  // tensor-parallel group owns its NVLink, so its member 0 alone stands for it.
  const SpecCatalog& cat = catalog();
  const ClusterSpec cluster = cat.cluster("h100-64");
  for (int dp : {2, 4}) {
    const CompiledPlan plan = compile("llama3-8b", [dp](PlanSpec& p) {
      p.tensor_model_parallel_size = 8;
      p.sequence_parallel = true;
      p.pipeline_model_parallel_size = 2;
      p.data_parallel_size = dp;
      p.seq_length = 1024;
      p.global_batch_size = 4 * dp;
    });
    SimOptions folded;
    folded.fold_data_parallel = true;
    const SimResult f = simulate(plan, cluster, folded), u = simulate(plan, cluster);
    EXPECT_NEAR(f.iteration_s / u.iteration_s, 1.0, 0.01) << "dp " << dp;
    EXPECT_LT(f.flows, u.flows);
    // Replayed: tp member 0 of each stage of replica 0 (ranks 0 and 8 * dp); the rest folded away.
    for (int r = 0; r < plan.topology.world_size(); ++r)
      EXPECT_EQ(f.rank_end_s[static_cast<std::size_t>(r)] > 0, r == 0 || r == 8 * dp) << "rank " << r;
  }
}

TEST(Replay, APlanLargerThanTheClusterIsRefused) {
  const CompiledPlan plan = compile("tiny-gpt", [](PlanSpec& p) {
    p.data_parallel_size = 16;
    p.global_batch_size = 16;
  });
  EXPECT_THROW(simulate(plan, h100_node()), Error);
}

}  // namespace
}  // namespace px::sim
