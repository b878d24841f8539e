// EstimateBlockMass and GatherBlockScores (kernels/cluster_scoring.h) on the GPU against
// their CPU references on fresh random inputs (seeded from std::random_device; the seed
// is printed on failure), and the kGpu index on the device against the same index
// emulated on the host. Skips without a device.
//
// Tolerances: scores within 5e-5 relative of the reference's (both float, summed in
// different orders; see the header), never NaN; non-candidates -infinity exactly; the
// GPU's top-k of its own scores equal to the reference top-k of those scores, and its
// gathered scores equal to theirs bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "index/backends.h"
#include "index/layer_index.h"
#include "kernels/block_scoring.h"
#include "kernels/cluster_scoring.h"
#include "kernels/cuda_runtime.h"
#include "kernels/dtype_convert.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {
namespace {

#if KVTIER_WITH_CUDA

// Device memory, freed on scope exit; `ptr` is null when cudaMalloc failed.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(uint64_t bytes) {
    if (cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  bool ok() const { return ptr_ != nullptr; }
  bool Upload(const void* src, uint64_t n, uint64_t offset = 0) {
    return cudaMemcpy(static_cast<char*>(ptr_) + offset, src, n, cudaMemcpyHostToDevice) ==
           cudaSuccess;
  }
  bool Download(void* dst, uint64_t n) const {
    return cudaMemcpy(dst, ptr_, n, cudaMemcpyDeviceToHost) == cudaSuccess;
  }

 private:
  void* ptr_ = nullptr;
};

struct Case {
  uint32_t hq, kv, d, rows, n, capacity;
  BlockSelection selection;
  bool candidates;
  bool misaligned;  // rows 2 bytes past a 16-byte boundary: the scalar path
};

std::string Describe(const Case& c, uint64_t seed) {
  return "seed " + std::to_string(seed) + " hq " + std::to_string(c.hq) + " kv " +
         std::to_string(c.kv) + " d " + std::to_string(c.d) + " rows " + std::to_string(c.rows) +
         " N " + std::to_string(c.n) + " capacity " + std::to_string(c.capacity) +
         (c.selection == BlockSelection::kPerLayer ? " per layer" : " per kv head") +
         (c.candidates ? " candidates" : "") + (c.misaligned ? " misaligned" : "");
}

void CheckCase(const Case& c, std::mt19937_64& rng, uint64_t seed) {
  SCOPED_TRACE(Describe(c, seed));
  const BlockMassShape s{.num_blocks = c.n,
                         .block_capacity = c.capacity,
                         .num_query_heads = c.hq,
                         .num_kv_heads = c.kv,
                         .head_dim = c.d,
                         .rows = c.rows,
                         .selection = c.selection};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> weight(1.0f, 40.0f);
  std::vector<float> queries(uint64_t{c.hq} * c.d);
  for (float& q : queries) q = 2.0f * normal(rng) / std::sqrt(float(c.d));
  const uint64_t all_rows = uint64_t{c.kv} * c.capacity * c.rows;
  std::vector<uint16_t> rows(all_rows * c.d);
  std::vector<float> lw(all_rows);
  for (uint64_t r = 0; r < all_rows; ++r) {
    const bool empty = rng() % 11 == 0;
    const float offset = 0.7f * normal(rng);
    for (uint32_t i = 0; i < c.d; ++i) {
      const float outlier = i % 13 == 5 ? 6.0f : 1.0f;
      rows[r * c.d + i] = empty ? 0 : FloatToHalfBits(outlier * (normal(rng) + offset));
    }
    lw[r] = empty ? -INFINITY : std::log(weight(rng));
  }
  std::vector<uint8_t> flags;
  if (c.candidates) {
    flags.resize(c.n);
    for (uint8_t& f : flags) f = rng() % 5 != 0 ? 1 : 0;
  }
  const uint32_t score_rows = MassScoreRows(s);
  const uint64_t ws_bytes = EstimateBlockMassWorkspaceBytes(s);

  // Reference.
  std::vector<float> want(uint64_t{score_rows} * c.n);
  std::vector<uint64_t> host_ws(ws_bytes / 8 + 1);
  ASSERT_TRUE(EstimateBlockMassRef(s, queries.data(), rows.data(), lw.data(),
                                   flags.empty() ? nullptr : flags.data(), want.data(),
                                   host_ws.data(), ws_bytes, nullptr)
                  .ok());

  // Device.
  const uint64_t shift = c.misaligned ? 2 : 0;
  DeviceBuffer d_q(queries.size() * 4), d_rows(rows.size() * 2 + shift), d_lw(lw.size() * 4),
      d_flags(flags.size() + 1), d_scores(want.size() * 4), d_ws(ws_bytes);
  ASSERT_TRUE(d_q.ok() && d_rows.ok() && d_lw.ok() && d_flags.ok() && d_scores.ok() && d_ws.ok());
  ASSERT_TRUE(d_q.Upload(queries.data(), queries.size() * 4));
  ASSERT_TRUE(d_rows.Upload(rows.data(), rows.size() * 2, shift));
  ASSERT_TRUE(d_lw.Upload(lw.data(), lw.size() * 4));
  if (!flags.empty()) {
    ASSERT_TRUE(d_flags.Upload(flags.data(), flags.size()));
  }
  ASSERT_EQ(cudaMemset(d_scores.get(), 0xFF, want.size() * 4), cudaSuccess);  // NaN
  ASSERT_EQ(cudaMemset(d_ws.get(), 0xFF, ws_bytes), cudaSuccess);
  const auto* dev_rows = reinterpret_cast<const uint16_t*>(d_rows.get<char>() + shift);
  const Status st = LaunchEstimateBlockMass(s, d_q.get<float>(), dev_rows, d_lw.get<float>(),
                                            flags.empty() ? nullptr : d_flags.get<uint8_t>(),
                                            d_scores.get<float>(), d_ws.get(), ws_bytes, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got(want.size());
  ASSERT_TRUE(d_scores.Download(got.data(), got.size() * 4));
  for (uint64_t i = 0; i < got.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << "score " << i;
    if (want[i] == -INFINITY) {
      ASSERT_EQ(got[i], -INFINITY) << "score " << i;
      continue;
    }
    ASSERT_NEAR(got[i], want[i], 5e-5 * want[i] + 1e-30) << "score " << i;
  }

  // Top-k and gather of the GPU's scores against the references over the same scores.
  const uint32_t k = std::min<uint32_t>(c.n, 16 + (c.n > 100 ? 40 : 0));
  const Result<uint64_t> topk_bytes = TopKWorkspaceBytes(score_rows, c.n, k);
  ASSERT_TRUE(topk_bytes.ok()) << topk_bytes.status().ToString();
  DeviceBuffer d_top(uint64_t{score_rows} * k * 4), d_picked(uint64_t{score_rows} * k * 4),
      d_topk_ws(*topk_bytes);
  ASSERT_TRUE(d_top.ok() && d_picked.ok() && d_topk_ws.ok());
  ASSERT_TRUE(LaunchTopKBlocks(d_scores.get<float>(), score_rows, c.n, k, d_top.get<int32_t>(),
                               d_topk_ws.get(), *topk_bytes, nullptr)
                  .ok());
  ASSERT_TRUE(LaunchGatherBlockScores(d_scores.get<float>(), score_rows, c.n, d_top.get<int32_t>(),
                                      k, d_picked.get<float>(), nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<int32_t> top(uint64_t{score_rows} * k), want_top(top.size());
  std::vector<float> picked(top.size()), want_picked(top.size());
  ASSERT_TRUE(d_top.Download(top.data(), top.size() * 4));
  ASSERT_TRUE(d_picked.Download(picked.data(), picked.size() * 4));
  ASSERT_TRUE(
      TopKBlocksRef(got.data(), score_rows, c.n, k, want_top.data(), nullptr, 0, nullptr).ok());
  ASSERT_TRUE(GatherBlockScoresRef(got.data(), score_rows, c.n, want_top.data(), k,
                                   want_picked.data(), nullptr)
                  .ok());
  EXPECT_EQ(top, want_top);
  for (uint64_t i = 0; i < picked.size(); ++i) {
    EXPECT_EQ(FloatBits(picked[i]), FloatBits(want_picked[i])) << "pick " << i;
  }
}

TEST(ClusterScoringGpuTest, MatchesReference) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  const Case cases[] = {
      // Llama-3-8B, 3 rows; spare capacity; both scopes; candidates.
      {32, 8, 128, 3, 8192, 8192, BlockSelection::kPerLayer, true, false},
      {32, 8, 128, 3, 1000, 1024, BlockSelection::kPerKvHead, false, false},
      // Qwen2-7B's group of 7, head_dim 128, 4 rows.
      {28, 4, 128, 4, 777, 800, BlockSelection::kPerLayer, false, false},
      // One block; head_dim 64; one row.
      {8, 2, 64, 1, 1, 1, BlockSelection::kPerKvHead, true, false},
      // head_dim 256 (lanes span a warp), MHA (g = 1).
      {8, 8, 256, 2, 333, 400, BlockSelection::kPerLayer, true, false},
      // Scalar path: head_dim not a multiple of 8, then misaligned rows.
      {16, 2, 100, 3, 257, 300, BlockSelection::kPerKvHead, false, false},
      {16, 2, 128, 3, 257, 300, BlockSelection::kPerLayer, true, true},
      // Groups above one head batch (8), MQA with 32 heads, many rows.
      {32, 1, 128, 16, 500, 512, BlockSelection::kPerLayer, false, false},
      {24, 2, 64, 64, 70, 70, BlockSelection::kPerKvHead, true, false},
      // The group's queries above 48 KiB of shared memory (128 heads x 128 channels).
      {128, 1, 128, 3, 300, 300, BlockSelection::kPerLayer, false, false},
      // Tiny head_dim (a lane per team).
      {4, 2, 8, 3, 5000, 5000, BlockSelection::kPerLayer, false, false},
  };
  for (const Case& c : cases) ASSERT_NO_FATAL_FAILURE(CheckCase(c, rng, seed));
}

// The kGpu index on the device against the same index emulated on the host, through the
// same operations (adds past two capacity doublings, replacements, removals): equal
// picks but for near-ties, scores within 5e-5 relative.
TEST(ClusterScoringGpuTest, GpuIndexOnDeviceMatchesEmulated) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  IndexConfig c;
  c.num_query_heads = 32;
  c.summary = SummaryShape{8, 128, 128, DType::kBF16, SummaryKind::kClusters, 3};
  c.backend = IndexBackend::kGpu;
  auto device = CreateGpuIndex(c);
  auto host = CreateGpuIndex(c, /*force_emulated=*/true);
  ASSERT_TRUE(device.ok() && host.ok());
  ASSERT_TRUE(GpuIndexOnDevice(**device));
  ASSERT_FALSE(GpuIndexOnDevice(**host));
  auto summary = [&] {
    BlockSummary s;
    s.valid_tokens = 128;
    s.vectors.resize(c.summary.vector_elements());
    s.weights.resize(c.summary.weight_elements());
    for (uint16_t& v : s.vectors) v = FloatToHalfBits(normal(rng));
    for (float& w : s.weights) w = rng() % 7 == 0 ? 0.0f : float(1 + rng() % 60);
    return s;
  };
  for (int op = 0; op < 400; ++op) {
    const uint64_t id = rng() % 300;
    if (rng() % 5 != 0) {
      const BlockSummary s = summary();
      ASSERT_TRUE((*device)->Add(id, s).ok());
      ASSERT_TRUE((*host)->Add(id, s).ok());
    } else {
      ASSERT_EQ((*device)->Remove(id), (*host)->Remove(id));
    }
    if (op % 50 != 49) continue;
    std::vector<float> q(32 * 128);
    for (float& x : q) x = normal(rng);
    for (SelectionScope scope : {SelectionScope::kPerLayer, SelectionScope::kPerKvHead}) {
      const SelectParams p{q, 16, scope, 3, 280};
      const uint64_t size = SelectOutputSize(c, scope, 16);
      std::vector<int64_t> got(size), want(size);
      std::vector<float> got_scores(size), want_scores(size);
      ASSERT_TRUE((*device)->Select(p, got, got_scores).ok());
      ASSERT_TRUE((*host)->Select(p, want, want_scores).ok());
      for (uint64_t i = 0; i < size; ++i) {
        EXPECT_NEAR(got_scores[i], want_scores[i], 5e-5 * want_scores[i] + 1e-30) << i;
        if (got[i] != want[i]) {
          EXPECT_NEAR(got_scores[i], want_scores[i], 5e-5 * want_scores[i]) << "pick " << i;
        }
      }
    }
  }
}

#endif  // KVTIER_WITH_CUDA

TEST(ClusterScoringGpuTest, ReportsNoDeviceAsAStatus) {
  if (cuda::HasDevice()) GTEST_SKIP() << "a device is present";
  const BlockMassShape s{.num_blocks = 2,
                         .block_capacity = 2,
                         .num_query_heads = 2,
                         .num_kv_heads = 1,
                         .head_dim = 8,
                         .rows = 1};
  std::vector<float> q(16, 1.0f), lw(2, 0.0f), scores(2);
  std::vector<uint16_t> rows(16, FloatToHalfBits(1.0f));
  std::vector<uint64_t> ws(512);
  EXPECT_FALSE(LaunchEstimateBlockMass(s, q.data(), rows.data(), lw.data(), nullptr, scores.data(),
                                       ws.data(), ws.size() * 8, nullptr)
                   .ok());
  // The index falls back to emulation.
  IndexConfig c;
  c.num_query_heads = 2;
  c.summary = SummaryShape{1, 8, 16, DType::kBF16, SummaryKind::kMean, 1};
  c.backend = IndexBackend::kGpu;
  auto index = CreateLayerIndex(c);
  ASSERT_TRUE(index.ok()) << index.status().ToString();
  EXPECT_FALSE(GpuIndexOnDevice(**index));
}

}  // namespace
}  // namespace kvtier
