/* The C API's asynchronous calls and threading contract, as a C99 program with pthreads.
 *
 * Checks: kvtier_put_async / kvtier_get_async complete once each, on another thread,
 * with the code and message the synchronous call would give; an operation has taken
 * effect when its completion runs, and a completion may call the store; submission
 * errors are returned without a completion; kvtier_close waits for operations in flight;
 * kvtier_last_error() is per thread; many threads may share one store.
 *
 * Usage: kvtier_c_api_async_test [seed]. Exits 0 when every check passes, else 1.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
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

/* splitmix64 over a caller-owned state, so threads draw independent streams. */
static uint64_t NextRandom(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static void FillRandom(uint64_t* state, unsigned char* data, uint64_t bytes) {
  uint64_t i, j;
  for (i = 0; i < bytes; i += 8) {
    uint64_t r = NextRandom(state);
    for (j = 0; j < 8 && i + j < bytes; ++j) data[i + j] = (unsigned char)(r >> (8 * j));
  }
}

static unsigned char* Allocate(uint64_t bytes) {
  unsigned char* p = (unsigned char*)malloc((size_t)bytes);
  CHECK(p != NULL);
  return p;
}

/* The offset of the first byte where a and b differ, or `bytes` when they are equal. */
static uint64_t FirstDifference(const unsigned char* a, const unsigned char* b, uint64_t bytes) {
  uint64_t i;
  for (i = 0; i < bytes; ++i) {
    if (a[i] != b[i]) return i;
  }
  return bytes;
}

#define CHECK_SAME_BYTES(got, want, bytes) CHECK(FirstDifference((got), (want), (bytes)) == (bytes))

static kvtier_block_key Key(uint32_t ns, uint64_t lo, uint32_t layer, uint32_t block) {
  kvtier_block_key k;
  k.namespace_id = ns;
  k.sequence_hi = 0xA5A5;
  k.sequence_lo = lo;
  k.layer = layer;
  k.block = block;
  return k;
}

/* --- Completions ------------------------------------------------------------------- */

enum { kMaxOps = 256 };

/* The outcome of one asynchronous operation, as its completion saw it. */
typedef struct Op {
  struct Tracker* tracker;
  kvtier_block_key key;
  int runs; /* completions run: must end at exactly 1 */
  kvtier_code code;
  char message[256];
  int message_was_null;
  int on_caller_thread; /* the completion ran on the submitting thread */
  int contained;        /* kvtier_contains(key) from inside the completion, or -1 */
} Op;

/* Counts completions; a waiter sleeps on `cv` until `done` reaches a target. */
typedef struct Tracker {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done;
  pthread_t caller;
  kvtier_store* store;
  Op ops[kMaxOps];
} Tracker;

static void TrackerInit(Tracker* t, kvtier_store* store) {
  int i;
  memset(t, 0, sizeof(*t));
  CHECK(pthread_mutex_init(&t->mu, NULL) == 0);
  CHECK(pthread_cond_init(&t->cv, NULL) == 0);
  t->caller = pthread_self();
  t->store = store;
  for (i = 0; i < kMaxOps; ++i) t->ops[i].tracker = t;
}

static void TrackerDestroy(Tracker* t) {
  pthread_cond_destroy(&t->cv);
  pthread_mutex_destroy(&t->mu);
}

static void OnComplete(void* user_data, kvtier_code code, const char* message) {
  Op* op = (Op*)user_data;
  Tracker* t = op->tracker;
  /* The completion may call the store; the operation has taken effect by now. (Not
   * while kvtier_close runs: no call may start then; t->store is NULL for that.) */
  const int contained = t->store != NULL ? kvtier_contains(t->store, &op->key) : -1;
  pthread_mutex_lock(&t->mu);
  ++op->runs;
  op->code = code;
  op->message_was_null = message == NULL;
  if (message != NULL) snprintf(op->message, sizeof(op->message), "%s", message);
  op->on_caller_thread = pthread_equal(pthread_self(), t->caller);
  op->contained = contained;
  ++t->done;
  pthread_cond_broadcast(&t->cv);
  pthread_mutex_unlock(&t->mu);
}

/* Waits until `target` completions have run in all; fails after 60 s. */
static void WaitFor(Tracker* t, int target) {
  struct timespec deadline;
  CHECK(clock_gettime(CLOCK_REALTIME, &deadline) == 0);
  deadline.tv_sec += 60;
  pthread_mutex_lock(&t->mu);
  while (t->done < target) {
    int rc = pthread_cond_timedwait(&t->cv, &t->mu, &deadline);
    if (rc == ETIMEDOUT && t->done < target) {
      pthread_mutex_unlock(&t->mu);
      Fail(__FILE__, __LINE__, "timed out waiting for completions");
    }
  }
  pthread_mutex_unlock(&t->mu);
}

static int Done(Tracker* t) {
  int done;
  pthread_mutex_lock(&t->mu);
  done = t->done;
  pthread_mutex_unlock(&t->mu);
  return done;
}

/* --- Tests ------------------------------------------------------------------------- */

static kvtier_store* OpenLlama(uint64_t capacity_bytes, uint32_t async_threads) {
  kvtier_layout l;
  kvtier_options o;
  kvtier_store* store = NULL;
  kvtier_layout_llama3_8b(&l);
  kvtier_options_init(&o);
  o.host_capacity_bytes = capacity_bytes;
  o.host_memory = KVTIER_HOST_MEMORY_PLAIN;
  o.async_threads = async_threads;
  CHECK_OK(kvtier_open(&o, &l, &store));
  CHECK(store != NULL);
  return store;
}

/* Async Put then async Get of N blocks: every completion runs once, off the caller's
 * thread, with OK and ""; the data round-trips; stats count each operation. */
static void TestRoundTrip(uint64_t* rng) {
  enum { kBlocks = 32 };
  kvtier_store* store = OpenLlama((uint64_t)64 << 20, 2);
  const uint64_t bytes = kvtier_block_bytes(store);
  static Tracker t;
  unsigned char* in[kBlocks];
  unsigned char* out[kBlocks];
  kvtier_stats st;
  int i;

  TrackerInit(&t, store);
  for (i = 0; i < kBlocks; ++i) {
    in[i] = Allocate(bytes);
    out[i] = Allocate(bytes);
    FillRandom(rng, in[i], bytes);
    FillRandom(rng, out[i], bytes);
    t.ops[i].key = Key(1, 10, (uint32_t)i, (uint32_t)(i % 3));
    CHECK_OK(kvtier_put_async(store, &t.ops[i].key, in[i], bytes, OnComplete, &t.ops[i]));
  }
  WaitFor(&t, kBlocks);
  for (i = 0; i < kBlocks; ++i) {
    const Op* op = &t.ops[i];
    CHECK(op->runs == 1);
    CHECK(op->code == KVTIER_OK);
    CHECK(!op->message_was_null);
    CHECK(op->message[0] == '\0');
    CHECK(!op->on_caller_thread);
    CHECK(op->contained == 1);
    CHECK(kvtier_contains(store, &op->key) == 1);
  }

  for (i = 0; i < kBlocks; ++i) {
    t.ops[kBlocks + i].key = t.ops[i].key;
    CHECK_OK(kvtier_get_async(store, &t.ops[kBlocks + i].key, out[i], bytes, OnComplete,
                              &t.ops[kBlocks + i]));
  }
  WaitFor(&t, 2 * kBlocks);
  for (i = 0; i < kBlocks; ++i) {
    const Op* op = &t.ops[kBlocks + i];
    CHECK(op->runs == 1);
    CHECK(op->code == KVTIER_OK);
    CHECK(op->message[0] == '\0');
    CHECK_SAME_BYTES(out[i], in[i], bytes);
  }
  CHECK(Done(&t) == 2 * kBlocks); /* no completion ran twice */

  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.puts == kBlocks);
  CHECK(st.gets == kBlocks);
  CHECK(st.get_misses == 0);
  CHECK(st.host_blocks == kBlocks);
  CHECK(st.host_pinned_slots == 0);
  CHECK(st.bytes_put == kBlocks * bytes);
  CHECK(st.bytes_got == kBlocks * bytes);

  kvtier_close(store);
  TrackerDestroy(&t);
  for (i = 0; i < kBlocks; ++i) {
    free(in[i]);
    free(out[i]);
  }
}

/* Failures of the operation reach the completion (the submission itself succeeds);
 * failures of the submission are returned and run no completion. */
static void TestErrors(uint64_t* rng) {
  kvtier_store* store = OpenLlama((uint64_t)8 << 20, 1);
  const uint64_t bytes = kvtier_block_bytes(store);
  static Tracker t;
  unsigned char* buf = Allocate(bytes);
  kvtier_block_key k = Key(2, 20, 0, 0);
  kvtier_stats st;

  TrackerInit(&t, store);
  FillRandom(rng, buf, bytes);
  t.ops[0].key = Key(2, 20, 0, 99); /* never written */
  CHECK_OK(kvtier_get_async(store, &t.ops[0].key, buf, bytes, OnComplete, &t.ops[0]));
  t.ops[1].key = k;
  CHECK_OK(kvtier_put_async(store, &k, buf, bytes - 8, OnComplete, &t.ops[1]));
  t.ops[2].key = k;
  CHECK_OK(kvtier_put_async(store, &k, NULL, bytes, OnComplete, &t.ops[2]));
  t.ops[3].key = Key(2, 20, 32, 0); /* layer outside the layout */
  CHECK_OK(kvtier_get_async(store, &t.ops[3].key, buf, bytes, OnComplete, &t.ops[3]));
  WaitFor(&t, 4);
  CHECK(t.ops[0].code == KVTIER_NOT_FOUND);
  CHECK(strlen(t.ops[0].message) > 0);
  CHECK(t.ops[1].code == KVTIER_INVALID_ARGUMENT);
  CHECK(strstr(t.ops[1].message, "bytes") != NULL);
  CHECK(t.ops[2].code == KVTIER_INVALID_ARGUMENT);
  CHECK(strlen(t.ops[2].message) > 0);
  CHECK(t.ops[3].code == KVTIER_INVALID_ARGUMENT);
  CHECK(strstr(t.ops[3].message, "layer") != NULL);
  CHECK(t.ops[1].contained == 0); /* nothing was written */

  CHECK_CODE(kvtier_put_async(NULL, &k, buf, bytes, OnComplete, &t.ops[4]),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_put_async(store, NULL, buf, bytes, OnComplete, &t.ops[4]),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_put_async(store, &k, buf, bytes, NULL, &t.ops[4]), KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get_async(NULL, &k, buf, bytes, OnComplete, &t.ops[4]),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get_async(store, NULL, buf, bytes, OnComplete, &t.ops[4]),
             KVTIER_INVALID_ARGUMENT);
  CHECK_CODE(kvtier_get_async(store, &k, buf, bytes, NULL, &t.ops[4]), KVTIER_INVALID_ARGUMENT);
  CHECK(strlen(kvtier_last_error()) > 0);

  kvtier_close(store); /* waits for anything in flight */
  CHECK(Done(&t) == 4);
  CHECK(t.ops[4].runs == 0);

  store = OpenLlama((uint64_t)8 << 20, 1);
  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.puts == 0); /* a fresh store */
  kvtier_close(store);
  TrackerDestroy(&t);
  free(buf);
}

