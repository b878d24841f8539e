// The sidecar client against a scripted daemon that speaks the protocol by hand, for
// what the real one does only by chance: replies out of order, an Error frame for one
// request, requests left unanswered when the connection closes, a handshake that never
// gets its answer. The fake grants no staging slots, so block bytes travel inline.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <future>
#include <thread>
#include <vector>

#include "src/server/protocol/codec.h"
#include "tests/client_test_util.h"
#include "tests/test_util.h"

namespace kvtier {
namespace {

using testing::Eventually;
using testing::Key;
using testing::SmallLayout;

struct Frame {
  wire::FrameHeader header;
  std::vector<uint8_t> body;
};

class FakeDaemon {
 public:
  explicit FakeDaemon(const std::string& path) {
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    EXPECT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(::listen(listen_fd_, 8), 0);
  }
  ~FakeDaemon() {
    CloseClient();
    ::close(listen_fd_);
  }

  void Accept() { fd_ = ::accept(listen_fd_, nullptr, nullptr); }
  void CloseClient() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  bool Read(Frame* f) {
    std::array<uint8_t, wire::kHeaderBytes> h;
    if (!ReadAll(h.data(), h.size())) return false;
    Result<wire::FrameHeader> header = wire::DecodeHeader(h, wire::kDefaultMaxFrameBytes, false);
    if (!header.ok()) return false;
    f->header = *header;
    f->body.resize(header->body_bytes);
    return ReadAll(f->body.data(), f->body.size()) &&
           wire::VerifyRequestBody(header->opcode, f->body).ok();
  }
  void Write(flatbuffers::FlatBufferBuilder& fbb, wire::Opcode opcode, uint64_t id) {
    const std::vector<uint8_t> frame = wire::MakeFrame(fbb, opcode, id, /*reply=*/true);
    ASSERT_EQ(::send(fd_, frame.data(), frame.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(frame.size()));
  }

  // Accepts a connection and answers its Hello: OK, no staging slots; `get_data_last`:
  // promises that a Get's reply ends with its blocks' bytes.
  void AcceptAndGreet(const ModelLayout& layout, bool get_data_last = false) {
    Accept();
    Frame hello;
    ASSERT_TRUE(Read(&hello));
    ASSERT_EQ(hello.header.opcode, static_cast<uint16_t>(wire::Opcode::kHello));
    const auto* req = flatbuffers::GetRoot<wire::HelloRequest>(hello.body.data());
    EXPECT_EQ(req->layout_fingerprint(), layout.Fingerprint());
    EXPECT_EQ(req->protocol_version(), wire::kProtocolVersion);
    flatbuffers::FlatBufferBuilder fbb;
    fbb.Finish(wire::CreateHelloReply(fbb, wire::ToWire(fbb, Status::OK()),
                                      fbb.CreateString("fake"), layout.BytesPerBlock(), 0, 0,
                                      wire::kDefaultMaxFrameBytes, get_data_last));
    Write(fbb, wire::Opcode::kHello, hello.header.request_id);
  }
  // Sends the first `bytes` bytes of a frame only.
  void WritePart(flatbuffers::FlatBufferBuilder& fbb, wire::Opcode opcode, uint64_t id,
                 size_t bytes) {
    const std::vector<uint8_t> frame = wire::MakeFrame(fbb, opcode, id, /*reply=*/true);
    ASSERT_LT(bytes, frame.size());
    ASSERT_EQ(::send(fd_, frame.data(), bytes, MSG_NOSIGNAL), static_cast<ssize_t>(bytes));
  }

 private:
  bool ReadAll(uint8_t* p, size_t n) {
    while (n > 0) {
      const ssize_t r = ::recv(fd_, p, n, 0);
      if (r <= 0) return false;
      p += r;
      n -= static_cast<size_t>(r);
    }
    return true;
  }

  int listen_fd_ = -1;
  int fd_ = -1;
};

// The block the fake serves for a key: bytes derived from its block index.
std::vector<std::byte> BlockFor(uint64_t bytes, uint32_t block) {
  std::vector<std::byte> v(bytes);
  for (uint64_t i = 0; i < bytes; ++i) v[i] = std::byte((i * 31 + block * 7 + 1) & 0xff);
  return v;
}

// Answers a Flush request with OK.
void AnswerFlush(FakeDaemon& daemon, const Frame& f) {
  ASSERT_EQ(f.header.opcode, static_cast<uint16_t>(wire::Opcode::kFlush));
  flatbuffers::FlatBufferBuilder fbb;
  fbb.Finish(wire::CreateStatusReply(fbb, wire::ToWire(fbb, Status::OK())));
  daemon.Write(fbb, wire::Opcode::kFlush, f.header.request_id);
}

// A Get's reply: `blocks` of the fake's bytes, the data vector last in the body (built
// first, 8-aligned: what HelloReply.get_data_last promises) unless `data_last` is false
// (built after a message, so the message's bytes come after it).
void BuildGetReply(flatbuffers::FlatBufferBuilder& fbb, uint64_t bytes,
                   const std::vector<uint32_t>& blocks, bool data_last) {
  flatbuffers::Offset<wire::Outcome> outcome;
  if (!data_last) outcome = wire::ToWire(fbb, Status::OK());
  fbb.ForceVectorAlignment(blocks.size() * bytes, 1, 8);
  uint8_t* out = nullptr;
  auto data = fbb.CreateUninitializedVector(blocks.size() * bytes, &out);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const std::vector<std::byte> v = BlockFor(bytes, blocks[i]);
    std::memcpy(out + i * bytes, v.data(), bytes);
  }
  if (data_last) outcome = wire::ToWire(fbb, Status::OK());
  if (!data_last) {
    // Something after the data in the body, whatever the builder's alignment.
    auto message = fbb.CreateString("a string built after the data");
    (void)message;
  }
  fbb.Finish(wire::CreateBatchReply(fbb, outcome, 0, data));
}

class ClientFakeDaemonTest : public ::testing::Test {
 protected:
  void SetUp() override { daemon_ = std::make_unique<FakeDaemon>(path_); }
  std::unique_ptr<Store> Open(uint32_t request_timeout_ms = 30000, bool get_data_last = false) {
    std::unique_ptr<Store> store;
    std::thread greeter([&] { daemon_->AcceptAndGreet(layout_, get_data_last); });
    StoreOptions o;
    o.sidecar.socket = path_;
    o.sidecar.connect_timeout_ms = 2000;
    o.sidecar.max_backoff_ms = 20;
    o.sidecar.request_timeout_ms = request_timeout_ms;
    auto s = Store::Open(o, layout_);
    greeter.join();
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (s.ok()) store = std::move(s).value();
    return store;
  }

