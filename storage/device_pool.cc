#include "storage/device_pool.h"

#include <string>
#include <utility>

namespace kvtier {
namespace {

constexpr uint64_t kTableEntryBytes = sizeof(uint64_t) + sizeof(int32_t);

std::string Bytes(uint64_t n) { return std::to_string(n) + " bytes"; }

// cudaMalloc of the whole pool on `device`.
Result<std::byte*> AllocateOnDevice(int device, uint64_t bytes) {
  cuda::ScopedDevice scope(device);
  KVTIER_RETURN_IF_ERROR(scope.status());
  KVTIER_ASSIGN_OR_RETURN(cuda::DeviceMemoryInfo info, cuda::MemoryInfo(device));
  const std::string where = "device tier on CUDA device " + std::to_string(device);
  if (bytes > info.total_bytes) {
    return Status::ResourceExhausted(where + ": " + Bytes(bytes) + " exceed the device's " +
                                     Bytes(info.total_bytes) + " of memory");
  }
  void* p = nullptr;
  Status s = cuda::DeviceMalloc(bytes, &p);
  if (!s.ok()) {
    return s.WithContext(where + " (" + Bytes(info.free_bytes) + " were free)");
  }
  return static_cast<std::byte*>(p);
}

}  // namespace

Result<std::unique_ptr<DevicePool>> DevicePool::Create(uint64_t block_bytes,
                                                       uint64_t capacity_bytes,
                                                       const DeviceOptions& options) {
  if (block_bytes == 0) return Status::InvalidArgument("device tier: block size is 0");
  if (block_bytes > UINT64_MAX - kSlotAlignment) {
    return Status::InvalidArgument("device tier: block size too large");
  }
  if (options.device < DeviceOptions::kAutoDevice) {
    return Status::InvalidArgument("device tier: device ordinal " + std::to_string(options.device) +
                                   " is negative");
  }
  const uint64_t slot_bytes = (block_bytes + kSlotAlignment - 1) / kSlotAlignment * kSlotAlignment;
  const uint64_t count = capacity_bytes / slot_bytes;
  if (count == 0) {
    return Status::InvalidArgument("device tier capacity of " + Bytes(capacity_bytes) +
                                   " holds no block slot of " + Bytes(slot_bytes));
  }
  // Block tables carry int32 slot indices.
  if (count > uint64_t{INT32_MAX}) {
    return Status::InvalidArgument("device tier capacity of " + Bytes(capacity_bytes) +
                                   " means more than 2^31 - 1 slots");
  }
  const uint64_t bytes = count * slot_bytes;

  std::string reason;
  if (options.force_emulated) {
    reason = "emulation asked for (DeviceOptions::force_emulated)";
  } else if (!cuda::HasDevice()) {
    reason = cuda::Devices().reason;
  }
  if (reason.empty()) {
    int device = options.device;
    if (device == DeviceOptions::kAutoDevice) {
      KVTIER_ASSIGN_OR_RETURN(device, cuda::CurrentDevice());
    } else if (device >= cuda::Devices().device_count) {
      return Status::InvalidArgument("device tier: CUDA device " + std::to_string(device) +
                                     " does not exist (" +
                                     std::to_string(cuda::Devices().device_count) + " present)");
    }
    KVTIER_ASSIGN_OR_RETURN(std::byte * base, AllocateOnDevice(device, bytes));
    return std::unique_ptr<DevicePool>(new DevicePool(
        device, base, nullptr, nullptr, "", block_bytes, slot_bytes, static_cast<uint32_t>(count)));
  }

  if (options.require_device) {
    return Status::NotSupported("device tier: no usable GPU (" + reason + ")");
  }
  const uint64_t physical = PhysicalMemoryBytes();
  if (physical != 0 && bytes > physical) {
    return Status::ResourceExhausted("emulated device tier of " + Bytes(bytes) +
                                     " exceeds this machine's physical memory (" + Bytes(physical) +
                                     ")");
  }
  std::unique_ptr<HostRegion> region;
  std::unique_ptr<SharedMemory> shared;
  std::byte* base;
  if (options.shareable) {
    KVTIER_ASSIGN_OR_RETURN(shared,
                            SharedMemory::Create(bytes, "kvtier-device-tier", /*populate=*/true));
    base = shared->data();
  } else {
    KVTIER_ASSIGN_OR_RETURN(region, HostRegion::Allocate(bytes, HostMemoryKind::kPlain));
    base = region->data();
  }
  return std::unique_ptr<DevicePool>(new DevicePool(-1, base, std::move(region), std::move(shared),
                                                    std::move(reason), block_bytes, slot_bytes,
                                                    static_cast<uint32_t>(count)));
}

DevicePool::DevicePool(int device, std::byte* base, std::unique_ptr<HostRegion> region,
                       std::unique_ptr<SharedMemory> shared, std::string emulation_reason,
                       uint64_t block_bytes, uint64_t slot_bytes, uint32_t count)
    : device_(device),
      base_(base),
      region_(std::move(region)),
      shared_(std::move(shared)),
      emulation_reason_(std::move(emulation_reason)),
      block_bytes_(block_bytes),
      slot_bytes_(slot_bytes),
      slot_count_(count),
      table_(count, "device tier") {}

DevicePool::~DevicePool() {
  if (emulated()) return;  // region_ or shared_ frees itself
  cuda::ScopedDevice scope(device_);
  (void)cuda::DeviceFree(base_);
}

Result<std::unique_ptr<BlockTable>> DevicePool::NewBlockTable(uint32_t capacity) const {
  if (capacity == 0 || capacity > slot_count_) {
    return Status::InvalidArgument("block table of " + std::to_string(capacity) +
                                   " entries for a device tier of " + std::to_string(slot_count_) +
                                   " slots");
  }
  auto table = std::unique_ptr<BlockTable>(new BlockTable(this, capacity));
  const uint64_t bytes = uint64_t{capacity} * kTableEntryBytes;
  std::byte* memory = nullptr;
  if (emulated()) {
    table->emulated_ = std::make_unique<std::byte[]>(bytes);
    memory = table->emulated_.get();
  } else {
    cuda::ScopedDevice scope(device_);
    KVTIER_RETURN_IF_ERROR(scope.status());
    void* device_memory = nullptr;
    KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(bytes, &device_memory).WithContext("block table"));
    memory = static_cast<std::byte*>(device_memory);
    table->addresses_ = reinterpret_cast<uint64_t*>(memory);  // owned from here on
    void* staging = nullptr;
    KVTIER_RETURN_IF_ERROR(cuda::HostAlloc(bytes, &staging).WithContext("block table staging"));
    table->staging_ = static_cast<std::byte*>(staging);
    KVTIER_ASSIGN_OR_RETURN(table->uploaded_, cuda::Event::Create());
  }
  table->addresses_ = reinterpret_cast<uint64_t*>(memory);
  table->indices_ = reinterpret_cast<int32_t*>(memory + uint64_t{capacity} * sizeof(uint64_t));
  return table;
}

