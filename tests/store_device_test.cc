// The Store's GPU tier (emulated here; the same code drives a real GPU): Acquire returns
// device addresses that hold the blocks' bytes, from the host tier or promoted from disk;
// Release unpins; overwrites and deletes never leave a stale device copy; prefetch of a
// Select's runners-up; bad arguments.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/store.h"

namespace kvtier {
namespace {

ModelLayout Layout() {
  return ModelLayout{.num_layers = 2,
                     .num_kv_heads = 2,
                     .num_query_heads = 4,
                     .head_dim = 32,
                     .dtype = DType::kF16,
                     .block_tokens = 16};
}

BlockKey Key(uint32_t layer, uint32_t block) { return BlockKey{0, {0, 9}, layer, block}; }

std::vector<std::byte> RandomBlock(uint64_t bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> b(bytes);
  // Small fp16 values (exponent bits kept low) so that summaries stay finite.
  for (size_t i = 0; i < bytes; i += 2) {
    const uint16_t v = static_cast<uint16_t>(0x2000 | (rng() & 0x83ff));
    std::memcpy(&b[i], &v, 2);
  }
  return b;
}

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/kvtier-device-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

StoreOptions Options(uint64_t device_blocks, uint64_t block_bytes) {
  StoreOptions o;
  o.host_capacity_bytes = 64 * 4096 * 2;
  o.retrieval.enabled = true;
  o.retrieval.top_k = 4;
  o.retrieval.n_init = 16;
  o.retrieval.n_local = 32;
  o.retrieval.device_capacity_bytes = device_blocks * ((block_bytes + 255) / 256 * 256);
  o.retrieval.force_emulated_device = true;
  return o;
}

TEST(StoreDeviceTest, AcquireServesTheBytesFromHostAndDisk) {
  TempDir dir;
  const uint64_t bb = Layout().BytesPerBlock();
  StoreOptions o = Options(16, bb);
  o.directory = dir.path;
  o.disk_capacity_bytes = 64 << 20;
  o.host_capacity_bytes = 8 * 8192;  // 8 slots: most of the 40 blocks live on disk only
  auto store = Store::Open(o, Layout());
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  std::vector<std::vector<std::byte>> blocks;
  for (uint32_t b = 0; b < 40; ++b) {
    blocks.push_back(RandomBlock(bb, b));
    ASSERT_TRUE((*store)->Put(Key(0, b), blocks[b].data(), bb).ok());
  }
  ASSERT_TRUE((*store)->Flush().ok());
  const std::vector<int64_t> want = {3, 17, -1, 39, 0, 22};
  std::vector<uint64_t> addrs(want.size());
  auto info = (*store)->Acquire(0, {0, 9}, 0, want, nullptr, addrs);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->hits + info->from_host + info->from_disk, 5u);
  EXPECT_GT(info->from_disk, 0u);
  EXPECT_EQ(addrs[2], 0u);
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] < 0) continue;
    ASSERT_NE(addrs[i], 0u);
    EXPECT_EQ(std::memcmp(reinterpret_cast<const void*>(addrs[i]), blocks[want[i]].data(), bb), 0)
        << "block " << want[i];
  }
  ASSERT_TRUE((*store)->Release(info->lease).ok());
  // Again: every block resident now.
  auto again = (*store)->Acquire(0, {0, 9}, 0, want, nullptr, addrs);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->hits, 5u);
  EXPECT_EQ(again->from_host + again->from_disk, 0u);
  ASSERT_TRUE((*store)->Release(again->lease).ok());
  const StoreStats s = (*store)->Stats();
  EXPECT_TRUE(s.device_emulated);
  EXPECT_EQ(s.acquires, 2u);
  EXPECT_EQ(s.acquired_blocks, 10u);
  EXPECT_EQ(s.device_hits, 5u);
  EXPECT_EQ(s.device_blocks, 5u);
}

TEST(StoreDeviceTest, OverwriteAndDeleteNeverServeAStaleCopy) {
  const uint64_t bb = Layout().BytesPerBlock();
  auto store = Store::Open(Options(8, bb), Layout());
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  std::vector<std::byte> v1 = RandomBlock(bb, 1), v2 = RandomBlock(bb, 2);
  ASSERT_TRUE((*store)->Put(Key(1, 5), v1.data(), bb).ok());
  const int64_t five = 5;
  uint64_t addr = 0;
  auto a = (*store)->Acquire(0, {0, 9}, 1, {&five, 1}, nullptr, {&addr, 1});
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE((*store)->Release(a->lease).ok());
  ASSERT_TRUE((*store)->Put(Key(1, 5), v2.data(), bb).ok());  // overwrite
  auto b = (*store)->Acquire(0, {0, 9}, 1, {&five, 1}, nullptr, {&addr, 1});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->hits, 0u);
  EXPECT_EQ(std::memcmp(reinterpret_cast<const void*>(addr), v2.data(), bb), 0);
  ASSERT_TRUE((*store)->Release(b->lease).ok());
  ASSERT_TRUE((*store)->Delete(Key(1, 5)).ok());
  auto c = (*store)->Acquire(0, {0, 9}, 1, {&five, 1}, nullptr, {&addr, 1});
  EXPECT_TRUE(c.status().IsNotFound()) << c.status().ToString();
  EXPECT_EQ((*store)->Stats().device_blocks, 0u);
}

