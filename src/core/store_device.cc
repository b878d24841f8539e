// EmbeddedStore::Impl's GPU tier: the BlockSource the DeviceCache pulls blocks through (host
// slots, promoted from disk when needed), and Store::Acquire / Release with prefetch.
#include <chrono>
#include <string>

#include "src/core/device_cache.h"
#include "src/core/store_impl.h"
#include "src/core/store_retrieval.h"

namespace kvtier {

// Pins each block in a host slot (promoting it from disk first when it is only there):
// all or nothing.
Status EmbeddedStore::Impl::StoreBlockSource::PinHost(std::span<const BlockKey> keys,
                                                      std::span<HostBlockRef> blocks) {
  Impl& s = *impl;
  constexpr size_t kInline = 64;
  ReadPlan inline_plans[kInline];
  std::vector<ReadPlan> heap_plans;
  std::span<ReadPlan> plans;
  if (keys.size() <= kInline) {
    plans = std::span(inline_plans, keys.size());
  } else {
    heap_plans.resize(keys.size());
    plans = heap_plans;
  }
  s.PinReads(keys, plans);
  Status first;
  for (ReadPlan& p : plans) {
    if (!p.status.ok() && first.ok()) first = p.status;
  }
  if (!first.ok()) {
    MutexLock lock(&s.mu);
    for (ReadPlan& p : plans) {
      if (p.slot != BlockIndex::kNoSlot) s.pool->Unpin(p.slot);
    }
    return first;
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    blocks[i].data = s.pool->SlotData(plans[i].slot);
    blocks[i].handle = plans[i].slot;
    blocks[i].from_disk = plans[i].promote;
  }
  return Status::OK();
}

void EmbeddedStore::Impl::StoreBlockSource::UnpinHost(std::span<const BlockKey>,
                                                      std::span<const HostBlockRef> blocks) {
  MutexLock lock(&impl->mu);
  for (const HostBlockRef& b : blocks) impl->pool->Unpin(static_cast<SlotId>(b.handle));
  impl->slot_cv.notify_all();
}

Status EmbeddedStore::Impl::OpenDevice() {
  // Made whatever the GPU tier: host_block_source() serves kvtierd's direct copies too.
  block_source = std::make_unique<StoreBlockSource>(this);
  const RetrievalOptions& r = options.retrieval;
  if (!r.enabled || r.device_capacity_bytes == 0) return Status::OK();
  KVTIER_ASSIGN_OR_RETURN(
      device, DeviceCache::Create(block_bytes, r.device_capacity_bytes, DeviceCacheOptionsFor(r),
                                  block_source.get()));
  device->AddPinnedHostRange(pool->SlotData(0), pool->region().size());
  prefetch_planner = std::make_unique<PrefetchPlanner>(layout.num_layers);
  return Status::OK();
}

}  // namespace kvtier

namespace kvtier {

Result<AcquireInfo> EmbeddedStore::Acquire(uint32_t namespace_id, const SequenceId& sequence,
                                           uint32_t layer, std::span<const int64_t> blocks,
                                           CUstream_st* stream,
                                           std::span<uint64_t> device_addresses,
                                           std::span<const float> scores) {
  Impl& s = *impl_;
  if (!s.options.retrieval.enabled || s.device == nullptr) {
    return Status::FailedPrecondition(
        "Acquire: no GPU tier (enable retrieval and set retrieval.device_capacity_bytes)");
  }
  if (layer >= s.layout.num_layers) {
    return Status::InvalidArgument("Acquire: layer " + std::to_string(layer) + " outside [0, " +
                                   std::to_string(s.layout.num_layers) + ")");
  }
  if (device_addresses.size() != blocks.size()) {
    return Status::InvalidArgument("Acquire: device_addresses must hold one entry per block");
  }
  if (!scores.empty() && scores.size() != blocks.size()) {
    return Status::InvalidArgument("Acquire: scores must be empty or one per block");
  }
  KVTIER_ASSIGN_OR_RETURN(AcquireInfo info, s.device->Acquire(namespace_id, sequence, layer, blocks,
                                                              scores, stream, device_addresses));
  if (s.options.retrieval.prefetch) {
    s.prefetch_planner->NoteAcquired(namespace_id, sequence, layer, blocks);
    s.prefetch_planner->PrefetchAfterAcquire(*s.device, namespace_id, sequence, layer);
  }
  return info;
}

Result<SelectInfo> EmbeddedStore::SelectWithRunnersUp(
    uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
    std::span<const float> queries, uint64_t context_tokens, std::span<int64_t> selected,
    std::span<float> scores, std::span<int64_t> runners_up) {
  if (impl_->retrieval == nullptr) {
    return Status::FailedPrecondition("Select: retrieval is not enabled in this store");
  }
  return impl_->retrieval->Select(namespace_id, sequence, layer, queries, context_tokens, selected,
                                  scores, runners_up);
}

BlockSource& EmbeddedStore::host_block_source() { return *impl_->block_source; }

Status EmbeddedStore::Release(uint64_t lease) {
  if (impl_->device == nullptr) {
    return Status::FailedPrecondition("Release: the store has no GPU tier");
  }
  return impl_->device->Release(lease);
}

}  // namespace kvtier
