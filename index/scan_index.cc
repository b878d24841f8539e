// kScan: kvtier's own exact index. Summaries stay fp16, one contiguous array per KV head
// ([block][row][head_dim], rows of a block adjacent), scanned with AVX2/F16C: each row is
// converted once and multiplied with every query head of its group (the queries, 0.5-16
// KiB, stay in L1). Then the estimator's masses (MassFromTerms) and the fusion.
// Two-stage scoring (index/layer_index.h) keeps beside them the coarse rows, int8, one
// contiguous array per KV head, scanned whole against the queries quantized to int16
// (integer multiply-add, vpmaddwd: 16 products an instruction, no int8->float
// conversion; the row's and query's scales applied once per row, with the max of the
// terms in the same pass); then only the fine sets' fp16 rows are read, a few blocks
// prefetched ahead (with their log weights). At 128K tokens of Llama-3-8B with 12 clusters
// behind 2 coarse rows and a shortlist of 48: 2.2 MB of coarse rows and 2.0 MB of fp16
// rows (48 shortlisted + 33 sink and window blocks) per Select.
// Removal moves the last block into the hole, so the arrays stay dense.
#include <immintrin.h>

#include <algorithm>
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

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Blocks of fine rows prefetched ahead in the second pass of two-stage scoring.
constexpr uint64_t kPrefetchBlocks = 4;

class ScanIndex final : public LayerIndex {
 public:
  explicit ScanIndex(const IndexConfig& config)
      : LayerIndex(config),
        kv_(config.summary.num_kv_heads),
        rows_(config.summary.rows),
        d_(config.summary.head_dim),
        g_(config.num_query_heads / config.summary.num_kv_heads),
        scale_(config.scale > 0 ? config.scale : 1.0f / std::sqrt(float(config.summary.head_dim))),
        coarse_rows_(config.coarse_rows),
        vectors_(kv_),
        log_weights_(kv_),
        coarse_(coarse_rows_ > 0 ? kv_ : 0),
        coarse_scale_(coarse_rows_ > 0 ? kv_ : 0),
        coarse_log_weights_(coarse_rows_ > 0 ? kv_ : 0) {}

  Status Add(uint64_t block, const BlockSummary& s) override {
    const SummaryShape& shape = config_.summary;
    if (s.vectors.size() != shape.vector_elements() ||
        s.weights.size() != shape.weight_elements()) {
      return Status::InvalidArgument("index: summary of another shape");
    }
    auto [it, inserted] = pos_.try_emplace(block, static_cast<uint32_t>(ids_.size()));
    const uint64_t row = it->second;
    const uint64_t per_head = uint64_t{rows_} * d_;
    const uint64_t coarse_per_head = uint64_t{coarse_rows_} * d_;
    if (inserted) {
      ids_.push_back(block);
      log_valid_.push_back(0);
      for (uint32_t k = 0; k < kv_; ++k) {
        vectors_[k].resize(vectors_[k].size() + per_head);
        log_weights_[k].resize(log_weights_[k].size() + rows_);
        if (coarse_rows_ > 0) {
          coarse_[k].resize(coarse_[k].size() + coarse_per_head);
          coarse_scale_[k].resize(coarse_scale_[k].size() + coarse_rows_);
          coarse_log_weights_[k].resize(coarse_log_weights_[k].size() + coarse_rows_);
        }
      }
    }
    if (coarse_rows_ > 0) {
      CoarsenSummary(shape, s, coarse_rows_, &coarse_tmp_);
      for (uint32_t k = 0; k < kv_; ++k) {
        std::memcpy(coarse_[k].data() + row * coarse_per_head,
                    coarse_tmp_.vectors.data() + k * coarse_per_head, coarse_per_head);
        for (uint32_t j = 0; j < coarse_rows_; ++j) {
          const uint64_t at = uint64_t{k} * coarse_rows_ + j;
          const float w = coarse_tmp_.weights[at];
          coarse_scale_[k][row * coarse_rows_ + j] = coarse_tmp_.scales[at];
          coarse_log_weights_[k][row * coarse_rows_ + j] =
              w > 0 ? std::log(w) : -std::numeric_limits<float>::infinity();
        }
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
        if (coarse_rows_ > 0) {
          const uint64_t cr = coarse_rows_;
          std::memcpy(coarse_[k].data() + row * cr * d_, coarse_[k].data() + last * cr * d_,
                      cr * d_);
          std::memcpy(coarse_scale_[k].data() + row * cr, coarse_scale_[k].data() + last * cr,
                      cr * 4);
          std::memcpy(coarse_log_weights_[k].data() + row * cr,
                      coarse_log_weights_[k].data() + last * cr, cr * 4);
        }
      }
    }
    ids_.pop_back();
    log_valid_.pop_back();
    for (uint32_t k = 0; k < kv_; ++k) {
      vectors_[k].resize(last * per_head);
      log_weights_[k].resize(last * rows_);
      if (coarse_rows_ > 0) {
        coarse_[k].resize(last * coarse_rows_ * d_);
        coarse_scale_[k].resize(last * coarse_rows_);
        coarse_log_weights_[k].resize(last * coarse_rows_);
      }
    }
    return true;
  }

