#include "kvtier/store.h"

#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "src/core/store_impl.h"
#include "src/util/log.h"

namespace kvtier {
namespace {

// Slot ids for a batch: on the stack for small batches (one decode step's layers).
class SlotArray {
 public:
  explicit SlotArray(size_t n) : slots_(n <= kInline ? inline_ : (heap_.resize(n), heap_.data())) {
    for (size_t i = 0; i < n; ++i) slots_[i] = BlockIndex::kNoSlot;
  }
  SlotId& operator[](size_t i) { return slots_[i]; }

 private:
  static constexpr size_t kInline = 64;
  SlotId inline_[kInline];
  std::vector<SlotId> heap_;
  SlotId* slots_;
};

}  // namespace

Status EmbeddedStore::Impl::CheckKey(const BlockKey& key) const {
  if (key.layer >= layout.num_layers) {
    return Status::InvalidArgument("block " + key.ToString() + ": layer " +
                                   std::to_string(key.layer) + " outside the layout's " +
                                   std::to_string(layout.num_layers) + " layers");
  }
  return Status::OK();
}

Status EmbeddedStore::Impl::CheckBuffer(const void* data, uint64_t bytes) const {
  if (data == nullptr) return Status::InvalidArgument("null block buffer");
  if (bytes != block_bytes) {
    return Status::InvalidArgument("block buffer of " + std::to_string(bytes) +
                                   " bytes; this store's blocks are " +
                                   std::to_string(block_bytes) + " bytes");
  }
  return Status::OK();
}

Result<SlotId> EmbeddedStore::Impl::ReserveLocked(const BlockKey& key, bool for_put) {
  NamespaceState* ns = QuotaLocked(key.namespace_id);
  bool charged = false;
  if (ns != nullptr) {
    if (for_put && ns->usage.blocks >= ns->disk_limit_blocks && index.Find(key) == nullptr) {
      ++ns->usage.quota_rejections;
      return DiskQuotaExceeded(key, *ns);
    }
    if (ns->host_limit_blocks != kNoLimit) {
      KVTIER_ASSIGN_OR_RETURN(HostRoom room, HostRoomLocked(*ns, key, for_put));
      charged = room == HostRoom::kRoom;
      if (charged) ++ns->host_reserved;
    }
  }
  Result<SlotId> slot = ReserveFreeSlotLocked(for_put);
  if (!slot.ok()) {
    if (charged) --ns->host_reserved;
    return slot.status();
  }
  slot_charged[*slot] = charged ? 1 : 0;
  return slot;
}

Result<SlotId> EmbeddedStore::Impl::ReserveFreeSlotLocked(bool for_put) {
  // With a disk tier, a Put never takes the last few slots that are free or clean:
  // they stay for promotions, so blocks on disk can be read even when the host tier is
  // full of blocks the disk cannot take (a full disk).
  const uint32_t keep = for_put && has_disk ? read_reserve_slots : 0;
  for (;;) {
    if (pool->free_slots() + pool->evictable_slots() > keep) {
      if (std::optional<SlotId> slot = pool->Allocate()) return *slot;
      EvictLocked(*pool->LruVictim());
      continue;  // the victim's slot is free now
    }
    // Nothing free or clean: every slot is pinned, or dirty (not on disk yet).
    if (has_disk && !options.write_through && !disk_full) {
      // Write-back: start writing the oldest dirty blocks so that slots come clean.
      QueueDirtyLruLocked(options.io_depth);
    }
    const bool disk_will_free = has_disk && writeback_pins > 0;
    if (!disk_will_free) {
      if (has_disk && disk_full && pool->dirty_slots() > 0) {
        return Status::ResourceExhausted(
            "the disk tier is full and every host slot holds a block not yet on disk; "
            "delete blocks or sequences to make room");
      }
      ++stats.busy_rejections;
      return Status::Busy("every one of the host tier's " + std::to_string(pool->slot_count()) +
                          " slots is in use by an operation in flight");
    }
    if (!options.wait_when_full) {
      ++stats.busy_rejections;
      return Status::Busy("the host tier is full of blocks the disk has not taken yet");
    }
    ++stats.put_waits;
    slot_cv.wait(mu);
  }
}

void EmbeddedStore::Impl::EvictLocked(SlotId victim) {
  BlockIndex::Entry* entry = index.Find(pool->KeyOf(victim));
  ++stats.evictions;
  if (entry->on_disk && !entry->dirty) {
    // Demoted: the disk holds it already; only the host copy goes.
    entry->host_slot = BlockIndex::kNoSlot;
    pool->Retire(victim);
    HostCopyGoneLocked(entry->key->namespace_id);
    return;
  }
  // No lower tier: the block is lost, and counted.
  ++stats.evictions_lost;
  if (retrieval != nullptr) {
    // Applied by the layer's next Put or Select. A sequence left with no block goes
    // here, under `mu`: rare, and freeing its indexes is quick.
    std::shared_ptr<RetrievalIndexes::Sequence> retired;
    retrieval->QueueRemove(*entry->key, &retired);
  }
  DetachLocked(entry, nullptr, nullptr);
  index.Erase(entry);
}

Status EmbeddedStore::Impl::CommitLocked(const BlockKey& key, SlotId slot, PreparedSummary* summary,
                                         RetrievalIndexes::LayerRef* touched) {
  NamespaceState& ns = NamespaceLocked(key.namespace_id);
  if (slot_charged[slot] == 0 && ns.host_limit_blocks != kNoLimit) {
    // Reserved as the replacement of a resident block: if that copy went meanwhile, this
    // one needs room after all.
    Result<HostRoom> room = HostRoomLocked(ns, key, /*for_put=*/true);
    if (!room.ok()) {
      AbandonSlotLocked(slot, key.namespace_id);
      return room.status();
    }
  }
  auto [entry, created] = index.Insert(key);
  if (created) {
    if (ns.usage.blocks >= ns.disk_limit_blocks) {
      // The key was there at the reservation, and went since.
      index.Erase(entry);
      ++ns.usage.quota_rejections;
      AbandonSlotLocked(slot, key.namespace_id);
      return DiskQuotaExceeded(key, ns);
    }
    ++ns.usage.blocks;
  } else {
    if (device != nullptr) device->Invalidate(key);  // the GPU tier's copy is stale
    if (entry->host_slot != BlockIndex::kNoSlot) {
      pool->Retire(entry->host_slot);
      --ns.usage.host_blocks;
    }
    if (entry->dirty) {  // the older host copy will never be written now
      dirty_versions.erase(entry->version);
      failed_writes.erase(entry->version);
      pending_summaries.erase(entry->version);
    }
  }
  SettleChargeLocked(slot, key.namespace_id);
  entry->host_slot = slot;
  entry->version = next_version++;
  entry->dirty = has_disk;
  pool->Publish(slot, key, has_disk, ns.lru_group);
  ++ns.usage.host_blocks;
  if (has_disk) {
    dirty_versions.insert(entry->version);
    if (options.write_through) EnqueueWriteLocked(key, entry->version, slot);
  }
  pool->Unpin(slot);
  ++stats.puts;
  stats.bytes_put += block_bytes;
  if (retrieval == nullptr) return Status::OK();
  if (has_disk && !summary->encoded.empty()) {
    pending_summaries[entry->version] = std::move(summary->encoded);
  }
  *touched = retrieval->QueueAdd(key, std::move(summary->summary));
  return Status::OK();
}

void EmbeddedStore::Impl::DetachLocked(BlockIndex::Entry* entry,
                                       std::vector<Catalog::Update>* catalog_deletes,
                                       std::vector<Extent>* extents_to_free) {
  if (device != nullptr) device->Invalidate(*entry->key);
  if (entry->host_slot != BlockIndex::kNoSlot) pool->Retire(entry->host_slot);
  if (entry->dirty) {
    dirty_versions.erase(entry->version);
    failed_writes.erase(entry->version);
    pending_summaries.erase(entry->version);
  }
  if (entry->on_disk) {
    --stats.disk_blocks;
    if (entry->disk.flags & kBlockCorrupt) --stats.corrupt_blocks;
    if (catalog_deletes != nullptr) {
      catalog_deletes->push_back(Catalog::Update{*entry->key, std::nullopt});
      if (!(entry->disk.flags & kBlockOrphanExtent)) {
        extents_to_free->push_back(
            Extent{entry->disk.file, entry->disk.offset, entry->disk.length});
      }
    }
  }
  BlockGoneLocked(entry->key->namespace_id, entry->host_slot != BlockIndex::kNoSlot);
}

void EmbeddedStore::Impl::PlanReadLocked(const BlockKey& key, ReadPlan& plan) {
  SlotId reserved = BlockIndex::kNoSlot;
  for (;;) {
    BlockIndex::Entry* e = index.Find(key);
    if (e == nullptr) {
      ++stats.get_misses;
      plan.status = Status::NotFound("block " + key.ToString() + " is not in the store");
      break;
    }
    if (e->host_slot != BlockIndex::kNoSlot) {
      pool->Pin(e->host_slot);
      plan.slot = e->host_slot;
      break;
    }
    if (e->disk.flags & kBlockCorrupt) {
      plan.status = Status::Corruption("block " + key.ToString() +
                                       " failed its checksum on disk and is quarantined");
      break;
    }
    if (reserved == BlockIndex::kNoSlot) {
      // A slot to promote into. Reserving may wait and let the block change: look again.
      Result<SlotId> r = ReserveLocked(key, /*for_put=*/false);
      if (!r.ok()) {
        plan.status = r.status();
        break;
      }
      reserved = *r;
      continue;
    }
    plan.slot = reserved;
    reserved = BlockIndex::kNoSlot;
    plan.promote = true;
    plan.loc = e->disk;
    ReadPinLocked(plan.loc);
    break;
  }
  if (reserved != BlockIndex::kNoSlot) AbandonSlotLocked(reserved, key.namespace_id);
}

bool EmbeddedStore::Impl::OnDiskOnlyLocked(const BlockKey& key) {
  const BlockIndex::Entry* e = index.Find(key);
  return e != nullptr && e->host_slot == BlockIndex::kNoSlot;
}

void EmbeddedStore::Impl::PinReads(std::span<const BlockKey> keys, std::span<ReadPlan> plans,
                                   bool host_only, bool* declined) {
  bool any_promotion = false;
  {
    MutexLock lock(&mu);
    if (host_only) {
      // Decided under the same hold of the lock as the plans: no block found here can
      // leave the host tier before it is pinned.
      for (size_t i = 0; i < keys.size(); ++i) {
        if (plans[i].status.ok() && OnDiskOnlyLocked(keys[i])) {
          *declined = true;
          return;
        }
      }
      *declined = false;
    }
    for (size_t i = 0; i < keys.size(); ++i) {
      if (!plans[i].status.ok()) continue;
      PlanReadLocked(keys[i], plans[i]);
      any_promotion |= plans[i].promote;
    }
  }
  if (any_promotion) Promote(plans, keys);
}

Status EmbeddedStore::Impl::Put(const BlockKey& key, const void* data, uint64_t bytes) {
  KVTIER_RETURN_IF_ERROR(CheckKey(key));
  KVTIER_RETURN_IF_ERROR(CheckBuffer(data, bytes));
  // The summary first, from the caller's data: no slot stays pinned meanwhile.
  PreparedSummary summary;
  if (retrieval != nullptr) {
    KVTIER_RETURN_IF_ERROR(PrepareSummary(data, layout.block_tokens, {}, &summary));
  }
  SlotId slot;
  {
    MutexLock lock(&mu);
    KVTIER_ASSIGN_OR_RETURN(slot, ReserveLocked(key, /*for_put=*/true));
  }
  std::memcpy(pool->SlotData(slot), data, bytes);
  ChecksumSlot(slot);
  RetrievalIndexes::LayerRef touched;
  Status committed;
  {
    MutexLock lock(&mu);
    committed = CommitLocked(key, slot, &summary, &touched);
  }
  if (retrieval != nullptr) retrieval->Apply(touched);
  return committed;
}

Status EmbeddedStore::Impl::PutBatch(std::span<const BlockWrite> writes,
                                     std::span<Status> statuses) {
  if (statuses.size() != writes.size()) {
    return Status::InvalidArgument("PutBatch: " + std::to_string(statuses.size()) +
                                   " statuses for " + std::to_string(writes.size()) + " writes");
  }
  SlotArray slots(writes.size());
  std::vector<PreparedSummary> summaries(retrieval != nullptr ? writes.size() : 0);
  for (size_t i = 0; i < writes.size(); ++i) {
    statuses[i] = CheckKey(writes[i].key);
    if (statuses[i].ok()) statuses[i] = CheckBuffer(writes[i].data, writes[i].bytes);
    if (statuses[i].ok() && retrieval != nullptr) {
      statuses[i] = PrepareSummary(writes[i].data, layout.block_tokens, {}, &summaries[i]);
    }
  }
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < writes.size(); ++i) {
      if (!statuses[i].ok()) continue;
      Result<SlotId> slot = ReserveLocked(writes[i].key, /*for_put=*/true);
      if (slot.ok()) {
        slots[i] = *slot;
      } else {
        statuses[i] = slot.status();
      }
    }
  }
  for (size_t i = 0; i < writes.size(); ++i) {
    if (slots[i] != BlockIndex::kNoSlot) {
      std::memcpy(pool->SlotData(slots[i]), writes[i].data, block_bytes);
      ChecksumSlot(slots[i]);
    }
  }
  std::vector<RetrievalIndexes::LayerRef> touched;
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < writes.size(); ++i) {
      if (slots[i] == BlockIndex::kNoSlot) continue;
      RetrievalIndexes::LayerRef layer;
      statuses[i] = CommitLocked(writes[i].key, slots[i],
                                 retrieval != nullptr ? &summaries[i] : nullptr, &layer);
      if (layer.sequence != nullptr &&
          (touched.empty() || touched.back().sequence != layer.sequence ||
           touched.back().layer != layer.layer)) {
        touched.push_back(std::move(layer));
      }
    }
  }
  for (const RetrievalIndexes::LayerRef& layer : touched) retrieval->Apply(layer);
  return FirstFailure(statuses);
}

