// Host-side bf16 conversions (cuda_bf16.h's host paths round to nearest even).
#include "engine/backends/cuda/device_buffer.hpp"

namespace px::cuda {

std::vector<bf16> to_bf16(std::span<const float> x) {
  std::vector<bf16> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = __float2bfloat16(x[i]);
  return out;
}

std::vector<float> to_float(std::span<const bf16> x) {
  std::vector<float> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = __bfloat162float(x[i]);
  return out;
}

std::vector<float> round_bf16(std::span<const float> x) {
  auto b = to_bf16(x);
  return to_float(b);
}

}  // namespace px::cuda
