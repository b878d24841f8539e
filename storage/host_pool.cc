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

void HostPool::Publish(SlotId slot, const BlockKey& key) {
  Slot& s = slots_[slot];
  if (s.state != State::kUnpublished) Die("publish of a slot not freshly allocated", slot);
  s.key = key;
  s.state = State::kPublished;
  ++published_;
  if (s.pins == 0) LruPushFront(slot);
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
    if (s.pins == 0) LruRemove(slot);
  }
  if (s.pins == 0) {
    FreeSlot(slot);
  } else {
    s.state = State::kRetired;
  }
}

std::optional<SlotId> HostPool::LruVictim() const {
  if (lru_tail_ == kNone) return std::nullopt;
  return lru_tail_;
}

void HostPool::LruPushFront(SlotId slot) {
  Slot& s = slots_[slot];
  s.lru_prev = kNone;
  s.lru_next = lru_head_;
  if (lru_head_ != kNone) slots_[lru_head_].lru_prev = slot;
  lru_head_ = slot;
  if (lru_tail_ == kNone) lru_tail_ = slot;
}

void HostPool::LruRemove(SlotId slot) {
  Slot& s = slots_[slot];
  if (s.lru_prev != kNone) {
    slots_[s.lru_prev].lru_next = s.lru_next;
  } else {
    lru_head_ = s.lru_next;
  }
  if (s.lru_next != kNone) {
    slots_[s.lru_next].lru_prev = s.lru_prev;
  } else {
    lru_tail_ = s.lru_prev;
  }
  s.lru_prev = s.lru_next = kNone;
}

void HostPool::FreeSlot(SlotId slot) {
  Slot& s = slots_[slot];
  s.state = State::kFree;
  s.key = BlockKey{};
  free_.push_back(slot);
}

}  // namespace kvtier
