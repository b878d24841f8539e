// The Server end to end through raw sockets: a test client built from the protocol files
// (frame.h, codec.h, kvtier.fbs) speaks to a Server running in this process over a
// store the test owns. Handshake, block transfers through the staging area and inline,
// every other request, pipelining, malformed frames, slow readers, disconnects with
// requests in flight, namespace isolation and the listener's checks.
#include "src/server/server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "src/server/protocol/codec.h"

namespace kvtier::server {
namespace {

using wire::Opcode;

// 2 layers, 2 KV heads, 4 query heads, head dim 64, f16, 16-token blocks: 8 KiB blocks.
ModelLayout TestLayout() {
  return ModelLayout{.num_layers = 2,
                     .num_kv_heads = 2,
                     .num_query_heads = 4,
                     .head_dim = 64,
                     .dtype = DType::kF16,
                     .block_tokens = 16};
}

BlockKey Key(uint64_t sequence, uint32_t layer, uint32_t block, uint32_t ns = 0) {
  return BlockKey{.namespace_id = ns, .sequence = {7, sequence}, .layer = layer, .block = block};
}

std::vector<uint8_t> RandomBlock(uint64_t bytes, uint64_t seed) {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 1);
  std::vector<uint8_t> v(bytes);
  for (size_t i = 0; i < bytes; i += 8) {
    const uint64_t w = rng() | 0x0101010101010101ull;  // no zero byte
    std::memcpy(v.data() + i, &w, std::min<size_t>(8, bytes - i));
  }
  return v;
}

NamespaceConfig Ns(uint32_t id, std::vector<uint32_t> uids, std::vector<uint32_t> gids = {},
                   std::vector<std::string> tokens = {}) {
  NamespaceConfig ns;
  ns.id = id;
  ns.name = "ns" + std::to_string(id);
  ns.uids = std::move(uids);
  ns.gids = std::move(gids);
  ns.tokens = std::move(tokens);
  return ns;
}

ServerOptions OptionsAt(const std::string& socket_path) {
  ServerOptions o;
  o.socket_path = socket_path;
  return o;
}

StoreOptions SmallStoreOptions() {
  StoreOptions o;
  o.host_capacity_bytes = 64 * 8192;
  o.host_memory = HostMemoryKind::kPlain;
  return o;
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvtsrv-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string Socket() const { return path_ + "/kvtierd.sock"; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct Reply {
  wire::FrameHeader header;
  std::vector<uint8_t> body;
  template <typename T>
  const T* As() const {
    flatbuffers::Verifier v(body.data(), body.size());
    if (!v.VerifyBuffer<T>(nullptr)) return nullptr;
    return flatbuffers::GetRoot<T>(body.data());
  }
  Status ErrorStatus() const {
    const auto* r = As<wire::StatusReply>();
    return r == nullptr ? Status::Internal("not a StatusReply") : wire::FromWire(r->outcome());
  }
};

// A blocking client over a raw socket; every read has a deadline so that no test hangs.
class TestClient {
 public:
  static std::unique_ptr<TestClient> Unix(const std::string& path) {
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ADD_FAILURE() << "connect " << path << ": " << std::strerror(errno);
      ::close(fd);
      return nullptr;
    }
    return std::unique_ptr<TestClient>(new TestClient(fd));
  }
  static std::unique_ptr<TestClient> Tcp(uint16_t port) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ADD_FAILURE() << "connect tcp " << port << ": " << std::strerror(errno);
      ::close(fd);
      return nullptr;
    }
    return std::unique_ptr<TestClient>(new TestClient(fd));
  }
  ~TestClient() {
    if (staging_ != nullptr) munmap(staging_, staging_bytes_);
    if (staging_fd_ >= 0) ::close(staging_fd_);
    if (fd_ >= 0) ::close(fd_);
  }

  int fd() const { return fd_; }
  void CloseSocket() {
    ::close(fd_);
    fd_ = -1;
  }

  bool SendRaw(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
      const ssize_t w = ::send(fd_, p, n, MSG_NOSIGNAL);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return false;
      p += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }
  bool Send(flatbuffers::FlatBufferBuilder& fbb, Opcode op, uint64_t id) {
    const std::vector<uint8_t> frame = wire::MakeFrame(fbb, op, id, /*reply=*/false);
    return SendRaw(frame.data(), frame.size());
  }

