#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "kernels/representatives.h"

namespace kvtier {
namespace {

constexpr unsigned kThreads = 256;
constexpr uint64_t kMaxGrid = uint64_t{1} << 20;  // thread blocks loop over the rest

template <DType kDt>
constexpr uint32_t kElemBytes = kDt == DType::kF32 ? 4 : (kDt == DType::kFP8E4M3 ? 1 : 2);
// Elements per 16-byte load.
template <DType kDt>
constexpr uint32_t kVec = 16 / kElemBytes<kDt>;

// Channels [c0, c0 + kVec) of the key row at `row` as float: one 16-byte load when the
// chunk is whole and aligned, element loads otherwise; channels at or past head_dim
// read as 0.
template <DType kDt>
__device__ __forceinline__ void LoadChunk(const unsigned char* row, uint32_t c0, uint32_t head_dim,
                                          float (&v)[kVec<kDt>]) {
  constexpr uint32_t n = kVec<kDt>;
  const unsigned char* p = row + uint64_t{c0} * kElemBytes<kDt>;
  if (c0 + n <= head_dim && (reinterpret_cast<uintptr_t>(p) % 16) == 0) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};  // little-endian elements
#pragma unroll
    for (uint32_t i = 0; i < n; ++i) {
      if constexpr (kDt == DType::kF32) {
        v[i] = __uint_as_float(w[i]);
      } else if constexpr (kDt == DType::kF16) {
        v[i] = HalfBitsToFloat(static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2))));
      } else if constexpr (kDt == DType::kBF16) {
        v[i] = Bf16BitsToFloat(static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2))));
      } else {
        v[i] = Fp8E4M3BitsToFloat(static_cast<uint8_t>(w[i / 4] >> (8 * (i % 4))));
      }
    }
  } else {
#pragma unroll
    for (uint32_t i = 0; i < n; ++i) v[i] = c0 + i < head_dim ? LoadAsFloat(p, i, kDt) : 0.0f;
  }
}

// kTopR / kTopRMean for one (block, kv head). Shared memory: keys[block_tokens] of
// ScoreRankKey, then chosen[kMaxTopR] token indices.
template <DType kDt>
__device__ void TopRItem(const RepresentativeShape& s, uint64_t b, uint32_t h,
                         const unsigned char* keys, const float* scores, uint32_t valid, float* out,
                         unsigned char* smem) {
  auto* rank_keys = reinterpret_cast<uint64_t*>(smem);
  auto* chosen = reinterpret_cast<uint32_t*>(rank_keys + s.block_tokens);
  const float* head_scores = scores + (b * s.num_kv_heads + h) * s.block_tokens;
  for (uint32_t t = threadIdx.x; t < valid; t += blockDim.x) {
    rank_keys[t] = ScoreRankKey(head_scores[t], t);
  }
  __syncthreads();
  // A token's rank is the number of tokens that rank before it (keys are distinct).
  const uint32_t count = s.top_r < valid ? s.top_r : valid;
  for (uint32_t t = threadIdx.x; t < valid; t += blockDim.x) {
    const uint64_t mine = rank_keys[t];
    uint32_t better = 0;
    for (uint32_t u = 0; u < valid && better < count; ++u) better += rank_keys[u] > mine;
    if (better < count) chosen[better] = t;
  }
  __syncthreads();
  const uint32_t d = s.head_dim;
  if (s.mode == RepresentativeMode::kTopR) {
    const uint32_t elems = s.top_r * d;
    for (uint32_t i = threadIdx.x; i < elems; i += blockDim.x) {
      const uint32_t j = i / d, c = i % d;
      const uint32_t t = chosen[j % count];
      out[RepresentativeOffset(s, b, h, j) + c] =
          LoadAsFloat(keys, BlockKeyOffset(s, h, t) + c, kDt);
    }
  } else {
    for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
      float sum = 0.0f;
      for (uint32_t j = 0; j < count; ++j) {
        sum += LoadAsFloat(keys, BlockKeyOffset(s, h, chosen[j]) + c, kDt);
      }
      out[RepresentativeOffset(s, b, h, 0) + c] = sum / static_cast<float>(count);
    }
  }
}

