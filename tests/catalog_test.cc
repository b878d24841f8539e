#include "storage/catalog.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace kvtier {
namespace {

// Random values over narrow or full ranges: narrow ranges make ties in the leading
// fields common, so ordering and prefix tests reach the later fields.
BlockKey RandomKey(std::mt19937_64& rng, bool narrow = false) {
  if (narrow) {
    return BlockKey{.namespace_id = static_cast<uint32_t>(rng() % 3),
                    .sequence = {rng() % 3, rng() % 3},
                    .layer = static_cast<uint32_t>(rng() % 3),
                    .block = static_cast<uint32_t>(rng() % 300)};
  }
  return BlockKey{.namespace_id = static_cast<uint32_t>(rng()),
                  .sequence = {rng(), rng()},
                  .layer = static_cast<uint32_t>(rng()),
                  .block = static_cast<uint32_t>(rng())};
}

DiskLocation RandomLocation(std::mt19937_64& rng) {
  return DiskLocation{.file = static_cast<uint32_t>(rng()),
                      .offset = rng(),
                      .length = rng(),
                      .data_bytes = rng(),
                      .checksum = rng(),
                      .flags = static_cast<uint32_t>(rng()),
                      .generation = rng()};
}

std::string RandomBytes(std::mt19937_64& rng, size_t size) {
  std::string out(size, '\0');
  for (char& c : out) c = static_cast<char>(rng());
  return out;
}

CatalogMeta RandomMeta(std::mt19937_64& rng) {
  CatalogMeta meta;
  meta.format_version = static_cast<uint32_t>(rng());
  meta.layout = ModelLayout{.num_layers = static_cast<uint32_t>(rng()),
                            .num_kv_heads = static_cast<uint32_t>(rng()),
                            .num_query_heads = static_cast<uint32_t>(rng()),
                            .head_dim = static_cast<uint32_t>(rng()),
                            .dtype = static_cast<DType>(rng() % 4),
                            .block_tokens = static_cast<uint32_t>(rng())};
  meta.layout_fingerprint = rng();
  meta.slab_files.resize(rng() % 6);
  for (SlabFileInfo& file : meta.slab_files) {
    file.path = "/data/" + RandomBytes(rng, rng() % 40);  // any bytes, NULs included
    file.bytes = rng();
  }
  return meta;
}

std::vector<std::byte> RandomByteVector(std::mt19937_64& rng, size_t size) {
  std::vector<std::byte> out(size);
  for (std::byte& b : out) b = static_cast<std::byte>(rng());
  return out;
}

// ---- Encodings ------------------------------------------------------------------------

TEST(CatalogEncodingTest, BlockKeyRoundTrip) {
  std::mt19937_64 rng(101);
  std::vector<BlockKey> keys = {BlockKey{}, BlockKey{.namespace_id = UINT32_MAX,
                                                     .sequence = {UINT64_MAX, UINT64_MAX},
                                                     .layer = UINT32_MAX,
                                                     .block = UINT32_MAX}};
  for (int i = 0; i < 2000; ++i) keys.push_back(RandomKey(rng, i % 2 == 0));
  for (const BlockKey& key : keys) {
    std::string bytes = EncodeBlockKey(key);
    ASSERT_EQ(bytes.size(), 28u);
    Result<BlockKey> back = DecodeBlockKey(bytes);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(*back, key) << key.ToString();
  }
}

TEST(CatalogEncodingTest, BlockKeyIsBigEndianInFieldOrder) {
  BlockKey key{.namespace_id = 0x01020304,
               .sequence = {0x05060708090a0b0cull, 0x0d0e0f1011121314ull},
               .layer = 0x15161718,
               .block = 0x191a1b1c};
  std::string expected;
  for (int i = 1; i <= 28; ++i) expected.push_back(static_cast<char>(i));
  EXPECT_EQ(EncodeBlockKey(key), expected);
}

TEST(CatalogEncodingTest, BlockKeyByteOrderIsKeyOrder) {
  std::mt19937_64 rng(102);
  for (bool narrow : {true, false}) {
    std::vector<BlockKey> keys;
    for (int i = 0; i < 3000; ++i) keys.push_back(RandomKey(rng, narrow));
    std::vector<BlockKey> by_key = keys;
    std::sort(by_key.begin(), by_key.end());
    std::vector<std::string> encoded;
    for (const BlockKey& key : keys) encoded.push_back(EncodeBlockKey(key));
    std::sort(encoded.begin(), encoded.end());  // std::string: unsigned byte order
    ASSERT_EQ(encoded.size(), by_key.size());
    for (size_t i = 0; i < by_key.size(); ++i) {
      ASSERT_EQ(encoded[i], EncodeBlockKey(by_key[i])) << "at " << i << " narrow=" << narrow;
    }
  }
}

TEST(CatalogEncodingTest, DiskLocationRoundTrip) {
  std::mt19937_64 rng(103);
  for (int i = 0; i < 2000; ++i) {
    DiskLocation location = i == 0 ? DiskLocation{} : RandomLocation(rng);
    std::string bytes = EncodeDiskLocation(location);
    ASSERT_EQ(bytes.size(), 49u);
    EXPECT_EQ(static_cast<uint8_t>(bytes[0]), 1u);  // the version byte
    Result<DiskLocation> back = DecodeDiskLocation(bytes);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(*back, location);
  }
}

TEST(CatalogEncodingTest, CatalogMetaRoundTrip) {
  std::mt19937_64 rng(104);
  std::vector<CatalogMeta> metas = {CatalogMeta{}};
  metas.push_back(
      CatalogMeta{.layout = ModelLayout::Llama3_8B(),
                  .layout_fingerprint = ModelLayout::Llama3_8B().Fingerprint(),
                  .slab_files = {{"/nvme0/slab0", 1ull << 40}, {"/nvme1/slab1", 4096}}});
  for (int i = 0; i < 500; ++i) metas.push_back(RandomMeta(rng));
  for (const CatalogMeta& meta : metas) {
    Result<CatalogMeta> back = DecodeCatalogMeta(EncodeCatalogMeta(meta));
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(*back, meta);
  }
}

// Every decoder, on random bytes of random sizes: an error (Corruption) or a value,
// never a crash or a read past the input (the sanitizers check that).
TEST(CatalogEncodingTest, DecodersRejectRandomGarbage) {
  std::mt19937_64 rng(105);
  int meta_errors = 0;
  const int kTrials = 20000;
  for (int i = 0; i < kTrials; ++i) {
    std::string garbage = RandomBytes(rng, rng() % 120);
    // Half the trials carry a valid version byte, so the decoders get past it.
    if (!garbage.empty() && i % 2 == 0) garbage[0] = 1;

    Result<BlockKey> key = DecodeBlockKey(garbage);
    EXPECT_EQ(key.ok(), garbage.size() == 28);
    if (!key.ok()) {
      EXPECT_EQ(key.status().code(), StatusCode::kCorruption);
    }

    Result<DiskLocation> location = DecodeDiskLocation(garbage);
    EXPECT_EQ(location.ok(), garbage.size() == 49 && garbage[0] == 1);
    if (!location.ok()) {
      EXPECT_EQ(location.status().code(), StatusCode::kCorruption);
    }

    Result<CatalogMeta> meta = DecodeCatalogMeta(garbage);
    if (!meta.ok()) {
      EXPECT_EQ(meta.status().code(), StatusCode::kCorruption) << meta.status().ToString();
      ++meta_errors;
    } else {
      EXPECT_EQ(EncodeCatalogMeta(*meta), garbage);  // only an exact encoding decodes
    }
  }
  EXPECT_GT(meta_errors, kTrials * 9 / 10);
}

TEST(CatalogEncodingTest, DecodersRejectTruncatedExtendedAndMisversionedInput) {
  std::mt19937_64 rng(106);
  for (int i = 0; i < 50; ++i) {
    CatalogMeta meta = RandomMeta(rng);
    if (meta.slab_files.empty()) meta.slab_files.push_back({"/slab", 1});
    const std::string encodings[] = {EncodeBlockKey(RandomKey(rng)),
                                     EncodeDiskLocation(RandomLocation(rng)),
                                     EncodeCatalogMeta(meta)};
    auto decode = [&](int which, std::string_view bytes) -> Status {
      switch (which) {
        case 0: {
          Result<BlockKey> r = DecodeBlockKey(bytes);
          return r.ok() ? Status::OK() : r.status();
        }
        case 1: {
          Result<DiskLocation> r = DecodeDiskLocation(bytes);
          return r.ok() ? Status::OK() : r.status();
        }
        default: {
          Result<CatalogMeta> r = DecodeCatalogMeta(bytes);
          return r.ok() ? Status::OK() : r.status();
        }
      }
    };
    for (int which = 0; which < 3; ++which) {
      const std::string& good = encodings[which];
      ASSERT_TRUE(decode(which, good).ok());
      for (size_t size = 0; size < good.size(); ++size) {
        Status s = decode(which, std::string_view(good).substr(0, size));
        EXPECT_EQ(s.code(), StatusCode::kCorruption) << which << " truncated to " << size;
      }
      EXPECT_EQ(decode(which, good + '\0').code(), StatusCode::kCorruption) << which;
      if (which > 0) {  // the versioned encodings
        std::string misversioned = good;
        misversioned[0] = static_cast<char>(2 + rng() % 250);
        Status s = decode(which, misversioned);
        EXPECT_EQ(s.code(), StatusCode::kCorruption) << which;
        EXPECT_NE(s.message().find("version"), std::string::npos) << s.ToString();
      }
    }
  }
}

TEST(CatalogEncodingTest, MetaWithUnknownDTypeIsCorruption) {
  CatalogMeta meta;
  meta.layout = ModelLayout::Llama2_7B();
  std::string bytes = EncodeCatalogMeta(meta);
  bytes[1 + 4 * 5] = 17;  // after the version byte, format version and four u32 fields
  Result<CatalogMeta> back = DecodeCatalogMeta(bytes);
  EXPECT_EQ(back.status().code(), StatusCode::kCorruption);
  EXPECT_NE(back.status().message().find("dtype"), std::string::npos);
}

// ---- The catalog ----------------------------------------------------------------------

class CatalogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/kvtier_catalog_test.XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    root_ = pattern;
    dir_ = root_ + "/catalog";
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(root_, ec);
  }

  std::unique_ptr<Catalog> OpenCatalog(bool create_if_missing = true) {
    Result<std::unique_ptr<Catalog>> catalog = Catalog::Open(dir_, create_if_missing);
    EXPECT_TRUE(catalog.ok()) << catalog.status().ToString();
    return catalog.ok() ? std::move(catalog).value() : nullptr;
  }

  // Every block, in ForEachBlock's order.
  static std::vector<std::pair<BlockKey, DiskLocation>> AllBlocks(Catalog& catalog) {
    std::vector<std::pair<BlockKey, DiskLocation>> blocks;
    Status s = catalog.ForEachBlock([&](const BlockKey& key, const DiskLocation& location) {
      blocks.emplace_back(key, location);
      return true;
    });
    EXPECT_TRUE(s.ok()) << s.ToString();
    return blocks;
  }

  static void ExpectMatchesModel(Catalog& catalog, const std::map<BlockKey, DiskLocation>& model) {
    std::vector<std::pair<BlockKey, DiskLocation>> blocks = AllBlocks(catalog);
    std::vector<std::pair<BlockKey, DiskLocation>> expected(model.begin(), model.end());
    ASSERT_EQ(blocks.size(), expected.size());
    for (size_t i = 0; i < blocks.size(); ++i) {
      ASSERT_EQ(blocks[i].first, expected[i].first) << "at " << i;
      ASSERT_EQ(blocks[i].second, expected[i].second) << blocks[i].first.ToString();
    }
  }

  std::string root_;
  std::string dir_;
};

