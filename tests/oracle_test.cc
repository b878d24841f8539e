// AttentionOracle: block masses, the oracle top-k and the selection metrics, against
// hand-computed cases and a naive double-precision softmax.
#include "bench/workload/oracle.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/dtype_convert.h"

namespace kvtier::bench {
namespace {

std::unique_ptr<AttentionOracle> MakeOracle(const OracleConfig& config,
                                            const std::vector<float>& queries) {
  Result<std::unique_ptr<AttentionOracle>> oracle = AttentionOracle::Create(config, queries);
  EXPECT_TRUE(oracle.ok()) << oracle.status().ToString();
  return std::move(oracle).value();
}

// One KV head, one query head, head_dim 2, blocks of 2 tokens, 6 tokens (3 blocks), scale
// 1: the score of token t is its first key channel, its value (t, 1).
class TinyOracleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = {1, 1, 2, 2, 1.0, true};
    oracle_ = MakeOracle(config_, {1.0f, 0.0f});
    for (int t = 0; t < 6; ++t) {
      keys_.insert(keys_.end(), {scores_[t], 0.5f});
      values_.insert(values_.end(), {float(t), 1.0f});
    }
    ASSERT_TRUE(oracle_->AddTokens(keys_, values_, 6).ok());
    z_ = 0;
    for (const float s : scores_) z_ += std::exp(double(s));
  }
  double P(int t) const { return std::exp(double(scores_[t])) / z_; }

  const float scores_[6] = {0.0f, 1.0f, 2.0f, 0.0f, -1.0f, 3.0f};
  OracleConfig config_;
  std::unique_ptr<AttentionOracle> oracle_;
  std::vector<float> keys_, values_;
  double z_ = 0;
};

TEST_F(TinyOracleTest, BlockMassesAndOutput) {
  EXPECT_EQ(oracle_->num_tokens(), 6u);
  EXPECT_EQ(oracle_->num_blocks(), 3u);
  const std::vector<double> mass = oracle_->BlockMasses();
  ASSERT_EQ(mass.size(), 3u);
  EXPECT_NEAR(mass[0], P(0) + P(1), 1e-12);
  EXPECT_NEAR(mass[1], P(2) + P(3), 1e-12);
  EXPECT_NEAR(mass[2], P(4) + P(5), 1e-12);
  EXPECT_NEAR(oracle_->LogSumExp(0), std::log(z_), 1e-12);
  const std::vector<double> out = oracle_->FullOutput();
  double expect = 0;
  for (int t = 0; t < 6; ++t) expect += P(t) * t;
  EXPECT_NEAR(out[0], expect, 1e-12);
  EXPECT_NEAR(out[1], 1.0, 1e-12);
}

TEST_F(TinyOracleTest, MetricsOfASelection) {
  // No sinks, no window: every block is a candidate. Masses: block 2 > block 1 > block 0.
  SparsePolicy policy{0, 0, 1};
  EXPECT_EQ(oracle_->OracleTopK(policy), (std::vector<uint64_t>{2}));
  const std::vector<uint64_t> wrong = {1};
  Result<SelectionMetrics> m = oracle_->Evaluate(policy, wrong, std::vector<uint64_t>{3, 5});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->oracle_k, 1u);
  EXPECT_EQ(m->recall, 0.0);
  EXPECT_EQ(m->attended_blocks, 1u);
  EXPECT_NEAR(m->coverage, P(2) + P(3), 1e-12);
  // Sparse output: softmax over tokens 2 and 3 only.
  const double w2 = P(2) / (P(2) + P(3)), w3 = P(3) / (P(2) + P(3));
  const std::vector<double> full = oracle_->FullOutput();
  const double dx = w2 * 2 + w3 * 3 - full[0], dy = 1.0 - full[1];
  EXPECT_NEAR(m->output_rel_l2, std::sqrt((dx * dx + dy * dy) / (full[0] * full[0] + 1.0)), 1e-12);
  EXPECT_NEAR(m->output_rel_l2_max_head, m->output_rel_l2, 1e-12);
  EXPECT_EQ(m->needle_hits, (std::vector<bool>{true, false}));

  // Sinks (token 0 -> block 0) and a window of 1 token (block 2): one candidate, block 1.
  policy = {1, 1, 4};
  EXPECT_EQ(oracle_->SinkBlocks(policy), (std::pair<uint64_t, uint64_t>{0, 1}));
  EXPECT_EQ(oracle_->LocalBlocks(policy), (std::pair<uint64_t, uint64_t>{2, 3}));
  EXPECT_EQ(oracle_->OracleTopK(policy), (std::vector<uint64_t>{1}));
  m = oracle_->Evaluate(policy, {});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->oracle_k, 1u);  // fewer candidates than k: the denominator is 1
  EXPECT_EQ(m->recall, 0.0);
  EXPECT_NEAR(m->coverage, P(0) + P(1) + P(4) + P(5), 1e-12);
  // Selecting sinks or window blocks, or repeating a block, adds nothing to recall.
  const std::vector<uint64_t> repeated = {0, 2, 1, 1};
  m = oracle_->Evaluate(policy, repeated);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->recall, 1.0);
  EXPECT_NEAR(m->coverage, 1.0, 1e-12);
  EXPECT_NEAR(m->output_rel_l2, 0.0, 1e-12);
  EXPECT_EQ(m->attended_blocks, 3u);

  // A window of 3 tokens starts in block 1: nothing is left to select; recall is 1.
  policy = {1, 3, 2};
  EXPECT_EQ(oracle_->LocalBlocks(policy), (std::pair<uint64_t, uint64_t>{1, 3}));
  m = oracle_->Evaluate(policy, {});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->oracle_k, 0u);
  EXPECT_EQ(m->recall, 1.0);
  EXPECT_NEAR(m->coverage, 1.0, 1e-12);
}

