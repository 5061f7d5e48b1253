// Building, storing and looking up calibration profiles.
#include "simulator/calibration.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fmt/format.h>
#include <fstream>

#include "engine/core/error.hpp"
#include "engine/core/stats.hpp"
#include "engine/plan/plan_summary.hpp"

namespace px::sim {
namespace {

double mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return sum / static_cast<double>(v.size());
}

}  // namespace

OpContext op_context(const CompiledPlan& plan, int rank) { return {plan.topology.coord(rank).cp, plan.plan.cp()}; }

namespace {
// A context-parallel attention ring step's key block against its queries: "/past", "/diagonal" or
// "/future"; "" for any other op.
const char* ring_place(const Op& op, OpContext where) {
  if (op.kind != OpKind::AttentionCore || where.cp <= 1) return "";
  const int keys = ((where.cp_index - op.step) % where.cp + where.cp) % where.cp;  // whose block this step sees
  return keys == where.cp_index ? "/diagonal" : keys < where.cp_index ? "/past" : "/future";
}
}  // namespace

std::string op_signature(const Op& op, OpContext where) {
  // The FLOPs too: an attention's forward and backward share shapes and bytes, not work.
  std::string s = fmt::format("{}/{}/{}x{}x{}x{}/{}/r{}w{}/f{:.0f}", to_string(op.kind), static_cast<int>(op.variant), op.m, op.n,
                              op.k, op.batch, to_string(op.dtype), op.bytes_read, op.bytes_written, op.flops + op.vector_flops);
  if (is_comm(op.kind)) s += fmt::format("/c{}", op.comm_bytes);
  return s + ring_place(op, where);
}

std::string op_family(const Op& op, OpContext where) {
  // A forward kernel and its backward share kind and variant but not their code.
  const char* direction = op.phase == Phase::Forward || op.phase == Phase::Recompute ? "forward"
                          : op.phase == Phase::Optimizer                            ? "optimizer"
                                                                                    : "backward";
  return fmt::format("{}/{}/{}/{}{}", to_string(op.kind), static_cast<int>(op.variant), to_string(op.dtype), direction,
                     ring_place(op, where));
}

namespace {
// What an op interpolated from a family measured at one size only, or at two (which cannot test
// each other), is taken to be off by: a wide band, stated rather than measured.
constexpr double kOneSizeResidual = 0.5;
}  // namespace

double op_work(const Op& op) {
  if ((op.kind == OpKind::Gemm || op.kind == OpKind::AttentionCore) && op.flops > 0) return op.flops;
  const double bytes = static_cast<double>(op.bytes_read + op.bytes_written);
  return bytes > 0 ? bytes : op.vector_flops;
}

void CalibrationProfile::add(const std::string& signature, double seconds) {
  samples_[signature].push_back(seconds);
  dirty_ = true;
}

namespace {

// Reads one engine trace of `plan` and returns it with its rank, or throws naming the file.
std::pair<int, nlohmann::json> read_trace(const CompiledPlan& plan, const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw Error(ErrorKind::Io, {file.string()}, "cannot read the trace", "pass the trace_rank*.json files a run wrote");
  nlohmann::json trace = nlohmann::json::parse(in, nullptr, false);
  if (trace.is_discarded() || !trace.contains("traceEvents") || !trace.contains("distributedInfo"))
    throw Error(ErrorKind::Parse, {file.string()}, "not a Chrome trace of a Parallax run", "pass the trace_rank*.json files a run wrote");
  const int rank = trace["distributedInfo"].value("rank", -1);
  if (rank < 0 || rank >= plan.topology.world_size() || trace["distributedInfo"].value("world_size", 0) != plan.topology.world_size())
    throw Error(ErrorKind::Spec, {file.string()}, fmt::format("the trace is of rank {} of another plan", rank),
                "pass the plan flags the run was trained with");
  return {rank, std::move(trace)};
}

// The host's gaps between back-to-back compute ops ((start, end) spans, µs), in seconds: its
// dispatch cost, as a kernel launch is a GPU's.
void add_gaps(std::vector<std::pair<double, double>> spans, std::vector<double>& gaps) {
  std::sort(spans.begin(), spans.end());
  for (std::size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first >= spans[i - 1].second) gaps.push_back(1e-6 * (spans[i].first - spans[i - 1].second));
}

// A trace of one rank run alone (parallax train --emulate-rank): compute times real, comm ops
// stand-ins whose times are local copies, and its iteration span not the plan's iteration.
bool is_emulated(const nlohmann::json& trace) { return trace.contains("parallax") && trace["parallax"].contains("emulated_rank"); }

// The op an event times, or null for events that time no op; throws when the op is not the plan's.
const Op* op_of_event(const Program& prog, const nlohmann::json& e, const std::filesystem::path& file, std::size_t& id) {
  if (e.value("ph", "") != "X" || !e.contains("args") || !e["args"].contains("op id")) return nullptr;
  id = e["args"]["op id"].get<std::size_t>();
  if (id >= prog.ops.size() || e["args"].value("kind", "") != to_string(prog.ops[id].kind))
    throw Error(ErrorKind::Spec, {file.string()}, fmt::format("op {} of the trace is not op {} of this plan", id, id),
                "pass the plan flags the run was trained with");
  return &prog.ops[id];
}

}  // namespace

