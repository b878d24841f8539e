// StoreReader: a store directory opened for inspection, read-only, by the offline tools
// (`kvtier info`, `ls`, `verify`, `export`, `explain`).
//
// What Open checks, in order, each failure a clear Status (never a crash):
//   - `dir` exists and is a directory: NotFound when missing, InvalidArgument when it is
//     a file or something else;
//   - it is a store: a `catalog/` RocksDB database is there (NotFound "not a kvtier
//     store" otherwise, e.g. an empty directory);
//   - the catalog opens (read-only: RocksDB's OpenForReadOnly, which takes no lock and
//     writes nothing) and its metadata decodes: Corruption ("damaged catalog", with
//     RocksDB's reason) otherwise; a catalog without metadata is Corruption too;
//   - the metadata is one this kvtier reads: FailedPrecondition for another format
//     version; the layout must validate and match its fingerprint (Corruption).
// Whether another process (kvtierd, an embedded Store) has the store open is probed
// through the store's LOCK file: a non-blocking flock, released at once, never
// creating the file. `locked()` reports it; every read still works (the catalog is
// opened read-only, the slab files O_RDONLY), seeing the catalog as of Open.
//
// Block reads never hand back bytes that failed their check: a block is returned only
// when its entry is sane (file index, 4 KiB alignment, inside the slab file, the
// layout's sizes), it is not quarantined (kBlockCorrupt), the read is whole, and the
// XXH3-64 of its data_bytes bytes equals the catalog's checksum. On any failure the
// output buffer is zeroed and the Status names the block (key, file, offset).
//
// Block layout (kvtier/layout.h): a block's bytes are its keys, then its values, each
// [num_kv_heads][block_tokens][head_dim] elements of the layout's dtype; KeyOffset
// below gives the byte offset of one token's key row for one KV head.
//
// Thread safety: one thread's object (ReadBlocks uses its own I/O queue internally).
// The Catalog returned by catalog() is safe from any thread, as Catalog says.
#ifndef KVTIER_TOOLS_STORE_READER_H_
#define KVTIER_TOOLS_STORE_READER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/layout.h"
#include "kvtier/status.h"
#include "storage/catalog.h"
#include "storage/env.h"

namespace kvtier::tools {

struct StoreReaderOptions {
  // Read blocks with O_DIRECT (aligned buffers, no page cache pollution); falls back to
  // buffered reads on a file system that refuses it (tmpfs). Default: true.
  bool direct_io = true;
  // Reads in flight at most in ReadBlocks (the store's own default depth). Default: 64.
  uint32_t io_depth = 64;
};

// A block's catalog entry.
struct BlockEntry {
  BlockKey key;
  DiskLocation location;
};

// What the slab file really is on disk (the metadata says what it should be).
struct SlabFileState {
  SlabFileInfo info;          // from the metadata
  bool exists = false;        // the path exists and is a regular file
  uint64_t actual_bytes = 0;  // its size now (0 when missing)
};

// Kind of the bytes ReadLayerPart copies out of a block.
enum class KvPart : uint8_t { kKeys, kValues };

class StoreReader {
 public:
  // Opens `dir` read-only (see the checks above). `env` must outlive the reader.
  static Result<std::unique_ptr<StoreReader>> Open(const std::string& dir,
                                                   const StoreReaderOptions& options = {},
                                                   Env* env = Env::Default());
  ~StoreReader();
  StoreReader(const StoreReader&) = delete;
  StoreReader& operator=(const StoreReader&) = delete;

  const std::string& dir() const { return dir_; }
  // Another process held the store's lock when Open probed it.
  bool locked() const { return locked_; }
  const CatalogMeta& meta() const { return meta_; }
  const ModelLayout& layout() const { return meta_.layout; }
  // Bytes of block data (layout().BytesPerBlock()).
  uint64_t block_bytes() const { return block_bytes_; }
  // Bytes of a block's extent on disk: block_bytes() rounded up to 4 KiB.
  uint64_t extent_bytes() const { return extent_bytes_; }
  // The slab files as the metadata names them, with their state on disk now.
  const std::vector<SlabFileState>& slab_files() const { return slab_files_; }

  // The read-only catalog: lookups and scans (writes fail with an error).
  Catalog& catalog() { return *catalog_; }

  // Scans, from the catalog snapshot of the call (see Catalog::ForEachBlock).
  Status ForEachBlock(const Catalog::Visitor& visit) { return catalog_->ForEachBlock(visit); }
  Status ForEachBlockOfSequence(uint32_t namespace_id, const SequenceId& sequence,
                                const Catalog::Visitor& visit) {
    return catalog_->ForEachBlockOfSequence(namespace_id, sequence, visit);
  }
  Status ForEachRepresentatives(const Catalog::RepresentativesVisitor& visit) {
    return catalog_->ForEachRepresentatives(visit);
  }

