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

struct StoreOptions {
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
};

}  // namespace kvtier

#endif  // KVTIER_OPTIONS_H_