TEST_F(CatalogTest, OpenMissingIsNotFound) {
  Result<std::unique_ptr<Catalog>> missing = Catalog::Open(dir_, /*create_if_missing=*/false);
  EXPECT_TRUE(missing.status().IsNotFound()) << missing.status().ToString();
  EXPECT_NE(missing.status().message().find(dir_), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(dir_));  // nothing created

  // An existing directory with no database in it is no catalog either.
  std::filesystem::create_directories(dir_);
  EXPECT_TRUE(Catalog::Open(dir_, false).status().IsNotFound());

  EXPECT_TRUE(Catalog::Open("", true).status().IsInvalidArgument());
}

TEST_F(CatalogTest, CreatesMissingDirectoriesAndReopens) {
  dir_ = root_ + "/a/b/catalog";
  { ASSERT_NE(OpenCatalog(), nullptr); }
  ASSERT_NE(OpenCatalog(/*create_if_missing=*/false), nullptr);
}

TEST_F(CatalogTest, SecondOpenWhileOpenFails) {
  std::unique_ptr<Catalog> first = OpenCatalog();
  ASSERT_NE(first, nullptr);
  Result<std::unique_ptr<Catalog>> second = Catalog::Open(dir_, false);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kIOError) << second.status().ToString();
  EXPECT_NE(second.status().message().find(dir_), std::string::npos);
}

