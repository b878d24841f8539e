#include "src/client/sidecar_device.h"

#include <array>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/cuda_runtime.h"
#include "kernels/paged_copy.h"
#include "src/server/protocol/kvtier_generated.h"
#include "src/util/log.h"

namespace kvtier::client {

// --- BlockBuffers ------------------------------------------------------------------------

BlockBuffers::~BlockBuffers() {
  MutexLock lock(&mu_);
  for (std::byte* b : all_) {
    if (pinned_) {
      (void)cuda::HostFree(b);
    } else {
      std::free(b);
    }
  }
}

Status BlockBuffers::Take(size_t count, std::vector<std::byte*>* out) {
  MutexLock lock(&mu_);
  const size_t start = out->size();
  while (out->size() - start < count) {
    if (!free_.empty()) {
      out->push_back(free_.back());
      free_.pop_back();
      continue;
    }
    void* p = nullptr;
    Status s;
    if (pinned_) {
      s = cuda::HostAlloc(block_bytes_, &p);
    } else {
      p = std::aligned_alloc(4096, (block_bytes_ + 4095) / 4096 * 4096);
      if (p == nullptr) s = Status::ResourceExhausted("out of memory");
    }
    if (!s.ok()) {
      free_.insert(free_.end(), out->begin() + start, out->end());
      out->resize(start);
      return Status::ResourceExhausted("a block buffer of " + std::to_string(block_bytes_) +
                                       " bytes: " + s.message());
    }
    all_.push_back(static_cast<std::byte*>(p));
    out->push_back(static_cast<std::byte*>(p));
  }
  return Status::OK();
}

void BlockBuffers::Give(std::span<std::byte* const> buffers) {
  MutexLock lock(&mu_);
  free_.insert(free_.end(), buffers.begin(), buffers.end());
}

// --- The GPU tier's source: Gets through the daemon -------------------------------------

class SidecarDevice::Source final : public BlockSource {
 public:
  Source(Store* store, SidecarClient* client, BlockBuffers* buffers)
      : store_(store), client_(client), buffers_(buffers) {}

  // The direct path: from now on, FillDevice asks the daemon to copy into the pool that
  // starts at `base` whenever the registration is in effect.
  void EnableDirect(const std::byte* base) { base_ = base; }

  bool FillDevice(std::span<const BlockKey> keys, std::span<std::byte* const> destinations,
                  std::span<Status> statuses) override {
    if (base_ == nullptr) return false;
    const uint64_t generation = client_->device_generation();
    if (generation == 0) return false;
    std::vector<uint64_t> offsets(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      offsets[i] = static_cast<uint64_t>(destinations[i] - base_);
    }
    (void)client_->GetToDevice(keys, offsets, statuses, generation);
    return true;
  }

  Status PinHost(std::span<const BlockKey> keys, std::span<HostBlockRef> blocks) override {
    std::vector<std::byte*> taken;
    KVTIER_RETURN_IF_ERROR(buffers_->Take(keys.size(), &taken));
    std::vector<BlockRead> reads(keys.size());
    std::vector<Status> statuses(keys.size());
    const uint64_t bytes = store_->block_bytes();
    for (size_t i = 0; i < keys.size(); ++i) reads[i] = BlockRead{keys[i], taken[i], bytes};
    Status s = store_->GetBatch(reads, statuses);
    if (!s.ok()) {
      buffers_->Give(taken);
      return s;
    }
    for (size_t i = 0; i < keys.size(); ++i) {
      blocks[i] = HostBlockRef{taken[i], reinterpret_cast<uint64_t>(taken[i]), false};
    }
    return Status::OK();
  }

  void UnpinHost(std::span<const BlockKey>, std::span<const HostBlockRef> blocks) override {
    std::vector<std::byte*> back(blocks.size());
    for (size_t i = 0; i < blocks.size(); ++i) {
      back[i] = reinterpret_cast<std::byte*>(blocks[i].handle);
    }
    buffers_->Give(back);
  }