Status EmbeddedStore::Impl::GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses,
                                     bool host_only, bool* declined) {
  if (statuses.size() != reads.size()) {
    return Status::InvalidArgument("GetBatch: " + std::to_string(statuses.size()) +
                                   " statuses for " + std::to_string(reads.size()) + " reads");
  }
  constexpr size_t kInline = 64;
  if (reads.size() <= kInline) {
    ReadPlan plans[kInline];  // one decode step's layers: no allocation
    return RunReads(reads, std::span(plans, reads.size()), statuses, host_only, declined);
  }
  std::vector<ReadPlan> plans(reads.size());
  return RunReads(reads, plans, statuses, host_only, declined);
}

Status EmbeddedStore::Impl::RunReads(std::span<const BlockRead> reads, std::span<ReadPlan> plans,
                                     std::span<Status> statuses, bool host_only, bool* declined) {
  bool any_promotion = false;
  for (size_t i = 0; i < reads.size(); ++i) {
    plans[i].status = CheckKey(reads[i].key);
    if (plans[i].status.ok()) plans[i].status = CheckBuffer(reads[i].data, reads[i].bytes);
  }
  {
    MutexLock lock(&mu);
    if (host_only) {
      // Decided under the same hold of the lock as the plans: no block found here can
      // leave the host tier before it is pinned.
      for (size_t i = 0; i < reads.size(); ++i) {
        if (plans[i].status.ok() && OnDiskOnlyLocked(reads[i].key)) {
          *declined = true;
          return Status::OK();
        }
      }
      *declined = false;
    }
    for (size_t i = 0; i < reads.size(); ++i) {
      if (!plans[i].status.ok()) continue;
      PlanReadLocked(reads[i].key, plans[i]);
      any_promotion |= plans[i].promote;
    }
  }
  if (any_promotion) {
    std::vector<BlockKey> keys;
    keys.reserve(reads.size());
    for (const BlockRead& r : reads) keys.push_back(r.key);
    Promote(plans, keys);
  }
  for (size_t i = 0; i < reads.size(); ++i) {
    if (plans[i].slot != BlockIndex::kNoSlot && plans[i].status.ok()) {
      std::memcpy(reads[i].data, pool->SlotData(plans[i].slot), block_bytes);
    }
  }
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < reads.size(); ++i) {
      if (plans[i].slot == BlockIndex::kNoSlot) continue;
      pool->Unpin(plans[i].slot);
      if (!plans[i].status.ok()) continue;
      ++stats.gets;
      stats.bytes_got += block_bytes;
    }
  }
  for (size_t i = 0; i < reads.size(); ++i) statuses[i] = std::move(plans[i].status);
  return FirstFailure(statuses);
}

