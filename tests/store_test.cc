#include "kvtier/store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <vector>

#include "tests/test_util.h"

namespace kvtier {
namespace {

using testing::HoldsVersion;
using testing::Key;
using testing::MakeBlock;
using testing::SmallLayout;

std::unique_ptr<Store> OpenSmall(uint32_t slots, uint32_t async_threads = 2) {
  StoreOptions options;
  options.host_capacity_bytes = uint64_t{slots} * SmallLayout().BytesPerBlock();
  options.async_threads = async_threads;
  auto store = Store::Open(options, SmallLayout());
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return std::move(store).value();
}

TEST(StoreTest, PutGetRoundTrip) {
  auto store = OpenSmall(16);
  const uint64_t bytes = store->block_bytes();
  ASSERT_EQ(bytes, 8192u);
  for (uint32_t b = 0; b < 8; ++b) {
    auto block = MakeBlock(bytes, Key(1, b % 4, b), 0);
    ASSERT_TRUE(store->Put(Key(1, b % 4, b), block.data(), bytes).ok());
  }
  for (uint32_t b = 0; b < 8; ++b) {
    std::vector<std::byte> out(bytes, std::byte{0xAA});
    ASSERT_TRUE(store->Get(Key(1, b % 4, b), out.data(), bytes).ok());
    EXPECT_TRUE(HoldsVersion(out, Key(1, b % 4, b), 0)) << b;
    EXPECT_TRUE(store->Contains(Key(1, b % 4, b)));
  }
  StoreStats s = store->Stats();
  EXPECT_EQ(s.puts, 8u);
  EXPECT_EQ(s.gets, 8u);
  EXPECT_EQ(s.host_blocks, 8u);
  EXPECT_EQ(s.host_slots, 16u);
  EXPECT_EQ(s.bytes_put, 8 * bytes);
  EXPECT_EQ(s.host_pinned_slots, 0u);
}

TEST(StoreTest, PutReplaces) {
  auto store = OpenSmall(4);
  const uint64_t bytes = store->block_bytes();
  auto v0 = MakeBlock(bytes, Key(1, 0, 0), 0);
  auto v1 = MakeBlock(bytes, Key(1, 0, 0), 1);
  ASSERT_TRUE(store->Put(Key(1, 0, 0), v0.data(), bytes).ok());
  ASSERT_TRUE(store->Put(Key(1, 0, 0), v1.data(), bytes).ok());
  std::vector<std::byte> out(bytes);
  ASSERT_TRUE(store->Get(Key(1, 0, 0), out.data(), bytes).ok());
  EXPECT_TRUE(HoldsVersion(out, Key(1, 0, 0), 1));
  EXPECT_EQ(store->Stats().host_blocks, 1u);  // the old slot went back to the pool
}

TEST(StoreTest, DeleteAndDropSequence) {
  auto store = OpenSmall(64);
  const uint64_t bytes = store->block_bytes();
  for (uint64_t seq : {1, 2}) {
    for (uint32_t l = 0; l < 4; ++l) {
      for (uint32_t b = 0; b < 5; ++b) {
        auto block = MakeBlock(bytes, Key(seq, l, b), 0);
        ASSERT_TRUE(store->Put(Key(seq, l, b), block.data(), bytes).ok());
      }
    }
  }
  EXPECT_TRUE(store->Delete(Key(1, 0, 0)).ok());
  EXPECT_TRUE(store->Delete(Key(1, 0, 0)).IsNotFound());
  EXPECT_FALSE(store->Contains(Key(1, 0, 0)));
  Result<uint64_t> dropped = store->DropSequence(0, SequenceId::FromU64(1));
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, 19u);
  EXPECT_EQ(*store->DropSequence(0, SequenceId::FromU64(1)), 0u);
  EXPECT_EQ(*store->DropSequence(5, SequenceId::FromU64(2)), 0u);  // other namespace
  EXPECT_TRUE(store->Contains(Key(2, 3, 4)));
  StoreStats s = store->Stats();
  EXPECT_EQ(s.host_blocks, 20u);
  EXPECT_EQ(s.deletes, 1u);
  EXPECT_EQ(s.dropped_blocks, 19u);
  EXPECT_EQ(s.dropped_sequences, 1u);
}

TEST(StoreTest, LruEvictionDropsLeastRecentlyUsed) {
  auto store = OpenSmall(4);
  const uint64_t bytes = store->block_bytes();
  std::vector<std::byte> out(bytes);
  for (uint32_t b = 0; b < 4; ++b) {
    auto block = MakeBlock(bytes, Key(1, 0, b), 0);
    ASSERT_TRUE(store->Put(Key(1, 0, b), block.data(), bytes).ok());
  }
  ASSERT_TRUE(store->Get(Key(1, 0, 0), out.data(), bytes).ok());  // 0 is now recent
  auto block = MakeBlock(bytes, Key(1, 0, 4), 0);
  ASSERT_TRUE(store->Put(Key(1, 0, 4), block.data(), bytes).ok());  // evicts 1
  EXPECT_TRUE(store->Contains(Key(1, 0, 0)));
  EXPECT_FALSE(store->Contains(Key(1, 0, 1)));
  EXPECT_TRUE(store->Get(Key(1, 0, 1), out.data(), bytes).IsNotFound());
  StoreStats s = store->Stats();
  EXPECT_EQ(s.evictions, 1u);
  EXPECT_EQ(s.evictions_lost, 1u);
  EXPECT_EQ(s.get_misses, 1u);
  for (uint32_t b : {0u, 2u, 3u, 4u}) {
    ASSERT_TRUE(store->Get(Key(1, 0, b), out.data(), bytes).ok());
    EXPECT_TRUE(HoldsVersion(out, Key(1, 0, b), 0));
  }
}

TEST(StoreTest, SlotsInUseAreNeverEvicted) {
  // Two slots, both held by an unfinished batch: a Put must wait its turn (Busy), not
  // steal a slot that is being read.
  auto store = OpenSmall(2);
  const uint64_t bytes = store->block_bytes();
  std::vector<std::vector<std::byte>> blocks;
  std::vector<BlockWrite> writes;
  for (uint32_t b = 0; b < 3; ++b) blocks.push_back(MakeBlock(bytes, Key(1, 0, b), 0));
  for (uint32_t b = 0; b < 3; ++b) writes.push_back({Key(1, 0, b), blocks[b].data(), bytes});
  std::vector<Status> statuses(3);
  Status s = store->PutBatch(writes, statuses);
  // Members 0 and 1 hold both slots while the batch copies; member 2 finds none free.
  EXPECT_TRUE(statuses[0].ok());
  EXPECT_TRUE(statuses[1].ok());
  EXPECT_TRUE(statuses[2].IsBusy()) << statuses[2].ToString();
  EXPECT_TRUE(s.IsBusy());
  EXPECT_EQ(store->Stats().busy_rejections, 1u);
  EXPECT_EQ(store->Stats().evictions, 0u);
  std::vector<std::byte> out(bytes);
  ASSERT_TRUE(store->Get(Key(1, 0, 1), out.data(), bytes).ok());
  EXPECT_TRUE(HoldsVersion(out, Key(1, 0, 1), 0));
}

TEST(StoreTest, BatchesRoundTrip) {
  auto store = OpenSmall(200);
  const uint64_t bytes = store->block_bytes();
  // 100 members: larger than the batch's inline capacity.
  std::vector<std::vector<std::byte>> blocks, outs(100, std::vector<std::byte>(bytes));
  std::vector<BlockWrite> writes;
  std::vector<BlockRead> reads;
  for (uint32_t i = 0; i < 100; ++i) blocks.push_back(MakeBlock(bytes, Key(3, i % 4, i), 0));
  for (uint32_t i = 0; i < 100; ++i) {
    writes.push_back({Key(3, i % 4, i), blocks[i].data(), bytes});
    reads.push_back({Key(3, i % 4, i), outs[i].data(), bytes});
  }
  std::vector<Status> statuses(100);
  ASSERT_TRUE(store->PutBatch(writes, statuses).ok());
  reads[50].key.block = 999;  // one unknown key
  Status s = store->GetBatch(reads, statuses);
  EXPECT_TRUE(s.IsNotFound());
  for (uint32_t i = 0; i < 100; ++i) {
    if (i == 50) {
      EXPECT_TRUE(statuses[i].IsNotFound());
      continue;
    }
    ASSERT_TRUE(statuses[i].ok()) << i;
    EXPECT_TRUE(HoldsVersion(outs[i], Key(3, i % 4, i), 0)) << i;
  }
  std::vector<Status> wrong(3);
  EXPECT_TRUE(store->PutBatch(writes, wrong).IsInvalidArgument());
  EXPECT_TRUE(store->PutBatch({}, {}).ok());
}

TEST(StoreTest, AsyncFormsComplete) {
  auto store = OpenSmall(64);
  const uint64_t bytes = store->block_bytes();
  auto block = MakeBlock(bytes, Key(1, 2, 3), 4);
  ASSERT_TRUE(store->PutAsync(Key(1, 2, 3), block.data(), bytes).get().ok());
  std::vector<std::byte> out(bytes);
  ASSERT_TRUE(store->GetAsync(Key(1, 2, 3), out.data(), bytes).get().ok());
  EXPECT_TRUE(HoldsVersion(out, Key(1, 2, 3), 4));
  EXPECT_TRUE(store->GetAsync(Key(9, 0, 0), out.data(), bytes).get().IsNotFound());

  // Callback forms, many in flight at once.
  constexpr int kOps = 32;
  std::vector<std::vector<std::byte>> blocks;
  for (int i = 0; i < kOps; ++i) blocks.push_back(MakeBlock(bytes, Key(2, 0, i), 0));
  std::mutex mu;
  std::condition_variable cv;
  int done = 0, failed = 0;
  auto completion = [&](Status s) {
    std::lock_guard<std::mutex> lock(mu);
    if (!s.ok()) ++failed;
    ++done;
    cv.notify_all();
  };
  for (int i = 0; i < kOps; ++i) store->PutAsync(Key(2, 0, i), blocks[i].data(), bytes, completion);
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done == kOps; });
  }
  EXPECT_EQ(failed, 0);
  std::vector<std::vector<std::byte>> outs(kOps, std::vector<std::byte>(bytes));
  std::vector<BlockRead> reads;
  for (int i = 0; i < kOps; ++i) reads.push_back({Key(2, 0, i), outs[i].data(), bytes});
  std::vector<Status> statuses(kOps);
  ASSERT_TRUE(store->GetBatchAsync(reads, statuses).get().ok());
  for (int i = 0; i < kOps; ++i) EXPECT_TRUE(HoldsVersion(outs[i], Key(2, 0, i), 0)) << i;
}

