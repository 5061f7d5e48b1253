// The device count against the most ranks on one machine, agreed on by the whole job.
#include "tests/comm/device_per_rank.hpp"

#include <fmt/format.h>

#include <vector>

#include "engine/backends/cuda/check.hpp"
#include "engine/comm/launch.hpp"
#include "engine/comm/nccl_comm.hpp"

namespace px::test {

std::string short_of_devices(Communicator& world) {
  // The most ranks on one machine (local ranks count from 0 on each), then whether any rank has
  // fewer devices than that: maxima over the world, so every rank decides alike.
  std::vector<float> ranks_here{static_cast<float>(discover_launch().local_rank + 1)};
  world.start_all_reduce_max(ranks_here)->wait();
  const int devices = cuda::device_count();
  std::vector<float> short_flag{ranks_here[0] > static_cast<float>(devices) ? 1.0f : 0.0f};
  world.start_all_reduce_max(short_flag)->wait();
  if (short_flag[0] == 0) return {};
  return fmt::format("{} ranks share a machine that has {} CUDA device(s); NCCL needs one device per rank",
                     static_cast<int>(ranks_here[0]), devices);
}

int run_gpu_tests_under_mpi(int argc, char** argv, MpiRuntime*& runtime) {
  MpiRuntime mpi(&argc, &argv);
  runtime = &mpi;
  if (cuda::device_count() > 0) select_local_device(discover_launch().local_rank);
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi.world_rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int failed = RUN_ALL_TESTS();
  runtime = nullptr;
  return failed;
}

}  // namespace px::test
