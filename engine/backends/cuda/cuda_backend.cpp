// Op-by-op dispatch of a rank's bf16 program onto the CUDA kernels, on one stream. Shapes come
// from the op, operands from its views, everything that depends on where the rank sits from the
// shared RankContext; the micro-batches' tokens go up once per iteration and dropout keys through
// pinned memory, so no op waits for the host.
#include "engine/backends/cuda/cuda_backend.hpp"

#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <thread>
#include <utility>

#include "engine/backends/cpu/adamw.hpp"
#include "engine/backends/cuda/activation.hpp"
#include "engine/backends/cuda/adamw.hpp"
#include "engine/backends/cuda/attention.hpp"
#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/cross_entropy.hpp"
#include "engine/backends/cuda/device_buffer.hpp"
#include "engine/backends/cuda/dropout.hpp"
#include "engine/backends/cuda/embedding.hpp"
#include "engine/backends/cuda/gemm.hpp"
#include "engine/backends/cuda/moe.hpp"
#include "engine/backends/cuda/norm.hpp"
#include "engine/backends/cuda/rope.hpp"
#include "engine/backends/cuda/tensor_ops.hpp"
#include "engine/core/error.hpp"
#include "engine/comm/device_communicator.hpp"

namespace px::cuda {
namespace {

using i64 = std::int64_t;
using cpu::forward_phase;
using cpu::Operands;

template <class T>
T* at(TensorArena& arena, const TensorUse& u) {
  return reinterpret_cast<T*>(arena.bytes(u.tensor).data() + u.offset);
}
template <class T>
i64 count(const TensorUse& u) {
  return u.bytes / static_cast<i64>(sizeof(T));
}

// Device scratch that only grows (a cudaFree on growth waits for the device: first iteration only).
template <class T>
T* grow(DeviceBuffer<T>& b, i64 n) {
  if (static_cast<i64>(b.size()) < n) b = DeviceBuffer<T>(static_cast<std::size_t>(n));
  return b.data();
}

// Pinned host memory, for copies the host must not wait for.
template <class T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(std::size_t n) : n_(n) {
    if (n > 0) PX_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~PinnedBuffer() {
    if (p_) (void)cudaFreeHost(p_);
  }
  T* data() { return p_; }
  std::size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace

// An NVTX range for the life of a scope, closed on every way out.
struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

struct CudaBackend::Impl {
  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  // Also what a constructor that throws half way leaves.
  ~Impl() {
    if (stream) (void)cudaStreamSynchronize(stream);
    for (auto t : timing)
      if (t) (void)cudaStreamDestroy(t);
    for (auto& s : staging)
      for (auto* p : s)
        if (p) (void)cudaFree(p);
    for (auto e : start)
      if (e) (void)cudaEventDestroy(e);
    for (auto e : end)
      if (e) (void)cudaEventDestroy(e);
    gemm.reset();
    if (stream) (void)cudaStreamDestroy(stream);
  }

  cudaStream_t stream = nullptr;
  bool first_op = true;  // the next op is the iteration's first: it anchors the device clock
  std::unique_ptr<GemmContext> gemm;
  std::vector<cudaEvent_t> start, end;  // per op
  std::vector<char> timed;              // ops with an end event this iteration (marks have none)
  // Comm ops over NCCL: per op its staging while in flight and its finished handles until
  // device_timings; per executor stream one idle stream that records each finished op's end.
  std::vector<std::array<std::byte*, 2>> staging;
  std::vector<DeviceCommunicator*> comm_of;
  std::vector<std::vector<CommHandlePtr>> finished;
  std::array<cudaStream_t, kNumStreams> timing{};

  // Before the host blocks on the compute stream: the comm ops it waits for, waited for by the
  // host first (their waits time out; a stream synchronize would not).
  void wait_comm_on_host() {
    for (auto& handles : finished)
      for (auto& h : handles) h->wait();
  }
  // Per op, worked out once: its operands and its name (the NVTX range), not on every issue.
  std::vector<Operands> operands;
  std::vector<std::string> names;

  // Every micro-batch of the iteration, [micro-batch][T] each, uploaded by begin_iteration.
  PinnedBuffer<std::int32_t> host_feed;
  DeviceBuffer<std::int32_t> tokens, targets, positions;
  // Dropout row keys: a pinned region per dropout op of the iteration, so no copy overwrites one
  // still waiting to go up.
  PinnedBuffer<std::uint64_t> host_keys;
  std::vector<i64> key_offset;  // per op, into host_keys / keys (-1: none)
  DeviceBuffer<std::uint64_t> keys;

  DeviceBuffer<std::byte> workspace;  // norm and embedding backward
  DeviceBuffer<float> out32, dqkv32, dkv32, delta, losses, dloss, d_logits;
  DeviceBuffer<std::int32_t> row_assignment;
  DeviceBuffer<bf16> tmp;
  DeviceBuffer<double> loss_sum{1}, norm_sq{1}, sos{sum_of_squares_workspace_doubles()};
  DeviceBuffer<float> clip{1};
  std::vector<AdamWTensor> adamw;
  std::vector<GradTensor> owned_grads;

  // Optimizer offload: fp32 master weights and Adam moments in host memory, the owned gradients
  // copied down into pinned memory and the updated weights sent back up as bf16.
  struct HostSlice {
    bf16* weights;      // device: the owned range of the buffer's working copy
    const float* grads;  // device: the owned range of its gradients
    i64 host = 0;       // offset into the host vectors
    i64 count = 0;
    i64 state = 0;      // the buffer's optimizer offset (m, then v)
  };
  std::vector<HostSlice> host_slices;
  std::vector<float> host_weights, host_state;
  PinnedBuffer<float> host_grads, host_norm_sq{1};
  PinnedBuffer<bf16> host_bf16;
};

CudaBackend::CudaBackend(const CompiledPlan& plan, int rank, const TokenSource& data, const cpu::TrainOptions& options)
    : plan_(plan), program_(plan.program_of(rank)), ctx_(plan, rank, data, options.seed), opt_(options), impl_(std::make_unique<Impl>()) {
  const PlanSpec& p = plan.plan;
  if (p.precision != DType::BF16 || p.grad_dtype != DType::F32)
    throw Error(ErrorKind::Usage, {}, "the CUDA engine trains bf16 plans with fp32 gradients",
                "pass --precision bf16 (and grad_dtype: fp32)");
  if (ctx_.dims().d > 256)
    throw Error(ErrorKind::Usage, {plan.model.file, 0, 0, -1}, fmt::format("head dim {} exceeds the attention kernel's 256", ctx_.dims().d),
                "use a model with head dim <= 256");
  Impl& im = *impl_;
  PX_CUDA_CHECK(cudaStreamCreateWithFlags(&im.stream, cudaStreamNonBlocking));
  im.gemm = std::make_unique<GemmContext>(im.stream);
  const std::size_t n = program_.ops.size();
  im.start.assign(n, nullptr);
  im.end.assign(n, nullptr);
  im.timed.assign(n, 0);
  im.staging.assign(n, {});
  im.comm_of.assign(n, nullptr);
  im.finished.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    PX_CUDA_CHECK(cudaEventCreate(&im.start[i]));
    PX_CUDA_CHECK(cudaEventCreate(&im.end[i]));
    im.operands.push_back(cpu::operands(program_, program_.ops[i]));
    im.names.emplace_back(program_.name_of(program_.ops[i]));
  }
  const LocalDims& z = ctx_.dims();
  const i64 feed = static_cast<i64>(plan.num_micro_batches) * z.T;
  im.host_feed = PinnedBuffer<std::int32_t>(static_cast<std::size_t>(3 * feed));
  im.tokens = DeviceBuffer<std::int32_t>(static_cast<std::size_t>(feed));
  im.targets = DeviceBuffer<std::int32_t>(static_cast<std::size_t>(feed));
  im.positions = DeviceBuffer<std::int32_t>(static_cast<std::size_t>(feed));
  i64 keys = 0;
  im.key_offset.assign(n, -1);
  for (std::size_t i = 0; i < n; ++i) {
    const Op& op = program_.ops[i];
    if (op.kind != OpKind::DropoutAdd || !forward_phase(op.phase)) continue;
    if (im.operands[i].out.size() < 2) continue;  // no mask: no dropout
    im.key_offset[i] = keys;
    keys += op.m;
  }
  im.host_keys = PinnedBuffer<std::uint64_t>(static_cast<std::size_t>(keys));
  im.keys = DeviceBuffer<std::uint64_t>(static_cast<std::size_t>(keys));
}

CudaBackend::~CudaBackend() = default;

std::string CudaBackend::device_name() const {
  int device = 0;
  PX_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  PX_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

std::vector<std::span<float>> CudaBackend::offloaded_state() { return {impl_->host_weights, impl_->host_state}; }

std::byte* CudaBackend::allocate(std::size_t bytes) {
  void* p = nullptr;
  PX_CUDA_CHECK(cudaMalloc(&p, bytes));  // 256-byte aligned
  PX_CUDA_CHECK(cudaMemset(p, 0, bytes));
  return static_cast<std::byte*>(p);
}

void CudaBackend::release(std::byte* p) {
  if (impl_->stream) (void)cudaStreamSynchronize(impl_->stream);
  (void)cudaFree(p);
}

void CudaBackend::zero(std::span<std::byte> bytes) {
  if (!bytes.empty()) PX_CUDA_CHECK(cudaMemsetAsync(bytes.data(), 0, bytes.size(), impl_->stream));
}

void CudaBackend::download(std::span<const std::byte> from, std::byte* to) {
  PX_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  if (!from.empty()) PX_CUDA_CHECK(cudaMemcpy(to, from.data(), from.size(), cudaMemcpyDeviceToHost));
}

void CudaBackend::upload(const std::byte* from, std::span<std::byte> to) {
  PX_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  if (!to.empty()) PX_CUDA_CHECK(cudaMemcpy(to.data(), from, to.size(), cudaMemcpyHostToDevice));
}

void CudaBackend::initialize(TensorArena& arena) {
  Impl& im = *impl_;
  im.adamw.clear();
  im.owned_grads.clear();
  im.host_slices.clear();
  im.host_weights.clear();
  std::uint32_t optimizer = 0;
  for (std::uint32_t t = 0; t < program_.tensors.size(); ++t)
    if (program_.tensors[t].cls == TensorClass::Optimizer) optimizer = t;
  float* state = program_.optimizer_elements > 0 && !plan_.plan.optimizer_offload
                     ? reinterpret_cast<float*>(arena.bytes(optimizer).data())
                     : nullptr;
  // A large shard (Llama-3 70B at tp8: 8.75e9 weights) takes minutes on one core: the host draws
  // a batch of buffers' initial values on every core, then uploads them; a batch holds at most
  // 2^30 weights (6 GiB of host memory as fp32 and bf16).
  const std::size_t threads = std::max(1u, std::thread::hardware_concurrency());
  constexpr std::size_t kBatchWeights = std::size_t{1} << 30;
  const auto& buffers = program_.buffers;
  for (std::size_t first = 0, last = 0; first < buffers.size(); first = last) {
    std::size_t weights = 0;
    for (last = first; last < buffers.size() && last - first < threads && (last == first || weights < kBatchWeights); ++last)
      weights += arena.bytes(buffers[last].weight).size() / sizeof(bf16);
    std::vector<std::vector<float>> host(last - first);
    std::vector<std::thread> pool;
    for (std::size_t i = first; i < last; ++i)
      pool.emplace_back([&, i] {
        host[i - first].resize(arena.bytes(buffers[i].weight).size() / sizeof(bf16));
        ctx_.initial_weights(buffers[i], host[i - first]);
      });
    for (auto& t : pool) t.join();
    for (std::size_t i = first; i < last; ++i) {
      const ParamBuffer& b = buffers[i];
      const std::vector<float>& w = host[i - first];
      auto wbytes = arena.bytes(b.weight);
      const std::vector<bf16> wb = to_bf16(w);
      PX_CUDA_CHECK(cudaMemcpy(wbytes.data(), wb.data(), wb.size() * sizeof(bf16), cudaMemcpyHostToDevice));
      // [m | v | master] over the elements whose optimizer state this rank holds.
      const cpu::RankContext::Range r = ctx_.optimizer_range(b);
      const i64 owned = r.end - r.begin;
      const i64 wbase = b.weight_sharded ? 0 : r.begin, gbase = b.grad_sharded ? 0 : r.begin;
      float* grad = reinterpret_cast<float*>(arena.bytes(b.grad).data());
      bf16* working = reinterpret_cast<bf16*>(wbytes.data()) + wbase;
      if (plan_.plan.optimizer_offload) {
        im.host_slices.push_back({working, grad + gbase, static_cast<i64>(im.host_weights.size()), owned, b.optimizer_offset});
        im.host_weights.insert(im.host_weights.end(), w.begin() + wbase, w.begin() + wbase + owned);
      } else {
        float* m = state + b.optimizer_offset;
        float* master = m + 2 * owned;
        PX_CUDA_CHECK(cudaMemcpy(master, w.data() + wbase, static_cast<std::size_t>(owned) * sizeof(float), cudaMemcpyHostToDevice));
        im.adamw.push_back({master, grad + gbase, m, m + owned, working, owned});
      }
      // Each gradient element with one owner across the job enters the norm once.
      const i64 held = static_cast<i64>(arena.bytes(b.grad).size() / sizeof(float));
      for (const ParamSlot& s : b.slots) {
        const cpu::RankContext::Range o = ctx_.held_owned(b, s, b.grad_sharded, held);
        if (o.begin < o.end) im.owned_grads.push_back({grad + o.begin, o.end - o.begin});
      }
    }
  }
  if (plan_.plan.optimizer_offload) {
    im.host_state.assign(static_cast<std::size_t>(program_.optimizer_elements), 0.0f);
    im.host_grads = PinnedBuffer<float>(im.host_weights.size());
    im.host_bf16 = PinnedBuffer<bf16>(im.host_weights.size());
  }
  PX_CUDA_CHECK(cudaDeviceSynchronize());
}

void CudaBackend::begin_iteration(std::int64_t iteration) {
  Impl& im = *impl_;
  ctx_.begin_iteration(iteration);
  loss_ = {};
  step_ = iteration + 1;
  const i64 T = ctx_.dims().T, feed = static_cast<i64>(plan_.num_micro_batches) * T;
  std::int32_t* h = im.host_feed.data();
  for (int mb = 0; mb < plan_.num_micro_batches; ++mb) {
    ctx_.fetch_micro_batch(mb);
    std::copy(ctx_.tokens().begin(), ctx_.tokens().end(), h + mb * T);
    std::copy(ctx_.targets().begin(), ctx_.targets().end(), h + feed + mb * T);
    std::copy(ctx_.positions().begin(), ctx_.positions().end(), h + 2 * feed + mb * T);
  }
  const std::size_t bytes = static_cast<std::size_t>(feed) * sizeof(std::int32_t);
  PX_CUDA_CHECK(cudaMemcpyAsync(im.tokens.data(), h, bytes, cudaMemcpyHostToDevice, im.stream));
  PX_CUDA_CHECK(cudaMemcpyAsync(im.targets.data(), h + feed, bytes, cudaMemcpyHostToDevice, im.stream));
  PX_CUDA_CHECK(cudaMemcpyAsync(im.positions.data(), h + 2 * feed, bytes, cudaMemcpyHostToDevice, im.stream));
  PX_CUDA_CHECK(cudaMemsetAsync(im.loss_sum.data(), 0, sizeof(double), im.stream));
  std::fill(im.timed.begin(), im.timed.end(), 0);
  im.first_op = true;
}

// The iteration's first op waits for the uploads and zeroing before it, so its start event fires
// at its host issue time: the anchor of the device clock on the executor's (device_timings).
void CudaBackend::record_start(std::uint32_t index) {
  Impl& im = *impl_;
  if (im.first_op) PX_CUDA_CHECK(cudaStreamSynchronize(im.stream));
  im.first_op = false;
  PX_CUDA_CHECK(cudaEventRecord(im.start[index], im.stream));
}

void CudaBackend::mark(std::uint32_t index) {
  record_start(index);
  impl_->timed[index] = 0;
}

void CudaBackend::device_timings(std::span<OpTiming> timings) {
  Impl& im = *impl_;
  im.wait_comm_on_host();
  PX_CUDA_CHECK(cudaStreamSynchronize(im.stream));
  for (auto t : im.timing)
    if (t) PX_CUDA_CHECK(cudaStreamSynchronize(t));
  // Op 0's start event ran at its host issue time (record_start).
  const double t0 = timings.empty() ? 0.0 : timings[0].start;
  for (std::size_t i = 0; i < timings.size(); ++i) {
    float ms = 0;
    PX_CUDA_CHECK(cudaEventElapsedTime(&ms, im.start[0], im.start[i]));
    timings[i].start = t0 + 1e-3 * ms;
    if (im.timed[i]) PX_CUDA_CHECK(cudaEventElapsedTime(&ms, im.start[0], im.end[i]));
    timings[i].end = t0 + 1e-3 * ms;
  }
  for (auto& handles : im.finished) handles.clear();
  double sums[2] = {0, 0};
  PX_CUDA_CHECK(cudaMemcpy(&sums[0], im.loss_sum.data(), sizeof(double), cudaMemcpyDeviceToHost));
  PX_CUDA_CHECK(cudaMemcpy(&sums[1], im.norm_sq.data(), sizeof(double), cudaMemcpyDeviceToHost));
  loss_.sum = sums[0];
  if (plan_.plan.optimizer_offload) sums[1] = im.host_norm_sq.data()[0];
  grad_norm_ = std::sqrt(std::max(0.0, sums[1]));
}

bool CudaBackend::device_comm() const { return true; }

std::vector<CommHandlePtr> CudaBackend::post_comm(std::uint32_t index, const CommLayout& L, Communicator& comm, TensorArena& arena) {
  auto* nc = dynamic_cast<DeviceCommunicator*>(&comm);
  if (!nc)
    throw Error(ErrorKind::Usage, {}, fmt::format("group {} has no communicator over device buffers", comm.name()),
                "the CUDA engine's ranks communicate over NCCL (make_nccl_groups in engine/comm/nccl_comm.hpp)");
  if (L.dtype != DType::BF16 && L.dtype != DType::F32)
    throw Error(ErrorKind::Usage, {}, fmt::format("op '{}' moves {} elements", impl_->names[index], to_string(L.dtype)),
                "the CUDA engine's comm ops carry bf16 or fp32");
  Impl& im = *impl_;
  const NvtxRange range(im.names[index].c_str());  // the posting, on the host's timeline
  record_start(index);
  nc->set_compute_stream(im.stream);
  im.comm_of[index] = nc;
  // Staging is filled on the compute stream, so the collective (which waits for that stream's
  // work at its start) reads it complete.
  auto& buf = im.staging[index];
  for (std::size_t s = 0; s < 2; ++s) {
    const auto bytes = static_cast<std::size_t>(L.staging_bytes[s]);
    if (bytes == 0) continue;
    PX_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&buf[s]), bytes, im.stream));
    i64 filled = 0;
    for (const StagingCopy& c : L.fill[s]) filled += c.bytes;
    if (filled < L.staging_bytes[s]) PX_CUDA_CHECK(cudaMemsetAsync(buf[s], 0, bytes, im.stream));
    for (const StagingCopy& c : L.fill[s])
      PX_CUDA_CHECK(cudaMemcpyAsync(buf[s] + c.staging, arena.bytes_at(c.arena, c.bytes).data(), static_cast<std::size_t>(c.bytes),
                                    cudaMemcpyDeviceToDevice, im.stream));
  }
  const auto bytes_of = [&](const CommOperand& o) -> std::span<std::byte> {
    if (o.staging >= 0) return {buf[static_cast<std::size_t>(o.staging)], static_cast<std::size_t>(L.staging_bytes[static_cast<std::size_t>(o.staging)])};
    return arena.bytes_at(o.range.offset, o.range.bytes);
  };
  const auto f32 = [&](const CommOperand& o) {
    const auto b = bytes_of(o);
    return std::span<float>(reinterpret_cast<float*>(b.data()), b.size() / sizeof(float));
  };
  const auto b16 = [&](const CommOperand& o) {
    const auto b = bytes_of(o);
    return std::span<bf16>(reinterpret_cast<bf16*>(b.data()), b.size() / sizeof(bf16));
  };
  const bool half = L.dtype == DType::BF16;
  std::vector<CommHandlePtr> h;
  using Call = CommLayout::Call;
  switch (L.call) {
    case Call::AllReduce:
      h.push_back(half ? nc->start_all_reduce_bf16(b16(L.out)) : nc->start_all_reduce(f32(L.out)));
      break;
    case Call::AllReduceMax:
      if (half) throw Error(ErrorKind::Usage, {}, fmt::format("op '{}' max-reduces bf16", im.names[index]), "max-reduce fp32 values");
      h.push_back(nc->start_all_reduce_max(f32(L.out)));
      break;
    case Call::AllGather:
      h.push_back(half ? nc->start_all_gather_bf16(b16(L.in), b16(L.out)) : nc->start_all_gather(f32(L.in), f32(L.out)));
      break;
    case Call::ReduceScatter:
      h.push_back(half ? nc->start_reduce_scatter_bf16(b16(L.in), b16(L.out)) : nc->start_reduce_scatter(f32(L.in), f32(L.out)));
      break;
    case Call::AllToAll:
      h.push_back(half ? nc->start_all_to_all_bf16(b16(L.in), b16(L.out)) : nc->start_all_to_all(f32(L.in), f32(L.out)));
      break;
    case Call::Send:
      h.push_back(half ? nc->start_send_bf16(b16(L.in), L.to, L.tag) : nc->start_send(f32(L.in), L.to, L.tag));
      break;
    case Call::Recv:
      h.push_back(half ? nc->start_recv_bf16(b16(L.out), L.from, L.tag) : nc->start_recv(f32(L.out), L.from, L.tag));
      break;
    case Call::RingExchange:  // NCCL gets the pair as one group (see nccl_comm.hpp)
      h.push_back(half ? nc->start_recv_bf16(b16(L.out), L.from, L.tag) : nc->start_recv(f32(L.out), L.from, L.tag));
      h.push_back(half ? nc->start_send_bf16(b16(L.in), L.to, L.tag) : nc->start_send(f32(L.in), L.to, L.tag));
      break;
  }
  return h;
}

