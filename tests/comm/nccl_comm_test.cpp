// NCCL collectives per process group over device buffers, run under mpirun (one GPU per rank):
// every collective's result against the closed form each member computes alone (as the MPI tests
// check), the comm stream's ordering against the compute stream, deferred sends/receives,
// channels, groups against the plan's topology, and a timeout (with the communicator aborted)
// instead of a hang.
// Without a GPU, or with fewer GPUs than ranks on a machine, every test skips.
#include <gtest/gtest.h>


#include <atomic>
#include <chrono>
#include <thread>

#include "engine/backends/cuda/device_buffer.hpp"
#include "engine/comm/launch.hpp"
#include "engine/comm/nccl_comm.hpp"
#include "tests/comm/device_per_rank.hpp"
#include "tests/cuda/gpu_test.hpp"

namespace px {
namespace {

using cuda::DeviceBuffer;
using bf16 = NcclCommunicator::bf16;

MpiRuntime* runtime = nullptr;

// Member r's value at index i: distinct across members and indices, exact in fp32 (sums too).
float value(int r, std::size_t i) { return static_cast<float>(r * 1000 + static_cast<int>(i % 997)); }

std::size_t sz(int n) { return static_cast<std::size_t>(n); }

std::unique_ptr<NcclCommunicator> nccl_world() {
  auto host = runtime->world();
  return NcclCommunicator::create(*host);
}

DeviceBuffer<float> on_device(const std::vector<float>& host) { return DeviceBuffer<float>(std::span<const float>(host)); }
std::span<float> span(DeviceBuffer<float>& d) { return {d.data(), d.size()}; }
std::span<bf16> span(DeviceBuffer<bf16>& d) { return {d.data(), d.size()}; }

TEST(NcclComm, EveryCollectiveOnTheWorld) {
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());
  auto c = nccl_world();
  const int n = c->size(), me = c->rank();
  EXPECT_EQ(n, runtime->world_size());
  EXPECT_EQ(me, runtime->world_rank());
  EXPECT_EQ(c->name(), "world");
  const std::size_t block = 1000;

  std::vector<float> mine_full(block * sz(n));
  for (std::size_t i = 0; i < mine_full.size(); ++i) mine_full[i] = value(me, i);

  {  // all-reduce: the sum over members
    auto buf = on_device(mine_full);
    c->all_reduce(span(buf));
    const auto got = buf.download();
    for (std::size_t i = 0; i < got.size(); ++i) {
      float expect = 0;
      for (int r = 0; r < n; ++r) expect += value(r, i);
      ASSERT_EQ(got[i], expect) << i;
    }
  }
  {  // all-reduce max: the last member's value everywhere
    auto buf = on_device(mine_full);
    c->start_all_reduce_max(span(buf))->wait();
    const auto got = buf.download();
    for (std::size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], value(n - 1, i)) << i;
  }
  {  // reduce-scatter: my block of the sum
    auto in = on_device(mine_full);
    DeviceBuffer<float> out(block);
    c->reduce_scatter(span(in), span(out));
    const auto got = out.download();
    for (std::size_t i = 0; i < block; ++i) {
      float expect = 0;
      for (int r = 0; r < n; ++r) expect += value(r, sz(me) * block + i);
      ASSERT_EQ(got[i], expect) << i;
    }
  }
  {  // all-gather: member r's block at position r
    std::vector<float> mine(block);
    for (std::size_t i = 0; i < block; ++i) mine[i] = value(me, i);
    auto in = on_device(mine);
    DeviceBuffer<float> all(block * sz(n));
    c->all_gather(span(in), span(all));
    const auto got = all.download();
    for (int r = 0; r < n; ++r)
      for (std::size_t i = 0; i < block; ++i) ASSERT_EQ(got[sz(r) * block + i], value(r, i));
  }
  {  // all-to-all: block j of member r is value(r, j * block + i) and lands at block r on member j
    auto in = on_device(mine_full);
    DeviceBuffer<float> out(block * sz(n));
    c->all_to_all(span(in), span(out));
    const auto got = out.download();
    for (int r = 0; r < n; ++r)
      for (std::size_t i = 0; i < block; ++i) ASSERT_EQ(got[sz(r) * block + i], value(r, sz(me) * block + i));
  }
  {  // all-to-all-v: member r sends r + 1 elements to everyone
    std::vector<int> sc(sz(n), me + 1), sd(sz(n)), rc(sz(n)), rd(sz(n));
    for (int j = 0; j < n; ++j) {
      sd[sz(j)] = j * (me + 1);
      rc[sz(j)] = j + 1;
      rd[sz(j)] = j == 0 ? 0 : rd[sz(j - 1)] + rc[sz(j - 1)];
    }
    std::vector<float> vin(sz(n * (me + 1)));
    for (std::size_t i = 0; i < vin.size(); ++i) vin[i] = value(me, i);
    auto in = on_device(vin);
    DeviceBuffer<float> out(sz(n * (n + 1) / 2));
    c->all_to_all_v(span(in), sc, sd, span(out), rc, rd);
    const auto got = out.download();
    for (int r = 0; r < n; ++r)
      for (int i = 0; i <= r; ++i) ASSERT_EQ(got[sz(rd[sz(r)] + i)], value(r, sz(me * (r + 1) + i)));
  }
  {  // broadcast from the last member
    auto b = on_device(std::vector<float>(block, static_cast<float>(me)));
    c->broadcast(span(b), n - 1);
    for (float x : b.download()) ASSERT_EQ(x, static_cast<float>(n - 1));
  }
  {  // ring: send to the next member, receive from the previous (a receive posted first)
    auto out = on_device(std::vector<float>(block, static_cast<float>(me)));
    auto in = on_device(std::vector<float>(block, -1));
    c->send_recv(span(out), (me + 1) % n, span(in), (me + n - 1) % n);
    for (float x : in.download()) ASSERT_EQ(x, static_cast<float>((me + n - 1) % n));
  }
  c->barrier();
  c->barrier();
}