// --- Namespaces: usage and quotas ---------------------------------------------------------

namespace {

// options.quotas: one entry per namespace, each limit (when set) at least one block.
Status ValidateQuotas(const std::vector<NamespaceQuota>& quotas, uint64_t slot_bytes) {
  std::unordered_map<uint32_t, size_t> seen;
  for (size_t i = 0; i < quotas.size(); ++i) {
    const NamespaceQuota& q = quotas[i];
    const std::string name =
        "quotas[" + std::to_string(i) + "] (namespace " + std::to_string(q.namespace_id) + ")";
    if (auto [it, fresh] = seen.try_emplace(q.namespace_id, i); !fresh) {
      return Status::InvalidArgument(name + ": namespace " + std::to_string(q.namespace_id) +
                                     " already has a quota, quotas[" + std::to_string(it->second) +
                                     "]");
    }
    for (auto [what, bytes] :
         {std::pair{"host_bytes", q.host_bytes}, {"disk_bytes", q.disk_bytes}}) {
      if (bytes != 0 && bytes < slot_bytes) {
        return Status::InvalidArgument(name + ": " + what + " of " + std::to_string(bytes) +
                                       " holds no block of " + std::to_string(slot_bytes) +
                                       " bytes (block size rounded up to 4 KiB); 0 is no limit");
      }
    }
  }
  return Status::OK();
}

}  // namespace

