// The replay: per rank and stream an actor walks the stream's ops in program order, waits for the
// ops (on other streams) each depends on, sleeps for a compute op's cost, and for a comm op sends
// and receives the flows of its algorithm through SimGrid mailboxes, so every flow crosses the
// links between its hosts and shares them with whatever else is in flight.
#include "simulator/replay.hpp"

#include <malloc.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <tuple>
#include <unordered_map>
#include <fmt/format.h>
#include <simgrid/s4u.hpp>

#include "engine/core/error.hpp"
#include "engine/spec/model_math.hpp"
#include "simulator/platform.hpp"

namespace px::sim {
namespace {

namespace s4u = simgrid::s4u;

// Resumes every actor in `waiting` and empties it. Resuming is a SimGrid call, during which other
// actors run and may start waiting again, so the list is taken aside first; its storage comes
// back when nobody joined meanwhile, so steady state allocates nothing.
void resume_all(std::vector<s4u::ActorPtr>& waiting) {
  std::vector<s4u::ActorPtr> w;
  w.swap(waiting);
  for (auto& a : w) a->resume();
  w.clear();
  if (waiting.empty()) waiting.swap(w);
}

// How a lockstep unit (below) waits for its members' other streams: on a condition variable with a
// timeout, since it may also have a result to publish at a set time.
struct UnitSignal {
  s4u::MutexPtr mutex = s4u::Mutex::create();
  s4u::ConditionVariablePtr cv = s4u::ConditionVariable::create();
  bool waiting = false;
};

// SimGrid runs one actor at a time and switches only inside its calls, so a rank's streams share
// this state without locks; a stream that must wait suspends itself and is resumed by the stream
// that changes what it waits for (a mutex and condition variable cost several context switches
// per op, most of a large replay's time).
struct RankState {
  std::vector<char> done;
  std::uint32_t issue = 0;  // in-order issue: the next op the host thread may issue
  std::vector<OpTiming> timing;
  // Streams suspended until an op is done (or, in-order issue, until it may be issued); a change
  // resumes only the streams it lets go on.
  struct Waiter {
    s4u::ActorPtr actor;
    std::uint32_t op;
    bool for_issue;
  };
  std::vector<Waiter> waiting, resuming;
  UnitSignal* unit = nullptr;  // the lockstep unit running this rank's compute streams
  // In-order issue: the ops the host thread runs back to back now, run_first..run_last in program
  // order, until run_end. Between two of them it tests its posted communication, and only then
  // (or while it waits) does MPI move that communication on.
  std::uint32_t run_first = 0, run_last = 0;
  double run_end = -1;

  // The first moment at or after t when the host thread can progress communication.
  double next_progress(double t) const {
    if (run_end <= t) return t;
    for (std::uint32_t i = run_first; i <= run_last; ++i)
      if (timing[i].end >= t) return timing[i].end;
    return run_end;
  }

  void wait_done(std::uint32_t op) { wait(op, false); }
  void wait_issue(std::uint32_t op) { wait(op, true); }
  void wake() {
    if (!waiting.empty()) {
      // Resuming is a SimGrid call during which others run and may start waiting: the ones to
      // resume are taken aside first.
      std::vector<Waiter> go;
      go.swap(resuming);
      go.clear();
      std::erase_if(waiting, [&](const Waiter& w) {
        if (!ready(w)) return false;
        go.push_back(w);
        return true;
      });
      for (const Waiter& w : go) w.actor->resume();
      if (resuming.empty()) resuming.swap(go);
    }
    if (unit != nullptr && unit->waiting) unit->cv->notify_one();
  }

 private:
  bool ready(const Waiter& w) const { return w.for_issue ? issue == w.op : done[w.op] != 0; }
  void wait(std::uint32_t op, bool for_issue) {
    while (!ready({nullptr, op, for_issue})) {
      waiting.push_back({s4u::Actor::self(), op, for_issue});
      s4u::this_actor::suspend();
    }
  }
};

int token = 0;  // the payload of every simulated message: only its size matters

// What the replay keeps per process-group instance, built on first use: its members, each member's
// path to the next one round the ring, a barrier, and its mailboxes. Collectives of one instance
// run in the same order on every member and each transfer ends before its sender posts the next,
// so one mailbox per member and purpose serves them all in FIFO order. (A ring's and a tree's
// messages must not share one: a tree has no barrier, so a member's tree message can reach a
// neighbour still waiting for the previous ring's.)
enum MailboxPurpose { kRing, kTreeUp, kTreeDown, kLocalRing, kCrossRing, kPurposes };
struct GroupState {
  std::string name;          // e.g. "dp 3"
  std::vector<int> members;  // ranks
  std::vector<Path> hops;    // member i -> member i + 1
  std::vector<s4u::Mailbox*> boxes;       // [member][MailboxPurpose]
  std::vector<s4u::Mailbox*> pair_boxes;  // [from][to]: direct all-to-all
  int arrived = 0;
  std::vector<s4u::ActorPtr> waiting;
  // The ring's slowest hop (highest latency, lowest bandwidth): what every member's closed forms
  // use, so all members choose the same algorithm.
  Path worst;
  // Hierarchical layout, when every node holds the same number L > 1 of members and there are
  // N > 1 nodes: member i's next member on its node and its next across nodes at its local index.
  bool hierarchical = false;
  int local_size = 1, nodes = 1;
  std::vector<int> local_next, cross_next;
  Path local_worst, cross_worst;

  void layout(const Platform& platform) {
    if (!hops.empty()) return;
    const std::size_t n = members.size();
    for (std::size_t i = 0; i < n; ++i) hops.push_back(platform.path(members[i], members[(i + 1) % n]));
    worst = slowest(hops);
    std::map<int, std::vector<int>> by_node;  // node -> member indices, in group order
    for (std::size_t i = 0; i < n; ++i) by_node[platform.node_of(members[i])].push_back(static_cast<int>(i));
    local_size = static_cast<int>(by_node.begin()->second.size());
    nodes = static_cast<int>(by_node.size());
    hierarchical = local_size > 1 && nodes > 1 &&
                   std::all_of(by_node.begin(), by_node.end(), [&](const auto& kv) { return static_cast<int>(kv.second.size()) == local_size; });
    if (!hierarchical) return;
    local_next.assign(n, 0);
    cross_next.assign(n, 0);
    std::vector<std::vector<int>> columns(static_cast<std::size_t>(local_size));  // per local index, one member per node
    for (const auto& [node, local] : by_node)
      for (std::size_t l = 0; l < local.size(); ++l) {
        local_next[static_cast<std::size_t>(local[l])] = local[(l + 1) % local.size()];
        columns[l].push_back(local[l]);
      }
    std::vector<Path> local_hops, cross_hops;
    for (const auto& col : columns)
      for (std::size_t k = 0; k < col.size(); ++k) cross_next[static_cast<std::size_t>(col[k])] = col[(k + 1) % col.size()];
    for (std::size_t i = 0; i < n; ++i) {
      local_hops.push_back(platform.path(members[i], members[static_cast<std::size_t>(local_next[i])]));
      cross_hops.push_back(platform.path(members[i], members[static_cast<std::size_t>(cross_next[i])]));
    }
    local_worst = slowest(local_hops);
    cross_worst = slowest(cross_hops);
  }
  static Path slowest(const std::vector<Path>& paths) {
    Path w{{}, 0, paths.front().bottleneck_bytes_per_s};
    for (const Path& p : paths) {
      w.latency_s = std::max(w.latency_s, p.latency_s);
      w.bottleneck_bytes_per_s = std::min(w.bottleneck_bytes_per_s, p.bottleneck_bytes_per_s);
    }
    return w;
  }

