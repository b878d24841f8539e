#include "kernels/cuda_runtime.h"

#include <atomic>
#include <cstring>
#include <string>

#if KVTIER_WITH_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>
#endif

namespace kvtier::cuda {

#if KVTIER_WITH_CUDA

namespace {

// A cudaError_t as a Status that keeps the driver's words; `what` names the call.
Status FromCuda(cudaError_t err, const std::string& what) {
  std::string message = what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  switch (err) {
    case cudaErrorMemoryAllocation:
      return Status::ResourceExhausted(message);
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidResourceHandle:
      return Status::InvalidArgument(message);
    case cudaErrorNotSupported:
    case cudaErrorCallRequiresNewerDriver:
    case cudaErrorInsufficientDriver:
    case cudaErrorNoDevice:
      return Status::NotSupported(message);
    default:
      return Status::IOError(message);
  }
}

// OK for cudaSuccess, else FromCuda.
Status Check(cudaError_t err, const char* what) {
  return err == cudaSuccess ? Status::OK() : FromCuda(err, what);
}

Status NoDevice(const char* what) {
  return Status::NotSupported(std::string(what) + ": " + Devices().reason);
}

cudaStream_t ToCuda(StreamHandle s) { return reinterpret_cast<cudaStream_t>(s); }
cudaEvent_t ToCuda(EventHandle e) { return reinterpret_cast<cudaEvent_t>(e); }

}  // namespace

bool BuiltWithCuda() { return true; }

const DeviceDiscovery& Devices() {
  static const DeviceDiscovery discovery = [] {
    DeviceDiscovery d;
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      d.reason = std::string("CUDA device discovery: ") + cudaGetErrorString(err);
      cudaGetLastError();  // clear the sticky error so later calls start clean
      return d;
    }
    d.device_count = count;
    if (count == 0) d.reason = "CUDA runtime reports no device";
    return d;
  }();
  return discovery;
}

Status HostAlloc(uint64_t bytes, void** ptr) {
  *ptr = nullptr;
  if (!HasDevice()) return Status::NotSupported("cudaHostAlloc: " + Devices().reason);
  cudaError_t err = cudaHostAlloc(ptr, bytes, cudaHostAllocPortable);
  if (err != cudaSuccess) {
    *ptr = nullptr;
    return Status::ResourceExhausted("cudaHostAlloc of " + std::to_string(bytes) +
                                     " bytes: " + cudaGetErrorString(err));
  }
  return Status::OK();
}

Status HostFree(void* ptr) {
  cudaError_t err = cudaFreeHost(ptr);
  if (err != cudaSuccess)
    return Status::Internal(std::string("cudaFreeHost: ") + cudaGetErrorString(err));
  return Status::OK();
}

// --- Devices ---------------------------------------------------------------------------

Result<int> CurrentDevice() {
  if (!HasDevice()) return NoDevice("cudaGetDevice");
  int device = 0;
  KVTIER_RETURN_IF_ERROR(Check(cudaGetDevice(&device), "cudaGetDevice"));
  return device;
}

Status SetDevice(int device) {
  if (!HasDevice()) return NoDevice("cudaSetDevice");
  if (device < 0 || device >= Devices().device_count) {
    return Status::InvalidArgument("CUDA device " + std::to_string(device) + " does not exist (" +
                                   std::to_string(Devices().device_count) + " present)");
  }
  return Check(cudaSetDevice(device), "cudaSetDevice");
}