Status EmbeddedStore::Impl::DiskQuotaExceeded(const BlockKey& key, const NamespaceState& ns) const {
  const uint64_t slot = pool->slot_bytes();
  return Status::QuotaExceeded(
      "block " + key.ToString() + ": namespace " + std::to_string(key.namespace_id) +
      " is at its disk quota: " + std::to_string(ns.usage.blocks) + " blocks of " +
      std::to_string(slot) + " bytes, " + std::to_string(ns.usage.blocks * slot) + " of " +
      std::to_string(ns.disk_limit_blocks * slot) + " bytes; delete blocks to make room");
}

void EmbeddedStore::Impl::InitQuotas() {
  MutexLock lock(&mu);
  slot_charged.assign(pool->slot_count(), 0);
  uint32_t next_group = 1;
  for (const NamespaceQuota& q : options.quotas) {
    NamespaceState& ns = namespaces[q.namespace_id];
    ns.has_quota = true;
    if (q.host_bytes != 0) {
      ns.host_limit_blocks = q.host_bytes / pool->slot_bytes();
      ns.lru_group = next_group++;
    }
    if (q.disk_bytes != 0) ns.disk_limit_blocks = q.disk_bytes / pool->slot_bytes();
  }
  has_quotas = !options.quotas.empty();
}

