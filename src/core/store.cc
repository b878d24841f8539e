#include "kvtier/store.h"

#include <spdlog/spdlog.h>

#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "src/core/block_index.h"
#include "src/core/worker_pool.h"
#include "src/util/mutex.h"
#include "storage/host_pool.h"

namespace kvtier {

// Locking: one mutex guards the index, the pool's bookkeeping and the counters. It is
// never held while block bytes are copied: an operation pins its slots under the lock,
// copies without it, then commits or unpins under the lock again.
struct Store::Impl {
  Impl(const StoreOptions& o, const ModelLayout& l, std::unique_ptr<HostPool> p)
      : options(o), layout(l), block_bytes(l.BytesPerBlock()), pool(std::move(p)) {}

  Status CheckKey(const BlockKey& key) const;
  Status CheckBuffer(const void* data, uint64_t bytes) const;

  // Write path. Reserve: a slot for one block (evicting the LRU block if needed).
  Result<SlotId> ReserveLocked() KVTIER_REQUIRES(mu);
  void CommitLocked(const BlockKey& key, SlotId slot) KVTIER_REQUIRES(mu);
  // Read path. Pin: the slot holding `key`, pinned, or NotFound.
  Result<SlotId> PinLocked(const BlockKey& key) KVTIER_REQUIRES(mu);
  void RemoveLocked(BlockIndex::Entry* entry) KVTIER_REQUIRES(mu);

  Status Put(const BlockKey& key, const void* data, uint64_t bytes);
  Status Get(const BlockKey& key, void* data, uint64_t bytes);
  Status PutBatch(std::span<const BlockWrite> writes, std::span<Status> statuses);
  Status GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses);

  const StoreOptions options;
  const ModelLayout layout;
  const uint64_t block_bytes;

  mutable Mutex mu;
  const std::unique_ptr<HostPool> pool KVTIER_PT_GUARDED_BY(mu);
  BlockIndex index KVTIER_GUARDED_BY(mu);
  StoreStats stats KVTIER_GUARDED_BY(mu);

  // Declared last: destroyed first, so queued work finishes while the rest lives.
  std::unique_ptr<WorkerPool> workers;
};

namespace {

Status FirstFailure(std::span<const Status> statuses) {
  for (const Status& s : statuses) {
    if (!s.ok()) return s;
  }
  return Status::OK();
}

}  // namespace

Status Store::Impl::CheckKey(const BlockKey& key) const {
  if (key.layer >= layout.num_layers) {
    return Status::InvalidArgument("block " + key.ToString() + ": layer " +
                                   std::to_string(key.layer) + " outside the layout's " +
                                   std::to_string(layout.num_layers) + " layers");
  }
  return Status::OK();
}

Status Store::Impl::CheckBuffer(const void* data, uint64_t bytes) const {
  if (data == nullptr) return Status::InvalidArgument("null block buffer");
  if (bytes != block_bytes) {
    return Status::InvalidArgument("block buffer of " + std::to_string(bytes) +
                                   " bytes; this store's blocks are " +
                                   std::to_string(block_bytes) + " bytes");
  }
  return Status::OK();
}

Result<SlotId> Store::Impl::ReserveLocked() {
  if (std::optional<SlotId> slot = pool->Allocate()) return *slot;
  std::optional<SlotId> victim = pool->LruVictim();
  if (!victim) {
    ++stats.busy_rejections;
    return Status::Busy("every one of the host tier's " + std::to_string(pool->slot_count()) +
                        " slots is in use by an operation in flight");
  }
  // No lower tier yet: the evicted block is lost, and counted.
  BlockIndex::Entry* entry = index.Find(pool->KeyOf(*victim));
  RemoveLocked(entry);
  ++stats.evictions;
  ++stats.evictions_lost;
  return *pool->Allocate();  // the victim's slot was freed by RemoveLocked
}

void Store::Impl::CommitLocked(const BlockKey& key, SlotId slot) {
  auto [entry, created] = index.Insert(key);
  if (!created && entry->host_slot != BlockIndex::kNoSlot) pool->Retire(entry->host_slot);
  entry->host_slot = slot;
  pool->Publish(slot, key);
  pool->Unpin(slot);
  ++stats.puts;
  stats.bytes_put += block_bytes;
}

Result<SlotId> Store::Impl::PinLocked(const BlockKey& key) {
  BlockIndex::Entry* entry = index.Find(key);
  if (entry == nullptr || entry->host_slot == BlockIndex::kNoSlot) {
    ++stats.get_misses;
    return Status::NotFound("block " + key.ToString() + " is not in the store");
  }
  pool->Pin(entry->host_slot);
  return entry->host_slot;
}

void Store::Impl::RemoveLocked(BlockIndex::Entry* entry) {
  if (entry->host_slot != BlockIndex::kNoSlot) pool->Retire(entry->host_slot);
  index.Erase(entry);
}

Status Store::Impl::Put(const BlockKey& key, const void* data, uint64_t bytes) {
  KVTIER_RETURN_IF_ERROR(CheckKey(key));
  KVTIER_RETURN_IF_ERROR(CheckBuffer(data, bytes));
  SlotId slot;
  {
    MutexLock lock(&mu);
    KVTIER_ASSIGN_OR_RETURN(slot, ReserveLocked());
  }
  std::memcpy(pool->SlotData(slot), data, bytes);
  MutexLock lock(&mu);
  CommitLocked(key, slot);
  return Status::OK();
}

Status Store::Impl::Get(const BlockKey& key, void* data, uint64_t bytes) {
  KVTIER_RETURN_IF_ERROR(CheckKey(key));
  KVTIER_RETURN_IF_ERROR(CheckBuffer(data, bytes));
  SlotId slot;
  {
    MutexLock lock(&mu);
    KVTIER_ASSIGN_OR_RETURN(slot, PinLocked(key));
  }
  std::memcpy(data, pool->SlotData(slot), bytes);
  MutexLock lock(&mu);
  pool->Unpin(slot);
  ++stats.gets;
  stats.bytes_got += bytes;
  return Status::OK();
}

Status Store::Impl::PutBatch(std::span<const BlockWrite> writes, std::span<Status> statuses) {
  if (statuses.size() != writes.size()) {
    return Status::InvalidArgument("PutBatch: " + std::to_string(statuses.size()) +
                                   " statuses for " + std::to_string(writes.size()) + " writes");
  }
  constexpr SlotId kNoSlot = BlockIndex::kNoSlot;
  // Small batches (one decode step's layers) need no allocation.
  constexpr size_t kInline = 64;
  SlotId inline_slots[kInline];
  std::vector<SlotId> heap_slots;
  SlotId* slots = inline_slots;
  if (writes.size() > kInline) {
    heap_slots.resize(writes.size());
    slots = heap_slots.data();
  }
  for (size_t i = 0; i < writes.size(); ++i) {
    slots[i] = kNoSlot;
    statuses[i] = CheckKey(writes[i].key);
    if (statuses[i].ok()) statuses[i] = CheckBuffer(writes[i].data, writes[i].bytes);
  }
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < writes.size(); ++i) {
      if (!statuses[i].ok()) continue;
      Result<SlotId> slot = ReserveLocked();
      if (slot.ok()) {
        slots[i] = *slot;
      } else {
        statuses[i] = slot.status();
      }
    }
  }
  for (size_t i = 0; i < writes.size(); ++i) {
    if (slots[i] != kNoSlot) std::memcpy(pool->SlotData(slots[i]), writes[i].data, block_bytes);
  }
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < writes.size(); ++i) {
      if (slots[i] != kNoSlot) CommitLocked(writes[i].key, slots[i]);
    }
  }
  return FirstFailure(statuses);
}

Status Store::Impl::GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses) {
  if (statuses.size() != reads.size()) {
    return Status::InvalidArgument("GetBatch: " + std::to_string(statuses.size()) +
                                   " statuses for " + std::to_string(reads.size()) + " reads");
  }
  constexpr SlotId kNoSlot = BlockIndex::kNoSlot;
  constexpr size_t kInline = 64;
  SlotId inline_slots[kInline];
  std::vector<SlotId> heap_slots;
  SlotId* slots = inline_slots;
  if (reads.size() > kInline) {
    heap_slots.resize(reads.size());
    slots = heap_slots.data();
  }
  for (size_t i = 0; i < reads.size(); ++i) {
    slots[i] = kNoSlot;
    statuses[i] = CheckKey(reads[i].key);
    if (statuses[i].ok()) statuses[i] = CheckBuffer(reads[i].data, reads[i].bytes);
  }
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < reads.size(); ++i) {
      if (!statuses[i].ok()) continue;
      Result<SlotId> slot = PinLocked(reads[i].key);
      if (slot.ok()) {
        slots[i] = *slot;
      } else {
        statuses[i] = slot.status();
      }
    }
  }
  for (size_t i = 0; i < reads.size(); ++i) {
    if (slots[i] != kNoSlot) std::memcpy(reads[i].data, pool->SlotData(slots[i]), block_bytes);
  }
  {
    MutexLock lock(&mu);
    for (size_t i = 0; i < reads.size(); ++i) {
      if (slots[i] == kNoSlot) continue;
      pool->Unpin(slots[i]);
      ++stats.gets;
      stats.bytes_got += block_bytes;
    }
  }
  return FirstFailure(statuses);
}

// --- Store ---------------------------------------------------------------------------

Result<std::unique_ptr<Store>> Store::Open(const StoreOptions& options, const ModelLayout& layout) {
  KVTIER_RETURN_IF_ERROR(layout.Validate());
  if (options.async_threads == 0 || options.async_threads > 1024) {
    return Status::InvalidArgument("async_threads must be in [1, 1024], got " +
                                   std::to_string(options.async_threads));
  }
  if (options.host_memory > HostMemoryKind::kPlain) {
    return Status::InvalidArgument("unknown host_memory kind " +
                                   std::to_string(static_cast<int>(options.host_memory)));
  }
  KVTIER_ASSIGN_OR_RETURN(
      auto pool,
      HostPool::Create(layout.BytesPerBlock(), options.host_capacity_bytes, options.host_memory));
  if (!pool->region().fallback_reason().empty()) {
    spdlog::warn("kvtier: host tier is {} memory: {}", HostMemoryKindName(pool->region().kind()),
                 pool->region().fallback_reason());
  }
  auto impl = std::make_unique<Impl>(options, layout, std::move(pool));
  impl->workers = std::make_unique<WorkerPool>(options.async_threads);
  return std::unique_ptr<Store>(new Store(std::move(impl)));
}

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() {
  impl_->workers.reset();  // runs what was submitted while everything else still lives
}

const ModelLayout& Store::layout() const { return impl_->layout; }
const StoreOptions& Store::options() const { return impl_->options; }
uint64_t Store::block_bytes() const { return impl_->block_bytes; }

Status Store::Put(const BlockKey& key, const void* data, uint64_t bytes) {
  return impl_->Put(key, data, bytes);
}

Status Store::Get(const BlockKey& key, void* data, uint64_t bytes) {
  return impl_->Get(key, data, bytes);
}

bool Store::Contains(const BlockKey& key) const {
  MutexLock lock(&impl_->mu);
  const BlockIndex::Entry* entry = impl_->index.Find(key);
  return entry != nullptr && entry->host_slot != BlockIndex::kNoSlot;
}

Status Store::Delete(const BlockKey& key) {
  MutexLock lock(&impl_->mu);
  BlockIndex::Entry* entry = impl_->index.Find(key);
  if (entry == nullptr) return Status::NotFound("block " + key.ToString() + " is not in the store");
  impl_->RemoveLocked(entry);
  ++impl_->stats.deletes;
  return Status::OK();
}

Result<uint64_t> Store::DropSequence(uint32_t namespace_id, const SequenceId& sequence) {
  Impl& d = *impl_;
  MutexLock lock(&d.mu);
  uint64_t n = d.index.EraseSequence(namespace_id, sequence, [&d](BlockIndex::Entry& e) {
    if (e.host_slot != BlockIndex::kNoSlot) d.pool->Retire(e.host_slot);
  });
  if (n > 0) {
    ++d.stats.dropped_sequences;
    d.stats.dropped_blocks += n;
  }
  return n;
}

StoreStats Store::Stats() const {
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
  return s;
}

Status Store::PutBatch(std::span<const BlockWrite> writes, std::span<Status> statuses) {
  return impl_->PutBatch(writes, statuses);
}

Status Store::GetBatch(std::span<const BlockRead> reads, std::span<Status> statuses) {
  return impl_->GetBatch(reads, statuses);
}

// --- Asynchronous forms: the synchronous call, run on a worker thread -----------------

namespace {

// Runs `op` on `workers`, handing its Status to `done`.
template <typename Op>
void RunAsync(WorkerPool& workers, Op op, Store::Completion done) {
  workers.Submit([op = std::move(op), done = std::move(done)]() mutable { done(op()); });
}

template <typename Op>
std::future<Status> RunAsyncFuture(WorkerPool& workers, Op op) {
  auto promise = std::make_shared<std::promise<Status>>();
  std::future<Status> future = promise->get_future();
  workers.Submit(
      [op = std::move(op), promise = std::move(promise)]() mutable { promise->set_value(op()); });
  return future;
}

}  // namespace

void Store::PutAsync(const BlockKey& key, const void* data, uint64_t bytes, Completion done) {
  RunAsync(
      *impl_->workers, [this, key, data, bytes] { return Put(key, data, bytes); }, std::move(done));
}

std::future<Status> Store::PutAsync(const BlockKey& key, const void* data, uint64_t bytes) {
  return RunAsyncFuture(*impl_->workers,
                        [this, key, data, bytes] { return Put(key, data, bytes); });
}

void Store::GetAsync(const BlockKey& key, void* data, uint64_t bytes, Completion done) {
  RunAsync(
      *impl_->workers, [this, key, data, bytes] { return Get(key, data, bytes); }, std::move(done));
}

std::future<Status> Store::GetAsync(const BlockKey& key, void* data, uint64_t bytes) {
  return RunAsyncFuture(*impl_->workers,
                        [this, key, data, bytes] { return Get(key, data, bytes); });
}

void Store::PutBatchAsync(std::span<const BlockWrite> writes, std::span<Status> statuses,
                          Completion done) {
  RunAsync(
      *impl_->workers, [this, writes, statuses] { return PutBatch(writes, statuses); },
      std::move(done));
}

std::future<Status> Store::PutBatchAsync(std::span<const BlockWrite> writes,
                                         std::span<Status> statuses) {
  return RunAsyncFuture(*impl_->workers,
                        [this, writes, statuses] { return PutBatch(writes, statuses); });
}

void Store::GetBatchAsync(std::span<const BlockRead> reads, std::span<Status> statuses,
                          Completion done) {
  RunAsync(
      *impl_->workers, [this, reads, statuses] { return GetBatch(reads, statuses); },
      std::move(done));
}

std::future<Status> Store::GetBatchAsync(std::span<const BlockRead> reads,
                                         std::span<Status> statuses) {
  return RunAsyncFuture(*impl_->workers,
                        [this, reads, statuses] { return GetBatch(reads, statuses); });
}

}  // namespace kvtier
