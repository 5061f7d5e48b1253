// The three inputs of every Parallax run: a model, a cluster and a parallel plan (and measured layer
// times that calibrate the simulator for them). Plain data; loading
// (spec_yaml.hpp), validation (validate.hpp) and the closed-form model math (model_math.hpp) live apart.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace px {

enum class DType : std::uint8_t { F32, BF16, F16, FP8 };
enum class Activation : std::uint8_t { Gelu, SwiGLU };
enum class NormKind : std::uint8_t { LayerNorm, RMSNorm };
enum class PositionKind : std::uint8_t { Learned, Rope };

std::size_t dtype_bytes(DType t);
std::string_view to_string(DType t);
std::string_view to_string(Activation a);
std::string_view to_string(NormKind n);
std::string_view to_string(PositionKind p);

// Mixture-of-experts FFN (Switch/Mixtral style): every `layer_freq`-th layer's MLP is replaced by
// `num_experts` expert MLPs of `ffn_hidden_size` each, a linear router, and top-k routing.
struct MoESpec {
  int num_experts = 0;
  int top_k = 0;
  int ffn_hidden_size = 0;       // per expert
  double capacity_factor = 1.0;  // tokens per expert = capacity_factor * tokens * top_k / num_experts
  int layer_freq = 1;            // 1: every layer is MoE
};

struct ModelSpec {
  std::string name;    // key used on the command line, e.g. "gpt3-175b"
  std::string source;  // citation for the architecture figures
  std::string file;    // where it was loaded from (empty for models built in code)
  std::map<std::string, int, std::less<>> field_lines;  // YAML line of each key, for error messages

  int num_layers = 0;
  int hidden_size = 0;
  int num_attention_heads = 0;
  int num_query_groups = 0;  // key/value heads; == num_attention_heads for MHA, fewer for GQA
  int kv_channels = 0;       // head dimension; hidden_size / num_attention_heads unless stated
  int ffn_hidden_size = 0;   // dense MLP inner size (per branch for SwiGLU)
  int vocab_size = 0;        // unpadded; the plan compiler pads to a multiple of 128 * tp
  int seq_length = 0;        // default training sequence length
  int max_position_embeddings = 0;

  Activation activation = Activation::Gelu;
  NormKind norm = NormKind::LayerNorm;
  PositionKind position = PositionKind::Learned;
  bool tied_embeddings = true;
  bool add_bias_linear = true;  // biases on every linear layer (GPT) or none (Llama)
  bool add_qkv_bias = false;    // bias on QKV only (meaningful when add_bias_linear is false)
  double hidden_dropout = 0.0;
  double attention_dropout = 0.0;
  double rope_theta = 10000.0;

  std::optional<MoESpec> moe;

  bool is_moe() const { return moe.has_value() && moe->num_experts > 0; }
  int head_dim() const { return kv_channels; }
};

struct GpuSpec {
  std::string name;  // "h100-sxm"
  std::string source;
  double peak_bf16_tflops = 0;  // dense, never the sparsity figure
  double peak_fp16_tflops = 0;
  double peak_fp8_tflops = 0;
  double peak_fp32_tflops = 0;
  double hbm_gib = 0;                // usable device memory, GiB
  double hbm_bandwidth_gbs = 0;      // GB/s (1e9 bytes/s)
  double nvlink_bandwidth_gbs = 0;   // GB/s per GPU per direction
  // What the simulator's GEMM curve needs (both optional; without them GEMMs cost a flat fraction
  // of peak): the streaming multiprocessors that run a GEMM's output tiles in waves, and one
  // published measurement of a large dense bf16 GEMM, the rate the curve scales from.
  int sms = 0;
  struct GemmMeasurement {
    double tflops = 0;        // achieved; 0: none published
    int m = 0, n = 0, k = 0;  // at this (m x k) * (k x n) shape
  } gemm_measured;
};

enum class FabricTopology : std::uint8_t { RailOptimizedFatTree, FatTree, Dragonfly };
std::string_view to_string(FabricTopology t);

struct NodeSpec {
  int gpus_per_node = 8;
  double nvlink_bandwidth_gbs = 0;  // per GPU per direction, through the NVSwitch (line rate)
  // The share of that line rate collective kernels carry: NVLink's packet headers and flow control
  // take the rest (NCCL's topology model rates an A100 link at 20 of its 25 GB/s).
  double nvlink_efficiency = 1.0;
  double nvlink_latency_us = 0;
  int nics_per_node = 0;
  double nic_bandwidth_gbps = 0;    // Gb/s per NIC per direction (line rate)
  double nic_latency_us = 0;
  double pcie_bandwidth_gbs = 0;    // host<->device, GB/s per direction (offload copies)
};

