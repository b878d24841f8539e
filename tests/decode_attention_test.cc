// DecodeAttentionRef and MergeAttentionStatesRef against softmax attention written out
// in double precision, on fresh random blocks.
#include "kernels/decode_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/dtype_convert.h"

namespace kvtier {
namespace {

constexpr double kU = 0x1p-24;  // float's unit roundoff
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Shape {
  DType dtype;
  uint32_t kv_heads, group, head_dim, block_tokens;
  uint32_t query_heads() const { return kv_heads * group; }
  uint64_t elements_per_block() const { return 2ull * kv_heads * block_tokens * head_dim; }
  std::string ToString() const {
    return std::string(DTypeName(dtype)) + " kv_heads=" + std::to_string(kv_heads) +
           " group=" + std::to_string(group) + " head_dim=" + std::to_string(head_dim) +
           " block_tokens=" + std::to_string(block_tokens);
  }
};

// Element of a block, indexed the way kvtier/layout.h describes it (written here again,
// not taken from the header under test).
double Key(const Shape& s, const void* block, uint32_t kv_head, uint32_t t, uint32_t d) {
  return LoadAsFloat(block, (uint64_t{kv_head} * s.block_tokens + t) * s.head_dim + d, s.dtype);
}
double Value(const Shape& s, const void* block, uint32_t kv_head, uint32_t t, uint32_t d) {
  const uint64_t keys = uint64_t{s.kv_heads} * s.block_tokens * s.head_dim;
  return LoadAsFloat(block, keys + (uint64_t{kv_head} * s.block_tokens + t) * s.head_dim + d,
                     s.dtype);
}

// A pool of blocks with random keys and values in [-1, 1] (stored in the shape's dtype).
std::vector<std::vector<unsigned char>> RandomBlocks(const Shape& s, int count,
                                                     std::mt19937_64& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<std::vector<unsigned char>> blocks(count);
  for (auto& b : blocks) {
    b.resize(s.elements_per_block() * DTypeBytes(s.dtype));
    for (uint64_t i = 0; i < s.elements_per_block(); ++i) {
      StoreFromFloat(b.data(), i, s.dtype, dist(rng));
    }
  }
  return blocks;
}

std::vector<float> RandomQueries(const Shape& s, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(uint64_t{s.query_heads()} * s.head_dim);
  for (float& x : q) x = dist(rng);
  return q;
}

struct Table {
  std::vector<const void*> blocks;
  std::vector<uint32_t> valid;
  uint32_t size() const { return static_cast<uint32_t>(blocks.size()); }
};

// `entries` entries drawn from the pool with repeats, in random order; the last one is
// partial and one in the middle is full.
Table RandomTable(const Shape& s, const std::vector<std::vector<unsigned char>>& pool, int entries,
                  std::mt19937_64& rng) {
  Table table;
  std::uniform_int_distribution<size_t> pick(0, pool.size() - 1);
  std::uniform_int_distribution<uint32_t> tokens(1, s.block_tokens);
  for (int e = 0; e < entries; ++e) {
    table.blocks.push_back(pool[pick(rng)].data());
    table.valid.push_back(e == entries - 1   ? std::max(1u, tokens(rng) / 2)
                          : e == entries / 2 ? s.block_tokens
                                             : tokens(rng));
  }
  return table;
}

// Softmax attention in double, and how far a float computation may be from it.
struct Expected {
  std::vector<double> out, lse, mass;  // [heads][dim], [heads], [entries][heads]
  std::vector<double> score_error;     // per head: a bound on a float score's error
  double max_abs_value = 0;
  uint64_t tokens = 0;
};

Expected Naive(const Shape& s, const std::vector<float>& q, const Table& table, double scale) {
  const uint32_t heads = s.query_heads(), dim = s.head_dim;
  Expected x;
  x.out.assign(uint64_t{heads} * dim, 0.0);
  x.lse.assign(heads, -INFINITY);
  x.mass.assign(uint64_t{table.size()} * heads, 0.0);
  x.score_error.assign(heads, 0.0);
  for (uint32_t e = 0; e < table.size(); ++e) x.tokens += table.valid[e];
  for (uint32_t h = 0; h < heads; ++h) {
    const uint32_t g = h / s.group;
    std::vector<double> scores;
    double max_score = -INFINITY;
    for (uint32_t e = 0; e < table.size(); ++e) {
      for (uint32_t t = 0; t < table.valid[e]; ++t) {
        double dot = 0, abs_dot = 0;
        for (uint32_t d = 0; d < dim; ++d) {
          const double p = q[uint64_t{h} * dim + d] * Key(s, table.blocks[e], g, t, d);
          dot += p;
          abs_dot += std::fabs(p);
        }
        scores.push_back(dot * scale);
        max_score = std::max(max_score, dot * scale);
        // A float dot product of `dim` terms is within gamma_dim * sum|q_d k_d| of the
        // exact one; the scaling and the subtraction of the maximum add a rounding each.
        x.score_error[h] = std::max(x.score_error[h], (dim + 2) * kU * abs_dot * std::fabs(scale) +
                                                          4 * kU * std::fabs(dot * scale));
      }
    }
    if (scores.empty()) continue;
    double sum = 0;
    for (double sc : scores) sum += std::exp(sc - max_score);
    x.lse[h] = max_score + std::log(sum);
    uint64_t i = 0;
    for (uint32_t e = 0; e < table.size(); ++e) {
      for (uint32_t t = 0; t < table.valid[e]; ++t, ++i) {
        const double p = std::exp(scores[i] - x.lse[h]);
        x.mass[uint64_t{e} * heads + h] += p;
        for (uint32_t d = 0; d < dim; ++d) {
          const double v = Value(s, table.blocks[e], g, t, d);
          x.out[uint64_t{h} * dim + d] += p * v;
          x.max_abs_value = std::max(x.max_abs_value, std::fabs(v));
        }
      }
    }
  }
  return x;
}

// A bound on the relative error of a float softmax weight: the scores' error (twice: the
// token's and the maximum's), plus a rounding for each term of the float sums (N tokens),
// the exponential and the division.
double WeightError(const Expected& x, uint32_t h) {
  return std::expm1(2 * x.score_error[h]) + (2.0 * x.tokens + 8) * kU;
}

void ExpectMatches(const Expected& x, const Shape& s, uint32_t entries, const float* out,
                   const float* lse, const float* mass, const std::string& what) {
  SCOPED_TRACE(what);
  const uint32_t heads = s.query_heads(), dim = s.head_dim;
  for (uint32_t h = 0; h < heads; ++h) {
    const double rel = WeightError(x, h);
    const double out_tol = rel * x.max_abs_value + 1e-7;
    for (uint32_t d = 0; d < dim; ++d) {
      const uint64_t i = uint64_t{h} * dim + d;
      ASSERT_FALSE(std::isnan(out[i])) << "out NaN at head " << h << " channel " << d;
      ASSERT_NEAR(out[i], x.out[i], out_tol) << "out at head " << h << " channel " << d;
    }
    if (lse != nullptr) {
      ASSERT_FALSE(std::isnan(lse[h]));
      if (std::isinf(x.lse[h])) {
        EXPECT_EQ(lse[h], kNegInf);
      } else {
        EXPECT_NEAR(lse[h], x.lse[h], x.score_error[h] + rel + kU * std::fabs(x.lse[h]))
            << "lse of head " << h;
      }
    }
    if (mass != nullptr) {
      for (uint32_t e = 0; e < entries; ++e) {
        const uint64_t i = uint64_t{e} * heads + h;
        ASSERT_FALSE(std::isnan(mass[i]));
        // exp(s - lse): the weight's error and that of the float lse, rounded to
        // u * |lse| (1e3 * 2^-24 = 6e-5 relative for large logits).
        const double mass_rel = 2 * rel + x.score_error[h] + 2 * kU * std::fabs(x.lse[h]);
        ASSERT_NEAR(mass[i], x.mass[i], mass_rel * x.mass[i] + 1e-7)
            << "mass of entry " << e << " head " << h;
      }
    }
  }
}

struct Outputs {
  std::vector<float> out, lse, mass;
  Outputs(const Shape& s, uint32_t entries)
      : out(uint64_t{s.query_heads()} * s.head_dim, std::nanf("")),
        lse(s.query_heads(), std::nanf("")),
        mass(uint64_t{entries} * s.query_heads(), std::nanf("")) {}
};

Status RunRef(const Shape& s, const std::vector<float>& q, const Table& table, float scale,
              Outputs& o) {
  return DecodeAttentionRef(q.data(), s.query_heads(), s.kv_heads, s.head_dim, table.blocks.data(),
                            table.valid.data(), table.size(), s.block_tokens, s.dtype, scale,
                            o.out.data(), o.lse.data(), o.mass.data(), nullptr, 0, nullptr);
}

uint64_t FreshSeed() { return std::random_device{}(); }

TEST(DecodeAttentionTest, MatchesNaiveAcrossShapesAndDTypes) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3}) {
    for (uint32_t group : {1u, 4u, 7u, 8u}) {
      for (uint32_t head_dim : {64u, 128u, 256u}) {
        for (uint32_t block_tokens : {16u, 128u}) {
          const Shape s{dtype, 2, group, head_dim, block_tokens};
          const auto pool = RandomBlocks(s, 3, rng);
          const Table table = RandomTable(s, pool, 5, rng);
          const auto q = RandomQueries(s, rng);
          Outputs o(s, table.size());
          ASSERT_TRUE(RunRef(s, q, table, 0.0f, o).ok());
          const Expected x = Naive(s, q, table, 1.0 / std::sqrt(double(head_dim)));
          ExpectMatches(x, s, table.size(), o.out.data(), o.lse.data(), o.mass.data(),
                        s.ToString());
          if (HasFailure()) return;
        }
      }
    }
  }
}

