// The CUDA backend's small tensor operations against the CPU's loop of the same step.
#include <gtest/gtest.h>

#include <vector>

#include "engine/backends/cuda/device_buffer.hpp"
#include "engine/backends/cuda/tensor_ops.hpp"
#include "tests/cuda/gpu_test.hpp"

namespace px::cuda {
namespace {

// A staged reduce-scatter's shard added into the gradient it accumulates: one fp32 addition per
// element, so the result is the CPU's bit for bit. Sizes: empty, one, and more than a wave of blocks.
TEST(CudaTensorOps, AddIsTheCpusFp32Sum) {
  PX_REQUIRE_GPU();
  for (const std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{3} << 22}) {
    const std::vector<float> x = test::uniform(n, 1, -4.0f, 4.0f), y0 = test::uniform(n, 2, -4.0f, 4.0f);
    DeviceBuffer<float> dx{std::span<const float>(x)}, dy{std::span<const float>(y0)};
    add(dx.data(), dy.data(), static_cast<std::int64_t>(n), nullptr);
    const std::vector<float> got = dy.download();
    ASSERT_EQ(got.size(), n);
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], y0[i] + x[i]) << "n " << n << ", element " << i;
  }
}

}  // namespace
}  // namespace px::cuda
