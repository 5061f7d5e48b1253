// Heartbeats: each rank keeps a small status file in the run directory (rank, pid, iteration, op,
// time), rewritten atomically every interval. When a collective times out, the rank reads all of
// them to name the rank that stopped first: the one whose heartbeat is oldest, or whose process is
// gone. Files, not the network, because they outlive a dead or hung process and need no peer.
#pragma once

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>

namespace px {

class Heartbeat {
 public:
  Heartbeat(std::filesystem::path dir, int rank, std::chrono::milliseconds interval = std::chrono::milliseconds(200));
  // Cheap: writes only when the interval has passed (or `force`).
  void beat(int iteration, std::int64_t op, bool force = false);

 private:
  std::filesystem::path dir_;
  int rank_;
  std::chrono::milliseconds interval_;
  std::chrono::steady_clock::time_point last_{};
};

struct FailureDiagnosis {
  int rank = -1;          // the rank that stopped first
  std::string reason;     // one line: "rank 2 (pid 1234) exited ...", or "... last heartbeat 3.2 s ago at iteration 1, op 57"
};

// Reads the heartbeats of ranks [0, world) in `dir` and names the rank that stopped first. A rank
// with no file, or whose process no longer exists on this host, counts as stopped first.
std::optional<FailureDiagnosis> diagnose_failure(const std::filesystem::path& dir, int world, int self);

}  // namespace px
