// DevicePool: the device (GPU, hot) tier's block slots. One cudaMalloc, made once, cut
// into `slot_count()` slots of `slot_bytes()` bytes, with the bookkeeping of a SlotTable
// (free list, pins, clean and dirty LRU lists; the life cycle Allocate, Publish,
// MarkClean, Pin, Unpin, Retire is documented in storage/slot_table.h). HostPool is the
// same table over host memory, so policies and tests run unchanged on either.
//
// Slots: the block size rounded up to kSlotAlignment (256 bytes: what cudaMalloc
// guarantees for its base, enough for 128-bit vector loads and whole 32-byte memory
// sectors, while wasting at most 255 bytes per slot; a 512 KiB Llama block fills its
// slot exactly). Slot i occupies [base() + i * slot_bytes(), + block_bytes()).
//
// Emulated device: without a usable GPU (no CUDA in this build, no device, or
// DeviceOptions::force_emulated), the pool lives in host memory (a HostRegion of plain
// memory) behind the same interface, with the same slot sizes and counts, so every
// policy and test above it runs in CI. emulated() says which; emulation_reason() why.
// Emulated "device" pointers are host pointers: CPU references of the kernels can read
// them directly.
//
// Block tables: a paged-attention kernel reads the slots of its blocks from a block
// table in device memory. NewBlockTable() makes one (a caller-owned object, so that the
// tables of several layers or steps can be in flight at once); UploadBlockTable() fills
// it for a list of slots on a stream. Both formats are written, so a kernel picks
// whichever it takes:
//   addresses()  uint64_t per entry: the address of the slot's first byte;
//   indices()    int32_t per entry: the SlotId; address = base() + index * slot_bytes().
// Emulated, the table lives in host memory and the upload is a plain write.
//
// Copies between host memory and the slots go through a CopyEngine
// (storage/copy_engine.h): dedicated streams, batched submissions, events, and pins
// held while a copy is in flight.
//
// Thread safety: the const accessors, SlotData(), NewBlockTable() and UploadBlockTable()
// (one table at a time per thread) may be called from any thread. The slot operations
// (Allocate ... evictable_slots, table()) must be called with one lock held by the
// caller (the Store's); the pool does no locking of its own.
#ifndef KVTIER_STORAGE_DEVICE_POOL_H_
#define KVTIER_STORAGE_DEVICE_POOL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/host_device.h"
#include "kvtier/block_key.h"
#include "kvtier/status.h"
#include "storage/host_region.h"
#include "storage/shared_memory.h"
#include "storage/slot_table.h"

namespace kvtier {

struct DeviceOptions {
  static constexpr int kAutoDevice = -1;

  // The CUDA device that holds the pool; kAutoDevice: the calling thread's current
  // device (device 0 unless the caller chose another). An ordinal that does not exist
  // is InvalidArgument when a GPU is present.
  // Default: kAutoDevice.
  int device = kAutoDevice;
  // Keep the pool in host memory even when a GPU is present (tests; a GPU reserved for
  // compute).
  // Default: false.
  bool force_emulated = false;
  // Fail with NotSupported instead of emulating when there is no usable GPU.
  // Default: false.
  bool require_device = false;
  // Emulated: allocate the pool in shared memory (a sealed memfd, memfd()) so that
  // another process can map it and copy blocks in (a kvtierd client's GPU tier).
  // Ignored on a GPU (CUDA IPC shares device memory). Default: false.
  bool shareable = false;
};

class DevicePool;

// A block table in device memory (host memory when the pool is emulated), written by
// DevicePool::UploadBlockTable. Entries [0, size()) are valid once the upload's stream
// work has run. Must not outlive its pool.
class BlockTable {
 public:
  ~BlockTable();
  BlockTable(const BlockTable&) = delete;
  BlockTable& operator=(const BlockTable&) = delete;

  uint32_t capacity() const { return capacity_; }
  // Entries written by the last upload.
  uint32_t size() const { return size_; }
  // capacity() entries each: slot addresses, and slot indices relative to the pool's
  // base() (see the file comment).
  const uint64_t* addresses() const { return addresses_; }
  const int32_t* indices() const { return indices_; }

 private:
  friend class DevicePool;
  BlockTable(const DevicePool* pool, uint32_t capacity) : pool_(pool), capacity_(capacity) {}

  const DevicePool* pool_;
  uint32_t capacity_;
  uint32_t size_ = 0;
  uint64_t* addresses_ = nullptr;  // device memory: capacity_ addresses, then
  int32_t* indices_ = nullptr;     // capacity_ indices (one allocation)
  // The host side of an upload: pinned staging with a GPU (same layout), or the table
  // itself when emulated.
  std::unique_ptr<std::byte[]> emulated_;
  std::byte* staging_ = nullptr;
  cuda::Event uploaded_;  // after the last upload's copies: staging may be rewritten
};

class DevicePool {
 public:
  static constexpr uint64_t kSlotAlignment = 256;

