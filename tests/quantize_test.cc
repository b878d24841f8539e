// QuantizeBlocksRef / DequantizeBlocksRef: scales, codes and round-trip error against
// formulas written out here, on fresh random blocks.
#include "kernels/quantize.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/dtype_convert.h"

namespace kvtier {
namespace {

struct Shape {
  uint32_t kv_heads, block_tokens, head_dim;
  uint64_t elements() const { return 2ull * kv_heads * block_tokens * head_dim; }
  uint64_t half() const { return elements() / 2; }  // where the values start
  uint64_t Index(uint32_t h, uint32_t t, uint32_t d) const {
    return (uint64_t{h} * block_tokens + t) * head_dim + d;
  }
  uint64_t scale_count() const { return uint64_t{kv_heads} * (head_dim + block_tokens); }
  std::string ToString() const {
    return "kv_heads=" + std::to_string(kv_heads) +
           " block_tokens=" + std::to_string(block_tokens) +
           " head_dim=" + std::to_string(head_dim);
  }
};

uint64_t FreshSeed() { return std::random_device{}(); }

// Blocks (as bytes of `dtype`) plus everything needed to quantize and dequantize them.
struct Batch {
  Shape s;
  DType dtype;
  std::vector<std::vector<unsigned char>> src, payload, back;
  std::vector<std::vector<float>> scales;
  std::vector<const void*> src_ptrs, payload_ptrs;
  std::vector<void*> payload_out, back_out;
  std::vector<float*> scale_out;
  std::vector<const float*> scale_in;

