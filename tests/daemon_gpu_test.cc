// A client's GPU tier fed by a kvtierd process (the direct path, PROTOCOL.md "Direct
// copies into a client's GPU tier"), across two processes as an engine runs it. With a
// GPU the tier is one cudaMalloc allocation that the daemon opens by its CUDA IPC handle
// and copies into on a stream of its own; without one, the emulated tier (a memfd the
// daemon maps). The same tests run either way, and read the tier back with cudaMemcpy
// or memcpy: the blocks' bytes at the addresses Acquire returns, copied by the daemon
// (device_direct_blocks), fresh after an overwrite, and again after the daemon restarts
// (a new process: a new IPC mapping). Then the staging path, which the client copies
// up itself (page-locked buffers and cudaMemcpyAsync with a GPU), and PutFromPagedCache
// from an engine's paged cache (in device memory with a GPU: the gather kernel).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kvtier/client.h"
#include "kvtier/store.h"
#include "tests/client_test_util.h"
#include "tests/daemon_process.h"
#include "tests/store_paged_test.h"
#include "tests/test_util.h"

namespace kvtier {
namespace {

using testing::Daemon;
using testing::SmallLayout;

class DaemonGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvtierd-gpu-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    gpu_ = cuda::HasDevice();
    if (!gpu_) {
      std::printf("[ NOTE     ] no CUDA device: the GPU tier is emulated in host memory\n");
    }
  }
  void TearDown() override { testing::fs::remove_all(dir_); }

  // Retrieval as both sides see it (the GPU tier comes with it).
  static void SetRetrieval(RetrievalOptions* r) {
    r->enabled = true;
    r->top_k = 4;
    r->n_init = 16;
    r->n_local = 32;
  }
  static std::string RetrievalToml() {
    return "[retrieval]\nenabled = true\ntop_k = 4\nn_init = 16\nn_local = 32\n";
  }

  // A client of `d` with a GPU tier of 16 blocks: on the GPU when there is one.
  std::unique_ptr<Store> Connect(const Daemon& d, bool direct) {
    StoreOptions o;
    o.sidecar.socket = d.socket();
    o.sidecar.max_backoff_ms = 50;
    o.sidecar.staging_blocks = 16;
    o.sidecar.direct_device = direct;
    SetRetrieval(&o.retrieval);
    o.retrieval.device_capacity_bytes = 16 * layout_.BytesPerBlock();
    auto s = Store::Open(o, layout_);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (!s.ok()) return nullptr;
    EXPECT_EQ((*s)->Stats().device_emulated, !gpu_);
    return std::move(*s);
  }

  // Blocks 0..n-1 of layer 0 with fresh random bytes.
  std::vector<std::vector<std::byte>> PutBlocks(Store& store, uint32_t n) {
    std::vector<std::vector<std::byte>> blocks;
    for (uint32_t b = 0; b < n; ++b) {
      blocks.push_back(testing::RandomBlock(layout_.BytesPerBlock(), rng_));
      EXPECT_TRUE(store.Put(Key(b), blocks.back().data(), blocks.back().size()).ok());
    }
    return blocks;
  }
  BlockKey Key(uint32_t block) const {
    return BlockKey{.namespace_id = 0, .sequence = sequence_, .layer = 0, .block = block};
  }

  // Acquires `want`, checks every block's bytes in the tier against blocks[want[i]], and
  // releases.
  void AcquireAndCheck(Store& store, const std::vector<std::vector<std::byte>>& blocks,
                       const std::vector<int64_t>& want) {
    std::vector<uint64_t> addresses(want.size());
    auto a = store.Acquire(0, sequence_, 0, want, nullptr, addresses);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_NE(addresses[i], 0u);
      std::vector<std::byte> got(layout_.BytesPerBlock());
      const void* tier = reinterpret_cast<const void*>(addresses[i]);
      if (gpu_) {
        // The legacy default stream: after the copies Acquire ordered before it.
        const Status s = cuda::Memcpy(got.data(), tier, got.size());
        ASSERT_TRUE(s.ok()) << s.ToString();
      } else {
        std::memcpy(got.data(), tier, got.size());
      }
      EXPECT_TRUE(got == blocks[want[i]]) << "block " << want[i];
    }
    ASSERT_TRUE(store.Release(a->lease).ok());
  }

  testing::fs::path dir_;
  bool gpu_ = false;
  const ModelLayout layout_ = SmallLayout();
  const SequenceId sequence_ = SequenceId::FromU64(42);
  std::mt19937_64 rng_{20261203};
};

