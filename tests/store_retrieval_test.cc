// Retrieval in the Store: summaries on Put (Put, PutBatch, PutFromPagedCache), Select's
// budget (sinks, local window, top_k), removal with Delete / DropSequence / eviction, the
// index rebuilt from the catalog on reopen, IndexBlock, argument checks, and concurrent
// Selects beside Puts and Deletes.
//
// Blocks hold seeded random keys (small, so no block stands out) except for "needle"
// blocks, some of whose keys point along the query: those carry most of the attention
// mass, so the estimator must rank them first.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/dtype_convert.h"
#include "kvtier/store.h"

namespace kvtier {
namespace {

// Allocations made by this thread while counting (operator new is replaced below, for
// the whole test binary; it only counts).
thread_local bool count_allocations = false;
thread_local uint64_t allocations = 0;

}  // namespace
}  // namespace kvtier

void* operator new(std::size_t size) {
  if (kvtier::count_allocations) ++kvtier::allocations;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, std::align_val_t align) {
  if (kvtier::count_allocations) ++kvtier::allocations;
  const std::size_t a = static_cast<std::size_t>(align);
  if (void* p = std::aligned_alloc(a, (std::max<std::size_t>(size, 1) + a - 1) / a * a)) return p;
  throw std::bad_alloc();
}
// Every other form of new and delete too, so that none mixes the sanitizers' allocator
// with malloc's.
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  if (kvtier::count_allocations) ++kvtier::allocations;
  return std::malloc(size == 0 ? 1 : size);
}
void* operator new(std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  if (kvtier::count_allocations) ++kvtier::allocations;
  const std::size_t a = static_cast<std::size_t>(align);
  return std::aligned_alloc(a, (std::max<std::size_t>(size, 1) + a - 1) / a * a);
}
void* operator new[](std::size_t size) { return operator new(size); }
void* operator new[](std::size_t size, std::align_val_t align) { return operator new(size, align); }
void* operator new[](std::size_t size, const std::nothrow_t& t) noexcept {
  return operator new(size, t);
}
void* operator new[](std::size_t size, std::align_val_t align, const std::nothrow_t& t) noexcept {
  return operator new(size, align, t);
}
// GCC sees free() of what the replaced operator new returned (which is malloc's).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
#pragma GCC diagnostic pop

namespace kvtier {
namespace {

// 2 layers, 2 KV heads, 4 query heads, head dim 32, f16, 16-token blocks (4 KiB).
ModelLayout TestLayout(DType dtype = DType::kF16) {
  return ModelLayout{.num_layers = 2,
                     .num_kv_heads = 2,
                     .num_query_heads = 4,
                     .head_dim = 32,
                     .dtype = dtype,
                     .block_tokens = 16};
}

BlockKey Key(uint64_t sequence, uint32_t layer, uint32_t block, uint32_t ns = 0) {
  return BlockKey{.namespace_id = ns, .sequence = {0, sequence}, .layer = layer, .block = block};
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvtier-retrieval-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A unit direction in head_dim space, seeded.
std::vector<float> Direction(uint32_t head_dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> d(head_dim);
  float norm = 0;
  for (float& x : d) {
    x = normal(rng);
    norm += x * x;
  }
  for (float& x : d) x /= std::sqrt(norm);
  return d;
}

// Keys as floats, [num_kv_heads][block_tokens][head_dim], to be written into a block.
struct BlockKeys {
  const ModelLayout layout;
  std::vector<float> keys;
  BlockKeys(const ModelLayout& l, uint64_t seed, float noise = 0.2f)
      : layout(l), keys(uint64_t{l.num_kv_heads} * l.block_tokens * l.head_dim) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, noise);
    for (float& k : keys) k = normal(rng);
  }
  float* key(uint32_t kv_head, uint32_t token) {
    return keys.data() + (uint64_t{kv_head} * layout.block_tokens + token) * layout.head_dim;
  }
  // Sets a few tokens' keys (of the given KV heads, all when kv_head < 0) to
  // `norm` * `direction` (plus their noise).
  void Plant(const std::vector<float>& direction, float norm, uint32_t tokens, int kv_head = -1) {
    for (uint32_t h = 0; h < layout.num_kv_heads; ++h) {
      if (kv_head >= 0 && h != uint32_t(kv_head)) continue;
      for (uint32_t t = 0; t < tokens; ++t) {
        float* k = key(h, (t * 5 + 3) % layout.block_tokens);
        for (uint32_t c = 0; c < layout.head_dim; ++c) k[c] += norm * direction[c];
      }
    }
  }
  // The block's bytes: these keys, then seeded values.
  std::vector<std::byte> Block(uint64_t value_seed = 1) const {
    std::vector<std::byte> block(layout.BytesPerBlock());
    for (uint64_t i = 0; i < keys.size(); ++i)
      StoreFromFloat(block.data(), i, layout.dtype, keys[i]);
    std::mt19937_64 rng(value_seed);
    std::normal_distribution<float> normal;
    for (uint64_t i = keys.size(); i < 2 * keys.size(); ++i) {
      StoreFromFloat(block.data(), i, layout.dtype, normal(rng));
    }
    return block;
  }
};

// Queries [num_query_heads][head_dim] along `direction` with norm `norm`, plus noise.
std::vector<float> Queries(const ModelLayout& l, const std::vector<float>& direction, float norm,
                           uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  std::vector<float> q(uint64_t{l.num_query_heads} * l.head_dim);
  for (uint32_t h = 0; h < l.num_query_heads; ++h) {
    for (uint32_t c = 0; c < l.head_dim; ++c)
      q[h * l.head_dim + c] = norm * direction[c] + normal(rng);
  }
  return q;
}

StoreOptions RetrievalOptionsFor(const ModelLayout& l, uint32_t host_slots) {
  StoreOptions o;
  o.host_capacity_bytes = uint64_t{host_slots} * 4096;
  o.host_memory = HostMemoryKind::kPlain;
  o.retrieval.enabled = true;
  o.retrieval.top_k = 2;
  o.retrieval.n_init = 16;   // one sink block
  o.retrieval.n_local = 32;  // a two-block local window
  (void)l;
  return o;
}

std::unique_ptr<Store> MustOpen(const StoreOptions& o, const ModelLayout& l) {
  auto store = Store::Open(o, l);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(store).value() : nullptr;
}

struct Selection {
  SelectInfo info;
  std::vector<int64_t> selected;
  std::vector<float> scores;
};

Selection MustSelect(Store& store, uint64_t sequence, uint32_t layer,
                     const std::vector<float>& queries, uint64_t context_tokens, uint32_t ns = 0) {
  const RetrievalOptions& r = store.options().retrieval;
  const uint64_t n = r.scope == SelectionScope::kPerKvHead
                         ? uint64_t{store.layout().num_kv_heads} * r.top_k
                         : r.top_k;
  Selection s;
  s.selected.assign(n, -7);
  s.scores.assign(n, -7.0f);
  Result<SelectInfo> info = store.Select(ns, SequenceId{0, sequence}, layer, queries,
                                         context_tokens, s.selected, s.scores);
  EXPECT_TRUE(info.ok()) << info.status().ToString();
  if (info.ok()) s.info = *info;
  for (float score : s.scores) EXPECT_FALSE(std::isnan(score));
  return s;
}

// Scores of the same index contents, built in another order: equal up to rounding.
void ExpectSameScores(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-5f * std::max(1.0f, std::abs(want[i]))) << "at " << i;
  }
}

