// The CUDA backend over NCCL under mpirun, one GPU per rank: every parallel plan of the job's size
// trains three iterations whose losses and gradient norms match the single-rank CPU run of the
// same model and batch (fp32, on every rank alone), to the bf16 accuracy the one-rank GPU tests
// state (tests/cuda/backend_test.cpp): losses within 2%, gradient norms within 5%. The CPU engine's
// own equivalence tests tie that run to the reference model; these tie the GPU's comm path (NCCL
// groups, device staging, compute-stream waits) to it. Without a GPU, or with fewer GPUs than
// ranks on a machine, every test skips.
#include <gtest/gtest.h>

#include <mpi.h>

#include <cstdlib>
#include <functional>

#include "engine/backends/cpu/cpu_backend.hpp"
#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/cuda_backend.hpp"
#include "engine/comm/launch.hpp"
#include "engine/comm/nccl_comm.hpp"
#include "engine/exec/executor.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "tests/comm/device_per_rank.hpp"
#include "tests/cuda/gpu_test.hpp"

namespace px {
namespace {

MpiRuntime* runtime = nullptr;
constexpr int kSteps = 3;

struct Case {
  const char* name;
  const char* model;
  int world;
  std::function<void(PlanSpec&)> set;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// The model files: $PARALLAX_DATASETS on a GPU machine the build's tree is not on.
ModelSpec model_file(const std::string& name) {
  const char* env = std::getenv("PARALLAX_DATASETS");
  ModelSpec m = load_model_file(std::string(env ? env : PX_DATASETS_DIR) + "/models/" + name + ".yaml");
  // No token is ever dropped, so routing cannot depend on how tokens are grouped into ranks.
  if (m.is_moe()) m.moe->capacity_factor = static_cast<double>(m.moe->num_experts) / m.moe->top_k;
  return m;
}

// The case's plan, or with `parallel` false the one-rank plan of the same model and batch.
PlanSpec spec(const Case& c, DType precision, bool parallel) {
  PlanSpec p;
  p.precision = precision;
  p.grad_dtype = DType::F32;
  p.micro_batch_size = 1;
  p.global_batch_size = 4;
  p.seq_length = 64;
  if (parallel) c.set(p);
  return p;
}

struct Trained {
  std::vector<double> losses, norms;
};

// The job's mean loss and the gradient norm, per iteration.
template <class Backend>
Trained train(const CompiledPlan& plan, int rank, const TokenSource& data, const GroupComms& comms, bool over_job) {
  cpu::TrainOptions options;
  options.adamw.lr = 1e-3;
  Backend backend(plan, rank, data, options);
  Executor executor(plan, rank, backend, comms);
  backend.initialize(executor.arena());
  Trained r;
  for (int step = 0; step < kSteps; ++step) {
    backend.begin_iteration(step);
    executor.run_iteration();
    double sums[2] = {backend.reports_loss() ? backend.loss().sum : 0.0,
                      backend.reports_loss() ? static_cast<double>(backend.loss().tokens) : 0.0};
    if (over_job) MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    r.losses.push_back(sums[0] / sums[1]);
    r.norms.push_back(backend.grad_norm());
  }
  return r;
}

class NcclTraining : public ::testing::TestWithParam<Case> {};

TEST_P(NcclTraining, LossesAndGradientNormsMatchTheSingleRankCpuRunToBf16Accuracy) {
  const Case& c = GetParam();
  if (runtime->world_size() != c.world) GTEST_SKIP() << "runs with " << c.world << " ranks";
  const int rank = runtime->world_rank();
  const ModelSpec model = model_file(c.model);
  const SyntheticTokens data(model.vocab_size, 7);
  // The plans compile everywhere (the case is well formed); they train only on GPUs.
  const CompiledPlan cpu_plan = compile_plan(model, resolve_plan(spec(c, DType::F32, false), model, nullptr));
  const CompiledPlan plan = compile_plan(model, resolve_plan(spec(c, DType::BF16, true), model, nullptr));
  ASSERT_EQ(plan.topology.world_size(), c.world);
  PX_REQUIRE_GPU();
  PX_REQUIRE_DEVICE_PER_RANK(*runtime->world());

  const Trained want = train<cpu::CpuBackend>(cpu_plan, 0, data, {}, false);
  MpiGroups mpi = make_mpi_groups(plan.topology, rank);
  NcclGroups nccl = make_nccl_groups(plan.topology, rank, mpi);
  GroupComms comms{};
  for (int g = 1; g < kNumGroupKinds; ++g) comms[static_cast<std::size_t>(g)] = nccl.group[static_cast<std::size_t>(g)].get();
  const Trained got = train<cuda::CudaBackend>(plan, rank, data, comms, true);
  for (int s = 0; s < kSteps; ++s) {
    EXPECT_NEAR(got.losses[s], want.losses[s], 0.02 * want.losses[s]) << "iteration " << s;
    EXPECT_NEAR(got.norms[s], want.norms[s], 0.05 * want.norms[s]) << "iteration " << s;
  }
}

std::vector<Case> cases() {
  return {
      {"dp2", "tiny-gpt", 2, [](PlanSpec& p) { p.data_parallel_size = 2; }},
      {"dp2_zero1", "tiny-gpt", 2, [](PlanSpec& p) { p.data_parallel_size = 2, p.zero_stage = 1; }},
      {"dp2_zero3", "tiny-llama", 2, [](PlanSpec& p) { p.data_parallel_size = 2, p.zero_stage = 3; }},
      {"tp2", "tiny-gpt", 2, [](PlanSpec& p) { p.tensor_model_parallel_size = 2; }},
      {"tp2_sp", "tiny-llama", 2, [](PlanSpec& p) { p.tensor_model_parallel_size = 2, p.sequence_parallel = true; }},
      {"tp2_sp_tp_comm_overlap", "tiny-llama", 2,
       [](PlanSpec& p) { p.tensor_model_parallel_size = 2, p.sequence_parallel = true, p.tp_comm_overlap = true; }},
      {"cp2", "tiny-llama", 2, [](PlanSpec& p) { p.context_parallel_size = 2; }},
      {"ep2", "tiny-moe", 2, [](PlanSpec& p) { p.expert_model_parallel_size = 2, p.data_parallel_size = 2; }},
      {"pp2_1f1b", "tiny-gpt-deep", 2, [](PlanSpec& p) { p.pipeline_model_parallel_size = 2; }},
      {"pp2_interleaved", "tiny-gpt-deep", 2,
       [](PlanSpec& p) {
         p.pipeline_model_parallel_size = 2, p.schedule = PipelineSchedule::Interleaved1F1B;
         p.virtual_pipeline_model_parallel_size = 2;
       }},
      {"tp2_pp2_dp2_zero1", "tiny-gpt-deep", 8,
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2, p.pipeline_model_parallel_size = 2, p.data_parallel_size = 2;
         p.zero_stage = 1;
       }},
      {"tp2_sp_dp4_ep2_zero2", "tiny-moe", 8,
       [](PlanSpec& p) {
         p.tensor_model_parallel_size = 2, p.sequence_parallel = true, p.data_parallel_size = 4;
         p.expert_model_parallel_size = 2, p.zero_stage = 2;
       }},
  };
}

INSTANTIATE_TEST_SUITE_P(Plans, NcclTraining, ::testing::ValuesIn(cases()), [](const auto& p) { return std::string(p.param.name); });

}  // namespace
}  // namespace px

int main(int argc, char** argv) { return px::test::run_gpu_tests_under_mpi(argc, argv, px::runtime); }
