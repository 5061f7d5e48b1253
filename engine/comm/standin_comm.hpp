// Stand-in communicators for rank emulation: one rank of a large plan runs alone (a one-device
// machine producing the compute traces that calibrate the simulator), so every group it belongs
// to has the plan's real size but only this member exists. Each operation completes at once and
// does only the local copy that gives the buffers plausible contents; no peer, no wire, no delay.
// Its times are therefore not communication: traces flag these ops as stand-ins.
//
// Data model, one rule for every operation: *every member of the group holds what this member
// holds*, except that reductions keep one member's contribution instead of multiplying it by the
// group's size (a sum of unknown peers' values cannot be had; keeping the magnitudes of one member
// keeps the arithmetic that follows finite and in range).
//   all-reduce (sum)   buffer unchanged
//   all-reduce (max)   buffer unchanged (the maximum of identical values, exactly)
//   reduce-scatter     out = block rank() of in
//   all-gather         every block of out = in
//   all-to-all         every block of out = block rank() of in (what each peer would send this member)
//   all-to-all-v       block i of out = block rank() of in, min(recv_counts[i], send_counts[rank()])
//                      elements; the rest of a longer receive block is left as it is
//   broadcast          buffer unchanged (the root holds what this member holds)
//   send               completes at once, reads nothing
//   recv               buffer left as it is: nobody sends. (The executor zeroes a tensor at its
//                      first write, so a fresh received activation reads as zeros; zero-filling here
//                      would be memory traffic no real receive costs the compute stream.)
//   barrier            nothing
// On a device backend's arena (CUDA) the executor calls none of these: its comm ops move no data,
// every buffer keeps what it holds, which is the all-reduce rule for all of them.
#pragma once

#include <cstdint>
#include <string>

#include "engine/comm/communicator.hpp"

namespace px {

class StandInCommunicator final : public Communicator {
 public:
  // Member `rank` of a group of `size` (the plan's size for that group) named `name`, e.g. "tp#3".
  StandInCommunicator(std::string name, int rank, int size);

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  bool stand_in() const override { return true; }

  CommHandlePtr start_all_reduce(std::span<float> buf) override;
  CommHandlePtr start_all_reduce_max(std::span<float> buf) override;
  CommHandlePtr start_reduce_scatter(std::span<const float> in, std::span<float> out) override;
  CommHandlePtr start_all_gather(std::span<const float> in, std::span<float> out) override;
  CommHandlePtr start_all_to_all(std::span<const float> in, std::span<float> out) override;
  CommHandlePtr start_all_to_all_v(std::span<const float> in, const std::vector<int>& send_counts, const std::vector<int>& send_displs,
                                   std::span<float> out, const std::vector<int>& recv_counts,
                                   const std::vector<int>& recv_displs) override;
  CommHandlePtr start_broadcast(std::span<float> buf, int root) override;
  CommHandlePtr start_send(std::span<const float> buf, int peer, int tag) override;
  CommHandlePtr start_recv(std::span<float> buf, int peer, int tag) override;
  CommHandlePtr start_barrier() override;

  // Operations served so far (every start_* counts one).
  std::int64_t operations() const { return operations_; }

 private:
  CommHandlePtr done();

  std::string name_;
  int rank_, size_;
  std::int64_t operations_ = 0;
};

}  // namespace px
