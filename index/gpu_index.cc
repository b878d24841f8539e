// kGpu: the estimator of index/layer_index.h on a CUDA device.
//
// Layout: as kScan keeps it, but in device memory: fp16 rows [kv][capacity][rows][head_dim]
// (each KV head one contiguous array of `capacity` blocks) and float log weights
// [kv][capacity][rows] (-infinity for an empty row); position i holds block ids_[i]. The
// host keeps only the ids, their positions and a candidate flag per position. Capacity
// doubles when full (a device-to-device copy of each KV head's array). Add uploads one
// block's rows through pinned staging; Remove moves the last block into the hole on the
// device, so positions stay dense.
//
// Select, on the index's stream: upload the scaled queries (pinned staging) and, when the
// candidate range or the blocks changed, the candidate flags; EstimateBlockMass (scores,
// non-candidates at -infinity); TopKBlocks for top_k plus the number of non-candidates
// (so that at least top_k candidates are among them); GatherBlockScores; one copy of the
// positions and scores back; synchronize. The host drops non-candidates, maps positions
// to ids and orders the picks by score, then id. A Select allocates nothing once its
// buffers have grown to the index's size and the step's k.
//
// Ties: blocks of exactly equal scores enter the top_k by position (TopKBlocks' rule),
// not by id as in the CPU backends; the picks are then ordered by (score, id). Scores
// agree with kScan's to float rounding.
//
// Without a device (or with force_emulated) every "device" buffer is host memory, the
// copies are memcpy and the kernels are their CPU references: the same steps, so every
// test of the backend runs on a machine without a GPU.
//
// Errors: a failed CUDA call returns its Status with the driver's message and leaves the
// index broken (every later Add and Select returns that error), since device state may
// then be stale.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "index/backends.h"
#include "kernels/block_scoring.h"
#include "kernels/cluster_scoring.h"
#include "kernels/cuda_runtime.h"

namespace kvtier {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr uint32_t kInitialCapacity = 64;  // blocks

enum class Memory : uint8_t { kDevice, kPinned, kHost };

// One allocation, freed with the object; sizes rounded up to 256 bytes (the alignment
// the kernels' workspaces need; cudaMalloc gives it, aligned_alloc is asked for it).
class Buffer {
 public:
  Buffer() = default;
  ~Buffer() { Release(); }
  Buffer(Buffer&& other) noexcept
      : kind_(other.kind_),
        ptr_(std::exchange(other.ptr_, nullptr)),
        bytes_(std::exchange(other.bytes_, 0)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      Release();
      kind_ = other.kind_;
      ptr_ = std::exchange(other.ptr_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }

  static Result<Buffer> Allocate(Memory kind, uint64_t bytes) {
    Buffer b;
    b.kind_ = kind;
    const uint64_t size = std::max<uint64_t>(256, (bytes + 255) / 256 * 256);
    switch (kind) {
      case Memory::kDevice:
        KVTIER_RETURN_IF_ERROR(cuda::DeviceMalloc(size, &b.ptr_));
        break;
      case Memory::kPinned:
        KVTIER_RETURN_IF_ERROR(cuda::HostAlloc(size, &b.ptr_));
        break;
      case Memory::kHost:
        b.ptr_ = std::aligned_alloc(256, size);
        if (b.ptr_ == nullptr) {
          return Status::ResourceExhausted("gpu index: " + std::to_string(size) +
                                           " bytes of host memory");
        }
        break;
    }
    b.bytes_ = size;
    return b;
  }

  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  unsigned char* bytes_at(uint64_t offset) const {
    return static_cast<unsigned char*>(ptr_) + offset;
  }
  uint64_t bytes() const { return bytes_; }

 private:
  void Release() {
    if (ptr_ == nullptr) return;
    switch (kind_) {
      case Memory::kDevice:
        (void)cuda::DeviceFree(ptr_);
        break;
      case Memory::kPinned:
        (void)cuda::HostFree(ptr_);
        break;
      case Memory::kHost:
        std::free(ptr_);
        break;
    }
    ptr_ = nullptr;
    bytes_ = 0;
  }

  Memory kind_ = Memory::kHost;
  void* ptr_ = nullptr;
  uint64_t bytes_ = 0;
};

using EstimateFn = Status (*)(const BlockMassShape&, const float*, const uint16_t*, const float*,
                              const uint8_t*, float*, void*, uint64_t, StreamHandle);
using TopKFn = Status (*)(const float*, uint32_t, uint32_t, uint32_t, int32_t*, void*, uint64_t,
                          StreamHandle);
using GatherFn = Status (*)(const float*, uint32_t, uint32_t, const int32_t*, uint32_t, float*,
                            StreamHandle);

// The selection order: higher score first, ties by the lower block id.
bool Better(const std::pair<float, uint64_t>& a, const std::pair<float, uint64_t>& b) {
  return a.first != b.first ? a.first > b.first : a.second < b.second;
}

class GpuIndex final : public LayerIndex {
 public:
  static Result<std::unique_ptr<LayerIndex>> Create(const IndexConfig& config, bool on_device) {
    int device = -1;
    if (on_device) {
      KVTIER_ASSIGN_OR_RETURN(device, cuda::CurrentDevice());
    }
    auto index = std::unique_ptr<GpuIndex>(new GpuIndex(config, on_device, device));
    KVTIER_RETURN_IF_ERROR(index->Init());
    return std::unique_ptr<LayerIndex>(std::move(index));
  }

