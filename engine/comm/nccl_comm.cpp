// NCCL communicators per process group. Communicators are nonblocking (ncclConfig_t::blocking =
// 0): no NCCL call can hang the host, so init, enqueue and completion are all polled against the
// group's deadline, and a dead or hung peer becomes a CommTimeout (after ncclCommAbort, which is
// what releases kernels spinning on a peer) instead of a hang.
#include "engine/comm/nccl_comm.hpp"

#include <algorithm>
#include <cassert>
#include <chrono>
#include <fmt/format.h>
#include <stdexcept>
#include <thread>

#include "engine/backends/cuda/check.hpp"
#include "engine/comm/nccl_check.hpp"

namespace px {

namespace cuda {

void throw_nccl_error(ncclResult_t r, const char* call, const char* file, int line) {
  std::string why = ncclGetErrorString(r);
  // The code alone says little ("unhandled system error"); the last error names the cause.
  const char* last = ncclGetLastError(nullptr);
  if (last && *last) why += fmt::format(" ({})", last);
  throw_cuda_error("NCCL", call, why, file, line);
}

}  // namespace cuda

namespace nccl_detail {

struct Op {
  std::string what;
  cudaEvent_t ready = nullptr;  // deferred send/recv: the compute stream's progress when it was started
  cudaEvent_t done = nullptr;   // recorded on the comm stream once NCCL has enqueued the operation
  bool issued = false;          // handed to NCCL (false: a deferred send/recv)
  bool recorded = false;        // `done` follows the operation on the comm stream

  explicit Op(std::string w) : what(std::move(w)) {
    PX_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  }
  ~Op() {
    if (ready) (void)cudaEventDestroy(ready);
    if (done) (void)cudaEventDestroy(done);
  }
  Op(const Op&) = delete;
  Op& operator=(const Op&) = delete;

  bool finished() const {
    const cudaError_t e = cudaEventQuery(done);
    if (e == cudaErrorNotReady) return false;
    PX_CUDA_CHECK(e);
    return true;
  }
};

}  // namespace nccl_detail

namespace {

using Clock = std::chrono::steady_clock;

// Polls spin for a few microseconds (small collectives finish there, and latency figures stay
// honest), then back off so a rank does not take a core a peer on the same machine needs.
class Backoff {
 public:
  explicit Backoff(std::chrono::microseconds cap = std::chrono::microseconds(50)) : cap_(cap) {}
  void pause() {
    if (Clock::now() - start_ < std::chrono::microseconds(20)) return;
    std::this_thread::sleep_for(pause_);
    pause_ = std::min(pause_ * 2, cap_);
  }

 private:
  Clock::time_point start_ = Clock::now();
  std::chrono::microseconds pause_{1};
  std::chrono::microseconds cap_;
};

}  // namespace

// ---- handle ----

NcclHandle::NcclHandle(NcclCommunicator& comm, std::shared_ptr<nccl_detail::Op> op) : comm_(&comm), op_(std::move(op)) {}

NcclHandle::~NcclHandle() {
  if (!op_->issued) comm_->withdraw(op_.get());
}

bool NcclHandle::test() {
  // Work that finished stays finished, also after the communicator was aborted.
  if (op_->recorded && op_->finished()) return true;
  comm_->ensure_usable(op_->what);
  comm_->try_issue_deferred(op_->what);
  if (op_->recorded && op_->finished()) return true;
  comm_->check_async(op_->what);
  return false;
}

void NcclHandle::wait() {
  const auto deadline = Clock::now() + comm_->timeout();
  Backoff backoff;
  while (!test()) {
    comm_->on_wait();
    if (Clock::now() > deadline) comm_->fail(op_->what, fmt::format("did not complete within {} ms", comm_->timeout().count()));
    backoff.pause();
  }
}

void NcclHandle::wait_on(cudaStream_t stream) {
  if (!op_->recorded) {
    comm_->ensure_usable(op_->what);
    comm_->settle(op_->what);
  }
  assert(op_->recorded);
  PX_CUDA_CHECK(cudaStreamWaitEvent(stream, op_->done, 0));
}

cudaEvent_t NcclHandle::event() const { return op_->recorded ? op_->done : nullptr; }

// ---- communicator: creation and teardown ----

NcclCommunicator::NcclCommunicator(std::string name, int rank, int size) : name_(std::move(name)), rank_(rank), size_(size) {
  PX_CUDA_CHECK(cudaGetDevice(&device_));
  // Non-blocking: the comm stream must not serialize with the legacy default stream, or every
  // collective would wait for (and hold up) unrelated compute.
  PX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  PX_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  PX_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&scratch_), sizeof(float)));
  PX_CUDA_CHECK(cudaMemset(scratch_, 0, sizeof(float)));
}

