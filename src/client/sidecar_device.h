// SidecarDevice: the GPU side of a kvtierd client. kvtierd keeps the host and disk tiers
// for every engine on the host; what lives in an engine's GPU memory stays in the
// engine's process, so each client keeps its own:
//   - the GPU tier (Store::Acquire / Release): a DeviceCache (src/core/device_cache.h:
//     replacement, leases, prefetch across layers) in this process's GPU memory, emulated
//     in host memory without a GPU, with the options of StoreOptions::retrieval as in an
//     embedded store. It is fed through the daemon: a miss is a Get of the block into a
//     block buffer of this process (page-locked when there is a GPU, so the copy up is a
//     DMA), and the cache copies it to the device on the engine's stream.
//   - Store::PutFromPagedCache: the gather kernel (the CPU reference without a GPU)
//     copies the blocks out of the engine's paged cache into block buffers, which are
//     then Put through the daemon.
// Misses, the direct path (SidecarOptions::direct_device, Unix socket): the tier's memory
// is registered with the daemon (RegisterDevice: its CUDA IPC handle with a GPU; the
// emulated tier lives in a sealed memfd, sent with the registration), and a miss is one
// GetToDevice: the daemon copies the block from its host tier straight into the slot
// (one copy, where the staging path below makes three: host tier to staging slot,
// staging slot to block buffer, block buffer to the tier). The registration is renewed
// after a reconnection; while it is not in effect (refused: a daemon without a GPU for
// a CUDA pool, an older daemon; not yet renewed), misses take the staging path.
// Block bytes never cross the socket either way (PROTOCOL.md).
//
// Coherence: the blocks this client Puts, Deletes or drops (DropSequence) leave its GPU
// tier when the call returns, as in an embedded store. A block that another client
// rewrites under the same key stays in this tier, with the bytes it had, until evicted
// (KV blocks are written once per key in practice; a client that rewrites shared keys
// should Delete them first).
//
// Thread safety: every method may be called from any thread.
#ifndef KVTIER_CLIENT_SIDECAR_DEVICE_H_
#define KVTIER_CLIENT_SIDECAR_DEVICE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kernels/host_device.h"
#include "kvtier/layout.h"
#include "kvtier/options.h"
#include "kvtier/paged_cache.h"
#include "kvtier/store.h"
#include "src/client/sidecar_client.h"
#include "src/core/device_cache.h"
#include "src/core/paged_put.h"
#include "src/util/mutex.h"

namespace kvtier::client {

// Block-sized host buffers, reused: page-locked (cudaHostAlloc) when `pinned`, else plain
// 4 KiB-aligned memory. Grows on demand and keeps what it allocated until destroyed; the
// buffers in use at once are bounded by the callers (the GPU tier's slots in flight, one
// PutFromPagedCache batch).
class BlockBuffers {
 public:
  BlockBuffers(uint64_t block_bytes, bool pinned) : block_bytes_(block_bytes), pinned_(pinned) {}
  ~BlockBuffers();
  BlockBuffers(const BlockBuffers&) = delete;
  BlockBuffers& operator=(const BlockBuffers&) = delete;

  bool pinned() const { return pinned_; }
  // Appends `count` buffers to *out. ResourceExhausted when memory runs out (nothing is
  // taken then).
  Status Take(size_t count, std::vector<std::byte*>* out) KVTIER_EXCLUDES(mu_);
  void Give(std::span<std::byte* const> buffers) KVTIER_EXCLUDES(mu_);

 private:
  const uint64_t block_bytes_;
  const bool pinned_;
  Mutex mu_;
  std::vector<std::byte*> free_ KVTIER_GUARDED_BY(mu_);
  std::vector<std::byte*> all_ KVTIER_GUARDED_BY(mu_);
};

class SidecarDevice {
 public:
  // `store` (the SidecarStore that owns this object, which outlives it) serves the
  // misses: GetBatch and PutBatch through the daemon, or GetToDevice through `client`
  // (its client, which outlives this object too). The GPU tier exists when
  // options.retrieval.enabled and device_capacity_bytes > 0; DeviceCache::Create's
  // errors. A registration the daemon refuses is not an error (see the file comment).
  static Result<std::unique_ptr<SidecarDevice>> Create(Store* store, SidecarClient* client,
                                                       const StoreOptions& options,
                                                       const ModelLayout& layout);
  // Unregisters the tier, then waits for its copies and prefetches (leases must have
  // been released).
  ~SidecarDevice();
  SidecarDevice(const SidecarDevice&) = delete;
  SidecarDevice& operator=(const SidecarDevice&) = delete;

  // Store::Acquire and Store::Release (the caller checked the namespace).
  Result<AcquireInfo> Acquire(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                              std::span<const int64_t> blocks, CUstream_st* stream,
                              std::span<uint64_t> device_addresses, std::span<const float> scores);
  Status Release(uint64_t lease);

  // Store::PutFromPagedCache (the caller checked the keys' namespace: statuses[i] not OK
  // marks a member refused already, which is not gathered nor sent).
  Status PutFromPagedCache(std::span<const BlockKey> keys, const PagedCacheDesc& cache,
                           const void* k_base, const void* v_base,
                           std::span<const int32_t> page_table, CUstream_st* stream,
                           std::span<Status> statuses);

  // The blocks a Select ranked right after its top_k: prefetched after the next Acquire
  // of the layer (PrefetchPlanner).
  void NoteRunnersUp(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                     std::span<const int64_t> blocks);
  // The contents of a block (or a sequence) changed or were deleted through this client.
  void Invalidate(const BlockKey& key);
  void InvalidateSequence(uint32_t namespace_id, const SequenceId& sequence);
  // Adds the GPU tier's counters to `stats` (none without the tier).
  void AddStats(StoreStats* stats) const;
  bool has_tier() const { return cache_ != nullptr; }

 private:
  class Source;
  SidecarDevice(Store* store, SidecarClient* client, const StoreOptions& options,
                const ModelLayout& layout);
  // Registers the tier's memory with the daemon (the direct path).
  void Register();

  Store* const store_;
  SidecarClient* const client_;
  bool registered_ = false;  // RegisterDevice was called (UnregisterDevice at the end)
  const StoreOptions options_;
  const ModelLayout layout_;
  BlockBuffers buffers_;
  PinnedGather gather_;  // PutFromPagedCache with a GPU
  // Declared before cache_, destroyed after it.
  std::unique_ptr<Source> source_;
  std::unique_ptr<PrefetchPlanner> planner_;
  std::unique_ptr<DeviceCache> cache_;  // null: no GPU tier
};

}  // namespace kvtier::client

#endif  // KVTIER_CLIENT_SIDECAR_DEVICE_H_
