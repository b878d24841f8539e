// Workload: determinism, random access, the block format, and the properties the
// generator promises (sinks, recency, heavy tails, RoPE cancellation in block means,
// outlier channels, low-rank keys, drifting queries, findable needles), measured on
// several shapes and printed so that changes to the model show up in the test log.
#include "bench/workload/workload.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <ostream>
#include <string>
#include <vector>

#include "bench/workload/oracle.h"
#include "kernels/dtype_convert.h"

namespace kvtier::bench {
namespace {

std::unique_ptr<Workload> Make(const WorkloadOptions& options) {
  Result<std::unique_ptr<Workload>> w = Workload::Create(options);
  EXPECT_TRUE(w.ok()) << w.status().ToString();
  return w.ok() ? std::move(w).value() : nullptr;
}

WorkloadOptions Small() {
  WorkloadOptions o;
  o.layout = {2, 4, 12, 64, DType::kBF16, 32};
  o.tokens = 1000;
  o.steps = 6;
  o.needles = 2;
  return o;
}

std::vector<uint8_t> Block(const Workload& w, uint32_t layer, uint64_t block) {
  std::vector<uint8_t> bytes(w.layout().BytesPerBlock());
  EXPECT_TRUE(w.FillBlock(layer, block, bytes.data()).ok());
  return bytes;
}

std::vector<float> Query(const Workload& w, uint32_t layer, uint32_t step) {
  std::vector<float> q(size_t{w.layout().num_query_heads} * w.layout().head_dim);
  EXPECT_TRUE(w.Query(layer, step, q).ok());
  return q;
}

TEST(WorkloadTest, SameSeedSameBytes) {
  auto a = Make(Small());
  auto b = Make(Small());
  ASSERT_TRUE(a && b);
  for (uint32_t layer = 0; layer < 2; ++layer) {
    for (uint64_t block = 0; block < a->num_blocks(); block += 7) {
      EXPECT_EQ(Block(*a, layer, block), Block(*b, layer, block)) << layer << " " << block;
    }
    for (uint32_t step = 0; step < 6; ++step)
      EXPECT_EQ(Query(*a, layer, step), Query(*b, layer, step));
  }
  EXPECT_EQ(a->needles(), b->needles());
  WorkloadOptions other = Small();
  other.seed = 2;
  auto c = Make(other);
  ASSERT_TRUE(c);
  EXPECT_NE(Block(*a, 0, 3), Block(*c, 0, 3));
  EXPECT_NE(Query(*a, 0, 0), Query(*c, 0, 0));
  // Layers differ from each other.
  EXPECT_NE(Block(*a, 0, 3), Block(*a, 1, 3));
}

TEST(WorkloadTest, AnyTokenAloneEqualsItsRange) {
  auto w = Make(Small());
  ASSERT_TRUE(w);
  const uint32_t per_token = 4 * 64;
  const uint64_t first = 0, count = 1000;
  std::vector<float> keys(count * per_token), values(count * per_token);
  ASSERT_TRUE(w->KeysAndValues(1, first, count, keys, values).ok());
  std::vector<uint64_t> tokens = {0, 1, 3, 4, 31, 32, 499, 500, 511, 512, 998, 999};
  for (const Needle& n : w->needles()) tokens.push_back(n.token);
  for (const uint64_t t : tokens) {
    std::vector<float> k(per_token), v(per_token);
    ASSERT_TRUE(w->KeysAndValues(1, t, 1, k, v).ok());
    EXPECT_TRUE(std::equal(k.begin(), k.end(), keys.begin() + t * per_token)) << t;
    EXPECT_TRUE(std::equal(v.begin(), v.end(), values.begin() + t * per_token)) << t;
    std::vector<float> k_only(per_token);
    ASSERT_TRUE(w->Keys(1, t, 1, k_only).ok());
    EXPECT_EQ(k_only, k);
  }
  // A range inside the range, and positions past the context (what decoding appends).
  std::vector<float> mid(100 * per_token);
  ASSERT_TRUE(w->Values(1, 450, 100, mid).ok());
  EXPECT_TRUE(std::equal(mid.begin(), mid.end(), values.begin() + 450 * per_token));
  std::vector<float> past(3 * per_token);
  EXPECT_TRUE(w->Keys(1, 1000, 3, past).ok());
  for (const float x : past) ASSERT_TRUE(std::isfinite(x));
  EXPECT_TRUE(std::all_of(keys.begin(), keys.end(), [](float x) { return std::isfinite(x); }));
}

struct BlockShape {
  uint32_t head_dim, query_heads, kv_heads, block_tokens;
  DType dtype;
};

TEST(WorkloadTest, FillBlockWritesKvtierLayout) {
  for (const BlockShape& s :
       {BlockShape{64, 8, 8, 16, DType::kF32}, BlockShape{128, 32, 8, 128, DType::kBF16},
        BlockShape{128, 28, 4, 64, DType::kF16}, BlockShape{256, 8, 1, 256, DType::kFP8E4M3},
        BlockShape{64, 14, 2, 48, DType::kBF16}}) {
    SCOPED_TRACE(testing::Message()
                 << "d" << s.head_dim << " " << s.query_heads << "/" << s.kv_heads << " bt"
                 << s.block_tokens << " " << DTypeName(s.dtype));
    WorkloadOptions o;
    o.layout = {1, s.kv_heads, s.query_heads, s.head_dim, s.dtype, s.block_tokens};
    o.tokens = 3 * s.block_tokens + s.block_tokens / 2;  // the last block is partial
    o.steps = 2;
    o.needles = 1;
    auto w = Make(o);
    ASSERT_TRUE(w);
    ASSERT_EQ(w->num_blocks(), 4u);
    const uint32_t d = s.head_dim, hkv = s.kv_heads, bt = s.block_tokens;
    std::vector<float> keys(o.tokens * hkv * d), values(keys.size());
    ASSERT_TRUE(w->KeysAndValues(0, 0, o.tokens, keys, values).ok());
    for (uint64_t b = 0; b < 4; ++b) {
      const std::vector<uint8_t> block = Block(*w, 0, b);
      const uint8_t* value_base = block.data() + o.layout.KeyBytesPerBlock();
      uint64_t mismatches = 0;
      for (uint32_t h = 0; h < hkv; ++h) {
        for (uint32_t t = 0; t < bt; ++t) {
          const uint64_t token = b * bt + t;
          for (uint32_t c = 0; c < d; ++c) {
            const uint64_t at = (uint64_t{h} * bt + t) * d + c;
            const float k = LoadAsFloat(block.data(), at, s.dtype);
            const float v = LoadAsFloat(value_base, at, s.dtype);
            if (token >= o.tokens) {  // past the context: zero
              mismatches += (k != 0.0f) + (v != 0.0f);
              continue;
            }
            // Exactly the float key rounded once to the dtype.
            std::vector<uint8_t> one(4);
            StoreFromFloat(one.data(), 0, s.dtype, keys[(token * hkv + h) * d + c]);
            mismatches += LoadAsFloat(one.data(), 0, s.dtype) != k;
            StoreFromFloat(one.data(), 0, s.dtype, values[(token * hkv + h) * d + c]);
            mismatches += LoadAsFloat(one.data(), 0, s.dtype) != v;
          }
        }
      }
      EXPECT_EQ(mismatches, 0u) << "block " << b;
    }
    std::vector<uint8_t> bytes(o.layout.BytesPerBlock());
    EXPECT_TRUE(w->FillBlock(0, 4, bytes.data()).IsInvalidArgument());
    EXPECT_TRUE(w->FillBlock(1, 0, bytes.data()).IsInvalidArgument());
  }
}

TEST(WorkloadTest, RejectsBadOptions) {
  auto bad = [](auto change) {
    WorkloadOptions o = Small();
    change(o);
    return Workload::Create(o).status().IsInvalidArgument();
  };
  EXPECT_TRUE(bad([](WorkloadOptions& o) {
    o.layout.num_query_heads = 6;
    o.layout.num_kv_heads = 4;
  }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.layout.head_dim = 8; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.tokens = 0; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.key_rank = 40; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.outlier_channels = 17; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.query_drift = 1.0f; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.rope_theta = 1.0; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.rope_scaling = 0.5f; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.topic_logit = NAN; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.needle_layer = 2; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.steps = 0; }));  // needles need a step
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.needles = 1000; }));
  EXPECT_TRUE(bad([](WorkloadOptions& o) { o.working_set_spans = 0; }));
  auto w = Make(Small());
  ASSERT_TRUE(w);
  std::vector<float> small(10);
  EXPECT_TRUE(w->Keys(0, 0, 1, small).IsInvalidArgument());
  std::vector<float> q(12 * 64);
  EXPECT_TRUE(w->Query(0, 6, q).IsInvalidArgument());
  EXPECT_TRUE(w->Query(2, 0, q).IsInvalidArgument());
  EXPECT_TRUE(w->Query(0, 0, std::span(q).first(100)).IsInvalidArgument());
}

