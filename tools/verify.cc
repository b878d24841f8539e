// `kvtier verify DIR [--repair]`: every block read and checked, the catalog checked
// against the slab files and the representatives against their blocks.
//
// Problems found (each naming its block or file):
//   catalog            an entry the catalog cannot decode (the scan stops there)
//   slab_file_missing  a slab file of the metadata is not there
//   slab_file_size     a slab file is not the size the metadata says: shorter (blocks
//                      past its end are lost) or longer (space owned by nobody)
//   bad_extent         an entry whose extent is not the store's: past the end of its
//                      file, misaligned, another size, a file index out of range
//   overlap            two entries whose extents overlap
//   checksum           the block's bytes fail their XXH3 checksum
//   unwritten          ...and the extent is all zeros: the entry points into space that
//                      was never written (free space)
//   unreadable         the read failed (a short read past the end of a truncated file, EIO)
//   representatives_without_block   representatives whose block the catalog lacks
// Blocks already quarantined (kBlockCorrupt) are counted, not read, and are no problem:
// the store never returns them.
//
// --repair (only with the store's lock: refused while another process has the store
// open) prints its plan, then applies the store's own rules offline:
//   - a missing slab file is created again and a resized one given back the metadata's
//     size (DiskTier::Open refuses any other), zero-filled where it grows;
//   - every intact block keeps its entry; a block that failed (checksum, unwritten,
//     unreadable) is quarantined: kBlockCorrupt set in its catalog entry and its
//     representatives removed, as EmbeddedStore::Impl::Promote does when a read fails;
//   - an entry that can own no extent (bad_extent, or overlapping an entry kept before
//     it: intact blocks first, then quarantined ones, in key order) is removed with its
//     representatives: its bytes are gone or belong to another block, and the store
//     would otherwise set it aside as an orphan at every open;
//   - representatives without a block are removed;
//   - the free-extent map is rebuilt as the store rebuilds it at open (ExtentAllocator,
//     MarkUsed in key order; it is not stored), and every remaining entry must own its
//     extent.
// Exit status: 0 nothing found, 1 problems found (with --repair: and repaired), 2 usage
// or I/O error, or a repair refused or failed.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "storage/extent_allocator.h"
#include "tools/inspect.h"
#include "tools/json_writer.h"
#include "tools/progress.h"
#include "tools/store_reader.h"

