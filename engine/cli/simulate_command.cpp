// `parallax simulate`: replays a plan's op programs on a SimGrid model of the cluster and reports
// the predicted iteration: time, tokens/s, MFU (with its formula and peak), where the time went,
// per-role peak memory, and optionally simulated per-rank traces and a results-database row.
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "engine/cli/commands.hpp"
#include "engine/core/error.hpp"
#include "engine/core/stats.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/plan/memory_planner.hpp"
#include "engine/plan/plan_summary.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"
#include "engine/trace/chrome_trace.hpp"
#include "results/provenance.hpp"
#include "results/results_db.hpp"
#ifdef PX_HAVE_SIMULATOR
#include "simulator/replay.hpp"
#endif

namespace px::cli {

void register_simulate(CLI::App& app, Options& o) {
  o.simulate_cmd = app.add_subcommand("simulate", "Predict an iteration on a simulated cluster (SimGrid replay of the op programs)");
  add_plan_flags(o.simulate_cmd, o);
  o.simulate_cmd->add_option("--trace-out", o.sim.trace_out, "Write simulated per-rank Chrome traces into this folder");
  o.simulate_cmd->add_option("--trace-ranks", o.sim.trace_ranks, "Ranks to trace (default: rank 0)");
  o.simulate_cmd->add_option("--db", o.sim.db, "Results database to record the prediction in");
  o.simulate_cmd->add_option("--slowdown", o.sim.slowdown, "What-if: RANK=FACTOR, that rank's GPU computes FACTOR times slower (repeatable)");
  o.simulate_cmd->add_option("--link", o.sim.links,
                             "What-if: LINK=FACTOR scales that link's bandwidth (e.g. node3-nic0=0.5, su0-rail2-leaf-up=0.75); "
                             "FACTOR 0 fails a NIC, whose traffic moves to the node's next NIC (repeatable)");
  o.simulate_cmd->add_option("--all-reduce", o.sim.all_reduce, "All-reduce algorithm: auto (fastest closed form per call, as NCCL's tuner), ring, tree or hierarchical")
      ->check(CLI::IsMember({"auto", "ring", "tree", "hierarchical"}));
  o.simulate_cmd->add_option("--replay-traces", o.sim.replay_traces,
                             "Verbatim replay of a recorded run: every rank's trace_rank*.json; each op costs its own recorded duration");
  o.simulate_cmd->add_option("--experiment", o.sim.experiment, "Experiment name in the results database");
  o.simulate_cmd->add_option("--profile", o.sim.profile, "Calibration profile (parallax calibrate) to cost measured ops from");
  o.simulate_cmd->add_flag("--fold", o.sim.fold, "Replay data-parallel replica 0 only; replicas' gradient rings in closed form");
  o.simulate_cmd->add_flag("--in-order-issue", o.sim.in_order_issue, "Issue each rank's ops in program order from one thread (the CPU engine)");
  o.calibrate_cmd = app.add_subcommand("calibrate", "Build a calibration profile from the engine's traces of a plan, or from measured layer times");
  add_plan_flags(o.calibrate_cmd, o);
  auto* traces = o.calibrate_cmd->add_option("--traces", o.sim.traces, "The run's trace_rank*.json files");
  auto* layers = o.calibrate_cmd->add_option("--layer-times", o.sim.layer_times,
                                             "Measured per-layer forward and backward times of runs (a name in datasets/layer_times/ or a path): "
                                             "fits the GEMM curve's level to them");
  traces->excludes(layers);
  // Measured layer times name their model and cluster.
  o.calibrate_cmd->get_option("--model")->required(false)->excludes(layers);
  o.calibrate_cmd->add_option("--out", o.sim.out, "Profile file to write")->required();
  o.calibrate_cmd->add_option("--comm-bench", o.sim.comm_bench, "comm_bench --json outputs measured on the same machine");
  o.calibrate_cmd->add_option("--source", o.sim.source, "What was measured (hardware, software, run), kept in the profile");
}

#ifdef PX_HAVE_SIMULATOR
namespace {

// Fits the GEMM curve's level (CostModelOptions::gemm_curve_scale) to measured layer times: the
// scale at which replays of the runs' plans give the forward and backward layer times closest to
// the measured ones, in squared log ratio. Layer times fall as the scale grows, so the error has
// one minimum; a golden-section search finds it between a quarter of the curve and the peak.
int calibrate_layer_times(const Options& o, const SpecCatalog& cat) {
  const LayerTimesSpec spec = cat.layer_times(o.sim.layer_times);
  std::error_code ec;
  if (std::filesystem::equivalent(spec.file, o.sim.out, ec))
    throw Error(ErrorKind::Usage, {}, fmt::format("--out {} is the layer-times file itself", o.sim.out), "write the profile to another file");
  const ModelSpec model = cat.model(spec.model);
  const ClusterSpec cluster = cat.cluster(spec.cluster);
  const double asymptote = sim::CostModel(cluster.gpu, cluster.node).gemm_asymptote();
  if (!(asymptote > 0))
    throw Error(ErrorKind::Spec, {spec.file}, fmt::format("{} has no GEMM curve to fit (its GPU spec lacks sms or gemm_measured)", cluster.gpu.name));
  std::vector<CompiledPlan> plans;
  for (const LayerTimesSpec::Run& run : spec.runs) {
    plans.push_back(compile_plan(model, resolve_plan(cat.plan_of(spec, run), model, &cluster)));
  }
  struct Fit {
    double error = 0;                        // sum of squared log ratios
    std::vector<std::array<double, 2>> ms;   // per run: predicted forward, backward
  };
  auto fit_at = [&](double scale) {
    sim::SimOptions options;
    options.cost.gemm_curve_scale = scale;
    Fit f;
    for (std::size_t i = 0; i < plans.size(); ++i) {
      const sim::SimResult r = sim::simulate(plans[i], cluster, options);
      if (!(r.layer.forward_s > 0) || !(r.layer.backward_s > 0))
        throw Error(ErrorKind::Spec, {spec.file, spec.runs[i].line}, fmt::format("plan {} runs no transformer layer on its slowest rank", spec.runs[i].plan));
      f.ms.push_back({1e3 * r.layer.forward_s, 1e3 * r.layer.backward_s});
      f.error += std::pow(std::log(f.ms.back()[0] / spec.runs[i].forward_ms), 2) + std::pow(std::log(f.ms.back()[1] / spec.runs[i].backward_ms), 2);
    }
    return f;
  };
  const double golden = (std::sqrt(5.0) - 1) / 2;
  double lo = 0.25, hi = 1.0 / asymptote;
  double a = hi - golden * (hi - lo), b = lo + golden * (hi - lo);
  double fa = fit_at(a).error, fb = fit_at(b).error;
  while (hi - lo > 1e-4) {
    if (fa < fb) {
      hi = b, b = a, fb = fa;
      a = hi - golden * (hi - lo);
      fa = fit_at(a).error;
    } else {
      lo = a, a = b, fa = fb;
      b = lo + golden * (hi - lo);
      fb = fit_at(b).error;
    }
  }
  const double scale = 0.5 * (lo + hi);
  const Fit best = fit_at(scale);
  sim::CalibrationProfile profile;
  profile.source = o.sim.source.empty() ? spec.source : o.sim.source + "; " + spec.source;
  profile.gemm_curve_scale = scale;
  profile.gemm_curve_points = static_cast<int>(2 * spec.runs.size());
  double squares = 0;
  for (std::size_t i = 0; i < spec.runs.size(); ++i)
    squares += std::pow(best.ms[i][0] / spec.runs[i].forward_ms - 1, 2) + std::pow(best.ms[i][1] / spec.runs[i].backward_ms - 1, 2);
  profile.gemm_curve_residual = std::sqrt(squares / profile.gemm_curve_points);
  profile.write(o.sim.out);
  fmt::print("{}: GEMM curve at {:.4f} of its level ({:.1f}% of {}'s dense peak per full tile), RMS error {:.2f}% over {} layer times of {}\n",
             o.sim.out, scale, 100 * scale * asymptote, cluster.gpu.name, 100 * profile.gemm_curve_residual, profile.gemm_curve_points,
             spec.file);
  for (std::size_t i = 0; i < spec.runs.size(); ++i)
    fmt::print("  {:<32} forward {:7.3f} ms (measured {:.3f}, {:+.1f}%)  backward {:7.3f} ms (measured {:.3f}, {:+.1f}%)\n", spec.runs[i].plan,
               best.ms[i][0], spec.runs[i].forward_ms, 100 * (best.ms[i][0] / spec.runs[i].forward_ms - 1), best.ms[i][1],
               spec.runs[i].backward_ms, 100 * (best.ms[i][1] / spec.runs[i].backward_ms - 1));
  return 0;
}

}  // namespace
#endif

int calibrate(const Options& o) {
#ifdef PX_HAVE_SIMULATOR
  const SpecCatalog cat = catalog(o);
  if (!o.sim.layer_times.empty()) return calibrate_layer_times(o, cat);
  if (o.sim.traces.empty() || o.model.empty())
    throw Error(ErrorKind::Usage, {}, "calibrate needs a model and the engine's traces of it, or measured layer times",
                "pass --model M --traces run/trace_rank*.json, or --layer-times FILE");
  const ModelSpec model = cat.model(o.model);
  Options with = o;
  if (with.plan.precision.empty()) with.plan.precision = "fp32";  // what the CPU engine trains in
  const CompiledPlan plan = compile_plan(model, plan_from_flags(with, model));
  sim::CalibrationProfile profile;
  profile.source = o.sim.source;
  std::vector<std::filesystem::path> files(o.sim.traces.begin(), o.sim.traces.end());
  profile.add_traces(plan, files);
  for (const std::string& f : o.sim.comm_bench) profile.add_comm_bench(f);
  profile.write(o.sim.out);
  fmt::print("{}: {} op signatures from {} traces\n", o.sim.out, profile.size(), files.size());
  return 0;
#else
  (void)o;
  throw Error(ErrorKind::Usage, {}, "this build has no SimGrid, so no simulator", "install libsimgrid-dev (./setup.sh) and rebuild");
#endif
}

int simulate(const Options& o) {
#ifdef PX_HAVE_SIMULATOR
  if (o.cluster.empty()) throw Error(ErrorKind::Usage, {}, "simulate needs a cluster", "pass --cluster, e.g. --cluster h100-64");
  const SpecCatalog cat = catalog(o);
  const ModelSpec model = cat.model(o.model);
  const ClusterSpec cluster = cat.cluster(o.cluster);
  const PlanSpec plan_spec = plan_from_flags(o, model, &cluster);
  const CompiledPlan plan = compile_plan(model, plan_spec);
  sim::SimOptions options;
  options.traced_ranks = o.sim.trace_ranks;
  if (!o.sim.profile.empty()) options.profile = sim::CalibrationProfile::read(o.sim.profile);
  options.in_order_issue = o.sim.in_order_issue;
  options.fold_data_parallel = o.sim.fold;
  for (const std::string& s : o.sim.slowdown) {
    int rank = -1;
    double factor = 0;
    char tail = 0;
    if (std::sscanf(s.c_str(), "%d=%lf%c", &rank, &factor, &tail) != 2 || rank < 0 || rank >= plan.topology.world_size() || !(factor > 0))
      throw Error(ErrorKind::Usage, {}, fmt::format("--slowdown '{}' is not RANK=FACTOR with a rank of the plan and a positive factor", s),
                  "e.g. --slowdown 5=1.5");
    options.slowdown[rank] = factor;
  }
  for (const std::string& s : o.sim.links) {
    const auto eq = s.rfind('=');
    double factor = -1;
    char tail = 0;
    if (eq == std::string::npos || eq == 0 || std::sscanf(s.c_str() + eq + 1, "%lf%c", &factor, &tail) != 1 || !(factor >= 0))
      throw Error(ErrorKind::Usage, {}, fmt::format("--link '{}' is not LINK=FACTOR with a factor >= 0", s), "e.g. --link node3-nic0=0.5");
    options.links.push_back({s.substr(0, eq), factor});
  }
  options.all_reduce = o.sim.all_reduce == "ring"   ? sim::AllReduceAlgorithm::Ring
                       : o.sim.all_reduce == "tree" ? sim::AllReduceAlgorithm::Tree
                       : o.sim.all_reduce == "hierarchical" ? sim::AllReduceAlgorithm::Hierarchical
                                                            : sim::AllReduceAlgorithm::Auto;
  for (int r : options.traced_ranks)
    if (r < 0 || r >= plan.topology.world_size())
      throw Error(ErrorKind::Usage, {}, fmt::format("--trace-ranks {} is outside the plan's {} ranks", r, plan.topology.world_size()));
  // The profile's measured iteration is this prediction's yardstick only for the plan it traced.
  const bool profiled_here = options.profile && options.profile->measured_iteration_s() > 0 &&
                             options.profile->traced_plan() == plan_to_json(plan_spec);
  // A replay of the traced plan runs each rank at its measured speed (unless --slowdown says
  // otherwise): a rank that was slower than the others holds them up as it did. A verbatim
  // replay's recorded durations have it already.
  std::map<int, double> rank_speeds;
  if (profiled_here && o.sim.replay_traces.empty())
    for (const auto& [rank, speed] : options.profile->rank_speeds())
      if (rank < plan.topology.world_size() && !options.slowdown.count(rank)) options.slowdown[rank] = rank_speeds[rank] = speed;
  // A verbatim replay replays each traced iteration with its own costs; the prediction is their
  // mean, against the mean of the iterations' measured spans (its simulated traces and per-rank
  // ends are the first replayed iteration's).
  std::vector<sim::RecordedIteration> recorded;
  if (!o.sim.replay_traces.empty())
    recorded = sim::recorded_iterations(plan, std::vector<std::filesystem::path>(o.sim.replay_traces.begin(), o.sim.replay_traces.end()));
  std::vector<double> predicted;
  double measured = 0;
  sim::SimResult r;
  for (std::size_t k = 0; k < std::max<std::size_t>(1, recorded.size()); ++k) {
    if (!recorded.empty()) {
      options.recorded = std::move(recorded[k].op_seconds);
      options.recorded_host = std::move(recorded[k].host_seconds);
      measured += recorded[k].measured_s / static_cast<double>(recorded.size());
    }
    sim::SimResult one = sim::simulate(plan, cluster, options);
    predicted.push_back(one.iteration_s);
    if (k == 0) {
      r = std::move(one);
      continue;
    }
    r.iteration_s += one.iteration_s;
    r.breakdown.compute_s += one.breakdown.compute_s;
    r.breakdown.exposed_comm_s += one.breakdown.exposed_comm_s;
    r.breakdown.bubble_s += one.breakdown.bubble_s;
    r.breakdown.other_s += one.breakdown.other_s;
    r.layer.forward_s += one.layer.forward_s;
    r.layer.backward_s += one.layer.backward_s;
  }
  // Iteration by iteration, the prediction's error; its median is what one odd iteration (a rank
  // descheduled inside a wait, which no trace shows) cannot move.
  double median_error = 0;
  if (!recorded.empty()) {
    std::vector<double> e;
    for (std::size_t k = 0; k < recorded.size(); ++k) e.push_back((predicted[k] - recorded[k].measured_s) / recorded[k].measured_s);
    median_error = median(std::move(e));
  }
  if (predicted.size() > 1) {
    const double n = static_cast<double>(predicted.size()), first = predicted.front();
    r.iteration_s /= n;
    r.breakdown = {r.breakdown.compute_s / n, r.breakdown.exposed_comm_s / n, r.breakdown.bubble_s / n, r.breakdown.other_s / n};
    r.layer = {r.layer.forward_s / n, r.layer.backward_s / n};
    r.tokens_per_s *= first / r.iteration_s;
    r.mfu *= first / r.iteration_s;
  }
  // A plan that needs more memory than its GPU has would not run: predicted all the same (a
  // what-if), and said so.
  nlohmann::json roles = nlohmann::json::array();
  const double hbm = cluster.gpu.hbm_gib * static_cast<double>(1 << 30);
  bool fits = true;
  double peak_gib = 0;  // the largest stage's
  for (const Program& p : plan.roles) {
    const std::int64_t peak = plan_memory(p).arena_bytes;
    fits = fits && static_cast<double>(peak) <= hbm;
    peak_gib = std::max(peak_gib, static_cast<double>(peak) / static_cast<double>(1 << 30));
    roles.push_back({{"stage", p.pp_stage}, {"peak_bytes", peak}, {"fits_hbm", static_cast<double>(peak) <= hbm}});
  }
  if (!fits)
    fmt::print(stderr, "parallax: warning: the plan needs more memory than the {:.2f} GiB of a {} on some pipeline stage (peak memory below): it would not run there\n",
               cluster.gpu.hbm_gib, cluster.gpu.name);
  const std::string mfu_formula = fmt::format("model FLOPs per iteration / (iteration time x {} GPUs x {} TFLOP/s dense bf16 peak of {})",
                                              plan.topology.world_size(), cluster.gpu.peak_bf16_tflops, cluster.gpu.name);
  if (!o.sim.trace_out.empty()) {
    std::filesystem::create_directories(o.sim.trace_out);
    // Each compute op says which cost model timed it, and how sure that model is.
    const sim::CostModel costs(cluster.gpu, cluster.node, options.cost, options.profile ? &*options.profile : nullptr);
    for (std::size_t k = 0; k < r.traced_ranks.size(); ++k) {
      ChromeTrace trace(plan, {r.traced_ranks[k], "nccl", cluster.gpu.name, true});
      const Program& prog = plan.program_of(r.traced_ranks[k]);
      std::vector<nlohmann::json> args(prog.ops.size());
      for (std::size_t i = 0; i < prog.ops.size(); ++i) {
        if (is_comm(prog.ops[i].kind)) continue;
        if (!recorded.empty()) {
          args[i] = {{"cost model", "recorded"}};
          continue;
        }
        const sim::OpCost c = costs.cost(prog.ops[i], sim::op_context(plan, r.traced_ranks[k]));
        args[i] = {{"cost model", std::string(c.model)},
                   {"cost residual", c.measured() || c.fitted ? c.spread : options.cost.roofline_uncertainty}};
      }
      trace.add_iteration(0, r.timings[k], 0.0, {}, args);
      trace.write(std::filesystem::path(o.sim.trace_out) / fmt::format("trace_rank{:05d}.json", r.traced_ranks[k]));
    }
  }
  std::optional<std::int64_t> run_id;
  if (!o.sim.db.empty()) {
    ResultsDb db = ResultsDb::open(o.sim.db);
    RunRecord rec;
    rec.experiment = o.sim.experiment;
    rec.kind = RunKind::Simulated;
    rec.model = model.name;
    rec.cluster = cluster.name;
    rec.plan_json = plan_to_json(plan_spec).dump();
    rec.software_json = software_provenance_json();
    rec.hardware_json = hardware_provenance_json();
    rec.metrics = {{"iteration_time", 1e3 * r.iteration_s, "ms"},
                   {"tokens_per_second", r.tokens_per_s, "tokens/s"},
                   {"mfu", 100 * r.mfu, "%"},
                   {"iteration_time_error_band", 100 * r.error_band, "%"},
                   {"compute_time", 1e3 * r.breakdown.compute_s, "ms"},
                   {"exposed_comm_time", 1e3 * r.breakdown.exposed_comm_s, "ms"},
                   {"bubble_time", 1e3 * r.breakdown.bubble_s, "ms"},
                   {"other_wait_time", 1e3 * r.breakdown.other_s, "ms"},
                   {"layer_forward_time", 1e3 * r.layer.forward_s, "ms"},
                   {"layer_backward_time", 1e3 * r.layer.backward_s, "ms"},
                   {"measured_compute_share", 100 * r.measured_fraction, "%"},
                   {"interpolated_compute_share", 100 * r.interpolated_fraction, "%"},
                   {"peak_memory", peak_gib, "GiB"},
                   {"fits_hbm", fits ? 1.0 : 0.0, ""}};
    run_id = db.record_run(rec);
  }
  if (o.json) {
    nlohmann::json j = {{"model", model.name},
                        {"cluster", cluster.name},
                        {"plan", plan_to_json(plan_spec)},
                        {"iteration_s", r.iteration_s},
                        {"tokens_per_second", r.tokens_per_s},
                        {"mfu", r.mfu},
                        {"mfu_formula", mfu_formula},
                        {"cost_model", !options.recorded.empty() ? "verbatim (recorded traces)"
                                       : o.sim.profile.empty()   ? "roofline (no calibration profile)"
                                                                 : "measured (" + o.sim.profile + ") with roofline fallback"},
                        {"measured_fraction", r.measured_fraction},
                        {"interpolated_fraction", r.interpolated_fraction},
                        {"cost_models", r.cost_models},
                        {"profile_measured_iteration_s", profiled_here ? nlohmann::json(options.profile->measured_iteration_s()) : nlohmann::json(nullptr)},
                        {"recorded_iteration_s", measured},
                        {"rank_speeds_applied", rank_speeds},
                        {"median_iteration_error", median_error},
                        {"measured_spread", r.measured_spread},
                        {"error_band", {{"relative", r.error_band},
                                        {"low_s", r.iteration_s * (1 - r.error_band)},
                                        {"high_s", r.iteration_s * (1 + r.error_band)}}},
                        {"slowest_rank", r.slowest_rank},
                        {"breakdown_s",
                         {{"compute", r.breakdown.compute_s},
                          {"exposed_comm", r.breakdown.exposed_comm_s},
                          {"pipeline_bubble", r.breakdown.bubble_s},
                          {"other", r.breakdown.other_s}}},
                        {"layer_s", {{"forward", r.layer.forward_s}, {"backward", r.layer.backward_s}}},
                        {"peak_memory_per_role", roles},
                        {"fits_hbm", fits},
                        {"flows_simulated", r.flows}};
    if (run_id) j["run_id"] = *run_id;
    for (std::size_t k = 0; k < recorded.size(); ++k)
      j["replayed_iterations"].push_back({{"iteration", recorded[k].iteration}, {"measured_s", recorded[k].measured_s}, {"predicted_s", predicted[k]}});
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  fmt::print("{} on {} ({} GPUs), {}\n", model.name, cluster.name, plan.topology.world_size(), plan_to_json(plan_spec).dump());
  fmt::print("iteration {:.3f} ms (error band +-{:.1f}%: {:.3f}-{:.3f} ms) | {:.0f} tokens/s | MFU {:.1f}%\n", 1e3 * r.iteration_s,
             100 * r.error_band, 1e3 * r.iteration_s * (1 - r.error_band), 1e3 * r.iteration_s * (1 + r.error_band), r.tokens_per_s,
             100 * r.mfu);
  fmt::print("  MFU = {}\n", mfu_formula);
  fmt::print("slowest rank {}: compute {:.3f} ms, exposed comm {:.3f} ms, pipeline bubble {:.3f} ms, other waits {:.3f} ms\n",
             r.slowest_rank, 1e3 * r.breakdown.compute_s, 1e3 * r.breakdown.exposed_comm_s, 1e3 * r.breakdown.bubble_s,
             1e3 * r.breakdown.other_s);
  if (r.layer.forward_s > 0)
    fmt::print("  one transformer layer per micro-batch: forward {:.3f} ms, backward {:.3f} ms (recompute included)\n", 1e3 * r.layer.forward_s,
               1e3 * r.layer.backward_s);
  for (const auto& role : roles)
    fmt::print("  stage {:>3}: peak memory {:.2f} GiB{}\n", role["stage"].get<int>(), role["peak_bytes"].get<double>() / (1 << 30),
               role["fits_hbm"].get<bool>() ? "" : fmt::format(", more than the GPU's {:.2f} GiB", cluster.gpu.hbm_gib));
  if (!rank_speeds.empty()) {
    const auto [slow, fast] = std::minmax_element(rank_speeds.begin(), rank_speeds.end(),
                                                  [](const auto& a, const auto& b) { return a.second > b.second; });
    fmt::print("ranks at their measured speeds (the profile's): slowest rank {} x{:.3f}, fastest rank {} x{:.3f}\n", slow->first,
               slow->second, fast->first, fast->second);
  }
  if (profiled_here) {
    const double m = options.profile->measured_iteration_s();
    fmt::print("the profiled run measured {:.3f} ms per iteration: predicted {:+.1f}%\n", 1e3 * m, 100 * (r.iteration_s - m) / m);
  }
  if (!recorded.empty()) {
    fmt::print("the recorded run measured {:.3f} ms per iteration (mean of the {} replayed): predicted {:+.1f}%; iteration by iteration, median error {:+.1f}%\n",
               1e3 * measured, recorded.size(), 100 * (r.iteration_s - measured) / measured, 100 * median_error);
    fmt::print("costs: verbatim, each op as its rank recorded it in each iteration ({} traces)", o.sim.replay_traces.size());
  } else if (o.sim.profile.empty())
    fmt::print("costs: roofline (no calibration profile)");
  else
    fmt::print("costs: {:.1f}% of the slowest rank's compute measured ({}; {:.1f}% interpolated from other sizes; spread {:.1f}%), the rest roofline",
               100 * r.measured_fraction, o.sim.profile, 100 * r.interpolated_fraction, 100 * r.measured_spread);
  fmt::print("; {} network flows simulated{}\n", r.flows, run_id ? fmt::format("; run {} recorded", *run_id) : std::string());
  std::string by_model;
  for (const auto& [model_name, share] : r.cost_models) by_model += fmt::format("{}{} {:.1f}%", by_model.empty() ? "" : ", ", model_name, 100 * share);
  fmt::print("cost models of the slowest rank's compute: {}\n", by_model);
  return 0;
#else
  (void)o;
  throw Error(ErrorKind::Usage, {}, "this build has no SimGrid, so no simulator", "install libsimgrid-dev (./setup.sh) and rebuild");
#endif
}

}  // namespace px::cli
