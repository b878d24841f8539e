// Per-namespace quotas and usage (StoreOptions::quotas, EmbeddedStore::Usage): the disk
// quota refuses new keys and frees up with Delete and DropSequence; the host quota
// evicts the namespace's own least recently used block and nobody else's; Usage stays
// exact through puts, replacements, deletes, drops, evictions, promotions and a reopen.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "src/core/embedded_store.h"
#include "tests/store_paged_test.h"
#include "tests/test_util.h"

namespace kvtier {
namespace {

using testing::HoldsVersion;
using testing::Key;
using testing::MakeBlock;
using testing::SmallLayout;

constexpr uint64_t kSlot = 8192;  // SmallLayout's 8 KiB blocks: a slot, an extent each

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvtier-quota-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

StoreOptions MemoryOptions(uint32_t host_slots) {
  StoreOptions o;
  o.host_capacity_bytes = uint64_t{host_slots} * kSlot;
  return o;
}

StoreOptions DiskOptions(const std::string& dir, uint32_t host_slots, uint64_t disk_blocks = 256) {
  StoreOptions o = MemoryOptions(host_slots);
  o.directory = dir;
  o.disk_capacity_bytes = disk_blocks * kSlot;
  o.io_depth = 16;
  return o;
}

NamespaceQuota Quota(uint32_t ns, uint64_t host_blocks, uint64_t disk_blocks) {
  return NamespaceQuota{
      .namespace_id = ns, .host_bytes = host_blocks * kSlot, .disk_bytes = disk_blocks * kSlot};
}

std::unique_ptr<EmbeddedStore> MustOpen(const StoreOptions& o) {
  auto store = EmbeddedStore::Open(o, SmallLayout());
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(store).value() : nullptr;
}

Status PutVersion(Store& store, const BlockKey& key, uint64_t version) {
  auto block = MakeBlock(store.block_bytes(), key, version);
  return store.Put(key, block.data(), block.size());
}

// Get `key` and check it holds `version`, byte for byte.
void ExpectVersion(Store& store, const BlockKey& key, uint64_t version) {
  std::vector<std::byte> out(store.block_bytes());
  Status s = store.Get(key, out.data(), out.size());
  ASSERT_TRUE(s.ok()) << key.ToString() << ": " << s.ToString();
  EXPECT_TRUE(HoldsVersion(out, key, version)) << key.ToString() << " v" << version;
}

void ExpectUsage(const EmbeddedStore& store, uint32_t ns, NamespaceUsage want) {
  NamespaceUsage got = store.Usage(ns);
  EXPECT_EQ(got.blocks, want.blocks) << "namespace " << ns;
  EXPECT_EQ(got.host_blocks, want.host_blocks) << "namespace " << ns;
  EXPECT_EQ(got.quota_rejections, want.quota_rejections) << "namespace " << ns;
  EXPECT_EQ(got.quota_evictions, want.quota_evictions) << "namespace " << ns;
}

TEST(StoreQuotaTest, OpenRejectsBadQuotas) {
  StoreOptions o = MemoryOptions(8);
  o.quotas = {Quota(3, 2, 0), Quota(4, 0, 2), Quota(3, 0, 5)};
  auto dup = EmbeddedStore::Open(o, SmallLayout());
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.status().code(), StatusCode::kInvalidArgument) << dup.status().ToString();
  EXPECT_NE(dup.status().message().find("namespace 3"), std::string::npos)
      << dup.status().ToString();

  o.quotas = {NamespaceQuota{.namespace_id = 1, .host_bytes = kSlot - 1}};
  auto small_host = EmbeddedStore::Open(o, SmallLayout());
  ASSERT_FALSE(small_host.ok());
  EXPECT_EQ(small_host.status().code(), StatusCode::kInvalidArgument);

  o.quotas = {NamespaceQuota{.namespace_id = 1, .disk_bytes = 100}};
  auto small_disk = EmbeddedStore::Open(o, SmallLayout());
  ASSERT_FALSE(small_disk.ok());
  EXPECT_EQ(small_disk.status().code(), StatusCode::kInvalidArgument);