TEST(WorkloadTest, NeedleBookkeeping) {
  WorkloadOptions o = Small();
  o.needles = 3;
  auto all = Make(o);
  ASSERT_TRUE(all);
  ASSERT_EQ(all->needles().size(), 6u);  // every layer
  for (const Needle& n : all->needles()) {
    EXPECT_GE(n.token, o.sink_tokens);
    EXPECT_GE(n.token, uint64_t(0.02 * o.tokens));
    EXPECT_LT(n.token, uint64_t(0.9 * o.tokens));
    EXPECT_EQ(n.block, n.token / o.layout.block_tokens);
    EXPECT_LT(n.step, o.steps);
  }
  size_t found = 0;
  for (uint32_t layer = 0; layer < 2; ++layer) {
    for (uint32_t step = 0; step < o.steps; ++step) found += all->NeedlesAt(layer, step).size();
  }
  EXPECT_EQ(found, 6u);
  o.needle_layer = 1;
  auto one = Make(o);
  ASSERT_TRUE(one);
  ASSERT_EQ(one->needles().size(), 3u);
  for (const Needle& n : one->needles()) EXPECT_EQ(n.layer, 1u);
}

// ---------------------------------------------------------------------------------------
// Measured properties, on several shapes.

struct Shape {
  const char* name;
  uint32_t head_dim, query_heads, kv_heads, block_tokens;
  uint64_t tokens;
};