  uint64_t size() const override { return ids_.size(); }

  uint64_t memory_bytes() const override {
    uint64_t bytes = ids_.capacity() * 8 + log_valid_.capacity() * 4 + pos_.size() * 32;
    for (uint32_t k = 0; k < kv_; ++k) {
      bytes += vectors_[k].capacity() * 2 + log_weights_[k].capacity() * 4;
      if (coarse_rows_ > 0) {
        bytes += coarse_[k].capacity() + coarse_scale_[k].capacity() * 4 +
                 coarse_log_weights_[k].capacity() * 4;
      }
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
    if (coarse_rows_ > 0) return TwoStageSelect(params, out, scores);
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

  Status TwoStageSelect(const SelectParams& params, std::span<int64_t> out,
                        std::span<float> scores);

  const uint32_t kv_, rows_, d_, g_;
  const float scale_;
  const uint32_t coarse_rows_;                   // 0: one stage
  std::vector<uint64_t> ids_;                    // [n] block ids
  std::vector<float> log_valid_;                 // [n] log valid tokens
  std::unordered_map<uint64_t, uint32_t> pos_;   // block id -> row
  std::vector<std::vector<uint16_t>> vectors_;   // [kv][n][rows][d] fp16
  std::vector<std::vector<float>> log_weights_;  // [kv][n][rows]
  // Two-stage scoring: the coarse rows (CoarsenSummary), [kv][n][coarse_rows][d] int8,
  // and per row its scale and log weight.
  std::vector<std::vector<int8_t>> coarse_;
  std::vector<std::vector<float>> coarse_scale_, coarse_log_weights_;
  CoarseSummary coarse_tmp_;  // of Add
  // Scratch of Select.
  std::vector<float> queries_, terms_, mass_, tmp_;
  Fusion fusion_;
  // Scratch of TwoStageSelect.
  std::vector<float> shift1_, fused_, mass2_;
  std::vector<int16_t> queries_i16_;  // [hq][d]: the scaled queries, QuantizeI16
  std::vector<float> query_scale_;    // [hq]
  std::vector<double> total_;
  std::vector<uint32_t> fine_;     // [score rows][shortlist + non-candidates]: positions
  std::vector<uint32_t> fine_n_;   // [score rows]: entries of fine_ (the shortlist first)
  std::vector<uint32_t> short_n_;  // [score rows]: shortlist entries
  std::vector<std::pair<float, uint32_t>> rank_;  // (score, position)
};

// The selection order on positions: higher score first, ties by the lower block id.
struct ByScoreThenId {
  const std::vector<uint64_t>* ids;
  bool operator()(const std::pair<float, uint32_t>& a, const std::pair<float, uint32_t>& b) const {
    return a.first != b.first ? a.first > b.first : (*ids)[a.second] < (*ids)[b.second];
  }
};

Status ScanIndex::TwoStageSelect(const SelectParams& params, std::span<int64_t> out,
                                 std::span<float> scores) {
  const uint64_t n = ids_.size();
  const uint32_t hq = config_.num_query_heads, cr = coarse_rows_;
  const bool per_kv = params.scope == SelectionScope::kPerKvHead;
  const uint32_t score_rows = per_kv ? kv_ : 1;
  const auto candidate = [&](uint64_t i) {
    return ids_[i] >= params.candidates_begin && ids_[i] < params.candidates_end;
  };
  // Pass 1: every block's coarse rows, against the queries quantized to int16.
  queries_i16_.resize(uint64_t{hq} * d_);
  query_scale_.resize(hq);
  for (uint32_t h = 0; h < hq; ++h) {
    query_scale_[h] = simd::QuantizeI16(queries_.data() + uint64_t{h} * d_, d_,
                                        queries_i16_.data() + uint64_t{h} * d_);
  }
  const uint64_t cells = n * cr;
  terms_.resize(std::max<uint64_t>(terms_.size(), uint64_t{g_} * cells));
  mass_.resize(uint64_t{hq} * n);
  shift1_.resize(hq);
  total_.resize(hq);
  for (uint32_t k = 0; k < kv_; ++k) {
    simd::DotsI8I16(coarse_[k].data(), static_cast<uint32_t>(cells), d_,
                    queries_i16_.data() + uint64_t{k} * g_ * d_, g_, terms_.data(), cells);
    const float* sc = coarse_scale_[k].data();
    const float* lw = coarse_log_weights_[k].data();
    for (uint32_t h = 0; h < g_; ++h) {
      float* t = terms_.data() + h * cells;
      const float top = ScaleAddMax(t, sc, query_scale_[k * g_ + h], lw, cells);
      shift1_[k * g_ + h] =
          MassFromTermsMax(t, n, cr, top, mass_.data() + (uint64_t{k} * g_ + h) * n);
    }
  }
  // The first pass's fusion, and per score row the shortlist, then the non-candidates.
  fused_.assign(uint64_t{score_rows} * n, 0.0f);
  for (uint32_t h = 0; h < hq; ++h) {
    const float* m = mass_.data() + uint64_t{h} * n;
    const double total = SumOf(m, n);
    total_[h] = total;
    if (!(total > 0)) continue;
    const float inv = static_cast<float>(1.0 / total);
    float* f = fused_.data() + (per_kv ? uint64_t{h / g_} * n : 0);
    for (uint64_t i = 0; i < n; ++i) f[i] += m[i] * inv;
  }
  const uint64_t want = uint64_t{config_.shortlist_factor} * params.top_k;
  const ByScoreThenId better{&ids_};
  fine_.resize(uint64_t{score_rows} * n);
  fine_n_.resize(score_rows);
  short_n_.resize(score_rows);
  uint64_t max_fine = 0;
  for (uint32_t r = 0; r < score_rows; ++r) {
    const float* f = fused_.data() + uint64_t{r} * n;
    rank_.clear();
    for (uint64_t i = 0; i < n; ++i) {
      if (candidate(i)) rank_.emplace_back(f[i] == f[i] ? f[i] : kNegInf, static_cast<uint32_t>(i));
    }
    const uint64_t take = std::min<uint64_t>(want, rank_.size());
    if (take < rank_.size())
      std::nth_element(rank_.begin(), rank_.begin() + take, rank_.end(), better);
    uint32_t* list = fine_.data() + uint64_t{r} * n;
    uint64_t m = 0;
    for (uint64_t j = 0; j < take; ++j) list[m++] = rank_[j].second;
    short_n_[r] = static_cast<uint32_t>(take);
    for (uint64_t i = 0; i < n; ++i) {
      if (!candidate(i)) list[m++] = static_cast<uint32_t>(i);
    }
    fine_n_[r] = static_cast<uint32_t>(m);
    max_fine = std::max(max_fine, m);
  }
  // Pass 2: the full summaries of each row's fine set; Z_h from the fine estimates there
  // and the coarse ones elsewhere.
  terms_.resize(std::max<uint64_t>(terms_.size(), uint64_t{g_} * max_fine * rows_));
  mass2_.resize(std::max<uint64_t>(mass2_.size(), max_fine));
  fused_.assign(uint64_t{score_rows} * max_fine, 0.0f);
  for (uint32_t k = 0; k < kv_; ++k) {
    const uint32_t r = per_kv ? k : 0;
    const uint32_t* list = fine_.data() + uint64_t{r} * n;
    const uint64_t m = fine_n_[r], cells2 = m * rows_;
    const float* q = queries_.data() + uint64_t{k} * g_ * d_;
    const uint16_t* vec = vectors_[k].data();
    const float* lw = log_weights_[k].data();
    // The fine rows are scattered blocks of rows_ * d_ halves: prefetch a few blocks ahead
    // (the first ones of the next KV head at the end), so the scan does not wait on memory.
    const uint64_t block_bytes = uint64_t{rows_} * d_ * 2;
    // With them the block's log weights (read below, as scattered).
    const auto prefetch = [&](uint32_t kv, uint32_t pos) {
      const char* p =
          reinterpret_cast<const char*>(vectors_[kv].data() + uint64_t{pos} * rows_ * d_);
      for (uint64_t off = 0; off < block_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(log_weights_[kv].data() + uint64_t{pos} * rows_),
                   _MM_HINT_T0);
    };
    for (uint64_t i = 0; i < std::min<uint64_t>(kPrefetchBlocks, m) && k == 0; ++i) {
      prefetch(k, list[i]);
    }
    for (uint64_t i = 0; i < m; ++i) {
      if (i + kPrefetchBlocks < m) {
        prefetch(k, list[i + kPrefetchBlocks]);
      } else if (k + 1 < kv_) {
        const uint32_t* next = fine_.data() + uint64_t{per_kv ? k + 1 : 0} * n;
        const uint64_t j = i + kPrefetchBlocks - m;
        if (j < fine_n_[per_kv ? k + 1 : 0]) prefetch(k + 1, next[j]);
      }
      simd::DotsF16(vec + uint64_t{list[i]} * rows_ * d_, rows_, d_, q, g_,
                    terms_.data() + i * rows_, cells2);
    }
    float* f = fused_.data() + uint64_t{r} * max_fine;
    for (uint32_t h = 0; h < g_; ++h) {
      float* t = terms_.data() + h * cells2;
      for (uint64_t i = 0; i < m; ++i) {
        for (uint32_t j = 0; j < rows_; ++j) t[i * rows_ + j] += lw[uint64_t{list[i]} * rows_ + j];
      }
      const float shift2 = MassFromTerms(t, m, rows_, mass2_.data());
      const uint32_t head = k * g_ + h;
      const float shift1 = shift1_[head];
      const float* m1 = mass_.data() + uint64_t{head} * n;
      // The coarse masses outside the fine set: the total less the fine set's (in double:
      // the error is ~1e-16 of the total, negligible in Z_h).
      const double fine_sum = SumOf(mass2_.data(), m);
      double coarse_sum = total_[head];
      for (uint64_t i = 0; i < m; ++i) coarse_sum -= m1[list[i]];
      coarse_sum = std::max(coarse_sum, 0.0);
      const float top = std::max(shift1, shift2);
      if (top == kNegInf) continue;
      const double a = shift2 == kNegInf ? 0.0 : std::exp(double(shift2) - top);
      const double b = shift1 == kNegInf ? 0.0 : std::exp(double(shift1) - top);
      const double total = a * fine_sum + b * coarse_sum;
      if (!(total > 0)) continue;
      const float w = static_cast<float>(a / total);
      for (uint64_t i = 0; i < short_n_[r]; ++i) f[i] += mass2_[i] * w;
    }
  }
  // The top_k of each row's shortlist.
  for (uint32_t r = 0; r < score_rows; ++r) {
    const uint32_t* list = fine_.data() + uint64_t{r} * n;
    const float* f = fused_.data() + uint64_t{r} * max_fine;
    rank_.clear();
    for (uint64_t i = 0; i < short_n_[r]; ++i)
      rank_.emplace_back(f[i] == f[i] ? f[i] : kNegInf, list[i]);
    const uint64_t take = std::min<uint64_t>(params.top_k, rank_.size());
    std::partial_sort(rank_.begin(), rank_.begin() + take, rank_.end(), better);
    int64_t* o = out.data() + uint64_t{r} * params.top_k;
    float* sc = scores.empty() ? nullptr : scores.data() + uint64_t{r} * params.top_k;
    for (uint64_t i = 0; i < params.top_k; ++i) {
      o[i] = i < take ? static_cast<int64_t>(ids_[rank_[i].second]) : -1;
      if (sc != nullptr) sc[i] = i < take ? rank_[i].first : 0.0f;
    }
  }
  return Status::OK();
}

}  // namespace

std::unique_ptr<LayerIndex> CreateScanIndex(const IndexConfig& config) {
  return std::make_unique<ScanIndex>(config);
}

}  // namespace kvtier
