#include "tools/replay.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <thread>

#include "src/core/device_cache.h"
#include "src/util/mutex.h"
#include "tools/inspect.h"
#include "tools/json_writer.h"
#include "tools/progress.h"
#include "tools/tool_util.h"

namespace kvtier::tools {
namespace {

using Clock = std::chrono::steady_clock;

// The emulated tier's stand-in for a block: the policies only count blocks.
constexpr uint64_t kStandInBytes = 4096;
constexpr uint32_t kNamespace = 0;
constexpr SequenceId kSequence = SequenceId::FromU64(1);

// Waits until `until`: sleeps while far from it, then spins (the bench spins; a sleep
// alone overshoots by tens of microseconds).
void WaitUntil(Clock::time_point until) {
  constexpr auto kSpin = std::chrono::microseconds(200);
  if (until - Clock::now() > kSpin) std::this_thread::sleep_until(until - kSpin);
  while (Clock::now() < until) {
  }
}

// Serves every block from one zeroed stand-in buffer, after its modelled transfer: one
// link, FIFO, block_bytes / link_gbps per block.
class ModelledSource : public BlockSource {
 public:
  ModelledSource(uint64_t block_bytes, double link_gbps)
      : block_time_(std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double>(double(block_bytes) / (link_gbps * 1e9)))),
        buffer_(kStandInBytes) {}

  Status PinHost(std::span<const BlockKey> keys, std::span<HostBlockRef> blocks) override {
    Clock::time_point done;
    {
      MutexLock lock(&mu_);
      const Clock::time_point start = std::max(Clock::now(), link_free_);
      link_free_ = start + block_time_ * static_cast<int64_t>(keys.size());
      done = link_free_;
    }
    for (HostBlockRef& b : blocks) b = HostBlockRef{.data = buffer_.data()};
    WaitUntil(done);
    return Status::OK();
  }
  void UnpinHost(std::span<const BlockKey>, std::span<const HostBlockRef>) override {}

 private:
  const Clock::duration block_time_;
  std::vector<std::byte> buffer_;
  Mutex mu_;
  Clock::time_point link_free_ KVTIER_GUARDED_BY(mu_);
};

// The most distinct blocks one record asks for.
uint64_t MaxRecordBlocks(const Trace& trace) {
  uint64_t most = 0;
  std::vector<int64_t> b;
  for (const TraceRecord& r : trace.records) {
    b.clear();
    for (int64_t x : r.blocks) {
      if (x >= 0) b.push_back(x);
    }
    std::sort(b.begin(), b.end());
    most = std::max<uint64_t>(most, std::unique(b.begin(), b.end()) - b.begin());
  }
  return most;
}

const std::map<std::string, ReplayPolicy>& PolicyNames() {
  static const std::map<std::string, ReplayPolicy> names{
      {"lru", {"lru", ReplacementPolicy::kLru, false}},
      {"score-decay", {"score-decay", ReplacementPolicy::kScoreDecay, false}},
      {"lru-per-layer", {"lru-per-layer", ReplacementPolicy::kLru, true}},
      {"score-decay-per-layer", {"score-decay-per-layer", ReplacementPolicy::kScoreDecay, true}}};
  return names;
}

}  // namespace

