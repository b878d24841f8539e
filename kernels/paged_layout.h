// The layout of an inference engine's paged KV cache, and the arithmetic that finds a
// kvtier block's rows in it. Shared by the gather/scatter kernel (kernels/paged_copy.cu)
// and its CPU reference, so the two cannot disagree about where an element lives.
//
// ## The engine's cache (one layer)
// The cache holds `num_pages` pages of `page_size` tokens. Shapes below are in
// elements of `dtype`, row-major (last index fastest); H = num_kv_heads,
// D = head_dim, P = page_size, N = num_pages.
//
//   layout  kv_combined  tensor(s)                          engines
//   NHD     true         cache[N][2][P][H][D]               FlashInfer single tensor (NHD);
//                                                           vLLM FlashInfer backend
//   HND     true         cache[N][2][H][P][D]               FlashInfer single tensor (HND);
//                                                           vLLM FlashInfer backend, HND order
//   NHD     false        k_cache[N][P][H][D], v_cache same  FlashInfer (k, v) tuple (NHD);
//                                                           vLLM flash-attn backend;
//                                                           SGLang token pool (P = 1)
//   HND     false        k_cache[N][H][P][D], v_cache same  FlashInfer (k, v) tuple (HND);
//                                                           vLLM flash-attn backend, HND order
//
// In the combined layout index 0 of the K/V dimension is the keys, 1 the values. vLLM's
// flash-attn backend allocates one tensor [2][N][P][H][D] and unbinds it: that is the
// separate layout with v_cache = k_cache + N*P*H*D elements. Layouts that split
// head_dim (vLLM's legacy PagedAttention key cache [N][H][D/x][P][x]) or pad pages
// (a page stride other than the dense one above) are not supported.
//
// ## kvtier's block (slot)
// A block is block_tokens consecutive tokens of one layer: the keys, then the values,
// each [H][block_tokens][D] (kvtier/layout.h), in the same dtype as the cache.
//
// ## Which pages hold a block: chunks and the page table
// A chunk is chunk_tokens = gcd(page_size, block_tokens) consecutive tokens inside one
// page; it is the unit the page table addresses. A block is chunks_per_block =
// block_tokens / chunk_tokens chunks; a page is chunks_per_page = page_size /
// chunk_tokens chunks, and chunk index c means page c / chunks_per_page, tokens from
// (c % chunks_per_page) * chunk_tokens. The page table gives, for each block, its
// chunks_per_block chunk indices in token order (int32, in [0, N * chunks_per_page)).
// The two common cases:
//   - block_tokens % page_size == 0 (vLLM: 16-token pages, 128-token blocks): a chunk is
//     a whole page and a chunk index is simply a page index; each block lists its
//     block_tokens / page_size pages, in any order, not necessarily contiguous.
//   - page_size % block_tokens == 0 (pages of 256 or more tokens): a block is a token
//     range inside one page, listed as one entry, page * (page_size / block_tokens) +
//     the block's position in the page (its first token is that position *
//     block_tokens). With page_size == block_tokens both readings give the page index.
// Other combinations work the same way with smaller chunks (page_size 48, block_tokens
// 128: 16-token chunks, 8 entries per block).
#ifndef KVTIER_KERNELS_PAGED_LAYOUT_H_
#define KVTIER_KERNELS_PAGED_LAYOUT_H_

#include <cstdint>
#include <string>

#include "kernels/host_device.h"
#include "kvtier/layout.h"
#include "kvtier/paged_cache.h"
#include "kvtier/status.h"

