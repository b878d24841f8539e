// DeviceCache: the GPU tier's residency manager for the decode path. It keeps the
// blocks that attention reads in a DevicePool (GPU memory, or host memory standing in
// for it without a GPU), brings missing blocks in from the tiers below through a
// BlockSource (the Store), and decides which resident block to evict.
//
// ## One Acquire (one decoding step of one layer of one sequence)
// Acquire(ns, sequence, layer, blocks, ...) pins every requested block in the tier for
// the lease it returns and writes each block's device address:
//   - a resident block is a hit;
//   - a block another Acquire or a prefetch is bringing in is waited for (a hit; a
//     prefetch hit when a prefetch brought it), and a prefetch not yet started is taken
//     over (loaded by this call, a miss);
//   - the misses get slots (free, or evicted by the replacement policy among blocks no
//     lease pins), are pinned in host memory through the source (which promotes disk
//     blocks), and are copied in one CopyEngine batch. The caller's `stream` is made to
//     wait for the copies on the GPU (the host does not wait for them); emulated, the
//     copies are done when Acquire returns. The source's host pins are dropped once the
//     copies have run (checked at later calls).
// Errors leave nothing pinned (no lease, no host pin, no slot).
//
// Release(lease) records an event on the Acquire's stream: the slots stay pinned until
// the work queued on that stream so far has run (polled at later calls, and waited for
// when the tier has no other slot to give). Emulated, the stream is ignored and Release
// unpins at once: a CPU engine's work is done when it calls Release.
//
// ## Replacement
// Each block has a value; the evictable block with the lowest value goes first, the
// least recently acquired among equal values.
//   kLru         the value is always 0: least recently acquired first (a prefetch
//                counts as an acquire).
//   kScoreDecay  InfLLM's policy: each Acquire adds the block's score (default_score
//                when the caller passes none) to its value; every value decays by
//                score_decay per step. Kept as value * score_decay^-step (one multiply
//                per acquire, none per step; renormalised every few thousand steps).
// A *step* is inferred: a replacement group's step advances when an Acquire arrives for
// a (namespace, sequence, layer) that was already acquired in the group's current step,
// i.e. once per decoding step when each layer of each sequence is acquired once per
// step, whatever the batch. NextStep() advances every group explicitly (engines that
// acquire a layer more than once per step call it at each step's start).
// Groups: one for the whole tier, or (per_layer_capacity_blocks > 0, InfLLM's
// configuration) one per layer holding at most that many blocks, evicting only its own
// blocks; the tier must then hold layers * per_layer_capacity_blocks slots.
//
// ## Prefetch
// Prefetch(...) reserves slots for the blocks that are not resident (evicting by the
// policy, never stalling: when no slot can be had the rest is dropped) and returns; a
// background thread pins them in host memory (disk reads included) and submits their
// copy. A prefetched block is evictable only after its copy has run. Stats count
// prefetches (blocks whose copy was submitted), prefetch hits (prefetched blocks a later
// Acquire used) and wasted prefetches (evicted unused).
//
// ## Invalidation
// Invalidate / InvalidateSequence drop blocks whose contents changed or were deleted in
// the store: later Acquires miss and fetch them again; leases holding them keep the old
// bytes until released.
//
// Thread safety: every method may be called from any thread. One mutex guards the
// bookkeeping; it is never held while the source pins or unpins blocks, nor during
// copies. Lock order: the source's locks are never taken under the cache's. No
// allocation on the Acquire path once its scratch has grown to the largest request
// (and the tier's table of live leases to the most leases held at once).
#ifndef KVTIER_CORE_DEVICE_CACHE_H_
#define KVTIER_CORE_DEVICE_CACHE_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/host_device.h"
#include "kvtier/block_key.h"
#include "kvtier/retrieval.h"
#include "kvtier/status.h"
#include "kvtier/store.h"
#include "src/util/mutex.h"
#include "storage/copy_engine.h"
#include "storage/device_pool.h"

namespace kvtier {

// One block made readable in host memory by BlockSource::PinHost.
struct HostBlockRef {
  const std::byte* data = nullptr;  // block_bytes bytes, valid until UnpinHost
  uint64_t handle = 0;              // the source's own (e.g. its host slot)
  bool from_disk = false;           // read from disk for this call
};

// Where the cache gets the blocks it brings in: the Store (host tier, disk below).
// Called from Acquire's thread and from the prefetch thread, never with the cache's
// lock held.
class BlockSource {
 public:
  virtual ~BlockSource() = default;