  // OK when the entry could be this store's: file index in range, offset and length
  // 4 KiB-aligned, length == extent_bytes(), data_bytes == block_bytes(), the extent
  // inside the slab file's size in the metadata. Corruption saying what is wrong
  // otherwise. Does not read anything.
  Status CheckLocation(const DiskLocation& location) const;

  // Reads one block's data into `out` (exactly block_bytes() bytes) and checks it, as
  // above. Errors: Corruption (quarantined, bad entry, checksum mismatch), IOError
  // (short read: the slab file is shorter than the extent; EIO), InvalidArgument (out
  // of the wrong size). `out` is zeroed on any error.
  Status ReadBlock(const BlockKey& key, const DiskLocation& location, std::span<std::byte> out);
  // Looks the key up first: NotFound when the catalog has no such block.
  Status ReadBlock(const BlockKey& key, std::span<std::byte> out);

  // Reads many blocks with up to options.io_depth reads in flight and checks each as
  // ReadBlock does (io_uring, O_DIRECT, into 2 MiB-aligned buffers registered with the
  // ring: about the store's own read rate; one read at a time where io_uring is not
  // available). Calls `done` once per entry, on the calling thread, in completion order
  // (not entry order); `data` is the block's block_bytes() bytes, valid during the call
  // only, and empty unless `status` is OK. A block that fails is reported through `done`;
  // ReadBlocks itself fails only when its buffers cannot be had or the ring fails.
  // `done` returns false to stop early.
  using ReadDone = std::function<bool(const BlockEntry& entry, const Status& status,
                                      std::span<const std::byte> data)>;
  Status ReadBlocks(std::span<const BlockEntry> entries, const ReadDone& done);

  // Byte offset, inside a block, of the key (part kKeys) or value row of `token` (in
  // the block) for KV head `kv_head`; the row is head_dim elements of the dtype.
  uint64_t RowOffset(KvPart part, uint32_t kv_head, uint32_t token) const;

  // The keys and values of one layer of a sequence, tokens [0, blocks * block_tokens)
  // in order, each as [tokens][num_kv_heads][head_dim] elements of the stored dtype
  // (the token axis outermost: the shape `kvtier eval` reads, one layer of it). Either
  // output may be null. The layer's blocks must be 0..n-1 without a gap (NotFound naming
  // the first missing block; NotFound when the layer has none) and each must read clean
  // (its error otherwise, naming it). `*tokens` (optional) receives the token count.
  Status ReadLayer(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                   std::vector<std::byte>* keys, std::vector<std::byte>* values,
                   uint64_t* tokens = nullptr);
  // ReadLayer for one of the two.
  Result<std::vector<std::byte>> ReadLayerPart(uint32_t namespace_id, const SequenceId& sequence,
                                               uint32_t layer, KvPart part,
                                               uint64_t* tokens = nullptr);
  // Copies the keys or values of one block (its block_bytes() bytes) into a layer
  // tensor [tokens][num_kv_heads][head_dim] at token block_index * block_tokens;
  // `layer_out` must hold (block_index + 1) * block_tokens tokens.
  void ScatterBlock(std::span<const std::byte> block, KvPart part, uint32_t block_index,
                    std::byte* layer_out) const;

 private:
  StoreReader() = default;
  // Why a block cannot be read before any I/O (bad entry, quarantined, no file); OK
  // when it can, with *file set.
  Status Prepare(const BlockKey& key, const DiskLocation& location, File** file);
  Status CheckData(const BlockKey& key, const DiskLocation& location, const std::byte* data) const;
  void OpenSlabFiles();

  std::string dir_;
  StoreReaderOptions options_;
  Env* env_ = nullptr;
  bool locked_ = false;
  CatalogMeta meta_;
  uint64_t block_bytes_ = 0;
  uint64_t extent_bytes_ = 0;
  std::vector<SlabFileState> slab_files_;
  std::unique_ptr<Catalog> catalog_;
  // Opened on first read; null for a missing file. Parallel to slab_files_.
  std::vector<std::unique_ptr<File>> files_;
  bool files_opened_ = false;
  std::vector<Status> file_errors_;  // why a file is null in files_
  std::byte* scratch_ = nullptr;     // one 4 KiB-aligned extent for ReadBlock
};

// Probes the store's lock (`dir`/LOCK): true when another process or object holds it.
// Never creates the file (false when it does not exist); releases it at once.
Result<bool> StoreLockHeld(const std::string& dir);

}  // namespace kvtier::tools

#endif  // KVTIER_TOOLS_STORE_READER_H_
