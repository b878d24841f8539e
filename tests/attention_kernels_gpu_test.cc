// Decode attention, attention-state merging and fp8 block quantization on the GPU against
// their CPU references, on fresh random inputs. Skips without a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_runtime.h"
#include "kernels/decode_attention.h"
#include "kernels/dtype_convert.h"
#include "kernels/quantize.h"

#if KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {
namespace {

#if KVTIER_WITH_CUDA
// Device memory for one test, filled with 0xFF (NaN as float) until written.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(uint64_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&ptr_, bytes ? bytes : 1) != cudaSuccess) ptr_ = nullptr;
    if (ptr_ != nullptr) cudaMemset(ptr_, 0xFF, bytes ? bytes : 1);
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  bool ok() const { return ptr_ != nullptr; }
  void Upload(const void* src) const {
    ASSERT_EQ(cudaMemcpy(ptr_, src, bytes_, cudaMemcpyHostToDevice), cudaSuccess);
  }
  template <typename T>
  std::vector<T> Download() const {
    std::vector<T> host(bytes_ / sizeof(T));
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }

 private:
  void* ptr_ = nullptr;
  uint64_t bytes_;
};

struct QuantCase {
  DType dtype;
  uint32_t kv_heads, block_tokens, head_dim, blocks;
};

uint64_t RoundUp(uint64_t x, uint64_t to) { return (x + to - 1) / to * to; }

// A pool of random blocks on the host and, at the same offsets, on the device.
struct BlockPool {
  uint64_t stride;  // bytes between blocks (256-byte aligned, like cudaMalloc)
  std::vector<unsigned char> host;
  DeviceBuffer device;
  BlockPool(uint64_t block_bytes, uint32_t count)
      : stride(RoundUp(block_bytes, 256)), host(stride * count), device(stride * count) {}
  const void* HostBlock(uint32_t i) const { return host.data() + i * stride; }
  const void* DeviceBlock(uint32_t i) const { return device.get<unsigned char>() + i * stride; }
};

bool Close(float got, float want, double rel, double abs) {
  if (std::isnan(got) || std::isnan(want)) return false;
  if (std::isinf(want)) return got == want;
  return std::fabs(double(got) - want) <= abs + rel * std::fabs(double(want));
}

struct AttentionCase {
  DType dtype;
  uint32_t kv_heads, group, head_dim, block_tokens, entries;
  bool workspace;
  bool large_logits = false;
  std::string ToString() const {
    return std::string(DTypeName(dtype)) + " kv_heads=" + std::to_string(kv_heads) +
           " group=" + std::to_string(group) + " head_dim=" + std::to_string(head_dim) +
           " block_tokens=" + std::to_string(block_tokens) + " entries=" + std::to_string(entries) +
           (workspace ? " split" : " single-pass") + (large_logits ? " large-logits" : "");
  }
};

