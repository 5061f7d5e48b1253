// One rank of a 4-rank data-parallel job hangs (or exits) in its second iteration; the others must
// stop within their comm timeout and name it. Run by ctest under mpirun, which checks the printed
// diagnosis and that the job ended long before the hung rank would have woken.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "engine/comm/mpi_comm.hpp"
#include "engine/exec/executor.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

int main(int argc, char** argv) {
  px::MpiRuntime mpi(&argc, &argv);
  if (argc != 3 || (std::strcmp(argv[1], "hang") != 0 && std::strcmp(argv[1], "exit") != 0)) {
    std::fprintf(stderr, "usage: rank_failure hang|exit HEARTBEAT_DIR\n");
    return 2;
  }
  const bool hang = std::strcmp(argv[1], "hang") == 0;
  const px::SpecCatalog cat(PX_DATASETS_DIR);
  const px::ModelSpec model = cat.model("tiny-gpt");
  px::PlanSpec p;
  p.precision = px::DType::F32;
  p.grad_dtype = px::DType::F32;
  p.data_parallel_size = mpi.world_size();
  p.global_batch_size = mpi.world_size();
  const px::CompiledPlan plan = px::compile_plan(model, px::resolve_plan(p, model, nullptr));
  const int rank = mpi.world_rank();
  const px::MpiGroups groups = px::make_mpi_groups(plan.topology, rank);
  px::GroupComms comms{};
  for (int g = 0; g < px::kNumGroupKinds; ++g) {
    comms[static_cast<std::size_t>(g)] = groups[static_cast<px::GroupKind>(g)];
    if (comms[static_cast<std::size_t>(g)]) comms[static_cast<std::size_t>(g)]->set_timeout(std::chrono::milliseconds(1500));
  }
  px::NullBackend backend;
  px::Executor exec(plan, rank, backend, comms);
  exec.enable_heartbeat(argv[2]);
  exec.run_iteration();
  mpi.world()->barrier();
  if (rank == 2) {
    if (!hang) _exit(3);
    std::this_thread::sleep_for(std::chrono::seconds(60));
  }
  try {
    exec.run_iteration();
  } catch (const px::RankFailure& f) {
    std::printf("parallax: %s\n", f.what());
    std::fflush(stdout);
    px::MpiRuntime::abort_job(1);
  }
  std::printf("rank %d: no failure detected\n", rank);
  return 1;
}
