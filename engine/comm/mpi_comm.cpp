// MPI communicators per process group. Every call is nonblocking and polled until a deadline, so
// a peer that died or hangs turns into a CommTimeout naming the group and the operation.
#include "engine/comm/mpi_comm.hpp"

#include <mpi.h>

#include <cassert>
#include <fmt/format.h>
#include <thread>

#include "engine/core/error.hpp"

// Checked MPI call: a failure names the call and where it was made.
#define PX_MPI_CHECK(call)                                                                            \
  do {                                                                                                \
    const int px_mpi_rc = (call);                                                                     \
    if (px_mpi_rc != MPI_SUCCESS) ::px::mpi_failed(px_mpi_rc, #call, __FILE__, __LINE__);            \
  } while (0)

namespace px {

[[noreturn]] void mpi_failed(int rc, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw std::runtime_error(fmt::format("{}:{}: {} failed: {}", file, line, call, std::string(text, static_cast<std::size_t>(len))));
}

namespace {

int as_int(std::size_t n) {
  assert(n <= static_cast<std::size_t>(INT32_MAX));
  return static_cast<int>(n);
}

// One MPI request, polled until a deadline: a peer that died or hangs becomes a CommTimeout naming
// the group and the operation instead of a hang.
class MpiHandle final : public CommHandle {
 public:
  MpiHandle(const Communicator& comm, std::string what, bool cancellable)
      : comm_(comm), what_(std::move(what)), cancellable_(cancellable) {}
  ~MpiHandle() override {
    // A message dropped unfinished (after a timeout) is withdrawn so that it cannot match a later
    // one. A collective cannot be withdrawn; the job ends after one times out anyway.
    if (request_ != MPI_REQUEST_NULL && cancellable_) {
      MPI_Cancel(&request_);
      MPI_Request_free(&request_);
    }
  }
  MPI_Request* request() { return &request_; }

  bool test() override {
    if (request_ == MPI_REQUEST_NULL) return true;
    int done = 0;
    PX_MPI_CHECK(MPI_Test(&request_, &done, MPI_STATUS_IGNORE));
    return done != 0;
  }

  // Polls, and after a few microseconds yields the core between polls, so a rank never spins a
  // core a peer on the same machine needs. It never sleeps: a sleep lasts at least the kernel's
  // timer slack (50 us on Linux), and a collective that needs several rounds of progress would
  // pay it each round (about 160 us for a 2-rank all-reduce of any size, 20 times its cost).
  void wait() override {
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + comm_.timeout();
    while (!test()) {
      comm_.on_wait();
      const auto now = std::chrono::steady_clock::now();
      if (now - start < std::chrono::microseconds(20)) continue;
      if (now > deadline)
        throw CommTimeout(fmt::format("{} on group {} (member {} of {}) did not complete within {} ms", what_, comm_.name(),
                                      comm_.rank(), comm_.size(), comm_.timeout().count()));
      std::this_thread::yield();
    }
  }

 private:
  const Communicator& comm_;
  std::string what_;
  bool cancellable_;  // point-to-point requests can be withdrawn, collectives cannot
  MPI_Request request_ = MPI_REQUEST_NULL;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, std::string name, bool owned) : comm_(comm), name_(std::move(name)), owned_(owned) {
    PX_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    PX_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiCommunicator() override {
    if (owned_) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }

  CommHandlePtr start_all_reduce(std::span<float> buf) override { return all_reduce(buf, MPI_SUM, "all_reduce"); }
  CommHandlePtr start_all_reduce_max(std::span<float> buf) override { return all_reduce(buf, MPI_MAX, "all_reduce_max"); }
  CommHandlePtr start_reduce_scatter(std::span<const float> in, std::span<float> out) override {
    assert(in.size() == out.size() * static_cast<std::size_t>(size_));
    auto h = handle("reduce_scatter");
    PX_MPI_CHECK(MPI_Ireduce_scatter_block(in.data(), out.data(), as_int(out.size()), MPI_FLOAT, MPI_SUM, comm_, h->request()));
    return h;
  }
  CommHandlePtr start_all_gather(std::span<const float> in, std::span<float> out) override {
    assert(out.size() == in.size() * static_cast<std::size_t>(size_));
    auto h = handle("all_gather");
    PX_MPI_CHECK(
        MPI_Iallgather(in.data(), as_int(in.size()), MPI_FLOAT, out.data(), as_int(in.size()), MPI_FLOAT, comm_, h->request()));
    return h;
  }
  CommHandlePtr start_all_to_all(std::span<const float> in, std::span<float> out) override {
    assert(in.size() == out.size() && in.size() % static_cast<std::size_t>(size_) == 0);
    const int block = as_int(in.size() / static_cast<std::size_t>(size_));
    auto h = handle("all_to_all");
    PX_MPI_CHECK(MPI_Ialltoall(in.data(), block, MPI_FLOAT, out.data(), block, MPI_FLOAT, comm_, h->request()));
    return h;
  }
  CommHandlePtr start_all_to_all_v(std::span<const float> in, const std::vector<int>& send_counts,
                                   const std::vector<int>& send_displs, std::span<float> out,
                                   const std::vector<int>& recv_counts, const std::vector<int>& recv_displs) override {
    assert(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_);
    auto h = handle("all_to_all_v");
    PX_MPI_CHECK(MPI_Ialltoallv(in.data(), send_counts.data(), send_displs.data(), MPI_FLOAT, out.data(), recv_counts.data(),
                                recv_displs.data(), MPI_FLOAT, comm_, h->request()));
    return h;
  }
  CommHandlePtr start_broadcast(std::span<float> buf, int root) override {
    auto h = handle("broadcast");
    PX_MPI_CHECK(MPI_Ibcast(buf.data(), as_int(buf.size()), MPI_FLOAT, root, comm_, h->request()));
    return h;
  }
  CommHandlePtr start_send(std::span<const float> buf, int peer, int tag) override {
    auto h = handle(fmt::format("send to member {}", peer), true);
    PX_MPI_CHECK(MPI_Isend(buf.data(), as_int(buf.size()), MPI_FLOAT, peer, tag, comm_, h->request()));
    return h;
  }
  CommHandlePtr start_recv(std::span<float> buf, int peer, int tag) override {
    auto h = handle(fmt::format("recv from member {}", peer), true);
    PX_MPI_CHECK(MPI_Irecv(buf.data(), as_int(buf.size()), MPI_FLOAT, peer, tag, comm_, h->request()));
    return h;
  }
  CommHandlePtr start_barrier() override {
    auto h = handle("barrier");
    PX_MPI_CHECK(MPI_Ibarrier(comm_, h->request()));
    return h;
  }

 private:
  std::unique_ptr<MpiHandle> handle(std::string what, bool cancellable = false) const {
    return std::make_unique<MpiHandle>(*this, std::move(what), cancellable);
  }
  CommHandlePtr all_reduce(std::span<float> buf, MPI_Op op, const char* what) {
    auto h = handle(what);
    PX_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf.data(), as_int(buf.size()), MPI_FLOAT, op, comm_, h->request()));
    return h;
  }

  MPI_Comm comm_;
  std::string name_;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int provided = 0;
  PX_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  // Errors come back as codes (and become exceptions) instead of aborting inside MPI.
  PX_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  PX_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  PX_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
}

MpiRuntime::~MpiRuntime() { MPI_Finalize(); }

std::unique_ptr<Communicator> MpiRuntime::world() const {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "world", false);
}

void MpiRuntime::abort_job(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();  // MPI_Abort does not return; this keeps the [[noreturn]] promise for the compiler
}

MpiGroups make_mpi_groups(const Topology& topology, int world_rank) {
  MpiGroups out;
  for (int g = 1; g < kNumGroupKinds; ++g) {
    const auto kind = static_cast<GroupKind>(g);
    const int id = topology.group_id(kind, world_rank);
    MPI_Comm comm = MPI_COMM_NULL;
    // Every rank takes part in every split; ranks outside the group pass MPI_UNDEFINED.
    PX_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, id < 0 ? MPI_UNDEFINED : id, id < 0 ? 0 : topology.group_index(kind, world_rank),
                                &comm));
    if (comm == MPI_COMM_NULL) continue;
    PX_MPI_CHECK(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
    out.group[static_cast<std::size_t>(g)] =
        std::make_unique<MpiCommunicator>(comm, fmt::format("{}#{}", to_string(kind), id), true);
  }
  return out;
}

}  // namespace px
