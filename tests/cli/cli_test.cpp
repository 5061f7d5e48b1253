// The `parallax` command as a user runs it: published parameter counts, the 10,240-rank plan, and
// one clear error line with exit code 2 for every kind of bad input.
#include <gtest/gtest.h>

#include <ostream>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <nlohmann/json.hpp>
#include <string>

#include "results/results_db.hpp"
#include "tests/cli/cli_runner.hpp"

namespace {

using Result = px::testing::CliResult;
Result run(const std::string& args) { return px::testing::run_cli(args); }

nlohmann::json run_json(const std::string& args) {
  const Result r = run(args);
  EXPECT_EQ(r.code, 0) << r.err;
  return nlohmann::json::parse(r.out);
}

TEST(ModelInfo, PublishedParameterCounts) {
  struct Expect {
    const char* model;
    double total_b, active_b, tolerance;
  };
  for (const Expect& e : {Expect{"gpt3-175b", 174.6, 174.6, 0.001}, Expect{"llama2-70b", 68.98, 68.98, 0.0005},
                          Expect{"llama3-8b", 8.03, 8.03, 0.001}, Expect{"mixtral-8x7b", 46.7, 12.9, 0.002}}) {
    const auto j = run_json(std::string("model info ") + e.model + " --json");
    EXPECT_NEAR(j["parameters"]["total_billions"].get<double>() / e.total_b, 1.0, e.tolerance) << e.model;
    EXPECT_NEAR(j["parameters"]["active_billions"].get<double>() / e.active_b, 1.0, e.tolerance) << e.model;
  }
}

TEST(PlanShow, CompilesAll10240RanksOfGpt3) {
  const auto j = run_json(
      "plan show --model gpt3-175b --cluster h100-10240 --tp 8 --pp 16 --dp 80 --global-batch 2560 --micro-batch 1 "
      "--schedule interleaved-1f1b --virtual-stages 2 --json");
  EXPECT_EQ(j["world_size"], 10240);
  EXPECT_EQ(j["ranks_bound"], 10240);
  EXPECT_EQ(j["distinct_roles"], 16);
  EXPECT_EQ(j["micro_batches"], 32);
  EXPECT_NEAR(j["flops_per_iteration"].get<double>() / j["flops_per_iteration_closed_form"].get<double>(), 1.0, 1e-9);
  std::int64_t ranks = 0;
  for (const auto& role : j["roles"]) {
    ranks += role["ranks"].get<std::int64_t>();
    EXPECT_EQ(role["chunks"].size(), 2u);
    EXPECT_TRUE(role["memory"]["fits_hbm"].get<bool>()) << "stage " << role["pipeline_stage"];
  }
  EXPECT_EQ(ranks, 10240);
}

TEST(PlanShow, RankBindingListsItsGroups) {
  const auto j = run_json("plan show --model gpt3-175b --tp 8 --pp 16 --dp 80 --global-batch 2560 --rank 4321 --json");
  const auto& b = j["rank_binding"];
  EXPECT_EQ(b["pipeline_stage"], 6);
  EXPECT_EQ(b["groups"]["tp"]["members"], nlohmann::json({4320, 4321, 4322, 4323, 4324, 4325, 4326, 4327}));
  EXPECT_EQ(b["groups"]["pp"]["members"].size(), 16u);
  EXPECT_EQ(b["groups"]["pp"]["members"][6], 4321);
  EXPECT_EQ(b["groups"]["dp"]["members"].size(), 80u);
  EXPECT_FALSE(b["groups"].contains("expert_dp"));  // a dense model
}

TEST(PlanShow, TextReportNamesEveryStage) {
  const Result r = run("plan show --model llama3-8b --tp 2 --pp 2 --dp 2 --global-batch 8");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("tp2·pp2·dp2 = 8 ranks, 2 distinct rank roles"), std::string::npos) << r.out;
}

