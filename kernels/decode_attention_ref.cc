#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/decode_attention.h"
#include "kernels/dtype_convert.h"

namespace kvtier {

Status DecodeAttentionRef(const float* queries, uint32_t num_query_heads, uint32_t num_kv_heads,
                          uint32_t head_dim, const void* const* block_table,
                          const uint32_t* valid_tokens, uint32_t num_entries, uint32_t block_tokens,
                          DType dtype, float scale, float* out, float* lse, float* block_mass,
                          void* /*workspace*/, uint64_t /*workspace_bytes*/,
                          StreamHandle /*stream*/) {
  Status s =
      ValidateDecodeAttentionArgs(queries, num_query_heads, num_kv_heads, head_dim, block_table,
                                  valid_tokens, num_entries, block_tokens, dtype, scale, out);
  if (!s.ok()) return s;
  uint64_t total_tokens = 0;
  for (uint32_t e = 0; e < num_entries; ++e) {
    if (valid_tokens[e] > block_tokens) {
      return Status::InvalidArgument("DecodeAttention: entry " + std::to_string(e) + " has " +
                                     std::to_string(valid_tokens[e]) +
                                     " valid tokens, more than block_tokens " +
                                     std::to_string(block_tokens));
    }
    if (valid_tokens[e] > 0 && block_table[e] == nullptr) {
      return Status::InvalidArgument("DecodeAttention: entry " + std::to_string(e) +
                                     " is a null block with valid tokens");
    }
    total_tokens += valid_tokens[e];
  }
  const float sc = AttentionScaleOrDefault(scale, head_dim);
  const uint32_t group = num_query_heads / num_kv_heads;
  const uint64_t values_offset = AttentionValuesOffset(num_kv_heads, block_tokens, head_dim);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  std::vector<float> scores(total_tokens);
  std::vector<float> acc(head_dim);
  for (uint32_t h = 0; h < num_query_heads; ++h) {
    const uint32_t kv_head = h / group;
    const float* q = queries + uint64_t{h} * head_dim;
    float* o = out + uint64_t{h} * head_dim;

    // Pass 1: scores and their maximum.
    float max_score = kNegInf;
    uint64_t i = 0;
    for (uint32_t e = 0; e < num_entries; ++e) {
      for (uint32_t t = 0; t < valid_tokens[e]; ++t, ++i) {
        float dot = 0.0f;
        for (uint32_t d = 0; d < head_dim; ++d) {
          dot += q[d] * LoadAsFloat(block_table[e],
                                    AttentionKvIndex(kv_head, t, d, block_tokens, head_dim), dtype);
        }
        scores[i] = dot * sc;
        max_score = std::max(max_score, scores[i]);
      }
    }
    if (total_tokens == 0) {
      std::fill(o, o + head_dim, 0.0f);
      if (lse != nullptr) lse[h] = kNegInf;
      if (block_mass != nullptr) {
        for (uint32_t e = 0; e < num_entries; ++e)
          block_mass[uint64_t{e} * num_query_heads + h] = 0;
      }
      continue;
    }

    // Pass 2: weights relative to the maximum, their sum and the weighted values.
    std::fill(acc.begin(), acc.end(), 0.0f);
    float sum = 0.0f;
    i = 0;
    for (uint32_t e = 0; e < num_entries; ++e) {
      for (uint32_t t = 0; t < valid_tokens[e]; ++t, ++i) {
        const float p = std::exp(scores[i] - max_score);
        sum += p;
        for (uint32_t d = 0; d < head_dim; ++d) {
          acc[d] += p * LoadAsFloat(
                            block_table[e],
                            values_offset + AttentionKvIndex(kv_head, t, d, block_tokens, head_dim),
                            dtype);
        }
      }
    }
    for (uint32_t d = 0; d < head_dim; ++d) o[d] = acc[d] / sum;
    const float head_lse = max_score + std::log(sum);
    if (lse != nullptr) lse[h] = head_lse;

    if (block_mass != nullptr) {
      i = 0;
      for (uint32_t e = 0; e < num_entries; ++e) {
        float mass = 0.0f;
        for (uint32_t t = 0; t < valid_tokens[e]; ++t, ++i) mass += std::exp(scores[i] - head_lse);
        block_mass[uint64_t{e} * num_query_heads + h] = mass;
      }
    }
  }
  return Status::OK();
}

Status MergeAttentionStatesRef(const float* outs, const float* lses, uint32_t num_states,
                               uint32_t num_heads, uint32_t head_dim, float* out, float* lse,
                               StreamHandle /*stream*/) {
  Status s =
      ValidateMergeAttentionStatesArgs(outs, lses, num_states, num_heads, head_dim, out, lse);
  if (!s.ok()) return s;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (uint32_t h = 0; h < num_heads; ++h) {
    float max_lse = kNegInf;
    for (uint32_t i = 0; i < num_states; ++i) {
      max_lse = std::max(max_lse, lses[uint64_t{i} * num_heads + h]);
    }
    float* o = out + uint64_t{h} * head_dim;
    if (max_lse == kNegInf) {
      std::fill(o, o + head_dim, 0.0f);
      lse[h] = kNegInf;
      continue;
    }
    float sum = 0.0f;
    for (uint32_t i = 0; i < num_states; ++i) {
      sum += std::exp(lses[uint64_t{i} * num_heads + h] - max_lse);
    }
    for (uint32_t d = 0; d < head_dim; ++d) {
      float acc = 0.0f;
      for (uint32_t i = 0; i < num_states; ++i) {
        const float w = std::exp(lses[uint64_t{i} * num_heads + h] - max_lse);
        if (w > 0.0f) acc += w * outs[(uint64_t{i} * num_heads + h) * head_dim + d];
      }
      o[d] = acc / sum;
    }
    lse[h] = max_lse + std::log(sum);
  }
  return Status::OK();
}

#if !KVTIER_WITH_CUDA
Status LaunchDecodeAttention(const float*, uint32_t, uint32_t, uint32_t, const void* const*,
                             const uint32_t*, uint32_t, uint32_t, DType, float, float*, float*,
                             float*, void*, uint64_t, StreamHandle) {
  return Status::NotSupported("DecodeAttention on a GPU: kvtier was built without CUDA");
}

Status LaunchMergeAttentionStates(const float*, const float*, uint32_t, uint32_t, uint32_t, float*,
                                  float*, StreamHandle) {
  return Status::NotSupported("MergeAttentionStates on a GPU: kvtier was built without CUDA");
}
#endif

}  // namespace kvtier
