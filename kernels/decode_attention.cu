// Flash-decoding over a kvtier block table: a split kernel (per KV head, group of query
// heads and chunk of entries) and a merge kernel (per query head). See the header.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>

#include <string>

#include "kernels/decode_attention.h"

namespace kvtier {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kHeadsPerCta = kWarps;  // warp w keeps the online softmax of head w
constexpr int kTileTokens = 64;       // scores of one tile go through shared memory
constexpr int kUnroll = 4;            // rows loaded before any is used (memory parallelism)
constexpr int kMergeThreads = 256;    // >= kMaxAttentionHeadDim: one thread per channel

// One vector load of a key or value row: 16 bytes (8 bytes for fp8, so that a thread
// holds at most 8 elements), kVec elements; kChunks loads cover head_dim 256.
template <DType kD>
struct KvVec;
template <>
struct KvVec<DType::kF16> {
  using Raw = uint4;
  static constexpr int kVec = 8, kBytes = 2;
};
template <>
struct KvVec<DType::kBF16> {
  using Raw = uint4;
  static constexpr int kVec = 8, kBytes = 2;
};
template <>
struct KvVec<DType::kF32> {
  using Raw = uint4;
  static constexpr int kVec = 4, kBytes = 4;
};
template <>
struct KvVec<DType::kFP8E4M3> {
  using Raw = uint2;
  static constexpr int kVec = 8, kBytes = 1;
};
template <DType kD>
constexpr int kChunks = (kMaxAttentionHeadDim / KvVec<kD>::kVec + 31) / 32;

// Exact widening of kVec packed elements to float (hardware conversions; every value of
// these types is a float, so they agree with LoadAsFloat bit for bit).
template <DType kD>
__device__ __forceinline__ void Unpack(const typename KvVec<kD>::Raw& raw, float* v) {
  if constexpr (kD == DType::kF16) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else if constexpr (kD == DType::kBF16) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  } else if constexpr (kD == DType::kF32) {
    v[0] = __uint_as_float(raw.x);
    v[1] = __uint_as_float(raw.y);
    v[2] = __uint_as_float(raw.z);
    v[3] = __uint_as_float(raw.w);
  } else {
    const uint32_t w[2] = {raw.x, raw.y};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const auto pair = static_cast<__nv_fp8x2_storage_t>((w[i / 2] >> (16 * (i % 2))) & 0xFFFFu);
      const __half2 h(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));
      const float2 f = __half22float2(h);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  }
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

struct SplitParams {
  const float* queries;
  const void* const* table;
  const uint32_t* valid_tokens;
  uint32_t num_entries;
  uint32_t entries_per_chunk;
  uint32_t num_query_heads;
  uint32_t group;       // query heads per KV head
  uint32_t head_tiles;  // ceil(group / kHeadsPerCta)
  uint32_t head_dim;
  uint32_t block_tokens;
  uint64_t values_offset_bytes;
  float scale;
  // Single chunk: the final out [heads][head_dim] and lse (may be null). Several: the
  // chunk's normalized out at out + chunk * heads * head_dim, its lse likewise (never null).
  float* out;
  float* lse;
  // [entries][heads] or null: log masses, turned into masses here when final_pass.
  float* block_mass;
  bool final_pass;
};

