#include "bench/gpu_bench.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "index/backends.h"
#include "index/layer_index.h"
#include "kernels/block_scoring.h"
#include "kernels/cluster_scoring.h"
#include "kernels/cuda_runtime.h"
#include "kernels/dtype_convert.h"
#include "kernels/pattern.h"
#include "storage/copy_engine.h"
#include "storage/device_pool.h"
#include "storage/host_pool.h"

namespace kvtier::bench {
namespace {

struct GpuConfig {
  uint64_t block_kib = 512;  // Llama-3-8B: one layer's K and V for 128 tokens
  uint32_t batch_blocks = 256;
  uint32_t reps = 9;
  int device = DeviceOptions::kAutoDevice;
  uint64_t seed = 1;
  bool json = false;
};

// One measurement of the benchmark: Run() measures, then the results go into the table
// and the JSON object.
class Measurement {
 public:
  virtual ~Measurement() = default;
  virtual Status Run() = 0;
  virtual void PrintTable() const = 0;
  virtual void AddJson(JsonLine& j) const = 0;
  // Blocks whose bytes came back wrong (0 = every check passed).
  virtual uint64_t corrupt_blocks() const = 0;
};

// Microseconds per launch of `launch`, timed with events over `iterations` launches
// back to back on the default stream, after a warm-up.
template <typename F>
Result<double> TimeLaunchesUs(F launch, uint32_t iterations) {
  KVTIER_RETURN_IF_ERROR(launch());
  KVTIER_ASSIGN_OR_RETURN(cuda::Event start, cuda::Event::Create(/*timing=*/true));
  KVTIER_ASSIGN_OR_RETURN(cuda::Event stop, cuda::Event::Create(/*timing=*/true));
  KVTIER_RETURN_IF_ERROR(start.Record(nullptr));
  for (uint32_t i = 0; i < iterations; ++i) KVTIER_RETURN_IF_ERROR(launch());
  KVTIER_RETURN_IF_ERROR(stop.Record(nullptr));
  KVTIER_RETURN_IF_ERROR(stop.Synchronize());
  KVTIER_ASSIGN_OR_RETURN(float ms, cuda::Event::ElapsedMs(start, stop));
  return double(ms) * 1e3 / iterations;
}

// GB/s read by a device-to-device copy of 1 GiB (2 bytes of traffic per byte copied):
// the device's practical memory bandwidth, the denominator of the kernels' bounds.
Result<double> DeviceCopyGbps() {
  const uint64_t bytes = uint64_t{1} << 30;
  void* src = nullptr;
  void* dst = nullptr;
  Status st = cuda::DeviceMalloc(bytes, &src);
  if (st.ok()) st = cuda::DeviceMalloc(bytes, &dst);
  Result<double> us =
      st.ok() ? TimeLaunchesUs([&] { return cuda::MemcpyAsync(dst, src, bytes, nullptr); }, 10)
              : Result<double>(st);
  (void)cuda::DeviceFree(src);
  (void)cuda::DeviceFree(dst);
  if (!us.ok()) return us.status();
  return 2.0 * double(bytes) / (*us * 1e3);
}

// --- Transfer: batched block copies against one large cudaMemcpy -------------------

class TransferMeasurement : public Measurement {
 public:
  static Result<std::unique_ptr<TransferMeasurement>> Create(const GpuConfig& config) {
    const uint64_t block = config.block_kib * 1024;
    const uint32_t n = config.batch_blocks;
    KVTIER_ASSIGN_OR_RETURN(
        std::unique_ptr<DevicePool> pool,
        DevicePool::Create(block, uint64_t{n} * ((block + 255) / 256 * 256),
                           DeviceOptions{.device = config.device, .require_device = true}));
    // Host slots [0, n) are the sources, [n, 2n) the destinations.
    KVTIER_ASSIGN_OR_RETURN(
        std::unique_ptr<HostPool> host,
        HostPool::Create(block, 2 * uint64_t{n} * ((block + 4095) / 4096 * 4096),
                         HostMemoryKind::kCudaPinned));
    KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<CopyEngine> engine, CopyEngine::Create(*pool));
    engine->AddPinnedRange(host->region().data(), host->region().size());
    auto m = std::unique_ptr<TransferMeasurement>(
        new TransferMeasurement(config, std::move(pool), std::move(host), std::move(engine)));
    KVTIER_RETURN_IF_ERROR(m->Prepare());
    return m;
  }