TEST(StoreDeviceTest, SelectThenAcquirePrefetchesTheRunnersUp) {
  const uint64_t bb = Layout().BytesPerBlock();
  StoreOptions o = Options(64, bb);  // room for every block: nothing is evicted
  o.retrieval.prefetch_extra = 4;
  auto store = Store::Open(o, Layout());
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  for (uint32_t layer = 0; layer < 2; ++layer) {
    for (uint32_t b = 0; b < 24; ++b) {
      std::vector<std::byte> blk = RandomBlock(bb, 100 + 100 * layer + b);
      ASSERT_TRUE((*store)->Put(Key(layer, b), blk.data(), bb).ok());
    }
  }
  std::mt19937_64 rng(3);
  std::normal_distribution<float> n;
  std::vector<float> q(4 * 32);
  for (float& x : q) x = n(rng);
  std::vector<int64_t> sel(4);
  std::vector<float> scores(4);
  auto si = (*store)->Select(0, {0, 9}, 0, q, 24 * 16, sel, scores);
  ASSERT_TRUE(si.ok()) << si.status().ToString();
  std::vector<uint64_t> addrs(4);
  auto a = (*store)->Acquire(0, {0, 9}, 0, sel, nullptr, addrs, scores);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE((*store)->Release(a->lease).ok());
  // In the background: the Select's next four blocks (its runners-up) for layer 0, and
  // layer 0's four for layer 1 (adjacent layers attend alike). Wait for their copies;
  // then those blocks are hits and the others are not.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while ((*store)->Stats().prefetches < 8 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ((*store)->Stats().prefetches, 8u);
  uint64_t resident[2] = {0, 0};
  for (uint32_t layer : {1u, 0u}) {  // layer 1 first: its Acquires prefetch nothing for 0
    for (int64_t b = 0; b < 24; ++b) {
      uint64_t addr = 0;
      auto one = (*store)->Acquire(0, {0, 9}, layer, {&b, 1}, nullptr, {&addr, 1});
      ASSERT_TRUE(one.ok());
      resident[layer] += one->hits;
      ASSERT_TRUE((*store)->Release(one->lease).ok());
    }
  }
  EXPECT_EQ(resident[0], 8u);  // the 4 selected and the 4 prefetched runners-up
  EXPECT_EQ(resident[1], 4u);  // layer 0's selection, prefetched for layer 1
  EXPECT_GE((*store)->Stats().prefetch_hits, 4u);
}

TEST(StoreDeviceTest, BadArguments) {
  const uint64_t bb = Layout().BytesPerBlock();
  StoreOptions no_device = Options(0, bb);
  auto plain = Store::Open(no_device, Layout());
  ASSERT_TRUE(plain.ok());
  const int64_t b = 0;
  uint64_t addr = 0;
  EXPECT_EQ((*plain)->Acquire(0, {0, 9}, 0, {&b, 1}, nullptr, {&addr, 1}).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ((*plain)->Release(1).code(), StatusCode::kFailedPrecondition);
  auto store = Store::Open(Options(4, bb), Layout());
  ASSERT_TRUE(store.ok());
  std::vector<std::byte> blk = RandomBlock(bb, 1);
  ASSERT_TRUE((*store)->Put(Key(0, 0), blk.data(), bb).ok());
  EXPECT_TRUE(
      (*store)->Acquire(0, {0, 9}, 7, {&b, 1}, nullptr, {&addr, 1}).status().IsInvalidArgument());
  std::vector<uint64_t> two(2);
  EXPECT_TRUE((*store)->Acquire(0, {0, 9}, 0, {&b, 1}, nullptr, two).status().IsInvalidArgument());
  EXPECT_TRUE((*store)->Release(12345).IsInvalidArgument());
  // More blocks than the tier holds, all pinned by one lease.
  std::vector<int64_t> many;
  for (uint32_t i = 0; i < 6; ++i) {
    ASSERT_TRUE((*store)->Put(Key(0, i), blk.data(), bb).ok());
    many.push_back(i);
  }
  std::vector<uint64_t> addrs(6);
  EXPECT_EQ((*store)->Acquire(0, {0, 9}, 0, many, nullptr, addrs).status().code(),
            StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace kvtier
