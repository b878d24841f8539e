/* kvtier's C API: the same store as <kvtier/store.h>, for engines that bind through
 * an FFI (Python ctypes/cffi, Rust, Go, ...). C99; no other header needed.
 *
 * Every function that can fail returns a kvtier_code (KVTIER_OK = 0). The message of
 * the last failure on the calling thread is kvtier_last_error(); it stays valid until
 * the next kvtier call on that thread.
 *
 * Thread safety: as the C++ Store. A kvtier_store may be used from many threads at
 * once; kvtier_close must not race with any other call on the same store, and waits
 * for its asynchronous operations to complete.
 */
#ifndef KVTIER_KVTIER_C_H_
#define KVTIER_KVTIER_C_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Same values as kvtier::StatusCode. */
typedef enum kvtier_code {
  KVTIER_OK = 0,
  KVTIER_INVALID_ARGUMENT = 1,
  KVTIER_NOT_FOUND = 2,
  KVTIER_ALREADY_EXISTS = 3,
  KVTIER_RESOURCE_EXHAUSTED = 4,
  KVTIER_BUSY = 5,
  KVTIER_IO_ERROR = 6,
  KVTIER_CORRUPTION = 7,
  KVTIER_FAILED_PRECONDITION = 8,
  KVTIER_NOT_SUPPORTED = 9,
  KVTIER_INTERNAL = 10,
  KVTIER_CANCELLED = 11,
  KVTIER_PERMISSION_DENIED = 12,
  KVTIER_UNAVAILABLE = 13,
  KVTIER_QUOTA_EXCEEDED = 14
} kvtier_code;

/* Same values as kvtier::DType. */
typedef enum kvtier_dtype {
  KVTIER_DTYPE_F16 = 0,
  KVTIER_DTYPE_BF16 = 1,
  KVTIER_DTYPE_F32 = 2,
  KVTIER_DTYPE_FP8_E4M3 = 3
} kvtier_dtype;

/* Same values as kvtier::HostMemoryKind. */
typedef enum kvtier_host_memory {
  KVTIER_HOST_MEMORY_AUTO = 0,
  KVTIER_HOST_MEMORY_CUDA_PINNED = 1,
  KVTIER_HOST_MEMORY_LOCKED = 2,
  KVTIER_HOST_MEMORY_PLAIN = 3
} kvtier_host_memory;

typedef struct kvtier_layout {
  uint32_t num_layers;
  uint32_t num_kv_heads;
  uint32_t num_query_heads;
  uint32_t head_dim;
  kvtier_dtype dtype;
  uint32_t block_tokens;
} kvtier_layout;

/* Same values as kvtier::SummaryKind, kvtier::IndexBackend, kvtier::SelectionScope. */
typedef enum kvtier_summary_kind {
  KVTIER_SUMMARY_CLUSTERS = 0,
  KVTIER_SUMMARY_MEAN = 1,
  KVTIER_SUMMARY_MINMAX = 2,
  KVTIER_SUMMARY_TOPR = 3
} kvtier_summary_kind;

typedef enum kvtier_index_backend {
  KVTIER_INDEX_AUTO = 0,
  KVTIER_INDEX_SCAN = 1,
  KVTIER_INDEX_FAISS_FLAT = 2,
  KVTIER_INDEX_FAISS_HNSW = 3,
  KVTIER_INDEX_INFLLM = 4,
  KVTIER_INDEX_GPU = 5
} kvtier_index_backend;

typedef enum kvtier_selection_scope {
  KVTIER_SCOPE_PER_LAYER = 0,
  KVTIER_SCOPE_PER_KV_HEAD = 1
} kvtier_selection_scope;

/* Same values as kvtier::ReplacementPolicy. */
typedef enum kvtier_replacement {
  KVTIER_REPLACEMENT_LRU = 0,
  KVTIER_REPLACEMENT_SCORE_DECAY = 1
} kvtier_replacement;

