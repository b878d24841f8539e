// ScoreBlocksRef and TopKBlocksRef against naive double-precision math and a full sort,
// written here independently; properties of the Quest bound and InfLLM's mean.
#include "kernels/block_scoring.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/representatives.h"

namespace kvtier {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> RandomVector(uint64_t n, std::mt19937_64& rng, uint32_t head_dim = 0) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (uint64_t i = 0; i < n; ++i) {
    const bool outlier = head_dim != 0 && (i % head_dim) % 13 == 5;
    v[i] = normal(rng) * (outlier ? 15.0f : 1.0f);
  }
  return v;
}

// Representatives for `s`: random rows, or (kMinMaxBound) a min row and a max row >= it.
std::vector<float> RandomReps(const BlockScoringShape& s, std::mt19937_64& rng) {
  std::vector<float> reps = RandomVector(
      uint64_t{s.num_blocks} * s.num_kv_heads * s.reps_per_block * s.head_dim, rng, s.head_dim);
  if (s.mode == BlockScoreMode::kMinMaxBound) {
    for (uint64_t n = 0; n < s.num_blocks; ++n) {
      for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
        float* lo = reps.data() + ScoringRepOffset(s, n, kv, 0);
        for (uint32_t c = 0; c < s.head_dim; ++c)
          lo[s.head_dim + c] = lo[c] + std::abs(lo[s.head_dim + c]);
      }
    }
  }
  return reps;
}

// Scores in double, and the scale at which float rounding acts: the same sums over the
// absolute values of the terms. [rows][N].
struct NaiveScores {
  std::vector<double> score, scale;
};

NaiveScores Naive(const BlockScoringShape& s, const std::vector<float>& q,
                  const std::vector<float>& reps) {
  const uint32_t g = s.num_query_heads / s.num_kv_heads, d = s.head_dim, R = s.reps_per_block;
  const bool per_head = s.selection == BlockSelection::kPerKvHead;
  NaiveScores out;
  out.score.assign(uint64_t{per_head ? s.num_kv_heads : 1} * s.num_blocks, 0.0);
  out.scale = out.score;
  for (uint64_t n = 0; n < s.num_blocks; ++n) {
    for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
      const uint64_t at = (per_head ? uint64_t{kv} * s.num_blocks : 0) + n;
      for (uint32_t h = kv * g; h < kv * g + g; ++h) {
        const float* qh = q.data() + uint64_t{h} * d;
        const float* rep = reps.data() + ((n * s.num_kv_heads + kv) * R) * d;
        double score = 0, scale = 0;
        if (s.mode == BlockScoreMode::kMinMaxBound) {
          for (uint32_t c = 0; c < d; ++c) {
            const double a = double(qh[c]) * rep[c], b = double(qh[c]) * rep[d + c];
            score += std::max(a, b);
            scale += std::max(std::abs(a), std::abs(b));
          }
        } else {
          double best = -INFINITY;
          for (uint32_t j = 0; j < R; ++j) {
            double dot = 0, abs_dot = 0;
            for (uint32_t c = 0; c < d; ++c) {
              dot += double(qh[c]) * rep[uint64_t{j} * d + c];
              abs_dot += std::abs(double(qh[c]) * rep[uint64_t{j} * d + c]);
            }
            best = std::max(best, dot);
            score += dot;
            scale += abs_dot;
          }
          if (s.mode == BlockScoreMode::kMeanDot) {
            score /= R;
            scale /= R;
          } else {
            score = best;  // the scale stays the sum over R: a bound for the max
          }
        }
        out.score[at] += score;
        out.scale[at] += scale;
      }
    }
  }
  return out;
}

// The float error bound of ScoreBlocks: the longest chain of float additions times eps.
double Tolerance(const BlockScoringShape& s, double scale) {
  const uint32_t g = s.num_query_heads / s.num_kv_heads;
  return (s.head_dim + s.reps_per_block + g + s.num_kv_heads + 4) * double(FLT_EPSILON) * scale;
}

// The k best indices of a row by a full sort: higher score first (NaN lowest, -0 = +0),
// then lower index.
std::vector<int32_t> FullSortTopK(const float* scores, uint32_t n, uint32_t k) {
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  const auto value = [&](int32_t i) { return std::isnan(scores[i]) ? -INFINITY : scores[i]; };
  std::sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) {
    return value(a) != value(b) ? value(a) > value(b) : a < b;
  });
  idx.resize(k);
  return idx;
}

// Scores with many ties, NaNs, both zeros and infinities.
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

