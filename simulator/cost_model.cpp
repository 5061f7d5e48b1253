// Roofline costs per op, with GEMMs on the GEMM curve.
#include "simulator/cost_model.hpp"

#include <algorithm>
#include <cmath>
#include <utility>

namespace px::sim {

namespace {

double ceil_div(std::int64_t a, std::int64_t b) { return static_cast<double>((a + b - 1) / b); }

}  // namespace

CostModel::CostModel(const GpuSpec& gpu, const NodeSpec& node, CostModelOptions options, const CalibrationProfile* profile)
    : gpu_(gpu), node_(node), o_(std::move(options)), profile_(profile) {
  // The measurement is the asymptote times the curve's losses at its own shape (a large one, which
  // fills its waves without splitting K): dividing them out leaves the per-tile rate, so the curve
  // reproduces the measurement there and scales from it.
  const GpuSpec::GemmMeasurement& g = gpu_.gemm_measured;
  if (gpu_.sms > 0 && g.tflops > 0 && gpu_.peak_bf16_tflops > 0) {
    const double peak = 1e12 * gpu_.peak_bf16_tflops;
    const double t = tiled_seconds(g.m, g.n, g.k, 1, peak / gpu_.sms, false);
    if (t > 0) gemm_asymptote_ = std::min(1.0, 1e12 * g.tflops * t / (2.0 * g.m * g.n * g.k));
    gemm_asymptote_ *= o_.gemm_curve_scale * (profile_ ? profile_->gemm_curve_scale : 1.0);
  }
}

double CostModel::peak_flops(DType dtype) const {
  switch (dtype) {
    case DType::F32: return 1e12 * gpu_.peak_fp32_tflops;
    case DType::FP8: return 1e12 * gpu_.peak_fp8_tflops;
    case DType::F16: return 1e12 * gpu_.peak_fp16_tflops;
    case DType::BF16: break;
  }
  return 1e12 * gpu_.peak_bf16_tflops;
}

double CostModel::tiled_seconds(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t batch, double sm_flops,
                                bool split_k) const {
  if (gpu_.sms <= 0 || m <= 0 || n <= 0 || k <= 0 || batch <= 0 || !(sm_flops > 0)) return -1;
  const double sms = gpu_.sms;
  const double fill = std::max(0, o_.gemm_fill_k);
  const double slice = std::max(1, o_.gemm_k_slice);
  const double kk = static_cast<double>(k);
  const double slices = ceil_div(k, static_cast<std::int64_t>(slice));
  double best = -1;
  for (const GemmTile& t : o_.gemm_tiles) {
    if (t.m <= 0 || t.n <= 0) continue;
    const double tile_flops = 2.0 * t.m * t.n;  // per unit of K
    // A batched or grouped GEMM is one kernel: every GEMM's tiles share the waves.
    const double tiles = static_cast<double>(batch) * ceil_div(m, t.m) * ceil_div(n, t.n);
    const double waves = std::ceil(tiles / sms);
    double seconds = waves * tile_flops * (kk + fill) / sm_flops;
    if (split_k && tiles < sms) {
      const double per_sm = std::ceil(tiles * slices / sms);  // whole slices on the busiest SM (a slice is not split)
      const double partials = 2.0 * sms * t.m * t.n * 4;      // each SM's fp32 tile, written and read back
      const double split = tile_flops * (per_sm * slice + fill) / sm_flops +
                           partials / (1e9 * gpu_.hbm_bandwidth_gbs * o_.memory_efficiency);
      seconds = std::min(seconds, split);
    }
    if (best < 0 || seconds < best) best = seconds;
  }
  return best;
}

double CostModel::gemm_efficiency(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t batch) const {
  if (gemm_asymptote_ <= 0) return 0;
  const double peak = 1e12 * gpu_.peak_bf16_tflops;
  const double t = tiled_seconds(m, n, k, batch, peak * gemm_asymptote_ / gpu_.sms, o_.gemm_split_k);
  if (t <= 0) return 0;
  return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) * static_cast<double>(batch) /
         (t * peak);
}

double CostModel::gemm_seconds(const Op& op) const {
  // The measurements are bf16 (fp16 runs the same tensor-core paths at the same peak).
  if (gemm_asymptote_ <= 0 || op.flops <= 0 || (op.dtype != DType::BF16 && op.dtype != DType::F16)) return -1;
  return tiled_seconds(op.m, op.n, op.k, op.batch, peak_flops(op.dtype) * gemm_asymptote_ / gpu_.sms, o_.gemm_split_k);
}

