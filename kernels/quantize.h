// FP8 (E4M3) quantization of kvtier blocks with per-channel key scales and per-token
// value scales, for a compressed cold tier: about half the bytes of an f16/bf16 block.
//
// Compressed block format (what the cold tier stores per block, little-endian):
//   payload  QuantizedPayloadBytes() = 2 * kv_heads * block_tokens * head_dim bytes:
//            the keys, then the values, each [kv_heads][block_tokens][head_dim] fp8-e4m3
//            codes (OCP "fn": no infinity, 0x7F/0xFF NaN), the layout of an fp8 kvtier
//            block, holding element / scale.
//   scales   QuantizedScaleBytes() = 4 * kv_heads * (head_dim + block_tokens) bytes of
//            float32: first the key scales [kv_heads][head_dim] (one per KV head and
//            channel, over the block's tokens), then the value scales
//            [kv_heads][block_tokens] (one per KV head and token, over its channels).
// A record of QuantizedBlockBytes() is the payload followed by the scales; the payload
// size is a multiple of 16 bytes, so the scales stay aligned when a caller places them
// right after it (scales[i] = dst_blocks[i] + QuantizedPayloadBytes()).
//
// Per-channel key scales keep an outlier channel (keys have a few channels far larger
// than the rest) from flattening the others; values have no such channels but vary
// from token to token.
//
// Element rules (QuantScaleFromAmax, QuantizeElement, DequantizeElement below), the same
// bit for bit in the reference and the kernel:
//   amax  = the largest |x| over the group's finite elements (NaN and infinities skipped);
//   scale = amax / 448 (float division, rounded to nearest), or 1 when that is 0 (an
//           all-zero group, or amax below 448 * 2^-149): zeros quantize to 0 either way;
//   code  = fp8(x / scale), rounded to nearest even, saturated to +-448 (so +-infinity
//           becomes +-448 * scale); NaN stays NaN;
//   x'    = float(code) * scale, then rounded to the destination dtype.
// Error: for a finite x, |x' - x| <= 2^-4 |x| + 2^-10 scale (3 mantissa bits: half an
// ulp is at most 2^-4 of the value; the subnormal step is 2^-9), plus float rounding of
// the division and the product (a few 2^-24 |x|), plus the destination dtype's rounding.
// Every tensor of a block takes part, tokens past a partial block's valid count included:
// keep them zero (or finite) so they do not inflate the key scales.
//
// Thread safety: the functions are pure; concurrent calls on distinct outputs are safe.
#ifndef KVTIER_KERNELS_QUANTIZE_H_
#define KVTIER_KERNELS_QUANTIZE_H_

#include <cstdint>
#include <string>

#include "kernels/dtype_convert.h"
#include "kernels/host_device.h"
#include "kvtier/layout.h"
#include "kvtier/status.h"

