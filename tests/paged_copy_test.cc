// GatherBlocksRef / ScatterBlocksRef against a naive copy written from the documented
// tensor shapes (one element at a time), over layouts, dtypes and shapes; round trips;
// bad arguments. The copy moves bytes, so every comparison is byte-exact (random bytes
// include NaN and infinity patterns, which must survive untouched).
#include "kernels/paged_copy.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_runtime.h"

namespace kvtier {
namespace {

constexpr unsigned char kPoison = 0xA5;

struct Case {
  PagedLayout layout = PagedLayout::kNHD;
  bool combined = false;
  DType dtype = DType::kF16;
  uint32_t head_dim = 64;
  uint32_t heads = 1;
  uint32_t block_tokens = 16;
  uint32_t page_size = 16;
  uint32_t num_blocks = 2;

  std::string ToString() const {
    return std::string(layout == PagedLayout::kNHD ? "NHD" : "HND") +
           (combined ? " combined" : " separate") + " " + std::string(DTypeName(dtype)) +
           " D=" + std::to_string(head_dim) + " H=" + std::to_string(heads) +
           " block_tokens=" + std::to_string(block_tokens) +
           " page_size=" + std::to_string(page_size) + " blocks=" + std::to_string(num_blocks);
  }
};

uint64_t SplitMix(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void FillRandom(std::vector<unsigned char>* v, uint64_t seed) {
  uint64_t state = seed;
  for (size_t i = 0; i < v->size(); i += 8) {
    const uint64_t w = SplitMix(&state);
    std::memcpy(v->data() + i, &w, std::min<size_t>(8, v->size() - i));
  }
}

// Tokens per table entry, entries per block and entries per page, from the two cases
// the header documents (and the gcd rule for the rest), written out separately.
struct Chunking {
  uint32_t tokens, per_block, per_page;
};
Chunking NaiveChunking(const Case& c) {
  if (c.block_tokens % c.page_size == 0) return {c.page_size, c.block_tokens / c.page_size, 1};
  if (c.page_size % c.block_tokens == 0) return {c.block_tokens, 1, c.page_size / c.block_tokens};
  const uint32_t g = std::gcd(c.page_size, c.block_tokens);
  return {g, c.block_tokens / g, c.page_size / g};
}

// The page and token in page of token t of block b.
void NaiveLocate(const Case& c, const std::vector<int32_t>& table, uint32_t b, uint32_t t,
                 uint64_t* page, uint64_t* token) {
  if (c.block_tokens % c.page_size == 0) {  // entries are page indices
    *page = table[b * (c.block_tokens / c.page_size) + t / c.page_size];
    *token = t % c.page_size;
  } else if (c.page_size % c.block_tokens == 0) {  // one entry: page * blocks_per_page + k
    const int32_t e = table[b];
    *page = e / (c.page_size / c.block_tokens);
    *token = (e % (c.page_size / c.block_tokens)) * c.block_tokens + t;
  } else {
    const Chunking ch = NaiveChunking(c);
    const int32_t e = table[b * ch.per_block + t / ch.tokens];
    *page = e / ch.per_page;
    *token = (e % ch.per_page) * ch.tokens + t % ch.tokens;
  }
}

// Element index in the tensor holding `kv` (the combined tensor or the K / V tensor),
// straight from the shapes [N][2][P][H][D], [N][2][H][P][D], [N][P][H][D], [N][H][P][D].
uint64_t NaiveCacheIndex(const Case& c, uint32_t kv, uint64_t page, uint64_t token, uint64_t head,
                         uint64_t d) {
  const uint64_t P = c.page_size, H = c.heads, D = c.head_dim;
  if (c.combined) {
    if (c.layout == PagedLayout::kNHD) return (((page * 2 + kv) * P + token) * H + head) * D + d;
    return (((page * 2 + kv) * H + head) * P + token) * D + d;
  }
  if (c.layout == PagedLayout::kNHD) return ((page * P + token) * H + head) * D + d;
  return ((page * H + head) * P + token) * D + d;
}

// One engine cache: one tensor (combined) or two.
struct Cache {
  std::vector<unsigned char> k, v;
  void* kp() { return k.data(); }
  void* vp() { return v.empty() ? nullptr : v.data(); }
  unsigned char* Tensor(const Case& c, uint32_t kv) {
    return (kv == 1 && !c.combined) ? v.data() : k.data();
  }
};

struct Setup {
  PagedCacheDesc desc;
  uint32_t elem = 0;
  uint64_t slot_bytes = 0;
  std::vector<int32_t> table;
  Cache cache;  // random
  std::vector<std::vector<unsigned char>> slots;
};

Cache PoisonedCache(const Case& c, uint32_t num_pages) {
  const uint64_t tensor_bytes = uint64_t{num_pages} * c.page_size * c.heads * c.head_dim *
                                DTypeBytes(c.dtype) * (c.combined ? 2 : 1);
  Cache cache;
  cache.k.assign(tensor_bytes, kPoison);
  if (!c.combined) cache.v.assign(tensor_bytes, kPoison);
  return cache;
}

// Random cache with spare pages, a random table of distinct chunks in random order.
Setup MakeSetup(const Case& c, std::mt19937_64& rng) {
  Setup s;
  const Chunking ch = NaiveChunking(c);
  const uint64_t needed = uint64_t{c.num_blocks} * ch.per_block;
  const uint64_t spare = 1 + rng() % ch.per_page;  // unused chunks: about a page
  const uint32_t num_pages =
      static_cast<uint32_t>((needed + spare + ch.per_page - 1) / ch.per_page);
  s.desc.layout = c.layout;
  s.desc.kv_combined = c.combined;
  s.desc.dtype = c.dtype;
  s.desc.num_pages = num_pages;
  s.desc.page_size = c.page_size;
  s.desc.num_kv_heads = c.heads;
  s.desc.head_dim = c.head_dim;
  s.desc.block_tokens = c.block_tokens;
  s.elem = DTypeBytes(c.dtype);
  s.slot_bytes = 2ull * c.heads * c.block_tokens * c.head_dim * s.elem;
  std::vector<int32_t> all(uint64_t{num_pages} * ch.per_page);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  s.table.assign(all.begin(), all.begin() + needed);
  s.cache = PoisonedCache(c, num_pages);
  FillRandom(&s.cache.k, rng());
  if (!c.combined) FillRandom(&s.cache.v, rng());
  s.slots.assign(c.num_blocks, std::vector<unsigned char>(s.slot_bytes, kPoison));
  return s;
}

void CopyElement(unsigned char* dst, const unsigned char* src, uint32_t elem) {
  switch (elem) {
    case 1:
      *dst = *src;
      return;
    case 2:
      std::memcpy(dst, src, 2);
      return;
    default:
      std::memcpy(dst, src, 4);
      return;
  }
}

// Naive gather (cache -> slots) or scatter (slots -> cache), element by element.
void NaiveCopy(const Case& c, const std::vector<int32_t>& table, Cache* cache,
               std::vector<std::vector<unsigned char>>* slots, bool to_cache) {
  const uint32_t elem = DTypeBytes(c.dtype);
  for (uint32_t b = 0; b < c.num_blocks; ++b) {
    for (uint32_t kv = 0; kv < 2; ++kv) {
      unsigned char* tensor = cache->Tensor(c, kv);
      for (uint32_t h = 0; h < c.heads; ++h) {
        for (uint32_t t = 0; t < c.block_tokens; ++t) {
          uint64_t page, token;
          NaiveLocate(c, table, b, t, &page, &token);
          for (uint32_t d = 0; d < c.head_dim; ++d) {
            unsigned char* in_cache = tensor + NaiveCacheIndex(c, kv, page, token, h, d) * elem;
            unsigned char* in_slot =
                (*slots)[b].data() +
                ((((uint64_t{kv} * c.heads + h) * c.block_tokens) + t) * c.head_dim + d) * elem;
            if (to_cache) {
              CopyElement(in_cache, in_slot, elem);
            } else {
              CopyElement(in_slot, in_cache, elem);
            }
          }
        }
      }
    }
  }
}

std::vector<void*> SlotPointers(std::vector<std::vector<unsigned char>>& slots) {
  std::vector<void*> p;
  for (auto& s : slots) p.push_back(s.data());
  return p;
}

// Gather vs naive; scatter of random slots into a poisoned cache vs naive; gather of
// that cache returns the slots; gather-then-scatter reproduces the covered rows.
void RunCase(const Case& c, std::mt19937_64& rng) {
  SCOPED_TRACE(c.ToString());
  Setup s = MakeSetup(c, rng);
  ASSERT_EQ(s.table.size(), uint64_t{c.num_blocks} * PageTableEntriesPerBlock(s.desc));

  // Gather.
  std::vector<void*> slot_ptrs = SlotPointers(s.slots);
  ASSERT_TRUE(GatherBlocksRef(s.desc, s.cache.kp(), s.cache.vp(), s.table.data(), c.num_blocks,
                              slot_ptrs.data(), nullptr)
                  .ok());
  std::vector<std::vector<unsigned char>> want(c.num_blocks,
                                               std::vector<unsigned char>(s.slot_bytes, kPoison));
  NaiveCopy(c, s.table, &s.cache, &want, /*to_cache=*/false);
  for (uint32_t b = 0; b < c.num_blocks; ++b) {
    ASSERT_TRUE(s.slots[b] == want[b]) << "gather: block " << b << " differs";
  }

  // Gather then scatter into a fresh poisoned cache: the covered rows come back exactly,
  // the rest stays poisoned.
  Cache back = PoisonedCache(c, s.desc.num_pages);
  std::vector<const void*> const_ptrs(slot_ptrs.begin(), slot_ptrs.end());
  ASSERT_TRUE(ScatterBlocksRef(s.desc, back.kp(), back.vp(), s.table.data(), c.num_blocks,
                               const_ptrs.data(), nullptr)
                  .ok());
  Cache want_back = PoisonedCache(c, s.desc.num_pages);
  // want holds the naive gather of the original cache, so want_back holds the original
  // bytes wherever a block maps, poison elsewhere.
  NaiveCopy(c, s.table, &want_back, &want, /*to_cache=*/true);
  ASSERT_TRUE(back.k == want_back.k) << "gather then scatter: cache (K or combined) differs";
  ASSERT_TRUE(back.v == want_back.v) << "gather then scatter: V cache differs";
  // Scatter fresh random slots into a poisoned cache, then gather them back.
  for (auto& slot : s.slots) FillRandom(&slot, rng());
  Cache scattered = PoisonedCache(c, s.desc.num_pages);
  ASSERT_TRUE(ScatterBlocksRef(s.desc, scattered.kp(), scattered.vp(), s.table.data(), c.num_blocks,
                               const_ptrs.data(), nullptr)
                  .ok());
  Cache want_scattered = PoisonedCache(c, s.desc.num_pages);
  NaiveCopy(c, s.table, &want_scattered, &s.slots, /*to_cache=*/true);
  ASSERT_TRUE(scattered.k == want_scattered.k && scattered.v == want_scattered.v)
      << "scatter of random slots differs from naive";
  std::vector<std::vector<unsigned char>> again(c.num_blocks,
                                                std::vector<unsigned char>(s.slot_bytes, kPoison));
  std::vector<void*> again_ptrs = SlotPointers(again);
  ASSERT_TRUE(GatherBlocksRef(s.desc, scattered.kp(), scattered.vp(), s.table.data(), c.num_blocks,
                              again_ptrs.data(), nullptr)
                  .ok());
  for (uint32_t b = 0; b < c.num_blocks; ++b) {
    ASSERT_TRUE(again[b] == s.slots[b]) << "scatter then gather: block " << b << " differs";
  }
}

class PagedCopyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    RecordProperty("seed", std::to_string(seed_));
  }
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

TEST_F(PagedCopyTest, RefMatchesNaiveAcrossLayoutsDtypesAndShapes) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (PagedLayout layout : {PagedLayout::kNHD, PagedLayout::kHND}) {
    for (bool combined : {true, false}) {
      for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3}) {
        for (uint32_t head_dim : {64u, 128u, 256u}) {
          for (uint32_t heads : {1u, 2u, 8u}) {
            for (uint32_t block_tokens : {16u, 128u, 256u}) {
              for (uint32_t page_size : {16u, block_tokens, 2 * block_tokens}) {
                // Several blocks where they are small; one where a block is large
                // (up to 4 MiB), to keep the sweep quick under sanitizers.
                const uint32_t blocks = heads * block_tokens * head_dim <= 32768 ? 3 : 1;
                Case c{layout, combined, dtype, head_dim, heads, block_tokens, page_size, blocks};
                RunCase(c, rng_);
                if (HasFatalFailure()) return;
              }
            }
          }
        }
      }
    }
  }
}