  // Mailbox::by_name is a simcall, so other members' actors run while the table fills: it is built
  // aside and published whole.
  s4u::Mailbox* box(int member, int purpose) {
    if (boxes.empty()) {
      std::vector<s4u::Mailbox*> b;
      for (std::size_t i = 0; i < members.size(); ++i)
        for (int k = 0; k < kPurposes; ++k) b.push_back(s4u::Mailbox::by_name(fmt::format("{} m{} {}", name, i, k)));
      boxes = std::move(b);
    }
    return boxes[static_cast<std::size_t>(kPurposes * member + purpose)];
  }
  s4u::Mailbox* pair_box(int from, int to) {
    const std::size_t n = members.size();
    if (pair_boxes.empty()) {
      std::vector<s4u::Mailbox*> b;
      for (std::size_t i = 0; i < n * n; ++i) b.push_back(s4u::Mailbox::by_name(fmt::format("{} {}>{}", name, i / n, i % n)));
      pair_boxes = std::move(b);
    }
    return pair_boxes[static_cast<std::size_t>(from) * n + static_cast<std::size_t>(to)];
  }
  // Returns once every member has arrived. Actors switch only inside SimGrid calls, so the count
  // needs no lock; s4u::Barrier would cost a mutex and a condition variable's switches per member.
  void arrive() {
    if (++arrived < static_cast<int>(members.size())) {
      waiting.push_back(s4u::Actor::self());
      s4u::this_actor::suspend();
      return;
    }
    arrived = 0;
    resume_all(waiting);
  }
};

class Replay {
 public:
  Replay(const CompiledPlan& plan, const ClusterSpec& cluster, const SimOptions& options)
      : plan_(plan),
        cost_(cluster.gpu, cluster.node, options.cost, options.profile ? &*options.profile : nullptr),
        op_cost_(options.op_cost),
        recorded_(options.recorded),
        recorded_host_(options.recorded_host),
        slowdown_(options.slowdown),
        closed_form_(options.closed_form_exclusive_groups),
        in_order_(options.in_order_issue),
        profile_(options.profile ? &*options.profile : nullptr),
        fold_(options.fold_data_parallel),
        all_reduce_(options.all_reduce),
        ranks_(static_cast<std::size_t>(plan.topology.world_size())) {
    for (const Program& p : plan.roles) {
      std::vector<char> watched(p.ops.size(), 0), outside(p.ops.size(), 0);
      for (const Op& op : p.ops)
        for (auto d : p.deps_of(op)) {
          watched[d] = 1;
          if (!in_unit(op.stream)) outside[d] = 1;
        }
      watched_.push_back(std::move(watched));
      watched_outside_unit_.push_back(std::move(outside));
    }
    // Every rank of a role runs the same ops, which cost the same wherever they run (unless a
    // profile tells context-parallel blocks apart, or each rank has its own recording): worked
    // out once per role instead of once per rank, micro-batch and op.
    if (recorded_.empty() && (!profile_ || plan.plan.cp() == 1))
      for (const Program& p : plan.roles) {
        std::vector<double> c(p.ops.size(), 0.0);
        for (std::size_t i = 0; i < p.ops.size(); ++i)
          if (!is_comm(p.ops[i].kind)) c[i] = op_cost_ ? op_cost_(p, p.ops[i]) : cost_.cost(p.ops[i]).seconds;
        role_costs_.push_back(std::move(c));
      }
  }

  // Folded: data-parallel replica 0 only, and of each tensor-parallel group only member 0 when the
  // group's collectives take their closed form (its members then run identical programs at
  // identical times: nothing tells them apart).
  bool replayed(int rank) const {
    const RankCoord c = plan_.topology.coord(rank);
    return (!fold_ || plan_.topology.dp_rank(c) == 0) && (!fold_tp_ || c.tp == 0);
  }

  // A group kind whose every instance lies inside one node, while no other group shares a node's
  // GPUs, owns those GPUs' NVLink links: its collectives cannot contend, so they cost their closed
  // form (after all members arrive) instead of being simulated flow by flow — the bulk of a large
  // plan's flows, since tensor parallelism lives inside the NVSwitch domain.
  void find_exclusive_groups(const Platform& platform) {
    const Topology& topo = plan_.topology;
    std::array<bool, kNumGroupKinds> used{}, intra{}, contained{};
    contained.fill(true);
    for (const Program& p : plan_.roles)
      for (const Op& op : p.ops)
        if (is_comm(op.kind)) used[static_cast<std::size_t>(op.group)] = true;
    for (int g = 1; g < kNumGroupKinds; ++g) {
      const auto kind = static_cast<GroupKind>(g);
      if (topo.size(kind) < 2 || !used[static_cast<std::size_t>(g)]) continue;
      for (int id = 0; id < topo.num_groups(kind); ++id) {
        const std::vector<int> m = topo.members(kind, id);
        std::vector<int> nodes;
        for (int r : m) nodes.push_back(platform.node_of(r));
        std::sort(nodes.begin(), nodes.end());
        intra[static_cast<std::size_t>(g)] = intra[static_cast<std::size_t>(g)] || std::adjacent_find(nodes.begin(), nodes.end()) != nodes.end();
        contained[static_cast<std::size_t>(g)] = contained[static_cast<std::size_t>(g)] && nodes.front() == nodes.back();
      }
    }
    const auto users = std::count(intra.begin(), intra.end(), true);
    for (int g = 1; g < kNumGroupKinds; ++g)
      exclusive_[static_cast<std::size_t>(g)] =
          closed_form_ && users == 1 && intra[static_cast<std::size_t>(g)] && contained[static_cast<std::size_t>(g)];
    platform_ = &platform;
    fold_tp_ = fold_ && exclusive_[static_cast<std::size_t>(GroupKind::TP)] && slowdown_.empty();
    // Lockstep units: when the compute streams' only collectives are an exclusive group's, each
    // instance of that group runs its members' compute streams in one actor (run_unit).
    unit_kind_.reset();
    for (int g = 1; g < kNumGroupKinds && !in_order_; ++g) {
      if (!exclusive_[static_cast<std::size_t>(g)]) continue;
      bool only = true;
      for (const Program& p : plan_.roles)
        for (const Op& op : p.ops)
          only = only && !(in_unit(op.stream) && is_comm(op.kind) && op.group != static_cast<GroupKind>(g));
      if (only) unit_kind_ = static_cast<GroupKind>(g);
    }
  }