// Runs LaunchDecodeAttention and DecodeAttentionRef on one random case and compares
// out, lse and masses: relative 1e-3 / absolute 1e-4 (the same float math summed in
// another order, typically 1e-6 apart). The 0xFF poison is NaN: an output left unwritten
// fails the comparison.
void CheckAttention(const AttentionCase& c, std::mt19937_64& rng) {
  SCOPED_TRACE(c.ToString());
  const uint32_t heads = c.kv_heads * c.group, dim = c.head_dim;
  const uint64_t block_elements = 2ull * c.kv_heads * c.block_tokens * dim;
  const uint32_t pool_blocks = std::max(1u, c.entries * 2 / 3);
  BlockPool pool(block_elements * DTypeBytes(c.dtype), pool_blocks);
  ASSERT_TRUE(pool.device.ok());
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::bernoulli_distribution coin(0.5);
  std::uniform_int_distribution<int> key_int(0, 255), query_int(48, 64);
  // Large logits: q.k ~ +-1e3 made exact in float on both sides (integer queries, keys
  // m/16 with a sign aligned with the query's, scale 1/16), so GPU and reference scores
  // agree bit for bit and the usual tolerance applies.
  std::vector<int> sign(uint64_t{c.kv_heads} * dim);
  for (int& x : sign) x = coin(rng) ? 1 : -1;
  for (uint32_t b = 0; b < pool_blocks; ++b) {
    void* block = pool.host.data() + b * pool.stride;
    for (uint64_t i = 0; i < block_elements; ++i) {
      float v = uniform(rng);
      if (c.large_logits && i < block_elements / 2) {
        const uint64_t row = i / dim;  // kv_head * block_tokens + token
        const int token_sign = (row * 0x9E3779B97F4A7C15ull >> 60) & 1 ? 1 : -1;
        v = float(sign[row / c.block_tokens * dim + i % dim] * token_sign * key_int(rng)) / 16;
      }
      StoreFromFloat(block, i, c.dtype, v);
    }
  }
  pool.device.Upload(pool.host.data());

  std::vector<float> q(uint64_t{heads} * dim);
  for (uint64_t i = 0; i < q.size(); ++i) {
    const uint32_t kv_head = static_cast<uint32_t>(i / dim) / c.group;
    q[i] = c.large_logits ? float(sign[uint64_t{kv_head} * dim + i % dim] * query_int(rng))
                          : normal(rng);
  }
  const float scale = c.large_logits ? 1.0f / 16 : 0.0f;

  // Entries: random pool blocks with repeats, in random order; random valid counts, a
  // partial last entry and one empty entry when there are several.
  std::uniform_int_distribution<uint32_t> pick(0, pool_blocks - 1), tokens(1, c.block_tokens);
  std::vector<const void*> host_table, device_table;
  std::vector<uint32_t> valid;
  for (uint32_t e = 0; e < c.entries; ++e) {
    const uint32_t b = pick(rng);
    host_table.push_back(pool.HostBlock(b));
    device_table.push_back(pool.DeviceBlock(b));
    valid.push_back(e == c.entries - 1          ? std::max(1u, tokens(rng) / 2)
                    : (e == 1 && c.entries > 3) ? 0
                                                : tokens(rng));
  }
  DeviceBuffer d_table(device_table.size() * sizeof(void*)), d_valid(valid.size() * 4),
      d_q(q.size() * 4), d_out(q.size() * 4), d_lse(heads * 4),
      d_mass(uint64_t{c.entries} * heads * 4),
      d_workspace(c.workspace ? DecodeAttentionWorkspaceBytes(heads, dim, c.entries) : 0);
  d_table.Upload(device_table.data());
  d_valid.Upload(valid.data());
  d_q.Upload(q.data());

  Status s = LaunchDecodeAttention(
      d_q.get<float>(), heads, c.kv_heads, dim, d_table.get<const void* const>(),
      d_valid.get<uint32_t>(), c.entries, c.block_tokens, c.dtype, scale, d_out.get<float>(),
      d_lse.get<float>(), d_mass.get<float>(), c.workspace ? d_workspace.get() : nullptr,
      c.workspace ? DecodeAttentionWorkspaceBytes(heads, dim, c.entries) : 0, nullptr);
  ASSERT_TRUE(s.ok()) << s.message();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto out = d_out.Download<float>(), lse = d_lse.Download<float>(),
             mass = d_mass.Download<float>();

  std::vector<float> want_out(q.size()), want_lse(heads), want_mass(mass.size());
  ASSERT_TRUE(DecodeAttentionRef(q.data(), heads, c.kv_heads, dim, host_table.data(), valid.data(),
                                 c.entries, c.block_tokens, c.dtype, scale, want_out.data(),
                                 want_lse.data(), want_mass.data(), nullptr, 0, nullptr)
                  .ok());
  const double rel = 1e-3, abs = 1e-4;
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_TRUE(Close(out[i], want_out[i], rel, abs))
        << "out[" << i << "] gpu " << out[i] << " ref " << want_out[i];
  }
  for (uint32_t h = 0; h < heads; ++h) {
    ASSERT_TRUE(Close(lse[h], want_lse[h], rel, abs))
        << "lse[" << h << "] gpu " << lse[h] << " ref " << want_lse[h];
  }
  for (size_t i = 0; i < mass.size(); ++i) {
    ASSERT_TRUE(Close(mass[i], want_mass[i], rel, abs))
        << "mass[" << i << "] gpu " << mass[i] << " ref " << want_mass[i];
  }
}

#endif  // KVTIER_WITH_CUDA