  ~GpuIndex() override {
    // Copies of an Add or Remove may still read or write the buffers freed after this.
    if (on_device_) {
      cuda::ScopedDevice scope(device_);
      (void)stream_.Synchronize();
    }
  }

  bool on_device() const { return on_device_; }

  Status Add(uint64_t block, const BlockSummary& s) override {
    const SummaryShape& shape = config_.summary;
    if (s.vectors.size() != shape.vector_elements() ||
        s.weights.size() != shape.weight_elements()) {
      return Status::InvalidArgument("index: summary of another shape");
    }
    KVTIER_RETURN_IF_ERROR(broken_);
    std::optional<cuda::ScopedDevice> scope;
    KVTIER_RETURN_IF_ERROR(EnterDevice(scope));
    const uint32_t n = static_cast<uint32_t>(ids_.size());
    auto [it, inserted] = pos_.try_emplace(block, n);
    const uint64_t pos = it->second;
    if (inserted) {
      if (n == capacity_) {
        const Status grown = Grow(2 * capacity_);
        if (!grown.ok()) {
          pos_.erase(block);
          return grown;
        }
      }
      ids_.push_back(block);
      flags_valid_ = false;
    }
    // The staging buffer is free once the previous Add's copies have run.
    if (on_device_) KVTIER_RETURN_IF_ERROR(Fail(add_done_.Synchronize()));
    const uint64_t row_elems = uint64_t{rows_} * d_;
    uint16_t* stage_rows = add_stage_.get<uint16_t>();
    float* stage_lw = reinterpret_cast<float*>(add_stage_.bytes_at(StageWeightsOffset()));
    std::memcpy(stage_rows, s.vectors.data(), s.vectors.size() * 2);
    for (uint64_t i = 0; i < s.weights.size(); ++i) {
      stage_lw[i] = s.weights[i] > 0 ? std::log(s.weights[i]) : kNegInf;
    }
    ResetBatch();
    for (uint32_t k = 0; k < kv_; ++k) {
      const uint64_t r = RowIndex(k, pos);
      AddCopy(vectors_.bytes_at(r * d_ * 2), stage_rows + k * row_elems, row_elems * 2);
      AddCopy(log_weights_.bytes_at(r * 4), stage_lw + uint64_t{k} * rows_, uint64_t{rows_} * 4);
    }
    KVTIER_RETURN_IF_ERROR(Fail(RunBatch()));
    if (on_device_) KVTIER_RETURN_IF_ERROR(Fail(add_done_.Record(stream_.get())));
    return Status::OK();
  }

  bool Remove(uint64_t block) override {
    auto it = pos_.find(block);
    if (it == pos_.end()) return false;
    const uint64_t pos = it->second, last = ids_.size() - 1;
    pos_.erase(it);
    if (pos != last) {
      ids_[pos] = ids_[last];
      pos_[ids_[pos]] = static_cast<uint32_t>(pos);
      if (broken_.ok()) {
        std::optional<cuda::ScopedDevice> scope;
        Status st = EnterDevice(scope);
        if (st.ok()) {
          ResetBatch();
          for (uint32_t k = 0; k < kv_; ++k) {
            const uint64_t to = RowIndex(k, pos), from = RowIndex(k, last);
            AddCopy(vectors_.bytes_at(to * d_ * 2), vectors_.bytes_at(from * d_ * 2),
                    uint64_t{rows_} * d_ * 2);
            AddCopy(log_weights_.bytes_at(to * 4), log_weights_.bytes_at(from * 4),
                    uint64_t{rows_} * 4);
          }
          st = RunBatch();
        }
        (void)Fail(st);
      }
    }
    ids_.pop_back();
    flags_valid_ = false;
    return true;
  }

