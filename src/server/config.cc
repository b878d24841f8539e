#include "src/server/config.h"

#include <arpa/inet.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <charconv>
#include <fstream>
#include <set>
#include <sstream>

namespace kvtier::server {
namespace {

// One TOML table being read: remembers the keys it was asked for, so that whatever is
// left over is reported as unknown.
class Section {
 public:
  Section(const toml::table* table, std::string name) : table_(table), name_(std::move(name)) {}

  bool present() const { return table_ != nullptr; }

  Status String(std::string_view key, std::string* out) {
    const toml::node* n = Find(key);
    if (n == nullptr) return Status::OK();
    if (!n->is_string()) return Wrong(key, "a string");
    *out = n->as_string()->get();
    return Status::OK();
  }
  Status Bool(std::string_view key, bool* out) {
    const toml::node* n = Find(key);
    if (n == nullptr) return Status::OK();
    if (!n->is_boolean()) return Wrong(key, "true or false");
    *out = n->as_boolean()->get();
    return Status::OK();
  }
  template <typename T>
  Status Integer(std::string_view key, T* out, uint64_t min, uint64_t max) {
    const toml::node* n = Find(key);
    if (n == nullptr) return Status::OK();
    if (!n->is_integer()) return Wrong(key, "an integer");
    const int64_t v = n->as_integer()->get();
    if (v < 0 || static_cast<uint64_t>(v) < min || static_cast<uint64_t>(v) > max) {
      return Status::InvalidArgument(Where(key) + " must be in [" + std::to_string(min) + ", " +
                                     std::to_string(max) + "], got " + std::to_string(v));
    }
    *out = static_cast<T>(v);
    return Status::OK();
  }
  // An integer of bytes, or a string with a unit.
  template <typename T>
  Status Bytes(std::string_view key, T* out) {
    const toml::node* n = Find(key);
    if (n == nullptr) return Status::OK();
    uint64_t v = 0;
    if (n->is_integer() && n->as_integer()->get() >= 0) {
      v = static_cast<uint64_t>(n->as_integer()->get());
    } else if (n->is_string()) {
      Result<uint64_t> parsed = ParseBytes(n->as_string()->get());
      if (!parsed.ok())
        return Status::InvalidArgument(Where(key) + ": " + parsed.status().message());
      v = *parsed;
    } else {
      return Wrong(key, "a size (bytes, or a string such as \"4GiB\")");
    }
    if (v > std::numeric_limits<T>::max())
      return Status::InvalidArgument(Where(key) + " is too large");
    *out = static_cast<T>(v);
    return Status::OK();
  }
  template <typename T>
  Status IntegerArray(std::string_view key, std::vector<T>* out) {
    const toml::node* n = Find(key);
    if (n == nullptr) return Status::OK();
    if (!n->is_array()) return Wrong(key, "an array of integers");
    out->clear();
    for (const toml::node& e : *n->as_array()) {
      if (!e.is_integer() || e.as_integer()->get() < 0 ||
          e.as_integer()->get() > std::numeric_limits<T>::max()) {
        return Wrong(key, "an array of non-negative integers");
      }
      out->push_back(static_cast<T>(e.as_integer()->get()));
    }
    return Status::OK();
  }
  Status StringArray(std::string_view key, std::vector<std::string>* out) {
    const toml::node* n = Find(key);
    if (n == nullptr) return Status::OK();
    if (!n->is_array()) return Wrong(key, "an array of strings");
    out->clear();
    for (const toml::node& e : *n->as_array()) {
      if (!e.is_string()) return Wrong(key, "an array of strings");
      out->push_back(e.as_string()->get());
    }
    return Status::OK();
  }
  // After every read: any key not asked for is a mistake.
  Status CheckUnknown() const {
    if (table_ == nullptr) return Status::OK();
    for (const auto& [key, value] : *table_) {
      if (!read_.contains(std::string(key.str()))) {
        return Status::InvalidArgument("unknown option " + Where(key.str()));
      }
    }
    return Status::OK();
  }

