#include "bench/verify_bench.h"

#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kvtier/store.h"
#include "tools/store_reader.h"

namespace kvtier::bench {
namespace {

constexpr double kTargetRatio = 0.8;

struct VerifyBenchConfig {
  std::string dir = "/var/tmp/kvtier-bench-verify";
  double data_gib = 4.0;
  double host_mib = 256.0;
  uint32_t io_depth = 64;
  uint32_t reps = 5;
  bool json = false;
};

struct Sides {
  std::vector<double> store, verify;  // GB/s per repetition
};

BlockKey Key(uint64_t i) {
  return BlockKey{.namespace_id = 0,
                  .sequence = SequenceId::FromU64(i / 32),
                  .layer = static_cast<uint32_t>(i % 32),
                  .block = 0};
}

class VerifyBench {
 public:
  explicit VerifyBench(const VerifyBenchConfig& config)
      : config_(config), layout_(ModelLayout::Llama3_8B()) {
    block_bytes_ = layout_.BytesPerBlock();
    blocks_ =
        std::max<uint64_t>(1, static_cast<uint64_t>(config.data_gib * double(kGiB)) / block_bytes_);
  }

  uint64_t data_bytes() const { return blocks_ * block_bytes_; }
  uint64_t blocks() const { return blocks_; }
  bool caches_dropped() const { return caches_dropped_; }

  StoreOptions Options() const {
    StoreOptions o;
    o.directory = config_.dir + "/store";
    o.disk_capacity_bytes = (data_bytes() + data_bytes() / 16 + 64 * kMiB) / kMiB * kMiB;
    o.io_depth = config_.io_depth;
    o.write_through = true;
    o.host_capacity_bytes = static_cast<uint64_t>(config_.host_mib * double(kMiB));
    return o;
  }

  Status Write() {
    std::error_code ec;
    std::filesystem::remove_all(config_.dir + "/store", ec);
    KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<Store> store, Store::Open(Options(), layout_));
    // 16 distinct random source blocks, reused round robin.
    std::mt19937_64 rng(1);
    sources_.resize(16);
    for (auto& s : sources_) {
      s.resize(block_bytes_);
      for (auto& b : s) b = static_cast<uint8_t>(rng());
    }
    const uint64_t batch = 32;
    std::vector<BlockWrite> writes(batch);
    std::vector<Status> statuses(batch);
    for (uint64_t i = 0; i < blocks_; i += batch) {
      const uint64_t m = std::min(batch, blocks_ - i);
      for (uint64_t k = 0; k < m; ++k) {
        writes[k] =
            BlockWrite{Key(i + k), sources_[(i + k) % sources_.size()].data(), block_bytes_};
      }
      KVTIER_RETURN_IF_ERROR(store->PutBatch(std::span<const BlockWrite>(writes).first(m),
                                             std::span<Status>(statuses).first(m)));
    }
    return store->Flush();
  }

