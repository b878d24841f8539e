// The GPU side of the Store through kvtierd (src/client/sidecar_device.h) against the
// embedded store: the same tests run on both. Acquire serves the blocks' bytes at device
// addresses (the GPU tier is emulated in host memory here: no GPU), hits the second
// time, and never serves a stale copy after this client's overwrites, deletes and
// DropSequence; a missing block leaves nothing pinned; a tier pinned full is
// ResourceExhausted; prefetch brings the next layer in; PutFromPagedCache stores the
// blocks the documented layout names, and refuses bad page tables. The sidecar runs
// twice: with misses copied in by the daemon (the direct path) and through the staging
// area; the direct path survives a restart of the daemon.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kvtier/client.h"
#include "tests/client_test_util.h"
#include "tests/store_paged_test.h"
#include "tests/test_util.h"

namespace kvtier {
namespace {

using testing::Eventually;
using testing::Key;
using testing::MemoryStore;
using testing::RandomBlock;
using testing::Sidecar;
using testing::SmallLayout;

// kSidecar: misses copied in by the daemon (the direct path, the default);
// kSidecarStaging: through the staging area (SidecarOptions::direct_device off).
enum class Backend { kEmbedded, kSidecar, kSidecarStaging };

std::string BackendName(const ::testing::TestParamInfo<Backend>& info) {
  switch (info.param) {
    case Backend::kEmbedded:
      return "Embedded";
    case Backend::kSidecar:
      return "Sidecar";
    case Backend::kSidecarStaging:
      return "SidecarStaging";
  }
  return "?";
}

class ClientDeviceTest : public ::testing::TestWithParam<Backend> {
 protected:
  // A store with a GPU tier of `device_blocks` blocks (0: none), emulated.
  std::unique_ptr<Store> Open(uint64_t device_blocks, bool prefetch = false) {
    StoreOptions o;
    if (GetParam() == Backend::kEmbedded) {
      o = MemoryStore(layout_, 256);
    } else {
      if (sidecar_ == nullptr) {
        StoreOptions backing = MemoryStore(layout_, 256);
        SetRetrieval(&backing.retrieval);
        sidecar_ = std::make_unique<Sidecar>(backing, layout_);
        if (!sidecar_->StartServer()) return nullptr;
      }
      o = sidecar_->ClientOptions(16);
      o.sidecar.direct_device = GetParam() == Backend::kSidecar;
    }
    SetRetrieval(&o.retrieval);
    o.retrieval.prefetch = prefetch;
    o.retrieval.force_emulated_device = true;
    o.retrieval.device_capacity_bytes =
        device_blocks * ((layout_.BytesPerBlock() + 255) / 256 * 256);
    auto store = Store::Open(o, layout_);
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    return store.ok() ? std::move(store).value() : nullptr;
  }

  // Retrieval as both sides see it: top 4 of blocks past a 1-block sink and before a
  // 2-block window, 4 runners-up.
  static void SetRetrieval(RetrievalOptions* r) {
    r->enabled = true;
    r->top_k = 4;
    r->n_init = 16;
    r->n_local = 32;
    r->prefetch_extra = 4;
  }

  // Puts blocks 0..n-1 of (sequence 7, layer) with fresh random bytes; returns them.
  std::vector<std::vector<std::byte>> PutBlocks(Store& store, uint32_t layer, uint32_t n) {
    std::vector<std::vector<std::byte>> blocks;
    for (uint32_t b = 0; b < n; ++b) {
      blocks.push_back(RandomBlock(layout_.BytesPerBlock(), rng_));
      EXPECT_TRUE(store.Put(Key(7, layer, b), blocks.back().data(), blocks.back().size()).ok());
    }
    return blocks;
  }

  static bool Holds(uint64_t address, const std::vector<std::byte>& bytes) {
    return address != 0 &&
           std::memcmp(reinterpret_cast<const void*>(address), bytes.data(), bytes.size()) == 0;
  }