  Batch(const Shape& shape, DType dt, int count) : s(shape), dtype(dt) {
    src.resize(count);
    payload.resize(count);
    back.resize(count);
    scales.resize(count);
    for (int i = 0; i < count; ++i) {
      src[i].resize(s.elements() * DTypeBytes(dtype));
      payload[i].assign(s.elements(), 0xAB);
      scales[i].assign(s.scale_count(), std::nanf(""));
    }
    Refresh();
  }
  void Refresh() {
    src_ptrs.clear();
    payload_ptrs.clear();
    payload_out.clear();
    scale_out.clear();
    scale_in.clear();
    for (size_t i = 0; i < src.size(); ++i) {
      src_ptrs.push_back(src[i].data());
      payload_ptrs.push_back(payload[i].data());
      payload_out.push_back(payload[i].data());
      scale_out.push_back(scales[i].data());
      scale_in.push_back(scales[i].data());
    }
  }
  uint32_t size() const { return static_cast<uint32_t>(src.size()); }
  float X(int b, uint64_t i) const { return LoadAsFloat(src[b].data(), i, dtype); }
  void Set(int b, uint64_t i, float v) { StoreFromFloat(src[b].data(), i, dtype, v); }
  Status Quantize() {
    return QuantizeBlocksRef(src_ptrs.data(), dtype, size(), s.kv_heads, s.block_tokens, s.head_dim,
                             payload_out.data(), scale_out.data(), nullptr);
  }
  Status Dequantize(DType out_dtype) {
    back_out.clear();
    for (size_t i = 0; i < src.size(); ++i) {
      back[i].assign(s.elements() * DTypeBytes(out_dtype), 0xCD);
      back_out.push_back(back[i].data());
    }
    return DequantizeBlocksRef(payload_ptrs.data(), scale_in.data(), size(), s.kv_heads,
                               s.block_tokens, s.head_dim, out_dtype, back_out.data(), nullptr);
  }
  float KeyScale(int b, uint32_t h, uint32_t d) const { return scales[b][h * s.head_dim + d]; }
  float ValueScale(int b, uint32_t h, uint32_t t) const {
    return scales[b][uint64_t{s.kv_heads} * s.head_dim + h * s.block_tokens + t];
  }
  // The scale that applies to element i of block b.
  float ScaleOf(int b, uint64_t i) const {
    const bool value = i >= s.half();
    const uint64_t j = value ? i - s.half() : i;
    const uint32_t h = static_cast<uint32_t>(j / (uint64_t{s.block_tokens} * s.head_dim));
    const uint32_t t = static_cast<uint32_t>(j / s.head_dim % s.block_tokens);
    const uint32_t d = static_cast<uint32_t>(j % s.head_dim);
    return value ? ValueScale(b, h, t) : KeyScale(b, h, d);
  }
};

void FillRandom(Batch& batch, std::mt19937_64& rng, float magnitude) {
  std::normal_distribution<float> dist(0.0f, magnitude);
  for (uint32_t b = 0; b < batch.size(); ++b) {
    for (uint64_t i = 0; i < batch.s.elements(); ++i) {
      float v = dist(rng);
      if (v == 0.0f) v = magnitude;
      batch.Set(b, i, v);
    }
  }
}

// The scales written out: amax over a key channel's tokens / a value token's channels,
// divided by 448 (double then float: that is the correctly rounded float quotient).
void ExpectScalesAreAmaxOver448(const Batch& batch) {
  const Shape& s = batch.s;
  auto expected = [](double amax) { return amax == 0 ? 1.0f : float(amax / 448.0); };
  for (uint32_t b = 0; b < batch.size(); ++b) {
    for (uint32_t h = 0; h < s.kv_heads; ++h) {
      for (uint32_t d = 0; d < s.head_dim; ++d) {
        double amax = 0;
        for (uint32_t t = 0; t < s.block_tokens; ++t) {
          const double x = batch.X(b, s.Index(h, t, d));
          if (std::isfinite(x)) amax = std::max(amax, std::fabs(x));
        }
        ASSERT_EQ(batch.KeyScale(b, h, d), expected(amax)) << "key scale " << h << "," << d;
      }
      for (uint32_t t = 0; t < s.block_tokens; ++t) {
        double amax = 0;
        for (uint32_t d = 0; d < s.head_dim; ++d) {
          const double x = batch.X(b, s.half() + s.Index(h, t, d));
          if (std::isfinite(x)) amax = std::max(amax, std::fabs(x));
        }
        ASSERT_EQ(batch.ValueScale(b, h, t), expected(amax)) << "value scale " << h << "," << t;
      }
    }
  }
}

// Every code is the fp8 value nearest x / scale (ties to an even code, beyond 448
// saturated): checked against all 254 finite codes.
void ExpectCodesAreNearest(const Batch& batch) {
  for (uint32_t b = 0; b < batch.size(); ++b) {
    for (uint64_t i = 0; i < batch.s.elements(); ++i) {
      const float x = batch.X(b, i);
      const uint8_t code = batch.payload[b][i];
      if (std::isnan(x)) {
        ASSERT_EQ(code & 0x7F, 0x7F) << "NaN must stay NaN at " << i;
        continue;
      }
      const double y = double(x / batch.ScaleOf(b, i));
      double best = std::numeric_limits<double>::infinity();
      for (int c = 0; c < 256; ++c) {
        if ((c & 0x7F) == 0x7F) continue;
        best = std::min(best, std::fabs(double(Fp8E4M3BitsToFloat(uint8_t(c))) - y));
      }
      const double got = Fp8E4M3BitsToFloat(code);
      if (std::fabs(y) >= 448) {
        ASSERT_EQ(got, std::copysign(448.0, y)) << "saturation at " << i;
        continue;
      }
      ASSERT_EQ(std::fabs(got - y), best) << "not the nearest code at " << i << " x=" << x;
      if (best > 0) {  // a tie goes to the code with an even mantissa
        for (int neighbour : {code - 1, code + 1}) {
          if ((neighbour & 0x80) != (code & 0x80) || (neighbour & 0x7F) == 0x7F) continue;
          if (std::fabs(Fp8E4M3BitsToFloat(uint8_t(neighbour)) - y) == best) {
            ASSERT_EQ(code & 1, 0) << "tie not to even at " << i;
          }
        }
      }
    }
  }
}

// |x' - x| <= 2^-4 |x| + 2^-10 scale: three mantissa bits make half an ulp at most 2^-4
// of the value; below 2^-6 (subnormal) the step is 2^-9, half of it 2^-10. The float
// division and product add 2^-24 |x| each (2^-21 |x| covers them, with margin), and the
// destination dtype rounds once more: half an ulp, 2^-9 (bf16) or 2^-12 (f16) of |x'|,
// or half its subnormal step.
void ExpectRoundTripBound(const Batch& batch, DType out_dtype) {
  for (uint32_t b = 0; b < batch.size(); ++b) {
    for (uint64_t i = 0; i < batch.s.elements(); ++i) {
      const double x = batch.X(b, i);
      const double got = LoadAsFloat(batch.back[b].data(), i, out_dtype);
      if (!std::isfinite(x)) continue;
      ASSERT_FALSE(std::isnan(got)) << "NaN at " << i;
      const double scale = batch.ScaleOf(b, i);
      double bound = 0x1p-4 * std::fabs(x) + 0x1p-10 * scale + 0x1p-21 * std::fabs(x);
      if (out_dtype == DType::kBF16) bound += 0x1p-8 * std::fabs(got) + 0x1p-134;
      if (out_dtype == DType::kF16) bound += 0x1p-11 * std::fabs(got) + 0x1p-25;
      ASSERT_LE(std::fabs(got - x), bound) << "element " << i << " x=" << x << " scale=" << scale;
    }
  }
}

TEST(QuantizeTest, ScalesCodesAndRoundTripAcrossShapes) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
    for (Shape s : {Shape{1, 16, 64}, Shape{2, 128, 128}, Shape{3, 256, 256}, Shape{2, 32, 80},
                    Shape{1, 16, 1056}}) {
      SCOPED_TRACE(std::string(DTypeName(dtype)) + " " + s.ToString());
      Batch batch(s, dtype, 2);
      FillRandom(batch, rng, 0.5f);
      ASSERT_TRUE(batch.Quantize().ok());
      ExpectScalesAreAmaxOver448(batch);
      ExpectCodesAreNearest(batch);
      for (DType out : {DType::kF16, DType::kBF16, DType::kF32}) {
        SCOPED_TRACE(std::string("to ") + std::string(DTypeName(out)));
        ASSERT_TRUE(batch.Dequantize(out).ok());
        ExpectRoundTripBound(batch, out);
      }
      if (HasFailure()) return;
    }
  }
}

