// kvtierd's direct copies into a client's GPU tier (PROTOCOL.md, "Direct copies into a
// client's GPU tier"), end to end through raw sockets: RegisterDevice with an emulated
// pool (a sealed memfd sent with SCM_RIGHTS), GetToDevice into it, their errors, the
// daemon's handling of descriptors sent with other frames, and a client that leaves
// with copies in flight. The CUDA kind is only checked to be refused without a GPU.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "src/server/protocol/codec.h"
#include "src/server/server.h"
#include "tests/test_util.h"

namespace kvtier::server {
namespace {

using wire::Opcode;

ModelLayout Layout() { return kvtier::testing::SmallLayout(); }  // 8 KiB blocks

constexpr uint8_t kUntouched = 0xA5;  // what the pool holds where no block was copied

BlockKey KeyOf(uint32_t block, uint32_t ns = 0) {
  return BlockKey{.namespace_id = ns, .sequence = {3, 9}, .layer = block % 2, .block = block};
}

// Seeded random bytes, none of them zero.
std::vector<uint8_t> Noise(uint64_t bytes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> byte(1, 255);
  std::vector<uint8_t> v(bytes);
  for (uint8_t& b : v) b = static_cast<uint8_t>(byte(rng));
  return v;
}

// A sealed (or not) memfd of `bytes`, filled with kUntouched, and the client's mapping.
struct Pool {
  int fd = -1;
  uint8_t* base = nullptr;
  uint64_t bytes = 0;

