// Wall time of the simulator's replay: GPT-3 175B, tp8·pp16 with interleaved 1F1B (v=2), on H100s;
// unfolded at dp 1, 2, 4 and 8 (128 to 1,024 GPUs, 16 micro-batches per replica), and unfolded and
// folded at the acceptance size, dp 80 on 10,240 GPUs with global batch 2560 (32 micro-batches per
// replica).
// The replay runs in a child process; the counters are the predicted iteration and the flows.
#include <benchmark/benchmark.h>

#include "engine/plan/compiler.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "simulator/replay.hpp"

namespace {

void replay_gpt3(benchmark::State& state, int dp, int micro_batches, bool fold) {
  const px::SpecCatalog cat(PX_DATASETS_DIR);
  const px::ModelSpec model = cat.model("gpt3-175b");
  const px::ClusterSpec cluster = cat.cluster("h100-10240");
  px::PlanSpec p;
  p.tensor_model_parallel_size = 8;
  p.pipeline_model_parallel_size = 16;
  p.data_parallel_size = dp;
  p.micro_batch_size = 1;
  p.global_batch_size = micro_batches * dp;
  p.schedule = px::PipelineSchedule::Interleaved1F1B;
  p.virtual_pipeline_model_parallel_size = 2;
  const px::CompiledPlan plan = px::compile_plan(model, px::resolve_plan(p, model, &cluster));
  px::sim::SimOptions options;
  options.fold_data_parallel = fold;
  px::sim::SimResult r;
  for (auto _ : state) r = px::sim::simulate(plan, cluster, options);
  state.counters["gpus"] = plan.topology.world_size();
  state.counters["predicted_iteration_s"] = r.iteration_s;
  state.counters["flows"] = static_cast<double>(r.flows);
}
void BM_ReplayGpt3Unfolded(benchmark::State& state) { replay_gpt3(state, static_cast<int>(state.range(0)), 16, false); }
BENCHMARK(BM_ReplayGpt3Unfolded)->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Arg(16)->Unit(benchmark::kSecond)->Iterations(1);

void BM_ReplayGpt3Unfolded10240(benchmark::State& state) { replay_gpt3(state, 80, 32, false); }
BENCHMARK(BM_ReplayGpt3Unfolded10240)->Unit(benchmark::kSecond)->Iterations(1);

void BM_ReplayGpt3Folded10240(benchmark::State& state) { replay_gpt3(state, 80, 32, true); }
BENCHMARK(BM_ReplayGpt3Folded10240)->Unit(benchmark::kSecond)->Iterations(1);

}  // namespace

BENCHMARK_MAIN();
