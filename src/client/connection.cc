#include "src/client/connection.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>

#include "src/server/protocol/codec.h"
#include "src/server/protocol/kvtier_generated.h"
#include "src/util/fd.h"

namespace kvtier::client {
namespace {

using Clock = std::chrono::steady_clock;

Status Unavailable(const std::string& peer, std::string_view what, int errnum) {
  return Status::Unavailable("kvtierd at " + peer + ": " + std::string(what) + ": " +
                             std::strerror(errnum));
}

// Waits until `fd` is ready for `events`, in slices of at most 50 ms so that `cancel` is
// seen. POLLERR and POLLHUP count as ready: the next call on the socket reports them.
Status WaitReady(int fd, short events, Clock::time_point deadline, const std::atomic<bool>* cancel,
                 const std::string& peer, std::string_view what) {
  for (;;) {
    if (cancel != nullptr && cancel->load()) return Status::Cancelled("the store is closing");
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0)
      return Status::Unavailable("kvtierd at " + peer + ": " + std::string(what) + ": timed out");
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 50)));
    if (n < 0 && errno != EINTR) return Unavailable(peer, "poll", errno);
    if (n > 0) return Status::OK();
  }
}

// A non-blocking connect to `addr`, finished within the deadline. Returns the socket.
Result<int> ConnectTo(int family, const sockaddr* addr, socklen_t addr_len,
                      Clock::time_point deadline, const std::atomic<bool>* cancel,
                      const std::string& peer) {
  const int fd = ::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Unavailable(peer, "socket", errno);
  if (::connect(fd, addr, addr_len) != 0) {
    if (errno != EINPROGRESS && errno != EINTR) {
      const int e = errno;
      ::close(fd);
      return Unavailable(peer, "connect", e);
    }
    Status ready = WaitReady(fd, POLLOUT, deadline, cancel, peer, "connect");
    int err = 0;
    socklen_t len = sizeof(err);
    if (ready.ok() && ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (!ready.ok() || err != 0) {
      ::close(fd);
      return ready.ok() ? Unavailable(peer, "connect", err) : ready;
    }
  }
  return fd;
}

Result<int> ConnectUnix(const std::string& path, Clock::time_point deadline,
                        const std::atomic<bool>* cancel, const std::string& peer) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument("kvtierd socket path of " + std::to_string(path.size()) +
                                   " bytes; at most " + std::to_string(sizeof(addr.sun_path) - 1));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return ConnectTo(AF_UNIX, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr), deadline,
                   cancel, peer);
}

// "host:port" or "[v6-address]:port".
Result<int> ConnectTcp(const std::string& address, Clock::time_point deadline,
                       const std::atomic<bool>* cancel, const std::string& peer) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return Status::InvalidArgument("kvtierd TCP address \"" + address + "\" is not host:port");
  }
  std::string host = address.substr(0, colon);
  const std::string port = address.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0) {
    return Status::Unavailable("kvtierd at " + peer + ": cannot resolve: " + gai_strerror(rc));
  }
  Status last = Status::Unavailable("kvtierd at " + peer + ": no address");
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    Result<int> r = ConnectTo(a->ai_family, a->ai_addr, a->ai_addrlen, deadline, cancel, peer);
    if (r.ok()) {
      fd = *r;
    } else {
      last = r.status();
    }
  }
  ::freeaddrinfo(found);
  if (fd < 0) return last;
  const int one = 1;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

// Sends all of `bytes` on a non-blocking socket within the deadline.
Status SendAllNonBlocking(int fd, std::span<const uint8_t> bytes, Clock::time_point deadline,
                          const std::atomic<bool>* cancel, const std::string& peer) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      KVTIER_RETURN_IF_ERROR(WaitReady(fd, POLLOUT, deadline, cancel, peer, "handshake"));
    } else if (n < 0 && errno != EINTR) {
      return Unavailable(peer, "send", errno);
    }
  }
  return Status::OK();
}