Status DevicePool::UploadBlockTable(std::span<const SlotId> slots, BlockTable* table,
                                    StreamHandle stream) const {
  if (table == nullptr || table->pool_ != this) {
    return Status::InvalidArgument("block table upload: the table belongs to another pool");
  }
  if (slots.size() > table->capacity_) {
    return Status::InvalidArgument("block table upload: " + std::to_string(slots.size()) +
                                   " slots for a table of " + std::to_string(table->capacity_) +
                                   " entries");
  }
  for (SlotId slot : slots) {
    if (slot >= slot_count_) {
      return Status::InvalidArgument("block table upload: slot " + std::to_string(slot) +
                                     " of a device tier of " + std::to_string(slot_count_) +
                                     " slots");
    }
  }
  const uint64_t n = slots.size();
  if (emulated()) {
    for (uint64_t i = 0; i < n; ++i) {
      table->addresses_[i] = reinterpret_cast<uintptr_t>(SlotData(slots[i]));
      table->indices_[i] = static_cast<int32_t>(slots[i]);
    }
    table->size_ = static_cast<uint32_t>(n);
    return Status::OK();
  }

  cuda::ScopedDevice scope(device_);
  KVTIER_RETURN_IF_ERROR(scope.status());
  // The previous upload's copies must have read the staging buffer before it changes.
  KVTIER_RETURN_IF_ERROR(table->uploaded_.Synchronize());
  auto* addresses = reinterpret_cast<uint64_t*>(table->staging_);
  auto* indices =
      reinterpret_cast<int32_t*>(table->staging_ + uint64_t{table->capacity_} * sizeof(uint64_t));
  for (uint64_t i = 0; i < n; ++i) {
    addresses[i] = reinterpret_cast<uintptr_t>(SlotData(slots[i]));
    indices[i] = static_cast<int32_t>(slots[i]);
  }
  table->size_ = 0;
  if (n > 0) {
    KVTIER_RETURN_IF_ERROR(
        cuda::MemcpyAsync(table->addresses_, addresses, n * sizeof(uint64_t), stream));
    KVTIER_RETURN_IF_ERROR(
        cuda::MemcpyAsync(table->indices_, indices, n * sizeof(int32_t), stream));
  }
  KVTIER_RETURN_IF_ERROR(table->uploaded_.Record(stream));
  table->size_ = static_cast<uint32_t>(n);
  return Status::OK();
}

BlockTable::~BlockTable() {
  if (pool_->emulated()) return;
  cuda::ScopedDevice scope(pool_->device());
  (void)uploaded_.Synchronize();  // no copy may still read the staging buffer
  uploaded_ = cuda::Event();
  (void)cuda::DeviceFree(addresses_);
  if (staging_ != nullptr) (void)cuda::HostFree(staging_);
}

}  // namespace kvtier
