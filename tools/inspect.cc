// `kvtier info` and `kvtier ls`, and what the inspection commands share.
#include "tools/inspect.h"

#include <cerrno>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "storage/extent_allocator.h"
#include "tools/json_writer.h"
#include "tools/store_reader.h"

namespace kvtier::tools {

int InspectExitCode(const Status& status) {
  if (status.ok()) return 0;
  return status.code() == StatusCode::kCorruption ? 1 : 2;
}

int ReportInspectError(std::string_view command, const Status& status, bool json) {
  if (json) {
    JsonWriter w;
    w.BeginObject();
    w.Key("ok"), w.Bool(false);
    w.Key("error"), w.BeginObject();
    w.Key("code"), w.String(StatusCodeName(status.code()));
    w.Key("message"), w.String(status.message());
    w.EndObject();
    w.EndObject();
    std::printf("%s\n", w.str().c_str());
  } else {
    std::fprintf(stderr, "kvtier %.*s: %s\n", static_cast<int>(command.size()), command.data(),
                 status.ToString().c_str());
  }
  return InspectExitCode(status);
}

Result<SequenceId> ParseSequenceArg(const std::string& text) {
  if (text.size() == 32) return SequenceId::ParseHex(text);
  if (text.empty() || text.size() > 20 ||
      text.find_first_not_of("0123456789") != std::string::npos) {
    return Status::InvalidArgument("sequence '" + text +
                                   "': expected a decimal number or 32 hex digits");
  }
  errno = 0;
  const unsigned long long v = std::strtoull(text.c_str(), nullptr, 10);
  if (errno == ERANGE) return Status::InvalidArgument("sequence '" + text + "' is out of range");
  return SequenceId::FromU64(v);
}

std::string Hex64(uint64_t value) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, value);
  return buf;
}