TEST_F(CatalogTest, MetaWriteReadAndPersistence) {
  std::mt19937_64 rng(201);
  CatalogMeta meta = RandomMeta(rng);
  {
    std::unique_ptr<Catalog> catalog = OpenCatalog();
    ASSERT_NE(catalog, nullptr);
    Result<std::optional<CatalogMeta>> none = catalog->ReadMeta();
    ASSERT_TRUE(none.ok()) << none.status().ToString();
    EXPECT_FALSE(none->has_value());

    ASSERT_TRUE(catalog->WriteMeta(RandomMeta(rng)).ok());
    ASSERT_TRUE(catalog->WriteMeta(meta).ok());  // the later write wins
    Result<std::optional<CatalogMeta>> read = catalog->ReadMeta();
    ASSERT_TRUE(read.ok()) << read.status().ToString();
    ASSERT_TRUE(read->has_value());
    EXPECT_EQ(**read, meta);
    ASSERT_TRUE(catalog->Close().ok());
  }
  std::unique_ptr<Catalog> reopened = OpenCatalog(false);
  ASSERT_NE(reopened, nullptr);
  Result<std::optional<CatalogMeta>> read = reopened->ReadMeta();
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  ASSERT_TRUE(read->has_value());
  EXPECT_EQ(**read, meta);
}

