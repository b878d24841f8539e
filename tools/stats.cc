// kvtier stats --connect SOCKET: a running kvtierd's counters, asked through the sidecar
// client (the same Stats a client Store returns), as text or one JSON object.
//
// The handshake needs the model layout: from --dir (the store directory, read-only), from
// --layout (a preset), or, by default, from the directory that holds the socket (kvtierd's
// default socket is <store directory>/kvtierd.sock).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "kvtier/client.h"
#include "kvtier/store.h"
#include "tools/inspect.h"
#include "tools/json_writer.h"
#include "tools/store_reader.h"

namespace kvtier::tools {
namespace {

struct StatsConfig {
  std::string socket;
  std::string dir;
  std::string layout;
  std::string token;
  uint32_t namespace_id = 0;
  bool json = false;
};

Result<ModelLayout> FindLayout(const StatsConfig& c) {
  if (c.layout == "llama3-8b") return ModelLayout::Llama3_8B();
  if (c.layout == "llama2-7b") return ModelLayout::Llama2_7B();
  if (!c.layout.empty()) {
    return Status::InvalidArgument("--layout must be llama3-8b or llama2-7b, got " + c.layout);
  }
  const std::string dir =
      !c.dir.empty() ? c.dir : std::filesystem::path(c.socket).parent_path().string();
  Result<std::unique_ptr<StoreReader>> reader = StoreReader::Open(dir.empty() ? "." : dir);
  if (!reader.ok()) {
    return Status::InvalidArgument("cannot learn the layout from " + dir + " (" +
                                   reader.status().ToString() + "): give --dir or --layout");
  }
  return (*reader)->layout();
}

int RunStats(const StatsConfig& c) {
  Result<ModelLayout> layout = FindLayout(c);
  Status status = layout.status();
  std::unique_ptr<Store> store;
  if (status.ok()) {
    StoreOptions options;
    options.sidecar.socket = c.socket;
    options.sidecar.token = c.token;
    options.sidecar.namespace_id = c.namespace_id;
    options.sidecar.staging_blocks = 1;
    Result<std::unique_ptr<Store>> opened = Store::Open(options, *layout);
    status = opened.status();
    if (opened.ok()) store = std::move(*opened);
  }
  if (!status.ok()) {
    if (c.json) {
      JsonWriter w;
      w.BeginObject();
      w.Key("ok"), w.Bool(false);
      w.Key("error"), w.String(status.ToString());
      w.EndObject();
      std::puts(w.str().c_str());
    } else {
      std::fprintf(stderr, "kvtier stats: %s\n", status.ToString().c_str());
    }
    return 2;
  }
  const StoreStats s = store->Stats();
  const std::optional<SidecarStatus> link = GetSidecarStatus(*store);
  const std::pair<const char*, uint64_t> fields[] = {
      {"block_bytes", s.block_bytes},
      {"host_capacity_bytes", s.host_capacity_bytes},
      {"host_blocks", s.host_blocks},
      {"host_pinned_slots", s.host_pinned_slots},
      {"puts", s.puts},
      {"gets", s.gets},
      {"get_misses", s.get_misses},
      {"deletes", s.deletes},
      {"evictions", s.evictions},
      {"evictions_lost", s.evictions_lost},
      {"bytes_put", s.bytes_put},
      {"bytes_got", s.bytes_got},
      {"disk_capacity_bytes", s.disk_capacity_bytes},
      {"disk_used_bytes", s.disk_used_bytes},
      {"disk_blocks", s.disk_blocks},
      {"dirty_blocks", s.dirty_blocks},
      {"corrupt_blocks", s.corrupt_blocks},
      {"disk_reads", s.disk_reads},
      {"disk_writes", s.disk_writes},
      {"disk_read_errors", s.disk_read_errors},
      {"disk_write_errors", s.disk_write_errors},
      {"indexed_blocks", s.indexed_blocks},
      {"selects", s.selects},
  };
  if (c.json) {
    JsonWriter w;
    w.BeginObject();
    w.Key("ok"), w.Bool(true);
    w.Key("socket"), w.String(c.socket);
    w.Key("daemon_version"), w.String(link ? link->daemon_version : "");
    w.Key("layout"), w.String(layout->ToString());
    for (const auto& [name, value] : fields) w.Key(name), w.Uint(value);
    w.EndObject();
    std::puts(w.str().c_str());
  } else {
    std::printf("%s (%s), layout %s\n", c.socket.c_str(), link ? link->daemon_version.c_str() : "?",
                layout->ToString().c_str());
    for (const auto& [name, value] : fields)
      std::printf("  %-22s %llu\n", name, static_cast<unsigned long long>(value));
  }
  return 0;
}

}  // namespace

void AddStatsCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<StatsConfig>();
  CLI::App* cmd = app.add_subcommand("stats", "A running kvtierd's counters (through its socket)");
  cmd->footer(
      "Exit status: 0 fine, 2 the daemon could not be reached or refused the handshake.\n"
      "Example: kvtier stats --connect /var/lib/kvtier/kvtierd.sock --json\n");
  cmd->add_option("--connect", config->socket, "kvtierd's Unix socket")->required();
  cmd->add_option("--dir", config->dir,
                  "The store directory, for the layout (default: the socket's directory)");
  cmd->add_option("--layout", config->layout, "A layout preset instead: llama3-8b, llama2-7b");
  cmd->add_option("--namespace", config->namespace_id, "Namespace to connect in")
      ->capture_default_str();
  cmd->add_option("--token", config->token, "A token the daemon's config grants");
  cmd->add_flag("--json", config->json, "Print one JSON object");
  cmd->callback([config, exit_code] { *exit_code = RunStats(*config); });
}

}  // namespace kvtier::tools