  // The disk tier: a reopened store reads every block once, in key order.
  Result<double> ReadStore() {
    DropCaches();
    KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<Store> store, Store::Open(Options(), layout_));
    std::vector<uint64_t> order(blocks_);
    for (uint64_t i = 0; i < blocks_; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [](uint64_t a, uint64_t b) { return Key(a) < Key(b); });
    const uint64_t depth = config_.io_depth;
    struct Batch {
      std::vector<BlockRead> reads;
      std::vector<Status> statuses;
      std::vector<uint8_t> dest;
      std::future<Status> done;
      uint64_t count = 0;
    };
    std::vector<Batch> batches(2);
    for (Batch& b : batches) {
      b.reads.resize(depth);
      b.statuses.resize(depth);
      b.dest.resize(depth * block_bytes_);
    }
    Status failure;
    const double seconds = TimeSeconds([&] {
      uint64_t next = 0, in_flight = 0;
      auto submit = [&](Batch& b) {
        b.count = std::min(depth, blocks_ - next);
        for (uint64_t k = 0; k < b.count; ++k) {
          b.reads[k] =
              BlockRead{Key(order[next + k]), b.dest.data() + k * block_bytes_, block_bytes_};
        }
        next += b.count;
        ++in_flight;
        b.done = store->GetBatchAsync(std::span<const BlockRead>(b.reads).first(b.count),
                                      std::span<Status>(b.statuses).first(b.count));
      };
      for (Batch& b : batches) {
        if (next < blocks_) submit(b);
      }
      for (uint64_t i = 0; in_flight > 0; i = (i + 1) % batches.size()) {
        Status s = batches[i].done.get();
        --in_flight;
        if (!s.ok() && failure.ok()) failure = s.WithContext("reading through the store");
        if (next < blocks_ && failure.ok()) submit(batches[i]);
      }
    });
    KVTIER_RETURN_IF_ERROR(failure);
    if (store->Stats().disk_reads != blocks_) {
      return Status::Internal("the store read " + std::to_string(store->Stats().disk_reads) +
                              " of " + std::to_string(blocks_) + " blocks from disk");
    }
    return seconds;
  }

  // Verify's read path: StoreReader over every catalog entry. Timed: ReadBlocks (the
  // read phase, as the store side times its reads, not its Open); the open and the
  // catalog scan before it go to *open_s.
  Result<double> ReadVerify(double* open_s) {
    DropCaches();
    const auto start = std::chrono::steady_clock::now();
    KVTIER_ASSIGN_OR_RETURN(
        std::unique_ptr<tools::StoreReader> reader,
        tools::StoreReader::Open(config_.dir + "/store",
                                 tools::StoreReaderOptions{.io_depth = config_.io_depth}));
    std::vector<tools::BlockEntry> entries;
    KVTIER_RETURN_IF_ERROR(reader->ForEachBlock([&](const BlockKey& key, const DiskLocation& loc) {
      entries.push_back(tools::BlockEntry{key, loc});
      return true;
    }));
    *open_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    uint64_t clean = 0;
    Status failure;
    const double seconds = TimeSeconds([&] {
      failure = reader->ReadBlocks(
          entries, [&](const tools::BlockEntry&, const Status& s, std::span<const std::byte>) {
            if (s.ok()) {
              ++clean;
            } else if (failure.ok()) {
              failure = s;
            }
            return true;
          });
    });
    KVTIER_RETURN_IF_ERROR(failure);
    if (clean != blocks_) {
      return Status::Corruption("verify read " + std::to_string(clean) + " clean blocks of " +
                                std::to_string(blocks_));
    }
    return seconds;
  }

  void Cleanup() {
    std::error_code ec;
    std::filesystem::remove_all(config_.dir + "/store", ec);
  }

 private:
  void DropCaches() { caches_dropped_ = DropPageCache() && caches_dropped_; }

  VerifyBenchConfig config_;
  ModelLayout layout_;
  uint64_t block_bytes_ = 0;
  uint64_t blocks_ = 0;
  std::vector<std::vector<uint8_t>> sources_;
  bool caches_dropped_ = true;
};

