// DeviceCache on the emulated device (and on a GPU when one is present): bytes arrive
// exactly, hits, both replacement policies, pins and errors leaving nothing pinned,
// prefetch (landed, in flight, taken over, wasted), per-layer groups, invalidation, and
// four threads checked against the source's contents.
#include "src/core/device_cache.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "kernels/cuda_runtime.h"

namespace kvtier {
namespace {

// Not a multiple of the slot alignment, so slots have padding.
constexpr uint64_t kBlockBytes = 8192 + 40;
constexpr uint64_t kSlotBytes = (kBlockBytes + 255) / 256 * 256;

BlockKey Key(uint64_t seq, uint32_t layer, uint32_t block) {
  return BlockKey{.namespace_id = 0, .sequence = {0, seq}, .layer = layer, .block = block};
}

// Serves blocks from a map: random contents, some "on disk" (PinHost sleeps once for
// them, then they count as host blocks, as the Store promotes them). Tracks every pin.
class FakeSource : public BlockSource {
 public:
  explicit FakeSource(uint64_t seed = 1) : rng_(seed) {}

  void Add(const BlockKey& key, bool on_disk = false) {
    std::lock_guard lock(mu_);
    blocks_[key] = Block{RandomBytes(), on_disk};
  }
  void AddRange(uint64_t seq, uint32_t layer, uint32_t n, bool on_disk = false) {
    for (uint32_t b = 0; b < n; ++b) Add(Key(seq, layer, b), on_disk);
  }
  // New contents (pins of the old ones keep them alive).
  void Rewrite(const BlockKey& key) { Add(key, false); }

  // Whether the block's bytes (current contents) are at `address` (host memory).
  bool HoldsAt(const BlockKey& key, uint64_t address) const {
    std::shared_ptr<const std::vector<std::byte>> data = Bytes(key);
    return std::memcmp(reinterpret_cast<const void*>(address), data->data(), kBlockBytes) == 0;
  }
  std::shared_ptr<const std::vector<std::byte>> Bytes(const BlockKey& key) const {
    std::lock_guard lock(mu_);
    return blocks_.at(key).data;
  }

  void set_disk_latency(std::chrono::milliseconds latency) { disk_latency_ = latency; }
  // Called at the end of each PinHost (without the source's lock).
  void set_hook(std::function<void(std::span<const BlockKey>)> hook) { hook_ = std::move(hook); }

  size_t pinned() const {
    std::lock_guard lock(mu_);
    return pinned_.size();
  }
  uint64_t pin_calls() const { return pin_calls_.load(); }

  Status PinHost(std::span<const BlockKey> keys, std::span<HostBlockRef> blocks) override {
    ++pin_calls_;
    bool disk = false;
    {
      std::lock_guard lock(mu_);
      for (const BlockKey& key : keys) {
        if (!blocks_.contains(key)) return Status::NotFound("no block " + key.ToString());
      }
      for (size_t i = 0; i < keys.size(); ++i) {
        Block& b = blocks_[keys[i]];
        const uint64_t handle = ++next_handle_;
        pinned_[handle] = b.data;
        blocks[i] = HostBlockRef{.data = b.data->data(), .handle = handle, .from_disk = b.on_disk};
        disk |= b.on_disk;
        b.on_disk = false;
      }
    }
    if (disk && disk_latency_.count() > 0) std::this_thread::sleep_for(disk_latency_);
    if (hook_) hook_(keys);
    return Status::OK();
  }

  // With `direct`, FillDevice copies the blocks into the (emulated) tier itself.
  void set_direct(bool direct) { direct_ = direct; }
  uint64_t fill_calls() const { return fill_calls_.load(); }

  bool FillDevice(std::span<const BlockKey> keys, std::span<std::byte* const> destinations,
                  std::span<Status> statuses) override {
    if (!direct_) return false;
    ++fill_calls_;
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < keys.size(); ++i) {
      auto it = blocks_.find(keys[i]);
      if (it == blocks_.end()) {
        statuses[i] = Status::NotFound("no block " + keys[i].ToString());
        continue;
      }
      std::memcpy(destinations[i], it->second.data->data(), kBlockBytes);
      statuses[i] = Status::OK();
    }
    return true;
  }

  void UnpinHost(std::span<const BlockKey> keys, std::span<const HostBlockRef> blocks) override {
    std::lock_guard lock(mu_);
    ASSERT_EQ(keys.size(), blocks.size());
    for (const HostBlockRef& ref : blocks) {
      auto it = pinned_.find(ref.handle);
      ASSERT_NE(it, pinned_.end()) << "unpin of a block not pinned";
      EXPECT_EQ(it->second->data(), ref.data);
      pinned_.erase(it);
    }
  }

 private:
  struct Block {
    std::shared_ptr<const std::vector<std::byte>> data;
    bool on_disk = false;
  };
  std::shared_ptr<const std::vector<std::byte>> RandomBytes() {
    auto data = std::make_shared<std::vector<std::byte>>(kBlockBytes);
    for (uint64_t i = 0; i + 8 <= kBlockBytes; i += 8) {
      const uint64_t word = rng_();
      std::memcpy(data->data() + i, &word, 8);
    }
    return data;
  }