TEST(BlockScoringTest, ScoresMatchNaiveMath) {
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
  for (uint32_t head_dim : {64u, 128u, 256u, 100u}) {
    for (uint32_t group : {1u, 4u, 7u, 8u}) {
      for (uint32_t kv_heads : {1u, 2u}) {
        for (const ModeR& m : modes) {
          for (BlockSelection sel : {BlockSelection::kPerLayer, BlockSelection::kPerKvHead}) {
            for (uint32_t n : {1u, 5u, 37u}) {
              const BlockScoringShape s{.num_blocks = n,
                                        .num_query_heads = kv_heads * group,
                                        .num_kv_heads = kv_heads,
                                        .head_dim = head_dim,
                                        .reps_per_block = m.reps,
                                        .mode = m.mode,
                                        .selection = sel};
              const std::vector<float> q =
                  RandomVector(uint64_t{s.num_query_heads} * head_dim, rng);
              const std::vector<float> reps = RandomReps(s, rng);
              const uint64_t rows = ScoreRows(s);
              std::vector<float> got(rows * n + 1, -7.0f);
              ASSERT_TRUE(ScoreBlocksRef(s, q.data(), reps.data(), got.data(), nullptr).ok());
              ASSERT_EQ(got.back(), -7.0f) << "wrote past the end";
              const NaiveScores want = Naive(s, q, reps);
              for (uint64_t i = 0; i < rows * n; ++i) {
                ASSERT_FALSE(std::isnan(got[i]));
                ASSERT_NEAR(got[i], want.score[i], Tolerance(s, want.scale[i]))
                    << "seed " << seed << " head_dim " << head_dim << " group " << group
                    << " kv_heads " << kv_heads << " mode " << int(m.mode) << " R " << m.reps
                    << " selection " << int(sel) << " N " << n << " at " << i;
              }
            }
          }
        }
      }
    }
  }
}

TEST(BlockScoringTest, ManyBlocksAndHeads) {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  const BlockScoringShape s{.num_blocks = 4099,
                            .num_query_heads = 32,
                            .num_kv_heads = 8,
                            .head_dim = 128,
                            .reps_per_block = 4,
                            .mode = BlockScoreMode::kMaxDot,
                            .selection = BlockSelection::kPerKvHead};
  const std::vector<float> q = RandomVector(32 * 128, rng);
  const std::vector<float> reps = RandomReps(s, rng);
  std::vector<float> got(8 * 4099);
  ASSERT_TRUE(ScoreBlocksRef(s, q.data(), reps.data(), got.data(), nullptr).ok());
  const NaiveScores want = Naive(s, q, reps);
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want.score[i], Tolerance(s, want.scale[i])) << "seed " << seed << " " << i;
  }
}

TEST(BlockScoringTest, PerKvHeadScoresSumToTheLayerScore) {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  BlockScoringShape s{.num_blocks = 300,
                      .num_query_heads = 28,
                      .num_kv_heads = 4,  // Qwen2-7B-like group of 7
                      .head_dim = 128,
                      .reps_per_block = 4,
                      .mode = BlockScoreMode::kMeanDot,
                      .selection = BlockSelection::kPerKvHead};
  const std::vector<float> q = RandomVector(28 * 128, rng);
  const std::vector<float> reps = RandomReps(s, rng);
  std::vector<float> per_head(4 * 300), layer(300);
  ASSERT_TRUE(ScoreBlocksRef(s, q.data(), reps.data(), per_head.data(), nullptr).ok());
  s.selection = BlockSelection::kPerLayer;
  ASSERT_TRUE(ScoreBlocksRef(s, q.data(), reps.data(), layer.data(), nullptr).ok());
  const NaiveScores scale = Naive(s, q, reps);
  for (uint32_t n = 0; n < 300; ++n) {
    double sum = 0;
    for (uint32_t kv = 0; kv < 4; ++kv) sum += per_head[kv * 300 + n];
    EXPECT_NEAR(layer[n], sum, Tolerance(s, scale.scale[n])) << "seed " << seed << " " << n;
  }
  // A separate selection per KV head: each row's top-k is that row's full sort.
  std::vector<int32_t> top(4 * 16);
  ASSERT_TRUE(TopKBlocksRef(per_head.data(), 4, 300, 16, top.data(), nullptr, 0, nullptr).ok());
  for (uint32_t kv = 0; kv < 4; ++kv) {
    const std::vector<int32_t> want = FullSortTopK(per_head.data() + kv * 300, 300, 16);
    EXPECT_EQ(std::vector<int32_t>(top.begin() + kv * 16, top.begin() + kv * 16 + 16), want)
        << "kv head " << kv;
  }
}

