#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/block_scoring.h"

namespace kvtier {

Status ScoreBlocksRef(const BlockScoringShape& s, const float* queries,
                      const float* representatives, float* scores, StreamHandle /*stream*/) {
  KVTIER_RETURN_IF_ERROR(ValidateScoreBlocks(s, queries, representatives, scores));
  const uint32_t d = s.head_dim, group = s.num_query_heads / s.num_kv_heads;
  const uint32_t reps = s.reps_per_block;
  for (uint64_t n = 0; n < s.num_blocks; ++n) {
    float layer = 0.0f;
    for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
      float head_sum = 0.0f;
      for (uint32_t qi = 0; qi < group; ++qi) {
        const float* q = queries + uint64_t{kv * group + qi} * d;
        float score = 0.0f;
        if (s.mode == BlockScoreMode::kMinMaxBound) {
          const float* lo = representatives + ScoringRepOffset(s, n, kv, 0);
          const float* hi = representatives + ScoringRepOffset(s, n, kv, 1);
          for (uint32_t c = 0; c < d; ++c) score += std::fmax(q[c] * lo[c], q[c] * hi[c]);
        } else {
          for (uint32_t j = 0; j < reps; ++j) {
            const float* r = representatives + ScoringRepOffset(s, n, kv, j);
            float dot = 0.0f;
            for (uint32_t c = 0; c < d; ++c) dot += q[c] * r[c];
            if (s.mode == BlockScoreMode::kMeanDot) {
              score += dot;
            } else {
              score = j == 0 ? dot : std::fmax(score, dot);
            }
          }
          if (s.mode == BlockScoreMode::kMeanDot) score /= static_cast<float>(reps);
        }
        head_sum += score;
      }
      if (s.selection == BlockSelection::kPerKvHead) {
        scores[uint64_t{kv} * s.num_blocks + n] = head_sum;
      }
      layer += head_sum;
    }
    if (s.selection == BlockSelection::kPerLayer) scores[n] = layer;
  }
  return Status::OK();
}

Status TopKBlocksRef(const float* scores, uint32_t num_rows, uint32_t num_blocks, uint32_t k,
                     int32_t* top_blocks, void* /*workspace*/, uint64_t /*workspace_bytes*/,
                     StreamHandle /*stream*/) {
  KVTIER_RETURN_IF_ERROR(ValidateTopKBlocks(scores, num_rows, num_blocks, k, top_blocks));
  std::vector<uint64_t> keys(num_blocks);
  for (uint32_t row = 0; row < num_rows; ++row) {
    const float* s = scores + uint64_t{row} * num_blocks;
    for (uint32_t i = 0; i < num_blocks; ++i) keys[i] = ScoreRankKey(s[i], i);
    std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<uint64_t>());
    for (uint32_t j = 0; j < k; ++j) {
      top_blocks[uint64_t{row} * k + j] = static_cast<int32_t>(RankKeyIndex(keys[j]));
    }
  }
  return Status::OK();
}

#if !KVTIER_WITH_CUDA
Result<uint64_t> TopKWorkspaceBytes(uint32_t num_rows, uint32_t num_blocks, uint32_t k) {
  int32_t dummy = 0;
  const float dummy_score = 0.0f;
  KVTIER_RETURN_IF_ERROR(ValidateTopKBlocks(&dummy_score, num_rows, num_blocks, k, &dummy));
  return Status::NotSupported("TopKBlocks on a GPU: kvtier was built without CUDA");
}

Status LaunchScoreBlocks(const BlockScoringShape&, const float*, const float*, float*,
                         StreamHandle) {
  return Status::NotSupported("ScoreBlocks on a GPU: kvtier was built without CUDA");
}

Status LaunchTopKBlocks(const float*, uint32_t, uint32_t, uint32_t, int32_t*, void*, uint64_t,
                        StreamHandle) {
  return Status::NotSupported("TopKBlocks on a GPU: kvtier was built without CUDA");
}
#endif

}  // namespace kvtier
