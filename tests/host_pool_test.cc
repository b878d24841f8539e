#include "storage/host_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <vector>

namespace kvtier {
namespace {

BlockKey Key(uint32_t block) {
  return BlockKey{.namespace_id = 0, .sequence = {0, 1}, .layer = 0, .block = block};
}

std::unique_ptr<HostPool> MakePool(uint64_t block_bytes, uint32_t slots) {
  uint64_t slot = (block_bytes + 4095) / 4096 * 4096;
  auto pool = HostPool::Create(block_bytes, slot * slots, HostMemoryKind::kPlain);
  EXPECT_TRUE(pool.ok()) << pool.status().ToString();
  return std::move(pool).value();
}

TEST(HostPoolTest, SlotsAreAlignedAndDisjoint) {
  auto pool = MakePool(5000, 16);  // 5000-byte blocks -> 8 KiB slots
  EXPECT_EQ(pool->slot_bytes(), 8192u);
  EXPECT_EQ(pool->slot_count(), 16u);
  std::set<SlotId> seen;
  for (int i = 0; i < 16; ++i) {
    auto slot = pool->Allocate();
    ASSERT_TRUE(slot.has_value());
    EXPECT_TRUE(seen.insert(*slot).second);
    auto addr = reinterpret_cast<uintptr_t>(pool->SlotData(*slot));
    EXPECT_EQ(addr % 4096, 0u);
    // Every byte of a slot is writable and does not overlap another slot.
    std::memset(pool->SlotData(*slot), i + 1, pool->slot_bytes());
  }
  EXPECT_FALSE(pool->Allocate().has_value());
  for (SlotId s : seen) {
    unsigned char first = static_cast<unsigned char>(*pool->SlotData(s));
    for (uint64_t b = 0; b < pool->slot_bytes(); b += 511) {
      ASSERT_EQ(static_cast<unsigned char>(pool->SlotData(s)[b]), first);
    }
  }
}

TEST(HostPoolTest, LruOrderFollowsUnpins) {
  auto pool = MakePool(4096, 4);
  std::vector<SlotId> slots;
  for (uint32_t i = 0; i < 4; ++i) {
    SlotId s = *pool->Allocate();
    pool->Publish(s, Key(i));
    pool->Unpin(s);
    slots.push_back(s);
  }
  EXPECT_EQ(pool->published_slots(), 4u);
  EXPECT_EQ(*pool->LruVictim(), slots[0]);
  // Touch slot 0 (a Get): now slot 1 is the least recently used.
  pool->Pin(slots[0]);
  EXPECT_EQ(*pool->LruVictim(), slots[1]);  // pinned slots are never victims
  pool->Unpin(slots[0]);
  EXPECT_EQ(*pool->LruVictim(), slots[1]);
  EXPECT_EQ(pool->KeyOf(*pool->LruVictim()), Key(1));
}

TEST(HostPoolTest, PinnedSlotsAreNeverVictims) {
  auto pool = MakePool(4096, 3);
  std::vector<SlotId> slots;
  for (uint32_t i = 0; i < 3; ++i) {
    SlotId s = *pool->Allocate();
    pool->Publish(s, Key(i));
    slots.push_back(s);  // still pinned by its writer
  }
  EXPECT_FALSE(pool->LruVictim().has_value());
  EXPECT_EQ(pool->pinned_slots(), 3u);
  pool->Unpin(slots[2]);
  EXPECT_EQ(*pool->LruVictim(), slots[2]);
}

TEST(HostPoolTest, RetireDefersWhilePinned) {
  auto pool = MakePool(4096, 2);
  SlotId s = *pool->Allocate();
  pool->Publish(s, Key(7));
  pool->Pin(s);  // a reader, besides the writer's pin
  pool->Unpin(s);
  pool->Retire(s);  // deleted while a reader copies
  EXPECT_EQ(pool->free_slots(), 1u);
  EXPECT_FALSE(pool->IsPublished(s));
  EXPECT_FALSE(pool->LruVictim().has_value());
  pool->Unpin(s);  // the reader is done: only now the slot is free
  EXPECT_EQ(pool->free_slots(), 2u);
  EXPECT_EQ(pool->pinned_slots(), 0u);
}

TEST(HostPoolTest, AbandonedWriteFreesTheSlot) {
  auto pool = MakePool(4096, 1);
  SlotId s = *pool->Allocate();
  pool->Unpin(s);  // never published
  EXPECT_EQ(pool->free_slots(), 1u);
  EXPECT_TRUE(pool->Allocate().has_value());
}

TEST(HostPoolTest, RandomOperationsKeepCountsConsistent) {
  auto pool = MakePool(4096, 32);
  std::mt19937 rng(3);
  std::vector<SlotId> published, writing;
  std::vector<std::pair<SlotId, int>> pins;  // extra reader pins on published slots
  for (int step = 0; step < 20000; ++step) {
    switch (rng() % 5) {
      case 0:
        if (auto s = pool->Allocate()) writing.push_back(*s);
        break;
      case 1:
        if (!writing.empty()) {
          SlotId s = writing.back();
          writing.pop_back();
          pool->Publish(s, Key(s));
          pool->Unpin(s);
          published.push_back(s);
        }
        break;
      case 2:
        if (!published.empty()) {
          size_t i = rng() % published.size();
          pool->Retire(published[i]);
          published.erase(published.begin() + i);
        }
        break;
      case 3:
        if (auto v = pool->LruVictim()) {
          EXPECT_TRUE(pool->IsPublished(*v));
          EXPECT_EQ(pool->PinsOf(*v), 0u);
        }
        break;
      case 4:
        if (!published.empty()) {
          SlotId s = published[rng() % published.size()];
          pool->Pin(s);
          pool->Unpin(s);
        }
        break;
    }
    ASSERT_EQ(pool->published_slots(), published.size());
    ASSERT_EQ(pool->pinned_slots(), writing.size());
    ASSERT_EQ(pool->free_slots() + published.size() + writing.size(), 32u);
  }
}

TEST(HostPoolTest, RejectsBadSizes) {
  EXPECT_TRUE(HostPool::Create(0, 1 << 20, HostMemoryKind::kPlain).status().IsInvalidArgument());
  EXPECT_TRUE(HostPool::Create(4096, 0, HostMemoryKind::kPlain).status().IsInvalidArgument());
  EXPECT_TRUE(HostPool::Create(8192, 4096, HostMemoryKind::kPlain).status().IsInvalidArgument());
  // More than the machine's memory: a clear error, not an allocation attempt.
  auto absurd = HostPool::Create(4096, uint64_t{1} << 50, HostMemoryKind::kPlain);
  EXPECT_EQ(absurd.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(absurd.status().message().find("physical memory"), std::string::npos);
}

TEST(HostPoolTest, ExplicitKindsAreHonouredOrRefused) {
  auto cuda = HostPool::Create(4096, 1 << 20, HostMemoryKind::kCudaPinned);
  if (cuda.ok()) {
    EXPECT_EQ(cuda->get()->region().kind(), HostMemoryKind::kCudaPinned);
  } else {
    EXPECT_EQ(cuda.status().code(), StatusCode::kNotSupported) << cuda.status().ToString();
  }
  auto plain = HostPool::Create(4096, 1 << 20, HostMemoryKind::kPlain);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->get()->region().kind(), HostMemoryKind::kPlain);
  auto any = HostPool::Create(4096, 1 << 20, HostMemoryKind::kAuto);
  ASSERT_TRUE(any.ok());
  EXPECT_NE(any->get()->region().kind(), HostMemoryKind::kAuto);
}

}  // namespace
}  // namespace kvtier
