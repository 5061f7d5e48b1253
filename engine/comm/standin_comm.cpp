// The stand-in operations: the local copies of the data model in standin_comm.hpp, done before
// start_* returns, so every handle is finished when the caller gets it.
#include "engine/comm/standin_comm.hpp"

#include <algorithm>
#include <cassert>

namespace px {
namespace {

class DoneHandle final : public CommHandle {
 public:
  bool test() override { return true; }
  void wait() override {}
};

}  // namespace

StandInCommunicator::StandInCommunicator(std::string name, int rank, int size) : name_(std::move(name)), rank_(rank), size_(size) {
  assert(size >= 1 && rank >= 0 && rank < size);
}

CommHandlePtr StandInCommunicator::done() {
  ++operations_;
  return std::make_unique<DoneHandle>();
}

CommHandlePtr StandInCommunicator::start_all_reduce(std::span<float>) { return done(); }

CommHandlePtr StandInCommunicator::start_all_reduce_max(std::span<float>) { return done(); }

CommHandlePtr StandInCommunicator::start_reduce_scatter(std::span<const float> in, std::span<float> out) {
  assert(in.size() == out.size() * static_cast<std::size_t>(size_));
  const auto mine = in.subspan(static_cast<std::size_t>(rank_) * out.size(), out.size());
  std::copy(mine.begin(), mine.end(), out.begin());
  return done();
}

CommHandlePtr StandInCommunicator::start_all_gather(std::span<const float> in, std::span<float> out) {
  assert(out.size() == in.size() * static_cast<std::size_t>(size_));
  for (int r = 0; r < size_; ++r) std::copy(in.begin(), in.end(), out.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r) * in.size()));
  return done();
}

CommHandlePtr StandInCommunicator::start_all_to_all(std::span<const float> in, std::span<float> out) {
  assert(in.size() == out.size() && in.size() % static_cast<std::size_t>(size_) == 0);
  const std::size_t block = in.size() / static_cast<std::size_t>(size_);
  const auto mine = in.subspan(static_cast<std::size_t>(rank_) * block, block);
  for (int r = 0; r < size_; ++r) std::copy(mine.begin(), mine.end(), out.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r) * block));
  return done();
}

CommHandlePtr StandInCommunicator::start_all_to_all_v(std::span<const float> in, const std::vector<int>& send_counts,
                                                      const std::vector<int>& send_displs, std::span<float> out,
                                                      const std::vector<int>& recv_counts, const std::vector<int>& recv_displs) {
  const auto n = static_cast<std::size_t>(size_), me = static_cast<std::size_t>(rank_);
  assert(send_counts.size() == n && send_displs.size() == n && recv_counts.size() == n && recv_displs.size() == n);
  (void)n;
  const auto mine = in.subspan(static_cast<std::size_t>(send_displs[me]), static_cast<std::size_t>(send_counts[me]));
  for (std::size_t r = 0; r < recv_counts.size(); ++r) {
    const std::size_t count = std::min(mine.size(), static_cast<std::size_t>(recv_counts[r]));
    assert(static_cast<std::size_t>(recv_displs[r]) + count <= out.size());
    std::copy_n(mine.begin(), count, out.begin() + recv_displs[r]);
  }
  return done();
}

CommHandlePtr StandInCommunicator::start_broadcast(std::span<float>, int root) {
  assert(root >= 0 && root < size_);
  (void)root;
  return done();
}

CommHandlePtr StandInCommunicator::start_send(std::span<const float>, int peer, int) {
  assert(peer >= 0 && peer < size_);
  (void)peer;
  return done();
}

CommHandlePtr StandInCommunicator::start_recv(std::span<float>, int peer, int) {
  assert(peer >= 0 && peer < size_);
  (void)peer;
  return done();
}

CommHandlePtr StandInCommunicator::start_barrier() { return done(); }

}  // namespace px