// Receives exactly `out.size()` bytes with recvmsg, keeping the first file descriptor
// that arrives (SCM_RIGHTS) in *passed_fd (others are closed).
Status RecvAllWithFd(int fd, std::span<uint8_t> out, int* passed_fd, Clock::time_point deadline,
                     const std::atomic<bool>* cancel, const std::string& peer) {
  size_t done = 0;
  while (done < out.size()) {
    iovec iov{out.data() + done, out.size() - done};
    alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * 4)> control;
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    const ssize_t n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        KVTIER_RETURN_IF_ERROR(WaitReady(fd, POLLIN, deadline, cancel, peer, "handshake"));
        continue;
      }
      if (errno == EINTR) continue;
      return Unavailable(peer, "recvmsg", errno);
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int received;
        std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        if (*passed_fd < 0) {
          *passed_fd = received;
        } else {
          ::close(received);
        }
      }
    }
    if (n == 0) {
      return Status::Unavailable("kvtierd at " + peer +
                                 " closed the connection during the handshake");
    }
    done += static_cast<size_t>(n);
  }
  return Status::OK();
}

std::string ClientName() {
  std::string comm = "kvtier-client";
  if (FILE* f = std::fopen("/proc/self/comm", "r")) {
    char buf[64] = {};
    if (std::fgets(buf, sizeof(buf), f) != nullptr) {
      comm = buf;
      while (!comm.empty() && (comm.back() == '\n' || comm.back() == '\r')) comm.pop_back();
    }
    std::fclose(f);
  }
  return comm + "[" + std::to_string(::getpid()) + "]";
}

// Closes a file descriptor when it goes out of scope.
class FdCloser {
 public:
  explicit FdCloser(int* fd) : fd_(fd) {}
  ~FdCloser() {
    if (*fd_ >= 0) ::close(*fd_);
  }

 private:
  int* fd_;
};

}  // namespace

