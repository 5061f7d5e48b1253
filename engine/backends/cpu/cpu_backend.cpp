// Op-by-op dispatch of a rank's program onto the CPU kernels. Shapes come from the op, operands
// from its views, and everything that depends on where the rank sits (vocabulary shard, sequence
// shard, context-parallel block, experts, ZeRO blocks) from the rank's coordinates.
#include "engine/backends/cpu/cpu_backend.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <fmt/format.h>

#include "engine/backends/cpu/activation.hpp"
#include "engine/backends/cpu/attention.hpp"
#include "engine/backends/cpu/cross_entropy.hpp"
#include "engine/backends/cpu/dropout.hpp"
#include "engine/backends/cpu/embedding.hpp"
#include "engine/backends/cpu/gemm.hpp"
#include "engine/backends/cpu/moe.hpp"
#include "engine/backends/cpu/norm.hpp"
#include "engine/backends/cpu/reference_model.hpp"
#include "engine/backends/cpu/rope.hpp"
#include "engine/core/error.hpp"
#include "engine/spec/model_math.hpp"

namespace px::cpu {
namespace {

using i64 = std::int64_t;
using F = std::span<float>;
using CF = std::span<const float>;
using Sizes = LocalDims;

std::span<std::byte> raw(TensorArena& arena, const TensorUse& u) {
  return arena.bytes(u.tensor).subspan(static_cast<std::size_t>(u.offset), static_cast<std::size_t>(u.bytes));
}
F view(TensorArena& arena, const TensorUse& u) {
  const auto b = raw(arena, u);
  return {reinterpret_cast<float*>(b.data()), b.size() / sizeof(float)};
}
template <class I>
std::span<I> as(std::span<std::byte> b) {
  return {reinterpret_cast<I*>(b.data()), b.size() / sizeof(I)};
}

}  // namespace

CpuBackend::CpuBackend(const CompiledPlan& plan, int rank, const TokenSource& data, const TrainOptions& options)
    : plan_(plan), program_(plan.program_of(rank)), ctx_(plan, rank, data, options.seed), opt_(options), z_(ctx_.dims()) {
  set_gemm_threads(1);
  for (std::uint32_t t = 0; t < program_.tensors.size(); ++t)
    if (program_.tensors[t].cls == TensorClass::Optimizer) optimizer_ = t;
}

void CpuBackend::initialize(TensorArena& arena) {
  host_weights_.clear();
  for (const ParamBuffer& b : program_.buffers) {
    auto w = arena.floats(b.weight);
    ctx_.initial_weights(b, w);
    if (plan_.plan.optimizer_offload) {
      const OwnedRange r = ctx_.optimizer_range(b);
      const i64 base = b.weight_sharded ? r.begin : 0;
      for (i64 i = r.begin; i < r.end; ++i) host_weights_.push_back(w[static_cast<std::size_t>(i - base)]);
    }
  }
  if (plan_.plan.optimizer_offload) {
    host_state_.assign(static_cast<std::size_t>(program_.optimizer_elements), 0.0f);
    host_grads_.assign(host_weights_.size(), 0.0f);
  }
}

void CpuBackend::begin_iteration(std::int64_t iteration) {
  ctx_.begin_iteration(iteration);
  loss_ = {};
  step_ = iteration + 1;
}

void CpuBackend::run(const Program& program, std::uint32_t index, TensorArena& arena) {
  assert(&program == &program_);
  const Op& op = program.ops[index];
  op_ = &op;
  ctx_.fetch_micro_batch(op.micro_batch);
  switch (op.kind) {
    case OpKind::Embedding: embedding(op, arena); break;
    case OpKind::Norm: norm(op, arena); break;
    case OpKind::Gemm: gemm(op, arena); break;
    case OpKind::Rope: rope(op, arena); break;
    case OpKind::AttentionCore: attention(op, arena); break;
    case OpKind::Activation: activation(op, arena); break;
    case OpKind::DropoutAdd: dropout_add(op, arena); break;
    case OpKind::Router: router(op, arena); break;
    case OpKind::Permute: permute(op, arena); break;
    case OpKind::CrossEntropy: cross_entropy(op, arena); break;
    case OpKind::Copy: copy(op, arena); break;
    case OpKind::OptimizerStep:
      if (op.variant == Variant::GradNorm)
        grad_norm_op(arena);
      else
        adamw(arena, op.stream == Stream::Host);
      break;
    case OpKind::CopyD2H: copy_to_host(arena); break;
    case OpKind::CopyH2D: copy_to_device(arena); break;
    default: assert(false && "comm ops run on the communicators");
  }
}

void CpuBackend::embedding(const Op& op, TensorArena& arena) {
  const Sizes& z = z_;
  const Operands o = operands(program_, op);
  const i64 vocab_begin = ctx_.coord().tp * z.V_l;
  if (forward_phase(op.phase)) {
    // Positions are added on one tensor-parallel rank: the TP reduction after the lookup sums the ranks.
    const CF pos = o.in.size() > 1 && ctx_.coord().tp == 0 ? CF(view(arena, o.in[1])) : CF();
    embedding_forward<float>(ctx_.tokens(), ctx_.positions(), view(arena, o.in[0]), vocab_begin, pos, view(arena, o.out[0]), z.h);
    return;
  }
  const CF dy = view(arena, o.in[0]);
  embedding_backward<float>(dy, ctx_.tokens(), ctx_.positions(), view(arena, o.out[0]), vocab_begin, {}, z.h);
  if (o.out.size() < 2) return;
  // The position table's gradient from the rows this rank's sequence shard holds: without SP every
  // TP rank holds them all (replicas agree); with SP the shards are summed over TP later.
  const i64 first = z.sp ? ctx_.coord().tp * z.Tres : 0, rows = z.sp ? z.Tres : z.T;
  const auto r0 = static_cast<std::size_t>(first), n = static_cast<std::size_t>(rows);
  embedding_backward<float>(dy.subspan(r0 * static_cast<std::size_t>(z.h), n * static_cast<std::size_t>(z.h)),
                            std::span<const std::int32_t>(ctx_.tokens()).subspan(r0, n), std::span<const std::int32_t>(ctx_.positions()).subspan(r0, n),
                            {}, 0, view(arena, o.out[1]), z.h);
}

void CpuBackend::norm(const Op& op, TensorArena& arena) {
  const Operands o = operands(program_, op);
  const bool ln = plan_.model.norm == NormKind::LayerNorm;
  const auto eps = static_cast<float>(opt_.norm_eps);
  if (forward_phase(op.phase)) {
    if (ln)
      layernorm_forward<float>(view(arena, o.in[0]), view(arena, o.in[1]), view(arena, o.in[2]), view(arena, o.out[0]), op.m, op.n, eps);
    else
      rmsnorm_forward<float>(view(arena, o.in[0]), view(arena, o.in[1]), view(arena, o.out[0]), op.m, op.n, eps);
    return;
  }
  const F dx = view(arena, o.out[0]);
  if (o.in.size() > 3) {
    const CF res = view(arena, o.in[3]);
    std::copy(res.begin(), res.end(), dx.begin());
  } else {
    std::fill(dx.begin(), dx.end(), 0.0f);
  }
  if (ln)
    layernorm_backward<float>(view(arena, o.in[0]), view(arena, o.in[1]), view(arena, o.in[2]), dx, view(arena, o.out[1]),
                              view(arena, o.out[2]), op.m, op.n, eps);
  else
    rmsnorm_backward<float>(view(arena, o.in[0]), view(arena, o.in[1]), view(arena, o.in[2]), dx, view(arena, o.out[1]), op.m, op.n,
                            eps);
}

void CpuBackend::gemm(const Op& op, TensorArena& arena) {
  const Operands o = operands(program_, op);
  CF a = view(arena, o.in[0]);
  const CF w = view(arena, o.in[1]);
  F y = view(arena, o.out[0]);
  if (op.group == GroupKind::TP) {  // one step of a TP ring (see Op): one block of rows
    const i64 block = ctx_.ring_block(op);
    if (op.variant == Variant::GemmWeightGrad)  // x's rows of the dy block that arrived: op.k of them
      a = a.subspan(static_cast<std::size_t>(block * op.k * op.m), static_cast<std::size_t>(op.k * op.m));
    else if (op.peer > 0)
      y = y.subspan(static_cast<std::size_t>(block * op.m * op.n), static_cast<std::size_t>(op.m * op.n));
    else
      a = a.subspan(static_cast<std::size_t>(block * op.m * op.k), static_cast<std::size_t>(op.m * op.k));
  }
  switch (op.variant) {
    case Variant::GemmForward:
      linear_forward<float>(a, w, o.in.size() > 2 ? CF(view(arena, o.in[2])) : CF(), y, op.m, op.n, op.k);
      return;
    case Variant::GemmInputGrad:  // dx[m x n] = dy[m x k] w^T, w stored [n x k]
      linear_backward_input<float>(a, w, y, op.m, op.k, op.n);
      return;
    case Variant::GemmInputGradAccumulate:
      linear_backward_input<float>(a, w, view(arena, o.out[0]), op.m, op.k, op.n, true);
      return;
    case Variant::GemmWeightGrad:  // dw[m x n] += x^T dy over op.k rows
      linear_backward_weight<float>(a, w, view(arena, o.out[0]), o.out.size() > 1 ? view(arena, o.out[1]) : F(), op.k, op.n, op.m);
      return;
    case Variant::GemmForwardTransposed:  // y = x w^T, w [n x k]
      cpu::gemm<float>(false, true, op.m, op.n, op.k, 1.0f, a.data(), op.k, w.data(), op.k, 0.0f, view(arena, o.out[0]).data(), op.n);
      return;
    case Variant::GemmInputGradTransposed:  // dx[m x n] = dy[m x k] w, w [k x n]
      cpu::gemm<float>(false, false, op.m, op.n, op.k, 1.0f, a.data(), op.k, w.data(), op.n, 0.0f, view(arena, o.out[0]).data(), op.n);
      return;
    case Variant::GemmWeightGradTransposed: {  // dw[m x n] += dy^T x; reads [x (k x n), dy (k x m)]
      cpu::gemm<float>(true, false, op.m, op.n, op.k, 1.0f, w.data(), op.m, a.data(), op.n, 1.0f, view(arena, o.out[0]).data(), op.n);
      return;
    }
    default: break;
  }
  // Grouped expert GEMMs: rows [ep][E/ep][slots]; expert j's rows are ep blocks of `slots` rows.
  const Sizes& z = z_;
  const auto blocks = [&](i64 j, auto&& fn) {
    for (i64 src = 0; src < z.ep; ++src) fn((src * z.E_l + j) * z.slots);
  };
  const auto rows = [](auto span, i64 row, i64 count, i64 cols) {
    return span.subspan(static_cast<std::size_t>(row * cols), static_cast<std::size_t>(count * cols));
  };
  const auto part = [](auto span, i64 j, i64 size) {
    return span.subspan(static_cast<std::size_t>(j * size), static_cast<std::size_t>(size));
  };
  for (i64 j = 0; j < z.E_l; ++j) {
    switch (op.variant) {
      case Variant::GemmGroupedForward: {
        const CF bias = o.in.size() > 2 ? part(CF(view(arena, o.in[2])), j, op.n) : CF();
        blocks(j, [&](i64 r) {
          linear_forward<float>(rows(a, r, z.slots, op.k), part(w, j, op.k * op.n), bias, rows(y, r, z.slots, op.n), z.slots, op.n, op.k);
        });
        break;
      }
      case Variant::GemmGroupedInputGrad: {
        const F dx = view(arena, o.out[0]);
        blocks(j, [&](i64 r) {
          linear_backward_input<float>(rows(a, r, z.slots, op.k), part(w, j, op.n * op.k), rows(dx, r, z.slots, op.n), z.slots, op.k, op.n);
        });
        break;
      }
      case Variant::GemmGroupedWeightGrad: {
        const F dw = part(view(arena, o.out[0]), j, op.m * op.n);
        const F db = o.out.size() > 1 ? part(view(arena, o.out[1]), j, op.n) : F();
        blocks(j, [&](i64 r) {
          linear_backward_weight<float>(rows(a, r, z.slots, op.m), rows(w, r, z.slots, op.n), dw, db, z.slots, op.n, op.m);
        });
        break;
      }
      default: assert(false && "unknown GEMM variant");
    }
  }
}

void CpuBackend::rope(const Op& op, TensorArena& arena) {
  const Sizes& z = z_;
  const Operands o = operands(program_, op);
  const F x = view(arena, o.out[0]);
  if (forward_phase(op.phase))
    rope_forward<float>(x, op.m, z.qkv_cols, op.n / z.d, z.d, ctx_.positions(), plan_.model.rope_theta);
  else
    rope_backward<float>(x, op.m, z.qkv_cols, op.n / z.d, z.d, ctx_.positions(), plan_.model.rope_theta);
}

void CpuBackend::attention(const Op& op, TensorArena& arena) {
  const Sizes& z = z_;
  const Operands o = operands(program_, op);
  const bool fwd = forward_phase(op.phase);
  const TensorUse& qkv_use = fwd ? o.in[0] : o.in[1];
  const TensorUse& kv_use = fwd ? o.in[1] : o.in[2];
  const CF qkv = view(arena, qkv_use), kvb = view(arena, kv_use);
  const bool packed = kv_use.tensor != qkv_use.tensor;  // a ring block [K | V], not qkv itself
  const i64 kv_ld = packed ? 2 * z.g_l * z.d : z.qkv_cols, k_off = packed ? 0 : z.a_l * z.d, v_off = k_off + z.g_l * z.d;
  const int src = ((ctx_.coord().cp - op.step) % z.cp + z.cp) % z.cp;  // whose block arrives at this step
  AttentionShape sh{z.b, z.a_l, z.g_l, z.d, z.S, z.S, ctx_.coord().cp * z.S, src * z.S};
  const QkvView<const float> x{qkv, kvb.subspan(static_cast<std::size_t>(k_off)), kvb.subspan(static_cast<std::size_t>(v_off)), z.qkv_cols,
                               kv_ld, kv_ld};
  const auto lse_count = static_cast<std::size_t>(z.b * z.a_l * z.S);
  if (fwd) {
    F out = view(arena, o.out[0]);
    if (out.empty()) {  // flash recompute keeps only the statistics
      scratch_.resize(static_cast<std::size_t>(z.T * z.a_l * z.d));
      out = scratch_;
    }
    attention_forward<float>(sh, x, out, view(arena, o.out[1]).first(lse_count), op.step == 0);
    return;
  }
  const CF dout = view(arena, o.in[0]), out = view(arena, o.in[3]), lse = CF(view(arena, o.in[4])).first(lse_count);
  const F dqkv = view(arena, o.out[0]);
  if (!packed) {
    const QkvView<float> dx{dqkv, dqkv.subspan(static_cast<std::size_t>(k_off)), dqkv.subspan(static_cast<std::size_t>(v_off)), z.qkv_cols,
                            z.qkv_cols, z.qkv_cols};
    attention_backward<float>(sh, x, out, lse, dout, dx);
    return;
  }
  // dK, dV of the travelling block: what earlier ranks added, plus this rank's share.
  const F dkv = view(arena, o.out[1]);
  if (o.in.size() > 5) {
    const CF incoming = view(arena, o.in[5]);
    std::copy(incoming.begin(), incoming.end(), dkv.begin());
  } else {
    std::fill(dkv.begin(), dkv.end(), 0.0f);
  }
  const QkvView<float> dx{dqkv, dkv, dkv.subspan(static_cast<std::size_t>(z.g_l * z.d)), z.qkv_cols, kv_ld, kv_ld};
  attention_backward<float>(sh, x, out, lse, dout, dx);
}

void CpuBackend::copy(const Op& op, TensorArena& arena) {
  const Sizes& z = z_;
  const Operands o = operands(program_, op);
  const i64 width = 2 * z.g_l * z.d, first = z.a_l * z.d;
  if (op.variant == Variant::Accumulate) {
    const CF in = view(arena, o.in[0]);
    const F out = view(arena, o.out[0]);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] += in[i];
    return;
  }
  if (op.variant == Variant::PackKeyValues) {
    const CF qkv = view(arena, o.in[0]);
    const F kv = view(arena, o.out[0]);
    for (i64 r = 0; r < op.m; ++r)
      std::copy_n(qkv.begin() + r * z.qkv_cols + first, width, kv.begin() + r * width);
    return;
  }
  const CF dkv = view(arena, o.in[0]);
  const F dqkv = view(arena, o.out[0]);
  for (i64 r = 0; r < op.m; ++r)
    for (i64 c = 0; c < width; ++c) dqkv[static_cast<std::size_t>(r * z.qkv_cols + first + c)] += dkv[static_cast<std::size_t>(r * width + c)];
}

