#include "storage/catalog.h"

#include <rocksdb/cache.h>
#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/options.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>
#include <stdlib.h>

#include <cerrno>
#include <condition_variable>
#include <cstdarg>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <system_error>
#include <utility>

#include "src/util/log.h"

namespace kvtier {
namespace {

// ---- Fixed-width encoding -------------------------------------------------------------

void PutBigEndian(std::string* out, uint64_t value, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out->push_back(static_cast<char>(value >> (8 * i)));
}

void PutLittleEndian(std::string* out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>(value >> (8 * i)));
}

uint64_t GetBigEndian(std::string_view in, size_t pos, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value = (value << 8) | static_cast<uint8_t>(in[pos + i]);
  return value;
}

// Reads little-endian fields and length-prefixed strings from a value, never past its
// end: each read fails (returns false, and so does every read after it) when fewer
// bytes remain than it needs.
class LittleEndianReader {
 public:
  explicit LittleEndianReader(std::string_view in) : in_(in) {}

  bool Read(int bytes, uint64_t* value) {
    if (!ok_ || in_.size() - pos_ < static_cast<size_t>(bytes)) return ok_ = false;
    *value = 0;
    for (int i = 0; i < bytes; ++i) {
      *value |= uint64_t{static_cast<uint8_t>(in_[pos_ + i])} << (8 * i);
    }
    pos_ += bytes;
    return true;
  }
  bool Read8(uint8_t* value) { return ReadAs(1, value); }
  bool Read32(uint32_t* value) { return ReadAs(4, value); }
  bool Read64(uint64_t* value) { return Read(8, value); }
  bool ReadString(std::string* value) {
    uint32_t size = 0;
    if (!Read32(&size)) return false;
    if (in_.size() - pos_ < size) return ok_ = false;
    value->assign(in_.data() + pos_, size);
    pos_ += size;
    return true;
  }

  size_t remaining() const { return in_.size() - pos_; }

 private:
  template <typename T>
  bool ReadAs(int bytes, T* value) {
    uint64_t wide = 0;
    if (!Read(bytes, &wide)) return false;
    *value = static_cast<T>(wide);
    return true;
  }

  std::string_view in_;
  size_t pos_ = 0;
  bool ok_ = true;
};

std::string Hex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * bytes.size());
  for (char c : bytes) {
    out.push_back(kDigits[static_cast<uint8_t>(c) >> 4]);
    out.push_back(kDigits[static_cast<uint8_t>(c) & 0xF]);
  }
  return out;
}

constexpr size_t kBlockKeyBytes = 28;
constexpr size_t kSequencePrefixBytes = 20;  // namespace and sequence

constexpr uint8_t kDiskLocationVersion = 1;
constexpr size_t kDiskLocationBytes = 1 + 4 + 8 + 8 + 8 + 8 + 4 + 8;

constexpr uint8_t kCatalogMetaVersion = 1;
constexpr size_t kSlabFileMinBytes = 4 + 8;  // an empty path and the size

constexpr char kBlocksFamily[] = "blocks";
constexpr char kRepresentativesFamily[] = "representatives";
constexpr char kMetaKey[] = "meta";

// ---- rocksdb::Status -> Status --------------------------------------------------------

Status FromRocksDb(const rocksdb::Status& s, std::string_view context) {
  if (s.ok()) return Status::OK();
  std::string msg = std::string(context) + ": " + s.ToString();
  if (s.IsNoSpace() || s.IsMemoryLimit() || msg.find("No space left") != std::string::npos) {
    return Status::ResourceExhausted(msg);
  }
  switch (s.code()) {
    case rocksdb::Status::kNotFound:
      return Status::NotFound(msg);
    case rocksdb::Status::kCorruption:
      return Status::Corruption(msg);
    case rocksdb::Status::kNotSupported:
      return Status::NotSupported(msg);
    case rocksdb::Status::kInvalidArgument:
      return Status::InvalidArgument(msg);
    case rocksdb::Status::kIOError:
      return s.IsPathNotFound() ? Status::NotFound(msg) : Status::IOError(msg);
    case rocksdb::Status::kBusy:
    case rocksdb::Status::kTimedOut:
    case rocksdb::Status::kTryAgain:
      return Status::Busy(msg);
    case rocksdb::Status::kShutdownInProgress:
    case rocksdb::Status::kAborted:
      return Status::Cancelled(msg);
    case rocksdb::Status::kColumnFamilyDropped:
      return Status::FailedPrecondition(msg);
    default:
      return Status::Internal(msg);
  }
}

