// Helpers shared by kvtier-bench's subcommands: timing, medians, a cache scrubber, a
// one-line JSON object writer, and (for the disk benchmark) the page cache and the file
// system a path is on.
//
// Thread safety: CacheScrubber and JsonLine are plain objects, one thread at a time.
#ifndef KVTIER_BENCH_BENCH_UTIL_H_
#define KVTIER_BENCH_BENCH_UTIL_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace kvtier::bench {

// Decimal units, as GB/s is usually quoted.
inline constexpr double kBytesPerGB = 1e9;
inline constexpr uint64_t kMiB = uint64_t{1} << 20;
inline constexpr uint64_t kGiB = uint64_t{1} << 30;

// The median of `values` (the mean of the middle two for an even count); 0 when empty.
double Median(std::vector<double> values);

// Wall-clock seconds that `fn()` takes (steady clock).
template <typename Fn>
double TimeSeconds(Fn&& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Writes dirty pages back (sync) and drops the page cache, dentries and inodes
// (/proc/sys/vm/drop_caches). Needs root; false when the cache could not be dropped.
bool DropPageCache();

// The file system holding `path` (which must exist), from /proc/self/mounts: the entry
// whose mount point is the longest prefix of the path's canonical form.
struct FileSystemInfo {
  std::string type;         // e.g. "ext4"; "unknown" when no entry matched
  std::string device;       // e.g. "/dev/vda"
  std::string mount_point;  // e.g. "/"
  uint64_t free_bytes = 0;  // available to an unprivileged user (statvfs f_bavail)
  // "ext4 on /dev/vda (mounted at /)".
  std::string ToString() const;
};
FileSystemInfo DescribeFileSystem(const std::string& path);

// Pushes a benchmark's data out of the CPU caches: Scrub() reads a private buffer of
// `bytes` (pick several times the last-level cache), one load per 64-byte line. Only
// loads, so the lines it leaves behind are clean and cost the next phase no write-backs.
class CacheScrubber {
 public:
  explicit CacheScrubber(uint64_t bytes);
  CacheScrubber(const CacheScrubber&) = delete;
  CacheScrubber& operator=(const CacheScrubber&) = delete;

  void Scrub();

 private:
  uint64_t bytes_;
  std::unique_ptr<std::byte[]> data_;
};

// Builds one JSON object, fields in the order added, for a machine-readable last line.
class JsonLine {
 public:
  void Add(std::string_view name, std::string_view value);
  void Add(std::string_view name, const char* value) { Add(name, std::string_view(value)); }
  void Add(std::string_view name, double value);
  void Add(std::string_view name, uint64_t value);
  void Add(std::string_view name, uint32_t value) { Add(name, uint64_t{value}); }
  void Add(std::string_view name, bool value);
  // "{...}" without a newline.
  std::string str() const { return "{" + body_ + "}"; }

 private:
  void Name(std::string_view name);
  std::string body_;
};

}  // namespace kvtier::bench

#endif  // KVTIER_BENCH_BENCH_UTIL_H_
