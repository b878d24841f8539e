// The FAISS backends of LayerIndex (index/layer_index.h): kFaissFlat, kFaissHnsw, kInfLLM.
//
// Layout shared by the three: a block occupies a dense *slot*; ids_[slot] is its block id
// and slot_of_ maps back. In the per-KV-head FAISS indexes the rows of slot i are vectors
// i * rows .. i * rows + rows - 1 (contiguous, fp32, converted from the summary's fp16).
//
// Threads: everything runs on the calling thread. FAISS's OpenMP is avoided rather than
// reconfigured (omp_set_num_threads is process-wide): fvec_inner_products_ny and
// HNSW::search have no parallel region; IndexFlatIP::search with one query runs a
// one-thread region (it sizes its team by the number of queries); IndexHNSW::add
// parallelises only a level with more than 100 new points, so vectors are added in
// batches of at most kHnswAddBatchVectors. IndexHNSW::search is not called: it opens a
// parallel region even for one query.
//
// Allocation: Select resizes scratch kept in the object, which allocates only when the
// index has grown since the last Select. FAISS itself allocates in two places on the
// Select path: HNSW::search's candidate heap (ef entries per query head), and
// IndexFlatIP::search's result handler when it asks for 100 results or more (kInfLLM with
// many non-candidates).
#include <faiss/IndexFlat.h>
#include <faiss/IndexHNSW.h>
#include <faiss/impl/AuxIndexStructures.h>
#include <faiss/impl/DistanceComputer.h>
#include <faiss/impl/FaissException.h>
#include <faiss/utils/Heap.h>
#include <faiss/utils/distances.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

#include "index/backends.h"
#include "index/fusion.h"
#include "kernels/dtype_convert.h"

namespace kvtier {
namespace {

using FaissId = faiss::Index::idx_t;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// HNSW: per query head, search max(kHnswCandidatesPerPick * top_k * rows,
// kHnswMinCandidates) rows.
constexpr uint64_t kHnswCandidatesPerPick = 4;
constexpr uint64_t kHnswMinCandidates = 64;
// At most this many vectors per IndexHNSW::add, so that FAISS stays on one thread.
constexpr uint64_t kHnswAddBatchVectors = 64;
// kFaissFlat scores a chunk of this many bytes of rows for every query head of a group
// before moving on, so the rows are read from memory once per group, not once per head.
constexpr uint64_t kFlatChunkBytes = 16 * 1024;

Status FromException(const char* what, const std::exception& e) {
  return Status::Internal(std::string(what) + ": " + e.what());
}

// InvalidArgument unless `summary` has the shape's sizes and non-negative finite weights.
Status CheckSummary(const SummaryShape& shape, const BlockSummary& summary) {
  if (summary.vectors.size() != shape.vector_elements() ||
      summary.weights.size() != shape.weight_elements()) {
    return Status::InvalidArgument("summary sizes do not match the index's summary shape");
  }
  for (float w : summary.weights) {
    if (!(w >= 0.0f) || !std::isfinite(w)) {
      return Status::InvalidArgument("summary weights must be finite and non-negative");
    }
  }
  return Status::OK();
}

float LogWeight(float w) { return w > 0.0f ? std::log(w) : kNegInf; }

float ScaleOf(const IndexConfig& config) {
  return config.scale > 0.0f ? config.scale
                             : 1.0f / std::sqrt(static_cast<float>(config.summary.head_dim));
}

// The rows of KV head `kv` of a summary, fp16 -> fp32.
void DecodeRows(const SummaryShape& shape, const BlockSummary& summary, uint32_t kv, float* out) {
  const uint64_t n = uint64_t{shape.rows} * shape.head_dim;
  const uint16_t* src = summary.vectors.data() + kv * n;
  for (uint64_t i = 0; i < n; ++i) out[i] = HalfBitsToFloat(src[i]);
}

// Quest's bound (layer_index.h) for n blocks of kMinMax rows (min row then max row, each
// of d floats), log_weights[2 * i] = log n_i: out[i] = e_h of block i.
void QuestBound(const float* q, const float* rows, const float* log_weights, float scale,
                uint64_t n, uint32_t d, float* out) {
  for (uint64_t i = 0; i < n; ++i) {
    const float* mn = rows + 2 * i * d;
    const float* mx = mn + d;
    float sum = 0.0f;
    for (uint32_t c = 0; c < d; ++c) sum += std::max(q[c] * mn[c], q[c] * mx[c]);
    out[i] = scale * sum + log_weights[2 * i];
  }
}

// Makes room for `more` elements without losing std::vector's geometric growth.
template <typename T>
void ReserveMore(std::vector<T>& v, uint64_t more) {
  if (v.size() + more > v.capacity()) v.reserve(std::max(v.size() + more, 2 * v.capacity()));
}

// Drops the vectors from `n` on (IndexFlat's codes are ntotal * code_size bytes).
void TruncateFlat(faiss::IndexFlat* index, uint64_t n) {
  index->codes.resize(n * index->code_size);
  index->ntotal = static_cast<FaissId>(n);
}

// Dense slots for block ids, with swap-remove. Shared by kFaissFlat and kInfLLM.
class SlotMap {
 public:
  uint64_t size() const { return ids_.size(); }
  const std::vector<uint64_t>& ids() const { return ids_; }
  // The slot of `block`, or -1.
  int64_t Find(uint64_t block) const {
    auto it = slot_of_.find(block);
    return it == slot_of_.end() ? -1 : static_cast<int64_t>(it->second);
  }
  // Appends `block` (not present) in slot size() - 1.
  void Append(uint64_t block) {
    ReserveMore(ids_, 1);
    slot_of_.emplace(block, ids_.size());
    ids_.push_back(block);  // no allocation: reserved
  }
  // Removes `block`'s slot s: the last slot's block moves into s. Returns {s, last}; the
  // caller moves the last slot's data into s (when they differ) and truncates.
  std::pair<uint64_t, uint64_t> Remove(uint64_t block) {
    auto it = slot_of_.find(block);
    const uint64_t slot = it->second, last = ids_.size() - 1;
    slot_of_.erase(it);
    if (slot != last) {
      ids_[slot] = ids_[last];
      slot_of_[ids_[slot]] = slot;
    }
    ids_.pop_back();
    return {slot, last};
  }
  uint64_t memory_bytes() const {
    return ids_.capacity() * sizeof(uint64_t) +
           slot_of_.size() * (sizeof(uint64_t) * 2 + 2 * sizeof(void*)) +
           slot_of_.bucket_count() * sizeof(void*);
  }

