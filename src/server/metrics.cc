#include "src/server/metrics.h"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <charconv>
#include <sstream>
#include <thread>

#include "src/server/protocol/frame.h"

namespace kvtier::server {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

// Label values are namespace names from the config: escape what the format requires.
std::string Escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

class Writer {
 public:
  void Header(std::string_view name, std::string_view type, std::string_view help) {
    out_ << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
  }
  void Sample(std::string_view name, std::string_view labels, double value) {
    out_ << name;
    if (!labels.empty()) out_ << '{' << labels << '}';
    out_ << ' ' << Number(value) << '\n';
  }
  // One metric, one unlabelled sample.
  void Single(std::string_view name, std::string_view type, std::string_view help, double value) {
    Header(name, type, help);
    Sample(name, "", value);
  }
  std::string str() const { return out_.str(); }

 private:
  static std::string Number(double v) {
    char buf[64];
    const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
    return ec == std::errc() ? std::string(buf, end) : std::string("NaN");
  }
  std::ostringstream out_;
};

std::string Tier(std::string_view tier) { return "tier=\"" + std::string(tier) + "\""; }

}  // namespace

std::string RenderMetrics(const StoreStats& s, const ServerStats& server,
                          const std::vector<NamespaceMetrics>& namespaces) {
  Writer w;
  // Hits and misses per tier: a Get served from the host tier is a host hit; one that
  // had to be promoted from disk is a host miss and a disk hit; one found nowhere is a
  // disk miss. The GPU tier counts Acquire's blocks.
  const uint64_t host_hits = s.gets > s.disk_reads ? s.gets - s.disk_reads : 0;
  w.Header("kvtier_hits_total", "counter", "Blocks found in a tier when asked for.");
  w.Sample("kvtier_hits_total", Tier("host"), static_cast<double>(host_hits));
  w.Sample("kvtier_hits_total", Tier("disk"), static_cast<double>(s.disk_reads));
  w.Sample("kvtier_hits_total", Tier("gpu"), static_cast<double>(s.device_hits));
  w.Header("kvtier_misses_total", "counter", "Blocks not found in a tier when asked for.");
  w.Sample("kvtier_misses_total", Tier("host"), static_cast<double>(s.disk_reads + s.get_misses));
  w.Sample("kvtier_misses_total", Tier("disk"), static_cast<double>(s.get_misses));
  w.Sample("kvtier_misses_total", Tier("gpu"),
           static_cast<double>(s.device_fetches_host + s.device_fetches_disk));

  w.Header("kvtier_bytes_written_total", "counter", "Block bytes written into a tier.");
  w.Sample("kvtier_bytes_written_total", Tier("host"), static_cast<double>(s.bytes_put));
  w.Sample("kvtier_bytes_written_total", Tier("disk"), static_cast<double>(s.disk_bytes_written));
  w.Sample("kvtier_bytes_written_total", Tier("gpu"), static_cast<double>(s.device_bytes_in));
  w.Header("kvtier_bytes_read_total", "counter", "Block bytes read out of a tier.");
  w.Sample("kvtier_bytes_read_total", Tier("host"), static_cast<double>(s.bytes_got));
  w.Sample("kvtier_bytes_read_total", Tier("disk"), static_cast<double>(s.disk_bytes_read));

  w.Header("kvtier_tier_capacity_bytes", "gauge", "Bytes a tier can hold.");
  w.Sample("kvtier_tier_capacity_bytes", Tier("host"), static_cast<double>(s.host_capacity_bytes));
  w.Sample("kvtier_tier_capacity_bytes", Tier("disk"), static_cast<double>(s.disk_capacity_bytes));
  w.Sample("kvtier_tier_capacity_bytes", Tier("gpu"), static_cast<double>(s.device_capacity_bytes));
  w.Header("kvtier_tier_used_bytes", "gauge", "Bytes of a tier in use.");
  w.Sample("kvtier_tier_used_bytes", Tier("host"),
           static_cast<double>(s.host_blocks * s.host_slot_bytes));
  w.Sample("kvtier_tier_used_bytes", Tier("disk"), static_cast<double>(s.disk_used_bytes));
  w.Sample("kvtier_tier_used_bytes", Tier("gpu"),
           static_cast<double>(s.device_slots == 0
                                   ? 0
                                   : s.device_blocks * (s.device_capacity_bytes / s.device_slots)));
  w.Header("kvtier_tier_blocks", "gauge", "Blocks resident in a tier.");
  w.Sample("kvtier_tier_blocks", Tier("host"), static_cast<double>(s.host_blocks));
  w.Sample("kvtier_tier_blocks", Tier("disk"), static_cast<double>(s.disk_blocks));
  w.Sample("kvtier_tier_blocks", Tier("gpu"), static_cast<double>(s.device_blocks));

  w.Header("kvtier_evictions_total", "counter", "Blocks evicted from a tier.");
  w.Sample("kvtier_evictions_total", Tier("host"), static_cast<double>(s.evictions));
  w.Sample("kvtier_evictions_total", Tier("gpu"), static_cast<double>(s.device_evictions));
  w.Single("kvtier_evictions_lost_total", "counter",
           "Blocks evicted from the host tier with no lower tier to keep them.",
           static_cast<double>(s.evictions_lost));
  w.Single("kvtier_dirty_blocks", "gauge", "Host blocks not yet durable on disk.",
           static_cast<double>(s.dirty_blocks));
  w.Single("kvtier_corrupt_blocks_total", "counter", "Blocks quarantined after a checksum failure.",
           static_cast<double>(s.corrupt_blocks));
  w.Header("kvtier_disk_errors_total", "counter", "Disk operations that failed.");
  w.Sample("kvtier_disk_errors_total", "op=\"read\"", static_cast<double>(s.disk_read_errors));
  w.Sample("kvtier_disk_errors_total", "op=\"write\"", static_cast<double>(s.disk_write_errors));
  w.Single("kvtier_busy_rejections_total", "counter", "Puts refused because every slot was busy.",
           static_cast<double>(s.busy_rejections));
  w.Single("kvtier_indexed_blocks", "gauge", "Blocks with a summary in the retrieval index.",
           static_cast<double>(s.indexed_blocks));
  w.Single("kvtier_selects_total", "counter", "Select calls served.",
           static_cast<double>(s.selects));

  w.Single("kvtier_connections_accepted_total", "counter", "Connections accepted.",
           static_cast<double>(server.connections_accepted));
  w.Single("kvtier_handshakes_refused_total", "counter", "Handshakes refused.",
           static_cast<double>(server.handshakes_refused));
  w.Single("kvtier_frames_rejected_total", "counter", "Malformed frames answered with an error.",
           static_cast<double>(server.frames_rejected));
  w.Single("kvtier_slow_readers_cut_total", "counter",
           "Connections closed because their unread replies passed the limit.",
           static_cast<double>(server.slow_readers_cut));
  w.Single("kvtier_leases_held", "gauge", "Staging slots named by requests in flight.",
           static_cast<double>(server.staging_slots_in_use));
  w.Single("kvtier_reply_pinned_bytes", "gauge",
           "Host-tier bytes pinned by inline Get replies being sent from their slots.",
           static_cast<double>(server.reply_pinned_bytes));
  w.Single("kvtier_staging_bytes", "gauge", "Bytes of client staging areas mapped.",
           static_cast<double>(server.staging_bytes_mapped));
  w.Single("kvtier_device_pools_registered", "gauge",
           "Client GPU tiers registered for direct copies (RegisterDevice).",
           static_cast<double>(server.device_pools_registered));
  w.Single("kvtier_direct_device_bytes_total", "counter",
           "Bytes copied from the host tier straight into client GPU tiers (GetToDevice).",
           static_cast<double>(server.direct_device_bytes));

  w.Header("kvtier_connected_clients", "gauge", "Clients connected (after their handshake).");
  for (const NamespaceMetrics& ns : namespaces) {
    w.Sample("kvtier_connected_clients", "namespace=\"" + Escape(ns.name) + "\"",
             static_cast<double>(ns.clients));
  }
  w.Header("kvtier_namespace_blocks", "gauge", "Blocks a namespace holds.");
  for (const NamespaceMetrics& ns : namespaces) {
    w.Sample("kvtier_namespace_blocks", "namespace=\"" + Escape(ns.name) + "\"," + Tier("store"),
             static_cast<double>(ns.usage.blocks));
    w.Sample("kvtier_namespace_blocks", "namespace=\"" + Escape(ns.name) + "\"," + Tier("host"),
             static_cast<double>(ns.usage.host_blocks));
  }
  w.Header("kvtier_quota_rejections_total", "counter", "Operations refused by a namespace quota.");
  for (const NamespaceMetrics& ns : namespaces) {
    w.Sample("kvtier_quota_rejections_total", "namespace=\"" + Escape(ns.name) + "\"",
             static_cast<double>(ns.usage.quota_rejections));
  }

  w.Header("kvtier_request_duration_seconds", "histogram",
           "Time from a request's arrival to its reply being queued.");
  for (size_t op = 1; op < server.latency.size(); ++op) {
    const LatencyHistogram& h = server.latency[op];
    const std::string label =
        "op=\"" + std::string(wire::OpcodeName(static_cast<uint16_t>(op))) + "\"";
    uint64_t cumulative = 0;
    for (size_t b = 0; b < kLatencyBucketsSeconds.size(); ++b) {
      cumulative += h.buckets[b];
      std::ostringstream le;
      le << kLatencyBucketsSeconds[b];
      w.Sample("kvtier_request_duration_seconds_bucket", label + ",le=\"" + le.str() + "\"",
               static_cast<double>(cumulative));
    }
    cumulative += h.buckets.back();
    w.Sample("kvtier_request_duration_seconds_bucket", label + ",le=\"+Inf\"",
             static_cast<double>(cumulative));
    w.Sample("kvtier_request_duration_seconds_sum", label, h.sum_seconds);
    w.Sample("kvtier_request_duration_seconds_count", label, static_cast<double>(h.count));
  }
  return w.str();
}

