// Where a result came from: the software that produced it and the machine it ran on, as JSON text for
// the runs table. Read from the build's compile definitions and from /proc, so no GPU library is needed.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace px {

// {"name", "version", "git_commit", "compiler", "compiler_version", "cxx_standard", "build_type",
//  "sqlite"}. git_commit is what the build passed in (CMake -DPARALLAX_GIT_COMMIT=...), else "".
std::string software_provenance_json();

struct GpuInfo {
  std::string name{};  // e.g. "NVIDIA H100 80GB HBM3"; empty: no GPU
  std::string driver{};  // e.g. "535.104.05"
  int count = 0;
};

// {"host", "os", "cpu", "cores", "memory_bytes", "gpu", "gpu_count", "driver"}; gpu and driver are
// null when there is none. The first form reads the NVIDIA driver's /proc files when they exist.
std::string hardware_provenance_json();
std::string hardware_provenance_json(const GpuInfo& gpu);

// The parsers behind it, over the text of the /proc files (empty or 0 when the field is absent).
std::string cpu_model_from_cpuinfo(std::string_view cpuinfo);
std::int64_t memory_bytes_from_meminfo(std::string_view meminfo);
std::string driver_from_nvidia_version(std::string_view version_file);  // /proc/driver/nvidia/version
std::string gpu_model_from_nvidia_information(std::string_view information_file);  // .../gpus/*/information

}  // namespace px