  uint64_t size() const override { return ids_.size(); }

  // Device memory (summaries, workspaces) when on a device, plus pinned staging and the
  // host's ids; emulated, all of it host memory.
  uint64_t memory_bytes() const override {
    uint64_t bytes = ids_.capacity() * 8 + pos_.size() * 32 + rank_.capacity() * 16;
    for (const Buffer* b :
         {&vectors_, &log_weights_, &candidates_, &scores_, &workspace_, &queries_,
          &topk_workspace_, &result_, &query_stage_, &flags_, &add_stage_, &result_stage_}) {
      bytes += b->bytes();
    }
    return bytes;
  }

  Status Select(const SelectParams& params, std::span<int64_t> out,
                std::span<float> scores) override {
    KVTIER_RETURN_IF_ERROR(ValidateSelect(config_, params, out, scores));
    KVTIER_RETURN_IF_ERROR(broken_);
    const uint32_t n = static_cast<uint32_t>(ids_.size());
    const bool per_kv = params.scope == SelectionScope::kPerKvHead;
    const uint32_t score_rows = per_kv ? kv_ : 1;
    RefreshCandidates(params);
    if (n == 0 || candidate_count_ == 0) {
      std::fill(out.begin(), out.end(), -1);
      std::fill(scores.begin(), scores.end(), 0.0f);
      return Status::OK();
    }
    std::optional<cuda::ScopedDevice> scope;
    KVTIER_RETURN_IF_ERROR(EnterDevice(scope));
    // top_k candidates are among the first top_k + (non-candidates) positions.
    const uint32_t k = static_cast<uint32_t>(
        std::min<uint64_t>(n, uint64_t{params.top_k} + (n - candidate_count_)));
    KVTIER_RETURN_IF_ERROR(ReserveSelect(score_rows, n, k));

    float* q = query_stage_.get<float>();
    for (uint64_t i = 0; i < params.queries.size(); ++i) q[i] = params.queries[i] * scale_;
    ResetBatch();
    AddCopy(queries_.get(), q, params.queries.size() * 4);
    if (flags_dirty_) AddCopy(candidates_.get(), flags_.get(), n);
    KVTIER_RETURN_IF_ERROR(Fail(RunBatch()));
    flags_dirty_ = false;

    const BlockMassShape shape{
        .num_blocks = n,
        .block_capacity = capacity_,
        .num_query_heads = config_.num_query_heads,
        .num_kv_heads = kv_,
        .head_dim = d_,
        .rows = rows_,
        .selection = per_kv ? BlockSelection::kPerKvHead : BlockSelection::kPerLayer};
    const uint64_t picks = uint64_t{score_rows} * k;
    int32_t* top = result_.get<int32_t>();
    float* top_scores = reinterpret_cast<float*>(result_.bytes_at(picks * 4));
    StreamHandle stream = stream_.get();
    KVTIER_RETURN_IF_ERROR(
        Fail(estimate_(shape, queries_.get<float>(), vectors_.get<uint16_t>(),
                       log_weights_.get<float>(), candidates_.get<uint8_t>(), scores_.get<float>(),
                       workspace_.get(), workspace_.bytes(), stream)));
    KVTIER_RETURN_IF_ERROR(Fail(top_k_(scores_.get<float>(), score_rows, n, k, top,
                                       topk_workspace_.get(), topk_workspace_.bytes(), stream)));
    KVTIER_RETURN_IF_ERROR(
        Fail(gather_(scores_.get<float>(), score_rows, n, top, k, top_scores, stream)));
    ResetBatch();
    AddCopy(result_stage_.get(), result_.get(), picks * 8);
    KVTIER_RETURN_IF_ERROR(Fail(RunBatch()));
    KVTIER_RETURN_IF_ERROR(Fail(Synchronize()));

    const int32_t* got = result_stage_.get<int32_t>();
    const float* got_scores = reinterpret_cast<const float*>(result_stage_.bytes_at(picks * 4));
    const uint8_t* flags = flags_.get<uint8_t>();
    for (uint32_t r = 0; r < score_rows; ++r) {
      rank_.clear();
      for (uint64_t i = uint64_t{r} * k; i < uint64_t{r + 1} * k && rank_.size() < params.top_k;
           ++i) {
        const int32_t p = got[i];
        if (p < 0 || static_cast<uint32_t>(p) >= n) {
          return Fail(Status::Internal("gpu index: top-k returned position " + std::to_string(p) +
                                       " of " + std::to_string(n)));
        }
        if (flags[p] == 0) continue;
        const float f = got_scores[i];
        rank_.emplace_back(f == f ? f : kNegInf, ids_[p]);
      }
      std::sort(rank_.begin(), rank_.end(), Better);
      int64_t* o = out.data() + uint64_t{r} * params.top_k;
      float* sc = scores.empty() ? nullptr : scores.data() + uint64_t{r} * params.top_k;
      for (uint32_t i = 0; i < params.top_k; ++i) {
        o[i] = i < rank_.size() ? static_cast<int64_t>(rank_[i].second) : -1;
        if (sc != nullptr) sc[i] = i < rank_.size() ? rank_[i].first : 0.0f;
      }
    }
    return Status::OK();
  }