  const ModelLayout layout_ = SmallLayout();
  const SequenceId sequence_{0, 7};
  std::unique_ptr<Sidecar> sidecar_;
  std::mt19937_64 rng_{20261203};
};

TEST_P(ClientDeviceTest, AcquireServesTheBytesThenHits) {
  auto store = Open(16);
  ASSERT_NE(store, nullptr);
  const auto blocks = PutBlocks(*store, 1, 12);
  const std::vector<int64_t> want = {3, 11, -1, 0, 7};
  std::vector<uint64_t> addrs(want.size());
  auto a = store->Acquire(0, sequence_, 1, want, nullptr, addrs);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->hits, 0u);
  EXPECT_EQ(a->from_host + a->from_disk, 4u);
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] < 0) {
      EXPECT_EQ(addrs[i], 0u);
    } else {
      EXPECT_TRUE(Holds(addrs[i], blocks[want[i]])) << "block " << want[i];
    }
  }
  ASSERT_TRUE(store->Release(a->lease).ok());
  std::vector<uint64_t> again(want.size());
  auto b = store->Acquire(0, sequence_, 1, want, nullptr, again);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->hits, 4u);
  EXPECT_EQ(again, addrs);
  ASSERT_TRUE(store->Release(b->lease).ok());
  const StoreStats s = store->Stats();
  EXPECT_TRUE(s.device_emulated);
  EXPECT_EQ(s.device_slots, 16u);
  EXPECT_EQ(s.device_blocks, 4u);
  EXPECT_EQ(s.acquires, 2u);
  EXPECT_EQ(s.device_hits, 4u);
  EXPECT_EQ(s.device_bytes_in, 4 * layout_.BytesPerBlock());
  // The path the misses took: the daemon copied them in, or they came through the
  // staging area (or the embedded store's host tier).
  EXPECT_EQ(s.device_direct_blocks, GetParam() == Backend::kSidecar ? 4u : 0u);
  if (GetParam() != Backend::kEmbedded) {
    const std::optional<SidecarStatus> status = GetSidecarStatus(*store);
    ASSERT_TRUE(status.has_value());
    EXPECT_EQ(status->direct_device, GetParam() == Backend::kSidecar)
        << status->direct_device_error;
    EXPECT_EQ(status->direct_device_error, "");
  }
  EXPECT_EQ(store->Release(b->lease).code(), StatusCode::kInvalidArgument);  // released already
}

TEST_P(ClientDeviceTest, OverwriteDeleteAndDropNeverServeAStaleCopy) {
  auto store = Open(8);
  ASSERT_NE(store, nullptr);
  PutBlocks(*store, 0, 3);
  const int64_t one = 1;
  uint64_t addr = 0;
  auto a = store->Acquire(0, sequence_, 0, {&one, 1}, nullptr, {&addr, 1});
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(store->Release(a->lease).ok());

  const auto v2 = RandomBlock(layout_.BytesPerBlock(), rng_);
  ASSERT_TRUE(store->Put(Key(7, 0, 1), v2.data(), v2.size()).ok());
  auto b = store->Acquire(0, sequence_, 0, {&one, 1}, nullptr, {&addr, 1});
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->hits, 0u);
  EXPECT_TRUE(Holds(addr, v2));
  ASSERT_TRUE(store->Release(b->lease).ok());

  // An asynchronous batch overwrite: stale once its completion has run.
  const auto v3 = RandomBlock(layout_.BytesPerBlock(), rng_);
  const BlockWrite w{Key(7, 0, 1), v3.data(), v3.size()};
  Status member;
  ASSERT_TRUE(store->PutBatchAsync({&w, 1}, {&member, 1}).get().ok());
  auto c = store->Acquire(0, sequence_, 0, {&one, 1}, nullptr, {&addr, 1});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_TRUE(Holds(addr, v3));
  ASSERT_TRUE(store->Release(c->lease).ok());

  ASSERT_TRUE(store->Delete(Key(7, 0, 1)).ok());
  auto d = store->Acquire(0, sequence_, 0, {&one, 1}, nullptr, {&addr, 1});
  EXPECT_EQ(d.status().code(), StatusCode::kNotFound) << d.status().ToString();

  const int64_t two = 2;
  auto e = store->Acquire(0, sequence_, 0, {&two, 1}, nullptr, {&addr, 1});
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  ASSERT_TRUE(store->Release(e->lease).ok());
  auto dropped = store->DropSequence(0, sequence_);
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, 2u);
  auto f = store->Acquire(0, sequence_, 0, {&two, 1}, nullptr, {&addr, 1});
  EXPECT_EQ(f.status().code(), StatusCode::kNotFound) << f.status().ToString();
  EXPECT_EQ(store->Stats().device_blocks, 0u);
}

