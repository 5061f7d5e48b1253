// In-order issue with nonblocking comm. Buffer roles of each comm op follow the conventions in
// engine/plan/README.md; ops whose operands span several tensors go through packed staging buffers.
#include "engine/exec/executor.hpp"

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cstring>
#include <fmt/format.h>

#include "engine/core/error.hpp"

namespace px {
namespace {

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr int kForwardTag = 1, kBackwardTag = 2, kRingTag = 3;

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
    if (device_ && !c->stand_in())
      throw Error(ErrorKind::Usage, {},
                  fmt::format("op '{}' needs group {} of {} ranks, but the device engine runs one rank alone",
                              program_.name_of(op), to_string(op.group), want),
                  "run a one-rank plan, or one rank of this plan with --emulate-rank");
  }
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
    if (is_comm(op.kind) && device_) {
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
      for (auto& h : in_flight_[f].handles) done = done && h->test();
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
      for (auto& h : in_flight_[f].handles) h->wait();
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
  const auto wait_hitting = [&](Range r, std::vector<Range> InFlight::*which) {
    for (std::size_t f = 0; f < in_flight_.size();) {
      const auto& ranges = in_flight_[f].*which;
      if (in_flight_[f].op != index && std::any_of(ranges.begin(), ranges.end(), [&](Range x) { return overlaps(x, r); }))
        wait_for(in_flight_[f].op);
      else
        ++f;
    }
  };
  for (const TensorUse& u : program_.uses_of(program_.ops[index])) {
    const std::int64_t at = arena_.offset(u.tensor);
    if (u.write)
      wait_hitting({at, at + program_.tensors[u.tensor].bytes}, &InFlight::ranges);  // the whole tensor: it may be zeroed
    else
      wait_hitting({at + u.offset, at + u.offset + u.bytes}, &InFlight::writes);
  }
}

void Executor::finish(InFlight& f) {
  const double start = now();
  const auto& src = f.staging.back();
  for (const auto& u : f.unpack) {
    float* dst = view_of(u.use).data();
    for (std::size_t i = 0; i < u.count; ++i) dst[i] = u.accumulate ? dst[i] + src[u.from + i] : src[u.from + i];
  }
  timings_[f.op].end = now();
  host_[f.op] += timings_[f.op].end - start;
}

std::span<float> Executor::view_of(const TensorUse& u) {
  const auto b = arena_.bytes(u.tensor).subspan(static_cast<std::size_t>(u.offset), static_cast<std::size_t>(u.bytes));
  return {reinterpret_cast<float*>(b.data()), b.size() / sizeof(float)};
}

void Executor::post(std::uint32_t index) {
  const Op& op = program_.ops[index];
  Communicator& c = *groups_[static_cast<std::size_t>(op.group)];
  const auto elems = static_cast<std::size_t>(op.comm_bytes) / sizeof(float);
  const auto n = static_cast<std::size_t>(c.size());
  std::vector<TensorUse> reads, writes;
  InFlight f{index, {}, {}, {}, {}, {}};
  f.staging.reserve(2);  // spans into staging buffers must survive later push_backs
  for (const TensorUse& u : program_.uses_of(op)) {
    (u.write ? writes : reads).push_back(u);
    f.ranges.emplace_back(arena_.offset(u.tensor) + u.offset, arena_.offset(u.tensor) + u.offset + u.bytes);
    if (u.write) f.writes.push_back(f.ranges.back());
  }
  // Concatenation of views.
  auto pack = [&](const std::vector<TensorUse>& us) {
    std::vector<float> buf;
    for (const auto& u : us) buf.insert(buf.end(), view_of(u).begin(), view_of(u).end());
    return buf;
  };
  // An output staging buffer whose consecutive parts go back to `us` when the op ends.
  auto output_to = [&](const std::vector<TensorUse>& us, std::size_t size, bool accumulate = false) -> std::span<float> {
    std::size_t offset = 0;
    for (const auto& u : us) {
      const std::size_t count = view_of(u).size();
      f.unpack.push_back({u, offset, count, accumulate});
      offset += count;
    }
    assert(offset == size);
    f.staging.emplace_back(size, 0.0f);
    return f.staging.back();
  };
  auto single = [&](const std::vector<TensorUse>& us) { return us.size() == 1 && view_of(us[0]).size() == elems; };
  const std::size_t me = static_cast<std::size_t>(c.rank());
  const int peer = (c.rank() + c.size() + op.peer) % c.size();  // Send/Recv/ring: the member op.peer places on
  const int prev = (c.rank() + c.size() - 1) % c.size();

  switch (op.kind) {
    case OpKind::AllReduce: {
      const bool max = op.variant == Variant::ReduceMax;
      std::span<float> buf;
      if (single(writes)) {
        buf = view_of(writes[0]);
      } else {
        buf = output_to(writes, elems);
        const auto packed = pack(writes);
        std::copy(packed.begin(), packed.end(), buf.begin());
      }
      f.handles.push_back(max ? c.start_all_reduce_max(buf) : c.start_all_reduce(buf));
      break;
    }
    case OpKind::AllGather: {
      const std::size_t block = elems / n;
      // The local block: the shard it reads, or (weights gathered back in place) its own block.
      std::vector<float> mine;
      if (reads.empty()) {
        const auto all = pack(writes);
        mine.assign(all.begin() + static_cast<std::ptrdiff_t>(me * block), all.begin() + static_cast<std::ptrdiff_t>((me + 1) * block));
      } else {
        mine = pack(reads);
        mine.resize(block);
      }
      f.staging.push_back(std::move(mine));
      const std::span<const float> in = f.staging.back();
      if (single(writes))
        f.handles.push_back(c.start_all_gather(in, view_of(writes[0])));
      else
        f.handles.push_back(c.start_all_gather(in, output_to(writes, elems)));
      break;
    }
    case OpKind::ReduceScatter: {
      // Input: the largest view it reads; output: its write. When the output is also read (a
      // ZeRO-2/3 gradient shard over micro-batches), the result adds to it.
      const std::size_t block = elems / n;
      const TensorUse* input = &reads.front();
      for (const auto& u : reads)
        if (u.bytes > input->bytes) input = &u;
      std::span<const float> in = view_of(*input);
      const TensorUse out = writes.front();
      const bool in_place = out.tensor == input->tensor;
      const bool accumulate = !in_place && std::any_of(reads.begin(), reads.end(), [&](const TensorUse& u) { return u.tensor == out.tensor; });
      if (in_place) {
        // ZeRO-1's full-size buffer: the rank's block of the sum lands in its own slice.
        TensorUse slice = out;
        slice.offset += static_cast<std::int64_t>(me * block * sizeof(float));
        slice.bytes = static_cast<std::int64_t>(block * sizeof(float));
        f.staging.push_back(std::vector<float>(in.begin(), in.end()));
        in = f.staging.back();
        f.handles.push_back(c.start_reduce_scatter(in, output_to({slice}, block)));
      } else {
        f.handles.push_back(c.start_reduce_scatter(in, output_to({out}, block, accumulate)));
      }
      break;
    }
    case OpKind::AllToAll:
      f.handles.push_back(c.start_all_to_all(view_of(reads.front()), view_of(writes.front())));
      break;
    // Tags keep the message streams apart: with two pipeline stages "next" and "previous" are the
    // same rank, and activations and gradients must not match each other's receives.
    // A message is copied out at posting: its tensor's bytes are free for reuse at once, so the
    // sender never waits for its receiver to reach the matching receive (which may be waiting for
    // this rank further down its program).
    case OpKind::Send:
      f.staging.push_back(pack({reads.front()}));
      f.ranges.clear();
      f.handles.push_back(c.start_send(f.staging.back(), peer, op.peer > 0 ? kForwardTag : kBackwardTag));
      break;
    case OpKind::Recv:
      f.handles.push_back(c.start_recv(view_of(writes.front()), peer, op.peer < 0 ? kForwardTag : kBackwardTag));
      break;
    case OpKind::RingExchange:
      f.staging.push_back(pack({reads.front()}));
      f.ranges = {{arena_.offset(writes.front().tensor) + writes.front().offset,
                   arena_.offset(writes.front().tensor) + writes.front().offset + writes.front().bytes}};
      f.handles.push_back(c.start_recv(view_of(writes.front()), prev, kRingTag));
      f.handles.push_back(c.start_send(f.staging.back(), peer, kRingTag));
      break;
    default:
      assert(false && "not a comm op");
  }
  in_flight_.push_back(std::move(f));
}

}  // namespace px
