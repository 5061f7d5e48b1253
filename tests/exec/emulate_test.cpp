// Rank emulation through its public entry points (px::emulate_rank and `parallax train
// --emulate-rank`): one rank of a tp2·pp2·dp2 plan run alone writes its normal trace, one event per
// op of its program, comm events flagged as stand-ins and compute events timed; its arena is that
// rank's plan alone; every rank of several strategies' plans runs with finite arithmetic; a profile
// calibrates from a single emulated trace while the verbatim replay refuses it; a rank outside the
// plan is refused naming the flag.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <fmt/format.h>
#include <fstream>
#include <ostream>
#include <nlohmann/json.hpp>

#include "engine/core/error.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/plan/memory_planner.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "engine/trace/chrome_trace.hpp"
#include "engine/train/emulate.hpp"
#include "tests/cli/cli_runner.hpp"
#ifdef PX_HAVE_SIMULATOR
#include "simulator/calibration.hpp"
#endif

namespace px {
namespace {

namespace fs = std::filesystem;

// This process's scratch folder, removed when the test program ends (each ctest test is a process).
struct Scratch {
  fs::path root = fs::path(::testing::TempDir()) / ("parallax-emulate-" + std::to_string(getpid()));
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }
} scratch;

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = scratch.root / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

struct PlanCase {
  const char* name;
  const char* model;
  int tp = 1, pp = 1, dp = 1, cp = 1, ep = 1, zero = 0;
  bool sp = false;
};

// gtest names a parameter by it (instead of dumping its bytes).
void PrintTo(const PlanCase& k, std::ostream* os) { *os << k.name; }

TrainConfig config(const PlanCase& k, const std::string& out) {
  TrainConfig c;
  c.datasets_dir = PX_DATASETS_DIR;
  c.model = load_model_file(c.datasets_dir / "models" / (std::string(k.model) + ".yaml"));
  PlanSpec p;
  p.precision = DType::F32;
  p.grad_dtype = DType::F32;
  p.tensor_model_parallel_size = k.tp;
  p.pipeline_model_parallel_size = k.pp;
  p.data_parallel_size = k.dp;
  p.context_parallel_size = k.cp;
  p.expert_model_parallel_size = k.ep;
  p.zero_stage = k.zero;
  p.sequence_parallel = k.sp;
  p.micro_batch_size = 1;
  p.global_batch_size = 2 * k.dp;  // two micro-batches per replica: the pipeline's steady state
  p.seq_length = 32;
  c.plan = resolve_plan(p, c.model, nullptr);
  c.iterations = 2;
  c.trace_iterations = 1;
  c.out_dir = fresh_dir(out);
  c.log_every = 0;
  return c;
}

const PlanCase kTp2Pp2Dp2{"tp2_pp2_dp2", "tiny-gpt-deep", 2, 2, 2};

nlohmann::json read_json(const fs::path& f) {
  std::ifstream in(f);
  return nlohmann::json::parse(in);
}

TEST(Emulate, OneRankOfATp2Pp2Dp2PlanTracesItsProgramWithStandInComm) {
  const TrainConfig c = config(kTp2Pp2Dp2, "traced");
  const int rank = 5;  // stage 1 (the last, with the loss), tp member 1, dp member 0
  const EmulationResult r = emulate_rank(c, rank);
  const CompiledPlan plan = compile_plan(c.model, c.plan);
  const Program& prog = plan.program_of(rank);
  EXPECT_EQ(r.rank, rank);
  EXPECT_EQ(r.world_size, 8);
  EXPECT_EQ(r.stage, 1);
  EXPECT_EQ(r.ops, prog.ops.size());
  EXPECT_EQ(r.trace, c.out_dir / "trace_rank00005.json");
  ASSERT_EQ(r.iteration_seconds.size(), 2u);
  EXPECT_GT(r.compute_seconds, 0.0);
  EXPECT_TRUE(std::isfinite(r.grad_norm));

  const nlohmann::json t = read_json(r.trace);
  EXPECT_TRUE(check_chrome_trace(t).empty()) << check_chrome_trace(t).front();
  EXPECT_EQ(t["distributedInfo"]["rank"], rank);
  EXPECT_EQ(t["distributedInfo"]["world_size"], 8);
  EXPECT_EQ(t["parallax"]["emulated_rank"], rank);
  std::size_t comm = 0, events = 0;
  std::vector<int> seen(prog.ops.size(), 0);
  for (const auto& e : t["traceEvents"]) {
    if (e["ph"] != "X" || !e["args"].contains("op id")) continue;
    ++events;
    const auto id = e["args"]["op id"].get<std::size_t>();
    ASSERT_LT(id, prog.ops.size());
    ++seen[id];
    const Op& op = prog.ops[id];
    EXPECT_EQ(e["args"]["kind"], std::string(to_string(op.kind)));
    if (is_comm(op.kind)) {
      ++comm;
      EXPECT_EQ(e["args"].value("stand_in", false), true) << prog.name_of(op);
    } else {
      EXPECT_FALSE(e["args"].contains("stand_in")) << prog.name_of(op);
      EXPECT_GT(e["dur"].get<double>(), 0.0) << prog.name_of(op);  // real work, really timed
    }
  }
  EXPECT_EQ(events, prog.ops.size());  // one traced iteration: each op exactly once
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), static_cast<std::ptrdiff_t>(prog.ops.size()));
  EXPECT_EQ(comm, r.stand_in_ops);
  EXPECT_GT(comm, 10u);  // tp all-reduces, pipeline messages, dp gradient reduction, embedding
  EXPECT_EQ(t["parallax"]["stand_in_ops"], comm);
  // Every comm op of both iterations went to a stand-in (ring steps may call it twice).
  EXPECT_GE(r.stand_in_calls, static_cast<std::int64_t>(2 * comm));
}

TEST(Emulate, AllocatesOnlyThatRanksShards) {
  const TrainConfig c = config(kTp2Pp2Dp2, "memory");
  const CompiledPlan plan = compile_plan(c.model, c.plan);
  for (int rank : {0, 7}) {
    const EmulationResult r = emulate_rank(c, rank);
    EXPECT_EQ(r.arena_bytes, plan_memory(plan.program_of(rank)).arena_bytes) << rank;
    // The planner rounds each tensor up to 256 bytes; the highest byte written lies in the last block.
    EXPECT_LE(r.arena_bytes_touched, r.arena_bytes) << rank;
    EXPECT_GT(r.arena_bytes_touched, r.arena_bytes - 256) << rank;
  }
  // A quarter of the layers' weights at half their width: far below the whole model on one rank.
  PlanCase whole = kTp2Pp2Dp2;
  whole.tp = whole.pp = whole.dp = 1;
  const TrainConfig one = config(whole, "memory-whole");
  const std::int64_t whole_bytes = plan_memory(compile_plan(one.model, one.plan).program_of(0)).arena_bytes;
  EXPECT_LT(emulate_rank(c, 2).arena_bytes, whole_bytes / 2);
}

class EmulateEveryRank : public ::testing::TestWithParam<PlanCase> {};

TEST_P(EmulateEveryRank, RunsWithFiniteArithmetic) {
  const TrainConfig c = config(GetParam(), GetParam().name);
  const auto world = static_cast<int>(c.plan.world_size());
  for (int rank = 0; rank < world; ++rank) {
    const EmulationResult r = emulate_rank(c, rank);
    EXPECT_TRUE(std::isfinite(r.grad_norm)) << "rank " << rank;
    EXPECT_GT(r.stand_in_ops, 0u) << "rank " << rank;
    EXPECT_TRUE(fs::exists(c.out_dir / fmt::format("trace_rank{:05d}.json", rank)));
  }
}

INSTANTIATE_TEST_SUITE_P(Plans, EmulateEveryRank,
                         ::testing::Values(kTp2Pp2Dp2, PlanCase{"sp_zero3", "tiny-gpt", 2, 1, 2, 1, 1, 3, true},
                                           PlanCase{"cp2_zero1", "tiny-gpt", 1, 1, 2, 2, 1, 1},
                                           PlanCase{"ep2_zero2", "tiny-moe", 1, 2, 2, 1, 2, 2}),
                         [](const auto& p) { return std::string(p.param.name); });

