#include "bench/host_bench.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/pattern.h"
#include "kvtier/store.h"
#include "storage/host_region.h"

namespace kvtier::bench {
namespace {

// The targets of the issue that asked for this benchmark.
constexpr double kTargetRatio = 0.9;
constexpr double kTargetOverheadUs = 2.0;
// Several times the last-level cache of the machines we run on (32 MiB on the dev VM).
constexpr uint64_t kScrubBytes = 128 * kMiB;
// The small layout: one layer, one KV head, head dim 64, bf16: K and V of one token are
// 256 bytes, so a block of `small_bytes` holds small_bytes / 256 tokens.
constexpr uint64_t kSmallBytesPerToken = 256;
// Source and destination buffers of the overhead measurement (cache-resident).
constexpr uint64_t kSmallBuffers = 64;

struct HostConfig {
  double capacity_gib = 1.0;
  double source_mib = 256.0;
  uint32_t reps = 7;
  uint32_t batch_blocks = 32;
  uint64_t small_bytes = 4096;
  uint64_t small_ops = 200000;
  uint32_t small_slots = 1024;
  std::string host_memory = "auto";  // a HostMemoryKindName
  uint64_t seed = 1;
  bool json = false;
};

// `count` buffers of `stride` bytes, back to back in one region allocated the way the
// store allocates its host tier (HostRegion: 2 MiB-aligned, huge-page advised, every
// page faulted in), so that neither side of a comparison gets better memory.
class BufferSet {
 public:
  static Result<BufferSet> Allocate(uint64_t count, uint64_t stride, HostMemoryKind kind) {
    KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<HostRegion> region,
                            HostRegion::Allocate(count * stride, kind));
    return BufferSet(std::move(region), count, stride);
  }

  uint64_t count() const { return count_; }
  std::byte* at(uint64_t i) const { return region_->data() + i * stride_; }
  void Poison() const { std::memset(region_->data(), 0, count_ * stride_); }

 private:
  BufferSet(std::unique_ptr<HostRegion> region, uint64_t count, uint64_t stride)
      : region_(std::move(region)), count_(count), stride_(stride) {}

  std::unique_ptr<HostRegion> region_;
  uint64_t count_;
  uint64_t stride_;
};

const std::map<std::string, HostMemoryKind>& HostMemoryKinds() {
  static const auto* kinds =
      new std::map<std::string, HostMemoryKind>{{"auto", HostMemoryKind::kAuto},
                                                {"cuda-pinned", HostMemoryKind::kCudaPinned},
                                                {"locked", HostMemoryKind::kLocked},
                                                {"plain", HostMemoryKind::kPlain}};
  return *kinds;
}

// `memory` was checked against HostMemoryKinds() when the command line was parsed.
Result<std::unique_ptr<Store>> OpenStore(const ModelLayout& layout, uint64_t capacity_bytes,
                                         const std::string& memory) {
  StoreOptions options;
  options.host_capacity_bytes = capacity_bytes;
  options.host_memory = HostMemoryKinds().at(memory);
  return Store::Open(options, layout);
}

// --- Throughput: full-size blocks ---------------------------------------------------

// GB/s of each repetition.
struct ThroughputSamples {
  std::vector<double> put, put_batch, get, get_batch, memcpy_put, memcpy_get;
};

// One pass writes `blocks` (= the tier's slots) blocks, key i from source buffer
// i % sources, and reads them back into destination buffer i % sources. The memcpy
// baseline copies the same source buffers into a region as large as the tier, slot i,
// and back out into the same destination buffers.
class ThroughputBench {
 public:
  static Result<std::unique_ptr<ThroughputBench>> Create(const HostConfig& config) {
    const ModelLayout layout = ModelLayout::Llama3_8B();
    KVTIER_ASSIGN_OR_RETURN(
        std::unique_ptr<Store> store,
        OpenStore(layout, static_cast<uint64_t>(config.capacity_gib * double(kGiB)),
                  config.host_memory));
    const StoreStats stats = store->Stats();
    const uint64_t sources =
        static_cast<uint64_t>(config.source_mib * double(kMiB)) / stats.host_slot_bytes;
    if (sources == 0 || sources > stats.host_slots) {
      return Status::InvalidArgument(
          "the source set must hold between one block and the host tier's " +
          std::to_string(stats.host_slots) + " blocks; --source-mib gives " +
          std::to_string(sources));
    }
    KVTIER_ASSIGN_OR_RETURN(
        BufferSet baseline,
        BufferSet::Allocate(stats.host_slots, stats.host_slot_bytes, stats.host_memory));
    KVTIER_ASSIGN_OR_RETURN(
        BufferSet src, BufferSet::Allocate(sources, stats.host_slot_bytes, HostMemoryKind::kPlain));
    KVTIER_ASSIGN_OR_RETURN(
        BufferSet dst, BufferSet::Allocate(sources, stats.host_slot_bytes, HostMemoryKind::kPlain));
    auto bench = std::unique_ptr<ThroughputBench>(new ThroughputBench(
        config, std::move(store), std::move(baseline), std::move(src), std::move(dst)));
    for (uint64_t j = 0; j < sources; ++j) {
      KVTIER_RETURN_IF_ERROR(
          FillPatternRef(bench->SourceSeed(j), bench->src_.at(j), bench->block_bytes_, nullptr));
    }
    return bench;
  }

