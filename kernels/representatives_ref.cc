#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/representatives.h"

namespace kvtier {
namespace {

// The min(R, n) best tokens of one (block, kv head), best first.
void SelectTopTokens(const float* scores, uint32_t valid, uint32_t top_r,
                     std::vector<uint32_t>* chosen) {
  chosen->resize(valid);
  std::iota(chosen->begin(), chosen->end(), 0u);
  const uint32_t count = std::min(top_r, valid);
  std::partial_sort(chosen->begin(), chosen->begin() + count, chosen->end(),
                    [scores](uint32_t a, uint32_t b) {
                      return ScoreRankKey(scores[a], a) > ScoreRankKey(scores[b], b);
                    });
  chosen->resize(count);
}

}  // namespace

Status ComputeRepresentativesRef(const RepresentativeShape& s, const void* const* blocks,
                                 const float* scores, const uint32_t* valid_tokens, float* out,
                                 StreamHandle /*stream*/) {
  KVTIER_RETURN_IF_ERROR(ValidateRepresentatives(s, blocks, scores, out));
  for (uint32_t b = 0; b < s.num_blocks; ++b) {
    if (blocks[b] == nullptr) {
      return Status::InvalidArgument("ComputeRepresentatives: null pointer for block " +
                                     std::to_string(b));
    }
    if (valid_tokens != nullptr && (valid_tokens[b] == 0 || valid_tokens[b] > s.block_tokens)) {
      return Status::InvalidArgument("ComputeRepresentatives: valid_tokens[" + std::to_string(b) +
                                     "] = " + std::to_string(valid_tokens[b]) + " outside [1, " +
                                     std::to_string(s.block_tokens) + "]");
    }
  }

  const uint32_t d = s.head_dim;
  std::vector<uint32_t> chosen;
  std::vector<float> acc(d), lo(d), hi(d);
  for (uint32_t b = 0; b < s.num_blocks; ++b) {
    const void* keys = blocks[b];
    const uint32_t valid = ClampValidTokens(valid_tokens, b, s.block_tokens);
    for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
      const auto key = [&](uint32_t token, uint32_t c) {
        return LoadAsFloat(keys, BlockKeyOffset(s, h, token) + c, s.dtype);
      };
      switch (s.mode) {
        case RepresentativeMode::kTopR:
        case RepresentativeMode::kTopRMean: {
          const float* head_scores = scores + (uint64_t{b} * s.num_kv_heads + h) * s.block_tokens;
          SelectTopTokens(head_scores, valid, s.top_r, &chosen);
          const uint32_t count = static_cast<uint32_t>(chosen.size());
          if (s.mode == RepresentativeMode::kTopR) {
            for (uint32_t j = 0; j < s.top_r; ++j) {
              float* row = out + RepresentativeOffset(s, b, h, j);
              for (uint32_t c = 0; c < d; ++c) row[c] = key(chosen[j % count], c);
            }
          } else {
            float* row = out + RepresentativeOffset(s, b, h, 0);
            for (uint32_t c = 0; c < d; ++c) {
              float sum = 0.0f;
              for (uint32_t j = 0; j < count; ++j) sum += key(chosen[j], c);
              row[c] = sum / static_cast<float>(count);
            }
          }
          break;
        }
        case RepresentativeMode::kMean: {
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (uint32_t t = 0; t < valid; ++t) {
            for (uint32_t c = 0; c < d; ++c) acc[c] += key(t, c);
          }
          float* row = out + RepresentativeOffset(s, b, h, 0);
          for (uint32_t c = 0; c < d; ++c) row[c] = acc[c] / static_cast<float>(valid);
          break;
        }
        case RepresentativeMode::kMinMax: {
          for (uint32_t c = 0; c < d; ++c) lo[c] = hi[c] = key(0, c);
          for (uint32_t t = 1; t < valid; ++t) {
            for (uint32_t c = 0; c < d; ++c) {
              const float v = key(t, c);
              lo[c] = std::fmin(lo[c], v);
              hi[c] = std::fmax(hi[c], v);
            }
          }
          std::copy(lo.begin(), lo.end(), out + RepresentativeOffset(s, b, h, 0));
          std::copy(hi.begin(), hi.end(), out + RepresentativeOffset(s, b, h, 1));
          break;
        }
      }
    }
  }
  return Status::OK();
}

#if !KVTIER_WITH_CUDA
Status LaunchComputeRepresentatives(const RepresentativeShape&, const void* const*, const float*,
                                    const uint32_t*, float*, StreamHandle) {
  return Status::NotSupported("ComputeRepresentatives on a GPU: kvtier was built without CUDA");
}
#endif

}  // namespace kvtier
