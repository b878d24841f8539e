// EmbeddedStore::Impl: the state behind kvtier::Store and its locking rules. Split across
// store.cc (open, the host tier, the public calls) and store_disk.cc (the disk tier:
// write-back, the catalog, promotion, recovery).
//
// Locking: one mutex (`mu`) guards the index, the host pool's bookkeeping, the extent
// map, the write-back queues and the counters. It is never held while block bytes are
// copied, hashed or read/written on disk, nor during a catalog commit: an operation
// pins what it needs under the lock, works without it, then commits under it again.
//
// Write-back pipeline (disk tier only), all driven by the background thread:
//   Put -> dirty host slot, pinned, in `write_queue`
//       -> extent allocated, checksum, DiskTier::Write       (`writes_in_flight`)
//       -> completed writes gathered, then one DiskTier::Sync  (`sync_group`)
//       -> a catalog job: entries still current are committed (synced WAL)
//       -> applied: the entry points at its new extent, the old extent is freed, the
//          slot is clean (evictable) and unpinned.
// Deletes queue catalog jobs in the same FIFO, so the catalog sees every key's changes
// in the order the store made them. An extent is freed only once no durable catalog
// entry references it and no read is in flight on it.
//
// Retrieval (store_retrieval.cc): a Put summarizes its block on the caller's thread
// (from the caller's data; PutFromPagedCache from the pinned slot after the gather)
// before it takes `mu`; under `mu` the summary is queued for the index of its layer
// (RetrievalIndexes, applied once `mu` is released) and, with a disk tier, its encoding
// waits in `pending_summaries` for the block's catalog commit, which writes the entry
// and the summary in one batch. IndexBlock replaces the summary: in `pending_summaries`
// while the block is dirty, and through a summary job in the catalog FIFO (written only
// if the block is then durable and unchanged). A removal in the catalog takes the summary
// with it, so the catalog never holds a summary for a block it does not hold.
//
// Namespaces (store.cc): under `mu`, `namespaces` counts each namespace's index entries
// and published host slots, exactly: every change of either goes through CommitLocked,
// DetachLocked, EvictLocked, PublishPromotedLocked or RecoverLocked. A namespace with a
// quota (StoreOptions::quotas) has an entry for the store's life; others have one while
// they hold blocks. Quota enforcement:
//   disk: ReserveLocked refuses a Put of a key not in the index when the namespace holds
//         its limit; CommitLocked checks again (the key may have gone meanwhile).
//   host: ReserveLocked charges each reservation to the namespace (`host_reserved`, held
//         until the slot is published or abandoned: slot_charged[slot]), so that always
//         host_blocks + host_reserved <= limit. At the limit it evicts the namespace's own
//         least recently used clean block, found in O(1) through its host pool LRU group
//         (no walk of the tier-wide LRU list); with none, a Put waits for the namespace's
//         blocks in write-back (only those: they complete on their own, so the wait
//         cannot deadlock) when wait_when_full, and fails with QuotaExceeded otherwise; a
//         promotion gets no charge and reads through a slot that is never published. A
//         Put replacing a resident block needs no charge (the old copy goes at the
//         commit); if that copy went meanwhile, CommitLocked makes room by the same rules.
#ifndef KVTIER_CORE_STORE_IMPL_H_
#define KVTIER_CORE_STORE_IMPL_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kernels/host_device.h"
#include "kvtier/store.h"
#include "src/core/block_index.h"
#include "src/core/device_cache.h"
#include "src/core/embedded_store.h"
#include "src/core/paged_put.h"
#include "src/core/store_retrieval.h"
#include "src/core/worker_pool.h"
#include "src/util/mutex.h"
#include "storage/catalog.h"
#include "storage/disk_tier.h"
#include "storage/env.h"
#include "storage/extent_allocator.h"
#include "storage/host_pool.h"

namespace kvtier {

struct EmbeddedStore::Impl {
  Impl(const StoreOptions& o, const ModelLayout& l, std::unique_ptr<HostPool> p, Env* e)
      : options(o), layout(l), block_bytes(l.BytesPerBlock()), env(e), pool(std::move(p)) {}

