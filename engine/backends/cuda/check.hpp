// Checked CUDA, cuBLAS(Lt) and NCCL calls: a failed call throws px::CudaError naming the call, the
// library's own error string and the file:line it was made from, so a GPU fault reads like any
// other engine error instead of a silent wrong answer several kernels later.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace px::cuda {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] void throw_cuda_error(const char* library, const char* call, const std::string& why, const char* file,
                                   int line);

inline void check(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess) throw_cuda_error("CUDA", call, cudaGetErrorString(e), file, line);
}
inline void check(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS) throw_cuda_error("cuBLAS", call, cublasGetStatusString(s), file, line);
}

// Number of visible CUDA devices; 0 (never an error) when there is no driver or no device.
int device_count();

}  // namespace px::cuda

#define PX_CUDA_CHECK(call) ::px::cuda::check((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors surface here, execution errors at the next sync.
#define PX_CUDA_CHECK_LAUNCH() ::px::cuda::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
