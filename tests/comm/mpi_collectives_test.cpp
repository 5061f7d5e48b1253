// MPI collectives per process group, run under mpirun: every collective's result against the value
// each member can compute alone (nccl-tests' check), groups against the plan's topology, and a
// timeout instead of a hang when a peer never answers.
#include <gtest/gtest.h>

#include <numeric>

#include "engine/comm/launch.hpp"
#include "engine/comm/mpi_comm.hpp"

namespace px {
namespace {

MpiRuntime* runtime = nullptr;

// Member r's value at index i: distinct across members and indices, exact in fp32.
float value(int r, std::size_t i) { return static_cast<float>(r * 1000 + static_cast<int>(i % 997)); }

TEST(MpiCollectives, LaunchVariablesAgreeWithMpi) {
  const LaunchInfo info = discover_launch();
  EXPECT_EQ(info.launcher, "openmpi");
  EXPECT_EQ(info.rank, runtime->world_rank());
  EXPECT_EQ(info.world_size, runtime->world_size());
}

TEST(MpiCollectives, EveryCollectiveOnTheWorld) {
  auto c = runtime->world();
  const int n = c->size(), me = c->rank();
  const std::size_t block = 1000;
  std::vector<float> buf(block * static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = value(me, i);
  // all-reduce: sum over members
  c->all_reduce(buf);
  for (std::size_t i = 0; i < buf.size(); ++i) {
    float expect = 0;
    for (int r = 0; r < n; ++r) expect += value(r, i);
    ASSERT_EQ(buf[i], expect) << i;
  }
  // reduce-scatter: my block of the sum
  std::vector<float> in(block * static_cast<std::size_t>(n)), out(block);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = value(me, i);
  c->reduce_scatter(in, out);
  for (std::size_t i = 0; i < block; ++i) {
    float expect = 0;
    for (int r = 0; r < n; ++r) expect += value(r, static_cast<std::size_t>(me) * block + i);
    ASSERT_EQ(out[i], expect);
  }
  // all-gather: member r's block at position r
  std::vector<float> mine(block), all(block * static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < block; ++i) mine[i] = value(me, i);
  c->all_gather(mine, all);
  for (int r = 0; r < n; ++r)
    for (std::size_t i = 0; i < block; ++i) ASSERT_EQ(all[static_cast<std::size_t>(r) * block + i], value(r, i));
  // all-to-all: block j of member r is value(r, j * block + i), lands at block r on member j
  std::vector<float> a2a(block * static_cast<std::size_t>(n));
  c->all_to_all(in, a2a);
  for (int r = 0; r < n; ++r)
    for (std::size_t i = 0; i < block; ++i)
      ASSERT_EQ(a2a[static_cast<std::size_t>(r) * block + i], value(r, static_cast<std::size_t>(me) * block + i));
  // all-to-all-v: member r sends r + 1 elements to everyone
  std::vector<int> sc(static_cast<std::size_t>(n), me + 1), sd(static_cast<std::size_t>(n)), rc(static_cast<std::size_t>(n)),
      rd(static_cast<std::size_t>(n));
  for (int j = 0; j < n; ++j) {
    sd[static_cast<std::size_t>(j)] = j * (me + 1);
    rc[static_cast<std::size_t>(j)] = j + 1;
    rd[static_cast<std::size_t>(j)] = j == 0 ? 0 : rd[static_cast<std::size_t>(j - 1)] + rc[static_cast<std::size_t>(j - 1)];
  }
  std::vector<float> vin(static_cast<std::size_t>(n * (me + 1))), vout(static_cast<std::size_t>(n * (n + 1) / 2));
  for (std::size_t i = 0; i < vin.size(); ++i) vin[i] = value(me, i);
  c->all_to_all_v(vin, sc, sd, vout, rc, rd);
  for (int r = 0; r < n; ++r)
    for (int i = 0; i <= r; ++i)
      ASSERT_EQ(vout[static_cast<std::size_t>(rd[static_cast<std::size_t>(r)] + i)], value(r, static_cast<std::size_t>(me * (r + 1) + i)));
  // broadcast from the last member
  std::vector<float> b(block, static_cast<float>(me));
  c->broadcast(b, n - 1);
  for (float x : b) ASSERT_EQ(x, static_cast<float>(n - 1));
  // ring: send to the next member, receive from the previous
  std::vector<float> ring_out(block, static_cast<float>(me)), ring_in(block, -1);
  c->send_recv(ring_out, (me + 1) % n, ring_in, (me + n - 1) % n);
  for (float x : ring_in) ASSERT_EQ(x, static_cast<float>((me + n - 1) % n));
}

TEST(MpiCollectives, SeveralInFlightFinishInAnyOrder) {
  auto c = runtime->world();
  const int n = c->size(), me = c->rank();
  std::vector<float> a(64, static_cast<float>(me)), mine(8, static_cast<float>(me)), all(8 * static_cast<std::size_t>(n));
  std::vector<float> from_prev(16, -1), to_next(16, static_cast<float>(me));
  // Receive first on even ranks, send first on odd ones: in flight together, no order deadlocks.
  std::vector<CommHandlePtr> h;
  if (me % 2 == 0) h.push_back(c->start_recv(from_prev, (me + n - 1) % n));
  h.push_back(c->start_send(to_next, (me + 1) % n));
  if (me % 2 == 1) h.push_back(c->start_recv(from_prev, (me + n - 1) % n));
  auto ar = c->start_all_reduce(a);
  auto ag = c->start_all_gather(mine, all);
  ag->wait();
  ar->wait();
  for (auto it = h.rbegin(); it != h.rend(); ++it) (*it)->wait();
  for (float x : a) ASSERT_EQ(x, static_cast<float>(n * (n - 1) / 2));
  for (int r = 0; r < n; ++r) ASSERT_EQ(all[static_cast<std::size_t>(r) * 8], static_cast<float>(r));
  for (float x : from_prev) ASSERT_EQ(x, static_cast<float>((me + n - 1) % n));
}

TEST(MpiCollectives, GroupsFollowThePlanTopology) {
  const int n = runtime->world_size();
  ASSERT_EQ(n % 8, 0) << "run with a multiple of 8 ranks";
  PlanSpec plan;
  plan.tensor_model_parallel_size = 2;
  plan.pipeline_model_parallel_size = 2;
  plan.data_parallel_size = n / 4;
  plan.expert_model_parallel_size = 2;
  const Topology topo(plan);
  const int me = runtime->world_rank();
  const MpiGroups groups = make_mpi_groups(topo, me);
  for (GroupKind g : {GroupKind::TP, GroupKind::DP, GroupKind::EP, GroupKind::ExpertDP, GroupKind::PP, GroupKind::Embedding}) {
    Communicator* c = groups[g];
    ASSERT_NE(c, nullptr) << to_string(g);
    const auto members = topo.members(g, topo.group_id(g, me));
    ASSERT_EQ(c->size(), static_cast<int>(members.size())) << to_string(g);
    EXPECT_EQ(c->rank(), topo.group_index(g, me));
    // Gather world ranks over the group: they must be the topology's members, in order.
    std::vector<float> mine{static_cast<float>(me)}, all(members.size());
    c->all_gather(mine, all);
    for (std::size_t i = 0; i < members.size(); ++i) EXPECT_EQ(static_cast<int>(all[i]), members[i]) << to_string(g);
  }
}

TEST(MpiCollectives, APeerThatNeverAnswersIsATimeout) {
  auto c = runtime->world();
  c->set_timeout(std::chrono::milliseconds(300));
  if (c->rank() == 0) {
    std::vector<float> buf(4);
    try {
      c->recv(buf, 1);  // member 1 never sends
      FAIL() << "no timeout";
    } catch (const CommTimeout& e) {
      EXPECT_NE(std::string(e.what()).find("recv from member 1 on group world"), std::string::npos) << e.what();
    }
  }
  c->set_timeout(std::chrono::milliseconds(60000));
  c->barrier();
}

}  // namespace
}  // namespace px

int main(int argc, char** argv) {
  px::MpiRuntime mpi(&argc, &argv);
  px::runtime = &mpi;
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi.world_rank() != 0) {  // one report, from rank 0; failures still set every rank's exit code
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  return RUN_ALL_TESTS();
}
