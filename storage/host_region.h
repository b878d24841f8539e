// HostRegion: one large, 4 KiB-aligned (in fact 2 MiB-aligned) region of host memory,
// resident from the start, that the host tier cuts into block slots. Aligned so that
// the disk tier can register the slots as io_uring fixed buffers and use O_DIRECT.
//
// Thread safety: immutable after Allocate; the memory itself is the caller's to share.
#ifndef KVTIER_STORAGE_HOST_REGION_H_
#define KVTIER_STORAGE_HOST_REGION_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kvtier/options.h"
#include "kvtier/status.h"

namespace kvtier {

// Bytes of RAM in this machine (0 if unknown).
uint64_t PhysicalMemoryBytes();
// ResourceExhausted when `bytes` exceeds PhysicalMemoryBytes().
Status CheckFitsInMemory(uint64_t bytes);

class HostRegion {
 public:
  static constexpr uint64_t kAlignment = uint64_t{2} << 20;

  // Allocates at least `bytes` (rounded up to kAlignment) backed as `kind` asks:
  // kAuto tries CUDA-pinned (when a GPU is present), then locked, then plain, and
  // says in fallback_reason() why it settled lower. Every page is faulted in here, so
  // first use is not slower than later use. Errors: InvalidArgument for 0 bytes,
  // ResourceExhausted when `bytes` exceeds the machine's physical memory or the memory
  // cannot be had, NotSupported/IOError when an explicit kind cannot be honoured.
  static Result<std::unique_ptr<HostRegion>> Allocate(uint64_t bytes, HostMemoryKind kind);

  ~HostRegion();
  HostRegion(const HostRegion&) = delete;
  HostRegion& operator=(const HostRegion&) = delete;

  std::byte* data() const { return data_; }
  uint64_t size() const { return size_; }
  // What backs the region: never kAuto.
  HostMemoryKind kind() const { return kind_; }
  // Empty, or why kAuto did not get CUDA-pinned or locked memory.
  const std::string& fallback_reason() const { return fallback_reason_; }

 private:
  HostRegion(std::byte* data, uint64_t size, HostMemoryKind kind, std::string reason)
      : data_(data), size_(size), kind_(kind), fallback_reason_(std::move(reason)) {}

  std::byte* data_;
  uint64_t size_;
  HostMemoryKind kind_;
  std::string fallback_reason_;
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_HOST_REGION_H_