 private:
  GpuIndex(const IndexConfig& config, bool on_device, int device)
      : LayerIndex(config),
        kv_(config.summary.num_kv_heads),
        rows_(config.summary.rows),
        d_(config.summary.head_dim),
        scale_(config.scale > 0 ? config.scale : 1.0f / std::sqrt(float(config.summary.head_dim))),
        on_device_(on_device),
        device_(device),
        estimate_(on_device ? LaunchEstimateBlockMass : EstimateBlockMassRef),
        top_k_(on_device ? LaunchTopKBlocks : TopKBlocksRef),
        gather_(on_device ? LaunchGatherBlockScores : GatherBlockScoresRef) {}

  // Where the summaries and workspaces live, and the host side of copies.
  Memory Far() const { return on_device_ ? Memory::kDevice : Memory::kHost; }
  Memory Near() const { return on_device_ ? Memory::kPinned : Memory::kHost; }

  Status Init() {
    std::optional<cuda::ScopedDevice> scope;
    KVTIER_RETURN_IF_ERROR(EnterDevice(scope));
    if (on_device_) {
      KVTIER_ASSIGN_OR_RETURN(stream_, cuda::Stream::Create());
      KVTIER_ASSIGN_OR_RETURN(add_done_, cuda::Event::Create());
    }
    const uint64_t query_bytes = uint64_t{config_.num_query_heads} * d_ * 4;
    KVTIER_ASSIGN_OR_RETURN(queries_, Buffer::Allocate(Far(), query_bytes));
    KVTIER_ASSIGN_OR_RETURN(query_stage_, Buffer::Allocate(Near(), query_bytes));
    KVTIER_ASSIGN_OR_RETURN(
        add_stage_, Buffer::Allocate(Near(), StageWeightsOffset() + uint64_t{kv_} * rows_ * 4));
    batch_dsts_.reserve(2 * kv_ + 2);
    batch_srcs_.reserve(2 * kv_ + 2);
    batch_sizes_.reserve(2 * kv_ + 2);
    return Grow(kInitialCapacity);
  }

  // Makes the index's device current for the scope (nothing when emulated).
  Status EnterDevice(std::optional<cuda::ScopedDevice>& scope) const {
    if (!on_device_) return Status::OK();
    scope.emplace(device_);
    return scope->status();
  }

  // The first error sticks: later calls return it.
  Status Fail(Status s) {
    if (!s.ok() && broken_.ok()) broken_ = s.WithContext("gpu index (unusable from now on)");
    return s;
  }

  // add_stage_ holds one block's fp16 rows, then (16-byte aligned) its log weights.
  uint64_t StageWeightsOffset() const { return (uint64_t{kv_} * rows_ * d_ * 2 + 15) / 16 * 16; }

  uint64_t RowIndex(uint32_t kv, uint64_t pos) const {
    return (uint64_t{kv} * capacity_ + pos) * rows_;
  }

