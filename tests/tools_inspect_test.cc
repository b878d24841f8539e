// `kvtier info`, `ls`, `verify [--repair]` and `export` end to end: stores made here with
// the public Store API (a small layout, so it takes seconds), the binary run on them,
// its JSON parsed and checked field by field, its exit codes checked; then every command
// on damaged stores (a truncated slab file, flipped bytes, a deleted or damaged catalog
// file, a store of another layout, an empty directory, a directory that is not a store, a
// file), on a store another object holds open, and the export -> import -> export round
// trip when `kvtier import` is built.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "bench/workload/npy.h"
#include "kernels/dtype_convert.h"
#include "kvtier/store.h"
#include "storage/catalog.h"
#include "tests/json_reader.h"

#ifndef KVTIER_TOOL
#error "KVTIER_TOOL must name the kvtier binary"
#endif

namespace kvtier {
namespace {

using testing::Json;
using testing::JsonParser;

// ---- Running the tool -----------------------------------------------------------------

struct RunResult {
  int exit_code = -1;  // -1: killed by a signal (a crash)
  std::string out, err;
  Json json;
  bool json_ok = false;
};

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/var/tmp/kvtier-inspect-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

RunResult RunTool(const std::string& args, const std::string& scratch) {
  const std::string out = scratch + "/stdout", err = scratch + "/stderr";
  const std::string cmd = std::string(KVTIER_TOOL) + " " + args + " >" + out + " 2>" + err;
  const int status = std::system(cmd.c_str());
  RunResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = ReadFile(out);
  r.err = ReadFile(err);
  r.json_ok = JsonParser(r.out).Parse(&r.json);
  return r;
}

// ---- Stores ---------------------------------------------------------------------------

// 2 layers, 2 KV heads, head dim 32, f16, 16-token blocks: 4096-byte blocks.
ModelLayout TestLayout() {
  return ModelLayout{.num_layers = 2,
                     .num_kv_heads = 2,
                     .num_query_heads = 4,
                     .head_dim = 32,
                     .dtype = DType::kF16,
                     .block_tokens = 16};
}

BlockKey Key(uint32_t ns, uint64_t seq, uint32_t layer, uint32_t block) {
  return BlockKey{
      .namespace_id = ns, .sequence = SequenceId::FromU64(seq), .layer = layer, .block = block};
}

constexpr uint64_t kDiskExtents = 64;

StoreOptions OptionsFor(const std::string& dir, const ModelLayout& layout) {
  const uint64_t extent = (layout.BytesPerBlock() + 4095) / 4096 * 4096;
  StoreOptions o;
  o.directory = dir;
  o.host_capacity_bytes = 64 * extent;
  o.host_memory = HostMemoryKind::kPlain;
  o.disk_capacity_bytes = kDiskExtents * extent;
  o.io_depth = 8;
  o.retrieval.enabled = true;
  o.retrieval.n_init = layout.block_tokens;
  o.retrieval.n_local = 2 * layout.block_tokens;
  o.retrieval.top_k = 2;
  return o;
}

// Sequence 7 of namespace 0 (4 blocks per layer) and sequence 9 of namespace 1 (2 blocks
// per layer), every layer, random values (seeded), closed and durable on return.
using Blocks = std::map<BlockKey, std::vector<std::byte>>;

Blocks MakeStore(const std::string& dir, const ModelLayout& layout = TestLayout(),
                 uint32_t seed = 1) {
  Blocks blocks;
  auto store = Store::Open(OptionsFor(dir, layout), layout);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  if (!store.ok()) return blocks;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const uint64_t elems = layout.BytesPerBlock() / DTypeBytes(layout.dtype);
  for (auto [ns, seq, n] : {std::tuple<uint32_t, uint64_t, uint32_t>{0, 7, 4}, {1, 9, 2}}) {
    for (uint32_t layer = 0; layer < layout.num_layers; ++layer) {
      for (uint32_t b = 0; b < n; ++b) {
        std::vector<std::byte> data(layout.BytesPerBlock());
        for (uint64_t i = 0; i < elems; ++i)
          StoreFromFloat(data.data(), i, layout.dtype, normal(rng));
        const BlockKey key = Key(ns, seq, layer, b);
        Status s = (*store)->Put(key, data.data(), data.size());
        EXPECT_TRUE(s.ok()) << s.ToString();
        blocks[key] = std::move(data);
      }
    }
  }
  EXPECT_TRUE((*store)->Flush().ok());
  return blocks;
}

std::map<BlockKey, DiskLocation> Locations(const std::string& dir) {
  std::map<BlockKey, DiskLocation> out;
  auto catalog = Catalog::Open(dir + "/catalog", false, CatalogMode::kReadOnly);
  EXPECT_TRUE(catalog.ok()) << catalog.status().ToString();
  if (!catalog.ok()) return out;
  EXPECT_TRUE((*catalog)
                  ->ForEachBlock([&](const BlockKey& k, const DiskLocation& l) {
                    out[k] = l;
                    return true;
                  })
                  .ok());
  return out;
}

std::string SlabPath(const std::string& dir) { return dir + "/slab-0.kvt"; }

void FlipByte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5A);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

// Every block of `expected` but those in `lost` reads back through Store::Open + Get with
// its bytes; those in `lost` fail (never returned as data).
void ExpectStoreServes(const std::string& dir, const Blocks& expected,
                       const std::vector<BlockKey>& lost,
                       const ModelLayout& layout = TestLayout()) {
  StoreOptions o = OptionsFor(dir, layout);
  auto store = Store::Open(o, layout);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  std::vector<std::byte> out(layout.BytesPerBlock());
  for (const auto& [key, data] : expected) {
    Status s = (*store)->Get(key, out.data(), out.size());
    if (std::find(lost.begin(), lost.end(), key) != lost.end()) {
      EXPECT_FALSE(s.ok()) << key.ToString() << " was lost, yet Get returned it";
    } else {
      ASSERT_TRUE(s.ok()) << key.ToString() << ": " << s.ToString();
      EXPECT_EQ(out, data) << key.ToString();
    }
  }
}

class ToolsInspectTest : public ::testing::Test {
 protected:
  RunResult Kvtier(const std::string& args) { return RunTool(args, scratch_.path()); }

