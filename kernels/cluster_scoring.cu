#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "kernels/cluster_scoring.h"

namespace kvtier {
namespace {

Status LaunchError(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string(kernel) + " launch: " + cudaGetErrorString(err));
}

// --- Pass 1: e_h(b) ----------------------------------------------------------------------
//
// A thread block serves one KV head (blockIdx.y) and a strided set of tiles of
// `tile_blocks` consecutive blocks. A team of `lanes` lanes (a power of two, at most a
// warp) takes one row at a time: lane l converts the row's 8-channel chunks l, l + lanes,
// ... (16-byte loads; kVec = 1: single channels) and dots them with the query heads; the
// team then sums each head's partial dots with xor shuffles, and the row's terms (dot +
// log weight) go to shared memory, [g][tile rows]. After the tile, each (head, block)
// pair combines its block's rows into e_h(b).
//
// Register path (kG > 0: g <= kG, 16-byte chunks, at most one chunk per lane, i.e. head_dim
// <= 256): each lane holds its chunk of the group's kG queries in registers for the whole
// kernel, so a row costs one 16-byte load and 8 kG FMAs per lane, no shared-memory
// traffic; two rows per team are loaded before either is reduced; the reduction is a
// reduce-scatter (each xor step halves the heads a lane carries) when lanes >= kG.
// Generic path (kG = 0): the queries in shared memory (for kVec = 8 each chunk c of head h
// as two float4s, at (2h) * chunks + c and (2h + 1) * chunks + c, so the lanes of a team
// read consecutive float4s), heads in batches of kHeadBatch.

constexpr unsigned kMassThreads = 256;
constexpr uint32_t kHeadBatch = 8;
constexpr uint32_t kMaxGridBlocks = 2048;  // thread blocks over all KV heads, about 16 per SM

template <int kVec>
__device__ __forceinline__ void LoadRowChunk(const uint16_t* __restrict__ row, uint32_t chunk,
                                             float (&x)[kVec]) {
  if constexpr (kVec == 8) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + chunk);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  } else {
    x[0] = __half2float(__ushort_as_half(__ldg(row + chunk)));
  }
}

template <int kVec>
__device__ __forceinline__ float DotChunk(const float (&x)[kVec], const float* q_smem, uint32_t h,
                                          uint32_t chunk, uint32_t chunks) {
  if constexpr (kVec == 8) {
    const float4* q4 = reinterpret_cast<const float4*>(q_smem);
    const float4 a = q4[(2 * h) * chunks + chunk], b = q4[(2 * h + 1) * chunks + chunk];
    float acc = x[0] * a.x;
    acc = fmaf(x[1], a.y, acc);
    acc = fmaf(x[2], a.z, acc);
    acc = fmaf(x[3], a.w, acc);
    acc = fmaf(x[4], b.x, acc);
    acc = fmaf(x[5], b.y, acc);
    acc = fmaf(x[6], b.z, acc);
    return fmaf(x[7], b.w, acc);
  } else {
    return x[0] * q_smem[h * chunks + chunk];
  }
}

__device__ __forceinline__ float TeamSum(float v, uint32_t lanes, unsigned mask) {
  for (uint32_t offset = lanes / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(mask, v, offset);
  }
  return v;
}

// Reduce-scatter of v[0..kG) over a team of `lanes` >= kG lanes: afterwards every lane
// holds in v[0] the team's sum for head lane / (lanes / kG).
template <int kG>
__device__ __forceinline__ void TeamReduceScatter(float (&v)[kG], uint32_t lane, uint32_t lanes,
                                                  unsigned mask) {
  uint32_t offset = lanes / 2;
#pragma unroll
  for (int count = kG; count > 1; count /= 2, offset /= 2) {
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < count / 2; ++i) {
      const float send = upper ? v[i] : v[i + count / 2];
      const float keep = upper ? v[i + count / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(mask, send, offset);
    }
  }
  for (; offset > 0; offset /= 2) v[0] += __shfl_xor_sync(mask, v[0], offset);
}

