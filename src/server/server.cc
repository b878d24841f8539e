#include "src/server/server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include "src/server/connection.h"
#include "src/server/handshake.h"
#include "src/server/server_context.h"
#include "src/util/log.h"

namespace kvtier::server {

namespace asio = boost::asio;
using WorkGuard = asio::executor_work_guard<asio::io_context::executor_type>;

struct Server::Impl {
  Impl(EmbeddedStore* store, const ServerOptions& options)
      : ctx(store, options, EffectiveNamespaces(options, static_cast<uint32_t>(geteuid()))) {}

  ServerContext ctx;
  std::vector<std::unique_ptr<IoShard>> shards;
  std::vector<WorkGuard> guards;
  std::vector<std::thread> threads;
  std::unique_ptr<asio::thread_pool> workers;
  // Both live on shards[0].
  std::unique_ptr<asio::local::stream_protocol::acceptor> unix_acceptor;
  std::unique_ptr<asio::ip::tcp::acceptor> tcp_acceptor;
  uint16_t tcp_port = 0;
  // After a failed accept (EMFILE...), the listeners wait this long before the next try
  // instead of spinning.
  std::unique_ptr<asio::steady_timer> accept_backoff;
  std::atomic<uint32_t> next_shard{0};
  // The socket file we created (removed by Stop when it is still ours).
  dev_t socket_dev = 0;
  ino_t socket_ino = 0;

  std::mutex stop_mu;
  bool stopped = false;  // guarded by stop_mu

  Status BindUnix();
  Status BindTcp();
  void AcceptUnix();
  void AcceptTcp();
  // Calls `accept` again after a failed accept: at once, or after a pause when the
  // error is one that an immediate retry would hit again (out of descriptors, memory).
  void RetryAccept(const boost::system::error_code& ec, void (Impl::*accept)());
  IoShard& NextShard() { return *shards[next_shard.fetch_add(1) % shards.size()]; }
  void OnAccepted(IoShard& shard, std::shared_ptr<Connection::Socket> socket, bool unix_socket);
  void Stop();
};

namespace {

Status FromBoost(const boost::system::error_code& ec, const std::string& context) {
  return Status::IOError(context + ": " + ec.message());
}

}  // namespace

Status Server::Impl::BindUnix() {
  const std::string& path = ctx.options.socket_path;
  if (path.empty()) return Status::InvalidArgument("ServerOptions::socket_path is required");
  if (path.size() >= sizeof(sockaddr_un{}.sun_path)) {
    return Status::InvalidArgument("socket path too long (" + std::to_string(path.size()) +
                                   " bytes): " + path);
  }
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::FailedPrecondition(path + " exists and is not a socket");
    }
    // A live daemon answers; a stale file (its daemon died) refuses the connection.
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Status::FromErrno(errno, "socket");
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    const int rc = connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
    const int err = errno;
    ::close(fd);
    if (rc == 0 || err == EAGAIN) {
      return Status::FailedPrecondition("another kvtierd serves " + path);
    }
    if (err != ECONNREFUSED && err != ENOENT) {
      return Status::FromErrno(err, "cannot tell whether another kvtierd serves " + path);
    }
    Log().info("kvtierd: removing the stale socket {}", path);
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, "unlink " + path);
    }
  }
  unix_acceptor = std::make_unique<asio::local::stream_protocol::acceptor>(shards[0]->ctx);
  boost::system::error_code ec;
  unix_acceptor->open(asio::local::stream_protocol(), ec);
  if (ec) return FromBoost(ec, "socket(AF_UNIX)");
  unix_acceptor->bind(asio::local::stream_protocol::endpoint(path), ec);
  if (ec) return FromBoost(ec, "bind " + path);
  if (chmod(path.c_str(), ctx.options.socket_mode) != 0) {
    return Status::FromErrno(errno, "chmod " + path);
  }
  if (lstat(path.c_str(), &st) == 0) {
    socket_dev = st.st_dev;
    socket_ino = st.st_ino;
  }
  unix_acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return FromBoost(ec, "listen " + path);
  return Status::OK();
}

