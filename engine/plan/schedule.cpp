// Pipeline schedules after Megatron-LM (GPipe, 1F1B, interleaved 1F1B: Narayanan et al. 2021) and
// the ZB-H1 zero-bubble schedule (Qi et al. 2023), derived by list scheduling with unit pass times.
#include "engine/plan/schedule.hpp"

#include <algorithm>
#include <cassert>
#include <map>

namespace px {
namespace {

std::vector<PipelinePass> gpipe(int m) {
  std::vector<PipelinePass> out;
  for (int j = 0; j < m; ++j) out.push_back({PassKind::F, j, 0});
  for (int j = 0; j < m; ++j) out.push_back({PassKind::B, j, 0});
  return out;
}

std::vector<PipelinePass> one_f_one_b(int stage, int p, int m) {
  const int warmup = std::min(p - stage - 1, m);
  std::vector<PipelinePass> out;
  int f = 0, b = 0;
  for (; f < warmup; ++f) out.push_back({PassKind::F, f, 0});
  while (f < m) {
    out.push_back({PassKind::F, f++, 0});
    out.push_back({PassKind::B, b++, 0});
  }
  while (b < m) out.push_back({PassKind::B, b++, 0});
  return out;
}

// Megatron's interleaved schedule: virtual step k of the forward order runs chunk (k / p) % v of
// micro-batch (k / (p v)) p + k % p; backwards visit chunks in reverse. Requires m % p == 0.
std::vector<PipelinePass> interleaved(int stage, int p, int m, int v) {
  assert(m % p == 0);
  const int total = m * v;
  auto fwd = [&](int k) {
    return PipelinePass{PassKind::F, (k / (p * v)) * p + k % p, (k / p) % v};
  };
  auto bwd = [&](int k) {
    return PipelinePass{PassKind::B, (k / (p * v)) * p + k % p, v - 1 - (k / p) % v};
  };
  const int warmup = std::min((p - stage - 1) * 2 + (v - 1) * p, total);
  std::vector<PipelinePass> out;
  int f = 0, b = 0;
  for (; f < warmup; ++f) out.push_back(fwd(f));
  while (f < total) {
    out.push_back(fwd(f++));
    out.push_back(bwd(b++));
  }
  while (b < total) out.push_back(bwd(b++));
  return out;
}

// ZB-H1: every stage keeps at most p - stage micro-batches between F and B, like 1F1B, and fills
// the bubbles 1F1B leaves with deferred W passes. List scheduling over all stages with unit pass
// times gives each stage's order; priorities B > F > W, as in the zero-bubble heuristic.
std::vector<PipelinePass> zero_bubble(int stage, int p, int m) {
  std::vector<std::vector<PipelinePass>> order(static_cast<std::size_t>(p));
  std::vector<std::vector<int>> f_done(p, std::vector<int>(m, -1)), b_done(p, std::vector<int>(m, -1));
  std::vector<int> nf(p, 0), nb(p, 0), nw(p, 0);
  int remaining = 3 * m * p;
  for (int t = 0; remaining > 0; ++t) {
    assert(t < 10 * 3 * m * p && "zero-bubble list scheduling did not converge");
    for (int s = 0; s < p; ++s) {
      const auto us = static_cast<std::size_t>(s);
      const int jb = nb[us], jf = nf[us];
      const bool can_b = jb < m && jb < jf &&
                         (s == p - 1 ? f_done[us][jb] < t : (b_done[us + 1][jb] >= 0 && b_done[us + 1][jb] < t));
      const bool can_f = jf < m && jf - jb < p - s && (s == 0 || (f_done[us - 1][jf] >= 0 && f_done[us - 1][jf] < t));
      const bool can_w = nw[us] < nb[us];
      if (can_b) {
        order[us].push_back({PassKind::B, jb, 0});
        b_done[us][jb] = t;
        ++nb[us];
      } else if (can_f) {
        order[us].push_back({PassKind::F, jf, 0});
        f_done[us][jf] = t;
        ++nf[us];
      } else if (can_w) {
        order[us].push_back({PassKind::W, nw[us]++, 0});
      } else {
        continue;
      }
      --remaining;
    }
  }
  return order[static_cast<std::size_t>(stage)];
}

}  // namespace

std::vector<PipelinePass> pipeline_schedule(PipelineSchedule schedule, int stage, int p, int m, int v) {
  assert(stage >= 0 && stage < p && m >= 1 && v >= 1);
  switch (schedule) {
    case PipelineSchedule::GPipe: return gpipe(m);
    case PipelineSchedule::OneFOneB: return one_f_one_b(stage, p, m);
    case PipelineSchedule::Interleaved1F1B: return interleaved(stage, p, m, v);
    case PipelineSchedule::ZeroBubble: return zero_bubble(stage, p, m);
  }
  return {};
}

int max_in_flight(const std::vector<PipelinePass>& passes) {
  int live = 0, peak = 0;
  for (const auto& x : passes) {
    if (x.kind == PassKind::F) peak = std::max(peak, ++live);
    if (x.kind == PassKind::B) --live;
  }
  return peak;
}

}  // namespace px