// ---- The one RocksDB configuration ------------------------------------------------------
//
// The catalog holds small values (a 28-byte key and a 49-byte location per block, a
// few hundred bytes of representatives) and is written once per committed block, so:
// - Durability: the WAL is on and every write is synced (WriteOptions::sync) before it
//   returns; recovery replays the WAL to the last consistent record
//   (kPointInTimeRecovery: a torn tail from a crash mid-write is dropped, and that
//   write was never acknowledged). paranoid_checks and block checksums verify on read.
// - Memory: two 4 MiB write buffers per column family, an 8 MiB LRU block cache shared
//   by the three families, index and filter blocks counted in it.
// - Lookups: a 10-bit-per-key Bloom filter on whole keys; scans use iterate_upper_bound
//   rather than a prefix extractor, so full-order iteration needs no special options.
// - No compression: values are too small to gain, and block-based tables already
//   delta-encode the shared key prefixes.
// - Two background jobs (the target machines have few cores), at most 256 open table
//   files, a small bounded info LOG and no periodic statistics dump.
struct Config {
  rocksdb::DBOptions db;
  rocksdb::ColumnFamilyOptions family;
  rocksdb::WriteOptions sync_write;
};

Config MakeConfig(bool create_if_missing) {
  Config config;
  rocksdb::DBOptions& db = config.db;
  db.create_if_missing = create_if_missing;
  db.create_missing_column_families = create_if_missing;
  db.paranoid_checks = true;
  db.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  db.max_open_files = 256;
  db.max_background_jobs = 2;
  db.keep_log_file_num = 4;
  db.max_log_file_size = 1 << 20;
  db.stats_dump_period_sec = 0;
  db.stats_persist_period_sec = 0;

  rocksdb::BlockBasedTableOptions table;
  table.block_cache = rocksdb::NewLRUCache(8 << 20);
  table.cache_index_and_filter_blocks = true;
  table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  table.whole_key_filtering = true;

  rocksdb::ColumnFamilyOptions& family = config.family;
  family.write_buffer_size = 4 << 20;
  family.max_write_buffer_number = 2;
  family.compression = rocksdb::kNoCompression;
  family.level_compaction_dynamic_level_bytes = true;
  family.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));

  config.sync_write.sync = true;
  return config;
}

// Discards RocksDB's info log (the read-only modes write nothing in the directory).
class NullLogger final : public rocksdb::Logger {
 public:
  using rocksdb::Logger::Logv;
  void Logv(const char* /*format*/, va_list /*ap*/) override {}
};

// ---- The catalog ----------------------------------------------------------------------

class RocksDbCatalog final : public Catalog {
 public:
  RocksDbCatalog(std::string dir, std::unique_ptr<rocksdb::DB> db,
                 std::vector<rocksdb::ColumnFamilyHandle*> families,
                 rocksdb::WriteOptions sync_write, bool read_only, std::string scratch_dir)
      : dir_(std::move(dir)),
        db_(std::move(db)),
        families_(std::move(families)),
        sync_write_(sync_write),
        read_only_(read_only),
        scratch_dir_(std::move(scratch_dir)) {}
  ~RocksDbCatalog() override {
    Status s = Close();
    if (!s.ok()) Log().warn("kvtier: closing catalog {}: {}", dir_, s.ToString());
  }
  RocksDbCatalog(const RocksDbCatalog&) = delete;
  RocksDbCatalog& operator=(const RocksDbCatalog&) = delete;

  Result<std::optional<CatalogMeta>> ReadMeta() override;
  Status WriteMeta(const CatalogMeta& meta) override;
  Status Commit(std::span<const Update> updates) override;
  Result<std::optional<DiskLocation>> Lookup(const BlockKey& key) override;
  Status ForEachBlock(const Visitor& visit) override;
  Status ForEachBlockOfSequence(uint32_t namespace_id, const SequenceId& sequence,
                                const Visitor& visit) override;
  Status PutRepresentatives(const BlockKey& key, std::span<const std::byte> data) override;
  Result<std::optional<std::vector<std::byte>>> GetRepresentatives(const BlockKey& key) override;
  Status ForEachRepresentatives(const RepresentativesVisitor& visit) override;
  Status Close() override;

