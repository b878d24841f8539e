#include "src/server/device_mapping.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace kvtier::server {

namespace {

Status CheckSize(uint64_t bytes, uint64_t block_bytes) {
  if (block_bytes == 0 || bytes < block_bytes) {
    return Status::InvalidArgument("a device pool of " + std::to_string(bytes) +
                                   " bytes is smaller than one block (" +
                                   std::to_string(block_bytes) + " bytes)");
  }
  return Status::OK();
}

}  // namespace

Result<std::shared_ptr<DeviceMapping>> DeviceMapping::MapMemfd(int fd, uint64_t bytes,
                                                               uint64_t block_bytes) {
  KVTIER_RETURN_IF_ERROR(CheckSize(bytes, block_bytes));
  if (fd < 0) return Status::InvalidArgument("an emulated device pool needs its memfd");
  const int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    // EINVAL: not a memfd (or one made without MFD_ALLOW_SEALING); it cannot be sealed.
    if (errno == EINVAL) return Status::InvalidArgument("the device pool's fd is not a memfd");
    return Status::FromErrno(errno, "fcntl(F_GET_SEALS)");
  }
  if ((seals & F_SEAL_SHRINK) == 0) {
    // Unsealed, the client could truncate the file under the daemon's mapping (SIGBUS).
    return Status::InvalidArgument("the device pool's memfd is not sealed with F_SEAL_SHRINK");
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) return Status::FromErrno(errno, "fstat(device pool memfd)");
  if (static_cast<uint64_t>(st.st_size) < bytes) {
    return Status::InvalidArgument("the device pool's memfd holds " + std::to_string(st.st_size) +
                                   " bytes, fewer than the " + std::to_string(bytes) +
                                   " registered");
  }
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return Status::FromErrno(errno, "mmap(device pool memfd)");
  return std::shared_ptr<DeviceMapping>(
      new DeviceMapping(Kind::kEmulated, static_cast<uint8_t*>(base), bytes));
}

Result<std::shared_ptr<DeviceMapping>> DeviceMapping::OpenCuda(
    std::span<const uint8_t, 16> gpu_uuid, std::span<const uint8_t, 64> ipc_handle, uint64_t bytes,
    uint64_t block_bytes) {
  KVTIER_RETURN_IF_ERROR(CheckSize(bytes, block_bytes));
  KVTIER_ASSIGN_OR_RETURN(const int device, cuda::DeviceWithUuid(gpu_uuid));
  cuda::ScopedDevice scope(device);
  KVTIER_RETURN_IF_ERROR(scope.status());
  KVTIER_ASSIGN_OR_RETURN(cuda::Stream stream, cuda::Stream::Create());
  KVTIER_ASSIGN_OR_RETURN(void* base, cuda::IpcOpenMemHandle(ipc_handle));
  // The client's claim of the size is checked against the driver's: a copy past the
  // allocation's end would fault in this process's context, every client's.
  Result<uint64_t> real = cuda::AllocationBytesFrom(base);
  if (!real.ok() || *real < bytes) {
    (void)cuda::IpcCloseMemHandle(base);
    if (!real.ok()) return real.status().WithContext("RegisterDevice");
    return Status::InvalidArgument("RegisterDevice: a pool of " + std::to_string(bytes) +
                                   " bytes in an allocation of " + std::to_string(*real));
  }
  std::shared_ptr<DeviceMapping> mapping(
      new DeviceMapping(Kind::kCuda, static_cast<uint8_t*>(base), bytes));
  mapping->device_ = device;
  mapping->stream_ = std::move(stream);
  return mapping;
}

DeviceMapping::~DeviceMapping() {
  if (kind_ == Kind::kEmulated) {
    munmap(base_, bytes_);
    return;
  }
  cuda::ScopedDevice scope(device_);
  // Copies were waited for by CopyFromHost; the stream is idle.
  stream_ = cuda::Stream();
  (void)cuda::IpcCloseMemHandle(base_);
}

Status DeviceMapping::CopyFromHost(std::span<const std::byte* const> srcs,
                                   std::span<const uint64_t> offsets, uint64_t block_bytes) {
  if (kind_ != Kind::kCuda) return Status::Internal("CopyFromHost on an emulated device pool");
  std::lock_guard<std::mutex> lock(copy_mu_);
  cuda::ScopedDevice scope(device_);
  KVTIER_RETURN_IF_ERROR(scope.status());
  Status status;
  for (size_t i = 0; i < srcs.size() && status.ok(); ++i) {
    status = cuda::MemcpyAsync(base_ + offsets[i], srcs[i], block_bytes, stream_.get());
  }
  // Wait even after a failed submission: the host blocks must not be unpinned under copies.
  const Status synced = stream_.Synchronize();
  return status.ok() ? synced : status;
}

}  // namespace kvtier::server