Result<std::shared_ptr<Connection>> Connection::Open(const SidecarOptions& options,
                                                     const ModelLayout& layout,
                                                     Clock::time_point deadline,
                                                     const std::atomic<bool>* cancel) {
  const bool unix_socket = !options.socket.empty();
  const std::string peer = unix_socket ? "unix:" + options.socket : "tcp:" + options.tcp_address;
  Result<int> fd = unix_socket ? ConnectUnix(options.socket, deadline, cancel, peer)
                               : ConnectTcp(options.tcp_address, deadline, cancel, peer);
  if (!fd.ok()) return fd.status();
  std::shared_ptr<Connection> c(new Connection(*fd, peer));
  KVTIER_RETURN_IF_ERROR(c->Handshake(options, layout, unix_socket, deadline, cancel));
  // From here on the socket blocks: a reader sleeps in recv, senders in send.
  const int flags = ::fcntl(c->fd_, F_GETFL);
  if (flags < 0 || ::fcntl(c->fd_, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    return Unavailable(peer, "fcntl", errno);
  }
  return c;
}

Status Connection::Handshake(const SidecarOptions& options, const ModelLayout& layout,
                             bool unix_socket, Clock::time_point deadline,
                             const std::atomic<bool>* cancel) {
  flatbuffers::FlatBufferBuilder fbb(512);
  auto layout_text = fbb.CreateString(layout.ToString());
  auto token = fbb.CreateString(options.token);
  auto name = fbb.CreateString(ClientName());
  fbb.Finish(wire::CreateHelloRequest(fbb, wire::kProtocolVersion, layout.Fingerprint(),
                                      layout_text, options.namespace_id, token,
                                      unix_socket ? options.staging_blocks : 0, name));
  const std::vector<uint8_t> frame = wire::MakeFrame(fbb, wire::Opcode::kHello, 0, false);
  KVTIER_RETURN_IF_ERROR(SendAllNonBlocking(fd_, frame, deadline, cancel, peer_));

  int memfd = -1;
  FdCloser close_memfd(&memfd);
  std::array<uint8_t, wire::kHeaderBytes> header_bytes;
  KVTIER_RETURN_IF_ERROR(RecvAllWithFd(fd_, header_bytes, &memfd, deadline, cancel, peer_));
  Result<wire::FrameHeader> header =
      wire::DecodeHeader(header_bytes, wire::kDefaultMaxFrameBytes, /*expect_reply=*/true);
  if (!header.ok()) return header.status().WithContext("kvtierd at " + peer_ + ": handshake");
  std::vector<uint8_t> body(header->body_bytes);
  KVTIER_RETURN_IF_ERROR(RecvAllWithFd(fd_, body, &memfd, deadline, cancel, peer_));
  KVTIER_RETURN_IF_ERROR(wire::VerifyReplyBody(header->opcode, body));
  if (header->opcode == static_cast<uint16_t>(wire::Opcode::kError)) {
    Status s = wire::FromWire(flatbuffers::GetRoot<wire::StatusReply>(body.data())->outcome());
    if (s.ok()) s = Status::Internal("an Error frame with an OK outcome");
    return s.WithContext("kvtierd at " + peer_ + " refused the handshake");
  }
  if (header->opcode != static_cast<uint16_t>(wire::Opcode::kHello)) {
    return Status::Unavailable("kvtierd at " + peer_ + ": answered the handshake with " +
                               std::string(wire::OpcodeName(header->opcode)));
  }
  const auto* reply = flatbuffers::GetRoot<wire::HelloReply>(body.data());
  Status outcome = wire::FromWire(reply->outcome());
  if (!outcome.ok()) return outcome.WithContext("kvtierd at " + peer_ + " refused the handshake");
  if (reply->daemon_version() != nullptr) daemon_version_ = reply->daemon_version()->str();
  if (reply->max_frame_bytes() != 0) max_frame_bytes_ = reply->max_frame_bytes();
  get_data_last_ = reply->get_data_last();
  if (reply->block_bytes() != layout.BytesPerBlock()) {
    return Status::FailedPrecondition(
        "kvtierd at " + peer_ + " serves blocks of " + std::to_string(reply->block_bytes()) +
        " bytes; this layout's are " + std::to_string(layout.BytesPerBlock()));
  }
  if (reply->staging_blocks() == 0) return Status::OK();  // block bytes travel inline
  if (memfd < 0) {
    return Status::Unavailable("kvtierd at " + peer_ + " granted " +
                               std::to_string(reply->staging_blocks()) +
                               " staging slots but passed no staging area");
  }
  if (reply->staging_slot_bytes() < layout.BytesPerBlock()) {
    return Status::Unavailable("kvtierd at " + peer_ + ": staging slots of " +
                               std::to_string(reply->staging_slot_bytes()) +
                               " bytes cannot hold a block");
  }
  const uint64_t map_bytes = uint64_t{reply->staging_blocks()} * reply->staging_slot_bytes();
  struct stat st {};
  if (::fstat(memfd, &st) != 0) return Unavailable(peer_, "fstat of the staging area", errno);
  if (static_cast<uint64_t>(st.st_size) < map_bytes) {
    return Status::Unavailable("kvtierd at " + peer_ + ": staging area of " +
                               std::to_string(st.st_size) + " bytes; " + std::to_string(map_bytes) +
                               " granted");
  }
  void* p = ::mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  if (p == MAP_FAILED) return Unavailable(peer_, "mmap of the staging area", errno);
  staging_ = static_cast<uint8_t*>(p);
  staging_map_bytes_ = map_bytes;
  staging_blocks_ = reply->staging_blocks();
  staging_slot_bytes_ = reply->staging_slot_bytes();
  return Status::OK();
}

Connection::~Connection() {
  if (staging_ != nullptr) ::munmap(staging_, staging_map_bytes_);
  ::close(fd_);
}

Status Connection::Send(wire::Opcode opcode, uint64_t request_id, std::span<const uint8_t> body,
                        int fd) {
  std::array<uint8_t, wire::kHeaderBytes> header;
  wire::EncodeHeader(wire::FrameHeader{.opcode = static_cast<uint16_t>(opcode),
                                       .body_bytes = static_cast<uint32_t>(body.size()),
                                       .request_id = request_id},
                     header);
  iovec iov[2] = {{header.data(), header.size()}, {const_cast<uint8_t*>(body.data()), body.size()}};
  size_t skip = 0;  // bytes already sent
  const size_t total = header.size() + body.size();
  MutexLock lock(&send_mu_);
  while (skip < total) {
    iovec rest[2];
    int count = 0;
    size_t offset = skip;
    for (const iovec& v : iov) {
      if (offset >= v.iov_len) {
        offset -= v.iov_len;
        continue;
      }
      rest[count++] = {static_cast<uint8_t*>(v.iov_base) + offset, v.iov_len - offset};
      offset = 0;
    }
    msghdr msg{};
    msg.msg_iov = rest;
    msg.msg_iovlen = count;
    FdControl control;
    if (fd >= 0 && skip == 0) AttachFd(&msg, &control, fd);
    const ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Unavailable(peer_, "send", errno);
    }
    skip += static_cast<size_t>(n);
  }
  return Status::OK();
}

