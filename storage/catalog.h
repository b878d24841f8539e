// Catalog: the disk tier's durable map, in RocksDB. For each block on disk, where it
// is (slab file, offset, length), its checksum, flags and generation; plus the store's
// metadata (format version, model layout and its fingerprint, slab files) and a column
// family of block representatives (retrieval's summaries: opaque bytes here), written
// with the block's entry in one batch and removed with it.
//
// Durability: Commit returns only after its batch is in RocksDB's synced WAL. The
// store commits a block's entry only after the block's bytes are durable on disk, so a
// catalog entry never points at data that a crash could lose.
//
// One fixed RocksDB configuration, chosen and tested here; none of its knobs is
// exposed.
//
// Thread safety: every method may be called from any thread (RocksDB's guarantees).
#ifndef KVTIER_STORAGE_CATALOG_H_
#define KVTIER_STORAGE_CATALOG_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/layout.h"
#include "kvtier/status.h"

namespace kvtier {

// Flags of a block on disk.
enum BlockFlags : uint32_t {
  kBlockCorrupt = 1u << 0,  // failed its checksum: quarantined, never returned as data
  // Set in memory at recovery, never stored: the entry's extent is not its own (outside
  // the slab files, or overlapping another entry's), so it is never freed.
  kBlockOrphanExtent = 1u << 1,
};

struct DiskLocation {
  uint32_t file = 0;        // index into CatalogMeta::slab_files
  uint64_t offset = 0;      // bytes, 4 KiB-aligned
  uint64_t length = 0;      // bytes of the extent (the block rounded up to 4 KiB)
  uint64_t data_bytes = 0;  // bytes of block data at the start of the extent
  uint64_t checksum = 0;    // XXH3-64 of the data_bytes bytes
  uint32_t flags = 0;       // BlockFlags
  uint64_t generation = 0;  // store-wide write sequence number (newer = larger)
  friend bool operator==(const DiskLocation&, const DiskLocation&) = default;
};

struct SlabFileInfo {
  std::string path;  // absolute
  uint64_t bytes = 0;
  friend bool operator==(const SlabFileInfo&, const SlabFileInfo&) = default;
};

struct CatalogMeta {
  static constexpr uint32_t kFormatVersion = 1;
  uint32_t format_version = kFormatVersion;
  ModelLayout layout;
  uint64_t layout_fingerprint = 0;
  std::vector<SlabFileInfo> slab_files;
  friend bool operator==(const CatalogMeta&, const CatalogMeta&) = default;
};

// How a catalog is opened.
enum class CatalogMode : uint8_t {
  // The store's mode: reads and writes, RocksDB's lock taken.
  kReadWrite,
  // For offline inspection, also while a store has the catalog open elsewhere
  // (RocksDB's OpenForReadOnly): takes no lock and writes nothing, not even at Close;
  // sees the database as of Open. Every write fails with FailedPrecondition. Not for a
  // database another process has open (RocksDB leaves that undefined): see kSecondary.
  kReadOnly,
  // Read-only beside a live writer (RocksDB's secondary instance, caught up with the
  // writer once at Open; its info log goes to a temporary directory removed at Close).
  // Takes no lock and writes nothing in `dir`; sees the database as of Open. Every write
  // fails with FailedPrecondition.
  kSecondary,
};

class Catalog {
 public:
  // Opens (creating when `create_if_missing`, which the read-only modes refuse) the RocksDB
  // database in `dir`. Errors: NotFound (no catalog and !create_if_missing),
  // InvalidArgument (a read-only mode with create_if_missing), IOError/Corruption from RocksDB
  // with its message.
  static Result<std::unique_ptr<Catalog>> Open(const std::string& dir, bool create_if_missing,
                                               CatalogMode mode = CatalogMode::kReadWrite);
  virtual ~Catalog() = default;

  // The store's metadata; nullopt for a new catalog.
  virtual Result<std::optional<CatalogMeta>> ReadMeta() = 0;
  virtual Status WriteMeta(const CatalogMeta& meta) = 0;  // durable on return

  // One change to a block: a new location with its representatives, or (location ==
  // nullopt) its removal, representatives included. With a location, `representatives`
  // replace the block's stored ones in the same batch; empty removes them (a block
  // rewritten without a summary never keeps its predecessor's).
  struct Update {
    BlockKey key;
    std::optional<DiskLocation> location;
    std::vector<std::byte> representatives = {};
  };
  // Applies the updates atomically and durably (synced WAL) in order.
  virtual Status Commit(std::span<const Update> updates) = 0;

  // The entry of one block; nullopt when absent.
  virtual Result<std::optional<DiskLocation>> Lookup(const BlockKey& key) = 0;

  // Calls `visit` for every block in key order (namespace, sequence, layer, block)
  // until it returns false. With a namespace and sequence, only that sequence's blocks.
  // The scan reads one consistent snapshot, taken when it starts. `visit` runs on the
  // calling thread and may call other methods, but not Close. Corruption (naming the
  // key) when an entry does not decode.
  using Visitor = std::function<bool(const BlockKey&, const DiskLocation&)>;
  virtual Status ForEachBlock(const Visitor& visit) = 0;
  virtual Status ForEachBlockOfSequence(uint32_t namespace_id, const SequenceId& sequence,
                                        const Visitor& visit) = 0;

  // Representatives column family (opaque bytes per block; retrieval defines them).
  // PutRepresentatives is durable on return; it does not check that the block exists.
  virtual Status PutRepresentatives(const BlockKey& key, std::span<const std::byte> data) = 0;
  virtual Result<std::optional<std::vector<std::byte>>> GetRepresentatives(const BlockKey& key) = 0;

  // Calls `visit` for every block's representatives in key order until it returns false,
  // from one consistent snapshot taken when the scan starts. The span is valid only
  // during the call. Same rules for `visit` as ForEachBlock; Corruption for a bad key.
  using RepresentativesVisitor = std::function<bool(const BlockKey&, std::span<const std::byte>)>;
  virtual Status ForEachRepresentatives(const RepresentativesVisitor& visit) = 0;

  // Makes everything committed so far durable (it already is: for a clean close).
  // Waits for calls in progress, then closes the database; every later call but Close
  // (which returns OK again) fails with FailedPrecondition. The destructor closes.
  virtual Status Close() = 0;
};

// The catalog's key for a block: 28 bytes, big-endian (namespace, sequence hi, sequence
// lo, layer, block), so key order groups a sequence's blocks by layer.
std::string EncodeBlockKey(const BlockKey& key);
Result<BlockKey> DecodeBlockKey(std::string_view bytes);
// A location's value: a version byte, then fixed-width little-endian fields.
std::string EncodeDiskLocation(const DiskLocation& location);
Result<DiskLocation> DecodeDiskLocation(std::string_view bytes);
// The metadata's value: versioned, length-checked, strings length-prefixed. Decoding
// rejects bad versions, sizes and dtype values with Corruption; it does not check the
// layout or compare the fingerprint with it (the store does).
std::string EncodeCatalogMeta(const CatalogMeta& meta);
Result<CatalogMeta> DecodeCatalogMeta(std::string_view bytes);

}  // namespace kvtier

#endif  // KVTIER_STORAGE_CATALOG_H_
