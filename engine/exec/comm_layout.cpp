// Each comm op kind's operands, from the views the plan compiler gave it.
#include "engine/exec/comm_layout.hpp"

#include <algorithm>
#include <cassert>
#include <cstring>

#include "engine/spec/spec.hpp"

namespace px {
namespace {

struct Views {
  const MemoryPlan& memory;

  ArenaRange of(const TensorUse& u) const { return {memory.offsets[u.tensor] + u.offset, u.bytes}; }

  // Bytes [begin, end) of the views laid end to end, as copies into a staging buffer from byte 0.
  std::vector<StagingCopy> concat(const std::vector<TensorUse>& us, std::int64_t begin, std::int64_t end) const {
    std::vector<StagingCopy> out;
    std::int64_t at = 0;  // where the view starts in the concatenation
    for (const TensorUse& u : us) {
      const std::int64_t lo = std::max(begin, at), hi = std::min(end, at + u.bytes);
      if (lo < hi) out.push_back({of(u).offset + (lo - at), lo - begin, hi - lo});
      at += u.bytes;
    }
    return out;
  }
  std::vector<StagingCopy> concat(const std::vector<TensorUse>& us) const { return concat(us, 0, total(us)); }
  static std::int64_t total(const std::vector<TensorUse>& us) {
    std::int64_t n = 0;
    for (const TensorUse& u : us) n += u.bytes;
    return n;
  }
};

}  // namespace

CommLayout comm_layout(const Program& program, std::uint32_t index, const MemoryPlan& memory, int member, int size) {
  const Op& op = program.ops[index];
  const Views v{memory};
  CommLayout L;
  L.dtype = op.dtype;
  const auto e = static_cast<std::int64_t>(dtype_bytes(op.dtype));
  const std::int64_t bytes = op.comm_bytes;
  const std::int64_t block = bytes / e / size * e;  // one member's block, in bytes
  std::vector<TensorUse> reads, writes;
  for (const TensorUse& u : program.uses_of(op)) {
    (u.write ? writes : reads).push_back(u);
    L.holds.push_back(v.of(u));
    if (u.write) L.writes.push_back(v.of(u));
  }
  const auto arena = [&](const TensorUse& u) { return CommOperand{-1, v.of(u)}; };
  const auto staged = [](int s) { return CommOperand{s, {}}; };
  const bool single = writes.size() == 1 && writes[0].bytes == bytes;  // the output is one whole view
  // The output staged: drained into `writes` laid end to end.
  const auto stage_output = [&](std::int64_t size_bytes) {
    L.staging_bytes[kStagingOut] = size_bytes;
    L.drain = v.concat(writes);
    L.out = staged(kStagingOut);
  };
  L.to = (member + size + op.peer) % size;  // Send/Recv/ring: the member op.peer places on
  L.from = L.to;

  switch (op.kind) {
    case OpKind::AllReduce:
      L.call = op.variant == Variant::ReduceMax ? CommLayout::Call::AllReduceMax : CommLayout::Call::AllReduce;
      if (single) {
        L.out = arena(writes[0]);
      } else {
        stage_output(bytes);
        L.fill[kStagingOut] = L.drain;
      }
      break;
    case OpKind::AllGather:
      L.call = CommLayout::Call::AllGather;
      // The local block: the shard it reads, or (weights gathered back in place) its own block.
      if (reads.size() == 1 && reads[0].bytes == block) {
        L.in = arena(reads[0]);
      } else {
        L.staging_bytes[kStagingIn] = block;
        L.fill[kStagingIn] = reads.empty() ? v.concat(writes, member * block, (member + 1) * block) : v.concat(reads, 0, block);
        L.in = staged(kStagingIn);
      }
      if (single)
        L.out = arena(writes[0]);
      else
        stage_output(bytes);
      break;
    case OpKind::ReduceScatter: {
      // Input: the largest view it reads; output: its write. When the output is also read (a
      // ZeRO-2/3 gradient shard over micro-batches), the result adds to it.
      L.call = CommLayout::Call::ReduceScatter;
      const TensorUse* input = &reads.front();
      for (const TensorUse& u : reads)
        if (u.bytes > input->bytes) input = &u;
      const TensorUse out = writes.front();
      const bool in_place = out.tensor == input->tensor;
      if (in_place) {
        // ZeRO-1's full-size buffer: the member's block of the sum lands in its own slice, and the
        // input is copied out first (a collective's input and output must not overlap).
        L.staging_bytes[kStagingIn] = input->bytes;
        L.fill[kStagingIn] = v.concat({*input});
        L.in = staged(kStagingIn);
        L.staging_bytes[kStagingOut] = block;
        L.drain = {{v.of(out).offset + member * block, 0, block}};
        L.out = staged(kStagingOut);
      } else {
        L.in = arena(*input);
        L.accumulate = std::any_of(reads.begin(), reads.end(), [&](const TensorUse& u) { return u.tensor == out.tensor; });
        assert(out.bytes == block);
        if (L.accumulate)
          stage_output(block);
        else
          L.out = arena(out);
      }
      break;
    }
    case OpKind::AllToAll:
      L.call = CommLayout::Call::AllToAll;
      L.in = arena(reads.front());
      L.out = arena(writes.front());
      break;
    // A message is copied out at posting: its tensor's bytes are free for reuse at once, so the
    // sender never waits for its receiver to reach the matching receive (which may be waiting for
    // this member further down its program). Tags (communicator.hpp) keep message streams apart:
    // with two pipeline stages "next" and "previous" are the same member, and activations and
    // gradients must not match each other's receives.
    case OpKind::Send:
      L.call = CommLayout::Call::Send;
      L.tag = op.peer > 0 ? kForwardTag : kBackwardTag;
      L.staging_bytes[kStagingIn] = reads.front().bytes;
      L.fill[kStagingIn] = v.concat({reads.front()});
      L.in = staged(kStagingIn);
      L.holds.clear();
      break;
    case OpKind::Recv:
      L.call = CommLayout::Call::Recv;
      L.tag = op.peer < 0 ? kForwardTag : kBackwardTag;
      L.out = arena(writes.front());
      break;
    case OpKind::RingExchange:
      L.call = CommLayout::Call::RingExchange;
      L.tag = kRingTag;
      L.from = (member + size - 1) % size;
      L.staging_bytes[kStagingIn] = reads.front().bytes;
      L.fill[kStagingIn] = v.concat({reads.front()});
      L.in = staged(kStagingIn);
      L.out = arena(writes.front());
      L.holds = {v.of(writes.front())};
      break;
    default:
      assert(false && "not a comm op");
  }
  return L;
}

namespace {

std::span<float> floats(const CommOperand& o, HostComm& posted, TensorArena& arena) {
  if (o.staging >= 0) return posted.staging[static_cast<std::size_t>(o.staging)];
  const auto b = arena.bytes_at(o.range.offset, o.range.bytes);
  return {reinterpret_cast<float*>(b.data()), b.size() / sizeof(float)};
}

}  // namespace

HostComm post_on_host(const CommLayout& L, Communicator& c, TensorArena& arena) {
  assert(L.dtype == DType::F32);
  HostComm f;
  for (std::size_t s = 0; s < 2; ++s) {
    f.staging[s].assign(static_cast<std::size_t>(L.staging_bytes[s]) / sizeof(float), 0.0f);
    for (const StagingCopy& copy : L.fill[s])
      std::memcpy(reinterpret_cast<std::byte*>(f.staging[s].data()) + copy.staging, arena.bytes_at(copy.arena, copy.bytes).data(),
                  static_cast<std::size_t>(copy.bytes));
  }
  const std::span<float> in = floats(L.in, f, arena), out = floats(L.out, f, arena);
  using Call = CommLayout::Call;
  switch (L.call) {
    case Call::AllReduce: f.handles.push_back(c.start_all_reduce(out)); break;
    case Call::AllReduceMax: f.handles.push_back(c.start_all_reduce_max(out)); break;
    case Call::AllGather: f.handles.push_back(c.start_all_gather(in, out)); break;
    case Call::ReduceScatter: f.handles.push_back(c.start_reduce_scatter(in, out)); break;
    case Call::AllToAll: f.handles.push_back(c.start_all_to_all(in, out)); break;
    case Call::Send: f.handles.push_back(c.start_send(in, L.to, L.tag)); break;
    case Call::Recv: f.handles.push_back(c.start_recv(out, L.from, L.tag)); break;
    case Call::RingExchange:
      f.handles.push_back(c.start_recv(out, L.from, L.tag));
      f.handles.push_back(c.start_send(in, L.to, L.tag));
      break;
  }
  return f;
}

void drain_on_host(const CommLayout& L, const HostComm& posted, TensorArena& arena) {
  const float* src = posted.staging[kStagingOut].data();
  for (const StagingCopy& c : L.drain) {
    auto* dst = reinterpret_cast<float*>(arena.bytes_at(c.arena, c.bytes).data());
    const float* from = src + c.staging / static_cast<std::int64_t>(sizeof(float));
    const auto n = static_cast<std::size_t>(c.bytes) / sizeof(float);
    for (std::size_t i = 0; i < n; ++i) dst[i] = L.accumulate ? dst[i] + from[i] : from[i];
  }
}

}  // namespace px
