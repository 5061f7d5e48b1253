// Error formatting for the checked calls of check.hpp.
#include "engine/backends/cuda/check.hpp"

#include <fmt/format.h>

namespace px::cuda {

void throw_cuda_error(const char* library, const char* call, const std::string& why, const char* file, int line) {
  throw CudaError(fmt::format("{}:{}: {} error: {} failed: {}", file, line, library, call, why));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
    return 0;
  }
  return n;
}

}  // namespace px::cuda