TEST_F(TinyOracleTest, RejectsBadSelections) {
  const std::vector<uint64_t> past_end = {3};
  EXPECT_TRUE(oracle_->Evaluate({0, 0, 1}, past_end).status().IsInvalidArgument());
  EXPECT_TRUE(
      oracle_->Evaluate({0, 0, 1}, {}, std::vector<uint64_t>{6}).status().IsInvalidArgument());
}

TEST(OracleTest, RejectsBadConfigs) {
  const std::vector<float> q(64, 1.0f);
  EXPECT_FALSE(AttentionOracle::Create({0, 1, 8, 4, 0, true}, q).ok());
  EXPECT_FALSE(AttentionOracle::Create({3, 2, 8, 4, 0, true}, q).ok());  // not a multiple
  EXPECT_FALSE(AttentionOracle::Create({2, 1, 8, 0, 0, true}, q).ok());
  EXPECT_FALSE(AttentionOracle::Create({16, 1, 8, 4, 0, true}, q).ok());  // short queries
  auto oracle = AttentionOracle::Create({2, 1, 8, 4, 0, true}, q);
  ASSERT_TRUE(oracle.ok());
  const std::vector<float> k(8), v(8);
  EXPECT_TRUE((*oracle)->AddTokens(k, v, 2).IsInvalidArgument());  // spans too short
}

struct Random {
  uint32_t hq, hkv, d, bt;
  uint64_t tokens;
  std::vector<float> q, k, v;
};

Random MakeRandom(uint32_t hq, uint32_t hkv, uint32_t d, uint32_t bt, uint64_t tokens,
                  uint64_t seed) {
  Random r{hq, hkv, d, bt, tokens, {}, {}, {}};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  r.q.resize(size_t{hq} * d);
  r.k.resize(tokens * hkv * d);
  r.v.resize(r.k.size());
  for (float& x : r.q) x = 1.5f * n(rng);
  for (float& x : r.k) x = n(rng);
  for (float& x : r.v) x = n(rng);
  return r;
}

// Full attention the naive way: softmax over all tokens in double, per query head.
void NaiveAttention(const Random& r, std::vector<double>& out, std::vector<double>& mass) {
  const uint32_t group = r.hq / r.hkv;
  const uint64_t blocks = (r.tokens + r.bt - 1) / r.bt;
  out.assign(size_t{r.hq} * r.d, 0.0);
  mass.assign(blocks, 0.0);
  for (uint32_t j = 0; j < r.hq; ++j) {
    std::vector<double> s(r.tokens);
    double m = -INFINITY;
    for (uint64_t t = 0; t < r.tokens; ++t) {
      double x = 0;
      for (uint32_t c = 0; c < r.d; ++c) {
        x += double(r.q[j * r.d + c]) * r.k[(t * r.hkv + j / group) * r.d + c];
      }
      s[t] = x / std::sqrt(double(r.d));
      m = std::max(m, s[t]);
    }
    double z = 0;
    for (const double x : s) z += std::exp(x - m);
    for (uint64_t t = 0; t < r.tokens; ++t) {
      const double p = std::exp(s[t] - m) / z;
      mass[t / r.bt] += p;
      for (uint32_t c = 0; c < r.d; ++c) {
        out[j * r.d + c] += p * r.v[(t * r.hkv + j / group) * r.d + c];
      }
    }
  }
}

