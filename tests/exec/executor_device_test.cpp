// The executor's device mode, through a host-memory stand-in for a device backend: the arena
// comes from the backend's memory and is zeroed only through it, comm ops go to the backend's
// marks instead of the communicators, the backend's device clock replaces the host's times,
// bf16 plans are accepted there and refused on the host, and a real communicator is refused.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <set>

#include "engine/comm/standin_comm.hpp"
#include "engine/core/error.hpp"
#include "engine/exec/executor.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "engine/spec/validate.hpp"

namespace px {
namespace {

// Keeps the "device" arena in host memory and records what the executor asks of it.
class FakeDevice final : public ComputeBackend, public ArenaMemory {
 public:
  std::byte* allocate(std::size_t bytes) override {
    ++allocations;
    allocated = bytes;
    auto* p = static_cast<std::byte*>(std::aligned_alloc(256, bytes));
    std::memset(p, 0, bytes);
    base = p;
    return p;
  }
  void release(std::byte* p) override {
    ++releases;
    std::free(p);
  }
  void zero(std::span<std::byte> b) override {
    ++zeroes;
    std::memset(b.data(), 0, b.size());
  }
  void download(std::span<const std::byte> from, std::byte* to) override { std::memcpy(to, from.data(), from.size()); }
  void upload(const std::byte* from, std::span<std::byte> to) override { std::memcpy(to.data(), from, to.size()); }
  ArenaMemory* arena_memory() override { return this; }
  void run(const Program& program, std::uint32_t index, TensorArena&) override {
    EXPECT_FALSE(is_comm(program.ops[index].kind));
    order.push_back(index);
  }
  void mark(std::uint32_t index) override { order.push_back(index); ++marks; }
  void device_timings(std::span<OpTiming> t) override {
    ++collected;
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = {1.0 + static_cast<double>(i), 1.5 + static_cast<double>(i)};
  }

  std::byte* base = nullptr;
  std::size_t allocated = 0;
  int allocations = 0, releases = 0, zeroes = 0, marks = 0, collected = 0;
  std::vector<std::uint32_t> order;
};

CompiledPlan plan_of(DType precision, int tp) {
  const ModelSpec model = load_model_file(std::string(PX_DATASETS_DIR) + "/models/tiny-gpt.yaml");
  PlanSpec p;
  p.precision = precision;
  p.grad_dtype = DType::F32;
  p.tensor_model_parallel_size = tp;
  p.micro_batch_size = 1;
  p.global_batch_size = 2;
  p.seq_length = 32;
  return compile_plan(model, resolve_plan(p, model, nullptr));
}

struct StandIns {
  std::vector<std::unique_ptr<StandInCommunicator>> owned;
  GroupComms comms{};
  StandIns(const CompiledPlan& plan, int rank) {
    for (int g = 1; g < kNumGroupKinds; ++g) {
      const auto kind = static_cast<GroupKind>(g);
      if (plan.topology.group_id(kind, rank) < 0) continue;
      owned.push_back(std::make_unique<StandInCommunicator>("g", plan.topology.group_index(kind, rank), plan.topology.size(kind)));
      comms[static_cast<std::size_t>(g)] = owned.back().get();
    }
  }
};

TEST(ExecutorDevice, RunsABf16PlanInTheBackendsMemoryOnItsClock) {
  const CompiledPlan plan = plan_of(DType::BF16, 2);
  const Program& prog = plan.program_of(1);
  StandIns s(plan, 1);
  FakeDevice dev;
  {
    Executor ex(plan, 1, dev, s.comms);
    EXPECT_EQ(dev.allocations, 1);
    EXPECT_GE(dev.allocated, static_cast<std::size_t>(ex.memory().arena_bytes));
    EXPECT_EQ(ex.arena().bytes(0).data(), dev.base + ex.arena().offset(0));
    const auto t = ex.run_iteration();
    EXPECT_EQ(dev.collected, 1);
    ASSERT_EQ(t.size(), prog.ops.size());
    // Every op reached the backend once, in program order; comm ops as marks.
    ASSERT_EQ(dev.order.size(), prog.ops.size());
    for (std::uint32_t i = 0; i < prog.ops.size(); ++i) EXPECT_EQ(dev.order[i], i);
    std::size_t comm = 0;
    for (const Op& op : prog.ops) comm += is_comm(op.kind);
    EXPECT_GT(comm, 0u);
    EXPECT_EQ(dev.marks, static_cast<int>(comm));
    for (const auto& sc : s.owned) EXPECT_EQ(sc->operations(), 0) << "a stand-in was called on device memory";
    // Gradients and every fresh tensor were zeroed through the device, never by the host.
    std::set<std::uint32_t> fresh;
    for (std::uint32_t i = 0; i < prog.tensors.size(); ++i)
      if (prog.tensors[i].cls == TensorClass::Gradient || !is_persistent(prog.tensors[i].cls)) fresh.insert(i);
    EXPECT_GE(dev.zeroes, 1);
    EXPECT_LE(dev.zeroes, static_cast<int>(fresh.size()));
    // The device's times, serialised per stream as for the host.
    EXPECT_GE(t[0].start, 1.0);
    for (const auto& x : t) EXPECT_GE(x.end, x.start);
    for (double h : ex.host_seconds()) EXPECT_EQ(h, 0.0);
  }
  EXPECT_EQ(dev.releases, 1);
}

TEST(ExecutorDevice, HostBackendsStillRefuseBf16Plans) {
  const CompiledPlan plan = plan_of(DType::BF16, 1);
  NullBackend host;
  try {
    Executor ex(plan, 0, host, {});
    FAIL() << "a bf16 plan ran on the host";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fp32 plans only"), std::string::npos) << e.what();
  }
}

// A communicator that is not a stand-in: the device engine cannot move its data.
class RealLike final : public Communicator {
 public:
  explicit RealLike(int size) : size_(size) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
#define PX_NO(sig) CommHandlePtr sig override { return nullptr; }
  PX_NO(start_all_reduce(std::span<float>))
  PX_NO(start_all_reduce_max(std::span<float>))
  PX_NO(start_reduce_scatter(std::span<const float>, std::span<float>))
  PX_NO(start_all_gather(std::span<const float>, std::span<float>))
  PX_NO(start_all_to_all(std::span<const float>, std::span<float>))
  PX_NO(start_all_to_all_v(std::span<const float>, const std::vector<int>&, const std::vector<int>&, std::span<float>,
                           const std::vector<int>&, const std::vector<int>&))
  PX_NO(start_broadcast(std::span<float>, int))
  PX_NO(start_send(std::span<const float>, int, int))
  PX_NO(start_recv(std::span<float>, int, int))
  PX_NO(start_barrier())
#undef PX_NO
 private:
  int size_;
  std::string name_ = "tp#0";
};

TEST(ExecutorDevice, RefusesARealCommunicatorNamingTheOpAndGroup) {
  const CompiledPlan plan = plan_of(DType::BF16, 2);
  StandIns s(plan, 0);
  RealLike tp(2);
  s.comms[static_cast<std::size_t>(GroupKind::TP)] = &tp;
  FakeDevice dev;
  try {
    Executor ex(plan, 0, dev, s.comms);
    FAIL() << "a device executor took a real communicator";
  } catch (const Error& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("group tp of 2 ranks"), std::string::npos) << w;
    EXPECT_NE(w.find("--emulate-rank"), std::string::npos) << w;
  }
}

}  // namespace
}  // namespace px
