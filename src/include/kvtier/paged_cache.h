// An inference engine's paged KV cache, as kvtier reads it (Store::PutFromPagedCache):
// the layouts of FlashInfer, vLLM and SGLang. The shapes, and how a page table names
// the tokens of one kvtier block, are documented in full in kernels/paged_layout.h;
// in short, for one layer, with N pages of P tokens, H KV heads, head dim D:
//
//   layout  kv_combined  tensor(s)
//   NHD     true         cache[N][2][P][H][D]   (FlashInfer single tensor)
//   HND     true         cache[N][2][H][P][D]
//   NHD     false        k_cache[N][P][H][D], v_cache the same (vLLM flash-attn backend)
//   HND     false        k_cache[N][H][P][D], v_cache the same
//
// A block's page-table entries are chunk indices, chunks being gcd(P, block_tokens)
// tokens: with block_tokens a multiple of P (vLLM's 16-token pages), simply the
// block_tokens / P page indices of the block's tokens, in token order.
//
// Thread safety: value types.
#ifndef KVTIER_PAGED_CACHE_H_
#define KVTIER_PAGED_CACHE_H_

#include <cstdint>

#include "kvtier/layout.h"

namespace kvtier {

// Order of a page's dimensions (FlashInfer's QKVLayout / kv_layout names).
enum class PagedLayout : uint8_t {
  kNHD = 0,  // [page_size][num_kv_heads][head_dim]
  kHND = 1,  // [num_kv_heads][page_size][head_dim]
};

// An engine's paged cache for one layer plus kvtier's block size: everything the
// gather and scatter need to place an element. A value type.
struct PagedCacheDesc {
  PagedLayout layout = PagedLayout::kNHD;
  // true: one tensor with a K/V dimension after the page ([N][2][...], FlashInfer);
  // false: separate key and value tensors of equal shape (vLLM flash-attn backend).
  // Default: false.
  bool kv_combined = false;
  // Element type of the cache and of the blocks (they are equal; fp8 moves as bytes).
  // Default: bf16.
  DType dtype = DType::kBF16;
  uint32_t num_pages = 0;       // N: pages in the cache (the valid page indices)
  uint32_t page_size = 16;      // P: tokens per page. Default: 16 (vLLM's default).
  uint32_t num_kv_heads = 0;    // H
  uint32_t head_dim = 0;        // D
  uint32_t block_tokens = 128;  // tokens per kvtier block. Default: 128.
};

}  // namespace kvtier

#endif  // KVTIER_PAGED_CACHE_H_
