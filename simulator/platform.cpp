// The SimGrid platform of a cluster: hosts and links made with the S4U API, routed by one zone
// that computes each route from the GPU indices instead of storing route tables.
#include "simulator/platform.hpp"

#include <simgrid/kernel/routing/NetPoint.hpp>
#include <simgrid/kernel/routing/NetZoneImpl.hpp>
#include <simgrid/s4u/Engine.hpp>
#include <simgrid/s4u/Host.hpp>
#include <simgrid/s4u/Link.hpp>
#include <simgrid/s4u/NetZone.hpp>
#include <xbt/config.hpp>

#include <algorithm>
#include <regex>
#include <set>
#include <cassert>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/error.hpp"
#include "engine/spec/validate.hpp"

namespace px::sim {
namespace {

namespace s4u = simgrid::s4u;
using simgrid::kernel::resource::StandardLinkImpl;
using simgrid::kernel::routing::NetPoint;
using simgrid::kernel::routing::NetZoneImpl;
using simgrid::kernel::routing::Route;

constexpr double kUs = 1e-6;

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Everything a route needs, derived once from the spec.
struct Layout {
  FabricTopology topology = FabricTopology::RailOptimizedFatTree;
  int gpus_per_node = 1;
  int nics = 0;                  // per node
  std::vector<int> nic_of_local; // local GPU index -> NIC
  // Fat trees: a unit is a leaf group of nodes with `leaves_per_unit` leaves (one per rail, or one).
  int nodes_per_unit = 1;
  int leaves_per_unit = 1;
  int units_per_pod = 0;  // 0: a two-level tree, every leaf under every spine
  // Dragonfly
  int nodes_per_router = 1;
  int routers_per_group = 1;
  int groups = 1;  // built
  double nvlink_latency_s = 0;
  double nic_latency_s = 0;
  double switch_latency_s = 0;
};

// Why one computing zone, not a tree of SimGrid zones: SimGrid routes between two zones through one
// gateway per pair of zones, whatever the host inside them. With a zone per node, all of a node's
// GPUs would leave through one gateway and the rail (which NIC, which leaf) would be lost above it;
// with zones per rail, intra-node traffic would lose its NVSwitch. A rail-optimized fabric needs
// both, so FabricZone derives SimGrid's public routing interface (NetZoneImpl, the base of its
// Star/FatTree/Dragonfly zones) and builds each route in O(1) from (node, local index). Memory is
// the hosts and links only.
//
// The model. Links carry bandwidth only, one direction each, shared max-min by the flows crossing
// them; a route's latency is the spec's end-to-end one-way figure, added once.
// - Intra-node: GPU g -> NVSwitch -> GPU h crosses g's NVLink up link and h's down link (node
//   nvlink_bandwidth_gbs x nvlink_efficiency each); latency nvlink_latency_us. The NVSwitch is
//   non-blocking.
// - Inter-node: GPU i leaves through NIC i * nics / gpus (its rail), up link, and arrives through the
//   destination GPU's NIC, down link; latency nic_latency_us + hops * switch_latency_us. The
//   GPU-NIC PCIe path is not modeled (PCIe switches outrun one NIC).
// - Rail-optimized fat tree (default): NIC k of every node of a scalable unit (nodes_per_leaf_group
//   nodes) plugs into the unit's rail-k leaf. Same leaf: 1 hop, no fabric link. Otherwise the flow
//   climbs the source leaf's uplink and descends the destination leaf's downlink: 3 hops, or 5 when
//   the leaves outnumber spine ports and a core joins pods of spine_radix / 2 leaves. Cross-rail
//   traffic goes through the spines, as on the real fabric without NCCL's PXN.
// - Plain fat tree: all NICs of a leaf group's nodes share one leaf; otherwise as above.
// - A leaf's uplink (and its downlink, spine to leaf) is one link of its downlink total /
//   oversubscription: ports aggregated, ECMP spreading ideal. Spines and core are non-blocking, so
//   beyond the NICs only leaf uplinks, where oversubscription bites, limit traffic.
// - Dragonfly: a router serves ceil(num_nodes / (groups * routers)) consecutive nodes (all their
//   NICs) and has, like a leaf, one up and one down link of its NIC total / oversubscription for its
//   local and global ports. Between groups a flow also crosses the global link of its (source group,
//   destination group) pair, of a group's router uplinks / (groups - 1): a balanced dragonfly spreads
//   a group's global ports over the others (Kim et al. 2008). Minimal routing; hops 1 (same router),
//   2 (same group), 4 (router, gateway, gateway, router). SimGrid's DragonflyZone is not used: it
//   attaches group i's link to group j at router j, so it needs groups <= routers per chassis (the
//   dragonfly fixture has 8 groups of 4 routers), gives all links one bandwidth, and would again hide
//   the NICs behind a node gateway.
// - A GPU sending to itself crosses one fat-pipe link of HBM bandwidth / 2 (a copy reads and writes).
class FabricZone final : public NetZoneImpl {
 public:
  FabricZone(const std::string& name, Layout layout) : NetZoneImpl(name), l_(std::move(layout)) {}