 private:
  const toml::node* Find(std::string_view key) {
    read_.insert(std::string(key));
    return table_ == nullptr ? nullptr : table_->get(key);
  }
  std::string Where(std::string_view key) const {
    return name_.empty() ? std::string(key) : name_ + "." + std::string(key);
  }
  Status Wrong(std::string_view key, std::string_view what) const {
    return Status::InvalidArgument(Where(key) + " must be " + std::string(what));
  }

  const toml::table* table_;
  std::string name_;
  std::set<std::string> read_;
};

Result<HostMemoryKind> ParseHostMemory(std::string_view s) {
  for (HostMemoryKind k : {HostMemoryKind::kAuto, HostMemoryKind::kCudaPinned,
                           HostMemoryKind::kLocked, HostMemoryKind::kPlain}) {
    if (HostMemoryKindName(k) == s) return k;
  }
  return Status::InvalidArgument(
      "store.host_memory must be auto, cuda-pinned, locked or plain, "
      "got \"" +
      std::string(s) + "\"");
}

Status ReadStore(Section& s, DaemonConfig* c) {
  StoreOptions& o = c->store;
  KVTIER_RETURN_IF_ERROR(s.String("directory", &o.directory));
  KVTIER_RETURN_IF_ERROR(s.Bytes("host_capacity", &o.host_capacity_bytes));
  KVTIER_RETURN_IF_ERROR(s.Bytes("disk_capacity", &o.disk_capacity_bytes));
  KVTIER_RETURN_IF_ERROR(s.StringArray("disk_paths", &o.disk_paths));
  KVTIER_RETURN_IF_ERROR(s.Integer("io_depth", &o.io_depth, 1, 4096));
  std::string sync;
  KVTIER_RETURN_IF_ERROR(s.String("sync", &sync));
  if (sync == "dsync") {
    o.sync = SyncPolicy::kDsync;
  } else if (!sync.empty() && sync != "batched-fdatasync") {
    return Status::InvalidArgument("store.sync must be batched-fdatasync or dsync, got \"" + sync +
                                   "\"");
  }
  KVTIER_RETURN_IF_ERROR(s.Bool("write_through", &o.write_through));
  std::string host_memory;
  KVTIER_RETURN_IF_ERROR(s.String("host_memory", &host_memory));
  if (!host_memory.empty()) {
    KVTIER_ASSIGN_OR_RETURN(o.host_memory, ParseHostMemory(host_memory));
  }
  KVTIER_RETURN_IF_ERROR(s.Integer("async_threads", &o.async_threads, 1, 1024));
  return s.CheckUnknown();
}

Status ReadLayout(Section& s, DaemonConfig* c) {
  std::string preset;
  KVTIER_RETURN_IF_ERROR(s.String("preset", &preset));
  ModelLayout& l = c->layout;
  if (preset == "llama3-8b") {
    l = ModelLayout::Llama3_8B();
  } else if (preset == "llama2-7b") {
    l = ModelLayout::Llama2_7B();
  } else if (!preset.empty()) {
    return Status::InvalidArgument("layout.preset must be llama3-8b or llama2-7b, got \"" + preset +
                                   "\"");
  }
  KVTIER_RETURN_IF_ERROR(s.Integer("layers", &l.num_layers, 1, 1u << 16));
  KVTIER_RETURN_IF_ERROR(s.Integer("kv_heads", &l.num_kv_heads, 1, 1u << 16));
  KVTIER_RETURN_IF_ERROR(s.Integer("query_heads", &l.num_query_heads, 1, 1u << 16));
  KVTIER_RETURN_IF_ERROR(s.Integer("head_dim", &l.head_dim, 1, 1u << 16));
  KVTIER_RETURN_IF_ERROR(s.Integer("block_tokens", &l.block_tokens, 1, 1u << 20));
  std::string dtype;
  KVTIER_RETURN_IF_ERROR(s.String("dtype", &dtype));
  if (!dtype.empty()) {
    KVTIER_ASSIGN_OR_RETURN(l.dtype, ParseDType(dtype));
  }
  return s.CheckUnknown();
}

Status ReadRetrieval(Section& s, DaemonConfig* c) {
  RetrievalOptions& r = c->store.retrieval;
  KVTIER_RETURN_IF_ERROR(s.Bool("enabled", &r.enabled));
  KVTIER_RETURN_IF_ERROR(s.Integer("top_k", &r.top_k, 1, 4096));
  KVTIER_RETURN_IF_ERROR(s.Integer("n_init", &r.n_init, 0, 1u << 30));
  KVTIER_RETURN_IF_ERROR(s.Integer("n_local", &r.n_local, 0, 1u << 30));
  KVTIER_RETURN_IF_ERROR(s.Integer("clusters", &r.clusters, 1, 64));
  KVTIER_RETURN_IF_ERROR(s.Integer("coarse_clusters", &r.coarse_clusters, 0, 64));
  KVTIER_RETURN_IF_ERROR(s.Integer("shortlist_factor", &r.shortlist_factor, 0, 1024));
  return s.CheckUnknown();
}

Status ReadServer(Section& s, DaemonConfig* c) {
  ServerOptions& o = c->server;
  KVTIER_RETURN_IF_ERROR(s.String("socket", &o.socket_path));
  KVTIER_RETURN_IF_ERROR(s.Integer("socket_mode", &o.socket_mode, 0, 0777));
  KVTIER_RETURN_IF_ERROR(s.String("tcp_listen", &o.tcp_listen));
  KVTIER_RETURN_IF_ERROR(s.Integer("io_threads", &o.io_threads, 1, 256));
  KVTIER_RETURN_IF_ERROR(s.Integer("worker_threads", &o.worker_threads, 1, 256));
  KVTIER_RETURN_IF_ERROR(s.Bytes("max_frame_bytes", &o.max_frame_bytes));
  KVTIER_RETURN_IF_ERROR(s.Integer("max_in_flight", &o.max_in_flight, 1, 65536));
  KVTIER_RETURN_IF_ERROR(s.Bytes("max_buffered_reply_bytes", &o.max_buffered_reply_bytes));
  KVTIER_RETURN_IF_ERROR(s.Integer("max_staging_blocks", &o.max_staging_blocks, 0, 1u << 20));
  return s.CheckUnknown();
}

Status ReadNamespace(Section& s, size_t index, DaemonConfig* c) {
  NamespaceConfig ns;
  const std::string where = "namespace[" + std::to_string(index) + "]";
  int64_t id = -1;
  KVTIER_RETURN_IF_ERROR(s.Integer("id", &id, 0, UINT32_MAX));
  if (id < 0) return Status::InvalidArgument(where + ".id is required");
  ns.id = static_cast<uint32_t>(id);
  ns.name = "ns" + std::to_string(ns.id);
  KVTIER_RETURN_IF_ERROR(s.String("name", &ns.name));
  KVTIER_RETURN_IF_ERROR(s.IntegerArray("uids", &ns.uids));
  KVTIER_RETURN_IF_ERROR(s.IntegerArray("gids", &ns.gids));
  KVTIER_RETURN_IF_ERROR(s.StringArray("tokens", &ns.tokens));
  NamespaceQuota quota;
  quota.namespace_id = ns.id;
  KVTIER_RETURN_IF_ERROR(s.Bytes("host_quota", &quota.host_bytes));
  KVTIER_RETURN_IF_ERROR(s.Bytes("disk_quota", &quota.disk_bytes));
  KVTIER_RETURN_IF_ERROR(s.CheckUnknown());
  for (const std::string& token : ns.tokens) {
    if (token.size() < 16) {
      return Status::InvalidArgument(where + ": a token must have at least 16 characters");
    }
  }
  if (quota.host_bytes != 0 || quota.disk_bytes != 0) c->store.quotas.push_back(quota);
  c->server.namespaces.push_back(std::move(ns));
  return Status::OK();
}

Status ReadLog(Section& s, DaemonConfig* c) {
  KVTIER_RETURN_IF_ERROR(s.String("level", &c->log_level));
  return s.CheckUnknown();
}

Status ReadMetrics(Section& s, DaemonConfig* c) {
  KVTIER_RETURN_IF_ERROR(s.String("listen", &c->metrics_listen));
  KVTIER_RETURN_IF_ERROR(s.Bool("allow_remote", &c->metrics_allow_remote));
  return s.CheckUnknown();
}

// "host:port" (IPv6 hosts in brackets) -> host, port.
Status SplitHostPort(std::string_view text, std::string* host, uint16_t* port) {
  const size_t colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size()) {
    return Status::InvalidArgument("\"" + std::string(text) + "\" is not host:port");
  }
  std::string_view h = text.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  const std::string_view p = text.substr(colon + 1);
  unsigned value = 0;
  const auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), value);
  if (ec != std::errc() || end != p.data() + p.size() || value > 65535) {
    return Status::InvalidArgument("bad port in \"" + std::string(text) + "\"");
  }
  *host = std::string(h);
  *port = static_cast<uint16_t>(value);
  return Status::OK();
}

}  // namespace

