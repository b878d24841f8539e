// SharedMemory: a region of host memory that another process can map: a memfd, sealed
// against shrinking and growing (so a process that maps it can never fault on a
// truncated page), mapped here read-write. Its descriptor travels to the other process
// over a Unix socket (SCM_RIGHTS).
//
// Thread safety: immutable after Create; the memory itself is the caller's to share.
#ifndef KVTIER_STORAGE_SHARED_MEMORY_H_
#define KVTIER_STORAGE_SHARED_MEMORY_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "kvtier/status.h"

namespace kvtier {

class SharedMemory {
 public:
  // `bytes` (> 0) of zeroed memory; `name` shows in /proc/PID/fd; `populate`: every page
  // is faulted in here, so that first use is not slower than later use. Errors:
  // InvalidArgument for 0 bytes, the system's (memfd_create, ftruncate, fcntl, mmap) as
  // IOError or ResourceExhausted.
  static Result<std::unique_ptr<SharedMemory>> Create(uint64_t bytes, const char* name,
                                                      bool populate);
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  std::byte* data() const { return data_; }
  uint64_t size() const { return size_; }
  // The memfd (owned: closed with the object, or by CloseFd once the other process has
  // its copy; -1 after that). The mapping stays.
  int fd() const { return fd_; }
  void CloseFd();

 private:
  SharedMemory(int fd, std::byte* data, uint64_t size) : fd_(fd), data_(data), size_(size) {}

  int fd_;
  std::byte* const data_;
  const uint64_t size_;
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_SHARED_MEMORY_H_
