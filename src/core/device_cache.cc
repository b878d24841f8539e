#include "src/core/device_cache.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>

namespace kvtier {
namespace {

constexpr uint32_t kNone = UINT32_MAX;
// Renormalise a group's values when its scale passes this (decay 0.9: every ~2200
// steps); far from double's range so that value + score * scale stays exact enough.
constexpr double kMaxScale = 1e100;
// Acquire rounds: a round retries the blocks whose load by another call failed.
constexpr int kMaxRounds = 4;

uint64_t NanosSince(std::chrono::steady_clock::time_point start) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count());
}

}  // namespace

// A slot's life in the cache (the SlotTable below keeps the pins):
//   kFree      not allocated.
//   kQueued    reserved by Prefetch, not started; holds the prefetch's pin. In the map.
//   kLoading   being pinned in host memory and copied, by an Acquire (its lease holds
//              the allocation pin) or the prefetch thread. In the map.
//   kResident  copy submitted (`load` set while it has not run). In the map.
//   kDetached  invalidated while pinned: valid bytes, out of the map, freed at the last
//              unpin.
//   kFailed    its load failed: out of the map, freed at the last unpin.
enum class DeviceCache::SlotState : uint8_t {
  kFree,
  kQueued,
  kLoading,
  kResident,
  kDetached,
  kFailed
};

struct DeviceCache::SlotInfo {
  BlockKey key;
  uint64_t generation = 0;  // allocations so far, when this one was made
  uint64_t tick = 0;        // last acquire (LRU order, and ties)
  uint64_t mark = 0;        // the last Acquire that pinned it (duplicates)
  double value = 0;         // kScoreDecay: value * group scale
  Load* load = nullptr;     // the load bringing it in, until its copy has run
  uint32_t group = 0;
  uint32_t heap_pos = kNone;  // in its group's heap: evictable
  SlotState state = SlotState::kFree;
  bool prefetched = false;  // brought in by Prefetch, not yet acquired
  bool detached = false;    // kLoading, but invalidated: detach when published
};

// Key -> slot for the slots in the map: open addressing, linear probing, deletion by
// backward shift; twice as many cells as slots, so it never grows.
class DeviceCache::SlotMap {
 public:
  explicit SlotMap(uint32_t slots)
      : cells_(std::bit_ceil(std::max<uint64_t>(16, uint64_t{slots} * 2)), kNone),
        mask_(cells_.size() - 1) {}

  SlotId Find(const BlockKey& key, const std::vector<SlotInfo>& slots) const {
    for (uint64_t i = Home(key);; i = (i + 1) & mask_) {
      if (cells_[i] == kNone) return kNone;
      if (slots[cells_[i]].key == key) return cells_[i];
    }
  }
  void Insert(SlotId slot, const std::vector<SlotInfo>& slots) {
    uint64_t i = Home(slots[slot].key);
    while (cells_[i] != kNone) i = (i + 1) & mask_;
    cells_[i] = slot;
  }
  void Erase(SlotId slot, const std::vector<SlotInfo>& slots) {
    uint64_t i = Home(slots[slot].key);
    while (cells_[i] != slot) i = (i + 1) & mask_;
    for (uint64_t j = (i + 1) & mask_; cells_[j] != kNone; j = (j + 1) & mask_) {
      // The cell at j may move back to i unless its home lies cyclically in (i, j].
      const uint64_t home = Home(slots[cells_[j]].key);
      const bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
      if (stays) continue;
      cells_[i] = cells_[j];
      i = j;
    }
    cells_[i] = kNone;
  }

 private:
  uint64_t Home(const BlockKey& key) const { return BlockKeyHash{}(key)&mask_; }

  std::vector<SlotId> cells_;
  const uint64_t mask_;
};

// The (namespace, sequence, layer) acquired in a group's current step: open addressing,
// cleared in O(1) by an epoch; grows (rarely) past half full.
class DeviceCache::StepSet {
 public:
  // False when already present.
  bool Insert(uint32_t ns, const SequenceId& seq, uint32_t layer) {
    if ((size_ + 1) * 2 > cells_.size()) Grow();
    const uint64_t mask = cells_.size() - 1;
    for (uint64_t i = Hash(ns, seq, layer) & mask;; i = (i + 1) & mask) {
      Cell& c = cells_[i];
      if (c.epoch != epoch_) {
        c = Cell{epoch_, ns, layer, seq};
        ++size_;
        return true;
      }
      if (c.ns == ns && c.layer == layer && c.seq == seq) return false;
    }
  }
  void Clear() {
    ++epoch_;
    size_ = 0;
  }

 private:
  struct Cell {
    uint64_t epoch = 0;
    uint32_t ns = 0;
    uint32_t layer = 0;
    SequenceId seq;
  };
  static uint64_t Hash(uint32_t ns, const SequenceId& seq, uint32_t layer) {
    return BlockKeyHash{}(BlockKey{.namespace_id = ns, .sequence = seq, .layer = layer});
  }
  void Grow() {
    std::vector<Cell> old = std::move(cells_);
    cells_.assign(std::max<size_t>(64, old.size() * 2), Cell{});
    const uint64_t epoch = epoch_;
    epoch_ = 1;  // fresh cells hold epoch 0
    size_ = 0;
    for (const Cell& c : old) {
      if (c.epoch == epoch) Insert(c.ns, c.seq, c.layer);
    }
  }

  std::vector<Cell> cells_;
  uint64_t epoch_ = 1;
  uint64_t size_ = 0;
};

// A replacement group: the whole tier, or one layer's blocks.
struct DeviceCache::Group {
  uint32_t index = 0;
  uint32_t capacity = 0;     // slots it may hold
  uint32_t size = 0;         // slots it holds (any state but kFree)
  std::vector<SlotId> heap;  // evictable slots, lowest value (then oldest tick) first
  uint64_t steps = 0;
  double scale = 1.0;  // score_decay^-(steps since the last renormalisation)
  StepSet seen;
};