TEST(OracleTest, MatchesNaiveSoftmaxAcrossShapes) {
  struct Shape {
    uint32_t hq, hkv, d, bt;
    uint64_t tokens;
  };
  for (const Shape& s : {Shape{4, 4, 64, 16, 200}, Shape{28, 4, 128, 32, 300},
                         Shape{8, 1, 256, 64, 257}, Shape{16, 2, 64, 256, 700}}) {
    SCOPED_TRACE(testing::Message() << s.hq << "/" << s.hkv << " d" << s.d << " bt" << s.bt);
    const Random r = MakeRandom(s.hq, s.hkv, s.d, s.bt, s.tokens, s.d + s.tokens);
    auto oracle = MakeOracle({s.hq, s.hkv, s.d, s.bt, 0.0, true}, r.q);
    ASSERT_TRUE(oracle->AddTokens(r.k, r.v, s.tokens).ok());
    std::vector<double> out, mass;
    NaiveAttention(r, out, mass);
    const std::vector<double> got_mass = oracle->BlockMasses();
    ASSERT_EQ(got_mass.size(), mass.size());
    double total = 0;
    for (size_t b = 0; b < mass.size(); ++b) {
      EXPECT_NEAR(got_mass[b], mass[b], 1e-9) << b;
      total += got_mass[b];
    }
    EXPECT_NEAR(total, s.hq, 1e-9);
    const std::vector<double> got_out = oracle->FullOutput();
    for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(got_out[i], out[i], 1e-9) << i;
  }
}

TEST(OracleTest, StreamingAndBlocksGiveTheSameAnswer) {
  const Random r = MakeRandom(8, 2, 64, 16, 150, 3);
  const OracleConfig config{8, 2, 64, 16, 0.0, true};
  auto whole = MakeOracle(config, r.q);
  ASSERT_TRUE(whole->AddTokens(r.k, r.v, r.tokens).ok());
  // In uneven pieces.
  auto pieces = MakeOracle(config, r.q);
  std::mt19937 rng(5);
  for (uint64_t t = 0; t < r.tokens;) {
    const uint64_t n = std::min<uint64_t>(r.tokens - t, 1 + rng() % 37);
    const size_t at = t * 2 * 64, len = n * 2 * 64;
    ASSERT_TRUE(
        pieces->AddTokens(std::span(r.k).subspan(at, len), std::span(r.v).subspan(at, len), n)
            .ok());
    t += n;
  }
  // As kvtier f32 blocks, the last one partial.
  auto blocks = MakeOracle(config, r.q);
  std::vector<float> block(2 * 2 * 16 * 64);
  for (uint64_t first = 0; first < r.tokens; first += 16) {
    const uint32_t valid = uint32_t(std::min<uint64_t>(16, r.tokens - first));
    std::fill(block.begin(), block.end(), 0.0f);
    for (uint32_t h = 0; h < 2; ++h) {
      for (uint32_t t = 0; t < valid; ++t) {
        for (uint32_t c = 0; c < 64; ++c) {
          const size_t in = ((first + t) * 2 + h) * 64 + c;
          block[(h * 16 + t) * 64 + c] = r.k[in];
          block[2 * 16 * 64 + (h * 16 + t) * 64 + c] = r.v[in];
        }
      }
    }
    ASSERT_TRUE(blocks->AddBlock(block.data(), DType::kF32, valid).ok());
  }
  EXPECT_EQ(blocks->num_tokens(), r.tokens);
  EXPECT_EQ(blocks->AddBlock(block.data(), DType::kF32, 16).code(),
            StatusCode::kFailedPrecondition);  // after a partial block
  const std::vector<double> a = whole->BlockMasses();
  for (const auto* other : {pieces.get(), blocks.get()}) {
    const std::vector<double> b = other->BlockMasses();
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-12);
    const std::vector<double> oa = whole->FullOutput(), ob = other->FullOutput();
    for (size_t i = 0; i < oa.size(); ++i) EXPECT_NEAR(oa[i], ob[i], 1e-12);
  }
}

