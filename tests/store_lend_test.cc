// Store::Borrow and Store::Reserve (kvtier/store.h) on every kind of Store: embedded
// (host-tier slots pinned in place), a sidecar client over its Unix socket (staging slots
// lent) and over TCP (memory of the client's own). Byte-exact loans that outlive
// overwrites and deletes, Commit's contract, the staging area's limits (ResourceExhausted
// rather than a hang), loans across a daemon restart, loans under concurrent traffic, and
// an embedded Borrow that promotes from disk.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/client.h"
#include "kvtier/store.h"
#include "tests/client_test_util.h"
#include "tests/test_util.h"

namespace kvtier {
namespace {

using testing::Eventually;
using testing::MemoryStore;
using testing::RandomBlock;
using testing::Sidecar;
using testing::SmallLayout;
using testing::TempDir;

using Bytes = std::vector<std::byte>;

// Whether a lent block holds `want`; else where the first difference is.
::testing::AssertionResult Holds(std::span<const std::byte> block, const Bytes& want) {
  if (block.size() != want.size()) {
    return ::testing::AssertionFailure() << block.size() << " bytes, " << want.size() << " wanted";
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if (block[i] != want[i]) return ::testing::AssertionFailure() << "differs at byte " << i;
  }
  return ::testing::AssertionSuccess();
}

bool Connected(const Store& store) {
  std::optional<SidecarStatus> s = GetSidecarStatus(store);
  return s.has_value() && s->connected;
}

enum class Backend { kEmbedded, kUnix, kTcp };

std::string BackendName(const ::testing::TestParamInfo<Backend>& info) {
  switch (info.param) {
    case Backend::kEmbedded:
      return "Embedded";
    case Backend::kUnix:
      return "SidecarUnix";
    case Backend::kTcp:
      return "SidecarTcp";
  }
  return "Unknown";
}

constexpr uint32_t kStagingBlocks = 8;
constexpr uint32_t kTcpNamespace = 4;

// One store of GetParam()'s kind, holding 256 blocks of SmallLayout().
class StoreLendTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    const StoreOptions backing = MemoryStore(layout_, 256);
    switch (GetParam()) {
      case Backend::kEmbedded: {
        auto store = Store::Open(backing, layout_);
        ASSERT_TRUE(store.ok()) << store.status().ToString();
        store_ = std::move(store).value();
        break;
      }
      case Backend::kUnix:
        sidecar_ = std::make_unique<Sidecar>(backing, layout_);
        ASSERT_TRUE(sidecar_->StartServer());
        store_ = sidecar_->Open(sidecar_->ClientOptions(kStagingBlocks), layout_);
        ASSERT_NE(store_, nullptr);
        ASSERT_TRUE(GetSidecarStatus(*store_)->shared_memory);
        break;
      case Backend::kTcp: {
        server::ServerOptions so;
        so.tcp_listen = "127.0.0.1:0";
        so.namespaces.push_back(server::NamespaceConfig{
            .id = kTcpNamespace, .name = "tcp", .uids = {}, .gids = {}, .tokens = {"s3cret"}});
        sidecar_ = std::make_unique<Sidecar>(backing, layout_, so);
        ASSERT_TRUE(sidecar_->StartServer());
        ASSERT_NE(sidecar_->server()->tcp_port(), 0);
        StoreOptions o;
        o.sidecar.tcp_address = "127.0.0.1:" + std::to_string(sidecar_->server()->tcp_port());
        o.sidecar.namespace_id = kTcpNamespace;
        o.sidecar.token = "s3cret";
        o.sidecar.connect_timeout_ms = 3000;
        o.sidecar.staging_blocks = kStagingBlocks;
        store_ = sidecar_->Open(o, layout_);
        ASSERT_NE(store_, nullptr);
        ASSERT_FALSE(GetSidecarStatus(*store_)->shared_memory);
        break;
      }
    }
  }
  void TearDown() override {
    store_.reset();  // before the daemon
    sidecar_.reset();
  }

  // A key in the namespace this store's client works in.
  BlockKey K(uint64_t sequence, uint32_t layer, uint32_t block) const {
    return testing::Key(sequence, layer, block, GetParam() == Backend::kTcp ? kTcpNamespace : 0);
  }
  Bytes Random() { return RandomBlock(store_->block_bytes(), rng_); }
  void MustPut(const BlockKey& key, const Bytes& block) {
    ASSERT_TRUE(store_->Put(key, block.data(), block.size()).ok()) << key.ToString();
  }
  // The block under `key`, or nullopt when Get says NotFound.
  std::optional<Bytes> MustGet(const BlockKey& key) {
    Bytes got(store_->block_bytes());
    const Status s = store_->Get(key, got.data(), got.size());
    if (s.code() == StatusCode::kNotFound) return std::nullopt;
    EXPECT_TRUE(s.ok()) << key.ToString() << ": " << s.ToString();
    return got;
  }