namespace {

// An NCCL id crosses a host communicator one byte per float, each an exact small integer, so no
// byte of it depends on how the transport treats float bit patterns (NaNs).
std::vector<float> to_wire(const ncclUniqueId& id) {
  std::vector<float> wire(sizeof id.internal);
  for (std::size_t i = 0; i < wire.size(); ++i) wire[i] = static_cast<float>(static_cast<unsigned char>(id.internal[i]));
  return wire;
}

ncclUniqueId from_wire(std::span<const float> wire) {
  ncclUniqueId id{};
  for (std::size_t i = 0; i < wire.size(); ++i) id.internal[i] = static_cast<char>(static_cast<unsigned char>(wire[i]));
  return id;
}

}  // namespace

std::unique_ptr<NcclCommunicator> NcclCommunicator::begin_init(std::string name, int rank, int size, const ncclUniqueId& id,
                                                               std::chrono::milliseconds timeout) {
  std::unique_ptr<NcclCommunicator> c(new NcclCommunicator(std::move(name), rank, size));
  c->set_timeout(timeout);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 23, 0)
  config.commName = c->name_.c_str();  // NCCL's logs then name the group
#endif
  const ncclResult_t r = ncclCommInitRankConfig(&c->comm_, c->size_, id, c->rank_, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    // A nonblocking init can fail after allocating the communicator; only an abort frees it.
    if (c->comm_) (void)ncclCommAbort(c->comm_);
    c->comm_ = nullptr;
    c->aborted_ = true;
    c->abort_reason_ = "its NCCL init failed";
    cuda::throw_nccl_error(r, "ncclCommInitRankConfig", __FILE__, __LINE__);
  }
  return c;
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::begin_create(Communicator& host, const std::vector<Channel>& channels) {
  ncclUniqueId id{};
  if (host.rank() == 0) PX_NCCL_CHECK(ncclGetUniqueId(&id));
  std::vector<float> wire = to_wire(id);
  host.broadcast(wire, 0);
  auto c = begin_init(host.name(), host.rank(), host.size(), from_wire(wire), host.timeout());
  // Each channel: the pair this member sends to and the pair it receives from, the sender's id
  // passed along the ring; every init runs in the background, so no member waits for another here.
  const int n = host.size(), me = host.rank();
  for (const Channel& ch : n > 1 ? channels : std::vector<Channel>{}) {
    const int to = ((me + ch.to) % n + n) % n, from = ((me - ch.to) % n + n) % n;
    ncclUniqueId mine{};
    PX_NCCL_CHECK(ncclGetUniqueId(&mine));
    std::vector<float> sent = to_wire(mine), got(sent.size());
    host.send_recv(sent, to, got, from);
    c->channels_.push_back(
        {ch.tag, to, true, begin_init(fmt::format("{} tag {} {}>{}", host.name(), ch.tag, me, to), 0, 2, mine, host.timeout())});
    c->channels_.push_back(
        {ch.tag, from, false, begin_init(fmt::format("{} tag {} {}>{}", host.name(), ch.tag, from, me), 1, 2, from_wire(got), host.timeout())});
  }
  // A wait on a channel's handle keeps the group's heartbeat going.
  for (PairChannel& ch : c->channels_) ch.comm->set_on_wait([group = c.get()] { group->on_wait(); });
  return c;
}