// Page sizes off the common grid: token-granular pools (SGLang, page_size 1), pages
// that are neither a divisor nor a multiple of the block, odd head dims and GQA-7-ish
// head counts, more blocks.
TEST_F(PagedCopyTest, RefMatchesNaiveOnOddGeometry) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const Case cases[] = {
      {PagedLayout::kNHD, false, DType::kBF16, 128, 8, 16, 1, 5},
      {PagedLayout::kHND, true, DType::kF16, 64, 1, 32, 1, 3},
      {PagedLayout::kNHD, true, DType::kF32, 64, 2, 128, 48, 3},   // 16-token chunks
      {PagedLayout::kHND, false, DType::kF16, 128, 7, 16, 24, 4},  // 8-token chunks
      {PagedLayout::kHND, true, DType::kBF16, 96, 3, 64, 512, 9},  // 8 blocks per page
      {PagedLayout::kNHD, false, DType::kFP8E4M3, 3, 5, 20, 10, 6},
      {PagedLayout::kHND, false, DType::kF16, 1, 1, 1, 1, 7},
      {PagedLayout::kNHD, true, DType::kBF16, 128, 8, 128, 16, 40},
  };
  for (const Case& c : cases) {
    RunCase(c, rng_);
    if (HasFatalFailure()) return;
  }
}

