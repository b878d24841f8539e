// The sidecar client (SidecarStore through Store::Open) against an in-process kvtierd
// serving core: byte-exact round trips over the staging area and inline (TCP), batches
// bigger than the staging area, asynchronous completions, Stats, DropSequence, Select,
// and what Open refuses (a layout mismatch, a namespace, no daemon).
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "kernels/dtype_convert.h"
#include "tests/client_test_util.h"
#include "tests/test_util.h"

namespace kvtier {
namespace {

using testing::Eventually;
using testing::Key;
using testing::MemoryStore;
using testing::RandomBlock;
using testing::Sidecar;
using testing::SmallLayout;

class ClientStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sidecar_ = std::make_unique<Sidecar>(MemoryStore(layout_, 512), layout_);
    ASSERT_TRUE(sidecar_->StartServer());
  }
  std::unique_ptr<Store> Open(uint32_t staging_blocks = 8) {
    return sidecar_->Open(sidecar_->ClientOptions(staging_blocks), layout_);
  }

  const ModelLayout layout_ = SmallLayout();
  std::unique_ptr<Sidecar> sidecar_;
  std::mt19937_64 rng_{20261202};
};

TEST_F(ClientStoreTest, RoundTripsAreByteExact) {
  auto store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->layout(), layout_);
  EXPECT_EQ(store->block_bytes(), layout_.BytesPerBlock());
  std::map<BlockKey, std::vector<std::byte>> model;
  for (uint32_t i = 0; i < 40; ++i) {
    const BlockKey key = Key(i % 5, i % layout_.num_layers, i);
    model[key] = RandomBlock(store->block_bytes(), rng_);
    ASSERT_TRUE(store->Put(key, model[key].data(), model[key].size()).ok());
  }
  for (const auto& [key, want] : model) {
    std::vector<std::byte> got(store->block_bytes());
    ASSERT_TRUE(store->Get(key, got.data(), got.size()).ok()) << key.ToString();
    EXPECT_EQ(got, want) << key.ToString();
    EXPECT_TRUE(store->Contains(key));
    // The daemon's store holds the same bytes.
    std::vector<std::byte> direct(store->block_bytes());
    ASSERT_TRUE(sidecar_->backing()->Get(key, direct.data(), direct.size()).ok());
    EXPECT_EQ(direct, want);
  }
  // Replacing a block, deleting one.
  const BlockKey k = model.begin()->first;
  const std::vector<std::byte> v2 = RandomBlock(store->block_bytes(), rng_);
  ASSERT_TRUE(store->Put(k, v2.data(), v2.size()).ok());
  std::vector<std::byte> got(store->block_bytes());
  ASSERT_TRUE(store->Get(k, got.data(), got.size()).ok());
  EXPECT_EQ(got, v2);
  EXPECT_TRUE(store->Delete(k).ok());
  EXPECT_FALSE(store->Contains(k));
  EXPECT_EQ(store->Delete(k).code(), StatusCode::kNotFound);
  EXPECT_EQ(store->Get(k, got.data(), got.size()).code(), StatusCode::kNotFound);
  EXPECT_FALSE(store->Contains(Key(99, 0, 0)));
}

