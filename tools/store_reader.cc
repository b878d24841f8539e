#include "tools/store_reader.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
// Inline: the tools need no link dependency on libxxhash (libkvtier links it privately).
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "storage/host_region.h"

namespace kvtier::tools {
namespace {

constexpr uint64_t kAlignment = 4096;

std::string Where(const BlockKey& key, const DiskLocation& loc) {
  return "block " + key.ToString() + " (file " + std::to_string(loc.file) + " offset " +
         std::to_string(loc.offset) + ")";
}

// A 4 KiB-aligned heap buffer (O_DIRECT).
struct AlignedFree {
  void operator()(std::byte* p) const { free(p); }
};
using AlignedBuffer = std::unique_ptr<std::byte, AlignedFree>;

Result<AlignedBuffer> NewAligned(uint64_t bytes) {
  void* p = aligned_alloc(kAlignment, std::max<uint64_t>(bytes, kAlignment));
  if (p == nullptr)
    return Status::ResourceExhausted("allocating " + std::to_string(bytes) + " bytes");
  return AlignedBuffer(static_cast<std::byte*>(p));
}

}  // namespace

Result<bool> StoreLockHeld(const std::string& dir) {
  const std::string path = dir + "/LOCK";
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return false;
    return Status::FromErrno(errno, "open " + path);
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    close(fd);
    if (err == EWOULDBLOCK) return true;
    return Status::FromErrno(err, "flock " + path);
  }
  flock(fd, LOCK_UN);  // free: nobody has the store open (released at once)
  close(fd);
  return false;
}

Result<std::unique_ptr<StoreReader>> StoreReader::Open(const std::string& dir,
                                                       const StoreReaderOptions& options,
                                                       Env* env) {
  if (dir.empty()) return Status::InvalidArgument("store directory is empty");
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::NotFound(dir + ": no such directory");
    return Status::FromErrno(errno, "stat " + dir);
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument(dir + " is not a directory (a store is a directory)");
  }
  const std::string catalog_dir = dir + "/catalog";
  struct stat cst {};
  if (stat(catalog_dir.c_str(), &cst) != 0 || !S_ISDIR(cst.st_mode)) {
    return Status::NotFound(dir + " is not a kvtier store: it has no catalog/ directory");
  }
  if (access((catalog_dir + "/CURRENT").c_str(), F_OK) != 0) {
    return Status::Corruption("damaged catalog in " + dir +
                              ": catalog/CURRENT is missing (the catalog cannot be opened)");
  }

  std::unique_ptr<StoreReader> r(new StoreReader);
  r->dir_ = dir;
  r->options_ = options;
  r->options_.io_depth = std::clamp<uint32_t>(options.io_depth, 1, 1024);
  r->env_ = env;
  KVTIER_ASSIGN_OR_RETURN(r->locked_, StoreLockHeld(dir));
  // A live writer: RocksDB's secondary instance; otherwise a plain read-only open.
  Result<std::unique_ptr<Catalog>> catalog =
      Catalog::Open(catalog_dir, /*create_if_missing=*/false,
                    r->locked_ ? CatalogMode::kSecondary : CatalogMode::kReadOnly);
  if (!catalog.ok()) {
    return Status::Corruption("damaged catalog in " + dir + ": " + catalog.status().ToString());
  }
  r->catalog_ = std::move(catalog).value();
  Result<std::optional<CatalogMeta>> meta = r->catalog_->ReadMeta();
  if (!meta.ok()) {
    return Status::Corruption("damaged catalog in " + dir + ": " + meta.status().ToString());
  }
  if (!meta->has_value()) {
    return Status::Corruption("damaged catalog in " + dir +
                              ": no metadata (the store was never completely created)");
  }
  r->meta_ = std::move(**meta);
  if (r->meta_.format_version != CatalogMeta::kFormatVersion) {
    return Status::FailedPrecondition(
        "store " + dir + " has format version " + std::to_string(r->meta_.format_version) +
        "; this kvtier reads version " + std::to_string(CatalogMeta::kFormatVersion));
  }
  if (Status s = r->meta_.layout.Validate(); !s.ok()) {
    return Status::Corruption("damaged catalog in " + dir +
                              ": its layout is invalid: " + s.ToString());
  }
  if (r->meta_.layout.Fingerprint() != r->meta_.layout_fingerprint) {
    return Status::Corruption("damaged catalog in " + dir + ": layout (" +
                              r->meta_.layout.ToString() + ") does not match its fingerprint " +
                              std::to_string(r->meta_.layout_fingerprint));
  }
  r->block_bytes_ = r->meta_.layout.BytesPerBlock();
  r->extent_bytes_ = (r->block_bytes_ + kAlignment - 1) / kAlignment * kAlignment;
  for (const SlabFileInfo& f : r->meta_.slab_files) {
    SlabFileState state{.info = f};
    struct stat fst {};
    if (stat(f.path.c_str(), &fst) == 0 && S_ISREG(fst.st_mode)) {
      state.exists = true;
      state.actual_bytes = static_cast<uint64_t>(fst.st_size);
    }
    r->slab_files_.push_back(std::move(state));
  }
  KVTIER_ASSIGN_OR_RETURN(AlignedBuffer scratch, NewAligned(r->extent_bytes_));
  r->scratch_ = scratch.release();
  return r;
}

