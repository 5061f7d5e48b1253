// Calibration from the engine's traces: a profile built from Kineto traces of a plan makes the
// replay cost every measured op exactly as measured (the join on op signatures is exact), keeps
// means and spreads per signature, survives a round trip through its file, and refuses traces
// of another plan naming the file.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <set>

#include "engine/core/error.hpp"
#include "engine/core/hash.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/plan/plan_summary.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "engine/trace/chrome_trace.hpp"
#include "simulator/calibration.hpp"
#include "simulator/replay.hpp"

namespace px::sim {
namespace {

namespace fs = std::filesystem;

CompiledPlan tp2_pp2() {
  const SpecCatalog cat(PX_DATASETS_DIR);
  const ModelSpec m = cat.model("tiny-gpt-deep");
  PlanSpec p;
  p.tensor_model_parallel_size = 2;
  p.pipeline_model_parallel_size = 2;
  p.global_batch_size = 4;
  return compile_plan(m, resolve_plan(p, m, nullptr));
}

// A "measured" duration that depends on nothing but the op's signature.
double fake_duration(const Op& op) { return 1e-4 * static_cast<double>(1 + fnv1a(op_signature(op)) % 7); }

std::vector<fs::path> write_traces(const CompiledPlan& plan, const fs::path& dir, double jitter, double comm_host_s = 0,
                                   const std::function<double(const Op&)>& duration = fake_duration) {
  fs::create_directories(dir);
  std::vector<fs::path> files;
  for (int r = 0; r < plan.topology.world_size(); ++r) {
    const Program& prog = plan.program_of(r);
    std::vector<OpTiming> t(prog.ops.size());
    double clock = 0;
    for (std::size_t i = 0; i < prog.ops.size(); ++i) {
      const double d = duration(prog.ops[i]) * (1 + (i % 2 ? jitter : -jitter));
      t[i] = {clock, clock + d};
      clock += d;
    }
    std::vector<double> host(prog.ops.size(), 0.0);
    for (std::size_t i = 0; i < prog.ops.size(); ++i)
      if (is_comm(prog.ops[i].kind)) host[i] = comm_host_s;
    ChromeTrace trace(plan, {r, "mpi", "cpu", false});
    trace.add_iteration(0, t, 0.0, host);
    files.push_back(dir / ("trace_rank" + std::to_string(r) + ".json"));
    trace.write(files.back());
  }
  return files;
}

TEST(Calibration, AVerbatimReplayCostsEveryRanksOpsAsThatRankRecordedThem) {
  const CompiledPlan plan = tp2_pp2();
  const fs::path dir = fs::path(::testing::TempDir()) / ("verbatim-" + std::to_string(getpid()));
  // Jitter makes each op's duration differ from its signature's median: verbatim keeps it.
  const double host_s = 3e-5;
  const std::vector<fs::path> files = write_traces(plan, dir, 0.25, host_s);
  const std::vector<RecordedIteration> its = recorded_iterations(plan, files);
  ASSERT_EQ(its.size(), 1u);
  EXPECT_EQ(its[0].iteration, 0);
  for (int rank = 0; rank < plan.topology.world_size(); ++rank) {
    const Program& prog = plan.program_of(rank);
    for (std::size_t i = 0; i < prog.ops.size(); ++i)
      EXPECT_NEAR(its[0].host_seconds[static_cast<std::size_t>(rank)][i], is_comm(prog.ops[i].kind) ? host_s : 0.0, 1e-12) << prog.name_of(prog.ops[i]);
  }
  SimOptions o;
  o.recorded = its[0].op_seconds;
  o.traced_ranks = {0, 1, 2, 3};
  const SpecCatalog cat(PX_DATASETS_DIR);
  const SimResult r = simulate(plan, cat.cluster("h100-8"), o);
  EXPECT_EQ(r.error_band, 0.0);
  for (std::size_t k = 0; k < r.traced_ranks.size(); ++k) {
    const Program& prog = plan.program_of(r.traced_ranks[k]);
    for (std::size_t i = 0; i < prog.ops.size(); ++i) {
      if (is_comm(prog.ops[i].kind) || prog.ops[i].stream != Stream::Compute) continue;
      const double recorded = fake_duration(prog.ops[i]) * (1 + (i % 2 ? 0.25 : -0.25));
      EXPECT_NEAR(r.timings[k][i].end - r.timings[k][i].start, recorded, 1e-12) << prog.name_of(prog.ops[i]);
    }
  }
  // Every rank's trace is needed.
  EXPECT_THROW(recorded_iterations(plan, {files[0], files[1], files[2]}), Error);
}

TEST(Calibration, ReplayCostsMeasuredOpsExactlyAsMeasured) {
  const CompiledPlan plan = tp2_pp2();
  const fs::path dir = fs::path(::testing::TempDir()) / ("calibration-" + std::to_string(getpid()));
  CalibrationProfile profile;
  profile.add_traces(plan, write_traces(plan, dir, 0.0));
  ASSERT_GT(profile.size(), 10u);
  SimOptions o;
  o.profile = profile;
  o.traced_ranks = {0, 3};
  const SpecCatalog cat(PX_DATASETS_DIR);
  const SimResult r = simulate(plan, cat.cluster("h100-8"), o);
  EXPECT_DOUBLE_EQ(r.measured_fraction, 1.0);
  // All compute measured: the error band is the measurements' own spread, not the roofline's.
  EXPECT_DOUBLE_EQ(r.error_band, r.measured_spread);
  EXPECT_NEAR(simulate(plan, cat.cluster("h100-8")).error_band, CostModelOptions{}.roofline_uncertainty, 1e-12);
  for (std::size_t k = 0; k < r.traced_ranks.size(); ++k) {
    const Program& prog = plan.program_of(r.traced_ranks[k]);
    for (std::size_t i = 0; i < prog.ops.size(); ++i) {
      if (is_comm(prog.ops[i].kind) || prog.ops[i].stream != Stream::Compute) continue;
      EXPECT_NEAR(r.timings[k][i].end - r.timings[k][i].start, fake_duration(prog.ops[i]), 1e-12) << prog.name_of(prog.ops[i]);
    }
  }
}

TEST(Calibration, MeansSpreadsAndTheirFile) {
  const CompiledPlan plan = tp2_pp2();
  const fs::path dir = fs::path(::testing::TempDir()) / ("calibration-jitter-" + std::to_string(getpid()));
  CalibrationProfile profile;
  profile.add_traces(plan, write_traces(plan, dir, 0.1));  // every other op 10% slow, the rest 10% fast
  const Op& gemm = *std::find_if(plan.roles[0].ops.begin(), plan.roles[0].ops.end(), [](const Op& op) { return op.kind == OpKind::Gemm; });
  const auto m = profile.lookup(gemm);
  ASSERT_TRUE(m);
  EXPECT_GT(m->samples, 4);
  EXPECT_NEAR(m->seconds, fake_duration(gemm), 0.1 * fake_duration(gemm) + 1e-15);
  EXPECT_NEAR(m->spread, 0.1, 0.1);
  profile.write(dir / "profile.json");
  const CalibrationProfile back = CalibrationProfile::read(dir / "profile.json");
  EXPECT_EQ(back.to_json().dump(), profile.to_json().dump());
  // It knows which plan it measured, so that only that plan's prediction is compared with it.
  EXPECT_EQ(back.traced_plan(), plan_to_json(plan.plan));
}

// A profile of one plan costs another plan's ops, whose shapes it never saw, from the sizes it
// did: kernels that cost a fixed overhead plus a rate times their work come out exact, inside
// the measured sizes or beyond them; a family measured at one size takes the overhead the others
// show, and says it is unsure.
// Each traced iteration keeps its own durations and its own measured span, and a replay of each
// costs its ops as that iteration recorded them: rank 1 slow in the second iteration only makes
// only the second replay slower.
TEST(Calibration, AVerbatimReplayKeepsEachIterationApart) {
  const CompiledPlan plan = tp2_pp2();
  const fs::path dir = fs::path(::testing::TempDir()) / ("verbatim-iterations-" + std::to_string(getpid()));
  fs::create_directories(dir);
  std::vector<fs::path> files;
  for (int r = 0; r < plan.topology.world_size(); ++r) {
    const Program& prog = plan.program_of(r);
    ChromeTrace trace(plan, {r, "mpi", "cpu", false});
    double clock = 0;
    for (int it = 0; it < 2; ++it) {
      std::vector<OpTiming> t(prog.ops.size());
      for (std::size_t i = 0; i < prog.ops.size(); ++i) {
        const double d = fake_duration(prog.ops[i]) * (it == 1 && r == 1 ? 2.0 : 1.0);
        t[i] = {clock, clock + d};
        clock += d;
      }
      trace.add_iteration(it, t);
      clock += 1e-3;  // the trainer's bookkeeping between iterations
    }
    files.push_back(dir / ("trace_rank" + std::to_string(r) + ".json"));
    trace.write(files.back());
  }
  const std::vector<RecordedIteration> its = recorded_iterations(plan, files);
  ASSERT_EQ(its.size(), 2u);
  EXPECT_EQ(its[0].iteration, 0);
  EXPECT_EQ(its[1].iteration, 1);
  EXPECT_GT(its[1].measured_s, its[0].measured_s);
  const Program& prog = plan.program_of(1);
  for (std::size_t i = 0; i < prog.ops.size(); ++i) {
    if (is_comm(prog.ops[i].kind)) continue;
    // Both carry the run's dispatch gap; the second iteration's op took its duration twice.
    EXPECT_NEAR(its[1].op_seconds[1][i] - its[0].op_seconds[1][i], fake_duration(prog.ops[i]), 1e-12) << prog.name_of(prog.ops[i]);
  }
  const SpecCatalog cat(PX_DATASETS_DIR);
  double predicted[2];
  for (int it = 0; it < 2; ++it) {
    SimOptions o;
    o.recorded = its[static_cast<std::size_t>(it)].op_seconds;
    predicted[it] = simulate(plan, cat.cluster("h100-8"), o).iteration_s;
  }
  EXPECT_GT(predicted[1], 1.2 * predicted[0]);
}

TEST(Calibration, OpsOfOtherShapesInterpolateAcrossMeasuredSizes) {
  const SpecCatalog cat(PX_DATASETS_DIR);
  const ModelSpec m = cat.model("tiny-gpt");
  auto plan_with = [&](int micro_batch, int tp) {
    PlanSpec p;
    p.tensor_model_parallel_size = tp;
    p.micro_batch_size = micro_batch;
    p.global_batch_size = 4;
    p.precision = DType::F32;
    p.grad_dtype = DType::F32;
    return compile_plan(m, resolve_plan(p, m, nullptr));
  };
  const auto kernel = [](const Op& op) { return 3e-6 + 2e-12 * op_work(op); };
  const CompiledPlan measured = plan_with(2, 1);
  const fs::path dir = fs::path(::testing::TempDir()) / ("calibration-interp-" + std::to_string(getpid()));
  CalibrationProfile profile;
  profile.add_traces(measured, write_traces(measured, dir, 0.0, 0.0, kernel));
  // The file keeps what interpolation needs.
  profile.write(dir / "profile.json");
  const CalibrationProfile back = CalibrationProfile::read(dir / "profile.json");
  int exact = 0, proportional = 0;
  for (const CompiledPlan& other : {plan_with(1, 1), plan_with(4, 1), plan_with(2, 2)}) {
    for (const Op& op : other.roles[0].ops) {
      if (is_comm(op.kind) || !(op_work(op) > 0)) continue;
      std::set<double> sizes;
      for (const Op& x : measured.roles[0].ops)
        if (!is_comm(x.kind) && op_family(x) == op_family(op)) sizes.insert(op_work(x));
      const auto c = back.lookup(op);
      if (sizes.empty()) {  // e.g. the vocabulary-parallel loss's extra phases at tp 2
        EXPECT_FALSE(c) << other.roles[0].name_of(op);
        continue;
      }
      ASSERT_TRUE(c) << other.roles[0].name_of(op);
      if (!c->interpolated) {
        EXPECT_NEAR(c->seconds, kernel(op), 1e-12);
        continue;
      }
      if (sizes.size() >= 2) {
        EXPECT_NEAR(c->seconds, kernel(op), 1e-9 * kernel(op)) << other.roles[0].name_of(op) << " " << op_family(op);
        ++exact;
      } else {
        EXPECT_NEAR(c->seconds, kernel(op), 1e-9 * kernel(op)) << other.roles[0].name_of(op);
        EXPECT_GE(c->spread, 0.5);
        ++proportional;
      }
    }
  }
  EXPECT_GT(exact, 10);
  EXPECT_GT(proportional, 0);
  // A kind of op never measured has no cost here (the roofline takes it).
  Op rope;
  rope.kind = OpKind::Rope;
  rope.bytes_read = 1024;
  EXPECT_FALSE(back.lookup(rope));
}

// A rank whose every op took 20% longer than the others' is measured as such, relative to what
// the signatures' means give, and the file keeps it.
TEST(Calibration, ARankSlowerThanTheOthersIsMeasuredAsSuch) {
  const CompiledPlan plan = tp2_pp2();  // ranks 0, 1 share stage 0's ops; 2, 3 stage 1's
  const fs::path dir = fs::path(::testing::TempDir()) / ("calibration-speed-" + std::to_string(getpid()));
  const std::vector<fs::path> files = write_traces(plan, dir, 0.0);
  // Rank 1 again, every duration 1.2 times.
  ChromeTrace slow(plan, {1, "mpi", "cpu", false});
  const Program& prog = plan.program_of(1);
  std::vector<OpTiming> t(prog.ops.size());
  double clock = 0;
  for (std::size_t i = 0; i < prog.ops.size(); ++i) {
    t[i] = {clock, clock + 1.2 * fake_duration(prog.ops[i])};
    clock = t[i].end;
  }
  slow.add_iteration(0, t);
  slow.write(files[1]);
  CalibrationProfile profile;
  profile.add_traces(plan, files);
  const std::map<int, double> speeds = profile.rank_speeds();
  ASSERT_EQ(speeds.size(), 4u);
  // Ranks 0 and 1 run the same program, so their ratio is exactly the slowdown; rank 1 pulls the
  // means of the signatures it shares up, so the others come out a little faster than 1.
  EXPECT_NEAR(speeds.at(1) / speeds.at(0), 1.2, 1e-9);
  EXPECT_NEAR(speeds.at(2), speeds.at(3), 1e-12);
  EXPECT_LT(speeds.at(0), 1.0);
  EXPECT_LT(speeds.at(2), 1.0);
  profile.write(dir / "profile.json");
  EXPECT_EQ(CalibrationProfile::read(dir / "profile.json").rank_speeds(), speeds);
}

TEST(Calibration, CollectivesInterpolateTheCommBenchmark) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("calibration-comm-" + std::to_string(getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "comm.json") << R"({"benchmark": "parallax comm_bench", "rows": [
    {"collective": "all_reduce", "ranks": 2, "size_bytes": 1024, "time_us": 10},
    {"collective": "all_reduce", "ranks": 2, "size_bytes": 4096, "time_us": 16},
    {"collective": "send_recv", "ranks": 2, "size_bytes": 1024, "time_us": 4},
    {"collective": "all_gather", "ranks": 2, "size_bytes": 1024, "time_us": 9, "median_us": 3}]})";
  CalibrationProfile p;
  p.add_comm_bench(dir / "comm.json");
  EXPECT_DOUBLE_EQ(*p.collective_seconds(OpKind::AllGather, 2, 1024), 3e-6);    // the median iteration, where given
  EXPECT_DOUBLE_EQ(*p.collective_seconds(OpKind::AllReduce, 2, 512), 10e-6);    // below: the smallest
  EXPECT_DOUBLE_EQ(*p.collective_seconds(OpKind::AllReduce, 2, 2048), 12e-6);   // between: linear
  EXPECT_DOUBLE_EQ(*p.collective_seconds(OpKind::AllReduce, 2, 7168), 22e-6);   // past: at the last slope
  EXPECT_FALSE(p.collective_seconds(OpKind::AllReduce, 4, 2048));               // another group size
  EXPECT_DOUBLE_EQ(*p.collective_seconds(OpKind::Send, 8, 1024), 4e-6);         // a message is between two
  EXPECT_EQ(CalibrationProfile::from_json(p.to_json()).to_json().dump(), p.to_json().dump());
  std::ofstream(dir / "bad.json") << R"({"rows": [{"collective": "all_reduce"}]})";
  EXPECT_THROW(p.add_comm_bench(dir / "bad.json"), Error);
}