  void start(const Platform& platform) {
    find_exclusive_groups(platform);
    for (int r = 0; r < plan_.topology.world_size(); ++r) {
      if (!replayed(r)) continue;
      const Program& prog = plan_.program_of(r);
      ranks_[static_cast<std::size_t>(r)].done.assign(prog.ops.size(), 0);
      ranks_[static_cast<std::size_t>(r)].timing.assign(prog.ops.size(), {});
    }
    if (unit_kind_) {
      const Topology& topo = plan_.topology;
      for (int id = 0; id < topo.num_groups(*unit_kind_); ++id) {
        std::vector<int> members;
        for (int r : topo.members(*unit_kind_, id))
          if (replayed(r)) members.push_back(r);
        if (members.empty()) continue;
        auto& u = units_.emplace_back(std::make_unique<Unit>());
        u->id = id;
        u->ranks = members;
        for (int r : members) ranks_[static_cast<std::size_t>(r)].unit = &u->signal;
        s4u::Actor::create(fmt::format("unit {} {}", to_string(*unit_kind_), id), platform.gpu(members.front()),
                           [this, unit = u.get()] { run_unit(*unit); });
      }
    }
    for (int r = 0; r < plan_.topology.world_size(); ++r) {
      if (!replayed(r)) continue;
      const Program& prog = plan_.program_of(r);
      std::array<std::vector<std::uint32_t>, kNumStreams> streams;
      for (std::uint32_t i = 0; i < prog.ops.size(); ++i) streams[static_cast<std::size_t>(prog.ops[i].stream)].push_back(i);
      for (int s = 0; s < kNumStreams; ++s) {
        if (streams[static_cast<std::size_t>(s)].empty() || (unit_kind_ && in_unit(static_cast<Stream>(s)))) continue;
        s4u::Actor::create(fmt::format("rank{}-{}", r, to_string(static_cast<Stream>(s))), platform.gpu(r),
                           [this, r, ops = std::move(streams[static_cast<std::size_t>(s)])] { run_stream(r, ops); });
      }
    }
  }

  const std::vector<RankState>& ranks() const { return ranks_; }
  std::int64_t flows() const { return flows_; }

 private:
  double compute_cost(int rank, const Program& prog, std::uint32_t i) const {
    if (!recorded_.empty()) return recorded_[static_cast<std::size_t>(rank)][i];
    if (!role_costs_.empty()) return role_costs_[static_cast<std::size_t>(plan_.ranks[static_cast<std::size_t>(rank)].role)][i];
    if (op_cost_) return op_cost_(prog, prog.ops[i]);
    // Only a measured cost can depend on where the op runs (calibration.hpp).
    return cost_.cost(prog.ops[i], profile_ ? op_context(plan_, rank) : OpContext{}).seconds;
  }

  // Consecutive compute ops of a stream that nothing else waits on run back to back, so they take
  // one sleep for their summed cost and get their timings by addition: the same times, far fewer
  // simulation events. A run ends at an op another stream waits for, or before one that waits.
  void run_stream(int rank, const std::vector<std::uint32_t>& ops) {
    RankState& st = ranks_[static_cast<std::size_t>(rank)];
    const Program& prog = plan_.program_of(rank);
    const std::vector<char>& watched = watched_[static_cast<std::size_t>(prog.pp_stage)];
    for (std::size_t k = 0; k < ops.size();) {
      const std::uint32_t i = ops[k];
      const Op& op = prog.ops[i];
      if (in_order_) st.wait_issue(i);
      for (auto d : prog.deps_of(op)) st.wait_done(d);
      const double start = s4u::Engine::get_clock();
      if (is_comm(op.kind)) {
        st.timing[i].start = start;
        if (in_order_) {
          // The host thread packs and posts the operation, moves it on in its tests between
          // later ops and unpacks it: time it spends before it issues the next op.
          if (!recorded_host_.empty())
            s4u::this_actor::sleep_for(recorded_host_[static_cast<std::size_t>(rank)][i]);
          else if (const auto host = profile_ ? profile_->host_seconds(op) : std::nullopt)
            s4u::this_actor::sleep_for(*host);
          issued(st, i);
        }
        communicate(rank, prog, i);
        if (in_order_) await_progress(rank, prog.ops[i]);
        st.timing[i].end = s4u::Engine::get_clock();
        finish(st, i);
        ++k;
        continue;
      }
      std::size_t last = k;
      while (last + 1 < ops.size() && !watched[ops[last]] && !is_comm(prog.ops[ops[last + 1]].kind) &&
             prog.deps_of(prog.ops[ops[last + 1]]).empty() && (!in_order_ || ops[last + 1] == ops[last] + 1))
        ++last;
      double t = start;
      const auto slow = slowdown_.find(rank);
      const double factor = slow == slowdown_.end() ? 1.0 : slow->second;
      for (std::size_t q = k; q <= last; ++q) {
        st.timing[ops[q]].start = t;
        t += factor * compute_cost(rank, prog, ops[q]);
        st.timing[ops[q]].end = t;
      }
      if (in_order_) {
        st.run_first = ops[k];
        st.run_last = ops[last];
        st.run_end = t;
      }
      s4u::this_actor::sleep_until(t);
      for (std::size_t q = k; q <= last; ++q) st.done[ops[q]] = 1;
      if (in_order_) st.issue = ops[last] + 1;
      finish(st, ops[last]);
      k = last + 1;
    }
  }

  static bool in_unit(Stream s) { return s == Stream::Compute || s == Stream::TensorComm; }

