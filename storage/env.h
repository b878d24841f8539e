// Env: every file operation of the disk tier goes through here, so that tests can put
// a fault-injecting Env in its place (EIO, ENOSPC, short or torn transfers, writes
// lost in a crash) without sleeps or luck.
//
// Thread safety: Env methods may be called from any thread. A File may be used from
// several threads for positioned I/O (pread/pwrite semantics). An IoQueue belongs to
// one thread (the one that submits and reaps), except Wake(), callable from any.
#ifndef KVTIER_STORAGE_ENV_H_
#define KVTIER_STORAGE_ENV_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "kvtier/status.h"

namespace kvtier {

struct FileOptions {
  bool create = false;  // create when missing
  bool direct = false;  // O_DIRECT: buffers, offsets and lengths 4 KiB-aligned
  bool dsync = false;   // O_DSYNC: each write is durable when it completes
  bool read_only = false;
};

class File {
 public:
  virtual ~File() = default;
  virtual const std::string& path() const = 0;
  // The descriptor I/O queues use.
  virtual int fd() const = 0;
  // Reserves `bytes` bytes of disk for the file (fallocate) and makes it that long.
  virtual Status Allocate(uint64_t bytes) = 0;
  // Makes the file's written data durable (fdatasync).
  virtual Status DataSync() = 0;
  virtual Result<uint64_t> Size() const = 0;
  // Whole transfers or an error: a read past the end is an IOError ("short read").
  virtual Status ReadAt(uint64_t offset, void* buf, uint64_t length) = 0;
  virtual Status WriteAt(uint64_t offset, const void* buf, uint64_t length) = 0;
};

// An exclusive lock on a path (flock), released when destroyed.
class FileLock {
 public:
  virtual ~FileLock() = default;
};

enum class IoKind : uint8_t { kRead, kWrite, kDataSync };

struct IoRequest {
  IoKind kind = IoKind::kRead;
  File* file = nullptr;
  uint64_t offset = 0;  // kRead / kWrite
  void* buf = nullptr;  // kRead / kWrite
  uint64_t length = 0;  // kRead / kWrite
  uint64_t tag = 0;     // returned in the completion
};

struct IoCompletion {
  uint64_t tag = 0;
  // OK: the whole transfer (or the sync) is done. Otherwise why not.
  Status status;
};

// A memory range I/O buffers come from (registered once, io_uring fixed buffers).
struct MemoryRange {
  void* data = nullptr;
  uint64_t bytes = 0;
};

struct IoQueueOptions {
  uint32_t depth = 64;  // requests in flight at most
  bool sqpoll = false;  // a kernel thread polls the submission queue
};

// Asynchronous, batched file I/O. A request is complete only when its whole transfer
// is: the queue finishes short transfers itself (submitting the remainder) and retries
// -EAGAIN / -EINTR; end of file in the middle of a read is an error. Submit never
// refuses for lack of room: requests beyond depth() wait inside the queue and start as
// others complete (during Reap).
class IoQueue {
 public:
  virtual ~IoQueue() = default;
  // Optional: I/O on registered memory and files skips per-request pinning and fd
  // lookups. Unregistered buffers and files still work.
  virtual Status RegisterBuffers(std::span<const MemoryRange> ranges) = 0;
  virtual Status RegisterFiles(std::span<File* const> files) = 0;
  virtual Status Submit(std::span<const IoRequest> requests) = 0;
  // Waits until at least `min_completions` requests completed or Wake() was called
  // (0: does not wait), and stores up to out.size() completions; returns how many.
  virtual Result<size_t> Reap(std::span<IoCompletion> out, size_t min_completions) = 0;
  // Makes a Reap that waits (now or next) return. Any thread.
  virtual void Wake() = 0;
  // Requests submitted and not yet reaped.
  virtual uint64_t pending() const = 0;
};

class Env {
 public:
  // The operating system: POSIX files and io_uring. Never destroyed.
  static Env* Default();

  virtual ~Env() = default;
  virtual Result<std::unique_ptr<File>> OpenFile(const std::string& path,
                                                 const FileOptions& options) = 0;
  // Creates the directory and its missing parents.
  virtual Status CreateDirs(const std::string& path) = 0;
  virtual bool Exists(const std::string& path) = 0;
  virtual Status RemoveFile(const std::string& path) = 0;
  // Makes a directory's entries (files created or removed) durable.
  virtual Status SyncDir(const std::string& path) = 0;
  // FailedPrecondition when another process (or object) holds the lock.
  virtual Result<std::unique_ptr<FileLock>> LockFile(const std::string& path) = 0;
  virtual Result<std::unique_ptr<IoQueue>> NewIoQueue(const IoQueueOptions& options) = 0;
};

// The io_uring queue over real files (what Env::Default() returns).
Result<std::unique_ptr<IoQueue>> NewUringQueue(const IoQueueOptions& options);

}  // namespace kvtier

#endif  // KVTIER_STORAGE_ENV_H_
