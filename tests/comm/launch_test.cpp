// Rank discovery from each launcher's variables, and clear errors for inconsistent ones.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "engine/comm/launch.hpp"
#include "engine/core/error.hpp"

namespace px {
namespace {

EnvLookup env_of(const std::map<std::string, std::string>& vars) {
  return [vars](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}

TEST(Launch, NoLauncherIsRankZeroOfOne) {
  const LaunchInfo i = discover_launch(env_of({}));
  EXPECT_EQ(i.rank, 0);
  EXPECT_EQ(i.world_size, 1);
  EXPECT_EQ(i.launcher, "none");
}

TEST(Launch, EachLauncher) {
  struct Case {
    std::map<std::string, std::string> vars;
    const char* launcher;
    int rank, size, local;
  };
  for (const Case& c : {Case{{{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "8"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}}, "openmpi", 5, 8, 1},
                        Case{{{"SLURM_PROCID", "17"}, {"SLURM_NTASKS", "32"}, {"SLURM_LOCALID", "1"}}, "slurm", 17, 32, 1},
                        Case{{{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "3"}}, "torchrun", 3, 4, 3},
                        Case{{{"PMI_RANK", "2"}, {"PMI_SIZE", "3"}}, "pmi", 2, 3, 0}}) {
    const LaunchInfo i = discover_launch(env_of(c.vars));
    EXPECT_EQ(i.launcher, c.launcher);
    EXPECT_EQ(i.rank, c.rank);
    EXPECT_EQ(i.world_size, c.size);
    EXPECT_EQ(i.local_rank, c.local);
  }
}

TEST(Launch, OpenMpiWinsOverAnInheritedTorchrunEnvironment) {
  const LaunchInfo i = discover_launch(env_of({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}}));
  EXPECT_EQ(i.launcher, "openmpi");
  EXPECT_EQ(i.rank, 1);
}

TEST(Launch, BadVariablesAreErrorsNamingThem) {
  try {
    discover_launch(env_of({{"SLURM_PROCID", "x1"}, {"SLURM_NTASKS", "4"}}));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("SLURM_PROCID='x1'"), std::string::npos) << e.what();
  }
  try {
    discover_launch(env_of({{"RANK", "4"}, {"WORLD_SIZE", "4"}}));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("outside the world"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace px
