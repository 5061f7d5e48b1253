// The narrow interface between the executor and a collective library: one Communicator per process
// group instance a rank belongs to. Buffers are fp32 (the CPU backend); sums are the reduction.
// Every call waits at most `timeout` and then throws CommTimeout naming the group and operation,
// so a dead or hung peer ends the job instead of hanging it.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace px {

// The executor's message tags (engine/exec/comm_layout.cpp): pipeline activations travel to the
// next stage, their gradients to the previous one, ring blocks around a group.
inline constexpr int kForwardTag = 1, kBackwardTag = 2, kRingTag = 3;

class CommTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A collective or message in flight (the engine's comm streams keep several at once).
class CommHandle {
 public:
  virtual ~CommHandle() = default;
  virtual bool test() = 0;  // finished? (never blocks)
  virtual void wait() = 0;  // until finished, or CommTimeout after the communicator's timeout
};
using CommHandlePtr = std::unique_ptr<CommHandle>;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;  // position in the group
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // e.g. "tp#3"
  // True for a stand-in that serves a missing group (rank emulation): no peer, no wire.
  virtual bool stand_in() const { return false; }

  // Each start_* begins the operation and returns at once; buffers must stay untouched until the
  // handle finishes. The blocking forms below start and wait.
  virtual CommHandlePtr start_all_reduce(std::span<float> buf) = 0;
  // Elementwise maximum instead of the sum (vocab-parallel cross entropy's row maxima).
  virtual CommHandlePtr start_all_reduce_max(std::span<float> buf) = 0;
  // `in` holds size() blocks of out.size(); block i of the sum lands on member i.
  virtual CommHandlePtr start_reduce_scatter(std::span<const float> in, std::span<float> out) = 0;
  // Every member's `in` lands at block rank() of `out` (size() blocks of in.size()).
  virtual CommHandlePtr start_all_gather(std::span<const float> in, std::span<float> out) = 0;
  // Block j of `in` goes to member j; block i of `out` comes from member i.
  virtual CommHandlePtr start_all_to_all(std::span<const float> in, std::span<float> out) = 0;
  // Variable blocks: counts and displacements in elements, one per member.
  virtual CommHandlePtr start_all_to_all_v(std::span<const float> in, const std::vector<int>& send_counts,
                                           const std::vector<int>& send_displs, std::span<float> out,
                                           const std::vector<int>& recv_counts, const std::vector<int>& recv_displs) = 0;
  virtual CommHandlePtr start_broadcast(std::span<float> buf, int root) = 0;
  // Messages match by (peer, tag) in posting order; distinct tags keep independent streams of
  // messages between the same two members apart (pipeline activations vs. gradients).
  virtual CommHandlePtr start_send(std::span<const float> buf, int peer, int tag = 0) = 0;
  virtual CommHandlePtr start_recv(std::span<float> buf, int peer, int tag = 0) = 0;
  virtual CommHandlePtr start_barrier() = 0;

  void all_reduce(std::span<float> buf) { start_all_reduce(buf)->wait(); }
  void reduce_scatter(std::span<const float> in, std::span<float> out) { start_reduce_scatter(in, out)->wait(); }
  void all_gather(std::span<const float> in, std::span<float> out) { start_all_gather(in, out)->wait(); }
  void all_to_all(std::span<const float> in, std::span<float> out) { start_all_to_all(in, out)->wait(); }
  void all_to_all_v(std::span<const float> in, const std::vector<int>& send_counts, const std::vector<int>& send_displs,
                    std::span<float> out, const std::vector<int>& recv_counts, const std::vector<int>& recv_displs) {
    start_all_to_all_v(in, send_counts, send_displs, out, recv_counts, recv_displs)->wait();
  }
  void broadcast(std::span<float> buf, int root) { start_broadcast(buf, root)->wait(); }
  void send(std::span<const float> buf, int peer) { start_send(buf, peer)->wait(); }
  void recv(std::span<float> buf, int peer) { start_recv(buf, peer)->wait(); }
  // Send to one member and receive from another at once (rings, pipeline exchanges).
  void send_recv(std::span<const float> out, int to, std::span<float> in, int from) {
    auto r = start_recv(in, from);
    auto s = start_send(out, to);
    r->wait();
    s->wait();
  }
  void barrier() { start_barrier()->wait(); }

  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  // Called over and over while a wait blocks (the executor keeps its heartbeat fresh with it).
  void set_on_wait(std::function<void()> f) { on_wait_ = std::move(f); }
  void on_wait() const {
    if (on_wait_) on_wait_();
  }

 private:
  std::chrono::milliseconds timeout_{60000};
  std::function<void()> on_wait_;
};

}  // namespace px