  // One entry per namespace, limits of a block or more (or none at all): fine.
  o.quotas = {Quota(3, 1, 0), Quota(4, 0, 1), NamespaceQuota{.namespace_id = 5}};
  EXPECT_NE(MustOpen(o), nullptr);
}

TEST(StoreQuotaTest, UsageOfAnUnknownNamespaceIsZero) {
  auto store = MustOpen(MemoryOptions(8));
  ASSERT_NE(store, nullptr);
  ExpectUsage(*store, 42, {});
  ASSERT_TRUE(PutVersion(*store, Key(1, 0, 0, 42), 1).ok());
  ExpectUsage(*store, 42, {.blocks = 1, .host_blocks = 1});
  ASSERT_TRUE(store->Delete(Key(1, 0, 0, 42)).ok());
  ExpectUsage(*store, 42, {});
}

// The disk quota, with and without a disk tier (every block is bound for disk).
class DiskQuotaTest : public ::testing::TestWithParam<bool> {};

TEST_P(DiskQuotaTest, RefusesNewKeysAllowsReplacementAndFreesUp) {
  TempDir dir;
  StoreOptions o = GetParam() ? DiskOptions(dir.path(), 64) : MemoryOptions(64);
  constexpr uint32_t kNs = 7, kOther = 8;
  o.quotas = {Quota(kNs, 0, 5)};
  auto store = MustOpen(o);
  ASSERT_NE(store, nullptr);

  // Sequence 1: blocks 0..2 of layer 0; sequence 2: blocks 0..1.
  for (uint32_t b = 0; b < 3; ++b) ASSERT_TRUE(PutVersion(*store, Key(1, 0, b, kNs), 1).ok());
  for (uint32_t b = 0; b < 2; ++b) ASSERT_TRUE(PutVersion(*store, Key(2, 0, b, kNs), 1).ok());
  ExpectUsage(*store, kNs, {.blocks = 5, .host_blocks = 5});

  Status refused = PutVersion(*store, Key(3, 0, 0, kNs), 1);
  EXPECT_EQ(refused.code(), StatusCode::kQuotaExceeded) << refused.ToString();
  EXPECT_NE(refused.message().find("namespace 7"), std::string::npos) << refused.ToString();
  EXPECT_NE(refused.message().find("40960"), std::string::npos) << refused.ToString();
  EXPECT_FALSE(store->Contains(Key(3, 0, 0, kNs)));

  // Replacing one of its blocks always succeeds.
  ASSERT_TRUE(PutVersion(*store, Key(1, 0, 1, kNs), 2).ok());
  ExpectVersion(*store, Key(1, 0, 1, kNs), 2);
  ExpectUsage(*store, kNs, {.blocks = 5, .host_blocks = 5, .quota_rejections = 1});

  // Another namespace is not limited by it.
  for (uint32_t b = 0; b < 10; ++b) {
    ASSERT_TRUE(PutVersion(*store, Key(3, 0, b, kOther), 1).ok());
  }
  ExpectUsage(*store, kOther, {.blocks = 10, .host_blocks = 10});

  // Delete makes room for one.
  ASSERT_TRUE(store->Delete(Key(1, 0, 0, kNs)).ok());
  ExpectUsage(*store, kNs, {.blocks = 4, .host_blocks = 4, .quota_rejections = 1});
  ASSERT_TRUE(PutVersion(*store, Key(3, 0, 0, kNs), 1).ok());
  EXPECT_EQ(PutVersion(*store, Key(3, 0, 1, kNs), 1).code(), StatusCode::kQuotaExceeded);
  ExpectUsage(*store, kNs, {.blocks = 5, .host_blocks = 5, .quota_rejections = 2});

  // DropSequence makes room for as many as it drops.
  auto dropped = store->DropSequence(kNs, SequenceId{0, 2});
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, 2u);
  ExpectUsage(*store, kNs, {.blocks = 3, .host_blocks = 3, .quota_rejections = 2});
  ASSERT_TRUE(PutVersion(*store, Key(3, 0, 1, kNs), 1).ok());
  ASSERT_TRUE(PutVersion(*store, Key(3, 0, 2, kNs), 1).ok());
  EXPECT_EQ(PutVersion(*store, Key(3, 0, 3, kNs), 1).code(), StatusCode::kQuotaExceeded);
  ExpectUsage(*store, kNs, {.blocks = 5, .host_blocks = 5, .quota_rejections = 3});
  ExpectVersion(*store, Key(1, 0, 2, kNs), 1);
  ExpectVersion(*store, Key(3, 0, 2, kNs), 1);
  ASSERT_TRUE(store->Flush().ok());
}