  const ModelLayout layout_ = SmallLayout();
  std::unique_ptr<Sidecar> sidecar_;
  std::unique_ptr<Store> store_;
  std::mt19937_64 rng_{20261215};
};

TEST_P(StoreLendTest, BorrowReturnsTheBytesPutAndNotFoundForAMissingKey) {
  const uint32_t n = 6;  // and one missing key: 7 members, within the 8 staging slots
  std::vector<BlockKey> keys;
  std::vector<Bytes> want;
  for (uint32_t i = 0; i < n; ++i) {
    keys.push_back(K(1, i % layout_.num_layers, i));
    want.push_back(Random());
    MustPut(keys.back(), want.back());
  }
  const size_t missing = 3;
  keys.insert(keys.begin() + missing, K(2, 0, 77));
  want.insert(want.begin() + missing, Bytes());

  const StoreStats before = store_->Stats();
  std::vector<Status> statuses(keys.size());
  std::unique_ptr<BorrowedBlocks> blocks;
  const Status s = store_->Borrow(keys, statuses, &blocks);
  EXPECT_EQ(s.code(), StatusCode::kNotFound) << s.ToString();
  ASSERT_NE(blocks, nullptr);
  ASSERT_EQ(blocks->size(), keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    if (i == missing) {
      EXPECT_EQ(statuses[i].code(), StatusCode::kNotFound) << statuses[i].ToString();
      EXPECT_TRUE(blocks->block(i).empty());
      continue;
    }
    ASSERT_TRUE(statuses[i].ok()) << i << ": " << statuses[i].ToString();
    ASSERT_EQ(blocks->block(i).size(), store_->block_bytes()) << i;
    EXPECT_TRUE(Holds(blocks->block(i), want[i])) << i;
  }
  const StoreStats after = store_->Stats();
  EXPECT_EQ(after.gets, before.gets + n);
  EXPECT_EQ(after.get_misses, before.get_misses + 1);
  EXPECT_EQ(after.bytes_got, before.bytes_got + n * store_->block_bytes());
  if (GetParam() == Backend::kEmbedded) {
    EXPECT_EQ(after.host_pinned_slots, n);
  }
  blocks.reset();
  EXPECT_EQ(store_->Stats().host_pinned_slots, 0u);

  // Every member found: OK.
  keys.erase(keys.begin() + missing);
  want.erase(want.begin() + missing);
  statuses.resize(keys.size());
  ASSERT_TRUE(store_->Borrow(keys, statuses, &blocks).ok());
  for (size_t i = 0; i < keys.size(); ++i) EXPECT_TRUE(Holds(blocks->block(i), want[i])) << i;
}

