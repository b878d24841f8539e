// ExtentAllocator: free space of the disk tier's slab files, as extents.
//
// The slab files have fixed sizes (preallocated). An extent is a byte range inside one
// file, its offset and length multiples of the alignment (4 KiB: O_DIRECT). Allocate
// stripes across files (round-robin, so consecutive blocks land on different devices
// when the files are on different devices) and takes the best fit inside a file, so
// that same-sized blocks reuse freed holes exactly. Free coalesces with neighbours.
//
// At Open the store rebuilds the map from its catalog: every extent the catalog
// references is MarkUsed; what no one references is free.
//
// Thread safety: none; the caller serialises (the Store's lock).
#ifndef KVTIER_STORAGE_EXTENT_ALLOCATOR_H_
#define KVTIER_STORAGE_EXTENT_ALLOCATOR_H_

#include <cstdint>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "kvtier/status.h"

namespace kvtier {

struct Extent {
  uint32_t file = 0;    // index into the slab files
  uint64_t offset = 0;  // bytes from the start of the file
  uint64_t length = 0;  // bytes
  friend bool operator==(const Extent&, const Extent&) = default;
};

class ExtentAllocator {
 public:
  static constexpr uint64_t kDefaultAlignment = 4096;

  // Files of the given sizes in bytes (each rounded down to the alignment), all free.
  explicit ExtentAllocator(std::vector<uint64_t> file_bytes,
                           uint64_t alignment = kDefaultAlignment);

  // An extent of at least `bytes` (rounded up to the alignment). Files are tried
  // round-robin, starting with the one after the previous allocation's file.
  // Errors: InvalidArgument for 0 bytes, ResourceExhausted when no file has a free
  // extent that large (the message says how much is free).
  Result<Extent> Allocate(uint64_t bytes);

  // Returns an allocated extent. InvalidArgument (and no change) when the extent is
  // misaligned, outside its file, or overlaps free space (a double free).
  Status Free(const Extent& extent);

  // Marks a free range as used (rebuilding the map from the catalog). InvalidArgument
  // (and no change) when misaligned, outside its file or overlapping used space.
  Status MarkUsed(const Extent& extent);

  uint64_t alignment() const { return alignment_; }
  uint32_t file_count() const { return static_cast<uint32_t>(files_.size()); }
  uint64_t file_bytes(uint32_t file) const { return files_[file].size; }
  uint64_t total_bytes() const { return total_bytes_; }
  uint64_t free_bytes() const { return free_bytes_; }
  uint64_t used_bytes() const { return total_bytes_ - free_bytes_; }
  // Number of free extents, and the largest: fragmentation at a glance.
  uint64_t free_extent_count() const;
  uint64_t largest_free_extent() const;
  // Free extents of one file, in offset order (for tools and tests).
  std::vector<Extent> FreeExtents(uint32_t file) const;

 private:
  struct File {
    uint64_t size = 0;
    std::map<uint64_t, uint64_t> free_by_offset;           // offset -> length
    std::set<std::pair<uint64_t, uint64_t>> free_by_size;  // (length, offset)
  };
  Status Check(const Extent& extent) const;
  void InsertFree(File& f, uint64_t offset, uint64_t length);
  void EraseFree(File& f, std::map<uint64_t, uint64_t>::iterator it);

  uint64_t alignment_;
  std::vector<File> files_;
  uint64_t total_bytes_ = 0;
  uint64_t free_bytes_ = 0;
  uint32_t next_file_ = 0;
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_EXTENT_ALLOCATOR_H_
