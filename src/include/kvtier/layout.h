// ModelLayout: the shape of a model's KV cache, and the arithmetic of blocks.
//
// A block is one layer's keys and values for `block_tokens` consecutive tokens of one
// sequence. Its bytes are the keys, then the values, each laid out as
// [num_kv_heads][block_tokens][head_dim] elements of `dtype` (row-major, head_dim
// fastest). Every block of a store has the same size, BytesPerBlock().
//
// Thread safety: a value type.
#ifndef KVTIER_LAYOUT_H_
#define KVTIER_LAYOUT_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtier/status.h"

namespace kvtier {

// Element types of a KV cache. Stable numeric values (stored in the catalog and the
// layout fingerprint; exposed by the C API).
enum class DType : uint8_t {
  kF16 = 0,      // IEEE 754 binary16
  kBF16 = 1,     // bfloat16
  kF32 = 2,      // IEEE 754 binary32
  kFP8E4M3 = 3,  // OCP FP8 E4M3 (finite-only "fn" variant, as CUDA __nv_fp8_e4m3)
};

// Bytes per element: 2, 2, 4, 1. Zero for a value outside the enum.
uint32_t DTypeBytes(DType dtype);
// "f16", "bf16", "f32", "fp8-e4m3"; "unknown" for a value outside the enum.
std::string_view DTypeName(DType dtype);
// Inverse of DTypeName (also accepts "fp16", "float16", "bfloat16", "float32", "fp8").
Result<DType> ParseDType(std::string_view name);

// The largest block kvtier accepts: far above any real model (Llama-3-70B with
// 256-token blocks in bf16 is 1 MiB), small enough that offsets never overflow.
inline constexpr uint64_t kMaxBlockBytes = uint64_t{1} << 30;

struct ModelLayout {
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;
  // Query heads: a multiple of num_kv_heads (GQA group = query / kv heads; 1 = MHA).
  uint32_t num_query_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kBF16;
  uint32_t block_tokens = 128;

  // 32 layers, 8 KV heads, 32 query heads, head dim 128, bf16, 128-token blocks.
  static ModelLayout Llama3_8B();
  // 32 layers, 32 KV heads, 32 query heads, head dim 128, f16, 128-token blocks.
  static ModelLayout Llama2_7B();

  // OK when every field is non-zero and in range, query heads are a multiple of KV
  // heads, and every size below fits (a block at most kMaxBlockBytes). The size
  // functions below require a valid layout.
  Status Validate() const;

  // Bytes of the keys (equal to the values) of one layer, one token.
  uint64_t KeyBytesPerTokenPerLayer() const {
    return uint64_t{num_kv_heads} * head_dim * DTypeBytes(dtype);
  }
  // Bytes of keys and values of every layer for one token (LLaMA-2-7B f16: 524288).
  uint64_t BytesPerToken() const { return 2 * KeyBytesPerTokenPerLayer() * num_layers; }
  // Bytes of the keys of one block (the values are the same size, right after).
  uint64_t KeyBytesPerBlock() const { return KeyBytesPerTokenPerLayer() * block_tokens; }
  // Bytes of one block: keys and values of one layer, block_tokens tokens.
  uint64_t BytesPerBlock() const { return 2 * KeyBytesPerBlock(); }
  uint32_t QueryGroupSize() const { return num_query_heads / num_kv_heads; }

  // A stable 64-bit identity of the layout (the same on every machine and build), kept
  // in a store's catalog so a store is never reused with another layout.
  uint64_t Fingerprint() const;

  // "layers=32 kv_heads=8 query_heads=32 head_dim=128 dtype=bf16 block_tokens=128".
  std::string ToString() const;

  friend bool operator==(const ModelLayout&, const ModelLayout&) = default;
};

}  // namespace kvtier

#endif  // KVTIER_LAYOUT_H_