void CudaBackend::finish_comm(std::uint32_t index, const CommLayout& L, std::vector<CommHandlePtr> handles, TensorArena& arena) {
  Impl& im = *impl_;
  const auto stream_of = static_cast<std::size_t>(program_.ops[index].stream);
  cudaStream_t& timing = im.timing[stream_of];
  if (!timing) PX_CUDA_CHECK(cudaStreamCreateWithFlags(&timing, cudaStreamNonBlocking));
  DeviceCommunicator& nc = *im.comm_of[index];
  for (auto& h : handles) {
    nc.wait_on(*h, im.stream);
    nc.wait_on(*h, timing);
  }
  PX_CUDA_CHECK(cudaEventRecord(im.end[index], timing));
  im.timed[index] = 1;
  auto& buf = im.staging[index];
  for (const StagingCopy& c : L.drain) {
    std::byte* dst = arena.bytes_at(c.arena, c.bytes).data();
    const std::byte* src = buf[kStagingOut] + c.staging;
    if (!L.accumulate) {
      PX_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(c.bytes), cudaMemcpyDeviceToDevice, im.stream));
    } else {
      assert(L.dtype == DType::F32);  // an accumulated shard is a gradient's: fp32 here (the constructor's rule)
      add(reinterpret_cast<const float*>(src), reinterpret_cast<float*>(dst), c.bytes / static_cast<i64>(sizeof(float)), im.stream);
    }
  }
  for (auto*& p : buf)
    if (p) {
      PX_CUDA_CHECK(cudaFreeAsync(p, im.stream));
      p = nullptr;
    }
  im.finished[index] = std::move(handles);
}