  // --- store.cc -----------------------------------------------------------------------
  Status CheckKey(const BlockKey& key) const;
  Status CheckBuffer(const void* data, uint64_t bytes) const;
  // A slot for one block of `key` (a Put of it when for_put, else a promotion): free, or
  // a clean block evicted; may wait for the disk (releasing `mu`) when wait_when_full. A
  // Put leaves read_reserve_slots. Applies the namespace's quotas first (see above):
  // QuotaExceeded when they refuse. The slot comes pinned, with its charge recorded in
  // slot_charged; give it back through AbandonSlotLocked when it is not published.
  Result<SlotId> ReserveLocked(const BlockKey& key, bool for_put) KVTIER_REQUIRES(mu);
  // ReserveLocked's slot, quotas aside.
  Result<SlotId> ReserveFreeSlotLocked(bool for_put) KVTIER_REQUIRES(mu);
  void EvictLocked(SlotId victim) KVTIER_REQUIRES(mu);
  // A block's summary, computed before the commit (retrieval only).
  struct PreparedSummary {
    BlockSummary summary;
    std::vector<std::byte> encoded;  // for the catalog (disk tier only)
  };
  // Publishes the filled, pinned `slot` as `key`'s block. With retrieval, `summary` (not
  // null) is queued for the index; the layer to Apply once `mu` is released goes to
  // `touched`. QuotaExceeded (the slot abandoned) when `key` is new and its namespace has
  // reached its disk quota since the reservation, or when a replacement's resident copy
  // went meanwhile and its host quota has no room (see above).
  Status CommitLocked(const BlockKey& key, SlotId slot, PreparedSummary* summary,
                      RetrievalIndexes::LayerRef* touched) KVTIER_REQUIRES(mu);
  // With a disk tier: the checksum of a freshly filled slot, computed by the thread that
  // filled it (while the bytes are in its cache) rather than by the write-back thread.
  void ChecksumSlot(SlotId slot) {
    if (has_disk) slot_checksums[slot] = Checksum(pool->SlotData(slot));
  }
  // Releases what an entry holds in every tier (Delete, DropSequence, memory-only
  // eviction), before the caller erases it from the index. With a durable copy, its
  // catalog removal and extent go into the vectors (null: memory-only, none possible).
  void DetachLocked(BlockIndex::Entry* entry, std::vector<Catalog::Update>* catalog_deletes,
                    std::vector<Extent>* extents_to_free) KVTIER_REQUIRES(mu);
  Status Put(const BlockKey& key, const void* data, uint64_t bytes);
  Status PutBatch(std::span<const BlockWrite> writes, std::span<Status> statuses);
  // `host_only`: when a found block is on disk only, does nothing and sets *declined
  // (the read would wait for the disk); else serves every read.
  Status GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses,
                  bool host_only = false, bool* declined = nullptr);
  // Store::Borrow (store_lend.cc); `host_only` and `declined` as for GetBatch (declined:
  // nothing is pinned and *blocks is left unset).
  Status Borrow(std::span<const BlockKey> keys, std::span<Status> statuses,
                std::unique_ptr<BorrowedBlocks>* blocks, bool host_only = false,
                bool* declined = nullptr);

  // How one member of a Get is served.
  struct ReadPlan {
    SlotId slot = BlockIndex::kNoSlot;  // pinned: the host copy, or the promotion target
    bool promote = false;               // read `loc` from disk into `slot` first
    DiskLocation loc;
    Status status;
  };
  void PlanReadLocked(const BlockKey& key, ReadPlan& plan) KVTIER_REQUIRES(mu);
  // Plans keys[i] for every plan whose status is OK, under one hold of the lock, then
  // promotes what is on disk only: each found block is then pinned in plans[i].slot
  // (a failed promotion leaves no slot). The caller unpins. With `host_only`, when a
  // found block is on disk only, plans and pins nothing and sets *declined.
  void PinReads(std::span<const BlockKey> keys, std::span<ReadPlan> plans, bool host_only = false,
                bool* declined = nullptr) KVTIER_EXCLUDES(mu);
  // Whether `key`'s block is found on disk only (a read of it would wait for the disk).
  bool OnDiskOnlyLocked(const BlockKey& key) KVTIER_REQUIRES(mu);
  // Publishes a promotion's filled, pinned `slot` as the host copy of `entry` (`key`'s)
  // when its reservation was charged to the namespace's host quota or it has none;
  // otherwise (a read through) returns false, and the slot is freed at its last Unpin.
  bool PublishPromotedLocked(const BlockKey& key, BlockIndex::Entry* entry, SlotId slot)
      KVTIER_REQUIRES(mu);