INSTANTIATE_TEST_SUITE_P(WithAndWithoutDisk, DiskQuotaTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "Disk" : "MemoryOnly";
                         });

TEST(StoreQuotaTest, PutBatchMembersGetTheirOwnStatus) {
  auto store = MustOpen([] {
    StoreOptions o = MemoryOptions(64);
    o.quotas = {Quota(1, 0, 3), Quota(2, 2, 0)};
    return o;
  }());
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(PutVersion(*store, Key(1, 0, 0, 1), 1).ok());
  ASSERT_TRUE(PutVersion(*store, Key(1, 0, 1, 1), 1).ok());

  // Namespace 1 (disk quota 3, holding 2): a replacement, one new key that fits, two that
  // do not; namespace 2 (host quota 2, nothing resident): two fit, the third has nothing
  // of its own to evict (the batch holds its slots); namespace 3: no quota.
  const std::vector<BlockKey> keys = {Key(1, 0, 0, 1), Key(1, 0, 2, 1), Key(1, 0, 3, 1),
                                      Key(1, 0, 4, 1), Key(5, 0, 0, 2), Key(5, 0, 1, 2),
                                      Key(5, 0, 2, 2), Key(9, 0, 0, 3)};
  const std::vector<StatusCode> want = {
      StatusCode::kOk, StatusCode::kOk, StatusCode::kQuotaExceeded, StatusCode::kQuotaExceeded,
      StatusCode::kOk, StatusCode::kOk, StatusCode::kQuotaExceeded, StatusCode::kOk};
  std::vector<std::vector<std::byte>> blocks;
  std::vector<BlockWrite> writes;
  for (const BlockKey& k : keys) blocks.push_back(MakeBlock(store->block_bytes(), k, 2));
  for (size_t i = 0; i < keys.size(); ++i) {
    writes.push_back(BlockWrite{keys[i], blocks[i].data(), blocks[i].size()});
  }
  std::vector<Status> statuses(keys.size());
  Status all = store->PutBatch(writes, statuses);
  EXPECT_EQ(all.code(), StatusCode::kQuotaExceeded);
  for (size_t i = 0; i < keys.size(); ++i) {
    EXPECT_EQ(statuses[i].code(), want[i]) << keys[i].ToString() << ": " << statuses[i].ToString();
    EXPECT_EQ(store->Contains(keys[i]), want[i] == StatusCode::kOk || i == 0) << i;
    if (want[i] == StatusCode::kOk) ExpectVersion(*store, keys[i], 2);
  }
  ExpectUsage(*store, 1, {.blocks = 3, .host_blocks = 3, .quota_rejections = 2});
  ExpectUsage(*store, 2, {.blocks = 2, .host_blocks = 2, .quota_rejections = 1});
  ExpectUsage(*store, 3, {.blocks = 1, .host_blocks = 1});

  // Alone, namespace 2's third block evicts its least recently used block (memory only:
  // lost), not namespace 1's or 3's.
  ExpectVersion(*store, Key(5, 0, 0, 2), 2);  // now 5/0/1 is its least recently used
  ASSERT_TRUE(PutVersion(*store, Key(5, 0, 2, 2), 3).ok());
  EXPECT_FALSE(store->Contains(Key(5, 0, 1, 2)));
  EXPECT_TRUE(store->Contains(Key(5, 0, 0, 2)));
  ExpectUsage(*store, 2,
              {.blocks = 2, .host_blocks = 2, .quota_rejections = 1, .quota_evictions = 1});
  ExpectUsage(*store, 1, {.blocks = 3, .host_blocks = 3, .quota_rejections = 2});
  ExpectUsage(*store, 3, {.blocks = 1, .host_blocks = 1});
  EXPECT_EQ(store->Stats().evictions_lost, 1u);
}

