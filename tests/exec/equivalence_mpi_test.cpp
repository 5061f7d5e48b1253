// Every parallel plan against the single-rank model, under mpirun: for 3 training steps the
// engine's loss and gradients equal the whole-model reference (engine/backends/cpu/
// reference_model.hpp, in double) evaluated at the engine's own weights, and its AdamW step equals
// the reference step on those weights and gradients. Comparing at the engine's weights keeps the
// check exact step after step: Adam's sign-like first steps would otherwise amplify fp32 rounding
// in near-zero gradients into trajectories that drift apart for no fault of either side.
// Each world size runs the cases compiled for it; every element of the model must be owned by
// exactly one rank. Each case runs twice: on the host path, and through the executor's device
// backend path (post_comm / finish_comm) with host memory standing in for the device's.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>

#include "engine/backends/cpu/adamw.hpp"
#include "engine/backends/cpu/cpu_backend.hpp"
#include "engine/backends/cpu/reference_model.hpp"
#include "engine/comm/mpi_comm.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/spec/parameters.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

namespace px {
namespace {

MpiRuntime* runtime = nullptr;
constexpr int kSteps = 3;
constexpr double kTolerance = 1e-5;

struct Case {
  const char* name;
  const char* model;
  int world;
  std::function<void(PlanSpec&)> set;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

using Tensors = std::map<std::string, std::vector<double>>;

// Sums each rank's owned elements over the job: every rank ends with the full tensors.
Tensors assemble(cpu::CpuBackend& backend, TensorArena& arena, cpu::CpuBackend::Export what, const std::vector<LogicalParam>& params) {
  Tensors mine;
  backend.export_owned(arena, what, mine);
  Tensors full;
  for (const LogicalParam& p : params) {  // the same order on every rank
    std::vector<double> v = mine.count(p.name) ? mine[p.name] : std::vector<double>(static_cast<std::size_t>(p.count()), 0.0);
    MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    full[p.name] = std::move(v);
  }
  return full;
}

double sum_over_job(double v) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return v;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// The reference over the global batch: one micro-batch per sample, each weighing 1/B.
cpu::ReferenceLoss reference_step(const CompiledPlan& plan, const TokenSource& data, std::int64_t iteration, const Tensors& weights,
                                  Tensors& grads, std::uint64_t seed) {
  const std::int64_t B = plan.plan.global_batch_size, s = plan.plan.seq_length;
  grads = cpu::zero_like(weights);
  cpu::ReferenceLoss total;
  for (std::int64_t g = 0; g < B; ++g) {
    cpu::MicroBatch mb;
    mb.b = 1;
    mb.s = s;
    mb.tokens.resize(static_cast<std::size_t>(s));
    mb.targets.resize(static_cast<std::size_t>(s));
    mb.sample_ids = {g};
    data.sample(iteration, g, mb.tokens, mb.targets);
    cpu::ReferenceOptions o;
    o.loss_scale = 1.0 / static_cast<double>(B);
    o.dropout_seed = seed;
    o.iteration = iteration;
    const cpu::ReferenceLoss l = cpu::forward_backward<double>(plan.model, plan.padded_vocab, weights, grads, mb, o);
    total.lm += l.lm / static_cast<double>(B);
  }
  return total;
}

// The executor's path for a device backend with communicators of its own (the CUDA backend over
// NCCL): the arena from the backend's memory, comm ops posted and finished by the backend with
// staging of its own, and no host wait where a later op needs a comm op's result (finish_comm's
// wait here stands for the device's). The CPU kernels do the arithmetic.
class HostAsDevice final : public ComputeBackend, public ArenaMemory {
 public:
  explicit HostAsDevice(cpu::CpuBackend& cpu) : cpu_(cpu) {}
  void run(const Program& program, std::uint32_t index, TensorArena& arena) override { cpu_.run(program, index, arena); }
  ArenaMemory* arena_memory() override { return this; }
  std::byte* allocate(std::size_t bytes) override {
    auto* p = static_cast<std::byte*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
    std::memset(p, 0, bytes);
    return p;
  }
  void release(std::byte* p) override { std::free(p); }
  void zero(std::span<std::byte> b) override { std::memset(b.data(), 0, b.size()); }
  void download(std::span<const std::byte> from, std::byte* to) override { std::memcpy(to, from.data(), from.size()); }
  void upload(const std::byte* from, std::span<std::byte> to) override { std::memcpy(to.data(), from, to.size()); }
  bool device_comm() const override { return true; }
  std::vector<CommHandlePtr> post_comm(std::uint32_t index, const CommLayout& layout, Communicator& comm, TensorArena& arena) override {
    HostComm posted = post_on_host(layout, comm, arena);
    auto handles = std::move(posted.handles);
    EXPECT_TRUE(in_flight_.emplace(index, std::move(posted)).second) << "op " << index << " posted twice";
    return handles;
  }
  void finish_comm(std::uint32_t index, const CommLayout& layout, std::vector<CommHandlePtr> handles, TensorArena& arena) override {
    const auto it = in_flight_.find(index);
    ASSERT_NE(it, in_flight_.end()) << "op " << index << " finished but never posted";
    for (auto& h : handles) h->wait();
    drain_on_host(layout, it->second, arena);
    in_flight_.erase(it);
    ++finished;
  }
  void device_timings(std::span<OpTiming>) override { EXPECT_TRUE(in_flight_.empty()) << "comm ops left unfinished at the iteration's end"; }

