// Where a rank sits in its plan, as every compute backend needs it: its coordinates and local
// sizes, which parameter elements it holds and which it owns (each element of the model has one
// owner across the job), their initial values, and the tokens, targets, positions and dropout
// keys of the micro-batch it is working on. The CPU and CUDA backends share it, so both hold,
// initialise and feed a rank identically and differ only in their kernels.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "engine/exec/token_data.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/spec/parameters.hpp"

namespace px::cpu {

// Forward work, first time or repeated (recompute).
inline bool forward_phase(Phase p) { return p == Phase::Forward || p == Phase::Recompute; }

// An op's operands split into reads and writes, each in program order: what a backend's kernel
// for the op takes, in the roles engine/plan/README.md gives them.
struct Operands {
  std::vector<TensorUse> in, out;
};
Operands operands(const Program& prog, const Op& op);

class RankContext {
 public:
  RankContext(const CompiledPlan& plan, int rank, const TokenSource& data, std::uint64_t seed);

  const CompiledPlan& plan() const { return plan_; }
  const Program& program() const { return program_; }
  int rank() const { return rank_; }
  const RankCoord& coord() const { return coord_; }
  const LocalDims& dims() const { return z_; }
  int group_index(GroupKind g) const;
  // True where this rank counts tokens for the job's loss (tensor-parallel rank 0 of the last stage).
  bool reports_loss() const;

  struct Range {
    std::int64_t begin = 0, end = 0;  // buffer elements [begin, end)
  };
  // The elements of buffer b whose optimizer state this rank holds and updates (its ZeRO block, or
  // all of them).
  Range optimizer_range(const ParamBuffer& b) const;
  // The elements of slot s (buffer offsets) whose gradient this rank owns: its ZeRO block, or rank
  // 0 of the groups that replicate it; the first stage for a tied embedding.
  Range owned(const ParamBuffer& b, const ParamSlot& s) const;
  // The same elements as offsets into a tensor of `held` elements laid out like b (its ZeRO block
  // when `sharded`), clipped to it: what a backend reads of its gradients or weights.
  Range held_owned(const ParamBuffer& b, const ParamSlot& s, bool sharded, std::int64_t held) const;

  // The initial values of buffer b's weights as this rank holds them (the whole padded buffer, or
  // its ZeRO-3 block), padding zero.
  void initial_weights(const ParamBuffer& b, std::span<float> w) const;

  // Writes the elements of b that this rank owns, read from `held` (b's weights or gradients as
  // this rank holds them; `sharded` when that is its block), at their global indices into `out`
  // (full-size logical tensors, created zero-filled when missing). Ownership writes 1 per element.
  enum class Export { Weights, Gradients, Ownership };
  void export_owned(const ParamBuffer& b, std::span<const float> held, bool sharded, Export what,
                    std::map<std::string, std::vector<double>>& out) const;

  // Fetches micro-batch mb of the current iteration (no-op when it is already the current one).
  void begin_iteration(std::int64_t iteration);
  void fetch_micro_batch(std::int32_t mb);
  std::int32_t micro_batch() const { return micro_batch_; }
  std::int64_t iteration() const { return iteration_; }
  // This rank's view of the current micro-batch: T rows, sequence-major.
  std::span<const std::int32_t> tokens() const { return tokens_; }
  std::span<const std::int32_t> targets() const { return targets_; }
  std::span<const std::int32_t> positions() const { return positions_; }
  // The sequence block a TP-ring GEMM step works on (see Op).
  std::int64_t ring_block(const Op& op) const {
    const int tp = z_.tp, r = coord_.tp, back = op.step + (op.peer > 0 ? 0 : 1);
    return ((r - back) % tp + tp) % tp;
  }
  // The dropout row keys of `rows` rows of a DropoutAdd op (its sequence shard's rows under SP).
  std::vector<std::uint64_t> dropout_keys(const Op& op, std::int64_t rows) const;

 private:
  const LogicalParam& slot_param(const ParamBuffer& b, const ParamSlot& s) const;

  const CompiledPlan& plan_;
  const Program& program_;
  int rank_;
  RankCoord coord_;
  const TokenSource& data_;
  std::uint64_t seed_;
  std::vector<LogicalParam> params_;
  ParamDims dims_;
  LocalDims z_;
  std::int64_t iteration_ = 0;
  std::int32_t micro_batch_ = -1;
  std::vector<std::int32_t> tokens_, targets_, positions_;
  std::vector<std::int64_t> samples_;  // global sample index of each sequence j
};

}  // namespace px::cpu