EmbeddedStore::Impl::NamespaceState& EmbeddedStore::Impl::NamespaceLocked(uint32_t namespace_id) {
  return namespaces[namespace_id];
}

EmbeddedStore::Impl::NamespaceState* EmbeddedStore::Impl::QuotaLocked(uint32_t namespace_id) {
  if (!has_quotas) return nullptr;
  auto it = namespaces.find(namespace_id);
  return it != namespaces.end() && it->second.has_quota ? &it->second : nullptr;
}

void EmbeddedStore::Impl::BlockGoneLocked(uint32_t namespace_id, bool was_resident) {
  auto it = namespaces.find(namespace_id);  // there: the block counted in it
  NamespaceUsage& u = it->second.usage;
  --u.blocks;
  if (was_resident) --u.host_blocks;
  if (u.blocks == 0 && !it->second.has_quota) namespaces.erase(it);
}

void EmbeddedStore::Impl::HostCopyGoneLocked(uint32_t namespace_id) {
  --namespaces.find(namespace_id)->second.usage.host_blocks;
}

Result<EmbeddedStore::Impl::HostRoom> EmbeddedStore::Impl::HostRoomLocked(NamespaceState& ns,
                                                                          const BlockKey& key,
                                                                          bool for_put) {
  for (;;) {
    if (ns.usage.host_blocks + ns.host_reserved < ns.host_limit_blocks) return HostRoom::kRoom;
    if (for_put) {
      // Replacing a resident block frees its slot at the commit: no room needed.
      const BlockIndex::Entry* e = index.Find(key);
      if (e != nullptr && e->host_slot != BlockIndex::kNoSlot) return HostRoom::kReplacement;
    }
    // Its least recently used clean block, in O(1) through its LRU group.
    if (std::optional<SlotId> victim = pool->LruVictim(ns.lru_group)) {
      ++ns.usage.quota_evictions;
      EvictLocked(*victim);
      continue;
    }
    if (!for_put) return HostRoom::kReadThrough;
    // Every block it has in the host tier is dirty or in use.
    if (has_disk && !options.write_through && !disk_full) {
      QueueDirtyLruLocked(options.io_depth, ns.lru_group);
    }
    if (has_disk && ns.writeback_blocks > 0 && options.wait_when_full) {
      ++stats.put_waits;
      slot_cv.wait(mu);
      continue;
    }
    ++ns.usage.quota_rejections;
    const uint64_t slot = pool->slot_bytes();
    return Status::QuotaExceeded(
        "block " + key.ToString() + ": namespace " + std::to_string(key.namespace_id) +
        " is at its host quota: " + std::to_string(ns.usage.host_blocks) + " blocks resident and " +
        std::to_string(ns.host_reserved) + " being put, of " + std::to_string(slot) +
        " bytes each, " + std::to_string((ns.usage.host_blocks + ns.host_reserved) * slot) +
        " of " + std::to_string(ns.host_limit_blocks * slot) +
        " bytes, and none can be evicted now (not on disk yet, or in use)");
  }
}

