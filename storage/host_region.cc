#include "storage/host_region.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include "kernels/cuda_runtime.h"

namespace kvtier {

uint64_t PhysicalMemoryBytes() {
  long pages = sysconf(_SC_PHYS_PAGES);
  long page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? uint64_t(pages) * uint64_t(page) : 0;
}

Status CheckFitsInMemory(uint64_t bytes) {
  const uint64_t physical = PhysicalMemoryBytes();
  if (physical != 0 && bytes > physical) {
    return Status::ResourceExhausted("host tier of " + std::to_string(bytes) +
                                     " bytes exceeds this machine's physical memory (" +
                                     std::to_string(physical) + " bytes)");
  }
  return Status::OK();
}

namespace {

// Anonymous memory aligned to kAlignment (mmap only promises pages), so that
// transparent huge pages can back all of it: fewer TLB misses on big copies, and
// faulting it in costs a fraction of 4 KiB pages.
Result<std::byte*> MapAnonymous(uint64_t bytes) {
  const uint64_t align = HostRegion::kAlignment;
  void* p =
      mmap(nullptr, bytes + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    return Status::FromErrno(errno,
                             "mmap of " + std::to_string(bytes) + " bytes for the host tier");
  }
  auto* raw = static_cast<std::byte*>(p);
  std::byte* aligned = raw + (align - reinterpret_cast<uintptr_t>(raw) % align) % align;
  if (aligned > raw) munmap(raw, aligned - raw);
  if (std::byte* end = aligned + bytes; end < raw + bytes + align) {
    munmap(end, raw + bytes + align - end);
  }
  madvise(aligned, bytes, MADV_HUGEPAGE);  // advisory: failure only costs speed
  return aligned;
}

void FaultIn(std::byte* data, uint64_t bytes) {
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  for (uint64_t off = 0; off < bytes; off += page) {
    reinterpret_cast<volatile std::byte*>(data)[off] = std::byte{0};
  }
}

}  // namespace

Result<std::unique_ptr<HostRegion>> HostRegion::Allocate(uint64_t bytes, HostMemoryKind kind) {
  if (bytes == 0) return Status::InvalidArgument("host region of 0 bytes");
  KVTIER_RETURN_IF_ERROR(CheckFitsInMemory(bytes));
  if (bytes > UINT64_MAX - kAlignment) return Status::InvalidArgument("host region too large");
  const uint64_t size = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  std::string reason;

  // kAuto without a GPU goes straight to locked memory: that is no fallback.
  if ((kind == HostMemoryKind::kAuto && cuda::HasDevice()) || kind == HostMemoryKind::kCudaPinned) {
    void* p = nullptr;
    Status s = cuda::HostAlloc(size, &p);
    if (s.ok()) {
      return std::unique_ptr<HostRegion>(
          new HostRegion(static_cast<std::byte*>(p), size, HostMemoryKind::kCudaPinned, ""));
    }
    if (kind == HostMemoryKind::kCudaPinned) return s.WithContext("CUDA-pinned host tier");
    reason = s.message();
  }

  KVTIER_ASSIGN_OR_RETURN(std::byte * data, MapAnonymous(size));
  if (kind == HostMemoryKind::kAuto || kind == HostMemoryKind::kLocked) {
    if (mlock(data, size) == 0) {  // also faults every page in
      return std::unique_ptr<HostRegion>(
          new HostRegion(data, size, HostMemoryKind::kLocked, std::move(reason)));
    }
    Status s = Status::FromErrno(errno, "mlock of " + std::to_string(size) + " bytes");
    if (kind == HostMemoryKind::kLocked) {
      munmap(data, size);
      return s.WithContext("locked host tier");
    }
    if (!reason.empty()) reason += "; ";
    reason += s.message();
  }
  FaultIn(data, size);
  return std::unique_ptr<HostRegion>(
      new HostRegion(data, size, HostMemoryKind::kPlain, std::move(reason)));
}

HostRegion::~HostRegion() {
  if (kind_ == HostMemoryKind::kCudaPinned) {
    (void)cuda::HostFree(data_);
  } else {
    munmap(data_, size_);  // also unlocks
  }
}

}  // namespace kvtier
