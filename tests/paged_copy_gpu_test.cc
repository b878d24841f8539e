// LaunchGatherBlocks / LaunchScatterBlocks against their CPU references, byte-exact,
// over layouts (NHD/HND, combined/separate), dtypes and shapes, with poisoned outputs,
// misaligned bases and slots (narrower vectors), random non-contiguous page tables and
// bad entries (the kernel skips that block). Skips without a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/paged_copy.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {
namespace {

struct Case {
  PagedLayout layout = PagedLayout::kNHD;
  bool combined = false;
  DType dtype = DType::kF16;
  uint32_t head_dim = 64;
  uint32_t heads = 1;
  uint32_t block_tokens = 16;
  uint32_t page_size = 16;
  uint32_t num_blocks = 3;
  uint32_t base_misalign_bytes = 0;  // added to the cache tensors' addresses
  uint32_t slot_misalign_bytes = 0;  // added to every slot's address

  std::string ToString() const {
    return std::string(layout == PagedLayout::kNHD ? "NHD" : "HND") +
           (combined ? " combined" : " separate") + " " + std::string(DTypeName(dtype)) +
           " D=" + std::to_string(head_dim) + " H=" + std::to_string(heads) +
           " block_tokens=" + std::to_string(block_tokens) +
           " page_size=" + std::to_string(page_size) + " blocks=" + std::to_string(num_blocks) +
           " base+" + std::to_string(base_misalign_bytes) + " slot+" +
           std::to_string(slot_misalign_bytes);
  }
};

#if KVTIER_WITH_CUDA

constexpr unsigned char kPoison = 0xFF;
constexpr uint64_t kPadBytes = 64;  // poisoned guard bytes after every buffer

void FillRandom(unsigned char* p, uint64_t n, std::mt19937_64& rng) {
  for (uint64_t i = 0; i < n; i += 8) {
    const uint64_t w = rng();
    std::memcpy(p + i, &w, std::min<uint64_t>(8, n - i));
  }
}

// Device memory, freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(uint64_t bytes) : bytes_(bytes) {
    ok_ = cudaMalloc(&ptr_, bytes) == cudaSuccess;
  }
  ~DeviceBuffer() {
    if (ok_) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  bool ok() const { return ok_; }
  unsigned char* get() const { return static_cast<unsigned char*>(ptr_); }
  uint64_t bytes() const { return bytes_; }
  bool Upload(const std::vector<unsigned char>& host) const {
    return cudaMemcpy(ptr_, host.data(), host.size(), cudaMemcpyHostToDevice) == cudaSuccess;
  }
  std::vector<unsigned char> Download() const {
    std::vector<unsigned char> host(bytes_);
    if (cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost) != cudaSuccess) host.clear();
    return host;
  }

 private:
  void* ptr_ = nullptr;
  uint64_t bytes_ = 0;
  bool ok_ = false;
};

// The index of the first byte where a and b (of equal size) differ, or a.size().
uint64_t FirstDifference(const std::vector<unsigned char>& a, const std::vector<unsigned char>& b) {
  return static_cast<uint64_t>(std::mismatch(a.begin(), a.end(), b.begin()).first - a.begin());
}

