// Retrieval in the Store: RetrievalIndexes (store_retrieval.h), the summaries computed on
// Put, Store::IndexBlock, Store::Select, and the rebuild of the indexes from the catalog
// when a store is reopened. How summaries reach the catalog is in store_impl.h.
#include "src/core/store_retrieval.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <utility>

#include "src/core/store_impl.h"
#include "src/util/log.h"

namespace kvtier {

// --- RetrievalIndexes ------------------------------------------------------------------

struct RetrievalIndexes::Sequence {
  // One change to a layer's index: `summary` added for `block` (replacing any), or the
  // block removed.
  struct Change {
    uint32_t block = 0;
    bool add = false;
    BlockSummary summary;
  };
  struct Layer {
    Mutex index_mu;
    std::unique_ptr<LayerIndex> index KVTIER_GUARDED_BY(index_mu);  // null while empty
    std::vector<Change> applying KVTIER_GUARDED_BY(index_mu);       // Apply's scratch
    uint64_t counted_bytes KVTIER_GUARDED_BY(index_mu) = 0;         // in Counters::memory_bytes
    // A selection widened by the runners-up (prefetch), before it is split.
    std::vector<int64_t> wide KVTIER_GUARDED_BY(index_mu);
    std::vector<float> wide_scores KVTIER_GUARDED_BY(index_mu);
    Mutex queue_mu;
    std::vector<Change> queue KVTIER_GUARDED_BY(queue_mu);  // not applied yet, in order
    // The blocks indexed once the queue is applied.
    std::unordered_set<uint32_t> members KVTIER_GUARDED_BY(queue_mu);
  };

  Sequence(uint32_t num_layers, Counters* c)
      : layers(std::make_unique<Layer[]>(num_layers)), layer_count(num_layers), counters(c) {}
  ~Sequence() {
    // The last reference: nobody else can lock these any more.
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < layer_count; ++i) {
      MutexLock lock(&layers[i].index_mu);
      bytes += layers[i].counted_bytes;
    }
    counters->memory_bytes.fetch_sub(bytes, std::memory_order_relaxed);
  }
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  const std::unique_ptr<Layer[]> layers;
  const uint32_t layer_count;
  Counters* const counters;
  // Blocks of every layer in `members`; read and written by Queue* only (serialized).
  uint64_t members = 0;
};

namespace {

using Layer = RetrievalIndexes::Sequence::Layer;

Status CheckRange(const char* field, uint64_t value, uint64_t lo, uint64_t hi) {
  if (value >= lo && value <= hi) return Status::OK();
  return Status::InvalidArgument("retrieval." + std::string(field) + " must be in [" +
                                 std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                                 std::to_string(value));
}

}  // namespace