Result<uint64_t> ParseBytes(std::string_view text) {
  uint64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end == text.data()) {
    return Status::InvalidArgument("\"" + std::string(text) + "\" is not a size");
  }
  const std::string_view unit(end, text.data() + text.size() - end);
  int shift = 0;
  if (unit.empty() || unit == "B") {
    shift = 0;
  } else if (unit == "KiB") {
    shift = 10;
  } else if (unit == "MiB") {
    shift = 20;
  } else if (unit == "GiB") {
    shift = 30;
  } else if (unit == "TiB") {
    shift = 40;
  } else {
    return Status::InvalidArgument("unknown unit \"" + std::string(unit) + "\" in \"" +
                                   std::string(text) + "\" (B, KiB, MiB, GiB, TiB)");
  }
  if (shift > 0 && value > (UINT64_MAX >> shift)) {
    return Status::InvalidArgument("\"" + std::string(text) + "\" is too large");
  }
  return value << shift;
}

bool IsLoopbackAddress(std::string_view host_port) {
  std::string host;
  uint16_t port = 0;
  if (!SplitHostPort(host_port, &host, &port).ok()) return false;
  if (host == "localhost") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  return inet_pton(AF_INET6, host.c_str(), &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6);
}

Result<DaemonConfig> ParseConfig(std::string_view text, std::string_view source) {
  toml::table root;
  try {
    root = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    return Status::InvalidArgument(std::string(source) + ":" + where.str() + ": " +
                                   std::string(e.description()));
  }
  DaemonConfig c;
  c.layout = ModelLayout{};
  Section top(&root, "");
  const auto table = [&](std::string_view key) -> Result<const toml::table*> {
    const toml::node* n = root.get(key);
    if (n == nullptr) return static_cast<const toml::table*>(nullptr);
    if (!n->is_table())
      return Status::InvalidArgument("[" + std::string(key) + "] must be a table");
    return n->as_table();
  };
  const std::pair<std::string_view, Status (*)(Section&, DaemonConfig*)> sections[] = {
      {"store", ReadStore},   {"layout", ReadLayout},   {"retrieval", ReadRetrieval},
      {"server", ReadServer}, {"metrics", ReadMetrics}, {"log", ReadLog}};
  std::set<std::string> known;
  for (const auto& [name, read] : sections) {
    KVTIER_ASSIGN_OR_RETURN(const toml::table* t, table(name));
    known.insert(std::string(name));
    Section s(t, std::string(name));
    KVTIER_RETURN_IF_ERROR(read(s, &c));
  }
  known.insert("namespace");
  if (const toml::node* n = root.get("namespace")) {
    if (!n->is_array_of_tables()) {
      return Status::InvalidArgument("namespace must be an array of tables ([[namespace]])");
    }
    size_t i = 0;
    for (const toml::node& e : *n->as_array()) {
      Section s(e.as_table(), "namespace[" + std::to_string(i) + "]");
      KVTIER_RETURN_IF_ERROR(ReadNamespace(s, i++, &c));
    }
  }
  for (const auto& [key, value] : root) {
    if (!known.contains(std::string(key.str()))) {
      return Status::InvalidArgument("unknown section or option \"" + std::string(key.str()) +
                                     "\"");
    }
  }
  return c;
}