// Grid: (num_kv_heads * head_tiles, chunks). Thread layout: `tpr` threads (a power of
// two) share a key/value row, each owning kChunks vectors of kVec channels; the CTA
// covers kThreads / tpr rows at once.
template <DType kD>
__global__ void __launch_bounds__(kThreads) DecodeAttentionSplitKernel(const SplitParams p) {
  using Raw = typename KvVec<kD>::Raw;
  constexpr int kVec = KvVec<kD>::kVec;
  constexpr int kBytes = KvVec<kD>::kBytes;
  constexpr int kC = kChunks<kD>;

  __shared__ float scores_s[kHeadsPerCta][kTileTokens];  // scores, then their weights
  __shared__ float max_s[kHeadsPerCta];                  // running maximum score
  __shared__ float sum_s[kHeadsPerCta];                  // sum of exp(s - max) so far
  __shared__ float entry_sum_s[kHeadsPerCta];            // the same over the current entry
  __shared__ float alpha_s[kHeadsPerCta];                // rescaling of the last tile
  __shared__ float reduce_s[kThreads * 8];               // rows * head_dim <= 1024

  const uint32_t kv_head = blockIdx.x / p.head_tiles;
  const uint32_t head_tile = blockIdx.x % p.head_tiles;
  const uint32_t first_head = kv_head * p.group + head_tile * kHeadsPerCta;
  const int num_heads = min(kHeadsPerCta, static_cast<int>(p.group - head_tile * kHeadsPerCta));
  const uint32_t entry_begin = blockIdx.y * p.entries_per_chunk;
  const uint32_t entry_end = min(p.num_entries, entry_begin + p.entries_per_chunk);
  const uint32_t head_dim = p.head_dim;

  const int vecs_per_row = static_cast<int>(head_dim) / kVec;
  int tpr = 1;
  while (tpr < vecs_per_row && tpr < 32) tpr <<= 1;
  const int rows = kThreads / tpr;
  const int lane_in_row = static_cast<int>(threadIdx.x) % tpr;
  const int row = static_cast<int>(threadIdx.x) / tpr;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;

  int channel[kC];  // first channel of each of this thread's vectors; -1: none
  float q[kHeadsPerCta][kC][kVec];
  float acc[kHeadsPerCta][kC][kVec];
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int vec = c * tpr + lane_in_row;
    channel[c] = vec < vecs_per_row ? vec * kVec : -1;
#pragma unroll
    for (int h = 0; h < kHeadsPerCta; ++h) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        acc[h][c][i] = 0.0f;
        q[h][c][i] = (channel[c] >= 0 && h < num_heads)
                         ? p.queries[uint64_t{first_head + h} * head_dim + channel[c] + i]
                         : 0.0f;
      }
    }
  }
  if (threadIdx.x < kHeadsPerCta) {
    max_s[threadIdx.x] = -INFINITY;
    sum_s[threadIdx.x] = 0.0f;
    entry_sum_s[threadIdx.x] = 0.0f;
  }
  __syncthreads();

  const uint64_t head_offset_bytes = uint64_t{kv_head} * p.block_tokens * head_dim * kBytes;
  for (uint32_t e = entry_begin; e < entry_end; ++e) {
    const uint32_t n = min(p.valid_tokens[e], p.block_tokens);
    const char* block = static_cast<const char*>(p.table[e]);
    for (uint32_t tile_start = 0; tile_start < n; tile_start += kTileTokens) {
      const int tile_n = static_cast<int>(min(n - tile_start, uint32_t{kTileTokens}));
      const char* keys = block + head_offset_bytes + uint64_t{tile_start} * head_dim * kBytes;
      const char* values = keys + p.values_offset_bytes;

      // Scores: every thread of a row takes part in the shuffles, so the trip count is
      // uniform and rows past the tile load zeros.
      for (int t0 = 0; t0 < tile_n; t0 += rows * kUnroll) {
        Raw raw[kUnroll][kC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int t = t0 + u * rows + row;
#pragma unroll
          for (int c = 0; c < kC; ++c) {
            raw[u][c] = Raw{};
            if (t < tile_n && channel[c] >= 0) {
              raw[u][c] = __ldg(reinterpret_cast<const Raw*>(
                  keys + (uint64_t(t) * head_dim + channel[c]) * kBytes));
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          float dot[kHeadsPerCta] = {};
#pragma unroll
          for (int c = 0; c < kC; ++c) {
            float k[kVec];
            Unpack<kD>(raw[u][c], k);
#pragma unroll
            for (int h = 0; h < kHeadsPerCta; ++h) {
              if (h >= num_heads) break;  // uniform over the thread block
#pragma unroll
              for (int i = 0; i < kVec; ++i) dot[h] = fmaf(q[h][c][i], k[i], dot[h]);
            }
          }
#pragma unroll
          for (int h = 0; h < kHeadsPerCta; ++h) {
            if (h >= num_heads) break;
            for (int offset = tpr / 2; offset > 0; offset >>= 1) {
              dot[h] += __shfl_xor_sync(0xFFFFFFFFu, dot[h], offset);
            }
          }
          const int t = t0 + u * rows + row;
          if (lane_in_row == 0 && t < tile_n) {
#pragma unroll
            for (int h = 0; h < kHeadsPerCta; ++h) {
              if (h < num_heads) scores_s[h][t] = dot[h] * p.scale;
            }
          }
        }
      }
      __syncthreads();

      // Online softmax: warp h updates head h's maximum and sums, and turns the tile's
      // scores into weights relative to the new maximum.
      if (warp < num_heads) {
        const float s0 = lane < tile_n ? scores_s[warp][lane] : -INFINITY;
        const float s1 = lane + 32 < tile_n ? scores_s[warp][lane + 32] : -INFINITY;
        const float old_max = max_s[warp];
        const float new_max = fmaxf(old_max, WarpMax(fmaxf(s0, s1)));
        const float w0 = lane < tile_n ? expf(s0 - new_max) : 0.0f;
        const float w1 = lane + 32 < tile_n ? expf(s1 - new_max) : 0.0f;
        if (lane < tile_n) scores_s[warp][lane] = w0;
        if (lane + 32 < tile_n) scores_s[warp][lane + 32] = w1;
        const float tile_sum = WarpSum(w0 + w1);
        if (lane == 0) {
          const float alpha = expf(old_max - new_max);
          sum_s[warp] = sum_s[warp] * alpha + tile_sum;
          entry_sum_s[warp] = entry_sum_s[warp] * alpha + tile_sum;
          max_s[warp] = new_max;
          alpha_s[warp] = alpha;
        }
      }
      __syncthreads();

      // Values: rescale, then accumulate the weighted rows of this tile.
#pragma unroll
      for (int h = 0; h < kHeadsPerCta; ++h) {
        const float alpha = h < num_heads ? alpha_s[h] : 1.0f;
#pragma unroll
        for (int c = 0; c < kC; ++c) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[h][c][i] *= alpha;
        }
      }
      for (int t0 = 0; t0 < tile_n; t0 += rows * kUnroll) {
        Raw raw[kUnroll][kC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int t = t0 + u * rows + row;
#pragma unroll
          for (int c = 0; c < kC; ++c) {
            raw[u][c] = Raw{};
            if (t < tile_n && channel[c] >= 0) {
              raw[u][c] = __ldg(reinterpret_cast<const Raw*>(
                  values + (uint64_t(t) * head_dim + channel[c]) * kBytes));
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int t = t0 + u * rows + row;
          if (t >= tile_n) continue;
          float w[kHeadsPerCta];
#pragma unroll
          for (int h = 0; h < kHeadsPerCta; ++h) w[h] = h < num_heads ? scores_s[h][t] : 0.0f;
#pragma unroll
          for (int c = 0; c < kC; ++c) {
            float v[kVec];
            Unpack<kD>(raw[u][c], v);
#pragma unroll
            for (int h = 0; h < kHeadsPerCta; ++h) {
              if (h >= num_heads) break;
#pragma unroll
              for (int i = 0; i < kVec; ++i) acc[h][c][i] = fmaf(w[h], v[i], acc[h][c][i]);
            }
          }
        }
      }
      __syncthreads();  // scores_s is rewritten by the next tile
    }
    // End of an entry: its log mass, log sum_t exp(s_t) (-inf without tokens).
    if (static_cast<int>(threadIdx.x) < num_heads) {
      if (p.block_mass != nullptr) {
        p.block_mass[uint64_t{e} * p.num_query_heads + first_head + threadIdx.x] =
            max_s[threadIdx.x] + logf(entry_sum_s[threadIdx.x]);
      }
      entry_sum_s[threadIdx.x] = 0.0f;
    }
  }

  // Sum the rows' partial outputs, one head at a time.
  const uint64_t state_offset = p.final_pass ? 0 : uint64_t{blockIdx.y} * p.num_query_heads;
  for (int h = 0; h < num_heads; ++h) {
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      if (channel[c] < 0) continue;
#pragma unroll
      for (int i = 0; i < kVec; ++i) reduce_s[row * head_dim + channel[c] + i] = acc[h][c][i];
    }
    __syncthreads();
    const float sum = sum_s[h];
    for (uint32_t d = threadIdx.x; d < head_dim; d += kThreads) {
      float total = 0.0f;
      for (int r = 0; r < rows; ++r) total += reduce_s[r * head_dim + d];
      p.out[(state_offset + first_head + h) * head_dim + d] = sum == 0.0f ? 0.0f : total / sum;
    }
    __syncthreads();
  }
  if (static_cast<int>(threadIdx.x) < num_heads) {
    const float sum = sum_s[threadIdx.x];
    const float head_lse = sum == 0.0f ? -INFINITY : max_s[threadIdx.x] + logf(sum);
    if (p.lse != nullptr) p.lse[state_offset + first_head + threadIdx.x] = head_lse;
    if (p.final_pass && p.block_mass != nullptr) {
      // This thread wrote these log masses above.
      for (uint32_t e = entry_begin; e < entry_end; ++e) {
        float& mass = p.block_mass[uint64_t{e} * p.num_query_heads + first_head + threadIdx.x];
        mass = AttentionMassFromLogMass(mass, head_lse);
      }
    }
  }
}

// The sum (or maximum) over the thread block, returned to every thread.
template <bool kMax>
__device__ float BlockReduce(float v, float* scratch) {
  v = kMax ? WarpMax(v) : WarpSum(v);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = static_cast<int>(blockDim.x) / 32;
  float r = scratch[0];
  for (int w = 1; w < warps; ++w) r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();  // scratch is reused by the next reduction
  return r;
}

// Grid: one thread block per head. Combines states [num_states][heads][head_dim] with
// their lses; optionally turns the log masses of `block_mass` into masses.
__global__ void __launch_bounds__(kMergeThreads)
    MergeStatesKernel(const float* outs, const float* lses, uint32_t num_states, uint32_t num_heads,
                      uint32_t head_dim, float* out, float* lse, float* block_mass,
                      uint32_t num_entries) {
  __shared__ float scratch_s[kMergeThreads / 32];
  __shared__ float weights_s[kMergeThreads];
  const uint32_t h = blockIdx.x;

  float max_lse = -INFINITY;
  for (uint32_t i = threadIdx.x; i < num_states; i += kMergeThreads) {
    max_lse = fmaxf(max_lse, lses[uint64_t{i} * num_heads + h]);
  }
  max_lse = BlockReduce<true>(max_lse, scratch_s);

  float sum = 0.0f, acc = 0.0f;
  if (max_lse != -INFINITY) {
    for (uint32_t base = 0; base < num_states; base += kMergeThreads) {
      const uint32_t i = base + threadIdx.x;
      const float w = i < num_states ? expf(lses[uint64_t{i} * num_heads + h] - max_lse) : 0.0f;
      weights_s[threadIdx.x] = w;
      sum += w;
      __syncthreads();
      if (threadIdx.x < head_dim) {
        const uint32_t count = min(num_states - base, uint32_t{kMergeThreads});
        for (uint32_t j = 0; j < count; ++j) {
          const float wj = weights_s[j];
          if (wj > 0.0f)
            acc += wj * outs[(uint64_t{base + j} * num_heads + h) * head_dim + threadIdx.x];
        }
      }
      __syncthreads();
    }
    sum = BlockReduce<false>(sum, scratch_s);
  }
  const bool empty = max_lse == -INFINITY;
  const float head_lse = empty ? -INFINITY : max_lse + logf(sum);
  if (threadIdx.x < head_dim) out[uint64_t{h} * head_dim + threadIdx.x] = empty ? 0.0f : acc / sum;
  if (threadIdx.x == 0 && lse != nullptr) lse[h] = head_lse;
  if (block_mass != nullptr) {
    for (uint32_t e = threadIdx.x; e < num_entries; e += kMergeThreads) {
      float& mass = block_mass[uint64_t{e} * num_heads + h];
      mass = AttentionMassFromLogMass(mass, head_lse);
    }
  }
}

Status CudaError(const char* what, cudaError_t err) {
  return Status::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

template <DType kD>
void LaunchSplit(dim3 grid, const SplitParams& p, cudaStream_t stream) {
  DecodeAttentionSplitKernel<kD><<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace

Status LaunchDecodeAttention(const float* queries, uint32_t num_query_heads, uint32_t num_kv_heads,
                             uint32_t head_dim, const void* const* block_table,
                             const uint32_t* valid_tokens, uint32_t num_entries,
                             uint32_t block_tokens, DType dtype, float scale, float* out,
                             float* lse, float* block_mass, void* workspace,
                             uint64_t workspace_bytes, StreamHandle stream) {
  Status s =
      ValidateDecodeAttentionArgs(queries, num_query_heads, num_kv_heads, head_dim, block_table,
                                  valid_tokens, num_entries, block_tokens, dtype, scale, out);
  if (!s.ok()) return s;
  const uint32_t group = num_query_heads / num_kv_heads;
  const uint32_t head_tiles = (group + kHeadsPerCta - 1) / kHeadsPerCta;
  const uint64_t ctas_per_chunk = uint64_t{num_kv_heads} * head_tiles;
  if (ctas_per_chunk > 0x7FFFFFFFu) {
    return Status::InvalidArgument("DecodeAttention: too many heads for one launch");
  }

  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return CudaError("DecodeAttention: device query", err);

  // About two thread blocks per SM; at most one chunk per entry, kMaxAttentionSplits, and
  // what the workspace holds.
  const uint64_t wanted = (2 * uint64_t(sms) + ctas_per_chunk - 1) / ctas_per_chunk;
  uint64_t chunks = wanted < num_entries ? wanted : num_entries;
  if (chunks > kMaxAttentionSplits) chunks = kMaxAttentionSplits;
  const uint64_t state_bytes = uint64_t{num_query_heads} * (uint64_t{head_dim} + 1) * 4;
  const uint64_t fit = workspace == nullptr ? 0 : workspace_bytes / state_bytes;
  if (chunks > fit) chunks = fit;
  if (chunks < 2) chunks = 1;
  const uint64_t entries_per_chunk = (num_entries + chunks - 1) / chunks;
  chunks = (num_entries + entries_per_chunk - 1) / entries_per_chunk;

  SplitParams p;
  p.queries = queries;
  p.table = block_table;
  p.valid_tokens = valid_tokens;
  p.num_entries = num_entries;
  p.entries_per_chunk = static_cast<uint32_t>(entries_per_chunk);
  p.num_query_heads = num_query_heads;
  p.group = group;
  p.head_tiles = head_tiles;
  p.head_dim = head_dim;
  p.block_tokens = block_tokens;
  p.values_offset_bytes =
      AttentionValuesOffset(num_kv_heads, block_tokens, head_dim) * DTypeBytes(dtype);
  p.scale = AttentionScaleOrDefault(scale, head_dim);
  p.block_mass = block_mass;
  p.final_pass = chunks == 1;
  if (p.final_pass) {
    p.out = out;
    p.lse = lse;
  } else {
    p.out = static_cast<float*>(workspace);
    p.lse = p.out + chunks * num_query_heads * head_dim;
  }

  const dim3 grid(static_cast<unsigned>(ctas_per_chunk), static_cast<unsigned>(chunks));
  switch (dtype) {
    case DType::kF16:
      LaunchSplit<DType::kF16>(grid, p, stream);
      break;
    case DType::kBF16:
      LaunchSplit<DType::kBF16>(grid, p, stream);
      break;
    case DType::kF32:
      LaunchSplit<DType::kF32>(grid, p, stream);
      break;
    case DType::kFP8E4M3:
      LaunchSplit<DType::kFP8E4M3>(grid, p, stream);
      break;
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return CudaError("DecodeAttentionSplitKernel launch", err);
  if (p.final_pass) return Status::OK();

  MergeStatesKernel<<<num_query_heads, kMergeThreads, 0, stream>>>(
      p.out, p.lse, static_cast<uint32_t>(chunks), num_query_heads, head_dim, out, lse, block_mass,
      num_entries);
  err = cudaGetLastError();
  if (err != cudaSuccess) return CudaError("MergeStatesKernel launch", err);
  return Status::OK();
}

Status LaunchMergeAttentionStates(const float* outs, const float* lses, uint32_t num_states,
                                  uint32_t num_heads, uint32_t head_dim, float* out, float* lse,
                                  StreamHandle stream) {
  Status s =
      ValidateMergeAttentionStatesArgs(outs, lses, num_states, num_heads, head_dim, out, lse);
  if (!s.ok()) return s;
  if (num_heads > 0x7FFFFFFFu)
    return Status::InvalidArgument("MergeAttentionStates: too many heads");
  MergeStatesKernel<<<num_heads, kMergeThreads, 0, stream>>>(outs, lses, num_states, num_heads,
                                                             head_dim, out, lse, nullptr, 0);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return CudaError("MergeStatesKernel launch", err);
  return Status::OK();
}

}  // namespace kvtier