  mutable std::mutex mu_;
  std::mt19937_64 rng_;
  std::map<BlockKey, Block> blocks_;
  std::map<uint64_t, std::shared_ptr<const std::vector<std::byte>>> pinned_;
  uint64_t next_handle_ = 0;
  std::atomic<uint64_t> pin_calls_{0};
  std::atomic<bool> direct_{false};
  std::atomic<uint64_t> fill_calls_{0};
  std::chrono::milliseconds disk_latency_{0};
  std::function<void(std::span<const BlockKey>)> hook_;
};

std::unique_ptr<DeviceCache> MakeCache(FakeSource* source, uint32_t slots,
                                       DeviceCacheOptions options = {}) {
  options.force_emulated = true;
  auto cache = DeviceCache::Create(kBlockBytes, uint64_t{slots} * kSlotBytes, options, source);
  EXPECT_TRUE(cache.ok()) << cache.status().ToString();
  return std::move(cache).value();
}

DeviceCacheOptions Lru() { return DeviceCacheOptions{.policy = ReplacementPolicy::kLru}; }

struct Acquired {
  AcquireInfo info;
  std::vector<uint64_t> addresses;
};

Result<Acquired> Acquire(DeviceCache& cache, uint64_t seq, uint32_t layer,
                         std::vector<int64_t> blocks, std::vector<float> scores = {}) {
  Acquired a;
  a.addresses.assign(blocks.size(), ~uint64_t{0});
  KVTIER_ASSIGN_OR_RETURN(a.info,
                          cache.Acquire(0, {0, seq}, layer, blocks, scores, nullptr, a.addresses));
  return a;
}

// Acquires and releases at once; returns the info.
AcquireInfo Touch(DeviceCache& cache, uint64_t seq, uint32_t layer, std::vector<int64_t> blocks,
                  std::vector<float> scores = {}) {
  Result<Acquired> a = Acquire(cache, seq, layer, std::move(blocks), std::move(scores));
  EXPECT_TRUE(a.ok()) << a.status().ToString();
  if (!a.ok()) return {};
  EXPECT_TRUE(cache.Release(a->info.lease).ok());
  return a->info;
}

void ExpectValid(const DeviceCache& cache) {
  Status s = cache.Validate();
  EXPECT_TRUE(s.ok()) << s.ToString();
}

// --- Basics -----------------------------------------------------------------------------

TEST(DeviceCacheTest, CreateRejectsBadOptions) {
  FakeSource source;
  EXPECT_TRUE(
      DeviceCache::Create(kBlockBytes, 4 * kSlotBytes, {}, nullptr).status().IsInvalidArgument());
  for (float decay : {0.0f, -0.5f, 1.5f}) {
    DeviceCacheOptions o{.score_decay = decay, .force_emulated = true};
    EXPECT_TRUE(
        DeviceCache::Create(kBlockBytes, 4 * kSlotBytes, o, &source).status().IsInvalidArgument())
        << decay;
  }
  DeviceCacheOptions o{.default_score = -1.0f, .force_emulated = true};
  EXPECT_TRUE(
      DeviceCache::Create(kBlockBytes, 4 * kSlotBytes, o, &source).status().IsInvalidArgument());
}

TEST(DeviceCacheTest, RejectsBadRequests) {
  FakeSource source;
  source.AddRange(1, 0, 4);
  auto cache = MakeCache(&source, 8);
  std::vector<uint64_t> addresses(2);
  const std::vector<int64_t> blocks = {0, 1};
  const std::vector<float> one_score = {1.0f};
  EXPECT_TRUE(cache->Acquire(0, {0, 1}, 0, blocks, one_score, nullptr, addresses)
                  .status()
                  .IsInvalidArgument());
  std::vector<uint64_t> short_addresses(1);
  EXPECT_TRUE(cache->Acquire(0, {0, 1}, 0, blocks, {}, nullptr, short_addresses)
                  .status()
                  .IsInvalidArgument());
  const std::vector<int64_t> bad = {0, -2};
  EXPECT_TRUE(
      cache->Acquire(0, {0, 1}, 0, bad, {}, nullptr, addresses).status().IsInvalidArgument());
  EXPECT_TRUE(cache->Release(12345).IsInvalidArgument());
  EXPECT_EQ(cache->stats().pinned_slots, 0u);
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, BytesArriveExactAndReacquireHits) {
  FakeSource source;
  source.AddRange(7, 3, 5, /*on_disk=*/false);
  for (uint32_t b = 5; b < 8; ++b) source.Add(Key(7, 3, b), /*on_disk=*/true);
  auto cache = MakeCache(&source, 16);
  EXPECT_TRUE(cache->emulated());

  Result<Acquired> a = Acquire(*cache, 7, 3, {0, 1, 2, 3, 4, 5, 6, 7});
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->info.hits, 0u);
  EXPECT_EQ(a->info.from_host, 5u);
  EXPECT_EQ(a->info.from_disk, 3u);
  const auto base = reinterpret_cast<uint64_t>(cache->pool().base());
  std::set<uint64_t> distinct;
  for (uint32_t b = 0; b < 8; ++b) {
    const uint64_t at = a->addresses[b];
    EXPECT_TRUE(source.HoldsAt(Key(7, 3, b), at)) << b;
    EXPECT_GE(at, base);
    EXPECT_LT(at, base + cache->pool().capacity_bytes());
    EXPECT_EQ((at - base) % kSlotBytes, 0u);
    distinct.insert(at);
  }
  EXPECT_EQ(distinct.size(), 8u);
  EXPECT_EQ(source.pinned(), 0u) << "host pins outlived the (emulated) copy";
  EXPECT_EQ(cache->stats().pinned_slots, 8u);
  ExpectValid(*cache);
  ASSERT_TRUE(cache->Release(a->info.lease).ok());
  EXPECT_TRUE(cache->Release(a->info.lease).IsInvalidArgument()) << "released twice";
  EXPECT_EQ(cache->stats().pinned_slots, 0u);

