// Memory planner: places a program's tensors in one device arena by liveness and reports the
// rank's peak. Persistent tensors (weights, gradients, optimizer states) get a static region; the
// rest are placed best-fit in program order, reusing space whose tensor has died.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "engine/plan/program.hpp"

namespace px {

struct MemoryPlan {
  std::int64_t static_bytes = 0;      // persistent region
  std::int64_t arena_bytes = 0;       // static + the dynamic region's high-water mark
  std::int64_t peak_live_bytes = 0;   // static + the most bytes alive at one op (lower bound)
  std::uint32_t peak_op = 0;          // op at which the live peak occurs
  std::array<std::int64_t, kNumTensorClasses> live_at_peak{};  // by tensor class
  std::vector<std::int64_t> offsets;  // per tensor, byte offset in the arena
};

MemoryPlan plan_memory(const Program& program);

}  // namespace px