void PrintTo(const Shape& s, std::ostream* os) { *os << s.name; }

const Shape kShapes[] = {
    {"llama3_8b", 128, 32, 8, 128, 16384},
    {"mha_d64_bt16", 64, 8, 8, 16, 8192},
    {"gqa7_d256_bt256", 256, 28, 4, 256, 16384},
    {"mqa_d128_bt64", 128, 8, 1, 64, 8192},
};

// One layer of a shape, generated once and shared by the tests of that shape.
struct Sample {
  WorkloadOptions options;
  std::unique_ptr<Workload> workload;
  std::vector<float> keys, values;  // [tokens][kv_heads][head_dim]
};

// Needles draw most of the attention of their steps (and of neighbouring ones), so the
// other properties are measured without them.
const Sample& GetSample(const Shape& s, uint32_t needles = 0) {
  static std::map<std::string, Sample>* cache = new std::map<std::string, Sample>;
  const std::string key = std::string(s.name) + "/" + std::to_string(needles);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  Sample& sample = (*cache)[key];
  sample.options.layout = {1, s.kv_heads, s.query_heads, s.head_dim, DType::kBF16, s.block_tokens};
  sample.options.tokens = s.tokens;
  sample.options.steps = 16;
  sample.options.needles = needles;
  sample.workload = Make(sample.options);
  const size_t floats = s.tokens * s.kv_heads * s.head_dim;
  sample.keys.resize(floats);
  sample.values.resize(floats);
  EXPECT_TRUE(sample.workload->KeysAndValues(0, 0, s.tokens, sample.keys, sample.values).ok());
  return sample;
}