  const uint64_t calls = source.pin_calls();
  Result<Acquired> again = Acquire(*cache, 7, 3, {7, 6, 5, 4, 3, 2, 1, 0});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->info.hits, 8u);
  EXPECT_EQ(again->info.from_host + again->info.from_disk, 0u);
  EXPECT_EQ(source.pin_calls(), calls) << "a hit went to the source";
  for (uint32_t i = 0; i < 8; ++i) EXPECT_EQ(again->addresses[i], a->addresses[7 - i]);
  ASSERT_TRUE(cache->Release(again->info.lease).ok());

  const DeviceCacheStats s = cache->stats();
  EXPECT_EQ(s.acquires, 2u);
  EXPECT_EQ(s.acquired_blocks, 16u);
  EXPECT_EQ(s.hits, 8u);
  EXPECT_EQ(s.fetches_host, 5u);
  EXPECT_EQ(s.fetches_disk, 3u);
  EXPECT_EQ(s.bytes_in, 8 * kBlockBytes);
  EXPECT_EQ(s.resident_blocks, 8u);
  EXPECT_EQ(s.slots, 16u);
  EXPECT_EQ(s.capacity_bytes, 16 * kSlotBytes);
  EXPECT_TRUE(s.emulated);
  EXPECT_EQ(s.leases, 0u);
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, SkipsMinusOneAndFoldsDuplicates) {
  FakeSource source;
  source.AddRange(1, 0, 8);
  auto cache = MakeCache(&source, 8);
  Result<Acquired> a = Acquire(*cache, 1, 0, {3, -1, 3, 5, -1});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->addresses[1], 0u);
  EXPECT_EQ(a->addresses[4], 0u);
  EXPECT_EQ(a->addresses[0], a->addresses[2]);
  EXPECT_NE(a->addresses[0], a->addresses[3]);
  EXPECT_EQ(a->info.from_host, 2u);
  EXPECT_EQ(a->info.hits, 1u);  // the duplicate
  EXPECT_EQ(cache->stats().pinned_slots, 2u);
  EXPECT_TRUE(source.HoldsAt(Key(1, 0, 3), a->addresses[0]));
  EXPECT_TRUE(source.HoldsAt(Key(1, 0, 5), a->addresses[3]));
  ASSERT_TRUE(cache->Release(a->info.lease).ok());
  EXPECT_EQ(cache->stats().pinned_slots, 0u);
  ExpectValid(*cache);
}

// --- Replacement ------------------------------------------------------------------------

TEST(DeviceCacheTest, LruEvictsTheLeastRecentlyAcquired) {
  FakeSource source;
  source.AddRange(1, 0, 8);
  auto cache = MakeCache(&source, 4, Lru());
  for (int64_t b : {0, 1, 2, 3}) Touch(*cache, 1, 0, {b});
  EXPECT_EQ(Touch(*cache, 1, 0, {0}).hits, 1u);  // 0 is now the most recent
  Touch(*cache, 1, 0, {4});                      // evicts 1
  EXPECT_TRUE(cache->Resident(Key(1, 0, 0)));
  EXPECT_FALSE(cache->Resident(Key(1, 0, 1)));
  for (uint32_t b : {2, 3, 4}) EXPECT_TRUE(cache->Resident(Key(1, 0, b))) << b;
  Touch(*cache, 1, 0, {5});  // evicts 2
  EXPECT_FALSE(cache->Resident(Key(1, 0, 2)));
  EXPECT_EQ(cache->stats().evictions, 2u);
  ExpectValid(*cache);
}

// A block acquired once with a high score outlives later low-score blocks under
// kScoreDecay; LRU evicts it first.
TEST(DeviceCacheTest, ScoreDecayKeepsAHighScoreBlockLruWouldEvict) {
  for (ReplacementPolicy policy : {ReplacementPolicy::kLru, ReplacementPolicy::kScoreDecay}) {
    FakeSource source;
    source.AddRange(1, 0, 8);
    auto cache = MakeCache(&source, 4, DeviceCacheOptions{.policy = policy, .score_decay = 0.9f});
    // One step each (the same layer of the same sequence again).
    Touch(*cache, 1, 0, {0}, {5.0f});
    for (int64_t b : {1, 2, 3}) Touch(*cache, 1, 0, {b}, {0.1f});
    Touch(*cache, 1, 0, {4}, {0.1f});
    const bool keeps = policy == ReplacementPolicy::kScoreDecay;
    EXPECT_EQ(cache->Resident(Key(1, 0, 0)), keeps);
    EXPECT_EQ(cache->Resident(Key(1, 0, 1)), !keeps);
    EXPECT_EQ(cache->stats().steps, 4u);
    ExpectValid(*cache);
  }
}

// Old scores decay: a score of 1 ten steps ago (0.35 now) loses to a score of 0.5 now;
// without decay it wins.
TEST(DeviceCacheTest, ScoresDecayPerStep) {
  for (float decay : {0.9f, 1.0f}) {
    FakeSource source;
    source.AddRange(1, 0, 8);
    auto cache = MakeCache(&source, 3, DeviceCacheOptions{.score_decay = decay});
    Touch(*cache, 1, 0, {0}, {1.0f});
    for (int step = 0; step < 9; ++step) Touch(*cache, 1, 0, {7}, {10.0f});
    Touch(*cache, 1, 0, {1}, {0.5f});
    Touch(*cache, 1, 0, {2}, {0.5f});  // evicts the lowest
    EXPECT_EQ(cache->Resident(Key(1, 0, 0)), decay == 1.0f) << decay;
    EXPECT_EQ(cache->Resident(Key(1, 0, 1)), decay != 1.0f) << decay;
    EXPECT_TRUE(cache->Resident(Key(1, 0, 7)));
    ExpectValid(*cache);
  }
}