  // Runs every command on `dir` and expects `code`, with a JSON error (and a message on
  // stderr without --json) containing `needle`.
  void ExpectEveryCommandFails(const std::string& dir, int code, const std::string& needle) {
    for (const std::string cmd : {"info", "ls", "verify", "verify --repair", "export"}) {
      const std::string extra = cmd == "export"
                                    ? " --sequence 7 --keys " + scratch_.path() +
                                          "/K.npy --values " + scratch_.path() + "/V.npy"
                                    : "";
      RunResult r = Kvtier(cmd + " " + dir + extra + " --json");
      EXPECT_EQ(r.exit_code, code) << cmd << "\n" << r.out << r.err;
      ASSERT_TRUE(r.json_ok) << cmd << ": " << r.out;
      EXPECT_FALSE(r.json["ok"].boolean) << cmd;
      EXPECT_NE(r.json["error"]["message"].string.find(needle), std::string::npos)
          << cmd << ": " << r.out;
      RunResult text = Kvtier(cmd + " " + dir + extra);
      EXPECT_EQ(text.exit_code, code) << cmd;
      EXPECT_NE(text.err.find(needle), std::string::npos) << cmd << ": " << text.err;
      EXPECT_FALSE(std::filesystem::exists(scratch_.path() + "/K.npy"));
    }
  }