// logits[j][t] = q_j . k_t / sqrt(d) for the queries of `step`.
std::vector<std::vector<double>> Logits(const Sample& s, uint32_t step) {
  const ModelLayout& l = s.options.layout;
  const uint32_t d = l.head_dim, hkv = l.num_kv_heads, group = l.QueryGroupSize();
  const std::vector<float> q = Query(*s.workload, 0, step);
  std::vector<std::vector<double>> logits(l.num_query_heads, std::vector<double>(s.options.tokens));
  for (uint32_t j = 0; j < l.num_query_heads; ++j) {
    for (uint64_t t = 0; t < s.options.tokens; ++t) {
      const float* k = &s.keys[(t * hkv + j / group) * d];
      double x = 0;
      for (uint32_t c = 0; c < d; ++c) x += double(q[j * d + c]) * k[c];
      logits[j][t] = x / std::sqrt(double(d));
    }
  }
  return logits;
}

std::unique_ptr<AttentionOracle> OracleOf(const Sample& s, uint32_t step) {
  const ModelLayout& l = s.options.layout;
  auto oracle = AttentionOracle::Create(
      {l.num_query_heads, l.num_kv_heads, l.head_dim, l.block_tokens, 0.0, true},
      Query(*s.workload, 0, step));
  EXPECT_TRUE(oracle.ok());
  EXPECT_TRUE((*oracle)->AddTokens(s.keys, s.values, s.options.tokens).ok());
  return std::move(oracle).value();
}

bool IsNeedle(const Workload& w, uint64_t token) {
  for (const Needle& n : w.needles()) {
    if (n.token == token) return true;
  }
  return false;
}

class WorkloadPropertyTest : public ::testing::TestWithParam<Shape> {
 protected:
  const Sample& sample() { return GetSample(GetParam()); }
  void Report(const char* what, double value) {
    std::printf("[ %s ] %s = %.4g\n", GetParam().name, what, value);
    RecordProperty(what, std::to_string(value));
  }
};

TEST_P(WorkloadPropertyTest, SinksDrawAttention) {
  // The mass of the first block (which holds the sink tokens), per head and step, against
  // its share under uniform attention. Heads differ (a head whose retrieval target lies
  // close to the query puts little on the sinks), so the mean is asserted and the median
  // reported.
  const Sample& s = sample();
  const uint32_t hq = s.options.layout.num_query_heads;
  const double uniform = double(s.options.layout.block_tokens) / double(s.options.tokens);
  std::vector<double> ratios;
  double mean_share = 0;
  const std::vector<uint32_t> steps = {0, 3, 6, 9, 12, 15};
  for (const uint32_t step : steps) {
    auto oracle = OracleOf(s, step);
    for (uint32_t j = 0; j < hq; ++j) {
      const double share = oracle->HeadBlockMass(j, 0);
      ratios.push_back(share / uniform);
      mean_share += share / (hq * steps.size());
    }
  }
  std::sort(ratios.begin(), ratios.end());
  const double median = ratios[ratios.size() / 2];
  Report("sink block mass share (mean over heads and steps)", mean_share);
  Report("sink block mass share / uniform share (mean)", mean_share / uniform);
  Report("sink block mass share / uniform share (median head)", median);
  EXPECT_GT(mean_share, 10 * uniform);
  EXPECT_GT(mean_share, 0.05);
}

TEST_P(WorkloadPropertyTest, RecentTokensDrawAttention) {
  const Sample& s = sample();
  const auto logits = Logits(s, 0);
  const uint64_t t_end = s.options.tokens;
  double recent = 0, all = 0;
  for (const auto& l : logits) {
    recent += std::accumulate(l.end() - 64, l.end(), 0.0) / 64 / logits.size();
    all += std::accumulate(l.begin() + 4, l.end(), 0.0) / double(t_end - 4) / logits.size();
  }
  Report("mean logit of the last 64 tokens - mean logit", recent - all);
  EXPECT_GT(recent - all, 2.0);
}