 private:
  Store* const store_;
  SidecarClient* const client_;
  BlockBuffers* const buffers_;
  const std::byte* base_ = nullptr;  // set before the first Acquire, then read only
};

// --- SidecarDevice -----------------------------------------------------------------------

SidecarDevice::SidecarDevice(Store* store, SidecarClient* client, const StoreOptions& options,
                             const ModelLayout& layout)
    : store_(store),
      client_(client),
      options_(options),
      layout_(layout),
      buffers_(layout.BytesPerBlock(), cuda::HasDevice()) {}

Result<std::unique_ptr<SidecarDevice>> SidecarDevice::Create(Store* store, SidecarClient* client,
                                                             const StoreOptions& options,
                                                             const ModelLayout& layout) {
  std::unique_ptr<SidecarDevice> d(new SidecarDevice(store, client, options, layout));
  const RetrievalOptions& r = options.retrieval;
  if (r.enabled && r.device_capacity_bytes > 0) {
    d->source_ = std::make_unique<Source>(store, client, &d->buffers_);
    DeviceCacheOptions cache_options = DeviceCacheOptionsFor(r);
    const bool direct = options.sidecar.direct_device && !options.sidecar.socket.empty();
    cache_options.shareable = direct;  // an emulated tier the daemon can map
    KVTIER_ASSIGN_OR_RETURN(d->cache_,
                            DeviceCache::Create(layout.BytesPerBlock(), r.device_capacity_bytes,
                                                cache_options, d->source_.get()));
    d->planner_ = std::make_unique<PrefetchPlanner>(layout.num_layers);
    if (direct) d->Register();
  }
  return d;
}

void SidecarDevice::Register() {
  const DevicePool& pool = cache_->pool();
  flatbuffers::FlatBufferBuilder fbb(256);
  int fd = -1;
  if (pool.emulated()) {
    fd = pool.memfd();
    fbb.Finish(wire::CreateRegisterDeviceRequest(fbb, /*kind=*/0, pool.capacity_bytes()));
  } else {
    Result<std::array<uint8_t, 16>> uuid = cuda::DeviceUuid(pool.device());
    Result<std::array<uint8_t, 64>> handle =
        uuid.ok() ? cuda::IpcGetMemHandle(pool.base()) : uuid.status();
    if (!handle.ok()) {
      Log().warn(
          "the GPU tier cannot be shared with kvtierd ({}); its misses go through the "
          "staging area",
          handle.status().ToString());
      return;
    }
    auto uuid_vector = fbb.CreateVector(uuid->data(), uuid->size());
    auto handle_vector = fbb.CreateVector(handle->data(), handle->size());
    fbb.Finish(wire::CreateRegisterDeviceRequest(fbb, /*kind=*/1, pool.capacity_bytes(),
                                                 uuid_vector, handle_vector));
  }
  source_->EnableDirect(pool.base());
  registered_ = true;
  // A refusal is logged and kept for SidecarStatus; misses then take the staging path.
  (void)client_->RegisterDevice(fbb, fd);
}

SidecarDevice::~SidecarDevice() {
  if (registered_) client_->UnregisterDevice();
  cache_.reset();  // its prefetch thread Gets through the store
}

Result<AcquireInfo> SidecarDevice::Acquire(uint32_t namespace_id, const SequenceId& sequence,
                                           uint32_t layer, std::span<const int64_t> blocks,
                                           CUstream_st* stream,
                                           std::span<uint64_t> device_addresses,
                                           std::span<const float> scores) {
  if (cache_ == nullptr) {
    return Status::FailedPrecondition(
        "Acquire: this kvtierd client has no GPU tier (enable retrieval and set "
        "retrieval.device_capacity_bytes in its StoreOptions)");
  }
  if (layer >= layout_.num_layers) {
    return Status::InvalidArgument("Acquire: layer " + std::to_string(layer) + " outside [0, " +
                                   std::to_string(layout_.num_layers) + ")");
  }
  KVTIER_ASSIGN_OR_RETURN(AcquireInfo info, cache_->Acquire(namespace_id, sequence, layer, blocks,
                                                            scores, stream, device_addresses));
  if (options_.retrieval.prefetch) {
    planner_->NoteAcquired(namespace_id, sequence, layer, blocks);
    planner_->PrefetchAfterAcquire(*cache_, namespace_id, sequence, layer);
  }
  return info;
}

Status SidecarDevice::Release(uint64_t lease) {
  if (cache_ == nullptr) {
    return Status::FailedPrecondition("Release: this kvtierd client has no GPU tier");
  }
  return cache_->Release(lease);
}

Status SidecarDevice::PutFromPagedCache(std::span<const BlockKey> keys, const PagedCacheDesc& cache,
                                        const void* k_base, const void* v_base,
                                        std::span<const int32_t> page_table, CUstream_st* stream,
                                        std::span<Status> statuses) {
  if (keys.empty()) return Status::OK();
  const uint64_t block_bytes = layout_.BytesPerBlock();
  const uint32_t count = static_cast<uint32_t>(keys.size());
  if (!buffers_.pinned()) {
    // Without a GPU the CPU gathers: straight into staging slots lent by the store
    // (Reserve), which the daemon copies from at the Commit. When the store cannot lend
    // that many now (a batch bigger than the staging area, slots lent out, TCP: heap
    // buffers), the gather goes through the buffers below and PutBatch.
    Result<std::unique_ptr<PutBuffers>> lent = store_->Reserve(count);
    if (lent.ok()) {
      std::vector<void*> slots(count);
      for (uint32_t i = 0; i < count; ++i) slots[i] = (*lent)->buffer(i).data();
      Status gathered =
          GatherBlocksRef(cache, k_base, v_base, page_table.data(), count, slots.data(), nullptr);
      if (!gathered.ok()) {
        gathered = gathered.WithContext("PutFromPagedCache");
        for (Status& s : statuses) s = gathered;
        return gathered;
      }
      return (*lent)->Commit(keys, statuses);
    }
  }
  std::vector<std::byte*> taken;
  Status gathered = buffers_.Take(count, &taken);
  std::vector<void*> slots(taken.begin(), taken.end());
  if (gathered.ok() && buffers_.pinned()) {
    // With a GPU: into the page-locked buffers, after the engine's work on `stream`.
    gathered = gather_.Run(cache, k_base, v_base, page_table, slots, stream);
  } else if (gathered.ok()) {
    gathered =
        GatherBlocksRef(cache, k_base, v_base, page_table.data(), count, slots.data(), nullptr);
  }
  if (!gathered.ok()) {
    buffers_.Give(taken);
    gathered = gathered.WithContext("PutFromPagedCache");
    for (Status& s : statuses) s = gathered;
    return gathered;
  }
  std::vector<BlockWrite> writes(count);
  for (uint32_t i = 0; i < count; ++i) writes[i] = BlockWrite{keys[i], taken[i], block_bytes};
  Status put = store_->PutBatch(writes, statuses);
  buffers_.Give(taken);
  return put;
}

void SidecarDevice::NoteRunnersUp(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                                  std::span<const int64_t> blocks) {
  if (planner_ != nullptr) planner_->NoteRunnersUp(namespace_id, sequence, layer, blocks);
}

void SidecarDevice::Invalidate(const BlockKey& key) {
  if (cache_ != nullptr) cache_->Invalidate(key);
}

void SidecarDevice::InvalidateSequence(uint32_t namespace_id, const SequenceId& sequence) {
  if (cache_ == nullptr) return;
  cache_->InvalidateSequence(namespace_id, sequence);
  planner_->Forget(namespace_id, sequence);
}

void SidecarDevice::AddStats(StoreStats* stats) const {
  if (cache_ != nullptr) AddDeviceCacheStats(cache_->stats(), stats);
}

}  // namespace kvtier::client