TEST(DecodeAttentionTest, OtherHeadDimsAndExplicitScale) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (uint32_t head_dim : {8u, 80u, 96u, 200u}) {
    const Shape s{DType::kBF16, 3, 3, head_dim, 32};
    const auto pool = RandomBlocks(s, 4, rng);
    const Table table = RandomTable(s, pool, 6, rng);
    const auto q = RandomQueries(s, rng);
    Outputs o(s, table.size());
    ASSERT_TRUE(RunRef(s, q, table, 0.3f, o).ok());
    const Expected x = Naive(s, q, table, double(0.3f));
    ExpectMatches(x, s, table.size(), o.out.data(), o.lse.data(), o.mass.data(), s.ToString());
  }
}

// q.k of about +-1e3 after scaling: exp() of that overflows float, so only a softmax that
// subtracts the maximum stays finite. The scores here are exact in float (integers times
// bf16 values with few bits, scale a power of two), so the tolerance is that of the sums.
TEST(DecodeAttentionTest, LargeLogitsStayFinite) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const Shape s{DType::kBF16, 2, 4, 256, 64};
  const uint32_t heads = s.query_heads();
  std::vector<float> q(uint64_t{heads} * s.head_dim);
  std::vector<int> sign(q.size());
  std::bernoulli_distribution coin(0.5);
  for (uint64_t i = 0; i < q.size(); ++i) {
    sign[i] = coin(rng) ? 1 : -1;
    q[i] = 8.0f * sign[i];
  }
  // Keys: sign-aligned with query head 0 of their KV head, magnitudes m/16, m in
  // [0, 255]; every third token flipped so that scores of both signs appear.
  std::uniform_int_distribution<int> mag(0, 255);
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  std::vector<std::vector<unsigned char>> pool(3);
  for (auto& b : pool) {
    b.resize(s.elements_per_block() * 2);
    for (uint32_t g = 0; g < s.kv_heads; ++g) {
      for (uint32_t t = 0; t < s.block_tokens; ++t) {
        for (uint32_t d = 0; d < s.head_dim; ++d) {
          const uint64_t i = (uint64_t{g} * s.block_tokens + t) * s.head_dim + d;
          const int sg = sign[uint64_t{g} * s.group * s.head_dim + d] * (t % 3 == 2 ? -1 : 1);
          StoreFromFloat(b.data(), i, s.dtype, float(sg * mag(rng)) / 16.0f);
          StoreFromFloat(b.data(), s.elements_per_block() / 2 + i, s.dtype, val(rng));
        }
      }
    }
  }
  const Table table = RandomTable(s, pool, 4, rng);
  Outputs o(s, table.size());
  ASSERT_TRUE(RunRef(s, q, table, 1.0f / 16, o).ok());
  Expected x = Naive(s, q, table, 1.0 / 16);
  double max_abs_lse = 0;
  for (uint32_t h = 0; h < heads; ++h) max_abs_lse = std::max(max_abs_lse, std::fabs(x.lse[h]));
  EXPECT_GT(max_abs_lse, 500.0) << "the case is meant to have large logits";
  for (double& e : x.score_error) e = 0;  // exact by construction
  for (float v : o.out) ASSERT_TRUE(std::isfinite(v));
  for (float v : o.lse) ASSERT_TRUE(std::isfinite(v));
  for (float v : o.mass) ASSERT_TRUE(std::isfinite(v));
  ExpectMatches(x, s, table.size(), o.out.data(), o.lse.data(), o.mass.data(), "large logits");
}

