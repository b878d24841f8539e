#include "storage/slot_table.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvtier {

SlotTable::SlotTable(uint32_t slot_count, const char* owner) : owner_(owner) {
  if (slot_count == 0 || slot_count > kMaxSlots) Die("slot count out of range", slot_count);
  slots_.resize(slot_count);
  free_.reserve(slot_count);
  // Pushed in reverse so that slot 0 is handed out first (lower addresses first).
  for (uint32_t i = slot_count; i > 0; --i) free_.push_back(i - 1);
}

void SlotTable::Die(const char* what, SlotId slot) const {
  std::fprintf(stderr, "kvtier: %s invariant broken: %s (slot %u)\n", owner_, what, slot);
  std::abort();
}

SlotTable::Slot& SlotTable::At(SlotId slot) {
  if (slot >= slots_.size()) Die("slot out of range", slot);
  return slots_[slot];
}

std::optional<SlotId> SlotTable::Allocate() {
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

void SlotTable::Publish(SlotId slot, const BlockKey& key, bool dirty, uint32_t group) {
  Slot& s = At(slot);
  if (s.state != State::kUnpublished) Die("publish of a slot not freshly allocated", slot);
  if (group == kNone) Die("group id out of range", slot);
  if (group > groups_.size()) groups_.resize(group);
  s.key = key;
  s.group = group;
  s.state = State::kPublished;
  s.dirty = dirty;
  ++published_;
  if (dirty) ++dirty_;
  if (s.pins == 0) LruPushFront(slot);
}

void SlotTable::MarkClean(SlotId slot) {
  Slot& s = At(slot);
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

void SlotTable::Pin(SlotId slot) {
  Slot& s = At(slot);
  if (s.state == State::kFree) Die("pin of a free slot", slot);
  if (s.pins == UINT32_MAX) Die("pin count overflow", slot);
  if (s.pins++ == 0) {
    ++pinned_;
    if (s.state == State::kPublished) LruRemove(slot);
  }
}

void SlotTable::Unpin(SlotId slot) {
  Slot& s = At(slot);
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

void SlotTable::Retire(SlotId slot) {
  Slot& s = At(slot);
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

std::optional<SlotId> SlotTable::TailOf(uint32_t group, int dirty) const {
  if (group > groups_.size()) return std::nullopt;
  const LruList& list = group == 0 ? lru_[dirty] : groups_[group - 1][dirty];
  if (list.tail == kNone) return std::nullopt;
  return list.tail;
}

std::optional<SlotId> SlotTable::LruVictim(uint32_t group) const { return TailOf(group, 0); }

std::optional<SlotId> SlotTable::DirtyLruOldest(uint32_t group) const { return TailOf(group, 1); }

namespace {

// Pushes `slot` at the head of `list`, linked through the members `prev` and `next`.
template <typename Slots, typename List, typename Link>
void PushFront(Slots& slots, List& list, uint32_t slot, Link prev, Link next, uint32_t none) {
  auto& s = slots[slot];
  s.*prev = none;
  s.*next = list.head;
  if (list.head != none) slots[list.head].*prev = slot;
  list.head = slot;
  if (list.tail == none) list.tail = slot;
  ++list.size;
}

template <typename Slots, typename List, typename Link>
void Remove(Slots& slots, List& list, uint32_t slot, Link prev, Link next, uint32_t none) {
  auto& s = slots[slot];
  if (s.*prev != none) {
    slots[s.*prev].*next = s.*next;
  } else {
    list.head = s.*next;
  }
  if (s.*next != none) {
    slots[s.*next].*prev = s.*prev;
  } else {
    list.tail = s.*prev;
  }
  s.*prev = s.*next = none;
  --list.size;
}

}  // namespace

void SlotTable::LruPushFront(SlotId slot) {
  Slot& s = slots_[slot];
  const int dirty = s.dirty ? 1 : 0;
  PushFront(slots_, lru_[dirty], slot, &Slot::lru_prev, &Slot::lru_next, kNone);
  if (s.group != 0) {
    PushFront(slots_, groups_[s.group - 1][dirty], slot, &Slot::group_prev, &Slot::group_next,
              kNone);
  }
}

void SlotTable::LruRemove(SlotId slot) {
  Slot& s = slots_[slot];
  const int dirty = s.dirty ? 1 : 0;
  Remove(slots_, lru_[dirty], slot, &Slot::lru_prev, &Slot::lru_next, kNone);
  if (s.group != 0) {
    Remove(slots_, groups_[s.group - 1][dirty], slot, &Slot::group_prev, &Slot::group_next, kNone);
  }
}

void SlotTable::FreeSlot(SlotId slot) {
  Slot& s = slots_[slot];
  s.state = State::kFree;
  s.dirty = false;
  s.group = 0;
  s.key = BlockKey{};
  free_.push_back(slot);
}

Status SlotTable::Validate() const {
  auto fail = [](const std::string& what) {
    return Status::Internal("slot table inconsistent: " + what);
  };
  const uint64_t n = slots_.size();
  uint64_t free = 0, published = 0, dirty = 0, pinned = 0, listed[2] = {0, 0};
  for (SlotId i = 0; i < n; ++i) {
    const Slot& s = slots_[i];
    if (s.state == State::kFree) {
      ++free;
      if (s.pins != 0 || s.dirty) return fail("free slot " + std::to_string(i) + " is in use");
    }
    if (s.state == State::kPublished) {
      ++published;
      if (s.dirty) ++dirty;
      if (s.pins == 0) ++listed[s.dirty ? 1 : 0];
    }
    if (s.pins > 0) ++pinned;
    if (s.state == State::kRetired && s.pins == 0) {
      return fail("retired slot " + std::to_string(i) + " is not pinned");
    }
    if (s.state == State::kUnpublished && s.pins == 0) {
      return fail("unpublished slot " + std::to_string(i) + " is not pinned");
    }
  }
  if (free != free_.size())
    return fail("free list holds " + std::to_string(free_.size()) + " slots, " +
                std::to_string(free) + " are free");
  for (SlotId f : free_) {
    if (f >= n || slots_[f].state != State::kFree) return fail("free list holds a used slot");
  }
  if (published != published_) return fail("published count");
  if (dirty != dirty_) return fail("dirty count");
  if (pinned != pinned_) return fail("pinned count");
  for (int l = 0; l < 2; ++l) {
    const LruList& list = lru_[l];
    if (listed[l] != list.size) return fail("LRU list size");
    uint64_t walked = 0;
    SlotId prev = kNone;
    for (SlotId at = list.head; at != kNone; at = slots_[at].lru_next) {
      const Slot& s = slots_[at];
      if (++walked > list.size || s.state != State::kPublished || s.pins != 0 ||
          s.dirty != (l == 1) || s.lru_prev != prev) {
        return fail("LRU list " + std::to_string(l) + " broken at slot " + std::to_string(at));
      }
      prev = at;
    }
    if (walked != list.size || list.tail != prev) return fail("LRU list tail");
  }
  // Each group's lists: its listed slots, in the table-wide lists' order.
  std::vector<uint64_t> rank(n, 0);
  for (int l = 0; l < 2; ++l) {
    uint64_t r = 0;
    for (SlotId at = lru_[l].head; at != kNone; at = slots_[at].lru_next) rank[at] = r++;
  }
  std::vector<uint64_t> group_listed(groups_.size() * 2, 0);
  for (SlotId i = 0; i < n; ++i) {
    const Slot& s = slots_[i];
    if (s.group > groups_.size()) return fail("slot " + std::to_string(i) + " in no known group");
    if (s.state == State::kFree && s.group != 0) return fail("free slot in a group");
    if (s.group != 0 && s.state == State::kPublished && s.pins == 0) {
      ++group_listed[(s.group - 1) * 2 + (s.dirty ? 1 : 0)];
    }
  }
  for (uint32_t g = 1; g <= groups_.size(); ++g) {
    for (int l = 0; l < 2; ++l) {
      const LruList& list = groups_[g - 1][l];
      const std::string name = "group " + std::to_string(g) + " list " + std::to_string(l);
      if (group_listed[(g - 1) * 2 + l] != list.size) return fail(name + " size");
      uint64_t walked = 0;
      SlotId prev = kNone;
      for (SlotId at = list.head; at != kNone; at = slots_[at].group_next) {
        const Slot& s = slots_[at];
        if (++walked > list.size || s.group != g || s.state != State::kPublished || s.pins != 0 ||
            s.dirty != (l == 1) || s.group_prev != prev ||
            (prev != kNone && rank[prev] >= rank[at])) {
          return fail(name + " broken at slot " + std::to_string(at));
        }
        prev = at;
      }
      if (walked != list.size || list.tail != prev) return fail(name + " tail");
    }
  }
  return Status::OK();
}

}  // namespace kvtier
