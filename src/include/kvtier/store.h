// Store: kvtier's KV-cache block store, the one object an engine talks to. It is either
// embedded in the engine's process or a client of the kvtierd sidecar that serves one
// store to every engine process on a host (StoreOptions::sidecar); both implement this
// interface with the same semantics, so switching is a matter of configuration.
//
// An engine Puts blocks (one layer's K and V for block_tokens tokens, see layout.h)
// under a BlockKey and Gets them back into its own buffers. Blocks live in tiers: the
// host (warm) tier, a fixed region of RAM cut into block slots with LRU eviction, and,
// when StoreOptions::directory is set, the disk (cold) tier: slab files written through
// io_uring, with a RocksDB catalog, that survive restarts and crashes. Without a
// directory, a block evicted from the host tier is dropped and counted in Stats.
//
// Durability: a Put returns once the block is in the host tier. It becomes durable
// (its bytes on disk, then its catalog entry) in the background; Flush() waits for
// every Put and Delete that returned before it. After a crash, reopening the directory
// serves every block that was durable, byte-exact, and never a torn or corrupt one
// (checksums are verified on every read from disk).
//
//   auto store = kvtier::Store::Open(options, kvtier::ModelLayout::Llama3_8B());
//   if (!store.ok()) { ... store.status().ToString() ... }
//   Status s = (*store)->Put(key, block_data, (*store)->block_bytes());
//
// Semantics: Put of an existing key replaces it. Operations on one key are atomic: a
// Get returns a whole block as one Put wrote it, never a mix of two Puts or a partial
// write. Each operation takes effect at one instant between its call and its return
// (for an asynchronous one: before its completion runs).
//
// Thread safety: every method may be called from any number of threads at once.
// Completions of asynchronous calls run on the store's internal threads; they may call
// the store again but must not block for long. Destroying the Store waits for every
// asynchronous operation already submitted to complete; no call may start during or
// after destruction.
#ifndef KVTIER_STORE_H_
#define KVTIER_STORE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <span>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/layout.h"
#include "kvtier/options.h"
#include "kvtier/paged_cache.h"
#include "kvtier/retrieval.h"
#include "kvtier/status.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*; no CUDA header needed here

namespace kvtier {

// Counters since Open, and the current occupancy. A snapshot: fields are read one at a
// time, so under concurrent traffic they need not add up exactly.
struct StoreStats {
  uint64_t block_bytes = 0;          // bytes of one block
  uint64_t host_capacity_bytes = 0;  // bytes of the host region (slots * slot_bytes)
  uint64_t host_slot_bytes = 0;      // block_bytes rounded up to 4 KiB
  uint64_t host_slots = 0;           // slots in the host tier
  uint64_t host_blocks = 0;          // blocks resident in the host tier
  uint64_t host_pinned_slots = 0;    // slots in use by an operation right now
  HostMemoryKind host_memory = HostMemoryKind::kPlain;  // what backs the host tier

  uint64_t puts = 0;               // successful Puts (batch members count one each)
  uint64_t gets = 0;               // Gets that returned data
  uint64_t get_misses = 0;         // Gets that returned NotFound
  uint64_t deletes = 0;            // blocks removed by Delete
  uint64_t dropped_sequences = 0;  // DropSequence calls that removed something
  uint64_t dropped_blocks = 0;     // blocks removed by DropSequence
  uint64_t evictions = 0;          // blocks evicted from the host tier
  uint64_t evictions_lost = 0;     // of those, dropped for lack of a lower tier
  uint64_t busy_rejections = 0;    // Puts refused because every slot was in use
  uint64_t bytes_put = 0;
  uint64_t bytes_got = 0;
  uint64_t put_waits = 0;  // Puts that waited for the disk to free a slot