  const Store& store() const { return *store_; }
  uint64_t blocks() const { return blocks_; }
  uint64_t sources() const { return src_.count(); }
  uint64_t verified_blocks() const { return verified_blocks_; }
  uint64_t corrupt_blocks() const { return corrupt_blocks_; }

  // One repetition of every phase, alternating store and memcpy; adds its GB/s to
  // `samples` (a warm-up pass when null). Blocks read back are verified, untimed.
  Status Pass(ThroughputSamples* samples) {
    const uint64_t n = blocks_, bytes = block_bytes_, s = src_.count();
    Status failure;
    auto record = [&](std::vector<double> ThroughputSamples::*field, double seconds) {
      if (samples != nullptr)
        (samples->*field).push_back(double(n * bytes) / seconds / kBytesPerGB);
    };

    scrubber_.Scrub();
    record(&ThroughputSamples::put, TimeSeconds([&] {
      for (uint64_t i = 0; i < n && failure.ok(); ++i) {
        failure = store_->Put(Key(i), src_.at(i % s), bytes);
      }
    }));
    KVTIER_RETURN_IF_ERROR(failure.WithContext("Put"));

    scrubber_.Scrub();
    record(&ThroughputSamples::memcpy_put, TimeSeconds([&] {
      for (uint64_t i = 0; i < n; ++i) std::memcpy(baseline_.at(i), src_.at(i % s), bytes);
    }));

    for (uint64_t i = 0; i < n; ++i) writes_[i] = BlockWrite{Key(i), src_.at(i % s), bytes};
    scrubber_.Scrub();
    record(&ThroughputSamples::put_batch, TimeSeconds([&] {
      for (uint64_t i = 0; i < n && failure.ok(); i += batch_) {
        const uint64_t m = std::min<uint64_t>(batch_, n - i);
        failure = store_->PutBatch(std::span<const BlockWrite>(writes_).subspan(i, m),
                                   std::span<Status>(statuses_).first(m));
      }
    }));
    KVTIER_RETURN_IF_ERROR(failure.WithContext("PutBatch"));

    dst_.Poison();
    scrubber_.Scrub();
    record(&ThroughputSamples::get, TimeSeconds([&] {
      for (uint64_t i = 0; i < n && failure.ok(); ++i) {
        failure = store_->Get(Key(i), dst_.at(i % s), bytes);
      }
    }));
    KVTIER_RETURN_IF_ERROR(failure.WithContext("Get"));
    Verify();

    scrubber_.Scrub();
    record(&ThroughputSamples::memcpy_get, TimeSeconds([&] {
      for (uint64_t i = 0; i < n; ++i) std::memcpy(dst_.at(i % s), baseline_.at(i), bytes);
    }));

    for (uint64_t i = 0; i < n; ++i) reads_[i] = BlockRead{Key(i), dst_.at(i % s), bytes};
    dst_.Poison();
    scrubber_.Scrub();
    record(&ThroughputSamples::get_batch, TimeSeconds([&] {
      for (uint64_t i = 0; i < n && failure.ok(); i += batch_) {
        const uint64_t m = std::min<uint64_t>(batch_, n - i);
        failure = store_->GetBatch(std::span<const BlockRead>(reads_).subspan(i, m),
                                   std::span<Status>(statuses_).first(m));
      }
    }));
    KVTIER_RETURN_IF_ERROR(failure.WithContext("GetBatch"));
    Verify();
    return Status::OK();
  }

