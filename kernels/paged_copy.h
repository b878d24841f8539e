// Gather and scatter between an engine's paged KV cache and kvtier's block slots, many
// blocks per launch. The layouts (FlashInfer and vLLM NHD/HND, combined or separate
// K/V tensors), the block format and the page-table format are in
// kernels/paged_layout.h.
//
//   GatherBlocks:  cache pages -> block slots (offload: the engine's KV into kvtier)
//   ScatterBlocks: block slots -> cache pages (promotion: kvtier's blocks back into
//                  the engine's cache)
//
// Arguments (the same for the GPU launch and the CPU reference):
//   cache        the descriptor; must be valid (ValidatePagedCacheDesc).
//   k_base       the cache tensor (combined) or the key tensor (separate).
//   v_base       separate: the value tensor, distinct from k_base. Combined: nullptr or
//                equal to k_base (the values live in the same tensor).
//   page_table   num_blocks * PageTableEntriesPerBlock(cache) int32 chunk indices:
//                block b's entries are page_table[b * entries, (b + 1) * entries), in
//                token order (paged_layout.h). Each in [0, num_pages * chunks_per_page).
//   num_blocks   blocks to move; 0 is a no-op (the pointers may then be null).
//   block_slots  num_blocks pointers, one per block: slot b receives (gather) or
//                supplies (scatter) block b, 2 * num_kv_heads * block_tokens * head_dim
//                elements in kvtier's block format.
// A launch copies bytes exactly (no conversion, so fp8 and NaN payloads survive). A
// scatter writes only the rows its blocks map to; a gather writes only the slots' bytes.
//
// Memory: for Launch*, every pointer (bases, page_table, block_slots and the slots it
// points to) is device memory, or memory the device can address (managed, mapped
// pinned); for *Ref, host memory. The call is asynchronous on `stream` (Launch) or
// synchronous (Ref, which ignores `stream`); the buffers must stay valid until the
// stream reaches the copy.
//
// Entries the host cannot see: a page-table entry outside the cache or a null slot
// pointer is a caller bug. The Ref checks them all first and returns InvalidArgument
// naming the block, having written nothing. The kernel (whose table and slot array sit
// in device memory) skips such a block whole, writing neither its slot nor its pages,
// and copies the others.
//
// Overlap: no chunk may appear twice in one scatter's table, blocks of one gather must
// not share slots, and no slot may overlap the cache; otherwise which write lands is
// unspecified (the Ref: the last block's).
//
// Speed: the kernel moves 16-byte vectors when head_dim * element size, the bases and
// the slots are 16-byte aligned (narrower vectors otherwise), one thread block per
// (block, K or V, kv head, tile of up to 16 KiB of tokens), reads and writes coalesced
// along head_dim; the slot side of a tile is one contiguous range.
//
// Errors: InvalidArgument for a bad descriptor or argument (shared checks,
// ValidatePagedCopy); NotSupported from Launch* in a build without CUDA; the CUDA
// runtime's error (Internal) when the launch fails, e.g. with no device.
//
// Thread safety: stateless; calls on distinct buffers may run concurrently.
#ifndef KVTIER_KERNELS_PAGED_COPY_H_
#define KVTIER_KERNELS_PAGED_COPY_H_

#include <cstdint>
#include <string>

#include "kernels/host_device.h"
#include "kernels/paged_layout.h"
#include "kvtier/status.h"

namespace kvtier {

Status LaunchGatherBlocks(const PagedCacheDesc& cache, const void* k_base, const void* v_base,
                          const int32_t* page_table, uint32_t num_blocks, void* const* block_slots,
                          StreamHandle stream);

Status LaunchScatterBlocks(const PagedCacheDesc& cache, void* k_base, void* v_base,
                           const int32_t* page_table, uint32_t num_blocks,
                           const void* const* block_slots, StreamHandle stream);

// CPU references: the same contracts on host memory.
Status GatherBlocksRef(const PagedCacheDesc& cache, const void* k_base, const void* v_base,
                       const int32_t* page_table, uint32_t num_blocks, void* const* block_slots,
                       StreamHandle stream);

Status ScatterBlocksRef(const PagedCacheDesc& cache, void* k_base, void* v_base,
                        const int32_t* page_table, uint32_t num_blocks,
                        const void* const* block_slots, StreamHandle stream);

// The checks Launch* and *Ref share, on what the host can see without reading the
// buffers: the descriptor, the base pointers, and non-null table and slot array when
// num_blocks > 0. `op` names the operation in the message.
inline Status ValidatePagedCopy(const char* op, const PagedCacheDesc& cache, const void* k_base,
                                const void* v_base, const int32_t* page_table, uint32_t num_blocks,
                                const void* block_slots) {
  const std::string prefix = std::string(op) + ": ";
  if (Status s = ValidatePagedCacheDesc(cache); !s.ok()) return s.WithContext(op);
  if (k_base == nullptr) {
    return Status::InvalidArgument(
        prefix + (cache.kv_combined ? "null cache tensor (k_base)" : "null key tensor (k_base)"));
  }
  if (cache.kv_combined) {
    if (v_base != nullptr && v_base != k_base) {
      return Status::InvalidArgument(
          prefix +
          "the combined K/V layout keeps the values in k_base's tensor: v_base must "
          "be null or equal to k_base");
    }
  } else {
    if (v_base == nullptr) return Status::InvalidArgument(prefix + "null value tensor (v_base)");
    // The two tensors must not overlap (one tensor: use kv_combined).
    const uint64_t bytes = uint64_t{cache.num_pages} * cache.page_size * cache.num_kv_heads *
                           cache.head_dim * PagedElementBytes(cache.dtype);
    const auto k = reinterpret_cast<uintptr_t>(k_base), v = reinterpret_cast<uintptr_t>(v_base);
    if ((k <= v && v - k < bytes) || (v < k && k - v < bytes)) {
      return Status::InvalidArgument(prefix +
                                     "the key and value tensors overlap (separate K/V layout)");
    }
  }
  if (num_blocks == 0) return Status::OK();
  if (page_table == nullptr) return Status::InvalidArgument(prefix + "null page_table");
  if (block_slots == nullptr) return Status::InvalidArgument(prefix + "null block_slots");
  return Status::OK();
}

}  // namespace kvtier

#endif  // KVTIER_KERNELS_PAGED_COPY_H_
