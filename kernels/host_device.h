// Qualifiers for code that compiles for both the host and the GPU: layout arithmetic
// and element formulas shared by a kernel and its CPU reference live in such functions,
// so the two cannot disagree.
#ifndef KVTIER_KERNELS_HOST_DEVICE_H_
#define KVTIER_KERNELS_HOST_DEVICE_H_

#if defined(__CUDACC__)
#define KVTIER_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KVTIER_HOST_DEVICE inline
#endif

// cudaStream_t without the CUDA headers: `struct CUstream_st*` is its definition.
struct CUstream_st;

namespace kvtier {
// A CUDA stream; nullptr is the default stream. CPU references ignore it.
using StreamHandle = CUstream_st*;
}  // namespace kvtier

#endif  // KVTIER_KERNELS_HOST_DEVICE_H_
