// The device tier: the same tier tests over HostPool and the emulated DevicePool, the
// DevicePool's own contract (sizes, emulation, block tables), the CopyEngine's copies,
// events and pins on the emulated device, and the same round trips on a real GPU when
// one is present (skipped otherwise).
#include "storage/device_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/pattern.h"
#include "storage/copy_engine.h"
#include "storage/host_pool.h"

namespace kvtier {
namespace {

BlockKey Key(uint32_t block) {
  return BlockKey{.namespace_id = 0, .sequence = {0, 1}, .layer = 0, .block = block};
}

uint64_t RoundUp(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

// --- The same tier tests over both pools ---------------------------------------------

template <typename Pool>
struct PoolMaker;

template <>
struct PoolMaker<HostPool> {
  static Result<std::unique_ptr<HostPool>> Create(uint64_t block_bytes, uint64_t capacity_bytes) {
    return HostPool::Create(block_bytes, capacity_bytes, HostMemoryKind::kPlain);
  }
};

template <>
struct PoolMaker<DevicePool> {
  static Result<std::unique_ptr<DevicePool>> Create(uint64_t block_bytes, uint64_t capacity_bytes) {
    return DevicePool::Create(block_bytes, capacity_bytes, DeviceOptions{.force_emulated = true});
  }
};

template <typename Pool>
class TierTest : public ::testing::Test {
 protected:
  static std::unique_ptr<Pool> Make(uint64_t block_bytes, uint32_t slots) {
    const uint64_t slot = RoundUp(block_bytes, Pool::kSlotAlignment);
    auto pool = PoolMaker<Pool>::Create(block_bytes, slot * slots);
    EXPECT_TRUE(pool.ok()) << pool.status().ToString();
    return std::move(pool).value();
  }
  static void ExpectValid(const Pool& pool) {
    Status s = pool.table().Validate();
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
};

using PoolTypes = ::testing::Types<HostPool, DevicePool>;
class PoolNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, HostPool> ? "HostPool" : "EmulatedDevicePool";
  }
};
TYPED_TEST_SUITE(TierTest, PoolTypes, PoolNames);

TYPED_TEST(TierTest, SlotsAreAlignedAndDisjoint) {
  auto pool = this->Make(5000, 16);
  EXPECT_EQ(pool->block_bytes(), 5000u);
  EXPECT_EQ(pool->slot_bytes(), RoundUp(5000, TypeParam::kSlotAlignment));
  EXPECT_EQ(pool->slot_count(), 16u);
  std::set<SlotId> seen;
  for (int i = 0; i < 16; ++i) {
    auto slot = pool->Allocate();
    ASSERT_TRUE(slot.has_value());
    EXPECT_TRUE(seen.insert(*slot).second);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(pool->SlotData(*slot)) % TypeParam::kSlotAlignment, 0u);
    std::memset(pool->SlotData(*slot), i + 1, pool->slot_bytes());
  }
  EXPECT_FALSE(pool->Allocate().has_value());
  for (SlotId s : seen) {
    const auto first = static_cast<unsigned char>(*pool->SlotData(s));
    for (uint64_t b = 0; b < pool->slot_bytes(); b += 97) {
      ASSERT_EQ(static_cast<unsigned char>(pool->SlotData(s)[b]), first) << "slot " << s;
    }
  }
  this->ExpectValid(*pool);
}

TYPED_TEST(TierTest, LruOrderFollowsUnpins) {
  auto pool = this->Make(4096, 4);
  std::vector<SlotId> slots;
  for (uint32_t i = 0; i < 4; ++i) {
    SlotId s = *pool->Allocate();
    pool->Publish(s, Key(i));
    pool->Unpin(s);
    slots.push_back(s);
  }
  EXPECT_EQ(pool->published_slots(), 4u);
  EXPECT_EQ(*pool->LruVictim(), slots[0]);
  pool->Pin(slots[0]);
  EXPECT_EQ(*pool->LruVictim(), slots[1]);
  pool->Unpin(slots[0]);
  EXPECT_EQ(*pool->LruVictim(), slots[1]);
  EXPECT_EQ(pool->KeyOf(*pool->LruVictim()), Key(1));
  this->ExpectValid(*pool);
}

TYPED_TEST(TierTest, PinnedSlotsAreNeverVictims) {
  auto pool = this->Make(4096, 3);
  std::vector<SlotId> slots;
  for (uint32_t i = 0; i < 3; ++i) {
    SlotId s = *pool->Allocate();
    pool->Publish(s, Key(i));
    slots.push_back(s);
  }
  EXPECT_FALSE(pool->LruVictim().has_value());
  EXPECT_EQ(pool->pinned_slots(), 3u);
  pool->Unpin(slots[2]);
  EXPECT_EQ(*pool->LruVictim(), slots[2]);
  EXPECT_EQ(pool->evictable_slots(), 1u);
}

TYPED_TEST(TierTest, RetireDefersWhilePinned) {
  auto pool = this->Make(4096, 2);
  SlotId s = *pool->Allocate();
  pool->Publish(s, Key(7));
  pool->Pin(s);
  pool->Unpin(s);
  pool->Retire(s);
  EXPECT_EQ(pool->free_slots(), 1u);
  EXPECT_FALSE(pool->IsPublished(s));
  EXPECT_FALSE(pool->LruVictim().has_value());
  pool->Unpin(s);
  EXPECT_EQ(pool->free_slots(), 2u);
  EXPECT_EQ(pool->pinned_slots(), 0u);
  this->ExpectValid(*pool);
}

TYPED_TEST(TierTest, AbandonedWriteFreesTheSlot) {
  auto pool = this->Make(4096, 1);
  SlotId s = *pool->Allocate();
  pool->Unpin(s);
  EXPECT_EQ(pool->free_slots(), 1u);
  EXPECT_TRUE(pool->Allocate().has_value());
}

TYPED_TEST(TierTest, DirtySlotsAreEvictableOnlyOnceClean) {
  auto pool = this->Make(4096, 3);
  std::vector<SlotId> slots;
  for (uint32_t i = 0; i < 3; ++i) {
    SlotId s = *pool->Allocate();
    pool->Publish(s, Key(i), /*dirty=*/i < 2);
    pool->Unpin(s);
    slots.push_back(s);
  }
  EXPECT_EQ(pool->dirty_slots(), 2u);
  EXPECT_EQ(pool->evictable_slots(), 1u);
  EXPECT_EQ(*pool->LruVictim(), slots[2]);
  EXPECT_EQ(*pool->DirtyLruOldest(), slots[0]);
  EXPECT_TRUE(pool->IsDirty(slots[0]));
  pool->MarkClean(slots[0]);
  EXPECT_FALSE(pool->IsDirty(slots[0]));
  EXPECT_EQ(*pool->DirtyLruOldest(), slots[1]);
  EXPECT_EQ(pool->evictable_slots(), 2u);
  pool->Retire(slots[2]);
  EXPECT_EQ(*pool->LruVictim(), slots[0]);
  this->ExpectValid(*pool);
}

TYPED_TEST(TierTest, RandomOperationsKeepCountsConsistent) {
  auto pool = this->Make(4096, 32);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<SlotId> published, writing;
  std::set<SlotId> dirty;
  for (int step = 0; step < 20000; ++step) {
    switch (rng() % 7) {
      case 0:
        if (auto s = pool->Allocate()) writing.push_back(*s);
        break;
      case 1:
        if (!writing.empty()) {
          SlotId s = writing.back();
          writing.pop_back();
          const bool d = rng() % 2;
          pool->Publish(s, Key(s), d);
          if (d) dirty.insert(s);
          pool->Unpin(s);
          published.push_back(s);
        }
        break;
      case 2:
        if (!published.empty()) {
          size_t i = rng() % published.size();
          pool->Retire(published[i]);
          dirty.erase(published[i]);
          published.erase(published.begin() + i);
        }
        break;
      case 3:
        if (auto v = pool->LruVictim()) {
          ASSERT_TRUE(pool->IsPublished(*v));
          ASSERT_FALSE(pool->IsDirty(*v));
          ASSERT_EQ(pool->PinsOf(*v), 0u);
        }
        if (auto d = pool->DirtyLruOldest()) {
          ASSERT_TRUE(pool->IsDirty(*d));
          ASSERT_EQ(pool->PinsOf(*d), 0u);
        }
        break;
      case 4:
        if (!published.empty()) {
          SlotId s = published[rng() % published.size()];
          pool->Pin(s);
          pool->Unpin(s);
        }
        break;
      case 5:
        if (!dirty.empty()) {
          auto it = dirty.begin();
          std::advance(it, rng() % dirty.size());
          pool->MarkClean(*it);
          dirty.erase(it);
        }
        break;
      case 6:
        if (!writing.empty() && rng() % 4 == 0) {  // a write abandoned before Publish
          pool->Unpin(writing.back());
          writing.pop_back();
        }
        break;
    }
    ASSERT_EQ(pool->published_slots(), published.size());
    ASSERT_EQ(pool->pinned_slots(), writing.size());
    ASSERT_EQ(pool->dirty_slots(), dirty.size());
    ASSERT_EQ(pool->evictable_slots(), published.size() - dirty.size());
    ASSERT_EQ(pool->free_slots() + published.size() + writing.size(), 32u);
  }
  this->ExpectValid(*pool);
}

TYPED_TEST(TierTest, RejectsBadSizes) {
  using Maker = PoolMaker<TypeParam>;
  const uint64_t slot = TypeParam::kSlotAlignment;
  EXPECT_TRUE(Maker::Create(0, 1 << 20).status().IsInvalidArgument());
  EXPECT_TRUE(Maker::Create(4096, 0).status().IsInvalidArgument());
  EXPECT_TRUE(Maker::Create(2 * slot, slot).status().IsInvalidArgument());
  EXPECT_TRUE(Maker::Create(UINT64_MAX, UINT64_MAX).status().IsInvalidArgument());
  // More than the machine's memory: a clear error, not an allocation attempt.
  auto absurd = Maker::Create(1 << 20, uint64_t{1} << 50);
  EXPECT_EQ(absurd.status().code(), StatusCode::kResourceExhausted) << absurd.status().ToString();
  EXPECT_NE(absurd.status().message().find("physical memory"), std::string::npos);
}

// --- DevicePool ------------------------------------------------------------------------

TEST(DevicePoolTest, EmulatedWithoutGpuAndSaysWhy) {
  auto forced = DevicePool::Create(4096, 1 << 20, DeviceOptions{.force_emulated = true});
  ASSERT_TRUE(forced.ok()) << forced.status().ToString();
  EXPECT_TRUE((*forced)->emulated());
  EXPECT_EQ((*forced)->device(), -1);
  EXPECT_NE((*forced)->emulation_reason().find("force_emulated"), std::string::npos);

  auto any = DevicePool::Create(4096, 1 << 20);
  ASSERT_TRUE(any.ok()) << any.status().ToString();
  EXPECT_EQ((*any)->emulated(), !cuda::HasDevice());
  if (!cuda::HasDevice()) {
    EXPECT_EQ((*any)->emulation_reason(), cuda::Devices().reason);
    auto required = DevicePool::Create(4096, 1 << 20, DeviceOptions{.require_device = true});
    EXPECT_EQ(required.status().code(), StatusCode::kNotSupported);
    EXPECT_NE(required.status().message().find(cuda::Devices().reason), std::string::npos);
  } else {
    EXPECT_TRUE((*any)->emulation_reason().empty());
  }
}

TEST(DevicePoolTest, SlotsAreBlockSizeRoundedTo256Bytes) {
  const DeviceOptions emulated{.force_emulated = true};
  for (uint64_t block : {1ull, 255ull, 256ull, 257ull, 5000ull, 524288ull}) {
    auto pool = DevicePool::Create(block, 10 * RoundUp(block, 256) + 100, emulated);
    ASSERT_TRUE(pool.ok()) << pool.status().ToString();
    EXPECT_EQ((*pool)->slot_bytes(), RoundUp(block, 256)) << block;
    EXPECT_EQ((*pool)->slot_count(), 10u) << block;
    EXPECT_EQ((*pool)->capacity_bytes(), 10 * RoundUp(block, 256));
    EXPECT_EQ((*pool)->SlotData(3), (*pool)->base() + 3 * (*pool)->slot_bytes());
  }
}

TEST(DevicePoolTest, RejectsBadOptions) {
  auto negative = DevicePool::Create(4096, 1 << 20, DeviceOptions{.device = -2});
  EXPECT_TRUE(negative.status().IsInvalidArgument()) << negative.status().ToString();
  if (cuda::HasDevice()) {
    auto missing = DevicePool::Create(4096, 1 << 20, DeviceOptions{.device = 1 << 20});
    EXPECT_TRUE(missing.status().IsInvalidArgument()) << missing.status().ToString();
  }
  // More slots than an int32 block table index can name.
  auto too_many = DevicePool::Create(1, uint64_t{256} << 31, DeviceOptions{.force_emulated = true});
  EXPECT_TRUE(too_many.status().IsInvalidArgument()) << too_many.status().ToString();
}

TEST(DevicePoolTest, EmulatedBlockTableHoldsAddressesAndIndices) {
  auto pool = DevicePool::Create(1000, 64 * 1024, DeviceOptions{.force_emulated = true});
  ASSERT_TRUE(pool.ok());
  DevicePool& p = **pool;
  auto table = p.NewBlockTable(16);
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  EXPECT_EQ((*table)->capacity(), 16u);
  EXPECT_EQ((*table)->size(), 0u);

  std::vector<SlotId> slots = {5, 0, 63, 17, 17, 2};  // any order; repeats allowed
  ASSERT_TRUE(p.UploadBlockTable(slots, table->get(), nullptr).ok());
  ASSERT_EQ((*table)->size(), slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    EXPECT_EQ((*table)->addresses()[i], reinterpret_cast<uintptr_t>(p.SlotData(slots[i])));
    EXPECT_EQ((*table)->indices()[i], static_cast<int32_t>(slots[i]));
    EXPECT_EQ(p.base() + uint64_t((*table)->indices()[i]) * p.slot_bytes(), p.SlotData(slots[i]));
  }
  ASSERT_TRUE(p.UploadBlockTable({}, table->get(), nullptr).ok());
  EXPECT_EQ((*table)->size(), 0u);

  // Bad arguments: clear errors, the table unchanged.
  std::vector<SlotId> too_many(17, 1);
  EXPECT_TRUE(p.UploadBlockTable(too_many, table->get(), nullptr).IsInvalidArgument());
  std::vector<SlotId> out_of_range = {1, 64};
  EXPECT_TRUE(p.UploadBlockTable(out_of_range, table->get(), nullptr).IsInvalidArgument());
  EXPECT_TRUE(p.UploadBlockTable(slots, nullptr, nullptr).IsInvalidArgument());
  auto other = DevicePool::Create(1000, 64 * 1024, DeviceOptions{.force_emulated = true});
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE((*other)->UploadBlockTable(slots, table->get(), nullptr).IsInvalidArgument());
  EXPECT_TRUE(p.NewBlockTable(0).status().IsInvalidArgument());
  EXPECT_TRUE(p.NewBlockTable(p.slot_count() + 1).status().IsInvalidArgument());
}

// --- CopyEngine ------------------------------------------------------------------------

// Host blocks, each a different pattern.
struct HostBlocks {
  HostBlocks(uint32_t count, uint64_t bytes, uint64_t seed) : bytes(bytes), seed(seed) {
    data.resize(count * bytes);
    for (uint32_t i = 0; i < count; ++i) {
      EXPECT_TRUE(FillPatternRef(PatternWord(seed, i), at(i), bytes, nullptr).ok());
    }
  }
  std::byte* at(uint32_t i) { return data.data() + i * bytes; }
  uint64_t bytes;
  uint64_t seed;
  std::vector<std::byte> data;
};

TEST(CopyEngineTest, EmulatedRoundTripIsByteExact) {
  const uint64_t block = 12345;  // not a multiple of anything
  const uint32_t blocks = 300;
  auto pool =
      DevicePool::Create(block, 512 * RoundUp(block, 256), DeviceOptions{.force_emulated = true});
  ASSERT_TRUE(pool.ok());
  DevicePool& p = **pool;
  auto engine = CopyEngine::Create(p);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  EXPECT_TRUE((*engine)->emulated());
  EXPECT_EQ((*engine)->h2d_stream(), nullptr);

  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  HostBlocks src(blocks, block, seed);
  std::vector<SlotId> slots(p.slot_count());
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);  // scattered slots
  std::vector<CopyOp> up, down;
  std::vector<std::byte> back(blocks * block, std::byte{0x5A});  // poisoned
  for (uint32_t i = 0; i < blocks; ++i) {
    up.push_back(CopyOp{src.at(i), p.SlotData(slots[i]), block});
    down.push_back(CopyOp{p.SlotData(slots[i]), back.data() + i * block, block});
  }
  CopyEvent uploaded, downloaded;
  ASSERT_TRUE((*engine)->CopyToDevice(up, &uploaded).ok());
  ASSERT_TRUE(uploaded.Wait().ok());
  ASSERT_TRUE(uploaded.MakeStreamWait(nullptr).ok());
  EXPECT_EQ(uploaded.handle(), nullptr);
  ASSERT_TRUE((*engine)->CopyToHost(down, &downloaded).ok());
  Result<bool> ready = downloaded.Query();
  ASSERT_TRUE(ready.ok());
  EXPECT_TRUE(*ready);
  for (uint32_t i = 0; i < blocks; ++i) {
    ASSERT_EQ(FindPatternMismatch(PatternWord(seed, i), back.data() + i * block, block), block)
        << "block " << i << " slot " << slots[i];
  }
  const CopyEngine::Stats stats = (*engine)->stats();
  EXPECT_EQ(stats.calls, 2u);
  EXPECT_EQ(stats.ops, 2u * blocks);
  EXPECT_EQ(stats.bytes, 2u * blocks * block);
  EXPECT_EQ(stats.submissions, 2u);  // one per batch
  EXPECT_EQ(stats.batches_in_flight, 0u);
}

