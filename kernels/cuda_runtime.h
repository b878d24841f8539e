// The CUDA runtime as kvtier sees it: device discovery, device and pinned host memory,
// streams, events and (batched) asynchronous copies, with every cudaError_t turned into
// a Status that keeps the driver's message. Compiles, and answers "no GPU", in a build
// without CUDA: discovery reports no device and every other call returns NotSupported
// (or does nothing, for the frees and destroys of null handles).
//
// Device selection: memory, streams and events belong to the device current on the
// calling thread when they are made (cudaSetDevice); ScopedDevice switches it for a
// scope. Copies use unified addressing (cudaMemcpyDefault): the driver tells host from
// device memory by the pointer.
//
// Thread safety: every function may be called from any thread. A Stream or Event
// object is used by one thread at a time; the handles themselves are thread-safe
// (CUDA's rules).
#ifndef KVTIER_KERNELS_CUDA_RUNTIME_H_
#define KVTIER_KERNELS_CUDA_RUNTIME_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "kernels/host_device.h"
#include "kvtier/status.h"

// cudaEvent_t without the CUDA headers: `struct CUevent_st*` is its definition.
struct CUevent_st;

namespace kvtier {
// A CUDA event; nullptr means none.
using EventHandle = CUevent_st*;
}  // namespace kvtier

namespace kvtier::cuda {

// Whether this build compiled the CUDA kernels.
bool BuiltWithCuda();

struct DeviceDiscovery {
  int device_count = 0;  // usable CUDA devices; 0 = run without a GPU
  std::string reason;    // why there is none ("built without CUDA", the driver's answer)
};

// Asks the driver once per process and remembers the answer. Any error from device
// discovery ("driver version is insufficient", no device, no driver) means "no GPU",
// not a failure: it lands in `reason`.
const DeviceDiscovery& Devices();
inline bool HasDevice() { return Devices().device_count > 0; }

// Page-locked host memory registered with the driver (cudaHostAlloc, portable across
// devices). NotSupported without a device.
Status HostAlloc(uint64_t bytes, void** ptr);
Status HostFree(void* ptr);

// --- Devices ---------------------------------------------------------------------------

// The calling thread's current device, and switching it (InvalidArgument for an
// ordinal outside [0, device_count)).
Result<int> CurrentDevice();
Status SetDevice(int device);

// Bytes of device memory free and in all on `device` (cudaMemGetInfo).
struct DeviceMemoryInfo {
  uint64_t free_bytes = 0;
  uint64_t total_bytes = 0;
};
Result<DeviceMemoryInfo> MemoryInfo(int device);

// The device's name ("NVIDIA H100 80GB HBM3"), or the error.
Result<std::string> DeviceName(int device);

// The device's UUID (cudaDeviceProp::uuid, 16 bytes): names a GPU across processes,
// whatever their CUDA_VISIBLE_DEVICES.
Result<std::array<uint8_t, 16>> DeviceUuid(int device);
// The ordinal, in this process, of the device whose UUID is `uuid`; NotFound when no
// visible device has it.
Result<int> DeviceWithUuid(std::span<const uint8_t, 16> uuid);

// Makes `device` current for the scope and restores the previous one after. When
// switching fails (or there is no GPU), status() says why and nothing is restored.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device);
  ~ScopedDevice();
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

  const Status& status() const { return status_; }

 private:
  [[maybe_unused]] int previous_ = -1;  // -1: nothing to restore
  Status status_;
};

// --- Memory ----------------------------------------------------------------------------

// cudaMalloc on the current device (never managed memory). ResourceExhausted when the
// device cannot provide it.
Status DeviceMalloc(uint64_t bytes, void** ptr);
// cudaFree; null is a no-op.
Status DeviceFree(void* ptr);

// Whether [ptr, ptr + 1) is memory the GPU can DMA to or from directly: device memory,
// or host memory allocated by cudaHostAlloc or registered with cudaHostRegister.
// False for pageable host memory, and without CUDA.
bool IsDmaCapable(const void* ptr);

// --- Sharing device memory between processes (CUDA IPC) --------------------------------

