// StoreOptions: how a Store is configured. Every field has a sane default.
#ifndef KVTIER_OPTIONS_H_
#define KVTIER_OPTIONS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvtier/retrieval.h"

namespace kvtier {

class Env;  // storage/env.h: the file-system seam (tests inject faults through it)

// What backs the host (warm) tier's memory.
enum class HostMemoryKind : uint8_t {
  kAuto = 0,        // CUDA-pinned when a GPU is present, else locked, else plain
  kCudaPinned = 1,  // cudaHostAlloc: page-locked and registered with the GPU driver
  kLocked = 2,      // mmap + mlock: never paged out (no GPU needed)
  kPlain = 3,       // mmap, pre-faulted, may be paged out under memory pressure
};
// "auto", "cuda-pinned", "locked", "plain".
std::string_view HostMemoryKindName(HostMemoryKind kind);

// When the bytes of a block written to the disk tier count as durable.
enum class SyncPolicy : uint8_t {
  kBatchedFdatasync = 0,  // a batch of completed writes, then one fdatasync per file
  kDsync = 1,             // O_DSYNC: every write is durable when it completes
};

// Where a sidecar client finds kvtierd (kvtier/client.h). Set `socket` or `tcp_address`
// and Store::Open returns a client of that daemon instead of an embedded store; every
// other StoreOptions field is then the daemon's business (its own config file) and is
// ignored, except `retrieval`, whose selection fields (top_k, n_init, n_local, ...) a
// Select through the daemon must agree with.
struct SidecarOptions {
  // Path of kvtierd's Unix socket (same host: block bytes move through shared memory).
  // Default: "" (none).
  std::string socket;
  // "host:port" of kvtierd's TCP listener, used when `socket` is empty (block bytes go
  // inline in the frames). Default: "" (none).
  std::string tcp_address;
  // The token the daemon's config gives this client; required over TCP, optional over
  // the Unix socket (where the peer's uid/gid identify it). Default: "".
  std::string token;
  // The namespace this client works in: every key it passes must carry this
  // namespace_id, and the daemon must allow this client in it. Default: 0.
  uint32_t namespace_id = 0;
  // How long Open waits for the daemon (connect and handshake). Default: 5000 ms.
  uint32_t connect_timeout_ms = 5000;
  // After the connection is lost, the client reconnects with exponential backoff from
  // 10 ms up to this; calls made meanwhile fail with Unavailable. Default: 1000 ms.
  uint32_t max_backoff_ms = 1000;
  // Blocks of the shared-memory staging area the daemon gives a Unix-socket client
  // (how many block transfers it may have in flight at once). Default: 64.
  uint32_t staging_blocks = 64;
  // A request without its reply within this fails with Unavailable, and the client drops
  // the connection (the daemon's state for it is then unknown: failing what else is in
  // flight with the same status) and reconnects as after a break. 0: no limit.
  // Default: 30000 ms.
  uint32_t request_timeout_ms = 30000;
  // A client with a GPU tier (RetrievalOptions::device_capacity_bytes) over the Unix
  // socket registers the tier's memory with the daemon, which then copies missing
  // blocks from its host tier straight into it (CUDA IPC with a GPU; shared memory for
  // the emulated tier): one copy per block instead of three through the staging area.
  // When the daemon refuses (no GPU on its side, an older daemon), misses go through
  // the staging area, and SidecarStatus says why. Default: true.
  bool direct_device = true;
};

// A namespace's limits, in bytes (0: no limit). Blocks of namespaces without an entry
// are not limited. A limit counts whole blocks, floor(bytes / slot) of them, a slot (and
// a disk extent) being the block size rounded up to 4 KiB; Open fails with
// InvalidArgument for a limit below one slot or a second entry for a namespace.
struct NamespaceQuota {
  uint32_t namespace_id = 0;
  // Its blocks resident in the host tier. A Put of a block not resident, or a promotion
  // from disk (a Get, the GPU tier pulling a block), that would pass it first evicts the
  // namespace's own least recently used clean block (to disk; in a memory-only store the
  // block is lost, as any eviction there) and never another namespace's. When it has none
  // (all dirty, that is not on disk yet, or in use):
  //   - a Put waits while blocks of the namespace are being written to disk and
  //     wait_when_full is set (in write-back mode it starts writing its oldest dirty
  //     blocks first); those writes complete on their own, so the wait cannot deadlock.
  //     Otherwise, or once nothing of it is in flight, it fails with QuotaExceeded.
  //   - a promotion never fails for the quota: the block is read through a slot that is
  //     not kept, and stays on disk only.
  // Replacing a resident block needs no room. Blocks being written by Puts in flight
  // count against it, so one PutBatch cannot put more new blocks than the quota holds.
  uint64_t host_bytes = 0;
  // Its blocks in the store (resident or on disk): every block is bound for the disk
  // tier, so this counts with or without one. A Put of a new key that would pass it fails
  // with QuotaExceeded (replacing one of its blocks always succeeds); Delete and
  // DropSequence make room. Blocks found on disk at Open count; a store reopened with a
  // smaller quota refuses new keys until enough are deleted.
  uint64_t disk_bytes = 0;
};

struct StoreOptions {
  // A client of the kvtierd sidecar instead of an embedded store (see SidecarOptions).
  // Default: none (embedded).
  SidecarOptions sidecar;

