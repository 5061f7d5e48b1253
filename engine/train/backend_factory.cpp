// Backend by name; the CUDA one only where this build has it.
#include "engine/train/backend_factory.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "engine/core/error.hpp"
#ifdef PX_HAVE_CUDA_BACKEND
#include "engine/backends/cuda/cuda_backend.hpp"
#endif

namespace px {

std::vector<std::string> built_devices() {
#ifdef PX_HAVE_CUDA_BACKEND
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

std::unique_ptr<TrainingBackend> make_backend(const std::string& device, const CompiledPlan& plan, int rank, const TokenSource& data,
                                              const cpu::TrainOptions& options) {
  if (device == "cpu") return std::make_unique<cpu::CpuBackend>(plan, rank, data, options);
#ifdef PX_HAVE_CUDA_BACKEND
  if (device == "cuda") return std::make_unique<cuda::CudaBackend>(plan, rank, data, options);
#endif
  throw Error(ErrorKind::Usage, {}, fmt::format("device '{}' is not in this build", device),
              fmt::format("choose one of: {} (the CUDA engine needs a build with the CUDA toolkit)", fmt::join(built_devices(), ", ")));
}

}  // namespace px
