#include "kernels/cuda_runtime.h"

#include <mutex>
#include <string>

#if KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier::cuda {

#if KVTIER_WITH_CUDA

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

#else  // !KVTIER_WITH_CUDA

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

#endif

}  // namespace kvtier::cuda
