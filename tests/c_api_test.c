/* The C API (kvtier_c.h) end to end, as a C99 program: what an FFI binding sees.
 *
 * Synchronous calls only (c_api_async_test.c covers the asynchronous ones). Every
 * operation is mirrored in a model of the counters kvtier_stats_get must report; block
 * contents are fresh pseudo-random bytes, compared byte by byte.
 *
 * Usage: kvtier_c_api_test [seed [kvtierd [token]]]. With kvtierd (the Unix socket of a
 * kvtierd serving the Llama-3-8B layout, or its "host:port"), the loan tests also run as
 * that daemon's client, presenting `token` if given. Exits 0 when every check passes; otherwise
 * prints the failed check, the seed and kvtier_last_error(), and exits 1.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvtier/kvtier_c.h"

static uint64_t g_seed;

static void Fail(const char* file, int line, const char* what) {
  fflush(stdout);
  fprintf(stderr, "%s:%d: check failed: %s\n  seed: %" PRIu64 "\n  kvtier_last_error: \"%s\"\n",
          file, line, what, g_seed, kvtier_last_error());
  exit(1);
}

#define CHECK(cond)                               \
  do {                                            \
    if (!(cond)) Fail(__FILE__, __LINE__, #cond); \
  } while (0)

/* `expr` must return the kvtier_code `want`. */
#define CHECK_CODE(expr, want)                                                                     \
  do {                                                                                             \
    kvtier_code got_ = (expr);                                                                     \
    if (got_ != (want)) {                                                                          \
      char what_[512];                                                                             \
      snprintf(what_, sizeof(what_), "%s returned %s, expected %s", #expr, kvtier_code_name(got_), \
               kvtier_code_name(want));                                                            \
      Fail(__FILE__, __LINE__, what_);                                                             \
    }                                                                                              \
  } while (0)

#define CHECK_OK(expr) CHECK_CODE(expr, KVTIER_OK)

/* The calling thread's last error names `needle`. Each use picks a needle the previous
 * error lacks, so a stale message does not pass. */
#define CHECK_ERROR_MENTIONS(needle)                      \
  do {                                                    \
    CHECK(kvtier_last_error() != NULL);                   \
    CHECK(strstr(kvtier_last_error(), (needle)) != NULL); \
  } while (0)