  TempDir scratch_;
};

// ---- Help ---------------------------------------------------------------------------------

TEST_F(ToolsInspectTest, EveryCommandHasHelpWithAnExample) {
  for (const char* cmd : {"info", "ls", "verify", "export"}) {
    RunResult r = Kvtier(std::string(cmd) + " --help");
    EXPECT_EQ(r.exit_code, 0) << cmd;
    EXPECT_NE(r.out.find("Example: kvtier " + std::string(cmd)), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("--json"), std::string::npos) << cmd;
  }
  EXPECT_EQ(Kvtier("info").exit_code, 2);  // DIR missing: usage error
  EXPECT_EQ(Kvtier("verify --no-such-flag x").exit_code, 2);
}

// ---- info ---------------------------------------------------------------------------------

TEST_F(ToolsInspectTest, InfoReportsEveryField) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  RunResult r = Kvtier("info " + dir.path() + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  const Json& j = r.json;
  const ModelLayout l = TestLayout();
  EXPECT_TRUE(j["ok"].boolean);
  EXPECT_EQ(j["dir"].string, dir.path());
  EXPECT_FALSE(j["locked"].boolean);
  EXPECT_EQ(j["format_version"].U64(), CatalogMeta::kFormatVersion);
  EXPECT_EQ(j["layout"]["layers"].U64(), l.num_layers);
  EXPECT_EQ(j["layout"]["kv_heads"].U64(), l.num_kv_heads);
  EXPECT_EQ(j["layout"]["query_heads"].U64(), l.num_query_heads);
  EXPECT_EQ(j["layout"]["head_dim"].U64(), l.head_dim);
  EXPECT_EQ(j["layout"]["dtype"].string, "f16");
  EXPECT_EQ(j["layout"]["block_tokens"].U64(), l.block_tokens);
  char fingerprint[24];
  std::snprintf(fingerprint, sizeof(fingerprint), "%016llx",
                static_cast<unsigned long long>(l.Fingerprint()));
  EXPECT_EQ(j["fingerprint"].string, fingerprint);
  EXPECT_EQ(j["block_bytes"].U64(), 4096u);
  EXPECT_EQ(j["extent_bytes"].U64(), 4096u);
  ASSERT_EQ(j["tiers"].array.size(), 1u);
  EXPECT_EQ(j["tiers"][0]["tier"].string, "disk");
  EXPECT_EQ(j["tiers"][0]["capacity_bytes"].U64(), kDiskExtents * 4096);
  ASSERT_EQ(j["tiers"][0]["slab_files"].array.size(), 1u);
  const Json& slab = j["tiers"][0]["slab_files"][0];
  EXPECT_EQ(slab["bytes"].U64(), kDiskExtents * 4096);
  EXPECT_EQ(slab["actual_bytes"].U64(), kDiskExtents * 4096);
  EXPECT_TRUE(slab["exists"].boolean);
  EXPECT_EQ(j["used_bytes"].U64(), blocks.size() * 4096);
  EXPECT_EQ(j["free_bytes"].U64(), (kDiskExtents - blocks.size()) * 4096);
  EXPECT_GE(j["free_extents"].U64(), 1u);
  EXPECT_LE(j["largest_free_extent_bytes"].U64(), j["free_bytes"].U64());
  EXPECT_GE(j["fragmentation"].number, 0.0);
  EXPECT_LT(j["fragmentation"].number, 1.0);
  EXPECT_EQ(j["namespaces"].U64(), 2u);
  EXPECT_EQ(j["sequences"].U64(), 2u);
  EXPECT_EQ(j["blocks"].U64(), blocks.size());
  EXPECT_EQ(j["corrupt_blocks"].U64(), 0u);
  EXPECT_EQ(j["misplaced_blocks"].U64(), 0u);
  EXPECT_EQ(j["representatives"].U64(), blocks.size());  // retrieval on: one per block
  EXPECT_GT(j["representatives_bytes"].U64(), 0u);
  EXPECT_EQ(j["representatives_without_block"].U64(), 0u);
  EXPECT_EQ(j["max_generation"].U64(), blocks.size());
  EXPECT_EQ(j["missing_slab_files"].U64(), 0u);
  EXPECT_EQ(j["wrong_size_slab_files"].U64(), 0u);

  RunResult text = Kvtier("info " + dir.path());
  EXPECT_EQ(text.exit_code, 0);
  EXPECT_NE(text.out.find(l.ToString()), std::string::npos) << text.out;
  EXPECT_TRUE(text.err.empty()) << "no progress bar when stderr is not a terminal: " << text.err;
}

// ---- ls -----------------------------------------------------------------------------------

TEST_F(ToolsInspectTest, LsListsEveryBlockWithItsLocation) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  const std::map<BlockKey, DiskLocation> locations = Locations(dir.path());
  RunResult r = Kvtier("ls " + dir.path() + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_TRUE(r.json["ok"].boolean);
  ASSERT_EQ(r.json["count"].U64(), blocks.size());
  ASSERT_EQ(r.json["blocks"].array.size(), blocks.size());
  auto it = locations.begin();
  for (const Json& row : r.json["blocks"].array) {
    ASSERT_NE(it, locations.end());
    const auto& [key, loc] = *it++;  // key order
    EXPECT_EQ(row["key"].string, key.ToString());
    EXPECT_EQ(row["namespace"].U64(), key.namespace_id);
    EXPECT_EQ(row["sequence"].string, key.sequence.ToHex());
    EXPECT_EQ(row["layer"].U64(), key.layer);
    EXPECT_EQ(row["block"].U64(), key.block);
    EXPECT_EQ(row["file"].U64(), loc.file);
    EXPECT_EQ(row["offset"].U64(), loc.offset);
    EXPECT_EQ(row["length"].U64(), loc.length);
    EXPECT_EQ(row["data_bytes"].U64(), loc.data_bytes);
    char sum[24];
    std::snprintf(sum, sizeof(sum), "%016llx", static_cast<unsigned long long>(loc.checksum));
    EXPECT_EQ(row["checksum"].string, sum);
    EXPECT_EQ(row["generation"].U64(), loc.generation);
    EXPECT_EQ(row["flags"].U64(), 0u);
    EXPECT_FALSE(row["corrupt"].boolean);
  }

  // Filters.
  r = Kvtier("ls " + dir.path() + " --json --namespace 0 --sequence 7 --layer 1");
  ASSERT_EQ(r.exit_code, 0);
  ASSERT_TRUE(r.json_ok) << r.out;
  ASSERT_EQ(r.json["count"].U64(), 4u);
  for (uint32_t b = 0; b < 4; ++b) {
    EXPECT_EQ(r.json["blocks"][b]["key"].string, Key(0, 7, 1, b).ToString());
  }
  r = Kvtier("ls " + dir.path() + " --json --sequence " + SequenceId::FromU64(9).ToHex());
  ASSERT_TRUE(r.json_ok);
  EXPECT_EQ(r.json["count"].U64(), 4u);
  EXPECT_EQ(Kvtier("ls " + dir.path() + " --sequence xyz").exit_code, 2);

  // Text, streamed into a pipe that closes early.
  r = Kvtier("ls " + dir.path() + " | head -3");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 3);
  EXPECT_NE(r.out.find(Key(0, 7, 0, 0).ToString()), std::string::npos);
}