TEST_F(ClientStoreTest, RefusesLocallyWhatTheEmbeddedStoreRefuses) {
  auto store = Open();
  ASSERT_NE(store, nullptr);
  std::vector<std::byte> block = RandomBlock(store->block_bytes(), rng_);
  EXPECT_EQ(store->Put(Key(1, 0, 0), block.data(), block.size() - 1).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Put(Key(1, 0, 0), nullptr, block.size()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Put(Key(1, layout_.num_layers, 0), block.data(), block.size()).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Get(Key(1, 0, 0), block.data(), block.size() + 1).code(),
            StatusCode::kInvalidArgument);
  // Another namespace than the client's.
  EXPECT_EQ(store->Put(Key(1, 0, 0, /*ns=*/3), block.data(), block.size()).code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(store->DropSequence(3, SequenceId{0, 1}).status().code(),
            StatusCode::kPermissionDenied);
  std::vector<int64_t> selected(2);
  std::vector<float> queries(64);
  EXPECT_EQ(store->Select(3, SequenceId{0, 1}, 0, queries, 16, selected).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_FALSE(store->Contains(Key(1, 0, 0, 3)));
  // Batches: statuses of the wrong size; a bad member does not stop the others.
  std::vector<BlockWrite> writes = {{Key(1, 0, 0), block.data(), block.size()},
                                    {Key(1, 0, 1), block.data(), 7},
                                    {Key(1, 0, 2), block.data(), block.size()}};
  std::vector<Status> statuses(2);
  EXPECT_EQ(store->PutBatch(writes, statuses).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store->PutBatchAsync(writes, statuses).get().code(), StatusCode::kInvalidArgument);
  statuses.assign(3, Status::Internal("stale"));
  EXPECT_EQ(store->PutBatch(writes, statuses).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(statuses[0].ok());
  EXPECT_EQ(statuses[1].code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(statuses[2].ok());
  EXPECT_TRUE(store->Contains(Key(1, 0, 2)));
  // The GPU tier is the client's own (tests/client_device_test.cc): this one has none.
  std::vector<int64_t> blocks = {0};
  std::vector<uint64_t> addresses(1);
  Result<AcquireInfo> acquired = store->Acquire(0, SequenceId{0, 1}, 0, blocks, nullptr, addresses);
  EXPECT_EQ(acquired.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(acquired.status().message().find("no GPU tier"), std::string::npos);
  EXPECT_EQ(store->Release(1).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store->Acquire(3, SequenceId{0, 1}, 0, blocks, nullptr, addresses).status().code(),
            StatusCode::kPermissionDenied);
}

TEST_F(ClientStoreTest, BatchesBiggerThanTheStagingAreaAreChunked) {
  for (uint32_t staging : {1u, 3u, 8u}) {
    SCOPED_TRACE("staging_blocks " + std::to_string(staging));
    auto store = Open(staging);
    ASSERT_NE(store, nullptr);
    std::optional<SidecarStatus> st = GetSidecarStatus(*store);
    ASSERT_TRUE(st.has_value());
    EXPECT_TRUE(st->shared_memory);
    EXPECT_EQ(st->staging_blocks, staging);
    const uint32_t n = 37;
    std::vector<std::vector<std::byte>> blocks;
    std::vector<BlockWrite> writes;
    for (uint32_t i = 0; i < n; ++i) {
      blocks.push_back(RandomBlock(store->block_bytes(), rng_));
      writes.push_back({Key(100 + staging, i % layout_.num_layers, i), blocks.back().data(),
                        blocks.back().size()});
    }
    std::vector<Status> statuses(n);
    ASSERT_TRUE(store->PutBatch(writes, statuses).ok());
    // Read them back with every third key missing.
    std::vector<std::vector<std::byte>> out(n + n / 3,
                                            std::vector<std::byte>(store->block_bytes()));
    std::vector<BlockRead> reads;
    std::vector<int> expect;  // index into blocks, or -1 for a missing key
    for (uint32_t i = 0; i < n; ++i) {
      if (i % 3 == 1) {
        reads.push_back({Key(999, 0, i), out[reads.size()].data(), store->block_bytes()});
        expect.push_back(-1);
      }
      reads.push_back({writes[i].key, out[reads.size()].data(), store->block_bytes()});
      expect.push_back(static_cast<int>(i));
    }
    statuses.assign(reads.size(), Status());
    EXPECT_EQ(store->GetBatch(reads, statuses).code(), StatusCode::kNotFound);
    for (size_t i = 0; i < reads.size(); ++i) {
      if (expect[i] < 0) {
        EXPECT_EQ(statuses[i].code(), StatusCode::kNotFound) << i;
      } else {
        ASSERT_TRUE(statuses[i].ok()) << i << ": " << statuses[i].ToString();
        EXPECT_EQ(out[i], blocks[expect[i]]) << i;
      }
    }
  }
}

TEST_F(ClientStoreTest, AsyncCompletionsRunOnAClientThread) {
  auto store = Open(4);
  ASSERT_NE(store, nullptr);
  const auto caller = std::this_thread::get_id();
  const uint32_t n = 64;
  std::vector<std::vector<std::byte>> blocks;
  for (uint32_t i = 0; i < n; ++i) blocks.push_back(RandomBlock(store->block_bytes(), rng_));
  std::atomic<uint32_t> ok{0}, done{0}, on_caller{0};
  std::promise<void> all_put;
  for (uint32_t i = 0; i < n; ++i) {
    store->PutAsync(Key(7, 0, i), blocks[i].data(), blocks[i].size(), [&](Status s) {
      if (std::this_thread::get_id() == caller) ++on_caller;
      if (s.ok()) ++ok;
      if (++done == n) all_put.set_value();
    });
  }
  ASSERT_EQ(all_put.get_future().wait_for(std::chrono::seconds(20)), std::future_status::ready);
  EXPECT_EQ(ok.load(), n);
  EXPECT_EQ(on_caller.load(), 0u);
  // A completion may call the store again, synchronously.
  std::vector<std::byte> first(store->block_bytes()), second(store->block_bytes());
  std::promise<Status> nested;
  store->GetAsync(Key(7, 0, 0), first.data(), first.size(), [&](Status s) {
    if (!s.ok()) return nested.set_value(s);
    nested.set_value(store->Get(Key(7, 0, 1), second.data(), second.size()));
  });
  auto nested_future = nested.get_future();
  ASSERT_EQ(nested_future.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  EXPECT_TRUE(nested_future.get().ok());
  EXPECT_EQ(first, blocks[0]);
  EXPECT_EQ(second, blocks[1]);
  // Futures, and an asynchronous batch bigger than the staging area.
  std::vector<std::vector<std::byte>> out(n, std::vector<std::byte>(store->block_bytes()));
  std::vector<BlockRead> reads;
  for (uint32_t i = 0; i < n; ++i) reads.push_back({Key(7, 0, i), out[i].data(), out[i].size()});
  std::vector<Status> statuses(n);
  std::future<Status> f = store->GetBatchAsync(reads, statuses);
  ASSERT_EQ(f.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  EXPECT_TRUE(f.get().ok());
  for (uint32_t i = 0; i < n; ++i) EXPECT_EQ(out[i], blocks[i]) << i;
  // A completion that starts more asynchronous work (a chain) from a client thread.
  std::promise<Status> chained;
  store->PutAsync(Key(8, 0, 0), blocks[0].data(), blocks[0].size(), [&](Status s) {
    if (!s.ok()) return chained.set_value(s);
    store->GetAsync(Key(8, 0, 0), out[0].data(), out[0].size(),
                    [&](Status s2) { chained.set_value(s2); });
  });
  auto chained_future = chained.get_future();
  ASSERT_EQ(chained_future.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  EXPECT_TRUE(chained_future.get().ok());
  EXPECT_EQ(out[0], blocks[0]);
}

// Threads doing random operations at once, with a staging area much smaller than what
// they have in flight, checked against a model of what each thread wrote.
TEST_F(ClientStoreTest, ConcurrentCallersAgreeWithAModel) {
  auto store = Open(3);
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  std::vector<std::thread> threads;
  std::atomic<uint32_t> mismatches{0}, failures{0};
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + t);
      std::map<uint32_t, std::vector<std::byte>> model;  // block -> contents
      for (uint32_t step = 0; step < 150; ++step) {
        const uint32_t b = rng() % 24;
        const BlockKey key = Key(50 + t, b % layout_.num_layers, b);
        switch (rng() % 4) {
          case 0:
          case 1: {
            std::vector<std::byte> v = RandomBlock(bytes, rng);
            if (!store->Put(key, v.data(), v.size()).ok()) ++failures;
            model[b] = std::move(v);
            break;
          }
          case 2: {
            std::vector<std::byte> got(bytes);
            Status s = store->Get(key, got.data(), got.size());
            auto it = model.find(b);
            if (it == model.end() ? s.code() != StatusCode::kNotFound
                                  : (!s.ok() || got != it->second)) {
              ++mismatches;
            }
            break;
          }
          default: {
            // A batch of four through the async form.
            std::vector<std::vector<std::byte>> vs;
            std::vector<BlockWrite> writes;
            for (uint32_t j = 0; j < 4; ++j) {
              const uint32_t bj = (b + j) % 24;
              vs.push_back(RandomBlock(bytes, rng));
              writes.push_back({Key(50 + t, bj % layout_.num_layers, bj), vs.back().data(), bytes});
            }
            std::vector<Status> statuses(4);
            if (!store->PutBatchAsync(writes, statuses).get().ok()) ++failures;
            for (uint32_t j = 0; j < 4; ++j) model[(b + j) % 24] = std::move(vs[j]);
          }
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0u);
  EXPECT_EQ(failures.load(), 0u);
}

TEST_F(ClientStoreTest, StatsDropSequenceAndFlushGoThroughTheDaemon) {
  auto store = Open();
  ASSERT_NE(store, nullptr);
  const StoreStats before = store->Stats();
  EXPECT_EQ(before.block_bytes, store->block_bytes());
  EXPECT_EQ(before.host_slots, sidecar_->backing()->Stats().host_slots);
  EXPECT_GT(before.host_slots, 0u);
  for (uint32_t b = 0; b < 6; ++b) {
    std::vector<std::byte> v = RandomBlock(store->block_bytes(), rng_);
    ASSERT_TRUE(store->Put(Key(42, b % 2, b), v.data(), v.size()).ok());
  }
  const StoreStats after = store->Stats();
  EXPECT_EQ(after.puts, before.puts + 6);
  EXPECT_EQ(after.host_blocks, before.host_blocks + 6);
  EXPECT_EQ(after.bytes_put, before.bytes_put + 6 * store->block_bytes());
  Result<uint64_t> dropped = store->DropSequence(0, SequenceId{0, 42});
  ASSERT_TRUE(dropped.ok()) << dropped.status().ToString();
  EXPECT_EQ(*dropped, 6u);
  EXPECT_FALSE(store->Contains(Key(42, 0, 0)));
  dropped = store->DropSequence(0, SequenceId{0, 42});
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, 0u);
  EXPECT_EQ(store->Stats().dropped_blocks, after.dropped_blocks + 6);
  EXPECT_TRUE(store->Flush().ok());
}

TEST_F(ClientStoreTest, OpenRefusesALayoutMismatch) {
  ModelLayout other = layout_;
  other.head_dim = 128;
  auto store = Store::Open(sidecar_->ClientOptions(), other);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kFailedPrecondition) << store.status().ToString();
  EXPECT_NE(store.status().message().find(other.ToString()), std::string::npos)
      << store.status().ToString();
}

TEST_F(ClientStoreTest, OpenRefusesANamespaceThePeerMayNotUse) {
  StoreOptions o = sidecar_->ClientOptions();
  o.sidecar.namespace_id = 5;  // not configured: the default config has namespace 0 only
  auto store = Store::Open(o, layout_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kPermissionDenied) << store.status().ToString();
}

TEST(ClientOpenTest, NoDaemonIsUnavailableAfterTheTimeout) {
  testing::TempDir dir;
  StoreOptions o;
  o.sidecar.socket = dir.path() + "/nobody.sock";
  o.sidecar.connect_timeout_ms = 300;
  const auto start = std::chrono::steady_clock::now();
  auto store = Store::Open(o, SmallLayout());
  const auto waited = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kUnavailable) << store.status().ToString();
  EXPECT_GE(waited, std::chrono::milliseconds(200));
  EXPECT_LT(waited, std::chrono::seconds(3));
  // A malformed TCP address is the caller's mistake.
  StoreOptions t;
  t.sidecar.tcp_address = "no-port";
  EXPECT_EQ(Store::Open(t, SmallLayout()).status().code(), StatusCode::kInvalidArgument);
}

TEST(ClientOpenTest, AnEmbeddedStoreHasNoSidecarStatus) {
  StoreOptions o = MemoryStore(SmallLayout(), 8);
  auto store = Store::Open(o, SmallLayout());
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  EXPECT_FALSE(GetSidecarStatus(**store).has_value());
}

// Over TCP the block bytes travel inline in the frames; a token is required.
TEST(ClientTcpTest, RoundTripsInlineOverTcp) {
  const ModelLayout layout = SmallLayout();
  server::ServerOptions so;
  so.tcp_listen = "127.0.0.1:0";
  so.namespaces.push_back(server::NamespaceConfig{
      .id = 4, .name = "tcp", .uids = {}, .gids = {}, .tokens = {"s3cret"}});
  Sidecar sidecar(MemoryStore(layout, 128), layout, so);
  ASSERT_TRUE(sidecar.StartServer());
  const uint16_t port = sidecar.server()->tcp_port();
  ASSERT_NE(port, 0);
  StoreOptions o;
  o.sidecar.tcp_address = "127.0.0.1:" + std::to_string(port);
  o.sidecar.namespace_id = 4;
  o.sidecar.connect_timeout_ms = 3000;
  o.sidecar.staging_blocks = 4;
  // Without the token: refused.
  EXPECT_EQ(Store::Open(o, layout).status().code(), StatusCode::kPermissionDenied);
  o.sidecar.token = "s3cret";
  auto store = sidecar.Open(o, layout);
  ASSERT_NE(store, nullptr);
  std::optional<SidecarStatus> st = GetSidecarStatus(*store);
  ASSERT_TRUE(st.has_value());
  EXPECT_TRUE(st->connected);
  EXPECT_FALSE(st->shared_memory);
  std::mt19937_64 rng(7);
  const uint32_t n = 21;
  std::vector<std::vector<std::byte>> blocks;
  std::vector<BlockWrite> writes;
  for (uint32_t i = 0; i < n; ++i) {
    blocks.push_back(RandomBlock(store->block_bytes(), rng));
    writes.push_back(
        {Key(3, i % layout.num_layers, i, 4), blocks.back().data(), store->block_bytes()});
  }
  std::vector<Status> statuses(n);
  ASSERT_TRUE(store->PutBatch(writes, statuses).ok());
  std::vector<std::vector<std::byte>> out(n, std::vector<std::byte>(store->block_bytes()));
  std::vector<BlockRead> reads;
  for (uint32_t i = 0; i < n; ++i) reads.push_back({writes[i].key, out[i].data(), out[i].size()});
  ASSERT_TRUE(store->GetBatch(reads, statuses).ok());
  for (uint32_t i = 0; i < n; ++i) EXPECT_EQ(out[i], blocks[i]) << i;
  std::vector<std::byte> one(store->block_bytes());
  EXPECT_EQ(store->Get(Key(3, 0, 500, 4), one.data(), one.size()).code(), StatusCode::kNotFound);
}

// --- Retrieval through the daemon --------------------------------------------------------

ModelLayout RetrievalLayout() {
  return ModelLayout{.num_layers = 2,
                     .num_kv_heads = 2,
                     .num_query_heads = 4,
                     .head_dim = 32,
                     .dtype = DType::kF16,
                     .block_tokens = 16};
}

// A block of seeded normal keys and values (finite f16 values, unlike random bytes).
std::vector<std::byte> FloatBlock(const ModelLayout& l, std::mt19937_64& rng) {
  std::vector<std::byte> block(l.BytesPerBlock());
  std::normal_distribution<float> normal;
  const uint64_t elements = l.BytesPerBlock() / DTypeBytes(l.dtype);
  for (uint64_t i = 0; i < elements; ++i) StoreFromFloat(block.data(), i, l.dtype, normal(rng));
  return block;
}

TEST(ClientRetrievalTest, SelectAndIndexBlockMatchTheEmbeddedStore) {
  const ModelLayout l = RetrievalLayout();
  StoreOptions backing = MemoryStore(l, 256);
  backing.retrieval.enabled = true;
  backing.retrieval.top_k = 2;
  backing.retrieval.n_init = 16;
  backing.retrieval.n_local = 32;
  Sidecar sidecar(backing, l);
  ASSERT_TRUE(sidecar.StartServer());
  StoreOptions o = sidecar.ClientOptions();
  o.retrieval = backing.retrieval;
  auto store = sidecar.Open(o, l);
  ASSERT_NE(store, nullptr);
  std::mt19937_64 rng(99);
  std::vector<std::vector<std::byte>> blocks;
  for (uint32_t b = 0; b < 12; ++b) {
    blocks.push_back(FloatBlock(l, rng));
    ASSERT_TRUE(store->Put(Key(1, 0, b), blocks.back().data(), blocks.back().size()).ok());
  }
  // Re-index one block with token scores through the client.
  std::vector<float> token_scores(uint64_t{l.num_kv_heads} * l.block_tokens);
  for (float& s : token_scores) s = std::uniform_real_distribution<float>(0, 1)(rng);
  ASSERT_TRUE(
      store->IndexBlock(Key(1, 0, 5), blocks[5].data(), blocks[5].size(), 12, token_scores).ok());
  EXPECT_EQ(store->IndexBlock(Key(1, 0, 77), blocks[5].data(), blocks[5].size(), 12, {}).code(),
            StatusCode::kNotFound);
  std::vector<float> queries(uint64_t{l.num_query_heads} * l.head_dim);
  std::normal_distribution<float> normal;
  for (float& q : queries) q = normal(rng);
  std::vector<int64_t> got(2, -7), want(2, -7);
  std::vector<float> got_scores(2, -7), want_scores(2, -7);
  Result<SelectInfo> via_client =
      store->Select(0, SequenceId{0, 1}, 0, queries, 192, got, got_scores);
  ASSERT_TRUE(via_client.ok()) << via_client.status().ToString();
  Result<SelectInfo> direct =
      sidecar.backing()->Select(0, SequenceId{0, 1}, 0, queries, 192, want, want_scores);
  ASSERT_TRUE(direct.ok()) << direct.status().ToString();
  EXPECT_EQ(via_client->sink_blocks, direct->sink_blocks);
  EXPECT_EQ(via_client->local_begin, direct->local_begin);
  EXPECT_EQ(via_client->local_end, direct->local_end);
  EXPECT_EQ(via_client->selected, direct->selected);
  EXPECT_EQ(via_client->selected, 2u);
  EXPECT_EQ(got, want);
  for (size_t i = 0; i < got_scores.size(); ++i) {
    EXPECT_FALSE(std::isnan(got_scores[i]));
    EXPECT_EQ(got_scores[i], want_scores[i]);  // the same computation, sent as float32
  }
  // Without scores; and a `selected` of the wrong size for the daemon's top_k.
  ASSERT_TRUE(store->Select(0, SequenceId{0, 1}, 0, queries, 192, got).ok());
  EXPECT_EQ(got, want);
  std::vector<int64_t> three(3);
  EXPECT_EQ(store->Select(0, SequenceId{0, 1}, 0, queries, 192, three).status().code(),
            StatusCode::kInvalidArgument);
  std::vector<float> three_scores(3);
  EXPECT_EQ(store->Select(0, SequenceId{0, 1}, 0, queries, 192, got, three_scores).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvtier
