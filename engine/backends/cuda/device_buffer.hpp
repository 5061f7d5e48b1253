// Device memory owned by a value (freed with it) and the host<->device copies and bf16 conversions
// the tests and the backend use. bf16 on the host goes through float: round to nearest even, as
// __float2bfloat16 rounds on the device, so a host-converted input is bit-identical to a device one.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "engine/backends/cuda/check.hpp"

namespace px::cuda {

using bf16 = __nv_bfloat16;

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    if (count > 0) PX_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), count * sizeof(T)));
  }
  explicit DeviceBuffer(std::span<const T> host) : DeviceBuffer(host.size()) { upload(host); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(count_, o.count_);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_) (void)cudaFree(ptr_);
  }

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  std::size_t size() const { return count_; }
  std::size_t bytes() const { return count_ * sizeof(T); }

  void upload(std::span<const T> host) {
    if (!host.empty()) PX_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    if (count_ > 0) PX_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }
  void zero() {
    if (count_ > 0) PX_CUDA_CHECK(cudaMemset(ptr_, 0, bytes()));
  }

 private:
  T* ptr_ = nullptr;
  std::size_t count_ = 0;
};

std::vector<bf16> to_bf16(std::span<const float> x);
std::vector<float> to_float(std::span<const bf16> x);
// x rounded to bf16 and back: the value a bf16 tensor really holds, for building CPU references.
std::vector<float> round_bf16(std::span<const float> x);

}  // namespace px::cuda
