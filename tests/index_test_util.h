// Helpers of the retrieval-index tests (faiss_index_test.cc, gpu_index_test.cc): random
// summaries, a model of what an index holds, and the check of a backend's selection
// against ReferenceSelect's ranking.
#ifndef KVTIER_TESTS_INDEX_TEST_UTIL_H_
#define KVTIER_TESTS_INDEX_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "index/layer_index.h"
#include "index/summary.h"
#include "kernels/dtype_convert.h"

namespace kvtier::index_test {

inline constexpr uint32_t kBlockTokens = 32;

struct Shape {
  uint32_t hq, kv, d;
  SummaryKind kind;
  uint32_t rows;
};

inline IndexConfig Config(IndexBackend backend, const Shape& s, DType dtype = DType::kBF16) {
  IndexConfig c;
  c.num_query_heads = s.hq;
  c.summary = SummaryShape{s.kv, s.d, kBlockTokens, dtype, s.kind, s.rows};
  c.backend = backend;
  return c;
}

inline std::unique_ptr<LayerIndex> Create(const IndexConfig& c) {
  auto index = CreateLayerIndex(c);
  EXPECT_TRUE(index.ok()) << index.status().ToString();
  return index.ok() ? std::move(index.value()) : nullptr;
}

inline std::vector<float> Randn(uint64_t n, std::mt19937_64& rng, float sd = 1.0f) {
  std::normal_distribution<float> dist(0.0f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// A summary filled directly: fp16 N(offset, 1) rows (a per-block, per-head offset makes
// blocks differ), weights as the kind defines them; a kClusters row is empty (weight 0,
// zero vector) now and then.
inline BlockSummary RandomSummary(const SummaryShape& s, std::mt19937_64& rng) {
  BlockSummary out;
  out.vectors.resize(s.vector_elements());
  out.weights.resize(s.weight_elements());
  std::uniform_int_distribution<uint32_t> tokens(1, kBlockTokens);
  out.valid_tokens = tokens(rng);
  for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
    const std::vector<float> offset = Randn(s.head_dim, rng, 0.7f);
    for (uint32_t j = 0; j < s.rows; ++j) {
      const std::vector<float> v = Randn(s.head_dim, rng);
      for (uint32_t c = 0; c < s.head_dim; ++c) {
        out.vectors[(uint64_t{kv} * s.rows + j) * s.head_dim + c] =
            FloatToHalfBits(v[c] + offset[c]);
      }
    }
    float* w = out.weights.data() + uint64_t{kv} * s.rows;
    switch (s.kind) {
      case SummaryKind::kClusters:
        for (uint32_t j = 0; j < s.rows; ++j) {
          w[j] = static_cast<float>(tokens(rng));
          if (rng() % 9 == 0) {
            w[j] = 0.0f;
            std::fill_n(out.vectors.begin() + (uint64_t{kv} * s.rows + j) * s.head_dim, s.head_dim,
                        uint16_t{0});
          }
        }
        break;
      case SummaryKind::kMinMax: {
        uint16_t* mn = out.vectors.data() + uint64_t{kv} * 2 * s.head_dim;
        uint16_t* mx = mn + s.head_dim;
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          if (HalfBitsToFloat(mn[c]) > HalfBitsToFloat(mx[c])) std::swap(mn[c], mx[c]);
        }
        w[0] = w[1] = static_cast<float>(out.valid_tokens);
        break;
      }
      default:  // kMean, kTopR
        for (uint32_t j = 0; j < s.rows; ++j) {
          w[j] = static_cast<float>(out.valid_tokens) / static_cast<float>(s.rows);
        }
    }
  }
  return out;
}

// A summary from a random bf16 block through SummarizeBlock.
inline BlockSummary SummarizedBlock(const SummaryShape& s, std::mt19937_64& rng) {
  const uint64_t elements = uint64_t{s.num_kv_heads} * s.block_tokens * s.head_dim;
  std::vector<float> keys = Randn(elements, rng);
  const std::vector<float> offset = Randn(uint64_t{s.num_kv_heads} * s.head_dim, rng, 0.7f);
  std::vector<uint16_t> block(2 * elements);  // keys, then values (not read)
  for (uint64_t i = 0; i < elements; ++i) {
    const uint64_t kv = i / (uint64_t{s.block_tokens} * s.head_dim);
    block[i] = FloatToBf16Bits(keys[i] + offset[kv * s.head_dim + i % s.head_dim]);
  }
  std::vector<float> scores;
  if (s.kind == SummaryKind::kTopR) scores = Randn(uint64_t{s.num_kv_heads} * s.block_tokens, rng);
  const uint32_t valid = 1 + static_cast<uint32_t>(rng() % s.block_tokens);
  BlockSummary out;
  EXPECT_TRUE(SummarizeBlock(s, block.data(), valid, scores, &out).ok());
  return out;
}

// What an index should hold: block id -> summary.
using Model = std::map<uint64_t, BlockSummary>;

inline bool IsCandidate(const SelectParams& p, int64_t id) {
  return id >= 0 && static_cast<uint64_t>(id) >= p.candidates_begin &&
         static_cast<uint64_t>(id) < p.candidates_end;
}

inline uint64_t CountCandidates(const Model& model, const SelectParams& p) {
  uint64_t n = 0;
  for (const auto& [id, s] : model) n += IsCandidate(p, static_cast<int64_t>(id)) ? 1 : 0;
  return n;
}

// Per score row (1, or num_kv_heads for kPerKvHead): every candidate, best first, with its
// score, as ReferenceSelect ranks them.
struct Ranking {
  std::vector<std::vector<std::pair<int64_t, float>>> rows;
  std::vector<std::map<int64_t, float>> score_of;
};

inline Ranking FullReference(const IndexConfig& c, const Model& model, SelectParams p) {
  std::vector<uint64_t> ids;
  std::vector<const BlockSummary*> ptrs;
  for (const auto& [id, s] : model) {
    ids.push_back(id);
    ptrs.push_back(&s);
  }
  const uint64_t n = CountCandidates(model, p);
  p.top_k = static_cast<uint32_t>(std::max<uint64_t>(1, n));
  const uint64_t size = SelectOutputSize(c, p.scope, p.top_k);
  std::vector<int64_t> out(size);
  std::vector<float> scores(size);
  Status st = ReferenceSelect(c, ids, ptrs, p, out, scores);
  EXPECT_TRUE(st.ok()) << st.ToString();
  Ranking r;
  const uint64_t score_rows = size / p.top_k;
  r.rows.resize(score_rows);
  r.score_of.resize(score_rows);
  for (uint64_t row = 0; row < score_rows; ++row) {
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t at = row * p.top_k + i;
      r.rows[row].emplace_back(out[at], scores[at]);
      r.score_of[row][out[at]] = scores[at];
    }
  }
  return r;
}

