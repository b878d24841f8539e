// kvtierd as a process: start, serve, SIGTERM, restart; one daemon per directory;
// SIGKILL of the daemon under load (every block acknowledged durable comes back
// byte-exact, the client reconnects); SIGKILL of a client in the middle of its Puts
// (nothing partial, nothing leaked); eight client processes at once, each checked
// against a model of what it may see.
#include "tests/daemon_process.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/client.h"
#include "kvtier/store.h"
#include "tests/test_util.h"

namespace kvtier {
namespace {

namespace fs = std::filesystem;
using testing::Daemon;
using testing::HoldsVersion;
using testing::Key;
using testing::MakeBlock;
using testing::SmallLayout;

class DaemonProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvtierd-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<Store> Connect(const Daemon& d, uint32_t max_backoff_ms = 50) {
    StoreOptions o;
    o.sidecar.socket = d.socket();
    o.sidecar.max_backoff_ms = max_backoff_ms;
    o.sidecar.staging_blocks = 8;
    auto s = Store::Open(o, SmallLayout());
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(*s) : nullptr;
  }

  fs::path dir_;
};

TEST_F(DaemonProcessTest, ServesStopsOnSigtermAndKeepsWhatWasFlushed) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  auto store = Connect(d);
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  // More than the 1 MiB host tier holds: some blocks are only on disk at the end.
  constexpr uint32_t kBlocks = 300;
  for (uint32_t i = 0; i < kBlocks; ++i) {
    const BlockKey k = Key(1, i % 4, i);
    ASSERT_TRUE(store->Put(k, MakeBlock(bytes, k, 1).data(), bytes).ok()) << i;
  }
  ASSERT_TRUE(store->Flush().ok());
  store.reset();
  EXPECT_EQ(d.Kill(SIGTERM), 0) << d.ReadLog();
  {
    StoreOptions o;  // nobody answers now
    o.sidecar.socket = d.socket();
    o.sidecar.connect_timeout_ms = 100;
    EXPECT_EQ(Store::Open(o, SmallLayout()).status().code(), StatusCode::kUnavailable);
  }
  ASSERT_TRUE(d.Start());
  store = Connect(d);
  ASSERT_NE(store, nullptr);
  std::vector<std::byte> out(bytes);
  for (uint32_t i = 0; i < kBlocks; ++i) {
    const BlockKey k = Key(1, i % 4, i);
    ASSERT_TRUE(store->Get(k, out.data(), bytes).ok()) << i;
    ASSERT_TRUE(HoldsVersion(out, k, 1)) << i;
  }
  EXPECT_EQ(store->Stats().disk_blocks, kBlocks);
}

TEST_F(DaemonProcessTest, OneDaemonPerDirectoryAndConfigChecks) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  // A second daemon on the same store directory (another socket) must refuse.
  const std::string second = (dir_ / "second.log").string();
  EXPECT_EQ(Daemon::RunToEnd({Daemon::Binary(), "--config", d.config(), "--socket",
                              (dir_ / "other.sock").string()},
                             second),
            2);
  std::ifstream in(second);
  const std::string message(std::istreambuf_iterator<char>(in), {});
  EXPECT_NE(message.find("kvtierd:"), std::string::npos) << message;
  // --check-config: 0 and a summary for a good file, 2 and the reason for a bad one.
  EXPECT_EQ(Daemon::RunToEnd({Daemon::Binary(), "--config", d.config(), "--check-config"},
                             (dir_ / "check.log").string()),
            0);
  std::ofstream(dir_ / "bad.toml") << "[store]\ndirectory = \"/x\"\nhost_capacty = 5\n";
  EXPECT_EQ(Daemon::RunToEnd(
                {Daemon::Binary(), "--config", (dir_ / "bad.toml").string(), "--check-config"},
                (dir_ / "bad.log").string()),
            2);
  std::ifstream bad(dir_ / "bad.log");
  EXPECT_NE(std::string(std::istreambuf_iterator<char>(bad), {}).find("store.host_capacty"),
            std::string::npos);
}

