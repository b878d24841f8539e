// The retrieval kernels (representatives, block scoring, top-k) on the GPU against their
// CPU references. Skips without a device.
//
// Tolerances: top-R keys, min/max and every top-k of identical scores match exactly;
// means within 2 (n + 1) eps max|k| (two float sums of n keys in different orders);
// scores within max(1e-4, 2 (head_dim + R + g + kv_heads + 4) eps) times the sum of the
// absolute values of their terms (the scale at which float rounding acts). Top-k over
// scores computed on the GPU may pick other blocks than the reference only where the
// scores of the swapped blocks lie within those tolerances of each other.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "kernels/block_scoring.h"
#include "kernels/cuda_runtime.h"
#include "kernels/dtype_convert.h"
#include "kernels/representatives.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {
namespace {

#if KVTIER_WITH_CUDA

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Device memory, freed on scope exit; `ptr` is null when cudaMalloc failed.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(uint64_t bytes) : bytes_(bytes) {
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
  bool Poison() { return cudaMemset(ptr_, 0xFF, bytes_ == 0 ? 1 : bytes_) == cudaSuccess; }
  bool Upload(const void* src, uint64_t n) {
    return cudaMemcpy(ptr_, src, n, cudaMemcpyHostToDevice) == cudaSuccess;
  }
  bool Download(void* dst, uint64_t n) const {
    return cudaMemcpy(dst, ptr_, n, cudaMemcpyDeviceToHost) == cudaSuccess;
  }

 private:
  void* ptr_ = nullptr;
  uint64_t bytes_;
};

std::vector<float> RandomVector(uint64_t n, std::mt19937_64& rng, uint32_t head_dim = 0) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (uint64_t i = 0; i < n; ++i) {
    const bool outlier = head_dim != 0 && (i % head_dim) % 13 == 5;
    v[i] = normal(rng) * (outlier ? 15.0f : 1.0f);
  }
  return v;
}

// --- Representatives ------------------------------------------------------------------

