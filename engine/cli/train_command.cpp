// `parallax train`: trains a model with a parallel plan on CPU ranks, one process per rank under
// mpirun (or a single process without it). The plan's data-parallel size defaults to what the
// job's ranks leave after tp, pp and cp; the CPU engine trains in fp32. With --emulate-rank R one
// process runs rank R of the plan alone, every comm op on a stand-in, and writes R's trace for
// calibration (engine/train/emulate.hpp); that needs no MPI.
#include <fmt/format.h>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "engine/cli/commands.hpp"
#include "engine/comm/launch.hpp"
#include "engine/core/error.hpp"
#include "engine/spec/spec_yaml.hpp"
#ifdef PX_HAVE_TRAIN
#include "engine/train/trainer.hpp"
#endif
#include "engine/train/emulate.hpp"

namespace px::cli {

void register_train(CLI::App& app, Options& o) {
  TrainFlags& t = o.train;
  o.train_cmd = app.add_subcommand("train", "Train on CPU ranks (mpirun -np N parallax train ...)");
  add_plan_flags(o.train_cmd, o);
  CLI::App* c = o.train_cmd;
  c->add_option("--iterations,--train-iters", t.iterations, "Training iterations")->check(CLI::PositiveNumber);
  c->add_option("--data", t.data, "synthetic, corpus (datasets/corpus) or a text file (byte tokens)");
  c->add_option("--out", t.out, "Run directory: traces, checkpoints, heartbeats");
  c->add_option("--db", t.db, "Results database to record the run in");
  c->add_option("--experiment", t.experiment, "Experiment name in the results database");
  c->add_option("--lr", t.lr, "AdamW learning rate")->check(CLI::PositiveNumber);
  c->add_option("--weight-decay", t.weight_decay, "AdamW decoupled weight decay")->check(CLI::NonNegativeNumber);
  c->add_option("--clip-grad", t.clip_grad, "Global gradient-norm clipping (0: none)")->check(CLI::NonNegativeNumber);
  c->add_option("--moe-aux-loss-coeff", t.moe_aux_coeff, "Switch load-balancing loss coefficient")->check(CLI::NonNegativeNumber);
  c->add_option("--seed", t.seed, "Seed of the weights, dropout and data");
  c->add_option("--checkpoint-every,--save-interval", t.checkpoint_every, "Iterations between checkpoints (0: only the last)");
  c->add_flag("--resume", t.resume, "Continue from the run directory's latest committed checkpoint");
  c->add_option("--trace-iterations", t.trace_iterations, "The last N iterations go into each rank's trace");
  c->add_option("--log-every,--log-interval", t.log_every, "Iterations between log lines");
  c->add_option("--timeout", t.timeout_s, "Seconds a rank waits for a peer before declaring it failed")->check(CLI::PositiveNumber);
  c->add_option("--emulate-rank", t.emulate_rank,
                "Run only this rank of the plan, alone (no mpirun), every comm op on a stand-in; writes its trace for calibration");
}

namespace {

// Fills a TrainConfig's run settings (everything but model and plan) from the flags.
void run_settings(const Options& o, const SpecCatalog& cat, TrainConfig& c) {
  c.datasets_dir = cat.root();
  c.data = o.train.data;
  c.iterations = o.train.iterations;
  c.options.seed = o.train.seed;
  c.options.adamw.lr = o.train.lr;
  c.options.adamw.weight_decay = o.train.weight_decay;
  c.options.clip_grad = o.train.clip_grad;
  c.options.moe_aux_coeff = o.train.moe_aux_coeff;
  c.out_dir = o.train.out;
  if (!o.train.db.empty()) c.results_db = o.train.db;
  c.experiment = o.train.experiment;
  c.checkpoint_every = o.train.checkpoint_every;
  c.resume = o.train.resume;
  c.trace_iterations = o.train.trace_iterations;
  c.log_every = o.train.log_every;
  c.comm_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(o.train.timeout_s * 1000));
}

// --emulate-rank: the plan as given (no job to size dp from), one process, rank R alone.
int emulate(const Options& o) {
  const LaunchInfo launch = discover_launch();
  if (launch.world_size > 1)
    throw Error(ErrorKind::Usage, {}, fmt::format("--emulate-rank runs in one process, but the launcher ({}) started {} processes", launch.launcher, launch.world_size),
                "run parallax train --emulate-rank without mpirun/srun/torchrun");
  const SpecCatalog cat = catalog(o);
  TrainConfig c;
  c.model = cat.model(o.model);
  Options with = o;
  if (with.plan.precision.empty()) with.plan.precision = "fp32";
  c.plan = plan_from_flags(with, c.model);
  run_settings(o, cat, c);
  const EmulationResult r = emulate_rank(c, *o.train.emulate_rank, [&](const std::string& line) {
    if (o.json) return;
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  });
  if (o.json) {
    const nlohmann::json j = {{"model", c.model.name},
                              {"emulated_rank", r.rank},
                              {"world_size", r.world_size},
                              {"pipeline_stage", r.stage},
                              {"trace", r.trace.string()},
                              {"ops", r.ops},
                              {"stand_in_ops", r.stand_in_ops},
                              {"iteration_seconds", r.iteration_seconds},
                              {"compute_seconds", r.compute_seconds},
                              {"arena_bytes", r.arena_bytes},
                              {"arena_bytes_touched", r.arena_bytes_touched}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("done: %s (rank %d of %d emulated: %zu ops, %zu of them stand-in comm), compute %.1f ms per iteration, arena %lld bytes (planned) / %lld touched\n",
                r.trace.string().c_str(), r.rank, r.world_size, r.ops, r.stand_in_ops, 1e3 * r.compute_seconds,
                static_cast<long long>(r.arena_bytes), static_cast<long long>(r.arena_bytes_touched));
  }
  return 0;
}

}  // namespace

int train(const Options& o, int* argc, char*** argv) {
  if (o.train.emulate_rank) return emulate(o);
#ifdef PX_HAVE_TRAIN
  // Everything that can be wrong with the input is found before MPI starts: the launcher's
  // variables say how many ranks the job has.
  const LaunchInfo launch = discover_launch();
  const SpecCatalog cat = catalog(o);
  TrainConfig c;
  c.model = cat.model(o.model);
  Options with = o;
  if (with.plan.precision.empty()) with.plan.precision = "fp32";
  if (!with.plan.dp && with.plan.plan_file.empty()) {
    const int model_parallel = with.plan.tp.value_or(1) * with.plan.pp.value_or(1) * with.plan.cp.value_or(1);
    if (launch.world_size % model_parallel == 0) with.plan.dp = launch.world_size / model_parallel;
  }
  c.plan = plan_from_flags(with, c.model);
  if (c.plan.precision != DType::F32) throw Error(ErrorKind::Usage, {}, "the CPU engine trains in fp32", "pass --precision fp32");
  if (c.plan.world_size() != launch.world_size)
    throw Error(ErrorKind::Usage, {},
                fmt::format("the plan needs {} ranks but the job has {}", c.plan.world_size(), launch.world_size),
                fmt::format("launch with mpirun -np {}", c.plan.world_size()));
  MpiRuntime mpi(argc, argv);
  run_settings(o, cat, c);
  try {
    const TrainResult r = px::train(c, mpi, [](const std::string& line) {
      std::printf("%s\n", line.c_str());
      std::fflush(stdout);
    });
    if (mpi.world_rank() == 0) {
      const IterationLog& last = r.log.empty() ? IterationLog{} : r.log.back();
      if (o.json) {
        nlohmann::json j = {{"model", c.model.name},
                            {"iterations", c.iterations},
                            {"final_loss", last.loss},
                            {"tokens_per_second", r.tokens_per_second},
                            {"arena_bytes", r.arena_bytes},
                            {"arena_bytes_touched", r.arena_bytes_touched}};
        if (r.run_id) j["run_id"] = *r.run_id;
        std::printf("%s\n", j.dump(2).c_str());
      } else {
        std::printf("done: final loss %.4f, %.0f tokens/s (median iteration), rank 0 arena %lld bytes (planned) / %lld touched%s\n",
                    last.loss, r.tokens_per_second, static_cast<long long>(r.arena_bytes), static_cast<long long>(r.arena_bytes_touched),
                    r.run_id ? fmt::format(", run {} recorded", *r.run_id).c_str() : "");
      }
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "parallax: rank %d: %s\n", mpi.world_rank(), e.what());
    if (mpi.world_size() > 1) MpiRuntime::abort_job(2);
    return 2;
  }
#else
  (void)argc;
  (void)argv;
  (void)o;
  throw Error(ErrorKind::Usage, {}, "this build has no MPI, so no CPU training", "install Open MPI (./setup.sh) and rebuild");
#endif
}

}  // namespace px::cli