  int finished = 0;

 private:
  cpu::CpuBackend& cpu_;
  std::map<std::uint32_t, HostComm> in_flight_;
};

class Equivalence : public ::testing::TestWithParam<Case> {};

void check_equivalence(const Case& c, bool device_path) {
  const int rank = runtime->world_rank();
  ModelSpec model = load_model_file(std::string(PX_DATASETS_DIR) + "/models/" + c.model + ".yaml");
  // No token is ever dropped (capacity = all tokens), so MoE routing cannot depend on how tokens
  // are grouped into micro-batches and ranks.
  if (model.is_moe()) model.moe->capacity_factor = static_cast<double>(model.moe->num_experts) / model.moe->top_k;
  PlanSpec p;
  p.precision = DType::F32;
  p.grad_dtype = DType::F32;
  p.seq_length = 32;
  c.set(p);
  const PlanSpec plan_spec = resolve_plan(p, model, nullptr);
  const CompiledPlan plan = compile_plan(model, plan_spec);
  ASSERT_EQ(plan.topology.world_size(), c.world);

  MpiGroups groups = make_mpi_groups(plan.topology, rank);
  GroupComms comms{};
  for (int g = 0; g < kNumGroupKinds; ++g) comms[static_cast<std::size_t>(g)] = groups[static_cast<GroupKind>(g)];
  const SyntheticTokens data(model.vocab_size, 7);
  cpu::TrainOptions options;
  options.adamw.lr = 1e-3;
  options.clip_grad = 1.0;
  cpu::CpuBackend backend(plan, rank, data, options);
  HostAsDevice device(backend);
  Executor executor(plan, rank, device_path ? static_cast<ComputeBackend&>(device) : backend, comms);
  backend.initialize(executor.arena());
  const std::vector<LogicalParam> params = model_parameters(model, plan.padded_vocab);
  using Export = cpu::CpuBackend::Export;

  const Tensors owners = assemble(backend, executor.arena(), Export::Ownership, params);
  for (const auto& [name, v] : owners)
    for (std::size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], 1.0) << name << "[" << i << "] owners";

