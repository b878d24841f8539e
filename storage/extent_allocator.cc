#include "storage/extent_allocator.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <string>

namespace kvtier {
namespace {

// A constructor argument no caller can mean: a bug in the caller, never an input.
[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "kvtier: ExtentAllocator: %s\n", what);
  std::abort();
}

std::string Describe(const Extent& e) {
  return "extent (file " + std::to_string(e.file) + ", offset " + std::to_string(e.offset) +
         ", length " + std::to_string(e.length) + ")";
}

}  // namespace

ExtentAllocator::ExtentAllocator(std::vector<uint64_t> file_bytes, uint64_t alignment)
    : alignment_(alignment) {
  if (alignment_ == 0) Die("alignment is 0");
  if (file_bytes.size() > std::numeric_limits<uint32_t>::max()) Die("more than 2^32 - 1 files");
  files_.resize(file_bytes.size());
  for (size_t i = 0; i < file_bytes.size(); ++i) {
    File& f = files_[i];
    f.size = file_bytes[i] - file_bytes[i] % alignment_;
    if (f.size > std::numeric_limits<uint64_t>::max() - total_bytes_) {
      Die("total size of the files exceeds 2^64 - 1 bytes");
    }
    total_bytes_ += f.size;
    if (f.size > 0) InsertFree(f, 0, f.size);
  }
}

Result<Extent> ExtentAllocator::Allocate(uint64_t bytes) {
  if (bytes == 0) return Status::InvalidArgument("disk tier: cannot allocate an extent of 0 bytes");
  const uint64_t remainder = bytes % alignment_;
  const bool rounds_past_max =
      remainder != 0 && bytes > std::numeric_limits<uint64_t>::max() - (alignment_ - remainder);
  if (!rounds_past_max) {
    const uint64_t length = remainder == 0 ? bytes : bytes + (alignment_ - remainder);
    const uint32_t n = file_count();
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t index = static_cast<uint32_t>((uint64_t{next_file_} + i) % n);
      File& f = files_[index];
      // Best fit: the smallest free extent that holds `length`, the lowest offset among equals.
      auto fit = f.free_by_size.lower_bound({length, 0});
      if (fit == f.free_by_size.end()) continue;
      const uint64_t offset = fit->second;
      const uint64_t found = fit->first;
      EraseFree(f, f.free_by_offset.find(offset));
      if (found > length) InsertFree(f, offset + length, found - length);
      next_file_ = static_cast<uint32_t>((uint64_t{index} + 1) % n);
      return Extent{.file = index, .offset = offset, .length = length};
    }
  }
  return Status::ResourceExhausted("disk tier: no free extent of " + std::to_string(bytes) +
                                   " bytes (" + std::to_string(free_bytes_) + " bytes free in " +
                                   std::to_string(free_extent_count()) + " extents, the largest " +
                                   std::to_string(largest_free_extent()) + " bytes)");
}

Status ExtentAllocator::Free(const Extent& extent) {
  KVTIER_RETURN_IF_ERROR(Check(extent).WithContext("disk tier: free"));
  File& f = files_[extent.file];
  const uint64_t end = extent.offset + extent.length;  // Check: no wrap, within the file
  auto next = f.free_by_offset.lower_bound(extent.offset);
  auto prev = next == f.free_by_offset.begin() ? f.free_by_offset.end() : std::prev(next);
  const bool overlaps_prev =
      prev != f.free_by_offset.end() && prev->first + prev->second > extent.offset;
  const bool overlaps_next = next != f.free_by_offset.end() && next->first < end;
  if (overlaps_prev || overlaps_next) {
    return Status::InvalidArgument("disk tier: free of " + Describe(extent) +
                                   " overlaps free space (double free)");
  }
  uint64_t offset = extent.offset;
  uint64_t length = extent.length;
  if (prev != f.free_by_offset.end() && prev->first + prev->second == offset) {
    offset = prev->first;
    length += prev->second;
    EraseFree(f, prev);
  }
  if (next != f.free_by_offset.end() && next->first == end) {
    length += next->second;
    EraseFree(f, next);
  }
  InsertFree(f, offset, length);
  return Status::OK();
}

Status ExtentAllocator::MarkUsed(const Extent& extent) {
  KVTIER_RETURN_IF_ERROR(Check(extent).WithContext("disk tier: mark used"));
  File& f = files_[extent.file];
  const uint64_t end = extent.offset + extent.length;  // Check: no wrap, within the file
  // The free extent that starts at or before `extent` is the only one that can hold it.
  auto it = f.free_by_offset.upper_bound(extent.offset);
  if (it == f.free_by_offset.begin() || std::prev(it)->first + std::prev(it)->second < end) {
    return Status::InvalidArgument("disk tier: mark used of " + Describe(extent) +
                                   " overlaps used space");
  }
  --it;
  const uint64_t free_offset = it->first;
  const uint64_t free_end = it->first + it->second;
  EraseFree(f, it);
  if (free_offset < extent.offset) InsertFree(f, free_offset, extent.offset - free_offset);
  if (end < free_end) InsertFree(f, end, free_end - end);
  return Status::OK();
}

uint64_t ExtentAllocator::free_extent_count() const {
  uint64_t count = 0;
  for (const File& f : files_) count += f.free_by_offset.size();
  return count;
}

uint64_t ExtentAllocator::largest_free_extent() const {
  uint64_t largest = 0;
  for (const File& f : files_) {
    if (!f.free_by_size.empty()) largest = std::max(largest, f.free_by_size.rbegin()->first);
  }
  return largest;
}

std::vector<Extent> ExtentAllocator::FreeExtents(uint32_t file) const {
  std::vector<Extent> extents;
  if (file >= files_.size()) return extents;
  const File& f = files_[file];
  extents.reserve(f.free_by_offset.size());
  for (const auto& [offset, length] : f.free_by_offset) {
    extents.push_back(Extent{.file = file, .offset = offset, .length = length});
  }
  return extents;
}

Status ExtentAllocator::Check(const Extent& extent) const {
  if (extent.file >= files_.size()) {
    return Status::InvalidArgument(Describe(extent) + ": no such file (there are " +
                                   std::to_string(files_.size()) + ")");
  }
  if (extent.length == 0) return Status::InvalidArgument(Describe(extent) + ": length is 0");
  if (extent.offset % alignment_ != 0 || extent.length % alignment_ != 0) {
    return Status::InvalidArgument(Describe(extent) + ": not aligned to " +
                                   std::to_string(alignment_) + " bytes");
  }
  const uint64_t size = files_[extent.file].size;
  // Written so that offset + length cannot wrap.
  if (extent.offset > size || extent.length > size - extent.offset) {
    return Status::InvalidArgument(Describe(extent) + ": outside the file of " +
                                   std::to_string(size) + " bytes");
  }
  return Status::OK();
}

void ExtentAllocator::InsertFree(File& f, uint64_t offset, uint64_t length) {
  const bool inserted = f.free_by_offset.emplace(offset, length).second;
  if (!inserted || !f.free_by_size.emplace(length, offset).second) {
    Die("free extent inserted twice");
  }
  free_bytes_ += length;
}

void ExtentAllocator::EraseFree(File& f, std::map<uint64_t, uint64_t>::iterator it) {
  if (f.free_by_size.erase({it->second, it->first}) != 1) Die("free maps disagree");
  free_bytes_ -= it->second;
  f.free_by_offset.erase(it);
}

}  // namespace kvtier