TEST(Simulate, PredictsAnIterationAndWritesWellFormedTraces) {
  const std::string dir = ::testing::TempDir() + "/parallax_simulate_" + std::to_string(getpid());
  const auto j = run_json("simulate --model gpt2-124m --cluster h100-8 --tp 2 --pp 2 --dp 2 --global-batch 32 --micro-batch 4 "
                          "--trace-ranks 0 7 --trace-out '" + dir + "' --json");
  const double t = j["iteration_s"].get<double>();
  EXPECT_GT(t, 0);
  const auto& b = j["breakdown_s"];
  EXPECT_NEAR(b["compute"].get<double>() + b["exposed_comm"].get<double>() + b["pipeline_bubble"].get<double>() + b["other"].get<double>(),
              t, 1e-9 * t);
  EXPECT_NEAR(j["tokens_per_second"].get<double>(), 32 * 1024 / t, 1e-6 * 32 * 1024 / t);
  EXPECT_NE(j["mfu_formula"].get<std::string>().find("989.4 TFLOP/s"), std::string::npos);
  double shares = 0;
  for (const auto& [model, share] : j["cost_models"].items()) shares += share.get<double>();
  EXPECT_NEAR(shares, 1.0, 1e-9);
  EXPECT_GT(j["cost_models"]["gemm-curve"].get<double>(), 0.3);
  for (const char* rank : {"00000", "00007"}) {
    std::ifstream in(dir + "/trace_rank" + rank + ".json");
    const auto trace = nlohmann::json::parse(in);
    EXPECT_TRUE(trace["traceEvents"].size() > 100) << rank;
    EXPECT_EQ(trace["distributedInfo"]["rank"].get<int>(), std::stoi(rank));
    // Every compute op names the cost model that timed it.
    int costed = 0;
    for (const auto& e : trace["traceEvents"])
      if (e.value("cat", "") == "kernel" && e["args"].contains("op id") && !e["args"].contains("Collective name")) {
        EXPECT_TRUE(e["args"].contains("cost model")) << e["name"];
        ++costed;
      }
    EXPECT_GT(costed, 100) << rank;
  }
}

// A plan too large for its GPUs is still predicted (a what-if), and says it would not fit.
TEST(Simulate, WarnsWhenAStageNeedsMoreMemoryThanItsGpu) {
  const std::string plan = "simulate --model gpt2-1.5b --cluster h100-8 --dp 1 --global-batch 64 --micro-batch 64 --recompute none ";
  const std::string db = ::testing::TempDir() + "/parallax_fits_" + std::to_string(getpid()) + ".db";
  const Result big = run(plan + "--json --db '" + db + "'");
  ASSERT_EQ(big.code, 0) << big.err;
  const auto j = nlohmann::json::parse(big.out);
  EXPECT_FALSE(j["fits_hbm"].get<bool>());
  EXPECT_FALSE(j["peak_memory_per_role"][0]["fits_hbm"].get<bool>());
  EXPECT_NE(big.err.find("more memory than the 79.65 GiB"), std::string::npos) << big.err;
  // The results row says so too.
  px::ResultsDb results = px::ResultsDb::open(db);
  std::map<std::string, double> metric;
  for (const px::Metric& m : results.metrics(j["run_id"].get<std::int64_t>())) metric[m.name] = m.value;
  EXPECT_EQ(metric.at("fits_hbm"), 0.0);
  EXPECT_GT(metric.at("peak_memory"), 79.65);
  const Result small = run("simulate --model gpt2-1.5b --cluster h100-8 --dp 1 --global-batch 4 --micro-batch 4 --json");
  ASSERT_EQ(small.code, 0) << small.err;
  EXPECT_TRUE(nlohmann::json::parse(small.out)["fits_hbm"].get<bool>());
  EXPECT_EQ(small.err.find("more memory"), std::string::npos) << small.err;
}

