// kvtierd's config file and its metrics endpoint (src/server/config.*, metrics.*).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "src/server/config.h"
#include "src/server/metrics.h"

namespace kvtier::server {
namespace {

TEST(DaemonConfigTest, TheExampleConfigParsesAndValidates) {
  auto c = LoadConfig(std::string(KVTIER_SOURCE_DIR) + "/src/server/kvtierd.example.toml");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->store.directory, "/var/lib/kvtier");
  EXPECT_EQ(c->store.host_capacity_bytes, uint64_t{4} << 30);
  EXPECT_EQ(c->layout.Fingerprint(), ModelLayout::Llama3_8B().Fingerprint());
  EXPECT_EQ(c->server.socket_mode, 0660u);
  EXPECT_EQ(c->server.max_frame_bytes, 64u << 20);
  ASSERT_EQ(c->server.namespaces.size(), 1u);
  EXPECT_EQ(c->server.namespaces[0].id, 1u);
  EXPECT_EQ(c->server.namespaces[0].uids, std::vector<uint32_t>{1000});
  ASSERT_EQ(c->store.quotas.size(), 1u);
  EXPECT_EQ(c->store.quotas[0].namespace_id, 1u);
  EXPECT_EQ(c->store.quotas[0].host_bytes, uint64_t{2} << 30);
  EXPECT_EQ(c->store.quotas[0].disk_bytes, 0u);
  EXPECT_TRUE(ValidateConfig(*c).ok()) << ValidateConfig(*c).ToString();
  EXPECT_NE(DescribeConfig(*c).find("namespace 1 (engines)"), std::string::npos);
}

TEST(DaemonConfigTest, DefaultsHoldForWhatTheFileLeavesOut) {
  auto c = ParseConfig("[store]\ndirectory = \"/tmp/x\"\n[layout]\npreset = \"llama2-7b\"\n", "t");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  const DaemonConfig defaults;
  EXPECT_EQ(c->store.host_capacity_bytes, StoreOptions{}.host_capacity_bytes);
  EXPECT_EQ(c->server.max_in_flight, ServerOptions{}.max_in_flight);
  EXPECT_EQ(c->metrics_listen, defaults.metrics_listen);
  EXPECT_TRUE(c->server.namespaces.empty());
  EXPECT_TRUE(ValidateConfig(*c).ok());
}

TEST(DaemonConfigTest, MistakesAreNamed) {
  struct Case {
    const char* text;
    const char* expect;  // a piece of the message
  };
  const Case cases[] = {
      {"[store]\ndirectry = \"/x\"\n", "store.directry"},
      {"[stor]\n", "stor"},
      {"[store]\nio_depth = 0\n", "store.io_depth"},
      {"[store]\nhost_capacity = \"4 GB\"\n", "host_capacity"},
      {"[store]\nhost_capacity = \"4GB\"\n", "unknown unit"},
      {"[store]\nsync = \"sometimes\"\n", "store.sync"},
      {"[layout]\npreset = \"gpt-5\"\n", "layout.preset"},
      {"[layout]\ndtype = \"fp7\"\n", "fp7"},
      {"[[namespace]]\nname = \"x\"\n", "id is required"},
      {"[[namespace]]\nid = 1\ntokens = [\"short\"]\n", "16 characters"},
      {"[server]\nsocket_mode = 0o1777\n", "socket_mode"},
      {"[store\n", "t:"},
  };
  for (const Case& c : cases) {
    auto parsed = ParseConfig(c.text, "t");
    ASSERT_FALSE(parsed.ok()) << c.text;
    EXPECT_EQ(parsed.status().code(), StatusCode::kInvalidArgument) << c.text;
    EXPECT_NE(parsed.status().message().find(c.expect), std::string::npos)
        << c.text << " -> " << parsed.status().ToString();
  }
}

TEST(DaemonConfigTest, ValidationRefusesUnsafeListeners) {
  auto c = ParseConfig(
      "[store]\ndirectory = \"/x\"\n[layout]\npreset = \"llama3-8b\"\n"
      "[server]\ntcp_listen = \"0.0.0.0:7070\"\n"
      "[[namespace]]\nid = 1\ntokens = [\"0123456789abcdef\"]\n"
      "[[namespace]]\nid = 2\nuids = [1000]\n",
      "t");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  Status s = ValidateConfig(*c);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("no token"), std::string::npos) << s.ToString();
  c->server.namespaces[1].tokens = {"fedcba9876543210"};
  EXPECT_TRUE(ValidateConfig(*c).ok());
  c->server.namespaces.clear();
  EXPECT_FALSE(ValidateConfig(*c).ok());  // non-loopback TCP with no namespaces at all
  c->server.tcp_listen = "127.0.0.1:7070";
  EXPECT_TRUE(ValidateConfig(*c).ok());
  c->metrics_listen = "10.0.0.1:9464";
  EXPECT_FALSE(ValidateConfig(*c).ok());
  c->metrics_allow_remote = true;
  EXPECT_TRUE(ValidateConfig(*c).ok());
  c->store.directory.clear();
  EXPECT_FALSE(ValidateConfig(*c).ok());
}