TEST(BlockScoringTest, TopKMatchesAFullSort) {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (uint32_t rows : {1u, 3u}) {
    for (uint32_t n : {1u, 5u, 1000u, 4099u}) {
      for (uint32_t k : {1u, 16u, n}) {
        if (k > n) continue;
        const std::vector<float> scores = TrickyScores(uint64_t{rows} * n, rng);
        std::vector<int32_t> got(uint64_t{rows} * k + 1, -3);
        ASSERT_TRUE(TopKBlocksRef(scores.data(), rows, n, k, got.data(), nullptr, 0, nullptr).ok());
        ASSERT_EQ(got.back(), -3) << "wrote past the end";
        for (uint32_t row = 0; row < rows; ++row) {
          const std::vector<int32_t> want = FullSortTopK(scores.data() + uint64_t{row} * n, n, k);
          ASSERT_EQ(std::vector<int32_t>(got.begin() + row * k, got.begin() + row * k + k), want)
              << "seed " << seed << " rows " << rows << " N " << n << " k " << k << " row " << row;
        }
      }
    }
  }
}

TEST(BlockScoringTest, TopKTieRule) {
  const float scores[] = {1.0f, 2.0f, kNaN, 2.0f, -0.0f, 0.0f, 2.0f, -INFINITY};
  std::vector<int32_t> top(8);
  ASSERT_TRUE(TopKBlocksRef(scores, 1, 8, 8, top.data(), nullptr, 0, nullptr).ok());
  EXPECT_EQ(top, (std::vector<int32_t>{1, 3, 6, 0, 4, 5, 2, 7}));  // NaN ties -inf, lower first
}

// Quest's property: the min/max bound is at least max_t q . k_t over the block's keys,
// for every query head, so also for the group sums.
TEST(BlockScoringTest, MinMaxBoundIsAnUpperBoundOfEveryKey) {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 40; ++trial) {
    const uint32_t head_dim = (trial % 3 == 0) ? 64 : (trial % 3 == 1 ? 128 : 256);
    const uint32_t group = 1 + trial % 8, kv_heads = 1 + trial % 3;
    const uint32_t block_tokens = (trial % 2) ? 16 : 128, num_blocks = 6;
    const DType dtype = (trial % 4 == 0) ? DType::kF32 : DType::kBF16;
    RepresentativeShape rs{.num_blocks = num_blocks,
                           .num_kv_heads = kv_heads,
                           .block_tokens = block_tokens,
                           .head_dim = head_dim,
                           .dtype = dtype,
                           .mode = RepresentativeMode::kMinMax};
    const uint64_t key_elems = uint64_t{kv_heads} * block_tokens * head_dim;
    std::vector<std::vector<unsigned char>> blocks(num_blocks);
    std::vector<const void*> ptrs;
    for (auto& b : blocks) {
      b.resize(2 * key_elems * DTypeBytes(dtype));
      const std::vector<float> keys = RandomVector(key_elems, rng, head_dim);
      for (uint64_t i = 0; i < key_elems; ++i) StoreFromFloat(b.data(), i, dtype, keys[i]);
      ptrs.push_back(b.data());
    }
    std::vector<float> reps(RepresentativeElements(rs));
    ASSERT_TRUE(
        ComputeRepresentativesRef(rs, ptrs.data(), nullptr, nullptr, reps.data(), nullptr).ok());
    const BlockScoringShape s{.num_blocks = num_blocks,
                              .num_query_heads = kv_heads * group,
                              .num_kv_heads = kv_heads,
                              .head_dim = head_dim,
                              .reps_per_block = 2,
                              .mode = BlockScoreMode::kMinMaxBound,
                              .selection = BlockSelection::kPerKvHead};
    const std::vector<float> q = RandomVector(uint64_t{s.num_query_heads} * head_dim, rng);
    std::vector<float> bound(uint64_t{kv_heads} * num_blocks);
    ASSERT_TRUE(ScoreBlocksRef(s, q.data(), reps.data(), bound.data(), nullptr).ok());
    const NaiveScores scale = Naive(s, q, reps);
    for (uint32_t n = 0; n < num_blocks; ++n) {
      for (uint32_t kv = 0; kv < kv_heads; ++kv) {
        double best_sum = 0;  // sum over the group of max_t q_h . k_t
        for (uint32_t h = kv * group; h < kv * group + group; ++h) {
          double best = -INFINITY;
          for (uint32_t t = 0; t < block_tokens; ++t) {
            double dot = 0;
            for (uint32_t c = 0; c < head_dim; ++c) {
              dot += double(q[uint64_t{h} * head_dim + c]) *
                     LoadAsFloat(ptrs[n], (uint64_t{kv} * block_tokens + t) * head_dim + c, dtype);
            }
            best = std::max(best, dot);
          }
          best_sum += best;
        }
        const uint64_t at = uint64_t{kv} * num_blocks + n;
        EXPECT_GE(bound[at] + Tolerance(s, scale.scale[at]), best_sum)
            << "seed " << seed << " trial " << trial << " block " << n << " kv " << kv;
      }
    }
  }
}