// `kvtier stats --connect`: the daemon's counters, the layout read from the store
// directory (read-only, while the daemon holds it); a socket with no daemon is exit 2.
TEST_F(DaemonProcessTest, KvtierStatsConnectPrintsTheDaemonsCounters) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  auto store = Connect(d);
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  for (uint32_t i = 0; i < 3; ++i) {
    const BlockKey k = Key(4, 0, i);
    ASSERT_TRUE(store->Put(k, MakeBlock(bytes, k, 1).data(), bytes).ok());
  }
  ASSERT_TRUE(store->Flush().ok());
  const std::string out = (dir_ / "stats.json").string();
  ASSERT_EQ(Daemon::RunToEnd({KVTIER_TOOL, "stats", "--connect", d.socket(), "--dir",
                              (dir_ / "store").string(), "--json"},
                             out),
            0);
  std::ifstream in(out);
  const std::string json(std::istreambuf_iterator<char>(in), {});
  EXPECT_NE(json.find("\"ok\":true"), std::string::npos) << json;
  EXPECT_NE(json.find("\"puts\":3,"), std::string::npos) << json;
  EXPECT_NE(json.find("\"disk_blocks\":3,"), std::string::npos) << json;
  EXPECT_EQ(Daemon::RunToEnd({KVTIER_TOOL, "stats", "--connect", (dir_ / "nobody.sock").string(),
                              "--layout", "llama3-8b"},
                             (dir_ / "stats2.log").string()),
            2);
}

