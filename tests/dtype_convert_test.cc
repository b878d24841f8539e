#include "kernels/dtype_convert.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

namespace kvtier {
namespace {

TEST(DTypeConvertTest, HalfRoundTripsEveryValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = HalfBitsToFloat(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfBitsToFloat(FloatToHalfBits(f))));
      continue;
    }
    ASSERT_EQ(FloatToHalfBits(f), h) << std::hex << h;
  }
  EXPECT_EQ(HalfBitsToFloat(0x3C00), 1.0f);
  EXPECT_EQ(HalfBitsToFloat(0xC000), -2.0f);
  EXPECT_EQ(HalfBitsToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(HalfBitsToFloat(0x7BFF), 65504.0f);
}

TEST(DTypeConvertTest, HalfRoundsToNearestEven) {
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1).
  EXPECT_EQ(FloatToHalfBits(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 (odd) and 1 + 2^-9: up.
  EXPECT_EQ(FloatToHalfBits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  EXPECT_EQ(FloatToHalfBits(65520.0f), 0x7C00);  // rounds past the largest: infinity
  EXPECT_EQ(FloatToHalfBits(1e-9f), 0x0000);
  // Random floats: the result is the nearest half.
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-70000.0f, 70000.0f);
  for (int i = 0; i < 100000; ++i) {
    const float f = dist(rng) * (i % 3 == 0 ? 1e-4f : 1.0f);
    const uint16_t h = FloatToHalfBits(f);
    const float back = HalfBitsToFloat(h);
    if (std::isinf(back)) continue;
    const float up = HalfBitsToFloat(uint16_t(h + 1)), down = HalfBitsToFloat(uint16_t(h - 1));
    ASSERT_LE(std::fabs(back - f), std::fabs(up - f)) << f;
    ASSERT_LE(std::fabs(back - f), std::fabs(down - f)) << f;
  }
}

TEST(DTypeConvertTest, Bf16) {
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = Bf16BitsToFloat(uint16_t(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBf16Bits(f), b);
  }
  EXPECT_EQ(FloatToBf16Bits(1.0f + std::ldexp(1.0f, -8)), 0x3F80);  // tie to even
  EXPECT_EQ(FloatToBf16Bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
  EXPECT_TRUE(std::isnan(Bf16BitsToFloat(FloatToBf16Bits(std::nanf("")))));
}

TEST(DTypeConvertTest, Fp8E4M3) {
  int finite = 0;
  for (uint32_t v = 0; v < 0x100; ++v) {
    const float f = Fp8E4M3BitsToFloat(uint8_t(v));
    if (std::isnan(f)) {
      EXPECT_EQ(v & 0x7F, 0x7Fu);
      continue;
    }
    ++finite;
    if (v == 0x80) continue;  // -0 encodes as -0
    ASSERT_EQ(FloatToFp8E4M3Bits(f), v) << v;
  }
  EXPECT_EQ(finite, 254);
  EXPECT_EQ(Fp8E4M3BitsToFloat(0x7E), 448.0f);
  EXPECT_EQ(Fp8E4M3BitsToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(Fp8E4M3BitsToFloat(0x38), 1.0f);
  EXPECT_EQ(FloatToFp8E4M3Bits(1000.0f), 0x7E);   // saturates
  EXPECT_EQ(FloatToFp8E4M3Bits(-1000.0f), 0xFE);
  EXPECT_EQ(FloatToFp8E4M3Bits(1.0625f), 0x38);   // halfway 1 and 1.125: even (1)
  EXPECT_EQ(FloatToFp8E4M3Bits(1.1875f), 0x3A);   // halfway 1.125 and 1.25: even (1.25)
  // Random floats: the nearest representable value.
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> dist(-440.0f, 440.0f);
  for (int i = 0; i < 100000; ++i) {
    const float f = dist(rng) * (i % 4 == 0 ? 1e-3f : 1.0f);
    const float back = Fp8E4M3BitsToFloat(FloatToFp8E4M3Bits(f));
    float best = INFINITY;
    for (uint32_t v = 0; v < 0x100; ++v) {
      const float c = Fp8E4M3BitsToFloat(uint8_t(v));
      if (!std::isnan(c)) best = std::fmin(best, std::fabs(c - f));
    }
    ASSERT_EQ(std::fabs(back - f), best) << f;
  }
}

TEST(DTypeConvertTest, LoadStoreEveryDType) {
  unsigned char buf[64];
  for (DType dt : {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3}) {
    StoreFromFloat(buf, 3, dt, -1.5f);
    EXPECT_EQ(LoadAsFloat(buf, 3, dt), -1.5f) << DTypeName(dt);
  }
}

}  // namespace
}  // namespace kvtier