 private:
  ThroughputBench(const HostConfig& config, std::unique_ptr<Store> store, BufferSet baseline,
                  BufferSet src, BufferSet dst)
      : seed_(config.seed),
        batch_(config.batch_blocks),
        store_(std::move(store)),
        layers_(store_->layout().num_layers),
        block_bytes_(store_->block_bytes()),
        blocks_(baseline.count()),
        baseline_(std::move(baseline)),
        src_(std::move(src)),
        dst_(std::move(dst)),
        writes_(blocks_),
        reads_(blocks_),
        statuses_(batch_),
        scrubber_(kScrubBytes) {}

  // Key i: layer-major within 128-token chunks, as an engine's prefill writes them.
  BlockKey Key(uint64_t i) const {
    return BlockKey{.namespace_id = 0,
                    .sequence = SequenceId::FromU64(1),
                    .layer = static_cast<uint32_t>(i % layers_),
                    .block = static_cast<uint32_t>(i / layers_)};
  }
  uint64_t SourceSeed(uint64_t j) const { return PatternWord(seed_, j); }

  // Destination buffer j last received key i for the largest i < blocks with
  // i % sources == j, which was written from source buffer j.
  void Verify() {
    for (uint64_t j = 0; j < dst_.count(); ++j) {
      const uint64_t at = FindPatternMismatch(SourceSeed(j), dst_.at(j), block_bytes_);
      if (at == block_bytes_) {
        ++verified_blocks_;
      } else {
        ++corrupt_blocks_;
        std::fprintf(stderr, "kvtier-bench host: destination buffer %llu differs at byte %llu\n",
                     static_cast<unsigned long long>(j), static_cast<unsigned long long>(at));
      }
    }
  }

