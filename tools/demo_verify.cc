// `kvtier demo --verify-only`: ingests a synthetic context through the store, one
// PutBatch of all layers per chunk, reads every block back and verifies every byte.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "kernels/pattern.h"
#include "kvtier/store.h"
#include "tools/demo.h"
#include "tools/tool_util.h"

namespace kvtier::tools {
namespace {

// The pattern seed of one block's synthetic contents.
uint64_t BlockSeed(uint64_t run_seed, const BlockKey& key) {
  return PatternWord(run_seed ^ key.sequence.lo, (uint64_t{key.layer} << 32) | key.block);
}

struct Phase {
  const char* name;
  uint64_t blocks = 0;
  double seconds = 0;
};

// Every block of the context: sequence-major, then 128-token chunks, then layers, so
// each chunk is one PutBatch / GetBatch of num_layers blocks.
class Context {
 public:
  Context(const DemoConfig& config, uint64_t block_bytes)
      : config_(config),
        block_bytes_(block_bytes),
        chunks_((config.tokens + config.layout.block_tokens - 1) / config.layout.block_tokens),
        buffers_(config.layout.num_layers) {
    for (auto& b : buffers_) b = std::make_unique<std::byte[]>(block_bytes);
  }

  uint64_t chunks() const { return chunks_; }
  uint64_t blocks() const { return chunks_ * config_.sequences * config_.layout.num_layers; }

  BlockKey Key(uint32_t sequence, uint64_t chunk, uint32_t layer) const {
    return BlockKey{.namespace_id = 0,
                    .sequence = SequenceId::FromU64(sequence + 1),
                    .layer = layer,
                    .block = static_cast<uint32_t>(chunk)};
  }
  std::byte* buffer(uint32_t layer) { return buffers_[layer].get(); }