template <typename T>
bool UploadVector(void* dst, const std::vector<T>& v) {
  return cudaMemcpy(dst, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess;
}

// The geometry of one case: the descriptor (with spare pages), the sizes, and a random
// table of distinct chunks in random order.
struct GpuSetup {
  PagedCacheDesc desc;
  uint64_t tensor_bytes = 0, slot_bytes = 0, slot_pitch = 0;
  std::vector<int32_t> table;
};

GpuSetup MakeSetup(const Case& c, std::mt19937_64& rng) {
  GpuSetup s;
  s.desc.layout = c.layout;
  s.desc.kv_combined = c.combined;
  s.desc.dtype = c.dtype;
  s.desc.page_size = c.page_size;
  s.desc.num_kv_heads = c.heads;
  s.desc.head_dim = c.head_dim;
  s.desc.block_tokens = c.block_tokens;
  const uint32_t chunk = std::gcd(c.page_size, c.block_tokens);
  const uint32_t per_block = c.block_tokens / chunk, per_page = c.page_size / chunk;
  const uint64_t needed = uint64_t{c.num_blocks} * per_block;
  const uint64_t spare = per_block + rng() % 5;
  s.desc.num_pages = static_cast<uint32_t>((needed + spare + per_page - 1) / per_page);
  const uint32_t elem = DTypeBytes(c.dtype);
  s.tensor_bytes =
      uint64_t{s.desc.num_pages} * c.page_size * c.heads * c.head_dim * elem * (c.combined ? 2 : 1);
  s.slot_bytes = 2ull * c.heads * c.block_tokens * c.head_dim * elem;
  s.slot_pitch = (s.slot_bytes + 16 + 255) / 256 * 256;  // room for the misalignment
  std::vector<int32_t> all(uint64_t{s.desc.num_pages} * per_page);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  s.table.assign(all.begin(), all.begin() + needed);
  return s;
}

// Runs gather and scatter on the device and on the host and compares every byte of the
// outputs, guards included. `bad_block` (< num_blocks) gets an invalid table entry or a
// null slot: the kernel must leave it alone and copy the rest; the Ref is then run on
// the other blocks only.
void RunGpuCase(const Case& c, std::mt19937_64& rng, StreamHandle stream = nullptr,
                int64_t bad_block = -1, bool bad_by_null_slot = false) {
  SCOPED_TRACE(c.ToString() + (bad_block >= 0 ? " bad block " + std::to_string(bad_block) : ""));
  GpuSetup s = MakeSetup(c, rng);
  const uint64_t buf_bytes = c.base_misalign_bytes + s.tensor_bytes + kPadBytes;
  DeviceBuffer dk(buf_bytes), dv(c.combined ? 1 : buf_bytes);
  const uint64_t arena_bytes = uint64_t{c.num_blocks} * s.slot_pitch + kPadBytes;
  DeviceBuffer arena(arena_bytes);
  const uint64_t entries = s.table.size();
  DeviceBuffer dtable(entries * sizeof(int32_t)), dslots(c.num_blocks * sizeof(void*));
  ASSERT_TRUE(dk.ok() && dv.ok() && arena.ok() && dtable.ok() && dslots.ok());

  std::vector<int32_t> table = s.table;
  const uint32_t per_block = PageTableEntriesPerBlock(s.desc);
  if (bad_block >= 0 && !bad_by_null_slot) {
    table[bad_block * per_block + rng() % per_block] =
        (rng() & 1) ? -1
                    : static_cast<int32_t>(s.desc.num_pages *
                                           (c.page_size / std::gcd(c.page_size, c.block_tokens)));
  }
  ASSERT_TRUE(UploadVector(dtable.get(), table));
  std::vector<void*> dev_slots(c.num_blocks);
  for (uint32_t b = 0; b < c.num_blocks; ++b) {
    dev_slots[b] = arena.get() + b * s.slot_pitch + c.slot_misalign_bytes;
  }
  if (bad_block >= 0 && bad_by_null_slot) dev_slots[bad_block] = nullptr;
  ASSERT_TRUE(UploadVector(dslots.get(), dev_slots));
  auto good = [&](uint32_t b) { return int64_t{b} != bad_block; };

  // Host mirrors of the device buffers (same offsets), random caches.
  std::vector<unsigned char> hk(buf_bytes, kPoison), hv(c.combined ? 1 : buf_bytes, kPoison);
  FillRandom(hk.data() + c.base_misalign_bytes, s.tensor_bytes, rng);
  if (!c.combined) FillRandom(hv.data() + c.base_misalign_bytes, s.tensor_bytes, rng);
  ASSERT_TRUE(dk.Upload(hk) && dv.Upload(hv));
  unsigned char* k_dev = dk.get() + c.base_misalign_bytes;
  unsigned char* v_dev = c.combined ? nullptr : dv.get() + c.base_misalign_bytes;
  unsigned char* k_host = hk.data() + c.base_misalign_bytes;
  unsigned char* v_host = c.combined ? nullptr : hv.data() + c.base_misalign_bytes;

  // Gather into a poisoned arena.
  ASSERT_EQ(cudaMemset(arena.get(), kPoison, arena_bytes), cudaSuccess);
  const auto* table_dev = reinterpret_cast<const int32_t*>(dtable.get());
  Status st = LaunchGatherBlocks(s.desc, k_dev, v_dev, table_dev, c.num_blocks,
                                 reinterpret_cast<void* const*>(dslots.get()), stream);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  std::vector<unsigned char> got = arena.Download();
  ASSERT_EQ(got.size(), arena_bytes);
  std::vector<unsigned char> want(arena_bytes, kPoison);
  for (uint32_t b = 0; b < c.num_blocks; ++b) {
    if (!good(b)) continue;
    void* slot = want.data() + b * s.slot_pitch + c.slot_misalign_bytes;
    ASSERT_TRUE(GatherBlocksRef(s.desc, k_host, v_host, table.data() + uint64_t{b} * per_block, 1,
                                &slot, nullptr)
                    .ok());
  }
  if (const uint64_t i = FirstDifference(got, want); i != got.size()) {
    FAIL() << "gather: arena byte " << i << " (block " << i / s.slot_pitch << ", byte "
           << i % s.slot_pitch << " of its pitch) is " << int{got[i]} << ", want " << int{want[i]};
  }

  // Scatter fresh random slots into a poisoned cache.
  std::vector<unsigned char> slots_host(arena_bytes, kPoison);
  for (uint32_t b = 0; b < c.num_blocks; ++b) {
    FillRandom(slots_host.data() + b * s.slot_pitch + c.slot_misalign_bytes, s.slot_bytes, rng);
  }
  ASSERT_TRUE(arena.Upload(slots_host));
  ASSERT_EQ(cudaMemset(dk.get(), kPoison, dk.bytes()), cudaSuccess);
  if (!c.combined) {
    ASSERT_EQ(cudaMemset(dv.get(), kPoison, dv.bytes()), cudaSuccess);
  }
  st = LaunchScatterBlocks(s.desc, k_dev, v_dev, table_dev, c.num_blocks,
                           reinterpret_cast<const void* const*>(dslots.get()), stream);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  std::vector<unsigned char> want_k(buf_bytes, kPoison),
      want_v(c.combined ? 1 : buf_bytes, kPoison);
  for (uint32_t b = 0; b < c.num_blocks; ++b) {
    if (!good(b)) continue;
    const void* slot = slots_host.data() + b * s.slot_pitch + c.slot_misalign_bytes;
    ASSERT_TRUE(ScatterBlocksRef(s.desc, want_k.data() + c.base_misalign_bytes,
                                 c.combined ? nullptr : want_v.data() + c.base_misalign_bytes,
                                 table.data() + uint64_t{b} * per_block, 1, &slot, nullptr)
                    .ok());
  }
  const std::vector<unsigned char> got_k = dk.Download();
  ASSERT_EQ(got_k.size(), buf_bytes);
  if (const uint64_t i = FirstDifference(got_k, want_k); i != got_k.size()) {
    FAIL() << "scatter: K/combined buffer byte " << i << " is " << int{got_k[i]} << ", want "
           << int{want_k[i]};
  }
  if (!c.combined) {
    const std::vector<unsigned char> got_v = dv.Download();
    ASSERT_EQ(got_v.size(), buf_bytes);
    if (const uint64_t i = FirstDifference(got_v, want_v); i != got_v.size()) {
      FAIL() << "scatter: V buffer byte " << i << " is " << int{got_v[i]} << ", want "
             << int{want_v[i]};
    }
  }
}

#endif  // KVTIER_WITH_CUDA

class PagedCopyGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
  }
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

