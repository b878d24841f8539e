// kScan: kvtier's own exact index. Summaries stay fp16, one contiguous array per KV head
// ([block][row][head_dim], rows of a block adjacent), scanned with AVX2/F16C: each row is
// converted once and multiplied with every query head of its group (the queries, 0.5-16
// KiB, stay in L1). Then the estimator's masses (MassFromTerms) and the fusion.
// Removal moves the last block into the hole, so the arrays stay dense.
#include <cmath>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <vector>

#include "index/backends.h"
#include "index/fusion.h"
#include "index/simd.h"

namespace kvtier {
namespace {

class ScanIndex final : public LayerIndex {
 public:
  explicit ScanIndex(const IndexConfig& config)
      : LayerIndex(config),
        kv_(config.summary.num_kv_heads),
        rows_(config.summary.rows),
        d_(config.summary.head_dim),
        g_(config.num_query_heads / config.summary.num_kv_heads),
        scale_(config.scale > 0 ? config.scale : 1.0f / std::sqrt(float(config.summary.head_dim))),
        vectors_(kv_),
        log_weights_(kv_) {}

  Status Add(uint64_t block, const BlockSummary& s) override {
    const SummaryShape& shape = config_.summary;
    if (s.vectors.size() != shape.vector_elements() ||
        s.weights.size() != shape.weight_elements()) {
      return Status::InvalidArgument("index: summary of another shape");
    }
    auto [it, inserted] = pos_.try_emplace(block, static_cast<uint32_t>(ids_.size()));
    const uint64_t row = it->second;
    const uint64_t per_head = uint64_t{rows_} * d_;
    if (inserted) {
      ids_.push_back(block);
      log_valid_.push_back(0);
      for (uint32_t k = 0; k < kv_; ++k) {
        vectors_[k].resize(vectors_[k].size() + per_head);
        log_weights_[k].resize(log_weights_[k].size() + rows_);
      }
    }
    log_valid_[row] = std::log(static_cast<float>(std::max(1u, s.valid_tokens)));
    for (uint32_t k = 0; k < kv_; ++k) {
      std::memcpy(vectors_[k].data() + row * per_head, s.vectors.data() + k * per_head,
                  per_head * 2);
      for (uint32_t j = 0; j < rows_; ++j) {
        const float w = s.weights[uint64_t{k} * rows_ + j];
        log_weights_[k][row * rows_ + j] =
            w > 0 ? std::log(w) : -std::numeric_limits<float>::infinity();
      }
    }
    return Status::OK();
  }

  bool Remove(uint64_t block) override {
    auto it = pos_.find(block);
    if (it == pos_.end()) return false;
    const uint64_t row = it->second, last = ids_.size() - 1;
    pos_.erase(it);
    const uint64_t per_head = uint64_t{rows_} * d_;
    if (row != last) {
      ids_[row] = ids_[last];
      log_valid_[row] = log_valid_[last];
      pos_[ids_[row]] = static_cast<uint32_t>(row);
      for (uint32_t k = 0; k < kv_; ++k) {
        std::memcpy(vectors_[k].data() + row * per_head, vectors_[k].data() + last * per_head,
                    per_head * 2);
        std::memcpy(log_weights_[k].data() + row * rows_, log_weights_[k].data() + last * rows_,
                    rows_ * 4);
      }
    }
    ids_.pop_back();
    log_valid_.pop_back();
    for (uint32_t k = 0; k < kv_; ++k) {
      vectors_[k].resize(last * per_head);
      log_weights_[k].resize(last * rows_);
    }
    return true;
  }

  uint64_t size() const override { return ids_.size(); }

  uint64_t memory_bytes() const override {
    uint64_t bytes = ids_.capacity() * 8 + log_valid_.capacity() * 4 + pos_.size() * 32;
    for (uint32_t k = 0; k < kv_; ++k) {
      bytes += vectors_[k].capacity() * 2 + log_weights_[k].capacity() * 4;
    }
    return bytes +
           (queries_.capacity() + terms_.capacity() + mass_.capacity() + tmp_.capacity()) * 4;
  }

  Status Select(const SelectParams& params, std::span<int64_t> out,
                std::span<float> scores) override {
    KVTIER_RETURN_IF_ERROR(ValidateSelect(config_, params, out, scores));
    const uint64_t n = ids_.size();
    const uint32_t hq = config_.num_query_heads;
    queries_.resize(uint64_t{hq} * d_);
    for (uint64_t i = 0; i < queries_.size(); ++i) queries_[i] = params.queries[i] * scale_;
    const uint64_t cells = n * rows_;
    terms_.resize(uint64_t{g_} * cells);
    mass_.resize(uint64_t{hq} * n);
    for (uint32_t k = 0; k < kv_; ++k) {
      const float* q = queries_.data() + uint64_t{k} * g_ * d_;
      if (config_.summary.kind == SummaryKind::kMinMax) {
        QuestBounds(k, q, n);
      } else {
        simd::DotsF16(vectors_[k].data(), static_cast<uint32_t>(cells), d_, q, g_, terms_.data(),
                      cells);
        const float* lw = log_weights_[k].data();
        for (uint32_t h = 0; h < g_; ++h) {
          float* t = terms_.data() + h * cells;
          for (uint64_t i = 0; i < cells; ++i) t[i] += lw[i];
        }
      }
      for (uint32_t h = 0; h < g_; ++h) {
        const uint32_t rows = config_.summary.kind == SummaryKind::kMinMax ? 1 : rows_;
        MassFromTerms(terms_.data() + h * cells, n, rows,
                      mass_.data() + (uint64_t{k} * g_ + h) * n);
      }
    }
    return fusion_.Run(config_, params, ids_, mass_.data(), n, out, scores);
  }

 private:
  // Quest: terms[h][b] = sum_c max(q_c min_c, q_c max_c) + log n_b (q already scaled).
  void QuestBounds(uint32_t k, const float* q, uint64_t n) {
    tmp_.resize(2 * uint64_t{d_});
    for (uint64_t b = 0; b < n; ++b) {
      simd::HalfToFloat(vectors_[k].data() + b * 2 * d_, tmp_.data(), 2 * uint64_t{d_});
      for (uint32_t h = 0; h < g_; ++h) {
        const float* qh = q + uint64_t{h} * d_;
        float bound = 0;
        for (uint32_t c = 0; c < d_; ++c) {
          bound += std::max(qh[c] * tmp_[c], qh[c] * tmp_[d_ + c]);
        }
        terms_[h * (n * rows_) + b] = bound + log_valid_[b];
      }
    }
  }

  const uint32_t kv_, rows_, d_, g_;
  const float scale_;
  std::vector<uint64_t> ids_;                    // [n] block ids
  std::vector<float> log_valid_;                 // [n] log valid tokens
  std::unordered_map<uint64_t, uint32_t> pos_;   // block id -> row
  std::vector<std::vector<uint16_t>> vectors_;   // [kv][n][rows][d] fp16
  std::vector<std::vector<float>> log_weights_;  // [kv][n][rows]
  // Scratch of Select.
  std::vector<float> queries_, terms_, mass_, tmp_;
  Fusion fusion_;
};

}  // namespace

std::unique_ptr<LayerIndex> CreateScanIndex(const IndexConfig& config) {
  return std::make_unique<ScanIndex>(config);
}

}  // namespace kvtier
