// Heartbeat files as JSON, written by rename so a reader never sees half a file.
#include "engine/exec/heartbeat.hpp"

#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <nlohmann/json.hpp>
#include <system_error>

namespace px {
namespace {

double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::filesystem::path file_of(const std::filesystem::path& dir, int rank) { return dir / fmt::format("heartbeat-{}.json", rank); }

}  // namespace

Heartbeat::Heartbeat(std::filesystem::path dir, int rank, std::chrono::milliseconds interval)
    : dir_(std::move(dir)), rank_(rank), interval_(interval) {
  std::error_code ec;
  std::filesystem::create_directories(dir_, ec);
  beat(0, -1, true);
}

void Heartbeat::beat(int iteration, std::int64_t op, bool force) {
  const auto now = std::chrono::steady_clock::now();
  if (!force && now - last_ < interval_) return;
  last_ = now;
  const nlohmann::json j = {{"rank", rank_}, {"pid", static_cast<long>(getpid())}, {"iteration", iteration}, {"op", op}, {"time", wall_seconds()}};
  const auto path = file_of(dir_, rank_);
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << j.dump();
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);  // best effort: a missed beat only ages this rank's record
}

std::optional<FailureDiagnosis> diagnose_failure(const std::filesystem::path& dir, int world, int self) {
  std::optional<FailureDiagnosis> worst;
  double oldest = 0;
  const double now = wall_seconds();
  for (int r = 0; r < world; ++r) {
    if (r == self) continue;
    std::ifstream in(file_of(dir, r));
    nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (!in || j.is_discarded() || !j.contains("time")) return FailureDiagnosis{r, fmt::format("rank {} never reported a heartbeat", r)};
    const long pid = j.value("pid", 0L);
    if (pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)
      return FailureDiagnosis{r, fmt::format("rank {} (pid {}) has exited, last seen at iteration {}, op {}", r, pid,
                                             j.value("iteration", -1), j.value("op", -1L))};
    const double age = now - j["time"].get<double>();
    if (!worst || age > oldest) {
      oldest = age;
      worst = FailureDiagnosis{r, fmt::format("rank {} stopped first: last heartbeat {:.1f} s ago at iteration {}, op {}", r, age,
                                              j.value("iteration", -1), j.value("op", -1L))};
    }
  }
  return worst;
}

}  // namespace px
