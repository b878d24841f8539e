// Block-mass estimation: the retrieval index's estimator (index/layer_index.h) over N
// blocks of fp16 summary rows, for one decoding step, and the gather of the selected
// blocks' scores. Top-k goes through TopKBlocks (kernels/block_scoring.h).
//
// EstimateBlockMass. Inputs:
//   queries      float [Hq][head_dim], already multiplied by the softmax scale; query
//                head h reads KV head h / g, g = Hq / num_kv_heads.
//   rows         fp16 bits [num_kv_heads][block_capacity][rows][head_dim]: per KV head one
//                contiguous array of blocks (positions 0..N-1 are scored; the rest of the
//                capacity is not read).
//   log_weights  float [num_kv_heads][block_capacity][rows]: log of each row's weight,
//                -infinity for an empty row.
//   candidates   uint8 [N] (1: candidate) or null (every block is one).
// For position b and query head h (rows r_j and log weights lw_j of b at KV head h / g):
//   t_h(b, j) = q_h . r_j + lw_j
//   e_h(b)    = log sum_j exp(t_h(b, j))           (MassLogSumExp; -inf when every t is)
//   Z_h       = log sum_{b < N} exp(e_h(b))        (every block, candidate or not)
//   kPerLayer:  scores[b]      = sum_h exp(e_h(b) - Z_h)
//   kPerKvHead: scores[kv][b]  = the same sum over the g query heads of KV head kv
// A head whose Z_h is -infinity adds nothing. A non-candidate's score is -infinity.
// Output scores float [score_rows][N] (score_rows: 1 or num_kv_heads). NaN inputs give
// NaN scores (ranked last by TopKBlocks). The kernel and the reference compute in float
// (the reference sums Z_h in double) in different orders, so they agree to rounding: in
// the tests within 5e-5 relative, typically near 1e-6.
// Workspace: EstimateBlockMassWorkspaceBytes(shape) bytes (e_h(b), then Z_h), device
// memory for the kernel and host memory for the reference, 256-byte aligned.
//
// Three passes: (1) one read of the fp16 rows: a thread block per (tile of blocks, KV
// head); a team of lanes per row takes 16-byte chunks (8 channels) and dots them with the
// group's g queries (held in registers when g <= 8 and head_dim <= 256, else in shared
// memory), then reduces across the team; the rows of a block combine into e_h(b) in
// shared memory; (2) per head, the log-sum-exp Z_h; (3) per block, the fusion.
// Bytes per block (EstimateBlockMassBytesPerBlock, the bandwidth bound): reading the rows
// once, num_kv_heads * rows * (2 head_dim + 4) (fp16 rows and float log weights), the
// candidate flag (1), writing e_h (4 Hq) and reading it twice (8 Hq, from L2 at these
// sizes), writing the scores (4 score_rows). Llama-3-8B with 3 rows: 6,629 bytes.
//
// GatherBlockScores. out[row][i] = scores[row][top_blocks[row][i]] for i < k: the scores
// of TopKBlocks' picks, so that a Select copies back k scores, not N.
//
// Limits: N 1..2^31 - 1, block_capacity N..2^31 - 1, num_kv_heads 1..4096, head_dim
// 1..1024, rows 1..64, g 1..128 and g * head_dim <= 16384 (the group's queries in shared
// memory), Hq * N <= 2^40.
#ifndef KVTIER_KERNELS_CLUSTER_SCORING_H_
#define KVTIER_KERNELS_CLUSTER_SCORING_H_

#include <math.h>

#include <cstdint>
#include <string>

#include "kernels/block_scoring.h"
#include "kernels/host_device.h"
#include "kvtier/status.h"

