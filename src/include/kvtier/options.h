// StoreOptions: how a Store is configured. Every field has a sane default.
#ifndef KVTIER_OPTIONS_H_
#define KVTIER_OPTIONS_H_

#include <cstdint>
#include <string_view>

namespace kvtier {

// What backs the host (warm) tier's memory.
enum class HostMemoryKind : uint8_t {
  kAuto = 0,        // CUDA-pinned when a GPU is present, else locked, else plain
  kCudaPinned = 1,  // cudaHostAlloc: page-locked and registered with the GPU driver
  kLocked = 2,      // mmap + mlock: never paged out (no GPU needed)
  kPlain = 3,       // mmap, pre-faulted, may be paged out under memory pressure
};
// "auto", "cuda-pinned", "locked", "plain".
std::string_view HostMemoryKindName(HostMemoryKind kind);

struct StoreOptions {
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
};

}  // namespace kvtier

#endif  // KVTIER_OPTIONS_H_
