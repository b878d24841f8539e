// Block representatives: the few vectors per block and KV head that the retrieval index
// scores instead of the block's keys (InfLLM, Quest).
//
// Input: `num_blocks` kvtier blocks, each given by a pointer to its first byte (a block
// starts with its keys: [num_kv_heads][block_tokens][head_dim] elements of `dtype`,
// head_dim fastest; the values that follow are never read). Optional per-token scores,
// float [num_blocks][num_kv_heads][block_tokens]: the attention each token received
// (for example summed over the group's query heads and recent steps). Optional valid
// token counts, uint32 [num_blocks]: block b holds tokens [0, valid_tokens[b]); the
// others are ignored (a partly filled last block). Without the array every block is
// full.
//
// Output: float32 [num_blocks][num_kv_heads][rows][head_dim], rows by mode:
//   kTopR      rows = R  the keys of the R tokens with the highest score, best first
//                        (InfLLM's representative keys). A block with n < R valid
//                        tokens fills row j >= n with row j % n.
//   kTopRMean  rows = 1  the mean of those min(R, n) keys (InfLLM's block vector).
//   kMean      rows = 1  the mean key over the valid tokens (no scores needed).
//   kMinMax    rows = 2  per channel the minimum (row 0) and maximum (row 1) over the
//                        valid tokens (Quest; no scores needed).
// Top-R order: higher score first, ties by lower token index, NaN below every number
// (ScoreRankKey), identical in the reference and the kernel. Means are float sums over
// the keys (in rank order for kTopRMean, in an unspecified order for kMean) divided by
// the count; min and max ignore NaN keys unless every key of the channel is NaN.
//
// Bytes per block (a bandwidth bound, RepresentativesBytesPerBlock): kMean and kMinMax
// read every key once, kv_heads * block_tokens * head_dim * dtype bytes; kTopR and
// kTopRMean read the scores, kv_heads * block_tokens * 4, and only the R chosen keys,
// kv_heads * R * head_dim * dtype bytes. Each writes kv_heads * rows * head_dim * 4.
//
// Limits: head_dim 1..1024, block_tokens 1..4096, R 1..min(64, block_tokens); dtypes
// f16, bf16, f32 and fp8-e4m3.
#ifndef KVTIER_KERNELS_REPRESENTATIVES_H_
#define KVTIER_KERNELS_REPRESENTATIVES_H_

#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/dtype_convert.h"
#include "kernels/host_device.h"
#include "kvtier/layout.h"
#include "kvtier/status.h"

namespace kvtier {

enum class RepresentativeMode : uint8_t {
  kTopR = 0,      // the R best-scored keys; needs scores
  kTopRMean = 1,  // their mean; needs scores
  kMean = 2,      // the mean key
  kMinMax = 3,    // per-channel min and max
};

inline constexpr uint32_t kMaxRepresentativeHeadDim = 1024;
inline constexpr uint32_t kMaxRepresentativeBlockTokens = 4096;
inline constexpr uint32_t kMaxTopR = 64;

struct RepresentativeShape {
  uint32_t num_blocks = 0;
  uint32_t num_kv_heads = 0;
  uint32_t block_tokens = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kBF16;
  RepresentativeMode mode = RepresentativeMode::kTopR;
  // R for kTopR and kTopRMean; ignored by the other modes. Default: 4 (InfLLM).
  uint32_t top_r = 4;
};

// A total order on (score, index) pairs, shared by every selection of the retrieval
// kernels: a larger key ranks first. Higher score first, ties by lower index; NaN ranks
// as -infinity and -0 as +0. Distinct indices give distinct keys, and 0 is below the key
// of every pair.
KVTIER_HOST_DEVICE uint64_t ScoreRankKey(float score, uint32_t index) {
  if (score != score) score = -INFINITY;
  if (score == 0.0f) score = 0.0f;  // -0 ranks as +0
  uint32_t u = FloatBits(score);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // monotonic float -> uint32
  return (uint64_t{u} << 32) | (0xFFFFFFFFu - index);
}
// The index a ScoreRankKey was made from.
KVTIER_HOST_DEVICE uint32_t RankKeyIndex(uint64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key);
}

// Output rows per block and KV head: R, 1, 1 or 2.
KVTIER_HOST_DEVICE uint32_t RepresentativeRows(RepresentativeMode mode, uint32_t top_r) {
  switch (mode) {
    case RepresentativeMode::kTopR:
      return top_r;
    case RepresentativeMode::kMinMax:
      return 2;
    default:
      return 1;
  }
}

// Element index of (block, kv head, row, channel 0) in the output.
KVTIER_HOST_DEVICE uint64_t RepresentativeOffset(const RepresentativeShape& s, uint64_t block,
                                                 uint32_t kv_head, uint32_t row) {
  const uint32_t rows = RepresentativeRows(s.mode, s.top_r);
  return ((block * s.num_kv_heads + kv_head) * rows + row) * uint64_t{s.head_dim};
}

// Element index of (kv head, token, channel 0) inside a block's keys.
KVTIER_HOST_DEVICE uint64_t BlockKeyOffset(const RepresentativeShape& s, uint32_t kv_head,
                                           uint32_t token) {
  return (uint64_t{kv_head} * s.block_tokens + token) * s.head_dim;
}

