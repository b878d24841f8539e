// Store::PutFromPagedCache on a real GPU: the engine's cache in device memory, gathered
// by the kernel straight into the CUDA-pinned host tier. Skips without a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kvtier/store.h"
#include "tests/store_paged_test.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {
namespace {

TEST(StorePagedGpuTest, GathersFromDeviceMemory) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  const ModelLayout layout = ModelLayout::Llama3_8B();
  StoreOptions o;
  o.host_capacity_bytes = 64 * layout.BytesPerBlock();
  auto store = Store::Open(o, layout);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  ASSERT_EQ((*store)->Stats().host_memory, HostMemoryKind::kCudaPinned);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (PagedLayout pl : {PagedLayout::kNHD, PagedLayout::kHND}) {
    for (bool combined : {false, true}) {
      const uint32_t pages = 256, page_size = 16;
      testing::HostPagedCache cache(layout, pl, combined, page_size, pages, rng());
      void* dk = nullptr;
      void* dv = nullptr;
      ASSERT_EQ(cudaMalloc(&dk, cache.k.size()), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(dk, cache.k.data(), cache.k.size(), cudaMemcpyHostToDevice),
                cudaSuccess);
      if (!combined) {
        ASSERT_EQ(cudaMalloc(&dv, cache.v.size()), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(dv, cache.v.data(), cache.v.size(), cudaMemcpyHostToDevice),
                  cudaSuccess);
      }
      std::vector<int32_t> order(pages);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng);
      const uint32_t per_block = layout.block_tokens / page_size, n = 16;
      std::vector<int32_t> table(order.begin(), order.begin() + n * per_block);
      std::vector<BlockKey> keys;
      for (uint32_t i = 0; i < n; ++i) {
        keys.push_back(BlockKey{.sequence = {0, 9}, .layer = i % 32, .block = i});
      }
      std::vector<Status> statuses(n);
      Status s = (*store)->PutFromPagedCache(keys, cache.desc, dk, dv, table, nullptr, statuses);
      ASSERT_TRUE(s.ok()) << s.ToString();
      std::vector<std::byte> out(layout.BytesPerBlock());
      for (uint32_t i = 0; i < n; ++i) {
        ASSERT_TRUE((*store)->Get(keys[i], out.data(), out.size()).ok());
        std::vector<int32_t> of(table.begin() + i * per_block, table.begin() + (i + 1) * per_block);
        ASSERT_EQ(out, cache.ExpectedBlock(of)) << "block " << i;
      }
      cudaFree(dk);
      if (dv != nullptr) cudaFree(dv);
    }
  }
#endif
}

}  // namespace
}  // namespace kvtier