TEST(CopyEngineTest, PinsAreHeldUntilReleased) {
  auto pool = DevicePool::Create(4096, 8 * 4096, DeviceOptions{.force_emulated = true});
  ASSERT_TRUE(pool.ok());
  DevicePool& p = **pool;
  auto host = HostPool::Create(4096, 8 * 4096, HostMemoryKind::kPlain);
  ASSERT_TRUE(host.ok());
  HostPool& h = **host;
  auto engine = CopyEngine::Create(p);
  ASSERT_TRUE(engine.ok());
  (*engine)->AddPinnedRange(h.region().data(), h.region().size());

  // A host block, published and clean; a promotion into a fresh device slot.
  SlotId hs = *h.Allocate();
  ASSERT_TRUE(FillPatternRef(42, h.SlotData(hs), 4096, nullptr).ok());
  h.Publish(hs, Key(1));
  h.Unpin(hs);
  h.Pin(hs);                  // the copy's pin on its source
  SlotId ds = *p.Allocate();  // the destination, pinned by Allocate for the copy
  const CopyOp op{h.SlotData(hs), p.SlotData(ds), 4096};
  const SlotPins pins[] = {{&h.table(), std::span<const SlotId>(&hs, 1)},
                           {&p.table(), std::span<const SlotId>(&ds, 1)}};
  CopyEvent done;
  ASSERT_TRUE((*engine)->CopyToDevice({&op, 1}, &done, pins).ok());
  // The copy is done (emulated), but the pins stay until ReleaseCompleted.
  EXPECT_EQ(h.PinsOf(hs), 1u);
  EXPECT_EQ(p.PinsOf(ds), 1u);
  EXPECT_FALSE(h.LruVictim().has_value());
  EXPECT_EQ((*engine)->stats().batches_in_flight, 1u);
  EXPECT_EQ((*engine)->ReleaseCompleted(), 2u);
  EXPECT_EQ(h.PinsOf(hs), 0u);
  EXPECT_EQ(*h.LruVictim(), hs);
  EXPECT_EQ(p.free_slots(), 8u);  // unpublished destination: freed at its last unpin
  EXPECT_EQ((*engine)->ReleaseCompleted(), 0u);
  EXPECT_EQ((*engine)->stats().batches_in_flight, 0u);
  EXPECT_EQ(FindPatternMismatch(42, p.SlotData(ds), 4096), 4096u);
}