// Thousands of steps push the internal scale past its renormalisation point; the order
// must survive it.
TEST(DeviceCacheTest, ScoreDecaySurvivesRenormalisation) {
  FakeSource source;
  source.AddRange(1, 0, 8);
  source.AddRange(1, 1, 8);
  auto cache = MakeCache(&source, 3, DeviceCacheOptions{.score_decay = 0.8f});
  for (int step = 0; step < 3000; ++step) {
    Touch(*cache, 1, 0, {0}, {1.0f});
    Touch(*cache, 1, 1, {1}, {0.01f});  // same step (another layer)
  }
  ExpectValid(*cache);
  Touch(*cache, 1, 0, {2}, {0.5f});
  Touch(*cache, 1, 0, {3}, {0.5f});  // evicts 1, the lowest
  EXPECT_TRUE(cache->Resident(Key(1, 0, 0)));
  EXPECT_FALSE(cache->Resident(Key(1, 1, 1)));
  EXPECT_EQ(cache->stats().steps, 3001u);
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, StepsAreInferredPerSequenceAndLayer) {
  FakeSource source;
  for (uint32_t layer = 0; layer < 3; ++layer) source.AddRange(1, layer, 2);
  source.AddRange(2, 0, 2);
  auto cache = MakeCache(&source, 16);
  for (uint32_t layer = 0; layer < 3; ++layer) Touch(*cache, 1, layer, {0});
  Touch(*cache, 2, 0, {0});  // another sequence in the same step
  EXPECT_EQ(cache->stats().steps, 0u);
  Touch(*cache, 1, 0, {1});  // layer 0 of sequence 1 again: the next step
  EXPECT_EQ(cache->stats().steps, 1u);
  Touch(*cache, 1, 1, {1});
  Touch(*cache, 2, 0, {1});
  EXPECT_EQ(cache->stats().steps, 1u);
  cache->NextStep();
  EXPECT_EQ(cache->stats().steps, 2u);
  Touch(*cache, 1, 0, {0});  // the explicit step started anew: no second advance
  EXPECT_EQ(cache->stats().steps, 2u);
}

// --- Pins and errors --------------------------------------------------------------------

TEST(DeviceCacheTest, PinnedBlocksAreNeverEvicted) {
  FakeSource source;
  source.AddRange(1, 0, 8);
  auto cache = MakeCache(&source, 4, Lru());
  Result<Acquired> held = Acquire(*cache, 1, 0, {0, 1, 2, 3});
  ASSERT_TRUE(held.ok());

  Result<Acquired> more = Acquire(*cache, 1, 0, {4});
  EXPECT_EQ(more.status().code(), StatusCode::kResourceExhausted) << more.status().ToString();
  // A hit on a held block plus a miss: the hit's extra pin is dropped too.
  more = Acquire(*cache, 1, 0, {0, 5});
  EXPECT_EQ(more.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(source.pinned(), 0u);
  EXPECT_EQ(cache->stats().pinned_slots, 4u);
  ExpectValid(*cache);
  for (uint32_t b = 0; b < 4; ++b) {
    EXPECT_TRUE(cache->Resident(Key(1, 0, b)));
    EXPECT_TRUE(source.HoldsAt(Key(1, 0, b), held->addresses[b]));
  }

  // Two leases on one block: it stays until both are released.
  Result<Acquired> second = Acquire(*cache, 1, 0, {0});
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->info.hits, 1u);
  ASSERT_TRUE(cache->Release(held->info.lease).ok());
  Touch(*cache, 1, 0, {4, 5, 6});  // evicts 1, 2, 3 but not 0
  EXPECT_TRUE(cache->Resident(Key(1, 0, 0)));
  EXPECT_TRUE(source.HoldsAt(Key(1, 0, 0), second->addresses[0]));
  for (uint32_t b = 1; b < 4; ++b) EXPECT_FALSE(cache->Resident(Key(1, 0, b))) << b;
  ASSERT_TRUE(cache->Release(second->info.lease).ok());
  EXPECT_EQ(cache->stats().pinned_slots, 0u);
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, MoreBlocksThanSlotsIsResourceExhausted) {
  FakeSource source;
  source.AddRange(1, 0, 8);
  auto cache = MakeCache(&source, 4);
  Result<Acquired> a = Acquire(*cache, 1, 0, {0, 1, 2, 3, 4});
  EXPECT_EQ(a.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(cache->stats().pinned_slots, 0u);
  EXPECT_EQ(cache->stats().resident_blocks, 0u);
  EXPECT_EQ(source.pinned(), 0u);
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, NotFoundLeavesNothingPinned) {
  FakeSource source;
  source.AddRange(1, 0, 2);
  auto cache = MakeCache(&source, 8);
  Touch(*cache, 1, 0, {0});
  Result<Acquired> a = Acquire(*cache, 1, 0, {0, 1, 9});  // a hit, a miss, a block stored nowhere
  EXPECT_TRUE(a.status().IsNotFound()) << a.status().ToString();
  const DeviceCacheStats s = cache->stats();
  EXPECT_EQ(s.pinned_slots, 0u);
  EXPECT_EQ(s.leases, 0u);
  EXPECT_EQ(s.resident_blocks, 1u);
  EXPECT_EQ(s.acquires, 1u);  // failed calls are not counted
  EXPECT_EQ(source.pinned(), 0u);
  EXPECT_TRUE(cache->Resident(Key(1, 0, 0)));
  EXPECT_FALSE(cache->Resident(Key(1, 0, 1)));
  ExpectValid(*cache);
  // And the tier still works.
  EXPECT_EQ(Touch(*cache, 1, 0, {0, 1}).from_host, 1u);
}

// --- The source's direct path (FillDevice) ----------------------------------------------

TEST(DeviceCacheTest, ADirectSourceFillsTheSlotsWithoutHostPins) {
  FakeSource source;
  source.AddRange(1, 0, 6);
  source.set_direct(true);
  auto cache = MakeCache(&source, 8);
  Result<Acquired> a = Acquire(*cache, 1, 0, {4, 0, 2});
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->info.from_host, 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(source.HoldsAt(Key(1, 0, std::vector<uint32_t>{4, 0, 2}[i]), a->addresses[i]));
  }
  ASSERT_TRUE(cache->Release(a->info.lease).ok());
  EXPECT_EQ(source.pin_calls(), 0u);
  EXPECT_EQ(source.fill_calls(), 1u);
  EXPECT_EQ(Touch(*cache, 1, 0, {0, 2, 4}).hits, 3u);
  const DeviceCacheStats s = cache->stats();
  EXPECT_EQ(s.fetches_direct, 3u);
  EXPECT_EQ(s.fetches_host, 3u);
  EXPECT_EQ(s.bytes_in, 3 * kBlockBytes);
  EXPECT_EQ(s.pinned_slots, 0u);
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, ADirectFillThatFailsLeavesNothingPinned) {
  FakeSource source;
  source.AddRange(1, 0, 3);
  source.set_direct(true);
  auto cache = MakeCache(&source, 4);
  Result<Acquired> a = Acquire(*cache, 1, 0, {0, 7, 1});
  EXPECT_TRUE(a.status().IsNotFound()) << a.status().ToString();
  DeviceCacheStats s = cache->stats();
  EXPECT_EQ(s.pinned_slots, 0u);
  EXPECT_EQ(s.leases, 0u);
  EXPECT_EQ(s.resident_blocks, 0u);
  EXPECT_FALSE(cache->Resident(Key(1, 0, 0)));
  ExpectValid(*cache);
  // Every slot is usable again, and the good blocks arrive.
  Result<Acquired> b = Acquire(*cache, 1, 0, {0, 1, 2});
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  for (uint32_t i = 0; i < 3; ++i) EXPECT_TRUE(source.HoldsAt(Key(1, 0, i), b->addresses[i]));
  ASSERT_TRUE(cache->Release(b->info.lease).ok());
  EXPECT_EQ(cache->stats().fetches_direct, 3u);
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, ADirectPrefetchDropsOnlyTheMissingBlocks) {
  FakeSource source;
  source.AddRange(1, 0, 3);
  source.set_direct(true);
  auto cache = MakeCache(&source, 8);
  ASSERT_EQ(*cache->Prefetch(0, {0, 1}, 0, std::vector<int64_t>{0, 5, 1, 2}), 4u);
  ASSERT_TRUE(cache->Drain().ok());
  DeviceCacheStats s = cache->stats();
  EXPECT_EQ(s.prefetches, 3u);
  EXPECT_EQ(s.prefetch_dropped, 1u);
  EXPECT_EQ(s.pinned_slots, 0u);
  EXPECT_FALSE(cache->Resident(Key(1, 0, 5)));
  Result<Acquired> a = Acquire(*cache, 1, 0, {2, 1, 0});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->info.hits, 3u);
  for (uint32_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(source.HoldsAt(Key(1, 0, 2 - i), a->addresses[i]));
  }
  ASSERT_TRUE(cache->Release(a->info.lease).ok());
  EXPECT_EQ(cache->stats().fetches_direct, 3u);
  EXPECT_EQ(source.pin_calls(), 0u);
  ExpectValid(*cache);
}