Result<ReplayResult> ReplayTrace(const Trace& trace, const ReplayPolicy& policy,
                                 const ReplayParams& params) {
  const uint32_t layers = trace.header.layers;
  const uint64_t group_blocks = policy.per_layer ? params.gpu_blocks / layers : params.gpu_blocks;
  const uint64_t need = MaxRecordBlocks(trace);
  if (group_blocks == 0 || group_blocks < need) {
    return Status::InvalidArgument("--gpu-blocks " + std::to_string(params.gpu_blocks) + " gives " +
                                   std::to_string(group_blocks) + " blocks " +
                                   (policy.per_layer ? "per layer" : "in all") + " to " +
                                   policy.name + ", but one record of the trace acquires " +
                                   std::to_string(need) + " blocks at once");
  }
  if (!(params.link_gbps > 0) || !(params.compute_us >= 0)) {
    return Status::InvalidArgument("--link-gbps must be > 0 and --compute-us >= 0");
  }
  ModelledSource source(trace.header.block_bytes, params.link_gbps);
  DeviceCacheOptions o;
  o.policy = policy.replacement;
  o.score_decay = params.score_decay;
  o.prefetch = params.prefetch;
  o.force_emulated = true;
  o.per_layer_capacity_blocks = policy.per_layer ? static_cast<uint32_t>(group_blocks) : 0;
  KVTIER_ASSIGN_OR_RETURN(
      std::unique_ptr<DeviceCache> cache,
      DeviceCache::Create(kStandInBytes, params.gpu_blocks * kStandInBytes, o, &source));

  ReplayResult result;
  result.stall_us.assign(trace.steps(), 0.0);
  // Per layer, what its latest record acquired (the prefetch plan's history).
  std::vector<std::vector<int64_t>> last(layers);
  std::vector<int64_t> plan, blocks;
  std::vector<float> scores;
  std::vector<uint64_t> addresses;
  const auto compute = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double, std::micro>(params.compute_us));
  for (size_t i = 0; i < trace.records.size(); ++i) {
    const TraceRecord& r = trace.records[i];
    if (i > 0 && r.step != trace.records[i - 1].step) cache->NextStep();
    addresses.resize(r.blocks.size());
    Result<AcquireInfo> acquired =
        cache->Acquire(kNamespace, kSequence, r.layer, r.blocks, r.scores, nullptr, addresses);
    if (!acquired.ok()) {
      return acquired.status().WithContext("record " + std::to_string(i) + " (step " +
                                           std::to_string(r.step) + ", layer " +
                                           std::to_string(r.layer) + ")");
    }
    const AcquireInfo& info = *acquired;
    const Clock::time_point computed = Clock::now() + compute;
    result.stall_us[r.step] += double(info.stall_nanos) / 1e3;
    if (params.prefetch) {
      last[r.layer] = r.blocks;
      if (r.layer + 1 < layers) {
        plan = r.blocks;
        plan.insert(plan.end(), last[r.layer + 1].begin(), last[r.layer + 1].end());
        if (!plan.empty()) (void)cache->Prefetch(kNamespace, kSequence, r.layer + 1, plan);
      }
      if (!r.runners.empty()) (void)cache->Prefetch(kNamespace, kSequence, r.layer, r.runners);
    }
    WaitUntil(computed);
    KVTIER_RETURN_IF_ERROR(cache->Release(info.lease));
  }
  KVTIER_RETURN_IF_ERROR(cache->Drain());
  const DeviceCacheStats s = cache->stats();
  result.acquired_blocks = s.acquired_blocks;
  result.hits = s.hits;
  result.misses = s.fetches_host + s.fetches_disk;
  result.prefetches = s.prefetches;
  result.prefetch_hits = s.prefetch_hits;
  result.prefetch_wasted = s.prefetch_wasted;
  result.evictions = s.evictions;
  result.bytes_moved = s.bytes_in / kStandInBytes * trace.header.block_bytes;
  return result;
}