  Status Run() override {
    for (uint32_t rep = 0; rep <= config_.reps; ++rep) {  // rep 0 warms up
      const bool timed = rep > 0;
      const bool verify = rep == 0 || rep == config_.reps;
      if (verify) {
        for (uint32_t i = 0; i < n_; ++i) std::memset(Destination(i), 0x5A, block_);
      }
      CopyEvent done;
      Status failure;
      const double h2d = TimeSeconds([&] {
        failure = engine_->CopyToDevice(up_, &done);
        if (failure.ok()) failure = done.Wait();
      });
      KVTIER_RETURN_IF_ERROR(failure.WithContext("batched copy to device"));
      const double d2h = TimeSeconds([&] {
        failure = engine_->CopyToHost(down_, &done);
        if (failure.ok()) failure = done.Wait();
      });
      KVTIER_RETURN_IF_ERROR(failure.WithContext("batched copy to host"));
      if (verify) Verify();
      // The peak: the same bytes, one contiguous cudaMemcpy each way.
      const double h2d_peak =
          TimeSeconds([&] { failure = cuda::Memcpy(pool_->base(), host_->SlotData(0), bytes_); });
      KVTIER_RETURN_IF_ERROR(failure.WithContext("cudaMemcpy to device"));
      const double d2h_peak =
          TimeSeconds([&] { failure = cuda::Memcpy(Destination(0), pool_->base(), bytes_); });
      KVTIER_RETURN_IF_ERROR(failure.WithContext("cudaMemcpy to host"));
      if (timed) {
        h2d_.push_back(Gbps(h2d));
        d2h_.push_back(Gbps(d2h));
        h2d_peak_.push_back(Gbps(h2d_peak));
        d2h_peak_.push_back(Gbps(d2h_peak));
      }
    }
    return Status::OK();
  }

  void PrintTable() const override {
    std::printf(
        "  transfer: %u blocks of %llu KiB per batch (%.0f MiB), %u repetitions after a "
        "warm-up; medians\n",
        n_, static_cast<unsigned long long>(block_ / 1024), double(bytes_) / double(kMiB),
        config_.reps);
    std::printf("  host side: pinned host slots; device side: %u slots in shuffled order\n",
                pool_->slot_count());
    std::printf("  batched submissions: %.1f per batch, %s\n", SubmissionsPerBatch(),
                BatchApiUsed() ? "cudaMemcpyBatchAsync" : "one cudaMemcpyAsync per block");
    std::printf("  %-14s %13s %15s %7s   %s\n", "direction", "batched GB/s", "cudaMemcpy GB/s",
                "ratio", "batched min..max");
    auto row = [](const char* name, const std::vector<double>& b, const std::vector<double>& p) {
      std::printf("  %-14s %13.2f %15.2f %7.3f   %.2f..%.2f\n", name, Median(b), Median(p),
                  Median(b) / Median(p), *std::min_element(b.begin(), b.end()),
                  *std::max_element(b.begin(), b.end()));
    };
    row("host->device", h2d_, h2d_peak_);
    row("device->host", d2h_, d2h_peak_);
    std::printf("  verified byte-exact: %llu blocks copied back, %llu corrupt\n",
                static_cast<unsigned long long>(verified_),
                static_cast<unsigned long long>(corrupt_));
  }

  void AddJson(JsonLine& j) const override {
    j.Add("block_bytes", block_);
    j.Add("batch_blocks", n_);
    j.Add("batch_bytes", bytes_);
    j.Add("reps", config_.reps);
    j.Add("batch_api", BatchApiUsed());
    j.Add("submissions_per_batch", SubmissionsPerBatch());
    j.Add("h2d_batched_gbps", Median(h2d_));
    j.Add("h2d_peak_gbps", Median(h2d_peak_));
    j.Add("h2d_ratio", Median(h2d_) / Median(h2d_peak_));
    j.Add("d2h_batched_gbps", Median(d2h_));
    j.Add("d2h_peak_gbps", Median(d2h_peak_));
    j.Add("d2h_ratio", Median(d2h_) / Median(d2h_peak_));
    j.Add("verified_blocks", verified_);
    j.Add("corrupt_blocks", corrupt_);
  }

  uint64_t corrupt_blocks() const override { return corrupt_; }

 private:
  TransferMeasurement(const GpuConfig& config, std::unique_ptr<DevicePool> pool,
                      std::unique_ptr<HostPool> host, std::unique_ptr<CopyEngine> engine)
      : config_(config),
        block_(pool->block_bytes()),
        n_(config.batch_blocks),
        bytes_(uint64_t{n_} * block_),
        pool_(std::move(pool)),
        host_(std::move(host)),
        engine_(std::move(engine)) {}

