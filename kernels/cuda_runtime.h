// The CUDA runtime as kvtier sees it: device discovery and pinned host memory, with
// every cudaError_t turned into a Status. Compiles, and answers "no GPU", in a build
// without CUDA.
//
// Thread safety: every function may be called from any thread.
#ifndef KVTIER_KERNELS_CUDA_RUNTIME_H_
#define KVTIER_KERNELS_CUDA_RUNTIME_H_

#include <cstdint>
#include <string>

#include "kvtier/status.h"

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

}  // namespace kvtier::cuda

#endif  // KVTIER_KERNELS_CUDA_RUNTIME_H_