// Layer times made by the simulator at a known GEMM-curve level: the fit finds that level again,
// and the profile it writes predicts those times.
TEST(Calibrate, LayerTimesFitRecoversTheCurveLevelTheyWereMadeWith) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(::testing::TempDir()) / ("parallax_layer_times_" + std::to_string(getpid()));
  fs::create_directories(dir);
  {
    std::ofstream known(dir / "known.json");
    known << R"({"format": "parallax-calibration 1", "source": "test", "ops": {}, "collectives": {},
                 "gemm_curve": {"scale": 0.8, "residual": 0, "points": 1}})";
  }
  const std::string base = "--model gpt2-350m --cluster h100-8 --tp 2 --dp 1 --micro-batch 4 --global-batch 4 --precision bf16 ";
  std::string runs;
  for (const char* recompute : {"none", "full"}) {
    const fs::path plan = dir / (std::string("plan-") + recompute + ".yaml");
    std::ofstream(plan) << "tensor_model_parallel_size: 2\ndata_parallel_size: 1\nmicro_batch_size: 4\nglobal_batch_size: 4\n"
                        << "precision: bf16\nrecompute: " << recompute << "\n";
    const auto j = run_json("simulate " + base + "--recompute " + recompute + " --profile '" + (dir / "known.json").string() + "' --json");
    const double fwd = 1e3 * j["layer_s"]["forward"].get<double>(), bwd = 1e3 * j["layer_s"]["backward"].get<double>();
    ASSERT_GT(fwd, 0);
    ASSERT_GT(bwd, fwd);
    runs += "  - {plan: '" + plan.string() + "', forward_ms: " + std::to_string(fwd) + ", backward_ms: " + std::to_string(bwd) + "}\n";
  }
  std::ofstream(dir / "times.yaml") << "source: made by the simulator at 0.8\nmodel: gpt2-350m\ncluster: h100-8\nruns:\n" << runs;
  const Result fit = run("calibrate --layer-times '" + (dir / "times.yaml").string() + "' --out '" + (dir / "fitted.json").string() + "'");
  ASSERT_EQ(fit.code, 0) << fit.err;
  EXPECT_NE(fit.out.find("over 4 layer times"), std::string::npos) << fit.out;
  std::ifstream in(dir / "fitted.json");
  const auto profile = nlohmann::json::parse(in);
  EXPECT_NEAR(profile["gemm_curve"]["scale"].get<double>(), 0.8, 1e-3);
  EXPECT_LT(profile["gemm_curve"]["residual"].get<double>(), 1e-3);
  EXPECT_EQ(profile["gemm_curve"]["points"].get<int>(), 4);
  // A prediction costed by the fitted curve carries the fit's residual in its band, not the 21%
  // of an uncalibrated one.
  const auto fitted = run_json("simulate " + base + "--recompute none --profile '" + (dir / "fitted.json").string() + "' --json");
  const auto plain = run_json("simulate " + base + "--recompute none --json");
  EXPECT_LT(fitted["error_band"]["relative"].get<double>(), plain["error_band"]["relative"].get<double>());
  EXPECT_GT(fitted["iteration_s"].get<double>(), plain["iteration_s"].get<double>());  // a lower curve, a slower run
  fs::remove_all(dir);
}

// Every bad input: exit code 2, exactly one line on stderr, and it says where and why.
struct Bad {
  const char* name;
  const char* args;
  const char* expect;  // a fragment of the error line
};

// Names the case in test output instead of dumping its bytes.
void PrintTo(const Bad& c, std::ostream* os) { *os << c.name; }

class BadInput : public ::testing::TestWithParam<Bad> {};