TEST_P(StoreLendTest, BorrowRefusesBadArgumentsAndChecksEachKey) {
  const BlockKey key = K(1, 0, 0);
  const Bytes v = Random();
  MustPut(key, v);
  std::unique_ptr<BorrowedBlocks> blocks;
  // Statuses of the wrong size: nothing is done, *blocks is not set.
  std::vector<BlockKey> keys = {key};
  std::vector<Status> two(2);
  EXPECT_EQ(store_->Borrow(keys, two, &blocks).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(blocks, nullptr);
  // No keys: an empty loan.
  ASSERT_TRUE(store_->Borrow({}, {}, &blocks).ok());
  ASSERT_NE(blocks, nullptr);
  EXPECT_EQ(blocks->size(), 0u);
  // A layer outside the layout fails that member only.
  keys = {K(1, layout_.num_layers, 0), key};
  std::vector<Status> statuses(2);
  EXPECT_EQ(store_->Borrow(keys, statuses, &blocks).code(), StatusCode::kInvalidArgument);
  ASSERT_NE(blocks, nullptr);
  ASSERT_EQ(blocks->size(), 2u);
  EXPECT_EQ(statuses[0].code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(blocks->block(0).empty());
  ASSERT_TRUE(statuses[1].ok()) << statuses[1].ToString();
  EXPECT_TRUE(Holds(blocks->block(1), v));
}

TEST_P(StoreLendTest, ABorrowedBlockOutlivesItsOverwriteAndDelete) {
  const BlockKey a = K(1, 0, 0), b = K(1, 1, 0);
  const Bytes a1 = Random(), b1 = Random(), a2 = Random();
  MustPut(a, a1);
  MustPut(b, b1);
  std::vector<BlockKey> keys = {a, b};
  std::vector<Status> statuses(2);
  std::unique_ptr<BorrowedBlocks> blocks;
  ASSERT_TRUE(store_->Borrow(keys, statuses, &blocks).ok());

  MustPut(a, a2);
  ASSERT_TRUE(store_->Delete(b).ok());
  EXPECT_FALSE(store_->Contains(b));
  EXPECT_EQ(MustGet(a), a2);  // the store serves the new bytes meanwhile...
  EXPECT_EQ(MustGet(b), std::nullopt);
  EXPECT_TRUE(Holds(blocks->block(0), a1));  // ... and the loan keeps the old ones
  EXPECT_TRUE(Holds(blocks->block(1), b1));
  if (GetParam() == Backend::kEmbedded) {
    // The old slots stay pinned (retired); a2's is a new one.
    EXPECT_EQ(store_->Stats().host_pinned_slots, 2u);
  }
  // Overwriting again and again while borrowed leaks nothing.
  for (int i = 0; i < 20; ++i) MustPut(a, Random());
  MustPut(a, a2);
  EXPECT_TRUE(Holds(blocks->block(0), a1));

  blocks.reset();
  EXPECT_EQ(MustGet(a), a2);
  EXPECT_EQ(MustGet(b), std::nullopt);
  EXPECT_FALSE(store_->Contains(b));
  const StoreStats stats = store_->Stats();
  EXPECT_EQ(stats.host_pinned_slots, 0u);
  EXPECT_EQ(stats.host_blocks, 1u);
}

TEST_P(StoreLendTest, ReserveCommitPutsTheBuffers) {
  const uint32_t n = 5;
  std::vector<BlockKey> keys;
  std::vector<Bytes> want;
  for (uint32_t i = 0; i < n; ++i) {
    keys.push_back(K(3, i % layout_.num_layers, i));
    want.push_back(Random());
  }
  Result<std::unique_ptr<PutBuffers>> reserved = store_->Reserve(n);
  ASSERT_TRUE(reserved.ok()) << reserved.status().ToString();
  PutBuffers& buffers = **reserved;
  ASSERT_EQ(buffers.size(), n);
  for (uint32_t i = 0; i < n; ++i) {
    ASSERT_EQ(buffers.buffer(i).size(), store_->block_bytes());
    std::memcpy(buffers.buffer(i).data(), want[i].data(), want[i].size());
  }
  const StoreStats before = store_->Stats();

  // Wrong sizes: InvalidArgument, nothing done, the buffers still lent.
  std::vector<Status> statuses(n);
  EXPECT_EQ(buffers.Commit(std::span(keys).first(n - 1), statuses).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(buffers.Commit(keys, std::span(statuses).first(n - 1)).code(),
            StatusCode::kInvalidArgument);
  for (const BlockKey& key : keys) EXPECT_FALSE(store_->Contains(key)) << key.ToString();
  EXPECT_EQ(store_->Stats().puts, before.puts);
  for (uint32_t i = 0; i < n; ++i) {
    ASSERT_EQ(buffers.buffer(i).size(), store_->block_bytes());
    EXPECT_TRUE(Holds(buffers.buffer(i), want[i]));
  }

  ASSERT_TRUE(buffers.Commit(keys, statuses).ok());
  for (const Status& s : statuses) EXPECT_TRUE(s.ok()) << s.ToString();
  for (uint32_t i = 0; i < n; ++i) EXPECT_TRUE(buffers.buffer(i).empty()) << i;
  EXPECT_EQ(store_->Stats().puts, before.puts + n);
  for (uint32_t i = 0; i < n; ++i) EXPECT_EQ(MustGet(keys[i]), want[i]) << i;

  // Once only, and a second Commit changes nothing.
  EXPECT_EQ(buffers.Commit(keys, statuses).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->Stats().puts, before.puts + n);
  for (uint32_t i = 0; i < n; ++i) EXPECT_EQ(MustGet(keys[i]), want[i]) << i;

  EXPECT_EQ(store_->Reserve(0).status().code(), StatusCode::kInvalidArgument);
}

TEST_P(StoreLendTest, CommitReportsEachMembersOutcome) {
  Result<std::unique_ptr<PutBuffers>> reserved = store_->Reserve(2);
  ASSERT_TRUE(reserved.ok()) << reserved.status().ToString();
  const Bytes v = Random();
  std::memcpy((*reserved)->buffer(0).data(), v.data(), v.size());
  std::memcpy((*reserved)->buffer(1).data(), v.data(), v.size());
  std::vector<BlockKey> keys = {K(4, layout_.num_layers, 0), K(4, 0, 0)};
  std::vector<Status> statuses(2);
  EXPECT_EQ((*reserved)->Commit(keys, statuses).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(statuses[0].code(), StatusCode::kInvalidArgument) << statuses[0].ToString();
  EXPECT_TRUE(statuses[1].ok()) << statuses[1].ToString();
  EXPECT_EQ(MustGet(keys[1]), v);
}

TEST_P(StoreLendTest, PutBuffersDestroyedWithoutCommitPutNothing) {
  const StoreStats before = store_->Stats();
  std::vector<BlockKey> keys = {K(5, 0, 0), K(5, 1, 0), K(5, 2, 0)};
  {
    Result<std::unique_ptr<PutBuffers>> reserved = store_->Reserve(keys.size());
    ASSERT_TRUE(reserved.ok()) << reserved.status().ToString();
    for (size_t i = 0; i < keys.size(); ++i) {
      const Bytes v = Random();
      std::memcpy((*reserved)->buffer(i).data(), v.data(), v.size());
    }
  }
  for (const BlockKey& key : keys) {
    EXPECT_FALSE(store_->Contains(key)) << key.ToString();
    EXPECT_EQ(MustGet(key), std::nullopt);
  }
  const StoreStats after = store_->Stats();
  EXPECT_EQ(after.puts, before.puts);
  EXPECT_EQ(after.host_blocks, 0u);
  // Nothing stays lent: the whole staging area can be had again.
  Result<std::unique_ptr<PutBuffers>> all = store_->Reserve(kStagingBlocks);
  ASSERT_TRUE(all.ok()) << all.status().ToString();
}

// 4 threads each put and borrow their own blocks through loans of 2 (the whole staging
// area, at most), beside a fifth doing PutBatch and GetBatch, which over the Unix socket
// may find every staging slot lent (ResourceExhausted) but must never hang.
TEST_P(StoreLendTest, ConcurrentLoansAndTransfers) {
  const int kThreads = 4, kIterations = 300;
  const uint64_t bytes = store_->block_bytes();
  std::atomic<bool> lenders_done{false};
  std::atomic<int> lender_failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + t);
      for (int i = 0; i < kIterations && lender_failures == 0; ++i) {
        std::vector<BlockKey> keys = {K(10 + t, 0, i % 16), K(10 + t, 1, i % 16)};
        std::vector<Bytes> want = {RandomBlock(bytes, rng), RandomBlock(bytes, rng)};
        std::vector<Status> statuses(2);
        {
          Result<std::unique_ptr<PutBuffers>> reserved = store_->Reserve(2);
          if (!reserved.ok()) {
            ADD_FAILURE() << "Reserve: " << reserved.status().ToString();
            ++lender_failures;
            return;
          }
          for (int j = 0; j < 2; ++j) {
            std::memcpy((*reserved)->buffer(j).data(), want[j].data(), bytes);
          }
          const Status s = (*reserved)->Commit(keys, statuses);
          if (!s.ok()) {
            ADD_FAILURE() << "Commit: " << s.ToString();
            ++lender_failures;
            return;
          }
        }
        std::unique_ptr<BorrowedBlocks> blocks;
        const Status s = store_->Borrow(keys, statuses, &blocks);
        if (!s.ok()) {
          ADD_FAILURE() << "Borrow: " << s.ToString();
          ++lender_failures;
          return;
        }
        for (int j = 0; j < 2; ++j) {
          if (!Holds(blocks->block(j), want[j])) {
            ADD_FAILURE() << "thread " << t << " iteration " << i << ": " << keys[j].ToString()
                          << " borrowed other bytes than committed";
            ++lender_failures;
            return;
          }
        }
      }
    });
  }
  uint64_t transfers_ok = 0, transfers_refused = 0;
  std::thread transfers([&] {
    std::mt19937_64 rng(99);
    int after_lenders = 0;  // attempts once the lenders are done: a few suffice
    for (int i = 0; !lenders_done || (transfers_ok == 0 && ++after_lenders < 100); ++i) {
      std::vector<Bytes> want = {RandomBlock(bytes, rng), RandomBlock(bytes, rng),
                                 RandomBlock(bytes, rng)};
      std::vector<BlockWrite> writes;
      for (uint32_t j = 0; j < 3; ++j) writes.push_back({K(20, j, i % 8), want[j].data(), bytes});
      std::vector<Status> statuses(3);
      Status s = store_->PutBatch(writes, statuses);
      if (s.code() == StatusCode::kResourceExhausted && GetParam() == Backend::kUnix) {
        ++transfers_refused;
        continue;
      }
      ASSERT_TRUE(s.ok()) << "PutBatch: " << s.ToString();
      std::vector<Bytes> got(3, Bytes(bytes));
      std::vector<BlockRead> reads;
      for (uint32_t j = 0; j < 3; ++j) reads.push_back({writes[j].key, got[j].data(), bytes});
      s = store_->GetBatch(reads, statuses);
      if (s.code() == StatusCode::kResourceExhausted && GetParam() == Backend::kUnix) {
        ++transfers_refused;
        continue;
      }
      ASSERT_TRUE(s.ok()) << "GetBatch: " << s.ToString();
      for (uint32_t j = 0; j < 3; ++j) ASSERT_TRUE(Holds(got[j], want[j])) << i << " " << j;
      ++transfers_ok;
    }
  });
  for (std::thread& t : threads) t.join();
  lenders_done = true;
  transfers.join();
  RecordProperty("transfers_ok", std::to_string(transfers_ok));
  RecordProperty("transfers_refused", std::to_string(transfers_refused));
  EXPECT_EQ(lender_failures, 0);
  EXPECT_GT(transfers_ok, 0u) << transfers_refused << " refused";
  EXPECT_EQ(store_->Stats().host_pinned_slots, 0u);
  // Every loan was given back.
  if (GetParam() != Backend::kTcp) {
    Result<std::unique_ptr<PutBuffers>> all = store_->Reserve(kStagingBlocks);
    EXPECT_TRUE(all.ok()) << all.status().ToString();
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, StoreLendTest,
                         ::testing::Values(Backend::kEmbedded, Backend::kUnix, Backend::kTcp),
                         BackendName);

// --- The staging area's limits (sidecar over the Unix socket) --------------------------

class SidecarLendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sidecar_ = std::make_unique<Sidecar>(MemoryStore(layout_, 256), layout_);
    ASSERT_TRUE(sidecar_->StartServer());
    store_ = sidecar_->Open(sidecar_->ClientOptions(kStagingBlocks), layout_);
    ASSERT_NE(store_, nullptr);
    for (uint32_t i = 0; i < 2 * kStagingBlocks; ++i) {
      keys_.push_back(testing::Key(1, i % layout_.num_layers, i));
      blocks_.push_back(RandomBlock(store_->block_bytes(), rng_));
      ASSERT_TRUE(store_->Put(keys_[i], blocks_[i].data(), blocks_[i].size()).ok());
    }
  }
  void TearDown() override {
    store_.reset();
    sidecar_.reset();
  }

  // Borrows keys_[first, first + count) and checks their bytes.
  std::unique_ptr<BorrowedBlocks> MustBorrow(size_t first, size_t count) {
    std::vector<Status> statuses(count);
    std::unique_ptr<BorrowedBlocks> blocks;
    const Status s = store_->Borrow(std::span(keys_).subspan(first, count), statuses, &blocks);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (!s.ok()) return nullptr;
    for (size_t i = 0; i < count; ++i) {
      EXPECT_TRUE(Holds(blocks->block(i), blocks_[first + i])) << first + i;
    }
    return blocks;
  }

  // Every operation that needs a staging slot fails with ResourceExhausted, promptly;
  // those that need none work.
  void ExpectStarved() {
    std::vector<Status> one(1);
    std::unique_ptr<BorrowedBlocks> blocks;
    EXPECT_EQ(store_->Borrow(std::span(keys_).first(1), one, &blocks).code(),
              StatusCode::kResourceExhausted);
    EXPECT_EQ(one[0].code(), StatusCode::kResourceExhausted);
    ASSERT_NE(blocks, nullptr);
    EXPECT_TRUE(blocks->block(0).empty());
    EXPECT_EQ(store_->Reserve(1).status().code(), StatusCode::kResourceExhausted);

    const uint64_t bytes = store_->block_bytes();
    std::vector<Bytes> got(3, Bytes(bytes));
    std::vector<BlockRead> reads;
    for (size_t i = 0; i < 3; ++i) reads.push_back({keys_[i], got[i].data(), bytes});
    std::vector<Status> statuses(3);
    std::future<Status> get = store_->GetBatchAsync(reads, statuses);
    ASSERT_EQ(get.wait_for(std::chrono::seconds(10)), std::future_status::ready)
        << "GetBatch waits for staging slots that are all lent";
    EXPECT_EQ(get.get().code(), StatusCode::kResourceExhausted);
    for (const Status& s : statuses) EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);

    const Bytes v = RandomBlock(bytes, rng_);
    std::vector<BlockWrite> writes = {{testing::Key(9, 0, 0), v.data(), bytes},
                                      {testing::Key(9, 1, 0), v.data(), bytes}};
    std::vector<Status> put_statuses(2);
    std::future<Status> put = store_->PutBatchAsync(writes, put_statuses);
    ASSERT_EQ(put.wait_for(std::chrono::seconds(10)), std::future_status::ready)
        << "PutBatch waits for staging slots that are all lent";
    EXPECT_EQ(put.get().code(), StatusCode::kResourceExhausted);
    std::future<Status> single = store_->PutAsync(testing::Key(9, 2, 0), v.data(), bytes);
    ASSERT_EQ(single.wait_for(std::chrono::seconds(10)), std::future_status::ready);
    EXPECT_EQ(single.get().code(), StatusCode::kResourceExhausted);
    EXPECT_FALSE(store_->Contains(testing::Key(9, 0, 0)));
    EXPECT_FALSE(store_->Contains(testing::Key(9, 2, 0)));

    // Requests without block bytes need no slot.
    EXPECT_TRUE(store_->Contains(keys_[0]));
    EXPECT_EQ(store_->Stats().host_blocks, keys_.size());
    EXPECT_TRUE(Connected(*store_));
  }

  // Every staging-slot operation works.
  void ExpectWorks() {
    const uint64_t bytes = store_->block_bytes();
    std::vector<Bytes> got(keys_.size(), Bytes(bytes));
    std::vector<BlockRead> reads;
    for (size_t i = 0; i < keys_.size(); ++i) reads.push_back({keys_[i], got[i].data(), bytes});
    std::vector<Status> statuses(keys_.size());
    ASSERT_TRUE(store_->GetBatch(reads, statuses).ok());
    for (size_t i = 0; i < keys_.size(); ++i) EXPECT_TRUE(Holds(got[i], blocks_[i])) << i;
    { auto all = MustBorrow(kStagingBlocks, kStagingBlocks); }
    Result<std::unique_ptr<PutBuffers>> reserved = store_->Reserve(kStagingBlocks);
    EXPECT_TRUE(reserved.ok()) << reserved.status().ToString();
  }

  const ModelLayout layout_ = SmallLayout();
  std::unique_ptr<Sidecar> sidecar_;
  std::unique_ptr<Store> store_;
  std::mt19937_64 rng_{424242};
  std::vector<BlockKey> keys_;  // 2 * kStagingBlocks blocks, stored
  std::vector<Bytes> blocks_;
};

