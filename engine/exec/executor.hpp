// The executor: runs one rank's op program for real. One host thread issues ops in program order
// (the dry run's in-order mode proves that order deadlock-free for every strategy): compute and
// memory ops run to completion on the backend; comm ops are posted nonblocking on the rank's
// process-group communicators and waited for only where a later op depends on them or is about to
// overwrite bytes they still use (on a device backend with communicators of its own, the device
// waits there, not the host). Every op's real start and end is recorded.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "engine/comm/communicator.hpp"
#include "engine/exec/comm_layout.hpp"
#include "engine/exec/heartbeat.hpp"
#include "engine/exec/tensor_arena.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/plan/dry_run.hpp"

namespace px {

// The kernels of one backend (CPU reference, CUDA), dispatched per op.
class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;
  // Runs compute or memory op `index` of `program` on the arena's tensors.
  virtual void run(const Program& program, std::uint32_t index, TensorArena& arena) = 0;

  // A device backend (CUDA) returns the memory its arena lives in, runs its ops asynchronously in
  // program order and times them by the device's clock; the host backend (null) runs each op to
  // completion on the executor's thread, which times it.
  virtual ArenaMemory* arena_memory() { return nullptr; }
  // Device backends: comm op `index` is served here without moving data (a stand-in); it is
  // recorded at this point of the device's work.
  virtual void mark(std::uint32_t /*index*/) {}
  // Device backends: called once the iteration's last op is issued; waits for the device and
  // writes every op's device start and end into `timings`, on the executor's clock.
  virtual void device_timings(std::span<OpTiming> /*timings*/) {}

  // Device backends with communicators of their own (NCCL over device buffers): a comm op whose
  // communicator is no stand-in goes to post_comm and finish_comm, not to the host's staging.
  virtual bool device_comm() const { return false; }
  // Posts comm op `index` as `layout` has it on `comm`, after the device's work so far, with
  // staging buffers of the backend's own; returns its handles.
  virtual std::vector<CommHandlePtr> post_comm(std::uint32_t index, const CommLayout& layout, Communicator& comm, TensorArena& arena);
  // The op finished on the host's test, or a later op needs it: the device's later work waits for
  // it (the host does not) and its output leaves staging. The backend keeps the handles until
  // device_timings, which waits for them on the host (against the communicators' timeout, so a
  // dead peer ends the iteration with CommTimeout) and times the op by them.
  virtual void finish_comm(std::uint32_t index, const CommLayout& layout, std::vector<CommHandlePtr> handles, TensorArena& arena);
};

// Runs no arithmetic: for exercising the schedule, the memory layout and the real collectives.
class NullBackend final : public ComputeBackend {
 public:
  void run(const Program&, std::uint32_t, TensorArena&) override {}
};

using GroupComms = std::array<Communicator*, kNumGroupKinds>;  // null where the rank has no group

// A collective or message timed out; says which op waited and which rank stopped first.
class RankFailure : public CommTimeout {
 public:
  using CommTimeout::CommTimeout;
  int failed_rank = -1;  // -1: no heartbeat directory to tell
};

class Executor {
 public:
  // On a host backend `plan` must be an fp32 plan (precision and gradients): the CPU engine's
  // arithmetic and its communicators' buffers. On a device backend a communicator is a stand-in
  // (comm ops move no data: one rank alone) unless the backend has device_comm().
  Executor(const CompiledPlan& plan, int rank, ComputeBackend& backend, const GroupComms& groups);

  // One iteration; timings in seconds since the executor was made. A comm timeout becomes a
  // RankFailure naming the op and, with heartbeats on, the rank that stopped first.
  std::vector<OpTiming> run_iteration();

  // Keeps a heartbeat file in `dir` (shared by all ranks of the run) while running.
  void enable_heartbeat(const std::filesystem::path& dir);

  TensorArena& arena() { return arena_; }
  const MemoryPlan& memory() const { return memory_; }
  // The highest arena byte any op has written so far: the rank's measured peak.
  std::int64_t touched_bytes() const { return touched_; }
  // Of the last iteration, per op: the host thread's own time in a comm op (packing its staging
  // buffer and posting it, moving it on in the tests between ops, unpacking the result),
  // seconds; 0 for other ops.
  std::span<const double> host_seconds() const { return host_; }

 private:
  struct InFlight {
    std::uint32_t op;
    HostComm comm;  // a device backend's op: its handles only (the staging is the backend's)
  };

  std::vector<OpTiming> run_ops();
  void post(std::uint32_t index);
  void finish(InFlight& f);
  void wait_for(std::uint32_t op);
  void wait_overlapping(std::uint32_t index);
  double now() const;

  const CompiledPlan& plan_;
  const Program& program_;
  int rank_;
  ComputeBackend& backend_;
  bool device_;
  GroupComms groups_;
  MemoryPlan memory_;
  TensorArena arena_;
  std::vector<CommLayout> layouts_;  // per op (comm ops')
  std::vector<InFlight> in_flight_;
  std::vector<OpTiming> timings_;
  std::vector<double> host_;
  double epoch_;
  std::filesystem::path heartbeat_dir_;
  std::optional<Heartbeat> heartbeat_;
  int iteration_ = 0;
  std::uint32_t current_op_ = 0;
  std::int64_t touched_ = 0;
};

}  // namespace px
