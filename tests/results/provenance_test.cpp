// Provenance: the JSON documents are well-formed with the promised fields, and the /proc parsers read
// the formats the kernel and the NVIDIA driver write.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "results/provenance.hpp"

namespace px {
namespace {

TEST(ResultsProvenance, SoftwareNamesVersionCompilerAndSqlite) {
  const auto j = nlohmann::json::parse(software_provenance_json());
  EXPECT_EQ(j.at("name"), "parallax");
  EXPECT_FALSE(j.at("version").get<std::string>().empty());
  EXPECT_TRUE(j.at("git_commit").is_string());
  EXPECT_TRUE(j.at("compiler") == "gcc" || j.at("compiler") == "clang") << j.dump();
  EXPECT_FALSE(j.at("compiler_version").get<std::string>().empty());
  EXPECT_EQ(j.at("cxx_standard").get<long>(), 202002L);
  EXPECT_TRUE(j.at("build_type").is_string());
  EXPECT_EQ(j.at("sqlite").get<std::string>().substr(0, 2), "3.");
}

TEST(ResultsProvenance, HardwareDescribesThisMachine) {
  const auto j = nlohmann::json::parse(hardware_provenance_json());
  EXPECT_FALSE(j.at("host").get<std::string>().empty());
  EXPECT_EQ(j.at("os").get<std::string>().substr(0, 5), "Linux");
  EXPECT_GT(j.at("cores").get<int>(), 0);
  EXPECT_GT(j.at("memory_bytes").get<std::int64_t>(), 0);
  EXPECT_TRUE(j.at("gpu").is_null() || j.at("gpu").is_string());
  EXPECT_TRUE(j.contains("driver"));

  const auto given = nlohmann::json::parse(hardware_provenance_json({"NVIDIA H100 80GB HBM3", "535.104.05", 8}));
  EXPECT_EQ(given.at("gpu"), "NVIDIA H100 80GB HBM3");
  EXPECT_EQ(given.at("gpu_count"), 8);
  EXPECT_EQ(given.at("driver"), "535.104.05");
  const auto none = nlohmann::json::parse(hardware_provenance_json(GpuInfo{}));
  EXPECT_TRUE(none.at("gpu").is_null());
  EXPECT_TRUE(none.at("driver").is_null());
  EXPECT_EQ(none.at("gpu_count"), 0);
}

TEST(ResultsProvenance, ParsesProcFiles) {
  const char* cpuinfo =
      "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 143\n"
      "model name\t: Intel(R) Xeon(R) Platinum 8480+\nstepping\t: 8\n\nprocessor\t: 1\n"
      "model name\t: Intel(R) Xeon(R) Platinum 8480+\n";
  EXPECT_EQ(cpu_model_from_cpuinfo(cpuinfo), "Intel(R) Xeon(R) Platinum 8480+");
  EXPECT_EQ(cpu_model_from_cpuinfo("processor : 0\nBogoMIPS : 50.00\n"), "");

  EXPECT_EQ(memory_bytes_from_meminfo("MemTotal:       16318704 kB\nMemFree:         1234 kB\n"),
            16318704LL * 1024);
  EXPECT_EQ(memory_bytes_from_meminfo("MemFree: 1 kB\n"), 0);

  EXPECT_EQ(driver_from_nvidia_version("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 "
                                       "01:15:15 UTC 2023\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"),
            "535.104.05");
  EXPECT_EQ(driver_from_nvidia_version("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  "
                                       "Release Build  (dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\n"),
            "550.54.15");
  EXPECT_EQ(driver_from_nvidia_version(""), "");

  EXPECT_EQ(gpu_model_from_nvidia_information("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 16\n"
                                              "GPU UUID: \t GPU-00000000-0000-0000-0000-000000000000\n"),
            "NVIDIA H100 80GB HBM3");
}

}  // namespace
}  // namespace px
