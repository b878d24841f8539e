// Helpers of the sidecar client tests: an EmbeddedStore served by an in-process
// kvtier::server::Server on a Unix socket in a temporary directory, and seeded random
// blocks.
#ifndef KVTIER_TESTS_CLIENT_TEST_UTIL_H_
#define KVTIER_TESTS_CLIENT_TEST_UTIL_H_

#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvtier/client.h"
#include "kvtier/store.h"
#include "src/core/embedded_store.h"
#include "src/server/server.h"

namespace kvtier::testing {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvtier-client-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Fresh seeded random bytes (never all zeros).
inline std::vector<std::byte> RandomBlock(uint64_t bytes, std::mt19937_64& rng) {
  std::vector<std::byte> block(bytes);
  for (uint64_t i = 0; i < bytes; i += 8) {
    const uint64_t r = rng();
    for (uint64_t j = 0; j < 8 && i + j < bytes; ++j) block[i + j] = std::byte(r >> (8 * j));
  }
  return block;
}

// Polls `done` every millisecond for up to `timeout`.
inline bool Eventually(const std::function<bool()>& done,
                       std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < until) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return done();
}

// A daemon in this process: `backing` served by a Server on `socket_path`.
class Sidecar {
 public:
  Sidecar(const StoreOptions& backing_options, const ModelLayout& layout,
          server::ServerOptions server_options = {}) {
    socket_path_ = dir_.path() + "/kvtierd.sock";
    server_options_ = std::move(server_options);
    server_options_.socket_path = socket_path_;
    auto store = EmbeddedStore::Open(backing_options, layout);
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    if (store.ok()) backing_ = std::move(store).value();
  }
  ~Sidecar() { StopServer(); }

  bool StartServer() {
    if (backing_ == nullptr) return false;
    auto server = server::Server::Start(backing_.get(), server_options_);
    EXPECT_TRUE(server.ok()) << server.status().ToString();
    if (!server.ok()) return false;
    server_ = std::move(server).value();
    return true;
  }
  void StopServer() {
    if (server_ != nullptr) server_->Stop();
    server_.reset();
  }

  // Client options for this daemon (short timeouts, a small staging area).
  StoreOptions ClientOptions(uint32_t staging_blocks = 8) const {
    StoreOptions o;
    o.sidecar.socket = socket_path_;
    o.sidecar.connect_timeout_ms = 3000;
    o.sidecar.max_backoff_ms = 50;
    o.sidecar.staging_blocks = staging_blocks;
    return o;
  }
  std::unique_ptr<Store> Open(const StoreOptions& options, const ModelLayout& layout) {
    auto store = Store::Open(options, layout);
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    return store.ok() ? std::move(store).value() : nullptr;
  }

  EmbeddedStore* backing() { return backing_.get(); }
  server::Server* server() { return server_.get(); }
  const std::string& socket_path() const { return socket_path_; }
  const std::string& dir() const { return dir_.path(); }

 private:
  TempDir dir_;
  std::string socket_path_;
  server::ServerOptions server_options_;
  std::unique_ptr<EmbeddedStore> backing_;
  std::unique_ptr<server::Server> server_;
};

// Options of a memory-only backing store with room for `blocks` blocks of `layout`.
inline StoreOptions MemoryStore(const ModelLayout& layout, uint64_t blocks) {
  StoreOptions o;
  o.host_capacity_bytes = blocks * ((layout.BytesPerBlock() + 4095) / 4096 * 4096);
  o.host_memory = HostMemoryKind::kPlain;
  return o;
}

}  // namespace kvtier::testing

#endif  // KVTIER_TESTS_CLIENT_TEST_UTIL_H_
