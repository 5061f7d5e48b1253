// `parallax train`: trains a model with a parallel plan on CPU ranks, one process per rank under
// mpirun (or a single process without it). The plan's data-parallel size defaults to what the
// job's ranks leave after tp, pp and cp; the CPU engine trains in fp32. With --emulate-rank R one
// process runs rank R of the plan alone, every comm op on a stand-in, and writes R's trace for
// calibration (engine/train/emulate.hpp); that needs no MPI. --device cuda runs the compute in
// bf16 on GPUs: under mpirun one GPU per rank over NCCL, alone a one-rank plan or one emulated rank.
#include <fmt/format.h>

#include <cstdio>
#include <nlohmann/json.hpp>

#include "engine/cli/commands.hpp"
#include "engine/comm/launch.hpp"
#include "engine/core/error.hpp"
#include "engine/core/stats.hpp"
#include "engine/spec/model_math.hpp"
#include "engine/spec/spec_yaml.hpp"
#ifdef PX_HAVE_TRAIN
#include "engine/train/trainer.hpp"
#endif
#include "engine/train/backend_factory.hpp"
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
  c->add_option("--hidden-dropout", t.hidden_dropout, "Dropout after attention and MLP, instead of the model file's")
      ->check(CLI::Range(0.0, 0.99));
  c->add_option("--attention-dropout", t.attention_dropout, "Dropout on attention probabilities, instead of the model file's (the engine has none)")
      ->check(CLI::Range(0.0, 0.99));
  c->add_option("--device", t.device, "Compute backend: cpu (fp32) or cuda (bf16, one GPU per rank over NCCL under mpirun)")
      ->check(CLI::IsMember(built_devices()));
}

namespace {

// The model file's, with the run's dropout overrides.
ModelSpec model_of(const Options& o, const SpecCatalog& cat) {
  ModelSpec m = cat.model(o.model);
  if (o.train.hidden_dropout) m.hidden_dropout = *o.train.hidden_dropout;
  if (o.train.attention_dropout) m.attention_dropout = *o.train.attention_dropout;
  return m;
}

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

// --emulate-rank, or any one-rank run on a device: the plan as given (no job to size dp from),
// one process, rank R alone.
int emulate(const Options& o) {
  const LaunchInfo launch = discover_launch();
  if (launch.world_size > 1)
    throw Error(ErrorKind::Usage, {}, fmt::format("--emulate-rank runs in one process, but the launcher ({}) started {} processes", launch.launcher, launch.world_size),
                "run parallax train --emulate-rank without mpirun/srun/torchrun");
  const SpecCatalog cat = catalog(o);
  TrainConfig c;
  c.model = model_of(o, cat);
  Options with = o;
  if (with.plan.precision.empty()) with.plan.precision = o.train.device == "cpu" ? "fp32" : "bf16";
  c.plan = plan_from_flags(with, c.model);
  run_settings(o, cat, c);
  c.device = o.train.device;
  if (!o.train.emulate_rank && c.plan.world_size() > 1)
    throw Error(ErrorKind::Usage, {},
                fmt::format("--device {} runs one rank, but the plan has {}", c.device, c.plan.world_size()),
                fmt::format("launch it with mpirun -np {} (one GPU per rank), or time one rank of it with --emulate-rank R",
                            c.plan.world_size()));
  const EmulationResult r = emulate_rank(c, o.train.emulate_rank.value_or(0), [&](const std::string& line) {
    if (o.json) return;
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  });
  // A one-rank run's throughput: the global batch's tokens over the median iteration after the
  // first (which pays for cuBLASLt's heuristics and the allocator).
  std::vector<double> steady(r.iteration_seconds.begin() + (r.iteration_seconds.size() > 1 ? 1 : 0), r.iteration_seconds.end());
  const double tokens_per_second =
      steady.empty() ? 0.0 : static_cast<double>(c.plan.global_batch_size) * c.plan.seq_length / median(steady);
  if (o.json) {
    const nlohmann::json j = {{"model", c.model.name},
                              {"tokens_per_second", r.world_size == 1 ? tokens_per_second : 0.0},
                              // MFU = tokens/s x this / the GPU's dense bf16 peak (Megatron's FLOP count)
                              {"model_flops_per_token", model_flops_per_token(c.model, c.plan)},
                              {"emulated_rank", r.rank},
                              {"world_size", r.world_size},
                              {"pipeline_stage", r.stage},
                              {"trace", r.trace.string()},
                              {"device", r.device},
                              {"losses", r.losses},
                              {"ops", r.ops},
                              {"stand_in_ops", r.stand_in_ops},
                              {"iteration_seconds", r.iteration_seconds},
                              {"compute_seconds", r.compute_seconds},
                              {"arena_bytes", r.arena_bytes},
                              {"arena_bytes_touched", r.arena_bytes_touched}};
    std::printf("%s\n", j.dump(2).c_str());
  } else if (r.world_size == 1) {
    std::printf("done: final loss %.4f, %.0f tokens/s (median iteration) on %s, trace %s, arena %lld bytes (planned) / %lld touched\n",
                r.losses.empty() ? 0.0 : r.losses.back(), tokens_per_second, r.device.c_str(), r.trace.string().c_str(),
                static_cast<long long>(r.arena_bytes), static_cast<long long>(r.arena_bytes_touched));
  } else {
    std::printf("done: %s (rank %d of %d emulated: %zu ops, %zu of them stand-in comm), compute %.1f ms per iteration, arena %lld bytes (planned) / %lld touched\n",
                r.trace.string().c_str(), r.rank, r.world_size, r.ops, r.stand_in_ops, 1e3 * r.compute_seconds,
                static_cast<long long>(r.arena_bytes), static_cast<long long>(r.arena_bytes_touched));
  }
  return 0;
}

}  // namespace

int train(const Options& o, int* argc, char*** argv) {
  // A device run in one process is one rank alone (rank emulation, or a one-rank plan); under a
  // launcher, every rank trains on its own device.
  if (o.train.emulate_rank || (o.train.device != "cpu" && discover_launch().world_size == 1)) return emulate(o);
#ifdef PX_HAVE_TRAIN
  // Everything that can be wrong with the input is found before MPI starts: the launcher's
  // variables say how many ranks the job has.
  const LaunchInfo launch = discover_launch();
  const SpecCatalog cat = catalog(o);
  TrainConfig c;
  c.model = model_of(o, cat);
  Options with = o;
  if (with.plan.precision.empty()) with.plan.precision = o.train.device == "cpu" ? "fp32" : "bf16";
  if (!with.plan.dp && with.plan.plan_file.empty()) {
    const int model_parallel = with.plan.tp.value_or(1) * with.plan.pp.value_or(1) * with.plan.cp.value_or(1);
    if (launch.world_size % model_parallel == 0) with.plan.dp = launch.world_size / model_parallel;
  }
  c.plan = plan_from_flags(with, c.model);
  c.device = o.train.device;
  if (c.device == "cpu" && c.plan.precision != DType::F32)
    throw Error(ErrorKind::Usage, {}, "the CPU engine trains in fp32", "pass --precision fp32");
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
  throw Error(ErrorKind::Usage, {}, "this build has no MPI, so no training under a launcher (CPU ranks, or one GPU per rank)",
              "install Open MPI (./setup.sh) and rebuild; one process alone runs a one-rank plan or --emulate-rank with --device cuda");
#endif
}

}  // namespace px::cli