StoreReader::~StoreReader() {
  free(scratch_);
  if (catalog_ != nullptr) (void)catalog_->Close();  // read-only: nothing to lose
}

void StoreReader::OpenSlabFiles() {
  if (files_opened_) return;
  files_opened_ = true;
  for (const SlabFileState& f : slab_files_) {
    Result<std::unique_ptr<File>> file =
        env_->OpenFile(f.info.path, FileOptions{.direct = options_.direct_io, .read_only = true});
    if (!file.ok() && options_.direct_io) {
      // A file system without O_DIRECT (tmpfs): buffered reads are as correct.
      file = env_->OpenFile(f.info.path, FileOptions{.read_only = true});
    }
    if (file.ok()) {
      files_.push_back(std::move(file).value());
      file_errors_.push_back(Status::OK());
    } else {
      files_.push_back(nullptr);
      file_errors_.push_back(file.status());
    }
  }
}

Status StoreReader::CheckLocation(const DiskLocation& loc) const {
  if (loc.file >= meta_.slab_files.size()) {
    return Status::Corruption("slab file index " + std::to_string(loc.file) +
                              " but the store has " + std::to_string(meta_.slab_files.size()) +
                              " slab file(s)");
  }
  if (loc.offset % kAlignment != 0 || loc.length % kAlignment != 0) {
    return Status::Corruption("extent [" + std::to_string(loc.offset) + ", +" +
                              std::to_string(loc.length) + ") is not 4 KiB-aligned");
  }
  if (loc.length != extent_bytes_ || loc.data_bytes != block_bytes_) {
    return Status::Corruption("extent of " + std::to_string(loc.length) + " bytes holding " +
                              std::to_string(loc.data_bytes) + " data bytes; this layout's are " +
                              std::to_string(extent_bytes_) + " and " +
                              std::to_string(block_bytes_));
  }
  const uint64_t file_bytes = meta_.slab_files[loc.file].bytes;
  if (loc.offset > file_bytes || file_bytes - loc.offset < loc.length) {
    return Status::Corruption("extent [" + std::to_string(loc.offset) + ", +" +
                              std::to_string(loc.length) + ") ends past the end of slab file " +
                              std::to_string(loc.file) + " (" + std::to_string(file_bytes) +
                              " bytes)");
  }
  return Status::OK();
}

Status StoreReader::Prepare(const BlockKey& key, const DiskLocation& loc, File** file) {
  if (loc.flags & kBlockCorrupt) {
    return Status::Corruption(Where(key, loc) + " is quarantined (marked corrupt)");
  }
  if (Status s = CheckLocation(loc); !s.ok()) {
    return Status::Corruption(Where(key, loc) + ": " + s.message());
  }
  OpenSlabFiles();
  if (files_[loc.file] == nullptr) {
    return Status::IOError(Where(key, loc) + ": slab file " + slab_files_[loc.file].info.path +
                           " cannot be opened: " + file_errors_[loc.file].ToString());
  }
  *file = files_[loc.file].get();
  return Status::OK();
}

Status StoreReader::CheckData(const BlockKey& key, const DiskLocation& loc,
                              const std::byte* data) const {
  const uint64_t sum = XXH3_64bits(data, loc.data_bytes);
  if (sum != loc.checksum) {
    char buf[96];
    std::snprintf(buf, sizeof(buf), ": checksum mismatch (stored %016llx, data %016llx)",
                  static_cast<unsigned long long>(loc.checksum),
                  static_cast<unsigned long long>(sum));
    return Status::Corruption(Where(key, loc) + buf);
  }
  return Status::OK();
}