// kMean / kMinMax for one (block, kv head). Thread (group g, chunk v) accumulates
// channels [v * kVec, v * kVec + kVec) over tokens g, g + groups, ...; the groups'
// partials meet in shared memory: float [groups][head_dim] (sums or minima), then
// [groups][head_dim] maxima.
template <DType kDt>
__device__ void SummaryItem(const RepresentativeShape& s, uint64_t b, uint32_t h,
                            const unsigned char* keys, uint32_t valid, uint32_t chunks_per_row,
                            uint32_t groups, float* out, float* smem) {
  constexpr uint32_t n = kVec<kDt>;
  const uint32_t d = s.head_dim;
  const bool mean = s.mode == RepresentativeMode::kMean;
  const uint32_t v = threadIdx.x % chunks_per_row, g = threadIdx.x / chunks_per_row;
  const uint32_t c0 = v * n;
  if (g < groups) {
    const unsigned char* head = keys + BlockKeyOffset(s, h, 0) * kElemBytes<kDt>;
    const uint64_t row_bytes = uint64_t{d} * kElemBytes<kDt>;
    float x[n];
    if (mean) {
      float sum[n];
#pragma unroll
      for (uint32_t i = 0; i < n; ++i) sum[i] = 0.0f;
#pragma unroll 4
      for (uint32_t t = g; t < valid; t += groups) {
        LoadChunk<kDt>(head + t * row_bytes, c0, d, x);
#pragma unroll
        for (uint32_t i = 0; i < n; ++i) sum[i] += x[i];
      }
#pragma unroll
      for (uint32_t i = 0; i < n; ++i) {
        if (c0 + i < d) smem[g * d + c0 + i] = sum[i];
      }
    } else {
      float lo[n], hi[n];
#pragma unroll
      for (uint32_t i = 0; i < n; ++i) lo[i] = hi[i] = __int_as_float(0x7FC00000);  // NaN
#pragma unroll 4
      for (uint32_t t = g; t < valid; t += groups) {
        LoadChunk<kDt>(head + t * row_bytes, c0, d, x);
#pragma unroll
        for (uint32_t i = 0; i < n; ++i) {
          lo[i] = fminf(lo[i], x[i]);
          hi[i] = fmaxf(hi[i], x[i]);
        }
      }
#pragma unroll
      for (uint32_t i = 0; i < n; ++i) {
        if (c0 + i < d) {
          smem[g * d + c0 + i] = lo[i];
          smem[(groups + g) * d + c0 + i] = hi[i];
        }
      }
    }
  }
  __syncthreads();
  for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
    if (mean) {
      float total = 0.0f;
      for (uint32_t k = 0; k < groups; ++k) total += smem[k * d + c];
      out[RepresentativeOffset(s, b, h, 0) + c] = total / static_cast<float>(valid);
    } else {
      float lo = smem[c], hi = smem[groups * d + c];
      for (uint32_t k = 1; k < groups; ++k) {
        lo = fminf(lo, smem[k * d + c]);
        hi = fmaxf(hi, smem[(groups + k) * d + c]);
      }
      out[RepresentativeOffset(s, b, h, 0) + c] = lo;
      out[RepresentativeOffset(s, b, h, 1) + c] = hi;
    }
  }
}

// One thread block per (block, kv head), looping when there are more than the grid.
template <DType kDt>
__global__ void __launch_bounds__(kThreads)
    RepresentativesKernel(RepresentativeShape s, const void* const* blocks, const float* scores,
                          const uint32_t* valid_tokens, float* out, uint32_t chunks_per_row,
                          uint32_t groups) {
  extern __shared__ __align__(16) unsigned char smem[];
  const bool top = s.mode == RepresentativeMode::kTopR || s.mode == RepresentativeMode::kTopRMean;
  const uint64_t items = uint64_t{s.num_blocks} * s.num_kv_heads;
  for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const uint64_t b = item / s.num_kv_heads;
    const uint32_t h = static_cast<uint32_t>(item % s.num_kv_heads);
    const auto* keys = static_cast<const unsigned char*>(blocks[b]);
    const uint32_t valid = ClampValidTokens(valid_tokens, b, s.block_tokens);
    if (top) {
      TopRItem<kDt>(s, b, h, keys, scores, valid, out, smem);
    } else {
      SummaryItem<kDt>(s, b, h, keys, valid, chunks_per_row, groups, out,
                       reinterpret_cast<float*>(smem));
    }
    __syncthreads();  // shared memory is reused by the next item
  }
}

template <DType kDt>
Status Launch(const RepresentativeShape& s, const void* const* blocks, const float* scores,
              const uint32_t* valid_tokens, float* out, StreamHandle stream) {
  const uint32_t chunks_per_row = (s.head_dim + kVec<kDt> - 1) / kVec<kDt>;  // <= 256
  const uint32_t groups = kThreads / chunks_per_row;
  size_t smem_bytes;
  if (s.mode == RepresentativeMode::kTopR || s.mode == RepresentativeMode::kTopRMean) {
    smem_bytes = size_t{s.block_tokens} * 8 + kMaxTopR * 4;
  } else {
    smem_bytes = size_t{groups} * s.head_dim * 4 * (s.mode == RepresentativeMode::kMinMax ? 2 : 1);
  }
  const uint64_t items = uint64_t{s.num_blocks} * s.num_kv_heads;
  const unsigned grid = static_cast<unsigned>(std::min(items, kMaxGrid));
  RepresentativesKernel<kDt><<<grid, kThreads, smem_bytes, stream>>>(
      s, blocks, scores, valid_tokens, out, chunks_per_row, groups);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return Status::Internal(std::string("RepresentativesKernel launch: ") +
                            cudaGetErrorString(err));
  }
  return Status::OK();
}

}  // namespace

Status LaunchComputeRepresentatives(const RepresentativeShape& shape, const void* const* blocks,
                                    const float* scores, const uint32_t* valid_tokens, float* out,
                                    StreamHandle stream) {
  KVTIER_RETURN_IF_ERROR(ValidateRepresentatives(shape, blocks, scores, out));
  switch (shape.dtype) {
    case DType::kF16:
      return Launch<DType::kF16>(shape, blocks, scores, valid_tokens, out, stream);
    case DType::kBF16:
      return Launch<DType::kBF16>(shape, blocks, scores, valid_tokens, out, stream);
    case DType::kF32:
      return Launch<DType::kF32>(shape, blocks, scores, valid_tokens, out, stream);
    case DType::kFP8E4M3:
      return Launch<DType::kFP8E4M3>(shape, blocks, scores, valid_tokens, out, stream);
  }
  return Status::InvalidArgument("ComputeRepresentatives: unknown dtype");
}

}  // namespace kvtier