  // --- Namespaces: usage and quotas (store.cc) ---------------------------------------
  static constexpr uint64_t kNoLimit = UINT64_MAX;  // above any count
  struct NamespaceState {
    NamespaceUsage usage;  // blocks, host_blocks, quota_rejections, quota_evictions
    bool has_quota = false;
    // Limits in blocks (slots for the host, extents for the disk), floor(bytes / slot).
    uint64_t host_limit_blocks = kNoLimit;
    uint64_t disk_limit_blocks = kNoLimit;
    uint32_t lru_group = 0;         // its host slots' LRU group (host quota only)
    uint64_t host_reserved = 0;     // slots reserved for it with a charge, not published
    uint64_t writeback_blocks = 0;  // its slots pinned by the write-back pipeline
  };
  // The entries of options.quotas (validated by Open), before the disk tier's recovery.
  void InitQuotas();
  // The namespace's entry, created when missing.
  NamespaceState& NamespaceLocked(uint32_t namespace_id) KVTIER_REQUIRES(mu);
  // The entry of a namespace with a quota, or nullptr (one lookup, none without quotas).
  NamespaceState* QuotaLocked(uint32_t namespace_id) KVTIER_REQUIRES(mu);
  // A block of the namespace left the index / the host tier: the counters follow.
  void BlockGoneLocked(uint32_t namespace_id, bool was_resident) KVTIER_REQUIRES(mu);
  void HostCopyGoneLocked(uint32_t namespace_id) KVTIER_REQUIRES(mu);
  // Makes room for one more resident block of `key`'s namespace `ns` within its host
  // quota (the rules above; may wait, releasing `mu`): kRoom, or kReplacement when a Put
  // of `key` needs none (it replaces a resident block), or kReadThrough when a promotion
  // gets none; QuotaExceeded when a Put gets none.
  enum class HostRoom { kRoom, kReplacement, kReadThrough };
  Result<HostRoom> HostRoomLocked(NamespaceState& ns, const BlockKey& key, bool for_put)
      KVTIER_REQUIRES(mu);
  // The QuotaExceeded of a Put of new block `key` in namespace `ns`.
  Status DiskQuotaExceeded(const BlockKey& key, const NamespaceState& ns) const;
  // Gives back a reserved slot that will not be published: its quota charge, its pin.
  void AbandonSlotLocked(SlotId slot, uint32_t namespace_id) KVTIER_REQUIRES(mu);
  // Drops a slot's quota charge (it is published, or abandoned).
  void SettleChargeLocked(SlotId slot, uint32_t namespace_id) KVTIER_REQUIRES(mu);
  NamespaceUsage Usage(uint32_t namespace_id) const;
  // Serves `reads` (plans: one fresh ReadPlan each, statuses: their outcomes).
  Status RunReads(std::span<const BlockRead> reads, std::span<ReadPlan> plans,
                  std::span<Status> statuses, bool host_only, bool* declined);

  // --- store_retrieval.cc ------------------------------------------------------------
  // Summarizes a block (keys first, kvtier's layout) on the calling thread.
  Status PrepareSummary(const void* block, uint32_t valid_tokens,
                        std::span<const float> token_scores, PreparedSummary* out);
  // At Open, after RecoverLocked: the indexes from the catalog's summaries.
  Status RebuildRetrievalLocked() KVTIER_REQUIRES(mu);

  // --- store_paged.cc -----------------------------------------------------------------
  Status PutFromPagedCache(std::span<const BlockKey> keys, const PagedCacheDesc& cache,
                           const void* k_base, const void* v_base,
                           std::span<const int32_t> page_table, StreamHandle stream,
                           std::span<Status> statuses);