namespace {

// Reads exactly `out.size()` bytes from a blocking socket.
Status RecvAll(int fd, std::span<uint8_t> out, const std::string& peer) {
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::recv(fd, out.data() + done, out.size() - done, 0);
    if (n == 0) return Status::Unavailable("kvtierd at " + peer + " closed the connection");
    if (n < 0) {
      if (errno == EINTR) continue;
      return Unavailable(peer, "recv", errno);
    }
    done += static_cast<size_t>(n);
  }
  return Status::OK();
}

// Receives exactly the bytes of iov[0..count) (consumed: the array is advanced in place).
Status RecvAllV(int fd, iovec* iov, size_t count, const std::string& peer) {
  while (count > 0) {
    if (iov->iov_len == 0) {
      ++iov;
      --count;
      continue;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(count, IOV_MAX);
    const ssize_t n = ::recvmsg(fd, &msg, 0);
    if (n == 0) return Status::Unavailable("kvtierd at " + peer + " closed the connection");
    if (n < 0) {
      if (errno == EINTR) continue;
      return Unavailable(peer, "recvmsg", errno);
    }
    for (size_t left = static_cast<size_t>(n); left > 0;) {
      const size_t step = std::min(left, iov->iov_len);
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + step;
      iov->iov_len -= step;
      left -= step;
      if (iov->iov_len == 0) {
        ++iov;
        --count;
      }
    }
  }
  return Status::OK();
}

}  // namespace

Status Connection::ReadFrame(wire::FrameHeader* header, std::vector<uint8_t>* body) {
  KVTIER_ASSIGN_OR_RETURN(*header, ReadHeader());
  return ReadBody(*header, body, {});
}

Result<wire::FrameHeader> Connection::ReadHeader() {
  std::array<uint8_t, wire::kHeaderBytes> bytes;
  KVTIER_RETURN_IF_ERROR(RecvAll(fd_, bytes, peer_));
  return wire::DecodeHeader(bytes, std::max(max_frame_bytes_, wire::kDefaultMaxFrameBytes),
                            /*expect_reply=*/true);
}

Status Connection::ReadBody(const wire::FrameHeader& header, std::vector<uint8_t>* body,
                            std::span<const iovec> tail) {
  body->resize(header.body_bytes);
  if (tail.empty()) return RecvAll(fd_, *body, peer_);
  std::vector<iovec> iov;
  iov.reserve(tail.size() + 1);
  iov.push_back(iovec{body->data(), 0});
  uint64_t tail_bytes = 0;
  for (const iovec& v : tail) {
    iov.push_back(v);
    tail_bytes += v.iov_len;
  }
  if (tail_bytes > body->size()) {
    return Status::Internal("a reply tail of " + std::to_string(tail_bytes) +
                            " bytes in a body of " + std::to_string(body->size()));
  }
  iov[0].iov_len = body->size() - tail_bytes;
  return RecvAllV(fd_, iov.data(), iov.size(), peer_);
}

void Connection::Shutdown() { ::shutdown(fd_, SHUT_RDWR); }

}  // namespace kvtier::client