Result<DeviceMemoryInfo> MemoryInfo(int device) {
  ScopedDevice scope(device);
  KVTIER_RETURN_IF_ERROR(scope.status());
  size_t free_bytes = 0, total_bytes = 0;
  KVTIER_RETURN_IF_ERROR(Check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo"));
  return DeviceMemoryInfo{free_bytes, total_bytes};
}

Result<std::string> DeviceName(int device) {
  if (!HasDevice()) return NoDevice("cudaGetDeviceProperties");
  cudaDeviceProp prop{};
  KVTIER_RETURN_IF_ERROR(Check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  return std::string(prop.name);
}

Result<std::array<uint8_t, 16>> DeviceUuid(int device) {
  if (!HasDevice()) return NoDevice("cudaGetDeviceProperties");
  cudaDeviceProp prop{};
  KVTIER_RETURN_IF_ERROR(Check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  std::array<uint8_t, 16> uuid{};
  static_assert(sizeof(prop.uuid.bytes) == 16);
  std::memcpy(uuid.data(), prop.uuid.bytes, uuid.size());
  return uuid;
}

Result<int> DeviceWithUuid(std::span<const uint8_t, 16> uuid) {
  if (!HasDevice()) return NoDevice("cudaGetDeviceProperties");
  for (int device = 0; device < Devices().device_count; ++device) {
    Result<std::array<uint8_t, 16>> id = DeviceUuid(device);
    if (!id.ok()) return id.status();
    if (std::memcmp(id->data(), uuid.data(), uuid.size()) == 0) return device;
  }
  return Status::NotFound("no visible CUDA device has the GPU UUID asked for");
}

ScopedDevice::ScopedDevice(int device) {
  Result<int> current = CurrentDevice();
  if (!current.ok()) {
    status_ = current.status();
    return;
  }
  if (*current == device) return;
  status_ = SetDevice(device);
  if (status_.ok()) previous_ = *current;
}

ScopedDevice::~ScopedDevice() {
  if (previous_ >= 0) (void)cudaSetDevice(previous_);
}

// --- Memory ----------------------------------------------------------------------------

Status DeviceMalloc(uint64_t bytes, void** ptr) {
  *ptr = nullptr;
  if (!HasDevice()) return NoDevice("cudaMalloc");
  cudaError_t err = cudaMalloc(ptr, bytes);
  if (err != cudaSuccess) {
    *ptr = nullptr;
    cudaGetLastError();  // an allocation failure is not sticky; clear it anyway
    return FromCuda(err, "cudaMalloc of " + std::to_string(bytes) + " bytes");
  }
  return Status::OK();
}

Status DeviceFree(void* ptr) {
  if (ptr == nullptr) return Status::OK();
  return Check(cudaFree(ptr), "cudaFree");
}

bool IsDmaCapable(const void* ptr) {
  if (!HasDevice() || ptr == nullptr) return false;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeHost || attr.type == cudaMemoryTypeDevice;
}

// --- Sharing device memory between processes (CUDA IPC) --------------------------------

Result<std::array<uint8_t, 64>> IpcGetMemHandle(void* base) {
  if (!HasDevice()) return NoDevice("cudaIpcGetMemHandle");
  cudaIpcMemHandle_t handle{};
  KVTIER_RETURN_IF_ERROR(Check(cudaIpcGetMemHandle(&handle, base), "cudaIpcGetMemHandle"));
  std::array<uint8_t, 64> bytes{};
  static_assert(sizeof(handle.reserved) == 64);
  std::memcpy(bytes.data(), handle.reserved, bytes.size());
  return bytes;
}

Result<void*> IpcOpenMemHandle(std::span<const uint8_t, 64> handle) {
  if (!HasDevice()) return NoDevice("cudaIpcOpenMemHandle");
  cudaIpcMemHandle_t h{};
  std::memcpy(h.reserved, handle.data(), sizeof(h.reserved));
  void* ptr = nullptr;
  const cudaError_t err = cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    cudaGetLastError();  // a refused handle is the caller's mistake, not sticky
    return FromCuda(err, "cudaIpcOpenMemHandle");
  }
  return ptr;
}

Status IpcCloseMemHandle(void* ptr) {
  if (ptr == nullptr) return Status::OK();
  return Check(cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle");
}

Result<uint64_t> AllocationBytesFrom(const void* ptr) {
  if (!HasDevice()) return NoDevice("cuMemGetAddressRange");
  // Through the runtime's entry point: the driver library is not linked directly.
  using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  static const GetAddressRange get_range = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<GetAddressRange>(fn);
  }();
  if (get_range == nullptr) {
    return Status::NotSupported("the driver offers no cuMemGetAddressRange");
  }
  CUdeviceptr base = 0;
  size_t size = 0;
  const CUdeviceptr p = reinterpret_cast<CUdeviceptr>(ptr);
  if (get_range(&base, &size, p) != CUDA_SUCCESS || p < base || p - base > size) {
    return Status::InvalidArgument("cuMemGetAddressRange: device memory unknown to the driver");
  }
  return uint64_t{size} - (p - base);
}

// --- Streams and events ----------------------------------------------------------------

Result<Stream> Stream::Create() {
  if (!HasDevice()) return NoDevice("cudaStreamCreate");
  cudaStream_t s = nullptr;
  KVTIER_RETURN_IF_ERROR(
      Check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
  return Stream(reinterpret_cast<StreamHandle>(s));
}

Stream::~Stream() {
  if (handle_ != nullptr) (void)cudaStreamDestroy(ToCuda(handle_));
}

Stream& Stream::operator=(Stream&& other) noexcept {
  if (this != &other) {
    if (handle_ != nullptr) (void)cudaStreamDestroy(ToCuda(handle_));
    handle_ = std::exchange(other.handle_, nullptr);
  }
  return *this;
}

Status Stream::Synchronize() const {
  return Check(cudaStreamSynchronize(ToCuda(handle_)), "cudaStreamSynchronize");
}

Result<Event> Event::Create(bool timing) {
  if (!HasDevice()) return NoDevice("cudaEventCreate");
  cudaEvent_t e = nullptr;
  KVTIER_RETURN_IF_ERROR(
      Check(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming),
            "cudaEventCreate"));
  return Event(reinterpret_cast<EventHandle>(e));
}

Event::~Event() {
  if (handle_ != nullptr) (void)cudaEventDestroy(ToCuda(handle_));
}

Event& Event::operator=(Event&& other) noexcept {
  if (this != &other) {
    if (handle_ != nullptr) (void)cudaEventDestroy(ToCuda(handle_));
    handle_ = std::exchange(other.handle_, nullptr);
  }
  return *this;
}

Status Event::Record(StreamHandle stream) const {
  if (handle_ == nullptr) return Status::InvalidArgument("cudaEventRecord: no event");
  return Check(cudaEventRecord(ToCuda(handle_), ToCuda(stream)), "cudaEventRecord");
}

Result<bool> Event::Query() const {
  if (handle_ == nullptr) return true;
  cudaError_t err = cudaEventQuery(ToCuda(handle_));
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) return false;
  return FromCuda(err, "cudaEventQuery");
}

Status Event::Synchronize() const {
  if (handle_ == nullptr) return Status::OK();
  return Check(cudaEventSynchronize(ToCuda(handle_)), "cudaEventSynchronize");
}

Status Event::MakeStreamWait(StreamHandle stream) const {
  if (handle_ == nullptr) return Status::OK();
  return Check(cudaStreamWaitEvent(ToCuda(stream), ToCuda(handle_), 0), "cudaStreamWaitEvent");
}

Result<float> Event::ElapsedMs(const Event& start, const Event& end) {
  float ms = 0;
  KVTIER_RETURN_IF_ERROR(
      Check(cudaEventElapsedTime(&ms, ToCuda(start.handle_), ToCuda(end.handle_)),
            "cudaEventElapsedTime"));
  return ms;
}

// --- Copies ----------------------------------------------------------------------------

Status MemcpyAsync(void* dst, const void* src, uint64_t bytes, StreamHandle stream) {
  if (!HasDevice()) return NoDevice("cudaMemcpyAsync");
  return Check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, ToCuda(stream)),
               "cudaMemcpyAsync");
}