  // The next frame, or nullopt at end of stream, on error, or after `timeout_ms`.
  std::optional<Reply> Read(int timeout_ms = 10000) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (true) {
      if (buffer_.size() >= wire::kHeaderBytes) {
        auto h = wire::DecodeHeader(
            std::span<const uint8_t, wire::kHeaderBytes>(buffer_.data(), wire::kHeaderBytes),
            1u << 30, /*expect_reply=*/true);
        if (!h.ok()) {
          ADD_FAILURE() << "bad reply header: " << h.status().ToString();
          return std::nullopt;
        }
        if (buffer_.size() >= wire::kHeaderBytes + h->body_bytes) {
          Reply r{*h, std::vector<uint8_t>(buffer_.begin() + wire::kHeaderBytes,
                                           buffer_.begin() + wire::kHeaderBytes + h->body_bytes)};
          buffer_.erase(buffer_.begin(), buffer_.begin() + wire::kHeaderBytes + h->body_bytes);
          EXPECT_EQ(h->body_bytes % 8, 0u) << "reply bodies are padded to 8 bytes";
          if (Status s = wire::VerifyReplyBody(h->opcode, r.body); !s.ok()) {
            ADD_FAILURE() << "reply body of opcode " << h->opcode << ": " << s.ToString();
          }
          return r;
        }
      }
      const int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                            deadline - std::chrono::steady_clock::now())
                                            .count());
      if (left <= 0) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, left) <= 0) continue;
      uint8_t chunk[65536];
      iovec iov{chunk, sizeof(chunk)};
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      const ssize_t n = recvmsg(fd_, &msg, MSG_CMSG_CLOEXEC);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return std::nullopt;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
          received_fds_.push_back(fd);
        }
      }
      buffer_.insert(buffer_.end(), chunk, chunk + n);
    }
  }

  // True when the daemon closed the connection (end of stream or reset) within the time.
  bool ClosedByPeer(int timeout_ms = 10000) {
    while (true) {
      std::optional<Reply> r = Read(timeout_ms);
      if (!r.has_value()) break;  // frames before the close are fine
    }
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, 0) < 0) return false;
    uint8_t byte;
    const ssize_t n = ::recv(fd_, &byte, 1, MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno == ECONNRESET);
  }

  // Hello; on success maps the staging area that came with the reply.
  Status Hello(const ModelLayout& layout, uint32_t ns, uint32_t staging_blocks,
               const std::string& token = "", uint64_t id = 1) {
    flatbuffers::FlatBufferBuilder fbb;
    fbb.Finish(wire::CreateHelloRequestDirect(fbb, wire::kProtocolVersion, layout.Fingerprint(),
                                              layout.ToString().c_str(), ns, token.c_str(),
                                              staging_blocks, "server_test"));
    if (!Send(fbb, Opcode::kHello, id)) return Status::IOError("send Hello");
    std::optional<Reply> r = Read();
    if (!r) return Status::IOError("no HelloReply");
    EXPECT_EQ(r->header.opcode, static_cast<uint16_t>(Opcode::kHello));
    EXPECT_EQ(r->header.request_id, id);
    const auto* hello = r->As<wire::HelloReply>();
    if (hello == nullptr) return r->ErrorStatus();
    hello_block_bytes_ = hello->block_bytes();
    max_frame_bytes_ = hello->max_frame_bytes();
    Status s = wire::FromWire(hello->outcome());
    if (!s.ok()) return s;
    staging_slots_ = hello->staging_blocks();
    slot_bytes_ = hello->staging_slot_bytes();
    if (staging_slots_ > 0) {
      EXPECT_EQ(received_fds_.size(), 1u);
      if (received_fds_.empty()) return Status::Internal("no staging fd");
      staging_fd_ = received_fds_.back();
      received_fds_.clear();
      staging_bytes_ = uint64_t{staging_slots_} * slot_bytes_;
      void* p = mmap(nullptr, staging_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, staging_fd_, 0);
      if (p == MAP_FAILED) return Status::FromErrno(errno, "mmap staging");
      staging_ = static_cast<uint8_t*>(p);
    } else {
      EXPECT_TRUE(received_fds_.empty());
    }
    return Status::OK();
  }

  uint8_t* slot(uint32_t i) { return staging_ + uint64_t{i} * slot_bytes_; }
  uint32_t staging_slots() const { return staging_slots_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  int staging_fd() const { return staging_fd_; }
  uint32_t max_frame_bytes() const { return max_frame_bytes_; }
  uint64_t hello_block_bytes() const { return hello_block_bytes_; }

  // --- Requests (send only; the caller reads) ---
  bool SendPut(uint64_t id, const std::vector<BlockKey>& keys, const std::vector<uint32_t>& slots,
               const std::vector<uint8_t>& data = {}) {
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<wire::Key> k;
    for (const BlockKey& key : keys) k.push_back(wire::ToWire(key));
    fbb.Finish(wire::CreatePutRequestDirect(fbb, &k, slots.empty() ? nullptr : &slots,
                                            data.empty() ? nullptr : &data));
    return Send(fbb, Opcode::kPut, id);
  }
  bool SendGet(uint64_t id, const std::vector<BlockKey>& keys, const std::vector<uint32_t>& slots) {
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<wire::Key> k;
    for (const BlockKey& key : keys) k.push_back(wire::ToWire(key));
    fbb.Finish(wire::CreateGetRequestDirect(fbb, &k, slots.empty() ? nullptr : &slots));
    return Send(fbb, Opcode::kGet, id);
  }
  bool SendKeys(Opcode op, uint64_t id, const std::vector<BlockKey>& keys) {
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<wire::Key> k;
    for (const BlockKey& key : keys) k.push_back(wire::ToWire(key));
    fbb.Finish(wire::CreateKeysRequestDirect(fbb, &k));
    return Send(fbb, op, id);
  }
  bool SendEmpty(Opcode op, uint64_t id) {
    flatbuffers::FlatBufferBuilder fbb;
    wire::EmptyBuilder b(fbb);
    fbb.Finish(b.Finish());
    return Send(fbb, op, id);
  }

  // A reply for `id` of `opcode` (failing the test on anything else).
  std::optional<Reply> Expect(uint64_t id, Opcode op) {
    std::optional<Reply> r = Read();
    EXPECT_TRUE(r.has_value()) << "no reply to " << id;
    if (!r) return r;
    EXPECT_EQ(r->header.request_id, id);
    EXPECT_EQ(r->header.opcode, static_cast<uint16_t>(op))
        << (r->header.opcode == 0 ? r->ErrorStatus().ToString() : "");
    EXPECT_EQ(r->header.flags, wire::kFlagReply);
    return r;
  }

  // Put / Get round trips: the batch's members' outcomes.
  std::vector<Status> Members(const Reply& r, size_t n, Status* outcome) {
    const auto* b = r.As<wire::BatchReply>();
    std::vector<Status> out(n);
    if (b == nullptr) {
      *outcome = Status::Internal("not a BatchReply");
      return out;
    }
    *outcome = wire::FromWire(b->outcome());
    if (b->members() != nullptr) {
      EXPECT_EQ(b->members()->size(), n);
      for (size_t i = 0; i < n && i < b->members()->size(); ++i) {
        out[i] = wire::FromWire(b->members()->Get(i));
      }
    }
    return out;
  }
  Status Put(uint64_t id, const std::vector<BlockKey>& keys, const std::vector<uint32_t>& slots,
             const std::vector<uint8_t>& data = {}, std::vector<Status>* members = nullptr) {
    if (!SendPut(id, keys, slots, data)) return Status::IOError("send");
    std::optional<Reply> r = Expect(id, Opcode::kPut);
    if (!r) return Status::IOError("no reply");
    Status outcome;
    std::vector<Status> m = Members(*r, keys.size(), &outcome);
    if (members != nullptr) *members = m;
    return outcome;
  }
  Status Get(uint64_t id, const std::vector<BlockKey>& keys, const std::vector<uint32_t>& slots,
             std::vector<Status>* members = nullptr, std::vector<uint8_t>* data = nullptr) {
    if (!SendGet(id, keys, slots)) return Status::IOError("send");
    return ReadGet(id, keys.size(), members, data);
  }
  // The reply to Get `id` of `n` keys, sent before.
  Status ReadGet(uint64_t id, size_t n, std::vector<Status>* members = nullptr,
                 std::vector<uint8_t>* data = nullptr) {
    std::optional<Reply> r = Expect(id, Opcode::kGet);
    if (!r) return Status::IOError("no reply");
    Status outcome;
    std::vector<Status> m = Members(*r, n, &outcome);
    if (members != nullptr) *members = m;
    const auto* b = r->As<wire::BatchReply>();
    if (data != nullptr && b != nullptr && b->data() != nullptr) {
      data->assign(b->data()->begin(), b->data()->end());
    }
    return outcome;
  }
  std::vector<bool> Contains(uint64_t id, const std::vector<BlockKey>& keys, Status* outcome) {
    std::vector<bool> out;
    if (!SendKeys(Opcode::kContains, id, keys)) return out;
    std::optional<Reply> r = Expect(id, Opcode::kContains);
    const auto* c = r ? r->As<wire::ContainsReply>() : nullptr;
    if (c == nullptr) return out;
    *outcome = wire::FromWire(c->outcome());
    if (c->present() != nullptr) {
      for (auto p : *c->present()) out.push_back(p != 0);
    }
    return out;
  }
  const wire::Stats* Stats(uint64_t id, Reply* storage) {
    if (!SendEmpty(Opcode::kStats, id)) return nullptr;
    std::optional<Reply> r = Expect(id, Opcode::kStats);
    if (!r) return nullptr;
    *storage = std::move(*r);
    const auto* s = storage->As<wire::StatsReply>();
    if (s == nullptr) return nullptr;
    EXPECT_TRUE(wire::FromWire(s->outcome()).ok());
    return s->stats();
  }

 private:
  explicit TestClient(int fd) : fd_(fd) {}
  int fd_;
  std::vector<uint8_t> buffer_;
  std::vector<int> received_fds_;
  int staging_fd_ = -1;
  uint8_t* staging_ = nullptr;
  uint64_t staging_bytes_ = 0;
  uint32_t staging_slots_ = 0;
  uint64_t slot_bytes_ = 0;
  uint32_t max_frame_bytes_ = 0;
  uint64_t hello_block_bytes_ = 0;
};

// Waits (with a deadline) for a condition the server reaches asynchronously, such as a
// counter after a disconnect: there is no event to wait on from outside the server.
template <typename Pred>
bool Eventually(Pred pred, int timeout_ms = 10000) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

class ServerTest : public ::testing::Test {
 protected:
  void StartServer(ServerOptions options = {}, StoreOptions store_options = {},
                   ModelLayout layout = TestLayout()) {
    if (store_options.host_capacity_bytes == StoreOptions{}.host_capacity_bytes) {
      store_options.host_capacity_bytes = 512 * 8192;
    }
    store_options.host_memory = HostMemoryKind::kPlain;
    auto store = EmbeddedStore::Open(store_options, layout);
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    store_ = std::move(store).value();
    options.socket_path = dir_.Socket();
    auto server = Server::Start(store_.get(), options);
    ASSERT_TRUE(server.ok()) << server.status().ToString();
    server_ = std::move(server).value();
  }
  void TearDown() override {
    server_.reset();
    store_.reset();
  }
  std::unique_ptr<TestClient> Connect() { return TestClient::Unix(dir_.Socket()); }
  // A client past its handshake in namespace `ns`, with `slots` staging slots.
  std::unique_ptr<TestClient> Session(uint32_t ns = 0, uint32_t slots = 16,
                                      const std::string& token = "") {
    auto c = Connect();
    if (c == nullptr) return nullptr;
    Status s = c->Hello(store_->layout(), ns, slots, token);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return s.ok() ? std::move(c) : nullptr;
  }
  uint64_t block_bytes() const { return store_->block_bytes(); }

  TempDir dir_;
  std::unique_ptr<EmbeddedStore> store_;
  std::unique_ptr<Server> server_;
};

// --- Handshake -------------------------------------------------------------------------