  const uint64_t seed_;
  const uint64_t batch_;
  std::unique_ptr<Store> store_;
  const uint32_t layers_;
  const uint64_t block_bytes_;
  const uint64_t blocks_;
  BufferSet baseline_;
  BufferSet src_;
  BufferSet dst_;
  std::vector<BlockWrite> writes_;
  std::vector<BlockRead> reads_;
  std::vector<Status> statuses_;
  CacheScrubber scrubber_;
  uint64_t verified_blocks_ = 0;
  uint64_t corrupt_blocks_ = 0;
};

// --- Per-operation overhead: small blocks -------------------------------------------

// Microseconds per operation of each repetition.
struct OverheadSamples {
  std::vector<double> put, get, memcpy_put, memcpy_get;
};

// A full tier of `slots` small blocks. Puts write new keys (each evicts the least
// recently used block); Gets cycle over the resident keys. The memcpy baseline copies
// the same buffers into and out of a region of `slots` slots, slot i % slots. Every
// buffer is cache-resident on both sides: what differs is the store's own work.
class OverheadBench {
 public:
  static Result<std::unique_ptr<OverheadBench>> Create(const HostConfig& config) {
    if (config.small_bytes == 0 || config.small_bytes % kSmallBytesPerToken != 0) {
      return Status::InvalidArgument("--small-bytes must be a positive multiple of " +
                                     std::to_string(kSmallBytesPerToken));
    }
    const ModelLayout layout{
        .num_layers = 1,
        .num_kv_heads = 1,
        .num_query_heads = 1,
        .head_dim = 64,
        .dtype = DType::kBF16,
        .block_tokens = static_cast<uint32_t>(config.small_bytes / kSmallBytesPerToken)};
    KVTIER_RETURN_IF_ERROR(layout.Validate());
    const uint64_t slot_bytes = (layout.BytesPerBlock() + 4095) / 4096 * 4096;
    KVTIER_ASSIGN_OR_RETURN(
        std::unique_ptr<Store> store,
        OpenStore(layout, uint64_t{config.small_slots} * slot_bytes, config.host_memory));
    const StoreStats stats = store->Stats();
    KVTIER_ASSIGN_OR_RETURN(
        BufferSet baseline,
        BufferSet::Allocate(stats.host_slots, stats.host_slot_bytes, stats.host_memory));
    KVTIER_ASSIGN_OR_RETURN(BufferSet src, BufferSet::Allocate(kSmallBuffers, stats.host_slot_bytes,
                                                               HostMemoryKind::kPlain));
    KVTIER_ASSIGN_OR_RETURN(BufferSet dst, BufferSet::Allocate(kSmallBuffers, stats.host_slot_bytes,
                                                               HostMemoryKind::kPlain));
    for (uint64_t j = 0; j < kSmallBuffers; ++j) {
      KVTIER_RETURN_IF_ERROR(
          FillPatternRef(PatternWord(config.seed, j), src.at(j), layout.BytesPerBlock(), nullptr));
    }
    auto bench = std::unique_ptr<OverheadBench>(new OverheadBench(
        config, std::move(store), std::move(baseline), std::move(src), std::move(dst)));
    // Fill the tier so that every timed Put evicts.
    for (uint64_t i = 0; i < bench->slots_; ++i) {
      KVTIER_RETURN_IF_ERROR(bench->store_->Put(
          bench->Key(bench->next_key_++), bench->src_.at(i % kSmallBuffers), bench->block_bytes_));
    }
    return bench;
  }

  const Store& store() const { return *store_; }

  // One repetition: store Put, memcpy, store Get, memcpy; adds microseconds per
  // operation to `samples` (a warm-up pass when null).
  Status Pass(OverheadSamples* samples) {
    const uint64_t ops = ops_, bytes = block_bytes_, slots = slots_;
    Status failure;
    auto record = [&](std::vector<double> OverheadSamples::*field, double seconds) {
      if (samples != nullptr) (samples->*field).push_back(seconds / double(ops) * 1e6);
    };

    record(&OverheadSamples::put, TimeSeconds([&] {
      for (uint64_t i = 0; i < ops && failure.ok(); ++i) {
        failure = store_->Put(Key(next_key_++), src_.at(i % kSmallBuffers), bytes);
      }
    }));
    KVTIER_RETURN_IF_ERROR(failure.WithContext("Put"));

    record(&OverheadSamples::memcpy_put, TimeSeconds([&] {
      for (uint64_t i = 0; i < ops; ++i) {
        std::memcpy(baseline_.at(i % slots), src_.at(i % kSmallBuffers), bytes);
      }
    }));

    const uint64_t first_resident = next_key_ - slots;
    record(&OverheadSamples::get, TimeSeconds([&] {
      for (uint64_t i = 0; i < ops && failure.ok(); ++i) {
        failure = store_->Get(Key(first_resident + i % slots), dst_.at(i % kSmallBuffers), bytes);
      }
    }));
    KVTIER_RETURN_IF_ERROR(failure.WithContext("Get"));

    record(&OverheadSamples::memcpy_get, TimeSeconds([&] {
      for (uint64_t i = 0; i < ops; ++i) {
        std::memcpy(dst_.at(i % kSmallBuffers), baseline_.at(i % slots), bytes);
      }
    }));
    return Status::OK();
  }

