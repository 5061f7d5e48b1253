// For GPU tests under mpirun: NCCL refuses two members of a communicator on one device, so a job
// with more ranks on a machine than the machine has GPUs skips its NCCL tests, all ranks alike;
// and their main().
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "engine/comm/communicator.hpp"
#include "engine/comm/mpi_comm.hpp"

namespace px::test {

// Empty when every rank can have a device of its own; else why not. Collective over `world`.
std::string short_of_devices(Communicator& world);

// A test program's main(): MPI up (`runtime` set for the tests), this rank's device chosen by its
// place on the machine before any CUDA state exists, one report (rank 0's; every rank's exit code
// still says whether its tests failed).
int run_gpu_tests_under_mpi(int argc, char** argv, MpiRuntime*& runtime);

}  // namespace px::test

// After PX_REQUIRE_GPU(), in every test that makes NCCL communicators.
#define PX_REQUIRE_DEVICE_PER_RANK(world)                               \
  do {                                                                  \
    const std::string px_why = ::px::test::short_of_devices(world);     \
    if (!px_why.empty()) GTEST_SKIP() << px_why;                        \
  } while (0)