  // Sources filled with a pattern each; one copy op per block each way, the device
  // slots in shuffled order.
  Status Prepare() {
    std::vector<SlotId> slots(pool_->slot_count());
    std::iota(slots.begin(), slots.end(), 0);
    std::mt19937_64 rng(config_.seed);
    std::shuffle(slots.begin(), slots.end(), rng);
    for (uint32_t i = 0; i < n_; ++i) {
      KVTIER_RETURN_IF_ERROR(FillPatternRef(Seed(i), host_->SlotData(i), block_, nullptr));
      up_.push_back(CopyOp{host_->SlotData(i), pool_->SlotData(slots[i]), block_});
      down_.push_back(CopyOp{pool_->SlotData(slots[i]), Destination(i), block_});
    }
    return Status::OK();
  }

  std::byte* Destination(uint32_t i) const { return host_->SlotData(n_ + i); }
  uint64_t Seed(uint32_t i) const { return PatternWord(config_.seed, i); }
  double Gbps(double seconds) const { return double(bytes_) / seconds / kBytesPerGB; }
  double SubmissionsPerBatch() const {
    const CopyEngine::Stats s = engine_->stats();
    return s.calls == 0 ? 0.0 : double(s.submissions) / double(s.calls);
  }
  bool BatchApiUsed() const { return engine_->stats().batched_submissions > 0; }

  void Verify() {
    for (uint32_t i = 0; i < n_; ++i) {
      const uint64_t at = FindPatternMismatch(Seed(i), Destination(i), block_);
      if (at == block_) {
        ++verified_;
      } else {
        ++corrupt_;
        std::fprintf(stderr, "kvtier-bench gpu: block %u differs at byte %llu\n", i,
                     static_cast<unsigned long long>(at));
      }
    }
  }

  const GpuConfig config_;
  const uint64_t block_;
  const uint32_t n_;
  const uint64_t bytes_;
  std::unique_ptr<DevicePool> pool_;
  std::unique_ptr<HostPool> host_;
  std::unique_ptr<CopyEngine> engine_;
  std::vector<CopyOp> up_, down_;
  std::vector<double> h2d_, d2h_, h2d_peak_, d2h_peak_;  // GB/s per repetition
  uint64_t verified_ = 0;
  uint64_t corrupt_ = 0;
};

// --- Scoring: the block-scoring and top-k kernels against the bandwidth bound ------
//
// One layer of Llama-3-8B (32 query heads, 8 KV heads, head dim 128) with one float
// representative per block and KV head (kMeanDot) at 128K and 1M tokens (1024 and 8192
// blocks of 128 tokens). The bound: reading the representatives once at the device's
// measured copy bandwidth (a device-to-device cudaMemcpy moves 2 bytes of traffic per
// byte copied). Kernels are timed back to back with events, so launch overhead shows
// only where the GPU would idle between layers too.

class ScoringMeasurement : public Measurement {
 public:
  static constexpr uint32_t kTokens[] = {131072, 1048576};
  static constexpr uint32_t kIterations = 200;
  static constexpr uint32_t kTopK = 16;

  explicit ScoringMeasurement(const GpuConfig& config) : config_(config) {}
  ~ScoringMeasurement() override {
    for (void* p : {queries_, reps_, scores_, top_, workspace_}) {
      if (p != nullptr) (void)cuda::DeviceFree(p);
    }
  }

  Status Run() override {
    KVTIER_ASSIGN_OR_RETURN(copy_gbps_, DeviceCopyGbps());
    for (uint32_t tokens : kTokens) {
      Row row;
      row.tokens = tokens;
      row.shape = BlockScoringShape{.num_blocks = tokens / 128,
                                    .num_query_heads = 32,
                                    .num_kv_heads = 8,
                                    .head_dim = 128,
                                    .reps_per_block = 1,
                                    .mode = BlockScoreMode::kMeanDot,
                                    .selection = BlockSelection::kPerLayer};
      KVTIER_RETURN_IF_ERROR(Prepare(row.shape));
      const uint32_t n = row.shape.num_blocks;
      KVTIER_ASSIGN_OR_RETURN(row.score_us, TimeUs([&] {
                                return LaunchScoreBlocks(row.shape,
                                                         static_cast<const float*>(queries_),
                                                         static_cast<const float*>(reps_),
                                                         static_cast<float*>(scores_), nullptr);
                              }));
      KVTIER_ASSIGN_OR_RETURN(row.topk_us, TimeUs([&] {
                                return LaunchTopKBlocks(static_cast<const float*>(scores_), 1, n,
                                                        kTopK, static_cast<int32_t*>(top_),
                                                        workspace_, workspace_bytes_, nullptr);
                              }));
      row.bytes = ScoreBlocksBytesPerBlock(row.shape) * n;
      row.bound_us = double(row.bytes) / (copy_gbps_ * 1e3);
      KVTIER_RETURN_IF_ERROR(Check(row.shape));
      rows_.push_back(row);
    }
    return Status::OK();
  }