Status Memcpy(void* dst, const void* src, uint64_t bytes) {
  if (!HasDevice()) return NoDevice("cudaMemcpy");
  KVTIER_RETURN_IF_ERROR(Check(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy"));
  // cudaMemcpy may return before a device-to-device copy, or the DMA of a pageable
  // source, has finished: wait for the legacy default stream it ran on.
  return Check(cudaStreamSynchronize(nullptr), "cudaMemcpy (synchronize)");
}

Status MemsetAsync(void* dst, int value, uint64_t bytes, StreamHandle stream) {
  if (!HasDevice()) return NoDevice("cudaMemsetAsync");
  return Check(cudaMemsetAsync(dst, value, bytes, ToCuda(stream)), "cudaMemsetAsync");
}

Status Memset(void* dst, int value, uint64_t bytes) {
  if (!HasDevice()) return NoDevice("cudaMemset");
  KVTIER_RETURN_IF_ERROR(Check(cudaMemset(dst, value, bytes), "cudaMemset"));
  // cudaMemset of device memory is asynchronous with respect to the host.
  return Check(cudaStreamSynchronize(nullptr), "cudaMemset (synchronize)");
}

Status MemcpyBatchAsync(std::span<void* const> dsts, std::span<const void* const> srcs,
                        std::span<const size_t> sizes, StreamHandle stream, bool* batched) {
  if (batched != nullptr) *batched = false;
  if (dsts.size() != srcs.size() || dsts.size() != sizes.size()) {
    return Status::InvalidArgument("batched copy: " + std::to_string(dsts.size()) +
                                   " destinations, " + std::to_string(srcs.size()) + " sources, " +
                                   std::to_string(sizes.size()) + " sizes");
  }
  for (size_t i = 0; i < dsts.size(); ++i) {
    if (dsts[i] == nullptr || srcs[i] == nullptr || sizes[i] == 0) {
      return Status::InvalidArgument("batched copy: copy " + std::to_string(i) +
                                     " has a null pointer or no bytes");
    }
  }
  if (dsts.empty()) return Status::OK();
  if (!HasDevice()) return NoDevice("cudaMemcpyBatchAsync");

#if CUDART_VERSION >= 12080
  // Set once the driver has refused the batch API: every later batch takes the loop.
  static std::atomic<bool> batch_refused{false};
  if (stream != nullptr && dsts.size() > 1 && !batch_refused.load(std::memory_order_relaxed)) {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attr_index = 0;
#if CUDART_VERSION >= 13000
    cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(),
                                           &attr, &attr_index, 1, ToCuda(stream));
#else
    size_t fail_index = 0;
    cudaError_t err =
        cudaMemcpyBatchAsync(const_cast<void**>(dsts.data()), const_cast<void**>(srcs.data()),
                             const_cast<size_t*>(sizes.data()), dsts.size(), &attr, &attr_index, 1,
                             &fail_index, ToCuda(stream));
#endif
    if (err == cudaSuccess) {
      if (batched != nullptr) *batched = true;
      return Status::OK();
    }
    cudaGetLastError();  // not sticky: the loop below reports its own errors
    if (err == cudaErrorNotSupported || err == cudaErrorCallRequiresNewerDriver) {
      batch_refused.store(true, std::memory_order_relaxed);
    }
  }
#endif
  for (size_t i = 0; i < dsts.size(); ++i) {
    KVTIER_RETURN_IF_ERROR(
        Check(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, ToCuda(stream)),
              "cudaMemcpyAsync"));
  }
  return Status::OK();
}