  void ResetBatch() {
    batch_dsts_.clear();
    batch_srcs_.clear();
    batch_sizes_.clear();
  }
  void AddCopy(void* dst, const void* src, uint64_t bytes) {
    if (bytes == 0) return;
    batch_dsts_.push_back(dst);
    batch_srcs_.push_back(src);
    batch_sizes_.push_back(bytes);
  }
  // On the device: one batched asynchronous copy on the stream; emulated: memcpy.
  Status RunBatch() {
    if (!on_device_) {
      for (size_t i = 0; i < batch_dsts_.size(); ++i) {
        std::memmove(batch_dsts_[i], batch_srcs_[i], batch_sizes_[i]);
      }
      return Status::OK();
    }
    return cuda::MemcpyBatchAsync(batch_dsts_, batch_srcs_, batch_sizes_, stream_.get());
  }
  Status Synchronize() { return on_device_ ? stream_.Synchronize() : Status::OK(); }

  // Capacity `capacity` blocks: new summary arrays holding the current blocks, and
  // workspaces of that size. On failure before the copies, the index is unchanged.
  Status Grow(uint32_t capacity) {
    const uint64_t row_elems = uint64_t{rows_} * d_;
    KVTIER_ASSIGN_OR_RETURN(Buffer vectors,
                            Buffer::Allocate(Far(), uint64_t{kv_} * capacity * row_elems * 2));
    KVTIER_ASSIGN_OR_RETURN(Buffer log_weights,
                            Buffer::Allocate(Far(), uint64_t{kv_} * capacity * rows_ * 4));
    const BlockMassShape full{.num_blocks = capacity,
                              .block_capacity = capacity,
                              .num_query_heads = config_.num_query_heads,
                              .num_kv_heads = kv_,
                              .head_dim = d_,
                              .rows = rows_};
    KVTIER_ASSIGN_OR_RETURN(Buffer workspace,
                            Buffer::Allocate(Far(), EstimateBlockMassWorkspaceBytes(full)));
    KVTIER_ASSIGN_OR_RETURN(Buffer scores, Buffer::Allocate(Far(), uint64_t{kv_} * capacity * 4));
    KVTIER_ASSIGN_OR_RETURN(Buffer candidates, Buffer::Allocate(Far(), capacity));
    KVTIER_ASSIGN_OR_RETURN(Buffer flags, Buffer::Allocate(Near(), capacity));
    const uint64_t n = ids_.size();
    if (n > 0) {
      ResetBatch();
      for (uint32_t k = 0; k < kv_; ++k) {
        AddCopy(vectors.bytes_at(uint64_t{k} * capacity * row_elems * 2),
                vectors_.bytes_at(RowIndex(k, 0) * d_ * 2), n * row_elems * 2);
        AddCopy(log_weights.bytes_at(uint64_t{k} * capacity * rows_ * 4),
                log_weights_.bytes_at(RowIndex(k, 0) * 4), n * rows_ * 4);
      }
      KVTIER_RETURN_IF_ERROR(Fail(RunBatch()));
    }
    // The old arrays are read by the copies (and by earlier work on the stream).
    KVTIER_RETURN_IF_ERROR(Fail(Synchronize()));
    vectors_ = std::move(vectors);
    log_weights_ = std::move(log_weights);
    workspace_ = std::move(workspace);
    scores_ = std::move(scores);
    candidates_ = std::move(candidates);
    flags_ = std::move(flags);
    capacity_ = capacity;
    flags_valid_ = false;
    return Status::OK();
  }

  // Top-k workspace and result buffers for a Select of `k` picks per row over n blocks;
  // grown with headroom, so steady decoding allocates nothing.
  Status ReserveSelect(uint32_t score_rows, uint32_t n, uint32_t k) {
    if (on_device_) {
      KVTIER_ASSIGN_OR_RETURN(const uint64_t need, TopKWorkspaceBytes(score_rows, n, k));
      if (need > topk_workspace_.bytes()) {
        KVTIER_ASSIGN_OR_RETURN(topk_workspace_, Buffer::Allocate(Far(), 2 * need));
      }
    }
    const uint64_t result_bytes = uint64_t{score_rows} * k * 8;
    if (result_bytes > result_.bytes()) {
      KVTIER_ASSIGN_OR_RETURN(result_, Buffer::Allocate(Far(), 2 * result_bytes));
      KVTIER_ASSIGN_OR_RETURN(result_stage_, Buffer::Allocate(Near(), 2 * result_bytes));
    }
    return Status::OK();
  }