  // A pool of floor(capacity_bytes / slot_bytes) slots for blocks of `block_bytes`, on
  // the GPU that `options` names, else emulated (see the file comment). Errors:
  // InvalidArgument (zero block or capacity, capacity below one slot, more than
  // 2^31 - 1 slots, a device ordinal that does not exist); ResourceExhausted (more than
  // the device's total memory, or than the machine's when emulated; cudaMalloc failing);
  // NotSupported (no usable GPU and options.require_device); the driver's other errors.
  static Result<std::unique_ptr<DevicePool>> Create(uint64_t block_bytes, uint64_t capacity_bytes,
                                                    const DeviceOptions& options = {});

  ~DevicePool();
  DevicePool(const DevicePool&) = delete;
  DevicePool& operator=(const DevicePool&) = delete;

  bool emulated() const { return device_ < 0; }
  // Empty on a GPU; else why the pool is emulated.
  const std::string& emulation_reason() const { return emulation_reason_; }
  // The CUDA device ordinal; -1 when emulated.
  int device() const { return device_; }

  uint64_t block_bytes() const { return block_bytes_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  uint32_t slot_count() const { return slot_count_; }
  uint64_t capacity_bytes() const { return uint64_t{slot_count_} * slot_bytes_; }
  // The first slot's first byte: device memory (host memory when emulated).
  std::byte* base() const { return base_; }
  // Emulated with DeviceOptions::shareable: the memfd holding the pool (base() is its
  // first byte; it holds capacity_bytes() at least); else -1.
  int memfd() const { return shared_ != nullptr ? shared_->fd() : -1; }
  // Slot `slot`'s first byte; dereference on the host only when emulated.
  std::byte* SlotData(SlotId slot) const { return base_ + slot * slot_bytes_; }

  // A block table of `capacity` entries (1..slot_count()) for this pool.
  Result<std::unique_ptr<BlockTable>> NewBlockTable(uint32_t capacity) const;
  // Writes the addresses and indices of `slots` (in order) into entries [0, n) of
  // `table`, asynchronously on `stream` (a stream of this pool's device; nullptr is the
  // default stream); emulated, at once. The slots must stay allocated (pinned) while a
  // kernel reads the table; an upload waits for the previous upload of the same table
  // to have left its staging buffer, and must be ordered (same stream, or an event)
  // after the kernels that read the previous contents. Errors: InvalidArgument (a table
  // of another pool, more slots than its capacity, a slot id out of range), the
  // driver's.
  Status UploadBlockTable(std::span<const SlotId> slots, BlockTable* table,
                          StreamHandle stream) const;

  // The bookkeeping itself (caller's lock).
  SlotTable& table() { return table_; }
  const SlotTable& table() const { return table_; }

  // SlotTable's operations (caller's lock): see storage/slot_table.h.
  std::optional<SlotId> Allocate() { return table_.Allocate(); }
  void Publish(SlotId slot, const BlockKey& key, bool dirty = false) {
    table_.Publish(slot, key, dirty);
  }
  void MarkClean(SlotId slot) { table_.MarkClean(slot); }
  void Pin(SlotId slot) { table_.Pin(slot); }
  void Unpin(SlotId slot) { table_.Unpin(slot); }
  void Retire(SlotId slot) { table_.Retire(slot); }
  std::optional<SlotId> LruVictim() const { return table_.LruVictim(); }
  std::optional<SlotId> DirtyLruOldest() const { return table_.DirtyLruOldest(); }
  const BlockKey& KeyOf(SlotId slot) const { return table_.KeyOf(slot); }
  bool IsPublished(SlotId slot) const { return table_.IsPublished(slot); }
  bool IsDirty(SlotId slot) const { return table_.IsDirty(slot); }
  uint32_t PinsOf(SlotId slot) const { return table_.PinsOf(slot); }
  uint32_t free_slots() const { return table_.free_slots(); }
  uint32_t published_slots() const { return table_.published_slots(); }
  uint32_t pinned_slots() const { return table_.pinned_slots(); }
  uint32_t dirty_slots() const { return table_.dirty_slots(); }
  uint32_t evictable_slots() const { return table_.evictable_slots(); }

 private:
  DevicePool(int device, std::byte* base, std::unique_ptr<HostRegion> region,
             std::unique_ptr<SharedMemory> shared, std::string emulation_reason,
             uint64_t block_bytes, uint64_t slot_bytes, uint32_t count);

  const int device_;                      // -1: emulated
  std::byte* const base_;                 // cudaMalloc'd, or region_->data()
  std::unique_ptr<HostRegion> region_;    // the emulated device's memory, or
  std::unique_ptr<SharedMemory> shared_;  // ... when shareable
  const std::string emulation_reason_;
  const uint64_t block_bytes_;
  const uint64_t slot_bytes_;
  const uint32_t slot_count_;
  SlotTable table_;
};

}  // namespace kvtier

#endif  // KVTIER_STORAGE_DEVICE_POOL_H_
