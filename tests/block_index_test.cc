#include "src/core/block_index.h"

#include <gtest/gtest.h>

#include <map>
#include <random>

namespace kvtier {
namespace {

BlockKey Key(uint64_t seq, uint32_t layer, uint32_t block, uint32_t ns = 0) {
  return BlockKey{.namespace_id = ns, .sequence = {0, seq}, .layer = layer, .block = block};
}

TEST(BlockIndexTest, InsertFindErase) {
  BlockIndex index;
  auto [e, created] = index.Insert(Key(1, 0, 0));
  EXPECT_TRUE(created);
  e->host_slot = 5;
  auto [again, created2] = index.Insert(Key(1, 0, 0));
  EXPECT_FALSE(created2);
  EXPECT_EQ(again, e);
  EXPECT_EQ(index.Find(Key(1, 0, 0))->host_slot, 5u);
  EXPECT_EQ(index.Find(Key(1, 0, 1)), nullptr);
  index.Erase(e);
  EXPECT_EQ(index.Find(Key(1, 0, 0)), nullptr);
  EXPECT_EQ(index.size(), 0u);
  EXPECT_EQ(index.sequence_count(), 0u);
}

TEST(BlockIndexTest, EraseSequenceTakesOnlyThatSequence) {
  BlockIndex index;
  for (uint32_t l = 0; l < 4; ++l) {
    for (uint32_t b = 0; b < 10; ++b) {
      index.Insert(Key(1, l, b));
      index.Insert(Key(2, l, b));
      index.Insert(Key(1, l, b, /*ns=*/7));  // same sequence id, another namespace
    }
  }
  EXPECT_EQ(index.sequence_count(), 3u);
  uint64_t seen = 0;
  EXPECT_EQ(index.EraseSequence(0, {0, 1},
                                [&](BlockIndex::Entry& e) {
                                  EXPECT_EQ(e.key->sequence.lo, 1u);
                                  EXPECT_EQ(e.key->namespace_id, 0u);
                                  ++seen;
                                }),
            40u);
  EXPECT_EQ(seen, 40u);
  EXPECT_EQ(index.size(), 80u);
  EXPECT_EQ(index.Find(Key(1, 0, 0)), nullptr);
  EXPECT_NE(index.Find(Key(2, 0, 0)), nullptr);
  EXPECT_NE(index.Find(Key(1, 0, 0, 7)), nullptr);
  EXPECT_EQ(index.EraseSequence(0, {0, 1}, [](BlockIndex::Entry&) {}), 0u);
}

TEST(BlockIndexTest, RandomAgainstMap) {
  BlockIndex index;
  std::map<BlockKey, uint32_t> model;
  std::mt19937 rng(9);
  for (int step = 0; step < 50000; ++step) {
    BlockKey k = Key(rng() % 8, rng() % 4, rng() % 16);
    switch (rng() % 4) {
      case 0:
      case 1: {
        uint32_t v = rng() % 1000;
        index.Insert(k).first->host_slot = v;
        model[k] = v;
        break;
      }
      case 2:
        if (auto* e = index.Find(k)) {
          index.Erase(e);
        }
        model.erase(k);
        break;
      case 3: {
        if (rng() % 50 != 0) break;
        uint64_t n = index.EraseSequence(0, k.sequence, [](BlockIndex::Entry&) {});
        uint64_t m =
            std::erase_if(model, [&](auto& kv) { return kv.first.sequence == k.sequence; });
        ASSERT_EQ(n, m);
        break;
      }
    }
    ASSERT_EQ(index.size(), model.size());
  }
  for (auto& [k, v] : model) {
    auto* e = index.Find(k);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->host_slot, v);
  }
}

}  // namespace
}  // namespace kvtier