 private:
  std::vector<uint64_t> ids_;                       // slot -> block
  std::unordered_map<uint64_t, uint64_t> slot_of_;  // block -> slot
};

// ------------------------------------------------------------------------------------
// kFaissFlat: an IndexFlatIP per KV head holds the rows; Select takes every row's dot
// product with each query head of the group (fvec_inner_products_ny: FAISS's flat
// inner-product kernel, without IndexFlatIP::search's top-k heap, which the estimator
// does not want: it needs every dot product), then MassFromTerms and Fusion. kMinMax
// (which FAISS cannot express) is scored by Quest's bound computed here over the same rows.
// FAISS's single-query search has no faster path: its BLAS path needs 20 queries and keeps
// only the top-k. (A FAISS built without SIMD, like Debian's generic libfaiss, runs
// fvec_inner_product as a scalar loop: then this backend is many times slower than kScan.)
class FaissFlatIndex final : public LayerIndex {
 public:
  explicit FaissFlatIndex(const IndexConfig& config)
      : LayerIndex(config),
        rows_(config.summary.rows),
        dim_(config.summary.head_dim),
        group_(config.num_query_heads / config.summary.num_kv_heads),
        scale_(ScaleOf(config)),
        minmax_(config.summary.kind == SummaryKind::kMinMax),
        chunk_blocks_(std::max<uint64_t>(1, kFlatChunkBytes / (uint64_t{rows_} * dim_ * 4))),
        log_weights_(config.summary.num_kv_heads),
        row_buffer_(uint64_t{rows_} * dim_) {
    for (uint32_t kv = 0; kv < config.summary.num_kv_heads; ++kv) {
      heads_.push_back(std::make_unique<faiss::IndexFlatIP>(dim_));
    }
  }

