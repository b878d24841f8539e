#include "kvtier/block_key.h"

#include <gtest/gtest.h>

#include <random>
#include <unordered_set>

namespace kvtier {
namespace {

TEST(SequenceIdTest, HexRoundTrip) {
  std::mt19937_64 rng(11);
  for (int i = 0; i < 100; ++i) {
    SequenceId id{rng(), rng()};
    std::string hex = id.ToHex();
    ASSERT_EQ(hex.size(), 32u);
    Result<SequenceId> back = SequenceId::ParseHex(hex);
    ASSERT_TRUE(back.ok()) << hex;
    EXPECT_EQ(*back, id);
  }
  EXPECT_EQ(SequenceId::FromU64(255).ToHex(), "000000000000000000000000000000ff");
}

TEST(SequenceIdTest, ParseHexRejectsBadInput) {
  EXPECT_TRUE(SequenceId::ParseHex("abc").status().IsInvalidArgument());
  EXPECT_TRUE(SequenceId::ParseHex(std::string(31, '0') + "g").status().IsInvalidArgument());
  EXPECT_TRUE(SequenceId::ParseHex(std::string(33, '0')).status().IsInvalidArgument());
}

TEST(SequenceIdTest, ContentIdsDependOnEveryByte) {
  std::vector<uint32_t> tokens(512);
  std::mt19937 rng(5);
  for (auto& t : tokens) t = rng() % 128000;
  SequenceId a = SequenceId::FromBytes(tokens.data(), tokens.size() * 4);
  EXPECT_EQ(a, SequenceId::FromBytes(tokens.data(), tokens.size() * 4));
  tokens[300] ^= 1;
  EXPECT_NE(a, SequenceId::FromBytes(tokens.data(), tokens.size() * 4));
  EXPECT_NE(a, SequenceId::FromBytes(tokens.data(), tokens.size() * 4 - 4));
}

TEST(BlockKeyTest, OrderingGroupsSequencesThenLayers) {
  BlockKey a{.namespace_id = 1, .sequence = {0, 5}, .layer = 2, .block = 9};
  BlockKey b = a;
  b.block = 10;
  BlockKey c = a;
  c.layer = 3;
  c.block = 0;
  BlockKey d = a;
  d.sequence.lo = 6;
  d.layer = 0;
  EXPECT_LT(a, b);
  EXPECT_LT(b, c);
  EXPECT_LT(c, d);
  EXPECT_EQ(a.ToString(), "1/00000000000000000000000000000005/2/9");
}

TEST(BlockKeyTest, HashSpreadsNeighbours) {
  std::unordered_set<size_t> hashes;
  BlockKeyHash h;
  for (uint32_t layer = 0; layer < 32; ++layer) {
    for (uint32_t block = 0; block < 256; ++block) {
      hashes.insert(
          h(BlockKey{.namespace_id = 0, .sequence = {0, 1}, .layer = layer, .block = block}));
    }
  }
  EXPECT_EQ(hashes.size(), 32u * 256u);
}

}  // namespace
}  // namespace kvtier
