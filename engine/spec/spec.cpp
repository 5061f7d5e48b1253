// Names and sizes of the spec enums, as they appear in YAML files and on the command line.
#include "engine/spec/spec.hpp"

#include <cassert>

namespace px {

std::size_t dtype_bytes(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::FP8: return 1;
  }
  assert(false && "unknown dtype");
  return 0;
}

std::string_view to_string(DType t) {
  switch (t) {
    case DType::F32: return "fp32";
    case DType::BF16: return "bf16";
    case DType::F16: return "fp16";
    case DType::FP8: return "fp8";
  }
  return "?";
}

std::string_view to_string(Activation a) { return a == Activation::Gelu ? "gelu" : "swiglu"; }
std::string_view to_string(NormKind n) { return n == NormKind::LayerNorm ? "layernorm" : "rmsnorm"; }
std::string_view to_string(PositionKind p) { return p == PositionKind::Learned ? "learned" : "rope"; }

std::string_view to_string(FabricTopology t) {
  switch (t) {
    case FabricTopology::RailOptimizedFatTree: return "rail-optimized-fat-tree";
    case FabricTopology::FatTree: return "fat-tree";
    case FabricTopology::Dragonfly: return "dragonfly";
  }
  return "?";
}

std::string_view to_string(PipelineSchedule s) {
  switch (s) {
    case PipelineSchedule::GPipe: return "gpipe";
    case PipelineSchedule::OneFOneB: return "1f1b";
    case PipelineSchedule::Interleaved1F1B: return "interleaved-1f1b";
    case PipelineSchedule::ZeroBubble: return "zero-bubble";
  }
  return "?";
}

std::string_view to_string(Recompute r) {
  switch (r) {
    case Recompute::None: return "none";
    case Recompute::Selective: return "selective";
    case Recompute::Full: return "full";
  }
  return "?";
}

}  // namespace px