// PutFromPagedCache: members its quotas refuse get their status, the others are gathered
// from their own pages.
TEST(StoreQuotaTest, PutFromPagedCacheMembersGetTheirOwnStatus) {
  StoreOptions o = MemoryOptions(64);
  o.host_memory = HostMemoryKind::kPlain;  // the gather runs on the CPU
  o.quotas = {Quota(1, 0, 1), Quota(2, 1, 0)};
  auto store = MustOpen(o);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(PutVersion(*store, Key(1, 0, 0, 1), 1).ok());  // namespace 1 is full

  constexpr uint32_t kPageSize = 4, kPerBlock = 16 / kPageSize;
  testing::HostPagedCache cache(SmallLayout(), PagedLayout::kNHD, false, kPageSize, 32,
                                std::random_device{}());
  // Namespace 2 (host quota 1): the first fits, the second is refused; namespace 3 fits;
  // namespace 1 (disk quota 1, full): a new key is refused, a replacement fits.
  const std::vector<BlockKey> keys = {Key(4, 0, 0, 2), Key(4, 0, 1, 2), Key(4, 0, 0, 3),
                                      Key(1, 0, 1, 1), Key(1, 0, 0, 1)};
  const std::vector<bool> stored = {true, false, true, false, true};
  std::vector<int32_t> table(keys.size() * kPerBlock);
  std::iota(table.rbegin(), table.rend(), 3);  // distinct pages, in reverse
  std::vector<Status> statuses(keys.size());
  Status s = store->PutFromPagedCache(keys, cache.desc, cache.k.data(), cache.v.data(), table,
                                      nullptr, statuses);
  EXPECT_EQ(s.code(), StatusCode::kQuotaExceeded) << s.ToString();
  std::vector<std::byte> out(store->block_bytes());
  for (size_t i = 0; i < keys.size(); ++i) {
    SCOPED_TRACE(keys[i].ToString());
    EXPECT_EQ(statuses[i].code(), stored[i] ? StatusCode::kOk : StatusCode::kQuotaExceeded)
        << statuses[i].ToString();
    if (!stored[i]) {
      EXPECT_FALSE(store->Contains(keys[i]));
      continue;
    }
    ASSERT_TRUE(store->Get(keys[i], out.data(), out.size()).ok());
    std::vector<int32_t> pages(table.begin() + i * kPerBlock, table.begin() + (i + 1) * kPerBlock);
    EXPECT_EQ(out, cache.ExpectedBlock(pages));
  }
  ExpectUsage(*store, 1, {.blocks = 1, .host_blocks = 1, .quota_rejections = 1});
  ExpectUsage(*store, 2, {.blocks = 1, .host_blocks = 1, .quota_rejections = 1});
  ExpectUsage(*store, 3, {.blocks = 1, .host_blocks = 1});
  EXPECT_EQ(store->Stats().host_pinned_slots, 0u);
}

