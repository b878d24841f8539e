// The CPU reference of EstimateBlockMass and GatherBlockScores (kernels/cluster_scoring.h)
// against a straightforward double-precision computation of the definition, on fresh
// seeded random inputs (fp16 rows with outlier channels, empty rows, partial candidate
// sets, block capacity beyond N), and the argument checks shared with the kernel.
//
// Tolerance: each score within 2e-5 relative of the double computation (float dots of
// head_dim terms of size ~1 and float exp/log: errors near 1e-6), NaN never.
#include "kernels/cluster_scoring.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernels/block_scoring.h"
#include "kernels/cuda_runtime.h"
#include "kernels/dtype_convert.h"

namespace kvtier {
namespace {

struct Inputs {
  BlockMassShape shape;
  std::vector<float> queries;       // [Hq][d], scaled
  std::vector<uint16_t> rows;       // [kv][capacity][rows][d]
  std::vector<float> log_weights;   // [kv][capacity][rows]
  std::vector<uint8_t> candidates;  // [N] or empty
};

Inputs RandomInputs(const BlockMassShape& s, bool with_candidates, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> weight(1.0f, 40.0f);
  Inputs in;
  in.shape = s;
  const float scale = 1.0f / std::sqrt(float(s.head_dim));
  in.queries.resize(uint64_t{s.num_query_heads} * s.head_dim);
  for (float& q : in.queries) q = 2.0f * normal(rng) * scale;
  const uint64_t all_rows = uint64_t{s.num_kv_heads} * s.block_capacity * s.rows;
  in.rows.resize(all_rows * s.head_dim);
  in.log_weights.resize(all_rows);
  for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
    for (uint64_t b = 0; b < s.block_capacity; ++b) {
      const float offset = 0.7f * normal(rng);  // blocks differ
      for (uint32_t j = 0; j < s.rows; ++j) {
        const uint64_t r = MassRowIndex(s, kv, b, j);
        const bool empty = b >= s.num_blocks ? rng() % 2 == 0 : rng() % 11 == 0;
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          const float outlier = c % 13 == 5 ? 6.0f : 1.0f;  // a few large channels
          in.rows[r * s.head_dim + c] =
              empty ? 0 : FloatToHalfBits(outlier * (normal(rng) + offset));
        }
        in.log_weights[r] = empty ? -INFINITY : std::log(weight(rng));
      }
    }
  }
  if (with_candidates) {
    in.candidates.resize(s.num_blocks);
    for (uint8_t& c : in.candidates) c = rng() % 4 != 0 ? 1 : 0;
  }
  return in;
}

// The definition in double: scores [score rows][N].
std::vector<double> Expected(const Inputs& in) {
  const BlockMassShape& s = in.shape;
  const uint32_t hq = s.num_query_heads, g = hq / s.num_kv_heads, d = s.head_dim;
  const uint64_t n = s.num_blocks;
  std::vector<double> e(uint64_t{hq} * n);
  for (uint32_t h = 0; h < hq; ++h) {
    const uint32_t kv = h / g;
    for (uint64_t b = 0; b < n; ++b) {
      double sum = 0.0;
      for (uint32_t j = 0; j < s.rows; ++j) {
        const uint64_t r = MassRowIndex(s, kv, b, j);
        if (in.log_weights[r] == -INFINITY) continue;
        double dot = 0.0;
        for (uint32_t c = 0; c < d; ++c) {
          dot += double(in.queries[uint64_t{h} * d + c]) * HalfBitsToFloat(in.rows[r * d + c]);
        }
        sum += std::exp(dot + in.log_weights[r]);
      }
      e[h * n + b] = std::log(sum);  // -inf for a block of empty rows
    }
  }
  const uint32_t score_rows = MassScoreRows(s);
  std::vector<double> f(uint64_t{score_rows} * n, 0.0);
  for (uint32_t h = 0; h < hq; ++h) {
    double z = 0.0;
    for (uint64_t b = 0; b < n; ++b) z += std::exp(e[h * n + b]);
    if (z == 0.0) continue;
    const uint32_t row = score_rows == 1 ? 0 : h / g;
    for (uint64_t b = 0; b < n; ++b) f[row * n + b] += std::exp(e[h * n + b]) / z;
  }
  if (!in.candidates.empty()) {
    for (uint32_t row = 0; row < score_rows; ++row) {
      for (uint64_t b = 0; b < n; ++b) {
        if (in.candidates[b] == 0) f[row * n + b] = -INFINITY;
      }
    }
  }
  return f;
}

std::vector<float> RunRef(const Inputs& in, Status* status) {
  const BlockMassShape& s = in.shape;
  std::vector<float> scores(uint64_t{MassScoreRows(s)} * s.num_blocks, 12345.0f);
  const uint64_t ws_bytes = EstimateBlockMassWorkspaceBytes(s);
  std::vector<uint64_t> ws(ws_bytes / 8 + 1);
  *status = EstimateBlockMassRef(s, in.queries.data(), in.rows.data(), in.log_weights.data(),
                                 in.candidates.empty() ? nullptr : in.candidates.data(),
                                 scores.data(), ws.data(), ws_bytes, nullptr);
  return scores;
}