void CpuBackend::activation(const Op& op, TensorArena& arena) {
  const Operands o = operands(program_, op);
  const bool swiglu = plan_.model.activation == Activation::SwiGLU;
  if (forward_phase(op.phase)) {
    if (swiglu)
      swiglu_forward<float>(view(arena, o.in[0]), view(arena, o.out[0]), op.m, op.n);
    else
      gelu_forward<float>(view(arena, o.in[0]), view(arena, o.out[0]));
    return;
  }
  if (swiglu)
    swiglu_backward<float>(view(arena, o.in[0]), view(arena, o.in[1]), view(arena, o.out[0]), op.m, op.n);
  else
    gelu_backward<float>(view(arena, o.in[0]), view(arena, o.in[1]), view(arena, o.out[0]));
}

void CpuBackend::dropout_add(const Op& op, TensorArena& arena) {
  const Operands o = operands(program_, op);
  const double p = plan_.model.hidden_dropout;
  const std::uint64_t seed = opt_.seed;  // masks are keyed by element, so sharing the weights' seed draws nothing twice
  if (forward_phase(op.phase)) {
    const F out = view(arena, o.out[0]);
    const bool plain = op.variant == Variant::EmbeddingDropout;
    // out = residual + dropout(branch + bias)
    scratch_.assign(view(arena, o.in[0]).begin(), view(arena, o.in[0]).end());
    if (!plain && o.in.size() > 2) {
      const CF bias = view(arena, o.in[2]);
      for (i64 r = 0; r < op.m; ++r)
        for (i64 c = 0; c < op.n; ++c) scratch_[static_cast<std::size_t>(r * op.n + c)] += bias[static_cast<std::size_t>(c)];
    }
    const CF residual = plain ? CF() : CF(view(arena, o.in[1]));
    if (o.out.size() > 1) {
      const auto keys = ctx_.dropout_keys(op, op.m);
      dropout_add_forward<float>(scratch_, residual, out, as<std::uint8_t>(raw(arena, o.out[1])), keys, op.n, p, seed);
    } else {
      for (std::size_t i = 0; i < out.size(); ++i) out[i] = scratch_[i] + (residual.empty() ? 0.0f : residual[i]);
    }
    return;
  }
  const CF dy = view(arena, o.in[0]);
  const F d = view(arena, o.out[0]);
  if (o.in.size() > 1)
    dropout_backward<float>(dy, as<const std::uint8_t>(raw(arena, o.in[1])), d, p);
  else
    std::copy(dy.begin(), dy.end(), d.begin());
  if (o.out.size() > 1) {
    const F dbias = view(arena, o.out[1]);
    for (i64 r = 0; r < op.m; ++r)
      for (i64 c = 0; c < op.n; ++c) dbias[static_cast<std::size_t>(c)] += d[static_cast<std::size_t>(r * op.n + c)];
  }
}

