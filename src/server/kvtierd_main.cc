// kvtierd: one kvtier store per host (or per GPU), served to every engine process on it
// over a Unix socket (block bytes through shared memory) and, optionally, TCP.
//
//   kvtierd --config /etc/kvtier/kvtierd.toml [--check-config] [overrides]
//
// SIGTERM or SIGINT: stop accepting, let the requests in flight finish, flush, close the
// catalog, exit 0.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>

#include "src/core/embedded_store.h"
#include "src/server/config.h"
#include "src/server/metrics.h"
#include "src/server/server.h"
#include "src/util/log.h"

namespace {

using kvtier::Status;
using kvtier::server::DaemonConfig;

int Fail(const Status& s) {
  std::fprintf(stderr, "kvtierd: %s\n", s.ToString().c_str());
  return 2;
}

std::vector<kvtier::server::NamespaceMetrics> NamespaceSnapshot(
    const DaemonConfig& config, const kvtier::EmbeddedStore& store,
    const kvtier::server::ServerStats& stats) {
  std::vector<kvtier::server::NamespaceMetrics> out;
  auto add = [&](uint32_t id, const std::string& name) {
    kvtier::server::NamespaceMetrics m;
    m.id = id;
    m.name = name;
    m.usage = store.Usage(id);
    for (const auto& [ns, clients] : stats.clients_per_namespace) {
      if (ns == id) m.clients = clients;
    }
    out.push_back(std::move(m));
  };
  if (config.server.namespaces.empty()) add(0, "default");
  for (const auto& ns : config.server.namespaces) add(ns.id, ns.name);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvtierd: the kvtier sidecar, one KV-cache store shared by the engines of a host"};
  std::string config_path;
  bool check_only = false;
  std::string directory, socket, tcp_listen, metrics_listen, log_level;
  uint32_t io_threads = 0;
  app.add_option("--config", config_path,
                 "the TOML config file (every option: kvtierd.example.toml)")
      ->required();
  app.add_flag("--check-config", check_only, "validate the config, print what it means, exit");
  app.add_option("--directory", directory, "override store.directory");
  app.add_option("--socket", socket, "override server.socket");
  app.add_option("--tcp-listen", tcp_listen, "override server.tcp_listen (\"\" turns TCP off)");
  app.add_option("--metrics-listen", metrics_listen,
                 "override metrics.listen (\"\" turns the HTTP listener off)");
  app.add_option("--log-level", log_level, "override log.level");
  app.add_option("--io-threads", io_threads, "override server.io_threads")
      ->check(CLI::Range(1, 256));
  CLI11_PARSE(app, argc, argv);

  kvtier::Result<DaemonConfig> loaded = kvtier::server::LoadConfig(config_path);
  if (!loaded.ok()) return Fail(loaded.status());
  DaemonConfig config = std::move(*loaded);
  if (app.count("--directory") > 0) config.store.directory = directory;
  if (app.count("--socket") > 0) config.server.socket_path = socket;
  if (app.count("--tcp-listen") > 0) config.server.tcp_listen = tcp_listen;
  if (app.count("--metrics-listen") > 0) config.metrics_listen = metrics_listen;
  if (app.count("--log-level") > 0) config.log_level = log_level;
  if (io_threads > 0) config.server.io_threads = io_threads;
  if (config.server.socket_path.empty() && !config.store.directory.empty()) {
    config.server.socket_path = config.store.directory + "/kvtierd.sock";
  }
  if (Status s = kvtier::server::ValidateConfig(config); !s.ok()) return Fail(s);
  if (check_only) {
    std::printf("%s: OK\n%s", config_path.c_str(), kvtier::server::DescribeConfig(config).c_str());
    return 0;
  }
  kvtier::Log().set_level(spdlog::level::from_str(config.log_level));

  // Signals are taken synchronously by this thread (sigwait), so they are blocked in
  // every thread the store and the server start from here on.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a peer gone mid-write is an error code, not a signal

  // Opening the store takes the directory's lock: one daemon (or embedded user) per
  // store directory.
  auto opened = kvtier::EmbeddedStore::Open(config.store, config.layout);
  if (!opened.ok()) return Fail(opened.status());
  std::unique_ptr<kvtier::EmbeddedStore> store = std::move(*opened);
  auto started = kvtier::server::Server::Start(store.get(), config.server);
  if (!started.ok()) return Fail(started.status());
  std::unique_ptr<kvtier::server::Server> server = std::move(*started);

  std::atomic<bool> serving{true};  // /healthz: 503 once stopping
  std::unique_ptr<kvtier::server::MetricsServer> metrics;
  if (!config.metrics_listen.empty()) {
    auto m = kvtier::server::MetricsServer::Start(
        config.metrics_listen,
        [&] {
          const kvtier::server::ServerStats stats = server->stats();
          return kvtier::server::RenderMetrics(store->Stats(), stats,
                                               NamespaceSnapshot(config, *store, stats));
        },
        [&] { return serving.load(); });
    if (!m.ok()) return Fail(m.status());
    metrics = std::move(*m);
  }
  kvtier::Log().info("kvtierd: serving {} ({}) on {}{}{}", config.store.directory,
                     config.layout.ToString(), config.server.socket_path,
                     config.server.tcp_listen.empty() ? "" : " and tcp " + config.server.tcp_listen,
                     metrics ? ", metrics on " + config.metrics_listen : "");

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  kvtier::Log().info("kvtierd: {} received: stopping", strsignal(signal_number));
  serving = false;
  server->Stop();  // no new connections or requests; what was in flight has finished
  metrics.reset();
  Status flushed = store->Flush();
  if (!flushed.ok()) kvtier::Log().error("kvtierd: flush at exit: {}", flushed.ToString());
  server.reset();
  store.reset();  // closes the catalog
  kvtier::Log().info("kvtierd: stopped");
  return flushed.ok() ? 0 : 1;
}
