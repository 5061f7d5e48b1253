// Helpers shared by the results tests: a scratch directory removed afterwards, whole-file reads, and a
// run record with every field set.
#pragma once

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "results/results_db.hpp"

namespace px::test {

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("parallax-results-" + std::to_string(getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline std::string read_bytes(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

inline void write_bytes(const std::filesystem::path& file, const std::string& bytes) {
  std::ofstream out(file, std::ios::binary);
  out << bytes;
}

inline RunRecord sample_run(const std::string& experiment = "gpt3-sweep") {
  RunRecord r;
  r.experiment = experiment;
  r.kind = RunKind::Simulated;
  r.status = RunStatus::Ok;
  r.model = "gpt3-175b";
  r.cluster = "dgx-h100-64";
  r.plan_json = R"({"tp":8,"pp":8,"dp":1,"micro_batch_size":1})";
  r.model_json = R"({"num_layers":96,"hidden_size":12288})";
  r.cluster_json = R"({"nodes":8,"gpus_per_node":8})";
  r.software_json = R"({"version":"0.1.0"})";
  r.hardware_json = R"({"host":"node01"})";
  r.started_at = "2024-05-01T12:00:00.000Z";
  r.finished_at = "2024-05-01T12:05:00.000Z";
  r.metrics = {{"step_time", 1534.25, "ms"}, {"mfu", 0.512, ""}, {"tokens_per_s", 1.25e6, "token/s"}};
  r.op_samples = {
      {0, 1, "attn_qkv_fwd", "compute", 0, 0.0, 120.5, 4096, 3.2e12},
      {0, 2, "tp_allreduce", "comm", 1, 120.5, 180.0, 33554432, 0.0},
      {1, 1, "attn_qkv_fwd", "compute", 0, 0.0, 121.0, 4096, 3.2e12},
  };
  return r;
}

}  // namespace px::test