// The chunk rule in the header's two worked cases and the gcd fallback.
TEST(PagedLayoutTest, PageTableEntriesPerBlock) {
  auto entries = [](uint32_t page_size, uint32_t block_tokens) {
    PagedCacheDesc d;
    d.page_size = page_size;
    d.block_tokens = block_tokens;
    return PageTableEntriesPerBlock(d);
  };
  EXPECT_EQ(entries(16, 128), 8u);
  EXPECT_EQ(entries(1, 256), 256u);
  EXPECT_EQ(entries(128, 128), 1u);
  EXPECT_EQ(entries(512, 128), 1u);
  EXPECT_EQ(entries(48, 128), 8u);
  PagedCacheDesc d;
  d.num_pages = 10;
  d.page_size = 512;
  d.num_kv_heads = 8;
  d.head_dim = 128;
  d.block_tokens = 128;
  const PagedGeometry g = MakePagedGeometry(d);
  EXPECT_EQ(g.chunk_tokens, 128u);
  EXPECT_EQ(g.chunks_per_page, 4u);
  EXPECT_EQ(g.num_chunks, 40u);
  EXPECT_TRUE(PagedChunkValid(g, 39));
  EXPECT_FALSE(PagedChunkValid(g, 40));
  EXPECT_FALSE(PagedChunkValid(g, -1));
}

