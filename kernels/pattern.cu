#include <cuda_runtime_api.h>

#include <string>

#include "kernels/pattern.h"

namespace kvtier {
namespace {

// One thread per 8-byte word; the last word may be partial.
__global__ void FillPatternKernel(uint64_t seed, unsigned char* dst, uint64_t bytes) {
  const uint64_t words = (bytes + 7) / 8;
  for (uint64_t w = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; w < words;
       w += uint64_t{gridDim.x} * blockDim.x) {
    const uint64_t v = PatternWord(seed, w);
    if (8 * w + 8 <= bytes && (reinterpret_cast<uintptr_t>(dst) % 8) == 0) {
      *reinterpret_cast<uint64_t*>(dst + 8 * w) = v;
    } else {
      for (uint64_t i = 0; i < 8 && 8 * w + i < bytes; ++i) {
        dst[8 * w + i] = static_cast<unsigned char>(v >> (8 * i));
      }
    }
  }
}

}  // namespace

Status LaunchFillPattern(uint64_t seed, void* dst, uint64_t bytes, StreamHandle stream) {
  if (bytes == 0) return Status::OK();
  if (dst == nullptr) return Status::InvalidArgument("FillPattern: null dst");
  const uint64_t words = (bytes + 7) / 8;
  constexpr unsigned kThreads = 256;
  const uint64_t blocks_needed = (words + kThreads - 1) / kThreads;
  const unsigned blocks = blocks_needed < 65535 ? static_cast<unsigned>(blocks_needed) : 65535;
  FillPatternKernel<<<blocks, kThreads, 0, stream>>>(seed, static_cast<unsigned char*>(dst), bytes);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return Status::Internal(std::string("FillPatternKernel launch: ") + cudaGetErrorString(err));
  }
  return Status::OK();
}

}  // namespace kvtier
