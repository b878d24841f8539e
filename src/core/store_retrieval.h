// RetrievalIndexes: the Store's retrieval state (kvtier/retrieval.h): one LayerIndex per
// (namespace, sequence, layer), created on the first block of the layer, and Select.
//
// Ordering. The store records each change to the indexed blocks (QueueAdd, QueueRemove,
// DropSequence) under its own lock, in the order it makes the changes to its blocks; a
// change is only queued there (per layer). The queue is applied to the LayerIndex, in
// order, under the layer's own mutex: by Apply, which the store calls once it has
// released its lock, and by Select before it scores. So the index of a layer always
// reflects a prefix of the store's history, the store's lock is never held while an
// index is updated or scored, and Selects of different layers or sequences run in
// parallel.
//
// Locks (never nested except as listed): the store's mutex -> map_mu_ (the sequences'
// map); the store's mutex -> a layer's queue_mu; a layer's index_mu -> its queue_mu.
// map_mu_ and queue_mu are held only for a lookup, a push or a swap.
//
// Thread safety: Queue*, DropSequence and Rebuild must be serialized by the caller (the
// store calls them under its lock); Apply, ApplyAll, Select and AddStats may be called
// from any thread at any time.
#ifndef KVTIER_CORE_STORE_RETRIEVAL_H_
#define KVTIER_CORE_STORE_RETRIEVAL_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "index/layer_index.h"
#include "index/summary.h"
#include "kvtier/block_key.h"
#include "kvtier/layout.h"
#include "kvtier/retrieval.h"
#include "kvtier/status.h"
#include "kvtier/store.h"
#include "src/core/block_index.h"
#include "src/util/mutex.h"

namespace kvtier {

inline constexpr uint32_t kMaxPrefetchExtra = 64;

class RetrievalIndexes {
 public:
  struct Sequence;  // the layers of one (namespace, sequence)
  // A layer whose queued changes are to be applied (Apply). Keeps the sequence alive.
  struct LayerRef {
    std::shared_ptr<Sequence> sequence;
    uint32_t layer = 0;
  };

  // Validates `options` for `layout` (summary shape, ranges, backend and scope; kAuto
  // becomes kScan) and creates one index to check that the backend is available.
  // InvalidArgument (or the backend's error) naming the field.
  static Result<std::unique_ptr<RetrievalIndexes>> Create(const ModelLayout& layout,
                                                          const RetrievalOptions& options);
  ~RetrievalIndexes();
  RetrievalIndexes(const RetrievalIndexes&) = delete;
  RetrievalIndexes& operator=(const RetrievalIndexes&) = delete;

  const IndexConfig& config() const { return config_; }
  const SummaryShape& shape() const { return config_.summary; }

  // Records that `key`'s summary is now `summary` (a new block, or a new summary for it).
  LayerRef QueueAdd(const BlockKey& key, BlockSummary summary);
  // Records that `key` left the store; returns an empty LayerRef when it was not
  // indexed. When it was the sequence's last indexed block, the sequence is unlinked and
  // handed to *retired, for the caller to destroy once it has released its lock.
  LayerRef QueueRemove(const BlockKey& key, std::shared_ptr<Sequence>* retired);
  // Unlinks every layer of the sequence (nullptr when none); destroy outside the lock.
  std::shared_ptr<Sequence> DropSequence(uint32_t namespace_id, const SequenceId& sequence);

  // Applies the queued changes of one layer, or of every layer of every sequence.
  void Apply(const LayerRef& ref);
  void ApplyAll();

  // Store::Select (kvtier/store.h), arguments checked here. With a non-empty
  // `runners_up` (kPerLayer only; at most kMaxPrefetchExtra), the blocks ranked right after
  // the top_k go there (-1 padded), from the same scoring pass.
  Result<SelectInfo> Select(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                            std::span<const float> queries, uint64_t context_tokens,
                            std::span<int64_t> selected, std::span<float> scores,
                            std::span<int64_t> runners_up);

  // Fills the retrieval fields of `stats` (indexed_blocks counts the changes queued so
  // far; index_memory_bytes the indexes as applied).
  void AddStats(StoreStats* stats) const;

 private:
  struct Counters {
    std::atomic<uint64_t> indexed_blocks{0};
    std::atomic<uint64_t> memory_bytes{0};
    std::atomic<uint64_t> selects{0};
    std::atomic<uint64_t> select_nanos{0};
  };

  RetrievalIndexes(const ModelLayout& layout, const RetrievalOptions& options,
                   const IndexConfig& config);
  std::shared_ptr<Sequence> Find(uint32_t namespace_id, const SequenceId& sequence) const;

  const ModelLayout layout_;
  const RetrievalOptions options_;
  const IndexConfig config_;
  Counters counters_;
  mutable Mutex map_mu_;
  std::unordered_map<SequenceKey, std::shared_ptr<Sequence>, SequenceKeyHash> sequences_
      KVTIER_GUARDED_BY(map_mu_);
};

}  // namespace kvtier

#endif  // KVTIER_CORE_STORE_RETRIEVAL_H_