// Random batches of puts and deletes over a small key space, checked after each batch
// against a std::map of what was committed.
TEST_F(CatalogTest, CommitMatchesModelUnderRandomBatches) {
  std::mt19937_64 rng(202);
  std::unique_ptr<Catalog> catalog = OpenCatalog();
  ASSERT_NE(catalog, nullptr);
  std::map<BlockKey, DiskLocation> model;
  std::vector<BlockKey> universe;
  for (int i = 0; i < 200; ++i) universe.push_back(RandomKey(rng, /*narrow=*/true));
  for (int round = 0; round < 60; ++round) {
    std::vector<Catalog::Update> batch(1 + rng() % 20);
    for (Catalog::Update& update : batch) {
      update.key = universe[rng() % universe.size()];
      if (rng() % 3 != 0) update.location = RandomLocation(rng);
    }
    ASSERT_TRUE(catalog->Commit(batch).ok());
    for (const Catalog::Update& update : batch) {
      if (update.location) {
        model[update.key] = *update.location;
      } else {
        model.erase(update.key);
      }
    }
    for (int probe = 0; probe < 20; ++probe) {
      const BlockKey& key = universe[rng() % universe.size()];
      Result<std::optional<DiskLocation>> found = catalog->Lookup(key);
      ASSERT_TRUE(found.ok()) << found.status().ToString();
      auto it = model.find(key);
      ASSERT_EQ(found->has_value(), it != model.end()) << key.ToString();
      if (it != model.end()) {
        EXPECT_EQ(**found, it->second);
      }
    }
    ExpectMatchesModel(*catalog, model);
  }
  EXPECT_TRUE(catalog->Commit({}).ok());  // an empty batch is a no-op
  ExpectMatchesModel(*catalog, model);
}

TEST_F(CatalogTest, CommitAppliesABatchInOrder) {
  std::mt19937_64 rng(203);
  std::unique_ptr<Catalog> catalog = OpenCatalog();
  ASSERT_NE(catalog, nullptr);
  BlockKey a = RandomKey(rng), b = RandomKey(rng), c = RandomKey(rng);
  DiskLocation first = RandomLocation(rng), second = RandomLocation(rng);
  std::vector<Catalog::Update> batch = {
      {a, first},        {a, std::nullopt},  // put then delete: absent
      {b, std::nullopt}, {b, first},         // delete then put: present
      {c, first},        {c, second},        // put twice: the second
  };
  ASSERT_TRUE(catalog->Commit(batch).ok());
  EXPECT_FALSE(catalog->Lookup(a)->has_value());
  EXPECT_EQ(catalog->Lookup(b)->value(), first);
  EXPECT_EQ(catalog->Lookup(c)->value(), second);
}

// A reader scanning while batches are committed sees each batch whole or not at all.
TEST_F(CatalogTest, CommitIsAtomic) {
  std::mt19937_64 rng(204);
  std::unique_ptr<Catalog> catalog = OpenCatalog();
  ASSERT_NE(catalog, nullptr);
  constexpr uint32_t kBatches = 40;
  constexpr uint32_t kBatchSize = 64;
  std::atomic<bool> done{false};
  std::atomic<int> scans{0};
  std::thread reader([&] {
    while (!done.load()) {
      std::map<uint64_t, uint32_t> per_batch;
      Status s = catalog->ForEachBlock([&](const BlockKey& key, const DiskLocation&) {
        ++per_batch[key.sequence.lo];
        return true;
      });
      EXPECT_TRUE(s.ok()) << s.ToString();
      for (const auto& [batch, count] : per_batch) {
        EXPECT_EQ(count, kBatchSize) << "batch " << batch << " seen in part";
      }
      ++scans;
    }
  });
  for (uint32_t batch_index = 0; batch_index < kBatches; ++batch_index) {
    std::vector<Catalog::Update> batch;
    for (uint32_t i = 0; i < kBatchSize; ++i) {
      // Spread over layers so a batch's keys are not adjacent to each other only.
      batch.push_back({BlockKey{.namespace_id = 7,
                                .sequence = SequenceId::FromU64(batch_index),
                                .layer = i % 4,
                                .block = i},
                       RandomLocation(rng)});
    }
    ASSERT_TRUE(catalog->Commit(batch).ok());
  }
  done = true;
  reader.join();
  EXPECT_GT(scans.load(), 0);
  EXPECT_EQ(AllBlocks(*catalog).size(), size_t{kBatches} * kBatchSize);
}