// One representatives case: blocks scattered over a pool of slots (in a random order,
// `misalign_elems` elements past a 256-byte boundary), the same bytes on the host and
// the device; NaN values after the keys.
void CheckRepresentatives(const RepresentativeShape& s, bool partial, uint32_t misalign_elems,
                          std::mt19937_64& rng, uint64_t seed) {
  SCOPED_TRACE(::testing::Message()
               << "seed " << seed << " dtype " << DTypeName(s.dtype) << " head_dim " << s.head_dim
               << " block_tokens " << s.block_tokens << " kv_heads " << s.num_kv_heads << " mode "
               << int(s.mode) << " R " << s.top_r << " partial " << partial << " misalign "
               << misalign_elems);
  const uint32_t esize = DTypeBytes(s.dtype);
  const uint64_t key_elems = uint64_t{s.num_kv_heads} * s.block_tokens * s.head_dim;
  const uint64_t block_bytes = 2 * key_elems * esize;
  const uint64_t slot_bytes = (block_bytes + misalign_elems * esize + 255) / 256 * 256;
  const uint32_t slots = 2 * s.num_blocks;
  std::vector<unsigned char> pool(slot_bytes * slots, 0);
  std::vector<uint32_t> slot_of(slots);
  std::iota(slot_of.begin(), slot_of.end(), 0u);
  std::shuffle(slot_of.begin(), slot_of.end(), rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint32_t b = 0; b < s.num_blocks; ++b) {
    unsigned char* block = pool.data() + slot_of[b] * slot_bytes + misalign_elems * esize;
    for (uint64_t i = 0; i < key_elems; ++i) {
      const float scale = (i % s.head_dim) % 17 == 3 ? 20.0f : 1.0f;
      StoreFromFloat(block, i, s.dtype, normal(rng) * scale);
    }
    for (uint64_t i = key_elems; i < 2 * key_elems; ++i) StoreFromFloat(block, i, s.dtype, kNaN);
  }
  std::vector<float> scores(uint64_t{s.num_blocks} * s.num_kv_heads * s.block_tokens);
  for (float& v : scores) v = (rng() % 3 == 0) ? float(rng() % 4) : normal(rng);  // ties
  std::vector<uint32_t> valid(s.num_blocks, s.block_tokens);
  if (partial) {
    for (uint32_t& v : valid) v = 1 + static_cast<uint32_t>(rng() % s.block_tokens);
    valid[0] = 1;
  }

  DeviceBuffer d_pool(pool.size()), d_ptrs(s.num_blocks * sizeof(void*)),
      d_scores(scores.size() * 4), d_valid(valid.size() * 4);
  const uint64_t out_elems = RepresentativeElements(s);
  DeviceBuffer d_out((out_elems + 1) * 4);
  ASSERT_TRUE(d_pool.ok() && d_ptrs.ok() && d_scores.ok() && d_valid.ok() && d_out.ok());
  ASSERT_TRUE(d_pool.Upload(pool.data(), pool.size()));
  std::vector<const void*> host_ptrs(s.num_blocks), dev_ptrs(s.num_blocks);
  for (uint32_t b = 0; b < s.num_blocks; ++b) {
    const uint64_t offset = slot_of[b] * slot_bytes + misalign_elems * esize;
    host_ptrs[b] = pool.data() + offset;
    dev_ptrs[b] = d_pool.get<unsigned char>() + offset;
  }
  ASSERT_TRUE(d_ptrs.Upload(dev_ptrs.data(), dev_ptrs.size() * sizeof(void*)));
  ASSERT_TRUE(d_scores.Upload(scores.data(), scores.size() * 4));
  ASSERT_TRUE(d_valid.Upload(valid.data(), valid.size() * 4));
  ASSERT_TRUE(d_out.Poison());

  const Status st = LaunchComputeRepresentatives(
      s, d_ptrs.get<const void*>(), d_scores.get<float>(),
      partial ? d_valid.get<uint32_t>() : nullptr, d_out.get<float>(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got(out_elems + 1), want(out_elems);
  ASSERT_TRUE(d_out.Download(got.data(), got.size() * 4));
  ASSERT_TRUE(ComputeRepresentativesRef(s, host_ptrs.data(), scores.data(),
                                        partial ? valid.data() : nullptr, want.data(), nullptr)
                  .ok());
  uint32_t poison;
  std::memcpy(&poison, &got[out_elems], 4);
  ASSERT_EQ(poison, 0xFFFFFFFFu) << "wrote past the end";

  const uint32_t rows = RepresentativeRows(s.mode, s.top_r);
  int bad = 0;
  for (uint32_t b = 0; b < s.num_blocks; ++b) {
    for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
      double max_abs = 0;
      for (uint32_t t = 0; t < valid[b]; ++t) {
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          const float k = LoadAsFloat(host_ptrs[b], BlockKeyOffset(s, h, t) + c, s.dtype);
          max_abs = std::max(max_abs, double(std::abs(k)));
        }
      }
      const uint32_t n =
          s.mode == RepresentativeMode::kTopRMean ? std::min(s.top_r, valid[b]) : valid[b];
      const bool exact =
          s.mode == RepresentativeMode::kTopR || s.mode == RepresentativeMode::kMinMax;
      const double tol = exact ? 0.0 : 2.0 * (n + 1) * FLT_EPSILON * max_abs;
      for (uint32_t row = 0; row < rows; ++row) {
        const uint64_t at = RepresentativeOffset(s, b, h, row);
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          const float g = got[at + c], w = want[at + c];
          if (std::isnan(g) || !(std::abs(double(g) - w) <= tol)) {
            if (++bad <= 5) {
              ADD_FAILURE() << "block " << b << " head " << h << " row " << row << " channel " << c
                            << ": gpu " << g << " ref " << w << " tol " << tol;
            }
          }
        }
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST(RetrievalKernelsGpuTest, RepresentativesMatchReference) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  int i = 0;
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3}) {
    for (uint32_t head_dim : {64u, 128u, 256u, 100u}) {
      for (uint32_t block_tokens : {16u, 128u, 200u, 256u}) {
        for (RepresentativeMode mode : {RepresentativeMode::kTopR, RepresentativeMode::kTopRMean,
                                        RepresentativeMode::kMean, RepresentativeMode::kMinMax}) {
          // The smaller parameters cycle over the cases.
          const RepresentativeShape s{.num_blocks = 9,
                                      .num_kv_heads = (i % 2) ? 8u : 1u,
                                      .block_tokens = block_tokens,
                                      .head_dim = head_dim,
                                      .dtype = dtype,
                                      .mode = mode,
                                      .top_r = ((i / 2) % 2) ? 4u : 1u};
          const bool partial = (i / 4) % 2;
          const uint32_t misalign = (i / 8) % 3 == 2 ? 1 : 0;
          ASSERT_NO_FATAL_FAILURE(CheckRepresentatives(s, partial, misalign, rng, seed));
          ++i;
        }
      }
    }
  }
  // Many blocks: more work items than the grid.
  const RepresentativeShape many{.num_blocks = 3000,
                                 .num_kv_heads = 8,
                                 .block_tokens = 16,
                                 .head_dim = 128,
                                 .dtype = DType::kBF16,
                                 .mode = RepresentativeMode::kMean};
  ASSERT_NO_FATAL_FAILURE(CheckRepresentatives(many, true, 0, rng, seed));
}