Status Server::Impl::BindTcp() {
  const std::string& listen = ctx.options.tcp_listen;
  std::string host;
  std::string port;
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon + 1 == listen.size()) {
    return Status::InvalidArgument("tcp_listen must be host:port, got \"" + listen + "\"");
  }
  host = listen.substr(0, colon);
  port = listen.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  uint16_t port_number = 0;
  if (auto [p, e] = std::from_chars(port.data(), port.data() + port.size(), port_number);
      e != std::errc() || p != port.data() + port.size()) {
    return Status::InvalidArgument("bad port in tcp_listen \"" + listen + "\"");
  }
  asio::ip::tcp::resolver resolver(shards[0]->ctx);
  boost::system::error_code ec;
  auto results = resolver.resolve(host, port, asio::ip::tcp::resolver::numeric_service, ec);
  if (ec || results.empty()) {
    return Status::InvalidArgument("cannot resolve tcp_listen \"" + listen + "\": " + ec.message());
  }
  const asio::ip::tcp::endpoint endpoint = results.begin()->endpoint();
  if (!endpoint.address().is_loopback()) {
    for (const NamespaceConfig& ns : ctx.namespaces) {
      if (ns.tokens.empty()) {
        return Status::InvalidArgument(
            "TCP listener on non-loopback " + endpoint.address().to_string() + " but namespace " +
            std::to_string(ns.id) + " (" + ns.name + ") has no token: every namespace needs one");
      }
    }
  }
  tcp_acceptor = std::make_unique<asio::ip::tcp::acceptor>(shards[0]->ctx);
  tcp_acceptor->open(endpoint.protocol(), ec);
  if (ec) return FromBoost(ec, "socket(TCP)");
  tcp_acceptor->set_option(asio::socket_base::reuse_address(true), ec);
  tcp_acceptor->bind(endpoint, ec);
  if (ec) return FromBoost(ec, "bind " + listen);
  tcp_acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return FromBoost(ec, "listen " + listen);
  tcp_port = tcp_acceptor->local_endpoint(ec).port();
  return Status::OK();
}

void Server::Impl::AcceptUnix() {
  IoShard& shard = NextShard();
  auto socket = std::make_shared<Connection::Socket>(shard.ctx);
  unix_acceptor->async_accept(*socket, [this, &shard, socket](const boost::system::error_code& ec) {
    if (ec == asio::error::operation_aborted || ctx.stopping.load()) return;
    if (ec) {
      Log().warn("kvtierd: accept on {}: {}", ctx.options.socket_path, ec.message());
      return RetryAccept(ec, &Impl::AcceptUnix);
    }
    OnAccepted(shard, socket, /*unix_socket=*/true);
    AcceptUnix();
  });
}

void Server::Impl::RetryAccept(const boost::system::error_code& ec, void (Impl::*accept)()) {
  const bool pause = ec == asio::error::no_descriptors || ec == asio::error::no_memory ||
                     ec == asio::error::no_buffer_space || ec.value() == ENFILE;
  if (!pause) return (this->*accept)();
  if (accept_backoff == nullptr)
    accept_backoff = std::make_unique<asio::steady_timer>(shards[0]->ctx);
  accept_backoff->expires_after(std::chrono::milliseconds(100));
  accept_backoff->async_wait([this, accept](const boost::system::error_code& e) {
    if (!e && !ctx.stopping.load()) (this->*accept)();
  });
}

void Server::Impl::AcceptTcp() {
  IoShard& shard = NextShard();
  auto socket = std::make_shared<Connection::Socket>(shard.ctx);
  tcp_acceptor->async_accept(*socket, [this, &shard, socket](const boost::system::error_code& ec) {
    if (ec == asio::error::operation_aborted || ctx.stopping.load()) return;
    if (ec) {
      Log().warn("kvtierd: accept on {}: {}", ctx.options.tcp_listen, ec.message());
      return RetryAccept(ec, &Impl::AcceptTcp);
    }
    OnAccepted(shard, socket, /*unix_socket=*/false);
    AcceptTcp();
  });
}

void Server::Impl::OnAccepted(IoShard& shard, std::shared_ptr<Connection::Socket> socket,
                              bool unix_socket) {
  PeerIdentity peer;
  peer.unix_socket = unix_socket;
  std::string name;
  const int fd = socket->native_handle();
  if (unix_socket) {
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      Log().warn("kvtierd: SO_PEERCRED: {}; dropping the connection", std::strerror(errno));
      return;  // the socket closes with its last reference
    }
    peer.uid = cred.uid;
    peer.gid = cred.gid;
    peer.pid = cred.pid;
    name = "pid " + std::to_string(cred.pid) + " uid " + std::to_string(cred.uid);
  } else {
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    char host[64] = "?";
    uint16_t port = 0;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
      if (addr.ss_family == AF_INET) {
        const auto* in = reinterpret_cast<const sockaddr_in*>(&addr);
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        port = ntohs(in->sin_port);
      } else if (addr.ss_family == AF_INET6) {
        const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&addr);
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        port = ntohs(in6->sin6_port);
      }
    }
    name = "tcp " + std::string(host) + ":" + std::to_string(port);
  }
  ctx.counters.connections_accepted++;
  ctx.counters.connections_open++;
  // The connection is made and started on its own shard's thread.
  asio::post(shard.ctx, [this, &shard, socket, peer, name = std::move(name)]() mutable {
    auto connection =
        std::make_shared<Connection>(ctx, shard, std::move(*socket), peer, std::move(name));
    connection->Start();
  });
}