// A shareable emulated tier lives in a memfd: what another mapping of it writes is what
// the slots hold (the daemon's side of the direct path).
TEST(DeviceCacheTest, AShareableEmulatedTierIsAMemfdOthersCanMap) {
  FakeSource source;
  DeviceCacheOptions o;
  o.shareable = true;
  auto cache = MakeCache(&source, 4, o);
  const DevicePool& pool = cache->pool();
  ASSERT_GE(pool.memfd(), 0);
  void* other =
      mmap(nullptr, pool.capacity_bytes(), PROT_READ | PROT_WRITE, MAP_SHARED, pool.memfd(), 0);
  ASSERT_NE(other, MAP_FAILED);
  std::mt19937_64 rng(5);
  std::vector<uint64_t> words(kBlockBytes / 8);
  for (uint64_t& w : words) w = rng() | 1;
  std::memcpy(static_cast<std::byte*>(other) + 2 * pool.slot_bytes(), words.data(),
              words.size() * 8);
  EXPECT_EQ(std::memcmp(pool.SlotData(2), words.data(), words.size() * 8), 0);
  munmap(other, pool.capacity_bytes());
  // Not shareable: no memfd.
  auto plain = MakeCache(&source, 4);
  EXPECT_EQ(plain->pool().memfd(), -1);
}

// --- Prefetch ---------------------------------------------------------------------------

TEST(DeviceCacheTest, PrefetchedBlocksAreHits) {
  FakeSource source;
  source.AddRange(1, 0, 4, /*on_disk=*/true);
  source.set_disk_latency(std::chrono::milliseconds(100));
  auto cache = MakeCache(&source, 8);
  Result<uint32_t> started = cache->Prefetch(0, {0, 1}, 0, std::vector<int64_t>{0, 1, 2, 3, -1});
  ASSERT_TRUE(started.ok());
  EXPECT_EQ(*started, 4u);
  ASSERT_TRUE(cache->Drain().ok());
  EXPECT_EQ(source.pinned(), 0u);
  EXPECT_EQ(cache->stats().pinned_slots, 0u) << "landed prefetches stay pinned";
  // Already resident or on the way: nothing more to start.
  EXPECT_EQ(*cache->Prefetch(0, {0, 1}, 0, std::vector<int64_t>{0, 1}), 0u);

  Result<Acquired> a = Acquire(*cache, 1, 0, {0, 1, 2, 3});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->info.hits, 4u);
  EXPECT_EQ(a->info.from_disk, 0u);
  for (uint32_t b = 0; b < 4; ++b) EXPECT_TRUE(source.HoldsAt(Key(1, 0, b), a->addresses[b]));
  ASSERT_TRUE(cache->Release(a->info.lease).ok());
  const DeviceCacheStats s = cache->stats();
  EXPECT_EQ(s.prefetches, 4u);
  EXPECT_EQ(s.prefetch_hits, 4u);
  EXPECT_EQ(s.prefetch_wasted, 0u);
  EXPECT_EQ(s.bytes_in, 4 * kBlockBytes);
  ExpectValid(*cache);
}

