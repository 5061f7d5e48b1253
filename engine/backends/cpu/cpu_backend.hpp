// The CPU backend of the executor: runs each compute and memory op of a rank's program on the
// fp32 CPU kernels, reading exactly the operand views the plan compiler wrote (see "Operands" in
// engine/plan/README.md). It owns what a rank holds outside the arena: its coordinates, its
// share of the training data, the host copy of an offloaded optimizer, and the losses it saw.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "engine/backends/cpu/adamw.hpp"
#include "engine/backends/cpu/rank_context.hpp"
#include "engine/exec/training_backend.hpp"
#include "engine/exec/token_data.hpp"
#include "engine/spec/parameters.hpp"

namespace px::cpu {

struct TrainOptions {
  std::uint64_t seed = 1234;      // weights and dropout
  AdamWConfig adamw{};
  double clip_grad = 1.0;         // global-norm clipping; <= 0: none
  double moe_aux_coeff = 0.0;     // Switch load-balancing loss, per MoE layer
  bool moe_renormalize = true;    // top-k gates renormalised to sum 1 (Mixtral)
  double norm_eps = 1e-5;
};

using px::LossSum;

class CpuBackend final : public TrainingBackend {
 public:
  CpuBackend(const CompiledPlan& plan, int rank, const TokenSource& data, const TrainOptions& options);

  void initialize(TensorArena& arena) override;
  void begin_iteration(std::int64_t iteration) override;
  void run(const Program& program, std::uint32_t index, TensorArena& arena) override;
  const LossSum& loss() const override { return loss_; }
  double grad_norm() const override { return grad_norm_; }
  bool reports_loss() const override { return ctx_.reports_loss(); }
  std::string device_name() const override { return "cpu"; }

  // The parameter elements (or their reduced gradients) this rank owns — each element of the
  // model has exactly one owner across the job — written at their global indices into `out`
  // (full-size logical tensors, created zero-filled when missing). Ownership writes 1 for each
  // element owned, so a sum over the job must be 1 everywhere.
  using Export = RankContext::Export;
  void export_owned(TensorArena& arena, Export what, std::map<std::string, std::vector<double>>& out) const;

  std::vector<std::span<float>> offloaded_state() override { return {host_weights_, host_state_}; }

 private:
  using OwnedRange = RankContext::Range;

  void embedding(const Op& op, TensorArena& arena);
  void norm(const Op& op, TensorArena& arena);
  void gemm(const Op& op, TensorArena& arena);
  void rope(const Op& op, TensorArena& arena);
  void attention(const Op& op, TensorArena& arena);
  void copy(const Op& op, TensorArena& arena);
  void activation(const Op& op, TensorArena& arena);
  void dropout_add(const Op& op, TensorArena& arena);
  void router(const Op& op, TensorArena& arena);
  void permute(const Op& op, TensorArena& arena);
  void cross_entropy(const Op& op, TensorArena& arena);
  void grad_norm_op(TensorArena& arena);
  void adamw(TensorArena& arena, bool on_host);
  void copy_to_host(TensorArena& arena);
  void copy_to_device(TensorArena& arena);

  const CompiledPlan& plan_;
  const Program& program_;
  RankContext ctx_;
  TrainOptions opt_;
  const LocalDims& z_;                        // the rank's sizes, as the compiler derived them
  std::optional<std::uint32_t> optimizer_;    // the optimizer-state tensor (none under offload)

  const Op* op_ = nullptr;
  std::vector<float> scratch_;
  std::vector<float> host_state_, host_grads_, host_weights_;  // offloaded optimizer
  float host_norm_sq_ = 0;
  LossSum loss_;
  double grad_norm_ = 0;
  std::int64_t step_ = 0;
};

}  // namespace px::cpu