std::vector<RecordedIteration> recorded_iterations(const CompiledPlan& plan, const std::vector<std::filesystem::path>& traces) {
  const std::size_t world = static_cast<std::size_t>(plan.topology.world_size());
  std::map<int, RecordedIteration> its;
  std::vector<std::string> file_of(world);
  std::vector<double> gaps;
  // Which op of which rank each iteration has timed (a trace cut short leaves some out).
  std::map<int, std::vector<std::vector<char>>> seen;
  auto iteration = [&](int it) -> RecordedIteration& {
    RecordedIteration& r = its[it];
    if (r.op_seconds.empty()) {
      r.iteration = it;
      r.op_seconds.resize(world);
      r.host_seconds.resize(world);
      seen[it].resize(world);
      for (std::size_t k = 0; k < world; ++k) {
        const std::size_t n = plan.program_of(static_cast<int>(k)).ops.size();
        r.op_seconds[k].assign(n, 0.0);
        r.host_seconds[k].assign(n, 0.0);
        seen[it][k].assign(n, 0);
      }
    }
    return r;
  };
  for (const auto& file : traces) {
    const auto [rank, trace] = read_trace(plan, file);
    if (is_emulated(trace))
      throw Error(ErrorKind::Usage, {file.string()},
                  fmt::format("the trace is of rank {} emulated alone (its comm ops were stand-ins): a verbatim replay needs a real run of every rank", rank),
                  "calibrate a profile from emulated traces (parallax calibrate) and simulate with --profile");
    const Program& prog = plan.program_of(rank);
    const std::size_t k = static_cast<std::size_t>(rank);
    file_of[k] = file.string();
    std::map<int, std::vector<std::pair<double, double>>> compute;  // per iteration, (start, end) µs
    for (const auto& e : trace["traceEvents"]) {
      if (!e.contains("args") || !e["args"].contains("iteration")) continue;
      const int it = e["args"]["iteration"].get<int>();
      if (e.value("ph", "") == "X" && e.value("cat", "") == "user_annotation") {
        double& span = iteration(it).measured_s;
        span = std::max(span, 1e-6 * e["dur"].get<double>());
        continue;
      }
      std::size_t id = 0;
      const Op* op = op_of_event(prog, e, file, id);
      if (!op) continue;
      RecordedIteration& r = iteration(it);
      seen[it][k][id] = 1;
      if (is_comm(op->kind)) {
        r.host_seconds[k][id] = 1e-6 * e["args"].value("host us", 0.0);
        continue;
      }
      r.op_seconds[k][id] = 1e-6 * e["dur"].get<double>();
      if (op->stream == Stream::Compute) compute[it].emplace_back(e["ts"].get<double>(), e["ts"].get<double>() + e["dur"].get<double>());
    }
    for (auto& [it, c] : compute) add_gaps(std::move(c), gaps);
  }
  for (std::size_t k = 0; k < world; ++k)
    if (file_of[k].empty())
      throw Error(ErrorKind::Usage, {}, fmt::format("no trace of rank {}: a verbatim replay needs every rank's trace", k),
                  "pass all the trace_rank*.json files of the run");
  const double gap = median(gaps);
  std::vector<RecordedIteration> out;
  for (auto& [it, r] : its) {
    for (std::size_t k = 0; k < world; ++k) {
      const Program& prog = plan.program_of(static_cast<int>(k));
      for (std::size_t i = 0; i < prog.ops.size(); ++i) {
        if (!seen[it][k][i])
          throw Error(ErrorKind::Spec, {file_of[k]},
                      fmt::format("op {} ({}) of rank {} is not in its trace of iteration {}", i, prog.name_of(prog.ops[i]), k, it),
                      "trace whole iterations (--trace-iterations)");
        if (!is_comm(prog.ops[i].kind)) r.op_seconds[k][i] += gap;
      }
    }
    out.push_back(std::move(r));
  }
  return out;
}