  // Disk tier (all zero for a memory-only store).
  uint64_t disk_capacity_bytes = 0;  // bytes of slab files
  uint64_t disk_used_bytes = 0;      // bytes of extents in use
  uint64_t disk_free_extents = 0;    // fragmentation: number of free extents
  uint64_t disk_blocks = 0;          // blocks with a durable copy on disk
  uint64_t dirty_blocks = 0;         // host blocks not yet durable
  uint64_t corrupt_blocks = 0;       // blocks quarantined after a checksum failure
  uint64_t disk_writes = 0;          // block writes completed (demotions)
  uint64_t disk_bytes_written = 0;
  uint64_t disk_reads = 0;  // block reads completed (promotions)
  uint64_t disk_bytes_read = 0;
  uint64_t disk_write_errors = 0;
  uint64_t disk_read_errors = 0;
  uint64_t catalog_commits = 0;  // catalog batches committed

  // Retrieval (RetrievalOptions::enabled).
  uint64_t indexed_blocks = 0;      // blocks with a summary in the index
  uint64_t index_memory_bytes = 0;  // bytes the indexes hold
  uint64_t selects = 0;             // Select calls that returned a selection
  uint64_t select_nanos = 0;        // time spent in them
  // GPU tier (RetrievalOptions::device_capacity_bytes > 0).
  uint64_t device_capacity_bytes = 0;
  uint64_t device_slots = 0;
  uint64_t device_blocks = 0;        // blocks resident in the GPU tier
  bool device_emulated = false;      // the GPU tier lives in host memory (no GPU)
  uint64_t acquires = 0;             // Acquire calls
  uint64_t acquired_blocks = 0;      // blocks requested by them
  uint64_t device_hits = 0;          // ... already resident (or arriving by prefetch)
  uint64_t device_fetches_host = 0;  // ... copied from the host tier on demand
  uint64_t device_fetches_disk = 0;  // ... read from disk, then copied, on demand
  uint64_t device_bytes_in = 0;      // bytes copied into the GPU tier (all causes)
  uint64_t device_evictions = 0;
  uint64_t prefetches = 0;           // blocks brought in ahead of an Acquire
  uint64_t prefetch_hits = 0;        // ... that a later Acquire used
  uint64_t acquire_stall_nanos = 0;  // time Acquire spent waiting for on-demand data
  // Blocks (on demand and prefetched) that kvtierd copied straight from its host tier
  // into this client's GPU tier (a sidecar client's direct path; 0 when embedded).
  uint64_t device_direct_blocks = 0;
};

// What Select attends at one decoding step of one layer: the sink blocks
// [0, sink_blocks), the local window [local_begin, local_end) and `selected` blocks
// written to the caller's span (best first; -1 pads).
struct SelectInfo {
  uint64_t sink_blocks = 0;
  uint64_t local_begin = 0;
  uint64_t local_end = 0;
  uint32_t selected = 0;
};

// What Acquire did; `lease` is passed to Release.
struct AcquireInfo {
  uint64_t lease = 0;
  uint32_t hits = 0;         // blocks already in the GPU tier
  uint32_t from_host = 0;    // copied from the host tier
  uint32_t from_disk = 0;    // read from disk, then copied
  uint64_t stall_nanos = 0;  // time spent waiting for on-demand data in this call
};

// One member of a batch Put: `bytes` must equal Store::block_bytes(); `data` must stay
// valid until the call (or, for an asynchronous batch, its completion) returns.
struct BlockWrite {
  BlockKey key;
  const void* data = nullptr;
  uint64_t bytes = 0;
};

// One member of a batch Get: `data` receives block_bytes() bytes.
struct BlockRead {
  BlockKey key;
  void* data = nullptr;
  uint64_t bytes = 0;
};

// Blocks lent by Store::Borrow to be read in place: block(i) holds member i's bytes
// (Store::block_bytes() of them), unchanged, until this object is destroyed, even when
// the key is rewritten or deleted meanwhile. Each borrowed block holds memory that the
// store cannot use for anything else until then (a host-tier slot, embedded; a staging
// slot shared with kvtierd, as a sidecar client), so read (or copy) and let go soon.
// Destroy it before the Store that lent it, on any thread.
class BorrowedBlocks {
 public:
  virtual ~BorrowedBlocks() = default;
  BorrowedBlocks(const BorrowedBlocks&) = delete;
  BorrowedBlocks& operator=(const BorrowedBlocks&) = delete;

