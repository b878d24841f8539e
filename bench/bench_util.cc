#include "bench/bench_util.h"

#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace kvtier::bench {
namespace {

constexpr uint64_t kCacheLineBytes = 64;

void AppendEscaped(std::string* out, std::string_view s) {
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out->push_back('\\');
      out->push_back(c);
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
      out->append(buf);
    } else {
      out->push_back(c);
    }
  }
}

}  // namespace

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  const size_t mid = values.size() / 2;
  std::nth_element(values.begin(), values.begin() + mid, values.end());
  if (values.size() % 2 == 1) return values[mid];
  const double upper = values[mid];
  const double lower = *std::max_element(values.begin(), values.begin() + mid);
  return (lower + upper) / 2;
}

bool DropPageCache() {
  sync();
  std::FILE* f = std::fopen("/proc/sys/vm/drop_caches", "w");
  if (f == nullptr) return false;
  const bool written = std::fputs("3\n", f) >= 0;
  return std::fclose(f) == 0 && written;
}

std::string FileSystemInfo::ToString() const {
  return type + " on " + device + " (mounted at " + mount_point + ")";
}

FileSystemInfo DescribeFileSystem(const std::string& path) {
  FileSystemInfo info{.type = "unknown", .device = "unknown", .mount_point = "?"};
  std::error_code ec;
  const std::string canonical = std::filesystem::canonical(path, ec).string();
  std::ifstream mounts("/proc/self/mounts");
  std::string line;
  size_t best = 0;
  while (std::getline(mounts, line)) {
    std::istringstream fields(line);
    std::string device, mount_point, type;
    if (!(fields >> device >> mount_point >> type)) continue;
    const bool covers = canonical.starts_with(mount_point) &&
                        (mount_point == "/" || canonical.size() == mount_point.size() ||
                         canonical[mount_point.size()] == '/');
    // Later entries mount over earlier ones at the same point.
    if (covers && mount_point.size() >= best) {
      best = mount_point.size();
      info.type = type;
      info.device = device;
      info.mount_point = mount_point;
    }
  }
  struct statvfs st;
  if (statvfs(path.c_str(), &st) == 0) info.free_bytes = uint64_t{st.f_bavail} * st.f_frsize;
  return info;
}

CacheScrubber::CacheScrubber(uint64_t bytes)
    : bytes_(bytes), data_(std::make_unique<std::byte[]>(bytes)) {
  std::memset(data_.get(), 0x5A, bytes_);  // real pages, not the shared zero page
}

void CacheScrubber::Scrub() {
  const auto* p = reinterpret_cast<const volatile uint64_t*>(data_.get());
  uint64_t sum = 0;
  for (uint64_t off = 0; off < bytes_; off += kCacheLineBytes) {
    sum += p[off / sizeof(uint64_t)];
  }
  volatile uint64_t sink = sum;
  (void)sink;
}

void JsonLine::Name(std::string_view name) {
  if (!body_.empty()) body_.push_back(',');
  body_.push_back('"');
  AppendEscaped(&body_, name);
  body_.append("\":");
}

void JsonLine::Add(std::string_view name, std::string_view value) {
  Name(name);
  body_.push_back('"');
  AppendEscaped(&body_, value);
  body_.push_back('"');
}

void JsonLine::Add(std::string_view name, double value) {
  Name(name);
  if (!std::isfinite(value)) {
    body_.append("null");
    return;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", value);
  body_.append(buf);
}

void JsonLine::Add(std::string_view name, uint64_t value) {
  Name(name);
  body_.append(std::to_string(value));
}

void JsonLine::Add(std::string_view name, bool value) {
  Name(name);
  body_.append(value ? "true" : "false");
}

}  // namespace kvtier::bench