TEST(QuantizeTest, MagnitudesFromTinyToLarge) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (float magnitude : {1e-5f, 1e-2f, 30.0f, 3e4f}) {
    SCOPED_TRACE("magnitude " + std::to_string(magnitude));
    Batch batch(Shape{2, 16, 64}, DType::kF32, 1);
    FillRandom(batch, rng, magnitude);
    ASSERT_TRUE(batch.Quantize().ok());
    ExpectScalesAreAmaxOver448(batch);
    ExpectCodesAreNearest(batch);
    ASSERT_TRUE(batch.Dequantize(DType::kF32).ok());
    ExpectRoundTripBound(batch, DType::kF32);
  }
}

// A key channel 100x larger than the rest only coarsens itself: per-channel scales keep
// every other channel within its own bound.
TEST(QuantizeTest, OutlierKeyChannelLeavesTheOthersAlone) {
  std::mt19937_64 rng(FreshSeed());
  const Shape s{2, 64, 128};
  Batch batch(s, DType::kBF16, 1);
  FillRandom(batch, rng, 1.0f);
  const uint32_t outlier = 17;
  for (uint32_t h = 0; h < s.kv_heads; ++h) {
    for (uint32_t t = 0; t < s.block_tokens; ++t) {
      batch.Set(0, s.Index(h, t, outlier), 100.0f * batch.X(0, s.Index(h, t, outlier)));
    }
  }
  ASSERT_TRUE(batch.Quantize().ok());
  ExpectScalesAreAmaxOver448(batch);
  ASSERT_TRUE(batch.Dequantize(DType::kF32).ok());
  ExpectRoundTripBound(batch, DType::kF32);
  for (uint32_t h = 0; h < s.kv_heads; ++h) {
    for (uint32_t d = 0; d < s.head_dim; ++d) {
      if (d == outlier) continue;
      EXPECT_LT(batch.KeyScale(0, h, d), batch.KeyScale(0, h, outlier) / 10) << d;
      double err = 0, norm = 0;
      for (uint32_t t = 0; t < s.block_tokens; ++t) {
        const double x = batch.X(0, s.Index(h, t, d));
        err += std::fabs(LoadAsFloat(batch.back[0].data(), s.Index(h, t, d), DType::kF32) - x);
        norm += std::fabs(x);
      }
      EXPECT_LT(err / norm, 0x1p-4) << "channel " << d << " lost its precision";
    }
  }
}