  void PrintTable() const override {
    std::printf(
        "  scoring: Llama-3-8B layer (32 q heads, 8 kv heads, d 128), 1 representative per "
        "block and kv head, top-%u; device copy bandwidth %.0f GB/s\n",
        kTopK, copy_gbps_);
    std::printf("  %-9s %7s %10s %10s %10s %9s %8s\n", "tokens", "blocks", "reps MiB", "score us",
                "bound us", "ratio", "top-k us");
    for (const Row& r : rows_) {
      std::printf("  %-9u %7u %10.2f %10.2f %10.2f %9.3f %8.2f\n", r.tokens, r.shape.num_blocks,
                  double(r.bytes) / double(kMiB), r.score_us, r.bound_us, r.bound_us / r.score_us,
                  r.topk_us);
    }
    std::printf("  scores and top-k checked against the CPU reference: %s\n",
                mismatches_ == 0 ? "equal" : "DIFFERENT");
  }

  void AddJson(JsonLine& j) const override {
    j.Add("device_copy_gbps", copy_gbps_);
    for (const Row& r : rows_) {
      const std::string t = r.tokens == 131072 ? "128k" : "1m";
      j.Add("score_us_" + t, r.score_us);
      j.Add("score_bound_us_" + t, r.bound_us);
      j.Add("score_ratio_" + t, r.bound_us / r.score_us);
      j.Add("topk_us_" + t, r.topk_us);
    }
    j.Add("scoring_mismatches", mismatches_);
  }

  uint64_t corrupt_blocks() const override { return mismatches_; }

 private:
  struct Row {
    uint32_t tokens = 0;
    BlockScoringShape shape;
    uint64_t bytes = 0;
    double score_us = 0, bound_us = 0, topk_us = 0;
  };

  // Random queries and representatives (never zeros) for `shape`, on the device.
  Status Prepare(const BlockScoringShape& shape) {
    for (void* p : {queries_, reps_, scores_, top_, workspace_}) {
      if (p != nullptr) (void)cuda::DeviceFree(p);
    }
    queries_ = reps_ = scores_ = top_ = workspace_ = nullptr;
    std::mt19937_64 rng(config_.seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    host_queries_.resize(uint64_t{shape.num_query_heads} * shape.head_dim);
    host_reps_.resize(uint64_t{shape.num_blocks} * shape.num_kv_heads * shape.head_dim);
    for (float& v : host_queries_) v = normal(rng);
    for (float& v : host_reps_) v = normal(rng);
    KVTIER_RETURN_IF_ERROR(Upload(host_queries_, &queries_));
    KVTIER_RETURN_IF_ERROR(Upload(host_reps_, &reps_));
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(uint64_t{shape.num_blocks} * 4, &scores_));
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(uint64_t{kTopK} * 4, &top_));
    KVTIER_ASSIGN_OR_RETURN(workspace_bytes_, TopKWorkspaceBytes(1, shape.num_blocks, kTopK));
    if (workspace_bytes_ > 0) {
      KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(workspace_bytes_, &workspace_));
    }
    return Status::OK();
  }

  static Status Upload(const std::vector<float>& host, void** device) {
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(host.size() * 4, device));
    return cuda::Memcpy(*device, host.data(), host.size() * 4);
  }

  // The last run's top-k against the reference's (identical scores give identical
  // results; the kernel's scores agree to float rounding, so compare the top-k of the
  // kernel's own scores).
  Status Check(const BlockScoringShape& shape) {
    const uint32_t n = shape.num_blocks;
    std::vector<float> scores(n), ref_scores(n);
    std::vector<int32_t> top(kTopK), ref_top(kTopK);
    KVTIER_RETURN_IF_ERROR(cuda::Memcpy(scores.data(), scores_, uint64_t{n} * 4));
    KVTIER_RETURN_IF_ERROR(cuda::Memcpy(top.data(), top_, uint64_t{kTopK} * 4));
    KVTIER_RETURN_IF_ERROR(
        ScoreBlocksRef(shape, host_queries_.data(), host_reps_.data(), ref_scores.data(), nullptr));
    for (uint32_t i = 0; i < n; ++i) {
      if (!(std::fabs(scores[i] - ref_scores[i]) <= 1e-3f * (1.0f + std::fabs(ref_scores[i])))) {
        ++mismatches_;
      }
    }
    KVTIER_RETURN_IF_ERROR(
        TopKBlocksRef(scores.data(), 1, n, kTopK, ref_top.data(), nullptr, 0, nullptr));
    if (top != ref_top) ++mismatches_;
    return Status::OK();
  }

  template <typename F>
  static Result<double> TimeUs(F launch) {
    return TimeLaunchesUs(launch, kIterations);
  }

  const GpuConfig config_;
  double copy_gbps_ = 0;
  void* queries_ = nullptr;
  void* reps_ = nullptr;
  void* scores_ = nullptr;
  void* top_ = nullptr;
  void* workspace_ = nullptr;
  uint64_t workspace_bytes_ = 0;
  std::vector<float> host_queries_, host_reps_;
  std::vector<Row> rows_;
  uint64_t mismatches_ = 0;
};

