// One collective as the comm benchmark sees it (nccl-tests' structure): how to fill its buffers,
// run it, check the result every member can predict, and turn its time into bus bandwidth.
#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "engine/comm/communicator.hpp"

namespace px::bench {

// What a collective runs on: host memory (MPI) or device memory (NCCL). The benchmark fills and
// checks host copies, so nothing here reads these spans.
struct CollectiveBuffers {
  std::span<float> in, out;
};

struct Collective {
  const char* name;        // nccl-tests' name: all_reduce, all_gather, ...
  const char* redop;       // "sum" or "none"
  // Elements per member's input for a message of `count` elements (nccl-tests' "count").
  std::size_t (*in_count)(std::size_t count, int n);
  std::size_t (*out_count)(std::size_t count, int n);
  double (*bus_factor)(int n);  // busBw = algBw * factor (nccl-tests doc/PERFORMANCE.md)
  void (*run)(Communicator& c, CollectiveBuffers& b);
  // Number of wrong output elements (`out` on the host), given every member filled its input of
  // in_count elements with fill(rank, i).
  std::size_t (*check)(const Communicator& c, std::size_t in_count, std::span<const float> out);
};

// The value member r puts at input index i: distinct, exact in fp32, and with sums that stay exact.
inline float fill(int r, std::size_t i) { return static_cast<float>((r + 1) * 8 + static_cast<int>(i % 61)); }

const std::vector<Collective>& collectives();

}  // namespace px::bench
