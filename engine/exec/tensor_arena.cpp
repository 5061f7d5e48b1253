// One aligned block per rank; tensor views by the planner's offsets.
#include "engine/exec/tensor_arena.hpp"

#include <cassert>
#include <cstdlib>
#include <cstring>
#include <new>

namespace px {

void TensorArena::Free::operator()(std::byte* p) const {
  if (memory)
    memory->release(p);
  else
    std::free(p);
}

TensorArena::TensorArena(const Program& program, const MemoryPlan& plan, ArenaMemory* memory)
    : program_(program), plan_(plan), memory_(memory), base_(nullptr, Free{memory}) {
  constexpr std::size_t kAlign = 256;
  const auto size = std::max<std::size_t>(static_cast<std::size_t>((plan.arena_bytes + kAlign - 1) / kAlign * kAlign), kAlign);
  if (memory) {
    base_.reset(memory->allocate(size));
    return;
  }
  auto* p = static_cast<std::byte*>(std::aligned_alloc(kAlign, size));
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, size);  // deterministic contents: gradients start at zero, padding is zero
  base_.reset(p);
}

void TensorArena::zero(std::uint32_t tensor) {
  const auto b = bytes(tensor);
  if (memory_)
    memory_->zero(b);
  else
    std::memset(b.data(), 0, b.size());
}

void TensorArena::read(std::uint32_t tensor, std::byte* host) {
  const auto b = bytes(tensor);
  if (memory_)
    memory_->download(b, host);
  else
    std::memcpy(host, b.data(), b.size());
}

void TensorArena::write(std::uint32_t tensor, const std::byte* host) {
  const auto b = bytes(tensor);
  if (memory_)
    memory_->upload(host, b);
  else
    std::memcpy(b.data(), host, b.size());
}

std::span<std::byte> TensorArena::bytes_at(std::int64_t offset, std::int64_t bytes) {
  return {base_.get() + offset, static_cast<std::size_t>(bytes)};
}

std::span<std::byte> TensorArena::bytes(std::uint32_t tensor) {
  assert(tensor < program_.tensors.size());
  return {base_.get() + plan_.offsets[tensor], static_cast<std::size_t>(program_.tensors[tensor].bytes)};
}

std::span<float> TensorArena::floats(std::uint32_t tensor) {
  const auto b = bytes(tensor);
  assert(b.size() % sizeof(float) == 0);
  return {reinterpret_cast<float*>(b.data()), b.size() / sizeof(float)};
}

}  // namespace px