/* Decode-time retrieval: see kvtier::RetrievalOptions (kvtier/retrieval.h) for each field. */
typedef struct kvtier_retrieval_options {
  int enabled; /* non-zero: summaries on put, kvtier_select available. Default: 0. */
  kvtier_summary_kind summary;
  uint32_t clusters;
  uint32_t top_r;
  kvtier_index_backend backend;
  uint32_t hnsw_m;
  uint32_t hnsw_ef_search;
  uint32_t top_k;
  uint32_t n_init;
  uint32_t n_local;
  kvtier_selection_scope scope;
  /* The GPU tier (kvtier_acquire, kvtier_release); 0 bytes: none. */
  uint64_t device_capacity_bytes;
  kvtier_replacement replacement;
  float score_decay;
  int prefetch; /* non-zero: prefetch (kvtier::RetrievalOptions::prefetch) */
  uint32_t prefetch_extra;
  uint32_t device_blocks_per_layer;
  int force_emulated_device; /* non-zero: the GPU tier in host memory even with a GPU */
  uint32_t coarse_clusters;  /* two-stage scoring; 0: one pass (see RetrievalOptions) */
  uint32_t shortlist_factor;
} kvtier_retrieval_options;

typedef struct kvtier_options {
  uint64_t host_capacity_bytes; /* see kvtier::StoreOptions for each field */
  kvtier_host_memory host_memory;
  uint32_t async_threads;
  kvtier_retrieval_options retrieval;
  /* The kvtierd sidecar (kvtier::SidecarOptions, kvtier/client.h). A socket path, or else
   * a "host:port", makes kvtier_open a client of that daemon, with the same calls and
   * semantics; the fields above except `retrieval` are then the daemon's business. Both
   * NULL (or ""): an embedded store. The strings are copied by kvtier_open. */
  const char* sidecar_socket;
  const char* sidecar_tcp_address;
  const char* sidecar_token; /* NULL: none */
  uint32_t sidecar_namespace_id;
  uint32_t sidecar_connect_timeout_ms; /* 0: the default (5000) */
  uint32_t sidecar_max_backoff_ms;     /* 0: the default (1000) */
  uint32_t sidecar_staging_blocks;     /* 0: the default (64) */
  /* kvtier_options_init sets 30000; 0: no limit (kvtier::SidecarOptions). */
  uint32_t sidecar_request_timeout_ms;
  /* kvtier_options_init sets 1: kvtierd copies the GPU tier's misses straight in
   * (kvtier::SidecarOptions::direct_device); 0: through the staging area. */
  int sidecar_direct_device;
} kvtier_options;

typedef struct kvtier_block_key {
  uint32_t namespace_id;
  uint64_t sequence_hi;
  uint64_t sequence_lo;
  uint32_t layer;
  uint32_t block;
} kvtier_block_key;