void CudaBackend::export_owned(TensorArena& arena, cpu::RankContext::Export what,
                               std::map<std::string, std::vector<double>>& out) const {
  PX_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  for (const ParamBuffer& b : program_.buffers) {
    const bool gradients = what == cpu::RankContext::Export::Gradients;
    const auto bytes = arena.bytes(gradients ? b.grad : b.weight);
    std::vector<float> held;
    if (gradients) {
      held.resize(bytes.size() / sizeof(float));
      PX_CUDA_CHECK(cudaMemcpy(held.data(), bytes.data(), bytes.size(), cudaMemcpyDeviceToHost));
    } else {
      std::vector<bf16> w(bytes.size() / sizeof(bf16));
      PX_CUDA_CHECK(cudaMemcpy(w.data(), bytes.data(), bytes.size(), cudaMemcpyDeviceToHost));
      held = to_float(w);
    }
    ctx_.export_owned(b, held, gradients ? b.grad_sharded : b.weight_sharded, what, out);
  }
}

void CudaBackend::run(const Program& program, std::uint32_t index, TensorArena& arena) {
  assert(&program == &program_);
  Impl& im = *impl_;
  const Op& op = program.ops[index];
  const cudaStream_t st = im.stream;
  const LocalDims& z = ctx_.dims();
  const Operands& o = im.operands[index];
  const i64 mb = std::max<i64>(op.micro_batch, 0);
  const std::int32_t* tokens = im.tokens.data() + mb * z.T;
  const std::int32_t* targets = im.targets.data() + mb * z.T;
  const std::int32_t* positions = im.positions.data() + mb * z.T;
  const bool fwd = forward_phase(op.phase);
  const auto eps = static_cast<float>(opt_.norm_eps);
  const std::string& name = im.names[index];
  const NvtxRange range(name.c_str());
  record_start(index);
  auto in = [&](std::size_t i) { return at<bf16>(arena, o.in[i]); };
  auto out = [&](std::size_t i) { return at<bf16>(arena, o.out[i]); };
  auto in32 = [&](std::size_t i) { return at<float>(arena, o.in[i]); };
  auto out32 = [&](std::size_t i) { return at<float>(arena, o.out[i]); };
  auto workspace = [&](std::size_t bytes) { return static_cast<void*>(grow(im.workspace, static_cast<i64>(bytes))); };

  switch (op.kind) {
    case OpKind::Embedding: {
      const i64 vocab_begin = ctx_.coord().tp * z.V_l;
      if (fwd) {
        // Positions are added on one tensor-parallel rank: the TP reduction after the lookup sums the ranks.
        const bf16* pos = o.in.size() > 1 && ctx_.coord().tp == 0 ? in(1) : nullptr;
        embedding_forward(tokens, positions, z.T, in(0), vocab_begin, z.V_l, pos, out(0), z.h, st);
        break;
      }
      const std::size_t ws = embedding_backward_workspace_bytes(z.T);
      embedding_backward(in(0), tokens, positions, z.T, out32(0), vocab_begin, z.V_l, nullptr, z.h, workspace(ws), ws, st);
      if (o.out.size() < 2) break;
      // The position table's gradient from the rows this rank's sequence shard holds (see the CPU backend).
      const i64 first = z.sp ? ctx_.coord().tp * z.Tres : 0, rows = z.sp ? z.Tres : z.T;
      const std::size_t pos_ws = embedding_backward_workspace_bytes(rows);
      embedding_backward(in(0) + first * z.h, tokens + first, positions + first, rows, nullptr, vocab_begin, 0, out32(1), z.h,
                         workspace(pos_ws), pos_ws, st);
      break;
    }
    case OpKind::Norm: {
      const bool ln = plan_.model.norm == NormKind::LayerNorm;
      if (fwd) {
        if (ln)
          layernorm_forward(in(0), in(1), in(2), out(0), nullptr, nullptr, op.m, op.n, eps, st);
        else
          rmsnorm_forward(in(0), in(1), out(0), nullptr, op.m, op.n, eps, st);
        break;
      }
      // dx starts as the residual stream's gradient (or zero); the kernel adds the norm's.
      if (o.in.size() > 3)
        PX_CUDA_CHECK(cudaMemcpyAsync(out(0), in(3), static_cast<std::size_t>(o.out[0].bytes), cudaMemcpyDeviceToDevice, st));
      else
        PX_CUDA_CHECK(cudaMemsetAsync(out(0), 0, static_cast<std::size_t>(o.out[0].bytes), st));
      const std::size_t ws = norm_backward_workspace_bytes(op.m, op.n);
      if (ln)
        layernorm_backward(in(0), in(1), in(2), nullptr, nullptr, out(0), out32(1), out32(2), op.m, op.n, eps, workspace(ws), ws, st);
      else
        rmsnorm_backward(in(0), in(1), in(2), nullptr, out(0), out32(1), op.m, op.n, eps, workspace(ws), ws, st);
      break;
    }
    case OpKind::Gemm: {
      GemmContext& g = *im.gemm;
      const bf16* a = in(0);
      bf16* y = out(0);
      if (op.group == GroupKind::TP) {  // one step of a TP ring (see Op): one block of rows
        const i64 block = ctx_.ring_block(op);
        if (op.variant == Variant::GemmWeightGrad)  // x's rows of the dy block that arrived: op.k of them
          a += block * op.k * op.m;
        else if (op.peer > 0)
          y += block * op.m * op.n;
        else
          a += block * op.m * op.k;
      }
      switch (op.variant) {
        case Variant::GemmForward:
          linear_forward(g, a, in(1), o.in.size() > 2 ? in(2) : nullptr, y, op.m, op.n, op.k);
          break;
        case Variant::GemmInputGrad:  // dx[m x n] = dy[m x k] w^T, w stored [n x k]
          linear_backward_input(g, a, in(1), y, op.m, op.k, op.n);
          break;
        case Variant::GemmInputGradAccumulate:
          linear_backward_input(g, in(0), in(1), out(0), op.m, op.k, op.n, true);
          break;
        case Variant::GemmWeightGrad:  // dw[m x n] += x^T dy over op.k rows
          linear_backward_weight(g, a, in(1), out32(0), o.out.size() > 1 ? out32(1) : nullptr, op.k, op.n, op.m);
          break;
        case Variant::GemmForwardTransposed:  // y = x w^T, w [n x k]
          gemm(g, false, true, op.m, op.n, op.k, 1.0f, in(0), op.k, in(1), op.k, 0.0f, out(0), op.n);
          break;
        case Variant::GemmInputGradTransposed:  // dx[m x n] = dy[m x k] w, w [k x n]
          gemm(g, false, false, op.m, op.n, op.k, 1.0f, in(0), op.k, in(1), op.n, 0.0f, out(0), op.n);
          break;
        case Variant::GemmWeightGradTransposed:  // dw[m x n] += dy^T x; reads [x (k x n), dy (k x m)]
          gemm(g, true, false, op.m, op.n, op.k, 1.0f, in(1), op.m, in(0), op.n, 1.0f, out32(0), op.n);
          break;
        default: {
          // Grouped expert GEMMs: rows [ep][E/ep][slots], so per source rank the E/ep experts'
          // blocks lie back to back, one strided-batched GEMM each.
          const i64 slots = z.slots, El = z.E_l;
          for (i64 src = 0; src < z.ep; ++src) {
            const i64 row0 = src * El * slots;
            switch (op.variant) {
              case Variant::GemmGroupedForward:
                linear_forward_batched(g, in(0) + row0 * op.k, in(1), o.in.size() > 2 ? in(2) : nullptr, out(0) + row0 * op.n, slots, op.n,
                                       op.k, El);
                break;
              case Variant::GemmGroupedInputGrad:
                linear_backward_input_batched(g, in(0) + row0 * op.k, in(1), out(0) + row0 * op.n, slots, op.k, op.n, El);
                break;
              case Variant::GemmGroupedWeightGrad:
                linear_backward_weight_batched(g, in(0) + row0 * op.m, in(1) + row0 * op.n, out32(0), o.out.size() > 1 ? out32(1) : nullptr,
                                               slots, op.n, op.m, El);
                break;
              default:
                throw Error(ErrorKind::Usage, {}, fmt::format("op '{}': unknown GEMM variant", name), "");
            }
          }
        }
      }
      break;
    }
    case OpKind::Router: {
      const cpu::MoeShape shape{op.m, z.E, z.top_k, z.slots};
      const i64 n = op.m * z.top_k;
      const auto aux = static_cast<float>(opt_.moe_aux_coeff);
      void* ws = workspace(router_workspace_bytes(shape));
      if (fwd) {
        auto* routing = at<std::int32_t>(arena, o.out[1]);
        router_forward(in(0), out32(0), routing, routing + n, reinterpret_cast<float*>(routing + 2 * n), nullptr, shape,
                       opt_.moe_renormalize, aux, ws, st);
        break;
      }
      // The load-balancing loss is averaged over every micro-batch of the job, as the LM loss is.
      const double micro_batches = static_cast<double>(plan_.num_micro_batches) * plan_.plan.dp() * plan_.plan.cp();
      float* d = grow(im.d_logits, op.m * z.E);
      router_backward(in32(0), in32(1), at<std::int32_t>(arena, o.in[2]), d, shape, opt_.moe_renormalize,
                      static_cast<float>(aux / micro_batches), ws, st);
      convert(d, out(0), op.m * z.E, false, st);
      break;
    }
    case OpKind::Permute: {
      const cpu::MoeShape shape{z.Tres, z.E, z.top_k, z.slots};
      const i64 n = z.Tres * z.top_k;
      const auto* routing = at<std::int32_t>(arena, o.in.back());
      const std::int32_t *expert = routing, *slot = routing + n;
      const auto* gate = reinterpret_cast<const float*>(routing + 2 * n);
      const bool needs_map = (op.variant == Variant::Dispatch) == fwd;  // dispatch forward, combine backward
      std::int32_t* map = grow(im.row_assignment, z.E * z.slots);
      if (needs_map) dispatch_map(expert, slot, map, shape, st);
      if (op.variant == Variant::Dispatch) {
        if (fwd)
          permute_forward(in(0), map, out(0), shape, z.h, st);
        else
          permute_backward(in(0), expert, slot, out(0), shape, z.h, st);
      } else if (fwd) {
        unpermute_forward(in(0), expert, slot, gate, out(0), shape, z.h, st);
      } else {
        unpermute_backward(in(0), in(1), gate, map, out(0), out32(1), shape, z.h, st);
      }
      break;
    }
    case OpKind::Rope:
      if (fwd)
        rope_forward(out(0), op.m, z.qkv_cols, op.n / z.d, z.d, positions, plan_.model.rope_theta, st);
      else
        rope_backward(out(0), op.m, z.qkv_cols, op.n / z.d, z.d, positions, plan_.model.rope_theta, st);
      break;
    case OpKind::AttentionCore: {
      const TensorUse& qkv_use = fwd ? o.in[0] : o.in[1];
      const TensorUse& kv_use = fwd ? o.in[1] : o.in[2];
      const bf16* qkv = at<bf16>(arena, qkv_use);
      const bf16* kvb = at<bf16>(arena, kv_use);
      const bool packed = kv_use.tensor != qkv_use.tensor;  // a ring block [K | V], not qkv itself
      const i64 kv_ld = packed ? 2 * z.g_l * z.d : z.qkv_cols, k_off = packed ? 0 : z.a_l * z.d, v_off = k_off + z.g_l * z.d;
      const int src = ((ctx_.coord().cp - op.step) % z.cp + z.cp) % z.cp;  // whose block arrives at this step
      const AttentionShape sh{z.b, z.a_l, z.g_l, z.d, z.S, z.S, ctx_.coord().cp * z.S, src * z.S};
      const AttentionInputs x{qkv, kvb + k_off, kvb + v_off, z.qkv_cols, kv_ld, kv_ld};
      const bool last = op.step + 1 == z.cp;
      const i64 out_elems = z.T * z.a_l * z.d;
      if (fwd) {
        // The running output stays fp32 across the ring's blocks; the last one rounds it into the
        // plan's bf16 output (absent when a flash recompute keeps only the statistics).
        bf16* y = o.out[0].bytes > 0 ? out(0) : nullptr;
        attention_forward(sh, x, grow(im.out32, out_elems), out32(1), op.step == 0, last ? y : nullptr, st);
        break;
      }
      const bf16* dout = in(0);
      float* delta = grow(im.delta, z.b * z.a_l * z.S);
      const i64 qkv_elems = z.T * z.qkv_cols;
      float* dqkv32 = grow(im.dqkv32, qkv_elems);
      if (op.step == 0) {
        float* y32 = grow(im.out32, out_elems);
        convert(in(3), y32, out_elems, st);
        attention_backward_delta(sh, y32, dout, delta, st);
        PX_CUDA_CHECK(cudaMemsetAsync(dqkv32, 0, static_cast<std::size_t>(qkv_elems) * sizeof(float), st));
      }
      const float* lse = in32(4);
      if (!packed) {
        attention_backward(sh, x, lse, delta, dout, {dqkv32, dqkv32 + k_off, dqkv32 + v_off, z.qkv_cols, z.qkv_cols, z.qkv_cols}, st);
        convert(dqkv32, out(0), qkv_elems, true, st);
        break;
      }
      // dK, dV of the travelling block: what earlier ranks added (bf16 on the wire), plus this rank's share.
      const i64 kv_elems = z.T * kv_ld;
      float* dkv32 = grow(im.dkv32, kv_elems);
      if (o.in.size() > 5)
        convert(in(5), dkv32, kv_elems, st);
      else
        PX_CUDA_CHECK(cudaMemsetAsync(dkv32, 0, static_cast<std::size_t>(kv_elems) * sizeof(float), st));
      attention_backward(sh, x, lse, delta, dout, {dqkv32, dkv32, dkv32 + z.g_l * z.d, z.qkv_cols, kv_ld, kv_ld}, st);
      convert(dkv32, out(1), kv_elems, false, st);
      if (last) convert(dqkv32, out(0), qkv_elems, true, st);
      break;
    }
    case OpKind::Copy: {
      const i64 width = 2 * z.g_l * z.d, first = z.a_l * z.d;
      if (op.variant == Variant::Accumulate)
        copy_columns(in(0), op.n, out(0), op.n, op.m, op.n, true, st);
      else if (op.variant == Variant::PackKeyValues)
        copy_columns(in(0) + first, z.qkv_cols, out(0), width, op.m, width, false, st);
      else
        copy_columns(in(0), width, out(0) + first, z.qkv_cols, op.m, width, true, st);
      break;
    }
    case OpKind::Activation: {
      const bool swiglu = plan_.model.activation == px::Activation::SwiGLU;
      if (fwd) {
        if (swiglu)
          swiglu_forward(in(0), out(0), op.m, op.n, st);
        else
          gelu_forward(in(0), out(0), count<bf16>(o.out[0]), st);
      } else if (swiglu) {
        swiglu_backward(in(0), in(1), out(0), op.m, op.n, st);
      } else {
        gelu_backward(in(0), in(1), out(0), count<bf16>(o.out[0]), st);
      }
      break;
    }
    case OpKind::DropoutAdd: {
      const double p = plan_.model.hidden_dropout;
      if (fwd) {
        const bool plain = op.variant == Variant::EmbeddingDropout;
        const bf16* residual = plain ? nullptr : in(1);
        const bf16* bias = !plain && o.in.size() > 2 ? in(2) : nullptr;
        if (o.out.size() < 2) {  // out = residual + branch + bias
          add_bias_residual(in(0), bias, residual, out(0), op.m, op.n, st);
          break;
        }
        const bf16* branch = in(0);
        if (bias) {
          bf16* t = grow(im.tmp, op.m * op.n);
          add_bias_residual(in(0), bias, nullptr, t, op.m, op.n, st);
          branch = t;
        }
        ctx_.fetch_micro_batch(op.micro_batch);
        const std::vector<std::uint64_t> keys = ctx_.dropout_keys(op, op.m);
        const i64 off = im.key_offset[index];
        std::copy(keys.begin(), keys.end(), im.host_keys.data() + off);
        PX_CUDA_CHECK(cudaMemcpyAsync(im.keys.data() + off, im.host_keys.data() + off, keys.size() * sizeof(std::uint64_t),
                                      cudaMemcpyHostToDevice, st));
        // Masks are keyed by element, so sharing the weights' seed draws nothing twice.
        dropout_add_forward(branch, residual, out(0), at<std::uint8_t>(arena, o.out[1]), im.keys.data() + off, op.m, op.n, p, opt_.seed,
                            st);
        break;
      }
      if (o.in.size() > 1)
        dropout_backward(in(0), at<std::uint8_t>(arena, o.in[1]), out(0), op.m * op.n, p, st);
      else
        PX_CUDA_CHECK(cudaMemcpyAsync(out(0), in(0), static_cast<std::size_t>(o.out[0].bytes), cudaMemcpyDeviceToDevice, st));
      if (o.out.size() > 1) column_sums_add(out(0), op.m, op.n, out32(1), st);
      break;
    }
    case OpKind::CrossEntropy: {
      const i64 rows = op.m, cols = op.n, vocab_begin = ctx_.coord().tp * z.V_l;
      const auto n = rows;
      if (op.phase == Phase::Forward) {
        if (op.variant == Variant::CrossEntropyPartials) {
          float* sums = out32(0);
          cross_entropy_partials(at<bf16>(arena, o.in[0]), targets, vocab_begin, in32(1), sums, sums + n, rows, cols, st);
          break;
        }
        // The saved logits: bf16, in the first half of the plan's fp32 buffer.
        bf16* saved = out(0);
        float* stats = out32(1);
        PX_CUDA_CHECK(cudaMemcpyAsync(saved, in(0), static_cast<std::size_t>(rows * cols) * sizeof(bf16), cudaMemcpyDeviceToDevice, st));
        if (op.variant == Variant::CrossEntropyMax)
          cross_entropy_row_max(saved, stats, rows, cols, st);
        else
          cross_entropy_forward_fused(saved, targets, stats, stats + n, stats + 2 * n, grow(im.losses, n), rows, cols, st);
        break;
      }
      const bf16* saved = in(0);
      const float* stats = in32(1);
      float* losses = grow(im.losses, n);
      cross_entropy_loss(stats, stats + n, stats + 2 * n, losses, rows, st);
      sum_add(losses, n, im.loss_sum.data(), st);
      loss_.tokens += rows;
      // The job's loss is the mean over every token of the global batch.
      const double tokens_total = static_cast<double>(plan_.plan.global_batch_size) * static_cast<double>(z.s);
      float* dloss = grow(im.dloss, n);
      fill(dloss, n, static_cast<float>(1.0 / tokens_total), st);
      cross_entropy_backward(saved, targets, vocab_begin, stats, stats + n, dloss, out(0), rows, cols, st);
      break;
    }
    case OpKind::OptimizerStep:
      if (op.variant == Variant::GradNorm) {
        // Each rank's share of the squared global norm; the DP all-reduce that follows sums them.
        sum_of_squares(im.owned_grads, im.norm_sq.data(), im.sos.data(), st);
        convert(im.norm_sq.data(), out32(0), 1, st);
      } else if (op.stream == Stream::Host) {
        // The offloaded step runs on this thread once the gradients' copy has landed; the device
        // idles meanwhile, so the op's events span the host's work.
        im.wait_comm_on_host();
        PX_CUDA_CHECK(cudaStreamSynchronize(st));
        const double clip = cpu::clip_coefficient(std::sqrt(std::max(0.0f, im.host_norm_sq.data()[0])), opt_.clip_grad);
        for (const Impl::HostSlice& h : im.host_slices) {
          const auto n = static_cast<std::size_t>(h.count);
          const std::span<float> w(im.host_weights.data() + h.host, n), m(im.host_state.data() + h.state, n),
              v(im.host_state.data() + h.state + h.count, n);
          cpu::adamw_step<float>(w, std::span<const float>(im.host_grads.data() + h.host, n), m, v, opt_.adamw, step_, clip);
        }
      } else {
        convert(in32(0), im.norm_sq.data(), 1, st);
        clip_coefficient(im.norm_sq.data(), opt_.clip_grad, im.clip.data(), st);
        adamw_step(im.adamw, opt_.adamw, {step_, 1.0, im.clip.data()}, st);
      }
      break;
    case OpKind::CopyD2H:
      PX_CUDA_CHECK(cudaMemcpyAsync(im.host_norm_sq.data(), in32(0), sizeof(float), cudaMemcpyDeviceToHost, st));
      for (const Impl::HostSlice& h : im.host_slices)
        PX_CUDA_CHECK(cudaMemcpyAsync(im.host_grads.data() + h.host, h.grads, static_cast<std::size_t>(h.count) * sizeof(float),
                                      cudaMemcpyDeviceToHost, st));
      break;
    case OpKind::CopyH2D: {
      const std::vector<bf16> w = to_bf16(im.host_weights);
      std::copy(w.begin(), w.end(), im.host_bf16.data());
      for (const Impl::HostSlice& h : im.host_slices)
        PX_CUDA_CHECK(cudaMemcpyAsync(h.weights, im.host_bf16.data() + h.host, static_cast<std::size_t>(h.count) * sizeof(bf16),
                                      cudaMemcpyHostToDevice, st));
      break;
    }
    default:
      throw Error(ErrorKind::Usage, {}, fmt::format("op '{}' ({}) is not on the CUDA engine", name, to_string(op.kind)), "");
  }
  PX_CUDA_CHECK(cudaEventRecord(im.end[index], st));
  im.timed[index] = 1;
}

}  // namespace px::cuda