template <int kVec, int kG>
__global__ void __launch_bounds__(kMassThreads)
    BlockLogMassKernel(BlockMassShape s, const float* __restrict__ queries,
                       const uint16_t* __restrict__ rows, const float* __restrict__ log_weights,
                       float* __restrict__ log_mass, uint32_t lanes, uint32_t tile_blocks) {
  extern __shared__ float4 smem4[];
  const uint32_t kv = blockIdx.y;
  const uint32_t g = s.num_query_heads / s.num_kv_heads;
  const uint32_t d = s.head_dim, chunks = d / kVec, rows_per_block = s.rows;
  const uint32_t tile_rows = tile_blocks * rows_per_block;
  // Generic path: [g][d] queries (chunk-interleaved for kVec 8), then the terms.
  float* q_smem = reinterpret_cast<float*>(smem4);
  float* terms = q_smem + (kG > 0 ? 0 : g * d);  // [g][tile_rows]

  const uint32_t teams = blockDim.x / lanes;
  const uint32_t team = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  const uint32_t warp_lane0 = (threadIdx.x % 32) / lanes * lanes;
  const unsigned mask = lanes == 32 ? 0xFFFFFFFFu : ((1u << lanes) - 1u) << warp_lane0;
  const float* q_group = queries + uint64_t{kv} * g * d;

  float q_reg[kG > 0 ? kG : 1][8];
  if constexpr (kG > 0) {
#pragma unroll
    for (int hh = 0; hh < kG; ++hh) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        q_reg[hh][e] = static_cast<uint32_t>(hh) < g && lane < chunks
                           ? q_group[uint64_t{static_cast<uint32_t>(hh)} * d + lane * 8 + e]
                           : 0.0f;
      }
    }
  } else {
    for (uint32_t i = threadIdx.x; i < g * d; i += blockDim.x) {
      if constexpr (kVec == 8) {
        const uint32_t h = i / d, ch = i % d, chunk = ch / 8, e = ch % 8;
        q_smem[((2 * h + e / 4) * chunks + chunk) * 4 + e % 4] = q_group[i];
      } else {
        q_smem[i] = q_group[i];
      }
    }
    __syncthreads();
  }

  const uint64_t n = s.num_blocks;
  const uint64_t slab = MassRowIndex(s, kv, 0, 0);
  const uint16_t* kv_rows = rows + slab * d;
  const float* kv_lw = log_weights + slab;
  const uint64_t tiles = (n + tile_blocks - 1) / tile_blocks;

  for (uint64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const uint64_t b0 = tile * tile_blocks;
    const uint32_t nb = n - b0 < tile_blocks ? static_cast<uint32_t>(n - b0) : tile_blocks;
    const uint32_t nr = nb * rows_per_block;
    const uint64_t r0 = b0 * rows_per_block;
    if constexpr (kG > 0) {
      constexpr int kUnroll = 2;
      for (uint32_t r = team; r < nr; r += kUnroll * teams) {
        float x[kUnroll][8];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint32_t ru = r + u * teams;
          if (ru < nr && lane < chunks) {
            LoadRowChunk<8>(kv_rows + (r0 + ru) * d, lane, x[u]);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) x[u][e] = 0.0f;
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const uint32_t ru = r + u * teams;  // team-uniform: the shuffles below are safe
          float acc[kG];
#pragma unroll
          for (int hh = 0; hh < kG; ++hh) {
            float a = x[u][0] * q_reg[hh][0];
#pragma unroll
            for (int e = 1; e < 8; ++e) a = fmaf(x[u][e], q_reg[hh][e], a);
            acc[hh] = a;
          }
          if (ru >= nr) continue;
          const float lw = __ldg(kv_lw + r0 + ru);
          if (lanes >= static_cast<uint32_t>(kG)) {
            TeamReduceScatter<kG>(acc, lane, lanes, mask);
            const uint32_t per_head = lanes / kG, h = lane / per_head;
            if (lane % per_head == 0 && h < g) terms[h * tile_rows + ru] = acc[0] + lw;
          } else {
#pragma unroll
            for (int hh = 0; hh < kG; ++hh) {
              const float dot = TeamSum(acc[hh], lanes, mask);
              if (static_cast<uint32_t>(hh) < g && hh % lanes == lane) {
                terms[hh * tile_rows + ru] = dot + lw;
              }
            }
          }
        }
      }
    } else {
      for (uint32_t r = team; r < nr; r += teams) {
        const uint16_t* row = kv_rows + (r0 + r) * d;
        const float lw = __ldg(kv_lw + r0 + r);
        for (uint32_t h0 = 0; h0 < g; h0 += kHeadBatch) {
          const uint32_t hb = g - h0 < kHeadBatch ? g - h0 : kHeadBatch;  // block-uniform
          float acc[kHeadBatch];
#pragma unroll
          for (uint32_t hh = 0; hh < kHeadBatch; ++hh) acc[hh] = 0.0f;
          for (uint32_t c = lane; c < chunks; c += lanes) {
            float x[kVec];
            LoadRowChunk<kVec>(row, c, x);
#pragma unroll
            for (uint32_t hh = 0; hh < kHeadBatch; ++hh) {
              if (hh < hb) acc[hh] += DotChunk<kVec>(x, q_smem, h0 + hh, c, chunks);
            }
          }
#pragma unroll
          for (uint32_t hh = 0; hh < kHeadBatch; ++hh) {
            if (hh >= hb) break;
            const float dot = TeamSum(acc[hh], lanes, mask);
            if (hh % lanes == lane) terms[(h0 + hh) * tile_rows + r] = dot + lw;
          }
        }
      }
    }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < g * nb; i += blockDim.x) {
      const uint32_t h = i / nb, b = i % nb;
      log_mass[(uint64_t{kv} * g + h) * n + b0 + b] =
          MassLogSumExp(terms + h * tile_rows + b * rows_per_block, rows_per_block);
    }
    __syncthreads();
  }
}