namespace kvtier {

// PagedLayout and PagedCacheDesc are public (kvtier/paged_cache.h): the store's
// PutFromPagedCache takes them.

// The descriptor of `model`'s cache for one layer (its kv heads, head dim, dtype and
// block tokens) in an engine's paged layout.
inline PagedCacheDesc MakePagedCacheDesc(const ModelLayout& model, PagedLayout layout,
                                         bool kv_combined, uint32_t page_size, uint32_t num_pages) {
  PagedCacheDesc d;
  d.layout = layout;
  d.kv_combined = kv_combined;
  d.dtype = model.dtype;
  d.num_pages = num_pages;
  d.page_size = page_size;
  d.num_kv_heads = model.num_kv_heads;
  d.head_dim = model.head_dim;
  d.block_tokens = model.block_tokens;
  return d;
}

// Bytes per element of `dtype` (host and device; 0 outside the enum).
KVTIER_HOST_DEVICE uint32_t PagedElementBytes(DType dtype) {
  switch (dtype) {
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kF32:
      return 4;
    case DType::kFP8E4M3:
      return 1;
  }
  return 0;
}

KVTIER_HOST_DEVICE uint32_t PagedGcd(uint32_t a, uint32_t b) {
  while (b != 0) {
    const uint32_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

// The strides of a valid descriptor, in elements, and the chunk geometry. Computed once
// on the host (MakePagedGeometry) and passed by value to the kernel.
struct PagedGeometry {
  uint64_t page_stride = 0;   // between pages of one tensor (2*P*H*D combined, P*H*D not)
  uint64_t value_offset = 0;  // from a page's keys to its values: P*H*D combined, else 0
  uint64_t token_stride = 0;  // between tokens of a page: H*D (NHD) or D (HND)
  uint64_t head_stride = 0;   // between heads of a page: D (NHD) or P*D (HND)
  uint64_t num_chunks = 0;    // valid chunk indices are [0, num_chunks)
  uint32_t elem_bytes = 0;
  uint32_t head_dim = 0;
  uint32_t num_kv_heads = 0;
  uint32_t block_tokens = 0;
  uint32_t chunk_tokens = 0;
  uint32_t chunks_per_page = 0;
  uint32_t chunks_per_block = 0;
  bool kv_combined = false;
};

KVTIER_HOST_DEVICE PagedGeometry MakePagedGeometry(const PagedCacheDesc& d) {
  PagedGeometry g;
  const uint64_t head_elems = d.head_dim;
  const uint64_t page_elems = uint64_t{d.page_size} * d.num_kv_heads * head_elems;
  g.page_stride = d.kv_combined ? 2 * page_elems : page_elems;
  g.value_offset = d.kv_combined ? page_elems : 0;
  if (d.layout == PagedLayout::kNHD) {
    g.token_stride = uint64_t{d.num_kv_heads} * head_elems;
    g.head_stride = head_elems;
  } else {
    g.token_stride = head_elems;
    g.head_stride = uint64_t{d.page_size} * head_elems;
  }
  g.elem_bytes = PagedElementBytes(d.dtype);
  g.head_dim = d.head_dim;
  g.num_kv_heads = d.num_kv_heads;
  g.block_tokens = d.block_tokens;
  g.chunk_tokens = PagedGcd(d.page_size, d.block_tokens);
  g.chunks_per_page = g.chunk_tokens ? d.page_size / g.chunk_tokens : 0;
  g.chunks_per_block = g.chunk_tokens ? d.block_tokens / g.chunk_tokens : 0;
  g.num_chunks = uint64_t{d.num_pages} * g.chunks_per_page;
  g.kv_combined = d.kv_combined;
  return g;
}

// Page-table entries per block (chunks_per_block); the table of n blocks holds
// n * PageTableEntriesPerBlock(d) int32 entries.
KVTIER_HOST_DEVICE uint32_t PageTableEntriesPerBlock(const PagedCacheDesc& d) {
  const uint32_t chunk = PagedGcd(d.page_size, d.block_tokens);
  return chunk ? d.block_tokens / chunk : 0;
}

// Whether a page-table entry names a chunk of the cache.
KVTIER_HOST_DEVICE bool PagedChunkValid(const PagedGeometry& g, int32_t chunk) {
  return chunk >= 0 && uint64_t(chunk) < g.num_chunks;
}

// The page-table entry of the chunk that starts at token `token_in_page` (a multiple of
// chunk_tokens) of page `page`. Entries are int32: at most the first 2^31 chunks of a
// cache are addressable. An engine that keeps token s of a sequence at page
// pages[s / page_size], position s % page_size, fills the entries of the kvtier block
// that starts at token s0 (a multiple of block_tokens) with, for j = 0 ..
// chunks_per_block - 1 and s = s0 + j * chunk_tokens:
//   PagedChunkIndex(g, pages[s / page_size], s % page_size).
KVTIER_HOST_DEVICE int32_t PagedChunkIndex(const PagedGeometry& g, uint32_t page,
                                           uint32_t token_in_page) {
  return static_cast<int32_t>(uint64_t{page} * g.chunks_per_page + token_in_page / g.chunk_tokens);
}

// Element offset of row (kv, head, token) of a block in the engine's cache, where
// `chunk` is the page-table entry covering `token_in_block` (entry token_in_block /
// chunk_tokens of the block) and must be valid. kv: 0 keys, 1 values. The offset is
// from the base of the tensor that holds `kv`: the one cache tensor when combined, the
// key or the value tensor when separate. The row is head_dim contiguous elements.
KVTIER_HOST_DEVICE uint64_t PagedRowOffset(const PagedGeometry& g, uint32_t kv, int32_t chunk,
                                           uint32_t token_in_block, uint32_t head) {
  const uint32_t c = uint32_t(chunk);
  const uint64_t page = c / g.chunks_per_page;
  const uint64_t token_in_page =
      uint64_t(c % g.chunks_per_page) * g.chunk_tokens + token_in_block % g.chunk_tokens;
  return page * g.page_stride + kv * g.value_offset + token_in_page * g.token_stride +
         head * g.head_stride;
}

// Element offset of row (kv, head, token) in a kvtier block: keys then values, each
// [num_kv_heads][block_tokens][head_dim].
KVTIER_HOST_DEVICE uint64_t BlockRowOffset(const PagedGeometry& g, uint32_t kv, uint32_t head,
                                           uint32_t token_in_block) {
  return ((uint64_t{kv} * g.num_kv_heads + head) * g.block_tokens + token_in_block) * g.head_dim;
}

// OK when every field is in range and every offset fits: a known dtype, non-zero
// sizes, a block of at most kMaxBlockBytes, and a cache of at most 2^62 bytes.
inline Status ValidatePagedCacheDesc(const PagedCacheDesc& d) {
  const uint32_t elem = PagedElementBytes(d.dtype);
  if (elem == 0) {
    return Status::InvalidArgument("paged cache: unknown dtype " +
                                   std::to_string(static_cast<int>(d.dtype)));
  }
  if (d.layout != PagedLayout::kNHD && d.layout != PagedLayout::kHND) {
    return Status::InvalidArgument("paged cache: layout must be NHD or HND");
  }
  if (d.num_pages == 0 || d.page_size == 0 || d.num_kv_heads == 0 || d.head_dim == 0 ||
      d.block_tokens == 0) {
    return Status::InvalidArgument(
        "paged cache: num_pages, page_size, num_kv_heads, head_dim and block_tokens must "
        "be non-zero (got " +
        std::to_string(d.num_pages) + ", " + std::to_string(d.page_size) + ", " +
        std::to_string(d.num_kv_heads) + ", " + std::to_string(d.head_dim) + ", " +
        std::to_string(d.block_tokens) + ")");
  }
  // Every factor is below 2^32; with a row and a token of at most 2^30 bytes, each
  // product below fits in 64 bits.
  const uint64_t row_bytes = uint64_t{d.head_dim} * elem;
  if (row_bytes > kMaxBlockBytes || row_bytes * d.num_kv_heads > kMaxBlockBytes) {
    return Status::InvalidArgument("paged cache: num_kv_heads * head_dim is too large");
  }
  const uint64_t heads_row_bytes = row_bytes * d.num_kv_heads;
  const uint64_t block_bytes = 2 * heads_row_bytes * d.block_tokens;
  if (block_bytes > kMaxBlockBytes) {
    return Status::InvalidArgument("paged cache: a block of " + std::to_string(block_bytes) +
                                   " bytes is larger than kMaxBlockBytes");
  }
  const uint64_t page_bytes = (d.kv_combined ? 2 : 1) * heads_row_bytes * d.page_size;
  constexpr uint64_t kMaxCacheBytes = uint64_t{1} << 62;
  if (page_bytes > kMaxCacheBytes / d.num_pages) {
    return Status::InvalidArgument("paged cache: num_pages * page bytes overflows");
  }
  return Status::OK();
}

}  // namespace kvtier

#endif  // KVTIER_KERNELS_PAGED_LAYOUT_H_