void EmbeddedStore::Impl::SettleChargeLocked(SlotId slot, uint32_t namespace_id) {
  if (slot_charged[slot] == 0) return;
  slot_charged[slot] = 0;
  --QuotaLocked(namespace_id)->host_reserved;
}

void EmbeddedStore::Impl::AbandonSlotLocked(SlotId slot, uint32_t namespace_id) {
  SettleChargeLocked(slot, namespace_id);
  pool->Unpin(slot);  // never published: freed
  slot_cv.notify_all();
}

bool EmbeddedStore::Impl::PublishPromotedLocked(const BlockKey& key, BlockIndex::Entry* entry,
                                                SlotId slot) {
  NamespaceState& ns = NamespaceLocked(key.namespace_id);
  if (ns.host_limit_blocks != kNoLimit && slot_charged[slot] == 0) return false;
  SettleChargeLocked(slot, key.namespace_id);
  pool->Publish(slot, key, /*dirty=*/false, ns.lru_group);
  entry->host_slot = slot;
  ++ns.usage.host_blocks;
  return true;
}

NamespaceUsage EmbeddedStore::Impl::Usage(uint32_t namespace_id) const {
  MutexLock lock(&mu);
  auto it = namespaces.find(namespace_id);
  return it != namespaces.end() ? it->second.usage : NamespaceUsage{};
}

// --- EmbeddedStore ---------------------------------------------------------------------------

Result<std::unique_ptr<EmbeddedStore>> EmbeddedStore::Open(const StoreOptions& options,
                                                           const ModelLayout& layout) {
  KVTIER_RETURN_IF_ERROR(layout.Validate());
  if (options.async_threads == 0 || options.async_threads > 1024) {
    return Status::InvalidArgument("async_threads must be in [1, 1024], got " +
                                   std::to_string(options.async_threads));
  }
  if (options.host_memory > HostMemoryKind::kPlain) {
    return Status::InvalidArgument("unknown host_memory kind " +
                                   std::to_string(static_cast<int>(options.host_memory)));
  }
  if (options.io_depth == 0 || options.io_depth > 4096) {
    return Status::InvalidArgument("io_depth must be in [1, 4096], got " +
                                   std::to_string(options.io_depth));
  }
  if (options.sync > SyncPolicy::kDsync) return Status::InvalidArgument("unknown sync policy");
  std::unique_ptr<RetrievalIndexes> retrieval;
  if (options.retrieval.enabled) {
    KVTIER_ASSIGN_OR_RETURN(retrieval, RetrievalIndexes::Create(layout, options.retrieval));
  }
  const uint64_t slot_bytes = (layout.BytesPerBlock() + HostPool::kSlotAlignment - 1) /
                              HostPool::kSlotAlignment * HostPool::kSlotAlignment;
  KVTIER_RETURN_IF_ERROR(ValidateQuotas(options.quotas, slot_bytes));
  KVTIER_ASSIGN_OR_RETURN(
      auto pool,
      HostPool::Create(layout.BytesPerBlock(), options.host_capacity_bytes, options.host_memory));
  if (!pool->region().fallback_reason().empty()) {
    Log().warn("kvtier: host tier is {} memory: {}", HostMemoryKindName(pool->region().kind()),
               pool->region().fallback_reason());
  }
  auto impl = std::make_unique<Impl>(options, layout, std::move(pool),
                                     options.env != nullptr ? options.env : Env::Default());
  impl->retrieval = std::move(retrieval);
  impl->InitQuotas();  // before the disk tier's recovery counts its blocks
  if (!options.directory.empty()) KVTIER_RETURN_IF_ERROR(impl->OpenDisk());
  if (impl->retrieval != nullptr) impl->retrieval->ApplyAll();  // what the rebuild queued
  KVTIER_RETURN_IF_ERROR(impl->OpenDevice());
  impl->workers = std::make_unique<WorkerPool>(options.async_threads);
  return std::unique_ptr<EmbeddedStore>(new EmbeddedStore(std::move(impl)));
}