  Status Add(uint64_t block, const BlockSummary& summary) override {
    KVTIER_RETURN_IF_ERROR(CheckSummary(config_.summary, summary));
    try {
      const int64_t found = slots_.Find(block);
      const uint64_t slot = found >= 0 ? static_cast<uint64_t>(found) : slots_.size();
      const uint64_t row_floats = uint64_t{rows_} * dim_;
      for (uint32_t kv = 0; kv < heads_.size(); ++kv) {
        DecodeRows(config_.summary, summary, kv, row_buffer_.data());
        if (found >= 0) {
          std::memcpy(heads_[kv]->get_xb() + slot * row_floats, row_buffer_.data(),
                      row_floats * sizeof(float));
        } else {
          heads_[kv]->add(rows_, row_buffer_.data());
        }
        std::vector<float>& lw = log_weights_[kv];
        if (found < 0) lw.resize((slot + 1) * rows_);
        for (uint32_t j = 0; j < rows_; ++j) {
          lw[slot * rows_ + j] =
              minmax_ ? std::log(static_cast<float>(std::max(1u, summary.valid_tokens)))
                      : LogWeight(summary.weights[kv * rows_ + j]);
        }
      }
      if (found < 0) slots_.Append(block);
    } catch (const std::exception& e) {
      // A failed add of a new block may leave some heads one block longer: cut them back.
      if (slots_.Find(block) < 0) {
        for (auto& head : heads_) TruncateFlat(head.get(), slots_.size() * rows_);
        for (auto& lw : log_weights_) lw.resize(slots_.size() * rows_);
      }
      return FromException("faiss-flat add", e);
    }
    return Status::OK();
  }

  bool Remove(uint64_t block) override {
    if (slots_.Find(block) < 0) return false;
    const auto [slot, last] = slots_.Remove(block);
    const uint64_t row_floats = uint64_t{rows_} * dim_;
    for (uint32_t kv = 0; kv < heads_.size(); ++kv) {
      float* xb = heads_[kv]->get_xb();
      std::vector<float>& lw = log_weights_[kv];
      if (slot != last) {
        std::memcpy(xb + slot * row_floats, xb + last * row_floats, row_floats * sizeof(float));
        std::copy_n(lw.begin() + last * rows_, rows_, lw.begin() + slot * rows_);
      }
      TruncateFlat(heads_[kv].get(), last * rows_);
      lw.resize(last * rows_);
    }
    return true;
  }

  uint64_t size() const override { return slots_.size(); }

  uint64_t memory_bytes() const override {
    uint64_t bytes =
        slots_.memory_bytes() +
        (row_buffer_.capacity() + terms_.capacity() + mass_.capacity()) * sizeof(float);
    for (const auto& head : heads_) bytes += head->codes.capacity() + sizeof(*head);
    for (const auto& lw : log_weights_) bytes += lw.capacity() * sizeof(float);
    return bytes;
  }

  Status Select(const SelectParams& params, std::span<int64_t> out,
                std::span<float> scores) override {
    KVTIER_RETURN_IF_ERROR(ValidateSelect(config_, params, out, scores));
    try {
      return Scan(params, out, scores);
    } catch (const std::exception& e) {  // std::bad_alloc while growing scratch
      return FromException("faiss-flat select", e);
    }
  }

 private:
  Status Scan(const SelectParams& params, std::span<int64_t> out, std::span<float> scores) {
    const uint64_t n = slots_.size();
    const uint32_t terms_per_block = minmax_ ? 1 : rows_;
    const uint64_t cells = n * terms_per_block;
    terms_.resize(uint64_t{group_} * cells);
    mass_.resize(uint64_t{config_.num_query_heads} * n);
    for (uint32_t kv = 0; kv < heads_.size(); ++kv) {
      const float* xb = heads_[kv]->get_xb();
      const float* lw = log_weights_[kv].data();
      const float* q = params.queries.data() + uint64_t{kv} * group_ * dim_;
      for (uint64_t b0 = 0; b0 < n; b0 += chunk_blocks_) {
        const uint64_t nb = std::min(chunk_blocks_, n - b0);
        const float* rows = xb + b0 * rows_ * dim_;
        for (uint32_t j = 0; j < group_; ++j) {
          float* t = terms_.data() + j * cells + b0 * terms_per_block;
          if (minmax_) {
            QuestBound(q + j * dim_, rows, lw + b0 * rows_, scale_, nb, dim_, t);
          } else {
            faiss::fvec_inner_products_ny(t, q + j * dim_, rows, dim_, nb * rows_);
          }
        }
      }
      for (uint32_t j = 0; j < group_; ++j) {
        float* t = terms_.data() + j * cells;
        if (!minmax_) {
          for (uint64_t i = 0; i < cells; ++i) t[i] = scale_ * t[i] + lw[i];
        }
        MassFromTerms(t, n, terms_per_block, mass_.data() + (uint64_t{kv} * group_ + j) * n);
      }
    }
    return fusion_.Run(config_, params, slots_.ids(), mass_.data(), n, out, scores);
  }