// ---- verify -------------------------------------------------------------------------------

TEST_F(ToolsInspectTest, VerifyFindsNothingOnACleanStore) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  RunResult r = Kvtier("verify " + dir.path() + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_TRUE(r.json["ok"].boolean);
  EXPECT_EQ(r.json["blocks"].U64(), blocks.size());
  EXPECT_EQ(r.json["blocks_read"].U64(), blocks.size());
  EXPECT_EQ(r.json["blocks_quarantined"].U64(), 0u);
  EXPECT_EQ(r.json["representatives"].U64(), blocks.size());
  EXPECT_EQ(r.json["bytes_read"].U64(), blocks.size() * 4096);
  EXPECT_EQ(r.json["problem_count"].U64(), 0u);
  EXPECT_TRUE(r.json["problems"].array.empty());
  EXPECT_FALSE(r.json["repair"]["requested"].boolean);
  // Buffered reads and a queue depth of one read the same.
  r = Kvtier("verify " + dir.path() + " --json --buffered --io-depth 1");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.json["blocks_read"].U64(), blocks.size());
  // --repair on a clean store changes nothing.
  r = Kvtier("verify --repair " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(r.json["repair"]["actions"].array.empty());
  r = Kvtier("verify " + dir.path());
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("clean"), std::string::npos) << r.out;
  EXPECT_TRUE(r.err.empty()) << r.err;
}

TEST_F(ToolsInspectTest, VerifyNamesEveryFlippedBlockAndRepairKeepsTheRest) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  const auto locations = Locations(dir.path());
  const std::vector<BlockKey> flipped = {Key(0, 7, 0, 2), Key(1, 9, 1, 0)};
  FlipByte(SlabPath(dir.path()), locations.at(flipped[0]).offset + 17);
  FlipByte(SlabPath(dir.path()), locations.at(flipped[1]).offset + 3999);

  RunResult r = Kvtier("verify " + dir.path() + " --json");
  ASSERT_EQ(r.exit_code, 1) << r.out << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_FALSE(r.json["ok"].boolean);
  ASSERT_EQ(r.json["problem_count"].U64(), 2u) << r.out;
  for (size_t i = 0; i < 2; ++i) {
    const Json& p = r.json["problems"][i];
    EXPECT_EQ(p["kind"].string, "checksum");
    EXPECT_TRUE(p["key"].string == flipped[0].ToString() ||
                p["key"].string == flipped[1].ToString())
        << p["key"].string;
    EXPECT_NE(p["message"].string.find("checksum mismatch"), std::string::npos);
  }
  EXPECT_EQ(r.json["blocks_read"].U64(), blocks.size() - 2);
  // export of the damaged sequence refuses, naming the block; nothing is written.
  RunResult e = Kvtier("export " + dir.path() + " --sequence 7 --keys " + scratch_.path() +
                       "/K.npy --values " + scratch_.path() + "/V.npy --json");
  EXPECT_EQ(e.exit_code, 1) << e.out;
  EXPECT_NE(e.json["error"]["message"].string.find(flipped[0].ToString()), std::string::npos)
      << e.out;
  EXPECT_FALSE(std::filesystem::exists(scratch_.path() + "/K.npy"));

  // The repair prints its plan, quarantines both, and verify comes out clean.
  r = Kvtier("verify --repair " + dir.path());
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.out.find("repair plan"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("quarantine"), std::string::npos) << r.out;
  r = Kvtier("verify " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.json["blocks_quarantined"].U64(), 2u);
  EXPECT_EQ(r.json["blocks_read"].U64(), blocks.size() - 2);
  RunResult info = Kvtier("info " + dir.path() + " --json");
  EXPECT_EQ(info.json["corrupt_blocks"].U64(), 2u);
  EXPECT_EQ(info.json["representatives"].U64(), blocks.size() - 2);
  RunResult ls = Kvtier("ls " + dir.path() + " --json --namespace 0 --sequence 7 --layer 0");
  EXPECT_TRUE(ls.json["blocks"][2]["corrupt"].boolean);
  ExpectStoreServes(dir.path(), blocks, flipped);
}