int RunVerifyBench(const VerifyBenchConfig& config) {
  std::error_code ec;
  std::filesystem::create_directories(config.dir, ec);
  VerifyBench bench(config);
  if (Status s = bench.Write(); !s.ok()) {
    std::fprintf(stderr, "kvtier-bench verify: writing the store: %s\n", s.ToString().c_str());
    bench.Cleanup();
    return 2;
  }
  Sides sides;
  std::vector<double> open_times;  // verify's open and catalog scan, seconds
  const double gb = double(bench.data_bytes()) / kBytesPerGB;
  for (uint32_t rep = 0; rep < config.reps; ++rep) {
    for (int k = 0; k < 2; ++k) {
      const bool verify_side = (rep + k) % 2 == 1;  // the first side alternates
      double open_s = 0;
      Result<double> s = verify_side ? bench.ReadVerify(&open_s) : bench.ReadStore();
      if (verify_side) open_times.push_back(open_s);
      if (!s.ok()) {
        std::fprintf(stderr, "kvtier-bench verify: %s side: %s\n", verify_side ? "verify" : "store",
                     s.status().ToString().c_str());
        bench.Cleanup();
        return s.status().code() == StatusCode::kCorruption ? 1 : 2;
      }
      (verify_side ? sides.verify : sides.store).push_back(gb / *s);
    }
  }
  bench.Cleanup();
  const double store = Median(sides.store), verify = Median(sides.verify);
  const double ratio = verify / store;
  auto lo = [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); };
  auto hi = [](const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); };
  if (config.json) {
    JsonLine j;
    j.Add("blocks", bench.blocks());
    j.Add("block_bytes", ModelLayout::Llama3_8B().BytesPerBlock());
    j.Add("data_bytes", bench.data_bytes());
    j.Add("io_depth", config.io_depth);
    j.Add("reps", config.reps);
    j.Add("caches_dropped", bench.caches_dropped());
    j.Add("file_system", DescribeFileSystem(config.dir).ToString());
    j.Add("store_read_gbps", store);
    j.Add("store_read_gbps_min", lo(sides.store));
    j.Add("store_read_gbps_max", hi(sides.store));
    j.Add("verify_read_gbps", verify);
    j.Add("verify_read_gbps_min", lo(sides.verify));
    j.Add("verify_read_gbps_max", hi(sides.verify));
    j.Add("verify_open_s", Median(open_times));
    j.Add("ratio", ratio);
    j.Add("target_ratio", kTargetRatio);
    j.Add("target_met", ratio >= kTargetRatio);
    std::printf("%s\n", j.str().c_str());
  } else {
    std::printf("%" PRIu64 " blocks of %" PRIu64 " bytes (%.2f GB), io depth %u, %u reps, %s, %s\n",
                bench.blocks(), ModelLayout::Llama3_8B().BytesPerBlock(), gb, config.io_depth,
                config.reps, DescribeFileSystem(config.dir).ToString().c_str(),
                bench.caches_dropped() ? "page cache dropped before each side"
                                       : "page cache NOT dropped (not root)");
    std::printf("%-8s %10s %10s %10s  (GB/s)\n", "side", "median", "min", "max");
    std::printf("%-8s %10.3f %10.3f %10.3f\n", "store", store, lo(sides.store), hi(sides.store));
    std::printf("%-8s %10.3f %10.3f %10.3f\n", "verify", verify, lo(sides.verify),
                hi(sides.verify));
    std::printf("verify's open and catalog scan before its reads: %.3f s (median)\n",
                Median(open_times));
    std::printf("verify / store: %.3f (target >= %.1f: %s)\n", ratio, kTargetRatio,
                ratio >= kTargetRatio ? "met" : "NOT met");
  }
  return 0;
}

}  // namespace

void AddVerifyBenchCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<VerifyBenchConfig>();
  CLI::App* cmd = app.add_subcommand(
      "verify", "`kvtier verify`'s read rate against the disk tier's, on one store");
  cmd->add_option("--dir", config->dir, "Directory for the store (on the disk to measure)")
      ->capture_default_str();
  cmd->add_option("--gib", config->data_gib, "GiB of blocks")->capture_default_str();
  cmd->add_option("--host-mib", config->host_mib, "Host tier of the store, MiB")
      ->capture_default_str();
  cmd->add_option("--io-depth", config->io_depth, "Reads in flight (both sides)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1024u));
  cmd->add_option("--reps", config->reps, "Repetitions (sides alternate)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100u));
  cmd->add_flag("--json", config->json, "Print one JSON object");
  cmd->callback([config, exit_code] { *exit_code = RunVerifyBench(*config); });
}

}  // namespace kvtier::bench
