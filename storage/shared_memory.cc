#include "storage/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace kvtier {

Result<std::unique_ptr<SharedMemory>> SharedMemory::Create(uint64_t bytes, const char* name,
                                                           bool populate) {
  if (bytes == 0) return Status::InvalidArgument("shared memory of 0 bytes");
  const int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return Status::FromErrno(errno, "memfd_create");
  auto fail = [fd](const std::string& what) {
    const int err = errno;
    ::close(fd);
    return Status::FromErrno(err, what);
  };
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    return fail("ftruncate of a memfd to " + std::to_string(bytes) + " bytes");
  }
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return fail("fcntl(F_ADD_SEALS)");
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | (populate ? MAP_POPULATE : 0),
                 fd, 0);
  if (p == MAP_FAILED) return fail("mmap of a memfd of " + std::to_string(bytes) + " bytes");
  return std::unique_ptr<SharedMemory>(new SharedMemory(fd, static_cast<std::byte*>(p), bytes));
}

SharedMemory::~SharedMemory() {
  munmap(data_, size_);
  CloseFd();
}

void SharedMemory::CloseFd() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

}  // namespace kvtier