TEST(NcclComm, Bf16CollectivesAreExactOnSmallIntegers) {
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());
  auto c = nccl_world();
  const int n = c->size(), me = c->rank();
  const std::size_t block = 256;
  // Integers below 256 are exact in bf16, and so are their sums over up to 8 members.
  auto small = [](int r, std::size_t i) { return static_cast<float>(r + static_cast<int>(i % 7)); };
  std::vector<float> mine(block * sz(n));
  for (std::size_t i = 0; i < mine.size(); ++i) mine[i] = small(me, i);
  {
    DeviceBuffer<bf16> buf(std::span<const bf16>(cuda::to_bf16(mine)));
    c->start_all_reduce_bf16(span(buf))->wait();
    const auto h = buf.download();
    const auto got = cuda::to_float(h);
    for (std::size_t i = 0; i < got.size(); ++i) {
      float expect = 0;
      for (int r = 0; r < n; ++r) expect += small(r, i);
      ASSERT_EQ(got[i], expect) << i;
    }
  }
  {
    DeviceBuffer<bf16> in(std::span<const bf16>(cuda::to_bf16(mine)));
    DeviceBuffer<bf16> out(block);
    c->start_reduce_scatter_bf16(std::span<const bf16>(in.data(), in.size()), span(out))->wait();
    const auto h = out.download();
    const auto got = cuda::to_float(h);
    for (std::size_t i = 0; i < block; ++i) {
      float expect = 0;
      for (int r = 0; r < n; ++r) expect += small(r, sz(me) * block + i);
      ASSERT_EQ(got[i], expect) << i;
    }
  }
  {
    std::vector<float> part(mine.begin(), mine.begin() + static_cast<std::ptrdiff_t>(block));
    DeviceBuffer<bf16> in(std::span<const bf16>(cuda::to_bf16(part)));
    DeviceBuffer<bf16> all(block * sz(n));
    c->start_all_gather_bf16(std::span<const bf16>(in.data(), in.size()), span(all))->wait();
    const auto h = all.download();
    const auto got = cuda::to_float(h);
    for (int r = 0; r < n; ++r)
      for (std::size_t i = 0; i < block; ++i) ASSERT_EQ(got[sz(r) * block + i], small(r, i));
  }
  {  // all-to-all: block j of member r lands at block r on member j
    DeviceBuffer<bf16> in(std::span<const bf16>(cuda::to_bf16(mine)));
    DeviceBuffer<bf16> out(block * sz(n));
    c->start_all_to_all_bf16(std::span<const bf16>(in.data(), in.size()), span(out))->wait();
    const auto h = out.download();
    const auto got = cuda::to_float(h);
    for (int r = 0; r < n; ++r)
      for (std::size_t i = 0; i < block; ++i) ASSERT_EQ(got[sz(r) * block + i], small(r, sz(me) * block + i));
  }
}

