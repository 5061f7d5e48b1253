// Rank grid and process groups of a plan. Rank order is tp-cp-ep-dp-pp with tp fastest, ep
// subdividing dp (Megatron-LM's RankGenerator order), so a rank is a mixed-radix number over the
// dimensions (tp, cp, ep, dp/ep, pp).
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "engine/plan/program.hpp"
#include "engine/spec/spec.hpp"

namespace px {

struct RankCoord {
  int tp = 0, cp = 0, ep = 0, edp = 0, pp = 0;
};

class Topology {
 public:
  explicit Topology(const PlanSpec& plan);

  int world_size() const { return world_; }
  int size(GroupKind g) const;       // members per group instance
  int num_groups(GroupKind g) const; // group instances
  RankCoord coord(int rank) const;
  int rank(const RankCoord& c) const;
  int dp_rank(const RankCoord& c) const { return c.ep + dims_[2] * c.edp; }

  int group_id(GroupKind g, int rank) const;       // which instance of g the rank belongs to (-1: none)
  int group_index(GroupKind g, int rank) const;    // the rank's position inside that instance
  std::vector<int> members(GroupKind g, int group_id) const;
  int member(GroupKind g, int group_id, int index) const;  // members(g, group_id)[index]
  // The member `offset` places further round the rank's ring in group g (pipeline/CP neighbours).
  int ring_neighbour(GroupKind g, int rank, int offset) const;

 private:
  std::uint8_t spans(GroupKind g) const;  // bit mask over dims_
  int ring_size(GroupKind g) const;       // entries of members(g, id)
  std::array<int, 5> dims_{};             // tp, cp, ep, dp/ep, pp
  int world_ = 1;
  bool embedding_group_ = false;
};

// Everything a rank needs besides its role's program: which program, and its group instances.
struct RankBinding {
  std::int32_t role = 0;  // index into CompiledPlan::roles (the pipeline stage)
  std::array<std::int32_t, kNumGroupKinds> group{};  // group instance id per GroupKind, -1: none
};

}  // namespace px