// The host quota with a disk tier: the namespace's own LRU block goes to disk, stays
// readable byte-exact, and comes back within the quota; other namespaces keep theirs.
TEST(StoreQuotaTest, HostQuotaEvictsOwnLruToDiskAndPromotesWithinIt) {
  TempDir dir;
  StoreOptions o = DiskOptions(dir.path(), 32);
  constexpr uint32_t kNs = 1, kOther = 2;
  o.quotas = {Quota(kNs, 4, 0)};
  auto store = MustOpen(o);
  ASSERT_NE(store, nullptr);
  for (uint32_t b = 0; b < 8; ++b) ASSERT_TRUE(PutVersion(*store, Key(20, 1, b, kOther), 1).ok());
  for (uint32_t b = 0; b < 4; ++b) ASSERT_TRUE(PutVersion(*store, Key(10, 0, b, kNs), 1).ok());
  ASSERT_TRUE(store->Flush().ok());  // every block clean (evictable)
  for (uint32_t b = 0; b < 4; ++b) ExpectVersion(*store, Key(10, 0, b, kNs), 1);  // LRU: 0..3
  ExpectUsage(*store, kNs, {.blocks = 4, .host_blocks = 4});
  const StoreStats before = store->Stats();
  EXPECT_EQ(before.evictions, 0u);
  EXPECT_EQ(before.host_blocks, 12u);

  // A fifth block: block 0 (its LRU) goes to disk.
  ASSERT_TRUE(PutVersion(*store, Key(10, 0, 4, kNs), 1).ok());
  ExpectUsage(*store, kNs, {.blocks = 5, .host_blocks = 4, .quota_evictions = 1});
  ASSERT_TRUE(store->Flush().ok());
  for (uint32_t b = 1; b < 4; ++b) ExpectVersion(*store, Key(10, 0, b, kNs), 1);
  EXPECT_EQ(store->Stats().disk_reads, before.disk_reads);  // 1..3 were resident
  // LRU now: 4 (cleaned by the flush before 1..3 were read), 1, 2, 3.

  // Block 0 comes back from disk, byte-exact, evicting block 4.
  ExpectVersion(*store, Key(10, 0, 0, kNs), 1);
  EXPECT_EQ(store->Stats().disk_reads, before.disk_reads + 1);
  ExpectUsage(*store, kNs, {.blocks = 5, .host_blocks = 4, .quota_evictions = 2});
  // And block 4, evicting block 1.
  ExpectVersion(*store, Key(10, 0, 4, kNs), 1);
  EXPECT_EQ(store->Stats().disk_reads, before.disk_reads + 2);
  ExpectUsage(*store, kNs, {.blocks = 5, .host_blocks = 4, .quota_evictions = 3});
  for (uint32_t b : {2u, 3u, 0u, 4u}) ExpectVersion(*store, Key(10, 0, b, kNs), 1);
  EXPECT_EQ(store->Stats().disk_reads, before.disk_reads + 2);
  ExpectVersion(*store, Key(10, 0, 1, kNs), 1);
  EXPECT_EQ(store->Stats().disk_reads, before.disk_reads + 3);

  // The other namespace lost nothing to it: all 8 still resident.
  ExpectUsage(*store, kOther, {.blocks = 8, .host_blocks = 8});
  const uint64_t reads = store->Stats().disk_reads;
  for (uint32_t b = 0; b < 8; ++b) ExpectVersion(*store, Key(20, 1, b, kOther), 1);
  EXPECT_EQ(store->Stats().disk_reads, reads);
  const StoreStats after = store->Stats();
  EXPECT_EQ(after.evictions, 4u);  // the quota's, and no other
  EXPECT_EQ(after.host_blocks, 12u);

  // Replacing a resident block at the quota evicts nothing.
  ASSERT_TRUE(PutVersion(*store, Key(10, 0, 1, kNs), 2).ok());
  ExpectUsage(*store, kNs, {.blocks = 5, .host_blocks = 4, .quota_evictions = 4});
  ExpectVersion(*store, Key(10, 0, 1, kNs), 2);
}

// The GPU tier pulls blocks through the host tier: its promotions respect the quota too,
// keeping what fits and reading the rest through, and the Acquire still succeeds.
TEST(StoreQuotaTest, GpuTierPromotionsRespectTheHostQuota) {
  TempDir dir;
  StoreOptions o = DiskOptions(dir.path(), 32);
  o.quotas = {Quota(1, 4, 0)};
  o.retrieval.enabled = true;
  o.retrieval.top_k = 4;
  o.retrieval.n_init = 16;
  o.retrieval.n_local = 32;
  o.retrieval.device_capacity_bytes = 16 * kSlot;
  o.retrieval.force_emulated_device = true;
  auto store = MustOpen(o);
  ASSERT_NE(store, nullptr);
  const uint64_t bb = store->block_bytes();
  std::vector<std::vector<std::byte>> blocks;
  std::mt19937_64 rng(std::random_device{}());
  for (uint32_t b = 0; b < 12; ++b) {
    blocks.emplace_back(bb);
    for (size_t i = 0; i < bb; i += 2) {  // small fp16 values: finite summaries
      const uint16_t v = static_cast<uint16_t>(0x2000 | (rng() & 0x83ff));
      std::memcpy(&blocks[b][i], &v, 2);
    }
    ASSERT_TRUE(store->Put(Key(9, 0, b, 1), blocks[b].data(), bb).ok());
  }
  ASSERT_TRUE(store->Flush().ok());
  // Which 4 stayed depends on the order the writes completed; reading 8..11 makes them
  // the resident ones (each read evicts, if anything, a block read longest ago).
  std::vector<std::byte> out(bb);
  for (uint32_t b = 8; b < 12; ++b) {
    ASSERT_TRUE(store->Get(Key(9, 0, b, 1), out.data(), bb).ok());
    ASSERT_EQ(out, blocks[b]);
  }
  const uint64_t evictions = store->Usage(1).quota_evictions;
  EXPECT_GE(evictions, 8u);
  ExpectUsage(*store, 1, {.blocks = 12, .host_blocks = 4, .quota_evictions = evictions});

  // Blocks 0..5 are on disk only: 0..3 are promoted (evicting 8..11), 4 and 5 read through.
  const std::vector<int64_t> want = {0, 1, 2, 3, 4, 5};
  std::vector<uint64_t> addrs(want.size());
  auto info = store->Acquire(1, SequenceId{0, 9}, 0, want, nullptr, addrs);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->from_disk, 6u);
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NE(addrs[i], 0u);
    EXPECT_EQ(std::memcmp(reinterpret_cast<const void*>(addrs[i]), blocks[want[i]].data(), bb), 0)
        << "block " << want[i];
  }
  ASSERT_TRUE(store->Release(info->lease).ok());
  ExpectUsage(*store, 1, {.blocks = 12, .host_blocks = 4, .quota_evictions = evictions + 4});
  EXPECT_EQ(store->Stats().host_pinned_slots, 0u);
  EXPECT_EQ(store->Stats().host_blocks, 4u);
}

