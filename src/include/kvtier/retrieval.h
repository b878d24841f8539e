// Retrieval: at each decoding step, for each layer, the few blocks of a long sequence
// that attention needs (InfLLM's block retrieval), and the GPU tier that holds them.
//
// ## How a sequence is indexed
// With RetrievalOptions::enabled, every block a Put (or PutBatch, PutFromPagedCache)
// stores gets a *summary*: a few vectors per KV head computed from the block's keys
// (the keys an engine caches, post-rotary). The summary goes into the retrieval index of
// its (namespace, sequence, layer) and, with a disk tier, into the catalog with the
// block's entry, so the index is rebuilt when the store is reopened. Delete and
// DropSequence remove it.
//
// ## Summaries (SummaryKind)
//   kClusters  (default) C centroids per KV head from a few rounds of k-means over the
//              block's keys (farthest-point seeding from the mean key, so a lone
//              outlying key, a "needle", keeps a centroid of its own), each with its
//              token count. Needs no attention scores. The scan backend scores them in
//              two stages: merged into a few int8 rows for a pass over every block, then
//              in full for a shortlist (RetrievalOptions::coarse_clusters).
//   kMean      the mean key (C = 1, weight = tokens): InfLLM's representative without
//              scores.
//   kMinMax    per-channel min and max (Quest).
//   kTopR      InfLLM: the R keys that received the most attention; needs per-token
//              scores (Store::IndexBlock), else falls back to the R keys of largest norm.
//
// ## Scoring (the estimator; index/layer_index.h has the exact definition)
// A block's true share of query head h's attention is mass_h(b) = sum over its tokens
// of exp(q_h . k / sqrt(d)) / Z_h. From a cluster summary the index estimates the log
// of the numerator, e_h(b) = log sum_c n_c exp(q_h . mu_c / sqrt(d)), normalises it by
// the log-sum-exp of e_h over every indexed block of the layer (sinks and local window
// included), and ranks candidates by sum_h exp(e_h(b) - Z_h) (kPerLayer; one selection
// per layer) or by the same sum over a KV head's query heads (kPerKvHead). kMinMax
// scores each head by Quest's upper bound, kTopR by InfLLM's mean dot product; both go
// through the same normalisation.
//
// ## The budget (InfLLM's Llama-3 configuration by default)
// A step attends to the sink blocks (those holding the first n_init tokens), the local
// window (blocks holding the last n_local tokens of the context) and top_k selected
// blocks from the rest.
#ifndef KVTIER_RETRIEVAL_H_
#define KVTIER_RETRIEVAL_H_

#include <cstdint>
#include <string_view>

namespace kvtier {

enum class SummaryKind : uint8_t {
  kClusters = 0,
  kMean = 1,
  kMinMax = 2,
  kTopR = 3,
};
// "clusters", "mean", "minmax", "topr".
std::string_view SummaryKindName(SummaryKind kind);

// Where selection runs.
enum class IndexBackend : uint8_t {
  kAuto = 0,       // kScan (kGpu is chosen explicitly until it has been measured on a GPU)
  kScan = 1,       // kvtier's exact scan: fp16 summaries, AVX2/F16C, one core
  kFaissFlat = 2,  // FAISS IndexFlatIP over the same summaries: exact, same estimator
  kFaissHnsw = 3,  // FAISS IndexHNSWFlat: approximate candidates, rescored exactly
  kInfLLM = 4,     // InfLLM's formulation: one vector per block, the per-query-head
                   // representative means concatenated, FAISS IndexFlatIP (baseline)
  kGpu = 5,        // the scan's estimator on a CUDA device: fp16 summaries in device
                   // memory, one pass per Select; same selection as kScan (to float
                   // rounding). Without a device it runs the kernels' CPU reference over
                   // host arrays (tests). No kMinMax summaries.
};
// "auto", "scan", "faiss-flat", "faiss-hnsw", "infllm", "gpu".
std::string_view IndexBackendName(IndexBackend backend);

enum class SelectionScope : uint8_t {
  kPerLayer = 0,   // one set of top_k blocks for all heads of the layer (InfLLM)
  kPerKvHead = 1,  // top_k blocks per KV head (their union is fetched)
};

// GPU-tier replacement when a block must be brought in and the tier is full.
enum class ReplacementPolicy : uint8_t {
  kLru = 0,         // least recently acquired first
  kScoreDecay = 1,  // InfLLM: each acquire adds the block's selection score to a
                    // per-block value that decays by score_decay per step; lowest first
};

struct RetrievalOptions {
  // Summaries computed on Put, the index maintained, Select and Acquire available.
  // Default: false (a plain cache pays nothing).
  bool enabled = false;