TEST(QuantizeTest, ZerosAndNonFiniteValues) {
  std::mt19937_64 rng(FreshSeed());
  const Shape s{1, 16, 64};
  Batch batch(s, DType::kF16, 2);
  FillRandom(batch, rng, 1.0f);
  for (uint64_t i = 0; i < s.elements(); ++i) batch.Set(1, i, 0.0f);  // an all-zero block
  for (uint32_t t = 0; t < s.block_tokens; ++t) batch.Set(0, s.Index(0, t, 5), 0.0f);
  for (uint32_t d = 0; d < s.head_dim; ++d) batch.Set(0, s.half() + s.Index(0, 3, d), 0.0f);
  const float inf = std::numeric_limits<float>::infinity();
  batch.Set(0, s.Index(0, 2, 9), inf);
  batch.Set(0, s.Index(0, 4, 9), -inf);
  batch.Set(0, s.Index(0, 6, 11), std::nanf(""));
  batch.Set(0, s.half() + s.Index(0, 7, 1), std::nanf(""));
  ASSERT_TRUE(batch.Quantize().ok());
  ExpectScalesAreAmaxOver448(batch);  // infinities and NaN are left out of amax
  ExpectCodesAreNearest(batch);
  EXPECT_EQ(batch.KeyScale(0, 0, 5), 1.0f);
  EXPECT_EQ(batch.ValueScale(0, 0, 3), 1.0f);
  for (float sc : batch.scales[1]) EXPECT_EQ(sc, 1.0f);
  for (uint8_t code : batch.payload[1]) EXPECT_EQ(code, 0);
  ASSERT_TRUE(batch.Dequantize(DType::kF16).ok());
  ExpectRoundTripBound(batch, DType::kF16);
  const auto back = [&](uint64_t i) { return LoadAsFloat(batch.back[0].data(), i, DType::kF16); };
  // +-infinity saturates to +-448 * scale (then rounds to f16).
  const float top = HalfBitsToFloat(FloatToHalfBits(448.0f * batch.KeyScale(0, 0, 9)));
  EXPECT_EQ(back(s.Index(0, 2, 9)), top);
  EXPECT_EQ(back(s.Index(0, 4, 9)), -top);
  EXPECT_TRUE(std::isnan(back(s.Index(0, 6, 11))));
  EXPECT_TRUE(std::isnan(back(s.half() + s.Index(0, 7, 1))));
  for (uint64_t i = 0; i < s.elements(); ++i) {
    EXPECT_EQ(LoadAsFloat(batch.back[1].data(), i, DType::kF16), 0.0f);
  }
}

// Values that are fp8 codes times a power of two, with the amax of each group at 448
// times that power, come back bit for bit.
TEST(QuantizeTest, RepresentableValuesRoundTripExactly) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> code(0, 0xFD), exponent(-4, 4);
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
    const Shape s{2, 32, 64};
    Batch batch(s, dtype, 2);
    for (uint32_t b = 0; b < 2; ++b) {
      for (uint32_t h = 0; h < s.kv_heads; ++h) {
        // Keys: a power of two per channel; values: per token.
        std::vector<int> key_exp(s.head_dim), value_exp(s.block_tokens);
        for (int& e : key_exp) e = exponent(rng);
        for (int& e : value_exp) e = exponent(rng);
        for (uint32_t t = 0; t < s.block_tokens; ++t) {
          for (uint32_t d = 0; d < s.head_dim; ++d) {
            uint8_t c = uint8_t(code(rng));
            if ((c & 0x7F) == 0x7F) c = 0x7E;
            const float k = t == 1 ? 448.0f : Fp8E4M3BitsToFloat(c);
            const float v = d == 2 ? -448.0f : Fp8E4M3BitsToFloat(uint8_t(c ^ 0x80));
            batch.Set(b, s.Index(h, t, d), std::ldexp(k, key_exp[d]));
            batch.Set(b, s.half() + s.Index(h, t, d), std::ldexp(v, value_exp[t]));
          }
        }
      }
    }
    ASSERT_TRUE(batch.Quantize().ok());
    ExpectScalesAreAmaxOver448(batch);
    ASSERT_TRUE(batch.Dequantize(dtype).ok());
    for (uint32_t b = 0; b < 2; ++b) {
      ASSERT_EQ(batch.back[b], batch.src[b]) << DTypeName(dtype) << " block " << b;
    }
  }
}