TEST(DaemonConfigTest, DuplicateNamespacesAreRefused) {
  auto c = ParseConfig(
      "[store]\ndirectory = \"/x\"\n[layout]\npreset = \"llama3-8b\"\n"
      "[[namespace]]\nid = 3\n[[namespace]]\nid = 3\n",
      "t");
  ASSERT_TRUE(c.ok());
  EXPECT_NE(ValidateConfig(*c).message().find("twice"), std::string::npos);
}

TEST(DaemonConfigTest, BytesAndAddresses) {
  EXPECT_EQ(*ParseBytes("4096"), 4096u);
  EXPECT_EQ(*ParseBytes("3KiB"), 3u << 10);
  EXPECT_EQ(*ParseBytes("2TiB"), uint64_t{2} << 40);
  EXPECT_FALSE(ParseBytes("").ok());
  EXPECT_FALSE(ParseBytes("GiB").ok());
  EXPECT_FALSE(ParseBytes("99999999999TiB").ok());
  EXPECT_TRUE(IsLoopbackAddress("127.0.0.1:1"));
  EXPECT_TRUE(IsLoopbackAddress("127.8.9.10:1"));
  EXPECT_TRUE(IsLoopbackAddress("[::1]:80"));
  EXPECT_TRUE(IsLoopbackAddress("localhost:80"));
  EXPECT_FALSE(IsLoopbackAddress("0.0.0.0:80"));
  EXPECT_FALSE(IsLoopbackAddress("10.1.2.3:80"));
  EXPECT_FALSE(IsLoopbackAddress("127.0.0.1"));
}

// --- Metrics ------------------------------------------------------------------------