const std::vector<float> kQueryDirection = Direction(32, 99);
const std::vector<float> kOtherDirection = Direction(32, 1234);

// Blocks [0, n) of (sequence, layer): noise, with needles at `needles` (a needle of
// strength 3 plants 3 keys of norm 6 along the query direction).
void PutBlocks(Store& store, uint64_t sequence, uint32_t layer, uint32_t n,
               const std::vector<uint32_t>& needles, uint64_t seed, uint32_t ns = 0) {
  for (uint32_t b = 0; b < n; ++b) {
    BlockKeys keys(store.layout(), seed * 1000 + b);
    if (std::find(needles.begin(), needles.end(), b) != needles.end()) {
      keys.Plant(kQueryDirection, 6.0f, 3);
    }
    std::vector<std::byte> block = keys.Block(b);
    ASSERT_TRUE(store.Put(Key(sequence, layer, b, ns), block.data(), block.size()).ok());
  }
}

TEST(StoreRetrievalTest, SelectPicksTheBlockAlignedWithTheQuery) {
  const ModelLayout l = TestLayout();
  auto store = MustOpen(RetrievalOptionsFor(l, 64), l);
  ASSERT_NE(store, nullptr);
  PutBlocks(*store, 1, 0, 12, {6}, 11);
  PutBlocks(*store, 1, 1, 12, {3}, 12);
  const std::vector<float> q = Queries(l, kQueryDirection, 4.0f, 5);
  // 12 blocks, 192 tokens: sink [0, 1), local window [10, 12), candidates [1, 10).
  Selection s = MustSelect(*store, 1, 0, q, 192);
  EXPECT_EQ(s.info.sink_blocks, 1u);
  EXPECT_EQ(s.info.local_begin, 10u);
  EXPECT_EQ(s.info.local_end, 12u);
  EXPECT_EQ(s.info.selected, 2u);
  EXPECT_EQ(s.selected[0], 6);
  EXPECT_GE(s.selected[1], 1);
  EXPECT_LT(s.selected[1], 10);
  EXPECT_NE(s.selected[1], 6);
  EXPECT_GT(s.scores[0], 5 * s.scores[1]);  // the needle holds most of the mass
  EXPECT_GT(s.scores[0], 0.0f);
  EXPECT_LE(s.scores[0], 4.0f + 1e-3f);  // a sum of 4 heads' shares
  // The other layer has its own index.
  Selection other = MustSelect(*store, 1, 1, q, 192);
  EXPECT_EQ(other.selected[0], 3);
  // Another sequence or namespace has nothing indexed.
  Selection none = MustSelect(*store, 2, 0, q, 192);
  EXPECT_EQ(none.info.selected, 0u);
  EXPECT_EQ(none.selected, std::vector<int64_t>(2, -1));
  EXPECT_EQ(none.scores, std::vector<float>(2, 0.0f));
  EXPECT_EQ(MustSelect(*store, 1, 0, q, 192, /*ns=*/3).info.selected, 0u);

  StoreStats stats = store->Stats();
  EXPECT_EQ(stats.indexed_blocks, 24u);
  EXPECT_GT(stats.index_memory_bytes, 0u);
  EXPECT_EQ(stats.selects, 4u);
  EXPECT_GT(stats.select_nanos, 0u);
}