#else  // !KVTIER_WITH_CUDA

namespace {
Status NoCuda(const char* what) {
  return Status::NotSupported(std::string(what) + ": kvtier was built without CUDA");
}
}  // namespace

bool BuiltWithCuda() { return false; }

const DeviceDiscovery& Devices() {
  static const DeviceDiscovery discovery{0, "kvtier was built without CUDA"};
  return discovery;
}

Status HostAlloc(uint64_t, void** ptr) {
  *ptr = nullptr;
  return Status::NotSupported("cudaHostAlloc: kvtier was built without CUDA");
}

Status HostFree(void*) { return Status::NotSupported("kvtier was built without CUDA"); }

Result<int> CurrentDevice() { return NoCuda("cudaGetDevice"); }
Status SetDevice(int) { return NoCuda("cudaSetDevice"); }
Result<DeviceMemoryInfo> MemoryInfo(int) { return NoCuda("cudaMemGetInfo"); }
Result<std::string> DeviceName(int) { return NoCuda("cudaGetDeviceProperties"); }
Result<std::array<uint8_t, 16>> DeviceUuid(int) { return NoCuda("cudaGetDeviceProperties"); }
Result<int> DeviceWithUuid(std::span<const uint8_t, 16>) {
  return NoCuda("cudaGetDeviceProperties");
}
ScopedDevice::ScopedDevice(int) : status_(NoCuda("cudaSetDevice")) {}
ScopedDevice::~ScopedDevice() = default;