Result<std::unique_ptr<RetrievalIndexes>> RetrievalIndexes::Create(
    const ModelLayout& layout, const RetrievalOptions& options) {
  if (options.summary > SummaryKind::kTopR) {
    return Status::InvalidArgument("retrieval.summary: unknown summary kind " +
                                   std::to_string(static_cast<int>(options.summary)));
  }
  if (options.backend > IndexBackend::kGpu) {
    return Status::InvalidArgument("retrieval.backend: unknown index backend " +
                                   std::to_string(static_cast<int>(options.backend)));
  }
  if (options.scope > SelectionScope::kPerKvHead) {
    return Status::InvalidArgument("retrieval.scope: unknown selection scope " +
                                   std::to_string(static_cast<int>(options.scope)));
  }
  KVTIER_RETURN_IF_ERROR(CheckRange("clusters", options.clusters, 1, kMaxSummaryRows));
  KVTIER_RETURN_IF_ERROR(CheckRange("top_r", options.top_r, 1, kMaxSummaryRows));
  KVTIER_RETURN_IF_ERROR(
      CheckRange("coarse_clusters", options.coarse_clusters, 0, kMaxSummaryRows));
  KVTIER_RETURN_IF_ERROR(CheckRange("shortlist_factor", options.shortlist_factor, 0, 1024));
  KVTIER_RETURN_IF_ERROR(CheckRange("top_k", options.top_k, 1, 65536));
  KVTIER_RETURN_IF_ERROR(
      CheckRange("prefetch_extra", options.prefetch_extra, 0, kMaxPrefetchExtra));
  if (!(options.score_decay > 0.0f && options.score_decay <= 1.0f)) {
    return Status::InvalidArgument("retrieval.score_decay must be in (0, 1]");
  }
  if (options.replacement > ReplacementPolicy::kScoreDecay) {
    return Status::InvalidArgument("retrieval.replacement: unknown policy");
  }
  KVTIER_RETURN_IF_ERROR(CheckRange("hnsw_m", options.hnsw_m, 2, 1024));
  KVTIER_RETURN_IF_ERROR(CheckRange("hnsw_ef_search", options.hnsw_ef_search, 1, 65536));
  if (options.backend == IndexBackend::kInfLLM && options.scope == SelectionScope::kPerKvHead) {
    return Status::InvalidArgument(
        "retrieval: the infllm backend selects per layer only (scope kPerKvHead is not "
        "supported)");
  }
  IndexConfig config;
  config.num_query_heads = layout.num_query_heads;
  config.summary = SummaryShape::For(layout, options);
  config.backend = options.backend == IndexBackend::kAuto ? IndexBackend::kScan : options.backend;
  config.hnsw_m = options.hnsw_m;
  config.hnsw_ef_search = options.hnsw_ef_search;
  // Two-stage scoring where it applies (kvtier/retrieval.h); else one pass.
  if (config.backend == IndexBackend::kScan && options.summary == SummaryKind::kClusters &&
      options.coarse_clusters > 0 && options.shortlist_factor > 0 &&
      options.coarse_clusters < options.clusters) {
    config.coarse_rows = options.coarse_clusters;
    config.shortlist_factor = options.shortlist_factor;
  }
  KVTIER_RETURN_IF_ERROR(ValidateSummaryShape(config.summary).WithContext("retrieval"));
  // One index, thrown away: a backend that cannot be had fails Open, not the first Put.
  Result<std::unique_ptr<LayerIndex>> probe = CreateLayerIndex(config);
  if (!probe.ok()) {
    return probe.status().WithContext("retrieval: the " +
                                      std::string(IndexBackendName(config.backend)) + " index");
  }
  return std::unique_ptr<RetrievalIndexes>(new RetrievalIndexes(layout, options, config));
}

RetrievalIndexes::RetrievalIndexes(const ModelLayout& layout, const RetrievalOptions& options,
                                   const IndexConfig& config)
    : layout_(layout), options_(options), config_(config) {}

RetrievalIndexes::~RetrievalIndexes() {
  MutexLock lock(&map_mu_);
  sequences_.clear();  // before counters_ goes
}

std::shared_ptr<RetrievalIndexes::Sequence> RetrievalIndexes::Find(
    uint32_t namespace_id, const SequenceId& sequence) const {
  MutexLock lock(&map_mu_);
  auto it = sequences_.find(SequenceKey{namespace_id, sequence});
  return it == sequences_.end() ? nullptr : it->second;
}

RetrievalIndexes::LayerRef RetrievalIndexes::QueueAdd(const BlockKey& key, BlockSummary summary) {
  if (key.layer >= layout_.num_layers) return {};
  std::shared_ptr<Sequence> sequence;
  {
    MutexLock lock(&map_mu_);
    std::shared_ptr<Sequence>& slot = sequences_[SequenceKey{key.namespace_id, key.sequence}];
    if (slot == nullptr) slot = std::make_shared<Sequence>(layout_.num_layers, &counters_);
    sequence = slot;
  }
  Layer& layer = sequence->layers[key.layer];
  bool added;
  {
    MutexLock lock(&layer.queue_mu);
    added = layer.members.insert(key.block).second;
    layer.queue.push_back(Sequence::Change{key.block, true, std::move(summary)});
  }
  if (added) {
    ++sequence->members;
    counters_.indexed_blocks.fetch_add(1, std::memory_order_relaxed);
  }
  return LayerRef{std::move(sequence), key.layer};
}

RetrievalIndexes::LayerRef RetrievalIndexes::QueueRemove(const BlockKey& key,
                                                         std::shared_ptr<Sequence>* retired) {
  if (key.layer >= layout_.num_layers) return {};
  std::shared_ptr<Sequence> sequence = Find(key.namespace_id, key.sequence);
  if (sequence == nullptr) return {};
  Layer& layer = sequence->layers[key.layer];
  {
    MutexLock lock(&layer.queue_mu);
    if (layer.members.erase(key.block) == 0) return {};
    layer.queue.push_back(Sequence::Change{key.block, false, {}});
  }
  --sequence->members;
  counters_.indexed_blocks.fetch_sub(1, std::memory_order_relaxed);
  if (sequence->members == 0) {
    // Its last block: the whole sequence goes (a later Put starts a fresh one).
    MutexLock lock(&map_mu_);
    sequences_.erase(SequenceKey{key.namespace_id, key.sequence});
    *retired = std::move(sequence);
    return {};
  }
  return LayerRef{std::move(sequence), key.layer};
}