 private:
  // Counts a call in progress for its lifetime, so that Close waits for it before it
  // closes the database; fails with FailedPrecondition after Close.
  class InUse {
   public:
    explicit InUse(RocksDbCatalog* catalog) : catalog_(catalog) {
      std::lock_guard<std::mutex> lock(catalog_->mu_);
      if (catalog_->closed_) {
        status_ = Status::FailedPrecondition("catalog " + catalog_->dir_ + " is closed");
      } else {
        ++catalog_->active_calls_;
      }
    }
    ~InUse() {
      if (!status_.ok()) return;
      std::lock_guard<std::mutex> lock(catalog_->mu_);
      if (--catalog_->active_calls_ == 0) catalog_->idle_.notify_all();
    }
    InUse(const InUse&) = delete;
    InUse& operator=(const InUse&) = delete;
    const Status& status() const { return status_; }

   private:
    RocksDbCatalog* catalog_;
    Status status_;
  };

  rocksdb::ColumnFamilyHandle* meta_family() const { return families_[0]; }
  rocksdb::ColumnFamilyHandle* blocks_family() const { return families_[1]; }
  rocksdb::ColumnFamilyHandle* representatives_family() const { return families_[2]; }
  Status Error(const rocksdb::Status& s, std::string_view what) const {
    return FromRocksDb(s, "catalog " + dir_ + ": " + std::string(what));
  }
  // Visits the blocks from `start` while their keys begin with `prefix`, and before
  // `upper_bound` when it is not empty.
  Status Scan(std::string_view start, std::string_view prefix, const std::string& upper_bound,
              bool fill_cache, const Visitor& visit);
  Status CloseDatabase();
  // FailedPrecondition for a write to a catalog opened read-only.
  Status CheckWritable(std::string_view what) const {
    if (!read_only_) return Status::OK();
    return Status::FailedPrecondition("catalog " + dir_ + " is open read-only: cannot " +
                                      std::string(what));
  }

  const std::string dir_;
  // Set at construction and released only by Close, once no call is in progress.
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> families_;  // default, blocks, representatives
  const rocksdb::WriteOptions sync_write_;
  const bool read_only_;
  const std::string scratch_dir_;  // a secondary instance's info log; removed at Close

  std::mutex mu_;
  std::condition_variable idle_;  // active_calls_ dropped to 0
  bool closed_ = false;           // guarded by mu_
  int active_calls_ = 0;          // guarded by mu_
};

Result<std::optional<CatalogMeta>> RocksDbCatalog::ReadMeta() {
  InUse in_use(this);
  KVTIER_RETURN_IF_ERROR(in_use.status());
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), meta_family(), kMetaKey, &value);
  if (s.IsNotFound()) return std::optional<CatalogMeta>();
  if (!s.ok()) return Error(s, "reading the metadata");
  Result<CatalogMeta> meta = DecodeCatalogMeta(value);
  if (!meta.ok()) return meta.status().WithContext("catalog " + dir_);
  return std::optional<CatalogMeta>(std::move(meta).value());
}

Status RocksDbCatalog::WriteMeta(const CatalogMeta& meta) {
  InUse in_use(this);
  KVTIER_RETURN_IF_ERROR(in_use.status());
  KVTIER_RETURN_IF_ERROR(CheckWritable("write the metadata"));
  return Error(db_->Put(sync_write_, meta_family(), kMetaKey, EncodeCatalogMeta(meta)),
               "writing the metadata");
}