void NcclCommunicator::finish_create() {
  const auto deadline = Clock::now() + timeout();
  Backoff backoff(std::chrono::microseconds(1000));
  for (;;) {
    ncclResult_t state = ncclSuccess;
    PX_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
    if (state == ncclSuccess) break;
    if (state != ncclInProgress) {
      // The message first: it quotes NCCL's last error, which the abort may overwrite.
      try {
        cuda::throw_nccl_error(state, fmt::format("ncclCommInitRankConfig on group {}", name_).c_str(), __FILE__, __LINE__);
      } catch (...) {
        abort("its NCCL init failed");
        throw;
      }
    }
    on_wait();
    if (Clock::now() > deadline) fail("NCCL init", fmt::format("did not complete within {} ms", timeout().count()));
    backoff.pause();
  }
  initialized_ = true;
  for (PairChannel& ch : channels_) ch.comm->finish_create();
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::create(Communicator& host, const std::vector<Channel>& channels) {
  auto c = begin_create(host, channels);
  c->finish_create();
  return c;
}

// A channel's tag travels on its pair communicator; others match in posting order (see the header).
CommHandlePtr NcclCommunicator::post_p2p(P2pCall call, int tag) {
  std::string what = fmt::format("{} member {}{}", call.send ? "send to" : "recv from", call.peer, call.type == ncclBfloat16 ? " (bf16)" : "");
  for (PairChannel& ch : channels_)
    if (ch.tag == tag && ch.send == call.send && ch.peer == call.peer) {
      call.peer = call.send ? 1 : 0;  // the sender is member 0 of its pair
      return ch.comm->defer(std::move(what), call);
    }
  return defer(std::move(what), call);
}

void NcclCommunicator::set_compute_stream(cudaStream_t s) {
  compute_ = s;
  for (PairChannel& ch : channels_) ch.comm->set_compute_stream(s);
}

NcclCommunicator::~NcclCommunicator() {
  deferred_.clear();  // never issued: issuing them now could wait forever on peers that moved on
  if (comm_ && !initialized_) abort("destroyed during its init");
  if (comm_) {
    // Let issued work drain, then finalize (flushes NCCL's own queues) and destroy; anything that
    // does not end within the timeout is aborted rather than waited for.
    try {
      const auto deadline = Clock::now() + timeout();
      Backoff backoff(std::chrono::microseconds(1000));
      bool idle = false;
      while (!idle && Clock::now() <= deadline) {
        idle = poll_enqueue("teardown") && cudaStreamQuery(stream_) == cudaSuccess;
        if (!idle) backoff.pause();
      }
      if (idle && ncclCommFinalize(comm_) != ncclSuccess) {
        ncclResult_t state = ncclInProgress;
        while (state == ncclInProgress && Clock::now() <= deadline) {
          if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess) break;
          if (state == ncclInProgress) backoff.pause();
        }
        idle = state == ncclSuccess;
      }
      if (idle) {
        (void)ncclCommDestroy(comm_);
        comm_ = nullptr;
      }
    } catch (...) {
      // fail() already aborted; nothing may leave a destructor
    }
    if (comm_) abort("teardown did not finish");
  }
  if (scratch_) (void)cudaFree(scratch_);
  if (ready_) (void)cudaEventDestroy(ready_);
  if (stream_) (void)cudaStreamDestroy(stream_);
}

void NcclCommunicator::abort(const std::string& why) {
  if (aborted_) return;
  aborted_ = true;
  abort_reason_ = why;
  deferred_.clear();
  enqueuing_.clear();  // their handles now throw: NCCL will never record them as done
  if (comm_) (void)ncclCommAbort(comm_);
  comm_ = nullptr;
  for (PairChannel& ch : channels_) ch.comm->abort(why);
}