 private:
  OverheadBench(const HostConfig& config, std::unique_ptr<Store> store, BufferSet baseline,
                BufferSet src, BufferSet dst)
      : ops_(config.small_ops),
        store_(std::move(store)),
        block_bytes_(store_->block_bytes()),
        slots_(baseline.count()),
        baseline_(std::move(baseline)),
        src_(std::move(src)),
        dst_(std::move(dst)) {}

  // Every key a new block of one sequence (the index keeps one chain per sequence).
  static BlockKey Key(uint64_t k) {
    return BlockKey{.namespace_id = 0,
                    .sequence = SequenceId::FromU64(2),
                    .layer = 0,
                    .block = static_cast<uint32_t>(k)};
  }

  const uint64_t ops_;
  std::unique_ptr<Store> store_;
  const uint64_t block_bytes_;
  const uint64_t slots_;
  BufferSet baseline_;
  BufferSet src_;
  BufferSet dst_;
  uint64_t next_key_ = 0;
};

// --- Report -------------------------------------------------------------------------

struct Report {
  // Throughput, medians in GB/s.
  double put = 0, put_batch = 0, get = 0, get_batch = 0;
  double memcpy_put = 0, memcpy_get = 0, memcpy_all = 0;
  double put_min = 0, put_max = 0, get_min = 0, get_max = 0;
  // Overhead, medians in microseconds per operation.
  double put_op_us = 0, get_op_us = 0, memcpy_put_op_us = 0, memcpy_get_op_us = 0;