TEST_P(ClientDeviceTest, AMissingBlockLeavesNothingPinnedAndAFullTierRefuses) {
  auto store = Open(4);
  ASSERT_NE(store, nullptr);
  const auto blocks = PutBlocks(*store, 2, 6);
  const std::vector<int64_t> with_missing = {0, 1, 99};
  std::vector<uint64_t> addrs(3);
  auto a = store->Acquire(0, sequence_, 2, with_missing, nullptr, addrs);
  EXPECT_EQ(a.status().code(), StatusCode::kNotFound) << a.status().ToString();

  // Nothing stayed pinned: four other blocks take the whole tier.
  const std::vector<int64_t> four = {2, 3, 4, 5};
  std::vector<uint64_t> four_addrs(4);
  auto b = store->Acquire(0, sequence_, 2, four, nullptr, four_addrs);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  for (size_t i = 0; i < four.size(); ++i) EXPECT_TRUE(Holds(four_addrs[i], blocks[four[i]]));
  // ... and while they are held, one more block has nowhere to go.
  const int64_t zero = 0;
  uint64_t addr = 0;
  auto c = store->Acquire(0, sequence_, 2, {&zero, 1}, nullptr, {&addr, 1});
  EXPECT_EQ(c.status().code(), StatusCode::kResourceExhausted) << c.status().ToString();
  ASSERT_TRUE(store->Release(b->lease).ok());
  auto d = store->Acquire(0, sequence_, 2, {&zero, 1}, nullptr, {&addr, 1});
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_TRUE(Holds(addr, blocks[0]));
  ASSERT_TRUE(store->Release(d->lease).ok());
}

TEST_P(ClientDeviceTest, AnAcquireOfOneLayerPrefetchesTheNextOne) {
  auto store = Open(16, /*prefetch=*/true);
  ASSERT_NE(store, nullptr);
  PutBlocks(*store, 0, 4);
  const auto next = PutBlocks(*store, 1, 4);
  const std::vector<int64_t> want = {1, 2, 3};
  std::vector<uint64_t> addrs(3);
  auto a = store->Acquire(0, sequence_, 0, want, nullptr, addrs);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(store->Release(a->lease).ok());
  ASSERT_TRUE(Eventually([&] { return store->Stats().prefetches == 3; }))
      << store->Stats().prefetches;
  auto b = store->Acquire(0, sequence_, 1, want, nullptr, addrs);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->hits, 3u);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_TRUE(Holds(addrs[i], next[want[i]]));
  ASSERT_TRUE(store->Release(b->lease).ok());
  EXPECT_EQ(store->Stats().prefetch_hits, 3u);
}