TEST_F(ToolsInspectTest, TruncatedSlabFile) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  const auto locations = Locations(dir.path());
  // Keep the first 6 extents: the blocks past them are lost.
  const uint64_t keep = 6 * 4096;
  std::vector<BlockKey> lost;
  for (const auto& [key, loc] : locations) {
    if (loc.offset + loc.length > keep) lost.push_back(key);
  }
  ASSERT_FALSE(lost.empty());
  ASSERT_EQ(truncate(SlabPath(dir.path()).c_str(), keep), 0);

  RunResult r = Kvtier("info " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_EQ(r.json["wrong_size_slab_files"].U64(), 1u);
  EXPECT_EQ(r.json["tiers"][0]["slab_files"][0]["actual_bytes"].U64(), keep);
  r = Kvtier("verify " + dir.path() + " --json");
  ASSERT_EQ(r.exit_code, 1) << r.out;
  ASSERT_TRUE(r.json_ok);
  std::vector<std::string> named;
  bool file_reported = false;
  for (const Json& p : r.json["problems"].array) {
    if (p["kind"].string == "slab_file_size") file_reported = true;
    if (p["kind"].string == "unreadable") named.push_back(p["key"].string);
  }
  EXPECT_TRUE(file_reported) << r.out;
  ASSERT_EQ(named.size(), lost.size()) << r.out;
  for (const BlockKey& k : lost) {
    EXPECT_NE(std::find(named.begin(), named.end(), k.ToString()), named.end()) << k.ToString();
  }
  // ls still lists everything.
  EXPECT_EQ(Kvtier("ls " + dir.path() + " --json").json["count"].U64(), blocks.size());

  r = Kvtier("verify --repair " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_TRUE(r.json["repair"]["done"].boolean) << r.out;
  r = Kvtier("verify " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.json["blocks_quarantined"].U64(), lost.size());
  ExpectStoreServes(dir.path(), blocks, lost);
}

TEST_F(ToolsInspectTest, MissingSlabFile) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  ASSERT_TRUE(std::filesystem::remove(SlabPath(dir.path())));
  RunResult r = Kvtier("info " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_EQ(r.json["missing_slab_files"].U64(), 1u);
  EXPECT_FALSE(r.json["tiers"][0]["slab_files"][0]["exists"].boolean);
  r = Kvtier("verify " + dir.path() + " --json");
  ASSERT_EQ(r.exit_code, 1) << r.out;
  std::map<std::string, size_t> kinds;
  for (const Json& p : r.json["problems"].array) ++kinds[p["kind"].string];
  EXPECT_EQ(kinds["slab_file_missing"], 1u) << r.out;
  EXPECT_EQ(kinds["unreadable"], blocks.size()) << r.out;
  EXPECT_EQ(r.json["blocks_read"].U64(), 0u);
  // The store refuses to open; the repair recreates the file and quarantines every block.
  EXPECT_FALSE(Store::Open(OptionsFor(dir.path(), TestLayout()), TestLayout()).ok());
  r = Kvtier("verify --repair " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_TRUE(r.json["repair"]["done"].boolean) << r.out;
  r = Kvtier("verify " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.json["blocks_quarantined"].U64(), blocks.size());
  std::vector<BlockKey> all;
  for (const auto& [key, data] : blocks) all.push_back(key);
  ExpectStoreServes(dir.path(), blocks, all);
}

// The catalog's read-only modes (what the tools open) write nothing and refuse writes.
TEST(CatalogReadOnlyTest, ReadOnlyAndSecondaryWriteNothing) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  const std::string catalog_dir = dir.path() + "/catalog";
  auto listing = [&] {
    std::map<std::string, uintmax_t> files;
    for (const auto& e : std::filesystem::directory_iterator(catalog_dir)) {
      files[e.path().filename().string()] = e.file_size();
    }
    return files;
  };
  const auto before = listing();
  EXPECT_TRUE(
      Catalog::Open(catalog_dir, true, CatalogMode::kReadOnly).status().IsInvalidArgument());
  for (CatalogMode mode : {CatalogMode::kReadOnly, CatalogMode::kSecondary}) {
    auto catalog = Catalog::Open(catalog_dir, false, mode);
    ASSERT_TRUE(catalog.ok()) << catalog.status().ToString();
    Result<std::optional<CatalogMeta>> meta = (*catalog)->ReadMeta();
    ASSERT_TRUE(meta.ok() && meta->has_value());
    EXPECT_EQ((*meta)->layout, TestLayout());
    uint64_t n = 0;
    EXPECT_TRUE((*catalog)
                    ->ForEachBlock([&](const BlockKey&, const DiskLocation&) {
                      ++n;
                      return true;
                    })
                    .ok());
    EXPECT_EQ(n, blocks.size());
    EXPECT_EQ((*catalog)->WriteMeta(**meta).code(), StatusCode::kFailedPrecondition);
    std::vector<Catalog::Update> removal = {{blocks.begin()->first, std::nullopt}};
    EXPECT_EQ((*catalog)->Commit(removal).code(), StatusCode::kFailedPrecondition);
    std::vector<std::byte> junk(8);
    EXPECT_EQ((*catalog)->PutRepresentatives(blocks.begin()->first, junk).code(),
              StatusCode::kFailedPrecondition);
    EXPECT_TRUE((*catalog)->Close().ok());
  }
  EXPECT_EQ(listing(), before);
  EXPECT_TRUE(
      Catalog::Open(dir.path() + "/nothing", false, CatalogMode::kReadOnly).status().IsNotFound());
}

TEST_F(ToolsInspectTest, CatalogEntriesPastTheFileOverlappingOrIntoFreeSpace) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  auto locations = Locations(dir.path());
  const BlockKey past = Key(0, 7, 1, 3), overlap = Key(1, 9, 0, 1), unwritten = Key(1, 9, 1, 1);
  const BlockKey overlapped = Key(0, 7, 0, 0);
  {
    auto catalog = Catalog::Open(dir.path() + "/catalog", false);
    ASSERT_TRUE(catalog.ok()) << catalog.status().ToString();
    DiskLocation p = locations.at(past);
    p.offset = kDiskExtents * 4096;  // just past the end of the slab file
    DiskLocation o = locations.at(overlap);
    o.offset = locations.at(overlapped).offset;  // another block's extent
    DiskLocation u = locations.at(unwritten);
    u.offset = (kDiskExtents - 1) * 4096;  // free space, never written
    std::vector<Catalog::Update> updates = {{past, p}, {overlap, o}, {unwritten, u}};
    ASSERT_TRUE((*catalog)->Commit(updates).ok());
    // Representatives whose block is not there.
    std::vector<std::byte> junk(32, std::byte{1});
    ASSERT_TRUE((*catalog)->PutRepresentatives(Key(5, 5, 0, 0), junk).ok());
  }
  RunResult r = Kvtier("verify " + dir.path() + " --json");
  ASSERT_EQ(r.exit_code, 1) << r.out;
  ASSERT_TRUE(r.json_ok) << r.out;
  std::map<std::string, std::vector<std::string>> kinds;
  for (const Json& p : r.json["problems"].array) kinds[p["kind"].string].push_back(p["key"].string);
  EXPECT_EQ(kinds["bad_extent"], std::vector<std::string>{past.ToString()}) << r.out;
  ASSERT_EQ(kinds["overlap"].size(), 1u) << r.out;
  EXPECT_TRUE(kinds["overlap"][0] == overlap.ToString() ||
              kinds["overlap"][0] == overlapped.ToString());
  EXPECT_EQ(kinds["unwritten"], std::vector<std::string>{unwritten.ToString()}) << r.out;
  EXPECT_EQ(kinds["representatives_without_block"],
            std::vector<std::string>{Key(5, 5, 0, 0).ToString()});
  // The overlapping entry's data is its neighbour's: its checksum fails too.
  EXPECT_EQ(kinds["checksum"], std::vector<std::string>{overlap.ToString()}) << r.out;
  RunResult info = Kvtier("info " + dir.path() + " --json");
  EXPECT_EQ(info.exit_code, 1);
  EXPECT_GE(info.json["misplaced_blocks"].U64(), 2u);
  EXPECT_EQ(info.json["representatives_without_block"].U64(), 1u);

  r = Kvtier("verify --repair " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_TRUE(r.json["repair"]["done"].boolean) << r.out;
  r = Kvtier("verify " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  ExpectStoreServes(dir.path(), blocks, {past, overlap, unwritten});
}

// ---- Damaged and wrong inputs ----------------------------------------------------------

TEST_F(ToolsInspectTest, EmptyDirectoryNotAStoreAFileAndNothing) {
  TempDir empty;
  ExpectEveryCommandFails(empty.path(), 2, "not a kvtier store");
  EXPECT_FALSE(std::filesystem::exists(empty.path() + "/LOCK")) << "read-only commands wrote";
  TempDir other;
  std::ofstream(other.path() + "/notes.txt") << "hello";
  std::filesystem::create_directory(other.path() + "/data");
  ExpectEveryCommandFails(other.path(), 2, "not a kvtier store");
  ExpectEveryCommandFails(other.path() + "/notes.txt", 2, "is not a directory");
  ExpectEveryCommandFails(other.path() + "/absent", 2, "no such directory");
}

TEST_F(ToolsInspectTest, DeletedCatalogFile) {
  TempDir dir;
  MakeStore(dir.path());
  ASSERT_TRUE(std::filesystem::remove(dir.path() + "/catalog/CURRENT"));
  ExpectEveryCommandFails(dir.path(), 1, "damaged catalog");
}

TEST_F(ToolsInspectTest, DeletedManifest) {
  TempDir dir;
  MakeStore(dir.path());
  int removed = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path() + "/catalog")) {
    if (e.path().filename().string().starts_with("MANIFEST-")) {
      std::filesystem::remove(e.path());
      ++removed;
    }
  }
  ASSERT_GT(removed, 0);
  ExpectEveryCommandFails(dir.path(), 1, "damaged catalog");
}