TEST(StoreTest, DestructionWaitsForAsyncWork) {
  const uint64_t bytes = SmallLayout().BytesPerBlock();
  std::atomic<int> completed{0};
  std::vector<std::vector<std::byte>> blocks;
  for (int i = 0; i < 64; ++i) blocks.push_back(MakeBlock(bytes, Key(1, 0, i), 0));
  {
    auto store = OpenSmall(128, 1);
    for (int i = 0; i < 64; ++i) {
      store->PutAsync(Key(1, 0, i), blocks[i].data(), bytes, [&](Status s) {
        EXPECT_TRUE(s.ok()) << s.ToString();
        completed.fetch_add(1);
      });
    }
  }
  EXPECT_EQ(completed.load(), 64);
}

TEST(StoreBadInputTest, OpenRejectsBadLayoutAndOptions) {
  StoreOptions options;
  options.host_capacity_bytes = 1 << 20;
  ModelLayout bad = SmallLayout();
  bad.head_dim = 0;
  EXPECT_TRUE(Store::Open(options, bad).status().IsInvalidArgument());
  ModelLayout overflow = SmallLayout();
  overflow.num_kv_heads = overflow.num_query_heads = 0x80000000;
  overflow.head_dim = 0x80000000;
  EXPECT_TRUE(Store::Open(options, overflow).status().IsInvalidArgument());

  StoreOptions zero = options;
  zero.host_capacity_bytes = 0;
  Status s = Store::Open(zero, SmallLayout()).status();
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  StoreOptions tiny = options;
  tiny.host_capacity_bytes = 100;  // less than one block
  EXPECT_TRUE(Store::Open(tiny, SmallLayout()).status().IsInvalidArgument());
  StoreOptions absurd = options;
  absurd.host_capacity_bytes = uint64_t{1} << 60;
  s = Store::Open(absurd, SmallLayout()).status();
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  StoreOptions max = options;
  max.host_capacity_bytes = UINT64_MAX;
  EXPECT_FALSE(Store::Open(max, SmallLayout()).ok());
  StoreOptions no_threads = options;
  no_threads.async_threads = 0;
  EXPECT_TRUE(Store::Open(no_threads, SmallLayout()).status().IsInvalidArgument());
  StoreOptions bad_kind = options;
  bad_kind.host_memory = static_cast<HostMemoryKind>(17);
  EXPECT_TRUE(Store::Open(bad_kind, SmallLayout()).status().IsInvalidArgument());
}