  // Makes keys[i]'s block readable at blocks[i].data and keeps it there until UnpinHost
  // (same size spans; keys distinct). All or nothing: on an error nothing stays pinned.
  // Errors: NotFound (a block stored nowhere), and the tiers' (ResourceExhausted,
  // IOError, Corruption, ...).
  virtual Status PinHost(std::span<const BlockKey> keys, std::span<HostBlockRef> blocks) = 0;
  // Releases blocks pinned by PinHost (any subset of one or more calls, with the refs it
  // returned: the handles name the exact copies pinned even when a key has been
  // rewritten or deleted since). Called once the copies reading them have run.
  virtual void UnpinHost(std::span<const BlockKey> keys, std::span<const HostBlockRef> blocks) = 0;

  // Optional, a direct path: copies keys[i]'s block straight into the cache's pool at
  // `destinations[i]` (a slot's first byte: device memory, or the emulated pool's host
  // memory) and sets statuses[i] (same size spans), returning once every copy has
  // landed. False: the source has no such path now; nothing was done, and the cache pins
  // the blocks and copies them itself. The default has none. (A kvtierd client's source:
  // the daemon copies from its host tier into the client's registered pool.)
  virtual bool FillDevice(std::span<const BlockKey> keys, std::span<std::byte* const> destinations,
                          std::span<Status> statuses) {
    (void)keys;
    (void)destinations;
    (void)statuses;
    return false;
  }
};

// PinHost of `keys` together and, when that fails, of each alone: statuses[i] says
// whether keys[i]'s block is pinned (blocks[i] then holds it), for callers that go on
// with the blocks that could be pinned. Returns the together call's status.
Status PinHostEach(BlockSource& source, std::span<const BlockKey> keys,
                   std::span<HostBlockRef> blocks, std::span<Status> statuses);

struct DeviceCacheOptions {
  // Default: kScoreDecay.
  ReplacementPolicy policy = ReplacementPolicy::kScoreDecay;
  // Per step, in (0, 1]. Default: 0.9.
  float score_decay = 0.9f;
  // What an Acquire or Prefetch without scores adds to a block's value (kScoreDecay):
  // small, so that scored blocks outrank unscored ones. Must be >= 0. Default: 1e-3.
  float default_score = 1e-3f;
  // Run the prefetch thread; without it Prefetch does nothing. Default: true.
  bool prefetch = true;
  // Keep the tier in host memory even when a GPU is present. Default: false.
  bool force_emulated = false;
  // 0: one pool shared by every layer. > 0: each layer holds at most this many blocks
  // and evicts only its own (InfLLM's per-layer GPU cache). Default: 0.
  uint32_t per_layer_capacity_blocks = 0;
  // The CUDA device (DeviceOptions::device). Default: the current device.
  int device = DeviceOptions::kAutoDevice;
  // Emulated: keep the pool in shared memory (DeviceOptions::shareable), for a source
  // whose FillDevice has another process copy into it. Default: false.
  bool shareable = false;
};

struct DeviceCacheStats {
  uint64_t capacity_bytes = 0;
  uint64_t slots = 0;
  uint64_t resident_blocks = 0;  // blocks whose copy has been submitted
  bool emulated = false;
  uint64_t leases = 0;           // being acquired, held or releasing
  uint64_t pinned_slots = 0;     // by leases, loads and copies in flight
  uint64_t steps = 0;            // steps of the busiest group
  uint64_t acquires = 0;         // successful Acquire calls
  uint64_t acquired_blocks = 0;  // blocks they requested (-1 entries not counted)
  uint64_t hits = 0;             // ... resident, or arriving (another call, prefetch)
  uint64_t fetches_host = 0;     // ... copied from host memory on demand
  uint64_t fetches_disk = 0;     // ... read from disk, then copied, on demand
  uint64_t fetches_direct = 0;   // ... copied in by the source itself (FillDevice)
  uint64_t bytes_in = 0;         // bytes copied into the tier (all causes)
  uint64_t evictions = 0;
  uint64_t prefetches = 0;        // blocks whose prefetch copy was submitted
  uint64_t prefetch_hits = 0;     // ... used by a later Acquire
  uint64_t prefetch_wasted = 0;   // ... evicted before any Acquire used them
  uint64_t prefetch_dropped = 0;  // blocks Prefetch found no slot for, or failed to load
  uint64_t stall_nanos = 0;       // Acquire time waiting for data (pins, disk, copies)
};

class DeviceCache {
 public:
  // Layers beyond this are InvalidArgument with per_layer_capacity_blocks.
  static constexpr uint32_t kMaxLayers = 1u << 16;

