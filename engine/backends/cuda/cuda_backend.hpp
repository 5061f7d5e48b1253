// The CUDA backend of the executor: runs each compute op of a rank's bf16 program on the CUDA
// kernels, on one stream of one device, reading the operand views the plan compiler wrote (see
// "Operands" in engine/plan/README.md) exactly as the CPU backend does, with the rank's
// bookkeeping shared with it (engine/backends/cpu/rank_context.hpp). The arena lives in device
// memory; every op is bracketed by CUDA events and an NVTX range named after it, and the
// executor's device_timings() turns the events into the op times of the trace.
//
// Precision: activations, weights and their working copies bf16; weight and bias gradients fp32
// (plans must have grad_dtype fp32); optimizer state per buffer [m | v | master], fp32, the master
// copy initialised from the same values as the CPU's weights. Attention keeps its running output
// and its q/k/v gradients in fp32 scratch across a ring's blocks and rounds once into the plan's
// bf16 tensors. Cross-entropy keeps the bf16 logits in the first half of the plan's fp32 logits
// buffer (its own ops alone read it) and sums the loss on the device.
//
// One rank of a plan: alone (a one-rank plan, or one rank of a larger one with stand-in
// communicators, whose comm ops move no data), or one GPU per rank with communicators over device
// buffers (engine/comm/device_communicator.hpp: NCCL's, nccl_comm.hpp). Then each comm op is posted after the compute
// stream's work so far, its staging (engine/exec/comm_layout.hpp) stream-ordered device memory
// outside the planned arena, and the compute stream, not the host, waits for it where a later op
// needs it; its time runs from the compute stream's post point to its end on a timing stream
// per executor stream. device_timings waits for every comm op on the host first, against the
// communicators' timeout, so a dead peer ends the iteration with CommTimeout rather than hanging
// it. Optimizer offload keeps the fp32 master weights and Adam moments in host memory and steps
// them there with the CPU's AdamW.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "engine/backends/cpu/cpu_backend.hpp"
#include "engine/backends/cpu/rank_context.hpp"
#include "engine/exec/training_backend.hpp"

namespace px::cuda {

class CudaBackend final : public TrainingBackend, public ArenaMemory {
 public:
  // On the current CUDA device. Throws px::Error for a plan it cannot run (not bf16 with fp32
  // gradients) and CudaError when there is no usable device.
  CudaBackend(const CompiledPlan& plan, int rank, const TokenSource& data, const cpu::TrainOptions& options);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  void initialize(TensorArena& arena) override;
  void begin_iteration(std::int64_t iteration) override;
  void run(const Program& program, std::uint32_t index, TensorArena& arena) override;
  const LossSum& loss() const override { return loss_; }
  double grad_norm() const override { return grad_norm_; }
  bool reports_loss() const override { return ctx_.reports_loss(); }
  std::string device_name() const override;
  std::vector<std::span<float>> offloaded_state() override;

  ArenaMemory* arena_memory() override { return this; }
  void mark(std::uint32_t index) override;
  void device_timings(std::span<OpTiming> timings) override;
  bool device_comm() const override;
  std::vector<CommHandlePtr> post_comm(std::uint32_t index, const CommLayout& layout, Communicator& comm, TensorArena& arena) override;
  void finish_comm(std::uint32_t index, const CommLayout& layout, std::vector<CommHandlePtr> handles, TensorArena& arena) override;

  std::byte* allocate(std::size_t bytes) override;
  void release(std::byte* p) override;
  void zero(std::span<std::byte> bytes) override;
  void download(std::span<const std::byte> from, std::byte* to) override;
  void upload(const std::byte* from, std::span<std::byte> to) override;

  // The rank's weights (bf16 working copies, widened) or fp32 gradients at their global indices,
  // as CpuBackend::export_owned writes them: for checking a device run against the CPU's.
  void export_owned(TensorArena& arena, cpu::RankContext::Export what, std::map<std::string, std::vector<double>>& out) const;

  struct Impl;  // in cuda_backend.cpp

 private:
  void record_start(std::uint32_t index);

  const CompiledPlan& plan_;
  const Program& program_;
  cpu::RankContext ctx_;
  cpu::TrainOptions opt_;
  std::unique_ptr<Impl> impl_;
  LossSum loss_;
  double grad_norm_ = 0;
  std::int64_t step_ = 0;
};

}  // namespace px::cuda