  // --- store_disk.cc ------------------------------------------------------------------
  Status OpenDisk();
  Status RecoverLocked() KVTIER_REQUIRES(mu);
  void CloseDisk();
  void EnqueueWriteLocked(const BlockKey& key, uint64_t version, SlotId slot) KVTIER_REQUIRES(mu);
  void BackgroundLoop();
  // Reads the plans marked `promote` from disk (waits), verifies their checksums and
  // publishes the promoted slots; a failure lands in the plan's status.
  void Promote(std::span<ReadPlan> plans, std::span<const BlockKey> keys);
  // Queues again the failed writes of versions <= max_version whose block is still
  // current (only those refused for lack of space, when only_no_space).
  void RetryFailedWritesLocked(uint64_t max_version, bool only_no_space) KVTIER_REQUIRES(mu);
  // Queues up to max_blocks of the least recently used dirty, unpinned slots (of the host
  // pool's LRU group `group`; 0: all) for writing.
  void QueueDirtyLruLocked(uint32_t max_blocks, uint32_t group = 0) KVTIER_REQUIRES(mu);
  void QueueDeletesLocked(std::vector<Catalog::Update> deletes, std::vector<Extent> frees)
      KVTIER_REQUIRES(mu);
  // Queues a catalog job writing `key`'s summary if, when its turn comes, the block is
  // durable, clean and still of `version`.
  void QueueSummaryWriteLocked(const BlockKey& key, uint64_t version, std::vector<std::byte> bytes)
      KVTIER_REQUIRES(mu);
  void FreeExtentLocked(const Extent& extent) KVTIER_REQUIRES(mu);
  void ReadPinLocked(const DiskLocation& loc) KVTIER_REQUIRES(mu);
  void ReadUnpinLocked(const DiskLocation& loc) KVTIER_REQUIRES(mu);
  Status Flush();
  uint64_t Checksum(const void* data) const;

  const StoreOptions options;
  const ModelLayout layout;
  const uint64_t block_bytes;
  Env* const env;

  mutable Mutex mu;
  std::condition_variable_any slot_cv;   // a slot may have become free or clean
  std::condition_variable_any bg_cv;     // work for the background thread
  std::condition_variable_any flush_cv;  // write-back or catalog progress
  // Bookkeeping calls need `mu`; SlotData() does not (see host_pool.h).
  const std::unique_ptr<HostPool> pool;
  BlockIndex index KVTIER_GUARDED_BY(mu);
  // Retrieval's indexes (null unless options.retrieval.enabled); set once at Open.
  std::unique_ptr<RetrievalIndexes> retrieval;
  StoreStats stats KVTIER_GUARDED_BY(mu);
  uint64_t next_version KVTIER_GUARDED_BY(mu) = 1;

  // --- Disk tier (all null / empty for a memory-only store) ----------------------------
  bool has_disk = false;  // set once at Open
  // XXH3 of each slot's block, written by the slot's filler before it is published and
  // read by the write-back thread (ordered by `mu`); meaningful for dirty slots only.
  std::vector<uint64_t> slot_checksums;
  std::unique_ptr<FileLock> lock_file;
  std::unique_ptr<Catalog> catalog;
  std::unique_ptr<DiskTier> disk;
  std::unique_ptr<ExtentAllocator> extents KVTIER_PT_GUARDED_BY(mu);
  uint64_t generation KVTIER_GUARDED_BY(mu) = 0;
  bool disk_full KVTIER_GUARDED_BY(mu) = false;
  uint32_t read_reserve_slots = 0;  // set at Open: slots / 8 in [1, 8] (0 for one slot)