TEST_F(CatalogTest, ForEachBlockVisitsInKeyOrderAndStopsEarly) {
  std::mt19937_64 rng(205);
  std::unique_ptr<Catalog> catalog = OpenCatalog();
  ASSERT_NE(catalog, nullptr);
  std::map<BlockKey, DiskLocation> model;
  std::vector<Catalog::Update> batch;
  for (int i = 0; i < 500; ++i) {
    Catalog::Update update{RandomKey(rng, i % 2 == 0), RandomLocation(rng)};
    model[update.key] = *update.location;
    batch.push_back(update);
  }
  ASSERT_TRUE(catalog->Commit(batch).ok());
  ExpectMatchesModel(*catalog, model);

  for (size_t stop_after : {size_t{1}, size_t{17}, model.size()}) {
    std::vector<BlockKey> seen;
    Status s = catalog->ForEachBlock([&](const BlockKey& key, const DiskLocation&) {
      seen.push_back(key);
      return seen.size() < stop_after;
    });
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_EQ(seen.size(), stop_after);
    auto it = model.begin();
    for (const BlockKey& key : seen) EXPECT_EQ(key, (it++)->first);
  }

  std::unique_ptr<Catalog> empty_dir_catalog;
  dir_ = root_ + "/empty";
  empty_dir_catalog = OpenCatalog();
  ASSERT_NE(empty_dir_catalog, nullptr);
  EXPECT_TRUE(AllBlocks(*empty_dir_catalog).empty());
}

TEST_F(CatalogTest, ForEachBlockOfSequenceYieldsOnlyThatSequence) {
  std::mt19937_64 rng(206);
  std::unique_ptr<Catalog> catalog = OpenCatalog();
  ASSERT_NE(catalog, nullptr);
  // Targets, among them ones whose prefix ends in 0xff bytes (the upper bound carries)
  // and the all-0xff prefix (no upper bound at all).
  const std::vector<std::pair<uint32_t, SequenceId>> targets = {
      {5, {rng(), rng()}},
      {5, {3, UINT64_MAX}},
      {0, {0, 0}},
      {UINT32_MAX, {UINT64_MAX, UINT64_MAX}},
      {1, {UINT64_MAX, UINT64_MAX}},
  };
  std::map<BlockKey, DiskLocation> model;
  std::vector<Catalog::Update> batch;
  auto add = [&](uint32_t ns, SequenceId sequence, int blocks) {
    for (int i = 0; i < blocks; ++i) {
      BlockKey key{.namespace_id = ns,
                   .sequence = sequence,
                   .layer = static_cast<uint32_t>(rng() % 4),
                   .block = static_cast<uint32_t>(rng() % 64)};
      if (i == 0) key.layer = key.block = 0;
      if (i == 1) key.layer = key.block = UINT32_MAX;
      DiskLocation location = RandomLocation(rng);
      model[key] = location;
      batch.push_back({key, location});
    }
  };
  for (const auto& [ns, sequence] : targets) {
    add(ns, sequence, 40);
    // Neighbours: the adjacent namespaces and sequences, with wrap-around.
    add(ns + 1, sequence, 5);
    add(ns - 1, sequence, 5);
    add(ns, SequenceId{sequence.hi, sequence.lo + 1}, 5);
    add(ns, SequenceId{sequence.hi, sequence.lo - 1}, 5);
    add(ns, SequenceId{sequence.hi + 1, sequence.lo}, 5);
    add(ns, SequenceId{sequence.hi - 1, sequence.lo}, 5);
    add(ns, SequenceId{sequence.lo, sequence.hi}, 5);
  }
  ASSERT_TRUE(catalog->Commit(batch).ok());

  for (const auto& [ns, sequence] : targets) {
    std::vector<std::pair<BlockKey, DiskLocation>> expected;
    for (const auto& [key, location] : model) {
      if (key.namespace_id == ns && key.sequence == sequence) expected.emplace_back(key, location);
    }
    ASSERT_GE(expected.size(), 2u);
    std::vector<std::pair<BlockKey, DiskLocation>> seen;
    Status s = catalog->ForEachBlockOfSequence(
        ns, sequence, [&](const BlockKey& key, const DiskLocation& location) {
          seen.emplace_back(key, location);
          return true;
        });
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(seen, expected) << ns << "/" << sequence.ToHex();

    size_t visits = 0;
    s = catalog->ForEachBlockOfSequence(
        ns, sequence, [&](const BlockKey&, const DiskLocation&) { return ++visits < 3; });
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(visits, 3u);
  }

  size_t visits = 0;
  ASSERT_TRUE(catalog
                  ->ForEachBlockOfSequence(12345, {rng(), rng()},
                                           [&](const BlockKey&, const DiskLocation&) {
                                             ++visits;
                                             return true;
                                           })
                  .ok());
  EXPECT_EQ(visits, 0u);
}