// InfLLM scores q . mean(top-R keys): kMeanDot over the R keys equals kMeanDot over
// their mean; and kMaxDot over the kept keys never exceeds the block's best key.
TEST(BlockScoringTest, MeanDotOverTopRKeysEqualsDotWithTheirMean) {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  const uint32_t head_dim = 128, block_tokens = 64, kv_heads = 2, group = 4, num_blocks = 20;
  const uint64_t key_elems = uint64_t{kv_heads} * block_tokens * head_dim;
  std::vector<std::vector<float>> blocks(num_blocks);
  std::vector<const void*> ptrs;
  for (auto& b : blocks) {
    b = RandomVector(2 * key_elems, rng, head_dim);
    ptrs.push_back(b.data());
  }
  const std::vector<float> token_scores =
      RandomVector(uint64_t{num_blocks} * kv_heads * block_tokens, rng);
  RepresentativeShape rs{.num_blocks = num_blocks,
                         .num_kv_heads = kv_heads,
                         .block_tokens = block_tokens,
                         .head_dim = head_dim,
                         .dtype = DType::kF32,
                         .mode = RepresentativeMode::kTopR,
                         .top_r = 4};
  std::vector<float> top(RepresentativeElements(rs));
  ASSERT_TRUE(
      ComputeRepresentativesRef(rs, ptrs.data(), token_scores.data(), nullptr, top.data(), nullptr)
          .ok());
  rs.mode = RepresentativeMode::kTopRMean;
  std::vector<float> mean(RepresentativeElements(rs));
  ASSERT_TRUE(
      ComputeRepresentativesRef(rs, ptrs.data(), token_scores.data(), nullptr, mean.data(), nullptr)
          .ok());
  BlockScoringShape s{.num_blocks = num_blocks,
                      .num_query_heads = kv_heads * group,
                      .num_kv_heads = kv_heads,
                      .head_dim = head_dim,
                      .reps_per_block = 4,
                      .mode = BlockScoreMode::kMeanDot,
                      .selection = BlockSelection::kPerLayer};
  const std::vector<float> q = RandomVector(uint64_t{kv_heads} * group * head_dim, rng);
  std::vector<float> from_keys(num_blocks), from_mean(num_blocks);
  ASSERT_TRUE(ScoreBlocksRef(s, q.data(), top.data(), from_keys.data(), nullptr).ok());
  const NaiveScores scale = Naive(s, q, top);
  s.reps_per_block = 1;
  ASSERT_TRUE(ScoreBlocksRef(s, q.data(), mean.data(), from_mean.data(), nullptr).ok());
  for (uint32_t n = 0; n < num_blocks; ++n) {
    EXPECT_NEAR(from_keys[n], from_mean[n], 2 * Tolerance(s, scale.scale[n]) + 1e-6)
        << "seed " << seed << " block " << n;
  }
}

TEST(BlockScoringTest, BytesPerBlock) {
  BlockScoringShape s{.num_blocks = 100,
                      .num_query_heads = 32,
                      .num_kv_heads = 8,
                      .head_dim = 128,
                      .reps_per_block = 4};
  EXPECT_EQ(ScoreRows(s), 1u);
  EXPECT_EQ(ScoreBlocksBytesPerBlock(s), 8u * 4 * 128 * 4 + 4);
  s.selection = BlockSelection::kPerKvHead;
  EXPECT_EQ(ScoreRows(s), 8u);
  EXPECT_EQ(ScoreBlocksBytesPerBlock(s), 8u * 4 * 128 * 4 + 32);
  EXPECT_EQ(ScoringRepOffset(s, 3, 2, 1), ((3u * 8 + 2) * 4 + 1) * 128);
}

