// The sidecar client across a daemon restart: calls fail with Unavailable while the
// daemon is away, the client reconnects by itself and works again; operations in flight
// when the daemon stops complete (never hang); destroying the client completes what it
// has in flight. Also the C API through the sidecar.
#include <gtest/gtest.h>

#include <atomic>
#include <future>
#include <random>
#include <vector>

#include "kvtier/kvtier_c.h"
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

bool Connected(const Store& store) {
  std::optional<SidecarStatus> s = GetSidecarStatus(store);
  return s.has_value() && s->connected;
}

TEST(ClientReconnectTest, CallsFailWhileTheDaemonIsAwayThenTheClientReconnects) {
  const ModelLayout layout = SmallLayout();
  Sidecar sidecar(MemoryStore(layout, 256), layout);
  ASSERT_TRUE(sidecar.StartServer());
  auto store = sidecar.Open(sidecar.ClientOptions(4), layout);
  ASSERT_NE(store, nullptr);
  std::mt19937_64 rng(5);
  const std::vector<std::byte> v = RandomBlock(store->block_bytes(), rng);
  ASSERT_TRUE(store->Put(Key(1, 0, 0), v.data(), v.size()).ok());
  std::optional<SidecarStatus> st = GetSidecarStatus(*store);
  ASSERT_TRUE(st.has_value());
  EXPECT_TRUE(st->connected);
  EXPECT_EQ(st->reconnects, 0u);

  sidecar.StopServer();
  ASSERT_TRUE(Eventually([&] { return !Connected(*store); }));
  std::vector<std::byte> got(store->block_bytes());
  EXPECT_EQ(store->Put(Key(1, 0, 1), v.data(), v.size()).code(), StatusCode::kUnavailable);
  EXPECT_EQ(store->Get(Key(1, 0, 0), got.data(), got.size()).code(), StatusCode::kUnavailable);
  EXPECT_EQ(store->Flush().code(), StatusCode::kUnavailable);
  EXPECT_EQ(store->DropSequence(0, SequenceId{0, 9}).status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(store->PutAsync(Key(1, 0, 1), v.data(), v.size()).get().code(),
            StatusCode::kUnavailable);
  EXPECT_FALSE(store->Contains(Key(1, 0, 0)));
  st = GetSidecarStatus(*store);
  EXPECT_FALSE(st->last_error.empty());

  // A new daemon on the same socket, serving the same store.
  ASSERT_TRUE(sidecar.StartServer());
  ASSERT_TRUE(Eventually([&] { return Connected(*store); }));
  st = GetSidecarStatus(*store);
  EXPECT_EQ(st->reconnects, 1u);
  EXPECT_TRUE(st->shared_memory);
  ASSERT_TRUE(store->Get(Key(1, 0, 0), got.data(), got.size()).ok());
  EXPECT_EQ(got, v);
  // A batch bigger than the (new) staging area works on the new connection.
  std::vector<std::vector<std::byte>> blocks;
  std::vector<BlockWrite> writes;
  for (uint32_t i = 0; i < 10; ++i) {
    blocks.push_back(RandomBlock(store->block_bytes(), rng));
    writes.push_back({Key(2, 0, i), blocks.back().data(), store->block_bytes()});
  }
  std::vector<Status> statuses(writes.size());
  ASSERT_TRUE(store->PutBatch(writes, statuses).ok());
  for (uint32_t i = 0; i < 10; ++i) {
    ASSERT_TRUE(store->Get(Key(2, 0, i), got.data(), got.size()).ok());
    EXPECT_EQ(got, blocks[i]);
  }

  // Once more: the reconnection count grows.
  sidecar.StopServer();
  ASSERT_TRUE(Eventually([&] { return !Connected(*store); }));
  ASSERT_TRUE(sidecar.StartServer());
  ASSERT_TRUE(Eventually([&] { return Connected(*store); }));
  EXPECT_EQ(GetSidecarStatus(*store)->reconnects, 2u);
  EXPECT_TRUE(store->Contains(Key(2, 0, 9)));
}

TEST(ClientReconnectTest, OperationsInFlightWhenTheDaemonStopsComplete) {
  const ModelLayout layout = SmallLayout();
  Sidecar sidecar(MemoryStore(layout, 1024), layout);
  ASSERT_TRUE(sidecar.StartServer());
  auto store = sidecar.Open(sidecar.ClientOptions(2), layout);
  ASSERT_NE(store, nullptr);
  std::mt19937_64 rng(6);
  const uint32_t n = 400;
  std::vector<std::vector<std::byte>> blocks;
  std::vector<BlockWrite> writes;
  for (uint32_t i = 0; i < n; ++i) {
    blocks.push_back(RandomBlock(store->block_bytes(), rng));
    writes.push_back(
        {Key(3, i % layout.num_layers, i), blocks.back().data(), store->block_bytes()});
  }
  // A big batch that waits for the two staging slots, and single Puts beside it.
  std::vector<Status> statuses(n);
  std::future<Status> batch = store->PutBatchAsync(writes, statuses);
  std::vector<std::future<Status>> singles;
  for (uint32_t i = 0; i < 50; ++i) {
    singles.push_back(store->PutAsync(Key(4, 0, i), blocks[i].data(), blocks[i].size()));
  }
  sidecar.StopServer();
  ASSERT_EQ(batch.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  const Status whole = batch.get();
  uint32_t ok = 0, unavailable = 0;
  for (const Status& s : statuses) {
    EXPECT_TRUE(s.ok() || s.code() == StatusCode::kUnavailable) << s.ToString();
    ok += s.ok() ? 1 : 0;
    unavailable += s.code() == StatusCode::kUnavailable ? 1 : 0;
  }
  EXPECT_EQ(ok + unavailable, n);
  EXPECT_EQ(whole.ok(), unavailable == 0);
  for (auto& f : singles) {
    ASSERT_EQ(f.wait_for(std::chrono::seconds(20)), std::future_status::ready);
    const Status s = f.get();
    EXPECT_TRUE(s.ok() || s.code() == StatusCode::kUnavailable) << s.ToString();
  }
  // Members that succeeded are in the store; those that failed may or may not be (the
  // daemon may have served a request whose reply was lost).
  for (uint32_t i = 0; i < n; ++i) {
    if (!statuses[i].ok()) continue;
    std::vector<std::byte> got(store->block_bytes());
    ASSERT_TRUE(sidecar.backing()->Get(writes[i].key, got.data(), got.size()).ok());
    EXPECT_EQ(got, blocks[i]);
  }
}

TEST(ClientReconnectTest, DestroyingTheClientCompletesWhatIsInFlight) {
  const ModelLayout layout = SmallLayout();
  Sidecar sidecar(MemoryStore(layout, 1024), layout);
  ASSERT_TRUE(sidecar.StartServer());
  std::mt19937_64 rng(8);
  std::vector<std::byte> v = RandomBlock(layout.BytesPerBlock(), rng);
  std::atomic<uint32_t> completed{0}, ok{0};
  const uint32_t n = 300;
  {
    auto store = sidecar.Open(sidecar.ClientOptions(2), layout);
    ASSERT_NE(store, nullptr);
    for (uint32_t i = 0; i < n; ++i) {
      store->PutAsync(Key(5, 0, i), v.data(), v.size(), [&](Status s) {
        ok += s.ok() ? 1 : 0;
        ++completed;
      });
    }
  }
  EXPECT_EQ(completed.load(), n);
  EXPECT_EQ(ok.load(), n);  // the daemon was there: everything was let finish
  EXPECT_TRUE(sidecar.backing()->Contains(Key(5, 0, n - 1)));
}

TEST(ClientReconnectTest, DestroyingADisconnectedClientCancelsNothingItCannotSend) {
  const ModelLayout layout = SmallLayout();
  Sidecar sidecar(MemoryStore(layout, 64), layout);
  ASSERT_TRUE(sidecar.StartServer());
  auto store = sidecar.Open(sidecar.ClientOptions(2), layout);
  ASSERT_NE(store, nullptr);
  sidecar.StopServer();
  ASSERT_TRUE(Eventually([&] { return !Connected(*store); }));
  const auto start = std::chrono::steady_clock::now();
  store.reset();  // reconnection attempts in progress are abandoned
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
}

// --- The C API through the sidecar ----------------------------------------------------------

TEST(ClientCApiTest, OpenPutGetThroughTheSidecar) {
  const ModelLayout layout = SmallLayout();
  Sidecar sidecar(MemoryStore(layout, 64), layout);
  ASSERT_TRUE(sidecar.StartServer());
  kvtier_options o;
  kvtier_options_init(&o);
  EXPECT_EQ(o.sidecar_socket, nullptr);
  EXPECT_EQ(o.sidecar_staging_blocks, 64u);
  o.sidecar_socket = sidecar.socket_path().c_str();
  o.sidecar_staging_blocks = 2;
  kvtier_layout l{layout.num_layers, layout.num_kv_heads, layout.num_query_heads,
                  layout.head_dim,   KVTIER_DTYPE_F16,    layout.block_tokens};
  kvtier_store* store = nullptr;
  ASSERT_EQ(kvtier_open(&o, &l, &store), KVTIER_OK) << kvtier_last_error();
  std::mt19937_64 rng(9);
  const std::vector<std::byte> v = RandomBlock(kvtier_block_bytes(store), rng);
  kvtier_block_key key{0, 0, 77, 1, 3};
  EXPECT_EQ(kvtier_put(store, &key, v.data(), v.size()), KVTIER_OK) << kvtier_last_error();
  std::vector<std::byte> got(v.size());
  EXPECT_EQ(kvtier_get(store, &key, got.data(), got.size()), KVTIER_OK) << kvtier_last_error();
  EXPECT_EQ(got, v);
  EXPECT_EQ(kvtier_contains(store, &key), 1);
  kvtier_block_key other_ns{1, 0, 77, 1, 3};
  EXPECT_EQ(kvtier_put(store, &other_ns, v.data(), v.size()), KVTIER_PERMISSION_DENIED);
  kvtier_sidecar_status st{};
  ASSERT_EQ(kvtier_sidecar_status_get(store, &st), KVTIER_OK);
  EXPECT_EQ(st.connected, 1);
  EXPECT_EQ(st.reconnects, 0u);
  kvtier_stats stats{};
  ASSERT_EQ(kvtier_stats_get(store, &stats), KVTIER_OK);
  EXPECT_EQ(stats.puts, 1u);
  kvtier_close(store);

  // Zero-initialized sidecar fields: an embedded store, which has no sidecar status.
  kvtier_options_init(&o);
  o.host_capacity_bytes = 1 << 20;
  o.host_memory = KVTIER_HOST_MEMORY_PLAIN;
  ASSERT_EQ(kvtier_open(&o, &l, &store), KVTIER_OK) << kvtier_last_error();
  EXPECT_EQ(kvtier_sidecar_status_get(store, &st), KVTIER_NOT_SUPPORTED);
  kvtier_close(store);
}

}  // namespace
}  // namespace kvtier
