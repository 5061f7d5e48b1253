// The SimGrid platform against closed forms: one flow over NVLink or between nodes takes its
// latency plus bytes over the bottleneck, flows sharing an oversubscribed leaf uplink or a NIC slow
// down as max-min sharing says, routes follow rails, and 16,384 GPUs build in seconds.
//
// SimGrid allows one engine per process, so each simulation runs in a forked child (in_child) that
// sends its results back through a pipe as text; the parent checks them. This keeps the file one
// ordinary gtest program that any filter or ctest discovery can run.
#include <gtest/gtest.h>
#include <simgrid/s4u.hpp>
#include <sys/wait.h>
#include <unistd.h>
#include <xbt/config.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "engine/core/error.hpp"
#include "engine/spec/spec_yaml.hpp"
#include "simulator/platform.hpp"

namespace px::sim {
namespace {

namespace s4u = simgrid::s4u;

const SpecCatalog& catalog() {
  static const SpecCatalog c{PX_DATASETS_DIR};
  return c;
}

// Figures of datasets/clusters/h100-*.yaml, in SI units.
constexpr double kNvlinkBps = 450e9 * 0.824;  // 450 GB/s per GPU per direction at nvlink_efficiency
constexpr double kNicBps = 400e9 / 8;      // NDR 400 Gb/s
constexpr double kNvlinkLat = 1.0e-6;
constexpr double kNicLat = 1.0e-6;
constexpr double kSwitchLat = 0.2e-6;
constexpr double kBytes = 1e9;
constexpr double kSmall = 1e5;  // a message whose time is a third latency

// Runs `body` in a forked child and returns what it returned; a child that throws or dies fails
// the test with its message.
std::string in_child(const std::function<std::string()>& body) {
  int fds[2];
  if (pipe(fds) != 0) {
    ADD_FAILURE() << "pipe failed";
    return {};
  }
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    std::string out;
    int code = 0;
    try {
      out = body();
    } catch (const std::exception& e) {
      out = std::string("child threw: ") + e.what();
      code = 3;
    }
    std::size_t done = 0;
    while (done < out.size()) {
      const ssize_t n = write(fds[1], out.data() + done, out.size() - done);
      if (n <= 0) break;
      done += static_cast<std::size_t>(n);
    }
    close(fds[1]);
    _exit(code);  // no destructors: the engine dies with the process
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<std::size_t>(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child failed: " << out;
  return out;
}

std::vector<double> numbers(const std::string& text) {
  std::istringstream in(text);
  std::vector<double> v;
  for (double x; in >> x;) v.push_back(x);
  return v;
}

std::string join(const std::vector<double>& v) {
  std::ostringstream out;
  out.precision(17);
  for (double x : v) out << x << ' ';
  return out.str();
}

s4u::Engine& make_engine() {
  static int argc = 2;
  static char name[] = "platform_test";
  static char quiet[] = "--log=root.thres:warning";
  static char* argv[] = {name, quiet, nullptr};
  return *new s4u::Engine(&argc, argv);  // lives until the child exits
}

struct Flow {
  int src, dst;
  double bytes;
};

// One actor sends the flows one after the other: each is alone in the network. Returns durations.
std::vector<double> sequential(const Platform& p, const std::vector<Flow>& flows) {
  std::vector<double> took;
  s4u::Actor::create("driver", p.gpu(0), [&] {
    for (const Flow& f : flows) {
      const double t0 = s4u::Engine::get_clock();
      s4u::Comm::sendto(p.gpu(f.src), p.gpu(f.dst), static_cast<std::uint64_t>(f.bytes));
      took.push_back(s4u::Engine::get_clock() - t0);
    }
  });
  s4u::Engine::get_instance()->run();
  return took;
}

// The flows all start at time 0, one actor each. Returns their completion times.
std::vector<double> concurrent(const Platform& p, const std::vector<Flow>& flows) {
  std::vector<double> done(flows.size());
  for (std::size_t i = 0; i < flows.size(); ++i) {
    s4u::Actor::create("flow" + std::to_string(i), p.gpu(flows[i].src), [&, i] {
      s4u::Comm::sendto(p.gpu(flows[i].src), p.gpu(flows[i].dst), static_cast<std::uint64_t>(flows[i].bytes));
      done[i] = s4u::Engine::get_clock();
    });
  }
  s4u::Engine::get_instance()->run();
  return done;
}

std::string link_names(const Platform& p, int src, int dst) {
  std::string s;
  for (const s4u::Link* l : p.path(src, dst).links) s += (s.empty() ? "" : " ") + l->get_name();
  return s;
}

#define EXPECT_WITHIN_0_1_PERCENT(actual, expected) EXPECT_NEAR(actual, expected, 1e-3 * (expected))

TEST(Platform, IntraNodeFlowIsLatencyPlusBytesOverNvlink) {
  const std::vector<double> t = numbers(in_child([] {
    make_engine();
    const Platform p(catalog().cluster("h100-64"), 16);
    return join(sequential(p, {{0, 5, kBytes}, {3, 2, kSmall}, {8, 15, kBytes}}));
  }));
  ASSERT_EQ(t.size(), 3u);
  EXPECT_WITHIN_0_1_PERCENT(t[0], kNvlinkLat + kBytes / kNvlinkBps);  // 2.2232 ms
  EXPECT_WITHIN_0_1_PERCENT(t[1], kNvlinkLat + kSmall / kNvlinkBps);  // 1.222 us
  EXPECT_WITHIN_0_1_PERCENT(t[2], kNvlinkLat + kBytes / kNvlinkBps);
}

// h100-10240 (320 rail leaves > 64 spine ports: pods of 32 leaves = 4 scalable units under a core).
TEST(Platform, InterNodeFlowsAreNicBoundWithTheirHops) {
  const std::vector<double> t = numbers(in_child([] {
    make_engine();
    const Platform p(catalog().cluster("h100-10240"), 5 * 256);  // 5 scalable units of 32 nodes
    return join(sequential(p, {{0, 8, kBytes},       // node 1, rail 0: one leaf
                               {0, 8, kSmall},
                               {0, 11, kSmall},      // node 1, rail 3: leaf, spine, leaf
                               {0, 256, kSmall},     // unit 1, same pod: leaf, spine, leaf
                               {0, 1024, kSmall},    // unit 4, next pod: through the core
                               {1030, 7, kBytes}})); // back, rail 6 to rail 7
  }));
  ASSERT_EQ(t.size(), 6u);
  const double one = kNicLat + kSwitchLat, three = kNicLat + 3 * kSwitchLat, five = kNicLat + 5 * kSwitchLat;
  EXPECT_WITHIN_0_1_PERCENT(t[0], one + kBytes / kNicBps);  // 20.0012 ms
  EXPECT_WITHIN_0_1_PERCENT(t[1], one + kSmall / kNicBps);  // 3.2 us
  EXPECT_WITHIN_0_1_PERCENT(t[2], three + kSmall / kNicBps);
  EXPECT_WITHIN_0_1_PERCENT(t[3], three + kSmall / kNicBps);
  EXPECT_WITHIN_0_1_PERCENT(t[4], five + kSmall / kNicBps);
  EXPECT_WITHIN_0_1_PERCENT(t[5], five + kBytes / kNicBps);
}

TEST(Platform, RoutesFollowRails) {
  const std::string out = in_child([] {
    make_engine();
    const Platform p(catalog().cluster("h100-10240"), 512);
    const Path far = p.path(0, 256 + 8 + 2);
    return link_names(p, 0, 1) + "\n" + link_names(p, 2, 10) + "\n" + link_names(p, 0, 11) + "\n" +
           link_names(p, 5, 256 + 5) + "\n" + join({far.latency_s, far.bottleneck_bytes_per_s});
  });
  std::istringstream in(out);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "gpu0-nvlink-up gpu1-nvlink-down");
  std::getline(in, line);
  EXPECT_EQ(line, "node0-nic2-up node1-nic2-down");
  std::getline(in, line);
  EXPECT_EQ(line, "node0-nic0-up su0-rail0-leaf-up su0-rail3-leaf-down node1-nic3-down");
  std::getline(in, line);
  EXPECT_EQ(line, "node0-nic5-up su0-rail5-leaf-up su1-rail5-leaf-down node32-nic5-down");
  std::getline(in, line);
  const std::vector<double> far = numbers(line);
  ASSERT_EQ(far.size(), 2u);
  EXPECT_DOUBLE_EQ(far[0], kNicLat + 3 * kSwitchLat);
  EXPECT_DOUBLE_EQ(far[1], kNicBps);
}

// Two scalable units of 2 nodes each at oversubscription 2: a rail leaf's uplink carries
// 2 * 400 / 2 = 400 Gb/s, one NIC's worth. Two rail-0 flows, node 0 -> node 2 and node 1 -> node 3,
// share unit 0's rail-0 uplink (and unit 1's rail-0 downlink): 25 GB/s each, so each takes
// 1.6 us + 1 GB / 25 GB/s = 40.0016 ms, twice the 20.0016 ms of one flow alone. On different
// rails, or at oversubscription 1 (an 800 Gb/s uplink), they do not slow each other.
ClusterSpec two_small_units(double oversubscription) {
  ClusterSpec c = catalog().cluster("h100-64");
  c.num_nodes = 4;
  c.fabric.nodes_per_leaf_group = 2;
  c.fabric.oversubscription = oversubscription;
  return c;
}

std::vector<double> two_flows(double oversubscription, int rail_a, int rail_b) {
  return numbers(in_child([=] {
    make_engine();
    const Platform p(two_small_units(oversubscription), 32);
    return join(concurrent(p, {{0 + rail_a, 16 + rail_a, kBytes}, {8 + rail_b, 24 + rail_b, kBytes}}));
  }));
}

TEST(Platform, FlowsSharingAnOversubscribedLeafUplinkSlowDown) {
  const double lat = kNicLat + 3 * kSwitchLat;
  const double alone = lat + kBytes / kNicBps;
  const double shared = lat + kBytes / (kNicBps / 2);

  const std::vector<double> same_rail = two_flows(2.0, 0, 0);
  ASSERT_EQ(same_rail.size(), 2u);
  EXPECT_WITHIN_0_1_PERCENT(same_rail[0], shared);
  EXPECT_WITHIN_0_1_PERCENT(same_rail[1], shared);

  const std::vector<double> two_rails = two_flows(2.0, 0, 1);
  ASSERT_EQ(two_rails.size(), 2u);
  EXPECT_WITHIN_0_1_PERCENT(two_rails[0], alone);
  EXPECT_WITHIN_0_1_PERCENT(two_rails[1], alone);

  const std::vector<double> full_bisection = two_flows(1.0, 0, 0);
  ASSERT_EQ(full_bisection.size(), 2u);
  EXPECT_WITHIN_0_1_PERCENT(full_bisection[0], alone);
  EXPECT_WITHIN_0_1_PERCENT(full_bisection[1], alone);
}

// 8 GPUs on 4 NICs: GPUs 4 and 5 both use NIC 2, so their flows to the next node share it.
TEST(Platform, GpusShareNicsEvenly) {
  const std::vector<double> t = numbers(in_child([] {
    make_engine();
    ClusterSpec c = catalog().cluster("h100-64");
    c.node.nics_per_node = 4;
    const Platform p(c, 16);
    if (p.nic_of(5) != 2 || p.nic_of(4) != 2 || p.nic_of(3) != 1) return std::string("bad nic_of");
    return join(concurrent(p, {{4, 12, kBytes}, {5, 13, kBytes}, {0, 8, kBytes}}));
  }));
  ASSERT_EQ(t.size(), 3u);
  const double lat = kNicLat + kSwitchLat;
  EXPECT_WITHIN_0_1_PERCENT(t[0], lat + kBytes / (kNicBps / 2));
  EXPECT_WITHIN_0_1_PERCENT(t[1], lat + kBytes / (kNicBps / 2));
  EXPECT_WITHIN_0_1_PERCENT(t[2], lat + kBytes / kNicBps);
}

TEST(Platform, NetworkModelIsCm02WithoutFactors) {
  const std::string out = in_child([] {
    make_engine();
    const Platform p(catalog().cluster("h100-8"), 8);
    namespace cfg = simgrid::config;
    return cfg::get_value<std::string>("network/model") + " " +
           join({cfg::get_value<double>("network/latency-factor"), cfg::get_value<double>("network/bandwidth-factor"),
                 cfg::get_value<double>("network/weight-S"), cfg::get_value<double>("network/TCP-gamma"),
                 cfg::get_value<bool>("network/crosstraffic") ? 1.0 : 0.0});
  });
  std::istringstream in(out);
  std::string model;
  in >> model;
  EXPECT_EQ(model, "CM02");
  std::vector<double> v;
  for (double x; in >> x;) v.push_back(x);
  EXPECT_EQ(v, (std::vector<double>{1, 1, 0, 0, 0}));  // factors 1, weight-S 0, no window, no crosstraffic
}

TEST(Platform, PlainFatTreePutsANodesNicsOnOneLeaf) {
  const std::string out = in_child([] {
    make_engine();
    ClusterSpec c = two_small_units(1.0);
    c.fabric.topology = FabricTopology::FatTree;
    const Platform p(c, 32);
    return link_names(p, 0, 11) + "\n" + link_names(p, 0, 19) + "\n" + join(sequential(p, {{0, 19, kBytes}}));
  });
  std::istringstream in(out);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "node0-nic0-up node1-nic3-down");
  std::getline(in, line);
  EXPECT_EQ(line, "node0-nic0-up leaf0-up leaf1-down node2-nic3-down");
  std::getline(in, line);
  const std::vector<double> t = numbers(line);
  ASSERT_EQ(t.size(), 1u);
  EXPECT_WITHIN_0_1_PERCENT(t[0], kNicLat + 3 * kSwitchLat + kBytes / kNicBps);
}

// datasets/fixtures/good/cluster_inline_gpu.yaml: 64 nodes of 4 GPUs and 4 NICs of 200 Gb/s,
// 8 groups of 4 routers (2 nodes each), switch 0.3 us, NIC latency 0.
TEST(Platform, DragonflyCrossesItsGlobalLink) {
  const std::string out = in_child([] {
    make_engine();
    const ClusterSpec c = load_cluster_file(std::string(PX_DATASETS_DIR) + "/fixtures/good/cluster_inline_gpu.yaml");
    const Platform p(c, c.num_gpus());
    return link_names(p, 0, 4) + "\n" + link_names(p, 0, 8) + "\n" + link_names(p, 1, 8 * 4 + 2) + "\n" +
           join(sequential(p, {{1, 8 * 4 + 2, kBytes}}));
  });
  std::istringstream in(out);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "node0-nic0-up node1-nic0-down");
  std::getline(in, line);
  EXPECT_EQ(line, "node0-nic0-up router0-up router1-down node2-nic0-down");
  std::getline(in, line);
  EXPECT_EQ(line, "node0-nic1-up router0-up group0-to-group1 router4-down node8-nic2-down");
  std::getline(in, line);
  const std::vector<double> t = numbers(line);
  ASSERT_EQ(t.size(), 1u);
  EXPECT_WITHIN_0_1_PERCENT(t[0], 4 * 0.3e-6 + kBytes / 25e9);  // NIC-bound: global link is 57 GB/s
}