TEST(QuantizeTest, FormatSizes) {
  EXPECT_EQ(QuantizedPayloadBytes(8, 128, 128), 2u * 8 * 128 * 128);
  EXPECT_EQ(QuantizedScaleBytes(8, 128, 128), 4u * 8 * (128 + 128));
  EXPECT_EQ(QuantizedBlockBytes(8, 128, 128), 2u * 8 * 128 * 128 + 4u * 8 * 256);
  EXPECT_EQ(QuantizedPayloadBytes(3, 16, 8) % 16, 0u);
  EXPECT_EQ(KeyScaleIndex(1, 5, 64), 69u);
  EXPECT_EQ(ValueScaleIndex(1, 5, 2, 16, 64), 2u * 64 + 16 + 5);
}

TEST(QuantizeTest, RejectsBadArguments) {
  const Shape s{1, 16, 64};
  Batch batch(s, DType::kF16, 1);
  const auto* src = batch.src_ptrs.data();
  auto* dst = batch.payload_out.data();
  auto* sc = batch.scale_out.data();
  auto q = [&](const void* const* a, DType dt, uint32_t n, uint32_t kv, uint32_t bt, uint32_t hd,
               void* const* d,
               float* const* c) { return QuantizeBlocksRef(a, dt, n, kv, bt, hd, d, c, nullptr); };
  EXPECT_TRUE(q(src, DType::kF16, 1, 1, 16, 64, dst, sc).ok());
  struct Bad {
    const char* what;
    Status status;
  } bad[] = {
      {"null src", q(nullptr, DType::kF16, 1, 1, 16, 64, dst, sc)},
      {"null dst", q(src, DType::kF16, 1, 1, 16, 64, nullptr, sc)},
      {"null scales", q(src, DType::kF16, 1, 1, 16, 64, dst, nullptr)},
      {"zero blocks", q(src, DType::kF16, 0, 1, 16, 64, dst, sc)},
      {"zero heads", q(src, DType::kF16, 1, 0, 16, 64, dst, sc)},
      {"zero tokens", q(src, DType::kF16, 1, 1, 0, 64, dst, sc)},
      {"head_dim not /8", q(src, DType::kF16, 1, 1, 16, 60, dst, sc)},
      {"fp8 source", q(src, DType::kFP8E4M3, 1, 1, 16, 64, dst, sc)},
      {"unknown dtype", q(src, DType(7), 1, 1, 16, 64, dst, sc)},
      {"huge block", q(src, DType::kF32, 1, 1u << 20, 1u << 12, 64, dst, sc)},
  };
  for (const Bad& x : bad) {
    EXPECT_TRUE(x.status.IsInvalidArgument()) << x.what << ": " << x.status.message();
    EXPECT_FALSE(x.status.message().empty()) << x.what;
  }
  void* null_dst[] = {nullptr};
  EXPECT_TRUE(q(src, DType::kF16, 1, 1, 16, 64, null_dst, sc).IsInvalidArgument());
  std::vector<unsigned char> out(s.elements() * 2);
  void* outs[] = {out.data()};
  EXPECT_TRUE(DequantizeBlocksRef(batch.payload_ptrs.data(), batch.scale_in.data(), 1, 1, 16, 64,
                                  DType::kFP8E4M3, outs, nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(DequantizeBlocksRef(batch.payload_ptrs.data(), nullptr, 1, 1, 16, 64, DType::kF16,
                                  outs, nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(DequantizeBlocksRef(batch.payload_ptrs.data(), batch.scale_in.data(), 1, 1, 16, 64,
                                  DType::kF16, outs, nullptr)
                  .ok());
}

TEST(QuantizeTest, LaunchWithoutDeviceIsAStatus) {
  if (cuda::HasDevice()) GTEST_SKIP() << "a device is present: the GPU tests cover Launch";
  Batch batch(Shape{1, 16, 64}, DType::kF16, 1);
  EXPECT_FALSE(LaunchQuantizeBlocks(batch.src_ptrs.data(), DType::kF16, 1, 1, 16, 64,
                                    batch.payload_out.data(), batch.scale_out.data(), nullptr)
                   .ok());
}

}  // namespace
}  // namespace kvtier