  const uint32_t rows_, dim_, group_;
  const float scale_;
  const bool minmax_;
  const uint64_t chunk_blocks_;
  SlotMap slots_;
  std::vector<std::unique_ptr<faiss::IndexFlatIP>> heads_;  // [num_kv_heads]
  // [num_kv_heads][slot * rows + j]: log w_j; kMinMax: log n_b in both rows (QuestBound).
  std::vector<std::vector<float>> log_weights_;
  std::vector<float> row_buffer_;  // Add: one head's rows
  std::vector<float> terms_;       // Select: [group][n * rows] (kMinMax: [group][n])
  std::vector<float> mass_;        // Select: [Hq][n]
  Fusion fusion_;
};

// ------------------------------------------------------------------------------------
// kFaissHnsw: an IndexHNSWFlat (inner product) per KV head over the rows. Select asks
// each query head's graph for its top max(4 * top_k * rows, 64) rows by q . r, takes the
// union of their blocks (the "rescored set"), computes the estimator exactly for those
// blocks from their stored rows, and fuses with Z_h = log sum over the rescored set only
// (an approximation: the blocks no head's search reached are taken to hold no mass).
// Blocks reached but outside [candidates_begin, candidates_end) count in Z_h and are not
// selected, as in the exact backends.
//
// HNSW cannot delete: Remove (and Add of a block already present) marks the block's slot
// dead; searches skip dead slots; when more than a quarter of the slots are dead the
// graphs are rebuilt from the live slots (amortised: a rebuild follows at least n / 4
// removals). Inner-product HNSW is approximate for maximum inner product search (the
// graph is built for a metric); here the graph search is not what loses recall (efSearch
// from 16 to 2048 selects the same on the tests' random set), the rescored set is: top-16
// recall against kFaissFlat is about 0.95 on 2048 random blocks (tests). Cost: each Add
// inserts rows into num_kv_heads graphs, and a Select runs Hq graph searches of at least
// 64 results; at a few thousand rows per head that costs more than kFaissFlat's scan.
class FaissHnswIndex final : public LayerIndex {
 public:
  explicit FaissHnswIndex(const IndexConfig& config)
      : LayerIndex(config),
        rows_(config.summary.rows),
        dim_(config.summary.head_dim),
        group_(config.num_query_heads / config.summary.num_kv_heads),
        scale_(ScaleOf(config)),
        heads_(NewGraphs()),
        row_buffer_(uint64_t{rows_} * dim_),
        vt_(0) {}

  // On an error (FAISS or memory) the index stays usable (the next call repairs it) and
  // holds the block's earlier summary, none, or the new one.
  Status Add(uint64_t block, const BlockSummary& summary) override {
    KVTIER_RETURN_IF_ERROR(CheckSummary(config_.summary, summary));
    try {
      if (!consistent_) Repair();
      consistent_ = false;
      const uint64_t slot = ids_.size();
      ReserveMore(ids_, 1);
      ReserveMore(alive_, 1);
      ReserveMore(mark_, 1);
      ReserveMore(log_weights_, uint64_t{rows_} * heads_.size());
      for (uint32_t kv = 0; kv < heads_.size(); ++kv) {
        DecodeRows(config_.summary, summary, kv, row_buffer_.data());
        AddRowsTo(heads_[kv], row_buffer_.data(), rows_);
      }
      auto [it, inserted] = live_.try_emplace(block, slot);
      if (!inserted) {
        KillSlot(it->second);
        it->second = slot;
      }
      // No allocation from here on (reserved above): the slot arrays stay in step.
      ids_.push_back(block);
      alive_.push_back(1);
      mark_.push_back(0);
      for (uint32_t kv = 0; kv < heads_.size(); ++kv) {
        for (uint32_t j = 0; j < rows_; ++j) {
          log_weights_.push_back(LogWeight(summary.weights[kv * rows_ + j]));
        }
      }
      if (TooManyDead()) Rebuild();
      RefreshSearchState();
      consistent_ = true;
    } catch (const std::exception& e) {
      return FromException("faiss-hnsw add", e);
    }
    return Status::OK();
  }

