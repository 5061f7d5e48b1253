// Liveness-based arena placement. Best-fit over a free list keyed by offset (with coalescing)
// keeps fragmentation low for the stash-and-release pattern of pipelined training.
#include "engine/plan/memory_planner.hpp"

#include <algorithm>
#include <cassert>
#include <map>
#include <set>

namespace px {
namespace {
constexpr std::int64_t kAlign = 256;  // what CUDA allocations guarantee
std::int64_t align(std::int64_t b) { return (b + kAlign - 1) / kAlign * kAlign; }
}  // namespace

MemoryPlan plan_memory(const Program& program) {
  MemoryPlan plan;
  const auto& tensors = program.tensors;
  plan.offsets.assign(tensors.size(), 0);
  for (std::size_t i = 0; i < tensors.size(); ++i)
    if (is_persistent(tensors[i].cls)) {
      plan.offsets[i] = plan.static_bytes;
      plan.static_bytes += align(tensors[i].bytes);
    }

  // Births and deaths per op, for both the live sweep and the allocator.
  const std::size_t n_ops = std::max<std::size_t>(program.ops.size(), 1);
  std::vector<std::vector<std::uint32_t>> born(n_ops), dies(n_ops);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    if (is_persistent(t.cls) || t.bytes == 0) continue;
    assert(t.first_op <= t.last_op);
    born[t.first_op].push_back(static_cast<std::uint32_t>(i));
    dies[t.last_op].push_back(static_cast<std::uint32_t>(i));
  }

  std::map<std::int64_t, std::int64_t> free_by_offset;            // offset -> size
  std::set<std::pair<std::int64_t, std::int64_t>> free_by_size;   // (size, offset)
  std::int64_t top = 0, live = 0;
  std::array<std::int64_t, kNumTensorClasses> live_by_class{};
  auto take = [&](std::int64_t size) {
    auto it = free_by_size.lower_bound({size, -1});
    if (it == free_by_size.end()) {
      // Grow at the top, merging with a free block that ends there.
      std::int64_t off = top;
      if (!free_by_offset.empty()) {
        auto last = std::prev(free_by_offset.end());
        if (last->first + last->second == top) {
          off = last->first;
          free_by_size.erase({last->second, last->first});
          free_by_offset.erase(last);
        }
      }
      top = off + size;
      return off;
    }
    const auto [fsize, off] = *it;
    free_by_size.erase(it);
    free_by_offset.erase(off);
    if (fsize > size) {
      free_by_offset[off + size] = fsize - size;
      free_by_size.insert({fsize - size, off + size});
    }
    return off;
  };
  auto give = [&](std::int64_t off, std::int64_t size) {
    auto next = free_by_offset.lower_bound(off);
    if (next != free_by_offset.end() && off + size == next->first) {
      size += next->second;
      free_by_size.erase({next->second, next->first});
      next = free_by_offset.erase(next);
    }
    if (next != free_by_offset.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == off) {
        off = prev->first;
        size += prev->second;
        free_by_size.erase({prev->second, prev->first});
        free_by_offset.erase(prev);
      }
    }
    free_by_offset[off] = size;
    free_by_size.insert({size, off});
  };

  for (std::size_t op = 0; op < program.ops.size(); ++op) {
    for (auto i : born[op]) {
      const auto size = align(tensors[i].bytes);
      plan.offsets[i] = plan.static_bytes + take(size);
      live += size;
      live_by_class[static_cast<std::size_t>(tensors[i].cls)] += size;
    }
    if (plan.static_bytes + live > plan.peak_live_bytes) {
      plan.peak_live_bytes = plan.static_bytes + live;
      plan.peak_op = static_cast<std::uint32_t>(op);
      plan.live_at_peak = live_by_class;
    }
    for (auto i : dies[op]) {
      const auto size = align(tensors[i].bytes);
      give(plan.offsets[i] - plan.static_bytes, size);
      live -= size;
      live_by_class[static_cast<std::size_t>(tensors[i].cls)] -= size;
    }
  }
  if (plan.peak_live_bytes < plan.static_bytes) plan.peak_live_bytes = plan.static_bytes;
  for (std::size_t i = 0; i < tensors.size(); ++i)
    if (is_persistent(tensors[i].cls)) plan.live_at_peak[static_cast<std::size_t>(tensors[i].cls)] += align(tensors[i].bytes);
  plan.arena_bytes = plan.static_bytes + top;
  return plan;
}

}  // namespace px