// One batch of blocks brought in: pinned in host memory, copied in one CopyToDevice.
struct DeviceCache::Load {
  bool prefetch = false;  // its slots hold the prefetch's pins until the copy has run
  std::vector<BlockKey> keys;
  std::vector<SlotId> slots;
  std::vector<uint64_t> generations;  // prefetch: the allocation each slot was queued in
  std::vector<HostBlockRef> host;     // empty when `direct`
  bool direct = false;                // the source copied the blocks in (FillDevice)
  std::vector<CopyOp> ops;
  std::vector<std::byte*> destinations;  // FillDevice's
  std::vector<Status> statuses;          // FillDevice's
  std::vector<SlotId> failed;            // prefetch: slots whose block the source could not pin
  CopyEvent event;
};

struct DeviceCache::Lease {
  enum class State : uint8_t { kFree, kAcquiring, kHeld, kReleasing };
  struct Wait {
    uint32_t index;  // into the request
    SlotId slot;
    uint64_t generation;  // the slot's allocation when the wait began
    bool pinned;          // this wait holds the lease's pin (false: a duplicate)
    bool prefetched;      // a prefetch is bringing it
  };

  uint32_t index = 0;  // in leases_
  uint32_t generation = 0;
  State state = State::kFree;
  Group* group = nullptr;
  uint64_t mark = 0;
  uint64_t prefetch_hits = 0;
  StreamHandle stream = nullptr;
  std::vector<SlotId> slots;  // one pin each
  // Acquire's scratch.
  std::vector<uint32_t> todo, retry, second;
  std::vector<Wait> waits;
  std::vector<Load*> stream_waits;
  cuda::Event released;  // with a GPU: recorded on `stream` by Release
};

// --- Creation ---------------------------------------------------------------------------

Result<std::unique_ptr<DeviceCache>> DeviceCache::Create(uint64_t block_bytes,
                                                         uint64_t capacity_bytes,
                                                         const DeviceCacheOptions& options,
                                                         BlockSource* source) {
  if (source == nullptr) return Status::InvalidArgument("device cache: no block source");
  if (!(options.score_decay > 0.0f && options.score_decay <= 1.0f)) {
    return Status::InvalidArgument("device cache: score_decay " +
                                   std::to_string(options.score_decay) + " outside (0, 1]");
  }
  if (!(options.default_score >= 0.0f) || !std::isfinite(options.default_score)) {
    return Status::InvalidArgument("device cache: default_score must be finite and >= 0");
  }
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<DevicePool> pool,
                          DevicePool::Create(block_bytes, capacity_bytes,
                                             DeviceOptions{.device = options.device,
                                                           .force_emulated = options.force_emulated,
                                                           .shareable = options.shareable}));
  KVTIER_ASSIGN_OR_RETURN(std::unique_ptr<CopyEngine> engine, CopyEngine::Create(*pool));
  auto cache = std::unique_ptr<DeviceCache>(
      new DeviceCache(options, source, std::move(pool), std::move(engine)));
  if (options.prefetch)
    cache->prefetch_thread_ = std::thread([c = cache.get()] { c->PrefetchThread(); });
  return cache;
}

DeviceCache::DeviceCache(const DeviceCacheOptions& options, BlockSource* source,
                         std::unique_ptr<DevicePool> pool, std::unique_ptr<CopyEngine> engine)
    : options_(options), source_(source), pool_(std::move(pool)), engine_(std::move(engine)) {
  MutexLock lock(&mu_);
  slots_.resize(pool_->slot_count());
  map_ = std::make_unique<SlotMap>(pool_->slot_count());
  stats_.capacity_bytes = pool_->capacity_bytes();
  stats_.slots = pool_->slot_count();
  stats_.emulated = pool_->emulated();
}

