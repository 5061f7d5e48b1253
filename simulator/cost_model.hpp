// Op costs for the replay. Until a calibration profile says otherwise, every compute op costs its
// roofline time: the larger of its matmul FLOPs at the GPU's dense peak times an efficiency and
// its bytes at the HBM bandwidth times an efficiency, plus a launch overhead. Each cost says which
// model produced it, so a prediction can be audited op by op.
#pragma once

#include <string_view>

#include "engine/plan/program.hpp"
#include "engine/spec/spec.hpp"
#include "simulator/calibration.hpp"

namespace px::sim {

struct CostModelOptions {
  // Fractions of peak a well-tuned kernel reaches (stated, not fitted): cuBLAS GEMMs reach about
  // 70% of dense peak at transformer shapes, fused attention about 50%, bandwidth-bound kernels
  // about 80% of HBM bandwidth.
  double gemm_efficiency = 0.70;
  double attention_efficiency = 0.50;
  double memory_efficiency = 0.80;
  double launch_overhead_s = 4e-6;    // per kernel
  double host_bandwidth_gbs = 50;     // offloaded optimizer on the host CPU
  // Relative error a roofline cost carries into a prediction's error band: the largest miss of the
  // uncalibrated replay against the published Selene iterations (22.6%, GPT 22B; README).
  double roofline_uncertainty = 0.23;
};

struct OpCost {
  double seconds = 0;
  std::string_view model;  // "measured", "roofline-compute", "roofline-memory", "pcie", "host", "free"
  double spread = 0;       // measured: the samples' relative spread (the lookup's fit residual)
};

class CostModel {
 public:
  // `profile`, when given, costs every op it has measured; the roofline costs the rest.
  CostModel(const GpuSpec& gpu, const NodeSpec& node, CostModelOptions options = {}, const CalibrationProfile* profile = nullptr);
  // A compute or memory op (comm ops are simulated as flows, not costed here).
  OpCost cost(const Op& op) const;

 private:
  double peak_flops(DType dtype) const;
  GpuSpec gpu_;
  NodeSpec node_;
  CostModelOptions o_;
  const CalibrationProfile* profile_;
};

}  // namespace px::sim
