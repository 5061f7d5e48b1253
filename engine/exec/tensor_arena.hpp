// The memory of one rank: a single block laid out by the memory planner, with a view per tensor.
// Allocating once per run (not per op) is what makes the planner's peak the rank's real peak.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "engine/plan/memory_planner.hpp"
#include "engine/plan/program.hpp"

namespace px {

// Memory an arena may live in other than the host's: a device backend's (CUDA) allocator.
class ArenaMemory {
 public:
  virtual ~ArenaMemory() = default;
  virtual std::byte* allocate(std::size_t bytes) = 0;  // zero-filled, 256-byte aligned
  virtual void release(std::byte* p) = 0;
  virtual void zero(std::span<std::byte> bytes) = 0;    // in order with the device's work
  // Copies to and from host memory (checkpoints), after the device's work so far; done on return.
  virtual void download(std::span<const std::byte> from, std::byte* to) = 0;
  virtual void upload(const std::byte* from, std::span<std::byte> to) = 0;
};

class TensorArena {
 public:
  // In host memory, or in `memory` when given (which must outlive the arena).
  TensorArena(const Program& program, const MemoryPlan& plan, ArenaMemory* memory = nullptr);

  // The tensor's bytes: host memory, or device memory the host must not touch (on_device()).
  std::span<std::byte> bytes(std::uint32_t tensor);
  // fp32 view; the CPU engine runs fp32 plans, so every tensor is a whole number of floats.
  std::span<float> floats(std::uint32_t tensor);
  // Arena bytes [offset, offset + bytes), e.g. a comm op's operand (engine/exec/comm_layout.hpp).
  std::span<std::byte> bytes_at(std::int64_t offset, std::int64_t bytes);
  void zero(std::uint32_t tensor);
  // The tensor's bytes to or from host memory, wherever the arena lives.
  void read(std::uint32_t tensor, std::byte* host);
  void write(std::uint32_t tensor, const std::byte* host);
  bool on_device() const { return memory_ != nullptr; }
  std::int64_t offset(std::uint32_t tensor) const { return plan_.offsets[tensor]; }
  std::int64_t size_bytes() const { return plan_.arena_bytes; }

 private:
  const Program& program_;
  const MemoryPlan& plan_;
  ArenaMemory* memory_;
  struct Free {
    ArenaMemory* memory;
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte, Free> base_;
};

}  // namespace px