/* splitmix64: a seeded stream of pseudo-random bytes, never all zeros. */
static uint64_t g_rng;
static uint64_t NextRandom(void) {
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static void FillRandom(unsigned char* data, uint64_t bytes) {
  uint64_t i;
  for (i = 0; i < bytes; i += 8) {
    uint64_t r = NextRandom();
    uint64_t j;
    for (j = 0; j < 8 && i + j < bytes; ++j) data[i + j] = (unsigned char)(r >> (8 * j));
  }
}

static unsigned char* Allocate(uint64_t bytes) {
  unsigned char* p = (unsigned char*)malloc((size_t)bytes);
  CHECK(p != NULL);
  return p;
}

/* Byte-by-byte comparison that reports the first differing offset. */
#define CHECK_SAME_BYTES(got, want, bytes)                                                       \
  do {                                                                                           \
    uint64_t off_;                                                                               \
    for (off_ = 0; off_ < (bytes); ++off_) {                                                     \
      if ((got)[off_] != (want)[off_]) {                                                         \
        char what_[256];                                                                         \
        snprintf(what_, sizeof(what_), "%s differs from %s at byte %" PRIu64 ": %u != %u", #got, \
                 #want, off_, (unsigned)(got)[off_], (unsigned)(want)[off_]);                    \
        Fail(__FILE__, __LINE__, what_);                                                         \
      }                                                                                          \
    }                                                                                            \
  } while (0)

static kvtier_block_key Key(uint32_t ns, uint64_t hi, uint64_t lo, uint32_t layer, uint32_t block) {
  kvtier_block_key k;
  k.namespace_id = ns;
  k.sequence_hi = hi;
  k.sequence_lo = lo;
  k.layer = layer;
  k.block = block;
  return k;
}

/* What the store's counters must say, updated alongside every operation. */
typedef struct Model {
  uint64_t puts, gets, get_misses, deletes, dropped_sequences, dropped_blocks;
  uint64_t evictions, blocks;
} Model;

static void CheckStats(kvtier_store* store, const Model* m, uint64_t block_bytes) {
  kvtier_stats st;
  memset(&st, 0xAB, sizeof(st)); /* every field must be written */
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.block_bytes == block_bytes);
  CHECK(st.puts == m->puts);
  CHECK(st.gets == m->gets);
  CHECK(st.get_misses == m->get_misses);
  CHECK(st.deletes == m->deletes);
  CHECK(st.dropped_sequences == m->dropped_sequences);
  CHECK(st.dropped_blocks == m->dropped_blocks);
  CHECK(st.evictions == m->evictions);
  CHECK(st.evictions_lost == m->evictions); /* no lower tier: every eviction is lost */
  CHECK(st.busy_rejections == 0);
  CHECK(st.host_blocks == m->blocks);
  CHECK(st.host_pinned_slots == 0);
  CHECK(st.bytes_put == m->puts * block_bytes);
  CHECK(st.bytes_got == m->gets * block_bytes);
}

static void TestNamesAndDefaults(void) {
  kvtier_options o;
  CHECK(strcmp(kvtier_code_name(KVTIER_OK), "OK") == 0);
  CHECK(strcmp(kvtier_code_name(KVTIER_NOT_FOUND), "NotFound") == 0);
  CHECK(strcmp(kvtier_code_name(KVTIER_INVALID_ARGUMENT), "InvalidArgument") == 0);
  CHECK(strcmp(kvtier_code_name((kvtier_code)99), "Unknown") == 0);

  memset(&o, 0xFF, sizeof(o));
  kvtier_options_init(&o);
  CHECK(o.host_capacity_bytes == (uint64_t)4 << 30);
  CHECK(o.host_memory == KVTIER_HOST_MEMORY_AUTO);
  CHECK(o.async_threads == 2);
  CHECK(o.retrieval.enabled == 0);
  CHECK(o.retrieval.summary == KVTIER_SUMMARY_CLUSTERS);
  CHECK(o.retrieval.clusters == 12);
  CHECK(o.retrieval.top_r == 4);
  CHECK(o.retrieval.backend == KVTIER_INDEX_AUTO);
  CHECK(o.retrieval.hnsw_m == 32);
  CHECK(o.retrieval.hnsw_ef_search == 128);
  CHECK(o.retrieval.top_k == 16);
  CHECK(o.retrieval.n_init == 128);
  CHECK(o.retrieval.n_local == 4096);
  CHECK(o.retrieval.scope == KVTIER_SCOPE_PER_LAYER);
  CHECK(o.retrieval.device_capacity_bytes == 0);
  CHECK(o.retrieval.replacement == KVTIER_REPLACEMENT_LRU);
  CHECK(o.retrieval.score_decay > 0.89f && o.retrieval.score_decay < 0.91f);
  CHECK(o.retrieval.prefetch == 1);
  CHECK(o.retrieval.prefetch_extra == 4);
  CHECK(o.retrieval.device_blocks_per_layer == 0);
  CHECK(o.retrieval.force_emulated_device == 0);
  CHECK(o.retrieval.coarse_clusters == 2);
  CHECK(o.retrieval.shortlist_factor == 3);
  CHECK(o.sidecar_request_timeout_ms == 30000);
  CHECK(o.sidecar_direct_device == 1);
  kvtier_options_init(NULL); /* no crash */
  kvtier_layout_llama3_8b(NULL);
}

static void TestLayouts(void) {
  kvtier_layout l, bad;
  uint64_t fingerprint;
  memset(&l, 0xFF, sizeof(l));
  kvtier_layout_llama3_8b(&l);
  CHECK(l.num_layers == 32);
  CHECK(l.num_kv_heads == 8);
  CHECK(l.num_query_heads == 32);
  CHECK(l.head_dim == 128);
  CHECK(l.dtype == KVTIER_DTYPE_BF16);
  CHECK(l.block_tokens == 128);
  /* 2 (K, V) x 8 heads x 128 dims x 2 bytes x 128 tokens; x 32 layers / 128 tokens. */
  CHECK(kvtier_layout_block_bytes(&l) == 524288);
  CHECK(kvtier_layout_token_bytes(&l) == 131072);

  fingerprint = kvtier_layout_fingerprint(&l);
  CHECK(fingerprint != 0);
  CHECK(kvtier_layout_fingerprint(&l) == fingerprint);
  bad = l;
  bad.dtype = KVTIER_DTYPE_F16; /* same sizes, another layout */
  CHECK(kvtier_layout_block_bytes(&bad) == 524288);
  CHECK(kvtier_layout_fingerprint(&bad) != fingerprint);

  /* Invalid layouts: 0 from every size function, and a message naming the problem. */
  bad = l;
  bad.num_kv_heads = 0;
  CHECK(kvtier_layout_block_bytes(&bad) == 0);
  CHECK_ERROR_MENTIONS("num_kv_heads");
  CHECK(kvtier_layout_token_bytes(&bad) == 0);
  CHECK(kvtier_layout_fingerprint(&bad) == 0);
  bad = l;
  bad.num_kv_heads = 6; /* 32 query heads are not a multiple of 6 */
  CHECK(kvtier_layout_token_bytes(&bad) == 0);
  CHECK_ERROR_MENTIONS("multiple");
  bad = l;
  bad.dtype = (kvtier_dtype)7;
  CHECK(kvtier_layout_block_bytes(&bad) == 0);
  CHECK_ERROR_MENTIONS("unknown dtype");
  /* Values past kvtier::DType's uint8_t must not wrap onto a valid dtype. */
  bad.dtype = (kvtier_dtype)(256 + KVTIER_DTYPE_BF16);
  CHECK(kvtier_layout_block_bytes(&bad) == 0);
  bad.dtype = (kvtier_dtype)-1;
  CHECK(kvtier_layout_token_bytes(&bad) == 0);
  bad = l;
  bad.head_dim = 1u << 31; /* a block far over the limit */
  CHECK(kvtier_layout_block_bytes(&bad) == 0);
  CHECK(strlen(kvtier_last_error()) > 0);
  CHECK(kvtier_layout_block_bytes(NULL) == 0);
  CHECK_ERROR_MENTIONS("null");
}

static void TestOpenErrors(const kvtier_layout* llama) {
  kvtier_options o;
  kvtier_layout bad = *llama;
  int dummy = 0;
  kvtier_store* store = (kvtier_store*)&dummy; /* must be reset to NULL on failure */

  kvtier_options_init(&o);
  o.host_capacity_bytes = (uint64_t)64 << 20;
  CHECK_CODE(kvtier_open(&o, llama, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_open(NULL, llama, &store), KVTIER_INVALID_ARGUMENT);
  CHECK(store == NULL);
  store = (kvtier_store*)&dummy;
  CHECK_CODE(kvtier_open(&o, NULL, &store), KVTIER_INVALID_ARGUMENT);
  CHECK(store == NULL);

  bad.block_tokens = 0;
  store = (kvtier_store*)&dummy;
  CHECK_CODE(kvtier_open(&o, &bad, &store), KVTIER_INVALID_ARGUMENT);
  CHECK(store == NULL);
  CHECK_ERROR_MENTIONS("block_tokens");

  o.host_capacity_bytes = 0;
  CHECK_CODE(kvtier_open(&o, llama, &store), KVTIER_INVALID_ARGUMENT);
  o.host_capacity_bytes = 524288 - 1; /* less than one block */
  CHECK_CODE(kvtier_open(&o, llama, &store), KVTIER_INVALID_ARGUMENT);
  o.host_capacity_bytes = (uint64_t)64 << 20;
  o.async_threads = 0;
  CHECK_CODE(kvtier_open(&o, llama, &store), KVTIER_INVALID_ARGUMENT);
  o.async_threads = 2;
  o.host_memory = (kvtier_host_memory)9;
  CHECK_CODE(kvtier_open(&o, llama, &store), KVTIER_INVALID_ARGUMENT);
  o.host_memory = (kvtier_host_memory)(256 + KVTIER_HOST_MEMORY_PLAIN); /* must not wrap */
  CHECK_CODE(kvtier_open(&o, llama, &store), KVTIER_INVALID_ARGUMENT);
  CHECK(store == NULL);
}

/* The loans' entry points given NULL where a pointer is required, or no buffers to
 * reserve: an error code and a message naming the problem, the out-pointer reset to
 * NULL, no crash, nothing lent. */
static void TestLoanNullArguments(kvtier_store* store) {
  kvtier_block_key k = Key(1, 0, 1, 0, 0);
  int dummy = 0;
  kvtier_borrowed* borrowed = (kvtier_borrowed*)&dummy;
  kvtier_put_buffers* buffers = (kvtier_put_buffers*)&dummy;
  const void* cdatas[1];
  void* datas[1];
  kvtier_code codes[1];

  CHECK_CODE(kvtier_borrow(store, 1, &k, cdatas, codes, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("borrowed out-pointer");
  CHECK_CODE(kvtier_borrow(NULL, 1, &k, cdatas, codes, &borrowed), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("null store");
  CHECK(borrowed == NULL);
  borrowed = (kvtier_borrowed*)&dummy;
  CHECK_CODE(kvtier_borrow(store, 1, NULL, cdatas, codes, &borrowed), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("keys or datas");
  CHECK(borrowed == NULL);
  CHECK_CODE(kvtier_borrow(store, 1, &k, NULL, codes, &borrowed), KVTIER_INVALID_ARGUMENT);
  CHECK(borrowed == NULL);
  /* An empty borrow lends nothing, but a loan all the same. */
  CHECK_OK(kvtier_borrow(store, 0, NULL, NULL, NULL, &borrowed));
  CHECK(borrowed != NULL);
  kvtier_borrowed_release(borrowed);
  kvtier_borrowed_release(NULL);

  CHECK_CODE(kvtier_reserve(store, 1, datas, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("buffers out-pointer");
  CHECK_CODE(kvtier_reserve(NULL, 1, datas, &buffers), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("null store");
  CHECK(buffers == NULL);
  buffers = (kvtier_put_buffers*)&dummy;
  CHECK_CODE(kvtier_reserve(store, 1, NULL, &buffers), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("null datas");
  CHECK(buffers == NULL);
  buffers = (kvtier_put_buffers*)&dummy;
  CHECK_CODE(kvtier_reserve(store, 0, datas, &buffers), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("Reserve");
  CHECK(buffers == NULL);
  CHECK_CODE(kvtier_reserve(store, 0, NULL, &buffers), KVTIER_INVALID_ARGUMENT);
  CHECK(buffers == NULL);
  /* Absurdly many: refused, not attempted. */
  buffers = (kvtier_put_buffers*)&dummy;
  CHECK_CODE(kvtier_reserve(store, (size_t)-1 / 2, datas, &buffers), KVTIER_INVALID_ARGUMENT);
  CHECK(buffers == NULL);
  CHECK_CODE(kvtier_commit(NULL, &k, codes), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("null buffers");
  kvtier_put_buffers_release(NULL);
}

/* Every entry point given NULL where a pointer is required: an error code, no crash. */
static void TestNullArguments(kvtier_store* store, unsigned char* buf, uint64_t bytes) {
  kvtier_block_key k = Key(1, 0, 1, 0, 0);
  kvtier_stats st;
  uint64_t dropped = 99;
  const void* cdatas[1];
  void* datas[1];
  cdatas[0] = buf;
  datas[0] = buf;

  CHECK(kvtier_block_bytes(NULL) == 0);
  CHECK_CODE(kvtier_put(NULL, &k, buf, bytes), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_put(store, NULL, buf, bytes), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_put(store, &k, NULL, bytes), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get(NULL, &k, buf, bytes), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get(store, NULL, buf, bytes), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get(store, &k, NULL, bytes), KVTIER_INVALID_ARGUMENT);
  CHECK(kvtier_contains(NULL, &k) == 0);
  CHECK(kvtier_contains(store, NULL) == 0);
  CHECK_CODE(kvtier_delete(NULL, &k), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_delete(store, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_drop_sequence(NULL, 1, 0, 1, &dropped), KVTIER_INVALID_ARGUMENT);
  CHECK(dropped == 99);
  CHECK_CODE(kvtier_stats_get(NULL, &st), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_stats_get(store, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_put_batch(NULL, 1, &k, cdatas, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_put_batch(store, 1, NULL, cdatas, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_put_batch(store, 1, &k, NULL, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get_batch(NULL, 1, &k, datas, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get_batch(store, 1, NULL, datas, NULL), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get_batch(store, 1, &k, NULL, NULL), KVTIER_INVALID_ARGUMENT);
  /* Empty batches need no arrays. */
  CHECK_OK(kvtier_put_batch(store, 0, NULL, NULL, NULL));
  CHECK_OK(kvtier_get_batch(store, 0, NULL, NULL, NULL));
  kvtier_close(NULL);
  TestLoanNullArguments(store);
}

/* The Llama-3-8B store: 64 MiB of host tier, 128 blocks of 512 KiB. */
static void TestLlamaStore(const kvtier_layout* llama) {
  enum { kBatch = 8 };
  const uint64_t kSlots = 128;
  kvtier_options o;
  kvtier_store* store = NULL;
  kvtier_stats st;
  Model m;
  uint64_t bytes, dropped, i;
  unsigned char *a, *b, *out, *batch_in[kBatch + 1], *batch_out[kBatch + 1];
  kvtier_block_key ka, kb, unknown, keys[kBatch + 1];
  kvtier_code codes[kBatch + 1];
  const void* cdatas[kBatch + 1];
  void* datas[kBatch + 1];
  uint32_t layer, block;

  memset(&m, 0, sizeof(m));
  kvtier_options_init(&o);
  o.host_capacity_bytes = kSlots * 524288;
  CHECK_OK(kvtier_open(&o, llama, &store));
  CHECK(store != NULL);
  bytes = kvtier_block_bytes(store);
  CHECK(bytes == 524288);

  memset(&st, 0, sizeof(st));
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.host_slot_bytes == 524288); /* already a multiple of 4 KiB */
  CHECK(st.host_slots == kSlots);
  CHECK(st.host_capacity_bytes == kSlots * 524288);
  /* kAuto settles on something concrete (plain when mlock is not allowed). */
  CHECK(st.host_memory == KVTIER_HOST_MEMORY_CUDA_PINNED ||
        st.host_memory == KVTIER_HOST_MEMORY_LOCKED || st.host_memory == KVTIER_HOST_MEMORY_PLAIN);
  CheckStats(store, &m, bytes);

  a = Allocate(bytes);
  b = Allocate(bytes);
  out = Allocate(bytes);
  TestNullArguments(store, out, bytes);
  CheckStats(store, &m, bytes); /* rejected calls count nothing */

  /* Put, then Get into a buffer holding other bytes: the block comes back whole. */
  ka = Key(7, 0xFEEDFACECAFEBEEFull, 42, 3, 0);
  FillRandom(a, bytes);
  FillRandom(out, bytes);
  CHECK(!kvtier_contains(store, &ka));
  CHECK_OK(kvtier_put(store, &ka, a, bytes));
  ++m.puts;
  ++m.blocks;
  CHECK(kvtier_contains(store, &ka) == 1);
  CHECK_OK(kvtier_get(store, &ka, out, bytes));
  ++m.gets;
  CHECK_SAME_BYTES(out, a, bytes);
  CheckStats(store, &m, bytes);

  /* Put of an existing key replaces the block. */
  FillRandom(b, bytes);
  CHECK_OK(kvtier_put(store, &ka, b, bytes));
  ++m.puts;
  CHECK_OK(kvtier_get(store, &ka, out, bytes));
  ++m.gets;
  CHECK_SAME_BYTES(out, b, bytes);
  CheckStats(store, &m, bytes);

  /* Keys differing in one field only are distinct blocks. */
  kb = ka;
  kb.sequence_hi ^= 1;
  CHECK(!kvtier_contains(store, &kb));
  kb = ka;
  kb.namespace_id = 8;
  CHECK(!kvtier_contains(store, &kb));

  /* A Get that finds nothing: NotFound, a message, and the buffer untouched. */
  unknown = Key(7, 0xFEEDFACECAFEBEEFull, 42, 3, 1);
  memcpy(out, a, bytes);
  CHECK_CODE(kvtier_get(store, &unknown, out, bytes), KVTIER_NOT_FOUND);
  ++m.get_misses;
  CHECK_ERROR_MENTIONS("NotFound");
  CHECK_SAME_BYTES(out, a, bytes);

  /* Malformed calls: InvalidArgument, nothing done. */
  CHECK_CODE(kvtier_put(store, &unknown, a, bytes - 1), KVTIER_INVALID_ARGUMENT);
  CHECK(strlen(kvtier_last_error()) > 0);
  CHECK_CODE(kvtier_put(store, &unknown, a, bytes + 4096), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get(store, &ka, out, bytes / 2), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_put(store, &unknown, a, 0), KVTIER_INVALID_ARGUMENT);
  kb = ka;
  kb.layer = 32; /* the layout has layers 0..31 */
  CHECK_CODE(kvtier_put(store, &kb, a, bytes), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("layer");
  CHECK_CODE(kvtier_get(store, &kb, out, bytes), KVTIER_INVALID_ARGUMENT);
  CHECK(!kvtier_contains(store, &unknown));
  CHECK_SAME_BYTES(out, a, bytes);
  CheckStats(store, &m, bytes);

  /* Delete. */
  CHECK_OK(kvtier_delete(store, &ka));
  ++m.deletes;
  --m.blocks;
  CHECK(!kvtier_contains(store, &ka));
  CHECK_CODE(kvtier_get(store, &ka, out, bytes), KVTIER_NOT_FOUND);
  ++m.get_misses;
  CHECK_CODE(kvtier_delete(store, &ka), KVTIER_NOT_FOUND);
  CheckStats(store, &m, bytes);

  /* DropSequence removes every layer and block of one (namespace, sequence) only. */
  for (layer = 0; layer < 4; ++layer) {
    for (block = 0; block < 3; ++block) {
      kvtier_block_key k = Key(7, 1, 2, layer * 8, block);
      FillRandom(a, bytes);
      CHECK_OK(kvtier_put(store, &k, a, bytes));
      ++m.puts;
      ++m.blocks;
    }
  }
  ka = Key(7, 1, 3, 0, 0); /* another sequence */
  kb = Key(9, 1, 2, 0, 0); /* the same sequence id in another namespace */
  FillRandom(a, bytes);
  FillRandom(b, bytes);
  CHECK_OK(kvtier_put(store, &ka, a, bytes));
  CHECK_OK(kvtier_put(store, &kb, b, bytes));
  m.puts += 2;
  m.blocks += 2;
  CheckStats(store, &m, bytes);
  dropped = 0;
  CHECK_OK(kvtier_drop_sequence(store, 7, 1, 2, &dropped));
  CHECK(dropped == 12);
  ++m.dropped_sequences;
  m.dropped_blocks += 12;
  m.blocks -= 12;
  {
    kvtier_block_key k = Key(7, 1, 2, 8, 1);
    CHECK(!kvtier_contains(store, &k));
  }
  CHECK(kvtier_contains(store, &ka));
  CHECK(kvtier_contains(store, &kb));
  CHECK_OK(kvtier_get(store, &ka, out, bytes));
  CHECK_SAME_BYTES(out, a, bytes);
  CHECK_OK(kvtier_get(store, &kb, out, bytes));
  CHECK_SAME_BYTES(out, b, bytes);
  m.gets += 2;
  dropped = 99;
  CHECK_OK(kvtier_drop_sequence(store, 7, 1, 2, &dropped)); /* nothing left: not an error */
  CHECK(dropped == 0);
  CHECK_OK(kvtier_drop_sequence(store, 9, 1, 2, NULL)); /* count not wanted */
  ++m.dropped_sequences;
  ++m.dropped_blocks;
  --m.blocks;
  CHECK(!kvtier_contains(store, &kb));
  CheckStats(store, &m, bytes);

  /* Batches: one outcome per member. */
  for (i = 0; i <= kBatch; ++i) {
    batch_in[i] = Allocate(bytes);
    batch_out[i] = Allocate(bytes);
    FillRandom(batch_in[i], bytes);
    FillRandom(batch_out[i], bytes);
    keys[i] = Key(3, 0, 77, (uint32_t)i, 5);
    cdatas[i] = batch_in[i];
    datas[i] = batch_out[i];
    codes[i] = KVTIER_INTERNAL;
  }
  CHECK_OK(kvtier_put_batch(store, kBatch, keys, cdatas, codes));
  for (i = 0; i < kBatch; ++i) CHECK(codes[i] == KVTIER_OK);
  m.puts += kBatch;
  m.blocks += kBatch;
  /* Member kBatch was never put: it alone misses, the others are read. */
  CHECK_CODE(kvtier_get_batch(store, kBatch + 1, keys, datas, codes), KVTIER_NOT_FOUND);
  for (i = 0; i < kBatch; ++i) {
    CHECK(codes[i] == KVTIER_OK);
    CHECK_SAME_BYTES(batch_out[i], batch_in[i], bytes);
  }
  CHECK(codes[kBatch] == KVTIER_NOT_FOUND);
  m.gets += kBatch;
  ++m.get_misses;
  CheckStats(store, &m, bytes);

  /* A bad member fails alone; the first failure is returned; codes may be NULL. */
  keys[2].layer = 40;
  for (i = 0; i < kBatch; ++i) FillRandom(batch_in[i], bytes);
  CHECK_CODE(kvtier_put_batch(store, kBatch, keys, cdatas, codes), KVTIER_INVALID_ARGUMENT);
  for (i = 0; i < kBatch; ++i) CHECK(codes[i] == (i == 2 ? KVTIER_INVALID_ARGUMENT : KVTIER_OK));
  m.puts += kBatch - 1;
  keys[2].layer = 2;
  CHECK_OK(kvtier_get_batch(store, kBatch, keys, datas, NULL));
  m.gets += kBatch;
  for (i = 0; i < kBatch; ++i) {
    if (i != 2) CHECK_SAME_BYTES(batch_out[i], batch_in[i], bytes);
  }
  CheckStats(store, &m, bytes);

  /* Overfill: the least recently used blocks are evicted (and lost: no lower tier). */
  CHECK_OK(kvtier_stats_get(store, &st));
  {
    const uint64_t before = st.host_blocks;
    const uint64_t extra = kSlots - before + 3;
    for (i = 0; i < extra; ++i) {
      kvtier_block_key k = Key(4, 0, 1000 + i, 0, 0);
      FillRandom(a, bytes);
      CHECK_OK(kvtier_put(store, &k, a, bytes));
    }
    m.puts += extra;
    m.evictions += 3;
    m.blocks = kSlots;
    /* The last block written is the most recently used: still there, intact. */
    CHECK_OK(kvtier_get(store, &(kvtier_block_key){4, 0, 1000 + extra - 1, 0, 0}, out, bytes));
    ++m.gets;
    CHECK_SAME_BYTES(out, a, bytes);
  }
  CheckStats(store, &m, bytes);

  for (i = 0; i <= kBatch; ++i) {
    free(batch_in[i]);
    free(batch_out[i]);
  }
  free(a);
  free(b);
  free(out);
  kvtier_close(store);
}

/* A store of four 16 KiB blocks in a small layout: eviction order is least recently used
 * first, where a Get counts as a use. */
static void TestSmallStoreLru(void) {
  kvtier_layout l;
  kvtier_options o;
  kvtier_store* store = NULL;
  kvtier_stats st;
  unsigned char* data[6];
  unsigned char* out;
  uint64_t bytes, i;

  l.num_layers = 2;
  l.num_kv_heads = 2;
  l.num_query_heads = 4;
  l.head_dim = 64;
  l.dtype = KVTIER_DTYPE_F16;
  l.block_tokens = 32;
  bytes = kvtier_layout_block_bytes(&l);
  CHECK(bytes == 2 * 2 * 64 * 2 * 32);
  CHECK(kvtier_layout_token_bytes(&l) == 2 * 2 * 64 * 2 * 2);

  kvtier_options_init(&o);
  o.host_capacity_bytes = 4 * bytes + 1000; /* rounds down to 4 slots */
  o.host_memory = KVTIER_HOST_MEMORY_PLAIN;
  o.async_threads = 1;
  CHECK_OK(kvtier_open(&o, &l, &store));
  CHECK(kvtier_block_bytes(store) == bytes);
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.host_slots == 4);
  CHECK(st.host_capacity_bytes == 4 * bytes);
  CHECK(st.host_memory == KVTIER_HOST_MEMORY_PLAIN);

  out = Allocate(bytes);
  for (i = 0; i < 6; ++i) {
    data[i] = Allocate(bytes);
    FillRandom(data[i], bytes);
  }
  /* Blocks 0..3 fill the store; block 4 evicts block 0, the least recently used. */
  for (i = 0; i < 5; ++i) {
    kvtier_block_key k = Key(0, 0, 5, 1, (uint32_t)i);
    CHECK_OK(kvtier_put(store, &k, data[i], bytes));
  }
  CHECK(!kvtier_contains(store, &(kvtier_block_key){0, 0, 5, 1, 0}));
  /* Reading block 1 makes it recent: block 5 then evicts block 2. */
  CHECK_OK(kvtier_get(store, &(kvtier_block_key){0, 0, 5, 1, 1}, out, bytes));
  CHECK_SAME_BYTES(out, data[1], bytes);
  CHECK_OK(kvtier_put(store, &(kvtier_block_key){0, 0, 5, 1, 5}, data[5], bytes));
  CHECK(!kvtier_contains(store, &(kvtier_block_key){0, 0, 5, 1, 2}));
  for (i = 1; i < 6; ++i) {
    kvtier_block_key k = Key(0, 0, 5, 1, (uint32_t)i);
    if (i == 2) continue;
    CHECK_OK(kvtier_get(store, &k, out, bytes));
    CHECK_SAME_BYTES(out, data[i], bytes);
  }
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.puts == 6);
  CHECK(st.evictions == 2);
  CHECK(st.evictions_lost == 2);
  CHECK(st.host_blocks == 4);
  CHECK(st.gets == 5);
  CHECK(st.bytes_got == 5 * bytes);

  kvtier_close(store);
  for (i = 0; i < 6; ++i) free(data[i]);
  free(out);
}

/* Retrieval: 2 layers, 2 KV heads, 4 query heads, head dim 32, f32, 16-token blocks.
 * Blocks hold small random keys; a "needle" block has 3 keys along the query direction,
 * so it holds most of the attention mass and kvtier_select must rank it first. */
enum { kHeadDim = 32, kKvHeads = 2, kQueryHeads = 4, kBlockTokens = 16 };

static float Uniform(float scale) { /* in [-scale, scale) */
  return scale * ((float)(NextRandom() >> 40) / (float)(1 << 23) - 1.0f);
}

static float QueryDirection(uint32_t c) {
  return ((c % 3 == 0) ? 1.0f : -0.5f) / 3.7f; /* unit length over 32 channels: ~1 */
}

/* Keys (then values) of one f32 block; `needle` plants 3 keys of norm ~6 along the query. */
static void FillRetrievalBlock(float* block, float needle) {
  uint32_t h, t, c;
  for (h = 0; h < 2 * kKvHeads * kBlockTokens * kHeadDim; ++h) block[h] = Uniform(0.3f);
  for (h = 0; h < kKvHeads; ++h) {
    for (t = 0; t < 3; ++t) {
      float* key = block + (h * kBlockTokens + t * 5 + 1) * kHeadDim;
      for (c = 0; c < kHeadDim; ++c) key[c] += needle * QueryDirection(c);
    }
  }
}

/* The layout of the retrieval tests: 2 layers of f32 blocks of the sizes above. */
static kvtier_layout RetrievalLayout(void) {
  kvtier_layout l;
  l.num_layers = 2;
  l.num_kv_heads = kKvHeads;
  l.num_query_heads = kQueryHeads;
  l.head_dim = kHeadDim;
  l.dtype = KVTIER_DTYPE_F32;
  l.block_tokens = kBlockTokens;
  return l;
}

static void TestRetrieval(void) {
  kvtier_layout l;
  kvtier_options o;
  kvtier_store* store = NULL;
  kvtier_stats st;
  kvtier_select_info info;
  float* block;
  float* noise_block;
  float queries[kQueryHeads * kHeadDim];
  int64_t selected[3];
  float scores[3];
  uint64_t bytes;
  uint32_t b, c;

  l = RetrievalLayout();
  bytes = kvtier_layout_block_bytes(&l);
  CHECK(bytes == 2 * kKvHeads * kBlockTokens * kHeadDim * 4);
  block = (float*)Allocate(bytes);
  noise_block = (float*)Allocate(bytes);
  for (c = 0; c < kQueryHeads * kHeadDim; ++c) {
    queries[c] = 4.0f * QueryDirection(c % kHeadDim) + Uniform(0.05f);
  }

  kvtier_options_init(&o);
  o.host_capacity_bytes = 64 * bytes;
  o.host_memory = KVTIER_HOST_MEMORY_PLAIN;

  /* Retrieval off: kvtier_select and kvtier_index_block are refused. */
  CHECK_OK(kvtier_open(&o, &l, &store));
  FillRetrievalBlock(block, 0.0f);
  CHECK_OK(kvtier_put(store, &(kvtier_block_key){0, 0, 1, 0, 0}, block, bytes));
  CHECK_CODE(kvtier_select(store, 0, 0, 1, 0, queries, kQueryHeads * kHeadDim, 192, selected, 16,
                           NULL, NULL),
             KVTIER_FAILED_PRECONDITION);
  CHECK_ERROR_MENTIONS("not enabled");
  CHECK_CODE(kvtier_index_block(store, &(kvtier_block_key){0, 0, 1, 0, 0}, block, bytes,
                                kBlockTokens, NULL, 0),
             KVTIER_FAILED_PRECONDITION);
  kvtier_close(store);

  /* Bad retrieval options fail the open. */
  o.retrieval.enabled = 1;
  o.retrieval.top_k = 0;
  CHECK_CODE(kvtier_open(&o, &l, &store), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("top_k");
  CHECK(store == NULL);
  o.retrieval.top_k = 2;
  o.retrieval.summary = (kvtier_summary_kind)9;
  CHECK_CODE(kvtier_open(&o, &l, &store), KVTIER_INVALID_ARGUMENT);
  o.retrieval.summary = (kvtier_summary_kind)(256 + KVTIER_SUMMARY_MEAN); /* must not wrap */
  CHECK_CODE(kvtier_open(&o, &l, &store), KVTIER_INVALID_ARGUMENT);
  o.retrieval.summary = KVTIER_SUMMARY_CLUSTERS;

  /* Top 2 blocks, one sink block (16 tokens), a two-block local window (32 tokens). */
  o.retrieval.n_init = 16;
  o.retrieval.n_local = 32;
  CHECK_OK(kvtier_open(&o, &l, &store));
  for (b = 0; b < 12; ++b) {
    kvtier_block_key k = Key(0, 0, 1, 0, b);
    FillRetrievalBlock(block, b == 6 ? 6.0f : b == 3 ? 4.0f : 0.0f);
    CHECK_OK(kvtier_put(store, &k, block, bytes));
  }
  /* 192 tokens: sink [0, 1), local window [10, 12), candidates [1, 10). */
  memset(&info, 0xAB, sizeof(info));
  selected[2] = 99;
  CHECK_OK(kvtier_select(store, 0, 0, 1, 0, queries, kQueryHeads * kHeadDim, 192, selected, 2,
                         scores, &info));
  CHECK(selected[0] == 6);
  CHECK(selected[1] == 3);
  CHECK(selected[2] == 99); /* nothing past n_selected is written */
  CHECK(scores[0] > scores[1] && scores[1] > 0.0f);
  CHECK(info.sink_blocks == 1);
  CHECK(info.local_begin == 10);
  CHECK(info.local_end == 12);
  CHECK(info.selected == 2);
  /* Scores and info are optional; another layer has nothing indexed. */
  CHECK_OK(kvtier_select(store, 0, 0, 1, 0, queries, kQueryHeads * kHeadDim, 192, selected, 2, NULL,
                         NULL));
  CHECK(selected[0] == 6);
  CHECK_OK(kvtier_select(store, 0, 0, 1, 1, queries, kQueryHeads * kHeadDim, 192, selected, 2, NULL,
                         &info));
  CHECK(selected[0] == -1 && selected[1] == -1 && info.selected == 0);

  /* Malformed calls. */
  CHECK_CODE(kvtier_select(store, 0, 0, 1, 0, queries, kQueryHeads * kHeadDim, 192, selected, 3,
                           NULL, NULL),
             KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("entries");
  CHECK_CODE(kvtier_select(store, 0, 0, 1, 0, queries, kQueryHeads * kHeadDim - 1, 192, selected, 2,
                           NULL, NULL),
             KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("query");
  CHECK_CODE(kvtier_select(store, 0, 0, 1, 2, queries, kQueryHeads * kHeadDim, 192, selected, 2,
                           NULL, NULL),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_select(NULL, 0, 0, 1, 0, queries, kQueryHeads * kHeadDim, 192, selected, 2,
                           NULL, NULL),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(
      kvtier_select(store, 0, 0, 1, 0, NULL, kQueryHeads * kHeadDim, 192, selected, 2, NULL, NULL),
      KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(
      kvtier_select(store, 0, 0, 1, 0, queries, kQueryHeads * kHeadDim, 192, NULL, 2, NULL, NULL),
      KVTIER_INVALID_ARGUMENT);

  /* Block 6 re-indexed from keys without the needle: block 3 comes first. */
  FillRetrievalBlock(noise_block, 0.0f);
  CHECK_OK(kvtier_index_block(store, &(kvtier_block_key){0, 0, 1, 0, 6}, noise_block, bytes,
                              kBlockTokens, NULL, 0));
  CHECK_OK(kvtier_select(store, 0, 0, 1, 0, queries, kQueryHeads * kHeadDim, 192, selected, 2,
                         scores, NULL));
  CHECK(selected[0] == 3);
  CHECK_CODE(kvtier_index_block(store, &(kvtier_block_key){0, 0, 1, 0, 40}, noise_block, bytes,
                                kBlockTokens, NULL, 0),
             KVTIER_NOT_FOUND);
  CHECK_CODE(kvtier_index_block(store, &(kvtier_block_key){0, 0, 1, 0, 6}, noise_block, bytes,
                                kBlockTokens, NULL, 5),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_index_block(store, &(kvtier_block_key){0, 0, 1, 0, 6}, noise_block, bytes,
                                kBlockTokens, scores, 3),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_index_block(store, NULL, noise_block, bytes, kBlockTokens, NULL, 0),
             KVTIER_INVALID_ARGUMENT);

  /* A deleted block is never selected again. */
  CHECK_OK(kvtier_delete(store, &(kvtier_block_key){0, 0, 1, 0, 3}));
  CHECK_OK(kvtier_select(store, 0, 0, 1, 0, queries, kQueryHeads * kHeadDim, 192, selected, 2, NULL,
                         NULL));
  CHECK(selected[0] != 3 && selected[1] != 3);

  memset(&st, 0xAB, sizeof(st));
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.indexed_blocks == 11);
  CHECK(st.index_memory_bytes > 0);
  CHECK(st.selects == 5);
  CHECK(st.select_nanos > 0);
  kvtier_close(store);

  /* coarse_clusters reaches the index: without the coarse rows (one pass), a block's
   * summary takes less memory. */
  {
    uint64_t two_stage_bytes;
    for (c = 0; c < 2; ++c) {
      o.retrieval.coarse_clusters = c == 0 ? 2 : 0;
      CHECK_OK(kvtier_open(&o, &l, &store));
      FillRetrievalBlock(block, 0.0f);
      CHECK_OK(kvtier_put(store, &(kvtier_block_key){0, 0, 1, 0, 0}, block, bytes));
      CHECK_OK(kvtier_stats_get(store, &st));
      CHECK(st.indexed_blocks == 1);
      if (c == 0) {
        two_stage_bytes = st.index_memory_bytes;
      } else {
        CHECK(st.index_memory_bytes < two_stage_bytes);
      }
      kvtier_close(store);
    }
  }
  free(block);
  free(noise_block);
}

/* The GPU tier through the C API, emulated in host memory (force_emulated_device), so
 * the device addresses can be read back here: every acquired block's bytes must be the
 * block that was put, in place when kvtier_acquire returns. */
static void TestAcquire(void) {
  enum { kBlocks = 12 };
  kvtier_layout l;
  kvtier_options o;
  kvtier_store* store = NULL;
  kvtier_stats st;
  kvtier_acquire_info info;
  float* blocks[kBlocks];
  int64_t want[6] = {0, 6, -1, 3, 10, 11};
  int64_t missing[2] = {4, 40};
  uint64_t addresses[6];
  uint64_t again[6];
  uint64_t bytes, lease;
  uint32_t b, i;

  l = RetrievalLayout();
  bytes = kvtier_layout_block_bytes(&l);
  for (b = 0; b < kBlocks; ++b) {
    blocks[b] = (float*)Allocate(bytes);
    FillRetrievalBlock(blocks[b], b == 6 ? 6.0f : 0.0f);
  }
  kvtier_options_init(&o);
  o.host_capacity_bytes = 64 * bytes;
  o.host_memory = KVTIER_HOST_MEMORY_PLAIN;
  o.retrieval.enabled = 1;
  o.retrieval.top_k = 2;
  o.retrieval.n_init = 16;
  o.retrieval.n_local = 32;
  o.retrieval.force_emulated_device = 1;

  /* No GPU tier configured: refused. */
  CHECK_OK(kvtier_open(&o, &l, &store));
  CHECK_OK(kvtier_put(store, &(kvtier_block_key){0, 0, 2, 0, 0}, blocks[0], bytes));
  CHECK_CODE(kvtier_acquire(store, 0, 0, 2, 0, want, 1, NULL, addresses, NULL, &info),
             KVTIER_FAILED_PRECONDITION);
  kvtier_close(store);

  o.retrieval.device_capacity_bytes = 8 * bytes;
  o.retrieval.prefetch = 0; /* the counts below are exact without background prefetch */
  CHECK_OK(kvtier_open(&o, &l, &store));
  for (b = 0; b < kBlocks; ++b) {
    CHECK_OK(kvtier_put(store, &(kvtier_block_key){0, 0, 2, 0, b}, blocks[b], bytes));
  }
  memset(addresses, 0xAB, sizeof(addresses));
  CHECK_OK(kvtier_acquire(store, 0, 0, 2, 0, want, 6, NULL, addresses, NULL, &info));
  CHECK(info.hits == 0);
  CHECK(info.from_host == 5);
  CHECK(info.from_disk == 0);
  lease = info.lease;
  for (i = 0; i < 6; ++i) {
    if (want[i] < 0) {
      CHECK(addresses[i] == 0);
      continue;
    }
    CHECK(addresses[i] != 0);
    CHECK(memcmp((const void*)(uintptr_t)addresses[i], blocks[want[i]], bytes) == 0);
  }
  /* The same blocks again, under a second lease: all hits, at the same addresses. */
  CHECK_OK(kvtier_acquire(store, 0, 0, 2, 0, want, 6, NULL, again, NULL, &info));
  CHECK(info.hits == 5 && info.from_host == 0);
  CHECK(memcmp(again, addresses, sizeof(again)) == 0);
  CHECK(info.lease != lease);
  CHECK_OK(kvtier_release(store, info.lease));

  memset(&st, 0xAB, sizeof(st));
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.device_capacity_bytes >= 8 * bytes);
  CHECK(st.device_slots == 8);
  CHECK(st.device_blocks == 5);
  CHECK(st.device_emulated == 1);
  CHECK(st.acquires == 2);
  CHECK(st.acquired_blocks == 10);
  CHECK(st.device_hits == 5);
  CHECK(st.device_fetches_host == 5);
  CHECK(st.device_fetches_disk == 0);
  CHECK(st.device_bytes_in == 5 * bytes);
  CHECK(st.disk_capacity_bytes == 0); /* memory-only */

  /* A block stored nowhere: NotFound, and nothing of the call stays pinned. */
  CHECK_CODE(kvtier_acquire(store, 0, 0, 2, 0, missing, 2, NULL, again, NULL, &info),
             KVTIER_NOT_FOUND);
  /* Pinned blocks fill the tier: the 5 of the first lease plus 4 more do not fit in 8. */
  {
    int64_t more[4] = {1, 2, 4, 5};
    CHECK_CODE(kvtier_acquire(store, 0, 0, 2, 0, more, 4, NULL, again, NULL, &info),
               KVTIER_RESOURCE_EXHAUSTED);
    CHECK_OK(kvtier_release(store, lease));
    CHECK_OK(kvtier_acquire(store, 0, 0, 2, 0, more, 4, NULL, again, NULL, &info));
    for (i = 0; i < 4; ++i) {
      CHECK(memcmp((const void*)(uintptr_t)again[i], blocks[more[i]], bytes) == 0);
    }
    CHECK_OK(kvtier_release(store, info.lease));
  }

  /* Malformed calls. */
  CHECK_CODE(kvtier_release(store, lease), KVTIER_INVALID_ARGUMENT); /* released already */
  CHECK_ERROR_MENTIONS("lease");
  CHECK_CODE(kvtier_acquire(store, 0, 0, 2, 0, want, 6, NULL, addresses, NULL, NULL),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_acquire(store, 0, 0, 2, 0, NULL, 6, NULL, addresses, NULL, &info),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_acquire(store, 0, 0, 2, 0, want, 6, NULL, NULL, NULL, &info),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_acquire(NULL, 0, 0, 2, 0, want, 6, NULL, addresses, NULL, &info),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_acquire(store, 0, 0, 2, 5, want, 6, NULL, addresses, NULL, &info),
             KVTIER_INVALID_ARGUMENT); /* layer 5 of 2 */
  CHECK_CODE(kvtier_release(NULL, 1), KVTIER_INVALID_ARGUMENT);
  kvtier_close(store);
  for (b = 0; b < kBlocks; ++b) free(blocks[b]);
}

/* What TestLoans' store lends: embedded, host-tier slots; a kvtierd client over its Unix
 * socket, kStagingBlocks staging slots (sidecar_staging_blocks); over TCP, memory of the
 * client's own. */
typedef enum Lender { kLendHostSlots, kLendStagingSlots, kLendClientMemory } Lender;
enum { kStagingBlocks = 8 };

/* What the store has lent and not had back: `lent` blocks. Embedded, each pins a host
 * slot. A kvtierd client's loans are staging slots (the daemon's own host slots may be
 * pinned by its disk writes): the rest of the area can be lent, not one more. */
static void CheckLent(kvtier_store* store, Lender lender, uint32_t lent) {
  kvtier_put_buffers* buffers = NULL;
  void* datas[kStagingBlocks + 1];
  kvtier_stats st;
  if (lender == kLendHostSlots) {
    CHECK_OK(kvtier_stats_get(store, &st));
    CHECK(st.host_pinned_slots == lent);
    return;
  }
  if (lender == kLendClientMemory) return; /* nothing to see */
  CHECK(lent <= kStagingBlocks);
  CHECK_CODE(kvtier_reserve(store, kStagingBlocks - lent + 1, datas, &buffers),
             lent == 0 ? KVTIER_INVALID_ARGUMENT : KVTIER_RESOURCE_EXHAUSTED);
  CHECK(buffers == NULL);
  if (lent == kStagingBlocks) return;
  CHECK_OK(kvtier_reserve(store, kStagingBlocks - lent, datas, &buffers));
  kvtier_put_buffers_release(buffers);
}

/* Loans (kvtier_borrow, kvtier_reserve) of Llama-3-8B blocks from `o`'s store, embedded
 * or a kvtierd's client (then the counters are the daemon's, shared, and only their
 * growth is checked). Keys are in namespace `ns` and sequence `seq` (fresh per run). */
static void TestLoans(const kvtier_options* o, const kvtier_layout* llama, Lender lender,
                      uint32_t ns, uint64_t seq) {
  enum { kN = 6, kMissing = 3, kReserved = 4 };
  kvtier_store* store = NULL;
  kvtier_borrowed* borrowed = NULL;
  kvtier_put_buffers* buffers = NULL;
  kvtier_stats before, st;
  kvtier_block_key keys[kN], rkeys[kReserved], twice[2];
  kvtier_code codes[kN];
  const void* cdatas[kN];
  void* datas[kN];
  unsigned char *in[kN], *want[kReserved], *out;
  uint64_t bytes;
  uint32_t i, j;
  int sentinel = 0;

  CHECK_OK(kvtier_open(o, llama, &store));
  bytes = kvtier_block_bytes(store);
  CHECK(bytes == 524288);
  out = Allocate(bytes);
  /* A daemon may hold the blocks of an earlier run with the same seed. */
  CHECK_OK(kvtier_drop_sequence(store, ns, 0xB0, seq, NULL));
  CHECK_OK(kvtier_drop_sequence(store, ns, 0xC0, seq, NULL));
  CHECK_OK(kvtier_stats_get(store, &before));

  /* Blocks put as usual, then borrowed, with member kMissing never put. */
  for (i = 0; i < kN; ++i) {
    in[i] = Allocate(bytes);
    FillRandom(in[i], bytes);
    keys[i] = Key(ns, 0xB0, seq, i % 3, i);
    if (i != kMissing) CHECK_OK(kvtier_put(store, &keys[i], in[i], bytes));
    cdatas[i] = &sentinel; /* every entry must be written */
    codes[i] = KVTIER_INTERNAL;
  }
  CHECK(!kvtier_contains(store, &keys[kMissing]));
  CHECK_CODE(kvtier_borrow(store, kN, keys, cdatas, codes, &borrowed), KVTIER_NOT_FOUND);
  CHECK_ERROR_MENTIONS("NotFound");
  CHECK(borrowed != NULL); /* members failed, not the call: still a loan to release */
  CHECK(codes[kMissing] == KVTIER_NOT_FOUND);
  CHECK(cdatas[kMissing] == NULL);
  for (i = 0; i < kN; ++i) {
    if (i == kMissing) continue;
    CHECK(codes[i] == KVTIER_OK);
    CHECK(cdatas[i] != NULL && cdatas[i] != (const void*)&sentinel);
    CHECK(memcmp(cdatas[i], in[i], bytes) == 0);
    for (j = 0; j < i; ++j) CHECK(j == kMissing || cdatas[j] != cdatas[i]);
  }
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.puts - before.puts == kN - 1);
  CHECK(st.gets - before.gets == kN - 1);
  CHECK(st.get_misses - before.get_misses == 1);
  CheckLent(store, lender, kN - 1); /* embedded, in place: pinned, not copied */

  /* Rewritten or deleted meanwhile, a borrowed block stays as it was lent. */
  FillRandom(out, bytes);
  CHECK_OK(kvtier_put(store, &keys[0], out, bytes));
  CHECK_OK(kvtier_delete(store, &keys[1]));
  CHECK(!kvtier_contains(store, &keys[1]));
  CHECK(memcmp(cdatas[0], in[0], bytes) == 0);
  CHECK(memcmp(cdatas[1], in[1], bytes) == 0);
  for (i = 2; i < kN; ++i) CHECK(i == kMissing || memcmp(cdatas[i], in[i], bytes) == 0);
  memcpy(in[0], out, bytes);
  CHECK_OK(kvtier_get(store, &keys[0], out, bytes));
  CHECK_SAME_BYTES(out, in[0], bytes);
  kvtier_borrowed_release(borrowed);
  CheckLent(store, lender, 0);

  /* Codes may be NULL; a key twice lends its block twice; a bad key fails alone. */
  CHECK_OK(kvtier_borrow(store, 1, &keys[2], cdatas, NULL, &borrowed));
  CHECK(memcmp(cdatas[0], in[2], bytes) == 0);
  kvtier_borrowed_release(borrowed);
  twice[0] = keys[4];
  twice[1] = keys[4];
  CHECK_OK(kvtier_borrow(store, 2, twice, cdatas, codes, &borrowed));
  CHECK(codes[0] == KVTIER_OK && codes[1] == KVTIER_OK);
  CHECK(memcmp(cdatas[0], in[4], bytes) == 0);
  CHECK(memcmp(cdatas[1], in[4], bytes) == 0);
  kvtier_borrowed_release(borrowed);
  keys[2].layer = 40; /* the layout has layers 0..31 */
  CHECK_CODE(kvtier_borrow(store, 3, &keys[2], cdatas, codes, &borrowed), KVTIER_INVALID_ARGUMENT);
  CHECK(codes[0] == KVTIER_INVALID_ARGUMENT && cdatas[0] == NULL);
  CHECK(codes[1] == KVTIER_NOT_FOUND && cdatas[1] == NULL);
  CHECK(codes[2] == KVTIER_OK && memcmp(cdatas[2], in[4], bytes) == 0);
  kvtier_borrowed_release(borrowed);
  keys[2].layer = 2;
  CheckLent(store, lender, 0);

  /* Reserve, fill with fresh bytes, commit: the blocks are then stored, byte-exact. */
  for (i = 0; i < kReserved; ++i) {
    want[i] = Allocate(bytes);
    FillRandom(want[i], bytes);
    rkeys[i] = Key(ns, 0xC0, seq, i, 7);
    datas[i] = NULL;
    codes[i] = KVTIER_INTERNAL;
  }
  CHECK_OK(kvtier_stats_get(store, &before));
  CHECK_OK(kvtier_reserve(store, kReserved, datas, &buffers));
  CHECK(buffers != NULL);
  for (i = 0; i < kReserved; ++i) {
    CHECK(datas[i] != NULL);
    for (j = 0; j < i; ++j) CHECK(datas[j] != datas[i]);
    memcpy(datas[i], want[i], bytes);
    CHECK(!kvtier_contains(store, &rkeys[i])); /* nothing put before the commit */
  }
  CHECK_OK(kvtier_commit(buffers, rkeys, codes));
  for (i = 0; i < kReserved; ++i) {
    CHECK(codes[i] == KVTIER_OK);
    FillRandom(out, bytes);
    CHECK_OK(kvtier_get(store, &rkeys[i], out, bytes));
    CHECK_SAME_BYTES(out, want[i], bytes);
  }
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.puts - before.puts == kReserved);

  /* Once: a second commit is refused, for every member, and puts nothing. */
  for (i = 0; i < kReserved; ++i) codes[i] = KVTIER_INTERNAL;
  CHECK_CODE(kvtier_commit(buffers, rkeys, codes), KVTIER_FAILED_PRECONDITION);
  CHECK_ERROR_MENTIONS("already committed");
  for (i = 0; i < kReserved; ++i) CHECK(codes[i] == KVTIER_FAILED_PRECONDITION);
  CHECK_CODE(kvtier_commit(buffers, rkeys, NULL), KVTIER_FAILED_PRECONDITION);
  kvtier_put_buffers_release(buffers);
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.puts - before.puts == kReserved);

  /* Released without a commit: nothing is put. */
  for (i = 0; i < kReserved; ++i) rkeys[i].block = 8;
  CHECK_OK(kvtier_reserve(store, kReserved, datas, &buffers));
  for (i = 0; i < kReserved; ++i) FillRandom((unsigned char*)datas[i], bytes);
  kvtier_put_buffers_release(buffers);
  for (i = 0; i < kReserved; ++i) CHECK(!kvtier_contains(store, &rkeys[i]));
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.puts - before.puts == kReserved);

  /* NULL keys: refused, nothing done, the buffers still to commit. A bad key fails alone. */
  for (i = 0; i < kReserved; ++i) rkeys[i].block = 9;
  CHECK_OK(kvtier_reserve(store, kReserved, datas, &buffers));
  for (i = 0; i < kReserved; ++i) {
    FillRandom(want[i], bytes);
    memcpy(datas[i], want[i], bytes);
  }
  CHECK_CODE(kvtier_commit(buffers, NULL, codes), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("null keys");
  for (i = 0; i < kReserved; ++i) CHECK(!kvtier_contains(store, &rkeys[i]));
  rkeys[1].layer = 40;
  CHECK_CODE(kvtier_commit(buffers, rkeys, codes), KVTIER_INVALID_ARGUMENT);
  CHECK_ERROR_MENTIONS("layer");
  kvtier_put_buffers_release(buffers);
  for (i = 0; i < kReserved; ++i) {
    if (i == 1) {
      CHECK(codes[i] == KVTIER_INVALID_ARGUMENT);
      CHECK(!kvtier_contains(store, &rkeys[i]));
      continue;
    }
    CHECK(codes[i] == KVTIER_OK);
    CHECK_OK(kvtier_get(store, &rkeys[i], out, bytes));
    CHECK_SAME_BYTES(out, want[i], bytes);
  }
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.puts - before.puts == 2 * kReserved - 1);
  CheckLent(store, lender, 0);

  /* The loans touched nothing else: the first blocks are still there, intact. */
  for (i = 2; i < kN; ++i) {
    if (i == kMissing) continue;
    CHECK_OK(kvtier_get(store, &keys[i], out, bytes));
    CHECK_SAME_BYTES(out, in[i], bytes);
  }
  kvtier_close(store);
  for (i = 0; i < kN; ++i) free(in[i]);
  for (i = 0; i < kReserved; ++i) free(want[i]);
  free(out);
}

int main(int argc, char** argv) {
  kvtier_layout llama;
  /* kvtier_c_api_test [SEED [KVTIERD [TOKEN]]]: SEED 0 (or none) is the time. */
  g_seed = argc > 1 ? strtoull(argv[1], NULL, 0) : 0;
  if (g_seed == 0) g_seed = (uint64_t)time(NULL);
  g_rng = g_seed;
  printf("c_api_test: seed %" PRIu64 "\n", g_seed);

  TestNamesAndDefaults();
  TestLayouts();
  kvtier_layout_llama3_8b(&llama);
  TestOpenErrors(&llama);
  TestLlamaStore(&llama);
  TestSmallStoreLru();
  TestRetrieval();
  TestAcquire();
  {
    kvtier_options o;
    kvtier_options_init(&o);
    o.host_capacity_bytes = (uint64_t)64 << 20;
    o.host_memory = KVTIER_HOST_MEMORY_PLAIN;
    TestLoans(&o, &llama, kLendHostSlots, 5, NextRandom());
    if (argc > 2) { /* a kvtierd serving Llama-3-8B: its socket, or "host:port" */
      const int unix_socket = strchr(argv[2], '/') != NULL;
      if (unix_socket) {
        o.sidecar_socket = argv[2];
      } else {
        o.sidecar_tcp_address = argv[2];
      }
      o.sidecar_token = argc > 3 ? argv[3] : NULL;
      o.sidecar_staging_blocks = kStagingBlocks;
      printf("c_api_test: loans through kvtierd at %s\n", argv[2]);
      TestLoans(&o, &llama, unix_socket ? kLendStagingSlots : kLendClientMemory,
                o.sidecar_namespace_id, NextRandom());
    }
  }
  printf("c_api_test: all checks passed\n");
  return 0;
}