TEST_F(ServerTest, HelloGrantsASealedStagingArea) {
  ServerOptions o;
  o.max_staging_blocks = 8;
  StartServer(o);
  auto c = Session(0, 100);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->staging_slots(), 8u);  // capped by max_staging_blocks
  EXPECT_EQ(c->slot_bytes(), (block_bytes() + 4095) / 4096 * 4096);
  EXPECT_EQ(c->hello_block_bytes(), block_bytes());
  EXPECT_EQ(c->max_frame_bytes(), o.max_frame_bytes);
  struct stat st;
  ASSERT_EQ(fstat(c->staging_fd(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 8 * c->slot_bytes());
  const int seals = fcntl(c->staging_fd(), F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
            F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  // The client cannot shrink it under the daemon's mapping.
  EXPECT_NE(ftruncate(c->staging_fd(), 4096), 0);
  EXPECT_EQ(server_->stats().staging_bytes_mapped, 8 * c->slot_bytes());
  EXPECT_EQ(server_->stats().connections_open, 1u);
  c.reset();
  EXPECT_TRUE(Eventually([&] { return server_->stats().staging_bytes_mapped == 0; }));
  EXPECT_TRUE(Eventually([&] { return server_->stats().connections_open == 0; }));
}

TEST_F(ServerTest, HelloWithoutStagingGetsNoDescriptor) {
  StartServer();
  auto c = Session(0, 0);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->staging_slots(), 0u);
  EXPECT_EQ(c->staging_fd(), -1);
}

TEST_F(ServerTest, LayoutMismatchIsRefusedNamingBothLayouts) {
  StartServer();
  auto c = Connect();
  ASSERT_NE(c, nullptr);
  ModelLayout other = TestLayout();
  other.num_layers = 3;
  const Status s = c->Hello(other, 0, 4);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find(other.ToString()), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(TestLayout().ToString()), std::string::npos) << s.message();
  EXPECT_TRUE(c->ClosedByPeer());
  EXPECT_EQ(server_->stats().handshakes_refused, 1u);
}

TEST_F(ServerTest, NamespaceNotAllowedForThisUidIsRefused) {
  ServerOptions o;
  o.namespaces = {Ns(1, {geteuid() + 1})};
  StartServer(o);
  auto c = Connect();
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->Hello(TestLayout(), 1, 4).code(), StatusCode::kPermissionDenied);
  EXPECT_TRUE(c->ClosedByPeer());
  // A namespace that is not configured at all.
  auto d = Connect();
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->Hello(TestLayout(), 5, 4).code(), StatusCode::kPermissionDenied);
  EXPECT_TRUE(d->ClosedByPeer());
}

TEST_F(ServerTest, TokensAndGroupsAdmit) {
  ServerOptions o;
  o.namespaces = {Ns(1, {}, {}, {"s3cret"}), Ns(2, {}, {getegid()})};
  StartServer(o);
  auto bad = Connect();
  ASSERT_NE(bad, nullptr);
  EXPECT_EQ(bad->Hello(TestLayout(), 1, 4, "wrong").code(), StatusCode::kPermissionDenied);
  EXPECT_TRUE(bad->ClosedByPeer());
  EXPECT_NE(Session(1, 4, "s3cret"), nullptr);
  EXPECT_NE(Session(2, 4), nullptr);
  EXPECT_EQ(server_->stats().handshakes_refused, 1u);
}

TEST_F(ServerTest, RequestBeforeHelloIsRefusedAndClosed) {
  StartServer();
  auto c = Connect();
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(c->SendEmpty(Opcode::kStats, 77));
  std::optional<Reply> r = c->Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->header.opcode, static_cast<uint16_t>(Opcode::kError));
  EXPECT_EQ(r->header.request_id, 77u);
  EXPECT_EQ(r->ErrorStatus().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(c->ClosedByPeer());
}

TEST_F(ServerTest, SecondHelloIsAnErrorAndTheSessionGoesOn) {
  StartServer();
  auto c = Session();
  ASSERT_NE(c, nullptr);
  flatbuffers::FlatBufferBuilder fbb;
  fbb.Finish(wire::CreateHelloRequestDirect(fbb, wire::kProtocolVersion, TestLayout().Fingerprint(),
                                            "", 0, "", 4, "again"));
  ASSERT_TRUE(c->Send(fbb, Opcode::kHello, 5));
  std::optional<Reply> r = c->Read();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->header.request_id, 5u);
  EXPECT_EQ(r->header.opcode, static_cast<uint16_t>(Opcode::kError));
  EXPECT_EQ(r->ErrorStatus().code(), StatusCode::kFailedPrecondition);
  Reply storage;
  EXPECT_NE(c->Stats(6, &storage), nullptr);
}

// --- Block transfers -------------------------------------------------------------------

TEST_F(ServerTest, PutAndGetThroughTheStagingAreaAreByteExact) {
  StartServer();
  auto c = Session(0, 16);
  ASSERT_NE(c, nullptr);
  const uint32_t n = 8;
  std::vector<BlockKey> keys;
  std::vector<uint32_t> put_slots;
  std::vector<std::vector<uint8_t>> blocks;
  for (uint32_t i = 0; i < n; ++i) {
    keys.push_back(Key(1, i % 2, i));
    blocks.push_back(RandomBlock(block_bytes(), 100 + i));
    put_slots.push_back(i);
    std::memcpy(c->slot(i), blocks[i].data(), block_bytes());
  }
  ASSERT_TRUE(c->Put(1, keys, put_slots).ok());
  // The store holds exactly those bytes.
  for (uint32_t i = 0; i < n; ++i) {
    std::vector<uint8_t> got(block_bytes());
    ASSERT_TRUE(store_->Get(keys[i], got.data(), got.size()).ok());
    EXPECT_EQ(got, blocks[i]) << i;
  }
  // Get into other slots (reversed), after scribbling over them.
  std::vector<uint32_t> get_slots;
  for (uint32_t i = 0; i < n; ++i) {
    get_slots.push_back(15 - i);
    std::memset(c->slot(15 - i), 0xAB, block_bytes());
  }
  std::vector<Status> members;
  ASSERT_TRUE(c->Get(2, keys, get_slots, &members).ok());
  for (uint32_t i = 0; i < n; ++i) {
    EXPECT_EQ(std::memcmp(c->slot(15 - i), blocks[i].data(), block_bytes()), 0) << i;
  }
  // A missing key: that member NotFound, the others served.
  std::vector<BlockKey> mixed = {keys[0], Key(99, 0, 0), keys[1]};
  Status s = c->Get(3, mixed, {0, 1, 2}, &members);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  ASSERT_EQ(members.size(), 3u);
  EXPECT_TRUE(members[0].ok());
  EXPECT_EQ(members[1].code(), StatusCode::kNotFound);
  EXPECT_TRUE(members[2].ok());
  EXPECT_EQ(std::memcmp(c->slot(2), blocks[1].data(), block_bytes()), 0);
  EXPECT_EQ(server_->stats().staging_slots_in_use, 0u);
  EXPECT_GE(server_->stats().latency[static_cast<size_t>(Opcode::kPut)].count, 1u);
  EXPECT_GE(server_->stats().latency[static_cast<size_t>(Opcode::kGet)].count, 2u);
}

TEST_F(ServerTest, InlineBytesWithoutStaging) {
  StartServer();
  auto c = Session(0, 0);
  ASSERT_NE(c, nullptr);
  std::vector<BlockKey> keys = {Key(2, 0, 0), Key(2, 0, 1), Key(2, 1, 0)};
  std::vector<uint8_t> data;
  for (size_t i = 0; i < keys.size(); ++i) {
    const auto b = RandomBlock(block_bytes(), 300 + i);
    data.insert(data.end(), b.begin(), b.end());
  }
  ASSERT_TRUE(c->Put(1, keys, {}, data).ok());
  std::vector<uint8_t> got;
  std::vector<BlockKey> get_keys = {keys[2], Key(2, 1, 9), keys[0]};
  std::vector<Status> members;
  EXPECT_EQ(c->Get(2, get_keys, {}, &members, &got).code(), StatusCode::kNotFound);
  ASSERT_EQ(got.size(), 3 * block_bytes());
  EXPECT_EQ(std::memcmp(got.data(), data.data() + 2 * block_bytes(), block_bytes()), 0);
  EXPECT_EQ(std::vector<uint8_t>(got.begin() + block_bytes(), got.begin() + 2 * block_bytes()),
            std::vector<uint8_t>(block_bytes(), 0));  // zeros for the failed member
  EXPECT_EQ(std::memcmp(got.data() + 2 * block_bytes(), data.data(), block_bytes()), 0);
}