Result<DaemonConfig> LoadConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::NotFound("cannot read config file " + path);
  std::stringstream text;
  text << in.rdbuf();
  return ParseConfig(text.str(), path);
}

Status ValidateConfig(const DaemonConfig& c) {
  if (c.store.directory.empty()) {
    return Status::InvalidArgument(
        "store.directory is required (kvtierd serves a persistent store)");
  }
  KVTIER_RETURN_IF_ERROR(c.layout.Validate());
  std::set<uint32_t> ids;
  for (const NamespaceConfig& ns : c.server.namespaces) {
    if (!ids.insert(ns.id).second) {
      return Status::InvalidArgument("namespace id " + std::to_string(ns.id) + " appears twice");
    }
  }
  if (!c.server.tcp_listen.empty()) {
    std::string host;
    uint16_t port = 0;
    KVTIER_RETURN_IF_ERROR(SplitHostPort(c.server.tcp_listen, &host, &port));
    if (!IsLoopbackAddress(c.server.tcp_listen)) {
      if (c.server.namespaces.empty()) {
        return Status::InvalidArgument("server.tcp_listen " + c.server.tcp_listen +
                                       " is not loopback: configure namespaces with tokens");
      }
      for (const NamespaceConfig& ns : c.server.namespaces) {
        if (ns.tokens.empty()) {
          return Status::InvalidArgument("server.tcp_listen " + c.server.tcp_listen +
                                         " is not loopback and namespace " + ns.name +
                                         " has no token");
        }
      }
    }
  }
  if (!c.metrics_listen.empty()) {
    std::string host;
    uint16_t port = 0;
    KVTIER_RETURN_IF_ERROR(SplitHostPort(c.metrics_listen, &host, &port));
    if (!c.metrics_allow_remote && !IsLoopbackAddress(c.metrics_listen)) {
      return Status::InvalidArgument("metrics.listen " + c.metrics_listen +
                                     " is not loopback (set metrics.allow_remote = true)");
    }
  }
  static const std::set<std::string> levels = {"trace", "debug", "info", "warn", "error"};
  if (!levels.contains(c.log_level)) {
    return Status::InvalidArgument("log.level must be trace, debug, info, warn or error");
  }
  return Status::OK();
}

