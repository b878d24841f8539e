#include <cuda_runtime_api.h>

#include <algorithm>
#include <cub/device/device_radix_sort.cuh>
#include <string>

#include "kernels/block_scoring.h"

namespace kvtier {
namespace {

Status LaunchError(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::OK();
  return Status::Internal(std::string(kernel) + " launch: " + cudaGetErrorString(err));
}

// --- ScoreBlocks ----------------------------------------------------------------------
//
// A team of `lanes` consecutive lanes (a power of two, at most a warp) scores one
// (block, kv head) item: lane l takes chunks l, l + lanes, ... of kVec floats of a row
// (coalesced), sums its share of the products, and the team adds the lanes' partial sums
// with xor shuffles. A thread block scores `tile_blocks` consecutive blocks (all their
// KV heads), gathers the items' scores in shared memory and writes them out in order.

constexpr unsigned kScoreThreads = 256;
constexpr uint64_t kMaxGrid = uint64_t{1} << 20;

template <int kVec>
struct Chunk {
  float v[kVec];
};

template <int kVec>
__device__ __forceinline__ Chunk<kVec> LoadChunk(const float* row, uint32_t chunk,
                                                 uint32_t head_dim) {
  Chunk<kVec> c;
  if constexpr (kVec == 4) {  // head_dim % 4 == 0 and 16-byte aligned rows: all or none
    if (chunk * 4 < head_dim) {
      const float4 x = __ldg(reinterpret_cast<const float4*>(row) + chunk);
      c.v[0] = x.x;
      c.v[1] = x.y;
      c.v[2] = x.z;
      c.v[3] = x.w;
    } else {
      c.v[0] = c.v[1] = c.v[2] = c.v[3] = 0.0f;
    }
  } else {
    c.v[0] = chunk < head_dim ? __ldg(row + chunk) : 0.0f;
  }
  return c;
}

__device__ __forceinline__ float TeamSum(float v, uint32_t lanes, unsigned mask) {
  for (uint32_t offset = lanes / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(mask, v, offset);
  }
  return v;
}

// The score of one (block n, kv head) item: the sum over the group's query heads of
// the head's score (see block_scoring.h). Every lane of the team returns it. The loops
// stream the rows chunk by chunk, so registers do not grow with head_dim; the block's
// representatives come from memory once (kMaxDot re-reads them from L1 for each head
// after the first) and the few KiB of queries stay in L1.
template <int kVec>
__device__ float ScoreItem(const BlockScoringShape& s, const float* queries, const float* reps,
                           uint64_t n, uint32_t kv, uint32_t lane, uint32_t lanes, unsigned mask) {
  const uint32_t d = s.head_dim, group = s.num_query_heads / s.num_kv_heads;
  const uint32_t row_chunks = (d + kVec - 1) / kVec;
  const float* q_group = queries + uint64_t{kv} * group * d;
  const float* rep0 = reps + ScoringRepOffset(s, n, kv, 0);
  const uint32_t reps_per_block = s.reps_per_block;

  if (s.mode == BlockScoreMode::kMeanDot) {
    // (1/R) sum_q sum_j q . r_j = (1/R) sum_j (sum_q q) . r_j: sum the group's queries.
    float acc = 0.0f;
#pragma unroll 2
    for (uint32_t c = lane; c < row_chunks; c += lanes) {
      Chunk<kVec> qsum = LoadChunk<kVec>(q_group, c, d);
      for (uint32_t qi = 1; qi < group; ++qi) {
        const Chunk<kVec> x = LoadChunk<kVec>(q_group + uint64_t{qi} * d, c, d);
#pragma unroll
        for (int e = 0; e < kVec; ++e) qsum.v[e] += x.v[e];
      }
#pragma unroll 4
      for (uint32_t j = 0; j < reps_per_block; ++j) {
        const Chunk<kVec> x = LoadChunk<kVec>(rep0 + uint64_t{j} * d, c, d);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc += qsum.v[e] * x.v[e];
      }
    }
    return TeamSum(acc, lanes, mask) / static_cast<float>(reps_per_block);
  }

  if (s.mode == BlockScoreMode::kMinMaxBound) {
    float acc = 0.0f;  // over the group's heads and this lane's channels
#pragma unroll 2
    for (uint32_t c = lane; c < row_chunks; c += lanes) {
      const Chunk<kVec> lo = LoadChunk<kVec>(rep0, c, d);
      const Chunk<kVec> hi = LoadChunk<kVec>(rep0 + d, c, d);
#pragma unroll 4
      for (uint32_t qi = 0; qi < group; ++qi) {
        const Chunk<kVec> x = LoadChunk<kVec>(q_group + uint64_t{qi} * d, c, d);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc += fmaxf(x.v[e] * lo.v[e], x.v[e] * hi.v[e]);
      }
    }
    return TeamSum(acc, lanes, mask);
  }

  // kMaxDot: per query head the max over the representatives, so each (head, rep) dot
  // is reduced across the team.
  float total = 0.0f;
  for (uint32_t qi = 0; qi < group; ++qi) {
    const float* q = q_group + uint64_t{qi} * d;
    float best = 0.0f;
    for (uint32_t j = 0; j < reps_per_block; ++j) {
      const float* r = rep0 + uint64_t{j} * d;
      float dot = 0.0f;
#pragma unroll 4
      for (uint32_t c = lane; c < row_chunks; c += lanes) {
        const Chunk<kVec> x = LoadChunk<kVec>(q, c, d), y = LoadChunk<kVec>(r, c, d);
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot += x.v[e] * y.v[e];
      }
      dot = TeamSum(dot, lanes, mask);
      best = j == 0 ? dot : fmaxf(best, dot);
    }
    total += best;
  }
  return total;
}

template <int kVec>
__global__ void __launch_bounds__(kScoreThreads)
    ScoreBlocksKernel(BlockScoringShape s, const float* queries, const float* reps, float* scores,
                      uint32_t lanes, uint32_t tile_blocks) {
  extern __shared__ float item_scores[];  // [tile_blocks][num_kv_heads]
  const uint32_t teams = blockDim.x / lanes;
  const uint32_t team = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  const uint32_t warp_lane0 = (threadIdx.x % 32) / lanes * lanes;
  const unsigned mask = lanes == 32 ? 0xFFFFFFFFu : ((1u << lanes) - 1u) << warp_lane0;
  const uint32_t heads = s.num_kv_heads;
  const uint64_t tiles = (uint64_t{s.num_blocks} + tile_blocks - 1) / tile_blocks;
  for (uint64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const uint64_t n0 = tile * tile_blocks;
    const uint64_t left = s.num_blocks - n0;
    const uint32_t nt = left < tile_blocks ? static_cast<uint32_t>(left) : tile_blocks;
    const uint32_t items = nt * heads;
    for (uint32_t item = team; item < items; item += teams) {
      const float score =
          ScoreItem<kVec>(s, queries, reps, n0 + item / heads, item % heads, lane, lanes, mask);
      if (lane == 0) item_scores[item] = score;
    }
    __syncthreads();
    if (s.selection == BlockSelection::kPerLayer) {
      for (uint32_t t = threadIdx.x; t < nt; t += blockDim.x) {
        float layer = 0.0f;
        for (uint32_t kv = 0; kv < heads; ++kv) layer += item_scores[t * heads + kv];
        scores[n0 + t] = layer;
      }
    } else {
      for (uint32_t i = threadIdx.x; i < items; i += blockDim.x) {
        const uint32_t kv = i / nt, t = i % nt;
        scores[uint64_t{kv} * s.num_blocks + n0 + t] = item_scores[t * heads + kv];
      }
    }
    __syncthreads();
  }
}

uint32_t NextPow2(uint32_t x) {
  uint32_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// --- TopKBlocks -------------------------------------------------------------------------
//
// k <= kMaxTileK, or N <= kMaxTile: a tournament. Each thread block sorts a tile of up to
// kMaxTile ScoreRankKeys in shared memory (bitonic, descending) and keeps its first k;
// the survivors of a round (k per tile) are the next round's input, until one tile
// holds them all, whose first k are the answer. Tiles hold at least 2k keys, so every
// round at least halves the candidates (less k). Padding keys are 0, below every key.
// Otherwise (large k over a large N): CUB's device radix sort of each row's keys.

constexpr uint32_t kMaxTile = 4096;  // 32 KiB of keys
constexpr uint32_t kMaxTileK = kMaxTile / 2;
constexpr uint32_t kMaxRowsGrid = 65535;

bool UseTournament(uint32_t num_blocks, uint32_t k) {
  return num_blocks <= kMaxTile || k <= kMaxTileK;
}

uint64_t AlignUp(uint64_t x) { return (x + 255) / 256 * 256; }

// Candidates per row after the first round (only when N > kMaxTile).
uint64_t FirstRoundCandidates(uint32_t num_blocks, uint32_t k) {
  return (uint64_t{num_blocks} + kMaxTile - 1) / kMaxTile * k;
}

__device__ void BitonicSortDescending(uint64_t* keys, uint32_t n) {  // n: a power of two
  for (uint32_t size = 2; size <= n; size *= 2) {
    for (uint32_t stride = size / 2; stride > 0; stride /= 2) {
      for (uint32_t i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const uint32_t lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const uint64_t a = keys[lo], b = keys[hi];
        if ((a < b) == descending) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// One tile of one row. Input: the row's scores (first round) or its candidate keys.
// Output: the tile's k best keys into keys_out[row][tile * k...], or, in the last round
// (one tile per row), their block indices into top_blocks[row][0..k).
__global__ void TopKTileKernel(const float* scores, const uint64_t* keys_in, uint32_t num_rows,
                               uint32_t count, uint64_t in_row_stride, uint32_t tile, uint32_t k,
                               uint64_t* keys_out, uint64_t out_row_stride, int32_t* top_blocks) {
  extern __shared__ uint64_t tile_keys[];
  const uint64_t base = uint64_t{blockIdx.x} * tile;
  for (uint32_t row = blockIdx.y; row < num_rows; row += gridDim.y) {
    for (uint32_t i = threadIdx.x; i < tile; i += blockDim.x) {
      const uint64_t pos = base + i;
      uint64_t key = 0;
      if (pos < count) {
        key = scores != nullptr
                  ? ScoreRankKey(scores[row * in_row_stride + pos], static_cast<uint32_t>(pos))
                  : keys_in[row * in_row_stride + pos];
      }
      tile_keys[i] = key;
    }
    __syncthreads();
    BitonicSortDescending(tile_keys, tile);
    for (uint32_t j = threadIdx.x; j < k; j += blockDim.x) {
      if (top_blocks != nullptr) {
        top_blocks[uint64_t{row} * k + j] = static_cast<int32_t>(RankKeyIndex(tile_keys[j]));
      } else {
        keys_out[row * out_row_stride + uint64_t{blockIdx.x} * k + j] = tile_keys[j];
      }
    }
    __syncthreads();
  }
}

__global__ void RankKeysKernel(const float* scores, uint64_t total, uint32_t num_blocks,
                               uint64_t* keys) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < total;
       i += uint64_t{gridDim.x} * blockDim.x) {
    keys[i] = ScoreRankKey(scores[i], static_cast<uint32_t>(i % num_blocks));
  }
}

__global__ void FirstKKernel(const uint64_t* sorted, uint32_t num_rows, uint32_t num_blocks,
                             uint32_t k, int32_t* top_blocks) {
  const uint64_t total = uint64_t{num_rows} * k;
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < total;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const uint64_t row = i / k, j = i % k;
    top_blocks[i] = static_cast<int32_t>(RankKeyIndex(sorted[row * num_blocks + j]));
  }
}

unsigned GridFor(uint64_t work, unsigned threads) {
  return static_cast<unsigned>(std::clamp<uint64_t>((work + threads - 1) / threads, 1, kMaxGrid));
}

Status LaunchTile(const float* scores, const uint64_t* keys_in, uint32_t num_rows, uint32_t count,
                  uint64_t in_row_stride, uint32_t tile, uint32_t k, uint64_t* keys_out,
                  uint64_t out_row_stride, int32_t* top_blocks, StreamHandle stream) {
  const dim3 grid((count + tile - 1) / tile, std::min(num_rows, kMaxRowsGrid));
  const unsigned threads = std::clamp(tile / 2, 32u, 512u);
  TopKTileKernel<<<grid, threads, size_t{tile} * 8, stream>>>(scores, keys_in, num_rows, count,
                                                              in_row_stride, tile, k, keys_out,
                                                              out_row_stride, top_blocks);
  return LaunchError("TopKTileKernel");
}

Status CubTempBytes(uint32_t num_blocks, size_t* bytes) {
  *bytes = 0;
  const cudaError_t err = cub::DeviceRadixSort::SortKeysDescending(
      nullptr, *bytes, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
      num_blocks);
  if (err != cudaSuccess) {
    return Status::Internal(std::string("TopKBlocks: radix sort workspace query: ") +
                            cudaGetErrorString(err));
  }
  return Status::OK();
}

}  // namespace

Status LaunchScoreBlocks(const BlockScoringShape& s, const float* queries,
                         const float* representatives, float* scores, StreamHandle stream) {
  KVTIER_RETURN_IF_ERROR(ValidateScoreBlocks(s, queries, representatives, scores));
  const bool vec4 = s.head_dim % 4 == 0 && reinterpret_cast<uintptr_t>(queries) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(representatives) % 16 == 0;
  // About 16 floats of a row per lane; a power of two, at most a warp.
  const uint32_t lanes = std::min(32u, NextPow2((s.head_dim + 15) / 16));
  const uint32_t teams = kScoreThreads / lanes;
  const uint32_t tile_blocks = std::max(1u, teams / s.num_kv_heads);
  const uint64_t tiles = (uint64_t{s.num_blocks} + tile_blocks - 1) / tile_blocks;
  const unsigned grid = static_cast<unsigned>(std::min(tiles, kMaxGrid));
  const size_t smem_bytes = size_t{tile_blocks} * s.num_kv_heads * 4;  // <= 16 KiB
  if (vec4) {
    ScoreBlocksKernel<4><<<grid, kScoreThreads, smem_bytes, stream>>>(s, queries, representatives,
                                                                      scores, lanes, tile_blocks);
  } else {
    ScoreBlocksKernel<1><<<grid, kScoreThreads, smem_bytes, stream>>>(s, queries, representatives,
                                                                      scores, lanes, tile_blocks);
  }
  return LaunchError("ScoreBlocksKernel");
}

Result<uint64_t> TopKWorkspaceBytes(uint32_t num_rows, uint32_t num_blocks, uint32_t k) {
  const float dummy_score = 0.0f;
  int32_t dummy_block = 0;
  KVTIER_RETURN_IF_ERROR(ValidateTopKBlocks(&dummy_score, num_rows, num_blocks, k, &dummy_block));
  if (UseTournament(num_blocks, k)) {
    if (num_blocks <= kMaxTile) return uint64_t{0};
    return 2 * AlignUp(uint64_t{num_rows} * FirstRoundCandidates(num_blocks, k) * 8);
  }
  size_t temp = 0;
  KVTIER_RETURN_IF_ERROR(CubTempBytes(num_blocks, &temp));
  return 2 * AlignUp(uint64_t{num_rows} * num_blocks * 8) + AlignUp(temp);
}

Status LaunchTopKBlocks(const float* scores, uint32_t num_rows, uint32_t num_blocks, uint32_t k,
                        int32_t* top_blocks, void* workspace, uint64_t workspace_bytes,
                        StreamHandle stream) {
  KVTIER_RETURN_IF_ERROR(ValidateTopKBlocks(scores, num_rows, num_blocks, k, top_blocks));
  KVTIER_ASSIGN_OR_RETURN(const uint64_t needed, TopKWorkspaceBytes(num_rows, num_blocks, k));
  if (workspace_bytes < needed || (needed > 0 && workspace == nullptr)) {
    return Status::InvalidArgument("TopKBlocks: workspace of " + std::to_string(workspace_bytes) +
                                   " bytes, needs " + std::to_string(needed));
  }
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    return Status::InvalidArgument("TopKBlocks: workspace not 256-byte aligned");
  }
  auto* ws = static_cast<unsigned char*>(workspace);

  if (UseTournament(num_blocks, k)) {
    if (num_blocks <= kMaxTile) {
      return LaunchTile(scores, nullptr, num_rows, num_blocks, num_blocks,
                        std::max(2u, NextPow2(num_blocks)), k, nullptr, 0, top_blocks, stream);
    }
    const uint64_t half = needed / 2;
    uint64_t* buffers[2] = {reinterpret_cast<uint64_t*>(ws),
                            reinterpret_cast<uint64_t*>(ws + half)};
    // First round: from the scores.
    uint64_t count = FirstRoundCandidates(num_blocks, k);
    KVTIER_RETURN_IF_ERROR(LaunchTile(scores, nullptr, num_rows, num_blocks, num_blocks, kMaxTile,
                                      k, buffers[0], count, nullptr, stream));
    int current = 0;
    while (count > kMaxTile) {
      const uint64_t next = (count + kMaxTile - 1) / kMaxTile * k;
      KVTIER_RETURN_IF_ERROR(LaunchTile(nullptr, buffers[current], num_rows,
                                        static_cast<uint32_t>(count), count, kMaxTile, k,
                                        buffers[1 - current], next, nullptr, stream));
      current = 1 - current;
      count = next;
    }
    return LaunchTile(nullptr, buffers[current], num_rows, static_cast<uint32_t>(count), count,
                      std::max(2u, NextPow2(static_cast<uint32_t>(count))), k, nullptr, 0,
                      top_blocks, stream);
  }

  // Large k over a large N: sort each row's keys.
  const uint64_t total = uint64_t{num_rows} * num_blocks;
  const uint64_t keys_bytes = AlignUp(total * 8);
  auto* keys = reinterpret_cast<uint64_t*>(ws);
  auto* sorted = reinterpret_cast<uint64_t*>(ws + keys_bytes);
  void* temp = ws + 2 * keys_bytes;
  size_t temp_bytes = 0;
  KVTIER_RETURN_IF_ERROR(CubTempBytes(num_blocks, &temp_bytes));
  RankKeysKernel<<<GridFor(total, 256), 256, 0, stream>>>(scores, total, num_blocks, keys);
  KVTIER_RETURN_IF_ERROR(LaunchError("RankKeysKernel"));
  for (uint32_t row = 0; row < num_rows; ++row) {
    const cudaError_t err = cub::DeviceRadixSort::SortKeysDescending(
        temp, temp_bytes, keys + uint64_t{row} * num_blocks, sorted + uint64_t{row} * num_blocks,
        num_blocks, 0, 64, stream);
    if (err != cudaSuccess) {
      return Status::Internal(std::string("TopKBlocks: radix sort: ") + cudaGetErrorString(err));
    }
  }
  FirstKKernel<<<GridFor(uint64_t{num_rows} * k, 256), 256, 0, stream>>>(sorted, num_rows,
                                                                         num_blocks, k, top_blocks);
  return LaunchError("FirstKKernel");
}

}  // namespace kvtier
