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
      groups_(groups),
      memory_(plan_memory(program_)),
      arena_(program_, memory_),
      epoch_(seconds_now()) {
  if (plan.plan.precision != DType::F32 || plan.plan.grad_dtype != DType::F32)
    throw Error(ErrorKind::Usage, {}, "the CPU engine executes fp32 plans only", "set precision: fp32 and grad_dtype: fp32");
  for (const Op& op : program_.ops) {
    if (!is_comm(op.kind)) continue;
    const Communicator* c = groups_[static_cast<std::size_t>(op.group)];
    const int want = plan.topology.size(op.group);
    if (!c || c->size() != want)
      throw Error(ErrorKind::Usage, {},
                  fmt::format("rank {} has no {}-member communicator for group {}", rank, want, to_string(op.group)),
                  "launch with the plan's world size");
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
  if (heartbeat_) heartbeat_->beat(iteration_, 0, true);  // every iteration's start is on record
  for (std::uint32_t i = 0; i < program_.ops.size(); ++i) {
    const Op& op = program_.ops[i];
    current_op_ = i;
    if (heartbeat_) heartbeat_->beat(iteration_, i);
    for (auto d : program_.deps_of(op)) wait_for(d);
    wait_overlapping(i);
    if (is_comm(op.kind)) {
      timings_[i].start = now();
      post(i);
    } else {
      timings_[i].start = now();
      backend_.run(program_, i, arena_);
      timings_[i].end = now();
    }
    // Retire what has finished, so recorded ends are close to the truth.
    for (std::size_t f = 0; f < in_flight_.size();) {
      bool done = true;
      for (auto& h : in_flight_[f].handles) done = done && h->test();
      if (done) {
        finish(in_flight_[f]);
        in_flight_.erase(in_flight_.begin() + static_cast<std::ptrdiff_t>(f));
      } else {
        ++f;
      }
    }
  }
  while (!in_flight_.empty()) wait_for(in_flight_.front().op);
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
void Executor::wait_overlapping(std::uint32_t index) {
  const Op& op = program_.ops[index];
  for (const TensorUse& u : program_.uses_of(op)) {
    if (!u.write) continue;
    const std::pair<std::int64_t, std::int64_t> w{arena_.offset(u.tensor), arena_.offset(u.tensor) + program_.tensors[u.tensor].bytes};
    for (std::size_t f = 0; f < in_flight_.size();) {
      const bool hit = std::any_of(in_flight_[f].ranges.begin(), in_flight_[f].ranges.end(), [&](auto r) { return overlaps(r, w); });
      if (hit && in_flight_[f].op != index) {
        wait_for(in_flight_[f].op);
      } else {
        ++f;
      }
    }
  }
}

void Executor::finish(InFlight& f) {
  for (const auto& u : f.unpack) {
    auto dst = arena_.floats(u.tensor);
    const auto& src = f.staging.back();
    if (u.to >= dst.size() || u.from >= src.size()) continue;
    std::copy_n(src.begin() + static_cast<std::ptrdiff_t>(u.from), std::min(dst.size() - u.to, src.size() - u.from),
                dst.begin() + static_cast<std::ptrdiff_t>(u.to));
  }
  timings_[f.op].end = now();
}

void Executor::post(std::uint32_t index) {
  const Op& op = program_.ops[index];
  Communicator& c = *groups_[static_cast<std::size_t>(op.group)];
  const auto elems = static_cast<std::size_t>(op.comm_bytes) / sizeof(float);
  const auto n = static_cast<std::size_t>(c.size());
  std::vector<std::uint32_t> reads, writes;
  InFlight f{index, {}, {}, {}, {}};
  f.staging.reserve(2);  // spans into staging buffers must survive later push_backs
  for (const TensorUse& u : program_.uses_of(op)) {
    (u.write ? writes : reads).push_back(u.tensor);
    f.ranges.emplace_back(arena_.offset(u.tensor), arena_.offset(u.tensor) + program_.tensors[u.tensor].bytes);
  }
  auto floats = [&](std::uint32_t t) { return arena_.floats(t); };
  // Concatenation of tensors, resized to `size` elements.
  auto pack = [&](const std::vector<std::uint32_t>& ts, std::size_t size) {
    std::vector<float> buf;
    for (auto t : ts) buf.insert(buf.end(), floats(t).begin(), floats(t).end());
    buf.resize(size);
    return buf;
  };
  // An output staging buffer whose consecutive parts go back to `ts` when the op ends.
  auto output_to = [&](const std::vector<std::uint32_t>& ts, std::vector<float> buf) -> std::span<float> {
    std::size_t offset = 0;
    for (auto t : ts) {
      f.unpack.push_back({t, offset, 0});
      offset += floats(t).size();
    }
    f.staging.push_back(std::move(buf));
    return f.staging.back();
  };
  auto single = [&](const std::vector<std::uint32_t>& ts, std::size_t size) { return ts.size() == 1 && floats(ts[0]).size() == size; };
  const std::size_t me = static_cast<std::size_t>(c.rank());
  const int peer = (c.rank() + c.size() + op.peer) % c.size();  // Send/Recv/ring: the member op.peer places on
  const int prev = (c.rank() + c.size() - 1) % c.size();

  switch (op.kind) {
    case OpKind::AllReduce:
      if (single(writes, elems)) {
        f.handles.push_back(c.start_all_reduce(floats(writes[0])));
      } else {
        f.handles.push_back(c.start_all_reduce(output_to(writes, pack(writes, elems))));
      }
      break;
    case OpKind::AllGather: {
      const std::size_t block = elems / n;
      // The local block: the shards it reads, or (weights gathered back in place) its own slice.
      std::vector<float> mine;
      if (reads.empty()) {
        const auto all = pack(writes, elems);
        mine.assign(all.begin() + static_cast<std::ptrdiff_t>(me * block), all.begin() + static_cast<std::ptrdiff_t>((me + 1) * block));
      } else {
        mine = pack(reads, block);
      }
      f.staging.push_back(std::move(mine));
      const std::span<const float> in = f.staging.back();
      if (single(writes, elems))
        f.handles.push_back(c.start_all_gather(in, floats(writes[0])));
      else
        f.handles.push_back(c.start_all_gather(in, output_to(writes, std::vector<float>(elems))));
      break;
    }
    case OpKind::ReduceScatter: {
      const std::size_t block = elems / n;
      std::uint32_t input = reads.front();
      for (auto t : reads)
        if (program_.tensors[t].bytes > program_.tensors[input].bytes) input = t;
      std::span<const float> in = floats(input);
      if (in.size() != elems) {
        f.staging.push_back(pack({input}, elems));
        in = f.staging.back();
      }
      const std::uint32_t output = writes.front();
      if (output == input) {
        // In place (ZeRO-1's full-size buffer): the rank's block of the sum lands in its own slice.
        f.staging.emplace_back(block, 0.0f);
        f.unpack.push_back({output, 0, me * block});
        f.handles.push_back(c.start_reduce_scatter(in, f.staging.back()));
      } else if (floats(output).size() >= block) {
        f.handles.push_back(c.start_reduce_scatter(in, floats(output).first(block)));
      } else {
        f.handles.push_back(c.start_reduce_scatter(in, output_to({output}, std::vector<float>(block))));
      }
      break;
    }
    case OpKind::AllToAll:
      f.handles.push_back(c.start_all_to_all(floats(reads.front()).first(elems), floats(writes.front()).first(elems)));
      break;
    // Tags keep the message streams apart: with two pipeline stages "next" and "previous" are the
    // same rank, and activations and gradients must not match each other's receives.
    // A message is copied out at posting: its tensor's bytes are free for reuse at once, so the
    // sender never waits for its receiver to reach the matching receive (which may be waiting for
    // this rank further down its program).
    case OpKind::Send:
      f.staging.push_back(pack({reads.front()}, elems));
      f.ranges.clear();
      f.handles.push_back(c.start_send(f.staging.back(), peer, op.peer > 0 ? kForwardTag : kBackwardTag));
      break;
    case OpKind::Recv:
      f.handles.push_back(c.start_recv(floats(writes.front()).first(elems), peer, op.peer < 0 ? kForwardTag : kBackwardTag));
      break;
    case OpKind::RingExchange:
      f.staging.push_back(pack({reads.front()}, elems));
      f.ranges = {{arena_.offset(writes.front()), arena_.offset(writes.front()) + program_.tensors[writes.front()].bytes}};
      f.handles.push_back(c.start_recv(floats(writes.front()).first(elems), prev, kRingTag));
      f.handles.push_back(c.start_send(f.staging.back(), peer, kRingTag));
      break;
    default:
      assert(false && "not a comm op");
  }
  in_flight_.push_back(std::move(f));
}

}  // namespace px