TEST(CopyEngineTest, BadArgumentsAreClearErrors) {
  auto pool = DevicePool::Create(4096, 8 * 4096, DeviceOptions{.force_emulated = true});
  ASSERT_TRUE(pool.ok());
  auto small = CopyEngine::Create(**pool, CopyEngineOptions{.staging_bytes = 1000});
  EXPECT_TRUE(small.status().IsInvalidArgument()) << small.status().ToString();
  auto engine = CopyEngine::Create(**pool);
  ASSERT_TRUE(engine.ok());
  std::vector<std::byte> buf(4096);
  const CopyOp null_src{nullptr, (*pool)->SlotData(0), 16};
  Status s = (*engine)->CopyToDevice({&null_src, 1});
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  const CopyOp null_dst{(*pool)->SlotData(0), nullptr, 16};
  EXPECT_TRUE((*engine)->CopyToHost({&null_dst, 1}).IsInvalidArgument());
  SlotId slot = 0;
  const SlotPins no_table[] = {{nullptr, std::span<const SlotId>(&slot, 1)}};
  EXPECT_TRUE((*engine)->CopyToDevice({}, nullptr, no_table).IsInvalidArgument());
  // Empty and zero-byte copies are fine and do nothing.
  const CopyOp empty{nullptr, nullptr, 0};
  EXPECT_TRUE((*engine)->CopyToDevice({&empty, 1}).ok());
  EXPECT_TRUE((*engine)->CopyToHost({}).ok());
  EXPECT_EQ((*engine)->stats().calls, 0u);
  EXPECT_TRUE((*engine)->Synchronize().ok());
  EXPECT_TRUE((*engine)->WaitFor(nullptr).ok());
}