std::shared_ptr<RetrievalIndexes::Sequence> RetrievalIndexes::DropSequence(
    uint32_t namespace_id, const SequenceId& sequence) {
  MutexLock lock(&map_mu_);
  auto it = sequences_.find(SequenceKey{namespace_id, sequence});
  if (it == sequences_.end()) return nullptr;
  std::shared_ptr<Sequence> dropped = std::move(it->second);
  sequences_.erase(it);
  counters_.indexed_blocks.fetch_sub(dropped->members, std::memory_order_relaxed);
  return dropped;
}

namespace {

// Applies the layer's queued changes in order; keeps Counters::memory_bytes current.
void ApplyLocked(Layer& layer, const IndexConfig& config, std::atomic<uint64_t>& memory_bytes)
    KVTIER_REQUIRES(layer.index_mu) {
  {
    MutexLock lock(&layer.queue_mu);
    if (layer.queue.empty()) return;
    layer.queue.swap(layer.applying);
  }
  for (RetrievalIndexes::Sequence::Change& change : layer.applying) {
    if (!change.add) {
      if (layer.index != nullptr) layer.index->Remove(change.block);
      continue;
    }
    if (layer.index == nullptr) {
      Result<std::unique_ptr<LayerIndex>> index = CreateLayerIndex(config);
      if (!index.ok()) {  // Create made one with this config: should not happen
        Log().error("kvtier: creating a retrieval index: {}", index.status().ToString());
        continue;
      }
      layer.index = std::move(index).value();
    }
    if (Status s = layer.index->Add(change.block, change.summary); !s.ok()) {
      Log().error("kvtier: indexing block {}: {}", change.block, s.ToString());
    }
  }
  layer.applying.clear();
  if (layer.index != nullptr && layer.index->size() == 0) layer.index.reset();
  const uint64_t now = layer.index != nullptr ? layer.index->memory_bytes() : 0;
  memory_bytes.fetch_add(now - layer.counted_bytes, std::memory_order_relaxed);  // mod 2^64
  layer.counted_bytes = now;
}

}  // namespace

void RetrievalIndexes::Apply(const LayerRef& ref) {
  if (ref.sequence == nullptr) return;
  Layer& layer = ref.sequence->layers[ref.layer];
  MutexLock lock(&layer.index_mu);
  ApplyLocked(layer, config_, counters_.memory_bytes);
}

void RetrievalIndexes::ApplyAll() {
  std::vector<std::shared_ptr<Sequence>> all;
  {
    MutexLock lock(&map_mu_);
    all.reserve(sequences_.size());
    for (const auto& [key, sequence] : sequences_) all.push_back(sequence);
  }
  for (const std::shared_ptr<Sequence>& sequence : all) {
    for (uint32_t l = 0; l < sequence->layer_count; ++l) Apply(LayerRef{sequence, l});
  }
}

