// Roofline costs per op.
#include "simulator/cost_model.hpp"

#include <algorithm>

namespace px::sim {

CostModel::CostModel(const GpuSpec& gpu, const NodeSpec& node, CostModelOptions options, const CalibrationProfile* profile)
    : gpu_(gpu), node_(node), o_(options), profile_(profile) {}

double CostModel::peak_flops(DType dtype) const {
  switch (dtype) {
    case DType::F32: return 1e12 * gpu_.peak_fp32_tflops;
    case DType::FP8: return 1e12 * gpu_.peak_fp8_tflops;
    case DType::F16: return 1e12 * gpu_.peak_fp16_tflops;
    case DType::BF16: break;
  }
  return 1e12 * gpu_.peak_bf16_tflops;
}

OpCost CostModel::cost(const Op& op) const {
  if (profile_)
    if (const auto m = profile_->lookup(op)) return {profile_->dispatch_gap_s() + m->seconds, "measured", m->spread};
  if (op.kind == OpKind::CopyD2H || op.kind == OpKind::CopyH2D)
    return {static_cast<double>(op.comm_bytes) / (1e9 * node_.pcie_bandwidth_gbs), "pcie"};
  const double bytes = static_cast<double>(op.bytes_read + op.bytes_written);
  if (op.stream == Stream::Host) return {bytes / (1e9 * o_.host_bandwidth_gbs), "host"};
  if (op.flops == 0 && bytes == 0) return {0.0, "free"};
  const double eff = op.kind == OpKind::AttentionCore ? o_.attention_efficiency : o_.gemm_efficiency;
  const double compute = op.flops / (peak_flops(op.dtype) * eff);
  const double memory = bytes / (1e9 * gpu_.hbm_bandwidth_gbs * o_.memory_efficiency);
  return {o_.launch_overhead_s + std::max(compute, memory), compute >= memory ? "roofline-compute" : "roofline-memory"};
}

}  // namespace px::sim