  size_t size() const { return blocks_.size(); }
  // Member i's bytes; empty when its status was not OK.
  std::span<const std::byte> block(size_t i) const { return blocks_[i]; }

 protected:
  explicit BorrowedBlocks(size_t members) : blocks_(members) {}
  std::vector<std::span<const std::byte>> blocks_;
};

// Buffers lent by Store::Reserve to be written in place, then put by Commit: the Put
// side of BorrowedBlocks, for a caller that produces blocks (a gather, a copy from its
// GPU) and would otherwise write them into its own memory for PutBatch to copy again.
// Destroying it without Commit puts nothing. Destroy it before the Store; one thread at
// a time.
class PutBuffers {
 public:
  virtual ~PutBuffers() = default;
  PutBuffers(const PutBuffers&) = delete;
  PutBuffers& operator=(const PutBuffers&) = delete;

  size_t size() const { return buffers_.size(); }
  // Buffer i: Store::block_bytes() bytes to fill. Empty after Commit.
  std::span<std::byte> buffer(size_t i) const { return buffers_[i]; }

  // Puts buffer(i) under keys[i] for every i, as PutBatch does (keys and statuses of
  // size(), else InvalidArgument and nothing is done; statuses[i] gets member i's
  // outcome; returns the first failure). Once: the buffers are given back whatever the
  // outcome, and a second Commit is FailedPrecondition.
  virtual Status Commit(std::span<const BlockKey> keys, std::span<Status> statuses) = 0;

 protected:
  explicit PutBuffers(size_t members) : buffers_(members) {}
  std::vector<std::span<std::byte>> buffers_;
};

class Store {
 public:
  // Runs once with the operation's outcome, on an internal thread.
  using Completion = std::function<void(Status)>;

  // Opens the store `options` describe: an embedded store in this process, or, when
  // options.sidecar names a kvtierd (a Unix socket or a TCP address), a client of that
  // daemon, which serves the same operations (kvtier/client.h). Errors: InvalidArgument
  // for a bad layout or options (zero or absurd capacity), ResourceExhausted when the
  // memory cannot be had; for a sidecar, Unavailable when the daemon cannot be reached
  // and the errors of its handshake (a layout mismatch, a refused namespace or token).
  static Result<std::unique_ptr<Store>> Open(const StoreOptions& options,
                                             const ModelLayout& layout);

  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;
  virtual ~Store();

  virtual const ModelLayout& layout() const = 0;
  virtual const StoreOptions& options() const = 0;
  // Bytes of every block: layout().BytesPerBlock().
  virtual uint64_t block_bytes() const = 0;

  // Stores a copy of `bytes` bytes at `data` under `key` (replacing any block there).
  // Errors: InvalidArgument (null data, bytes != block_bytes(), a layer outside the
  // layout), Busy (every host slot is in use by other operations, or the disk cannot
  // keep up and wait_when_full is false; retry), ResourceExhausted (the disk tier is
  // full and the host tier holds nothing it can evict), QuotaExceeded (the key's
  // namespace is at its quota).
  virtual Status Put(const BlockKey& key, const void* data, uint64_t bytes) = 0;

  // Copies the block stored under `key` into `data` (which holds `bytes` bytes).
  // Errors: NotFound (never stored, deleted, or evicted and lost), InvalidArgument,
  // Corruption (the copy on disk failed its checksum: the block is quarantined),
  // IOError (the disk read failed).
  virtual Status Get(const BlockKey& key, void* data, uint64_t bytes) = 0;

  // Whether a Get of `key` would find the block now.
  virtual bool Contains(const BlockKey& key) const = 0;

  // Removes the block (from every tier). NotFound when there is none.
  virtual Status Delete(const BlockKey& key) = 0;