// The collective reads what the compute stream wrote before the start, although that write lands
// late; and the compute stream consumes the result with no host wait in between.
TEST(NcclComm, CollectivesFollowAndFeedTheComputeStream) {
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());
  auto c = nccl_world();
  const int n = c->size(), me = c->rank();
  const std::size_t count = 1 << 16;
  cudaStream_t compute = nullptr;
  PX_CUDA_CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  c->set_compute_stream(compute);
  EXPECT_EQ(c->compute_stream(), compute);
  EXPECT_NE(c->comm_stream(), compute);

  auto src = on_device(std::vector<float>(count, static_cast<float>(me + 1)));
  auto buf = on_device(std::vector<float>(count, -1000));  // stale: never what the sum should see
  // Hold the compute stream back, then write the real input on it.
  PX_CUDA_CHECK(cudaLaunchHostFunc(compute, [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(100)); }, nullptr));
  PX_CUDA_CHECK(cudaMemcpyAsync(buf.data(), src.data(), buf.bytes(), cudaMemcpyDeviceToDevice, compute));
  auto h = c->start_all_reduce(span(buf));
  EXPECT_FALSE(h->test()) << "finished while its input was still being written";

  float* pinned = nullptr;
  PX_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned), count * sizeof(float)));
  c->wait_on(*h, compute);
  PX_CUDA_CHECK(cudaMemcpyAsync(pinned, buf.data(), buf.bytes(), cudaMemcpyDeviceToHost, compute));
  PX_CUDA_CHECK(cudaStreamSynchronize(compute));
  const float expect = static_cast<float>(n * (n + 1) / 2);
  for (std::size_t i = 0; i < count; ++i) ASSERT_EQ(pinned[i], expect) << i;
  EXPECT_TRUE(h->test());
  h->wait();
  EXPECT_NE(static_cast<NcclHandle&>(*h).event(), nullptr);
  PX_CUDA_CHECK(cudaFreeHost(pinned));
  c->set_compute_stream(nullptr);
  PX_CUDA_CHECK(cudaStreamDestroy(compute));
}

TEST(NcclComm, SeveralInFlightFinishInAnyOrder) {
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());
  auto c = nccl_world();
  const int n = c->size(), me = c->rank();
  auto a = on_device(std::vector<float>(64, static_cast<float>(me)));
  auto mine = on_device(std::vector<float>(8, static_cast<float>(me)));
  DeviceBuffer<float> all(8 * sz(n));
  auto from_prev = on_device(std::vector<float>(16, -1));
  auto to_next = on_device(std::vector<float>(16, static_cast<float>(me)));
  // Receive first on even ranks, send first on odd ones: in flight together, no order deadlocks.
  std::vector<CommHandlePtr> h;
  if (me % 2 == 0) h.push_back(c->start_recv(span(from_prev), (me + n - 1) % n));
  h.push_back(c->start_send(span(to_next), (me + 1) % n));
  if (me % 2 == 1) h.push_back(c->start_recv(span(from_prev), (me + n - 1) % n));
  auto ar = c->start_all_reduce(span(a));
  auto ag = c->start_all_gather(span(mine), span(all));
  ag->wait();
  ar->wait();
  for (auto it = h.rbegin(); it != h.rend(); ++it) (*it)->wait();
  for (float x : a.download()) ASSERT_EQ(x, static_cast<float>(n * (n - 1) / 2));
  const auto gathered = all.download();
  for (int r = 0; r < n; ++r) ASSERT_EQ(gathered[sz(r) * 8], static_cast<float>(r));
  for (float x : from_prev.download()) ASSERT_EQ(x, static_cast<float>((me + n - 1) % n));
}