// Attention over retrieved blocks and over the local window, computed apart and merged,
// equals attention over the whole table; part masses convert to whole masses.
TEST(DecodeAttentionTest, MergeOfPartsEqualsWhole) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (uint32_t group : {1u, 7u}) {
    const Shape s{DType::kF16, 2, group, 128, 16};
    const uint32_t heads = s.query_heads(), dim = s.head_dim;
    const auto pool = RandomBlocks(s, 6, rng);
    const Table whole = RandomTable(s, pool, 9, rng);
    Table parts[2];
    for (uint32_t e = 0; e < whole.size(); ++e) {
      Table& part = parts[e < 6 ? 0 : 1];
      part.blocks.push_back(whole.blocks[e]);
      part.valid.push_back(whole.valid[e]);
    }
    const auto q = RandomQueries(s, rng);
    std::vector<float> outs, lses, part_masses[2];
    for (int i = 0; i < 2; ++i) {
      Outputs o(s, parts[i].size());
      ASSERT_TRUE(RunRef(s, q, parts[i], 0.0f, o).ok());
      outs.insert(outs.end(), o.out.begin(), o.out.end());
      lses.insert(lses.end(), o.lse.begin(), o.lse.end());
      part_masses[i] = o.mass;
    }
    std::vector<float> out(uint64_t{heads} * dim, std::nanf("")), lse(heads, std::nanf(""));
    ASSERT_TRUE(MergeAttentionStatesRef(outs.data(), lses.data(), 2, heads, dim, out.data(),
                                        lse.data(), nullptr)
                    .ok());
    std::vector<float> mass(uint64_t{whole.size()} * heads);
    for (uint32_t e = 0; e < whole.size(); ++e) {
      const int i = e < 6 ? 0 : 1;
      const uint32_t pe = e < 6 ? e : e - 6;
      for (uint32_t h = 0; h < heads; ++h) {
        mass[uint64_t{e} * heads + h] = part_masses[i][uint64_t{pe} * heads + h] *
                                        std::exp(lses[uint64_t(i) * heads + h] - lse[h]);
      }
    }
    Expected x = Naive(s, q, whole, 1.0 / std::sqrt(double(dim)));
    for (double& e : x.score_error) e += 8 * kU;  // the merge's own roundings
    ExpectMatches(x, s, whole.size(), out.data(), lse.data(), mass.data(),
                  "merged " + s.ToString());
  }
}

