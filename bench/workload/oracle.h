// AttentionOracle: the true attention of one decoding step of one layer, kept per block,
// and the metrics a retrieval selection is judged by. The reference the retrieval
// benchmarks, `kvtier eval` and the tests compare every index against.
//
// ## What is computed (all in double precision)
// Inputs: the step's queries q_j, j < H (num_query_heads, [H][head_dim]), and the keys
// k_t and values v_t of the layer's tokens t < T, fed in order (whole or streamed in
// pieces). Query head j reads KV head j / (H / num_kv_heads) (GQA). With
// s_{j,t} = scale * q_j . k_t (scale = 1/sqrt(head_dim) unless given):
//   p_{j,t}     = exp(s_{j,t}) / sum_u exp(s_{j,u})     full softmax over all T tokens
//   mass_j(b)   = sum over tokens t of block b of p_{j,t}          (block b = tokens
//                 [b * block_tokens, (b + 1) * block_tokens), the last one possibly short)
//   mass(b)     = sum_j mass_j(b)                   the block's oracle score; the masses of
//                 all blocks sum to H
//   full_j      = sum_t p_{j,t} v_t                 the full attention output of head j
//
// ## The policy: sinks, local window, top-k
// A sparse step attends to the sink blocks (every block holding one of the first
// sink_tokens tokens: blocks [0, ceil(sink_tokens / block_tokens))), the local window
// (every block holding one of the last local_tokens tokens: blocks
// [floor((T - local_tokens) / block_tokens), num_blocks)) and the blocks the retrieval
// selected. The attended set A is the union of the three, at block granularity (a block
// is fetched whole). The candidates are the blocks in neither the sinks nor the window.
//
// ## Metrics of a selection S (a list of block indices)
//   oracle top-k   O: the min(k, #candidates) candidates of largest mass(b) (ties: the
//                  lower index first). Sinks and the window never count: the selection
//                  gets them for free, as the oracle does.
//   recall@k       (blocks of O that S holds) / |O|; 1 when there is no candidate at
//                  all. Entries of S that are sinks, window blocks or repeated add
//                  nothing; a selection longer than k can only gain, so compare
//                  selections of k blocks.
//   coverage       mean over query heads of sum_{b in A} mass_j(b): the share of the true
//                  attention the sparse step sees (1 when A holds every block).
//                  coverage_min_head is the smallest per-head value.
//   output error   sparse_j = sum_{t in A} p_{j,t} v_t / sum_{t in A} p_{j,t}, softmax
//                  restricted to A; per head e_j = |sparse_j - full_j| / |full_j| (L2).
//                  output_rel_l2 pools the heads: sqrt(sum_j |sparse_j - full_j|^2 /
//                  sum_j |full_j|^2); output_rel_l2_max_head = max_j e_j. 0 when A holds
//                  every block. NaN when the oracle keeps no outputs.
//   needle hits    per needle token: whether its block is in A.
//
// Memory: per block and query head two doubles, plus head_dim doubles for the outputs
// when keep_outputs (1M tokens, 128-token blocks, 32 heads, head dim 128: 270 MB; without
// outputs 4 MB).
//
// Thread safety: one thread feeds an oracle; after the last token, the const methods may
// be called from several threads.
#ifndef KVTIER_BENCH_WORKLOAD_ORACLE_H_
#define KVTIER_BENCH_WORKLOAD_ORACLE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "kvtier/layout.h"
#include "kvtier/status.h"

namespace kvtier::bench {

struct OracleConfig {
  uint32_t num_query_heads = 0;  // a multiple of num_kv_heads
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t block_tokens = 128;
  // Softmax scale; 0 = 1 / sqrt(head_dim). Default: 0.
  double scale = 0.0;
  // Keep the per-block outputs the output error needs. Default: true.
  bool keep_outputs = true;
};

// The sparse step's fixed part and its budget (InfLLM's n_init, n_local, topk).
struct SparsePolicy {
  uint32_t sink_tokens = 0;   // n_init
  uint32_t local_tokens = 0;  // n_local
  uint32_t top_k = 0;         // blocks retrieval selects
};

struct SelectionMetrics {
  double recall = 0.0;
  uint32_t oracle_k = 0;  // |O|
  double coverage = 0.0;
  double coverage_min_head = 0.0;
  double output_rel_l2 = 0.0;
  double output_rel_l2_max_head = 0.0;
  uint64_t attended_blocks = 0;  // |A|
  std::vector<bool> needle_hits;
};

class AttentionOracle {
 public:
  // Copies `queries` ([num_query_heads][head_dim]). InvalidArgument for a bad config or
  // a short span.
  static Result<std::unique_ptr<AttentionOracle>> Create(const OracleConfig& config,
                                                         std::span<const float> queries);

  // Appends `count` tokens after those already added: keys and values as float
  // [count][num_kv_heads][head_dim]. `values` may be empty when keep_outputs is false.
  Status AddTokens(std::span<const float> keys, std::span<const float> values, uint64_t count);
  // Appends the first `valid_tokens` tokens of a block in kvtier's format (keys then
  // values, each [num_kv_heads][block_tokens][head_dim] of `dtype`). The tokens added
  // so far must be a whole number of blocks.
  Status AddBlock(const void* block, DType dtype, uint32_t valid_tokens);

  uint64_t num_tokens() const { return num_tokens_; }
  uint64_t num_blocks() const { return num_blocks_; }
  const OracleConfig& config() const { return config_; }

  // mass(b) (summed over query heads) of every block, and mass_j(b) of one head.
  std::vector<double> BlockMasses() const;
  double HeadBlockMass(uint32_t query_head, uint64_t block) const;
  // log sum_t exp(s_{j,t}) of one head (natural log); -infinity before any token.
  double LogSumExp(uint32_t query_head) const;
  // full_j of every head, [num_query_heads][head_dim]; empty without keep_outputs.
  std::vector<double> FullOutput() const;

  // The blocks [begin, end) the policy always attends: sinks and the local window.
  std::pair<uint64_t, uint64_t> SinkBlocks(const SparsePolicy& policy) const;
  std::pair<uint64_t, uint64_t> LocalBlocks(const SparsePolicy& policy) const;
  // O, best first.
  std::vector<uint64_t> OracleTopK(const SparsePolicy& policy) const;
  // The metrics of `selected` (block indices < num_blocks(); InvalidArgument otherwise)
  // and of needles at `needle_tokens` (each < num_tokens()).
  Result<SelectionMetrics> Evaluate(const SparsePolicy& policy, std::span<const uint64_t> selected,
                                    std::span<const uint64_t> needle_tokens = {}) const;

 private:
  AttentionOracle(const OracleConfig& config, std::span<const float> queries);
  // Per head, the log-sum-exp of the scores of the blocks marked in `in_set` (every
  // block when empty), and the softmax output restricted to them (when `out` is not null).
  void Restricted(const std::vector<bool>& in_set, std::vector<double>& lse,
                  std::vector<double>* out) const;

  OracleConfig config_;
  double scale_;
  std::vector<float> queries_;  // [H][D]
  uint64_t num_tokens_ = 0;
  uint64_t num_blocks_ = 0;
  // Per block and head: running max of the scores, sum of exp(s - max), and (with
  // keep_outputs) sum of exp(s - max) v.
  std::vector<double> max_;  // [block][H]
  std::vector<double> sum_;  // [block][H]
  std::vector<double> out_;  // [block][H][D]
};

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_WORKLOAD_ORACLE_H_