TEST(StoreRetrievalTest, SinksAndLocalWindowAreNeverSelected) {
  const ModelLayout l = TestLayout();
  auto store = MustOpen(RetrievalOptionsFor(l, 64), l);
  ASSERT_NE(store, nullptr);
  // Needles in the sink (0), at 4, and in the local window (10, 11).
  PutBlocks(*store, 1, 0, 12, {0, 4, 10, 11}, 21);
  const std::vector<float> q = Queries(l, kQueryDirection, 4.0f, 6);
  Selection s = MustSelect(*store, 1, 0, q, 192);
  EXPECT_EQ(s.selected[0], 4);
  for (int64_t b : s.selected) {
    EXPECT_GE(b, int64_t(s.info.sink_blocks));
    EXPECT_LT(b, int64_t(s.info.local_begin));
  }
  // The sinks and the window take their share of the mass: the needle's share is about
  // a quarter of what it is alone.
  auto alone = MustOpen(RetrievalOptionsFor(l, 64), l);
  PutBlocks(*alone, 1, 0, 12, {4}, 21);
  Selection a = MustSelect(*alone, 1, 0, q, 192);
  ASSERT_EQ(a.selected[0], 4);
  EXPECT_LT(s.scores[0], 0.5f * a.scores[0]);

  // A context in progress: 150 tokens (10 blocks, the last partly filled): the window is
  // [(150 - 32) / 16, ceil(150 / 16)) = [7, 10).
  Selection partial = MustSelect(*store, 1, 0, q, 150);
  EXPECT_EQ(partial.info.local_begin, 7u);
  EXPECT_EQ(partial.info.local_end, 10u);
  EXPECT_EQ(partial.selected[0], 4);
  // A context shorter than the window: no candidates at all.
  Selection early = MustSelect(*store, 1, 0, q, 20);
  EXPECT_EQ(early.info.sink_blocks, 1u);
  EXPECT_EQ(early.info.local_begin, 1u);
  EXPECT_EQ(early.info.local_end, 2u);
  EXPECT_EQ(early.info.selected, 0u);
  EXPECT_EQ(early.selected, std::vector<int64_t>(2, -1));
  // No context at all: an empty window after the sinks.
  Selection empty = MustSelect(*store, 1, 0, q, 0);
  EXPECT_EQ(empty.info.local_begin, 1u);
  EXPECT_EQ(empty.info.local_end, 1u);
  EXPECT_EQ(empty.info.selected, 0u);
}

TEST(StoreRetrievalTest, PerKvHeadScopeSelectsForEachHead) {
  const ModelLayout l = TestLayout();
  StoreOptions o = RetrievalOptionsFor(l, 64);
  o.retrieval.scope = SelectionScope::kPerKvHead;
  auto store = MustOpen(o, l);
  ASSERT_NE(store, nullptr);
  // Block 3's needle is in KV head 0 only, block 7's in KV head 1 only.
  for (uint32_t b = 0; b < 12; ++b) {
    BlockKeys keys(l, 3000 + b);
    if (b == 3) keys.Plant(kQueryDirection, 6.0f, 3, /*kv_head=*/0);
    if (b == 7) keys.Plant(kQueryDirection, 6.0f, 3, /*kv_head=*/1);
    std::vector<std::byte> block = keys.Block();
    ASSERT_TRUE(store->Put(Key(1, 0, b), block.data(), block.size()).ok());
  }
  Selection s = MustSelect(*store, 1, 0, Queries(l, kQueryDirection, 4.0f, 7), 192);
  ASSERT_EQ(s.selected.size(), 4u);
  EXPECT_EQ(s.selected[0], 3);  // KV head 0's best
  EXPECT_EQ(s.selected[2], 7);  // KV head 1's best
  EXPECT_EQ(s.info.selected, 4u);
}

TEST(StoreRetrievalTest, DeleteAndDropSequenceRemoveBlocksFromSelection) {
  const ModelLayout l = TestLayout();
  auto store = MustOpen(RetrievalOptionsFor(l, 64), l);
  ASSERT_NE(store, nullptr);
  PutBlocks(*store, 1, 0, 12, {6, 2}, 31);
  PutBlocks(*store, 2, 0, 12, {5}, 32);
  const std::vector<float> q = Queries(l, kQueryDirection, 4.0f, 8);
  Selection s = MustSelect(*store, 1, 0, q, 192);
  EXPECT_TRUE((s.selected[0] == 6 && s.selected[1] == 2) ||
              (s.selected[0] == 2 && s.selected[1] == 6));

  ASSERT_TRUE(store->Delete(Key(1, 0, 6)).ok());
  EXPECT_EQ(store->Stats().indexed_blocks, 23u);
  s = MustSelect(*store, 1, 0, q, 192);
  EXPECT_EQ(s.selected[0], 2);
  EXPECT_NE(s.selected[1], 6);

  // A Put under the deleted key indexes it again, with its new keys (no needle now).
  std::vector<std::byte> plain = BlockKeys(l, 777).Block();
  ASSERT_TRUE(store->Put(Key(1, 0, 6), plain.data(), plain.size()).ok());
  s = MustSelect(*store, 1, 0, q, 192);
  EXPECT_EQ(s.selected[0], 2);
  // Replacing a block replaces its summary: block 2 loses its needle.
  ASSERT_TRUE(store->Put(Key(1, 0, 2), plain.data(), plain.size()).ok());
  std::vector<std::byte> needle = [&] {
    BlockKeys k(l, 778);
    k.Plant(kQueryDirection, 6.0f, 3);
    return k.Block();
  }();
  ASSERT_TRUE(store->Put(Key(1, 0, 8), needle.data(), needle.size()).ok());
  s = MustSelect(*store, 1, 0, q, 192);
  EXPECT_EQ(s.selected[0], 8);
  EXPECT_EQ(store->Stats().indexed_blocks, 24u);

  Result<uint64_t> dropped = store->DropSequence(0, SequenceId{0, 1});
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, 12u);
  s = MustSelect(*store, 1, 0, q, 192);
  EXPECT_EQ(s.info.selected, 0u);
  EXPECT_EQ(s.selected, std::vector<int64_t>(2, -1));
  EXPECT_EQ(store->Stats().indexed_blocks, 12u);
  EXPECT_EQ(MustSelect(*store, 2, 0, q, 192).selected[0], 5);  // the other sequence stays

  // Deleting every block of a sequence one by one frees its indexes too.
  for (uint32_t b = 0; b < 12; ++b) ASSERT_TRUE(store->Delete(Key(2, 0, b)).ok());
  StoreStats stats = store->Stats();
  EXPECT_EQ(stats.indexed_blocks, 0u);
  EXPECT_EQ(stats.index_memory_bytes, 0u);
  EXPECT_EQ(MustSelect(*store, 2, 0, q, 192).info.selected, 0u);
}