// An Acquire that finds a prefetch in progress waits for it (a hit, a prefetch hit).
TEST(DeviceCacheTest, AcquireWaitsForAPrefetchInFlight) {
  FakeSource source;
  source.AddRange(1, 0, 4, /*on_disk=*/true);
  std::promise<void> entered, open;
  std::shared_future<void> opened = open.get_future().share();
  std::atomic<bool> gated{true};
  source.set_hook([&](std::span<const BlockKey>) {
    if (gated.exchange(false)) {
      entered.set_value();
      opened.wait();
    }
  });
  auto cache = MakeCache(&source, 8);
  ASSERT_EQ(*cache->Prefetch(0, {0, 1}, 0, std::vector<int64_t>{0, 1, 2, 3}), 4u);
  entered.get_future().wait();  // the prefetch thread is inside PinHost

  auto acquirer = std::async(std::launch::async, [&] { return Acquire(*cache, 1, 0, {2, 0}); });
  EXPECT_EQ(acquirer.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout)
      << "Acquire did not wait for the prefetch";
  open.set_value();
  Result<Acquired> a = acquirer.get();
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_EQ(a->info.hits, 2u);
  EXPECT_GT(a->info.stall_nanos, 0u);
  EXPECT_TRUE(source.HoldsAt(Key(1, 0, 2), a->addresses[0]));
  EXPECT_TRUE(source.HoldsAt(Key(1, 0, 0), a->addresses[1]));
  ASSERT_TRUE(cache->Release(a->info.lease).ok());
  ASSERT_TRUE(cache->Drain().ok());
  EXPECT_EQ(cache->stats().prefetch_hits, 2u);
  EXPECT_EQ(cache->stats().pinned_slots, 0u);
  EXPECT_EQ(source.pinned(), 0u);
  ExpectValid(*cache);
}

// A prefetch still queued behind a slow one is taken over by the Acquire that needs it,
// which does not wait for the slow one.
TEST(DeviceCacheTest, AcquireTakesOverAQueuedPrefetch) {
  FakeSource source;
  source.AddRange(1, 0, 4);
  source.AddRange(1, 1, 4);
  std::promise<void> entered, open;
  std::shared_future<void> opened = open.get_future().share();
  std::atomic<bool> gated{true};
  source.set_hook([&](std::span<const BlockKey>) {
    if (gated.exchange(false)) {
      entered.set_value();
      opened.wait();
    }
  });
  auto cache = MakeCache(&source, 16);
  ASSERT_EQ(*cache->Prefetch(0, {0, 1}, 0, std::vector<int64_t>{0, 1}), 2u);
  entered.get_future().wait();
  ASSERT_EQ(*cache->Prefetch(0, {0, 1}, 1, std::vector<int64_t>{0, 1, 2}), 3u);  // queued

  Result<Acquired> a = Acquire(*cache, 1, 1, {1, 2});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->info.from_host, 2u);
  EXPECT_EQ(a->info.hits, 0u);
  EXPECT_TRUE(source.HoldsAt(Key(1, 1, 1), a->addresses[0]));
  EXPECT_TRUE(source.HoldsAt(Key(1, 1, 2), a->addresses[1]));
  open.set_value();
  ASSERT_TRUE(cache->Release(a->info.lease).ok());
  ASSERT_TRUE(cache->Drain().ok());
  const DeviceCacheStats s = cache->stats();
  EXPECT_EQ(s.prefetches, 3u);  // layer 0's two, and layer 1's block 0
  EXPECT_EQ(s.prefetch_hits, 0u);
  EXPECT_EQ(s.pinned_slots, 0u);
  for (uint32_t b : {0, 1}) EXPECT_TRUE(cache->Resident(Key(1, 0, b)));
  for (uint32_t b : {0, 1, 2}) EXPECT_TRUE(cache->Resident(Key(1, 1, b)));
  EXPECT_EQ(source.pinned(), 0u);
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, UnusedPrefetchesEvictedAreWasted) {
  FakeSource source;
  source.AddRange(1, 0, 8);
  auto cache = MakeCache(&source, 4, Lru());
  ASSERT_EQ(*cache->Prefetch(0, {0, 1}, 0, std::vector<int64_t>{0, 1}), 2u);
  ASSERT_TRUE(cache->Drain().ok());
  Touch(*cache, 1, 0, {0});           // a prefetch hit
  Touch(*cache, 1, 0, {2, 3, 4, 5});  // evicts 0 and 1
  const DeviceCacheStats s = cache->stats();
  EXPECT_EQ(s.prefetches, 2u);
  EXPECT_EQ(s.prefetch_hits, 1u);
  EXPECT_EQ(s.prefetch_wasted, 1u);
  EXPECT_EQ(s.evictions, 2u);
}