// --- Block scoring --------------------------------------------------------------------

// The scale of each score: its sum with every term replaced by its absolute value.
std::vector<double> ScoreScales(const BlockScoringShape& s, const std::vector<float>& q,
                                const std::vector<float>& reps) {
  const uint32_t g = s.num_query_heads / s.num_kv_heads, d = s.head_dim, R = s.reps_per_block;
  const bool per_head = s.selection == BlockSelection::kPerKvHead;
  std::vector<double> scale(uint64_t{ScoreRows(s)} * s.num_blocks, 0.0);
  for (uint64_t n = 0; n < s.num_blocks; ++n) {
    for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
      double sum = 0;
      for (uint32_t h = kv * g; h < kv * g + g; ++h) {
        const float* qh = q.data() + uint64_t{h} * d;
        for (uint32_t j = 0; j < R; ++j) {
          const float* r = reps.data() + ScoringRepOffset(s, n, kv, j);
          for (uint32_t c = 0; c < d; ++c) sum += std::abs(double(qh[c]) * r[c]);
        }
      }
      scale[(per_head ? uint64_t{kv} * s.num_blocks : 0) + n] += sum;
    }
  }
  return scale;
}

double ScoreTolerance(const BlockScoringShape& s, double scale) {
  const uint32_t g = s.num_query_heads / s.num_kv_heads;
  const double chain = 2.0 * (s.head_dim + s.reps_per_block + g + s.num_kv_heads + 4) * FLT_EPSILON;
  return std::max(1e-4, chain) * scale;
}