Status StoreReader::ReadBlock(const BlockKey& key, const DiskLocation& loc,
                              std::span<std::byte> out) {
  auto fail = [&](Status s) {
    std::memset(out.data(), 0, out.size());
    return s;
  };
  if (out.size() != block_bytes_) {
    return fail(Status::InvalidArgument("output of " + std::to_string(out.size()) +
                                        " bytes for a block of " + std::to_string(block_bytes_)));
  }
  File* file = nullptr;
  if (Status s = Prepare(key, loc, &file); !s.ok()) return fail(std::move(s));
  if (Status s = file->ReadAt(loc.offset, scratch_, loc.length); !s.ok()) {
    return fail(Status(s.code(), Where(key, loc) + ": " + s.message()));
  }
  if (Status s = CheckData(key, loc, scratch_); !s.ok()) return fail(std::move(s));
  std::memcpy(out.data(), scratch_, block_bytes_);
  return Status::OK();
}

Status StoreReader::ReadBlock(const BlockKey& key, std::span<std::byte> out) {
  Result<std::optional<DiskLocation>> loc = catalog_->Lookup(key);
  if (!loc.ok() || !loc->has_value()) {
    std::memset(out.data(), 0, out.size());
    if (!loc.ok()) return loc.status();
    return Status::NotFound("block " + key.ToString() + " is not in the store");
  }
  return ReadBlock(key, **loc, out);
}

Status StoreReader::ReadBlocks(std::span<const BlockEntry> entries, const ReadDone& done) {
  if (entries.empty()) return Status::OK();
  Result<std::unique_ptr<IoQueue>> queue_or =
      env_->NewIoQueue(IoQueueOptions{.depth = options_.io_depth});
  if (!queue_or.ok()) {
    // No io_uring here (a sandbox may forbid it): one read at a time.
    std::vector<std::byte> out(block_bytes_);
    for (const BlockEntry& e : entries) {
      Status s = ReadBlock(e.key, e.location, out);
      if (!done(e, s, s.ok() ? std::span<const std::byte>(out) : std::span<const std::byte>())) {
        break;
      }
    }
    return Status::OK();
  }
  IoQueue& queue = **queue_or;
  const uint32_t depth = std::min<uint64_t>(options_.io_depth, entries.size());
  // The buffers as the store's host tier has them: 2 MiB-aligned, huge pages when the
  // kernel gives them, faulted in, and registered with the ring (fixed buffers), so a
  // read is not one descriptor per 4 KiB page (that costs on virtual disks).
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<HostRegion> region,
                          HostRegion::Allocate(extent_bytes_ * depth, HostMemoryKind::kPlain));
  std::byte* const pool = region->data();
  const MemoryRange range{pool, region->size()};
  (void)queue.RegisterBuffers(std::span<const MemoryRange>(&range, 1));  // best effort
  OpenSlabFiles();
  std::vector<File*> open_files;
  for (const auto& f : files_) {
    if (f != nullptr) open_files.push_back(f.get());
  }
  if (open_files.size() == files_.size()) (void)queue.RegisterFiles(open_files);  // best effort
  std::vector<uint32_t> free_slots(depth);
  for (uint32_t i = 0; i < depth; ++i) free_slots[i] = depth - 1 - i;
  std::vector<size_t> entry_of_slot(depth);
  std::vector<IoRequest> batch;
  std::vector<IoCompletion> completions(depth);
  size_t next = 0;
  uint64_t in_flight = 0;
  bool stop = false;
  while (!stop && (next < entries.size() || in_flight > 0)) {
    batch.clear();
    while (!stop && next < entries.size() && !free_slots.empty()) {
      const BlockEntry& e = entries[next];
      File* file = nullptr;
      if (Status s = Prepare(e.key, e.location, &file); !s.ok()) {
        stop = !done(e, s, {});
        ++next;
        continue;
      }
      const uint32_t slot = free_slots.back();
      free_slots.pop_back();
      entry_of_slot[slot] = next;
      batch.push_back(IoRequest{.kind = IoKind::kRead,
                                .file = file,
                                .offset = e.location.offset,
                                .buf = pool + slot * extent_bytes_,
                                .length = e.location.length,
                                .tag = slot});
      ++next;
    }
    if (!batch.empty()) {
      KVTIER_RETURN_IF_ERROR(queue.Submit(batch));
      in_flight += batch.size();
    }
    if (in_flight == 0) continue;
    KVTIER_ASSIGN_OR_RETURN(size_t n, queue.Reap(completions, 1));
    for (size_t i = 0; i < n; ++i) {
      const auto slot = static_cast<uint32_t>(completions[i].tag);
      --in_flight;
      free_slots.push_back(slot);
      if (stop) continue;  // draining what is in flight
      const BlockEntry& e = entries[entry_of_slot[slot]];
      const std::byte* data = pool + slot * extent_bytes_;
      Status s = completions[i].status;
      if (!s.ok()) {
        s = Status(s.code(), Where(e.key, e.location) + ": " + s.message());
      } else {
        s = CheckData(e.key, e.location, data);
      }
      stop = !done(
          e, s,
          s.ok() ? std::span<const std::byte>(data, block_bytes_) : std::span<const std::byte>());
    }
  }
  // Stopped early: wait for the reads still in flight before their buffers go.
  while (in_flight > 0) {
    KVTIER_ASSIGN_OR_RETURN(size_t n, queue.Reap(completions, 1));
    in_flight -= n;
  }
  return Status::OK();
}