  bool Remove(uint64_t block) override {
    auto it = live_.find(block);
    if (it == live_.end()) return false;
    KillSlot(it->second);
    live_.erase(it);
    if (consistent_ && TooManyDead()) {
      try {
        consistent_ = false;
        Rebuild();
        RefreshSearchState();
        consistent_ = true;
      } catch (...) {
        // Out of memory: the next call repairs; dead slots stay skipped until then.
      }
    }
    return true;
  }

  uint64_t size() const override { return live_.size(); }

  uint64_t memory_bytes() const override {
    uint64_t bytes = (ids_.capacity() + cand_ids_.capacity()) * sizeof(uint64_t) +
                     alive_.capacity() + (mark_.capacity() + cand_slots_.capacity()) * 4 +
                     (log_weights_.capacity() + row_buffer_.capacity() + terms_.capacity() +
                      gathered_log_weights_.capacity() + mass_.capacity() + hit_dis_.capacity()) *
                         sizeof(float) +
                     hit_ids_.capacity() * sizeof(FaissId) + vt_.visited.capacity() +
                     live_.size() * (sizeof(uint64_t) * 2 + 2 * sizeof(void*)) +
                     live_.bucket_count() * sizeof(void*);
    for (const Head& head : heads_) {
      const faiss::HNSW& hnsw = head.graph->hnsw;
      bytes += head.storage->codes.capacity() + hnsw.neighbors.capacity() * 4 +
               hnsw.levels.capacity() * 4 + hnsw.offsets.capacity() * sizeof(size_t);
    }
    return bytes;
  }

  Status Select(const SelectParams& params, std::span<int64_t> out,
                std::span<float> scores) override {
    KVTIER_RETURN_IF_ERROR(ValidateSelect(config_, params, out, scores));
    try {
      if (!consistent_) {
        Repair();
        consistent_ = true;
      }
      CollectCandidates(params);
      Rescore(params);
      return fusion_.Run(config_, params, cand_ids_, mass_.data(), cand_ids_.size(), out, scores);
    } catch (const std::exception& e) {
      return FromException("faiss-hnsw select", e);
    }
  }

 private:
  struct Head {
    std::unique_ptr<faiss::IndexHNSWFlat> graph;
    faiss::IndexFlat* storage = nullptr;  // graph->storage, owned by graph
    // -(q . r): HNSW minimises; made after each add (it holds a pointer into storage).
    std::unique_ptr<faiss::DistanceComputer> distance;
  };

  // -(inner product) over a flat storage.
  class NegatedInnerProduct final : public faiss::DistanceComputer {
   public:
    explicit NegatedInnerProduct(const faiss::IndexFlat& storage)
        : inner_(storage.get_distance_computer()) {}
    void set_query(const float* x) override { inner_->set_query(x); }
    float operator()(idx_t i) override { return -(*inner_)(i); }
    float symmetric_dis(idx_t i, idx_t j) override { return -inner_->symmetric_dis(i, j); }

   private:
    std::unique_ptr<faiss::DistanceComputer> inner_;
  };

  std::vector<Head> NewGraphs() const {
    std::vector<Head> heads(config_.summary.num_kv_heads);
    for (Head& head : heads) {
      head.graph = std::make_unique<faiss::IndexHNSWFlat>(
          static_cast<int>(dim_), static_cast<int>(config_.hnsw_m), faiss::METRIC_INNER_PRODUCT);
      head.graph->hnsw.efSearch = static_cast<int>(config_.hnsw_ef_search);
      head.storage = dynamic_cast<faiss::IndexFlat*>(head.graph->storage);
      FAISS_THROW_IF_NOT_MSG(head.storage != nullptr, "IndexHNSWFlat without flat storage");
    }
    return heads;
  }

  static void AddRowsTo(Head& head, const float* rows, uint64_t n) {
    for (uint64_t i = 0; i < n; i += kHnswAddBatchVectors) {
      const uint64_t m = std::min(kHnswAddBatchVectors, n - i);
      head.graph->add(static_cast<FaissId>(m), rows + i * head.storage->d);
    }
  }
  void KillSlot(uint64_t slot) {
    alive_[slot] = 0;
    ++dead_;
  }