// ---- communicator: progress ----

std::string NcclCommunicator::where(const std::string& what) const {
  return fmt::format("{} on group {} (member {} of {})", what, name_, rank_, size_);
}

void NcclCommunicator::fail(const std::string& what, const std::string& why) {
  const std::string message = fmt::format("{} {}; the NCCL communicator was aborted", where(what), why);
  abort(fmt::format("{} {}", what, why));
  throw CommTimeout(message);
}

void NcclCommunicator::ensure_usable(const std::string& what) const {
  if (aborted_) throw CommTimeout(fmt::format("{}: the NCCL communicator was aborted earlier ({})", where(what), abort_reason_));
}

std::shared_ptr<nccl_detail::Op> NcclCommunicator::make_op(std::string what) {
  return std::make_shared<nccl_detail::Op>(std::move(what));
}

void NcclCommunicator::check_async(const std::string& what) {
  if (!comm_) return;
  ncclResult_t state = ncclSuccess;
  PX_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
  // In progress means an enqueue is under way, not a failure.
  if (state != ncclSuccess && state != ncclInProgress) {
    const char* last = ncclGetLastError(comm_);
    fail(what, fmt::format("failed: NCCL reported {}{}", ncclGetErrorString(state),
                           last && *last ? fmt::format(" ({})", last) : std::string()));
  }
}

bool NcclCommunicator::poll_enqueue(const std::string& what) {
  if (enqueuing_.empty()) return true;
  ncclResult_t state = ncclSuccess;
  PX_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
  if (state == ncclInProgress) return false;
  if (state != ncclSuccess) check_async(what);  // throws
  // NCCL has now put all of their work on the comm stream: an event recorded after it marks
  // their end. (Recorded earlier, it would fire before the work even started.)
  for (auto& op : enqueuing_) {
    PX_CUDA_CHECK(cudaEventRecord(op->done, stream_));
    op->recorded = true;
  }
  enqueuing_.clear();
  return true;
}

bool NcclCommunicator::try_issue_deferred(const std::string& what) {
  if (!poll_enqueue(what)) return false;
  if (deferred_.empty()) return true;
  issue_deferred();
  return poll_enqueue(what);
}

void NcclCommunicator::settle(const std::string& what) {
  const auto deadline = Clock::now() + timeout();
  Backoff backoff;
  while (!try_issue_deferred(what) || !deferred_.empty()) {
    on_wait();
    // Usually NCCL is still connecting to peers (connections are made at first use): a peer that
    // never reaches the same operation keeps it here.
    if (Clock::now() > deadline) fail(what, fmt::format("could not be enqueued by NCCL within {} ms", timeout().count()));
    backoff.pause();
  }
}

void NcclCommunicator::flush() {
  ensure_usable("flush");
  settle("flush");
  for (PairChannel& ch : channels_) ch.comm->flush();
}

void NcclCommunicator::run_p2p_group(std::span<const P2pCall> calls) {
  PX_NCCL_CHECK(ncclGroupStart());
  // ncclGroupEnd runs even after a rejected call, so no half-open group leaks into the next call.
  ncclResult_t first = ncclSuccess;
  const char* failed = nullptr;
  for (const P2pCall& c : calls) {
    const ncclResult_t r = c.send ? ncclSend(c.buf, c.count, c.type, c.peer, comm_, stream_)
                                  : ncclRecv(c.buf, c.count, c.type, c.peer, comm_, stream_);
    if (r != ncclSuccess && r != ncclInProgress && first == ncclSuccess) {
      first = r;
      failed = c.send ? "ncclSend" : "ncclRecv";
    }
  }
  const ncclResult_t end = ncclGroupEnd();
  if (first != ncclSuccess) cuda::throw_nccl_error(first, failed, __FILE__, __LINE__);
  cuda::check_nccl_async(end, "ncclGroupEnd", __FILE__, __LINE__);
}

void NcclCommunicator::issue_deferred() {
  assert(enqueuing_.empty());
  std::vector<Deferred> batch;
  batch.swap(deferred_);
  try {
    std::vector<P2pCall> calls;
    calls.reserve(batch.size());
    for (const Deferred& d : batch) {
      PX_CUDA_CHECK(cudaStreamWaitEvent(stream_, d.op->ready, 0));
      calls.push_back(d.call);
    }
    run_p2p_group(calls);
  } catch (...) {
    // Their handles must not wait for operations NCCL never took.
    abort("a deferred send or receive was rejected");
    throw;
  }
  for (Deferred& d : batch) {
    d.op->issued = true;
    enqueuing_.push_back(std::move(d.op));
  }
}

void NcclCommunicator::withdraw(const nccl_detail::Op* op) {
  std::erase_if(deferred_, [op](const Deferred& d) { return d.op.get() == op; });
}

template <class Enqueue>
CommHandlePtr NcclCommunicator::issue(std::string what, Enqueue&& enqueue) {
  ensure_usable(what);
  // NCCL takes no call while an enqueue is under way, and sends/receives posted earlier go first.
  settle(what);
  PX_CUDA_CHECK(cudaEventRecord(ready_, compute_));
  PX_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
  auto op = make_op(std::move(what));
  enqueue();
  op->issued = true;
  enqueuing_.push_back(op);
  poll_enqueue(op->what);
  return std::make_unique<NcclHandle>(*this, std::move(op));
}

CommHandlePtr NcclCommunicator::defer(std::string what, P2pCall call) {
  ensure_usable(what);
  assert(call.peer >= 0 && call.peer < size_);
  auto op = make_op(std::move(what));
  PX_CUDA_CHECK(cudaEventCreateWithFlags(&op->ready, cudaEventDisableTiming));
  PX_CUDA_CHECK(cudaEventRecord(op->ready, compute_));
  deferred_.push_back({call, op});
  return std::make_unique<NcclHandle>(*this, std::move(op));
}

void NcclCommunicator::wait_on(CommHandle& h, cudaStream_t stream) {  // NOLINT(readability-convert-member-functions-to-static)
  auto* nh = dynamic_cast<NcclHandle*>(&h);
  if (!nh) throw std::invalid_argument("NcclCommunicator::wait_on: the handle does not come from an NcclCommunicator");
  nh->wait_on(stream);
}

// ---- communicator: operations ----

CommHandlePtr NcclCommunicator::enqueue_all_reduce(void* buf, std::size_t count, ncclDataType_t type, ncclRedOp_t op, const char* what) {
  return issue(what, [&] { PX_NCCL_CHECK_ASYNC(ncclAllReduce(buf, buf, count, type, op, comm_, stream_)); });
}

CommHandlePtr NcclCommunicator::enqueue_reduce_scatter(const void* in, void* out, std::size_t out_count, ncclDataType_t type,
                                               const char* what) {
  return issue(what, [&] { PX_NCCL_CHECK_ASYNC(ncclReduceScatter(in, out, out_count, type, ncclSum, comm_, stream_)); });
}

CommHandlePtr NcclCommunicator::enqueue_all_gather(const void* in, void* out, std::size_t in_count, ncclDataType_t type,
                                           const char* what) {
  return issue(what, [&] { PX_NCCL_CHECK_ASYNC(ncclAllGather(in, out, in_count, type, comm_, stream_)); });
}

CommHandlePtr NcclCommunicator::start_all_reduce(std::span<float> buf) {
  return enqueue_all_reduce(buf.data(), buf.size(), ncclFloat32, ncclSum, "all_reduce");
}

