// What the crash test's parent and child share: the store's options, the keys, and
// self-describing block contents (version in the first 8 bytes, then the pattern of
// (key, version)), so a torn block can never pass for a written one.
#ifndef KVTIER_TESTS_CRASH_COMMON_H_
#define KVTIER_TESTS_CRASH_COMMON_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kvtier/store.h"
#include "tests/test_util.h"

namespace kvtier::crash {

constexpr uint32_t kKeys = 48;

struct Record {
  uint32_t key = 0;
  uint64_t version = 0;
};

inline StoreOptions Options(const std::string& dir) {
  StoreOptions o;
  o.directory = dir;
  o.host_capacity_bytes = 16 * testing::SmallLayout().BytesPerBlock();  // evicts
  o.disk_capacity_bytes = 512 * testing::SmallLayout().BytesPerBlock();
  o.io_depth = 8;
  o.async_threads = 1;
  return o;
}

inline BlockKey KeyOf(uint32_t k) { return testing::Key(1 + k % 2, k % 4, k); }

inline void Fill(std::vector<std::byte>& block, const BlockKey& key, uint64_t version) {
  std::memcpy(block.data(), &version, 8);
  (void)FillPatternRef(testing::ContentSeed(key, version), block.data() + 8, block.size() - 8,
                       nullptr);
}

// The version a block holds, or 0 when it is not a whole block of `key`.
inline uint64_t VersionOf(const std::vector<std::byte>& block, const BlockKey& key) {
  uint64_t version;
  std::memcpy(&version, block.data(), 8);
  const uint64_t n = block.size() - 8;
  if (FindPatternMismatch(testing::ContentSeed(key, version), block.data() + 8, n) != n) return 0;
  return version;
}

}  // namespace kvtier::crash

#endif  // KVTIER_TESTS_CRASH_COMMON_H_