TEST_P(ClientDeviceTest, SelectThenAcquirePrefetchesTheRunnersUpAndTheNextLayer) {
  // Room for every block, and for the slots of the prefetches of layer 2 that the
  // Acquires of layer 1 start and that fail (layer 2 is empty): nothing is evicted.
  auto store = Open(128, /*prefetch=*/true);
  ASSERT_NE(store, nullptr);
  // Small finite fp16 keys, so that the summaries rank something.
  for (uint32_t layer = 0; layer < 2; ++layer) {
    for (uint32_t b = 0; b < 24; ++b) {
      std::vector<std::byte> block(layout_.BytesPerBlock());
      for (size_t i = 0; i < block.size(); i += 2) {
        const uint16_t v = static_cast<uint16_t>(0x2000 | (rng_() & 0x83ff));
        std::memcpy(&block[i], &v, 2);
      }
      ASSERT_TRUE(store->Put(Key(7, layer, b), block.data(), block.size()).ok());
    }
  }
  std::normal_distribution<float> normal;
  std::vector<float> q(layout_.num_query_heads * layout_.head_dim);
  for (float& x : q) x = normal(rng_);
  std::vector<int64_t> selected(4);
  std::vector<float> scores(4);
  auto si = store->Select(0, sequence_, 0, q, 24 * 16, selected, scores);
  ASSERT_TRUE(si.ok()) << si.status().ToString();
  ASSERT_EQ(si->selected, 4u);
  std::vector<uint64_t> addrs(4);
  auto a = store->Acquire(0, sequence_, 0, selected, nullptr, addrs, scores);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(store->Release(a->lease).ok());
  // In the background: the Select's four runners-up for layer 0, and layer 0's four for
  // layer 1. Once copied, exactly those are hits.
  ASSERT_TRUE(Eventually([&] { return store->Stats().prefetches == 8; }))
      << store->Stats().prefetches;
  uint64_t resident[2] = {0, 0};
  for (uint32_t layer : {1u, 0u}) {  // layer 1 first: its Acquires prefetch nothing for 0
    for (int64_t b = 0; b < 24; ++b) {
      uint64_t addr = 0;
      auto one = store->Acquire(0, sequence_, layer, {&b, 1}, nullptr, {&addr, 1});
      ASSERT_TRUE(one.ok()) << one.status().ToString();
      resident[layer] += one->hits;
      ASSERT_TRUE(store->Release(one->lease).ok());
    }
  }
  EXPECT_EQ(resident[0], 8u);  // the 4 selected and the 4 prefetched runners-up
  EXPECT_EQ(resident[1], 4u);  // layer 0's selection, prefetched for layer 1
}

TEST_P(ClientDeviceTest, WithoutAGpuTierAcquireAndReleaseAreRefused) {
  auto store = Open(0);
  ASSERT_NE(store, nullptr);
  const int64_t zero = 0;
  uint64_t addr = 0;
  auto a = store->Acquire(0, sequence_, 0, {&zero, 1}, nullptr, {&addr, 1});
  EXPECT_EQ(a.status().code(), StatusCode::kFailedPrecondition) << a.status().ToString();
  EXPECT_EQ(store->Release(1).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store->Stats().device_slots, 0u);
}

TEST_P(ClientDeviceTest, PutFromPagedCacheStoresTheBlocksThePageTableNames) {
  auto store = Open(0);
  ASSERT_NE(store, nullptr);
  for (const bool combined : {false, true}) {
    for (const PagedLayout order : {PagedLayout::kNHD, PagedLayout::kHND}) {
      SCOPED_TRACE(std::string(combined ? "combined " : "separate ") +
                   (order == PagedLayout::kNHD ? "NHD" : "HND"));
      const uint32_t page_size = 4, pages = 24;  // 4 pages per block of 16 tokens
      testing::HostPagedCache cache(layout_, order, combined, page_size, pages, rng_());
      std::vector<int32_t> perm(pages);
      for (uint32_t i = 0; i < pages; ++i) perm[i] = static_cast<int32_t>(i);
      std::shuffle(perm.begin(), perm.end(), rng_);
      const uint32_t n = 5;
      std::vector<int32_t> table(perm.begin(), perm.begin() + n * 4);
      std::vector<BlockKey> keys;
      for (uint32_t b = 0; b < n; ++b) keys.push_back(Key(7, 3, 100 + b));
      std::vector<Status> statuses(n);
      const void* v = combined ? nullptr : cache.v.data();
      ASSERT_TRUE(
          store->PutFromPagedCache(keys, cache.desc, cache.k.data(), v, table, nullptr, statuses)
              .ok());
      for (uint32_t b = 0; b < n; ++b) {
        EXPECT_TRUE(statuses[b].ok()) << statuses[b].ToString();
        const std::vector<int32_t> block_pages(table.begin() + b * 4, table.begin() + b * 4 + 4);
        std::vector<std::byte> got(layout_.BytesPerBlock());
        ASSERT_TRUE(store->Get(keys[b], got.data(), got.size()).ok());
        EXPECT_EQ(got, cache.ExpectedBlock(block_pages)) << "block " << b;
      }

      // A page-table entry outside the cache, a table of the wrong size, statuses of the
      // wrong count: refused, nothing stored.
      std::vector<int32_t> bad = table;
      bad[6] = static_cast<int32_t>(pages);
      const std::vector<BlockKey> fresh = {Key(7, 3, 200), Key(7, 3, 201), Key(7, 3, 202),
                                           Key(7, 3, 203), Key(7, 3, 204)};
      EXPECT_EQ(
          store->PutFromPagedCache(fresh, cache.desc, cache.k.data(), v, bad, nullptr, statuses)
              .code(),
          StatusCode::kInvalidArgument);
      EXPECT_EQ(
          store
              ->PutFromPagedCache(fresh, cache.desc, cache.k.data(), v,
                                  std::span<const int32_t>(table).first(19), nullptr, statuses)
              .code(),
          StatusCode::kInvalidArgument);
      EXPECT_EQ(store
                    ->PutFromPagedCache(fresh, cache.desc, cache.k.data(), v, table, nullptr,
                                        std::span<Status>(statuses).first(4))
                    .code(),
                StatusCode::kInvalidArgument);
      for (const BlockKey& k : fresh) EXPECT_FALSE(store->Contains(k));
    }
  }
}

TEST_P(ClientDeviceTest, APutFromPagedCacheOverwriteLeavesTheGpuTier) {
  auto store = Open(8);
  ASSERT_NE(store, nullptr);
  PutBlocks(*store, 3, 1);  // block 0 of layer 3
  const int64_t zero = 0;
  uint64_t addr = 0;
  auto a = store->Acquire(0, sequence_, 3, {&zero, 1}, nullptr, {&addr, 1});
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(store->Release(a->lease).ok());
  testing::HostPagedCache cache(layout_, PagedLayout::kNHD, false, 16, 2, rng_());
  const std::vector<int32_t> table = {1};
  const BlockKey key = Key(7, 3, 0);
  Status status;
  ASSERT_TRUE(store
                  ->PutFromPagedCache({&key, 1}, cache.desc, cache.k.data(), cache.v.data(), table,
                                      nullptr, {&status, 1})
                  .ok());
  auto b = store->Acquire(0, sequence_, 3, {&zero, 1}, nullptr, {&addr, 1});
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->hits, 0u);
  EXPECT_TRUE(Holds(addr, cache.ExpectedBlock({1})));
  ASSERT_TRUE(store->Release(b->lease).ok());
}

// The daemon forgets the registration when it restarts; the client renews it on the new
// connection, and misses are copied in directly again (the bytes right, not a stale
// mapping of the old daemon's).
TEST_P(ClientDeviceTest, TheDirectPathIsRenewedAfterTheDaemonRestarts) {
  if (GetParam() != Backend::kSidecar) GTEST_SKIP() << "the direct path is the sidecar's";
  auto store = Open(16);
  ASSERT_NE(store, nullptr);
  const auto blocks = PutBlocks(*store, 0, 8);
  auto acquire_and_check = [&](std::vector<int64_t> want) {
    std::vector<uint64_t> addrs(want.size());
    auto a = store->Acquire(0, sequence_, 0, want, nullptr, addrs);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_TRUE(Holds(addrs[i], blocks[want[i]])) << "block " << want[i];
    }
    ASSERT_TRUE(store->Release(a->lease).ok());
  };
  acquire_and_check({0, 1});
  EXPECT_EQ(store->Stats().device_direct_blocks, 2u);

  sidecar_->StopServer();
  ASSERT_TRUE(Eventually([&] { return !GetSidecarStatus(*store)->connected; }));
  ASSERT_TRUE(sidecar_->StartServer());
  ASSERT_TRUE(Eventually([&] { return GetSidecarStatus(*store)->direct_device; }))
      << GetSidecarStatus(*store)->direct_device_error;
  acquire_and_check({2, 3, 4});
  EXPECT_EQ(store->Stats().device_direct_blocks, 5u);
}

INSTANTIATE_TEST_SUITE_P(Backends, ClientDeviceTest,
                         ::testing::Values(Backend::kEmbedded, Backend::kSidecar,
                                           Backend::kSidecarStaging),
                         BackendName);

}  // namespace
}  // namespace kvtier