uint64_t StoreReader::RowOffset(KvPart part, uint32_t kv_head, uint32_t token) const {
  const ModelLayout& l = meta_.layout;
  const uint64_t base = part == KvPart::kValues ? l.KeyBytesPerBlock() : 0;
  return base + (uint64_t{kv_head} * l.block_tokens + token) * l.head_dim * DTypeBytes(l.dtype);
}

void StoreReader::ScatterBlock(std::span<const std::byte> block, KvPart part, uint32_t block_index,
                               std::byte* layer_out) const {
  const ModelLayout& l = meta_.layout;
  const uint64_t row_bytes = uint64_t{l.head_dim} * DTypeBytes(l.dtype);
  for (uint32_t t = 0; t < l.block_tokens; ++t) {
    const uint64_t token = uint64_t{block_index} * l.block_tokens + t;
    for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
      std::memcpy(layer_out + (token * l.num_kv_heads + h) * row_bytes,
                  block.data() + RowOffset(part, h, t), row_bytes);
    }
  }
}

Status StoreReader::ReadLayer(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                              std::vector<std::byte>* keys, std::vector<std::byte>* values,
                              uint64_t* tokens) {
  std::vector<BlockEntry> entries;
  KVTIER_RETURN_IF_ERROR(ForEachBlockOfSequence(namespace_id, sequence,
                                                [&](const BlockKey& key, const DiskLocation& loc) {
                                                  if (key.layer > layer)
                                                    return false;  // key order: layer, then block
                                                  if (key.layer == layer)
                                                    entries.push_back(BlockEntry{key, loc});
                                                  return true;
                                                }));
  const BlockKey first{.namespace_id = namespace_id, .sequence = sequence, .layer = layer};
  if (entries.empty()) {
    return Status::NotFound("layer " + std::to_string(layer) + " of sequence " +
                            std::to_string(namespace_id) + "/" + sequence.ToHex() +
                            " has no block in the store");
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].key.block != i) {
      BlockKey missing = first;
      missing.block = static_cast<uint32_t>(i);
      return Status::NotFound("block " + missing.ToString() + " is missing (the layer has " +
                              std::to_string(entries.size()) + " blocks up to block " +
                              std::to_string(entries.back().key.block) + ")");
    }
  }
  const ModelLayout& l = meta_.layout;
  const uint64_t n_tokens = uint64_t{l.block_tokens} * entries.size();
  const uint64_t bytes = n_tokens * l.KeyBytesPerTokenPerLayer();
  if (keys != nullptr) keys->assign(bytes, std::byte{0});
  if (values != nullptr) values->assign(bytes, std::byte{0});
  Status first_error;
  KVTIER_RETURN_IF_ERROR(ReadBlocks(
      entries, [&](const BlockEntry& e, const Status& s, std::span<const std::byte> data) {
        if (!s.ok()) {
          first_error = s;
          return false;
        }
        if (keys != nullptr) ScatterBlock(data, KvPart::kKeys, e.key.block, keys->data());
        if (values != nullptr) ScatterBlock(data, KvPart::kValues, e.key.block, values->data());
        return true;
      }));
  if (!first_error.ok()) {
    if (keys != nullptr) keys->clear();
    if (values != nullptr) values->clear();
    return first_error;
  }
  if (tokens != nullptr) *tokens = n_tokens;
  return Status::OK();
}

Result<std::vector<std::byte>> StoreReader::ReadLayerPart(uint32_t namespace_id,
                                                          const SequenceId& sequence,
                                                          uint32_t layer, KvPart part,
                                                          uint64_t* tokens) {
  std::vector<std::byte> out;
  KVTIER_RETURN_IF_ERROR(ReadLayer(namespace_id, sequence, layer,
                                   part == KvPart::kKeys ? &out : nullptr,
                                   part == KvPart::kValues ? &out : nullptr, tokens));
  return out;
}

}  // namespace kvtier::tools
