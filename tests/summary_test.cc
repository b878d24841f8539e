// Block summaries (index/summary.h): each kind against a direct computation, the
// clustering's guarantees, partial blocks, the catalog encoding and bad input.
#include "index/summary.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "index/simd.h"
#include "kernels/dtype_convert.h"

namespace kvtier {
namespace {

struct Block {
  SummaryShape shape;
  std::vector<float> data;  // keys then values, f32 (values never read)
  float& key(uint32_t kv, uint32_t t, uint32_t c) {
    return data[(uint64_t{kv} * shape.block_tokens + t) * shape.head_dim + c];
  }
};

Block RandomBlock(SummaryKind kind, uint32_t rows, uint64_t seed, uint32_t kv = 2,
                  uint32_t tokens = 32, uint32_t d = 16) {
  Block b;
  b.shape = {kv, d, tokens, DType::kF32, kind, rows};
  b.data.resize(2ull * kv * tokens * d);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (float& v : b.data) v = n(rng);
  return b;
}

float Vec(const BlockSummary& s, const SummaryShape& sh, uint32_t kv, uint32_t row, uint32_t c) {
  return HalfBitsToFloat(s.vectors[(uint64_t{kv} * sh.rows + row) * sh.head_dim + c]);
}

TEST(Summary, MeanIsTheMeanKey) {
  Block b = RandomBlock(SummaryKind::kMean, 1, 1);
  BlockSummary s;
  ASSERT_TRUE(SummarizeBlock(b.shape, b.data.data(), 20, {}, &s).ok());
  EXPECT_EQ(s.valid_tokens, 20u);
  for (uint32_t kv = 0; kv < 2; ++kv) {
    EXPECT_EQ(s.weights[kv], 20.0f);
    for (uint32_t c = 0; c < 16; ++c) {
      double m = 0;
      for (uint32_t t = 0; t < 20; ++t) m += b.key(kv, t, c);
      EXPECT_NEAR(Vec(s, b.shape, kv, 0, c), m / 20, 2e-3);
    }
  }
}

TEST(Summary, MinMaxBoundsEveryValidKey) {
  Block b = RandomBlock(SummaryKind::kMinMax, 2, 2);
  b.key(0, 31, 3) = 1000.0f;  // outside the valid tokens: ignored
  BlockSummary s;
  ASSERT_TRUE(SummarizeBlock(b.shape, b.data.data(), 31, {}, &s).ok());
  for (uint32_t kv = 0; kv < 2; ++kv) {
    for (uint32_t c = 0; c < 16; ++c) {
      float lo = INFINITY, hi = -INFINITY;
      for (uint32_t t = 0; t < 31; ++t)
        lo = std::min(lo, b.key(kv, t, c)), hi = std::max(hi, b.key(kv, t, c));
      EXPECT_NEAR(Vec(s, b.shape, kv, 0, c), lo, 2e-3);
      EXPECT_NEAR(Vec(s, b.shape, kv, 1, c), hi, 2e-3);
    }
  }
}

TEST(Summary, TopRTakesTheBestScoredKeysThenTheLargestNorms) {
  Block b = RandomBlock(SummaryKind::kTopR, 2, 3);
  std::vector<float> scores(2 * 32, 0.0f);
  scores[7] = 5, scores[9] = 5, scores[3] = 1;  // head 0: tokens 7 and 9 tie -> 7 first
  scores[32 + 30] = 2, scores[32 + 1] = 3;      // head 1: 1 then 30
  BlockSummary s;
  ASSERT_TRUE(SummarizeBlock(b.shape, b.data.data(), 32, scores, &s).ok());
  for (uint32_t c = 0; c < 16; ++c) {
    EXPECT_EQ(Vec(s, b.shape, 0, 0, c), HalfBitsToFloat(FloatToHalfBits(b.key(0, 7, c))));
    EXPECT_EQ(Vec(s, b.shape, 0, 1, c), HalfBitsToFloat(FloatToHalfBits(b.key(0, 9, c))));
    EXPECT_EQ(Vec(s, b.shape, 1, 0, c), HalfBitsToFloat(FloatToHalfBits(b.key(1, 1, c))));
    EXPECT_EQ(Vec(s, b.shape, 1, 1, c), HalfBitsToFloat(FloatToHalfBits(b.key(1, 30, c))));
  }
  EXPECT_EQ(s.weights[0], 16.0f);
  // Without scores: the largest-norm keys.
  for (uint32_t c = 0; c < 16; ++c) b.key(0, 12, c) = 9.0f;
  ASSERT_TRUE(SummarizeBlock(b.shape, b.data.data(), 32, {}, &s).ok());
  EXPECT_EQ(Vec(s, b.shape, 0, 0, 5), 9.0f);
}

TEST(Summary, ClustersPartitionTheTokensAndIsolateAnOutlier) {
  Block b = RandomBlock(SummaryKind::kClusters, 4, 4, 2, 128, 32);
  // Head 1: one key far from the rest (a needle) must keep a centroid of its own.
  for (uint32_t c = 0; c < 32; ++c) b.key(1, 77, c) = 12.0f * ((c % 3 == 0) ? 1.0f : -0.5f);
  BlockSummary s;
  ASSERT_TRUE(SummarizeBlock(b.shape, b.data.data(), 128, {}, &s).ok());
  for (uint32_t kv = 0; kv < 2; ++kv) {
    float total = 0;
    for (uint32_t j = 0; j < 4; ++j) total += s.weights[kv * 4 + j];
    EXPECT_EQ(total, 128.0f);
  }
  bool isolated = false;
  for (uint32_t j = 0; j < 4; ++j) {
    if (s.weights[4 + j] != 1.0f) continue;
    bool same = true;
    for (uint32_t c = 0; c < 32; ++c) {
      same &= std::abs(Vec(s, b.shape, 1, j, c) - b.key(1, 77, c)) < 1e-2f;
    }
    isolated |= same;
  }
  EXPECT_TRUE(isolated);
  // Weighted centroids average back to the mean key.
  for (uint32_t c = 0; c < 32; ++c) {
    double m = 0, w = 0;
    for (uint32_t t = 0; t < 128; ++t) m += b.key(0, t, c);
    for (uint32_t j = 0; j < 4; ++j) w += s.weights[j] * Vec(s, b.shape, 0, j, c);
    EXPECT_NEAR(w / 128, m / 128, 5e-3);
  }
}

// CoarsenSummary (two-stage scoring's first pass): per KV head the weights sum to the
// valid tokens, each row is within half a quantization step of the weighted mean of the
// clusters merged into it, the needle's cluster keeps a row of its own, and the result
// is a pure function of the summary.
TEST(Summary, CoarseRowsMergeClustersAndKeepTheNeedle) {
  Block b = RandomBlock(SummaryKind::kClusters, 8, 14, 2, 128, 32);
  for (uint32_t c = 0; c < 32; ++c) b.key(1, 77, c) = 12.0f * ((c % 3 == 0) ? 1.0f : -0.5f);
  BlockSummary s;
  ASSERT_TRUE(SummarizeBlock(b.shape, b.data.data(), 128, {}, &s).ok());
  for (uint32_t cr : {1u, 2u, 3u}) {
    SCOPED_TRACE(cr);
    CoarseSummary c, again;
    CoarsenSummary(b.shape, s, cr, &c);
    CoarsenSummary(b.shape, s, cr, &again);
    EXPECT_EQ(c.vectors, again.vectors);
    EXPECT_EQ(c.scales, again.scales);
    EXPECT_EQ(c.weights, again.weights);
    ASSERT_EQ(c.vectors.size(), 2u * cr * 32);
    for (uint32_t kv = 0; kv < 2; ++kv) {
      float total = 0;
      for (uint32_t j = 0; j < cr; ++j) total += c.weights[kv * cr + j];
      EXPECT_EQ(total, 128.0f);
      // Each fine cluster goes to the coarse row nearest it; the weighted mean of the
      // fine clusters of a row is the row.
      std::vector<double> sum(cr * 32, 0.0), w(cr, 0.0);
      for (uint32_t j = 0; j < 8; ++j) {
        if (s.weights[kv * 8 + j] <= 0) continue;
        uint32_t best = 0;
        double bd = INFINITY;
        for (uint32_t g = 0; g < cr; ++g) {
          if (c.weights[kv * cr + g] <= 0) continue;
          double dist = 0;
          for (uint32_t x = 0; x < 32; ++x) {
            const double r = c.vectors[(kv * cr + g) * 32 + x] * double(c.scales[kv * cr + g]);
            dist += (Vec(s, b.shape, kv, j, x) - r) * (Vec(s, b.shape, kv, j, x) - r);
          }
          if (dist < bd) bd = dist, best = g;
        }
        w[best] += s.weights[kv * 8 + j];
        for (uint32_t x = 0; x < 32; ++x) {
          sum[best * 32 + x] += s.weights[kv * 8 + j] * Vec(s, b.shape, kv, j, x);
        }
      }
      for (uint32_t g = 0; g < cr; ++g) {
        EXPECT_EQ(w[g], c.weights[kv * cr + g]) << "kv " << kv << " row " << g;
        if (w[g] == 0) continue;
        for (uint32_t x = 0; x < 32; ++x) {
          const double r = c.vectors[(kv * cr + g) * 32 + x] * double(c.scales[kv * cr + g]);
          EXPECT_NEAR(r, sum[g * 32 + x] / w[g], 0.5 * c.scales[kv * cr + g] + 1e-3);
        }
      }
    }
    if (cr >= 2) {
      bool needle = false;
      for (uint32_t g = 0; g < cr; ++g) needle |= c.weights[cr + g] == 1.0f;
      EXPECT_TRUE(needle);
    }
  }
  // Fewer live clusters than coarse rows: each keeps its own row.
  BlockSummary few;
  ASSERT_TRUE(SummarizeBlock(b.shape, b.data.data(), 2, {}, &few).ok());
  CoarseSummary c;
  CoarsenSummary(b.shape, few, 3, &c);
  EXPECT_EQ(c.weights[0] + c.weights[1] + c.weights[2], 2.0f);
  EXPECT_EQ(c.weights[2], 0.0f);
  EXPECT_EQ(c.scales[2], 0.0f);
}

TEST(Summary, FewerTokensThanClustersLeavesEmptyClusters) {
  Block b = RandomBlock(SummaryKind::kClusters, 4, 5);
  BlockSummary s;
  ASSERT_TRUE(SummarizeBlock(b.shape, b.data.data(), 2, {}, &s).ok());
  int empty = 0;
  for (uint32_t j = 0; j < 4; ++j) empty += s.weights[j] == 0.0f;
  EXPECT_EQ(empty, 2);
}

TEST(Summary, Bf16KeysAndSaturation) {
  SummaryShape sh{1, 8, 4, DType::kBF16, SummaryKind::kMean, 1};
  std::vector<uint16_t> block(2 * 4 * 8);
  for (uint32_t t = 0; t < 4; ++t) {
    for (uint32_t c = 0; c < 8; ++c) block[t * 8 + c] = FloatToBf16Bits(c == 0 ? 1e6f : float(t));
  }
  BlockSummary s;
  ASSERT_TRUE(SummarizeBlock(sh, block.data(), 4, {}, &s).ok());
  EXPECT_EQ(HalfBitsToFloat(s.vectors[0]), 65504.0f);  // saturated, not infinite
  EXPECT_NEAR(HalfBitsToFloat(s.vectors[1]), 1.5f, 1e-3);
}

TEST(Summary, EncodeDecodeRoundTripAndRejectsOtherShapes) {
  Block b = RandomBlock(SummaryKind::kClusters, 4, 6);
  BlockSummary s, back;
  ASSERT_TRUE(SummarizeBlock(b.shape, b.data.data(), 30, {}, &s).ok());
  std::vector<std::byte> bytes = EncodeSummary(b.shape, s);
  ASSERT_TRUE(DecodeSummary(b.shape, bytes, &back).ok());
  EXPECT_EQ(back.vectors, s.vectors);
  EXPECT_EQ(back.weights, s.weights);
  EXPECT_EQ(back.valid_tokens, 30u);
  SummaryShape other = b.shape;
  other.rows = 2;
  EXPECT_TRUE(DecodeSummary(other, bytes, &back).code() == StatusCode::kCorruption);
  std::vector<std::byte> cut(bytes.begin(), bytes.end() - 1);
  EXPECT_TRUE(DecodeSummary(b.shape, cut, &back).code() == StatusCode::kCorruption);
  bytes[0] = std::byte{9};
  EXPECT_TRUE(DecodeSummary(b.shape, bytes, &back).code() == StatusCode::kCorruption);
}

TEST(Summary, BadInput) {
  Block b = RandomBlock(SummaryKind::kMean, 1, 7);
  BlockSummary s;
  EXPECT_TRUE(SummarizeBlock(b.shape, nullptr, 4, {}, &s).IsInvalidArgument());
  EXPECT_TRUE(SummarizeBlock(b.shape, b.data.data(), 0, {}, &s).IsInvalidArgument());
  EXPECT_TRUE(SummarizeBlock(b.shape, b.data.data(), 33, {}, &s).IsInvalidArgument());
  std::vector<float> short_scores(3);
  EXPECT_TRUE(SummarizeBlock(b.shape, b.data.data(), 4, short_scores, &s).IsInvalidArgument());
  SummaryShape bad = b.shape;
  bad.rows = 2;  // kMean has one row
  EXPECT_TRUE(SummarizeBlock(bad, b.data.data(), 4, {}, &s).IsInvalidArgument());
  bad = b.shape;
  bad.head_dim = 2048;
  EXPECT_TRUE(SummarizeBlock(bad, b.data.data(), 4, {}, &s).IsInvalidArgument());
}

// The batched k-means helpers give the same bits as the one-at-a-time code they replace
// (the summary must not depend on which path ran).
TEST(Summary, BatchedHelpersMatchScalarBits) {
  std::mt19937_64 rng(17);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (uint32_t d : {8u, 20u, 128u}) {
    const uint32_t n = 37, count = 12;
    std::vector<float> rows(uint64_t{n} * d), v(d);
    for (float& x : rows) x = nd(rng);
    for (float& x : v) x = nd(rng);
    std::vector<float> got(n);
    simd::SquaredDistances(rows.data(), n, v.data(), d, got.data());
    for (uint32_t r = 0; r < n; ++r) {
      const float want = simd::SquaredDistance(rows.data() + uint64_t{r} * d, v.data(), d);
      EXPECT_EQ(std::memcmp(&got[r], &want, 4), 0) << d << " " << r;
    }
    std::vector<float> norms(n), dots(uint64_t{count} * n), cnorm(count);
    for (float& x : norms) x = std::abs(nd(rng)) * 10;
    for (float& x : dots) x = nd(rng);
    for (float& x : cnorm) x = std::abs(nd(rng));
    dots[5] = dots[n + 5];  // a tie: the lower centroid wins
    cnorm[1] = cnorm[0];
    std::vector<uint32_t> assign(n, 99);
    simd::NearestCentroids(norms.data(), dots.data(), n, cnorm.data(), count, assign.data());
    for (uint32_t t = 0; t < n; ++t) {
      uint32_t want = 0;
      float bd = std::numeric_limits<float>::infinity();
      for (uint32_t c = 0; c < count; ++c) {
        const float dist = norms[t] - 2.0f * dots[uint64_t{c} * n + t] + cnorm[c];
        if (dist < bd) bd = dist, want = c;
      }
      EXPECT_EQ(assign[t], want) << t;
    }
    std::vector<float> acc(d, 1.5f), want(d);
    for (uint32_t c = 0; c < d; ++c) want[c] = acc[c] + v[c];
    simd::AddTo(acc.data(), v.data(), d);
    EXPECT_EQ(acc, want);
  }
  // FloatToHalf (F16C when present) against the scalar conversion, saturation and
  // subnormals included.
  std::vector<float> f = {0.0f,  -0.0f,    1.0f / 3, 65504.0f, 70000.0f,   -1e9f,
                          6e-8f, 3e-8f,    1e-5f,    -2.5e-6f, 1234.5678f, 0.1f,
                          -7.0f, 2.98e-8f, 65519.0f, 1e-30f};
  for (int i = 0; i < 64; ++i) f.push_back(nd(rng) * 100);
  std::vector<uint16_t> h(f.size());
  simd::FloatToHalf(f.data(), h.data(), f.size());
  for (size_t i = 0; i < f.size(); ++i) {
    EXPECT_EQ(h[i], FloatToHalfBits(std::clamp(f[i], -65504.0f, 65504.0f))) << f[i];
  }
}

}  // namespace
}  // namespace kvtier