void CalibrationProfile::add_traces(const CompiledPlan& plan, const std::vector<std::filesystem::path>& traces) {
  traced_plan_ = plan_to_json(plan.plan);
  for (const auto& file : traces) {
    const auto [rank, trace] = read_trace(plan, file);
    const Program& prog = plan.program_of(rank);
    const bool emulated = is_emulated(trace);  // compute ops count; its iteration span does not
    std::vector<std::pair<double, double>> compute;  // (start, end) of compute-stream ops, µs
    for (const auto& e : trace["traceEvents"]) {
      if (e.value("ph", "") == "X" && e.value("cat", "") == "user_annotation" && e.contains("args") && e["args"].contains("iteration")) {
        if (emulated) continue;
        double& span = step_span_[e["args"]["iteration"].get<int>()];
        span = std::max(span, 1e-6 * e["dur"].get<double>());
        continue;
      }
      std::size_t id = 0;
      const Op* found = op_of_event(prog, e, file, id);
      if (!found) continue;
      const Op& op = *found;
      if (is_comm(op.kind)) {  // simulated as flows; only the host's own share of it is measured here
        if (!emulated && e["args"].contains("host us")) add(host_signature(op), 1e-6 * e["args"]["host us"].get<double>());
        continue;
      }
      const std::string sig = op_signature(op, op_context(plan, rank));
      add(sig, e["dur"].get<double>() * 1e-6);
      if (!emulated) {
        auto& [seconds, count] = by_rank_[rank][sig];
        seconds += e["dur"].get<double>() * 1e-6;
        ++count;
      }
      sized_[sig] = {op_family(op, op_context(plan, rank)), op_work(op)};
      if (op.stream == Stream::Compute) compute.emplace_back(e["ts"].get<double>(), e["ts"].get<double>() + e["dur"].get<double>());
    }
    add_gaps(std::move(compute), gaps_);
  }
}

namespace {
const char* bench_name(OpKind kind) {
  switch (kind) {
    case OpKind::AllReduce: return "all_reduce";
    case OpKind::AllGather: return "all_gather";
    case OpKind::ReduceScatter: return "reduce_scatter";
    case OpKind::AllToAll: return "all_to_all";
    case OpKind::Send:
    case OpKind::Recv:
    case OpKind::RingExchange: return "send_recv";
    default: return "";
  }
}
}  // namespace

void CalibrationProfile::add_comm_bench(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw Error(ErrorKind::Io, {file.string()}, "cannot read the comm benchmark output", "write it with comm_bench --json FILE");
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.contains("rows") || !j["rows"].is_array())
    throw Error(ErrorKind::Parse, {file.string()}, "not comm_bench --json output", "write it with comm_bench --json FILE");
  for (const auto& row : j["rows"]) {
    if (!row.contains("collective") || !row.contains("ranks") || !row.contains("size_bytes") || !row.contains("time_us"))
      throw Error(ErrorKind::Spec, {file.string()}, "a row lacks collective, ranks, size_bytes or time_us", "regenerate it with comm_bench");
    const std::string name = row["collective"].get<std::string>();
    const int ranks = row["ranks"].get<int>();
    const double bytes = row["size_bytes"].get<double>();
    // The median iteration where the benchmark reports it: robust to a descheduled iteration.
    const double seconds = 1e-6 * row.value("median_us", row["time_us"].get<double>());
    auto& points = collectives_[name][ranks];
    int& pooled = comm_samples_[{name, ranks, bytes}];
    const auto at = std::find_if(points.begin(), points.end(), [&](const auto& p) { return p.first == bytes; });
    if (at == points.end()) {
      points.emplace_back(bytes, seconds);
      std::sort(points.begin(), points.end());
    } else {
      pooled = std::max(pooled, 1);  // a point loaded with a saved profile counts once
      at->second += (seconds - at->second) / (pooled + 1);  // running mean over the files
    }
    ++pooled;
  }
}