  double PutRatio() const { return put / memcpy_put; }
  double PutBatchRatio() const { return put_batch / memcpy_put; }
  double GetRatio() const { return get / memcpy_get; }
  double GetBatchRatio() const { return get_batch / memcpy_get; }
  double PutOverheadUs() const { return put_op_us - memcpy_put_op_us; }
  double GetOverheadUs() const { return get_op_us - memcpy_get_op_us; }
  bool RatiosMet() const { return PutRatio() >= kTargetRatio && GetRatio() >= kTargetRatio; }
  bool OverheadMet() const {
    return PutOverheadUs() <= kTargetOverheadUs && GetOverheadUs() <= kTargetOverheadUs;
  }
};

Report Summarize(const ThroughputSamples& t, const OverheadSamples& o) {
  Report r;
  r.put = Median(t.put);
  r.put_batch = Median(t.put_batch);
  r.get = Median(t.get);
  r.get_batch = Median(t.get_batch);
  r.memcpy_put = Median(t.memcpy_put);
  r.memcpy_get = Median(t.memcpy_get);
  std::vector<double> all = t.memcpy_put;
  all.insert(all.end(), t.memcpy_get.begin(), t.memcpy_get.end());
  r.memcpy_all = Median(all);
  r.put_min = *std::min_element(t.put.begin(), t.put.end());
  r.put_max = *std::max_element(t.put.begin(), t.put.end());
  r.get_min = *std::min_element(t.get.begin(), t.get.end());
  r.get_max = *std::max_element(t.get.begin(), t.get.end());
  r.put_op_us = Median(o.put);
  r.get_op_us = Median(o.get);
  r.memcpy_put_op_us = Median(o.memcpy_put);
  r.memcpy_get_op_us = Median(o.memcpy_get);
  return r;
}

std::string MemoryName(HostMemoryKind kind) { return std::string(HostMemoryKindName(kind)); }

void PrintTable(const HostConfig& config, const ThroughputBench& tb, const OverheadBench& ob,
                const Report& r) {
  const StoreStats big = tb.store().Stats();
  const StoreStats small = ob.store().Stats();
  std::printf("kvtier-bench host: %s\n", tb.store().layout().ToString().c_str());
  std::printf("  host tier: %.2f GiB, %llu slots of %llu bytes, %s memory\n",
              double(big.host_capacity_bytes) / double(kGiB),
              static_cast<unsigned long long>(big.host_slots),
              static_cast<unsigned long long>(big.block_bytes),
              MemoryName(big.host_memory).c_str());
  std::printf("  per pass: %llu blocks (%.2f GiB) from a %.0f MiB source set; batches of %u\n",
              static_cast<unsigned long long>(tb.blocks()),
              double(tb.blocks() * big.block_bytes) / double(kGiB),
              double(tb.sources() * big.host_slot_bytes) / double(kMiB), config.batch_blocks);
  std::printf("  %u repetitions after a warm-up, store and memcpy alternating; medians\n\n",
              config.reps);
  std::printf("  %-10s %11s %12s %7s   %s\n", "op", "store GB/s", "memcpy GB/s", "ratio",
              "store min..max");
  std::printf("  %-10s %11.2f %12.2f %7.3f   %.2f..%.2f\n", "put", r.put, r.memcpy_put,
              r.PutRatio(), r.put_min, r.put_max);
  std::printf("  %-10s %11.2f %12.2f %7.3f\n", "put-batch", r.put_batch, r.memcpy_put,
              r.PutBatchRatio());
  std::printf("  %-10s %11.2f %12.2f %7.3f   %.2f..%.2f\n", "get", r.get, r.memcpy_get,
              r.GetRatio(), r.get_min, r.get_max);
  std::printf("  %-10s %11.2f %12.2f %7.3f\n\n", "get-batch", r.get_batch, r.memcpy_get,
              r.GetBatchRatio());
  std::printf("  small blocks: %llu bytes, full tier of %llu slots, %llu ops per phase\n",
              static_cast<unsigned long long>(small.block_bytes),
              static_cast<unsigned long long>(small.host_slots),
              static_cast<unsigned long long>(config.small_ops));
  std::printf("  %-10s %11s %12s %12s\n", "op", "store us/op", "memcpy us/op", "overhead us");
  std::printf("  %-10s %11.3f %12.3f %12.3f\n", "put", r.put_op_us, r.memcpy_put_op_us,
              r.PutOverheadUs());
  std::printf("  %-10s %11.3f %12.3f %12.3f\n", "get", r.get_op_us, r.memcpy_get_op_us,
              r.GetOverheadUs());
  std::printf("  (each store put evicted a block: %llu evictions in all)\n\n",
              static_cast<unsigned long long>(small.evictions));
  std::printf("  verified byte-exact: %llu blocks read back, %llu corrupt\n",
              static_cast<unsigned long long>(tb.verified_blocks()),
              static_cast<unsigned long long>(tb.corrupt_blocks()));
  std::printf("  targets: put/get ratio >= %.2f: %s; overhead <= %.1f us: %s\n", kTargetRatio,
              r.RatiosMet() ? "met" : "MISSED", kTargetOverheadUs,
              r.OverheadMet() ? "met" : "MISSED");
}

void PrintJson(const HostConfig& config, const ThroughputBench& tb, const OverheadBench& ob,
               const Report& r) {
  const StoreStats big = tb.store().Stats();
  const StoreStats small = ob.store().Stats();
  JsonLine j;
  j.Add("bench", "host");
  j.Add("layout", tb.store().layout().ToString());
  j.Add("block_bytes", big.block_bytes);
  j.Add("host_memory", HostMemoryKindName(big.host_memory));
  j.Add("capacity_bytes", big.host_capacity_bytes);
  j.Add("host_slots", big.host_slots);
  j.Add("source_bytes", tb.sources() * big.host_slot_bytes);
  j.Add("blocks_per_pass", tb.blocks());
  j.Add("batch_blocks", config.batch_blocks);
  j.Add("reps", config.reps);
  j.Add("put_gbps", r.put);
  j.Add("put_batch_gbps", r.put_batch);
  j.Add("get_gbps", r.get);
  j.Add("get_batch_gbps", r.get_batch);
  j.Add("memcpy_gbps", r.memcpy_all);
  j.Add("memcpy_put_gbps", r.memcpy_put);
  j.Add("memcpy_get_gbps", r.memcpy_get);
  j.Add("put_ratio", r.PutRatio());
  j.Add("put_batch_ratio", r.PutBatchRatio());
  j.Add("get_ratio", r.GetRatio());
  j.Add("get_batch_ratio", r.GetBatchRatio());
  j.Add("small_block_bytes", small.block_bytes);
  j.Add("small_slots", small.host_slots);
  j.Add("small_ops", config.small_ops);
  j.Add("small_evictions", small.evictions);
  j.Add("put_op_us", r.put_op_us);
  j.Add("get_op_us", r.get_op_us);
  j.Add("memcpy_put_op_us", r.memcpy_put_op_us);
  j.Add("memcpy_get_op_us", r.memcpy_get_op_us);
  j.Add("put_overhead_us", r.PutOverheadUs());
  j.Add("get_overhead_us", r.GetOverheadUs());
  j.Add("verified_blocks", tb.verified_blocks());
  j.Add("corrupt_blocks", tb.corrupt_blocks());
  j.Add("targets_met", r.RatiosMet() && r.OverheadMet());
  std::printf("%s\n", j.str().c_str());
}

int RunHost(const HostConfig& config) {
  auto fail = [](const Status& s) {
    std::fprintf(stderr, "kvtier-bench host: %s\n", s.ToString().c_str());
    return 2;
  };
  Result<std::unique_ptr<ThroughputBench>> tb = ThroughputBench::Create(config);
  if (!tb.ok()) return fail(tb.status());
  Result<std::unique_ptr<OverheadBench>> ob = OverheadBench::Create(config);
  if (!ob.ok()) return fail(ob.status());

  ThroughputSamples throughput;
  OverheadSamples overhead;
  for (uint32_t rep = 0; rep <= config.reps; ++rep) {  // rep 0 warms up
    if (Status s = (*tb)->Pass(rep == 0 ? nullptr : &throughput); !s.ok()) return fail(s);
    if (Status s = (*ob)->Pass(rep == 0 ? nullptr : &overhead); !s.ok()) return fail(s);
  }
  const Report report = Summarize(throughput, overhead);
  if (config.json) {
    PrintJson(config, **tb, **ob, report);
  } else {
    PrintTable(config, **tb, **ob, report);
  }
  return (*tb)->corrupt_blocks() == 0 ? 0 : 1;
}

}  // namespace

void AddHostCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<HostConfig>();
  CLI::App* cmd = app.add_subcommand(
      "host", "Host tier Put/Get GB/s of 512 KiB blocks against memcpy, and per-op overhead");
  cmd->footer("Example: kvtier-bench host --capacity-gib 2 --reps 9 --json");
  cmd->add_option("--capacity-gib", config->capacity_gib,
                  "Host tier capacity, GiB; also the memcpy baseline's destination region")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--source-mib", config->source_mib,
                  "Caller buffers both sides copy from (Put) and into (Get), MiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--reps", config->reps, "Timed repetitions (after one warm-up); medians")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1000u));
  cmd->add_option("--batch-blocks", config->batch_blocks, "Blocks per PutBatch / GetBatch")
      ->capture_default_str()
      ->check(CLI::Range(1u, 4096u));
  cmd->add_option("--small-bytes", config->small_bytes,
                  "Block size of the overhead measurement, a multiple of 256 bytes")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{256}, uint64_t{1} << 20));
  cmd->add_option("--small-ops", config->small_ops, "Operations per overhead phase")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{1000}, uint64_t{1} << 30));
  cmd->add_option("--small-slots", config->small_slots, "Host tier slots of the overhead store")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1u << 24));
  cmd->add_option("--host-memory", config->host_memory,
                  "What backs the host tier (and the memcpy baseline's region)")
      ->capture_default_str()
      ->check(CLI::IsMember(HostMemoryKinds()));
  cmd->add_option("--seed", config->seed, "Seed of the synthetic data")->capture_default_str();
  cmd->add_flag("--json", config->json, "Print one JSON object (one line) instead of the table");
  cmd->callback([config, exit_code] { *exit_code = RunHost(*config); });
}

}  // namespace kvtier::bench