TEST_F(CatalogTest, RepresentativesRoundTripAndPersist) {
  std::mt19937_64 rng(207);
  std::map<BlockKey, std::vector<std::byte>> model;
  {
    std::unique_ptr<Catalog> catalog = OpenCatalog();
    ASSERT_NE(catalog, nullptr);
    for (int i = 0; i < 100; ++i) {
      BlockKey key = RandomKey(rng, /*narrow=*/true);
      std::vector<std::byte> data = RandomByteVector(rng, i == 0 ? 0 : rng() % 2048);
      ASSERT_TRUE(catalog->PutRepresentatives(key, data).ok());
      model[key] = data;  // a later put for the same key replaces the earlier
    }
    for (const auto& [key, data] : model) {
      Result<std::optional<std::vector<std::byte>>> read = catalog->GetRepresentatives(key);
      ASSERT_TRUE(read.ok()) << read.status().ToString();
      ASSERT_TRUE(read->has_value()) << key.ToString();
      EXPECT_EQ(**read, data);
    }
    Result<std::optional<std::vector<std::byte>>> absent =
        catalog->GetRepresentatives(RandomKey(rng));
    ASSERT_TRUE(absent.ok());
    EXPECT_FALSE(absent->has_value());
    // Representatives live apart from the block entries.
    EXPECT_TRUE(AllBlocks(*catalog).empty());
    EXPECT_FALSE(catalog->Lookup(model.begin()->first)->has_value());
    ASSERT_TRUE(catalog->Close().ok());
  }
  std::unique_ptr<Catalog> reopened = OpenCatalog(false);
  ASSERT_NE(reopened, nullptr);
  for (const auto& [key, data] : model) {
    Result<std::optional<std::vector<std::byte>>> read = reopened->GetRepresentatives(key);
    ASSERT_TRUE(read.ok()) << read.status().ToString();
    ASSERT_TRUE(read->has_value());
    EXPECT_EQ(**read, data);
  }
}

TEST_F(CatalogTest, RemovingABlockRemovesItsRepresentatives) {
  std::mt19937_64 rng(209);
  std::unique_ptr<Catalog> catalog = OpenCatalog();
  ASSERT_NE(catalog, nullptr);
  const BlockKey gone = RandomKey(rng), kept = RandomKey(rng);
  ASSERT_NE(gone, kept);
  const std::vector<std::byte> reps = RandomByteVector(rng, 256);
  for (const BlockKey& key : {gone, kept}) {
    // A commit of the location replaces the representatives (none here), so they are
    // put after it, as Store::IndexBlock does for a durable block.
    const Catalog::Update put{key, DiskLocation{.length = 4096, .generation = 1}};
    ASSERT_TRUE(catalog->Commit({&put, 1}).ok());
    ASSERT_TRUE(catalog->PutRepresentatives(key, reps).ok());
  }
  const Catalog::Update removal{gone, std::nullopt};
  ASSERT_TRUE(catalog->Commit({&removal, 1}).ok());
  EXPECT_FALSE(catalog->GetRepresentatives(gone)->has_value());
  ASSERT_TRUE(catalog->GetRepresentatives(kept)->has_value());
  EXPECT_EQ(**catalog->GetRepresentatives(kept), reps);
}

// Every (key, representatives) pair, in ForEachRepresentatives' order.
std::vector<std::pair<BlockKey, std::vector<std::byte>>> AllRepresentatives(Catalog& catalog) {
  std::vector<std::pair<BlockKey, std::vector<std::byte>>> all;
  Status s =
      catalog.ForEachRepresentatives([&](const BlockKey& key, std::span<const std::byte> data) {
        all.emplace_back(key, std::vector<std::byte>(data.begin(), data.end()));
        return true;
      });
  EXPECT_TRUE(s.ok()) << s.ToString();
  return all;
}

