#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cluster_scoring.h"
#include "kernels/dtype_convert.h"

namespace kvtier {

Status EstimateBlockMassRef(const BlockMassShape& s, const float* queries, const uint16_t* rows,
                            const float* log_weights, const uint8_t* candidates, float* scores,
                            void* workspace, uint64_t workspace_bytes, StreamHandle /*stream*/) {
  KVTIER_RETURN_IF_ERROR(
      ValidateEstimateBlockMass(s, queries, rows, log_weights, scores, workspace, workspace_bytes));
  const uint64_t n = s.num_blocks;
  const uint32_t hq = s.num_query_heads, g = hq / s.num_kv_heads, d = s.head_dim;
  float* e = static_cast<float*>(workspace);  // [Hq][N]
  float* z = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) +
                                      MassAlignUp(uint64_t{hq} * n * 4));  // [Hq]
  std::vector<float> row(d);
  std::vector<float> terms(uint64_t{g} * s.rows);  // [g][rows] of one block
  for (uint32_t kv = 0; kv < s.num_kv_heads; ++kv) {
    const float* q = queries + uint64_t{kv} * g * d;
    for (uint64_t b = 0; b < n; ++b) {
      for (uint32_t j = 0; j < s.rows; ++j) {
        const uint64_t r = MassRowIndex(s, kv, b, j);
        for (uint32_t c = 0; c < d; ++c) row[c] = HalfBitsToFloat(rows[r * d + c]);
        for (uint32_t h = 0; h < g; ++h) {
          float dot = 0.0f;
          for (uint32_t c = 0; c < d; ++c) dot += q[uint64_t{h} * d + c] * row[c];
          terms[uint64_t{h} * s.rows + j] = dot + log_weights[r];
        }
      }
      for (uint32_t h = 0; h < g; ++h) {
        e[(uint64_t{kv} * g + h) * n + b] =
            MassLogSumExp(terms.data() + uint64_t{h} * s.rows, s.rows);
      }
    }
  }
  for (uint32_t h = 0; h < hq; ++h) {
    const float* eh = e + uint64_t{h} * n;
    float m = -INFINITY;
    for (uint64_t b = 0; b < n; ++b) m = std::fmax(m, eh[b]);
    if (m == -INFINITY) {
      z[h] = -INFINITY;
      continue;
    }
    // A double sum: over many blocks a float one would drift by ~sqrt(N) eps.
    double sum = 0.0;
    for (uint64_t b = 0; b < n; ++b) {
      if (eh[b] == eh[b]) sum += std::exp(eh[b] - m);  // NaN adds nothing, as on the GPU
    }
    z[h] = m + static_cast<float>(std::log(sum));
  }
  const uint32_t score_rows = MassScoreRows(s);
  const uint32_t heads_per_row = hq / score_rows;
  for (uint32_t r = 0; r < score_rows; ++r) {
    for (uint64_t b = 0; b < n; ++b) {
      scores[r * n + b] =
          candidates != nullptr && candidates[b] == 0
              ? -INFINITY
              : FuseBlockMass(e + b, n, z, r * heads_per_row, (r + 1) * heads_per_row);
    }
  }
  return Status::OK();
}

Status GatherBlockScoresRef(const float* scores, uint32_t num_rows, uint32_t num_blocks,
                            const int32_t* top_blocks, uint32_t k, float* out,
                            StreamHandle /*stream*/) {
  KVTIER_RETURN_IF_ERROR(
      ValidateGatherBlockScores(scores, num_rows, num_blocks, top_blocks, k, out));
  for (uint64_t i = 0; i < uint64_t{num_rows} * k; ++i) {
    const int32_t b = top_blocks[i];
    if (b < 0 || static_cast<uint32_t>(b) >= num_blocks) {
      return Status::InvalidArgument("GatherBlockScores: index " + std::to_string(b) +
                                     " outside [0, " + std::to_string(num_blocks) + ")");
    }
    out[i] = scores[(i / k) * num_blocks + static_cast<uint32_t>(b)];
  }
  return Status::OK();
}

#if !KVTIER_WITH_CUDA
Status LaunchEstimateBlockMass(const BlockMassShape&, const float*, const uint16_t*, const float*,
                               const uint8_t*, float*, void*, uint64_t, StreamHandle) {
  return Status::NotSupported("EstimateBlockMass on a GPU: kvtier was built without CUDA");
}

Status LaunchGatherBlockScores(const float*, uint32_t, uint32_t, const int32_t*, uint32_t, float*,
                               StreamHandle) {
  return Status::NotSupported("GatherBlockScores on a GPU: kvtier was built without CUDA");
}
#endif

}  // namespace kvtier
