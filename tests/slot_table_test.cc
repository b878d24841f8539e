#include "storage/slot_table.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <list>
#include <random>
#include <set>
#include <vector>

namespace kvtier {
namespace {

BlockKey Key(uint32_t block) {
  return BlockKey{.namespace_id = 1, .sequence = {0, 9}, .layer = 2, .block = block};
}

void ExpectValid(const SlotTable& t) {
  Status s = t.Validate();
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST(SlotTableTest, FreshTableHandsOutLowSlotsFirst) {
  SlotTable t(5);
  EXPECT_EQ(t.slot_count(), 5u);
  EXPECT_EQ(t.free_slots(), 5u);
  for (SlotId want = 0; want < 5; ++want) {
    auto got = t.Allocate();
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(*got, want);
    EXPECT_EQ(t.PinsOf(*got), 1u);
    EXPECT_FALSE(t.IsPublished(*got));
  }
  EXPECT_FALSE(t.Allocate().has_value());
  EXPECT_EQ(t.pinned_slots(), 5u);
  ExpectValid(t);
}

TEST(SlotTableTest, MostRecentlyFreedIsReusedFirst) {
  SlotTable t(4);
  SlotId a = *t.Allocate(), b = *t.Allocate();
  t.Unpin(a);  // abandoned writes
  t.Unpin(b);
  EXPECT_EQ(*t.Allocate(), b);
  EXPECT_EQ(*t.Allocate(), a);
  ExpectValid(t);
}

TEST(SlotTableTest, LruOrderFollowsUnpins) {
  SlotTable t(4);
  std::vector<SlotId> s;
  for (uint32_t i = 0; i < 4; ++i) {
    s.push_back(*t.Allocate());
    t.Publish(s.back(), Key(i));
    t.Unpin(s.back());
  }
  EXPECT_EQ(t.evictable_slots(), 4u);
  EXPECT_EQ(*t.LruVictim(), s[0]);
  t.Pin(s[0]);
  EXPECT_EQ(*t.LruVictim(), s[1]);
  EXPECT_EQ(t.evictable_slots(), 3u);
  t.Unpin(s[0]);  // now the most recently used
  t.Pin(s[1]);
  t.Unpin(s[1]);
  EXPECT_EQ(*t.LruVictim(), s[2]);
  EXPECT_EQ(t.KeyOf(*t.LruVictim()), Key(2));
  ExpectValid(t);
}

TEST(SlotTableTest, DirtySlotsAreNotVictimsUntilClean) {
  SlotTable t(3);
  SlotId dirty_a = *t.Allocate(), dirty_b = *t.Allocate(), clean = *t.Allocate();
  t.Publish(dirty_a, Key(0), /*dirty=*/true);
  t.Publish(dirty_b, Key(1), /*dirty=*/true);
  t.Publish(clean, Key(2));
  for (SlotId s : {dirty_a, dirty_b, clean}) t.Unpin(s);
  EXPECT_EQ(t.dirty_slots(), 2u);
  EXPECT_EQ(t.dirty_unpinned_slots(), 2u);
  EXPECT_EQ(t.evictable_slots(), 1u);
  EXPECT_EQ(*t.LruVictim(), clean);
  EXPECT_EQ(*t.DirtyLruOldest(), dirty_a);
  t.MarkClean(dirty_a);  // written back: evictable, as the most recently used clean slot
  EXPECT_FALSE(t.IsDirty(dirty_a));
  EXPECT_EQ(t.dirty_slots(), 1u);
  EXPECT_EQ(*t.DirtyLruOldest(), dirty_b);
  EXPECT_EQ(*t.LruVictim(), clean);
  t.Retire(clean);
  EXPECT_EQ(*t.LruVictim(), dirty_a);
  t.MarkClean(dirty_a);  // already clean: nothing changes
  EXPECT_EQ(t.evictable_slots(), 1u);
  ExpectValid(t);
}

TEST(SlotTableTest, MarkCleanOfPinnedAndRetiredSlots) {
  SlotTable t(2);
  SlotId s = *t.Allocate();
  t.Publish(s, Key(0), true);  // still pinned by its writer
  t.MarkClean(s);
  EXPECT_EQ(t.dirty_slots(), 0u);
  EXPECT_EQ(t.evictable_slots(), 0u);  // pinned: on no list
  t.Unpin(s);
  EXPECT_EQ(*t.LruVictim(), s);

  SlotId r = *t.Allocate();
  t.Publish(r, Key(1), true);
  t.Retire(r);  // replaced while the write-back still holds it
  EXPECT_EQ(t.dirty_slots(), 0u);
  t.MarkClean(r);  // the write-back finishes
  EXPECT_EQ(t.free_slots(), 0u);
  t.Unpin(r);
  EXPECT_EQ(t.free_slots(), 1u);
  ExpectValid(t);
}

TEST(SlotTableTest, RetireDefersWhilePinned) {
  SlotTable t(2);
  SlotId s = *t.Allocate();
  t.Publish(s, Key(7));
  t.Pin(s);
  t.Unpin(s);
  t.Retire(s);
  EXPECT_FALSE(t.IsPublished(s));
  EXPECT_FALSE(t.IsFree(s));
  EXPECT_EQ(t.free_slots(), 1u);
  EXPECT_EQ(t.published_slots(), 0u);
  ExpectValid(t);
  t.Unpin(s);
  EXPECT_TRUE(t.IsFree(s));
  EXPECT_EQ(t.free_slots(), 2u);
  EXPECT_EQ(t.pinned_slots(), 0u);
  ExpectValid(t);
}

TEST(SlotTableTest, MisuseAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        SlotTable t(2);
        t.Unpin(0);
      },
      "unpin of an unpinned slot");
  EXPECT_DEATH(
      {
        SlotTable t(2);
        t.Publish(1, Key(0));
      },
      "publish of a slot not freshly allocated");
  EXPECT_DEATH(
      {
        SlotTable t(2, "device tier");
        t.Pin(2);
      },
      "device tier invariant broken: slot out of range");
  EXPECT_DEATH(
      {
        SlotTable t(2);
        SlotId s = *t.Allocate();
        t.Retire(s);
        t.Retire(s);
      },
      "retire of a dead slot");
}

// The table against a model: each slot's state, pins, dirty flag and key, and the two
// LRU orders as lists (front = most recently used), under random operations.
class Model {
 public:
  enum State { kFree, kUnpublished, kPublished, kRetired };
  struct Slot {
    State state = kFree;
    uint32_t pins = 0;
    bool dirty = false;
    uint32_t group = 0;
  };

