// The training driver. Every rank runs the same loop; rank 0 logs and owns the results row, whose
// id every rank knows so that whichever rank sees a peer fail first can mark the run failed.
#include "engine/train/trainer.hpp"

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fmt/format.h>
#include <fstream>
#include <map>

#include "engine/core/error.hpp"
#include "engine/core/hash.hpp"
#include "engine/core/stats.hpp"
#include "engine/exec/executor.hpp"
#include "engine/exec/token_data.hpp"
#include "engine/plan/compiler.hpp"
#include "engine/plan/plan_summary.hpp"
#include "engine/train/backend_factory.hpp"
#include "engine/spec/model_math.hpp"
#include "engine/trace/chrome_trace.hpp"
#ifdef PX_HAVE_NCCL
#include "engine/comm/nccl_comm.hpp"
#endif
#include "results/provenance.hpp"
#include "results/results_db.hpp"

namespace px {
namespace {

namespace fs = std::filesystem;

std::string fingerprint(const TrainConfig& c) {
  const std::string text = c.model.name + "|" + plan_to_json(c.plan).dump() + "|" + std::to_string(c.options.seed);
  return fmt::format("{:016x}", fnv1a(text));
}

// Writes `bytes` to `path` whole or not at all: a temporary file beside it, then a rename.
void write_atomically(const fs::path& path, const std::string& bytes) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) throw Error(ErrorKind::Io, {tmp.string()}, "cannot write the file", "check the disk and the directory's permissions");
  }
  fs::rename(tmp, path);
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorKind::Io, {path.string()}, "cannot read the file", "is the run directory complete?");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A rank's checkpoint shard: a header line, then the bytes of its weight and optimizer tensors
// and of an offloaded optimizer's host memory, in program order.
struct Shard {
  static constexpr const char* kMagic = "parallax-checkpoint 1";

  static std::string encode(const std::string& print, int rank, int iteration, const Program& prog, TensorArena& arena,
                            TrainingBackend& backend) {
    std::string out = fmt::format("{} {} {} {}\n", kMagic, print, rank, iteration);
    for (std::uint32_t t = 0; t < prog.tensors.size(); ++t) {
      const TensorClass c = prog.tensors[t].cls;
      if (c != TensorClass::Weight && c != TensorClass::Optimizer) continue;
      const std::size_t at = out.size();
      out.resize(at + arena.bytes(t).size());
      arena.read(t, reinterpret_cast<std::byte*>(out.data() + at));
    }
    for (const std::span<float> v : backend.offloaded_state()) out.append(reinterpret_cast<const char*>(v.data()), v.size_bytes());
    return out;
  }

  static void decode(const fs::path& file, const std::string& bytes, const std::string& print, int rank, int iteration,
                     const Program& prog, TensorArena& arena, TrainingBackend& backend) {
    const auto nl = bytes.find('\n');
    const std::string want = fmt::format("{} {} {} {}", kMagic, print, rank, iteration);
    if (nl == std::string::npos || bytes.compare(0, nl, want) != 0)
      throw Error(ErrorKind::Spec, {file.string(), 1}, "the checkpoint was written by another model, plan, seed or rank",
                  "resume with the configuration that wrote it, or start a new run directory");
    std::size_t at = nl + 1;
    auto take = [&](std::size_t n) {
      if (at + n > bytes.size())
        throw Error(ErrorKind::Parse, {file.string(), 0, 0, static_cast<std::int64_t>(bytes.size())}, "the checkpoint is truncated",
                    "the shard is damaged; resume from an earlier checkpoint");
      const auto* p = reinterpret_cast<const std::byte*>(bytes.data() + at);
      at += n;
      return p;
    };
    for (std::uint32_t t = 0; t < prog.tensors.size(); ++t) {
      const TensorClass c = prog.tensors[t].cls;
      if (c != TensorClass::Weight && c != TensorClass::Optimizer) continue;
      const std::size_t n = arena.bytes(t).size();
      if (n > 0) arena.write(t, take(n));
    }
    for (const std::span<float> v : backend.offloaded_state())
      if (!v.empty()) std::memcpy(v.data(), take(v.size_bytes()), v.size_bytes());
    if (at != bytes.size())
      throw Error(ErrorKind::Parse, {file.string(), 0, 0, static_cast<std::int64_t>(at)}, "the checkpoint has trailing bytes",
                  "the shard does not belong to this plan");
  }
};