  bool TooManyDead() const { return dead_ * 4 > ids_.size(); }

  // After a call failed half-way: graphs with rows of no slot are rebuilt; the distance
  // computers and the visited table are remade.
  void Repair() {
    for (const Head& head : heads_) {
      if (static_cast<uint64_t>(head.graph->ntotal) != ids_.size() * rows_) {
        Rebuild();
        break;
      }
    }
    RefreshSearchState();
  }

  // New graphs over the live slots, in slot order. Throws only before it changes anything
  // (the slot arrays shrink within their capacity).
  void Rebuild() {
    std::vector<Head> fresh = NewGraphs();
    std::vector<uint64_t> ids;
    std::vector<float> log_weights;
    ids.reserve(live_.size());
    log_weights.reserve(live_.size() * heads_.size() * rows_);
    const uint64_t row_floats = uint64_t{rows_} * dim_;
    const uint64_t slot_weights = uint64_t{rows_} * heads_.size();
    for (uint64_t slot = 0; slot < ids_.size(); ++slot) {
      if (!alive_[slot]) continue;
      for (uint32_t kv = 0; kv < heads_.size(); ++kv) {
        AddRowsTo(fresh[kv], heads_[kv].storage->get_xb() + slot * row_floats, rows_);
      }
      ids.push_back(ids_[slot]);
      log_weights.insert(log_weights.end(), log_weights_.begin() + slot * slot_weights,
                         log_weights_.begin() + (slot + 1) * slot_weights);
    }
    heads_ = std::move(fresh);
    ids_ = std::move(ids);
    log_weights_ = std::move(log_weights);
    alive_.assign(ids_.size(), 1);
    mark_.assign(ids_.size(), 0);
    epoch_ = 0;
    dead_ = 0;
    for (uint64_t slot = 0; slot < ids_.size(); ++slot) live_[ids_[slot]] = slot;
  }

  // Distance computers (they point into the storage) and the visited table, after adds.
  void RefreshSearchState() {
    for (Head& head : heads_) head.distance = std::make_unique<NegatedInnerProduct>(*head.storage);
    vt_.visited.assign(ids_.size() * rows_, 0);
    vt_.visno = 1;
  }

  // cand_slots_/cand_ids_ = the live slots some query head's search reached.
  void CollectCandidates(const SelectParams& params) {
    cand_slots_.clear();
    cand_ids_.clear();
    const uint64_t total_rows = ids_.size() * rows_;
    if (live_.empty() || total_rows == 0) return;
    const uint64_t k = std::min(
        total_rows, std::max(kHnswCandidatesPerPick * params.top_k * rows_, kHnswMinCandidates));
    hit_ids_.resize(k);
    hit_dis_.resize(k);
    if (++epoch_ == 0) {
      std::fill(mark_.begin(), mark_.end(), 0);
      epoch_ = 1;
    }
    for (uint32_t h = 0; h < config_.num_query_heads; ++h) {
      Head& head = heads_[h / group_];
      head.distance->set_query(params.queries.data() + uint64_t{h} * dim_);
      faiss::maxheap_heapify(k, hit_dis_.data(), hit_ids_.data());
      vt_.advance();
      head.graph->hnsw.search(*head.distance, static_cast<int>(k), hit_ids_.data(), hit_dis_.data(),
                              vt_);
      for (uint64_t i = 0; i < k; ++i) {
        if (hit_ids_[i] < 0) continue;
        const uint64_t slot = static_cast<uint64_t>(hit_ids_[i]) / rows_;
        if (!alive_[slot] || mark_[slot] == epoch_) continue;
        mark_[slot] = epoch_;
        cand_slots_.push_back(static_cast<uint32_t>(slot));
        cand_ids_.push_back(ids_[slot]);
      }
    }
  }