// Sweeps before and after a stretch of runs: each size gets their mean, sizes only one measured
// keep its value, and the interpolation runs over the pooled points.
TEST(Calibration, CommBenchmarksOfTheSameSizesPoolIntoTheirMean) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("calibration-pool-" + std::to_string(getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "before.json") << R"({"rows": [
    {"collective": "all_reduce", "ranks": 2, "size_bytes": 1024, "time_us": 10},
    {"collective": "all_reduce", "ranks": 2, "size_bytes": 4096, "time_us": 40}]})";
  std::ofstream(dir / "after.json") << R"({"rows": [
    {"collective": "all_reduce", "ranks": 2, "size_bytes": 1024, "time_us": 20},
    {"collective": "all_reduce", "ranks": 2, "size_bytes": 2048, "time_us": 16}]})";
  std::ofstream(dir / "third.json") << R"({"rows": [{"collective": "all_reduce", "ranks": 2, "size_bytes": 1024, "time_us": 45}]})";
  CalibrationProfile p;
  p.add_comm_bench(dir / "before.json");
  p.add_comm_bench(dir / "after.json");
  EXPECT_DOUBLE_EQ(*p.collective_seconds(OpKind::AllReduce, 2, 1024), 15e-6);
  EXPECT_DOUBLE_EQ(*p.collective_seconds(OpKind::AllReduce, 2, 2048), 16e-6);
  EXPECT_DOUBLE_EQ(*p.collective_seconds(OpKind::AllReduce, 2, 3072), 28e-6);
  p.add_comm_bench(dir / "third.json");
  EXPECT_DOUBLE_EQ(*p.collective_seconds(OpKind::AllReduce, 2, 1024), 25e-6);  // (10 + 20 + 45) / 3
}