  // A lockstep unit: the compute and tensor-comm streams of every replayed member of one exclusive
  // group instance, in one actor. Their collectives take closed forms and their other ops cost
  // what the cost model says, so between two interactions with the rest of the simulation (a
  // dependency on another stream's op, or another stream waiting on one of theirs) their times
  // follow by arithmetic: each stream runs its ops in order, an op starts when its stream is free
  // and its dependencies have ended, a collective when every member has arrived, and ends its
  // closed form later. The unit computes those times ahead of the clock, sleeps only until the
  // next op another stream waits for, and wakes early when a dependency it waits for ends. Same
  // times as one actor per stream with a barrier per collective, without the millions of context
  // switches those cost at 10,000 ranks (tensor-parallel collectives are most of a plan's ops).
  struct Unit {
    int id = 0;
    std::vector<int> ranks;  // replayed members
    UnitSignal signal;
  };

  void run_unit(Unit& u) {
    const std::size_t M = u.ranks.size();
    const Program& prog = plan_.program_of(u.ranks.front());  // members share their stage's program
    const std::vector<char>& outside = watched_outside_unit_[static_cast<std::size_t>(prog.pp_stage)];
    std::array<std::vector<std::uint32_t>, 2> ops;  // Compute, TensorComm
    for (std::uint32_t i = 0; i < prog.ops.size(); ++i)
      if (in_unit(prog.ops[i].stream)) ops[prog.ops[i].stream == Stream::Compute ? 0 : 1].push_back(i);
    std::vector<std::array<std::size_t, 2>> cursor(M, {0, 0});
    std::vector<std::array<double, 2>> free_at(M, {0.0, 0.0});
    std::vector<std::vector<char>> resolved(M, std::vector<char>(prog.ops.size(), 0));
    std::vector<double> factor(M, 1.0);
    for (std::size_t m = 0; m < M; ++m)
      if (const auto it = slowdown_.find(u.ranks[m]); it != slowdown_.end()) factor[m] = it->second;
    auto state = [&](std::size_t m) -> RankState& { return ranks_[static_cast<std::size_t>(u.ranks[m])]; };
    // (end time, member, op) of ops other streams wait for, published when the clock gets there.
    using Pending = std::tuple<double, std::size_t, std::uint32_t>;
    std::priority_queue<Pending, std::vector<Pending>, std::greater<>> pending;
    std::vector<std::pair<std::size_t, std::uint32_t>> blocked;  // (member, other stream's op) waited for
    std::vector<double> arrive(M);  // at the collective under consideration, per member
    std::vector<char> woken(M, 0);  // members whose ops were just published

    // When member m may start op i (its stream free, its dependencies ended); nullopt if one has not.
    auto ready_at = [&](std::size_t m, std::uint32_t i, double free) -> std::optional<double> {
      double t = free;
      for (auto d : prog.deps_of(prog.ops[i])) {
        if (in_unit(prog.ops[d].stream) ? !resolved[m][d] : !state(m).done[d]) {
          if (!in_unit(prog.ops[d].stream)) blocked.emplace_back(m, d);
          return std::nullopt;
        }
        t = std::max(t, state(m).timing[d].end);
      }
      return t;
    };
    auto resolve = [&](std::size_t m, std::uint32_t i, double start, double end) {
      state(m).timing[i] = {start, end};
      resolved[m][i] = 1;
      if (outside[i]) pending.emplace(end, m, i);
    };
    auto advance = [&] {
      for (bool progress = true; progress;) {
        progress = false;
        blocked.clear();
        for (std::size_t s = 0; s < 2; ++s) {
          for (std::size_t m = 0; m < M; ++m)
            while (cursor[m][s] < ops[s].size() && !is_comm(prog.ops[ops[s][cursor[m][s]]].kind)) {
              const std::uint32_t i = ops[s][cursor[m][s]];
              const auto start = ready_at(m, i, free_at[m][s]);
              if (!start) break;
              const double end = *start + factor[m] * compute_cost(u.ranks[m], prog, i);
              resolve(m, i, *start, end);
              free_at[m][s] = end;
              ++cursor[m][s];
              progress = true;
            }
          // A collective, once every member's stream stands at it with its dependencies ended.
          const std::size_t k = cursor[0][s];
          if (k == ops[s].size() || !std::all_of(cursor.begin(), cursor.end(), [&](const auto& c) { return c[s] == k; })) continue;
          const std::uint32_t i = ops[s][k];
          bool all = true;
          for (std::size_t m = 0; m < M && all; ++m) {
            const auto a = ready_at(m, i, free_at[m][s]);
            all = a.has_value();
            if (all) arrive[m] = *a;
          }
          if (!all) continue;
          const double end = *std::max_element(arrive.begin(), arrive.end()) + uncontended_seconds(group_of(u.ranks.front(), prog.ops[i]), prog.ops[i]);
          for (std::size_t m = 0; m < M; ++m) {
            resolve(m, i, arrive[m], end);
            free_at[m][s] = end;
            ++cursor[m][s];
          }
          progress = true;
        }
      }
    };

    for (;;) {
      advance();
      const bool finished = std::all_of(cursor.begin(), cursor.end(), [&](const auto& c) { return c[0] == ops[0].size() && c[1] == ops[1].size(); });
      if (finished && pending.empty()) break;
      const double next = pending.empty() ? std::numeric_limits<double>::infinity() : std::get<0>(pending.top());
      double limit = next;
      if (!blocked.empty()) {  // until a dependency ends or the next publication is due
        auto any_ended = [&] {
          return std::any_of(blocked.begin(), blocked.end(), [&](const auto& b) { return state(b.first).done[b.second] != 0; });
        };
        std::unique_lock lock(*u.signal.mutex);
        u.signal.waiting = true;
        bool ended = any_ended();
        if (!ended && pending.empty()) {
          u.signal.cv->wait(lock, any_ended);
          ended = true;
        } else if (!ended) {
          ended = u.signal.cv->wait_until(lock, next, any_ended);
        }
        u.signal.waiting = false;
        if (ended) limit = std::min(next, s4u::Engine::get_clock());
      } else if (pending.empty()) {
        throw Error(ErrorKind::Plan, {}, fmt::format("the programs of {} group {} deadlock", to_string(*unit_kind_), u.id));
      } else {
        s4u::this_actor::sleep_until(next);
      }
      std::fill(woken.begin(), woken.end(), 0);
      while (!pending.empty() && std::get<0>(pending.top()) <= limit) {
        const auto [t, m, i] = pending.top();
        pending.pop();
        state(m).done[i] = 1;
        woken[m] = 1;
      }
      for (std::size_t m = 0; m < M; ++m)
        if (woken[m]) state(m).wake();
    }
    for (std::size_t m = 0; m < M; ++m)
      for (const auto& stream_ops : ops)
        for (auto i : stream_ops) state(m).done[i] = 1;
  }