namespace kvtier {

inline constexpr uint32_t kMaxMassRows = 64;
inline constexpr uint32_t kMaxMassGroup = 128;
inline constexpr uint32_t kMaxMassGroupElements = 16384;  // g * head_dim: 64 KiB of queries

struct BlockMassShape {
  uint32_t num_blocks = 0;      // N: positions 0..N-1 are scored
  uint32_t block_capacity = 0;  // blocks per KV head in `rows` and `log_weights` (>= N)
  uint32_t num_query_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t rows = 0;  // summary rows per block and KV head
  BlockSelection selection = BlockSelection::kPerLayer;
};

// Rows of scores: 1 (kPerLayer) or num_kv_heads (kPerKvHead).
KVTIER_HOST_DEVICE uint32_t MassScoreRows(const BlockMassShape& s) {
  return s.selection == BlockSelection::kPerKvHead ? s.num_kv_heads : 1;
}

// Index of (kv head, block, row) among the rows: the element of its channel 0 is this
// times head_dim; its log weight is log_weights[this].
KVTIER_HOST_DEVICE uint64_t MassRowIndex(const BlockMassShape& s, uint32_t kv_head, uint64_t block,
                                         uint32_t row) {
  return (uint64_t{kv_head} * s.block_capacity + block) * s.rows + row;
}

// log sum_j exp(t[j]) for j < n, from the largest term; -infinity when every term is.
KVTIER_HOST_DEVICE float MassLogSumExp(const float* t, uint32_t n) {
  float m = -INFINITY;
  for (uint32_t j = 0; j < n; ++j) m = fmaxf(m, t[j]);
  if (m == -INFINITY) return -INFINITY;
  float sum = 0.0f;
  for (uint32_t j = 0; j < n; ++j) sum += expf(t[j] - m);
  return m + logf(sum);
}

// One block's score from its log masses e_h (at e[h * stride]) for heads
// [head_begin, head_end) and the heads' Z (z[h]): sum_h exp(e_h - Z_h) over heads whose
// Z_h is not -infinity.
KVTIER_HOST_DEVICE float FuseBlockMass(const float* e, uint64_t stride, const float* z,
                                       uint32_t head_begin, uint32_t head_end) {
  float f = 0.0f;
  for (uint32_t h = head_begin; h < head_end; ++h) {
    if (z[h] == -INFINITY) continue;
    f += expf(e[h * stride] - z[h]);
  }
  return f;
}

inline uint64_t MassAlignUp(uint64_t bytes) { return (bytes + 255) / 256 * 256; }

// Workspace bytes of EstimateBlockMass: e_h(b), float [Hq][N], then Z_h, float [Hq].
inline uint64_t EstimateBlockMassWorkspaceBytes(const BlockMassShape& s) {
  return MassAlignUp(uint64_t{s.num_query_heads} * s.num_blocks * 4) +
         MassAlignUp(uint64_t{s.num_query_heads} * 4);
}

// Bytes read and written per block (see the top of this file).
inline uint64_t EstimateBlockMassBytesPerBlock(const BlockMassShape& s) {
  return uint64_t{s.num_kv_heads} * s.rows * (2 * uint64_t{s.head_dim} + 4) + 1 +
         12 * uint64_t{s.num_query_heads} + 4 * uint64_t{MassScoreRows(s)};
}

// The checks shared by the reference and the kernel launch (pointers are not read).
inline Status ValidateEstimateBlockMass(const BlockMassShape& s, const float* queries,
                                        const uint16_t* rows, const float* log_weights,
                                        const float* scores, const void* workspace,
                                        uint64_t workspace_bytes) {
  const auto bad = [](const std::string& what) {
    return Status::InvalidArgument("EstimateBlockMass: " + what);
  };
  if (s.num_blocks == 0 || s.num_query_heads == 0 || s.num_kv_heads == 0 || s.head_dim == 0 ||
      s.rows == 0) {
    return bad("zero num_blocks, num_query_heads, num_kv_heads, head_dim or rows");
  }
  if (s.num_blocks > kMaxScoringBlocks || s.block_capacity > kMaxScoringBlocks) {
    return bad("num_blocks or block_capacity above 2^31 - 1");
  }
  if (s.block_capacity < s.num_blocks) {
    return bad("block_capacity " + std::to_string(s.block_capacity) + " below num_blocks " +
               std::to_string(s.num_blocks));
  }
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
  if (s.rows > kMaxMassRows) {
    return bad("rows " + std::to_string(s.rows) + " above " + std::to_string(kMaxMassRows));
  }
  const uint32_t g = s.num_query_heads / s.num_kv_heads;
  if (g > kMaxMassGroup || uint64_t{g} * s.head_dim > kMaxMassGroupElements) {
    return bad("query heads per KV head " + std::to_string(g) + " above " +
               std::to_string(kMaxMassGroup) + ", or their queries above " +
               std::to_string(kMaxMassGroupElements) + " floats");
  }
  if (s.selection != BlockSelection::kPerLayer && s.selection != BlockSelection::kPerKvHead) {
    return bad("unknown selection");
  }
  if (uint64_t{s.num_query_heads} * s.num_blocks > (uint64_t{1} << 40)) {
    return bad("sizes overflow");
  }
  if (queries == nullptr || rows == nullptr || log_weights == nullptr || scores == nullptr) {
    return bad("null queries, rows, log_weights or scores");
  }
  const uint64_t needed = EstimateBlockMassWorkspaceBytes(s);
  if (workspace == nullptr || workspace_bytes < needed) {
    return bad("workspace of " + std::to_string(workspace_bytes) + " bytes, needs " +
               std::to_string(needed));
  }
  return Status::OK();
}

inline Status ValidateGatherBlockScores(const float* scores, uint32_t num_rows, uint32_t num_blocks,
                                        const int32_t* top_blocks, uint32_t k, const float* out) {
  const auto bad = [](const std::string& what) {
    return Status::InvalidArgument("GatherBlockScores: " + what);
  };
  if (num_rows == 0 || num_blocks == 0 || k == 0) return bad("zero num_rows, num_blocks or k");
  if (num_blocks > kMaxScoringBlocks) return bad("num_blocks above 2^31 - 1");
  if (uint64_t{num_rows} * num_blocks > (uint64_t{1} << 40) ||
      uint64_t{num_rows} * k > (uint64_t{1} << 40)) {
    return bad("sizes overflow");
  }
  if (scores == nullptr || top_blocks == nullptr || out == nullptr) {
    return bad("null scores, top_blocks or out");
  }
  return Status::OK();
}

// Estimates every block's mass for one decoding step on `stream` (asynchronous). Every
// pointer is device memory, laid out as described above. NotSupported in a build
// without CUDA.
Status LaunchEstimateBlockMass(const BlockMassShape& shape, const float* queries,
                               const uint16_t* rows, const float* log_weights,
                               const uint8_t* candidates, float* scores, void* workspace,
                               uint64_t workspace_bytes, StreamHandle stream);

// CPU reference, same contract on host memory (synchronous; `stream` is ignored).
Status EstimateBlockMassRef(const BlockMassShape& shape, const float* queries, const uint16_t* rows,
                            const float* log_weights, const uint8_t* candidates, float* scores,
                            void* workspace, uint64_t workspace_bytes, StreamHandle stream);

// Gathers the scores of `top_blocks` (int32 [num_rows][k], indices below num_blocks) from
// `scores` (float [num_rows][num_blocks]) into `out` (float [num_rows][k]) on `stream`
// (asynchronous); device memory. NotSupported in a build without CUDA.
Status LaunchGatherBlockScores(const float* scores, uint32_t num_rows, uint32_t num_blocks,
                               const int32_t* top_blocks, uint32_t k, float* out,
                               StreamHandle stream);

// CPU reference, same contract on host memory (synchronous). Also rejects an index
// outside [0, num_blocks).
Status GatherBlockScoresRef(const float* scores, uint32_t num_rows, uint32_t num_blocks,
                            const int32_t* top_blocks, uint32_t k, float* out, StreamHandle stream);

}  // namespace kvtier

#endif  // KVTIER_KERNELS_CLUSTER_SCORING_H_