TEST(StoreRetrievalTest, PutBatchAndPagedCacheIndexLikePut) {
  const ModelLayout l = TestLayout();
  auto one_by_one = MustOpen(RetrievalOptionsFor(l, 64), l);
  auto batched = MustOpen(RetrievalOptionsFor(l, 64), l);
  auto paged = MustOpen(RetrievalOptionsFor(l, 64), l);
  ASSERT_TRUE(one_by_one && batched && paged);
  constexpr uint32_t kBlocks = 10;
  std::vector<std::vector<std::byte>> blocks;
  std::vector<BlockKeys> all_keys;
  for (uint32_t b = 0; b < kBlocks; ++b) {
    BlockKeys keys(l, 4000 + b);
    if (b == 5) keys.Plant(kQueryDirection, 6.0f, 2);
    if (b == 3) keys.Plant(kQueryDirection, 5.0f, 2);
    blocks.push_back(keys.Block());
    all_keys.push_back(keys);
  }
  std::vector<BlockWrite> writes;
  std::vector<BlockKey> keys;
  for (uint32_t b = 0; b < kBlocks; ++b) {
    ASSERT_TRUE(one_by_one->Put(Key(1, 1, b), blocks[b].data(), blocks[b].size()).ok());
    writes.push_back(BlockWrite{Key(1, 1, b), blocks[b].data(), blocks[b].size()});
    keys.push_back(Key(1, 1, b));
  }
  std::vector<Status> statuses(kBlocks);
  ASSERT_TRUE(batched->PutBatch(writes, statuses).ok());

  // The same blocks in a vLLM-style paged cache (NHD, separate K and V, 16-token pages):
  // page p holds block kBlocks - 1 - p.
  PagedCacheDesc desc{.layout = PagedLayout::kNHD,
                      .kv_combined = false,
                      .dtype = l.dtype,
                      .num_pages = kBlocks,
                      .page_size = l.block_tokens,
                      .num_kv_heads = l.num_kv_heads,
                      .head_dim = l.head_dim,
                      .block_tokens = l.block_tokens};
  const uint64_t elems = uint64_t{kBlocks} * l.block_tokens * l.num_kv_heads * l.head_dim;
  std::vector<uint16_t> k_cache(elems), v_cache(elems);
  std::vector<int32_t> table(kBlocks);
  for (uint32_t b = 0; b < kBlocks; ++b) {
    const uint32_t page = kBlocks - 1 - b;
    table[b] = int32_t(page);
    const auto* src = reinterpret_cast<const uint16_t*>(blocks[b].data());
    const uint64_t half = blocks[b].size() / 4;  // elements of the keys (2 bytes each)
    for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
      for (uint32_t t = 0; t < l.block_tokens; ++t) {
        for (uint32_t c = 0; c < l.head_dim; ++c) {
          const uint64_t from = (uint64_t{h} * l.block_tokens + t) * l.head_dim + c;
          const uint64_t to =
              ((uint64_t{page} * l.block_tokens + t) * l.num_kv_heads + h) * l.head_dim + c;
          k_cache[to] = src[from];
          v_cache[to] = src[half + from];
        }
      }
    }
  }
  Status s = paged->PutFromPagedCache(keys, desc, k_cache.data(), v_cache.data(), table, nullptr,
                                      statuses);
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::vector<std::byte> out(l.BytesPerBlock());
  ASSERT_TRUE(paged->Get(Key(1, 1, 5), out.data(), out.size()).ok());
  ASSERT_EQ(out, blocks[5]);

  for (uint64_t seed : {1, 2, 3}) {
    const std::vector<float> q =
        Queries(l, seed == 3 ? kOtherDirection : kQueryDirection, 3.0f, seed);
    Selection a = MustSelect(*one_by_one, 1, 1, q, 160);
    Selection b = MustSelect(*batched, 1, 1, q, 160);
    Selection c = MustSelect(*paged, 1, 1, q, 160);
    EXPECT_EQ(a.selected, b.selected);
    EXPECT_EQ(a.scores, b.scores);
    EXPECT_EQ(a.selected, c.selected);
    EXPECT_EQ(a.scores, c.scores);
    if (seed != 3) {
      EXPECT_EQ(a.selected[0], 5);
      EXPECT_EQ(a.selected[1], 3);
    }
  }
  EXPECT_EQ(paged->Stats().indexed_blocks, kBlocks);
}