  // A tier of floor(capacity_bytes / slot_bytes) slots for blocks of `block_bytes`
  // (DevicePool::Create), fed by `source` (must outlive the cache). Errors:
  // InvalidArgument (a null source, score_decay outside (0, 1], negative default_score),
  // and DevicePool's and CopyEngine's.
  static Result<std::unique_ptr<DeviceCache>> Create(uint64_t block_bytes, uint64_t capacity_bytes,
                                                     const DeviceCacheOptions& options,
                                                     BlockSource* source);

  // Stops the prefetch thread (prefetches not started are dropped), waits for every
  // copy, and returns every host pin to the source. Leases must have been released.
  ~DeviceCache();
  DeviceCache(const DeviceCache&) = delete;
  DeviceCache& operator=(const DeviceCache&) = delete;

  bool emulated() const { return pool_->emulated(); }
  uint64_t block_bytes() const { return pool_->block_bytes(); }
  uint32_t slot_count() const { return pool_->slot_count(); }
  const DevicePool& pool() const { return *pool_; }

  // Declares [base, base + bytes) pinned host memory (the host tier's region), so that
  // copies from it skip the driver's per-block query (CopyEngine::AddPinnedRange).
  void AddPinnedHostRange(const void* base, uint64_t bytes);

  // Pins blocks `blocks` of (ns, sequence, layer) in the tier and writes their device
  // addresses to `device_addresses` (same size; -1 entries are skipped and get 0;
  // a block listed twice gets one slot). `scores`: empty, or one per block (the
  // selection's, for kScoreDecay). `stream`: the engine's compute stream, made to wait
  // for the copies (ignored when emulated). Errors: InvalidArgument (span sizes, a block
  // index below -1 or above 2^32 - 1, a layer >= kMaxLayers per layer), ResourceExhausted
  // (leases pin every slot the blocks could take), the source's (NotFound, ...), the
  // driver's. Nothing stays pinned on an error.
  Result<AcquireInfo> Acquire(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                              std::span<const int64_t> blocks, std::span<const float> scores,
                              StreamHandle stream, std::span<uint64_t> device_addresses);
  // Unpins a lease's blocks once the work on its stream so far has run (see the file
  // comment). InvalidArgument for a lease not held; the driver's error if it cannot
  // record the event (the blocks are then unpinned at once).
  Status Release(uint64_t lease);

  // Starts bringing in the blocks that are neither resident nor on their way; returns
  // how many it started. Does not wait for the source or the copies. 0 without the
  // prefetch thread. Errors: InvalidArgument as Acquire.
  Result<uint32_t> Prefetch(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                            std::span<const int64_t> blocks, std::span<const float> scores = {});
  // Blocks until every prefetch started so far has landed or failed and every copy
  // submitted has run, then returns the host pins and prefetch pins they held.
  Status Drain();

  // Advances the step of every replacement group (see the file comment).
  void NextStep();

  // Drops the block (or every block of the sequence) from the tier.
  void Invalidate(const BlockKey& key);
  void InvalidateSequence(uint32_t namespace_id, const SequenceId& sequence);

  // Whether the block is resident (its copy submitted), for tests and tools.
  bool Resident(const BlockKey& key) const;
  DeviceCacheStats stats() const;
  // Checks the bookkeeping's invariants: Internal with what disagrees. O(slots).
  Status Validate() const;

 private:
  enum class SlotState : uint8_t;
  struct SlotInfo;
  struct Group;
  struct Load;
  struct Lease;
  struct Request;
  class SlotMap;
  class StepSet;

  DeviceCache(const DeviceCacheOptions& options, BlockSource* source,
              std::unique_ptr<DevicePool> pool, std::unique_ptr<CopyEngine> engine);

  Status CheckRequest(uint32_t layer, std::span<const int64_t> blocks,
                      std::span<const float> scores) const;