fs::path checkpoint_dir(const fs::path& out, int iteration) { return out / "checkpoints" / fmt::format("iter_{:07d}", iteration); }

// Test hook: PARALLAX_FAULT="kill:RANK:ITERATION" or "hang:RANK:ITERATION" makes that rank die by
// SIGKILL (or stop answering) when that iteration starts, to exercise failure handling for real.
void maybe_inject_fault(int rank, int iteration) {
  const char* spec = std::getenv("PARALLAX_FAULT");
  if (!spec) return;
  char what[8] = {};
  int r = -1, it = -1;
  if (std::sscanf(spec, "%7[a-z]:%d:%d", what, &r, &it) != 3 || r != rank || it != iteration) return;
  if (std::strcmp(what, "kill") == 0) std::raise(SIGKILL);
  if (std::strcmp(what, "hang") == 0)
    for (;;) pause();
}

}  // namespace

TrainResult train(const TrainConfig& c, const MpiRuntime& mpi, const std::function<void(const std::string&)>& log) {
  if (c.device == "cpu" && (c.plan.precision != DType::F32 || c.plan.grad_dtype != DType::F32))
    throw Error(ErrorKind::Usage, {}, "the CPU engine trains in fp32", "pass --precision fp32");
  const CompiledPlan plan = compile_plan(c.model, c.plan);
  if (plan.topology.world_size() != mpi.world_size())
    throw Error(ErrorKind::Usage, {},
                fmt::format("the plan needs {} ranks but the job has {}", plan.topology.world_size(), mpi.world_size()),
                fmt::format("launch with mpirun -np {}", plan.topology.world_size()));
  const int rank = mpi.world_rank();
  const bool root = rank == 0;
  const auto world = mpi.world();
  const std::unique_ptr<TokenSource> data = make_token_source(c);
  const std::string print = fingerprint(c);

  MpiGroups groups = make_mpi_groups(plan.topology, rank);
  GroupComms comms{};
  for (int g = 0; g < kNumGroupKinds; ++g) {
    comms[static_cast<std::size_t>(g)] = groups[static_cast<GroupKind>(g)];
    if (comms[static_cast<std::size_t>(g)]) comms[static_cast<std::size_t>(g)]->set_timeout(c.comm_timeout);
  }
  world->set_timeout(c.comm_timeout);
  // A GPU rank: the node's local rank picks the device, and the groups' NCCL communicators (their
  // ids over the MPI groups, which keep serving the host's own exchanges) carry the comm ops.
#ifdef PX_HAVE_NCCL
  NcclGroups nccl;
  if (c.device == "cuda") {
    MPI_Comm node = MPI_COMM_NULL;
    int local_rank = 0;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_free(&node);
    select_local_device(local_rank);
    if (mpi.world_size() > 1) {
      nccl = make_nccl_groups(plan.topology, rank, groups);
      for (int g = 1; g < kNumGroupKinds; ++g)
        if (nccl.group[static_cast<std::size_t>(g)]) comms[static_cast<std::size_t>(g)] = nccl.group[static_cast<std::size_t>(g)].get();
    }
  }
#else
  if (c.device != "cpu" && mpi.world_size() > 1)
    throw Error(ErrorKind::Usage, {}, fmt::format("this build has no NCCL, so --device {} runs one rank only", c.device),
                "build where NCCL is found (/usr/local/cuda), or train on the CPU");
#endif
  const std::unique_ptr<TrainingBackend> backend_owner = make_backend(c.device, plan, rank, *data, c.options);
  TrainingBackend& backend = *backend_owner;
  Executor executor(plan, rank, backend, comms);
  backend.initialize(executor.arena());
  fs::create_directories(c.out_dir);
  executor.enable_heartbeat(c.out_dir / "heartbeats");
  world->barrier();

  // Resume: the latest checkpoint whose commit marker exists.
  int first = 0;
  if (c.resume) {
    const fs::path latest = c.out_dir / "checkpoints" / "latest";
    if (!fs::exists(latest))
      throw Error(ErrorKind::Io, {latest.string()}, "no committed checkpoint to resume from", "run without --resume first");
    const int saved = std::stoi(read_file(latest));
    const fs::path dir = checkpoint_dir(c.out_dir, saved);
    if (!fs::exists(dir / "COMMITTED"))
      throw Error(ErrorKind::Io, {(dir / "COMMITTED").string()}, "the checkpoint was never committed", "resume from an earlier one");
    const fs::path shard = dir / fmt::format("rank_{:05d}.bin", rank);
    Shard::decode(shard, read_file(shard), print, rank, saved, plan.program_of(rank), executor.arena(), backend);
    first = saved;
  }

  // The results row: begun by rank 0, its id known to every rank.
  std::optional<ResultsDb> db;
  double run_id = -1;
  if (c.results_db) {
    db.emplace(ResultsDb::open(*c.results_db));
    if (root) {
      RunRecord r;
      r.experiment = c.experiment;
      r.kind = RunKind::Measured;
      r.status = RunStatus::Running;
      r.model = c.model.name;
      r.cluster = c.device == "cpu" ? fmt::format("cpu-{}-ranks", mpi.world_size())
                                    : fmt::format("{} x{}", backend.device_name(), mpi.world_size());
      r.plan_json = plan_to_json(c.plan).dump();
      r.software_json = software_provenance_json();
      r.hardware_json = hardware_provenance_json();
      run_id = static_cast<double>(db->begin_run(r));
    }
    MPI_Bcast(&run_id, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  }
  const auto fail = [&](const std::string& reason) {
    if (db) {
      try {
        db->fail_run(static_cast<std::int64_t>(run_id), reason);
      } catch (const Error&) {
        // another rank recorded the failure first
      }
    }
  };

  ChromeTrace trace(plan, {rank, c.device == "cpu" ? "mpi" : "nccl", backend.device_name(), false});
  TrainResult result;
  std::vector<double> seconds;
  std::vector<OpTiming> last_timings;
  const std::int64_t batch_tokens = std::int64_t{c.plan.global_batch_size} * c.plan.seq_length;
  for (int it = first; it < c.iterations; ++it) {
    maybe_inject_fault(rank, it);
    backend.begin_iteration(it);
    const double t0 = MPI_Wtime();
    std::vector<OpTiming> timings;
    try {
      timings = executor.run_iteration();
    } catch (const RankFailure& f) {
      const std::string reason = f.failed_rank >= 0 ? fmt::format("rank {} failed first; {}", f.failed_rank, f.what()) : f.what();
      log(fmt::format("parallax: {}", reason));
      fail(reason);
      MpiRuntime::abort_job(1);
    }
    float stats[3] = {backend.reports_loss() ? static_cast<float>(backend.loss().sum) : 0.0f,
                      backend.reports_loss() ? static_cast<float>(backend.loss().tokens) : 0.0f, 0.0f};
    float slowest = static_cast<float>(MPI_Wtime() - t0);
    world->all_reduce(std::span<float>(stats, 2));
    world->start_all_reduce_max(std::span<float>(&slowest, 1))->wait();
    IterationLog l{it, stats[1] > 0 ? stats[0] / stats[1] : 0.0, slowest, backend.grad_norm()};
    result.log.push_back(l);
    seconds.push_back(l.seconds);
    if (root && (c.log_every > 0 && (it % c.log_every == 0 || it + 1 == c.iterations)))
      log(fmt::format("iteration {:>5}/{} | loss {:.4f} | {:.1f} ms | {:.0f} tokens/s | grad norm {:.3f}", it + 1, c.iterations, l.loss,
                      1e3 * l.seconds, static_cast<double>(batch_tokens) / l.seconds, l.grad_norm));
    if (it + c.trace_iterations >= c.iterations) trace.add_iteration(it, timings, 0.0, executor.host_seconds());
    last_timings = std::move(timings);
    const bool checkpoint = (c.checkpoint_every > 0 && (it + 1) % c.checkpoint_every == 0) || it + 1 == c.iterations;
    if (checkpoint) {
      const fs::path dir = checkpoint_dir(c.out_dir, it + 1);
      fs::create_directories(dir);
      write_atomically(dir / fmt::format("rank_{:05d}.bin", rank),
                       Shard::encode(print, rank, it + 1, plan.program_of(rank), executor.arena(), backend));
      world->barrier();  // every shard is on disk before the commit marker
      if (root) {
        write_atomically(dir / "COMMITTED", print + "\n");
        write_atomically(c.out_dir / "checkpoints" / "latest", std::to_string(it + 1));
      }
      world->barrier();
    }
  }
  trace.write(c.out_dir / fmt::format("trace_rank{:05d}.json", rank));
  result.arena_bytes = executor.memory().arena_bytes;
  result.arena_bytes_touched = executor.touched_bytes();
  result.tokens_per_second = seconds.empty() ? 0 : static_cast<double>(batch_tokens) / median(seconds);

  // Per-op samples of the last iteration from every rank, and the run's metrics, to rank 0.
  if (db) {
    std::vector<double> mine;
    for (const OpTiming& t : last_timings) mine.insert(mine.end(), {t.start, t.end});
    int count = static_cast<int>(mine.size());
    std::vector<int> counts(static_cast<std::size_t>(mpi.world_size())), displs(counts.size());
    MPI_Gather(&count, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
    for (std::size_t r = 1; r < counts.size(); ++r) displs[r] = displs[r - 1] + counts[r - 1];
    std::vector<double> all(root ? static_cast<std::size_t>(displs.back() + counts.back()) : 0);
    MPI_Gatherv(mine.data(), count, MPI_DOUBLE, all.data(), counts.data(), displs.data(), MPI_DOUBLE, 0, MPI_COMM_WORLD);
    double peak = static_cast<double>(result.arena_bytes);
    MPI_Allreduce(MPI_IN_PLACE, &peak, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (root) {
      std::vector<OpSample> samples;
      std::map<std::string, double> by_kind;
      for (int r = 0; r < mpi.world_size(); ++r) {
        const Program& prog = plan.program_of(r);
        const double* t = all.data() + displs[static_cast<std::size_t>(r)];
        for (std::size_t i = 0; i < prog.ops.size(); ++i) {
          const Op& op = prog.ops[i];
          OpSample s;
          s.rank = r;
          s.op_id = static_cast<std::int64_t>(i);
          s.op_name = std::string(prog.name_of(op));
          s.kind = std::string(to_string(op.kind));
          s.stream = static_cast<int>(op.stream);
          s.start_us = 1e6 * t[2 * i];
          s.end_us = 1e6 * t[2 * i + 1];
          s.bytes = is_comm(op.kind) ? op.comm_bytes : op.bytes_read + op.bytes_written;
          s.flops = op.flops + op.vector_flops;
          if (r == 0) by_kind[s.kind] += (s.end_us - s.start_us) / 1e3;
          samples.push_back(std::move(s));
        }
      }
      std::vector<Metric> metrics = {{"final_loss", result.log.empty() ? 0.0 : result.log.back().loss, "nats"},
                                     {"tokens_per_second", result.tokens_per_second, "tokens/s"},
                                     {"iteration_time_median", 1e3 * median(seconds), "ms"},
                                     {"iterations", static_cast<double>(c.iterations - first), ""},
                                     {"peak_arena_bytes", peak, "B"}};
      for (const IterationLog& l : result.log) metrics.push_back({fmt::format("loss_iter_{:06d}", l.iteration), l.loss, "nats"});
      for (const auto& [kind, ms] : by_kind) metrics.push_back({"rank0_time_" + kind, ms, "ms"});
      db->finish_run(static_cast<std::int64_t>(run_id), metrics, samples);
      result.run_id = static_cast<std::int64_t>(run_id);
    }
  }
  world->barrier();
  return result;
}

}  // namespace px
