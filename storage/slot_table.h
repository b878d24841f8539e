// SlotTable: the bookkeeping of a tier's fixed-size block slots, without the memory.
// HostPool (host memory) and DevicePool (GPU memory, or host memory standing in for it)
// both keep their slots' life cycles in one, so that every cache policy above them sees
// the same behaviour whichever tier it runs on.
//
// Per slot: a state, a pin count, the key it holds and a dirty flag. Tier-wide: a free
// list and two LRU lists of the published, unpinned slots (clean and dirty).
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
// LruVictim() returns the least recently used clean, published, unpinned slot (evicting
// it loses nothing), DirtyLruOldest() the least recently used dirty one (the next to
// write back under pressure). Free slots are reused most recently freed first; a fresh
// table hands out slot 0, 1, 2, ... (lower addresses first).
//
// Groups: Publish may place a slot in a group g >= 1 (0, the default, is none). Besides
// the table-wide lists, every group keeps its own clean and dirty LRU lists of its
// published, unpinned slots, in the same order, so LruVictim(g) / DirtyLruOldest(g) find
// a group's least recently used slot in O(1) (the Store gives each namespace with a host
// quota a group). A slot leaves its group when it is freed. Group 0's lists are the
// table-wide ones. Groups cost 12 bytes per slot and 24 bytes per group id in use.
//
// Misuse (publishing a free slot, unpinning an unpinned one, retiring twice, ...) is a
// bug in the caller, never an input: it aborts with a message naming the slot.
//
// Thread safety: none. Every method, const ones included, must be called with one lock
// held by the caller (the Store's).
#ifndef KVTIER_STORAGE_SLOT_TABLE_H_
#define KVTIER_STORAGE_SLOT_TABLE_H_

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/status.h"

namespace kvtier {

// A slot's index in its tier: slot i occupies bytes [i * slot_bytes, (i + 1) *
// slot_bytes) of the tier's memory.
using SlotId = uint32_t;

class SlotTable {
 public:
  // The largest slot count a table takes (SlotId's last value is reserved).
  static constexpr uint32_t kMaxSlots = UINT32_MAX - 1;

  // `slot_count` free slots, 1..kMaxSlots. `owner` names the tier in abort messages
  // ("host tier", "device tier").
  explicit SlotTable(uint32_t slot_count, const char* owner = "slot table");

  SlotTable(const SlotTable&) = delete;
  SlotTable& operator=(const SlotTable&) = delete;

  uint32_t slot_count() const { return static_cast<uint32_t>(slots_.size()); }

  // A free slot, pinned once and unpublished; nullopt when none is free.
  std::optional<SlotId> Allocate();
  // `group`: see Groups above. The first use of a group id allocates its lists.
  void Publish(SlotId slot, const BlockKey& key, bool dirty = false, uint32_t group = 0);
  void MarkClean(SlotId slot);
  void Pin(SlotId slot);
  void Unpin(SlotId slot);
  void Retire(SlotId slot);
  // The least recently used slot that may be evicted now (published, unpinned, clean),
  // of the whole table (group 0) or of `group`.
  std::optional<SlotId> LruVictim(uint32_t group = 0) const;
  // The least recently used published, unpinned, dirty slot (of the table, or `group`).
  std::optional<SlotId> DirtyLruOldest(uint32_t group = 0) const;

  // The key a published slot holds.
  const BlockKey& KeyOf(SlotId slot) const { return slots_[slot].key; }
  bool IsFree(SlotId slot) const { return slots_[slot].state == State::kFree; }
  bool IsPublished(SlotId slot) const { return slots_[slot].state == State::kPublished; }
  bool IsDirty(SlotId slot) const { return slots_[slot].dirty; }
  // The group a published or retired slot was published in (0: none).
  uint32_t GroupOf(SlotId slot) const { return slots_[slot].group; }
  uint32_t PinsOf(SlotId slot) const { return slots_[slot].pins; }

  uint32_t free_slots() const { return static_cast<uint32_t>(free_.size()); }
  uint32_t published_slots() const { return published_; }
  uint32_t pinned_slots() const { return pinned_; }
  uint32_t dirty_slots() const { return dirty_; }
  // Published, unpinned, clean slots: LruVictim() candidates.
  uint32_t evictable_slots() const { return lru_[0].size; }
  // Published, unpinned, dirty slots: DirtyLruOldest() candidates.
  uint32_t dirty_unpinned_slots() const { return lru_[1].size; }

  // Walks every slot and both lists and checks them against the counters: Internal
  // with what disagrees, OK otherwise. O(slot_count); for tests and debug checks.
  Status Validate() const;

 private:
  static constexpr SlotId kNone = UINT32_MAX;
  enum class State : uint8_t { kFree, kUnpublished, kPublished, kRetired };
  struct Slot {
    BlockKey key;
    SlotId lru_prev = kNone;    // towards the most recently used end
    SlotId lru_next = kNone;    // towards the least recently used end
    SlotId group_prev = kNone;  // the same, in the group's list (group != 0)
    SlotId group_next = kNone;
    uint32_t group = 0;
    uint32_t pins = 0;
    State state = State::kFree;
    bool dirty = false;
  };
  struct LruList {
    SlotId head = kNone;  // most recently used
    SlotId tail = kNone;  // least recently used
    uint32_t size = 0;
  };

  [[noreturn]] void Die(const char* what, SlotId slot) const;
  // slots_[slot], after checking that the slot exists.
  Slot& At(SlotId slot);
  // The slot's lists (by its dirty flag; the table's and its group's): push makes it
  // the most recently used.
  void LruPushFront(SlotId slot);
  void LruRemove(SlotId slot);
  void FreeSlot(SlotId slot);
  // The tail of a list of `group` (0: the table's), or nullopt.
  std::optional<SlotId> TailOf(uint32_t group, int dirty) const;

  const char* owner_;
  std::vector<Slot> slots_;
  std::vector<SlotId> free_;  // a stack: the most recently freed slot is reused first
  LruList lru_[2];            // [0] clean, [1] dirty
  // groups_[g - 1]: group g's lists, [0] clean, [1] dirty (linked through group_prev/next).
  std::vector<std::array<LruList, 2>> groups_;
  uint32_t published_ = 0;
  uint32_t dirty_ = 0;  // published dirty slots
  uint32_t pinned_ = 0;
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_SLOT_TABLE_H_