TEST(DecodeAttentionTest, MassesSumToOnePerHead) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const Shape s{DType::kFP8E4M3, 4, 4, 64, 128};
  const auto pool = RandomBlocks(s, 8, rng);
  const Table table = RandomTable(s, pool, 12, rng);
  const auto q = RandomQueries(s, rng);
  Outputs o(s, table.size());
  ASSERT_TRUE(RunRef(s, q, table, 0.0f, o).ok());
  uint64_t tokens = 0;
  for (uint32_t v : table.valid) tokens += v;
  for (uint32_t h = 0; h < s.query_heads(); ++h) {
    double sum = 0;
    for (uint32_t e = 0; e < table.size(); ++e) sum += o.mass[uint64_t{e} * s.query_heads() + h];
    // Each mass is a float sum of exp(s - lse); lse itself is rounded.
    EXPECT_NEAR(sum, 1.0, (2.0 * tokens + 8) * kU + 2 * kU * std::fabs(o.lse[h])) << "head " << h;
  }
}

TEST(DecodeAttentionTest, RepeatedAndReorderedEntries) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const Shape s{DType::kF32, 1, 4, 64, 16};
  const uint32_t heads = s.query_heads();
  const auto pool = RandomBlocks(s, 3, rng);
  const auto q = RandomQueries(s, rng);
  // A block listed twice counts twice: same output, lse + log 2, half the mass each.
  Table once, twice;
  once.blocks = {pool[0].data()};
  once.valid = {11};
  twice.blocks = {pool[0].data(), pool[0].data()};
  twice.valid = {11, 11};
  Outputs a(s, 1), b(s, 2);
  ASSERT_TRUE(RunRef(s, q, once, 0.0f, a).ok());
  ASSERT_TRUE(RunRef(s, q, twice, 0.0f, b).ok());
  for (size_t i = 0; i < a.out.size(); ++i) EXPECT_NEAR(a.out[i], b.out[i], 1e-6);
  for (uint32_t h = 0; h < heads; ++h) {
    EXPECT_NEAR(b.lse[h], a.lse[h] + std::log(2.0), 1e-5);
    EXPECT_NEAR(b.mass[h], 0.5, 1e-6);
    EXPECT_NEAR(b.mass[heads + h], 0.5, 1e-6);
  }
  // Order does not matter: reversing the table reverses the masses.
  const Table table = RandomTable(s, pool, 5, rng);
  Table reversed = table;
  std::reverse(reversed.blocks.begin(), reversed.blocks.end());
  std::reverse(reversed.valid.begin(), reversed.valid.end());
  Outputs c(s, 5), d(s, 5);
  ASSERT_TRUE(RunRef(s, q, table, 0.0f, c).ok());
  ASSERT_TRUE(RunRef(s, q, reversed, 0.0f, d).ok());
  for (size_t i = 0; i < c.out.size(); ++i) EXPECT_NEAR(c.out[i], d.out[i], 1e-5);
  for (uint32_t e = 0; e < 5; ++e) {
    for (uint32_t h = 0; h < heads; ++h) {
      EXPECT_NEAR(c.mass[e * heads + h], d.mass[(4 - e) * heads + h], 1e-6);
    }
  }
}