TEST_F(SidecarLendTest, ALoanLargerThanTheStagingAreaIsInvalid) {
  std::vector<Status> statuses(kStagingBlocks + 1);
  std::unique_ptr<BorrowedBlocks> blocks;
  EXPECT_EQ(store_->Borrow(std::span(keys_).first(kStagingBlocks + 1), statuses, &blocks).code(),
            StatusCode::kInvalidArgument);
  ASSERT_NE(blocks, nullptr);
  for (size_t i = 0; i < statuses.size(); ++i) {
    EXPECT_EQ(statuses[i].code(), StatusCode::kInvalidArgument) << i;
    EXPECT_TRUE(blocks->block(i).empty()) << i;
  }
  EXPECT_EQ(store_->Reserve(kStagingBlocks + 1).status().code(), StatusCode::kInvalidArgument);
  blocks.reset();
  ExpectWorks();
}

TEST_F(SidecarLendTest, WhenEverySlotIsBorrowedTransfersFailInsteadOfHanging) {
  std::unique_ptr<BorrowedBlocks> all = MustBorrow(0, kStagingBlocks);
  ASSERT_NE(all, nullptr);
  ExpectStarved();
  // The loan is intact.
  for (size_t i = 0; i < kStagingBlocks; ++i) EXPECT_TRUE(Holds(all->block(i), blocks_[i])) << i;
  all.reset();
  ExpectWorks();
}