/* kvtier_close waits for every submitted operation: all completions have run when it
 * returns, and the blocks they wrote were whole. */
static void TestCloseWaits(uint64_t* rng) {
  enum { kOps = 96 };
  kvtier_store* store = OpenLlama((uint64_t)64 << 20, 2);
  const uint64_t bytes = kvtier_block_bytes(store);
  static Tracker t;
  unsigned char* buf = Allocate(bytes);
  int i;

  TrackerInit(&t, NULL); /* completions that run inside kvtier_close leave the store be */
  FillRandom(rng, buf, bytes);
  for (i = 0; i < kOps; ++i) {
    t.ops[i].key = Key(3, 30, (uint32_t)(i % 32), (uint32_t)(i / 32));
    CHECK_OK(kvtier_put_async(store, &t.ops[i].key, buf, bytes, OnComplete, &t.ops[i]));
  }
  kvtier_close(store);
  CHECK(Done(&t) == kOps);
  for (i = 0; i < kOps; ++i) {
    CHECK(t.ops[i].runs == 1);
    CHECK(t.ops[i].code == KVTIER_OK);
  }
  TrackerDestroy(&t);
  free(buf);
}

/* --- Many threads, one store ------------------------------------------------------- */

enum { kThreads = 4, kRounds = 24 };

typedef struct Worker {
  kvtier_store* store;
  uint32_t id;
  uint64_t rng;
  int failed_line; /* 0, or the line of the first failed check */
  char error[256];
} Worker;