  // mass_[h][i] = exp(e_h(cand_slots_[i]) - M_h), from the stored rows.
  void Rescore(const SelectParams& params) {
    const uint64_t m = cand_slots_.size();
    mass_.resize(uint64_t{config_.num_query_heads} * m);
    terms_.resize(m * rows_);
    gathered_log_weights_.resize(m * rows_);
    const uint64_t row_floats = uint64_t{rows_} * dim_;
    const uint64_t slot_weights = uint64_t{rows_} * heads_.size();
    for (uint32_t kv = 0; kv < heads_.size(); ++kv) {
      const float* xb = heads_[kv].storage->get_xb();
      for (uint64_t i = 0; i < m; ++i) {
        std::copy_n(log_weights_.begin() + cand_slots_[i] * slot_weights + kv * rows_, rows_,
                    gathered_log_weights_.begin() + i * rows_);
      }
      for (uint32_t j = 0; j < group_; ++j) {
        const uint64_t h = uint64_t{kv} * group_ + j;
        const float* q = params.queries.data() + h * dim_;
        float* t = terms_.data();
        for (uint64_t i = 0; i < m; ++i) {
          faiss::fvec_inner_products_ny(t + i * rows_, q, xb + cand_slots_[i] * row_floats, dim_,
                                        rows_);
        }
        for (uint64_t i = 0; i < m * rows_; ++i) t[i] = scale_ * t[i] + gathered_log_weights_[i];
        MassFromTerms(t, m, rows_, mass_.data() + h * m);
      }
    }
  }

  const uint32_t rows_, dim_, group_;
  const float scale_;
  std::vector<Head> heads_;                      // [num_kv_heads]; vectors slot * rows + j
  std::vector<uint64_t> ids_;                    // slot -> block (dead slots too)
  std::vector<uint8_t> alive_;                   // slot -> 1 when live
  std::vector<float> log_weights_;               // [slot][kv][rows]
  std::unordered_map<uint64_t, uint64_t> live_;  // block -> its live slot
  uint64_t dead_ = 0;
  bool consistent_ = true;  // false while (or after a failure in) a mutation
  // Select scratch.
  std::vector<float> row_buffer_;
  faiss::VisitedTable vt_;
  std::vector<FaissId> hit_ids_;
  std::vector<float> hit_dis_;
  std::vector<uint32_t> mark_;  // slot -> epoch_ when already collected
  uint32_t epoch_ = 0;
  std::vector<uint32_t> cand_slots_;
  std::vector<uint64_t> cand_ids_;
  std::vector<float> terms_, gathered_log_weights_, mass_;
  Fusion fusion_;
};

// ------------------------------------------------------------------------------------
// kInfLLM: one IndexFlatIP over vectors of Hq * head_dim floats (layer_index.h). The
// per-block vector repeats each KV head's weighted mean for every query head of its group,
// as InfLLM's formulation does (a KV-head-sized vector with the group's queries summed
// would give the same scores at a quarter of the memory; this backend is the baseline).
class InfLLMIndex final : public LayerIndex {
 public:
  explicit InfLLMIndex(const IndexConfig& config)
      : LayerIndex(config),
        rows_(config.summary.rows),
        dim_(config.summary.head_dim),
        group_(config.num_query_heads / config.summary.num_kv_heads),
        width_(uint64_t{config.num_query_heads} * dim_),
        flat_(static_cast<FaissId>(width_)),
        vector_(width_),
        mean_(dim_) {}

  Status Add(uint64_t block, const BlockSummary& summary) override {
    KVTIER_RETURN_IF_ERROR(CheckSummary(config_.summary, summary));
    const SummaryShape& shape = config_.summary;
    for (uint32_t kv = 0; kv < shape.num_kv_heads; ++kv) {
      double total = 0.0;
      std::fill(mean_.begin(), mean_.end(), 0.0);
      for (uint32_t j = 0; j < rows_; ++j) {
        const double w = summary.weights[kv * rows_ + j];
        if (w == 0.0) continue;
        total += w;
        const uint16_t* row = summary.vectors.data() + (uint64_t{kv} * rows_ + j) * dim_;
        for (uint32_t c = 0; c < dim_; ++c) mean_[c] += w * HalfBitsToFloat(row[c]);
      }
      const double inv = total > 0.0 ? 1.0 / total : 0.0;
      for (uint32_t g = 0; g < group_; ++g) {
        float* dst = vector_.data() + (uint64_t{kv} * group_ + g) * dim_;
        for (uint32_t c = 0; c < dim_; ++c) dst[c] = static_cast<float>(mean_[c] * inv);
      }
    }
    try {
      const int64_t slot = slots_.Find(block);
      if (slot >= 0) {
        std::copy(vector_.begin(), vector_.end(), flat_.get_xb() + slot * width_);
      } else {
        flat_.add(1, vector_.data());
        slots_.Append(block);
      }
    } catch (const std::exception& e) {
      TruncateFlat(&flat_, slots_.size());
      return FromException("infllm add", e);
    }
    return Status::OK();
  }