// `got` (from Select with params p) is the reference's selection: position by position
// the same block, or one whose reference score ties the reference's pick there within
// `tie` (relative); its scores within `tol` (relative) of the reference's; -1 and 0 past
// the candidates.
inline void ExpectMatchesRanking(const Ranking& want, const SelectParams& p,
                                 const std::vector<int64_t>& got,
                                 const std::vector<float>& got_scores, double tie = 1e-5,
                                 double tol = 1e-4) {
  ASSERT_EQ(got.size(), want.rows.size() * p.top_k);
  for (uint64_t row = 0; row < want.rows.size(); ++row) {
    std::set<int64_t> seen;
    for (uint64_t i = 0; i < p.top_k; ++i) {
      const uint64_t at = row * p.top_k + i;
      if (i >= want.rows[row].size()) {
        EXPECT_EQ(got[at], -1) << "row " << row << " position " << i;
        EXPECT_EQ(got_scores[at], 0.0f);
        continue;
      }
      const auto [want_id, want_score] = want.rows[row][i];
      ASSERT_TRUE(IsCandidate(p, got[at])) << got[at] << " at " << i;
      ASSERT_TRUE(seen.insert(got[at]).second) << "duplicate " << got[at];
      ASSERT_EQ(want.score_of[row].count(got[at]), 1u) << got[at] << " is not indexed";
      const double ref = want.score_of[row].at(got[at]);
      if (got[at] != want_id) {
        EXPECT_NEAR(ref, want_score, tie * std::abs(want_score))
            << "row " << row << " position " << i << ": got " << got[at] << ", want " << want_id;
      }
      EXPECT_FALSE(std::isnan(got_scores[at]));
      EXPECT_NEAR(got_scores[at], ref, tol * std::abs(ref) + 1e-12) << "block " << got[at];
    }
  }
}

struct Selection {
  std::vector<int64_t> ids;
  std::vector<float> scores;
};

inline Selection Select(LayerIndex& index, const SelectParams& p) {
  const uint64_t size = SelectOutputSize(index.config(), p.scope, p.top_k);
  Selection s{std::vector<int64_t>(size, 7), std::vector<float>(size, 7.0f)};
  const Status st = index.Select(p, s.ids, s.scores);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return s;
}

inline void ExpectMatchesReference(LayerIndex& index, const Model& model, const SelectParams& p) {
  const Selection got = Select(index, p);
  ExpectMatchesRanking(FullReference(index.config(), model, p), p, got.ids, got.scores);
}

}  // namespace kvtier::index_test

#endif  // KVTIER_TESTS_INDEX_TEST_UTIL_H_