// NCCL has no tags: two messages to the same peer arrive in posting order whatever their tags. A
// send or receive dropped before it was issued is withdrawn and matches nothing.
TEST(NcclComm, MessagesBetweenAPairMatchInPostingOrder) {
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());
  auto c = nccl_world();
  const int n = c->size(), me = c->rank();
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  {  // withdrawn on every rank alike
    auto dropped_in = on_device(std::vector<float>(4, -1));
    auto dropped_out = on_device(std::vector<float>(4, 99));
    (void)c->start_recv(span(dropped_in), prev, 7);
    (void)c->start_send(span(dropped_out), next, 7);
  }
  auto first = on_device(std::vector<float>(32, static_cast<float>(me * 10 + 1)));
  auto second = on_device(std::vector<float>(32, static_cast<float>(me * 10 + 2)));
  auto got1 = on_device(std::vector<float>(32, -1));
  auto got2 = on_device(std::vector<float>(32, -1));
  auto r1 = c->start_recv(span(got1), prev, 5);
  auto r2 = c->start_recv(span(got2), prev, 3);
  auto s1 = c->start_send(span(first), next, 5);
  auto s2 = c->start_send(span(second), next, 3);
  r2->wait();
  r1->wait();
  s1->wait();
  s2->wait();
  for (float x : got1.download()) ASSERT_EQ(x, static_cast<float>(prev * 10 + 1));
  for (float x : got2.download()) ASSERT_EQ(x, static_cast<float>(prev * 10 + 2));
}

// A pipeline's two message streams on channels: every member sends 64 MiB of activations to the
// next and then 64 MiB of gradients to the previous, each issued before any receive (a test() per
// post issues it alone). On one communicator both sends would wait for receives queued behind
// them (a message this large does not fit NCCL's buffers); on channels each stream flows apart.
TEST(NcclComm, ChannelsKeepOppositeStreamsOfLargeMessagesApart) {
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());
  auto host = runtime->world();
  auto c = NcclCommunicator::create(*host, {{kForwardTag, +1}, {kBackwardTag, -1}});
  const int n = c->size(), me = c->rank();
  if (n < 2) GTEST_SKIP() << "needs two members";
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  const std::size_t count = std::size_t{16} << 20;  // 64 MiB of fp32
  auto act = on_device(std::vector<float>(count, static_cast<float>(me + 1)));
  auto grad = on_device(std::vector<float>(count, static_cast<float>(-me - 1)));
  DeviceBuffer<float> act_in(count), grad_in(count);
  auto s1 = c->start_send(span(act), next, kForwardTag);
  (void)s1->test();
  auto s2 = c->start_send(span(grad), prev, kBackwardTag);
  (void)s2->test();
  auto r1 = c->start_recv(span(act_in), prev, kForwardTag);
  (void)r1->test();
  auto r2 = c->start_recv(span(grad_in), next, kBackwardTag);
  for (auto* h : {&s1, &s2, &r1, &r2}) (*h)->wait();
  const auto a = act_in.download(), g = grad_in.download();
  ASSERT_EQ(a.front(), static_cast<float>(prev + 1));
  ASSERT_EQ(a.back(), static_cast<float>(prev + 1));
  ASSERT_EQ(g.front(), static_cast<float>(-next - 1));
  ASSERT_EQ(g.back(), static_cast<float>(-next - 1));
}