TEST(PagedLayoutTest, DescriptorFromModelLayout) {
  const ModelLayout model = ModelLayout::Llama3_8B();
  const PagedCacheDesc d = MakePagedCacheDesc(model, PagedLayout::kHND, true, 16, 1000);
  EXPECT_EQ(d.layout, PagedLayout::kHND);
  EXPECT_TRUE(d.kv_combined);
  EXPECT_EQ(d.dtype, model.dtype);
  EXPECT_EQ(d.num_pages, 1000u);
  EXPECT_EQ(d.page_size, 16u);
  EXPECT_EQ(d.num_kv_heads, model.num_kv_heads);
  EXPECT_EQ(d.head_dim, model.head_dim);
  EXPECT_EQ(d.block_tokens, model.block_tokens);
  EXPECT_TRUE(ValidatePagedCacheDesc(d).ok());
  EXPECT_EQ(PageTableEntriesPerBlock(d), model.block_tokens / 16);
}

// Offsets spelled out for FlashInfer's combined NHD tensor [N][2][P][H][D] and the HND
// one [N][2][H][P][D].
TEST(PagedLayoutTest, RowOffsetsOfTheDocumentedShapes) {
  PagedCacheDesc d;
  d.layout = PagedLayout::kNHD;
  d.kv_combined = true;
  d.dtype = DType::kF16;
  d.num_pages = 100;
  d.page_size = 16;
  d.num_kv_heads = 8;
  d.head_dim = 128;
  d.block_tokens = 64;  // 4 pages per block
  PagedGeometry g = MakePagedGeometry(d);
  // Values (kv 1), head 3, token 37 of the block: entry 37 / 16 = 2 names page 7,
  // token 5 of it.
  EXPECT_EQ(PagedRowOffset(g, 1, 7, 37, 3), (((7ull * 2 + 1) * 16 + 5) * 8 + 3) * 128);
  d.layout = PagedLayout::kHND;
  g = MakePagedGeometry(d);
  EXPECT_EQ(PagedRowOffset(g, 1, 7, 37, 3), (((7ull * 2 + 1) * 8 + 3) * 16 + 5) * 128);
  EXPECT_EQ(BlockRowOffset(g, 1, 3, 37), ((1ull * 8 + 3) * 64 + 37) * 128);
}