namespace kvtier {

// The largest finite fp8-e4m3 value: an amax maps to it.
inline constexpr float kFp8E4M3Max = 448.0f;

KVTIER_HOST_DEVICE uint64_t QuantizedPayloadBytes(uint32_t kv_heads, uint32_t block_tokens,
                                                  uint32_t head_dim) {
  return 2 * uint64_t{kv_heads} * block_tokens * head_dim;
}
KVTIER_HOST_DEVICE uint64_t QuantizedScaleCount(uint32_t kv_heads, uint32_t block_tokens,
                                                uint32_t head_dim) {
  return uint64_t{kv_heads} * (uint64_t{head_dim} + block_tokens);
}
KVTIER_HOST_DEVICE uint64_t QuantizedScaleBytes(uint32_t kv_heads, uint32_t block_tokens,
                                                uint32_t head_dim) {
  return 4 * QuantizedScaleCount(kv_heads, block_tokens, head_dim);
}
KVTIER_HOST_DEVICE uint64_t QuantizedBlockBytes(uint32_t kv_heads, uint32_t block_tokens,
                                                uint32_t head_dim) {
  return QuantizedPayloadBytes(kv_heads, block_tokens, head_dim) +
         QuantizedScaleBytes(kv_heads, block_tokens, head_dim);
}

// Element index of (kv_head, token, channel) within a block's keys, or within its values
// (which start QuantValuesOffset elements after the keys), in the source and the payload.
KVTIER_HOST_DEVICE uint64_t QuantElementIndex(uint32_t kv_head, uint32_t token, uint32_t channel,
                                              uint32_t block_tokens, uint32_t head_dim) {
  return (uint64_t{kv_head} * block_tokens + token) * head_dim + channel;
}
KVTIER_HOST_DEVICE uint64_t QuantValuesOffset(uint32_t kv_heads, uint32_t block_tokens,
                                              uint32_t head_dim) {
  return uint64_t{kv_heads} * block_tokens * head_dim;
}
// Index in a block's scales of the key scale of (kv_head, channel).
KVTIER_HOST_DEVICE uint64_t KeyScaleIndex(uint32_t kv_head, uint32_t channel, uint32_t head_dim) {
  return uint64_t{kv_head} * head_dim + channel;
}
// Index in a block's scales of the value scale of (kv_head, token).
KVTIER_HOST_DEVICE uint64_t ValueScaleIndex(uint32_t kv_head, uint32_t token, uint32_t kv_heads,
                                            uint32_t block_tokens, uint32_t head_dim) {
  return uint64_t{kv_heads} * head_dim + uint64_t{kv_head} * block_tokens + token;
}

// amax update that skips NaN and infinities.
KVTIER_HOST_DEVICE float QuantAmaxUpdate(float amax, float x) {
  const float a = fabsf(x);
  return a <= 3.402823466e38f && a > amax ? a : amax;
}

KVTIER_HOST_DEVICE float QuantScaleFromAmax(float amax) {
  const float scale = amax / kFp8E4M3Max;
  return scale > 0.0f ? scale : 1.0f;
}

KVTIER_HOST_DEVICE uint8_t QuantizeElement(float x, float scale) {
  if (x != x) return FloatToFp8E4M3Bits(x);  // keep the NaN's sign without arithmetic on it
  return FloatToFp8E4M3Bits(x / scale);
}

KVTIER_HOST_DEVICE float DequantizeElement(uint8_t code, float scale) {
  const float v = Fp8E4M3BitsToFloat(code);
  return v != v ? v : v * scale;  // the same NaN bits on the host and the GPU
}

// Checks shared by the reference and the kernels. `dtype` is the uncompressed dtype:
// f16, bf16 or f32 (an fp8 block is stored as it is).
inline Status ValidateQuantizeArgs(const char* op, const void* src_blocks, DType dtype,
                                   uint32_t num_blocks, uint32_t kv_heads, uint32_t block_tokens,
                                   uint32_t head_dim, const void* dst_blocks, const void* scales) {
  auto invalid = [op](const std::string& what) {
    return Status::InvalidArgument(std::string(op) + ": " + what);
  };
  if (src_blocks == nullptr || dst_blocks == nullptr || scales == nullptr) {
    return invalid("null block or scale array");
  }
  if (num_blocks == 0 || kv_heads == 0 || block_tokens == 0 || head_dim == 0) {
    return invalid("zero blocks, kv_heads, block_tokens or head_dim");
  }
  if (head_dim % 8 != 0) {
    return invalid("head_dim " + std::to_string(head_dim) + " is not a multiple of 8");
  }
  if (dtype != DType::kF16 && dtype != DType::kBF16 && dtype != DType::kF32) {
    return invalid("the uncompressed dtype must be f16, bf16 or f32");
  }
  if (uint64_t{kv_heads} * block_tokens > kMaxBlockBytes ||
      QuantValuesOffset(kv_heads, block_tokens, head_dim) * 2 * DTypeBytes(dtype) >
          kMaxBlockBytes) {
    return invalid("a block would exceed kMaxBlockBytes");
  }
  return Status::OK();
}

// Quantizes `num_blocks` kvtier blocks of `src_dtype` (f16, bf16 or f32) into fp8
// payloads and their scales (format above). src_blocks[i] (16-byte aligned) is read,
// dst_blocks[i] (4-byte aligned, QuantizedPayloadBytes) and scales[i] (QuantizedScaleCount
// floats) are written. On the GPU: the three pointer arrays and what they point to are
// device memory; asynchronous on `stream`. NotSupported in a build without CUDA.
Status LaunchQuantizeBlocks(const void* const* src_blocks, DType src_dtype, uint32_t num_blocks,
                            uint32_t kv_heads, uint32_t block_tokens, uint32_t head_dim,
                            void* const* dst_blocks, float* const* scales, StreamHandle stream);

// The inverse: fp8 payloads and their scales back to blocks of `dst_dtype` (f16, bf16 or
// f32; dst_blocks[i] 16-byte aligned, payloads 4-byte aligned). Device memory,
// asynchronous on `stream`.
Status LaunchDequantizeBlocks(const void* const* src_blocks, const float* const* scales,
                              uint32_t num_blocks, uint32_t kv_heads, uint32_t block_tokens,
                              uint32_t head_dim, DType dst_dtype, void* const* dst_blocks,
                              StreamHandle stream);

// CPU references: the same contracts on host memory (synchronous; `stream` is ignored),
// with the same bytes out. They also reject a null block pointer inside the arrays.
Status QuantizeBlocksRef(const void* const* src_blocks, DType src_dtype, uint32_t num_blocks,
                         uint32_t kv_heads, uint32_t block_tokens, uint32_t head_dim,
                         void* const* dst_blocks, float* const* scales, StreamHandle stream);
Status DequantizeBlocksRef(const void* const* src_blocks, const float* const* scales,
                           uint32_t num_blocks, uint32_t kv_heads, uint32_t block_tokens,
                           uint32_t head_dim, DType dst_dtype, void* const* dst_blocks,
                           StreamHandle stream);

}  // namespace kvtier

#endif  // KVTIER_KERNELS_QUANTIZE_H_
