// The collectives the engine uses, each with its expected result and bus-bandwidth factor
// (nccl-tests doc/PERFORMANCE.md: all-reduce 2(n-1)/n; all-gather, reduce-scatter, all-to-all
// (n-1)/n; broadcast and send/recv 1).
#include <cstdint>

#include "benchmarks/comm/collective.hpp"

namespace px::bench {
namespace {

std::size_t same(std::size_t count, int) { return count; }
std::size_t split(std::size_t count, int n) { return count / static_cast<std::size_t>(n); }
double ring2(int n) { return 2.0 * (n - 1) / n; }
double ring1(int n) { return static_cast<double>(n - 1) / n; }
double one(int) { return 1.0; }

float sum_over_members(int n, std::size_t i) {
  float s = 0;
  for (int r = 0; r < n; ++r) s += fill(r, i);
  return s;
}

const std::vector<Collective> kCollectives = {
    {"all_reduce", "sum", same, same, ring2, [](Communicator& c, CollectiveBuffers& b) { c.all_reduce(b.out); },
     [](const Communicator& c, std::size_t, std::span<const float> out) {
       std::size_t wrong = 0;
       for (std::size_t i = 0; i < out.size(); ++i) wrong += out[i] != sum_over_members(c.size(), i);
       return wrong;
     }},
    {"all_gather", "none", split, same, ring1, [](Communicator& c, CollectiveBuffers& b) { c.all_gather(b.in, b.out); },
     [](const Communicator&, std::size_t in_count, std::span<const float> out) {
       std::size_t wrong = 0;
       for (std::size_t i = 0; i < out.size(); ++i) wrong += out[i] != fill(static_cast<int>(i / in_count), i % in_count);
       return wrong;
     }},
    {"reduce_scatter", "sum", same, split, ring1, [](Communicator& c, CollectiveBuffers& b) { c.reduce_scatter(b.in, b.out); },
     [](const Communicator& c, std::size_t, std::span<const float> out) {
       std::size_t wrong = 0;
       const std::size_t base = static_cast<std::size_t>(c.rank()) * out.size();
       for (std::size_t i = 0; i < out.size(); ++i) wrong += out[i] != sum_over_members(c.size(), base + i);
       return wrong;
     }},
    {"all_to_all", "none", same, same, ring1, [](Communicator& c, CollectiveBuffers& b) { c.all_to_all(b.in, b.out); },
     [](const Communicator& c, std::size_t, std::span<const float> out) {
       std::size_t wrong = 0;
       const std::size_t block = out.size() / static_cast<std::size_t>(c.size());
       const std::size_t mine = static_cast<std::size_t>(c.rank()) * block;
       for (std::size_t i = 0; i < out.size(); ++i) wrong += out[i] != fill(static_cast<int>(i / block), mine + i % block);
       return wrong;
     }},
    {"broadcast", "none", same, same, one, [](Communicator& c, CollectiveBuffers& b) { c.broadcast(b.out, 0); },
     [](const Communicator&, std::size_t, std::span<const float> out) {
       std::size_t wrong = 0;
       for (std::size_t i = 0; i < out.size(); ++i) wrong += out[i] != fill(0, i);
       return wrong;
     }},
    // Every member sends to the next and receives from the previous (a ring of pairs, like sendrecv_perf).
    {"send_recv", "none", same, same, one,
     [](Communicator& c, CollectiveBuffers& b) { c.send_recv(b.in, (c.rank() + 1) % c.size(), b.out, (c.rank() + c.size() - 1) % c.size()); },
     [](const Communicator& c, std::size_t, std::span<const float> out) {
       std::size_t wrong = 0;
       const int from = (c.rank() + c.size() - 1) % c.size();
       for (std::size_t i = 0; i < out.size(); ++i) wrong += out[i] != fill(from, i);
       return wrong;
     }},
};

}  // namespace

const std::vector<Collective>& collectives() { return kCollectives; }

}  // namespace px::bench