void Server::Impl::Stop() {
  std::lock_guard<std::mutex> lock(stop_mu);
  if (stopped) return;
  stopped = true;
  ctx.stopping.store(true);
  if (!shards.empty()) {
    asio::post(shards[0]->ctx, [this] {
      boost::system::error_code ec;
      if (unix_acceptor != nullptr) unix_acceptor->close(ec);
      if (tcp_acceptor != nullptr) tcp_acceptor->close(ec);
      if (accept_backoff != nullptr) accept_backoff->cancel();
    });
    for (auto& shard : shards) {
      asio::post(shard->ctx, [s = shard.get()] {
        std::vector<std::shared_ptr<Connection>> open;
        for (auto& [id, c] : s->connections) open.push_back(c);
        for (auto& c : open) c->Close();
      });
    }
  }
  if (!threads.empty()) ctx.WaitForNoConnections();  // every request in flight completed
  guards.clear();
  for (std::thread& t : threads) t.join();
  threads.clear();
  if (workers != nullptr) workers->join();
  // Acceptors and sockets left behind (never started threads) go with the contexts.
  accept_backoff.reset();
  unix_acceptor.reset();
  tcp_acceptor.reset();
  if (socket_ino != 0) {
    struct stat st;
    if (lstat(ctx.options.socket_path.c_str(), &st) == 0 && st.st_ino == socket_ino &&
        st.st_dev == socket_dev) {
      unlink(ctx.options.socket_path.c_str());
    }
  }
  Log().info("kvtierd: server stopped");
}

Result<std::unique_ptr<Server>> Server::Start(EmbeddedStore* store, const ServerOptions& options) {
  if (store == nullptr) return Status::InvalidArgument("Server::Start needs a store");
  if (options.io_threads == 0 || options.worker_threads == 0) {
    return Status::InvalidArgument("io_threads and worker_threads must be at least 1");
  }
  if (options.max_in_flight == 0) return Status::InvalidArgument("max_in_flight must be >= 1");
  if (options.max_frame_bytes < 4096) {
    return Status::InvalidArgument("max_frame_bytes must be at least 4096");
  }
  if (options.max_buffered_reply_bytes < options.max_frame_bytes / 2) {
    // A single Get reply must fit, else every large inline Get cuts its own client.
    Log().warn("kvtierd: max_buffered_reply_bytes {} is under half max_frame_bytes {}",
               options.max_buffered_reply_bytes, options.max_frame_bytes);
  }
  for (size_t i = 0; i < options.namespaces.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (options.namespaces[i].id == options.namespaces[j].id) {
        return Status::InvalidArgument("namespace " + std::to_string(options.namespaces[i].id) +
                                       " is configured twice");
      }
    }
  }
  auto impl = std::make_unique<Impl>(store, options);
  for (uint32_t i = 0; i < options.io_threads; ++i) {
    impl->shards.push_back(std::make_unique<IoShard>());
  }
  KVTIER_RETURN_IF_ERROR(impl->BindUnix());
  if (!options.tcp_listen.empty()) {
    Status s = impl->BindTcp();
    if (!s.ok()) {
      impl->Stop();  // removes the socket file
      return s;
    }
  }
  impl->workers = std::make_unique<asio::thread_pool>(options.worker_threads);
  impl->ctx.workers = impl->workers.get();
  for (auto& shard : impl->shards) impl->guards.push_back(asio::make_work_guard(shard->ctx));
  impl->AcceptUnix();
  if (impl->tcp_acceptor != nullptr) impl->AcceptTcp();
  for (auto& shard : impl->shards) {
    impl->threads.emplace_back([s = shard.get()] { s->ctx.run(); });
  }
  Log().info("kvtierd: serving {} on {}{} ({} io threads, {} workers)", store->layout().ToString(),
             options.socket_path,
             options.tcp_listen.empty() ? "" : " and tcp " + options.tcp_listen, options.io_threads,
             options.worker_threads);
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() { Stop(); }

void Server::Stop() { impl_->Stop(); }

ServerStats Server::stats() const { return impl_->ctx.counters.Snapshot(impl_->ctx.namespaces); }

uint16_t Server::tcp_port() const { return impl_->tcp_port; }

}  // namespace kvtier::server
