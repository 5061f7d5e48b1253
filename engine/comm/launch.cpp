// Launcher variables, checked in a fixed order: Open MPI, Slurm, torchrun, generic PMI.
#include "engine/comm/launch.hpp"

#include <charconv>
#include <cstdlib>
#include <cstring>

#include "engine/core/error.hpp"

namespace px {
namespace {

struct Scheme {
  const char* launcher;
  const char* rank;
  const char* size;
  const char* local_rank;  // may be absent
};

constexpr Scheme kSchemes[] = {
    {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
    {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"},
    {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"},
    {"pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"},
};

int parse(const char* name, const char* value) {
  int out = 0;
  const char* end = value + std::strlen(value);
  const auto [ptr, ec] = std::from_chars(value, end, out);
  if (ec != std::errc() || ptr != end || out < 0)
    throw Error(ErrorKind::Usage, {}, std::string("launcher variable ") + name + "='" + value + "' is not a non-negative integer",
                "check how the job was launched");
  return out;
}

}  // namespace

LaunchInfo discover_launch(const EnvLookup& env) {
  const EnvLookup get = env ? env : EnvLookup([](const char* n) { return std::getenv(n); });
  for (const Scheme& s : kSchemes) {
    const char* rank = get(s.rank);
    const char* size = get(s.size);
    if (!rank || !size) continue;
    LaunchInfo info;
    info.launcher = s.launcher;
    info.rank = parse(s.rank, rank);
    info.world_size = parse(s.size, size);
    if (const char* local = get(s.local_rank)) info.local_rank = parse(s.local_rank, local);
    if (info.world_size < 1 || info.rank >= info.world_size)
      throw Error(ErrorKind::Usage, {},
                  std::string(s.rank) + "=" + rank + " is outside the world of " + s.size + "=" + size,
                  "the launcher's variables disagree");
    return info;
  }
  return {};
}

}  // namespace px