// An attention core's matmuls as batched GEMMs over sequences x heads, each 2·m·n·k·batch FLOPs:
// forward the scores q k^T (queries x keys over the head dim) and the values p v (queries x head dim
// over keys); backward the scores' gradient dp = do v^T and three of the values' shape (dv, dq, dk).
double CostModel::attention_gemm_seconds(const Op& op) const {
  if (gemm_asymptote_ <= 0 || op.flops <= 0 || (op.dtype != DType::BF16 && op.dtype != DType::F16)) return -1;
  const double one = 2.0 * static_cast<double>(op.m) * static_cast<double>(op.n) * static_cast<double>(op.k) *
                     static_cast<double>(op.batch);
  const double count = one > 0 ? std::round(op.flops / one) : 0;
  const double rate = peak_flops(op.dtype) * gemm_asymptote_ / gpu_.sms;
  const double scores = tiled_seconds(op.m, op.n, op.k, op.batch, rate, o_.gemm_split_k);
  const double values = tiled_seconds(op.m, op.k, op.n, op.batch, rate, o_.gemm_split_k);
  if (count < 1 || scores < 0 || values < 0) return -1;
  return scores + (count - 1) * values;
}

OpCost CostModel::cost(const Op& op, OpContext where) const {
  OpCost c = cost_unfitted(op, where);
  if (profile_ && profile_->gemm_curve_points > 0 && c.model.starts_with("gemm-curve")) {
    c.fitted = true;
    c.spread = profile_->gemm_curve_residual;
  }
  return c;
}

OpCost CostModel::cost_unfitted(const Op& op, OpContext where) const {
  if (profile_)
    if (const auto m = profile_->lookup(op, where))
      return {profile_->dispatch_gap_s() + m->seconds, m->interpolated ? "measured-interpolated" : "measured", m->spread};
  if (op.kind == OpKind::CopyD2H || op.kind == OpKind::CopyH2D)
    return {static_cast<double>(op.comm_bytes) / (1e9 * node_.pcie_bandwidth_gbs), "pcie"};
  const double bytes = static_cast<double>(op.bytes_read + op.bytes_written);
  if (op.stream == Stream::Host) return {bytes / (1e9 * o_.host_bandwidth_gbs), "host"};
  if (op.flops == 0 && bytes == 0) return {0.0, "free"};
  std::string_view model = "roofline-compute";
  double compute = 0;
  if (op.kind == OpKind::AttentionCore && op.variant == Variant::AttentionUnfused) {
    // Separate kernels one after another: the matmuls as batched GEMMs, then the softmax, masking
    // and dropout passes over the scores in device memory (the op's bytes), so the times add.
    const double curve = attention_gemm_seconds(op);
    const double gemms = curve >= 0 ? curve : op.flops / (peak_flops(op.dtype) * o_.gemm_efficiency);
    return {o_.launch_overhead_s + gemms + bytes / (1e9 * gpu_.hbm_bandwidth_gbs * o_.memory_efficiency),
            curve >= 0 ? "gemm-curve+memory" : "roofline-compute+memory"};
  }
  if (op.kind == OpKind::AttentionCore) {
    compute = op.flops / (peak_flops(op.dtype) * o_.attention_efficiency);
    // The unfused path runs its matmuls as batched GEMMs and a flash kernel tiles queries the same
    // way, so attention is never faster than they are; the flat efficiency covers the softmax and
    // masking around them, whose traffic the op's bytes leave out.
    if (const double floor = attention_gemm_seconds(op); floor > compute) {
      compute = floor;
      model = "gemm-curve";
    }
  } else if (const double curve = op.kind == OpKind::Gemm ? gemm_seconds(op) : -1; curve >= 0) {
    compute = curve;
    model = "gemm-curve";
  } else {
    compute = op.flops / (peak_flops(op.dtype) * o_.gemm_efficiency);
  }
  const double memory = bytes / (1e9 * gpu_.hbm_bandwidth_gbs * o_.memory_efficiency);
  return {o_.launch_overhead_s + std::max(compute, memory), compute >= memory ? model : "roofline-memory"};
}

}  // namespace px::sim
