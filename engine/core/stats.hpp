// Summary statistics of measured samples, shared by the trainer, calibration, the CLI and the
// benchmarks.
#pragma once

#include <algorithm>
#include <vector>

namespace px {

// The middle sample (the mean of the two middle ones for an even count); 0 for none.
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

}  // namespace px