  bool Remove(uint64_t block) override {
    if (slots_.Find(block) < 0) return false;
    const auto [slot, last] = slots_.Remove(block);
    float* xb = flat_.get_xb();
    if (slot != last) std::copy_n(xb + last * width_, width_, xb + slot * width_);
    TruncateFlat(&flat_, last);
    return true;
  }

  uint64_t size() const override { return slots_.size(); }

  uint64_t memory_bytes() const override {
    return slots_.memory_bytes() + flat_.codes.capacity() + sizeof(flat_) +
           (vector_.capacity() + distances_.capacity()) * sizeof(float) +
           mean_.capacity() * sizeof(double) + labels_.capacity() * sizeof(FaissId) +
           kept_.capacity() * sizeof(float);
  }

  Status Select(const SelectParams& params, std::span<int64_t> out,
                std::span<float> scores) override {
    KVTIER_RETURN_IF_ERROR(ValidateSelect(config_, params, out, scores));
    // (ValidateSelect rejects kPerKvHead for kInfLLM.)
    try {
      Search(params, out, scores);
    } catch (const std::exception& e) {
      return FromException("infllm select", e);
    }
    return Status::OK();
  }

 private:
  void Search(const SelectParams& params, std::span<int64_t> out, std::span<float> scores) {
    const std::vector<uint64_t>& ids = slots_.ids();
    auto candidate = [&](uint64_t id) {
      return id >= params.candidates_begin && id < params.candidates_end;
    };
    uint64_t others = 0;
    for (uint64_t id : ids) others += candidate(id) ? 0 : 1;
    const uint64_t k = std::min<uint64_t>(ids.size(), params.top_k + others);
    kept_.resize(params.top_k);
    uint64_t taken = 0;
    if (k > 0) {
      labels_.resize(k);
      distances_.resize(k);
      flat_.search(1, params.queries.data(), static_cast<FaissId>(k), distances_.data(),
                   labels_.data());
      for (uint64_t i = 0; i < k && taken < params.top_k; ++i) {
        if (labels_[i] < 0) continue;
        const uint64_t id = ids[static_cast<uint64_t>(labels_[i])];
        if (!candidate(id)) continue;
        // FAISS returns them best first; insertion puts ties in block-id order.
        const float s = distances_[i];
        uint64_t at = taken++;
        for (; at > 0; --at) {
          const float prev = kept_[at - 1];
          if (prev > s || (prev == s && static_cast<uint64_t>(out[at - 1]) < id)) break;
          out[at] = out[at - 1];
          kept_[at] = prev;
        }
        out[at] = static_cast<int64_t>(id);
        kept_[at] = s;
      }
    }
    for (uint64_t i = taken; i < out.size(); ++i) out[i] = -1;
    for (uint64_t i = 0; i < scores.size(); ++i) scores[i] = i < taken ? kept_[i] : 0.0f;
  }

  const uint32_t rows_, dim_, group_;
  const uint64_t width_;  // Hq * head_dim
  SlotMap slots_;
  faiss::IndexFlatIP flat_;    // vector of slot i at i
  std::vector<float> vector_;  // Add: the block's vector
  std::vector<double> mean_;   // Add: one KV head's weighted mean
  std::vector<FaissId> labels_;
  std::vector<float> distances_;
  std::vector<float> kept_;  // Select: the scores of out's blocks
};

}  // namespace

Result<std::unique_ptr<LayerIndex>> CreateFaissIndex(const IndexConfig& config) {
  try {
    switch (config.backend) {
      case IndexBackend::kFaissFlat:
        return std::unique_ptr<LayerIndex>(new FaissFlatIndex(config));
      case IndexBackend::kFaissHnsw:
        if (config.summary.kind == SummaryKind::kMinMax) {
          return Status::InvalidArgument("faiss-hnsw cannot search Quest's min-max bound");
        }
        return std::unique_ptr<LayerIndex>(new FaissHnswIndex(config));
      case IndexBackend::kInfLLM:
        return std::unique_ptr<LayerIndex>(new InfLLMIndex(config));
      default:
        return Status::InvalidArgument("not a FAISS backend");
    }
  } catch (const std::exception& e) {
    return FromException("creating a FAISS index", e);
  }
}

}  // namespace kvtier