TEST(AttentionKernelsGpuTest, DecodeAttentionMatchesReference) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32, DType::kFP8E4M3}) {
    for (uint32_t group : {1u, 4u, 7u, 8u}) {
      for (uint32_t head_dim : {64u, 128u, 256u}) {
        for (uint32_t block_tokens : {16u, 128u}) {
          for (bool workspace : {false, true}) {
            CheckAttention({dtype, 2, group, head_dim, block_tokens, 7, workspace}, rng);
            if (HasFailure()) return;
          }
        }
      }
    }
  }
#endif
}

TEST(AttentionKernelsGpuTest, DecodeAttentionOddShapesAndLongTables) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const AttentionCase cases[] = {
      {DType::kBF16, 3, 3, 80, 32, 5, true},         // head_dim not a power of two
      {DType::kF16, 1, 5, 96, 48, 9, true},          // group 5: tiles of 4 and 1
      {DType::kF32, 2, 16, 200, 24, 4, true},        // two head tiles, f32 with two vectors
      {DType::kFP8E4M3, 4, 2, 8, 256, 3, false},     // tiny head_dim, one thread per row
      {DType::kBF16, 8, 4, 128, 16, 400, true},      // Llama-3-8B shape: many chunks
      {DType::kF16, 32, 1, 128, 128, 70, true},      // Llama-2-7B shape
      {DType::kBF16, 4, 7, 128, 256, 1, true},       // one entry: no split possible
      {DType::kBF16, 2, 4, 128, 64, 6, true, true},  // large logits, split
      {DType::kF16, 2, 7, 256, 16, 6, false, true},  // large logits, single pass
      {DType::kF32, 1, 8, 64, 128, 3, true, true},   // large logits, f32
  };
  for (const AttentionCase& c : cases) {
    CheckAttention(c, rng);
    if (HasFailure()) return;
  }
#endif
}

TEST(AttentionKernelsGpuTest, MergeAttentionStatesMatchesReference) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint32_t states : {1u, 2u, 7u, 300u}) {
    for (uint32_t dim : {64u, 256u}) {
      const uint32_t heads = 5;
      std::vector<float> outs(uint64_t{states} * heads * dim), lses(uint64_t{states} * heads);
      for (float& x : outs) x = normal(rng);
      for (float& x : lses) x = 20.0f * normal(rng);
      // State 0 of head 1 is empty (its out is garbage); head 2 is empty everywhere.
      lses[1] = -std::numeric_limits<float>::infinity();
      for (uint32_t d = 0; d < dim; ++d) outs[uint64_t{1} * dim + d] = std::nanf("");
      for (uint32_t i = 0; i < states; ++i) lses[uint64_t{i} * heads + 2] = lses[1];
      DeviceBuffer d_outs(outs.size() * 4), d_lses(lses.size() * 4), d_out(heads * dim * 4),
          d_lse(heads * 4);
      d_outs.Upload(outs.data());
      d_lses.Upload(lses.data());
      ASSERT_TRUE(LaunchMergeAttentionStates(d_outs.get<float>(), d_lses.get<float>(), states,
                                             heads, dim, d_out.get<float>(), d_lse.get<float>(),
                                             nullptr)
                      .ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<float> want_out(heads * dim), want_lse(heads);
      ASSERT_TRUE(MergeAttentionStatesRef(outs.data(), lses.data(), states, heads, dim,
                                          want_out.data(), want_lse.data(), nullptr)
                      .ok());
      const auto out = d_out.Download<float>(), lse = d_lse.Download<float>();
      for (size_t i = 0; i < out.size(); ++i) {
        ASSERT_TRUE(Close(out[i], want_out[i], 1e-3, 1e-4))
            << "states=" << states << " out[" << i << "] " << out[i] << " vs " << want_out[i];
      }
      for (uint32_t h = 0; h < heads; ++h) {
        ASSERT_TRUE(Close(lse[h], want_lse[h], 1e-3, 1e-4))
            << "states=" << states << " lse[" << h << "] " << lse[h] << " vs " << want_lse[h];
      }
    }
  }
#endif
}