namespace kvtier::tools {
namespace {

struct VerifyConfig {
  std::string dir;
  bool repair = false;
  bool json = false;
  uint32_t io_depth = 64;
  bool buffered = false;
};

struct Problem {
  std::string kind;
  std::optional<BlockKey> key;
  std::string message;
};

// What verification knows of one entry.
enum class EntryState : uint8_t {
  kIntact,       // read and checked
  kQuarantined,  // already marked corrupt: not read
  kFailed,       // read failed or the checksum did not match
  kBadExtent,    // not an extent of this store
  kNotRead,      // its slab file is missing
};

struct Verification {
  std::vector<BlockEntry> entries;  // key order
  std::vector<EntryState> states;
  std::vector<Problem> problems;
  std::vector<BlockKey> stray_representatives;
  uint64_t representatives = 0;
  uint64_t blocks_read = 0, bytes_read = 0;
  double read_s = 0;
  bool catalog_damaged = false;
};

std::string ExtentString(const DiskLocation& loc) {
  return "file " + std::to_string(loc.file) + " [" + std::to_string(loc.offset) + ", " +
         std::to_string(loc.offset + loc.length) + ")";
}

// True when the extent's bytes are all zero (read outside StoreReader: a diagnosis of a
// block that already failed, never data handed on).
bool ExtentIsZero(const std::string& path, const DiskLocation& loc) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  std::vector<char> buf(loc.length);
  const ssize_t n = pread(fd, buf.data(), buf.size(), static_cast<off_t>(loc.offset));
  close(fd);
  if (n != static_cast<ssize_t>(buf.size())) return false;
  return std::all_of(buf.begin(), buf.end(), [](char c) { return c == 0; });
}

Status Verify(StoreReader& reader, bool show_progress, Verification* v) {
  const std::vector<SlabFileState>& files = reader.slab_files();
  for (size_t i = 0; i < files.size(); ++i) {
    const SlabFileState& f = files[i];
    if (!f.exists) {
      v->problems.push_back({"slab_file_missing", std::nullopt,
                             "slab file " + std::to_string(i) + " " + f.info.path + " is missing"});
    } else if (f.actual_bytes != f.info.bytes) {
      v->problems.push_back(
          {"slab_file_size", std::nullopt,
           "slab file " + std::to_string(i) + " " + f.info.path + " is " +
               std::to_string(f.actual_bytes) + " bytes; the catalog says " +
               std::to_string(f.info.bytes) +
               (f.actual_bytes < f.info.bytes ? " (truncated)"
                                              : " (the excess is owned by nobody)")});
    }
  }
  Status scan = reader.ForEachBlock([&](const BlockKey& key, const DiskLocation& loc) {
    v->entries.push_back(BlockEntry{key, loc});
    return true;
  });
  if (!scan.ok()) {
    if (scan.code() != StatusCode::kCorruption) return scan;
    v->catalog_damaged = true;
    v->problems.push_back({"catalog", std::nullopt, scan.message()});
  }

  // Entries, and which to read.
  v->states.assign(v->entries.size(), EntryState::kIntact);
  std::vector<size_t> to_read;
  for (size_t i = 0; i < v->entries.size(); ++i) {
    const BlockEntry& e = v->entries[i];
    if (Status s = reader.CheckLocation(e.location); !s.ok()) {
      v->states[i] = EntryState::kBadExtent;
      v->problems.push_back(
          {"bad_extent", e.key, "block " + e.key.ToString() + ": " + s.message()});
    } else if (e.location.flags & kBlockCorrupt) {
      v->states[i] = EntryState::kQuarantined;
    } else if (!files[e.location.file].exists) {
      v->states[i] = EntryState::kNotRead;
      v->problems.push_back({"unreadable", e.key,
                             "block " + e.key.ToString() + ": its slab file " +
                                 files[e.location.file].info.path + " is missing"});
    } else {
      to_read.push_back(i);
    }
  }

  // Overlaps: by (file, offset), each extent against the one reaching furthest before it.
  std::vector<size_t> by_place;
  for (size_t i = 0; i < v->entries.size(); ++i) {
    if (v->states[i] != EntryState::kBadExtent) by_place.push_back(i);
  }
  std::sort(by_place.begin(), by_place.end(), [&](size_t a, size_t b) {
    const DiskLocation &x = v->entries[a].location, &y = v->entries[b].location;
    return std::tie(x.file, x.offset) < std::tie(y.file, y.offset);
  });
  for (size_t j = 1, reach = by_place.empty() ? 0 : by_place[0]; j < by_place.size(); ++j) {
    const BlockEntry& cur = v->entries[by_place[j]];
    const BlockEntry& far = v->entries[reach];
    if (cur.location.file == far.location.file &&
        cur.location.offset < far.location.offset + far.location.length) {
      v->problems.push_back({"overlap", cur.key,
                             "block " + cur.key.ToString() + " at " + ExtentString(cur.location) +
                                 " overlaps block " + far.key.ToString() + " at " +
                                 ExtentString(far.location)});
    }
    if (cur.location.file != far.location.file ||
        cur.location.offset + cur.location.length > far.location.offset + far.location.length) {
      reach = by_place[j];
    }
  }

  // Every block, read and checked, several reads in flight.
  std::vector<BlockEntry> batch;
  batch.reserve(to_read.size());
  for (size_t i : to_read) batch.push_back(v->entries[i]);
  std::vector<size_t> failed;
  Progress progress("verify", batch.size() * reader.extent_bytes(), show_progress);
  const auto start = std::chrono::steady_clock::now();
  KVTIER_RETURN_IF_ERROR(reader.ReadBlocks(batch, [&](const BlockEntry& e, const Status& s,
                                                      std::span<const std::byte>) {
    progress.Add(e.location.length);
    if (s.ok()) {
      ++v->blocks_read;
      v->bytes_read += e.location.length;
      return true;
    }
    // Find the entry (batch order is key order: binary search by key).
    auto it = std::lower_bound(v->entries.begin(), v->entries.end(), e.key,
                               [](const BlockEntry& a, const BlockKey& k) { return a.key < k; });
    const size_t index = static_cast<size_t>(it - v->entries.begin());
    v->states[index] = EntryState::kFailed;
    std::string kind = "unreadable";
    if (s.code() == StatusCode::kCorruption) {
      kind = ExtentIsZero(reader.slab_files()[e.location.file].info.path, e.location) ? "unwritten"
                                                                                      : "checksum";
    }
    std::string message = s.message();
    if (kind == "unwritten") message += " (the extent is all zeros: never written, free space)";
    v->problems.push_back({kind, e.key, message});
    return true;
  }));
  v->read_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  progress.Finish();

  // Representatives against the blocks (both scans in key order).
  size_t k = 0;
  Status reps = reader.ForEachRepresentatives([&](const BlockKey& key, std::span<const std::byte>) {
    ++v->representatives;
    while (k < v->entries.size() && v->entries[k].key < key) ++k;
    if (k == v->entries.size() || v->entries[k].key != key) {
      v->stray_representatives.push_back(key);
      v->problems.push_back(
          {"representatives_without_block", key,
           "representatives of block " + key.ToString() + ", which the catalog does not hold"});
    }
    return true;
  });
  if (!reps.ok()) {
    if (reps.code() != StatusCode::kCorruption) return reps;
    v->catalog_damaged = true;
    v->problems.push_back({"catalog", std::nullopt, reps.message()});
  }
  return Status::OK();
}

// ---- Repair -----------------------------------------------------------------------------

struct Action {
  std::string
      what;  // "quarantine", "remove", "remove_representatives", "recreate_file", "resize_file"
  std::optional<BlockKey> key;
  std::string why;
};

struct Plan {
  std::vector<Action> actions;
  std::vector<Catalog::Update> updates;
  std::vector<uint32_t> files_to_fix;
};

Plan MakePlan(const StoreReader& reader, const Verification& v) {
  Plan plan;
  for (size_t i = 0; i < reader.slab_files().size(); ++i) {
    const SlabFileState& f = reader.slab_files()[i];
    if (!f.exists || f.actual_bytes != f.info.bytes) {
      plan.files_to_fix.push_back(static_cast<uint32_t>(i));
      plan.actions.push_back({f.exists ? "resize_file" : "recreate_file", std::nullopt,
                              f.info.path + " to " + std::to_string(f.info.bytes) + " bytes"});
    }
  }
  std::vector<uint64_t> sizes;
  for (const SlabFileState& f : reader.slab_files()) sizes.push_back(f.info.bytes);
  ExtentAllocator owned(sizes);
  auto claim = [&](const DiskLocation& loc) {
    return owned.MarkUsed(Extent{loc.file, loc.offset, loc.length}).ok();
  };
  auto remove = [&](const BlockKey& key, std::string why) {
    plan.actions.push_back({"remove", key, std::move(why)});
    plan.updates.push_back(Catalog::Update{key, std::nullopt});
  };
  // Intact blocks first: they keep their extents.
  for (size_t i = 0; i < v.entries.size(); ++i) {
    if (v.states[i] != EntryState::kIntact) continue;
    if (!claim(v.entries[i].location)) {
      remove(v.entries[i].key, "intact, but its extent overlaps an intact block's");
    }
  }
  for (size_t i = 0; i < v.entries.size(); ++i) {
    const BlockEntry& e = v.entries[i];
    switch (v.states[i]) {
      case EntryState::kIntact:
        break;
      case EntryState::kBadExtent:
        remove(e.key, "its extent is not one of this store's");
        break;
      case EntryState::kQuarantined:
      case EntryState::kFailed:
      case EntryState::kNotRead:
        if (!claim(e.location)) {
          remove(e.key, "quarantined, and its extent overlaps a block kept");
        } else if (!(e.location.flags & kBlockCorrupt)) {
          DiskLocation loc = e.location;
          loc.flags = (loc.flags | kBlockCorrupt) & ~uint32_t{kBlockOrphanExtent};
          plan.actions.push_back({"quarantine", e.key, "its data failed verification"});
          plan.updates.push_back(Catalog::Update{e.key, loc});
        }
        break;
    }
  }
  for (const BlockKey& key : v.stray_representatives) {
    plan.actions.push_back({"remove_representatives", key, "no such block"});
    plan.updates.push_back(Catalog::Update{key, std::nullopt});
  }
  return plan;
}

struct RepairResult {
  uint64_t blocks = 0, free_bytes = 0, free_extents = 0, misplaced = 0;
};

Status FixFile(Env* env, const SlabFileState& f) {
  if (f.exists && f.actual_bytes > f.info.bytes) {
    if (truncate(f.info.path.c_str(), static_cast<off_t>(f.info.bytes)) != 0) {
      return Status::FromErrno(errno, "truncate " + f.info.path);
    }
    return Status::OK();
  }
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<File> file,
                          env->OpenFile(f.info.path, FileOptions{.create = true}));
  KVTIER_RETURN_IF_ERROR(file->Allocate(f.info.bytes));
  return file->DataSync();
}

