// The stand-in communicator of rank emulation, operation by operation: each one's data semantics
// under its rule (every member holds what this member holds; reductions keep one member's
// values), each handle finished when it is returned, and buffers it must not touch untouched.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "engine/comm/standin_comm.hpp"

namespace px {
namespace {

// Distinct values, exact in fp32.
std::vector<float> iota(std::size_t n, float from = 1.0f) {
  std::vector<float> v(n);
  std::iota(v.begin(), v.end(), from);
  return v;
}

constexpr int kSize = 4, kMe = 2;  // member 2 of a group of 4: neither end, so block offsets matter
constexpr std::size_t kBlock = 5;

TEST(StandInComm, IdentityOfTheGroup) {
  StandInCommunicator c("tp#3", kMe, kSize);
  EXPECT_EQ(c.rank(), kMe);
  EXPECT_EQ(c.size(), kSize);
  EXPECT_EQ(c.name(), "tp#3");
  EXPECT_EQ(c.operations(), 0);
}

TEST(StandInComm, AllReduceSumAndMaxLeaveTheBuffer) {
  StandInCommunicator c("tp#0", kMe, kSize);
  std::vector<float> buf = iota(kBlock);
  const std::vector<float> before = buf;
  auto h = c.start_all_reduce(buf);
  EXPECT_TRUE(h->test());
  h->wait();
  EXPECT_EQ(buf, before);
  c.start_all_reduce_max(buf)->wait();
  EXPECT_EQ(buf, before);
  EXPECT_EQ(c.operations(), 2);
}

TEST(StandInComm, ReduceScatterCopiesThisMembersBlock) {
  StandInCommunicator c("dp#0", kMe, kSize);
  const std::vector<float> in = iota(kBlock * kSize);
  std::vector<float> out(kBlock, -1.0f);
  auto h = c.start_reduce_scatter(in, out);
  EXPECT_TRUE(h->test());
  for (std::size_t i = 0; i < kBlock; ++i) EXPECT_EQ(out[i], in[kMe * kBlock + i]) << i;
}

TEST(StandInComm, AllGatherReplicatesTheInputIntoEveryBlock) {
  StandInCommunicator c("dp#0", kMe, kSize);
  const std::vector<float> in = iota(kBlock, 10.0f);
  std::vector<float> out(kBlock * kSize, -1.0f);
  EXPECT_TRUE(c.start_all_gather(in, out)->test());
  for (int r = 0; r < kSize; ++r)
    for (std::size_t i = 0; i < kBlock; ++i) EXPECT_EQ(out[static_cast<std::size_t>(r) * kBlock + i], in[i]) << r << "/" << i;
}

TEST(StandInComm, AllToAllDeliversThisMembersBlockFromEveryPeer) {
  // Every peer holds this member's send buffer, so each sends it block kMe.
  StandInCommunicator c("ep#1", kMe, kSize);
  const std::vector<float> in = iota(kBlock * kSize);
  std::vector<float> out(kBlock * kSize, -1.0f);
  EXPECT_TRUE(c.start_all_to_all(in, out)->test());
  for (int r = 0; r < kSize; ++r)
    for (std::size_t i = 0; i < kBlock; ++i) EXPECT_EQ(out[static_cast<std::size_t>(r) * kBlock + i], in[kMe * kBlock + i]) << r << "/" << i;
}

TEST(StandInComm, AllToAllVCopiesThisMembersBlockAsFarAsEachReceiveBlockHolds) {
  StandInCommunicator c("ep#0", kMe, kSize);
  // This member sends 3 elements to each peer (block kMe at displacement 6); receive blocks of
  // 1, 3, 5 and 0 elements: the short one takes a prefix, the long one keeps its tail.
  const std::vector<int> sc = {3, 3, 3, 3}, sd = {0, 3, 6, 9};
  const std::vector<int> rc = {1, 3, 5, 0}, rd = {0, 1, 4, 9};
  const std::vector<float> in = iota(12);
  std::vector<float> out(10, -1.0f);
  EXPECT_TRUE(c.start_all_to_all_v(in, sc, sd, out, rc, rd)->test());
  const std::vector<float> want = {in[6], in[6], in[7], in[8], in[6], in[7], in[8], -1.0f, -1.0f, -1.0f};
  EXPECT_EQ(out, want);
}

TEST(StandInComm, BroadcastLeavesTheBuffer) {
  StandInCommunicator c("pp#0", kMe, kSize);
  std::vector<float> buf = iota(kBlock);
  const std::vector<float> before = buf;
  EXPECT_TRUE(c.start_broadcast(buf, 0)->test());
  EXPECT_EQ(buf, before);
}

TEST(StandInComm, SendCompletesAtOnceAndRecvLeavesItsBuffer) {
  StandInCommunicator c("pp#0", kMe, kSize);
  const std::vector<float> message = iota(kBlock);
  std::vector<float> inbox(kBlock, 7.0f);
  // A receive posted before the matching send, as the executor's pipeline and ring ops do: both
  // finish at once and nothing arrives (no peer exists to send it).
  auto r = c.start_recv(inbox, kMe - 1, 1);
  auto s = c.start_send(message, kMe + 1, 1);
  EXPECT_TRUE(r->test());
  EXPECT_TRUE(s->test());
  r->wait();
  s->wait();
  EXPECT_EQ(inbox, std::vector<float>(kBlock, 7.0f));
  c.send_recv(message, (kMe + 1) % kSize, inbox, (kMe + kSize - 1) % kSize);
  EXPECT_EQ(inbox, std::vector<float>(kBlock, 7.0f));
  EXPECT_EQ(c.operations(), 4);
}

TEST(StandInComm, BarrierAndAGroupOfOne) {
  StandInCommunicator c("cp#0", 0, 1);
  EXPECT_TRUE(c.start_barrier()->test());
  c.barrier();
  // With one member the stand-in is exact: every collective is what a real group of one does.
  const std::vector<float> in = iota(kBlock);
  std::vector<float> out(kBlock, -1.0f);
  c.all_gather(in, out);
  EXPECT_EQ(out, in);
  c.reduce_scatter(in, out);
  EXPECT_EQ(out, in);
  c.all_to_all(in, out);
  EXPECT_EQ(out, in);
}

}  // namespace
}  // namespace px