namespace {

struct ReplayConfig {
  std::string trace_path;
  std::vector<uint64_t> gpu_blocks;
  std::vector<std::string> policies{"lru-per-layer", "lru", "score-decay"};
  std::vector<std::string> prefetch{"off", "on"};
  ReplayParams params;
  bool json = false;
};

struct Run {
  const ReplayPolicy* policy;
  ReplayParams params;
  ReplayResult result;
};

// Steady state: every step but the first, whose misses are compulsory for any policy
// (as `kvtier-bench retrieval` reports its decode trace).
double SteadyMean(const std::vector<double>& v) {
  double sum = 0;
  for (size_t i = 1; i < v.size(); ++i) sum += v[i];
  return v.size() > 1 ? sum / double(v.size() - 1) : 0.0;
}

void PrintJson(const ReplayConfig& config, const Trace& trace, const std::vector<Run>& runs) {
  JsonWriter w;
  w.BeginObject();
  w.Key("trace"), w.String(config.trace_path);
  w.Key("source"), w.String(trace.header.source);
  w.Key("layers"), w.Uint(trace.header.layers);
  w.Key("steps"), w.Uint(trace.steps());
  w.Key("records"), w.Uint(trace.records.size());
  w.Key("blocks"), w.Uint(trace.blocks());
  w.Key("block_bytes"), w.Uint(trace.header.block_bytes);
  w.Key("max_record_blocks"), w.Uint(MaxRecordBlocks(trace));
  w.Key("compute_us"), w.Number(config.params.compute_us);
  w.Key("link_gbps"), w.Number(config.params.link_gbps);
  w.Key("score_decay"), w.Number(config.params.score_decay);
  w.Key("gpu_blocks");
  w.BeginArray();
  for (uint64_t n : config.gpu_blocks) w.Uint(n);
  w.EndArray();
  w.Key("runs");
  w.BeginArray();
  for (const Run& r : runs) {
    const ReplayResult& x = r.result;
    w.BeginObject();
    w.Key("policy"), w.String(r.policy->name);
    w.Key("prefetch"), w.Bool(r.params.prefetch);
    w.Key("gpu_blocks"), w.Uint(r.params.gpu_blocks);
    w.Key("per_layer_blocks"),
        w.Uint(r.policy->per_layer ? r.params.gpu_blocks / trace.header.layers : 0);
    w.Key("acquired_blocks"), w.Uint(x.acquired_blocks);
    w.Key("hits"), w.Uint(x.hits);
    w.Key("misses"), w.Uint(x.misses);
    w.Key("hit_rate"), w.Number(x.hit_rate());
    w.Key("prefetches"), w.Uint(x.prefetches);
    w.Key("prefetch_hits"), w.Uint(x.prefetch_hits);
    w.Key("prefetch_wasted"), w.Uint(x.prefetch_wasted);
    w.Key("evictions"), w.Uint(x.evictions);
    w.Key("bytes_moved"), w.Uint(x.bytes_moved);
    w.Key("stall_us_per_step"), w.Number(SteadyMean(x.stall_us));
    w.Key("cold_stall_us"), w.Number(x.stall_us.empty() ? 0.0 : x.stall_us[0]);
    w.Key("stall_us_steps"), w.NumberArray(x.stall_us);
    w.EndObject();
  }
  w.EndArray();
  // How often each block was acquired at each step, summed over layers: [steps][blocks],
  // binned to at most kHeatCells a side (a cell sums step_bin steps x block_bin blocks).
  constexpr uint64_t kHeatCells = 1024;
  const uint64_t steps = trace.steps(), blocks = trace.blocks();
  const uint64_t step_bin = std::max<uint64_t>(1, (steps + kHeatCells - 1) / kHeatCells);
  const uint64_t block_bin = std::max<uint64_t>(1, (blocks + kHeatCells - 1) / kHeatCells);
  std::vector<std::vector<uint64_t>> heat(
      (steps + step_bin - 1) / step_bin,
      std::vector<uint64_t>((blocks + block_bin - 1) / block_bin));
  for (const TraceRecord& r : trace.records) {
    for (int64_t b : r.blocks) {
      if (b >= 0) ++heat[r.step / step_bin][uint64_t(b) / block_bin];
    }
  }
  w.Key("heatmap");
  w.BeginObject();
  w.Key("what"), w.String("acquires per step and block, summed over layers");
  w.Key("step_bin"), w.Uint(step_bin);
  w.Key("block_bin"), w.Uint(block_bin);
  w.Key("counts");
  w.BeginArray();
  for (const std::vector<uint64_t>& row : heat) {
    w.BeginArray();
    for (uint64_t c : row) w.Uint(c);
    w.EndArray();
  }
  w.EndArray();
  w.EndObject();
  w.EndObject();
  std::printf("%s\n", w.str().c_str());
}

void PrintTable(const ReplayConfig& config, const Trace& trace, const std::vector<Run>& runs) {
  std::printf("kvtier replay: %s: %u steps x %u layers (%zu records), %llu blocks of %llu bytes\n",
              config.trace_path.c_str(), trace.steps(), trace.header.layers, trace.records.size(),
              static_cast<unsigned long long>(trace.blocks()),
              static_cast<unsigned long long>(trace.header.block_bytes));
  if (!trace.header.source.empty()) std::printf("  recorded by: %s\n", trace.header.source.c_str());
  std::printf(
      "  model: %.0f us of attention per layer, a %.1f GB/s link to the GPU tier; stall: time "
      "Acquire waited,\n  per step over its layers, steps 2.. (step 1 is cold for every "
      "policy: cold_us)\n\n",
      config.params.compute_us, config.params.link_gbps);
  std::printf("  %10s %-22s %8s %8s %9s %10s %13s %10s %11s\n", "gpu_blocks", "policy", "prefetch",
              "hit_rate", "misses", "moved_MB", "stall_us/step", "cold_us", "pf_hit/pf");
  uint64_t previous = UINT64_MAX;
  for (const Run& r : runs) {
    const ReplayResult& x = r.result;
    if (previous != UINT64_MAX && previous != r.params.gpu_blocks) std::printf("\n");
    previous = r.params.gpu_blocks;
    char pf[32];
    std::snprintf(pf, sizeof(pf), "%llu/%llu", static_cast<unsigned long long>(x.prefetch_hits),
                  static_cast<unsigned long long>(x.prefetches));
    std::printf("  %10llu %-22s %8s %8.3f %9llu %10.1f %13.1f %10.1f %11s\n",
                static_cast<unsigned long long>(r.params.gpu_blocks), r.policy->name.c_str(),
                r.params.prefetch ? "on" : "off", x.hit_rate(),
                static_cast<unsigned long long>(x.misses), double(x.bytes_moved) / 1e6,
                SteadyMean(x.stall_us), x.stall_us.empty() ? 0.0 : x.stall_us[0], pf);
  }
  std::printf(
      "\n  hit_rate: requested blocks already in the GPU tier or arriving by prefetch; moved: "
      "bytes copied into\n  the tier (demand and prefetch); pf_hit/pf: prefetched blocks "
      "a later Acquire used / prefetched.\n");
}

int RunReplay(ReplayConfig config) {
  auto fail = [&config](const Status& s) { return ReportInspectError("replay", s, config.json); };
  Result<Trace> trace = ReadTrace(config.trace_path);
  if (!trace.ok()) return fail(trace.status());
  if (trace->records.empty()) {
    return fail(Status::InvalidArgument("trace " + config.trace_path + " has no records"));
  }
  const uint32_t layers = trace->header.layers;
  if (config.gpu_blocks.empty()) {
    // A curve from the least that holds a record in every layer's own share to 4x that.
    const uint64_t base = MaxRecordBlocks(*trace) * layers;
    for (uint64_t m2 : {2, 3, 4, 6, 8})
      config.gpu_blocks.push_back(std::max<uint64_t>(1, base * m2 / 2));
  }
  std::sort(config.gpu_blocks.begin(), config.gpu_blocks.end());
  config.gpu_blocks.erase(std::unique(config.gpu_blocks.begin(), config.gpu_blocks.end()),
                          config.gpu_blocks.end());
  std::vector<bool> prefetch;
  for (const std::string& p : config.prefetch) prefetch.push_back(p == "on");
  std::vector<Run> runs;
  for (uint64_t n : config.gpu_blocks) {
    for (const std::string& name : config.policies) {
      for (bool pf : prefetch) {
        Run r{&PolicyNames().at(name), config.params, {}};
        r.params.gpu_blocks = n;
        r.params.prefetch = pf;
        runs.push_back(std::move(r));
      }
    }
  }
  Progress progress("replay", runs.size(), !config.json, /*bytes=*/false);
  for (Run& r : runs) {
    Result<ReplayResult> result = ReplayTrace(*trace, *r.policy, r.params);
    if (!result.ok()) {
      progress.Finish();
      return fail(result.status().WithContext(r.policy->name +
                                              (r.params.prefetch ? ", prefetch" : "") + ", " +
                                              std::to_string(r.params.gpu_blocks) + " GPU blocks"));
    }
    r.result = std::move(*result);
    progress.Add(1);
  }
  progress.Finish();
  if (config.json) {
    PrintJson(config, *trace, runs);
  } else {
    PrintTable(config, *trace, runs);
  }
  return 0;
}

}  // namespace

void AddReplayCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<ReplayConfig>();
  CLI::App* cmd = app.add_subcommand(
      "replay",
      "Run an access trace through the GPU tier's replacement and prefetch policies: hit rate, "
      "bytes moved, stall");
  cmd->footer(
      "The trace comes from `kvtier demo --trace-out FILE` (format: tools/trace.h). Each run "
      "drives the store's own\nDeviceCache on an emulated tier; the link and the attention "
      "time are modelled. Several --gpu-blocks give a\nhit-rate curve (`kvtier plot`). Exit "
      "status: 0 done, 2 usage or input error.\nExample: kvtier replay trace.txt --gpu-blocks "
      "256,512,1024 --policy lru,lru-per-layer --prefetch off,on --json\n");
  cmd->add_option("trace", config->trace_path, "Access trace file")->required();
  cmd->add_option("--gpu-blocks", config->gpu_blocks,
                  "GPU-tier sizes in blocks, comma-separated (per-layer policies split each "
                  "evenly); default: 1x to 4x the least that holds a record per layer")
      ->delimiter(',')
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 24));
  std::vector<std::string> names;
  for (const auto& [name, p] : PolicyNames()) names.push_back(name);
  cmd->add_option("--policy", config->policies,
                  "Policies, comma-separated: lru, score-decay, lru-per-layer, "
                  "score-decay-per-layer")
      ->delimiter(',')
      ->check(CLI::IsMember(names))
      ->capture_default_str();
  cmd->add_option("--prefetch", config->prefetch, "Prefetch settings, comma-separated: off, on")
      ->delimiter(',')
      ->check(CLI::IsMember({"off", "on"}))
      ->capture_default_str();
  cmd->add_option("--compute-us", config->params.compute_us,
                  "Modelled attention time per layer and step, microseconds")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  cmd->add_option("--link-gbps", config->params.link_gbps,
                  "Modelled host -> GPU link, GB/s (10^9 bytes)")
      ->capture_default_str()
      ->check(CLI::Range(1e-3, 1e5));
  cmd->add_option("--score-decay", config->params.score_decay,
                  "Decay per step of the score-decay policies")
      ->capture_default_str()
      ->check(CLI::Range(1e-6, 1.0));
  cmd->add_flag("--json", config->json, "Print one JSON object instead of the table");
  cmd->callback([config, exit_code] { *exit_code = RunReplay(*config); });
}

}  // namespace kvtier::tools
