// HostPool: the host (warm) tier's block slots. A HostRegion cut into `slot_count()`
// slots of `slot_bytes()` bytes (the block size rounded up to 4 KiB, so each slot is
// 4 KiB-aligned), with the bookkeeping a cache needs: a free list, pin counts and an
// LRU list of the slots that may be evicted.
//
// Slot life cycle:
//   Allocate()          free -> owned by the caller, pinned once, not published
//   Publish(slot, key, dirty)  the slot now holds `key`'s committed block; dirty when
//                       that block is not (yet) on a lower tier
//   MarkClean(slot)     the block reached the lower tier: it may now be evicted
//   Pin / Unpin         a pinned slot is in use and never evicted; the last Unpin of a
//                       published slot makes it the most recently used
//   Retire(slot)        the block is gone (deleted, replaced, evicted): the slot is
//                       freed now, or at its last Unpin if it is still in use
// Published, unpinned slots sit in one of two LRU lists, clean and dirty. LruVictim()
// returns the least recently used clean one (evicting it loses nothing), DirtyLruOldest()
// the least recently used dirty one (the next to write back under pressure).
//
// Thread safety: SlotData() and the const size accessors may be called from any
// thread. Every other method must be called with one lock held by the caller (the
// Store's); the pool does no locking of its own.
#ifndef KVTIER_STORAGE_HOST_POOL_H_
#define KVTIER_STORAGE_HOST_POOL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/options.h"
#include "kvtier/status.h"
#include "storage/host_region.h"

namespace kvtier {

using SlotId = uint32_t;

class HostPool {
 public:
  static constexpr uint64_t kSlotAlignment = 4096;

  // A pool of floor(capacity_bytes / slot_bytes) slots for blocks of `block_bytes`.
  // Errors: InvalidArgument (zero block or capacity, capacity below one slot, more
  // than 2^32 - 1 slots), and HostRegion::Allocate's.
  static Result<std::unique_ptr<HostPool>> Create(uint64_t block_bytes, uint64_t capacity_bytes,
                                                  HostMemoryKind memory);

  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  uint64_t block_bytes() const { return block_bytes_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  uint32_t slot_count() const { return static_cast<uint32_t>(slots_.size()); }
  const HostRegion& region() const { return *region_; }
  std::byte* SlotData(SlotId slot) const { return region_->data() + slot * slot_bytes_; }

  // A free slot, pinned once and unpublished; nullopt when none is free.
  std::optional<SlotId> Allocate();
  void Publish(SlotId slot, const BlockKey& key, bool dirty = false);
  void MarkClean(SlotId slot);
  void Pin(SlotId slot);
  void Unpin(SlotId slot);
  void Retire(SlotId slot);
  // The least recently used slot that may be evicted now (published, unpinned, clean).
  std::optional<SlotId> LruVictim() const;
  // The least recently used published, unpinned, dirty slot.
  std::optional<SlotId> DirtyLruOldest() const;

  // The key a published slot holds.
  const BlockKey& KeyOf(SlotId slot) const { return slots_[slot].key; }
  bool IsPublished(SlotId slot) const { return slots_[slot].state == State::kPublished; }
  bool IsDirty(SlotId slot) const { return slots_[slot].dirty; }
  uint32_t PinsOf(SlotId slot) const { return slots_[slot].pins; }

  uint32_t free_slots() const { return static_cast<uint32_t>(free_.size()); }
  uint32_t published_slots() const { return published_; }
  uint32_t pinned_slots() const { return pinned_; }
  uint32_t dirty_slots() const { return dirty_; }
  // Published, unpinned, clean slots: LruVictim() candidates.
  uint32_t evictable_slots() const { return lru_[0].size; }

 private:
  static constexpr SlotId kNone = UINT32_MAX;
  enum class State : uint8_t { kFree, kUnpublished, kPublished, kRetired };
  struct Slot {
    BlockKey key;
    SlotId lru_prev = kNone;  // towards the most recently used end
    SlotId lru_next = kNone;  // towards the least recently used end
    uint32_t pins = 0;
    State state = State::kFree;
    bool dirty = false;
  };
  struct LruList {
    SlotId head = kNone;  // most recently used
    SlotId tail = kNone;  // least recently used
    uint32_t size = 0;
  };

  HostPool(std::unique_ptr<HostRegion> region, uint64_t block_bytes, uint64_t slot_bytes,
           uint32_t count);
  // The slot's list (by its dirty flag): push makes it the most recently used.
  void LruPushFront(SlotId slot);
  void LruRemove(SlotId slot);
  void FreeSlot(SlotId slot);

  std::unique_ptr<HostRegion> region_;
  uint64_t block_bytes_;
  uint64_t slot_bytes_;
  std::vector<Slot> slots_;
  std::vector<SlotId> free_;  // a stack: the most recently freed slot is reused first
  LruList lru_[2];            // [0] clean, [1] dirty
  uint32_t published_ = 0;
  uint32_t dirty_ = 0;  // published dirty slots
  uint32_t pinned_ = 0;
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_HOST_POOL_H_
