// HostPool: the host (warm) tier's block slots. A HostRegion cut into `slot_count()`
// slots of `slot_bytes()` bytes (the block size rounded up to 4 KiB, so each slot is
// 4 KiB-aligned), with the bookkeeping a cache needs: a free list, pin counts and an
// LRU list of the slots that may be evicted.
//
// Slot life cycle:
//   Allocate()          free -> owned by the caller, pinned once, not published
//   Publish(slot, key)  the slot now holds `key`'s committed block
//   Pin / Unpin         a pinned slot is in use and never evicted; the last Unpin of a
//                       published slot makes it the most recently used
//   Retire(slot)        the block is gone (deleted, replaced, evicted): the slot is
//                       freed now, or at its last Unpin if it is still in use
// LruVictim() returns the least recently used published, unpinned slot.
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
  void Publish(SlotId slot, const BlockKey& key);
  void Pin(SlotId slot);
  void Unpin(SlotId slot);
  void Retire(SlotId slot);
  // The least recently used slot that may be evicted now (published, unpinned).
  std::optional<SlotId> LruVictim() const;

  // The key a published slot holds.
  const BlockKey& KeyOf(SlotId slot) const { return slots_[slot].key; }
  bool IsPublished(SlotId slot) const { return slots_[slot].state == State::kPublished; }
  uint32_t PinsOf(SlotId slot) const { return slots_[slot].pins; }

  uint32_t free_slots() const { return static_cast<uint32_t>(free_.size()); }
  uint32_t published_slots() const { return published_; }
  uint32_t pinned_slots() const { return pinned_; }

 private:
  static constexpr SlotId kNone = UINT32_MAX;
  enum class State : uint8_t { kFree, kUnpublished, kPublished, kRetired };
  struct Slot {
    BlockKey key;
    SlotId lru_prev = kNone;  // towards the most recently used end
    SlotId lru_next = kNone;  // towards the least recently used end
    uint32_t pins = 0;
    State state = State::kFree;
  };

  HostPool(std::unique_ptr<HostRegion> region, uint64_t block_bytes, uint64_t slot_bytes,
           uint32_t count);
  void LruPushFront(SlotId slot);  // becomes the most recently used
  void LruRemove(SlotId slot);
  void FreeSlot(SlotId slot);

  std::unique_ptr<HostRegion> region_;
  uint64_t block_bytes_;
  uint64_t slot_bytes_;
  std::vector<Slot> slots_;
  std::vector<SlotId> free_;  // a stack: the most recently freed slot is reused first
  SlotId lru_head_ = kNone;   // most recently used
  SlotId lru_tail_ = kNone;   // least recently used
  uint32_t published_ = 0;
  uint32_t pinned_ = 0;
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_HOST_POOL_H_