CommHandlePtr NcclCommunicator::start_all_reduce_max(std::span<float> buf) {
  return enqueue_all_reduce(buf.data(), buf.size(), ncclFloat32, ncclMax, "all_reduce_max");
}

CommHandlePtr NcclCommunicator::start_reduce_scatter(std::span<const float> in, std::span<float> out) {
  assert(in.size() == out.size() * static_cast<std::size_t>(size_));
  return enqueue_reduce_scatter(in.data(), out.data(), out.size(), ncclFloat32, "reduce_scatter");
}

CommHandlePtr NcclCommunicator::start_all_gather(std::span<const float> in, std::span<float> out) {
  assert(out.size() == in.size() * static_cast<std::size_t>(size_));
  return enqueue_all_gather(in.data(), out.data(), in.size(), ncclFloat32, "all_gather");
}

// All-to-all as one group of a send and a receive per member: the form every NCCL version since
// point-to-point (2.7) runs, and the one all_to_all_v needs anyway.
CommHandlePtr NcclCommunicator::start_all_to_all(std::span<const float> in, std::span<float> out) {
  assert(in.size() == out.size());
  return enqueue_all_to_all(in.data(), out.data(), in.size(), ncclFloat32, sizeof(float), "all_to_all");
}

CommHandlePtr NcclCommunicator::enqueue_all_to_all(const void* in, void* out, std::size_t count, ncclDataType_t type, std::size_t size_of,
                                                   const char* what) {
  assert(count % static_cast<std::size_t>(size_) == 0);
  const std::size_t block = count / static_cast<std::size_t>(size_);
  std::vector<P2pCall> calls;
  if (block > 0)
    for (int j = 0; j < size_; ++j) {
      const std::size_t at = static_cast<std::size_t>(j) * block * size_of;
      calls.push_back({true, const_cast<std::byte*>(static_cast<const std::byte*>(in) + at), block, type, j});
      calls.push_back({false, static_cast<std::byte*>(out) + at, block, type, j});
    }
  return issue(what, [&] { run_p2p_group(calls); });
}

CommHandlePtr NcclCommunicator::start_all_to_all_v(std::span<const float> in, const std::vector<int>& send_counts,
                                                   const std::vector<int>& send_displs, std::span<float> out,
                                                   const std::vector<int>& recv_counts, const std::vector<int>& recv_displs) {
  assert(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_);
  assert(static_cast<int>(send_displs.size()) == size_ && static_cast<int>(recv_displs.size()) == size_);
  std::vector<P2pCall> calls;
  for (int j = 0; j < size_; ++j) {
    const auto u = static_cast<std::size_t>(j);
    // An empty block is skipped on both sides alike: the receiver's count from us is ours to it.
    if (send_counts[u] > 0) {
      assert(static_cast<std::size_t>(send_displs[u] + send_counts[u]) <= in.size());
      calls.push_back({true, const_cast<float*>(in.data() + send_displs[u]), static_cast<std::size_t>(send_counts[u]), ncclFloat32, j});
    }
    if (recv_counts[u] > 0) {
      assert(static_cast<std::size_t>(recv_displs[u] + recv_counts[u]) <= out.size());
      calls.push_back({false, out.data() + recv_displs[u], static_cast<std::size_t>(recv_counts[u]), ncclFloat32, j});
    }
  }
  return issue("all_to_all_v", [&] { run_p2p_group(calls); });
}

CommHandlePtr NcclCommunicator::start_broadcast(std::span<float> buf, int root) {
  assert(root >= 0 && root < size_);
  return issue("broadcast", [&] {
    PX_NCCL_CHECK_ASYNC(ncclBroadcast(buf.data(), buf.data(), buf.size(), ncclFloat32, root, comm_, stream_));
  });
}

CommHandlePtr NcclCommunicator::start_send(std::span<const float> buf, int peer, int tag) {
  return post_p2p({true, const_cast<float*>(buf.data()), buf.size(), ncclFloat32, peer}, tag);
}