// vLLM's flash-attn backend: one allocation [2][N][P][H][D], unbound into key and value
// caches, is the separate layout with v_base = k_base + N*P*H*D elements.
TEST_F(PagedCopyTest, VllmUnboundKvTensor) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const uint32_t N = 37, P = 16, H = 4, D = 64, bt = 32, blocks = 5;
  std::vector<unsigned char> kv(2ull * N * P * H * D * 2);  // bf16
  FillRandom(&kv, rng_());
  PagedCacheDesc d;
  d.layout = PagedLayout::kNHD;
  d.dtype = DType::kBF16;
  d.num_pages = N;
  d.page_size = P;
  d.num_kv_heads = H;
  d.head_dim = D;
  d.block_tokens = bt;
  std::vector<int32_t> pages(N);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), rng_);
  pages.resize(blocks * bt / P);
  std::vector<std::vector<unsigned char>> slots(blocks,
                                                std::vector<unsigned char>(2ull * H * bt * D * 2));
  std::vector<void*> ptrs = SlotPointers(slots);
  const unsigned char* k_base = kv.data();
  const unsigned char* v_base = kv.data() + uint64_t{N} * P * H * D * 2;
  ASSERT_TRUE(GatherBlocksRef(d, k_base, v_base, pages.data(), blocks, ptrs.data(), nullptr).ok());
  for (uint32_t b = 0; b < blocks; ++b) {
    for (uint32_t kvi = 0; kvi < 2; ++kvi) {
      for (uint32_t h = 0; h < H; ++h) {
        for (uint32_t t = 0; t < bt; ++t) {
          const uint64_t page = pages[b * (bt / P) + t / P];
          for (uint32_t e = 0; e < D; ++e) {
            const uint64_t src = ((((uint64_t{kvi} * N + page) * P + t % P) * H + h) * D + e) * 2;
            const uint64_t dst = (((uint64_t{kvi} * H + h) * bt + t) * D + e) * 2;
            ASSERT_EQ(std::memcmp(&kv[src], &slots[b][dst], 2), 0)
                << "block " << b << " kv " << kvi << " head " << h << " token " << t;
          }
        }
      }
    }
  }
}

