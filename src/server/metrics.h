// kvtierd's metrics: the Prometheus text exposition of the store's, the server's and
// each namespace's counters, and a small HTTP listener (Boost.Beast) that serves it at
// /metrics, with /healthz for liveness probes. Names are prefixed kvtier_, in base units
// (_bytes, _seconds, _total); labels are low-cardinality only (tier, op, namespace).
#ifndef KVTIER_SERVER_METRICS_H_
#define KVTIER_SERVER_METRICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvtier/status.h"
#include "kvtier/store.h"
#include "src/core/embedded_store.h"
#include "src/server/server.h"

namespace kvtier::server {

struct NamespaceMetrics {
  uint32_t id = 0;
  std::string name;
  NamespaceUsage usage;
  uint64_t clients = 0;
};

// The exposition text (version 0.0.4) of one snapshot.
std::string RenderMetrics(const StoreStats& store, const ServerStats& server,
                          const std::vector<NamespaceMetrics>& namespaces);

class MetricsServer {
 public:
  // Listens on `listen` ("host:port"; port 0 picks a free one) on a thread of its own
  // and answers GET /metrics with render() and GET /healthz with "ok" (200) while
  // healthy() holds, else 503. Anything else: 404 (405 for other methods).
  static Result<std::unique_ptr<MetricsServer>> Start(const std::string& listen,
                                                      std::function<std::string()> render,
                                                      std::function<bool()> healthy);
  ~MetricsServer();  // stops the listener and joins its thread

  uint16_t port() const;

  struct Impl;

 private:
  explicit MetricsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_METRICS_H_