TEST_P(WorkloadPropertyTest, LogitsAreHeavyTailed) {
  // Per head, over non-sink tokens: the share of the softmax mass held by the top 1% of
  // logits, against a Gaussian fitted to the bulk (deviation from the interquartile
  // range), whose top 1% holds Phi(sigma - 2.326); and the excess kurtosis (0 for a
  // Gaussian).
  const Sample& s = sample();
  for (const uint32_t step : {0u, 5u}) {
    const auto logits = Logits(s, step);
    double share = 0, gaussian = 0, kurtosis = 0;
    const double heads = double(logits.size());
    for (const auto& row : logits) {
      std::vector<double> l(row.begin() + s.options.sink_tokens, row.end());
      std::sort(l.rbegin(), l.rend());
      const size_t n = l.size();
      const double sigma = (l[n / 4] - l[3 * n / 4]) / 1.349;
      const double mean = std::accumulate(l.begin(), l.end(), 0.0) / n;
      double m2 = 0, m4 = 0, z = 0, top = 0;
      for (size_t i = 0; i < n; ++i) {
        const double c = (l[i] - mean) * (l[i] - mean);
        m2 += c / n;
        m4 += c * c / n;
        const double e = std::exp(l[i] - l[0]);
        z += e;
        if (i < n / 100) top += e;
      }
      share += top / z / heads;
      gaussian += 0.5 * std::erfc(-(sigma - 2.326) / std::sqrt(2.0)) / heads;
      kurtosis += (m4 / (m2 * m2) - 3.0) / heads;
    }
    Report("mass share of the top 1% logits", share);
    Report("same for a Gaussian fitted to the bulk", gaussian);
    Report("excess kurtosis of the logits", kurtosis);
    EXPECT_GT(share, 0.4);  // 40 times the uniform share
    // At head_dim 64 the bulk is wide (deviation ~2.7) and already Gaussian-heavy.
    if (s.options.layout.head_dim >= 128) {
      EXPECT_GT(share, gaussian + 0.1);
      EXPECT_GT(kurtosis, 0.1);
    }
  }
}

TEST_P(WorkloadPropertyTest, RopeCancelsBlockMeans) {
  // |mean of a block's keys| / mean of their norms, with and without rotary embeddings.
  const Sample& s = sample();
  WorkloadOptions plain = s.options;
  plain.rope = false;
  auto w = Make(plain);
  ASSERT_TRUE(w);
  const ModelLayout& l = s.options.layout;
  const uint32_t d = l.head_dim, hkv = l.num_kv_heads, bt = l.block_tokens;
  const uint64_t blocks = std::min<uint64_t>(s.options.tokens / bt, 64);
  std::vector<float> unrotated(blocks * bt * hkv * d);
  ASSERT_TRUE(w->Keys(0, 0, blocks * bt, unrotated).ok());
  auto ratio = [&](const float* keys) {
    double sum = 0;
    for (uint64_t b = 1; b < blocks; ++b) {
      for (uint32_t h = 0; h < hkv; ++h) {
        std::vector<double> mean(d, 0.0);
        double norms = 0;
        for (uint32_t t = 0; t < bt; ++t) {
          const float* k = keys + ((b * bt + t) * hkv + h) * d;
          double n = 0;
          for (uint32_t c = 0; c < d; ++c) {
            mean[c] += k[c] / bt;
            n += double(k[c]) * k[c];
          }
          norms += std::sqrt(n) / bt;
        }
        double m = 0;
        for (const double x : mean) m += x * x;
        sum += std::sqrt(m) / norms;
      }
    }
    return sum / double((blocks - 1) * hkv);
  };
  const double rotated_ratio = ratio(s.keys.data()), plain_ratio = ratio(unrotated.data());
  Report("|block mean key| / mean |key|, RoPE", rotated_ratio);
  Report("|block mean key| / mean |key|, no RoPE", plain_ratio);
  // Fewer pairs turn far within short blocks: the effect grows with block_tokens.
  EXPECT_GT(plain_ratio - rotated_ratio, 0.04);
  if (bt >= 64) {
    EXPECT_LT(rotated_ratio, 0.85);
    EXPECT_GT(plain_ratio - rotated_ratio, 0.12);
  }
}