TEST(Platform, BuildsWholeNodesInRankOrder) {
  const std::string out = in_child([] {
    s4u::Engine& e = make_engine();
    const Platform p(catalog().cluster("h100-64"), 12);
    return join({static_cast<double>(p.num_gpus()), static_cast<double>(p.num_nodes()),
                 static_cast<double>(e.get_host_count()), static_cast<double>(p.node_of(11)),
                 static_cast<double>(p.nic_of(11))}) +
           p.gpu(11)->get_name();
  });
  EXPECT_EQ(out, "12 2 16 1 3 gpu11");
}

TEST(Platform, RejectsBadSizesAndAMissingEngine) {
  const ClusterSpec c = catalog().cluster("h100-64");
  for (int n : {0, 65}) {
    try {
      const Platform p(c, n);
      ADD_FAILURE() << "no error for " << n << " GPUs";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Usage);
    }
  }
  try {
    const Platform p(c, 8);  // this (parent) process never creates an engine
    ADD_FAILURE() << "no error without an engine";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Usage);
  }
}

long rss_kib() {
  std::ifstream in("/proc/self/status");
  for (std::string key; in >> key;) {
    if (key == "VmRSS:") {
      long kib = 0;
      in >> kib;
      return kib;
    }
  }
  return 0;
}

