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
#include "tests/index_test_util.h"

namespace kvtier {
namespace {

using namespace index_test;  // NOLINT: the index tests' shared helpers

// --- kGpu == ReferenceSelect ----------------------------------------------------------

struct Case {
  Shape shape;
  SelectionScope scope;
  bool summarized;  // summaries by SummarizeBlock, else filled directly
};

class GpuIndexVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(GpuIndexVsReference, SameSelectionAsTheDefinition) {
  const Case p = GetParam();
  const IndexConfig c = Config(IndexBackend::kGpu, p.shape);
  std::unique_ptr<LayerIndex> index = Create(c);
  ASSERT_NE(index, nullptr);
  EXPECT_EQ(GpuIndexOnDevice(*index), cuda::HasDevice());
  std::mt19937_64 rng(2000 + static_cast<uint64_t>(p.shape.kind) * 7 + p.shape.hq);
  Model model;
  for (uint64_t b = 0; b < 300; ++b) {
    const uint64_t id = 500 + 3 * b;  // ids need not be dense
    model[id] = p.summarized ? SummarizedBlock(c.summary, rng) : RandomSummary(c.summary, rng);
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
  const IndexConfig c = Config(IndexBackend::kGpu, shape);
  std::unique_ptr<LayerIndex> index = Create(c);
  ASSERT_NE(index, nullptr);
  std::mt19937_64 rng(77);
  Model model;
  for (int op = 0; op < 1500; ++op) {
    // Ids from a range that grows, so the index passes several capacity doublings (64,
    // 128, 256) and shrinks again through removals.
    const uint64_t id = rng() % (40 + op / 4);
    if (rng() % 10 < 6) {  // add or replace
      model[id] = RandomSummary(c.summary, rng);
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
  const IndexConfig c = Config(IndexBackend::kGpu, shape);
  std::unique_ptr<LayerIndex> index = Create(c);
  ASSERT_NE(index, nullptr);
  std::mt19937_64 rng(5);
  const std::vector<float> q = Randn(uint64_t{shape.hq} * shape.d, rng);
  Model model;
  for (uint64_t b = 0; b < 200; ++b) {
    model[b] = RandomSummary(c.summary, rng);
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
  const IndexConfig c = Config(IndexBackend::kGpu, shape);
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
    model[b] = RandomSummary(c.summary, rng);
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
    model[end + 10] = RandomSummary(c.summary, rng);
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
  EXPECT_TRUE(
      CreateLayerIndex(Config(IndexBackend::kGpu, Shape{16, 2, 64, SummaryKind::kMinMax, 2}))
          .status()
          .IsInvalidArgument());
  // More query heads per KV head than the kernel takes.
  EXPECT_TRUE(CreateLayerIndex(Config(IndexBackend::kGpu, Shape{256, 1, 64, SummaryKind::kMean, 1}))
                  .status()
                  .IsInvalidArgument());
  const IndexConfig c = Config(IndexBackend::kGpu, Shape{8, 2, 64, SummaryKind::kClusters, 3});
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
  const IndexConfig c = Config(IndexBackend::kGpu, Shape{32, 8, 128, SummaryKind::kClusters, 3});
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