TEST_P(WorkloadPropertyTest, OutlierChannelsStandOut) {
  // RoPE turns an outlier channel's bias through its rotary pair (channels c and c + d/2),
  // so compare the RMS of the outlier's pair with the median pair.
  const Sample& s = sample();
  const ModelLayout& l = s.options.layout;
  const uint32_t d = l.head_dim, hkv = l.num_kv_heads, pairs = d / 2;
  double worst = INFINITY, best = 0;
  for (uint32_t h = 0; h < hkv; ++h) {
    std::vector<double> rms(pairs, 0.0);
    for (uint64_t t = 0; t < s.options.tokens; ++t) {
      for (uint32_t c = 0; c < d; ++c) {
        const double x = s.keys[(t * hkv + h) * d + c];
        rms[c % pairs] += x * x / double(s.options.tokens);
      }
    }
    for (double& x : rms) x = std::sqrt(x);
    std::vector<double> sorted = rms;
    std::sort(sorted.begin(), sorted.end());
    const double median = sorted[pairs / 2];
    const std::vector<uint32_t> outliers = s.workload->OutlierChannels(0, h);
    ASSERT_EQ(outliers.size(), s.options.outlier_channels);
    for (const uint32_t c : outliers) {
      worst = std::min(worst, rms[c % pairs] / median);
      best = std::max(best, rms[c % pairs] / median);
    }
  }
  Report("smallest outlier pair RMS / median pair RMS", worst);
  Report("largest outlier pair RMS / median pair RMS", best);
  EXPECT_GT(worst, 2.2);
  EXPECT_GT(best, 4.0);
}

// Participation ratio (tr C)^2 / tr(C^2) of the keys' covariance: the effective number of
// dimensions their variance spreads over (d for isotropic noise, r for r equal ones).
double EffectiveRank(const float* keys, uint64_t tokens, uint32_t stride, uint32_t d) {
  std::vector<double> mean(d, 0.0), cov(size_t{d} * d, 0.0);
  for (uint64_t t = 0; t < tokens; ++t) {
    for (uint32_t c = 0; c < d; ++c) mean[c] += keys[t * stride + c] / double(tokens);
  }
  for (uint64_t t = 0; t < tokens; ++t) {
    const float* k = keys + t * stride;
    for (uint32_t a = 0; a < d; ++a) {
      for (uint32_t b = 0; b < d; ++b) cov[a * d + b] += (k[a] - mean[a]) * (k[b] - mean[b]);
    }
  }
  double trace = 0, trace_sq = 0;
  for (uint32_t a = 0; a < d; ++a) {
    trace += cov[a * d + a];
    for (uint32_t b = 0; b < d; ++b) trace_sq += cov[a * d + b] * cov[b * d + a];
  }
  return trace * trace / trace_sq;
}

TEST_P(WorkloadPropertyTest, KeysAreLowRankBeforeRotary) {
  const Sample& s = sample();
  WorkloadOptions plain = s.options;
  plain.rope = false;
  auto w = Make(plain);
  ASSERT_TRUE(w);
  const ModelLayout& l = s.options.layout;
  const uint32_t d = l.head_dim, hkv = l.num_kv_heads;
  const uint64_t tokens = 4096;
  std::vector<float> unrotated(tokens * hkv * d);
  ASSERT_TRUE(w->Keys(0, 0, tokens, unrotated).ok());
  const double pre = EffectiveRank(unrotated.data() + d * (hkv - 1), tokens, hkv * d, d);
  const double post = EffectiveRank(s.keys.data() + d * (hkv - 1), tokens, hkv * d, d);
  Report("key rank (configured)", w->key_rank());
  Report("effective rank of pre-rotary keys", pre);
  Report("effective rank of post-rotary keys", post);
  EXPECT_LT(pre, 1.5 * w->key_rank());
  EXPECT_LT(pre, 0.5 * d);
  EXPECT_GT(post, pre);  // rotation spreads the variance (as in real models)
}