Result<SelectInfo> RetrievalIndexes::Select(uint32_t namespace_id, const SequenceId& sequence,
                                            uint32_t layer_id, std::span<const float> queries,
                                            uint64_t context_tokens, std::span<int64_t> selected,
                                            std::span<float> scores,
                                            std::span<int64_t> runners_up) {
  const auto start = std::chrono::steady_clock::now();
  if (layer_id >= layout_.num_layers) {
    return Status::InvalidArgument("Select: layer " + std::to_string(layer_id) +
                                   " outside the layout's " + std::to_string(layout_.num_layers) +
                                   " layers");
  }
  const uint64_t query_floats = uint64_t{layout_.num_query_heads} * layout_.head_dim;
  if (queries.size() != query_floats) {
    return Status::InvalidArgument(
        "Select: " + std::to_string(queries.size()) + " query floats; this layout's queries are " +
        std::to_string(layout_.num_query_heads) + " heads x " + std::to_string(layout_.head_dim) +
        " = " + std::to_string(query_floats));
  }
  // The step's budget (kvtier/retrieval.h): sinks, the local window, candidates between.
  const uint64_t block_tokens = layout_.block_tokens;
  SelectInfo info;
  info.sink_blocks = options_.n_init / block_tokens + (options_.n_init % block_tokens != 0);
  const uint64_t local_tokens = std::min<uint64_t>(options_.n_local, context_tokens);
  info.local_begin = std::max(info.sink_blocks, (context_tokens - local_tokens) / block_tokens);
  info.local_end = std::max(info.local_begin,
                            context_tokens / block_tokens + (context_tokens % block_tokens != 0));
  const SelectParams params{.queries = queries,
                            .top_k = options_.top_k,
                            .scope = options_.scope,
                            .candidates_begin = info.sink_blocks,
                            .candidates_end = info.local_begin};
  KVTIER_RETURN_IF_ERROR(ValidateSelect(config_, params, selected, scores));

  bool done = false;
  if (std::shared_ptr<Sequence> seq = Find(namespace_id, sequence); seq != nullptr) {
    Layer& layer = seq->layers[layer_id];
    MutexLock lock(&layer.index_mu);
    ApplyLocked(layer, config_, counters_.memory_bytes);
    if (layer.index != nullptr && !runners_up.empty() &&
        params.scope == SelectionScope::kPerLayer) {
      // Rank top_k + runners_up.size() blocks in one pass, then split.
      SelectParams wide = params;
      wide.top_k = options_.top_k + static_cast<uint32_t>(runners_up.size());
      layer.wide.resize(wide.top_k);
      layer.wide_scores.resize(wide.top_k);
      KVTIER_RETURN_IF_ERROR(layer.index->Select(wide, layer.wide, layer.wide_scores));
      std::copy_n(layer.wide.begin(), options_.top_k, selected.begin());
      if (!scores.empty()) std::copy_n(layer.wide_scores.begin(), options_.top_k, scores.begin());
      std::copy(layer.wide.begin() + options_.top_k, layer.wide.end(), runners_up.begin());
      done = true;
    } else if (layer.index != nullptr) {
      KVTIER_RETURN_IF_ERROR(layer.index->Select(params, selected, scores));
      const uint64_t now = layer.index->memory_bytes();  // its scratch may have grown
      counters_.memory_bytes.fetch_add(now - layer.counted_bytes, std::memory_order_relaxed);
      layer.counted_bytes = now;
      done = true;
    }
  }
  if (!done) {  // nothing indexed: nothing selected
    std::fill(runners_up.begin(), runners_up.end(), int64_t{-1});
    std::fill(selected.begin(), selected.end(), int64_t{-1});
    std::fill(scores.begin(), scores.end(), 0.0f);
  }
  info.selected = static_cast<uint32_t>(
      std::count_if(selected.begin(), selected.end(), [](int64_t b) { return b >= 0; }));
  const auto nanos =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  counters_.selects.fetch_add(1, std::memory_order_relaxed);
  counters_.select_nanos.fetch_add(static_cast<uint64_t>(nanos), std::memory_order_relaxed);
  return info;
}

void RetrievalIndexes::AddStats(StoreStats* stats) const {
  stats->indexed_blocks = counters_.indexed_blocks.load(std::memory_order_relaxed);
  stats->index_memory_bytes = counters_.memory_bytes.load(std::memory_order_relaxed);
  stats->selects = counters_.selects.load(std::memory_order_relaxed);
  stats->select_nanos = counters_.select_nanos.load(std::memory_order_relaxed);
}

// --- The Store's side ------------------------------------------------------------------

Status EmbeddedStore::Impl::PrepareSummary(const void* block, uint32_t valid_tokens,
                                           std::span<const float> token_scores,
                                           PreparedSummary* out) {
  KVTIER_RETURN_IF_ERROR(
      SummarizeBlock(retrieval->shape(), block, valid_tokens, token_scores, &out->summary));
  if (has_disk) out->encoded = EncodeSummary(retrieval->shape(), out->summary);
  return Status::OK();
}

Status EmbeddedStore::Impl::RebuildRetrievalLocked() {
  uint64_t indexed = 0, undecodable = 0, stray = 0;
  BlockSummary summary;
  Status s = catalog->ForEachRepresentatives(
      [&](const BlockKey& key, std::span<const std::byte> bytes) KVTIER_REQUIRES(mu) {
        const BlockIndex::Entry* e = index.Find(key);
        if (e == nullptr || !e->on_disk || (e->disk.flags & kBlockCorrupt) ||
            key.layer >= layout.num_layers) {
          ++stray;  // never indexed: a corrupt block, or one the catalog does not hold
          return true;
        }
        if (Status d = DecodeSummary(retrieval->shape(), bytes, &summary); !d.ok()) {
          if (++undecodable <= 3) {
            Log().warn("kvtier: {}: the summary of block {} is not one of this store's: {}",
                       options.directory, key.ToString(), d.ToString());
          }
          return true;
        }
        retrieval->QueueAdd(key, std::move(summary));
        summary = BlockSummary{};
        ++indexed;
        return true;
      });
  if (!s.ok()) {
    // The blocks are intact; only their summaries are (partly) lost.
    Log().error("kvtier: {}: reading the block summaries: {}; the retrieval index holds {}",
                options.directory, s.ToString(), indexed);
  }
  if (undecodable > 0) {
    Log().warn(
        "kvtier: {}: {} block summaries skipped (written with other retrieval options, or "
        "damaged); IndexBlock or a new Put indexes those blocks again",
        options.directory, undecodable);
  }
  if (stray > 0) {
    Log().info("kvtier: {}: {} summaries of corrupt or absent blocks ignored", options.directory,
               stray);
  }
  const uint64_t healthy = stats.disk_blocks - stats.corrupt_blocks;
  if (indexed < healthy) {
    Log().info("kvtier: {}: {} of {} blocks on disk have no usable summary and cannot be selected",
               options.directory, healthy - indexed, healthy);
  }
  return Status::OK();
}

