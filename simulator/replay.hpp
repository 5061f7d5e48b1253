// Replay of a compiled plan on a simulated cluster: every rank's op program runs on its GPU host
// of a SimGrid platform, one actor per stream, with compute ops costed by the cost model and
// every comm op decomposed into the flows its algorithm sends (ring all-reduce, reduce-scatter
// and all-gather, direct all-to-all, point-to-point), which share the platform's links, so
// contention is simulated, not assumed. Same inputs, same output, bit for bit.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/plan/compiler.hpp"
#include "engine/plan/dry_run.hpp"
#include "simulator/calibration.hpp"
#include "simulator/cost_model.hpp"
#include "simulator/platform.hpp"

namespace px::sim {

// All-reduce algorithm: NCCL's ring and tree, and the hierarchical one (reduce-scatter inside each
// node, all-reduce across nodes, all-gather inside each node) for groups with several members on
// each of several nodes. Auto picks, per call, whichever the uncontended closed form says is
// fastest for that size and group, as NCCL's tuner does.
enum class AllReduceAlgorithm { Auto, Ring, Tree, Hierarchical };

struct SimOptions {
  AllReduceAlgorithm all_reduce = AllReduceAlgorithm::Auto;
  CostModelOptions cost;
  // Replaces the cost model for compute and memory ops when set (closed-form tests; calibration
  // profiles plug in here).
  std::function<double(const Program&, const Op&)> op_cost;
  std::vector<int> traced_ranks;  // ranks whose per-op timings come back (for traces); empty: rank 0
  // Collectives of a group that alone uses its nodes' NVLink take their closed form instead of
  // flow-by-flow simulation (exact when nothing else can share those links; see replay.cpp).
  bool closed_form_exclusive_groups = true;
  // What-if: rank -> factor its compute and memory ops take longer by (a straggling or throttled
  // GPU); ranks not listed run at 1.
  std::map<int, double> slowdown;
  // What-if: degraded, upgraded or failed links (platform.hpp).
  std::vector<LinkChange> links;
  // The CPU engine's executor: one host thread issues a rank's ops in program order, a compute op
  // running to completion before the next is issued, a comm op only posted (GPUs issue each
  // stream independently instead).
  bool in_order_issue = false;
  // Folded replay: only data-parallel replica 0 runs; the replicas' gradient collectives cost
  // their ring closed form over the fabric path between replicas (every replica is assumed to
  // arrive at once, as identical replicas do). Where tensor-parallel collectives take their closed
  // form (the group alone on its nodes' NVLink) and no rank is slowed, only tensor-parallel
  // member 0 runs too: its peers' programs and times are the same. Needs cp = ep = 1.
  bool fold_data_parallel = false;
  // Verbatim replay of a recorded iteration at its own scale (recorded_iterations in
  // calibration.hpp): every compute and memory op of every rank costs its own recorded duration
  // ([rank][op]), and with in-order issue the host thread spends each comm op's recorded time in it.
  std::vector<std::vector<double>> recorded;
  std::vector<std::vector<double>> recorded_host;
  // Measured op costs (parallax calibrate); ops it lacks fall back to the roofline.
  std::optional<CalibrationProfile> profile;
};

// Where the slowest rank's iteration went: its compute stream busy, waiting for communication the
// compute depends on, waiting for pipeline neighbours (the bubble), and any other wait.
struct Breakdown {
  double compute_s = 0;
  double exposed_comm_s = 0;
  double bubble_s = 0;
  double other_s = 0;
};

// One transformer layer's forward and backward pass as the slowest rank ran them, what a timer
// around a layer's forward or backward measures: per (layer, micro-batch), the span from the first
// to the last of its ops on the compute and tensor-parallel streams (its exposed collectives
// count), averaged over the rank's layers and micro-batches. The backward's span takes in the
// layer's recompute and, under zero-bubble schedules, its deferred weight gradients wherever they
// ran. Zero for a rank without transformer layers.
struct LayerTimes {
  double forward_s = 0;
  double backward_s = 0;
};

struct SimResult {
  double iteration_s = 0;          // first op's start to last op's end, slowest rank
  int slowest_rank = 0;
  Breakdown breakdown;             // of the slowest rank
  LayerTimes layer;                // of the slowest rank
  double tokens_per_s = 0;         // global batch tokens / iteration
  double mfu = 0;                  // model FLOPs / (iteration · ranks · dense bf16 peak)
  std::vector<double> rank_end_s;  // per rank, when its last op ended (0 for folded ranks)
  std::vector<int> traced_ranks;
  std::vector<std::vector<OpTiming>> timings;  // per traced rank, per op
  std::int64_t flows = 0;          // network transfers simulated
  // Of the slowest rank's compute-stream time: the share costed from measurements, and their
  // time-weighted relative spread (the error band those costs carry; roofline costs carry their
  // stated efficiencies instead).
  double measured_fraction = 0;
  double measured_spread = 0;
  // Of that measured share, what was interpolated from other sizes of the same kind of op.
  double interpolated_fraction = 0;
  // The same time by the cost model that produced it ("measured", "gemm-curve", ...; "recorded"
  // in a verbatim replay): shares that sum to 1.
  std::map<std::string, double> cost_models;
  // Relative half-width of the prediction's error band: each compute cost's own uncertainty
  // (a measured op's spread, a roofline op's stated uncertainty), weighted by its share of the
  // slowest rank's compute. Network flows are exact for their model and add none.
  double error_band = 0;
  nlohmann::json to_json() const;
};

// Runs the replay in a child process (SimGrid keeps one engine per process) and returns its
// result. Throws px::Error when the plan needs more GPUs than the cluster has or the replay fails.
SimResult simulate(const CompiledPlan& plan, const ClusterSpec& cluster, const SimOptions& options = {});

}  // namespace px::sim
