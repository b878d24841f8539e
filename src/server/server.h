// kvtier::server::Server: the kvtierd daemon's serving core, embeddable (the daemon's
// main wraps it; tests and benchmarks run it in-process on a Store they own). It
// listens on a pathname Unix socket (and optionally TCP), speaks the protocol of
// protocol/PROTOCOL.md, and serves every request from one Store.
//
// Threading: `io_threads` io_contexts, one thread each; a connection lives on one of
// them for its whole life (no locks on the connection path). Store work that can block
// (block transfers, Flush, DropSequence, IndexBlock, Select) runs on the store's async
// threads or the server's worker pool, and its completion is posted back to the
// connection's io_context.
#ifndef KVTIER_SERVER_SERVER_H_
#define KVTIER_SERVER_SERVER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvtier/status.h"
#include "kvtier/store.h"
#include "src/core/embedded_store.h"

namespace kvtier::server {

// Who may use a namespace, and its quotas.
struct NamespaceConfig {
  uint32_t id = 0;
  std::string name;                 // for logs and metric labels
  std::vector<uint32_t> uids;       // Unix-socket peers (SO_PEERCRED) allowed in
  std::vector<uint32_t> gids;       // ... by primary group
  std::vector<std::string> tokens;  // a client presenting one of these is allowed in
  // Quotas are the store's (StoreOptions::quotas): the daemon's config puts them there.
};

struct ServerOptions {
  // Pathname of the Unix socket (created; a stale socket file is replaced when no
  // daemon answers on it). Required.
  std::string socket_path;
  uint32_t socket_mode = 0660;
  // "host:port" for the TCP listener; "" = none. A non-loopback address needs every
  // namespace reachable over TCP to have tokens (Start refuses otherwise).
  std::string tcp_listen;
  uint32_t io_threads = 2;
  uint32_t worker_threads = 2;  // Select, IndexBlock, Flush, DropSequence
  uint32_t max_frame_bytes = 64u << 20;
  uint32_t max_in_flight = 256;                            // requests per connection
  uint64_t max_buffered_reply_bytes = uint64_t{64} << 20;  // per connection
  uint32_t max_staging_blocks = 256;                       // per Unix-socket connection
  // Namespaces and who may use them. Empty: namespace 0 ("default"), open to the
  // daemon's own uid only.
  std::vector<NamespaceConfig> namespaces;
};

// Request latency (a frame's arrival to its reply being queued), per opcode, in fixed
// buckets: counts of requests that took <= kLatencyBucketsSeconds[i], then +Inf.
inline constexpr std::array<double, 14> kLatencyBucketsSeconds = {
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 1.0};
// Opcodes, kError (0) to kGetToDevice (12): the size of ServerStats::latency.
inline constexpr size_t kOpcodeCount = 13;
struct LatencyHistogram {
  std::array<uint64_t, kLatencyBucketsSeconds.size() + 1> buckets{};  // not cumulative
  uint64_t count = 0;
  double sum_seconds = 0;
};

// Counters since Start (a snapshot).
struct ServerStats {
  uint64_t connections_accepted = 0;
  uint64_t connections_open = 0;
  uint64_t handshakes_refused = 0;
  uint64_t frames_rejected = 0;   // malformed frames answered with Error
  uint64_t slow_readers_cut = 0;  // connections closed for unread replies
  uint64_t requests = 0;
  uint64_t staging_bytes_mapped = 0;     // bytes of staging areas alive now
  uint64_t staging_slots_in_use = 0;     // staging slots named by requests in flight
  uint64_t device_pools_registered = 0;  // client GPU tiers mapped now (RegisterDevice)
  uint64_t direct_device_bytes = 0;      // bytes GetToDevice copied into them
  // Host-tier bytes pinned by inline Get replies that are being sent from their slots.
  uint64_t reply_pinned_bytes = 0;
  std::array<LatencyHistogram, kOpcodeCount> latency;  // indexed by wire::Opcode
  // Open connections per namespace id (after their handshake).
  std::vector<std::pair<uint32_t, uint64_t>> clients_per_namespace;
};

class Server {
 public:
  // Binds the listeners and starts serving `store` (which must outlive the Server).
  // Errors: InvalidArgument for bad options, FailedPrecondition when another daemon
  // answers on the socket, IOError when a listener cannot be bound.
  static Result<std::unique_ptr<Server>> Start(EmbeddedStore* store, const ServerOptions& options);
  ~Server();  // Stop()

  // Stops accepting, closes every connection once its in-flight requests have
  // completed (their replies are dropped), joins the threads. Idempotent. Call it from
  // a thread of the caller's (it waits for the server's own threads).
  void Stop();

  ServerStats stats() const;

  // The port the TCP listener is bound to (useful with "host:0"); 0 without one.
  uint16_t tcp_port() const;

  struct Impl;

 private:
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_SERVER_H_