  // Default: kClusters with 12 centroids per KV head, scored in two stages (below), for
  // recall@16 >= 0.9 within the 1 ms Select budget at 128K tokens on one core
  // (`kvtier-bench retrieval`, three workload seeds; bench/RESULTS.md). Summarising a
  // 512 KiB block takes ~0.9 ms (3 centroids: ~0.3 ms); the catalog stores 25 KB per
  // block of Llama-3-8B (3: 6 KB). R = 4 for kTopR. A store written with other summary
  // options does not index its blocks until they are indexed again (the store logs it).
  SummaryKind summary = SummaryKind::kClusters;
  uint32_t clusters = 12;
  uint32_t top_r = 4;

  // Two-stage scoring (kClusters on the scan backend): a first pass over every block with
  // each block's clusters merged into coarse_clusters int8 rows per KV head keeps the
  // shortlist_factor * top_k best candidates; the full summaries of those (and of the
  // sink and local-window blocks, for the normalisation) rank them
  // (index/layer_index.h). It reads ~1/2 the bytes of a one-pass scan of 3 centroids and
  // ranks by 12. 0 (either), or coarse_clusters >= clusters: one pass over the full
  // summaries, as the other backends always do. Default: 2 and 3.
  uint32_t coarse_clusters = 2;
  uint32_t shortlist_factor = 3;

  // Default: kAuto.
  IndexBackend backend = IndexBackend::kAuto;
  // HNSW: neighbours per node, and the search breadth (candidates kept while searching).
  // Default: 32, 128.
  uint32_t hnsw_m = 32;
  uint32_t hnsw_ef_search = 128;

  // The step's budget. Default: InfLLM's Llama-3 config: 16 blocks, 128 sink tokens,
  // a 4096-token local window.
  uint32_t top_k = 16;
  uint32_t n_init = 128;
  uint32_t n_local = 4096;
  // Default: kPerLayer.
  SelectionScope scope = SelectionScope::kPerLayer;

  // --- GPU tier (Acquire/Release) ---
  // Bytes of GPU memory for resident blocks (emulated in host memory without a GPU).
  // 0: no GPU tier; Acquire returns FailedPrecondition. Default: 0.
  uint64_t device_capacity_bytes = 0;
  // Default: kLru (on the decode trace of `kvtier-bench retrieval` it stalls less than
  // score decay: bench/RESULTS.md); score_decay 0.9 per step for kScoreDecay.
  ReplacementPolicy replacement = ReplacementPolicy::kLru;
  float score_decay = 0.9f;
  // Prefetch: Select ranks prefetch_extra blocks beyond top_k; after the layer's
  // Acquire, those runners-up (the blocks most likely to enter the next step's selection
  // as the queries drift) and the next layer's previous selection are brought into the
  // GPU tier in the background, while the engine computes. Default: true, 4 blocks.
  bool prefetch = true;
  uint32_t prefetch_extra = 4;
  // 0: one GPU-tier pool shared by every layer (the policy decides what stays). > 0:
  // InfLLM's arrangement, a fixed number of blocks per layer, each layer evicting only
  // its own (needs device capacity for num_layers * this many blocks). Default: 0.
  uint32_t device_blocks_per_layer = 0;
  // Emulate the GPU tier in host memory even when a GPU is present (tests). Default: false.
  bool force_emulated_device = false;
};

}  // namespace kvtier

#endif  // KVTIER_RETRIEVAL_H_