  // Removes every block of the sequence, all layers; returns how many there were
  // (zero is not an error).
  virtual Result<uint64_t> DropSequence(uint32_t namespace_id, const SequenceId& sequence) = 0;

  virtual StoreStats Stats() const = 0;

  // Makes every Put, Delete and DropSequence that returned before this call durable.
  // Nothing to do for a memory-only store. Errors: the first failure to write one of
  // those blocks (it stays in the host tier, dirty; a later Flush tries again).
  virtual Status Flush() = 0;

  // Puts keys.size() blocks straight from an engine's paged KV cache for one layer
  // (kvtier/paged_cache.h): block i is made of the page-table entries
  // [i * n, (i + 1) * n), n = block_tokens / gcd(page_size, block_tokens). `cache` must
  // match the store's layout (dtype, KV heads, head dim, block tokens).
  // With a GPU (the host tier is CUDA-pinned), k_base / v_base are the engine's device
  // memory: a gather kernel on `stream` (the engine's, so it runs after the kernels that
  // wrote the cache) writes the blocks directly into the host tier's pinned slots, with
  // no staging copy, and the call returns once it has run. Without a GPU the cache is
  // host memory (the emulated device) and the CPU reference gathers; `stream` is
  // ignored. statuses[i] gets member i's outcome, as in PutBatch.
  virtual Status PutFromPagedCache(std::span<const BlockKey> keys, const PagedCacheDesc& cache,
                                   const void* k_base, const void* v_base,
                                   std::span<const int32_t> page_table, CUstream_st* stream,
                                   std::span<Status> statuses) = 0;

  // Batches: statuses.size() must equal the batch size (else InvalidArgument and
  // nothing is done); statuses[i] receives the outcome of member i (the buffer of a Get
  // member that failed holds unspecified bytes: a sidecar client over TCP receives the
  // reply straight into the buffers, zeros for a failed member). Returns OK when
  // every member succeeded, otherwise the first failure. A batch is cheaper than its
  // members one by one (one lock round trip for the batch), not atomic as a whole.
  virtual Status PutBatch(std::span<const BlockWrite> writes, std::span<Status> statuses) = 0;
  virtual Status GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses) = 0;

  // Asynchronous forms: return at once, do the work on an internal thread, then run
  // `done` (or fulfil the future) with what the synchronous form would have returned.
  // The buffers, and for batches the spans, must stay valid until then.
  virtual void PutAsync(const BlockKey& key, const void* data, uint64_t bytes, Completion done) = 0;
  std::future<Status> PutAsync(const BlockKey& key, const void* data, uint64_t bytes);
  virtual void GetAsync(const BlockKey& key, void* data, uint64_t bytes, Completion done) = 0;
  std::future<Status> GetAsync(const BlockKey& key, void* data, uint64_t bytes);
  virtual void PutBatchAsync(std::span<const BlockWrite> writes, std::span<Status> statuses,
                             Completion done) = 0;
  std::future<Status> PutBatchAsync(std::span<const BlockWrite> writes, std::span<Status> statuses);
  virtual void GetBatchAsync(std::span<const BlockRead> reads, std::span<Status> statuses,
                             Completion done) = 0;
  std::future<Status> GetBatchAsync(std::span<const BlockRead> reads, std::span<Status> statuses);