// --- Estimator: the kGpu index's Select at 1M tokens ---------------------------------
//
// One layer of Llama-3-8B at 1M tokens: 8192 blocks of 128 tokens, 32 query heads, 8 KV
// heads, head dim 128, 3 cluster rows per block and KV head (the default summary), one
// sink block and a 32-block local window outside the candidates, top-16. Two timings:
//   kernels  EstimateBlockMass + TopKBlocks (+ GatherBlockScores) back to back on the
//            default stream, timed with events: the device time of one Select.
//   select   LayerIndex::Select of a kGpu index holding the same blocks, wall clock per
//            call (median): query upload, the kernels, the copy back, the synchronization
//            and the host's id mapping. Target on an H100: <= 20 us per layer.
// The bound: EstimateBlockMassBytesPerBlock plus top-k's read of the scores (4 bytes) per
// block, at the device's measured copy bandwidth. Checks: the kernel's scores against
// EstimateBlockMassRef (5e-5 relative), its top-k against TopKBlocksRef of the same
// scores, and the index's picks against the same index emulated on the host (equal, or
// tied within 5e-5).

class EstimatorMeasurement : public Measurement {
 public:
  static constexpr uint32_t kBlocks = 8192;
  static constexpr uint32_t kTopK = 16;
  static constexpr uint32_t kSinkBlocks = 1;
  static constexpr uint32_t kLocalBlocks = 32;
  static constexpr uint32_t kIterations = 200;

  explicit EstimatorMeasurement(const GpuConfig& config) : config_(config) {
    config_index_.num_query_heads = 32;
    config_index_.summary = SummaryShape{8, 128, 128, DType::kBF16, SummaryKind::kClusters, 3};
    config_index_.backend = IndexBackend::kGpu;
    shape_ = BlockMassShape{.num_blocks = kBlocks,
                            .block_capacity = kBlocks,
                            .num_query_heads = 32,
                            .num_kv_heads = 8,
                            .head_dim = 128,
                            .rows = 3,
                            .selection = BlockSelection::kPerLayer};
  }
  ~EstimatorMeasurement() override {
    for (void* p : {queries_, rows_, log_weights_, flags_, scores_, workspace_, top_,
                    topk_workspace_, picked_}) {
      if (p != nullptr) (void)cuda::DeviceFree(p);
    }
  }

  Status Run() override {
    KVTIER_ASSIGN_OR_RETURN(copy_gbps_, DeviceCopyGbps());
    KVTIER_RETURN_IF_ERROR(Prepare());
    const uint32_t k = kTopK + kSinkBlocks + kLocalBlocks;
    KVTIER_ASSIGN_OR_RETURN(kernels_us_,
                            TimeLaunchesUs([&] { return LaunchKernels(k); }, kIterations));
    KVTIER_RETURN_IF_ERROR(CheckKernels(k));
    KVTIER_RETURN_IF_ERROR(TimeSelect());
    bytes_ = (EstimateBlockMassBytesPerBlock(shape_) + 4) * kBlocks;
    bound_us_ = double(bytes_) / (copy_gbps_ * 1e3);
    return Status::OK();
  }

