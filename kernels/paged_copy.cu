#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "kernels/paged_copy.h"

namespace kvtier {
namespace {

constexpr unsigned kThreads = 256;
constexpr int kUnroll = 4;  // vectors in flight per thread
// A work item is a tile of one block's rows for one (K or V, kv head); about
// kThreads * kUnroll 16-byte vectors, so each thread issues its loads back to back.
constexpr uint32_t kTileBytes = kThreads * kUnroll * 16;
constexpr uint32_t kMaxTileTokens = 256;

// Loads through the read-only data cache; V is one of the vector types below.
template <typename V>
__device__ __forceinline__ V LoadVector(const V* p) {
  return __ldg(p);
}

// Copies `rows` rows of `row_bytes` between the cache (row r at cache + row_offsets[r])
// and the slot (rows contiguous from `slot`), in vectors of V. Thread i moves vectors
// i, i + blockDim.x, ...: consecutive threads touch consecutive 16-byte pieces of a row.
template <typename V>
__device__ void CopyTile(unsigned char* cache, const uint64_t* row_offsets, unsigned char* slot,
                         uint32_t rows, uint32_t row_bytes, bool to_cache) {
  const uint32_t row_vecs = row_bytes / sizeof(V);
  const uint32_t n = rows * row_vecs;  // rows * row_bytes <= max(kTileBytes, row_bytes)
  for (uint32_t i0 = threadIdx.x; i0 < n; i0 += kUnroll * blockDim.x) {
    V buf[kUnroll];
    V* dst[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t i = i0 + u * blockDim.x;
      dst[u] = nullptr;
      if (i < n) {
        const uint32_t r = i / row_vecs;
        V* cache_v = reinterpret_cast<V*>(cache + row_offsets[r]) + (i - r * row_vecs);
        V* slot_v = reinterpret_cast<V*>(slot) + i;
        buf[u] = LoadVector(to_cache ? slot_v : cache_v);
        dst[u] = to_cache ? cache_v : slot_v;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (dst[u] != nullptr) *dst[u] = buf[u];
    }
  }
}

// One thread block per work item (grid-stride over items): item = ((block * 2 + kv) *
// num_kv_heads + head) * tiles_per_head + tile, so consecutive items fill consecutive
// slot memory. A block whose page-table entries or slot pointer are invalid is skipped
// by every item of it (each checks all the block's entries), so it is never half done.
__global__ void __launch_bounds__(kThreads, 2)
    PagedCopyKernel(PagedGeometry g, unsigned char* k_base, unsigned char* v_base,
                    const int32_t* __restrict__ page_table, uint32_t num_blocks,
                    const void* const* __restrict__ block_slots, uint32_t tile_tokens,
                    uint32_t tiles_per_head, uint32_t max_vec_bytes, bool to_cache) {
  __shared__ uint64_t row_offsets[kMaxTileTokens];  // bytes from the tensor base
  const uint32_t row_bytes = g.head_dim * g.elem_bytes;
  const uint64_t items = uint64_t{num_blocks} * 2 * g.num_kv_heads * tiles_per_head;
  for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const uint32_t tile = static_cast<uint32_t>(item % tiles_per_head);
    uint64_t rest = item / tiles_per_head;
    const uint32_t head = static_cast<uint32_t>(rest % g.num_kv_heads);
    rest /= g.num_kv_heads;
    const uint32_t kv = static_cast<uint32_t>(rest & 1);
    const uint32_t block = static_cast<uint32_t>(rest >> 1);

    unsigned char* slot = static_cast<unsigned char*>(const_cast<void*>(block_slots[block]));
    const int32_t* chunks = page_table + uint64_t{block} * g.chunks_per_block;
    int bad = slot == nullptr;
    for (uint32_t i = threadIdx.x; i < g.chunks_per_block; i += blockDim.x) {
      bad |= !PagedChunkValid(g, chunks[i]);
    }
    const uint32_t t0 = tile * tile_tokens;
    const uint32_t rows = min(tile_tokens, g.block_tokens - t0);
    for (uint32_t r = threadIdx.x; r < rows; r += blockDim.x) {
      const uint32_t t = t0 + r;
      const int32_t chunk = chunks[t / g.chunk_tokens];
      row_offsets[r] =
          PagedChunkValid(g, chunk) ? PagedRowOffset(g, kv, chunk, t, head) * g.elem_bytes : 0;
    }
    if (__syncthreads_or(bad)) continue;  // uniform: nobody reads row_offsets this round

    unsigned char* base = (kv == 1 && !g.kv_combined) ? v_base : k_base;
    slot += BlockRowOffset(g, kv, head, t0) * g.elem_bytes;
    // Bases and strides are multiples of max_vec_bytes; the slot may be less aligned.
    uint32_t vec = max_vec_bytes;
    while (vec > 1 && reinterpret_cast<uintptr_t>(slot) % vec != 0) vec >>= 1;
    switch (vec) {
      case 16:
        CopyTile<uint4>(base, row_offsets, slot, rows, row_bytes, to_cache);
        break;
      case 8:
        CopyTile<uint2>(base, row_offsets, slot, rows, row_bytes, to_cache);
        break;
      case 4:
        CopyTile<unsigned int>(base, row_offsets, slot, rows, row_bytes, to_cache);
        break;
      case 2:
        CopyTile<unsigned short>(base, row_offsets, slot, rows, row_bytes, to_cache);
        break;
      default:
        CopyTile<unsigned char>(base, row_offsets, slot, rows, row_bytes, to_cache);
        break;
    }
    __syncthreads();  // row_offsets is rewritten by the next item
  }
}

// Arguments already validated.
Status LaunchPagedCopy(const char* op, const PagedCacheDesc& cache, const void* k_base,
                       const void* v_base, const int32_t* page_table, uint32_t num_blocks,
                       const void* const* block_slots, bool to_cache, StreamHandle stream) {
  const PagedGeometry g = MakePagedGeometry(cache);
  const uint32_t row_bytes = g.head_dim * g.elem_bytes;  // <= kMaxBlockBytes
  const uint32_t tile_tokens =
      std::min({std::max(1u, kTileBytes / row_bytes), g.block_tokens, kMaxTileTokens});
  const uint32_t tiles_per_head = (g.block_tokens + tile_tokens - 1) / tile_tokens;
  const void* values = cache.kv_combined ? k_base : v_base;
  uint32_t max_vec_bytes = 16;
  while (max_vec_bytes > 1 && (row_bytes % max_vec_bytes != 0 ||
                               reinterpret_cast<uintptr_t>(k_base) % max_vec_bytes != 0 ||
                               reinterpret_cast<uintptr_t>(values) % max_vec_bytes != 0)) {
    max_vec_bytes >>= 1;
  }
  const uint64_t items = uint64_t{num_blocks} * 2 * g.num_kv_heads * tiles_per_head;
  const unsigned grid = static_cast<unsigned>(std::min<uint64_t>(items, 0x7FFFFFFFu));
  PagedCopyKernel<<<grid, kThreads, 0, stream>>>(
      g, static_cast<unsigned char*>(const_cast<void*>(k_base)),
      static_cast<unsigned char*>(const_cast<void*>(values)), page_table, num_blocks, block_slots,
      tile_tokens, tiles_per_head, max_vec_bytes, to_cache);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return Status::Internal(std::string(op) +
                            ": PagedCopyKernel launch: " + cudaGetErrorString(err));
  }
  return Status::OK();
}

}  // namespace

