#include "storage/host_pool.h"

#include <string>

namespace kvtier {

Result<std::unique_ptr<HostPool>> HostPool::Create(uint64_t block_bytes, uint64_t capacity_bytes,
                                                   HostMemoryKind memory) {
  if (block_bytes == 0) return Status::InvalidArgument("host tier: block size is 0");
  if (block_bytes > UINT64_MAX - kSlotAlignment) {
    return Status::InvalidArgument("host tier: block size too large");
  }
  const uint64_t slot_bytes = (block_bytes + kSlotAlignment - 1) / kSlotAlignment * kSlotAlignment;
  const uint64_t count = capacity_bytes / slot_bytes;
  if (count == 0) {
    return Status::InvalidArgument("host tier capacity of " + std::to_string(capacity_bytes) +
                                   " bytes holds no block slot of " + std::to_string(slot_bytes) +
                                   " bytes");
  }
  KVTIER_RETURN_IF_ERROR(CheckFitsInMemory(count * slot_bytes));
  if (count > SlotTable::kMaxSlots) {
    return Status::InvalidArgument("host tier capacity of " + std::to_string(capacity_bytes) +
                                   " bytes means more than 2^32 - 2 slots");
  }
  KVTIER_ASSIGN_OR_RETURN(auto region, HostRegion::Allocate(count * slot_bytes, memory));
  return std::unique_ptr<HostPool>(
      new HostPool(std::move(region), block_bytes, slot_bytes, static_cast<uint32_t>(count)));
}

HostPool::HostPool(std::unique_ptr<HostRegion> region, uint64_t block_bytes, uint64_t slot_bytes,
                   uint32_t count)
    : region_(std::move(region)),
      block_bytes_(block_bytes),
      slot_bytes_(slot_bytes),
      slot_count_(count),
      table_(count, "host tier") {}

}  // namespace kvtier