DeviceCache::~DeviceCache() {
  {
    MutexLock lock(&mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  if (prefetch_thread_.joinable()) prefetch_thread_.join();
  {
    MutexLock lock(&mu_);
    for (Load* load : prefetch_queue_) {
      for (size_t i = 0; i < load->slots.size(); ++i) {
        const SlotId slot = load->slots[i];
        SlotInfo& s = slots_[slot];
        if (s.generation != load->generations[i] || s.state != SlotState::kQueued) continue;
        map_->Erase(slot, slots_);
        s.state = SlotState::kFailed;
        pool_->Retire(slot);
        UnpinLocked(slot);
      }
      RecycleLoadLocked(load);
    }
    prefetch_queue_.clear();
  }
  (void)engine_->Synchronize();
  {
    MutexLock lock(&mu_);
    // Kernels may still read the slots of released leases: wait before the pool goes.
    for (uint32_t index : releasing_) (void)leases_[index]->released.Synchronize();
    ReapLocked();
  }
  Reap();
}

void DeviceCache::AddPinnedHostRange(const void* base, uint64_t bytes) {
  engine_->AddPinnedRange(base, bytes);
}

// --- Requests, groups, steps ------------------------------------------------------------

Status DeviceCache::CheckRequest(uint32_t layer, std::span<const int64_t> blocks,
                                 std::span<const float> scores) const {
  if (!scores.empty() && scores.size() != blocks.size()) {
    return Status::InvalidArgument("device cache: " + std::to_string(scores.size()) +
                                   " scores for " + std::to_string(blocks.size()) + " blocks");
  }
  if (options_.per_layer_capacity_blocks > 0 && layer >= kMaxLayers) {
    return Status::InvalidArgument("device cache: layer " + std::to_string(layer) +
                                   " beyond the per-layer limit");
  }
  for (int64_t b : blocks) {
    if (b < -1 || b > int64_t{UINT32_MAX}) {
      return Status::InvalidArgument("device cache: block index " + std::to_string(b) +
                                     " out of range");
    }
  }
  return Status::OK();
}

DeviceCache::Group& DeviceCache::GroupOf(uint32_t layer) {
  const bool per_layer = options_.per_layer_capacity_blocks > 0;
  const uint32_t index = per_layer ? layer : 0;
  if (index >= groups_.size()) groups_.resize(index + 1);
  if (groups_[index] == nullptr) {
    auto group = std::make_unique<Group>();
    group->index = index;
    group->capacity = per_layer ? options_.per_layer_capacity_blocks : pool_->slot_count();
    group->heap.reserve(std::min(group->capacity, pool_->slot_count()));
    groups_[index] = std::move(group);
  }
  return *groups_[index];
}

void DeviceCache::AdvanceStepLocked(Group& group) {
  ++group.steps;
  stats_.steps = std::max(stats_.steps, group.steps);
  group.seen.Clear();
  if (options_.policy != ReplacementPolicy::kScoreDecay || options_.score_decay == 1.0f) return;
  group.scale /= options_.score_decay;
  if (group.scale < kMaxScale) return;
  // Renormalise: value / scale is the true value; the heap order may change only where
  // values underflow, so rebuild it.
  for (SlotInfo& s : slots_) {
    if (s.state != SlotState::kFree && s.group == group.index) s.value /= group.scale;
  }
  group.scale = 1.0;
  for (uint32_t pos = static_cast<uint32_t>(group.heap.size()) / 2; pos-- > 0;) {
    HeapSiftDown(group, pos);
  }
}

void DeviceCache::NoteAcquireLocked(Group& group, uint32_t ns, const SequenceId& seq,
                                    uint32_t layer) {
  if (group.seen.Insert(ns, seq, layer)) return;
  AdvanceStepLocked(group);
  group.seen.Insert(ns, seq, layer);
}

void DeviceCache::NextStep() {
  MutexLock lock(&mu_);
  for (auto& group : groups_) {
    if (group != nullptr) AdvanceStepLocked(*group);
  }
}

void DeviceCache::TouchLocked(SlotId slot, std::span<const float> scores, size_t index) {
  SlotInfo& s = slots_[slot];
  s.tick = ++tick_;
  if (options_.policy != ReplacementPolicy::kScoreDecay) return;
  const float score = scores.empty() ? options_.default_score : scores[index];
  s.value += static_cast<double>(std::max(0.0f, score)) * groups_[s.group]->scale;
}

// --- Slots ------------------------------------------------------------------------------

std::optional<SlotId> DeviceCache::AllocateLocked(Group& group, const BlockKey& key) {
  std::optional<SlotId> slot;
  if (group.size < group.capacity) slot = pool_->Allocate();
  if (!slot && !group.heap.empty()) {
    EvictLocked(group.heap.front());
    slot = pool_->Allocate();
  }
  if (!slot) return std::nullopt;
  SlotInfo& s = slots_[*slot];
  s = SlotInfo{};
  s.key = key;
  s.generation = ++generation_;
  s.group = group.index;
  ++group.size;
  return slot;
}

void DeviceCache::EvictLocked(SlotId slot) {
  SlotInfo& s = slots_[slot];
  HeapRemove(*groups_[s.group], slot);
  map_->Erase(slot, slots_);
  --resident_;
  ++stats_.evictions;
  if (s.prefetched) ++stats_.prefetch_wasted;
  pool_->Retire(slot);  // unpinned: freed now
  s.state = SlotState::kFree;
  --groups_[s.group]->size;
}

void DeviceCache::PinLocked(SlotId slot) {
  SlotInfo& s = slots_[slot];
  if (s.heap_pos != kNone) HeapRemove(*groups_[s.group], slot);
  pool_->Pin(slot);
}

void DeviceCache::UnpinLocked(SlotId slot) {
  SlotInfo& s = slots_[slot];
  pool_->Unpin(slot);
  if (pool_->table().IsFree(slot)) {
    s.state = SlotState::kFree;
    --groups_[s.group]->size;
  } else if (s.state == SlotState::kResident && pool_->PinsOf(slot) == 0) {
    HeapPush(*groups_[s.group], slot);
  }
}

void DeviceCache::DetachLocked(SlotId slot) {
  SlotInfo& s = slots_[slot];
  map_->Erase(slot, slots_);
  switch (s.state) {
    case SlotState::kResident:
      --resident_;
      if (s.heap_pos != kNone) HeapRemove(*groups_[s.group], slot);
      pool_->Retire(slot);
      if (pool_->table().IsFree(slot)) {
        s.state = SlotState::kFree;
        --groups_[s.group]->size;
      } else {
        s.state = SlotState::kDetached;
      }
      break;
    case SlotState::kLoading:
      s.detached = true;  // PublishLocked detaches it
      break;
    case SlotState::kQueued:
      s.state = SlotState::kFailed;
      pool_->Retire(slot);
      UnpinLocked(slot);  // the prefetch's pin: the queued load skips it
      break;
    default:
      break;
  }
}

void DeviceCache::Invalidate(const BlockKey& key) {
  MutexLock lock(&mu_);
  const SlotId slot = map_->Find(key, slots_);
  if (slot != kNone) DetachLocked(slot);
}

void DeviceCache::InvalidateSequence(uint32_t namespace_id, const SequenceId& sequence) {
  MutexLock lock(&mu_);
  for (SlotId slot = 0; slot < slots_.size(); ++slot) {
    const SlotInfo& s = slots_[slot];
    const bool mapped = s.state == SlotState::kQueued || s.state == SlotState::kResident ||
                        (s.state == SlotState::kLoading && !s.detached);
    if (mapped && s.key.namespace_id == namespace_id && s.key.sequence == sequence) {
      DetachLocked(slot);
    }
  }
}

// --- The eviction heap ------------------------------------------------------------------

bool DeviceCache::HeapLess(SlotId a, SlotId b) const {
  const SlotInfo& x = slots_[a];
  const SlotInfo& y = slots_[b];
  if (x.value != y.value) return x.value < y.value;
  return x.tick < y.tick;
}

void DeviceCache::HeapPush(Group& group, SlotId slot) {
  slots_[slot].heap_pos = static_cast<uint32_t>(group.heap.size());
  group.heap.push_back(slot);
  HeapSiftUp(group, slots_[slot].heap_pos);
}

void DeviceCache::HeapRemove(Group& group, SlotId slot) {
  const uint32_t pos = slots_[slot].heap_pos;
  slots_[slot].heap_pos = kNone;
  const SlotId last = group.heap.back();
  group.heap.pop_back();
  if (last == slot) return;
  group.heap[pos] = last;
  slots_[last].heap_pos = pos;
  HeapSiftUp(group, pos);
  HeapSiftDown(group, slots_[last].heap_pos);
}

void DeviceCache::HeapSiftUp(Group& group, uint32_t pos) {
  const SlotId slot = group.heap[pos];
  while (pos > 0) {
    const uint32_t parent = (pos - 1) / 2;
    if (!HeapLess(slot, group.heap[parent])) break;
    group.heap[pos] = group.heap[parent];
    slots_[group.heap[pos]].heap_pos = pos;
    pos = parent;
  }
  group.heap[pos] = slot;
  slots_[slot].heap_pos = pos;
}

void DeviceCache::HeapSiftDown(Group& group, uint32_t pos) {
  const SlotId slot = group.heap[pos];
  const auto n = static_cast<uint32_t>(group.heap.size());
  for (;;) {
    uint32_t child = 2 * pos + 1;
    if (child >= n) break;
    if (child + 1 < n && HeapLess(group.heap[child + 1], group.heap[child])) ++child;
    if (!HeapLess(group.heap[child], slot)) break;
    group.heap[pos] = group.heap[child];
    slots_[group.heap[pos]].heap_pos = pos;
    pos = child;
  }
  group.heap[pos] = slot;
  slots_[slot].heap_pos = pos;
}

// --- Loads ------------------------------------------------------------------------------

DeviceCache::Load* DeviceCache::NewLoadLocked(bool prefetch) {
  Load* load;
  if (!spare_loads_.empty()) {
    load = spare_loads_.back();
    spare_loads_.pop_back();
  } else {
    loads_.push_back(std::make_unique<Load>());
    load = loads_.back().get();
  }
  load->prefetch = prefetch;
  load->keys.clear();
  load->slots.clear();
  load->generations.clear();
  load->failed.clear();
  return load;
}

void DeviceCache::RecycleLoadLocked(Load* load) { spare_loads_.push_back(load); }

// Without the lock: has the source copy the load's blocks in (FillDevice), or pins them
// in host memory and submits their copy. With `partial`, blocks the source cannot
// provide move to `failed` and the rest go on.
Status DeviceCache::Fetch(Load& load, bool partial) {
  const size_t n = load.keys.size();
  load.destinations.clear();
  for (SlotId slot : load.slots) load.destinations.push_back(pool_->SlotData(slot));
  load.statuses.assign(n, Status::OK());
  load.host.clear();
  // Direct: landed already, nothing to copy, no host pin to return, and load.event
  // (fresh, or a recycled load's, which has run) reads as complete.
  load.direct = source_->FillDevice(load.keys, load.destinations, load.statuses);
  if (!load.direct) {
    load.host.assign(n, HostBlockRef{});
    if (partial) {
      (void)PinHostEach(*source_, load.keys, load.host, load.statuses);
    } else if (Status status = source_->PinHost(load.keys, load.host); !status.ok()) {
      return status;
    }
  }
  if (!partial) {
    for (const Status& s : load.statuses) {
      if (!s.ok()) return s;
    }
  }
  size_t kept = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!load.statuses[i].ok()) {
      load.failed.push_back(load.slots[i]);
      continue;
    }
    load.keys[kept] = load.keys[i];
    load.slots[kept] = load.slots[i];
    load.generations[kept] = load.generations[i];
    if (!load.direct) load.host[kept] = load.host[i];
    ++kept;
  }
  load.keys.resize(kept);
  load.slots.resize(kept);
  load.generations.resize(kept);
  if (load.direct || kept == 0) {
    load.host.clear();
    return Status::OK();
  }
  load.host.resize(kept);
  load.ops.clear();
  for (size_t i = 0; i < load.keys.size(); ++i) {
    load.ops.push_back(CopyOp{.src = load.host[i].data,
                              .dst = pool_->SlotData(load.slots[i]),
                              .bytes = pool_->block_bytes()});
  }
  const Status status = engine_->CopyToDevice(load.ops, &load.event);
  if (!status.ok()) {
    (void)load.event.Wait();  // whatever was submitted has run: the host pins can go
    source_->UnpinHost(load.keys, load.host);
    return status.WithContext("device cache");
  }
  return Status::OK();
}