TEST(OracleTest, OracleSelectionIsPerfectWhenKCoversEverything) {
  const Random r = MakeRandom(12, 3, 128, 32, 1000, 9);
  auto oracle = MakeOracle({12, 3, 128, 32, 0.0, true}, r.q);
  ASSERT_TRUE(oracle->AddTokens(r.k, r.v, r.tokens).ok());
  const SparsePolicy policy{4, 64, 1000};
  const std::vector<uint64_t> top = oracle->OracleTopK(policy);
  // 32 blocks: sinks [0, 1), window [29, 32) -> 28 candidates.
  EXPECT_EQ(top.size(), 28u);
  Result<SelectionMetrics> m = oracle->Evaluate(policy, top);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->recall, 1.0);
  EXPECT_NEAR(m->coverage, 1.0, 1e-12);
  EXPECT_NEAR(m->coverage_min_head, 1.0, 1e-12);
  EXPECT_NEAR(m->output_rel_l2, 0.0, 1e-12);
  EXPECT_NEAR(m->output_rel_l2_max_head, 0.0, 1e-12);
  EXPECT_EQ(m->attended_blocks, 32u);
  // The oracle's top-k is ordered by mass and beats any other k-subset in coverage.
  const std::vector<double> mass = oracle->BlockMasses();
  for (size_t i = 1; i < top.size(); ++i) EXPECT_GE(mass[top[i - 1]], mass[top[i]]);
  const SparsePolicy small{4, 64, 5};
  const std::vector<uint64_t> best = oracle->OracleTopK(small);
  const std::vector<uint64_t> other = {1, 2, 3, 4, 5};
  Result<SelectionMetrics> mb = oracle->Evaluate(small, best);
  Result<SelectionMetrics> mo = oracle->Evaluate(small, other);
  ASSERT_TRUE(mb.ok() && mo.ok());
  EXPECT_EQ(mb->recall, 1.0);
  EXPECT_GE(mb->coverage, mo->coverage);
  EXPECT_LT(mb->coverage, 1.0);
  EXPECT_GT(mb->output_rel_l2, 0.0);
}

TEST(OracleTest, GqaHeadsReadTheirKvHead) {
  // 4 query heads over 2 KV heads: heads 2 and 3 read KV head 1, where token 5 stands out.
  const uint32_t d = 8;
  std::vector<float> q(4 * d, 0.0f);
  for (uint32_t j = 0; j < 4; ++j) q[j * d] = 1.0f;
  std::vector<float> k(10 * 2 * d, 0.0f), v(k.size(), 0.0f);
  k[(5 * 2 + 1) * d] = 40.0f;  // KV head 1, token 5
  auto oracle = MakeOracle({4, 2, d, 2, 1.0, true}, q);
  ASSERT_TRUE(oracle->AddTokens(k, v, 10).ok());
  EXPECT_NEAR(oracle->HeadBlockMass(0, 2), 0.2, 1e-9);  // uniform over 10 tokens
  EXPECT_NEAR(oracle->HeadBlockMass(2, 2), 1.0, 1e-9);
  EXPECT_NEAR(oracle->HeadBlockMass(3, 2), 1.0, 1e-9);
  EXPECT_EQ(oracle->OracleTopK({0, 0, 1}), (std::vector<uint64_t>{2}));
}

TEST(OracleTest, HugeLogitsStayFinite) {
  const uint32_t d = 4;
  std::vector<float> q = {1.0f, 0.0f, 0.0f, 0.0f};
  std::vector<float> k = {2000, 0, 0, 0, -2000, 0, 0, 0, 1990, 0, 0, 0, 0, 0, 0, 0};
  std::vector<float> v = {1, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0};
  auto oracle = MakeOracle({1, 1, d, 2, 1.0, true}, q);
  ASSERT_TRUE(oracle->AddTokens(k, v, 4).ok());
  const std::vector<double> mass = oracle->BlockMasses();
  EXPECT_NEAR(mass[0], 1.0 / (1.0 + std::exp(-10.0)), 1e-12);
  EXPECT_NEAR(mass[1], std::exp(-10.0) / (1.0 + std::exp(-10.0)), 1e-12);
  EXPECT_TRUE(std::isfinite(oracle->LogSumExp(0)));
  const std::vector<double> out = oracle->FullOutput();
  EXPECT_NEAR(out[0], (1.0 + 2.0 * std::exp(-10.0)) / (1.0 + std::exp(-10.0)), 1e-12);
}

TEST(OracleTest, WithoutOutputsMassesStillWork) {
  const Random r = MakeRandom(4, 2, 64, 16, 100, 21);
  auto with = MakeOracle({4, 2, 64, 16, 0.0, true}, r.q);
  auto without = MakeOracle({4, 2, 64, 16, 0.0, false}, r.q);
  ASSERT_TRUE(with->AddTokens(r.k, r.v, r.tokens).ok());
  ASSERT_TRUE(without->AddTokens(r.k, {}, r.tokens).ok());
  EXPECT_EQ(with->BlockMasses(), without->BlockMasses());
  EXPECT_TRUE(without->FullOutput().empty());
  const std::vector<uint64_t> sel = {2, 3};
  Result<SelectionMetrics> a = with->Evaluate({1, 16, 2}, sel);
  Result<SelectionMetrics> b = without->Evaluate({1, 16, 2}, sel);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->coverage, b->coverage);
  EXPECT_EQ(a->recall, b->recall);
  EXPECT_TRUE(std::isnan(b->output_rel_l2));
}

}  // namespace
}  // namespace kvtier::bench