TEST_P(WorkloadPropertyTest, QueriesDriftSlowly) {
  const Sample& s = sample();
  const uint32_t d = s.options.layout.head_dim, hq = s.options.layout.num_query_heads;
  auto cosine = [&](uint32_t a, uint32_t b) {
    const std::vector<float> qa = Query(*s.workload, 0, a), qb = Query(*s.workload, 0, b);
    double c = 0;
    for (uint32_t j = 0; j < hq; ++j) {
      double ab = 0, aa = 0, bb = 0;
      for (uint32_t x = 0; x < d; ++x) {
        ab += double(qa[j * d + x]) * qb[j * d + x];
        aa += double(qa[j * d + x]) * qa[j * d + x];
        bb += double(qb[j * d + x]) * qb[j * d + x];
      }
      c += ab / std::sqrt(aa * bb) / hq;
    }
    return c;
  };
  double next = 0;
  for (uint32_t step = 0; step + 1 < 16; ++step) next += cosine(step, step + 1) / 15;
  const double far = cosine(0, 15);
  Report("query cosine, consecutive steps", next);
  Report("query cosine, steps 0 and 15", far);
  EXPECT_GT(next, 0.7);
  EXPECT_LT(next, 0.99);
  EXPECT_LT(far, next);
}

TEST_P(WorkloadPropertyTest, AttentionConcentratesOnFewBlocks) {
  const Sample& s = sample();
  auto oracle = OracleOf(s, 3);
  const uint64_t candidates = oracle->num_blocks();
  const SparsePolicy policy{s.options.sink_tokens, 4 * s.options.layout.block_tokens,
                            uint32_t(candidates / 10)};
  const std::vector<uint64_t> top = oracle->OracleTopK(policy);
  Result<SelectionMetrics> m = oracle->Evaluate(policy, top);
  ASSERT_TRUE(m.ok());
  Result<SelectionMetrics> none = oracle->Evaluate(policy, {});
  ASSERT_TRUE(none.ok());
  Report("coverage of sinks + window", none->coverage);
  Report("coverage of sinks + window + oracle top 10% of blocks", m->coverage);
  Report("output error of that selection", m->output_rel_l2);
  EXPECT_GT(m->coverage, 0.65);
  EXPECT_GT(m->coverage - none->coverage, 0.3);  // the retrieved blocks matter
}

TEST_P(WorkloadPropertyTest, NeedlesAreFindable) {
  const Sample& s = GetSample(GetParam(), 3);
  const ModelLayout& l = s.options.layout;
  ASSERT_EQ(s.workload->needles().size(), 3u);
  for (const Needle& n : s.workload->needles()) {
    SCOPED_TRACE(testing::Message() << "needle at " << n.token << " step " << n.step);
    const auto logits = Logits(s, n.step);
    double margin = INFINITY;
    for (uint32_t j = 0; j < l.num_query_heads; ++j) {
      // The designed logit, for every query head of the step.
      EXPECT_NEAR(logits[j][n.token], s.options.needle_logit, 0.02) << j;
      double best_other = -INFINITY;
      for (uint64_t t = s.options.sink_tokens; t < s.options.tokens; ++t) {
        if (!IsNeedle(*s.workload, t)) best_other = std::max(best_other, logits[j][t]);
      }
      margin = std::min(margin, logits[j][n.token] - best_other);
    }
    Report("needle logit - highest other non-sink logit (worst head)", margin);
    EXPECT_GT(margin, 0.0);
    auto oracle = OracleOf(s, n.step);
    const SparsePolicy policy{s.options.sink_tokens, 256, 8};
    const std::vector<uint64_t> top = oracle->OracleTopK(policy);
    EXPECT_NE(std::find(top.begin(), top.end(), n.block), top.end());
    const std::vector<uint64_t> needle_tokens = {n.token};
    Result<SelectionMetrics> m = oracle->Evaluate(policy, top, needle_tokens);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->needle_hits, std::vector<bool>{true});
    // A selection that misses the needle's block misses most of the step's attention.
    std::vector<uint64_t> without;
    for (const uint64_t b : top) {
      if (b != n.block) without.push_back(b);
    }
    Result<SelectionMetrics> miss = oracle->Evaluate(policy, without, needle_tokens);
    ASSERT_TRUE(miss.ok());
    EXPECT_EQ(miss->needle_hits, std::vector<bool>{false});
    Report("output error when the needle's block is missed", miss->output_rel_l2);
    EXPECT_GT(miss->output_rel_l2, 0.5);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, WorkloadPropertyTest, ::testing::ValuesIn(kShapes),
                         [](const testing::TestParamInfo<Shape>& info) {
                           return std::string(info.param.name);
                         });

}  // namespace
}  // namespace kvtier::bench
