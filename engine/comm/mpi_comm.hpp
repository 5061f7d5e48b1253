// MPI collectives for CPU ranks: one MPI communicator per process group instance, split from
// MPI_COMM_WORLD with the plan's topology. Nonblocking MPI calls polled against a deadline give
// every collective a timeout.
#pragma once

#include <array>
#include <memory>

#include "engine/comm/communicator.hpp"
#include "engine/plan/topology.hpp"

namespace px {

// MPI_Init on construction (thread level: funneled), MPI_Finalize on destruction; one per process.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  int world_rank() const { return rank_; }
  int world_size() const { return size_; }
  std::unique_ptr<Communicator> world() const;
  // Ends every rank of the job (after a timeout or a peer's failure).
  [[noreturn]] static void abort_job(int code);

 private:
  int rank_ = 0, size_ = 1;
};

// This rank's communicator for every group kind of the plan (null where the rank is in no
// instance, e.g. the embedding group off the first and last stage). Collective across all ranks.
struct MpiGroups {
  std::array<std::unique_ptr<Communicator>, kNumGroupKinds> group;
  Communicator* operator[](GroupKind g) const { return group[static_cast<std::size_t>(g)].get(); }
};
MpiGroups make_mpi_groups(const Topology& topology, int world_rank);

}  // namespace px