std::optional<double> CalibrationProfile::collective_seconds(OpKind kind, int ranks, double bytes) const {
  const auto c = collectives_.find(bench_name(kind));
  if (c == collectives_.end()) return std::nullopt;
  // A message is between two ranks, whatever the group's size.
  const auto g = c->second.find(c->first == "send_recv" ? 2 : ranks);
  if (g == c->second.end() || g->second.empty()) return std::nullopt;
  const auto& p = g->second;
  if (bytes <= p.front().first) return p.front().second;
  for (std::size_t i = 1; i < p.size(); ++i)
    if (bytes <= p[i].first) {
      const double f = (bytes - p[i - 1].first) / (p[i].first - p[i - 1].first);
      return p[i - 1].second + f * (p[i].second - p[i - 1].second);
    }
  if (p.size() < 2) return p.back().second;
  const auto& [b0, t0] = p[p.size() - 2];
  const auto& [b1, t1] = p.back();
  return t1 + (bytes - b1) * std::max(0.0, (t1 - t0) / (b1 - b0));
}

std::map<int, double> CalibrationProfile::rank_speeds() const {
  if (rank_speeds_) return *rank_speeds_;
  finalize();
  std::map<int, double> out;
  if (by_rank_.size() < 2) return out;
  for (const auto& [rank, sigs] : by_rank_) {
    double measured = 0, expected = 0;
    for (const auto& [sig, sum] : sigs) {
      measured += sum.first;
      expected += static_cast<double>(sum.second) * fitted_.at(sig).seconds;
    }
    if (expected > 0) out[rank] = measured / expected;
  }
  return out;
}

double CalibrationProfile::measured_iteration_s() const {
  if (iteration_) return *iteration_;
  std::vector<double> v;
  for (const auto& [it, span] : step_span_) v.push_back(span);
  return v.empty() ? 0.0 : mean(v);
}

double CalibrationProfile::dispatch_gap_s() const {
  if (gap_) return *gap_;
  return median(gaps_);
}

void CalibrationProfile::finalize() const {
  if (!dirty_) return;
  fitted_.clear();
  for (const auto& [sig, v] : samples_) {
    // Means, not medians: the ops of a signature differ by where they run (a cold cache after a
    // long op, a tensor's first touch), and only means add up, so a replay of the traced plan
    // costs each signature's ops what they took together.
    const double m = mean(v);
    std::vector<double> dev;
    for (double x : v) dev.push_back(std::abs(x - m));
    fitted_[sig] = {m, m > 0 ? mean(dev) / m : 0.0, static_cast<std::int64_t>(v.size())};
  }
  fit_families();
  dirty_ = false;
}