typedef struct kvtier_stats {
  uint64_t block_bytes;
  uint64_t host_capacity_bytes;
  uint64_t host_slot_bytes;
  uint64_t host_slots;
  uint64_t host_blocks;
  uint64_t host_pinned_slots;
  kvtier_host_memory host_memory;
  uint64_t puts;
  uint64_t gets;
  uint64_t get_misses;
  uint64_t deletes;
  uint64_t dropped_sequences;
  uint64_t dropped_blocks;
  uint64_t evictions;
  uint64_t evictions_lost;
  uint64_t busy_rejections;
  uint64_t bytes_put;
  uint64_t bytes_got;
  uint64_t indexed_blocks; /* retrieval: see kvtier::StoreStats */
  uint64_t index_memory_bytes;
  uint64_t selects;
  uint64_t select_nanos;
  uint64_t put_waits; /* disk tier: see kvtier::StoreStats */
  uint64_t disk_capacity_bytes;
  uint64_t disk_used_bytes;
  uint64_t disk_free_extents;
  uint64_t disk_blocks;
  uint64_t dirty_blocks;
  uint64_t corrupt_blocks;
  uint64_t disk_writes;
  uint64_t disk_bytes_written;
  uint64_t disk_reads;
  uint64_t disk_bytes_read;
  uint64_t disk_write_errors;
  uint64_t disk_read_errors;
  uint64_t catalog_commits;
  uint64_t device_capacity_bytes; /* GPU tier: see kvtier::StoreStats */
  uint64_t device_slots;
  uint64_t device_blocks;
  int device_emulated;
  uint64_t acquires;
  uint64_t acquired_blocks;
  uint64_t device_hits;
  uint64_t device_fetches_host;
  uint64_t device_fetches_disk;
  uint64_t device_bytes_in;
  uint64_t device_evictions;
  uint64_t prefetches;
  uint64_t prefetch_hits;
  uint64_t acquire_stall_nanos;
  uint64_t device_direct_blocks; /* copied in by kvtierd (a sidecar client's direct path) */
} kvtier_stats;

/* What kvtier_select attends besides the selected blocks: see kvtier::SelectInfo. */
typedef struct kvtier_select_info {
  uint64_t sink_blocks; /* blocks [0, sink_blocks) */
  uint64_t local_begin; /* the local window [local_begin, local_end) */
  uint64_t local_end;
  uint32_t selected; /* entries of `selected` that name a block (the rest are -1) */
} kvtier_select_info;

/* What kvtier_acquire did: see kvtier::AcquireInfo. */
typedef struct kvtier_acquire_info {
  uint64_t lease; /* pass to kvtier_release */
  uint32_t hits;
  uint32_t from_host;
  uint32_t from_disk;
  uint64_t stall_nanos;
} kvtier_acquire_info;

typedef struct kvtier_store kvtier_store;

/* Completion of an asynchronous call; runs once, on an internal thread. `message` is
 * "" on success and is valid only during the call. */
typedef void (*kvtier_completion)(void* user_data, kvtier_code code, const char* message);

/* The message of the calling thread's last failure ("" if none). */
const char* kvtier_last_error(void);
/* "OK", "InvalidArgument", ... */
const char* kvtier_code_name(kvtier_code code);

/* Fill with the defaults of kvtier::StoreOptions / the Llama-3-8B layout. */
void kvtier_options_init(kvtier_options* options);
void kvtier_layout_llama3_8b(kvtier_layout* layout);
/* Sizes of a layout; 0 (and kvtier_last_error set) when the layout is invalid. */
uint64_t kvtier_layout_block_bytes(const kvtier_layout* layout);
uint64_t kvtier_layout_token_bytes(const kvtier_layout* layout);
uint64_t kvtier_layout_fingerprint(const kvtier_layout* layout);

kvtier_code kvtier_open(const kvtier_options* options, const kvtier_layout* layout,
                        kvtier_store** store);
/* NULL is allowed. */
void kvtier_close(kvtier_store* store);
uint64_t kvtier_block_bytes(const kvtier_store* store);

kvtier_code kvtier_put(kvtier_store* store, const kvtier_block_key* key, const void* data,
                       uint64_t bytes);
kvtier_code kvtier_get(kvtier_store* store, const kvtier_block_key* key, void* data,
                       uint64_t bytes);
/* 1 when present, 0 when not. */
int kvtier_contains(const kvtier_store* store, const kvtier_block_key* key);
kvtier_code kvtier_delete(kvtier_store* store, const kvtier_block_key* key);
/* *dropped (may be NULL) receives the number of blocks removed. */
kvtier_code kvtier_drop_sequence(kvtier_store* store, uint32_t namespace_id, uint64_t sequence_hi,
                                 uint64_t sequence_lo, uint64_t* dropped);
kvtier_code kvtier_stats_get(const kvtier_store* store, kvtier_stats* stats);

