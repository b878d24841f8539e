// EmbeddedStore: the Store that runs inside the caller's process (kvtier/store.h). Its
// state and locking rules are EmbeddedStore::Impl (store_impl.h); Store::Open makes one
// unless the options name a sidecar.
#ifndef KVTIER_CORE_EMBEDDED_STORE_H_
#define KVTIER_CORE_EMBEDDED_STORE_H_

#include <memory>

#include "kvtier/store.h"

namespace kvtier {

class BlockSource;  // src/core/device_cache.h

// What one namespace holds (for quotas and the sidecar's metrics). The block counts are
// exact at any moment (a Put counts once committed); the quota counters count since Open
// and stay zero for a namespace without an entry in StoreOptions::quotas.
struct NamespaceUsage {
  uint64_t blocks = 0;            // blocks in the store (what its disk quota counts)
  uint64_t host_blocks = 0;       // of those, resident in the host tier
  uint64_t quota_rejections = 0;  // operations refused with QuotaExceeded
  uint64_t quota_evictions = 0;   // its blocks evicted to stay within its host quota
};

class EmbeddedStore final : public Store {
 public:
  // Validates `layout` and `options` (options.sidecar is ignored), allocates the host
  // tier, opens the disk tier and starts the async threads.
  static Result<std::unique_ptr<EmbeddedStore>> Open(const StoreOptions& options,
                                                     const ModelLayout& layout);
  ~EmbeddedStore() override;

  const ModelLayout& layout() const override;
  const StoreOptions& options() const override;
  uint64_t block_bytes() const override;
  Status Put(const BlockKey& key, const void* data, uint64_t bytes) override;
  Status Get(const BlockKey& key, void* data, uint64_t bytes) override;
  bool Contains(const BlockKey& key) const override;
  Status Delete(const BlockKey& key) override;
  Result<uint64_t> DropSequence(uint32_t namespace_id, const SequenceId& sequence) override;
  StoreStats Stats() const override;
  Status Flush() override;
  Status PutFromPagedCache(std::span<const BlockKey> keys, const PagedCacheDesc& cache,
                           const void* k_base, const void* v_base,
                           std::span<const int32_t> page_table, CUstream_st* stream,
                           std::span<Status> statuses) override;
  Status PutBatch(std::span<const BlockWrite> writes, std::span<Status> statuses) override;
  Status GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses) override;
  using Store::GetAsync;
  using Store::GetBatchAsync;
  using Store::PutAsync;
  using Store::PutBatchAsync;
  void PutAsync(const BlockKey& key, const void* data, uint64_t bytes, Completion done) override;
  void GetAsync(const BlockKey& key, void* data, uint64_t bytes, Completion done) override;
  void PutBatchAsync(std::span<const BlockWrite> writes, std::span<Status> statuses,
                     Completion done) override;
  void GetBatchAsync(std::span<const BlockRead> reads, std::span<Status> statuses,
                     Completion done) override;
  Status Borrow(std::span<const BlockKey> keys, std::span<Status> statuses,
                std::unique_ptr<BorrowedBlocks>* blocks) override;
  Result<std::unique_ptr<PutBuffers>> Reserve(size_t count) override;
  Status IndexBlock(const BlockKey& key, const void* data, uint64_t bytes, uint32_t valid_tokens,
                    std::span<const float> token_scores) override;
  Result<SelectInfo> Select(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                            std::span<const float> queries, uint64_t context_tokens,
                            std::span<int64_t> selected, std::span<float> scores = {}) override;
  // Select that also writes the blocks ranked right after the top_k to `runners_up`
  // (kPerLayer only; at most 64; -1 padded): what a GPU tier prefetches. The sidecar
  // serves it to clients, whose GPU tier is their own.
  Result<SelectInfo> SelectWithRunnersUp(uint32_t namespace_id, const SequenceId& sequence,
                                         uint32_t layer, std::span<const float> queries,
                                         uint64_t context_tokens, std::span<int64_t> selected,
                                         std::span<float> scores, std::span<int64_t> runners_up);
  Result<AcquireInfo> Acquire(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                              std::span<const int64_t> blocks, CUstream_st* stream,
                              std::span<uint64_t> device_addresses,
                              std::span<const float> scores = {}) override;
  Status Release(uint64_t lease) override;

  // GetBatch when no found block is on disk only: served on the calling thread with
  // nothing to wait for but the store's lock and the copies, and true. False, having
  // done nothing, when a block would be read from disk (or the spans differ in size):
  // the caller then uses GetBatch or GetBatchAsync. For a caller that must not block on
  // I/O (kvtierd's io threads).
  bool GetBatchFromHost(std::span<const BlockRead> reads, std::span<Status> statuses);
  // Borrow, the same way: true having lent the blocks, pinned in their host-tier slots
  // (every found block is there: no promotion, so no wait for the disk); false, having
  // done nothing (*blocks unset), when a found block is on disk only or the spans differ
  // in size. For kvtierd's io threads, which send blocks from their slots.
  bool BorrowFromHost(std::span<const BlockKey> keys, std::span<Status> statuses,
                      std::unique_ptr<BorrowedBlocks>* blocks);

  // What `namespace_id` holds now (zeros for an unknown namespace). Takes the store's
  // lock for one hash lookup; safe from any thread.
  NamespaceUsage Usage(uint32_t namespace_id) const;

  // The store's blocks as a BlockSource (src/core/device_cache.h): PinHost makes blocks
  // readable in host-tier slots (promoting them from disk) until UnpinHost. What the GPU
  // tier pulls through, and what kvtierd copies from into a client's GPU tier. Lives as
  // long as the store; thread-safe (it takes the store's lock).
  BlockSource& host_block_source();

  struct Impl;

 private:
  explicit EmbeddedStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier

#endif  // KVTIER_CORE_EMBEDDED_STORE_H_