  // Where the store keeps its disk tier: the catalog (RocksDB), the slab files (unless
  // `disk_paths` says otherwise) and a lock file. Created when missing; an existing
  // store is reopened (its layout must match). Empty: a memory-only store, the host
  // tier alone, where an evicted block is lost (and counted).
  // Default: "" (memory only).
  std::string directory;

  // Bytes of slab files, preallocated when the store is created (split evenly over
  // `disk_paths`, each file a multiple of 4 KiB). Ignored when reopening: the store
  // keeps the files it was created with.
  // Default: 16 GiB.
  uint64_t disk_capacity_bytes = uint64_t{16} << 30;

  // Directories for the slab files, one file each, blocks striped across them (put
  // each on its own device). Empty: one slab file in `directory`.
  // Default: empty.
  std::vector<std::string> disk_paths;

  // Disk requests in flight at most (io_uring queue depth). Default: 64.
  uint32_t io_depth = 64;

  // A kernel thread polls the io_uring submission queue (saves syscalls, costs a core).
  // Default: false.
  bool io_sqpoll = false;

  // Default: kBatchedFdatasync.
  SyncPolicy sync = SyncPolicy::kBatchedFdatasync;

  // true: every Put is written to the disk tier in the background right away, so an
  // eviction never waits for a write. false (write-back): a block is written only when
  // the host tier needs its slot, or on Flush().
  // Default: true.
  bool write_through = true;

  // When the host tier has no free or clean slot because the disk cannot keep up,
  // Put waits for the writes in flight (true) or returns Busy at once (false).
  // Default: true.
  bool wait_when_full = true;

  // Every file operation of the disk tier goes through this (must outlive the store).
  // For tests that inject faults; nullptr is the operating system.
  // Default: nullptr.
  Env* env = nullptr;

  // Bytes of host RAM for the warm tier, one region allocated and pre-faulted at Open.
  // It holds floor(host_capacity_bytes / slot) blocks, a slot being the block size
  // rounded up to 4 KiB; Open fails when that is zero or more than the machine's RAM.
  // Default: 4 GiB.
  uint64_t host_capacity_bytes = uint64_t{4} << 30;

  // What backs the host tier. kAuto falls back quietly (Stats says what it got); the
  // other kinds fail Open when they cannot be had.
  // Default: kAuto.
  HostMemoryKind host_memory = HostMemoryKind::kAuto;

  // Threads that run asynchronous operations (the *Async calls). At least 1.
  // Default: 2.
  uint32_t async_threads = 2;

  // Decode-time retrieval and the GPU tier (kvtier/retrieval.h). Default: off.
  RetrievalOptions retrieval;

  // Per-namespace quotas (at most one entry per namespace). Default: none.
  std::vector<NamespaceQuota> quotas;
};

}  // namespace kvtier

#endif  // KVTIER_OPTIONS_H_