TEST(DecodeAttentionTest, EmptyEntriesAndEmptyTables) {
  std::mt19937_64 rng(FreshSeed());
  const Shape s{DType::kF16, 2, 2, 64, 16};
  const uint32_t heads = s.query_heads();
  const auto pool = RandomBlocks(s, 2, rng);
  const auto q = RandomQueries(s, rng);
  // An entry without tokens (even a null one) changes nothing and has mass 0.
  Table with, without;
  with.blocks = {pool[0].data(), nullptr, pool[1].data()};
  with.valid = {5, 0, 16};
  without.blocks = {pool[0].data(), pool[1].data()};
  without.valid = {5, 16};
  Outputs a(s, 3), b(s, 2);
  ASSERT_TRUE(RunRef(s, q, with, 0.0f, a).ok());
  ASSERT_TRUE(RunRef(s, q, without, 0.0f, b).ok());
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(a.lse, b.lse);
  for (uint32_t h = 0; h < heads; ++h) EXPECT_EQ(a.mass[heads + h], 0.0f);
  // No token at all: out 0, lse -inf, masses 0; merging that state changes nothing.
  Table empty;
  empty.blocks = {pool[0].data()};
  empty.valid = {0};
  Outputs e(s, 1);
  ASSERT_TRUE(RunRef(s, q, empty, 0.0f, e).ok());
  for (float v : e.out) EXPECT_EQ(v, 0.0f);
  for (float v : e.lse) EXPECT_EQ(v, kNegInf);
  for (float v : e.mass) EXPECT_EQ(v, 0.0f);
  std::vector<float> outs = b.out, lses = b.lse;
  outs.insert(outs.end(), e.out.size(), std::nanf(""));  // an empty state's out is ignored
  lses.insert(lses.end(), e.lse.begin(), e.lse.end());
  std::vector<float> out(b.out.size()), lse(heads);
  ASSERT_TRUE(MergeAttentionStatesRef(outs.data(), lses.data(), 2, heads, s.head_dim, out.data(),
                                      lse.data(), nullptr)
                  .ok());
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], b.out[i], 1e-6);
  for (uint32_t h = 0; h < heads; ++h) EXPECT_NEAR(lse[h], b.lse[h], 1e-6);
  ASSERT_TRUE(MergeAttentionStatesRef(lses.data() + heads, lses.data() + heads, 1, heads, 1,
                                      out.data(), lse.data(), nullptr)
                  .ok());
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(lse[0], kNegInf);
}

