#include "storage/host_pool.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvtier {
namespace {

// A broken invariant of the pool: a bug in its caller, never an input.
[[noreturn]] void Die(const char* what, SlotId slot) {
  std::fprintf(stderr, "kvtier: HostPool invariant broken: %s (slot %u)\n", what, slot);
  std::abort();
}

}  // namespace

Result<std::unique_ptr<HostPool>> HostPool::Create(uint64_t block_bytes, uint64_t capacity_bytes,
                                                   HostMemoryKind memory) {
  if (block_bytes == 0) return Status::InvalidArgument("host tier: block size is 0");
  if (block_bytes > UINT64_MAX - kSlotAlignment) {
    return Status::InvalidArgument("host tier: block size too large");
  }
  const uint64_t slot_bytes = (block_bytes + kSlotAlignment - 1) / kSlotAlignment * kSlotAlignment;
  const uint64_t count = capacity_bytes / slot_bytes;
  if (count == 0) {
    return Status::InvalidArgument("host tier capacity of " + std::to_string(capacity_bytes) +
                                   " bytes holds no block slot of " + std::to_string(slot_bytes) +
                                   " bytes");
  }
  KVTIER_RETURN_IF_ERROR(CheckFitsInMemory(count * slot_bytes));
  if (count >= UINT32_MAX) {
    return Status::InvalidArgument("host tier capacity of " + std::to_string(capacity_bytes) +
                                   " bytes means more than 2^32 - 1 slots");
  }
  KVTIER_ASSIGN_OR_RETURN(auto region, HostRegion::Allocate(count * slot_bytes, memory));
  return std::unique_ptr<HostPool>(
      new HostPool(std::move(region), block_bytes, slot_bytes, static_cast<uint32_t>(count)));
}

HostPool::HostPool(std::unique_ptr<HostRegion> region, uint64_t block_bytes, uint64_t slot_bytes,
                   uint32_t count)
    : region_(std::move(region)),
      block_bytes_(block_bytes),
      slot_bytes_(slot_bytes),
      slots_(count) {
  free_.reserve(count);
  // Pushed in reverse so that slot 0 is handed out first (lower addresses first).
  for (uint32_t i = count; i > 0; --i) free_.push_back(i - 1);
}

std::optional<SlotId> HostPool::Allocate() {
  if (free_.empty()) return std::nullopt;
  SlotId slot = free_.back();
  free_.pop_back();
  Slot& s = slots_[slot];
  if (s.state != State::kFree || s.pins != 0) Die("allocated slot was not free", slot);
  s.state = State::kUnpublished;
  s.pins = 1;
  ++pinned_;
  return slot;
}

void HostPool::Publish(SlotId slot, const BlockKey& key, bool dirty) {
  Slot& s = slots_[slot];
  if (s.state != State::kUnpublished) Die("publish of a slot not freshly allocated", slot);
  s.key = key;
  s.state = State::kPublished;
  s.dirty = dirty;
  ++published_;
  if (dirty) ++dirty_;
  if (s.pins == 0) LruPushFront(slot);
}

void HostPool::MarkClean(SlotId slot) {
  Slot& s = slots_[slot];
  if (s.state != State::kPublished && s.state != State::kRetired) {
    Die("mark clean of an unpublished slot", slot);
  }
  if (!s.dirty) return;
  const bool listed = s.state == State::kPublished && s.pins == 0;
  if (listed) LruRemove(slot);
  s.dirty = false;
  if (s.state == State::kPublished) --dirty_;
  if (listed) LruPushFront(slot);
}

void HostPool::Pin(SlotId slot) {
  Slot& s = slots_[slot];
  if (s.state == State::kFree) Die("pin of a free slot", slot);
  if (s.pins++ == 0) {
    ++pinned_;
    if (s.state == State::kPublished) LruRemove(slot);
  }
}

void HostPool::Unpin(SlotId slot) {
  Slot& s = slots_[slot];
  if (s.pins == 0) Die("unpin of an unpinned slot", slot);
  if (--s.pins > 0) return;
  --pinned_;
  switch (s.state) {
    case State::kPublished:
      LruPushFront(slot);
      break;
    case State::kRetired:
      FreeSlot(slot);
      break;
    case State::kUnpublished:
      FreeSlot(slot);
      break;  // a write abandoned before Publish
    case State::kFree:
      Die("unpin of a free slot", slot);
  }
}

void HostPool::Retire(SlotId slot) {
  Slot& s = slots_[slot];
  if (s.state == State::kFree || s.state == State::kRetired) Die("retire of a dead slot", slot);
  if (s.state == State::kPublished) {
    --published_;
    if (s.dirty) --dirty_;
    if (s.pins == 0) LruRemove(slot);
  }
  if (s.pins == 0) {
    FreeSlot(slot);
  } else {
    s.state = State::kRetired;
  }
}

std::optional<SlotId> HostPool::LruVictim() const {
  if (lru_[0].tail == kNone) return std::nullopt;
  return lru_[0].tail;
}

std::optional<SlotId> HostPool::DirtyLruOldest() const {
  if (lru_[1].tail == kNone) return std::nullopt;
  return lru_[1].tail;
}

void HostPool::LruPushFront(SlotId slot) {
  Slot& s = slots_[slot];
  LruList& list = lru_[s.dirty ? 1 : 0];
  s.lru_prev = kNone;
  s.lru_next = list.head;
  if (list.head != kNone) slots_[list.head].lru_prev = slot;
  list.head = slot;
  if (list.tail == kNone) list.tail = slot;
  ++list.size;
}

void HostPool::LruRemove(SlotId slot) {
  Slot& s = slots_[slot];
  LruList& list = lru_[s.dirty ? 1 : 0];
  if (s.lru_prev != kNone) {
    slots_[s.lru_prev].lru_next = s.lru_next;
  } else {
    list.head = s.lru_next;
  }
  if (s.lru_next != kNone) {
    slots_[s.lru_next].lru_prev = s.lru_prev;
  } else {
    list.tail = s.lru_prev;
  }
  s.lru_prev = s.lru_next = kNone;
  --list.size;
}

void HostPool::FreeSlot(SlotId slot) {
  Slot& s = slots_[slot];
  s.state = State::kFree;
  s.dirty = false;
  s.key = BlockKey{};
  free_.push_back(slot);
}

}  // namespace kvtier