/* Batches of n blocks: keys[i] <-> datas[i], each of kvtier_block_bytes() bytes.
 * codes (may be NULL) receives each member's outcome. Returns the first failure. */
kvtier_code kvtier_put_batch(kvtier_store* store, size_t n, const kvtier_block_key* keys,
                             const void* const* datas, kvtier_code* codes);
kvtier_code kvtier_get_batch(kvtier_store* store, size_t n, const kvtier_block_key* keys,
                             void* const* datas, kvtier_code* codes);

/* Loans (kvtier::Store::Borrow and Reserve): blocks read, or written, in place in memory
 * the store lends, instead of copied to or from the caller's (embedded, a borrowed block
 * is not copied at all; through kvtierd's Unix socket, each block is copied once where
 * kvtier_get_batch and kvtier_put_batch copy it twice). A loan holds memory the store
 * cannot use for anything else meanwhile (host-tier slots, or kvtierd's staging slots):
 * give it back soon, and always before kvtier_close of its store. */
typedef struct kvtier_borrowed kvtier_borrowed;
typedef struct kvtier_put_buffers kvtier_put_buffers;

/* kvtier_borrow: n blocks, keys[i] <-> datas[i]. datas[i] receives the address of member
 * i's kvtier_block_bytes() bytes, to read in place, unchanged (even when the key is
 * rewritten or deleted meanwhile) until kvtier_borrowed_release; or NULL for a member
 * that failed. codes (may be NULL) receives each member's outcome: datas[i] is non-NULL
 * exactly when codes[i] is KVTIER_OK. *borrowed receives the loan, also when members
 * failed: release it, from any thread (it is NULL when there is nothing to release,
 * which kvtier_borrowed_release allows). n == 0 lends nothing (keys and datas may then
 * be NULL). Errors besides kvtier_get_batch's: when the blocks lent and not yet given
 * back leave too little room, KVTIER_RESOURCE_EXHAUSTED (a sidecar client's staging
 * area) or KVTIER_BUSY (an embedded host tier full of pinned slots);
 * KVTIER_INVALID_ARGUMENT for more blocks than a sidecar client's staging area holds
 * (sidecar_staging_blocks). Returns the first failure. */
kvtier_code kvtier_borrow(kvtier_store* store, size_t n, const kvtier_block_key* keys,
                          const void** datas, kvtier_code* codes, kvtier_borrowed** borrowed);
/* Gives the blocks back: their addresses are invalid afterwards. NULL is allowed. */
void kvtier_borrowed_release(kvtier_borrowed* borrowed);

/* kvtier_reserve: n (> 0) buffers to fill, then put with kvtier_commit. datas[i] receives
 * the address of buffer i (kvtier_block_bytes() bytes, contents unspecified); *buffers
 * receives the loan (NULL on failure). Errors: KVTIER_INVALID_ARGUMENT for n == 0 or
 * more than a sidecar client's staging area holds; KVTIER_RESOURCE_EXHAUSTED as
 * kvtier_borrow; KVTIER_UNAVAILABLE while disconnected from kvtierd. A kvtier_put_buffers
 * is used by one thread at a time. */
kvtier_code kvtier_reserve(kvtier_store* store, size_t n, void** datas,
                           kvtier_put_buffers** buffers);
/* Puts buffer i under keys[i] for each of the n reserved, as kvtier_put_batch; codes (may
 * be NULL, else n entries) receives each member's outcome. Returns the first failure.
 * Once: afterwards the buffers' addresses are invalid whatever the outcome, and a second
 * commit is KVTIER_FAILED_PRECONDITION (for every member too). NULL keys:
 * KVTIER_INVALID_ARGUMENT, and nothing is done. */
kvtier_code kvtier_commit(kvtier_put_buffers* buffers, const kvtier_block_key* keys,
                          kvtier_code* codes);