CommHandlePtr NcclCommunicator::start_recv(std::span<float> buf, int peer, int tag) {
  return post_p2p({false, buf.data(), buf.size(), ncclFloat32, peer}, tag);
}

// A maximum over one zero stays zero however many barriers run (a sum would grow to infinity).
CommHandlePtr NcclCommunicator::start_barrier() { return enqueue_all_reduce(scratch_, 1, ncclFloat32, ncclMax, "barrier"); }

CommHandlePtr NcclCommunicator::start_all_reduce_bf16(std::span<bf16> buf) {
  return enqueue_all_reduce(buf.data(), buf.size(), ncclBfloat16, ncclSum, "all_reduce (bf16)");
}

CommHandlePtr NcclCommunicator::start_reduce_scatter_bf16(std::span<const bf16> in, std::span<bf16> out) {
  assert(in.size() == out.size() * static_cast<std::size_t>(size_));
  return enqueue_reduce_scatter(in.data(), out.data(), out.size(), ncclBfloat16, "reduce_scatter (bf16)");
}

CommHandlePtr NcclCommunicator::start_all_gather_bf16(std::span<const bf16> in, std::span<bf16> out) {
  assert(out.size() == in.size() * static_cast<std::size_t>(size_));
  return enqueue_all_gather(in.data(), out.data(), in.size(), ncclBfloat16, "all_gather (bf16)");
}

CommHandlePtr NcclCommunicator::start_all_to_all_bf16(std::span<const bf16> in, std::span<bf16> out) {
  assert(in.size() == out.size());
  return enqueue_all_to_all(in.data(), out.data(), in.size(), ncclBfloat16, sizeof(bf16), "all_to_all (bf16)");
}

CommHandlePtr NcclCommunicator::start_send_bf16(std::span<const bf16> buf, int peer, int tag) {
  return post_p2p({true, const_cast<bf16*>(buf.data()), buf.size(), ncclBfloat16, peer}, tag);
}

CommHandlePtr NcclCommunicator::start_recv_bf16(std::span<bf16> buf, int peer, int tag) {
  return post_p2p({false, buf.data(), buf.size(), ncclBfloat16, peer}, tag);
}

// ---- groups ----

int select_local_device(int local_rank) {
  const int n = cuda::device_count();
  if (n == 0) cuda::throw_cuda_error("CUDA", "select_local_device", "no CUDA device is visible", __FILE__, __LINE__);
  const int device = local_rank % n;
  PX_CUDA_CHECK(cudaSetDevice(device));
  return device;
}

NcclGroups make_nccl_groups(const Topology& topology, int world_rank, const MpiGroups& mpi) {
  NcclGroups out;
  // Every rank walks the group kinds in the same order, so each group's id broadcast finds all of
  // its members; the NCCL inits then run side by side and are awaited together.
  for (int g = 1; g < kNumGroupKinds; ++g) {
    const auto kind = static_cast<GroupKind>(g);
    Communicator* host = mpi[kind];
    const int id = topology.group_id(kind, world_rank);
    if (!host && id < 0) continue;
    if (!host || id < 0 || host->rank() != topology.group_index(kind, world_rank) ||
        host->size() != static_cast<int>(topology.members(kind, id).size()))
      throw std::logic_error(fmt::format("make_nccl_groups: the MPI groups do not follow the topology for {} (rank {})",
                                         to_string(kind), world_rank));
    const std::vector<NcclCommunicator::Channel> channels =
        kind == GroupKind::PP ? std::vector<NcclCommunicator::Channel>{{kForwardTag, +1}, {kBackwardTag, -1}}
                              : std::vector<NcclCommunicator::Channel>{};
    out.group[static_cast<std::size_t>(g)] = NcclCommunicator::begin_create(*host, channels);
  }
  for (auto& c : out.group)
    if (c) c->finish_create();
  return out;
}

}  // namespace px
