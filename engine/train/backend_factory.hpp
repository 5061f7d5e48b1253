// The compute backend a run names: "cpu" (the fp32 reference, always built) or "cuda" (bf16 on
// the current GPU, built where a CUDA toolkit was found).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/backends/cpu/cpu_backend.hpp"
#include "engine/exec/training_backend.hpp"

namespace px {

// The devices this build can train on.
std::vector<std::string> built_devices();

// Throws px::Error naming the device when it is unknown or not in this build, and the backend's
// own errors for a plan it cannot run.
std::unique_ptr<TrainingBackend> make_backend(const std::string& device, const CompiledPlan& plan, int rank, const TokenSource& data,
                                              const cpu::TrainOptions& options);

}  // namespace px