TEST_F(DaemonGpuTest, TheDaemonCopiesMissesIntoTheClientsTierAcrossProcesses) {
  Daemon d(dir_, RetrievalToml());
  ASSERT_TRUE(d.Start());
  auto store = Connect(d, /*direct=*/true);
  ASSERT_NE(store, nullptr);
  std::optional<SidecarStatus> status = GetSidecarStatus(*store);
  ASSERT_TRUE(status.has_value());
  ASSERT_TRUE(status->direct_device) << status->direct_device_error;
  auto blocks = PutBlocks(*store, 8);

  AcquireAndCheck(*store, blocks, {0, 1, 2});
  EXPECT_EQ(store->Stats().device_direct_blocks, 3u);
  AcquireAndCheck(*store, blocks, {2, 0, 5});  // two hits, one more miss
  EXPECT_EQ(store->Stats().device_direct_blocks, 4u);

  // Overwritten by this client: the tier's copy is dropped, the new bytes copied in.
  blocks[1] = testing::RandomBlock(layout_.BytesPerBlock(), rng_);
  ASSERT_TRUE(store->Put(Key(1), blocks[1].data(), blocks[1].size()).ok());
  AcquireAndCheck(*store, blocks, {1});
  EXPECT_EQ(store->Stats().device_direct_blocks, 5u);

  // A new daemon process (the blocks come back from its disk tier): the client
  // registers its tier again, and the new process maps it afresh.
  ASSERT_TRUE(store->Flush().ok());
  EXPECT_EQ(d.Kill(SIGTERM), 0) << d.ReadLog();
  ASSERT_TRUE(d.Start());
  ASSERT_TRUE(testing::Eventually([&] {
    std::optional<SidecarStatus> s = GetSidecarStatus(*store);
    return s->connected && s->direct_device;
  })) << GetSidecarStatus(*store)->direct_device_error;
  AcquireAndCheck(*store, blocks, {3, 4, 6, 7});
  EXPECT_EQ(store->Stats().device_direct_blocks, 9u);
  store.reset();
  EXPECT_EQ(d.Kill(SIGTERM), 0) << d.ReadLog();
}

TEST_F(DaemonGpuTest, WithoutRegistrationTheClientCopiesUpFromStaging) {
  Daemon d(dir_, RetrievalToml());
  ASSERT_TRUE(d.Start());
  auto store = Connect(d, /*direct=*/false);
  ASSERT_NE(store, nullptr);
  EXPECT_FALSE(GetSidecarStatus(*store)->direct_device);
  const auto blocks = PutBlocks(*store, 8);
  AcquireAndCheck(*store, blocks, {0, 7, 3});
  AcquireAndCheck(*store, blocks, {7, 1});
  const StoreStats s = store->Stats();
  EXPECT_EQ(s.device_direct_blocks, 0u);
  EXPECT_EQ(s.device_fetches_host + s.device_fetches_disk, 4u);
  EXPECT_EQ(s.device_hits, 1u);
  store.reset();
  EXPECT_EQ(d.Kill(SIGTERM), 0) << d.ReadLog();
}

// The engine's paged cache (in device memory when there is a GPU) gathered into blocks
// and put through the daemon: the blocks the documented layout names, in the host tier
// and then in the GPU tier.
TEST_F(DaemonGpuTest, PutFromPagedCacheThroughTheDaemon) {
  Daemon d(dir_, RetrievalToml());
  ASSERT_TRUE(d.Start());
  auto store = Connect(d, /*direct=*/true);
  ASSERT_NE(store, nullptr);
  const testing::HostPagedCache cache(layout_, PagedLayout::kHND, /*combined=*/false,
                                      /*page_size=*/8, /*pages=*/12, rng_());
  const void* k = cache.k.data();
  const void* v = cache.v.data();
  void* device_k = nullptr;
  void* device_v = nullptr;
  if (gpu_) {
    ASSERT_TRUE(cuda::DeviceMalloc(cache.k.size(), &device_k).ok());
    ASSERT_TRUE(cuda::DeviceMalloc(cache.v.size(), &device_v).ok());
    ASSERT_TRUE(cuda::Memcpy(device_k, cache.k.data(), cache.k.size()).ok());
    ASSERT_TRUE(cuda::Memcpy(device_v, cache.v.data(), cache.v.size()).ok());
    k = device_k;
    v = device_v;
  }
  // Three blocks of 16 tokens, two pages each, in no particular order.
  const std::vector<int32_t> table = {5, 0, 11, 3, 7, 8};
  const std::vector<BlockKey> keys = {Key(0), Key(1), Key(2)};
  std::vector<Status> statuses(keys.size());
  const Status put = store->PutFromPagedCache(keys, cache.desc, k, v, table, nullptr, statuses);
  if (gpu_) {
    EXPECT_TRUE(cuda::DeviceFree(device_k).ok());
    EXPECT_TRUE(cuda::DeviceFree(device_v).ok());
  }
  ASSERT_TRUE(put.ok()) << put.ToString();
  std::vector<std::vector<std::byte>> blocks;
  for (size_t b = 0; b < keys.size(); ++b) {
    blocks.push_back(cache.ExpectedBlock({table[2 * b], table[2 * b + 1]}));
    std::vector<std::byte> got(layout_.BytesPerBlock());
    ASSERT_TRUE(store->Get(keys[b], got.data(), got.size()).ok());
    EXPECT_TRUE(got == blocks[b]) << "block " << b;
  }
  AcquireAndCheck(*store, blocks, {2, 0, 1});
  store.reset();
  EXPECT_EQ(d.Kill(SIGTERM), 0) << d.ReadLog();
}

}  // namespace
}  // namespace kvtier