  std::vector<s4u::Host*> build(const ClusterSpec& c, int num_nodes) {
    s4u::NetZone* zone = get_iface();
    const int gpn = l_.gpus_per_node;
    const int num_hosts = num_nodes * gpn;
    const double nvlink_Bps =
        (c.node.nvlink_bandwidth_gbs > 0 ? c.node.nvlink_bandwidth_gbs : c.gpu.nvlink_bandwidth_gbs) * c.node.nvlink_efficiency * 1e9;
    const double nic_Bps = c.node.nic_bandwidth_gbps * 1e9 / 8;
    const double oversub = c.fabric.oversubscription;
    auto link = [zone](const std::string& name, double bytes_per_s) {
      return zone->create_link(name, bytes_per_s)->set_latency(0)->seal()->get_impl();
    };

    // Hosts first, so that a host's netpoint id (its rank among the zone's components) is its GPU.
    // Speed is the dense bf16 peak: an Exec of F flops takes F / peak (replays cost ops themselves).
    std::vector<s4u::Host*> hosts;
    hosts.reserve(num_hosts);
    for (int g = 0; g < num_hosts; ++g) {
      hosts.push_back(zone->create_host("gpu" + std::to_string(g), c.gpu.peak_bf16_tflops * 1e12));
      assert(hosts.back()->get_netpoint()->id() == static_cast<unsigned long>(g));
    }

    loopback_ = zone->create_link("gpu-loopback", c.gpu.hbm_bandwidth_gbs * 1e9 / 2)
                    ->set_sharing_policy(s4u::Link::SharingPolicy::FATPIPE)
                    ->set_latency(0)
                    ->seal()
                    ->get_impl();
    if (gpn > 1) {
      for (int g = 0; g < num_hosts; ++g) {
        nv_up_.push_back(link("gpu" + std::to_string(g) + "-nvlink-up", nvlink_Bps));
        nv_down_.push_back(link("gpu" + std::to_string(g) + "-nvlink-down", nvlink_Bps));
      }
    }
    for (int n = 0; n < num_nodes && l_.nics > 0; ++n) {
      for (int k = 0; k < l_.nics; ++k) {
        const std::string name = "node" + std::to_string(n) + "-nic" + std::to_string(k);
        nic_up_.push_back(link(name + "-up", nic_Bps));
        nic_down_.push_back(link(name + "-down", nic_Bps));
      }
    }
    if (num_nodes < 2) return hosts;

    if (l_.topology == FabricTopology::Dragonfly) {
      const int routers = ceil_div(num_nodes, l_.nodes_per_router);
      const double router_Bps = l_.nodes_per_router * l_.nics * nic_Bps / oversub;
      for (int r = 0; r < routers; ++r) {
        up_.push_back(link("router" + std::to_string(r) + "-up", router_Bps));
        down_.push_back(link("router" + std::to_string(r) + "-down", router_Bps));
      }
      const int all_groups = c.fabric.dragonfly_groups;
      const double global_Bps = all_groups > 1 ? l_.routers_per_group * router_Bps / (all_groups - 1) : 0;
      global_.assign(static_cast<std::size_t>(l_.groups) * l_.groups, nullptr);
      for (int a = 0; a < l_.groups; ++a) {
        for (int b = 0; b < l_.groups; ++b) {
          if (a == b) continue;
          global_[a * l_.groups + b] =
              link("group" + std::to_string(a) + "-to-group" + std::to_string(b), global_Bps);
        }
      }
    } else {
      const int units = ceil_div(num_nodes, l_.nodes_per_unit);
      const bool rail = l_.topology == FabricTopology::RailOptimizedFatTree;
      const double leaf_Bps = l_.nodes_per_unit * (rail ? 1 : l_.nics) * nic_Bps / oversub;
      for (int u = 0; u < units; ++u) {
        for (int k = 0; k < l_.leaves_per_unit; ++k) {
          const std::string name =
              rail ? "su" + std::to_string(u) + "-rail" + std::to_string(k) + "-leaf" : "leaf" + std::to_string(u);
          up_.push_back(link(name + "-up", leaf_Bps));
          down_.push_back(link(name + "-down", leaf_Bps));
        }
      }
    }
    return hosts;
  }

