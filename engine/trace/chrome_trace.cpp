// Kineto-style trace events for an op program; and a checker used by tests and by trace ingestion.
#include "engine/trace/chrome_trace.hpp"

#include <fmt/format.h>

#include <cstdio>
#include <fstream>
#include <algorithm>
#include <map>

#include "engine/core/error.hpp"

namespace px {
namespace {

using nlohmann::json;

constexpr int kHostTid = 0;  // ProfilerStep annotations live on the host track
int stream_tid(Stream s) { return static_cast<int>(s) + 1; }

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "Float";
    case DType::BF16: return "BFloat16";
    case DType::F16: return "Half";
    case DType::FP8: return "Float8_e4m3fn";
  }
  return "?";
}

std::string members_string(const std::vector<int>& m) {
  std::string s = "[";
  for (std::size_t i = 0; i < m.size(); ++i) s += fmt::format("{}{}", i ? ", " : "", m[i]);
  return s + "]";
}

}  // namespace

ChromeTrace::ChromeTrace(const CompiledPlan& plan, TraceInfo info) : plan_(plan), info_(std::move(info)) {
  const int pid = info_.rank;
  events_.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", pid}, {"tid", 0}, {"args", {{"name", fmt::format("rank {}", pid)}}}});
  events_.push_back({{"ph", "M"}, {"name", "process_sort_index"}, {"pid", pid}, {"tid", 0}, {"args", {{"sort_index", pid}}}});
  events_.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", pid}, {"tid", kHostTid}, {"args", {{"name", "host"}}}});
  for (int s = 0; s < kNumStreams; ++s)
    events_.push_back({{"ph", "M"},
                       {"name", "thread_name"},
                       {"pid", pid},
                       {"tid", stream_tid(static_cast<Stream>(s))},
                       {"args", {{"name", fmt::format("stream {} {}", s + 1, to_string(static_cast<Stream>(s)))}}}});
}

void ChromeTrace::add_iteration(int iteration, std::span<const OpTiming> timings, double origin_s, std::span<const double> host_s,
                                std::span<const json> op_args) {
  const Program& prog = plan_.program_of(info_.rank);
  const RankBinding& binding = plan_.ranks[static_cast<std::size_t>(info_.rank)];
  const Topology& topo = plan_.topology;
  if (timings.size() != prog.ops.size())
    throw Error(ErrorKind::Usage, {}, fmt::format("trace of rank {}: {} timings for {} ops", info_.rank, timings.size(), prog.ops.size()));
  const int pid = info_.rank;
  auto us = [&](double s) { return (s - origin_s) * 1e6; };
  double first = timings.empty() ? 0 : timings[0].start, last = first;
  std::map<int, std::string> group_ranks;  // per group kind, the members of this rank's instance
  for (std::size_t i = 0; i < prog.ops.size(); ++i) {
    const Op& op = prog.ops[i];
    const OpTiming& t = timings[i];
    first = std::min(first, t.start);
    last = std::max(last, t.end);
    json args = {{"op id", i},
                 {"kind", std::string(to_string(op.kind))},
                 {"phase", std::string(to_string(op.phase))},
                 {"layer", op.layer},
                 {"micro-batch", op.micro_batch},
                 {"chunk", op.chunk},
                 {"stream", stream_tid(op.stream)},
                 {"device", info_.rank},
                 {"correlation", i},
                 {"iteration", iteration}};
    if (op.flops > 0) args["flops"] = op.flops;
    if (op.vector_flops > 0) args["vector flops"] = op.vector_flops;
    if (op.bytes_read > 0) args["bytes read"] = op.bytes_read;
    if (op.bytes_written > 0) args["bytes written"] = op.bytes_written;
    if (op.kind == OpKind::Gemm || op.kind == OpKind::AttentionCore)
      args["shape"] = {{"m", op.m}, {"n", op.n}, {"k", op.k}, {"batch", op.batch}};
    if (i < op_args.size() && op_args[i].is_object()) args.update(op_args[i]);
    std::string name(prog.name_of(op));
    std::string cat = "kernel";
    if (is_comm(op.kind)) {
      const int g = static_cast<int>(op.group);
      const int id = binding.group[static_cast<std::size_t>(g)];
      auto it = group_ranks.find(g);
      if (it == group_ranks.end()) it = group_ranks.emplace(g, members_string(topo.members(op.group, id))).first;
      const auto elems = op.comm_bytes / static_cast<std::int64_t>(dtype_bytes(op.dtype));
      args["Collective name"] = std::string(to_string(op.kind));
      args["Process Group Name"] = fmt::format("{}#{}", to_string(op.group), id);
      args["Process Group Ranks"] = it->second;
      args["Group size"] = topo.size(op.group);
      args["dtype"] = dtype_name(op.dtype);
      args["comm bytes"] = op.comm_bytes;
      args["In msg nelems"] = op.kind == OpKind::AllGather ? elems / topo.size(op.group) : elems;
      args["Out msg nelems"] = op.kind == OpKind::ReduceScatter ? elems / topo.size(op.group) : elems;
      if (op.peer != 0) args["peer rank"] = topo.ring_neighbour(op.group, info_.rank, op.peer);
      if (info_.emulated) args["stand_in"] = true;
      if (i < host_s.size() && host_s[i] > 0) args["host us"] = host_s[i] * 1e6;
      name = fmt::format("{}:{} {}", info_.backend, to_string(op.kind), name);
    } else if (op_class(op.kind) == OpClass::Memory) {
      cat = "gpu_memcpy";
      name = fmt::format("Memcpy {} ({})", op.kind == OpKind::CopyD2H ? "DtoH" : "HtoD", name);
    } else if (op.stream == Stream::Host) {
      cat = "cpu_op";
    }
    events_.push_back({{"ph", "X"},
                       {"cat", cat},
                       {"name", name},
                       {"pid", pid},
                       {"tid", stream_tid(op.stream)},
                       {"ts", us(t.start)},
                       {"dur", us(t.end) - us(t.start)},
                       {"args", std::move(args)}});
  }
  events_.push_back({{"ph", "X"},
                     {"cat", "user_annotation"},
                     {"name", fmt::format("ProfilerStep#{}", iteration)},
                     {"pid", pid},
                     {"tid", kHostTid},
                     {"ts", us(first)},
                     {"dur", us(last) - us(first)},
                     {"args", {{"iteration", iteration}}}});
}