 private:
  const DemoConfig& config_;
  uint64_t block_bytes_;
  uint64_t chunks_;
  std::vector<std::unique_ptr<std::byte[]>> buffers_;
};

}  // namespace

int RunVerifyDemo(const DemoConfig& input) {
  DemoConfig config = input;
  Result<DType> dtype = ParseDType(config.dtype);
  if (!dtype.ok()) {
    std::fprintf(stderr, "kvtier demo: %s\n", dtype.status().ToString().c_str());
    return 2;
  }
  config.layout.dtype = *dtype;
  StoreOptions options;
  options.host_capacity_bytes = static_cast<uint64_t>(config.host_gib * double(1ull << 30));
  TempStoreDir temp;
  if (!config.memory_only) {
    if (config.dir.empty()) {
      Status s = temp.Create();
      if (!s.ok()) {
        std::fprintf(stderr, "kvtier demo: %s\n", s.ToString().c_str());
        return 2;
      }
      temp.keep = config.keep;
      options.directory = temp.path;
    } else {
      options.directory = config.dir;
    }
    // Room for the whole context on disk, and a little more.
    const uint64_t context_bytes =
        ((config.tokens + config.layout.block_tokens - 1) / config.layout.block_tokens) *
        config.layout.block_tokens * config.layout.BytesPerToken() * config.sequences;
    options.disk_capacity_bytes = context_bytes + context_bytes / 4 + (64ull << 20);
  }
  auto opened = Store::Open(options, config.layout);
  if (!opened.ok()) {
    std::fprintf(stderr, "kvtier demo: %s\n", opened.status().ToString().c_str());
    return 2;
  }
  Store& store = **opened;
  const uint64_t block_bytes = store.block_bytes();
  const uint32_t layers = config.layout.num_layers;
  Context ctx(config, block_bytes);
  std::vector<BlockWrite> writes(layers);
  std::vector<BlockRead> reads(layers);
  std::vector<Status> statuses(layers);

  // Ingest: fill a chunk's blocks (not timed), then one timed PutBatch per chunk.
  Phase ingest{"ingest"};
  for (uint32_t s = 0; s < config.sequences; ++s) {
    for (uint64_t c = 0; c < ctx.chunks(); ++c) {
      for (uint32_t l = 0; l < layers; ++l) {
        BlockKey key = ctx.Key(s, c, l);
        (void)FillPatternRef(BlockSeed(config.seed, key), ctx.buffer(l), block_bytes, nullptr);
        writes[l] = {key, ctx.buffer(l), block_bytes};
      }
      auto t0 = std::chrono::steady_clock::now();
      Status st = store.PutBatch(writes, statuses);
      ingest.seconds += Seconds(std::chrono::steady_clock::now() - t0);
      if (!st.ok()) {
        std::fprintf(stderr, "kvtier demo: put: %s\n", st.ToString().c_str());
        return 2;
      }
      ingest.blocks += layers;
    }
  }

  // Durable: every block's bytes and catalog entry on disk (nothing for memory only).
  {
    auto t0 = std::chrono::steady_clock::now();
    Status st = store.Flush();
    ingest.seconds += Seconds(std::chrono::steady_clock::now() - t0);
    if (!st.ok()) {
      std::fprintf(stderr, "kvtier demo: flush: %s\n", st.ToString().c_str());
      return 2;
    }
  }

  // Read back: one timed GetBatch per chunk, then verify every byte (not timed).
  Phase readback{"readback"};
  uint64_t verified = 0, missing = 0, corrupt = 0;
  for (uint32_t s = 0; s < config.sequences; ++s) {
    for (uint64_t c = 0; c < ctx.chunks(); ++c) {
      for (uint32_t l = 0; l < layers; ++l)
        reads[l] = {ctx.Key(s, c, l), ctx.buffer(l), block_bytes};
      auto t0 = std::chrono::steady_clock::now();
      (void)store.GetBatch(reads, statuses);
      readback.seconds += Seconds(std::chrono::steady_clock::now() - t0);
      for (uint32_t l = 0; l < layers; ++l) {
        if (statuses[l].IsNotFound()) {
          ++missing;
          continue;
        }
        if (!statuses[l].ok()) {
          std::fprintf(stderr, "kvtier demo: get %s: %s\n", reads[l].key.ToString().c_str(),
                       statuses[l].ToString().c_str());
          return 2;
        }
        ++readback.blocks;
        uint64_t at =
            FindPatternMismatch(BlockSeed(config.seed, reads[l].key), ctx.buffer(l), block_bytes);
        if (at == block_bytes) {
          ++verified;
        } else {
          ++corrupt;
          std::fprintf(stderr, "kvtier demo: block %s differs at byte %llu\n",
                       reads[l].key.ToString().c_str(), static_cast<unsigned long long>(at));
        }
      }
    }
  }

  const StoreStats stats = store.Stats();
  // A missing block is fine only if the host tier evicted (and, with no lower tier, lost)
  // at least that many blocks.
  const bool ok = corrupt == 0 && missing <= stats.evictions_lost;
  auto gbps = [block_bytes](const Phase& p) {
    return p.seconds > 0 ? double(p.blocks) * double(block_bytes) / p.seconds / 1e9 : 0.0;
  };
  if (config.json) {
    std::printf(
        "{\"layout\":\"%s\",\"tokens\":%llu,\"sequences\":%u,\"block_bytes\":%llu,"
        "\"host_memory\":\"%s\",\"host_capacity_bytes\":%llu,"
        "\"ingest_blocks\":%llu,\"ingest_gbps\":%.3f,\"readback_blocks\":%llu,"
        "\"readback_gbps\":%.3f,\"verified\":%llu,\"missing\":%llu,\"corrupt\":%llu,"
        "\"evictions\":%llu,\"evictions_lost\":%llu,\"disk_writes\":%llu,"
        "\"disk_reads\":%llu,\"ok\":%s}\n",
        config.layout.ToString().c_str(), (unsigned long long)config.tokens, config.sequences,
        (unsigned long long)block_bytes, std::string(HostMemoryKindName(stats.host_memory)).c_str(),
        (unsigned long long)stats.host_capacity_bytes, (unsigned long long)ingest.blocks,
        gbps(ingest), (unsigned long long)readback.blocks, gbps(readback),
        (unsigned long long)verified, (unsigned long long)missing, (unsigned long long)corrupt,
        (unsigned long long)stats.evictions, (unsigned long long)stats.evictions_lost,
        (unsigned long long)stats.disk_writes, (unsigned long long)stats.disk_reads,
        ok ? "true" : "false");
    return ok ? 0 : 1;
  }
  std::printf("kvtier demo: %s\n", config.layout.ToString().c_str());
  std::printf("  context: %u sequence(s) x %llu tokens = %llu blocks of %llu bytes\n",
              config.sequences, (unsigned long long)config.tokens, (unsigned long long)ctx.blocks(),
              (unsigned long long)block_bytes);
  std::printf("  host tier: %.2f GiB, %llu slots, %s memory%s\n\n",
              double(stats.host_capacity_bytes) / double(1ull << 30),
              (unsigned long long)stats.host_slots,
              std::string(HostMemoryKindName(stats.host_memory)).c_str(),
              config.memory_only ? " (memory only: no disk tier)" : "");
  std::printf("  %-9s %10s %12s %9s %8s\n", "phase", "blocks", "bytes", "seconds", "GB/s");
  for (const Phase* p : {&ingest, &readback}) {
    std::printf("  %-9s %10llu %12.3e %9.3f %8.2f\n", p->name, (unsigned long long)p->blocks,
                double(p->blocks) * double(block_bytes), p->seconds, gbps(*p));
  }
  std::printf("\n  verified byte-exact: %llu   missing: %llu   corrupt: %llu\n",
              (unsigned long long)verified, (unsigned long long)missing,
              (unsigned long long)corrupt);
  std::printf("  evictions: %llu (lost: %llu)\n", (unsigned long long)stats.evictions,
              (unsigned long long)stats.evictions_lost);
  if (!config.memory_only) {
    std::printf("  disk tier: %s, %llu blocks written, %llu read back (promoted), %.2f GiB used\n",
                options.directory.c_str(), (unsigned long long)stats.disk_writes,
                (unsigned long long)stats.disk_reads,
                double(stats.disk_used_bytes) / double(1ull << 30));
  }
  std::printf("  result: %s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}

}  // namespace kvtier::tools