// The load's copy has been submitted: its slots become resident (or detached, if
// invalidated meanwhile), and the load waits for its copy in in_flight_ (or, done
// already, for its host unpin in completed_).
void DeviceCache::PublishLocked(Load& load) {
  for (SlotId slot : load.slots) {
    SlotInfo& s = slots_[slot];
    s.load = &load;
    if (s.detached) {
      s.state = SlotState::kDetached;
      pool_->Retire(slot);
    } else {
      s.state = SlotState::kResident;
      pool_->Publish(slot, s.key);
      ++resident_;
    }
  }
  const uint64_t n = load.slots.size();
  stats_.bytes_in += n * pool_->block_bytes();
  if (load.direct) stats_.fetches_direct += n;
  if (load.prefetch) stats_.prefetches += n;
  Result<bool> done = load.event.Query();
  if (done.ok() && !*done) {
    in_flight_.push_back(&load);
    if (load.prefetch) ++prefetch_in_flight_;
  } else {
    CopyDoneLocked(&load);
    completed_.push_back(&load);
  }
  loaded_cv_.notify_all();
}

// The load's copy has run: its slots need no stream wait any more, and a prefetch's
// pins go.
void DeviceCache::CopyDoneLocked(Load* load) {
  for (SlotId slot : load->slots) {
    if (slots_[slot].load == load) slots_[slot].load = nullptr;
    if (load->prefetch) UnpinLocked(slot);
  }
}

// Slots whose load failed (they hold their loader's pin, unpinned by the caller).
void DeviceCache::FailLoadSlotsLocked(std::span<const SlotId> slots) {
  for (SlotId slot : slots) {
    SlotInfo& s = slots_[slot];
    if (!s.detached) map_->Erase(slot, slots_);
    s.state = SlotState::kFailed;
    s.load = nullptr;
    pool_->Retire(slot);
  }
  loaded_cv_.notify_all();
}

void DeviceCache::ReapLocked() {
  for (size_t i = 0; i < in_flight_.size();) {
    Load* load = in_flight_[i];
    Result<bool> done = load->event.Query();
    if (done.ok() && !*done) {
      ++i;
      continue;
    }
    CopyDoneLocked(load);  // a failed copy counts as run
    if (load->prefetch) --prefetch_in_flight_;
    completed_.push_back(load);
    in_flight_[i] = in_flight_.back();
    in_flight_.pop_back();
  }
  for (size_t i = 0; i < releasing_.size();) {
    Lease* lease = leases_[releasing_[i]].get();
    Result<bool> done = lease->released.Query();
    if (done.ok() && !*done) {
      ++i;
      continue;
    }
    releasing_.erase(releasing_.begin() + static_cast<ptrdiff_t>(i));
    UnpinLeaseLocked(lease);
    FreeLeaseLocked(lease);
  }
}