TEST(Calibration, TracesOfAnotherPlanAreRefusedNamingTheFile) {
  const CompiledPlan plan = tp2_pp2();
  const fs::path dir = fs::path(::testing::TempDir()) / ("calibration-other-" + std::to_string(getpid()));
  const auto files = write_traces(plan, dir, 0.0);
  const SpecCatalog cat(PX_DATASETS_DIR);
  const ModelSpec m = cat.model("tiny-gpt");
  PlanSpec p;
  p.data_parallel_size = 4;
  p.global_batch_size = 4;
  const CompiledPlan other = compile_plan(m, resolve_plan(p, m, nullptr));
  CalibrationProfile profile;
  try {
    profile.add_traces(other, files);
    FAIL() << "accepted another plan's traces";
  } catch (const Error& e) {
    EXPECT_EQ(e.where().file, files[0].string());
  }
  std::ofstream(dir / "broken.json") << "{\"traceEvents\": [";
  EXPECT_THROW(profile.add_traces(plan, {dir / "broken.json"}), Error);
}

TEST(Calibration, ARingStepsAttentionIsKeyedByWhereItsKeysLieAgainstItsQueries) {
  // Contiguous context-parallel blocks under causal masking: at step s member i sees the keys of
  // member (i - s) mod cp, all visible when earlier, the diagonal at step 0, all masked when later.
  Op att;
  att.kind = OpKind::AttentionCore;
  att.step = 1;
  EXPECT_NE(op_signature(att, {0, 2}), op_signature(att, {1, 2}));
  EXPECT_TRUE(op_signature(att, {0, 2}).ends_with("/future"));
  EXPECT_TRUE(op_signature(att, {1, 2}).ends_with("/past"));
  att.step = 0;
  EXPECT_TRUE(op_signature(att, {1, 2}).ends_with("/diagonal"));
  EXPECT_EQ(op_signature(att), op_signature(att, {0, 1}));  // no ring, nothing to tell apart
  Op gemm;
  EXPECT_EQ(op_signature(gemm, {0, 2}), op_signature(gemm, {1, 2}));
  CalibrationProfile p;
  att.step = 1;
  p.add(op_signature(att, {0, 2}), 1e-6);
  p.add(op_signature(att, {1, 2}), 9e-6);
  EXPECT_DOUBLE_EQ(p.lookup(att, {0, 2})->seconds, 1e-6);
  EXPECT_DOUBLE_EQ(p.lookup(att, {1, 2})->seconds, 9e-6);
}

