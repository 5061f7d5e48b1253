// Checked NCCL calls, in the form of engine/backends/cuda/check.hpp: a failed call throws
// px::cuda::CudaError naming the call, NCCL's error string (and its last-error detail, which says
// e.g. which peer or transport failed) and the file:line it was made from.
#pragma once

#include <nccl.h>

namespace px::cuda {

[[noreturn]] void throw_nccl_error(ncclResult_t r, const char* call, const char* file, int line);

inline void check_nccl(ncclResult_t r, const char* call, const char* file, int line) {
  if (r != ncclSuccess) throw_nccl_error(r, call, file, line);
}
// On a nonblocking communicator a call may return ncclInProgress: accepted, its work is enqueued
// later and the caller polls ncclCommGetAsyncError for the outcome.
inline ncclResult_t check_nccl_async(ncclResult_t r, const char* call, const char* file, int line) {
  if (r != ncclSuccess && r != ncclInProgress) throw_nccl_error(r, call, file, line);
  return r;
}

}  // namespace px::cuda

#define PX_NCCL_CHECK(call) ::px::cuda::check_nccl((call), #call, __FILE__, __LINE__)
#define PX_NCCL_CHECK_ASYNC(call) ::px::cuda::check_nccl_async((call), #call, __FILE__, __LINE__)