// Applies the plan with the lock held and the reader closed, then rebuilds the extent map
// from the repaired catalog by the store's rule.
Status Apply(const std::string& dir, const std::vector<SlabFileState>& files, const Plan& plan,
             RepairResult* result) {
  Env* env = Env::Default();
  for (uint32_t i : plan.files_to_fix) KVTIER_RETURN_IF_ERROR(FixFile(env, files[i]));
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<Catalog> catalog,
                          Catalog::Open(dir + "/catalog", /*create_if_missing=*/false));
  constexpr size_t kBatch = 1024;
  for (size_t i = 0; i < plan.updates.size(); i += kBatch) {
    const size_t n = std::min(kBatch, plan.updates.size() - i);
    KVTIER_RETURN_IF_ERROR(catalog->Commit(std::span(plan.updates).subspan(i, n)));
  }
  KVTIER_ASSIGN_OR_RETURN(std::optional<CatalogMeta> meta, catalog->ReadMeta());
  if (!meta) return Status::Corruption("the catalog lost its metadata during the repair");
  std::vector<uint64_t> sizes;
  for (const SlabFileInfo& f : meta->slab_files) sizes.push_back(f.bytes);
  ExtentAllocator extents(sizes);
  const uint64_t block_bytes = meta->layout.BytesPerBlock();
  const uint64_t extent_bytes = (block_bytes + 4095) / 4096 * 4096;
  KVTIER_RETURN_IF_ERROR(catalog->ForEachBlock([&](const BlockKey&, const DiskLocation& loc) {
    ++result->blocks;
    const bool owned = loc.length == extent_bytes && loc.data_bytes == block_bytes &&
                       loc.file < extents.file_count() &&
                       extents.MarkUsed(Extent{loc.file, loc.offset, loc.length}).ok();
    if (!owned) ++result->misplaced;
    return true;
  }));
  result->free_bytes = extents.free_bytes();
  result->free_extents = extents.free_extent_count();
  KVTIER_RETURN_IF_ERROR(catalog->Close());
  if (result->misplaced > 0) {
    return Status::Internal("after the repair " + std::to_string(result->misplaced) +
                            " entries still own no extent");
  }
  return Status::OK();
}