json ChromeTrace::to_json() const {
  json parallax = {{"model", plan_.model.name},
                   {"simulated", info_.simulated},
                   {"pipeline_stage", plan_.ranks[static_cast<std::size_t>(info_.rank)].role},
                   {"ops", plan_.program_of(info_.rank).ops.size()}};
  if (info_.emulated) {
    const auto& ops = plan_.program_of(info_.rank).ops;
    parallax["emulated_rank"] = info_.rank;
    parallax["stand_in_ops"] = std::count_if(ops.begin(), ops.end(), [](const Op& op) { return is_comm(op.kind); });
  }
  return {{"schemaVersion", 1},
          {"displayTimeUnit", "ms"},
          {"distributedInfo", {{"backend", info_.backend}, {"rank", info_.rank}, {"world_size", plan_.topology.world_size()}}},
          {"deviceProperties", json::array({{{"id", info_.rank}, {"name", info_.device}}})},
          {"parallax", std::move(parallax)},
          {"traceEvents", events_}};
}

void ChromeTrace::write(const std::filesystem::path& path) const {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error(ErrorKind::Io, {tmp.string()}, "cannot create trace file", "check the directory exists and is writable");
    out << to_json().dump();
    if (!out.flush()) throw Error(ErrorKind::Io, {tmp.string()}, "cannot write trace file", "disk full?");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw Error(ErrorKind::Io, {path.string()}, "cannot move the trace into place", "check permissions");
  }
}

std::vector<std::string> check_chrome_trace(const nlohmann::json& trace) {
  std::vector<std::string> problems;
  auto problem = [&](std::string p) {
    if (problems.size() < 20) problems.push_back(std::move(p));
  };
  if (!trace.is_object() || !trace.contains("traceEvents") || !trace["traceEvents"].is_array()) {
    problem("top level must be an object with a traceEvents array");
    return problems;
  }
  if (!trace.contains("distributedInfo") || !trace["distributedInfo"].contains("rank") ||
      !trace["distributedInfo"].contains("world_size"))
    problem("distributedInfo with rank and world_size is missing (Holistic Trace Analysis needs it)");
  // Per (pid, tid): intervals of kernel events, which a stream runs one at a time.
  std::map<std::pair<int, int>, std::vector<std::pair<double, double>>> tracks;
  std::map<std::pair<int, int>, bool> named;
  int steps = 0;
  std::size_t index = 0;
  for (const auto& e : trace["traceEvents"]) {
    const std::string where = fmt::format("event {}", index++);
    if (!e.is_object() || !e.contains("ph") || !e["ph"].is_string()) {
      problem(where + ": no ph");
      continue;
    }
    const std::string ph = e["ph"];
    if (!e.contains("pid") || !e["pid"].is_number_integer() || !e.contains("tid") || !e["tid"].is_number_integer()) {
      problem(where + ": pid and tid must be integers");
      continue;
    }
    const std::pair<int, int> track{e["pid"].get<int>(), e["tid"].get<int>()};
    if (ph == "M") {
      if (!e.contains("name") || !e.contains("args") || !e["args"].is_object()) problem(where + ": metadata without name/args");
      if (e.value("name", "") == "thread_name") named[track] = true;
      continue;
    }
    if (ph != "X") {
      problem(where + ": phase '" + ph + "' is not used by these traces");
      continue;
    }
    if (!e.contains("name") || !e["name"].is_string() || !e.contains("ts") || !e["ts"].is_number() || !e.contains("dur") ||
        !e["dur"].is_number()) {
      problem(where + ": complete events need name, ts and dur");
      continue;
    }
    const double ts = e["ts"], dur = e["dur"];
    if (ts < 0 || dur < 0) problem(where + ": negative ts or dur");
    const std::string cat = e.value("cat", "");
    if (cat == "user_annotation" && e["name"].get<std::string>().rfind("ProfilerStep#", 0) == 0) ++steps;
    if (cat == "kernel" || cat == "gpu_memcpy") {
      if (!e.contains("args") || !e["args"].contains("op id")) problem(where + ": op event without an op id");
      tracks[track].emplace_back(ts, ts + dur);
      if (!named.count(track)) problem(where + fmt::format(": track {}/{} has no thread_name", track.first, track.second));
    }
  }
  if (steps == 0) problem("no ProfilerStep# annotation marks an iteration");
  for (auto& [track, spans] : tracks) {
    std::sort(spans.begin(), spans.end());
    for (std::size_t i = 1; i < spans.size(); ++i)
      if (spans[i].first < spans[i - 1].second - 1e-6 * std::max(1.0, spans[i - 1].second)) {
        problem(fmt::format("track {}/{}: events overlap at ts {}", track.first, track.second, spans[i].first));
        break;
      }
  }
  return problems;
}

}  // namespace px