TEST(DecodeAttentionTest, DefaultScaleIsInverseSqrtHeadDim) {
  std::mt19937_64 rng(FreshSeed());
  const Shape s{DType::kBF16, 1, 2, 128, 16};
  const auto pool = RandomBlocks(s, 2, rng);
  const Table table = RandomTable(s, pool, 3, rng);
  const auto q = RandomQueries(s, rng);
  Outputs a(s, 3), b(s, 3);
  ASSERT_TRUE(RunRef(s, q, table, 0.0f, a).ok());
  ASSERT_TRUE(RunRef(s, q, table, 1.0f / std::sqrt(128.0f), b).ok());
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(a.lse, b.lse);
  EXPECT_EQ(a.mass, b.mass);
}

TEST(DecodeAttentionTest, RejectsBadArguments) {
  std::mt19937_64 rng(FreshSeed());
  const Shape s{DType::kF16, 2, 2, 64, 16};
  const auto pool = RandomBlocks(s, 1, rng);
  const auto q = RandomQueries(s, rng);
  Table table;
  table.blocks = {pool[0].data(), pool[0].data()};
  table.valid = {16, 3};
  std::vector<float> out(4 * 64), lse(4), mass(8);
  auto run = [&](const float* queries, uint32_t qh, uint32_t kvh, uint32_t dim,
                 const void* const* blocks, const uint32_t* valid, uint32_t entries,
                 uint32_t block_tokens, DType dtype, float scale, float* o) {
    return DecodeAttentionRef(queries, qh, kvh, dim, blocks, valid, entries, block_tokens, dtype,
                              scale, o, lse.data(), mass.data(), nullptr, 0, nullptr);
  };
  const auto* b = table.blocks.data();
  const auto* v = table.valid.data();
  EXPECT_TRUE(run(q.data(), 4, 2, 64, b, v, 2, 16, DType::kF16, 0, out.data()).ok());
  struct Bad {
    const char* what;
    Status status;
  } bad[] = {
      {"null queries", run(nullptr, 4, 2, 64, b, v, 2, 16, DType::kF16, 0, out.data())},
      {"null table", run(q.data(), 4, 2, 64, nullptr, v, 2, 16, DType::kF16, 0, out.data())},
      {"null valid", run(q.data(), 4, 2, 64, b, nullptr, 2, 16, DType::kF16, 0, out.data())},
      {"null out", run(q.data(), 4, 2, 64, b, v, 2, 16, DType::kF16, 0, nullptr)},
      {"zero heads", run(q.data(), 0, 2, 64, b, v, 2, 16, DType::kF16, 0, out.data())},
      {"zero kv heads", run(q.data(), 4, 0, 64, b, v, 2, 16, DType::kF16, 0, out.data())},
      {"zero entries", run(q.data(), 4, 2, 64, b, v, 0, 16, DType::kF16, 0, out.data())},
      {"zero block tokens", run(q.data(), 4, 2, 64, b, v, 2, 0, DType::kF16, 0, out.data())},
      {"heads not a multiple", run(q.data(), 3, 2, 64, b, v, 2, 16, DType::kF16, 0, out.data())},
      {"head_dim not /8", run(q.data(), 4, 2, 60, b, v, 2, 16, DType::kF16, 0, out.data())},
      {"head_dim > 256", run(q.data(), 4, 2, 512, b, v, 2, 16, DType::kF16, 0, out.data())},
      {"bad dtype", run(q.data(), 4, 2, 64, b, v, 2, 16, DType(9), 0, out.data())},
      {"NaN scale", run(q.data(), 4, 2, 64, b, v, 2, 16, DType::kF16, std::nanf(""), out.data())},
      {"huge block", run(q.data(), 4, 2, 256, b, v, 2, 1u << 30, DType::kF32, 0, out.data())},
      {"valid > block_tokens", run(q.data(), 4, 2, 64, b, v, 2, 2, DType::kF16, 0, out.data())},
  };
  for (const Bad& x : bad) {
    EXPECT_TRUE(x.status.IsInvalidArgument()) << x.what << ": " << x.status.message();
    EXPECT_FALSE(x.status.message().empty()) << x.what;
  }
  const void* with_null[] = {pool[0].data(), nullptr};
  EXPECT_TRUE(
      run(q.data(), 4, 2, 64, with_null, v, 2, 16, DType::kF16, 0, out.data()).IsInvalidArgument());
  EXPECT_TRUE(
      MergeAttentionStatesRef(nullptr, lse.data(), 1, 4, 64, out.data(), lse.data(), nullptr)
          .IsInvalidArgument());
  EXPECT_TRUE(
      MergeAttentionStatesRef(out.data(), lse.data(), 0, 4, 64, out.data(), lse.data(), nullptr)
          .IsInvalidArgument());
  EXPECT_TRUE(
      MergeAttentionStatesRef(out.data(), lse.data(), 1, 4, 300, out.data(), lse.data(), nullptr)
          .IsInvalidArgument());
}

