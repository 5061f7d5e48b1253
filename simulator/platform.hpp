// The SimGrid platform of a cluster, built with the S4U C++ API (no XML): one host per GPU, NVLink
// through each node's NVSwitch, NICs into a rail-optimized fat tree (or a plain fat tree, or a
// dragonfly) whose leaf uplinks carry the spec's oversubscription. platform.cpp says what is modeled.
#pragma once

#include <string>
#include <vector>

#include "engine/spec/spec.hpp"

namespace simgrid::s4u {
class Host;
class Link;
}  // namespace simgrid::s4u

namespace px::sim {

// A route as SimGrid resolves it: the links one flow crosses and its one-way latency.
struct Path {
  std::vector<simgrid::s4u::Link*> links;
  double latency_s = 0;
  double bottleneck_bytes_per_s = 0;  // the slowest link: an uncontended flow's rate
};

// What-if on one link of the platform: its bandwidth times `factor` (below 1 degraded, above 1
// upgraded). Links go by the names the platform gives them: gpuG-nvlink-up, nodeN-nicK-up,
// suU-railK-leaf-up (rail-optimized), leafU-up (plain fat tree), routerR-up (dragonfly), each with
// its -down twin, and groupA-to-groupB (dragonfly global links); a name without -up or -down means
// both directions. Factor 0 fails a NIC (nodeN-nicK): its GPUs' inter-node traffic leaves through
// the node's next working NIC, as NCCL falls back to another rail; other links cannot fail, since
// their routes have no alternative in this model (degrade them instead).
struct LinkChange {
  std::string link;
  double factor = 1;
};

class Platform {
 public:
  // Builds the first ceil(num_gpus / gpus_per_node) nodes of `cluster` into the current engine
  // (create `simgrid::s4u::Engine e(&argc, argv)` first; build this before creating actors). The
  // engine must hold no platform yet: this sets the network model, which SimGrid fixes once the
  // first zone exists. Throws px::Error (Usage) when num_gpus is out of 1..cluster.num_gpus() or
  // the engine already has a platform, and (Spec) for a cluster that fails validate_cluster.
  // `changes` apply after the build; an unknown link or a failure of anything but a NIC, or of a
  // node's last NIC, throws px::Error (Usage).
  Platform(const ClusterSpec& cluster, int num_gpus, const std::vector<LinkChange>& changes = {});
  Platform(const Platform&) = delete;
  Platform& operator=(const Platform&) = delete;

  // GPU g = node * gpus_per_node + local index: the rank order of the plans. The hosts of the GPUs
  // beyond num_gpus() in the last node exist but belong to no rank.
  simgrid::s4u::Host* gpu(int index) const;
  int num_gpus() const { return num_gpus_; }
  int num_nodes() const { return num_nodes_; }
  const ClusterSpec& cluster() const { return cluster_; }

  int node_of(int gpu) const { return gpu / cluster_.node.gpus_per_node; }
  // The NIC (rail) that carries a GPU's inter-node traffic: GPUs share NICs evenly.
  int nic_of(int gpu) const;

  // How SimGrid routes a flow from GPU src to GPU dst; an uncontended flow of B bytes takes
  // latency_s + B / bottleneck_bytes_per_s under the network model set here (CM02, no factors).
  Path path(int src, int dst) const;

 private:
  ClusterSpec cluster_;
  int num_gpus_ = 0;
  int num_nodes_ = 0;
  std::vector<simgrid::s4u::Host*> hosts_;
};

}  // namespace px::sim