struct Case {
  uint32_t hq, kv, d, rows, n, capacity;
  BlockSelection selection;
  bool candidates;
};

class ClusterScoringRef : public ::testing::TestWithParam<Case> {};

TEST_P(ClusterScoringRef, MatchesTheDefinitionInDouble) {
  const Case c = GetParam();
  const BlockMassShape s{.num_blocks = c.n,
                         .block_capacity = c.capacity,
                         .num_query_heads = c.hq,
                         .num_kv_heads = c.kv,
                         .head_dim = c.d,
                         .rows = c.rows,
                         .selection = c.selection};
  std::mt19937_64 rng(1000 + c.hq * 31 + c.d * 7 + c.n);
  for (int trial = 0; trial < 3; ++trial) {
    const Inputs in = RandomInputs(s, c.candidates, rng);
    Status st;
    const std::vector<float> got = RunRef(in, &st);
    ASSERT_TRUE(st.ok()) << st.ToString();
    const std::vector<double> want = Expected(in);
    ASSERT_EQ(got.size(), want.size());
    double total = 0.0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_FALSE(std::isnan(got[i])) << i;
      if (want[i] == -INFINITY) {
        EXPECT_EQ(got[i], -INFINITY) << i;
        continue;
      }
      EXPECT_NEAR(got[i], want[i], 2e-5 * want[i] + 1e-30) << "score " << i;
      total += got[i];
    }
    if (!c.candidates) {  // every head's masses sum to 1 over the blocks
      EXPECT_NEAR(total, double(c.hq), 1e-4 * c.hq);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ClusterScoringRef,
    ::testing::Values(Case{32, 8, 128, 3, 300, 300, BlockSelection::kPerLayer, false},
                      Case{32, 8, 128, 3, 300, 512, BlockSelection::kPerKvHead, true},
                      Case{28, 4, 64, 4, 97, 128, BlockSelection::kPerLayer, true},
                      Case{8, 8, 256, 1, 50, 64, BlockSelection::kPerKvHead, false},
                      Case{16, 1, 100, 2, 33, 40, BlockSelection::kPerLayer, false},
                      Case{12, 4, 32, 5, 1, 1, BlockSelection::kPerKvHead, false},
                      Case{64, 2, 64, 3, 120, 130, BlockSelection::kPerKvHead, true}),
    [](const ::testing::TestParamInfo<Case>& info) {
      const Case& c = info.param;
      return "hq" + std::to_string(c.hq) + "_kv" + std::to_string(c.kv) + "_d" +
             std::to_string(c.d) + "_rows" + std::to_string(c.rows) + "_n" + std::to_string(c.n) +
             "_cap" + std::to_string(c.capacity) +
             (c.selection == BlockSelection::kPerLayer ? "_layer" : "_kvhead") +
             (c.candidates ? "_candidates" : "_all");
    });

// A KV head whose rows are all empty has Z = -inf for its query heads: they add nothing
// (its per-KV-head scores are 0), and the other heads' scores are unchanged.
TEST(ClusterScoringRef, EmptyHeadAddsNothing) {
  const BlockMassShape s{.num_blocks = 40,
                         .block_capacity = 40,
                         .num_query_heads = 8,
                         .num_kv_heads = 2,
                         .head_dim = 64,
                         .rows = 3,
                         .selection = BlockSelection::kPerKvHead};
  std::mt19937_64 rng(7);
  Inputs in = RandomInputs(s, false, rng);
  for (uint64_t b = 0; b < s.num_blocks; ++b) {
    for (uint32_t j = 0; j < s.rows; ++j) in.log_weights[MassRowIndex(s, 1, b, j)] = -INFINITY;
  }
  Status st;
  const std::vector<float> got = RunRef(in, &st);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const std::vector<double> want = Expected(in);
  double head0 = 0.0;
  for (uint64_t b = 0; b < s.num_blocks; ++b) {
    EXPECT_EQ(got[s.num_blocks + b], 0.0f) << b;
    EXPECT_NEAR(got[b], want[b], 2e-5 * want[b]);
    head0 += got[b];
  }
  EXPECT_NEAR(head0, 4.0, 1e-4);
}

// Scores, then TopKBlocksRef, then GatherBlockScoresRef: the picks' scores in order, the
// candidates before every non-candidate.
TEST(ClusterScoringRef, TopKAndGatherOfTheScores) {
  const BlockMassShape s{.num_blocks = 200,
                         .block_capacity = 256,
                         .num_query_heads = 16,
                         .num_kv_heads = 4,
                         .head_dim = 64,
                         .rows = 3,
                         .selection = BlockSelection::kPerKvHead};
  std::mt19937_64 rng(8);
  const Inputs in = RandomInputs(s, true, rng);
  Status st;
  const std::vector<float> scores = RunRef(in, &st);
  ASSERT_TRUE(st.ok()) << st.ToString();
  uint32_t candidates = 0;
  for (uint8_t c : in.candidates) candidates += c;
  const uint32_t k = candidates + 5, rows = MassScoreRows(s);
  std::vector<int32_t> top(uint64_t{rows} * k);
  ASSERT_TRUE(
      TopKBlocksRef(scores.data(), rows, s.num_blocks, k, top.data(), nullptr, 0, nullptr).ok());
  std::vector<float> picked(top.size());
  ASSERT_TRUE(
      GatherBlockScoresRef(scores.data(), rows, s.num_blocks, top.data(), k, picked.data(), nullptr)
          .ok());
  for (uint32_t r = 0; r < rows; ++r) {
    for (uint32_t i = 0; i < k; ++i) {
      const int32_t b = top[r * k + i];
      EXPECT_EQ(picked[r * k + i], scores[r * s.num_blocks + b]);
      EXPECT_EQ(in.candidates[b] == 1, i < candidates) << "row " << r << " pick " << i;
      if (i > 0) {
        EXPECT_GE(picked[r * k + i - 1], picked[r * k + i]);
      }
    }
  }
  top[3] = 200;
  EXPECT_TRUE(
      GatherBlockScoresRef(scores.data(), rows, s.num_blocks, top.data(), k, picked.data(), nullptr)
          .IsInvalidArgument());
}

TEST(ClusterScoringRef, BadArgumentsAreInvalidArgument) {
  const BlockMassShape good{.num_blocks = 4,
                            .block_capacity = 8,
                            .num_query_heads = 8,
                            .num_kv_heads = 2,
                            .head_dim = 64,
                            .rows = 3};
  std::vector<float> q(8 * 64, 0.5f), lw(2 * 8 * 3, 0.0f), scores(2 * 4);
  std::vector<uint16_t> rows(2 * 8 * 3 * 64, FloatToHalfBits(0.25f));
  std::vector<uint64_t> ws(4096);
  const auto run = [&](const BlockMassShape& s, uint64_t ws_bytes = 4096 * 8) {
    return EstimateBlockMassRef(s, q.data(), rows.data(), lw.data(), nullptr, scores.data(),
                                ws.data(), ws_bytes, nullptr);
  };
  ASSERT_TRUE(run(good).ok());
  BlockMassShape s = good;
  s.num_blocks = 0;
  EXPECT_TRUE(run(s).IsInvalidArgument());
  s = good;
  s.block_capacity = 3;
  EXPECT_TRUE(run(s).IsInvalidArgument());
  s = good;
  s.num_query_heads = 7;
  EXPECT_TRUE(run(s).IsInvalidArgument());
  s = good;
  s.head_dim = 1025;
  EXPECT_TRUE(run(s).IsInvalidArgument());
  s = good;
  s.rows = kMaxMassRows + 1;
  EXPECT_TRUE(run(s).IsInvalidArgument());
  s = good;
  s.num_query_heads = 2 * (kMaxMassGroup + 1);
  EXPECT_TRUE(run(s).IsInvalidArgument());
  s = good;
  s.num_query_heads = 2 * 64;
  s.head_dim = 512;  // 64 * 512 queries per group: above kMaxMassGroupElements
  EXPECT_TRUE(run(s).IsInvalidArgument());
  s = good;
  s.num_kv_heads = kMaxScoringKvHeads * 2;
  s.num_query_heads = s.num_kv_heads;
  EXPECT_TRUE(run(s).IsInvalidArgument());
  s = good;
  s.selection = static_cast<BlockSelection>(7);
  EXPECT_TRUE(run(s).IsInvalidArgument());
  EXPECT_TRUE(run(good, EstimateBlockMassWorkspaceBytes(good) - 1).IsInvalidArgument());
  EXPECT_TRUE(EstimateBlockMassRef(good, nullptr, rows.data(), lw.data(), nullptr, scores.data(),
                                   ws.data(), 4096 * 8, nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(EstimateBlockMassRef(good, q.data(), rows.data(), lw.data(), nullptr, scores.data(),
                                   nullptr, 4096 * 8, nullptr)
                  .IsInvalidArgument());
  std::vector<int32_t> top(4, 0);
  EXPECT_TRUE(GatherBlockScoresRef(scores.data(), 1, 4, top.data(), 0, scores.data(), nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(GatherBlockScoresRef(nullptr, 1, 4, top.data(), 2, scores.data(), nullptr)
                  .IsInvalidArgument());
  // The bytes per block of the benchmark's shape (Llama-3-8B, 3 rows per KV head).
  const BlockMassShape llama{.num_blocks = 8192,
                             .block_capacity = 8192,
                             .num_query_heads = 32,
                             .num_kv_heads = 8,
                             .head_dim = 128,
                             .rows = 3};
  EXPECT_EQ(EstimateBlockMassBytesPerBlock(llama), 6629u);
}

// Without a device the launches report it as a Status, and the same validation runs first.
TEST(ClusterScoringRef, LaunchWithoutADeviceIsAStatus) {
  if (cuda::HasDevice()) GTEST_SKIP() << "a CUDA device is present";
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
  std::vector<int32_t> top(1, 0);
  EXPECT_FALSE(
      LaunchGatherBlockScores(scores.data(), 1, 2, top.data(), 1, scores.data(), nullptr).ok());
}

}  // namespace
}  // namespace kvtier
