// Block scoring and top-k: one decoding step's retrieval over N blocks (InfLLM, Quest).
//
// ScoreBlocks. Inputs: queries float32 [num_query_heads][head_dim] (one decoding step,
// already rotated); representatives float32 [N][num_kv_heads][R][head_dim], as
// ComputeRepresentatives writes them (kTopR: R rows; kTopRMean, kMean: R = 1; kMinMax:
// R = 2). Query head h belongs to KV head h / g, g = num_query_heads / num_kv_heads.
// The score of query head h (query vector q) for block n, r_j = reps[n][h / g][j]:
//   kMeanDot      (1/R) sum_j q . r_j. InfLLM scores q . mean_j r_j, the same value;
//                 the DESIGN's "sum over representatives" differs by the constant R.
//   kMaxDot       max_j q . r_j.
//   kMinMaxBound  R = 2, r_0 = per-channel min, r_1 = per-channel max (Quest):
//                 sum_c max(q_c r_0c, q_c r_1c), at least q . k for every key k of the
//                 block that the min and max were taken over.
// A KV head's score sums its g query heads' scores (h = kv * g .. kv * g + g - 1); the
// layer's score sums the KV heads' scores. Output scores, float32: kPerLayer [N]
// (InfLLM: one selection per layer) or kPerKvHead [num_kv_heads][N] (a selection per KV
// head). No 1/sqrt(head_dim) scaling: it changes no ranking. The reference adds in the
// order written here; the kernel adds in another (for kMeanDot it sums the group's
// queries first), so the two agree to float rounding, not bit for bit.
// Bytes per block (the bandwidth bound, ScoreBlocksBytesPerBlock): reading the
// representatives once, num_kv_heads * R * head_dim * 4, plus writing 4 (kPerLayer) or
// 4 * num_kv_heads (kPerKvHead) bytes of scores.
//
// TopKBlocks. Input: scores float32 [num_rows][N]. Output: top_blocks int32
// [num_rows][k]: per row the indices of its k highest scores, highest first, ties by
// lower index, NaN below every number (ScoreRankKey in representatives.h). The kernel
// and the reference give identical results for identical scores. Bytes: reading the
// scores once (4 * num_rows * N); above 4096 blocks, also a few passes over a smaller
// workspace of candidates.
//
// Limits: N 1..2^31 - 1, num_kv_heads 1..4096, head_dim 1..1024, R 1..64, 1 <= k <= N,
// num_rows * N <= 2^40.
// The caller adds the sink blocks and the local window; these kernels score and rank.
#ifndef KVTIER_KERNELS_BLOCK_SCORING_H_
#define KVTIER_KERNELS_BLOCK_SCORING_H_

#include <cstdint>
#include <string>

#include "kernels/host_device.h"
#include "kernels/representatives.h"
#include "kvtier/status.h"