TEST(BlockScoringTest, RejectsBadArguments) {
  const BlockScoringShape good{.num_blocks = 4,
                               .num_query_heads = 4,
                               .num_kv_heads = 2,
                               .head_dim = 8,
                               .reps_per_block = 2,
                               .mode = BlockScoreMode::kMeanDot};
  std::vector<float> q(64, 1.0f), reps(4 * 2 * 2 * 8, 1.0f), out(16);
  ASSERT_TRUE(ScoreBlocksRef(good, q.data(), reps.data(), out.data(), nullptr).ok());
  std::vector<BlockScoringShape> bad(12, good);
  bad[0].num_blocks = 0;
  bad[1].num_query_heads = 0;
  bad[2].num_kv_heads = 0;
  bad[3].head_dim = 0;
  bad[4].reps_per_block = 0;
  bad[5].num_query_heads = 5;  // not a multiple of 2
  bad[6].head_dim = 2048;
  bad[7].reps_per_block = 65;
  bad[8].mode = BlockScoreMode::kMinMaxBound;
  bad[8].reps_per_block = 4;  // the bound needs exactly min and max
  bad[9].mode = static_cast<BlockScoreMode>(9);
  bad[10].selection = static_cast<BlockSelection>(9);
  bad[11].num_blocks = 0x80000000u;
  for (size_t i = 0; i < bad.size(); ++i) {
    const Status st = ScoreBlocksRef(bad[i], q.data(), reps.data(), out.data(), nullptr);
    EXPECT_TRUE(st.IsInvalidArgument()) << i << ": " << st.ToString();
    EXPECT_NE(st.message().find("ScoreBlocks"), std::string::npos) << st.ToString();
  }
  EXPECT_TRUE(ScoreBlocksRef(good, nullptr, reps.data(), out.data(), nullptr).IsInvalidArgument());
  EXPECT_TRUE(ScoreBlocksRef(good, q.data(), nullptr, out.data(), nullptr).IsInvalidArgument());
  EXPECT_TRUE(ScoreBlocksRef(good, q.data(), reps.data(), nullptr, nullptr).IsInvalidArgument());

  std::vector<int32_t> top(8);
  const auto topk = [&](const float* sc, uint32_t rows, uint32_t n, uint32_t k, int32_t* t) {
    return TopKBlocksRef(sc, rows, n, k, t, nullptr, 0, nullptr);
  };
  EXPECT_TRUE(topk(out.data(), 1, 4, 4, top.data()).ok());
  EXPECT_TRUE(topk(out.data(), 1, 4, 0, top.data()).IsInvalidArgument());
  const Status big_k = topk(out.data(), 1, 4, 5, top.data());
  EXPECT_TRUE(big_k.IsInvalidArgument());
  EXPECT_NE(big_k.message().find("k 5"), std::string::npos) << big_k.ToString();
  EXPECT_TRUE(topk(out.data(), 0, 4, 1, top.data()).IsInvalidArgument());
  EXPECT_TRUE(topk(out.data(), 1, 0, 1, top.data()).IsInvalidArgument());
  EXPECT_TRUE(topk(out.data(), 1, 0x80000000u, 1, top.data()).IsInvalidArgument());
  EXPECT_TRUE(topk(nullptr, 1, 4, 1, top.data()).IsInvalidArgument());
  EXPECT_TRUE(topk(out.data(), 1, 4, 1, nullptr).IsInvalidArgument());
  EXPECT_TRUE(TopKWorkspaceBytes(1, 4, 5).status().IsInvalidArgument());
}

TEST(BlockScoringTest, LaunchWithoutCudaIsNotSupported) {
  if (cuda::BuiltWithCuda()) GTEST_SKIP() << "built with CUDA: the GPU test covers Launch";
  const BlockScoringShape s{
      .num_blocks = 1, .num_query_heads = 1, .num_kv_heads = 1, .head_dim = 4, .reps_per_block = 1};
  std::vector<float> q(4, 1.0f), reps(4, 1.0f), out(1);
  int32_t top = 0;
  EXPECT_EQ(LaunchScoreBlocks(s, q.data(), reps.data(), out.data(), nullptr).code(),
            StatusCode::kNotSupported);
  EXPECT_EQ(LaunchTopKBlocks(out.data(), 1, 1, 1, &top, nullptr, 0, nullptr).code(),
            StatusCode::kNotSupported);
  EXPECT_EQ(TopKWorkspaceBytes(1, 1, 1).status().code(), StatusCode::kNotSupported);
}

}  // namespace
}  // namespace kvtier