TEST_P(BadInput, OneClearLineAndExitCode2) {
  const Result r = run(GetParam().args);
  EXPECT_EQ(r.code, 2) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(GetParam().expect), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

INSTANTIATE_TEST_SUITE_P(
    Cli, BadInput,
    ::testing::Values(
        Bad{"unknown_model", "model info gpt-4", "gpt-4"},
        Bad{"missing_model_file", "model info " PX_DATASETS_DIR "/fixtures/does-not-exist.yaml", "does-not-exist.yaml"},
        Bad{"tp_not_dividing_heads", "plan check --model gpt3-175b --tp 5", "tensor_model_parallel_size 5"},
        Bad{"pp_not_dividing_layers", "plan check --model gpt3-175b --pp 7", "pipeline_model_parallel_size"},
        Bad{"global_batch_not_divisible", "plan check --model gpt3-175b --dp 8 --global-batch 100", "global_batch_size 100"},
        Bad{"ep_on_dense_model", "plan check --model llama3-8b --ep 2 --dp 2", "expert"},
        Bad{"world_exceeds_cluster", "plan check --model gpt3-175b --cluster h100-8 --tp 8 --pp 2", "cluster"},
        Bad{"interleaved_micro_batches", "plan check --model gpt3-175b --schedule interleaved-1f1b --pp 4 --virtual-stages 2 --global-batch 6 --dp 1",
            "micro"},
        Bad{"unknown_schedule", "plan check --model gpt3-175b --schedule sideways", "sideways"},
        Bad{"overlap_param_gather_unsharded", "plan check --model gpt2-124m --dp 2 --global-batch 2 --overlap-param-gather",
            "overlap_param_gather needs"},
        Bad{"tp_comm_overlap_without_sp", "plan check --model gpt3-175b --tp 8 --dp 1 --tp-comm-overlap", "tp_comm_overlap overlaps"},
        // Refused by name where the build has no CUDA, as a many-rank plan where it has.
        Bad{"cuda_train_of_many_ranks", "train --model tiny-gpt --tp 2 --device cuda", "--device"},
        Bad{"flag_without_value", "plan check --model gpt3-175b --tp", "--tp"},
        Bad{"rank_outside_plan", "plan show --model gpt3-175b --tp 8 --pp 16 --dp 80 --global-batch 2560 --rank 99999", "--rank 99999"},
        Bad{"unknown_cluster", "plan show --model gpt3-175b --cluster no-such-cluster", "no-such-cluster"},
        Bad{"unknown_command", "frobnicate", "frobnicate"},
        Bad{"simulate_without_cluster", "simulate --model gpt2-124m", "--cluster"},
        Bad{"simulate_plan_exceeds_cluster", "simulate --model gpt2-124m --cluster h100-8 --dp 16 --global-batch 16", "h100-8"},
        Bad{"simulate_bad_slowdown", "simulate --model gpt2-124m --cluster h100-8 --dp 8 --global-batch 8 --slowdown 9=2", "--slowdown"},
        Bad{"simulate_bad_link_factor", "simulate --model gpt2-124m --cluster h100-8 --dp 8 --global-batch 8 --link node0-nic0=x", "--link"},
        Bad{"simulate_unknown_link", "simulate --model gpt2-124m --cluster h100-8 --dp 8 --global-batch 8 --link node7-nic0=0.5", "node7-nic0"},
        Bad{"calibrate_without_measurements", "calibrate --model tiny-gpt --out profile.json", "--layer-times"},
        Bad{"calibrate_traces_and_layer_times", "calibrate --model tiny-gpt --traces t.json --layer-times l.yaml --out p.json", "excludes"},
        Bad{"train_bf16", "train --model tiny-gpt --precision bf16 --iterations 1", "fp32"},
        Bad{"train_world_mismatch", "train --model tiny-gpt --dp 2 --iterations 1", "mpirun -np 2"}),
    [](const auto& param_info) { return std::string(param_info.param.name); });

// Every damaged fixture through the CLI: one line naming the file, exit code 2, nothing on stdout.
TEST(BadFixtures, EachGetsOneLineNamingTheFileAndExitCode2) {
  namespace fs = std::filesystem;
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(fs::path(PX_DATASETS_DIR) / "fixtures" / "bad")) {
    const std::string path = entry.path().string(), stem = entry.path().stem().string();
    std::string args;
    if (stem.rfind("plan_", 0) == 0) {
      // The fixture's first line says what it is checked against: "checked against MODEL[ on CLUSTER]".
      std::ifstream in(path);
      std::string first;
      std::getline(in, first);
      std::smatch m;
      std::string model = "gpt3-175b", cluster;
      if (std::regex_search(first, m, std::regex(R"(checked against ([\w.-]+)(?: on ([\w.-]+))?)")) && m[1] != "any") {
        model = m[1];
        cluster = m[2];
      }
      args = "plan check --model " + model + (cluster.empty() ? "" : " --cluster " + cluster) + " --plan '" + path + "'";
    } else if (stem.rfind("layer_times_", 0) == 0) {
      args = "calibrate --layer-times '" + path + "' --out '" + ::testing::TempDir() + "/parallax_bad_profile.json'";
    } else if (stem.rfind("cluster_", 0) == 0 || stem.rfind("gpu_", 0) == 0) {
      args = "plan check --model tiny-gpt --cluster '" + path + "'";
    } else {
      args = "model info '" + path + "'";
    }
    const Result r = run(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << args << "\n" << r.err;
    EXPECT_NE(r.err.find(entry.path().filename().string()), std::string::npos) << args << "\n" << r.err;
    EXPECT_TRUE(r.out.empty()) << args;
    EXPECT_FALSE(fs::exists(::testing::TempDir() + "/parallax_bad_profile.json")) << args;
    ++checked;
  }
  EXPECT_GE(checked, 20);
}

}  // namespace
