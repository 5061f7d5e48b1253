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

class TensorArena {
 public:
  TensorArena(const Program& program, const MemoryPlan& plan);

  std::span<std::byte> bytes(std::uint32_t tensor);
  // fp32 view; the CPU engine runs fp32 plans, so every tensor is a whole number of floats.
  std::span<float> floats(std::uint32_t tensor);
  std::int64_t offset(std::uint32_t tensor) const { return plan_.offsets[tensor]; }
  std::int64_t size_bytes() const { return plan_.arena_bytes; }

 private:
  const Program& program_;
  const MemoryPlan& plan_;
  struct Free {
    void operator()(std::byte* p) const;
  };
  std::unique_ptr<std::byte, Free> base_;
};

}  // namespace px
