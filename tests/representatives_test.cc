// ComputeRepresentativesRef against naive double-precision math, written here
// independently: top-R by a stable sort, means in double, min/max by comparison.
#include "kernels/representatives.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/dtype_convert.h"

namespace kvtier {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// num_blocks whole kvtier blocks (keys, then values) with random keys (normal, a few
// outlier channels) and NaN values, which no representative may read.
struct Blocks {
  RepresentativeShape shape;
  std::vector<std::vector<unsigned char>> bytes;
  std::vector<const void*> ptrs;
  std::vector<float> scores;    // [blocks][kv_heads][block_tokens]
  std::vector<uint32_t> valid;  // [blocks]

  float Key(uint32_t b, uint32_t h, uint32_t t, uint32_t c) const {
    return LoadAsFloat(ptrs[b], (uint64_t{h} * shape.block_tokens + t) * shape.head_dim + c,
                       shape.dtype);
  }
  float Score(uint32_t b, uint32_t h, uint32_t t) const {
    return scores[(uint64_t{b} * shape.num_kv_heads + h) * shape.block_tokens + t];
  }
};

Blocks MakeBlocks(const RepresentativeShape& s, std::mt19937_64& rng, bool partial) {
  Blocks out;
  out.shape = s;
  const uint64_t elems = uint64_t{s.num_kv_heads} * s.block_tokens * s.head_dim;
  const uint32_t esize = DTypeBytes(s.dtype);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> coarse(0, 7);  // few distinct scores: many ties
  for (uint32_t b = 0; b < s.num_blocks; ++b) {
    std::vector<unsigned char> block(2 * elems * esize);
    for (uint64_t i = 0; i < elems; ++i) {
      const uint32_t c = static_cast<uint32_t>(i % s.head_dim);
      const float scale = (c % 17 == 3) ? 20.0f : 1.0f;  // outlier channels
      StoreFromFloat(block.data(), i, s.dtype, normal(rng) * scale);
    }
    for (uint64_t i = elems; i < 2 * elems; ++i) StoreFromFloat(block.data(), i, s.dtype, kNaN);
    out.bytes.push_back(std::move(block));
  }
  for (auto& block : out.bytes) out.ptrs.push_back(block.data());
  out.scores.resize(uint64_t{s.num_blocks} * s.num_kv_heads * s.block_tokens);
  for (float& v : out.scores) v = (rng() % 2) ? std::abs(normal(rng)) : float(coarse(rng));
  out.valid.assign(s.num_blocks, s.block_tokens);
  if (partial) {
    for (uint32_t b = 0; b < s.num_blocks; ++b) {
      out.valid[b] = 1 + static_cast<uint32_t>(rng() % s.block_tokens);
    }
    out.valid[0] = 1;
    if (s.num_blocks > 1) out.valid[1] = std::min<uint32_t>(2, s.block_tokens);
  }
  return out;
}

// The tokens of (b, h) best first: higher score, then lower index; NaN lowest.
std::vector<uint32_t> NaiveOrder(const Blocks& in, uint32_t b, uint32_t h, uint32_t valid) {
  std::vector<uint32_t> order(valid);
  std::iota(order.begin(), order.end(), 0u);
  const auto score = [&](uint32_t t) {
    const float v = in.Score(b, h, t);
    return std::isnan(v) ? -INFINITY : v;
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t x, uint32_t y) { return score(x) > score(y); });
  return order;
}