  // Replacement groups and steps.
  Group& GroupOf(uint32_t layer) KVTIER_REQUIRES(mu_);
  void AdvanceStepLocked(Group& group) KVTIER_REQUIRES(mu_);
  void NoteAcquireLocked(Group& group, uint32_t ns, const SequenceId& seq, uint32_t layer)
      KVTIER_REQUIRES(mu_);
  // An acquire (or prefetch) of the slot: its tick, and its score added to its value.
  void TouchLocked(SlotId slot, std::span<const float> scores, size_t index) KVTIER_REQUIRES(mu_);

  // Slots: one for `group` (free, or its lowest-valued evictable block evicted).
  std::optional<SlotId> AllocateLocked(Group& group, const BlockKey& key) KVTIER_REQUIRES(mu_);
  bool MakeRoomLocked(Group& group) KVTIER_REQUIRES(mu_);
  void EvictLocked(SlotId slot) KVTIER_REQUIRES(mu_);
  void PinLocked(SlotId slot) KVTIER_REQUIRES(mu_);
  void UnpinLocked(SlotId slot) KVTIER_REQUIRES(mu_);
  void DetachLocked(SlotId slot) KVTIER_REQUIRES(mu_);

  // Each group's evictable blocks, lowest value (then oldest) first.
  bool HeapLess(SlotId a, SlotId b) const KVTIER_REQUIRES(mu_);
  void HeapPush(Group& group, SlotId slot) KVTIER_REQUIRES(mu_);
  void HeapRemove(Group& group, SlotId slot) KVTIER_REQUIRES(mu_);
  void HeapSiftUp(Group& group, uint32_t pos) KVTIER_REQUIRES(mu_);
  void HeapSiftDown(Group& group, uint32_t pos) KVTIER_REQUIRES(mu_);

  // Loads: blocks pinned in host memory and copied in one batch.
  Load* NewLoadLocked(bool prefetch) KVTIER_REQUIRES(mu_);
  void RecycleLoadLocked(Load* load) KVTIER_REQUIRES(mu_);
  void AddToLoadLocked(Load** load, SlotId slot) KVTIER_REQUIRES(mu_);
  Status Fetch(Load& load, bool partial) KVTIER_EXCLUDES(mu_);
  void PublishLocked(Load& load) KVTIER_REQUIRES(mu_);
  void CopyDoneLocked(Load* load) KVTIER_REQUIRES(mu_);
  void FailLoadSlotsLocked(std::span<const SlotId> slots) KVTIER_REQUIRES(mu_);
  void PrefetchThread() KVTIER_EXCLUDES(mu_);

  // Leases, and what completes in the background.
  Lease* NewLeaseLocked(uint64_t* id) KVTIER_REQUIRES(mu_);
  Lease* FindLeaseLocked(uint64_t id) KVTIER_REQUIRES(mu_);
  void UnpinLeaseLocked(Lease* lease) KVTIER_REQUIRES(mu_);
  void FreeLeaseLocked(Lease* lease) KVTIER_REQUIRES(mu_);
  bool WaitOldestReleaseLocked() KVTIER_REQUIRES(mu_);
  void ReapLocked() KVTIER_REQUIRES(mu_);
  void Reap() KVTIER_EXCLUDES(mu_);

  // Acquire's pieces.
  bool TakeLocked(Lease& lease, const Request& r, uint32_t i, Load** load) KVTIER_REQUIRES(mu_);
  Status AcquireRound(Lease& lease, const Request& r, AcquireInfo* info) KVTIER_EXCLUDES(mu_);

  const DeviceCacheOptions options_;
  BlockSource* const source_;
  const std::unique_ptr<DevicePool> pool_;  // declared before engine_: outlives it
  const std::unique_ptr<CopyEngine> engine_;