// Scores one step on the GPU (queries offset by `misalign` floats to force the scalar
// path) and compares with the reference. Returns both score vectors and the tolerances.
void CheckScores(const BlockScoringShape& s, bool misalign, std::mt19937_64& rng, uint64_t seed,
                 std::vector<float>* gpu_out = nullptr, std::vector<float>* ref_out = nullptr,
                 std::vector<double>* tol_out = nullptr) {
  SCOPED_TRACE(::testing::Message()
               << "seed " << seed << " N " << s.num_blocks << " query_heads " << s.num_query_heads
               << " kv_heads " << s.num_kv_heads << " head_dim " << s.head_dim << " R "
               << s.reps_per_block << " mode " << int(s.mode) << " selection " << int(s.selection)
               << " misalign " << misalign);
  const std::vector<float> q = RandomVector(uint64_t{s.num_query_heads} * s.head_dim, rng);
  std::vector<float> reps = RandomVector(
      uint64_t{s.num_blocks} * s.num_kv_heads * s.reps_per_block * s.head_dim, rng, s.head_dim);
  if (s.mode == BlockScoreMode::kMinMaxBound) {  // a min row, then a max row above it
    for (uint64_t i = 0; i < uint64_t{s.num_blocks} * s.num_kv_heads; ++i) {
      float* lo = reps.data() + i * 2 * s.head_dim;
      for (uint32_t c = 0; c < s.head_dim; ++c)
        lo[s.head_dim + c] = lo[c] + std::abs(lo[s.head_dim + c]);
    }
  }
  const uint64_t rows = ScoreRows(s), out = rows * s.num_blocks;
  DeviceBuffer d_q((q.size() + 1) * 4), d_reps(reps.size() * 4), d_scores((out + 1) * 4);
  ASSERT_TRUE(d_q.ok() && d_reps.ok() && d_scores.ok());
  float* q_ptr = d_q.get<float>() + (misalign ? 1 : 0);
  ASSERT_EQ(cudaMemcpy(q_ptr, q.data(), q.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_TRUE(d_reps.Upload(reps.data(), reps.size() * 4));
  ASSERT_TRUE(d_scores.Poison());
  const Status st =
      LaunchScoreBlocks(s, q_ptr, d_reps.get<float>(), d_scores.get<float>(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got(out + 1), want(out);
  ASSERT_TRUE(d_scores.Download(got.data(), got.size() * 4));
  uint32_t poison;
  std::memcpy(&poison, &got[out], 4);
  ASSERT_EQ(poison, 0xFFFFFFFFu) << "wrote past the end";
  got.pop_back();
  ASSERT_TRUE(ScoreBlocksRef(s, q.data(), reps.data(), want.data(), nullptr).ok());
  const std::vector<double> scale = ScoreScales(s, q, reps);
  std::vector<double> tol(out);
  int bad = 0;
  for (uint64_t i = 0; i < out; ++i) {
    tol[i] = ScoreTolerance(s, scale[i]);
    if (std::isnan(got[i]) || !(std::abs(double(got[i]) - want[i]) <= tol[i])) {
      if (++bad <= 5) {
        ADD_FAILURE() << "score " << i << ": gpu " << got[i] << " ref " << want[i] << " tol "
                      << tol[i];
      }
    }
  }
  EXPECT_EQ(bad, 0);
  if (gpu_out) *gpu_out = std::move(got);
  if (ref_out) *ref_out = std::move(want);
  if (tol_out) *tol_out = std::move(tol);
}

TEST(RetrievalKernelsGpuTest, ScoresMatchReference) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  struct ModeR {
    BlockScoreMode mode;
    uint32_t reps;
  };
  const ModeR modes[] = {{BlockScoreMode::kMeanDot, 1},
                         {BlockScoreMode::kMeanDot, 4},
                         {BlockScoreMode::kMaxDot, 1},
                         {BlockScoreMode::kMaxDot, 4},
                         {BlockScoreMode::kMinMaxBound, 2}};
  int i = 0;
  for (uint32_t head_dim : {64u, 128u, 256u, 100u}) {
    for (uint32_t group : {1u, 4u, 7u, 8u}) {
      for (const ModeR& m : modes) {
        for (uint32_t n : {1u, 5u, 1000u, 4099u}) {
          const uint32_t kv_choices[] = {1, 2, 8};
          const uint32_t kv = kv_choices[i % (n >= 1000 ? 2 : 3)];
          const BlockScoringShape s{
              .num_blocks = n,
              .num_query_heads = kv * group,
              .num_kv_heads = kv,
              .head_dim = head_dim,
              .reps_per_block = m.reps,
              .mode = m.mode,
              .selection = (i / 3) % 2 ? BlockSelection::kPerKvHead : BlockSelection::kPerLayer};
          ASSERT_NO_FATAL_FAILURE(CheckScores(s, (i / 5) % 4 == 3, rng, seed));
          ++i;
        }
      }
    }
  }
}

// --- Top-k ----------------------------------------------------------------------------

std::vector<float> TrickyScores(uint64_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) {
    switch (rng() % 8) {
      case 0:
        x = float(int(rng() % 5) - 2);  // ties
        break;
      case 1:
        x = (rng() % 2) ? 0.0f : -0.0f;
        break;
      case 2:
        x = (rng() % 4) == 0 ? kNaN : float(rng() % 3);
        break;
      case 3:
        x = (rng() % 8) == 0 ? ((rng() % 2) ? INFINITY : -INFINITY) : normal(rng);
        break;
      default:
        x = normal(rng) * 100.0f;
    }
  }
  return v;
}

// Top-k of `scores` on the GPU; the result, or an empty vector after a failure.
std::vector<int32_t> GpuTopK(const std::vector<float>& scores, uint32_t rows, uint32_t n,
                             uint32_t k) {
  std::vector<int32_t> got;
  const Result<uint64_t> ws = TopKWorkspaceBytes(rows, n, k);
  EXPECT_TRUE(ws.ok()) << ws.status().ToString();
  if (!ws.ok()) return got;
  DeviceBuffer d_scores(scores.size() * 4), d_top((uint64_t{rows} * k + 1) * 4), d_ws(ws.value());
  EXPECT_TRUE(d_scores.ok() && d_top.ok() && d_ws.ok());
  EXPECT_TRUE(d_scores.Upload(scores.data(), scores.size() * 4));
  EXPECT_TRUE(d_top.Poison() && d_ws.Poison());
  const Status st = LaunchTopKBlocks(d_scores.get<float>(), rows, n, k, d_top.get<int32_t>(),
                                     d_ws.get(), ws.value(), nullptr);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  got.resize(uint64_t{rows} * k + 1);
  EXPECT_TRUE(d_top.Download(got.data(), got.size() * 4));
  EXPECT_EQ(got.back(), -1) << "wrote past the end";
  got.pop_back();
  return got;
}

TEST(RetrievalKernelsGpuTest, TopKMatchesReferenceExactly) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (uint32_t rows : {1u, 3u}) {
    for (uint32_t n : {1u, 2u, 5u, 1000u, 4096u, 4097u, 4099u, 65536u, 1u << 20}) {
      for (uint32_t k : {1u, 16u, 100u, 2048u, 2049u, n}) {
        if (k > n || (rows > 1 && n > 65536)) continue;
        SCOPED_TRACE(::testing::Message()
                     << "seed " << seed << " rows " << rows << " N " << n << " k " << k);
        const std::vector<float> scores = TrickyScores(uint64_t{rows} * n, rng);
        const std::vector<int32_t> got = GpuTopK(scores, rows, n, k);
        ASSERT_EQ(got.size(), uint64_t{rows} * k);
        std::vector<int32_t> want(uint64_t{rows} * k);
        ASSERT_TRUE(
            TopKBlocksRef(scores.data(), rows, n, k, want.data(), nullptr, 0, nullptr).ok());
        for (uint64_t i = 0; i < want.size(); ++i) {
          ASSERT_EQ(got[i], want[i]) << "at " << i;
        }
      }
    }
  }
}

// Scores on the GPU, then top-k on the GPU, against the same pipeline on the CPU. The
// GPU's top-k of its own scores must equal the reference top-k of those scores; and it
// may differ from the reference pipeline's choice only by swapping blocks whose
// reference scores lie within tolerance of each other.
TEST(RetrievalKernelsGpuTest, SelectionMatchesReferenceWithinTolerance) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  struct Case {
    BlockScoringShape shape;
    uint32_t k;
  };
  const Case cases[] = {
      {{1000, 32, 8, 128, 4, BlockScoreMode::kMeanDot, BlockSelection::kPerLayer}, 16},
      {{8192, 28, 4, 128, 1, BlockScoreMode::kMaxDot, BlockSelection::kPerKvHead}, 64},
      {{4099, 16, 2, 256, 2, BlockScoreMode::kMinMaxBound, BlockSelection::kPerLayer}, 100},
      {{20000, 8, 1, 64, 4, BlockScoreMode::kMaxDot, BlockSelection::kPerLayer}, 2048},
      {{3000, 8, 8, 128, 4, BlockScoreMode::kMeanDot, BlockSelection::kPerKvHead}, 3000},
  };
  for (const Case& c : cases) {
    const BlockScoringShape& s = c.shape;
    std::vector<float> gpu, ref;
    std::vector<double> tol;
    ASSERT_NO_FATAL_FAILURE(CheckScores(s, false, rng, seed, &gpu, &ref, &tol));
    const uint32_t rows = ScoreRows(s), n = s.num_blocks, k = c.k;
    SCOPED_TRACE(::testing::Message() << "seed " << seed << " N " << n << " k " << k);
    const std::vector<int32_t> got = GpuTopK(gpu, rows, n, k);
    ASSERT_EQ(got.size(), uint64_t{rows} * k);
    std::vector<int32_t> of_gpu(got.size()), of_ref(got.size());
    ASSERT_TRUE(TopKBlocksRef(gpu.data(), rows, n, k, of_gpu.data(), nullptr, 0, nullptr).ok());
    ASSERT_TRUE(TopKBlocksRef(ref.data(), rows, n, k, of_ref.data(), nullptr, 0, nullptr).ok());
    EXPECT_EQ(got, of_gpu);
    for (uint32_t row = 0; row < rows; ++row) {
      const uint64_t base = uint64_t{row} * n;
      const std::set<int32_t> g(got.begin() + row * k, got.begin() + row * k + k);
      const std::set<int32_t> r(of_ref.begin() + row * k, of_ref.begin() + row * k + k);
      for (int32_t i : g) {
        if (r.count(i)) continue;
        for (int32_t j : r) {  // the reference preferred j, the GPU i
          if (g.count(j)) continue;
          EXPECT_LE(ref[base + j] - ref[base + i], tol[base + i] + tol[base + j])
              << "row " << row << ": gpu chose " << i << ", reference " << j;
        }
      }
    }
  }
}

