#include "src/server/server_context.h"

#include <algorithm>

namespace kvtier::server {

ServerCounters::ServerCounters(size_t namespaces)
    : clients_per_namespace(new std::atomic<uint64_t>[std::max<size_t>(namespaces, 1)]) {
  for (size_t i = 0; i < std::max<size_t>(namespaces, 1); ++i) clients_per_namespace[i] = 0;
}

void ServerCounters::RecordLatency(uint16_t opcode, uint64_t nanos) {
  if (opcode >= kOpcodeCount) return;
  Histogram& h = latency_[opcode];
  const double seconds = static_cast<double>(nanos) * 1e-9;
  size_t bucket = 0;
  while (bucket < kLatencyBucketsSeconds.size() && seconds > kLatencyBucketsSeconds[bucket]) {
    ++bucket;
  }
  h.buckets[bucket].fetch_add(1, std::memory_order_relaxed);
  h.count.fetch_add(1, std::memory_order_relaxed);
  h.sum_nanos.fetch_add(nanos, std::memory_order_relaxed);
}

ServerStats ServerCounters::Snapshot(const std::vector<NamespaceConfig>& namespaces) const {
  ServerStats s;
  s.connections_accepted = connections_accepted.load(std::memory_order_relaxed);
  s.connections_open = connections_open.load(std::memory_order_relaxed);
  s.handshakes_refused = handshakes_refused.load(std::memory_order_relaxed);
  s.frames_rejected = frames_rejected.load(std::memory_order_relaxed);
  s.slow_readers_cut = slow_readers_cut.load(std::memory_order_relaxed);
  s.requests = requests.load(std::memory_order_relaxed);
  s.staging_bytes_mapped = staging_bytes_mapped.load(std::memory_order_relaxed);
  s.staging_slots_in_use = staging_slots_in_use.load(std::memory_order_relaxed);
  s.reply_pinned_bytes = reply_pinned_bytes.load(std::memory_order_relaxed);
  s.device_pools_registered = device_pools_registered.load(std::memory_order_relaxed);
  s.direct_device_bytes = direct_device_bytes.load(std::memory_order_relaxed);
  for (size_t op = 0; op < kOpcodeCount; ++op) {
    const Histogram& h = latency_[op];
    LatencyHistogram& out = s.latency[op];
    for (size_t b = 0; b < h.buckets.size(); ++b) {
      out.buckets[b] = h.buckets[b].load(std::memory_order_relaxed);
    }
    out.count = h.count.load(std::memory_order_relaxed);
    out.sum_seconds = static_cast<double>(h.sum_nanos.load(std::memory_order_relaxed)) * 1e-9;
  }
  for (size_t i = 0; i < namespaces.size(); ++i) {
    s.clients_per_namespace.emplace_back(namespaces[i].id,
                                         clients_per_namespace[i].load(std::memory_order_relaxed));
  }
  return s;
}

void ServerContext::ConnectionCreated() {
  std::lock_guard<std::mutex> lock(alive_mu_);
  ++alive_;
}

void ServerContext::ConnectionDestroyed() {
  std::lock_guard<std::mutex> lock(alive_mu_);
  if (--alive_ == 0) alive_cv_.notify_all();
}

void ServerContext::WaitForNoConnections() {
  std::unique_lock<std::mutex> lock(alive_mu_);
  alive_cv_.wait(lock, [this] { return alive_ == 0; });
}

}  // namespace kvtier::server
