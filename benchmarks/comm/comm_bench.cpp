// Communication benchmark in nccl-tests' form: for each collective and message size, the time per
// operation and algorithm/bus bandwidth, with every result checked (#wrong). Runs on the engine's
// Communicator (MPI on CPU ranks now), launched by mpirun; rank 0 prints the table and can write
// JSON for `parallax calibrate`. Exit code 1 when any result is wrong.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "benchmarks/comm/collective.hpp"
#include "engine/comm/mpi_comm.hpp"

namespace {

using px::bench::Collective;
using px::bench::CollectiveBuffers;

void fill_buffers(const Collective& coll, int rank, int n, std::size_t count, CollectiveBuffers& b) {
  b.in.resize(coll.in_count(count, n));
  b.out.resize(coll.out_count(count, n));
  for (std::size_t i = 0; i < b.in.size(); ++i) b.in[i] = px::bench::fill(rank, i);
  // In-place collectives (all-reduce, broadcast) work on `out`; start it as this member's input.
  for (std::size_t i = 0; i < b.out.size(); ++i) b.out[i] = px::bench::fill(rank, i);
}

}  // namespace

int main(int argc, char** argv) {
  px::MpiRuntime mpi(&argc, &argv);
  CLI::App app{"Collective bandwidth in nccl-tests' columns"};
  std::size_t min_bytes = 8, max_bytes = 64 << 20;
  int factor = 2, iters = 20, warmup = 5;
  std::string which = "all", json_path;
  app.add_option("-b,--minbytes", min_bytes, "Smallest message, bytes");
  app.add_option("-e,--maxbytes", max_bytes, "Largest message, bytes");
  app.add_option("-f,--stepfactor", factor, "Size multiplier between steps")->check(CLI::Range(2, 1024));
  app.add_option("-n,--iters", iters, "Timed iterations per size")->check(CLI::Range(1, 100000));
  app.add_option("-w,--warmup_iters", warmup, "Untimed iterations per size")->check(CLI::Range(0, 100000));
  app.add_option("-c,--collective", which, "all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, send_recv or all");
  app.add_option("--json", json_path, "Also write the rows as JSON (rank 0)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (mpi.world_rank() == 0) app.exit(e);
    return e.get_exit_code() == 0 ? 0 : 2;
  }
  auto world = mpi.world();
  const int n = world->size(), rank = world->rank();
  nlohmann::json rows = nlohmann::json::array();
  std::size_t total_wrong = 0;
  bool found = false;
  for (const Collective& coll : px::bench::collectives()) {
    if (which != "all" && which != coll.name) continue;
    found = true;
    if (rank == 0) {
      fmt::print("# Collective {}: {} ranks, MPI on CPU, fp32; time = slowest rank's mean over {} iterations\n", coll.name, n, iters);
      fmt::print("# {:>10} {:>12} {:>8} {:>6} {:>6} {:>10} {:>8} {:>8} {:>6}\n", "size", "count", "type", "redop", "root",
                 "time", "algbw", "busbw", "#wrong");
      fmt::print("# {:>10} {:>12} {:>8} {:>6} {:>6} {:>10} {:>8} {:>8} {:>6}\n", "(B)", "(elements)", "", "", "", "(us)",
                 "(GB/s)", "(GB/s)", "");
    }
    for (std::size_t bytes = min_bytes; bytes <= max_bytes; bytes *= static_cast<std::size_t>(factor)) {
      // Whole elements, divisible by the member count so every split collective has equal blocks.
      std::size_t count = std::max<std::size_t>(bytes / sizeof(float) / static_cast<std::size_t>(n), 1) * static_cast<std::size_t>(n);
      CollectiveBuffers b;
      fill_buffers(coll, rank, n, count, b);
      coll.run(*world, b);
      std::vector<float> wrong{static_cast<float>(coll.check(*world, b))};
      world->all_reduce(wrong);
      for (int i = 0; i < warmup; ++i) coll.run(*world, b);
      world->barrier();
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) coll.run(*world, b);
      const double mine = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
      std::vector<float> mine_v{static_cast<float>(mine)}, times(static_cast<std::size_t>(n));
      world->all_gather(mine_v, times);
      const double t = *std::max_element(times.begin(), times.end());
      const double size = static_cast<double>(count * sizeof(float));
      const double algbw = size / t / 1e9, busbw = algbw * coll.bus_factor(n);
      total_wrong += static_cast<std::size_t>(wrong[0]);
      if (rank == 0) {
        fmt::print("  {:>10} {:>12} {:>8} {:>6} {:>6} {:>10.2f} {:>8.2f} {:>8.2f} {:>6}\n", count * sizeof(float), count, "float",
                   coll.redop, coll.name == std::string("broadcast") ? 0 : -1, t * 1e6, algbw, busbw,
                   static_cast<std::size_t>(wrong[0]));
        rows.push_back({{"collective", coll.name}, {"ranks", n}, {"size_bytes", count * sizeof(float)}, {"count", count},
                        {"time_us", t * 1e6}, {"algbw_gbs", algbw}, {"busbw_gbs", busbw}, {"wrong", wrong[0]}});
      }
    }
  }
  if (!found) {
    if (rank == 0) std::fprintf(stderr, "comm_bench: unknown collective '%s'\n", which.c_str());
    return 2;
  }
  if (rank == 0) {
    fmt::print("# Out of bounds values : {} {}\n", total_wrong, total_wrong ? "FAILED" : "OK");
    if (!json_path.empty()) {
      std::ofstream out(json_path);
      out << nlohmann::json{{"benchmark", "parallax comm_bench"}, {"backend", "mpi"}, {"dtype", "float"}, {"rows", rows}}.dump(2) << "\n";
    }
  }
  return total_wrong ? 1 : 0;
}