  static Pool Make(uint64_t bytes, bool seal = true) {
    Pool p;
    p.bytes = bytes;
    p.fd = memfd_create("device-pool-test", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    EXPECT_GE(p.fd, 0);
    EXPECT_EQ(ftruncate(p.fd, static_cast<off_t>(bytes)), 0);
    if (seal) {
      EXPECT_EQ(fcntl(p.fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
    }
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, p.fd, 0);
    EXPECT_NE(m, MAP_FAILED);
    p.base = static_cast<uint8_t*>(m);
    std::memset(p.base, kUntouched, bytes);
    return p;
  }
  Pool() = default;
  Pool(Pool&& o) noexcept
      : fd(std::exchange(o.fd, -1)), base(std::exchange(o.base, nullptr)), bytes(o.bytes) {}
  ~Pool() { Release(); }
  void Release() {
    if (base != nullptr) munmap(base, bytes);
    if (fd >= 0) ::close(fd);
    base = nullptr;
    fd = -1;
  }
  // Whether every byte outside [offsets[i], offsets[i] + block) is still kUntouched.
  bool UntouchedOutside(const std::vector<uint64_t>& offsets, uint64_t block) const {
    std::vector<bool> written(bytes, false);
    for (uint64_t o : offsets) std::fill_n(written.begin() + static_cast<long>(o), block, true);
    for (uint64_t i = 0; i < bytes; ++i) {
      if (!written[i] && base[i] != kUntouched) return false;
    }
    return true;
  }
};

struct Frame {
  wire::FrameHeader header;
  std::vector<uint8_t> body;
};

// A blocking client that can attach descriptors to the frames it sends.
class Peer {
 public:
  static std::unique_ptr<Peer> Dial(const sockaddr* addr, socklen_t len, int family) {
    const int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(fd, addr, len) != 0) {
      ADD_FAILURE() << "connect: " << std::strerror(errno);
      ::close(fd);
      return nullptr;
    }
    return std::unique_ptr<Peer>(new Peer(fd));
  }
  ~Peer() { Hangup(); }
  void Hangup() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // Sends the frame in one sendmsg, with `fds` attached to its first byte.
  bool Send(flatbuffers::FlatBufferBuilder& fbb, Opcode op, uint64_t id,
            const std::vector<int>& fds = {}) {
    std::vector<uint8_t> frame = wire::MakeFrame(fbb, op, id, /*reply=*/false);
    iovec iov{frame.data(), frame.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    std::vector<char> control(CMSG_SPACE(sizeof(int) * std::max<size_t>(fds.size(), 1)));
    if (!fds.empty()) {
      msg.msg_control = control.data();
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    const ssize_t sent = sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (sent < 0) return false;
    // The rest (a large frame) without the descriptors.
    size_t done = static_cast<size_t>(sent);
    while (done < frame.size()) {
      const ssize_t w = ::send(fd_, frame.data() + done, frame.size() - done, MSG_NOSIGNAL);
      if (w <= 0) return false;
      done += static_cast<size_t>(w);
    }
    return true;
  }

  // The next frame, or nullopt at end of stream or after 10 s. Descriptors the daemon
  // sends (none here: the Hello asks for no staging area) are closed.
  std::optional<Frame> Next() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (true) {
      if (in_.size() >= wire::kHeaderBytes) {
        auto h = wire::DecodeHeader(
            std::span<const uint8_t, wire::kHeaderBytes>(in_.data(), wire::kHeaderBytes), 1u << 30,
            /*expect_reply=*/true);
        if (!h.ok()) {
          ADD_FAILURE() << h.status().ToString();
          return std::nullopt;
        }
        const size_t total = wire::kHeaderBytes + h->body_bytes;
        if (in_.size() >= total) {
          Frame f{*h, std::vector<uint8_t>(in_.begin() + wire::kHeaderBytes, in_.begin() + total)};
          in_.erase(in_.begin(), in_.begin() + static_cast<long>(total));
          EXPECT_TRUE(wire::VerifyReplyBody(h->opcode, f.body).ok());
          return f;
        }
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      uint8_t chunk[1 << 16];
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
      iovec iov{chunk, sizeof(chunk)};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof(control);
      const ssize_t n = recvmsg(fd_, &msg, MSG_CMSG_CLOEXEC);
      if (n <= 0) return std::nullopt;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
          ::close(fd);
        }
      }
      in_.insert(in_.end(), chunk, chunk + n);
    }
  }

  // The reply to `id`, which must be of `op` (an Error frame fails the test).
  std::optional<Frame> ReplyTo(uint64_t id, Opcode op) {
    std::optional<Frame> f = Next();
    EXPECT_TRUE(f.has_value()) << "no reply to request " << id;
    if (!f) return f;
    EXPECT_EQ(f->header.request_id, id);
    EXPECT_EQ(f->header.opcode, static_cast<uint16_t>(op));
    return f;
  }

  Status Hello(uint32_t ns, const std::string& token = "") {
    const ModelLayout layout = Layout();
    flatbuffers::FlatBufferBuilder fbb;
    fbb.Finish(wire::CreateHelloRequestDirect(fbb, wire::kProtocolVersion, layout.Fingerprint(),
                                              layout.ToString().c_str(), ns, token.c_str(),
                                              /*staging_blocks=*/0, "server_device_test"));
    if (!Send(fbb, Opcode::kHello, 1)) return Status::IOError("send Hello");
    std::optional<Frame> f = ReplyTo(1, Opcode::kHello);
    if (!f) return Status::IOError("no HelloReply");
    return wire::FromWire(flatbuffers::GetRoot<wire::HelloReply>(f->body.data())->outcome());
  }

  // RegisterDevice; its StatusReply's outcome.
  Status Register(uint64_t id, uint8_t kind, uint64_t bytes, std::vector<int> fds,
                  const std::vector<uint8_t>& uuid = {}, const std::vector<uint8_t>& handle = {}) {
    flatbuffers::FlatBufferBuilder fbb;
    fbb.Finish(wire::CreateRegisterDeviceRequestDirect(
        fbb, kind, bytes, uuid.empty() ? nullptr : &uuid, handle.empty() ? nullptr : &handle));
    if (!Send(fbb, Opcode::kRegisterDevice, id, fds)) return Status::IOError("send");
    std::optional<Frame> f = ReplyTo(id, Opcode::kRegisterDevice);
    if (!f) return Status::IOError("no reply");
    return wire::FromWire(flatbuffers::GetRoot<wire::StatusReply>(f->body.data())->outcome());
  }

  bool SendGetToDevice(uint64_t id, const std::vector<BlockKey>& keys,
                       const std::vector<uint64_t>& offsets) {
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<wire::Key> k;
    for (const BlockKey& key : keys) k.push_back(wire::ToWire(key));
    fbb.Finish(wire::CreateGetToDeviceRequestDirect(fbb, &k, &offsets));
    return Send(fbb, Opcode::kGetToDevice, id);
  }

  // A BatchReply's outcome; `members` gets the per-key outcomes (empty when absent).
  static Status Batch(const Frame& f, std::vector<Status>* members) {
    const auto* b = flatbuffers::GetRoot<wire::BatchReply>(f.body.data());
    members->clear();
    if (b->members() != nullptr) {
      for (const wire::Outcome* o : *b->members()) members->push_back(wire::FromWire(o));
    }
    EXPECT_EQ(b->data(), nullptr) << "GetToDevice replies carry no bytes";
    return wire::FromWire(b->outcome());
  }

  Status GetToDevice(uint64_t id, const std::vector<BlockKey>& keys,
                     const std::vector<uint64_t>& offsets, std::vector<Status>* members) {
    if (!SendGetToDevice(id, keys, offsets)) return Status::IOError("send");
    std::optional<Frame> f = ReplyTo(id, Opcode::kGetToDevice);
    if (!f) return Status::IOError("no reply");
    return Batch(*f, members);
  }

  // An inline Put (`fds` attached to the frame).
  Status Put(uint64_t id, const std::vector<BlockKey>& keys, const std::vector<uint8_t>& data,
             const std::vector<int>& fds = {}) {
    flatbuffers::FlatBufferBuilder fbb;
    std::vector<wire::Key> k;
    for (const BlockKey& key : keys) k.push_back(wire::ToWire(key));
    fbb.Finish(wire::CreatePutRequestDirect(fbb, &k, nullptr, &data));
    if (!Send(fbb, Opcode::kPut, id, fds)) return Status::IOError("send");
    std::optional<Frame> f = ReplyTo(id, Opcode::kPut);
    if (!f) return Status::IOError("no reply");
    std::vector<Status> members;
    return Batch(*f, &members);
  }

  // True once the daemon has closed the connection (frames before that are skipped).
  bool Closed() {
    while (Next().has_value()) {
    }
    uint8_t byte;
    const ssize_t n = ::recv(fd_, &byte, 1, MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno == ECONNRESET);
  }

 private:
  explicit Peer(int fd) : fd_(fd) {}
  int fd_;
  std::vector<uint8_t> in_;
};

template <typename Pred>
bool Within10s(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

// Namespace `id`, open to this process's uid (and to `token`).
NamespaceConfig Namespace(uint32_t id, const std::string& token = "") {
  NamespaceConfig ns;
  ns.id = id;
  ns.name = "ns" + std::to_string(id);
  ns.uids = {geteuid()};
  if (!token.empty()) ns.tokens = {token};
  return ns;
}

size_t OpenFds() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

class ServerDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvtdev-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    server_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }
  void Serve(ServerOptions options = {}) {
    StoreOptions so;
    so.host_capacity_bytes = 256 * 8192;
    so.host_memory = HostMemoryKind::kPlain;
    auto store = EmbeddedStore::Open(so, Layout());
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    store_ = std::move(store).value();
    options.socket_path = dir_ + "/kvtierd.sock";
    auto server = Server::Start(store_.get(), options);
    ASSERT_TRUE(server.ok()) << server.status().ToString();
    server_ = std::move(server).value();
  }
  // A Unix-socket client past its Hello in namespace `ns`.
  std::unique_ptr<Peer> Client(uint32_t ns = 0) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    const std::string path = dir_ + "/kvtierd.sock";
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    auto p = Peer::Dial(reinterpret_cast<sockaddr*>(&addr), sizeof(addr), AF_UNIX);
    if (p == nullptr) return nullptr;
    const Status s = p->Hello(ns);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return s.ok() ? std::move(p) : nullptr;
  }
  uint64_t block() const { return store_->block_bytes(); }
  // Puts `count` random blocks (keys 0..count-1 of namespace 0); returns their bytes.
  std::vector<std::vector<uint8_t>> PutBlocks(Peer& c, uint32_t count, uint32_t seed) {
    std::vector<std::vector<uint8_t>> blocks;
    for (uint32_t i = 0; i < count; ++i) {
      blocks.push_back(Noise(block(), seed + i));
      EXPECT_TRUE(c.Put(100 + i, {KeyOf(i)}, blocks.back()).ok());
    }
    return blocks;
  }