TEST_F(ServerTest, ContainsDeleteDropSequenceStatsFlush) {
  StartServer();
  auto c = Session(0, 4);
  ASSERT_NE(c, nullptr);
  std::vector<BlockKey> keys = {Key(5, 0, 0), Key(5, 1, 0), Key(5, 0, 1), Key(6, 0, 0)};
  for (uint32_t i = 0; i < keys.size(); ++i) {
    const auto b = RandomBlock(block_bytes(), 500 + i);
    std::memcpy(c->slot(0), b.data(), b.size());
    ASSERT_TRUE(c->Put(10 + i, {keys[i]}, {0}).ok());
  }
  Status outcome;
  EXPECT_EQ(c->Contains(20, {keys[0], Key(5, 0, 7), keys[3]}, &outcome),
            (std::vector<bool>{true, false, true}));
  EXPECT_TRUE(outcome.ok());

  ASSERT_TRUE(c->SendKeys(Opcode::kDelete, 21, {keys[3], keys[3]}));
  std::optional<Reply> r = c->Expect(21, Opcode::kDelete);
  ASSERT_TRUE(r.has_value());
  std::vector<Status> members = c->Members(*r, 2, &outcome);
  EXPECT_EQ(outcome.code(), StatusCode::kNotFound);  // the second delete finds nothing
  EXPECT_TRUE(members[0].ok());
  EXPECT_EQ(members[1].code(), StatusCode::kNotFound);
  EXPECT_FALSE(store_->Contains(keys[3]));

  flatbuffers::FlatBufferBuilder fbb;
  fbb.Finish(wire::CreateDropSequenceRequest(fbb, 0, 7, 5));
  ASSERT_TRUE(c->Send(fbb, Opcode::kDropSequence, 22));
  r = c->Expect(22, Opcode::kDropSequence);
  ASSERT_TRUE(r.has_value());
  const auto* count = r->As<wire::CountReply>();
  ASSERT_NE(count, nullptr);
  EXPECT_TRUE(wire::FromWire(count->outcome()).ok());
  EXPECT_EQ(count->count(), 3u);
  EXPECT_FALSE(store_->Contains(keys[0]));

  ASSERT_TRUE(c->SendEmpty(Opcode::kFlush, 23));
  r = c->Expect(23, Opcode::kFlush);
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->ErrorStatus().ok());

  Reply storage;
  const wire::Stats* stats = c->Stats(24, &storage);
  ASSERT_NE(stats, nullptr);
  EXPECT_EQ(stats->block_bytes(), block_bytes());
  EXPECT_EQ(stats->puts(), 4u);
  EXPECT_EQ(stats->deletes(), 1u);
  EXPECT_EQ(stats->dropped_blocks(), 3u);
  EXPECT_EQ(stats->connected_clients(), 1u);
  EXPECT_EQ(stats->namespace_blocks(), 0u);
  EXPECT_EQ(stats->host_blocks(), 0u);
}

TEST_F(ServerTest, WholeRequestErrorsAreReportedAndTheConnectionStays) {
  StartServer();
  auto c = Session(0, 4);
  ASSERT_NE(c, nullptr);
  const std::vector<BlockKey> two = {Key(1, 0, 0), Key(1, 0, 1)};
  auto code = [](Status s) { return s.code(); };
  // Slot count differs from the key count.
  EXPECT_EQ(code(c->Put(1, two, {0})), StatusCode::kInvalidArgument);
  // Slot out of range.
  EXPECT_EQ(code(c->Put(2, two, {0, 4})), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(c->Get(3, two, {0, 1u << 31})), StatusCode::kInvalidArgument);
  // The same slot twice in one Get.
  EXPECT_EQ(code(c->Get(4, two, {3, 3})), StatusCode::kInvalidArgument);
  // Inline data of the wrong length; both slots and data.
  EXPECT_EQ(code(c->Put(5, two, {}, std::vector<uint8_t>(block_bytes() + 1, 1))),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code(c->Put(6, two, {0, 1}, std::vector<uint8_t>(2 * block_bytes(), 1))),
            StatusCode::kInvalidArgument);
  // Nothing was stored by any of them.
  EXPECT_FALSE(store_->Contains(two[0]));
  EXPECT_FALSE(store_->Contains(two[1]));
  // An empty batch is fine.
  EXPECT_TRUE(c->Put(7, {}, {}).ok());
  // And the connection still serves.
  std::memcpy(c->slot(0), RandomBlock(block_bytes(), 1).data(), block_bytes());
  std::memcpy(c->slot(1), RandomBlock(block_bytes(), 2).data(), block_bytes());
  EXPECT_TRUE(c->Put(8, two, {0, 1}).ok());
  EXPECT_TRUE(c->Get(9, two, {2, 3}).ok());
  EXPECT_EQ(std::memcmp(c->slot(2), c->slot(0), block_bytes()), 0);
}

// --- Pipelining ------------------------------------------------------------------------

TEST_F(ServerTest, PipelinedRequestsAreAllAnsweredAndMatchedById) {
  ServerOptions o;
  o.max_in_flight = 3;  // fewer than the requests sent: the server must pause reading
  StartServer(o);
  auto c = Session(0, 64);
  ASSERT_NE(c, nullptr);
  const uint32_t n = 32;
  std::vector<std::vector<uint8_t>> blocks;
  for (uint32_t i = 0; i < n; ++i) {
    blocks.push_back(RandomBlock(block_bytes(), 700 + i));
    std::memcpy(c->slot(i), blocks[i].data(), block_bytes());
  }
  // Puts, Flushes (worker pool) and Stats (inline) interleaved, all sent before reading.
  std::map<uint64_t, Opcode> sent;
  for (uint32_t i = 0; i < n; ++i) {
    ASSERT_TRUE(c->SendPut(1000 + i, {Key(9, 0, i)}, {i}));
    sent[1000 + i] = Opcode::kPut;
    if (i % 4 == 0) {
      ASSERT_TRUE(c->SendEmpty(Opcode::kFlush, 2000 + i));
      sent[2000 + i] = Opcode::kFlush;
      ASSERT_TRUE(c->SendEmpty(Opcode::kStats, 3000 + i));
      sent[3000 + i] = Opcode::kStats;
    }
  }
  std::set<uint64_t> answered;
  for (size_t k = 0; k < sent.size(); ++k) {
    std::optional<Reply> r = c->Read();
    ASSERT_TRUE(r.has_value()) << "after " << k << " replies";
    const uint64_t id = r->header.request_id;
    ASSERT_TRUE(sent.count(id)) << id;
    EXPECT_EQ(r->header.opcode, static_cast<uint16_t>(sent[id]));
    EXPECT_TRUE(answered.insert(id).second) << "answered twice: " << id;
    if (sent[id] == Opcode::kPut) {
      Status outcome;
      c->Members(*r, 1, &outcome);
      EXPECT_TRUE(outcome.ok()) << outcome.ToString();
    }
  }
  // Then pipelined Gets into distinct slots, byte-exact.
  for (uint32_t i = 0; i < n; ++i) ASSERT_TRUE(c->SendGet(5000 + i, {Key(9, 0, i)}, {32 + i}));
  std::set<uint64_t> got;
  for (uint32_t k = 0; k < n; ++k) {
    std::optional<Reply> r = c->Read();
    ASSERT_TRUE(r.has_value());
    const uint64_t i = r->header.request_id - 5000;
    ASSERT_LT(i, n);
    EXPECT_TRUE(got.insert(i).second);
    EXPECT_EQ(std::memcmp(c->slot(32 + static_cast<uint32_t>(i)), blocks[i].data(), block_bytes()),
              0);
  }
}

TEST_F(ServerTest, RepliesCanOvertakeEarlierRequests) {
  // Stats is answered inline while a large Put before it is still with the store: the
  // client matches replies by id, whatever their order. (Both orders are valid; the test
  // checks that both ids come back once, and counts what it saw.)
  StartServer();
  auto c = Session(0, 64);
  ASSERT_NE(c, nullptr);
  std::vector<BlockKey> keys;
  std::vector<uint32_t> slots;
  for (uint32_t i = 0; i < 64; ++i) {
    keys.push_back(Key(3, 1, i));
    slots.push_back(i);
    std::memcpy(c->slot(i), RandomBlock(block_bytes(), i + 1).data(), block_bytes());
  }
  ASSERT_TRUE(c->SendPut(1, keys, slots));
  ASSERT_TRUE(c->SendEmpty(Opcode::kStats, 2));
  std::set<uint64_t> ids;
  for (int k = 0; k < 2; ++k) {
    std::optional<Reply> r = c->Read();
    ASSERT_TRUE(r.has_value());
    ids.insert(r->header.request_id);
  }
  EXPECT_EQ(ids, (std::set<uint64_t>{1, 2}));
}

// --- Malformed frames ------------------------------------------------------------------

