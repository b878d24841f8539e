#include "src/server/staging_area.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

namespace kvtier::server {

kvtier::Result<std::shared_ptr<StagingArea>> StagingArea::Create(uint32_t slots,
                                                                 uint64_t slot_bytes,
                                                                 const char* name) {
  if (slots == 0 || slot_bytes == 0 || slot_bytes % 4096 != 0 ||
      slot_bytes > (uint64_t{1} << 40) / slots) {
    return Status::InvalidArgument("bad staging area size");
  }
  const uint64_t bytes = uint64_t{slots} * slot_bytes;
  const int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return Status::FromErrno(errno, "memfd_create");
  auto fail = [fd](const char* what) {
    const int err = errno;
    ::close(fd);
    return Status::FromErrno(err, what);
  };
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("ftruncate(staging memfd)");
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return fail("fcntl(F_ADD_SEALS)");
  }
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return fail("mmap(staging memfd)");
  return std::shared_ptr<StagingArea>(
      new StagingArea(fd, static_cast<uint8_t*>(base), slots, slot_bytes));
}

StagingArea::StagingArea(int fd, uint8_t* base, uint32_t slots, uint64_t slot_bytes)
    : fd_(fd), base_(base), slots_(slots), slot_bytes_(slot_bytes) {}

StagingArea::~StagingArea() {
  munmap(base_, size_bytes());
  CloseFd();
}

void StagingArea::CloseFd() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

}  // namespace kvtier::server
