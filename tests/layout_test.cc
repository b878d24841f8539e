#include "kvtier/layout.h"

#include <gtest/gtest.h>

#include <set>

namespace kvtier {
namespace {

TEST(LayoutTest, Llama2And3Sizes) {
  ModelLayout l2 = ModelLayout::Llama2_7B();
  ASSERT_TRUE(l2.Validate().ok());
  EXPECT_EQ(l2.BytesPerToken(), 524288u);  // 0.5 MiB per token
  ModelLayout l3 = ModelLayout::Llama3_8B();
  ASSERT_TRUE(l3.Validate().ok());
  EXPECT_EQ(l3.BytesPerToken(), 131072u);  // 128 KiB per token
  EXPECT_EQ(l3.BytesPerBlock(), 524288u);  // 8 heads * 128 tokens * 128 dims * 2 B * (K+V)
  EXPECT_EQ(l3.KeyBytesPerBlock() * 2, l3.BytesPerBlock());
  EXPECT_EQ(l3.QueryGroupSize(), 4u);
  // 128K tokens of Llama-3-8B: 16 GiB.
  EXPECT_EQ(l3.BytesPerToken() * 131072, uint64_t{16} << 30);
}

TEST(LayoutTest, BlockArithmeticAcrossShapes) {
  for (DType dt : {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3}) {
    for (uint32_t head_dim : {64u, 128u, 256u}) {
      for (uint32_t tokens : {16u, 128u, 256u}) {
        ModelLayout l{.num_layers = 28,
                      .num_kv_heads = 4,
                      .num_query_heads = 28,
                      .head_dim = head_dim,
                      .dtype = dt,
                      .block_tokens = tokens};
        ASSERT_TRUE(l.Validate().ok()) << l.ToString();
        EXPECT_EQ(l.BytesPerBlock(), 2ull * 4 * head_dim * tokens * DTypeBytes(dt));
        EXPECT_EQ(l.BytesPerToken() * tokens, l.BytesPerBlock() * 28);
        EXPECT_EQ(l.QueryGroupSize(), 7u);  // Qwen2-7B-like group of 7
      }
    }
  }
}

TEST(LayoutTest, RejectsZerosAndBadGroups) {
  ModelLayout base = ModelLayout::Llama3_8B();
  for (uint32_t ModelLayout::*field :
       {&ModelLayout::num_layers, &ModelLayout::num_kv_heads, &ModelLayout::num_query_heads,
        &ModelLayout::head_dim, &ModelLayout::block_tokens}) {
    ModelLayout l = base;
    l.*field = 0;
    Status s = l.Validate();
    EXPECT_TRUE(s.IsInvalidArgument());
    EXPECT_NE(s.message().find("is 0"), std::string::npos) << s.message();
  }
  ModelLayout gqa = base;
  gqa.num_query_heads = 30;  // not a multiple of 8
  EXPECT_TRUE(gqa.Validate().IsInvalidArgument());
  ModelLayout dt = base;
  dt.dtype = static_cast<DType>(42);
  EXPECT_TRUE(dt.Validate().IsInvalidArgument());
}

TEST(LayoutTest, RejectsOverflowAndAbsurdBlocks) {
  ModelLayout huge{.num_layers = 1,
                   .num_kv_heads = 0xFFFFFFFF,
                   .num_query_heads = 0xFFFFFFFF,
                   .head_dim = 0xFFFFFFFF,
                   .dtype = DType::kF32,
                   .block_tokens = 0xFFFFFFFF};
  Status s = huge.Validate();
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("overflow"), std::string::npos) << s.message();

  ModelLayout big = ModelLayout::Llama3_8B();
  big.block_tokens = 1 << 20;  // 4 GiB blocks
  s = big.Validate();
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("exceeds"), std::string::npos) << s.message();
}

TEST(LayoutTest, FingerprintIsStableAndDistinguishes) {
  // Golden values: fingerprints are stored in catalogs on disk, so a change to the
  // encoding or the hash must be deliberate (and bump the encoding's version tag).
  EXPECT_EQ(ModelLayout::Llama3_8B().Fingerprint(), 0x480fdf27313614fbull);
  EXPECT_EQ(ModelLayout::Llama2_7B().Fingerprint(), 0xcfb1479bdaf023b8ull);
  std::set<uint64_t> seen;
  ModelLayout base = ModelLayout::Llama3_8B();
  seen.insert(base.Fingerprint());
  for (int field = 0; field < 6; ++field) {
    ModelLayout l = base;
    switch (field) {
      case 0:
        l.num_layers = 33;
        break;
      case 1:
        l.num_kv_heads = 16;
        break;
      case 2:
        l.num_query_heads = 64;
        break;
      case 3:
        l.head_dim = 64;
        break;
      case 4:
        l.dtype = DType::kF16;
        break;
      case 5:
        l.block_tokens = 64;
        break;
    }
    EXPECT_TRUE(seen.insert(l.Fingerprint()).second) << "field " << field;
  }
}

TEST(LayoutTest, DTypeNames) {
  for (DType dt : {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3}) {
    Result<DType> parsed = ParseDType(DTypeName(dt));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, dt);
  }
  EXPECT_EQ(*ParseDType("bfloat16"), DType::kBF16);
  EXPECT_TRUE(ParseDType("int4").status().IsInvalidArgument());
}

}  // namespace
}  // namespace kvtier