// Checks `out` against naive math; returns the number of mismatches (reported).
int CheckAgainstNaive(const Blocks& in, const std::vector<float>& out, bool partial) {
  const RepresentativeShape& s = in.shape;
  const uint32_t rows = RepresentativeRows(s.mode, s.top_r);
  int bad = 0;
  const auto expect_near = [&](float got, double want, double tol, uint32_t b, uint32_t h,
                               uint32_t row, uint32_t c) {
    if (std::isnan(got) || std::abs(got - want) > tol) {
      if (++bad <= 5) {
        ADD_FAILURE() << "block " << b << " head " << h << " row " << row << " channel " << c
                      << ": got " << got << " want " << want << " tol " << tol;
      }
    }
  };
  for (uint32_t b = 0; b < s.num_blocks; ++b) {
    const uint32_t valid = partial ? in.valid[b] : s.block_tokens;
    for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
      const float* got = out.data() + ((uint64_t{b} * s.num_kv_heads + h) * rows) * s.head_dim;
      double max_abs = 0;
      for (uint32_t t = 0; t < valid; ++t) {
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          max_abs = std::max(max_abs, double(std::abs(in.Key(b, h, t, c))));
        }
      }
      if (s.mode == RepresentativeMode::kTopR || s.mode == RepresentativeMode::kTopRMean) {
        const std::vector<uint32_t> order = NaiveOrder(in, b, h, valid);
        const uint32_t count = std::min(s.top_r, valid);
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          if (s.mode == RepresentativeMode::kTopR) {
            for (uint32_t j = 0; j < s.top_r; ++j) {
              expect_near(got[uint64_t{j} * s.head_dim + c], in.Key(b, h, order[j % count], c), 0,
                          b, h, j, c);
            }
          } else {
            double sum = 0;
            for (uint32_t j = 0; j < count; ++j) sum += in.Key(b, h, order[j], c);
            // Float summation of `count` terms: error below count * eps * max|k|.
            expect_near(got[c], sum / count, (count + 1) * FLT_EPSILON * max_abs, b, h, 0, c);
          }
        }
      } else if (s.mode == RepresentativeMode::kMean) {
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          double sum = 0;
          for (uint32_t t = 0; t < valid; ++t) sum += in.Key(b, h, t, c);
          expect_near(got[c], sum / valid, (valid + 1) * FLT_EPSILON * max_abs, b, h, 0, c);
        }
      } else {
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          double lo = INFINITY, hi = -INFINITY;
          for (uint32_t t = 0; t < valid; ++t) {
            lo = std::min(lo, double(in.Key(b, h, t, c)));
            hi = std::max(hi, double(in.Key(b, h, t, c)));
          }
          expect_near(got[c], lo, 0, b, h, 0, c);
          expect_near(got[s.head_dim + c], hi, 0, b, h, 1, c);
        }
      }
    }
  }
  return bad;
}

constexpr RepresentativeMode kModes[] = {RepresentativeMode::kTopR, RepresentativeMode::kTopRMean,
                                         RepresentativeMode::kMean, RepresentativeMode::kMinMax};
constexpr DType kDTypes[] = {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3};

TEST(RepresentativesTest, MatchesNaiveMathAcrossShapesAndDtypes) {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (DType dtype : kDTypes) {
    for (uint32_t head_dim : {64u, 128u, 256u, 100u}) {
      for (uint32_t block_tokens : {16u, 200u}) {
        for (uint32_t kv_heads : {1u, 3u}) {
          for (RepresentativeMode mode : kModes) {
            for (uint32_t top_r : {1u, 4u}) {
              if (top_r != 4 &&
                  (mode == RepresentativeMode::kMean || mode == RepresentativeMode::kMinMax)) {
                continue;
              }
              for (bool partial : {false, true}) {
                const RepresentativeShape s{.num_blocks = 3,
                                            .num_kv_heads = kv_heads,
                                            .block_tokens = block_tokens,
                                            .head_dim = head_dim,
                                            .dtype = dtype,
                                            .mode = mode,
                                            .top_r = top_r};
                const Blocks in = MakeBlocks(s, rng, partial);
                std::vector<float> out(RepresentativeElements(s) + 1, -12345.0f);
                ASSERT_TRUE(ComputeRepresentativesRef(s, in.ptrs.data(), in.scores.data(),
                                                      partial ? in.valid.data() : nullptr,
                                                      out.data(), nullptr)
                                .ok());
                ASSERT_EQ(out.back(), -12345.0f) << "wrote past the end";
                out.pop_back();
                ASSERT_EQ(CheckAgainstNaive(in, out, partial), 0)
                    << "seed " << seed << " dtype " << DTypeName(dtype) << " head_dim " << head_dim
                    << " block_tokens " << block_tokens << " kv_heads " << kv_heads << " mode "
                    << int(mode) << " R " << top_r << " partial " << partial;
              }
            }
          }
        }
      }
    }
  }
}

// A 1-head, 8-token, head_dim-2 f32 block whose key for token t is (t, -t).
struct TinyBlock {
  std::vector<float> data = std::vector<float>(2 * 8 * 2, kNaN);
  const void* ptr;
  TinyBlock() {
    for (int t = 0; t < 8; ++t) {
      data[2 * t] = float(t);
      data[2 * t + 1] = float(-t);
    }
    ptr = data.data();
  }
};

RepresentativeShape TinyShape(RepresentativeMode mode, uint32_t top_r) {
  return RepresentativeShape{.num_blocks = 1,
                             .num_kv_heads = 1,
                             .block_tokens = 8,
                             .head_dim = 2,
                             .dtype = DType::kF32,
                             .mode = mode,
                             .top_r = top_r};
}