// --- Pass 2: Z_h ---------------------------------------------------------------------------
//
// A thread block per query head: each thread keeps a running (max, sum of exp(e - max))
// over its share of the blocks (NaN skipped), then the block merges the pairs.

constexpr unsigned kReduceThreads = 256;

struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum Merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__global__ void __launch_bounds__(kReduceThreads)
    HeadLogSumExpKernel(const float* __restrict__ log_mass, uint32_t n, float* __restrict__ z) {
  __shared__ MaxSum warp_sums[kReduceThreads / 32];
  const float* e = log_mass + uint64_t{blockIdx.x} * n;
  MaxSum acc{-INFINITY, 0.0f};
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float x = e[i];
    if (x > acc.m) {
      acc.s = acc.s * expf(acc.m - x) + 1.0f;
      acc.m = x;
    } else if (x > -INFINITY) {
      acc.s += expf(x - acc.m);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum other{__shfl_xor_sync(0xFFFFFFFFu, acc.m, offset),
                       __shfl_xor_sync(0xFFFFFFFFu, acc.s, offset)};
    acc = Merge(acc, other);
  }
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum total = warp_sums[0];
    for (uint32_t w = 1; w < blockDim.x / 32; ++w) total = Merge(total, warp_sums[w]);
    z[blockIdx.x] = total.m == -INFINITY ? -INFINITY : total.m + logf(total.s);
  }
}

// --- Pass 3: the fusion ------------------------------------------------------------------

constexpr unsigned kFuseThreads = 256;
constexpr uint64_t kMaxGrid = uint64_t{1} << 20;

__global__ void __launch_bounds__(kFuseThreads)
    FuseMassKernel(const float* __restrict__ log_mass, const float* __restrict__ z, uint32_t n,
                   uint32_t score_rows, uint32_t heads_per_row,
                   const uint8_t* __restrict__ candidates, float* __restrict__ scores) {
  const uint64_t total = uint64_t{score_rows} * n;
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < total;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const uint32_t row = static_cast<uint32_t>(i / n), b = static_cast<uint32_t>(i % n);
    scores[i] =
        candidates != nullptr && candidates[b] == 0
            ? -INFINITY
            : FuseBlockMass(log_mass + b, n, z, row * heads_per_row, (row + 1) * heads_per_row);
  }
}

__global__ void GatherKernel(const float* __restrict__ scores, uint32_t num_blocks,
                             const int32_t* __restrict__ top_blocks, uint64_t total, uint32_t k,
                             float* __restrict__ out) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < total;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const int32_t b = top_blocks[i];
    out[i] = b >= 0 && static_cast<uint32_t>(b) < num_blocks
                 ? scores[(i / k) * num_blocks + static_cast<uint32_t>(b)]
                 : NAN;
  }
}

uint32_t NextPow2(uint32_t x) {
  uint32_t p = 1;
  while (p < x) p *= 2;
  return p;
}

unsigned GridFor(uint64_t work, unsigned threads) {
  return static_cast<unsigned>(std::clamp<uint64_t>((work + threads - 1) / threads, 1, kMaxGrid));
}

