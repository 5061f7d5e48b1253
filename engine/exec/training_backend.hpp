// What a training driver (the MPI trainer, rank emulation) needs of a compute backend beyond
// running ops: initial weights, the start of each iteration, and the loss and gradient norm the
// rank saw. The CPU backend and the CUDA backend implement it; a device backend has its figures
// once the executor's device_timings() has waited for the iteration.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "engine/exec/executor.hpp"

namespace px {

// A rank's share of one iteration's loss: the summed cross-entropy of the tokens whose logits it
// computed, and how many (tensor-parallel ranks of one replica see the same tokens).
struct LossSum {
  double sum = 0;
  std::int64_t tokens = 0;
};

class TrainingBackend : public ComputeBackend {
 public:
  // Writes the initial weights of this rank's shards (and its optimizer's master copy).
  virtual void initialize(TensorArena& arena) = 0;
  // Called before each iteration: which iteration's samples to fetch.
  virtual void begin_iteration(std::int64_t iteration) = 0;
  virtual const LossSum& loss() const = 0;
  virtual double grad_norm() const = 0;
  // True where this rank counts tokens for the job's loss (tensor-parallel rank 0 of the last stage).
  virtual bool reports_loss() const = 0;
  // What the op times were measured on: "cpu", or the device's name.
  virtual std::string device_name() const = 0;
  // Optimizer state an offloading plan keeps in host memory (master weights, then Adam moments),
  // checkpointed with the arena's tensors; empty without offload.
  virtual std::vector<std::span<float>> offloaded_state() = 0;
};

}  // namespace px