// A block's location and its representatives go in one batch: a later update replaces
// both, an update without representatives removes the old ones, a removal takes both.
TEST_F(CatalogTest, CommitWritesRepresentativesWithTheLocation) {
  std::mt19937_64 rng(211);
  std::unique_ptr<Catalog> catalog = OpenCatalog();
  ASSERT_NE(catalog, nullptr);
  const BlockKey a = RandomKey(rng), b = RandomKey(rng), c = RandomKey(rng);
  const DiskLocation la = RandomLocation(rng), lb = RandomLocation(rng), lc = RandomLocation(rng);
  const std::vector<std::byte> ra = RandomByteVector(rng, 300), rb = RandomByteVector(rng, 77),
                               rb2 = RandomByteVector(rng, 1000);
  std::vector<Catalog::Update> batch = {{a, la, ra}, {b, lb, rb}, {c, lc, {}}};
  ASSERT_TRUE(catalog->Commit(batch).ok());
  EXPECT_EQ(catalog->Lookup(a)->value(), la);
  EXPECT_EQ(**catalog->GetRepresentatives(a), ra);
  EXPECT_EQ(**catalog->GetRepresentatives(b), rb);
  EXPECT_FALSE(catalog->GetRepresentatives(c)->has_value());

  // b rewritten with new representatives, a rewritten without any.
  const DiskLocation la2 = RandomLocation(rng), lb2 = RandomLocation(rng);
  batch = {{b, lb2, rb2}, {a, la2, {}}};
  ASSERT_TRUE(catalog->Commit(batch).ok());
  EXPECT_EQ(catalog->Lookup(b)->value(), lb2);
  EXPECT_EQ(**catalog->GetRepresentatives(b), rb2);
  EXPECT_EQ(catalog->Lookup(a)->value(), la2);
  EXPECT_FALSE(catalog->GetRepresentatives(a)->has_value());

  // Put then delete in one batch: neither survives; delete then put: both do.
  batch = {{b, std::nullopt}, {c, lc, ra}, {c, std::nullopt}, {a, std::nullopt}, {a, la, rb}};
  ASSERT_TRUE(catalog->Commit(batch).ok());
  EXPECT_FALSE(catalog->Lookup(b)->has_value());
  EXPECT_FALSE(catalog->GetRepresentatives(b)->has_value());
  EXPECT_FALSE(catalog->Lookup(c)->has_value());
  EXPECT_FALSE(catalog->GetRepresentatives(c)->has_value());
  EXPECT_EQ(**catalog->GetRepresentatives(a), rb);
  const std::vector<std::pair<BlockKey, std::vector<std::byte>>> all = AllRepresentatives(*catalog);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].first, a);
}

// Random batches of puts (with or without representatives) and removals, against a
// model; the scan is in key order and the state persists across a reopen.
TEST_F(CatalogTest, RepresentativesMatchModelUnderRandomBatchesAndReopen) {
  std::mt19937_64 rng(212);
  std::map<BlockKey, std::vector<std::byte>> model;
  std::map<BlockKey, DiskLocation> blocks;
  auto expect_matches = [&](Catalog& catalog) {
    const std::vector<std::pair<BlockKey, std::vector<std::byte>>> all =
        AllRepresentatives(catalog);
    ASSERT_EQ(all.size(), model.size());
    auto it = model.begin();
    for (const auto& [key, data] : all) {
      ASSERT_EQ(key, it->first);
      ASSERT_EQ(data, it->second) << key.ToString();
      ++it;
    }
    ExpectMatchesModel(catalog, blocks);
  };
  {
    std::unique_ptr<Catalog> catalog = OpenCatalog();
    ASSERT_NE(catalog, nullptr);
    for (int round = 0; round < 30; ++round) {
      std::vector<Catalog::Update> batch;
      for (int i = 0, n = 1 + static_cast<int>(rng() % 20); i < n; ++i) {
        Catalog::Update update{RandomKey(rng, /*narrow=*/true), std::nullopt};
        if (rng() % 4 != 0) {
          update.location = RandomLocation(rng);
          if (rng() % 3 != 0) update.representatives = RandomByteVector(rng, 1 + rng() % 600);
        }
        if (update.location) {
          blocks[update.key] = *update.location;
        } else {
          blocks.erase(update.key);
        }
        if (!update.representatives.empty()) {
          model[update.key] = update.representatives;
        } else {
          model.erase(update.key);
        }
        batch.push_back(std::move(update));
      }
      ASSERT_TRUE(catalog->Commit(batch).ok());
    }
    ASSERT_FALSE(model.empty());
    expect_matches(*catalog);
    // Stops when the visitor says so.
    size_t visits = 0;
    ASSERT_TRUE(catalog
                    ->ForEachRepresentatives(
                        [&](const BlockKey&, std::span<const std::byte>) { return ++visits < 3; })
                    .ok());
    EXPECT_EQ(visits, std::min<size_t>(3, model.size()));
    ASSERT_TRUE(catalog->Close().ok());
    EXPECT_EQ(catalog
                  ->ForEachRepresentatives(
                      [](const BlockKey&, std::span<const std::byte>) { return true; })
                  .code(),
              StatusCode::kFailedPrecondition);
  }
  std::unique_ptr<Catalog> reopened = OpenCatalog(false);
  ASSERT_NE(reopened, nullptr);
  expect_matches(*reopened);
}