// An engine's view: a sequence whose token s sits at page pages[s / P], position s % P,
// pages in random order. Its kvtier blocks, with entries from PagedChunkIndex, gather
// into the sequence's tokens in order, whatever the page size.
TEST_F(PagedCopyTest, GathersASequenceStoredInRandomPages) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const uint32_t H = 2, D = 64, bt = 128, blocks = 3, tokens = blocks * bt;
  auto value = [](uint64_t s, uint32_t kv, uint32_t h, uint32_t d) {
    return static_cast<uint16_t>((s * 7919 + kv * 104729 + h * 1299709 + d * 31) % 65521);
  };
  for (uint32_t P : {1u, 16u, 48u, 128u, 256u, 512u}) {
    for (PagedLayout layout : {PagedLayout::kNHD, PagedLayout::kHND}) {
      SCOPED_TRACE("page_size " + std::to_string(P));
      Case c{layout, /*combined=*/true, DType::kF16, D, H, bt, P, blocks};
      const uint32_t seq_pages = (tokens + P - 1) / P;
      const uint32_t N = seq_pages + 5;
      std::vector<int32_t> order(N);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng_);
      const std::vector<uint32_t> pages(order.begin(), order.begin() + seq_pages);
      Cache cache = PoisonedCache(c, N);
      for (uint64_t s = 0; s < tokens; ++s) {
        for (uint32_t kv = 0; kv < 2; ++kv) {
          for (uint32_t h = 0; h < H; ++h) {
            for (uint32_t d = 0; d < D; ++d) {
              const uint16_t v = value(s, kv, h, d);
              std::memcpy(&cache.k[NaiveCacheIndex(c, kv, pages[s / P], s % P, h, d) * 2], &v, 2);
            }
          }
        }
      }
      PagedCacheDesc desc;
      desc.layout = layout;
      desc.kv_combined = true;
      desc.dtype = DType::kF16;
      desc.num_pages = N;
      desc.page_size = P;
      desc.num_kv_heads = H;
      desc.head_dim = D;
      desc.block_tokens = bt;
      const PagedGeometry g = MakePagedGeometry(desc);
      std::vector<int32_t> table;
      for (uint32_t b = 0; b < blocks; ++b) {
        for (uint32_t j = 0; j < g.chunks_per_block; ++j) {
          const uint64_t s = uint64_t{b} * bt + uint64_t{j} * g.chunk_tokens;
          table.push_back(PagedChunkIndex(g, pages[s / P], s % P));
        }
      }
      std::vector<std::vector<unsigned char>> slots(
          blocks, std::vector<unsigned char>(2ull * H * bt * D * 2, kPoison));
      std::vector<void*> ptrs = SlotPointers(slots);
      ASSERT_TRUE(
          GatherBlocksRef(desc, cache.kp(), nullptr, table.data(), blocks, ptrs.data(), nullptr)
              .ok());
      for (uint32_t b = 0; b < blocks; ++b) {
        for (uint32_t kv = 0; kv < 2; ++kv) {
          for (uint32_t h = 0; h < H; ++h) {
            for (uint32_t t = 0; t < bt; ++t) {
              for (uint32_t d = 0; d < D; ++d) {
                uint16_t got;
                std::memcpy(&got, &slots[b][(((uint64_t{kv} * H + h) * bt + t) * D + d) * 2], 2);
                ASSERT_EQ(got, value(uint64_t{b} * bt + t, kv, h, d))
                    << "block " << b << " kv " << kv << " head " << h << " token " << t;
              }
            }
          }
        }
      }
    }
  }
}