  explicit Model(uint32_t n) : slots_(n) {}

  std::vector<Slot> slots_;
  std::list<SlotId> lru_[2];

  void Listed(SlotId s) { lru_[slots_[s].dirty].push_front(s); }
  void Unlisted(SlotId s) { lru_[slots_[s].dirty].remove(s); }
  bool OnList(SlotId s) const { return slots_[s].state == kPublished && slots_[s].pins == 0; }
  // The least recently used slot of list `dirty` in `group`.
  std::optional<SlotId> GroupTail(int dirty, uint32_t group) const {
    for (auto it = lru_[dirty].rbegin(); it != lru_[dirty].rend(); ++it) {
      if (slots_[*it].group == group) return *it;
    }
    return std::nullopt;
  }
};

TEST(SlotTableTest, RandomOperationsMatchModel) {
  constexpr uint32_t kSlots = 24;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  SlotTable t(kSlots);
  Model m(kSlots);
  auto pick = [&](auto pred) -> std::optional<SlotId> {
    std::vector<SlotId> c;
    for (SlotId s = 0; s < kSlots; ++s) {
      if (pred(m.slots_[s])) c.push_back(s);
    }
    if (c.empty()) return std::nullopt;
    return c[rng() % c.size()];
  };
  for (int step = 0; step < 30000; ++step) {
    switch (rng() % 8) {
      case 0: {  // Allocate
        auto s = t.Allocate();
        bool any_free = std::any_of(m.slots_.begin(), m.slots_.end(),
                                    [](const Model::Slot& x) { return x.state == Model::kFree; });
        ASSERT_EQ(s.has_value(), any_free);
        if (s) {
          ASSERT_EQ(m.slots_[*s].state, Model::kFree);
          m.slots_[*s] = {Model::kUnpublished, 1, false};
        }
        break;
      }
      case 1: {  // Publish
        auto s = pick([](const Model::Slot& x) { return x.state == Model::kUnpublished; });
        if (!s) break;
        const bool dirty = rng() % 2;
        const uint32_t group = static_cast<uint32_t>(rng() % 3);  // 0: none
        t.Publish(*s, Key(*s), dirty, group);
        m.slots_[*s].state = Model::kPublished;
        m.slots_[*s].dirty = dirty;
        m.slots_[*s].group = group;
        break;
      }
      case 2: {  // Pin
        auto s = pick([](const Model::Slot& x) { return x.state != Model::kFree; });
        if (!s) break;
        if (m.OnList(*s)) m.Unlisted(*s);
        t.Pin(*s);
        ++m.slots_[*s].pins;
        break;
      }
      case 3:
      case 4: {  // Unpin
        auto s = pick([](const Model::Slot& x) { return x.pins > 0; });
        if (!s) break;
        t.Unpin(*s);
        Model::Slot& x = m.slots_[*s];
        if (--x.pins == 0) {
          if (x.state == Model::kPublished) m.Listed(*s);
          if (x.state == Model::kUnpublished || x.state == Model::kRetired) x = {};
        }
        break;
      }
      case 5: {  // Retire
        auto s = pick([](const Model::Slot& x) {
          return x.state == Model::kPublished || x.state == Model::kUnpublished;
        });
        if (!s) break;
        if (m.OnList(*s)) m.Unlisted(*s);
        t.Retire(*s);
        Model::Slot& x = m.slots_[*s];
        if (x.pins == 0) {
          x = {};
        } else {
          x.state = Model::kRetired;
        }
        break;
      }
      case 6: {  // MarkClean
        auto s = pick([](const Model::Slot& x) {
          return x.state == Model::kPublished || x.state == Model::kRetired;
        });
        if (!s) break;
        const bool listed = m.OnList(*s) && m.slots_[*s].dirty;
        if (listed) m.Unlisted(*s);
        t.MarkClean(*s);
        m.slots_[*s].dirty = false;
        if (listed) m.Listed(*s);
        break;
      }
      case 7: {  // Victims
        auto v = t.LruVictim();
        auto d = t.DirtyLruOldest();
        ASSERT_EQ(v.has_value(), !m.lru_[0].empty());
        ASSERT_EQ(d.has_value(), !m.lru_[1].empty());
        if (v) {
          ASSERT_EQ(*v, m.lru_[0].back());
        }
        if (d) {
          ASSERT_EQ(*d, m.lru_[1].back());
        }
        for (uint32_t g = 1; g <= 3; ++g) {  // group 3 is never used
          ASSERT_EQ(t.LruVictim(g), m.GroupTail(0, g)) << "group " << g;
          ASSERT_EQ(t.DirtyLruOldest(g), m.GroupTail(1, g)) << "group " << g;
        }
        break;
      }
    }
    uint32_t free = 0, published = 0, pinned = 0, dirty = 0;
    for (SlotId s = 0; s < kSlots; ++s) {
      const Model::Slot& x = m.slots_[s];
      free += x.state == Model::kFree;
      published += x.state == Model::kPublished;
      pinned += x.pins > 0;
      dirty += x.state == Model::kPublished && x.dirty;
      ASSERT_EQ(t.PinsOf(s), x.pins) << "slot " << s;
      ASSERT_EQ(t.IsPublished(s), x.state == Model::kPublished) << "slot " << s;
      if (x.state == Model::kPublished) {
        ASSERT_EQ(t.KeyOf(s), Key(s));
      }
    }
    ASSERT_EQ(t.free_slots(), free);
    ASSERT_EQ(t.published_slots(), published);
    ASSERT_EQ(t.pinned_slots(), pinned);
    ASSERT_EQ(t.dirty_slots(), dirty);
    ASSERT_EQ(t.evictable_slots(), m.lru_[0].size());
    ASSERT_EQ(t.dirty_unpinned_slots(), m.lru_[1].size());
    if (step % 64 == 0) {
      ASSERT_TRUE(t.Validate().ok()) << t.Validate().ToString();
    }
  }
  ExpectValid(t);
}

}  // namespace
}  // namespace kvtier