Status RocksDbCatalog::Commit(std::span<const Update> updates) {
  InUse in_use(this);
  KVTIER_RETURN_IF_ERROR(in_use.status());
  if (updates.empty()) return Status::OK();
  KVTIER_RETURN_IF_ERROR(CheckWritable("commit updates"));
  rocksdb::WriteBatch batch;
  for (const Update& update : updates) {
    std::string key = EncodeBlockKey(update.key);
    rocksdb::Status s;
    if (update.location) {
      s = batch.Put(blocks_family(), key, EncodeDiskLocation(*update.location));
      if (s.ok() && !update.representatives.empty()) {
        const auto* data = reinterpret_cast<const char*>(update.representatives.data());
        s = batch.Put(representatives_family(), key,
                      rocksdb::Slice(data, update.representatives.size()));
      } else if (s.ok()) {
        s = batch.Delete(representatives_family(), key);
      }
    } else {
      // A removed block takes its representatives with it.
      s = batch.Delete(blocks_family(), key);
      if (s.ok()) s = batch.Delete(representatives_family(), key);
    }
    if (!s.ok()) return Error(s, "batching the update of " + update.key.ToString());
  }
  return Error(db_->Write(sync_write_, &batch),
               "committing " + std::to_string(updates.size()) + " updates");
}

Result<std::optional<DiskLocation>> RocksDbCatalog::Lookup(const BlockKey& key) {
  InUse in_use(this);
  KVTIER_RETURN_IF_ERROR(in_use.status());
  std::string value;
  rocksdb::Status s =
      db_->Get(rocksdb::ReadOptions(), blocks_family(), EncodeBlockKey(key), &value);
  if (s.IsNotFound()) return std::optional<DiskLocation>();
  if (!s.ok()) return Error(s, "looking up " + key.ToString());
  Result<DiskLocation> location = DecodeDiskLocation(value);
  if (!location.ok()) {
    return location.status().WithContext("catalog " + dir_ + ": block " + key.ToString());
  }
  return std::optional<DiskLocation>(*location);
}

Status RocksDbCatalog::Scan(std::string_view start, std::string_view prefix,
                            const std::string& upper_bound, bool fill_cache, const Visitor& visit) {
  rocksdb::ReadOptions options;
  options.fill_cache = fill_cache;
  rocksdb::Slice bound(upper_bound);
  if (!upper_bound.empty()) options.iterate_upper_bound = &bound;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(options, blocks_family()));
  if (start.empty()) {
    it->SeekToFirst();
  } else {
    it->Seek(rocksdb::Slice(start.data(), start.size()));
  }
  for (; it->Valid(); it->Next()) {
    std::string_view key_bytes(it->key().data(), it->key().size());
    if (!key_bytes.starts_with(prefix)) break;
    Result<BlockKey> key = DecodeBlockKey(key_bytes);
    if (!key.ok()) {
      return Status::Corruption("catalog " + dir_ + ": block entry with key " + Hex(key_bytes) +
                                ": " + key.status().message());
    }
    Result<DiskLocation> location =
        DecodeDiskLocation(std::string_view(it->value().data(), it->value().size()));
    if (!location.ok()) {
      return location.status().WithContext("catalog " + dir_ + ": block " + key->ToString());
    }
    if (!visit(*key, *location)) break;
  }
  return Error(it->status(), "iterating over the blocks");
}

Status RocksDbCatalog::ForEachBlock(const Visitor& visit) {
  InUse in_use(this);
  KVTIER_RETURN_IF_ERROR(in_use.status());
  // A whole scan (rebuilding the store's state) would only evict hot blocks from the cache.
  return Scan({}, {}, {}, /*fill_cache=*/false, visit);
}

Status RocksDbCatalog::ForEachBlockOfSequence(uint32_t namespace_id, const SequenceId& sequence,
                                              const Visitor& visit) {
  InUse in_use(this);
  KVTIER_RETURN_IF_ERROR(in_use.status());
  std::string prefix =
      EncodeBlockKey(
          BlockKey{.namespace_id = namespace_id, .sequence = sequence, .layer = 0, .block = 0})
          .substr(0, kSequencePrefixBytes);
  // The smallest key past every key with this prefix: the prefix plus one, as a
  // big-endian number, with its trailing 0xff bytes dropped; none for an all-0xff prefix.
  std::string upper_bound = prefix;
  while (!upper_bound.empty() && static_cast<uint8_t>(upper_bound.back()) == 0xFF) {
    upper_bound.pop_back();
  }
  if (!upper_bound.empty()) upper_bound.back() = static_cast<char>(upper_bound.back() + 1);
  return Scan(prefix, prefix, upper_bound, /*fill_cache=*/true, visit);
}

