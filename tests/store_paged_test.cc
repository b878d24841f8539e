// Store::PutFromPagedCache on the emulated device (the cache in host memory): blocks
// gathered from FlashInfer / vLLM paged layouts, checked against the documented shapes.
#include "tests/store_paged_test.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "kvtier/store.h"
#include "tests/test_util.h"

namespace kvtier {
namespace {

using testing::HostPagedCache;
using testing::Key;
using testing::SmallLayout;

std::unique_ptr<Store> OpenStore(uint32_t slots) {
  StoreOptions o;
  o.host_capacity_bytes = uint64_t{slots} * SmallLayout().BytesPerBlock();
  o.host_memory = HostMemoryKind::kPlain;  // the emulated device: no CUDA-pinned memory
  auto store = Store::Open(o, SmallLayout());
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return std::move(store).value();
}

TEST(StorePagedTest, GathersEveryLayout) {
  std::mt19937_64 rng(std::random_device{}());
  for (PagedLayout layout : {PagedLayout::kNHD, PagedLayout::kHND}) {
    for (bool combined : {false, true}) {
      for (uint32_t page_size : {4u, 8u, 16u}) {
        const uint64_t seed = rng();
        SCOPED_TRACE(::testing::Message() << "layout " << int(layout) << " combined " << combined
                                          << " page_size " << page_size << " seed " << seed);
        auto store = OpenStore(64);
        const uint32_t pages = 64;
        HostPagedCache cache(SmallLayout(), layout, combined, page_size, pages, seed);
        const uint32_t per_block = SmallLayout().block_tokens / page_size;
        // 12 blocks over pages in random order.
        std::vector<int32_t> order(pages);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), rng);
        const uint32_t n = std::min<uint32_t>(12, pages / per_block);
        std::vector<int32_t> table(order.begin(), order.begin() + n * per_block);
        std::vector<BlockKey> keys;
        for (uint32_t i = 0; i < n; ++i) keys.push_back(Key(5, i % 4, i));
        std::vector<Status> statuses(n);
        Status s =
            store->PutFromPagedCache(keys, cache.desc, cache.k.data(),
                                     combined ? nullptr : cache.v.data(), table, nullptr, statuses);
        ASSERT_TRUE(s.ok()) << s.ToString();
        std::vector<std::byte> out(store->block_bytes());
        for (uint32_t i = 0; i < n; ++i) {
          ASSERT_TRUE(statuses[i].ok());
          ASSERT_TRUE(store->Get(keys[i], out.data(), out.size()).ok());
          std::vector<int32_t> pages_of(table.begin() + i * per_block,
                                        table.begin() + (i + 1) * per_block);
          ASSERT_EQ(out, cache.ExpectedBlock(pages_of)) << "block " << i;
        }
        EXPECT_EQ(store->Stats().puts, n);
      }
    }
  }
}

TEST(StorePagedTest, BadInputStoresNothing) {
  auto store = OpenStore(16);
  HostPagedCache cache(SmallLayout(), PagedLayout::kNHD, false, 4, 16, 7);
  std::vector<int32_t> table = {0, 1, 2, 3, 4, 5, 6, 7};  // two blocks of 4 pages
  std::vector<BlockKey> keys = {Key(1, 0, 0), Key(1, 0, 1)};
  std::vector<Status> statuses(2);
  // A cache of another shape than the store's blocks.
  PagedCacheDesc other = cache.desc;
  other.head_dim = 128;
  EXPECT_TRUE(
      store
          ->PutFromPagedCache(keys, other, cache.k.data(), cache.v.data(), table, nullptr, statuses)
          .IsInvalidArgument());
  // A page table of the wrong length, a page out of range, statuses of the wrong size.
  EXPECT_TRUE(store
                  ->PutFromPagedCache(keys, cache.desc, cache.k.data(), cache.v.data(),
                                      std::span(table).first(7), nullptr, statuses)
                  .IsInvalidArgument());
  table[5] = 16;
  Status s = store->PutFromPagedCache(keys, cache.desc, cache.k.data(), cache.v.data(), table,
                                      nullptr, statuses);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("entry 5"), std::string::npos) << s.message();
  table[5] = 5;
  std::vector<Status> one(1);
  EXPECT_TRUE(
      store
          ->PutFromPagedCache(keys, cache.desc, cache.k.data(), cache.v.data(), table, nullptr, one)
          .IsInvalidArgument());
  EXPECT_TRUE(
      store->PutFromPagedCache(keys, cache.desc, nullptr, cache.v.data(), table, nullptr, statuses)
          .IsInvalidArgument());
  EXPECT_EQ(store->Stats().puts, 0u);
  EXPECT_EQ(store->Stats().host_pinned_slots, 0u);
  EXPECT_FALSE(store->Contains(keys[0]));
  // And then it works.
  ASSERT_TRUE(store
                  ->PutFromPagedCache(keys, cache.desc, cache.k.data(), cache.v.data(), table,
                                      nullptr, statuses)
                  .ok());
  EXPECT_TRUE(store->Contains(keys[1]));
}

TEST(StorePagedTest, NoRoomStoresNothing) {
  auto store = OpenStore(2);  // two slots, three blocks: all or nothing
  HostPagedCache cache(SmallLayout(), PagedLayout::kNHD, false, 16, 8, 3);
  std::vector<int32_t> table = {0, 1, 2};
  std::vector<BlockKey> keys = {Key(1, 0, 0), Key(1, 0, 1), Key(1, 0, 2)};
  std::vector<Status> statuses(3);
  Status s = store->PutFromPagedCache(keys, cache.desc, cache.k.data(), cache.v.data(), table,
                                      nullptr, statuses);
  EXPECT_TRUE(s.IsBusy()) << s.ToString();
  EXPECT_EQ(store->Stats().host_blocks, 0u);
  EXPECT_EQ(store->Stats().host_pinned_slots, 0u);
}

}  // namespace
}  // namespace kvtier
