// StagingArea: the shared memory through which a Unix-socket client's block bytes move
// (PROTOCOL.md, "Block bytes: the staging area"). A sealed memfd of `slots` slots of
// `slot_bytes` each, mapped into the daemon; its descriptor goes to the client with the
// HelloReply. The seals (no shrink, no grow, no more seals) mean a client cannot
// truncate the file under the daemon's mapping (which would SIGBUS the daemon).
//
// Ownership: a connection and each of its requests in flight hold a shared_ptr; the
// mapping lives until the last of them lets go.
// Thread safety: slot() may be called from any thread; the bytes are the client's to
// race on (a client that names a slot in two requests at once gets undefined bytes).
#ifndef KVTIER_SERVER_STAGING_AREA_H_
#define KVTIER_SERVER_STAGING_AREA_H_

#include <cstdint>
#include <memory>
#include <utility>

#include "kvtier/status.h"
#include "storage/shared_memory.h"

namespace kvtier::server {

class StagingArea {
 public:
  // A zero-filled area of `slots` (> 0) slots of `slot_bytes` (a multiple of 4096)
  // bytes. `name` labels the memfd (/proc/<pid>/fd). Errors: InvalidArgument for zero
  // or overflowing sizes, IOError / ResourceExhausted from memfd_create, ftruncate,
  // fcntl(F_ADD_SEALS) or mmap.
  static kvtier::Result<std::shared_ptr<StagingArea>> Create(uint32_t slots, uint64_t slot_bytes,
                                                             const char* name);

  StagingArea(const StagingArea&) = delete;
  StagingArea& operator=(const StagingArea&) = delete;

  uint32_t slots() const { return slots_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  uint64_t size_bytes() const { return uint64_t{slots_} * slot_bytes_; }
  // Slot `i` (< slots()).
  uint8_t* slot(uint32_t i) const { return base_ + uint64_t{i} * slot_bytes_; }
  // The memfd (-1 once closed): the daemon closes its copy once it has been sent.
  int fd() const { return memory_->fd(); }
  void CloseFd() { memory_->CloseFd(); }

 private:
  StagingArea(std::unique_ptr<SharedMemory> memory, uint32_t slots, uint64_t slot_bytes)
      : memory_(std::move(memory)),
        base_(reinterpret_cast<uint8_t*>(memory_->data())),
        slots_(slots),
        slot_bytes_(slot_bytes) {}

  const std::unique_ptr<SharedMemory> memory_;
  uint8_t* const base_;
  const uint32_t slots_;
  const uint64_t slot_bytes_;
};

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_STAGING_AREA_H_
