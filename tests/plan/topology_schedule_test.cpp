// Process groups follow Megatron's tp-cp-ep-dp-pp order; pipeline schedules are complete, ordered
// and hold the activations the literature says they do.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>

#include "engine/plan/schedule.hpp"
#include "engine/plan/topology.hpp"

namespace px {
namespace {

PlanSpec grid(int tp, int cp, int ep, int dp, int pp) {
  PlanSpec p;
  p.tensor_model_parallel_size = tp;
  p.context_parallel_size = cp;
  p.expert_model_parallel_size = ep;
  p.data_parallel_size = dp;
  p.pipeline_model_parallel_size = pp;
  return p;
}

TEST(Topology, MegatronRankOrder) {
  const Topology t(grid(2, 1, 2, 4, 2));
  ASSERT_EQ(t.world_size(), 16);
  EXPECT_EQ(t.members(GroupKind::TP, t.group_id(GroupKind::TP, 0)), (std::vector<int>{0, 1}));
  EXPECT_EQ(t.members(GroupKind::DP, t.group_id(GroupKind::DP, 0)), (std::vector<int>{0, 2, 4, 6}));
  EXPECT_EQ(t.members(GroupKind::EP, t.group_id(GroupKind::EP, 0)), (std::vector<int>{0, 2}));
  EXPECT_EQ(t.members(GroupKind::ExpertDP, t.group_id(GroupKind::ExpertDP, 0)), (std::vector<int>{0, 1, 4, 5}));
  EXPECT_EQ(t.members(GroupKind::PP, t.group_id(GroupKind::PP, 3)), (std::vector<int>{3, 11}));
  EXPECT_EQ(t.members(GroupKind::Embedding, t.group_id(GroupKind::Embedding, 5)), (std::vector<int>{5, 13}));
  EXPECT_EQ(t.ring_neighbour(GroupKind::PP, 11, 1), 3);
  const RankCoord c = t.coord(13);
  EXPECT_EQ(c.tp, 1);
  EXPECT_EQ(c.ep, 0);
  EXPECT_EQ(c.edp, 1);
  EXPECT_EQ(c.pp, 1);
  EXPECT_EQ(t.rank(c), 13);
}

TEST(Topology, EveryRankInExactlyOneInstanceOfEachGroup) {
  const Topology t(grid(2, 2, 2, 2, 3));
  for (GroupKind g : {GroupKind::TP, GroupKind::CP, GroupKind::EP, GroupKind::DP, GroupKind::ExpertDP, GroupKind::PP}) {
    std::vector<int> seen(static_cast<std::size_t>(t.world_size()), 0);
    for (int id = 0; id < t.num_groups(g); ++id) {
      const auto m = t.members(g, id);
      ASSERT_EQ(static_cast<int>(m.size()), t.size(g)) << to_string(g);
      for (std::size_t i = 0; i < m.size(); ++i) {
        ++seen[static_cast<std::size_t>(m[i])];
        EXPECT_EQ(t.group_id(g, m[i]), id);
        EXPECT_EQ(t.group_index(g, m[i]), static_cast<int>(i));
      }
    }
    for (int s : seen) EXPECT_EQ(s, 1) << to_string(g);
  }
  EXPECT_EQ(t.size(GroupKind::DP), 4);         // cp x dp
  EXPECT_EQ(t.size(GroupKind::ExpertDP), 4);   // tp x cp x dp/ep
}

void expect_complete(const std::vector<PipelinePass>& passes, int m, int v, bool split) {
  std::map<std::pair<int, int>, int> f, b, w;
  for (std::size_t i = 0; i < passes.size(); ++i) {
    const auto& x = passes[i];
    const auto key = std::make_pair(x.micro_batch, x.chunk);
    if (x.kind == PassKind::F) f[key] = static_cast<int>(i);
    if (x.kind == PassKind::B) {
      ASSERT_TRUE(f.count(key)) << "backward before forward of micro-batch " << x.micro_batch;
      b[key] = static_cast<int>(i);
    }
    if (x.kind == PassKind::W) {
      ASSERT_TRUE(b.count(key)) << "weight pass before backward of micro-batch " << x.micro_batch;
      w[key] = static_cast<int>(i);
    }
  }
  EXPECT_EQ(static_cast<int>(f.size()), m * v);
  EXPECT_EQ(static_cast<int>(b.size()), m * v);
  EXPECT_EQ(static_cast<int>(w.size()), split ? m * v : 0);
}

TEST(Schedule, EveryScheduleRunsEachPassOnceInOrder) {
  for (int p : {1, 2, 4, 8}) {
    for (int m : {1, 3, 8, 16}) {
      for (int s = 0; s < p; ++s) {
        expect_complete(pipeline_schedule(PipelineSchedule::GPipe, s, p, m, 1), m, 1, false);
        expect_complete(pipeline_schedule(PipelineSchedule::OneFOneB, s, p, m, 1), m, 1, false);
        expect_complete(pipeline_schedule(PipelineSchedule::ZeroBubble, s, p, m, 1), m, 1, true);
        if (p >= 2 && m % p == 0)
          for (int v : {2, 3}) expect_complete(pipeline_schedule(PipelineSchedule::Interleaved1F1B, s, p, m, v), m, v, false);
      }
    }
  }
}

TEST(Schedule, ActivationsInFlightMatchTheLiterature) {
  const int p = 4, m = 8, v = 2;
  for (int s = 0; s < p; ++s) {
    EXPECT_EQ(max_in_flight(pipeline_schedule(PipelineSchedule::GPipe, s, p, m, 1)), m);
    EXPECT_EQ(max_in_flight(pipeline_schedule(PipelineSchedule::OneFOneB, s, p, m, 1)), std::min(p - s, m));
    EXPECT_LE(max_in_flight(pipeline_schedule(PipelineSchedule::ZeroBubble, s, p, m, 1)), p - s);
    // Megatron's interleaved warm-up: (p - s - 1) * 2 + (v - 1) * p chunk forwards, then one more.
    EXPECT_EQ(max_in_flight(pipeline_schedule(PipelineSchedule::Interleaved1F1B, s, p, m, v)),
              std::min((p - s - 1) * 2 + (v - 1) * p + 1, m * v));
  }
}

TEST(Schedule, ZeroBubbleDefersWeightPassesIntoTheCooldown) {
  const auto passes = pipeline_schedule(PipelineSchedule::ZeroBubble, 0, 4, 8, 1);
  // The first stage's last passes would idle under 1F1B; here W passes fill them.
  const auto last_b = std::find_if(passes.rbegin(), passes.rend(), [](const PipelinePass& x) { return x.kind == PassKind::B; });
  EXPECT_NE(last_b, passes.rbegin()) << "no W pass after the last B";
  EXPECT_EQ(passes.back().kind, PassKind::W);
}

}  // namespace
}  // namespace px