TEST(Emulate, RefusesARankOutsideThePlan) {
  const TrainConfig c = config(kTp2Pp2Dp2, "bad-rank");
  for (int rank : {-1, 8}) {
    try {
      emulate_rank(c, rank);
      ADD_FAILURE() << "rank " << rank << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Usage);
      EXPECT_NE(e.message().find(fmt::format("--emulate-rank {} is outside the plan's 8 ranks", rank)), std::string::npos) << e.message();
      EXPECT_NE(e.hint().find("0 to 7"), std::string::npos) << e.hint();
    }
  }
  TrainConfig with_db = c;
  with_db.results_db = c.out_dir / "results.db";
  EXPECT_THROW(emulate_rank(with_db, 0), Error);
}

#ifdef PX_HAVE_SIMULATOR
TEST(Emulate, OneEmulatedTraceCalibratesAProfileButNoVerbatimReplay) {
  const TrainConfig c = config(kTp2Pp2Dp2, "calibrate");
  const CompiledPlan plan = compile_plan(c.model, c.plan);
  const int rank = 6;  // stage 1: its compute ops, no other rank's trace
  const EmulationResult r = emulate_rank(c, rank);
  sim::CalibrationProfile profile;
  profile.add_traces(plan, {r.trace});
  EXPECT_GT(profile.size(), 10u);
  const Program& prog = plan.program_of(rank);
  for (const Op& op : prog.ops) {
    const auto m = profile.lookup(op);
    if (is_comm(op.kind)) {
      EXPECT_FALSE(m) << "stand-in timing calibrated " << prog.name_of(op);
    } else {
      ASSERT_TRUE(m) << prog.name_of(op);
      EXPECT_GT(m->seconds, 0.0) << prog.name_of(op);
    }
  }
  // One rank alone with instant comm is not the plan's iteration.
  EXPECT_EQ(profile.measured_iteration_s(), 0.0);
  try {
    sim::recorded_iterations(plan, {r.trace});
    ADD_FAILURE() << "a verbatim replay accepted an emulated trace";
  } catch (const Error& e) {
    EXPECT_EQ(e.where().file, r.trace.string());
    EXPECT_NE(e.message().find("emulated"), std::string::npos) << e.message();
  }
}
#endif

using Cli = px::testing::CliResult;
Cli run(const std::string& args) { return px::testing::run_cli(args); }

const std::string kPlanFlags = "--model tiny-gpt-deep --tp 2 --pp 2 --dp 2 --micro-batch 1 --global-batch 4 --seq-length 32";

TEST(EmulateCli, TrainEmulateRankWritesTheRanksTrace) {
  const fs::path dir = fresh_dir("cli");
  const Cli r = run("train " + kPlanFlags + " --iterations 2 --emulate-rank 3 --json --out '" + dir.string() + "'");
  ASSERT_EQ(r.code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["emulated_rank"], 3);
  EXPECT_EQ(j["world_size"], 8);
  const nlohmann::json t = read_json(dir / "trace_rank00003.json");
  EXPECT_EQ(t["parallax"]["emulated_rank"], 3);
  EXPECT_EQ(t["parallax"]["ops"], j["ops"]);
#ifdef PX_HAVE_SIMULATOR
  const std::string trace = (dir / "trace_rank00003.json").string();
  const Cli cal = run("calibrate " + kPlanFlags + " --traces '" + trace + "' --out '" + (dir / "profile.json").string() + "'");
  EXPECT_EQ(cal.code, 0) << cal.err;
  EXPECT_TRUE(fs::exists(dir / "profile.json"));
  const Cli replay = run("simulate " + kPlanFlags + " --cluster h100-8 --precision fp32 --replay-traces '" + trace + "'");
  EXPECT_EQ(replay.code, 2);
  EXPECT_NE(replay.err.find("emulated alone"), std::string::npos) << replay.err;
#endif
}

TEST(EmulateCli, RefusesARankOutsideThePlan) {
  const Cli r = run("train " + kPlanFlags + " --emulate-rank 8 --out '" + fresh_dir("cli-bad").string() + "'");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--emulate-rank 8 is outside the plan's 8 ranks"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace px