TEST_F(ToolsInspectTest, DamagedCatalogTable) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  // Garbage over every table file: the catalog opens (tables open lazily) or not, but no
  // command crashes, returns data, or reports the store fine.
  int damaged = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path() + "/catalog")) {
    if (e.path().extension() == ".sst") {
      const auto size = std::filesystem::file_size(e.path());
      std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
      std::string junk(size, '\x5a');
      f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
      ++damaged;
    }
  }
  ASSERT_GT(damaged, 0);
  for (const std::string cmd : {"info", "ls", "verify", "verify --repair"}) {
    RunResult r = Kvtier(cmd + " " + dir.path() + " --json");
    EXPECT_EQ(r.exit_code, 1) << cmd << ": " << r.out << r.err;
    ASSERT_TRUE(r.json_ok) << cmd << ": " << r.out;
    EXPECT_FALSE(r.json["ok"].boolean) << cmd;
  }
  RunResult e = Kvtier("export " + dir.path() + " --sequence 7 --keys " + scratch_.path() +
                       "/K.npy --values " + scratch_.path() + "/V.npy --json");
  EXPECT_NE(e.exit_code, 0);
  EXPECT_NE(e.exit_code, -1);
  EXPECT_FALSE(std::filesystem::exists(scratch_.path() + "/K.npy"));
}