TEST(NcclComm, GroupsFollowThePlanTopology) {
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());
  const int n = runtime->world_size();
  PlanSpec plan;  // a pipeline of two stages where the world divides (PP and embedding groups of 2)
  plan.pipeline_model_parallel_size = n % 2 == 0 ? 2 : 1;
  plan.tensor_model_parallel_size = n / plan.pipeline_model_parallel_size;
  const Topology topo(plan);
  ASSERT_EQ(topo.world_size(), n);
  const int me = runtime->world_rank();
  const MpiGroups mpi = make_mpi_groups(topo, me);
  const NcclGroups groups = make_nccl_groups(topo, me, mpi);
  for (int g = 1; g < kNumGroupKinds; ++g) {
    const auto kind = static_cast<GroupKind>(g);
    NcclCommunicator* c = groups[kind];
    const int id = topo.group_id(kind, me);
    ASSERT_EQ(c == nullptr, id < 0) << to_string(kind);
    if (!c) continue;
    const auto members = topo.members(kind, id);
    ASSERT_EQ(c->size(), static_cast<int>(members.size())) << to_string(kind);
    EXPECT_EQ(c->rank(), topo.group_index(kind, me));
    EXPECT_EQ(c->name(), mpi[kind]->name());
    // Gather world ranks over the group: they must be the topology's members, in order.
    auto mine = on_device({static_cast<float>(me)});
    DeviceBuffer<float> all(members.size());
    c->all_gather(span(mine), span(all));
    const auto got = all.download();
    for (std::size_t i = 0; i < members.size(); ++i) EXPECT_EQ(static_cast<int>(got[i]), members[i]) << to_string(kind);
  }
}

// The comm stream waits for a compute stream that is held far past the timeout: wait() gives up,
// aborts the communicator and says which operation on which group; later calls refuse at once.
// One rank only: with peers, an NCCL kernel left queued behind the held stream would run on the
// aborted communicator once the stream moves again.
TEST(NcclComm, AStalledCollectiveIsATimeoutAndAbortsTheCommunicator) {
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());
  if (runtime->world_size() != 1) GTEST_SKIP() << "runs on one rank (see the comment above)";
  auto c = nccl_world();
  c->set_timeout(std::chrono::milliseconds(300));
  cudaStream_t compute = nullptr;
  PX_CUDA_CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  c->set_compute_stream(compute);
  static std::atomic<bool> gate_open{false};
  gate_open = false;
  PX_CUDA_CHECK(cudaLaunchHostFunc(compute, [](void*) {
    while (!gate_open) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }, nullptr));
  // Whatever the abort waits for inside NCCL, the stream moves again after a bounded time.
  std::thread opener([] {
    std::this_thread::sleep_for(std::chrono::milliseconds(2000));
    gate_open = true;
  });
  auto buf = on_device(std::vector<float>(16, 1));
  int calls = 0;
  c->set_on_wait([&] { ++calls; });
  try {
    c->all_reduce(span(buf));
    ADD_FAILURE() << "no timeout";
  } catch (const CommTimeout& e) {
    EXPECT_NE(std::string(e.what()).find("all_reduce on group world (member 0 of 1)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_GT(calls, 0) << "on_wait was never called while waiting";
  EXPECT_TRUE(c->aborted());
  try {
    c->barrier();
    ADD_FAILURE() << "a call on an aborted communicator went through";
  } catch (const CommTimeout& e) {
    EXPECT_NE(std::string(e.what()).find("aborted earlier"), std::string::npos) << e.what();
  }
  opener.join();
  PX_CUDA_CHECK(cudaStreamSynchronize(compute));
  c.reset();
  PX_CUDA_CHECK(cudaStreamDestroy(compute));
}

// Two ranks or more: member 1 never sends, so member 0's receive times out and its communicator is
// aborted; the others abort theirs (the group is lost either way) once member 0 is through.
TEST(NcclComm, APeerThatNeverAnswersIsATimeout) {
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());
  if (runtime->world_size() < 2) GTEST_SKIP() << "needs two ranks";
  auto c = nccl_world();
  auto host = runtime->world();
  c->set_timeout(std::chrono::milliseconds(300));
  if (c->rank() == 0) {
    auto buf = on_device(std::vector<float>(4, 0));
    try {
      c->recv(span(buf), 1);
      ADD_FAILURE() << "no timeout";
    } catch (const CommTimeout& e) {
      EXPECT_NE(std::string(e.what()).find("recv from member 1 on group world"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(c->aborted());
  }
  host->barrier();
  if (c->rank() != 0) c->abort("member 0 timed out");
  c.reset();
  host->barrier();
}

}  // namespace
}  // namespace px

int main(int argc, char** argv) { return px::test::run_gpu_tests_under_mpi(argc, argv, px::runtime); }