Status RocksDbCatalog::PutRepresentatives(const BlockKey& key, std::span<const std::byte> data) {
  InUse in_use(this);
  KVTIER_RETURN_IF_ERROR(in_use.status());
  KVTIER_RETURN_IF_ERROR(CheckWritable("write representatives"));
  rocksdb::Slice value(reinterpret_cast<const char*>(data.data()), data.size());
  return Error(db_->Put(sync_write_, representatives_family(), EncodeBlockKey(key), value),
               "writing the representatives of " + key.ToString());
}

Result<std::optional<std::vector<std::byte>>> RocksDbCatalog::GetRepresentatives(
    const BlockKey& key) {
  InUse in_use(this);
  KVTIER_RETURN_IF_ERROR(in_use.status());
  rocksdb::PinnableSlice value;
  rocksdb::Status s =
      db_->Get(rocksdb::ReadOptions(), representatives_family(), EncodeBlockKey(key), &value);
  if (s.IsNotFound()) return std::optional<std::vector<std::byte>>();
  if (!s.ok()) return Error(s, "reading the representatives of " + key.ToString());
  const auto* begin = reinterpret_cast<const std::byte*>(value.data());
  return std::optional<std::vector<std::byte>>(std::in_place, begin, begin + value.size());
}

Status RocksDbCatalog::ForEachRepresentatives(const RepresentativesVisitor& visit) {
  InUse in_use(this);
  KVTIER_RETURN_IF_ERROR(in_use.status());
  rocksdb::ReadOptions options;
  options.fill_cache = false;  // a whole scan, at open: keep the cache for lookups
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(options, representatives_family()));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    std::string_view key_bytes(it->key().data(), it->key().size());
    Result<BlockKey> key = DecodeBlockKey(key_bytes);
    if (!key.ok()) {
      return Status::Corruption("catalog " + dir_ + ": representatives with key " + Hex(key_bytes) +
                                ": " + key.status().message());
    }
    const auto* data = reinterpret_cast<const std::byte*>(it->value().data());
    if (!visit(*key, std::span<const std::byte>(data, it->value().size()))) break;
  }
  return Error(it->status(), "iterating over the representatives");
}

Status RocksDbCatalog::Close() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (closed_) return Status::OK();
    closed_ = true;  // refuses new calls from here on
    idle_.wait(lock, [this] { return active_calls_ == 0; });
  }
  return CloseDatabase();
}

Status RocksDbCatalog::CloseDatabase() {
  // Every write is already durable; syncing the WAL and flushing the memtables makes
  // the next Open replay nothing (read-only: nothing to write). The first error is
  // reported, and everything is released whatever happens.
  Status status;
  if (!read_only_) {
    status = Error(db_->FlushWAL(/*sync=*/true), "syncing the WAL");
    Status flushed = Error(db_->Flush(rocksdb::FlushOptions(), families_), "flushing");
    if (status.ok()) status = flushed;
  }
  for (rocksdb::ColumnFamilyHandle* family : families_) {
    Status destroyed = Error(db_->DestroyColumnFamilyHandle(family), "closing a column family");
    if (status.ok()) status = destroyed;
  }
  families_.clear();
  Status closed = Error(db_->Close(), "closing");
  if (status.ok() && !read_only_) status = closed;  // read-only: nothing to lose
  db_.reset();
  if (!scratch_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(scratch_dir_, ec);
  }
  return status;
}

}  // namespace

// ---- Encodings ------------------------------------------------------------------------

std::string EncodeBlockKey(const BlockKey& key) {
  std::string out;
  out.reserve(kBlockKeyBytes);
  PutBigEndian(&out, key.namespace_id, 4);
  PutBigEndian(&out, key.sequence.hi, 8);
  PutBigEndian(&out, key.sequence.lo, 8);
  PutBigEndian(&out, key.layer, 4);
  PutBigEndian(&out, key.block, 4);
  return out;
}

