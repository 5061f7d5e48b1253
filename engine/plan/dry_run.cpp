// Event-driven dry run over all ranks. Deterministic: events are ordered by (time, rank, op).
#include "engine/plan/dry_run.hpp"

#include <algorithm>
#include <cassert>
#include <functional>
#include <fmt/format.h>
#include <map>
#include <queue>
#include <tuple>

namespace px {
namespace {

// Per-role facts the run needs for every rank of that role.
struct RoleIndex {
  std::vector<std::vector<std::uint32_t>> successors;  // explicit dependents and the stream's next op
  std::vector<std::uint32_t> preds;                    // explicit deps + stream predecessor
  std::vector<std::uint32_t> seq;  // collectives: index among the role's ops on the same group kind;
                                   // send/recv: index among the role's ops on the same stream
};

// A comm op's NCCL communicator on its rank (DryRunOptions::nccl_order): the group's, or for
// pipeline messages the channel of their direction.
int nccl_queue(const Op& op) {
  int channel = 0;
  if (op.kind == OpKind::Send) channel = op.peer > 0 ? 1 : 2;  // activations to the next, gradients to the previous
  if (op.kind == OpKind::Recv) channel = op.peer < 0 ? 3 : 4;  // activations from the previous, gradients from the next
  return static_cast<int>(op.group) * 5 + channel;
}

RoleIndex index_role(const Program& prog, bool in_order_issue, bool nccl_order) {
  RoleIndex ix;
  const std::size_t n = prog.ops.size();
  ix.successors.resize(n);
  ix.preds.assign(n, 0);
  ix.seq.assign(n, 0);
  std::array<std::int64_t, kNumStreams> last_on_stream;
  last_on_stream.fill(-1);
  std::array<std::uint32_t, kNumGroupKinds> coll_count{};
  std::array<std::uint32_t, kNumStreams> stream_count{};
  std::int64_t last_device = -1;  // nccl_order: the device stream's last op so far
  std::map<int, std::int64_t> last_on_queue;
  const auto edge = [&](std::int64_t from, std::uint32_t to) {
    if (from < 0) return;
    ix.successors[static_cast<std::size_t>(from)].push_back(to);
    ++ix.preds[to];
  };
  for (std::uint32_t i = 0; i < n; ++i) {
    const Op& op = prog.ops[i];
    if (nccl_order) {
      edge(last_device, i);
      if (is_comm(op.kind)) {
        auto [at, fresh] = last_on_queue.try_emplace(nccl_queue(op), -1);
        edge(at->second, i);
        at->second = i;
      } else {
        last_device = i;
      }
    } else {
      auto& prev = last_on_stream[static_cast<std::size_t>(op.stream)];
      edge(prev, i);
      prev = i;
    }
    for (auto d : prog.deps_of(op)) {
      ix.successors[d].push_back(i);
      ++ix.preds[i];
    }
    // In-order issue: op i waits for op i-1 to be issued (a comm op) or to finish (anything else);
    // comm ops release their successor when posted, in the run loop, not through this list.
    if (in_order_issue && i > 0) {
      if (!is_comm(prog.ops[i - 1].kind)) ix.successors[i - 1].push_back(i);
      ++ix.preds[i];
    }
    if (is_collective(op.kind)) ix.seq[i] = coll_count[static_cast<std::size_t>(op.group)]++;
    if (op.kind == OpKind::Send || op.kind == OpKind::Recv) ix.seq[i] = stream_count[static_cast<std::size_t>(op.stream)]++;
  }
  return ix;
}

struct Waiting {
  int arrived = 0;
  double ready = 0;
  std::vector<std::pair<int, std::uint32_t>> members;  // (rank, op)
};

}  // namespace

DryRunResult dry_run(const CompiledPlan& plan, const DryRunOptions& options) {
  DryRunResult result;
  const Topology& topo = plan.topology;
  const int world = topo.world_size();
  const int p = plan.plan.pp();
  std::vector<RoleIndex> roles;
  for (const auto& prog : plan.roles) roles.push_back(index_role(prog, options.in_order_issue, options.nccl_order));

  struct RankState {
    std::vector<std::uint32_t> pending;
    std::vector<double> ready;
    std::vector<std::uint8_t> done, started;
    std::vector<OpTiming> times;
  };
  std::vector<RankState> ranks(static_cast<std::size_t>(world));
  using Event = std::tuple<double, int, std::uint32_t>;
  std::priority_queue<Event, std::vector<Event>, std::greater<>> events;
  std::map<std::tuple<int, int, std::uint32_t>, Waiting> collectives;        // (group kind, instance, seq)
  std::map<std::tuple<int, int, int, std::uint32_t>, Waiting> messages;     // (src, dst, direction, seq)
  std::string error;

  auto cost = [&](int rank, std::uint32_t op) {
    if (!options.cost) return 0.0;
    const Program& prog = plan.program_of(rank);
    return options.cost(prog, prog.ops[op]);
  };
  auto describe = [&](int rank, std::uint32_t op) {
    const Program& prog = plan.program_of(rank);
    const Op& o = prog.ops[op];
    return fmt::format("rank {} op {} '{}' ({} on {}, {} B, micro-batch {}, chunk {})", rank, op, prog.name_of(o),
                       to_string(o.kind), to_string(o.group), o.comm_bytes, o.micro_batch, o.chunk);
  };
  auto finish_at = [&](int rank, std::uint32_t op, double start, double end) {
    auto& st = ranks[static_cast<std::size_t>(rank)];
    st.times[op] = {start, end};
    events.emplace(end, rank, op);
  };

  std::function<void(int, std::uint32_t)> start;
  // A predecessor of `succ` is done (or, for in-order issue, was posted) at time t.
  auto release = [&](int rank, std::uint32_t succ, double t) {
    auto& st = ranks[static_cast<std::size_t>(rank)];
    st.ready[succ] = std::max(st.ready[succ], t);
    if (--st.pending[succ] == 0) start(rank, succ);
  };
  start = [&](int rank, std::uint32_t op_idx) {
    const Program& prog = plan.program_of(rank);
    const RoleIndex& ix = roles[static_cast<std::size_t>(plan.ranks[static_cast<std::size_t>(rank)].role)];
    const Op& op = prog.ops[op_idx];
    const double ready = ranks[static_cast<std::size_t>(rank)].ready[op_idx];
    assert(!ranks[static_cast<std::size_t>(rank)].started[op_idx]);
    ranks[static_cast<std::size_t>(rank)].started[op_idx] = 1;
    if (options.in_order_issue && is_comm(op.kind) && op_idx + 1 < prog.ops.size()) release(rank, op_idx + 1, ready);
    if (is_collective(op.kind)) {
      const int gk = static_cast<int>(op.group);
      const int instance = plan.ranks[static_cast<std::size_t>(rank)].group[static_cast<std::size_t>(gk)];
      assert(instance >= 0);
      Waiting& w = collectives[{gk, instance, ix.seq[op_idx]}];
      if (!w.members.empty()) {
        const auto [r0, o0] = w.members.front();
        const Op& first = plan.program_of(r0).ops[o0];
        if ((first.kind != op.kind || first.comm_bytes != op.comm_bytes) && error.empty())
          error = fmt::format("collective mismatch on {} group {}: {} vs {}", to_string(op.group), instance,
                              describe(r0, o0), describe(rank, op_idx));
      }
      w.members.emplace_back(rank, op_idx);
      w.ready = std::max(w.ready, ready);
      if (++w.arrived == topo.size(op.group)) {
        const double c = cost(rank, op_idx);
        for (auto [r, o] : w.members) finish_at(r, o, w.ready, w.ready + c);
      }
      return;
    }
    if (op.kind == OpKind::Send || op.kind == OpKind::Recv) {
      const int me = rank;
      const int other = topo.ring_neighbour(op.group, rank, op.peer);
      // Forward traffic goes to the next stage, backward traffic to the previous one.
      const bool forward = (op.kind == OpKind::Send) == (op.peer > 0);
      const int src = op.kind == OpKind::Send ? me : other;
      const int dst = op.kind == OpKind::Send ? other : me;
      Waiting& w = messages[{src, dst, forward ? 0 : 1, ix.seq[op_idx]}];
      w.members.emplace_back(rank, op_idx);
      w.ready = std::max(w.ready, ready);
      if (++w.arrived == 2) {
        auto [ra, oa] = w.members[0];
        auto [rb, ob] = w.members[1];
        const Op& a = plan.program_of(ra).ops[oa];
        const Op& b = plan.program_of(rb).ops[ob];
        const Op& send = a.kind == OpKind::Send ? a : b;
        const Op& recv = a.kind == OpKind::Send ? b : a;
        const int send_rank = a.kind == OpKind::Send ? ra : rb;
        const int recv_rank = a.kind == OpKind::Send ? rb : ra;
        const int recv_stage = topo.coord(recv_rank).pp;
        const int chunk_shift = forward ? (recv_stage == 0 ? 1 : 0) : (recv_stage == p - 1 ? -1 : 0);
        if ((send.kind == recv.kind || send.micro_batch != recv.micro_batch ||
             static_cast<int>(recv.chunk) != static_cast<int>(send.chunk) + chunk_shift || send.comm_bytes != recv.comm_bytes) &&
            error.empty())
          error = fmt::format("send/recv mismatch: {} matched {}", describe(send_rank, a.kind == OpKind::Send ? oa : ob),
                              describe(recv_rank, a.kind == OpKind::Send ? ob : oa));
        const double c = cost(ra, oa);
        finish_at(ra, oa, w.ready, w.ready + c);
        finish_at(rb, ob, w.ready, w.ready + c);
      }
      return;
    }
    finish_at(rank, op_idx, ready, ready + cost(rank, op_idx));
  };

  for (int r = 0; r < world; ++r) {
    const RoleIndex& ix = roles[static_cast<std::size_t>(plan.ranks[static_cast<std::size_t>(r)].role)];
    auto& st = ranks[static_cast<std::size_t>(r)];
    st.pending = ix.preds;
    st.ready.assign(ix.preds.size(), 0.0);
    st.done.assign(ix.preds.size(), 0);
    st.started.assign(ix.preds.size(), 0);
    st.times.assign(ix.preds.size(), {});
  }
  for (int r = 0; r < world; ++r)
    for (std::uint32_t i = 0; i < ranks[static_cast<std::size_t>(r)].pending.size(); ++i)
      // An op may already have been started by an in-order release during this loop.
      if (ranks[static_cast<std::size_t>(r)].pending[i] == 0 && !ranks[static_cast<std::size_t>(r)].started[i]) start(r, i);

  while (!events.empty()) {
    const auto [t, r, op] = events.top();
    events.pop();
    auto& st = ranks[static_cast<std::size_t>(r)];
    st.done[op] = 1;
    result.makespan = std::max(result.makespan, t);
    const RoleIndex& ix = roles[static_cast<std::size_t>(plan.ranks[static_cast<std::size_t>(r)].role)];
    for (auto s : ix.successors[op]) release(r, s, t);
  }

  result.compute_busy.assign(static_cast<std::size_t>(world), 0.0);
  int stuck = 0;
  std::string stuck_list;
  for (int r = 0; r < world; ++r) {
    const auto& st = ranks[static_cast<std::size_t>(r)];
    const Program& prog = plan.program_of(r);
    // A stuck rank is described by the first op it waits in (started, never matched) and the
    // first op it could not start.
    std::int64_t waits_in = -1, blocked_at = -1;
    for (std::uint32_t i = 0; i < st.done.size(); ++i) {
      if (st.done[i]) {
        if (prog.ops[i].stream == Stream::Compute) result.compute_busy[static_cast<std::size_t>(r)] += st.times[i].end - st.times[i].start;
        continue;
      }
      if (st.started[i] && waits_in < 0) waits_in = i;
      if (!st.started[i] && blocked_at < 0) blocked_at = i;
    }
    if (waits_in >= 0 || blocked_at >= 0) {
      if (stuck < 3) {
        stuck_list += stuck ? "; " : "";
        if (waits_in >= 0) stuck_list += "waits in " + describe(r, static_cast<std::uint32_t>(waits_in));
        if (blocked_at >= 0) stuck_list += std::string(waits_in >= 0 ? ", " : "") + "cannot start " + describe(r, static_cast<std::uint32_t>(blocked_at));
      }
      ++stuck;
    }
  }
  if (error.empty() && stuck > 0) error = fmt::format("deadlock: {} ranks cannot finish; first stuck: {}", stuck, stuck_list);
  result.error = error;
  result.ok = error.empty();
  if (options.record_timings)
    for (auto& st : ranks) result.timings.push_back(std::move(st.times));
  return result;
}

}  // namespace px
