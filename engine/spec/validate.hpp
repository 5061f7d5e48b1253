// The rules a model, GPU, cluster and parallel plan must obey before anything is built from them.
// A broken rule is a px::Error that names the rule, the file and line of the offending key (from
// the spec's field_lines) and, for divisibility rules, the nearest values that would work.
#pragma once

#include <map>
#include <string>

#include "engine/spec/spec.hpp"

namespace px {

// Throw Error(Spec) at the offending key's file:line.
void validate_model(const ModelSpec& model);
void validate_cluster(const ClusterSpec& cluster);  // its GPU included

// GpuSpec keeps no file or lines of its own; `site` says where its keys were written (a GPU file,
// or the `gpu:` map of a cluster file with prefix "gpu.") so errors can still point at a line.
struct FieldSite {
  std::string file;
  const std::map<std::string, int, std::less<>>* lines = nullptr;
  std::string prefix;
};
void validate_gpu(const GpuSpec& gpu, const FieldSite& site = {});

// Fills the derived fields of a plan and checks every rule against the model (and the cluster, when
// one is given): seq_length 0 becomes the model's; num_layers_per_virtual_pipeline_stage becomes the
// virtual_pipeline_model_parallel_size it implies (and an interleaved plan given by vp gets its
// layers per chunk filled in); sequence_parallel is turned off when tp == 1, as Megatron-LM does.
// Throws Error(Plan) naming the broken rule and the nearest valid values, at the line of the
// offending key when the plan came from a file.
PlanSpec resolve_plan(PlanSpec plan, const ModelSpec& model, const ClusterSpec* cluster);

}  // namespace px