 private:
  int nic_index(int g) const {
    const int nic = (g / l_.gpus_per_node) * l_.nics + l_.nic_of_local[g % l_.gpus_per_node];
    return nic_redirect_.empty() ? nic : nic_redirect_[static_cast<std::size_t>(nic)];
  }

 public:
  // A failed NIC's traffic moves to the next working NIC of its node. False when none is left.
  bool fail_nic(int node, int k) {
    if (nic_redirect_.empty())
      for (int i = 0; i < static_cast<int>(nic_up_.size()); ++i) nic_redirect_.push_back(i);
    failed_.insert(node * l_.nics + k);
    for (int j = 0; j < l_.nics; ++j) {
      int to = -1;
      for (int step = 0; step < l_.nics && to < 0; ++step) {
        const int cand = node * l_.nics + (j + step) % l_.nics;
        if (!failed_.count(cand)) to = cand;
      }
      if (to < 0) return false;
      nic_redirect_[static_cast<std::size_t>(node * l_.nics + j)] = to;
    }
    return true;
  }
  int nics_per_node() const { return l_.nics; }

 private:

  // Appends the fabric links between two NICs (global indices); returns the switches crossed.
  int fabric(int a, int b, std::vector<StandardLinkImpl*>& links) const {
    const int node_a = a / l_.nics;
    const int node_b = b / l_.nics;
    if (l_.topology == FabricTopology::Dragonfly) {
      const int ra = node_a / l_.nodes_per_router;
      const int rb = node_b / l_.nodes_per_router;
      if (ra == rb) return 1;
      const int ga = ra / l_.routers_per_group;
      const int gb = rb / l_.routers_per_group;
      links.push_back(up_[ra]);
      if (ga != gb) links.push_back(global_[ga * l_.groups + gb]);
      links.push_back(down_[rb]);
      return ga == gb ? 2 : 4;
    }
    const int unit_a = node_a / l_.nodes_per_unit;
    const int unit_b = node_b / l_.nodes_per_unit;
    const bool rail = l_.topology == FabricTopology::RailOptimizedFatTree;
    const int leaf_a = unit_a * l_.leaves_per_unit + (rail ? a % l_.nics : 0);
    const int leaf_b = unit_b * l_.leaves_per_unit + (rail ? b % l_.nics : 0);
    if (leaf_a == leaf_b) return 1;
    links.push_back(up_[leaf_a]);
    links.push_back(down_[leaf_b]);
    const bool same_pod = l_.units_per_pod == 0 || unit_a / l_.units_per_pod == unit_b / l_.units_per_pod;
    return same_pod ? 3 : 5;
  }