// Write-back: at the host quota with every block of the namespace dirty, a Put starts
// writing them and waits (wait_when_full), or fails with QuotaExceeded (not waiting).
TEST(StoreQuotaTest, HostQuotaFullOfDirtyBlocksWaitsOrFails) {
  for (bool wait : {false, true}) {
    SCOPED_TRACE(wait ? "wait_when_full" : "no wait");
    TempDir dir;
    StoreOptions o = DiskOptions(dir.path(), 32);
    o.write_through = false;
    o.wait_when_full = wait;
    o.quotas = {Quota(1, 2, 0)};
    auto store = MustOpen(o);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(PutVersion(*store, Key(1, 0, 0, 1), 1).ok());
    ASSERT_TRUE(PutVersion(*store, Key(1, 0, 1, 1), 1).ok());
    EXPECT_EQ(store->Stats().dirty_blocks, 2u);
    Status third = PutVersion(*store, Key(1, 0, 2, 1), 1);
    if (wait) {
      ASSERT_TRUE(third.ok()) << third.ToString();
      ExpectUsage(*store, 1, {.blocks = 3, .host_blocks = 2, .quota_evictions = 1});
    } else {
      EXPECT_EQ(third.code(), StatusCode::kQuotaExceeded) << third.ToString();
      EXPECT_NE(third.message().find("host quota"), std::string::npos) << third.ToString();
      ExpectUsage(*store, 1, {.blocks = 2, .host_blocks = 2, .quota_rejections = 1});
      ASSERT_TRUE(store->Flush().ok());  // the Put started their writes: now clean
      ASSERT_TRUE(PutVersion(*store, Key(1, 0, 2, 1), 1).ok());
      ExpectUsage(*store, 1,
                  {.blocks = 3, .host_blocks = 2, .quota_rejections = 1, .quota_evictions = 1});
    }
    ASSERT_TRUE(store->Flush().ok());
    for (uint32_t b = 0; b < 3; ++b) ExpectVersion(*store, Key(1, 0, b, 1), 1);
  }
}