namespace kvtier {

enum class BlockScoreMode : uint8_t {
  kMeanDot = 0,      // mean over the R representatives of q . r (InfLLM)
  kMaxDot = 1,       // max over the R representatives
  kMinMaxBound = 2,  // Quest's upper bound from per-channel min and max (R = 2)
};

enum class BlockSelection : uint8_t {
  kPerLayer = 0,   // one score per block, summed over every head
  kPerKvHead = 1,  // one score per block and KV head
};

inline constexpr uint32_t kMaxScoringHeadDim = 1024;
inline constexpr uint32_t kMaxScoringReps = 64;
inline constexpr uint32_t kMaxScoringBlocks = 0x7FFFFFFFu;  // block indices are int32
inline constexpr uint32_t kMaxScoringKvHeads = 4096;

struct BlockScoringShape {
  uint32_t num_blocks = 0;  // N
  uint32_t num_query_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t reps_per_block = 0;  // R
  BlockScoreMode mode = BlockScoreMode::kMeanDot;
  BlockSelection selection = BlockSelection::kPerLayer;
};

// Rows of scores: 1 (kPerLayer) or num_kv_heads (kPerKvHead).
KVTIER_HOST_DEVICE uint32_t ScoreRows(const BlockScoringShape& s) {
  return s.selection == BlockSelection::kPerKvHead ? s.num_kv_heads : 1;
}

// Element index of (block, kv head, representative, channel 0) in the representatives.
KVTIER_HOST_DEVICE uint64_t ScoringRepOffset(const BlockScoringShape& s, uint64_t block,
                                             uint32_t kv_head, uint32_t rep) {
  return ((block * s.num_kv_heads + kv_head) * s.reps_per_block + rep) * uint64_t{s.head_dim};
}

// Bytes read and written per block by ScoreBlocks (see the top of this file).
inline uint64_t ScoreBlocksBytesPerBlock(const BlockScoringShape& s) {
  return uint64_t{s.num_kv_heads} * s.reps_per_block * s.head_dim * 4 + uint64_t{4} * ScoreRows(s);
}

// The checks shared by the reference and the kernel launch (pointers are not read).
inline Status ValidateScoreBlocks(const BlockScoringShape& s, const float* queries,
                                  const float* representatives, const float* scores) {
  const auto bad = [](const std::string& what) {
    return Status::InvalidArgument("ScoreBlocks: " + what);
  };
  if (s.num_blocks == 0 || s.num_query_heads == 0 || s.num_kv_heads == 0 || s.head_dim == 0 ||
      s.reps_per_block == 0) {
    return bad("zero num_blocks, num_query_heads, num_kv_heads, head_dim or reps_per_block");
  }
  if (s.num_blocks > kMaxScoringBlocks) return bad("num_blocks above 2^31 - 1");
  if (s.num_kv_heads > kMaxScoringKvHeads) {
    return bad("num_kv_heads " + std::to_string(s.num_kv_heads) + " above " +
               std::to_string(kMaxScoringKvHeads));
  }
  if (s.num_query_heads % s.num_kv_heads != 0) {
    return bad("num_query_heads " + std::to_string(s.num_query_heads) +
               " is not a multiple of num_kv_heads " + std::to_string(s.num_kv_heads));
  }
  if (s.head_dim > kMaxScoringHeadDim) {
    return bad("head_dim " + std::to_string(s.head_dim) + " above " +
               std::to_string(kMaxScoringHeadDim));
  }
  if (s.reps_per_block > kMaxScoringReps) {
    return bad("reps_per_block " + std::to_string(s.reps_per_block) + " above " +
               std::to_string(kMaxScoringReps));
  }
  if (s.mode != BlockScoreMode::kMeanDot && s.mode != BlockScoreMode::kMaxDot &&
      s.mode != BlockScoreMode::kMinMaxBound) {
    return bad("unknown mode");
  }
  if (s.mode == BlockScoreMode::kMinMaxBound && s.reps_per_block != 2) {
    return bad("kMinMaxBound needs reps_per_block = 2 (min row, max row)");
  }
  if (s.selection != BlockSelection::kPerLayer && s.selection != BlockSelection::kPerKvHead) {
    return bad("unknown selection");
  }
  // One block's representatives within kMaxBlockBytes keeps every product below 2^61.
  if (uint64_t{s.num_kv_heads} * s.reps_per_block * s.head_dim * 4 > kMaxBlockBytes ||
      uint64_t{s.num_query_heads} * s.head_dim * 4 > kMaxBlockBytes) {
    return bad("one block's representatives or the queries exceed kMaxBlockBytes");
  }
  if (queries == nullptr || representatives == nullptr || scores == nullptr) {
    return bad("null queries, representatives or scores");
  }
  return Status::OK();
}

inline Status ValidateTopKBlocks(const float* scores, uint32_t num_rows, uint32_t num_blocks,
                                 uint32_t k, const int32_t* top_blocks) {
  const auto bad = [](const std::string& what) {
    return Status::InvalidArgument("TopKBlocks: " + what);
  };
  if (num_rows == 0 || num_blocks == 0) return bad("zero num_rows or num_blocks");
  if (num_blocks > kMaxScoringBlocks) return bad("num_blocks above 2^31 - 1");
  if (k == 0 || k > num_blocks) {
    return bad("k " + std::to_string(k) +
               " outside [1, num_blocks = " + std::to_string(num_blocks) + "]");
  }
  if (uint64_t{num_rows} * num_blocks > (uint64_t{1} << 40)) return bad("sizes overflow");
  if (scores == nullptr || top_blocks == nullptr) return bad("null scores or top_blocks");
  return Status::OK();
}

// Scores every block for one decoding step on `stream` (asynchronous). `queries`,
// `representatives` and `scores` are device memory, laid out as described above.
// NotSupported in a build without CUDA.
Status LaunchScoreBlocks(const BlockScoringShape& shape, const float* queries,
                         const float* representatives, float* scores, StreamHandle stream);

// CPU reference, same contract on host memory (synchronous; `stream` is ignored).
Status ScoreBlocksRef(const BlockScoringShape& shape, const float* queries,
                      const float* representatives, float* scores, StreamHandle stream);

// Device workspace bytes LaunchTopKBlocks needs for this shape (0 when it needs none).
// InvalidArgument for a bad shape; in a CUDA build the driver's error when it cannot
// be asked; NotSupported in a build without CUDA.
Result<uint64_t> TopKWorkspaceBytes(uint32_t num_rows, uint32_t num_blocks, uint32_t k);

// Per row of `scores` (device, [num_rows][num_blocks]), the indices of the k best
// blocks into `top_blocks` (device, [num_rows][k]), on `stream` (asynchronous).
// `workspace`: device memory of at least TopKWorkspaceBytes(...) bytes, 256-byte
// aligned (as cudaMalloc returns it), used only by this call until it completes on the
// stream (may be null when that is 0).
// NotSupported in a build without CUDA.
Status LaunchTopKBlocks(const float* scores, uint32_t num_rows, uint32_t num_blocks, uint32_t k,
                        int32_t* top_blocks, void* workspace, uint64_t workspace_bytes,
                        StreamHandle stream);

// CPU reference, same contract on host memory (synchronous; the workspace and `stream`
// are ignored and may be null).
Status TopKBlocksRef(const float* scores, uint32_t num_rows, uint32_t num_blocks, uint32_t k,
                     int32_t* top_blocks, void* workspace, uint64_t workspace_bytes,
                     StreamHandle stream);

}  // namespace kvtier

#endif  // KVTIER_KERNELS_BLOCK_SCORING_H_
