#include "src/server/staging_area.h"

namespace kvtier::server {

kvtier::Result<std::shared_ptr<StagingArea>> StagingArea::Create(uint32_t slots,
                                                                 uint64_t slot_bytes,
                                                                 const char* name) {
  if (slots == 0 || slot_bytes == 0 || slot_bytes % 4096 != 0 ||
      slot_bytes > (uint64_t{1} << 40) / slots) {
    return Status::InvalidArgument("bad staging area size");
  }
  KVTIER_ASSIGN_OR_RETURN(
      std::unique_ptr<SharedMemory> memory,
      SharedMemory::Create(uint64_t{slots} * slot_bytes, name, /*populate=*/false));
  return std::shared_ptr<StagingArea>(new StagingArea(std::move(memory), slots, slot_bytes));
}

}  // namespace kvtier::server