TEST(RepresentativesTest, TopRBreaksTiesByLowerTokenAndRanksNaNLast) {
  TinyBlock block;
  //                   t:  0     1     2    3     4     5    6     7
  const float scores[8] = {1.0f, kNaN, 3.0f, 3.0f, -0.0f, 0.0f, 3.0f, kNaN};
  std::vector<float> out(8 * 2);
  const RepresentativeShape s = TinyShape(RepresentativeMode::kTopR, 8);
  ASSERT_TRUE(ComputeRepresentativesRef(s, &block.ptr, scores, nullptr, out.data(), nullptr).ok());
  const int want[8] = {2, 3, 6, 0, 4, 5, 1, 7};  // -0 ties +0; NaN after every number
  for (int j = 0; j < 8; ++j) EXPECT_EQ(out[2 * j], float(want[j])) << "rank " << j;

  const float all_equal[8] = {5, 5, 5, 5, 5, 5, 5, 5};
  const RepresentativeShape mean = TinyShape(RepresentativeMode::kTopRMean, 4);
  ASSERT_TRUE(
      ComputeRepresentativesRef(mean, &block.ptr, all_equal, nullptr, out.data(), nullptr).ok());
  EXPECT_EQ(out[0], 1.5f);  // tokens 0..3
  EXPECT_EQ(out[1], -1.5f);
}

TEST(RepresentativesTest, PartialBlockRepeatsItsChosenKeys) {
  TinyBlock block;
  const float scores[8] = {1, 2, 3, 4, 5, 6, 7, 8};  // tokens >= valid would win if read
  const uint32_t valid = 3;
  std::vector<float> out(4 * 2);
  const RepresentativeShape s = TinyShape(RepresentativeMode::kTopR, 4);
  ASSERT_TRUE(ComputeRepresentativesRef(s, &block.ptr, scores, &valid, out.data(), nullptr).ok());
  const int want[4] = {2, 1, 0, 2};  // row 3 repeats row 3 % 3 = 0
  for (int j = 0; j < 4; ++j) EXPECT_EQ(out[2 * j], float(want[j])) << "row " << j;

  const RepresentativeShape mm = TinyShape(RepresentativeMode::kMinMax, 4);
  ASSERT_TRUE(ComputeRepresentativesRef(mm, &block.ptr, nullptr, &valid, out.data(), nullptr).ok());
  EXPECT_EQ(out[0], 0.0f);   // min of channel 0 over tokens 0..2
  EXPECT_EQ(out[1], -2.0f);  // min of channel 1
  EXPECT_EQ(out[2], 2.0f);   // max of channel 0
  EXPECT_EQ(out[3], 0.0f);   // max of channel 1
}

TEST(RepresentativesTest, MinMaxIgnoresNaNKeys) {
  TinyBlock block;
  block.data[2 * 5] = kNaN;  // token 5, channel 0
  std::vector<float> out(4);
  const RepresentativeShape s = TinyShape(RepresentativeMode::kMinMax, 4);
  ASSERT_TRUE(ComputeRepresentativesRef(s, &block.ptr, nullptr, nullptr, out.data(), nullptr).ok());
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[2], 7.0f);
  EXPECT_EQ(out[3], 0.0f);
}

TEST(RepresentativesTest, ShapeArithmetic) {
  RepresentativeShape s{.num_blocks = 10,
                        .num_kv_heads = 8,
                        .block_tokens = 128,
                        .head_dim = 128,
                        .dtype = DType::kBF16,
                        .mode = RepresentativeMode::kTopR,
                        .top_r = 4};
  EXPECT_EQ(RepresentativeRows(s.mode, s.top_r), 4u);
  EXPECT_EQ(RepresentativeElements(s), 10u * 8 * 4 * 128);
  EXPECT_EQ(RepresentativeOffset(s, 2, 3, 1), ((2u * 8 + 3) * 4 + 1) * 128);
  EXPECT_EQ(RepresentativesBytesPerBlock(s), 8u * 128 * 4 + 8u * 4 * 128 * 2 + 8u * 4 * 128 * 4);
  s.mode = RepresentativeMode::kMinMax;
  EXPECT_EQ(RepresentativeRows(s.mode, s.top_r), 2u);
  EXPECT_EQ(RepresentativesBytesPerBlock(s), 8u * 128 * 128 * 2 + 8u * 2 * 128 * 4);
  s.mode = RepresentativeMode::kMean;
  EXPECT_EQ(RepresentativeRows(s.mode, s.top_r), 1u);
  // The rank key: higher score first, then lower index; NaN lowest; 0 below all.
  EXPECT_GT(ScoreRankKey(2.0f, 9), ScoreRankKey(1.0f, 0));
  EXPECT_GT(ScoreRankKey(1.0f, 3), ScoreRankKey(1.0f, 4));
  EXPECT_GT(ScoreRankKey(-1e30f, 0), ScoreRankKey(kNaN, 0));
  EXPECT_GT(ScoreRankKey(-0.0f, 0), ScoreRankKey(0.0f, 1));
  EXPECT_GT(ScoreRankKey(kNaN, 0xFFFFFFFEu), 0u);
  EXPECT_EQ(RankKeyIndex(ScoreRankKey(3.5f, 12345)), 12345u);
}