  // The CPU engine's MPI progresses a posted operation only inside MPI calls: the tests between
  // two ops of the host thread, or a wait. A collective's data that has arrived completes at each
  // participant's next such call, so it ends when the last participant's host gets to one. A
  // message is pushed when it is posted: the receive ends at the receiver's next call once it has
  // arrived, whatever the sender does; the send ends at the sender's next call after the
  // receiver's has taken it (measured with Open MPI's shared-memory transport, 1 KB to 256 KB).
  void await_progress(int rank, const Op& op) {
    const auto progress = [&](int r) {
      const double now = s4u::Engine::get_clock();
      const double until = ranks_[static_cast<std::size_t>(r)].next_progress(now);
      if (until > now) s4u::this_actor::sleep_until(until);
    };
    if (op.kind == OpKind::Recv) {
      progress(rank);
    } else if (op.kind == OpKind::Send) {
      progress(plan_.topology.ring_neighbour(op.group, rank, op.peer));
      progress(rank);
    } else {
      const double now = s4u::Engine::get_clock();
      double until = now;
      for (int r : group_of(rank, op).members) until = std::max(until, ranks_[static_cast<std::size_t>(r)].next_progress(now));
      if (until > now) s4u::this_actor::sleep_until(until);
    }
  }

  void issued(RankState& st, std::uint32_t i) {
    st.issue = i + 1;
    st.wake();
  }

  void finish(RankState& st, std::uint32_t i) {
    st.done[i] = 1;
    st.wake();
  }

  // The mailbox of pipeline messages from src to dst in one direction, looked up once.
  s4u::Mailbox* p2p_box(int src, int dst, bool forward) {
    const std::int64_t key = (static_cast<std::int64_t>(src) * plan_.topology.world_size() + dst) * 2 + (forward ? 1 : 0);
    if (const auto it = p2p_boxes_.find(key); it != p2p_boxes_.end()) return it->second;
    s4u::Mailbox* mb = s4u::Mailbox::by_name(fmt::format("p2p {}>{} {}", src, dst, forward ? 'f' : 'b'));
    p2p_boxes_[key] = mb;  // by_name is a simcall: inserted after it, whoever looked it up first
    return mb;
  }

  // Per group instance and stream: one stream's collectives of a group are ordered alike on every
  // member, but two streams' may overlap (a gradient bucket's reduction beside a gather).
  GroupState& group_state(GroupKind kind, int id, Stream stream) {
    auto& all = groups_[static_cast<std::size_t>(kind)];
    if (all.empty()) all.resize(static_cast<std::size_t>(plan_.topology.num_groups(kind) * kNumStreams));
    GroupState& g = all[static_cast<std::size_t>(id * kNumStreams + static_cast<int>(stream))];
    if (g.members.empty()) {
      g.members = plan_.topology.members(kind, id);
      g.name = fmt::format("{} {} {}", to_string(kind), id, to_string(stream));
    }
    return g;
  }

  GroupState& group_of(int rank, const Op& op) {
    return group_state(op.group, plan_.ranks[static_cast<std::size_t>(rank)].group[static_cast<std::size_t>(op.group)], op.stream);
  }

  void send_recv(s4u::Mailbox* to, s4u::Mailbox* from, double bytes) {
    s4u::CommPtr out = to->put_async(&token, static_cast<std::uint64_t>(bytes));
    from->get<int>();
    out->wait();
    ++flows_;
  }

  // Closed forms on the group's slowest hop. Ring: 2(n-1) steps of S/n. Binary tree: reduce up and
  // broadcast down, 2 ceil(log2 n) hops, each moving S from (or to) two children through one link.
  // Hierarchical (L members on each of N nodes): reduce-scatter on the node, all-reduce of S/L
  // across nodes among members of one local index, all-gather on the node. An all-reduce takes
  // the algorithm chosen, or the fastest for its size.
  struct ClosedForms {
    double step = 0;  // one ring step
    AllReduceAlgorithm algo = AllReduceAlgorithm::Ring;
    double all_reduce_s = 0;
  };
  ClosedForms closed_forms(GroupState& g, const Op& op) const {
    g.layout(*platform_);
    const Path& hop = g.worst;
    const double bytes = static_cast<double>(op.comm_bytes);
    const int n = static_cast<int>(g.members.size());
    ClosedForms f;
    f.step = hop.latency_s + bytes / n / hop.bottleneck_bytes_per_s;
    const double ring_s = 2 * (n - 1) * f.step;
    const double fan = n > 2 ? 2.0 : 1.0;
    const double tree_s =
        2 * std::ceil(std::log2(static_cast<double>(n))) * (hop.latency_s + fan * bytes / hop.bottleneck_bytes_per_s);
    const int L = g.local_size, N = g.nodes;
    const double local_phase_s = (L - 1) * (g.local_worst.latency_s + bytes / L / g.local_worst.bottleneck_bytes_per_s);
    const double cross_phase_s = 2 * (N - 1) * (g.cross_worst.latency_s + bytes / L / N / g.cross_worst.bottleneck_bytes_per_s);
    const double hier_s = g.hierarchical ? 2 * local_phase_s + cross_phase_s : 0;
    if (op.kind == OpKind::AllReduce) {
      f.algo = all_reduce_;
      if (f.algo == AllReduceAlgorithm::Hierarchical && !g.hierarchical) f.algo = AllReduceAlgorithm::Ring;
      if (f.algo == AllReduceAlgorithm::Auto) {
        f.algo = tree_s < ring_s ? AllReduceAlgorithm::Tree : AllReduceAlgorithm::Ring;
        if (g.hierarchical && hier_s < std::min(tree_s, ring_s)) f.algo = AllReduceAlgorithm::Hierarchical;
      }
    }
    f.all_reduce_s = f.algo == AllReduceAlgorithm::Tree ? tree_s : f.algo == AllReduceAlgorithm::Hierarchical ? hier_s : ring_s;
    return f;
  }

