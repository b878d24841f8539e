#include <cstring>

#include "kernels/pattern.h"

namespace kvtier {

Status FillPatternRef(uint64_t seed, void* dst, uint64_t bytes, StreamHandle /*stream*/) {
  if (dst == nullptr && bytes > 0) return Status::InvalidArgument("FillPattern: null dst");
  auto* out = static_cast<unsigned char*>(dst);
  const uint64_t words = bytes / 8;
  for (uint64_t w = 0; w < words; ++w) {
    uint64_t v = PatternWord(seed, w);
    std::memcpy(out + 8 * w, &v, 8);  // little-endian host (x86-64, aarch64)
  }
  if (uint64_t tail = bytes % 8) {
    uint64_t v = PatternWord(seed, words);
    std::memcpy(out + 8 * words, &v, tail);
  }
  return Status::OK();
}

uint64_t FindPatternMismatch(uint64_t seed, const void* data, uint64_t bytes) {
  const auto* in = static_cast<const unsigned char*>(data);
  const uint64_t words = (bytes + 7) / 8;
  for (uint64_t w = 0; w < words; ++w) {
    uint64_t expected = PatternWord(seed, w);
    uint64_t n = bytes - 8 * w < 8 ? bytes - 8 * w : 8;
    uint64_t got = 0;
    std::memcpy(&got, in + 8 * w, n);
    if (n < 8) expected &= (uint64_t{1} << (8 * n)) - 1;
    if (got != expected) {
      for (uint64_t i = 0; i < n; ++i) {
        if (((got ^ expected) >> (8 * i)) & 0xFF) return 8 * w + i;
      }
    }
  }
  return bytes;
}

#if !KVTIER_WITH_CUDA
Status LaunchFillPattern(uint64_t, void*, uint64_t, StreamHandle) {
  return Status::NotSupported("FillPattern on a GPU: kvtier was built without CUDA");
}
#endif

}  // namespace kvtier
