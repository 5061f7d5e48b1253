// Op costs for the replay. Until a calibration profile says otherwise, every compute op costs the
// larger of its compute time and its bytes at the HBM bandwidth times an efficiency, plus a launch
// overhead. A GEMM's compute time follows the GEMM curve: its output tiles run in waves over the
// GPU's SMs, each tile paying for its padding and its pipeline's fill, at the rate a published large
// GEMM measurement implies; other compute runs at its dense peak times a flat efficiency. Each cost
// says which model produced it, so a prediction can be audited op by op.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "engine/plan/program.hpp"
#include "engine/spec/spec.hpp"
#include "simulator/calibration.hpp"

namespace px::sim {

struct GemmTile {
  int m = 0, n = 0;  // output rows and columns one thread block computes
};

struct CostModelOptions {
  // Flat fractions of peak a well-tuned kernel reaches (stated, not fitted): cuBLAS GEMMs reach about
  // 70% of dense peak at transformer shapes, fused attention about 50%, bandwidth-bound kernels
  // about 80% of HBM bandwidth. The GEMM figure costs only GEMMs the curve cannot: a GPU spec
  // without `sms` or `gemm_measured`, fp32 or fp8 (the measurements are bf16), an op without a shape.
  double gemm_efficiency = 0.70;
  double attention_efficiency = 0.50;
  double memory_efficiency = 0.80;
  double launch_overhead_s = 4e-6;    // per kernel
  double host_bandwidth_gbs = 50;     // offloaded optimizer on the host CPU

  // The GEMM curve (NVIDIA, "Matrix Multiplication Background User's Guide", docs.nvidia.com/
  // deeplearning/performance: tile and wave quantization). cuBLAS's large Ampere and Hopper
  // tensor-core kernels compute 256x128 or 128x256 output tiles (kernel names ..._256x128_..._
  // stages_64x3_... on sm80, ..._tilesize128x256x64_... on sm90), 128x128 ones where those fit
  // badly, one thread block per SM at a time; the heuristics are taken to pick the fastest for each
  // shape, all at one per-tile rate: the GPU spec's `gemm_measured` (datasets/gpus/, with its
  // source) divided by the curve's own losses at the measured shape.
  std::vector<GemmTile> gemm_tiles = {{128, 256}, {256, 128}, {128, 128}};
  // A tile's main loop walks K in 64-deep slices (the kernel names' "64x3" and "x64"; kernels with
  // 32-deep ones serve K that 64 does not divide, so K is not padded). Before its first multiply
  // the first slice must arrive, and after its last the output tile is written: about one slice
  // each (an estimate from the kernels' structure, not a fit), so a tile costs K + 128 of K's
  // worth of math time. Short K pays for it (K = 768: 14%). Split-K divides K in whole slices.
  int gemm_k_slice = 64;
  int gemm_fill_k = 128;
  // A GEMM with too few tiles to fill one wave has its K slices spread over every SM instead
  // (cuBLAS's split-K on Ampere, stream-K on Hopper; CUTLASS documents both), each SM paying one
  // fill, the fp32 partial tiles summed through memory; taken where it is faster.
  bool gemm_split_k = true;
  // The curve's level for a software stack: its per-tile rate times this (1: the rate the GPU
  // spec's gemm_measured implies). A calibration profile fitted to measured layer times
  // (`parallax calibrate --layer-times`) multiplies it by its own.
  double gemm_curve_scale = 1.0;

  // Relative error an unmeasured cost carries into a prediction's error band: the largest miss of
  // the uncalibrated replay against the published runs whose hardware the specs describe
  // (benchmarks/published_results.sh: 20.1%, Megatron-Core GPT-3 175B on 96 H100; README).
  // torchtitan's runs miss by more on H100s with 2.4 TB/s HBM that no spec here describes.
  double roofline_uncertainty = 0.21;
};

struct OpCost {
  double seconds = 0;
  // "measured", "measured-interpolated" (from other sizes of its kind), "gemm-curve",
  // "roofline-compute", "roofline-memory", "gemm-curve+memory" (unfused attention), "pcie", "host", "free"
  std::string_view model;
  double spread = 0;       // measured: the samples' relative spread (the lookup's fit residual), plus
                           // the interpolation's residual for an interpolated one
  // Costed by the GEMM curve at a level fitted to measured layer times (a profile's gemm_curve):
  // `spread` is that fit's residual.
  bool fitted = false;
  // Costed from a calibration profile (its own signature or interpolated): `spread` is its error.
  bool measured() const { return model == "measured" || model == "measured-interpolated"; }
};

class CostModel {
 public:
  // `profile`, when given, costs every op it has measured; the models above cost the rest.
  CostModel(const GpuSpec& gpu, const NodeSpec& node, CostModelOptions options = {}, const CalibrationProfile* profile = nullptr);
  // A compute or memory op (comm ops are simulated as flows, not costed here).
  OpCost cost(const Op& op, OpContext where = {}) const;

  // The GEMM curve's fraction of dense bf16 peak for `batch` (m x k)(k x n) GEMMs (one kernel, the
  // tiles of all of them sharing the waves): the asymptote times tile quantization, wave
  // quantization and pipeline fill, for the best tile (or split-K where it is faster). 0 where the
  // GPU spec does not support the curve.
  double gemm_efficiency(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t batch = 1) const;
  // The per-tile efficiency a full tile with endless K reaches: gemm_measured over the dense bf16
  // peak, divided by the curve's own losses at the measured shape. 0: no curve.
  double gemm_asymptote() const { return gemm_asymptote_; }

 private:
  OpCost cost_unfitted(const Op& op, OpContext where) const;
  double peak_flops(DType dtype) const;
  // Seconds `batch` (m x k)(k x n) GEMMs take when a full tile with endless K computes at `sm_flops`
  // FLOP/s on each SM, for the best tile (negative: no SMs or no shape).
  double tiled_seconds(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t batch, double sm_flops,
                       bool split_k) const;
  // Seconds of matmul compute the curve gives `op`, or a negative number where it does not apply.
  double gemm_seconds(const Op& op) const;
  double attention_gemm_seconds(const Op& op) const;
  GpuSpec gpu_;
  NodeSpec node_;
  CostModelOptions o_;
  const CalibrationProfile* profile_;
  double gemm_asymptote_ = 0;
};

}  // namespace px::sim