// Reopening a disk store rebuilds the indexes from the catalog: the same selections.
TEST(StoreRetrievalTest, ReopenRebuildsTheSameIndex) {
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    SCOPED_TRACE(std::string(DTypeName(dtype)));
    const ModelLayout l = TestLayout(dtype);
    TempDir dir;
    StoreOptions o = RetrievalOptionsFor(l, 16);  // fewer slots than blocks: some on disk only
    o.directory = dir.path();
    o.disk_capacity_bytes = 1 << 20;
    o.io_depth = 8;
    std::vector<std::vector<float>> queries;
    for (uint64_t seed = 0; seed < 4; ++seed) {
      queries.push_back(Queries(l, seed % 2 ? kOtherDirection : kQueryDirection, 3.0f, seed));
    }
    std::vector<Selection> before;
    uint64_t indexed = 0;
    {
      auto store = MustOpen(o, l);
      ASSERT_NE(store, nullptr);
      for (uint64_t seq = 1; seq <= 2; ++seq) {
        for (uint32_t layer = 0; layer < 2; ++layer) {
          PutBlocks(*store, seq, layer, 14, {uint32_t(2 + seq + layer)}, seq * 10 + layer);
        }
      }
      ASSERT_TRUE(store->Delete(Key(2, 1, 9)).ok());
      ASSERT_TRUE(store->Flush().ok());
      for (uint64_t seq = 1; seq <= 2; ++seq) {
        for (uint32_t layer = 0; layer < 2; ++layer) {
          for (const std::vector<float>& q : queries) {
            before.push_back(MustSelect(*store, seq, layer, q, 224));
          }
        }
      }
      indexed = store->Stats().indexed_blocks;
      EXPECT_EQ(indexed, 55u);
      EXPECT_GT(store->Stats().evictions, 0u);
    }
    auto store = MustOpen(o, l);
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->Stats().indexed_blocks, indexed);
    size_t i = 0;
    for (uint64_t seq = 1; seq <= 2; ++seq) {
      for (uint32_t layer = 0; layer < 2; ++layer) {
        for (const std::vector<float>& q : queries) {
          Selection after = MustSelect(*store, seq, layer, q, 224);
          EXPECT_EQ(after.selected, before[i].selected) << "sequence " << seq << " layer " << layer;
          ExpectSameScores(after.scores, before[i].scores);
          EXPECT_EQ(after.info.selected, before[i].info.selected);
          ++i;
        }
      }
    }
    EXPECT_EQ(MustSelect(*store, 1, 0, queries[0], 224).selected[0], 3);
    // Changes after the reopen persist as well; a dropped sequence stays dropped.
    ASSERT_TRUE(store->DropSequence(0, SequenceId{0, 2}).ok());
    store.reset();
    store = MustOpen(o, l);
    EXPECT_EQ(store->Stats().indexed_blocks, 28u);
    EXPECT_EQ(MustSelect(*store, 2, 0, queries[0], 224).info.selected, 0u);
    EXPECT_EQ(MustSelect(*store, 1, 1, queries[0], 224).selected[0], 4);
  }
}

// A disk store whose host tier holds a fraction of the blocks still selects over all.
TEST(StoreRetrievalTest, DiskStoreUnderMemoryPressureSelectsOverEveryBlock) {
  const ModelLayout l = TestLayout();
  for (bool write_through : {true, false}) {
    SCOPED_TRACE(write_through ? "write-through" : "write-back");
    TempDir dir;
    StoreOptions o = RetrievalOptionsFor(l, 8);
    o.directory = dir.path();
    o.disk_capacity_bytes = 1 << 20;
    o.io_depth = 8;
    o.write_through = write_through;
    auto store = MustOpen(o, l);
    ASSERT_NE(store, nullptr);
    PutBlocks(*store, 1, 0, 40, {2, 25}, 51);
    StoreStats stats = store->Stats();
    EXPECT_LE(stats.host_blocks, 8u);
    EXPECT_GT(stats.evictions, 0u);
    EXPECT_EQ(stats.evictions_lost, 0u);
    EXPECT_EQ(stats.indexed_blocks, 40u);
    // 40 blocks, 640 tokens: candidates [1, 38); both needles were evicted long ago.
    Selection s = MustSelect(*store, 1, 0, Queries(l, kQueryDirection, 4.0f, 9), 640);
    std::vector<int64_t> got = s.selected;
    std::sort(got.begin(), got.end());
    EXPECT_EQ(got, (std::vector<int64_t>{2, 25}));
  }
}

// Without a disk tier an evicted block is lost, and leaves the index.
TEST(StoreRetrievalTest, MemoryOnlyEvictionRemovesFromTheIndex) {
  const ModelLayout l = TestLayout();
  auto store = MustOpen(RetrievalOptionsFor(l, 8), l);
  ASSERT_NE(store, nullptr);
  PutBlocks(*store, 1, 0, 20, {3, 15}, 61);
  StoreStats stats = store->Stats();
  EXPECT_EQ(stats.evictions_lost, 12u);
  EXPECT_EQ(stats.indexed_blocks, 8u);
  Selection s = MustSelect(*store, 1, 0, Queries(l, kQueryDirection, 4.0f, 10), 320);
  EXPECT_EQ(s.selected[0], 15);  // block 3 is gone
  for (int64_t b : s.selected) {
    if (b >= 0) {
      EXPECT_TRUE(store->Contains(Key(1, 0, uint32_t(b)))) << b;
    }
  }
  // A sequence evicted whole leaves nothing behind.
  PutBlocks(*store, 2, 0, 8, {}, 62);
  EXPECT_EQ(store->Stats().indexed_blocks, 8u);
  EXPECT_EQ(MustSelect(*store, 1, 0, Queries(l, kQueryDirection, 4.0f, 10), 320).info.selected, 0u);
}