std::vector<uint8_t> RawFrame(uint16_t opcode, uint64_t id, const std::vector<uint8_t>& body,
                              uint32_t flags = 0, uint32_t magic = wire::kMagic,
                              uint16_t version = wire::kProtocolVersion,
                              std::optional<uint32_t> body_bytes = std::nullopt) {
  std::vector<uint8_t> f(wire::kHeaderBytes + body.size());
  wire::FrameHeader h;
  h.magic = magic;
  h.version = version;
  h.opcode = opcode;
  h.flags = flags;
  h.body_bytes = body_bytes.value_or(static_cast<uint32_t>(body.size()));
  h.request_id = id;
  wire::EncodeHeader(h, std::span<uint8_t, wire::kHeaderBytes>(f.data(), wire::kHeaderBytes));
  std::copy(body.begin(), body.end(), f.begin() + wire::kHeaderBytes);
  return f;
}

// After each case, a fresh client must still be served.
void ExpectStillServing(ServerTest* t, std::unique_ptr<TestClient> fresh) {
  ASSERT_NE(fresh, nullptr);
  Reply storage;
  EXPECT_NE(fresh->Stats(99, &storage), nullptr);
  (void)t;
}

TEST_F(ServerTest, FatalFramingErrorsGetAnErrorThenClose) {
  ServerOptions o;
  o.max_frame_bytes = 1 << 20;
  StartServer(o);
  struct Case {
    const char* what;
    std::vector<uint8_t> bytes;
  };
  const std::vector<Case> cases = {
      {"bad magic", RawFrame(8, 41, {}, 0, 0xDEADBEEF)},
      {"bad version", RawFrame(8, 42, {}, 0, wire::kMagic, 9)},
      {"reply flag", RawFrame(8, 43, {}, wire::kFlagReply)},
      {"oversized", RawFrame(2, 44, {}, 0, wire::kMagic, wire::kProtocolVersion, 2u << 20)},
  };
  uint64_t rejected = 0;
  for (const Case& k : cases) {
    auto c = Session();
    ASSERT_NE(c, nullptr);
    ASSERT_TRUE(c->SendRaw(k.bytes.data(), k.bytes.size()));
    std::optional<Reply> r = c->Read();
    ASSERT_TRUE(r.has_value()) << k.what;
    EXPECT_EQ(r->header.opcode, static_cast<uint16_t>(Opcode::kError)) << k.what;
    EXPECT_EQ(r->header.request_id, k.bytes[16]) << k.what;
    EXPECT_EQ(r->ErrorStatus().code(), StatusCode::kInvalidArgument) << k.what;
    EXPECT_TRUE(c->ClosedByPeer()) << k.what;
    EXPECT_EQ(server_->stats().frames_rejected, ++rejected) << k.what;
    ExpectStillServing(this, Session());
  }
}

TEST_F(ServerTest, UnknownOpcodesAndGarbageBodiesGetAnErrorAndTheConnectionStays) {
  StartServer();
  auto c = Session(0, 4);
  ASSERT_NE(c, nullptr);
  std::mt19937_64 rng(5);
  std::vector<uint8_t> garbage(300);
  for (auto& b : garbage) b = static_cast<uint8_t>(rng() | 0x80);
  struct Case {
    const char* what;
    std::vector<uint8_t> bytes;
  };
  const std::vector<Case> cases = {
      {"unknown opcode", RawFrame(77, 51, {1, 2, 3, 4})},
      {"Error opcode as a request", RawFrame(0, 52, {})},
      {"garbage Put body", RawFrame(2, 53, garbage)},
      {"empty Get body", RawFrame(3, 54, {})},
      {"short Select body", RawFrame(10, 55, {4, 0, 0})},
  };
  for (const Case& k : cases) {
    ASSERT_TRUE(c->SendRaw(k.bytes.data(), k.bytes.size()));
    std::optional<Reply> r = c->Read();
    ASSERT_TRUE(r.has_value()) << k.what;
    EXPECT_EQ(r->header.opcode, static_cast<uint16_t>(Opcode::kError)) << k.what;
    EXPECT_EQ(r->header.request_id, k.bytes[16]) << k.what;
    EXPECT_EQ(r->ErrorStatus().code(), StatusCode::kInvalidArgument) << k.what;
  }
  EXPECT_EQ(server_->stats().frames_rejected, cases.size());
  Reply storage;
  EXPECT_NE(c->Stats(60, &storage), nullptr);  // the same connection goes on
}

TEST_F(ServerTest, TruncatedFrameThenCloseLeavesTheServerServing) {
  StartServer();
  {
    auto c = Session(0, 4);
    ASSERT_NE(c, nullptr);
    const std::vector<uint8_t> f = RawFrame(2, 1, std::vector<uint8_t>(100, 7));
    ASSERT_TRUE(c->SendRaw(f.data(), 40));  // header and 16 of 100 body bytes
  }
  {
    auto c = Connect();  // before Hello, half a header
    ASSERT_NE(c, nullptr);
    const std::vector<uint8_t> f = RawFrame(1, 1, {});
    ASSERT_TRUE(c->SendRaw(f.data(), 10));
  }
  EXPECT_TRUE(Eventually([&] { return server_->stats().connections_open == 0; }));
  ExpectStillServing(this, Session());
}

TEST_F(ServerTest, RandomBytesFromManyClientsNeverHurtTheServer) {
  StartServer();
  std::mt19937_64 rng(77);
  for (int i = 0; i < 30; ++i) {
    auto c = (i % 2 == 0) ? Session(0, 2) : Connect();
    ASSERT_NE(c, nullptr);
    std::vector<uint8_t> bytes(1 + rng() % 600);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    if (i % 3 == 0) {  // a valid header of a random opcode, then random body bytes
      const auto f = RawFrame(static_cast<uint16_t>(rng() % 12), i, bytes);
      c->SendRaw(f.data(), f.size());
    } else {
      c->SendRaw(bytes.data(), bytes.size());
    }
    while (c->Read(200).has_value()) {
    }
  }
  ExpectStillServing(this, Session());
}

// --- Slow readers and disconnects --------------------------------------------------------

TEST_F(ServerTest, SlowReaderIsCutWhileAnotherClientGoesOn) {
  ServerOptions o;
  o.max_buffered_reply_bytes = 512 << 10;
  StartServer(o);
  auto slow = Session(0, 0);  // inline Gets: big replies
  auto fast = Session(0, 4);
  ASSERT_NE(slow, nullptr);
  ASSERT_NE(fast, nullptr);
  std::vector<BlockKey> keys;
  std::vector<uint8_t> data;
  for (uint32_t i = 0; i < 16; ++i) {
    keys.push_back(Key(4, 0, i));
    const auto b = RandomBlock(block_bytes(), 900 + i);
    data.insert(data.end(), b.begin(), b.end());
  }
  ASSERT_TRUE(slow->Put(1, keys, {}, data).ok());
  // Gets of 128 KiB replies, never read, until the server cuts the connection.
  bool cut = false;
  for (uint64_t id = 10; id < 10000 && !cut; ++id) {
    if (!slow->SendGet(id, keys, {})) cut = true;
    if (server_->stats().slow_readers_cut > 0) cut = true;
    if (id % 16 == 0) {
      // Meanwhile the other client is served promptly.
      std::memcpy(fast->slot(0), data.data(), block_bytes());
      ASSERT_TRUE(fast->Put(id, {Key(8, 0, static_cast<uint32_t>(id % 100))}, {0}).ok());
    }
  }
  EXPECT_TRUE(Eventually([&] { return server_->stats().slow_readers_cut == 1; }));
  EXPECT_TRUE(slow->ClosedByPeer(2000));
  std::memcpy(fast->slot(1), data.data() + block_bytes(), block_bytes());
  EXPECT_TRUE(fast->Put(20000, {Key(8, 1, 1)}, {1}).ok());
  EXPECT_TRUE(fast->Get(20001, {Key(8, 1, 1)}, {2}).ok());
  EXPECT_EQ(std::memcmp(fast->slot(2), data.data() + block_bytes(), block_bytes()), 0);
}