  void PrintTable() const override {
    std::printf(
        "  estimator (kGpu Select): Llama-3-8B layer at 1M tokens (%u blocks, 32 q heads, 8 kv "
        "heads, d 128, 3 rows), top-%u; target on an H100: <= 20 us per layer\n",
        kBlocks, kTopK);
    std::printf("  %10s %12s %10s %9s %10s %10s\n", "bytes MiB", "kernels us", "bound us", "ratio",
                "select us", "select p90");
    std::printf("  %10.2f %12.2f %10.2f %9.3f %10.2f %10.2f\n", double(bytes_) / double(kMiB),
                kernels_us_, bound_us_, bound_us_ / kernels_us_, select_us_, select_p90_us_);
    std::printf(
        "  kernels checked against the CPU reference, Select against the emulated index: %s\n",
        mismatches_ == 0 ? "equal" : "DIFFERENT");
  }

  void AddJson(JsonLine& j) const override {
    j.Add("estimator_bytes_per_block", EstimateBlockMassBytesPerBlock(shape_) + 4);
    j.Add("estimator_kernels_us_1m", kernels_us_);
    j.Add("estimator_bound_us_1m", bound_us_);
    j.Add("estimator_ratio_1m", bound_us_ / kernels_us_);
    j.Add("estimator_select_us_1m", select_us_);
    j.Add("estimator_select_p90_us_1m", select_p90_us_);
    j.Add("estimator_mismatches", mismatches_);
  }

  uint64_t corrupt_blocks() const override { return mismatches_; }