  // A collective's time when nothing else shares its links: benchmarked when the profile has it,
  // else its closed form.
  double uncontended_seconds(GroupState& g, const Op& op) const {
    const int n = static_cast<int>(g.members.size());
    const double bytes = static_cast<double>(op.comm_bytes);
    if (const auto measured = profile_ ? profile_->collective_seconds(op.kind, n, bytes) : std::nullopt) return *measured;
    const ClosedForms f = closed_forms(g, op);
    const Path& hop = g.worst;
    switch (op.kind) {
      case OpKind::AllReduce: return f.all_reduce_s;
      case OpKind::ReduceScatter:
      case OpKind::AllGather: return (n - 1) * f.step;
      case OpKind::AllToAll: return hop.latency_s + (n - 1) * bytes / n / hop.bottleneck_bytes_per_s;
      case OpKind::RingExchange: return hop.latency_s + bytes / hop.bottleneck_bytes_per_s;
      default: return 0;
    }
  }

  void communicate(int rank, const Program& prog, std::uint32_t i) {
    const Op& op = prog.ops[i];
    const Topology& topo = plan_.topology;
    const double bytes = static_cast<double>(op.comm_bytes);
    if (op.kind == OpKind::Send || op.kind == OpKind::Recv) {
      const int peer = plan_.topology.ring_neighbour(op.group, rank, op.peer);
      const bool forward = (op.kind == OpKind::Send) == (op.peer > 0);
      const int src = op.kind == OpKind::Send ? rank : peer, dst = op.kind == OpKind::Send ? peer : rank;
      s4u::Mailbox* mb = p2p_box(src, dst, forward);
      if (const auto measured = profile_ ? profile_->collective_seconds(op.kind, 2, bytes) : std::nullopt) {
        // The benchmarked message time, once both sides are there (a rendezvous of no bytes).
        if (op.kind == OpKind::Send)
          mb->put(&token, 0);
        else
          mb->get<int>();
        s4u::this_actor::sleep_for(*measured);
        return;
      }
      if (op.kind == OpKind::Send) {
        mb->put(&token, static_cast<std::uint64_t>(bytes));
        ++flows_;
      } else {
        mb->get<int>();
      }
      return;
    }
    GroupState& g = group_of(rank, op);
    const int n = static_cast<int>(g.members.size()), me = topo.group_index(op.group, rank);
    const int next = (me + 1) % n;
    const ClosedForms f = closed_forms(g, op);
    const Path& hop = g.worst;
    const AllReduceAlgorithm algo = f.algo;
    const int L = g.local_size, N = g.nodes;
    if (fold_ && (op.group == GroupKind::DP || op.group == GroupKind::ExpertDP)) {  // the other replicas are folded
      s4u::this_actor::sleep_for(uncontended_seconds(g, op));
      return;
    }
    auto all_arrive = [&] { g.arrive(); };
    auto at = [&](int member, int box_kind) { return g.box(member, box_kind); };
    if (exclusive_[static_cast<std::size_t>(op.group)]) {
      if (!(fold_tp_ && op.group == GroupKind::TP)) all_arrive();  // folded members arrive together
      s4u::this_actor::sleep_for(uncontended_seconds(g, op));
      return;
    }
    switch (op.kind) {
      case OpKind::AllReduce:
        if (algo == AllReduceAlgorithm::Tree) {
          tree_all_reduce(me, n, bytes, at);
        } else if (algo == AllReduceAlgorithm::Hierarchical) {
          all_arrive();
          const std::size_t m = static_cast<std::size_t>(me);
          stream(at(g.local_next[m], kLocalRing), at(me, kLocalRing), (L - 1) * bytes / L, (L - 2) * g.local_worst.latency_s);
          stream(at(g.cross_next[m], kCrossRing), at(me, kCrossRing), 2 * (N - 1) * bytes / L / N,
                 (2 * N - 3) * g.cross_worst.latency_s);
          stream(at(g.local_next[m], kLocalRing), at(me, kLocalRing), (L - 1) * bytes / L, (L - 2) * g.local_worst.latency_s);
        } else {  // ring: reduce-scatter + all-gather
          all_arrive();
          stream(at(next, kRing), at(me, kRing), 2 * (n - 1) * bytes / n, (2 * n - 3) * hop.latency_s);
        }
        break;
      case OpKind::ReduceScatter:  // S is the input
      case OpKind::AllGather:      // S is the output
        all_arrive();
        stream(at(next, kRing), at(me, kRing), (n - 1) * bytes / n, (n - 2) * hop.latency_s);
        break;
      case OpKind::RingExchange:  // one step of the CP ring: S to the next member
        send_recv(at(next, kRing), at(me, kRing), bytes);
        break;
      case OpKind::AllToAll: {  // direct: S/n to every other member at once
        // Receives are posted at once too: a mailbox transfer starts only when both sides are there.
        std::vector<s4u::CommPtr> comms;
        std::vector<int*> received(static_cast<std::size_t>(n), nullptr);
        for (int j = 0; j < n; ++j) {
          if (j == me) continue;
          comms.push_back(g.pair_box(me, j)->put_async(&token, static_cast<std::uint64_t>(bytes / n)));
          comms.push_back(g.pair_box(j, me)->get_async<int>(&received[static_cast<std::size_t>(j)]));
        }
        for (auto& c : comms) c->wait();
        flows_ += n - 1;
        break;
      }
      default: break;
    }
  }

  // A ring of k steps of S/n, as NCCL runs it: chunks stream around the ring without a lockstep
  // between steps, so each member's link to the next carries one continuous transfer of k S/n
  // bytes, sharing links with whatever else crosses them, and the ring ends when its slowest link
  // has carried its share. No member may finish before every member has arrived (each result holds
  // everyone's contribution), hence the caller's barrier first. One flow per member instead of one
  // per step: a 1,024-member ring costs 1,024 flows, not two million, and uncontended it takes the
  // stepwise closed form k (latency + S/n / bandwidth): the flow pays one latency, the sleep the rest.
  void stream(s4u::Mailbox* to, s4u::Mailbox* from, double bytes, double extra_latency_s) {
    send_recv(to, from, bytes);
    if (extra_latency_s > 0) s4u::this_actor::sleep_for(extra_latency_s);
  }

  // Binary tree over member indices (children 2i+1, 2i+2): partial sums flow up to member 0, the
  // result flows back down, each sweep through its own mailboxes.
  template <class At>
  void tree_all_reduce(int me, int n, double bytes, const At& at) {
    const int parent = (me - 1) / 2;
    std::vector<s4u::CommPtr> up;
    std::array<int*, 2> received{};
    for (int c : {2 * me + 1, 2 * me + 2})
      if (c < n) up.push_back(at(me, kTreeUp)->template get_async<int>(&received[up.size()]));  // both children at once
    for (auto& u : up) u->wait();
    if (me > 0) {
      at(parent, kTreeUp)->put(&token, static_cast<std::uint64_t>(bytes));
      at(me, kTreeDown)->template get<int>();
      ++flows_;
    }
    std::vector<s4u::CommPtr> down;
    for (int c : {2 * me + 1, 2 * me + 2})
      if (c < n) down.push_back(at(c, kTreeDown)->put_async(&token, static_cast<std::uint64_t>(bytes)));
    for (auto& d : down) d->wait();
    flows_ += static_cast<std::int64_t>(down.size());
  }