// --- The HTTP listener ---------------------------------------------------------------

struct MetricsServer::Impl {
  asio::io_context io{1};
  tcp::acceptor acceptor{io};
  std::function<std::string()> render;
  std::function<bool()> healthy;
  std::thread thread;

  void Accept() {
    acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
      if (ec) {
        if (ec != asio::error::operation_aborted) Accept();
        return;
      }
      Serve(std::make_shared<beast::tcp_stream>(std::move(socket)));
      Accept();
    });
  }

  // One request per connection (Connection: close): scrapes are rare and small.
  void Serve(std::shared_ptr<beast::tcp_stream> stream) {
    auto buffer = std::make_shared<beast::flat_buffer>();
    auto request = std::make_shared<http::request<http::empty_body>>();
    stream->expires_after(std::chrono::seconds(10));
    http::async_read(
        *stream, *buffer, *request, [this, stream, buffer, request](beast::error_code ec, size_t) {
          if (ec) return;
          auto response = std::make_shared<http::response<http::string_body>>();
          Answer(*request, *response);
          response->keep_alive(false);
          response->prepare_payload();
          http::async_write(*stream, *response, [stream, response](beast::error_code, size_t) {
            beast::error_code ignored;
            stream->socket().shutdown(tcp::socket::shutdown_send, ignored);
          });
        });
  }

  void Answer(const http::request<http::empty_body>& req, http::response<http::string_body>& res) {
    res.version(req.version());
    res.set(http::field::server, "kvtierd");
    const std::string_view target(req.target().data(), req.target().size());
    const std::string_view path = target.substr(0, target.find('?'));
    if (req.method() != http::verb::get && req.method() != http::verb::head) {
      res.result(http::status::method_not_allowed);
      res.body() = "GET only\n";
    } else if (path == "/metrics") {
      res.result(http::status::ok);
      res.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      res.body() = render();
    } else if (path == "/healthz") {
      const bool ok = healthy();
      res.result(ok ? http::status::ok : http::status::service_unavailable);
      res.body() = ok ? "ok\n" : "unhealthy\n";
    } else {
      res.result(http::status::not_found);
      res.body() = "not found: try /metrics or /healthz\n";
    }
    if (req.method() == http::verb::head) res.body().clear();
  }
};