  // Gets keys' blocks without copying them into the caller's memory: *blocks lends them
  // (BorrowedBlocks), set whenever statuses.size() == keys.size() (else
  // InvalidArgument and nothing is done). statuses[i] gets member i's outcome, as in
  // GetBatch; returns the first failure. Embedded, the blocks are pinned in the host
  // tier where they are (promoted from disk first when needed): no copy at all. As a
  // sidecar client over its Unix socket, kvtierd copies them into the staging area's
  // slots, which are then lent: one copy, where GetBatch makes two. Over TCP the bytes
  // arrive inline and are held in memory of the client's. Errors besides GetBatch's:
  // when the blocks lent and not yet given back leave too little room, ResourceExhausted
  // (a sidecar client's staging area holds SidecarOptions::staging_blocks) or Busy (an
  // embedded store's host tier full of pinned slots, as for any Get or Put then);
  // InvalidArgument for a batch larger than the staging area.
  virtual Status Borrow(std::span<const BlockKey> keys, std::span<Status> statuses,
                        std::unique_ptr<BorrowedBlocks>* blocks) = 0;
  // Lends `count` (> 0) buffers to fill and Commit (PutBuffers). Embedded, they are
  // memory of the store's own and Commit copies them into the host tier, as PutBatch
  // does. As a sidecar client over its Unix socket they are staging slots, which
  // kvtierd copies into its host tier at the Commit: one copy, where PutBatch makes two.
  // Errors: InvalidArgument for 0 or more than the staging area holds; ResourceExhausted
  // as Borrow; Unavailable while disconnected from the daemon.
  virtual Result<std::unique_ptr<PutBuffers>> Reserve(size_t count) = 0;

  // --- Retrieval (kvtier/retrieval.h). FailedPrecondition unless options().retrieval
  // .enabled. ---

  // (Re)computes the summary of a stored block from its keys with per-token attention
  // scores (float [num_kv_heads][block_tokens]; empty: none) and `valid_tokens` (a partly
  // filled block: only its first valid_tokens tokens count). `data` holds the block
  // (block_bytes() bytes: the caller has it, the store does not read it back).
  // NotFound when no block is stored under `key`.
  virtual Status IndexBlock(const BlockKey& key, const void* data, uint64_t bytes,
                            uint32_t valid_tokens, std::span<const float> token_scores) = 0;

  // Chooses the blocks of (namespace, sequence, layer) that the queries of one decoding
  // step need: `queries` float32 [num_query_heads][head_dim], post-rotary as attention
  // uses them; `context_tokens` the sequence's length so far (it places the local
  // window). `selected` receives top_k block indices (kPerKvHead: num_kv_heads * top_k,
  // KV head major), best first, -1 padded; `scores` (empty, or the same size) the fused
  // score of each (kvtier/retrieval.h). Only indexed blocks can be selected; a sequence
  // with none selects nothing (not an error). Allocates nothing once the sequence's
  // index has grown to its size.
  virtual Result<SelectInfo> Select(uint32_t namespace_id, const SequenceId& sequence,
                                    uint32_t layer, std::span<const float> queries,
                                    uint64_t context_tokens, std::span<int64_t> selected,
                                    std::span<float> scores = {}) = 0;

  // Makes the blocks (indices of (namespace, sequence, layer); -1 entries are skipped and
  // get address 0) resident in the GPU tier and writes their device addresses to
  // `device_addresses` (same size as `blocks`). Blocks resident already are hits; the
  // others are copied from the host tier, promoted from disk first when needed. The
  // copies are ordered before later work on `stream` (the engine's compute stream; the
  // host does not wait) -- emulated, they are done when Acquire returns. The blocks stay
  // pinned in the GPU tier until Release(lease). `scores` (empty, or one per block) feed
  // the score-decay replacement policy. Errors: FailedPrecondition without a GPU tier,
  // NotFound when a block is stored nowhere (nothing stays pinned), ResourceExhausted
  // when the blocks pinned by leases fill the tier.
  virtual Result<AcquireInfo> Acquire(uint32_t namespace_id, const SequenceId& sequence,
                                      uint32_t layer, std::span<const int64_t> blocks,
                                      CUstream_st* stream, std::span<uint64_t> device_addresses,
                                      std::span<const float> scores = {}) = 0;
  // Unpins the blocks of a lease once the work queued on the Acquire's stream so far has
  // run. InvalidArgument for an unknown lease.
  virtual Status Release(uint64_t lease) = 0;

 protected:
  Store() = default;
};

}  // namespace kvtier

#endif  // KVTIER_STORE_H_