// kTopR without scores keeps the keys of largest norm; IndexBlock with attention scores
// makes it keep the keys that drew the attention.
TEST(StoreRetrievalTest, IndexBlockWithScoresChangesATopRSummary) {
  const ModelLayout l = TestLayout();
  for (int mode = 0; mode < 3; ++mode) {  // memory only, write-through, write-back
    SCOPED_TRACE(mode);
    TempDir dir;
    StoreOptions o = RetrievalOptionsFor(l, 64);
    o.retrieval.summary = SummaryKind::kTopR;
    o.retrieval.top_r = 1;
    o.retrieval.top_k = 1;
    if (mode > 0) {
      o.directory = dir.path();
      o.disk_capacity_bytes = 1 << 20;
      o.write_through = mode == 1;
    }
    auto store = MustOpen(o, l);
    ASSERT_NE(store, nullptr);
    // Block 2: its largest key (norm 2) along the query. Block 5: its largest key (norm
    // 10) orthogonal to it, token 9's key (norm 3) along it.
    std::vector<float> orthogonal = kOtherDirection;
    float dot = 0;
    for (uint32_t c = 0; c < l.head_dim; ++c) dot += orthogonal[c] * kQueryDirection[c];
    float norm = 0;
    for (uint32_t c = 0; c < l.head_dim; ++c) {
      orthogonal[c] -= dot * kQueryDirection[c];
      norm += orthogonal[c] * orthogonal[c];
    }
    for (float& x : orthogonal) x /= std::sqrt(norm);
    std::vector<std::byte> block5;
    for (uint32_t b = 0; b < 10; ++b) {
      BlockKeys keys(l, 5000 + b, 0.05f);
      if (b == 2) keys.Plant(kQueryDirection, 2.0f, 1);
      if (b == 5) {
        keys.Plant(orthogonal, 10.0f, 1);
        for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
          for (uint32_t c = 0; c < l.head_dim; ++c) keys.key(h, 9)[c] += 3.0f * kQueryDirection[c];
        }
      }
      std::vector<std::byte> block = keys.Block();
      if (b == 5) block5 = block;
      ASSERT_TRUE(store->Put(Key(1, 0, b), block.data(), block.size()).ok());
    }
    const std::vector<float> q = Queries(l, kQueryDirection, 4.0f, 11);
    Selection before = MustSelect(*store, 1, 0, q, 160);
    EXPECT_EQ(before.selected[0], 2);

    std::vector<float> scores(uint64_t{l.num_kv_heads} * l.block_tokens, 0.01f);
    for (uint32_t h = 0; h < l.num_kv_heads; ++h) scores[h * l.block_tokens + 9] = 0.9f;
    Status s =
        store->IndexBlock(Key(1, 0, 5), block5.data(), block5.size(), l.block_tokens, scores);
    ASSERT_TRUE(s.ok()) << s.ToString();
    Selection after = MustSelect(*store, 1, 0, q, 160);
    EXPECT_EQ(after.selected[0], 5);
    EXPECT_GT(after.scores[0], before.scores[0]);
    EXPECT_EQ(store->Stats().indexed_blocks, 10u);

    if (mode > 0) {
      // The new summary is what the catalog holds after a reopen.
      ASSERT_TRUE(store->Flush().ok());
      store.reset();
      store = MustOpen(o, l);
      ASSERT_NE(store, nullptr);
      Selection reopened = MustSelect(*store, 1, 0, q, 160);
      EXPECT_EQ(reopened.selected, after.selected);
      ExpectSameScores(reopened.scores, after.scores);
      // A later Put replaces it (the largest-norm key again), durably too.
      ASSERT_TRUE(store->Put(Key(1, 0, 5), block5.data(), block5.size()).ok());
      EXPECT_EQ(MustSelect(*store, 1, 0, q, 160).selected[0], 2);
      ASSERT_TRUE(store->Flush().ok());
      store.reset();
      store = MustOpen(o, l);
      EXPECT_EQ(MustSelect(*store, 1, 0, q, 160).selected[0], 2);
      // IndexBlock of a block that lives on disk only (durable at once), then Delete:
      // the summary goes with the block.
      ASSERT_TRUE(
          store->IndexBlock(Key(1, 0, 5), block5.data(), block5.size(), l.block_tokens, scores)
              .ok());
      EXPECT_EQ(MustSelect(*store, 1, 0, q, 160).selected[0], 5);
      ASSERT_TRUE(store->Flush().ok());
      store.reset();
      store = MustOpen(o, l);
      EXPECT_EQ(MustSelect(*store, 1, 0, q, 160).selected[0], 5);
      ASSERT_TRUE(store->Delete(Key(1, 0, 5)).ok());
      ASSERT_TRUE(store->Flush().ok());
      store.reset();
      store = MustOpen(o, l);
      EXPECT_EQ(store->Stats().indexed_blocks, 9u);
      EXPECT_EQ(MustSelect(*store, 1, 0, q, 160).selected[0], 2);
    }
  }
}

TEST(StoreRetrievalTest, IndexBlockOfAPartlyFilledBlock) {
  const ModelLayout l = TestLayout();
  auto store = MustOpen(RetrievalOptionsFor(l, 64), l);
  ASSERT_NE(store, nullptr);
  PutBlocks(*store, 1, 0, 10, {}, 71);
  // Block 6: a weak needle (one key). Block 4: a strong one in tokens past
  // valid_tokens: with valid_tokens = 3 it does not count (the Put indexed it whole).
  BlockKeys weak(l, 7101);
  weak.Plant(kQueryDirection, 3.0f, 1);
  std::vector<std::byte> weak_block = weak.Block();
  ASSERT_TRUE(store->Put(Key(1, 0, 6), weak_block.data(), weak_block.size()).ok());
  BlockKeys keys(l, 7100);
  for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
    for (uint32_t t = 8; t < 11; ++t) {
      for (uint32_t c = 0; c < l.head_dim; ++c) keys.key(h, t)[c] += 6.0f * kQueryDirection[c];
    }
  }
  std::vector<std::byte> block = keys.Block();
  ASSERT_TRUE(store->Put(Key(1, 0, 4), block.data(), block.size()).ok());
  const std::vector<float> q = Queries(l, kQueryDirection, 4.0f, 12);
  EXPECT_EQ(MustSelect(*store, 1, 0, q, 160).selected[0], 4);
  ASSERT_TRUE(store->IndexBlock(Key(1, 0, 4), block.data(), block.size(), 3, {}).ok());
  EXPECT_EQ(MustSelect(*store, 1, 0, q, 160).selected[0], 6);
  ASSERT_TRUE(store->IndexBlock(Key(1, 0, 4), block.data(), block.size(), 11, {}).ok());
  EXPECT_EQ(MustSelect(*store, 1, 0, q, 160).selected[0], 4);
}