TEST_F(ServerTest, ClientDisconnectingWithRequestsInFlight) {
  StartServer();
  for (int round = 0; round < 5; ++round) {
    auto c = Session(0, 64);
    ASSERT_NE(c, nullptr);
    for (uint32_t i = 0; i < 64; ++i) {
      std::memcpy(c->slot(i), RandomBlock(block_bytes(), i + 7).data(), block_bytes());
    }
    for (uint32_t i = 0; i < 64; ++i) {
      std::vector<BlockKey> keys;
      std::vector<uint32_t> slots;
      for (uint32_t j = 0; j < 8; ++j) {
        keys.push_back(Key(20 + round, j % 2, i * 8 + j));
        slots.push_back((i * 8 + j) % 64);
      }
      if (i % 2 == 0) {
        c->SendPut(i, keys, slots);
      } else {
        c->SendGet(i, keys, {static_cast<uint32_t>(i % 64)});  // count mismatch: an error
        c->SendEmpty(Opcode::kFlush, 100 + i);
      }
    }
    c.reset();  // gone, with its staging mapping, while the server works
  }
  EXPECT_TRUE(Eventually([&] { return server_->stats().connections_open == 0; }));
  EXPECT_TRUE(Eventually([&] { return server_->stats().staging_bytes_mapped == 0; }));
  EXPECT_EQ(server_->stats().staging_slots_in_use, 0u);
  ExpectStillServing(this, Session());
}

TEST_F(ServerTest, StopWithClientsConnectedAndRequestsInFlight) {
  StartServer();
  std::vector<std::unique_ptr<TestClient>> clients;
  for (int k = 0; k < 4; ++k) {
    clients.push_back(Session(0, 16));
    ASSERT_NE(clients.back(), nullptr);
    for (uint32_t i = 0; i < 16; ++i) {
      clients.back()->SendPut(i, {Key(40 + k, 0, i)}, {i});
      clients.back()->SendEmpty(Opcode::kFlush, 100 + i);
    }
  }
  server_->Stop();
  server_->Stop();  // idempotent
  for (auto& c : clients) EXPECT_TRUE(c->ClosedByPeer(5000));
  EXPECT_FALSE(std::filesystem::exists(dir_.Socket()));
}

// --- Namespaces ------------------------------------------------------------------------