std::string DescribeConfig(const DaemonConfig& c) {
  std::ostringstream out;
  out << "store: " << c.store.directory << " host " << c.store.host_capacity_bytes << " B, disk "
      << c.store.disk_capacity_bytes << " B (when created), io_depth " << c.store.io_depth << ", "
      << HostMemoryKindName(c.store.host_memory) << " memory\n"
      << "layout: " << c.layout.ToString() << " (" << c.layout.BytesPerBlock()
      << " bytes per block)\n"
      << "retrieval: " << (c.store.retrieval.enabled ? "on" : "off") << "\n"
      << "socket: " << c.server.socket_path << " mode " << std::oct << c.server.socket_mode
      << std::dec << "\n"
      << "tcp: " << (c.server.tcp_listen.empty() ? "off" : c.server.tcp_listen) << "\n"
      << "metrics: " << (c.metrics_listen.empty() ? "off" : c.metrics_listen) << "\n"
      << "io_threads " << c.server.io_threads << ", worker_threads " << c.server.worker_threads
      << ", max_frame_bytes " << c.server.max_frame_bytes << ", max_in_flight "
      << c.server.max_in_flight << ", max_staging_blocks " << c.server.max_staging_blocks << "\n";
  if (c.server.namespaces.empty()) out << "namespaces: 0 (default), the daemon's uid only\n";
  for (const NamespaceConfig& ns : c.server.namespaces) {
    out << "namespace " << ns.id << " (" << ns.name << "): " << ns.uids.size() << " uids, "
        << ns.gids.size() << " gids, " << ns.tokens.size() << " tokens";
    for (const NamespaceQuota& q : c.store.quotas) {
      if (q.namespace_id == ns.id) {
        out << ", host quota " << q.host_bytes << " B, disk quota " << q.disk_bytes << " B";
      }
    }
    out << "\n";
  }
  return out.str();
}

}  // namespace kvtier::server
