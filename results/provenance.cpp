// Software and hardware provenance of a run. The /proc parsers take the file text so they can be
// tested with fixed inputs; a missing file only leaves its fields empty, it is never an error.
#include "results/provenance.hpp"

#include <sqlite3.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#ifndef PX_VERSION
#define PX_VERSION ""
#endif
#ifndef PX_GIT_COMMIT
#define PX_GIT_COMMIT ""
#endif
#ifndef PX_BUILD_TYPE
#define PX_BUILD_TYPE ""
#endif

namespace px {
namespace {

std::string read_text(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) return {};
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// The value of the first "key<spaces>: value" line, as in /proc/cpuinfo and the NVIDIA files.
std::string field_value(std::string_view text, std::string_view key) {
  while (!text.empty()) {
    const std::size_t end = std::min(text.find('\n'), text.size());
    const std::string_view line = text.substr(0, end);
    text.remove_prefix(std::min(end + 1, text.size()));
    const std::size_t colon = line.find(':');
    if (colon != std::string_view::npos && trim(line.substr(0, colon)) == key) {
      return std::string(trim(line.substr(colon + 1)));
    }
  }
  return {};
}

bool looks_like_version(std::string_view token) {
  const bool digits_and_dots = std::all_of(token.begin(), token.end(), [](char c) {
    return std::isdigit(static_cast<unsigned char>(c)) != 0 || c == '.';
  });
  return digits_and_dots && token.find('.') != std::string_view::npos &&
         std::isdigit(static_cast<unsigned char>(token.front())) != 0;
}

std::string host_name() {
  std::array<char, 256> name{};
  if (gethostname(name.data(), name.size() - 1) != 0) return {};
  return std::string(name.data());
}

std::string os_name() {
  utsname u{};
  if (uname(&u) != 0) return {};
  return std::string(u.sysname) + " " + u.release;
}

GpuInfo detect_nvidia_gpus() {
  GpuInfo gpu;
  const std::filesystem::path gpus = "/proc/driver/nvidia/gpus";
  std::error_code ec;
  if (!std::filesystem::is_directory(gpus, ec)) return gpu;
  std::vector<std::filesystem::path> devices;
  for (const auto& entry : std::filesystem::directory_iterator(gpus, ec)) devices.push_back(entry.path());
  std::sort(devices.begin(), devices.end());  // bus order, so the reported model does not vary
  for (const auto& device : devices) {
    const std::string model = gpu_model_from_nvidia_information(read_text(device / "information"));
    if (model.empty()) continue;
    if (gpu.name.empty()) gpu.name = model;
    ++gpu.count;
  }
  gpu.driver = driver_from_nvidia_version(read_text("/proc/driver/nvidia/version"));
  return gpu;
}

nlohmann::json text_or_null(const std::string& s) { return s.empty() ? nlohmann::json() : nlohmann::json(s); }

}  // namespace

std::string cpu_model_from_cpuinfo(std::string_view cpuinfo) {
  std::string model = field_value(cpuinfo, "model name");  // x86
  if (model.empty()) model = field_value(cpuinfo, "Model");  // some ARM kernels
  return model;
}

std::int64_t memory_bytes_from_meminfo(std::string_view meminfo) {
  const std::string value = field_value(meminfo, "MemTotal");  // "16318704 kB"
  std::int64_t kib = 0;
  std::istringstream in(value);
  in >> kib;
  return in ? kib * 1024 : 0;
}

std::string driver_from_nvidia_version(std::string_view version_file) {
  // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 ..."; only the first line,
  // because the second names the GCC version.
  const std::string_view first = version_file.substr(0, version_file.find('\n'));
  std::istringstream words{std::string(first)};
  std::string word;
  while (words >> word) {
    if (looks_like_version(word)) return word;
  }
  return {};
}

std::string gpu_model_from_nvidia_information(std::string_view information_file) {
  return field_value(information_file, "Model");
}

std::string software_provenance_json() {
#if defined(__clang__)
  constexpr const char* compiler = "clang";
#elif defined(__GNUC__)
  constexpr const char* compiler = "gcc";
#else
  constexpr const char* compiler = "unknown";
#endif
  nlohmann::ordered_json j;
  j["name"] = "parallax";
  j["version"] = PX_VERSION;
  j["git_commit"] = PX_GIT_COMMIT;
  j["compiler"] = compiler;
  j["compiler_version"] = __VERSION__;
  j["cxx_standard"] = __cplusplus;
  j["build_type"] = PX_BUILD_TYPE;
  j["sqlite"] = sqlite3_libversion();
  return j.dump();
}

std::string hardware_provenance_json() { return hardware_provenance_json(detect_nvidia_gpus()); }

std::string hardware_provenance_json(const GpuInfo& gpu) {
  nlohmann::ordered_json j;
  j["host"] = host_name();
  j["os"] = os_name();
  j["cpu"] = cpu_model_from_cpuinfo(read_text("/proc/cpuinfo"));
  j["cores"] = std::thread::hardware_concurrency();
  j["memory_bytes"] = memory_bytes_from_meminfo(read_text("/proc/meminfo"));
  j["gpu"] = text_or_null(gpu.name);
  j["gpu_count"] = gpu.count;
  j["driver"] = text_or_null(gpu.driver);
  return j.dump();
}

}  // namespace px