// A minimal valid setup for the argument checks.
struct Small {
  PagedCacheDesc desc;
  std::vector<unsigned char> k, v;
  std::vector<int32_t> table;
  std::vector<std::vector<unsigned char>> slots;
  std::vector<void*> ptrs;
  std::vector<const void*> cptrs;
  Small() {
    desc.layout = PagedLayout::kNHD;
    desc.dtype = DType::kF16;
    desc.num_pages = 8;
    desc.page_size = 16;
    desc.num_kv_heads = 2;
    desc.head_dim = 64;
    desc.block_tokens = 32;
    k.assign(8 * 16 * 2 * 64 * 2, 1);
    v.assign(k.size(), 2);
    table = {3, 1, 6, 0};  // 2 blocks of 2 pages
    slots.assign(2, std::vector<unsigned char>(2 * 2 * 32 * 64 * 2, kPoison));
    for (auto& s : slots) {
      ptrs.push_back(s.data());
      cptrs.push_back(s.data());
    }
  }
  Status Gather(const PagedCacheDesc& d, uint32_t n = 2) {
    return GatherBlocksRef(d, k.data(), v.data(), table.data(), n, ptrs.data(), nullptr);
  }
  Status Scatter(const PagedCacheDesc& d, uint32_t n = 2) {
    return ScatterBlocksRef(d, k.data(), v.data(), table.data(), n, cptrs.data(), nullptr);
  }
  bool SlotsUntouched() const {
    for (const auto& s : slots) {
      if (std::any_of(s.begin(), s.end(), [](unsigned char x) { return x != kPoison; })) {
        return false;
      }
    }
    return true;
  }
};

TEST(PagedCopyArgsTest, RejectsBadDescriptors) {
  Small s;
  ASSERT_TRUE(s.Gather(s.desc).ok());
  auto expect_invalid = [&](PagedCacheDesc d, const char* what) {
    SCOPED_TRACE(what);
    Small fresh;
    Status g = fresh.Gather(d);
    EXPECT_TRUE(g.IsInvalidArgument()) << g.ToString();
    EXPECT_NE(g.message().find("GatherBlocks"), std::string::npos) << g.message();
    EXPECT_TRUE(fresh.SlotsUntouched());
    EXPECT_TRUE(fresh.Scatter(d).IsInvalidArgument());
    EXPECT_TRUE(ValidatePagedCacheDesc(d).IsInvalidArgument());
  };
  PagedCacheDesc d = s.desc;
  d.num_pages = 0;
  expect_invalid(d, "num_pages 0");
  d = s.desc;
  d.page_size = 0;
  expect_invalid(d, "page_size 0");
  d = s.desc;
  d.num_kv_heads = 0;
  expect_invalid(d, "heads 0");
  d = s.desc;
  d.head_dim = 0;
  expect_invalid(d, "head_dim 0");
  d = s.desc;
  d.block_tokens = 0;
  expect_invalid(d, "block_tokens 0");
  d = s.desc;
  d.dtype = static_cast<DType>(9);
  expect_invalid(d, "unknown dtype");
  d = s.desc;
  d.layout = static_cast<PagedLayout>(5);
  expect_invalid(d, "unknown layout");
  d = s.desc;
  d.head_dim = 0xFFFFFFFFu;
  d.num_kv_heads = 0xFFFFFFFFu;
  expect_invalid(d, "overflowing row");
  d = s.desc;
  d.block_tokens = 1u << 20;  // 2 * 64 heads * 2^20 tokens * 128 B = 16 GiB
  d.num_kv_heads = 64;
  expect_invalid(d, "block above kMaxBlockBytes");
  d = s.desc;
  d.num_pages = 0xFFFFFFFFu;
  d.page_size = 0xFFFFFFFFu;
  expect_invalid(d, "cache size overflows");
}