TEST_F(ServerTest, NamespacesAreIsolated) {
  ServerOptions o;
  o.namespaces = {Ns(1, {geteuid()}), Ns(2, {geteuid()})};
  StartServer(o);
  auto a = Session(1, 4);
  auto b = Session(2, 4);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  const BlockKey mine = Key(1, 0, 0, 1);
  const auto block = RandomBlock(block_bytes(), 1234);
  std::memcpy(a->slot(0), block.data(), block.size());
  ASSERT_TRUE(a->Put(1, {mine}, {0}).ok());

  // b cannot read, overwrite, delete or even see a's block; its own key in the same
  // batch is served.
  std::vector<Status> members;
  const BlockKey its_own = Key(1, 0, 0, 2);
  std::memcpy(b->slot(0), RandomBlock(block_bytes(), 5).data(), block_bytes());
  std::memcpy(b->slot(1), RandomBlock(block_bytes(), 6).data(), block_bytes());
  EXPECT_EQ(b->Put(2, {mine, its_own}, {0, 1}, {}, &members).code(), StatusCode::kPermissionDenied);
  ASSERT_EQ(members.size(), 2u);
  EXPECT_EQ(members[0].code(), StatusCode::kPermissionDenied);
  EXPECT_TRUE(members[1].ok());
  EXPECT_TRUE(store_->Contains(its_own));
  std::memset(b->slot(2), 0, block_bytes());
  EXPECT_EQ(b->Get(3, {mine}, {2}, &members).code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(std::vector<uint8_t>(b->slot(2), b->slot(2) + block_bytes()),
            std::vector<uint8_t>(block_bytes(), 0));
  EXPECT_EQ(b->Get(4, {mine}, {}, &members).code(), StatusCode::kPermissionDenied);
  ASSERT_TRUE(b->SendKeys(Opcode::kDelete, 5, {mine}));
  std::optional<Reply> r = b->Expect(5, Opcode::kDelete);
  ASSERT_TRUE(r.has_value());
  Status outcome;
  b->Members(*r, 1, &outcome);
  EXPECT_EQ(outcome.code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(b->Contains(6, {mine, its_own}, &outcome), (std::vector<bool>{false, true}));
  EXPECT_EQ(outcome.code(), StatusCode::kPermissionDenied);
  flatbuffers::FlatBufferBuilder fbb;
  fbb.Finish(wire::CreateDropSequenceRequest(fbb, 1, mine.sequence.hi, mine.sequence.lo));
  ASSERT_TRUE(b->Send(fbb, Opcode::kDropSequence, 7));
  r = b->Expect(7, Opcode::kDropSequence);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(wire::FromWire(r->As<wire::CountReply>()->outcome()).code(),
            StatusCode::kPermissionDenied);

  // a's block is untouched.
  ASSERT_TRUE(a->Get(8, {mine}, {1}).ok());
  EXPECT_EQ(std::memcmp(a->slot(1), block.data(), block.size()), 0);
  Reply storage;
  const wire::Stats* stats = a->Stats(9, &storage);
  ASSERT_NE(stats, nullptr);
  EXPECT_EQ(stats->namespace_blocks(), 1u);
  const ServerStats s = server_->stats();
  ASSERT_EQ(s.clients_per_namespace.size(), 2u);
  EXPECT_EQ(s.clients_per_namespace[0], (std::pair<uint32_t, uint64_t>{1, 1}));
  EXPECT_EQ(s.clients_per_namespace[1], (std::pair<uint32_t, uint64_t>{2, 1}));
}

// --- Retrieval -------------------------------------------------------------------------

// 2 layers, 2 KV heads, 4 query heads, head dim 32, f32 (keys written as floats), 16-token
// blocks: 8 KiB blocks.
ModelLayout RetrievalLayout() {
  return ModelLayout{.num_layers = 2,
                     .num_kv_heads = 2,
                     .num_query_heads = 4,
                     .head_dim = 32,
                     .dtype = DType::kF32,
                     .block_tokens = 16};
}

std::vector<float> Direction(uint32_t dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> d(dim);
  float norm = 0;
  for (float& x : d) {
    x = normal(rng);
    norm += x * x;
  }
  for (float& x : d) x /= std::sqrt(norm);
  return d;
}

// Seeded noise keys and values; a needle block has 3 keys per head along `direction`.
std::vector<uint8_t> RetrievalBlock(const ModelLayout& l, uint64_t seed, bool needle,
                                    const std::vector<float>& direction) {
  const uint64_t key_floats = uint64_t{l.num_kv_heads} * l.block_tokens * l.head_dim;
  std::vector<float> f(2 * key_floats);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> noise(0.0f, 0.2f);
  for (float& x : f) x = noise(rng);
  if (needle) {
    for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
      for (uint32_t t = 0; t < 3; ++t) {
        float* k = f.data() + (uint64_t{h} * l.block_tokens + (t * 5 + 3)) * l.head_dim;
        for (uint32_t c = 0; c < l.head_dim; ++c) k[c] += 6.0f * direction[c];
      }
    }
  }
  std::vector<uint8_t> bytes(f.size() * sizeof(float));
  std::memcpy(bytes.data(), f.data(), bytes.size());
  return bytes;
}

struct SelectResult {
  Status status;
  uint64_t sink_blocks = 0, local_begin = 0, local_end = 0;
  uint32_t selected = 0;
  std::vector<int64_t> blocks;
  std::vector<float> scores;
};

SelectResult RemoteSelect(TestClient& c, uint64_t id, uint32_t ns, const SequenceId& seq,
                          uint32_t layer, const std::vector<float>& queries, uint64_t context) {
  flatbuffers::FlatBufferBuilder fbb;
  fbb.Finish(wire::CreateSelectRequestDirect(fbb, ns, seq.hi, seq.lo, layer, context, &queries,
                                             /*want_scores=*/true));
  SelectResult out;
  if (!c.Send(fbb, Opcode::kSelect, id)) return out;
  std::optional<Reply> r = c.Expect(id, Opcode::kSelect);
  const auto* reply = r ? r->As<wire::SelectReply>() : nullptr;
  if (reply == nullptr) {
    out.status = Status::Internal("no SelectReply");
    return out;
  }
  out.status = wire::FromWire(reply->outcome());
  out.sink_blocks = reply->sink_blocks();
  out.local_begin = reply->local_begin();
  out.local_end = reply->local_end();
  out.selected = reply->selected();
  if (reply->blocks() != nullptr)
    out.blocks.assign(reply->blocks()->begin(), reply->blocks()->end());
  if (reply->scores() != nullptr)
    out.scores.assign(reply->scores()->begin(), reply->scores()->end());
  return out;
}

Status RemoteIndexBlock(TestClient& c, uint64_t id, const BlockKey& key, int32_t slot,
                        const std::vector<uint8_t>& data, const std::vector<float>& scores) {
  flatbuffers::FlatBufferBuilder fbb;
  const wire::Key k = wire::ToWire(key);
  fbb.Finish(wire::CreateIndexBlockRequestDirect(fbb, &k, 16, scores.empty() ? nullptr : &scores,
                                                 slot, data.empty() ? nullptr : &data));
  if (!c.Send(fbb, Opcode::kIndexBlock, id)) return Status::IOError("send");
  std::optional<Reply> r = c.Expect(id, Opcode::kIndexBlock);
  return r ? r->ErrorStatus() : Status::IOError("no reply");
}

TEST_F(ServerTest, SelectThroughTheDaemonMatchesTheStore) {
  const ModelLayout l = RetrievalLayout();
  StoreOptions so;
  so.host_capacity_bytes = 128 * 8192;
  so.retrieval.enabled = true;
  so.retrieval.top_k = 2;
  so.retrieval.n_init = 16;   // one sink block
  so.retrieval.n_local = 32;  // a two-block local window
  StartServer(ServerOptions{}, so, l);
  auto c = Session(0, 16);
  ASSERT_NE(c, nullptr);
  const std::vector<float> direction = Direction(l.head_dim, 99);
  const SequenceId seq{7, 1};
  // 12 blocks per layer, through the staging area; the needle at block 6 of layer 0.
  for (uint32_t layer = 0; layer < 2; ++layer) {
    std::vector<BlockKey> keys;
    std::vector<uint32_t> slots;
    for (uint32_t b = 0; b < 12; ++b) {
      const auto block = RetrievalBlock(l, layer * 100 + b, layer == 0 && b == 6, direction);
      std::memcpy(c->slot(b), block.data(), block.size());
      keys.push_back(Key(1, layer, b));
      slots.push_back(b);
    }
    ASSERT_TRUE(c->Put(layer + 1, keys, slots).ok());
  }
  std::vector<float> q(uint64_t{l.num_query_heads} * l.head_dim);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> noise(0.0f, 0.1f);
  for (uint32_t h = 0; h < l.num_query_heads; ++h) {
    for (uint32_t d = 0; d < l.head_dim; ++d)
      q[h * l.head_dim + d] = 4.0f * direction[d] + noise(rng);
  }
  const SelectResult remote = RemoteSelect(*c, 10, 0, seq, 0, q, 192);
  ASSERT_TRUE(remote.status.ok()) << remote.status.ToString();
  EXPECT_EQ(remote.sink_blocks, 1u);
  EXPECT_EQ(remote.local_begin, 10u);
  EXPECT_EQ(remote.local_end, 12u);
  EXPECT_EQ(remote.selected, 2u);
  ASSERT_EQ(remote.blocks.size(), 2u);
  EXPECT_EQ(remote.blocks[0], 6);
  // The same selection, scores included, as the store gives directly.
  std::vector<int64_t> blocks(2);
  std::vector<float> scores(2);
  auto local = store_->Select(0, seq, 0, q, 192, blocks, scores);
  ASSERT_TRUE(local.ok());
  EXPECT_EQ(remote.blocks, blocks);
  ASSERT_EQ(remote.scores.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_FALSE(std::isnan(remote.scores[i]));
    EXPECT_FLOAT_EQ(remote.scores[i], scores[i]);
  }
  // Argument checks: query size, another namespace.
  std::vector<float> short_q(q.begin(), q.end() - 1);
  EXPECT_EQ(RemoteSelect(*c, 11, 0, seq, 0, short_q, 192).status.code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(RemoteSelect(*c, 12, 3, seq, 0, q, 192).status.code(), StatusCode::kPermissionDenied);

  // IndexBlock, from a staging slot and inline.
  const auto block = RetrievalBlock(l, 1, false, direction);
  std::memcpy(c->slot(0), block.data(), block.size());
  std::vector<float> token_scores(uint64_t{l.num_kv_heads} * l.block_tokens, 0.5f);
  EXPECT_TRUE(RemoteIndexBlock(*c, 20, Key(1, 1, 1), 0, {}, token_scores).ok());
  EXPECT_TRUE(RemoteIndexBlock(*c, 21, Key(1, 1, 1), -1, block, {}).ok());
  EXPECT_EQ(RemoteIndexBlock(*c, 22, Key(55, 1, 1), 0, {}, {}).code(), StatusCode::kNotFound);
  EXPECT_EQ(RemoteIndexBlock(*c, 23, Key(1, 1, 1, 4), 0, {}, {}).code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(RemoteIndexBlock(*c, 24, Key(1, 1, 1), 16, {}, {}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(RemoteIndexBlock(*c, 25, Key(1, 1, 1), -1, {1, 2, 3}, {}).code(),
            StatusCode::kInvalidArgument);
}

TEST_F(ServerTest, SelectWithoutRetrievalIsAFailedPrecondition) {
  StartServer();
  auto c = Session(0, 0);
  ASSERT_NE(c, nullptr);
  std::vector<float> q(uint64_t{TestLayout().num_query_heads} * TestLayout().head_dim, 1.0f);
  EXPECT_EQ(RemoteSelect(*c, 1, 0, SequenceId{7, 1}, 0, q, 64).status.code(),
            StatusCode::kFailedPrecondition);
}

// --- TCP -------------------------------------------------------------------------------

TEST_F(ServerTest, TcpNeedsATokenAndMovesBytesInline) {
  ServerOptions o;
  o.tcp_listen = "127.0.0.1:0";
  o.namespaces = {Ns(3, {geteuid()}, {}, {"t"})};
  StartServer(o);
  ASSERT_NE(server_->tcp_port(), 0);
  auto anonymous = TestClient::Tcp(server_->tcp_port());
  ASSERT_NE(anonymous, nullptr);
  EXPECT_EQ(anonymous->Hello(TestLayout(), 3, 4).code(), StatusCode::kPermissionDenied);
  EXPECT_TRUE(anonymous->ClosedByPeer());

  auto c = TestClient::Tcp(server_->tcp_port());
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(c->Hello(TestLayout(), 3, 4, "t").ok());
  EXPECT_EQ(c->staging_slots(), 0u);  // over TCP the bytes go inline
  const std::vector<BlockKey> keys = {Key(1, 0, 0, 3), Key(1, 1, 0, 3)};
  std::vector<uint8_t> data = RandomBlock(2 * block_bytes(), 42);
  ASSERT_TRUE(c->Put(1, keys, {}, data).ok());
  std::vector<uint8_t> got;
  ASSERT_TRUE(c->Get(2, keys, {}, nullptr, &got).ok());
  EXPECT_EQ(got, data);
  // Slots mean nothing without a staging area.
  EXPECT_EQ(c->Get(3, keys, {0, 1}).code(), StatusCode::kInvalidArgument);
  // The reply is built around the blocks the store writes (and its builder reused from
  // request to request): a member that failed is zeros, the others exact, whatever the
  // sizes of the Gets before.
  const uint64_t bb = block_bytes();
  for (uint64_t id = 4; id < 8; ++id) {
    const std::vector<BlockKey> mixed =
        id % 2 == 0 ? std::vector<BlockKey>{keys[1], Key(9, 0, 0, 3)}
                    : std::vector<BlockKey>{keys[0], Key(9, 0, 0, 3), keys[1], keys[0]};
    std::vector<Status> members;
    EXPECT_EQ(c->Get(id, mixed, {}, &members, &got).code(), StatusCode::kNotFound);
    ASSERT_EQ(members.size(), mixed.size());
    ASSERT_EQ(got.size(), mixed.size() * bb);
    for (size_t i = 0; i < mixed.size(); ++i) {
      const std::vector<uint8_t> member(got.begin() + i * bb, got.begin() + (i + 1) * bb);
      if (mixed[i] == Key(9, 0, 0, 3)) {
        EXPECT_EQ(members[i].code(), StatusCode::kNotFound);
        EXPECT_EQ(member, std::vector<uint8_t>(bb, 0));
      } else {
        EXPECT_TRUE(members[i].ok());
        const size_t which = mixed[i] == keys[0] ? 0 : 1;
        EXPECT_EQ(member,
                  std::vector<uint8_t>(data.begin() + which * bb, data.begin() + (which + 1) * bb));
      }
    }
  }
}

// An inline Get of blocks in the host tier is sent from their slots, pinned until the
// reply has gone (so an overwrite meanwhile does not change it), while replies pin at
// most a quarter of the host tier; beyond that, Gets are copied into their replies.
TEST_F(ServerTest, InlineGetsAreSentFromPinnedHostSlotsWithinABound) {
  StoreOptions so;
  so.host_capacity_bytes = 1024 * 8192;  // a quarter: 256 blocks of TestLayout's 8 KiB
  StartServer({}, so);
  const uint64_t bb = block_bytes();
  ASSERT_EQ(bb, 8192u);
  auto reader = Session(0, 0);  // inline Gets over the Unix socket: its buffer is smaller
  auto writer = Session(0, 0);  // than a 200-block reply, so the reply waits, unread
  ASSERT_NE(reader, nullptr);
  ASSERT_NE(writer, nullptr);
  constexpr uint32_t kBlocks = 300;
  std::vector<BlockKey> keys;
  std::vector<uint8_t> v1, v2;
  for (uint32_t i = 0; i < kBlocks; ++i) {
    keys.push_back(Key(5, i % 2, i));
    const auto a = RandomBlock(bb, 5000 + i), b = RandomBlock(bb, 9000 + i);
    v1.insert(v1.end(), a.begin(), a.end());
    v2.insert(v2.end(), b.begin(), b.end());
  }
  for (uint32_t first = 0; first < kBlocks; first += 100) {
    const std::vector<BlockKey> part(keys.begin() + first, keys.begin() + first + 100);
    const std::vector<uint8_t> bytes(v1.begin() + first * bb, v1.begin() + (first + 100) * bb);
    ASSERT_TRUE(writer->Put(first + 1, part, {}, bytes).ok());
  }
  // 200 blocks: more segments than one sendmsg takes, unread: pinned.
  const std::vector<BlockKey> first(keys.begin(), keys.begin() + 200);
  const std::vector<BlockKey> second(keys.begin() + 100, keys.end());
  const uint64_t requests = server_->stats().requests;
  ASSERT_TRUE(reader->SendGet(1, first, {}));
  ASSERT_TRUE(Eventually([&] { return server_->stats().reply_pinned_bytes == 200 * bb; }));
  // A second would pass the bound: copied. A small request goes behind both.
  ASSERT_TRUE(reader->SendGet(2, second, {}));
  ASSERT_TRUE(reader->SendKeys(Opcode::kContains, 3, {keys[0]}));
  ASSERT_TRUE(Eventually([&] { return server_->stats().requests >= requests + 3; }));
  EXPECT_EQ(server_->stats().reply_pinned_bytes, 200 * bb);
  // Overwritten meanwhile: the pinned blocks keep what the Get found.
  const std::vector<uint8_t> head(v2.begin(), v2.begin() + 50 * bb);
  ASSERT_TRUE(
      writer->Put(10, std::vector<BlockKey>(keys.begin(), keys.begin() + 50), {}, head).ok());

  // The copied Get goes to the store's workers: the replies come in any order.
  std::map<uint64_t, Reply> replies;
  for (int i = 0; i < 3; ++i) {
    std::optional<Reply> r = reader->Read();
    ASSERT_TRUE(r.has_value());
    replies.emplace(r->header.request_id, std::move(*r));
  }
  ASSERT_EQ(replies.size(), 3u);
  EXPECT_EQ(replies[3].header.opcode, static_cast<uint16_t>(Opcode::kContains));
  for (uint64_t id : {1, 2}) {
    const auto* b = replies[id].As<wire::BatchReply>();
    ASSERT_NE(b, nullptr);
    EXPECT_TRUE(wire::FromWire(b->outcome()).ok());
    ASSERT_NE(b->data(), nullptr);
    const uint8_t* want = v1.data() + (id == 1 ? 0 : 100 * bb);
    ASSERT_EQ(b->data()->size(), 200 * bb);
    EXPECT_EQ(std::memcmp(b->data()->data(), want, 200 * bb), 0) << id;
  }
  std::vector<Status> members;
  std::vector<uint8_t> got;
  EXPECT_TRUE(Eventually([&] { return server_->stats().reply_pinned_bytes == 0; }));
  // The new versions, and zeros for a missing member, sent from the slots again.
  const std::vector<BlockKey> mixed = {keys[0], Key(5, 0, 999), keys[299]};
  EXPECT_EQ(reader->Get(4, mixed, {}, &members, &got).code(), StatusCode::kNotFound);
  ASSERT_EQ(got.size(), 3 * bb);
  EXPECT_EQ(std::memcmp(got.data(), v2.data(), bb), 0);
  EXPECT_EQ(std::vector<uint8_t>(got.begin() + bb, got.begin() + 2 * bb),
            std::vector<uint8_t>(bb, 0));
  EXPECT_EQ(std::memcmp(got.data() + 2 * bb, v1.data() + 299 * bb, bb), 0);
  EXPECT_EQ(server_->stats().reply_pinned_bytes, 0u);
}

// Blocks of a size that is not a multiple of 8 (12 bytes): the reply's data vector is
// followed by padding inside the body, which a lent reply sends after the blocks.
TEST_F(ServerTest, InlineGetsOfOddSizedBlocksAreExact) {
  const ModelLayout odd{.num_layers = 1,
                        .num_kv_heads = 1,
                        .num_query_heads = 1,
                        .head_dim = 3,
                        .dtype = DType::kF16,
                        .block_tokens = 1};
  StartServer({}, {}, odd);
  const uint64_t bb = block_bytes();
  ASSERT_EQ(bb % 8, 4u);
  auto c = Session(0, 0);
  ASSERT_NE(c, nullptr);
  const std::vector<BlockKey> keys = {Key(1, 0, 0), Key(1, 0, 1)};
  const std::vector<uint8_t> data = RandomBlock(2 * bb, 77);
  ASSERT_TRUE(c->Put(1, keys, {}, data).ok());
  const std::vector<BlockKey> mixed = {keys[1], Key(1, 0, 9), keys[0]};
  std::vector<Status> members;
  std::vector<uint8_t> got;
  for (uint64_t id = 2; id < 5; ++id) {  // the reply's builder reused
    EXPECT_EQ(c->Get(id, mixed, {}, &members, &got).code(), StatusCode::kNotFound);
    ASSERT_EQ(got.size(), 3 * bb);
    EXPECT_EQ(std::memcmp(got.data(), data.data() + bb, bb), 0);
    EXPECT_EQ(std::vector<uint8_t>(got.begin() + bb, got.begin() + 2 * bb),
              std::vector<uint8_t>(bb, 0));
    EXPECT_EQ(std::memcmp(got.data() + 2 * bb, data.data(), bb), 0);
  }
}

// --- Start's checks ----------------------------------------------------------------------

TEST_F(ServerTest, SecondServerOnTheSameSocketIsRefused) {
  StartServer();
  auto second = Server::Start(store_.get(), OptionsAt(dir_.Socket()));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().message().find("another kvtierd"), std::string::npos);
  ExpectStillServing(this, Session());
}

TEST_F(ServerTest, StaleSocketIsReplacedAndOtherFilesAreNot) {
  auto store = EmbeddedStore::Open(SmallStoreOptions(), TestLayout());
  ASSERT_TRUE(store.ok());
  // A stale socket: bound, never listening, its owner gone.
  const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, dir_.Socket().c_str(), sizeof(addr.sun_path) - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ::close(fd);
  auto server = Server::Start(store->get(), OptionsAt(dir_.Socket()));
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  struct stat st;
  ASSERT_EQ(stat(dir_.Socket().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  (*server)->Stop();
  // A regular file is not a socket to replace.
  const std::string file = dir_.path() + "/file";
  {
    std::FILE* f = std::fopen(file.c_str(), "w");
    std::fclose(f);
  }
  auto refused = Server::Start(store->get(), OptionsAt(file));
  EXPECT_EQ(refused.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(std::filesystem::exists(file));
}

TEST_F(ServerTest, NonLoopbackTcpNeedsTokensEverywhere) {
  auto store = EmbeddedStore::Open(SmallStoreOptions(), TestLayout());
  ASSERT_TRUE(store.ok());
  ServerOptions o = OptionsAt(dir_.Socket());
  o.tcp_listen = "0.0.0.0:0";
  o.namespaces = {Ns(1, {}, {}, {"x"}), Ns(2, {geteuid()})};
  auto server = Server::Start(store->get(), o);
  EXPECT_EQ(server.status().code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(dir_.Socket()));
  o.namespaces[1].tokens = {"y"};
  server = Server::Start(store->get(), o);
  EXPECT_TRUE(server.ok()) << server.status().ToString();
}

}  // namespace
}  // namespace kvtier::server
