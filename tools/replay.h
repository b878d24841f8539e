// `kvtier replay TRACE`: runs an access trace (tools/trace.h) through the GPU tier's
// replacement and prefetch policies and reports, per policy and GPU-tier size, the hit
// rate, the bytes moved into the tier and the modelled stall.
//
// ## What runs: the real policy code
// Each run creates a DeviceCache (src/core/device_cache.h, the class Store::Acquire
// uses) on the emulated device, forced even where a GPU is present, fed by a modelled
// BlockSource, and replays the trace: per record Acquire(blocks, scores), the modelled
// attention time, Release; with prefetch, after each Acquire the same prefetch plan as
// EmbeddedStore::Impl::PrefetchAfterAcquire (src/core/store_device.cc): for layer l + 1, the
// blocks layer l just acquired and those layer l + 1 acquired last; for layer l, the
// record's runners-up when the trace has them (the demo's traces do not: the public
// Store API does not expose them). NextStep() is called where the trace's step changes.
// Emulated slots hold 4 KiB stand-ins: the policies only count blocks, and the bytes
// moved are reported in the trace's block_bytes.
//
// ## The stall model: `kvtier-bench retrieval`'s decode trace, with the link modelled
// The bench measures the time Acquire waits for data (AcquireInfo::stall_nanos) while a
// modelled attention time per layer passes between Acquire and Release, so prefetches
// overlap it. Replay measures the same quantity the same way, but since its stand-in
// copies cost nothing, the source models the transfer: one link of link_gbps GB/s
// shared by demand fetches and prefetches (FIFO), a block taking block_bytes / link
// time; the fetching thread waits until its blocks have crossed. So the stall is the
// modelled link time Acquire could not hide behind compute. Times are waited for real
// (a replay takes about steps x layers x compute_us per run), so stall figures vary a
// little between runs; hit and miss counts without prefetch are deterministic.
//
// ## Policies (--policy, comma-separated)
//   lru                    one pool shared by every layer, least recently acquired first
//   score-decay            one shared pool, InfLLM's score decay (the trace's scores)
//   lru-per-layer          InfLLM's GPU cache: gpu_blocks / layers blocks per layer, LRU
//   score-decay-per-layer  the same with score decay
// each with prefetch off and/or on (--prefetch off,on). InfLLM's baseline is
// lru-per-layer without prefetch (32 blocks per layer: --gpu-blocks 32 x layers).
//
// Exit status: 0 when every run completed; 2 for a usage or input error (unreadable or
// malformed trace, a GPU tier too small for one record's blocks), with the reason.
#ifndef KVTIER_TOOLS_REPLAY_H_
#define KVTIER_TOOLS_REPLAY_H_

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "kvtier/retrieval.h"
#include "kvtier/status.h"
#include "tools/trace.h"

namespace kvtier::tools {

struct ReplayPolicy {
  std::string name;  // as on the command line
  ReplacementPolicy replacement = ReplacementPolicy::kLru;
  bool per_layer = false;
};

struct ReplayParams {
  uint64_t gpu_blocks = 0;  // blocks of the whole tier (per layer: / layers)
  bool prefetch = false;
  double compute_us = 300;   // modelled attention time per record (bench's default)
  double link_gbps = 25;     // modelled host -> GPU link, GB/s (10^9 bytes)
  float score_decay = 0.9f;  // per step, for the score-decay policies
};

struct ReplayResult {
  uint64_t acquired_blocks = 0;  // requested by the records (-1 entries not counted)
  uint64_t hits = 0;             // resident, or arriving by prefetch
  uint64_t misses = 0;           // fetched on demand
  uint64_t prefetches = 0;
  uint64_t prefetch_hits = 0;
  uint64_t prefetch_wasted = 0;
  uint64_t evictions = 0;
  uint64_t bytes_moved = 0;      // into the tier, all causes, in the trace's block bytes
  std::vector<double> stall_us;  // per step, summed over its records
  double hit_rate() const { return acquired_blocks ? double(hits) / acquired_blocks : 0.0; }
};

// Runs one policy at one setting over the trace. InvalidArgument when the tier cannot
// hold one record's blocks; the DeviceCache's errors otherwise.
Result<ReplayResult> ReplayTrace(const Trace& trace, const ReplayPolicy& policy,
                                 const ReplayParams& params);

// Registers the subcommand; when it runs, its exit status lands in *exit_code.
void AddReplayCommand(CLI::App& app, int* exit_code);

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_REPLAY_H_