// Completes what has run: returns the host pins of finished loads to the source
// (without the lock).
void DeviceCache::Reap() {
  Load* load = nullptr;
  {
    MutexLock lock(&mu_);
    ReapLocked();
    if (completed_.empty()) return;
    load = completed_.back();
    completed_.pop_back();
    ++unpinning_;  // Drain waits for the host pins this call returns
  }
  for (;;) {
    if (!load->host.empty()) source_->UnpinHost(load->keys, load->host);
    MutexLock lock(&mu_);
    RecycleLoadLocked(load);
    if (completed_.empty()) {
      if (--unpinning_ == 0) idle_cv_.notify_all();
      return;
    }
    load = completed_.back();
    completed_.pop_back();
  }
}

// --- Leases -----------------------------------------------------------------------------

DeviceCache::Lease* DeviceCache::NewLeaseLocked(uint64_t* id) {
  uint32_t index;
  if (!free_leases_.empty()) {
    index = free_leases_.back();
    free_leases_.pop_back();
  } else {
    index = static_cast<uint32_t>(leases_.size());
    leases_.push_back(std::make_unique<Lease>());
    leases_.back()->index = index;
  }
  Lease* lease = leases_[index].get();
  ++lease->generation;
  lease->state = Lease::State::kAcquiring;
  lease->slots.clear();
  lease->mark = ++mark_;
  ++stats_.leases;
  *id = uint64_t{lease->generation} << 32 | (index + 1);
  return lease;
}

DeviceCache::Lease* DeviceCache::FindLeaseLocked(uint64_t id) {
  const uint64_t index = (id & 0xFFFFFFFFu) - 1;
  if ((id & 0xFFFFFFFFu) == 0 || index >= leases_.size()) return nullptr;
  Lease* lease = leases_[index].get();
  if (lease->generation != (id >> 32) || lease->state != Lease::State::kHeld) return nullptr;
  return lease;
}

void DeviceCache::UnpinLeaseLocked(Lease* lease) {
  for (SlotId slot : lease->slots) UnpinLocked(slot);
  lease->slots.clear();
}

void DeviceCache::FreeLeaseLocked(Lease* lease) {
  lease->state = Lease::State::kFree;
  --stats_.leases;
  free_leases_.push_back(lease->index);
}

// With a GPU, when the tier is full: waits (without the lock) for the oldest released
// lease's stream work, then unpins its slots. False when none is releasing.
bool DeviceCache::WaitOldestReleaseLocked() {
  if (releasing_.empty()) return false;
  Lease* lease = leases_[releasing_.front()].get();
  releasing_.erase(releasing_.begin());  // ours now: nobody else reaps it
  mu_.Unlock();
  (void)lease->released.Synchronize();
  mu_.Lock();
  UnpinLeaseLocked(lease);
  FreeLeaseLocked(lease);
  return true;
}

Status DeviceCache::Release(uint64_t id) {
  Status status;
  {
    MutexLock lock(&mu_);
    Lease* lease = FindLeaseLocked(id);
    if (lease == nullptr) {
      return Status::InvalidArgument("device cache: lease " + std::to_string(id) + " is not held");
    }
    if (emulated() || lease->slots.empty()) {
      UnpinLeaseLocked(lease);
      FreeLeaseLocked(lease);
    } else {
      cuda::ScopedDevice scope(pool_->device());
      status = scope.status();
      if (status.ok() && lease->released.get() == nullptr) {
        Result<cuda::Event> event = cuda::Event::Create();
        if (event.ok()) {
          lease->released = std::move(event).value();
        } else {
          status = event.status();
        }
      }
      if (status.ok()) status = lease->released.Record(lease->stream);
      if (status.ok()) {
        lease->state = Lease::State::kReleasing;
        releasing_.push_back(lease->index);
      } else {
        UnpinLeaseLocked(lease);
        FreeLeaseLocked(lease);
        status = status.WithContext("device cache release");
      }
    }
  }
  Reap();
  return status;
}

// --- Acquire ----------------------------------------------------------------------------

struct DeviceCache::Request {
  uint32_t namespace_id;
  SequenceId sequence;
  uint32_t layer;
  std::span<const int64_t> blocks;
  std::span<const float> scores;
  StreamHandle stream;
  std::span<uint64_t> addresses;

  BlockKey Key(uint32_t i) const {
    return BlockKey{.namespace_id = namespace_id,
                    .sequence = sequence,
                    .layer = layer,
                    .block = static_cast<uint32_t>(blocks[i])};
  }
};

Result<AcquireInfo> DeviceCache::Acquire(uint32_t namespace_id, const SequenceId& sequence,
                                         uint32_t layer, std::span<const int64_t> blocks,
                                         std::span<const float> scores, StreamHandle stream,
                                         std::span<uint64_t> device_addresses) {
  KVTIER_RETURN_IF_ERROR(CheckRequest(layer, blocks, scores));
  if (device_addresses.size() != blocks.size()) {
    return Status::InvalidArgument("device cache: " + std::to_string(device_addresses.size()) +
                                   " addresses for " + std::to_string(blocks.size()) + " blocks");
  }
  Reap();
  const Request request{namespace_id, sequence, layer, blocks, scores, stream, device_addresses};
  uint64_t id = 0;
  Lease* lease = nullptr;
  {
    MutexLock lock(&mu_);
    lease = NewLeaseLocked(&id);
    lease->stream = stream;
    lease->group = &GroupOf(layer);
    lease->prefetch_hits = 0;
    NoteAcquireLocked(*lease->group, namespace_id, sequence, layer);
    lease->todo.clear();
    for (uint32_t i = 0; i < blocks.size(); ++i) {
      if (blocks[i] < 0) {
        device_addresses[i] = 0;
      } else {
        lease->todo.push_back(i);
      }
    }
  }
  const auto requested = static_cast<uint32_t>(lease->todo.size());
  AcquireInfo info;
  Status status;
  for (int round = 0; status.ok() && !lease->todo.empty(); ++round) {
    if (round == kMaxRounds) {
      status = Status::Busy("device cache: other loads of these blocks kept failing");
      break;
    }
    status = AcquireRound(*lease, request, &info);
  }
  MutexLock lock(&mu_);
  if (!status.ok()) {
    UnpinLeaseLocked(lease);
    FreeLeaseLocked(lease);
    return status;
  }
  lease->state = Lease::State::kHeld;
  info.lease = id;
  info.hits = requested - info.from_host - info.from_disk;
  ++stats_.acquires;
  stats_.acquired_blocks += requested;
  stats_.hits += info.hits;
  stats_.fetches_host += info.from_host;
  stats_.fetches_disk += info.from_disk;
  stats_.prefetch_hits += lease->prefetch_hits;
  stats_.stall_nanos += info.stall_nanos;
  return info;
}

// Request entry i when its key is in the map: pins the slot for the lease (a hit, a
// wait for a load in progress, or a queued prefetch taken over into `*load`) and writes
// its address. False when the key is not in the map.
bool DeviceCache::TakeLocked(Lease& lease, const Request& r, uint32_t i, Load** load) {
  const SlotId slot = map_->Find(r.Key(i), slots_);
  if (slot == kNone) return false;
  SlotInfo& s = slots_[slot];
  r.addresses[i] = reinterpret_cast<uint64_t>(pool_->SlotData(slot));
  if (s.mark == lease.mark) {  // listed twice: follows the first
    if (s.state == SlotState::kLoading && s.load != *load) {
      lease.waits.push_back(Lease::Wait{i, slot, s.generation, false, false});
    }
    return true;
  }
  s.mark = lease.mark;
  TouchLocked(slot, r.scores, i);
  switch (s.state) {
    case SlotState::kResident:
      PinLocked(slot);
      lease.slots.push_back(slot);
      if (s.prefetched) ++lease.prefetch_hits;
      s.prefetched = false;
      if (s.load != nullptr && std::find(lease.stream_waits.begin(), lease.stream_waits.end(),
                                         s.load) == lease.stream_waits.end()) {
        lease.stream_waits.push_back(s.load);
      }
      break;
    case SlotState::kQueued:  // not started: this call loads it, with the prefetch's pin
      s.state = SlotState::kLoading;
      s.prefetched = false;
      s.generation = ++generation_;  // the queued load skips it
      lease.slots.push_back(slot);
      AddToLoadLocked(load, slot);
      break;
    case SlotState::kLoading:
      PinLocked(slot);
      lease.slots.push_back(slot);
      lease.waits.push_back(Lease::Wait{i, slot, s.generation, true, s.prefetched});
      s.prefetched = false;
      break;
    default:
      std::abort();  // only those three are in the map
  }
  return true;
}

void DeviceCache::AddToLoadLocked(Load** load, SlotId slot) {
  if (*load == nullptr) *load = NewLoadLocked(/*prefetch=*/false);
  SlotInfo& s = slots_[slot];
  s.load = *load;
  (*load)->keys.push_back(s.key);
  (*load)->slots.push_back(slot);
  (*load)->generations.push_back(s.generation);
}

// When no slot can be had for `group`: makes room if anything can (a queued prefetch
// cancelled, a released lease's stream waited for, a prefetch in progress waited for).
// False when nothing will free a slot.
bool DeviceCache::MakeRoomLocked(Group& group) {
  for (SlotId slot = 0; slot < slots_.size(); ++slot) {
    const SlotInfo& s = slots_[slot];
    if (s.state == SlotState::kQueued && s.group == group.index) {
      DetachLocked(slot);
      ++stats_.prefetch_dropped;
      return true;
    }
  }
  if (WaitOldestReleaseLocked()) return true;
  if (prefetch_running_ > 0) {
    loaded_cv_.wait(mu_);
    return true;
  }
  if (prefetch_in_flight_ > 0) {
    mu_.Unlock();
    (void)engine_->Synchronize();
    mu_.Lock();
    ReapLocked();
    return true;
  }
  return false;
}

// One pass over lease.todo: hits pinned, misses loaded in one batch, loads in progress
// waited for; entries whose load by another call failed go back to lease.todo.
Status DeviceCache::AcquireRound(Lease& lease, const Request& r, AcquireInfo* info) {
  const bool gpu = !emulated();
  Load* load = nullptr;
  Status status;
  {
    MutexLock lock(&mu_);
    lease.retry.clear();
    lease.second.clear();
    lease.waits.clear();
    lease.stream_waits.clear();
    // Hits first, so that no miss evicts a block this call needs.
    for (uint32_t i : lease.todo) {
      if (!TakeLocked(lease, r, i, &load)) lease.second.push_back(i);
    }
    for (uint32_t i : lease.second) {
      for (;;) {
        if (TakeLocked(lease, r, i, &load)) break;  // a duplicate, or loaded meanwhile
        const std::optional<SlotId> slot = AllocateLocked(*lease.group, r.Key(i));
        if (slot) {
          SlotInfo& s = slots_[*slot];
          s.state = SlotState::kLoading;
          s.mark = lease.mark;
          map_->Insert(*slot, slots_);
          TouchLocked(*slot, r.scores, i);
          lease.slots.push_back(*slot);
          AddToLoadLocked(&load, *slot);
          r.addresses[i] = reinterpret_cast<uint64_t>(pool_->SlotData(*slot));
          break;
        }
        if (!MakeRoomLocked(*lease.group)) {
          status = Status::ResourceExhausted(
              "device cache: every slot " +
              std::string(options_.per_layer_capacity_blocks > 0 ? "of the layer " : "") +
              "is pinned by leases (" + std::to_string(slots_.size()) + " slots)");
          break;
        }
      }
      if (!status.ok()) break;
    }
    if (status.ok() && gpu) {
      for (Load* l : lease.stream_waits) {
        status = l->event.MakeStreamWait(r.stream);
        if (!status.ok()) break;
      }
    }
    if (!status.ok()) {
      if (load != nullptr) {
        FailLoadSlotsLocked(load->slots);  // the lease's unpin frees them
        RecycleLoadLocked(load);
      }
      return status;
    }
  }

  if (load != nullptr) {
    const auto start = std::chrono::steady_clock::now();
    status = Fetch(*load, /*partial=*/false);
    if (status.ok() && gpu) {
      status = load->event.MakeStreamWait(r.stream);
      if (!status.ok()) {
        (void)load->event.Wait();
        if (!load->host.empty()) source_->UnpinHost(load->keys, load->host);
      }
    }
    info->stall_nanos += NanosSince(start);
    MutexLock lock(&mu_);
    if (!status.ok()) {
      FailLoadSlotsLocked(load->slots);
      RecycleLoadLocked(load);
      return status;
    }
    for (const HostBlockRef& h : load->host) ++(h.from_disk ? info->from_disk : info->from_host);
    if (load->direct) info->from_host += load->keys.size();
    PublishLocked(*load);
  }

  if (!lease.waits.empty()) {
    const auto start = std::chrono::steady_clock::now();
    MutexLock lock(&mu_);
    for (const Lease::Wait& w : lease.waits) {
      while (slots_[w.slot].generation == w.generation &&
             slots_[w.slot].state == SlotState::kLoading) {
        loaded_cv_.wait(mu_);
      }
      const SlotInfo& s = slots_[w.slot];
      const bool loaded = s.generation == w.generation &&
                          (s.state == SlotState::kResident || s.state == SlotState::kDetached);
      if (loaded) {
        if (w.prefetched) ++lease.prefetch_hits;
        if (gpu && s.load != nullptr && status.ok())
          status = s.load->event.MakeStreamWait(r.stream);
        continue;
      }
      if (w.pinned) {  // its load failed: drop our pin and fetch it again
        UnpinLocked(w.slot);
        auto at = std::find(lease.slots.begin(), lease.slots.end(), w.slot);
        *at = lease.slots.back();
        lease.slots.pop_back();
      }
      lease.retry.push_back(w.index);
    }
    info->stall_nanos += NanosSince(start);
  }
  lease.todo.swap(lease.retry);
  if (load != nullptr) Reap();
  return status;
}

// --- Prefetch ---------------------------------------------------------------------------

Result<uint32_t> DeviceCache::Prefetch(uint32_t namespace_id, const SequenceId& sequence,
                                       uint32_t layer, std::span<const int64_t> blocks,
                                       std::span<const float> scores) {
  KVTIER_RETURN_IF_ERROR(CheckRequest(layer, blocks, scores));
  if (!options_.prefetch) return 0u;
  Reap();
  const Request r{namespace_id, sequence, layer, blocks, scores, nullptr, {}};
  uint32_t started = 0;
  {
    MutexLock lock(&mu_);
    Group& group = GroupOf(layer);
    Load* load = nullptr;
    for (uint32_t i = 0; i < blocks.size(); ++i) {
      if (blocks[i] < 0 || map_->Find(r.Key(i), slots_) != kNone) continue;
      const std::optional<SlotId> slot = AllocateLocked(group, r.Key(i));
      if (!slot) {  // nothing evictable: later blocks would find nothing either
        stats_.prefetch_dropped += static_cast<uint64_t>(
            std::count_if(blocks.begin() + i, blocks.end(), [](int64_t b) { return b >= 0; }));
        break;
      }
      SlotInfo& s = slots_[*slot];
      s.state = SlotState::kQueued;
      s.prefetched = true;
      map_->Insert(*slot, slots_);
      TouchLocked(*slot, scores, i);
      if (load == nullptr) load = NewLoadLocked(/*prefetch=*/true);
      s.load = load;
      load->keys.push_back(s.key);
      load->slots.push_back(*slot);
      load->generations.push_back(s.generation);
    }
    if (load != nullptr) {
      started = static_cast<uint32_t>(load->keys.size());
      prefetch_queue_.push_back(load);
    }
  }
  if (started > 0) work_cv_.notify_one();
  return started;
}

void DeviceCache::PrefetchThread() {
  for (;;) {
    Load* load = nullptr;
    {
      MutexLock lock(&mu_);
      while (prefetch_queue_.empty() && !stopping_) work_cv_.wait(mu_);
      if (stopping_) return;  // the destructor drops what is queued
      load = prefetch_queue_.front();
      prefetch_queue_.pop_front();
      ++prefetch_running_;
      // Keep the blocks still queued for this load (not taken over, not invalidated).
      size_t kept = 0;
      for (size_t i = 0; i < load->slots.size(); ++i) {
        SlotInfo& s = slots_[load->slots[i]];
        if (s.generation != load->generations[i] || s.state != SlotState::kQueued) continue;
        s.state = SlotState::kLoading;
        load->keys[kept] = load->keys[i];
        load->slots[kept] = load->slots[i];
        load->generations[kept] = load->generations[i];
        ++kept;
      }
      load->keys.resize(kept);
      load->slots.resize(kept);
      load->generations.resize(kept);
    }
    const Status status = load->keys.empty() ? Status::OK() : Fetch(*load, /*partial=*/true);
    {
      MutexLock lock(&mu_);
      FailLoadSlotsLocked(load->failed);
      for (SlotId slot : load->failed) UnpinLocked(slot);
      stats_.prefetch_dropped += load->failed.size();
      if (!status.ok()) {
        FailLoadSlotsLocked(load->slots);
        for (SlotId slot : load->slots) UnpinLocked(slot);
        stats_.prefetch_dropped += load->slots.size();
        RecycleLoadLocked(load);
      } else if (load->keys.empty()) {
        RecycleLoadLocked(load);
      } else {
        PublishLocked(*load);
      }
      --prefetch_running_;
      if (prefetch_queue_.empty() && prefetch_running_ == 0) idle_cv_.notify_all();
      loaded_cv_.notify_all();
    }
    Reap();
  }
}

Status DeviceCache::Drain() {
  {
    MutexLock lock(&mu_);
    while (!prefetch_queue_.empty() || prefetch_running_ > 0) idle_cv_.wait(mu_);
  }
  Status status = engine_->Synchronize();
  Reap();
  // Another thread's Reap (the prefetch thread's) may still be returning host pins.
  MutexLock lock(&mu_);
  while (unpinning_ > 0) idle_cv_.wait(mu_);
  return status;
}

// --- Introspection ----------------------------------------------------------------------

bool DeviceCache::Resident(const BlockKey& key) const {
  MutexLock lock(&mu_);
  const SlotId slot = map_->Find(key, slots_);
  return slot != kNone && slots_[slot].state == SlotState::kResident;
}

DeviceCacheStats DeviceCache::stats() const {
  MutexLock lock(&mu_);
  DeviceCacheStats s = stats_;
  s.resident_blocks = resident_;
  s.pinned_slots = pool_->pinned_slots();
  return s;
}

