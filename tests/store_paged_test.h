// A paged KV cache for the PutFromPagedCache tests (host copy), and the block it should
// yield, computed naively from the documented shapes (kvtier/paged_cache.h).
#ifndef KVTIER_TESTS_STORE_PAGED_TEST_H_
#define KVTIER_TESTS_STORE_PAGED_TEST_H_

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvtier/layout.h"
#include "kvtier/paged_cache.h"

namespace kvtier::testing {

struct HostPagedCache {
  PagedCacheDesc desc;
  std::vector<std::byte> k, v;  // separate tensors (v empty when combined)

  HostPagedCache(const ModelLayout& l, PagedLayout layout, bool combined, uint32_t page_size,
                 uint32_t pages, uint64_t seed) {
    desc.layout = layout;
    desc.kv_combined = combined;
    desc.dtype = l.dtype;
    desc.num_pages = pages;
    desc.page_size = page_size;
    desc.num_kv_heads = l.num_kv_heads;
    desc.head_dim = l.head_dim;
    desc.block_tokens = l.block_tokens;
    const uint64_t tensor = uint64_t{pages} * page_size * l.KeyBytesPerTokenPerLayer();
    std::mt19937_64 rng(seed);
    k.resize(combined ? 2 * tensor : tensor);
    for (auto& b : k) b = std::byte(rng());
    if (!combined) {
      v.resize(tensor);
      for (auto& b : v) b = std::byte(rng());
    }
  }

  // The kvtier block made of `pages` (block_tokens / page_size page indices, in order).
  std::vector<std::byte> ExpectedBlock(const std::vector<int32_t>& pages) const {
    const uint32_t H = desc.num_kv_heads, D = desc.head_dim, P = desc.page_size;
    const uint32_t T = desc.block_tokens;
    const uint64_t e = DTypeBytes(desc.dtype);
    std::vector<std::byte> block(2 * uint64_t{H} * T * D * e);
    for (uint32_t kv = 0; kv < 2; ++kv) {
      for (uint32_t h = 0; h < H; ++h) {
        for (uint32_t t = 0; t < T; ++t) {
          const uint64_t page = uint64_t(pages[t / P]), pt = t % P;
          uint64_t elem;  // element index of (page, [kv,] token, head) in its tensor
          const uint64_t inner =
              desc.layout == PagedLayout::kNHD ? (pt * H + h) * D : (uint64_t{h} * P + pt) * D;
          if (desc.kv_combined) {
            elem = (page * 2 + kv) * P * H * D + inner;
          } else {
            elem = page * P * H * D + inner;
          }
          const std::byte* src = (desc.kv_combined || kv == 0 ? k.data() : v.data()) + elem * e;
          std::byte* dst = block.data() + ((uint64_t{kv} * H + h) * T + t) * D * e;
          std::memcpy(dst, src, D * e);
        }
      }
    }
    return block;
  }
};

}  // namespace kvtier::testing

#endif  // KVTIER_TESTS_STORE_PAGED_TEST_H_