  // SimGrid asks only for pairs of this zone's hosts (it holds no routers or child zones).
  void get_local_route(const NetPoint* src, const NetPoint* dst, Route* route, double* latency) override {
    const auto g = static_cast<int>(src->id());
    const auto h = static_cast<int>(dst->id());
    std::vector<StandardLinkImpl*>& links = route->link_list_;
    double lat = 0;
    if (g == h) {
      links.push_back(loopback_);
    } else if (g / l_.gpus_per_node == h / l_.gpus_per_node) {
      links.push_back(nv_up_[g]);
      links.push_back(nv_down_[h]);
      lat = l_.nvlink_latency_s;
    } else {
      const int a = nic_index(g);
      const int b = nic_index(h);
      links.push_back(nic_up_[a]);
      const int hops = fabric(a, b, links);
      links.push_back(nic_down_[b]);
      lat = l_.nic_latency_s + hops * l_.switch_latency_s;
    }
    if (latency != nullptr) *latency += lat;  // null when SimGrid only wants the links
  }

  Layout l_;
  StandardLinkImpl* loopback_ = nullptr;
  std::vector<StandardLinkImpl*> nv_up_, nv_down_;    // per GPU
  std::vector<StandardLinkImpl*> nic_up_, nic_down_;  // per node * nics + k
  std::vector<StandardLinkImpl*> up_, down_;          // per leaf or dragonfly router
  std::vector<StandardLinkImpl*> global_;             // dragonfly: per (group, group)
  std::vector<int> nic_redirect_;                     // what-if: NIC -> the NIC carrying its traffic
  std::set<int> failed_;
};

Layout make_layout(const ClusterSpec& c, int num_nodes) {
  Layout l;
  l.topology = c.fabric.topology;
  l.gpus_per_node = c.node.gpus_per_node;
  l.nics = c.node.nics_per_node;
  for (int i = 0; i < l.gpus_per_node; ++i) l.nic_of_local.push_back(l.nics > 0 ? i * l.nics / l.gpus_per_node : 0);
  l.nvlink_latency_s = c.node.nvlink_latency_us * kUs;
  l.nic_latency_s = c.node.nic_latency_us * kUs;
  l.switch_latency_s = c.fabric.switch_latency_us * kUs;

  // The fabric is sized by the whole cluster, even when fewer nodes are built.
  l.nodes_per_unit = c.fabric.nodes_per_leaf_group;
  l.leaves_per_unit = l.topology == FabricTopology::RailOptimizedFatTree ? std::max(1, l.nics) : 1;
  const int leaves = ceil_div(c.num_nodes, l.nodes_per_unit) * l.leaves_per_unit;
  if (leaves > c.fabric.spine_radix) l.units_per_pod = std::max(1, (c.fabric.spine_radix / 2) / l.leaves_per_unit);

  if (l.topology == FabricTopology::Dragonfly) {
    l.routers_per_group = c.fabric.dragonfly_routers_per_group;
    l.nodes_per_router = ceil_div(c.num_nodes, c.fabric.dragonfly_groups * l.routers_per_group);
    l.groups = ceil_div(num_nodes, l.nodes_per_router * l.routers_per_group);
  }
  return l;
}

// Network model: CM02 with no correction factors (latency and bandwidth factors 1, weight-S 0), no
// TCP window bound (TCP-gamma 0: the lmm solver reads a bound of 0 as none) and no cross-traffic
// (links are one direction each; RDMA acks are negligible), so one flow of B bytes takes exactly
// latency + B / bottleneck (SimGrid's default LV08 is 3% off). Set only where still at their
// defaults, so a caller's --cfg (calibration turning factors back on) wins. CM02 shares a saturated
// link in inverse proportion to each flow's route latency (its RTT-unfairness): flows of equal
// latency share equally, a 1.2 us and a 1.6 us flow get 57% and 43%.
void set_unless_configured(const char* name, const std::string& value) {
  if (simgrid::config::is_default(name)) s4u::Engine::set_config(std::string(name) + ":" + value);
}

}  // namespace

Platform::Platform(const ClusterSpec& cluster, int num_gpus, const std::vector<LinkChange>& changes)
    : cluster_(cluster), num_gpus_(num_gpus) {
  validate_cluster(cluster_);
  const Location where{cluster_.file};
  if (num_gpus < 1 || num_gpus > cluster_.num_gpus()) {
    throw Error(ErrorKind::Usage, where,
                "a platform of " + std::to_string(num_gpus) + " GPUs was asked of cluster " + cluster_.name +
                    ", which has " + std::to_string(cluster_.num_gpus()),
                "ask for 1.." + std::to_string(cluster_.num_gpus()) + " GPUs");
  }
  if (!s4u::Engine::has_instance() || s4u::Engine::get_instance()->get_netzone_root() != nullptr) {
    throw Error(ErrorKind::Usage, where, "the SimGrid engine must exist and hold no platform yet",
                "create simgrid::s4u::Engine first, then the Platform, then the actors; one per process");
  }
  set_unless_configured("network/model", "CM02");
  set_unless_configured("network/crosstraffic", "0");
  set_unless_configured("network/TCP-gamma", "0");

  num_nodes_ = ceil_div(num_gpus, cluster_.node.gpus_per_node);
  // The first zone becomes the engine's root and sets up its models; the engine owns and frees it.
  auto* zone = new FabricZone("cluster-" + cluster_.name, make_layout(cluster_, num_nodes_));
  hosts_ = zone->build(cluster_, num_nodes_);
  zone->get_iface()->seal();

  for (const LinkChange& c : changes) {
    const std::string hint =
        "links are named gpuG-nvlink, nodeN-nicK, suU-railK-leaf, leafU, routerR (each with -up and -down) and groupA-to-groupB";
    if (!(c.factor >= 0) || !std::isfinite(c.factor))
      throw Error(ErrorKind::Usage, where, "link " + c.link + ": the factor must be a finite number >= 0", hint);
    std::vector<s4u::Link*> links;
    for (const char* dir : {"", "-up", "-down"})
      if (s4u::Link* l = s4u::Link::by_name_or_null(c.link + dir)) links.push_back(l);
    if (links.empty())
      throw Error(ErrorKind::Usage, where, "no link " + c.link + " in the platform of " + std::to_string(num_gpus) + " GPUs of " + cluster_.name, hint);
    if (c.factor == 0) {
      std::smatch m;
      static const std::regex nic(R"(node(\d+)-nic(\d+))");
      if (!std::regex_match(c.link, m, nic))
        throw Error(ErrorKind::Usage, where, "only a NIC (nodeN-nicK) can fail, not " + c.link,
                    "its routes have no alternative in this model: degrade it with a factor in (0, 1) instead");
      if (!zone->fail_nic(std::stoi(m[1].str()), std::stoi(m[2].str())))
        throw Error(ErrorKind::Usage, where, "failing " + c.link + " leaves node " + m[1].str() + " without a working NIC");
      continue;
    }
    for (s4u::Link* l : links) l->set_bandwidth(l->get_bandwidth() * c.factor);
  }
}

simgrid::s4u::Host* Platform::gpu(int index) const {
  assert(index >= 0 && index < num_gpus_);
  return hosts_[static_cast<std::size_t>(index)];
}

int Platform::nic_of(int gpu) const {
  const NodeSpec& n = cluster_.node;
  return n.nics_per_node > 0 ? (gpu % n.gpus_per_node) * n.nics_per_node / n.gpus_per_node : 0;
}

Path Platform::path(int src, int dst) const {
  Path p;
  gpu(src)->route_to(gpu(dst), p.links, &p.latency_s);
  for (const s4u::Link* l : p.links) {
    if (p.bottleneck_bytes_per_s == 0 || l->get_bandwidth() < p.bottleneck_bytes_per_s)
      p.bottleneck_bytes_per_s = l->get_bandwidth();
  }
  return p;
}

}  // namespace px::sim