TEST(DecodeAttentionTest, WorkspaceSizeCoversTheSplits) {
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(32, 128, 1), 32u * 129 * 4);
  EXPECT_EQ(DecodeAttentionWorkspaceBytes(32, 128, 1000),
            uint64_t{kMaxAttentionSplits} * 32 * 129 * 4);
}

TEST(DecodeAttentionTest, LaunchWithoutDeviceIsAStatus) {
  if (cuda::HasDevice()) GTEST_SKIP() << "a device is present: the GPU tests cover Launch";
  std::mt19937_64 rng(FreshSeed());
  const Shape s{DType::kF16, 1, 1, 64, 16};
  const auto pool = RandomBlocks(s, 1, rng);
  const auto q = RandomQueries(s, rng);
  const void* table[] = {pool[0].data()};
  const uint32_t valid[] = {16};
  std::vector<float> out(64), lse(1);
  EXPECT_FALSE(LaunchDecodeAttention(q.data(), 1, 1, 64, table, valid, 1, 16, DType::kF16, 0,
                                     out.data(), nullptr, nullptr, nullptr, 0, nullptr)
                   .ok());
  EXPECT_FALSE(
      LaunchMergeAttentionStates(out.data(), lse.data(), 1, 1, 64, out.data(), lse.data(), nullptr)
          .ok());
}

}  // namespace
}  // namespace kvtier