Result<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& listen,
                                                            std::function<std::string()> render,
                                                            std::function<bool()> healthy) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return Status::InvalidArgument("metrics listen address \"" + listen + "\" is not host:port");
  }
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  unsigned port = 0;
  const std::string port_text = listen.substr(colon + 1);
  const auto [end, perr] =
      std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (perr != std::errc() || end != port_text.data() + port_text.size() || port > 65535) {
    return Status::InvalidArgument("bad port in metrics listen address \"" + listen + "\"");
  }
  auto impl = std::make_unique<Impl>();
  impl->render = std::move(render);
  impl->healthy = std::move(healthy);
  boost::system::error_code ec;
  const asio::ip::address address =
      asio::ip::make_address(host == "localhost" ? "127.0.0.1" : host, ec);
  if (ec)
    return Status::InvalidArgument("bad metrics listen address \"" + listen +
                                   "\": " + ec.message());
  const tcp::endpoint endpoint(address, static_cast<uint16_t>(port));
  impl->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(endpoint, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Status::IOError("metrics listener on " + listen + ": " + ec.message());
  impl->Accept();
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->io.run(); });
  return std::unique_ptr<MetricsServer>(new MetricsServer(std::move(impl)));
}

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MetricsServer::~MetricsServer() {
  impl_->io.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

uint16_t MetricsServer::port() const { return impl_->acceptor.local_endpoint().port(); }

}  // namespace kvtier::server
