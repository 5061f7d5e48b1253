// Rank discovery: who am I in this job, from the variables a launcher sets (Open MPI's mpirun,
// Slurm's srun, PyTorch's torchrun, or any PMI launcher). Without a launcher: rank 0 of 1.
#pragma once

#include <functional>
#include <string>

namespace px {

struct LaunchInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string launcher = "none";  // "openmpi", "slurm", "torchrun", "pmi", "none"
};

using EnvLookup = std::function<const char*(const char*)>;

// Reads the launcher's variables through `env` (getenv by default). A variable that is set but not
// a valid number, or a rank outside [0, world_size), is an Error naming the variable.
LaunchInfo discover_launch(const EnvLookup& env = {});

}  // namespace px