// h100-10240 scaled to 2,048 nodes: 16,384 GPUs in 64 scalable units. The build must take seconds
// and a few hundred MiB at most (no route tables), and a flow across it still has its closed form.
TEST(Platform, Builds16384GpusInSeconds) {
  const std::vector<double> v = numbers(in_child([] {
    ClusterSpec c = catalog().cluster("h100-10240");
    c.num_nodes = 2048;
    const long rss0 = rss_kib();
    const auto t0 = std::chrono::steady_clock::now();
    make_engine();
    const Platform p(c, c.num_gpus());
    const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const long rss1 = rss_kib();
    const std::vector<double> t = sequential(p, {{0, 16383, kBytes}});
    return join({build_s, static_cast<double>(rss1 - rss0) / 1024, t.at(0)});
  }));
  ASSERT_EQ(v.size(), 3u);
  std::printf("16,384 GPUs: platform built in %.2f s, +%.0f MiB resident\n", v[0], v[1]);
  RecordProperty("build_seconds", std::to_string(v[0]));
  RecordProperty("build_rss_mib", std::to_string(v[1]));
  EXPECT_LT(v[0], 8.0);
  EXPECT_LT(v[1], 1024.0);
  EXPECT_WITHIN_0_1_PERCENT(v[2], kNicLat + 5 * kSwitchLat + kBytes / kNicBps);  // rail 7, two pods apart
}

}  // namespace
}  // namespace px::sim
