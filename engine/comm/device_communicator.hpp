// A communicator over device buffers (CUDA): every span holds device pointers, bf16 traffic has
// calls of its own, and the device's streams, not the host, are what its operations wait for and
// feed. The CUDA backend talks to this interface and NcclCommunicator (nccl_comm.hpp) implements
// it, so the backend builds without NCCL or MPI.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <span>

#include "engine/comm/communicator.hpp"

namespace px {

class DeviceCommunicator : public Communicator {
 public:
  using bf16 = __nv_bfloat16;

  // bf16 traffic (activations, bf16 weights): sums in the library's bf16 arithmetic.
  virtual CommHandlePtr start_all_reduce_bf16(std::span<bf16> buf) = 0;
  virtual CommHandlePtr start_reduce_scatter_bf16(std::span<const bf16> in, std::span<bf16> out) = 0;
  virtual CommHandlePtr start_all_gather_bf16(std::span<const bf16> in, std::span<bf16> out) = 0;
  virtual CommHandlePtr start_all_to_all_bf16(std::span<const bf16> in, std::span<bf16> out) = 0;
  virtual CommHandlePtr start_send_bf16(std::span<const bf16> buf, int peer, int tag = 0) = 0;
  virtual CommHandlePtr start_recv_bf16(std::span<bf16> buf, int peer, int tag = 0) = 0;

  // The stream whose work issued so far every later start_* waits for (the producer of the data
  // sent or reduced).
  virtual void set_compute_stream(cudaStream_t s) = 0;
  // Work enqueued on `stream` after this call runs once `h`, a handle of this communicator, has
  // finished on the device; the host does not wait.
  virtual void wait_on(CommHandle& h, cudaStream_t stream) = 0;
};

}  // namespace px