struct FabricSpec {
  FabricTopology topology = FabricTopology::RailOptimizedFatTree;
  int nodes_per_leaf_group = 32;  // nodes whose same-rail NICs share one leaf switch (a scalable unit)
  int leaf_radix = 64;            // switch ports
  int spine_radix = 64;
  double oversubscription = 1.0;  // leaf downlink : uplink bandwidth ratio (1 = full bisection)
  double switch_latency_us = 0;
  // Dragonfly only
  int dragonfly_groups = 0;
  int dragonfly_routers_per_group = 0;
};

struct ClusterSpec {
  std::string name;
  std::string source;
  std::string file;
  std::map<std::string, int, std::less<>> field_lines;
  GpuSpec gpu;
  NodeSpec node;
  FabricSpec fabric;
  int num_nodes = 0;
  int num_gpus() const { return num_nodes * node.gpus_per_node; }
};

enum class PipelineSchedule : std::uint8_t { GPipe, OneFOneB, Interleaved1F1B, ZeroBubble };
enum class Recompute : std::uint8_t { None, Selective, Full };
std::string_view to_string(PipelineSchedule s);
std::string_view to_string(Recompute r);

// Measured times of one transformer layer's forward and backward pass (a framework's per-layer
// timers, or a paper's table of them) in runs of plans of one model on one cluster: what
// `parallax calibrate --layer-times` fits the simulator's GEMM curve to (datasets/layer_times/).
struct LayerTimesSpec {
  std::string file;
  std::string source;
  std::string model;    // catalog names or paths, as on the command line
  std::string cluster;
  struct Run {
    std::string plan;  // a plan name (datasets/plans/) or path
    double forward_ms = 0;
    double backward_ms = 0;  // recompute included
    int line = 0;            // of the run's entry in `file`, for errors about it
  };
  std::vector<Run> runs;
};

// Megatron-LM names throughout. Rank order is tp-cp-ep-dp-pp (tp fastest); ep subdivides dp.
struct PlanSpec {
  std::string file;  // where it was loaded from, when it came from a file
  std::map<std::string, int, std::less<>> field_lines;  // YAML line of each key, for error messages
  int tensor_model_parallel_size = 1;    // tp
  int pipeline_model_parallel_size = 1;  // pp
  int context_parallel_size = 1;         // cp
  int expert_model_parallel_size = 1;    // ep, divides dp
  int data_parallel_size = 1;            // dp
  int micro_batch_size = 1;
  int global_batch_size = 1;             // = micro * accumulation steps * dp
  int virtual_pipeline_model_parallel_size = 1;  // model chunks per pipeline rank (interleaved)
  int num_layers_per_virtual_pipeline_stage = 0;  // alternative to the above; resolve_plan converts
  int seq_length = 0;                    // 0: the model's seq_length
  int zero_stage = 0;                    // 0..3 (1 = Megatron's distributed optimizer)
  PipelineSchedule schedule = PipelineSchedule::OneFOneB;
  Recompute recompute = Recompute::None;
  bool sequence_parallel = false;
  bool optimizer_offload = false;        // optimizer states and step on the host
  // ZeRO-1/2: each buffer's updated weights are gathered at the start of the next iteration, where
  // the forward waits only for its own layer's (Megatron-LM's --overlap-param-gather), instead of
  // all at the end of the step.
  bool overlap_param_gather = false;
  // Sequence-parallel all-gathers before the column-parallel GEMMs and reduce-scatters after the
  // row-parallel ones run as tp ring steps, each GEMM on one sequence block while the next block
  // travels (Megatron-LM's --tp-comm-overlap: Transformer Engine's ring-exchange overlap).
  bool tp_comm_overlap = false;
  bool use_flash_attn = true;            // fused attention: no s x s tensors kept in memory
  DType precision = DType::BF16;         // weights and activations; master weights and Adam are fp32;
                                         // fp8: the GEMMs only, the rest bf16 (compiler.cpp)
  DType grad_dtype = DType::F32;         // main-gradient accumulation dtype (Megatron bf16 default)

  int tp() const { return tensor_model_parallel_size; }
  int pp() const { return pipeline_model_parallel_size; }
  int cp() const { return context_parallel_size; }
  int ep() const { return expert_model_parallel_size; }
  int dp() const { return data_parallel_size; }
  int vp() const { return virtual_pipeline_model_parallel_size; }
  std::int64_t world_size() const {
    return std::int64_t{tp()} * pp() * cp() * dp();
  }
  int num_micro_batches() const { return global_batch_size / (micro_batch_size * dp()); }
};

}  // namespace px