 private:
  // Random summaries (never zeros; an empty cluster now and then), a query, the flags.
  Status Prepare() {
    std::mt19937_64 rng(config_.seed + 17);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const SummaryShape& ss = config_index_.summary;
    summaries_.resize(kBlocks);
    for (BlockSummary& b : summaries_) {
      b.valid_tokens = 128;
      b.vectors.resize(ss.vector_elements());
      b.weights.resize(ss.weight_elements());
      const float offset = 0.7f * normal(rng);
      for (uint16_t& v : b.vectors) v = FloatToHalfBits(normal(rng) + offset);
      for (float& w : b.weights) w = rng() % 10 == 0 ? 0.0f : float(1 + rng() % 80);
    }
    const float scale = 1.0f / std::sqrt(128.0f);
    raw_queries_.resize(32 * 128);
    for (float& q : raw_queries_) q = normal(rng);
    host_queries_.resize(raw_queries_.size());
    for (size_t i = 0; i < raw_queries_.size(); ++i) host_queries_[i] = raw_queries_[i] * scale;
    // Device layout [kv][block][row][d] and [kv][block][row].
    host_rows_.resize(uint64_t{8} * kBlocks * 3 * 128);
    host_log_weights_.resize(uint64_t{8} * kBlocks * 3);
    for (uint32_t b = 0; b < kBlocks; ++b) {
      for (uint32_t kv = 0; kv < 8; ++kv) {
        for (uint32_t j = 0; j < 3; ++j) {
          const uint64_t r = MassRowIndex(shape_, kv, b, j);
          std::memcpy(host_rows_.data() + r * 128,
                      summaries_[b].vectors.data() + (uint64_t{kv} * 3 + j) * 128, 256);
          const float w = summaries_[b].weights[kv * 3 + j];
          host_log_weights_[r] = w > 0 ? std::log(w) : -INFINITY;
        }
      }
    }
    host_flags_.assign(kBlocks, 1);
    for (uint32_t b = 0; b < kSinkBlocks; ++b) host_flags_[b] = 0;
    for (uint32_t b = kBlocks - kLocalBlocks; b < kBlocks; ++b) host_flags_[b] = 0;
    KVTIER_RETURN_IF_ERROR(Upload(host_queries_.data(), host_queries_.size() * 4, &queries_));
    KVTIER_RETURN_IF_ERROR(Upload(host_rows_.data(), host_rows_.size() * 2, &rows_));
    KVTIER_RETURN_IF_ERROR(
        Upload(host_log_weights_.data(), host_log_weights_.size() * 4, &log_weights_));
    KVTIER_RETURN_IF_ERROR(Upload(host_flags_.data(), host_flags_.size(), &flags_));
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(uint64_t{kBlocks} * 4, &scores_));
    workspace_bytes_ = EstimateBlockMassWorkspaceBytes(shape_);
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(workspace_bytes_, &workspace_));
    const uint32_t k = kTopK + kSinkBlocks + kLocalBlocks;
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(uint64_t{k} * 4, &top_));
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(uint64_t{k} * 4, &picked_));
    KVTIER_ASSIGN_OR_RETURN(topk_workspace_bytes_, TopKWorkspaceBytes(1, kBlocks, k));
    if (topk_workspace_bytes_ > 0) {
      KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(topk_workspace_bytes_, &topk_workspace_));
    }
    return Status::OK();
  }

  static Status Upload(const void* host, uint64_t bytes, void** device) {
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(bytes, device));
    return cuda::Memcpy(*device, host, bytes);
  }

  Status LaunchKernels(uint32_t k) {
    KVTIER_RETURN_IF_ERROR(LaunchEstimateBlockMass(
        shape_, static_cast<const float*>(queries_), static_cast<const uint16_t*>(rows_),
        static_cast<const float*>(log_weights_), static_cast<const uint8_t*>(flags_),
        static_cast<float*>(scores_), workspace_, workspace_bytes_, nullptr));
    KVTIER_RETURN_IF_ERROR(LaunchTopKBlocks(static_cast<const float*>(scores_), 1, kBlocks, k,
                                            static_cast<int32_t*>(top_), topk_workspace_,
                                            topk_workspace_bytes_, nullptr));
    return LaunchGatherBlockScores(static_cast<const float*>(scores_), 1, kBlocks,
                                   static_cast<const int32_t*>(top_), k,
                                   static_cast<float*>(picked_), nullptr);
  }

  Status CheckKernels(uint32_t k) {
    std::vector<float> got(kBlocks), want(kBlocks);
    std::vector<int32_t> top(k), want_top(k);
    KVTIER_RETURN_IF_ERROR(cuda::Memcpy(got.data(), scores_, uint64_t{kBlocks} * 4));
    KVTIER_RETURN_IF_ERROR(cuda::Memcpy(top.data(), top_, uint64_t{k} * 4));
    std::vector<uint64_t> ws(workspace_bytes_ / 8 + 1);
    KVTIER_RETURN_IF_ERROR(EstimateBlockMassRef(shape_, host_queries_.data(), host_rows_.data(),
                                                host_log_weights_.data(), host_flags_.data(),
                                                want.data(), ws.data(), workspace_bytes_, nullptr));
    for (uint32_t i = 0; i < kBlocks; ++i) {
      const bool same = want[i] == -INFINITY ? got[i] == -INFINITY
                                             : std::fabs(got[i] - want[i]) <= 5e-5f * want[i];
      if (!same) ++mismatches_;
    }
    KVTIER_RETURN_IF_ERROR(
        TopKBlocksRef(got.data(), 1, kBlocks, k, want_top.data(), nullptr, 0, nullptr));
    if (top != want_top) ++mismatches_;
    return Status::OK();
  }

  // Select on a kGpu index of the same blocks, and once on the emulated index.
  Status TimeSelect() {
    KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndex> index, CreateGpuIndex(config_index_));
    if (!GpuIndexOnDevice(*index)) return Status::Internal("the gpu index is not on the device");
    KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<LayerIndex> emulated,
                            CreateGpuIndex(config_index_, /*force_emulated=*/true));
    for (uint32_t b = 0; b < kBlocks; ++b) {
      KVTIER_RETURN_IF_ERROR(index->Add(b, summaries_[b]));
      KVTIER_RETURN_IF_ERROR(emulated->Add(b, summaries_[b]));
    }
    const SelectParams p{raw_queries_, kTopK, SelectionScope::kPerLayer, kSinkBlocks,
                         kBlocks - kLocalBlocks};
    std::vector<int64_t> out(kTopK), want(kTopK);
    std::vector<float> scores(kTopK), want_scores(kTopK);
    KVTIER_RETURN_IF_ERROR(index->Select(p, out, scores));  // warm-up: buffers grow
    std::vector<double> us;
    Status failure;
    for (uint32_t i = 0; i < kIterations; ++i) {
      us.push_back(1e6 * TimeSeconds([&] { failure = index->Select(p, out, scores); }));
      KVTIER_RETURN_IF_ERROR(failure);
    }
    std::sort(us.begin(), us.end());
    select_us_ = Median(us);
    select_p90_us_ = us[us.size() * 9 / 10];
    KVTIER_RETURN_IF_ERROR(emulated->Select(p, want, want_scores));
    for (uint32_t i = 0; i < kTopK; ++i) {
      if (!(std::fabs(scores[i] - want_scores[i]) <= 5e-5f * want_scores[i])) ++mismatches_;
    }
    return Status::OK();
  }

  const GpuConfig config_;
  IndexConfig config_index_;
  BlockMassShape shape_;
  double copy_gbps_ = 0, kernels_us_ = 0, bound_us_ = 0, select_us_ = 0, select_p90_us_ = 0;
  uint64_t bytes_ = 0;
  std::vector<BlockSummary> summaries_;
  std::vector<float> raw_queries_, host_queries_, host_log_weights_;
  std::vector<uint16_t> host_rows_;
  std::vector<uint8_t> host_flags_;
  void* queries_ = nullptr;
  void* rows_ = nullptr;
  void* log_weights_ = nullptr;
  void* flags_ = nullptr;
  void* scores_ = nullptr;
  void* workspace_ = nullptr;
  uint64_t workspace_bytes_ = 0;
  void* top_ = nullptr;
  void* topk_workspace_ = nullptr;
  uint64_t topk_workspace_bytes_ = 0;
  void* picked_ = nullptr;
  uint64_t mismatches_ = 0;
};