namespace {
struct Routing {
  std::span<std::int32_t> expert, slot;
  F gate;
};
Routing routing(std::span<std::byte> b, i64 assignments) {
  const auto n = static_cast<std::size_t>(assignments) * 4;
  return {as<std::int32_t>(b.subspan(0, n)), as<std::int32_t>(b.subspan(n, n)), as<float>(b.subspan(2 * n, n))};
}
}  // namespace

void CpuBackend::router(const Op& op, TensorArena& arena) {
  const Sizes& z = z_;
  const Operands o = operands(program_, op);
  const MoeShape shape{op.m, z.E, z.top_k, z.slots};
  const double micro_batches = static_cast<double>(plan_.num_micro_batches) * plan_.plan.dp() * plan_.plan.cp();
  const auto aux_coeff = static_cast<float>(opt_.moe_aux_coeff);
  if (forward_phase(op.phase)) {
    const Routing r = routing(raw(arena, o.out[1]), op.m * z.top_k);
    router_forward<float>(view(arena, o.in[0]), view(arena, o.out[0]), r.expert, r.slot, r.gate, shape, opt_.moe_renormalize, aux_coeff);
    return;
  }
  const Routing r = routing(raw(arena, o.in[2]), op.m * z.top_k);
  // The load-balancing loss is averaged over every micro-batch of the job, as the LM loss is.
  router_backward<float>(view(arena, o.in[0]), view(arena, o.in[1]), r.expert, view(arena, o.out[0]), shape, opt_.moe_renormalize,
                         static_cast<float>(aux_coeff / micro_batches));
}

