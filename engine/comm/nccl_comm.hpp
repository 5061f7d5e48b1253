// NCCL collectives for GPU ranks: one nonblocking NCCL communicator per process group instance,
// over DEVICE buffers (every span carries device pointers; nothing here reads them on the host).
// The NCCL id is made by the group's first member and broadcast over the group's MPI communicator,
// so make_nccl_groups mirrors make_mpi_groups. Each group has its own comm stream, so
// communication overlaps the compute stream it waits for; a handle's wait() polls a CUDA event
// against the communicator's timeout and, past it or on an NCCL error, aborts the communicator and
// throws CommTimeout naming the group and operation.
//
// Ordering rules (NCCL's, surfaced here):
// - Every member must start a group's operations in the same order, point-to-point included: NCCL
//   runs one communicator's work in issue order, so a collective started on one member before a
//   send that another member receives first deadlocks where MPI would not.
// - NCCL has no tags: messages from A to B match B's receives from A in posting order across all
//   tags, and one communicator runs all of its operations in one order. A message stream created
//   as a channel (create's `channels`: a tag and the neighbour it goes to) travels instead on
//   2-member communicators of its own, one per sending and receiving pair (PyTorch's per-pair
//   NCCL communicators for point-to-point): each carries one direction of one tag, so a pipeline's
//   activations never queue behind its gradients. On one communicator that deadlocks once a
//   message outgrows NCCL's buffers: a send ends only when its receiver's kernel runs, and the
//   receiver's queue can hold its own send the other way first. Other tags share the group's
//   communicator and must be posted in the same interleaving by both members.
// - Sends and receives are deferred and issued together, as one NCCL group, at the next collective
//   start, wait/test/wait_on of any handle of the communicator, or flush(): NCCL blocks the stream
//   on a lone send or receive until its peer's matching call runs, so an exchange posted as
//   recv-then-send (send_recv, rings) must reach NCCL as one group. Post every send and receive of
//   an exchange before waiting on or testing any of them. A handle dropped before it was issued is
//   withdrawn (MPI_Cancel's counterpart).
// - Not thread-safe: one host thread drives a communicator (as the engine's funneled MPI does).
// Handles must not outlive their communicator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/comm/device_communicator.hpp"
#include "engine/comm/mpi_comm.hpp"
#include "engine/plan/topology.hpp"

namespace px {

class NcclCommunicator;
struct NcclGroups;

namespace nccl_detail {
struct Op;
}

// One NCCL operation in flight. Beyond CommHandle: a device-side wait, so the compute stream can
// consume a collective's result without the host blocking on it.
class NcclHandle final : public CommHandle {
 public:
  NcclHandle(NcclCommunicator& comm, std::shared_ptr<nccl_detail::Op> op);
  ~NcclHandle() override;
  NcclHandle(const NcclHandle&) = delete;
  NcclHandle& operator=(const NcclHandle&) = delete;

  bool test() override;  // also issues deferred sends/receives and notices NCCL errors
  void wait() override;
  // Work enqueued on `stream` after this call runs once the operation has finished on the device.
  // Issues the operation first if it is still deferred (which may wait for NCCL to enqueue it, up
  // to the timeout). The host never learns of a peer failure this way: keep test()ing or wait()ing.
  void wait_on(cudaStream_t stream);
  // Recorded on the comm stream after the operation; null until NCCL has enqueued it.
  cudaEvent_t event() const;

 private:
  NcclCommunicator* comm_;
  std::shared_ptr<nccl_detail::Op> op_;
};

class NcclCommunicator final : public DeviceCommunicator {
 public:

  // A message stream with communicators of its own: tag `tag`, sent to member rank() + `to` and
  // received from member rank() - `to` (modulo the size).
  struct Channel {
    int tag;
    int to;  // +1: the next member, -1: the previous one
  };
  // Collective over `host`'s members (an MPI group communicator): same ranks, size and name, and
  // host's timeout as this one's. The calling process's current CUDA device is this member's.
  static std::unique_ptr<NcclCommunicator> create(Communicator& host, const std::vector<Channel>& channels = {});
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }

  CommHandlePtr start_all_reduce(std::span<float> buf) override;
  CommHandlePtr start_all_reduce_max(std::span<float> buf) override;
  CommHandlePtr start_reduce_scatter(std::span<const float> in, std::span<float> out) override;
  CommHandlePtr start_all_gather(std::span<const float> in, std::span<float> out) override;
  CommHandlePtr start_all_to_all(std::span<const float> in, std::span<float> out) override;
  CommHandlePtr start_all_to_all_v(std::span<const float> in, const std::vector<int>& send_counts,
                                   const std::vector<int>& send_displs, std::span<float> out,
                                   const std::vector<int>& recv_counts, const std::vector<int>& recv_displs) override;
  CommHandlePtr start_broadcast(std::span<float> buf, int root) override;
  CommHandlePtr start_send(std::span<const float> buf, int peer, int tag = 0) override;
  CommHandlePtr start_recv(std::span<float> buf, int peer, int tag = 0) override;
  CommHandlePtr start_barrier() override;

  // bf16 sums in NCCL's bf16 arithmetic.
  CommHandlePtr start_all_reduce_bf16(std::span<bf16> buf) override;
  CommHandlePtr start_reduce_scatter_bf16(std::span<const bf16> in, std::span<bf16> out) override;
  CommHandlePtr start_all_gather_bf16(std::span<const bf16> in, std::span<bf16> out) override;
  CommHandlePtr start_all_to_all_bf16(std::span<const bf16> in, std::span<bf16> out) override;
  CommHandlePtr start_send_bf16(std::span<const bf16> buf, int peer, int tag = 0) override;
  CommHandlePtr start_recv_bf16(std::span<bf16> buf, int peer, int tag = 0) override;