// Every sample line is `name{labels} value` with a kvtier_ name declared by a TYPE line.
TEST(DaemonMetricsTest, TheExpositionIsWellFormed) {
  StoreStats s;
  s.gets = 10;
  s.disk_reads = 3;
  s.get_misses = 2;
  s.host_blocks = 4;
  s.host_slot_bytes = 4096;
  ServerStats server;
  server.reply_pinned_bytes = 524288;
  server.latency[2].buckets[0] = 5;   // Put: 5 fast
  server.latency[2].buckets[14] = 1;  // ... and one slow
  server.latency[2].count = 6;
  server.latency[2].sum_seconds = 2.5;
  NamespaceMetrics ns;
  ns.id = 1;
  ns.name = "a\"b";
  ns.usage.blocks = 7;
  ns.clients = 2;
  const std::string text = RenderMetrics(s, server, {ns});
  std::istringstream lines(text);
  std::string line;
  std::set<std::string> declared;
  int samples = 0;
  while (std::getline(lines, line)) {
    ASSERT_FALSE(line.empty());
    if (line.rfind("# TYPE ", 0) == 0) {
      declared.insert(line.substr(7, line.find(' ', 7) - 7));
      continue;
    }
    if (line[0] == '#') continue;
    ++samples;
    ASSERT_EQ(line.rfind("kvtier_", 0), 0u) << line;
    std::string name = line.substr(0, line.find_first_of("{ "));
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      const std::string sfx = suffix;
      if (name.size() > sfx.size() && name.ends_with(sfx) && !declared.contains(name)) {
        name = name.substr(0, name.size() - sfx.size());
      }
    }
    EXPECT_TRUE(declared.contains(name)) << line;
  }
  EXPECT_GT(samples, 40);
  EXPECT_NE(text.find("kvtier_hits_total{tier=\"host\"} 7\n"), std::string::npos);
  EXPECT_NE(text.find("kvtier_reply_pinned_bytes 524288\n"), std::string::npos);
  EXPECT_NE(text.find("kvtier_misses_total{tier=\"host\"} 5\n"), std::string::npos);
  EXPECT_NE(text.find("kvtier_tier_used_bytes{tier=\"host\"} 16384\n"), std::string::npos);
  EXPECT_NE(text.find("kvtier_connected_clients{namespace=\"a\\\"b\"} 2\n"), std::string::npos);
  // Buckets are cumulative and end at the count.
  EXPECT_NE(text.find("kvtier_request_duration_seconds_bucket{op=\"Put\",le=\"1e-05\"} 5\n"),
            std::string::npos);
  EXPECT_NE(text.find("kvtier_request_duration_seconds_bucket{op=\"Put\",le=\"1\"} 5\n"),
            std::string::npos);
  EXPECT_NE(text.find("kvtier_request_duration_seconds_bucket{op=\"Put\",le=\"+Inf\"} 6\n"),
            std::string::npos);
  EXPECT_NE(text.find("kvtier_request_duration_seconds_count{op=\"Put\"} 6\n"), std::string::npos);
}

// A blocking HTTP/1.1 GET against 127.0.0.1:port; the whole response.
std::string HttpGet(uint16_t port, const std::string& path, const std::string& method = "GET") {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "connect failed";
  }
  const std::string req = method + " " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

TEST(DaemonMetricsTest, TheHttpListenerServesMetricsAndHealth) {
  std::atomic<bool> healthy{true};
  std::atomic<int> renders{0};
  auto server = MetricsServer::Start(
      "127.0.0.1:0",
      [&] {
        ++renders;
        return std::string("kvtier_test_total 42\n");
      },
      [&] { return healthy.load(); });
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  const uint16_t port = (*server)->port();
  ASSERT_NE(port, 0);
  std::string r = HttpGet(port, "/metrics");
  EXPECT_EQ(r.rfind("HTTP/1.1 200", 0), 0u) << r;
  EXPECT_NE(r.find("text/plain; version=0.0.4"), std::string::npos);
  EXPECT_NE(r.find("\r\n\r\nkvtier_test_total 42\n"), std::string::npos);
  EXPECT_EQ(renders.load(), 1);
  EXPECT_EQ(HttpGet(port, "/healthz").rfind("HTTP/1.1 200", 0), 0u);
  healthy = false;
  EXPECT_EQ(HttpGet(port, "/healthz").rfind("HTTP/1.1 503", 0), 0u);
  EXPECT_EQ(HttpGet(port, "/nope").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(HttpGet(port, "/metrics", "POST").rfind("HTTP/1.1 405", 0), 0u);
  // Garbage instead of HTTP closes that connection; the listener goes on.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  (void)!write(fd, "\x01\x02garbage\r\n\r\n", 13);
  char buf[256];
  while (read(fd, buf, sizeof(buf)) > 0) {
  }
  close(fd);
  EXPECT_EQ(HttpGet(port, "/metrics").rfind("HTTP/1.1 200", 0), 0u);
  EXPECT_EQ(renders.load(), 2);
}

TEST(DaemonMetricsTest, BadListenAddressesAreRefused) {
  auto noop = [] { return std::string(); };
  auto yes = [] { return true; };
  EXPECT_EQ(MetricsServer::Start("nonsense", noop, yes).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MetricsServer::Start("127.0.0.1:99999", noop, yes).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MetricsServer::Start("not.an.ip:80", noop, yes).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvtier::server