// Usage is rebuilt from the catalog at Open; a smaller disk quota then refuses new keys.
TEST(StoreQuotaTest, ReopenRebuildsUsageFromTheCatalog) {
  TempDir dir;
  StoreOptions o = DiskOptions(dir.path(), 32);
  o.quotas = {Quota(1, 4, 10)};
  {
    auto store = MustOpen(o);
    ASSERT_NE(store, nullptr);
    for (uint32_t b = 0; b < 6; ++b) ASSERT_TRUE(PutVersion(*store, Key(1, 0, b, 1), 1).ok());
    for (uint32_t b = 0; b < 3; ++b) ASSERT_TRUE(PutVersion(*store, Key(2, 1, b, 2), 1).ok());
    ASSERT_TRUE(store->Delete(Key(1, 0, 5, 1)).ok());  // resident: blocks 4 and 5 evicted 0, 1
    ExpectUsage(*store, 1, {.blocks = 5, .host_blocks = 3, .quota_evictions = 2});
    ExpectUsage(*store, 2, {.blocks = 3, .host_blocks = 3});
  }
  {
    auto store = MustOpen(o);
    ASSERT_NE(store, nullptr);
    ExpectUsage(*store, 1, {.blocks = 5});  // on disk, none resident yet
    ExpectUsage(*store, 2, {.blocks = 3});
    ExpectVersion(*store, Key(1, 0, 0, 1), 1);
    ExpectUsage(*store, 1, {.blocks = 5, .host_blocks = 1});
    for (uint32_t b = 10; b < 15; ++b) ASSERT_TRUE(PutVersion(*store, Key(1, 0, b, 1), 1).ok());
    EXPECT_EQ(PutVersion(*store, Key(1, 0, 15, 1), 1).code(), StatusCode::kQuotaExceeded);
    ExpectUsage(*store, 1,
                {.blocks = 10, .host_blocks = 4, .quota_rejections = 1, .quota_evictions = 2});
  }
  o.quotas = {Quota(1, 4, 3)};
  {
    auto store = MustOpen(o);
    ASSERT_NE(store, nullptr);
    ExpectUsage(*store, 1, {.blocks = 10});
    EXPECT_EQ(PutVersion(*store, Key(1, 0, 20, 1), 1).code(), StatusCode::kQuotaExceeded);
    ASSERT_TRUE(PutVersion(*store, Key(1, 0, 3, 1), 2).ok());  // a replacement
    ExpectUsage(*store, 1, {.blocks = 10, .host_blocks = 1, .quota_rejections = 1});
    auto dropped = store->DropSequence(1, SequenceId{0, 1});
    ASSERT_TRUE(dropped.ok());
    EXPECT_EQ(*dropped, 10u);
    ExpectUsage(*store, 1, {.quota_rejections = 1});
    ExpectUsage(*store, 2, {.blocks = 3});
  }
}

// A memory-only store under pressure (no quota): evicted blocks are lost and leave the
// usage of their namespace.
TEST(StoreQuotaTest, MemoryOnlyEvictionsLeaveTheUsage) {
  auto store = MustOpen(MemoryOptions(6));
  ASSERT_NE(store, nullptr);
  for (uint32_t b = 0; b < 4; ++b) ASSERT_TRUE(PutVersion(*store, Key(1, 0, b, 1), 1).ok());
  for (uint32_t b = 0; b < 5; ++b) ASSERT_TRUE(PutVersion(*store, Key(2, 0, b, 2), 1).ok());
  // Nine blocks in six slots: namespace 1's three oldest went.
  ExpectUsage(*store, 1, {.blocks = 1, .host_blocks = 1});
  ExpectUsage(*store, 2, {.blocks = 5, .host_blocks = 5});
  EXPECT_EQ(store->Stats().evictions_lost, 3u);
  EXPECT_TRUE(store->Contains(Key(1, 0, 3, 1)));
}