void CalibrationProfile::fit_families() const {
  families_.clear();
  for (const auto& [sig, c] : fitted_) {
    const auto z = sized_.find(sig);
    if (z == sized_.end() || !(z->second.work > 0)) continue;
    families_[z->second.family].points.push_back({z->second.work, c.seconds, c.spread});
  }
  for (auto& [name, f] : families_) {
    auto& p = f.points;
    std::sort(p.begin(), p.end(), [](const Point& a, const Point& b) { return a.work < b.work; });
    // Signatures of one size (an op that differs in bytes but not FLOPs) become their mean.
    std::vector<Point> merged;
    for (std::size_t i = 0; i < p.size();) {
      std::size_t j = i;
      Point sum{p[i].work, 0, 0};
      for (; j < p.size() && p[j].work == p[i].work; ++j) {
        sum.seconds += p[j].seconds;
        sum.spread += p[j].spread;
      }
      sum.seconds /= static_cast<double>(j - i);
      sum.spread /= static_cast<double>(j - i);
      merged.push_back(sum);
      i = j;
    }
    p = std::move(merged);
    if (p.size() < 2) continue;
    double sw = 0, st = 0, sww = 0, swt = 0;
    const double n = static_cast<double>(p.size());
    for (const Point& q : p) {
      sw += q.work;
      st += q.seconds;
      sww += q.work * q.work;
      swt += q.work * q.seconds;
    }
    const double var = sww - sw * sw / n;
    f.rate = var > 0 ? (swt - sw * st / n) / var : 0;
    f.overhead = std::max(0.0, (st - f.rate * sw) / n);
    if (!(f.rate > 0)) f.rate = 0;  // no trend: extrapolation scales the nearest point instead
    double err = 0;
    int count = 0;
    for (const Point& q : p) {
      if (p.size() < 3 || q.seconds <= 0) continue;
      err += std::abs(interpolate(f, q.work, &q) - q.seconds) / q.seconds;
      ++count;
    }
    f.residual = count > 0 ? err / count : kOneSizeResidual;  // two points cannot test themselves
  }
  // A family measured at one size keeps its measured time there and scales the rest of it with
  // its work: the rest is what remains after the fixed per-kernel cost the other families show
  // (their median overhead), which does not grow with size.
  std::vector<double> overheads;
  for (const auto& [name, f] : families_)
    if (f.points.size() >= 2 && f.rate > 0) overheads.push_back(f.overhead);
  const double overhead = median(overheads);
  for (auto& [name, f] : families_) {
    if (f.points.size() != 1) continue;
    const Point& q = f.points.front();
    f.overhead = std::min(overhead, q.seconds);
    f.rate = (q.seconds - f.overhead) / q.work;
    f.residual = kOneSizeResidual;
  }
}

double CalibrationProfile::interpolate(const Family& f, double work, const Point* skip) {
  std::vector<const Point*> p;
  for (const Point& q : f.points)
    if (&q != skip) p.push_back(&q);
  if (p.size() == 1) return f.overhead + f.rate * work;
  if (work <= p.front()->work || work >= p.back()->work) {
    // Beyond the measured sizes: a kernel's fixed cost plus its work at its measured rate.
    if (f.rate > 0) return f.overhead + f.rate * work;
    const Point* near = work <= p.front()->work ? p.front() : p.back();
    return near->seconds * work / near->work;
  }
  std::size_t i = 1;
  while (p[i]->work < work) ++i;
  const double x = (work - p[i - 1]->work) / (p[i]->work - p[i - 1]->work);
  return p[i - 1]->seconds + x * (p[i]->seconds - p[i - 1]->seconds);
}

std::string host_signature(const Op& op) { return "host:" + op_signature(op); }

std::optional<double> CalibrationProfile::host_seconds(const Op& op) const {
  finalize();
  const auto it = fitted_.find(host_signature(op));
  if (it == fitted_.end()) return std::nullopt;
  return it->second.seconds;
}

std::optional<MeasuredCost> CalibrationProfile::lookup(const Op& op, OpContext where) const {
  finalize();
  if (const auto it = fitted_.find(op_signature(op, where)); it != fitted_.end()) return it->second;
  if (is_comm(op.kind)) return std::nullopt;
  const auto f = families_.find(op_family(op, where));
  const double work = op_work(op);
  if (f == families_.end() || f->second.points.empty() || !(work > 0)) return std::nullopt;
  double spread = 0;
  for (const Point& q : f->second.points) spread += q.spread / static_cast<double>(f->second.points.size());
  return MeasuredCost{std::max(0.0, interpolate(f->second, work)), spread + f->second.residual, 0, true};
}