  Tensors m_ref, v_ref;
  for (int step = 0; step < kSteps; ++step) {
    const Tensors before = assemble(backend, executor.arena(), Export::Weights, params);
    backend.begin_iteration(step);
    executor.run_iteration();
    const double loss_sum = sum_over_job(backend.reports_loss() ? backend.loss().sum : 0.0);
    const double tokens = sum_over_job(backend.reports_loss() ? static_cast<double>(backend.loss().tokens) : 0.0);
    const Tensors grads = assemble(backend, executor.arena(), Export::Gradients, params);
    const Tensors after = assemble(backend, executor.arena(), Export::Weights, params);
    if (rank != 0) continue;

    Tensors ref_grads;
    const cpu::ReferenceLoss ref = reference_step(plan, data, step, before, ref_grads, options.seed);
    ASSERT_EQ(tokens, static_cast<double>(plan.plan.global_batch_size) * plan.plan.seq_length);
    EXPECT_NEAR(loss_sum / tokens, ref.lm, kTolerance * ref.lm) << "step " << step;
    // Per tensor, |engine - reference| <= 1e-5 of the tensor's largest reference gradient; a
    // tensor whose gradient vanishes analytically (a key bias: softmax ignores shifts) is measured
    // against 1e-3 of the model's largest gradient instead of its own rounding noise.
    double largest = 0;
    for (const auto& [name, g] : ref_grads) largest = std::max(largest, max_abs(g));
    double norm_sq = 0;
    for (const auto& [name, g] : grads) {
      const std::vector<double>& r = ref_grads.at(name);
      double err = 0;
      for (std::size_t i = 0; i < g.size(); ++i) err = std::max(err, std::abs(g[i] - r[i]));
      EXPECT_LE(err, kTolerance * std::max(max_abs(r), 1e-3 * largest)) << name << " gradient, step " << step;
      for (double x : g) norm_sq += x * x;
    }
    // The engine's step, replayed by the reference AdamW on the engine's weights and gradients.
    const double clip = cpu::clip_coefficient(std::sqrt(norm_sq), options.clip_grad);
    for (const auto& [name, w0] : before) {
      std::vector<double> w = w0;
      auto& m = m_ref[name];
      auto& v = v_ref[name];
      if (m.empty()) m.assign(w.size(), 0.0), v.assign(w.size(), 0.0);
      cpu::adamw_step<double>(w, grads.at(name), m, v, options.adamw, step + 1, clip);
      const std::vector<double>& e = after.at(name);
      double err = 0;
      for (std::size_t i = 0; i < w.size(); ++i) err = std::max(err, std::abs(e[i] - w[i]));
      EXPECT_LE(err, kTolerance * std::max(1.0, max_abs(w))) << name << " after step " << step;
    }
  }
  if (device_path) {
    std::size_t comm_ops = 0;
    for (const Op& op : plan.program_of(rank).ops) comm_ops += is_comm(op.kind);
    EXPECT_EQ(device.finished, static_cast<int>(kSteps * comm_ops)) << "every comm op finished once per step";
  }
}

TEST_P(Equivalence, LossGradientsAndStepsMatchTheSingleRankModel) {
  if (runtime->world_size() != GetParam().world) GTEST_SKIP() << "runs with " << GetParam().world << " ranks";
  check_equivalence(GetParam(), false);
}

TEST_P(Equivalence, SoDoTheyThroughTheDeviceBackendPath) {
  if (runtime->world_size() != GetParam().world) GTEST_SKIP() << "runs with " << GetParam().world << " ranks";
  check_equivalence(GetParam(), true);
}

void batch(PlanSpec& p, int micro, int global) {
  p.micro_batch_size = micro;
  p.global_batch_size = global;
}

std::vector<Case> cases() {
  return {
      // one rank
      {"single_gpt", "tiny-gpt", 1, [](PlanSpec& p) { batch(p, 2, 2); }},
      {"grad_accumulation_llama", "tiny-llama", 1, [](PlanSpec& p) { batch(p, 1, 3); }},
      {"moe", "tiny-moe", 1, [](PlanSpec& p) { batch(p, 1, 2); }},
      {"recompute_selective", "tiny-gpt", 1, [](PlanSpec& p) { p.recompute = Recompute::Selective; batch(p, 1, 2); }},
      {"recompute_full", "tiny-llama", 1, [](PlanSpec& p) { p.recompute = Recompute::Full; batch(p, 1, 2); }},
      {"offload", "tiny-gpt", 1, [](PlanSpec& p) { p.optimizer_offload = true; batch(p, 1, 2); }},
      // two ranks
      {"dp2", "tiny-gpt", 2, [](PlanSpec& p) { p.data_parallel_size = 2; batch(p, 1, 4); }},
      {"zero1", "tiny-gpt", 2, [](PlanSpec& p) { p.data_parallel_size = 2; p.zero_stage = 1; batch(p, 1, 4); }},
      {"zero2", "tiny-llama", 2, [](PlanSpec& p) { p.data_parallel_size = 2; p.zero_stage = 2; batch(p, 1, 4); }},
      {"zero1_overlap_param_gather", "tiny-gpt", 2,
       [](PlanSpec& p) { p.data_parallel_size = 2; p.zero_stage = 1; p.overlap_param_gather = true; batch(p, 1, 4); }},
      {"zero3", "tiny-gpt", 2, [](PlanSpec& p) { p.data_parallel_size = 2; p.zero_stage = 3; batch(p, 1, 4); }},
      {"zero2_offload", "tiny-gpt", 2,
       [](PlanSpec& p) { p.data_parallel_size = 2; p.zero_stage = 2; p.optimizer_offload = true; batch(p, 1, 2); }},
      {"tp2", "tiny-gpt", 2, [](PlanSpec& p) { p.tensor_model_parallel_size = 2; batch(p, 1, 2); }},
      {"tp2_sp", "tiny-llama", 2, [](PlanSpec& p) { p.tensor_model_parallel_size = 2; p.sequence_parallel = true; batch(p, 2, 2); }},
      {"tp2_sp_gpt", "tiny-gpt", 2, [](PlanSpec& p) { p.tensor_model_parallel_size = 2; p.sequence_parallel = true; batch(p, 1, 2); }},
      {"tp2_sp_tp_comm_overlap", "tiny-llama", 2,
       [](PlanSpec& p) { p.tensor_model_parallel_size = 2; p.sequence_parallel = true; p.tp_comm_overlap = true; batch(p, 2, 2); }},
      {"cp4", "tiny-llama", 4, [](PlanSpec& p) { p.context_parallel_size = 4; batch(p, 1, 1); }},
      {"tp4_sp_tp_comm_overlap_gpt_selective", "tiny-gpt", 4,
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 4;
         p.sequence_parallel = true;
         p.tp_comm_overlap = true;
         p.recompute = Recompute::Selective;
         batch(p, 1, 2);
       }},
      // Zero-bubble defers the weight gradients, and with them the backward rings' wgrad steps.
      {"tp2_sp_pp2_zero_bubble_tp_comm_overlap", "tiny-gpt-deep", 4,
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2;
         p.pipeline_model_parallel_size = 2;
         p.sequence_parallel = true;
         p.tp_comm_overlap = true;
         p.schedule = PipelineSchedule::ZeroBubble;
         batch(p, 1, 4);
       }},
      {"cp2", "tiny-llama", 2, [](PlanSpec& p) { p.context_parallel_size = 2; batch(p, 1, 2); }},
      {"ep2", "tiny-moe", 2, [](PlanSpec& p) { p.data_parallel_size = 2; p.expert_model_parallel_size = 2; batch(p, 1, 2); }},
      {"pp2_gpipe", "tiny-gpt-deep", 2, [](PlanSpec& p) { p.pipeline_model_parallel_size = 2; p.schedule = PipelineSchedule::GPipe; batch(p, 1, 4); }},
      {"pp2_1f1b", "tiny-gpt-deep", 2, [](PlanSpec& p) { p.pipeline_model_parallel_size = 2; batch(p, 1, 4); }},
      {"pp2_interleaved", "tiny-gpt-deep", 2,
       [](PlanSpec& p) {
         p.pipeline_model_parallel_size = 2;
         p.schedule = PipelineSchedule::Interleaved1F1B;
         p.virtual_pipeline_model_parallel_size = 2;
         batch(p, 1, 4);
       }},
      {"pp2_zero_bubble", "tiny-gpt-deep", 2,
       [](PlanSpec& p) { p.pipeline_model_parallel_size = 2; p.schedule = PipelineSchedule::ZeroBubble; batch(p, 1, 4); }},
      // four ranks
      {"pp4_1f1b_full_recompute", "tiny-gpt-deep", 4,
       [](PlanSpec& p) { p.pipeline_model_parallel_size = 4; p.recompute = Recompute::Full; batch(p, 1, 8); }},
      {"tp2_dp2_zero1_selective", "tiny-llama", 4,
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2;
         p.data_parallel_size = 2;
         p.zero_stage = 1;
         p.recompute = Recompute::Selective;
         p.use_flash_attn = false;
         batch(p, 1, 4);
       }},
      // Megatron's expert layout: 2 experts per rank, spread over the data-parallel ranks.
      {"tp2_sp_dp2_ep2", "tiny-moe", 4,
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2;
         p.sequence_parallel = true;
         p.data_parallel_size = 2;
         p.expert_model_parallel_size = 2;
         batch(p, 1, 4);
       }},
      {"cp2_dp2_zero3", "tiny-llama", 4,
       [](PlanSpec& p) { p.context_parallel_size = 2; p.data_parallel_size = 2; p.zero_stage = 3; batch(p, 1, 4); }},
      // eight ranks
      {"tp2_pp2_dp2", "tiny-gpt-deep", 8,
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2;
         p.pipeline_model_parallel_size = 2;
         p.data_parallel_size = 2;
         batch(p, 1, 8);
       }},
      {"tp2_sp_dp4_ep2_zero2_overlap_param_gather", "tiny-moe", 8,
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2;
         p.sequence_parallel = true;
         p.data_parallel_size = 4;
         p.expert_model_parallel_size = 2;
         p.zero_stage = 2;
         p.overlap_param_gather = true;
         batch(p, 1, 4);
       }},
      {"cp2_ep2_pp2_zero3_zero_bubble", "tiny-moe", 8,
       [](PlanSpec& p) {
         p.context_parallel_size = 2;
         p.data_parallel_size = 2;
         p.expert_model_parallel_size = 2;
         p.pipeline_model_parallel_size = 2;
         p.zero_stage = 3;
         p.schedule = PipelineSchedule::ZeroBubble;
         batch(p, 1, 4);
       }},
  };
}

INSTANTIATE_TEST_SUITE_P(Plans, Equivalence, ::testing::ValuesIn(cases()), [](const auto& param_info) { return std::string(param_info.param.name); });

}  // namespace
}  // namespace px

int main(int argc, char** argv) {
  px::MpiRuntime mpi(&argc, &argv);
  px::runtime = &mpi;
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi.world_rank() != 0) ::testing::GTEST_FLAG(output) = "";  // one rank's report is enough
  return RUN_ALL_TESTS();
}