Status DeviceMalloc(uint64_t, void** ptr) {
  *ptr = nullptr;
  return NoCuda("cudaMalloc");
}
Status DeviceFree(void* ptr) { return ptr == nullptr ? Status::OK() : NoCuda("cudaFree"); }
bool IsDmaCapable(const void*) { return false; }

Result<std::array<uint8_t, 64>> IpcGetMemHandle(void*) { return NoCuda("cudaIpcGetMemHandle"); }
Result<void*> IpcOpenMemHandle(std::span<const uint8_t, 64>) {
  return NoCuda("cudaIpcOpenMemHandle");
}
Status IpcCloseMemHandle(void* ptr) {
  return ptr == nullptr ? Status::OK() : NoCuda("cudaIpcCloseMemHandle");
}
Result<uint64_t> AllocationBytesFrom(const void*) { return NoCuda("cuMemGetAddressRange"); }

Result<Stream> Stream::Create() { return NoCuda("cudaStreamCreate"); }
Stream::~Stream() = default;
Stream& Stream::operator=(Stream&& other) noexcept {
  handle_ = std::exchange(other.handle_, nullptr);
  return *this;
}
Status Stream::Synchronize() const { return NoCuda("cudaStreamSynchronize"); }

Result<Event> Event::Create(bool) { return NoCuda("cudaEventCreate"); }
Event::~Event() = default;
Event& Event::operator=(Event&& other) noexcept {
  handle_ = std::exchange(other.handle_, nullptr);
  return *this;
}
Status Event::Record(StreamHandle) const { return NoCuda("cudaEventRecord"); }
Result<bool> Event::Query() const { return true; }  // never recorded: nothing to wait for
Status Event::Synchronize() const { return Status::OK(); }
Status Event::MakeStreamWait(StreamHandle) const { return Status::OK(); }
Result<float> Event::ElapsedMs(const Event&, const Event&) {
  return NoCuda("cudaEventElapsedTime");
}

Status MemcpyAsync(void*, const void*, uint64_t, StreamHandle) { return NoCuda("cudaMemcpyAsync"); }
Status Memcpy(void*, const void*, uint64_t) { return NoCuda("cudaMemcpy"); }
Status MemsetAsync(void*, int, uint64_t, StreamHandle) { return NoCuda("cudaMemsetAsync"); }
Status Memset(void*, int, uint64_t) { return NoCuda("cudaMemset"); }
Status MemcpyBatchAsync(std::span<void* const> dsts, std::span<const void* const> srcs,
                        std::span<const size_t> sizes, StreamHandle, bool* batched) {
  if (batched != nullptr) *batched = false;
  if (dsts.size() != srcs.size() || dsts.size() != sizes.size()) {
    return Status::InvalidArgument("batched copy: spans of different lengths");
  }
  return NoCuda("cudaMemcpyBatchAsync");
}

#endif

}  // namespace kvtier::cuda