/* Frees the buffers, committed or not (not committed: nothing is put). NULL is allowed. */
void kvtier_put_buffers_release(kvtier_put_buffers* buffers);

/* Asynchronous single-block forms: return KVTIER_OK once submitted (the buffer must
 * stay valid until `done` runs); `done` then reports the outcome. */
kvtier_code kvtier_put_async(kvtier_store* store, const kvtier_block_key* key, const void* data,
                             uint64_t bytes, kvtier_completion done, void* user_data);
kvtier_code kvtier_get_async(kvtier_store* store, const kvtier_block_key* key, void* data,
                             uint64_t bytes, kvtier_completion done, void* user_data);

/* Retrieval (kvtier::Store::Select and IndexBlock); KVTIER_FAILED_PRECONDITION unless
 * the store was opened with retrieval.enabled.
 *
 * kvtier_select: `queries` float[num_query_heads * head_dim] (n_queries floats) of one
 * decoding step; `selected` receives n_selected block indices, best first, -1 padded:
 * n_selected must be top_k (scope per layer) or num_kv_heads * top_k (per KV head).
 * `scores` (NULL, or n_selected floats) the fused score of each; `info` (may be NULL)
 * the sinks and local window. */
kvtier_code kvtier_select(kvtier_store* store, uint32_t namespace_id, uint64_t sequence_hi,
                          uint64_t sequence_lo, uint32_t layer, const float* queries,
                          size_t n_queries, uint64_t context_tokens, int64_t* selected,
                          size_t n_selected, float* scores, kvtier_select_info* info);
/* Recomputes a stored block's summary from `data` (kvtier_block_bytes() bytes), its first
 * valid_tokens tokens, and per-token attention scores (NULL, or n_scores = num_kv_heads *
 * block_tokens floats). KVTIER_NOT_FOUND when the block is not stored. */
kvtier_code kvtier_index_block(kvtier_store* store, const kvtier_block_key* key, const void* data,
                               uint64_t bytes, uint32_t valid_tokens, const float* token_scores,
                               size_t n_scores);

/* The state of a sidecar client's connection to kvtierd (kvtier::SidecarStatus). */
typedef struct kvtier_sidecar_status {
  int connected;       /* non-zero: connected now */
  uint64_t reconnects; /* successful reconnections since kvtier_open */
} kvtier_sidecar_status;
/* KVTIER_NOT_SUPPORTED for an embedded store. */
kvtier_code kvtier_sidecar_status_get(const kvtier_store* store, kvtier_sidecar_status* status);

/* The GPU tier (kvtier::Store::Acquire and Release); KVTIER_FAILED_PRECONDITION unless
 * the store was opened with retrieval.enabled and retrieval.device_capacity_bytes > 0.
 *
 * kvtier_acquire: makes blocks[0..n_blocks) of (namespace, sequence, layer) resident in
 * the GPU tier (-1 entries are skipped) and writes each one's device address to
 * device_addresses[i] (0 for a -1 entry); the copies are ordered before later work on
 * `stream` (a cudaStream_t; NULL: the default stream). Emulated (no GPU), the addresses
 * are host addresses and the data is in place on return. The blocks stay pinned until
 * kvtier_release(info->lease). `scores` (NULL, or n_blocks floats) feed the score-decay
 * policy. `info` must not be NULL: its lease is the only handle to release. */
kvtier_code kvtier_acquire(kvtier_store* store, uint32_t namespace_id, uint64_t sequence_hi,
                           uint64_t sequence_lo, uint32_t layer, const int64_t* blocks,
                           size_t n_blocks, void* stream, uint64_t* device_addresses,
                           const float* scores, kvtier_acquire_info* info);
/* Unpins a lease's blocks once the work queued on its stream so far has run.
 * KVTIER_INVALID_ARGUMENT for an unknown lease. */
kvtier_code kvtier_release(kvtier_store* store, uint64_t lease);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVTIER_KVTIER_C_H_ */