TEST_F(CatalogTest, ManyEntriesPersistAcrossReopen) {
  std::mt19937_64 rng(208);
  std::map<BlockKey, DiskLocation> model;
  CatalogMeta meta = RandomMeta(rng);
  {
    std::unique_ptr<Catalog> catalog = OpenCatalog();
    ASSERT_NE(catalog, nullptr);
    ASSERT_TRUE(catalog->WriteMeta(meta).ok());
    for (int round = 0; round < 50; ++round) {
      std::vector<Catalog::Update> batch;
      for (int i = 0; i < 200; ++i) {
        Catalog::Update update{RandomKey(rng, i % 4 == 0), RandomLocation(rng)};
        if (!model.empty() && rng() % 10 == 0) {  // delete a committed entry
          auto it = model.lower_bound(RandomKey(rng));
          if (it == model.end()) it = model.begin();
          update = {it->first, std::nullopt};
        }
        batch.push_back(update);
      }
      ASSERT_TRUE(catalog->Commit(batch).ok());
      for (const Catalog::Update& update : batch) {
        if (update.location) {
          model[update.key] = *update.location;
        } else {
          model.erase(update.key);
        }
      }
    }
    ASSERT_TRUE(catalog->Close().ok());
  }
  ASSERT_GT(model.size(), 5000u);
  {
    std::unique_ptr<Catalog> reopened = OpenCatalog(false);
    ASSERT_NE(reopened, nullptr);
    ExpectMatchesModel(*reopened, model);
    EXPECT_EQ(reopened->ReadMeta()->value(), meta);
    // More changes, then no Close: the destructor closes, and nothing is lost.
    std::vector<Catalog::Update> batch;
    for (int i = 0; i < 100; ++i) {
      Catalog::Update update{RandomKey(rng), RandomLocation(rng)};
      model[update.key] = *update.location;
      batch.push_back(update);
    }
    batch.push_back({model.begin()->first, std::nullopt});
    model.erase(model.begin());
    ASSERT_TRUE(reopened->Commit(batch).ok());
  }
  std::unique_ptr<Catalog> again = OpenCatalog(false);
  ASSERT_NE(again, nullptr);
  ExpectMatchesModel(*again, model);
}

TEST_F(CatalogTest, UseAfterCloseIsFailedPrecondition) {
  std::mt19937_64 rng(209);
  std::unique_ptr<Catalog> catalog = OpenCatalog();
  ASSERT_NE(catalog, nullptr);
  BlockKey key = RandomKey(rng);
  std::vector<Catalog::Update> batch = {{key, RandomLocation(rng)}};
  ASSERT_TRUE(catalog->Commit(batch).ok());
  ASSERT_TRUE(catalog->Close().ok());
  EXPECT_TRUE(catalog->Close().ok());  // closing again is harmless

  auto visit = [](const BlockKey&, const DiskLocation&) { return true; };
  std::vector<std::byte> data = RandomByteVector(rng, 16);
  const StatusCode kClosed = StatusCode::kFailedPrecondition;
  EXPECT_EQ(catalog->ReadMeta().status().code(), kClosed);
  EXPECT_EQ(catalog->WriteMeta(CatalogMeta{}).code(), kClosed);
  EXPECT_EQ(catalog->Commit(batch).code(), kClosed);
  EXPECT_EQ(catalog->Commit({}).code(), kClosed);
  EXPECT_EQ(catalog->Lookup(key).status().code(), kClosed);
  EXPECT_EQ(catalog->ForEachBlock(visit).code(), kClosed);
  EXPECT_EQ(catalog->ForEachBlockOfSequence(key.namespace_id, key.sequence, visit).code(), kClosed);
  EXPECT_EQ(catalog->PutRepresentatives(key, data).code(), kClosed);
  EXPECT_EQ(catalog->GetRepresentatives(key).status().code(), kClosed);

  // The database was released: it opens again, with the committed entry.
  std::unique_ptr<Catalog> reopened = OpenCatalog(false);
  ASSERT_NE(reopened, nullptr);
  EXPECT_EQ(reopened->Lookup(key)->value(), batch[0].location.value());
}

TEST_F(CatalogTest, ConcurrentCommitsOnDisjointKeys) {
  std::unique_ptr<Catalog> catalog = OpenCatalog();
  ASSERT_NE(catalog, nullptr);
  constexpr int kThreads = 4;
  constexpr int kCommits = 40;
  constexpr int kPerCommit = 16;
  std::vector<std::map<BlockKey, DiskLocation>> written(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(300 + t);
      for (int c = 0; c < kCommits; ++c) {
        std::vector<Catalog::Update> batch;
        for (int i = 0; i < kPerCommit; ++i) {
          // The thread's namespace keeps its keys disjoint from the others'.
          BlockKey key = RandomKey(rng, /*narrow=*/true);
          key.namespace_id = static_cast<uint32_t>(t);
          DiskLocation location = RandomLocation(rng);
          batch.push_back({key, location});
          written[t][key] = location;
        }
        Status s = catalog->Commit(batch);
        EXPECT_TRUE(s.ok()) << s.ToString();
        // Reads interleave with the other threads' commits.
        Result<std::optional<DiskLocation>> read = catalog->Lookup(batch.back().key);
        EXPECT_TRUE(read.ok() && read->has_value());
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::map<BlockKey, DiskLocation> model;
  for (const auto& part : written) model.insert(part.begin(), part.end());
  ExpectMatchesModel(*catalog, model);
}

}  // namespace
}  // namespace kvtier