void CpuBackend::permute(const Op& op, TensorArena& arena) {
  const Sizes& z = z_;
  const Operands o = operands(program_, op);
  const MoeShape shape{z.Tres, z.E, z.top_k, z.slots};
  const bool fwd = forward_phase(op.phase);
  const Routing r = routing(raw(arena, o.in.back()), z.Tres * z.top_k);
  if (op.variant == Variant::Dispatch) {
    if (fwd)
      permute_forward<float>(view(arena, o.in[0]), r.expert, r.slot, view(arena, o.out[0]), shape, z.h);
    else
      permute_backward<float>(view(arena, o.in[0]), r.expert, r.slot, view(arena, o.out[0]), shape, z.h);
    return;
  }
  if (fwd)
    unpermute_forward<float>(view(arena, o.in[0]), r.expert, r.slot, r.gate, view(arena, o.out[0]), shape, z.h);
  else
    unpermute_backward<float>(view(arena, o.in[0]), view(arena, o.in[1]), r.expert, r.slot, r.gate, view(arena, o.out[0]),
                              view(arena, o.out[1]), shape, z.h);
}

void CpuBackend::cross_entropy(const Op& op, TensorArena& arena) {
  const Sizes& z = z_;
  const Operands o = operands(program_, op);
  const i64 rows = op.m, cols = op.n, vocab_begin = ctx_.coord().tp * z.V_l;
  const auto n = static_cast<std::size_t>(rows);
  if (op.phase == Phase::Forward) {
    if (op.variant == Variant::CrossEntropyPartials) {
      const F sums = view(arena, o.out[0]);
      cross_entropy_partials<float>(view(arena, o.in[0]), ctx_.targets(), vocab_begin, view(arena, o.in[1]), sums.first(n), sums.subspan(n, n),
                                    rows, cols);
      return;
    }
    const CF logits = view(arena, o.in[0]);
    const F saved = view(arena, o.out[0]), stats = view(arena, o.out[1]);
    std::copy(logits.begin(), logits.end(), saved.begin());
    cross_entropy_row_max<float>(saved, stats.first(n), rows, cols);
    if (op.variant != Variant::CrossEntropyMax)
      cross_entropy_partials<float>(saved, ctx_.targets(), vocab_begin, stats.first(n), stats.subspan(n, n), stats.subspan(2 * n, n), rows, cols);
    return;
  }
  const CF saved = view(arena, o.in[0]), stats = view(arena, o.in[1]);
  const CF mx = stats.first(n), se = stats.subspan(n, n), tl = stats.subspan(2 * n, n);
  std::vector<float> losses(n);
  cross_entropy_loss<float>(mx, se, tl, losses);
  for (float l : losses) loss_.sum += l;
  loss_.tokens += rows;
  // The job's loss is the mean over every token of the global batch.
  const double tokens = static_cast<double>(plan_.plan.global_batch_size) * static_cast<double>(z.s);
  const std::vector<float> dloss(n, static_cast<float>(1.0 / tokens));
  cross_entropy_backward<float>(saved, ctx_.targets(), vocab_begin, mx, se, dloss, view(arena, o.out[0]), rows, cols);
}

