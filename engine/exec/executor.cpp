// In-order issue with nonblocking comm. Buffer roles of each comm op follow the conventions in
// engine/plan/README.md; ops whose operands span several tensors go through packed staging buffers.
#include "engine/exec/executor.hpp"

#include <algorithm>
#include <chrono>
#include <fmt/format.h>

#include "engine/core/error.hpp"

namespace px {
namespace {

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool overlaps(std::pair<std::int64_t, std::int64_t> a, std::pair<std::int64_t, std::int64_t> b) {
  return a.first < b.second && b.first < a.second;
}

}  // namespace

Executor::Executor(const CompiledPlan& plan, int rank, ComputeBackend& backend, const GroupComms& groups)
    : plan_(plan),
      program_(plan.program_of(rank)),
      rank_(rank),
      backend_(backend),
      device_(backend.arena_memory() != nullptr),
      groups_(groups),
      memory_(plan_memory(program_)),
      arena_(program_, memory_, backend.arena_memory()),
      epoch_(seconds_now()) {
  if (!device_ && (plan.plan.precision != DType::F32 || plan.plan.grad_dtype != DType::F32))
    throw Error(ErrorKind::Usage, {}, "the CPU engine executes fp32 plans only", "set precision: fp32 and grad_dtype: fp32");
  for (const Op& op : program_.ops) {
    if (!is_comm(op.kind)) continue;
    const Communicator* c = groups_[static_cast<std::size_t>(op.group)];
    const int want = plan.topology.size(op.group);
    if (!c || c->size() != want)
      throw Error(ErrorKind::Usage, {},
                  fmt::format("rank {} has no {}-member communicator for group {}", rank, want, to_string(op.group)),
                  "launch with the plan's world size");
    if (device_ && !c->stand_in() && !backend.device_comm())
      throw Error(ErrorKind::Usage, {},
                  fmt::format("op '{}' needs group {} of {} ranks, but this device backend runs one rank alone",
                              program_.name_of(op), to_string(op.group), want),
                  "run a one-rank plan, or one rank of this plan with --emulate-rank");
  }
  layouts_.resize(program_.ops.size());
  for (std::uint32_t i = 0; i < program_.ops.size(); ++i) {
    const Op& op = program_.ops[i];
    if (!is_comm(op.kind)) continue;
    const Communicator& c = *groups_[static_cast<std::size_t>(op.group)];
    layouts_[i] = comm_layout(program_, i, memory_, c.rank(), c.size());
  }
}

std::vector<CommHandlePtr> ComputeBackend::post_comm(std::uint32_t, const CommLayout&, Communicator&, TensorArena&) {
  throw std::logic_error("post_comm: this backend has no device communicators");
}

void ComputeBackend::finish_comm(std::uint32_t, const CommLayout&, std::vector<CommHandlePtr>, TensorArena&) {
  throw std::logic_error("finish_comm: this backend has no device communicators");
}

double Executor::now() const { return seconds_now() - epoch_; }

void Executor::enable_heartbeat(const std::filesystem::path& dir) {
  heartbeat_dir_ = dir;
  heartbeat_.emplace(dir, rank_);
  for (Communicator* c : groups_)
    if (c) c->set_on_wait([this] { heartbeat_->beat(iteration_, current_op_); });
}

std::vector<OpTiming> Executor::run_iteration() {
  try {
    auto t = run_ops();
    ++iteration_;
    return t;
  } catch (const CommTimeout& e) {
    const Op& op = program_.ops[current_op_];
    std::string what = fmt::format("rank {}: iteration {}, op {} '{}' waited too long: {}", rank_, iteration_, current_op_,
                                   program_.name_of(op), e.what());
    RankFailure failure(what);
    if (heartbeat_) {
      if (auto d = diagnose_failure(heartbeat_dir_, plan_.topology.world_size(), rank_)) {
        failure = RankFailure(what + "; " + d->reason);
        failure.failed_rank = d->rank;
      }
    }
    throw failure;
  }
}

std::vector<OpTiming> Executor::run_ops() {
  timings_.assign(program_.ops.size(), {});
  host_.assign(program_.ops.size(), 0.0);
  if (heartbeat_) heartbeat_->beat(iteration_, 0, true);  // every iteration's start is on record
  // Gradients accumulate over the iteration's micro-batches, from zero.
  for (std::uint32_t t = 0; t < program_.tensors.size(); ++t)
    if (program_.tensors[t].cls == TensorClass::Gradient) arena_.zero(t);
  for (std::uint32_t i = 0; i < program_.ops.size(); ++i) {
    const Op& op = program_.ops[i];
    current_op_ = i;
    if (heartbeat_) heartbeat_->beat(iteration_, i);
    for (auto d : program_.deps_of(op)) wait_for(d);
    wait_overlapping(i);
    // A tensor starts zeroed at the op that first writes it: accumulating kernels need no special
    // first call, and reused arena bytes never leak into a new tensor.
    for (const TensorUse& u : program_.uses_of(op)) {
      if (!u.write) continue;
      touched_ = std::max(touched_, arena_.offset(u.tensor) + u.offset + u.bytes);
      if (program_.tensors[u.tensor].first_op == i && !is_persistent(program_.tensors[u.tensor].cls))
        arena_.zero(u.tensor);
    }
    if (is_comm(op.kind) && device_ && groups_[static_cast<std::size_t>(op.group)]->stand_in()) {
      timings_[i].start = timings_[i].end = now();
      backend_.mark(i);
    } else if (is_comm(op.kind)) {
      timings_[i].start = now();
      post(i);
      host_[i] = now() - timings_[i].start;
    } else {
      timings_[i].start = now();
      backend_.run(program_, i, arena_);
      timings_[i].end = now();
    }
    // Retire what has finished, so recorded ends are close to the truth. A test is where MPI
    // moves a posted operation on (copying and reducing its fragments on this thread): host time
    // that operation costs.
    for (std::size_t f = 0; f < in_flight_.size();) {
      const double tested = now();
      bool done = true;
      for (auto& h : in_flight_[f].comm.handles) done = done && h->test();
      host_[in_flight_[f].op] += now() - tested;
      if (done) {
        finish(in_flight_[f]);
        in_flight_.erase(in_flight_.begin() + static_cast<std::ptrdiff_t>(f));
      } else {
        ++f;
      }
    }
  }
  while (!in_flight_.empty()) wait_for(in_flight_.front().op);
  if (device_) backend_.device_timings(timings_);
  // MPI progresses the collectives of one stream concurrently; the trace shows a stream as the
  // engine's model has it, one op at a time, each from when its stream is free.
  std::array<double, kNumStreams> free_at{};
  for (std::uint32_t i = 0; i < program_.ops.size(); ++i) {
    OpTiming& t = timings_[i];
    double& f = free_at[static_cast<std::size_t>(program_.ops[i].stream)];
    t.start = std::max(t.start, f);
    t.end = std::max(t.end, t.start);
    f = t.end;
  }
  return timings_;
}

void Executor::wait_for(std::uint32_t op) {
  for (std::size_t f = 0; f < in_flight_.size(); ++f)
    if (in_flight_[f].op == op) {
      // A device's later work waits for the op on the device (finish); the host goes on.
      if (!device_)
        for (auto& h : in_flight_[f].comm.handles) h->wait();
      finish(in_flight_[f]);
      in_flight_.erase(in_flight_.begin() + static_cast<std::ptrdiff_t>(f));
      return;
    }
}

// The arena reuses bytes of dead tensors; a comm op still reading or writing them must end first.
// And a comm op reading what an earlier comm op of its own stream is still receiving (the next
// hop of a ring) waits for it: the program orders the two only by their stream.
void Executor::wait_overlapping(std::uint32_t index) {
  using Range = std::pair<std::int64_t, std::int64_t>;
  // Waits for every other in-flight op whose `which` ranges overlap r.
  const auto wait_hitting = [&](Range r, std::vector<ArenaRange> CommLayout::*which) {
    for (std::size_t f = 0; f < in_flight_.size();) {
      const auto& ranges = layouts_[in_flight_[f].op].*which;
      const auto hits = [&](ArenaRange x) { return overlaps({x.offset, x.offset + x.bytes}, r); };
      if (in_flight_[f].op != index && std::any_of(ranges.begin(), ranges.end(), hits))
        wait_for(in_flight_[f].op);
      else
        ++f;
    }
  };
  for (const TensorUse& u : program_.uses_of(program_.ops[index])) {
    const std::int64_t at = arena_.offset(u.tensor);
    if (u.write)
      wait_hitting({at, at + program_.tensors[u.tensor].bytes}, &CommLayout::holds);  // the whole tensor: it may be zeroed
    else
      wait_hitting({at + u.offset, at + u.offset + u.bytes}, &CommLayout::writes);
  }
}

void Executor::finish(InFlight& f) {
  const CommLayout& L = layouts_[f.op];
  if (device_) {
    backend_.finish_comm(f.op, L, std::move(f.comm.handles), arena_);
    return;
  }
  const double start = now();
  drain_on_host(L, f.comm, arena_);
  timings_[f.op].end = now();
  host_[f.op] += timings_[f.op].end - start;
}

void Executor::post(std::uint32_t index) {
  const Op& op = program_.ops[index];
  Communicator& c = *groups_[static_cast<std::size_t>(op.group)];
  InFlight f{index, {}};
  if (device_)
    f.comm.handles = backend_.post_comm(index, layouts_[index], c, arena_);
  else
    f.comm = post_on_host(layouts_[index], c, arena_);
  in_flight_.push_back(std::move(f));
}

}  // namespace px
