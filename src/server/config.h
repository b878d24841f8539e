// kvtierd's configuration: a TOML file (toml++), with command-line overrides. This
// struct is the one place every option is documented with its default;
// kvtierd.example.toml shows each in the file's form. Sizes are integers (bytes) or
// strings with a binary unit ("4GiB", "512MiB", "64KiB").
#ifndef KVTIER_SERVER_CONFIG_H_
#define KVTIER_SERVER_CONFIG_H_

#include <string>
#include <string_view>

#include "kvtier/layout.h"
#include "kvtier/options.h"
#include "kvtier/status.h"
#include "src/server/server.h"

namespace kvtier::server {

struct DaemonConfig {
  // [store]: the one store the daemon serves.
  //   directory        required: the store directory (catalog, slab files, lock file)
  //   host_capacity    bytes of the host tier; default "4GiB"
  //   disk_capacity    bytes of slab files when the store is created; default "16GiB"
  //   disk_paths       directories for the slab files; default [] (in `directory`)
  //   io_depth         io_uring queue depth; default 64
  //   sync             "batched-fdatasync" (default) or "dsync"
  //   write_through    default true
  //   host_memory      "auto" (default), "cuda-pinned", "locked", "plain"
  //   async_threads    threads that run block transfers; default 2
  // [layout]: the model's KV layout; every client must present the same (Hello).
  //   preset           "llama3-8b" or "llama2-7b"; or give the fields:
  //   layers, kv_heads, query_heads, head_dim, dtype ("bf16", "fp16", ...),
  //   block_tokens (default 128)
  // [retrieval]: decode-time retrieval (Select through the daemon).
  //   enabled (false), top_k (16), n_init (128), n_local (4096), clusters (12),
  //   coarse_clusters (2), shortlist_factor (3) (kvtier/retrieval.h)
  // [[namespace]] entries: quotas live in store.quotas, the rest in server.namespaces.
  //   id (required), name (default "ns<id>"), uids [], gids [], tokens [],
  //   host_quota (0: none), disk_quota (0: none)
  //   No entry: namespace 0 ("default"), open to the daemon's own uid only.
  StoreOptions store;
  ModelLayout layout;
  // [server]
  //   socket           the Unix socket; default "<directory>/kvtierd.sock"
  //   socket_mode      default 0o660
  //   tcp_listen       "host:port"; default "" (no TCP). Loopback unless the operator
  //                    says otherwise; a non-loopback address needs tokens everywhere.
  //   io_threads (2), worker_threads (2), max_frame_bytes ("64MiB"),
  //   max_in_flight (256), max_buffered_reply_bytes ("64MiB"), max_staging_blocks (256)
  ServerOptions server;
  // [metrics]
  //   listen           "host:port" of the HTTP listener (/metrics, /healthz);
  //                    default "127.0.0.1:9464"; "" disables it. Loopback only unless
  //                    allow_remote = true.
  std::string metrics_listen = "127.0.0.1:9464";
  bool metrics_allow_remote = false;
  // [log]
  //   level            "trace", "debug", "info" (default), "warn", "error"
  std::string log_level = "info";
};

// Parses `text` (the contents of `source`, named in error messages). Unknown keys and
// sections are errors (a typo must not silently leave a default in force).
Result<DaemonConfig> ParseConfig(std::string_view text, std::string_view source);
Result<DaemonConfig> LoadConfig(const std::string& path);
// The checks that need the whole config (after overrides): a directory, a layout, the
// TCP and metrics addresses, namespaces (unique ids, tokens for non-loopback TCP).
Status ValidateConfig(const DaemonConfig& config);
// A human-readable summary (kvtierd --check-config prints it).
std::string DescribeConfig(const DaemonConfig& config);

// "4GiB" -> 4294967296; plain digits are bytes. InvalidArgument otherwise.
Result<uint64_t> ParseBytes(std::string_view text);
// Whether "host:port" names a loopback address (127.0.0.0/8, ::1, "localhost").
bool IsLoopbackAddress(std::string_view host_port);

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_CONFIG_H_