int RunVerify(const VerifyConfig& config) {
  StoreReaderOptions options{.direct_io = !config.buffered, .io_depth = config.io_depth};
  Result<std::unique_ptr<StoreReader>> opened = StoreReader::Open(config.dir, options);
  if (!opened.ok()) return ReportInspectError("verify", opened.status(), config.json);
  std::unique_ptr<FileLock> lock;
  const bool locked_elsewhere = (*opened)->locked();
  if (config.repair) {
    if (locked_elsewhere) {
      return ReportInspectError(
          "verify",
          Status::FailedPrecondition(
              "--repair refused: " + config.dir +
              " is open in another process (kvtierd or an embedded Store holds its LOCK); stop "
              "it, then repair. Without --repair, verify works read-only meanwhile"),
          config.json);
    }
    // Take the store's lock for the whole repair, then look again under it.
    opened->reset();
    Result<std::unique_ptr<FileLock>> l = Env::Default()->LockFile(config.dir + "/LOCK");
    if (!l.ok()) {
      return ReportInspectError(
          "verify", Status::FailedPrecondition("--repair refused: " + l.status().message()),
          config.json);
    }
    lock = std::move(l).value();
    opened = StoreReader::Open(config.dir, options);
    if (!opened.ok()) return ReportInspectError("verify", opened.status(), config.json);
  }
  StoreReader& reader = **opened;

  Verification v;
  if (Status s = Verify(reader, !config.json, &v); !s.ok()) {
    return ReportInspectError("verify", s, config.json);
  }
  uint64_t quarantined = 0;
  for (EntryState s : v.states) quarantined += s == EntryState::kQuarantined ? 1 : 0;
  const bool clean = v.problems.empty();
  const double gbps = v.read_s > 0 ? static_cast<double>(v.bytes_read) / v.read_s / 1e9 : 0.0;

  if (!config.json) {
    constexpr size_t kShown = 50;
    for (size_t i = 0; i < v.problems.size() && i < kShown; ++i) {
      std::printf("%-16s %s\n", v.problems[i].kind.c_str(), v.problems[i].message.c_str());
    }
    if (v.problems.size() > kShown) {
      std::printf("... and %zu more (--json lists all)\n", v.problems.size() - kShown);
    }
    std::printf("verified %s%s: %zu blocks, %" PRIu64
                " read (%.1f MiB in %.2f s, %.2f GB/s), %" PRIu64 " already quarantined, %" PRIu64
                " representatives: %s\n",
                config.dir.c_str(), locked_elsewhere ? " (open elsewhere: read-only view)" : "",
                v.entries.size(), v.blocks_read, static_cast<double>(v.bytes_read) / (1 << 20),
                v.read_s, gbps, quarantined, v.representatives,
                clean ? "clean" : (std::to_string(v.problems.size()) + " problem(s)").c_str());
  }

  Plan plan;
  Status repair_status;
  RepairResult repaired;
  bool repair_done = false;
  if (config.repair && !clean) {
    if (v.catalog_damaged) {
      repair_status = Status::FailedPrecondition(
          "--repair refused: the catalog itself is damaged (an entry does not decode); restore "
          "the catalog from a backup");
    } else {
      plan = MakePlan(reader, v);
      if (!config.json) {
        std::printf("repair plan (%zu actions):\n", plan.actions.size());
        for (const Action& a : plan.actions) {
          std::printf("  %-22s %s%s%s\n", a.what.c_str(), a.key ? a.key->ToString().c_str() : "",
                      a.key ? ": " : "", a.why.c_str());
        }
        std::printf("  rebuild the free-extent map from the catalog, as the store does at open\n");
        std::fflush(stdout);
      }
      const std::vector<SlabFileState> files = reader.slab_files();
      opened->reset();  // the catalog is opened read-write next
      repair_status = Apply(config.dir, files, plan, &repaired);
      repair_done = repair_status.ok();
    }
  }

  if (config.json) {
    JsonWriter w;
    w.BeginObject();
    w.Key("ok"), w.Bool(clean);
    w.Key("dir"), w.String(config.dir);
    w.Key("locked"), w.Bool(locked_elsewhere);
    w.Key("blocks"), w.Uint(v.entries.size());
    w.Key("blocks_read"), w.Uint(v.blocks_read);
    w.Key("blocks_quarantined"), w.Uint(quarantined);
    w.Key("representatives"), w.Uint(v.representatives);
    w.Key("bytes_read"), w.Uint(v.bytes_read);
    w.Key("read_s"), w.Number(v.read_s);
    w.Key("read_gb_per_s"), w.Number(gbps);
    w.Key("problem_count"), w.Uint(v.problems.size());
    w.Key("problems"), w.BeginArray();
    for (const Problem& p : v.problems) {
      w.BeginObject();
      w.Key("kind"), w.String(p.kind);
      w.Key("key"), w.String(p.key ? p.key->ToString() : "");
      w.Key("message"), w.String(p.message);
      w.EndObject();
    }
    w.EndArray();
    w.Key("repair"), w.BeginObject();
    w.Key("requested"), w.Bool(config.repair);
    w.Key("done"), w.Bool(repair_done);
    w.Key("actions"), w.BeginArray();
    for (const Action& a : plan.actions) {
      w.BeginObject();
      w.Key("action"), w.String(a.what);
      w.Key("key"), w.String(a.key ? a.key->ToString() : "");
      w.Key("why"), w.String(a.why);
      w.EndObject();
    }
    w.EndArray();
    w.Key("blocks_after"), w.Uint(repaired.blocks);
    w.Key("free_bytes_after"), w.Uint(repaired.free_bytes);
    w.Key("free_extents_after"), w.Uint(repaired.free_extents);
    if (!repair_status.ok()) {
      w.Key("error"), w.String(repair_status.ToString());
    }
    w.EndObject();
    w.EndObject();
    std::printf("%s\n", w.str().c_str());
  } else {
    if (repair_done) {
      std::printf("repaired: %" PRIu64 " blocks remain, %.1f MiB free in %" PRIu64
                  " extent(s); every entry owns its extent\n",
                  repaired.blocks, static_cast<double>(repaired.free_bytes) / (1 << 20),
                  repaired.free_extents);
    } else if (!clean && !config.repair) {
      std::printf("run `kvtier verify --repair %s` (with the store closed) to fix\n",
                  config.dir.c_str());
    }
  }
  if (!repair_status.ok()) {
    if (!config.json) std::fprintf(stderr, "kvtier verify: %s\n", repair_status.ToString().c_str());
    return 2;
  }
  return clean ? 0 : 1;
}

}  // namespace