#endif  // KVTIER_WITH_CUDA

TEST(RetrievalKernelsGpuTest, ReportsNoDeviceAsAStatus) {
  if (cuda::HasDevice()) GTEST_SKIP() << "a device is present";
  std::vector<float> keys(2 * 16 * 64, 1.0f), out(64), scores(16, 1.0f);
  const void* block = keys.data();
  const RepresentativeShape rs{.num_blocks = 1,
                               .num_kv_heads = 1,
                               .block_tokens = 16,
                               .head_dim = 64,
                               .dtype = DType::kF32,
                               .mode = RepresentativeMode::kMean};
  EXPECT_FALSE(
      LaunchComputeRepresentatives(rs, &block, nullptr, nullptr, out.data(), nullptr).ok());
  const BlockScoringShape bs{.num_blocks = 1,
                             .num_query_heads = 1,
                             .num_kv_heads = 1,
                             .head_dim = 64,
                             .reps_per_block = 1};
  EXPECT_FALSE(LaunchScoreBlocks(bs, out.data(), out.data(), scores.data(), nullptr).ok());
  int32_t top = 0;
  EXPECT_FALSE(LaunchTopKBlocks(scores.data(), 1, 16, 4, &top, nullptr, 0, nullptr).ok());
}

}  // namespace
}  // namespace kvtier