// The valid tokens of a block as the kernel uses them: the caller's count clamped to
// [1, block_tokens] (the reference rejects a count outside that range instead).
KVTIER_HOST_DEVICE uint32_t ClampValidTokens(const uint32_t* valid_tokens, uint64_t block,
                                             uint32_t block_tokens) {
  if (valid_tokens == nullptr) return block_tokens;
  const uint32_t v = valid_tokens[block];
  return v < 1 ? 1 : (v > block_tokens ? block_tokens : v);
}

// Output elements: num_blocks * num_kv_heads * rows * head_dim (valid shape only).
inline uint64_t RepresentativeElements(const RepresentativeShape& s) {
  return uint64_t{s.num_blocks} * s.num_kv_heads * RepresentativeRows(s.mode, s.top_r) * s.head_dim;
}

// Bytes read and written per block (see the top of this file).
inline uint64_t RepresentativesBytesPerBlock(const RepresentativeShape& s) {
  const uint64_t heads = s.num_kv_heads;
  const uint64_t written = heads * RepresentativeRows(s.mode, s.top_r) * s.head_dim * 4;
  const uint64_t elem = DTypeBytes(s.dtype);
  if (s.mode == RepresentativeMode::kTopR || s.mode == RepresentativeMode::kTopRMean) {
    return heads * s.block_tokens * 4 + heads * s.top_r * s.head_dim * elem + written;
  }
  return heads * s.block_tokens * s.head_dim * elem + written;
}

// The checks shared by the reference and the kernel launch (pointers are not read).
inline Status ValidateRepresentatives(const RepresentativeShape& s, const void* const* blocks,
                                      const float* scores, const float* out) {
  const auto bad = [](const std::string& what) {
    return Status::InvalidArgument("ComputeRepresentatives: " + what);
  };
  if (s.num_blocks == 0 || s.num_kv_heads == 0 || s.block_tokens == 0 || s.head_dim == 0) {
    return bad("zero num_blocks, num_kv_heads, block_tokens or head_dim");
  }
  if (s.head_dim > kMaxRepresentativeHeadDim) {
    return bad("head_dim " + std::to_string(s.head_dim) + " above " +
               std::to_string(kMaxRepresentativeHeadDim));
  }
  if (s.block_tokens > kMaxRepresentativeBlockTokens) {
    return bad("block_tokens " + std::to_string(s.block_tokens) + " above " +
               std::to_string(kMaxRepresentativeBlockTokens));
  }
  if (DTypeBytes(s.dtype) == 0) return bad("unknown dtype");
  const bool top = s.mode == RepresentativeMode::kTopR || s.mode == RepresentativeMode::kTopRMean;
  if (!top && s.mode != RepresentativeMode::kMean && s.mode != RepresentativeMode::kMinMax) {
    return bad("unknown mode");
  }
  if (top) {
    if (s.top_r == 0 || s.top_r > kMaxTopR || s.top_r > s.block_tokens) {
      return bad("top_r " + std::to_string(s.top_r) + " outside [1, min(" +
                 std::to_string(kMaxTopR) + ", block_tokens)]");
    }
    if (scores == nullptr) return bad("top-R modes need per-token scores");
  }
  // A block's keys (as f32) fit kMaxBlockBytes, so each per-block count below is under
  // 2^29 and every product fits in 64 bits.
  const uint64_t key_elems = uint64_t{s.num_kv_heads} * s.block_tokens * s.head_dim;
  if (key_elems * 4 > kMaxBlockBytes) return bad("a block's keys exceed kMaxBlockBytes");
  const uint64_t out_elems =
      uint64_t{s.num_kv_heads} * RepresentativeRows(s.mode, s.top_r) * s.head_dim;
  if (uint64_t{s.num_blocks} * key_elems > (uint64_t{1} << 60) ||
      uint64_t{s.num_blocks} * out_elems > (uint64_t{1} << 60)) {
    return bad("sizes overflow");
  }
  if (blocks == nullptr) return bad("null blocks");
  if (out == nullptr) return bad("null out");
  return Status::OK();
}

// Computes the representatives of `shape.num_blocks` blocks on `stream` (asynchronous).
// `blocks`: device array of num_blocks device pointers; `scores` (may be null unless the
// mode needs it), `valid_tokens` (may be null: full blocks) and `out` are device memory;
// see the top of this file for their layouts. A valid_tokens entry outside
// [1, block_tokens] is clamped into it. NotSupported in a build without CUDA.
Status LaunchComputeRepresentatives(const RepresentativeShape& shape, const void* const* blocks,
                                    const float* scores, const uint32_t* valid_tokens, float* out,
                                    StreamHandle stream);

// CPU reference, same contract on host memory (synchronous; `stream` is ignored). Also
// rejects a valid_tokens entry outside [1, block_tokens] and a null block pointer.
Status ComputeRepresentativesRef(const RepresentativeShape& shape, const void* const* blocks,
                                 const float* scores, const uint32_t* valid_tokens, float* out,
                                 StreamHandle stream);

}  // namespace kvtier

#endif  // KVTIER_KERNELS_REPRESENTATIVES_H_