  const CompiledPlan& plan_;
  CostModel cost_;
  std::function<double(const Program&, const Op&)> op_cost_;
  const std::vector<std::vector<double>>& recorded_;
  const std::vector<std::vector<double>>& recorded_host_;
  std::map<int, double> slowdown_;
  bool closed_form_;
  bool in_order_;
  const CalibrationProfile* profile_;
  bool fold_;
  bool fold_tp_ = false;
  AllReduceAlgorithm all_reduce_;
  std::vector<RankState> ranks_;
  std::vector<std::vector<char>> watched_;  // per role: ops another stream waits for
  std::vector<std::vector<char>> watched_outside_unit_;  // per role: ops streams outside a unit wait for
  std::vector<std::vector<double>> role_costs_;           // per role, per op, when no rank differs
  std::array<bool, kNumGroupKinds> exclusive_{};
  std::optional<GroupKind> unit_kind_;
  std::vector<std::unique_ptr<Unit>> units_;
  const Platform* platform_ = nullptr;
  std::array<std::vector<GroupState>, kNumGroupKinds> groups_;
  std::unordered_map<std::int64_t, s4u::Mailbox*> p2p_boxes_;
  std::int64_t flows_ = 0;
};

// The slowest rank's compute stream: busy time, and each wait classified by what it waited for.
Breakdown breakdown(const Program& prog, const std::vector<OpTiming>& t, double end) {
  Breakdown b;
  double free_at = 0;
  for (std::uint32_t i = 0; i < prog.ops.size(); ++i) {
    const Op& op = prog.ops[i];
    if (op.stream != Stream::Compute) continue;
    const double gap = t[i].start - free_at;
    if (gap > 0) {
      std::int64_t blocker = -1;
      for (auto d : prog.deps_of(op))
        if (blocker < 0 || t[d].end > t[static_cast<std::size_t>(blocker)].end) blocker = d;
      const OpKind k = blocker < 0 ? OpKind::Gemm : prog.ops[static_cast<std::size_t>(blocker)].kind;
      (k == OpKind::Recv || k == OpKind::Send ? b.bubble_s : is_comm(k) ? b.exposed_comm_s : b.other_s) += gap;
    }
    b.compute_s += t[i].end - t[i].start;
    free_at = std::max(free_at, t[i].end);
  }
  b.exposed_comm_s += std::max(0.0, end - free_at);  // the optimizer tail's collectives
  return b;
}

LayerTimes layer_times(const Program& prog, const std::vector<OpTiming>& t) {
  std::map<std::tuple<std::int32_t, std::int32_t, bool>, std::pair<double, double>> spans;  // (layer, mb, forward) -> span
  for (std::uint32_t i = 0; i < prog.ops.size(); ++i) {
    const Op& op = prog.ops[i];
    if (op.layer == kNone || op.micro_batch == kNone || op.phase == Phase::Optimizer) continue;
    if (op.stream != Stream::Compute && op.stream != Stream::TensorComm) continue;
    const auto [it, fresh] = spans.try_emplace({op.layer, op.micro_batch, op.phase == Phase::Forward}, t[i].start, t[i].end);
    if (!fresh) it->second = {std::min(it->second.first, t[i].start), std::max(it->second.second, t[i].end)};
  }
  double sum[2] = {0, 0}, count[2] = {0, 0};
  for (const auto& [key, span] : spans) {
    const int forward = std::get<2>(key) ? 1 : 0;
    sum[forward] += span.second - span.first;
    ++count[forward];
  }
  return {count[1] > 0 ? sum[1] / count[1] : 0, count[0] > 0 ? sum[0] / count[0] : 0};
}

SimResult run_replay(const CompiledPlan& plan, const ClusterSpec& cluster, const SimOptions& options) {
  const auto world = static_cast<std::size_t>(plan.topology.world_size());
  if ((!options.recorded.empty() && options.recorded.size() != world) || (!options.recorded_host.empty() && options.recorded_host.size() != world))
    throw Error(ErrorKind::Usage, {}, fmt::format("recorded costs of {} ranks for a plan of {}", options.recorded.size(), world));
  if (options.fold_data_parallel && (plan.plan.cp() > 1 || plan.plan.ep() > 1))
    throw Error(ErrorKind::Usage, {}, "folded replay needs cp 1 and ep 1 (their groups cross replicas)", "replay unfolded");
  // Tens of thousands of actors: no guard page per stack (each is one more memory mapping, and
  // Linux allows 65,530 per process), and 64 KiB stacks (a stream's loop and SimGrid's calls need a few).
  int argc = 4;
  char name[] = "parallax-simulate";
  char quiet[] = "--log=root.thres:critical";
  char guard[] = "--cfg=contexts/guard-size:0";
  char stack[] = "--cfg=contexts/stack-size:64";
  char* argv[] = {name, quiet, guard, stack, nullptr};
  char** args = argv;
  // The stacks are calloc'ed: carved from the heap, each is cleared, all 64 KiB made resident,
  // though a stream touches a few pages of it. Mapped on their own they start as untouched zero
  // pages (adjacent mappings merge, so the mapping count stays low). Only this process replays.
  mallopt(M_MMAP_THRESHOLD, 64 << 10);
  mallopt(M_MMAP_MAX, 1 << 24);
  s4u::Engine engine(&argc, args);
  const Platform platform(cluster, plan.topology.world_size(), options.links);
  Replay replay(plan, cluster, options);
  replay.start(platform);
  engine.run();

  SimResult r;
  r.flows = replay.flows();
  for (std::size_t k = 0; k < replay.ranks().size(); ++k) {
    double end = 0;
    for (const OpTiming& t : replay.ranks()[k].timing) end = std::max(end, t.end);
    r.rank_end_s.push_back(end);
    if (end > r.iteration_s) {
      r.iteration_s = end;
      r.slowest_rank = static_cast<int>(k);
    }
  }
  r.breakdown = breakdown(plan.program_of(r.slowest_rank), replay.ranks()[static_cast<std::size_t>(r.slowest_rank)].timing, r.iteration_s);
  r.layer = layer_times(plan.program_of(r.slowest_rank), replay.ranks()[static_cast<std::size_t>(r.slowest_rank)].timing);
  {
    const CostModel costs(cluster.gpu, cluster.node, options.cost, options.profile ? &*options.profile : nullptr);
    double all = 0, measured = 0, interpolated = 0, spread = 0, band = 0;
    for (const Op& op : plan.program_of(r.slowest_rank).ops) {
      if (op.stream != Stream::Compute || is_comm(op.kind)) continue;
      const OpCost c = costs.cost(op, op_context(plan, r.slowest_rank));
      all += c.seconds;
      r.cost_models[std::string(c.model)] += c.seconds;
      if (c.measured()) {
        measured += c.seconds;
        spread += c.seconds * c.spread;
        if (c.model == "measured-interpolated") interpolated += c.seconds;
      }
      band += c.seconds * (c.measured() || c.fitted ? c.spread : options.cost.roofline_uncertainty);
    }
    r.measured_fraction = all > 0 ? measured / all : 0;
    r.interpolated_fraction = all > 0 ? interpolated / all : 0;
    for (auto& [model, seconds] : r.cost_models) seconds = all > 0 ? seconds / all : 0;
    r.measured_spread = measured > 0 ? spread / measured : 0;
    r.error_band = all > 0 ? band / all : 0;
    if (!options.recorded.empty()) {  // verbatim: every compute cost is the run's own
      r.cost_models = {{"recorded", 1.0}};
      r.measured_fraction = 1;
      r.measured_spread = r.error_band = 0;
    }
  }
  const double tokens = static_cast<double>(plan.plan.global_batch_size) * plan.plan.seq_length;
  r.tokens_per_s = r.iteration_s > 0 ? tokens / r.iteration_s : 0;
  const double peak = 1e12 * cluster.gpu.peak_bf16_tflops * plan.topology.world_size();
  r.mfu = r.iteration_s > 0 ? iteration_flops(plan.model, plan.plan).model_flops() / (r.iteration_s * peak) : 0;
  r.traced_ranks = options.traced_ranks.empty() ? std::vector<int>{0} : options.traced_ranks;
  for (int t : r.traced_ranks) {
    if (!replay.replayed(t)) throw Error(ErrorKind::Usage, {}, fmt::format("rank {} is folded away; trace a rank of replica 0", t));
    r.timings.push_back(replay.ranks()[static_cast<std::size_t>(t)].timing);
  }
  return r;
}

SimResult from_json(const nlohmann::json& j) {
  SimResult r;
  r.iteration_s = j.at("iteration_s");
  r.slowest_rank = j.at("slowest_rank");
  r.breakdown = {j.at("breakdown").at("compute_s"), j.at("breakdown").at("exposed_comm_s"), j.at("breakdown").at("bubble_s"),
                 j.at("breakdown").at("other_s")};
  r.layer = {j.at("layer").at("forward_s"), j.at("layer").at("backward_s")};
  r.tokens_per_s = j.at("tokens_per_s");
  r.mfu = j.at("mfu");
  r.rank_end_s = j.at("rank_end_s").get<std::vector<double>>();
  r.traced_ranks = j.at("traced_ranks").get<std::vector<int>>();
  r.flows = j.at("flows");
  r.measured_fraction = j.at("measured_fraction");
  r.interpolated_fraction = j.at("interpolated_fraction");
  r.cost_models = j.at("cost_models").get<std::map<std::string, double>>();
  r.measured_spread = j.at("measured_spread");
  r.error_band = j.at("error_band");
  for (const auto& per_rank : j.at("timings")) {
    std::vector<OpTiming> t;
    for (const auto& p : per_rank) t.push_back({p[0], p[1]});
    r.timings.push_back(std::move(t));
  }
  return r;
}

}  // namespace

nlohmann::json SimResult::to_json() const {
  nlohmann::json t = nlohmann::json::array();
  for (const auto& per_rank : timings) {
    nlohmann::json a = nlohmann::json::array();
    for (const OpTiming& o : per_rank) a.push_back({o.start, o.end});
    t.push_back(std::move(a));
  }
  return {{"iteration_s", iteration_s},
          {"slowest_rank", slowest_rank},
          {"breakdown",
           {{"compute_s", breakdown.compute_s},
            {"exposed_comm_s", breakdown.exposed_comm_s},
            {"bubble_s", breakdown.bubble_s},
            {"other_s", breakdown.other_s}}},
          {"layer", {{"forward_s", layer.forward_s}, {"backward_s", layer.backward_s}}},
          {"tokens_per_s", tokens_per_s},
          {"mfu", mfu},
          {"rank_end_s", rank_end_s},
          {"traced_ranks", traced_ranks},
          {"flows", flows},
          {"measured_fraction", measured_fraction},
          {"interpolated_fraction", interpolated_fraction},
          {"cost_models", cost_models},
          {"measured_spread", measured_spread},
          {"error_band", error_band},
          {"timings", std::move(t)}};
}

SimResult simulate(const CompiledPlan& plan, const ClusterSpec& cluster, const SimOptions& options) {
  if (plan.topology.world_size() > cluster.num_gpus())
    throw Error(ErrorKind::Plan, {cluster.file},
                fmt::format("the plan needs {} GPUs but {} has {}", plan.topology.world_size(), cluster.name, cluster.num_gpus()),
                "choose a larger cluster or a smaller plan");
  int fds[2];
  if (pipe(fds) != 0) throw Error(ErrorKind::Io, {}, fmt::format("pipe: {}", std::strerror(errno)));
  const pid_t child = fork();
  if (child < 0) throw Error(ErrorKind::Io, {}, fmt::format("fork: {}", std::strerror(errno)));
  if (child == 0) {
    close(fds[0]);
    int code = 0;
    std::string out;
    try {
      out = run_replay(plan, cluster, options).to_json().dump();
    } catch (const std::exception& e) {
      out = nlohmann::json{{"error", e.what()}}.dump();
      code = 1;
    }
    for (std::size_t at = 0; at < out.size();) {
      const ssize_t n = write(fds[1], out.data() + at, out.size() - at);
      if (n <= 0) _exit(2);
      at += static_cast<std::size_t>(n);
    }
    _exit(code);
  }
  close(fds[1]);
  std::string in;
  char buf[1 << 16];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) in.append(buf, static_cast<std::size_t>(n));
  close(fds[0]);
  int status = 0;
  waitpid(child, &status, 0);
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || j.is_discarded() || j.contains("error"))
    throw Error(ErrorKind::Usage, {}, fmt::format("the replay failed: {}", j.is_object() && j.contains("error") ? j["error"].get<std::string>() : "the simulation process died"));
  return from_json(j);
}

}  // namespace px::sim
