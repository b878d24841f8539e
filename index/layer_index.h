// LayerIndex: the retrieval index of one (sequence, layer): the summaries of its blocks,
// and Select, which ranks them for one decoding step's queries.
//
// ## The estimator (every backend but kInfLLM)
// Queries q_h, h < Hq, float [Hq][head_dim], post-rotary; query head h reads KV head
// h / (Hq / num_kv_heads). s = scale (1/sqrt(head_dim) unless configured). For block b
// with rows r_{kv,j} and weights w_{kv,j} (index/summary.h), kv = kv head of h:
//   kClusters, kMean, kTopR:  e_h(b) = log sum_j w_j exp(s q_h . r_j)   (rows of weight 0
//                             are skipped)  -- an estimate of log sum_t exp(s q_h . k_t)
//   kMinMax:                  e_h(b) = s sum_c max(q_hc min_c, q_hc max_c) + log n_b
//                             (Quest's bound on the largest logit, times the tokens)
// Per head, Z_h = log sum_b exp(e_h(b)) over every block of the index (sinks and local
// window included: they take their share of each head's attention). The fused score
//   kPerLayer:   F(b)      = sum_h exp(e_h(b) - Z_h)          (estimates sum_h mass_h(b))
//   kPerKvHead:  F_kv(b)   = sum_{h of kv} exp(e_h(b) - Z_h)
// Select returns the top_k candidates by F (ties: lower block id first), candidates being
// the indexed blocks with candidates_begin <= id < candidates_end.
//
// ## Two-stage scoring (kScan, kClusters, IndexConfig::coarse_rows > 0)
// Per score row r (kPerLayer: one, over every query head; kPerKvHead: one per KV head,
// over its group):
//   1. e1_h(b): the estimator over b's coarse rows (CoarsenSummary, index/summary.h: the
//      clusters merged into coarse_rows int8 rows, value = int8 * scale), every block,
//      with the query s q_h (s q_h computed in float) quantized by simd::QuantizeI16 to
//      int16 values u_h times a scale a_h: s q_h . r_j is taken as (u_h . int8_j) a_h
//      scale_j, the integer dot product exact (index/simd.h).
//      Z1_h = log sum_b exp(e1_h(b)); F1_r(b) = sum_{h of r} exp(e1_h(b) - Z1_h).
//   2. The shortlist S_r: the L = min(shortlist_factor * top_k, candidates) best
//      candidates by F1_r (ties: lower id). The fine set P_r = S_r and every
//      non-candidate (the sinks and the local window, which hold much of each head's
//      attention and so of Z_h).
//   3. e2_h(b): the estimator over b's full summary, b in P_r.
//      Z_h = log(sum_{b in P_r} exp(e2_h(b)) + sum_{b not in P_r} exp(e1_h(b))).
//   4. F_r(b) = sum_{h of r} exp(e2_h(b) - Z_h) for b in S_r; Select returns S_r's top_k
//      by F_r (ties: lower id), and F_r as scores.
// When S_r holds every candidate, P_r holds every block and this is the one-stage
// estimator over the full summaries exactly. ReferenceSelect computes the same in double.
//
// ## kInfLLM (the baseline)
// InfLLM's FAISS formulation: per block one vector, the concatenation over query heads
// h of v_{kv(h)}, v_kv = the weighted mean of the block's rows of KV head kv; the query is
// the concatenation of the q_h; F(b) = q . v = sum_h q_h . v_{kv(h)} (no softmax). FAISS
// IndexFlatIP finds the top_k (it searches all blocks; non-candidates are dropped, so it
// asks for top_k plus the number of non-candidates). kPerKvHead is not supported.
//
// ## Output
// `out`: kPerLayer: top_k block ids, best first; kPerKvHead: [num_kv_heads][top_k]. -1
// pads when there are fewer candidates. `scores` (may be empty; else the same size): F of
// each selected block (0 for padding).
//
// Thread safety: one thread at a time per LayerIndex (Select keeps scratch in the index so
// that a decoding step allocates nothing once the index has seen its size).
#ifndef KVTIER_INDEX_LAYER_INDEX_H_
#define KVTIER_INDEX_LAYER_INDEX_H_

#include <cstdint>
#include <memory>
#include <span>

#include "index/summary.h"
#include "kvtier/retrieval.h"
#include "kvtier/status.h"

namespace kvtier {

struct IndexConfig {
  uint32_t num_query_heads = 0;
  SummaryShape summary;                        // num_kv_heads, head_dim, kind, rows
  IndexBackend backend = IndexBackend::kScan;  // not kAuto
  uint32_t hnsw_m = 32;
  uint32_t hnsw_ef_search = 128;
  float scale = 0.0f;  // 0: 1 / sqrt(head_dim)
  // Two-stage scoring (see the top of this file): 0 = off. Only kScan with kClusters
  // summaries, coarse_rows in [1, summary.rows), shortlist_factor >= 1.
  uint32_t coarse_rows = 0;
  uint32_t shortlist_factor = 0;
};

struct SelectParams {
  std::span<const float> queries;  // [num_query_heads][head_dim]
  uint32_t top_k = 16;
  SelectionScope scope = SelectionScope::kPerLayer;
  uint64_t candidates_begin = 0;         // blocks below are sinks (attended anyway)
  uint64_t candidates_end = UINT64_MAX;  // blocks from here on are the local window
};

class LayerIndex {
 public:
  virtual ~LayerIndex() = default;
  const IndexConfig& config() const { return config_; }

  // Adds block `block`'s summary (of config().summary's shape), replacing any earlier one.
  virtual Status Add(uint64_t block, const BlockSummary& summary) = 0;
  // Removes a block; false when it was not there.
  virtual bool Remove(uint64_t block) = 0;
  virtual uint64_t size() const = 0;
  // Bytes the index holds (summaries, FAISS structures, scratch).
  virtual uint64_t memory_bytes() const = 0;
  // See the top of this file. InvalidArgument for a short `queries`, top_k 0, `out` not
  // of the scope's size, `scores` neither empty nor that size, a scope the backend lacks.
  virtual Status Select(const SelectParams& params, std::span<int64_t> out,
                        std::span<float> scores) = 0;

 protected:
  explicit LayerIndex(const IndexConfig& config) : config_(config) {}
  IndexConfig config_;
};

// InvalidArgument for a bad config (ValidateSummaryShape, Hq not a multiple of the KV
// heads, kAuto, unknown backend, kMinMax with HNSW).
Result<std::unique_ptr<LayerIndex>> CreateLayerIndex(const IndexConfig& config);

// The output size of Select for a scope: top_k or num_kv_heads * top_k.
uint64_t SelectOutputSize(const IndexConfig& config, SelectionScope scope, uint32_t top_k);

// The argument checks every backend's Select makes first (see Select).
Status ValidateSelect(const IndexConfig& config, const SelectParams& params,
                      std::span<const int64_t> out, std::span<const float> scores);

// Reference (tests, benchmarks): the estimator above (two-stage when config.coarse_rows >
// 0) computed in double precision, straight from the definition, over the given blocks
// (ids[i] has summaries[i]).
// Writes the selection like Select.
Status ReferenceSelect(const IndexConfig& config, std::span<const uint64_t> ids,
                       std::span<const BlockSummary* const> summaries, const SelectParams& params,
                       std::span<int64_t> out, std::span<float> scores);

}  // namespace kvtier

#endif  // KVTIER_INDEX_LAYER_INDEX_H_
