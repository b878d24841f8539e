// FP8 quantization and dequantization of kvtier blocks (see quantize.h). One thread block
// per (block, KV head, keys or values); elements move four at a time (8- or 16-byte
// loads, 4-byte fp8 stores). The element formulas are quantize.h's, shared with the
// reference, so both write the same bytes.
#include <cuda_runtime_api.h>

#include <string>

#include "kernels/quantize.h"

namespace kvtier {
namespace {

constexpr int kThreads = 256;

// Elements [index, index + 4) of an f16/bf16/f32 array; index is a multiple of 4.
__device__ __forceinline__ void Load4(const void* base, uint64_t index, DType dtype, float* v) {
  if (dtype == DType::kF32) {
    const float4 f =
        __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(base) + index));
    v[0] = f.x;
    v[1] = f.y;
    v[2] = f.z;
    v[3] = f.w;
    return;
  }
  const uint2 raw =
      __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(base) + index));
  const uint16_t h[4] = {uint16_t(raw.x), uint16_t(raw.x >> 16), uint16_t(raw.y),
                         uint16_t(raw.y >> 16)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[i] = dtype == DType::kF16 ? HalfBitsToFloat(h[i]) : Bf16BitsToFloat(h[i]);
  }
}

__device__ __forceinline__ void Store4(void* base, uint64_t index, DType dtype, const float* v) {
  if (dtype == DType::kF32) {
    *reinterpret_cast<float4*>(static_cast<float*>(base) + index) =
        make_float4(v[0], v[1], v[2], v[3]);
    return;
  }
  uint16_t h[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    h[i] = dtype == DType::kF16 ? FloatToHalfBits(v[i]) : FloatToBf16Bits(v[i]);
  *reinterpret_cast<uint2*>(static_cast<uint16_t*>(base) + index) =
      make_uint2(uint32_t(h[0]) | (uint32_t(h[1]) << 16), uint32_t(h[2]) | (uint32_t(h[3]) << 16));
}

__device__ __forceinline__ uint32_t Quantize4(const float* v, const float* scale) {
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) packed |= uint32_t(QuantizeElement(v[i], scale[i])) << (8 * i);
  return packed;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  }
  return v;
}

struct QuantParams {
  const void* const* src_blocks;  // uncompressed (quantize) or payloads (dequantize)
  void* const* dst_blocks;
  float* const* scales;
  DType dtype;  // the uncompressed dtype
  uint32_t kv_heads, block_tokens, head_dim;
};

