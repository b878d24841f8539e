// HostPool: the host (warm) tier's block slots. A HostRegion cut into `slot_count()`
// slots of `slot_bytes()` bytes (the block size rounded up to 4 KiB, so each slot is
// 4 KiB-aligned and can be an O_DIRECT / io_uring buffer), with the bookkeeping of a
// SlotTable: a free list, pin counts, and clean and dirty LRU lists. The slot life cycle
// (Allocate, Publish, MarkClean, Pin, Unpin, Retire) is SlotTable's, documented in
// storage/slot_table.h; the methods of that name below forward to it. DevicePool is the
// same table over GPU memory.
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

#include "kvtier/block_key.h"
#include "kvtier/options.h"
#include "kvtier/status.h"
#include "storage/host_region.h"
#include "storage/slot_table.h"

namespace kvtier {

class HostPool {
 public:
  static constexpr uint64_t kSlotAlignment = 4096;

  // A pool of floor(capacity_bytes / slot_bytes) slots for blocks of `block_bytes`.
  // Errors: InvalidArgument (zero block or capacity, capacity below one slot, more
  // than 2^32 - 2 slots), and HostRegion::Allocate's.
  static Result<std::unique_ptr<HostPool>> Create(uint64_t block_bytes, uint64_t capacity_bytes,
                                                  HostMemoryKind memory);

  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  uint64_t block_bytes() const { return block_bytes_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  uint32_t slot_count() const { return slot_count_; }
  const HostRegion& region() const { return *region_; }
  std::byte* SlotData(SlotId slot) const { return region_->data() + slot * slot_bytes_; }

  // The bookkeeping itself (same lock as below).
  SlotTable& table() { return table_; }
  const SlotTable& table() const { return table_; }

  // SlotTable's operations: see storage/slot_table.h.
  std::optional<SlotId> Allocate() { return table_.Allocate(); }
  void Publish(SlotId slot, const BlockKey& key, bool dirty = false, uint32_t group = 0) {
    table_.Publish(slot, key, dirty, group);
  }
  void MarkClean(SlotId slot) { table_.MarkClean(slot); }
  void Pin(SlotId slot) { table_.Pin(slot); }
  void Unpin(SlotId slot) { table_.Unpin(slot); }
  void Retire(SlotId slot) { table_.Retire(slot); }
  std::optional<SlotId> LruVictim(uint32_t group = 0) const { return table_.LruVictim(group); }
  std::optional<SlotId> DirtyLruOldest(uint32_t group = 0) const {
    return table_.DirtyLruOldest(group);
  }
  const BlockKey& KeyOf(SlotId slot) const { return table_.KeyOf(slot); }
  bool IsPublished(SlotId slot) const { return table_.IsPublished(slot); }
  bool IsDirty(SlotId slot) const { return table_.IsDirty(slot); }
  uint32_t PinsOf(SlotId slot) const { return table_.PinsOf(slot); }
  uint32_t free_slots() const { return table_.free_slots(); }
  uint32_t published_slots() const { return table_.published_slots(); }
  uint32_t pinned_slots() const { return table_.pinned_slots(); }
  uint32_t dirty_slots() const { return table_.dirty_slots(); }
  uint32_t evictable_slots() const { return table_.evictable_slots(); }

 private:
  HostPool(std::unique_ptr<HostRegion> region, uint64_t block_bytes, uint64_t slot_bytes,
           uint32_t count);

  std::unique_ptr<HostRegion> region_;
  uint64_t block_bytes_;
  uint64_t slot_bytes_;
  uint32_t slot_count_;
  SlotTable table_;
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_HOST_POOL_H_