  std::string dir_;
  std::unique_ptr<EmbeddedStore> store_;
  std::unique_ptr<Server> server_;
};

TEST_F(ServerDeviceTest, BlocksLandAtTheirOffsetsAndNothingElseIsWritten) {
  Serve();
  auto c = Client();
  ASSERT_NE(c, nullptr);
  const auto blocks = PutBlocks(*c, 6, 11);
  // 12 blocks of room, plus a tail; offsets out of order and not block-aligned.
  Pool pool = Pool::Make(12 * block() + 4096);
  ASSERT_TRUE(c->Register(2, 0, pool.bytes, {pool.fd}).ok());
  EXPECT_EQ(server_->stats().device_pools_registered, 1u);
  const std::vector<uint64_t> offsets = {
      7 * block() + 64, 0, 3 * block() + 8, 11 * block() + 4096, 5 * block() + 200, block() + 16};
  std::vector<BlockKey> keys;
  for (uint32_t i = 0; i < 6; ++i) keys.push_back(KeyOf(i));
  std::vector<Status> members;
  ASSERT_TRUE(c->GetToDevice(3, keys, offsets, &members).ok());
  EXPECT_TRUE(members.empty());
  for (size_t i = 0; i < keys.size(); ++i) {
    EXPECT_EQ(std::memcmp(pool.base + offsets[i], blocks[i].data(), block()), 0) << "block " << i;
  }
  EXPECT_TRUE(pool.UntouchedOutside(offsets, block()));
  EXPECT_EQ(server_->stats().direct_device_bytes, 6 * block());
  EXPECT_GE(server_->stats().latency[static_cast<size_t>(Opcode::kGetToDevice)].count, 1u);
}

TEST_F(ServerDeviceTest, MissingAndForeignKeysFailAloneWhileTheRestLand) {
  ServerOptions o;
  o.namespaces = {Namespace(0), Namespace(1)};
  Serve(o);
  auto c = Client(0);
  ASSERT_NE(c, nullptr);
  const auto blocks = PutBlocks(*c, 2, 21);
  // Namespace 1 holds a block under the same coordinates.
  auto other = Client(1);
  ASSERT_NE(other, nullptr);
  ASSERT_TRUE(other->Put(9, {KeyOf(0, 1)}, Noise(block(), 99)).ok());
  Pool pool = Pool::Make(4 * block());
  ASSERT_TRUE(c->Register(2, 0, pool.bytes, {pool.fd}).ok());
  const std::vector<BlockKey> keys = {KeyOf(0), KeyOf(77), KeyOf(0, 1), KeyOf(1)};
  const std::vector<uint64_t> offsets = {0, block(), 2 * block(), 3 * block()};
  std::vector<Status> members;
  const Status outcome = c->GetToDevice(3, keys, offsets, &members);
  EXPECT_EQ(outcome.code(), StatusCode::kNotFound);  // the first failure
  ASSERT_EQ(members.size(), 4u);
  EXPECT_TRUE(members[0].ok());
  EXPECT_EQ(members[1].code(), StatusCode::kNotFound);
  EXPECT_EQ(members[2].code(), StatusCode::kPermissionDenied);
  EXPECT_TRUE(members[3].ok());
  EXPECT_EQ(std::memcmp(pool.base, blocks[0].data(), block()), 0);
  EXPECT_EQ(std::memcmp(pool.base + 3 * block(), blocks[1].data(), block()), 0);
  EXPECT_TRUE(pool.UntouchedOutside({0, 3 * block()}, block()));
  EXPECT_EQ(server_->stats().direct_device_bytes, 2 * block());
}

TEST_F(ServerDeviceTest, BadOffsetsRefuseTheWholeRequest) {
  Serve();
  auto c = Client();
  ASSERT_NE(c, nullptr);
  PutBlocks(*c, 2, 31);
  Pool pool = Pool::Make(4 * block());
  ASSERT_TRUE(c->Register(2, 0, pool.bytes, {pool.fd}).ok());
  const std::vector<BlockKey> keys = {KeyOf(0), KeyOf(1)};
  const std::vector<std::vector<uint64_t>> bad = {
      {0, 3 * block() + 1},       // one byte past the end
      {0, 4 * block()},           // at the end
      {0, ~uint64_t{0} - 16},     // offset + block overflows
      {0},                        // fewer offsets than keys
      {0, block(), 2 * block()},  // more
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    std::vector<Status> members;
    EXPECT_EQ(c->GetToDevice(10 + i, keys, bad[i], &members).code(), StatusCode::kInvalidArgument)
        << "case " << i;
    EXPECT_TRUE(members.empty());
  }
  EXPECT_TRUE(pool.UntouchedOutside({}, block()));
  EXPECT_EQ(server_->stats().direct_device_bytes, 0u);
  // The last block of the pool is fine.
  std::vector<Status> members;
  EXPECT_TRUE(c->GetToDevice(20, keys, {0, 3 * block()}, &members).ok());
}

TEST_F(ServerDeviceTest, GetToDeviceBeforeRegisterDeviceIsAFailedPrecondition) {
  Serve();
  auto c = Client();
  ASSERT_NE(c, nullptr);
  PutBlocks(*c, 1, 41);
  std::vector<Status> members;
  EXPECT_EQ(c->GetToDevice(2, {KeyOf(0)}, {0}, &members).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(members.empty());
}

TEST_F(ServerDeviceTest, RegistrationErrorsKeepTheConnection) {
  Serve();
  auto c = Client();
  ASSERT_NE(c, nullptr);
  const auto blocks = PutBlocks(*c, 1, 51);
  Pool unsealed = Pool::Make(4 * block(), /*seal=*/false);
  Pool small = Pool::Make(2 * block());
  Pool good = Pool::Make(4 * block());
  const int not_a_memfd = open("/dev/null", O_RDWR | O_CLOEXEC);
  ASSERT_GE(not_a_memfd, 0);
  EXPECT_EQ(c->Register(2, 0, good.bytes, {}).code(), StatusCode::kInvalidArgument);  // no fd
  EXPECT_EQ(c->Register(3, 0, unsealed.bytes, {unsealed.fd}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Register(4, 0, 4 * block(), {small.fd}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Register(5, 0, 0, {good.fd}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Register(6, 0, block() - 1, {good.fd}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Register(7, 0, block(), {not_a_memfd}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Register(8, 7, good.bytes, {good.fd}).code(), StatusCode::kInvalidArgument);
  ::close(not_a_memfd);
  EXPECT_EQ(server_->stats().device_pools_registered, 0u);
  ASSERT_TRUE(c->Register(9, 0, good.bytes, {good.fd}).ok());
  EXPECT_EQ(c->Register(10, 0, good.bytes, {good.fd}).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(server_->stats().device_pools_registered, 1u);
  // Still serving, into the first pool registered.
  std::vector<Status> members;
  ASSERT_TRUE(c->GetToDevice(11, {KeyOf(0)}, {block()}, &members).ok());
  EXPECT_EQ(std::memcmp(good.base + block(), blocks[0].data(), block()), 0);
  EXPECT_TRUE(c->Put(12, {KeyOf(5)}, Noise(block(), 52)).ok());
  c.reset();
  EXPECT_TRUE(Within10s([&] { return server_->stats().device_pools_registered == 0; }));
}

TEST_F(ServerDeviceTest, CudaPoolWithoutAGpuIsNotSupported) {
  if (cuda::HasDevice()) GTEST_SKIP() << "this process has a GPU: the refusal is not reachable";
  Serve();
  auto c = Client();
  ASSERT_NE(c, nullptr);
  const std::vector<uint8_t> uuid(16, 1), handle(64, 2);
  const Status s = c->Register(2, 1, 16 * block(), {}, uuid, handle);
  EXPECT_EQ(s.code(), StatusCode::kNotSupported) << s.ToString();
  EXPECT_NE(s.message().find("kvtierd has no GPU"), std::string::npos) << s.ToString();
  std::vector<Status> members;
  EXPECT_EQ(c->GetToDevice(3, {KeyOf(0)}, {0}, &members).code(), StatusCode::kFailedPrecondition);
}

TEST_F(ServerDeviceTest, OverTcpRegistrationIsNotSupported) {
  ServerOptions o;
  o.tcp_listen = "127.0.0.1:0";
  o.namespaces = {Namespace(0, "tok")};
  Serve(o);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(server_->tcp_port());
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  auto c = Peer::Dial(reinterpret_cast<sockaddr*>(&addr), sizeof(addr), AF_INET);
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(c->Hello(0, "tok").ok());
  EXPECT_EQ(c->Register(2, 0, 4 * block(), {}).code(), StatusCode::kNotSupported);
  EXPECT_EQ(
      c->Register(3, 1, 4 * block(), {}, std::vector<uint8_t>(16, 1), std::vector<uint8_t>(64, 2))
          .code(),
      StatusCode::kNotSupported);
}

TEST_F(ServerDeviceTest, DescriptorsSentWithOtherFramesAreClosed) {
  Serve();
  auto c = Client();
  ASSERT_NE(c, nullptr);
  PutBlocks(*c, 1, 61);  // the daemon's steady state
  const size_t before = OpenFds();
  for (uint32_t i = 0; i < 20; ++i) {
    const int fd = memfd_create("stray", MFD_CLOEXEC);
    ASSERT_GE(fd, 0);
    ASSERT_TRUE(c->Put(200 + i, {KeyOf(10 + i)}, Noise(block(), 600 + i), {fd}).ok());
    ::close(fd);  // ours; the daemon's copy is its to close
  }
  EXPECT_TRUE(Within10s([&] { return OpenFds() <= before; }))
      << OpenFds() << " descriptors open, " << before << " before";
  // A descriptor sent with a Put is not one a later RegisterDevice can take.
  Pool pool = Pool::Make(2 * block());
  ASSERT_TRUE(c->Put(300, {KeyOf(40)}, Noise(block(), 62), {pool.fd}).ok());
  EXPECT_EQ(c->Register(301, 0, pool.bytes, {}).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(c->Register(302, 0, pool.bytes, {pool.fd}).ok());
}

TEST_F(ServerDeviceTest, TooManyDescriptorsCloseTheConnection) {
  Serve();
  auto c = Client();
  ASSERT_NE(c, nullptr);
  const size_t before = OpenFds();
  std::vector<int> fds;
  for (int i = 0; i < 5; ++i) fds.push_back(memfd_create("flood", MFD_CLOEXEC));
  flatbuffers::FlatBufferBuilder fbb;
  wire::EmptyBuilder b(fbb);
  fbb.Finish(b.Finish());
  ASSERT_TRUE(c->Send(fbb, Opcode::kStats, 2, fds));
  for (int fd : fds) ::close(fd);
  std::optional<Frame> f = c->Next();
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(f->header.opcode, static_cast<uint16_t>(Opcode::kError));
  EXPECT_EQ(
      wire::FromWire(flatbuffers::GetRoot<wire::StatusReply>(f->body.data())->outcome()).code(),
      StatusCode::kInvalidArgument);
  EXPECT_TRUE(c->Closed());
  EXPECT_TRUE(Within10s([&] { return OpenFds() <= before; }));
  // Other clients go on.
  auto d = Client();
  ASSERT_NE(d, nullptr);
  EXPECT_TRUE(d->Put(3, {KeyOf(1)}, Noise(block(), 71)).ok());
}

TEST_F(ServerDeviceTest, ClientLeavingWithCopiesInFlight) {
  Serve();
  auto c = Client();
  ASSERT_NE(c, nullptr);
  PutBlocks(*c, 4, 81);
  const std::vector<BlockKey> keys = {KeyOf(0), KeyOf(1), KeyOf(2), KeyOf(3)};
  // Requests in flight at once name disjoint regions (PROTOCOL.md).
  constexpr uint64_t kRequests = 32;
  auto offsets_of = [&](uint64_t r) {
    std::vector<uint64_t> offsets;
    for (uint64_t j = 0; j < keys.size(); ++j) offsets.push_back((r * keys.size() + j) * block());
    return offsets;
  };
  {
    Pool pool = Pool::Make(kRequests * keys.size() * block());
    ASSERT_TRUE(c->Register(2, 0, pool.bytes, {pool.fd}).ok());
    for (uint64_t r = 0; r < kRequests; ++r) {
      ASSERT_TRUE(c->SendGetToDevice(10 + r, keys, offsets_of(r)));
    }
    // The client's mapping and descriptor go, then the connection, replies unread.
  }
  c->Hangup();
  EXPECT_TRUE(Within10s([&] { return server_->stats().device_pools_registered == 0; }));
  EXPECT_TRUE(Within10s([&] { return server_->stats().connections_open == 0; }));
  // The daemon still serves, and a new client's pool works.
  auto d = Client();
  ASSERT_NE(d, nullptr);
  Pool pool = Pool::Make(keys.size() * block());
  ASSERT_TRUE(d->Register(2, 0, pool.bytes, {pool.fd}).ok());
  std::vector<Status> members;
  EXPECT_TRUE(d->GetToDevice(3, keys, offsets_of(0), &members).ok());
}

}  // namespace
}  // namespace kvtier::server
