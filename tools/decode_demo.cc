// `kvtier demo`: the decode loop (tools/demo.h): prefill a synthetic long context into a
// tiered store, then Select -> Acquire -> attention -> Release per step and layer, with
// the quality judged by the exact attention oracle on a few layers.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/workload/oracle.h"
#include "bench/workload/workload.h"
#include "kernels/cuda_runtime.h"
#include "kernels/decode_attention.h"
#include "kvtier/store.h"
#include "tools/chunk_generator.h"
#include "tools/demo.h"
#include "tools/json_writer.h"
#include "tools/sparse_attention.h"
#include "tools/tool_util.h"
#include "tools/trace.h"

namespace kvtier::tools {
namespace {

using bench::AttentionOracle;
using bench::Needle;
using bench::Workload;
using Clock = std::chrono::steady_clock;

constexpr uint32_t kNamespace = 0;
constexpr double kMB = 1e6;
constexpr double kGiB = double(uint64_t{1} << 30);

// What one decoding step measured, summed over layers (quality: over evaluated layers).
struct StepRow {
  double select_s = 0, fetch_s = 0, attention_s = 0;
  uint64_t blocks = 0, hits = 0, from_host = 0, from_disk = 0;
  uint64_t disk_to_host_bytes = 0, host_to_device_bytes = 0;
  uint32_t evaluated = 0;  // (layer) evaluations summed below
  double recall = 0, coverage = 0, output_rel_l2 = 0;
  uint32_t needles = 0, needles_found = 0;          // in evaluated layers (the oracle's)
  uint32_t needles_all = 0, needles_all_found = 0;  // in every layer (the attended set)

  double hit_rate() const { return blocks ? double(hits) / double(blocks) : 0.0; }
  double Mean(double sum) const { return evaluated ? sum / evaluated : std::nan(""); }
};

// "1.50 GiB", or "12.0 MiB" below a GiB.
std::string SizeText(uint64_t bytes) {
  char buf[32];
  if (double(bytes) >= kGiB) {
    std::snprintf(buf, sizeof(buf), "%.2f GiB", double(bytes) / kGiB);
  } else {
    std::snprintf(buf, sizeof(buf), "%.1f MiB", double(bytes) / double(1 << 20));
  }
  return buf;
}

class DecodeDemo {
 public:
  explicit DecodeDemo(const DemoConfig& config) : config_(config) {}

  // 0, 1 or 2 as `kvtier demo` exits.
  int Run();

 private:
  Status Setup();
  Status Prefill();
  Status Step(uint32_t step, StepRow* row);
  Status Layer(uint32_t step, uint32_t layer, StepRow* row);
  void PrintHeader() const;
  void PrintStepHeader() const;
  void PrintStep(uint32_t step, const StepRow& row) const;
  void PrintSummary(bool ok, double wall_s) const;
  void PrintJson(bool ok, double wall_s) const;
  StepRow Total() const;
  // Index of `layer` among the evaluated layers, or -1.
  int EvalIndex(uint32_t layer) const {
    auto it = std::find(eval_layers_.begin(), eval_layers_.end(), layer);
    return it == eval_layers_.end() ? -1 : int(it - eval_layers_.begin());
  }

  const DemoConfig& config_;
  ModelLayout layout_;
  std::unique_ptr<Workload> workload_;
  TempStoreDir temp_;
  StoreOptions options_;
  std::unique_ptr<Store> store_;
  bool on_gpu_ = false;
  std::string gpu_text_;
  cuda::Stream stream_;
  std::unique_ptr<SparseAttention> attention_;
  std::unique_ptr<TraceWriter> trace_;  // --trace-out
  const SequenceId sequence_ = SequenceId::FromU64(1);

  std::vector<uint32_t> eval_layers_;
  // [eval layer][step]: the oracle of that layer and step.
  std::vector<std::vector<std::unique_ptr<AttentionOracle>>> oracles_;
  std::vector<float> queries_;  // [layer][step][query_heads][head_dim]