TEST(DeviceCacheTest, PrefetchOfMissingBlocksIsDropped) {
  FakeSource source;
  source.AddRange(1, 0, 2);
  auto cache = MakeCache(&source, 8);
  ASSERT_EQ(*cache->Prefetch(0, {0, 1}, 0, std::vector<int64_t>{0, 5, 1}), 3u);
  ASSERT_TRUE(cache->Drain().ok());
  const DeviceCacheStats s = cache->stats();
  EXPECT_EQ(s.prefetches, 2u);
  EXPECT_EQ(s.prefetch_dropped, 1u);
  EXPECT_EQ(s.pinned_slots, 0u);
  EXPECT_EQ(source.pinned(), 0u);
  EXPECT_TRUE(cache->Resident(Key(1, 0, 0)));
  EXPECT_TRUE(cache->Resident(Key(1, 0, 1)));
  EXPECT_FALSE(cache->Resident(Key(1, 0, 5)));
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, PrefetchDisabledDoesNothing) {
  FakeSource source;
  source.AddRange(1, 0, 2);
  auto cache = MakeCache(&source, 8, DeviceCacheOptions{.prefetch = false});
  EXPECT_EQ(*cache->Prefetch(0, {0, 1}, 0, std::vector<int64_t>{0, 1}), 0u);
  ASSERT_TRUE(cache->Drain().ok());
  EXPECT_EQ(cache->stats().resident_blocks, 0u);
}

// --- Groups and invalidation ------------------------------------------------------------

TEST(DeviceCacheTest, PerLayerCapacityKeepsLayersSeparate) {
  for (uint32_t per_layer : {0u, 2u}) {
    FakeSource source;
    source.AddRange(1, 0, 10);
    source.AddRange(1, 1, 2);
    auto cache = MakeCache(&source, 4,
                           DeviceCacheOptions{.policy = ReplacementPolicy::kLru,
                                              .per_layer_capacity_blocks = per_layer});
    Touch(*cache, 1, 1, {0, 1});
    for (int64_t b = 0; b < 10; ++b) Touch(*cache, 1, 0, {b});  // churns layer 0
    const bool kept = per_layer > 0;
    EXPECT_EQ(cache->Resident(Key(1, 1, 0)), kept) << per_layer;
    EXPECT_EQ(cache->Resident(Key(1, 1, 1)), kept) << per_layer;
    uint32_t layer0 = 0;
    for (uint32_t b = 0; b < 10; ++b) layer0 += cache->Resident(Key(1, 0, b)) ? 1 : 0;
    EXPECT_EQ(layer0, kept ? 2u : 4u);
    ExpectValid(*cache);
  }
}

TEST(DeviceCacheTest, PerLayerCapacityBoundsOneAcquire) {
  FakeSource source;
  source.AddRange(1, 0, 4);
  auto cache = MakeCache(&source, 8, DeviceCacheOptions{.per_layer_capacity_blocks = 2});
  Result<Acquired> a = Acquire(*cache, 1, 0, {0, 1, 2});
  EXPECT_EQ(a.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(cache->stats().pinned_slots, 0u);
  ExpectValid(*cache);
}

TEST(DeviceCacheTest, InvalidatedBlocksAreFetchedAgain) {
  FakeSource source;
  source.AddRange(1, 0, 4);
  source.AddRange(2, 0, 2);
  auto cache = MakeCache(&source, 8);
  Touch(*cache, 1, 0, {0});
  Result<Acquired> held = Acquire(*cache, 1, 0, {1});
  ASSERT_TRUE(held.ok());
  std::vector<std::byte> old1(kBlockBytes);
  std::memcpy(old1.data(), reinterpret_cast<const void*>(held->addresses[0]), kBlockBytes);

  source.Rewrite(Key(1, 0, 0));
  source.Rewrite(Key(1, 0, 1));
  cache->Invalidate(Key(1, 0, 0));
  cache->Invalidate(Key(1, 0, 1));  // leased: its bytes stay until released
  EXPECT_FALSE(cache->Resident(Key(1, 0, 0)));
  EXPECT_FALSE(cache->Resident(Key(1, 0, 1)));
  EXPECT_EQ(
      std::memcmp(old1.data(), reinterpret_cast<const void*>(held->addresses[0]), kBlockBytes), 0);
  ExpectValid(*cache);

  Result<Acquired> fresh = Acquire(*cache, 1, 0, {0, 1});
  ASSERT_TRUE(fresh.ok());
  EXPECT_EQ(fresh->info.from_host, 2u);
  EXPECT_NE(fresh->addresses[1], held->addresses[0]);
  EXPECT_TRUE(source.HoldsAt(Key(1, 0, 0), fresh->addresses[0]));
  EXPECT_TRUE(source.HoldsAt(Key(1, 0, 1), fresh->addresses[1]));
  ASSERT_TRUE(cache->Release(held->info.lease).ok());
  ASSERT_TRUE(cache->Release(fresh->info.lease).ok());

  Touch(*cache, 2, 0, {0, 1});
  cache->InvalidateSequence(0, {0, 2});
  EXPECT_FALSE(cache->Resident(Key(2, 0, 0)));
  EXPECT_FALSE(cache->Resident(Key(2, 0, 1)));
  EXPECT_TRUE(cache->Resident(Key(1, 0, 0)));
  EXPECT_EQ(cache->stats().resident_blocks, 2u);
  EXPECT_EQ(cache->stats().pinned_slots, 0u);
  ExpectValid(*cache);
}

// --- Threads ----------------------------------------------------------------------------

// Four threads acquire random sets (with -1 entries and duplicates), prefetch, and check
// every address against the source while they hold it. More blocks than slots, so
// eviction runs all the time.
TEST(DeviceCacheTest, ConcurrentAcquireReleaseMatchesTheSource) {
  constexpr uint32_t kSequences = 2, kLayers = 4, kBlocks = 24, kThreads = 4;
  constexpr int kIterations = 2000;
  FakeSource source(42);
  for (uint64_t seq = 1; seq <= kSequences; ++seq) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      for (uint32_t b = 0; b < kBlocks; ++b) source.Add(Key(seq, layer, b), (b % 5) == 0);
    }
  }
  for (ReplacementPolicy policy : {ReplacementPolicy::kLru, ReplacementPolicy::kScoreDecay}) {
    auto cache = MakeCache(&source, 48, DeviceCacheOptions{.policy = policy});
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (uint32_t t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(1000 + t);
        for (int iter = 0; iter < kIterations && failures == 0; ++iter) {
          const uint64_t seq = 1 + rng() % kSequences;
          const auto layer = static_cast<uint32_t>(rng() % kLayers);
          std::vector<int64_t> blocks(1 + rng() % 8);
          std::vector<float> scores(blocks.size());
          for (size_t i = 0; i < blocks.size(); ++i) {
            blocks[i] = rng() % 10 == 0 ? -1 : static_cast<int64_t>(rng() % kBlocks);
            scores[i] = static_cast<float>(rng() % 1000) / 1000.0f;
          }
          if (rng() % 4 == 0) {
            std::vector<int64_t> ahead(4);
            for (int64_t& b : ahead) b = static_cast<int64_t>(rng() % kBlocks);
            if (!cache->Prefetch(0, {0, seq}, (layer + 1) % kLayers, ahead).ok()) ++failures;
          }
          Result<Acquired> a = Acquire(*cache, seq, layer, blocks, scores);
          if (!a.ok()) {
            ADD_FAILURE() << a.status().ToString();
            ++failures;
            return;
          }
          for (int check = 0; check < 2; ++check) {
            for (size_t i = 0; i < blocks.size(); ++i) {
              if (blocks[i] < 0) {
                if (a->addresses[i] != 0) ++failures;
                continue;
              }
              if (!source.HoldsAt(Key(seq, layer, static_cast<uint32_t>(blocks[i])),
                                  a->addresses[i])) {
                ADD_FAILURE() << "wrong bytes for block " << blocks[i] << " layer " << layer;
                ++failures;
              }
            }
            std::this_thread::yield();
          }
          if (!cache->Release(a->info.lease).ok()) ++failures;
          if (iter % 100 == 0 && !cache->Validate().ok()) ++failures;
        }
      });
    }
    for (std::thread& th : threads) th.join();
    EXPECT_EQ(failures.load(), 0);
    ASSERT_TRUE(cache->Drain().ok());
    const DeviceCacheStats s = cache->stats();
    EXPECT_EQ(s.pinned_slots, 0u);
    EXPECT_EQ(s.leases, 0u);
    EXPECT_EQ(s.hits + s.fetches_host + s.fetches_disk, s.acquired_blocks);
    EXPECT_GT(s.evictions, 0u);
    EXPECT_EQ(s.acquires, uint64_t{kThreads} * kIterations);
    EXPECT_EQ(source.pinned(), 0u);
    ExpectValid(*cache);
  }
}