  struct WriteItem {
    BlockKey key;
    uint64_t version = 0;
    SlotId slot = BlockIndex::kNoSlot;
    bool has_extent = false;
    Extent extent{};
    DiskLocation loc{};
    Status status{};
  };
  struct SummaryWrite {
    BlockKey key;
    uint64_t version = 0;
    std::vector<std::byte> bytes;
  };
  struct CatalogJob {
    std::vector<WriteItem> writes{};  // a synced group of writes to commit
    Status sync_status{};
    std::vector<Catalog::Update> deletes{};  // or removals to commit
    std::vector<Extent> frees_after{};       // extents freed once the removals are durable
    std::optional<std::pair<BlockKey, DiskLocation>> mark_corrupt{};
    std::optional<SummaryWrite> summary{};  // or a new summary of a durable block
  };
  std::deque<WriteItem> write_queue KVTIER_GUARDED_BY(mu);
  uint32_t writes_in_flight KVTIER_GUARDED_BY(mu) = 0;
  std::vector<WriteItem> writes_done KVTIER_GUARDED_BY(mu);
  std::vector<WriteItem> sync_group KVTIER_GUARDED_BY(mu);
  bool sync_in_flight KVTIER_GUARDED_BY(mu) = false;
  std::deque<CatalogJob> catalog_jobs KVTIER_GUARDED_BY(mu);
  uint64_t jobs_enqueued KVTIER_GUARDED_BY(mu) = 0;
  uint64_t jobs_done KVTIER_GUARDED_BY(mu) = 0;
  uint64_t writeback_pins KVTIER_GUARDED_BY(mu) = 0;  // slots pinned by the pipeline
  // Versions of dirty host copies (what Flush waits for), and those whose last write
  // failed, with why.
  std::set<uint64_t> dirty_versions KVTIER_GUARDED_BY(mu);
  std::map<uint64_t, std::pair<BlockKey, Status>> failed_writes KVTIER_GUARDED_BY(mu);
  // Encoded summaries of dirty versions (retrieval), committed with the block's entry.
  std::unordered_map<uint64_t, std::vector<std::byte>> pending_summaries KVTIER_GUARDED_BY(mu);
  Status catalog_error KVTIER_GUARDED_BY(mu);  // sticky: the catalog refused a commit
  // Reads in flight per extent ((file << 48) | offset / 4096), and frees waiting for them.
  std::unordered_map<uint64_t, uint32_t> extent_readers KVTIER_GUARDED_BY(mu);
  std::unordered_map<uint64_t, Extent> deferred_frees KVTIER_GUARDED_BY(mu);
  bool stopping KVTIER_GUARDED_BY(mu) = false;
  std::thread background;

  // PutFromPagedCache's GPU gather into the pinned host tier.
  PinnedGather gather;

  // Per namespace (see Namespaces above).
  std::unordered_map<uint32_t, NamespaceState> namespaces KVTIER_GUARDED_BY(mu);
  bool has_quotas = false;  // set once at Open: options.quotas is not empty
  // Per host slot: 1 while a reservation holds a charge to its namespace's host quota.
  std::vector<uint8_t> slot_charged KVTIER_GUARDED_BY(mu);

  // Declared last: destroyed first.
  std::unique_ptr<WorkerPool> workers;

  // --- store_device.cc: the GPU tier (retrieval.device_capacity_bytes > 0) -------------
  // What the DeviceCache pulls blocks through: host slots, promoted from disk if needed.
  struct StoreBlockSource final : BlockSource {
    explicit StoreBlockSource(Impl* i) : impl(i) {}
    Status PinHost(std::span<const BlockKey> keys, std::span<HostBlockRef> blocks) override;
    void UnpinHost(std::span<const BlockKey> keys, std::span<const HostBlockRef> blocks) override;
    Impl* impl;
  };
  // At Open, after the host tier: the DeviceCache (none without a device capacity).
  Status OpenDevice();
  // Its Select's runners-up and its Acquires, for prefetching (set with `device`).
  std::unique_ptr<PrefetchPlanner> prefetch_planner;
  void NoteRunnersUp(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                     std::span<const int64_t> blocks) {
    prefetch_planner->NoteRunnersUp(namespace_id, sequence, layer, blocks);
  }
  // Declared before `device`, destroyed after it.
  std::unique_ptr<StoreBlockSource> block_source;
  std::unique_ptr<DeviceCache> device;  // set once at Open
};

}  // namespace kvtier

#endif  // KVTIER_CORE_STORE_IMPL_H_
