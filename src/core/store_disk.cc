// The Store's disk tier: opening and recovering a store directory, the write-back
// pipeline and its catalog commits, promotion of blocks from disk, Flush and close.
// The ordering rules are in store_impl.h.
#include <xxhash.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <utility>

#include "src/core/store_impl.h"
#include "src/util/log.h"

namespace kvtier {
namespace {

uint64_t ExtentKey(uint32_t file, uint64_t offset) {
  return (uint64_t{file} << 48) | (offset >> 12);
}

Extent ExtentOf(const DiskLocation& loc) { return Extent{loc.file, loc.offset, loc.length}; }

bool SameExtent(const DiskLocation& a, const DiskLocation& b) {
  return a.file == b.file && a.offset == b.offset && a.generation == b.generation;
}

// Counts down completions that run on the I/O thread; Wait blocks until all ran.
class Latch {
 public:
  explicit Latch(int count) : remaining_(count) {}
  void CountDown() {
    MutexLock lock(&mu_);
    if (--remaining_ == 0) cv_.notify_all();
  }
  void Wait() {
    MutexLock lock(&mu_);
    while (remaining_ > 0) cv_.wait(mu_);
  }

 private:
  Mutex mu_;
  std::condition_variable_any cv_;
  int remaining_;
};

}  // namespace

uint64_t EmbeddedStore::Impl::Checksum(const void* data) const {
  return XXH3_64bits(data, block_bytes);
}

Status EmbeddedStore::Impl::OpenDisk() {
  const std::string& dir = options.directory;
  KVTIER_RETURN_IF_ERROR(env->CreateDirs(dir));
  KVTIER_ASSIGN_OR_RETURN(lock_file, env->LockFile(dir + "/LOCK"));
  KVTIER_ASSIGN_OR_RETURN(catalog, Catalog::Open(dir + "/catalog", /*create_if_missing=*/true));
  KVTIER_ASSIGN_OR_RETURN(std::optional<CatalogMeta> meta, catalog->ReadMeta());
  DiskTierOptions disk_options{
      .files = {},
      .io_depth = options.io_depth,
      .sqpoll = options.io_sqpoll,
      .dsync = options.sync == SyncPolicy::kDsync,
      .buffers = {MemoryRange{pool->region().data(), pool->region().size()}}};
  const bool created = !meta.has_value();
  if (created) {
    std::vector<std::string> dirs = options.disk_paths;
    if (dirs.empty()) dirs.push_back(dir);
    const uint64_t per_file = options.disk_capacity_bytes / dirs.size() / 4096 * 4096;
    if (per_file < pool->slot_bytes()) {
      return Status::InvalidArgument(
          "disk capacity of " + std::to_string(options.disk_capacity_bytes) + " bytes over " +
          std::to_string(dirs.size()) + " slab file(s) holds no block of " +
          std::to_string(pool->slot_bytes()) + " bytes");
    }
    meta = CatalogMeta{};
    meta->layout = layout;
    meta->layout_fingerprint = layout.Fingerprint();
    for (size_t i = 0; i < dirs.size(); ++i) {
      KVTIER_RETURN_IF_ERROR(env->CreateDirs(dirs[i]));
      std::error_code ec;
      std::string path =
          std::filesystem::absolute(dirs[i], ec).string() + "/slab-" + std::to_string(i) + ".kvt";
      meta->slab_files.push_back(SlabFileInfo{path, per_file});
    }
  } else {
    if (meta->format_version != CatalogMeta::kFormatVersion) {
      return Status::FailedPrecondition(
          "store " + dir + " has format version " + std::to_string(meta->format_version) +
          "; this kvtier reads version " + std::to_string(CatalogMeta::kFormatVersion));
    }
    if (meta->layout_fingerprint != layout.Fingerprint() || !(meta->layout == layout)) {
      return Status::FailedPrecondition("store " + dir + " holds blocks of layout (" +
                                        meta->layout.ToString() + "), fingerprint " +
                                        std::to_string(meta->layout_fingerprint) +
                                        "; it cannot be opened with layout (" + layout.ToString() +
                                        "), fingerprint " + std::to_string(layout.Fingerprint()));
    }
    for (const SlabFileInfo& f : meta->slab_files) {
      if (!env->Exists(f.path)) {
        return Status::Corruption("store " + dir + ": slab file " + f.path + " is missing");
      }
    }
  }
  disk_options.files = meta->slab_files;
  KVTIER_ASSIGN_OR_RETURN(disk, DiskTier::Open(env, disk_options));
  if (created) {
    // The files exist (and their directory entries are durable) before the catalog
    // names them: a crash in between leaves files a later Open reuses.
    for (const SlabFileInfo& f : meta->slab_files) {
      KVTIER_RETURN_IF_ERROR(env->SyncDir(std::filesystem::path(f.path).parent_path()));
    }
    KVTIER_RETURN_IF_ERROR(catalog->WriteMeta(*meta));
  }
  std::vector<uint64_t> sizes;
  for (const SlabFileInfo& f : meta->slab_files) sizes.push_back(f.bytes);
  {
    MutexLock lock(&mu);
    extents = std::make_unique<ExtentAllocator>(sizes);
    KVTIER_RETURN_IF_ERROR(RecoverLocked());
    if (retrieval != nullptr) KVTIER_RETURN_IF_ERROR(RebuildRetrievalLocked());
  }
  slot_checksums.assign(pool->slot_count(), 0);
  read_reserve_slots = std::min<uint32_t>(
      8, std::max<uint32_t>(pool->slot_count() > 1 ? 1 : 0, pool->slot_count() / 8));
  has_disk = true;
  background = std::thread([this] { BackgroundLoop(); });
  return Status::OK();
}

Status EmbeddedStore::Impl::RecoverLocked() {
  uint64_t orphans = 0;
  Status s = catalog->ForEachBlock([&](const BlockKey& key, const DiskLocation& loc) {
    auto [e, created] = index.Insert(key);
    if (created) ++NamespaceLocked(key.namespace_id).usage.blocks;
    e->on_disk = true;
    e->disk = loc;
    e->disk.flags &= ~uint32_t{kBlockOrphanExtent};
    bool owned = loc.length == pool->slot_bytes() && loc.data_bytes == block_bytes &&
                 loc.file < extents->file_count() && extents->MarkUsed(ExtentOf(loc)).ok();
    if (!owned) {
      // Never trust it, never free it: `kvtier verify` can look closer.
      e->disk.flags |= kBlockCorrupt | kBlockOrphanExtent;
      ++orphans;
    }
    ++stats.disk_blocks;
    if (e->disk.flags & kBlockCorrupt) ++stats.corrupt_blocks;
    generation = std::max(generation, loc.generation);
    return true;
  });
  KVTIER_RETURN_IF_ERROR(s.WithContext("reading the catalog of " + options.directory));
  if (orphans > 0) {
    Log().error(
        "kvtier: {}: {} catalog entries point outside the slab files or overlap "
        "others; they are quarantined as corrupt",
        options.directory, orphans);
  }
  if (stats.disk_blocks > 0) {
    Log().info("kvtier: reopened {}: {} blocks on disk ({} corrupt), {} of {} bytes used",
               options.directory, stats.disk_blocks, stats.corrupt_blocks, extents->used_bytes(),
               extents->total_bytes());
  }
  return Status::OK();
}

void EmbeddedStore::Impl::CloseDisk() {
  if (!has_disk) return;
  Status s = Flush();
  if (!s.ok()) {
    Log().error("kvtier: closing {}: blocks not made durable: {}", options.directory, s.ToString());
  }
  {
    MutexLock lock(&mu);
    stopping = true;
  }
  bg_cv.notify_all();
  background.join();
  disk.reset();  // waits for the I/O still in flight
  if (Status c = catalog->Close(); !c.ok()) {
    Log().error("kvtier: closing the catalog of {}: {}", options.directory, c.ToString());
  }
  lock_file.reset();
}

void EmbeddedStore::Impl::EnqueueWriteLocked(const BlockKey& key, uint64_t version, SlotId slot) {
  pool->Pin(slot);
  ++writeback_pins;
  if (NamespaceState* ns = QuotaLocked(key.namespace_id)) ++ns->writeback_blocks;
  write_queue.push_back(WriteItem{.key = key, .version = version, .slot = slot});
  bg_cv.notify_one();
}

void EmbeddedStore::Impl::QueueDeletesLocked(std::vector<Catalog::Update> deletes,
                                             std::vector<Extent> frees) {
  catalog_jobs.push_back(
      CatalogJob{.deletes = std::move(deletes), .frees_after = std::move(frees)});
  ++jobs_enqueued;
  bg_cv.notify_one();
}

void EmbeddedStore::Impl::QueueSummaryWriteLocked(const BlockKey& key, uint64_t version,
                                                  std::vector<std::byte> bytes) {
  catalog_jobs.push_back(CatalogJob{
      .summary = SummaryWrite{.key = key, .version = version, .bytes = std::move(bytes)}});
  ++jobs_enqueued;
  bg_cv.notify_one();
}

void EmbeddedStore::Impl::FreeExtentLocked(const Extent& extent) {
  const uint64_t k = ExtentKey(extent.file, extent.offset);
  if (extent_readers.contains(k)) {
    deferred_frees[k] = extent;  // freed when the last read of it completes
    return;
  }
  if (Status s = extents->Free(extent); !s.ok()) {
    Log().error("kvtier: {}: freeing an extent: {}", options.directory, s.ToString());
    return;
  }
  if (disk_full) {
    disk_full = false;
    // Writes refused for lack of space may go now.
    RetryFailedWritesLocked(UINT64_MAX, /*only_no_space=*/true);
  }
}

void EmbeddedStore::Impl::RetryFailedWritesLocked(uint64_t max_version, bool only_no_space) {
  for (auto it = failed_writes.begin(); it != failed_writes.end() && it->first <= max_version;) {
    const auto& [key, status] = it->second;
    const BlockIndex::Entry* e = index.Find(key);
    if ((!only_no_space || status.code() == StatusCode::kResourceExhausted) && e != nullptr &&
        e->version == it->first && e->host_slot != BlockIndex::kNoSlot) {
      EnqueueWriteLocked(key, it->first, e->host_slot);
      it = failed_writes.erase(it);
    } else {
      ++it;
    }
  }
}

void EmbeddedStore::Impl::QueueDirtyLruLocked(uint32_t max_blocks, uint32_t group) {
  for (uint32_t i = 0; i < max_blocks; ++i) {
    std::optional<SlotId> slot = pool->DirtyLruOldest(group);
    if (!slot) return;
    EnqueueWriteLocked(pool->KeyOf(*slot), index.Find(pool->KeyOf(*slot))->version, *slot);
  }
}

void EmbeddedStore::Impl::ReadPinLocked(const DiskLocation& loc) {
  ++extent_readers[ExtentKey(loc.file, loc.offset)];
}

void EmbeddedStore::Impl::ReadUnpinLocked(const DiskLocation& loc) {
  const uint64_t k = ExtentKey(loc.file, loc.offset);
  auto it = extent_readers.find(k);
  if (--it->second > 0) return;
  extent_readers.erase(it);
  if (auto d = deferred_frees.find(k); d != deferred_frees.end()) {
    Extent extent = d->second;
    deferred_frees.erase(d);
    FreeExtentLocked(extent);
  }
}

void EmbeddedStore::Impl::Promote(std::span<ReadPlan> plans, std::span<const BlockKey> keys) {
  int count = 0;
  for (const ReadPlan& p : plans) count += p.promote ? 1 : 0;
  Latch latch(count);
  for (ReadPlan& p : plans) {
    if (!p.promote) continue;
    disk->Read(p.loc.file, p.loc.offset, pool->SlotData(p.slot), p.loc.length,
               [&p, &latch](Status s) {
                 p.status = std::move(s);
                 latch.CountDown();
               });
  }
  latch.Wait();
  for (size_t i = 0; i < plans.size(); ++i) {
    ReadPlan& p = plans[i];
    if (!p.promote || !p.status.ok()) continue;
    if (Checksum(pool->SlotData(p.slot)) != p.loc.checksum) {
      p.status =
          Status::Corruption("block " + keys[i].ToString() + " failed its checksum (slab file " +
                             disk->file_info(p.loc.file).path + " offset " +
                             std::to_string(p.loc.offset) + "); it is quarantined");
    }
  }
  MutexLock lock(&mu);
  for (size_t i = 0; i < plans.size(); ++i) {
    ReadPlan& p = plans[i];
    if (!p.promote) continue;
    ReadUnpinLocked(p.loc);
    BlockIndex::Entry* e = index.Find(keys[i]);
    const bool same = e != nullptr && e->on_disk && SameExtent(e->disk, p.loc);
    if (!p.status.ok()) {
      if (p.status.code() == StatusCode::kCorruption) {
        if (same && !(e->disk.flags & kBlockCorrupt)) {
          e->disk.flags |= kBlockCorrupt;
          ++stats.corrupt_blocks;
          if (retrieval != nullptr && e->host_slot == BlockIndex::kNoSlot) {
            // Unreadable now: never selected again (a new Put indexes it again).
            std::shared_ptr<RetrievalIndexes::Sequence> retired;
            retrieval->QueueRemove(keys[i], &retired);
          }
          catalog_jobs.push_back(CatalogJob{.mark_corrupt = std::make_pair(keys[i], e->disk)});
          ++jobs_enqueued;
          bg_cv.notify_one();
        }
      } else {
        ++stats.disk_read_errors;
        p.status = p.status.WithContext("reading block " + keys[i].ToString() + " from disk");
      }
      AbandonSlotLocked(p.slot, keys[i].namespace_id);
      p.slot = BlockIndex::kNoSlot;
      continue;
    }
    ++stats.disk_reads;
    stats.disk_bytes_read += p.loc.length;
    // Promoted (the slot still pinned by us), unless the block changed while we read or
    // its namespace's host quota had no room: the caller still gets the copy it asked
    // for, and the unpublished slot is freed at its last Unpin.
    if (!(same && e->host_slot == BlockIndex::kNoSlot &&
          PublishPromotedLocked(keys[i], e, p.slot))) {
      SettleChargeLocked(p.slot, keys[i].namespace_id);
    }
  }
}

void EmbeddedStore::Impl::BackgroundLoop() {
  MutexLock lock(&mu);
  auto release = [this](const WriteItem& item) KVTIER_REQUIRES(mu) {
    --writeback_pins;
    if (NamespaceState* ns = QuotaLocked(item.key.namespace_id)) --ns->writeback_blocks;
    pool->Unpin(item.slot);
    slot_cv.notify_all();
    flush_cv.notify_all();
  };
  auto fail = [this, &release](const WriteItem& item, const Status& status) KVTIER_REQUIRES(mu) {
    if (item.has_extent) FreeExtentLocked(item.extent);
    ++stats.disk_write_errors;
    const BlockIndex::Entry* e = index.Find(item.key);
    if (e != nullptr && e->version == item.version) {
      failed_writes[item.version] = {item.key, status};
      Log().warn("kvtier: writing block {} to disk: {}", item.key.ToString(), status.ToString());
    }
    release(item);
  };
  auto current = [this](const WriteItem& item) KVTIER_REQUIRES(mu) {
    const BlockIndex::Entry* e = index.Find(item.key);
    return e != nullptr && e->version == item.version;
  };
  std::vector<WriteItem> to_start;
  for (;;) {
    // 1. Start writes, up to io_depth in flight.
    while (!write_queue.empty() && writes_in_flight + to_start.size() < options.io_depth) {
      WriteItem item = std::move(write_queue.front());
      write_queue.pop_front();
      if (!current(item)) {  // replaced or deleted since: nothing to write
        release(item);
        continue;
      }
      Result<Extent> extent = extents->Allocate(pool->slot_bytes());
      if (!extent.ok()) {
        disk_full = true;
        fail(item, extent.status());
        continue;
      }
      item.has_extent = true;
      item.extent = *extent;
      item.loc = DiskLocation{.file = extent->file,
                              .offset = extent->offset,
                              .length = extent->length,
                              .data_bytes = block_bytes,
                              .checksum = 0,
                              .flags = 0,
                              .generation = ++generation};
      to_start.push_back(std::move(item));
    }
    if (!to_start.empty()) {
      writes_in_flight += static_cast<uint32_t>(to_start.size());
      mu.Unlock();
      for (WriteItem& item : to_start) {
        std::byte* data = pool->SlotData(item.slot);
        item.loc.checksum = slot_checksums[item.slot];  // computed by the slot's filler
        const uint32_t file = item.loc.file;
        const uint64_t offset = item.loc.offset, length = item.loc.length;
        disk->Write(file, offset, data, length, [this, item = std::move(item)](Status s) mutable {
          item.status = std::move(s);
          MutexLock l(&mu);
          writes_done.push_back(std::move(item));
          bg_cv.notify_one();
        });
      }
      to_start.clear();
      mu.Lock();
      continue;
    }

    // 2. Completed writes: failures go back to dirty, successes wait for one Sync.
    const bool completions = !writes_done.empty();
    for (WriteItem& item : writes_done) {
      --writes_in_flight;
      if (item.status.ok()) {
        sync_group.push_back(std::move(item));
      } else {
        fail(item, item.status);
      }
    }
    writes_done.clear();
    if (!sync_group.empty() && !sync_in_flight &&
        (writes_in_flight == 0 || sync_group.size() >= options.io_depth)) {
      sync_in_flight = true;
      auto group = std::make_shared<std::vector<WriteItem>>(std::move(sync_group));
      sync_group.clear();
      mu.Unlock();
      disk->Sync([this, group](Status s) {
        MutexLock l(&mu);
        catalog_jobs.push_back(CatalogJob{.writes = std::move(*group), .sync_status = s});
        ++jobs_enqueued;
        sync_in_flight = false;
        bg_cv.notify_one();
      });
      mu.Lock();
      continue;
    }
    if (completions) continue;  // room in flight again: back to step 1

    // 3. Catalog jobs, in order.
    if (!catalog_jobs.empty()) {
      CatalogJob job = std::move(catalog_jobs.front());
      catalog_jobs.pop_front();
      std::vector<Catalog::Update> updates;
      std::vector<WriteItem*> committed;
      bool write_summary = false;
      if (!job.sync_status.ok()) {
        for (const WriteItem& item : job.writes) fail(item, job.sync_status);
      } else if (!job.writes.empty()) {
        for (WriteItem& item : job.writes) {
          if (current(item)) {
            // The entry and the block's summary (retrieval) in one batch.
            auto summary = pending_summaries.find(item.version);
            updates.push_back(Catalog::Update{
                item.key, item.loc,
                summary != pending_summaries.end() ? summary->second : std::vector<std::byte>{}});
            committed.push_back(&item);
          } else {
            FreeExtentLocked(item.extent);  // no catalog entry ever named it
            release(item);
          }
        }
      } else if (job.mark_corrupt) {
        const BlockIndex::Entry* e = index.Find(job.mark_corrupt->first);
        if (e != nullptr && e->on_disk && SameExtent(e->disk, job.mark_corrupt->second)) {
          updates.push_back(Catalog::Update{job.mark_corrupt->first, job.mark_corrupt->second});
        }
      } else if (job.summary) {
        // Only for the durable copy of the version it summarizes: a block replaced or
        // deleted since has a newer commit (or a removal) behind this job.
        const BlockIndex::Entry* e = index.Find(job.summary->key);
        write_summary = e != nullptr && e->version == job.summary->version && e->on_disk &&
                        !e->dirty && !(e->disk.flags & kBlockCorrupt);
      } else {
        updates = std::move(job.deletes);
      }
      Status s;
      if (!updates.empty() || write_summary) {
        mu.Unlock();
        s = write_summary ? catalog->PutRepresentatives(job.summary->key, job.summary->bytes)
                          : catalog->Commit(updates);
        mu.Lock();
        if (s.ok()) ++stats.catalog_commits;
      }
      if (!s.ok()) {
        // The catalog's state is unknown: keep every extent allocated (leaked, never
        // reused while a durable entry might name it), and report.
        Log().error("kvtier: {}: catalog commit failed: {}", options.directory, s.ToString());
        if (catalog_error.ok()) catalog_error = s;
        for (WriteItem* item : committed) {
          const BlockIndex::Entry* e = index.Find(item->key);
          if (e != nullptr && e->version == item->version) {
            failed_writes[item->version] = {item->key, s};
          }
          release(*item);
        }
      } else if (!job.writes.empty()) {
        for (WriteItem* item : committed) {
          stats.disk_writes++;
          stats.disk_bytes_written += item->loc.length;
          BlockIndex::Entry* e = index.Find(item->key);
          if (e == nullptr) {
            // Deleted after the commit was decided: the catalog names the extent now,
            // so it is removed (and the extent freed) by one more job.
            QueueDeletesLocked({Catalog::Update{item->key, std::nullopt}}, {item->extent});
            release(*item);
            continue;
          }
          if (e->on_disk) {
            if (e->disk.flags & kBlockCorrupt) --stats.corrupt_blocks;
            if (!(e->disk.flags & kBlockOrphanExtent)) FreeExtentLocked(ExtentOf(e->disk));
          } else {
            ++stats.disk_blocks;
          }
          e->on_disk = true;
          e->disk = item->loc;
          if (e->version == item->version) {
            e->dirty = false;
            dirty_versions.erase(item->version);
            failed_writes.erase(item->version);
            pending_summaries.erase(item->version);
            pool->MarkClean(item->slot);
          }
          release(*item);
        }
      } else if (!job.deletes.empty() || !job.frees_after.empty()) {
        for (const Extent& extent : job.frees_after) FreeExtentLocked(extent);
      }
      ++jobs_done;
      flush_cv.notify_all();
      slot_cv.notify_all();
      continue;
    }

    if (stopping && write_queue.empty() && writes_in_flight == 0 && !sync_in_flight &&
        sync_group.empty()) {
      return;
    }
    bg_cv.wait(mu);
  }
}

Status EmbeddedStore::Impl::Flush() {
  if (!has_disk) return Status::OK();
  MutexLock lock(&mu);
  const uint64_t target_version = next_version - 1;
  const uint64_t target_jobs = jobs_enqueued;
  // Blocks whose last write failed get another try.
  RetryFailedWritesLocked(target_version, /*only_no_space=*/false);
  for (;;) {
    // Write-back: queue every dirty block not in use (in use ones come back here).
    if (!options.write_through) QueueDirtyLruLocked(UINT32_MAX);
    bool pending = jobs_done < target_jobs;
    for (auto it = dirty_versions.begin(); !pending && it != dirty_versions.end(); ++it) {
      if (*it > target_version) break;
      pending = !failed_writes.contains(*it);
    }
    if (!pending) break;
    if (options.write_through) {
      flush_cv.wait(mu);
    } else {
      flush_cv.wait_for(mu, std::chrono::milliseconds(5));
    }
  }
  for (const auto& [version, failure] : failed_writes) {
    if (version <= target_version) {
      return failure.second.WithContext("flush: block " + failure.first.ToString());
    }
  }
  return catalog_error;
}

}  // namespace kvtier