// Random operations in a disk store against a model of what each namespace holds: the
// disk quota refuses exactly the new keys past it, blocks match the model, resident
// blocks stay within the host quota and add up to the host tier's.
TEST(StoreQuotaTest, RandomOperationsMatchModel) {
  TempDir dir;
  StoreOptions o = DiskOptions(dir.path(), 24, 512);
  o.quotas = {Quota(1, 5, 12), Quota(2, 3, 0), Quota(3, 0, 9)};  // namespace 4: none
  const uint64_t host_limit[5] = {0, 5, 3, UINT64_MAX, UINT64_MAX};
  const uint64_t disk_limit[5] = {0, 12, UINT64_MAX, 9, UINT64_MAX};
  auto store = MustOpen(o);
  ASSERT_NE(store, nullptr);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::map<BlockKey, uint64_t> model;  // key -> version
  uint64_t rejections[5] = {};
  uint64_t version = 0;
  for (int step = 0; step < 3000; ++step) {
    const uint32_t ns = 1 + rng() % 4;
    const BlockKey key = Key(rng() % 3, rng() % 4, rng() % 6, ns);
    const int op = rng() % 10;
    if (op < 6) {
      uint64_t held = 0;
      for (const auto& [k, v] : model) held += k.namespace_id == ns;
      const bool refuse = !model.contains(key) && held >= disk_limit[ns];
      Status s = PutVersion(*store, key, ++version);
      if (refuse) {
        ASSERT_EQ(s.code(), StatusCode::kQuotaExceeded) << key.ToString() << ": " << s.ToString();
        ++rejections[ns];
      } else {
        ASSERT_TRUE(s.ok()) << key.ToString() << ": " << s.ToString();
        model[key] = version;
      }
    } else if (op < 8) {
      auto it = model.find(key);
      if (it == model.end()) {
        std::vector<std::byte> out(store->block_bytes());
        ASSERT_EQ(store->Get(key, out.data(), out.size()).code(), StatusCode::kNotFound);
      } else {
        ExpectVersion(*store, key, it->second);
      }
    } else if (op < 9) {
      Status s = store->Delete(key);
      ASSERT_EQ(s.ok(), model.erase(key) == 1) << s.ToString();
    } else {
      auto n = store->DropSequence(ns, key.sequence);
      ASSERT_TRUE(n.ok());
      uint64_t erased = std::erase_if(model, [&](const auto& kv) {
        return kv.first.namespace_id == ns && kv.first.sequence == key.sequence;
      });
      ASSERT_EQ(*n, erased);
    }
    uint64_t host_total = 0;
    for (uint32_t n = 1; n <= 4; ++n) {
      uint64_t held = 0;
      for (const auto& [k, v] : model) held += k.namespace_id == n;
      const NamespaceUsage u = store->Usage(n);
      ASSERT_EQ(u.blocks, held) << "namespace " << n << " step " << step;
      ASSERT_LE(u.host_blocks, std::min(u.blocks, host_limit[n])) << "namespace " << n;
      ASSERT_EQ(u.quota_rejections, rejections[n]) << "namespace " << n;
      host_total += u.host_blocks;
    }
    ASSERT_EQ(store->Stats().host_blocks, host_total) << "step " << step;
  }
  ASSERT_TRUE(store->Flush().ok());
  for (const auto& [k, v] : model) ExpectVersion(*store, k, v);
}

// Threads putting, reading and deleting in two namespaces with quotas: the counts stay
// exact (checked once the threads are done) and the quotas hold.
TEST(StoreQuotaTest, ConcurrentOperationsKeepExactCounts) {
  TempDir dir;
  StoreOptions o = DiskOptions(dir.path(), 32, 1024);
  o.quotas = {Quota(1, 6, 40), Quota(2, 4, 0)};
  auto store = MustOpen(o);
  ASSERT_NE(store, nullptr);
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t * 7919 + 1);
      for (int i = 0; i < 600; ++i) {
        const uint32_t ns = 1 + rng() % 3;
        const BlockKey key = Key(rng() % 4, rng() % 4, rng() % 8, ns);
        switch (rng() % 4) {
          case 0:
          case 1: {
            Status s = PutVersion(*store, key, 1);
            EXPECT_TRUE(s.ok() || s.code() == StatusCode::kQuotaExceeded) << s.ToString();
            break;
          }
          case 2: {
            std::vector<std::byte> out(store->block_bytes());
            Status s = store->Get(key, out.data(), out.size());
            EXPECT_TRUE(s.ok() || s.code() == StatusCode::kNotFound) << s.ToString();
            if (s.ok()) {
              EXPECT_TRUE(HoldsVersion(out, key, 1));
            }
            break;
          }
          default:
            (void)store->Delete(key);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(store->Flush().ok());
  uint64_t host_total = 0;
  for (uint32_t ns = 1; ns <= 3; ++ns) {
    uint64_t held = 0;
    for (uint32_t s = 0; s < 4; ++s) {
      for (uint32_t l = 0; l < 4; ++l) {
        for (uint32_t b = 0; b < 8; ++b) held += store->Contains(Key(s, l, b, ns));
      }
    }
    const NamespaceUsage u = store->Usage(ns);
    EXPECT_EQ(u.blocks, held) << "namespace " << ns;
    host_total += u.host_blocks;
  }
  EXPECT_LE(store->Usage(1).blocks, 40u);
  EXPECT_LE(store->Usage(1).host_blocks, 6u);
  EXPECT_LE(store->Usage(2).host_blocks, 4u);
  EXPECT_EQ(store->Stats().host_blocks, host_total);
}

}  // namespace
}  // namespace kvtier
