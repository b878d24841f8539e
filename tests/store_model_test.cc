// The store against a model: random sequences of Put / Get / Delete / DropSequence
// (single, batch and asynchronous forms) from several threads, each checked against a
// std::map of what was written, as LevelDB checks its DB against ModelDB.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/store.h"
#include "tests/test_util.h"

namespace kvtier {
namespace {

using testing::Key;
using testing::SmallLayout;

// A block that names its version in its first 8 bytes and whose other bytes are the
// pattern of (key, version): a torn block or another key's block cannot pass Check.
void Fill(std::vector<std::byte>& block, const BlockKey& key, uint64_t version) {
  std::memcpy(block.data(), &version, 8);
  (void)FillPatternRef(testing::ContentSeed(key, version), block.data() + 8, block.size() - 8,
                       nullptr);
}

// The version a block holds, or UINT64_MAX when it is not a whole block of `key`.
uint64_t Check(const std::vector<std::byte>& block, const BlockKey& key) {
  uint64_t version;
  std::memcpy(&version, block.data(), 8);
  uint64_t n = block.size() - 8;
  if (FindPatternMismatch(testing::ContentSeed(key, version), block.data() + 8, n) != n) {
    return UINT64_MAX;
  }
  return version;
}

struct ModelParams {
  uint32_t slots;  // host tier capacity in blocks
  int threads;
  int ops_per_thread;
  bool disk = false;  // a disk tier below the host tier: nothing is ever lost
};

class StoreModelTest : public ::testing::TestWithParam<ModelParams> {};

// Each thread owns its sequences, so its map is exact for them. Under memory pressure
// the store may lose evicted blocks (there is no lower tier yet): a Get may say
// NotFound for a block the model holds, never return wrong data, and the blocks lost
// must not exceed the evictions the store counted.
TEST_P(StoreModelTest, RandomOperationsMatchModel) {
  const ModelParams p = GetParam();
  StoreOptions options;
  options.host_capacity_bytes = uint64_t{p.slots} * SmallLayout().BytesPerBlock();
  std::string dir;
  if (p.disk) {
    char tmpl[] = "/tmp/kvtier-model-XXXXXX";
    dir = mkdtemp(tmpl);
    options.directory = dir;
    options.disk_capacity_bytes = 4096 * SmallLayout().BytesPerBlock();
    options.io_depth = 8;
  }
  auto opened = Store::Open(options, SmallLayout());
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  Store& store = **opened;
  const uint64_t bytes = store.block_bytes();
  std::atomic<uint64_t> lost{0};
  std::vector<std::map<BlockKey, uint64_t>> models(p.threads);

  auto worker = [&](int t) {
    std::mt19937_64 rng(1000 + t);
    auto& model = models[t];
    uint64_t next_version = 1;
    std::vector<std::byte> buf(bytes);
    std::vector<std::vector<std::byte>> bufs(8, std::vector<std::byte>(bytes));
    auto random_key = [&] { return Key(uint64_t(t) * 100 + rng() % 4, rng() % 4, rng() % 8); };
    // A Get that found nothing: fine only for a block the model does not have, or one
    // the host tier evicted (counted, checked against the store's counter at the end).
    auto missing = [&](const BlockKey& k) {
      if (model.erase(k)) lost.fetch_add(1);
    };
    auto found = [&](const BlockKey& k, const std::vector<std::byte>& data) {
      auto it = model.find(k);
      ASSERT_NE(it, model.end()) << "store returned a block never written: " << k.ToString();
      ASSERT_EQ(Check(data, k), it->second) << k.ToString();
    };
    for (int op = 0; op < p.ops_per_thread; ++op) {
      const int kind = rng() % 100;
      if (kind < 35) {  // Put
        BlockKey k = random_key();
        uint64_t v = next_version++;
        Fill(buf, k, v);
        Status s = (rng() % 4 == 0) ? store.PutAsync(k, buf.data(), bytes).get()
                                    : store.Put(k, buf.data(), bytes);
        ASSERT_TRUE(s.ok()) << s.ToString();
        model[k] = v;
      } else if (kind < 70) {  // Get
        BlockKey k = random_key();
        Status s = store.Get(k, buf.data(), bytes);
        if (s.ok()) {
          found(k, buf);
        } else {
          ASSERT_TRUE(s.IsNotFound()) << s.ToString();
          missing(k);
        }
      } else if (kind < 80) {  // batch Put then batch Get of the same keys
        std::vector<BlockWrite> writes;
        std::vector<BlockRead> reads;
        std::map<BlockKey, uint64_t> batch;
        for (int i = 0; i < 8; ++i) {
          BlockKey k = random_key();
          uint64_t v = next_version++;
          Fill(bufs[i], k, v);
          writes.push_back({k, bufs[i].data(), bytes});
          batch[k] = v;  // a key twice in a batch: the later member wins
        }
        std::vector<Status> statuses(8);
        ASSERT_TRUE(store.PutBatch(writes, statuses).ok());
        for (auto& [k, v] : batch) model[k] = v;
        for (int i = 0; i < 8; ++i) reads.push_back({writes[i].key, bufs[i].data(), bytes});
        (void)store.GetBatch(reads, statuses);
        for (int i = 0; i < 8; ++i) {
          if (statuses[i].ok()) {
            found(reads[i].key, bufs[i]);
          } else {
            ASSERT_TRUE(statuses[i].IsNotFound()) << statuses[i].ToString();
            missing(reads[i].key);
          }
        }
      } else if (kind < 95) {  // Delete
        BlockKey k = random_key();
        Status s = store.Delete(k);
        if (s.ok()) {
          ASSERT_EQ(model.erase(k), 1u) << "deleted a block never written: " << k.ToString();
        } else {
          ASSERT_TRUE(s.IsNotFound()) << s.ToString();
          missing(k);
        }
      } else {  // DropSequence
        uint64_t seq = uint64_t(t) * 100 + rng() % 4;
        Result<uint64_t> n = store.DropSequence(0, SequenceId::FromU64(seq));
        ASSERT_TRUE(n.ok());
        uint64_t in_model =
            std::erase_if(model, [&](const auto& kv) { return kv.first.sequence.lo == seq; });
        ASSERT_LE(*n, in_model);
        lost.fetch_add(in_model - *n);
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < p.threads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  if (::testing::Test::HasFatalFailure()) return;

  // Final state: every block the model still has is there, byte-exact, unless evicted.
  std::vector<std::byte> buf(bytes);
  uint64_t resident = 0;
  for (auto& model : models) {
    for (auto& [k, v] : model) {
      Status s = store.Get(k, buf.data(), bytes);
      if (s.IsNotFound()) {
        lost.fetch_add(1);
        continue;
      }
      ASSERT_TRUE(s.ok()) << s.ToString();
      ASSERT_EQ(Check(buf, k), v);
      ++resident;
    }
  }
  // With a disk, writes may still be in flight (their slots pinned): finish them.
  if (p.disk) {
    ASSERT_TRUE(store.Flush().ok());
  }
  StoreStats stats = store.Stats();
  if (!p.disk) {
    EXPECT_EQ(stats.host_blocks, resident);  // with a disk, most live there
  }
  EXPECT_EQ(stats.host_pinned_slots, 0u);
  EXPECT_LE(lost.load(), stats.evictions_lost);
  if (p.slots < 4 * 4 * 8) {  // fewer slots than a thread's keys
    EXPECT_GT(stats.evictions, 0u);
  }
  if (stats.evictions == 0 || p.disk) {
    EXPECT_EQ(lost.load(), 0u);
    EXPECT_EQ(stats.evictions_lost, 0u);
  }
  if (!p.disk) return;
  // Durable across a clean close: reopen and find every block of the model.
  ASSERT_TRUE(store.Flush().ok());
  opened->reset();
  auto reopened = Store::Open(options, SmallLayout());
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  uint64_t blocks = 0;
  for (auto& model : models) {
    for (auto& [k, v] : model) {
      ASSERT_TRUE((*reopened)->Get(k, buf.data(), bytes).ok()) << k.ToString();
      ASSERT_EQ(Check(buf, k), v);
      ++blocks;
    }
  }
  EXPECT_EQ((*reopened)->Stats().disk_blocks, blocks);
  reopened->reset();
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(
    Pressure, StoreModelTest,
    ::testing::Values(ModelParams{1024, 4, 4000},      // everything fits: the model is exact
                      ModelParams{48, 4, 4000},        // evictions under concurrency
                      ModelParams{40, 1, 6000},        // evictions, one thread
                      ModelParams{48, 4, 3000, true},  // the same through a disk tier
                      ModelParams{24, 1, 4000, true}),
    [](const auto& info) {
      return "slots" + std::to_string(info.param.slots) + "_threads" +
             std::to_string(info.param.threads) + (info.param.disk ? "_disk" : "");
    });

// All threads on the same few keys, in a tier too small for them: every Get returns
// NotFound or a whole block of some version written for that key, never a torn one.
TEST(StoreConcurrencyTest, SharedKeysNeverTear) {
  StoreOptions options;
  options.host_capacity_bytes = 24 * SmallLayout().BytesPerBlock();
  auto opened = Store::Open(options, SmallLayout());
  ASSERT_TRUE(opened.ok());
  Store& store = **opened;
  const uint64_t bytes = store.block_bytes();
  constexpr int kKeys = 32;
  std::vector<std::atomic<uint64_t>> issued(kKeys);  // highest version started per key
  std::atomic<uint64_t> good_reads{0};
  auto worker = [&](int t) {
    std::mt19937_64 rng(77 + t);
    std::vector<std::byte> buf(bytes);
    for (int op = 0; op < 5000; ++op) {
      int i = rng() % kKeys;
      BlockKey k = Key(1 + i % 2, i % 4, i);
      switch (rng() % 10) {
        case 0:
          (void)store.Delete(k);
          break;
        case 1:
          (void)store.DropSequence(0, SequenceId::FromU64(1 + i % 2));
          break;
        case 2:
        case 3:
        case 4: {
          uint64_t v = issued[i].fetch_add(1) + 1;
          Fill(buf, k, v);
          Status s = store.Put(k, buf.data(), bytes);
          ASSERT_TRUE(s.ok() || s.IsBusy()) << s.ToString();
          break;
        }
        default: {
          Status s = store.Get(k, buf.data(), bytes);
          if (s.IsNotFound()) break;
          ASSERT_TRUE(s.ok()) << s.ToString();
          uint64_t v = Check(buf, k);
          ASSERT_NE(v, UINT64_MAX) << "torn or foreign block for " << k.ToString();
          ASSERT_GE(v, 1u);
          ASSERT_LE(v, issued[i].load());
          good_reads.fetch_add(1);
        }
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  EXPECT_GT(good_reads.load(), 0u);
  EXPECT_EQ(store.Stats().host_pinned_slots, 0u);
}

}  // namespace
}  // namespace kvtier