TEST_F(SidecarLendTest, WhenEverySlotIsLentMixedTransfersFailInsteadOfHanging) {
  std::unique_ptr<BorrowedBlocks> some = MustBorrow(0, 3);
  ASSERT_NE(some, nullptr);
  Result<std::unique_ptr<PutBuffers>> rest = store_->Reserve(kStagingBlocks - 3);
  ASSERT_TRUE(rest.ok()) << rest.status().ToString();
  ExpectStarved();
  // Giving back the PutBuffers (uncommitted) frees its slots.
  rest->reset();
  {
    auto more = MustBorrow(3, kStagingBlocks - 3);
    ASSERT_NE(more, nullptr);
    ExpectStarved();
  }
  // A committed PutBuffers gives its slots back at the Commit.
  rest = store_->Reserve(kStagingBlocks - 3);
  ASSERT_TRUE(rest.ok()) << rest.status().ToString();
  std::vector<BlockKey> keys;
  for (uint32_t i = 0; i < kStagingBlocks - 3; ++i) {
    keys.push_back(testing::Key(7, 0, i));
    const Bytes v = RandomBlock(store_->block_bytes(), rng_);
    std::memcpy((**rest).buffer(i).data(), v.data(), v.size());
  }
  std::vector<Status> statuses(keys.size());
  ASSERT_TRUE((**rest).Commit(keys, statuses).ok());
  { auto more = MustBorrow(3, kStagingBlocks - 3); }
  some.reset();
  rest->reset();
  ExpectWorks();
}