nlohmann::json CalibrationProfile::to_json() const {
  finalize();
  nlohmann::json ops = nlohmann::json::object();
  for (const auto& [sig, c] : fitted_) {
    ops[sig] = {{"seconds", c.seconds}, {"spread", c.spread}, {"samples", c.samples}};
    if (const auto z = sized_.find(sig); z != sized_.end()) {
      ops[sig]["family"] = z->second.family;
      ops[sig]["work"] = z->second.work;
    }
  }
  nlohmann::json speeds = nlohmann::json::object();
  for (const auto& [rank, speed] : rank_speeds()) speeds[std::to_string(rank)] = speed;
  nlohmann::json coll = nlohmann::json::object();
  for (const auto& [name, by_ranks] : collectives_)
    for (const auto& [ranks, points] : by_ranks) coll[name][std::to_string(ranks)] = points;
  nlohmann::json j = {{"format", "parallax-calibration 1"}, {"source", source}, {"dispatch_gap_s", dispatch_gap_s()},
                      {"measured_iteration_s", measured_iteration_s()}, {"plan", traced_plan_}, {"rank_speeds", speeds}, {"ops", ops},
                      {"collectives", coll}};
  if (gemm_curve_points > 0)
    j["gemm_curve"] = {{"scale", gemm_curve_scale}, {"residual", gemm_curve_residual}, {"points", gemm_curve_points}};
  return j;
}

CalibrationProfile CalibrationProfile::from_json(const nlohmann::json& j, const std::string& file) {
  if (!j.is_object() || j.value("format", "") != "parallax-calibration 1" || !j.contains("ops") || !j["ops"].is_object())
    throw Error(ErrorKind::Parse, {file}, "not a Parallax calibration profile", "make one with parallax calibrate");
  CalibrationProfile p;
  p.source = j.value("source", "");
  p.gap_ = j.value("dispatch_gap_s", 0.0);
  p.iteration_ = j.value("measured_iteration_s", 0.0);
  if (j.contains("plan")) p.traced_plan_ = j["plan"];
  if (j.contains("gemm_curve")) {
    const nlohmann::json& g = j["gemm_curve"];
    if (!g.is_object() || !g.value("scale", nlohmann::json()).is_number() || !(g["scale"].get<double>() > 0))
      throw Error(ErrorKind::Spec, {file}, "gemm_curve has no positive scale", "regenerate the profile");
    p.gemm_curve_scale = g["scale"].get<double>();
    p.gemm_curve_residual = g.value("residual", 0.0);
    p.gemm_curve_points = g.value("points", 0);
  }
  p.rank_speeds_.emplace();
  if (j.contains("rank_speeds"))
    for (const auto& [rank, speed] : j["rank_speeds"].items()) {
      int r = -1;
      char tail = 0;
      if (std::sscanf(rank.c_str(), "%d%c", &r, &tail) != 1 || r < 0 || !speed.is_number() || !(speed.get<double>() > 0))
        throw Error(ErrorKind::Spec, {file}, fmt::format("rank_speeds entry '{}' is not a rank with a positive speed", rank),
                    "regenerate the profile");
      (*p.rank_speeds_)[r] = speed.get<double>();
    }
  if (j.contains("collectives"))
    for (const auto& [name, by_ranks] : j["collectives"].items())
      for (const auto& [ranks, points] : by_ranks.items())
        p.collectives_[name][std::stoi(ranks)] = points.get<std::vector<std::pair<double, double>>>();
  for (const auto& [sig, c] : j["ops"].items()) {
    if (!c.contains("seconds") || !c["seconds"].is_number() || c["seconds"].get<double>() < 0)
      throw Error(ErrorKind::Spec, {file}, fmt::format("op '{}' has no valid seconds", sig), "regenerate the profile");
    p.fitted_[sig] = {c["seconds"], c.value("spread", 0.0), c.value("samples", std::int64_t{1})};
    p.samples_[sig] = {c["seconds"].get<double>()};
    if (c.contains("family") && c["family"].is_string() && c.contains("work") && c["work"].is_number())
      p.sized_[sig] = {c["family"].get<std::string>(), c["work"].get<double>()};
  }
  p.fit_families();
  return p;
}

void CalibrationProfile::write(const std::filesystem::path& file) const {
  const auto tmp = file.string() + ".tmp";
  {
    std::ofstream out(tmp);
    out << to_json().dump(1) << "\n";
    if (!out) throw Error(ErrorKind::Io, {tmp}, "cannot write the profile");
  }
  std::filesystem::rename(tmp, file);
}

CalibrationProfile CalibrationProfile::read(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw Error(ErrorKind::Io, {file.string()}, "cannot read the profile");
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded()) throw Error(ErrorKind::Parse, {file.string()}, "the profile is not valid JSON", "regenerate it with parallax calibrate");
  return from_json(j, file.string());
}

}  // namespace px::sim
