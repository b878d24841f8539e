#include <cstring>
#include <string>

#include "kernels/quantize.h"

namespace kvtier {
namespace {

template <typename A, typename B, typename C>
Status CheckPointers(const char* op, const A* a, const B* b, const C* c, uint32_t num_blocks) {
  for (uint32_t i = 0; i < num_blocks; ++i) {
    if (a[i] == nullptr || b[i] == nullptr || c[i] == nullptr) {
      return Status::InvalidArgument(std::string(op) + ": null pointer for block " +
                                     std::to_string(i));
    }
  }
  return Status::OK();
}

}  // namespace

Status QuantizeBlocksRef(const void* const* src_blocks, DType src_dtype, uint32_t num_blocks,
                         uint32_t kv_heads, uint32_t block_tokens, uint32_t head_dim,
                         void* const* dst_blocks, float* const* scales, StreamHandle /*stream*/) {
  constexpr const char* kOp = "QuantizeBlocks";
  Status s = ValidateQuantizeArgs(kOp, src_blocks, src_dtype, num_blocks, kv_heads, block_tokens,
                                  head_dim, dst_blocks, scales);
  if (!s.ok()) return s;
  s = CheckPointers(kOp, src_blocks, dst_blocks, scales, num_blocks);
  if (!s.ok()) return s;
  const uint64_t values = QuantValuesOffset(kv_heads, block_tokens, head_dim);
  for (uint32_t b = 0; b < num_blocks; ++b) {
    const void* src = src_blocks[b];
    auto* dst = static_cast<uint8_t*>(dst_blocks[b]);
    float* sc = scales[b];
    for (uint32_t h = 0; h < kv_heads; ++h) {
      // Keys: one scale per channel, over the tokens.
      for (uint32_t d = 0; d < head_dim; ++d) {
        float amax = 0.0f;
        for (uint32_t t = 0; t < block_tokens; ++t) {
          amax = QuantAmaxUpdate(
              amax,
              LoadAsFloat(src, QuantElementIndex(h, t, d, block_tokens, head_dim), src_dtype));
        }
        const float scale = QuantScaleFromAmax(amax);
        sc[KeyScaleIndex(h, d, head_dim)] = scale;
        for (uint32_t t = 0; t < block_tokens; ++t) {
          const uint64_t i = QuantElementIndex(h, t, d, block_tokens, head_dim);
          dst[i] = QuantizeElement(LoadAsFloat(src, i, src_dtype), scale);
        }
      }
      // Values: one scale per token, over the channels.
      for (uint32_t t = 0; t < block_tokens; ++t) {
        const uint64_t row = values + QuantElementIndex(h, t, 0, block_tokens, head_dim);
        float amax = 0.0f;
        for (uint32_t d = 0; d < head_dim; ++d) {
          amax = QuantAmaxUpdate(amax, LoadAsFloat(src, row + d, src_dtype));
        }
        const float scale = QuantScaleFromAmax(amax);
        sc[ValueScaleIndex(h, t, kv_heads, block_tokens, head_dim)] = scale;
        for (uint32_t d = 0; d < head_dim; ++d) {
          dst[row + d] = QuantizeElement(LoadAsFloat(src, row + d, src_dtype), scale);
        }
      }
    }
  }
  return Status::OK();
}

Status DequantizeBlocksRef(const void* const* src_blocks, const float* const* scales,
                           uint32_t num_blocks, uint32_t kv_heads, uint32_t block_tokens,
                           uint32_t head_dim, DType dst_dtype, void* const* dst_blocks,
                           StreamHandle /*stream*/) {
  constexpr const char* kOp = "DequantizeBlocks";
  Status s = ValidateQuantizeArgs(kOp, src_blocks, dst_dtype, num_blocks, kv_heads, block_tokens,
                                  head_dim, dst_blocks, scales);
  if (!s.ok()) return s;
  s = CheckPointers(kOp, src_blocks, dst_blocks, scales, num_blocks);
  if (!s.ok()) return s;
  const uint64_t values = QuantValuesOffset(kv_heads, block_tokens, head_dim);
  for (uint32_t b = 0; b < num_blocks; ++b) {
    const auto* src = static_cast<const uint8_t*>(src_blocks[b]);
    void* dst = dst_blocks[b];
    const float* sc = scales[b];
    for (uint32_t h = 0; h < kv_heads; ++h) {
      for (uint32_t t = 0; t < block_tokens; ++t) {
        const float value_scale = sc[ValueScaleIndex(h, t, kv_heads, block_tokens, head_dim)];
        for (uint32_t d = 0; d < head_dim; ++d) {
          const uint64_t i = QuantElementIndex(h, t, d, block_tokens, head_dim);
          StoreFromFloat(dst, i, dst_dtype,
                         DequantizeElement(src[i], sc[KeyScaleIndex(h, d, head_dim)]));
          StoreFromFloat(dst, values + i, dst_dtype,
                         DequantizeElement(src[values + i], value_scale));
        }
      }
    }
  }
  return Status::OK();
}

#if !KVTIER_WITH_CUDA
Status LaunchQuantizeBlocks(const void* const*, DType, uint32_t, uint32_t, uint32_t, uint32_t,
                            void* const*, float* const*, StreamHandle) {
  return Status::NotSupported("QuantizeBlocks on a GPU: kvtier was built without CUDA");
}

Status LaunchDequantizeBlocks(const void* const*, const float* const*, uint32_t, uint32_t, uint32_t,
                              uint32_t, DType, void* const*, StreamHandle) {
  return Status::NotSupported("DequantizeBlocks on a GPU: kvtier was built without CUDA");
}
#endif

}  // namespace kvtier
