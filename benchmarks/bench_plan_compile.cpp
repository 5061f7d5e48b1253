// Compile time of the plan compiler at cluster scale: GPT-3 175B at tp8·pp16·dp80 on 10,240 H100s,
// interleaved 1F1B (v=2), global batch 2560 — every rank's program (one per distinct role) and
// binding. Reports peak resident memory of the process as a counter.
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include "engine/plan/compiler.hpp"
#include "engine/plan/plan_summary.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

namespace {

struct Setup {
  px::ModelSpec model;
  px::ClusterSpec cluster;
  px::PlanSpec plan;
};

const Setup& gpt3_on_10240() {
  static const Setup s = [] {
    const px::SpecCatalog cat(PX_DATASETS_DIR);
    Setup x{cat.model("gpt3-175b"), cat.cluster("h100-10240"), {}};
    x.plan.tensor_model_parallel_size = 8;
    x.plan.pipeline_model_parallel_size = 16;
    x.plan.data_parallel_size = 80;
    x.plan.global_batch_size = 2560;
    x.plan.micro_batch_size = 1;
    x.plan.schedule = px::PipelineSchedule::Interleaved1F1B;
    x.plan.virtual_pipeline_model_parallel_size = 2;
    x.plan = px::resolve_plan(x.plan, x.model, &x.cluster);
    return x;
  }();
  return s;
}

double peak_rss_gib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / (1024.0 * 1024.0);  // ru_maxrss is in KiB on Linux
}

void BM_CompileGpt3_10240(benchmark::State& state) {
  const Setup& s = gpt3_on_10240();
  std::int64_t ops = 0;
  for (auto _ : state) {
    const px::CompiledPlan plan = px::compile_plan(s.model, s.plan);
    ops = 0;
    for (const auto& r : plan.roles) ops += static_cast<std::int64_t>(r.ops.size());
    benchmark::DoNotOptimize(plan.ranks.data());
  }
  state.counters["ranks"] = static_cast<double>(s.plan.world_size());
  state.counters["role_ops"] = static_cast<double>(ops);
  state.counters["peak_rss_GiB"] = peak_rss_gib();
}
BENCHMARK(BM_CompileGpt3_10240)->Unit(benchmark::kMillisecond)->MinTime(2.0);

// Compile plus the memory plan of every role: what `parallax plan show` does.
void BM_CompileAndPlanMemoryGpt3_10240(benchmark::State& state) {
  const Setup& s = gpt3_on_10240();
  for (auto _ : state) {
    const px::CompiledPlan plan = px::compile_plan(s.model, s.plan);
    const px::PlanSummary summary = px::summarize(plan);
    benchmark::DoNotOptimize(summary.total_flops);
  }
  state.counters["peak_rss_GiB"] = peak_rss_gib();
}
BENCHMARK(BM_CompileAndPlanMemoryGpt3_10240)->Unit(benchmark::kMillisecond)->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
