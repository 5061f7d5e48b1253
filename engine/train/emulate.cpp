// One rank alone: its role's program on the CPU backend, stand-in communicators for each group
// instance the topology puts it in, its trace flagged as emulated.
#include "engine/train/emulate.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <fmt/format.h>
#include <memory>

#include "engine/comm/standin_comm.hpp"
#include "engine/core/error.hpp"
#include "engine/exec/executor.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/train/backend_factory.hpp"
#include "engine/trace/chrome_trace.hpp"

namespace px {

EmulationResult emulate_rank(const TrainConfig& c, int rank, const std::function<void(const std::string&)>& log) {
  if (c.device == "cpu" && (c.plan.precision != DType::F32 || c.plan.grad_dtype != DType::F32))
    throw Error(ErrorKind::Usage, {}, "the CPU engine emulates fp32 plans only", "pass --precision fp32");
  if (c.results_db)
    throw Error(ErrorKind::Usage, {}, "--emulate-rank does not record a run in the results database",
                "one rank alone with stand-in communication is not a measured run of the plan; drop --db");
  if (c.resume || c.checkpoint_every > 0)
    throw Error(ErrorKind::Usage, {}, "--emulate-rank writes no checkpoints and resumes from none",
                "drop --resume and --checkpoint-every");
  if (c.iterations < 1 || c.trace_iterations < 1)
    throw Error(ErrorKind::Usage, {}, "--emulate-rank needs at least one iteration, traced", "pass --iterations and --trace-iterations >= 1");
  const CompiledPlan plan = compile_plan(c.model, c.plan);
  const Topology& topo = plan.topology;
  const int world = topo.world_size();
  if (rank < 0 || rank >= world)
    throw Error(ErrorKind::Usage, {}, fmt::format("--emulate-rank {} is outside the plan's {} ranks", rank, world),
                fmt::format("pass a rank from 0 to {}", world - 1));

  // One stand-in per group instance the rank belongs to, of that group's real size, at the rank's
  // real position in it: the executor's buffer roles (which block is "mine", ring neighbours)
  // follow the position exactly as over MPI.
  std::array<std::unique_ptr<StandInCommunicator>, kNumGroupKinds> owned;
  GroupComms comms{};
  for (int g = 1; g < kNumGroupKinds; ++g) {
    const auto kind = static_cast<GroupKind>(g);
    const int id = topo.group_id(kind, rank);
    if (id < 0) continue;
    owned[static_cast<std::size_t>(g)] =
        std::make_unique<StandInCommunicator>(fmt::format("{}#{}", to_string(kind), id), topo.group_index(kind, rank), topo.size(kind));
    comms[static_cast<std::size_t>(g)] = owned[static_cast<std::size_t>(g)].get();
  }

  const std::unique_ptr<TokenSource> data = make_token_source(c);
  const std::unique_ptr<TrainingBackend> made = make_backend(c.device, plan, rank, *data, c.options);
  TrainingBackend& backend = *made;
  Executor executor(plan, rank, backend, comms);  // the arena of this rank's program only
  backend.initialize(executor.arena());
  std::filesystem::create_directories(c.out_dir);

  const Program& prog = plan.program_of(rank);
  EmulationResult result;
  result.rank = rank;
  result.world_size = world;
  result.stage = plan.ranks[static_cast<std::size_t>(rank)].role;
  result.ops = prog.ops.size();
  result.stand_in_ops = static_cast<std::size_t>(std::count_if(prog.ops.begin(), prog.ops.end(), [](const Op& op) { return is_comm(op.kind); }));

  result.device = backend.device_name();
  // A one-rank plan has no comm op: its run alone is the plan's real run, not an emulation.
  ChromeTrace trace(plan, {rank, "standin", result.device, false, world > 1});
  for (int it = 0; it < c.iterations; ++it) {
    backend.begin_iteration(it);
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<OpTiming> timings = executor.run_iteration();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result.iteration_seconds.push_back(seconds);
    if (backend.reports_loss() && backend.loss().tokens > 0) result.losses.push_back(backend.loss().sum / static_cast<double>(backend.loss().tokens));
    result.compute_seconds = 0;
    for (std::size_t i = 0; i < prog.ops.size(); ++i)
      if (!is_comm(prog.ops[i].kind)) result.compute_seconds += timings[i].end - timings[i].start;
    if (it + c.trace_iterations >= c.iterations) trace.add_iteration(it, timings);
    if (log && c.log_every > 0 && (it % c.log_every == 0 || it + 1 == c.iterations))
      log(world == 1 ? fmt::format("{} | iteration {:>5}/{} | loss {:.4f} | {:.1f} ms | {:.0f} tokens/s", result.device, it + 1, c.iterations,
                                   result.losses.empty() ? 0.0 : result.losses.back(), 1e3 * seconds,
                                   static_cast<double>(c.plan.global_batch_size) * c.plan.seq_length / seconds)
                     : fmt::format("emulated rank {} of {} (stage {}) | iteration {:>5}/{} | {:.1f} ms | compute {:.1f} ms | {} stand-in comm ops",
                                   rank, world, result.stage, it + 1, c.iterations, 1e3 * seconds, 1e3 * result.compute_seconds,
                                   result.stand_in_ops));
  }
  result.trace = c.out_dir / fmt::format("trace_rank{:05d}.json", rank);
  trace.write(result.trace);
  for (const auto& s : owned)
    if (s) result.stand_in_calls += s->operations();
  result.grad_norm = backend.grad_norm();
  result.arena_bytes = executor.memory().arena_bytes;
  result.arena_bytes_touched = executor.touched_bytes();
  return result;
}

}  // namespace px
