#include "kernels/pattern.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

namespace kvtier {
namespace {

TEST(PatternTest, MatchesNaiveDefinition) {
  // Naive: byte i is byte (i % 8) of the little-endian word i / 8.
  for (uint64_t bytes : {0ull, 1ull, 7ull, 8ull, 13ull, 4096ull, 4099ull}) {
    std::vector<unsigned char> out(bytes + 1, 0xEE);
    ASSERT_TRUE(FillPatternRef(42, out.data(), bytes, nullptr).ok());
    for (uint64_t i = 0; i < bytes; ++i) {
      uint64_t w = PatternWord(42, i / 8);
      ASSERT_EQ(out[i], static_cast<unsigned char>(w >> (8 * (i % 8)))) << bytes << " " << i;
    }
    EXPECT_EQ(out[bytes], 0xEE);  // nothing written past the end
  }
}

TEST(PatternTest, SeedsDifferAndLookRandom) {
  std::vector<uint64_t> a(1024), b(1024);
  ASSERT_TRUE(FillPatternRef(1, a.data(), 8192, nullptr).ok());
  ASSERT_TRUE(FillPatternRef(2, b.data(), 8192, nullptr).ok());
  int equal = 0, zero_words = 0;
  uint64_t ones = 0;
  for (int i = 0; i < 1024; ++i) {
    equal += a[i] == b[i];
    zero_words += a[i] == 0;
    ones += __builtin_popcountll(a[i]);
  }
  EXPECT_EQ(equal, 0);
  EXPECT_EQ(zero_words, 0);
  EXPECT_NEAR(double(ones) / (1024 * 64), 0.5, 0.01);
}

TEST(PatternTest, FindMismatchLocatesTheFirstWrongByte) {
  std::vector<unsigned char> buf(1003);
  ASSERT_TRUE(FillPatternRef(9, buf.data(), buf.size(), nullptr).ok());
  EXPECT_EQ(FindPatternMismatch(9, buf.data(), buf.size()), buf.size());
  EXPECT_EQ(FindPatternMismatch(10, buf.data(), buf.size()), 0u);
  for (size_t at : {0u, 5u, 8u, 500u, 1001u, 1002u}) {
    std::vector<unsigned char> bad = buf;
    bad[at] ^= 0x10;
    EXPECT_EQ(FindPatternMismatch(9, bad.data(), bad.size()), at);
  }
}

TEST(PatternTest, NullDestinationIsAnError) {
  EXPECT_TRUE(FillPatternRef(1, nullptr, 8, nullptr).IsInvalidArgument());
  EXPECT_TRUE(FillPatternRef(1, nullptr, 0, nullptr).ok());
}

}  // namespace
}  // namespace kvtier
