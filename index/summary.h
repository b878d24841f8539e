// Block summaries: the few vectors per block and KV head that the retrieval index scores
// instead of the block's keys (kvtier/retrieval.h describes the kinds).
//
// A summary has `rows` vectors per KV head, stored as fp16 [num_kv_heads][rows][head_dim]
// (values beyond fp16's range saturate to +-65504), and a weight per row, float
// [num_kv_heads][rows]: the number of the block's tokens the row stands for.
//   kClusters  rows = C. Row c is the mean of the keys of cluster c, weight its size
//              (0 for an empty cluster, whose vector is then zero). Clustering: seed 0
//              is the key nearest the mean key; each further seed is the key farthest
//              (Euclidean) from the seeds so far; then kKMeansRounds Lloyd rounds
//              (assign to the nearest centroid, ties to the lower index; recompute).
//              Deterministic. A block of n < C valid tokens has n non-empty clusters.
//   kMean      rows = 1, the mean key, weight n.
//   kMinMax    rows = 2, per-channel min (row 0) and max (row 1) over the valid
//              tokens, weights n and n.
//   kTopR      rows = R, the keys of the R tokens with the highest score (ties: lower
//              token first; InfLLM), each of weight n / R; without scores, the R keys of
//              largest L2 norm. A block of n < R valid tokens repeats row j % n.
// Only the first `valid_tokens` tokens of the block are read (a partly filled block).
//
// The summary of a block is a pure function of its keys (and scores), so a reopened store
// rebuilds the same index. The clustering's float arithmetic has one evaluation order per
// code path (index/simd.h: fixed 8-lane FMA accumulation, batched helpers that give the
// bits of the one-at-a-time calls), independent of threads and of how the work is
// batched: the same bits on every x86-64 machine with AVX2 + FMA + F16C. The portable
// fallback (no AVX2) sums in another order, so there the clusters may differ in the last
// bits (and then rarely in an assignment).
#ifndef KVTIER_INDEX_SUMMARY_H_
#define KVTIER_INDEX_SUMMARY_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtier/layout.h"
#include "kvtier/retrieval.h"
#include "kvtier/status.h"

namespace kvtier {

inline constexpr uint32_t kKMeansRounds = 4;
inline constexpr uint32_t kMaxSummaryRows = 64;

struct SummaryShape {
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t block_tokens = 0;
  DType dtype = DType::kBF16;  // of the block's keys
  SummaryKind kind = SummaryKind::kClusters;
  uint32_t rows = 4;  // C, 1, 2 or R: SummaryRows()

  // The shape for a layout and retrieval options.
  static SummaryShape For(const ModelLayout& layout, const RetrievalOptions& options);
  uint64_t vector_elements() const { return uint64_t{num_kv_heads} * rows * head_dim; }
  uint64_t weight_elements() const { return uint64_t{num_kv_heads} * rows; }
  // Bytes of a summary in memory (fp16 vectors + float weights).
  uint64_t bytes() const { return vector_elements() * 2 + weight_elements() * 4; }
};

// Rows per KV head for a kind: clusters, 1, 2, top_r.
uint32_t SummaryRows(SummaryKind kind, uint32_t clusters, uint32_t top_r);

// InvalidArgument for a shape the summarizer cannot handle (zero sizes, head_dim above
// 1024, block_tokens above 4096, rows outside [1, kMaxSummaryRows] or not what the kind
// requires, an unknown kind or dtype).
Status ValidateSummaryShape(const SummaryShape& shape);

struct BlockSummary {
  uint32_t valid_tokens = 0;
  std::vector<uint16_t> vectors;  // fp16 bits, [num_kv_heads][rows][head_dim]
  std::vector<float> weights;     // [num_kv_heads][rows]
};

// Summarizes one block in kvtier's format (keys first: [num_kv_heads][block_tokens]
// [head_dim] of shape.dtype; values are not read). `valid_tokens` in [1, block_tokens];
// `scores` float [num_kv_heads][block_tokens] (the attention each token received) or
// empty; only kTopR reads it. Resizes `out`'s vectors (no allocation when they already
// have the size). Runs on the calling thread.
Status SummarizeBlock(const SummaryShape& shape, const void* block, uint32_t valid_tokens,
                      std::span<const float> scores, BlockSummary* out);

// The first pass of two-stage scoring (IndexConfig::coarse_rows, index/layer_index.h): a
// kClusters summary's C clusters merged into `coarse_rows` (< C) rows per KV head, int8
// with a scale per row. Per KV head: the non-empty clusters, if no more than coarse_rows,
// stay one per row; else they are grouped by weighted k-means over the centroids (seed 0
// the centroid nearest the weighted mean, each further seed the centroid farthest from
// the seeds so far, ties to the lower index; kKMeansRounds Lloyd rounds, ties to the lower
// group). A row is its group's weighted mean (the mean of the group's keys), weight the
// group's tokens; unused rows have weight 0 and a zero vector. Quantization: scale =
// max |x_c| / 127, value_c = round(x_c / scale) (half away from zero); a zero row has
// scale 0. Deterministic, in float.
struct CoarseSummary {
  std::vector<int8_t> vectors;  // [num_kv_heads][coarse_rows][head_dim]
  std::vector<float> scales;    // [num_kv_heads][coarse_rows]: row = vectors * scale
  std::vector<float> weights;   // [num_kv_heads][coarse_rows]
};
// `shape` is the full summary's (kClusters), coarse_rows in [1, shape.rows). Resizes
// `out`'s vectors (no allocation when they already have the size).
void CoarsenSummary(const SummaryShape& shape, const BlockSummary& summary, uint32_t coarse_rows,
                    CoarseSummary* out);

// The catalog's bytes for a summary: a version byte, the kind, rows, num_kv_heads,
// head_dim, valid_tokens, then the weights and the fp16 vectors, little-endian.
std::vector<std::byte> EncodeSummary(const SummaryShape& shape, const BlockSummary& summary);
// Corruption when the bytes are not a summary of `shape` (version, sizes, kind).
Status DecodeSummary(const SummaryShape& shape, std::span<const std::byte> bytes,
                     BlockSummary* out);

}  // namespace kvtier

#endif  // KVTIER_INDEX_SUMMARY_H_