// --- On a GPU ---------------------------------------------------------------------------

TEST(DeviceCacheGpuTest, BytesArriveOnTheDeviceInStreamOrder) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no GPU: " << cuda::Devices().reason;
  FakeSource source;
  source.AddRange(1, 0, 32);
  source.AddRange(1, 1, 8, /*on_disk=*/true);
  auto created = DeviceCache::Create(
      kBlockBytes, 16 * kSlotBytes, DeviceCacheOptions{.policy = ReplacementPolicy::kLru}, &source);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  auto cache = std::move(created).value();
  ASSERT_FALSE(cache->emulated());
  Result<cuda::Stream> stream = cuda::Stream::Create();
  ASSERT_TRUE(stream.ok());

  std::vector<std::byte> back(kBlockBytes);
  auto check = [&](const BlockKey& key, uint64_t address) {
    EXPECT_TRUE(
        cuda::Memcpy(back.data(), reinterpret_cast<const void*>(address), kBlockBytes).ok());
    EXPECT_EQ(std::memcmp(back.data(), source.Bytes(key)->data(), kBlockBytes), 0)
        << key.ToString();
  };
  // Rounds over 32 blocks through 16 slots: evictions reuse slots whose previous
  // readers' releases must be waited for.
  for (int round = 0; round < 4; ++round) {
    for (int64_t first = 0; first < 32; first += 8) {
      std::vector<int64_t> blocks(8);
      for (int64_t i = 0; i < 8; ++i) blocks[i] = first + i;
      std::vector<uint64_t> addresses(8);
      Result<AcquireInfo> info = cache->Acquire(0, {0, 1}, 0, blocks, {}, stream->get(), addresses);
      ASSERT_TRUE(info.ok()) << info.status().ToString();
      ASSERT_TRUE(stream->Synchronize().ok());
      for (int64_t i = 0; i < 8; ++i) {
        check(Key(1, 0, static_cast<uint32_t>(blocks[i])), addresses[i]);
      }
      ASSERT_TRUE(cache->Release(info->lease).ok());
    }
  }
  ASSERT_EQ(*cache->Prefetch(0, {0, 1}, 1, std::vector<int64_t>{0, 1, 2, 3}), 4u);
  ASSERT_TRUE(cache->Drain().ok());
  std::vector<int64_t> blocks = {0, 1, 2, 3};
  std::vector<uint64_t> addresses(4);
  Result<AcquireInfo> info = cache->Acquire(0, {0, 1}, 1, blocks, {}, stream->get(), addresses);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->hits, 4u);
  ASSERT_TRUE(stream->Synchronize().ok());
  for (uint32_t b = 0; b < 4; ++b) check(Key(1, 1, b), addresses[b]);
  ASSERT_TRUE(cache->Release(info->lease).ok());
  ASSERT_TRUE(cache->Drain().ok());
  EXPECT_EQ(source.pinned(), 0u);
  EXPECT_EQ(cache->stats().prefetch_hits, 4u);
  ExpectValid(*cache);
}

}  // namespace
}  // namespace kvtier