EmbeddedStore::EmbeddedStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

EmbeddedStore::~EmbeddedStore() {
  impl_->workers.reset();  // runs what was submitted while everything else still lives
  impl_->device.reset();   // its prefetch thread pulls blocks from the tiers below
  impl_->CloseDisk();
}

const ModelLayout& EmbeddedStore::layout() const { return impl_->layout; }
const StoreOptions& EmbeddedStore::options() const { return impl_->options; }
uint64_t EmbeddedStore::block_bytes() const { return impl_->block_bytes; }

Status EmbeddedStore::Put(const BlockKey& key, const void* data, uint64_t bytes) {
  return impl_->Put(key, data, bytes);
}

Status EmbeddedStore::Get(const BlockKey& key, void* data, uint64_t bytes) {
  Status status;
  Impl::ReadPlan plan;
  const BlockRead read{key, data, bytes};
  (void)impl_->RunReads({&read, 1}, {&plan, 1}, {&status, 1}, /*host_only=*/false, nullptr);
  return status;
}

bool EmbeddedStore::Contains(const BlockKey& key) const {
  MutexLock lock(&impl_->mu);
  const BlockIndex::Entry* e = impl_->index.Find(key);
  return e != nullptr && !(e->host_slot == BlockIndex::kNoSlot && (e->disk.flags & kBlockCorrupt));
}

Status EmbeddedStore::Delete(const BlockKey& key) {
  Impl& d = *impl_;
  RetrievalIndexes::LayerRef touched;
  std::shared_ptr<RetrievalIndexes::Sequence> retired;  // freed once `mu` is released
  {
    MutexLock lock(&d.mu);
    BlockIndex::Entry* entry = d.index.Find(key);
    if (entry == nullptr) {
      return Status::NotFound("block " + key.ToString() + " is not in the store");
    }
    std::vector<Catalog::Update> deletes;
    std::vector<Extent> frees;
    d.DetachLocked(entry, &deletes, &frees);
    d.index.Erase(entry);
    if (!deletes.empty()) d.QueueDeletesLocked(std::move(deletes), std::move(frees));
    ++d.stats.deletes;
    if (d.retrieval != nullptr) touched = d.retrieval->QueueRemove(key, &retired);
  }
  if (d.retrieval != nullptr) d.retrieval->Apply(touched);
  return Status::OK();
}

Result<uint64_t> EmbeddedStore::DropSequence(uint32_t namespace_id, const SequenceId& sequence) {
  Impl& d = *impl_;
  std::shared_ptr<RetrievalIndexes::Sequence> retired;  // freed once `mu` is released
  MutexLock lock(&d.mu);
  if (d.retrieval != nullptr) retired = d.retrieval->DropSequence(namespace_id, sequence);
  std::vector<Catalog::Update> deletes;
  std::vector<Extent> frees;
  uint64_t n = d.index.EraseSequence(
      namespace_id, sequence, [&](BlockIndex::Entry& e) { d.DetachLocked(&e, &deletes, &frees); });
  if (!deletes.empty()) d.QueueDeletesLocked(std::move(deletes), std::move(frees));
  if (n > 0) {
    ++d.stats.dropped_sequences;
    d.stats.dropped_blocks += n;
  }
  if (d.device != nullptr) d.prefetch_planner->Forget(namespace_id, sequence);
  return n;
}

NamespaceUsage EmbeddedStore::Usage(uint32_t namespace_id) const {
  return impl_->Usage(namespace_id);
}