Result<BlockKey> DecodeBlockKey(std::string_view bytes) {
  if (bytes.size() != kBlockKeyBytes) {
    return Status::Corruption("block key of " + std::to_string(bytes.size()) + " bytes (expected " +
                              std::to_string(kBlockKeyBytes) + ")");
  }
  BlockKey key;
  key.namespace_id = static_cast<uint32_t>(GetBigEndian(bytes, 0, 4));
  key.sequence.hi = GetBigEndian(bytes, 4, 8);
  key.sequence.lo = GetBigEndian(bytes, 12, 8);
  key.layer = static_cast<uint32_t>(GetBigEndian(bytes, 20, 4));
  key.block = static_cast<uint32_t>(GetBigEndian(bytes, 24, 4));
  return key;
}

std::string EncodeDiskLocation(const DiskLocation& location) {
  std::string out;
  out.reserve(kDiskLocationBytes);
  out.push_back(static_cast<char>(kDiskLocationVersion));
  PutLittleEndian(&out, location.file, 4);
  PutLittleEndian(&out, location.offset, 8);
  PutLittleEndian(&out, location.length, 8);
  PutLittleEndian(&out, location.data_bytes, 8);
  PutLittleEndian(&out, location.checksum, 8);
  PutLittleEndian(&out, location.flags, 4);
  PutLittleEndian(&out, location.generation, 8);
  return out;
}

Result<DiskLocation> DecodeDiskLocation(std::string_view bytes) {
  if (bytes.empty() || static_cast<uint8_t>(bytes[0]) != kDiskLocationVersion) {
    return Status::Corruption(bytes.empty() ? std::string("empty disk location")
                                            : "disk location of unknown version " +
                                                  std::to_string(static_cast<uint8_t>(bytes[0])));
  }
  if (bytes.size() != kDiskLocationBytes) {
    return Status::Corruption("disk location of " + std::to_string(bytes.size()) +
                              " bytes (expected " + std::to_string(kDiskLocationBytes) + ")");
  }
  LittleEndianReader in(bytes.substr(1));
  DiskLocation location;
  bool ok = in.Read32(&location.file) && in.Read64(&location.offset) &&
            in.Read64(&location.length) && in.Read64(&location.data_bytes) &&
            in.Read64(&location.checksum) && in.Read32(&location.flags) &&
            in.Read64(&location.generation);
  if (!ok || in.remaining() != 0) return Status::Internal("disk location size check is wrong");
  return location;
}

std::string EncodeCatalogMeta(const CatalogMeta& meta) {
  std::string out;
  out.push_back(static_cast<char>(kCatalogMetaVersion));
  PutLittleEndian(&out, meta.format_version, 4);
  PutLittleEndian(&out, meta.layout.num_layers, 4);
  PutLittleEndian(&out, meta.layout.num_kv_heads, 4);
  PutLittleEndian(&out, meta.layout.num_query_heads, 4);
  PutLittleEndian(&out, meta.layout.head_dim, 4);
  PutLittleEndian(&out, static_cast<uint8_t>(meta.layout.dtype), 1);
  PutLittleEndian(&out, meta.layout.block_tokens, 4);
  PutLittleEndian(&out, meta.layout_fingerprint, 8);
  PutLittleEndian(&out, meta.slab_files.size(), 4);
  for (const SlabFileInfo& file : meta.slab_files) {
    PutLittleEndian(&out, file.path.size(), 4);
    out += file.path;
    PutLittleEndian(&out, file.bytes, 8);
  }
  return out;
}

