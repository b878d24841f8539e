// What every connection of a Server shares: the store, the options, the namespaces, the
// worker pool and the counters behind Server::stats(). Internal to src/server.
//
// Thread safety: the plain fields are set before the first connection and then only
// read; the counters are atomics, updated from any thread; the count of live
// connections is guarded by its mutex.
#ifndef KVTIER_SERVER_SERVER_CONTEXT_H_
#define KVTIER_SERVER_SERVER_CONTEXT_H_

#include <array>
#include <atomic>
#include <boost/asio/thread_pool.hpp>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "src/core/embedded_store.h"
#include "src/server/protocol/frame.h"
#include "src/server/server.h"

namespace kvtier::server {

static_assert(kOpcodeCount == wire::kMaxOpcode + 1, "ServerStats::latency has one per opcode");
static_assert(std::tuple_size_v<decltype(ServerStats::latency)> == kOpcodeCount);

class ServerCounters {
 public:
  explicit ServerCounters(size_t namespaces);

  std::atomic<uint64_t> connections_accepted{0};
  std::atomic<uint64_t> connections_open{0};
  std::atomic<uint64_t> handshakes_refused{0};
  std::atomic<uint64_t> frames_rejected{0};
  std::atomic<uint64_t> slow_readers_cut{0};
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> staging_bytes_mapped{0};
  std::atomic<uint64_t> staging_slots_in_use{0};
  std::atomic<uint64_t> device_pools_registered{0};
  std::atomic<uint64_t> direct_device_bytes{0};
  std::atomic<uint64_t> reply_pinned_bytes{0};
  // Open connections past their handshake, per index into ServerContext::namespaces.
  std::unique_ptr<std::atomic<uint64_t>[]> clients_per_namespace;

  // One request of `opcode` (<= wire::kMaxOpcode; others are not recorded) took `nanos`.
  void RecordLatency(uint16_t opcode, uint64_t nanos);
  // `namespaces`: ServerContext::namespaces, for clients_per_namespace's ids.
  ServerStats Snapshot(const std::vector<NamespaceConfig>& namespaces) const;

 private:
  struct Histogram {
    std::array<std::atomic<uint64_t>, kLatencyBucketsSeconds.size() + 1> buckets{};
    std::atomic<uint64_t> count{0};
    std::atomic<uint64_t> sum_nanos{0};
  };
  std::array<Histogram, kOpcodeCount> latency_;
};

struct ServerContext {
  ServerContext(EmbeddedStore* s, const ServerOptions& o, std::vector<NamespaceConfig> ns)
      : store(s),
        options(o),
        namespaces(std::move(ns)),
        max_reply_pinned_bytes(s->Stats().host_capacity_bytes / 4),
        zero_block(s->block_bytes()),
        counters(namespaces.size()) {}

  EmbeddedStore* const store;  // outlives the server
  const ServerOptions options;
  const std::vector<NamespaceConfig> namespaces;  // EffectiveNamespaces(options)
  // Inline Get replies send host-tier blocks from their pinned slots while they pin at
  // most this much of the host tier (a quarter) in all; beyond it, from copies. So
  // clients slow to read their replies cannot fill the host tier with pins.
  const uint64_t max_reply_pinned_bytes;
  const std::vector<uint8_t> zero_block;        // what a reply sends for a block it lacks
  boost::asio::thread_pool* workers = nullptr;  // Select, IndexBlock, Flush, DropSequence
  ServerCounters counters;
  std::atomic<bool> stopping{false};  // Stop() began: new connections close at once
  std::atomic<uint64_t> next_connection_id{1};

  // Connection objects alive (Stop waits for zero: every request has completed).
  void ConnectionCreated();
  void ConnectionDestroyed();
  void WaitForNoConnections();

 private:
  std::mutex alive_mu_;
  std::condition_variable alive_cv_;
  uint64_t alive_ = 0;  // guarded by alive_mu_
};

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_SERVER_CONTEXT_H_
