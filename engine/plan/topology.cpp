// Mixed-radix rank arithmetic for process groups; the basis of every rank's binding.
#include "engine/plan/topology.hpp"

#include <cassert>

namespace px {
namespace {
enum Dim { kTp = 0, kCp = 1, kEp = 2, kEdp = 3, kPp = 4 };
constexpr std::uint8_t bit(Dim d) { return static_cast<std::uint8_t>(1u << d); }
}  // namespace

Topology::Topology(const PlanSpec& plan) {
  assert(plan.dp() % plan.ep() == 0);
  dims_ = {plan.tp(), plan.cp(), plan.ep(), plan.dp() / plan.ep(), plan.pp()};
  world_ = 1;
  for (int d : dims_) world_ *= d;
  embedding_group_ = plan.pp() > 1;
}

std::uint8_t Topology::spans(GroupKind g) const {
  switch (g) {
    case GroupKind::None: return 0;
    case GroupKind::TP: return bit(kTp);
    case GroupKind::CP: return bit(kCp);
    case GroupKind::EP: return bit(kEp);
    case GroupKind::DP: return bit(kCp) | bit(kEp) | bit(kEdp);
    case GroupKind::ExpertDP: return bit(kTp) | bit(kCp) | bit(kEdp);
    case GroupKind::PP: return bit(kPp);
    case GroupKind::Embedding: return 0;  // handled apart: two stages, not a full dimension
  }
  return 0;
}

RankCoord Topology::coord(int rank) const {
  assert(rank >= 0 && rank < world_);
  std::array<int, 5> c{};
  for (int d = 0; d < 5; ++d) {
    c[d] = rank % dims_[d];
    rank /= dims_[d];
  }
  return {c[kTp], c[kCp], c[kEp], c[kEdp], c[kPp]};
}

int Topology::rank(const RankCoord& c) const {
  const std::array<int, 5> v{c.tp, c.cp, c.ep, c.edp, c.pp};
  int r = 0;
  for (int d = 4; d >= 0; --d) r = r * dims_[d] + v[d];
  return r;
}

int Topology::size(GroupKind g) const {
  if (g == GroupKind::None) return 1;
  if (g == GroupKind::Embedding) return embedding_group_ ? 2 : 1;
  int s = 1;
  for (int d = 0; d < 5; ++d)
    if (spans(g) & (1u << d)) s *= dims_[d];
  return s;
}

int Topology::num_groups(GroupKind g) const {
  if (g == GroupKind::Embedding) return embedding_group_ ? world_ / dims_[kPp] : 0;
  return world_ / size(g);
}

int Topology::group_id(GroupKind g, int rank) const {
  const RankCoord c = coord(rank);
  const std::array<int, 5> v{c.tp, c.cp, c.ep, c.edp, c.pp};
  if (g == GroupKind::Embedding) {
    if (!embedding_group_ || (c.pp != 0 && c.pp != dims_[kPp] - 1)) return -1;
    return rank % (world_ / dims_[kPp]);  // the coordinates below pp
  }
  int id = 0;
  for (int d = 4; d >= 0; --d)
    if (!(spans(g) & (1u << d))) id = id * dims_[d] + v[d];
  return id;
}

int Topology::group_index(GroupKind g, int rank) const {
  const RankCoord c = coord(rank);
  if (g == GroupKind::Embedding) return c.pp == 0 ? 0 : 1;
  const std::array<int, 5> v{c.tp, c.cp, c.ep, c.edp, c.pp};
  int idx = 0;
  for (int d = 4; d >= 0; --d)
    if (spans(g) & (1u << d)) idx = idx * dims_[d] + v[d];
  return idx;
}

int Topology::member(GroupKind g, int group_id, int index) const {
  if (g == GroupKind::Embedding) return index == 0 ? group_id : group_id + world_ / dims_[kPp] * (dims_[kPp] - 1);
  // Decode the fixed coordinates from the id and the spanned ones from the index.
  std::array<int, 5> v{};
  int id = group_id, rest = index;
  for (int d = 0; d < 5; ++d)
    if (spans(g) & (1u << d)) {
      v[d] = rest % dims_[d];
      rest /= dims_[d];
    } else {
      v[d] = id % dims_[d];
      id /= dims_[d];
    }
  return rank({v[kTp], v[kCp], v[kEp], v[kEdp], v[kPp]});
}

// An embedding group is the first and last stage's pair, whether or not the plan ties them.
int Topology::ring_size(GroupKind g) const { return g == GroupKind::Embedding ? 2 : size(g); }

std::vector<int> Topology::members(GroupKind g, int group_id) const {
  const int n = ring_size(g);
  std::vector<int> out;
  out.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) out.push_back(member(g, group_id, i));
  return out;
}

int Topology::ring_neighbour(GroupKind g, int rank, int offset) const {
  const int n = ring_size(g);
  return member(g, group_id(g, rank), ((group_index(g, rank) + offset) % n + n) % n);
}

}  // namespace px
