// LayerIndex (index/layer_index.h) on the scan backend (and the gpu backend, emulated
// without a device, for the kinds it takes): its selection against the double-precision
// ReferenceSelect for every summary kind and both scopes, the estimator's meaning on
// constructed blocks, Add/Remove, candidate ranges, padding and bad input; and the fusion
// helpers. tests/gpu_index_test.cc checks the gpu backend in more depth.
#include "index/layer_index.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "index/fusion.h"
#include "index/simd.h"
#include "kernels/dtype_convert.h"

namespace kvtier {
namespace {

constexpr uint32_t kKv = 2, kHq = 8, kD = 32, kTokens = 16;

IndexConfig Config(SummaryKind kind, uint32_t rows, IndexBackend backend = IndexBackend::kScan) {
  IndexConfig c;
  c.num_query_heads = kHq;
  c.summary = {kKv, kD, kTokens, DType::kF32, kind, rows};
  c.backend = backend;
  return c;
}

std::vector<float> Randn(uint64_t n, std::mt19937_64& rng, float sd = 1.0f) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Summaries of random blocks (keys with a random per-block offset, so blocks differ).
std::vector<BlockSummary> RandomSummaries(const IndexConfig& c, uint64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<BlockSummary> out(n);
  for (uint64_t b = 0; b < n; ++b) {
    std::vector<float> block = Randn(2ull * kKv * kTokens * kD, rng);
    const std::vector<float> offset = Randn(kKv * kD, rng, 1.5f);
    for (uint32_t k = 0; k < kKv; ++k) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        for (uint32_t i = 0; i < kD; ++i) block[(k * kTokens + t) * kD + i] += offset[k * kD + i];
      }
    }
    const uint32_t valid = 1 + static_cast<uint32_t>(rng() % kTokens);
    EXPECT_TRUE(SummarizeBlock(c.summary, block.data(), valid, {}, &out[b]).ok());
  }
  return out;
}

// The selections agree except where the reference's scores tie closely.
void ExpectSameSelection(const std::vector<int64_t>& got, const std::vector<float>& got_scores,
                         const std::vector<int64_t>& want, const std::vector<float>& want_scores) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got_scores[i], want_scores[i], 1e-4 * std::abs(want_scores[i]) + 1e-9) << i;
    if (got[i] != want[i]) {
      ASSERT_GT(i + 1, 0u);
      EXPECT_NEAR(want_scores[i], got_scores[i], 1e-4 * std::abs(want_scores[i])) << "at " << i;
    }
  }
}

struct Case {
  SummaryKind kind;
  uint32_t rows;
  SelectionScope scope;
  IndexBackend backend = IndexBackend::kScan;
  uint32_t coarse_rows = 0;  // two-stage scoring when > 0
  uint32_t shortlist_factor = 0;
};

class LayerIndexVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(LayerIndexVsReference, SameSelectionAsTheDefinition) {
  const Case p = GetParam();
  IndexConfig c = Config(p.kind, p.rows, p.backend);
  c.coarse_rows = p.coarse_rows;
  c.shortlist_factor = p.shortlist_factor;
  auto index = CreateLayerIndex(c);
  ASSERT_TRUE(index.ok()) << index.status().ToString();
  const uint64_t n = 300;
  std::vector<BlockSummary> sums = RandomSummaries(c, n, 11);
  std::vector<uint64_t> ids;
  std::vector<const BlockSummary*> ptrs;
  for (uint64_t b = 0; b < n; ++b) {
    const uint64_t id = 1000 + 7 * b;  // ids need not be dense
    ASSERT_TRUE((*index)->Add(id, sums[b]).ok());
    ids.push_back(id);
    ptrs.push_back(&sums[b]);
  }
  EXPECT_EQ((*index)->size(), n);
  std::mt19937_64 rng(12);
  for (int step = 0; step < 5; ++step) {
    const std::vector<float> q = Randn(kHq * kD, rng, 2.0f);
    SelectParams sp{q, 10, p.scope, 1000 + 7 * 3, 1000 + 7 * 290};
    const uint64_t size = SelectOutputSize(c, p.scope, 10);
    std::vector<int64_t> got(size), want(size);
    std::vector<float> gs(size), ws(size);
    ASSERT_TRUE((*index)->Select(sp, got, gs).ok());
    ASSERT_TRUE(ReferenceSelect(c, ids, ptrs, sp, want, ws).ok());
    ExpectSameSelection(got, gs, want, ws);
    for (int64_t id : got) {
      ASSERT_GE(id, 1000 + 7 * 3);
      ASSERT_LT(id, 1000 + 7 * 290);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, LayerIndexVsReference,
    ::testing::Values(Case{SummaryKind::kClusters, 4, SelectionScope::kPerLayer},
                      Case{SummaryKind::kClusters, 3, SelectionScope::kPerKvHead},
                      Case{SummaryKind::kMean, 1, SelectionScope::kPerLayer},
                      Case{SummaryKind::kMinMax, 2, SelectionScope::kPerLayer},
                      Case{SummaryKind::kMinMax, 2, SelectionScope::kPerKvHead},
                      Case{SummaryKind::kTopR, 4, SelectionScope::kPerLayer}));

// kGpu takes every kind but kMinMax (Quest's bound stays on the CPU).
INSTANTIATE_TEST_SUITE_P(
    GpuKinds, LayerIndexVsReference,
    ::testing::Values(
        Case{SummaryKind::kClusters, 4, SelectionScope::kPerLayer, IndexBackend::kGpu},
        Case{SummaryKind::kClusters, 3, SelectionScope::kPerKvHead, IndexBackend::kGpu},
        Case{SummaryKind::kMean, 1, SelectionScope::kPerLayer, IndexBackend::kGpu},
        Case{SummaryKind::kTopR, 4, SelectionScope::kPerKvHead, IndexBackend::kGpu}));

// Two-stage scoring: a shortlist of shortlist_factor * 10 of the ~287 candidates (per KV
// head for kPerKvHead), rescored with the full summary.
INSTANTIATE_TEST_SUITE_P(
    TwoStage, LayerIndexVsReference,
    ::testing::Values(
        Case{SummaryKind::kClusters, 8, SelectionScope::kPerLayer, IndexBackend::kScan, 2, 3},
        Case{SummaryKind::kClusters, 6, SelectionScope::kPerKvHead, IndexBackend::kScan, 1, 2},
        Case{SummaryKind::kClusters, 12, SelectionScope::kPerLayer, IndexBackend::kScan, 3, 1},
        Case{SummaryKind::kClusters, 4, SelectionScope::kPerKvHead, IndexBackend::kScan, 2, 4}));

// The two stages as defined: when the shortlist holds every candidate, the selection is
// the one-stage estimator's over the full summaries (the fine set then holds every
// block); with a short shortlist it is the shortlist's best, which the one-stage
// selection need not be (the test would not notice a backend that skipped the first
// pass otherwise).
TEST(LayerIndex, TwoStageIsOneStageWhenEveryCandidateIsShortlisted) {
  IndexConfig one = Config(SummaryKind::kClusters, 8);
  IndexConfig two = one;
  two.coarse_rows = 2;
  two.shortlist_factor = 30;  // 30 * 10 >= 200 candidates
  IndexConfig narrow = two;
  narrow.shortlist_factor = 1;
  auto index = CreateLayerIndex(two);
  ASSERT_TRUE(index.ok()) << index.status().ToString();
  const uint64_t n = 200;
  std::vector<BlockSummary> sums = RandomSummaries(one, n, 21);
  std::vector<uint64_t> ids;
  std::vector<const BlockSummary*> ptrs;
  for (uint64_t b = 0; b < n; ++b) {
    ASSERT_TRUE((*index)->Add(b, sums[b]).ok());
    ids.push_back(b);
    ptrs.push_back(&sums[b]);
  }
  std::mt19937_64 rng(22);
  int narrow_differs = 0;
  for (int step = 0; step < 6; ++step) {
    const std::vector<float> q = Randn(kHq * kD, rng, 2.0f);
    const SelectParams sp{q, 10};
    std::vector<int64_t> got(10), want(10), want_narrow(10);
    std::vector<float> gs(10), ws(10), wn(10);
    ASSERT_TRUE((*index)->Select(sp, got, gs).ok());
    ASSERT_TRUE(ReferenceSelect(one, ids, ptrs, sp, want, ws).ok());
    ExpectSameSelection(got, gs, want, ws);
    ASSERT_TRUE(ReferenceSelect(narrow, ids, ptrs, sp, want_narrow, wn).ok());
    std::vector<int64_t> a = want, b = want_narrow;
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    narrow_differs += a != b;
  }
  EXPECT_GT(narrow_differs, 0);
}

TEST(LayerIndex, TwoStageConfigChecked) {
  const auto code = [](IndexConfig c) { return CreateLayerIndex(c).status().code(); };
  IndexConfig c = Config(SummaryKind::kClusters, 8);
  c.coarse_rows = 2;
  c.shortlist_factor = 4;
  EXPECT_EQ(code(c), StatusCode::kOk);
  IndexConfig bad = c;
  bad.backend = IndexBackend::kGpu;
  EXPECT_EQ(code(bad), StatusCode::kInvalidArgument);
  bad = c;
  bad.summary.kind = SummaryKind::kTopR;
  EXPECT_EQ(code(bad), StatusCode::kInvalidArgument);
  bad = c;
  bad.coarse_rows = 8;  // not below rows
  EXPECT_EQ(code(bad), StatusCode::kInvalidArgument);
  bad = c;
  bad.shortlist_factor = 0;
  EXPECT_EQ(code(bad), StatusCode::kInvalidArgument);
  bad = c;
  bad.coarse_rows = 0;
  EXPECT_EQ(code(bad), StatusCode::kInvalidArgument);
}

// A block holding one key aligned with a query head (logit 12) outranks blocks of random
// keys with random offsets: the clusters keep the needle, the mean dilutes it 16-fold.
TEST(LayerIndex, ClustersFindALoneNeedleThatTheMeanDilutes) {
  std::mt19937_64 rng(5);
  const std::vector<float> q = Randn(kHq * kD, rng, 1.0f);
  std::vector<uint64_t> hits(3, 0);
  // Clusters; the mean; two-stage, 8 clusters behind 2 coarse rows and a shortlist of 2.
  const SummaryKind kinds[3] = {SummaryKind::kClusters, SummaryKind::kMean, SummaryKind::kClusters};
  for (int trial = 0; trial < 10; ++trial) {
    const uint64_t needle_block = 5 + trial * 3;
    for (int k = 0; k < 3; ++k) {
      IndexConfig c = Config(kinds[k], k == 0 ? 4 : k == 1 ? 1 : 8);
      if (k == 2) c.coarse_rows = 2, c.shortlist_factor = 2;
      auto index = CreateLayerIndex(c);
      ASSERT_TRUE(index.ok());
      std::mt19937_64 brng(100 + trial);
      for (uint64_t b = 0; b < 64; ++b) {
        std::vector<float> block = Randn(2ull * kKv * kTokens * kD, brng);
        // Blocks differ by a random offset (mean logits of deviation ~1.5), as topics do.
        const std::vector<float> offset = Randn(kD, brng, 1.5f);
        for (uint32_t t = 0; t < kTokens; ++t) {
          for (uint32_t i = 0; i < kD; ++i) block[t * kD + i] += offset[i];
        }
        if (b == needle_block) {
          // Token 9 of KV head 0 points along query head 0 with logit 12.
          float qq = 0;
          for (uint32_t i = 0; i < kD; ++i) qq += q[i] * q[i];
          for (uint32_t i = 0; i < kD; ++i) {
            block[9 * kD + i] = 12.0f * std::sqrt(float(kD)) * q[i] / qq;
          }
        }
        BlockSummary s;
        ASSERT_TRUE(SummarizeBlock(c.summary, block.data(), kTokens, {}, &s).ok());
        ASSERT_TRUE((*index)->Add(b, s).ok());
      }
      std::vector<int64_t> out(1);
      ASSERT_TRUE((*index)->Select({q, 1}, out, {}).ok());
      hits[k] += out[0] == static_cast<int64_t>(needle_block);
    }
  }
  EXPECT_EQ(hits[0], 10u);
  EXPECT_LT(hits[1], 10u);
  EXPECT_EQ(hits[2], 10u);
}

TEST(LayerIndex, AddReplacesRemoveForgetsAndPadding) {
  for (IndexBackend backend : {IndexBackend::kScan, IndexBackend::kGpu}) {
    SCOPED_TRACE(std::string(IndexBackendName(backend)));
    IndexConfig c = Config(SummaryKind::kClusters, 2, backend);
    auto index = CreateLayerIndex(c);
    ASSERT_TRUE(index.ok());
    std::vector<BlockSummary> sums = RandomSummaries(c, 6, 3);
    for (uint64_t b = 0; b < 5; ++b) ASSERT_TRUE((*index)->Add(b, sums[b]).ok());
    std::mt19937_64 rng(4);
    const std::vector<float> q = Randn(kHq * kD, rng);
    std::vector<int64_t> out(8);
    std::vector<float> sc(8);
    ASSERT_TRUE((*index)->Select({q, 8}, out, sc).ok());
    EXPECT_EQ(std::count(out.begin(), out.end(), -1), 3);
    EXPECT_EQ(sc[7], 0.0f);
    const int64_t best = out[0];
    EXPECT_TRUE((*index)->Remove(static_cast<uint64_t>(best)));
    EXPECT_FALSE((*index)->Remove(static_cast<uint64_t>(best)));
    ASSERT_TRUE((*index)->Select({q, 8}, out, sc).ok());
    EXPECT_EQ(std::count(out.begin(), out.end(), best), 0);
    EXPECT_EQ(std::count(out.begin(), out.end(), -1), 4);
    // Re-adding block 0 with block 5's summary: same count, new content.
    ASSERT_TRUE((*index)->Add(static_cast<uint64_t>(best), sums[5]).ok());
    EXPECT_EQ((*index)->size(), 5u);
    std::vector<uint64_t> ids;
    std::vector<const BlockSummary*> ptrs;
    for (uint64_t b = 0; b < 5; ++b) {
      ids.push_back(b);
      ptrs.push_back(b == static_cast<uint64_t>(best) ? &sums[5] : &sums[b]);
    }
    std::vector<int64_t> want(8);
    std::vector<float> ws(8);
    ASSERT_TRUE(ReferenceSelect(c, ids, ptrs, {q, 8}, want, ws).ok());
    ASSERT_TRUE((*index)->Select({q, 8}, out, sc).ok());
    ExpectSameSelection(out, sc, want, ws);
    EXPECT_GT((*index)->memory_bytes(), 0u);
  }
}

TEST(LayerIndex, BadArguments) {
  IndexConfig c = Config(SummaryKind::kMean, 1);
  auto index = CreateLayerIndex(c);
  ASSERT_TRUE(index.ok());
  std::vector<float> q(kHq * kD, 1.0f), short_q(5);
  std::vector<int64_t> out(4), wrong(3);
  std::vector<float> bad_scores(2);
  EXPECT_TRUE((*index)->Select({short_q, 4}, out, {}).IsInvalidArgument());
  EXPECT_TRUE((*index)->Select({q, 0}, out, {}).IsInvalidArgument());
  EXPECT_TRUE((*index)->Select({q, 4}, wrong, {}).IsInvalidArgument());
  EXPECT_TRUE((*index)->Select({q, 4}, out, bad_scores).IsInvalidArgument());
  BlockSummary other;
  other.vectors.resize(3);
  EXPECT_TRUE((*index)->Add(0, other).IsInvalidArgument());
  IndexConfig bad = c;
  bad.num_query_heads = 3;
  EXPECT_TRUE(CreateLayerIndex(bad).status().IsInvalidArgument());
  bad = c;
  bad.backend = IndexBackend::kAuto;
  EXPECT_TRUE(CreateLayerIndex(bad).status().IsInvalidArgument());
  bad = Config(SummaryKind::kMinMax, 2);
  bad.backend = IndexBackend::kFaissHnsw;
  EXPECT_TRUE(CreateLayerIndex(bad).status().IsInvalidArgument());
  bad.backend = IndexBackend::kGpu;
  EXPECT_TRUE(CreateLayerIndex(bad).status().IsInvalidArgument());
  bad = c;
  bad.backend = static_cast<IndexBackend>(6);
  EXPECT_TRUE(CreateLayerIndex(bad).status().IsInvalidArgument());
}

TEST(Fusion, ExpMatchesStdExp) {
  std::vector<float> v, want;
  for (float x = -100.0f; x < 88.0f; x += 0.173f) v.push_back(x);
  v.push_back(-INFINITY);
  v.push_back(NAN);
  for (float x : v) want.push_back(x >= -87.0f ? std::exp(x) : 0.0f);
  want.back() = 0.0f;
  ExpInPlace(v.data(), v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    EXPECT_NEAR(v[i], want[i], 3e-7 * want[i] + 1e-38) << i;
  }
}

TEST(Fusion, MassFromTermsSumsRowsRelativeToTheLargest) {
  std::vector<float> t = {0.0f, 1.0f, -INFINITY, 2.0f, -200.0f, -INFINITY};
  std::vector<float> m(3);
  const float shift = MassFromTerms(t.data(), 3, 2, m.data());
  EXPECT_EQ(shift, 2.0f);
  EXPECT_NEAR(m[0], std::exp(-2.0f) + std::exp(-1.0f), 1e-6);
  EXPECT_NEAR(m[1], 1.0f, 1e-6);
  EXPECT_EQ(m[2], 0.0f);
}

// The first pass's integer arithmetic: QuantizeI16's rounding and range, DotsI8I16 exact
// against int64 sums for head_dims on and off the vector width, g from 1 to 12.
TEST(LayerIndex, QuantizedDotsAreExact) {
  std::mt19937_64 rng(91);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::uniform_int_distribution<int> i8(-127, 127);
  for (uint32_t d : {8u, 16u, 24u, 128u, 1024u}) {
    const int32_t limit = simd::I16Limit(d);
    EXPECT_LE(int64_t{limit} * 127 * d, int64_t{INT32_MAX}) << d;
    for (uint32_t g : {1u, 3u, 4u, 12u}) {
      const uint32_t count = 7;
      std::vector<float> qf(uint64_t{g} * d);
      for (float& x : qf) x = nd(rng);
      std::vector<int16_t> qi(qf.size());
      std::vector<float> qs(g);
      for (uint32_t h = 0; h < g; ++h) {
        qs[h] = simd::QuantizeI16(qf.data() + uint64_t{h} * d, d, qi.data() + uint64_t{h} * d);
        ASSERT_GT(qs[h], 0.0f);
        for (uint32_t c = 0; c < d; ++c) {
          const float v = qf[uint64_t{h} * d + c] / qs[h];
          EXPECT_EQ(qi[uint64_t{h} * d + c], std::clamp<long>(std::lround(v), -limit, limit));
        }
      }
      std::vector<int8_t> rows(uint64_t{count} * d);
      for (int8_t& x : rows) x = static_cast<int8_t>(i8(rng));
      std::vector<float> dots(uint64_t{g} * count, std::nanf(""));
      simd::DotsI8I16(rows.data(), count, d, qi.data(), g, dots.data(), count);
      for (uint32_t h = 0; h < g; ++h) {
        for (uint32_t r = 0; r < count; ++r) {
          int64_t want = 0;
          for (uint32_t c = 0; c < d; ++c) {
            want += int64_t{rows[uint64_t{r} * d + c]} * qi[uint64_t{h} * d + c];
          }
          EXPECT_EQ(dots[uint64_t{h} * count + r], static_cast<float>(want))
              << "d " << d << " g " << g << " h " << h << " r " << r;
        }
      }
    }
  }
  // Zero, infinite and NaN queries quantize to zeros with scale 0.
  std::vector<float> bad = {0.0f, 0.0f, 1.0f, std::nanf("")};
  std::vector<int16_t> out(4, 7);
  EXPECT_EQ(simd::QuantizeI16(bad.data(), 4, out.data()), 0.0f);
  EXPECT_EQ(out, std::vector<int16_t>(4, 0));
  bad = {0.0f, 0.0f, 0.0f, 0.0f};
  EXPECT_EQ(simd::QuantizeI16(bad.data(), 4, out.data()), 0.0f);
}

}  // namespace
}  // namespace kvtier