  // The candidate flag of every position for the range of `params` (recomputed when the
  // range or the blocks changed; uploaded by the next Select that runs the kernels).
  void RefreshCandidates(const SelectParams& params) {
    if (flags_valid_ && params.candidates_begin == flags_begin_ &&
        params.candidates_end == flags_end_) {
      return;
    }
    uint8_t* flags = flags_.get<uint8_t>();
    uint32_t count = 0;
    for (uint64_t i = 0; i < ids_.size(); ++i) {
      const bool c = ids_[i] >= params.candidates_begin && ids_[i] < params.candidates_end;
      flags[i] = c ? 1 : 0;
      count += c ? 1 : 0;
    }
    candidate_count_ = count;
    flags_begin_ = params.candidates_begin;
    flags_end_ = params.candidates_end;
    flags_valid_ = true;
    flags_dirty_ = true;
  }

  const uint32_t kv_, rows_, d_;
  const float scale_;
  const bool on_device_;
  const int device_;  // -1 when emulated
  const EstimateFn estimate_;
  const TopKFn top_k_;
  const GatherFn gather_;
  cuda::Stream stream_;   // null when emulated
  cuda::Event add_done_;  // the last Add's copies out of add_stage_
  Status broken_;

  std::vector<uint64_t> ids_;                   // [n] block id of each position
  std::unordered_map<uint64_t, uint32_t> pos_;  // block id -> position
  uint32_t capacity_ = 0;                       // blocks the arrays below hold
  // Far (device) memory.
  Buffer vectors_;      // fp16 [kv][capacity][rows][d]
  Buffer log_weights_;  // float [kv][capacity][rows]
  Buffer candidates_;   // uint8 [capacity]
  Buffer scores_;       // float [score rows][n]
  Buffer workspace_;    // EstimateBlockMass's, for capacity blocks
  Buffer queries_;      // float [Hq][d], scaled
  Buffer topk_workspace_;
  Buffer result_;  // int32 [score rows][k] positions, then float [score rows][k] scores
  // Near (pinned host) memory.
  Buffer query_stage_;
  Buffer flags_;  // uint8 [capacity]: candidate flags of the last range
  Buffer add_stage_;
  Buffer result_stage_;
  // Candidate flags: valid for [flags_begin_, flags_end_) and the current positions;
  // dirty until uploaded.
  bool flags_valid_ = false;
  bool flags_dirty_ = false;
  uint64_t flags_begin_ = 0, flags_end_ = 0;
  uint32_t candidate_count_ = 0;
  // Scratch.
  std::vector<void*> batch_dsts_;
  std::vector<const void*> batch_srcs_;
  std::vector<size_t> batch_sizes_;
  std::vector<std::pair<float, uint64_t>> rank_;
};

}  // namespace

Result<std::unique_ptr<LayerIndex>> CreateGpuIndex(const IndexConfig& config, bool force_emulated) {
  if (config.summary.kind == SummaryKind::kMinMax) {
    return Status::InvalidArgument(
        "index: the gpu backend does not score min/max summaries (Quest's bound); use scan");
  }
  // The kernel's own limits, checked once on a one-block shape.
  const BlockMassShape shape{.num_blocks = 1,
                             .block_capacity = 1,
                             .num_query_heads = config.num_query_heads,
                             .num_kv_heads = config.summary.num_kv_heads,
                             .head_dim = config.summary.head_dim,
                             .rows = config.summary.rows};
  const float f = 0.0f;
  const uint16_t h = 0;
  KVTIER_RETURN_IF_ERROR(
      ValidateEstimateBlockMass(shape, &f, &h, &f, &f, &f, EstimateBlockMassWorkspaceBytes(shape))
          .WithContext("index: the gpu backend"));
  return GpuIndex::Create(config, !force_emulated && cuda::HasDevice());
}

bool GpuIndexOnDevice(const LayerIndex& index) {
  const auto* gpu = dynamic_cast<const GpuIndex*>(&index);
  return gpu != nullptr && gpu->on_device();
}

}  // namespace kvtier