namespace {

// ---- info -------------------------------------------------------------------------------

struct InfoConfig {
  std::string dir;
  bool json = false;
};

struct InfoCounts {
  uint64_t namespaces = 0, sequences = 0, blocks = 0, corrupt_blocks = 0;
  uint64_t misplaced_blocks = 0;  // entries that own no extent by the store's rule
  uint64_t representatives = 0, representatives_without_block = 0, representatives_bytes = 0;
  uint64_t generation_max = 0;
};

int RunInfo(const InfoConfig& config) {
  Result<std::unique_ptr<StoreReader>> opened = StoreReader::Open(config.dir);
  if (!opened.ok()) return ReportInspectError("info", opened.status(), config.json);
  StoreReader& reader = **opened;
  const CatalogMeta& meta = reader.meta();

  // The free-extent map as the store rebuilds it at open (Store::Impl::RecoverLocked):
  // in key order, an entry owns its extent when its sizes are the layout's, its file
  // exists and the extent overlaps no earlier entry's.
  std::vector<uint64_t> sizes;
  for (const SlabFileInfo& f : meta.slab_files) sizes.push_back(f.bytes);
  ExtentAllocator extents(sizes);
  InfoCounts c;
  std::set<uint32_t> namespaces;
  std::vector<BlockKey> keys;  // key order, for the representatives' merge join
  bool have_prev = false;
  BlockKey prev;
  Status scan = reader.ForEachBlock([&](const BlockKey& key, const DiskLocation& loc) {
    ++c.blocks;
    namespaces.insert(key.namespace_id);
    if (!have_prev || prev.namespace_id != key.namespace_id || prev.sequence != key.sequence) {
      ++c.sequences;
    }
    have_prev = true;
    prev = key;
    if (loc.flags & kBlockCorrupt) ++c.corrupt_blocks;
    const bool owned = loc.length == reader.extent_bytes() &&
                       loc.data_bytes == reader.block_bytes() && loc.file < extents.file_count() &&
                       extents.MarkUsed(Extent{loc.file, loc.offset, loc.length}).ok();
    if (!owned) ++c.misplaced_blocks;
    c.generation_max = std::max(c.generation_max, loc.generation);
    keys.push_back(key);
    return true;
  });
  c.namespaces = namespaces.size();
  size_t k = 0;
  Status reps = scan.ok() ? reader.ForEachRepresentatives(
                                [&](const BlockKey& key, std::span<const std::byte> bytes) {
                                  ++c.representatives;
                                  c.representatives_bytes += bytes.size();
                                  while (k < keys.size() && keys[k] < key) ++k;
                                  if (k == keys.size() || keys[k] != key) {
                                    ++c.representatives_without_block;
                                  }
                                  return true;
                                })
                          : Status::OK();
  Status status = !scan.ok() ? scan : reps;
  if (!status.ok()) return ReportInspectError("info", status, config.json);

  uint64_t missing_files = 0, wrong_size_files = 0, capacity = 0;
  for (const SlabFileState& f : reader.slab_files()) {
    capacity += f.info.bytes;
    if (!f.exists) ++missing_files;
    if (f.exists && f.actual_bytes != f.info.bytes) ++wrong_size_files;
  }
  const uint64_t free_bytes = extents.free_bytes();
  const uint64_t largest = extents.largest_free_extent();
  // 0 when the free space is one extent; towards 1 as it splits into small pieces.
  const double fragmentation =
      free_bytes == 0 ? 0.0 : 1.0 - static_cast<double>(largest) / static_cast<double>(free_bytes);
  const bool problems =
      missing_files + wrong_size_files + c.misplaced_blocks + c.representatives_without_block > 0;
  const ModelLayout& l = meta.layout;

  if (config.json) {
    JsonWriter w;
    w.BeginObject();
    w.Key("ok"), w.Bool(!problems);
    w.Key("dir"), w.String(config.dir);
    w.Key("locked"), w.Bool(reader.locked());
    w.Key("format_version"), w.Uint(meta.format_version);
    w.Key("layout"), w.BeginObject();
    w.Key("layers"), w.Uint(l.num_layers);
    w.Key("kv_heads"), w.Uint(l.num_kv_heads);
    w.Key("query_heads"), w.Uint(l.num_query_heads);
    w.Key("head_dim"), w.Uint(l.head_dim);
    w.Key("dtype"), w.String(DTypeName(l.dtype));
    w.Key("block_tokens"), w.Uint(l.block_tokens);
    w.EndObject();
    w.Key("fingerprint"), w.String(Hex64(meta.layout_fingerprint));
    w.Key("block_bytes"), w.Uint(reader.block_bytes());
    w.Key("extent_bytes"), w.Uint(reader.extent_bytes());
    w.Key("tiers"), w.BeginArray();
    w.BeginObject();
    w.Key("tier"), w.String("disk");
    w.Key("capacity_bytes"), w.Uint(capacity);
    w.Key("slab_files"), w.BeginArray();
    for (const SlabFileState& f : reader.slab_files()) {
      w.BeginObject();
      w.Key("path"), w.String(f.info.path);
      w.Key("bytes"), w.Uint(f.info.bytes);
      w.Key("exists"), w.Bool(f.exists);
      w.Key("actual_bytes"), w.Uint(f.actual_bytes);
      w.EndObject();
    }
    w.EndArray();
    w.EndObject();
    w.EndArray();
    w.Key("used_bytes"), w.Uint(extents.used_bytes());
    w.Key("free_bytes"), w.Uint(free_bytes);
    w.Key("free_extents"), w.Uint(extents.free_extent_count());
    w.Key("largest_free_extent_bytes"), w.Uint(largest);
    w.Key("fragmentation"), w.Number(fragmentation);
    w.Key("namespaces"), w.Uint(c.namespaces);
    w.Key("sequences"), w.Uint(c.sequences);
    w.Key("blocks"), w.Uint(c.blocks);
    w.Key("corrupt_blocks"), w.Uint(c.corrupt_blocks);
    w.Key("misplaced_blocks"), w.Uint(c.misplaced_blocks);
    w.Key("representatives"), w.Uint(c.representatives);
    w.Key("representatives_bytes"), w.Uint(c.representatives_bytes);
    w.Key("representatives_without_block"), w.Uint(c.representatives_without_block);
    w.Key("max_generation"), w.Uint(c.generation_max);
    w.Key("missing_slab_files"), w.Uint(missing_files);
    w.Key("wrong_size_slab_files"), w.Uint(wrong_size_files);
    w.EndObject();
    std::printf("%s\n", w.str().c_str());
    return problems ? 1 : 0;
  }

  auto mib = [](uint64_t b) { return static_cast<double>(b) / (1 << 20); };
  std::printf("store           %s%s\n", config.dir.c_str(),
              reader.locked() ? "  (open in another process: read-only view)" : "");
  std::printf("format version  %u\n", meta.format_version);
  std::printf("layout          %s\n", l.ToString().c_str());
  std::printf("fingerprint     %s\n", Hex64(meta.layout_fingerprint).c_str());
  std::printf("block           %" PRIu64 " bytes (extent %" PRIu64 ")\n", reader.block_bytes(),
              reader.extent_bytes());
  std::printf(
      "tiers           disk: %.1f MiB in %zu slab file(s) (host and GPU tiers: process memory)\n",
      mib(capacity), reader.slab_files().size());
  for (size_t i = 0; i < reader.slab_files().size(); ++i) {
    const SlabFileState& f = reader.slab_files()[i];
    std::printf("  slab %zu        %s  %" PRIu64 " bytes%s\n", i, f.info.path.c_str(), f.info.bytes,
                !f.exists                        ? "  MISSING"
                : f.actual_bytes != f.info.bytes ? "  WRONG SIZE"
                                                 : "");
  }
  std::printf("used / free     %.1f MiB / %.1f MiB\n", mib(extents.used_bytes()), mib(free_bytes));
  std::printf("free extents    %" PRIu64 ", largest %.1f MiB, fragmentation %.3f\n",
              extents.free_extent_count(), mib(largest), fragmentation);
  std::printf("namespaces      %" PRIu64 "\n", c.namespaces);
  std::printf("sequences       %" PRIu64 "\n", c.sequences);
  std::printf("blocks          %" PRIu64 " (%" PRIu64 " quarantined as corrupt, %" PRIu64
              " misplaced)\n",
              c.blocks, c.corrupt_blocks, c.misplaced_blocks);
  std::printf("representatives %" PRIu64 " (%.1f KiB, %" PRIu64 " without a block)\n",
              c.representatives, static_cast<double>(c.representatives_bytes) / 1024,
              c.representatives_without_block);
  if (problems) std::printf("problems found: run `kvtier verify %s`\n", config.dir.c_str());
  return problems ? 1 : 0;
}

// ---- ls ---------------------------------------------------------------------------------

struct LsConfig {
  std::string dir;
  int64_t namespace_id = -1;  // -1: every one
  std::string sequence;
  int64_t layer = -1;  // -1: every one
  bool json = false;
};

int RunLs(const LsConfig& config) {
  std::optional<SequenceId> sequence;
  if (!config.sequence.empty()) {
    Result<SequenceId> s = ParseSequenceArg(config.sequence);
    if (!s.ok()) return ReportInspectError("ls", s.status(), config.json);
    sequence = *s;
  }
  Result<std::unique_ptr<StoreReader>> opened = StoreReader::Open(config.dir);
  if (!opened.ok()) return ReportInspectError("ls", opened.status(), config.json);
  StoreReader& reader = **opened;

  // Rows go out as they are scanned (stdout is block-buffered when piped), so `| head`
  // answers at once; a closed pipe stops the scan.
  std::signal(SIGPIPE, SIG_IGN);
  uint64_t rows = 0;
  bool broken_pipe = false;
  if (config.json) {
    std::printf("{\"dir\":");
    JsonWriter dir;
    dir.String(config.dir);
    std::printf("%s,\"locked\":%s,\"blocks\":[", dir.str().c_str(),
                reader.locked() ? "true" : "false");
  } else {
    std::printf("%-42s %4s %12s %8s %16s %10s %s\n", "KEY (ns/sequence/layer/block)", "FILE",
                "OFFSET", "LENGTH", "CHECKSUM", "GENERATION", "FLAGS");
  }
  auto visit = [&](const BlockKey& key, const DiskLocation& loc) {
    if (config.namespace_id >= 0 && key.namespace_id != config.namespace_id) return true;
    if (sequence && key.sequence != *sequence) return true;
    if (config.layer >= 0 && key.layer != config.layer) return true;
    int n;
    if (config.json) {
      JsonWriter w;
      w.BeginObject();
      w.Key("key"), w.String(key.ToString());
      w.Key("namespace"), w.Uint(key.namespace_id);
      w.Key("sequence"), w.String(key.sequence.ToHex());
      w.Key("layer"), w.Uint(key.layer);
      w.Key("block"), w.Uint(key.block);
      w.Key("file"), w.Uint(loc.file);
      w.Key("offset"), w.Uint(loc.offset);
      w.Key("length"), w.Uint(loc.length);
      w.Key("data_bytes"), w.Uint(loc.data_bytes);
      w.Key("checksum"), w.String(Hex64(loc.checksum));
      w.Key("generation"), w.Uint(loc.generation);
      w.Key("flags"), w.Uint(loc.flags);
      w.Key("corrupt"), w.Bool((loc.flags & kBlockCorrupt) != 0);
      w.EndObject();
      n = std::printf("%s%s", rows > 0 ? "," : "", w.str().c_str());
    } else {
      n = std::printf("%-42s %4u %12" PRIu64 " %8" PRIu64 " %16s %10" PRIu64 " %s\n",
                      key.ToString().c_str(), loc.file, loc.offset, loc.length,
                      Hex64(loc.checksum).c_str(), loc.generation,
                      (loc.flags & kBlockCorrupt) ? "corrupt" : "-");
    }
    ++rows;
    if (n < 0 || std::ferror(stdout)) {
      broken_pipe = true;
      return false;
    }
    return true;
  };
  Status s = config.namespace_id >= 0 && sequence
                 ? reader.ForEachBlockOfSequence(static_cast<uint32_t>(config.namespace_id),
                                                 *sequence, visit)
                 : reader.ForEachBlock(visit);
  if (broken_pipe) return 0;  // the reader went away (`| head`): not an error
  if (config.json) {
    std::printf("],\"count\":%" PRIu64 ",\"ok\":%s", rows, s.ok() ? "true" : "false");
    if (!s.ok()) {
      JsonWriter w;
      w.BeginObject();
      w.Key("code"), w.String(StatusCodeName(s.code()));
      w.Key("message"), w.String(s.message());
      w.EndObject();
      std::printf(",\"error\":%s", w.str().c_str());
    }
    std::printf("}\n");
  }
  if (std::fflush(stdout) != 0) return 0;
  if (!s.ok()) {
    if (!config.json) std::fprintf(stderr, "kvtier ls: %s\n", s.ToString().c_str());
    return InspectExitCode(s);
  }
  return 0;
}

}  // namespace

void AddInfoCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<InfoConfig>();
  CLI::App* cmd = app.add_subcommand(
      "info", "Summarize a store directory: layout, slab files, space, counts (read-only)");
  cmd->footer(
      "Works while kvtierd or another process has the store open (read-only view).\n"
      "Exit status: 0 fine, 1 a problem was found (misplaced entries, missing or resized slab "
      "files, a damaged catalog), 2 usage or I/O error.\n"
      "Example: kvtier info /nvme/kvtier --json\n");
  cmd->add_option("DIR", config->dir, "Store directory")->required();
  cmd->add_flag("--json", config->json, "Print one JSON object");
  cmd->callback([config, exit_code] { *exit_code = RunInfo(*config); });
}

void AddLsCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<LsConfig>();
  CLI::App* cmd = app.add_subcommand(
      "ls", "List a store's blocks, one row each, in key order, streamed (read-only)");
  cmd->footer(
      "Columns: key (namespace/sequence/layer/block), slab file, offset, length, XXH3 checksum, "
      "generation, flags.\nExit status: 0 fine, 1 a damaged catalog, 2 usage or I/O error.\n"
      "Example: kvtier ls /nvme/kvtier --sequence 42 --layer 0 | head\n");
  cmd->add_option("DIR", config->dir, "Store directory")->required();
  cmd->add_option("--namespace", config->namespace_id, "Only this namespace")
      ->check(CLI::Range(int64_t{0}, int64_t{UINT32_MAX}));
  cmd->add_option("--sequence", config->sequence, "Only this sequence (decimal, or 32 hex digits)");
  cmd->add_option("--layer", config->layer, "Only this layer")
      ->check(CLI::Range(int64_t{0}, int64_t{UINT32_MAX}));
  cmd->add_flag("--json", config->json,
                "Print one JSON object: {dir, locked, blocks: [...], count, ok}");
  cmd->callback([config, exit_code] { *exit_code = RunLs(*config); });
}

}  // namespace kvtier::tools