TEST(PagedCopyArgsTest, RejectsBadPointers) {
  Small s;
  PagedCacheDesc d = s.desc;
  EXPECT_TRUE(GatherBlocksRef(d, nullptr, s.v.data(), s.table.data(), 2, s.ptrs.data(), nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(GatherBlocksRef(d, s.k.data(), nullptr, s.table.data(), 2, s.ptrs.data(), nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(GatherBlocksRef(d, s.k.data(), s.k.data(), s.table.data(), 2, s.ptrs.data(), nullptr)
                  .IsInvalidArgument());
  // Overlapping K and V tensors.
  EXPECT_TRUE(
      GatherBlocksRef(d, s.k.data(), s.k.data() + 64, s.table.data(), 2, s.ptrs.data(), nullptr)
          .IsInvalidArgument());
  EXPECT_TRUE(
      GatherBlocksRef(d, s.k.data() + 64, s.k.data(), s.table.data(), 2, s.ptrs.data(), nullptr)
          .IsInvalidArgument());
  EXPECT_TRUE(GatherBlocksRef(d, s.k.data(), s.v.data(), nullptr, 2, s.ptrs.data(), nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(GatherBlocksRef(d, s.k.data(), s.v.data(), s.table.data(), 2, nullptr, nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(ScatterBlocksRef(d, s.k.data(), s.v.data(), s.table.data(), 2, nullptr, nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(ScatterBlocksRef(d, nullptr, s.v.data(), s.table.data(), 2, s.cptrs.data(), nullptr)
                  .IsInvalidArgument());
  // Combined: v_base must be null or k_base.
  d.kv_combined = true;
  std::vector<unsigned char> both(s.k.size() * 2, 3);
  EXPECT_TRUE(GatherBlocksRef(d, both.data(), s.v.data(), s.table.data(), 2, s.ptrs.data(), nullptr)
                  .IsInvalidArgument());
  EXPECT_TRUE(
      GatherBlocksRef(d, both.data(), nullptr, s.table.data(), 2, s.ptrs.data(), nullptr).ok());
  EXPECT_TRUE(
      GatherBlocksRef(d, both.data(), both.data(), s.table.data(), 2, s.ptrs.data(), nullptr).ok());
  EXPECT_TRUE(s.slots[0][0] == 3);
  // Zero blocks: a no-op, even with null table and slots.
  d.kv_combined = false;
  EXPECT_TRUE(GatherBlocksRef(d, s.k.data(), s.v.data(), nullptr, 0, nullptr, nullptr).ok());
  EXPECT_TRUE(ScatterBlocksRef(d, s.k.data(), s.v.data(), nullptr, 0, nullptr, nullptr).ok());
}

TEST(PagedCopyArgsTest, RejectsBadTableEntriesAndSlotsWritingNothing) {
  for (int32_t bad : {-1, 8, 1 << 30}) {
    SCOPED_TRACE("entry " + std::to_string(bad));
    Small s;
    s.table[3] = bad;  // block 1, entry 1
    const std::vector<unsigned char> k0 = s.k, v0 = s.v;
    Status g = s.Gather(s.desc);
    EXPECT_TRUE(g.IsInvalidArgument()) << g.ToString();
    EXPECT_NE(g.message().find("block 1"), std::string::npos) << g.message();
    EXPECT_NE(g.message().find(std::to_string(bad)), std::string::npos) << g.message();
    EXPECT_TRUE(s.SlotsUntouched());
    Status sc = s.Scatter(s.desc);
    EXPECT_TRUE(sc.IsInvalidArgument()) << sc.ToString();
    EXPECT_TRUE(s.k == k0 && s.v == v0) << "scatter wrote before failing";
  }
  Small s;
  s.ptrs[1] = nullptr;
  s.cptrs[1] = nullptr;
  Status g = s.Gather(s.desc);
  EXPECT_TRUE(g.IsInvalidArgument());
  EXPECT_NE(g.message().find("null slot"), std::string::npos) << g.message();
  EXPECT_TRUE(s.SlotsUntouched());
  EXPECT_TRUE(s.Scatter(s.desc).IsInvalidArgument());
}

TEST(PagedCopyArgsTest, LaunchWithoutCudaIsNotSupported) {
  if (cuda::BuiltWithCuda()) GTEST_SKIP() << "built with CUDA: see paged_copy_gpu_test";
  Small s;
  EXPECT_EQ(
      LaunchGatherBlocks(s.desc, s.k.data(), s.v.data(), s.table.data(), 2, s.ptrs.data(), nullptr)
          .code(),
      StatusCode::kNotSupported);
  EXPECT_EQ(LaunchScatterBlocks(s.desc, s.k.data(), s.v.data(), s.table.data(), 2, s.cptrs.data(),
                                nullptr)
                .code(),
            StatusCode::kNotSupported);
}

}  // namespace
}  // namespace kvtier