  mutable Mutex mu_;
  std::condition_variable_any loaded_cv_;  // a load published or failed
  std::condition_variable_any work_cv_;    // prefetch work queued, or stopping
  std::condition_variable_any idle_cv_;    // the prefetch queue ran dry
  std::vector<SlotInfo> slots_ KVTIER_GUARDED_BY(mu_);
  std::unique_ptr<SlotMap> map_ KVTIER_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Group>> groups_ KVTIER_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Lease>> leases_ KVTIER_GUARDED_BY(mu_);
  std::vector<uint32_t> free_leases_ KVTIER_GUARDED_BY(mu_);
  std::vector<uint32_t> releasing_ KVTIER_GUARDED_BY(mu_);           // lease indices, oldest first
  std::vector<std::unique_ptr<Load>> loads_ KVTIER_GUARDED_BY(mu_);  // owns every Load
  std::vector<Load*> spare_loads_ KVTIER_GUARDED_BY(mu_);
  std::vector<Load*> in_flight_ KVTIER_GUARDED_BY(mu_);  // copies submitted, not known run
  std::vector<Load*> completed_ KVTIER_GUARDED_BY(mu_);  // copies run; host unpin pending
  std::deque<Load*> prefetch_queue_ KVTIER_GUARDED_BY(mu_);
  uint32_t prefetch_running_ KVTIER_GUARDED_BY(mu_) = 0;    // loads the thread is fetching
  uint32_t unpinning_ KVTIER_GUARDED_BY(mu_) = 0;           // Reap calls returning host pins
  uint32_t prefetch_in_flight_ KVTIER_GUARDED_BY(mu_) = 0;  // prefetch loads in in_flight_
  bool stopping_ KVTIER_GUARDED_BY(mu_) = false;
  uint64_t tick_ KVTIER_GUARDED_BY(mu_) = 0;        // acquires and prefetches (LRU order)
  uint64_t mark_ KVTIER_GUARDED_BY(mu_) = 0;        // Acquire calls (duplicates)
  uint64_t generation_ KVTIER_GUARDED_BY(mu_) = 0;  // slot allocations
  uint64_t resident_ KVTIER_GUARDED_BY(mu_) = 0;
  DeviceCacheStats stats_ KVTIER_GUARDED_BY(mu_);
  std::thread prefetch_thread_;
};

// The cache's options for a store's retrieval options (policy, decay, prefetch, the
// emulation switch, InfLLM's per-layer capacity).
DeviceCacheOptions DeviceCacheOptionsFor(const RetrievalOptions& retrieval);

// Copies the cache's counters into the GPU-tier fields of `stats`.
void AddDeviceCacheStats(const DeviceCacheStats& cache, StoreStats* stats);

// The blocks worth prefetching after each Acquire, from what recent calls asked for:
// while the engine computes layer l, for layer l + 1 the blocks layer l just acquired
// (adjacent layers attend to the same positions: when layer l's selection moves to a
// new span, the next layers' usually do too) and what layer l + 1 acquired last step (in
// case it was evicted since); for layer l, its last Select's runners-up (the likely
// newcomers at the next step as the queries drift). The cache skips blocks that are
// resident or on their way and drops what does not fit without stalling.
//
// Thread safety: every method may be called from any thread (one mutex).
class PrefetchPlanner {
 public:
  explicit PrefetchPlanner(uint32_t num_layers) : num_layers_(num_layers) {}

  // Records the blocks an Acquire of (sequence, layer) asked for, and the runners-up
  // its Select ranked after its top_k.
  void NoteAcquired(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                    std::span<const int64_t> blocks) KVTIER_EXCLUDES(mu_);
  void NoteRunnersUp(uint32_t namespace_id, const SequenceId& sequence, uint32_t layer,
                     std::span<const int64_t> blocks) KVTIER_EXCLUDES(mu_);
  // Drops a sequence's history (DropSequence), so that it does not outlive the sequence.
  void Forget(uint32_t namespace_id, const SequenceId& sequence) KVTIER_EXCLUDES(mu_);
  // Asks `cache` to prefetch what follows an Acquire of (sequence, layer) (see above).
  void PrefetchAfterAcquire(DeviceCache& cache, uint32_t namespace_id, const SequenceId& sequence,
                            uint32_t layer) KVTIER_EXCLUDES(mu_);

 private:
  struct LayerKey {
    uint32_t namespace_id;
    SequenceId sequence;
    uint32_t layer;
    friend bool operator==(const LayerKey&, const LayerKey&) = default;
  };
  struct LayerKeyHash {
    size_t operator()(const LayerKey& k) const noexcept;
  };
  struct LayerHistory {
    std::vector<int64_t> acquired;    // the last Acquire's blocks
    std::vector<int64_t> runners_up;  // the last Select's ranks top_k .. top_k + extra
  };

  const uint32_t num_layers_;
  Mutex mu_;
  std::unordered_map<LayerKey, LayerHistory, LayerKeyHash> history_ KVTIER_GUARDED_BY(mu_);
  std::vector<int64_t> scratch_ KVTIER_GUARDED_BY(mu_);
};

}  // namespace kvtier

#endif  // KVTIER_CORE_DEVICE_CACHE_H_
