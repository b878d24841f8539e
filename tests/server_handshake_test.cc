// CheckHello: the protocol version, the layout fingerprint, and who may use which
// namespace (uid, gid, token; TCP by token only).
#include <gtest/gtest.h>

#include <string>

#include "src/server/handshake.h"

namespace kvtier::server {
namespace {

ModelLayout Layout() {
  return ModelLayout{.num_layers = 2,
                     .num_kv_heads = 2,
                     .num_query_heads = 4,
                     .head_dim = 64,
                     .dtype = DType::kF16,
                     .block_tokens = 16};
}

struct Hello {
  flatbuffers::FlatBufferBuilder fbb;
  const wire::HelloRequest* Build(uint32_t ns, const std::string& token,
                                  const ModelLayout& layout = Layout(),
                                  uint32_t version = wire::kProtocolVersion) {
    fbb.Clear();
    fbb.Finish(wire::CreateHelloRequestDirect(fbb, version, layout.Fingerprint(),
                                              layout.ToString().c_str(), ns, token.c_str(), 4,
                                              "test"));
    return flatbuffers::GetRoot<wire::HelloRequest>(fbb.GetBufferPointer());
  }
};

std::vector<NamespaceConfig> Namespaces() {
  NamespaceConfig a{.id = 1, .name = "a", .uids = {1000}, .gids = {}, .tokens = {"tok-a"}};
  NamespaceConfig b{.id = 2, .name = "b", .uids = {}, .gids = {500}, .tokens = {}};
  NamespaceConfig c{.id = 3, .name = "c", .uids = {}, .gids = {}, .tokens = {"x", "tok-c"}};
  return {a, b, c};
}

constexpr PeerIdentity kUnix1000{.unix_socket = true, .uid = 1000, .gid = 1000, .pid = 1};
constexpr PeerIdentity kUnix2000{.unix_socket = true, .uid = 2000, .gid = 500, .pid = 2};
constexpr PeerIdentity kTcp{.unix_socket = false, .uid = 1000, .gid = 500, .pid = 0};

TEST(HandshakeTest, UidGidAndTokenAdmit) {
  const auto ns = Namespaces();
  Hello h;
  auto r = CheckHello(*h.Build(1, ""), kUnix1000, ns, Layout());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)->id, 1u);
  r = CheckHello(*h.Build(2, ""), kUnix2000, ns, Layout());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ((*r)->name, "b");
  r = CheckHello(*h.Build(1, "tok-a"), kUnix2000, ns, Layout());
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  r = CheckHello(*h.Build(3, "tok-c"), kUnix2000, ns, Layout());
  EXPECT_TRUE(r.ok()) << r.status().ToString();
}

TEST(HandshakeTest, RefusesOthers) {
  const auto ns = Namespaces();
  Hello h;
  EXPECT_EQ(CheckHello(*h.Build(1, ""), kUnix2000, ns, Layout()).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(CheckHello(*h.Build(1, "tok-c"), kUnix2000, ns, Layout()).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(CheckHello(*h.Build(1, "tok-"), kUnix2000, ns, Layout()).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(CheckHello(*h.Build(2, ""), kUnix1000, ns, Layout()).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(CheckHello(*h.Build(9, "tok-a"), kUnix1000, ns, Layout()).status().code(),
            StatusCode::kPermissionDenied);
}

TEST(HandshakeTest, TcpNeedsAToken) {
  const auto ns = Namespaces();
  Hello h;
  // uid 1000 and gid 500 would admit it on the Unix socket; over TCP they mean nothing.
  EXPECT_EQ(CheckHello(*h.Build(1, ""), kTcp, ns, Layout()).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_EQ(CheckHello(*h.Build(2, ""), kTcp, ns, Layout()).status().code(),
            StatusCode::kPermissionDenied);
  EXPECT_TRUE(CheckHello(*h.Build(1, "tok-a"), kTcp, ns, Layout()).ok());
}

TEST(HandshakeTest, LayoutMismatchNamesBothLayouts) {
  const auto ns = Namespaces();
  Hello h;
  ModelLayout other = Layout();
  other.head_dim = 128;
  auto r = CheckHello(*h.Build(1, ""), kUnix1000, ns, Layout()).status();
  EXPECT_TRUE(r.ok());
  const Status s = CheckHello(*h.Build(1, "", other), kUnix1000, ns, Layout()).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find(other.ToString()), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(Layout().ToString()), std::string::npos) << s.message();
}

TEST(HandshakeTest, ProtocolVersion) {
  const auto ns = Namespaces();
  Hello h;
  EXPECT_EQ(CheckHello(*h.Build(1, "", Layout(), 2), kUnix1000, ns, Layout()).status().code(),
            StatusCode::kFailedPrecondition);
}

TEST(HandshakeTest, AHelloWithNoFieldsIsRefusedNotCrashed) {
  flatbuffers::FlatBufferBuilder fbb;
  wire::HelloRequestBuilder b(fbb);
  fbb.Finish(b.Finish());
  const auto* hello = flatbuffers::GetRoot<wire::HelloRequest>(fbb.GetBufferPointer());
  EXPECT_FALSE(CheckHello(*hello, kUnix1000, Namespaces(), Layout()).ok());
}

TEST(HandshakeTest, DefaultNamespaceIsTheDaemonsUid) {
  ServerOptions o;
  const auto ns = EffectiveNamespaces(o, 4242);
  ASSERT_EQ(ns.size(), 1u);
  EXPECT_EQ(ns[0].id, 0u);
  EXPECT_EQ(ns[0].name, "default");
  Hello h;
  EXPECT_TRUE(CheckHello(*h.Build(0, ""), {true, 4242, 1, 1}, ns, Layout()).ok());
  EXPECT_FALSE(CheckHello(*h.Build(0, ""), {true, 4243, 1, 1}, ns, Layout()).ok());
  o.namespaces = Namespaces();
  EXPECT_EQ(EffectiveNamespaces(o, 4242).size(), 3u);
}

}  // namespace
}  // namespace kvtier::server
