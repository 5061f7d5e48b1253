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

  void all_reduce(std::span<float> buf) override {
    MPI_Request r;
    PX_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buf.data(), as_int(buf.size()), MPI_FLOAT, MPI_SUM, comm_, &r));
    wait(r, "all_reduce");
  }
  void reduce_scatter(std::span<const float> in, std::span<float> out) override {
    assert(in.size() == out.size() * static_cast<std::size_t>(size_));
    MPI_Request r;
    PX_MPI_CHECK(MPI_Ireduce_scatter_block(in.data(), out.data(), as_int(out.size()), MPI_FLOAT, MPI_SUM, comm_, &r));
    wait(r, "reduce_scatter");
  }
  void all_gather(std::span<const float> in, std::span<float> out) override {
    assert(out.size() == in.size() * static_cast<std::size_t>(size_));
    MPI_Request r;
    PX_MPI_CHECK(MPI_Iallgather(in.data(), as_int(in.size()), MPI_FLOAT, out.data(), as_int(in.size()), MPI_FLOAT, comm_, &r));
    wait(r, "all_gather");
  }
  void all_to_all(std::span<const float> in, std::span<float> out) override {
    assert(in.size() == out.size() && in.size() % static_cast<std::size_t>(size_) == 0);
    const int block = as_int(in.size() / static_cast<std::size_t>(size_));
    MPI_Request r;
    PX_MPI_CHECK(MPI_Ialltoall(in.data(), block, MPI_FLOAT, out.data(), block, MPI_FLOAT, comm_, &r));
    wait(r, "all_to_all");
  }
  void all_to_all_v(std::span<const float> in, const std::vector<int>& send_counts, const std::vector<int>& send_displs,
                    std::span<float> out, const std::vector<int>& recv_counts, const std::vector<int>& recv_displs) override {
    assert(static_cast<int>(send_counts.size()) == size_ && static_cast<int>(recv_counts.size()) == size_);
    MPI_Request r;
    PX_MPI_CHECK(MPI_Ialltoallv(in.data(), send_counts.data(), send_displs.data(), MPI_FLOAT, out.data(), recv_counts.data(),
                                recv_displs.data(), MPI_FLOAT, comm_, &r));
    wait(r, "all_to_all_v");
  }
  void broadcast(std::span<float> buf, int root) override {
    MPI_Request r;
    PX_MPI_CHECK(MPI_Ibcast(buf.data(), as_int(buf.size()), MPI_FLOAT, root, comm_, &r));
    wait(r, "broadcast");
  }
  void send(std::span<const float> buf, int peer) override {
    MPI_Request r;
    PX_MPI_CHECK(MPI_Isend(buf.data(), as_int(buf.size()), MPI_FLOAT, peer, kTag, comm_, &r));
    wait(r, fmt::format("send to member {}", peer), true);
  }
  void recv(std::span<float> buf, int peer) override {
    MPI_Request r;
    PX_MPI_CHECK(MPI_Irecv(buf.data(), as_int(buf.size()), MPI_FLOAT, peer, kTag, comm_, &r));
    wait(r, fmt::format("recv from member {}", peer), true);
  }
  void send_recv(std::span<const float> out, int to, std::span<float> in, int from) override {
    MPI_Request r[2];
    PX_MPI_CHECK(MPI_Irecv(in.data(), as_int(in.size()), MPI_FLOAT, from, kTag, comm_, &r[1]));
    PX_MPI_CHECK(MPI_Isend(out.data(), as_int(out.size()), MPI_FLOAT, to, kTag, comm_, &r[0]));
    wait(r[1], fmt::format("recv from member {}", from), true);
    wait(r[0], fmt::format("send to member {}", to), true);
  }
  void barrier() override {
    MPI_Request r;
    PX_MPI_CHECK(MPI_Ibarrier(comm_, &r));
    wait(r, "barrier");
  }

 private:
  static constexpr int kTag = 7;

  // Polls until done or the deadline; backs off so a waiting rank does not spin a core that a
  // peer on the same machine needs.
  void wait(MPI_Request& r, const std::string& what, bool cancellable = false) {
    const auto deadline = std::chrono::steady_clock::now() + timeout();
    auto pause = std::chrono::microseconds(1);
    for (;;) {
      int done = 0;
      PX_MPI_CHECK(MPI_Test(&r, &done, MPI_STATUS_IGNORE));
      if (done) return;
      if (std::chrono::steady_clock::now() > deadline) {
        // A point-to-point request can be withdrawn so that it cannot match a later message;
        // collectives cannot, and the job ends after a collective times out anyway.
        if (cancellable) {
          MPI_Cancel(&r);
          MPI_Request_free(&r);
        }
        throw CommTimeout(fmt::format("{} on group {} (member {} of {}) did not complete within {} ms", what, name_, rank_,
                                      size_, timeout().count()));
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(200));
    }
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
