// Aggregates a compiled plan per role; the memory plan of each role is computed here.
#include "engine/plan/plan_summary.hpp"

#include <algorithm>

namespace px {

PlanSummary summarize(const CompiledPlan& plan) {
  PlanSummary s;
  s.world_size = plan.topology.world_size();
  s.micro_batches = plan.num_micro_batches;
  const double p = plan.plan.pp(), m = plan.num_micro_batches, v = plan.plan.vp();
  // Narayanan et al. 2021: bubble / ideal = (p-1)/m, divided by v when interleaved; as a fraction
  // of the whole iteration (p-1)/v / (m + (p-1)/v). Zero-bubble's depends on pass times.
  s.ideal_bubble_fraction = (p - 1) / v / (m + (p - 1) / v);
  std::vector<std::int64_t> per_role(plan.roles.size(), 0);
  for (const auto& b : plan.ranks) ++per_role[static_cast<std::size_t>(b.role)];
  for (std::size_t r = 0; r < plan.roles.size(); ++r) {
    const Program& prog = plan.roles[r];
    RoleSummary rs;
    rs.stage = prog.pp_stage;
    rs.ranks = per_role[r];
    rs.ops = static_cast<std::int64_t>(prog.ops.size());
    rs.tensors = static_cast<std::int64_t>(prog.tensors.size());
    for (const Op& op : prog.ops) {
      rs.flops += op.flops;
      rs.vector_flops += op.vector_flops;
      if (is_comm(op.kind)) {
        auto& c = rs.comm[static_cast<std::size_t>(op.group)];
        ++c.ops;
        c.bytes += op.comm_bytes;
      }
    }
    for (int c = 0; c < plan.plan.vp(); ++c) rs.chunks.push_back(chunk_layers(plan.model, plan.plan, rs.stage, c));
    for (const auto& pass : plan.schedules[r]) {
      rs.forward_passes += pass.kind == PassKind::F;
      rs.backward_passes += pass.kind == PassKind::B;
      rs.weight_passes += pass.kind == PassKind::W;
    }
    rs.max_in_flight = max_in_flight(plan.schedules[r]);
    rs.memory = plan_memory(prog);
    s.total_flops += rs.flops * static_cast<double>(rs.ranks);
    s.roles.push_back(std::move(rs));
  }
  return s;
}

nlohmann::json plan_to_json(const PlanSpec& p) {
  return {{"tensor_model_parallel_size", p.tp()},
          {"pipeline_model_parallel_size", p.pp()},
          {"context_parallel_size", p.cp()},
          {"expert_model_parallel_size", p.ep()},
          {"data_parallel_size", p.dp()},
          {"micro_batch_size", p.micro_batch_size},
          {"global_batch_size", p.global_batch_size},
          {"num_micro_batches", p.num_micro_batches()},
          {"virtual_pipeline_model_parallel_size", p.vp()},
          {"seq_length", p.seq_length},
          {"zero_stage", p.zero_stage},
          {"pipeline_schedule", std::string(to_string(p.schedule))},
          {"recompute", std::string(to_string(p.recompute))},
          {"sequence_parallel", p.sequence_parallel},
          {"optimizer_offload", p.optimizer_offload},
          {"overlap_param_gather", p.overlap_param_gather},
          {"tp_comm_overlap", p.tp_comm_overlap},
          {"use_flash_attn", p.use_flash_attn},
          {"precision", std::string(to_string(p.precision))},
          {"grad_dtype", std::string(to_string(p.grad_dtype))},
          {"world_size", p.world_size()}};
}

}  // namespace px
