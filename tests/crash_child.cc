// The writer of the crash test (store_crash_test.cc), a program of its own so that the
// parent can SIGKILL it at any instant: opens the store in argv[1] and Puts blocks
// forever, overwriting a small set of keys with ever newer versions, flushing every few
// Puts. After each successful Flush it reports, in one write to stdout (atomic: under
// PIPE_BUF), the newest version of every key it wrote: those are acknowledged durable.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "tests/crash_common.h"

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const std::string dir = argv[1];
  const uint64_t iteration = std::strtoull(argv[2], nullptr, 10);
  std::mt19937_64 rng(std::strtoull(argv[3], nullptr, 10));
  auto store = kvtier::Store::Open(kvtier::crash::Options(dir), kvtier::testing::SmallLayout());
  if (!store.ok()) {
    std::fprintf(stderr, "crash_child: %s\n", store.status().ToString().c_str());
    return 3;
  }
  const uint64_t bytes = (*store)->block_bytes();
  std::vector<std::byte> block(bytes);
  std::vector<kvtier::crash::Record> newest(kvtier::crash::kKeys);
  uint64_t counter = 0;
  for (;;) {
    const int puts = 1 + rng() % 12;
    for (int i = 0; i < puts; ++i) {
      uint32_t k = rng() % kvtier::crash::kKeys;
      uint64_t version = (iteration << 32) | ++counter;
      kvtier::crash::Fill(block, kvtier::crash::KeyOf(k), version);
      kvtier::Status s = (*store)->Put(kvtier::crash::KeyOf(k), block.data(), bytes);
      if (!s.ok()) {
        std::fprintf(stderr, "crash_child: put: %s\n", s.ToString().c_str());
        return 4;
      }
      newest[k] = kvtier::crash::Record{k, version};
    }
    kvtier::Status s = (*store)->Flush();
    if (!s.ok()) {
      std::fprintf(stderr, "crash_child: flush: %s\n", s.ToString().c_str());
      return 5;
    }
    std::vector<kvtier::crash::Record> acked;
    for (const auto& r : newest) {
      if (r.version != 0) acked.push_back(r);
    }
    if (write(1, acked.data(), acked.size() * sizeof(acked[0])) < 0) return 6;
  }
}
