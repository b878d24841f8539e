// Store::PutFromPagedCache: blocks gathered straight from an engine's paged KV cache
// into the host tier's slots (kernels/paged_copy.h).
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/paged_copy.h"
#include "src/core/paged_put.h"
#include "src/core/store_impl.h"

namespace kvtier {

PinnedGather::~PinnedGather() {
  MutexLock lock(&mu_);
  if (scratch_ != nullptr) (void)cuda::HostFree(scratch_);
}

Status PinnedGather::Run(const PagedCacheDesc& cache, const void* k_base, const void* v_base,
                         std::span<const int32_t> page_table, std::span<void* const> slots,
                         StreamHandle stream) {
  MutexLock lock(&mu_);
  const uint64_t table_bytes = page_table.size() * sizeof(int32_t);
  const uint64_t slots_offset = (table_bytes + 15) / 16 * 16;
  const uint64_t need = slots_offset + slots.size() * sizeof(void*);
  if (bytes_ < need) {
    if (scratch_ != nullptr) (void)cuda::HostFree(scratch_);
    scratch_ = nullptr;
    bytes_ = 0;
    KVTIER_RETURN_IF_ERROR(cuda::HostAlloc(need, &scratch_));
    bytes_ = need;
  }
  auto* base = static_cast<char*>(scratch_);
  std::memcpy(base, page_table.data(), table_bytes);
  std::memcpy(base + slots_offset, slots.data(), slots.size() * sizeof(void*));
  KVTIER_RETURN_IF_ERROR(LaunchGatherBlocks(
      cache, k_base, v_base, reinterpret_cast<int32_t*>(base), static_cast<uint32_t>(slots.size()),
      reinterpret_cast<void* const*>(base + slots_offset), stream));
  KVTIER_ASSIGN_OR_RETURN(cuda::Event done, cuda::Event::Create());
  KVTIER_RETURN_IF_ERROR(done.Record(stream));
  return done.Synchronize();
}

Status ValidatePagedPut(const ModelLayout& layout, size_t blocks, const PagedCacheDesc& cache,
                        const void* k_base, const void* v_base, std::span<const int32_t> page_table,
                        size_t statuses) {
  if (statuses != blocks) {
    return Status::InvalidArgument("PutFromPagedCache: " + std::to_string(statuses) +
                                   " statuses for " + std::to_string(blocks) + " blocks");
  }
  if (cache.dtype != layout.dtype || cache.num_kv_heads != layout.num_kv_heads ||
      cache.head_dim != layout.head_dim || cache.block_tokens != layout.block_tokens) {
    return Status::InvalidArgument(
        "PutFromPagedCache: the paged cache (dtype " + std::string(DTypeName(cache.dtype)) +
        ", kv_heads " + std::to_string(cache.num_kv_heads) + ", head_dim " +
        std::to_string(cache.head_dim) + ", block_tokens " + std::to_string(cache.block_tokens) +
        ") does not match the store's layout (" + layout.ToString() + ")");
  }
  const uint64_t entries = PageTableEntriesPerBlock(cache);
  if (blocks > UINT32_MAX || page_table.size() != blocks * entries) {
    return Status::InvalidArgument("PutFromPagedCache: a page table of " +
                                   std::to_string(page_table.size()) + " entries for " +
                                   std::to_string(blocks) + " blocks of " +
                                   std::to_string(entries) + " entries each");
  }
  // ValidatePagedCopy wants the slot array: any non-null one passes (the callers own
  // their slots).
  void* const no_slots[1] = {nullptr};
  KVTIER_RETURN_IF_ERROR(ValidatePagedCopy("PutFromPagedCache", cache, k_base, v_base,
                                           page_table.data(), uint32_t(blocks), no_slots));
  // The kernel cannot report a bad entry (it skips the block): check them all here.
  const PagedGeometry geometry = MakePagedGeometry(cache);
  for (size_t i = 0; i < page_table.size(); ++i) {
    if (!PagedChunkValid(geometry, page_table[i])) {
      return Status::InvalidArgument("PutFromPagedCache: page-table entry " + std::to_string(i) +
                                     " (" + std::to_string(page_table[i]) +
                                     ") names no chunk of the cache");
    }
  }
  return Status::OK();
}

Status EmbeddedStore::Impl::PutFromPagedCache(std::span<const BlockKey> keys,
                                              const PagedCacheDesc& cache, const void* k_base,
                                              const void* v_base,
                                              std::span<const int32_t> page_table,
                                              StreamHandle stream, std::span<Status> statuses) {
  KVTIER_RETURN_IF_ERROR(
      ValidatePagedPut(layout, keys.size(), cache, k_base, v_base, page_table, statuses.size()));
  const uint64_t entries = PageTableEntriesPerBlock(cache);
  std::vector<void*> slots(keys.size());
  for (const BlockKey& key : keys) KVTIER_RETURN_IF_ERROR(CheckKey(key));
  if (keys.empty()) return Status::OK();

  // Slots for every block, or for none: a partial gather has no use. A block its
  // namespace's quota refuses is the exception: it gets its status, the others go on.
  std::vector<SlotId> ids(keys.size(), BlockIndex::kNoSlot);
  Status reserve;
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < keys.size() && reserve.ok(); ++i) {
      Result<SlotId> slot = ReserveLocked(keys[i], /*for_put=*/true);
      if (slot.ok()) {
        ids[i] = *slot;
      } else if (slot.status().code() == StatusCode::kQuotaExceeded) {
        statuses[i] = slot.status();
      } else {
        reserve = slot.status();
      }
    }
    if (!reserve.ok()) {
      for (size_t i = 0; i < keys.size(); ++i) {
        if (ids[i] != BlockIndex::kNoSlot) AbandonSlotLocked(ids[i], keys[i].namespace_id);
        statuses[i] = reserve;
      }
    }
  }
  KVTIER_RETURN_IF_ERROR(reserve);
  // The gather's blocks: those with a slot (all of them unless a quota refused some).
  std::vector<int32_t> kept_table;
  std::span<const int32_t> table = page_table;
  uint32_t count = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (ids[i] == BlockIndex::kNoSlot) continue;
    slots[count++] = pool->SlotData(ids[i]);
  }
  slots.resize(count);
  if (count < keys.size()) {
    kept_table.reserve(count * entries);
    for (size_t i = 0; i < keys.size(); ++i) {
      if (ids[i] == BlockIndex::kNoSlot) continue;
      kept_table.insert(kept_table.end(), page_table.begin() + i * entries,
                        page_table.begin() + (i + 1) * entries);
    }
    table = kept_table;
  }
  if (count == 0) return statuses[0];  // every block refused

  Status gathered;
  if (pool->region().kind() == HostMemoryKind::kCudaPinned) {
    gathered = gather.Run(cache, k_base, v_base, table, slots, stream);
  } else {
    gathered = GatherBlocksRef(cache, k_base, v_base, table.data(), count, slots.data(), nullptr);
  }

  // Summaries from the gathered slots (pinned until their commit), on this thread.
  std::vector<PreparedSummary> summaries(retrieval != nullptr ? keys.size() : 0);
  if (gathered.ok()) {
    for (size_t i = 0; i < keys.size(); ++i) {
      if (ids[i] == BlockIndex::kNoSlot) continue;
      ChecksumSlot(ids[i]);
      if (retrieval != nullptr && gathered.ok()) {
        gathered = PrepareSummary(pool->SlotData(ids[i]), layout.block_tokens, {}, &summaries[i]);
      }
    }
  }
  std::vector<RetrievalIndexes::LayerRef> touched;
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < keys.size(); ++i) {
      if (ids[i] == BlockIndex::kNoSlot) continue;  // refused by its quota
      if (gathered.ok()) {
        RetrievalIndexes::LayerRef layer;
        statuses[i] =
            CommitLocked(keys[i], ids[i], retrieval != nullptr ? &summaries[i] : nullptr, &layer);
        if (layer.sequence != nullptr &&
            (touched.empty() || touched.back().sequence != layer.sequence ||
             touched.back().layer != layer.layer)) {
          touched.push_back(std::move(layer));
        }
      } else {
        AbandonSlotLocked(ids[i], keys[i].namespace_id);
        statuses[i] = gathered;
      }
    }
  }
  for (const RetrievalIndexes::LayerRef& layer : touched) retrieval->Apply(layer);
  if (!gathered.ok()) return gathered.WithContext("PutFromPagedCache");
  for (const Status& s : statuses) {
    if (!s.ok()) return s;
  }
  return Status::OK();
}

Status EmbeddedStore::PutFromPagedCache(std::span<const BlockKey> keys, const PagedCacheDesc& cache,
                                        const void* k_base, const void* v_base,
                                        std::span<const int32_t> page_table, CUstream_st* stream,
                                        std::span<Status> statuses) {
  return impl_->PutFromPagedCache(keys, cache, k_base, v_base, page_table, stream, statuses);
}

}  // namespace kvtier