Status EmbeddedStore::IndexBlock(const BlockKey& key, const void* data, uint64_t bytes,
                                 uint32_t valid_tokens, std::span<const float> token_scores) {
  Impl& d = *impl_;
  if (d.retrieval == nullptr) {
    return Status::FailedPrecondition("IndexBlock: retrieval is not enabled in this store");
  }
  KVTIER_RETURN_IF_ERROR(d.CheckKey(key));
  KVTIER_RETURN_IF_ERROR(d.CheckBuffer(data, bytes));
  if (valid_tokens == 0 || valid_tokens > d.layout.block_tokens) {
    return Status::InvalidArgument("IndexBlock: valid_tokens " + std::to_string(valid_tokens) +
                                   " outside [1, " + std::to_string(d.layout.block_tokens) + "]");
  }
  const uint64_t score_count = uint64_t{d.layout.num_kv_heads} * d.layout.block_tokens;
  if (!token_scores.empty() && token_scores.size() != score_count) {
    return Status::InvalidArgument("IndexBlock: " + std::to_string(token_scores.size()) +
                                   " token scores; expected none or num_kv_heads x "
                                   "block_tokens = " +
                                   std::to_string(score_count));
  }
  Impl::PreparedSummary summary;
  KVTIER_RETURN_IF_ERROR(d.PrepareSummary(data, valid_tokens, token_scores, &summary));
  RetrievalIndexes::LayerRef touched;
  {
    MutexLock lock(&d.mu);
    const BlockIndex::Entry* e = d.index.Find(key);
    if (e == nullptr || (e->host_slot == BlockIndex::kNoSlot && (e->disk.flags & kBlockCorrupt))) {
      return Status::NotFound("IndexBlock: block " + key.ToString() + " is not in the store");
    }
    if (d.has_disk) {
      // A block not durable yet: its catalog commit, still to come, carries the newest
      // summary. But a commit may be under way with an older one, so the summary also
      // goes in a job behind it in the catalog's FIFO, which writes it once the block is
      // durable (and does nothing if the block has changed or gone by then).
      if (e->dirty) d.pending_summaries[e->version] = summary.encoded;
      d.QueueSummaryWriteLocked(key, e->version, std::move(summary.encoded));
    }
    touched = d.retrieval->QueueAdd(key, std::move(summary.summary));
  }
  d.retrieval->Apply(touched);
  return Status::OK();
}

Result<SelectInfo> EmbeddedStore::Select(uint32_t namespace_id, const SequenceId& sequence,
                                         uint32_t layer, std::span<const float> queries,
                                         uint64_t context_tokens, std::span<int64_t> selected,
                                         std::span<float> scores) {
  if (impl_->retrieval == nullptr) {
    return Status::FailedPrecondition("Select: retrieval is not enabled in this store");
  }
  const RetrievalOptions& r = impl_->options.retrieval;
  if (impl_->device == nullptr || !r.prefetch || r.prefetch_extra == 0 ||
      r.scope != SelectionScope::kPerLayer) {
    return impl_->retrieval->Select(namespace_id, sequence, layer, queries, context_tokens,
                                    selected, scores, {});
  }
  // With prefetch: the runners-up are remembered for the Acquire that follows.
  int64_t runners[kMaxPrefetchExtra];
  const std::span<int64_t> extra(runners, r.prefetch_extra);
  KVTIER_ASSIGN_OR_RETURN(SelectInfo info,
                          impl_->retrieval->Select(namespace_id, sequence, layer, queries,
                                                   context_tokens, selected, scores, extra));
  impl_->NoteRunnersUp(namespace_id, sequence, layer, extra);
  return info;
}

}  // namespace kvtier