Status LaunchGatherBlocks(const PagedCacheDesc& cache, const void* k_base, const void* v_base,
                          const int32_t* page_table, uint32_t num_blocks, void* const* block_slots,
                          StreamHandle stream) {
  constexpr const char* kOp = "GatherBlocks";
  KVTIER_RETURN_IF_ERROR(
      ValidatePagedCopy(kOp, cache, k_base, v_base, page_table, num_blocks, block_slots));
  if (num_blocks == 0) return Status::OK();
  return LaunchPagedCopy(kOp, cache, k_base, v_base, page_table, num_blocks, block_slots,
                         /*to_cache=*/false, stream);
}

Status LaunchScatterBlocks(const PagedCacheDesc& cache, void* k_base, void* v_base,
                           const int32_t* page_table, uint32_t num_blocks,
                           const void* const* block_slots, StreamHandle stream) {
  constexpr const char* kOp = "ScatterBlocks";
  KVTIER_RETURN_IF_ERROR(
      ValidatePagedCopy(kOp, cache, k_base, v_base, page_table, num_blocks, block_slots));
  if (num_blocks == 0) return Status::OK();
  return LaunchPagedCopy(kOp, cache, k_base, v_base, page_table, num_blocks, block_slots,
                         /*to_cache=*/true, stream);
}

}  // namespace kvtier