TEST_F(PagedCopyGpuTest, MatchesReferenceAcrossLayoutsDtypesAndShapes) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (PagedLayout layout : {PagedLayout::kNHD, PagedLayout::kHND}) {
    for (bool combined : {true, false}) {
      for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3}) {
        for (uint32_t head_dim : {64u, 128u, 256u}) {
          for (uint32_t heads : {1u, 2u, 8u}) {
            for (uint32_t block_tokens : {16u, 128u, 256u}) {
              for (uint32_t page_size : {16u, block_tokens, 2 * block_tokens}) {
                Case c{layout, combined, dtype, head_dim, heads, block_tokens, page_size, 3};
                RunGpuCase(c, rng_);
                if (HasFatalFailure()) return;
              }
            }
          }
        }
      }
    }
  }
#endif
}

// Misaligned bases and slots force 8-, 4-, 2- and 1-byte vectors; odd rows (head_dim *
// element size not a multiple of 16) and off-grid page sizes take the same paths.
TEST_F(PagedCopyGpuTest, MatchesReferenceOnMisalignedAndOddGeometry) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (PagedLayout layout : {PagedLayout::kNHD, PagedLayout::kHND}) {
    for (bool combined : {true, false}) {
      for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3}) {
        const uint32_t elem = DTypeBytes(dtype);
        for (uint32_t base_mis : {0u, elem, 8u}) {
          for (uint32_t slot_mis : {0u, elem, 4u, 8u}) {
            Case c{layout, combined, dtype, 128, 2, 32, 16, 3, base_mis, slot_mis};
            RunGpuCase(c, rng_);
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
  const Case odd[] = {
      {PagedLayout::kNHD, false, DType::kBF16, 128, 8, 16, 1, 5},  // token pool
      {PagedLayout::kHND, true, DType::kF16, 64, 1, 32, 1, 3},
      {PagedLayout::kNHD, true, DType::kF32, 64, 2, 128, 48, 3},  // 16-token chunks
      {PagedLayout::kHND, false, DType::kF16, 128, 7, 16, 24, 4},
      {PagedLayout::kHND, true, DType::kBF16, 96, 3, 64, 512, 9},
      {PagedLayout::kNHD, false, DType::kFP8E4M3, 3, 5, 20, 10, 6},  // 3-byte rows
      {PagedLayout::kHND, false, DType::kF16, 20, 3, 40, 8, 6},      // 40-byte rows
      {PagedLayout::kHND, false, DType::kF16, 1, 1, 1, 1, 7},
      {PagedLayout::kNHD, true, DType::kF32, 256, 8, 256, 512, 2},  // 1 KiB rows, big tiles
      {PagedLayout::kNHD, true, DType::kF16, 64, 1, 16, 16, 5000},  // many blocks
      {PagedLayout::kHND, false, DType::kBF16, 128, 8, 128, 16, 300},
  };
  for (const Case& c : odd) {
    RunGpuCase(c, rng_);
    if (HasFatalFailure()) return;
  }
#endif
}

// A block with an out-of-range entry or a null slot is skipped whole; the others land.
TEST_F(PagedCopyGpuTest, SkipsBlocksWithBadEntries) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  SCOPED_TRACE("seed " + std::to_string(seed_));
  for (uint32_t page_size : {16u, 128u, 256u}) {
    for (bool null_slot : {false, true}) {
      Case c{PagedLayout::kNHD, false, DType::kBF16, 128, 2, 128, page_size, 4};
      RunGpuCase(c, rng_, nullptr, /*bad_block=*/1 + rng_() % 3, null_slot);
      if (HasFatalFailure()) return;
      c.layout = PagedLayout::kHND;
      c.combined = true;
      RunGpuCase(c, rng_, nullptr, /*bad_block=*/rng_() % 4, null_slot);
      if (HasFatalFailure()) return;
    }
  }
#endif
}

TEST_F(PagedCopyGpuTest, RunsOnANonDefaultStream) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  SCOPED_TRACE("seed " + std::to_string(seed_));
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  RunGpuCase({PagedLayout::kHND, false, DType::kF16, 128, 8, 128, 16, 7}, rng_, stream);
  cudaStreamDestroy(stream);
#endif
}

