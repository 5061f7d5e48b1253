// Communication benchmark in nccl-tests' form: for each collective and message size, the time per
// operation and algorithm/bus bandwidth, with every result checked (#wrong). Runs on the engine's
// Communicator, launched by mpirun; rank 0 prints the table and can write JSON for `parallax
// calibrate`. Exit code 1 when any result is wrong.
//
// Two programs from this source: comm_bench (MPI on CPU ranks, host buffers; links no CUDA, so it
// runs on machines without a CUDA driver) and, built with PX_COMM_BENCH_NCCL, comm_bench_nccl
// (`--backend nccl`, the default there: NCCL on one GPU per rank, device buffers, results checked
// after copying back; `--backend mpi` there is comm_bench's run). Bookkeeping (wrong counts,
// times) always goes over MPI on the host. comm_bench_nccl exits 77 (a skip) when no rank has a
// device, unless PARALLAX_REQUIRE_GPU=1 makes that a failure.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "benchmarks/comm/collective.hpp"
#include "engine/comm/mpi_comm.hpp"
#include "engine/core/stats.hpp"
#ifdef PX_COMM_BENCH_NCCL
#include <cstdlib>
#include <string_view>

#include "engine/backends/cuda/device_buffer.hpp"
#include "engine/comm/launch.hpp"
#include "engine/comm/nccl_comm.hpp"
#endif

namespace {

using px::bench::Collective;
using px::bench::CollectiveBuffers;

// Host buffers, filled and checked here, and (NCCL) the device copies the collective runs on.
struct Buffers {
  std::vector<float> in, out;
#ifdef PX_COMM_BENCH_NCCL
  px::cuda::DeviceBuffer<float> d_in, d_out;
#endif
  CollectiveBuffers run;  // what the collective reads and writes