  // Null (the default): the legacy default stream. Channels follow it.
  void set_compute_stream(cudaStream_t s) override;
  cudaStream_t compute_stream() const { return compute_; }
  cudaStream_t comm_stream() const { return stream_; }
  // `h` must be an NcclHandle (std::invalid_argument otherwise).
  void wait_on(CommHandle& h, cudaStream_t stream) override;

  // Issues the deferred sends and receives now (as one NCCL group), the channels' too.
  void flush();
  // Drops the NCCL communicator (and its channels') without talking to its peers (after one of
  // them failed); every later call on this communicator throws CommTimeout.
  void abort(const std::string& why = "aborted by the caller");
  bool aborted() const { return aborted_; }
  ncclComm_t nccl() const { return comm_; }
  int device() const { return device_; }

 private:
  friend class NcclHandle;
  friend NcclGroups make_nccl_groups(const Topology&, int, const MpiGroups&);

  struct P2pCall {
    bool send;
    void* buf;  // a send's buffer is only read (the cast away from const stays inside NCCL's call)
    std::size_t count;
    ncclDataType_t type;
    int peer;
  };
  struct Deferred {
    P2pCall call;
    std::shared_ptr<nccl_detail::Op> op;
  };

  NcclCommunicator(std::string name, int rank, int size);
  // Collective creation in two steps, so several groups' NCCL inits run at once.
  static std::unique_ptr<NcclCommunicator> begin_create(Communicator& host, const std::vector<Channel>& channels);
  // This member's NCCL communicator of `size` from `id`, its init under way.
  static std::unique_ptr<NcclCommunicator> begin_init(std::string name, int rank, int size, const ncclUniqueId& id,
                                                      std::chrono::milliseconds timeout);
  void finish_create();
  // A send or receive (call.peer: the member of this group) deferred on the channel of its tag
  // and direction, or on this communicator.
  CommHandlePtr post_p2p(P2pCall call, int tag);

  template <class Enqueue>
  CommHandlePtr issue(std::string what, Enqueue&& enqueue);
  CommHandlePtr defer(std::string what, P2pCall call);
  void run_p2p_group(std::span<const P2pCall> calls);
  CommHandlePtr enqueue_all_reduce(void* buf, std::size_t count, ncclDataType_t type, ncclRedOp_t op, const char* what);
  CommHandlePtr enqueue_reduce_scatter(const void* in, void* out, std::size_t out_count, ncclDataType_t type, const char* what);
  CommHandlePtr enqueue_all_gather(const void* in, void* out, std::size_t in_count, ncclDataType_t type, const char* what);
  CommHandlePtr enqueue_all_to_all(const void* in, void* out, std::size_t count, ncclDataType_t type, std::size_t size_of, const char* what);

  void ensure_usable(const std::string& what) const;
  std::shared_ptr<nccl_detail::Op> make_op(std::string what);
  // NCCL's enqueue of the operations issued last: true once finished (their completion events are
  // then recorded); throws CommTimeout (after aborting) on an NCCL error.
  bool poll_enqueue(const std::string& what);
  // Until no enqueue is under way and no send/receive is deferred; CommTimeout past the timeout.
  void settle(const std::string& what);
  // Issues the deferred sends/receives when NCCL accepts a call now; never blocks.
  bool try_issue_deferred(const std::string& what);
  void issue_deferred();
  void withdraw(const nccl_detail::Op* op);
  // Throws CommTimeout if NCCL reports an asynchronous error (a peer died, a transport failed).
  void check_async(const std::string& what);
  [[noreturn]] void fail(const std::string& what, const std::string& why);
  std::string where(const std::string& what) const;

  std::string name_;
  int rank_ = 0, size_ = 1, device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;   // the comm stream: non-blocking, so it never waits on stream 0 implicitly
  cudaStream_t compute_ = nullptr;  // legacy default stream unless set
  cudaEvent_t ready_ = nullptr;     // the compute stream's progress at a start_*
  float* scratch_ = nullptr;        // one device float, the barrier's all-reduce
  std::vector<Deferred> deferred_;
  std::vector<std::shared_ptr<nccl_detail::Op>> enqueuing_;
  struct PairChannel {
    int tag, peer;  // the messages of `tag` this member sends to `peer`, or (!send) receives from it
    bool send;
    std::unique_ptr<NcclCommunicator> comm;  // 2 members: the sender 0, the receiver 1
  };
  std::vector<PairChannel> channels_;
  bool initialized_ = false;  // NCCL's init finished (before: abort, never finalize)
  bool aborted_ = false;
  std::string abort_reason_;
};

// Selects local_rank % (visible devices) as the calling process's CUDA device and returns it;
// CudaError without a device. NCCL needs one device per member of a communicator.
int select_local_device(int local_rank);

// This rank's NCCL communicator for every group kind it has an MPI communicator for (mpi: from
// make_mpi_groups with the same topology), the pipeline group's activations and gradients on
// channels of their own. Collective across all ranks.
struct NcclGroups {
  std::array<std::unique_ptr<NcclCommunicator>, kNumGroupKinds> group;
  NcclCommunicator* operator[](GroupKind g) const { return group[static_cast<std::size_t>(g)].get(); }
};
NcclGroups make_nccl_groups(const Topology& topology, int world_rank, const MpiGroups& mpi);

}  // namespace px