TEST_F(ToolsInspectTest, StoreOfAnotherLayout) {
  TempDir dir;
  const ModelLayout l{.num_layers = 3,
                      .num_kv_heads = 1,
                      .num_query_heads = 2,
                      .head_dim = 64,
                      .dtype = DType::kBF16,
                      .block_tokens = 32};
  Blocks blocks = MakeStore(dir.path(), l, 3);
  RunResult r = Kvtier("info " + dir.path() + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.json["layout"]["layers"].U64(), 3u);
  EXPECT_EQ(r.json["layout"]["kv_heads"].U64(), 1u);
  EXPECT_EQ(r.json["layout"]["head_dim"].U64(), 64u);
  EXPECT_EQ(r.json["layout"]["dtype"].string, "bf16");
  EXPECT_EQ(r.json["layout"]["block_tokens"].U64(), 32u);
  EXPECT_EQ(r.json["block_bytes"].U64(), l.BytesPerBlock());
  EXPECT_EQ(r.json["blocks"].U64(), blocks.size());
  r = Kvtier("verify " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.json["blocks_read"].U64(), blocks.size());
  // bf16 has no numpy dtype: exported as float32, exactly.
  const std::string k = scratch_.path() + "/K.npy", v = scratch_.path() + "/V.npy";
  r = Kvtier("export " + dir.path() + " --sequence 7 --keys " + k + " --values " + v + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.json["npy_dtype"].string, "<f4");
  EXPECT_TRUE(r.json["converted"].boolean);
  Result<bench::NpyArray> keys = bench::ReadNpy(k);
  ASSERT_TRUE(keys.ok());
  ASSERT_EQ(keys->shape, (std::vector<uint64_t>{3, 4 * 32, 1, 64}));
  const float* kf = reinterpret_cast<const float*>(keys->data.data());
  for (uint32_t layer = 0; layer < 3; ++layer) {
    for (uint32_t b = 0; b < 4; ++b) {
      const std::vector<std::byte>& block = blocks.at(Key(0, 7, layer, b));
      for (uint32_t t = 0; t < 32; ++t) {
        for (uint32_t d = 0; d < 64; ++d) {
          const float expect = LoadAsFloat(block.data(), t * 64 + d, DType::kBF16);
          ASSERT_EQ(kf[((uint64_t{layer} * 128) + b * 32 + t) * 64 + d], expect);
        }
      }
    }
  }
  // A store of this layout opened by the Store with another one is refused (the store's
  // rule); the tools read it as it is.
  auto other = Store::Open(OptionsFor(dir.path(), TestLayout()), TestLayout());
  EXPECT_FALSE(other.ok());
}

// ---- A store open elsewhere --------------------------------------------------------------