// A loan does not reach outside the client's namespace, and the refused members' slots
// come back.
TEST_F(SidecarLendTest, LoansStayInTheClientsNamespace) {
  const BlockKey foreign = testing::Key(1, 0, 0, /*ns=*/3);
  const Bytes v = RandomBlock(store_->block_bytes(), rng_);
  ASSERT_TRUE(sidecar_->backing()->Put(foreign, v.data(), v.size()).ok());
  std::vector<BlockKey> keys = {foreign, keys_[1]};
  std::vector<Status> statuses(2);
  std::unique_ptr<BorrowedBlocks> blocks;
  EXPECT_EQ(store_->Borrow(keys, statuses, &blocks).code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(statuses[0].code(), StatusCode::kPermissionDenied);
  ASSERT_NE(blocks, nullptr);
  EXPECT_TRUE(blocks->block(0).empty());
  ASSERT_TRUE(statuses[1].ok()) << statuses[1].ToString();
  EXPECT_TRUE(Holds(blocks->block(1), blocks_[1]));
  blocks.reset();

  Result<std::unique_ptr<PutBuffers>> reserved = store_->Reserve(2);
  ASSERT_TRUE(reserved.ok()) << reserved.status().ToString();
  const Bytes w = RandomBlock(store_->block_bytes(), rng_);
  std::memcpy((**reserved).buffer(0).data(), w.data(), w.size());
  std::memcpy((**reserved).buffer(1).data(), w.data(), w.size());
  keys = {foreign, testing::Key(6, 0, 0)};
  EXPECT_EQ((**reserved).Commit(keys, statuses).code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(statuses[0].code(), StatusCode::kPermissionDenied) << statuses[0].ToString();
  EXPECT_TRUE(statuses[1].ok()) << statuses[1].ToString();
  Bytes got(store_->block_bytes());
  ASSERT_TRUE(sidecar_->backing()->Get(foreign, got.data(), got.size()).ok());
  EXPECT_TRUE(Holds(got, v));  // untouched
  ASSERT_TRUE(store_->Get(keys[1], got.data(), got.size()).ok());
  EXPECT_TRUE(Holds(got, w));
  reserved->reset();
  ExpectWorks();
}

TEST_F(SidecarLendTest, TransfersShareWhatSlotsAreNotLent) {
  // Six of eight slots lent: a batch of 16 goes through the other two, in chunks.
  std::unique_ptr<BorrowedBlocks> held = MustBorrow(0, kStagingBlocks - 2);
  ASSERT_NE(held, nullptr);
  const uint64_t bytes = store_->block_bytes();
  std::vector<Bytes> got(keys_.size(), Bytes(bytes));
  std::vector<BlockRead> reads;
  for (size_t i = 0; i < keys_.size(); ++i) reads.push_back({keys_[i], got[i].data(), bytes});
  std::vector<Status> statuses(keys_.size());
  std::future<Status> get = store_->GetBatchAsync(reads, statuses);
  ASSERT_EQ(get.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  ASSERT_TRUE(get.get().ok());
  for (size_t i = 0; i < keys_.size(); ++i) EXPECT_TRUE(Holds(got[i], blocks_[i])) << i;
  // And a loan of the last two.
  auto last = MustBorrow(kStagingBlocks, 2);
  ASSERT_NE(last, nullptr);
  ExpectStarved();
}

// The bytes lent stay readable after the connection is lost (the loan keeps the staging
// area's mapping); its slots go with the old connection, and giving them back after the
// reconnection does not count against the new one's.
TEST_F(SidecarLendTest, LoansOutliveTheConnection) {
  std::unique_ptr<BorrowedBlocks> old_borrow = MustBorrow(0, 3);
  ASSERT_NE(old_borrow, nullptr);
  Result<std::unique_ptr<PutBuffers>> old_reserve = store_->Reserve(2);
  ASSERT_TRUE(old_reserve.ok()) << old_reserve.status().ToString();
  const Bytes v = RandomBlock(store_->block_bytes(), rng_);
  std::memcpy((**old_reserve).buffer(0).data(), v.data(), v.size());
  std::memcpy((**old_reserve).buffer(1).data(), v.data(), v.size());
  std::unique_ptr<BorrowedBlocks> dropped_while_away = MustBorrow(3, 2);
  ASSERT_NE(dropped_while_away, nullptr);

  sidecar_->StopServer();
  ASSERT_TRUE(Eventually([&] { return !Connected(*store_); }));
  for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(Holds(old_borrow->block(i), blocks_[i])) << i;
  std::vector<Status> statuses(1);
  std::unique_ptr<BorrowedBlocks> none;
  EXPECT_EQ(store_->Borrow(std::span(keys_).first(1), statuses, &none).code(),
            StatusCode::kUnavailable);
  EXPECT_EQ(store_->Reserve(1).status().code(), StatusCode::kUnavailable);
  dropped_while_away.reset();

  ASSERT_TRUE(sidecar_->StartServer());  // the same backing store
  ASSERT_TRUE(Eventually([&] { return Connected(*store_); }));
  for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(Holds(old_borrow->block(i), blocks_[i])) << i;
  // The old connection's PutBuffers cannot be committed on the new one.
  const std::vector<BlockKey> keys = {testing::Key(8, 0, 0), testing::Key(8, 1, 0)};
  std::vector<Status> put_statuses(2);
  const Status commit = (**old_reserve).Commit(keys, put_statuses);
  EXPECT_EQ(commit.code(), StatusCode::kUnavailable) << commit.ToString();
  EXPECT_FALSE(store_->Contains(keys[0]));
  EXPECT_FALSE(store_->Contains(keys[1]));

  // The whole new staging area can be lent, and the old loans coming back meanwhile do
  // not make room that is not there.
  std::unique_ptr<BorrowedBlocks> all = MustBorrow(kStagingBlocks, kStagingBlocks);
  ASSERT_NE(all, nullptr);
  old_borrow.reset();
  old_reserve->reset();
  ExpectStarved();
  all.reset();
  ExpectWorks();
}

// --- Embedded: Borrow promotes from disk --------------------------------------------------

TEST(EmbeddedLendTest, BorrowPromotesFromDiskAndPinsUntilDestroyed) {
  const ModelLayout layout = SmallLayout();
  TempDir dir;
  const uint32_t host_slots = 8;
  StoreOptions o;
  o.directory = dir.path();
  o.host_capacity_bytes = uint64_t{host_slots} * layout.BytesPerBlock();
  o.host_memory = HostMemoryKind::kPlain;
  o.disk_capacity_bytes = 256 * layout.BytesPerBlock();
  o.io_depth = 16;
  auto opened = Store::Open(o, layout);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  Store& store = **opened;
  ASSERT_EQ(store.Stats().host_slots, host_slots);
  std::mt19937_64 rng(777);
  const uint32_t n = 40;
  std::vector<BlockKey> keys;
  std::vector<Bytes> want;
  for (uint32_t i = 0; i < n; ++i) {
    keys.push_back(testing::Key(1, i % layout.num_layers, i));
    want.push_back(RandomBlock(store.block_bytes(), rng));
    ASSERT_TRUE(store.Put(keys[i], want[i].data(), want[i].size()).ok()) << i;
  }
  ASSERT_TRUE(store.Flush().ok());
  StoreStats before = store.Stats();
  ASSERT_EQ(before.disk_blocks, n);
  ASSERT_LE(before.host_blocks, host_slots);
  EXPECT_EQ(before.host_pinned_slots, 0u);

  // The first blocks were evicted long ago: on disk only.
  const size_t m = 4;
  std::vector<Status> statuses(m);
  std::unique_ptr<BorrowedBlocks> blocks;
  ASSERT_TRUE(store.Borrow(std::span(keys).first(m), statuses, &blocks).ok());
  for (size_t i = 0; i < m; ++i) EXPECT_TRUE(Holds(blocks->block(i), want[i])) << i;
  StoreStats during = store.Stats();
  EXPECT_EQ(during.disk_reads, before.disk_reads + m);
  EXPECT_EQ(during.host_pinned_slots, m);
  EXPECT_EQ(during.gets, before.gets + m);
  // Pinned blocks are not evicted by traffic through the other slots.
  std::vector<Bytes> got(1, Bytes(store.block_bytes()));
  for (size_t i = m; i < n; ++i) {
    ASSERT_TRUE(store.Get(keys[i], got[0].data(), got[0].size()).ok()) << i;
    ASSERT_EQ(got[0], want[i]) << i;
  }
  for (size_t i = 0; i < m; ++i) EXPECT_TRUE(Holds(blocks->block(i), want[i])) << i;
  EXPECT_EQ(store.Stats().host_pinned_slots, m);
  blocks.reset();
  EXPECT_EQ(store.Stats().host_pinned_slots, 0u);

  // Every host slot borrowed: a host block is lent in place again, but a block on disk
  // has nowhere to go, nor has a new one (Busy, as for any Get or Put then).
  statuses.assign(host_slots, Status());
  ASSERT_TRUE(store.Borrow(std::span(keys).subspan(10, host_slots), statuses, &blocks).ok());
  for (size_t i = 0; i < host_slots; ++i) EXPECT_TRUE(Holds(blocks->block(i), want[10 + i])) << i;
  EXPECT_EQ(store.Stats().host_pinned_slots, host_slots);
  std::vector<Status> one(1);
  std::unique_ptr<BorrowedBlocks> again;
  ASSERT_TRUE(store.Borrow(std::span(keys).subspan(11, 1), one, &again).ok());
  EXPECT_TRUE(Holds(again->block(0), want[11]));
  again.reset();
  const Status refused = store.Borrow(std::span(keys).first(1), one, &again);
  EXPECT_EQ(refused.code(), StatusCode::kBusy) << refused.ToString();
  EXPECT_EQ(one[0].code(), StatusCode::kBusy);
  ASSERT_NE(again, nullptr);
  EXPECT_TRUE(again->block(0).empty());
  EXPECT_EQ(store.Get(keys[0], got[0].data(), got[0].size()).code(), StatusCode::kBusy);
  const Bytes fresh = RandomBlock(store.block_bytes(), rng);
  EXPECT_EQ(store.Put(testing::Key(2, 0, 0), fresh.data(), fresh.size()).code(), StatusCode::kBusy);
  EXPECT_EQ(store.Stats().host_pinned_slots, host_slots);
  again.reset();
  blocks.reset();
  EXPECT_EQ(store.Stats().host_pinned_slots, 0u);
  ASSERT_TRUE(store.Borrow(std::span(keys).first(1), one, &again).ok());
  EXPECT_TRUE(Holds(again->block(0), want[0]));
}

}  // namespace
}  // namespace kvtier