void AddVerifyCommand(CLI::App& app, int* exit_code) {
  auto config = std::make_shared<VerifyConfig>();
  CLI::App* cmd = app.add_subcommand(
      "verify", "Read and check every block; check the catalog against the slab files");
  cmd->footer(
      "Without --repair it never writes, and works while another process has the store open.\n"
      "--repair (store closed) prints its plan, then quarantines blocks that fail, removes "
      "entries that can own no extent and stray representatives, restores slab file sizes, "
      "and rebuilds the free-extent map.\n"
      "Exit status: 0 clean, 1 problems found (and repaired with --repair), 2 usage or I/O "
      "error, or a refused repair.\n"
      "Example: kvtier verify /nvme/kvtier && kvtier verify --repair /nvme/kvtier --json\n");
  cmd->add_option("DIR", config->dir, "Store directory")->required();
  cmd->add_flag("--repair", config->repair,
                "Fix what was found (needs the store's lock: refused while it is open)");
  cmd->add_option("--io-depth", config->io_depth, "Reads in flight")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1024u));
  cmd->add_flag("--buffered", config->buffered, "Read through the page cache (no O_DIRECT)");
  cmd->add_flag("--json", config->json, "Print one JSON object");
  cmd->callback([config, exit_code] { *exit_code = RunVerify(*config); });
}

}  // namespace kvtier::tools