TEST_F(ToolsInspectTest, StoreOpenElsewhereIsReadOnly) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  auto store = Store::Open(OptionsFor(dir.path(), TestLayout()), TestLayout());
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  // A block written now, after the catalog was last closed, is seen too.
  std::vector<std::byte> extra(TestLayout().BytesPerBlock(), std::byte{0});
  ASSERT_TRUE((*store)->Put(Key(0, 7, 0, 4), extra.data(), extra.size()).ok());
  ASSERT_TRUE((*store)->Flush().ok());

  RunResult r = Kvtier("info " + dir.path() + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_TRUE(r.json["locked"].boolean);
  EXPECT_EQ(r.json["blocks"].U64(), blocks.size() + 1);
  r = Kvtier("ls " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_TRUE(r.json["locked"].boolean);
  EXPECT_EQ(r.json["count"].U64(), blocks.size() + 1);
  r = Kvtier("verify " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(r.json["locked"].boolean);
  EXPECT_EQ(r.json["blocks_read"].U64(), blocks.size() + 1);
  r = Kvtier("export " + dir.path() + " --sequence 9 --namespace 1 --keys " + scratch_.path() +
             "/K.npy --values " + scratch_.path() + "/V.npy --json");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  // The repair refuses, saying why, and changes nothing.
  r = Kvtier("verify --repair " + dir.path() + " --json");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.json["error"]["message"].string.find("open in another process"), std::string::npos)
      << r.out;
  // The store works on, and the tools left no trace.
  std::vector<std::byte> out(extra.size());
  EXPECT_TRUE((*store)->Get(Key(0, 7, 0, 4), out.data(), out.size()).ok());
  store->reset();
  EXPECT_EQ(Kvtier("verify " + dir.path() + " --json").json["locked"].boolean, false);
}

// ---- export -------------------------------------------------------------------------------

TEST_F(ToolsInspectTest, ExportWritesTheStoredKeysAndValues) {
  TempDir dir;
  Blocks blocks = MakeStore(dir.path());
  const ModelLayout l = TestLayout();
  const std::string k = scratch_.path() + "/K.npy", v = scratch_.path() + "/V.npy";
  RunResult r =
      Kvtier("export " + dir.path() + " --sequence 7 --keys " + k + " --values " + v + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  ASSERT_TRUE(r.json_ok) << r.out;
  EXPECT_EQ(r.json["sequence"].string, SequenceId::FromU64(7).ToHex());
  EXPECT_EQ(r.json["layer_begin"].U64(), 0u);
  EXPECT_EQ(r.json["layer_end"].U64(), 2u);
  EXPECT_EQ(r.json["stored_dtype"].string, "f16");
  EXPECT_EQ(r.json["npy_dtype"].string, "<f2");
  EXPECT_FALSE(r.json["converted"].boolean);
  ASSERT_EQ(r.json["shape"].array.size(), 4u);
  Result<bench::NpyArray> keys = bench::ReadNpy(k), values = bench::ReadNpy(v);
  ASSERT_TRUE(keys.ok() && values.ok());
  const std::vector<uint64_t> shape = {2, 64, 2, 32};
  ASSERT_EQ(keys->shape, shape);
  ASSERT_EQ(values->shape, shape);
  EXPECT_EQ(keys->dtype, bench::NpyDType::kFloat16);
  // Element (layer, token, head, d) is the block's [head][token % 16][d] (keys first).
  const uint64_t half = l.KeyBytesPerBlock();
  for (uint32_t layer = 0; layer < 2; ++layer) {
    for (uint32_t t = 0; t < 64; ++t) {
      const std::vector<std::byte>& block = blocks.at(Key(0, 7, layer, t / 16));
      for (uint32_t h = 0; h < 2; ++h) {
        const uint64_t src = ((uint64_t{h} * 16 + t % 16) * 32) * 2;
        const uint64_t dst = (((uint64_t{layer} * 64 + t) * 2 + h) * 32) * 2;
        ASSERT_EQ(std::memcmp(keys->data.data() + dst, block.data() + src, 64), 0);
        ASSERT_EQ(std::memcmp(values->data.data() + dst, block.data() + half + src, 64), 0);
      }
    }
  }
  // --layers, and errors.
  r = Kvtier("export " + dir.path() + " --sequence 7 --layers 1:2 --keys " + k + " --values " + v);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(bench::ReadNpy(k)->shape, (std::vector<uint64_t>{1, 64, 2, 32}));
  EXPECT_EQ(
      Kvtier("export " + dir.path() + " --sequence 8 --keys " + k + " --values " + v).exit_code, 2);
  EXPECT_EQ(
      Kvtier("export " + dir.path() + " --sequence 7 --layers 1:5 --keys " + k + " --values " + v)
          .exit_code,
      2);
  EXPECT_EQ(Kvtier("export " + dir.path() + " --sequence 7 --keys /nonexistent/K.npy --values " + v)
                .exit_code,
            2);
}

TEST_F(ToolsInspectTest, ExportImportExportIsByteExact) {
  // The top-level help also exits 0: only import's own help names --keys.
  RunResult help = Kvtier("import --help");
  if (help.exit_code != 0 || help.out.find("--keys") == std::string::npos) {
    GTEST_SKIP() << "kvtier import is not built into " << KVTIER_TOOL;
  }
  TempDir dir, copy;
  MakeStore(dir.path());
  const std::string k1 = scratch_.path() + "/K1.npy", v1 = scratch_.path() + "/V1.npy";
  const std::string k2 = scratch_.path() + "/K2.npy", v2 = scratch_.path() + "/V2.npy";
  RunResult r = Kvtier("export " + dir.path() + " --sequence 7 --keys " + k1 + " --values " + v1);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string target = copy.path() + "/store";
  r = Kvtier("import " + target + " --sequence 7 --keys " + k1 + " --values " + v1 +
             " --block-tokens 16 --query-heads 4");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  r = Kvtier("export " + target + " --sequence 7 --keys " + k2 + " --values " + v2);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFile(k1), ReadFile(k2));
  EXPECT_EQ(ReadFile(v1), ReadFile(v2));
  EXPECT_FALSE(ReadFile(k1).empty());
}

}  // namespace
}  // namespace kvtier