#define WORKER_CHECK(w, cond)                                                          \
  do {                                                                                 \
    if (!(cond) && (w)->failed_line == 0) {                                            \
      (w)->failed_line = __LINE__;                                                     \
      snprintf((w)->error, sizeof((w)->error), "%s (%s)", #cond, kvtier_last_error()); \
    }                                                                                  \
  } while (0)

/* Each thread writes and reads back its own sequence (sync and batch calls), checking
 * contents, while the others do the same; then checks its last error is its own. */
static void* WorkerMain(void* arg) {
  Worker* w = (Worker*)arg;
  const uint64_t bytes = kvtier_block_bytes(w->store);
  unsigned char* in = (unsigned char*)malloc((size_t)bytes);
  unsigned char* out = (unsigned char*)malloc((size_t)bytes);
  int round;
  WORKER_CHECK(w, in != NULL && out != NULL);
  if (in == NULL || out == NULL) return NULL;
  for (round = 0; round < kRounds && w->failed_line == 0; ++round) {
    kvtier_block_key k = Key(4, 100 + w->id, (uint32_t)(round % 32), (uint32_t)round);
    const void* cdata = in;
    void* data = out;
    kvtier_code code = KVTIER_INTERNAL;
    FillRandom(&w->rng, in, bytes);
    if (round % 2 == 0) {
      WORKER_CHECK(w, kvtier_put(w->store, &k, in, bytes) == KVTIER_OK);
      WORKER_CHECK(w, kvtier_get(w->store, &k, out, bytes) == KVTIER_OK);
    } else {
      WORKER_CHECK(w, kvtier_put_batch(w->store, 1, &k, &cdata, &code) == KVTIER_OK);
      WORKER_CHECK(w, kvtier_get_batch(w->store, 1, &k, &data, &code) == KVTIER_OK);
      WORKER_CHECK(w, code == KVTIER_OK);
    }
    WORKER_CHECK(w, FirstDifference(out, in, bytes) == bytes);
    WORKER_CHECK(w, kvtier_delete(w->store, &k) == KVTIER_OK);
  }
  /* This thread's own failure, and nobody else's, is its last error. */
  {
    kvtier_block_key k = Key(4, 100 + w->id, 0, 9999);
    WORKER_CHECK(w, kvtier_get(w->store, &k, out, bytes) == KVTIER_NOT_FOUND);
    WORKER_CHECK(w, strstr(kvtier_last_error(), "NotFound") != NULL);
    WORKER_CHECK(w, strstr(kvtier_last_error(), "9999") != NULL);
  }
  free(in);
  free(out);
  return NULL;
}

/* A thread that has made no failing call sees "" (*arg: 1 when it does). */
static void* FreshThreadMain(void* arg) {
  const char* message = kvtier_last_error();
  *(int*)arg = message != NULL && message[0] == '\0';
  return NULL;
}

static void TestThreads(uint64_t* rng) {
  kvtier_store* store = OpenLlama((uint64_t)16 << 20, 2);
  Worker workers[kThreads];
  pthread_t threads[kThreads];
  int fresh_is_empty = 0;
  pthread_t fresh_thread;
  kvtier_stats st;
  int i;

  /* An error on this thread, before the workers make their own. */
  CHECK_CODE(kvtier_put(store, &(kvtier_block_key){4, 0, 1, 0, 0}, NULL, 1),
             KVTIER_INVALID_ARGUMENT);
  CHECK(strstr(kvtier_last_error(), "InvalidArgument") != NULL);

  for (i = 0; i < kThreads; ++i) {
    memset(&workers[i], 0, sizeof(workers[i]));
    workers[i].store = store;
    workers[i].id = (uint32_t)i;
    workers[i].rng = NextRandom(rng);
    CHECK(pthread_create(&threads[i], NULL, WorkerMain, &workers[i]) == 0);
  }
  for (i = 0; i < kThreads; ++i) CHECK(pthread_join(threads[i], NULL) == 0);
  for (i = 0; i < kThreads; ++i) {
    if (workers[i].failed_line != 0) {
      fprintf(stderr, "worker %d: line %d: %s\n", i, workers[i].failed_line, workers[i].error);
      Fail(__FILE__, __LINE__, "a worker thread failed a check");
    }
  }
  /* The workers' NotFound errors did not replace this thread's. */
  CHECK(strstr(kvtier_last_error(), "InvalidArgument") != NULL);
  CHECK(pthread_create(&fresh_thread, NULL, FreshThreadMain, &fresh_is_empty) == 0);
  CHECK(pthread_join(fresh_thread, NULL) == 0);
  CHECK(fresh_is_empty);

  CHECK_OK(kvtier_stats_get(store, &st));
  CHECK(st.puts == (uint64_t)kThreads * kRounds);
  CHECK(st.gets == (uint64_t)kThreads * kRounds);
  CHECK(st.deletes == (uint64_t)kThreads * kRounds);
  CHECK(st.get_misses == kThreads);
  CHECK(st.host_blocks == 0);
  CHECK(st.host_pinned_slots == 0);
  kvtier_close(store);
}

int main(int argc, char** argv) {
  uint64_t rng;
  g_seed = argc > 1 ? strtoull(argv[1], NULL, 0) : (uint64_t)time(NULL);
  rng = g_seed;
  printf("c_api_async_test: seed %" PRIu64 "\n", g_seed);

  TestRoundTrip(&rng);
  TestErrors(&rng);
  TestCloseWaits(&rng);
  TestThreads(&rng);
  printf("c_api_async_test: all checks passed\n");
  return 0;
}