TEST(StoreBadInputTest, WrongBuffersAndKeys) {
  auto store = OpenSmall(8);
  const uint64_t bytes = store->block_bytes();
  auto block = MakeBlock(bytes, Key(1, 0, 0), 0);
  Status s = store->Put(Key(1, 0, 0), block.data(), bytes - 1);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("8192"), std::string::npos) << s.message();
  EXPECT_TRUE(store->Put(Key(1, 0, 0), block.data(), bytes + 4096).IsInvalidArgument());
  EXPECT_TRUE(store->Put(Key(1, 0, 0), nullptr, bytes).IsInvalidArgument());
  EXPECT_TRUE(store->Put(Key(1, 4, 0), block.data(), bytes).IsInvalidArgument());  // layer 4 of 4
  EXPECT_EQ(store->Stats().puts, 0u);
  ASSERT_TRUE(store->Put(Key(1, 0, 0), block.data(), bytes).ok());
  std::vector<std::byte> out(bytes);
  EXPECT_TRUE(store->Get(Key(1, 0, 0), out.data(), 0).IsInvalidArgument());
  EXPECT_TRUE(store->Get(Key(1, 0, 0), nullptr, bytes).IsInvalidArgument());
  s = store->Get(Key(1, 0, 1), out.data(), bytes);
  EXPECT_TRUE(s.IsNotFound());
  EXPECT_NE(s.message().find(Key(1, 0, 1).ToString()), std::string::npos);
  EXPECT_TRUE(store->Delete(Key(7, 0, 0)).IsNotFound());
  // The store is still fine.
  ASSERT_TRUE(store->Get(Key(1, 0, 0), out.data(), bytes).ok());
  EXPECT_TRUE(HoldsVersion(out, Key(1, 0, 0), 0));
}

}  // namespace
}  // namespace kvtier
