// DiskTier: the cold tier's slab files and the thread that does their I/O.
//
// Slab files are preallocated (fallocate) and opened with O_DIRECT (and O_DSYNC when
// the sync policy asks). All block I/O goes through one IoQueue (io_uring, registered
// host-tier buffers and files) owned by one I/O thread: callers queue reads, writes
// and syncs from any thread; the I/O thread submits them in batches, keeps up to
// `io_depth` in flight and runs each completion callback. Offsets, lengths and buffers
// must be 4 KiB-aligned (O_DIRECT). Where blocks go (extents) and what the bytes mean
// (checksums, catalog) is the Store's business, not this class's.
//
// Thread safety: Read, Write and Sync may be called from any thread, including from a
// completion callback. Callbacks run on the I/O thread and must not block on I/O.
#ifndef KVTIER_STORAGE_DISK_TIER_H_
#define KVTIER_STORAGE_DISK_TIER_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/status.h"
#include "src/util/mutex.h"
#include "storage/catalog.h"
#include "storage/env.h"

namespace kvtier {

struct DiskTierOptions {
  std::vector<SlabFileInfo> files;   // created (and preallocated) when missing
  uint32_t io_depth = 64;            // requests in flight at most
  bool sqpoll = false;               // io_uring SQPOLL
  bool dsync = false;                // O_DSYNC on every write (else Sync() = fdatasync)
  std::vector<MemoryRange> buffers;  // registered as fixed buffers (the host tier)
};

class DiskTier {
 public:
  using Callback = std::function<void(Status)>;

  // Opens (creating and preallocating when missing) the slab files and starts the I/O
  // thread. An existing file must have exactly its configured size (Corruption
  // otherwise: never silently reuse a file of another store).
  static Result<std::unique_ptr<DiskTier>> Open(Env* env, const DiskTierOptions& options);

  // Waits for every queued request to complete (callbacks run), then stops.
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  // Queue one transfer of `length` bytes at `offset` of slab file `file`; `done` gets
  // OK when all of it is done, or the error.
  void Write(uint32_t file, uint64_t offset, const void* buf, uint64_t length, Callback done);
  void Read(uint32_t file, uint64_t offset, void* buf, uint64_t length, Callback done);
  // Makes every write completed before this call durable (fdatasync of the files
  // written since the last Sync; nothing to do with O_DSYNC), then runs `done`.
  void Sync(Callback done);

  uint32_t file_count() const { return static_cast<uint32_t>(files_.size()); }
  const SlabFileInfo& file_info(uint32_t file) const { return options_.files[file]; }
  bool registered_buffers() const { return registered_buffers_; }

 private:
  enum class OpKind : uint8_t { kRead, kWrite, kSync };
  struct Op {
    OpKind kind;
    uint32_t file;
    uint64_t offset;
    void* buf;
    uint64_t length;
    Callback done;
  };

  DiskTier(Env* env, DiskTierOptions options);
  void Enqueue(Op op);
  void Run();
  void Start(Op& op);
  void Finish(uint64_t tag, Status status);

  Env* const env_;
  const DiskTierOptions options_;
  std::vector<std::unique_ptr<File>> files_;
  std::unique_ptr<IoQueue> queue_;
  bool registered_buffers_ = false;

  Mutex mu_;
  std::vector<Op> incoming_ KVTIER_GUARDED_BY(mu_);
  bool stopping_ KVTIER_GUARDED_BY(mu_) = false;

  // I/O thread only.
  struct Pending {
    Callback done;
    uint32_t file = 0;
    bool is_write = false;
    // For the fdatasync requests of one Sync: they share one countdown.
    std::shared_ptr<struct SyncGroup> group;
  };
  std::vector<Pending> pending_;
  std::vector<uint64_t> free_tags_;
  std::vector<bool> written_since_sync_;
  std::thread thread_;
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_DISK_TIER_H_