TEST(PagedCopyGpuArgsTest, LaunchRejectsBadArgumentsBeforeTouchingMemory) {
  if (!cuda::BuiltWithCuda()) GTEST_SKIP() << "built without CUDA: Launch is NotSupported";
  // Validation needs no device: these never reach the GPU.
  PagedCacheDesc d;
  d.num_pages = 4;
  d.num_kv_heads = 1;
  d.head_dim = 64;
  d.block_tokens = 16;
  int32_t table[1] = {0};
  void* slots[1] = {nullptr};
  EXPECT_TRUE(
      LaunchGatherBlocks(d, nullptr, nullptr, table, 1, slots, nullptr).IsInvalidArgument());
  d.head_dim = 0;
  char k[1], v[1];
  EXPECT_TRUE(LaunchGatherBlocks(d, k, v, table, 1, slots, nullptr).IsInvalidArgument());
}

TEST(PagedCopyGpuArgsTest, ReportsNoDeviceAsAStatus) {
  if (cuda::HasDevice()) GTEST_SKIP() << "a device is present";
  PagedCacheDesc d;
  d.num_pages = 4;
  d.num_kv_heads = 1;
  d.head_dim = 64;
  d.block_tokens = 16;
  std::vector<unsigned char> k(4 * 16 * 64 * 2), v(k.size()), slot(2 * 16 * 64 * 2);
  int32_t table[1] = {2};
  void* slots[1] = {slot.data()};
  const void* cslots[1] = {slot.data()};
  EXPECT_FALSE(LaunchGatherBlocks(d, k.data(), v.data(), table, 1, slots, nullptr).ok());
  EXPECT_FALSE(LaunchScatterBlocks(d, k.data(), v.data(), table, 1, cslots, nullptr).ok());
}

}  // namespace
}  // namespace kvtier
