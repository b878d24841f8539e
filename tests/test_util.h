// Helpers shared by the store tests: a small layout and self-checking block contents.
#ifndef KVTIER_TESTS_TEST_UTIL_H_
#define KVTIER_TESTS_TEST_UTIL_H_

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/pattern.h"
#include "kvtier/block_key.h"
#include "kvtier/layout.h"

namespace kvtier::testing {

// 4 layers, 2 KV heads, 4 query heads, head dim 64, f16, 16-token blocks: 8 KiB blocks.
inline ModelLayout SmallLayout() {
  return ModelLayout{.num_layers = 4,
                     .num_kv_heads = 2,
                     .num_query_heads = 4,
                     .head_dim = 64,
                     .dtype = DType::kF16,
                     .block_tokens = 16};
}

inline BlockKey Key(uint64_t sequence, uint32_t layer, uint32_t block, uint32_t ns = 0) {
  return BlockKey{.namespace_id = ns, .sequence = {0, sequence}, .layer = layer, .block = block};
}

// Block contents that name their key and version: pattern bytes seeded by both.
inline uint64_t ContentSeed(const BlockKey& key, uint64_t version) {
  return PatternWord(BlockKeyHash{}(key), version);
}

inline std::vector<std::byte> MakeBlock(uint64_t bytes, const BlockKey& key, uint64_t version) {
  std::vector<std::byte> block(bytes);
  (void)FillPatternRef(ContentSeed(key, version), block.data(), bytes, nullptr);
  return block;
}

inline bool HoldsVersion(std::span<const std::byte> block, const BlockKey& key, uint64_t version) {
  return FindPatternMismatch(ContentSeed(key, version), block.data(), block.size()) == block.size();
}

}  // namespace kvtier::testing

#endif  // KVTIER_TESTS_TEST_UTIL_H_
