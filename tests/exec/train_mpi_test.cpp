// The training loop under mpirun, through its public entry point px::train: a tp2·pp2·dp2 run's
// traces are well-formed Chrome traces whose op ids match the compiled programs one for one, every
// rank's measured arena peak is the memory planner's figure, the run lands in the results
// database with its metrics and per-op samples, and a run stopped at a checkpoint and resumed ends
// bit for bit where the uninterrupted run ends. With one rank, a tiny GPT learns the shipped corpus.
#include <gtest/gtest.h>
#include <mpi.h>

#include <unistd.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "engine/comm/mpi_comm.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "engine/trace/chrome_trace.hpp"
#include "engine/train/trainer.hpp"
#include "results/results_db.hpp"

namespace px {
namespace {

namespace fs = std::filesystem;
MpiRuntime* runtime = nullptr;

// A directory every rank agrees on, fresh for this test.
fs::path shared_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("parallax-train-test-" + std::to_string(getppid())) / name;
  if (runtime->world_rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return dir;
}

TrainConfig config(const char* model, int tp, int pp, int dp, int global_batch) {
  TrainConfig c;
  c.datasets_dir = PX_DATASETS_DIR;
  c.model = load_model_file(c.datasets_dir / "models" / (std::string(model) + ".yaml"));
  PlanSpec p;
  p.precision = DType::F32;
  p.grad_dtype = DType::F32;
  p.tensor_model_parallel_size = tp;
  p.pipeline_model_parallel_size = pp;
  p.data_parallel_size = dp;
  p.micro_batch_size = 1;
  p.global_batch_size = global_batch;
  p.seq_length = 32;
  c.plan = resolve_plan(p, c.model, nullptr);
  c.comm_timeout = std::chrono::seconds(60);
  c.log_every = 0;
  return c;
}

std::string bytes_of(const fs::path& f) {
  std::ifstream in(f, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

const auto quiet = [](const std::string&) {};

TEST(TrainMpi, TracesArenaAndResultsOfATp2Pp2Dp2Run) {
  if (runtime->world_size() != 8) GTEST_SKIP() << "runs with 8 ranks";
  TrainConfig c = config("tiny-gpt-deep", 2, 2, 2, 4);
  c.iterations = 3;
  c.trace_iterations = 2;
  c.out_dir = shared_dir("traced");
  c.results_db = c.out_dir / "results.db";
  const TrainResult r = train(c, *runtime, quiet);
  ASSERT_EQ(r.log.size(), 3u);
  // The planner rounds each tensor up to 256 bytes (CUDA's allocation alignment); the highest byte
  // written lies within the last such block.
  EXPECT_LE(r.arena_bytes_touched, r.arena_bytes) << "rank " << runtime->world_rank();
  EXPECT_GT(r.arena_bytes_touched, r.arena_bytes - 256) << "rank " << runtime->world_rank();

  // This rank's trace: well formed, and one complete event per op of its program per iteration.
  const CompiledPlan plan = compile_plan(c.model, c.plan);
  const Program& prog = plan.program_of(runtime->world_rank());
  std::ifstream in(c.out_dir / ("trace_rank0000" + std::to_string(runtime->world_rank()) + ".json"));
  const nlohmann::json trace = nlohmann::json::parse(in);
  const std::vector<std::string> problems = check_chrome_trace(trace);
  EXPECT_TRUE(problems.empty()) << problems.front();
  std::map<std::int64_t, int> seen;
  for (const auto& e : trace["traceEvents"])
    if (e.value("ph", "") == "X" && e.contains("args") && e["args"].contains("op id")) ++seen[e["args"]["op id"].get<std::int64_t>()];
  ASSERT_EQ(seen.size(), prog.ops.size());
  for (const auto& [id, n] : seen) EXPECT_EQ(n, 2) << "op " << id;

  MPI_Barrier(MPI_COMM_WORLD);
  if (runtime->world_rank() != 0) return;
  ResultsDb db = ResultsDb::open(*c.results_db);
  const auto run = db.get_run(*r.run_id);
  ASSERT_TRUE(run);
  EXPECT_EQ(run->status, RunStatus::Ok);
  std::size_t ops = 0;
  for (const auto& b : plan.ranks) ops += plan.roles[static_cast<std::size_t>(b.role)].ops.size();
  EXPECT_EQ(run->op_samples.size(), ops);
  bool has_loss = false;
  for (const Metric& m : run->metrics) has_loss = has_loss || (m.name == "final_loss" && m.value == r.log.back().loss);
  EXPECT_TRUE(has_loss);
}

TEST(TrainMpi, ResumeFromACheckpointReproducesTheUninterruptedRun) {
  if (runtime->world_size() != 8) GTEST_SKIP() << "runs with 8 ranks";
  TrainConfig c = config("tiny-gpt-deep", 2, 2, 2, 4);
  c.iterations = 4;
  c.out_dir = shared_dir("straight");
  const TrainResult straight = train(c, *runtime, quiet);

  TrainConfig first = c;
  first.out_dir = shared_dir("interrupted");
  first.iterations = 2;  // checkpoints after its last iteration
  train(first, *runtime, quiet);
  TrainConfig second = first;
  second.iterations = 4;
  second.resume = true;
  const TrainResult resumed = train(second, *runtime, quiet);

  ASSERT_EQ(resumed.log.size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) EXPECT_EQ(resumed.log[i].loss, straight.log[i + 2].loss) << "iteration " << i + 2;
  // The final state itself: every rank's shard of weights and Adam moments is the same bytes.
  const std::string shard = "rank_0000" + std::to_string(runtime->world_rank()) + ".bin";
  EXPECT_EQ(bytes_of(c.out_dir / "checkpoints" / "iter_0000004" / shard), bytes_of(second.out_dir / "checkpoints" / "iter_0000004" / shard));
}

TEST(TrainMpi, ATinyGptLearnsTheCorpus) {
  if (runtime->world_size() != 1) GTEST_SKIP() << "runs with 1 rank";
  TrainConfig c = config("tiny-gpt", 1, 1, 1, 8);
  c.plan.seq_length = 64;
  c.plan.micro_batch_size = 4;
  c.data = "corpus";
  c.iterations = 200;
  c.options.adamw.lr = 3e-3;
  c.out_dir = shared_dir("corpus");
  const TrainResult r = train(c, *runtime, quiet);
  // ln 256 = 5.55 nats at the start; English bytes carry about 4.4 bits (3.0 nats) on their own,
  // so a mean under 2.6 over the last 20 iterations (fresh windows each) is learnt context.
  EXPECT_NEAR(r.log.front().loss, std::log(256.0), 0.1);
  double tail = 0;
  for (std::size_t i = r.log.size() - 20; i < r.log.size(); ++i) tail += r.log[i].loss / 20;
  EXPECT_LT(tail, 2.6);
}

}  // namespace
}  // namespace px

int main(int argc, char** argv) {
  px::MpiRuntime mpi(&argc, &argv);
  px::runtime = &mpi;
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