  // The output as host values: copied back from the device first when it lives there.
  std::span<const float> host_out(bool on_device) {
#ifdef PX_COMM_BENCH_NCCL
    if (on_device) out = d_out.download();
#else
    (void)on_device;
#endif
    return out;
  }
};

void fill_buffers(const Collective& coll, int rank, int n, std::size_t count, bool on_device, Buffers& b) {
  b.in.resize(coll.in_count(count, n));
  b.out.resize(coll.out_count(count, n));
  for (std::size_t i = 0; i < b.in.size(); ++i) b.in[i] = px::bench::fill(rank, i);
  // In-place collectives (all-reduce, broadcast) work on `out`; start it as this member's input.
  for (std::size_t i = 0; i < b.out.size(); ++i) b.out[i] = px::bench::fill(rank, i);
  b.run = {b.in, b.out};
#ifdef PX_COMM_BENCH_NCCL
  if (on_device) {
    b.d_in = px::cuda::DeviceBuffer<float>(std::span<const float>(b.in));
    b.d_out = px::cuda::DeviceBuffer<float>(std::span<const float>(b.out));
    b.run = {{b.d_in.data(), b.d_in.size()}, {b.d_out.data(), b.d_out.size()}};
  }
#else
  (void)on_device;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  px::MpiRuntime mpi(&argc, &argv);
  CLI::App app{"Collective bandwidth in nccl-tests' columns"};
  std::size_t min_bytes = 8, max_bytes = 64 << 20;
  int factor = 2, iters = 20, warmup = 5, cycles = 1;
  std::string which = "all", json_path;
#ifdef PX_COMM_BENCH_NCCL
  std::string backend = "nccl";
#else
  std::string backend = "mpi";
#endif
  app.add_option("-b,--minbytes", min_bytes, "Smallest message, bytes");
  app.add_option("-e,--maxbytes", max_bytes, "Largest message, bytes");
  app.add_option("-f,--stepfactor", factor, "Size multiplier between steps")->check(CLI::Range(2, 1024));
  app.add_option("-n,--iters", iters, "Timed iterations per size")->check(CLI::Range(1, 100000));
  app.add_option("-w,--warmup_iters", warmup, "Untimed iterations per size")->check(CLI::Range(0, 100000));
  app.add_option("-N,--run_cycles", cycles, "Sweeps over all sizes, pooled into one row per size")->check(CLI::Range(1, 1000));
  app.add_option("-c,--collective", which, "all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, send_recv or all");
  app.add_option("--json", json_path, "Also write the rows as JSON (rank 0)");
  app.add_option("--backend", backend, "mpi (CPU, host buffers) or nccl (GPU, device buffers; comm_bench_nccl)")
      ->check(CLI::IsMember({"mpi", "nccl"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (mpi.world_rank() == 0) app.exit(e);
    return e.get_exit_code() == 0 ? 0 : 2;
  }
  auto world = mpi.world();
  const int n = world->size(), rank = world->rank();
  px::Communicator* bench = world.get();  // the communicator being measured
  const bool on_device = backend == "nccl";
#ifdef PX_COMM_BENCH_NCCL
  std::unique_ptr<px::NcclCommunicator> nccl;
  if (on_device) {
    // The same decision on every rank, so none goes on to an NCCL init the others skipped.
    std::vector<float> no_device{px::cuda::device_count() == 0 ? 1.0f : 0.0f};
    world->start_all_reduce_max(no_device)->wait();
    if (no_device[0] != 0) {
      const char* require = std::getenv("PARALLAX_REQUIRE_GPU");
      const bool required = require && std::string_view(require) == "1";
      if (rank == 0) std::fprintf(stderr, "comm_bench: --backend nccl needs a CUDA device on every rank; skipped\n");
      return required ? 1 : 77;
    }
    try {
      px::select_local_device(px::discover_launch().local_rank);
      nccl = px::NcclCommunicator::create(*world);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "comm_bench: rank %d: NCCL setup failed: %s\n", rank, e.what());
      px::MpiRuntime::abort_job(2);  // the other ranks may be waiting inside the init
    }
    bench = nccl.get();
  }
#else
  if (on_device) {
    if (rank == 0) std::fprintf(stderr, "comm_bench: built without NCCL; --backend nccl is comm_bench_nccl's\n");
    return 2;
  }
#endif
  const char* backend_text = on_device ? "NCCL on GPU" : "MPI on CPU";
  // One measurement per (collective, size), pooled over the cycles: each cycle sweeps every size
  // once, so a neighbour that slows this machine for a second spoils one cycle's points, and the
  // median of the cycles' medians stays where the undisturbed ones are.
  struct Point {
    const Collective* coll;
    std::size_t count;
    std::size_t wrong = 0;
    std::vector<double> rank_sums;      // each rank's summed time over every cycle
    std::vector<double> cycle_medians;  // each cycle's median iteration (its slowest rank)
  };
  std::vector<Point> points;
  for (const Collective& coll : px::bench::collectives()) {
    if (which != "all" && which != coll.name) continue;
    std::size_t last_count = 0;
    for (std::size_t bytes = min_bytes; bytes <= max_bytes; bytes *= static_cast<std::size_t>(factor)) {
      // Whole elements, divisible by the member count so every split collective has equal blocks.
      const std::size_t count = std::max<std::size_t>(bytes / sizeof(float) / static_cast<std::size_t>(n), 1) * static_cast<std::size_t>(n);
      if (count == last_count) continue;  // sizes below one element per member measure the same message
      last_count = count;
      points.push_back({&coll, count, 0, std::vector<double>(static_cast<std::size_t>(n), 0.0), {}});
    }
  }
  if (points.empty()) {
    if (rank == 0) std::fprintf(stderr, "comm_bench: unknown collective '%s'\n", which.c_str());
    return 2;
  }
  for (int cycle = 0; cycle < cycles; ++cycle) {
    for (Point& p : points) {
      const Collective& coll = *p.coll;
      Buffers b;
      fill_buffers(coll, rank, n, p.count, on_device, b);
      coll.run(*bench, b.run);
      std::vector<float> wrong{static_cast<float>(coll.check(*bench, b.in.size(), b.host_out(on_device)))};
      world->all_reduce(wrong);
      p.wrong += static_cast<std::size_t>(wrong[0]);
      for (int i = 0; i < warmup; ++i) coll.run(*bench, b.run);
      bench->barrier();
      // Each iteration timed on its own: on a shared machine a few descheduled iterations move the
      // mean (nccl-tests' time) by tens of percent, not the median of the iterations.
      std::vector<float> each(static_cast<std::size_t>(iters)), all_each(static_cast<std::size_t>(iters * n));
      auto last = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) {
        coll.run(*bench, b.run);
        const auto now = std::chrono::steady_clock::now();
        each[static_cast<std::size_t>(i)] = static_cast<float>(std::chrono::duration<double>(now - last).count());
        last = now;
      }
      world->all_gather(each, all_each);
      std::vector<double> slowest(each.size(), 0.0);
      for (std::size_t r = 0; r < static_cast<std::size_t>(n); ++r)
        for (std::size_t i = 0; i < each.size(); ++i) {
          const double x = all_each[r * each.size() + i];
          p.rank_sums[r] += x;
          slowest[i] = std::max(slowest[i], x);
        }
      p.cycle_medians.push_back(px::median(std::move(slowest)));
    }
  }
  nlohmann::json rows = nlohmann::json::array();
  std::size_t total_wrong = 0;
  const Collective* heading = nullptr;
  for (Point& p : points) {
    const Collective& coll = *p.coll;
    if (rank == 0 && heading != p.coll) {
      heading = p.coll;
      fmt::print("# Collective {}: {} ranks, {}, fp32; time = slowest rank's mean over {} iterations x {} cycles, median = median over the cycles "
                 "of the median iteration's slowest rank\n",
                 coll.name, n, backend_text, iters, cycles);
      fmt::print("# {:>10} {:>12} {:>8} {:>6} {:>6} {:>10} {:>8} {:>8} {:>6} {:>10}\n", "size", "count", "type", "redop", "root",
                 "time", "algbw", "busbw", "#wrong", "median");
      fmt::print("# {:>10} {:>12} {:>8} {:>6} {:>6} {:>10} {:>8} {:>8} {:>6} {:>10}\n", "(B)", "(elements)", "", "", "", "(us)",
                 "(GB/s)", "(GB/s)", "", "(us)");
    }
    const double t = *std::max_element(p.rank_sums.begin(), p.rank_sums.end()) / (static_cast<double>(iters) * cycles);
    const double median = px::median(std::move(p.cycle_medians));
    const double size = static_cast<double>(p.count * sizeof(float));
    const double algbw = size / t / 1e9, busbw = algbw * coll.bus_factor(n);
    total_wrong += p.wrong;
    if (rank == 0) {
      fmt::print("  {:>10} {:>12} {:>8} {:>6} {:>6} {:>10.2f} {:>8.2f} {:>8.2f} {:>6} {:>10.2f}\n", p.count * sizeof(float), p.count, "float",
                 coll.redop, coll.name == std::string("broadcast") ? 0 : -1, t * 1e6, algbw, busbw, p.wrong, median * 1e6);
      rows.push_back({{"collective", coll.name}, {"ranks", n}, {"size_bytes", p.count * sizeof(float)}, {"count", p.count},
                      {"time_us", t * 1e6}, {"algbw_gbs", algbw}, {"busbw_gbs", busbw}, {"wrong", p.wrong},
                      {"median_us", median * 1e6}, {"cycles", cycles}});
    }
  }
  if (rank == 0) {
    fmt::print("# Out of bounds values : {} {}\n", total_wrong, total_wrong ? "FAILED" : "OK");
    if (!json_path.empty()) {
      std::ofstream out(json_path);
      out << nlohmann::json{{"benchmark", "parallax comm_bench"}, {"backend", backend}, {"dtype", "float"}, {"rows", rows}}.dump(2) << "\n";
    }
  }
  return total_wrong ? 1 : 0;
}