TEST(Calibration, TheHostsShareOfACommOpDelaysItsNextIssueInOrder) {
  // The CPU engine's host thread packs and posts each comm op (and unpacks it) itself: a profile
  // keeps that time per comm signature, and an in-order replay issues nothing else meanwhile.
  const CompiledPlan plan = tp2_pp2();
  const fs::path dir = fs::path(::testing::TempDir()) / ("calibration-host-" + std::to_string(getpid()));
  CalibrationProfile profile;
  profile.add_traces(plan, write_traces(plan, dir, 0.0, 7e-6));
  const Program& prog = plan.program_of(0);
  int checked = 0;
  for (const Op& op : prog.ops)
    if (is_comm(op.kind)) {
      ASSERT_TRUE(profile.host_seconds(op)) << prog.name_of(op);
      EXPECT_NEAR(*profile.host_seconds(op), 7e-6, 1e-12);
    }
  SimOptions o;
  o.profile = profile;
  o.in_order_issue = true;
  const SimResult r = simulate(plan, SpecCatalog(PX_DATASETS_DIR).cluster("h100-8"), o);
  for (std::size_t i = 0; i + 1 < prog.ops.size(); ++i)
    if (is_comm(prog.ops[i].kind)) {
      EXPECT_GE(r.timings[0][i + 1].start, r.timings[0][i].start + 7e-6 - 1e-12) << prog.name_of(prog.ops[i]);
      ++checked;
    }
  EXPECT_GT(checked, 4);
}

}  // namespace
}  // namespace px::sim