TEST(StoreRetrievalTest, BadArguments) {
  const ModelLayout l = TestLayout();
  auto store = MustOpen(RetrievalOptionsFor(l, 64), l);
  ASSERT_NE(store, nullptr);
  PutBlocks(*store, 1, 0, 4, {}, 81);
  std::vector<float> q(4 * 32, 0.5f);
  std::vector<int64_t> out(2);
  std::vector<float> scores(2);
  const SequenceId seq{0, 1};
  auto code = [&](const Result<SelectInfo>& r) { return r.status().code(); };
  EXPECT_EQ(code(store->Select(0, seq, 2, q, 64, out, scores)), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(store->Select(0, seq, 0, std::span(q).first(127), 64, out, scores)),
            StatusCode::kInvalidArgument);
  std::vector<float> long_q(4 * 32 + 1);
  EXPECT_EQ(code(store->Select(0, seq, 0, long_q, 64, out, scores)), StatusCode::kInvalidArgument);
  std::vector<int64_t> short_out(1), long_out(3);
  EXPECT_EQ(code(store->Select(0, seq, 0, q, 64, short_out, {})), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(store->Select(0, seq, 0, q, 64, long_out, {})), StatusCode::kInvalidArgument);
  std::vector<float> bad_scores(3);
  EXPECT_EQ(code(store->Select(0, seq, 0, q, 64, out, bad_scores)), StatusCode::kInvalidArgument);
  // The same checks for a sequence with nothing indexed.
  EXPECT_EQ(code(store->Select(0, SequenceId{0, 9}, 0, q, 64, short_out, {})),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(store->Select(0, seq, 0, q, 64, out, {}).ok());  // scores are optional
  EXPECT_EQ(store->Stats().selects, 1u);                       // failed calls do not count

  std::vector<std::byte> block = BlockKeys(l, 1).Block();
  std::vector<float> token_scores(2 * 16, 1.0f);
  EXPECT_EQ(store->IndexBlock(Key(1, 0, 9), block.data(), block.size(), 16, {}).code(),
            StatusCode::kNotFound);
  EXPECT_EQ(store->IndexBlock(Key(1, 0, 1), block.data(), block.size(), 0, {}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store->IndexBlock(Key(1, 0, 1), block.data(), block.size(), 17, {}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store->IndexBlock(Key(1, 0, 1), block.data(), block.size() - 1, 16, {}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store->IndexBlock(Key(1, 0, 1), nullptr, block.size(), 16, {}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store->IndexBlock(Key(1, 2, 1), block.data(), block.size(), 16, {}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store
                ->IndexBlock(Key(1, 0, 1), block.data(), block.size(), 16,
                             std::span(token_scores).first(31))
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(store->IndexBlock(Key(1, 0, 1), block.data(), block.size(), 16, token_scores).ok());

  // Retrieval off: FailedPrecondition.
  StoreOptions off = RetrievalOptionsFor(l, 64);
  off.retrieval.enabled = false;
  auto plain = MustOpen(off, l);
  ASSERT_NE(plain, nullptr);
  ASSERT_TRUE(plain->Put(Key(1, 0, 0), block.data(), block.size()).ok());
  EXPECT_EQ(code(plain->Select(0, seq, 0, q, 64, out, scores)), StatusCode::kFailedPrecondition);
  EXPECT_EQ(plain->IndexBlock(Key(1, 0, 0), block.data(), block.size(), 16, {}).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(plain->Stats().indexed_blocks, 0u);
}

TEST(StoreRetrievalTest, OpenValidatesRetrievalOptions) {
  const ModelLayout l = TestLayout();
  auto open_code = [&](auto mutate) {
    StoreOptions o = RetrievalOptionsFor(l, 64);
    mutate(o.retrieval);
    Result<std::unique_ptr<Store>> store = Store::Open(o, l);
    return store.status().code();
  };
  EXPECT_EQ(open_code([](RetrievalOptions&) {}), StatusCode::kOk);
  EXPECT_EQ(open_code([](RetrievalOptions& r) { r.clusters = 0; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(open_code([](RetrievalOptions& r) { r.clusters = 65; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(open_code([](RetrievalOptions& r) { r.top_r = 0; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(open_code([](RetrievalOptions& r) { r.top_k = 0; }), StatusCode::kInvalidArgument);
  EXPECT_EQ(open_code([](RetrievalOptions& r) { r.summary = SummaryKind(9); }),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(open_code([](RetrievalOptions& r) { r.backend = IndexBackend(9); }),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(open_code([](RetrievalOptions& r) { r.scope = SelectionScope(9); }),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(open_code([](RetrievalOptions& r) {
              r.backend = IndexBackend::kInfLLM;
              r.scope = SelectionScope::kPerKvHead;
            }),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(open_code([](RetrievalOptions& r) { r.backend = IndexBackend::kScan; }),
            StatusCode::kOk);
  // A bad option of a disabled retrieval is not looked at.
  EXPECT_EQ(open_code([](RetrievalOptions& r) {
              r.enabled = false;
              r.clusters = 0;
            }),
            StatusCode::kOk);
  Result<std::unique_ptr<Store>> bad = Store::Open(
      [&] {
        StoreOptions o = RetrievalOptionsFor(l, 64);
        o.retrieval.top_k = 0;
        return o;
      }(),
      l);
  EXPECT_NE(bad.status().message().find("top_k"), std::string::npos) << bad.status().ToString();
}

// Every backend the build has behind the same Store: the needle is found by each.
TEST(StoreRetrievalTest, EveryBackendFindsTheNeedle) {
  const ModelLayout l = TestLayout();
  for (IndexBackend backend : {IndexBackend::kAuto, IndexBackend::kScan, IndexBackend::kFaissFlat,
                               IndexBackend::kFaissHnsw, IndexBackend::kInfLLM}) {
    SCOPED_TRACE(std::string(IndexBackendName(backend)));
    StoreOptions o = RetrievalOptionsFor(l, 64);
    o.retrieval.backend = backend;
    Result<std::unique_ptr<Store>> store = Store::Open(o, l);
    if (store.status().code() == StatusCode::kNotSupported) continue;  // not in this build
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    PutBlocks(**store, 1, 0, 12, {7}, 91);
    EXPECT_EQ(MustSelect(**store, 1, 0, Queries(l, kQueryDirection, 4.0f, 13), 192).selected[0], 7);
  }
}

// Once a layer's index has seen its size, Select allocates nothing (kvtier/store.h).
TEST(StoreRetrievalTest, SelectAllocatesNothingOnceWarm) {
  const ModelLayout l = TestLayout();
  for (SelectionScope scope : {SelectionScope::kPerLayer, SelectionScope::kPerKvHead}) {
    for (SummaryKind kind : {SummaryKind::kClusters, SummaryKind::kMinMax}) {
      SCOPED_TRACE(std::string(SummaryKindName(kind)));
      StoreOptions o = RetrievalOptionsFor(l, 64);
      o.retrieval.scope = scope;
      o.retrieval.summary = kind;
      auto store = MustOpen(o, l);
      ASSERT_NE(store, nullptr);
      PutBlocks(*store, 1, 0, 40, {9}, 111);
      const std::vector<float> q = Queries(l, kQueryDirection, 4.0f, 14);
      const size_t n = scope == SelectionScope::kPerKvHead ? 4 : 2;
      std::vector<int64_t> selected(n);
      std::vector<float> scores(n);
      const SequenceId seq{0, 1}, none{0, 2};
      for (int i = 0; i < 3; ++i) {  // warm-up
        ASSERT_TRUE(store->Select(0, seq, 0, q, 640 - 16 * i, selected, scores).ok());
        ASSERT_TRUE(store->Select(0, none, 0, q, 640, selected, scores).ok());
      }
      bool ok = true;
      count_allocations = true;
      allocations = 0;
      for (int i = 0; i < 20; ++i) {
        ok &= store->Select(0, seq, 0, q, 640 - 16 * (i % 3), selected, scores).ok();
        ok &= store->Select(0, seq, 0, q, 640, selected, {}).ok();
        ok &= store->Select(0, none, 0, q, 640, selected, scores).ok();
      }
      count_allocations = false;
      EXPECT_TRUE(ok);
      EXPECT_EQ(allocations, 0u);
      ASSERT_TRUE(store->Select(0, seq, 0, q, 640, selected, scores).ok());
      EXPECT_EQ(selected[0], 9);
    }
  }
}

// Selects of every layer run beside Puts, replacements and Deletes of the same sequence;
// every selection names a candidate, and the needle (never touched) stays first.
TEST(StoreRetrievalTest, ConcurrentSelectsPutsAndDeletes) {
  const ModelLayout l = TestLayout();
  TempDir dir;
  StoreOptions o = RetrievalOptionsFor(l, 24);
  o.directory = dir.path();
  o.disk_capacity_bytes = 4 << 20;
  auto store = MustOpen(o, l);
  ASSERT_NE(store, nullptr);
  for (uint32_t layer = 0; layer < 2; ++layer) PutBlocks(*store, 1, layer, 32, {7}, 100 + layer);
  std::atomic<bool> stop{false};
  std::atomic<int> selects{0};
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(200 + t);
      while (!stop.load()) {
        const uint32_t layer = rng() % 2, b = 10 + rng() % 20;
        if (rng() % 3 == 0) {
          Status s = store->Delete(Key(1, layer, b));
          EXPECT_TRUE(s.ok() || s.code() == StatusCode::kNotFound) << s.ToString();
        } else {
          std::vector<std::byte> block = BlockKeys(l, rng()).Block();
          EXPECT_TRUE(store->Put(Key(1, layer, b), block.data(), block.size()).ok());
        }
      }
    });
  }
  for (uint32_t t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      const std::vector<float> q = Queries(l, kQueryDirection, 4.0f, 300 + t);
      for (int i = 0; i < 300; ++i) {
        Selection s = MustSelect(*store, 1, (i + t) % 2, q, 512);
        EXPECT_EQ(s.selected[0], 7);
        for (int64_t b : s.selected) {
          EXPECT_TRUE(b == -1 || (b >= 1 && b < 30)) << b;
        }
        ++selects;
      }
    });
  }
  threads[2].join();
  threads[3].join();
  stop = true;
  threads[0].join();
  threads[1].join();
  EXPECT_EQ(selects.load(), 600);
  // The index holds exactly the blocks the store holds.
  ASSERT_TRUE(store->Flush().ok());
  uint64_t present = 0;
  for (uint32_t layer = 0; layer < 2; ++layer) {
    for (uint32_t b = 0; b < 32; ++b) present += store->Contains(Key(1, layer, b)) ? 1 : 0;
  }
  EXPECT_EQ(store->Stats().indexed_blocks, present);
  store.reset();
  store = MustOpen(o, l);
  EXPECT_EQ(store->Stats().indexed_blocks, present);
}

}  // namespace
}  // namespace kvtier