TEST(AttentionKernelsGpuTest, QuantizeAndDequantizeAreByteExact) {
  if (!cuda::HasDevice()) GTEST_SKIP() << "no CUDA device: " << cuda::Devices().reason;
#if KVTIER_WITH_CUDA
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const QuantCase cases[] = {
      {DType::kF16, 1, 16, 64, 3},     {DType::kBF16, 8, 128, 128, 4},
      {DType::kF32, 2, 256, 256, 2},   {DType::kBF16, 3, 32, 80, 5},
      {DType::kF16, 2, 16, 1056, 2},   {DType::kF32, 1, 17, 8, 3},
      {DType::kBF16, 32, 128, 128, 2},
  };
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_magnitude(-6.0f, 2.0f);
  for (const QuantCase& c : cases) {
    SCOPED_TRACE(std::string(DTypeName(c.dtype)) + " kv_heads=" + std::to_string(c.kv_heads) +
                 " block_tokens=" + std::to_string(c.block_tokens) +
                 " head_dim=" + std::to_string(c.head_dim));
    const uint64_t elements = 2ull * c.kv_heads * c.block_tokens * c.head_dim;
    const uint64_t payload_bytes = QuantizedPayloadBytes(c.kv_heads, c.block_tokens, c.head_dim);
    const uint64_t scale_count = QuantizedScaleCount(c.kv_heads, c.block_tokens, c.head_dim);
    BlockPool src(elements * DTypeBytes(c.dtype), c.blocks);
    // Compressed records: payload, then scales right after it (the documented format).
    BlockPool record(QuantizedBlockBytes(c.kv_heads, c.block_tokens, c.head_dim), c.blocks);
    ASSERT_TRUE(src.device.ok() && record.device.ok());
    for (uint32_t b = 0; b < c.blocks; ++b) {
      void* block = src.host.data() + b * src.stride;
      // Magnitudes over eight decades; a few outlier key channels, a NaN and infinities.
      for (uint64_t i = 0; i < elements; ++i) {
        float v = normal(rng) * std::pow(10.0f, log_magnitude(rng));
        if (i % c.head_dim == 3 && i < elements / 2) v *= 100.0f;
        StoreFromFloat(block, i, c.dtype, v);
      }
      StoreFromFloat(block, 5, c.dtype, std::numeric_limits<float>::infinity());
      StoreFromFloat(block, elements - 2, c.dtype, -std::numeric_limits<float>::infinity());
      StoreFromFloat(block, elements / 2 + 1, c.dtype, std::nanf(""));
    }
    src.device.Upload(src.host.data());

    std::vector<const void*> d_src, h_src, d_payload_in, h_payload_in;
    std::vector<void*> d_payload, h_payload;
    std::vector<float*> d_scales, h_scales;
    std::vector<const float*> d_scales_in, h_scales_in;
    std::vector<unsigned char> want_records(record.host.size(), 0xFF);
    for (uint32_t b = 0; b < c.blocks; ++b) {
      d_src.push_back(src.DeviceBlock(b));
      h_src.push_back(src.HostBlock(b));
      auto* d_rec = record.device.get<unsigned char>() + b * record.stride;
      auto* h_rec = want_records.data() + b * record.stride;
      d_payload.push_back(d_rec);
      h_payload.push_back(h_rec);
      d_payload_in.push_back(d_rec);
      h_payload_in.push_back(h_rec);
      d_scales.push_back(reinterpret_cast<float*>(d_rec + payload_bytes));
      h_scales.push_back(reinterpret_cast<float*>(h_rec + payload_bytes));
      d_scales_in.push_back(d_scales.back());
      h_scales_in.push_back(h_scales.back());
    }
    DeviceBuffer t_src(c.blocks * sizeof(void*)), t_payload(c.blocks * sizeof(void*)),
        t_scales(c.blocks * sizeof(void*));
    t_src.Upload(d_src.data());
    t_payload.Upload(d_payload.data());
    t_scales.Upload(d_scales.data());

    Status s = LaunchQuantizeBlocks(t_src.get<const void* const>(), c.dtype, c.blocks, c.kv_heads,
                                    c.block_tokens, c.head_dim, t_payload.get<void* const>(),
                                    t_scales.get<float* const>(), nullptr);
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_TRUE(QuantizeBlocksRef(h_src.data(), c.dtype, c.blocks, c.kv_heads, c.block_tokens,
                                  c.head_dim, h_payload.data(), h_scales.data(), nullptr)
                    .ok());
    const auto got_records = record.device.Download<unsigned char>();
    for (uint32_t b = 0; b < c.blocks; ++b) {
      const uint64_t base = b * record.stride;
      for (uint64_t i = 0; i < payload_bytes; ++i) {
        ASSERT_EQ(got_records[base + i], want_records[base + i])
            << "payload byte " << i << " of block " << b;
      }
      for (uint64_t i = 0; i < scale_count; ++i) {
        float got, want;
        std::memcpy(&got, &got_records[base + payload_bytes + 4 * i], 4);
        std::memcpy(&want, &want_records[base + payload_bytes + 4 * i], 4);
        ASSERT_FALSE(std::isnan(got)) << "scale " << i << " of block " << b << " not written";
        ASSERT_EQ(std::memcmp(&got, &want, 4), 0)
            << "scale " << i << " of block " << b << ": " << got << " vs " << want;
      }
    }

    for (DType out_dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
      SCOPED_TRACE(std::string("dequantize to ") + std::string(DTypeName(out_dtype)));
      BlockPool back(elements * DTypeBytes(out_dtype), c.blocks);  // poisoned 0xFF
      std::vector<void*> d_back, h_back;
      for (uint32_t b = 0; b < c.blocks; ++b) {
        d_back.push_back(back.device.get<unsigned char>() + b * back.stride);
        h_back.push_back(back.host.data() + b * back.stride);
      }
      std::fill(back.host.begin(), back.host.end(), 0xFF);
      DeviceBuffer t_back(c.blocks * sizeof(void*)), t_payload_in(c.blocks * sizeof(void*)),
          t_scales_in(c.blocks * sizeof(void*));
      t_back.Upload(d_back.data());
      t_payload_in.Upload(d_payload_in.data());
      t_scales_in.Upload(d_scales_in.data());
      s = LaunchDequantizeBlocks(
          t_payload_in.get<const void* const>(), t_scales_in.get<const float* const>(), c.blocks,
          c.kv_heads, c.block_tokens, c.head_dim, out_dtype, t_back.get<void* const>(), nullptr);
      ASSERT_TRUE(s.ok()) << s.message();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      ASSERT_TRUE(DequantizeBlocksRef(h_payload_in.data(), h_scales_in.data(), c.blocks, c.kv_heads,
                                      c.block_tokens, c.head_dim, out_dtype, h_back.data(), nullptr)
                      .ok());
      const auto got = back.device.Download<unsigned char>();
      for (uint32_t b = 0; b < c.blocks; ++b) {
        const uint64_t base = b * back.stride;
        for (uint64_t i = 0; i < elements * DTypeBytes(out_dtype); ++i) {
          ASSERT_EQ(got[base + i], back.host[base + i]) << "byte " << i << " of block " << b;
        }
        // Only the planted NaN may be NaN (0xFF poison would be NaN everywhere).
        uint64_t nans = 0;
        for (uint64_t i = 0; i < elements; ++i) {
          nans += std::isnan(LoadAsFloat(got.data() + base, i, out_dtype));
        }
        ASSERT_EQ(nans, 1u) << "block " << b;
      }
    }
  }
#endif
}

TEST(AttentionKernelsGpuTest, ReportsNoDeviceAsAStatus) {
  if (cuda::HasDevice()) GTEST_SKIP() << "a device is present";
  std::vector<float> q(64), out(64);
  std::vector<unsigned char> block(2 * 16 * 64 * 2);
  const void* table[] = {block.data()};
  const uint32_t valid[] = {16};
  EXPECT_FALSE(LaunchDecodeAttention(q.data(), 1, 1, 64, table, valid, 1, 16, DType::kF16, 0,
                                     out.data(), nullptr, nullptr, nullptr, 0, nullptr)
                   .ok());
  void* dst[] = {out.data()};
  float* scales[] = {q.data()};
  EXPECT_FALSE(LaunchQuantizeBlocks(table, DType::kF16, 1, 1, 16, 64, dst, scales, nullptr).ok());
}

}  // namespace
}  // namespace kvtier