// Grid: (blocks, kv_heads, 2): z = 0 the keys (per-channel scales, two passes over the
// head's [block_tokens][head_dim] slab), z = 1 the values (per-token scales: a warp per
// token, which rereads its row from L1 to quantize it).
__global__ void __launch_bounds__(kThreads) QuantizeKernel(const QuantParams p) {
  __shared__ float amax_s[kThreads * 4];
  __shared__ float scale_s[kThreads * 4];
  const uint32_t b = blockIdx.x, h = blockIdx.y;
  const uint32_t head_dim = p.head_dim, block_tokens = p.block_tokens;
  const void* src = p.src_blocks[b];
  auto* dst = static_cast<uint8_t*>(p.dst_blocks[b]);
  float* scales = p.scales[b];
  const uint32_t groups = head_dim / 4;  // four channels each

  if (blockIdx.z == 0) {
    const uint64_t slab = QuantElementIndex(h, 0, 0, block_tokens, head_dim);
    for (uint32_t group_base = 0; group_base < groups; group_base += kThreads) {
      const uint32_t tile_groups = min(groups - group_base, uint32_t{kThreads});
      const uint32_t rows = kThreads / tile_groups;
      const uint32_t g = threadIdx.x % tile_groups, r = threadIdx.x / tile_groups;
      const uint32_t channel = (group_base + g) * 4;
      float amax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (r < rows) {
        for (uint32_t t = r; t < block_tokens; t += rows) {
          float v[4];
          Load4(src, slab + uint64_t{t} * head_dim + channel, p.dtype, v);
#pragma unroll
          for (int i = 0; i < 4; ++i) amax[i] = QuantAmaxUpdate(amax[i], v[i]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) amax_s[r * tile_groups * 4 + g * 4 + i] = amax[i];
      }
      __syncthreads();
      for (uint32_t j = threadIdx.x; j < tile_groups * 4; j += kThreads) {
        float a = 0.0f;
        for (uint32_t row = 0; row < rows; ++row) a = fmaxf(a, amax_s[row * tile_groups * 4 + j]);
        const float scale = QuantScaleFromAmax(a);
        scale_s[j] = scale;
        scales[KeyScaleIndex(h, group_base * 4 + j, head_dim)] = scale;
      }
      __syncthreads();
      if (r < rows) {
        for (uint32_t t = r; t < block_tokens; t += rows) {
          const uint64_t i = slab + uint64_t{t} * head_dim + channel;
          float v[4];
          Load4(src, i, p.dtype, v);
          *reinterpret_cast<uint32_t*>(dst + i) = Quantize4(v, &scale_s[g * 4]);
        }
      }
      __syncthreads();  // amax_s and scale_s are reused by the next column tile
    }
    return;
  }

  const uint64_t slab = QuantValuesOffset(p.kv_heads, block_tokens, head_dim) +
                        QuantElementIndex(h, 0, 0, block_tokens, head_dim);
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (uint32_t t = warp; t < block_tokens; t += kThreads / 32) {
    const uint64_t row = slab + uint64_t{t} * head_dim;
    float amax = 0.0f;
    for (uint32_t g = lane; g < groups; g += 32) {
      float v[4];
      Load4(src, row + 4 * g, p.dtype, v);
#pragma unroll
      for (int i = 0; i < 4; ++i) amax = QuantAmaxUpdate(amax, v[i]);
    }
    const float scale = QuantScaleFromAmax(WarpMax(amax));
    if (lane == 0) scales[ValueScaleIndex(h, t, p.kv_heads, block_tokens, head_dim)] = scale;
    const float scale4[4] = {scale, scale, scale, scale};
    for (uint32_t g = lane; g < groups; g += 32) {
      float v[4];
      Load4(src, row + 4 * g, p.dtype, v);
      *reinterpret_cast<uint32_t*>(dst + row + 4 * g) = Quantize4(v, scale4);
    }
  }
}

// Grid: (blocks, kv_heads, 2) as above; four elements per thread and step.
__global__ void __launch_bounds__(kThreads) DequantizeKernel(const QuantParams p) {
  const uint32_t b = blockIdx.x, h = blockIdx.y;
  const uint32_t head_dim = p.head_dim, block_tokens = p.block_tokens;
  const auto* src = static_cast<const uint8_t*>(p.src_blocks[b]);
  void* dst = p.dst_blocks[b];
  const float* scales = p.scales[b];
  const bool keys = blockIdx.z == 0;
  const uint64_t slab = (keys ? 0 : QuantValuesOffset(p.kv_heads, block_tokens, head_dim)) +
                        QuantElementIndex(h, 0, 0, block_tokens, head_dim);
  const uint64_t groups = uint64_t{block_tokens} * head_dim / 4;
  for (uint64_t g = threadIdx.x; g < groups; g += kThreads) {
    const uint32_t t = static_cast<uint32_t>(4 * g / head_dim);
    const uint32_t d = static_cast<uint32_t>(4 * g % head_dim);
    const uint32_t codes = __ldg(reinterpret_cast<const uint32_t*>(src + slab + 4 * g));
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float scale =
          keys ? __ldg(&scales[KeyScaleIndex(h, d + i, head_dim)])
               : __ldg(&scales[ValueScaleIndex(h, t, p.kv_heads, block_tokens, head_dim)]);
      v[i] = DequantizeElement(uint8_t(codes >> (8 * i)), scale);
    }
    Store4(dst, slab + 4 * g, p.dtype, v);
  }
}

Status Launch(const char* op, bool quantize, const QuantParams& p, uint32_t num_blocks,
              cudaStream_t stream) {
  if (num_blocks > 0x7FFFFFFFu || p.kv_heads > 65535) {
    return Status::InvalidArgument(std::string(op) + ": too many blocks or KV heads for a launch");
  }
  const dim3 grid(num_blocks, p.kv_heads, 2);
  if (quantize) {
    QuantizeKernel<<<grid, kThreads, 0, stream>>>(p);
  } else {
    DequantizeKernel<<<grid, kThreads, 0, stream>>>(p);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return Status::Internal(std::string(op) + " kernel launch: " + cudaGetErrorString(err));
  }
  return Status::OK();
}

}  // namespace

Status LaunchQuantizeBlocks(const void* const* src_blocks, DType src_dtype, uint32_t num_blocks,
                            uint32_t kv_heads, uint32_t block_tokens, uint32_t head_dim,
                            void* const* dst_blocks, float* const* scales, StreamHandle stream) {
  Status s = ValidateQuantizeArgs("QuantizeBlocks", src_blocks, src_dtype, num_blocks, kv_heads,
                                  block_tokens, head_dim, dst_blocks, scales);
  if (!s.ok()) return s;
  const QuantParams p{src_blocks, dst_blocks, scales, src_dtype, kv_heads, block_tokens, head_dim};
  return Launch("QuantizeBlocks", true, p, num_blocks, stream);
}

Status LaunchDequantizeBlocks(const void* const* src_blocks, const float* const* scales,
                              uint32_t num_blocks, uint32_t kv_heads, uint32_t block_tokens,
                              uint32_t head_dim, DType dst_dtype, void* const* dst_blocks,
                              StreamHandle stream) {
  Status s = ValidateQuantizeArgs("DequantizeBlocks", src_blocks, dst_dtype, num_blocks, kv_heads,
                                  block_tokens, head_dim, dst_blocks, scales);
  if (!s.ok()) return s;
  // The kernel only reads the scales; QuantParams holds them writable for the quantizer.
  const QuantParams p{src_blocks, dst_blocks, const_cast<float* const*>(scales),
                      dst_dtype,  kv_heads,   block_tokens,
                      head_dim};
  return Launch("DequantizeBlocks", false, p, num_blocks, stream);
}

}  // namespace kvtier
