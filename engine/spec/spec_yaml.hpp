// Reading model, GPU, cluster and plan specs from YAML (datasets/README.md has the schema), and the
// catalog that finds them by name under a datasets folder. Every problem becomes a px::Error naming
// the file, line and column: syntax (Parse), keys, types and values (Spec), missing files (Io) and
// unknown names (NotFound).
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/core/error.hpp"
#include "engine/spec/spec.hpp"

namespace px {

// Turns the GPU name of a cluster file (`gpu: h100-sxm`) into its spec; `where` is the value's place
// in the cluster file, for the error when the name is unknown.
using GpuResolver = std::function<GpuSpec(const std::string& name, const Location& where)>;

// Parsing checks syntax, keys and value types and fills the documented defaults; it does not check
// value ranges (validate.hpp does). `file_label` is the name errors give the text, usually its path.
ModelSpec parse_model_yaml(std::string_view text, const std::string& file_label);
GpuSpec parse_gpu_yaml(std::string_view text, const std::string& file_label);
ClusterSpec parse_cluster_yaml(std::string_view text, const std::string& file_label,
                               const GpuResolver& resolve_gpu);
PlanSpec parse_plan_yaml(std::string_view text, const std::string& file_label);

// The whole file as text; ErrorKind::Io when it is missing or unreadable.
std::string read_spec_file(const std::filesystem::path& path);

// Loading reads, parses and validates models, GPUs and clusters. A plan can only be checked
// against a model (resolve_plan), so load_plan_file parses it only.
ModelSpec load_model_file(const std::filesystem::path& path);
GpuSpec load_gpu_file(const std::filesystem::path& path);
// GPU names resolve to <datasets>/gpus/<name>.yaml, where <datasets> is the folder above the
// cluster file's folder (datasets/clusters/x.yaml -> datasets/gpus/).
ClusterSpec load_cluster_file(const std::filesystem::path& path);
ClusterSpec load_cluster_file(const std::filesystem::path& path, const GpuResolver& resolve_gpu);
PlanSpec load_plan_file(const std::filesystem::path& path);
// Every run needs a plan and positive forward and backward times.
LayerTimesSpec load_layer_times_file(const std::filesystem::path& path);

// Named specs under a datasets root: models/<name>.yaml, gpus/, clusters/, plans/. An argument that
// contains '/' or ends in .yaml is a path instead (relative to the working directory). Unknown names
// are ErrorKind::NotFound listing the closest available names.
class SpecCatalog {
 public:
  explicit SpecCatalog(std::filesystem::path datasets_root);

  // $PARALLAX_DATASETS when set, else the datasets folder of the source tree this was built from.
  static std::filesystem::path default_root();

  const std::filesystem::path& root() const { return root_; }

  ModelSpec model(const std::string& name_or_path) const;
  ClusterSpec cluster(const std::string& name_or_path) const;  // GPUs by name from this catalog
  GpuSpec gpu(const std::string& name_or_path) const;
  PlanSpec plan(const std::string& name_or_path) const;
  LayerTimesSpec layer_times(const std::string& name_or_path) const;  // layer_times/<name>.yaml
  // A run's plan; an unknown one is an error at the run's line of the layer-times file.
  PlanSpec plan_of(const LayerTimesSpec& times, const LayerTimesSpec::Run& run) const;

  // File stems, sorted.
  std::vector<std::string> model_names() const;
  std::vector<std::string> cluster_names() const;
  std::vector<std::string> gpu_names() const;
  std::vector<std::string> plan_names() const;

  // Where a name or path leads (whether or not the file exists), e.g. for provenance records.
  std::filesystem::path model_path(const std::string& name_or_path) const;
  std::filesystem::path cluster_path(const std::string& name_or_path) const;
  std::filesystem::path gpu_path(const std::string& name_or_path) const;
  std::filesystem::path plan_path(const std::string& name_or_path) const;

  // Resolves cluster files' GPU names against this catalog's gpus/.
  GpuResolver gpu_resolver() const;

 private:
  std::filesystem::path root_;
};

// True when a command-line argument names a file rather than a catalog entry.
bool looks_like_path(std::string_view name_or_path);

}  // namespace px
