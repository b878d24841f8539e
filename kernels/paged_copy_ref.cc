#include <cstring>
#include <string>

#include "kernels/paged_copy.h"

namespace kvtier {
namespace {

// Checks what the kernel cannot report: every page-table entry and slot pointer.
Status ValidateEntries(const char* op, const PagedGeometry& g, const int32_t* page_table,
                       uint32_t num_blocks, const void* const* block_slots) {
  for (uint32_t b = 0; b < num_blocks; ++b) {
    if (block_slots[b] == nullptr) {
      return Status::InvalidArgument(std::string(op) + ": block " + std::to_string(b) +
                                     " has a null slot pointer");
    }
    for (uint32_t i = 0; i < g.chunks_per_block; ++i) {
      const int32_t chunk = page_table[uint64_t{b} * g.chunks_per_block + i];
      if (!PagedChunkValid(g, chunk)) {
        return Status::InvalidArgument(std::string(op) + ": block " + std::to_string(b) +
                                       ", page-table entry " + std::to_string(i) + " is " +
                                       std::to_string(chunk) + ", outside [0, " +
                                       std::to_string(g.num_chunks) + ")");
      }
    }
  }
  return Status::OK();
}

// Copies every row of every block, cache -> slot (to_cache false) or slot -> cache.
void CopyRows(const PagedGeometry& g, unsigned char* k_base, unsigned char* v_base,
              const int32_t* page_table, uint32_t num_blocks, const void* const* slots,
              bool to_cache) {
  const uint64_t row_bytes = uint64_t{g.head_dim} * g.elem_bytes;
  for (uint32_t b = 0; b < num_blocks; ++b) {
    const int32_t* chunks = page_table + uint64_t{b} * g.chunks_per_block;
    for (uint32_t kv = 0; kv < 2; ++kv) {
      unsigned char* base = (kv == 1 && !g.kv_combined) ? v_base : k_base;
      for (uint32_t head = 0; head < g.num_kv_heads; ++head) {
        for (uint32_t t = 0; t < g.block_tokens; ++t) {
          unsigned char* cache_row =
              base + PagedRowOffset(g, kv, chunks[t / g.chunk_tokens], t, head) * g.elem_bytes;
          unsigned char* slot_row = static_cast<unsigned char*>(const_cast<void*>(slots[b])) +
                                    BlockRowOffset(g, kv, head, t) * g.elem_bytes;
          if (to_cache) {
            std::memcpy(cache_row, slot_row, row_bytes);
          } else {
            std::memcpy(slot_row, cache_row, row_bytes);
          }
        }
      }
    }
  }
}

}  // namespace

Status GatherBlocksRef(const PagedCacheDesc& cache, const void* k_base, const void* v_base,
                       const int32_t* page_table, uint32_t num_blocks, void* const* block_slots,
                       StreamHandle /*stream*/) {
  constexpr const char* kOp = "GatherBlocks";
  KVTIER_RETURN_IF_ERROR(
      ValidatePagedCopy(kOp, cache, k_base, v_base, page_table, num_blocks, block_slots));
  if (num_blocks == 0) return Status::OK();
  const PagedGeometry g = MakePagedGeometry(cache);
  KVTIER_RETURN_IF_ERROR(ValidateEntries(kOp, g, page_table, num_blocks, block_slots));
  // The gather only reads the cache; CopyRows takes one pointer type for both ways.
  auto* k = static_cast<unsigned char*>(const_cast<void*>(k_base));
  auto* v = static_cast<unsigned char*>(const_cast<void*>(v_base));
  CopyRows(g, k, v, page_table, num_blocks, block_slots, /*to_cache=*/false);
  return Status::OK();
}

Status ScatterBlocksRef(const PagedCacheDesc& cache, void* k_base, void* v_base,
                        const int32_t* page_table, uint32_t num_blocks,
                        const void* const* block_slots, StreamHandle /*stream*/) {
  constexpr const char* kOp = "ScatterBlocks";
  KVTIER_RETURN_IF_ERROR(
      ValidatePagedCopy(kOp, cache, k_base, v_base, page_table, num_blocks, block_slots));
  if (num_blocks == 0) return Status::OK();
  const PagedGeometry g = MakePagedGeometry(cache);
  KVTIER_RETURN_IF_ERROR(ValidateEntries(kOp, g, page_table, num_blocks, block_slots));
  // The scatter only reads the slots.
  CopyRows(g, static_cast<unsigned char*>(k_base), static_cast<unsigned char*>(v_base), page_table,
           num_blocks, block_slots, /*to_cache=*/true);
  return Status::OK();
}

#if !KVTIER_WITH_CUDA
Status LaunchGatherBlocks(const PagedCacheDesc&, const void*, const void*, const int32_t*, uint32_t,
                          void* const*, StreamHandle) {
  return Status::NotSupported("GatherBlocks on a GPU: kvtier was built without CUDA");
}

Status LaunchScatterBlocks(const PagedCacheDesc&, void*, void*, const int32_t*, uint32_t,
                           const void* const*, StreamHandle) {
  return Status::NotSupported("ScatterBlocks on a GPU: kvtier was built without CUDA");
}
#endif

}  // namespace kvtier
