// How a comm op meets its communicator: the arena bytes it sends and receives, and what goes through
// a staging buffer because an operand spans several views, is one part of a view, or must be
// copied out when the op is posted (the buffer conventions in engine/plan/README.md). Worked out
// once per op from the program and the memory plan, so the host executor (memcpy and MPI) and a
// device backend (its own copies and NCCL) move exactly the same bytes.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "engine/comm/communicator.hpp"
#include "engine/exec/tensor_arena.hpp"
#include "engine/plan/memory_planner.hpp"
#include "engine/plan/program.hpp"

namespace px {

struct ArenaRange {
  std::int64_t offset = 0, bytes = 0;  // arena bytes
};

// One copy between the arena and a staging buffer.
struct StagingCopy {
  std::int64_t arena = 0;    // arena byte offset
  std::int64_t staging = 0;  // byte offset in the staging buffer
  std::int64_t bytes = 0;
};

inline constexpr int kStagingIn = 0, kStagingOut = 1;

// An operand of the call: a whole staging buffer, or arena bytes.
struct CommOperand {
  int staging = -1;  // kStagingIn, kStagingOut, or -1: `range`
  ArenaRange range;
};

struct CommLayout {
  enum class Call : std::uint8_t { AllReduce, AllReduceMax, AllGather, ReduceScatter, AllToAll, Send, Recv, RingExchange };
  Call call = Call::AllReduce;
  DType dtype = DType::F32;  // the elements on the wire
  // Send: to `to`; Recv: from `from`; RingExchange: receives from `from`, sends to `to`.
  int to = 0, from = 0, tag = 0;
  // AllReduce: `out` in place. AllGather, ReduceScatter, AllToAll: `in` -> `out`. Send: `in`.
  // Recv: `out`. RingExchange: `in` sent, `out` received.
  CommOperand in, out;
  // Staging buffers (0 bytes: none): zeroed, then filled from the arena before the call; the
  // output one is drained back into the arena when the op ends (added into it on `accumulate`).
  std::array<std::int64_t, 2> staging_bytes{};
  std::array<std::vector<StagingCopy>, 2> fill;
  std::vector<StagingCopy> drain;
  bool accumulate = false;
  // Arena bytes the op reads or writes while in flight, and the part of them it writes: later ops
  // touching them wait for it. A send's message is copied out at posting and holds nothing.
  std::vector<ArenaRange> holds, writes;
};

// The layout of comm op `index` of `program` on member `member` of its group of `size`.
CommLayout comm_layout(const Program& program, std::uint32_t index, const MemoryPlan& memory, int member, int size);

// A comm op in flight from host memory: its handles and the staging it owns.
struct HostComm {
  std::vector<CommHandlePtr> handles;
  std::array<std::vector<float>, 2> staging;
};
// Posts an fp32 op as `layout` says on `comm`, over a host arena.
HostComm post_on_host(const CommLayout& layout, Communicator& comm, TensorArena& arena);
// Once its handles have finished: the output staging back into the arena.
void drain_on_host(const CommLayout& layout, const HostComm& posted, TensorArena& arena);

}  // namespace px