// Several threads copy through one engine, each pinning its slots under the shared lock
// that guards the tables; every pin comes back and every block arrives intact.
TEST(CopyEngineTest, ConcurrentCallersShareTheEngine) {
  constexpr uint32_t kThreads = 4, kRounds = 200, kBlock = 1024;
  auto pool = DevicePool::Create(kBlock, 64 * kBlock, DeviceOptions{.force_emulated = true});
  ASSERT_TRUE(pool.ok());
  DevicePool& p = **pool;
  auto engine = CopyEngine::Create(p);
  ASSERT_TRUE(engine.ok());
  std::mutex mu;  // the "store lock": guards p's table
  std::atomic<uint64_t> corrupt{0};
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::byte> src(kBlock), dst(kBlock);
      for (uint32_t r = 0; r < kRounds; ++r) {
        const uint64_t seed = uint64_t{t} << 32 | r;
        (void)FillPatternRef(seed, src.data(), kBlock, nullptr);
        std::optional<SlotId> slot;
        while (!slot) {
          std::lock_guard<std::mutex> lock(mu);
          (*engine)->ReleaseCompleted();
          slot = p.Allocate();
        }
        {
          std::lock_guard<std::mutex> lock(mu);
          p.Pin(*slot);  // a second pin, for the download
        }
        const SlotPins pins[] = {{&p.table(), std::span<const SlotId>(&*slot, 1)}};
        const CopyOp up{src.data(), p.SlotData(*slot), kBlock};
        const CopyOp down{p.SlotData(*slot), dst.data(), kBlock};
        CopyEvent done;
        if (!(*engine)->CopyToDevice({&up, 1}, &done, pins).ok() || !done.Wait().ok() ||
            !(*engine)->CopyToHost({&down, 1}, &done, pins).ok() || !done.Wait().ok() ||
            FindPatternMismatch(seed, dst.data(), kBlock) != kBlock) {
          ++corrupt;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(corrupt.load(), 0u);
  std::lock_guard<std::mutex> lock(mu);
  (*engine)->ReleaseCompleted();
  EXPECT_EQ(p.free_slots(), p.slot_count());
  EXPECT_EQ(p.pinned_slots(), 0u);
  EXPECT_EQ((*engine)->stats().batches_in_flight, 0u);
  EXPECT_EQ((*engine)->stats().ops, 2u * kThreads * kRounds);
}

// --- On a real GPU ---------------------------------------------------------------------

// Host -> device -> host through cudaMalloc'd slots, from pinned host slots (direct
// DMA, batched) and from pageable memory (through the staging ring, with blocks larger
// than a staging chunk), plus a block table read back from the device.
TEST(DevicePoolGpuTest, RoundTripsThroughDeviceMemory) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (uint64_t block : {uint64_t{4096}, uint64_t{524288}, uint64_t{100003}}) {
    SCOPED_TRACE("block bytes " + std::to_string(block));
    const uint32_t blocks = 64;
    auto pool = DevicePool::Create(block, 80 * RoundUp(block, 256));
    ASSERT_TRUE(pool.ok()) << pool.status().ToString();
    DevicePool& p = **pool;
    ASSERT_FALSE(p.emulated());
    ASSERT_EQ(reinterpret_cast<uintptr_t>(p.base()) % 256, 0u);
    // Staging chunks of 64 KiB: the larger blocks are split across chunks.
    auto engine = CopyEngine::Create(p, CopyEngineOptions{.staging_bytes = 256 << 10});
    ASSERT_TRUE(engine.ok()) << engine.status().ToString();
    ASSERT_NE((*engine)->h2d_stream(), nullptr);
    // Pinned host slots: [0, blocks) the sources, [blocks, 2 * blocks) the destinations.
    auto host =
        HostPool::Create(block, 2 * blocks * RoundUp(block, 4096), HostMemoryKind::kCudaPinned);
    ASSERT_TRUE(host.ok()) << host.status().ToString();
    HostPool& h = **host;
    HostBlocks pageable(blocks, block, seed ^ block);

    for (bool pinned : {true, false}) {
      SCOPED_TRACE(pinned ? "pinned host slots" : "pageable host memory");
      ASSERT_TRUE(cuda::Memset(p.base(), 0xFF, p.capacity_bytes()).ok());  // poison
      std::vector<SlotId> slots(p.slot_count());
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(slots.begin(), slots.end(), rng);
      slots.resize(blocks);
      std::vector<CopyOp> up, down;
      std::vector<std::byte> back(blocks * block, std::byte{0x5A});  // poisoned
      auto destination = [&](uint32_t i) {
        return pinned ? h.SlotData(blocks + i) : back.data() + i * block;
      };
      for (uint32_t i = 0; i < blocks; ++i) {
        std::byte* src = pageable.at(i);
        if (pinned) {
          src = h.SlotData(i);
          std::memcpy(src, pageable.at(i), block);
          std::memset(destination(i), 0x5A, block);  // poisoned
        }
        up.push_back(CopyOp{src, p.SlotData(slots[i]), block});
        down.push_back(CopyOp{p.SlotData(slots[i]), destination(i), block});
      }
      CopyEvent uploaded, downloaded;
      ASSERT_TRUE((*engine)->CopyToDevice(up, &uploaded).ok());
      if (pinned) {
        // The two directions are separate streams: the download waits for the upload on
        // the GPU, the host does not block.
        ASSERT_TRUE(uploaded.MakeStreamWait((*engine)->d2h_stream()).ok());
        EXPECT_NE(uploaded.handle(), nullptr);
      } else {
        ASSERT_TRUE(uploaded.Wait().ok());
      }
      ASSERT_TRUE((*engine)->CopyToHost(down, &downloaded).ok());
      ASSERT_TRUE(downloaded.Wait().ok());
      Result<bool> ready = downloaded.Query();
      ASSERT_TRUE(ready.ok() && *ready);
      for (uint32_t i = 0; i < blocks; ++i) {
        ASSERT_EQ(FindPatternMismatch(PatternWord(seed ^ block, i), destination(i), block), block)
            << "block " << i << " slot " << slots[i];
      }
    }
    const CopyEngine::Stats stats = (*engine)->stats();
    EXPECT_EQ(stats.ops, 4u * blocks);
    EXPECT_EQ(stats.staged_bytes, 2u * blocks * block);
    std::printf("block %llu: %llu submissions, %llu through cudaMemcpyBatchAsync\n",
                static_cast<unsigned long long>(block),
                static_cast<unsigned long long>(stats.submissions),
                static_cast<unsigned long long>(stats.batched_submissions));

    // The block table, read back from device memory.
    auto table = p.NewBlockTable(blocks);
    ASSERT_TRUE(table.ok()) << table.status().ToString();
    std::vector<SlotId> slots(blocks);
    for (auto& s : slots) s = static_cast<SlotId>(rng() % p.slot_count());
    ASSERT_TRUE(p.UploadBlockTable(slots, table->get(), (*engine)->h2d_stream()).ok());
    ASSERT_TRUE((*engine)->Synchronize().ok());
    std::vector<uint64_t> addresses(blocks);
    std::vector<int32_t> indices(blocks);
    ASSERT_TRUE(cuda::Memcpy(addresses.data(), (*table)->addresses(), blocks * 8).ok());
    ASSERT_TRUE(cuda::Memcpy(indices.data(), (*table)->indices(), blocks * 4).ok());
    for (uint32_t i = 0; i < blocks; ++i) {
      EXPECT_EQ(addresses[i], reinterpret_cast<uintptr_t>(p.SlotData(slots[i])));
      EXPECT_EQ(indices[i], static_cast<int32_t>(slots[i]));
    }
  }
}

// A copy's pins are released only once the GPU has run it.
TEST(DevicePoolGpuTest, PinsAreReleasedAfterTheCopyRuns) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
  const uint64_t block = 4 << 20;
  auto pool = DevicePool::Create(block, 16 * block);
  ASSERT_TRUE(pool.ok()) << pool.status().ToString();
  auto host = HostPool::Create(block, 16 * block, HostMemoryKind::kCudaPinned);
  ASSERT_TRUE(host.ok()) << host.status().ToString();
  auto engine = CopyEngine::Create(**pool);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  (*engine)->AddPinnedRange((*host)->region().data(), (*host)->region().size());
  std::vector<SlotId> slots;
  std::vector<CopyOp> ops;
  for (uint32_t i = 0; i < 16; ++i) {
    slots.push_back(*(*pool)->Allocate());
    ops.push_back(CopyOp{(*host)->SlotData(i), (*pool)->SlotData(slots.back()), block});
  }
  const SlotPins pins[] = {{&(*pool)->table(), slots}};
  CopyEvent done;
  ASSERT_TRUE((*engine)->CopyToDevice(ops, &done, pins).ok());
  uint32_t released = (*engine)->ReleaseCompleted();
  Result<bool> ready = done.Query();
  ASSERT_TRUE(ready.ok());
  if (!*ready) {
    EXPECT_EQ(released, 0u);  // 64 MiB take milliseconds: still in flight
  }
  ASSERT_TRUE(done.Wait().ok());
  ASSERT_TRUE((*engine)->Synchronize().ok());
  released += (*engine)->ReleaseCompleted();
  EXPECT_EQ(released, 16u);
  EXPECT_EQ((*pool)->free_slots(), 16u);
}

}  // namespace
}  // namespace kvtier