// SIGKILL of the daemon while a client writes: a batch is acknowledged durable once its
// Puts and a Flush after them returned OK. After a restart every acknowledged block is
// back byte-exact, and the same client Store reconnects by itself.
TEST_F(DaemonProcessTest, SigkillUnderLoadLosesNothingAcknowledged) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  auto store = Connect(d);
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  std::atomic<bool> stop{false};
  std::vector<uint32_t> durable;  // blocks acknowledged durable (writer thread only)
  std::thread writer([&] {
    std::vector<std::vector<std::byte>> blocks;
    uint32_t next = 0;
    while (!stop) {
      bool ok = true;
      std::vector<uint32_t> batch;
      for (int i = 0; i < 8 && ok; ++i, ++next) {
        const BlockKey k = Key(7, next % 4, next);
        ok = store->Put(k, MakeBlock(bytes, k, 3).data(), bytes).ok();
        batch.push_back(next);
      }
      if (ok && store->Flush().ok()) durable.insert(durable.end(), batch.begin(), batch.end());
      if (!ok) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  d.Kill(SIGKILL);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const auto status_down = GetSidecarStatus(*store);
  ASSERT_TRUE(status_down.has_value());
  ASSERT_TRUE(d.Start());
  // The client comes back on its own (backoff <= 50 ms).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline && !GetSidecarStatus(*store)->connected) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  stop = true;
  writer.join();
  const auto status_up = GetSidecarStatus(*store);
  EXPECT_TRUE(status_up->connected);
  EXPECT_GE(status_up->reconnects, 1u);
  ASSERT_GT(durable.size(), 8u) << "the writer made no progress before the kill";
  std::vector<std::byte> out(bytes);
  for (uint32_t b : durable) {
    const BlockKey k = Key(7, b % 4, b);
    Status s = store->Get(k, out.data(), bytes);
    ASSERT_TRUE(s.ok()) << b << ": " << s.ToString();
    ASSERT_TRUE(HoldsVersion(out, k, 3)) << b;
  }
}

// A client process SIGKILLed while it Puts through its staging area: what it had not
// committed is not visible, and every block that is visible is whole; the daemon frees
// its slots (no host slot stays pinned) and serves the next client.
TEST_F(DaemonProcessTest, ClientKilledMidPutLeavesNothingBehind) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  const pid_t child = fork();
  if (child == 0) {
    StoreOptions o;
    o.sidecar.socket = d.socket();
    o.sidecar.staging_blocks = 16;
    auto s = Store::Open(o, SmallLayout());
    if (!s.ok()) _exit(3);
    const uint64_t bytes = (*s)->block_bytes();
    std::vector<std::vector<std::byte>> data;
    std::vector<BlockWrite> writes;
    for (uint32_t i = 0; i < 64; ++i) data.push_back(MakeBlock(bytes, Key(9, 0, i), 5));
    for (uint32_t round = 0;; ++round) {
      writes.clear();
      for (uint32_t i = 0; i < 64; ++i) writes.push_back({Key(9, 0, i), data[i].data(), bytes});
      std::vector<Status> statuses(writes.size());
      (void)(*s)->PutBatch(writes, statuses);
    }
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the client exited early with " << WEXITSTATUS(status);
  auto store = Connect(d);
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  // The daemon finishes what it had in flight for the dead client, then unpins.
  StoreStats stats;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  do {
    stats = store->Stats();
  } while (stats.host_pinned_slots != 0 && std::chrono::steady_clock::now() < deadline);
  EXPECT_EQ(stats.host_pinned_slots, 0u);
  std::vector<std::byte> out(bytes);
  uint32_t visible = 0;
  for (uint32_t i = 0; i < 64; ++i) {
    const BlockKey k = Key(9, 0, i);
    Status s = store->Get(k, out.data(), bytes);
    if (s.code() == StatusCode::kNotFound) continue;
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_TRUE(HoldsVersion(out, k, 5)) << i;
    ++visible;
  }
  EXPECT_GT(visible, 0u) << "the client never got a Put through in 400 ms";
  // The next client can use the whole tier.
  for (uint32_t i = 0; i < 64; ++i) {
    const BlockKey k = Key(10, 1, i);
    ASSERT_TRUE(store->Put(k, MakeBlock(bytes, k, 1).data(), bytes).ok());
  }
}

// Eight client processes at once on one daemon, each with a model of its own sequence
// (random Put, Get, Delete, Contains, DropSequence), checking every answer against it,
// and reading the other clients' sequences, where only whole blocks of a version their
// owner wrote may appear.
TEST_F(DaemonProcessTest, EightClientsEachSeeExactlyWhatTheModelSays) {
  Daemon d(dir_);
  ASSERT_TRUE(d.Start());
  constexpr int kClients = 8;
  constexpr uint32_t kKeys = 24;
  constexpr int kOps = 400;
  std::vector<pid_t> children;
  for (int c = 0; c < kClients; ++c) {
    const pid_t pid = fork();
    if (pid == 0) {
      StoreOptions o;
      o.sidecar.socket = d.socket();
      o.sidecar.staging_blocks = 4;
      auto opened = Store::Open(o, SmallLayout());
      if (!opened.ok()) _exit(10);
      Store& s = **opened;
      const uint64_t bytes = s.block_bytes();
      std::mt19937_64 rng(1000 + c);
      std::map<uint32_t, uint64_t> model;  // block -> version
      uint64_t version = 0;
      std::vector<std::byte> out(bytes);
      const auto key = [&](uint32_t b, int owner = -1) {
        return Key(100 + (owner < 0 ? c : owner), b % 4, b);
      };
      for (int op = 0; op < kOps; ++op) {
        const uint32_t b = static_cast<uint32_t>(rng() % kKeys);
        switch (rng() % 6) {
          case 0:
          case 1: {
            ++version;
            if (!s.Put(key(b), MakeBlock(bytes, key(b), version).data(), bytes).ok()) _exit(11);
            model[b] = version;
            break;
          }
          case 2: {
            const Status st = s.Get(key(b), out.data(), bytes);
            const auto it = model.find(b);
            if (it == model.end() ? st.code() != StatusCode::kNotFound
                                  : !st.ok() || !HoldsVersion(out, key(b), it->second)) {
              _exit(12);
            }
            break;
          }
          case 3: {
            const Status st = s.Delete(key(b));
            if (model.erase(b) == 1 ? !st.ok() : st.code() != StatusCode::kNotFound) _exit(13);
            break;
          }
          case 4: {
            if (s.Contains(key(b)) != model.contains(b)) _exit(14);
            if (rng() % 40 == 0) {
              auto dropped = s.DropSequence(0, SequenceId{0, 100u + c});
              if (!dropped.ok() || *dropped != model.size()) _exit(15);
              model.clear();
            }
            break;
          }
          case 5: {
            // Another client's block: absent, or whole, of some version it wrote.
            const int owner = static_cast<int>(rng() % kClients);
            const Status st = s.Get(key(b, owner), out.data(), bytes);
            if (st.ok()) {
              bool whole = false;
              for (uint64_t v = 1; v <= kOps && !whole; ++v)
                whole = HoldsVersion(out, key(b, owner), v);
              if (!whole) _exit(16);
            } else if (st.code() != StatusCode::kNotFound) {
              _exit(17);
            }
            break;
          }
        }
      }
      _exit(0);
    }
    children.push_back(pid);
  }
  for (int c = 0; c < kClients; ++c) {
    int status = 0;
    waitpid(children[c], &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "client " << c << " exit " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1)
        << " (10 open, 11 put, 12 get, 13 delete, 14 contains, 15 drop, 16 torn, 17 error)";
  }
}

}  // namespace
}  // namespace kvtier