template <int kVec, int kG>
Status LaunchLogMass(const BlockMassShape& s, const float* queries, const uint16_t* rows,
                     const float* log_weights, float* log_mass, StreamHandle stream) {
  const uint32_t g = s.num_query_heads / s.num_kv_heads;
  const uint32_t chunks = s.head_dim / kVec;
  // About one 16-byte chunk per lane (8 channels); a power of two, at most a warp.
  const uint32_t lanes = std::min(32u, NextPow2((chunks * kVec + 7) / 8));
  // About 128 rows per tile (64 on the generic path, whose queries also take shared memory).
  const uint32_t tile_blocks = std::max(1u, (kG > 0 ? 128u : 64u) / s.rows);
  const uint64_t tiles = (uint64_t{s.num_blocks} + tile_blocks - 1) / tile_blocks;
  const uint64_t per_head = std::max<uint64_t>(1, kMaxGridBlocks / s.num_kv_heads);
  const dim3 grid(static_cast<unsigned>(std::min(tiles, per_head)), s.num_kv_heads);
  const size_t smem_bytes =
      ((kG > 0 ? 0 : size_t{g} * s.head_dim) + size_t{g} * tile_blocks * s.rows) * 4;
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(BlockLogMassKernel<kVec, kG>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem_bytes));
    if (err != cudaSuccess) {
      return Status::Internal(std::string("EstimateBlockMass: shared memory of ") +
                              std::to_string(smem_bytes) + " bytes: " + cudaGetErrorString(err));
    }
  }
  BlockLogMassKernel<kVec, kG><<<grid, kMassThreads, smem_bytes, stream>>>(
      s, queries, rows, log_weights, log_mass, lanes, tile_blocks);
  return LaunchError("BlockLogMassKernel");
}

}  // namespace

Status LaunchEstimateBlockMass(const BlockMassShape& s, const float* queries, const uint16_t* rows,
                               const float* log_weights, const uint8_t* candidates, float* scores,
                               void* workspace, uint64_t workspace_bytes, StreamHandle stream) {
  KVTIER_RETURN_IF_ERROR(
      ValidateEstimateBlockMass(s, queries, rows, log_weights, scores, workspace, workspace_bytes));
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    return Status::InvalidArgument("EstimateBlockMass: workspace not 256-byte aligned");
  }
  const uint32_t n = s.num_blocks, hq = s.num_query_heads;
  float* log_mass = static_cast<float*>(workspace);
  float* z = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) +
                                      MassAlignUp(uint64_t{hq} * n * 4));
  const bool vec8 = s.head_dim % 8 == 0 && reinterpret_cast<uintptr_t>(rows) % 16 == 0;
  const uint32_t g = hq / s.num_kv_heads;
  Status launched;
  if (vec8 && s.head_dim <= 256 && g <= 4) {
    launched = LaunchLogMass<8, 4>(s, queries, rows, log_weights, log_mass, stream);
  } else if (vec8 && s.head_dim <= 256 && g <= 8) {
    launched = LaunchLogMass<8, 8>(s, queries, rows, log_weights, log_mass, stream);
  } else if (vec8) {
    launched = LaunchLogMass<8, 0>(s, queries, rows, log_weights, log_mass, stream);
  } else {
    launched = LaunchLogMass<1, 0>(s, queries, rows, log_weights, log_mass, stream);
  }
  KVTIER_RETURN_IF_ERROR(launched);
  HeadLogSumExpKernel<<<hq, kReduceThreads, 0, stream>>>(log_mass, n, z);
  KVTIER_RETURN_IF_ERROR(LaunchError("HeadLogSumExpKernel"));
  const uint32_t score_rows = MassScoreRows(s);
  FuseMassKernel<<<GridFor(uint64_t{score_rows} * n, kFuseThreads), kFuseThreads, 0, stream>>>(
      log_mass, z, n, score_rows, hq / score_rows, candidates, scores);
  return LaunchError("FuseMassKernel");
}

Status LaunchGatherBlockScores(const float* scores, uint32_t num_rows, uint32_t num_blocks,
                               const int32_t* top_blocks, uint32_t k, float* out,
                               StreamHandle stream) {
  KVTIER_RETURN_IF_ERROR(
      ValidateGatherBlockScores(scores, num_rows, num_blocks, top_blocks, k, out));
  const uint64_t total = uint64_t{num_rows} * k;
  GatherKernel<<<GridFor(total, 256), 256, 0, stream>>>(scores, num_blocks, top_blocks, total, k,
                                                        out);
  return LaunchError("GatherKernel");
}

}  // namespace kvtier