// The IPC handle (cudaIpcMemHandle_t, 64 bytes) of the allocation whose base is `base`
// (a cudaMalloc result): another process opens it with IpcOpenMemHandle. The memory
// stays the exporting process's: freeing it while another process has it open is
// undefined.
Result<std::array<uint8_t, 64>> IpcGetMemHandle(void* base);
// Maps another process's allocation (cudaIpcOpenMemHandle, with peer access enabled
// lazily) into this one, on the current device; returns its base here. Close it with
// IpcCloseMemHandle. Errors: InvalidArgument for a handle that names nothing this
// process may open (or its own allocation), the driver's.
Result<void*> IpcOpenMemHandle(std::span<const uint8_t, 64> handle);
// Unmaps what IpcOpenMemHandle mapped; null is a no-op.
Status IpcCloseMemHandle(void* ptr);
// Bytes from `ptr` (device memory: a cudaMalloc result, or what IpcOpenMemHandle
// returned) to the end of its allocation, as the driver knows it (cuMemGetAddressRange):
// what a peer may claim about memory it shares is checked against this. Errors:
// InvalidArgument for a pointer the driver does not know, NotSupported without a GPU.
Result<uint64_t> AllocationBytesFrom(const void* ptr);

// --- Streams and events ----------------------------------------------------------------

// A stream that does not synchronize with the legacy default stream
// (cudaStreamNonBlocking), on the current device. Move-only; destroyed with the object.
class Stream {
 public:
  Stream() = default;
  static Result<Stream> Create();
  ~Stream();
  Stream(Stream&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Stream& operator=(Stream&& other) noexcept;

  StreamHandle get() const { return handle_; }
  // Blocks until everything submitted to the stream has run.
  Status Synchronize() const;

 private:
  explicit Stream(StreamHandle handle) : handle_(handle) {}
  StreamHandle handle_ = nullptr;
};

// An event without timing (cudaEventDisableTiming, the cheap kind), on the current
// device; `timing` = true makes one ElapsedMs can read. Move-only.
class Event {
 public:
  Event() = default;
  static Result<Event> Create(bool timing = false);
  ~Event();
  Event(Event&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
  Event& operator=(Event&& other) noexcept;

  EventHandle get() const { return handle_; }
  // Captures the work submitted to `stream` so far.
  Status Record(StreamHandle stream) const;
  // True once the captured work has run (also for a never-recorded event); a failed
  // copy or kernel in that work is the error.
  Result<bool> Query() const;
  // Blocks the calling thread until the captured work has run.
  Status Synchronize() const;
  // Makes `stream` wait (on the GPU, the host does not block) for the captured work.
  Status MakeStreamWait(StreamHandle stream) const;
  // Milliseconds from `start` to `end`: two timing events, both recorded and complete.
  static Result<float> ElapsedMs(const Event& start, const Event& end);

 private:
  explicit Event(EventHandle handle) : handle_(handle) {}
  EventHandle handle_ = nullptr;
};

// --- Copies ----------------------------------------------------------------------------

// Asynchronous copy on `stream` (cudaMemcpyAsync, direction from the pointers). Between
// pageable host memory and the device the driver stages it and the call returns only
// once the host side has been read or written.
Status MemcpyAsync(void* dst, const void* src, uint64_t bytes, StreamHandle stream);
// Synchronous copy (cudaMemcpy on the legacy default stream): returns once the bytes
// are at `dst`, whatever the kinds of memory. Not ordered with non-blocking streams.
Status Memcpy(void* dst, const void* src, uint64_t bytes);
// Fills device memory: on `stream`, or (Memset) on the legacy default stream, returning
// once done.
Status MemsetAsync(void* dst, int value, uint64_t bytes, StreamHandle stream);
Status Memset(void* dst, int value, uint64_t bytes);

// Copies dsts[i] <- srcs[i] (sizes[i] bytes) for every i, all on `stream`, in as few
// submissions as the runtime allows: one cudaMemcpyBatchAsync (CUDA 12.8 and later,
// when the driver takes it), else one cudaMemcpyAsync each. The copies of one batch may
// run in any order and must not overlap. `stream` must not be the legacy default stream
// (nullptr). Sources are read in stream order. The spans must have one length; every
// size must be positive. *batched (when not null) says which path ran.
Status MemcpyBatchAsync(std::span<void* const> dsts, std::span<const void* const> srcs,
                        std::span<const size_t> sizes, StreamHandle stream,
                        bool* batched = nullptr);

}  // namespace kvtier::cuda

#endif  // KVTIER_KERNELS_CUDA_RUNTIME_H_
