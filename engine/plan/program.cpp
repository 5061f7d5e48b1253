// Names of the op-program enums, as they appear in traces, JSON and the CLI.
#include "engine/plan/program.hpp"

namespace px {

OpClass op_class(OpKind k) {
  switch (k) {
    case OpKind::AllReduce:
    case OpKind::ReduceScatter:
    case OpKind::AllGather:
    case OpKind::AllToAll:
    case OpKind::Send:
    case OpKind::Recv:
    case OpKind::RingExchange: return OpClass::Comm;
    case OpKind::CopyD2H:
    case OpKind::CopyH2D: return OpClass::Memory;
    default: return OpClass::Compute;
  }
}

std::string_view to_string(OpKind k) {
  switch (k) {
    case OpKind::Embedding: return "embedding";
    case OpKind::Norm: return "norm";
    case OpKind::Gemm: return "gemm";
    case OpKind::Rope: return "rope";
    case OpKind::AttentionCore: return "attention";
    case OpKind::Activation: return "activation";
    case OpKind::DropoutAdd: return "dropout_add";
    case OpKind::Router: return "router";
    case OpKind::Permute: return "permute";
    case OpKind::CrossEntropy: return "cross_entropy";
    case OpKind::Copy: return "copy";
    case OpKind::OptimizerStep: return "optimizer_step";
    case OpKind::AllReduce: return "all_reduce";
    case OpKind::ReduceScatter: return "reduce_scatter";
    case OpKind::AllGather: return "all_gather";
    case OpKind::AllToAll: return "all_to_all";
    case OpKind::Send: return "send";
    case OpKind::Recv: return "recv";
    case OpKind::RingExchange: return "ring_exchange";
    case OpKind::CopyD2H: return "copy_d2h";
    case OpKind::CopyH2D: return "copy_h2d";
  }
  return "?";
}

std::string_view to_string(Phase p) {
  switch (p) {
    case Phase::Forward: return "forward";
    case Phase::Backward: return "backward";
    case Phase::BackwardInput: return "backward_input";
    case Phase::BackwardWeight: return "backward_weight";
    case Phase::Recompute: return "recompute";
    case Phase::Optimizer: return "optimizer";
  }
  return "?";
}

std::string_view to_string(Stream s) {
  switch (s) {
    case Stream::Compute: return "compute";
    case Stream::TensorComm: return "tensor_comm";
    case Stream::DataComm: return "data_comm";
    case Stream::PipeSendNext: return "pipe_send_next";
    case Stream::PipeRecvPrev: return "pipe_recv_prev";
    case Stream::PipeSendPrev: return "pipe_send_prev";
    case Stream::PipeRecvNext: return "pipe_recv_next";
    case Stream::Memcpy: return "memcpy";
    case Stream::Host: return "host";
  }
  return "?";
}

std::string_view to_string(GroupKind g) {
  switch (g) {
    case GroupKind::None: return "none";
    case GroupKind::TP: return "tp";
    case GroupKind::CP: return "cp";
    case GroupKind::EP: return "ep";
    case GroupKind::DP: return "dp";
    case GroupKind::ExpertDP: return "expert_dp";
    case GroupKind::PP: return "pp";
    case GroupKind::Embedding: return "embedding";
  }
  return "?";
}

std::string_view to_string(TensorClass c) {
  switch (c) {
    case TensorClass::Weight: return "weight";
    case TensorClass::Gradient: return "gradient";
    case TensorClass::Optimizer: return "optimizer";
    case TensorClass::Activation: return "activation";
    case TensorClass::Temporary: return "temporary";
    case TensorClass::Gathered: return "gathered";
    case TensorClass::Received: return "received";
  }
  return "?";
}

}  // namespace px