  // Prefill.
  double prefill_s_ = 0, put_s_ = 0, oracle_s_ = 0, generator_wait_s_ = 0;
  uint32_t generator_threads_ = 1;
  StoreStats after_prefill_;

  // Decode.
  std::vector<StepRow> rows_;
  double decode_s_ = 0;
  double max_kernel_gap_ = 0;  // |attention output error - the oracle's|, largest
  uint32_t kernel_mismatches_ = 0;

  // Per-call scratch.
  std::vector<int64_t> selected_;
  std::vector<float> select_scores_;
  std::vector<int64_t> blocks_;
  std::vector<float> block_scores_;
  std::vector<uint32_t> valid_;
  std::vector<uint64_t> addresses_;
  std::vector<uint64_t> picked_;
  std::vector<float> out_;
};

Status DecodeDemo::Setup() {
  KVTIER_ASSIGN_OR_RETURN(DType dtype, ParseDType(config_.dtype));
  layout_ = config_.layout;
  layout_.dtype = dtype;
  KVTIER_RETURN_IF_ERROR(layout_.Validate());
  if (layout_.head_dim % 8 != 0 || layout_.head_dim > kMaxAttentionHeadDim) {
    return Status::InvalidArgument("head_dim " + std::to_string(layout_.head_dim) +
                                   ": decode attention takes a multiple of 8, at most 256");
  }
  if (config_.steps == 0) return Status::InvalidArgument("--steps must be at least 1");

  bench::WorkloadOptions wo;
  wo.layout = layout_;
  wo.tokens = config_.tokens;
  wo.steps = config_.steps;
  wo.seed = config_.seed;
  wo.needles = config_.needles;
  KVTIER_ASSIGN_OR_RETURN(workload_, Workload::Create(wo));

  // The store: a host tier smaller than the context, the disk tier for the rest, the
  // GPU tier for what attention reads.
  options_.host_capacity_bytes = static_cast<uint64_t>(config_.host_gib * kGiB);
  if (config_.dir.empty()) {
    KVTIER_RETURN_IF_ERROR(temp_.Create());
    temp_.keep = config_.keep;
    options_.directory = temp_.path;
  } else {
    options_.directory = config_.dir;
  }
  const uint64_t context_bytes =
      workload_->num_blocks() * layout_.BytesPerBlock() * layout_.num_layers;
  options_.disk_capacity_bytes = context_bytes + context_bytes / 4 + (64ull << 20);
  options_.retrieval = config_.retrieval;
  options_.retrieval.enabled = true;
  options_.retrieval.device_capacity_bytes = static_cast<uint64_t>(config_.device_gib * kGiB);
  KVTIER_ASSIGN_OR_RETURN(store_, Store::Open(options_, layout_));
  const StoreStats stats = store_->Stats();
  on_gpu_ = cuda::HasDevice() && !stats.device_emulated;
  if (on_gpu_) {
    Result<std::string> name = cuda::DeviceName(0);
    gpu_text_ = name.ok() ? *name : "a GPU";
    KVTIER_ASSIGN_OR_RETURN(stream_, cuda::Stream::Create());
  } else {
    const std::string reason = cuda::Devices().reason;
    gpu_text_ = "EMULATED in host memory (no GPU" + (reason.empty() ? "" : ": " + reason) + ")";
  }

  // Per step and layer at most: the sinks, the window (plus a partial block) and top_k
  // (per KV head for that scope).
  const RetrievalOptions& r = options_.retrieval;
  const uint32_t bt = layout_.block_tokens;
  const uint64_t max_entries =
      (r.n_init + bt - 1) / bt + (r.n_local + bt - 1) / bt + 2 +
      uint64_t{r.top_k} * (r.scope == SelectionScope::kPerKvHead ? layout_.num_kv_heads : 1);
  if (options_.retrieval.device_capacity_bytes < max_entries * layout_.BytesPerBlock()) {
    return Status::InvalidArgument("--device-gib " + std::to_string(config_.device_gib) +
                                   " is too small: one layer's step "
                                   "attends up to " +
                                   std::to_string(max_entries) + " blocks of " +
                                   std::to_string(layout_.BytesPerBlock()) + " bytes");
  }
  if (!config_.trace_out.empty()) {
    const TraceHeader header{.layers = layout_.num_layers,
                             .block_bytes = layout_.BytesPerBlock(),
                             .block_tokens = layout_.block_tokens,
                             .tokens = config_.tokens,
                             .source = "kvtier demo, " + layout_.ToString() + ", top_k " +
                                       std::to_string(r.top_k) + ", n_init " +
                                       std::to_string(r.n_init) + ", n_local " +
                                       std::to_string(r.n_local)};
    Result<std::unique_ptr<TraceWriter>> trace = TraceWriter::Open(config_.trace_out, header);
    if (!trace.ok()) return trace.status().WithContext("--trace-out");
    trace_ = std::move(trace).value();
  }
  KVTIER_ASSIGN_OR_RETURN(attention_,
                          SparseAttention::Create(layout_, on_gpu_, uint32_t(max_entries),
                                                  std::thread::hardware_concurrency()));

  // The queries of every (layer, step), and the oracles of the evaluated layers.
  const uint64_t qf = uint64_t{layout_.num_query_heads} * layout_.head_dim;
  queries_.resize(uint64_t{layout_.num_layers} * config_.steps * qf);
  for (uint32_t l = 0; l < layout_.num_layers; ++l) {
    for (uint32_t s = 0; s < config_.steps; ++s) {
      KVTIER_RETURN_IF_ERROR(
          workload_->Query(l, s, {&queries_[(uint64_t{l} * config_.steps + s) * qf], qf}));
    }
  }
  const uint32_t e = std::min(config_.eval_layers, layout_.num_layers);
  for (uint32_t i = 0; i < e; ++i) {
    eval_layers_.push_back((2 * i + 1) * layout_.num_layers / (2 * e));  // evenly spaced
  }
  const bench::OracleConfig oc{.num_query_heads = layout_.num_query_heads,
                               .num_kv_heads = layout_.num_kv_heads,
                               .head_dim = layout_.head_dim,
                               .block_tokens = bt};
  for (uint32_t layer : eval_layers_) {
    oracles_.emplace_back();
    for (uint32_t s = 0; s < config_.steps; ++s) {
      KVTIER_ASSIGN_OR_RETURN(
          auto o,
          AttentionOracle::Create(oc, {&queries_[(uint64_t{layer} * config_.steps + s) * qf], qf}));
      oracles_.back().push_back(std::move(o));
    }
  }
  out_.resize(qf);
  return Status::OK();
}

// One PutBatch per chunk of block_tokens tokens across all layers, the chunks generated
// ahead on worker threads; the evaluated layers' blocks also go to their oracles.
Status DecodeDemo::Prefill() {
  const auto start = Clock::now();
  const uint32_t layers = layout_.num_layers, bt = layout_.block_tokens;
  const uint64_t block_bytes = layout_.BytesPerBlock();
  generator_threads_ = std::max(1u, std::thread::hardware_concurrency());
  ChunkGenerator generator(*workload_, generator_threads_, generator_threads_ + 2);
  std::vector<BlockWrite> writes(layers);
  std::vector<Status> statuses(layers);
  for (uint64_t c = 0; c < generator.chunks(); ++c) {
    KVTIER_ASSIGN_OR_RETURN(const std::byte* chunk, generator.Wait(c));
    for (uint32_t l = 0; l < layers; ++l) {
      const BlockKey key{.namespace_id = kNamespace,
                         .sequence = sequence_,
                         .layer = l,
                         .block = static_cast<uint32_t>(c)};
      writes[l] = {key, chunk + l * block_bytes, block_bytes};
    }
    auto t0 = Clock::now();
    KVTIER_RETURN_IF_ERROR(store_->PutBatch(writes, statuses).WithContext("PutBatch"));
    const uint32_t valid = uint32_t(std::min<uint64_t>(bt, config_.tokens - c * bt));
    if (valid < bt) {  // the newest block is partial: summarise its valid tokens only
      for (const BlockWrite& w : writes) {
        KVTIER_RETURN_IF_ERROR(
            store_->IndexBlock(w.key, w.data, w.bytes, valid, {}).WithContext("IndexBlock"));
      }
    }
    put_s_ += SecondsSince(t0);
    t0 = Clock::now();
    for (size_t e = 0; e < eval_layers_.size(); ++e) {
      for (auto& oracle : oracles_[e]) {
        KVTIER_RETURN_IF_ERROR(
            oracle->AddBlock(chunk + eval_layers_[e] * block_bytes, layout_.dtype, valid));
      }
    }
    oracle_s_ += SecondsSince(t0);
    generator.Done(c);
  }
  const auto t0 = Clock::now();
  KVTIER_RETURN_IF_ERROR(store_->Flush().WithContext("Flush"));
  put_s_ += SecondsSince(t0);
  generator_wait_s_ = generator.wait_seconds();
  prefill_s_ = SecondsSince(start);
  after_prefill_ = store_->Stats();
  return Status::OK();
}

Status DecodeDemo::Layer(uint32_t step, uint32_t layer, StepRow* row) {
  const RetrievalOptions& r = options_.retrieval;
  const uint32_t bt = layout_.block_tokens;
  const uint64_t qf = uint64_t{layout_.num_query_heads} * layout_.head_dim;
  std::span<const float> q(&queries_[(uint64_t{layer} * config_.steps + step) * qf], qf);
  const uint64_t select_size =
      r.scope == SelectionScope::kPerKvHead ? uint64_t{r.top_k} * layout_.num_kv_heads : r.top_k;
  selected_.resize(select_size);
  select_scores_.resize(select_size);

  // 1. Select.
  auto t0 = Clock::now();
  KVTIER_ASSIGN_OR_RETURN(
      SelectInfo info,
      store_->Select(kNamespace, sequence_, layer, q, config_.tokens, selected_, select_scores_));
  row->select_s += SecondsSince(t0);

  // 2. Acquire the sinks, the selected blocks (each once) and the window.
  const uint64_t last_block = (config_.tokens - 1) / bt;
  const float always = float(layout_.num_query_heads);  // the largest fused score
  blocks_.clear();
  block_scores_.clear();
  picked_.clear();
  for (uint64_t b = 0; b < info.sink_blocks && b < info.local_begin; ++b) {
    blocks_.push_back(int64_t(b));
    block_scores_.push_back(always);
  }
  for (size_t i = 0; i < selected_.size(); ++i) {
    const int64_t b = selected_[i];
    if (b < 0 || std::find(picked_.begin(), picked_.end(), uint64_t(b)) != picked_.end()) continue;
    picked_.push_back(uint64_t(b));
    blocks_.push_back(b);
    block_scores_.push_back(select_scores_[i]);
  }
  for (uint64_t b = info.local_begin; b < info.local_end; ++b) {
    blocks_.push_back(int64_t(b));
    block_scores_.push_back(always);
  }
  valid_.resize(blocks_.size());
  for (size_t i = 0; i < blocks_.size(); ++i) {
    valid_[i] =
        uint64_t(blocks_[i]) == last_block ? uint32_t(config_.tokens - last_block * bt) : bt;
  }
  addresses_.resize(blocks_.size());
  t0 = Clock::now();
  KVTIER_ASSIGN_OR_RETURN(AcquireInfo acquired,
                          store_->Acquire(kNamespace, sequence_, layer, blocks_, stream_.get(),
                                          addresses_, block_scores_));
  row->fetch_s += SecondsSince(t0);
  if (trace_ != nullptr) {
    KVTIER_RETURN_IF_ERROR(
        trace_->Append(step, layer, blocks_, block_scores_).WithContext("--trace-out"));
  }
  row->blocks += blocks_.size();
  row->hits += acquired.hits;
  row->from_host += acquired.from_host;
  row->from_disk += acquired.from_disk;

  // 3. Sparse attention over the acquired blocks; 4. Release.
  t0 = Clock::now();
  Status attended = attention_->Run(q, addresses_, valid_, out_, stream_.get());
  row->attention_s += SecondsSince(t0);
  KVTIER_RETURN_IF_ERROR(store_->Release(acquired.lease).WithContext("Release"));
  KVTIER_RETURN_IF_ERROR(attended.WithContext("attention"));

  // Needles of this (layer, step): attended when in the sinks, the window or selected.
  const std::vector<Needle> needles = workload_->NeedlesAt(layer, step);
  for (const Needle& n : needles) {
    const bool hit = n.block < info.sink_blocks ||
                     (n.block >= info.local_begin && n.block < info.local_end) ||
                     std::find(picked_.begin(), picked_.end(), n.block) != picked_.end();
    row->needles_all += 1;
    row->needles_all_found += hit;
  }

  // Quality on the evaluated layers, and the attention computed above against the
  // oracle's: the same blocks, so the same output error (up to float rounding), unless
  // the GPU tier handed back the wrong bytes.
  const int e = EvalIndex(layer);
  if (e < 0) return Status::OK();
  const AttentionOracle& oracle = *oracles_[e][step];
  std::vector<uint64_t> needle_tokens;
  for (const Needle& n : needles) needle_tokens.push_back(n.token);
  const bench::SparsePolicy policy{r.n_init, r.n_local, r.top_k};
  KVTIER_ASSIGN_OR_RETURN(bench::SelectionMetrics m,
                          oracle.Evaluate(policy, picked_, needle_tokens));
  row->evaluated += 1;
  row->recall += m.recall;
  row->coverage += m.coverage;
  row->output_rel_l2 += m.output_rel_l2;
  row->needles += uint32_t(m.needle_hits.size());
  row->needles_found += uint32_t(std::count(m.needle_hits.begin(), m.needle_hits.end(), true));
  const std::vector<double> full = oracle.FullOutput();
  double diff = 0, norm = 0;
  for (size_t i = 0; i < full.size(); ++i) {
    diff += (out_[i] - full[i]) * (out_[i] - full[i]);
    norm += full[i] * full[i];
  }
  const double kernel_rel_l2 = std::sqrt(diff / norm);
  const double gap = std::abs(kernel_rel_l2 - m.output_rel_l2);
  max_kernel_gap_ = std::max(max_kernel_gap_, gap);
  if (!(gap <= 1e-3 + 0.05 * m.output_rel_l2)) {
    ++kernel_mismatches_;
    std::fprintf(stderr,
                 "kvtier demo: layer %u step %u: the attention over the acquired blocks is %.4g "
                 "from full attention, the oracle says %.4g for the same blocks\n",
                 layer, step, kernel_rel_l2, m.output_rel_l2);
  }
  return Status::OK();
}

Status DecodeDemo::Step(uint32_t step, StepRow* row) {
  const StoreStats before = store_->Stats();
  for (uint32_t l = 0; l < layout_.num_layers; ++l) {
    KVTIER_RETURN_IF_ERROR(Layer(step, l, row).WithContext("layer " + std::to_string(l)));
  }
  const StoreStats after = store_->Stats();
  row->disk_to_host_bytes = after.disk_bytes_read - before.disk_bytes_read;
  row->host_to_device_bytes = after.device_bytes_in - before.device_bytes_in;
  return Status::OK();
}

StepRow DecodeDemo::Total() const {
  StepRow t;
  for (const StepRow& r : rows_) {
    t.select_s += r.select_s, t.fetch_s += r.fetch_s, t.attention_s += r.attention_s;
    t.blocks += r.blocks, t.hits += r.hits, t.from_host += r.from_host;
    t.from_disk += r.from_disk, t.disk_to_host_bytes += r.disk_to_host_bytes;
    t.host_to_device_bytes += r.host_to_device_bytes, t.evaluated += r.evaluated;
    t.recall += r.recall, t.coverage += r.coverage, t.output_rel_l2 += r.output_rel_l2;
    t.needles += r.needles, t.needles_found += r.needles_found;
    t.needles_all += r.needles_all, t.needles_all_found += r.needles_all_found;
  }
  return t;
}

void DecodeDemo::PrintHeader() const {
  const RetrievalOptions& r = options_.retrieval;
  const StoreStats& s = after_prefill_;
  const uint64_t blocks = workload_->num_blocks() * layout_.num_layers;
  std::printf("kvtier demo: decode loop, %s\n", layout_.ToString().c_str());
  std::printf(
      "  context: %llu tokens = %llu blocks x %u layers = %llu blocks of %llu KiB "
      "(%s); %u needles planted in every layer\n",
      (unsigned long long)config_.tokens, (unsigned long long)workload_->num_blocks(),
      layout_.num_layers, (unsigned long long)blocks,
      (unsigned long long)(layout_.BytesPerBlock() >> 10),
      SizeText(blocks * layout_.BytesPerBlock()).c_str(), config_.needles);
  std::printf("  host tier: %s (%llu slots, %s memory); disk tier: %s (%s of slab files)\n",
              SizeText(s.host_capacity_bytes).c_str(), (unsigned long long)s.host_slots,
              std::string(HostMemoryKindName(s.host_memory)).c_str(), options_.directory.c_str(),
              SizeText(s.disk_capacity_bytes).c_str());
  std::printf("  GPU tier: %s (%llu slots), %s\n", SizeText(s.device_capacity_bytes).c_str(),
              (unsigned long long)s.device_slots, gpu_text_.c_str());
  std::printf(
      "  retrieval: summary %s, backend %s, scope %s; each step and layer attends %u "
      "sink tokens, a %u-token window and the top-%u blocks\n",
      std::string(SummaryKindName(r.summary)).c_str(),
      std::string(IndexBackendName(r.backend)).c_str(), SelectionScopeName(r.scope), r.n_init,
      r.n_local, r.top_k);
  std::printf(
      "\nprefill: %llu blocks in %.1f s (%.2f GB/s): chunks generated on %u threads "
      "(the store waited %.1f s for them), PutBatch+Flush %.1f s, oracles %.1f s\n",
      (unsigned long long)blocks, prefill_s_,
      double(blocks * layout_.BytesPerBlock()) / prefill_s_ / 1e9, generator_threads_,
      generator_wait_s_, put_s_, oracle_s_);
  std::printf(
      "  after prefill: %llu blocks in the host tier, %llu evicted (on disk), %llu "
      "written to disk, %llu indexed\n",
      (unsigned long long)s.host_blocks, (unsigned long long)s.evictions,
      (unsigned long long)s.disk_writes, (unsigned long long)s.indexed_blocks);
}

void DecodeDemo::PrintStepHeader() const {
  std::string layers;
  for (uint32_t l : eval_layers_) layers += (layers.empty() ? "" : ", ") + std::to_string(l);
  std::printf(
      "\ndecode: %u steps x %u layers; quality on layer%s %s (exact attention over all "
      "%llu tokens, fed from the generator)\n",
      config_.steps, layout_.num_layers, eval_layers_.size() == 1 ? "" : "s",
      layers.empty() ? "(none)" : layers.c_str(), (unsigned long long)config_.tokens);
  if (config_.needles > 0) {
    std::printf(
        "  (a needle, logit ~30, outweighs the rest of the context at its step and at the "
        "steps after it that keep its\n   target: coverage and output error are then "
        "near perfect; --needles 0 shows the workload's own attention)\n");
  }
  std::printf("  %4s %9s %9s %9s %8s %11s %11s %9s %9s %10s %8s\n", "step", "select_ms", "fetch_ms",
              "attn_ms", "gpu_hit", "disk>host", "host>gpu", "recall@k", "coverage", "out_l2",
              "needles");
}

void DecodeDemo::PrintStep(uint32_t step, const StepRow& r) const {
  char needles[32];
  std::snprintf(needles, sizeof(needles), "%u/%u", r.needles_found, r.needles);
  std::printf("  %4u %9.1f %9.1f %9.1f %7.1f%% %8.1f MB %8.1f MB %9.4f %9.4f %10.4g %8s\n", step,
              r.select_s * 1e3, r.fetch_s * 1e3, r.attention_s * 1e3, 100 * r.hit_rate(),
              r.disk_to_host_bytes / kMB, r.host_to_device_bytes / kMB, r.Mean(r.recall),
              r.Mean(r.coverage), r.Mean(r.output_rel_l2), needles);
  std::fflush(stdout);
}

void DecodeDemo::PrintSummary(bool ok, double wall_s) const {
  const StepRow t = Total();
  const StoreStats s = store_->Stats();
  std::printf("  %4s %9.1f %9.1f %9.1f %7.1f%% %8.1f MB %8.1f MB %9.4f %9.4f %10.4g %5u/%u\n",
              "all", t.select_s * 1e3, t.fetch_s * 1e3, t.attention_s * 1e3, 100 * t.hit_rate(),
              t.disk_to_host_bytes / kMB, t.host_to_device_bytes / kMB, t.Mean(t.recall),
              t.Mean(t.coverage), t.Mean(t.output_rel_l2), t.needles_found, t.needles);
  std::printf(
      "  (ms summed over the %u layers of a step; gpu_hit: acquired blocks already in the GPU "
      "tier;\n   disk>host, host>gpu: bytes the store moved, prefetches included; quality: "
      "means over the evaluated layers)\n",
      layout_.num_layers);
  std::printf(
      "\nsummary: %.1f s in all (prefill %.1f s, decode %.1f s: %.1f ms per step and "
      "layer)\n",
      wall_s, prefill_s_, decode_s_,
      decode_s_ * 1e3 / double(uint64_t{config_.steps} * layout_.num_layers));
  std::printf(
      "  GPU tier: %llu of %llu acquired blocks were hits (%.1f%%); %llu copied from the "
      "host tier, %llu read from disk first; %llu prefetched (%llu used)\n",
      (unsigned long long)t.hits, (unsigned long long)t.blocks, 100 * t.hit_rate(),
      (unsigned long long)t.from_host, (unsigned long long)t.from_disk,
      (unsigned long long)s.prefetches, (unsigned long long)s.prefetch_hits);
  std::printf(
      "  moved: %.1f MB disk -> host, %.1f MB host -> GPU; Select %.3f ms per call "
      "(mean) over %llu calls\n",
      t.disk_to_host_bytes / kMB, t.host_to_device_bytes / kMB,
      s.selects ? double(s.select_nanos) / double(s.selects) / 1e6 : 0.0,
      (unsigned long long)s.selects);
  std::printf("  needles: %u of %u attended in the evaluated layers; %u of %u in all layers\n",
              t.needles_found, t.needles, t.needles_all_found, t.needles_all);
  std::printf(
      "  attention over the acquired blocks vs the oracle: largest gap in output error "
      "%.2g (%u mismatches)\n",
      max_kernel_gap_, kernel_mismatches_);
  std::printf("  result: %s\n", ok ? "OK" : "FAILED");
}

void DecodeDemo::PrintJson(bool ok, double wall_s) const {
  const StepRow t = Total();
  const StoreStats s = store_->Stats();
  auto step_fields = [](JsonWriter& w, const StepRow& r) {
    w.Key("select_ms"), w.Number(r.select_s * 1e3);
    w.Key("fetch_ms"), w.Number(r.fetch_s * 1e3);
    w.Key("attention_ms"), w.Number(r.attention_s * 1e3);
    w.Key("acquired_blocks"), w.Uint(r.blocks);
    w.Key("gpu_hits"), w.Uint(r.hits);
    w.Key("gpu_hit_rate"), w.Number(r.hit_rate());
    w.Key("disk_to_host_bytes"), w.Uint(r.disk_to_host_bytes);
    w.Key("host_to_gpu_bytes"), w.Uint(r.host_to_device_bytes);
    w.Key("recall"), w.Number(r.Mean(r.recall));
    w.Key("coverage"), w.Number(r.Mean(r.coverage));
    w.Key("output_rel_l2"), w.Number(r.Mean(r.output_rel_l2));
    w.Key("needles_planted"), w.Uint(r.needles);
    w.Key("needles_found"), w.Uint(r.needles_found);
  };
  JsonWriter w;
  w.BeginObject();
  w.Key("layout"), w.String(layout_.ToString());
  w.Key("tokens"), w.Uint(config_.tokens);
  w.Key("steps"), w.Uint(config_.steps);
  w.Key("block_bytes"), w.Uint(layout_.BytesPerBlock());
  w.Key("host_capacity_bytes"), w.Uint(s.host_capacity_bytes);
  w.Key("device_capacity_bytes"), w.Uint(s.device_capacity_bytes);
  w.Key("device_emulated"), w.Bool(!on_gpu_);
  w.Key("eval_layers");
  w.NumberArray(eval_layers_);
  w.Key("prefill_s"), w.Number(prefill_s_);
  w.Key("decode_s"), w.Number(decode_s_);
  w.Key("wall_s"), w.Number(wall_s);
  step_fields(w, t);
  w.Key("needles_all_layers_planted"), w.Uint(t.needles_all);
  w.Key("needles_all_layers_found"), w.Uint(t.needles_all_found);
  w.Key("prefetches"), w.Uint(s.prefetches);
  w.Key("prefetch_hits"), w.Uint(s.prefetch_hits);
  w.Key("evictions"), w.Uint(after_prefill_.evictions);
  w.Key("disk_writes"), w.Uint(after_prefill_.disk_writes);
  w.Key("attention_oracle_max_gap"), w.Number(max_kernel_gap_);
  w.Key("attention_mismatches"), w.Uint(kernel_mismatches_);
  w.Key("per_step");
  w.BeginArray();
  for (size_t i = 0; i < rows_.size(); ++i) {
    w.BeginObject();
    w.Key("step"), w.Uint(i);
    step_fields(w, rows_[i]);
    w.EndObject();
  }
  w.EndArray();
  w.Key("ok"), w.Bool(ok);
  w.EndObject();
  std::printf("%s\n", w.str().c_str());
}

int DecodeDemo::Run() {
  const auto start = Clock::now();
  if (Status s = Setup(); !s.ok()) {
    std::fprintf(stderr, "kvtier demo: %s\n", s.ToString().c_str());
    return 2;
  }
  if (Status s = Prefill(); !s.ok()) {
    std::fprintf(stderr, "kvtier demo: prefill: %s\n", s.ToString().c_str());
    return 2;
  }
  if (!config_.json) {
    PrintHeader();
    PrintStepHeader();
  }
  const auto decode_start = Clock::now();
  Status failed;
  for (uint32_t step = 0; step < config_.steps && failed.ok(); ++step) {
    StepRow row;
    failed = Step(step, &row).WithContext("step " + std::to_string(step));
    rows_.push_back(row);
    if (failed.ok() && !config_.json) PrintStep(step, row);
  }
  decode_s_ = SecondsSince(decode_start);
  if (trace_ != nullptr) {
    if (Status s = trace_->Close(); !s.ok() && failed.ok()) failed = s.WithContext("--trace-out");
  }
  if (!failed.ok()) std::fprintf(stderr, "kvtier demo: %s\n", failed.ToString().c_str());
  const StepRow t = Total();
  const bool ok = failed.ok() && kernel_mismatches_ == 0 && t.needles_found == t.needles;
  const double wall_s = SecondsSince(start);
  if (config_.json) {
    PrintJson(ok, wall_s);
  } else {
    PrintSummary(ok, wall_s);
  }
  return ok ? 0 : 1;
}

}  // namespace

int RunDecodeDemo(const DemoConfig& config) {
  if (config.memory_only || config.sequences != 1) {
    std::fprintf(stderr, "kvtier demo: --memory-only and --sequences go with --verify-only\n");
    return 2;
  }
  DecodeDemo demo(config);
  return demo.Run();
}

}  // namespace kvtier::tools