void CpuBackend::grad_norm_op(TensorArena& arena) {
  double sq = 0;
  for (const ParamBuffer& b : program_.buffers) {
    const auto g = arena.floats(b.grad);
    for (const ParamSlot& s : b.slots) {
      const OwnedRange r = ctx_.held_owned(b, s, b.grad_sharded, static_cast<i64>(g.size()));
      for (i64 at = r.begin; at < r.end; ++at) {
        const double v = g[static_cast<std::size_t>(at)];
        sq += v * v;
      }
    }
  }
  const Operands o = operands(program_, *op_);
  view(arena, o.out[0])[0] = static_cast<float>(sq);
}

void CpuBackend::adamw(TensorArena& arena, bool on_host) {
  const Operands o = operands(program_, *op_);
  // On the host the norm arrived with the gradients' copy; on the device it is the first operand.
  const double sq = on_host ? static_cast<double>(host_norm_sq_) : static_cast<double>(view(arena, o.in[0])[0]);
  grad_norm_ = std::sqrt(std::max(0.0, sq));
  const double clip = clip_coefficient(grad_norm_, opt_.clip_grad);
  std::size_t host_at = 0;
  for (const ParamBuffer& b : program_.buffers) {
    const OwnedRange r = ctx_.optimizer_range(b);
    const i64 owned = r.end - r.begin;
    F state = on_host ? F(host_state_) : arena.floats(*optimizer_);
    const F m = state.subspan(static_cast<std::size_t>(b.optimizer_offset), static_cast<std::size_t>(owned));
    const F v = state.subspan(static_cast<std::size_t>(b.optimizer_offset + owned), static_cast<std::size_t>(owned));
    if (on_host) {
      const F w(host_weights_.data() + host_at, static_cast<std::size_t>(owned));
      const CF g(host_grads_.data() + host_at, static_cast<std::size_t>(owned));
      adamw_step<float>(w, g, m, v, opt_.adamw, step_, clip);
      host_at += static_cast<std::size_t>(owned);
      continue;
    }
    const F w = arena.floats(b.weight).subspan(static_cast<std::size_t>(b.weight_sharded ? 0 : r.begin), static_cast<std::size_t>(owned));
    const CF g = CF(arena.floats(b.grad)).subspan(static_cast<std::size_t>(b.grad_sharded ? 0 : r.begin), static_cast<std::size_t>(owned));
    adamw_step<float>(w, g, m, v, opt_.adamw, step_, clip);
  }
}