  const ModelLayout layout_ = SmallLayout();
  testing::TempDir dir_;
  const std::string path_ = dir_.path() + "/fake.sock";
  std::unique_ptr<FakeDaemon> daemon_;
};

TEST_F(ClientFakeDaemonTest, RepliesOutOfOrderAreMatchedByRequestId) {
  auto store = Open();
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  const uint32_t n = 4;
  std::vector<std::vector<std::byte>> out(n, std::vector<std::byte>(bytes));
  std::vector<std::future<Status>> futures;
  for (uint32_t i = 0; i < n; ++i) {
    futures.push_back(store->GetAsync(Key(1, 0, 10 + i), out[i].data(), bytes));
  }
  std::vector<Frame> requests(n);
  for (Frame& f : requests) ASSERT_TRUE(daemon_->Read(&f));
  // Answer in reverse order; the third request gets an Error frame instead.
  for (int r = n - 1; r >= 0; --r) {
    const Frame& f = requests[r];
    ASSERT_EQ(f.header.opcode, static_cast<uint16_t>(wire::Opcode::kGet));
    const auto* get = flatbuffers::GetRoot<wire::GetRequest>(f.body.data());
    ASSERT_EQ(get->keys()->size(), 1u);
    EXPECT_TRUE(get->slots() == nullptr || get->slots()->size() == 0);  // inline
    const uint32_t block = get->keys()->Get(0)->block();
    flatbuffers::FlatBufferBuilder fbb;
    if (block == 12) {
      fbb.Finish(wire::CreateStatusReply(
          fbb, wire::ToWire(fbb, Status::InvalidArgument("scripted refusal"))));
      daemon_->Write(fbb, wire::Opcode::kError, f.header.request_id);
      continue;
    }
    const std::vector<std::byte> v = BlockFor(bytes, block);
    auto data = fbb.CreateVector(reinterpret_cast<const uint8_t*>(v.data()), v.size());
    fbb.Finish(wire::CreateBatchReply(fbb, wire::ToWire(fbb, Status::OK()), 0, data));
    daemon_->Write(fbb, wire::Opcode::kGet, f.header.request_id);
  }
  for (uint32_t i = 0; i < n; ++i) {
    ASSERT_EQ(futures[i].wait_for(std::chrono::seconds(10)), std::future_status::ready);
    const Status s = futures[i].get();
    if (10 + i == 12) {
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
      EXPECT_NE(s.message().find("scripted refusal"), std::string::npos);
    } else {
      ASSERT_TRUE(s.ok()) << s.ToString();
      EXPECT_EQ(out[i], BlockFor(bytes, 10 + i)) << i;
    }
  }
  EXPECT_TRUE(GetSidecarStatus(*store)->connected);  // an Error frame is not fatal
}

TEST_F(ClientFakeDaemonTest, RequestsLeftUnansweredFailUnavailableWhenTheConnectionCloses) {
  auto store = Open();
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  std::vector<std::byte> v = BlockFor(bytes, 1);
  std::future<Status> put = store->PutAsync(Key(1, 0, 1), v.data(), bytes);
  std::vector<std::byte> got(bytes);
  std::future<Status> get = store->GetAsync(Key(1, 0, 2), got.data(), bytes);
  std::future<Status> flush = std::async(std::launch::async, [&] { return store->Flush(); });
  std::future<bool> contains =
      std::async(std::launch::async, [&] { return store->Contains(Key(1, 0, 3)); });
  for (int i = 0; i < 4; ++i) {
    Frame f;
    ASSERT_TRUE(daemon_->Read(&f));
  }
  EXPECT_EQ(GetSidecarStatus(*store)->requests_in_flight, 4u);
  daemon_->CloseClient();
  for (std::future<Status>* f : {&put, &get, &flush}) {
    ASSERT_EQ(f->wait_for(std::chrono::seconds(10)), std::future_status::ready);
    EXPECT_EQ(f->get().code(), StatusCode::kUnavailable);
  }
  ASSERT_EQ(contains.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_FALSE(contains.get());
  ASSERT_TRUE(Eventually([&] { return !GetSidecarStatus(*store)->connected; }));
  EXPECT_EQ(store->Put(Key(1, 0, 1), v.data(), bytes).code(), StatusCode::kUnavailable);
  // The client comes back by itself once the daemon answers again.
  daemon_->AcceptAndGreet(layout_);
  ASSERT_TRUE(Eventually([&] { return GetSidecarStatus(*store)->connected; }));
  EXPECT_EQ(GetSidecarStatus(*store)->reconnects, 1u);
  EXPECT_EQ(GetSidecarStatus(*store)->daemon_version, "fake");
}

TEST_F(ClientFakeDaemonTest, ARequestWithoutAReplyTimesOutAndTheClientReconnects) {
  auto store = Open(/*request_timeout_ms=*/300);
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  // An asynchronous Get in flight alongside: it fails with the same status.
  std::vector<std::byte> got(bytes);
  std::future<Status> get = store->GetAsync(Key(1, 0, 2), got.data(), bytes);
  std::future<Status> flush = std::async(std::launch::async, [&] {
    const auto start = std::chrono::steady_clock::now();
    Status s = store->Flush();
    const auto waited = std::chrono::steady_clock::now() - start;
    EXPECT_GE(waited, std::chrono::milliseconds(250));
    EXPECT_LT(waited, std::chrono::seconds(3));
    return s;
  });
  for (int i = 0; i < 2; ++i) {
    Frame f;
    ASSERT_TRUE(daemon_->Read(&f));  // and never answered
  }
  ASSERT_EQ(flush.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  const Status s = flush.get();
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_NE(s.message().find("no reply to"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("within 300 ms; dropped the connection"), std::string::npos)
      << s.ToString();
  ASSERT_EQ(get.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_EQ(get.get().code(), StatusCode::kUnavailable);
  // The client dropped the connection: the daemon sees it closed.
  Frame none;
  EXPECT_FALSE(daemon_->Read(&none));
  daemon_->CloseClient();
  // It reconnects, and the next call works.
  daemon_->AcceptAndGreet(layout_);
  ASSERT_TRUE(Eventually([&] { return GetSidecarStatus(*store)->connected; }));
  EXPECT_EQ(GetSidecarStatus(*store)->reconnects, 1u);
  std::thread answer([&] {
    Frame f;
    ASSERT_TRUE(daemon_->Read(&f));
    AnswerFlush(*daemon_, f);
  });
  EXPECT_TRUE(store->Flush().ok());
  answer.join();
}

TEST_F(ClientFakeDaemonTest, ASlowReplyWithinTheTimeoutIsNotCut) {
  auto store = Open(/*request_timeout_ms=*/1000);
  ASSERT_NE(store, nullptr);
  for (int i = 0; i < 2; ++i) {
    std::thread answer([&] {
      Frame f;
      ASSERT_TRUE(daemon_->Read(&f));
      std::this_thread::sleep_for(std::chrono::milliseconds(400));
      AnswerFlush(*daemon_, f);
    });
    const Status s = store->Flush();
    answer.join();
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  EXPECT_TRUE(GetSidecarStatus(*store)->connected);
  EXPECT_EQ(GetSidecarStatus(*store)->reconnects, 0u);
}

TEST_F(ClientFakeDaemonTest, AHandshakeWithoutAnAnswerIsUnavailableAfterTheTimeout) {
  std::thread acceptor([&] { daemon_->Accept(); });  // accepts, never answers
  StoreOptions o;
  o.sidecar.socket = path_;
  o.sidecar.connect_timeout_ms = 300;
  const auto start = std::chrono::steady_clock::now();
  auto store = Store::Open(o, layout_);
  const auto waited = std::chrono::steady_clock::now() - start;
  acceptor.join();
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kUnavailable) << store.status().ToString();
  EXPECT_GE(waited, std::chrono::milliseconds(250));
  EXPECT_LT(waited, std::chrono::seconds(3));
}

TEST_F(ClientFakeDaemonTest, ARefusalInTheHelloReplyIsTheStatusOfOpen) {
  std::thread refuser([&] {
    daemon_->Accept();
    Frame hello;
    ASSERT_TRUE(daemon_->Read(&hello));
    flatbuffers::FlatBufferBuilder fbb;
    fbb.Finish(wire::CreateHelloReply(
        fbb, wire::ToWire(fbb, Status::QuotaExceeded("scripted: no more clients"))));
    daemon_->Write(fbb, wire::Opcode::kHello, hello.header.request_id);
  });
  StoreOptions o;
  o.sidecar.socket = path_;
  o.sidecar.connect_timeout_ms = 2000;
  auto store = Store::Open(o, layout_);
  refuser.join();
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kQuotaExceeded) << store.status().ToString();
  EXPECT_NE(store.status().message().find("scripted"), std::string::npos);
}

// A daemon that promises get_data_last: a Get's blocks are received straight into the
// caller's buffers, and a reply that breaks the promise is an error, never wrong bytes
// reported as OK.
TEST_F(ClientFakeDaemonTest, AGetReplyThatEndsWithItsBytesIsReceivedIntoTheBuffers) {
  auto store = Open(/*request_timeout_ms=*/30000, /*get_data_last=*/true);
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  for (const bool data_last : {true, false}) {
    std::vector<std::vector<std::byte>> out(2, std::vector<std::byte>(bytes, std::byte{0xAA}));
    std::vector<BlockRead> reads = {{Key(1, 0, 20), out[0].data(), bytes},
                                    {Key(1, 0, 21), out[1].data(), bytes}};
    std::vector<Status> statuses(2);
    std::future<Status> get = store->GetBatchAsync(reads, statuses);
    Frame f;
    ASSERT_TRUE(daemon_->Read(&f));
    ASSERT_EQ(f.header.opcode, static_cast<uint16_t>(wire::Opcode::kGet));
    ASSERT_EQ(flatbuffers::GetRoot<wire::GetRequest>(f.body.data())->keys()->size(), 2u);
    flatbuffers::FlatBufferBuilder fbb;
    BuildGetReply(fbb, bytes, {20, 21}, data_last);
    daemon_->Write(fbb, wire::Opcode::kGet, f.header.request_id);
    ASSERT_EQ(get.wait_for(std::chrono::seconds(10)), std::future_status::ready);
    const Status s = get.get();
    if (data_last) {
      ASSERT_TRUE(s.ok()) << s.ToString();
      EXPECT_EQ(out[0], BlockFor(bytes, 20));
      EXPECT_EQ(out[1], BlockFor(bytes, 21));
    } else {
      EXPECT_EQ(s.code(), StatusCode::kInternal) << s.ToString();
      EXPECT_NE(s.message().find("does not end with its blocks"), std::string::npos);
      for (const Status& m : statuses) EXPECT_EQ(m.code(), StatusCode::kInternal);
    }
  }
}

// The connection breaks while a Get's bytes are being received into the caller's
// buffers: the Get fails with Unavailable (its reader runs its completion; nothing waits
// forever) and the client reconnects.
TEST_F(ClientFakeDaemonTest, AGetReplyCutOffWhileItsBytesArriveFailsUnavailable) {
  auto store = Open(/*request_timeout_ms=*/30000, /*get_data_last=*/true);
  ASSERT_NE(store, nullptr);
  const uint64_t bytes = store->block_bytes();
  std::vector<std::byte> out(bytes);
  std::future<Status> get = store->GetAsync(Key(1, 0, 30), out.data(), bytes);
  std::future<Status> flush = std::async(std::launch::async, [&] { return store->Flush(); });
  Frame requests[2];
  ASSERT_TRUE(daemon_->Read(&requests[0]));
  ASSERT_TRUE(daemon_->Read(&requests[1]));
  const Frame& g = requests[0].header.opcode == static_cast<uint16_t>(wire::Opcode::kGet)
                       ? requests[0]
                       : requests[1];
  flatbuffers::FlatBufferBuilder fbb;
  BuildGetReply(fbb, bytes, {30}, /*data_last=*/true);
  // The header, the tables and half the block.
  daemon_->WritePart(fbb, wire::Opcode::kGet, g.header.request_id,
                     wire::kHeaderBytes + fbb.GetSize() - bytes / 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the reader is in the body
  daemon_->CloseClient();
  ASSERT_EQ(get.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_EQ(get.get().code(), StatusCode::kUnavailable);
  ASSERT_EQ(flush.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_EQ(flush.get().code(), StatusCode::kUnavailable);
  daemon_->AcceptAndGreet(layout_, /*get_data_last=*/true);
  ASSERT_TRUE(Eventually([&] { return GetSidecarStatus(*store)->connected; }));
}

}  // namespace
}  // namespace kvtier
