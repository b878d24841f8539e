// The kGpu backend of LayerIndex (index/gpu_index.cc) against the double-precision
// ReferenceSelect: several shapes and both scopes, summaries filled directly or made by
// SummarizeBlock; Add-replace, Remove and re-Add against a model of what was added, past
// several capacity doublings; candidate ranges, padding, an empty index, omitted scores;
// kMinMax and bad arguments refused. Without a CUDA device (this machine, CI) the index
// runs emulated, through the kernels' CPU references; with one, the same tests run on the
// device (kvtier_gpu_tests also compares the device index with the emulated one). And
// the backend through the Store.
//
// Tolerances: picks equal the reference's position by position, or tie with it within
// 1e-5 relative (float against double); scores within 1e-4 relative.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "index/backends.h"
#include "index/layer_index.h"
#include "kernels/cuda_runtime.h"
#include "kernels/dtype_convert.h"
#include "kvtier/store.h"

namespace kvtier {
namespace {

constexpr uint32_t kBlockTokens = 32;

struct Shape {
  uint32_t hq, kv, d;
  SummaryKind kind;
  uint32_t rows;
};

IndexConfig Config(const Shape& s) {
  IndexConfig c;
  c.num_query_heads = s.hq;
  c.summary = SummaryShape{s.kv, s.d, kBlockTokens, DType::kBF16, s.kind, s.rows};
  c.backend = IndexBackend::kGpu;
  return c;
}

std::unique_ptr<LayerIndex> Create(const IndexConfig& c) {
  auto index = CreateLayerIndex(c);
  EXPECT_TRUE(index.ok()) << index.status().ToString();
  return index.ok() ? std::move(index.value()) : nullptr;
}

std::vector<float> Randn(uint64_t n, std::mt19937_64& rng, float sd = 1.0f) {
  std::normal_distribution<float> dist(0.0f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// fp16 rows N(offset, 1) with a per-block, per-head offset; weights as the kind defines
// them; a kClusters row now and then empty (weight 0, zero vector).
BlockSummary FilledSummary(const SummaryShape& s, std::mt19937_64& rng) {
  BlockSummary out;
  out.vectors.resize(s.vector_elements());
  out.weights.resize(s.weight_elements());
  std::uniform_int_distribution<uint32_t> tokens(1, kBlockTokens);
  out.valid_tokens = tokens(rng);
  for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
    const std::vector<float> offset = Randn(s.head_dim, rng, 0.7f);
    for (uint32_t j = 0; j < s.rows; ++j) {
      const std::vector<float> v = Randn(s.head_dim, rng);
      const bool empty = s.kind == SummaryKind::kClusters && rng() % 9 == 0;
      for (uint32_t c = 0; c < s.head_dim; ++c) {
        out.vectors[(uint64_t{kv} * s.rows + j) * s.head_dim + c] =
            empty ? 0 : FloatToHalfBits(v[c] + offset[c]);
      }
      out.weights[uint64_t{kv} * s.rows + j] =
          s.kind == SummaryKind::kClusters
              ? (empty ? 0.0f : static_cast<float>(tokens(rng)))
              : static_cast<float>(out.valid_tokens) / static_cast<float>(s.rows);
    }
  }
  return out;
}

// A summary of a random bf16 block through SummarizeBlock.
BlockSummary SummarizedBlock(const SummaryShape& s, std::mt19937_64& rng) {
  const uint64_t elements = uint64_t{s.num_kv_heads} * s.block_tokens * s.head_dim;
  const std::vector<float> keys = Randn(elements, rng);
  const std::vector<float> offset = Randn(uint64_t{s.num_kv_heads} * s.head_dim, rng, 0.7f);
  std::vector<uint16_t> block(2 * elements);  // keys, then values (not read)
  for (uint64_t i = 0; i < elements; ++i) {
    const uint64_t kv = i / (uint64_t{s.block_tokens} * s.head_dim);
    block[i] = FloatToBf16Bits(keys[i] + offset[kv * s.head_dim + i % s.head_dim]);
  }
  std::vector<float> scores;
  if (s.kind == SummaryKind::kTopR) scores = Randn(uint64_t{s.num_kv_heads} * s.block_tokens, rng);
  BlockSummary out;
  const uint32_t valid = 1 + static_cast<uint32_t>(rng() % s.block_tokens);
  EXPECT_TRUE(SummarizeBlock(s, block.data(), valid, scores, &out).ok());
  return out;
}

using Model = std::map<uint64_t, BlockSummary>;

bool IsCandidate(const SelectParams& p, int64_t id) {
  return id >= 0 && static_cast<uint64_t>(id) >= p.candidates_begin &&
         static_cast<uint64_t>(id) < p.candidates_end;
}

struct Selection {
  std::vector<int64_t> ids;
  std::vector<float> scores;
};

Selection Select(LayerIndex& index, const SelectParams& p) {
  const uint64_t size = SelectOutputSize(index.config(), p.scope, p.top_k);
  Selection s{std::vector<int64_t>(size, 7), std::vector<float>(size, 7.0f)};
  const Status st = index.Select(p, s.ids, s.scores);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return s;
}

// `index`'s selection against ReferenceSelect's ranking of every candidate: position by
// position the reference's block, or one whose reference score ties it within 1e-5
// relative; scores within 1e-4 relative; -1 and 0 past the candidates.
void ExpectMatchesReference(LayerIndex& index, const Model& model, const SelectParams& p) {
  const IndexConfig& c = index.config();
  std::vector<uint64_t> ids;
  std::vector<const BlockSummary*> ptrs;
  uint32_t candidates = 0;
  for (const auto& [id, s] : model) {
    ids.push_back(id);
    ptrs.push_back(&s);
    candidates += IsCandidate(p, static_cast<int64_t>(id)) ? 1 : 0;
  }
  SelectParams all = p;
  all.top_k = std::max(1u, candidates);
  const uint64_t all_size = SelectOutputSize(c, p.scope, all.top_k);
  std::vector<int64_t> want(all_size);
  std::vector<float> want_scores(all_size);
  ASSERT_TRUE(ReferenceSelect(c, ids, ptrs, all, want, want_scores).ok());
  const Selection got = Select(index, p);
  const uint64_t score_rows = all_size / all.top_k;
  ASSERT_EQ(got.ids.size(), score_rows * p.top_k);
  for (uint64_t row = 0; row < score_rows; ++row) {
    std::map<int64_t, float> score_of;
    for (uint32_t i = 0; i < candidates; ++i) {
      score_of[want[row * all.top_k + i]] = want_scores[row * all.top_k + i];
    }
    std::set<int64_t> seen;
    for (uint32_t i = 0; i < p.top_k; ++i) {
      const uint64_t at = row * p.top_k + i;
      if (i >= candidates) {
        EXPECT_EQ(got.ids[at], -1) << "row " << row << " position " << i;
        EXPECT_EQ(got.scores[at], 0.0f);
        continue;
      }
      const int64_t want_id = want[row * all.top_k + i];
      const float want_score = want_scores[row * all.top_k + i];
      ASSERT_TRUE(IsCandidate(p, got.ids[at])) << got.ids[at] << " at " << i;
      ASSERT_TRUE(seen.insert(got.ids[at]).second) << "duplicate " << got.ids[at];
      ASSERT_EQ(score_of.count(got.ids[at]), 1u) << got.ids[at] << " is not indexed";
      const double ref = score_of.at(got.ids[at]);
      if (got.ids[at] != want_id) {
        EXPECT_NEAR(ref, want_score, 1e-5 * std::abs(want_score))
            << "row " << row << " position " << i << ": got " << got.ids[at] << ", want "
            << want_id;
      }
      EXPECT_FALSE(std::isnan(got.scores[at]));
      EXPECT_NEAR(got.scores[at], ref, 1e-4 * std::abs(ref) + 1e-12) << "block " << got.ids[at];
    }
  }
}

// --- kGpu == ReferenceSelect ----------------------------------------------------------

struct Case {
  Shape shape;
  SelectionScope scope;
  bool summarized;  // summaries by SummarizeBlock, else filled directly
};

class GpuIndexVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(GpuIndexVsReference, SameSelectionAsTheDefinition) {
  const Case p = GetParam();
  const IndexConfig c = Config(p.shape);
  std::unique_ptr<LayerIndex> index = Create(c);
  ASSERT_NE(index, nullptr);
  EXPECT_EQ(GpuIndexOnDevice(*index), cuda::HasDevice());
  std::mt19937_64 rng(2000 + static_cast<uint64_t>(p.shape.kind) * 7 + p.shape.hq);
  Model model;
  for (uint64_t b = 0; b < 300; ++b) {
    const uint64_t id = 500 + 3 * b;  // ids need not be dense
    model[id] = p.summarized ? SummarizedBlock(c.summary, rng) : FilledSummary(c.summary, rng);
    ASSERT_TRUE(index->Add(id, model[id]).ok());
  }
  ASSERT_EQ(index->size(), model.size());
  for (int step = 0; step < 4; ++step) {
    const std::vector<float> q = Randn(uint64_t{p.shape.hq} * p.shape.d, rng, 1.5f);
    const uint32_t top_k = step == 3 ? 40 : 12;
    ExpectMatchesReference(*index, model,
                           SelectParams{q, top_k, p.scope, 500 + 3 * 2, 500 + 3 * 280});
    ExpectMatchesReference(*index, model, SelectParams{q, top_k, p.scope});
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GpuIndexVsReference,
    ::testing::Values(
        Case{{32, 8, 128, SummaryKind::kClusters, 3}, SelectionScope::kPerLayer, false},
        Case{{32, 8, 128, SummaryKind::kClusters, 4}, SelectionScope::kPerKvHead, true},
        Case{{28, 4, 64, SummaryKind::kClusters, 3}, SelectionScope::kPerLayer, true},
        Case{{28, 4, 64, SummaryKind::kMean, 1}, SelectionScope::kPerKvHead, true},
        Case{{8, 8, 256, SummaryKind::kMean, 1}, SelectionScope::kPerLayer, false},
        Case{{16, 1, 96, SummaryKind::kTopR, 4}, SelectionScope::kPerLayer, true},
        Case{{12, 4, 40, SummaryKind::kTopR, 2}, SelectionScope::kPerKvHead, false}),
    [](const ::testing::TestParamInfo<Case>& info) {
      const Case& p = info.param;
      return std::string(SummaryKindName(p.shape.kind)) + std::to_string(p.shape.rows) + "_hq" +
             std::to_string(p.shape.hq) + "_kv" + std::to_string(p.shape.kv) + "_d" +
             std::to_string(p.shape.d) +
             (p.scope == SelectionScope::kPerLayer ? "_layer" : "_kvhead") +
             (p.summarized ? "_summarized" : "_filled");
    });

// --- Add-replace, Remove and re-Add against a model ---------------------------------

TEST(GpuIndex, RandomOperationsAgainstAModel) {
  const Shape shape{16, 4, 64, SummaryKind::kClusters, 3};
  const IndexConfig c = Config(shape);
  std::unique_ptr<LayerIndex> index = Create(c);
  ASSERT_NE(index, nullptr);
  std::mt19937_64 rng(77);
  Model model;
  for (int op = 0; op < 1500; ++op) {
    // Ids from a range that grows, so the index passes several capacity doublings (64,
    // 128, 256) and shrinks again through removals.
    const uint64_t id = rng() % (40 + op / 4);
    if (rng() % 10 < 6) {  // add or replace
      model[id] = FilledSummary(c.summary, rng);
      ASSERT_TRUE(index->Add(id, model[id]).ok());
    } else {
      EXPECT_EQ(index->Remove(id), model.erase(id) == 1);
    }
    ASSERT_EQ(index->size(), model.size());
    if (op % 25 != 24) continue;
    const std::vector<float> q = Randn(uint64_t{shape.hq} * shape.d, rng);
    ExpectMatchesReference(*index, model, SelectParams{q, 10, SelectionScope::kPerLayer, 8, 300});
    ExpectMatchesReference(*index, model, SelectParams{q, 6, SelectionScope::kPerKvHead, 8, 300});
  }
  EXPECT_GT(index->memory_bytes(), 0u);
}

TEST(GpuIndex, RemovedNeverSelectedReaddedIs) {
  const Shape shape{8, 2, 64, SummaryKind::kClusters, 3};
  const IndexConfig c = Config(shape);
  std::unique_ptr<LayerIndex> index = Create(c);
  ASSERT_NE(index, nullptr);
  std::mt19937_64 rng(5);
  const std::vector<float> q = Randn(uint64_t{shape.hq} * shape.d, rng);
  Model model;
  for (uint64_t b = 0; b < 200; ++b) {
    model[b] = FilledSummary(c.summary, rng);
    ASSERT_TRUE(index->Add(b, model[b]).ok());
  }
  const SelectParams p{q, 8};
  const int64_t best = Select(*index, p).ids[0];
  const BlockSummary kept = model[static_cast<uint64_t>(best)];
  EXPECT_TRUE(index->Remove(static_cast<uint64_t>(best)));
  EXPECT_FALSE(index->Remove(static_cast<uint64_t>(best)));
  model.erase(static_cast<uint64_t>(best));
  Selection s = Select(*index, p);
  EXPECT_EQ(std::count(s.ids.begin(), s.ids.end(), best), 0);
  ExpectMatchesReference(*index, model, p);
  ASSERT_TRUE(index->Add(static_cast<uint64_t>(best), kept).ok());
  model[static_cast<uint64_t>(best)] = kept;
  EXPECT_EQ(Select(*index, p).ids[0], best);
  // Removing every other block moves the last ones into the holes.
  for (uint64_t b = 0; b < 200; b += 2) {
    EXPECT_TRUE(index->Remove(b));
    model.erase(b);
  }
  EXPECT_EQ(index->size(), model.size());
  ExpectMatchesReference(*index, model, SelectParams{q, 50});
  ExpectMatchesReference(*index, model, SelectParams{q, 7, SelectionScope::kPerKvHead, 20, 150});
}

// --- Candidate ranges and padding -----------------------------------------------------

TEST(GpuIndex, CandidateRangeAndPadding) {
  const Shape shape{8, 2, 64, SummaryKind::kClusters, 3};
  const IndexConfig c = Config(shape);
  std::unique_ptr<LayerIndex> index = Create(c);
  ASSERT_NE(index, nullptr);
  std::mt19937_64 rng(9);
  const std::vector<float> q = Randn(uint64_t{shape.hq} * shape.d, rng);
  // Empty: all padding.
  Selection s = Select(*index, SelectParams{q, 4});
  EXPECT_EQ(s.ids, std::vector<int64_t>(4, -1));
  EXPECT_EQ(s.scores, std::vector<float>(4, 0.0f));
  Model model;
  for (uint64_t b = 0; b < 40; ++b) {
    model[b] = FilledSummary(c.summary, rng);
    ASSERT_TRUE(index->Add(b, model[b]).ok());
  }
  for (SelectionScope scope : {SelectionScope::kPerLayer, SelectionScope::kPerKvHead}) {
    // Sinks 0-1 and a local window 30-39 are never selected.
    ExpectMatchesReference(*index, model, SelectParams{q, 8, scope, 2, 30});
    // Three candidates for eight places: three blocks, then -1 with score 0.
    s = Select(*index, SelectParams{q, 8, scope, 20, 23});
    const uint32_t rows = scope == SelectionScope::kPerLayer ? 1 : shape.kv;
    for (uint32_t r = 0; r < rows; ++r) {
      std::vector<int64_t> picked(s.ids.begin() + r * 8, s.ids.begin() + r * 8 + 3);
      std::sort(picked.begin(), picked.end());
      EXPECT_EQ(picked, (std::vector<int64_t>{20, 21, 22}));
      EXPECT_GT(s.scores[r * 8], 0.0f);
      EXPECT_GE(s.scores[r * 8], s.scores[r * 8 + 1]);
      for (uint32_t i = 3; i < 8; ++i) {
        EXPECT_EQ(s.ids[r * 8 + i], -1);
        EXPECT_EQ(s.scores[r * 8 + i], 0.0f);
      }
    }
    ExpectMatchesReference(*index, model, SelectParams{q, 8, scope, 20, 23});
    // No candidate at all; then every block (k above the count).
    s = Select(*index, SelectParams{q, 3, scope, 100, 200});
    EXPECT_EQ(s.ids, std::vector<int64_t>(s.ids.size(), -1));
    ExpectMatchesReference(*index, model, SelectParams{q, 64, scope});
  }
  // The range changes between steps (the local window moves), and blocks come and go.
  for (uint64_t end = 30; end < 60; end += 3) {
    model[end + 10] = FilledSummary(c.summary, rng);
    ASSERT_TRUE(index->Add(end + 10, model[end + 10]).ok());
    ExpectMatchesReference(*index, model, SelectParams{q, 5, SelectionScope::kPerLayer, 2, end});
  }
  // Scores may be omitted.
  std::vector<int64_t> out(5);
  EXPECT_TRUE(index->Select(SelectParams{q, 5}, out, {}).ok());
  EXPECT_NE(out[4], -1);
}

// --- Configurations and arguments -----------------------------------------------------

TEST(GpuIndex, RefusesMinMaxAndBadArguments) {
  EXPECT_TRUE(CreateLayerIndex(Config(Shape{16, 2, 64, SummaryKind::kMinMax, 2}))
                  .status()
                  .IsInvalidArgument());
  // More query heads per KV head than the kernel takes.
  EXPECT_TRUE(CreateLayerIndex(Config(Shape{256, 1, 64, SummaryKind::kMean, 1}))
                  .status()
                  .IsInvalidArgument());
  const IndexConfig c = Config(Shape{8, 2, 64, SummaryKind::kClusters, 3});
  std::unique_ptr<LayerIndex> index = Create(c);
  ASSERT_NE(index, nullptr);
  std::vector<float> q(8 * 64, 1.0f), short_q(5);
  std::vector<int64_t> out(4), wrong(3);
  std::vector<float> bad_scores(2);
  EXPECT_TRUE(index->Select({short_q, 4}, out, {}).IsInvalidArgument());
  EXPECT_TRUE(index->Select({q, 0}, out, {}).IsInvalidArgument());
  EXPECT_TRUE(index->Select({q, 4}, wrong, {}).IsInvalidArgument());
  EXPECT_TRUE(index->Select({q, 4}, out, bad_scores).IsInvalidArgument());
  EXPECT_TRUE(index->Select({q, 4, SelectionScope::kPerKvHead}, out, {}).IsInvalidArgument());
  BlockSummary other;
  other.vectors.resize(3);
  EXPECT_TRUE(index->Add(0, other).IsInvalidArgument());
  EXPECT_EQ(index->size(), 0u);
  EXPECT_EQ(IndexBackendName(IndexBackend::kGpu), "gpu");
}

// Forced emulation is emulated on any machine, and selects as the default mode does.
TEST(GpuIndex, ForcedEmulationSelectsTheSame) {
  const IndexConfig c = Config(Shape{32, 8, 128, SummaryKind::kClusters, 3});
  auto emulated = CreateGpuIndex(c, /*force_emulated=*/true);
  ASSERT_TRUE(emulated.ok()) << emulated.status().ToString();
  EXPECT_FALSE(GpuIndexOnDevice(**emulated));
  std::unique_ptr<LayerIndex> index = Create(c);
  ASSERT_NE(index, nullptr);
  std::unique_ptr<LayerIndex> scan = Create([&] {
    IndexConfig sc = c;
    sc.backend = IndexBackend::kScan;
    return sc;
  }());
  EXPECT_FALSE(GpuIndexOnDevice(*scan));
  std::mt19937_64 rng(31);
  Model model;
  for (uint64_t b = 0; b < 150; ++b) {
    model[b] = SummarizedBlock(c.summary, rng);
    ASSERT_TRUE((*emulated)->Add(b, model[b]).ok());
    ASSERT_TRUE(index->Add(b, model[b]).ok());
  }
  for (int step = 0; step < 3; ++step) {
    const std::vector<float> q = Randn(32 * 128, rng);
    const SelectParams p{q, 16, SelectionScope::kPerLayer, 1, 140};
    ExpectMatchesReference(**emulated, model, p);
    ExpectMatchesReference(*index, model, p);
  }
}

// Through the Store: RetrievalOptions::backend = kGpu is accepted, named, and selects the
// block whose keys point along the query (as the scan backend does); kMinMax with kGpu
// fails Open.
TEST(GpuIndex, StoreSelectsThroughTheGpuBackend) {
  const ModelLayout layout{.num_layers = 1,
                           .num_kv_heads = 2,
                           .num_query_heads = 8,
                           .head_dim = 64,
                           .dtype = DType::kF16,
                           .block_tokens = 16};
  std::mt19937_64 rng(3);
  const std::vector<float> direction = Randn(layout.head_dim, rng);
  float norm = 0;
  for (float x : direction) norm += x * x;
  std::vector<float> q(uint64_t{layout.num_query_heads} * layout.head_dim);
  for (uint64_t i = 0; i < q.size(); ++i) {
    q[i] = 4.0f * direction[i % layout.head_dim] / std::sqrt(norm);
  }
  std::vector<int64_t> picked[2];
  for (IndexBackend backend : {IndexBackend::kScan, IndexBackend::kGpu}) {
    SCOPED_TRACE(std::string(IndexBackendName(backend)));
    StoreOptions o;
    o.host_capacity_bytes = uint64_t{64} * layout.BytesPerBlock();
    o.host_memory = HostMemoryKind::kPlain;
    o.retrieval.enabled = true;
    o.retrieval.backend = backend;
    o.retrieval.top_k = 3;
    o.retrieval.n_init = 16;
    o.retrieval.n_local = 32;
    auto store = Store::Open(o, layout);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    std::mt19937_64 keys_rng(11);
    for (uint32_t b = 0; b < 40; ++b) {
      std::vector<float> keys = Randn(uint64_t{2} * layout.num_kv_heads * 16 * 64, keys_rng, 0.3f);
      if (b == 17) {  // a few keys along the query direction in every KV head
        for (uint32_t h = 0; h < layout.num_kv_heads; ++h) {
          for (uint32_t c = 0; c < 64; ++c) keys[(h * 16 + 5) * 64 + c] += 2.0f * direction[c];
        }
      }
      std::vector<uint16_t> block(keys.size());
      for (uint64_t i = 0; i < keys.size(); ++i) block[i] = FloatToHalfBits(keys[i]);
      ASSERT_TRUE((*store)
                      ->Put(BlockKey{.namespace_id = 0, .sequence = {0, 1}, .layer = 0, .block = b},
                            block.data(), block.size() * 2)
                      .ok());
    }
    std::vector<int64_t> selected(3);
    std::vector<float> scores(3);
    Result<SelectInfo> info =
        (*store)->Select(0, SequenceId{0, 1}, 0, q, 40 * 16, selected, scores);
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    EXPECT_EQ(selected[0], 17);
    picked[backend == IndexBackend::kGpu ? 1 : 0] = selected;
  }
  EXPECT_EQ(picked[0], picked[1]);
  StoreOptions o;
  o.host_capacity_bytes = uint64_t{64} * layout.BytesPerBlock();
  o.host_memory = HostMemoryKind::kPlain;
  o.retrieval.enabled = true;
  o.retrieval.backend = IndexBackend::kGpu;
  o.retrieval.summary = SummaryKind::kMinMax;
  EXPECT_TRUE(Store::Open(o, layout).status().IsInvalidArgument());
}

}  // namespace
}  // namespace kvtier
