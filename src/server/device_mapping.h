// DeviceMapping: a client's GPU tier mapped into kvtierd, for GetToDevice (PROTOCOL.md,
// "Direct copies into a client's GPU tier"). Registered once per connection with
// RegisterDevice:
//   kEmulated  the client's pool is host memory standing in for its GPU: a memfd sealed
//              against shrinking, mapped here shared and writable;
//   kCuda      the pool is one cudaMalloc allocation: opened here by its CUDA IPC handle on
//              the daemon's device of the same UUID, with a stream of this mapping's own.
//
// Ownership: the connection and each of its requests in flight hold a shared_ptr; the
// mapping (munmap, or the IPC handle's close and the stream's destroy) lives until the
// last of them lets go.
// Thread safety: base() and bytes() may be read from any thread. CopyFromHost may be
// called from any thread; calls are serialized on the mapping's stream.
#ifndef KVTIER_SERVER_DEVICE_MAPPING_H_
#define KVTIER_SERVER_DEVICE_MAPPING_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <utility>

#include "kernels/cuda_runtime.h"
#include "kvtier/status.h"
#include "src/util/fd.h"

namespace kvtier::server {

using kvtier::UniqueFd;

class DeviceMapping {
 public:
  enum class Kind : uint8_t { kEmulated = 0, kCuda = 1 };

  // Maps `bytes` (>= block_bytes > 0) of the memfd `fd` (the caller keeps the fd; the
  // mapping does not need it after). InvalidArgument when the file is not sealed
  // against shrinking (F_SEAL_SHRINK), is smaller than `bytes`, or `bytes` is below one
  // block; IOError from fstat, fcntl or mmap.
  static Result<std::shared_ptr<DeviceMapping>> MapMemfd(int fd, uint64_t bytes,
                                                         uint64_t block_bytes);
  // Opens a CUDA allocation of `bytes` (>= block_bytes > 0) by its IPC handle on the
  // device whose UUID is `gpu_uuid`. NotSupported without a GPU in this process,
  // NotFound when no device has that UUID, InvalidArgument for a bad size or handle,
  // the driver's errors.
  static Result<std::shared_ptr<DeviceMapping>> OpenCuda(std::span<const uint8_t, 16> gpu_uuid,
                                                         std::span<const uint8_t, 64> ipc_handle,
                                                         uint64_t bytes, uint64_t block_bytes);
  ~DeviceMapping();

  DeviceMapping(const DeviceMapping&) = delete;
  DeviceMapping& operator=(const DeviceMapping&) = delete;

  Kind kind() const { return kind_; }
  // The pool's base in this process (host memory for kEmulated, device memory for kCuda)
  // and its size.
  uint8_t* base() const { return base_; }
  uint64_t bytes() const { return bytes_; }

  // kCuda: copies srcs[i] (host memory, `block_bytes` each) to base() + offsets[i] on the
  // mapping's stream and waits until every byte has landed. Offsets must have been
  // checked against bytes(). The driver's error on failure (some copies may have run).
  Status CopyFromHost(std::span<const std::byte* const> srcs, std::span<const uint64_t> offsets,
                      uint64_t block_bytes);

 private:
  DeviceMapping(Kind kind, uint8_t* base, uint64_t bytes)
      : kind_(kind), base_(base), bytes_(bytes) {}

  const Kind kind_;
  uint8_t* const base_;
  const uint64_t bytes_;
  int device_ = -1;      // kCuda: the daemon's ordinal of the pool's GPU
  cuda::Stream stream_;  // kCuda: on device_
  std::mutex copy_mu_;   // kCuda: one CopyFromHost at a time on stream_
};

}  // namespace kvtier::server

#endif  // KVTIER_SERVER_DEVICE_MAPPING_H_