Status DeviceCache::Validate() const {
  MutexLock lock(&mu_);
  KVTIER_RETURN_IF_ERROR(pool_->table().Validate());
  auto fail = [](SlotId slot, const char* what) {
    return Status::Internal("device cache: slot " + std::to_string(slot) + ": " + what);
  };
  std::vector<uint32_t> sizes(groups_.size(), 0);
  uint64_t resident = 0;
  for (SlotId slot = 0; slot < slots_.size(); ++slot) {
    const SlotInfo& s = slots_[slot];
    const bool free = pool_->table().IsFree(slot);
    if (free != (s.state == SlotState::kFree)) return fail(slot, "state disagrees with the table");
    if (free) continue;
    if (s.group >= groups_.size() || groups_[s.group] == nullptr) return fail(slot, "no group");
    ++sizes[s.group];
    const bool mapped = s.state == SlotState::kQueued || s.state == SlotState::kResident ||
                        (s.state == SlotState::kLoading && !s.detached);
    if ((map_->Find(s.key, slots_) == slot) != mapped) return fail(slot, "map disagrees");
    if (s.state == SlotState::kResident) {
      ++resident;
      if (!pool_->IsPublished(slot)) return fail(slot, "resident but not published");
    }
    const bool evictable = s.state == SlotState::kResident && pool_->PinsOf(slot) == 0;
    if (evictable != (s.heap_pos != kNone)) return fail(slot, "heap membership");
    const Group& g = *groups_[s.group];
    if (s.heap_pos != kNone) {
      if (s.heap_pos >= g.heap.size() || g.heap[s.heap_pos] != slot) {
        return fail(slot, "heap position");
      }
      if (s.heap_pos > 0 && HeapLess(slot, g.heap[(s.heap_pos - 1) / 2])) {
        return fail(slot, "heap order");
      }
    }
    if (pool_->PinsOf(slot) == 0 && s.state != SlotState::kResident) {
      return fail(slot, "held but not pinned");
    }
  }
  if (resident != resident_) return Status::Internal("device cache: resident count");
  for (const auto& g : groups_) {
    if (g == nullptr) continue;
    if (g->size != sizes[g->index] || g->size > g->capacity) {
      return Status::Internal("device cache: group " + std::to_string(g->index) + " size");
    }
  }
  return Status::OK();
}

// --- Helpers for the stores that own a cache -------------------------------------------

Status PinHostEach(BlockSource& source, std::span<const BlockKey> keys,
                   std::span<HostBlockRef> blocks, std::span<Status> statuses) {
  const Status all = source.PinHost(keys, blocks);
  for (size_t i = 0; i < keys.size(); ++i) {
    statuses[i] =
        all.ok() || keys.size() == 1 ? all : source.PinHost({&keys[i], 1}, {&blocks[i], 1});
  }
  return all;
}

DeviceCacheOptions DeviceCacheOptionsFor(const RetrievalOptions& r) {
  DeviceCacheOptions o;
  o.policy = r.replacement;
  o.score_decay = r.score_decay;
  o.prefetch = r.prefetch;
  o.force_emulated = r.force_emulated_device;
  o.per_layer_capacity_blocks = r.device_blocks_per_layer;
  return o;
}

void AddDeviceCacheStats(const DeviceCacheStats& c, StoreStats* s) {
  s->device_capacity_bytes = c.capacity_bytes;
  s->device_slots = c.slots;
  s->device_blocks = c.resident_blocks;
  s->device_emulated = c.emulated;
  s->acquires = c.acquires;
  s->acquired_blocks = c.acquired_blocks;
  s->device_hits = c.hits;
  s->device_fetches_host = c.fetches_host;
  s->device_fetches_disk = c.fetches_disk;
  s->device_direct_blocks = c.fetches_direct;
  s->device_bytes_in = c.bytes_in;
  s->device_evictions = c.evictions;
  s->prefetches = c.prefetches;
  s->prefetch_hits = c.prefetch_hits;
  s->acquire_stall_nanos = c.stall_nanos;
}

size_t PrefetchPlanner::LayerKeyHash::operator()(const LayerKey& k) const noexcept {
  return SequenceIdHash{}(k.sequence) ^ (size_t{k.namespace_id} * 0x9E3779B97F4A7C15ull) ^
         (size_t{k.layer} * 0xC2B2AE3D27D4EB4Full);
}

void PrefetchPlanner::NoteAcquired(uint32_t namespace_id, const SequenceId& sequence,
                                   uint32_t layer, std::span<const int64_t> blocks) {
  MutexLock lock(&mu_);
  LayerHistory& h = history_[LayerKey{namespace_id, sequence, layer}];
  h.acquired.assign(blocks.begin(), blocks.end());
}

void PrefetchPlanner::NoteRunnersUp(uint32_t namespace_id, const SequenceId& sequence,
                                    uint32_t layer, std::span<const int64_t> blocks) {
  MutexLock lock(&mu_);
  LayerHistory& h = history_[LayerKey{namespace_id, sequence, layer}];
  h.runners_up.assign(blocks.begin(), blocks.end());
}

void PrefetchPlanner::Forget(uint32_t namespace_id, const SequenceId& sequence) {
  MutexLock lock(&mu_);
  for (uint32_t layer = 0; layer < num_layers_; ++layer) {
    history_.erase(LayerKey{namespace_id, sequence, layer});
  }
}

void PrefetchPlanner::PrefetchAfterAcquire(DeviceCache& cache, uint32_t namespace_id,
                                           const SequenceId& sequence, uint32_t layer) {
  MutexLock lock(&mu_);
  auto it = history_.find(LayerKey{namespace_id, sequence, layer});
  if (it == history_.end()) return;
  if (layer + 1 < num_layers_) {
    scratch_.assign(it->second.acquired.begin(), it->second.acquired.end());
    auto next = history_.find(LayerKey{namespace_id, sequence, layer + 1});
    if (next != history_.end()) {
      scratch_.insert(scratch_.end(), next->second.acquired.begin(), next->second.acquired.end());
    }
    if (!scratch_.empty()) (void)cache.Prefetch(namespace_id, sequence, layer + 1, scratch_);
  }
  if (!it->second.runners_up.empty()) {
    (void)cache.Prefetch(namespace_id, sequence, layer, it->second.runners_up);
  }
}

}  // namespace kvtier