StoreStats EmbeddedStore::Stats() const {
  const Impl& d = *impl_;
  MutexLock lock(&d.mu);
  StoreStats s = d.stats;
  s.block_bytes = d.block_bytes;
  s.host_slot_bytes = d.pool->slot_bytes();
  s.host_slots = d.pool->slot_count();
  s.host_capacity_bytes = s.host_slots * s.host_slot_bytes;
  s.host_blocks = d.pool->published_slots();
  s.host_pinned_slots = d.pool->pinned_slots();
  s.host_memory = d.pool->region().kind();
  if (d.extents) {
    s.disk_capacity_bytes = d.extents->total_bytes();
    s.disk_used_bytes = d.extents->used_bytes();
    s.disk_free_extents = d.extents->free_extent_count();
  }
  s.dirty_blocks = d.dirty_versions.size();
  if (d.retrieval != nullptr) d.retrieval->AddStats(&s);
  if (d.device != nullptr) AddDeviceCacheStats(d.device->stats(), &s);
  return s;
}

Status EmbeddedStore::Flush() { return impl_->Flush(); }

Status EmbeddedStore::PutBatch(std::span<const BlockWrite> writes, std::span<Status> statuses) {
  return impl_->PutBatch(writes, statuses);
}

Status EmbeddedStore::GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses) {
  return impl_->GetBatch(reads, statuses);
}

bool EmbeddedStore::GetBatchFromHost(std::span<const BlockRead> reads, std::span<Status> statuses) {
  bool declined = true;
  const Status s = impl_->GetBatch(reads, statuses, /*host_only=*/true, &declined);
  if (!s.ok() && statuses.size() != reads.size()) return false;  // malformed: GetBatch says
  return !declined;
}

// --- Asynchronous forms: the synchronous call, run on a worker thread -----------------

namespace {

// Runs `op` on `workers`, handing its Status to `done`.
template <typename Op>
void RunAsync(WorkerPool& workers, Op op, Store::Completion done) {
  workers.Submit([op = std::move(op), done = std::move(done)]() mutable { done(op()); });
}

}  // namespace

void EmbeddedStore::PutAsync(const BlockKey& key, const void* data, uint64_t bytes,
                             Completion done) {
  RunAsync(
      *impl_->workers, [this, key, data, bytes] { return Put(key, data, bytes); }, std::move(done));
}

void EmbeddedStore::GetAsync(const BlockKey& key, void* data, uint64_t bytes, Completion done) {
  RunAsync(
      *impl_->workers, [this, key, data, bytes] { return Get(key, data, bytes); }, std::move(done));
}

void EmbeddedStore::PutBatchAsync(std::span<const BlockWrite> writes, std::span<Status> statuses,
                                  Completion done) {
  RunAsync(
      *impl_->workers, [this, writes, statuses] { return PutBatch(writes, statuses); },
      std::move(done));
}

void EmbeddedStore::GetBatchAsync(std::span<const BlockRead> reads, std::span<Status> statuses,
                                  Completion done) {
  RunAsync(
      *impl_->workers, [this, reads, statuses] { return GetBatch(reads, statuses); },
      std::move(done));
}

// --- Store: what every implementation shares ------------------------------------------

Store::~Store() = default;

namespace {

// The future form of an asynchronous call: the callback form, fulfilling a promise.
template <typename Call>
std::future<Status> ToFuture(Call call) {
  auto promise = std::make_shared<std::promise<Status>>();
  std::future<Status> future = promise->get_future();
  call([promise](Status status) { promise->set_value(std::move(status)); });
  return future;
}

}  // namespace

std::future<Status> Store::PutAsync(const BlockKey& key, const void* data, uint64_t bytes) {
  return ToFuture([&](Completion done) { PutAsync(key, data, bytes, std::move(done)); });
}

std::future<Status> Store::GetAsync(const BlockKey& key, void* data, uint64_t bytes) {
  return ToFuture([&](Completion done) { GetAsync(key, data, bytes, std::move(done)); });
}

std::future<Status> Store::PutBatchAsync(std::span<const BlockWrite> writes,
                                         std::span<Status> statuses) {
  return ToFuture([&](Completion done) { PutBatchAsync(writes, statuses, std::move(done)); });
}

std::future<Status> Store::GetBatchAsync(std::span<const BlockRead> reads,
                                         std::span<Status> statuses) {
  return ToFuture([&](Completion done) { GetBatchAsync(reads, statuses, std::move(done)); });
}

}  // namespace kvtier