void CpuBackend::copy_to_host(TensorArena& arena) {
  const Operands o = operands(program_, *op_);
  host_norm_sq_ = view(arena, o.in[0])[0];
  std::size_t at = 0;
  for (const ParamBuffer& b : program_.buffers) {
    const OwnedRange r = ctx_.optimizer_range(b);
    const auto g = arena.floats(b.grad).subspan(static_cast<std::size_t>(b.grad_sharded ? 0 : r.begin),
                                                static_cast<std::size_t>(r.end - r.begin));
    std::copy(g.begin(), g.end(), host_grads_.begin() + static_cast<std::ptrdiff_t>(at));
    at += g.size();
  }
}

void CpuBackend::copy_to_device(TensorArena& arena) {
  std::size_t at = 0;
  for (const ParamBuffer& b : program_.buffers) {
    const OwnedRange r = ctx_.optimizer_range(b);
    const auto w = arena.floats(b.weight).subspan(static_cast<std::size_t>(b.weight_sharded ? 0 : r.begin),
                                                  static_cast<std::size_t>(r.end - r.begin));
    std::copy_n(host_weights_.begin() + static_cast<std::ptrdiff_t>(at), w.size(), w.begin());
    at += w.size();
  }
}

void CpuBackend::export_owned(TensorArena& arena, Export what, std::map<std::string, std::vector<double>>& out) const {
  for (const ParamBuffer& b : program_.buffers) {
    const bool gradients = what == Export::Gradients;
    ctx_.export_owned(b, arena.floats(gradients ? b.grad : b.weight), gradients ? b.grad_sharded : b.weight_sharded, what, out);
  }
}

}  // namespace px::cpu
