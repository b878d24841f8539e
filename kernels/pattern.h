// FillPattern: deterministic pseudo-random bytes, a pure function of (seed, byte
// position). The demo, the benchmarks and the tests fill synthetic blocks with it and
// verify what comes back without keeping a copy; the GPU version fills device memory
// in place (for GPU-tier tests). Not a cryptographic generator.
#ifndef KVTIER_KERNELS_PATTERN_H_
#define KVTIER_KERNELS_PATTERN_H_

#include <cstdint>

#include "kernels/host_device.h"
#include "kvtier/status.h"

namespace kvtier {

// The 8 bytes at word `word_index` (bytes [8w, 8w + 8), little-endian) of pattern
// `seed`: SplitMix64 of a seed-dependent counter.
KVTIER_HOST_DEVICE uint64_t PatternWord(uint64_t seed, uint64_t word_index) {
  uint64_t z = seed * 0xD1B54A32D192ED03ull + (word_index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Writes bytes [0, bytes) of pattern `seed` to `dst`, device memory, on `stream`
// (asynchronous). NotSupported in a build without CUDA; the driver's error when there
// is no device.
Status LaunchFillPattern(uint64_t seed, void* dst, uint64_t bytes, StreamHandle stream);

// CPU reference, same contract on host memory (synchronous; `stream` is ignored).
Status FillPatternRef(uint64_t seed, void* dst, uint64_t bytes, StreamHandle stream);

// The offset of the first byte of `data` that differs from pattern `seed`, or `bytes`
// when all match (host memory).
uint64_t FindPatternMismatch(uint64_t seed, const void* data, uint64_t bytes);

}  // namespace kvtier

#endif  // KVTIER_KERNELS_PATTERN_H_