// --- Driver -------------------------------------------------------------------------

std::string DeviceDescription(int device) {
  Result<std::string> name = cuda::DeviceName(device);
  return "CUDA device " + std::to_string(device) + " (" +
         (name.ok() ? *name : name.status().ToString()) + ")";
}

int RunGpu(const GpuConfig& config) {
  if (!cuda::HasDevice()) {
    const std::string reason = cuda::Devices().reason;
    if (config.json) {
      JsonLine j;
      j.Add("bench", "gpu");
      j.Add("gpu", false);
      j.Add("reason", reason);
      std::printf("%s\n", j.str().c_str());
    } else {
      std::printf("kvtier-bench gpu: no CUDA device (%s); nothing measured\n", reason.c_str());
    }
    return 0;
  }
  auto fail = [](const Status& s) {
    std::fprintf(stderr, "kvtier-bench gpu: %s\n", s.ToString().c_str());
    return 2;
  };
  int device = config.device;
  if (device == DeviceOptions::kAutoDevice) {
    Result<int> current = cuda::CurrentDevice();
    if (!current.ok()) return fail(current.status());
    device = *current;
  }

  std::vector<std::unique_ptr<Measurement>> measurements;
  Result<std::unique_ptr<TransferMeasurement>> transfer = TransferMeasurement::Create(config);
  if (!transfer.ok()) return fail(transfer.status());
  measurements.push_back(std::move(transfer).value());
  measurements.push_back(std::make_unique<ScoringMeasurement>(config));
  measurements.push_back(std::make_unique<EstimatorMeasurement>(config));

  for (auto& m : measurements) {
    if (Status s = m->Run(); !s.ok()) return fail(s);
  }
  uint64_t corrupt = 0;
  for (const auto& m : measurements) corrupt += m->corrupt_blocks();
  if (config.json) {
    JsonLine j;
    j.Add("bench", "gpu");
    j.Add("gpu", true);
    j.Add("device", DeviceDescription(device));
    for (const auto& m : measurements) m->AddJson(j);
    std::printf("%s\n", j.str().c_str());
  } else {
    std::printf("kvtier-bench gpu: %s\n", DeviceDescription(device).c_str());
    for (const auto& m : measurements) m->PrintTable();
  }
  return corrupt == 0 ? 0 : 1;
}

}  // namespace

void AddGpuCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<GpuConfig>();
  CLI::App* cmd = app.add_subcommand(
      "gpu",
      "Device tier: batched host<->device block copies against one large cudaMemcpy, and "
      "the block-scoring kernel against the bandwidth bound");
  cmd->footer("Example: kvtier-bench gpu --batch-blocks 256 --reps 9 --json");
  cmd->add_option("--block-kib", config->block_kib, "Block size, KiB")
      ->capture_default_str()
      ->check(CLI::Range(uint64_t{4}, uint64_t{64} << 10));
  cmd->add_option("--batch-blocks", config->batch_blocks, "Blocks per batched copy")
      ->capture_default_str()
      ->check(CLI::Range(1u, 65536u));
  cmd->add_option("--reps", config->reps, "Timed repetitions (after one warm-up); medians")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1000u));
  cmd->add_option("--device", config->device, "CUDA device ordinal (-1: the current device)")
      ->capture_default_str()
      ->check(CLI::Range(-1, 1 << 16));
  cmd->add_option("--seed", config->seed, "Seed of the synthetic data and the slot order")
      ->capture_default_str();
  cmd->add_flag("--json", config->json, "Print one JSON object (one line) instead of the table");
  cmd->callback([config, exit_code] { *exit_code = RunGpu(*config); });
}

}  // namespace kvtier::bench