TEST(RepresentativesTest, RejectsBadArguments) {
  TinyBlock block;
  const float scores[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<float> out(64);
  const auto run = [&](RepresentativeShape s, const void* const* blocks = nullptr,
                       const float* sc = nullptr, const uint32_t* valid = nullptr,
                       float* o = nullptr) {
    return ComputeRepresentativesRef(s, blocks, sc, valid, o, nullptr);
  };
  const void* const* b = &block.ptr;
  const RepresentativeShape good = TinyShape(RepresentativeMode::kTopR, 4);
  ASSERT_TRUE(run(good, b, scores, nullptr, out.data()).ok());

  std::vector<RepresentativeShape> bad_shapes;
  for (int i = 0; i < 10; ++i) bad_shapes.push_back(good);
  bad_shapes[0].num_blocks = 0;
  bad_shapes[1].num_kv_heads = 0;
  bad_shapes[2].block_tokens = 0;
  bad_shapes[3].head_dim = 0;
  bad_shapes[4].head_dim = 2048;
  bad_shapes[5].top_r = 0;
  bad_shapes[6].top_r = 9;  // above block_tokens
  bad_shapes[7].dtype = static_cast<DType>(9);
  bad_shapes[8].mode = static_cast<RepresentativeMode>(7);
  bad_shapes[9].block_tokens = 8192;
  for (size_t i = 0; i < bad_shapes.size(); ++i) {
    const Status st = run(bad_shapes[i], b, scores, nullptr, out.data());
    EXPECT_TRUE(st.IsInvalidArgument()) << i << ": " << st.ToString();
    EXPECT_NE(st.message().find("ComputeRepresentatives"), std::string::npos);
  }
  EXPECT_TRUE(run(good, nullptr, scores, nullptr, out.data()).IsInvalidArgument());
  EXPECT_TRUE(run(good, b, scores, nullptr, nullptr).IsInvalidArgument());
  const Status no_scores = run(good, b, nullptr, nullptr, out.data());
  EXPECT_TRUE(no_scores.IsInvalidArgument());
  EXPECT_NE(no_scores.message().find("scores"), std::string::npos) << no_scores.ToString();
  // Score-free modes need no scores.
  EXPECT_TRUE(run(TinyShape(RepresentativeMode::kMean, 4), b, nullptr, nullptr, out.data()).ok());
  const uint32_t zero = 0, nine = 9;
  EXPECT_TRUE(run(good, b, scores, &zero, out.data()).IsInvalidArgument());
  EXPECT_TRUE(run(good, b, scores, &nine, out.data()).IsInvalidArgument());
  const void* null_block = nullptr;
  EXPECT_TRUE(run(good, &null_block, scores, nullptr, out.data()).IsInvalidArgument());
  // A block's keys beyond kMaxBlockBytes.
  RepresentativeShape huge = good;
  huge.num_kv_heads = 1u << 20;
  huge.block_tokens = 4096;
  huge.head_dim = 1024;
  EXPECT_TRUE(run(huge, b, scores, nullptr, out.data()).IsInvalidArgument());
}

TEST(RepresentativesTest, LaunchWithoutCudaIsNotSupported) {
  if (cuda::BuiltWithCuda()) GTEST_SKIP() << "built with CUDA: the GPU test covers Launch";
  TinyBlock block;
  std::vector<float> out(8);
  const Status st = LaunchComputeRepresentatives(TinyShape(RepresentativeMode::kMean, 4),
                                                 &block.ptr, nullptr, nullptr, out.data(), nullptr);
  EXPECT_EQ(st.code(), StatusCode::kNotSupported) << st.ToString();
}

}  // namespace
}  // namespace kvtier