Result<CatalogMeta> DecodeCatalogMeta(std::string_view bytes) {
  if (bytes.empty() || static_cast<uint8_t>(bytes[0]) != kCatalogMetaVersion) {
    return Status::Corruption(bytes.empty() ? std::string("empty catalog metadata")
                                            : "catalog metadata of unknown encoding version " +
                                                  std::to_string(static_cast<uint8_t>(bytes[0])));
  }
  auto truncated = [&] {
    return Status::Corruption("catalog metadata of " + std::to_string(bytes.size()) +
                              " bytes is truncated");
  };
  LittleEndianReader in(bytes.substr(1));
  CatalogMeta meta;
  uint8_t dtype = 0;
  uint32_t slab_count = 0;
  if (!(in.Read32(&meta.format_version) && in.Read32(&meta.layout.num_layers) &&
        in.Read32(&meta.layout.num_kv_heads) && in.Read32(&meta.layout.num_query_heads) &&
        in.Read32(&meta.layout.head_dim) && in.Read8(&dtype) &&
        in.Read32(&meta.layout.block_tokens) && in.Read64(&meta.layout_fingerprint) &&
        in.Read32(&slab_count))) {
    return truncated();
  }
  meta.layout.dtype = static_cast<DType>(dtype);
  if (DTypeBytes(meta.layout.dtype) == 0) {
    return Status::Corruption("catalog metadata with unknown dtype value " + std::to_string(dtype));
  }
  // Bounds the reservation by what the bytes could hold, whatever the count says.
  if (slab_count > in.remaining() / kSlabFileMinBytes) return truncated();
  meta.slab_files.resize(slab_count);
  for (SlabFileInfo& file : meta.slab_files) {
    if (!(in.ReadString(&file.path) && in.Read64(&file.bytes))) return truncated();
  }
  if (in.remaining() != 0) {
    return Status::Corruption("catalog metadata has " + std::to_string(in.remaining()) +
                              " trailing bytes");
  }
  return meta;
}

// ---- Open -----------------------------------------------------------------------------

Result<std::unique_ptr<Catalog>> Catalog::Open(const std::string& dir, bool create_if_missing,
                                               CatalogMode mode) {
  if (dir.empty()) return Status::InvalidArgument("catalog directory is empty");
  std::string context = "catalog " + dir;
  const bool read_only = mode != CatalogMode::kReadWrite;
  if (read_only && create_if_missing) {
    return Status::InvalidArgument(context + ": a read-only open cannot create the catalog");
  }
  rocksdb::Status exists = rocksdb::Env::Default()->FileExists(dir + "/CURRENT");
  if (exists.IsNotFound()) {
    if (!create_if_missing) {
      return Status::NotFound(context + ": no catalog database there (no CURRENT file)");
    }
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return Status::FromErrno(ec.value(), context + ": creating the directory");
  } else if (!exists.ok()) {
    return FromRocksDb(exists, context);
  }

  Config config = MakeConfig(create_if_missing);
  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors = {
      {rocksdb::kDefaultColumnFamilyName, config.family},
      {kBlocksFamily, config.family},
      {kRepresentativesFamily, config.family},
  };
  std::vector<rocksdb::ColumnFamilyHandle*> families;
  rocksdb::DB* raw_db = nullptr;
  std::string scratch_dir;
  rocksdb::Status s;
  if (mode == CatalogMode::kReadWrite) {
    s = rocksdb::DB::Open(config.db, dir, descriptors, &families, &raw_db);
  } else {
    // Nothing may be written in `dir`: no info LOG there.
    config.db.info_log = std::make_shared<NullLogger>();
    if (mode == CatalogMode::kReadOnly) {
      s = rocksdb::DB::OpenForReadOnly(config.db, dir, descriptors, &families, &raw_db);
    } else {
      char tmpl[] = "/tmp/kvtier-catalog-secondary-XXXXXX";
      if (mkdtemp(tmpl) == nullptr) {
        return Status::FromErrno(errno, context + ": creating a directory for the secondary");
      }
      scratch_dir = tmpl;
      config.db.max_open_files = -1;  // what RocksDB requires of a secondary instance
      s = rocksdb::DB::OpenAsSecondary(config.db, dir, scratch_dir, descriptors, &families,
                                       &raw_db);
      if (s.ok()) s = raw_db->TryCatchUpWithPrimary();
    }
  }
  if (!s.ok()) {
    if (raw_db != nullptr) {
      for (rocksdb::ColumnFamilyHandle* family : families) {
        (void)raw_db->DestroyColumnFamilyHandle(family);
      }
      delete raw_db;
    }
    if (!scratch_dir.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir, ec);
    }
    const char* how = mode == CatalogMode::kReadWrite  ? ": opening"
                      : mode == CatalogMode::kReadOnly ? ": opening read-only"
                                                       : ": opening as a secondary";
    return FromRocksDb(s, context + how);
  }
  return std::unique_ptr<Catalog>(new RocksDbCatalog(dir, std::unique_ptr<rocksdb::DB>(raw_db),
                                                     std::move(families), config.sync_write,
                                                     read_only, std::move(scratch_dir)));
}

}  // namespace kvtier
